"""Unit tests for nfrewrite.core.seqadj: each test is one sentence of the module's contract."""

from __future__ import annotations

import re

import pytest

from nfrewrite.core.constants import ACK, FIN, RST, SYN
from nfrewrite.core.seqadj import (
    EDIT_BYTES,
    FLOW_BYTES,
    Edit,
    FindEdits,
    Flow,
    FlowKey,
    FlowTable,
    SegmentPlan,
    flow_key,
)

M32 = 1 << 32


def matcher(*rules: tuple[bytes, bytes]) -> FindEdits:
    """A literal matcher like the engine's: every match in the whole payload, tagged with its
    pattern."""
    table = dict(rules)
    pattern = re.compile(b"|".join(re.escape(f) for f, _ in rules))

    def find(payload: bytes) -> list[Edit]:
        return [(m.start(), m.end(), table[m.group()], m.group())
                for m in pattern.finditer(payload)]

    return find


GROW = matcher((b"AB", b"xxxxx"))  # +3
SHRINK = matcher((b"CDEF", b"c"))  # -3
BOTH = matcher((b"AB", b"xxxxx"), (b"CDEF", b"c"), (b"KL", b"kl"))
NONE = matcher((b"\x00never\x00", b""))


def seg(
    flow: Flow,
    direction: int,
    seq: int,
    payload: bytes = b"",
    *,
    ack: int | None = None,
    flags: int = ACK,
    sack: list[tuple[int, int]] | None = None,
    now: float = 0.0,
    find: FindEdits = BOTH,
    window: int | None = None,
    wscale: int | None = None,
) -> SegmentPlan:
    return flow.rewrite(direction, seq % M32, ack, flags, payload, sack or [], now, find,
                        window=window, wscale=wscale)


def created(table: FlowTable, key: FlowKey, now: float) -> Flow:
    flow = table.create(key, now)
    assert flow is not None
    return flow


def out(plan: SegmentPlan, payload: bytes) -> bytes:
    return payload if plan.payload is None else plan.payload


# -- keys and the stateless helper -------------------------------------------------------------


def test_flow_key_is_the_same_for_both_directions_and_gives_opposite_directions() -> None:
    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    k1, d1 = flow_key(a, 40000, b, 80)
    k2, d2 = flow_key(b, 80, a, 40000)
    assert k1 == k2 and {d1, d2} == {0, 1}
    assert k1[0] == 4 and flow_key(bytes(16), 1, bytes(15) + b"\x01", 2)[0][0] == 6


# -- seq / ack mapping --------------------------------------------------------------------------


def test_a_growing_edit_shifts_later_seqs_and_maps_acks_back() -> None:
    f = Flow(None, 0.0)
    p = seg(f, 0, 1000, b"..AB..")
    assert p.action == "send" and p.new_seq == 1000 and p.payload == b"..xxxxx.."
    assert p.fresh_edits == (0,)
    p = seg(f, 0, 1006, b"......")
    assert p.new_seq == 1009 and p.payload is None
    # the receiver acks everything it got (rewritten 1015) -> original 1012
    assert seg(f, 1, 5000, ack=1015).new_ack == 1012
    assert seg(f, 1, 5000, ack=1009).new_ack == 1006


def test_many_edits_accumulate_grow_and_shrink() -> None:
    f = Flow(None, 0.0)
    p = seg(f, 0, 0, b"AB..CDEF..AB")  # +3 -3 +3
    assert p.payload == b"xxxxx..c..xxxxx" and p.fresh_edits == (0, 1, 2)
    assert p.applied == ((0, 2, b"xxxxx", b"AB"), (4, 8, b"c", b"CDEF"), (10, 12, b"xxxxx", b"AB"))
    assert seg(f, 0, 12, b"z").new_seq == 15
    assert seg(f, 0, 13, b"CDEF").payload == b"c"
    assert seg(f, 0, 17, b"z").new_seq == 17
    assert [seg(f, 1, 0, ack=a).new_ack for a in (0, 5, 7, 8, 10, 15, 16, 17)] == [
        0, 2, 4, 8, 10, 12, 13, 17,
    ]  # fmt: skip


