"""The matcher's worst cases against ordinary packets, side by side (ratios, not times).

``python -m bench.bench_stream`` prints, best of the rounds (interleaved, so drift on a shared
machine hits both sides of each ratio alike):

* regex: ``(?:a|aa){1,100}b`` (exponential for a backtracking engine; ``(a|aa)+b`` itself is
  refused, see ``nfrewrite.core.regex``) on 64 KB of ``a`` vs an ordinary 64 KB HTTP-like
  payload, through ``find_edits`` + ``pending_from`` (the search and the hold decision): ns
  per byte and their ratio (goal: the same order, <= 10). Python's ``re`` on ``(a|aa)+b``
  over 22 bytes, for scale.
* literals: 1, 100 and 1,000 same-length patterns on the port, ``Engine.process`` of a
  64 KB packet holding one of them as often as it fits vs an ordinary 64 KB packet, same rules
  (goal <= 3). Beside them, for scale: ``bytes.replace`` of the dense payload alone (the floor
  of any rewrite of it in CPython) and a near miss (the same shape with a number no rule names).
* one literal, 64 KB, ``Engine.process`` as the daemon calls it now (a hold token: the stream
  matcher decides whether to hold) vs as it did before (per packet, no token) (goal <= 1.2).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from nfrewrite.core.engine import Engine, Result
from nfrewrite.core.regex import compile_regex
from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, RuleSet, Selection
from nfrewrite.core.seqadj import FlowTable

SIZE = 65_000
ROUNDS = 7
HOSTILE_REGEX = r"(?:a|aa){1,100}b"


def _ordinary(size: int) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html\r\n"
            b"Content-Length: 64000\r\n\r\n")
    return (head + b"<html><body>" + b"lorem ipsum dolor sit amet, consectetur " * 2000)[:size]


def _best(fn: Callable[[], object], n: int) -> float:
    """Best ns per call of ``fn`` over ``n`` calls."""
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - start) / n


def _side_by_side(a: Callable[[], object], b: Callable[[], object], n: int,
                  rounds: int) -> tuple[float, float]:
    best_a = best_b = float("inf")
    for _ in range(rounds):
        best_a = min(best_a, _best(a, n))
        best_b = min(best_b, _best(b, n))
    return best_a, best_b


def regex_rows(rounds: int = ROUNDS) -> dict[str, float]:
    rx = compile_regex(HOSTILE_REGEX, (b"X",), 256)
    rule = Rule("r", 0, "bench", 1, 1, Match(), (Replace(rx.source, b"X", 1, 1, rx),),
                HeaderSet(), "accept", ())
    sel = Selection((rule,))
    hostile, ordinary = b"a" * SIZE, _ordinary(SIZE)
    assert sel.find_edits(hostile) == [] and sel.pending_from(hostile) == SIZE - 200
    assert sel.pending_from(ordinary) == SIZE

    def run(payload: bytes) -> Callable[[], object]:
        return lambda: (sel.find_edits(payload), sel.pending_from(payload))

    bad, good = _side_by_side(run(hostile), run(ordinary), 50, rounds)
    start = time.perf_counter_ns()
    re.search(rb"(a|aa)+b", b"a" * 22)
    backtrack = time.perf_counter_ns() - start
    return {"regex_hostile_ns_per_byte": round(bad / SIZE, 3),
            "regex_ordinary_ns_per_byte": round(good / SIZE, 3),
            "regex_ratio": round(bad / good, 2),
            "re_backtracking_22_bytes_ns_per_byte": round(backtrack / 22)}


def _packet(payload: bytes) -> bytes:
    return bytes(IP(src="198.18.0.1", dst="198.18.1.1")
                 / TCP(sport=80, dport=40000, seq=1000, ack=1, flags="PA") / Raw(payload))


def _process(engine: Engine, packet: bytes, hold: object = None) -> Result:
    """As the queue loop hands over a GSO super-packet (the kernel completes its checksums)."""
    return engine.process(packet, now=1.0, csum_partial=True, gso=True, hold=hold)


def _literal_rules(count: int) -> RuleSet:
    return RuleSet([Rule(f"r{i}", i, "bench", i + 1, 1, Match(sport=((80, 80),)),
                         (Replace(b"pattern-%04d" % i, b"PATTERN-%04d" % i, i + 1, 1),),
                         HeaderSet(), "accept", ()) for i in range(count)])


def literal_rows(rounds: int = ROUNDS) -> dict[str, float]:
    out: dict[str, float] = {}
    ordinary = _packet(_ordinary(SIZE))
    for count in (1, 100, 1000):
        rules = _literal_rules(count)
        pattern = b"pattern-%04d" % (count // 2)
        dense = _packet(pattern * (SIZE // len(pattern)) + b"x" * (SIZE % len(pattern)))
        engine = Engine(rules, FlowTable())
        res = _process(engine, dense)
        assert res.packet is not None and b"pattern-" not in res.packet[40:]
        bad, good = _side_by_side(lambda: _process(engine, dense),  # noqa: B023
                                  lambda: _process(engine, ordinary),  # noqa: B023
                                  20, rounds)
        out[f"literal_{count}_dense_us"] = round(bad / 1000, 1)
        out[f"literal_{count}_ordinary_us"] = round(good / 1000, 1)
        out[f"literal_{count}_ratio"] = round(bad / good, 2)
        # what no rewrite of the dense packet can go below in CPython: bytes.replace alone, C
        # all the way (~35 ns per occurrence); and a near miss: the same bytes with a number no
        # rule names (nothing to rewrite; the search still confirms every shared prefix)
        near = _packet(b"pattern-9999" * (SIZE // 12) + b"x" * (SIZE % 12))
        body = dense[40:]
        floor, miss = _side_by_side(lambda: body.replace(pattern, pattern.upper()),  # noqa: B023
                                    lambda: _process(engine, near), 20, rounds)  # noqa: B023
        out[f"literal_{count}_floor_us"] = round(floor / 1000, 1)
        out[f"literal_{count}_near_miss_us"] = round(miss / 1000, 1)
    return out


def one_literal_row(rounds: int = ROUNDS) -> dict[str, float]:
    """One literal, a 64 KB packet holding it once: per packet (no token) vs with a token."""
    rules = _literal_rules(1)
    payload = _ordinary(SIZE)
    payload = payload[:1000] + b"pattern-0000" + payload[1012:]
    packets = [_packet(payload)]
    engine = Engine(rules, FlowTable())
    tokens = iter(range(1 << 62))

    def with_token() -> object:
        res = _process(engine, packets[0], next(tokens))
        assert not res.released
        return res

    old, new = _side_by_side(lambda: _process(engine, packets[0]), with_token, 50, rounds)
    return {"one_literal_old_us": round(old / 1000, 2), "one_literal_new_us": round(new / 1000, 2),
            "one_literal_ratio": round(new / old, 3)}


def run(rounds: int = ROUNDS) -> dict[str, float]:
    return {**regex_rows(rounds), **literal_rows(rounds), **one_literal_row(rounds)}


def lines(r: dict[str, float]) -> list[str]:
    out = [f"regex {HOSTILE_REGEX} on 64 KB of 'a': {r['regex_hostile_ns_per_byte']:.2f} ns/B vs "
           f"ordinary 64 KB {r['regex_ordinary_ns_per_byte']:.2f} ns/B (x{r['regex_ratio']:.2f}); "
           f"re's backtracking on (a|aa)+b over 22 bytes: "
           f"{r['re_backtracking_22_bytes_ns_per_byte']:.0f} ns/B"]
    for count in (1, 100, 1000):
        dense, ordinary = r[f"literal_{count}_dense_us"], r[f"literal_{count}_ordinary_us"]
        out.append(f"{count} literal(s), 64 KB packet of one pattern repeated {dense:.1f} us vs "
                   f"ordinary {ordinary:.1f} us (x{r[f'literal_{count}_ratio']:.2f}); "
                   f"bytes.replace of it alone {r[f'literal_{count}_floor_us']:.1f} us "
                   f"(x{r[f'literal_{count}_floor_us'] / ordinary:.2f}), a near miss "
                   f"{r[f'literal_{count}_near_miss_us']:.1f} us")
    out.append(f"one literal, 64 KB: per packet (old) {r['one_literal_old_us']:.1f} us vs with "
               f"the stream matcher's hold decision {r['one_literal_new_us']:.1f} us "
               f"(x{r['one_literal_ratio']:.3f})")
    return out


if __name__ == "__main__":
    for line in lines(run()):
        print(line)
