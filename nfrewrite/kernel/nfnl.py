"""Raw nfnetlink messages for NFQUEUE configuration that NetfilterQueue does not expose.

Theory of operation
-------------------
A queue's flags (``NFQA_CFG_F_FAIL_OPEN``, ``..._GSO``, ...) are set with an ``NFQNL_MSG_CONFIG``
message: ``nlmsghdr`` + ``nfgenmsg`` (``res_id`` = queue number, big endian) + the attributes
``NFQA_CFG_MASK`` (which flags to change) and ``NFQA_CFG_FLAGS`` (their new values), both be32. The
kernel (``nfqnl_recv_config`` in ``net/netfilter/nfnetlink_queue.c``) refuses FLAGS without MASK
(EINVAL), flags it does not know (EOPNOTSUPP), and - the point that shapes
``nfrewrite.kernel.queue`` - any config for an existing queue sent from a netlink port id other
than the one that bound it (``queue->peer_portid != NETLINK_CB(skb).portid`` -> EPERM). So the
message must go out on NetfilterQueue's own socket: ``socket.socket(fileno=os.dup(fd))`` is a
second handle on the very same socket (same port id), and this module only builds and parses bytes
for it.

ACKs: we ask for one (``NLM_F_ACK``) so that a refused flag is an error, not a silent no-op; the
caller reads it itself before the packet loop starts. Should an ACK or error ever reach
libnetfilter_queue instead, libnfnetlink's ``nfnl_handle_packet`` looks up subsystem 0 for
``NLMSG_ERROR`` (type 2), finds no callbacks and returns -1, which NetfilterQueue ignores: it is
dropped harmlessly (also shown by a test).

Per-packet skb info: each queued packet arrives as an ``NFQNL_MSG_PACKET`` message whose
attributes include ``NFQA_PACKET_HDR`` (the packet id, be32) and, when any flag is set,
``NFQA_SKB_INFO`` (be32): ``NFQA_SKB_CSUMNOTREADY`` (the skb is ``CHECKSUM_PARTIAL``: the TCP
checksum field holds only the pseudo-header seed) and ``NFQA_SKB_GSO`` (a GSO skb: the kernel will
segment it itself). NetfilterQueue does not hand these over; :func:`packet_skb_info` reads them
from the very datagram NetfilterQueue then parses, so the queue loop can pair them with the
packet by id. ``NFQA_PAYLOAD`` comes last and may be longer than a 16-bit attribute length can
say (a 65,535-byte packet): the walk stops there.

Batch verdicts: ``NFQNL_MSG_VERDICT_BATCH`` carries one ``NFQA_VERDICT_HDR`` (verdict, id) and
applies that verdict to *every* packet still waiting in the queue whose id is not after the given
one (``nfqnl_recv_verdict_batch``: it walks the queue's list in order, ids compared with
wrap-around, and stops at the first later id). Packets are listed, and sent to us, in id order
(both happen under the queue's lock), so a batch for the highest id read covers exactly the
packets read and not yet given a verdict - including any the caller still holds back on purpose,
which is the caller's to avoid. Packets the kernel passed without queueing them (fail-open: queue
or socket full) never get on the list, so a batch cannot touch them; with the GSO flag off, each
segment of a GSO packet is queued with its own id and covered like any packet. A batch may carry
a mark for all its packets, never a payload. An empty batch is refused with ENOENT; without
``NLM_F_ACK`` only such an error comes back, and libnetfilter_queue drops it (see ACKs above).

What it must not do: open sockets, block, or guess: every parse checks lengths.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFNETLINK_V0 = 0

#: packet message attributes (``enum nfqnl_attr_type``) and ``NFQA_SKB_INFO`` flags
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_SKB_INFO = 14
NFQA_SKB_CSUMNOTREADY = 0x1
NFQA_SKB_GSO = 0x2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

#: copy modes (``NFQNL_COPY_*``) for ``NFQA_CFG_PARAMS``
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2
#: the largest copy range: an IP packet (a GSO super-packet included) is at most 65,535 bytes
MAX_COPY_RANGE = 0xFFFF

NFQA_CFG_F_FAIL_OPEN = 0x1
NFQA_CFG_F_CONNTRACK = 0x2
NFQA_CFG_F_GSO = 0x4
NFQA_CFG_F_UID_GID = 0x8
NFQA_CFG_F_SECCTX = 0x10

#: verdicts (``NF_DROP``, ``NF_ACCEPT`` in ``linux/netfilter.h``)
NF_DROP = 0
NF_ACCEPT = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big endian)
_NLATTR = struct.Struct("=HH")
_CONFIG_PARAMS = struct.Struct("!IB")  # struct nfqnl_msg_config_params: copy_range, copy_mode
_MSG_HEAD = struct.Struct("=IH")  # nlmsghdr's length and type
_BE32 = struct.Struct("!I")
_VERDICT_HDR = struct.Struct("!II")  # struct nfqnl_msg_verdict_hdr: verdict, id
_PACKET_MSG = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (_align4(length) - length)


def _config_message(queue_num: int, attrs: bytes, seq: int, ack: bool) -> bytes:
    """NFQNL_MSG_CONFIG for queue ``queue_num`` carrying the packed attributes ``attrs``."""
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number out of range: {queue_num}")
    body = _NFGENMSG.pack(0, NFNETLINK_V0, queue_num) + attrs
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    msg_flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, msg_flags, seq, 0) + body


def config_flags_message(
    queue_num: int, flags: int, mask: int, seq: int, ack: bool = True
) -> bytes:
    """NFQNL_MSG_CONFIG setting ``flags`` under ``mask`` on queue ``queue_num``."""
    attrs = _attr(NFQA_CFG_MASK, struct.pack("!I", mask))
    attrs += _attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
    return _config_message(queue_num, attrs, seq, ack)


def config_params_message(
    queue_num: int, copy_mode: int, copy_range: int, seq: int, ack: bool = True
) -> bytes:
    """NFQNL_MSG_CONFIG setting the copy mode and range of queue ``queue_num``.

    NetfilterQueue caps the range at 4016 bytes (its receive buffer); a queue with the GSO flag
    needs up to 65,535, and the caller then reads with a buffer that large.
    """
    if not 0 <= copy_range <= 0xFFFFFFFF:
        raise ValueError(f"copy range out of range: {copy_range}")
    attrs = _attr(NFQA_CFG_PARAMS, _CONFIG_PARAMS.pack(copy_range, copy_mode))
    return _config_message(queue_num, attrs, seq, ack)


def verdict_batch_message(queue_num: int, verdict: int, max_id: int, seq: int) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: ``verdict`` for every packet of queue ``queue_num`` still
    waiting whose id is not after ``max_id`` (see the module doc), without an ACK."""
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number out of range: {queue_num}")
    body = _NFGENMSG.pack(0, NFNETLINK_V0, queue_num) + _attr(
        NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, max_id & 0xFFFFFFFF))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body),
                          (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH,
                          NLM_F_REQUEST, seq & 0xFFFFFFFF, 0) + body


