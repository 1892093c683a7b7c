"""IPv4/IPv6 + TCP packet views over the packet's bytes: parse, edit, keep checksums right.

Theory of operation
-------------------
:func:`parse` looks at the raw IP packet NFQUEUE hands us and returns either a :class:`TcpPacket`
(a view that knows where every header starts) or an :class:`Unparsed` with a reason from the fixed
set :data:`REASONS`. It never raises on bad input: truncated headers, IHL or data offset out of
range, lying length fields, overrunning options, fragments and non-TCP traffic are all "not ours"
and the caller passes them on untouched and counts the reason.

Copy on write. A packet parsed from immutable bytes (``bytes``, or a memoryview of them: the queue
hands over the payload where it lies in the netlink datagram) reads them where they are; the first
edit copies them into a bytearray the packet owns (a same-length payload replace into new bytes,
which ``finish`` hands back as they are). So a packet that passes unchanged, most of a
queued flow, costs no copy of its up to 64 KB, and a payload rewrite builds its one new buffer
from the header and the new payload instead of copying the old payload first (``make bench``
rows 4q and 4). A bytearray given to :func:`parse` is copied at once: its owner may change it.

Edits change the bytearray in place and keep both checksums consistent *incrementally* (RFC 1624,
see :mod:`nfrewrite.core.checksum`): the change in the covered data's sum is folded into the
existing field. That is what keeps the promise "do not launder corruption": a packet whose TCP
checksum was wrong on arrival leaves wrong by exactly the same amount, and a right one leaves right.

Two checksum states exist for the TCP field (``csum_partial``):

* full (False): the field is a complete checksum (what the kernel gives us when the queue has no
  GSO flag: it completes CHECKSUM_PARTIAL before copying to userspace). Edits update it.
* partial (True): the field holds only the pseudo-header seed (TX checksum offload, the queue's
  GSO flag, ``NFQA_SKB_CSUMNOTREADY``); the data was never summed. A verdict that carries a payload
  becomes CHECKSUM_NONE in the kernel, so :meth:`TcpPacket.finish` writes a complete checksum,
  and edits skip the incremental updates that it would redo.
* unknown (None, at parse time): decided from the bytes: a field equal to the seed is partial.

Only a first, unfragmented segment is ours: the TCP checksum of a fragment covers bytes we cannot
see. IPv6 extension headers (hop-by-hop, routing with no segments left, destination options, atomic
fragment) are skipped to reach TCP; anything else in the chain is not ours.

Nothing here touches a socket, a clock or a global: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nfrewrite.core import checksum as cs
from nfrewrite.core.constants import MAX_VERDICT_PACKET
from nfrewrite.core.fields import (
    EXT_FRAGMENT_LENGTH,
    EXT_FRAGMENT_OFFSET,
    EXT_LENGTH,
    EXT_NEXT_HEADER,
    EXT_ROUTING_SEGMENTS_LEFT,
    IP4_CHECKSUM,
    IP4_HEADER_MIN,
    IP4_TOS,
    IP4_TOTAL_LENGTH,
    IP4_TTL,
    IP4_VERSION_IHL,
    IP6_HEADER,
    IP6_HOP_LIMIT,
    IP6_PAYLOAD_LENGTH,
    IP6_VERSION_CLASS,
    TCP_ACK,
    TCP_CHECKSUM,
    TCP_DATA_OFFSET,
    TCP_FLAGS,
    TCP_HEADER_MIN,
    TCP_SEQ,
    TCP_URGENT,
    TCP_WINDOW,
    TCPOPT_LENGTH,
    TCPOPT_TS_ECHO,
    TCPOPT_VALUE,
    Buffer,
    ip4_header,
    ip6_header,
    pack32,
    put16,
    tcp_ports,
    u16,
    u32,
)

# -- fixed set of reasons a packet is not ours (metrics label values) ------------------------------
TRUNCATED_IP = "truncated_ip"
BAD_VERSION = "bad_ip_version"
BAD_IHL = "bad_ihl"
BAD_LENGTH = "bad_total_length"
FRAGMENT = "fragment"
NOT_TCP = "not_tcp"
BAD_EXT_HEADER = "bad_ext_header"
TRUNCATED_TCP = "truncated_tcp"
BAD_DATA_OFFSET = "bad_data_offset"
BAD_TCP_OPTIONS = "bad_tcp_options"

REASONS: tuple[str, ...] = (
    TRUNCATED_IP,
    BAD_VERSION,
    BAD_IHL,
    BAD_LENGTH,
    FRAGMENT,
    NOT_TCP,
    BAD_EXT_HEADER,
    TRUNCATED_TCP,
    BAD_DATA_OFFSET,
    BAD_TCP_OPTIONS,
)

# TCP option kinds
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8
_OPT_FIXED_LEN = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERM: 2, OPT_TS: 10}

_IPPROTO_TCP = 6
_IPV6_SKIPPABLE = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_IPV6_ROUTING = 43
_IPV6_FRAGMENT = 44
_MAX_EXT_HEADERS = 8
_TS_ONLY = b"\x01\x01\x08\x0a"  # NOP NOP TS(10): the options of nearly every data segment


class Unparsed:
    """Why a packet is not ours; ``reason`` is one of :data:`REASONS`."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unparsed({self.reason!r})"