def test_ack_into_the_middle_of_a_replacement_maps_to_the_edit_start() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 100, b"..AB..")  # AB at 102..104 -> rewritten 102..107
    assert [seg(f, 1, 0, ack=q).new_ack for q in (102, 103, 106)] == [102, 102, 102]
    # the sender retransmits from the edit start: the receiver gets the whole replacement again
    p = seg(f, 0, 102, b"AB..")
    assert p.new_seq == 102 and p.payload == b"xxxxx.."
    assert seg(f, 1, 0, ack=107).new_ack == 104


def test_same_length_edits_are_recorded_for_flows_with_state() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..KL..")
    assert seg(f, 0, 0, b"..K").payload == b"..kl"  # retransmission re-cut inside the edit


# -- retransmissions ----------------------------------------------------------------------------


def test_a_retransmission_gets_exactly_the_recorded_edits_and_no_new_matching() -> None:
    f = Flow(None, 0.0)
    first = seg(f, 0, 0, b"..AB....AB..")
    again = seg(f, 0, 0, b"..AB....AB..")
    assert again.payload == first.payload and again.new_seq == first.new_seq
    assert again.fresh_edits == () and again.replayed_edits == 2


def test_seen_bytes_are_never_matched_again_even_if_the_matcher_changes() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..CDEF..", find=GROW)  # at that time only AB was a rule
    p = seg(f, 0, 0, b"..CDEF..", find=SHRINK)
    assert p.payload is None and p.fresh_edits == ()


def test_a_match_starting_in_seen_bytes_is_not_taken() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"....A")
    p = seg(f, 0, 4, b"AB..AB")  # AB at 4 straddles the seen byte 4; the second AB is fresh
    assert p.payload == b"AB..xxxxx" and p.new_seq == 4


def test_a_retransmission_ending_inside_an_edit_is_expanded_to_the_edit_end() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..CDEF..")  # rewritten ..c..
    p = seg(f, 0, 0, b"..CD")
    assert p.action == "send" and p.new_seq == 0 and p.payload == b"..c"
    assert "expanded" in p.events


def test_a_retransmission_starting_inside_an_edit_is_expanded_to_the_edit_start() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..AB..")
    p = seg(f, 0, 3, b"B..")
    assert p.new_seq == 2 and p.payload == b"xxxxx.."


def test_a_retransmission_inside_one_edit_emits_the_whole_replacement() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..CDEF..")
    p = seg(f, 0, 3, b"DE")
    assert p.new_seq == 2 and p.payload == b"c"


def test_a_fin_that_would_need_tail_expansion_is_dropped() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..CDEF..")
    assert seg(f, 0, 0, b"..CD", flags=ACK | FIN).action == "drop"


def test_a_segment_whose_bytes_are_all_deleted_is_sent_empty() -> None:
    f = Flow(None, 0.0)
    delete = matcher((b"secret", b""))
    seg(f, 0, 0, b"ab", find=delete)
    p = seg(f, 0, 2, b"secret", find=delete)  # a probe below rcv_nxt: the receiver re-ACKs
    assert p.action == "send_empty" and p.payload == b"" and p.new_seq == 1
    assert seg(f, 0, 8, b"cd", find=delete).new_seq == 2
    assert seg(f, 1, 0, ack=2).new_ack == 8  # deleted bytes count as delivered


def test_bytes_before_the_flow_began_map_with_offset_zero_and_are_never_edited() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 100, b"AB")
    p = seg(f, 0, 90, b"AB........AB")  # a retransmission of older, pre-flow bytes and more
    assert p.new_seq == 90 and p.payload == b"AB........xxxxx"


def test_what_the_other_side_acknowledged_before_we_saw_its_data_is_never_fresh() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"AB", ack=500)  # creates the flow; host 0 has received stream 1 up to 500
    p = seg(f, 1, 480, b"..........AB........AB..")  # AB at 490 passed before; AB at 500 is new
    assert p.new_seq == 480 and p.payload == b"..........AB........xxxxx.."
    assert p.applied == ((20, 22, b"xxxxx", b"AB"),)


