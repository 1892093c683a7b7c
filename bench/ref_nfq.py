"""The reference: the least a NetfilterQueue program can do, accept every packet unread.

``python -m bench.ref_nfq --queue N`` binds NFQUEUE ``N`` (copy mode "packet", the daemon's queue
length and socket buffer) and gives every packet ACCEPT from NetfilterQueue's own C receive loop,
without reading the payload. Its throughput is what the kernel <-> userspace round trip alone
allows through one Python process; the daemon's queued figures are divided by it. It prints
``READY`` once bound and, on SIGTERM/SIGINT, one JSON line with the number of packets seen.

With ``--gso`` it also sets the queue's GSO flag and a 65,535-byte copy range (as the daemon does
by default, through :mod:`nfrewrite.kernel.nfnl` on NetfilterQueue's own socket) and reads with a
buffer that holds a whole super-packet: the same least-possible loop, for queues that take GSO
super-packets whole. NetfilterQueue's own ``run()`` cannot be used then (its 4 KB buffer would cut
such a message), so ``run_socket`` reads from the socket.

With ``--ttl N`` (row 3t) it sets every packet's TTL to ``N`` and gives it back with its verdict,
through the packet core alone (``parse``, ``set_ttl``, ``finish``: no rules, flows or metrics): the
least a loop that edits a header can do. A verdict with a payload costs the kernel what an accept
does not (the GSO skb made writable, copied into, sent as CHECKSUM_NONE and so segmented and
checksummed in software), so this, not 3g, is the limit for the daemon's header edit (row 4t).

It installs no firewall rule: the bench puts one NFQUEUE rule in the lab's appliance namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import warnings
from typing import Any

from netfilterqueue import NetfilterQueue

from nfrewrite.core.engine import DEFAULT_MTU
from nfrewrite.core.packet import TcpPacket, parse
from nfrewrite.kernel import nfnl

MAXLEN = 4096  # the daemon's default [queue] maxlen
SOCK_BUF = 8 << 20  # the daemon's default [queue] sock_buf


class _Stop(Exception):
    pass


def _stop(*_: object) -> None:
    raise _Stop


class _BigReads:
    """What ``run_socket`` reads from: whole 64 KB messages, blocking."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, bufsize: int) -> bytes:
        return self.sock.recv(65536 + 4096)


def _configure_gso(sock: socket.socket, queue_num: int) -> None:
    for seq, msg in enumerate((
        nfnl.config_params_message(queue_num, nfnl.NFQNL_COPY_PACKET, nfnl.MAX_COPY_RANGE, 1),
        nfnl.config_flags_message(queue_num, nfnl.NFQA_CFG_F_GSO, nfnl.NFQA_CFG_F_GSO, 2),
    ), start=1):
        sock.send(msg)
        while (answer := nfnl.answer_to(sock.recv(65536 + 4096), seq)) is None:
            pass  # a packet queued meanwhile is lost to this loop; the bench starts afterwards
        if answer:
            raise OSError(-answer, f"queue config refused: {os.strerror(-answer)}")


def serve(queue_num: int, callback: Any, ready: str = "READY", gso: bool = False) -> None:
    """Bind ``queue_num`` with ``callback``, print ``ready``, loop until SIGTERM/SIGINT."""
    nfq = NetfilterQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the kernel may cap the buffer
        nfq.bind(queue_num, callback, max_len=MAXLEN, sock_len=SOCK_BUF)
    sock = socket.socket(fileno=os.dup(nfq.get_fd())) if gso else None
    if sock is not None:
        _configure_gso(sock, queue_num)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(ready, flush=True)
    try:
        if sock is None:
            nfq.run()
        else:
            # the stub asks for a socket; the loop only calls recv(), which _BigReads widens
            nfq.run_socket(_BigReads(sock))  # type: ignore[arg-type]
    except _Stop:
        pass
    finally:
        nfq.unbind()
        if sock is not None:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ref_nfq")
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--gso", action="store_true", help="take GSO super-packets whole")
    p.add_argument("--ttl", type=int, default=None, help="set every packet's TTL to this")
    a = p.parse_args(argv)
    seen = [0]

    def accept(pkt: Any) -> None:
        seen[0] += 1
        pkt.accept()

    def edit_ttl(pkt: Any) -> None:
        seen[0] += 1
        data = pkt.get_payload()
        # a GSO packet (longer than the lab's MTU) is segmented by the kernel, which sets every
        # segment's checksum up itself; a wire-size one needs a complete checksum from us
        gso = len(data) > DEFAULT_MTU
        parsed = parse(data, csum_partial=True if gso else None)
        if isinstance(parsed, TcpPacket) and parsed.set_ttl(a.ttl):
            pkt.set_payload(parsed.finish(kernel_segments=gso))
        pkt.accept()

    serve(a.queue, accept if a.ttl is None else edit_ttl, gso=a.gso)
    print(json.dumps({"packets": seen[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
