"""The engine applies rule files to packets: what the README says a rule does, it does.

Pure tests (no kernel): rules are loaded from real files, packets crafted by scapy, results checked
by scapy recomputing checksums.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Unpack

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from nfrewrite.config.rulefiles import load_rules
from nfrewrite.core.constants import ACCEPT, DROP
from nfrewrite.core.engine import Engine
from nfrewrite.core.packet import NOT_TCP, TcpPacket, parse
from nfrewrite.core.rules import RuleSet
from nfrewrite.core.seqadj import FlowTable
from tests.packets import TcpFields, field_error, scapy_tcp_checksum


def ruleset(tmp_path: Path, text: str) -> RuleSet:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / "r.toml").write_text(textwrap.dedent(text))
    rs, diags = load_rules(str(d))
    assert rs is not None, [x.format() for x in diags]
    return rs


HTTP = """
[[rule]]
name = "server"
match = { sport = 80 }
replace = [ { find = "Server: nginx", with = "Server: webby" } ]
"""


def _v4(
    payload: bytes, sport: int = 80, dport: int = 40000, **kw: Unpack[TcpFields]
) -> bytes:
    return bytes(
        IP(src="198.18.0.2", dst="198.18.0.1") / TCP(sport=sport, dport=dport, **kw) / Raw(payload)
    )


def _ok(raw: bytes) -> None:
    pkt = (IP if raw[0] >> 4 == 4 else IPv6)(raw)
    assert field_error(pkt[TCP].chksum, scapy_tcp_checksum(raw)) == 0


def test_same_length_replace_in_both_families(tmp_path: Path) -> None:
    engine = Engine(ruleset(tmp_path, HTTP), FlowTable())
    for ip in (IP(src="198.18.0.2", dst="198.18.0.1"), IPv6(src="2001:2::2", dst="2001:2::1")):
        raw = bytes(ip / TCP(sport=80, dport=5555, flags="PA") / Raw(b"a\r\nServer: nginx\r\n"))
        res = engine.process(raw)
        assert res.verdict == ACCEPT and res.rules == ("server",) and not res.track
        assert res.packet is not None
        got = (IP if ip.version == 4 else IPv6)(res.packet)
        assert got[Raw].load == b"a\r\nServer: webby\r\n"
        _ok(res.packet)


def test_traffic_no_rule_matches_passes_untouched(tmp_path: Path) -> None:
    engine = Engine(ruleset(tmp_path, HTTP), FlowTable())
    res = engine.process(_v4(b"Server: nginx", sport=81))
    assert res.verdict == ACCEPT and res.packet is None and res.rules == ()
    res = engine.process(_v4(b"nothing to see"))
    assert res.packet is None


def test_unparsed_packets_pass_with_a_reason(tmp_path: Path) -> None:
    engine = Engine(ruleset(tmp_path, HTTP), FlowTable())
    res = engine.process(bytes(IP(proto=17) / Raw(b"x" * 20)))
    assert (res.verdict, res.packet, res.unparsed) == (ACCEPT, None, NOT_TCP)


def test_drop_verdict_and_header_sets(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rule]]
        name = "no-telnet"
        match = { dport = 23 }
        verdict = "drop"

        [[rule]]
        name = "normalise"
        match = { dport = 443 }
        set = { ttl = 64, hop_limit = 65, dscp = 10, mss_max = 1400, window = 1000 }
        """,
    )
    engine = Engine(rs, FlowTable())
    res = engine.process(_v4(b"", sport=1, dport=23))
    assert res.verdict == DROP and res.rules == ("no-telnet",)
    syn = bytes(
        IP(src="198.18.0.1", dst="198.18.0.2", ttl=3, tos=1)
        / TCP(sport=2, dport=443, flags="S", options=[("MSS", 1460)])
    )
    res = engine.process(syn)
    assert res.packet is not None and res.rules == ("normalise",)
    got = IP(res.packet)
    assert (got.ttl, got.tos, got[TCP].window) == (64, (10 << 2) | 1, 1000)
    assert dict(got[TCP].options)["MSS"] == 1400
    _ok(res.packet)
    syn6 = bytes(IPv6(src="2001:2::1", dst="2001:2::2", hlim=9) / TCP(sport=2, dport=443))
    res = engine.process(syn6)
    assert res.packet is not None and IPv6(res.packet).hlim == 65


