"""The metrics HTTP server: ``/metrics`` for Prometheus, with bounded cost per connection.

Anyone who can reach the port can open connections, so what one costs is bounded, and the
daemon's descriptors for reloads and worker restarts stay free.  One loop thread accepts (listen
backlog :data:`LISTEN_BACKLOG`) and reads each connection's request line and headers itself,
without a thread, up to the blank line (at most :data:`MAX_HEAD` bytes).  At most
:data:`MAX_WAITING` connections wait so, or with a whole request for a handler: when one more
comes, the oldest incomplete one is closed (else the oldest unserved one).  A connection that
sends nothing for :data:`IDLE_TIMEOUT`, or has not sent a whole request head within
:data:`REQUEST_TIMEOUT` of its accept, is closed.  At most :data:`MAX_HANDLERS` requests are served
at once, each by a short-lived thread that answers the one request (no keep-alive) and closes;
each of its writes may block for :data:`IDLE_TIMEOUT` at most, and the answer must be written
within :data:`RESPONSE_TIMEOUT` of the accept (the loop shuts the socket of a late one).  So the
server holds at most ``1 + MAX_WAITING + MAX_HANDLERS * FDS_PER_REQUEST`` descriptors and
``MAX_HANDLERS`` threads besides its own; :func:`serve` lowers both bounds (not below 1) if that
would not leave :data:`FD_RESERVE` free under the soft ``RLIMIT_NOFILE``.  A flood of new
connections can delay scrapes (each pushes out the oldest waiting one) but not exhaust
descriptors; slow or stalled requests never hold a handler.  A process forked while the server
runs (a worker) closes its copies of the server's sockets at once, so it keeps no client's
connection, nor the port, open.

The address comes parsed, as (host, port): the config checks the ``metrics.listen`` text
(:mod:`nfrewrite.config.settings`), so there is one parser.  ``prometheus_client`` is imported
only when :func:`make_app` builds the app.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import resource
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from prometheus_client.registry import Collector

# The server's bounds (see above).
MAX_WAITING = 64  # accepted connections whose request is incomplete or not served yet
MAX_HANDLERS = 4  # requests served at once, one thread each
LISTEN_BACKLOG = 64  # connections the kernel holds until the loop accepts them
IDLE_TIMEOUT = 2.0  # seconds a connection may stay silent (and a read or write may block)
REQUEST_TIMEOUT = 5.0  # seconds from accept until the request line and headers are read
MAX_HEAD = 16384  # bytes of request line and headers the loop reads before a handler takes over
RESPONSE_TIMEOUT = 15.0  # seconds from accept until the response is written
FDS_PER_REQUEST = 3  # the connection, plus the files a scrape opens (one value file at a time)
FD_RESERVE = 64  # descriptors the limits leave to the rest of the daemon (workers, reloads)


_LANDING = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>nfrewrite</title></head>
<body><h1>nfrewrite</h1><p><a href="/metrics">Metrics</a></p></body></html>
"""


def make_app(registry: Collector) -> WSGIApplication:
    """The WSGI app: ``/`` landing page, ``/metrics`` (the library's app), else 404; GET/HEAD."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/", "/metrics"):
            return _reply(start_response, "404 Not Found", b"not found\n", head=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return _reply(
                start_response,
                "405 Method Not Allowed",
                b"method not allowed\n",
                extra=[("Allow", "GET, HEAD")],
            )
        if path == "/":
            return _reply(
                start_response,
                "200 OK",
                _LANDING,
                ctype="text/html; charset=utf-8",
                head=method == "HEAD",
            )
        got: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            got[:] = [status, headers]
            return lambda data: None

        body = b"".join(metrics_app(dict(environ, REQUEST_METHOD="GET"), capture))
        status, headers = got
        headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    return app


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    *,
    ctype: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
    head: bool = False,
) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), *(extra or [])]
    start_response(status, headers)
    return [] if head else [body]


class _Prefixed(io.RawIOBase):
    """Reads ``prefix`` first (the request the loop already read), then ``raw``."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        self._prefix = prefix
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int | None:
        view = memoryview(buf).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(view)  # type: ignore[attr-defined, no-any-return]


