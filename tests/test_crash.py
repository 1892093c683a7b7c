"""Crash: ``kill -9`` of the daemon mid-transfer, then a systemd-style restart.

What happens (measured on this kernel; each point is asserted below):

* ``kill -9`` of the supervisor takes its workers with it (``PR_SET_PDEATHSIG``); the queue is
  unbound and the kernel rules stay exactly as they were, so ``--queue-bypass`` passes every
  packet unqueued.
* A connection with only **same-length** rewrites survives byte for byte: a steady stream of
  records carries on, rewritten before the kill, passed unrewritten while nothing is bound, and
  rewritten again on the *same* connection once the daemon is started again (no state needed).
  Every record arrives, in order.
* The restart (``nfrewrite run`` again, as systemd's ``Restart=`` does) re-attaches cleanly: one
  copy of our rules, identical to what was there before the crash (iptables-save), new
  connections rewritten; SIGTERM then removes them.
* A connection that carries a **sequence offset** and sends data while nothing is bound does not
  survive, even though its record does (the new daemon restores it from the killed worker's
  journal: an idle one goes on, see ``tests/test_restart_e2e.py``). What it does depends on the
  sign of the offset, measured here with one line sent before the kill, one while the daemon is
  down, one after the restart:

  - offset > 0 (``grow`` -> ``GROWN!!``, +3): the client's next segment starts 3 bytes below what
    the server expects; the server's TCP takes those 3 bytes for a duplicate and drops them. So
    the line sent during the outage arrives **silently short of its first 3 bytes**
    (``grow 2 ...`` arrives as ``w 2 ...``), and both ends agree on the raw numbers again. The
    restarted daemon restores the +3 record, which no longer fits: the next line lands 3 bytes
    beyond what the server expects and the connection **stalls**.
  - offset < 0 (``shrink-me-please`` -> ``s``, -15): the client's segment starts 15 bytes beyond
    what the server expects; the server holds it out of order. After the restart the restored
    record maps the retransmission back to where the server waits: line 2 arrives, followed by
    the last 15 bytes of the copy the server held (a **duplicated fragment**), and the stream is
    wrong from there on.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from lab.netns import Daemon, Lab, tcp_exchange, write_lab_config
from tests.peers import RECORD, LineConn, RecordStream, record

pytestmark = pytest.mark.privileged

RULES = """
[[rule]]
name = "same"
match = { dport = 8080 }
replace = [ { find = "apple", with = "APPLE" } ]

[[rule]]
name = "grow"
match = { dport = 8081 }
replace = [ { find = "grow", with = "GROWN!!" } ]

