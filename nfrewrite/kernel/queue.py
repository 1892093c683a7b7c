"""The NetfilterQueue loop: bind a queue, hand each packet to the engine, give the verdict.

Theory of operation
-------------------
This is the thin shell around the engine. ``QueueWorker`` binds NFQUEUE ``queue_num`` with
NetfilterQueue (libnetfilter_queue), copy mode "packet", and then:

* raises the netlink socket's receive buffer with ``SO_RCVBUFFORCE`` (root may exceed rmem_max;
  falls back to ``SO_RCVBUF``) so bursts wait in the socket instead of being lost;
* sets ``NFQA_CFG_F_FAIL_OPEN`` on the queue (or clears it with ``fail_open=False``): when the
  queue is full (``maxlen`` packets waiting for a verdict) or our socket buffer is full, the kernel
  then *accepts* the packet instead of dropping it. NetfilterQueue has no call for this, so
  ``nfrewrite.kernel.nfnl`` builds an ``NFQNL_MSG_CONFIG`` message and it is sent on
  NetfilterQueue's own socket (a dup of its fd): the kernel takes config for a bound queue only
  from the netlink port that bound it (EPERM otherwise). The ACK is read here before the loop
  starts; a packet that arrives meanwhile is kept and handed to libnetfilter_queue first thing in
  ``run()``.
  ``--queue-bypass`` in the rule is the other half: it passes packets
  while no process is bound at all (stopped, crashed, ``kill -9``).
* with ``gso=True`` (the daemon's default, ``[queue] gso``) sets ``NFQA_CFG_F_GSO`` and a copy
  range of 65,535 bytes (NetfilterQueue caps it at 4016; ``NFQA_CFG_PARAMS`` is sent the same
  way): a bulk flow's GSO super-packets (up to 64 KB, ~45 wire segments) then come to us whole,
  one queue round trip and one Python call each instead of ~45, and the kernel no longer completes
  ``CHECKSUM_PARTIAL`` checksums before copying. Such packets carry only the pseudo-header seed
  in the TCP checksum field. The kernel says so per packet in ``NFQA_SKB_INFO``
  (``NFQA_SKB_CSUMNOTREADY``), and also which packets are GSO skbs (``NFQA_SKB_GSO``).
  NetfilterQueue does not hand that attribute over, so ``_BudgetSocket`` reads it from each
  datagram (:func:`~.nfnl.packet_skb_info`) before NetfilterQueue parses the same bytes
  and calls back with the packet; ``PacketMeta.csum_partial`` and ``.gso`` are then exact. (Not
  told, ``csum_partial`` is ``None`` and :func:`nfrewrite.core.packet.parse` compares the field with
  the seed.) A changed packet goes back as CHECKSUM_NONE: a wire-size one gets a complete
  checksum from the engine; a GSO one is segmented by the kernel, which sets each segment's
  checksum up itself, so the engine leaves the seed (shown on the kernel in
  ``tests/test_queue.py``). Without ``gso`` the kernel segments and completes checksums before
  copying (``csum_partial`` False: every packet is wire-sized with a complete checksum), which
  costs a queue round trip per wire segment.

Each packet: ``handler(payload, meta) -> (verdict, new_payload | None)``; ``payload`` is bytes or,
with the GSO flag, a memoryview of the very datagram the kernel sent (the packet is found there by
the same walk that reads its skb info, so it is not copied once more before the engine copies it
into the packet it parses). ``ACCEPT``/``DROP`` are
the verdicts; ``ACCEPT | TRACK_FLOW`` also sets the ``FLOW_MARK`` bit in the packet mark, which the
firewall's POSTROUTING rule copies into the conntrack mark so that the whole flow keeps coming to
the queue (needed once a length-changing edit gave it a sequence offset). A handler exception never
stops the loop: that packet is accepted unmodified, the exception type is logged once (one line on
stderr) and counted in ``stats.errors_by_kind``. A payload cut short by the copy range
(NetfilterQueue's own is 4016 bytes, ours 65,535) is never modified, since a verdict with a
payload replaces the whole packet. A payload handed back may be at most 65,531 bytes
(:data:`~nfrewrite.core.constants.MAX_VERDICT_PACKET`: it rides in a netlink attribute whose 16-bit
length counts its own header); the kernel would take a longer one's verdict without the payload
and send the original packet, so such a packet is dropped instead (``VerdictTooLong``).

The loop polls the socket and a wake-up pipe with a timeout, so ``on_idle`` runs at least every
``idle_interval`` seconds without traffic (the daemon's worker sends its heartbeat from it; the
supervisor sends ``WATCHDOG=1`` only while every heartbeat is fresh) and ``stop()``
(safe from a signal handler: it sets a flag and writes one byte) ends ``run()`` within
milliseconds. Datagrams are pulled with ``MSG_DONTWAIT`` through ``NetfilterQueue.run_socket`` in
batches of ``batch`` so that a flood cannot starve the idle hook.

Batch verdicts. An unchanged packet that is simply accepted (no new payload, no mark to set)
gets no verdict of its own: its id is noted, and at the end of the batch of datagrams drained
(and before any other verdict) one ``NFQNL_MSG_VERDICT_BATCH`` message accepts every packet up to
the highest id noted (:func:`~.nfnl.verdict_batch_message`). One system call then passes a whole
run of packets instead of one each. A packet with a new payload, a mark, a DROP, or any verdict
given out of the loop's order (an error, a release) first sends the pending batch, so verdicts
leave in the order the packets came. A batch accepts *every* waiting packet up to its id, so it
must never cover a held packet (below): the pending batch goes out before a packet is held, and
while any packet is held each verdict is given on its own. ``batch_verdicts=False`` gives every
packet its own verdict. ``on_batch`` (optional) is called after each drained batch, once its
verdicts are out (the daemon moves its metrics tallies then). A batch of one packet is given as
that packet's own verdict, through the library (nothing to gain from a message of our own).

Delayed verdicts. A handler may answer ``HOLD`` (the engine holds a segment that ends in the
beginning of a pattern, :mod:`nfrewrite.core.stream`): the packet then stays queued in the kernel,
kept here by its id (``packet_id`` is the id of the packet the handler is called for), until
``release(packet_id, verdict, new)`` gives its verdict, checked as any other. ``timer(now)``
(optional) is called after every batch and whenever the time it last asked for comes; it
returns the next such time (None: nothing pending), which shortens the loop's poll. Before the
queue is unbound, ``timer(math.inf)`` releases everything, and whatever is still held is
accepted as it is.

What it must not do: block forever, let one bad packet stop the queue, leave a packet without a
verdict, or touch rules (``nfrewrite.kernel.firewall`` owns them).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from netfilterqueue import NetfilterQueue

from nfrewrite.core.constants import ACCEPT, DROP, FLOW_MARK, HOLD, MAX_VERDICT_PACKET
from nfrewrite.core.fields import ip_length
from nfrewrite.kernel import nfnl

#: OR into ACCEPT: mark this packet's flow so every later packet of it comes to the queue.
TRACK_FLOW = 0x100
VERDICT_MASK = 0xFF

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: NetfilterQueue's largest copy range (its BufferSize 4096 minus 80 bytes of metadata).
MAX_COPY = 4016
#: One netlink datagram: a whole 65,535-byte packet plus the message's headers and attributes.
_RECV_SIZE = 65536 + 4096
_NLMSG_ERROR_TYPE = nfnl.NLMSG_ERROR.to_bytes(2, sys.byteorder)


@dataclass(frozen=True, slots=True)
class PacketMeta:
    """What the kernel told us about a queued packet besides its bytes."""

    in_port: str | None  # bridge port it came in on (physindev); None when not bridged
    #: bridge port it will leave by (physoutdev); "lo" for a packet the machine sends over its
    #: loopback (host mode: rules name it so); None when not bridged/known
    out_port: str | None
    indev: str | None
    outdev: str | None
    mark: int
    #: False: the TCP checksum field is complete; True: it holds only the pseudo-header seed
    #: (the kernel's NFQA_SKB_CSUMNOTREADY); None: not told, decide per packet
    csum_partial: bool | None = False
    queue_num: int = 0
    #: True: a GSO skb, which the kernel segments itself on the way out (NFQA_SKB_GSO), also
    #: initialising every segment's TCP checksum; False: not one; None: not told
    gso: bool | None = None


#: a packet's bytes as handed to the handler: a view into the datagram when the walk found them
Payload = bytes | memoryview
Handler = Callable[[Payload, PacketMeta], tuple[int, bytes | None]]
_MetaKey = tuple[int, int, int, int, int, int | None]


class _Packet(Protocol):
    id: int
    indev: int
    outdev: int
    physindev: int
    physoutdev: int

    def get_payload(self) -> bytes: ...
    def get_payload_len(self) -> int: ...
    def get_mark(self) -> int: ...
    def set_payload(self, payload: bytes) -> None: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


@dataclass(slots=True)
class QueueStats:
    packets: int = 0
    accepted: int = 0
    dropped: int = 0
    modified: int = 0
    tracked: int = 0
    truncated: int = 0
    enobufs: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "packets": self.packets, "accepted": self.accepted, "dropped": self.dropped,
            "modified": self.modified, "tracked": self.tracked, "truncated": self.truncated,
            "enobufs": self.enobufs, "errors_by_kind": dict(self.errors_by_kind),
        }


class QueueError(RuntimeError):
    """Binding or configuring the queue failed; the message says what to check."""


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        return bool(poller.poll(int(timeout * 1000)))
    except InterruptedError:
        return False


class _BudgetSocket:
    """What ``NetfilterQueue.run_socket`` reads from: our fd, non-blocking, ``budget`` datagrams.

    Raising ``BlockingIOError(EAGAIN)`` makes run_socket return; ENOBUFS (the kernel telling us
    it had to drop or fail-open a packet for lack of socket space) is counted and skipped by it.
    """

    def __init__(self, sock: socket.socket, stats: QueueStats, *, skb_info: bool) -> None:
        self.sock = sock
        self.stats = stats
        self.pending: list[bytes] = []
        self.budget = 0
        #: packet id -> (NFQA_SKB_* flags, payload start, payload end, the datagram), read from
        #: each datagram before NetfilterQueue parses it (and calls back with that packet): the
        #: queue loop takes them out by id. Only with the GSO flag: without it the kernel segments
        #: and completes checksums first (no flag set), and a wire-sized payload costs less to
        #: copy than the walk.
        self.skb_info: dict[int, tuple[int, int, int, bytes]] = {}
        self._read_skb_info = skb_info
        #: errors (negative errno) the kernel answered a message with: a verdict for a packet no
        #: longer queued (ENOENT), say; the loop logs and counts them after each batch
        self.refused: list[int] = []

    def recv(self, bufsize: int) -> bytes:
        if self.pending:
            datagram = self.pending.pop(0)
        else:
            if self.budget <= 0:
                raise BlockingIOError(errno.EAGAIN, "batch done")
            self.budget -= 1
            try:
                datagram = self.sock.recv(max(bufsize, _RECV_SIZE), socket.MSG_DONTWAIT)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.stats.enobufs += 1
                raise
        if datagram[4:6] == _NLMSG_ERROR_TYPE:  # the kernel refused a verdict (no ACKs asked)
            err = nfnl.answer_error(datagram)
            if err:  # 0: an ACK nobody waits for
                self.refused.append(err)
        if self._read_skb_info:
            info = self.skb_info
            if len(info) >= 1024:  # ids of packets NetfilterQueue never called back with
                info.clear()
            for packet_id, flags, start, stop in nfnl.packet_info(datagram):
                info[packet_id] = (flags, start, stop, datagram)
        return datagram


class QueueWorker:
    """One bound NFQUEUE and the loop that serves it."""

    def __init__(
        self,
        queue_num: int,
        handler: Handler,
        maxlen: int = 4096,
        sock_buf: int = 8 << 20,
        fail_open: bool = True,
        *,
        gso: bool = False,
        on_idle: Callable[[], None] | None = None,
        idle_interval: float = 0.5,
        batch: int = 64,
        log: Callable[[str], None] | None = None,
        timer: Callable[[float], float | None] | None = None,
        batch_verdicts: bool = True,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.queue_num = queue_num
        self.handler = handler
        self.maxlen = maxlen
        self.sock_buf = sock_buf
        self.fail_open = fail_open
        self.gso = gso
        self.on_idle = on_idle
        self.idle_interval = idle_interval
        self.batch = batch
        self.stats = QueueStats()
        self.rcvbuf: int | None = None
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._logged_kinds: set[str] = set()
        self._ifnames: dict[int, str | None] = {}
        self._ifnames_at = 0.0
        #: (physindev, physoutdev, indev, outdev, mark, skb flags) -> its PacketMeta: packets of
        #: a bridge come with a handful of such tuples, and building the frozen dataclass per
        #: packet costs more than the lookup. Cleared with the interface names.
        self._metas: dict[_MetaKey, PacketMeta] = {}
        self._nfq: Any = None
        self._sock: socket.socket | None = None
        self._reader: _BudgetSocket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False
        self._seq = int(time.time()) & 0xFFFFFF
        #: delayed verdicts (see the module doc): the id of the packet being handled, the held
        #: packets by id (with their payload and mark), the handler's timer and when it is due
        self.packet_id = 0
        self.held: dict[int, tuple[_Packet, Payload, int]] = {}
        self.timer = timer
        self._timer_at: float | None = None
        #: batch verdicts (see the module doc): the last of the unchanged packets accepted but
        #: not yet told to the kernel (its id is the batch's), and how many they are
        self.batch_verdicts = batch_verdicts
        self.on_batch = on_batch
        self._batch_last: _Packet | None = None
        self._batch_n = 0

    # -- setup ----------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind the queue, size the socket buffer, set (or clear) fail-open."""
        if self._nfq is not None:
            return
        self._stopping = False  # a stop() between bind() and run() still counts
        nfq = NetfilterQueue()
        try:
            with warnings.catch_warnings():
                # NetfilterQueue warns when the kernel caps the buffer; we set it ourselves below.
                warnings.simplefilter("ignore", RuntimeWarning)
                nfq.bind(self.queue_num, self._on_packet, max_len=self.maxlen,
                         sock_len=min(self.sock_buf, 0x7FFFFFFF // 2))
        except OSError as e:
            raise QueueError(
                f"cannot bind NFQUEUE {self.queue_num}: {e} "
                "(is another process bound to it? are we root?)"
            ) from e
        self._nfq = nfq
        try:
            self._sock = socket.socket(fileno=os.dup(nfq.get_fd()))
            self._reader = _BudgetSocket(self._sock, self.stats, skb_info=self.gso)
            self.rcvbuf = self._raise_rcvbuf()
            if self.gso:
                self._configure(nfnl.config_params_message(
                    self.queue_num, nfnl.NFQNL_COPY_PACKET, nfnl.MAX_COPY_RANGE, self._next_seq()),
                    "copy range 65535")
            flags = (nfnl.NFQA_CFG_F_FAIL_OPEN if self.fail_open else 0) | (
                nfnl.NFQA_CFG_F_GSO if self.gso else 0)
            self.set_flags(flags, nfnl.NFQA_CFG_F_FAIL_OPEN | nfnl.NFQA_CFG_F_GSO)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self.unbind()
            raise

    def _raise_rcvbuf(self) -> int:
        assert self._sock is not None
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, opt, self.sock_buf)
                break
            except OSError:
                continue
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def set_flags(self, flags: int, mask: int, *, wait_ack: bool = True,
                  timeout: float = 2.0) -> None:
        """Send NFQNL_MSG_CONFIG flags/mask on the binding socket; raise if the kernel refuses."""
        seq = self._next_seq()
        self._configure(nfnl.config_flags_message(self.queue_num, flags, mask, seq, ack=wait_ack),
                        f"flags 0x{flags:x}/0x{mask:x}", wait_ack=wait_ack, timeout=timeout)

    def _configure(self, message: bytes, what: str, *, wait_ack: bool = True,
                   timeout: float = 2.0) -> None:
        """Send one config message (its seq is ``self._seq``) and wait for the kernel's ACK."""
        if self._sock is None or self._reader is None:
            raise QueueError("queue is not bound")
        seq = self._seq
        self._sock.sendto(message, (0, 0))
        if not wait_ack:
            return
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueueError(f"no answer from the kernel to the queue {self.queue_num} config")
            if not _wait_readable(self._sock.fileno(), left):
                continue
            try:
                data = self._sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue
                raise
            answer = nfnl.answer_to(data, seq)
            if answer is None:
                self._reader.pending.append(data)  # a packet: libnetfilter_queue gets it later
                continue
            if answer != 0:
                raise QueueError(
                    f"kernel refused queue {self.queue_num} {what}: {os.strerror(-answer)}"
                )
            return

    # -- per packet -----------------------------------------------------------------------
    def _ifname(self, index: int) -> str | None:
        if not index:
            return None
        try:
            return self._ifnames[index]
        except KeyError:
            try:
                name: str | None = socket.if_indextoname(index)
            except OSError:
                name = None
            self._ifnames[index] = name
            return name

    def _meta(self, key: _MetaKey) -> PacketMeta:
        physindev, physoutdev, indev, outdev, mark, skb = key
        if skb is None:  # not told (no NFQA_SKB_INFO parsed): decide per packet under GSO
            csum_partial, gso = (None if self.gso else False), None
        else:
            csum_partial = bool(skb & nfnl.NFQA_SKB_CSUMNOTREADY)
            gso = bool(skb & nfnl.NFQA_SKB_GSO)
        out_name = self._ifname(outdev)
        out_port = self._ifname(physoutdev) if physoutdev else (
            "lo" if out_name == "lo" else None)
        meta = PacketMeta(
            in_port=self._ifname(physindev), out_port=out_port,
            indev=self._ifname(indev), outdev=out_name,
            mark=mark, csum_partial=csum_partial, queue_num=self.queue_num, gso=gso,
        )
        if len(self._metas) >= 1024:  # marks are the host's to choose: stay bounded
            self._metas.clear()
        self._metas[key] = meta
        return meta

    def _error(self, kind: str, detail: str, outcome: str = "packet accepted unmodified") -> None:
        self.stats.errors_by_kind[kind] = self.stats.errors_by_kind.get(kind, 0) + 1
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            self._log(f"nfrewrite queue {self.queue_num}: {kind}: {detail} "
                      f"({outcome}; logged once per kind)")

    def _on_packet(self, pkt: _Packet) -> None:
        st = self.stats
        st.packets += 1
        try:
            info = self._reader.skb_info.pop(pkt.id, None) if self.gso and self._reader else None
            if info is None:
                skb = None
                payload: bytes | memoryview = pkt.get_payload()
            else:
                skb, start, stop, datagram = info
                # the payload where it lies in the datagram, not a copy of up to 64 KB (the
                # engine copies it once, into the packet it edits); the two parses must agree
                payload = (memoryview(datagram)[start:stop]
                           if stop - start == pkt.get_payload_len() else pkt.get_payload())
            mark = pkt.get_mark()
            key = (pkt.physindev, pkt.physoutdev, pkt.indev, pkt.outdev, mark, skb)
            meta = self._metas.get(key)
            if meta is None:
                meta = self._meta(key)
        except Exception as e:  # noqa: BLE001 - a packet we cannot read is passed on
            self._error(type(e).__name__, str(e))
            self._verdict(pkt, ACCEPT, None, 0)
            return
        try:
            self.packet_id = pkt.id
            verdict, new = self.handler(payload, meta)
            if verdict == HOLD:
                if self._batch_n:
                    self._send_batch()  # it would cover the held packet from now on
                self.held[pkt.id] = (pkt, payload, mark)
                return
            if not isinstance(verdict, int) or (verdict & VERDICT_MASK) not in (ACCEPT, DROP):
                raise TypeError(f"handler returned verdict {verdict!r}")
            if new is not None and not isinstance(new, bytes | bytearray | memoryview):
                raise TypeError(f"handler returned payload of type {type(new).__name__}")
        except Exception as e:  # noqa: BLE001 - the contract: never stop the loop
            self._error(type(e).__name__, str(e))
            self._verdict(pkt, ACCEPT, None, mark)
            return
        if new is not None:
            new = bytes(new)
            claimed = ip_length(payload)  # more than was copied: the copy range cut it
            if claimed is None or claimed > len(payload):
                st.truncated += 1
                self._error("TruncatedCopy", f"{len(payload)} of {claimed} bytes copied")
                new = None
            elif new == payload:
                new = None
            elif len(new) > MAX_VERDICT_PACKET:
                # the library would send it with a truncated length and the kernel would pass
                # the *original* (see MAX_VERDICT_PACKET): a stale packet is worse than none
                self._error("VerdictTooLong", f"handler returned {len(new)} bytes, a verdict "
                            f"carries at most {MAX_VERDICT_PACKET}", "packet dropped")
                verdict, new = DROP, None
        if (new is None and not self.held and self.batch_verdicts
                and verdict & VERDICT_MASK == ACCEPT
                and (not verdict & TRACK_FLOW or mark & FLOW_MARK)):
            self._batch_last = pkt  # accepted unchanged: the batch at the end tells the kernel
            self._batch_n += 1
            return
        self._verdict(pkt, verdict, new, mark)

    def _send_batch(self) -> None:
        """Accept every packet up to the last one noted (none is held: see the module doc); a
        batch of one is that packet's own verdict (the library's, no message to build)."""
        n, self._batch_n = self._batch_n, 0
        last, self._batch_last = self._batch_last, None
        try:
            if last is None:
                raise QueueError("no packet to accept")
            if n == 1:
                last.accept()
            else:
                if self._sock is None:
                    raise QueueError("queue is not bound")
                self._sock.sendto(nfnl.verdict_batch_message(
                    self.queue_num, nfnl.NF_ACCEPT, last.id, self._next_seq()), (0, 0))
            self.stats.accepted += n
        except Exception as e:  # noqa: BLE001 - e.g. queue unbound meanwhile
            self._error("VerdictFailed", f"{type(e).__name__}: {e}")

    def _verdict(self, pkt: _Packet, verdict: int, new: bytes | None, mark: int) -> None:
        st = self.stats
        if self._batch_n:
            self._send_batch()  # the earlier packets' verdicts first
        try:
            if verdict & VERDICT_MASK == DROP:
                pkt.drop()
                st.dropped += 1
                return
            if verdict & TRACK_FLOW and not mark & FLOW_MARK:
                pkt.set_mark(mark | FLOW_MARK)
                st.tracked += 1
            if new is not None:
                pkt.set_payload(new)
                st.modified += 1
            pkt.accept()
            st.accepted += 1
        except Exception as e:  # noqa: BLE001 - e.g. queue unbound meanwhile
            self._error("VerdictFailed", f"{type(e).__name__}: {e}")

    def release(self, packet_id: int, verdict: int, new: bytes | None) -> None:
        """Give the verdict of a packet the handler held (unknown ids are ignored)."""
        entry = self.held.pop(packet_id, None)
        if entry is None:
            return
        pkt, payload, mark = entry
        if new is not None:
            claimed = ip_length(payload)
            if claimed is None or claimed > len(payload):
                self.stats.truncated += 1
                new = None
            elif new == payload:
                new = None
            elif len(new) > MAX_VERDICT_PACKET:
                self._error("VerdictTooLong", f"handler returned {len(new)} bytes, a verdict "
                            f"carries at most {MAX_VERDICT_PACKET}", "packet dropped")
                verdict, new = DROP, None
        self._verdict(pkt, verdict, new, mark)

    def _run_timer(self, now: float) -> None:
        if self.timer is None:
            return
        try:
            self._timer_at = self.timer(now)
        except Exception as e:  # noqa: BLE001 - the contract: never stop the loop
            self._error("TimerFailed", f"{type(e).__name__}: {e}")
            self._timer_at = None

    def _release_all(self) -> None:
        """Before unbinding: the handler releases what it holds; the rest passes as it is."""
        self._run_timer(math.inf)
        for packet_id in list(self.held):
            self.release(packet_id, ACCEPT, None)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve packets until ``stop()``; calls ``on_idle`` at least every ``idle_interval``."""
        self.bind()
        assert self._sock is not None and self._reader is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_idle = time.monotonic() + self.idle_interval
        self._drain(budget=self.batch)  # anything that arrived while we configured
        while not self._stopping:
            wake = next_idle if self._timer_at is None else min(next_idle, self._timer_at)
            wait_ms = max(0, math.ceil((wake - time.monotonic()) * 1000))
            try:
                events = poller.poll(wait_ms)
            except InterruptedError:
                events = []
            for fd, _ in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 512)
                else:
                    self._drain(budget=self.batch)
            now = time.monotonic()
            due = self._timer_at is not None and now >= self._timer_at
            if due and self._readable():
                # A segment that arrived between the poll's timeout and now, or that a burst
                # left past the batch just read, may be the one a held packet waits for: read
                # one more batch before the deadline releases the hold unjoined.
                self._drain(budget=self.batch)
                now = time.monotonic()
            if self.timer is not None and (events or due):
                self._run_timer(now)
            if now >= next_idle:
                next_idle = now + self.idle_interval
                self._idle(now)

    def _drain(self, budget: int) -> None:
        assert self._reader is not None
        self._reader.budget = budget
        try:
            self._nfq.run_socket(self._reader)
        except OSError as e:
            self._error("RecvFailed", f"{type(e).__name__}: {e}")
        if self._batch_n:
            self._send_batch()
        if self._reader.refused:
            for err in self._reader.refused:
                self._error("VerdictRefused", f"the kernel answered {os.strerror(-err)}",
                            "a verdict for a packet no longer queued is lost")
            self._reader.refused.clear()
        if self.on_batch is not None:
            try:
                self.on_batch()
            except Exception as e:  # noqa: BLE001 - the contract: never stop the loop
                self._error("BatchHookFailed", f"{type(e).__name__}: {e}")

    def _idle(self, now: float) -> None:
        if now - self._ifnames_at > 30.0:  # ifindexes can be reused: forget names now and then
            self._ifnames.clear()
            self._metas.clear()
            self._ifnames_at = now
        if self.on_idle is not None:
            try:
                self.on_idle()
            except Exception as e:  # noqa: BLE001
                self._error("IdleHookFailed", f"{type(e).__name__}: {e}")

    def stop(self) -> None:
        """Make ``run()`` return soon. Async-signal-safe enough for a Python signal handler."""
        self._stopping = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def unbind(self) -> None:
        """Verdict what is already waiting (briefly), then release the queue and our fds."""
        if self._nfq is not None and self._reader is not None:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and self._readable():
                self._drain(budget=self.batch)
            self._release_all()
        if self._nfq is not None:
            with contextlib.suppress(Exception):
                self._nfq.unbind()
        self._nfq = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reader = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _readable(self) -> bool:
        if self._sock is None:
            return False
        if self._reader is not None and self._reader.pending:
            return True
        return _wait_readable(self._sock.fileno(), 0.0)

    def __enter__(self) -> QueueWorker:
        self.bind()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unbind()