class TcpOption:
    """One TCP option: ``kind`` and the offset of its kind byte in the packet buffer."""

    __slots__ = ("kind", "offset", "length")

    def __init__(self, kind: int, offset: int, length: int) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return f"TcpOption(kind={self.kind}, offset={self.offset}, length={self.length})"


def _options_ok(buf: Buffer, start: int, end: int) -> bool:
    """True when TCP options in ``buf[start:end]`` are well formed (no length overruns)."""
    if end - start == 12 and buf[start : start + 4] == _TS_ONLY:
        return True
    i = start
    while i < end:
        kind = buf[i]
        if kind == OPT_EOL:
            return True
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            return False
        length = buf[i + TCPOPT_LENGTH]
        if length < 2 or i + length > end:
            return False
        fixed = _OPT_FIXED_LEN.get(kind)
        if fixed is not None and length != fixed:
            return False
        if kind == OPT_SACK and (length - 2) % 8:
            return False
        i += length
    return True


def splice(data: bytes, edits: Sequence[tuple[int, int, bytes]], origin: int = 0) -> bytes:
    """``data`` with ``(start, end, replacement)`` edits made: non-overlapping, in order of
    ``start``. Their offsets count from ``origin`` bytes before ``data`` begins (``data`` may be
    the tail of a payload, from its first edit on)."""
    pieces: list[bytes] = []
    pos = 0
    for start, end, new in edits:
        pieces.append(data[pos : start - origin])
        pieces.append(new)
        pos = end - origin
    pieces.append(data[pos:])
    return b"".join(pieces)