def test_bytes_before_the_flow_began_get_same_length_edits_as_the_stateless_path_gave() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 100, b"AB")
    p = seg(f, 0, 90, b"KL.AB....K")  # KL would have been kl without a flow; AB would not grow
    assert p.new_seq == 90 and p.payload == b"kl.AB....K" and "stateless" in p.events
    p = seg(f, 0, 96, b"..KLAB")  # straddles the flow's start: KL ends before it
    assert p.payload == b"..klxxxxx"
    p = seg(f, 0, 99, b"KAB")  # a match across the flow's start is never taken
    assert p.payload == b"Kxxxxx" and "stateless" not in p.events


# -- SACK -----------------------------------------------------------------------------------------


def test_sack_edges_map_back_rounding_inward_and_empty_blocks_are_dropped() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..AB....AB..")  # AB 2..4 -> 2..7, AB 8..10 -> 11..16, end 12 -> 18
    p = seg(f, 1, 0, ack=0, sack=[(7, 11), (3, 6), (12, 18), (4, 16), (0, 13)])
    assert p.sack == ((4, 8), (10, 12), (4, 10), (0, 8))


def test_sack_blocks_that_need_no_change_leave_the_option_alone() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"....AB")
    assert seg(f, 1, 0, ack=0, sack=[(1, 3)]).sack is None


# -- wraparound, SYN --------------------------------------------------------------------------


def test_sequence_numbers_wrap_around_2_to_the_32() -> None:
    f = Flow(None, 0.0)
    isn = M32 - 4
    p = seg(f, 0, isn, b"..AB....")  # AB at 2**32-2 .. 2**32
    assert p.new_seq == isn and p.payload == b"..xxxxx...."
    assert seg(f, 0, isn + 8, b".").new_seq == 7  # (2**32 + 4 + 3) mod 2**32
    assert seg(f, 1, 0, ack=M32 - 1).new_ack == M32 - 2  # inside the replacement
    assert seg(f, 0, M32 - 1, b"B..").new_seq == M32 - 2  # expanded to the edit start
    p = seg(f, 1, 0, ack=7, sack=[(M32 - 1, 3)])
    assert p.new_ack == 4 and p.sack == ()  # the block held only part of the replacement


def test_a_syn_with_payload_carries_data_from_isn_plus_one() -> None:
    f = Flow(None, 0.0)
    p = seg(f, 0, 999, b"AB", flags=SYN)
    assert p.new_seq == 999 and p.payload == b"xxxxx"
    assert seg(f, 0, 1002, b".").new_seq == 1005
    again = seg(f, 0, 999, b"AB", flags=SYN)  # SYN retransmission
    assert again.payload == b"xxxxx" and again.fresh_edits == () and again.new_seq == 999
    assert seg(f, 1, 7000, ack=1006, flags=SYN | ACK).new_ack == 1003
    assert seg(f, 0, 999, b"AB", flags=SYN).action == "drop"  # its data is acked and forgotten


# -- memory -------------------------------------------------------------------------------------


def test_acknowledged_edits_are_collapsed_into_the_base_offset() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"AB..AB..AB..")
    assert f.edit_count(0) == 3
    assert seg(f, 1, 0, ack=14).new_ack == 8  # past the first two edits
    assert f.edit_count(0) == 1
    assert seg(f, 0, 12, b"..").new_seq == 21
    assert seg(f, 1, 0, ack=21).new_ack == 12
    assert f.edit_count(0) == 0


def test_old_duplicates_below_the_collapsed_floor_are_trimmed_or_sent_empty() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"AB..AB..")
    seg(f, 1, 0, ack=14)  # all acked: both edits collapsed, floor at 6
    p = seg(f, 0, 0, b"AB..AB")  # sent as a probe just below rcv_nxt, so the receiver re-ACKs
    assert p.action == "send_empty" and p.new_seq == 11 and p.payload == b""
    p = seg(f, 0, 4, b"AB....")
    assert p.action == "send" and p.new_seq == 12 and p.payload == b"...."
    assert "trimmed" in p.events


