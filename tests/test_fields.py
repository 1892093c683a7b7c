"""The named header offsets are where scapy puts those fields, and the one-read header views
agree with them; the accessors read and write big-endian; ``ip_length`` says what the IP header
states, or None when it cannot."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from nfrewrite.core import fields as F


def test_ipv4_and_tcp_offsets_match_scapy() -> None:
    raw = bytes(
        IP(src="198.18.0.1", dst="198.19.2.3", tos=0xB9, ttl=57, flags="MF", frag=0x123)
        / TCP(sport=40001, dport=443, seq=0x89ABCDEF, ack=0x12345678, flags="PA",
              window=0xBEEF, urgptr=0x1234, options=[("MSS", 1400)])
        / Raw(b"x" * 7)
    )
    ip = IP(raw)
    l4 = (raw[F.IP4_VERSION_IHL] & 0x0F) * 4
    tcp = TCP(raw[l4:])  # (scapy does not dissect a fragment's TCP header itself)
    src, dst = bytes((198, 18, 0, 1)), bytes((198, 19, 2, 3))
    assert ip.ihl * 4 == l4
    assert F.u16(raw, F.IP4_TOTAL_LENGTH)[0] == ip.len == len(raw)
    assert raw[F.IP4_TOS] == 0xB9 and raw[F.IP4_TTL] == 57 and raw[F.IP4_PROTOCOL] == 6
    assert F.u16(raw, F.IP4_FRAGMENT)[0] & 0x3FFF == 0x2000 | 0x123  # MF and the offset
    assert F.u16(raw, F.IP4_CHECKSUM)[0] == ip.chksum
    assert raw[F.IP4_SRC : F.IP4_SRC + 4] == src and raw[F.IP4_DST : F.IP4_DST + 4] == dst
    assert F.ip4_header(raw, 0) == (
        raw[F.IP4_VERSION_IHL], len(raw), F.u16(raw, F.IP4_FRAGMENT)[0], 6, src, dst
    )
    assert F.tcp_ports(raw, l4) == (40001, 443)
    assert (F.u16(raw, l4 + F.TCP_SPORT)[0], F.u16(raw, l4 + F.TCP_DPORT)[0]) == (40001, 443)
    assert F.u32(raw, l4 + F.TCP_SEQ)[0] == 0x89ABCDEF
    assert F.u32(raw, l4 + F.TCP_ACK)[0] == 0x12345678
    assert raw[l4 + F.TCP_DATA_OFFSET] >> 4 == tcp.dataofs
    assert raw[l4 + F.TCP_FLAGS] == int(tcp.flags)
    assert F.u16(raw, l4 + F.TCP_WINDOW)[0] == 0xBEEF
    assert F.u16(raw, l4 + F.TCP_URGENT)[0] == 0x1234
    assert F.u16(raw, l4 + F.TCP_CHECKSUM)[0] == tcp.chksum
    opt = l4 + F.TCP_HEADER_MIN
    assert raw[opt + F.TCPOPT_LENGTH] == 4 and F.u16(raw, opt + F.TCPOPT_VALUE)[0] == 1400


def test_ipv6_offsets_match_scapy() -> None:
    raw = bytes(IPv6(src="2001:2::1", dst="2001:2::2", tc=0xB9, fl=0x12345, hlim=33)
                / TCP() / Raw(b"abc"))
    src = bytes.fromhex("20010002000000000000000000000001")
    dst = bytes.fromhex("20010002000000000000000000000002")
    assert F.IP6_HEADER + F.u16(raw, F.IP6_PAYLOAD_LENGTH)[0] == len(raw)
    assert (F.u16(raw, F.IP6_VERSION_CLASS)[0] >> 4) & 0xFF == 0xB9
    assert raw[F.IP6_NEXT_HEADER] == 6 and raw[F.IP6_HOP_LIMIT] == 33
    assert raw[F.IP6_SRC : F.IP6_SRC + 16] == src and raw[F.IP6_DST : F.IP6_DST + 16] == dst
    assert F.ip6_header(raw, 0) == (len(raw) - F.IP6_HEADER, 6, src, dst)


def test_writes_are_big_endian_and_refuse_what_does_not_fit() -> None:
    buf = bytearray(8)
    F.put16(buf, 1, 0xABCD)
    buf[4:] = F.pack32(0x01020304)
    assert bytes(buf) == b"\x00\xab\xcd\x00\x01\x02\x03\x04"
    assert F.u16(buf, 1) == (0xABCD,) and F.u32(buf, 4) == (0x01020304,)
    assert F.pack32(0xFFFFFFFE) == b"\xff\xff\xff\xfe"
    with pytest.raises(struct.error):
        F.put16(buf, 0, 0x10000)


@pytest.mark.parametrize(
    ("data", "length"),
    [
        (b"\x45\x00\x05\xdc", 1500),  # IPv4: the total length, header included
        (b"\x60\x00\x00\x00\x05\xb4", 40 + 1460),  # IPv6: the fixed header plus its payload
        (b"\x45\x00\x05", None),  # too short to say
        (b"\x60\x00\x00\x00\x05", None),
        (b"", None),
        (b"\x55\x00\x05\xdc\x00\x00", None),  # neither version
    ],
)
def test_ip_length(data: bytes, length: int | None) -> None:
    assert F.ip_length(data) == length