def parse(  # noqa: C901 - one early return per refusal reason, in the headers' order
    data: bytes | bytearray | memoryview, *, csum_partial: bool | None = False
) -> TcpPacket | Unparsed:
    """Parse a raw IPv4/IPv6 packet. Returns a :class:`TcpPacket` view or an :class:`Unparsed`.

    ``data`` is read where it is when immutable (``bytes``, or a contiguous byte memoryview of
    ``bytes``), else copied; the first edit copies it into a bytearray the view owns (edits never
    touch the caller's bytes). ``csum_partial`` says the TCP checksum field holds only the
    pseudo-header seed; ``None`` decides from the bytes: a field equal to the seed is taken as
    partial (a complete checksum equals it once in 65,536 packets, and recomputing it from the
    data is right too).
    """
    buf: Buffer = (data if isinstance(data, bytes)
                   or (isinstance(data, memoryview) and isinstance(data.obj, bytes)
                       and data.format == "B" and data.c_contiguous)
                   else bytearray(data))
    n = len(buf)
    if n < IP4_HEADER_MIN:
        return Unparsed(TRUNCATED_IP)
    version = buf[IP4_VERSION_IHL] >> 4
    if version == 4:
        version_ihl, total, fragment, protocol, src, dst = ip4_header(buf, 0)
        ihl = (version_ihl & 0x0F) * 4
        if ihl < IP4_HEADER_MIN:
            return Unparsed(BAD_IHL)
        if total > n or total < ihl:
            return Unparsed(BAD_LENGTH if ihl <= n else BAD_IHL)
        if fragment & 0x3FFF:  # MF flag or fragment offset
            return Unparsed(FRAGMENT)
        if protocol != _IPPROTO_TCP:
            return Unparsed(NOT_TCP)
        l4 = ihl
        end = total
    elif version == 6:
        if n < IP6_HEADER:
            return Unparsed(TRUNCATED_IP)
        payload_length, nh, src, dst = ip6_header(buf, 0)
        end = IP6_HEADER + payload_length
        if end > n:
            return Unparsed(BAD_LENGTH)
        if end == IP6_HEADER and nh == 0:
            return Unparsed(BAD_LENGTH)  # jumbogram (payload length in hop-by-hop): not supported
        l4 = IP6_HEADER
        for _ in range(_MAX_EXT_HEADERS + 1):
            if nh == _IPPROTO_TCP:
                break
            if nh in _IPV6_SKIPPABLE:
                if l4 + 8 > end:
                    return Unparsed(BAD_EXT_HEADER)
                if nh == _IPV6_ROUTING and buf[l4 + EXT_ROUTING_SEGMENTS_LEFT] != 0:
                    # routing header with segments left: the pseudo-header's destination is
                    # the final one, not the one in the IPv6 header; not ours.
                    return Unparsed(NOT_TCP)
                nh = buf[l4 + EXT_NEXT_HEADER]
                l4 += (buf[l4 + EXT_LENGTH] + 1) * 8
            elif nh == _IPV6_FRAGMENT:
                if l4 + EXT_FRAGMENT_LENGTH > end:
                    return Unparsed(BAD_EXT_HEADER)
                if u16(buf, l4 + EXT_FRAGMENT_OFFSET)[0]:  # offset or M flag: a real fragment
                    return Unparsed(FRAGMENT)
                nh = buf[l4 + EXT_NEXT_HEADER]
                l4 += EXT_FRAGMENT_LENGTH
            else:
                return Unparsed(NOT_TCP)
        else:
            return Unparsed(BAD_EXT_HEADER)
        if l4 > end:
            return Unparsed(BAD_EXT_HEADER)
    else:
        return Unparsed(BAD_VERSION)

    if end - l4 < TCP_HEADER_MIN:
        return Unparsed(TRUNCATED_TCP)
    doff = (buf[l4 + TCP_DATA_OFFSET] >> 4) * 4
    if doff < TCP_HEADER_MIN or l4 + doff > end:
        return Unparsed(BAD_DATA_OFFSET)
    if doff > TCP_HEADER_MIN and not _options_ok(buf, l4 + TCP_HEADER_MIN, l4 + doff):
        return Unparsed(BAD_TCP_OPTIONS)
    pkt = TcpPacket(buf, version, l4, doff, end, src, dst, bool(csum_partial))
    if csum_partial is None:
        pkt.csum_partial = pkt.holds_seed()
    return pkt


