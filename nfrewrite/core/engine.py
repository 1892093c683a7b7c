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

from dataclasses import dataclass
from typing import cast

from nfrewrite.core.constants import ACCEPT, ACK, DROP, FIN, MAX_VERDICT_PACKET, RST, SYN
from nfrewrite.core.packet import TcpPacket, parse
from nfrewrite.core.rules import Edit, Rule, RuleSet, Selection
from nfrewrite.core.seqadj import Flow, FlowTable, SegmentPlan, flow_key

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
    """

    verdict: int
    packet: bytes | None = None
    unparsed: str | None = None
    rules: tuple[str, ...] = ()
    track: bool = False


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
        self, ruleset: RuleSet, flows: FlowTable | None = None, *, mtu: int = DEFAULT_MTU
    ) -> None:
        self.ruleset = ruleset
        self.flows = flows
        self.mtu = mtu
        self._next_expire = 0.0

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
        data: bytes,
        *,
        in_port: str | None = None,
        out_port: str | None = None,
        now: float = 0.0,
        csum_partial: bool | None = False,
        gso: bool | None = None,
    ) -> Result:
        """One packet: ``csum_partial`` says whether its TCP checksum field holds only the
        pseudo-header seed (None: recognise it by value); ``gso`` whether it is a GSO skb (the
        kernel's NFQA_SKB_GSO; None: not told, a packet longer than the MTU is taken for one)."""
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
        rules = sel.rules
        if pkt.flags & SYN and pkt.doff > 20:
            self._leave_room_for_growth(pkt, in_port, out_port)
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
