"""The appliance measured in the namespace lab: each bench row is a *mode* and a few measurements.

Theory of operation
-------------------
One :class:`~lab.netns.Lab` (client -- appliance with ``br0`` -- server) lives for the whole
run. The server namespace keeps two :mod:`bench.traffic` servers running: a sink on
``BULK_PORT`` and a ping-pong echo on ``PING_PORT``. A *mode* is a context manager that puts the
appliance into one state and takes it out again:

``plain``          bridge only; ``bridge-nf-call-*`` = 0, so no netfilter hook sees bridged frames
``daemon(...)``    ``nfrewrite run`` with the given rule files and worker count
``nfq(module)``    one ``iptables -t mangle -A FORWARD ... -j NFQUEUE`` rule for the bench ports
                   and a program bound to the queue (:mod:`bench.ref_nfq`, :mod:`bench.scapy_loop`)

Measurements run the client side of :mod:`bench.traffic` in the client namespace: bulk
throughput (Gbit/s, from first write to the sink's EOF, so every byte counted was delivered);
small-packet rate (the client's MSS forced to ``SMALL_MSS``; the bench reports wire segments per
second from goodput, since a queue with the GSO flag sees super-packets of small segments);
ping-pong round trip (p50/p99). Every bulk stream carries ``PATTERN`` every ``PERIOD`` bytes, so
a rule on the pattern edits every full-size wire segment once or twice; the small-packet stream
and row 4d carry it every ``DENSE_PERIOD`` bytes (every small segment holds it).

Workers and ``--queue-balance``: the kernel picks the queue from a hash of the *address pair* (and
protocol) only, never the ports, so eight flows between one client and one server address all land
on one queue. The client therefore gets extra addresses (``EXTRA_SOURCES``, in 198.18.0.0/24) and
:meth:`Bench.balanced_sources` finds, by sending a probe from each through a two-worker daemon and
reading the per-queue packet ids in ``/proc/net/netfilter/nfnetlink_queue``, which address lands
on which queue (the hash's seed is fixed per boot); the 8-flow rows then use four addresses of
each queue. The per-queue packet counts of every 2-worker run are recorded, so the spread is
verified, not assumed.

What it must not do: touch the host's namespace (everything runs through the lab), use addresses
outside the lab's, or leave a process or namespace behind (the lab's ``close()`` kills whatever
lives in its namespaces, also on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from lab.netns import Daemon, Lab, LabError, read_line, write_lab_config

BULK_PORT = 5201
PING_PORT = 5202
IPERF3_PORT = 5203  # iperf3, as a cross-check of bench.traffic on the plain bridge
PATTERN = b"NFREWRITE-BENCH!"  # 16 bytes, at every PERIOD-byte boundary of the stream
SAME = b"nfrewrite-bench!"  # same-length replacement
SHORT = b"NFR-BENCH"  # length-changing replacement (shorter: a longer one would push full-size
#                        segments past the 1500-byte MTU, and the bridge drops those)
PERIOD = 1024  # bulk: every full-size wire segment (1448 payload bytes) holds 1 or 2 whole copies
DENSE_PERIOD = 64  # the dense variant (~22 copies per wire segment) and the small-packet stream
SMALL_MSS = 100  # -> 88 payload bytes with timestamps: >= DENSE_PERIOD + len(PATTERN) - 1
SMALL_PAYLOAD = SMALL_MSS - 12  # payload bytes per wire segment (the timestamp option takes 12)
_TICKS = os.sysconf("SC_CLK_TCK")
EXTRA_SOURCES = tuple(f"198.18.0.{i}" for i in range(10, 26))
BR_NF = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables")


def _toml_bytes(b: bytes) -> str:
    return b.decode("ascii")


def rule_same(name: str = "bench-same", port: int = BULK_PORT) -> str:
    return (f'[[rule]]\nname = "{name}"\nmatch = {{ dport = {port} }}\n'
            f'replace = [ {{ find = "{_toml_bytes(PATTERN)}", with = "{_toml_bytes(SAME)}" }} ]\n')


def rule_shorter(port: int = BULK_PORT) -> str:
    return (f'[[rule]]\nname = "bench-shorter"\nmatch = {{ dport = {port} }}\n'
            f'replace = [ {{ find = "{_toml_bytes(PATTERN)}", with = "{_toml_bytes(SHORT)}" }} ]\n')


#: Queues every ping-pong packet client -> server (a header edit gets no literal prefilter) and
#: changes none (Linux sends TTL 64 already): the queued round trip, engine included.
RULE_PING = (f'[[rule]]\nname = "bench-ping"\nmatch = {{ dport = {PING_PORT} }}\n'
             'set = { ttl = 64 }\n')

#: Queues every bulk and ping-pong packet client -> server and edits its IP header (TTL 64 -> 63):
#: the queued path with a header edit and no payload search.
RULE_TTL = (f'[[rule]]\nname = "bench-ttl"\nmatch = {{ dport = [{BULK_PORT}, {PING_PORT}] }}\n'
            'set = { ttl = 63 }\n')

#: Rules that never match the bench traffic (other ports).
RULE_ELSEWHERE = rule_same("bench-elsewhere", 9)


def rules_others(count: int) -> str:
    """``count`` rules on other ports (bench_match's mix: dport, sport, sport+dst, 2 dports)."""
    out = []
    for i in range(1, count + 1):
        kind = i % 4
        if kind == 0:
            match = f"{{ dport = {10000 + i} }}"
        elif kind == 1:
            match = f"{{ sport = {20000 + i} }}"
        elif kind == 2:
            match = f'{{ sport = {30000 + i}, dst = "10.0.0.0/8" }}'
        else:
            match = f"{{ dport = [{1024 + i}, {5300 + i}] }}"
        out.append(f'[[rule]]\nname = "other-{i}"\nmatch = {match}\n'
                   f'replace = [ {{ find = "pattern-{i}", with = "PATTERN-{i}" }} ]\n')
    return "\n".join(out)


def _cpu_times() -> tuple[int, int]:
    """(busy, idle) jiffies of all CPUs, from /proc/stat (read only: the machine is shared, so
    "how busy were the CPUs during the run" is part of every figure)."""
    with open("/proc/stat") as f:
        cols = [int(x) for x in f.readline().split()[1:]]
    idle = cols[3] + cols[4]  # idle + iowait
    return sum(cols) - idle, idle


class Bench:
    """The lab plus the servers; modes and measurements. Use inside ``with Lab(...)``."""

    def __init__(self, lab: Lab, workdir: str, *, log: Any = None) -> None:
        self.lab = lab
        self.workdir = workdir
        self.env = lab.python_env()
        self.py = sys.executable
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._n = 0

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        lab = self.lab
        lab.add_bridge()
        for addr in EXTRA_SOURCES:
            lab.run("client", ["ip", "addr", "add", f"{addr}/24", "dev", lab.peer_ifname])
        for mode, port in (("sink", BULK_PORT), ("echo", PING_PORT)):
            proc = lab.popen("server", [self.py, "-m", "bench.traffic", mode, "--bind",
                                        lab.server_v4, "--port", str(port)], env=self.env)
            line = read_line(proc, 10)
            if line.strip() != b"READY":
                raise LabError(f"bench.traffic {mode} did not start: {line!r}")
        self._iperf3 = lab.popen("server", ["iperf3", "-s", "-B", lab.server_v4, "-p",
                                            str(IPERF3_PORT)], stdout=subprocess.DEVNULL)
        self._br_nf(False)
        lab.wait_reachable(families=(4,))

    def _br_nf(self, on: bool) -> None:
        for name in BR_NF:
            self.lab.run("appliance", ["sysctl", "-q", "-w", f"net.bridge.{name}={int(on)}"])

    # -- modes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def plain(self) -> Iterator[dict[str, Any]]:
        self._br_nf(False)
        yield {}

    @contextlib.contextmanager
    def daemon(self, rules: dict[str, str], workers: int = 1,
               gso: bool = True) -> Iterator[dict[str, Any]]:
        self._n += 1
        d = os.path.join(self.workdir, f"d{self._n}")
        os.makedirs(d)
        config = write_lab_config(d, rules, workers=workers, gso=gso)
        daemon = Daemon(self.lab, config, env=self.env)
        info: dict[str, Any] = {}
        daemon.start(timeout=60)
        try:
            self.lab.wait_reachable(families=(4,))
            info["daemon"] = daemon
            yield info
        finally:
            rc = daemon.stop(timeout=10)
            if rc != 0:
                self._log(f"bench: daemon exited {rc}:\n{daemon.log()[-2000:]}")
            self._br_nf(False)

    @contextlib.contextmanager
    def nfq(self, module: str, *args: str, queue: int = 0) -> Iterator[dict[str, Any]]:
        """A queue program plus one NFQUEUE rule for the bench ports, client -> server."""
        self._br_nf(True)
        proc = self.lab.popen("appliance", [self.py, "-m", module, "--queue", str(queue), *args],
                              env=self.env)
        rule = ["-t", "mangle", "-A", "FORWARD", "-p", "tcp", "-m", "multiport", "--dports",
                f"{BULK_PORT},{PING_PORT}", "-j", "NFQUEUE", "--queue-num", str(queue),
                "--queue-bypass"]
        info: dict[str, Any] = {}
        try:
            line = read_line(proc, 20)
            if line.strip() != b"READY":
                proc.kill()
                _, err = proc.communicate(timeout=5)
                raise LabError(f"{module} did not start: {line!r} {err.decode(errors='replace')}")
            self.lab.run("appliance", ["iptables", *rule])
            try:
                self.lab.wait_reachable(families=(4,))
                yield info
            finally:
                self.lab.run("appliance", ["iptables", "-t", "mangle", "-D", *rule[3:]],
                             check=False)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=10)
                last = out.decode(errors="replace").strip().splitlines()
                if last:
                    with contextlib.suppress(ValueError):
                        info["counts"] = json.loads(last[-1])
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=5)
            except ValueError:  # its pipes were already read (it failed to start)
                pass
            self._br_nf(False)

    # -- measurements -------------------------------------------------------------------------
    def _in_segs(self) -> int:
        return self.lab.tcp_counters("server")["Tcp.InSegs"]

    def queue_ids(self) -> dict[int, int]:
        """Per queue number: the last packet id the kernel gave out (packets queued so far)."""
        out = self.lab.run("appliance", ["cat", "/proc/net/netfilter/nfnetlink_queue"],
                           check=False).stdout
        ids: dict[int, int] = {}
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 8:
                ids[int(cols[0])] = int(cols[7])
        return ids

    def throughput(
        self, duration: float, *, flows: int = 1, sources: Sequence[str] = (), mss: int = 0,
        period: int = 0,
    ) -> dict[str, Any]:
        """Client -> server bulk transfer: Gbit/s; segments/s the server's TCP counted (after
        GRO, so merged segments count once); packets/s that went through NFQUEUE, per queue."""
        argv = [self.py, "-m", "bench.traffic", "send", "--connect", self.lab.server_v4,
                "--port", str(BULK_PORT), "--duration", str(duration), "--flows", str(flows),
                "--pattern", PATTERN.hex(),
                "--period", str(period or (DENSE_PERIOD if mss else PERIOD)), "--mss", str(mss)]
        if sources:
            argv += ["--sources", ",".join(sources)]
        before, queued_before = self._in_segs(), self.queue_ids()
        cpu_before, app_before = _cpu_times(), self.appliance_cpu()
        proc = self.lab.run("client", argv, env=self.env, timeout=duration + 90)
        cpu_after, app_after = _cpu_times(), self.appliance_cpu()
        segs, queued_after = self._in_segs() - before, self.queue_ids()
        result: dict[str, Any] = json.loads(proc.stdout)
        busy = cpu_after[0] - cpu_before[0]
        total = busy + cpu_after[1] - cpu_before[1]
        result["cpu_busy"] = busy / total if total else 0.0
        result["app_cpu_s"] = sum(t - app_before.get(pid, 0.0) for pid, t in app_after.items())
        result["server_segs_ps"] = segs / result["elapsed"]
        per_queue = {q: n - queued_before.get(q, 0) for q, n in queued_after.items()}
        result["queued"] = {q: n for q, n in per_queue.items() if n > 0}
        queued = sum(result["queued"].values())
        result["queued_pps"] = queued / result["elapsed"]
        # CPU the appliance's processes (daemon workers, reference loop) spent per queued packet:
        # unlike packets/s it does not depend on how much of the CPUs other work left them.
        result["app_cpu_us_per_pkt"] = result["app_cpu_s"] / queued * 1e6 if queued else 0.0
        return result

    def appliance_cpu(self) -> dict[int, float]:
        """user + system CPU seconds of every process living in the appliance namespace."""
        out: dict[int, float] = {}
        listing = subprocess.run(["ip", "netns", "pids", self.lab.ns_name("appliance")],
                                 capture_output=True, text=True, timeout=10, check=False).stdout
        for pid in (int(tok) for tok in listing.split() if tok.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
        return out

    def iperf3(self, duration: float) -> dict[str, Any]:
        """iperf3 client -> server (its own random payload), Gbit/s received."""
        argv = ["iperf3", "-c", self.lab.server_v4, "-p", str(IPERF3_PORT), "-t",
                str(max(1, round(duration))), "-J"]
        for _ in range(20):  # the server may still be starting (it prints nothing we wait for)
            proc = self.lab.run("client", argv, timeout=duration + 60, check=False)
            if proc.returncode == 0:
                break
            time.sleep(0.25)
        else:
            raise LabError(f"iperf3 failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
        end = json.loads(proc.stdout)["end"]
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "elapsed": end["sum_received"]["seconds"], "queued": {}, "queued_pps": 0.0,
                "app_cpu_us_per_pkt": 0.0, "cpu_busy": float("nan")}

    def latency(self, count: int) -> dict[str, float]:
        argv = [self.py, "-m", "bench.traffic", "ping", "--connect", self.lab.server_v4,
                "--port", str(PING_PORT), "--count", str(count), "--warmup", str(count // 10)]
        proc = self.lab.run("client", argv, env=self.env, timeout=120)
        result: dict[str, float] = json.loads(proc.stdout)
        return result

    def balanced_sources(self, per_queue: int = 4) -> tuple[list[str], dict[str, int]]:
        """Client addresses that --queue-balance 0:1 sends to queue 0 and to queue 1, alternating
        (``per_queue`` of each when the hash allows), and the queue of every candidate."""
        where: dict[str, int] = {}
        with self.daemon({"10-same.toml": rule_same()}, workers=2):
            for addr in EXTRA_SOURCES:
                before = self.queue_ids()
                self.throughput(0.05, sources=[addr])
                after = self.queue_ids()
                moved = {q: after.get(q, 0) - before.get(q, 0) for q in after}
                where[addr] = max(moved, key=lambda q: moved[q])
        q0 = [a for a, q in where.items() if q == 0]
        q1 = [a for a, q in where.items() if q == 1]
        picked: list[str] = []
        for i in range(per_queue):
            for group in (q0, q1):
                if i < len(group):
                    picked.append(group[i])
        # a lopsided hash: fill up from whichever queue has addresses left
        rest = [a for a in EXTRA_SOURCES if a not in picked]
        picked += rest[: 2 * per_queue - len(picked)]
        return picked, where


@contextlib.contextmanager
def bench_lab() -> Iterator[Bench]:
    """A lab with the bench servers running, torn down on any exit (Ctrl-C included)."""
    with tempfile.TemporaryDirectory(prefix="nfr-bench-") as workdir, Lab() as lab:
        bench = Bench(lab, workdir)
        bench.setup()
        yield bench