class _Handler(WSGIRequestHandler):
    """One request whose head the loop has read, with the socket timeout :data:`IDLE_TIMEOUT`
    (the server's ``idle_timeout``)."""

    timeout = IDLE_TIMEOUT  # applied by StreamRequestHandler.setup() to every read and write
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)  # the socket the files wrap
        head = self.server.head_of(self.request)
        raw = self.connection.makefile("rb", buffering=0)
        self.rfile = io.BufferedReader(_Prefixed(head, cast("BinaryIO", raw)))

    def log_message(self, format: str, *args: Any) -> None:  # the base class's parameter name
        """No line per request."""


@dataclass(slots=True, eq=False)
class _Conn:
    sock: socket.socket
    addr: Any
    accepted: float  # time.monotonic()
    last: float  # when bytes last arrived (or the accept)
    head: bytes = b""  # what the loop read of the request


class _HTTPServer(WSGIServer):
    """The listening socket, the WSGI app, and the loop that admits connections.

    socketserver's own loop (and ThreadingMixIn) would give every connection a thread at once
    and keep it as long as the client likes; this one does not (see :func:`serve`).
    """

    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        sockaddr: tuple[Any, ...],
        family: socket.AddressFamily,
        *,
        max_waiting: int = MAX_WAITING,
        max_handlers: int = MAX_HANDLERS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.address_family = family
        super().__init__(sockaddr, _Handler)
        self.max_waiting = max_waiting
        self.max_handlers = max_handlers
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, _Conn] = {}  # request head incomplete; oldest first
        self._ready: list[_Conn] = []  # request head read, no handler free yet
        self._active: dict[socket.socket, _Conn] = {}  # a handler thread has it
        self._stop = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN (DNS, maybe slow); not needed.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    # -- the loop (one thread) ------------------------------------------------------------
    def run(self, poll_interval: float) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            self._sel = sel
            self.socket.setblocking(False)  # accept() in batches until it would block
            sel.register(self.socket, selectors.EVENT_READ)
            while not self._stop:
                try:
                    self._step(poll_interval)
                except Exception as e:  # noqa: BLE001 - the loop must outlive any surprise
                    print(f"nfrewrite: metrics HTTP: {type(e).__name__}: {e}", file=sys.stderr)
                    time.sleep(poll_interval)
            for conn in [*self._waiting.values(), *self._ready]:
                self._close(conn.sock)
            self._waiting.clear()
            self._ready.clear()
            with self._lock:
                for conn in self._active.values():
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)

    def _step(self, poll_interval: float) -> None:
        events = self._sel.select(poll_interval)
        now = time.monotonic()
        for key, _ in events:  # request bytes first: a scrape is not evicted by the accepts below
            conn = self._waiting.get(cast("socket.socket", key.fileobj))
            if conn is not None:
                self._read_head(conn, now)
        if any(key.fileobj is self.socket for key, _ in events):
            self._accept(now)
        self._expire(now)
        self._dispatch()

    def _read_head(self, conn: _Conn, now: float) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop_waiting(conn)
            return
        conn.head += data
        conn.last = now
        if b"\r\n\r\n" in conn.head or b"\n\n" in conn.head or len(conn.head) >= MAX_HEAD:
            del self._waiting[conn.sock]  # complete (or too long: the handler answers that)
            self._sel.unregister(conn.sock)
            self._ready.append(conn)

    def _drop_waiting(self, conn: _Conn) -> None:
        del self._waiting[conn.sock]
        self._sel.unregister(conn.sock)
        self._close(conn.sock)

    def _accept(self, now: float) -> None:
        import selectors

        for _ in range(self.max_waiting):  # a bounded batch, then look at the rest again
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)  # out of fds elsewhere: do not spin on the listen socket
                return
            if len(self._waiting) + len(self._ready) >= self.max_waiting:
                # full: the oldest incomplete request goes, else the oldest unserved one
                if self._waiting:
                    self._drop_waiting(next(iter(self._waiting.values())))
                else:
                    self._close(self._ready.pop(0).sock)
            sock.setblocking(False)
            self._waiting[sock] = _Conn(sock, addr, now, now)
            self._sel.register(sock, selectors.EVENT_READ)

    def _expire(self, now: float) -> None:
        """Close connections silent for ``idle_timeout`` or without a whole request head within
        REQUEST_TIMEOUT of the accept; cut answers not written within RESPONSE_TIMEOUT."""
        for conn in [
            c
            for c in self._waiting.values()
            if now - c.last > self.idle_timeout or now - c.accepted > REQUEST_TIMEOUT
        ]:
            self._drop_waiting(conn)
        for conn in [c for c in self._ready if now - c.accepted > RESPONSE_TIMEOUT]:
            self._ready.remove(conn)
            self._close(conn.sock)
        with self._lock:
            for conn in self._active.values():
                if now - conn.accepted > RESPONSE_TIMEOUT:
                    # the handler's blocked write returns; it closes the socket itself
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)

    def _dispatch(self) -> None:
        while self._ready:
            with self._lock:
                if len(self._active) >= self.max_handlers:
                    return
                conn = self._ready.pop(0)
                self._active[conn.sock] = conn
            conn.sock.setblocking(True)
            threading.Thread(
                target=self._handle, args=(conn,), name="nfrewrite-metrics-request", daemon=True
            ).start()

    def _handle(self, conn: _Conn) -> None:
        try:
            self.finish_request(conn.sock, conn.addr)
        except Exception:  # noqa: BLE001 - a client that went away; nothing to report
            pass
        finally:
            with self._lock:
                self._active.pop(conn.sock, None)
            self._close(conn.sock)

    def head_of(self, sock: socket.socket) -> bytes:
        """What the loop read of the request on ``sock`` (for its handler)."""
        with self._lock:
            conn = self._active.get(sock)
        return conn.head if conn is not None else b""

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.close()

    def counts(self) -> tuple[int, int]:
        """(connections waiting for their request or a handler, requests being served)."""
        with self._lock:
            return len(self._waiting) + len(self._ready), len(self._active)

    def forget_in_child(self) -> None:
        """In a forked child: close its copies of our sockets (the parent's stay open), so that a
        worker never keeps a client's connection or the port open.  No lock: a thread of the
        parent may have held it at the fork, and in the child no other thread runs."""
        self._stop = True
        socks = [self.socket, *self._waiting, *(c.sock for c in self._ready), *self._active]
        for sock in socks:
            fd = sock.detach()  # closed now even if a handler's file objects refer to it
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _forget_in_child(ref: weakref.ref[_HTTPServer]) -> None:
    httpd = ref()
    if httpd is not None:
        httpd.forget_in_child()


