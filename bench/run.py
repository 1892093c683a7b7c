"""``make bench``: the appliance against its limits, side by side, in one run.

    python -m bench.run                 # ~5 s per measurement, 3 interleaved rounds
    python -m bench.run --quick         # ~1 s per measurement, 1 round (a smoke check)
    python -m bench.run --duration 3 --rounds 5 --json out.json

Theory of operation
-------------------
Each row is a *case*: an appliance mode (:mod:`bench.lab_bench`) and what is measured in it. A
round runs every case once, setting its mode up and tearing it down again; odd rounds run the
cases in reverse order, so slow drift of a shared machine hits every case alike (A B C .. C B A),
and each figure is the median over rounds. Then the ratios are printed with their goals, PASS or
MISS, and everything (every round's raw figures too) goes to ``bench/results.json``.

Rows (client -> server, one TCP flow unless said otherwise; every stream carries the pattern
``NFREWRITE-BENCH!`` every 1024 bytes, so every full-size wire segment (1448 payload bytes) holds
one or two whole copies: "the pattern present in every packet"):

  1  plain bridge, no netfilter hook at all (bridge-nf-call-* = 0): the limit
  1i the same with iperf3 (random payload): a cross-check of the traffic tool
  2  daemon, one rule on another port: the prefilter keeps the flow in the kernel
  3  bench/ref_nfq.py: NFQUEUE, every packet accepted unread (the kernel round trip alone), as
     NetfilterQueue does it: the kernel segments GSO packets before queueing
  3g the same loop with the queue's GSO flag (what the daemon sets): super-packets come whole
  3t 3g's loop setting every packet's TTL to 63 (the packet core only, no rules): the least a
     header edit costs, since a verdict with a payload costs the kernel a linearising copy and
     software segmentation that an accept does not (the reference for row 4t; "info" ratio)
  4  daemon, same-length replace of the pattern (GSO flag on, the default)
  4d the same with the pattern every 64 bytes (~22 copies per wire segment, ~1000 per 64 KB
     super-packet): the cost per edit
  4n row 4 with ``[queue] gso = false``: what the GSO flag buys
  4q daemon, every packet queued, nothing edited (``set ttl = 64`` on Linux's own TTL 64):
     splits row 4's cost into "queue + parse" and "find + edit"
  4t daemon, every packet queued and its header edited (``set ttl = 63``; the ping-pong's
     packets too): the queued path with the least edit there is
  5  daemon, length-changing replace (shorter) of the pattern
  6  row 4's rule after 999 others (on other ports, before it in the chain)
  7  8 flows from 8 client addresses, daemon with 1 worker (7a), then 2 workers (7b), on row
     4d's job (the pattern every 64 bytes): worker scaling where the worker is the bottleneck.
     7c/7d: the same on row 4's job, where one worker no longer is (since GSO packets skip the
     checksum, 8 flows of it load the 2 CPUs with traffic generation and forwarding first)
  8  bench/scapy_loop.py: row 4's job done with NetfilterQueue + scapy

plus wire packets/s with small segments (MSS 100, from goodput) for 3 and 4, and the TCP
ping-pong round trip (1 byte each way; p50/p99) for 1, 2, 3, 4 and 4t (for 3, 4 and 4t the
client -> server half is queued, 4t's edited; 2 is the daemon running with the flow kept in the
kernel).

The queued path's goals are set against row 3g, the least a queue with the GSO flag can do: 4q
(queued, nothing edited), 4t (queued, header edited) and 4 (payload edited) as shares of it, and
small segments, where GSO helps least, against row 3's wire segments per second.

Micro-benchmarks before the rows: the packet core against scapy, rule matching with 1 and 1000
rules, and the trace hook (``bench/bench_trace.py``): row 4's packets through the worker's own
packet handler with and without the hook, side by side; its goal is that the hook, while nobody
traces, costs no more than the noise between two identical handlers. And the stream matcher's
worst cases side by side with ordinary packets (``bench/bench_stream.py``): a regex that is
exponential for a backtracking engine on 64 KB of its bait, per byte (<= 10x); 1, 100 and 1,000
literals, a 64 KB packet of one of them repeated (<= 3x); one literal, 64 KB, with the hold
decision against per-packet matching as before it (<= 1.2x).

It must clean up after itself on any exit: the lab (its namespaces and every process in them)
goes on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from bench import bench_stream
from bench import lab_bench as lb

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


@dataclass
class Case:
    key: str
    label: str
    mode: Callable[[lb.Bench], AbstractContextManager[dict[str, Any]]]
    flows: int = 1
    iperf3: bool = False  # measure with iperf3 instead of bench.traffic
    small: bool = False  # also measure small-packet rate
    latency: bool = False  # also measure ping-pong
    period: int = 0  # pattern period of the bulk stream (0: lab_bench.PERIOD)
    runs: list[dict[str, Any]] = field(default_factory=list)


def cases(sources: list[str]) -> list[Case]:
    same = {"10-same.toml": lb.rule_same(), "20-ping.toml": lb.RULE_PING}
    thousand = {"10-others.toml": lb.rules_others(999), "90-same.toml": lb.rule_same(),
                "95-ping.toml": lb.RULE_PING}
    noedit = {"10-noedit.toml": lb.RULE_PING.replace("bench-ping", "bench-noedit")
              .replace(str(lb.PING_PORT), str(lb.BULK_PORT))}
    ttl = {"10-ttl.toml": lb.RULE_TTL}
    hexes = (lb.PATTERN.hex(), lb.SAME.hex())
    return [
        Case("1", "plain bridge, no daemon (limit)", lambda b: b.plain(), latency=True),
        Case("1i", "plain bridge, iperf3 (cross-check of 1)", lambda b: b.plain(), iperf3=True),
        Case("2", "daemon, rules not matching (kernel)",
             lambda b: b.daemon({"10-elsewhere.toml": lb.RULE_ELSEWHERE}), latency=True),
        Case("3", "reference NFQUEUE accept loop", lambda b: b.nfq("bench.ref_nfq"),
             small=True, latency=True),
        Case("3g", "reference loop, GSO flag", lambda b: b.nfq("bench.ref_nfq", "--gso")),
        Case("3t", "reference loop, GSO flag, TTL edited",
             lambda b: b.nfq("bench.ref_nfq", "--gso", "--ttl", "63")),
        Case("4", "daemon, same-length replace", lambda b: b.daemon(same),
             small=True, latency=True),
        Case("4d", "daemon, same-length, pattern every 64 B", lambda b: b.daemon(same),
             period=lb.DENSE_PERIOD),
        Case("4n", "daemon, same-length, gso = false", lambda b: b.daemon(same, gso=False)),
        Case("4q", "daemon, queued, no edit (split of 4)", lambda b: b.daemon(noedit)),
        Case("4t", "daemon, queued, TTL edited", lambda b: b.daemon(ttl), latency=True),
        Case("5", "daemon, length-changing replace",
             lambda b: b.daemon({"10-shorter.toml": lb.rule_shorter()})),
        Case("6", "daemon, 1000 rules (row 4's last)", lambda b: b.daemon(thousand)),
        Case("7a", "daemon 1 worker, 8 flows, every 64 B", lambda b: b.daemon(same, workers=1),
             flows=8, period=lb.DENSE_PERIOD),
        Case("7b", "daemon 2 workers, 8 flows, every 64 B", lambda b: b.daemon(same, workers=2),
             flows=8, period=lb.DENSE_PERIOD),
        Case("7c", "daemon 1 worker, 8 flows (row 4's job)",
             lambda b: b.daemon(same, workers=1), flows=8),
        Case("7d", "daemon 2 workers, 8 flows (row 4's job)",
             lambda b: b.daemon(same, workers=2), flows=8),
        Case("8", "scapy NFQUEUE rewrite loop (anchor)",
             lambda b: b.nfq("bench.scapy_loop", "--find", hexes[0], "--with", hexes[1])),
    ]


def _one(bench: lb.Bench, case: Case, sources: list[str], duration: float,
         ping_count: int) -> dict[str, Any]:
    run: dict[str, Any] = {}
    with case.mode(bench) as info:
        srcs = sources[: case.flows] if case.flows > 1 else []
        if case.iperf3:
            run["bulk"] = bench.iperf3(duration)
        else:
            run["bulk"] = bench.throughput(duration, flows=case.flows, sources=srcs,
                                           period=case.period)
        if case.small:
            run["small"] = bench.throughput(duration, mss=lb.SMALL_MSS)
        if case.latency:
            run["latency"] = bench.latency(ping_count)
    if "counts" in info:
        run["program_counts"] = info["counts"]
    return run


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class Goal:
    name: str
    value: float
    goal: str
    ok: bool


def queued_goals(med: dict[str, dict[str, float]]) -> list[Goal]:
    """The queued path against the least a queue can do (those whose rows were measured)."""
    out: list[Goal] = []
    for a, b, what, name, least in (
            ("4q", "3g", "gbps", "4q / 3g queued, no edit / reference with GSO", 0.8),
            ("4t", "3g", "gbps", "4t / 3g queued, TTL edited / ref with GSO", 0.75),
            ("4", "3g", "gbps", "4 / 3g  same-length replace / ref with GSO", 0.4),
            ("4", "3", "small_pps", "small  4 / 3 wire segments/s (MSS 100)", 0.8)):
        if a in med and b in med and what in med[a] and what in med[b]:
            value = med[a][what] / med[b][what] if med[b][what] else float("nan")
            out.append(Goal(name, value, f">= {least}", value >= least))
    return out


def median_figures(by_key: dict[str, Case]) -> dict[str, dict[str, float]]:
    """Per row, the median over rounds of each figure it measured."""
    med: dict[str, dict[str, float]] = {}
    for key, case in by_key.items():
        m: dict[str, float] = {
            "gbps": _median([r["bulk"]["gbps"] for r in case.runs]),
            "queued_pps": _median([r["bulk"]["queued_pps"] for r in case.runs]),
            "cpu_us_per_pkt": _median([r["bulk"]["app_cpu_us_per_pkt"] for r in case.runs]),
        }
        if case.small:
            # wire segments delivered per second (goodput / payload per segment): with the GSO
            # flag the queue sees a few large packets instead, so its own count does not compare
            m["small_pps"] = _median([r["small"]["gbps"] * 1e9 / 8 / lb.SMALL_PAYLOAD
                                      for r in case.runs])
            m["small_queued_pps"] = _median([r["small"]["queued_pps"] for r in case.runs])
        if case.latency:
            m["p50_us"] = _median([r["latency"]["p50_us"] for r in case.runs])
            m["p99_us"] = _median([r["latency"]["p99_us"] for r in case.runs])
        med[key] = m
    return med


def summarize(by_key: dict[str, Case], micro: dict[str, dict[str, float]]) -> tuple[
        dict[str, dict[str, float]], list[Goal]]:
    med = median_figures(by_key)

    def ratio(a: str, b: str, what: str = "gbps") -> float:
        return med[a][what] / med[b][what] if med[b][what] else float("nan")

    goals = [
        Goal("2 / 1   daemon, no match / plain bridge", ratio("2", "1"), ">= 0.95",
             ratio("2", "1") >= 0.95),
        Goal("4 / 3   same-length replace / reference", ratio("4", "3"), ">= 0.85",
             ratio("4", "3") >= 0.85),
        Goal("5 / 3   length-changing / reference", ratio("5", "3"), ">= 1.0",
             ratio("5", "3") >= 1.0),
        Goal("5 / 4   length-changing / same-length", ratio("5", "4"), ">= 0.7",
             ratio("5", "4") >= 0.7),
        Goal("6 / 4   1000 rules / 1 rule", ratio("6", "4"), ">= 0.9", ratio("6", "4") >= 0.9),
        Goal("7b / 7a 2 workers / 1 worker (8 flows, 64 B)", ratio("7b", "7a"), ">= 1.4",
             ratio("7b", "7a") >= 1.4),
        Goal("4 / 8   daemon / scapy anchor", ratio("4", "8"), ">= 30", ratio("4", "8") >= 30),
        *queued_goals(med),
        Goal("micro: packet core speedup vs scapy", micro["packet"]["packet_speedup"], ">= 40",
             micro["packet"]["packet_speedup"] >= 40),
        Goal("micro: match 1000 rules / 1 rule", micro["match"]["ratio"], "<= 1.2",
             micro["match"]["ratio"] <= 1.2),
    ]
    st = micro.get("stream") or {}
    if st:  # the stream matcher's worst cases, side by side with ordinary packets
        goals += [
            Goal("micro: regex hostile / ordinary per byte", st["regex_ratio"], "<= 10",
                 st["regex_ratio"] <= 10),
            *(Goal(f"micro: {n} literal(s) dense / ordinary 64 KB", st[f"literal_{n}_ratio"],
                   "<= 3", st[f"literal_{n}_ratio"] <= 3) for n in (1, 100, 1000)),
            Goal("micro: 1 literal 64 KB, hold check / per packet", st["one_literal_ratio"],
                 "<= 1.2", st["one_literal_ratio"] <= 1.2),
        ]
    trace = micro.get("trace") or {}
    if trace:  # the hook while nobody traces, on row 4's packets: within the noise
        limit = 1 + trace["super_noise"]
        goals.append(Goal("micro: trace hook off / no hook (row 4)", trace["super_off_ratio"],
                          f"<= {limit:.3f}", trace["super_off_ratio"] <= limit))
    return med, goals


def table(by_key: dict[str, Case], med: dict[str, dict[str, float]], goals: list[Goal],
          micro: dict[str, dict[str, float]], split: dict[str, Any], args: Any) -> str:
    busy = _median([r["bulk"]["cpu_busy"] for c in by_key.values() for r in c.runs
                    if not c.iperf3])
    lines = [
        f"nfrewrite bench: {args.rounds} round(s) x {args.duration:g} s per measurement, "
        f"medians; kernel {platform.release()}, {os.cpu_count()} CPUs",
        f"machine: load average {args.load[0]} at start, {args.load[1]} at end; all CPUs "
        f"{busy:.0%} busy during the median bulk run (other work on the machine counts too)",
        "",
        f"{'#':<3} {'case':<40} {'Gbit/s':>8} {'queued pkt/s':>13} {'CPU us/pkt':>11} "
        f"{'small pkt/s':>12} {'RTT p50 us':>11} {'p99 us':>8}",
    ]
    for key, case in by_key.items():
        m = med[key]
        small = f"{m['small_pps']:12.0f}" if "small_pps" in m else f"{'':>12}"
        lat = (f"{m['p50_us']:11.1f} {m['p99_us']:8.1f}" if "p50_us" in m
               else f"{'':>11} {'':>8}")
        qpps = f"{m['queued_pps']:13.0f}" if m["queued_pps"] else f"{'-':>13}"
        cpu = f"{m['cpu_us_per_pkt']:11.1f}" if m["cpu_us_per_pkt"] else f"{'-':>11}"
        lines.append(f"{key:<3} {case.label:<40} {m['gbps']:8.3f} {qpps} {cpu} {small} {lat}")
    lines += ["", f"{'ratio':<46} {'figure':>8}  {'goal':<8}  result"]
    for g in goals:
        lines.append(f"{g.name:<46} {g.value:8.3f}  {g.goal:<8}  {'PASS' if g.ok else 'MISS'}")
    extra = [
        ("5 / 3g   length-changing / reference with GSO", med["5"]["gbps"] / med["3g"]["gbps"]),
        ("4d / 3   pattern every 64 B / reference", med["4d"]["gbps"] / med["3"]["gbps"]),
        ("4n / 3   gso = false / reference", med["4n"]["gbps"] / med["3"]["gbps"]),
        ("4q / 3   queued, no edit / reference", med["4q"]["gbps"] / med["3"]["gbps"]),
        ("4t / 3t  TTL edited / ref loop, same edit", med["4t"]["gbps"] / med["3t"]["gbps"]),
        ("4 / 3 by CPU per packet (3's us / 4's us)",
         med["3"]["cpu_us_per_pkt"] / med["4"]["cpu_us_per_pkt"]),
        ("5 / 3 by CPU per packet", med["3"]["cpu_us_per_pkt"] / med["5"]["cpu_us_per_pkt"]),
        ("4 / 8 by CPU per packet", med["8"]["cpu_us_per_pkt"] / med["4"]["cpu_us_per_pkt"]),
        ("7d / 7c  2 / 1 workers on row 4's job", med["7d"]["gbps"] / med["7c"]["gbps"]),
    ]
    for name, value in extra:
        lines.append(f"{name:<46} {value:8.3f}  {'-':<8}  info")
    p = micro["packet"]
    mm = micro["match"]
    lines += [
        "",
        f"added round trip, not queued (2 - 1): p50 {med['2']['p50_us'] - med['1']['p50_us']:.1f}"
        f" us, p99 {med['2']['p99_us'] - med['1']['p99_us']:.1f} us",
        f"added round trip, queued (4 - 1): p50 {med['4']['p50_us'] - med['1']['p50_us']:.1f} us,"
        f" p99 {med['4']['p99_us'] - med['1']['p99_us']:.1f} us; NFQUEUE alone (3 - 1): p50 "
        f"{med['3']['p50_us'] - med['1']['p50_us']:.1f} us, "
        f"p99 {med['3']['p99_us'] - med['1']['p99_us']:.1f} us; queued and TTL edited (4t - 1): "
        f"p50 {med['4t']['p50_us'] - med['1']['p50_us']:.1f} us, "
        f"p99 {med['4t']['p99_us'] - med['1']['p99_us']:.1f} us",
        "CPU us/pkt: CPU time (user + system) of the appliance namespace's processes per queued "
        "packet; it does not depend on the share of the CPUs other work leaves them",
        f"small pkt/s: wire segments ({lb.SMALL_MSS} B MSS, {lb.SMALL_PAYLOAD} B payload) "
        "delivered per second, from goodput; queued packets/s with small segments: ref "
        f"{med['3']['small_queued_pps']:.0f}, daemon {med['4']['small_queued_pps']:.0f} (GSO "
        "super-packets of small segments)",
        f"wall us per queued packet, from pkt/s of rows 3/4q/4/8: ref "
        f"{_us(med['3']['queued_pps'])}, queue+parse {_us(med['4q']['queued_pps'])}, "
        f"+find+edit {_us(med['4']['queued_pps'])}, scapy {_us(med['8']['queued_pps'])}",
        f"micro: packet core {p['packet_nfrewrite_ns'] / 1000:.2f} us vs scapy "
        f"{p['packet_scapy_ns'] / 1000:.1f} us; match {mm['match_1_rule_ns']:.0f} ns (1 rule) vs "
        f"{mm['match_1000_rules_ns']:.0f} ns (1000 rules)",
        *(f"micro: {line}" for line in _trace_lines(micro.get("trace") or {})),
        *(f"micro: {line}" for line in
          (bench_stream.lines(micro["stream"]) if micro.get("stream") else [])),
        f"workers: 8 flows from {', '.join(split['sources'])}; --queue-balance hashes the "
        f"address pair only; packets per queue in 7b: {split['per_queue']}",
    ]
    return "\n".join(lines)


def _trace_lines(trace: dict[str, float]) -> list[str]:
    if not trace:
        return []
    from bench.bench_trace import describe

    return describe(trace)


def _loadavg(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def _us(pps: float) -> str:
    return f"{1e6 / pps:.1f}" if pps else "-"


def _split(case: Case) -> dict[int, int]:
    total: dict[int, int] = {}
    for r in case.runs:
        for q, n in r["bulk"]["queued"].items():
            total[int(q)] = total.get(int(q), 0) + n
    return dict(sorted(total.items()))


def _rounds(n: int, items: list[Case]) -> Iterator[tuple[int, Case]]:
    for r in range(n):
        for case in (items if r % 2 == 0 else list(reversed(items))):
            yield r, case


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s per measurement, 1 round")
    p.add_argument("--duration", type=float, default=None, help="seconds per measurement [5]")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds [3]")
    p.add_argument("--ping-count", type=int, default=None, help="ping-pong rounds [2000]")
    p.add_argument("--only", default="", help="comma-separated case keys (others skipped)")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--json", default=RESULTS, help=f"results file [{RESULTS}]")
    args = p.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.ping_count = args.ping_count or (300 if args.quick else 2000)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    load_start = os.getloadavg()
    log = _log
    try:
        micro: dict[str, dict[str, float]] = {}
        if args.no_micro:
            micro = {"packet": {"packet_speedup": float("nan"), "packet_nfrewrite_ns": 0,
                                "packet_scapy_ns": 0},
                     "match": {"ratio": float("nan"), "match_1_rule_ns": 0,
                               "match_1000_rules_ns": 0},
                     "trace": {}}
        else:
            from bench import bench_match, bench_packet, bench_trace

            log("micro-benchmarks: packet core, rule matching, stream matcher, trace hook")
            micro = {"packet": bench_packet.run(), "match": bench_match.run(),
                     "stream": bench_stream.run(rounds=2 if args.quick else bench_stream.ROUNDS),
                     "trace": bench_trace.run(rounds=10 if args.quick else bench_trace.ROUNDS)}
        with lb.bench_lab() as bench:
            log(f"lab {bench.lab.tag} up; finding client addresses for both queues")
            sources, where = bench.balanced_sources()
            items = cases(sources)
            if args.only:
                keep = set(args.only.split(","))
                items = [c for c in items if c.key in keep]
            for r, case in _rounds(args.rounds, items):
                log(f"round {r + 1}/{args.rounds}: {case.key} {case.label}")
                case.runs.append(_one(bench, case, sources, args.duration, args.ping_count))
    except KeyboardInterrupt:
        print("bench: interrupted; lab removed", file=sys.stderr)
        return 130
    args.load = (_loadavg(load_start), _loadavg(os.getloadavg()))
    by_key = {c.key: c for c in items}
    split = {"sources": sources, "queue_of_address": where,
             "per_queue": _split(by_key["7b"]) if "7b" in by_key else {}}
    results: dict[str, Any] = {
        "args": {"duration": args.duration, "rounds": args.rounds,
                 "ping_count": args.ping_count},
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - started, 1), "loadavg": args.load,
        "micro": micro, "workers_split": split,
        "runs": {k: c.runs for k, c in by_key.items()},
    }
    complete = all(k in by_key for k in ("1", "1i", "2", "3", "3g", "3t", "4", "4d", "4n", "4q",
                                         "4t", "5", "6", "7a", "7b", "7c", "7d", "8"))
    if complete:
        med, goals = summarize(by_key, micro)
        results["medians"] = med
        results["goals"] = [g.__dict__ for g in goals]
        print(table(by_key, med, goals, micro, split, args))
    else:  # a partial run (--only): the rows, and the goals whose rows were measured
        med = median_figures(by_key)
        results["medians"] = med
        for k, c in by_key.items():
            figures = "  ".join(f"{name} {v:.4g}" for name, v in med[k].items())
            print(f"{k:<3} {c.label:<40} {figures}")
        for g in queued_goals(med):
            print(f"{g.name:<46} {g.value:8.3f}  {g.goal:<8}  {'PASS' if g.ok else 'MISS'}")
        if "4t" in med and "3t" in med and med["3t"]["gbps"]:
            print(f"{'4t / 3t  TTL edited / ref loop, same edit':<46} "
                  f"{med['4t']['gbps'] / med['3t']['gbps']:8.3f}  {'-':<8}  info")
        if "1" in med:
            for k in ("3", "4", "4t"):
                if k in med and "p50_us" in med[k]:
                    print(f"added round trip {k} - 1: p50 "
                          f"{med[k]['p50_us'] - med['1']['p50_us']:.1f} us, p99 "
                          f"{med[k]['p99_us'] - med['1']['p99_us']:.1f} us")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    log(f"results in {args.json} ({results['elapsed_s']} s)")
    return 0


def _log(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
