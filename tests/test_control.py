"""The control socket without a daemon: its file, its message format, its bounds, the trace relay,
the worker's tracer, ``[control]`` in the config, and the client's one-line failures.

The server runs in this process with stand-ins for the supervisor (a status function, the rule
names) and for the workers (the supervisor's end of a real trace socket pair, whose worker end is
a real :class:`~nfrewrite.service.trace.WorkerTracer` or raw messages).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nfrewrite.config.rulefiles import load_rules
from nfrewrite.config.settings import ControlConfig, load_config
from nfrewrite.core.engine import Engine
from nfrewrite.core.seqadj import FlowTable
from nfrewrite.kernel.queue import PacketMeta
from nfrewrite.service import control as C
from nfrewrite.service import trace as T
from nfrewrite.service.metrics import table as MT

ROOT = Path(__file__).resolve().parent.parent


def wait_for(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)


STATUS = {"hello": "world"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[C.ControlServer]:
    with C.ControlServer(str(tmp_path / "run" / "control.sock"), lambda: dict(STATUS),
                         lambda: ["word", "pear"], request_timeout=1.0,
                         log=lambda line: None) as srv:
        yield srv


def client(path: str) -> tuple[socket.socket, C.Lines]:
    sock = C.connect(path, timeout=5)
    return sock, C.Lines(sock)


def ask(path: str, request: dict[str, Any]) -> dict[str, Any] | None:
    sock, lines = client(path)
    with sock:
        sock.sendall(C.encode(request))
        return lines.next(5)


# -- the socket file ------------------------------------------------------------------------------
def test_the_socket_is_mode_0660_and_removed_on_close(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "control.sock")
    srv = C.ControlServer(path, dict, list, log=lambda line: None)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == os.geteuid() and st.st_gid == os.getegid()
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o750  # made for it
    srv.close()
    assert not os.path.exists(path)


def test_a_stale_socket_is_replaced_and_a_live_one_or_a_file_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening, closed: what a killed daemon leaves
    stale.close()
    with C.ControlServer(path, lambda: dict(STATUS), list, log=lambda line: None):
        assert ask(path, C.status_request()) == {"ok": True, "status": STATUS | {
            "trace_clients": 0}}
        with pytest.raises(C.ControlError, match="another nfrewrite answers there"):
            C.ControlServer(path, dict, list)
    other = tmp_path / "file"
    other.write_text("mine")
    with pytest.raises(C.ControlError, match="not a socket"):
        C.ControlServer(str(other), dict, list)
    assert other.read_text() == "mine"


def test_close_removes_only_its_own_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    srv = C.ControlServer(path, dict, list, log=lambda line: None)
    os.unlink(path)
    Path(path).write_text("someone else's now")
    srv.close()
    assert Path(path).read_text() == "someone else's now"


# -- requests -------------------------------------------------------------------------------------
def test_status_answers_once_and_closes(server: C.ControlServer) -> None:
    sock, lines = client(server.path)
    with sock:
        sock.sendall(C.encode(C.status_request()))
        assert lines.next(5) == {"ok": True, "status": {"hello": "world", "trace_clients": 0}}
        assert lines.next(5) is None
    assert C.ask_status(server.path) == {"hello": "world", "trace_clients": 0}


@pytest.mark.parametrize(("raw", "error"), [
    (b"not json\n", "not a JSON object"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
    (b'{"cmd": "trace", "rules": "word"}\n', "rules: want a list"),
    (b'{"cmd": "trace", "count": 0}\n', "count: want a positive integer"),
    (b'{"cmd": "trace", "rules": ["nope"]}\n', "no rule named 'nope' in force (rules: word, "
                                               "pear)"),
    (b"x" * C.MAX_REQUEST, "longer than"),
])
def test_bad_requests_get_one_error_line(server: C.ControlServer, raw: bytes, error: str) -> None:
    sock, lines = client(server.path)
    with sock:
        sock.sendall(raw)
        answer = lines.next(5)
        assert answer is not None and answer["ok"] is False and error in answer["error"]
        assert lines.next(5) is None


def test_a_silent_connection_is_closed_after_the_request_timeout(
        server: C.ControlServer) -> None:
    sock, lines = client(server.path)
    with sock:
        t0 = time.monotonic()
        assert lines.next(5) is None
        assert 0.9 < time.monotonic() - t0 < 3


def test_connections_beyond_the_limit_are_told_busy(server: C.ControlServer) -> None:
    held = [client(server.path)[0] for _ in range(server.max_clients)]
    try:
        wait_for("all accepted", lambda: server.counts()[0] == server.max_clients)
        with pytest.raises(C.ControlError, match="^busy: 16 connections already; try again$"):
            C.ask_status(server.path)
    finally:
        for s in held:
            s.close()
    wait_for("all gone", lambda: server.counts()[0] == 0)
    assert ask(server.path, C.status_request()) == {"ok": True, "status": STATUS | {
        "trace_clients": 0}}


# -- the client's failures ---------------------------------------------------------------------
def test_the_client_says_not_running_for_no_socket_and_a_stale_one(tmp_path: Path) -> None:
    with pytest.raises(C.NotRunning, match=r"not running: no control socket at .*x\.sock"):
        C.ask_status(str(tmp_path / "x.sock"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with pytest.raises(C.NotRunning, match="nothing answers on"):
        C.ask_status(str(tmp_path / "stale.sock"))


def test_a_daemon_that_accepts_but_never_answers_is_not_running(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)
    with mute, pytest.raises(C.NotRunning, match="no status from .* within 0.3 s"):
        C.ask_status(path, timeout=0.3)


def cli(*args: str, env: dict[str, str] | None = None, user: int | None = None,
        group: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nfrewrite", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={group if group is not None else user}",
                "--clear-groups", *argv]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=full_env,
                          check=False)


def test_status_without_a_daemon_exits_3_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "nfrewrite.toml"
    config.write_text('[control]\nsocket = "run/control.sock"\n')
    got = cli("status", "-c", str(config))
    assert got.returncode == 3
    assert got.stdout == ""
    assert got.stderr == (f"nfrewrite status: not running: no control socket at "
                          f"{tmp_path}/run/control.sock\n")
    # the default: $RUNTIME_DIRECTORY/control.sock; and an unreadable config says so
    got = cli("trace", "-c", str(tmp_path / "missing.toml"),
              env={"RUNTIME_DIRECTORY": str(tmp_path)})
    assert got.returncode == 3
    assert got.stderr.startswith(f"nfrewrite trace: not running: no control socket at "
                                 f"{tmp_path}/control.sock ({tmp_path}/missing.toml: No such "
                                 "file or directory; tried the default socket)")
    assert got.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the client as another user")
def test_permission_denied_is_one_clear_line_and_the_group_may_use_the_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="nfr-test-") as d:  # pytest's own is private
        os.chmod(d, 0o755)
        _permission_denied(Path(d))


def _permission_denied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = str(run / "control.sock")
    config = tmp_path / "nfrewrite.toml"
    config.write_text(f'[control]\nsocket = "{path}"\n')
    config.chmod(0o644)
    with C.ControlServer(path, lambda: {"version": "x"}, list, log=lambda line: None):
        os.chmod(run, 0o755)  # the directory open: the socket's own mode decides
        nobody = cli("status", "-c", str(config), "--json", user=65534)
        assert nobody.returncode == 4, nobody.stderr
        assert nobody.stderr == (f"nfrewrite status: permission denied: {path} (the daemon's "
                                 "user and group, and root, may use it)\n")
        assert "Traceback" not in nobody.stderr and nobody.stdout == ""
        member = cli("status", "-c", str(config), "--json", user=65534, group=os.getegid())
        assert member.returncode == 0, member.stderr
        assert json.loads(member.stdout) == {"version": "x", "trace_clients": 0}
        os.chmod(run, 0o700)  # as the unit's RuntimeDirectoryMode would have it for others
        nobody = cli("trace", "-c", str(config), user=65534)
        assert nobody.returncode == 4
        assert nobody.stderr.startswith("nfrewrite trace: permission denied: ")


# -- the trace relay ----------------------------------------------------------------------------
RECORD = {"time": 1.5, "queue": 3, "rules": ["word"], "verdict": "accept", "len_before": 60,
          "len_after": 60, "src": "198.18.0.1", "sport": 40000, "dst": "198.18.0.2",
          "dport": 8080, "offset": None}


class Worker:
    """The worker end of a trace source, sending raw messages."""

    def __init__(self, server: C.ControlServer, queue: int) -> None:
        ours, self.sock = T.socket_pair()
        server.attach(queue, ours)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())


def start_trace(path: str, rules: list[str] | None = None, count: int | None = None
                ) -> tuple[socket.socket, C.Lines, dict[str, Any]]:
    sock, lines = client(path)
    sock.sendall(C.encode(C.trace_request(rules, count)))
    first = lines.next(5)
    assert first is not None and first["ok"], first
    return sock, lines, first


def test_a_trace_turns_the_workers_on_relays_their_packets_and_off_again(
        server: C.ControlServer) -> None:
    w3, w4 = Worker(server, 3), Worker(server, 4)
    assert server.trace_spec() is None
    sock, lines, first = start_trace(server.path)
    assert first["trace"] == {"rules": None, "count": None, "queues": [3, 4]}
    spec = wait_for("spec", server.trace_spec)
    assert spec["rules"] is None
    w3.send({"v": spec["version"], "on": True})
    w4.send({"v": spec["version"], "on": True})
    assert lines.next(5) == {"ready": {"queues": [3, 4], "unconfirmed": []}}
    w4.send({"p": RECORD, "d": 0})
    assert lines.next(5) == {"packet": RECORD}
    assert server.counts() == (1, 1)
    sock.close()  # Ctrl-C
    wait_for("tracing off", lambda: server.trace_spec() is None)
    assert server.counts() == (0, 0)


def test_ready_comes_anyway_after_the_timeout_naming_the_silent_workers(
        server: C.ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "READY_TIMEOUT", 0.3)
    w = Worker(server, 0)
    silent = Worker(server, 1)  # noqa: F841 - kept open, never confirming
    sock, lines, _ = start_trace(server.path)
    with sock:
        w.send({"v": wait_for("spec", server.trace_spec)["version"], "on": True})
        assert lines.next(5) == {"ready": {"queues": [0, 1], "unconfirmed": [1]}}


def test_rule_filters_are_per_client_and_their_union_goes_to_the_workers(
        server: C.ControlServer) -> None:
    w = Worker(server, 0)
    a, a_lines, _ = start_trace(server.path, ["word"])
    wait_for("word", lambda: (server.trace_spec() or {}).get("rules") == ["word"])
    b, b_lines, _ = start_trace(server.path, ["pear"])
    spec = wait_for("both", lambda: (server.trace_spec() or {}).get("rules") == ["pear", "word"]
                    and server.trace_spec())
    w.send({"v": spec["version"], "on": True})
    assert a_lines.next(5) == b_lines.next(5) == {"ready": {"queues": [0], "unconfirmed": []}}
    pear = dict(RECORD, rules=["pear"])
    w.send({"p": RECORD, "d": 0})
    w.send({"p": pear, "d": 0})
    assert a_lines.next(5) == {"packet": RECORD}
    assert b_lines.next(5) == {"packet": pear}
    a.close()
    wait_for("pear only", lambda: (server.trace_spec() or {}).get("rules") == ["pear"])
    b.close()


def test_count_ends_the_trace_with_an_end_line(server: C.ControlServer) -> None:
    w = Worker(server, 0)
    sock, lines, _ = start_trace(server.path, count=2)
    with sock:
        w.send({"v": wait_for("spec", server.trace_spec)["version"], "on": True})
        assert "ready" in (lines.next(5) or {})
        for _ in range(3):
            w.send({"p": RECORD, "d": 0})
        assert lines.next(5) == {"packet": RECORD}
        assert lines.next(5) == {"packet": RECORD}
        assert lines.next(5) == {"end": "count", "dropped": 0, "packets": 2}
        assert lines.next(5) is None
    wait_for("off", lambda: server.trace_spec() is None)


def test_drops_of_the_workers_and_of_a_slow_reader_are_counted_and_told(
        server: C.ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "MAX_TRACE_BUFFER", 4096)
    w = Worker(server, 0)
    sock, lines, _ = start_trace(server.path)
    with sock:
        w.send({"v": wait_for("spec", server.trace_spec)["version"], "on": True})
        assert "ready" in (lines.next(5) or {})
        w.send({"d": 7})  # the worker lost 7
        assert lines.next(5) == {"dropped": 7}
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = dict(RECORD, rules=["word"] + ["x" * 200] * 10)
        for _ in range(400):  # nobody reads: the kernel buffers fill, then ours, then drops
            while True:
                try:
                    w.send({"p": big, "d": 7})
                    break
                except BlockingIOError:  # the relay reads on, dropping for the client
                    time.sleep(0.01)
        time.sleep(C.DROP_REPORT_INTERVAL + 0.5)
        told = 7
        got = 0
        while True:
            m = lines.next(5)
            assert m is not None
            if "packet" in m:
                got += 1
            elif "dropped" in m:
                told = m["dropped"]
                if got + told - 7 == 400:
                    break
        assert told > 7 and got < 400


def test_stopping_ends_every_trace_with_stopping(tmp_path: Path) -> None:
    srv = C.ControlServer(str(tmp_path / "c.sock"), dict, list, log=lambda line: None)
    sock, lines, _ = start_trace(srv.path)
    with sock:
        srv.close()
        messages = []
        while (m := lines.next(5)) is not None:
            messages.append(m)
        assert messages[-1] == {"end": "stopping", "dropped": 0, "packets": 0}


# -- the worker's tracer --------------------------------------------------------------------------
RULE = """
[[rule]]
name = "word"
match = { dport = 8080 }
replace = [ { find = "apple", with = "APPLE" } ]
[[rule]]
name = "shorter"
match = { dport = 9090 }
replace = [ { find = "banana", with = "ban" } ]
[[rule]]
name = "nope"
match = { dport = 7070 }
verdict = "drop"
"""


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.toml").write_text(RULE)
    rs, diags = load_rules(str(tmp_path / "rules"))
    assert rs is not None, diags
    return Engine(rs, FlowTable())


def tcp4(payload: bytes, *, sport: int = 40000, dport: int = 8080) -> bytes:
    from scapy.layers.inet import IP, TCP

    return bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(
        sport=sport, dport=dport, seq=1000, ack=1, flags="PA") / payload)


def tcp6(payload: bytes, *, sport: int = 40000, dport: int = 8080) -> bytes:
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6

    return bytes(IPv6(src="2001:2::1", dst="2001:2::2") / TCP(
        sport=sport, dport=dport, seq=1000, ack=1, flags="PA") / payload)


META = PacketMeta(in_port="nfr0", out_port="nfr1", indev="br0", outdev="br0", mark=0,
                  queue_num=5)


def received(sock: socket.socket) -> list[dict[str, Any]]:
    out = []
    while True:
        try:
            out.append(json.loads(sock.recv(65536)))
        except BlockingIOError:
            return out


def test_the_tracer_sends_a_record_per_packet_a_wanted_rule_acted_on(engine: Engine) -> None:
    ours, theirs = T.socket_pair()
    tracer = T.WorkerTracer(5, theirs, engine.flows)
    assert not tracer.active
    tracer.configure({"version": 4, "rules": None})
    assert tracer.active and received(ours) == [{"v": 4, "on": True}]
    packets = [
        tcp4(b"an apple", sport=40000, dport=8080),
        tcp4(b"no fruit", sport=40000, dport=8080),  # no rule acts: no record
        tcp6(b"a banana split", sport=40001, dport=9090),
        tcp4(b"x", sport=40002, dport=7070),
    ]
    for i, data in enumerate(packets):
        res = engine.process(data, now=float(i))
        tracer.packet(data, META, res)
    recs = [m["p"] for m in received(ours)]
    assert [r["rules"] for r in recs] == [["word"], ["shorter"], ["nope"]]
    apple, banana, drop = recs
    assert (apple["src"], apple["sport"], apple["dst"], apple["dport"]) == (
        "198.18.0.1", 40000, "198.18.0.2", 8080)
    assert apple["len_before"] == apple["len_after"] == len(packets[0])
    assert apple["offset"] is None and apple["verdict"] == "accept" and apple["queue"] == 5
    assert (banana["src"], banana["dst"]) == ("2001:2::1", "2001:2::2")
    assert banana["len_after"] == len(packets[2]) - 3
    assert banana["offset"] == {"seq": -3, "ack": 0}
    assert drop["verdict"] == "drop" and drop["len_after"] is None
    assert abs(apple["time"] - time.time()) < 60
    line = C.format_trace(banana)
    assert "q5 [2001:2::1]:40001 -> [2001:2::2]:9090 shorter len " in line
    assert line.endswith(f"len {len(packets[2])} -> {len(packets[2]) - 3} seq-3 ack+0")
    assert C.format_trace(drop).endswith("nope len 41 -> dropped offset none")

    tracer.configure({"version": 5, "rules": ["nope"]})
    for data in packets:
        tracer.packet(data, META, engine.process(data, now=9.0))
    assert [m.get("p", {}).get("rules") for m in received(ours)] == [None, ["nope"]]
    tracer.configure(None)
    assert not tracer.active and received(ours) == [{"v": 5, "on": False}]


def test_the_tracer_drops_beyond_its_rate_and_a_full_socket_and_tells_the_count(
        engine: Engine) -> None:
    now = [100.0]
    ours, theirs = T.socket_pair()
    tracer = T.WorkerTracer(0, theirs, engine.flows, limit=3, clock=lambda: now[0])
    tracer.configure({"version": 1, "rules": None})
    received(ours)
    data = tcp4(b"apple", dport=8080)
    res = engine.process(data)
    for _ in range(5):
        tracer.packet(data, META, res)
    assert [m["d"] for m in received(ours)] == [0, 0, 0]
    assert tracer.dropped == 2
    tracer.idle()
    assert received(ours) == [{"d": 2}]
    tracer.idle()
    assert received(ours) == []  # told already
    now[0] += 1.0  # a new second
    tracer = T.WorkerTracer(0, theirs, engine.flows, limit=10**9)
    tracer.configure({"version": 2, "rules": None})
    sent = 0
    while tracer.dropped == 0:  # nobody reads: the socket buffer fills, never blocks
        tracer.packet(data, META, res)
        sent += 1
        assert sent < 100_000
    assert tracer.active


def test_a_tracer_without_a_socket_never_turns_on() -> None:
    tracer = T.WorkerTracer(0, None)
    tracer.configure({"version": 1, "rules": None})
    assert not tracer.active


# -- [control] in the config ----------------------------------------------------------------------
def test_control_socket_default_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "nfrewrite.toml"
    path.write_text("")
    config, _ = load_config(str(path))
    assert config is not None and config.control == ControlConfig(None)
    assert C.socket_path(config, {}) == "/run/nfrewrite/control.sock" == C.DEFAULT_SOCKET
    assert C.socket_path(config, {"RUNTIME_DIRECTORY": "/run/x:/run/y"}) == "/run/x/control.sock"
    path.write_text('[control]\nsocket = "run/c.sock"\n')
    config, _ = load_config(str(path))
    assert config is not None and config.control.socket == f"{tmp_path}/run/c.sock"
    assert C.socket_path(config, {"RUNTIME_DIRECTORY": "/elsewhere"}) == f"{tmp_path}/run/c.sock"
    assert C.socket_path_from_file(str(path), {}) == (f"{tmp_path}/run/c.sock", None)


def test_the_runtime_directory_rule_is_netsetups(monkeypatch: pytest.MonkeyPatch) -> None:
    from nfrewrite.kernel.netsetup import state_dir

    for value in ("", "/run/a", "/run/a:/run/b"):
        monkeypatch.setenv("RUNTIME_DIRECTORY", value)
        assert C.runtime_dir() == state_dir()


@pytest.mark.parametrize(("text", "message"), [
    ('socket = 5', "3:10: error: control.socket must be a string, not integer"),
    ('socket = ""', "3:10: error: control.socket must not be empty"),
    ('socket = "/run/x/"', "3:10: error: control.socket '/run/x/' names a directory"),
    (f'socket = "/{"x" * 107}"', "3:10: error: control.socket '/xxx"),
    ('sockett = "/run/x.sock"', "3:1: error: unknown key 'sockett'"),
])
def test_bad_control_socket_values_are_errors_with_positions(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "nfrewrite.toml"
    path.write_text(f"# nfrewrite\n[control]\n{text}\n")
    config, diags = load_config(str(path))
    assert config is None
    assert any(message in d.format() for d in diags), [d.format() for d in diags]


def test_the_example_config_names_the_default_socket() -> None:
    config, diags = load_config(str(ROOT / "nfrewrite.toml"))
    assert config is not None, diags
    assert config.control.socket in (None, C.DEFAULT_SOCKET)


# -- the status text ------------------------------------------------------------------------------
def test_status_from_samples_and_its_text(tmp_path: Path) -> None:
    from nfrewrite.config.settings import Bridge, Config

    config = Config(str(tmp_path / "n.toml"), bridges=(Bridge("br0", ("nfr0", "nfr1")),))

    def k(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return (name, frozenset(labels.items()))

    samples = {
        k(MT.PACKETS_SEEN.name, queue="0"): 12.0, k(MT.PACKETS_MODIFIED.name, queue="0"): 10.0,
        k(MT.PACKETS_DROPPED.name, queue="0"): 1.0, k(MT.SEQADJ_FLOWS.name, queue="0"): 2.0,
        k(MT.RULE_APPLIED.name, rule="word"): 9.0, k(MT.RULE_APPLIED.name, rule="gone"): 4.0,
        k(MT.KERNEL_QUEUE_WAITING.name, queue="0"): 3.0,
        k(MT.KERNEL_QUEUE_DROPPED.name, queue="0"): 0.0,
        k(MT.KERNEL_QUEUE_USER_DROPPED.name, queue="0"): 0.0,
        k(MT.OFFLOAD_ENABLED.name, port="nfr0", feature="gro"): 0.0,
    }
    status = C.build_status(
        config_path=config.path, config=config,
        rules=[("word", "rules/10.toml", 2), ("pear", "rules/10.toml", 7)], rule_files=1,
        workers=[C.WorkerState(0, 4242, 0.2), C.WorkerState(1, 4243, None)],
        reload=C.ReloadState(1000.0, False, "r.toml:3:1: error: bad", 2), samples=samples,
        started=990.0, now=1100.0, pid=4241)
    assert json.loads(json.dumps(status)) == status
    assert [(r["name"], r["hits"]) for r in status["rules"]] == [("word", 9), ("pear", 0)]
    q0, q1 = status["queues"]
    assert (q0["packets_seen"], q0["packets_modified"], q0["packets_dropped"]) == (12, 10, 1)
    assert q0["kernel"] == {"waiting": 3, "dropped": 0, "user_dropped": 0}
    assert q1["kernel"] is None and q1["packets_seen"] == 0
    assert status["flows_with_offsets"] == 2 and status["uptime"] == 110.0
    assert status["bridges"] == [{"name": "br0", "ports": [
        {"name": "nfr0", "offloads": {"gro": False}}, {"name": "nfr1", "offloads": {}}]}]
    text = C.format_status(status, now=1100.0)
    assert "nfrewrite " in text and "(pid 4241), up 1m 50s" in text
    assert "FAILED: r.toml:3:1: error: bad; 2 reload(s) since start" in text
    assert "bridge       br0: nfr0 (gro off), nfr1" in text
    assert "unbound" in text
    lines = text.splitlines()
    assert any(line.split() == ["9", "word", "rules/10.toml:2"] for line in lines), text
    assert any(line.split() == ["0", "pear", "rules/10.toml:7"] for line in lines), text
    assert any(line.split() == ["0", "4242", "12", "10", "1", "3", "0", "2"] for line in lines)


def test_endpoints_are_read_in_place_and_through_extension_headers() -> None:
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

    plain = tcp6(b"x", sport=1234, dport=80)
    ext = bytes(IPv6(src="2001:2::1", dst="2001:2::2") / IPv6ExtHdrDestOpt()
                / TCP(sport=1234, dport=80) / b"x")
    v4 = tcp4(b"x", sport=1234, dport=80)
    a6, b6 = bytes.fromhex("20010002" + "0" * 23 + "1"), bytes.fromhex("20010002" + "0" * 23 + "2")
    assert T.endpoints(plain) == T.endpoints(ext) == (a6, 1234, b6, 80)
    assert T.endpoints(v4) == (bytes([198, 18, 0, 1]), 1234, bytes([198, 18, 0, 2]), 80)
    assert T.endpoints(b"\x45" + b"\x00" * 10) is None


def test_the_trace_bench_runs_the_worker_handler_with_and_without_the_hook() -> None:
    import inspect

    from bench import bench_trace
    from nfrewrite.service import daemon

    without = inspect.getsource(daemon.worker_main)
    assert without.count("# trace hook") == 1  # the bench takes out that if and its body
    r = bench_trace.measure(bench_trace.WIRE, 20, rounds=2)
    assert r["records"] > 0  # "on" traced
    assert r["none_ns"] > 0 and r["off_ns"] > 0 and r["noise"] >= 0


def test_a_taken_default_socket_is_a_warning_a_configured_one_a_start_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Daemons in several network namespaces may share a runtime directory (their sysctl
    records and locks are per namespace): the second one's default socket is taken."""
    from nfrewrite.config.settings import Config
    from nfrewrite.core.rules import RuleSet
    from nfrewrite.service.daemon import StartError, Supervisor

    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with C.ControlServer(str(tmp_path / "control.sock"), dict, list, log=lambda line: None):
        sup = Supervisor("n.toml", Config("n.toml"), RuleSet([]))
        sup._start_control()
        assert sup.control is None
        err = capsys.readouterr().err
        assert err == (f"nfrewrite: warning: control socket {tmp_path}/control.sock: another "
                       "nfrewrite answers there; set [control] socket to another path; nfrewrite "
                       "status and trace cannot reach this daemon\n")
        configured = Config("n.toml", control=ControlConfig(str(tmp_path / "control.sock")))
        with pytest.raises(StartError, match="another nfrewrite answers there"):
            Supervisor("n.toml", configured, RuleSet([]))._start_control()