def test_a_keepalive_probe_at_snd_una_minus_one_stays_just_below_rcv_nxt() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..AB")  # rewritten ..xxxxx, rcv_nxt 7
    assert seg(f, 0, 3, b"").new_seq == 6  # zero-length probe, ack not seen by us yet
    seg(f, 1, 0, ack=7)  # now acked and collapsed
    assert seg(f, 0, 3, b"").new_seq == 6
    p = seg(f, 0, 3, b"?")  # a one-byte (BSD/Windows style) probe
    assert p.action == "send_empty" and p.new_seq == 6


def test_a_fin_retransmitted_with_acked_data_keeps_its_place() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"..AB", flags=ACK | FIN)
    seg(f, 1, 0, ack=7)  # data acked, FIN not
    p = seg(f, 0, 0, b"..AB", flags=ACK | FIN)
    assert p.action == "send_empty" and p.new_seq == 7


def test_a_matcher_that_breaks_its_contract_is_an_error() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 0, b"....")

    def overlapping(payload: bytes) -> list[Edit]:
        return [(0, 2, b"x", None), (1, 3, b"y", None)]

    def outside(payload: bytes) -> list[Edit]:
        return [(3, 9, b"x", None)]

    for bad in (overlapping, outside):
        with pytest.raises(ValueError):
            seg(f, 0, 4, b"..zz", find=bad)


# -- lifecycle ----------------------------------------------------------------------------------

KEY = flow_key(b"\x0a\0\0\1", 1234, b"\x0a\0\0\2", 80)[0]


def test_fin_in_both_directions_each_acked_ends_the_flow_after_the_grace_period() -> None:
    table = FlowTable(close_grace=10.0)
    f = created(table, KEY, 0.0)
    seg(f, 0, 100, b"AB", now=1.0)
    seg(f, 1, 500, b"", ack=105, now=1.0)
    seg(f, 0, 102, b"", flags=ACK | FIN, ack=500, now=2.0)  # FIN at original 102
    p = seg(f, 1, 500, b"", flags=ACK | FIN, ack=106, now=2.0)  # acks our FIN, sends its own
    assert "fin" in p.events and not f.ended
    p = seg(f, 0, 103, b"", ack=501, now=3.0)
    assert "closed" in p.events and f.ended
    assert table.expire(12.9) == 0
    assert table.expire(13.0) == 1
    assert table.flows_ended == 1 and table.flows_active == 0 and table.get(KEY) is None


def test_rst_ends_the_flow_after_the_grace_period() -> None:
    table = FlowTable(close_grace=5.0)
    f = created(table, KEY, 0.0)
    seg(f, 0, 100, b"AB", now=1.0)
    p = seg(f, 0, 102, b"", flags=RST, now=2.0)
    assert "rst" in p.events and f.ended
    seg(f, 0, 100, b"AB", now=3.0)  # a late retransmission is still adjusted
    assert table.expire(6.9) == 0 and table.expire(7.0) == 1
    assert table.stats()["flows_ended"] == 1


def test_idle_flows_expire() -> None:
    table = FlowTable(idle_timeout=300.0)
    a = created(table, KEY, 0.0)
    other = flow_key(b"\x0a\0\0\3", 1, b"\x0a\0\0\4", 2)[0]
    table.create(other, 100.0)
    seg(a, 0, 0, b"AB", now=200.0)  # activity keeps a flow alive
    assert table.expire(399.0) == 0
    assert table.expire(400.0) == 1 and table.get(other) is None and table.get(KEY) is a
    assert table.flows_expired == 1


def confirmed(table: FlowTable, key: FlowKey, now: float) -> Flow:
    """A flow the other side has answered: data one way, its ACK the other."""
    flow = created(table, key, now)
    seg(flow, 0, 0, b"AB", ack=0, now=now)
    seg(flow, 1, 0, ack=5, now=now)
    assert not flow.probation
    return flow


