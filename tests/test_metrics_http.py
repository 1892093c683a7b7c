"""The metrics HTTP server's bounds: silent and slow connections cost little, and not for long.

In-process, on loopback: the server and its clients share this process's descriptor table, so
what the server holds is the process's count less the clients' sockets.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import Metric

from nfrewrite.service import metrics as M
from nfrewrite.service.metrics import server as metrics_server


@pytest.fixture
def registry() -> M.SupervisorMetrics:
    return M.SupervisorMetrics([0], metrics=M.Metrics(), proc_path="/nonexistent")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def get(srv: M.Server, timeout: float = 10.0) -> int:
    conn = http.client.HTTPConnection(*srv.address, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def silent(srv: M.Server, n: int, first: bytes = b"") -> Iterator[socket.socket]:
    for _ in range(n):
        s = socket.create_connection(srv.address, timeout=10)
        if first:
            s.sendall(first)
        yield s


def wait_until(check: object, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.05)
    return False


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_many_silent_connections_hold_a_bounded_number_of_descriptors(
    registry: M.SupervisorMetrics,
) -> None:
    with M.serve(("127.0.0.1", 0), registry.registry) as srv:
        waiting, handlers = srv.limits
        before = open_fds()
        clients = []
        try:
            for s in silent(srv, 300):
                clients.append(s)
            time.sleep(0.5)  # the loop has accepted what it will
            held = open_fds() - before - len(clients)
            assert held <= waiting + handlers * M.FDS_PER_REQUEST, held
            assert get(srv) == 200
        finally:
            for s in clients:
                s.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout(
    registry: M.SupervisorMetrics,
) -> None:
    with M.serve(("127.0.0.1", 0), registry.registry) as srv:
        (s,) = silent(srv, 1)
        with s:
            assert closed_by_peer(s, M.IDLE_TIMEOUT + 5)
        assert wait_until(lambda: srv.counts() == (0, 0), 5)


# Where a test shows that a scrape is served before silent connections time out, the server's
# idle and request timeouts are this long, so a busy machine cannot blur "at once" and "after the
# timeout"; the test also checks that the silent ones are still there after the scrape.
LONG_IDLE = 60.0


def test_when_full_the_oldest_silent_connection_makes_room_for_a_scrape(
    registry: M.SupervisorMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_server, "REQUEST_TIMEOUT", LONG_IDLE)
    with M.serve(
        ("127.0.0.1", 0), registry.registry, limits=(4, 1), idle_timeout=LONG_IDLE
    ) as srv:
        clients = list(silent(srv, 10))
        try:
            assert wait_until(lambda: srv.counts() == (4, 0), 5)
            assert all(closed_by_peer(s, 5) for s in clients[:6])  # the oldest went first
            t0 = time.monotonic()
            assert get(srv) == 200
            assert time.monotonic() - t0 < LONG_IDLE  # not after the silent ones expired
            # the scrape pushed out one more; the newest three still wait: it did not wait for them
            assert not any(closed_by_peer(s, 0.1) for s in clients[7:])
            assert srv.counts() == (3, 0)
        finally:
            for s in clients:
                s.close()


def test_incomplete_requests_take_no_handler_and_a_scrape_is_served_at_once(
    registry: M.SupervisorMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_server, "REQUEST_TIMEOUT", LONG_IDLE)
    with M.serve(
        ("127.0.0.1", 0), registry.registry, limits=(8, 1), idle_timeout=LONG_IDLE
    ) as srv:
        stalled = list(silent(srv, 5, first=b"GET /metrics HTTP/1.1\r\nHost: x\r\n"))
        try:
            assert wait_until(lambda: srv.counts() == (5, 0), 5)  # no blank line: no handler
            t0 = time.monotonic()
            assert get(srv) == 200
            assert time.monotonic() - t0 < LONG_IDLE  # not after the stalled ones expired
            assert srv.counts() == (5, 0)  # served beside them: they still wait
            srv._httpd.idle_timeout = 0.5  # and, silent that long, they are closed
            assert all(closed_by_peer(s, 10) for s in stalled)
        finally:
            for s in stalled:
                s.close()


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_request_timeout(
    registry: M.SupervisorMetrics,
) -> None:
    with M.serve(("127.0.0.1", 0), registry.registry, limits=(4, 1)) as srv:
        (s,) = silent(srv, 1, first=b"G")
        with s:
            t0 = time.monotonic()
            cut = False
            while time.monotonic() - t0 < metrics_server.REQUEST_TIMEOUT + 5:
                try:
                    s.sendall(b"E")
                except OSError:
                    cut = True
                    break
                if closed_by_peer(s, 0.5):
                    cut = True
                    break
            assert cut
            assert time.monotonic() - t0 >= metrics_server.REQUEST_TIMEOUT - 1
            assert get(srv) == 200


def test_limits_follow_the_soft_descriptor_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + M.FD_RESERVE + 20, hard))
        waiting, handlers = M.connection_limits()
        assert 1 <= handlers <= 3 and 1 <= waiting <= 20 - handlers * M.FDS_PER_REQUEST + 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert M.connection_limits() == (M.MAX_WAITING, M.MAX_HANDLERS)


def test_a_forked_child_does_not_keep_the_servers_connections_open(
    registry: M.SupervisorMetrics,
) -> None:
    """Workers are forked from the supervisor while the server runs: their copies of its
    sockets must not keep a client's connection (or the port) open."""
    with M.serve(("127.0.0.1", 0), registry.registry) as srv:
        (s,) = silent(srv, 1)
        with s:
            assert wait_until(lambda: srv.counts() == (1, 0), 5)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                time.sleep(M.IDLE_TIMEOUT + 10)
                os._exit(0)
            try:
                assert closed_by_peer(s, M.IDLE_TIMEOUT + 5)
            finally:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


class _Held:
    """A collector whose scrape waits until the test lets it go: a request being served."""

    def __init__(self) -> None:
        self.serving = threading.Event()
        self.go = threading.Event()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.serving.set()
        self.go.wait(30)
        return []


def test_a_child_forked_while_a_request_is_served_closes_its_copy_too(
    registry: M.SupervisorMetrics,
) -> None:
    held = _Held()
    registry.registry.register(held)
    with M.serve(("127.0.0.1", 0), registry.registry, limits=(4, 1)) as srv:
        httpd = srv._httpd
        (s,) = silent(srv, 1, first=b"GET /metrics HTTP/1.1\r\n\r\n")
        (w,) = silent(srv, 1)  # and one waiting for its request
        with s, w:
            try:
                # a handler is writing the answer: its socket has file objects on it
                assert held.serving.wait(10)
                assert wait_until(lambda: srv.counts() == (1, 1), 5), srv.counts()
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    socks = [httpd.socket, *httpd._active, *httpd._waiting,
                             *(c.sock for c in httpd._ready)]
                    ok = len(socks) == 3 and all(c.fileno() == -1 for c in socks)
                    os._exit(0 if ok else 1)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
            finally:
                held.go.set()
            s.settimeout(5)
            assert s.recv(15) == b"HTTP/1.0 200 OK"
