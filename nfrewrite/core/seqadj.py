"""Per-flow TCP sequence, acknowledgement and SACK adjustment for length-changing payload edits.

What it is for
==============
The engine rewrites TCP payloads by literal find -> replace, and a replacement may be longer or
shorter than what it replaces.  After such an edit every later sequence number of that direction,
and every acknowledgement and SACK edge of the opposite direction, is off by the accumulated
difference, and nobody in the kernel path fixes it for us.  This module keeps, per flow and per
direction, the list of edits made to the byte stream and turns each segment's numbers and payload
into the ones to emit.  It is sans-I/O: numbers and bytes in, numbers and bytes out.  It must not
open sockets, read clocks (time comes in as ``now``), log (events are returned), parse packets or
compute checksums (the engine does that, incrementally, from the numbers returned here).

Theory of operation
===================
Two sequence spaces exist per direction: ORIGINAL (what the sender sent) and REWRITTEN (what the
receiver gets).  Inside a flow all positions are unwrapped 32-bit sequence numbers: an incoming
32-bit value is placed within 2**31 of a reference point of the same space (the highest original
byte seen, or its rewritten image), so comparisons and differences are plain integer arithmetic
and streams that cross 2**32 need no special case; results are reduced modulo 2**32 on the way out.

Each direction (``_Way``) holds an ordered list of edits in original space: edit ``i`` replaces
original bytes ``[starts[i], ends[i])`` with ``repls[i]``; ``cum[i]`` is the total length change
after it (``base`` is the change in force before the first kept edit).  Edits never overlap and
are only ever appended, because fresh matching happens only beyond ``hi``, the highest original
byte seen so far.  The rewritten images ``nstarts[i]``/``nends[i]`` are kept alongside so both
mappings are one ``bisect`` each:

* original -> rewritten (``seq`` of this direction): ``p + offset in force at p``;
* rewritten -> original (``ack`` and SACK edges, which the other side sends about this
  direction): ``q - offset``; a point strictly inside a replacement has no exact original image,
  so an ACK there rounds DOWN to the edit's original start (the sender retransmits the edit, which
  is harmless) and SACK edges round inward (left edge up to the edit's end, right edge down to its
  start; a block that becomes empty is dropped): we never claim the receiver has more than it has.

Retransmissions.  An edit is a function of original stream position, never of arrival order.
Bytes below ``hi`` are "seen": they get exactly the recorded edits and are never matched again
(``find_edits`` is told ``fresh_from``, the number of leading seen bytes, and only matches starting
there are taken).  Bytes below the first segment a flow saw in a direction (the flow is created at
the first length change) map with offset 0 and are treated as the engine's stateless path treated
them before the flow existed: same-length edits found inside that part are applied (not recorded),
length-changing ones are not.  A gap (a segment beyond ``hi``, the bytes in between never seen) is
simply not edited when those bytes show up later.

Flows begin mid-stream (at the first length change), so what passed before is known only from
below: a direction starts at its first segment, or earlier at the first ACK the other side sends
about it (bytes it acknowledges have certainly passed, so they are never matched as fresh).  Limit:
bytes that passed before the flow existed and were still unacknowledged when it began look fresh
if they come again, and so does the flow's first segment itself.  If such a retransmission is cut
differently (Linux collapses small retransmissions) so that it now contains a length-changing match
that the first transmission split across two segments, that match is applied to bytes the receiver
may already hold unedited.  Avoiding this needs a seen-mark for every connection, which the
no-state fast path deliberately does not keep.

Split edits (the decision).  A retransmission whose boundaries cut an earlier edit (it starts or
ends strictly inside an original ``find`` span) is EXPANDED to the whole edit: the emitted segment
starts at the edit's rewritten start (head split) and/or ends at its rewritten end (tail split),
and the replacement bytes come from the record, not from the packet.  So mapped boundaries are
always exact, the bytes emitted are exactly the rewritten stream at those positions (no
contradiction with anything the receiver has or will get), and no rewritten byte is ever withheld,
so a sender that keeps re-cutting the same edit still makes progress.  This is sound because an
edit is recorded only from bytes the sender has already sent (so acknowledging up to the edit's end
never acknowledges unsent data) and because TCP retransmits the same bytes at the same positions.
An expanded segment may be up to one replacement longer at each end (MTU is the engine's concern,
as for any growing edit).  A head-expanded SYN or a tail-expanded FIN cannot occur in a consistent
stream; such a segment gets action ``"drop"``.

Memory.  When the opposite direction acknowledges original position ``A`` (mapped as above), the
sender will never again need edits ending at or below ``A``; they are collapsed into ``base`` and
``floor`` becomes the end of the last collapsed edit.  Data below ``floor`` (only ever an old
duplicate or a retransmission racing the ACK: the receiver has it) is trimmed off.

Growing past the MTU.  A segment that grows may no longer fit the link (a bridge drops what
exceeds the port's MTU, and NFQUEUE gives back one packet per packet). Given ``max_payload``, a
longer result is cut at the last position that is not inside a replacement: the receiver
acknowledges the part it got, the ACK maps back exactly (the cut is at an edit boundary), and the
sender retransmits the rest, which is replayed with the recorded edits (its bytes count as seen).
A FIN on a cut segment is removed (``clear_fin``): it belongs after the bytes left behind and
comes again with them. Costs a retransmission per cut segment, never correctness.

Empty results.  A data segment with nothing left to emit (all of it below ``floor``, or all of it
deleted by edits) becomes ``"send_empty"``: no payload, same ACK and flags, and ``seq`` one below
the rewritten position where its bytes would have gone, like a keepalive probe.  The receiver
answers such a segment with an ACK, as it answers the original (old data is re-ACKed at once).
Without that, a sender whose last bytes were deleted, or whose ACK we forwarded was lost behind
us, would retransmit into silence forever.  With SYN, FIN or RST the seq stays at its exact place
(they must land there, and SYN and FIN elicit an ACK by themselves).  ACKs
and SACK edges below the rewritten floor are older than an ACK already forwarded; they map with
``base`` (possibly inexact, always below the floor, so the sender ignores them as old) and such
SACK blocks are clipped to the floor or dropped.  Each direction also has a cap on kept edits
(``max_edits``); a segment whose fresh edits would exceed it gets none of them (counted as
``edits_refused``).

Same-length edits.  A flow with state records every fresh edit, same-length ones too, so that a
retransmission with different boundaries is edited identically.  A flow without state needs no
record: the engine applies same-length edits statelessly (``apply_edits``), which is consistent for
retransmissions only when segmentation is the same (documented limit, as for patterns split
across segments).

SYN and FIN each consume one sequence number; a SYN's payload starts at ISN + 1.  A flow ends
after a FIN in both directions, each acknowledged, or on RST; it is kept ``close_grace`` seconds
more for the last ACKs and retransmissions.  A SYN with a new ISN on an ended flow starts over.  On
a live flow such a SYN is passed untouched and the state kept (a stray or spoofed SYN must not wipe
the offsets of a working connection); the flow starts over only when the peer answers it with a
SYN-ACK (a live peer answers a stray SYN with a challenge ACK instead).

API (what the engine calls)
===========================
``key, direction = flow_key(src, sport, dst, dport)``: canonical key and direction 0/1.

``FlowTable(max_flows=65536, idle_timeout=300.0, close_grace=10.0, max_edits=4096)``:
``get(key) -> Flow | None``; ``create(key, now) -> Flow`` (returns the existing flow if there is
one; when full, first drops expired flows, then evicts the least recently used, counted);
``expire(now) -> int`` (drops ended flows past their grace and idle flows; returns how many);
``retract(key)`` (takes a creation back: the flow's first segment could not be emitted);
``len(table)``; counters ``flows_active`` (property), ``flows_created``,
``flows_evicted``, ``flows_expired``, ``flows_ended``, ``edits_refused``, ``segments_cut``;
``stats() -> dict``.
Invariant: created == active + evicted + expired + ended.

``Flow.rewrite(direction, seq, ack, flags, payload, sack, now, find_edits) -> SegmentPlan``:
``seq``/``ack``/SACK edges are the raw 32-bit header values; ``ack`` is None when the ACK flag is
clear; ``flags`` is the TCP flags byte; ``find_edits(payload, fresh_from)`` returns
non-overlapping ``(start, end, replacement)`` with ``fresh_from <= start < end <= len(payload)``
(anything else raises ``ValueError``: an engine bug).  The first call on a new flow treats all of
the segment's bytes as fresh.  See ``SegmentPlan`` for what comes back.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from nfrewrite.core.constants import FIN, RST, SYN
from nfrewrite.core.packet import splice

__all__ = [
    "Action",
    "Edit",
    "FindEdits",
    "Flow",
    "FlowKey",
    "FlowTable",
    "SegmentPlan",
    "flow_key",
]

_MOD = 1 << 32
_HALF = 1 << 31

Edit = tuple[int, int, bytes]
"""(start, end, replacement): offsets within one payload, ``start < end``."""

FindEdits = Callable[[bytes, int], list[Edit]]
"""The engine's matcher: ``find_edits(payload, fresh_from)``."""

