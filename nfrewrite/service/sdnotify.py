"""systemd's notify protocol (sd_notify), the few lines of it a Type=notify service needs.

One datagram per state change to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``). Without the variable (not under systemd) every call is a no-op,
so the daemon calls it unconditionally. Sending never raises: losing a status line must not take
the packet path down. ``WATCHDOG=1`` goes out every quarter of ``$WATCHDOG_USEC`` (while the caller
finds all well) and never blocks: a ping the receiver has no room for is dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd advises a ping every half period; pinging every quarter keeps the pings
            # within half a period even when the loop that calls watchdog() runs late
            self.watchdog_interval = int(usec) / 1e6 / 4
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str, wait: bool = True) -> None:
        """One datagram. ``wait=False``: dropped if the receiver's queue is full, instead of
        blocking the caller until the receiver reads."""
        if self._sock is None or self._address is None:
            return
        flags = 0 if wait else socket.MSG_DONTWAIT
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), flags, self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self, now: float, *, force: bool = False) -> None:
        """Ping the watchdog if due (``force``: now, before a step that may block a while)."""
        if self.watchdog_interval is None:
            return
        if not force and now - self._last_watchdog < self.watchdog_interval:
            return
        self._last_watchdog = now
        # a ping never blocks the supervisor: if the receiver lags, this one is lost and the
        # next comes a quarter period later
        self.send("WATCHDOG=1", wait=False)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
