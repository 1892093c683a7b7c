"""Metrics end to end: `nfrewrite run` in the lab, real TCP, real scrapes, a real Prometheus.

client ns -- [appliance ns: br0 + nfrewrite run (+ prometheus)] -- server ns.  Every scrape is
made from inside the appliance namespace (the daemon listens on its loopback) and parsed with
``prometheus_client.parser`` (never regexes).

How the packet count is made exact: the rule is a same-length literal replace, so the kernel
prefilter queues only packets whose bytes contain the pattern.  Each connection carries the
pattern in exactly one small segment (TCP_NODELAY, one write), and the connections run one after
the other, each waiting for the server's answer, so no pattern segment is ever in flight while
another waits for a verdict.  The ground truth for "packets handed to the queue" is the kernel's
own per-queue packet id sequence (``/proc/net/netfilter/nfnetlink_queue``, read in the appliance
namespace): the daemon's counters must move by exactly that much, and that must be exactly N
unless the client's TCP retransmitted (read from its namespace's ``/proc/net/snmp``), in which
case each retransmitted pattern segment is honestly one more packet.

``prometheus`` and ``promtool`` come from Debian's ``prometheus`` package.  Without root these
tests skip (privileged); with root but without the binaries the Prometheus test skips locally and
FAILS under CI (``CI=true``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import nfrewrite
from lab.netns import Daemon, Lab, LabError, write_lab_config
from nfrewrite.config.settings import OFFLOAD_KEYS
from nfrewrite.core.packet import REASONS
from nfrewrite.service import metrics as M
from tests.conftest import IN_CI

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parent.parent
METRICS_PORT = 9640
PROMETHEUS_LISTEN = "127.0.0.1:9641"
PORT = 8080

WORD_RULE = """
[[rule]]
name = "word"
match = { dport = 8080 }
replace = [ { find = "apple", with = "APPLE" } ]
"""
PEAR_RULE = """
[[rule]]
name = "pear-upper"
match = { dport = 8080 }
replace = [ { find = "pear", with = "PEAR" } ]
"""

Key = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[Key, float]

# -- helpers run inside the namespaces -------------------------------------------------------------

#: GET a URL (no proxy from the environment: everything is on the namespace's loopback).
HTTP_GET = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as r:
    sys.stdout.buffer.write(r.read())
"""

#: Accept N connections one by one; read a line, answer "ok", read to EOF; print one JSON line.
SERVER = r"""
import json, socket, sys
n = int(sys.argv[1])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", int(sys.argv[2])))
srv.listen(16)
srv.settimeout(20)
print("READY", flush=True)
for _ in range(n):
    c, addr = srv.accept()
    c.settimeout(10)
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(4096)
        if not d:
            break
        data += d
    c.sendall(b"ok\n")
    while True:  # then the client's FIN
        d = c.recv(4096)
        if not d:
            break
        data += d
    c.close()
    print(json.dumps({"peer": addr[0], "data": data.hex()}), flush=True)
"""

#: One connection per (source, destination) pair, one after the other: one write of the payload
#: (TCP_NODELAY: one segment), wait for the server's "ok" (so the segment has had its verdict),
#: only then half-close and read to EOF.  Half-closing at once would send a FIN that no rule
#: queues: it overtakes the segment waiting in the queue, the receiver SACKs it, and the sender's
#: RACK declares the segment lost and retransmits it (a second queued packet) within microseconds.
CLIENT = r"""
import json, socket, sys
pairs = json.loads(sys.argv[1]); port = int(sys.argv[2]); payload = sys.argv[3].encode()
used = []
for i, (src, dst) in enumerate(pairs):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if src:
        s.bind((src, 0))
    s.connect((dst, port))
    used.append(s.getsockname()[1])
    s.sendall(payload + b" %d\n" % i)
    got = b""
    while not got.endswith(b"\n"):  # the line went through the queue
        d = s.recv(4096)
        if not d:
            break
        got += d
    s.shutdown(socket.SHUT_WR)  # only now: a FIN must not overtake the queued segment
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
    s.close()
    if got != b"ok\n":
        sys.exit(f"connection {i}: server answered {got!r}")
print(json.dumps({"ports": used}))
"""


def scrape(lab: Lab, url: str = f"http://127.0.0.1:{METRICS_PORT}/metrics") -> str:
    """GET from inside the appliance namespace."""
    proc = lab.run("appliance", [sys.executable, "-c", HTTP_GET, url], timeout=15)
    return str(proc.stdout)


def samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def key(name: str, **labels: str) -> Key:
    return (name, frozenset(labels.items()))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How far one series moved; it must exist after (a series that vanished is a bug)."""
    k = key(name, **labels)
    assert k in after, f"no sample {name}{labels} in the scrape"
    return after[k] - before.get(k, 0.0)


def kernel_enqueued(lab: Lab, workdir: str) -> dict[int, int]:
    """Per queue: the kernel's packet id sequence (one id per packet handed to the queue)."""
    text = lab.run("appliance", ["cat", M.NFQUEUE_PROC]).stdout
    path = os.path.join(workdir, "nfnetlink_queue")
    with open(path, "w") as f:
        f.write(text)
    return {q: s.id_sequence for q, s in M.read_queue_stats(path).items()}


@dataclass(frozen=True)
class Traffic:
    received: list[bytes]  # by the server, per connection
    peers: list[str]  # the client address the server saw, per connection
    ports: list[int]  # the client's source port, per connection


def traffic(lab: Lab, pairs: Sequence[tuple[str | None, str]], payload: str) -> Traffic:
    """Run the connections; returns what the server got per connection and the client ports."""
    env = lab.python_env()
    server = lab.popen("server", [sys.executable, "-c", SERVER, str(len(pairs)), str(PORT)],
                       env=env, stdin=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        if ready.strip() != b"READY":
            server.kill()
            raise LabError(f"server did not start: {ready!r} {server.communicate()[1]!r}")
        client = lab.run(
            "client", [sys.executable, "-c", CLIENT, json.dumps(pairs), str(PORT), payload],
            env=env, check=False, timeout=60,
        )
        s_out, s_err = server.communicate(timeout=30)
        if client.returncode != 0 or server.returncode != 0:
            raise LabError(f"traffic failed: client {client.returncode} {client.stderr.strip()!r}"
                           f"; server {server.returncode} {s_err.decode().strip()!r}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)
    records = [json.loads(line) for line in s_out.decode().splitlines()]
    return Traffic(
        received=[bytes.fromhex(r["data"]) for r in records],
        peers=[r["peer"] for r in records],
        ports=json.loads(client.stdout)["ports"],
    )


def add_client_addresses(lab: Lab, v4: Sequence[str], v6: Sequence[str]) -> None:
    for a in v4:
        lab.run("client", ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    for a in v6:
        lab.run("client", ["ip", "-6", "addr", "add", f"{a}/64", "dev", "eth0", "nodad"])


@contextlib.contextmanager
def running(lab: Lab, config: str) -> Iterator[Daemon]:
    """The daemon with its metrics directory under the test's directory (``RUNTIME_DIRECTORY``,
    as systemd gives it), stopped with SIGTERM at the end: it must exit 0, remove the metrics
    directory and leave only the workers' flow-state snapshots.  On a failure it is killed, and
    its files go with the test's directory.  (While it runs, the runtime directory also holds the
    sysctl record and lock of ``netsetup``.)"""
    rundir = os.path.join(os.path.dirname(config), "run")
    os.makedirs(rundir, mode=0o700, exist_ok=True)

    def metrics_dirs() -> list[str]:
        return [n for n in os.listdir(rundir) if n.startswith("nfrewrite-metrics-")]

    with Daemon(lab, config, env={"RUNTIME_DIRECTORY": rundir}) as daemon:
        (made,) = metrics_dirs()
        assert os.stat(os.path.join(rundir, made)).st_mode & 0o777 == 0o700  # private
        yield daemon
        assert daemon.stop() == 0
        # A clean stop removes the metrics directory, the sysctl record and the lock; what stays
        # is each worker's flow-state snapshot (kept on purpose so that a start within
        # ``[flows] state_max_age`` restores the offsets), private to the service user.
        left = os.listdir(rundir)
        assert left and all(re.fullmatch(r"flows-netns-\d+-q\d+\.state", n) for n in left), left
        for name in left:
            assert os.stat(os.path.join(rundir, name)).st_mode & 0o777 == 0o600



# -- 1. exact counts ------------------------------------------------------------------------------
N = 12


def test_counters_move_by_exactly_the_packets_the_kernel_queued(workdir: str, lab: Lab) -> None:
    queues = (3, 4)
    config = write_lab_config(workdir, {"10.toml": WORD_RULE}, queue_num=queues[0],
                              workers=len(queues), metrics_port=METRICS_PORT)
    add_client_addresses(lab, ["198.18.0.11"], ["2001:2::11"])
    # IPv4 and IPv6, default and extra source addresses; a new source port every time
    sources = [(None, lab.server_v4), ("198.18.0.11", lab.server_v4),
               (None, lab.server_v6), ("2001:2::11", lab.server_v6)]
    pairs = [sources[i % len(sources)] for i in range(N)]
    with running(lab, config):
        lab.wait_reachable()
        before = samples(scrape(lab))
        k_before = kernel_enqueued(lab, workdir)
        tcp_before = lab.tcp_counters("client")
        got = traffic(lab, pairs, "apple pear")
        tcp_after = lab.tcp_counters("client")
        k_after = kernel_enqueued(lab, workdir)
        after = samples(scrape(lab))

    assert got.received == [b"APPLE pear %d\n" % i for i in range(N)]
    assert set(k_before) == set(k_after) == set(queues)
    queued = {q: k_after[q] - k_before[q] for q in queues}
    retrans = (tcp_after["Tcp.RetransSegs"] - tcp_before["Tcp.RetransSegs"]) - (
        tcp_after["TcpExt.TCPSynRetrans"] - tcp_before["TcpExt.TCPSynRetrans"])
    # The kernel queues every segment of the rule's port (patterns are matched in the engine
    # only), so the ground truth for "seen" is its count; "modified" is the N pattern segments,
    # and a retransmitted one (none expected) is honestly one more.
    assert sum(queued.values()) >= N, queued
    modified = sum(delta(before, after, "nfrewrite_packets_modified_total", queue=str(q))
                   for q in queues)
    assert N <= modified <= N + retrans, (modified, retrans)
    if retrans == 0:
        assert modified == N

    total_seen = 0.0
    for q in queues:
        lq = str(q)
        seen = delta(before, after, "nfrewrite_packets_seen_total", queue=lq)
        assert seen == queued[q], (q, seen, queued)
        assert delta(before, after, "nfrewrite_packets_dropped_total", queue=lq) == 0
        for reason in REASONS:
            assert delta(before, after, "nfrewrite_packets_unparsed_total", queue=lq,
                         reason=reason) == 0, reason
        for kind in M.ERROR_KINDS:
            assert delta(before, after, "nfrewrite_handler_errors_total", queue=lq,
                         kind=kind) == 0, kind
        h = "nfrewrite_packet_processing_seconds"
        assert delta(before, after, f"{h}_count", queue=lq) == seen
        assert delta(before, after, f"{h}_bucket", queue=lq, le="+Inf") == seen
        assert (delta(before, after, f"{h}_sum", queue=lq) > 0) == (seen > 0)
        assert after[key("nfrewrite_seqadj_flows", queue=lq)] == 0  # same-length edits only
        total_seen += seen
    assert total_seen == sum(queued.values())
    assert delta(before, after, "nfrewrite_rule_applied_total", rule="word") == modified
    # what the kernel said it did not drop, it did not drop
    for q in queues:
        assert after[key("nfrewrite_kernel_queue_dropped_total", queue=str(q))] == 0
        assert after[key("nfrewrite_kernel_queue_user_dropped_total", queue=str(q))] == 0


# -- 2. reload success gauge and timestamp ---------------------------------------------------------
def test_failed_reload_flips_success_to_0_and_a_good_one_back_to_1(workdir: str, lab: Lab) -> None:
    config = write_lab_config(workdir, {"10.toml": WORD_RULE}, metrics_port=METRICS_PORT)
    rule_file = os.path.join(workdir, "rules", "10.toml")
    ok, ts, loaded = ("nfrewrite_last_reload_successful", "nfrewrite_last_reload_timestamp_seconds",
                      "nfrewrite_rules_loaded")
    t_start = time.time()
    with running(lab, config) as daemon:
        s0 = samples(scrape(lab))
        assert s0[key(ok)] == 1
        assert t_start <= s0[key(ts)] <= time.time()
        assert s0[key(loaded)] == 1

        with open(rule_file, "w") as f:
            f.write(WORD_RULE.replace("find", "fnid"))
        t1 = time.time()
        assert "reload failed" in daemon.reload()
        s1 = samples(scrape(lab))
        assert s1[key(ok)] == 0
        assert s0[key(ts)] < s1[key(ts)] and t1 <= s1[key(ts)] <= time.time()
        assert s1[key(loaded)] == 1  # the running rules stay

        with open(rule_file, "w") as f:
            f.write(WORD_RULE + PEAR_RULE)
        t2 = time.time()
        assert "reload done" in daemon.reload()
        s2 = samples(scrape(lab))
        assert s2[key(ok)] == 1
        assert s1[key(ts)] < s2[key(ts)] and t2 <= s2[key(ts)] <= time.time()
        assert s2[key(loaded)] == 2
        # the worker confirmed the new set before "reload done": its counter exists, at 0
        assert s2[key("nfrewrite_rule_applied_total", rule="pear-upper")] == 0


# -- 2b. a worker killed and restarted -----------------------------------------------------------
def _worker_pids(daemon: Daemon, queue: int) -> list[int]:
    """Worker pids for ``queue`` in the order the daemon logged binding them."""
    marker = f" bound queue {queue} "
    return [int(line.split()[2]) for line in daemon.log().splitlines() if marker in line]


def test_counts_survive_a_worker_killed_and_restarted(workdir: str, lab: Lab) -> None:
    config = write_lab_config(workdir, {"10.toml": WORD_RULE}, metrics_port=METRICS_PORT)
    n1, n2 = 4, 3
    with running(lab, config) as daemon:
        lab.wait_reachable()
        s0 = samples(scrape(lab))
        tcp0 = lab.tcp_counters("client")
        traffic(lab, [(None, lab.server_v4)] * n1, "apple")
        s1 = samples(scrape(lab))
        (first,) = _worker_pids(daemon, 0)
        mark = len(daemon.log())
        os.kill(first, signal.SIGKILL)
        daemon.wait_log(" bound queue 0 ", after=mark)
        (_, second) = _worker_pids(daemon, 0)
        assert second != first
        traffic(lab, [(None, lab.server_v6)] * n2, "apple")
        tcp2 = lab.tcp_counters("client")
        s2 = samples(scrape(lab))

    retrans = tcp2["Tcp.RetransSegs"] - tcp0["Tcp.RetransSegs"]
    # every segment of the port is queued; the pattern segments are the modified ones
    mod1 = delta(s0, s1, "nfrewrite_packets_modified_total", queue="0")
    mod2 = delta(s0, s2, "nfrewrite_packets_modified_total", queue="0")
    assert n1 <= mod1 and n1 + n2 <= mod2 <= n1 + n2 + retrans, (mod1, mod2, retrans)
    if retrans == 0:
        assert (mod1, mod2) == (n1, n1 + n2)  # the dead worker's counts stay in the total
    seen2 = delta(s0, s2, "nfrewrite_packets_seen_total", queue="0")
    assert seen2 > mod2
    assert delta(s0, s2, "nfrewrite_packet_processing_seconds_count", queue="0") == seen2
    assert delta(s0, s2, "nfrewrite_rule_applied_total", rule="word") == mod2
    assert delta(s0, s2, "nfrewrite_worker_restarts_total", queue="0") == 1
    # live gauges: the dead worker's copies are gone, one series each remains
    assert s2[key("nfrewrite_seqadj_flows", queue="0")] == 0
    build = [k for k in s2 if k[0] == "nfrewrite_build_info"]
    assert len(build) == 1 and s2[build[0]] == 1
    assert s2[key("nfrewrite_last_reload_successful")] == 1
    assert set(s0) == set(s2)  # no series appeared or vanished


# -- 2c. flows with a sequence offset ------------------------------------------------------------
GROW_RULE = """
[[rule]]
name = "grow"
match = { dport = 8080 }
replace = [ { find = "apple", with = "apples" } ]
"""


def test_flows_with_a_sequence_offset_show_in_the_gauge(workdir: str, lab: Lab) -> None:
    config = write_lab_config(workdir, {"10.toml": GROW_RULE}, metrics_port=METRICS_PORT)
    n = 2
    gauge = key("nfrewrite_seqadj_flows", queue="0")
    with running(lab, config):
        lab.wait_reachable()
        assert samples(scrape(lab))[gauge] == 0
        got = traffic(lab, [(None, lab.server_v4), (None, lab.server_v6)], "apple")
        assert got.received == [b"apples %d\n" % i for i in range(n)]
        # the worker copies its flow table's size at least twice a second; an ended flow stays
        # in the table for its close grace (10 s), longer than this test
        deadline = time.monotonic() + 5
        while (value := samples(scrape(lab))[gauge]) != n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert value == n
        s = samples(scrape(lab))
    assert s[key("nfrewrite_seqadj_flow_evictions_total", queue="0")] == 0
    assert s[key("nfrewrite_rule_applied_total", rule="grow")] >= n


# -- 3. a real Prometheus scrapes it; promtool accepts a real scrape -------------------------------
@pytest.fixture
def prometheus_bins() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        msg = "prometheus/promtool not found (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"{msg}: required under CI", pytrace=False)
        pytest.skip(msg)
    return prometheus, promtool


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {alerts}
scrape_configs:
  - job_name: nfrewrite
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def prom_get(lab: Lab, path: str, **params: str) -> Any:
    """GET a Prometheus HTTP API path (from inside the appliance namespace); its ``data``."""
    url = f"http://{PROMETHEUS_LISTEN}{path}?" + urllib.parse.urlencode(params)
    reply = json.loads(scrape(lab, url))
    assert reply["status"] == "success", reply
    return reply["data"]


def prom_time(stamp: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds; ``Z`` or ``+hh:mm``) -> Unix time."""
    if stamp.endswith("Z"):
        body, zone = stamp[:-1], "+00:00"
    else:
        body, zone = stamp[:-6], stamp[-6:]
    head, _, frac = body.partition(".")
    whole = datetime.fromisoformat(head + zone).timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


def poll(what: str, check: Callable[[], Any], deadline: float, log_path: str) -> Any:
    """Call ``check`` until it returns something true (an exception counts as not yet)."""
    last: Any = None
    while True:
        try:
            last = check()
        except (LabError, ValueError, KeyError) as e:  # not up yet
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            with open(log_path, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            pytest.fail(f"{what}: not seen in time; last: {last!r}\nprometheus log:\n{tail}")
        time.sleep(0.2)


#: Example alerts that may legitimately be pending right after Prometheus starts: a rate over a
#: single sample is 0.
MAY_BE_PENDING = {"NfrewriteNoPackets"}


def test_a_real_prometheus_scrapes_the_daemon_and_promtool_accepts_its_text(
    prometheus_bins: tuple[str, str], workdir: str, lab: Lab
) -> None:
    prometheus, promtool = prometheus_bins
    n = 5
    config = write_lab_config(workdir, {"10.toml": WORD_RULE}, metrics_port=METRICS_PORT)
    prom_yml = os.path.join(workdir, "prometheus.yml")
    alerts = ROOT / "examples" / "prometheus" / "alerts.yml"
    with open(prom_yml, "w") as f:
        f.write(PROMETHEUS_CONFIG.format(alerts=alerts, port=METRICS_PORT))
    tsdb = os.path.join(workdir, "tsdb")
    prom_log_path = os.path.join(workdir, "prometheus.log")
    argv = [
        prometheus,
        f"--config.file={prom_yml}",
        f"--storage.tsdb.path={tsdb}",
        f"--web.listen-address={PROMETHEUS_LISTEN}",
    ]
    with running(lab, config), open(prom_log_path, "wb") as prom_log:
        prom = lab.popen("appliance", argv, stdout=subprocess.DEVNULL, stderr=prom_log,
                         stdin=subprocess.DEVNULL)
        try:
            lab.wait_reachable()
            got = traffic(lab, [(None, lab.server_v4)] * n, "apple")
            assert got.received == [b"APPLE %d\n" % i for i in range(n)]

            # the daemon's own figure (exact, see the first test) is what Prometheus must show
            direct = samples(scrape(lab))
            expected = direct[key("nfrewrite_rule_applied_total", rule="word")]
            assert expected >= n
            deadline = time.monotonic() + 20
            query = 'nfrewrite_rule_applied_total{job="nfrewrite",rule="word"}'

            def counter_shown() -> Any:
                assert prom.poll() is None, "prometheus exited"
                result = prom_get(lab, "/api/v1/query", query=query)["result"]
                return result if [float(r["value"][1]) for r in result] == [expected] else None

            poll(f"{query} == {expected}", counter_shown, deadline, prom_log_path)
            t_shown = time.time()
            up = prom_get(lab, "/api/v1/query", query='up{job="nfrewrite"}')["result"]
            assert [u["value"][1] for u in up] == ["1"]
            # every sample of a scrape was ingested: as many series as the text has samples
            for q in ("scrape_samples_scraped", 'count({__name__=~"nfrewrite_.+"})'):
                res = prom_get(lab, "/api/v1/query", query=q)["result"]
                assert [float(r["value"][1]) for r in res] == [len(direct)], (q, res)
            seen = prom_get(lab, "/api/v1/query",
                            query='sum(nfrewrite_packets_seen_total{job="nfrewrite"})')["result"]
            assert float(seen[0]["value"][1]) == direct[
                key("nfrewrite_packets_seen_total", queue="0")]

            # the example alert rules evaluate against the real series without error, and a
            # healthy appliance trips none of them (a queue label that disagreed between the
            # workers and the kernel collector would make NfrewriteQueueNotBound pending)
            def rules_evaluated() -> Any:
                groups = prom_get(lab, "/api/v1/rules")["groups"]
                assert groups
                done = all(prom_time(g["lastEvaluation"]) > t_shown for g in groups)
                return groups if done else None

            groups = poll("rule evaluation", rules_evaluated, deadline, prom_log_path)
            for g in groups:
                for r in g["rules"]:
                    assert r["health"] == "ok", r
                    if r["name"] not in MAY_BE_PENDING:
                        assert r["state"] == "inactive", r
        finally:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(5)

        with open(prom_log_path) as f:
            errors = [line for line in f if "level=error" in line]
        assert not errors, errors

        # promtool accepts a real scrape of the running daemon, without a single lint remark
        text = scrape(lab)
        check = lab.run("appliance", [promtool, "check", "metrics"], input=text, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == "" and check.stderr.strip() == ""


# -- 4. bounded label values ----------------------------------------------------------------------
def _check_labels(s: Samples, allowed: dict[str, set[str]], traffic_ports: set[int]) -> None:
    buckets = {float(b) for b in M.TIME_BUCKETS} | {float("inf")}
    for name, labels in s:
        assert name.startswith("nfrewrite_"), name
        for label, value in labels:
            if label == "le":
                assert float(value) in buckets, (name, value)
                continue
            assert label in allowed, (name, label)
            assert value in allowed[label], (name, label, value)
            with pytest.raises(ValueError):
                ipaddress.ip_address(value)
            if value.isdigit():
                assert int(value) not in traffic_ports, (name, label, value)


def test_label_values_stay_in_fixed_sets_whatever_the_traffic(workdir: str, lab: Lab) -> None:
    queues = (7, 8)
    config = write_lab_config(workdir, {"10.toml": WORD_RULE + PEAR_RULE}, queue_num=queues[0],
                              workers=len(queues), metrics_port=METRICS_PORT,
                              offloads="{ gro = false }")
    v4 = [f"198.18.0.{i}" for i in range(20, 26)]
    v6 = [f"2001:2::{i:x}" for i in range(20, 26)]
    add_client_addresses(lab, v4, v6)
    allowed = {
        "queue": {str(q) for q in queues},
        "reason": set(REASONS),
        "kind": set(M.ERROR_KINDS),
        "rule": {"word", "pear-upper"},
        "port": set(lab.bridge_ports),
        "feature": set(OFFLOAD_KEYS),
        "version": {nfrewrite.__version__},
        "python": {platform.python_version()},
        "outcome": set(M.HOLD_OUTCOMES),
    }
    with running(lab, config):
        lab.wait_reachable()
        first = traffic(lab, [(a, lab.server_v4) for a in v4[:3]]
                        + [(a, lab.server_v6) for a in v6[:3]], "apple pear")
        s1 = samples(scrape(lab))
        second = traffic(lab, [(a, lab.server_v4) for a in v4[3:]]
                         + [(a, lab.server_v6) for a in v6[3:]] * 2, "pear apple")
        s2 = samples(scrape(lab))
    ports = set(first.ports) | set(second.ports) | {PORT}
    peers = {str(ipaddress.ip_address(p)) for p in first.peers + second.peers}
    assert len(peers) >= 12  # really from many addresses (and many source ports)
    for s in (s1, s2):
        _check_labels(s, allowed, ports)
    # the series are the same set after twice the addresses and ports: nothing grows with traffic
    assert set(s1) == set(s2)
    assert s2[key("nfrewrite_rule_applied_total", rule="pear-upper")] >= 15  # one per connection
    for port in lab.bridge_ports:  # the configured offload as read back from each port
        assert s2[key("nfrewrite_offload_enabled", port=port, feature="gro")] == 0
