"""The compiled ruleset: which rules a packet gets, and where their replaces apply.

Sentences from the rules module docstring, each proved here: rules apply in order (file name, then
position); all patterns are searched in one pass over the original payload; the leftmost match wins,
ties go to rule order; matches never overlap; a replacement's output is never searched again.
"""

from __future__ import annotations

import gc
import ipaddress
import pickle
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from nfrewrite.config.rulefiles import load_rules
from nfrewrite.core import rules as rules_module
from nfrewrite.core.engine import Engine
from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, RuleSet, Selection
from nfrewrite.core.seqadj import FlowTable

V4_A = ipaddress.IPv4Address("10.1.2.3").packed
V4_B = ipaddress.IPv4Address("192.0.2.9").packed
V6_A = ipaddress.IPv6Address("2001:db8::1").packed
V6_B = ipaddress.IPv6Address("2001:db8:ffff::2").packed


def rule(name: str, index: int, *finds: tuple[bytes, bytes], match: Match | None = None) -> Rule:
    return Rule(
        name=name, index=index, path="t.toml", line=index + 1, col=1, match=match or Match(),
        replaces=tuple(Replace(f, w, index + 1, 1) for f, w in finds), set=HeaderSet(),
        verdict="accept", examples=(),
    )


def load(tmp_path: Path, **files: str) -> RuleSet:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / f"{name}.toml").write_text(text)
    ruleset, diags = load_rules(str(d))
    assert ruleset is not None, [x.format() for x in diags]
    return ruleset


# -- loading into the compiled shape ---------------------------------------------------------


def test_rules_are_ordered_by_file_name_then_position(tmp_path: Path) -> None:
    rs = load(
        tmp_path,
        b='[[rule]]\nname = "b1"\nset = { ttl = 1 }\n[[rule]]\nname = "b2"\nset = { ttl = 2 }\n',
        a='\n[[rule]]\nname = "a1"\nset = { ttl = 3 }\n',
    )
    assert [(r.name, r.index) for r in rs.rules] == [("a1", 0), ("b1", 1), ("b2", 2)]
    assert [(Path(r.path).name, r.line, r.col) for r in rs.rules] == [
        ("a.toml", 2, 1), ("b.toml", 1, 1), ("b.toml", 4, 1)]
    assert [Path(f).name for f in rs.files] == ["a.toml", "b.toml"]


def test_a_rule_compiles_to_bytes_ranges_and_networks(tmp_path: Path) -> None:
    rs = load(tmp_path, x="""
[[rule]]
name = "x"
match = { sport = [80, "8000-8080"], dst = ["10.0.0.0/8", "2001:db8::/32"], in_port = "eth1" }
replace = [ { find = "Server: nginx", with = "Server: web" }, { find_hex = "de ad", with = "é" } ]
set = { dscp = 10, mss_max = 1360 }
examples = [ { input = "a", output_hex = "00ff" } ]
""")
    [r] = rs.rules
    assert r.match.sport == ((80, 80), (8000, 8080))
    assert r.match.dport is None
    assert r.match.dst == tuple(map(ipaddress.ip_network, ["10.0.0.0/8", "2001:db8::/32"]))
    assert r.match.in_port == "eth1"
    assert [(x.find, x.with_) for x in r.replaces] == [
        (b"Server: nginx", b"Server: web"), (b"\xde\xad", "é".encode())]
    assert (r.replaces[0].line, r.replaces[0].col) == (5, 13)
    assert r.set == HeaderSet(dscp=10, mss_max=1360)
    assert r.verdict == "accept"
    assert [(e.input, e.output, e.line, e.col) for e in r.examples] == [(b"a", b"\x00\xff", 7, 14)]