class Server:
    """A running metrics HTTP server (daemon thread); :meth:`close` stops it and frees the port."""

    def __init__(self, httpd: _HTTPServer) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.run,
            args=(0.05,),  # how long close() waits for the loop to notice
            name="nfrewrite-metrics-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def limits(self) -> tuple[int, int]:
        """(connections kept waiting, requests served at once)."""
        return self._httpd.max_waiting, self._httpd.max_handlers

    def counts(self) -> tuple[int, int]:
        """(connections waiting for or with an unserved request, requests being served)."""
        return self._httpd.counts()

    def close(self) -> None:
        self._httpd._stop = True
        self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:
        return 3


def connection_limits(reserve: int = FD_RESERVE) -> tuple[int, int]:
    """(connections kept waiting, requests served at once) that fit in this process's soft
    RLIMIT_NOFILE with ``reserve`` descriptors, and those it has open now, left to the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    spare = soft - _open_fds() - 1 - reserve  # 1: the listening socket
    handlers = max(1, min(MAX_HANDLERS, spare // (2 * FDS_PER_REQUEST)))
    waiting = max(1, min(MAX_WAITING, spare - handlers * FDS_PER_REQUEST))
    return waiting, handlers


def serve(
    address: tuple[str, int],
    registry: Collector,
    *,
    limits: tuple[int, int] | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Server:
    """Serve ``registry`` on ``address`` (host, port) in a daemon thread.

    ``address``: the host without brackets, also for IPv6 (``("::1", 9640)``); port 0 binds a
    free port (tests; :attr:`Server.address` tells which).
    ``limits``: (connections waiting with an incomplete or unserved request, requests served at
    once); by default
    :func:`connection_limits` (what fits beside :data:`FD_RESERVE`), computed now.
    ``idle_timeout``: :data:`IDLE_TIMEOUT` unless a test needs another.
    """
    if idle_timeout <= 0:
        raise ValueError(f"idle_timeout {idle_timeout!r}: want a positive number")
    waiting, handlers = limits if limits is not None else connection_limits()
    if waiting < 1 or handlers < 1:
        raise ValueError(f"limits {limits!r}: want two positive numbers")
    host, port = address
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"listen {address!r}: no address")
    family, _, _, _, sockaddr = infos[0]
    httpd = _HTTPServer(sockaddr, family, max_waiting=waiting, max_handlers=handlers,
                        idle_timeout=idle_timeout)
    httpd.set_app(make_app(registry))
    return Server(httpd)
