"""The packet core parses what scapy parses, and every edit leaves checksums that scapy accepts.

scapy is the independent oracle here: packets are crafted by scapy, parsed by both, edited by
nfrewrite, and checked by scapy recomputing the checksums from scratch.
"""

from __future__ import annotations

import random
import struct
from typing import Unpack

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrRouting
from scapy.packet import Raw

from nfrewrite.core import packet as P
from nfrewrite.core.packet import REASONS, TcpPacket, Unparsed, parse
from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, Selection
from tests.packets import (
    Crafted,
    TcpFields,
    field_error,
    pseudo_seed_oracle,
    scapy_ip_checksum,
    scapy_tcp_checksum,
    tcp_packets,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parsed(c: Crafted) -> TcpPacket:
    pkt = parse(c.raw)
    assert isinstance(pkt, TcpPacket), pkt
    return pkt


@SETTINGS
@given(tcp_packets())
def test_parse_agrees_with_scapy(c: Crafted) -> None:
    pkt = _parsed(c)
    tcp = c.pkt[TCP]
    assert pkt.version == c.version
    assert (pkt.sport, pkt.dport) == (tcp.sport, tcp.dport)
    assert (pkt.seq, pkt.ack, pkt.flags, pkt.window) == (
        tcp.seq,
        tcp.ack,
        int(tcp.flags),
        tcp.window,
    )
    assert pkt.urgent == tcp.urgptr
    assert pkt.doff == tcp.dataofs * 4
    assert pkt.payload == c.payload
    assert pkt.tcp_checksum == tcp.chksum
    if c.version == 4:
        ip = c.pkt[IP]
        assert (pkt.ttl, pkt.dscp, pkt.l4) == (ip.ttl, ip.tos >> 2, ip.ihl * 4)
    else:
        ip6 = c.pkt[IPv6]
        assert (pkt.ttl, pkt.dscp) == (ip6.hlim, ip6.tc >> 2)
    opts = dict((k, v) for k, v in tcp.options if k != "SAck")
    assert pkt.mss == opts.get("MSS")
    assert pkt.wscale == opts.get("WScale")
    assert pkt.sack_permitted == ("SAckOK" in opts)
    assert pkt.timestamps == opts.get("Timestamp")
    sack = [v for k, v in tcp.options if k == "SAck"]
    expected_blocks = list(zip(sack[0][::2], sack[0][1::2], strict=True)) if sack else []
    assert pkt.sack_blocks() == expected_blocks
    assert pkt.tcp_checksum_ok() and pkt.ip_checksum_ok()
    assert pkt.compute_tcp_checksum() == tcp.chksum


def _random_edits(pkt: TcpPacket, rnd: random.Random) -> None:
    """Apply a random sequence of every kind of edit the core offers."""
    for _ in range(rnd.randint(1, 6)):
        kind = rnd.choice(
            ("ttl", "dscp", "window", "flags", "mss", "seq", "ack", "payload", "sack")
        )
        if kind == "ttl":
            pkt.set_ttl(rnd.randint(1, 255))
        elif kind == "dscp":
            pkt.set_dscp(rnd.randint(0, 63))
        elif kind == "window":
            pkt.set_window(rnd.randint(0, 65535))
        elif kind == "flags":
            pkt.set_flags(rnd.randint(0, 255))
        elif kind == "mss":
            pkt.clamp_mss(rnd.randint(0, 65535)) if rnd.random() < 0.5 else pkt.set_mss(
                rnd.randint(0, 65535)
            )
        elif kind == "seq":
            pkt.set_seq(rnd.getrandbits(32))
        elif kind == "ack":
            pkt.set_ack(rnd.getrandbits(32))
        elif kind == "sack":
            blocks = pkt.sack_blocks()
            pkt.set_sack_blocks([(rnd.getrandbits(32), rnd.getrandbits(32)) for _ in blocks])
        else:
            n = pkt.payload_len
            edits: list[tuple[int, int, bytes]] = []
            pos = 0
            while pos <= n and len(edits) < 4 and rnd.random() < 0.8:
                start = rnd.randint(pos, n)
                end = rnd.randint(start, min(n, start + 12))
                new = rnd.randbytes(rnd.randint(0, 15))
                edits.append((start, end, new))
                pos = end + 1
            if (
                pkt.payload_len + sum(len(b) - (e - s) for s, e, b in edits) + pkt.l4 + pkt.doff
                < 65000
            ):
                pkt.apply_edits(edits)


@SETTINGS
@given(tcp_packets(), st.randoms(use_true_random=False))
def test_random_edits_leave_checksums_scapy_accepts(c: Crafted, rnd: random.Random) -> None:
    pkt = _parsed(c)
    _random_edits(pkt, rnd)
    out = pkt.finish()
    tcp_field = struct.unpack_from("!H", out, pkt.l4 + 16)[0]
    assert field_error(tcp_field, scapy_tcp_checksum(out)) == 0
    if c.version == 4:
        assert field_error(struct.unpack_from("!H", out, 10)[0], scapy_ip_checksum(out)) == 0
    again = parse(out)
    assert isinstance(again, TcpPacket)
    assert again.tcp_checksum_ok() and again.ip_checksum_ok()
    assert again.payload == pkt.payload


@SETTINGS
@given(tcp_packets(), st.binary(max_size=8), st.integers(0, 2**32 - 1), st.booleans(),
       st.sampled_from(("full", "partial", "kernel_segments")), st.booleans())
def test_the_same_edits_give_the_same_bytes_whatever_buffer_the_packet_was_parsed_from(
        c: Crafted, padding: bytes, seed: int, replace_first: bool, mode: str,
        more: bool) -> None:
    """Copy on write: over ``bytes``, over a memoryview inside a larger ``bytes`` (as the queue
    hands a payload over: where it lies in the netlink datagram) and over a ``bytearray``
    (copied at once), the same edits give the same packet, and the input is never changed.
    Link padding after the datagram is kept; the first edit may be a payload replace (which
    builds the packet's own bytes itself), alone or followed by others; checksums full, partial
    (completed by ``finish``) or left to the kernel's segmentation."""
    raw = c.raw + padding
    partial = mode != "full"
    if partial:  # the field as TX offload leaves it: the pseudo-header seed
        seeded = parse(bytearray(raw))
        assert isinstance(seeded, TcpPacket)
        struct.pack_into("!H", seeded.buf, seeded.l4 + 16, seeded.pseudo_header_seed())
        raw = bytes(seeded.buf)
    datagram = b"\x01" * 20 + raw + b"\x02" * 7
    mutable = bytearray(raw)
    outs = []
    for data in (raw, memoryview(datagram)[20:20 + len(raw)], mutable):
        pkt = parse(data, csum_partial=partial)
        assert isinstance(pkt, TcpPacket)
        if replace_first and pkt.payload_len >= 2:
            pair = pkt.payload[:2]
            pkt.replace_literal(pair, pair[::-1])
        if more or not replace_first:
            _random_edits(pkt, random.Random(seed))
        kernel_segments = mode == "kernel_segments"
        outs.append((pkt.modified, pkt.finish(kernel_segments=kernel_segments), pkt.payload))
        mutable[:] = b"\x00" * len(mutable)  # the owner's later writes do not reach the packet
        assert pkt.finish(kernel_segments=kernel_segments) == outs[-1][1]
        mutable[:] = raw
    assert outs[0] == outs[1] == outs[2]
    assert datagram == b"\x01" * 20 + raw + b"\x02" * 7
    out = outs[0][1]
    again = parse(out)
    assert isinstance(again, TcpPacket)
    assert out[again.end:] == padding  # the link padding stays after the datagram
    if mode == "kernel_segments" and outs[0][0]:
        assert again.tcp_checksum == again.pseudo_header_seed()
    elif mode == "full" or outs[0][0]:
        assert again.tcp_checksum_ok()


def test_a_memoryview_that_is_not_plain_bytes_is_parsed_from_a_copy_never_raising() -> None:
    raw = bytes(IP(src="198.18.0.1", dst="198.18.1.1") / TCP(sport=1, dport=2) / Raw(b"abcd"))
    wide = parse(memoryview(raw).cast("H"))  # 2-byte items: read as the bytes they hold
    assert isinstance(wide, TcpPacket) and isinstance(wide.buf, bytearray)
    assert wide.payload == b"abcd"
    strided = parse(memoryview(raw + raw)[::2])  # not contiguous: every other byte, a copy
    assert isinstance(strided, Unparsed)


def test_an_unchanged_packet_is_read_where_it_lies_and_copied_only_on_the_first_edit() -> None:
    datagram = b"\xff" * 16 + bytes(IP(src="198.18.0.1", dst="198.18.1.1", ttl=64)
                                      / TCP(sport=1, dport=2) / Raw(b"x" * 1000))
    view = memoryview(datagram)[16:]
    pkt = parse(view)
    assert isinstance(pkt, TcpPacket)
    assert pkt.buf is view  # parsed, selected and read without a copy
    assert not pkt.set_ttl(64) and pkt.buf is view  # an edit that changes nothing copies nothing
    assert pkt.set_ttl(63) and isinstance(pkt.buf, bytearray)
    assert datagram[16 + 8] == 64  # the datagram itself is never written


@SETTINGS
@given(tcp_packets(), st.integers(1, 0xFFFE), st.randoms(use_true_random=False))
def test_corruption_is_carried_through_not_laundered(
    c: Crafted, error: int, rnd: random.Random
) -> None:
    raw = bytearray(c.raw)
    pkt0 = _parsed(c)
    off = pkt0.l4 + 16
    bad_field = (pkt0.tcp_checksum + error) % 0xFFFF
    struct.pack_into("!H", raw, off, bad_field)
    pkt = parse(raw)
    assert isinstance(pkt, TcpPacket)
    before = field_error(bad_field, scapy_tcp_checksum(bytes(raw)))
    assert before != 0
    _random_edits(pkt, rnd)
    out = pkt.finish()
    after = field_error(struct.unpack_from("!H", out, off)[0], scapy_tcp_checksum(out))
    assert after == before
    assert not pkt.tcp_checksum_ok()


@SETTINGS
@given(tcp_packets(), st.randoms(use_true_random=False))
def test_partial_checksum_seed_is_completed_on_finish(c: Crafted, rnd: random.Random) -> None:
    """Under TX offload the field holds only the pseudo-header seed; what we hand back is sent as
    CHECKSUM_NONE, so it must carry the complete checksum."""
    pkt0 = _parsed(c)
    seed = pkt0.pseudo_header_seed()
    assert seed == pseudo_seed_oracle(c.raw)
    raw = bytearray(c.raw)
    struct.pack_into("!H", raw, pkt0.l4 + 16, seed)
    pkt = parse(raw, csum_partial=True)
    assert isinstance(pkt, TcpPacket)
    _random_edits(pkt, rnd)
    out = pkt.finish()
    field = struct.unpack_from("!H", out, pkt.l4 + 16)[0]
    assert field_error(field, scapy_tcp_checksum(out)) == 0


@SETTINGS
@given(tcp_packets(), st.randoms(use_true_random=False))
def test_partial_is_recognised_from_the_seed_when_not_told(c: Crafted, rnd: random.Random) -> None:
    """A queue with the GSO flag cannot say which packets are CHECKSUM_PARTIAL: ``parse`` with
    ``csum_partial=None`` takes a field equal to the seed as partial, anything else as complete;
    either way what leaves carries the complete checksum (scapy's)."""
    complete = parse(c.raw, csum_partial=None)
    assert isinstance(complete, TcpPacket)
    # a complete checksum that equals the seed is indistinguishable, and recomputing it is right
    assert complete.csum_partial == (complete.tcp_checksum == complete.pseudo_header_seed())
    raw = bytearray(c.raw)
    struct.pack_into("!H", raw, complete.l4 + 16, pseudo_seed_oracle(c.raw))
    seeded = parse(raw, csum_partial=None)
    assert isinstance(seeded, TcpPacket) and seeded.csum_partial
    for pkt in (complete, seeded):
        _random_edits(pkt, rnd)
        out = pkt.finish()
        field = struct.unpack_from("!H", out, pkt.l4 + 16)[0]
        assert field_error(field, scapy_tcp_checksum(out)) == 0


@SETTINGS
@given(
    tcp_packets(max_payload=0),
    st.lists(st.sampled_from((b"ab", b"abab", b"xab", b"b", b"a", b"zz")), max_size=400),
    st.sampled_from((b"ab", b"aba", b"b")),
    st.integers(0, 0xFFFE),
    st.booleans(),
)
def test_replace_literal_is_the_one_pattern_search_done_in_c(
    c: Crafted, chunks: list[bytes], find: bytes, error: int, partial: bool
) -> None:
    """Same bytes as the edits the rule search finds, applied one by one; the arrival error of the
    checksum (if any) carried through exactly, or a complete checksum in partial mode."""
    base = _parsed(c)
    raw = bytearray(c.raw[: base.end])
    payload = b"".join(chunks)
    raw += payload
    if c.version == 4:
        struct.pack_into("!H", raw, 2, len(raw))
        struct.pack_into("!H", raw, 10, 0)
        struct.pack_into("!H", raw, 10, scapy_ip_checksum(bytes(raw)))
    else:
        struct.pack_into("!H", raw, 4, len(raw) - 40)
    off = base.l4 + 16
    correct = scapy_tcp_checksum(bytes(raw))
    struct.pack_into("!H", raw, off, pseudo_seed_oracle(bytes(raw)) if partial
                     else (correct + error) % 0xFFFF)
    with_ = bytes(reversed(find)).upper()
    sel = Selection((Rule(name="r", index=0, path="t.toml", line=1, col=1, match=Match(),
                          replaces=(Replace(find, with_, 1, 1),), set=HeaderSet(),
                          verdict="accept", examples=()),))
    assert sel.single_pattern is not None
    one = parse(raw, csum_partial=partial)
    many = parse(raw, csum_partial=partial)
    assert isinstance(one, TcpPacket) and isinstance(many, TcpPacket)
    edits = [(s, e, n) for s, e, n, _ in sel.find_edits(payload)]
    assert one.replace_literal(find, with_) == bool(edits)
    many.apply_edits(edits)
    out_one, out_many = one.finish(), many.finish()
    assert out_one == out_many
    field = struct.unpack_from("!H", out_one, off)[0]
    want = 0 if partial else field_error((correct + error) % 0xFFFF, correct)
    assert field_error(field, scapy_tcp_checksum(out_one)) == want


def test_a_longer_and_a_shorter_edit_that_cancel_out_still_move_the_bytes_between() -> None:
    """Found by the random-edit property test: edits whose length changes sum to zero took the
    same-length shortcut, which writes each edit in place, so the bytes between them stayed
    where they were (wrong bytes, wrong checksum)."""
    raw = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP() / Raw(b"abcdef"))
    for partial in (False, True):
        pkt = parse(raw, csum_partial=partial)
        assert isinstance(pkt, TcpPacket)
        assert pkt.apply_edits([(1, 4, b"WXYZ"), (5, 6, b"")]) == 0
        out = pkt.finish()
        assert out[-6:] == b"aWXYZe"
        assert field_error(struct.unpack_from("!H", out, pkt.l4 + 16)[0],
                           scapy_tcp_checksum(out)) == 0