Endpoint = tuple[bytes, int]
FlowKey = tuple[int, Endpoint, Endpoint]
Action = Literal["send", "send_empty", "drop"]


def flow_key(src: bytes, sport: int, dst: bytes, dport: int) -> tuple[FlowKey, int]:
    """Canonical flow key and direction: 0 if (src, sport) is the smaller endpoint, else 1.

    The key is ``(ip_version, low_endpoint, high_endpoint)`` with endpoint = ``(addr, port)``, so
    both directions of a connection give the same key.  A flow whose two endpoints are equal
    (possible only on loopback) gets direction 0 both ways and cannot be adjusted.
    """
    version = 4 if len(src) == 4 else 6
    a: Endpoint = (src, sport)
    b: Endpoint = (dst, dport)
    if a <= b:
        return (version, a, b), 0
    return (version, b, a), 1


def _unwrap(value: int, ref: int) -> int:
    """The integer congruent to ``value`` mod 2**32 that lies within 2**31 of ``ref``."""
    return ref + ((value - ref + _HALF) % _MOD) - _HALF


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    """What the engine must emit for one segment.

    ``action``: ``"send"`` (emit with the fields below), ``"send_empty"`` (emit without payload,
    same flags and ACK, at ``new_seq``: everything it carried is already acknowledged or was
    deleted; see "Empty results" in the module doc) or ``"drop"`` (inconsistent with the recorded
    stream: a SYN or FIN in the middle of it).
    ``new_seq``/``new_ack``: 32-bit header values (``new_ack`` is None iff the ACK was None).
    ``payload``: new payload, ``None`` = unchanged (``b""`` for ``send_empty``).
    ``sack``: new SACK blocks (32-bit edges), ``None`` = unchanged; may have fewer blocks than
    given (a block that maps to nothing is dropped; pad the option with NOPs).
    ``fresh_edits``: indices into what ``find_edits`` returned that were recorded and applied
    (count these per rule), in start order; ``applied``: the same edits as the tuples
    ``find_edits`` returned; ``replayed_edits``: recorded edits re-applied to seen bytes (not
    new rewrites: do not count them per rule).
    ``events``: names of what happened: ``trimmed``, ``expanded``, ``refused``, ``fin``, ``rst``,
    ``closed`` (both FINs acknowledged), ``restarted`` (a new connection on this flow's 4-tuple),
    ``foreign_syn`` (a SYN with a new ISN on a live flow, passed untouched), ``drop``,
    ``stateless`` (same-length edits applied to bytes from before the flow began).
    """

    action: Action
    new_seq: int
    new_ack: int | None
    payload: bytes | None
    sack: tuple[tuple[int, int], ...] | None
    fresh_edits: tuple[int, ...] = ()
    applied: tuple[Edit, ...] = ()
    replayed_edits: int = 0
    events: tuple[str, ...] = ()
    clear_fin: bool = False  # the segment was cut: its FIN goes with the bytes left behind


