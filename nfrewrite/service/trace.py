"""The worker's side of ``nfrewrite trace``: one record per packet a rule changed or dropped.

Theory of operation
-------------------
While nobody traces, a worker's per-packet cost is one attribute test (``tracer.active``, False)
in its packet handler; nothing else of this module runs per packet.

The supervisor turns tracing on and off through the worker's pipe (a ``("trace", spec)``
message, read between packets like a new rule set): ``spec`` is None (off) or ``{"version": n,
"rules": [names] or None}`` (None: every rule). The worker answers on its *trace socket*, one
end of a ``SOCK_SEQPACKET`` socket pair whose other end the supervisor's control server reads
(:mod:`nfrewrite.service.control`). Every message there is one JSON object:

* ``{"v": n}``: spec ``n`` is in force (tracing on or off); the drop count restarts at 0. A
  confirmation that does not fit in the socket is sent again (from the idle hook and before the
  next record) until it does: the client waits for it;
* ``{"p": record, "d": dropped}``: a packet (see :meth:`WorkerTracer.packet`) and how many records
  this worker has dropped since spec ``n``;
* ``{"d": dropped}``: the drop count alone, sent from the idle hook when it grew since it was
  last told;
* ``{"e": text}``: building or sending a record failed; tracing is off in this worker until the
  next spec (see :meth:`WorkerTracer.packet`).

Bounded, never blocking the packet path: a record is sent with ``MSG_DONTWAIT``; when the socket
buffer is full, or the worker already sent :data:`MAX_RECORDS_PER_SECOND` records in the current
second, the record is dropped and counted (the rate check comes before any parsing, so a flood
of traced packets costs a comparison each beyond the limit). The addresses, ports and the flow's
sequence offset are read only for a record that is sent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from nfrewrite.core.constants import DROP
from nfrewrite.core.packet import TcpPacket, parse

if TYPE_CHECKING:
    from nfrewrite.core.engine import Result
    from nfrewrite.core.seqadj import FlowTable
    from nfrewrite.kernel.queue import PacketMeta

#: Records one worker sends per second at most; more are dropped and counted. A record costs the
#: worker some 10-25 us (``bench/bench_trace.py``), so tracing takes at most a few percent of it.
MAX_RECORDS_PER_SECOND = 1000


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor's end, worker's end) of a trace channel. The worker's end never blocks; each
    message is one record (SEQPACKET keeps boundaries and is bounded by the socket buffer)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    ours.setblocking(False)
    return ours, theirs


def endpoints(payload: bytes) -> tuple[bytes, int, bytes, int] | None:
    """(source address, port, destination address, port) of a TCP packet the engine took; read
    in place for IPv4 and plain IPv6 (no 64 KB copy), through the parser for extension headers."""
    if len(payload) >= 40:
        version = payload[0] >> 4
        if version == 4 and payload[9] == 6:
            l4 = (payload[0] & 0x0F) * 4
            if len(payload) >= l4 + 4:
                return (payload[12:16], int.from_bytes(payload[l4:l4 + 2], "big"),
                        payload[16:20], int.from_bytes(payload[l4 + 2:l4 + 4], "big"))
        elif version == 6 and payload[6] == 6 and len(payload) >= 44:
            return (payload[8:24], int.from_bytes(payload[40:42], "big"),
                    payload[24:40], int.from_bytes(payload[42:44], "big"))
    pkt = parse(payload, csum_partial=True)
    if isinstance(pkt, TcpPacket):
        return pkt.src, pkt.sport, pkt.dst, pkt.dport
    return None


class WorkerTracer:
    """Builds and sends one worker's trace records; ``active`` is the per-packet flag."""

    __slots__ = ("_clock", "_confirm", "_last_told", "_limit", "_log", "_rules", "_sock",
                 "_version", "_window", "_window_sent", "active", "dropped", "failures", "flows",
                 "queue_num")

    def __init__(
        self,
        queue_num: int,
        sock: socket.socket | None,
        flows: FlowTable | None = None,
        *,
        limit: int = MAX_RECORDS_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.queue_num = queue_num
        self.flows = flows
        self.active = False
        self.dropped = 0
        self.failures = 0  # packets whose record failed (each turned tracing off)
        self._log = log
        self._sock = sock
        self._rules: frozenset[str] | None = None
        self._version = 0
        self._limit = limit
        self._clock = clock
        self._window = 0
        self._window_sent = 0
        self._last_told = 0
        self._confirm: dict[str, Any] | None = None  # a confirmation not sent yet

    def configure(self, spec: Mapping[str, Any] | None) -> None:
        """Apply the supervisor's spec (None: off) and confirm it on the trace socket."""
        if spec is None:
            self.active = False
            self._rules = None
        else:
            rules = spec.get("rules")
            self._rules = frozenset(rules) if rules is not None else None
            self._version = int(spec.get("version", 0))
            self.active = self._sock is not None
        self.dropped = 0
        self._last_told = 0
        self._confirm = {"v": self._version, "on": self.active}
        self._confirmed()

    def _confirmed(self) -> bool:
        """Send the confirmation if one waits (a full socket loses it, so it is sent again
        from the idle hook and before the next record); True when none waits."""
        if self._confirm is not None and self._send(self._confirm):
            self._confirm = None
        return self._confirm is None

    def packet(self, payload: bytes | memoryview, meta: PacketMeta, result: Result) -> None:
        """A packet the engine handled while tracing: a record if a wanted rule acted on it.

        Never raises into the packet handler: a failure (a bug here, or a packet it does not
        expect) turns tracing off until the next trace starts, is counted in ``failures``,
        logged the first time, and told to the supervisor (``{"e": text}``), which tells the
        clients; the packet's verdict is the engine's, whatever happens here."""
        try:
            self._packet(payload, meta, result)
        except Exception as e:  # noqa: BLE001 - the packet goes on; tracing stops
            self.active = False
            self.failures += 1
            what = f"queue {self.queue_num}: tracing failed ({type(e).__name__}: {str(e)[:200]})"
            if self.failures == 1 and self._log is not None:
                self._log(f"{what}; tracing turned off")
            with contextlib.suppress(Exception):
                self._send({"e": f"{what}; no more lines from this queue"})

    def _packet(self, payload: bytes | memoryview, meta: PacketMeta, result: Result) -> None:
        names = result.rules
        if not names:
            return
        wanted = self._rules
        if wanted is not None and wanted.isdisjoint(names):
            return
        now = self._clock()
        second = int(now)
        if second != self._window:
            self._window, self._window_sent = second, 0
        if self._window_sent >= self._limit:
            self.dropped += 1
            return
        self._window_sent += 1
        if not self._confirmed():  # records follow the confirmation, never overtake it
            self.dropped += 1
            return
        record = self.record(payload, meta, result)
        if not self._send({"p": record, "d": self.dropped}):
            self.dropped += 1
        else:
            self._last_told = self.dropped

    def record(self, payload: bytes | memoryview, meta: PacketMeta,
               result: Result) -> dict[str, Any]:
        """The trace record of one packet (JSON-ready)."""
        dropped = result.verdict == DROP
        after = None if dropped else len(result.packet) if result.packet is not None else len(
            payload)
        rec: dict[str, Any] = {
            "time": time.time(), "queue": meta.queue_num, "rules": list(result.rules),
            "verdict": "drop" if dropped else "accept", "len_before": len(payload),
            "len_after": after, "in_port": meta.in_port, "out_port": meta.out_port,
        }
        ends = endpoints(bytes(payload[:64]))  # the headers endpoints() reads, as bytes
        if ends is not None:
            src, sport, dst, dport = ends
            rec.update(src=str(ipaddress.ip_address(src)), sport=sport,
                       dst=str(ipaddress.ip_address(dst)), dport=dport,
                       offset=self._offset(src, sport, dst, dport))
        return rec

    def _offset(self, src: bytes, sport: int, dst: bytes, dport: int) -> dict[str, int] | None:
        """The sequence offsets in force for this packet's connection: ``seq`` is added to the
        sequence numbers of its direction, ``ack`` subtracted from its acknowledgements; None when
        the connection has none (no length-changing edit yet)."""
        flows = self.flows
        if flows is None or not len(flows):
            return None
        from nfrewrite.core.seqadj import flow_key

        key, direction = flow_key(src, sport, dst, dport)
        flow = flows.get(key)
        if flow is None:
            return None
        try:  # the flow's two directions, as the sequence adjuster keeps them
            ways = flow.ways
            return {"seq": int(ways[direction].top_offset()),
                    "ack": int(ways[1 - direction].top_offset())}
        except (AttributeError, IndexError, TypeError):
            return None

    def idle(self) -> None:
        """From the worker's idle hook: the confirmation if it could not be sent, and the drop
        count if it grew since last told."""
        if not self._confirmed():
            return
        if self.active and self.dropped != self._last_told and self._send({"d": self.dropped}):
            self._last_told = self.dropped

    def close(self) -> None:
        self.active = False
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _send(self, message: Mapping[str, Any]) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send(json.dumps(message, separators=(",", ":")).encode(), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # the supervisor's end is gone: nobody to tell
            self.active = False
            return False
        return True