def test_length_change_creates_a_flow_and_maps_the_other_direction(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path,
        """
        [[rule]]
        name = "grow"
        match = { sport = 80 }
        replace = [ { find = "nginx", with = "a-much-longer-name" } ]
        """,
    )
    flows = FlowTable()
    engine = Engine(rs, flows)
    body = b"Server: nginx\r\n"
    res = engine.process(_v4(body, seq=1000, ack=5000, flags="PA"), now=1.0)
    assert res.packet is not None and res.track and res.rules == ("grow",)
    grown = len(b"a-much-longer-name") - len(b"nginx")
    assert IP(res.packet)[Raw].load == b"Server: a-much-longer-name\r\n"
    _ok(res.packet)
    assert len(flows) == 1
    # the client acknowledges the rewritten stream; the server must see its own numbering
    ack = bytes(
        IP(src="198.18.0.1", dst="198.18.0.2")
        / TCP(sport=40000, dport=80, flags="A", seq=5000, ack=1000 + len(body) + grown)
    )
    res = engine.process(ack, now=1.1)
    assert res.track and res.packet is not None
    assert IP(res.packet)[TCP].ack == 1000 + len(body)
    _ok(res.packet)
    # the server's next segment moves by the offset
    res = engine.process(_v4(b"more", seq=1000 + len(body), ack=5000, flags="PA"), now=1.2)
    assert res.packet is not None and IP(res.packet)[TCP].seq == 1000 + len(body) + grown
    _ok(res.packet)


def test_corrupt_input_stays_corrupt_through_a_rewrite(tmp_path: Path) -> None:
    engine = Engine(ruleset(tmp_path, HTTP), FlowTable())
    raw = bytearray(_v4(b"Server: nginx"))
    raw[36] ^= 0x55  # damage the TCP checksum field
    before = field_error(IP(bytes(raw))[TCP].chksum, scapy_tcp_checksum(bytes(raw)))
    res = engine.process(bytes(raw))
    assert res.packet is not None
    after = field_error(IP(res.packet)[TCP].chksum, scapy_tcp_checksum(res.packet))
    assert before == after != 0


def test_syn_of_a_connection_whose_replies_grow_announces_a_lower_mss(tmp_path: Path) -> None:
    """Rules that grow server->client segments: the client's SYN leaves room for the growth, so
    grown segments fit the MTU instead of being cut (and retransmitted)."""
    rs = ruleset(
        tmp_path,
        """
        [[rule]]
        name = "grow"
        match = { sport = 8080 }
        replace = [ { find = "nginx", with = "a-much-longer-name" } ]
        """,
    )
    engine = Engine(rs, FlowTable())
    syn = bytes(
        IP(src="198.18.0.1", dst="198.18.0.2")
        / TCP(sport=40000, dport=8080, flags="S", options=[("MSS", 1460), ("SAckOK", b"")])
    )
    res = engine.process(syn)
    assert res.packet is not None and res.rules == ()
    assert dict(IP(res.packet)[TCP].options)["MSS"] == 1460 - 128
    _ok(res.packet)
    # the other direction's SYN-ACK is not touched: nothing grows what the client sends
    synack = bytes(
        IP(src="198.18.0.2", dst="198.18.0.1")
        / TCP(sport=8080, dport=40000, flags="SA", options=[("MSS", 1460)])
    )
    assert engine.process(synack).packet is None


def test_the_prefilter_queues_the_syns_that_announce_the_mss_for_growing_rules(
    tmp_path: Path,
) -> None:
    from nfrewrite.kernel.prefilter import compile_prefilter

    rs = ruleset(
        tmp_path,
        """
        [[rule]]
        name = "grow"
        match = { sport = 8080, in_port = "nfr1" }
        replace = [ { find = "a", with = "bb" } ]
        """,
    )
    v4, _ = compile_prefilter(rs)
    syn = [m for m in v4 if m.syn_only]
    assert len(syn) == 1
    assert syn[0].dports == ((8080, 8080),) and syn[0].sports is None
    assert syn[0].out_port == "nfr1" and syn[0].in_port is None


GROW_SHRINK = """
[[rule]]
name = "s2c"
match = { sport = 8080 }
replace = [ { find = "UP", with = "[[up-up-up-up]]" }, { find = "DOWN-DOWN-DOWN", with = "_" } ]
"""


def _rewritten(data: bytes) -> bytes:
    return data.replace(b"UP", b"[[up-up-up-up]]").replace(b"DOWN-DOWN-DOWN", b"_")


def _v6(payload: bytes, seq: int, flags: str = "PA") -> bytes:
    return bytes(IPv6(src="2001:2::2", dst="2001:2::1")
                 / TCP(sport=8080, dport=40000, seq=seq, ack=5000, flags=flags) / Raw(payload))


