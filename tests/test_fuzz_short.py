"""The fuzzer's invariants hold on a short run, and what it once found stays fixed.

``make fuzz`` runs a million packets (``python -m tests.fuzz``); CI runs the same code path on
30,000 (a few seconds) with a fixed seed, so a failure here reproduces with
``python -m tests.fuzz --seed 20261126 --count 30000``.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from nfrewrite.core.constants import ACCEPT, MAX_VERDICT_PACKET
from nfrewrite.core.engine import Engine
from nfrewrite.core.packet import REASONS, TcpPacket, parse
from nfrewrite.core.seqadj import FlowTable
from tests import fuzz

SEED = 20261126


def test_short_fuzz_run_keeps_every_invariant() -> None:
    report = fuzz.run(count=30_000, seed=SEED, oracle_every=100)
    assert not report.violations, report.summary()
    s = report.stats
    assert s.packets == 30_000
    # the run really exercised what the invariants are about
    assert s.modified > 5000 and s.length_changed > 1000 and s.dropped > 500
    assert s.corrupt_modified > 100  # corrupt packets were rewritten (and stayed corrupt)
    assert set(s.unparsed) == set(REASONS)
    assert {"banner", "grow", "shrink", "request", "tiny", "headers", "no-telnet"} <= set(s.rules)
    assert report.flows["flows_created"] > 200 and report.flows["flows_ended"] > 50
    assert s.oracle_checked > 50


def test_fuzz_builder_checksums_agree_with_scapy() -> None:
    """The fuzzer's own builder and verifier are what every packet is judged by: scapy agrees."""
    import random

    rng = random.Random(SEED)
    for _ in range(200):
        net = fuzz.random_net(rng)
        raw = fuzz.build(net, 1, 80, rng.getrandbits(32), rng.getrandbits(32), 0x18,
                         fuzz.random_payload(rng, rng.randint(0, 99)),
                         fuzz.tcp_options(mss=1460, ts=(1, 2), sack=[(5, 9)]))
        assert fuzz.oracle(raw, raw, False) is None
        pkt = parse(raw)
        assert isinstance(pkt, TcpPacket)
        assert fuzz.tcp_residual(pkt) == 0 and fuzz.ip_residual(pkt) == 0


# -- regressions found by the fuzzer ---------------------------------------------------------------


def _server(payload: bytes, seq: int) -> bytes:
    return bytes(
        IP(src="198.18.0.2", dst="10.0.0.1")
        / TCP(sport=80, dport=4000, flags="PA", seq=seq, ack=1)
        / Raw(payload)
    )


def test_segment_reaching_back_before_the_flow_and_into_fresh_bytes() -> None:
    """Found by the first fuzz run (seed 1): a segment that starts before the flow's first byte
    and ends past everything seen made the adjuster ask the engine for edits twice; the engine's
    matcher appended its findings again on the second call, so the adjuster saw each edit twice
    (``ValueError: find_edits returned ... overlapping``) and ``process`` raised."""
    engine = Engine(fuzz.load_fuzz_rules(), FlowTable())
    first = engine.process(_server(b"nginx", 1000), now=1.0)
    assert first.track and first.rules == ("grow",)
    # bytes 990..999 passed before the flow existed; 1000..1004 are known; 1005.. are fresh
    res = engine.process(_server(b"0123456789nginxnginx", 990), now=1.1)
    assert res.verdict == ACCEPT and res.packet is not None
    got = IP(res.packet)
    # the known edit is replayed, the fresh one recorded and applied; numbering is unchanged
    # below the flow's first byte
    assert got[Raw].load == b"0123456789" + b"a-much-longer-name" * 2
    assert got[TCP].seq == 990
    assert fuzz.oracle(_server(b"0123456789nginxnginx", 990), res.packet, False) is None


def _big(version: int, payload: bytes, sport: int = 80) -> bytes:
    net = fuzz.Net(4, fuzz.V4[0], fuzz.V4[3]) if version == 4 else fuzz.Net(6, fuzz.V6[0],
                                                                             fuzz.V6[1])
    return fuzz.build(net, sport, 4000, 1000, 1, 0x18, payload)


