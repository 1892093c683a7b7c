"""Length-changed connections across a worker crash, a restart, a reload and a daemon kill -9.

What must be shown (each a test below), on open connections whose rules grow (``grow`` ->
``GROWN!!``, +3 per match) and shrink (``shrink-me-please`` -> ``s``, -15 per match) the stream
from the client, while the server answers every line and other rules change those answers the
other way (``back`` -> ``BACK-BACK``, +5, on the shrinking connection; ``back`` -> ``b``, -3, on
the growing one), so each connection carries an offset in both directions:

* the worker is killed with SIGKILL while the connections are idle; the supervisor starts a new
  one, which reads its predecessor's journal: every later line arrives rewritten, byte-exact;
* the daemon is stopped (SIGTERM) and started again (its snapshot is read): the idle connections
  go on byte-exact, and the log counts the flows restored;
* a reload (SIGHUP) with a changed rule set keeps the records: the old offsets still map, new
  matches follow the new rules;
* the whole daemon is killed with SIGKILL (the supervisor, its workers with it) and started
  again: the journal is read, the idle connections go on byte-exact.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from lab.netns import Daemon, Lab, write_lab_config
from tests.peers import LineConn
from tests.test_crash import _gone, _kill_9, _worker_pids

pytestmark = pytest.mark.privileged

RULES = """
[[rule]]
name = "grow"
match = { dport = 8081 }
replace = [ { find = "grow", with = "GROWN!!" } ]

[[rule]]
name = "shrink"
match = { dport = 8082 }
replace = [ { find = "shrink-me-please", with = "s" } ]

[[rule]]
name = "answer-shrink"
match = { sport = 8081 }
replace = [ { find = "back", with = "b" } ]

[[rule]]
name = "answer-grow"
match = { sport = 8082 }
replace = [ { find = "back", with = "BACK-BACK" } ]
"""


def _daemon(lab: Lab, config: str) -> Daemon:
    rundir = os.path.join(os.path.dirname(config), "run")
    os.makedirs(rundir, mode=0o700, exist_ok=True)
    return Daemon(lab, config, env={"RUNTIME_DIRECTORY": rundir}).start()


def _conns(lab: Lab) -> tuple[LineConn, LineConn]:
    return LineConn(lab, 8081, reply=True), LineConn(lab, 8082, reply=True)


def _offsets(grow: LineConn, shrink: LineConn, n: int) -> None:
    """Lines that move all four offsets (several matches each way), checked byte for byte at
    both ends."""
    assert grow.send(f"grow {n} grow grow".encode()) == f"GROWN!! {n} GROWN!! GROWN!!\n".encode()
    assert grow.reply == f"b GROWN!! {n} GROWN!! GROWN!!\n".encode()
    assert shrink.send(f"shrink-me-please {n} shrink-me-please".encode()) == f"s {n} s\n".encode()
    assert shrink.reply == f"BACK-BACK s {n} s\n".encode()


def _goes_on(grow: LineConn, shrink: LineConn, n: int) -> None:
    """After the gap: plain lines and more edits, byte-exact, then the whole of both streams."""
    assert grow.send(f"plain {n}".encode()) == f"plain {n}\n".encode()
    assert grow.reply == f"b plain {n}\n".encode()
    assert shrink.send(f"plain {n}".encode()) == f"plain {n}\n".encode()
    assert shrink.reply == f"BACK-BACK plain {n}\n".encode()
    _offsets(grow, shrink, n + 1)


def test_a_worker_killed_with_sigkill_is_replaced_and_its_flows_go_on(
    lab: Lab, workdir: str
) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES})
    daemon = _daemon(lab, config)
    try:
        lab.wait_reachable()
        grow, shrink = _conns(lab)
        _offsets(grow, shrink, 1)
        _offsets(grow, shrink, 2)
        (worker,) = _worker_pids(daemon)
        mark = len(daemon.log())
        os.kill(worker, signal.SIGKILL)
        assert _gone(worker)
        daemon.wait_log("flows restored", after=mark)
        daemon.wait_log(" bound queue ", after=mark)
        assert "2 flows restored" in daemon.log()[mark:]
        _goes_on(grow, shrink, 3)
        assert grow.received == (b"GROWN!! 1 GROWN!! GROWN!!\nGROWN!! 2 GROWN!! GROWN!!\n"
                                 b"plain 3\nGROWN!! 4 GROWN!! GROWN!!\n")
        assert shrink.received == b"s 1 s\ns 2 s\nplain 3\ns 4 s\n"
        assert grow.replies == (b"b GROWN!! 1 GROWN!! GROWN!!\nb GROWN!! 2 GROWN!! GROWN!!\n"
                                b"b plain 3\nb GROWN!! 4 GROWN!! GROWN!!\n")
        assert shrink.replies == (b"BACK-BACK s 1 s\nBACK-BACK s 2 s\nBACK-BACK plain 3\n"
                                  b"BACK-BACK s 4 s\n")
    finally:
        assert daemon.stop() == 0


def test_a_stop_and_a_start_keep_idle_flows(lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES})
    first = _daemon(lab, config)
    lab.wait_reachable()
    grow, shrink = _conns(lab)
    _offsets(grow, shrink, 1)
    assert first.stop() == 0
    assert "2 flows' sequence records saved" in first.log()
    time.sleep(0.5)  # down: the idle connections send nothing
    second = _daemon(lab, config)
    try:
        assert "2 flows restored" in second.log()
        assert "did not stop cleanly" not in second.log()
        _goes_on(grow, shrink, 2)
    finally:
        assert second.stop() == 0


def test_a_reload_with_other_rules_keeps_the_records(lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES})
    daemon = _daemon(lab, config)
    try:
        lab.wait_reachable()
        grow, shrink = _conns(lab)
        _offsets(grow, shrink, 1)
        with open(os.path.join(os.path.dirname(config), "rules", "10.toml"), "w") as f:
            f.write(RULES.replace('"GROWN!!"', '"GREW"'))
        assert "reload done" in daemon.reload()
        # the old offsets (+6, -15) still map; new matches follow the new rule (+0 each)
        assert grow.send(b"grow 2") == b"GREW 2\n"
        assert grow.reply == b"b GREW 2\n"
        assert shrink.send(b"shrink-me-please 2") == b"s 2\n"
        assert shrink.reply == b"BACK-BACK s 2\n"
        assert grow.send(b"plain 3") == b"plain 3\n"
        assert grow.reply == b"b plain 3\n"
    finally:
        assert daemon.stop() == 0


def test_a_daemon_killed_with_sigkill_and_started_again_keeps_idle_flows(
    lab: Lab, workdir: str
) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES})
    first = _daemon(lab, config)
    lab.wait_reachable()
    grow, shrink = _conns(lab)
    _offsets(grow, shrink, 1)
    time.sleep(1.0)  # the idle hook has dated the journal
    _kill_9(first)
    second = _daemon(lab, config)
    try:
        assert "2 flows restored" in second.log()
        assert "did not stop cleanly" in second.log()
        _goes_on(grow, shrink, 2)
    finally:
        assert second.stop() == 0