# -- hostile or broken clients, workers and files -------------------------------------------------
def test_deep_nesting_is_refused_with_one_line_and_the_server_goes_on(tmp_path: Path) -> None:
    logged: list[str] = []
    with C.ControlServer(str(tmp_path / "c.sock"), lambda: dict(STATUS), lambda: ["word"],
                         request_timeout=5.0, log=logged.append) as srv:
        for raw, error in [
            (b"[" * 4000 + b"\n", f"nested deeper than {C.MAX_DEPTH}"),
            (b'{"cmd": "trace", "rules": ' + b"[" * 20 + b"]" * 20 + b"}\n", "nested deeper"),
            (b"[" * 100_000 + b"\n", "longer than"),
        ]:
            sock, lines = client(srv.path)
            with sock:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(raw)
                answer = lines.next(5)
                assert answer is not None and error in answer["error"], answer
            assert C.ask_status(srv.path, timeout=5) == STATUS | {"trace_clients": 0}
    assert logged == []
    # the client's side: a deep line from a daemon is a ValueError too, never a RecursionError
    with pytest.raises(ValueError, match="nested"):
        C.decode(b"[" * 100_000)
    assert C.nesting(b'{"a": "[[[[", "b": [1, {"c": "\\"[["}]}') == 3


def full_backlog(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener that accepts nobody, its backlog filled: connect() then fails with EAGAIN."""
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(0)
    return mute, full_backlog_again(path)


def full_backlog_again(path: str) -> list[socket.socket]:
    waiting: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return waiting
        waiting.append(s)
        assert len(waiting) < 100


def test_a_full_backlog_is_busy_after_retrying_not_not_running(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    mute, waiting = full_backlog(path)
    try:
        with pytest.raises(C.Busy, match=r"^busy: .*c\.sock took no connection within 0\.3 s "
                                         r"\(too many waiting\); try again$") as info:
            C.connect(path, busy_wait=0.3)
        assert not isinstance(info.value, C.NotRunning)
        # a place frees up while the client retries: it gets in
        threading.Timer(0.2, lambda: mute.accept()[0].close()).start()
        C.connect(path, busy_wait=5).close()
        mute.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                mute.accept()[0].close()  # the place it took and the others: free again
        for s in waiting:
            s.close()
        waiting = full_backlog_again(path)
        config = tmp_path / "nfrewrite.toml"
        config.write_text(f'[control]\nsocket = "{path}"\n')
        got = cli("status", "-c", str(config))
        assert got.returncode == 4, got.stderr
        assert got.stderr.startswith("nfrewrite status: busy: ") and got.stderr.count("\n") == 1
        got = cli("trace", "-c", str(config))
        assert got.returncode == 4 and got.stderr.startswith("nfrewrite trace: busy: ")
    finally:
        mute.close()
        for s in waiting:
            s.close()


def test_a_stalled_trace_reader_is_dropped_and_traces_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "MAX_TRACE_BUFFER", 4096)
    logged: list[str] = []
    with C.ControlServer(str(tmp_path / "c.sock"), lambda: dict(STATUS), lambda: ["word"],
                         stall_timeout=0.5, log=logged.append) as srv:
        w = Worker(srv, 0)
        sock, lines, _ = start_trace(srv.path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        w.send({"v": wait_for("spec", srv.trace_spec)["version"], "on": True})
        assert "ready" in (lines.next(5) or {})
        big = dict(RECORD, rules=["word"] + ["x" * 200] * 10)
        peak = 0
        sent = 0
        while srv.counts()[1]:  # nobody reads; the relay goes on reading the worker
            with contextlib.suppress(BlockingIOError):
                w.send({"p": big, "d": 0})
                sent += 1
            peak = max([peak, *(len(c.out) for c in list(srv._clients.values()))])
            time.sleep(0.002)
            assert sent < 20_000, "the stalled reader was never dropped"
        assert peak <= C.MAX_TRACE_BUFFER + 4096  # lines beyond the bound were dropped
        assert wait_for("off", lambda: srv.trace_spec() is None) is True
        assert srv.stalled == 1 and len(logged) == 1 and "read nothing for 0.5 s" in logged[0]
        assert "trace lines dropped for it" in logged[0]
        sock.close()
        # at most MAX_TRACES traces: one more is told busy, a status still answers
        held = [start_trace(srv.path)[0] for _ in range(C.MAX_TRACES)]
        try:
            answer = ask(srv.path, C.trace_request())
            assert answer == {"ok": False, "error": f"busy: {C.MAX_TRACES} traces already; "
                                                   "try again"}
            assert C.ask_status(srv.path) == STATUS | {"trace_clients": C.MAX_TRACES}
        finally:
            for s in held:
                s.close()


def test_a_lost_confirmation_is_sent_again_and_a_late_one_told(
        server: C.ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # the worker: its socket full when tracing is switched on, it confirms once there is room
    ours, theirs = T.socket_pair()
    tracer = T.WorkerTracer(0, theirs)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            theirs.send(b"{}", socket.MSG_DONTWAIT)
            filled += 1
    tracer.configure({"version": 7, "rules": None})
    tracer.idle()
    assert len(received(ours)) == filled  # the confirmation did not fit
    tracer.idle()
    assert received(ours) == [{"v": 7, "on": True}]
    tracer.idle()
    assert received(ours) == []
    # the server: a worker that confirms after "ready" is told to the client
    monkeypatch.setattr(C, "READY_TIMEOUT", 0.3)
    w, late = Worker(server, 0), Worker(server, 1)
    sock, lines, _ = start_trace(server.path)
    with sock:
        version = wait_for("spec", server.trace_spec)["version"]
        w.send({"v": version, "on": True})
        assert lines.next(5) == {"ready": {"queues": [0, 1], "unconfirmed": [1]}}
        late.send({"v": version, "on": True})
        assert lines.next(5) == {"confirmed": {"queues": [1]}}


FAILED = "queue 0: tracing failed (RuntimeError: boom); no more lines from this queue"


def fake_daemon(messages: list[dict[str, Any]]) -> socket.socket:
    """The client's end of a connection whose daemon end has sent ``messages``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        theirs.sendall(b"".join(C.encode(m) for m in messages))
    return ours


def test_the_trace_command_reports_late_confirmations_and_worker_failures(
        capsys: pytest.CaptureFixture[str]) -> None:
    from nfrewrite.cli import _trace

    sock = fake_daemon([
        {"ok": True, "trace": {"rules": None, "count": 1, "queues": [0, 1]}},
        {"ready": {"queues": [0, 1], "unconfirmed": [1]}},
        {"confirmed": {"queues": [1]}},
        {"warning": FAILED},
        {"packet": RECORD},
        {"end": "count", "dropped": 0, "packets": 1},
    ])
    with sock:
        assert _trace(sock, "c.sock", C.trace_request(None, 1), 1, False) == 0
    out, err = capsys.readouterr()
    assert out == C.format_trace(RECORD) + "\n"
    assert err.splitlines() == [
        "nfrewrite trace: tracing queue(s) 0, 1 (not confirmed yet: 1); Ctrl-C to stop",
        "nfrewrite trace: queue(s) 1 confirmed",
        f"nfrewrite trace: {FAILED}",
    ]


class CountedName(str):
    """A rule name that counts how often it is hashed (a set or dict built over it)."""

    hashed = 0

    def __hash__(self) -> int:
        CountedName.hashed += 1
        return str.__hash__(self)


def test_checking_trace_rule_names_is_linear(tmp_path: Path) -> None:
    in_force = [CountedName(f"rule-{i}") for i in range(2000)]
    asked = [f"rule-{i}" for i in range(0, 2000, 20)]  # 100 names
    with C.ControlServer(str(tmp_path / "c.sock"), dict, lambda: in_force,
                         log=lambda line: None) as srv:
        CountedName.hashed = 0
        sock, lines, first = start_trace(srv.path, asked)
        sock.close()
        assert first["trace"]["rules"] == sorted(asked)
        assert CountedName.hashed <= 2 * len(in_force)  # not once per name asked


def test_the_socket_is_born_0660_and_a_link_swapped_in_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    path = str(tmp_path / "c.sock")
    real_socket = socket.socket

    class Swapping:
        """A socket whose path is replaced by a link to the victim just after bind."""

        def __init__(self, *args: Any) -> None:
            self._s = real_socket(*args)

        def bind(self, where: str) -> None:
            self._s.bind(where)
            os.unlink(where)
            os.symlink(victim, where)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._s, name)

    monkeypatch.setattr(socket, "socket", Swapping)  # as the control module sees it
    with contextlib.suppress(C.ControlError):
        C.bind_socket(path).close()
    monkeypatch.undo()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    old = os.umask(0o077)  # a daemon started with a strict umask still makes them as documented
    try:
        with C.ControlServer(str(tmp_path / "a" / "b" / "c.sock"), dict, list,
                             log=lambda line: None) as srv:
            assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o660
            for d in (tmp_path / "a", tmp_path / "a" / "b"):
                assert stat.S_IMODE(d.stat().st_mode) == 0o750
    finally:
        os.umask(old)