def test_length_changing_replace_is_an_error_when_the_daemon_forbids_it(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "x.toml").write_text(
        '[[rule]]\nname = "x"\nreplace = [ { find = "abc", with = "abcd" }, '
        '{ find = "xyz", with = "XYZ" } ]\n'
    )
    ruleset, diags = load_rules(str(d), allow_length_change=False)
    assert ruleset is None
    assert [(d.line, d.col, d.severity) for d in diags] == [(3, 36, "error")]
    assert diags[0].message.startswith("length-changing replace is not supported yet")
    ruleset, diags = load_rules(str(d))  # the default allows it
    assert ruleset is not None and diags == []


def test_the_shipped_examples_hold_under_the_replace_semantics() -> None:
    rules_dir = Path(__file__).resolve().parent.parent / "rules"
    ruleset, _ = load_rules(str(rules_dir))
    assert ruleset is not None
    checked = 0
    for r in ruleset.rules:
        for ex in r.examples:
            out, last = bytearray(), 0
            for start, end, with_, _rule in Selection((r,)).find_edits(ex.input):
                out += ex.input[last:start] + with_
                last = end
            out += ex.input[last:]
            assert bytes(out) == ex.output, (r.name, ex.line)
            checked += 1
    assert checked >= 3


def test_an_empty_rules_dir_is_a_warning_not_an_error(tmp_path: Path) -> None:
    ruleset, diags = load_rules(str(tmp_path))
    assert ruleset is not None and len(ruleset) == 0
    assert [d.severity for d in diags] == ["warning"]


def test_the_ruleset_is_immutable(tmp_path: Path) -> None:
    rs = RuleSet([rule("a", 0)])
    with pytest.raises(AttributeError):
        setattr(rs, "_rules", ())  # noqa: B010 - the point is to try
    with pytest.raises(AttributeError):
        setattr(rs, "rules", ())  # noqa: B010


def test_a_ruleset_survives_pickling_for_worker_processes() -> None:
    rules_dir = Path(__file__).resolve().parent.parent / "rules"
    ruleset, _ = load_rules(str(rules_dir))
    assert ruleset is not None
    copy = pickle.loads(pickle.dumps(ruleset))
    assert copy.rules == ruleset.rules and copy.files == ruleset.files
    packet = (4, V4_A, V4_B, 80, 1234)
    assert copy.select(*packet).rules == ruleset.select(*packet).rules


# -- matching ----------------------------------------------------------------------------------


def test_match_ports_ranges_lists_and_bridge_ports() -> None:
    m = Match(sport=((80, 80), (8000, 8080)), in_port="eth1")
    assert m.matches(4, V4_A, V4_B, 80, 1234, "eth1", None)
    assert m.matches(4, V4_A, V4_B, 8080, 1234, "eth1", "eth2")
    assert not m.matches(4, V4_A, V4_B, 8081, 1234, "eth1", None)
    assert not m.matches(4, V4_A, V4_B, 80, 1234, "eth2", None)
    assert not m.matches(4, V4_A, V4_B, 80, 1234, None, None)


