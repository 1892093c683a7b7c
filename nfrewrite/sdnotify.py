"""systemd's notify protocol (sd_notify), the few lines of it a Type=notify service needs.

One datagram per state change to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name starting with ``@``). Without the variable (not under systemd) every call is a no-op,
so the daemon calls it unconditionally. Sending never raises: losing a status line must not take
the packet path down.
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
            # ping twice per period, as systemd advises
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None or self._address is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self, now: float) -> None:
        """Ping the watchdog if due; called from the packet loop's heartbeat."""
        if self.watchdog_interval is None or now - self._last_watchdog < self.watchdog_interval:
            return
        self._last_watchdog = now
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
