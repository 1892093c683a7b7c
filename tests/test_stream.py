"""The stream matcher: a pattern that TCP splits across segments is found and rewritten whole.

Pure tests (no kernel): a sender's stream is cut into segments, fed to the engine with hold
tokens as the queue loop feeds it, the packets it lets out (in verdict order) are put together
again by sequence number as a receiver would, and the result must be the rewritten stream.
"""

from __future__ import annotations

import math

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from nfrewrite.core.constants import ACCEPT, DROP, HOLD
from nfrewrite.core.engine import Engine, Result
from nfrewrite.core.packet import TcpPacket, parse
from nfrewrite.core.rules import HeaderSet, Match, Replace, Rule, RuleSet
from nfrewrite.core.seqadj import FlowTable
from nfrewrite.core.stream import HoldLimits
from tests.packets import scapy_tcp_checksum

TOKEN = b"SECRET-TOKEN-7f3a9c"
ISN = 1000


def rules(*pairs: tuple[bytes, bytes]) -> RuleSet:
    reps = tuple(Replace(f, w, 1, 1) for f, w in pairs)
    rule = Rule("redact", 0, "r.toml", 1, 1, Match(dport=((80, 80),)), reps,
                HeaderSet(),
                "accept", ())
    return RuleSet([rule])


def segment(version: int, seq: int, payload: bytes, flags: str = "PA") -> bytes:
    ip = IP(src="198.18.0.1", dst="198.18.1.1") if version == 4 else IPv6(
        src="2001:2::1", dst="2001:2::2")
    return bytes(ip / TCP(sport=40000, dport=80, seq=seq, ack=1, flags=flags) / Raw(payload))


class Receiver:
    """What the far end gets: payload bytes by sequence number, and every packet checked."""

    def __init__(self) -> None:
        self.got: dict[int, bytes] = {}

    def take(self, original: bytes, res: Result) -> None:
        assert res.verdict in (ACCEPT, DROP)
        if res.verdict == DROP:
            return
        wire = res.packet if res.packet is not None else original
        pkt = parse(wire)
        assert isinstance(pkt, TcpPacket)
        assert scapy_tcp_checksum(wire) == pkt.tcp_checksum
        if pkt.payload_len:
            self.got[pkt.seq] = pkt.payload

    def stream(self, start: int) -> bytes:
        out = bytearray()
        pos = start
        for seq in sorted(self.got):
            data = self.got[seq]
            assert seq <= pos, f"hole at {pos}"
            out += data[pos - seq:]
            pos = max(pos, seq + len(data))
        return bytes(out)


def feed(engine: Engine, pieces: list[bytes], version: int, *, gap: float = 0.0001,
         tail: float | None = math.inf) -> Receiver:
    rx = Receiver()
    sent: dict[object, bytes] = {}
    seq = ISN
    now = 1.0
    for n, piece in enumerate(pieces):
        data = segment(version, seq, piece)
        seq += len(piece)
        for token, res in engine.release_due(now):
            rx.take(sent.pop(token), res)
        res = engine.process(data, now=now, hold=n)
        for token, earlier in res.released:
            rx.take(sent.pop(token), earlier)
        if res.verdict == HOLD:
            sent[n] = data
        else:
            rx.take(data, res)
        now += gap
    if tail is not None:
        for token, res in engine.release_due(tail):
            rx.take(sent.pop(token), res)
        assert not sent
    return rx


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("replacement", [b"[redacted]", b"X" * len(TOKEN), b"[" * 40])
def test_split_at_every_point(version: int, replacement: bytes) -> None:
    for k in range(1, len(TOKEN)):
        engine = Engine(rules((TOKEN, replacement)), FlowTable())
        before, after = b"GET /?a=", b" HTTP/1.1\r\n\r\n"
        rx = feed(engine, [before + TOKEN[:k], TOKEN[k:] + after], version)
        assert rx.stream(ISN) == before + replacement + after, k
        assert engine.holds.joined == 1 and engine.holds.packets == 0


@pytest.mark.parametrize("version", [4, 6])
def test_split_over_many_segments(version: int) -> None:
    engine = Engine(rules((TOKEN, b"[redacted]")), FlowTable())
    stream = (b"x" * 7 + TOKEN) * 5 + b"end"
    pieces = [stream[i:i + 3] for i in range(0, len(stream), 3)]
    rx = feed(engine, pieces, version)
    assert rx.stream(ISN) == stream.replace(TOKEN, b"[redacted]")


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("replacement", [b"[redacted]", b"X" * len(TOKEN)])
def test_a_pure_ack_between_the_parts_leaves_the_group_held(version: int,
                                                           replacement: bytes) -> None:
    """The sender acknowledges the other direction between the two parts (an echo client does,
    all the time): the ACK passes at once and the token is still rewritten whole."""
    engine = Engine(rules((TOKEN, replacement)), FlowTable())
    first, second = b"GET /?a=" + TOKEN[:6], TOKEN[6:] + b" end"
    rx = Receiver()
    held = segment(version, ISN, first)
    assert engine.process(held, now=1.0, hold="first").verdict == HOLD
    ack = segment(version, ISN + len(first), b"", flags="A")
    res = engine.process(ack, now=1.0001, hold="ack")
    assert res.verdict == ACCEPT and res.released == ()
    assert engine.holds.packets == 1  # still held
    last = engine.process(segment(version, ISN + len(first), second), now=1.0002, hold="last")
    assert [t for t, _ in last.released] == ["first"]
    rx.take(held, last.released[0][1])
    rx.take(segment(version, ISN + len(first), second), last)
    assert rx.stream(ISN) == (first + second).replace(TOKEN, replacement)
    assert engine.holds.joined == 1 and engine.holds.flushed == 0