def test_match_addresses_by_family() -> None:
    m = Match(src=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/48")))
    assert m.matches(4, V4_A, V4_B, 1, 2, None, None)
    assert not m.matches(4, V4_B, V4_A, 1, 2, None, None)
    assert m.matches(6, V6_A, V6_B, 1, 2, None, None)
    assert not m.matches(6, V6_B, V6_A, 1, 2, None, None)
    assert m.versions == {4, 6}
    assert Match(dst=(ipaddress.ip_network("::/0"),)).versions == {6}


def test_select_returns_only_matching_rules_in_order() -> None:
    net = (ipaddress.ip_network("10.0.0.0/8"),)
    rules = [
        rule("http", 0, match=Match(sport=((80, 80),))),
        rule("any", 1),
        rule("to-10", 2, match=Match(dst=net)),
        rule("high", 3, match=Match(dport=((1024, 65535),))),
        rule("ssh", 4, match=Match(dport=((22, 22),))),
        rule("v6", 5, match=Match(src=(ipaddress.ip_network("::/0"),))),
    ]
    rs = RuleSet(rules)

    def names(version: int, src: bytes, dst: bytes, sport: int, dport: int) -> list[str]:
        return [r.name for r in rs.select(version, src, dst, sport, dport).rules]

    assert names(4, V4_B, V4_A, 80, 40000) == ["http", "any", "to-10", "high"]
    assert names(4, V4_A, V4_B, 80, 40000) == ["http", "any", "high"]
    assert names(4, V4_A, V4_B, 40000, 22) == ["any", "ssh"]
    assert names(6, V6_A, V6_B, 40000, 22) == ["any", "ssh", "v6"]
    for args in [(4, V4_B, V4_A, 80, 40000), (6, V6_A, V6_B, 5, 6), (4, V4_A, V4_B, 1, 2)]:
        expected = [r.name for r in rules if r.match.matches(*args, None, None)]
        assert names(*args) == expected


def test_selections_are_shared_per_candidate_set() -> None:
    rs = RuleSet([rule("http", 0, (b"a", b"b"), match=Match(sport=((80, 80),)))])
    one = rs.select(4, V4_A, V4_B, 80, 1000)
    assert rs.select(4, V4_B, V4_A, 80, 2000) is one
    assert rs.select(6, V6_A, V6_B, 80, 3000) is one
    assert rs.select(4, V4_A, V4_B, 81, 1000).rules == ()


def test_select_agrees_with_match_on_a_grid_of_packets() -> None:
    nets = [None, (ipaddress.ip_network("10.0.0.0/8"),), (ipaddress.ip_network("2001:db8::/32"),)]
    ports = [None, ((80, 80),), ((22, 22), (80, 80)), ((1000, 2000),)]
    rules: list[Rule] = []
    for src in nets:
        for sp in ports:
            for dp in ports:
                for in_port in (None, "eth1"):
                    i = len(rules)
                    rules.append(rule(f"r{i}", i, match=Match(sport=sp, dport=dp, src=src,
                                                              in_port=in_port)))
    rs = RuleSet(rules)
    addrs = [(4, V4_A, V4_B), (4, V4_B, V4_A), (6, V6_A, V6_B), (6, V6_B, V6_A)]
    for version, src_a, dst_a in addrs:
        for sport in (22, 80, 1500, 3000):
            for dport in (22, 80, 1500, 3000):
                for port in (None, "eth1", "eth2"):
                    got = rs.select(version, src_a, dst_a, sport, dport, port, None).rules
                    want = tuple(r for r in rules if r.match.matches(
                        version, src_a, dst_a, sport, dport, port, None))
                    assert got == want
                    assert got  # the catch-all rule r0 always matches


# -- find_edits --------------------------------------------------------------------------------


def edits(sel: Selection, payload: bytes) -> list[tuple[int, int, bytes, str]]:
    return [(s, e, w, r.name) for s, e, w, r in sel.find_edits(payload)]


def test_every_occurrence_is_found_with_a_single_pattern() -> None:
    sel = Selection((rule("a", 0, (b"ab", b"X")),))
    assert edits(sel, b"abab-ab") == [(0, 2, b"X", "a"), (2, 4, b"X", "a"), (5, 7, b"X", "a")]
    assert edits(sel, b"nothing") == []
    assert sel.has_replaces and not Selection((rule("b", 1),)).has_replaces
    assert sel.find_edits(bytearray(b"-ab")) == [(1, 3, b"X", sel.rules[0])]


def test_leftmost_match_wins_then_rule_order() -> None:
    sel = Selection((rule("first", 0, (b"bcd", b"1")), rule("second", 1, (b"abc", b"2"),
                                                                    (b"bc", b"3"))))
    # "abc" starts further left than "bcd", so the later rule wins there.
    assert edits(sel, b"abcd") == [(0, 3, b"2", "second")]
    # At one position the earlier rule wins, even with a shorter pattern.
    sel2 = Selection((rule("short", 0, (b"ab", b"1")), rule("long", 1, (b"abc", b"2"))))
    assert edits(sel2, b"abc") == [(0, 2, b"1", "short")]
    # Within a rule, list order.
    sel3 = Selection((rule("r", 0, (b"ab", b"1"), (b"abc", b"2")),))
    assert edits(sel3, b"abc") == [(0, 2, b"1", "r")]


def test_matches_do_not_overlap_and_output_is_never_searched() -> None:
    sel = Selection((rule("a", 0, (b"aa", b"a")), rule("b", 1, (b"ab", b"aa"))))
    assert edits(sel, b"aaab") == [(0, 2, b"a", "a"), (2, 4, b"aa", "b")]
    loop = Selection((rule("grow", 0, (b"x", b"xx")),))
    assert edits(loop, b"xx") == [(0, 1, b"xx", "grow"), (1, 2, b"xx", "grow")]


def test_regex_metacharacters_are_literal() -> None:
    sel = Selection((rule("a", 0, (b".*", b"!")), rule("b", 1, (b"(\n)", b"?"))))
    assert edits(sel, b"a.*b(\n)") == [(1, 3, b"!", "a"), (4, 7, b"?", "b")]


def reference(rules: list[Rule], payload: bytes) -> list[tuple[int, int, bytes, str]]:
    """The documented semantics, written the slow obvious way."""
    pats = [(rp.find, rp.with_, r.name) for r in rules for rp in r.replaces]
    out = []
    i = 0
    while i < len(payload):
        for find, with_, name in pats:
            if payload.startswith(find, i):
                out.append((i, i + len(find), with_, name))
                i += len(find)
                break
        else:
            i += 1
    return out


small = st.binary(min_size=1, max_size=3).map(lambda b: bytes(x % 3 + 97 for x in b))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(small, min_size=1, max_size=3), min_size=1, max_size=4),
       st.binary(max_size=40).map(lambda b: bytes(x % 4 + 97 for x in b)))
