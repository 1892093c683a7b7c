"""The hold decision's literal index: every position from which a payload's tail is a proper
prefix of a pattern, against a brute-force oracle; linear memory for long literals; several
literals beyond what Hyperscan compiles are still searched (by bytes.find) and held."""

from __future__ import annotations

import random
import time

from nfrewrite.core.prefixes import HEAD, Prefixes
from nfrewrite.core.rules import HS_LITERAL_MAX, HeaderSet, Match, Replace, Rule, Selection


def brute(literals: list[bytes], payload: bytes) -> list[int]:
    return [i for i in range(len(payload))
            if any(len(p) > len(payload) - i and p.startswith(payload[i:]) for p in literals)]


def test_candidates_are_what_brute_force_finds() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = b"ab" if rng.random() < 0.5 else b"abc\x00"
        literals = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 3 * HEAD)))
                    for _ in range(rng.randint(1, 5))]
        payload = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 4 * HEAD)))
        assert Prefixes(literals).candidates(payload) == brute(literals, payload), (
            literals, payload)


def test_long_periodic_literals() -> None:
    literals = [b"a" * 40 + b"b", b"ab" * 30, b"x" + b"a" * 20]
    for payload in (b"a" * 100, b"ab" * 50, b"xa" + b"a" * 12, b"q" * 5 + b"ab" * 9 + b"a"):
        assert Prefixes(literals).candidates(payload) == brute(literals, payload)


def test_sixty_kilobyte_literals_take_linear_memory_and_time() -> None:
    """The set of every proper prefix of 100 literals of 60 KB would hold ~180 GB."""
    literals = [f"bulk-{i}-".ljust(60_000, "z").encode() for i in range(100)]
    start = time.monotonic()
    index = Prefixes(literals)
    payload = b"q" * 1000 + literals[42][:30_000]
    assert index.candidates(payload) == [1000]
    assert index.candidates(b"zzzz") == []
    assert time.monotonic() - start < 5  # quadratic would not finish at all


def rule_of(patterns: list[bytes]) -> Rule:
    return Rule("r", 0, "r", 1, 1, Match(), tuple(Replace(p, p.upper(), 1, 1) for p in patterns),
                HeaderSet(), "accept", ())


def test_several_literals_too_long_for_hyperscan_are_found_and_held() -> None:
    long = b"x" * (HS_LITERAL_MAX + 1) + b"END"
    sel = Selection((rule_of([b"short", long]),))
    sel.prepare()  # Hyperscan is not tried (it would refuse the long one)
    payload = b"..short.." + long + b"..short" + long[:100]
    assert [e[:2] for e in sel.find_edits(payload)] == [
        (2, 7), (9, 9 + len(long)), (11 + len(long), 16 + len(long))]
    assert sel.pending_from(payload) == len(payload) - 100
    assert sel.present(payload) is None  # which occur: not by Hyperscan here