def test_prefix_at_the_end_is_released_by_the_deadline() -> None:
    engine = Engine(rules((TOKEN, b"[redacted]")), FlowTable(),
                    hold_limits=HoldLimits(deadline=0.005))
    rx = feed(engine, [b"ping SECRET-"], 4, tail=None)
    assert rx.got == {}
    assert engine.next_deadline() == pytest.approx(1.005)
    assert engine.release_due(1.004) == []
    released = engine.release_due(1.005)
    assert [t for t, _ in released] == [0]
    rx.take(segment(4, ISN, b"ping SECRET-"), released[0][1])
    assert rx.stream(ISN) == b"ping SECRET-"
    assert engine.holds.expired == 1


def test_no_token_no_hold() -> None:
    engine = Engine(rules((TOKEN, b"[redacted]")), FlowTable())
    res = engine.process(segment(4, ISN, b"abc SECRET-"), now=1.0)
    assert res.verdict == ACCEPT and engine.holds.holds == 0


def test_bounds_refuse() -> None:
    engine = Engine(rules((TOKEN, b"[redacted]")), FlowTable(),
                    hold_limits=HoldLimits(flow_packets=2))
    rx = feed(engine, [b"S", b"E", b"C", b"R", b"ET-TOKEN-7f3a9c"], 4)
    assert engine.holds.refused == 1
    assert rx.stream(ISN) == b"SECRET-TOKEN-7f3a9c"  # cut after two held: passes, counted


def test_hyperscan_search_finds_what_the_pure_search_finds() -> None:
    """Several patterns are searched by Hyperscan when it is installed: the same edits
    (leftmost-first, first pattern on ties, non-overlapping) as the merged bytes.find search."""
    import random

    from nfrewrite.core import rules as rules_module
    from nfrewrite.core.rules import Selection

    if rules_module._hs is None:
        pytest.skip("hyperscan not installed")
    rng = random.Random(3)
    for _ in range(500):
        pats = list(dict.fromkeys(bytes(rng.choice(b"ab\x00") for _ in range(rng.randint(1, 4)))
                                  for _ in range(rng.randint(2, 6))))
        if len(pats) < 2:
            continue
        rule = Rule("r", 0, "r", 1, 1, Match(), tuple(Replace(p, b"Z", 1, 1) for p in pats),
                    HeaderSet(), "accept", ())
        data = bytes(rng.choice(b"ab\x00c") for _ in range(rng.randint(0, 40)))
        fast = Selection((rule,)).find_edits(data)
        saved, rules_module._hs = rules_module._hs, None
        try:
            pure = Selection((rule,)).find_edits(data)
        finally:
            rules_module._hs = saved
        assert [e[:2] for e in fast] == [e[:2] for e in pure], (pats, data)


def regex_rules(pattern: str, with_: str, max_len: int = 256) -> RuleSet:
    from nfrewrite.core.regex import compile_regex, parse_template

    parts, bad = parse_template(with_)
    assert bad is None
    rx = compile_regex(pattern, parts, max_len)
    rule = Rule("regex", 0, "r.toml", 1, 1, Match(dport=((80, 80),)),
                (Replace(rx.source, with_.encode(), 1, 1, rx),), HeaderSet(), "accept", ())
    return RuleSet([rule])


@pytest.mark.parametrize("version", [4, 6])
def test_a_regex_split_at_every_point(version: int) -> None:
    """The header's match is held back wherever TCP cuts it (also after its last byte: the
    match could grow) and rewritten whole, same-length or not."""
    line = b"Server: SimpleHTTP/0.6 Python/3.11.7"
    before, after = b"HTTP/1.0 200 OK\r\n", b"\r\nDate: x\r\n\r\n"
    for with_ in ("Server: web", "Server: " + "w" * (len(line) - 8)):
        for k in range(1, len(line) + 2):
            engine = Engine(regex_rules(r"Server: [^\r\n]*", with_), FlowTable())
            stream = before + line + after
            cut = len(before) + k
            rx = feed(engine, [stream[:cut], stream[cut:]], version)
            assert rx.stream(ISN) == before + with_.encode() + after, (with_, k)
            assert engine.holds.expired == 0


@pytest.mark.parametrize("version", [4, 6])
def test_regex_with_groups_over_many_small_segments(version: int) -> None:
    engine = Engine(regex_rules(r"(?i)php/([0-9]{1,2})[0-9.]*", r"PHP/\1", 32), FlowTable())
    stream = b"".join(b"X-Powered-By: %s/%d.2.7\r\n" % (b"PHP" if i % 2 else b"php", i)
                      for i in range(12)) + b"\r\n"
    pieces = [stream[i:i + 5] for i in range(0, len(stream), 5)]
    rx = feed(engine, pieces, version)
    want = b"".join(b"X-Powered-By: PHP/%d\r\n" % i for i in range(12)) + b"\r\n"
    assert rx.stream(ISN) == want


def test_a_regex_match_that_may_grow_is_released_by_the_deadline_as_it_is() -> None:
    engine = Engine(regex_rules(r"Server: [^\r\n]*", "Server: web"), FlowTable(),
                    hold_limits=HoldLimits(deadline=0.005))
    rx = feed(engine, [b"abc\r\nServer: ngi"], 4, tail=None)
    assert rx.got == {}
    released = engine.release_due(1.005)
    rx.take(segment(4, ISN, b"abc\r\nServer: ngi"), released[0][1])
    # what was there when the deadline came is a whole match: rewritten as it is
    assert rx.stream(ISN) == b"abc\r\nServer: web"
    assert engine.holds.expired == 1