def test_a_super_packet_that_would_grow_past_what_a_verdict_carries_is_cut_not_left_unedited(
    tmp_path: Path,
) -> None:
    """A GSO super-packet (longer than the MTU) whose growing edits outnumber its shrinking ones
    enough to pass 65,531 bytes: every occurrence in it is still rewritten. It is cut at an edit
    boundary, the rest comes again as a retransmission and gets the same edits; together they
    are the whole stream rewritten. (Before: all its length-changing edits were left out, ~400
    occurrences passing unedited in ~1 of 5 dense 2 MB runs.)"""
    flows = FlowTable()
    engine = Engine(ruleset(tmp_path, GROW_SHRINK), flows, mtu=1500)
    chunk = b"abcdefghij" * 40
    data = (chunk + b"UP") * 120 + (chunk + b"DOWN-DOWN-DOWN") * 20
    data = (data + b"z" * 65000)[:65000]
    assert len(_rewritten(data)) - len(data) > 65531 - 65060  # past the limit by far
    res = engine.process(_v6(data, seq=1000), now=1.0, csum_partial=None)
    assert res.verdict == ACCEPT and res.track and res.packet is not None
    assert len(res.packet) <= 65531
    _ok(res.packet)
    first = IPv6(res.packet)
    kept = first[Raw].load
    assert first[TCP].seq == 1000 and len(kept) > 60000
    assert flows.stats()["segments_cut"] == 1  # exported as nfrewrite_seqadj_segments_cut_total
    assert _rewritten(data).startswith(kept)
    consumed = len(kept.replace(b"[[up-up-up-up]]", b"UP").replace(b"_", b"DOWN-DOWN-DOWN"))
    # the receiver acknowledges what it got; the sender sends the rest again (here, whole)
    res = engine.process(_v6(data[consumed:], seq=1000 + consumed), now=1.1, csum_partial=None)
    assert res.packet is not None
    _ok(res.packet)
    second = IPv6(res.packet)
    assert second[TCP].seq == 1000 + len(kept)
    assert kept + second[Raw].load == _rewritten(data)


def test_without_a_flow_table_edits_that_would_not_fit_a_verdict_are_left_out(
    tmp_path: Path,
) -> None:
    engine = Engine(ruleset(tmp_path, GROW_SHRINK), None, mtu=1500)
    data = ((b"x" * 100 + b"UP") * 700)[:65000]
    assert engine.process(_v6(data, seq=1000), csum_partial=None).packet is None
    small = engine.process(_v6(b"a UP b", seq=1000)).packet
    assert small is not None and IPv6(small)[Raw].load == b"a [[up-up-up-up]] b"


def test_a_packet_that_came_longer_than_a_verdict_carries_is_never_handed_back(
    tmp_path: Path,
) -> None:
    """A GRO packet may be 65,535 bytes: changed but not shrunk it cannot go back through the
    queue (the kernel would send the original instead). A same-length edit then lets the
    original pass (valid as it is); in a connection with offsets it is dropped (the original
    would be stale data at stale sequence numbers), and the sender retransmits."""
    engine = Engine(ruleset(tmp_path, HTTP + GROW_SHRINK), FlowTable(), mtu=1500)
    big = b"Server: nginx" + b"q" * (65535 - 40 - 13)
    assert len(_v4(big)) == 65535
    res = engine.process(_v4(big, sport=80, seq=1, flags="PA"), csum_partial=None)
    assert (res.verdict, res.packet, res.track) == (ACCEPT, None, False)
    res = engine.process(_v6(b"UP", seq=1000), now=1.0)  # the flow gets an offset
    assert res.track and res.packet is not None
    huge = b"z" * (65535 - 60)
    res = engine.process(_v6(huge, seq=1002), now=1.1, csum_partial=None)
    assert (res.verdict, res.packet, res.track) == (DROP, None, True)
    # a SYN cannot be cut: one whose growth would not fit a verdict passes unedited, no flow
    # begins (found by the fuzzer: the engine asserted that a new flow's first segment fits)
    flows = FlowTable()
    engine = Engine(ruleset(tmp_path, GROW_SHRINK), flows, mtu=1500)
    data = (b"UP" + b"x" * 98) * 654 + b"x" * 75  # a 65,535-byte packet with 654 of them
    syn = bytes(IPv6(src="2001:2::2", dst="2001:2::1")
                / TCP(sport=8080, dport=40001, seq=7, flags="S") / Raw(data))
    res = engine.process(syn, csum_partial=None)
    assert (res.verdict, res.packet, res.track) == (ACCEPT, None, False)
    assert flows.stats()["flows_created"] == len(flows) == 0


def test_a_changed_gso_packet_keeps_the_seed_and_a_wire_size_one_gets_a_full_checksum(
    tmp_path: Path,
) -> None:
    """A GSO skb (the kernel says so: NFQA_SKB_GSO) is segmented by the kernel, which sets every
    segment's checksum up itself (tests/test_queue.py shows it on the kernel): the engine writes
    the pseudo-header seed for the new length and skips the 64 KB sum. Told nothing, or told it
    is not GSO, the engine writes a complete checksum as before."""
    engine = Engine(ruleset(tmp_path, GROW_SHRINK), FlowTable(), mtu=1500)
    data = (b"x" * 98 + b"UP") * 300
    raw = _v6(data, seq=1000)
    res = engine.process(raw, csum_partial=True, gso=True, now=1.0)
    assert res.packet is not None
    out = parse(res.packet)
    assert isinstance(out, TcpPacket) and out.payload == _rewritten(data)
    assert int.from_bytes(res.packet[out.l4 + 16 : out.l4 + 18], "big") == out.pseudo_header_seed()
    for gso in (None, False):
        engine = Engine(ruleset(tmp_path, GROW_SHRINK), FlowTable(), mtu=1500)
        res = engine.process(raw, csum_partial=True, gso=gso, now=1.0)
        assert res.packet is not None and IPv6(res.packet)[Raw].load == _rewritten(data)
        _ok(res.packet)
