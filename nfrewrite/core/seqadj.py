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
original bytes ``[starts[i], ends[i])`` with ``repls[i]``, whose rewritten start is
``nstarts[i]``; the offset in force after it is ``nstarts[i] + len(repls[i]) - ends[i]`` (``base``
is the offset in force before the first kept edit).  Edits never overlap and are only ever
appended, because fresh matching happens only beyond ``hi``, the highest original byte seen so
far.  Both mappings are one ``bisect`` each:

* original -> rewritten (``seq`` of this direction): ``p + offset in force at p``;
* rewritten -> original (``ack`` and SACK edges, which the other side sends about this
  direction): ``q - offset``; a point strictly inside a replacement has no exact original image,
  so an ACK there rounds DOWN to the edit's original start (the sender retransmits the edit, which
  is harmless) and SACK edges round inward (left edge up to the edit's end, right edge down to its
  start; a block that becomes empty is dropped): we never claim the receiver has more than it has.

Retransmissions.  An edit is a function of original stream position, never of arrival order.
Bytes below ``hi`` are "seen": they get exactly the recorded edits and are never matched again
(of the matches ``find_edits`` returns, only those starting at or beyond ``hi`` are taken).
Bytes below the first segment a flow saw in a direction (the flow is created at the first length
change) map with offset 0 and are treated as the engine's stateless path treated them before the
flow existed: same-length edits found inside that part are applied (not recorded),
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

Record shape.  The three position columns are ``array('q')`` (8 bytes an item, no int objects),
the replacements a list of references to the rule set's own ``bytes`` (8 bytes an item, nothing
copied): 34-41 bytes per kept edit measured with tracemalloc, over-allocation included (six lists
of int objects before: 209-218).  A fresh segment's edits are appended one comprehension per
column (a 64 KB super-packet can bring thousands), and its new payload is one join.

Collapsing.  When the opposite direction acknowledges original position ``A`` (mapped as above),
the sender will never again need edits ending at or below ``A``; they are collapsed into ``base``
and ``floor`` becomes the end of the last collapsed edit.  Collapsing only moves ``head``, the
first kept edit (every ``bisect`` starts there); the dead entries are cut off the arrays once they
are at least 64 and at least as many as the live ones, so an ACK costs one ``bisect``, and the
memmove is amortised.  Data below ``floor`` (only ever an old duplicate or a retransmission racing
the ACK: the receiver has it) is trimmed off.

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
SACK blocks are clipped to the floor or dropped.

Same-length edits.  A flow with state records every fresh edit, same-length ones too, so that a
retransmission with different boundaries is edited identically.  A flow without state needs no
record: the engine applies same-length edits statelessly (``apply_edits``), which is consistent for
retransmissions only when segmentation is the same (documented limit, as for patterns split
across segments).

Phases.  ``Flow.rewrite`` works in the order the kernel's ``nf_ct_seq_adjust`` /
``nf_ct_sack_adjust`` split suggests: the lifecycle (SYNs), the seq (where the segment lies, and the
window checks below), the payload (record the fresh edits, replay the recorded ones), the ACK
(checked, mapped, collapsing), the SACK blocks, then FIN and RST.  A pure ACK (no payload, no
SYN, FIN or RST) of a direction already started takes a short path: its seq mapped (one addition
when nothing is kept), its ACK checked and mapped, its SACK blocks mapped; no payload step.

What a blind attacker cannot move.  The appliance sees every segment of a tracked connection but
conntrack's window check is off (the shifted numbers would look invalid to it), so the record
checks what it takes, as ``tcp_in_window`` and RFC 5961 do:

* data: a segment that would add to the record (it ends beyond ``hi``) must start within the right
  edge of the window the receiver announced (its highest ACK + window, scaled when both SYNs were
  seen, else by 2**14: the largest scale, so a real segment is never refused; ``WINDOW_SLACK``
  more); one more than ``MAX_WINDOW`` behind ``hi`` cannot be outstanding either.  Such a segment
  changes nothing and gets ``"drop"``: a segment 2**31 ahead does not move ``hi``, so it cannot
  make every later match look already seen.
* ACK: an ACK beyond the highest byte seen (or the FIN) acknowledges data never sent through the
  flow: it is mapped and passed (the sender discards it itself) but collapses nothing.  Exception:
  before any data of a direction went through the flow, its sender may have had bytes in flight
  from before the flow began; an ACK for those (up to ``MAX_WINDOW`` ahead) marks them as passed.
* RST: it ends the record only at a place its sender can stand: between what the receiver last
  acknowledged and one past the highest byte seen (a FIN's place).  Any other RST (out of the
  window, or in it but not at that place) is passed on, mapped without side effects, for the
  receiver's own RFC 5961 check (which answers an in-window one with a challenge ACK, whose
  answer, a RST at the exact place, then ends the record); the record stays.  A RST from a
  direction the flow has never seen cannot be checked and ends it.
* FIN: recorded only at or beyond ``hi`` and within the window.
A guess that lands inside the window is still taken (the chance is the window over 2**32, as for
the endpoints themselves).  Not covered: a forged SYN followed by a forged SYN-ACK for it looks
exactly like a reconnect on the same 4-tuple and starts the record over.