def test_same_length_replace_changes_only_the_pattern() -> None:
    raw = bytes(
        IP(src="198.18.0.2", dst="198.18.0.1")
        / TCP(sport=80, dport=40000, flags="PA")
        / Raw(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\n")
    )
    pkt = parse(raw)
    assert isinstance(pkt, TcpPacket)
    start = pkt.payload.index(b"nginx")
    pkt.apply_edits([(start, start + 5, b"webby")])
    out = pkt.finish()
    assert len(out) == len(raw)
    assert IP(out)[Raw].load == b"HTTP/1.1 200 OK\r\nServer: webby\r\n\r\n"
    assert field_error(IP(out)[TCP].chksum, scapy_tcp_checksum(out)) == 0


def test_length_changing_replace_updates_lengths_both_families() -> None:
    for ip in (IP(src="198.18.0.1", dst="198.18.0.2"), IPv6(src="2001:2::1", dst="2001:2::2")):
        raw = bytes(ip / TCP(sport=1, dport=2) / Raw(b"a-b-c"))
        pkt = parse(raw)
        assert isinstance(pkt, TcpPacket)
        assert pkt.apply_edits([(1, 2, b"<long>"), (3, 4, b"")]) == 4
        out = pkt.finish()
        got = (IP if ip.version == 4 else IPv6)(out)
        assert got[Raw].load == b"a<long>bc"
        if ip.version == 4:
            assert got.len == len(out)
            assert field_error(got.chksum, scapy_ip_checksum(out)) == 0
        else:
            assert got.plen == len(out) - 40
        assert field_error(got[TCP].chksum, scapy_tcp_checksum(out)) == 0


def test_dscp_keeps_ecn_bits() -> None:
    for ip in (IP(tos=0b000000_11), IPv6(tc=0b000000_11, fl=0xABCDE)):
        pkt = parse(bytes(ip / TCP()))
        assert isinstance(pkt, TcpPacket)
        pkt.set_dscp(46)
        assert pkt.dscp == 46
        out = pkt.finish()
        got = (IP if ip.version == 4 else IPv6)(out)
        tc = got.tos if ip.version == 4 else got.tc
        assert tc == (46 << 2) | 0b11
        if ip.version == 4:
            assert field_error(got.chksum, scapy_ip_checksum(out)) == 0
        else:
            assert (got.version, got.fl) == (6, 0xABCDE)


def test_splice_makes_edits_in_order() -> None:
    assert P.splice(b"..AB..CDEF", [(2, 4, b"xyz"), (6, 10, b"")]) == b"..xyz.."
    # a tail from the first edit on, offsets still counted from the payload's start
    assert P.splice(b"AB..CDEF", [(2, 4, b"xyz"), (6, 10, b"")], origin=2) == b"xyz.."
    assert P.splice(b"abc", []) == b"abc"


def test_mss_clamp_only_lowers() -> None:
    pkt = parse(bytes(IP() / TCP(flags="S", options=[("MSS", 1460)])))
    assert isinstance(pkt, TcpPacket)
    assert pkt.clamp_mss(1500) is False
    assert pkt.clamp_mss(1400) is True
    assert pkt.mss == 1400
    assert pkt.tcp_checksum_ok()
    no_opt = parse(bytes(IP() / TCP(flags="S")))
    assert isinstance(no_opt, TcpPacket)
    assert no_opt.clamp_mss(1000) is False and no_opt.mss is None


# -- malformed input: never raises, says why ----------------------------------------------------
def _v4(payload: bytes = b"data", **tcp: Unpack[TcpFields]) -> bytearray:
    return bytearray(bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(**tcp) / Raw(payload)))


