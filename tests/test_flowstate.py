"""The sequence records written out and read back (``nfrewrite.core.flowstate``).

The property that matters: a table restored from a snapshot, or from a journal of the flows that
changed, behaves exactly as the original would from there on (same plan for every segment: seq,
ack, SACK, payload, events), whatever the traffic was before and after.  Also: any damage to a
snapshot (a flipped byte, a cut) is refused, never half read; a torn last journal frame is
dropped and reported; a foreign version or byte order is refused.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfrewrite.core import flowstate
from nfrewrite.core.constants import ACK, FIN, RST, SYN
from nfrewrite.core.flowstate import StateError, decode_state, encode_table, restore
from nfrewrite.core.seqadj import Edit, FlowKey, FlowTable, SegmentPlan, flow_key

RULES = {b"AB": b"xxxxx", b"CDEF": b"c", b"KL": b"kl", b"QRS": b""}
PATTERN = re.compile(b"|".join(re.escape(f) for f in RULES))
CHUNKS = [b".", b"..", b"AB", b"CDEF", b"KL", b"QRS", b"A", b"z", b"DEF", b"B"]
DIGEST = b"rules-1"
M32 = 1 << 32


def find_edits(payload: bytes) -> list[Edit]:
    return [(m.start(), m.end(), RULES[m.group()], None) for m in PATTERN.finditer(payload)]


def keys(n: int) -> list[tuple[FlowKey, bytes, bytes]]:
    out = []
    for i in range(n):
        a, b = bytes([198, 18, 0, 1]), bytes([198, 19, 0, 1 + i])
        out.append((flow_key(a, 40000 + i, b, 80)[0], a, b))
    return out


Segment = tuple[int, int, int, int, int, int, bool, int]
segment_st = st.tuples(
    st.integers(0, 2),  # flow
    st.integers(0, 1),  # direction
    st.integers(0, 200),  # offset in that direction's stream
    st.integers(0, 30),  # payload length
    st.integers(-20, 220),  # acknowledged offset of the other direction (rewritten, roughly)
    st.sampled_from([0, 0, 0, 0, SYN, FIN, RST]),
    st.booleans(),  # with a SACK block
    st.integers(0, 3),  # seconds since the last segment
)


def play(table: FlowTable, streams: list[tuple[bytes, bytes]], isns: list[tuple[int, int]],
         seg: Segment, now: float) -> SegmentPlan | None:
    fi, d, off, n, acked, flags, sack, _ = seg
    key = keys(3)[fi][0]
    data = streams[fi][d]
    payload = data[off:off + n]
    seq = (isns[fi][d] + off) % M32
    ack = (isns[fi][1 - d] + acked) % M32
    blocks = [((ack + 5) % M32, (ack + 12) % M32)] if sack else []
    flow = table.get(key) or table.create(key, now)
    if flow is None:
        return None
    return flow.rewrite(d, seq, ack, flags | ACK, payload, blocks, now, find_edits,
                        window=4000, wscale=2 if flags & SYN else None)


def journal_of(table: FlowTable, frames: list[bytes]) -> None:
    """Append what changed since last time, as the store does."""
    assert table.changed is not None
    for key, flow in table.changed.items():
        frames.append(flowstate.encode_tombstone(key) if flow is None
                      else flowstate.encode_flow(flow))
    table.changed.clear()


streams_st = st.lists(st.sampled_from(CHUNKS), max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    streams=st.lists(st.tuples(streams_st, streams_st), min_size=3, max_size=3),
    isns=st.lists(st.tuples(st.integers(0, M32 - 1), st.integers(0, M32 - 1)), min_size=3,
                  max_size=3),
    before=st.lists(segment_st, max_size=40),
    after=st.lists(segment_st, max_size=40),
    from_journal=st.booleans(),
    shift=st.sampled_from([0.0, 7.0]),
    max_flows=st.integers(1, 4),
)
def test_a_restored_table_maps_every_later_segment_as_the_original_would(
    streams: list[tuple[bytes, bytes]], isns: list[tuple[int, int]], before: list[Segment],
    after: list[Segment], from_journal: bool, shift: float, max_flows: int,
) -> None:
    original = FlowTable(max_flows=max_flows, idle_timeout=8.0, close_grace=3.0)
    original.changed = {}
    frames = [flowstate.encode_header(DIGEST, complete=False)]
    now = 1000.0
    for seg in before:
        now += seg[7]
        play(original, streams, isns, seg, now)
        journal_of(original, frames)
    data = b"".join(frames) if from_journal else encode_table(original, DIGEST)
    # read back by another process, whose clock may be another (shifted by `shift`)
    loaded = decode_state(data, now + shift, clock_shift=shift)
    assert loaded.digest == DIGEST and loaded.complete is not from_journal and not loaded.torn
    restored = FlowTable(max_flows=max_flows, idle_timeout=8.0, close_grace=3.0)
    assert restore(restored, loaded.flows.values()) == len(original)
    assert restored.flows_restored == len(original)
    assert restored.memory_used == original.memory_used
    assert restored.flows_on_probation == original.flows_on_probation
    assert [f.key for f in restored._flows.values()] == [f.key for f in original._flows.values()]
    if not shift:  # written again, the restored table is the same bytes
        assert encode_table(restored, DIGEST) == encode_table(original, DIGEST)
    for seg in after:
        now += seg[7]
        expected = play(original, streams, isns, seg, now)
        got = play(restored, streams, isns, seg, now + shift)
        assert got == expected, seg
        assert len(restored) == len(original)


def _sample_table() -> tuple[FlowTable, float]:
    table = FlowTable()
    key, _a, _b = keys(1)[0]
    flow = table.create(key, 10.0)
    assert flow is not None
    flow.rewrite(0, 1000, 5000, ACK, b"..AB..CDEF..", [], 10.0, find_edits)
    flow.rewrite(1, 5000, 1012, ACK, b"QRS KL AB", [], 11.0, find_edits)
    return table, 12.0


def test_any_flipped_byte_or_cut_of_a_snapshot_is_refused() -> None:
    table, now = _sample_table()
    data = encode_table(table, DIGEST)
    assert len(decode_state(data, now).flows) == 1
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(StateError):
            decode_state(bytes(bad), now)
    for cut in range(len(data)):
        with pytest.raises(StateError):
            decode_state(data[:cut], now)


def test_a_torn_last_journal_frame_is_dropped_and_reported() -> None:
    table, now = _sample_table()
    flow = next(iter(table._flows.values()))
    head = flowstate.encode_header(DIGEST, complete=False)
    whole = flowstate.encode_flow(flow)
    good = decode_state(head + whole + whole[:10], now)
    assert good.torn and len(good.flows) == 1 and good.frames == 1
    gone = decode_state(head + whole + flowstate.encode_tombstone(flow.key or keys(1)[0][0]), now)
    assert not gone.flows and not gone.torn
    with pytest.raises(StateError, match="checksum"):  # damage in the middle is not a tear
        decode_state(head + whole[:-1] + b"\xff" + whole, now)


def test_another_version_or_byte_order_is_refused() -> None:
    table, now = _sample_table()
    data = encode_table(table, DIGEST)
    body = bytearray(data[8:8 + flowstate._HEADER.size])
    for offset, value, why in ((8, struct.pack("<H", 99), "version 99"),
                               (10, b">" if flowstate._ORDER == b"<" else b"<", "byte order")):
        changed = bytearray(body)
        changed[offset:offset + len(value)] = value
        frame = flowstate._frame(bytes(changed))
        with pytest.raises(StateError, match=why):
            decode_state(frame + data[8 + len(body):], now)
    with pytest.raises(StateError, match="no header"):
        decode_state(b"", now)


def test_a_full_table_takes_what_fits_and_counts_it() -> None:
    table, now = _sample_table()
    other = FlowTable(max_flows=1)
    other.create(keys(2)[1][0], now)
    loaded = decode_state(encode_table(table, DIGEST), now)
    assert restore(other, loaded.flows.values()) == 0 and other.flows_restored == 0
    empty = FlowTable()
    assert restore(empty, loaded.flows.values()) == 1
    assert empty.stats()["flows_restored"] == 1
    assert empty.flows_created == empty.flows_active  # the table's invariant holds