class TcpPacket:
    """A parsed TCP segment in an IPv4 or IPv6 packet, editable in place.

    Offsets: ``l4`` is where the TCP header starts, ``doff`` its length, ``end`` where the IP
    datagram ends (bytes after it, such as link padding, are kept as they are).
    """

    __slots__ = (
        "buf",
        "version",
        "l4",
        "doff",
        "end",
        "src",
        "dst",
        "sport",
        "dport",
        "csum_partial",
        "modified",
    )

    def __init__(
        self,
        buf: Buffer,
        version: int,
        l4: int,
        doff: int,
        end: int,
        src: bytes,
        dst: bytes,
        csum_partial: bool,
    ) -> None:
        self.buf = buf
        self.version = version
        self.l4 = l4
        self.doff = doff
        self.end = end
        self.src = src
        self.dst = dst
        self.sport, self.dport = tcp_ports(buf, l4)
        self.csum_partial = csum_partial
        self.modified = False

    def _writable(self) -> bytearray:
        """The packet's own bytearray: the bytes it was parsed from, copied on the first edit."""
        buf = self.buf
        if not isinstance(buf, bytearray):
            buf = self.buf = bytearray(buf)
        return buf

    # -- reading ---------------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return u32(self.buf, self.l4 + TCP_SEQ)[0]

    @property
    def ack(self) -> int:
        return u32(self.buf, self.l4 + TCP_ACK)[0]

    @property
    def flags(self) -> int:
        return self.buf[self.l4 + TCP_FLAGS]

    @property
    def window(self) -> int:
        return u16(self.buf, self.l4 + TCP_WINDOW)[0]

    @property
    def tcp_checksum(self) -> int:
        return u16(self.buf, self.l4 + TCP_CHECKSUM)[0]

    @property
    def urgent(self) -> int:
        return u16(self.buf, self.l4 + TCP_URGENT)[0]

    @property
    def ttl(self) -> int:
        """IPv4 TTL or IPv6 hop limit."""
        return self.buf[IP4_TTL] if self.version == 4 else self.buf[IP6_HOP_LIMIT]

    @property
    def dscp(self) -> int:
        return self._traffic_class() >> 2

    def _traffic_class(self) -> int:
        """IPv4's TOS byte, or IPv6's traffic class (which straddles the first two bytes)."""
        buf = self.buf
        if self.version == 4:
            return buf[IP4_TOS]
        return (u16(buf, IP6_VERSION_CLASS)[0] >> 4) & 0xFF

    @property
    def payload_offset(self) -> int:
        return self.l4 + self.doff

    @property
    def payload_len(self) -> int:
        return self.end - self.l4 - self.doff

    @property
    def payload(self) -> bytes:
        # one copy (slicing the bytearray first would make two: up to 64 KB each)
        return bytes(memoryview(self.buf)[self.l4 + self.doff : self.end])

    @property
    def room(self) -> int:
        """How many bytes the packet may still grow: to :data:`MAX_VERDICT_PACKET` (65,531), what
        a verdict can carry back, header and any link padding included, in both families (below
        IPv4's own limit of 65,535)."""
        return MAX_VERDICT_PACKET - len(self.buf)

    @property
    def segment_len(self) -> int:
        """TCP header + payload length (the pseudo-header's length field)."""
        return self.end - self.l4

    def options(self) -> list[TcpOption]:
        """The TCP options in order (NOP and EOL included; validated at parse time)."""
        out: list[TcpOption] = []
        buf, i, stop = self.buf, self.l4 + TCP_HEADER_MIN, self.l4 + self.doff
        while i < stop:
            kind = buf[i]
            if kind == OPT_EOL:
                out.append(TcpOption(kind, i, 1))
                break
            if kind == OPT_NOP:
                out.append(TcpOption(kind, i, 1))
                i += 1
                continue
            length = buf[i + TCPOPT_LENGTH]
            out.append(TcpOption(kind, i, length))
            i += length
        return out

    def find_option(self, kind: int) -> TcpOption | None:
        if self.doff == TCP_HEADER_MIN:
            return None
        for opt in self.options():
            if opt.kind == kind:
                return opt
        return None

    @property
    def mss(self) -> int | None:
        opt = self.find_option(OPT_MSS)
        return None if opt is None else u16(self.buf, opt.offset + TCPOPT_VALUE)[0]

    @property
    def wscale(self) -> int | None:
        opt = self.find_option(OPT_WSCALE)
        return None if opt is None else self.buf[opt.offset + TCPOPT_VALUE]

    @property
    def sack_permitted(self) -> bool:
        return self.find_option(OPT_SACK_PERM) is not None

    @property
    def timestamps(self) -> tuple[int, int] | None:
        opt = self.find_option(OPT_TS)
        if opt is None:
            return None
        buf = self.buf
        return u32(buf, opt.offset + TCPOPT_VALUE)[0], u32(buf, opt.offset + TCPOPT_TS_ECHO)[0]

    def sack_blocks(self) -> list[tuple[int, int]]:
        """SACK blocks as (left edge, right edge) pairs, in option order."""
        opt = self.find_option(OPT_SACK)
        if opt is None:
            return []
        buf = self.buf
        return [
            (u32(buf, off)[0], u32(buf, off + 4)[0])
            for off in range(opt.offset + TCPOPT_VALUE, opt.offset + opt.length, 8)
        ]

    # -- checksums -------------------------------------------------------------------------------
    def pseudo_sum(self, segment_len: int | None = None) -> int:
        """Sum of the TCP pseudo-header (IPv4 or IPv6) for ``segment_len`` (default: current)."""
        length = self.segment_len if segment_len is None else segment_len
        return (cs.ones_sum(self.src) + cs.ones_sum(self.dst) + 6 + length) % cs.MOD

    def pseudo_header_seed(self) -> int:
        """What the TCP checksum field holds under TX offload (CHECKSUM_PARTIAL): the folded
        pseudo-header sum, not complemented (as Linux's ``~tcp_v4_check(len, s, d, 0)``)."""
        return self.pseudo_sum() or 0xFFFF

    def holds_seed(self) -> bool:
        """The TCP checksum field equals the pseudo-header seed: what TX offload leaves there (a
        complete checksum equals it once in 65,536 packets)."""
        return self.tcp_checksum == self.pseudo_header_seed()

    def tcp_residual(self) -> int:
        """0 when the TCP checksum verifies; otherwise how far off it is (mod 0xFFFF)."""
        return (self.pseudo_sum() + cs.ones_sum(memoryview(self.buf)[self.l4 : self.end])) % cs.MOD

    def tcp_checksum_ok(self) -> bool:
        return self.tcp_residual() == 0

    def compute_tcp_checksum(self) -> int:
        """The correct TCP checksum for the current bytes (ignores the field's value)."""
        seg = memoryview(self.buf)[self.l4 : self.end]
        total = self.pseudo_sum() + cs.ones_sum(seg) - self.tcp_checksum
        return cs.fold_field(total)

    def ip_checksum_ok(self) -> bool:
        """IPv4 header checksum verifies (always True for IPv6, which has none)."""
        if self.version != 4:
            return True
        return cs.ones_sum(memoryview(self.buf)[: self.l4]) == 0

    def compute_ip_checksum(self) -> int:
        hdr = memoryview(self.buf)[: self.l4]
        return cs.fold_field(cs.ones_sum(hdr) - u16(self.buf, IP4_CHECKSUM)[0])

    def finish(self, *, kernel_segments: bool = False) -> bytes:
        """The packet bytes to hand back to the kernel.

        In partial mode (the field held only the pseudo-header seed) the kernel will send what we
        return as CHECKSUM_NONE, so a complete TCP checksum is written here, unless
        ``kernel_segments``: a GSO skb, which the kernel segments in software on the way out
        (``netif_needs_gso``: GSO and not CHECKSUM_PARTIAL), setting every segment's checksum
        up itself (``tcp4/6_gso_segment``). Its field then gets the seed for the new length, as
        the kernel itself would write it, and the 64 KB sum is saved.
        """
        if self.csum_partial:
            field = (self.pseudo_header_seed() if kernel_segments
                     else self.compute_tcp_checksum())
            if field != self.tcp_checksum:
                put16(self._writable(), self.l4 + TCP_CHECKSUM, field)
        return bytes(self.buf)

    # -- low-level field writes with incremental checksum updates ---------------------------------
    def _tcp_csum_adjust(self, old_sum: int, new_sum: int) -> None:
        if self.csum_partial:
            return  # recomputed in full by finish()
        buf, off = self._writable(), self.l4 + TCP_CHECKSUM
        put16(buf, off, cs.update(u16(buf, off)[0], old_sum, new_sum))

    def _ip_csum_adjust(self, old_sum: int, new_sum: int) -> None:
        if self.version == 4:
            buf = self._writable()
            put16(buf, IP4_CHECKSUM, cs.update(u16(buf, IP4_CHECKSUM)[0], old_sum, new_sum))

    def _set_tcp_u16(self, off: int, value: int) -> bool:
        """Write a 16-bit value at ``off`` inside the TCP segment; True if it changed."""
        old = u16(self.buf, off)[0]
        if old == value:
            return False
        buf = self._writable()
        old_sum = cs.sum_at(buf[off : off + 2], off - self.l4)
        put16(buf, off, value)
        self._tcp_csum_adjust(old_sum, cs.sum_at(buf[off : off + 2], off - self.l4))
        self.modified = True
        return True

    def _set_tcp_u32(self, off: int, value: int) -> bool:
        return self._set_tcp_bytes(off, pack32(value & 0xFFFFFFFF))

    # -- header edits ----------------------------------------------------------------------------
    def set_ttl(self, value: int) -> bool:
        """Set the IPv4 TTL or IPv6 hop limit; True if it changed."""
        if self.ttl == value:
            return False
        buf = self._writable()
        if self.version == 6:
            buf[IP6_HOP_LIMIT] = value
            self.modified = True
            return True
        old = u16(buf, IP4_TTL)[0]  # TTL and protocol: the checksummed word
        buf[IP4_TTL] = value
        self._ip_csum_adjust(old, u16(buf, IP4_TTL)[0])
        self.modified = True
        return True

    def set_dscp(self, value: int) -> bool:
        """Set the DSCP (6 bits), keeping the two ECN bits; True if it changed."""
        tc = self._traffic_class()
        new_tc = (value << 2) | (tc & 0x03)
        if tc == new_tc:
            return False
        buf = self._writable()
        if self.version == 4:
            old = u16(buf, IP4_VERSION_IHL)[0]  # version, IHL and TOS: the checksummed word
            buf[IP4_TOS] = new_tc
            self._ip_csum_adjust(old, u16(buf, IP4_VERSION_IHL)[0])
        else:
            word = u16(buf, IP6_VERSION_CLASS)[0]
            put16(buf, IP6_VERSION_CLASS, (word & 0xF00F) | (new_tc << 4))
        self.modified = True
        return True

    def set_window(self, value: int) -> bool:
        return self._set_tcp_u16(self.l4 + TCP_WINDOW, value)

    def set_flags(self, value: int) -> bool:
        off = self.l4 + TCP_DATA_OFFSET  # the word holding data offset, reserved bits and flags
        return self._set_tcp_u16(off, (u16(self.buf, off)[0] & 0xFF00) | (value & 0xFF))

    def set_seq(self, value: int) -> bool:
        return self._set_tcp_u32(self.l4 + TCP_SEQ, value)

    def set_ack(self, value: int) -> bool:
        return self._set_tcp_u32(self.l4 + TCP_ACK, value)

    def set_mss(self, value: int) -> bool:
        """Set the MSS option's value if the segment carries one; True if it changed."""
        opt = self.find_option(OPT_MSS)
        return False if opt is None else self._set_tcp_u16(opt.offset + TCPOPT_VALUE, value)

    def clamp_mss(self, maximum: int) -> bool:
        """Lower the MSS option to ``maximum`` if it is larger; True if it changed."""
        opt = self.find_option(OPT_MSS)
        if opt is None:
            return False
        current = u16(self.buf, opt.offset + TCPOPT_VALUE)[0]
        return current > maximum and self._set_tcp_u16(opt.offset + TCPOPT_VALUE, maximum)

    def set_sack_blocks(self, blocks: Iterable[tuple[int, int]]) -> bool:
        """Rewrite the SACK option's blocks in place. Fewer blocks than the option held shrink the
        option and pad the freed bytes with NOPs (the header length stays the same); more blocks
        than fit raise ValueError."""
        opt = self.find_option(OPT_SACK)
        if opt is None:
            return False
        blocks = list(blocks)
        if 2 + 8 * len(blocks) > opt.length:
            raise ValueError("more SACK blocks than the option holds")
        if blocks:
            new = bytes((OPT_SACK, 2 + 8 * len(blocks))) + b"".join(
                pack32(left & 0xFFFFFFFF) + pack32(right & 0xFFFFFFFF)
                for left, right in blocks
            )
        else:
            new = b""
        new += bytes((OPT_NOP,)) * (opt.length - len(new))
        return self._set_tcp_bytes(opt.offset, new)

    def _set_tcp_bytes(self, off: int, new: bytes) -> bool:
        """Overwrite same-length bytes at ``off`` inside the TCP segment, checksum following."""
        end = off + len(new)
        old = bytes(self.buf[off:end])
        if old == new:
            return False
        buf = self._writable()
        rel = off - self.l4
        buf[off:end] = new
        self._tcp_csum_adjust(cs.sum_at(old, rel), cs.sum_at(new, rel))
        self.modified = True
        return True

    # -- payload edits ---------------------------------------------------------------------------
    def replace_literal(self, find: bytes, with_: bytes) -> bool:
        """Replace every occurrence of ``find`` in the payload by ``with_`` (same length), left to
        right, non-overlapping: the edits :meth:`apply_edits` would get from a one-pattern search,
        done by ``bytes.replace`` in C. Returns whether there was any occurrence.

        A GSO super-packet can carry hundreds of occurrences; one edit at a time costs ~0.5 us
        each in Python, this costs two sums over the payload (none in partial mode, where
        ``finish`` sums it anyway). The checksum is updated by the payload's old and new sums, so
        an arrival error is carried through exactly as with :meth:`apply_edits`.
        """
        if len(find) != len(with_) or not find:
            raise ValueError("replace_literal needs a pattern and a same-length replacement")
        old = self.payload
        if find not in old:  # stops at the first occurrence; counting them all costs a full scan
            return False
        new = old.replace(find, with_)
        if new != old:
            base, end, buf = self.l4 + self.doff, self.end, self.buf
            if isinstance(buf, bytearray):
                buf[base:end] = new
            else:  # the first edit: the packet's own bytes, made of header, new payload and
                # trailer at once (immutable: finish() hands them back as they are, without
                # another copy, unless a later edit wants them writable)
                view = memoryview(buf)
                self.buf = b"".join((view[:base], new, view[end:]))
            if not self.csum_partial:  # the payload starts at an even offset of the segment
                self._tcp_csum_adjust(cs.ones_sum(old), cs.ones_sum(new))
            self.modified = True
        return True

    def apply_edits(self, edits: Iterable[tuple[int, int, bytes]]) -> int:
        """Replace payload ranges: each edit is (start, end, new bytes), offsets relative to the
        original payload, non-overlapping (they are sorted here). Returns the change in payload
        length.

        IP total/payload length and both checksums follow, incrementally: only the bytes from the
        first changed position onwards are summed (old and new), so an error in the arrival
        checksum is carried through exactly.
        """
        edits = sorted(edits)
        if not edits:
            return 0
        buf, l4, base = self._writable(), self.l4, self.l4 + self.doff
        old_seg_len = self.end - l4
        delta = sum(len(new) - (end - start) for start, end, new in edits)
        if all(len(new) == end - start for start, end, new in edits):
            # (not just delta == 0: a longer edit and a shorter one can cancel out, and the
            # bytes between them still move; found by the random-edit property test)
            if self.csum_partial:  # finish() sums the whole segment anyway
                for start, end, new in edits:
                    buf[base + start : base + end] = new
                self.modified = True
                return 0
            # Same length: each edited region is weighed on its own, before and after (as
            # cs.sum_at does, inlined: a segment often carries dozens of edits), and the
            # differences go into the checksum field in one update.
            old_total = new_total = 0
            from_bytes = int.from_bytes
            for start, end, new in edits:
                a, b = base + start, base + end
                old_v = from_bytes(buf[a:b], "big")
                new_v = from_bytes(new, "big")
                if (b - l4) & 1:  # region ends at an odd offset: its last byte is a high byte
                    old_v <<= 8
                    new_v <<= 8
                old_total += old_v
                new_total += new_v
                buf[a:b] = new
            self._tcp_csum_adjust(old_total % cs.MOD, new_total % cs.MOD)
            self.modified = True
            return 0
        # Length changes: everything from the first edit to the segment's end moves.
        first_start = edits[0][0]
        first = base + first_start
        old_tail = bytes(buf[first : self.end])
        new_tail = splice(old_tail, edits, origin=first_start)
        trailer = bytes(buf[self.end :])
        del buf[first:]
        buf += new_tail
        new_end = len(buf)
        buf += trailer
        if not self.csum_partial:  # (partial: finish() sums the whole segment anyway)
            new_seg_len = new_end - l4
            rel = first - l4
            old_sum = (cs.sum_at(old_tail, rel) + old_seg_len) % cs.MOD  # pseudo-header length
            new_sum = (cs.sum_at(new_tail, rel) + new_seg_len) % cs.MOD
            self._tcp_csum_adjust(old_sum, new_sum)
        self.end = new_end
        self._set_ip_length(new_end)
        self.modified = True
        return delta

    def replace_payload(self, payload: bytes) -> int:
        """Replace the whole payload; returns the change in length."""
        return self.apply_edits([(0, self.payload_len, payload)])

    def _set_ip_length(self, end: int) -> None:
        buf = self._writable()
        if self.version == 4:
            old = u16(buf, IP4_TOTAL_LENGTH)[0]
            put16(buf, IP4_TOTAL_LENGTH, end)
            self._ip_csum_adjust(old, end)
        else:
            put16(buf, IP6_PAYLOAD_LENGTH, end - IP6_HEADER)