[[rule]]
name = "shrink"
match = { dport = 8082 }
replace = [ { find = "shrink-me-please", with = "s" } ]
"""

def _rules(lab: Lab) -> tuple[str, str]:
    """Our rules in both families, counters and comments left out."""
    def ours(text: str) -> str:
        return "\n".join(x for x in text.splitlines() if "NFREWRITE" in x)

    return (ours(lab.run("appliance", ["iptables-save", "-t", "mangle"]).stdout),
            ours(lab.run("appliance", ["ip6tables-save", "-t", "mangle"]).stdout))


def _worker_pids(daemon: Daemon) -> list[int]:
    return [int(x.split()[2]) for x in daemon.log().splitlines() if " bound queue " in x]


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "\nState:\tZ" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _kill_9(daemon: Daemon) -> None:
    """SIGKILL the supervisor; its workers die with it (PR_SET_PDEATHSIG)."""
    workers = _worker_pids(daemon)
    daemon.signal(signal.SIGKILL)
    daemon.wait(5)
    assert all(_gone(w) for w in workers), workers


def _daemon(lab: Lab, config: str) -> Daemon:
    """Started; its metrics directory under the test's directory, so a killed one leaves
    nothing behind elsewhere (systemd gives it RUNTIME_DIRECTORY the same way)."""
    rundir = os.path.join(os.path.dirname(config), "run")
    os.makedirs(rundir, mode=0o700, exist_ok=True)
    return Daemon(lab, config, env={"RUNTIME_DIRECTORY": rundir}).start()




def test_a_same_length_stream_survives_kill_9_and_a_restart_reattaches_with_one_copy(
    lab: Lab, workdir: str
) -> None:

    config = write_lab_config(workdir, {"10.toml": RULES})
    received = os.path.join(workdir, "received")
    first = _daemon(lab, config)
    lab.wait_reachable()
    v4_before, v6_before = _rules(lab)
    assert v4_before.count("-A FORWARD -j NFREWRITE") == 1
    stream = RecordStream(lab, received)
    mark = stream.mark

    time.sleep(1.0)
    i_kill = mark()
    _kill_9(first)
    i_down = mark()
    assert _rules(lab) == (v4_before, v6_before)  # left in place: --queue-bypass passes all
    time.sleep(1.0)
    i_restart = mark()
    second = _daemon(lab, config)
    try:
        v4, v6 = _rules(lab)
        assert (v4, v6) == (v4_before, v6_before)  # exactly one copy again
        for text in (v4, v6):
            assert text.count("-A FORWARD -j NFREWRITE") == 1
            assert text.count("-A POSTROUTING -j NFREWRITE_POST") == 1
        time.sleep(1.0)
        i_resumed = mark()
        time.sleep(0.5)
        total = stream.end()
        again = tcp_exchange(lab, b"apple pie", b"ok")
        assert again.server_received == b"APPLE pie"
    finally:
        assert second.stop() == 0
    assert _rules(lab) == ("", "")  # a clean stop removes them all

    with open(received, "rb") as f:
        data = f.read()
    assert len(data) == total * RECORD
    arrived = [data[i * RECORD:(i + 1) * RECORD] for i in range(total)]
    for i, r in enumerate(arrived):
        assert r in (record(i), record(i).replace(b"apple", b"APPLE")), (i, r)
    rewritten = [b"APPLE" in r for r in arrived]
    assert all(rewritten[:i_kill])
    assert i_restart - i_down > 200 and not any(rewritten[i_down:i_restart])
    assert all(rewritten[i_resumed:])


def test_offset_flows_that_send_while_the_daemon_is_down_break_after_kill_9(
    lab: Lab, workdir: str
) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES})
    first = _daemon(lab, config)
    lab.wait_reachable()
    grow, shrink = LineConn(lab, 8081), LineConn(lab, 8082)
    assert grow.send(b"grow 1") == b"GROWN!! 1\n"  # offset +3 from here on
    assert shrink.send(b"shrink-me-please 1") == b"s 1\n"  # offset -15
    _kill_9(first)
    # +3: the server drops the first 3 bytes as already received; the connection goes on
    assert grow.send(b"grow 2 while down") == b"w 2 while down\n"
    # -15: the segment lies beyond what the server expects: it waits for bytes that never come
    assert shrink.send(b"line 2 while down", wait=2.0) == b""
    second = _daemon(lab, config)
    try:
        assert "2 flows restored" in second.log()  # the journal of the killed worker
        # +3: the restored offset no longer fits a connection that realigned during the gap:
        # its next bytes land 3 beyond what the server expects, and it stalls
        assert grow.send(b"grow 3 after restart", wait=3.0) == b""
        # -15: the retransmission of line 2 maps back to where the server waits and arrives,
        # then the server also delivers the tail of the copy it held out of order (a
        # duplicated fragment of the offset's length); the stream is wrong from there on
        got = shrink.send(b"shrink-me-please 3 after restart", wait=8.0)
        assert got.startswith(b"line 2 while down\n") and b"3 after restart" not in got
        assert grow.received == b"GROWN!! 1\nw 2 while down\n"
    finally:
        assert second.stop() == 0