Memory budget.  The table has one budget for all records (``memory``, ``[flows] memory``,
default 256 MiB), counted as ``FLOW_BYTES`` per flow plus ``EDIT_BYTES`` per array entry (live
or collapsed-not-yet-compacted).  There is no cap per flow: a flow records every edit while the
budget has room.  New flows start on probation: a flow is confirmed when the other side
acknowledges bytes (or a SYN) that went through it, which a spoofed one-packet flow never gets
(its receiver answers with a RST, which does not count).  Flows on probation may hold together
at most 1/8 of the flows (``max_flows``) and 1/8 of the budget (at least room for two flows).
A flow on probation that has waited ``PROBATION_TIMEOUT`` (2 s) without an answer is stale: it
is the first to be evicted; one that has not waited that long may be real and may already carry
an offset, so when probation is full of those the newcomer is refused instead (it has no offset
yet; its next segment tries again).  A flood of spoofed flows with a matching payload thus churns
within its share and never evicts a confirmed flow.  When the budget is short, room is made by
evicting stale flows on probation and ended flows in their grace period; a confirmed, live flow
is never evicted for memory (that would break its connection), only (as before) when
``max_flows`` is reached and no stale flow is on probation.  When that is not enough, the
segment's length-changing edits are refused (its bytes pass unedited, counted as
``edits_refused``; same-length ones are still made), and a flow that could not be created is
counted as ``flows_refused``.  Fairness: above 7/8 of the budget a flow that holds more than its
share (budget / flows) is refused new edits, so the rest goes to the smaller ones.

SYN and FIN each consume one sequence number; a SYN's payload starts at ISN + 1.  A flow ends
after a FIN in both directions, each acknowledged, or on RST; it is kept ``close_grace`` seconds
more for the last ACKs and retransmissions.  A SYN with a new ISN on an ended flow starts over.  On
a live flow such a SYN is passed untouched and the state kept (a stray or spoofed SYN must not wipe
the offsets of a working connection); the flow starts over only when the peer answers it with a
SYN-ACK (a live peer answers a stray SYN with a challenge ACK instead).

API (what the engine calls)
===========================
``key, direction = flow_key(src, sport, dst, dport)``: canonical key and direction 0/1.

