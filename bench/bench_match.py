"""Per-packet rule matching cost: 1 rule vs 1,000 rules (999 of them on other ports).

Measures ``RuleSet.select(...)`` + ``Selection.find_edits(payload)`` on a 1460-byte HTTP response
payload, for packets of 256 flows (256 destination ports, all in one port class of the selection
cache, as no rule's ports come near them: the steady state of established flows), interleaving
the two rulesets over several repeats and keeping each one's best (minimum) time per packet. The
goal is a nearly flat cost: ``ratio = match_1000_rules_ns / match_1_rule_ns <= 1.2``.

    python -m bench.bench_match                     # one line: the two costs and their ratio
    python -m bench.bench_match --compare-search    # also: bytes.find vs re on one payload
"""

from __future__ import annotations

import ipaddress
import re
import sys
import time
from collections.abc import Callable

from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, RuleSet

SRC = ipaddress.IPv4Address("192.0.2.80").packed
DST = ipaddress.IPv4Address("198.51.100.7").packed
FLOWS = 256
REPEATS = 15
PACKETS = 4000  # per repeat


def _rule(index: int, match: Match, find: bytes, with_: bytes) -> Rule:
    return Rule(f"r{index}", index, "bench.toml", index + 1, 1, match,
                (Replace(find, with_, index + 1, 1),), HeaderSet(), "accept", ())


def _payload() -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html\r\n"
            b"Content-Length: 1360\r\n\r\n")
    body = (b"<html><body>" + b"lorem ipsum dolor sit amet " * 60)[: 1460 - len(head)]
    payload = head + body
    assert len(payload) == 1460
    return payload


def rulesets() -> tuple[RuleSet, RuleSet]:
    target = _rule(0, Match(sport=((80, 80),)), b"Server: nginx", b"Server: httpd")
    others: list[Rule] = []
    for i in range(1, 1000):
        kind = i % 4
        if kind == 0:
            match = Match(dport=((10000 + i, 10000 + i),))
        elif kind == 1:
            match = Match(sport=((20000 + i, 20000 + i),))
        elif kind == 2:
            net = ipaddress.ip_network("10.0.0.0/8")
            match = Match(sport=((30000 + i, 30000 + i),), dst=(net,))
        else:
            match = Match(dport=((1024 + i, 1024 + i), (5000 + i, 5000 + i)))
        others.append(_rule(i, match, b"pattern-%d" % i, b"PATTERN-%d" % i))
    return RuleSet([target]), RuleSet([target, *others])


def _time_per_packet(ruleset: RuleSet, payload: bytes) -> float:
    select = ruleset.select
    ports = [40000 + (k % FLOWS) for k in range(PACKETS)]
    start = time.perf_counter_ns()
    for dport in ports:
        select(4, SRC, DST, 80, dport).find_edits(payload)
    return (time.perf_counter_ns() - start) / PACKETS


def run() -> dict[str, float]:
    """{"match_1_rule_ns", "match_1000_rules_ns", "ratio"}: best time per packet, and the ratio."""
    payload = _payload()
    one, thousand = rulesets()
    assert one.select(4, SRC, DST, 80, 40000).find_edits(payload)[0][2] == b"Server: httpd"
    assert thousand.select(4, SRC, DST, 80, 40000).rules == one.rules
    best_one = best_thousand = float("inf")
    for _ in range(REPEATS):  # interleaved, so drift hits both alike
        best_one = min(best_one, _time_per_packet(one, payload))
        best_thousand = min(best_thousand, _time_per_packet(thousand, payload))
    return {
        "match_1_rule_ns": round(best_one, 1),
        "match_1000_rules_ns": round(best_thousand, 1),
        "ratio": round(best_thousand / best_one, 3),
    }


def compare_search() -> dict[str, float]:
    """Why find_edits uses bytes.find: best ns per search of a 1460-byte payload with no match."""
    payload = _payload().replace(b"Server: nginx", b"Server: xxxxx")
    finds = [b"Server: nginx", b"Server: Apache", b"X-Powered-By: PHP/8.2.7"]
    one = re.compile(re.escape(finds[0]))
    alternation = re.compile(b"|".join(b"(" + re.escape(f) + b")" for f in finds))
    cases: dict[str, Callable[[], object]] = {
        "1_pattern_bytes_find_ns": lambda: payload.find(finds[0]),
        "1_pattern_re_ns": lambda: list(one.finditer(payload)),
        "3_patterns_bytes_find_ns": lambda: [payload.find(f) for f in finds],
        "3_patterns_re_alternation_ns": lambda: list(alternation.finditer(payload)),
    }
    n = 2000
    results: dict[str, float] = {}
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter_ns() - start) / n)
        results[name] = round(best, 1)
    return results


if __name__ == "__main__":
    r = run()
    print(f"match: 1 rule {r['match_1_rule_ns']:.0f} ns/packet, 1000 rules "
          f"{r['match_1000_rules_ns']:.0f} ns/packet, ratio {r['ratio']:.3f} (goal <= 1.2)")
    if "--compare-search" in sys.argv[1:]:
        print(f"search of 1460 bytes, no match: {compare_search()}")