class _Way:
    """One direction's edit record (all positions unwrapped, original space unless noted)."""

    __slots__ = (
        "started",
        "isn",
        "origin",
        "hi",
        "base",
        "floor",
        "starts",
        "ends",
        "repls",
        "cum",
        "nstarts",
        "nends",
        "fin",
        "fin_acked",
    )

    def __init__(self) -> None:
        self.started = False
        self.isn: int | None = None  # raw 32-bit ISN if a SYN was seen
        self.origin = 0  # first byte position this flow saw (edit knowledge begins here)
        self.hi = 0  # end of the highest original byte seen
        self.base = 0  # offset in force before the first kept edit
        self.floor: int | None = None  # end of the last collapsed edit (knowledge lost below)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.repls: list[bytes] = []
        self.cum: list[int] = []  # offset in force after edit i
        self.nstarts: list[int] = []  # rewritten start of edit i
        self.nends: list[int] = []  # rewritten end of edit i
        self.fin: int | None = None  # original position of the FIN
        self.fin_acked = False

    def start_at(self, pos: int, isn: int | None) -> None:
        """First segment seen in this direction: edit knowledge begins at ``pos``."""
        self.started = True
        self.isn = isn
        self.origin = pos
        self.hi = pos

    def offset_at(self, pos: int) -> int:
        """Offset in force at a boundary ``pos`` (not strictly inside an edit)."""
        i = bisect_right(self.ends, pos)
        return self.cum[i - 1] if i else self.base

    def top_offset(self) -> int:
        return self.cum[-1] if self.cum else self.base

    def inside(self, pos: int) -> int:
        """Index of the edit strictly containing ``pos``, or -1."""
        i = bisect_right(self.starts, pos) - 1
        if i >= 0 and pos < self.ends[i] and pos > self.starts[i]:
            return i
        return -1

    def to_new(self, pos: int) -> int:
        """Original -> rewritten.  Below ``floor`` (forgotten): ``pos + base``.  Strictly inside an
        edit (only a bare ACK or probe can point there) keep the distance to the edit's end, so a
        keepalive at ``snd_una - 1`` stays just below the receiver's ``rcv_nxt``."""
        if self.floor is not None and pos < self.floor:
            return pos + self.base
        i = self.inside(pos)
        if i >= 0:
            return max(self.nstarts[i], self.nends[i] - (self.ends[i] - pos))
        return pos + self.offset_at(pos)

    def to_orig(self, q: int, round_up: bool) -> int:
        """Rewritten -> original; inside a replacement round down to its start or up to its end."""
        j = bisect_right(self.nstarts, q) - 1
        if j < 0:
            return q - self.base
        if q >= self.nends[j]:
            return q - self.cum[j]
        if q == self.nstarts[j] or not round_up:
            return self.starts[j]
        return self.ends[j]

    def cut_before(self, new_start: int, limit: int) -> int:
        """The longest rewritten length <= ``limit`` from ``new_start`` that does not end strictly
        inside a replacement (0 if the first replacement alone is too long)."""
        q = new_start + limit
        j = bisect_right(self.nstarts, q) - 1
        if j >= 0 and self.nstarts[j] < q < self.nends[j]:
            q = self.nstarts[j]
        return max(0, q - new_start)

    def new_floor(self) -> int | None:
        return None if self.floor is None else self.floor + self.base

    def collapse(self, acked: int) -> None:
        """Forget edits that end at or below the acknowledged original position ``acked``."""
        k = bisect_right(self.ends, acked)
        if not k:
            return
        self.base = self.cum[k - 1]
        self.floor = self.ends[k - 1]
        for lst in (self.starts, self.ends, self.repls, self.cum, self.nstarts, self.nends):
            del lst[:k]

    def record_many(self, at: int, edits: Iterable[Edit]) -> None:
        """Append edits (start-ordered, after every recorded one), positions relative to ``at``.
        A GSO super-packet can bring dozens: one loop with local appends."""
        offset = self.top_offset()
        starts, ends, repls = self.starts.append, self.ends.append, self.repls.append
        cum, nstarts, nends = self.cum.append, self.nstarts.append, self.nends.append
        for a, b, repl in edits:
            start = at + a
            starts(start)
            ends(at + b)
            repls(bytes(repl))
            nstarts(start + offset)
            nends(start + offset + len(repl))
            offset += len(repl) - (b - a)
            cum(offset)


