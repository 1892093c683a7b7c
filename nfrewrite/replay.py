"""``nfrewrite replay``: the live engine, offline, over a capture file.

What it is for
==============
Seeing what a rule set would do to real traffic before it touches the wire: read a pcap or pcapng
capture, run every packet through the same :class:`~nfrewrite.core.engine.Engine` the daemon uses,
write the result as a pcap, and print how often each rule fired. It must not load the capture
into memory (captures are often larger than RAM), parse packets with scapy on the hot path (slow,
and an independent parser could disagree with the engine's), or repair what it does not rewrite.

Like the daemon, it holds a segment that ends in a pattern's beginning until the next segment of
its direction (the stream matcher, :mod:`nfrewrite.core.stream`), and writes the held packets when
the engine releases them, so the output is in the order the daemon would have sent it. Deadlines
(``[flows] hold_ms``) run on the capture's timestamps; at the end of the capture everything still
held is written.

Usage::

    nfrewrite replay -c CONFIG [--csum-partial auto|yes|no] [--in-port PORT] [--out-port PORT]
                     [--mtu N] IN.pcap OUT.pcap

``--in-port``/``--out-port`` name the bridge ports every packet is taken to cross (a capture does
not say; rules with ``match.in_port``/``out_port`` apply only when given). ``--mtu`` is the MTU of
the link the packets leave by (default 1500, as the daemon when no link says; see "Cut
segments"). Exit status: 0 done; 1 invalid config or rules (the diagnostics ``nfrewrite check``
prints); 2 usage; 4 unreadable or unsupported input, unwritable output (one line on stderr; OUT is
not written, and a file already there is left as it was); 5 the input is damaged part way (one
line on stderr naming the record and its byte offset; OUT then holds the packets replayed before
the damage, and the summary of those goes to stdout).

Theory of operation
===================
Streaming. A small reader of its own (``_pcap_records``, ``_pcapng_records``: ``struct`` over a
buffered file) yields one record at a time as raw bytes plus its timestamp, original length and
interface; each rewritten record goes straight to the output. Memory is bounded by the engine's
state (the flow table and the rule set's caches, both capped) and one record, never by the file.
The reader is our own rather than scapy's because a replay must see every byte of every record and
must stop loudly at damage: scapy's readers cut records at 65,535 bytes (a full 64 KB segment
captured on loopback is 65,549) and take a truncated or damaged record for the end of the file.
Every record is taken whole: a captured length up to 262,144 bytes (the most libpcap writes) and
a pcapng block up to 16 MiB. A record that is cut off by the end of the file, a record header
whose captured length is beyond that, a pcapng block whose length is not a multiple of 4, is
shorter than a block, runs past the end of the file or disagrees with its trailing copy, a packet
block naming an undefined interface: each is *damage* at a record number and byte offset (pcap:
the record's number and where its header starts; pcapng: the block's). Damage before the output
could be started (the file header; a pcapng before its first interface) refuses the input (exit
4). Damage later ends the replay: what was replayed before it is written out whole, and the
command exits 5 saying where and how many packets the output holds.

Output. Written to a temporary file in OUT's directory and renamed over OUT only when the replay
got that far (done, or stopped at damage), so a refused input, an unwritable disk or an interrupted
run leaves an existing OUT as it was. (OUT that exists and is not a regular file, say a FIFO or
``/dev/null``, is written directly.) The output is classic pcap: nanosecond timestamps when the
input had them, or came from pcapng; the input's link type field (its FCS bits too) and snaplen (a
pcapng's: the largest of its interfaces', 262,144 if one has none). A rewritten frame longer than
that snaplen raises the header's snaplen to the longest record written (readers cut records at the
header's snaplen), patched in at the end (OUT that cannot be seeked gets the larger of the input's
snaplen and 262,144 from the start).

One engine, one flow table, over the whole capture, fed in file order with ``now`` = the packet's
capture timestamp: a length-changing replace in one segment shifts the sequence numbers of every
later segment of that connection, and the ACK/SACK numbers of the other direction, exactly as
live. Flow limits and idle timeout come from the config's ``[flows]``. Packets are not
reordered.

What the input means. Each record is a packet ARRIVING at the appliance, and each output record is
that packet as it would LEAVE: the output of a two-way connection therefore interleaves the two
sides of the box (server data as the client gets it, client ACKs as the server gets them), just as
the engine sees them. An endpoint behind the box acknowledges the bytes it received, i.e. the other
side's REWRITTEN stream, and the engine maps such ACKs (and SACK edges) back into the sender's
numbering. In a capture of traffic that never passed a rewriter both ends number the original
bytes, so once a length-changing edit has happened in one direction, the ACKs of the other
direction come out shifted by that direction's accumulated length difference (a capture with only
same-length edits, or of one direction, is unaffected). This is the engine doing exactly what it
does live; tools that follow the conversation (tshark's analysis flags) will see those ACKs as
acknowledging more or less than was sent.

Cut segments. Live, a segment that edits grow past the MTU is cut at an edit boundary and the
sender retransmits the tail (a packet longer than the MTU is a GSO/GRO super-packet, which may
grow up to 65,531 bytes; see the engine). Offline nothing retransmits: the output stream of that
connection has a hole where the tail would have gone. The summary says how many segments were cut
and how many (rewritten) bytes were not emitted, and ``--mtu`` sets the MTU the engine works
with. The capture cannot tell the MTU of the link the packets would leave by (a snaplen is not an
MTU), so the default is the daemon's fallback, 1500; a capture taken on loopback or with jumbo
frames wants ``--mtu`` set to its link's. The bytes not emitted are measured in the connection's
rewritten numbering, from the end the whole segment would have had to the end of what was sent.

Link layer. The engine wants an IP packet. Each link type has a small function that finds where
IP starts in a frame (no scapy): Ethernet (1; 802.1Q / 802.1ad VLAN tags, stacked too, are
skipped), raw IP (101, and 228/229 for IPv4/IPv6 only), Linux cooked captures SLL (113) and SLL2
(276). Only the low 16 bits of a pcap header's link type field are the link type; the bits above
may say that every frame ends in a frame check sequence (FCS) of so many bytes, as a pcapng
interface's ``if_fcslen`` option does. Ethernet with a 4-byte FCS is supported: the FCS is taken
off before the link layer is looked at and put back after; a rewritten frame gets a freshly
computed FCS if its own verified, and keeps its (now certainly wrong) one if it did not (a bad
frame stays bad). Other FCS lengths or link types with an FCS, and unknown flag bits, are refused
by name. A frame that carries something else (ARP, a truncated header) is "not ours": written
unchanged and counted by reason, as the engine counts its own reasons (``not_tcp``,
``fragment``, ...). A frame the capture cut short (captured length below original length, the
snaplen) whose IP datagram is not whole is counted as ``truncated_ip`` and written unchanged. Bytes
after the IP datagram (Ethernet padding, a trailer) are cut off before the engine and put back
after it. The output keeps each frame's link header, its timestamp and the input's link type;
only the IP packet is replaced, and the record's original length grows or shrinks with it.
Dropped packets are left out. A pcapng input whose interfaces use different link types (or FCS
lengths) cannot be written as one pcap and is refused at the first packet that differs.

Checksums (``--csum-partial``). A capture taken where packets are received holds complete
checksums, and the engine keeps them right incrementally (a packet that arrived corrupt leaves
corrupt by the same amount: the engine never launders corruption). A capture taken on the sending
host with TX checksum offload holds only the pseudo-header sum in the TCP checksum field (the NIC
would have finished it). ``no`` treats every packet as complete. ``yes`` treats every packet as
partial: a rewritten one gets a freshly computed checksum (which also hides any real corruption).
``auto`` (default) decides per rewritten packet: if the input's TCP checksum does not verify but
equals the pseudo-header seed, the packet was partial and the output gets a complete checksum;
otherwise it is treated as complete. Packets that are not rewritten are always written as they
came. (``auto`` runs the engine in complete mode and then completes the checksum of such a packet,
which gives the same bytes as partial mode: the engine's partial mode only skips the incremental
updates and computes the checksum at the end.)

Report. At the end a summary goes to STDOUT (it is the command's result): packets read, modified
(any byte changed, sequence numbers included), dropped, not ours by reason, written, segments cut
at the MTU and packets too long to change (datagrams over 65,531 bytes that a rule's match covers
and the engine passed as they were; both only when there were any), flows that got a sequence
offset, and one line per rule: the packets it rewrote (or, for a ``drop`` rule, dropped),
counted as the daemon's per-rule metric counts them (a retransmission that gets an edit recorded
earlier again does not count a second time)::

    replay in.pcap -> out.pcap (Ethernet, link type 1)
    packets read                  200000
    packets modified                2000
    packets dropped                    0
    packets not ours                  12 (not_ip 12)
    packets written               200000
    segments cut at the MTU            3 (4,380 bytes not emitted; live the sender resends
                                          them; --mtu 1500)
    flows with a sequence offset     100
    rule grow                        100 rewritten
    time 1.63 s (122,393 packets/s)

While running, and only when stderr is a terminal, a one-line progress indicator (bytes read of
the file's size) is redrawn on stderr at most ten times a second.

Failures raise :class:`ReplayError` with a one-line reason (unreadable or unknown input, a link
type we cannot take apart), damage part way :class:`DamagedInput` (which carries the summary of
what was replayed); the CLI turns them into exit status 4 and 5.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Literal, NamedTuple, cast

from nfrewrite.config.settings import FlowsConfig
from nfrewrite.core.constants import DROP, HOLD, MAX_VERDICT_PACKET
from nfrewrite.core.engine import DEFAULT_MTU, Engine, Result
from nfrewrite.core.fields import ip_length, u16
from nfrewrite.core.packet import TRUNCATED_IP, TcpPacket, parse
from nfrewrite.core.rules import RuleSet
from nfrewrite.core.seqadj import FlowTable, flow_key
from nfrewrite.core.stream import HoldLimits

__all__ = [
    "LINK_TYPES",
    "MAX_CAPLEN",
    "CsumMode",
    "DamagedInput",
    "Progress",
    "ReplayError",
    "Summary",
    "replay",
]

CsumMode = Literal["auto", "yes", "no"]

# -- link layer ---------------------------------------------------------------------------------

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINK_TYPES: dict[int, str] = {
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}

# The bits of a pcap header's link type field above the link type itself.
LT_RESERVED = 0x0BFF0000  # must be zero
LT_FCS_PRESENT = 0x04000000  # the top 4 bits then give the FCS length, in 16-bit units
ETHERNET_FCS = 4

# reasons a frame is not ours before the engine sees it (the engine adds its own: packet.REASONS)
TRUNCATED_LINK = "truncated_link_header"
NOT_IP = "not_ip"

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TAGS = frozenset((0x8100, 0x88A8, 0x9100))  # 802.1Q, 802.1ad, old QinQ

# Where IP starts in a frame, or why the frame is not IP.
Splitter = Callable[[bytes], "int | str"]


def _after_ethertype(frame: bytes, at: int, payload: int) -> int | str:
    """The ethertype is at ``at`` and its payload at ``payload``; skip VLAN tags (each 4 bytes:
    TCI, then the inner ethertype)."""
    n = len(frame)
    if n < at + 2:
        return TRUNCATED_LINK
    etype = u16(frame, at)[0]
    while etype in VLAN_TAGS:
        if n < payload + 4:
            return TRUNCATED_LINK
        etype = u16(frame, payload + 2)[0]
        payload += 4
    if etype in (ETH_P_IP, ETH_P_IPV6):
        return payload if n >= payload else TRUNCATED_LINK
    return NOT_IP


def _ethernet(frame: bytes) -> int | str:
    return _after_ethertype(frame, 12, 14)  # dst(6) src(6) type(2)


def _sll(frame: bytes) -> int | str:
    # packet type(2) ARPHRD(2) address length(2) address(8) protocol(2)
    if len(frame) < 16:
        return TRUNCATED_LINK
    return _after_ethertype(frame, 14, 16)


def _sll2(frame: bytes) -> int | str:
    # protocol(2) reserved(2) ifindex(4) ARPHRD(2) packet type(1) address length(1) address(8)
    if len(frame) < 20:
        return TRUNCATED_LINK
    return _after_ethertype(frame, 0, 20)


def _raw(frame: bytes) -> int | str:
    return 0


SPLITTERS: dict[int, Splitter] = {
    LINKTYPE_ETHERNET: _ethernet,
    LINKTYPE_RAW: _raw,
    LINKTYPE_IPV4: _raw,
    LINKTYPE_IPV6: _raw,
    LINKTYPE_LINUX_SLL: _sll,
    LINKTYPE_LINUX_SLL2: _sll2,
}


def _ethernet_fcs(frame: bytes) -> bytes:
    """The Ethernet FCS of ``frame`` (destination address to the end of the padding), as it is
    sent: CRC-32, least significant byte first."""
    return struct.pack("<I", zlib.crc32(frame))


# -- errors, progress, summary ------------------------------------------------------------------


class ReplayError(Exception):
    """A failure the user can act on; ``str()`` is one line."""


class DamagedInput(ReplayError):
    """The input is damaged part way; ``summary`` says what was replayed (and written) before."""

    def __init__(self, message: str, summary: Summary) -> None:
        super().__init__(message)
        self.summary = summary


class _Damage(Exception):
    """Raised by the readers: where (record or block number, byte offset) and what."""

    def __init__(self, kind: str, number: int, offset: int, what: str) -> None:
        super().__init__(f"{kind} {number} at byte offset {offset}: {what}")


class Progress:
    """``\\r``-redrawn line on a terminal: bytes read of the file size, at most ``rate`` per s."""

    def __init__(self, total: int, stream: IO[str], rate: float = 10.0) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.interval = 1.0 / rate
        self.next = 0.0
        self.shown = False

    def update(self, position: int, packets: int) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.interval
        pct = min(100.0, 100.0 * position / self.total)
        self.stream.write(
            f"\rreplay: {pct:5.1f}%  {position / 1e6:,.1f} of {self.total / 1e6:,.1f} MB  "
            f"{packets:,} packets"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


@dataclass
class Summary:
    """What one replay did. ``rewritten``/``dropped_by`` count packets per rule name."""

    input: str
    output: str
    linktype: int = 0  # the link type field as found (FCS bits included)
    fcs: int = 0  # bytes of FCS at the end of every frame
    read: int = 0
    modified: int = 0
    dropped: int = 0
    written: int = 0
    csum_completed: int = 0  # rewritten packets whose TCP checksum held only the seed
    segments_cut: int = 0  # segments cut at the MTU (live, the sender resends the tail)
    bytes_not_emitted: int = 0  # rewritten bytes of those tails
    mtu: int = DEFAULT_MTU
    too_long: int = 0  # matched datagrams longer than a verdict carries, left unchanged
    unparsed: Counter[str] = field(default_factory=Counter)
    rewritten: dict[str, int] = field(default_factory=dict)
    dropped_by: dict[str, int] = field(default_factory=dict)
    drop_rules: frozenset[str] = frozenset()
    flows_created: int = 0
    held: int = 0  # segments held for the next one (a pattern may begin at their end)
    hold_joined: int = 0  # ... of which completed by the next segment
    seconds: float = 0.0

    @property
    def not_ours(self) -> int:
        return sum(self.unparsed.values())

    def format(self) -> str:
        """The report ``nfrewrite replay`` prints on stdout: a label, a count, maybe a note."""
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        kind = LINK_TYPES.get(self.linktype & 0xFFFF, "unknown")
        link = f"link type {self.linktype}"
        if self.linktype > 0xFFFF:
            link = f"link type {self.linktype & 0xFFFF} (field {self.linktype:#010x})"
        if self.fcs:
            link += f", {self.fcs}-byte FCS"
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.unparsed.items()))
        rows: list[tuple[str, int, str]] = [
            ("packets read", self.read, ""),
            ("packets modified", self.modified, ""),
            ("packets dropped", self.dropped, ""),
            ("packets not ours", self.not_ours, f"({reasons})" if reasons else ""),
            ("packets written", self.written, ""),
        ]
        if self.csum_completed:
            rows.append(("checksums completed", self.csum_completed, "(TX offload: seed only)"))
        if self.segments_cut:
            rows.append((
                "segments cut at the MTU", self.segments_cut,
                f"({self.bytes_not_emitted:,} bytes not emitted; live the sender resends them; "
                f"--mtu {self.mtu})",
            ))
        if self.too_long:
            rows.append((
                "packets too long to change", self.too_long,
                f"(matched, over {MAX_VERDICT_PACKET:,} bytes: live, a verdict cannot carry "
                "them back changed unless edits shrink them)",
            ))
        rows.append(("flows with a sequence offset", self.flows_created, ""))
        if self.held:
            rows.append(("segments held", self.held,
                         f"(ended in a pattern's beginning; {self.hold_joined:,} groups completed "
                         "by the next segment)"))
        for name, count in self.rewritten.items():
            if name in self.drop_rules:
                rows.append((f"rule {name}", self.dropped_by.get(name, 0), "dropped"))
            else:
                rows.append((f"rule {name}", count, "rewritten"))
        width = max(len(label) for label, _, _ in rows)
        digits = max(len(str(count)) for _, count, _ in rows)
        lines = [f"replay {self.input} -> {self.output} ({kind}, {link})"]
        lines += [
            f"{label:<{width}}  {count:>{digits}}{' ' + note if note else ''}"
            for label, count, note in rows
        ]
        lines.append(f"time {self.seconds:.2f} s ({rate:,.0f} packets/s)")
        return "\n".join(lines)


# -- capture files ------------------------------------------------------------------------------

#: The longest record taken (libpcap's largest snaplen); a longer one is damage.
MAX_CAPLEN = 262144
#: The longest pcapng block taken; a longer one is damage.
MAX_BLOCK = 16 * 1024 * 1024

PCAP_MAGIC = {  # first 4 bytes -> (byte order, nanosecond timestamps)
    b"\xd4\xc3\xb2\xa1": ("<", False),
    b"\xa1\xb2\xc3\xd4": (">", False),
    b"\x4d\x3c\xb2\xa1": ("<", True),
    b"\xa1\xb2\x3c\x4d": (">", True),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
PCAPNG_BOM = 0x1A2B3C4D
BLOCK_IDB, BLOCK_PB, BLOCK_SPB, BLOCK_EPB = 1, 2, 3, 6
OPT_TSRESOL, OPT_FCSLEN, OPT_TSOFFSET = 9, 13, 14  # interface options
OPT_EPB_FLAGS = 2


@dataclass(frozen=True, slots=True)
class Interface:
    """Where records come from: the link type field (a pcap's may carry FCS bits), the FCS bytes
    at the end of every frame, the snaplen (0: none), ticks per second and an offset in seconds."""

    linktype: int
    fcs: int = 0
    snaplen: int = 0
    tsresol: int = 1_000_000
    tsoffset: int = 0

    @property
    def base(self) -> int:
        return self.linktype & 0xFFFF


# A record: frame, seconds, fraction (µs, or ns: see the reader), original length, interface.
Record = tuple[bytes, int, int, int, Interface]


class _Reader:
    """A capture being read: ``records`` yields :data:`Record`; ``interfaces`` grows (pcapng) as
    interfaces are defined; ``offset`` is the byte offset after what was read so far."""

    def __init__(self, nano: bool) -> None:
        self.nano = nano
        self.interfaces: list[Interface] = []
        self.offset = 0
        self.records: Iterator[Record] = iter(())


def _open_capture(f: IO[bytes], name: str, size: int) -> _Reader:
    magic = f.read(4)
    if magic in PCAP_MAGIC:
        order, nano = PCAP_MAGIC[magic]
        rest = f.read(20)
        if len(rest) < 20:
            raise ReplayError(f"{name}: not a readable pcap or pcapng capture (the file ends "
                              f"inside the 24-byte pcap header, at byte {4 + len(rest)})")
        major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack(order + "HHiIII", rest)
        if major != 2:
            raise ReplayError(f"{name}: pcap version {major}.{minor} is not supported (2.4 is)")
        reader = _Reader(nano)
        iface = _pcap_interface(linktype, snaplen, name)
        reader.interfaces.append(iface)
        reader.offset = 24
        reader.records = _pcap_records(f, order, iface, reader)
        return reader
    if magic == PCAPNG_SHB:
        reader = _Reader(True)
        reader.records = _pcapng_records(f, magic, size, reader, name)
        return reader
    what = "an empty file" if not magic else "no pcap or pcapng magic number"
    raise ReplayError(f"{name}: not a readable pcap or pcapng capture ({what})")


def _pcap_interface(field: int, snaplen: int, name: str) -> Interface:
    if field & LT_RESERVED:
        raise ReplayError(f"{name}: link type field {field:#010x} has unknown flag bits set "
                          f"({field & LT_RESERVED:#010x}); only the FCS length is understood")
    fcs = 2 * (field >> 28) if field & LT_FCS_PRESENT else 0
    return Interface(field, fcs, snaplen)


def _pcap_records(f: IO[bytes], order: str, iface: Interface, reader: _Reader) -> Iterator[Record]:
    unpack = struct.Struct(order + "IIII").unpack
    read = f.read
    offset = 24
    number = 0
    while True:
        head = read(16)
        number += 1
        if len(head) < 16:
            if not head:
                return
            raise _Damage("record", number, offset, f"the file ends inside its 16-byte header "
                          f"({len(head)} bytes of it)")
        sec, frac, caplen, wirelen = unpack(head)
        if caplen > MAX_CAPLEN:
            raise _Damage("record", number, offset, f"its header says {caplen:,} bytes captured, "
                          f"more than a record can hold ({MAX_CAPLEN:,}): damaged here")
        data = read(caplen)
        if len(data) < caplen:
            raise _Damage("record", number, offset, f"the file ends inside its data "
                          f"({len(data):,} of {caplen:,} bytes)")
        offset += 16 + caplen
        reader.offset = offset
        yield data, sec, frac, wirelen, iface


def _options(body: bytes, at: int, order: str) -> Iterator[tuple[int, bytes]]:
    """The (code, value) options of a pcapng block body from ``at``; stops at opt_endofopt or
    at anything malformed (options are advisory: a bad one is not damage to the packets)."""
    end = len(body)
    while at + 4 <= end:
        code, length = struct.unpack_from(order + "HH", body, at)
        if code == 0 or at + 4 + length > end:
            return
        yield code, body[at + 4:at + 4 + length]
        at += 4 + ((length + 3) & ~3)


def _idb(body: bytes, order: str) -> Interface:
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body, 0)
    tsresol, fcs, tsoffset = 1_000_000, 0, 0
    for code, value in _options(body, 8, order):
        if code == OPT_TSRESOL and len(value) >= 1:
            exp = value[0] & 0x7F
            tsresol = 2**exp if value[0] & 0x80 else 10**exp
        elif code == OPT_FCSLEN and len(value) >= 1:
            fcs = value[0]
        elif code == OPT_TSOFFSET and len(value) >= 8:
            tsoffset = struct.unpack_from(order + "q", value)[0]
    return Interface(linktype, fcs, snaplen, max(tsresol, 1), tsoffset)


def _pcapng_records(  # noqa: C901 - one block walk: byte order, offset, interfaces carry over
    f: IO[bytes], first: bytes, size: int, reader: _Reader, name: str
) -> Iterator[Record]:
    read = f.read
    offset = 0
    number = 0
    order = "<"
    pending = first  # the first block's type, already read
    interfaces = reader.interfaces
    while True:
        number += 1
        head = pending + read(8 - len(pending))
        pending = b""
        if len(head) < 8:
            if not head:
                return
            raise _Damage("block", number, offset, f"the file ends inside its 8-byte header "
                          f"({len(head)} bytes of it)")
        if head[:4] == PCAPNG_SHB:  # a section begins: its byte order mark says the order
            bom = read(4)
            if len(bom) < 4:
                raise _Damage("block", number, offset, "the file ends inside its section header")
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise _Damage("block", number, offset, "a section header without the byte "
                              "order mark 0x1a2b3c4d")
            head += bom
        btype, length = struct.unpack_from(order + "II", head)
        if length % 4 or length < 12 or length > MAX_BLOCK:
            why = ("is not a multiple of 4" if length % 4 else
                   "is shorter than a block" if length < 12 else
                   f"is more than {MAX_BLOCK:,}")
            raise _Damage("block", number, offset, f"its length {length:,} {why}: damaged here")
        if size and offset + length > size:
            raise _Damage("block", number, offset, f"the file ends inside it ({size - offset:,} "
                          f"of its {length:,} bytes)")
        body = head[8:] + read(length - len(head))
        if len(body) < length - 8:
            raise _Damage("block", number, offset, f"the file ends inside it "
                          f"({8 + len(body):,} of its {length:,} bytes)")
        trailer = struct.unpack_from(order + "I", body, length - 12)[0]
        if trailer != length:
            raise _Damage("block", number, offset, f"its trailing length {trailer:,} differs "
                          f"from its length {length:,}: damaged here")
        body = body[:-4]
        here = offset
        offset += length
        reader.offset = offset
        if btype == 0x0A0D0D0A:
            if len(body) < 16:
                raise _Damage("block", number, here, "a section header too short to hold one")
            major = struct.unpack_from(order + "H", body, 4)[0]
            if major != 1:
                raise _Damage("block", number, here, f"pcapng version {major} is not supported")
            interfaces.clear()  # interface numbers start over in each section
            continue
        if btype == BLOCK_IDB:
            if len(body) < 8:
                raise _Damage("block", number, here, "an interface block too short to hold one")
            interfaces.append(_idb(body, order))
            continue
        if btype == BLOCK_EPB:
            if len(body) < 20:
                raise _Damage("block", number, here, "a packet block too short to hold one")
            ifid, hi, lo, caplen, wirelen = struct.unpack_from(order + "IIIII", body)
            start = 20
        elif btype == BLOCK_SPB:
            if len(body) < 4:
                raise _Damage("block", number, here, "a packet block too short to hold one")
            ifid, hi, lo = 0, -1, 0
            wirelen = struct.unpack_from(order + "I", body)[0]
            caplen = min(wirelen, len(body) - 4)
            if ifid < len(interfaces) and interfaces[0].snaplen:
                caplen = min(caplen, interfaces[0].snaplen)
            start = 4
        elif btype == BLOCK_PB:
            if len(body) < 20:
                raise _Damage("block", number, here, "a packet block too short to hold one")
            ifid, _drops, hi, lo, caplen, wirelen = struct.unpack_from(order + "HHIIII", body)
            start = 20
        else:
            continue  # name resolution, statistics, custom blocks...
        if start + caplen > len(body):
            raise _Damage("block", number, here, f"its captured length {caplen:,} runs past "
                          f"its end ({len(body) - start:,} bytes)")
        if ifid >= len(interfaces):
            raise _Damage("block", number, here, f"a packet of interface {ifid}, which is not "
                          f"defined ({len(interfaces)} are)")
        iface = interfaces[ifid]
        if btype == BLOCK_EPB and len(body) > start + ((caplen + 3) & ~3):
            for code, value in _options(body, start + ((caplen + 3) & ~3), order):
                if code == OPT_EPB_FLAGS and len(value) >= 4:
                    fcs = (struct.unpack_from(order + "I", value)[0] >> 5) & 0xF
                    if fcs and fcs != iface.fcs:
                        raise ReplayError(
                            f"{name}: block {number} at byte offset {here}: a packet whose "
                            f"flags say it ends in a {fcs}-byte FCS, which its interface does "
                            "not say; a pcap holds one FCS length for all its frames"
                        )
        data = body[start:start + caplen]
        if hi < 0:
            sec, frac = 0, 0
        else:
            ticks = (hi << 32) | lo
            res = iface.tsresol
            sec, rest = divmod(ticks, res)
            sec += iface.tsoffset
            frac = rest * 1_000_000_000 // res
        yield data, sec, frac, wirelen, iface


# -- the output ---------------------------------------------------------------------------------


class _Output:
    """A classic pcap being written: to a temporary file next to ``path``, renamed over it by
    :meth:`commit`, removed by :meth:`abort` (a ``path`` that exists and is not a regular file is
    written directly). The header is written by :meth:`start`, once the link type is known."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp: str | None = None
        self.snaplen = 0
        self.longest = 0
        self.started = False
        self._record = struct.Struct("<IIII").pack
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ReplayError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            if st is not None and not stat.S_ISREG(st.st_mode):
                self.f: IO[bytes] = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
                self.seekable = self.f.seekable()
                return
            target = os.path.realpath(path)  # through a symlink, as writing to it would go
            self.target = target
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(target)}.", suffix=".part",
                dir=os.path.dirname(target),
            )
            if st is not None:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            else:
                umask = os.umask(0o022)
                os.umask(umask)
                os.fchmod(fd, 0o666 & ~umask)
            self.f = os.fdopen(fd, "wb", buffering=1 << 20)
            self.seekable = True
        except OSError as exc:
            raise ReplayError(f"cannot write {path}: {exc.strerror or exc}") from None

    def start(self, linktype: int, snaplen: int, nano: bool) -> None:
        self.snaplen = snaplen or MAX_CAPLEN
        if not self.seekable:
            self.snaplen = max(self.snaplen, MAX_CAPLEN)
        magic = 0xA1B23C4D if nano else 0xA1B2C3D4
        self._write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, self.snaplen, linktype))
        self.started = True

    def write(self, frame: bytes, sec: int, frac: int, wirelen: int) -> None:
        n = len(frame)
        if n > self.longest:
            self.longest = n
        self._write(self._record(sec, frac, n, wirelen))
        self._write(frame)

    def _write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as exc:
            raise ReplayError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def commit(self) -> None:
        try:
            if self.longest > self.snaplen and self.seekable:
                self.f.seek(16)
                self.f.write(struct.pack("<I", self.longest))
            self.f.close()
            if self.tmp is not None:
                os.replace(self.tmp, self.target)
                self.tmp = None
        except OSError as exc:
            raise ReplayError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


