"""Packet-core cost: parse + one same-length payload replace + checksum, nfrewrite vs scapy;
and the one's-complement sum on a wire segment and on a 64 KB GSO super-packet.

Both do the same job on the same 1460-byte segment, measured side by side (interleaved rounds,
best round kept) because absolute times drift on a shared machine; the ratio is the figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from nfrewrite.core import checksum as cs
from nfrewrite.core.packet import TcpPacket, parse

FIND, WITH = b"Server: nginx", b"Server: webby"


def _segment() -> bytes:
    body = (b"x" * 700 + FIND + b"y" * 800)[:1460]
    return bytes(
        IP(src="198.18.0.2", dst="198.18.0.1", ttl=64)
        / TCP(
            sport=80,
            dport=40000,
            flags="PA",
            options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
        )
        / Raw(body)
    )


def nfrewrite_job(raw: bytes) -> bytes:
    pkt = parse(raw)
    assert isinstance(pkt, TcpPacket)
    payload = pkt.payload
    at = payload.find(FIND)
    pkt.apply_edits([(at, at + len(FIND), WITH)])
    return pkt.finish()


def scapy_job(raw: bytes) -> bytes:
    pkt = IP(raw)
    load = pkt[Raw].load
    pkt[Raw].load = load.replace(FIND, WITH)
    del pkt[IP].chksum
    del pkt[TCP].chksum
    return bytes(pkt)


def _per_call_ns(fn: Callable[[bytes], object], raw: bytes, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        fn(raw)
    return (time.perf_counter_ns() - start) / n


def run(rounds: int = 7) -> dict[str, float]:
    raw = _segment()
    assert nfrewrite_job(raw) == scapy_job(raw), "both jobs must produce the same bytes"
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_per_call_ns(nfrewrite_job, raw, 5000))
        theirs.append(_per_call_ns(scapy_job, raw, 200))
    best_ours, best_theirs = min(ours), min(theirs)
    return {
        "packet_nfrewrite_ns": round(best_ours),
        "packet_scapy_ns": round(best_theirs),
        "packet_speedup": round(best_theirs / best_ours, 1),
        **checksum_sizes(rounds),
    }


def _one_int_sum(data: bytes) -> int:
    """The plain way: one integer for the whole buffer, one ``% 0xFFFF``."""
    value = int.from_bytes(data, "big")
    return (value << 8 if len(data) & 1 else value) % 0xFFFF


def checksum_sizes(rounds: int = 7) -> dict[str, float]:
    """``checksum.ones_sum`` (chunked above 4 KB) against one integer, on a wire segment and on
    a 64 KB GSO super-packet, side by side."""
    out: dict[str, float] = {}
    for size in (1448, 64000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert cs.ones_sum(data) == _one_int_sum(data)
        n = 5000 if size < 4096 else 200
        chunked = min(_per_call_ns(cs.ones_sum, data, n) for _ in range(rounds))
        single = min(_per_call_ns(_one_int_sum, data, n) for _ in range(rounds))
        out[f"csum_{size}_ns"] = round(chunked)
        out[f"csum_{size}_one_int_ns"] = round(single)
    return out


if __name__ == "__main__":
    r = run()
    ours, theirs = r["packet_nfrewrite_ns"] / 1000, r["packet_scapy_ns"] / 1000
    print(
        f"packet core (parse+replace+checksum, 1460 B): nfrewrite {ours:.2f} us"
        f"  scapy {theirs:.1f} us  speedup {r['packet_speedup']}x (goal >= 40x)"
    )
    for size in (1448, 64000):
        print(f"one's-complement sum of {size} B: ones_sum {r[f'csum_{size}_ns'] / 1000:.1f} us,"
              f" one integer {r[f'csum_{size}_one_int_ns'] / 1000:.1f} us")
