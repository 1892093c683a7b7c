"""FdReserve: with the descriptor table full, a step run with the reserve released still opens
what it needs, and the reserve is whole again after it; a forked child keeps none of it."""

from __future__ import annotations

import errno
import os
import resource

import pytest

from nfrewrite.service.fdreserve import FdReserve


def test_a_full_table_leaves_room_for_a_step_with_the_reserve_released() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    reserve = None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 48, hard))
        reserve = FdReserve(8)
        assert len(reserve) == 8
        while True:  # fill the table, as a flood or a leak would
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        with pytest.raises(OSError) as exc:
            os.pipe()
        assert exc.value.errno == errno.EMFILE
        with reserve.released():
            r, w = os.pipe()  # what a worker restart opens first
            os.close(r)
            os.close(w)
        assert len(reserve) == 8
        os.close(fillers.pop())
        with reserve.released():
            fillers.append(os.open(os.devnull, os.O_RDONLY))  # someone takes a slot meanwhile
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        assert len(reserve) == 7  # refilled as far as it could
    finally:
        for fd in fillers:
            os.close(fd)
        if reserve is not None:
            reserve.release()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_release_closes_everything_and_descriptors_are_not_inherited() -> None:
    reserve = FdReserve(4)
    fds = list(reserve._fds)
    assert all(not os.get_inheritable(fd) for fd in fds)
    reserve.release()
    assert len(reserve) == 0
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_forked_child_keeps_none_of_the_reserve() -> None:
    """Workers and loaders are forked without exec: O_CLOEXEC alone would leave each of them a
    copy of the whole reserve."""
    reserve = FdReserve(6)
    fds = list(reserve._fds)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if every reserve descriptor is closed here
            code = 0
            try:
                for fd in fds:
                    try:
                        os.fstat(fd)
                        code = 1
                    except OSError as e:
                        if e.errno != errno.EBADF:
                            code = 2
                reserve.refill()  # and the child's reserve opens nothing again
                if len(reserve) != 0:
                    code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(reserve) == 6  # the parent's reserve is untouched
        for fd in fds:
            os.fstat(fd)
    finally:
        reserve.release()
