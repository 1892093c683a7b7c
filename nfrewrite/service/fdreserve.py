"""File descriptors held in reserve, so a full descriptor table cannot stop the daemon's own work.

Theory of operation
-------------------
The supervisor's steps that must not fail for want of a descriptor (a reload, a worker restart,
removing its firewall rules on stop) need a handful each: pipes to a worker, ``iptables-restore``
with its three pipes, the config and rule files.  Whatever else fills the table (a leak, a flood
the HTTP server's bounds did not foresee), those steps should still run.

:class:`FdReserve` opens ``n`` descriptors on ``/dev/null`` at start and keeps them.  Around such a
step the daemon closes them (:meth:`FdReserve.released`), which frees ``n`` slots under the soft
``RLIMIT_NOFILE``; after it the reserve opens them again, as many as it can (a slot someone else
took meanwhile is simply not refilled; the next :meth:`refill` tries again).  On stop it closes
them for good (:meth:`release`) before the teardown.  No child keeps them: the descriptors are
opened with ``O_CLOEXEC`` (a program run with ``exec``, such as ``iptables-restore``, never sees
them), and a process forked without ``exec`` (a worker, a reload's loader) closes its copies at
once (``os.register_at_fork``), so 32 workers do not hold 32 reserves.

It cannot help with a descriptor taken by another thread while the reserve is released; the
HTTP server's own bounds (``metrics.serve``) keep that small.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator

#: Descriptors the supervisor keeps in reserve (a reload or a worker restart needs about ten).
DEFAULT_RESERVE = 32


class FdReserve:
    """``n`` descriptors on ``/dev/null``, closed when a step needs the room."""

    def __init__(self, n: int = DEFAULT_RESERVE) -> None:
        if n < 0:
            raise ValueError(f"reserve of {n} descriptors: want 0 or more")
        self.n = n
        self._fds: list[int] = []
        _reserves.add(self)
        self.refill()

    def __len__(self) -> int:
        """How many descriptors are held now."""
        return len(self._fds)

    def refill(self) -> None:
        """Open descriptors until ``n`` are held or none can be opened."""
        while len(self._fds) < self.n:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release(self) -> None:
        """Close every held descriptor."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop())

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Close the reserve for the ``with`` block, refill it after."""
        self.release()
        try:
            yield
        finally:
            self.refill()


_reserves: weakref.WeakSet[FdReserve] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a forked child: close the copies of every reserve's descriptors; the child keeps none."""
    for reserve in list(_reserves):
        reserve.n = 0  # a refill in the child opens nothing
        reserve.release()


os.register_at_fork(after_in_child=_forget_in_child)