@dataclass(frozen=True, slots=True)
class NlMsg:
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes

    @property
    def error(self) -> int | None:
        """For NLMSG_ERROR: 0 (an ACK) or a negative errno; None for other messages."""
        if self.type != NLMSG_ERROR or len(self.payload) < 4:
            return None
        return int(struct.unpack_from("=i", self.payload)[0])

    @property
    def acked_seq(self) -> int | None:
        """For NLMSG_ERROR: the sequence number of the request it answers."""
        if self.type != NLMSG_ERROR or len(self.payload) < 4 + _NLMSGHDR.size:
            return None
        return int(_NLMSGHDR.unpack_from(self.payload, 4)[3])


def parse(datagram: bytes) -> Iterator[NlMsg]:
    """The netlink messages of one datagram (stops at the first malformed header)."""
    off = 0
    while off + _NLMSGHDR.size <= len(datagram):
        length, mtype, mflags, seq, pid = _NLMSGHDR.unpack_from(datagram, off)
        if length < _NLMSGHDR.size or off + length > len(datagram):
            return
        yield NlMsg(mtype, mflags, seq, pid, datagram[off + _NLMSGHDR.size : off + length])
        off += _align4(length)


def answer_error(datagram: bytes) -> int:
    """The error (negative errno, 0 for an ACK) of the first message of ``datagram``, an
    NLMSG_ERROR; -EBADMSG when it does not parse as one."""
    for msg in parse(datagram):
        err = msg.error
        return -errno.EBADMSG if err is None else err
    return -errno.EBADMSG


def answer_to(datagram: bytes, seq: int) -> int | None:
    """If ``datagram`` is the ACK/error for request ``seq``: 0 or -errno; else None."""
    for msg in parse(datagram):
        if msg.type == NLMSG_ERROR and msg.acked_seq == seq:
            return msg.error
    return None


def packet_skb_info(datagram: bytes) -> list[tuple[int, int]]:
    """(packet id, ``NFQA_SKB_*`` flags) of each packet message in ``datagram`` (flags 0 when the
    kernel sent no ``NFQA_SKB_INFO``: none set); see :func:`packet_info`."""
    return [(packet_id, flags) for packet_id, flags, _, _ in packet_info(datagram)]


def packet_info(datagram: bytes) -> list[tuple[int, int, int, int]]:
    """(packet id, ``NFQA_SKB_*`` flags, payload start, payload end) of each packet message in
    ``datagram``: flags 0 when the kernel sent no ``NFQA_SKB_INFO`` (none set); the payload runs
    from its attribute's data to the end of its message (the last attribute, whose 16-bit length
    may have wrapped), start = end = 0 when there is none. Messages or attributes that do not
    parse end the walk; a packet message without an id is left out. (Not through :func:`parse`:
    that copies each message's payload, up to 64 KB here, for two 4-byte attributes.)"""
    out: list[tuple[int, int, int, int]] = []
    off, n = 0, len(datagram)
    head, attr, be32 = _MSG_HEAD.unpack_from, _NLATTR.unpack_from, _BE32.unpack_from
    while off + 16 <= n:  # 16: _NLMSGHDR.size
        length, mtype = head(datagram, off)
        if length < 16 or off + length > n:
            break
        if mtype == _PACKET_MSG:
            packet_id = -1
            flags = start = stop = 0
            at, end = off + 20, off + length  # 20: nlmsghdr + nfgenmsg
            while at + 4 <= end:
                alen, atype = attr(datagram, at)
                atype &= _NLA_TYPE_MASK
                if atype == NFQA_PAYLOAD:
                    start, stop = at + 4, end
                    break
                if alen < 4:
                    break
                if alen >= 8 and at + 8 <= end:
                    if atype == NFQA_PACKET_HDR:
                        packet_id = be32(datagram, at + 4)[0]
                    elif atype == NFQA_SKB_INFO:
                        flags = be32(datagram, at + 4)[0]
                at += (alen + 3) & ~3
            if packet_id >= 0:
                out.append((packet_id, flags, start, stop))
        off += (length + 3) & ~3
    return out