def test_a_full_table_evicts_the_least_recently_used_flow_and_counts_it() -> None:
    table = FlowTable(max_flows=2)
    keys = [flow_key(bytes([10, 0, 0, i]), 1, b"\x0a\0\0\xff", 2)[0] for i in range(3)]
    f0 = confirmed(table, keys[0], 0.0)
    confirmed(table, keys[1], 1.0)
    seg(f0, 0, 2, b"AB", now=2.0)  # keys[0] used more recently than keys[1]
    table.create(keys[2], 3.0)
    assert table.flows_evicted == 1 and table.get(keys[1]) is None and table.get(keys[0]) is f0
    assert table.create(keys[0], 4.0) is f0  # create on an existing key returns it
    s = table.stats()
    assert s["flows_created"] == 3 and s["flows_active"] == 2
    assert s["flows_created"] == (
        s["flows_active"] + s["flows_evicted"] + s["flows_expired"] + s["flows_ended"]
    )


def test_a_new_syn_on_an_ended_flow_starts_over() -> None:
    table = FlowTable()
    f = created(table, KEY, 0.0)
    seg(f, 0, 100, b"AB", flags=SYN, now=1.0)
    seg(f, 0, 103, b"", flags=RST, now=2.0)
    p = seg(f, 0, 9000, b"", flags=SYN, now=3.0)
    assert "restarted" in p.events and not f.ended and p.new_seq == 9000
    assert seg(f, 1, 0, ack=9001, flags=SYN | ACK).new_ack == 9001
    assert table.expire(100.0) == 0  # the stale end record does not remove the live flow


def test_a_reconnect_on_a_live_flow_starts_over_once_the_peer_accepts_it() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 100, b"AB", flags=SYN)
    seg(f, 1, 700, flags=SYN | ACK, ack=106)
    seg(f, 0, 103, b"....")  # the old connection: offset +3
    p = seg(f, 0, 5000, b"", flags=SYN)  # the client rebooted and reconnects
    assert "foreign_syn" in p.events and p.new_seq == 5000 and p.new_ack is None
    assert seg(f, 0, 107, b".").new_seq == 110  # the old state is still there meanwhile
    p = seg(f, 1, 9000, flags=SYN | ACK, ack=5001)
    assert "restarted" in p.events and p.new_seq == 9000 and p.new_ack == 5001
    assert seg(f, 0, 5001, b"..", ack=9001).new_seq == 5001
    assert f.edit_count(0) == 0


def test_a_stray_syn_on_a_live_flow_changes_nothing() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 100, b"AB", flags=SYN)
    seg(f, 1, 700, flags=SYN | ACK, ack=106)
    seg(f, 0, 1234, b"", flags=SYN)  # answered by a challenge ACK, not a SYN-ACK
    assert seg(f, 1, 701, ack=106).new_ack == 103
    assert seg(f, 0, 103, b".").new_seq == 106


def test_a_flow_without_edits_changes_nothing() -> None:
    f = Flow(None, 0.0)
    p = seg(f, 0, 5, b"hello", ack=77, sack=[(80, 90)], find=NONE)
    assert (p.action, p.new_seq, p.new_ack, p.payload, p.sack) == ("send", 5, 77, None, None)


# -- what a blind attacker cannot move ----------------------------------------------------------


def live_flow() -> Flow:
    """A connection with offsets both ways, paused: everything sent is acknowledged."""
    f = Flow(None, 0.0)
    seg(f, 0, 1000, b"..AB..", ack=5000, window=1000)  # +3: 1000..1006 -> 1000..1009
    seg(f, 1, 5000, b"CDEF..", ack=1009, window=1000)  # -3: 5000..5006 -> 5000..5003
    seg(f, 0, 1006, b"", ack=5003, window=1000)
    return f


def still_consistent(f: Flow) -> None:
    """The record is intact: new data is matched and mapped, real ACKs map back exactly."""
    p = seg(f, 0, 1006, b"AB", ack=5003)
    assert p.new_seq == 1009 and p.payload == b"xxxxx" and p.fresh_edits == (0,)
    assert seg(f, 1, 5006, b"CDEF", ack=1014).new_ack == 1008
    assert seg(f, 0, 1008, b"", ack=5004).new_ack == 5010
    assert not f.ended


