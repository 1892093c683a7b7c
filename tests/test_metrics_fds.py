"""The daemon's file descriptors against a flood of idle connections to the metrics port.

client ns -- [appliance ns: br0 + nfrewrite run] -- server ns.  The daemon runs with the soft
RLIMIT_NOFILE systemd gives a service by default (1,024).  Idle connections to the metrics port
must not take the descriptors a scrape, a reload (SIGHUP) or a worker restart needs; and when the
descriptor table is full anyway, the daemon must still restart a worker and, on stop, remove its
NFQUEUE rules. The workers, forked while the reserve is held, keep no copy of it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from lab.netns import Daemon, Lab, LabError, tcp_exchange, write_lab_config

pytestmark = pytest.mark.privileged

METRICS_PORT = 9640
SOFT_NOFILE = 1024  # systemd's default soft limit for a service
IDLE_CONNECTIONS = 1100

RULE = """
[[rule]]
name = "word"
match = { dport = 8080 }
replace = [ { find = "apple", with = "APPLE" } ]
"""

#: Opens N connections to 127.0.0.1:PORT, each sending the start of a request line and then
#: nothing (a request that never completes: with nothing sent at all, a connection the listen
#: queue had no room for is never known to the server, thanks to SYN cookies).  Connects are
#: non-blocking, paced, and a failed one is tried again, for up to 60 s; prints how many
#: completed, then holds them all until stdin closes.
HOLDER = r"""
import errno, resource, selectors, socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
def start():
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    sel.register(s, selectors.EVENT_WRITE)
for _ in range(n):
    start()
    time.sleep(0.002)  # paced, so the server's listen queue does not overflow
held, deadline = [], time.monotonic() + 60
while len(held) < n and time.monotonic() < deadline:
    for key, _ in sel.select(1):
        s = key.fileobj
        sel.unregister(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            try:
                s.send(b"GET /metr")
                held.append(s)
                continue
            except OSError:
                pass
        s.close()
        start()
print(len(held), flush=True)
sys.stdin.read()
"""


class LimitedDaemon(Daemon):
    """The lab daemon, started with a given soft RLIMIT_NOFILE (the hard limit unchanged)."""

    def __init__(self, lab: Lab, config: str, soft_nofile: int) -> None:
        super().__init__(lab, config)
        self.soft_nofile = soft_nofile

    def start(self, timeout: float = 20.0) -> LimitedDaemon:
        soft = self.soft_nofile

        def limit() -> None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self._offset = self._log.tell()
        self.proc = self.lab.popen(
            "appliance",
            [sys.executable, "-m", "nfrewrite", "run", "-c", self.config],
            stdout=self._log, stderr=self._log, env=self.env, preexec_fn=limit,
        )
        self.wait_log("nfrewrite: ready", timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # ``ip netns exec`` execs the command: the daemon's own pid


def scrape_once(lab: Lab) -> str | None:
    proc = lab.run(
        "appliance",
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"],
        check=False, timeout=15,
    )
    return str(proc.stdout) if proc.returncode == 0 else None


def scrape(lab: Lab, within: float = 60.0) -> str:
    """A scrape that answers, retried once a second for up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        body = scrape_once(lab)
        if body is not None:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"no scrape answered in {within:.0f} s")
        time.sleep(1)


def sample(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


def worker_pids(daemon: Daemon) -> list[int]:
    return [int(line.split()[2]) for line in daemon.log().splitlines() if " bound queue 0 " in line]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, within: float = 60.0) -> int:
    """The daemon's open fd count once it stopped changing for 3 s (or after ``within`` s)."""
    deadline = time.monotonic() + within
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = open_fds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 3:
            break
        time.sleep(0.2)
    return last


def nfqueue_rules(lab: Lab) -> str:
    return "\n".join(
        line
        for tool in ("iptables-save", "ip6tables-save")
        for line in lab.run("appliance", [tool]).stdout.splitlines()
        if "NFQUEUE" in line
    )


