"""The fuzzer's invariants hold on a short run, and what it once found stays fixed.

``make fuzz`` runs a million packets (``python -m tests.fuzz``); CI runs the same code path on
30,000 (a few seconds) with a fixed seed, so a failure here reproduces with
``python -m tests.fuzz --seed 20261126 --count 30000``.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from nfrewrite.engine import ACCEPT, Engine
from nfrewrite.packet import REASONS, TcpPacket, parse
from nfrewrite.seqadj import FlowTable
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
def test_a_growing_edit_that_would_overflow_the_ip_length_is_left_out(version: int) -> None:
    """Found by the fuzzer (super-packets near 64 KiB): an edit growing a datagram past 65,535
    bytes made ``_set_ip_length`` write a 17-bit value (``ValueError: byte must be in
    range(0, 256)``). Such edits are now left out: the packet passes unedited, no flow begins.
    The bound is NFQUEUE's: a verdict may carry at most 65,535 bytes of packet, IPv6's header
    included (``nfqnl_mangle``)."""
    most = 0xFFFF - 20 - (20 if version == 4 else 40)  # payload bytes that fit
    payload = b"nginx" + b"x" * (most - 5)
    raw = _big(version, payload)
    flows = FlowTable()
    res = Engine(fuzz.load_fuzz_rules(), flows).process(raw)
    assert (res.verdict, res.packet, res.rules, len(flows)) == (ACCEPT, None, (), 0)
    # one that still fits is made, and not cut: longer than the MTU, it is a GSO super-packet
    # that the kernel segments itself
    fits = b"nginx" + b"x" * (most - 5 - 13)
    raw = _big(version, fits)
    res = Engine(fuzz.load_fuzz_rules(), FlowTable()).process(raw)
    assert res.packet is not None and res.rules == ("grow",) and len(res.packet) == 0xFFFF
    out = parse(res.packet)
    assert isinstance(out, TcpPacket) and out.payload.startswith(b"a-much-longer-name")
    assert fuzz.tcp_residual(out) == 0 and fuzz.ip_residual(out) == 0


def test_same_length_edits_are_still_made_when_the_growing_ones_do_not_fit() -> None:
    most = 0xFFFF - 40
    payload = b"Server: nginx" + b"x" * (most - 13 - 5) + b"nginx"
    res = Engine(fuzz.load_fuzz_rules(), FlowTable()).process(_big(4, payload))
    assert res.packet is not None and res.rules == ("banner",)
    assert res.packet[40:53] == b"Server: webby" and res.packet.endswith(b"nginx")


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
