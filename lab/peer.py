"""One end of a lab TCP exchange: ``python -m lab.peer server|client ...``.

Theory of operation: the bytes to send come on stdin (read completely first). The server binds,
prints ``READY`` and accepts exactly one connection; the client connects. Each side then sends its
bytes from a thread (so two large sends cannot deadlock), half-closes (``SHUT_WR``) and reads until
EOF. The result goes to stdout as one JSON line ``{"received": "<hex>"}``; anything that goes wrong
(including a timeout: every socket operation has one and the whole run has a deadline) exits 1
with a one-line reason on stderr. Test tooling for ``lab.netns``; it never touches anything
but its own socket.

``ping`` mode sends one ICMP echo over a raw socket: the lab hosts have no ``ping`` binary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time


def _exchange(conn: socket.socket, data: bytes, chunk: int, deadline: float) -> bytes:
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            if chunk > 0:
                for i in range(0, len(data), chunk):
                    conn.sendall(data[i : i + chunk])
                    time.sleep(0.002)
            else:
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    received = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no EOF before deadline ({len(received)} bytes received)")
        piece = conn.recv(65536)
        if not piece:
            break
        received += piece
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        raise TimeoutError("send did not finish before deadline")
    if errors:
        raise errors[0]
    return bytes(received)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(target: str, timeout: float) -> bool:
    """One ICMP/ICMPv6 echo over a raw socket (no ``ping`` binary needed); True if answered."""
    v6 = ":" in target
    ident = os.getpid() & 0xFFFF
    payload = b"nfrewrite-lab"
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        msg = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload  # kernel fills the checksum
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        csum = _icmp_checksum(head + payload)
        msg = struct.pack("!BBHHH", 8, 0, csum, ident, 1) + payload
    deadline = time.monotonic() + timeout
    with sock:
        sock.sendto(msg, (target, 0))
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            want = 129 if v6 else 0
            if (len(icmp) >= 8 and icmp[0] == want
                    and struct.unpack("!H", icmp[4:6])[0] == ident and addr[0] == target):
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lab.peer")
    ap.add_argument("role", choices=["server", "client", "ping"])
    ap.add_argument("--bind", default="")
    ap.add_argument("--connect", default="")
    ap.add_argument("--source", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--chunk", type=int, default=0)
    args = ap.parse_args(argv)
    if args.role == "ping":
        return 0 if ping(args.connect, args.timeout) else 1
    data = sys.stdin.buffer.read()
    deadline = time.monotonic() + args.timeout
    try:
        if args.role == "server":
            fam = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as lsock:
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind((args.bind, args.port))
                lsock.listen(1)
                lsock.settimeout(args.timeout)
                sys.stdout.write("READY\n")
                sys.stdout.flush()
                conn, _ = lsock.accept()
        else:
            fam = socket.AF_INET6 if ":" in args.connect else socket.AF_INET
            conn = socket.socket(fam, socket.SOCK_STREAM)
            conn.settimeout(args.timeout)
            if args.source:
                conn.bind((args.source, 0))
            conn.connect((args.connect, args.port))
        with conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            got = _exchange(conn, data, args.chunk, deadline)
    except (OSError, TimeoutError) as e:
        sys.stderr.write(f"lab peer {args.role}: {type(e).__name__}: {e}\n")
        return 1
    sys.stdout.write(json.dumps({"received": got.hex()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