class Flow:
    """Sequence-adjustment state of one TCP connection (both directions).  See module doc."""

    __slots__ = ("key", "ways", "last_seen", "ended_at", "_table", "max_edits", "_new_syn")

    def __init__(
        self,
        key: FlowKey | None,
        now: float,
        max_edits: int = 4096,
        table: FlowTable | None = None,
    ) -> None:
        self.key = key
        self.ways = (_Way(), _Way())
        self.last_seen = now
        self.ended_at: float | None = None
        self.max_edits = max_edits
        self._table = table
        self._new_syn: tuple[int, int] | None = None  # (direction, ISN): SYN on a live flow

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def edit_count(self, direction: int) -> int:
        """Edits currently kept for ``direction`` (memory use; collapsed ones excluded)."""
        return len(self.ways[direction].starts)

    # -- the per-segment entry point -------------------------------------------------------

    def rewrite(  # noqa: C901 - the steps of one segment's plan, in order, on one flow state
        self,
        direction: int,
        seq: int,
        ack: int | None,
        flags: int,
        payload: bytes,
        sack: Sequence[tuple[int, int]],
        now: float,
        find_edits: FindEdits,
        max_payload: int | None = None,
    ) -> SegmentPlan:
        """Plan the emission of one segment travelling in ``direction`` (0 or 1).

        ``max_payload``: the most payload bytes the emitted segment may carry (what the link's MTU
        leaves after the headers); a segment that grew past it is cut (see "Growing past the MTU"
        in the module doc)."""
        events: list[str] = []
        self._touch(now)
        way = self.ways[direction]
        other = self.ways[1 - direction]
        syn = 1 if flags & SYN else 0

        if syn and way.started and way.isn != seq:
            if self.ended:
                self._restart(events)
            elif ack is None:
                # a SYN with a new ISN on a live flow: a reconnect on the same 4-tuple, or a stray.
                # It belongs to no offset we know: pass it untouched and keep the state.
                self._new_syn = (direction, seq)
                events.append("foreign_syn")
                return SegmentPlan("send", seq % _MOD, None, None, None, events=tuple(events))
            elif self._new_syn == (1 - direction, (ack - 1) % _MOD):
                # the peer accepted that SYN: the old connection is gone, a new one begins
                isn = self._new_syn[1]
                self._restart(events)
                self.ways[1 - direction].start_at((isn + 1) % _MOD, isn)
            way = self.ways[direction]
            other = self.ways[1 - direction]
        if not way.started:
            way.start_at((seq + syn) % _MOD, seq if syn else None)
        elif syn and way.isn is None:
            way.isn = seq

        s = _unwrap(seq + syn, way.hi)
        e = s + len(payload)
        given = payload
        if payload and s < way.origin and way.floor is None:
            payload = self._stateless_prefix(payload, way.origin - s, find_edits, events)
        fresh_idx: tuple[int, ...] = ()
        applied: tuple[Edit, ...] = ()
        if payload and e > way.hi:
            fresh_idx, applied = self._record_fresh(way, s, given, find_edits, events)
        if payload and e > way.hi:
            way.hi = e  # only bytes move it: a bare ACK or FIN beyond a gap does not

        action: Action = "send"
        new_payload: bytes | None = None
        replayed = 0
        if syn and way.floor is not None and s < way.floor:
            # a SYN after its data was acknowledged and forgotten: nothing valid to emit
            action, new_seq = "drop", s + way.base
            events.append("drop")
        elif not payload:
            new_seq = way.to_new(s)
        else:
            action, new_seq, new_payload, replayed = self._plan_payload(
                way, s, e, payload, flags, events
            )
            replayed -= len(fresh_idx)
        if new_payload is None and payload is not given and action == "send":
            new_payload = payload
        clear_fin = False
        if (
            max_payload is not None
            and action == "send"
            and new_payload is not None
            and len(new_payload) > max_payload
            and not flags & SYN
        ):
            keep = way.cut_before(new_seq, max_payload)
            if 0 < keep < len(new_payload):
                new_payload = new_payload[:keep]
                clear_fin = bool(flags & FIN)
                events.append("cut")
                if self._table is not None:
                    self._table.segments_cut += 1
        if action == "send" and new_payload == b"":
            action = "send_empty"  # everything it carried was deleted by edits
        if action == "send_empty" and not flags & (SYN | FIN | RST):
            new_seq -= 1  # a probe just below where the bytes went: the receiver re-ACKs
        if flags & FIN and action != "drop" and way.fin is None:
            way.fin = e
            events.append("fin")

        new_ack: int | None = None
        if ack is not None:
            new_ack = self._map_ack(other, ack, events)
        new_sack = self._map_sack(other, sack) if sack else None

        if flags & RST and not self.ended:
            events.append("rst")
            self._end(now)
        return SegmentPlan(
            action=action,
            new_seq=(new_seq - syn) % _MOD,
            new_ack=new_ack,
            payload=new_payload,
            sack=new_sack,
            fresh_edits=fresh_idx,
            applied=applied,
            replayed_edits=max(replayed, 0),
            events=tuple(events),
            clear_fin=clear_fin,
        )

    # -- pieces of rewrite -------------------------------------------------------------------

    @staticmethod
    def _stateless_prefix(
        payload: bytes, upto: int, find_edits: FindEdits, events: list[str]
    ) -> bytes:
        """Same-length edits inside ``payload[:upto]`` (bytes from before the flow began)."""
        same = sorted(
            (a, b, r)
            for a, b, r in find_edits(payload, 0)
            if b <= upto and len(r) == b - a and payload[a:b] != r
        )
        if not same:
            return payload
        events.append("stateless")
        return splice(payload, same)

    def _record_fresh(
        self, way: _Way, s: int, payload: bytes, find_edits: FindEdits, events: list[str]
    ) -> tuple[tuple[int, ...], tuple[Edit, ...]]:
        fresh_from = max(0, way.hi - s)
        found = find_edits(payload, fresh_from)
        if not found:
            return (), ()
        starts = [a for a, _, _ in found]
        if starts == sorted(starts):  # as every FindEdits in this package returns them
            order: tuple[int, ...] = tuple(range(len(found)))
            edits = tuple(found)
        else:
            order = tuple(sorted(range(len(found)), key=lambda k: found[k][0]))
            edits = tuple(found[k] for k in order)
        last_end = fresh_from
        size = len(payload)
        for start, end, _repl in edits:
            if start < last_end or end <= start or end > size:
                raise ValueError(
                    f"find_edits returned {(start, end)} outside/overlapping "
                    f"[{fresh_from}, {size}) (fresh_from={fresh_from})"
                )
            last_end = end
        if len(way.starts) + len(found) > self.max_edits:
            events.append("refused")
            if self._table is not None:
                self._table.edits_refused += len(found)
            return (), ()
        way.record_many(s, edits)
        return order, edits

    def _plan_payload(
        self, way: _Way, s: int, e: int, payload: bytes, flags: int, events: list[str]
    ) -> tuple[Action, int, bytes | None, int]:
        lo = s
        floor = way.floor
        if floor is not None and s < floor:
            if e <= floor:
                events.append("trimmed")
                if flags & (SYN | FIN) and e != floor:
                    events.append("drop")
                    return "drop", way.to_new(s), None, 0
                nf = way.new_floor()
                assert nf is not None
                return "send_empty", nf, b"", 0
            lo = floor
            events.append("trimmed")
        hi = e
        i = way.inside(lo)
        if i >= 0:
            lo = way.starts[i]
            events.append("expanded")
            if flags & SYN:
                events.append("drop")
                return "drop", way.to_new(s), None, 0
        j = way.inside(hi)
        if j >= 0:
            hi = way.ends[j]
            if "expanded" not in events:
                events.append("expanded")
            if flags & FIN:
                events.append("drop")
                return "drop", way.to_new(s), None, 0
        i0 = bisect_left(way.starts, lo)
        i1 = bisect_left(way.starts, hi)
        new_seq = way.to_new(lo)
        if i0 == i1 and lo == s and hi == e:
            return "send", new_seq, None, 0
        pieces: list[bytes] = []
        pos = lo
        starts, ends, repls = way.starts, way.ends, way.repls
        for k in range(i0, i1):
            if starts[k] > pos:
                pieces.append(payload[pos - s : starts[k] - s])
            pieces.append(repls[k])
            pos = ends[k]
        if pos < hi:
            pieces.append(payload[pos - s : hi - s])
        return "send", new_seq, b"".join(pieces), i1 - i0

    def _map_ack(self, other: _Way, ack: int, events: list[str]) -> int:
        if not other.started:
            # first news of the other direction: everything it acknowledges has passed us
            other.start_at(ack % _MOD, None)
            return ack % _MOD
        q = _unwrap(ack, other.hi + other.top_offset())
        nf = other.new_floor()
        if nf is not None and q < nf:
            return (q - other.base) % _MOD
        acked = other.to_orig(q, round_up=False)
        if acked > other.hi:
            other.collapse(other.hi)
        else:
            other.collapse(acked)
        if other.fin is not None and not other.fin_acked and acked >= other.fin + 1:
            other.fin_acked = True
            if self.ways[0].fin_acked and self.ways[1].fin_acked and not self.ended:
                events.append("closed")
                self._end(self.last_seen)
        return acked % _MOD

    def _map_sack(
        self, other: _Way, sack: Sequence[tuple[int, int]]
    ) -> tuple[tuple[int, int], ...] | None:
        if not other.started:
            return None
        ref = other.hi + other.top_offset()
        nf = other.new_floor()
        out: list[tuple[int, int]] = []
        changed = False
        for left32, right32 in sack:
            left = _unwrap(left32, ref)
            right = _unwrap(right32, ref)
            if nf is not None and left < nf:
                if right <= nf:
                    changed = True  # all below what was acknowledged and forgotten: drop
                    continue
                left = nf
            ol = other.to_orig(left, round_up=True)
            orr = other.to_orig(right, round_up=False)
            if orr <= ol:
                changed = True
                continue
            block = (ol % _MOD, orr % _MOD)
            if block != (left32 % _MOD, right32 % _MOD):
                changed = True
            out.append(block)
        return tuple(out) if changed else None

    # -- lifecycle ---------------------------------------------------------------------------

    def _touch(self, now: float) -> None:
        self.last_seen = now
        table = self._table
        if table is not None and self.key is not None and table._flows.get(self.key) is self:
            table._flows.move_to_end(self.key)

    def _end(self, now: float) -> None:
        self.ended_at = now
        if self._table is not None and self.key is not None:
            self._table._closing.append((now, self.key, self))

    def _restart(self, events: list[str]) -> None:
        self.ways = (_Way(), _Way())
        self.ended_at = None
        self._new_syn = None
        events.append("restarted")