def test_find_edits_equals_the_reference_semantics(
    finds: list[list[bytes]], payload: bytes
) -> None:
    rules = [rule(f"r{i}", i, *[(f, f.upper()) for f in fs]) for i, fs in enumerate(finds)]
    assert edits(Selection(tuple(rules)), payload) == reference(rules, payload)


# -- selection index and cache -----------------------------------------------------------------

PORT_POINTS = (0, 1, 2, 21, 22, 79, 80, 81, 443, 1023, 1024, 8080, 65534, 65535)
NETS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.0.2.0/24",
    "::/0", "2001:db8::/32", "2001:db8::1/128", "2001:db8:ffff::/48"))
ADDRESSES = ((4, V4_A, V4_B), (4, V4_B, V4_A), (4, V4_A, V4_A),
             (6, V6_A, V6_B), (6, V6_B, V6_A), (6, V6_B, V6_B))
BRIDGE = (None, "eth1", "eth2", "eth3")

port_range = st.tuples(st.sampled_from(PORT_POINTS), st.sampled_from(PORT_POINTS)).map(
    lambda t: (min(t), max(t)))
port_cond = st.none() | st.lists(port_range, min_size=1, max_size=3).map(tuple)
net_cond = st.none() | st.lists(st.sampled_from(NETS), min_size=1, max_size=3).map(tuple)
name_cond = st.sampled_from((None, None, "eth1", "eth2"))
matches = st.builds(Match, sport=port_cond, dport=port_cond, src=net_cond, dst=net_cond,
                    in_port=name_cond, out_port=name_cond)
packets = st.tuples(st.sampled_from(ADDRESSES), st.sampled_from(PORT_POINTS),
                    st.sampled_from(PORT_POINTS), st.sampled_from(BRIDGE),
                    st.sampled_from(BRIDGE))


class TinyCache(RuleSet):
    """Caches so small that almost every lookup evicts: the results must not change."""

    GROUP_CACHE = 3
    SELECTION_CACHE = 2
    CACHE_BYTES = 2000


