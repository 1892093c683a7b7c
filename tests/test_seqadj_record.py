"""Property test: one direction's compact edit record against a plain reference model.

The record (``seqadj._Way``) keeps its edits in ``array('q')`` columns, collapses acknowledged ones
by moving a head index and compacts the arrays now and then.  The reference below keeps every edit
ever recorded in one Python list, forgets nothing, and answers every question by walking it from
the start.  Random streams of appends (gaps, grow, shrink, delete, same length; up to a few
hundred edits, so compaction happens) and collapses at random acknowledged points, with every
mapping compared after each step at random positions: original -> rewritten, rewritten ->
original rounding down and up, "inside an edit", the offset at a boundary, the MTU cut.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from nfrewrite.core.seqadj import _Way


@dataclass
class Reference:
    """Every edit as (start, end, replacement), never compacted; ``collapsed`` of them are
    behind the floor."""

    origin: int
    edits: list[tuple[int, int, bytes]] = field(default_factory=list)
    collapsed: int = 0

    def offset_after(self, i: int) -> int:
        return sum(len(r) - (e - s) for s, e, r in self.edits[: i + 1])

    @property
    def base(self) -> int:
        return self.offset_after(self.collapsed - 1) if self.collapsed else 0

    @property
    def floor(self) -> int | None:
        return self.edits[self.collapsed - 1][1] if self.collapsed else None

    def nstart(self, i: int) -> int:
        return self.edits[i][0] + (self.offset_after(i - 1) if i else 0)

    def inside(self, pos: int) -> int:
        for i in range(self.collapsed, len(self.edits)):
            s, e, _ = self.edits[i]
            if s < pos < e:
                return i
        return -1

    def to_new(self, pos: int) -> int:
        floor = self.floor
        if floor is not None and pos < floor:
            return pos + self.base
        i = self.inside(pos)
        if i >= 0:
            s, e, r = self.edits[i]
            return max(self.nstart(i), self.nstart(i) + len(r) - (e - pos))
        done = [i for i, (_, e, _) in enumerate(self.edits) if e <= pos]
        return pos + (self.offset_after(done[-1]) if done else 0)

    def to_orig(self, q: int, round_up: bool) -> int:
        kept = [i for i in range(self.collapsed, len(self.edits)) if self.nstart(i) <= q]
        if not kept:
            return q - self.base
        j = kept[-1]
        s, e, r = self.edits[j]
        if q >= self.nstart(j) + len(r):
            return q - self.offset_after(j)
        if q == self.nstart(j) or not round_up:
            return s
        return e

    def cut_before(self, new_start: int, limit: int) -> int:
        q = new_start + limit
        for j in range(self.collapsed, len(self.edits)):
            if self.nstart(j) < q < self.nstart(j) + len(self.edits[j][2]):
                q = self.nstart(j)
        return max(0, q - new_start)

    def collapse(self, acked: int) -> None:
        while self.collapsed < len(self.edits) and self.edits[self.collapsed][1] <= acked:
            self.collapsed += 1


REPLACEMENTS = [b"", b"x", b"xy", b"xyz", b"wxyz!", b"0123456789"]
edit_st = st.tuples(st.integers(0, 4), st.integers(1, 5), st.sampled_from(REPLACEMENTS))
step_st: st.SearchStrategy[tuple[str, int, list[tuple[int, int, bytes]]]] = st.one_of(
    st.tuples(st.just("record"), st.integers(0, 30), st.lists(edit_st, min_size=1, max_size=40)),
    st.tuples(st.just("collapse"), st.integers(0, 1000), st.just([])),
)


@settings(max_examples=int(os.environ.get("SEQADJ_EXAMPLES", "300")), deadline=None)
@given(origin=st.integers(-(1 << 33), 1 << 33), steps=st.lists(step_st, max_size=30),
       probes=st.lists(st.integers(0, 1000), min_size=8, max_size=8), data=st.data())
def test_the_compact_record_answers_like_a_plain_list_of_edits(
    origin: int, steps: list[tuple[str, int, list[tuple[int, int, bytes]]]], probes: list[int],
    data: st.DataObject,
) -> None:
    way, ref = _Way(), Reference(origin)
    way.start_at(origin, None)
    hi = origin
    for kind, number, edits in steps:
        if kind == "record":
            at = hi + number  # a segment beyond hi (after a gap of `number` bytes)
            starts, ends, repls = [], [], []
            pos = 0
            for gap, length, repl in edits:
                starts.append(pos + gap)
                ends.append(pos + gap + length)
                repls.append(repl)
                pos += gap + length
            way.record(at, starts, ends, repls)
            ref.edits += [(at + a, at + b, r) for a, b, r in zip(starts, ends, repls, strict=True)]
            hi = at + pos
        else:
            low = ref.floor if ref.floor is not None else origin
            acked = low + number * (hi - low) // 1000
            way.collapse(acked)
            ref.collapse(acked)
        assert way.kept() == len(ref.edits) - ref.collapsed
        assert len(way.starts) <= 2 * way.kept() + 64  # collapsed entries do not pile up
        assert way.base == ref.base and way.floor == ref.floor
        top = ref.offset_after(len(ref.edits) - 1) if ref.edits else 0
        assert way.top_offset() == (top if ref.edits[ref.collapsed:] else ref.base)
        span = hi - origin + 20
        for p in probes:
            pos = origin - 10 + p * span // 1000
            mine, theirs = way.inside(pos), ref.inside(pos)
            assert (mine - way.head if mine >= 0 else -1) == (
                theirs - ref.collapsed if theirs >= 0 else -1)
            assert way.to_new(pos) == ref.to_new(pos), pos
            q = ref.to_new(pos) + data.draw(st.integers(-3, 3), label="jitter")
            if ref.floor is None or q >= ref.floor + ref.base:
                assert way.to_orig(q, round_up=False) == ref.to_orig(q, round_up=False), q
                assert way.to_orig(q, round_up=True) == ref.to_orig(q, round_up=True), q
                limit = data.draw(st.integers(0, 40), label="limit")
                assert way.cut_before(q, limit) == ref.cut_before(q, limit)
            if ref.inside(pos) < 0 and (ref.floor is None or pos >= ref.floor):
                assert way.offset_at(pos) == ref.to_new(pos) - pos