class FlowTable:
    """Bounded table of flows that carry a sequence offset.  See module doc for the API."""

    def __init__(
        self,
        max_flows: int = 65536,
        idle_timeout: float = 300.0,
        close_grace: float = 10.0,
        max_edits: int = 4096,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.close_grace = close_grace
        self.max_edits = max_edits
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()  # least recently used first
        self._closing: deque[tuple[float, FlowKey, Flow]] = deque()
        self.flows_created = 0
        self.flows_evicted = 0
        self.flows_expired = 0
        self.flows_ended = 0
        self.edits_refused = 0
        self.segments_cut = 0

    @property
    def flows_active(self) -> int:
        return len(self._flows)

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def stats(self) -> dict[str, int]:
        return {
            "flows_active": self.flows_active,
            "flows_created": self.flows_created,
            "flows_evicted": self.flows_evicted,
            "flows_expired": self.flows_expired,
            "flows_ended": self.flows_ended,
            "edits_refused": self.edits_refused,
            "segments_cut": self.segments_cut,
        }

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def create(self, key: FlowKey, now: float) -> Flow:
        flow = self._flows.get(key)
        if flow is not None:
            return flow
        if len(self._flows) >= self.max_flows:
            self.expire(now)
            while len(self._flows) >= self.max_flows:
                self._flows.popitem(last=False)
                self.flows_evicted += 1
        flow = Flow(key, now, self.max_edits, self)
        self._flows[key] = flow
        self.flows_created += 1
        return flow

    def retract(self, key: FlowKey) -> None:
        """Take back the creation of a flow whose first segment could not be emitted: it never
        carried an offset, so it is forgotten as if it had not been created."""
        if self._flows.pop(key, None) is not None:
            self.flows_created -= 1

    def expire(self, now: float) -> int:
        """Drop ended flows past their grace period and flows idle too long; return the count."""
        dropped = 0
        closing = self._closing
        while closing and closing[0][0] + self.close_grace <= now:
            ended_at, key, flow = closing.popleft()
            if self._flows.get(key) is flow and flow.ended_at == ended_at:
                del self._flows[key]
                self.flows_ended += 1
                dropped += 1
        flows = self._flows
        while flows:
            key, flow = next(iter(flows.items()))
            if flow.last_seen + self.idle_timeout > now:
                break
            del flows[key]
            if flow.ended_at is not None and flow.ended_at + self.close_grace <= now:
                self.flows_ended += 1
            else:
                self.flows_expired += 1
            dropped += 1
        return dropped