def brute_force(rules: list[Rule], version: int, src: bytes, dst: bytes, sport: int, dport: int,
                in_port: str | None, out_port: str | None) -> tuple[Rule, ...]:
    """The rules that apply, the slow obvious way: every rule, in rule order."""
    return tuple(r for r in sorted(rules, key=lambda r: r.index)
                 if r.match.matches(version, src, dst, sport, dport, in_port, out_port))


@settings(max_examples=400, deadline=None)
@given(st.lists(matches, max_size=12), st.randoms(use_true_random=False),
       st.lists(packets, min_size=1, max_size=30), st.sampled_from([1, 1 << 20]))
def test_select_equals_a_brute_force_reference(
    match_list: list[Match], rng: random.Random,
    traffic: list[tuple[tuple[int, bytes, bytes], int, int, str | None, str | None]],
    index_bytes: int,
) -> None:
    rules = [rule(f"r{i}", i, match=m) for i, m in enumerate(match_list)]
    given_order = rules[:]
    rng.shuffle(given_order)  # rule order is the index, whatever order they are given in
    # index_bytes = 1: the port index keeps only its first interval's mask, rebuilding the rest
    with mock.patch.object(rules_module, "INDEX_BYTES", index_bytes):
        sets = [RuleSet(given_order), TinyCache(given_order)]
    for _ in range(2):  # the second pass is served from the caches (what is left of them)
        for (version, src, dst), sport, dport, in_port, out_port in traffic:
            want = brute_force(rules, version, src, dst, sport, dport, in_port, out_port)
            for rs in sets:
                assert rs.select(version, src, dst, sport, dport, in_port, out_port).rules == want
    assert sets[1].cache_info()["groups"] <= TinyCache.GROUP_CACHE


def test_the_source_port_is_no_key_when_no_rule_matches_on_it() -> None:
    rs = RuleSet([
        rule("web", 0, match=Match(dport=((80, 80), (443, 443)))),
        rule("high", 1, match=Match(dport=((1024, 65535),))),
        rule("any", 2),
        rule("to-10", 3, match=Match(dst=(ipaddress.ip_network("10.0.0.0/8"),))),
    ])
    first = rs.select(4, V4_B, V4_A, 0, 80)
    for sport in range(65536):
        assert rs.select(4, V4_B, V4_A, sport, 80) is first
    assert [r.name for r in first.rules] == ["web", "any", "to-10"]
    assert rs.cache_info()["groups"] == 1


def test_ports_in_one_interval_and_unused_bridge_ports_share_a_cache_entry() -> None:
    rs = RuleSet([
        rule("range", 0, match=Match(dport=((1000, 2000),))),
        rule("from-eth1", 1, match=Match(in_port="eth1")),
    ])
    for dport in range(1000, 2001):
        for in_port in (None, "eth2", "eth3", "veth-x"):
            assert [r.name for r in rs.select(6, V6_A, V6_B, 5, dport, in_port).rules] == [
                "range"]
    assert rs.cache_info()["groups"] == 1
    assert [r.name for r in rs.select(6, V6_A, V6_B, 5, 2000, "eth1").rules] == [
        "range", "from-eth1"]
    assert rs.select(6, V6_A, V6_B, 5, 2001, "eth1").rules == rs.rules[1:]
    assert rs.cache_info()["groups"] == 3