@pytest.mark.parametrize("seq", [1006 + 10**6, 1006 + (1 << 30), 1006 - 10**6, 3, 1006 - 1])
def test_a_rst_not_where_its_sender_stands_is_passed_but_ends_nothing(seq: int) -> None:
    f = live_flow()
    p = seg(f, 0, seq, b"", flags=RST)
    assert p.events == ("rst_ignored",) and not f.ended and p.action == "send"
    still_consistent(f)


def test_a_rst_at_the_senders_place_ends_the_flow() -> None:
    f = live_flow()
    assert "rst" in seg(f, 1, 5006, b"", flags=RST | ACK, ack=1009).events and f.ended


def test_an_ack_for_data_never_sent_collapses_nothing() -> None:
    f = live_flow()
    seg(f, 0, 1006, b"AB..AB", ack=5003)  # two edits in flight
    assert f.edit_count(0) == 2
    p = seg(f, 1, 5006, b"", ack=(1021 + 10**6) % M32)
    assert "ack_unsent" in p.events and f.edit_count(0) == 2
    # the real ACKs that follow still map exactly
    assert seg(f, 1, 5006, b"", ack=1014).new_ack == 1008
    assert seg(f, 1, 5006, b"", ack=1021).new_ack == 1012 and f.edit_count(0) == 0


@pytest.mark.parametrize("ahead", [(1 << 31) - 1, 1 << 31, (1 << 31) + 7, 10**8])
def test_a_data_segment_far_ahead_is_dropped_and_moves_nothing(ahead: int) -> None:
    f = live_flow()
    p = seg(f, 0, 1006 + ahead, b"..AB..AB..", ack=5003)
    assert p.action == "drop" and "out_of_window" in p.events and p.applied == ()
    still_consistent(f)


def test_data_beyond_the_announced_window_is_dropped_and_within_it_is_taken() -> None:
    f = live_flow()  # the receiver announced 1000 bytes (scale unknown: up to 1000 << 14)
    assert seg(f, 0, 1006 + (1000 << 14) + (1 << 17), b"AB").action == "drop"
    p = seg(f, 0, 1006 + 5000, b"AB")  # after a gap (bytes lost before the appliance)
    assert p.action == "send" and p.fresh_edits == (0,)


def test_with_both_syns_seen_the_window_scale_is_known() -> None:
    f = Flow(None, 0.0)
    seg(f, 0, 100, b"", flags=SYN, wscale=2)
    seg(f, 1, 700, b"", flags=SYN | ACK, ack=101, wscale=3)
    seg(f, 0, 101, b"AB", ack=701, window=100)
    seg(f, 1, 701, b"", ack=106, window=100)  # right edge: 103 + (100 << 3)
    assert seg(f, 0, 103 + 800 + (1 << 16) + 1, b"AB").action == "drop"
    assert seg(f, 0, 103 + 800, b"AB").action == "send"


def test_a_fin_far_from_the_end_of_the_data_is_not_recorded() -> None:
    f = live_flow()
    assert "fin_ignored" in seg(f, 0, 900, b"", flags=FIN | ACK, ack=5003).events
    assert f.ways[0].fin is None
    still_consistent(f)


# -- memory budget, probation, fairness ----------------------------------------------------------


def keys(n: int, first: int = 0) -> list[FlowKey]:
    return [flow_key((first + i).to_bytes(4, "big"), 1000 + i % 60000, b"\xc6\x12\0\2", 80)[0]
            for i in range(n)]


def test_a_flood_of_one_packet_flows_stays_on_probation_and_never_evicts_a_confirmed_flow(
) -> None:
    table = FlowTable(max_flows=64, memory=1 << 20)
    real = confirmed(table, KEY, 0.0)
    for i, key in enumerate(keys(10_000)):
        spoofed = table.create(key, 1.0 + i * 1e-4)
        if spoofed is not None:
            seg(spoofed, 0, 77_000 + i, b"..AB..CDEF", ack=99, now=1.0 + i * 1e-4)
        assert table.flows_on_probation <= 64 // 8
        assert table.memory_used <= table.memory
    assert table.get(KEY) is real and not real.probation
    assert table.flows_active <= 1 + 64 // 8
    s = table.stats()
    assert s["flows_created"] == (
        s["flows_active"] + s["flows_evicted"] + s["flows_expired"] + s["flows_ended"]
    )


