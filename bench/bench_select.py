"""Rule selection for new connections: the cost of a (sport, dport) pair seen for the first time,
and the memory the selection cache holds after many of them.

Four rulesets, each a worst case for a port index keyed by exact ports:

* ``ranges_1000`` / ``ranges_10000``: every rule has a port *range* (100 ports wide; half on
  ``dport``, half on ``sport``), spread over the whole port space, so no dict of exact ports helps;
* ``portless_1000``: 1,000 rules with no port condition (a /32 destination each instead), so
  every one of them is a candidate for every packet and the addresses decide;
* ``any_1000``: 1,000 rules with no condition at all: every rule applies to every packet.

For each: the mean cost of ``RuleSet.select`` on ``--pairs`` distinct, never seen (sport, dport)
pairs (a fresh ruleset, so nothing is cached), the mean cost of the same pairs again (cached),
and the memory the ruleset's caches grew by (``tracemalloc``) after 65,536 new pairs: every
source port 0..65535 towards one destination port, as many clients' ephemeral ports would be.

    python -m bench.bench_select               # the four rulesets, one line each
    python -m bench.bench_select --pairs 200   # fewer new pairs per figure (default 2000)
    python -m bench.bench_select --ports 4096 ranges_10000   # one ruleset, a shorter sweep
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import time
import tracemalloc
from collections.abc import Callable

from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, RuleSet

SRC = ipaddress.IPv4Address("192.0.2.80").packed
DST = ipaddress.IPv4Address("198.51.100.7").packed
WIDTH = 100  # ports per range: wider than any exact-port list an index would expand


def _rule(index: int, match: Match) -> Rule:
    return Rule(f"r{index}", index, "bench.toml", index + 1, 1, match,
                (Replace(b"pattern-%d" % index, b"PATTERN-%d" % index, index + 1, 1),),
                HeaderSet(), "accept", ())


def range_rules(count: int) -> RuleSet:
    """``count`` rules, each one 100-port range (even: dport, odd: sport), spread over 1..65535."""
    rules = []
    for i in range(count):
        lo = 1 + (i * 7919) % (65535 - WIDTH)
        ports = ((lo, lo + WIDTH - 1),)
        rules.append(_rule(i, Match(dport=ports) if i % 2 == 0 else Match(sport=ports)))
    return RuleSet(rules)


def portless_rules(count: int) -> RuleSet:
    """``count`` rules with no port condition: each matches one /32 destination of 10.0.0.0/16."""
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    return RuleSet([
        _rule(i, Match(dst=(ipaddress.IPv4Network(base + i),))) for i in range(count)
    ])


def _pairs(count: int) -> list[tuple[int, int]]:
    """``count`` distinct (sport, dport) pairs, ephemeral source ports and assorted destinations."""
    return [(32768 + (k * 4099) % 28232, 1 + (k * 104729) % 65535) for k in range(count)]


def _per_select_us(ruleset: RuleSet, pairs: list[tuple[int, int]]) -> float:
    select = ruleset.select
    start = time.perf_counter_ns()
    for sport, dport in pairs:
        select(4, SRC, DST, sport, dport)
    return (time.perf_counter_ns() - start) / len(pairs) / 1000


def _cache_growth_mb(ruleset: RuleSet, ports: int = 65536, dport: int = 80) -> float:
    """Megabytes allocated (and still held) by ``ports`` selections, one per source port."""
    select = ruleset.select
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for sport in range(ports):
        select(4, SRC, DST, sport, dport)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / 1e6


RULESETS: dict[str, Callable[[], RuleSet]] = {
    "ranges_1000": lambda: range_rules(1000),
    "ranges_10000": lambda: range_rules(10000),
    "portless_1000": lambda: portless_rules(1000),
    "any_1000": lambda: RuleSet([_rule(i, Match()) for i in range(1000)]),
}


def run(pairs: int = 2000, ports: int = 65536,
        only: tuple[str, ...] = tuple(RULESETS)) -> dict[str, dict[str, float]]:
    """Per ruleset: {"new_pair_us", "cached_us", "cache_mb"}."""
    out: dict[str, dict[str, float]] = {}
    for name in only:
        make = RULESETS[name]
        ruleset = make()
        todo = _pairs(pairs)
        new = _per_select_us(ruleset, todo)
        cached = min(_per_select_us(ruleset, todo) for _ in range(3))
        out[name] = {"new_pair_us": round(new, 2), "cached_us": round(cached, 2),
                     "cache_mb": round(_cache_growth_mb(make(), ports), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="new pairs per figure")
    parser.add_argument("--ports", type=int, default=65536, help="source ports for the memory")
    parser.add_argument("only", nargs="*", metavar="RULESET",
                        help=f"some of {', '.join(RULESETS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.only) - set(RULESETS)
    if unknown:
        parser.error(f"unknown ruleset(s): {', '.join(sorted(unknown))}")
    for name, r in run(args.pairs, args.ports, tuple(args.only) or tuple(RULESETS)).items():
        print(f"{name:<14} new pair {r['new_pair_us']:9.2f} us   cached {r['cached_us']:6.2f} us"
              f"   cache after {args.ports:,} source ports {r['cache_mb']:7.1f} MB")


if __name__ == "__main__":
    main()
