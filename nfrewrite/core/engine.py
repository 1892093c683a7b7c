"""The rewrite engine: one queued packet in, a verdict and (maybe) new bytes out.

Theory of operation
-------------------
``Engine.process`` is a pure function of (packet bytes, bridge ports, time, engine state). It
never touches a socket or a clock: the queue loop, the replay tool and the fuzzer all call it the
same way, which is why the same rules give the same bytes live and offline.

For each packet:

1. :func:`nfrewrite.core.packet.parse`. Anything that is not a whole, first, well-formed TCP
segment is
   *not ours*: accepted untouched, with the reason reported for the metrics.
2. ``RuleSet.select`` gives the rules whose match covers this packet (indexed, cached by port
   class; bounded in memory).
3. Rules with ``verdict = "drop"`` drop it. Header edits (TTL/hop limit, DSCP, window, MSS) apply
   in rule order.
4. Payload edits: every ``replace`` of every selected rule is found in one pass over the payload
   as it arrived. Same-length edits need no state; one same-length pattern is replaced by
   ``bytes.replace`` in C (a GSO super-packet can hold hundreds). The first length-changing
   edit of a connection creates a flow in the
   :class:`~nfrewrite.core.seqadj.FlowTable`; from then on every segment of that connection, in both
   directions, goes through the flow's sequence adjuster, which decides which edits apply (by
   original stream position, so retransmissions get the same edits) and maps seq/ack/SACK
   numbers; a pure ACK (no payload, SYN, FIN or RST) only has those mapped. When the table has
   no room for a new flow (its memory budget), the length-changing edits of that packet are
   refused (counted) and the same-length ones made.
5. SYNs of a connection whose segments some rule will grow get a lower MSS, leaving room for the
   growth; a segment that still grows past the MTU is cut by the sequence adjuster. A packet
   longer than the MTU (the largest of the namespace's links) is a GSO/GRO super-packet, which
   the kernel segments itself: it may grow up to the 65,531 bytes a verdict can carry back
   (:data:`~.constants.MAX_VERDICT_PACKET`), and one that would grow past that is cut the
   same way (its tail comes again, as a retransmission, and gets the same edits). Leaving its
   growing edits out instead would pass every occurrence in it unedited: a 64 KB super-packet
   with a few hundred edits grows past the limit whenever its growing ones outnumber its
   shrinking ones by a few dozen (seen in ~1 of 5 dense IPv6 runs). Without a flow table
   (``flows=None``) nothing can be cut: edits that would not fit are left out. A packet that
   *arrived* longer than a verdict carries cannot be handed back changed at all.
6. Checksums were kept right incrementally by every edit; ``finish()`` completes a checksum that
   held only the pseudo-header seed (TX offload; ``csum_partial=None`` lets ``parse`` recognise
   it by the field's value). A GSO skb (``gso=True``, the kernel's own flag) is the exception:
   the kernel segments it on the way out and sets every segment's checksum up itself, so its
   field is left holding the seed and the sum over up to 64 KB is not computed at all.

The engine's mutable state is the flow table, owned by one worker; the rule set is swapped whole on
reload (assigning ``engine.ruleset`` is atomic).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import cast

from nfrewrite.core.constants import (
    ACCEPT,
    ACK,
    DROP,
    FIN,
    HOLD,
    MAX_VERDICT_PACKET,
    RST,
    SYN,
    URG,
)
from nfrewrite.core.packet import TcpPacket, parse
from nfrewrite.core.rules import Edit, Rule, RuleSet, Selection
from nfrewrite.core.seqadj import Flow, FlowTable, SegmentPlan, flow_key
from nfrewrite.core.stream import Group, Held, HoldLimits, Holds, cut_points, fit, to_new

EXPIRE_EVERY = 1.0  # seconds between sweeps of the flow table
#: MSS lowering on SYNs of connections whose replies rules grow: room for growth in each segment,
#: 4x the largest single growth (several occurrences per segment), at least 128 and at most 512
#: bytes, never below the IPv4 minimum MSS.
MSS_ROOM_PER_GROWTH = 4
MSS_ROOM_MIN = 128
MSS_ROOM_MAX = 512
MIN_MSS = 536
#: Largest IP packet a grown segment may become: the largest MTU of the links it can leave by.
#: A longer packet can only be a GSO/GRO super-packet, which the kernel segments itself.
DEFAULT_MTU = 1500

Found = list[Edit]


@dataclass(frozen=True, slots=True)
class Result:
    """What to do with one packet.

    ``packet`` is the new packet when anything changed, else None (send the original).
    ``unparsed`` is a reason from :data:`~nfrewrite.core.packet.REASONS` for a packet not ours.
    ``rules`` are the names of the rules that changed or dropped it (for per-rule counters).
    ``track`` is True while the packet's connection carries a sequence offset: the kernel side
    must then queue every packet of that connection in both directions (connmark).
    ``verdict`` may be :data:`~.constants.HOLD` (only for a packet given with a ``hold`` token):
    no verdict yet. ``released``: ``(token, Result)`` of packets held earlier whose verdicts are
    due now, in stream order, to be given before this packet's (see :mod:`~.core.stream`).
    """

    verdict: int
    packet: bytes | None = None
    unparsed: str | None = None
    rules: tuple[str, ...] = ()
    track: bool = False
    released: tuple[tuple[object, Result], ...] = ()


PASS = Result(ACCEPT)


class Engine:
    """Applies a :class:`RuleSet` to packets; keeps the per-flow sequence state.

    ``flows`` None keeps no sequence state: length-changing edits are still made, packet by
    packet, but later sequence numbers, acknowledgements and SACK edges are not adjusted to
    them, nothing is cut at the MTU, and a packet's length-changing edits are all left out when
    together they would grow it past what a verdict carries back. Meant for tests of single
    packets: the daemon, the replay tool and ``nfrewrite check`` always pass a table.
    """

    def __init__(
        self, ruleset: RuleSet, flows: FlowTable | None = None, *, mtu: int = DEFAULT_MTU,
        hold_limits: HoldLimits | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.flows = flows
        self.mtu = mtu
        self._next_expire = 0.0
        #: segments held back because they end in the beginning of a pattern (only packets
        #: given with a ``hold`` token, and only with a flow table)
        self.holds = Holds(hold_limits)

    def _leave_room_for_growth(
        self, pkt: TcpPacket, in_port: str | None, out_port: str | None
    ) -> bool:
        """On a SYN, lower the announced MSS when rules grow the segments the peer will send in
        reply (the other direction): a grown segment past the MTU would have to be cut, which costs
        the sender a retransmission every time."""
        rev = self.ruleset.select(
            pkt.version, pkt.dst, pkt.src, pkt.dport, pkt.sport, out_port, in_port
        )
        growth = rev.max_growth
        mss = pkt.mss if growth else None
        if mss is None:
            return False
        room = min(max(MSS_ROOM_MIN, MSS_ROOM_PER_GROWTH * growth), MSS_ROOM_MAX)
        return pkt.clamp_mss(max(MIN_MSS, mss - room))

    def process(
        self,
        data: bytes | memoryview,
        *,
        in_port: str | None = None,
        out_port: str | None = None,
        now: float = 0.0,
        csum_partial: bool | None = False,
        gso: bool | None = None,
        hold: object = None,
    ) -> Result:
        """One packet: ``csum_partial`` says whether its TCP checksum field holds only the
        pseudo-header seed (None: recognise it by value); ``gso`` whether it is a GSO skb (the
        kernel's NFQA_SKB_GSO; None: not told, a packet longer than the MTU is taken for one).
        ``hold``: a token, when the caller can keep this packet and give its verdict later; the
        engine may then answer :data:`~.constants.HOLD` (see :mod:`nfrewrite.core.stream`)."""
        segmented = gso is True
        # A changed GSO skb is handed back as CHECKSUM_NONE, and the kernel then segments it in
        # software and initialises every segment's checksum itself: its checksum field is never
        # read, so it is treated as partial (no sums on the way) and left holding the seed.
        pkt = parse(data, csum_partial=True if segmented else csum_partial)
        if not isinstance(pkt, TcpPacket):
            return Result(ACCEPT, unparsed=pkt.reason)
        sel = self.ruleset.select(
            pkt.version, pkt.src, pkt.dst, pkt.sport, pkt.dport, in_port, out_port
        )
        flows = self.flows
        flow: Flow | None = None
        direction = 0
        if flows is not None and len(flows):
            if now >= self._next_expire:
                self._next_expire = now + EXPIRE_EVERY
                flows.expire(now)
            key, direction = flow_key(pkt.src, pkt.sport, pkt.dst, pkt.dport)
            flow = flows.get(key)
        if pkt.flags & SYN and pkt.doff > 20:
            self._leave_room_for_growth(pkt, in_port, out_port)
        holds = self.holds
        if holds.groups or (hold is not None and sel.has_replaces and pkt.payload_len
                            and flows is not None and holds.limits.deadline > 0):
            outcome = self._stream(pkt, sel, hold, now, segmented)
            if isinstance(outcome, Result):
                return outcome
            if outcome:
                if flows is not None and len(flows):
                    key, direction = flow_key(pkt.src, pkt.sport, pkt.dst, pkt.dport)
                    flow = flows.get(key)
                return replace(self._one(pkt, sel, flow, direction, now, segmented),
                               released=outcome)
        return self._one(pkt, sel, flow, direction, now, segmented)

    def _one(self, pkt: TcpPacket, sel: Selection, flow: Flow | None, direction: int,
             now: float, segmented: bool) -> Result:
        """A packet that is not held: its rules, its edits, its verdict."""
        rules = sel.rules
        if not rules and flow is None:
            if pkt.modified:
                return Result(ACCEPT, pkt.finish())
            return PASS

        fired: list[str] = []
        for rule in rules:
            if rule.verdict == "drop":
                return Result(DROP, rules=(rule.name,))
            if _apply_header_set(pkt, rule):
                fired.append(rule.name)

        if flow is None:
            flow, direction = self._rewrite_stateless(pkt, sel, fired, now, segmented)
        else:
            if not self._rewrite_with_flow(pkt, flow, direction, sel, fired, now, segmented):
                return Result(DROP, track=True)

        names = tuple(dict.fromkeys(fired))
        track = flow is not None
        if not pkt.modified:
            return Result(ACCEPT, rules=names, track=track)
        if pkt.room < 0:
            # Only a packet that came longer than a verdict can carry back (a GRO packet of up
            # to 65,535 bytes) and did not shrink. Unchanged, it is still valid unless its
            # connection has offsets; then the sender must retransmit it.
            return Result(DROP, track=True) if track else PASS
        return Result(ACCEPT, pkt.finish(kernel_segments=segmented), rules=names, track=track)

    # -- holding back a prefix (see nfrewrite.core.stream) ------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`release_due` must be called next (None: nothing is held)."""
        return self.holds.next_deadline()

    def release_due(self, now: float) -> list[tuple[object, Result]]:
        """The held packets whose deadline has come by ``now``, emitted as they are (with the
        edits found within them): ``(token, Result)`` in stream order. ``now=math.inf``
        releases everything (before the queue is unbound)."""
        holds = self.holds
        out: list[tuple[object, Result]] = []
        for gkey in holds.due(now):
            group = holds.take(gkey)
            holds.expired += 1
            out.extend(self._release(group, gkey, now))
        return out

    def _release(self, group: Group, gkey: tuple[object, int],
                 now: float) -> list[tuple[object, Result]]:
        sel = group.selection
        assert sel is not None
        results = self._emit_group(group.members, sel, gkey, now)
        return [(m.token, r) for m, r in zip(group.members, results, strict=True)]

    def _joinable(self, pkt: TcpPacket, sel: Selection) -> bool:
        """Whether ``pkt`` may complete a held group (be emitted with it as one piece)."""
        flags = pkt.flags
        if flags & (SYN | FIN | RST | URG) or not flags & ACK or pkt.room < 0:
            return False
        return all(rule.verdict != "drop" for rule in sel.rules)

    def _holdable(self, pkt: TcpPacket, sel: Selection) -> bool:
        """Whether ``pkt`` may wait for the next segment at all (see the stream module): as
        joinable, and no SACK blocks (a group's numbers are its last segment's)."""
        return self._joinable(pkt, sel) and not (pkt.doff > 20 and pkt.sack_blocks())

    def _stream(
        self, pkt: TcpPacket, sel: Selection, hold: object, now: float, segmented: bool
    ) -> Result | tuple[tuple[object, Result], ...]:
        """Hold ``pkt``, join it to the segments held before it, or release those first.
        Returns the packet's Result when it is settled here, else what was released (its
        verdicts due before this packet's, which then takes the usual path)."""
        holds = self.holds
        key, direction = flow_key(pkt.src, pkt.sport, pkt.dst, pkt.dport)
        gkey = (key, direction)
        group = holds.groups.get(gkey)
        released: tuple[tuple[object, Result], ...] = ()
        if group is not None:
            if not pkt.payload_len and not pkt.flags & (SYN | FIN | RST):
                # A pure ACK of the same sender (it acknowledges the other direction, or is a
                # window update) passes by the held bytes: holding them must not stop the
                # sender's ACKs, and it carries no byte of the pattern.
                return released
            if (hold is not None and pkt.seq == group.next_seq and pkt.payload_len
                    and sel.has_replaces and self._joinable(pkt, sel)):
                joined = b"".join([m.pkt.payload for m in group.members] + [pkt.payload])
                if sel.pending_from(joined) < len(joined) and self._holdable(pkt, sel):
                    if holds.room(group, pkt):
                        self._hold(gkey, group, pkt, sel, hold, now, segmented)
                        return Result(HOLD)
                    holds.refused += 1
                else:
                    holds.joined += 1
                holds.take(gkey)
                this = Held(None, pkt, segmented, _header_sets(pkt, sel), pkt.seq, now)
                results = self._emit_group([*group.members, this], sel, gkey, now)
                pairs = tuple((m.token, r)
                              for m, r in zip(group.members, results[:-1], strict=True))
                return replace(results[-1], released=pairs)
            holds.take(gkey)
            holds.flushed += 1
            released = tuple(self._release(group, gkey, now))
        if (hold is None or not pkt.payload_len or not sel.has_replaces
                or holds.limits.deadline <= 0 or self.flows is None):
            return released
        payload = pkt.payload
        if sel.pending_from(payload) == len(payload) or not self._holdable(pkt, sel):
            return released
        flow = self.flows.get(key)
        if flow is not None:
            way = flow.ways[direction]
            if flow.ended or (way.started and pkt.seq != way.hi % (1 << 32)):
                return released  # not new bytes in order: nothing to wait for
        if not holds.room(None, pkt):
            holds.refused += 1
            return released
        self._hold(gkey, None, pkt, sel, hold, now, segmented)
        return Result(HOLD, released=released)

    def _hold(self, gkey: tuple[object, int], group: Group | None, pkt: TcpPacket,
              sel: Selection, hold: object, now: float, segmented: bool) -> None:
        held = Held(hold, pkt, segmented, _header_sets(pkt, sel), pkt.seq, now)
        group = self.holds.add(gkey, group, held, now)
        group.selection = sel

    def _emit_group(self, members: list[Held], sel: Selection, gkey: tuple[object, int],
                    now: float) -> list[Result]:
        """Emit contiguous segments of one direction as one piece of stream (see the stream
        module): one Result per member, in order."""
        pkts = [m.pkt for m in members]
        payloads = [p.payload for p in pkts]
        joined = b"".join(payloads)
        bounds = list(accumulate(len(p) for p in payloads[:-1]))
        found = sel.find_edits(joined) if sel.has_replaces else []
        key, direction = gkey
        flows = self.flows
        assert flows is not None and isinstance(key, tuple)
        flow = flows.get(key)
        if flow is None and any(not _keeps_length(e) for e in found):
            flow = flows.create(key, now)
            if flow is None:  # no room for another flow: only the same-length edits
                same = [e for e in found if _keeps_length(e)]
                flows.edits_refused += len(found) - len(same)
                found = same
        if flow is None:
            return self._emit_same_length(members, bounds, found)
        last = pkts[-1]
        plan = flow.rewrite(
            direction, pkts[0].seq, last.ack, last.flags, joined,
            last.sack_blocks() if last.doff > 20 else (), now, lambda _payload: found,
            None, last.window, None,
        )
        if plan.action == "drop":
            return [Result(DROP, track=True) for _ in pkts]
        new_payload = b"" if plan.action == "send_empty" else (
            plan.payload if plan.payload is not None else joined)
        applied = sorted((s, e, len(r)) for s, e, r, _ in plan.applied)
        cuts = cut_points(bounds, [(s, e) for s, e, _ in applied])
        new_cuts = [0, *(to_new(c, applied) for c in cuts), len(new_payload)]
        spans = [(to_new(s, applied), to_new(s, applied) + n) for s, _, n in applied]
        if plan.action == "send_empty":
            new_cuts = [0] * (len(pkts) + 1)
        results: list[Result] = []
        for i, (member, pkt) in enumerate(zip(members, pkts, strict=True)):
            lo, hi = new_cuts[i], new_cuts[i + 1]
            final = i == len(pkts) - 1
            if lo == hi and not final:
                results.append(Result(DROP, track=True))  # its bytes travel in the next one
                continue
            piece = new_payload[lo:hi]
            limit = ((self.mtu if pkt.end <= self.mtu and not member.segmented
                      else MAX_VERDICT_PACKET) - (len(pkt.buf) - pkt.end) - pkt.l4 - pkt.doff)
            keep = fit(lo, piece, limit, spans)
            if keep < len(piece):
                if keep == 0:
                    results.append(Result(DROP, track=True))
                    continue
                piece = piece[:keep]
                flows.segments_cut += 1
            if piece != payloads[i]:
                pkt.replace_payload(piece)
            seq = plan.new_seq if plan.action == "send_empty" else plan.new_seq + lo
            pkt.set_seq(seq % (1 << 32))
            if plan.new_ack is not None:
                pkt.set_ack(plan.new_ack)
            if final and plan.sack is not None:
                pkt.set_sack_blocks(plan.sack)
            start = 0 if i == 0 else cuts[i - 1]
            end = len(joined) if final else cuts[i]
            names = member.fired + [cast(Rule, t).name for s, _, _, t in plan.applied
                                    if start <= s < end]
            results.append(_settled(pkt, names, True, member.segmented))
        return results

    def _emit_same_length(self, members: list[Held], bounds: list[int],
                          found: list[Edit]) -> list[Result]:
        """A group without sequence state: same-length edits, each packet's share in place."""
        starts = [0, *bounds]
        results: list[Result] = []
        for i, member in enumerate(members):
            pkt = member.pkt
            lo = starts[i]
            hi = lo + pkt.payload_len
            local: list[tuple[int, int, bytes]] = []
            names = list(member.fired)
            for s, e, r, tag in found:
                if s < hi and e > lo:
                    a, b = max(s, lo), min(e, hi)
                    local.append((a - lo, b - lo, r[a - s:b - s]))
                    if s >= lo:
                        names.append(tag.name)
            if local:
                pkt.apply_edits(local)
            results.append(_settled(pkt, names, False, member.segmented))
        return results

    # -- payload -------------------------------------------------------------------------------
    def _rewrite_stateless(
        self, pkt: TcpPacket, sel: Selection, fired: list[str], now: float, segmented: bool
    ) -> tuple[Flow | None, int]:
        """Edits for a connection with no sequence state. Returns the flow if one was created."""
        if pkt.payload_len == 0 or not sel.has_replaces:
            return None, 0
        if sel.same_length:
            # Every pattern of the selection keeps its length (the common case): no growth to
            # check, no edit to inspect one by one; a (GSO super-)packet may carry hundreds.
            one = sel.single_pattern
            if one is None:
                present = sel.present(pkt.payload)  # several literals: which occur
                if present is not None and len(present) < 2:
                    if not present:
                        return None, 0
                    one = sel._patterns[present[0]]
            if one is not None:  # one pattern: found and replaced in C
                if pkt.replace_literal(one[0], one[1]):
                    fired.append(one[2].name)
                return None, 0
            found = sel.find_edits(pkt.payload)
            if found:
                pkt.apply_edits([(s, e, n) for s, e, n, _ in found])
                if len(sel.rules) == 1:
                    fired.append(sel.rules[0].name)
                else:
                    fired.extend(rule.name for _, _, _, rule in found)
            return None, 0
        found = sel.find_edits(pkt.payload)
        if self.flows is None:  # no sequence state: what would not fit cannot be cut either
            found = _fitting(pkt, found, sel.max_growth)
        if not found:
            return None, 0
        same = [edit for edit in found if _keeps_length(edit)]
        if self.flows is None or len(same) == len(found):
            pkt.apply_edits([(s, e, n) for s, e, n, _ in found])
            fired.extend(rule.name for _, _, _, rule in found)
            return None, 0
        key, direction = flow_key(pkt.src, pkt.sport, pkt.dst, pkt.dport)
        flow = self.flows.create(key, now)
        if flow is None:
            # the table's memory budget has no room for another flow: the length-changing edits
            # are refused (counted), the same-length ones made as for any flow without state
            self.flows.edits_refused += len(found) - len(same)
            if same:
                pkt.apply_edits([(s, e, n) for s, e, n, _ in same])
                fired.extend(rule.name for _, _, _, rule in same)
            return None, 0
        if not self._rewrite_with_flow(pkt, flow, direction, sel, fired, now, segmented,
                                       first=found):
            # Nothing it would become fits a verdict and it cannot be cut (a SYN; a packet that
            # came longer than a verdict carries): its bytes pass unedited, as with no rule.
            self.flows.retract(key)
            return None, 0
        return flow, direction

    def _rewrite_with_flow(
        self,
        pkt: TcpPacket,
        flow: Flow,
        direction: int,
        sel: Selection,
        fired: list[str],
        now: float,
        segmented: bool,
        first: Found | None = None,
    ) -> bool:
        """Run the segment through its flow's sequence adjuster. False: drop the packet."""
        flags = pkt.flags
        ack = pkt.ack if flags & ACK else None
        sack = pkt.sack_blocks() if pkt.doff > 20 else ()
        if not pkt.payload_len and not flags & (SYN | FIN | RST):
            # a pure ACK: its seq, ACK and SACK edges mapped, nothing else to plan
            plan = flow.rewrite(direction, pkt.seq, ack, flags, b"", sack, now, _no_edits,
                                window=pkt.window)
            _apply_plan(pkt, plan)
            return True
        if first is not None:
            found = first

            def find_edits(payload: bytes) -> Found:
                return found
        elif pkt.payload_len and sel.has_replaces:
            find_edits = sel.find_edits
        else:
            find_edits = _no_edits
        plan = flow.rewrite(
            direction,
            pkt.seq,
            ack,
            flags,
            pkt.payload,
            sack,
            now,
            find_edits,
            # bytes after the datagram (link padding) stay after it: they count against the MTU.
            # A packet longer than the MTU is a GSO/GRO super-packet that the kernel will cut
            # into wire segments itself: it may grow up to what a verdict carries back.
            (self.mtu if pkt.end <= self.mtu and not segmented else MAX_VERDICT_PACKET)
            - (len(pkt.buf) - pkt.end) - pkt.l4 - pkt.doff,
            pkt.window,
            pkt.wscale if flags & SYN else None,
        )
        if plan.action == "drop":
            return False
        if plan.payload is not None and len(plan.payload) - pkt.payload_len > pkt.room:
            # recorded edits replayed on a bigger re-cut of the stream would overflow the IP
            # length field; nothing valid can be sent: drop, the sender retransmits
            return False
        _apply_plan(pkt, plan)
        if plan.applied:
            if len(sel.rules) == 1:
                fired.append(sel.rules[0].name)
            else:
                fired.extend(cast(Rule, tag).name for _, _, _, tag in plan.applied)
        return True


def _header_sets(pkt: TcpPacket, sel: Selection) -> list[str]:
    """Apply the selected rules' ``set`` tables; the names of the rules that changed a field."""
    return [rule.name for rule in sel.rules if _apply_header_set(pkt, rule)]


def _settled(pkt: TcpPacket, names: list[str], track: bool, segmented: bool) -> Result:
    """The Result of a packet whose edits are all made."""
    rules = tuple(dict.fromkeys(names))
    if not pkt.modified:
        return Result(ACCEPT, rules=rules, track=track)
    if pkt.room < 0:
        return Result(DROP, track=True) if track else PASS
    return Result(ACCEPT, pkt.finish(kernel_segments=segmented), rules=rules, track=track)


def _no_edits(payload: bytes) -> Found:
    return []


def _keeps_length(edit: Edit) -> bool:
    """Whether an edit found leaves the payload's length as it is (the one place this is asked
    of a single edit; a whole selection answers it once, as ``Selection.same_length``)."""
    start, end, new, _ = edit
    return end - start == len(new)


def _fitting(pkt: TcpPacket, found: Found, max_growth: int) -> Found:
    """``found``, without its length-changing edits if together they would grow the datagram
    past what a verdict carries back (a GSO super-packet near the limit): those bytes then pass
    unedited.
    Only for an engine without a flow table: with one, the sequence adjuster cuts instead.
    ``max_growth``: the most one edit of the selection adds (0: none grows, nothing to check)."""
    if len(found) * max_growth <= pkt.room:
        return found
    if sum(len(new) - (end - start) for start, end, new, _ in found) <= pkt.room:
        return found
    return [edit for edit in found if _keeps_length(edit)]


def _apply_plan(pkt: TcpPacket, plan: SegmentPlan) -> None:
    """Carry a :class:`~nfrewrite.core.seqadj.SegmentPlan` out on the packet."""
    if plan.action == "send_empty":
        pkt.replace_payload(b"")
    elif plan.payload is not None:
        pkt.replace_payload(plan.payload)
    if plan.clear_fin:
        pkt.set_flags(pkt.flags & ~FIN)
    pkt.set_seq(plan.new_seq)
    if plan.new_ack is not None:
        pkt.set_ack(plan.new_ack)
    if plan.sack is not None:
        pkt.set_sack_blocks(plan.sack)


def _apply_header_set(pkt: TcpPacket, rule: Rule) -> bool:
    """Apply a rule's ``set`` table; True if any field changed."""
    hs = rule.set
    changed = False
    if hs.ttl is not None and pkt.version == 4:
        changed |= pkt.set_ttl(hs.ttl)
    if hs.hop_limit is not None and pkt.version == 6:
        changed |= pkt.set_ttl(hs.hop_limit)
    if hs.dscp is not None:
        changed |= pkt.set_dscp(hs.dscp)
    if hs.window is not None:
        changed |= pkt.set_window(hs.window)
    if hs.mss is not None:
        changed |= pkt.set_mss(hs.mss)
    if hs.mss_max is not None:
        changed |= pkt.clamp_mss(hs.mss_max)
    return changed