def _reason(data: bytes | bytearray) -> str:
    result = parse(data)
    assert isinstance(result, Unparsed), result
    return result.reason


def test_each_malformation_has_its_reason() -> None:
    assert _reason(b"") == P.TRUNCATED_IP
    assert _reason(_v4()[:19]) == P.TRUNCATED_IP
    raw = _v4()
    raw[0] = 0x55
    assert _reason(raw) == P.BAD_VERSION
    raw = _v4()
    raw[0] = 0x44  # IHL 4 < 5
    assert _reason(raw) == P.BAD_IHL
    raw = _v4()
    raw[0] = 0x4F  # IHL 60 bytes > packet
    assert _reason(raw[:50]) == P.BAD_IHL
    raw = _v4()
    raw[2:4] = (len(raw) + 1).to_bytes(2, "big")  # total length lies (too long)
    assert _reason(raw) == P.BAD_LENGTH
    raw = _v4()
    raw[2:4] = (10).to_bytes(2, "big")  # total length below the header
    assert _reason(raw) == P.BAD_LENGTH
    assert _reason(bytes(IP(flags="MF") / TCP())) == P.FRAGMENT
    assert _reason(bytes(IP(frag=100) / Raw(b"x" * 30))) == P.FRAGMENT
    assert _reason(bytes(IP(proto=17) / Raw(b"x" * 30))) == P.NOT_TCP
    raw = bytearray(bytes(IP() / TCP()))
    assert _reason(raw[:30]) in (P.BAD_LENGTH,)
    short = bytearray(bytes(IP() / Raw(b"x" * 10)))
    short[9] = 6
    assert _reason(short) == P.TRUNCATED_TCP
    raw = _v4()
    raw[20 + 12] = 0x40  # data offset 4 < 5
    assert _reason(raw) == P.BAD_DATA_OFFSET
    raw = _v4(b"")
    raw[20 + 12] = 0xF0  # data offset 60 > segment
    assert _reason(raw) == P.BAD_DATA_OFFSET
    raw = _v4(b"", options=[("NOP", None)] * 4)
    raw[40:44] = bytes((2, 40, 0, 0))  # MSS option claims 40 bytes
    assert _reason(raw) == P.BAD_TCP_OPTIONS
    raw = _v4(b"", options=[("NOP", None)] * 4)
    raw[40:44] = bytes((1, 1, 1, 8))  # a kind with no room for its length
    assert _reason(raw) == P.BAD_TCP_OPTIONS
    raw = _v4(b"", options=[("NOP", None)] * 4)
    raw[40:44] = bytes((8, 1, 1, 1))  # length < 2
    assert _reason(raw) == P.BAD_TCP_OPTIONS


