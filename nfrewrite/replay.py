"""``nfrewrite replay``: the live engine, offline, over a capture file.

What it is for
==============
Seeing what a rule set would do to real traffic before it touches the wire: read a pcap or pcapng
capture, run every packet through the same :class:`~nfrewrite.engine.Engine` the daemon uses,
write the result as a pcap, and print how often each rule fired. It must not load the capture
into memory (captures are often larger than RAM), parse packets with scapy on the hot path (slow,
and an independent parser could disagree with the engine's), or repair what it does not rewrite.

Usage::

    nfrewrite replay -c CONFIG [--csum-partial auto|yes|no] [--in-port PORT] [--out-port PORT]
                     IN.pcap OUT.pcap

``--in-port``/``--out-port`` name the bridge ports every packet is taken to cross (a capture does
not say; rules with ``match.in_port``/``out_port`` apply only when given). Exit status: 0 done;
1 invalid config or rules (the diagnostics ``nfrewrite check`` prints); 2 usage; 4 unreadable or
unsupported input, unwritable output (one line on stderr; no output file is left behind).

Theory of operation
===================
Streaming. scapy's ``RawPcapReader`` (which hands over to its pcapng reader by itself) yields one
record at a time as raw bytes plus metadata; each rewritten record goes straight to a
``RawPcapWriter``. Memory is bounded by the engine's state (the flow table and the rule set's
caches, both capped), never by the file.

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

Link layer. The engine wants an IP packet. Each link type has a small function that finds where
IP starts in a frame (no scapy): Ethernet (1; 802.1Q / 802.1ad VLAN tags, stacked too, are
skipped), raw IP (101, and 228/229 for IPv4/IPv6 only), Linux cooked captures SLL (113) and SLL2
(276). A frame that carries something else (ARP, a truncated header) is "not ours": written
unchanged and counted by reason, as the engine counts its own reasons (``not_tcp``,
``fragment``, ...). Bytes after the IP datagram (Ethernet padding, a trailer) are cut off before
the engine and put back after it. The output keeps each frame's link header, its timestamp and
the input's link type; only the IP packet is replaced, and the record's original length grows or
shrinks with it. Dropped packets are left out. The output is always classic pcap (nanosecond
timestamps when the input had them, or came from pcapng); a pcapng input whose interfaces use
different link types cannot be written as one pcap and is refused at the first packet that
differs.

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
(any byte changed, sequence numbers included), dropped, not ours by reason, written, flows that
got a sequence offset, and one line per rule: the packets it rewrote (or, for a ``drop`` rule,
dropped), counted as the daemon's per-rule metric counts them (a retransmission that gets an edit
recorded earlier again does not count a second time)::

    replay in.pcap -> out.pcap (Ethernet, link type 1)
    packets read                  200000
    packets modified                2000
    packets dropped                    0
    packets not ours                  12 (not_ip 12)
    packets written               200000
    flows with a sequence offset     100
    rule grow                        100 rewritten
    time 1.63 s (122,393 packets/s)
 While running, and only when stderr is a terminal, a one-line progress indicator
(bytes read of the file's size) is redrawn on stderr at most ten times a second.

Failures raise :class:`ReplayError` with a one-line reason (unreadable or unknown input, a link
type we cannot take apart); the CLI turns that into exit status 4.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal, cast

from nfrewrite.config import FlowsConfig
from nfrewrite.engine import DROP, Engine
from nfrewrite.packet import TcpPacket, parse
from nfrewrite.rules import RuleSet
from nfrewrite.seqadj import FlowTable

__all__ = [
    "LINK_TYPES",
    "CsumMode",
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
    etype = (frame[at] << 8) | frame[at + 1]
    while etype in VLAN_TAGS:
        if n < payload + 4:
            return TRUNCATED_LINK
        etype = (frame[payload + 2] << 8) | frame[payload + 3]
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


def _ip_length(ip: bytes) -> int:
    """The IP datagram's own length from its header (0 when the header is too short to say)."""
    if len(ip) < 6:
        return 0
    version = ip[0] >> 4
    if version == 4:
        return (ip[2] << 8) | ip[3]
    if version == 6:
        return 40 + ((ip[4] << 8) | ip[5])
    return 0


# -- errors, progress, summary ------------------------------------------------------------------


