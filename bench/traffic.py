"""Bench traffic: ``python -m bench.traffic sink|send|echo|ping ...`` inside a lab namespace.

Theory of operation
-------------------
One small tool makes every flow of ``make bench``, so every row of the table is measured the same
way and the payload is under our control (iperf3 sends random bytes, or a file that ends):

* ``sink`` accepts any number of connections and reads each to EOF (``recv_into`` a 1 MiB
  buffer, one thread per connection), then closes it. It prints ``READY`` once listening.
* ``send`` opens ``--flows`` connections (each bound to the next of ``--sources``, round robin),
  writes a repeating buffer for ``--duration`` seconds, half-closes and waits for the sink's EOF,
  so every byte counted was delivered and read. Throughput = bytes / (first write .. EOF seen).
  The buffer is ``--pattern`` followed by filler up to ``--period`` bytes, repeated: the pattern
  sits at every ``period``-byte boundary of the stream, so every segment of at least
  ``period + len(pattern) - 1`` payload bytes holds a whole copy. ``--mss`` sets TCP_MAXSEG before
  connecting (small-packet runs: the kernel then cuts the stream into small segments, whatever
  the write size, instead of coalescing small writes).
* ``echo`` / ``ping``: a TCP ping-pong with TCP_NODELAY on both ends; ``ping`` sends one byte,
  waits for the one-byte answer, ``--count`` times, and reports p50/p99/mean round-trip in
  microseconds (after ``--warmup`` untimed rounds).

Results are one JSON line on stdout; failures exit 1 with a reason on stderr. Every socket
operation has a timeout. It never touches anything but its own sockets.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

CHUNK = 1 << 18  # bytes per write in bulk mode (a multiple of any sane period)
TIMEOUT = 30.0


def pattern_buffer(pattern: bytes, period: int, size: int = CHUNK) -> bytes:
    """``pattern`` + filler to ``period`` bytes, repeated to ``size`` (rounded to a period)."""
    if period < len(pattern):
        raise ValueError("period shorter than the pattern")
    unit = pattern + b"." * (period - len(pattern))
    return unit * max(1, size // period)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# -- sink ---------------------------------------------------------------------------------------


def _drain(conn: socket.socket) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    try:
        conn.settimeout(TIMEOUT)
        while conn.recv_into(view):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _listen(bind: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket; prints READY (what the bench waits for)."""
    srv = socket.socket(_family(bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(backlog)
    print("READY", flush=True)
    return srv


def sink(bind: str, port: int) -> int:
    srv = _listen(bind, port, 128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_drain, args=(conn,), daemon=True).start()


# -- send ---------------------------------------------------------------------------------------


def _one_flow(
    target: tuple[str, int], source: str | None, data: bytes, duration: float, mss: int,
    start: threading.Barrier, out: list[tuple[int, float, float]], errors: list[str],
) -> None:
    try:
        sock = socket.socket(_family(target[0]), socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if source:
            sock.bind((source, 0))
        sock.connect(target)
        start.wait(TIMEOUT)
        sent = 0
        t0 = time.perf_counter()
        stop_at = t0 + duration
        view = memoryview(data)
        while time.perf_counter() < stop_at:
            sock.sendall(view)
            sent += len(view)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # the sink closes once it has read everything
            pass
        t1 = time.perf_counter()
        sock.close()
        out.append((sent, t0, t1))
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(f"{type(e).__name__}: {e}")
        start.abort()


def send(
    connect: str, port: int, duration: float, flows: int, sources: list[str],
    pattern: bytes, period: int, mss: int,
) -> dict[str, float]:
    data = pattern_buffer(pattern, period)
    barrier = threading.Barrier(flows)
    out: list[tuple[int, float, float]] = []
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=_one_flow,
            args=((connect, port), sources[i % len(sources)] if sources else None, data,
                  duration, mss, barrier, out, errors),
            daemon=True,
        )
        for i in range(flows)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 2 * TIMEOUT)
    if errors or len(out) != flows:
        raise RuntimeError("; ".join(errors) or "a flow did not finish")
    total = sum(b for b, _, _ in out)
    elapsed = max(t1 for _, _, t1 in out) - min(t0 for _, t0, _ in out)
    return {"bytes": total, "elapsed": elapsed, "gbps": total * 8 / elapsed / 1e9,
            "flows": flows}


# -- ping-pong ----------------------------------------------------------------------------------


def echo(bind: str, port: int) -> int:
    srv = _listen(bind, port, 8)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(TIMEOUT)
        try:
            while True:
                b = conn.recv(1)
                if not b:
                    break
                conn.sendall(b)
        except OSError:
            pass
        conn.close()


def ping(connect: str, port: int, count: int, warmup: int) -> dict[str, float]:
    sock = socket.create_connection((connect, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts: list[float] = []
    clock = time.perf_counter
    for i in range(warmup + count):
        t0 = clock()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise RuntimeError("echo answered something else")
        if i >= warmup:
            rtts.append(clock() - t0)
    sock.close()
    rtts.sort()
    n = len(rtts)
    return {
        "p50_us": rtts[n // 2] * 1e6,
        "p99_us": rtts[min(n - 1, (n * 99) // 100)] * 1e6,
        "mean_us": sum(rtts) / n * 1e6,
        "count": n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.traffic")
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("sink", "echo"):
        s = sub.add_parser(name)
        s.add_argument("--bind", required=True)
        s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("send")
    s.add_argument("--connect", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--flows", type=int, default=1)
    s.add_argument("--sources", default="", help="comma-separated source addresses")
    s.add_argument("--pattern", default="", help="hex bytes placed every --period bytes")
    s.add_argument("--period", type=int, default=64)
    s.add_argument("--mss", type=int, default=0)
    s = sub.add_parser("ping")
    s.add_argument("--connect", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=2000)
    s.add_argument("--warmup", type=int, default=100)
    a = p.parse_args(argv)
    try:
        if a.mode == "sink":
            return sink(a.bind, a.port)
        if a.mode == "echo":
            return echo(a.bind, a.port)
        if a.mode == "send":
            sources = [x for x in a.sources.split(",") if x]
            result = send(a.connect, a.port, a.duration, a.flows, sources,
                          bytes.fromhex(a.pattern), a.period, a.mss)
        else:
            result = ping(a.connect, a.port, a.count, a.warmup)
    except Exception as e:  # noqa: BLE001 - one line for the harness
        print(f"bench.traffic {a.mode}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