def test_ipv6_fragments_routing_and_chains() -> None:
    base = IPv6(src="2001:2::1", dst="2001:2::2")
    assert _reason(bytes(base / IPv6ExtHdrFragment(offset=0, m=1) / TCP())) == P.FRAGMENT
    assert _reason(bytes(base / IPv6ExtHdrFragment(offset=8, m=0) / Raw(b"x" * 20))) == P.FRAGMENT
    ok = parse(bytes(base / IPv6ExtHdrFragment(offset=0, m=0) / TCP()))  # atomic fragment
    assert isinstance(ok, TcpPacket)
    rt = bytes(base / IPv6ExtHdrRouting(addresses=["2001:2::9"], segleft=1) / TCP())
    assert _reason(rt) == P.NOT_TCP
    assert _reason(bytes(base / Raw(b"x" * 8))[:39]) == P.TRUNCATED_IP
    chain = bytearray(bytes(base / TCP()))
    chain[6] = 0  # claims a hop-by-hop header where TCP is: garbage chain
    assert _reason(chain) in (P.BAD_EXT_HEADER, P.NOT_TCP)
    long_chain = base
    for _ in range(10):
        long_chain = long_chain / IPv6ExtHdrRouting(addresses=[], segleft=0)
    assert _reason(bytes(long_chain / TCP())) == P.BAD_EXT_HEADER


def test_ipv4_options_are_skipped() -> None:
    pkt = parse(bytes(IP(options=[IPOption_Router_Alert()]) / TCP(sport=7) / Raw(b"z")))
    assert isinstance(pkt, TcpPacket)
    assert pkt.l4 == 24 and pkt.sport == 7 and pkt.payload == b"z"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = parse(data)
    if isinstance(result, Unparsed):
        assert result.reason in REASONS
    else:
        result.payload  # noqa: B018 - reading every field must be safe
        result.options()
        result.sack_blocks()
        result.finish()


@SETTINGS
@given(tcp_packets(max_payload=64), st.randoms(use_true_random=False))
def test_mutated_packets_never_raise(c: Crafted, rnd: random.Random) -> None:
    raw = bytearray(c.raw)
    for _ in range(rnd.randint(1, 8)):
        i = rnd.randrange(len(raw))
        raw[i] = rnd.getrandbits(8)
    if rnd.random() < 0.3:
        raw = raw[: rnd.randrange(len(raw) + 1)]
    result = parse(raw)
    if isinstance(result, Unparsed):
        assert result.reason in REASONS
        return
    _random_edits(result, rnd)
    assert isinstance(parse(result.finish()), TcpPacket)