``FlowTable(max_flows=65536, idle_timeout=300.0, close_grace=10.0, memory=DEFAULT_MEMORY)``:
``get(key) -> Flow | None``; ``create(key, now) -> Flow | None`` (returns the existing flow if
there is one; a new one starts on probation; when full, first drops expired flows, then evicts
a stale flow on probation, or, with none, the least recently used if confirmed, counted; None
when that is not possible or the memory budget leaves no room, counted as ``flows_refused``);
``expire(now) -> int`` (drops ended flows past their grace and idle flows; returns how many);
``retract(key)`` (takes a creation back: the flow's first segment could not be emitted);
``len(table)``; counters ``flows_active`` and ``flows_on_probation`` (properties),
``flows_created``, ``flows_evicted``, ``flows_expired``, ``flows_ended``, ``flows_refused``,
``edits_refused``, ``segments_cut``, ``flows_restored``, ``memory_used`` (estimated bytes);
``stats() -> dict``.  Invariant: created == active + evicted + expired + ended.

Saving and restoring (:mod:`nfrewrite.core.flowstate` reads and writes the records as bytes):
``adopt(flow) -> bool`` lists a restored flow (counted as created and as ``flows_restored``).
``changed``: None, or a dict that collects every flow touched since its owner last emptied it
(None for a flow removed), and ``urgent`` is set when one recorded an edit or began anew: what
must be written before that segment is let go for a crash not to lose it.

``Flow.rewrite(direction, seq, ack, flags, payload, sack, now, find_edits, max_payload=None,
window=None, wscale=None) -> SegmentPlan``: ``seq``/``ack``/SACK edges are the raw 32-bit header
values; ``ack`` is None when the ACK flag is clear; ``flags`` is the TCP flags byte;
``find_edits(payload)`` returns every match in the payload as non-overlapping ``(start, end,
replacement, tag)`` with ``0 <= start < end <= len(payload)`` (anything else raises
``ValueError``: an engine bug), called at most once per segment; the adjuster takes the fresh
ones itself.  ``window`` is the raw window field, ``wscale`` a SYN's window scale option.  The
first call on a new flow treats all of the segment's bytes as fresh.  See ``SegmentPlan`` for
what comes back.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from operator import le, lt, sub
from typing import Literal

from nfrewrite.core.constants import FIN, RST, SYN
from nfrewrite.core.packet import splice

__all__ = [
    "DEFAULT_MEMORY",
    "EDIT_BYTES",
    "FLOW_BYTES",
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

#: The largest receive window TCP can announce (65,535 scaled by 2**14): the bound for a direction
#: whose receiver's window scale is unknown (its SYN was not seen).
MAX_WINDOW = 0xFFFF << 14
#: Unknown window scale: assume the largest, so the bound never refuses a real segment.
_UNKNOWN_SCALE = 14
#: Room beyond the right window edge: one super-packet (a sender never passes the edge it was
#: told, but an edge announced before the flow existed may lie beyond the ones we saw).
WINDOW_SLACK = 1 << 16

#: Estimated bytes one kept edit costs (three 8-byte array items, one list slot to a replacement
#: shared with the rule set, the arrays' over-allocation) and one flow with an empty record (the
#: Flow, its two directions, four empty arrays and a list each, its key, its slots in the table's
#: dicts). Measured with tracemalloc (see README, "Length changes"); the budget counts with them.
EDIT_BYTES = 40
FLOW_BYTES = 1800
#: Default memory budget of a table (``[flows] memory``).
DEFAULT_MEMORY = 256 << 20
#: Share of the budget (and of ``max_flows``) that flows still on probation may hold together.
PROBATION_SHARE = 8
#: Seconds a flow on probation is protected: its peer's first ACK comes within a round trip and
#: a delayed ACK; a flow still unanswered after that is taken for spoofed and may be evicted.
PROBATION_TIMEOUT = 2.0
#: Above this fraction of the budget, a flow that already holds more than its fair share
#: (budget / flows) gets no new edits, so the last of the budget goes to the smaller ones.
FAIR_ABOVE = 7 / 8
#: Kept edits below the live ones are dropped from the arrays once they are this many and at
#: least as many as the live ones (amortised: one memmove per halving).
_COMPACT_AT = 64

Edit = tuple[int, int, bytes, object]
"""(start, end, replacement, tag): offsets within one payload, ``start < end``; ``tag`` is the
matcher's own (the engine's: the rule), handed back untouched in ``SegmentPlan.applied``."""

FindEdits = Callable[[bytes], Sequence[Edit]]
"""The engine's matcher: every match in the whole payload, leftmost first, non-overlapping."""

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


def _splice(payload: bytes, starts: Sequence[int], ends: Sequence[int],
            repls: Sequence[bytes]) -> bytes:
    """``payload`` with ``[starts[i], ends[i])`` replaced by ``repls[i]`` (ordered, disjoint).
    A super-packet may carry hundreds of edits: one comprehension for the pieces between them,
    one join (the common case, one replacement throughout, joins by it directly)."""
    gaps = [payload[a:b] for a, b in zip(chain((0,), ends), chain(starts, (None,)), strict=True)]
    if repls.count(repls[0]) == len(repls):
        return repls[0].join(gaps)
    return b"".join(chain(chain.from_iterable(zip(gaps, repls, strict=False)), (gaps[-1],)))


def _unwrap(value: int, ref: int) -> int:
    """The integer congruent to ``value`` mod 2**32 that lies within 2**31 of ``ref``."""
    return ref + ((value - ref + _HALF) % _MOD) - _HALF


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    """What the engine must emit for one segment.

    ``action``: ``"send"`` (emit with the fields below), ``"send_empty"`` (emit without payload,
    same flags and ACK, at ``new_seq``: everything it carried is already acknowledged or was
    deleted; see "Empty results" in the module doc) or ``"drop"`` (inconsistent with the recorded
    stream: a SYN or FIN in the middle of it; or data outside the receiver's window).
    ``new_seq``/``new_ack``: 32-bit header values (``new_ack`` is None iff the ACK was None).
    ``payload``: new payload, ``None`` = unchanged (``b""`` for ``send_empty``).
    ``sack``: new SACK blocks (32-bit edges), ``None`` = unchanged; may have fewer blocks than
    given (a block that maps to nothing is dropped; pad the option with NOPs).
    ``fresh_edits``: indices into what ``find_edits`` returned that were recorded and applied
    (count these per rule), in start order; ``applied``: the same edits as ``find_edits``
    returned them (tags included); ``replayed_edits``: recorded edits re-applied to seen bytes
    (not new rewrites: do not count them per rule).
    ``events``: names of what happened: ``trimmed``, ``expanded``, ``refused``, ``fin``, ``rst``,
    ``closed`` (both FINs acknowledged), ``restarted`` (a new connection on this flow's 4-tuple),
    ``foreign_syn`` (a SYN with a new ISN on a live flow, passed untouched), ``drop``,
    ``stateless`` (same-length edits applied to bytes from before the flow began), and what the
    window checks refused: ``out_of_window`` (data; dropped), ``rst_ignored``, ``fin_ignored``,
    ``ack_unsent`` (an ACK for data never sent: mapped, nothing collapsed).
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
    """One direction's edit record (all positions unwrapped, original space unless noted).

    Edit ``i`` (``head <= i < len(starts)``) replaces original ``[starts[i], ends[i])`` by
    ``repls[i]``, whose rewritten start is ``nstarts[i]``; entries below ``head`` are collapsed
    (acknowledged) and wait to be compacted away.  The offset in force after edit ``i`` is
    ``nstarts[i] + len(repls[i]) - ends[i]``: nothing else is stored per edit.
    """

    __slots__ = (
        "started",
        "isn",
        "wscale",
        "origin",
        "hi",
        "data_seen",
        "una",
        "edge",
        "base",
        "floor",
        "head",
        "starts",
        "ends",
        "nstarts",
        "repls",
        "fin",
        "fin_acked",
    )

    def __init__(self) -> None:
        self.started = False
        self.isn: int | None = None  # raw 32-bit ISN if a SYN was seen
        self.wscale: int | None = None  # window scale this side announced in that SYN
        self.origin = 0  # first byte position this flow saw (edit knowledge begins here)
        self.hi = 0  # end of the highest original byte seen
        self.data_seen = False  # a data segment of this direction went through the flow
        self.una: int | None = None  # highest position the other side acknowledged (checked)
        self.edge: int | None = None  # highest right window edge the other side announced
        self.base = 0  # offset in force before the first kept edit
        self.floor: int | None = None  # end of the last collapsed edit (knowledge lost below)
        self.head = 0  # first kept edit
        self.starts = array("q")
        self.ends = array("q")
        self.nstarts = array("q")  # rewritten start of edit i
        self.repls: list[bytes] = []
        self.fin: int | None = None  # original position of the FIN
        self.fin_acked = False

    def start_at(self, pos: int, isn: int | None) -> None:
        """First segment seen in this direction: edit knowledge begins at ``pos``."""
        self.started = True
        self.isn = isn
        self.origin = pos
        self.hi = pos

    def kept(self) -> int:
        return len(self.starts) - self.head

    def offset_after(self, i: int) -> int:
        return self.nstarts[i] + len(self.repls[i]) - self.ends[i]

    def top_offset(self) -> int:
        return self.offset_after(-1) if len(self.starts) > self.head else self.base

    def offset_at(self, pos: int) -> int:
        """Offset in force at a boundary ``pos`` (not strictly inside an edit)."""
        i = bisect_right(self.ends, pos, self.head)
        return self.offset_after(i - 1) if i > self.head else self.base

    def inside(self, pos: int) -> int:
        """Index of the edit strictly containing ``pos``, or -1."""
        i = bisect_right(self.starts, pos, self.head) - 1
        if i >= self.head and self.starts[i] < pos < self.ends[i]:
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
            nstart = self.nstarts[i]
            return max(nstart, nstart + len(self.repls[i]) - (self.ends[i] - pos))
        return pos + self.offset_at(pos)

    def to_orig(self, q: int, round_up: bool) -> int:
        """Rewritten -> original; inside a replacement round down to its start or up to its end."""
        j = bisect_right(self.nstarts, q, self.head) - 1
        if j < self.head:
            return q - self.base
        nstart = self.nstarts[j]
        nend = nstart + len(self.repls[j])
        if q >= nend:
            return q - (nend - self.ends[j])
        if q == nstart or not round_up:
            return self.starts[j]
        return self.ends[j]

    def cut_before(self, new_start: int, limit: int) -> int:
        """The longest rewritten length <= ``limit`` from ``new_start`` that does not end strictly
        inside a replacement (0 if the first replacement alone is too long)."""
        q = new_start + limit
        j = bisect_right(self.nstarts, q, self.head) - 1
        if j >= self.head and self.nstarts[j] < q < self.nstarts[j] + len(self.repls[j]):
            q = self.nstarts[j]
        return max(0, q - new_start)

    def new_floor(self) -> int | None:
        return None if self.floor is None else self.floor + self.base

    def collapse(self, acked: int) -> bool:
        """Forget edits that end at or below the acknowledged original position ``acked``.
        True when the arrays were compacted (their memory changed)."""
        k = bisect_right(self.ends, acked, self.head)
        if k == self.head:
            return False
        self.base = self.offset_after(k - 1)
        self.floor = self.ends[k - 1]
        self.head = k
        if k >= _COMPACT_AT and 2 * k >= len(self.starts):
            del self.starts[:k], self.ends[:k], self.nstarts[:k], self.repls[:k]
            self.head = 0
            return True
        return False

    def record(self, at: int, starts: Sequence[int], ends: Sequence[int],
               repls: Sequence[bytes]) -> None:
        """Append edits (start-ordered, after every recorded one), positions relative to ``at``.
        A GSO super-packet can bring hundreds: one comprehension per column."""
        shift = at + self.top_offset()
        if repls.count(repls[0]) == len(repls) and len(set(map(sub, ends, starts))) == 1:
            # one pattern throughout: the offset grows by the same step at every edit
            step = len(repls[0]) - (ends[0] - starts[0])
            self.nstarts.extend([a + shift + k * step for k, a in enumerate(starts)])
        else:
            deltas = [len(r) - b + a for a, b, r in zip(starts, ends, repls, strict=True)]
            self.nstarts.extend([a + shift + d for a, d in
                                 zip(starts, accumulate(deltas, initial=0), strict=False)])
        self.starts.extend([at + a for a in starts])
        self.ends.extend([at + b for b in ends])
        self.repls.extend(repls)


_Columns = tuple[tuple[int, ...], tuple[int, ...], tuple[bytes, ...], tuple[int, ...], bool]


def _columns(found: Sequence[Edit], size: int) -> _Columns:
    """``found`` as start-ordered columns (starts, ends, replacements, index in ``found``, and
    whether that order is ``found``'s own), checked: inside ``[0, size)``, each non-empty, none
    overlapping (else ``ValueError``: an engine bug)."""
    order: tuple[int, ...] = tuple(range(len(found)))
    starts, ends, repls, _tags = zip(*found, strict=True)
    in_order = all(map(le, ends[:-1], starts[1:]))
    if not in_order:
        order = tuple(sorted(order, key=lambda k: found[k][0]))
        starts = tuple(found[k][0] for k in order)
        ends = tuple(found[k][1] for k in order)
        repls = tuple(found[k][2] for k in order)
    if (starts[0] < 0 or ends[-1] > size or not all(map(lt, starts, ends))
            or not (in_order or all(map(le, ends[:-1], starts[1:])))):
        raise ValueError(f"find_edits returned overlapping or out-of-range edits "
                         f"{list(zip(starts, ends, strict=True))} for a payload of {size} bytes")
    return starts, ends, repls, order, in_order


class Flow:
    """Sequence-adjustment state of one TCP connection (both directions).  See module doc."""

    __slots__ = ("key", "ways", "created", "last_seen", "ended_at", "_table", "_new_syn",
                 "probation", "cost", "listed")

    def __init__(
        self,
        key: FlowKey | None,
        now: float,
        table: FlowTable | None = None,
    ) -> None:
        self.key = key
        self.ways = (_Way(), _Way())
        self.created = now
        self.last_seen = now
        self.ended_at: float | None = None
        self._table = table
        self._new_syn: tuple[int, int] | None = None  # (direction, ISN): SYN on a live flow
        self.probation = table is not None  # not yet confirmed by the other side
        self.cost = FLOW_BYTES  # estimated bytes, as the table counts them
        self.listed = False  # in its table

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def edit_count(self, direction: int) -> int:
        """Edits currently kept for ``direction`` (memory use; collapsed ones excluded)."""
        return self.ways[direction].kept()

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
        window: int | None = None,
        wscale: int | None = None,
    ) -> SegmentPlan:
        """Plan the emission of one segment travelling in ``direction`` (0 or 1).

        ``max_payload``: the most payload bytes the emitted segment may carry (what the link's MTU
        leaves after the headers); a segment that grew past it is cut (see "Growing past the MTU"
        in the module doc).  ``window``: the segment's raw 16-bit window field; ``wscale``: the
        window scale option of a SYN (both feed the window checks; None: not known)."""
        self._touch(now)
        if not payload and not flags & (SYN | FIN | RST) and self.ways[direction].started:
            return self._pure_ack(direction, seq, ack, sack, window)
        events: list[str] = []
        way = self.ways[direction]
        other = self.ways[1 - direction]
        syn = 1 if flags & SYN else 0

        # -- lifecycle: SYNs ----------------------------------------------------------------
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
        first_news = not way.started
        if first_news:
            way.start_at((seq + syn) % _MOD, seq if syn else None)
        elif syn and way.isn is None:
            way.isn = seq
        if syn:
            way.wscale = wscale

        # -- seq: where the segment lies, and whether it may change the record ---------------
        s = _unwrap(seq + syn, way.hi)
        e = s + len(payload)
        if flags & RST and not self.ended and not first_news and not self._rst_plausible(way, s):
            # a RST that its receiver would not take as it is (RFC 5961): the record stays;
            # passed on, mapped without side effects, for the receiver's own check
            peeked = None if ack is None else self._peek_ack(other, ack)
            return SegmentPlan("send", (way.to_new(s) - syn) % _MOD, peeked, None, None,
                               events=("rst_ignored",))
        if payload and (e > way.hi and s > self._right_bound(way) or e < way.hi - MAX_WINDOW):
            # beyond any window the receiver announced, or behind anything still outstanding:
            # not from the sender (a blind guess). It changes nothing and is not emitted.
            return SegmentPlan("drop", seq % _MOD, ack, None, None,
                               events=("out_of_window", "drop"))

        # -- payload ------------------------------------------------------------------------
        given = payload
        found: Sequence[Edit] = find_edits(payload) if payload else ()
        if found and s < way.origin and way.floor is None:
            payload = self._stateless_prefix(payload, way.origin - s, found, events)
        fresh_idx: tuple[int, ...] = ()
        applied: tuple[Edit, ...] = ()
        action: Action = "send"
        new_payload: bytes | None = None
        replayed = 0
        if payload and s >= way.hi and (way.floor is None or s >= way.floor) and not syn:
            # the common case: new bytes, in order (or after a gap): nothing recorded reaches
            # into them, their fresh edits apply as found
            new_seq = s + way.top_offset()
            if found:
                fresh_idx, applied, new_payload = self._record_fresh(way, s, given, found, 0,
                                                                     events, now)
            way.hi = e
            way.data_seen = True
        else:
            if payload and e > way.hi:
                fresh_idx, applied, _ = self._record_fresh(way, s, given, found,
                                                           max(0, way.hi - s), events, now)
                way.hi = e  # only bytes move it: a bare ACK or FIN beyond a gap does not
            if payload:
                way.data_seen = True
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

        # -- ack, SACK --------------------------------------------------------------------------
        new_ack: int | None = None
        if ack is not None:
            new_ack = self._map_ack(direction, other, ack, window, events, flags & RST)
        new_sack = self._map_sack(other, sack) if sack else None

        # -- FIN, RST -----------------------------------------------------------------------
        if flags & FIN and action != "drop" and way.fin is None:
            if way.hi <= e <= self._right_bound(way):
                way.fin = e
                events.append("fin")
            else:
                events.append("fin_ignored")  # not at the end of what was sent: not the sender's
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

    def _pure_ack(self, direction: int, seq: int, ack: int | None,
                  sack: Sequence[tuple[int, int]], window: int | None) -> SegmentPlan:
        """An ACK without payload, SYN, FIN or RST: its seq mapped, its ACK checked and mapped
        (which collapses what it acknowledges), its SACK blocks mapped; nothing else."""
        way = self.ways[direction]
        s = _unwrap(seq, way.hi)
        if way.floor is None and way.head == len(way.starts):
            new_seq = (s + way.base) % _MOD  # no edit kept: one offset for everything
        else:
            new_seq = way.to_new(s) % _MOD
        events: list[str] = []
        new_ack = None
        if ack is not None:
            new_ack = self._map_ack(direction, self.ways[1 - direction], ack, window, events, 0)
        new_sack = self._map_sack(self.ways[1 - direction], sack) if sack else None
        return SegmentPlan("send", new_seq, new_ack, None, new_sack, events=tuple(events))

    def _right_bound(self, way: _Way) -> int:
        """The highest original position the sender of ``way`` may send to: the right edge of
        the window its receiver announced, or (not known yet) the largest window TCP has."""
        edge = way.edge
        return (way.hi + MAX_WINDOW if edge is None else max(edge, way.hi)) + WINDOW_SLACK

    def _scale(self, direction: int) -> int:
        """Window scale of the windows ``direction``'s sender announces: known only when both
        SYNs were seen (scaling is on only if both carried the option)."""
        mine, theirs = self.ways[direction], self.ways[1 - direction]
        if mine.isn is None or theirs.isn is None:
            return _UNKNOWN_SCALE
        if mine.wscale is None or theirs.wscale is None:
            return 0
        return min(mine.wscale, _UNKNOWN_SCALE)

    @staticmethod
    def _rst_plausible(way: _Way, s: int) -> bool:
        """A RST at ``s`` may end the record only where its sender can stand: between what the
        receiver last acknowledged (or the flow's first byte) and one past the highest byte seen
        (a FIN's place).  Anything else is a blind guess or a stale RST."""
        low = way.una if way.una is not None else way.origin
        high = max(way.hi, way.fin if way.fin is not None else way.hi) + 1
        return low <= s <= high

    def _stateless_prefix(
        self, payload: bytes, upto: int, found: Sequence[Edit], events: list[str]
    ) -> bytes:
        """Same-length edits inside ``payload[:upto]`` (bytes from before the flow began)."""
        same = sorted(
            (a, b, r)
            for a, b, r, _ in found
            if b <= upto and len(r) == b - a and payload[a:b] != r
        )
        if not same:
            return payload
        events.append("stateless")
        return splice(payload, same)

    def _record_fresh(
        self, way: _Way, s: int, payload: bytes, found: Sequence[Edit], fresh_from: int,
        events: list[str], now: float,
    ) -> tuple[tuple[int, ...], tuple[Edit, ...], bytes | None]:
        """Record the edits of ``found`` that start at or after ``fresh_from``.  Returns their
        indices, the edits, and (for a wholly fresh segment, ``fresh_from`` 0) the payload with
        them applied."""
        if not found:
            return (), (), None
        starts, ends, repls, order, in_order = _columns(found, len(payload))
        first = bisect_left(starts, fresh_from) if fresh_from else 0
        if first:
            starts, ends, repls, order = starts[first:], ends[first:], repls[first:], order[first:]
        if not starts:
            return (), (), None
        table = self._table
        if table is not None and not table.admit(self, EDIT_BYTES * len(starts), now):
            events.append("refused")
            table.edits_refused += sum(1 for a, b, r in zip(starts, ends, repls, strict=True)
                                       if len(r) != b - a)
            if fresh_from:
                return (), (), None
            # same-length edits need no record: they are made, as the stateless path makes them
            same = [k for k in range(len(starts)) if len(repls[k]) == ends[k] - starts[k]]
            if not same:
                return (), (), None
            starts = tuple(starts[k] for k in same)
            ends = tuple(ends[k] for k in same)
            repls = tuple(repls[k] for k in same)
            order = tuple(order[k] for k in same)
            return order, tuple(found[k] for k in order), _splice(payload, starts, ends, repls)
        way.record(s, starts, ends, repls)
        if table is not None:
            self._account()
            table.urgent = True
        applied = tuple(found[first:]) if in_order else tuple(found[k] for k in order)
        new_payload = _splice(payload, starts, ends, repls) if not fresh_from else None
        return order, applied, new_payload

    def _plan_payload(
        self, way: _Way, s: int, e: int, payload: bytes, flags: int, events: list[str]
    ) -> tuple[Action, int, bytes | None, int]:
        """Bytes of which some were seen before: the recorded edits, expanded to whole edits."""
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
        i0 = bisect_left(way.starts, lo, way.head)
        i1 = bisect_left(way.starts, hi, i0)
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

    def _peek_ack(self, other: _Way, ack: int) -> int:
        """``ack`` mapped as :meth:`_map_ack` would, without changing anything."""
        if not other.started:
            return ack % _MOD
        q = _unwrap(ack, other.hi + other.top_offset())
        nf = other.new_floor()
        if nf is not None and q < nf:
            return (q - other.base) % _MOD
        return other.to_orig(q, round_up=False) % _MOD

    def _map_ack(self, direction: int, other: _Way, ack: int, window: int | None,
                 events: list[str], rst: int) -> int:
        """The ACK this segment carries about ``other``: mapped back to original space; if it
        is one the receiver can really have sent, what it acknowledges is collapsed, and the
        window it announces sets ``other``'s right edge."""
        if not other.started:
            # first news of the other direction: everything it acknowledges has passed us
            other.start_at(ack % _MOD, None)
            if window is not None:
                other.edge = other.hi + (window << self._scale(direction))
            return ack % _MOD
        q = _unwrap(ack, other.hi + other.top_offset())
        nf = other.new_floor()
        if nf is not None and q < nf:
            return (q - other.base) % _MOD
        acked = other.to_orig(q, round_up=False)
        limit = other.hi if other.fin is None else max(other.hi, other.fin + 1)
        if acked > limit:
            if other.data_seen or acked - other.hi > MAX_WINDOW:
                # an ACK for data never sent (through this flow): a blind guess or a stale
                # record; it collapses nothing (the sender drops it itself)
                events.append("ack_unsent")
                return acked % _MOD
            # no data of `other` went through the flow yet: these bytes passed before it began
            other.origin = other.hi = acked
        if other.kept() and other.collapse(acked) and self._table is not None:
            self._account()
        if other.una is None or acked > other.una:
            other.una = acked
        if window is not None:
            edge = acked + (window << self._scale(direction))
            if other.edge is None or edge > other.edge:
                other.edge = edge
        if self.probation and not rst and self._table is not None and (
            acked > other.origin or (other.isn is not None and acked == other.origin)
        ):
            # the receiver acknowledges bytes (or a SYN) that went through this flow: a real
            # two-way connection, not a spoofed one-packet flow
            self._table.confirm(self)
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
        if self.listed:
            table = self._table
            assert table is not None and self.key is not None
            table._flows.move_to_end(self.key)
            if self.probation:
                table._probation.move_to_end(self.key)
            if table.changed is not None:
                table.changed[self.key] = self

    def _account(self) -> None:
        """Bring the table's byte count up to date with this flow's record."""
        ways = self.ways
        cost = FLOW_BYTES + EDIT_BYTES * (len(ways[0].starts) + len(ways[1].starts))
        if self.listed and self._table is not None:
            self._table._charge(self, cost - self.cost)
        self.cost = cost

    def _end(self, now: float) -> None:
        self.ended_at = now
        if self._table is not None and self.key is not None:
            self._table._closing.append((now, self.key, self))

    def _restart(self, events: list[str]) -> None:
        self.ways = (_Way(), _Way())
        self.ended_at = None
        self._new_syn = None
        self._account()
        if self._table is not None:
            self._table.urgent = True
        events.append("restarted")


class FlowTable:
    """Bounded table of flows that carry a sequence offset.  See module doc for the API."""

    def __init__(
        self,
        max_flows: int = 65536,
        idle_timeout: float = 300.0,
        close_grace: float = 10.0,
        memory: int = DEFAULT_MEMORY,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        if memory < FLOW_BYTES:
            raise ValueError(f"memory must be at least {FLOW_BYTES} bytes")
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.close_grace = close_grace
        self.memory = memory
        self.probation_flows = max(1, max_flows // PROBATION_SHARE)
        # (at least room for one flow and a segment's worth of edits, however small the budget)
        self.probation_memory = min(memory, max(2 * FLOW_BYTES, memory // PROBATION_SHARE))
        self.memory_used = 0  # estimated bytes of every flow (FLOW_BYTES, EDIT_BYTES)
        self.probation_used = 0  # the part of it held by flows on probation
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()  # least recently used first
        self._probation: OrderedDict[FlowKey, Flow] = OrderedDict()  # the same, unconfirmed
        self._closing: deque[tuple[float, FlowKey, Flow]] = deque()
        self.flows_created = 0
        self.flows_evicted = 0
        self.flows_expired = 0
        self.flows_ended = 0
        self.flows_refused = 0
        self.edits_refused = 0
        self.segments_cut = 0
        self.flows_restored = 0  # flows taken from a saved record (``adopt``)
        #: Journaling (the service's store of the records): None, off; else every flow whose
        #: record changed since the store last took them (None: it is gone).  ``urgent``: one of
        #: them recorded an edit or began anew, a change to be written before its packet goes.
        self.changed: dict[FlowKey, Flow | None] | None = None
        self.urgent = False

    @property
    def flows_active(self) -> int:
        return len(self._flows)

    @property
    def flows_on_probation(self) -> int:
        return len(self._probation)

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def stats(self) -> dict[str, int]:
        return {
            "flows_active": self.flows_active,
            "flows_probation": self.flows_on_probation,
            "flows_created": self.flows_created,
            "flows_evicted": self.flows_evicted,
            "flows_expired": self.flows_expired,
            "flows_ended": self.flows_ended,
            "flows_refused": self.flows_refused,
            "edits_refused": self.edits_refused,
            "segments_cut": self.segments_cut,
            "flows_restored": self.flows_restored,
            "memory_bytes": self.memory_used,
        }

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def create(self, key: FlowKey, now: float) -> Flow | None:
        """The flow of ``key``, created on probation if there is none; None when neither the
        flow count nor the memory budget leaves room for one (counted in ``flows_refused``)."""
        flow = self._flows.get(key)
        if flow is not None:
            return flow
        if (len(self._flows) >= self.max_flows or len(self._probation) >= self.probation_flows
                or self.memory_used + FLOW_BYTES > self.memory
                or self.probation_used + FLOW_BYTES > self.probation_memory):
            self.expire(now)
        probation = self._probation
        while (len(probation) >= self.probation_flows
               or self.probation_used + FLOW_BYTES > self.probation_memory):
            if not self._evict_stale(now, None):
                # probation is full of flows still waiting for their first answer: one of them
                # may be real and already carry an offset; the newcomer has none yet
                self.flows_refused += 1
                return None
        while len(self._flows) >= self.max_flows:
            # a full table: a stale unconfirmed flow goes first, else the least recently used,
            # if it is confirmed (a flood fills probation, never reaches these)
            if self._evict_stale(now, None):
                continue
            oldest = next(iter(self._flows.values()))
            if oldest.probation or oldest.key is None:
                self.flows_refused += 1
                return None
            self._evict(oldest.key)
        if not self._free(FLOW_BYTES, None, now):
            self.flows_refused += 1
            return None
        flow = Flow(key, now, self)
        self._flows[key] = flow
        probation[key] = flow
        flow.listed = True
        self.memory_used += flow.cost
        self.probation_used += flow.cost
        self.flows_created += 1
        return flow

    def admit(self, flow: Flow, extra: int, now: float) -> bool:
        """May ``flow`` grow its record by ``extra`` bytes?  Makes room by evicting flows on
        probation (the oldest first; for a flow on probation, only within the probation share)
        and ended ones; refuses a flow past its fair share when the budget is nearly used."""
        if not flow.listed:
            return True
        if flow.probation:
            while self.probation_used + extra > self.probation_memory:
                if not self._evict_stale(now, flow):
                    return False
        if not self._free(extra, flow, now):
            return False
        flows = len(self._flows)
        return not (self.memory_used + extra > FAIR_ABOVE * self.memory
                    and flow.cost + extra > self.memory // flows)

    def _free(self, extra: int, keep: Flow | None, now: float) -> bool:
        """Make ``extra`` bytes of room within the budget, evicting stale flows on probation
        (least recently active first) and then ended ones; never ``keep``.  False if that is not
        enough."""
        if self.memory_used + extra <= self.memory:
            return True
        self.expire(now)
        while self.memory_used + extra > self.memory and self._evict_stale(now, keep):
            pass
        for _ended_at, key, flow in list(self._closing):
            if self.memory_used + extra <= self.memory:
                return True
            if flow is not keep and self._flows.get(key) is flow and flow.ended:
                self._remove(key, flow)
                self.flows_ended += 1
        return self.memory_used + extra <= self.memory

    def _evict_stale(self, now: float, keep: Flow | None) -> bool:
        """Evict the least recently active flow on probation if it has waited longer than
        ``PROBATION_TIMEOUT`` for an answer (and is not ``keep``); True if one went."""
        probation = self._probation
        if not probation:
            return False
        key, flow = next(iter(probation.items()))
        if flow is keep or now - flow.created < PROBATION_TIMEOUT:
            return False
        self._evict(key)
        return True

    def confirm(self, flow: Flow) -> None:
        """Take ``flow`` off probation: the other side answered it."""
        if not flow.probation:
            return
        flow.probation = False
        if flow.listed and flow.key is not None:
            del self._probation[flow.key]
            self.probation_used -= flow.cost

    def _charge(self, flow: Flow, delta: int) -> None:
        self.memory_used += delta
        if flow.probation:
            self.probation_used += delta

    def _remove(self, key: FlowKey, flow: Flow) -> None:
        del self._flows[key]
        if flow.probation:
            del self._probation[key]
            self.probation_used -= flow.cost
        self.memory_used -= flow.cost
        flow.listed = False
        if self.changed is not None:
            self.changed[key] = None

    def _evict(self, key: FlowKey) -> None:
        self._remove(key, self._flows[key])
        self.flows_evicted += 1

    def adopt(self, flow: Flow) -> bool:
        """List a flow restored from a saved record (:mod:`nfrewrite.core.flowstate`) as the most
        recently used, counted as created and restored; False (not taken) when its key is listed
        already or the flow count, the memory budget or (for one on probation) its share leaves
        no room."""
        key = flow.key
        if key is None or key in self._flows or len(self._flows) >= self.max_flows:
            return False
        ways = flow.ways
        cost = FLOW_BYTES + EDIT_BYTES * (len(ways[0].starts) + len(ways[1].starts))
        if self.memory_used + cost > self.memory or flow.probation and (
                len(self._probation) >= self.probation_flows
                or self.probation_used + cost > self.probation_memory):
            return False
        flow._table = self
        flow.cost = cost
        flow.listed = True
        self._flows[key] = flow
        self.memory_used += cost
        if flow.probation:
            self._probation[key] = flow
            self.probation_used += cost
        if flow.ended_at is not None:
            entry = (flow.ended_at, key, flow)
            if self._closing and self._closing[-1][0] > flow.ended_at:
                self._closing = deque(sorted([*self._closing, entry], key=lambda e: e[0]))
            else:
                self._closing.append(entry)
        self.flows_created += 1
        self.flows_restored += 1
        return True

    def retract(self, key: FlowKey) -> None:
        """Take back the creation of a flow whose first segment could not be emitted: it never
        carried an offset, so it is forgotten as if it had not been created."""
        flow = self._flows.get(key)
        if flow is not None:
            self._remove(key, flow)
            self.flows_created -= 1

    def expire(self, now: float) -> int:
        """Drop ended flows past their grace period and flows idle too long; return the count."""
        dropped = 0
        closing = self._closing
        while closing and closing[0][0] + self.close_grace <= now:
            ended_at, key, flow = closing.popleft()
            if self._flows.get(key) is flow and flow.ended_at == ended_at:
                self._remove(key, flow)
                self.flows_ended += 1
                dropped += 1
        flows = self._flows
        while flows:
            key, flow = next(iter(flows.items()))
            if flow.last_seen + self.idle_timeout > now:
                break
            self._remove(key, flow)
            if flow.ended_at is not None and flow.ended_at + self.close_grace <= now:
                self.flows_ended += 1
            else:
                self.flows_expired += 1
            dropped += 1
        return dropped