class BrokenFlows:
    """A flow table that fails: the tracer reads it for a record's offsets."""

    def __len__(self) -> int:
        return 1

    def get(self, key: object) -> None:
        raise RuntimeError("boom")


def test_a_failing_tracer_never_raises_into_the_packet_handler(engine: Engine) -> None:
    ours, theirs = T.socket_pair()
    logged: list[str] = []
    flows: Any = BrokenFlows()
    tracer = T.WorkerTracer(5, theirs, flows, log=logged.append)
    tracer.configure({"version": 1, "rules": None})
    data = tcp4(b"an apple", dport=8080)
    res = engine.process(data)
    tracer.packet(data, META, res)  # must not raise
    assert not tracer.active and tracer.failures == 1  # the handler's flag test: no more calls
    assert logged == ["queue 5: tracing failed (RuntimeError: boom); tracing turned off"]
    assert received(ours) == [{"v": 1, "on": True},
                              {"e": "queue 5: tracing failed (RuntimeError: boom); "
                                    "no more lines from this queue"}]
    # a new trace turns it on again; a second failure is counted, not logged again
    tracer.configure({"version": 2, "rules": None})
    tracer.packet(data, META, res)
    assert tracer.failures == 2 and len(logged) == 1


def test_a_worker_failure_is_told_to_its_trace_clients(server: C.ControlServer) -> None:
    w = Worker(server, 0)
    sock, lines, _ = start_trace(server.path)
    with sock:
        w.send({"v": wait_for("spec", server.trace_spec)["version"], "on": True})
        assert "ready" in (lines.next(5) or {})
        w.send({"e": FAILED})
        assert lines.next(5) == {"warning": FAILED}


