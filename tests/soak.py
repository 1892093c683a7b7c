"""Soak: the daemon under mixed traffic and periodic reloads for minutes; ``make soak``.

    python -m tests.soak [--minutes 10] [--reload-every 30] [--sample-every 10]

Theory of operation
-------------------
A namespace lab (``lab.netns``) with ``nfrewrite run`` on its bridge, then a loop of TCP
connections through it, one at a time (``tcp_exchange``: each returns exactly what both ends
received):

* port 8080, same-length rewrite, client to server; port 8081, length-changing rewrites in both
  directions (so sequence adjustment runs on every such connection);
* IPv4 and IPv6; short connections (up to 1.4 kB each way, written in records of 64-700 bytes
  that hold whole patterns: every pattern must arrive rewritten, the output is known exactly) and
  long ones (100-300 kB each way, one ``sendall``).

Every ``--reload-every`` seconds the rule file is replaced by the other of two rule sets (A and B,
whose replacements differ) and the daemon gets SIGHUP; the loop waits for "reload done", so each
connection runs wholly under one known rule set. A short connection must deliver exactly the
expected rewrite; a long one must deliver, with that rule set's replacements mapped back, exactly
what was sent (the replacement strings never occur in the data, so this is unambiguous), with at
least 97% of the patterns rewritten (a pattern split across two segments is not seen: documented
limit). Anything else (an exchange that fails, loses, duplicates or corrupts a byte) is counted
as a failure. Exchange N of a run can be rebuilt with :func:`make_exchange` (same seed, N calls).

Every ``--sample-every`` seconds the supervisor's and the worker's VmRSS (``/proc/PID/status``)
and open fds (``/proc/PID/fd``) are sampled. At the end a table of the samples, the byte counts at
both ends and the rule counters from ``/metrics`` are printed. Exit status 1 when any exchange
failed, when RSS grew by more than 20% after warm-up (the first quarter of the run, at least one
sample), or when the number of fds grew; 0 otherwise.

Not run by ``make test``: it takes minutes by design.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from lab.netns import Daemon, Lab, LabError, tcp_exchange, write_lab_config

EXCHANGE_TIMEOUT = 180.0
SAME_PORT = 8080
GROW_PORT = 8081

# Two rule sets. Keys: (port, direction) -> {find: with}; direction "c2s" (dport) or "s2c" (sport).
RULESETS: dict[str, dict[tuple[int, str], dict[bytes, bytes]]] = {
    "A": {
        (SAME_PORT, "c2s"): {b"apple-pie": b"APPLE-PIE"},
        (GROW_PORT, "c2s"): {b"GROW": b"<<grown-a-lot>>", b"SHRINK-THIS-TOKEN": b"#a#"},
        (GROW_PORT, "s2c"): {b"UP": b"[[up-up-up]]"},
    },
    "B": {
        (SAME_PORT, "c2s"): {b"apple-pie": b"PEAR-TART"},
        (GROW_PORT, "c2s"): {b"GROW": b"%", b"SHRINK-THIS-TOKEN": b"<<longer-than-before-b>>"},
        (GROW_PORT, "s2c"): {b"UP": b"(up)"},
    },
}


def rules_text(name: str) -> str:
    out = []
    for (port, direction), mapping in RULESETS[name].items():
        key = "dport" if direction == "c2s" else "sport"
        repl = ", ".join(
            f'{{ find = "{f.decode()}", with = "{w.decode()}" }}' for f, w in mapping.items()
        )
        out.append(
            f'[[rule]]\nname = "{name.lower()}-{port}-{direction}"\n'
            f"match = {{ {key} = {port} }}\nreplace = [ {repl} ]\n"
        )
    return "\n".join(out)


_LETTERS = bytes(b"abcdefghijklmnopqrstuvwxyz \n"[i % 28] for i in range(256))


def filler(rnd: random.Random, n: int) -> bytes:
    """``n`` bytes of lower case letters, spaces and newlines."""
    return rnd.randbytes(n).translate(_LETTERS)


def stream(rnd: random.Random, size: int, patterns: list[bytes]) -> bytes:
    """Filler with patterns sprinkled in (never the replacements: those all have upper-case
    letters or punctuation that the filler lacks)."""
    out = bytearray()
    while len(out) < size:
        out += filler(rnd, rnd.randint(0, 120))
        if patterns:
            out += rnd.choice(patterns)
    return bytes(out)


def aligned_stream(rnd: random.Random, size: int, patterns: list[bytes], chunk: int) -> bytes:
    """Like :func:`stream`, in records of exactly ``chunk`` bytes that each hold whole patterns:
    written one record per ``send`` (below the MSS, 2 ms apart), no pattern is split between two
    segments, so every one must arrive rewritten."""
    out = bytearray()
    for _ in range(max(1, size // chunk)):
        rec = bytearray()
        while True:
            piece = filler(rnd, rnd.randint(0, 40))
            if patterns:
                piece += rnd.choice(patterns)
            if len(rec) + len(piece) > chunk:
                break
            rec += piece
        rec += filler(rnd, chunk - len(rec))
        out += rec
    return bytes(out)


def rewrite(data: bytes, mapping: dict[bytes, bytes]) -> bytes:
    """The expected bytes when every occurrence is rewritten (the patterns never overlap)."""
    for find, with_ in mapping.items():
        data = data.replace(find, with_)
    return data


def undo(data: bytes, mapping: dict[bytes, bytes]) -> bytes:
    for find, with_ in mapping.items():
        data = data.replace(with_, find)
    return data


@dataclass
class Sample:
    t: float
    sup_rss: int
    sup_fds: int
    wrk_rss: int
    wrk_fds: int
    exchanges: int


@dataclass
class Totals:
    exchanges: int = 0
    verified: int = 0
    failures: list[str] = field(default_factory=list)
    sent_c2s: int = 0
    sent_s2c: int = 0
    recv_server: int = 0
    recv_client: int = 0
    patterns: int = 0
    expected_bytes: int = 0
    rewritten: int = 0
    reloads: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def worker_pid(daemon: Daemon) -> int:
    pids = [int(line.split()[2]) for line in daemon.log().splitlines()
            if " bound queue " in line and line.startswith("nfrewrite: worker ")]
    return pids[-1]


@dataclass(frozen=True)
class Exchange:
    family: int
    port: int
    long: bool
    chunk: int
    up: bytes
    down: bytes
    c2s: dict[bytes, bytes]
    s2c: dict[bytes, bytes]


def make_exchange(rnd: random.Random, ruleset: str) -> Exchange:
    """The next connection's shape and data. The random draws do not depend on ``ruleset``
    (both sets have as many patterns per direction), so exchange N of a run can be rebuilt."""
    family = rnd.choice((4, 6))
    port = rnd.choice((SAME_PORT, GROW_PORT))
    long = rnd.random() < 0.2
    rs = RULESETS[ruleset]
    c2s = rs.get((port, "c2s"), {})
    s2c = rs.get((port, "s2c"), {})
    if long:
        chunk = 0
        up = stream(rnd, rnd.randint(100_000, 300_000), list(c2s))
        down = stream(rnd, rnd.randint(100_000, 300_000), list(s2c))
    else:
        chunk = rnd.choice((64, 333, 700))
        # at most 1400 bytes: below the MSS, so however Nagle coalesces the writes, no segment
        # boundary falls inside a record (a bigger stream could be cut mid-pattern)
        up = aligned_stream(rnd, rnd.randint(1, 1400), list(c2s), chunk)
        down = aligned_stream(rnd, rnd.randint(1, 1400), list(s2c), chunk)
    return Exchange(family, port, long, chunk, up, down, c2s, s2c)


def one_exchange(lab: Lab, rnd: random.Random, ruleset: str, totals: Totals) -> None:
    ex = make_exchange(rnd, ruleset)
    family, port, long, chunk, up, down = ex.family, ex.port, ex.long, ex.chunk, ex.up, ex.down
    c2s, s2c = ex.c2s, ex.s2c
    kind = f"{'long' if long else 'short'}/v{family}/{port}"
    totals.exchanges += 1
    totals.by_kind[kind] = totals.by_kind.get(kind, 0) + 1
    totals.sent_c2s += len(up)
    totals.sent_s2c += len(down)
    t0 = time.monotonic()
    try:
        # generous: dense growing edits cut many full-size segments at the MTU and the sender
        # retransmits the rest, so such transfers run at tens of kB/s; a stall still fails
        got = tcp_exchange(lab, up, down, family=family, port=port, chunk=chunk,
                           timeout=EXCHANGE_TIMEOUT)
    except LabError as e:
        totals.failures.append(f"#{totals.exchanges} {kind} rules {ruleset}: {e}")
        return
    took = time.monotonic() - t0
    slow = totals.slowest.get(kind, 0.0)
    totals.slowest[kind] = max(slow, took)
    totals.recv_server += len(got.server_received)
    totals.recv_client += len(got.client_received)
    ok = True
    for what, sent, arrived, mapping in (
        ("c2s", up, got.server_received, c2s), ("s2c", down, got.client_received, s2c)
    ):
        n_pat = sum(sent.count(p) for p in mapping)
        n_new = sum(arrived.count(w) for w in mapping.values())
        totals.patterns += n_pat
        totals.rewritten += n_new
        expected = rewrite(sent, mapping)
        totals.expected_bytes += len(expected)
        where = f"#{totals.exchanges} {kind} rules {ruleset} {what}"
        if not long:
            if arrived != expected:
                ok = False
                at = next((i for i, (a, b) in enumerate(zip(arrived, expected, strict=False))
                           if a != b),
                          min(len(arrived), len(expected)))
                totals.failures.append(f"{where}: {len(arrived)} bytes arrived, not the "
                                       f"{len(expected)} expected; first difference at {at}: "
                                       f"{arrived[at - 20:at + 20]!r} vs "
                                       f"{expected[at - 20:at + 20]!r}")
        elif undo(arrived, mapping) != sent:
            ok = False
            totals.failures.append(f"{where}: {len(arrived)} bytes arrived that do not map back "
                                   f"to the {len(sent)} sent")
        elif n_new < 0.97 * n_pat:
            ok = False
            totals.failures.append(f"{where}: only {n_new} of {n_pat} patterns rewritten")
    if ok:
        totals.verified += 1


def write_rules(path: str, name: str) -> None:
    with open(path, "w") as f:
        f.write(rules_text(name))


def scrape(lab: Lab) -> str:
    code = (
        "import sys, urllib.request\n"
        "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "sys.stdout.write(o.open('http://127.0.0.1:9640/metrics', timeout=5).read().decode())\n"
    )
    return str(lab.run("appliance", [sys.executable, "-c", code], timeout=15).stdout)


def metric_summary(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"nfrewrite_packets_seen_total", "nfrewrite_packets_modified_total",
              "nfrewrite_rule_applied_total", "nfrewrite_handler_errors_total",
              "nfrewrite_packets_unparsed_total", "nfrewrite_worker_restarts_total",
              "nfrewrite_kernel_queue_dropped_total", "nfrewrite_kernel_queue_user_dropped_total",
              "nfrewrite_seqadj_flow_evictions_total"}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in wanted and s.value:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{label}}}"] = s.value
    return out


def run(minutes: float, reload_every: float, sample_every: float, seed: int) -> int:
    rnd = random.Random(seed)
    totals = Totals()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="nfr-soak-") as workdir, Lab() as lab:
        config = write_lab_config(workdir, {"10-soak.toml": rules_text("A")})
        rule_file = os.path.join(workdir, "rules", "10-soak.toml")
        with Daemon(lab, config) as daemon:
            assert daemon.proc is not None
            sup = daemon.proc.pid  # `ip netns exec` execs the daemon: same pid
            wrk = worker_pid(daemon)
            lab.wait_reachable()
            start = time.monotonic()
            end = start + minutes * 60
            next_reload = start + reload_every
            next_sample = start
            current = "A"
            try:
                while True:
                    now = time.monotonic()
                    if now >= next_sample or now >= end:
                        samples.append(Sample(now - start, proc_rss_kb(sup), proc_fds(sup),
                                              proc_rss_kb(wrk), proc_fds(wrk), totals.exchanges))
                        next_sample = now + sample_every
                        s = samples[-1]
                        print(f"[{s.t:7.1f}s] exchanges {totals.exchanges} verified "
                              f"{totals.verified} failures {len(totals.failures)} "
                              f"rules {current} rss sup {s.sup_rss} kB wrk {s.wrk_rss} kB "
                              f"fds {s.sup_fds}/{s.wrk_fds}", flush=True)
                    if now >= end:
                        break
                    if now >= next_reload:
                        current = "B" if current == "A" else "A"
                        write_rules(rule_file, current)
                        tail = daemon.reload()
                        if "reload done" not in tail:
                            totals.failures.append(f"reload to {current} failed: {tail.strip()}")
                        totals.reloads += 1
                        next_reload = time.monotonic() + reload_every
                        if worker_pid(daemon) != wrk:
                            totals.failures.append("the worker was restarted")
                            wrk = worker_pid(daemon)
                    failed = len(totals.failures)
                    one_exchange(lab, rnd, current, totals)
                    for line in totals.failures[failed:]:
                        print(f"FAILURE: {line}", flush=True)
            except KeyboardInterrupt:
                totals.failures.append("interrupted before the end")
            final_metrics = metric_summary(scrape(lab))
            rc_stop = daemon.stop()
            if rc_stop != 0:
                totals.failures.append(f"daemon exited {rc_stop} on SIGTERM")
    return report(totals, samples, final_metrics, minutes)


def report(totals: Totals, samples: list[Sample], final_metrics: dict[str, float],
           minutes: float) -> int:
    print()
    print(f"{'t (s)':>8} {'exch':>6} {'sup RSS kB':>11} {'sup fds':>8} {'wrk RSS kB':>11} "
          f"{'wrk fds':>8}")
    for s in samples:
        print(f"{s.t:8.1f} {s.exchanges:6d} {s.sup_rss:11d} {s.sup_fds:8d} {s.wrk_rss:11d} "
              f"{s.wrk_fds:8d}")
    print()
    print(f"exchanges {totals.exchanges}, verified byte for byte {totals.verified}, "
          f"reloads {totals.reloads}")
    for kind, n in sorted(totals.by_kind.items()):
        print(f"  {kind:18s} {n:5d}  slowest {totals.slowest.get(kind, 0.0):6.1f} s")
    print(f"client sent {totals.sent_c2s} B -> server received {totals.recv_server} B")
    print(f"server sent {totals.sent_s2c} B -> client received {totals.recv_client} B")
    print(f"both ends received {totals.recv_server + totals.recv_client} B; "
          f"{totals.expected_bytes} B if every pattern had been rewritten")
    print(f"patterns sent {totals.patterns}, arrived rewritten {totals.rewritten} (long "
          "connections: a pattern split between two segments is not seen)")
    for k, v in sorted(final_metrics.items()):
        print(f"  {k} {v:g}")
    problems = list(totals.failures)
    if len(samples) >= 2:
        warm = samples[max(1, len(samples) // 4)]
        last = samples[-1]
        for who, base, now in (("supervisor", warm.sup_rss, last.sup_rss),
                               ("worker", warm.wrk_rss, last.wrk_rss)):
            if now > base * 1.2:
                problems.append(f"{who} RSS grew {base} -> {now} kB after warm-up (> 20%)")
        first = samples[0]
        for who, base, now in (("supervisor", first.sup_fds, last.sup_fds),
                               ("worker", first.wrk_fds, last.wrk_fds)):
            if now > base:
                problems.append(f"{who} open fds grew {base} -> {now}")
    if totals.exchanges == 0:
        problems.append("no exchange ran")
    print()
    if problems:
        print(f"SOAK FAILED ({len(problems)} problems):")
        for p in problems[:50]:
            print(f"  {p}")
        return 1
    print(f"SOAK OK: {minutes:g} min, {totals.exchanges} exchanges verified, no growth")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--reload-every", type=float, default=30.0, help="seconds between SIGHUPs")
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run(args.minutes, args.reload_every, args.sample_every, args.seed)


if __name__ == "__main__":
    sys.exit(main())