class ReplayError(Exception):
    """A failure the user can act on; ``str()`` is one line."""


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
    linktype: int = 0
    read: int = 0
    modified: int = 0
    dropped: int = 0
    written: int = 0
    csum_completed: int = 0  # rewritten packets whose TCP checksum held only the seed
    unparsed: Counter[str] = field(default_factory=Counter)
    rewritten: dict[str, int] = field(default_factory=dict)
    dropped_by: dict[str, int] = field(default_factory=dict)
    drop_rules: frozenset[str] = frozenset()
    flows_created: int = 0
    seconds: float = 0.0

    @property
    def not_ours(self) -> int:
        return sum(self.unparsed.values())

    def format(self) -> str:
        """The report ``nfrewrite replay`` prints on stdout: a label, a count, maybe a note."""
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        kind = LINK_TYPES.get(self.linktype, "unknown")
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
        rows.append(("flows with a sequence offset", self.flows_created, ""))
        for name, count in self.rewritten.items():
            if name in self.drop_rules:
                rows.append((f"rule {name}", self.dropped_by.get(name, 0), "dropped"))
            else:
                rows.append((f"rule {name}", count, "rewritten"))
        width = max(len(label) for label, _, _ in rows)
        digits = max(len(str(count)) for _, count, _ in rows)
        lines = [f"replay {self.input} -> {self.output} ({kind}, link type {self.linktype})"]
        lines += [
            f"{label:<{width}}  {count:>{digits}}{' ' + note if note else ''}"
            for label, count, note in rows
        ]
        lines.append(f"time {self.seconds:.2f} s ({rate:,.0f} packets/s)")
        return "\n".join(lines)


# -- the loop -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_scapy() -> Iterator[None]:
    """scapy logs a warning per truncated record; the summary counts what matters."""
    log = logging.getLogger("scapy")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def replay(
    ruleset: RuleSet,
    in_path: str,
    out_path: str,
    *,
    flows: FlowsConfig | None = None,
    csum_partial: CsumMode = "auto",
    in_port: str | None = None,
    out_port: str | None = None,
    progress: IO[str] | None = None,
) -> Summary:
    """Apply ``ruleset`` to every packet of ``in_path``; write the result to ``out_path``.

    ``progress``: a stream to draw the progress line on (the CLI passes stderr when it is a
    terminal). Raises :class:`ReplayError` for an unreadable input or an unsupported link type;
    the partial output file is then removed.
    """
    with _quiet_scapy():
        from scapy.error import Scapy_Exception
        from scapy.utils import RawPcapNgReader, RawPcapReader, RawPcapWriter

        try:
            raw_in = open(in_path, "rb", buffering=1 << 20)  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise ReplayError(f"cannot read {in_path}: {exc.strerror or exc}") from None
        try:
            if os.path.exists(out_path) and os.path.samefile(in_path, out_path):
                raise ReplayError(f"{out_path} is the input file; write somewhere else")
            try:
                reader: Any = RawPcapReader(cast(Any, raw_in))  # reads from a file object too
            except (Scapy_Exception, EOFError, OSError) as exc:
                raise ReplayError(
                    f"{in_path}: not a readable pcap or pcapng capture ({exc})"
                ) from None
            size = os.fstat(raw_in.fileno()).st_size
            meter = Progress(size, progress) if progress is not None else None
            try:
                return _run(
                    ruleset, reader, raw_in, in_path, out_path, RawPcapWriter, RawPcapNgReader,
                    flows or FlowsConfig(), csum_partial, in_port, out_port, meter,
                )
            finally:
                if meter is not None:
                    meter.close()
        finally:
            raw_in.close()


def _check_linktype(linktype: int, in_path: str) -> Splitter:
    splitter = SPLITTERS.get(linktype)
    if splitter is None:
        known = ", ".join(f"{name} {n}" for n, name in sorted(LINK_TYPES.items()))
        raise ReplayError(f"{in_path}: link type {linktype} is not supported ({known})")
    return splitter


