"""``nfrewrite status`` and ``nfrewrite trace`` against the daemon in the lab, with real TCP.

client ns -- [appliance ns: br0 + nfrewrite run] -- server ns.  The daemon's runtime directory is
under the test's directory (``RUNTIME_DIRECTORY``, as systemd gives it), so its control socket is
``<workdir>/run/control.sock``; the commands are run as an operator would, as separate processes
given the same ``RUNTIME_DIRECTORY`` (a UNIX socket is a file: no namespace needed to reach it).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.netns import Daemon, Lab, tcp_exchange, write_lab_config

pytestmark = pytest.mark.privileged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS_PORT = 9640

RULES = """
[[rule]]
name = "word"
match = { dport = 8080 }
replace = [ { find = "apple", with = "APPLE" } ]

[[rule]]
name = "shorter"
match = { dport = 8081 }
replace = [ { find = "banana", with = "ban" } ]
"""

HTTP_GET = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as r:
    sys.stdout.buffer.write(r.read())
"""


def rundir_of(config: str) -> str:
    return os.path.join(os.path.dirname(config), "run")


@contextlib.contextmanager
def running(lab: Lab, config: str) -> Iterator[Daemon]:
    rundir = rundir_of(config)
    os.makedirs(rundir, mode=0o700, exist_ok=True)
    with Daemon(lab, config, env={"RUNTIME_DIRECTORY": rundir}) as daemon:
        yield daemon


def nfrewrite(config: str, *args: str, user: tuple[int, int] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nfrewrite", *args, "-c", config]
    if user is not None:
        argv = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env=client_env(config))


def client_env(config: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "RUNTIME_DIRECTORY": rundir_of(config)}


def start_trace(config: str, *args: str) -> subprocess.Popen[str]:
    """``nfrewrite trace`` running; returns once it said that every worker traces."""
    proc = subprocess.Popen([sys.executable, "-m", "nfrewrite", "trace", "-c", config, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=client_env(config))
    assert proc.stderr is not None
    line = read_line(proc.stderr, 15)
    if not line.startswith("nfrewrite trace: tracing queue(s) 0; Ctrl-C to stop"):
        proc.kill()
        raise AssertionError(f"trace did not start: {line!r} {proc.communicate()}")
    return proc


def read_line(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return str(stream.readline()) if ready else ""


def exchange_until_done(lab: Lab, proc: subprocess.Popen[str], payload: bytes, port: int,
                        timeout: float = 60) -> int:
    """Connections that carry ``payload`` to ``port``, IPv4 and IPv6 in turn, until ``proc``
    exits; returns how many."""
    n = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the trace never ended"
        tcp_exchange(lab, payload, b"ok", family=4 if n % 2 == 0 else 6, port=port)
        n += 1
    return n


def samples(lab: Lab) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    text = lab.run("appliance", [sys.executable, "-c", HTTP_GET, url], timeout=15).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def trace_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line]


def test_trace_count_5_status_agrees_with_metrics_and_a_stopped_daemon_exits_3(
        lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES}, metrics_port=METRICS_PORT)
    sock = os.path.join(rundir_of(config), "control.sock")
    with running(lab, config) as daemon:
        assert f"control socket {sock}" in daemon.log()
        lab.wait_reachable()

        trace = start_trace(config, "--count", "5")
        sent = exchange_until_done(lab, trace, b"an apple a day", 8080)
        out, err = trace.communicate(timeout=10)
        assert trace.returncode == 0, err
        lines = trace_lines(out)
        assert len(lines) == 5, (out, err)
        print("\n".join(lines))
        # one line per connection, or two if its segment was retransmitted (tcp_exchange's FIN
        # can overtake the queued segment): IPv4 and IPv6 both come
        assert sent >= 3
        families = set()
        for line in lines:
            v6 = "[" in line
            families.add(v6)
            client, server = ((f"[{lab.client_v6}]", f"[{lab.server_v6}]") if v6
                              else (lab.client_v4, lab.server_v4))
            fields = line.split()
            assert fields[1] == "q0", line
            assert fields[2].startswith(f"{client}:") and fields[3] == "->", line
            assert fields[4] == f"{server}:8080", line
            assert fields[5] == "word", line
            assert " len " in line and line.endswith("offset none"), line
            before, after = line.split(" len ")[1].split(" offset")[0].split(" -> ")
            assert before == after  # a same-length edit
        assert families == {False, True}

        # a length-changing rule: the trace shows the connection's offset, --json for a script
        trace = start_trace(config, "--rule", "shorter", "--count", "1", "--json")
        exchange_until_done(lab, trace, b"a banana split", 8081)
        out, err = trace.communicate(timeout=10)
        assert trace.returncode == 0, err
        (record,) = [json.loads(line) for line in trace_lines(out)]
        assert record["rules"] == ["shorter"] and record["dport"] == 8081
        assert record["len_after"] == record["len_before"] - 3
        assert record["offset"] == {"seq": -3, "ack": 0}
        assert record["src"] in (lab.client_v4, lab.client_v6)

        # no traffic now: status and /metrics read the same counts
        got = nfrewrite(config, "status", "--json")
        assert got.returncode == 0, got.stderr
        status = json.loads(got.stdout)
        scraped = samples(lab)
        applied = {dict(labels)["rule"]: value for (name, labels), value in scraped.items()
                   if name == "nfrewrite_rule_applied_total"}
        assert {r["name"]: r["hits"] for r in status["rules"]} == applied
        assert applied["word"] >= 5 and applied["shorter"] >= 1
        (queue,) = status["queues"]
        seen = scraped[("nfrewrite_packets_seen_total", frozenset({("queue", "0")}))]
        assert queue["packets_seen"] == seen
        assert queue["worker_pid"] in [int(x.split()[2]) for x in daemon.log().splitlines()
                                       if " bound queue " in x]
        assert queue["kernel"] == {"waiting": 0, "dropped": 0, "user_dropped": 0}
        assert status["last_reload"]["ok"] is True
        assert status["config"] == config and status["control_socket"] == sock
        assert [p["name"] for p in status["bridges"][0]["ports"]] == list(lab.bridge_ports)
        text = nfrewrite(config, "status")
        assert text.returncode == 0, text.stderr
        for rule in status["rules"]:  # the person's view lists each rule with its count
            assert any(line.split()[:2] == [str(rule["hits"]), rule["name"]]
                       for line in text.stdout.splitlines()), text.stdout

        # a trace that is running when the daemon stops ends, saying so
        trace = start_trace(config)
        assert daemon.stop() == 0
        out, err = trace.communicate(timeout=10)
        assert trace.returncode == 3
        assert err.splitlines()[-1] == ("nfrewrite trace: the daemon stopped; 0 packets traced")
    assert not os.path.exists(sock)
    stopped = nfrewrite(config, "status")
    assert stopped.returncode == 3
    assert stopped.stdout == ""
    assert stopped.stderr == f"nfrewrite status: not running: no control socket at {sock}\n"