def _held_bytes(action: Callable[[], object]) -> int:
    """Bytes allocated by ``action`` and still held afterwards."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_port_less_rules_cost_one_cache_entry_for_all_pairs() -> None:
    rs = RuleSet([rule(f"r{i}", i, (b"x%d" % i, b"y%d" % i)) for i in range(1000)])

    def traffic() -> None:
        for sport in range(65536):
            assert len(rs.select(4, V4_A, V4_B, sport, 80 + sport % 7).rules) == 1000

    held = _held_bytes(traffic)
    assert rs.cache_info()["groups"] == 1
    assert held < 1 << 20, held


class FewKeys(RuleSet):
    GROUP_CACHE = 100
    SELECTION_CACHE = 50


def test_the_cache_holds_at_most_its_number_of_entries_whatever_the_traffic() -> None:
    rules = [rule(f"d{i}", 2 * i, match=Match(dport=((7 * i, 7 * i),))) for i in range(500)]
    rules += [rule(f"s{i}", 2 * i + 1, match=Match(sport=((100 * i, 100 * i + 150),)))
              for i in range(500)]
    rs = FewKeys(rules)
    rng = random.Random(7)
    for _ in range(3000):
        sport, dport = rng.randrange(65536), rng.randrange(4000)
        got = rs.select(4, V4_A, V4_B, sport, dport).rules
        assert got == brute_force(rules, 4, V4_A, V4_B, sport, dport, None, None)
        info = rs.cache_info()
        assert info["groups"] <= FewKeys.GROUP_CACHE
        assert info["selections"] <= FewKeys.SELECTION_CACHE


class SmallCache(RuleSet):
    CACHE_BYTES = 1 << 20


def test_the_cache_stays_within_its_byte_bound_whatever_the_traffic() -> None:
    # 300 rules for every packet and 1,000 on one destination port each: ~2,000 port classes,
    # each with its own Selection of ~300 rules and patterns (~25 KB): ~50 MB if all were kept
    everywhere = [rule(f"all{i}", i, (b"x%d" % i, b"y%d" % i)) for i in range(300)]
    one_port = [rule(f"port{p}", 300 + p, match=Match(dport=((3 * p, 3 * p),)))
                for p in range(1000)]
    rs = SmallCache(everywhere + one_port)
    peak = 0

    def traffic() -> None:
        nonlocal peak
        for dport in range(3000):
            sel = rs.select(4, V4_A, V4_B, 1234, dport)
            assert len(sel.rules) == 300 + (dport % 3 == 0)
            peak = max(peak, rs.cache_info()["bytes"])

    held = _held_bytes(traffic)
    assert peak <= SmallCache.CACHE_BYTES
    assert held < 2 * SmallCache.CACHE_BYTES, held  # the estimate is not far off the real bytes
    info = rs.cache_info()
    assert 0 < info["selections"] < 1000 and info["groups"] <= RuleSet.GROUP_CACHE


class FewSelections(RuleSet):
    SELECTION_CACHE = 8


def test_an_engine_keeps_no_selection_alive_past_the_ruleset_cache() -> None:
    # 100 rules on a destination port each: 100 distinct Selections, the cache keeps at most 8;
    # the engine must not keep the others (what each one needs is on the Selection itself)
    rs = FewSelections([rule(f"p{p}", p, (b"ab", b"xy"), match=Match(dport=((1000 + p,) * 2,)))
                        for p in range(100)])
    engine = Engine(rs, FlowTable())
    for p in range(100):
        raw = bytes(IP(src="198.18.0.2", dst="198.18.0.1")
                    / TCP(sport=5555, dport=1000 + p, flags="PA") / Raw(b"-ab-"))
        res = engine.process(raw)
        assert res.rules == (f"p{p}",) and res.packet is not None and b"-xy-" in res.packet
    gc.collect()
    alive = sum(isinstance(o, Selection) for o in gc.get_objects())
    assert alive <= FewSelections.SELECTION_CACHE, alive


def test_a_selection_knows_whether_its_replaces_change_lengths() -> None:
    same = Selection((rule("a", 0, (b"ab", b"xy")), rule("b", 1, (b"c", b"d"))))
    grows = Selection((rule("a", 0, (b"ab", b"xy")), rule("b", 1, (b"c", b"ddd"), (b"e", b""))))
    shrinks = Selection((rule("a", 0, (b"abc", b"x")),))
    assert (same.same_length, same.max_growth) == (True, 0)
    assert (grows.same_length, grows.max_growth) == (False, 2)
    assert (shrinks.same_length, shrinks.max_growth) == (False, 0)
    assert (Selection(()).same_length, Selection(()).max_growth) == (True, 0)