def test_a_flow_is_confirmed_when_the_other_side_acknowledges_its_bytes_not_by_a_rst() -> None:
    table = FlowTable()
    f = created(table, KEY, 0.0)
    seg(f, 0, 100, b"AB", ack=500)
    seg(f, 1, 500, b"", flags=RST | ACK, ack=105)  # what a host with no such socket answers
    assert f.probation and table.flows_on_probation == 1
    g = created(table, flow_key(b"\x0a\0\0\x09", 9, b"\x0a\0\0\2", 80)[0], 0.0)
    seg(g, 0, 100, b"AB", ack=500)
    seg(g, 1, 500, b"", ack=105)
    assert not g.probation and table.flows_on_probation == 1


def test_memory_is_counted_per_edit_and_per_flow_and_given_back() -> None:
    table = FlowTable(memory=1 << 20)
    f = confirmed(table, KEY, 0.0)
    before = table.memory_used
    seg(f, 0, 2, b"AB" * 100, ack=0)
    assert table.memory_used == before + 100 * EDIT_BYTES
    seg(f, 1, 0, ack=5 + 300 + 200)  # everything acknowledged
    assert f.edit_count(0) == 0 and table.memory_used == FLOW_BYTES
    table.retract(KEY)
    assert table.memory_used == 0


def test_an_exhausted_budget_refuses_edits_and_counts_them_but_makes_same_length_ones() -> None:
    table = FlowTable(memory=16 * FLOW_BYTES)  # room for ~670 edits
    f = confirmed(table, KEY, 0.0)
    p = seg(f, 0, 2, b"AB" * 700 + b"KL", ack=0)
    assert "refused" in p.events and table.edits_refused == 700
    assert p.payload == b"AB" * 700 + b"kl"  # the same-length edit is made all the same
    assert table.memory_used <= table.memory
    assert seg(f, 0, 1404, b"AB" * 600, ack=0).fresh_edits  # what fits is taken


def test_near_the_budget_a_flow_past_its_fair_share_is_refused_and_a_small_one_is_not() -> None:
    table = FlowTable(memory=4 * FLOW_BYTES + 100 * EDIT_BYTES)  # fair share: half each
    big = confirmed(table, KEY, 0.0)
    small = confirmed(table, flow_key(b"\x0a\0\0\x09", 9, b"\x0a\0\0\2", 80)[0], 0.0)
    assert seg(big, 0, 2, b"AB" * 100, ack=0).fresh_edits  # below 7/8 of the budget: taken
    p = seg(big, 0, 202, b"AB" * 60, ack=0)  # past 7/8, and past its share: refused
    assert "refused" in p.events and table.memory_used + 60 * EDIT_BYTES <= table.memory
    assert seg(small, 0, 2, b"AB" * 55, ack=0).fresh_edits  # past 7/8, within its share


def test_a_table_without_room_for_a_new_flow_refuses_it() -> None:
    table = FlowTable(memory=FLOW_BYTES * 8 + 8 * EDIT_BYTES)
    flows = [confirmed(table, k, 0.0) for k in keys(8)]
    assert all(table.get(f.key) is f for f in flows if f.key is not None)
    assert table.create(KEY, 1.0) is None and table.stats()["flows_refused"] == 1


def test_a_young_flow_on_probation_is_kept_and_the_newcomer_refused_a_stale_one_evicted() -> None:
    table = FlowTable(max_flows=8)  # one flow on probation at a time
    young = created(table, KEY, 0.0)
    seg(young, 0, 0, b"AB", ack=0, now=0.0)  # it carries an offset already
    assert table.create(keys(1)[0], 1.0) is None and table.get(KEY) is young
    assert table.stats()["flows_refused"] == 1
    newcomer = table.create(keys(1)[0], 2.5)  # 2.5 s without an answer: taken for spoofed
    assert newcomer is not None and table.get(KEY) is None and table.flows_evicted == 1
