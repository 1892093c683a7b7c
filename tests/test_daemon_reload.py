"""The supervisor's side of a reload, in process, with stand-in loaders: a loader that hangs is
killed at its deadline and a SIGHUP meanwhile reloads; a result that cannot be unpickled is a
failed reload (the daemon keeps running), and a loader that lingers after sending is not waited
for long. The real loader and the kernel are covered by ``test_daemon``."""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import pytest

from lab.netns import write_lab_config
from nfrewrite.service import daemon as D
from nfrewrite.service.fdreserve import FdReserve

RULE = """
[[rule]]
name = "word"
match = { dport = 8080 }
replace = [ { find = "apple", with = "APPLE" } ]
"""


class _Recorder:
    """Stands in for ``SupervisorMetrics``: the reload results, in order."""

    def __init__(self) -> None:
        self.reloads: list[bool] = []

    def reload(self, ok: bool, when: float) -> None:
        self.reloads.append(ok)


def _supervisor(tmp_path: Path) -> tuple[D.Supervisor, _Recorder]:
    config_path = write_lab_config(str(tmp_path), {"10.toml": RULE})
    config, ruleset, diags = D.load(config_path)
    assert config is not None and ruleset is not None, diags
    sup = D.Supervisor(config_path, config, ruleset)
    recorder = _Recorder()
    sup.sup = recorder  # type: ignore[assignment]
    sup._fds = FdReserve(0)
    return sup, recorder


def _refuse() -> NoReturn:
    raise ValueError("a result this process cannot rebuild")


class _Unloadable:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse, ()


def _sends_an_unloadable_result_then_lingers(conn: Connection) -> None:
    conn.send_bytes(pickle.dumps(("loaded", _Unloadable())))
    time.sleep(60)


def _hangs(conn: Connection) -> None:
    time.sleep(60)  # as a read from a file system that stopped answering


def _reload(sup: D.Supervisor, target: Any) -> D.Reload:
    parent, child = sup._ctx.Pipe(duplex=False)
    proc = sup._ctx.Process(target=target, args=(child,), daemon=True)
    proc.start()
    child.close()
    r = D.Reload(proc, parent, time.monotonic() + D.loader_timeout())
    sup._reloading = r
    return r


def test_a_result_that_cannot_be_unpickled_is_a_failed_reload_and_a_lingering_loader_is_killed(
    tmp_path: Path,
) -> None:
    sup, recorder = _supervisor(tmp_path)
    r = _reload(sup, _sends_an_unloadable_result_then_lingers)
    assert r.conn.poll(30)
    sup._reload_again = True  # a SIGHUP came during it
    t0 = time.monotonic()
    sup._finish_reload()  # before: the ValueError left the main loop, stopping the daemon
    took = time.monotonic() - t0
    assert sup._reloading is None and recorder.reloads == [False]
    assert not r.process.is_alive()
    assert took < D.BIND_TIMEOUT / 2, f"waited {took:.1f} s for a loader that had sent its result"
    assert sup._hup, "the SIGHUP that came during the reload starts the next one"


def test_a_hung_loader_is_killed_at_its_deadline_and_a_sighup_meanwhile_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NFREWRITE_LOADER_TIMEOUT", "1.5")
    assert D.loader_timeout() == 1.5
    sup, recorder = _supervisor(tmp_path)
    t0 = time.monotonic()
    r = _reload(sup, _hangs)
    sup._start_reload()  # a SIGHUP during the reload: remembered, no second loader
    assert sup._reloading is r and sup._reload_again
    while sup._reloading is not None and time.monotonic() - t0 < 30:
        sup._finish_reload()  # what the main loop does every turn
        time.sleep(0.05)
    assert sup._reloading is None, "the hung loader still blocks reloads"
    assert time.monotonic() - t0 >= 1.5  # not before its deadline
    assert recorder.reloads == [False]
    assert not r.process.is_alive() and r.process.exitcode == -9
    assert sup._hup and not sup._reload_again  # the next loop turn starts the new reload


def test_the_loader_timeout_override_takes_only_a_positive_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for given in ("", "0", "-3", "soon"):
        monkeypatch.setenv("NFREWRITE_LOADER_TIMEOUT", given)
        assert D.loader_timeout() == D.LOADER_TIMEOUT
    monkeypatch.delenv("NFREWRITE_LOADER_TIMEOUT")
    assert D.loader_timeout() == D.LOADER_TIMEOUT
    assert os.environ.get("NFREWRITE_LOADER_TIMEOUT") is None