def test_a_killed_daemon_leaves_a_socket_that_status_calls_stale_and_a_restart_replaces(
        lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES}, metrics_port=METRICS_PORT)
    sock = os.path.join(rundir_of(config), "control.sock")
    with running(lab, config) as daemon:
        daemon.signal(signal.SIGKILL)
        daemon.wait(5)
    assert os.path.exists(sock)
    got = nfrewrite(config, "status")
    assert got.returncode == 3
    assert got.stderr == (f"nfrewrite status: not running: nothing answers on {sock} (a socket "
                          "left by a stopped daemon)\n")
    time.sleep(0.5)  # the killed workers' queues unbound
    with running(lab, config):
        got = nfrewrite(config, "status", "--json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["rules"][0]["name"] == "word"


def test_a_user_without_access_gets_permission_denied_and_the_group_gets_in(
        lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES}, metrics_port=METRICS_PORT)
    os.chmod(workdir, 0o755)  # others may read the config (as /etc/nfrewrite is), not the socket
    os.chmod(config, 0o644)
    sock = os.path.join(rundir_of(config), "control.sock")
    with running(lab, config):
        os.chmod(rundir_of(config), 0o750)  # the unit's RuntimeDirectoryMode
        st = os.stat(sock)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 0)
        for command in ("status", "trace"):
            got = nfrewrite(config, command, user=(65534, 65534))
            assert got.returncode == 4, got
            assert got.stderr == (f"nfrewrite {command}: permission denied: {sock} (the "
                                  "daemon's user and group, and root, may use it)\n")
            assert got.stdout == ""
        member = nfrewrite(config, "status", "--json", user=(65534, 0))  # in the socket's group
        assert member.returncode == 0, member.stderr
        assert json.loads(member.stdout)["rules"][0]["name"] == "word"



def test_status_shows_a_failed_reload_and_a_trace_goes_on_across_a_worker_restart(
        lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES}, metrics_port=METRICS_PORT)
    rule_file = os.path.join(workdir, "rules", "10.toml")
    with running(lab, config) as daemon:
        lab.wait_reachable()
        with open(rule_file, "w") as f:
            f.write(RULES.replace('with = "APPLE"', 'wiht = "APPLE"'))
        assert "reload failed" in daemon.reload()
        status = json.loads(nfrewrite(config, "status", "--json").stdout)
        reload = status["last_reload"]
        assert reload["ok"] is False and reload["reloads"] == 1
        assert reload["error"].startswith(f"{rule_file}:5:"), reload
        assert [r["name"] for r in status["rules"]] == ["word", "shorter"]  # still in force
        text = nfrewrite(config, "status").stdout
        assert f"FAILED: {rule_file}:5:" in text and "1 reload(s) since start" in text

        trace = start_trace(config)
        lines = LineReader(trace)
        (worker,) = [int(x.split()[2]) for x in daemon.log().splitlines() if " bound queue " in x]
        mark = len(daemon.log())
        exchange_until_lines(lab, lines, 1)
        os.kill(worker, signal.SIGKILL)
        daemon.wait_log(" bound queue 0 ", after=mark, timeout=20)
        before = len(lines.lines)
        exchange_until_lines(lab, lines, before + 1)  # the new worker traces at once
        trace.send_signal(signal.SIGINT)  # Ctrl-C
        assert trace.wait(10) == 0
        lines.thread.join(5)
        assert lines.lines and all(" word " in line for line in lines.lines)
        assert trace.stderr is not None
        assert trace.stderr.read().splitlines()[-1] == (
            f"nfrewrite trace: {len(lines.lines)} packets traced")


class LineReader:
    """A trace's stdout lines, collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.lines: list[str] = []
        self._stdout = proc.stdout
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            self.lines.append(line)


def exchange_until_lines(lab: Lab, reader: LineReader, n: int) -> None:
    """Connections with the pattern until the trace printed ``n`` lines in all."""
    deadline = time.monotonic() + 30
    while len(reader.lines) < n:
        assert time.monotonic() < deadline, "no trace line"
        tcp_exchange(lab, b"an apple", b"ok", port=8080)
        time.sleep(0.1)
