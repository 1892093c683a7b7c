"""Matching per direction of a connection: holding back a segment that ends in a pattern's prefix.

Theory of operation
-------------------
A pattern that TCP splits across two segments is in neither of them, so a packet-by-packet
search never sees it. The engine sees it by not letting the first part go before the second
has come: a segment whose payload ends with a proper prefix of some pattern (a match may begin
there) is *held*, its verdict not given yet (NFQUEUE keeps the packet in the kernel until then).
When the next segment of the same direction arrives, in order, the held ones and it are searched
as one piece of stream, and the whole match is one edit; then all of them are emitted together.
If nothing arrives in time (:attr:`HoldLimits.deadline`, a few milliseconds), the held segments
go out as they are, with the edits found within them, and that is counted: a sender that waits
for an ACK (Nagle, the end of a request) is held up by the deadline at most. The documented
limit that remains: a pause longer than the deadline in the middle of a pattern lets it through.

Sans-I/O, the split between core and shell. The core never keeps a packet, a timer or a queue
id; it keeps *tokens*, opaque values the caller passes with each packet it is able to hold
(``Engine.process(..., hold=token)``). When the engine holds a packet it answers
``Result(HOLD)``: the shell keeps the queued packet under that token and gives no verdict yet.
Any later answer may carry ``released``: ``(token, Result)`` pairs, in stream order, whose
verdicts the shell gives *before* the verdict of the packet at hand (so the bytes leave in
order). ``Engine.next_deadline()`` says when the shell must call ``Engine.release_due(now)``
(its poll timeout), which answers with the same kind of pairs; ``release_due(math.inf)``
releases everything (before the shell unbinds its queue). Time comes in as ``now``, as for the
flow table. A caller that passes no token (``check``'s examples, a test of single packets) never
sees a hold; ``replay`` passes tokens and releases by the capture's own clock.

What may be held: a data segment of a connection (ACK set; no SYN, FIN, RST or URG; no SACK
blocks: its numbers are then fully described by the group's last segment), new bytes in order
(at the highest byte the flow has seen in that direction, when there is a flow), of a selection
with ``replace`` rules. A group is a run of contiguous held segments of one direction; the next
data segment of that direction either extends it (if the stream still ends in a prefix and the
bounds allow), completes it (all emitted with it) or, out of order, a retransmission, or one
with SYN, FIN, RST or URG, flushes it first (emitted as it is, then the new segment as usual).
A pure ACK of the same sender passes by a held group and leaves it held: a bulk receiver that is
also a sender (an echo, a download while uploading) sends such ACKs between its data segments,
and flushing on them released split patterns unedited (about one token in 2 MB under load).

How a group is emitted (the engine's ``_emit_group``): the payloads are joined and searched as
one; the edits go through the flow's sequence adjuster as one segment (so a match that spans two
segments is recorded as one edit), with the last segment's ACK, window and flags. The rewritten
bytes are then cut back into the group's packets at their original boundaries, each moved back
to the start of an edit that spans it (:func:`cut_points`): a packet gets the rewritten image of
its own bytes, the match that began in it goes whole into the next one. A packet left with no
bytes (all of it inside a match that the next one carries) is dropped: its bytes and ACK travel
in the next one. Every packet carries the group's mapped ACK. A piece that outgrows its packet's
MTU is cut at an edit boundary (:func:`fit`), as the adjuster cuts a single segment: the sender
retransmits the rest, which gets the recorded edits.

Bounds (:class:`HoldLimits`): packets and bytes held per flow direction and in all; a segment
that would pass one is not held (its group goes out with it), counted as ``hold_refused``.
Counters: ``holds`` (segments held), ``hold_joined`` (groups completed by a next segment, the
case held for), ``hold_expired`` (groups released by the deadline), ``hold_flushed`` (released
by an out-of-order segment or one that may not be held), ``hold_refused``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from nfrewrite.core.packet import TcpPacket
from nfrewrite.core.rules import Selection

#: default seconds a held segment waits for the next one of its direction
DEFAULT_DEADLINE = 0.005


@dataclass(frozen=True, slots=True)
class HoldLimits:
    """How long and how much may be held. ``deadline`` in seconds; 0 disables holding."""

    deadline: float = DEFAULT_DEADLINE
    flow_packets: int = 8
    flow_bytes: int = 256 << 10
    total_packets: int = 512
    total_bytes: int = 16 << 20


@dataclass(slots=True)
class Held:
    """One held segment: the caller's token, the parsed packet (header edits already made), how
    it was told to finish it, and the names of the rules whose header edits fired."""

    token: object
    pkt: TcpPacket
    segmented: bool
    fired: list[str]
    seq: int  # its raw 32-bit sequence number
    at: float


@dataclass(slots=True)
class Group:
    """Contiguous held segments of one direction of one connection."""

    members: list[Held] = field(default_factory=list)
    size: int = 0  # payload bytes held
    next_seq: int = 0  # where the next segment must start (raw 32-bit) to extend the group
    deadline: float = 0.0
    selection: Selection | None = None  # the rules that applied when it began


class Holds:
    """Every group held by one engine, oldest first (so the earliest deadline is the first)."""

    __slots__ = ("expired", "flushed", "groups", "holds", "joined", "limits", "packets",
                 "refused", "size")

    def __init__(self, limits: HoldLimits | None = None) -> None:
        self.limits = limits or HoldLimits()
        self.groups: OrderedDict[tuple[object, int], Group] = OrderedDict()
        self.packets = 0  # held now
        self.size = 0  # payload bytes held now
        self.holds = self.joined = self.expired = self.flushed = self.refused = 0

    def stats(self) -> dict[str, int]:
        return {"holds": self.holds, "hold_joined": self.joined, "hold_expired": self.expired,
                "hold_flushed": self.flushed, "hold_refused": self.refused,
                "held_packets": self.packets, "held_bytes": self.size}

    def room(self, group: Group | None, pkt: TcpPacket) -> bool:
        """Whether ``pkt`` may be held (in ``group``, or in a new one) within the bounds."""
        lim = self.limits
        n = pkt.payload_len
        members = len(group.members) if group is not None else 0
        size = group.size if group is not None else 0
        return (members < lim.flow_packets and size + n <= lim.flow_bytes
                and self.packets < lim.total_packets and self.size + n <= lim.total_bytes)

    def add(self, key: tuple[object, int], group: Group | None, held: Held,
            now: float) -> Group:
        if group is None:
            group = Group(deadline=now + self.limits.deadline)
            self.groups[key] = group
        group.members.append(held)
        n = held.pkt.payload_len
        group.size += n
        group.next_seq = (held.seq + n) % (1 << 32)
        self.packets += 1
        self.size += n
        self.holds += 1
        return group

    def take(self, key: tuple[object, int]) -> Group:
        group = self.groups.pop(key)
        self.packets -= len(group.members)
        self.size -= group.size
        return group

    def next_deadline(self) -> float | None:
        for group in self.groups.values():
            return group.deadline
        return None

    def due(self, now: float) -> list[tuple[object, int]]:
        """Keys of the groups whose deadline has come, oldest first."""
        keys: list[tuple[object, int]] = []
        for key, group in self.groups.items():
            if group.deadline > now:
                break
            keys.append(key)
        return keys


def cut_points(bounds: Sequence[int], edits: Sequence[tuple[int, int]]) -> list[int]:
    """The original boundaries between a group's packets (``bounds``: the start offset of every
    packet but the first), each moved back to the start of an edit that spans it (``edits``:
    sorted, disjoint ``(start, end)``), so that no match is cut in two."""
    starts = [s for s, _ in edits]
    out: list[int] = []
    for b in bounds:
        i = bisect_right(starts, b - 1) - 1  # the last edit starting before b
        if i >= 0 and edits[i][1] > b:
            b = edits[i][0]
        out.append(b)
    return out


def to_new(pos: int, edits: Sequence[tuple[int, int, int]]) -> int:
    """Position ``pos`` of the joined payload (never strictly inside an edit) in the rewritten
    one. ``edits``: sorted ``(start, end, replacement length)``."""
    shift = 0
    for start, end, n in edits:
        if end > pos:
            break
        shift += n - (end - start)
    return pos + shift


def fit(piece_start: int, piece: bytes, limit: int,
        new_edits: Sequence[tuple[int, int]]) -> int:
    """How many bytes of ``piece`` (which starts at ``piece_start`` of the rewritten payload)
    to send when it may carry at most ``limit``: all of it if it fits, else up to the last
    position not strictly inside a replacement (``new_edits``: rewritten ``(start, end)``)."""
    if len(piece) <= limit:
        return len(piece)
    cut = piece_start + limit
    for start, end in new_edits:
        if start < cut < end:
            cut = start
            break
    return max(cut - piece_start, 0)