def test_messages_are_ascii_whatever_names_they_carry() -> None:
    record = dict(RECORD, in_port="eth\udcff\x1b[2J", out_port="br\u2028é")
    line = C.encode({"packet": record})
    assert line.isascii() and line.count(b"\n") == 1 and line.endswith(b"\n")
    assert C.decode(line) == {"packet": record}
    # the text a person reads: no escape sequence or line break from a daemon's message
    assert C.printable("eth\udcff\x1b[2J\nx é") == "eth\\udcff\\x1b[2J\\nx é"
    assert "\x1b" not in C.format_trace(dict(RECORD, rules=["a\x1b[2J"]))


def test_housekeeping_goes_on_when_every_step_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "READY_TIMEOUT", 0.3)
    logged: list[str] = []
    with C.ControlServer(str(tmp_path / "c.sock"), dict, list, log=logged.append) as srv:
        w = Worker(srv, 0)
        sock, lines, _ = start_trace(srv.path)
        with sock:
            def broken(source: object) -> None:
                raise RuntimeError("surprise")

            monkeypatch.setattr(srv, "_read_source", broken)
            w.send({"v": 0})  # readable for ever now: every step raises
            assert lines.next(5) == {"ready": {"queues": [0], "unconfirmed": [0]}}
    assert logged == ["control socket: RuntimeError: surprise"]  # once, not once per turn


def test_a_trace_closed_without_an_end_line_says_why_it_may_have_been(
        capsys: pytest.CaptureFixture[str]) -> None:
    from nfrewrite.cli import _trace

    sock = fake_daemon([{"ok": True, "trace": {"rules": None, "count": None, "queues": [0]}},
                        {"ready": {"queues": [0], "unconfirmed": []}}, {"packet": RECORD}])
    with sock:
        assert _trace(sock, "c.sock", C.trace_request(), None, False) == 3
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nfrewrite trace: the daemon closed the trace (it stopped, or this reader took no line "
        f"for {C.STALL_TIMEOUT:g} s); 1 packets traced")