def _run(
    ruleset: RuleSet,
    reader: Any,
    raw_in: IO[bytes],
    in_path: str,
    out_path: str,
    writer_class: Any,
    pcapng_class: Any,
    flows_cfg: FlowsConfig,
    csum_mode: CsumMode,
    in_port: str | None,
    out_port: str | None,
    meter: Progress | None,
) -> Summary:
    summary = Summary(in_path, out_path)
    summary.drop_rules = frozenset(r.name for r in ruleset.rules if r.verdict == "drop")
    summary.rewritten = {r.name: 0 for r in ruleset.rules}
    summary.dropped_by = {r.name: 0 for r in ruleset.rules}
    table = FlowTable(max_flows=flows_cfg.max, idle_timeout=flows_cfg.idle_timeout)
    engine = Engine(ruleset, table)
    process = engine.process
    partial_all = csum_mode == "yes"
    auto = csum_mode == "auto"
    rewritten, dropped_by, unparsed = summary.rewritten, summary.dropped_by, summary.unparsed

    pcapng = isinstance(reader, pcapng_class)
    header_linktype = None if pcapng else int(reader.linktype)
    splitter: Splitter | None = None
    linktype = -1
    if header_linktype is not None:
        splitter = _check_linktype(header_linktype, in_path)
        linktype = header_linktype
    nano_in = bool(getattr(reader, "nano", False))
    nano_out = nano_in or pcapng

    writer: Any = None
    started = time.perf_counter()
    ok = False
    try:
        if splitter is not None:
            writer = _open_writer(writer_class, out_path, linktype, nano_out)
        read = 0
        for data, meta in reader:
            read += 1
            if meter is not None and not read & 0xFF:
                meter.update(raw_in.tell(), read)
            # -- time
            if pcapng:
                if meta.linktype != linktype:
                    if splitter is not None:
                        raise ReplayError(
                            f"{in_path}: interfaces with link types {linktype} and "
                            f"{meta.linktype}; a pcap output holds one (split the capture "
                            "first, e.g. tshark -r IN -Y 'frame.interface_id == 0' -w PART)"
                        )
                    splitter = _check_linktype(meta.linktype, in_path)
                    linktype = meta.linktype
                    writer = _open_writer(writer_class, out_path, linktype, nano_out)
                if meta.tshigh is None:
                    sec, frac, now = 0, 0, 0.0
                else:
                    ticks = (meta.tshigh << 32) | meta.tslow
                    res = meta.tsresol
                    sec, rest = divmod(ticks, res)
                    frac = rest * 1_000_000_000 // res
                    now = ticks / res
            else:
                sec, frac = meta.sec, meta.usec
                now = sec + frac * (1e-9 if nano_in else 1e-6)
            wirelen = meta.wirelen
            assert splitter is not None
            # -- link layer
            at = splitter(data)
            if isinstance(at, str):
                unparsed[at] += 1
                writer.write_packet(data, sec=sec, usec=frac, wirelen=wirelen)
                continue
            start = at
            ip = data[start:] if start else data
            trailer = b""
            length = _ip_length(ip)
            if 0 < length < len(ip):
                trailer = ip[length:]
                ip = ip[:length]
            # -- the engine
            result = process(
                ip, in_port=in_port, out_port=out_port, now=now, csum_partial=partial_all
            )
            if result.unparsed is not None:
                unparsed[result.unparsed] += 1
            if result.verdict == DROP:
                summary.dropped += 1
                for name in result.rules:
                    dropped_by[name] += 1
                continue
            new = result.packet
            if new is None:
                writer.write_packet(data, sec=sec, usec=frac, wirelen=wirelen)
                continue
            summary.modified += 1
            for name in result.rules:
                rewritten[name] += 1
            if auto and _seed_only(ip):
                new = _complete_tcp_checksum(new)
                summary.csum_completed += 1
            frame = data[:start] + new + trailer
            writer.write_packet(
                frame, sec=sec, usec=frac, wirelen=wirelen + len(frame) - len(data)
            )
        if writer is None:  # pcapng without packets: nothing says which link type
            linktype = _first_interface_linktype(reader)
            _check_linktype(linktype, in_path)
            writer = _open_writer(writer_class, out_path, linktype, nano_out)
        writer.close()
        writer = None
        summary.read = read
        summary.linktype = linktype
        summary.written = read - summary.dropped
        summary.flows_created = table.flows_created
        summary.seconds = time.perf_counter() - started
        ok = True
        return summary
    finally:
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
        if not ok:
            with contextlib.suppress(OSError):
                if os.path.isfile(out_path):
                    os.unlink(out_path)


def _open_writer(writer_class: Any, out_path: str, linktype: int, nano: bool) -> Any:
    try:
        writer = writer_class(out_path, linktype=linktype, nano=nano, snaplen=262144)
        writer.write_header(None)
    except OSError as exc:
        raise ReplayError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return writer


def _first_interface_linktype(reader: Any) -> int:
    interfaces = getattr(reader, "interfaces", None)
    if interfaces:
        return int(interfaces[0][0])
    return LINKTYPE_ETHERNET


# -- checksums of TX-offload captures -----------------------------------------------------------


def _seed_only(ip: bytes) -> bool:
    """The TCP checksum field holds the pseudo-header seed and does not verify (TX offload)."""
    pkt = parse(ip)
    if not isinstance(pkt, TcpPacket):
        return False
    return pkt.tcp_checksum == pkt.pseudo_header_seed() and not pkt.tcp_checksum_ok()


_u16 = struct.Struct("!H")


def _complete_tcp_checksum(ip: bytes) -> bytes:
    pkt = parse(ip)
    if not isinstance(pkt, TcpPacket):  # the engine emits well-formed segments only
        raise AssertionError(f"engine output does not parse: {pkt!r}")
    _u16.pack_into(pkt.buf, pkt.l4 + 16, pkt.compute_tcp_checksum())
    return bytes(pkt.buf)


def stderr_progress() -> IO[str] | None:
    """stderr when it is a terminal (progress is for people), else None."""
    return sys.stderr if sys.stderr.isatty() else None
