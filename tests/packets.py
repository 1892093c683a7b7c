"""Hypothesis strategies for real TCP/IP packets, crafted with scapy (the independent oracle).

Shared by the packet-core property tests and the fuzz target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet, Raw
from scapy.utils import checksum as scapy_checksum

u32 = st.integers(0, 2**32 - 1)
ports = st.integers(1, 65535)


class TcpFields(TypedDict, total=False):
    """TCP header fields the tests hand to scapy's ``TCP(...)`` by name (scapy types them all
    ``Any``; naming them here lets mypy check the values and catch a misspelt field)."""

    seq: int
    ack: int
    flags: str
    options: list[tuple[str, Any]]


@st.composite
def tcp_options(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A random, well-formed TCP option list that fits in 40 bytes."""
    pool: list[tuple[str, Any]] = [
        ("MSS", draw(st.integers(0, 65535))),
        ("WScale", draw(st.integers(0, 14))),
        ("SAckOK", b""),
        ("Timestamp", (draw(u32), draw(u32))),
        ("NOP", None),
        (
            "SAck",
            tuple(draw(st.lists(u32, min_size=2, max_size=6).map(lambda v: v[: len(v) // 2 * 2]))),
        ),
    ]
    chosen = draw(st.lists(st.sampled_from(range(len(pool))), max_size=6, unique=True))
    opts = [pool[i] for i in chosen]
    size = 0
    out: list[tuple[str, Any]] = []
    for name, value in opts:
        length = {"MSS": 4, "WScale": 3, "SAckOK": 2, "Timestamp": 10, "NOP": 1}.get(
            name, 2 + 8 * (len(value) // 2) if name == "SAck" else 0
        )
        if size + length > 40:
            continue
        out.append((name, value))
        size += length
    if len(out) > 0 and draw(st.booleans()) and size < 40:
        out.append(("EOL", None))
    return out


@dataclass
class Crafted:
    """A crafted packet and what the oracle (scapy) says is in it."""

    pkt: Packet
    raw: bytes
    version: int
    payload: bytes


@st.composite
def tcp_packets(draw: st.DrawFn, max_payload: int = 1500) -> Crafted:
    """Random valid IPv4 or IPv6 TCP packets with correct checksums (options, ext headers)."""
    version = draw(st.sampled_from((4, 6)))
    payload = draw(st.binary(max_size=max_payload))
    tcp = TCP(
        sport=draw(ports),
        dport=draw(ports),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(st.integers(0, 255)),
        window=draw(st.integers(0, 65535)),
        urgptr=draw(st.integers(0, 65535)),
        options=draw(tcp_options()),
    )
    if version == 4:
        ip_opts = draw(st.sampled_from(([], [IPOption_NOP()] * 4, [IPOption_Router_Alert()])))
        ip = IP(
            src=draw(st.sampled_from(("198.18.0.1", "198.19.255.254", "198.18.7.9"))),
            dst=draw(st.sampled_from(("198.18.0.2", "198.19.1.1"))),
            ttl=draw(st.integers(1, 255)),
            tos=draw(st.integers(0, 255)),
            id=draw(st.integers(0, 65535)),
            flags=draw(st.sampled_from((0, 2))),  # DF or nothing: never a fragment
            options=ip_opts,
        )
        pkt: Packet = ip / tcp / Raw(payload)
    else:
        ip6: Packet = IPv6(
            src=draw(st.sampled_from(("2001:2::1", "2001:2:0:ffff::1"))),
            dst=draw(st.sampled_from(("2001:2::2", "2001:2::abcd:1"))),
            hlim=draw(st.integers(1, 255)),
            tc=draw(st.integers(0, 255)),
            fl=draw(st.integers(0, 2**20 - 1)),
        )
        for ext in draw(st.lists(st.sampled_from(("hbh", "dst", "rt", "frag")), max_size=3)):
            if ext == "hbh":
                ip6 = ip6 / IPv6ExtHdrHopByHop()
            elif ext == "dst":
                ip6 = ip6 / IPv6ExtHdrDestOpt()
            elif ext == "rt":
                ip6 = ip6 / IPv6ExtHdrRouting(addresses=["2001:2::9"], segleft=0)
            else:
                ip6 = ip6 / IPv6ExtHdrFragment(offset=0, m=0, id=draw(u32))  # atomic fragment
        pkt = ip6 / tcp / Raw(payload)
    raw = bytes(pkt)
    return Crafted(pkt=pkt.__class__(raw), raw=raw, version=version, payload=payload)


def scapy_tcp_checksum(raw: bytes) -> int:
    """The correct TCP checksum of ``raw`` according to scapy (rebuild with the field deleted)."""
    pkt = (IP if raw[0] >> 4 == 4 else IPv6)(raw)
    tcp = pkt[TCP]
    del tcp.chksum
    return int(pkt.__class__(bytes(pkt))[TCP].chksum)


def scapy_ip_checksum(raw: bytes) -> int:
    pkt = IP(raw)
    del pkt.chksum
    return int(IP(bytes(pkt)).chksum)


def field_error(field: int, correct: int) -> int:
    """How far a checksum field is from the correct value (one's-complement, mod 0xFFFF)."""
    return (field - correct) % 0xFFFF


def pseudo_seed_oracle(raw: bytes) -> int:
    """The pseudo-header-only sum, built by hand and summed by scapy's own checksum()."""
    pkt = (IP if raw[0] >> 4 == 4 else IPv6)(raw)
    tcp_len = len(bytes(pkt[TCP]))
    if raw[0] >> 4 == 4:
        pseudo = raw[12:20] + bytes((0, 6)) + tcp_len.to_bytes(2, "big")
    else:
        pseudo = raw[8:40] + tcp_len.to_bytes(4, "big") + bytes((0, 0, 0, 6))
    return (~scapy_checksum(pseudo)) & 0xFFFF
