"""Regular-expression rules: the matcher against a brute-force oracle, holds, and what is refused.

The oracle is the documented semantics spelt out with Python's ``re`` on every substring:
leftmost start, then rule order, then a regex's longest match of at most ``max_len`` bytes;
non-overlapping. Texts are short, over a three-byte alphabet, so every case is tried quickly.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfrewrite.core.regex import RegexError, compile_regex, parse_template
from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, Selection

ALPHABET = b"ab\n"
# (pattern, max_len): all valid; together they cover sets, classes, alternation, bounded and
# trailing unbounded repetition, case folding and groups
PATTERNS = [
    ("a", 4), ("ab", 4), ("a|ab", 4), ("(a|ab){1,3}", 6), ("a[^\n]*", 5), ("ba+", 4),
    ("(?i)A[AB]{0,2}", 4), ("b[ab]{1,2}b", 4), ("a(b|\n)?", 4), ("(ab|a)(b|ba)", 6),
    ("(?:a|aa){1,3}b", 7), ("[ab]{2}\n?", 3), ("\n[ab]+", 3), ("(a)(b)?", 2),
]
LITERALS = [b"ab", b"ba\n", b"aa"]


def _replace(pattern: str, max_len: int) -> Replace:
    """With ``<\\1>`` when the pattern has a group that may fill it, else ``<>``."""
    for template in ("<\\1>", "<>"):
        parts, _ = parse_template(template)
        try:
            rx = compile_regex(pattern, parts, max_len)
        except RegexError:
            continue
        return Replace(rx.source, template.encode(), 1, 1, rx)
    raise AssertionError(pattern)


def _selection(reps: list[Replace]) -> Selection:
    rule = Rule("r", 0, "r.toml", 1, 1, Match(), tuple(reps), HeaderSet(), "accept", ())
    return Selection((rule,))


def _oracle(reps: list[Replace], text: bytes) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    n = len(text)
    while pos < n:
        taken = None
        for s in range(pos, n):
            for rep in reps:
                rx = rep.regex
                if rx is None:
                    if text.startswith(rep.find, s):
                        taken = (s, s + len(rep.find), rep.with_)
                else:
                    pat = re.compile(rx.source)
                    ends = [e for e in range(s + 1, min(n, s + rx.max_len) + 1)
                            if pat.fullmatch(text, s, e)]
                    if ends:
                        e = max(ends)
                        m = pat.fullmatch(text, s, e)
                        assert m is not None
                        with_ = b"".join(t if isinstance(t, bytes) else (m.group(t) or b"")
                                         for t in rx.template)
                        taken = (s, e, with_)
                if taken:
                    break
            if taken:
                break
        if taken is None:
            break
        out.append(taken)
        pos = taken[1]
    return out


reps_strategy = st.lists(
    st.one_of(st.sampled_from(PATTERNS).map(lambda p: _replace(*p)),
              st.sampled_from(LITERALS).map(lambda f: Replace(f, b"L", 1, 1))),
    min_size=1, max_size=3, unique_by=lambda r: (r.find, r.regex is None))
text_strategy = st.binary(max_size=28).map(lambda b: bytes(ALPHABET[c % 3] for c in b))


@settings(max_examples=600, deadline=None)
@given(reps_strategy, text_strategy)
def test_matches_are_those_of_the_brute_force_oracle(reps: list[Replace], text: bytes) -> None:
    sel = _selection(reps)
    got = [(s, e, w) for s, e, w, _ in sel.find_edits(text)]
    assert got == _oracle(reps, text)


@settings(max_examples=400, deadline=None)
@given(reps_strategy, text_strategy, st.integers(min_value=0, max_value=28))
def test_what_is_before_the_pending_point_is_final(reps: list[Replace], text: bytes,
                                                     k: int) -> None:
    """Whatever bytes follow, the edits that begin before ``pending_from`` stay as they are."""
    sel = _selection(reps)
    head = text[:k]
    at = sel.pending_from(head)
    early = [e for e in sel.find_edits(head) if e[0] < at]
    assert all(end <= at for _, end, _, _ in early)
    whole = [e for e in sel.find_edits(text) if e[0] < at]
    assert [e[:3] for e in whole] == [e[:3] for e in early]


@pytest.mark.parametrize(("pattern", "max_len"), PATTERNS)
def test_hold_candidates_are_exactly_the_proper_prefixes(pattern: str, max_len: int) -> None:
    """A position is a candidate iff the rest is a proper prefix of a match of at most max_len
    bytes (tried against every extension over the alphabet)."""
    sel = _selection([_replace(pattern, max_len)])
    pat = re.compile(pattern.encode())
    for size in range(0, 7):
        for text in map(bytes, itertools.product(ALPHABET, repeat=size)):
            n = len(text)
            want = set()
            for at in range(max(0, n - max_len + 1), n):
                rest = text[at:]
                room = max_len - len(rest)
                if any(pat.fullmatch(rest + bytes(w))
                       for m in range(1, room + 1)
                       for w in itertools.product(ALPHABET, repeat=m)):
                    want.add(at)
            assert sel._regex_candidates(text) == want, (pattern, text)


def test_a_server_header_is_rewritten_whole_and_a_long_one_cut_at_max_len() -> None:
    rx = compile_regex(r"Server: [^\r\n]*", (b"Server: web",), 32)
    sel = _selection([Replace(rx.source, b"Server: web", 1, 1, rx)])
    payload = b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\nX: y\r\n\r\n"
    (start, end, new, _), = sel.find_edits(payload)
    assert payload[start:end] == b"Server: SimpleHTTP/0.6 Python/3."  # 32 bytes: max_len
    assert new == b"Server: web"


def test_case_insensitive_and_groups() -> None:
    parts, _ = parse_template(r"Host: \1.example")
    rx = compile_regex(r"(?i)host: ([a-z0-9-]{1,20})\.internal", parts, 64)
    sel = _selection([Replace(rx.source, b"", 1, 1, rx)])
    edits = sel.find_edits(b"GET / HTTP/1.1\r\nHOST: web-1.INTERNAL\r\n")
    assert [e[2] for e in edits] == [b"Host: web-1.example"]


@pytest.mark.parametrize(("pattern", "template", "max_len", "offset", "words"), [
    (r"(a)\1", "x", 256, 3, "backreference"),
    (r"x(?=y)", "x", 256, 1, "lookaround"),
    (r"x(?<!y)", "x", 256, 1, "lookaround"),
    (r"^GET", "x", 256, 0, "anchors"),
    (r"a\bc", "x", 256, 1, "anchors"),
    (r"a+?", "x", 256, 1, "lazy"),
    (r"(a|aa)+b", "x", 256, 6, "unbounded repetition"),
    (r"a.*b", "x", 256, 2, "unbounded repetition"),
    (r"a{1,300}", "x", 256, 0, "max_len"),
    (r"[a-z]{200}x*", "x", 100, 0, "max_len"),
    (r"x*", "x", 256, 0, "empty string"),
    (r"(a)", r"\2", 256, 0, "group"),
    (r"(a|bc){1,3}", r"\1", 256, 0, "backtracks"),
    (r"(?L)a", "x", 256, 0, "locale"),
])
def test_refused_patterns(pattern: str, template: str, max_len: int, offset: int,
                          words: str) -> None:
    parts, bad = parse_template(template)
    assert bad is None
    with pytest.raises(RegexError) as caught:
        compile_regex(pattern, parts, max_len)
    assert words in str(caught.value)
    assert (caught.value.offset or 0) == offset


def test_templates() -> None:
    assert parse_template(r"a\1b\\c") == ((b"a", 1, b"b\\c"), None)
    assert parse_template("") == ((b"",), None)
    assert parse_template(r"a\n") == ((), 1)


def test_a_backtracking_catastrophe_costs_linear_time() -> None:
    """(a|aa){1,100}b on 64 KB of 'a' (re would need ~fib(100) steps on each start)."""
    rx = compile_regex(r"(?:a|aa){1,100}b", (b"X",), 256)
    sel = _selection([Replace(rx.source, b"X", 1, 1, rx)])
    hostile = b"a" * 65536
    sel.find_edits(hostile)  # compiles
    start = time.perf_counter()
    assert sel.find_edits(hostile) == []
    assert sel.pending_from(hostile) == 65536 - 200  # a match may begin 200 bytes back
    assert time.perf_counter() - start < 5  # seconds; only a guard against a hang
    # and it finds what there is: the leftmost start, longest match
    assert [(s, e) for s, e, _, _ in sel.find_edits(b"a" * 300 + b"b")] == [(100, 301)]


def test_several_literals_of_which_one_occurs_are_replaced_in_c_as_found() -> None:
    """The engine's same-length path: when one of several literals occurs, bytes.replace makes
    the same edits the leftmost-first search finds (and none when none occurs)."""
    from nfrewrite.core.engine import Engine
    from nfrewrite.core.packet import TcpPacket, parse
    from nfrewrite.core.rules import RuleSet
    from nfrewrite.core.seqadj import FlowTable
    from tests.test_stream import segment

    reps = (Replace(b"aba", b"XYZ", 1, 1), Replace(b"bab", b"QRS", 1, 1),
            Replace(b"zz", b"ZZ", 1, 1))
    rules = RuleSet([Rule("r", 0, "r", 1, 1, Match(), reps, HeaderSet(), "accept", ())])
    sel = rules.select(4, bytes(4), bytes(4), 40000, 80)
    for text in (b"ababababa", b"xxababa zz", b"babab", b"nothing", b"zzz abab"):
        res = Engine(rules, FlowTable()).process(segment(4, 1000, text), now=1.0)
        out = text
        if res.packet is not None:
            pkt = parse(res.packet)
            assert isinstance(pkt, TcpPacket)
            out = pkt.payload
        want = bytearray(text)
        for s, e, w, _ in sel.find_edits(text):
            want[s:e] = w
        assert out == bytes(want), text