@pytest.mark.parametrize("version", [4, 6])
def test_a_growing_edit_that_would_overflow_what_a_verdict_carries_cuts_the_packet(
    version: int,
) -> None:
    """Found by the fuzzer (super-packets near 64 KiB): an edit growing a datagram past 65,535
    bytes made ``_set_ip_length`` write a 17-bit value (``ValueError: byte must be in
    range(0, 256)``). The bound is what a verdict carries back: 65,531 bytes, header included
    (MAX_VERDICT_PACKET; tests/test_queue.py measures it). With a flow table the packet is cut at
    an edit boundary (the sender retransmits the rest); without one the edit is left out."""
    most = 0xFFFF - 20 - (20 if version == 4 else 40)  # payload bytes of a 65,535-byte packet
    payload = b"nginx" + b"x" * (most - 5)
    raw = _big(version, payload)
    flows = FlowTable()
    res = Engine(fuzz.load_fuzz_rules(), flows).process(raw)
    assert res.verdict == ACCEPT and res.rules == ("grow",) and len(flows) == 1
    assert res.packet is not None and len(res.packet) == MAX_VERDICT_PACKET
    out = parse(res.packet)
    assert isinstance(out, TcpPacket)
    assert out.payload == (b"a-much-longer-name" + payload[5:])[: out.payload_len]
    assert fuzz.tcp_residual(out) == 0 and fuzz.ip_residual(out) == 0
    res = Engine(fuzz.load_fuzz_rules(), None).process(raw)
    assert (res.verdict, res.packet, res.rules) == (ACCEPT, None, ())
    # one that fits exactly is made whole, and not cut at the MTU: longer than the MTU, it is a
    # GSO super-packet that the kernel segments itself
    fits = b"nginx" + b"x" * (most - 5 - 13 - 4)
    res = Engine(fuzz.load_fuzz_rules(), FlowTable()).process(_big(version, fits))
    assert res.packet is not None and res.rules == ("grow",)
    assert len(res.packet) == MAX_VERDICT_PACKET
    out = parse(res.packet)
    assert isinstance(out, TcpPacket) and out.payload == b"a-much-longer-name" + fits[5:]
    assert fuzz.tcp_residual(out) == 0 and fuzz.ip_residual(out) == 0


def test_same_length_edits_are_still_made_when_the_growing_ones_do_not_fit() -> None:
    most = MAX_VERDICT_PACKET - 40  # payload bytes of the longest packet a verdict carries
    payload = b"Server: nginx" + b"x" * (most - 13 - 5) + b"nginx"
    # without a flow table: the growing edit at the end is left out, the same-length one made
    res = Engine(fuzz.load_fuzz_rules(), None).process(_big(4, payload))
    assert res.packet is not None and res.rules == ("banner",)
    assert res.packet[40:53] == b"Server: webby" and res.packet.endswith(b"nginx")
    # with one: both made; the packet is cut before the grown end, which comes again
    res = Engine(fuzz.load_fuzz_rules(), FlowTable()).process(_big(4, payload))
    assert res.packet is not None and res.rules == ("banner", "grow")
    assert res.packet[40:53] == b"Server: webby" and len(res.packet) <= MAX_VERDICT_PACKET
    assert res.packet.endswith(b"x")


def test_link_padding_counts_against_the_mtu() -> None:
    """Found while checking the fuzzer's size invariant against the MTU cut (and since then
    caught by it: crafted packets carry padding): the cut measured the room with the bytes
    after the datagram (link padding) included, and those bytes are kept after it, so a padded
    packet that grew left larger than max(MTU, its size)."""
    net = fuzz.Net(4, fuzz.V4[0], fuzz.V4[3])
    payload = b"nginx " * 230  # 1380 bytes; grows by 13 per match
    raw = fuzz.build(net, 80, 4000, 1000, 1, 0x18, payload) + b"\0" * 200  # 1420 + padding
    res = Engine(fuzz.load_fuzz_rules(), FlowTable()).process(raw)
    assert res.packet is not None and res.rules[0] == "grow"
    assert len(res.packet) <= len(raw) and res.packet.endswith(b"\0" * 200)
    out = parse(res.packet)
    assert isinstance(out, TcpPacket) and fuzz.tcp_residual(out) == 0