# -- the loop -----------------------------------------------------------------------------------


def replay(
    ruleset: RuleSet,
    in_path: str,
    out_path: str,
    *,
    flows: FlowsConfig | None = None,
    csum_partial: CsumMode = "auto",
    in_port: str | None = None,
    out_port: str | None = None,
    mtu: int = DEFAULT_MTU,
    progress: IO[str] | None = None,
) -> Summary:
    """Apply ``ruleset`` to every packet of ``in_path``; write the result to ``out_path``.

    ``mtu``: of the link the packets leave by (segments grown past it are cut, as live).
    ``progress``: a stream to draw the progress line on (the CLI passes stderr when it is a
    terminal). Raises :class:`ReplayError` for an unreadable input or an unsupported link type
    (``out_path`` is then not touched), :class:`DamagedInput` when the input is damaged part way
    (``out_path`` then holds what was replayed before the damage).
    """
    try:
        raw_in = open(in_path, "rb", buffering=1 << 20)  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ReplayError(f"cannot read {in_path}: {exc.strerror or exc}") from None
    try:
        if os.path.exists(out_path) and os.path.samefile(in_path, out_path):
            raise ReplayError(f"{out_path} is the input file; write somewhere else")
        st = os.fstat(raw_in.fileno())
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        try:
            reader = _open_capture(raw_in, in_path, size)
        except OSError as exc:
            raise ReplayError(f"cannot read {in_path}: {exc.strerror or exc}") from None
        meter = Progress(size, progress) if progress is not None else None
        out = _Output(out_path)
        try:
            summary, damage = _run(ruleset, reader, in_path, out, flows or FlowsConfig(),
                                   csum_partial, in_port, out_port, mtu, meter)
            out.commit()
        finally:
            out.abort()  # nothing left to do after a commit
            if meter is not None:
                meter.close()
    finally:
        raw_in.close()
    if damage is not None:
        n = summary.written
        raise DamagedInput(
            f"{in_path}: {damage}; {out_path} holds the {n:,} packet{'s' if n != 1 else ''} "
            "replayed before it (the rest of the capture is not there: cut short or damaged)",
            summary,
        )
    return summary