def test_idle_connections_leave_room_for_a_scrape_a_reload_and_a_worker_restart(
    lab: Lab, workdir: str
) -> None:
    config = write_lab_config(workdir, {"10.toml": RULE}, metrics_port=METRICS_PORT)
    daemon = LimitedDaemon(lab, config, SOFT_NOFILE).start()
    holder = None
    sampling = threading.Event()
    during: list[int] = []

    def sample_fds() -> None:
        while not sampling.wait(0.05):
            with contextlib.suppress(OSError):
                during.append(open_fds(daemon.pid))

    sampler = threading.Thread(target=sample_fds, daemon=True)
    try:
        lab.wait_reachable()
        base = open_fds(daemon.pid)
        sampler.start()
        holder = lab.popen(
            "appliance", [sys.executable, "-c", HOLDER, str(IDLE_CONNECTIONS), str(METRICS_PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert holder.stdout is not None
        connected = int(holder.stdout.readline())
        assert connected > SOFT_NOFILE - 64, connected  # enough to fill an unbounded server's table
        settled = settled_fds(daemon.pid)
        sampling.set()

        body = scrape(lab)
        assert sample(body, "nfrewrite_last_reload_successful") == 1

        tail = daemon.reload(timeout=30)
        assert "reload done" in tail, tail

        (first,) = worker_pids(daemon)
        mark = len(daemon.log())
        os.kill(first, signal.SIGKILL)
        daemon.wait_log(" bound queue 0 ", after=mark, timeout=30)
        assert daemon.proc is not None and daemon.proc.poll() is None
        got = tcp_exchange(lab, b"apple pie", b"ok")
        assert got.server_received == b"APPLE pie"
        assert sample(scrape(lab), "nfrewrite_worker_restarts_total") == 1
        assert connected == IDLE_CONNECTIONS  # the server never stopped accepting
        # the server's bound: the listening socket is in base; 64 waiting, 4 handlers x 3
        assert max(during) <= base + 64 + 4 * 3, (base, max(during))
        assert settled <= base + 4, (base, settled)
    finally:
        sampling.set()
        if holder is not None:
            holder.kill()
            holder.wait(5)
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(timeout=10)
    assert nfqueue_rules(lab) == ""


def test_with_a_full_descriptor_table_a_worker_restarts_and_stop_removes_the_rules(
    lab: Lab, workdir: str
) -> None:
    """However the table filled up (here: the soft limit lowered under the daemon's feet to
    what it has open), the fds it keeps in reserve let it restart a worker and tear down."""
    config = write_lab_config(workdir, {"10.toml": RULE}, metrics_port=METRICS_PORT)
    daemon = LimitedDaemon(lab, config, SOFT_NOFILE).start()
    restarted = False
    try:
        lab.wait_reachable()
        assert "NFQUEUE" in nfqueue_rules(lab)
        used = {int(fd) for fd in os.listdir(f"/proc/{daemon.pid}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={lowest_free}:"],
                       check=True, timeout=10)
        (first,) = worker_pids(daemon)
        mark = len(daemon.log())
        os.kill(first, signal.SIGKILL)
        with contextlib.suppress(LabError):  # checked below: no rules may be left, whatever
            daemon.wait_log(" bound queue 0 ", after=mark, timeout=30)
        restarted = len(worker_pids(daemon)) == 2
        if restarted:
            got = tcp_exchange(lab, b"apple pie", b"ok")
            assert got.server_received == b"APPLE pie"
            tail = daemon.reload(timeout=30)
            assert "reload done" in tail, tail
    finally:
        rc = daemon.stop(timeout=10)
    assert nfqueue_rules(lab) == "", daemon.log()
    assert restarted, daemon.log()
    assert rc == 0, daemon.log()


def null_fds(pid: int) -> list[int]:
    """``pid``'s descriptors above stdio open on ``/dev/null`` (what the reserve holds)."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if int(name) > 2 and os.readlink(f"/proc/{pid}/fd/{name}") == os.devnull:
                found.append(int(name))
    return found


def test_workers_keep_no_copy_of_the_supervisors_descriptor_reserve(
    lab: Lab, workdir: str
) -> None:
    """Workers are forked while the reserve is held, without exec: each would hold its own copy
    of it, and a worker needs none."""
    from nfrewrite.service.fdreserve import DEFAULT_RESERVE

    config = write_lab_config(workdir, {"10.toml": RULE}, workers=2,
                              metrics_port=METRICS_PORT)
    with Daemon(lab, config) as daemon:
        assert daemon.proc is not None
        assert len(null_fds(daemon.proc.pid)) >= DEFAULT_RESERVE  # the reserve is held
        workers = [int(line.split()[2]) for line in daemon.log().splitlines()
                   if " bound queue " in line]
        assert len(workers) == 2, daemon.log()
        for pid in workers:  # one is multiprocessing's own: a child's stdin is /dev/null
            held = null_fds(pid)
            assert len(held) <= 1, f"worker {pid} holds the reserve's descriptors: {held}"
