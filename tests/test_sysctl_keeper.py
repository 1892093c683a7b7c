"""SysctlKeeper's lock and record files, in a temporary directory of the host.

Nothing here writes a sysctl: only the keeper's lock, its record file and its directory checks
are exercised (``set``/``restore`` run in the lab's namespaces, see test_netsetup.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nfrewrite.kernel.netsetup import NetSetupError, SysctlKeeper, SysctlKeeperBusy

NOBODY = 65534


def test_a_second_keeper_of_the_namespace_is_refused_until_the_first_unlocks(
    tmp_path: Path,
) -> None:
    first, second = SysctlKeeper(str(tmp_path)), SysctlKeeper(str(tmp_path))
    first.lock()
    with pytest.raises(SysctlKeeperBusy, match=rf"another nfrewrite \(pid {os.getpid()}\) runs"):
        second.lock()
    with pytest.raises(SysctlKeeperBusy):
        second._save({})  # nor may it write the record
    assert not second.locked and not os.path.exists(second.path)
    first.unlock()
    assert not os.path.exists(first.lock_path)
    second.lock()
    assert second.locked
    second.unlock()


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """Workers are forks: one that outlives its supervisor for a moment must not hold the lock."""
    holder = SysctlKeeper(str(tmp_path))
    holder.lock()
    r, w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child says it is running, then waits until the parent has checked
        os.close(w)
        os.write(up_w, b".")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(up_w)
    try:
        assert os.read(up_r, 1) == b"."
        os.close(up_r)
        holder._drop()  # the holder is gone (kill -9), its file stays
        other = SysctlKeeper(str(tmp_path))
        other.lock()  # the child is still alive here
        assert other.locked
        other.unlock()
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_a_symlink_at_the_record_is_not_followed(tmp_path: Path) -> None:
    keeper = SysctlKeeper(str(tmp_path))
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"boot_id": "x", "netns_cookie": 0, "originals": {}}')
    os.symlink(elsewhere, keeper.path)
    with pytest.raises(NetSetupError, match="symbolic link"):
        keeper._load()


def test_a_fifo_at_the_record_does_not_block(tmp_path: Path) -> None:
    keeper = SysctlKeeper(str(tmp_path))
    os.mkfifo(keeper.path, 0o600)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(_load_or_error(keeper)), daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # blocked in open(): give it a writer so the thread can end
        os.close(os.open(keeper.path, os.O_WRONLY | os.O_NONBLOCK))
        t.join()
    assert isinstance(result[0], NetSetupError), result
    assert "not a regular file" in str(result[0])


def _load_or_error(keeper: SysctlKeeper) -> object:
    try:
        return keeper._load()
    except NetSetupError as e:
        return e


def test_a_symlink_at_the_temporary_file_is_not_written_through(tmp_path: Path) -> None:
    keeper = SysctlKeeper(str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    os.symlink(victim, f"{keeper.path}.{os.getpid()}.tmp")
    keeper._save({})
    assert victim.read_text() == "untouched"
    assert os.path.isfile(keeper.path) and not os.path.islink(keeper.path)
    assert keeper._load() == {}


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chmod(run, 0o770)
    keeper = SysctlKeeper(str(run))
    refused = f"{run} is owned by uid .* mode 0770.*RUNTIME_DIRECTORY"
    with pytest.raises(NetSetupError, match=refused):
        keeper._save({})
    assert os.listdir(run) == []


@pytest.mark.privileged
def test_a_directory_of_another_user_and_a_record_of_another_user_are_refused(
    tmp_path: Path,
) -> None:
    """Root running the daemon by hand in the service user's runtime directory."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    keeper = SysctlKeeper(str(run))
    with pytest.raises(NetSetupError, match=f"{run} is owned by uid {NOBODY}"):
        keeper._save({})
    assert os.listdir(run) == []
    os.chown(run, os.geteuid(), os.getegid())
    keeper._save({})
    keeper.unlock()
    os.chown(keeper.path, NOBODY, NOBODY)  # a record planted by that user
    with pytest.raises(NetSetupError, match="not a regular file of uid"):
        SysctlKeeper(str(run))._load()