def _check_linktype(iface: Interface, name: str) -> Splitter:
    splitter = SPLITTERS.get(iface.base)
    if splitter is None:
        known = ", ".join(f"{kind} {n}" for n, kind in sorted(LINK_TYPES.items()))
        shown = iface.linktype if iface.linktype <= 0xFFFF else (
            f"{iface.base} (field {iface.linktype:#010x})")
        raise ReplayError(f"{name}: link type {shown} is not supported ({known})")
    if iface.fcs and (iface.base != LINKTYPE_ETHERNET or iface.fcs != ETHERNET_FCS):
        raise ReplayError(
            f"{name}: link type {iface.base} with a {iface.fcs}-byte FCS is not supported "
            f"(of frames with an FCS, only Ethernet with a {ETHERNET_FCS}-byte one is)"
        )
    return splitter


def _output_linktype(iface: Interface) -> int:
    """The pcap header's link type field for ``iface``'s frames (FCS bits included)."""
    if iface.linktype > 0xFFFF or not iface.fcs:
        return iface.linktype
    return iface.linktype | LT_FCS_PRESENT | ((iface.fcs // 2) << 28)  # a pcapng if_fcslen


class _Record(NamedTuple):
    """One captured packet on its way through the engine (the hold token of a held one)."""

    data: bytes  # the frame as captured, without the FCS
    at: int  # where the IP packet begins in it
    ip: bytes  # the IP packet, without a link-layer trailer
    trailer: bytes  # bytes after the IP packet's total length (Ethernet padding)
    tail: bytes  # the captured part of the FCS
    sec: int
    frac: int
    wirelen: int


def _run(  # noqa: C901 - each record's one pass (link layer, engine, output), in order
    ruleset: RuleSet,
    reader: _Reader,
    in_path: str,
    out: _Output,
    flows_cfg: FlowsConfig,
    csum_mode: CsumMode,
    in_port: str | None,
    out_port: str | None,
    mtu: int,
    meter: Progress | None,
) -> tuple[Summary, str | None]:
    """The replay proper. Returns the summary and, when the input is damaged part way, what and
    where (the output then holds what came before)."""
    summary = Summary(in_path, out.path, mtu=mtu)
    summary.drop_rules = frozenset(r.name for r in ruleset.rules if r.verdict == "drop")
    summary.rewritten = {r.name: 0 for r in ruleset.rules}
    summary.dropped_by = {r.name: 0 for r in ruleset.rules}
    table = FlowTable(max_flows=flows_cfg.max, idle_timeout=flows_cfg.idle_timeout,
                      memory=flows_cfg.memory)
    engine = Engine(ruleset, table, mtu=mtu, hold_limits=HoldLimits(deadline=flows_cfg.hold))
    process = engine.process
    partial_all = csum_mode == "yes"
    auto = csum_mode == "auto"
    rewritten, dropped_by, unparsed = summary.rewritten, summary.dropped_by, summary.unparsed
    nano_in = reader.nano
    write = out.write

    current: Interface | None = None  # the interface of the records so far (one per output)
    splitter: Splitter = _raw
    fcs = 0
    if reader.interfaces:  # pcap: known from the file header
        current = reader.interfaces[0]
        splitter = _check_linktype(current, in_path)
        fcs = current.fcs
        out.start(current.linktype, current.snaplen, nano_in)
    def emit(rec: _Record, result: Result, cut: bool) -> None:
        """Write one packet as its verdict says (a drop writes nothing). ``cut``: the call that
        settled it cut some segment at the MTU (which one is told by the bytes not emitted)."""
        if result.unparsed is not None:
            unparsed[result.unparsed] += 1
        if result.verdict == DROP:
            summary.dropped += 1
            for name in result.rules:
                dropped_by[name] += 1
            return
        data, ip, tail = rec.data, rec.ip, rec.tail
        new = result.packet
        if new is None:
            if len(ip) > MAX_VERDICT_PACKET and _matched(ruleset, ip, in_port, out_port):
                summary.too_long += 1
            write(data + tail, rec.sec, rec.frac, rec.wirelen)
            return
        summary.modified += 1
        for name in result.rules:
            rewritten[name] += 1
        if cut and (lost := _not_emitted(table, ip, new)):
            summary.segments_cut += 1
            summary.bytes_not_emitted += lost
        if auto and _seed_only(ip):
            new = _complete_tcp_checksum(new)
            summary.csum_completed += 1
        frame = data[:rec.at] + new + rec.trailer
        if tail:
            whole = len(tail) == fcs
            tail = _ethernet_fcs(frame) if whole and tail == _ethernet_fcs(data) else tail
        write(frame + tail, rec.sec, rec.frac, rec.wirelen + len(frame) - len(data))

    started = time.perf_counter()
    read = 0
    damage: str | None = None
    try:
        for data, sec, frac, wirelen, iface in reader.records:
            read += 1
            if meter is not None and not read & 0xFF:
                meter.update(reader.offset, read)
            if iface is not current:
                if current is not None and (iface.linktype, iface.fcs) != (
                        current.linktype, current.fcs):
                    raise ReplayError(
                        f"{in_path}: interfaces with link types "
                        f"{_describe(current)} and {_describe(iface)}; a pcap output holds one "
                        "(split the capture first, e.g. tshark -r IN -Y "
                        "'frame.interface_id == 0' -w PART)"
                    )
                if current is None:
                    splitter = _check_linktype(iface, in_path)
                    fcs = iface.fcs
                    out.start(_output_linktype(iface), _snaplen(reader), True)
                current = iface
            now = sec + frac * (1e-9 if nano_in else 1e-6)
            # -- link layer
            tail = b""  # the FCS (the part of it that was captured)
            if fcs:
                cut = len(data) - (wirelen - fcs)
                if cut > 0:
                    tail = data[-cut:]
                    data = data[:-cut]
            at = splitter(data)
            if isinstance(at, str):
                unparsed[at] += 1
                write(data + tail, sec, frac, wirelen)
                continue
            ip = data[at:] if at else data
            trailer = b""
            length = ip_length(ip) or 0  # 0: the header is too short to say
            if 0 < length < len(ip):
                trailer = ip[length:]
                ip = ip[:length]
            elif len(data) + len(tail) < wirelen and (length == 0 or length > len(ip)):
                # the capture cut the datagram short (its snaplen): nothing the engine could do
                unparsed[TRUNCATED_IP] += 1
                write(data + tail, sec, frac, wirelen)
                continue
            # -- the engine: a packet may be held (its token is what emit() needs to write it
            # later) and releases held ones, in stream order, before its own verdict, as live
            cuts = table.segments_cut
            due = engine.release_due(now)
            for token, held in due:
                emit(cast(_Record, token), held, table.segments_cut != cuts)
            cuts = table.segments_cut
            record = _Record(data, at, ip, trailer, tail, sec, frac, wirelen)
            result = process(ip, in_port=in_port, out_port=out_port, now=now,
                             csum_partial=partial_all, hold=record)
            cut = table.segments_cut != cuts
            for token, held in result.released:
                emit(cast(_Record, token), held, cut)
            if result.verdict != HOLD:
                emit(record, result, cut)
        cuts = table.segments_cut
        for token, held in engine.release_due(math.inf):  # the capture ended: nothing follows
            emit(cast(_Record, token), held, table.segments_cut != cuts)
    except _Damage as exc:
        damage = str(exc)
    except OSError as exc:
        raise ReplayError(f"cannot read {in_path}: {exc.strerror or exc}") from None
    if not out.started:  # pcapng without packets: its first interface says the link type
        if not reader.interfaces:
            if damage is not None:
                raise ReplayError(f"{in_path}: {damage} (before any interface was defined: "
                                  "nothing to replay)")
            reader.interfaces.append(Interface(LINKTYPE_ETHERNET))
        first = reader.interfaces[0]
        _check_linktype(first, in_path)
        out.start(_output_linktype(first), _snaplen(reader), True)
    summary.read = read
    summary.linktype = _output_linktype(current or reader.interfaces[0])
    summary.fcs = (current or reader.interfaces[0]).fcs
    summary.written = read - summary.dropped
    summary.flows_created = table.flows_created
    summary.held, summary.hold_joined = engine.holds.holds, engine.holds.joined
    summary.seconds = time.perf_counter() - started
    return summary, damage


def _matched(ruleset: RuleSet, ip: bytes, in_port: str | None, out_port: str | None) -> bool:
    """Some rule's match covers this TCP segment (its addresses, ports and bridge ports)."""
    pkt = parse(ip)
    if not isinstance(pkt, TcpPacket):
        return False
    sel = ruleset.select(pkt.version, pkt.src, pkt.dst, pkt.sport, pkt.dport, in_port, out_port)
    return bool(sel.rules)


def _describe(iface: Interface) -> str:
    return f"{iface.base} ({iface.fcs}-byte FCS)" if iface.fcs else str(iface.base)


def _snaplen(reader: _Reader) -> int:
    """The output's snaplen for a pcapng: the largest of its interfaces' (0 if one has none)."""
    lens = [i.snaplen for i in reader.interfaces]
    return 0 if not lens or 0 in lens else max(lens)


def _not_emitted(table: FlowTable, ip: bytes, new: bytes) -> int:
    """Rewritten bytes of a segment that were cut off at the MTU: from the end of what ``new``
    carries to where the whole rewritten segment would have ended, in its flow's numbering."""
    pkt, out = parse(ip), parse(new)
    if not isinstance(pkt, TcpPacket) or not isinstance(out, TcpPacket):
        return 0
    key, direction = flow_key(pkt.src, pkt.sport, pkt.dst, pkt.dport)
    flow = table.get(key)
    if flow is None:
        return 0
    way = flow.ways[direction]
    end = (pkt.seq + pkt.payload_len) % 2**32  # a cut segment is never a SYN
    end = way.hi - ((way.hi - end) % 2**32)  # unwrapped: the flow has seen up to way.hi
    whole = way.to_new(end) % 2**32
    return (whole - out.seq - out.payload_len) % 2**32


# -- checksums of TX-offload captures -----------------------------------------------------------


def _seed_only(ip: bytes) -> bool:
    """The TCP checksum field holds the pseudo-header seed and does not verify (TX offload)."""
    pkt = parse(ip)
    if not isinstance(pkt, TcpPacket):
        return False
    return pkt.holds_seed() and not pkt.tcp_checksum_ok()


def _complete_tcp_checksum(ip: bytes) -> bytes:
    """``ip`` with a complete TCP checksum: taken as partial, the packet core writes one."""
    pkt = parse(ip, csum_partial=True)
    if not isinstance(pkt, TcpPacket):  # the engine emits well-formed segments only
        raise AssertionError(f"engine output does not parse: {pkt!r}")
    return pkt.finish()


def stderr_progress() -> IO[str] | None:
    """stderr when it is a terminal (progress is for people), else None."""
    return sys.stderr if sys.stderr.isatty() else None
