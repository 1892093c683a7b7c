"""The control socket: ``nfrewrite status`` and ``nfrewrite trace`` talk to the running daemon.

What it is for
==============
An operator asks the running daemon what it does: what is in force and how often each rule
fired (``status``), and which packets a rule changes, live (``trace``). The daemon answers on a
UNIX stream socket, never on the network: ``[control] socket`` in the config, else
``$RUNTIME_DIRECTORY/control.sock`` (systemd sets ``RUNTIME_DIRECTORY=/run/nfrewrite`` for the
unit's ``RuntimeDirectory=nfrewrite``), else ``/run/nfrewrite/control.sock``; the client resolves
the same way. The socket is made mode 0660, owned by the daemon's user and group: those (and
root) may use it, nobody else.

The message format
==================
One JSON object per line (UTF-8, ``\\n``-terminated), both ways. The client sends one request:

* ``{"cmd": "status"}``: one answer ``{"ok": true, "status": {...}}`` (see :func:`build_status`),
  then the daemon closes the connection;
* ``{"cmd": "trace", "rules": [names] or null, "count": n or null}``: the answer
  ``{"ok": true, "trace": {...}}``, then ``{"ready": {"queues": [...], "unconfirmed": [...]}}`` once
  every worker has switched tracing on (or after :data:`READY_TIMEOUT`, naming those that have
  not; each of those is told by a ``{"confirmed": {"queues": [q]}}`` if it confirms later), then
  any number of ``{"packet": record}`` (see :mod:`nfrewrite.service.trace`) and
  ``{"dropped": n}`` (the trace lines lost so far, told at most once a second when it grew), and
  last ``{"end": reason, "dropped": n, "packets": n}`` before the daemon closes: reason ``"count"``
  (``count`` packets sent) or ``"stopping"`` (the daemon stops). ``{"warning": text}`` tells
  that a worker's tracing failed (it sends no more records until the next trace starts). The
  client ends a trace by closing the connection.

Any request can be answered ``{"ok": false, "error": "one line"}`` instead (then the connection
closes).

Theory of operation (the server)
================================
:class:`ControlServer` runs one thread with one selector over: the listening socket, a wake-up
pipe, the accepted connections, and one *trace source* per worker (the supervisor's end of that
worker's trace socket pair, see :mod:`nfrewrite.service.trace`). It never touches a worker's
pipe: the supervisor's main loop asks :meth:`ControlServer.trace_spec` what the workers should
trace (None: nothing; else a version number and the union of the clients' rule filters, None for
"every rule") and sends it to each worker when it changed; each worker confirms the version on its
trace socket, which is how a client learns that tracing is on everywhere.

Bounded: at most :data:`MAX_CLIENTS` connections at once (one more is told "busy" and closed), of
which at most :data:`MAX_TRACES` traces (so a status always finds a place); a request line of at
most :data:`MAX_REQUEST` bytes, nested at most :data:`MAX_DEPTH` deep (checked before the
parser, which recurses), that must arrive within :data:`REQUEST_TIMEOUT`; a status answer that
must be written within :data:`REPLY_TIMEOUT`; per trace client at most :data:`MAX_TRACE_BUFFER`
bytes waiting to be written, beyond which packet lines are dropped and counted (the client is
told when it reads again), so a slow reader never makes the daemon buffer without end, and a
worker never waits for anyone (it drops and counts too). A trace client that takes nothing of
what waits for :data:`STALL_TIMEOUT` seconds, or lets the few control lines pile up past
:data:`MAX_TRACE_SLACK` more, is closed (logged with the lines dropped for it): a reader that
stopped does not hold one of the trace places for ever. Every socket is non-blocking: no client
makes this thread wait. A status answer is computed in this thread from the supervisor's state
and the metrics (the same prometheus-client multiprocess files /metrics reads, so the figures
agree with a scrape).

Processes forked while the server runs (workers, a reload's loader) close their copies of its
descriptors at once. On stop, trace clients get ``{"end": "stopping"}`` (written for up to
:data:`CLOSE_FLUSH` seconds), every connection is closed and the socket file removed (if it is
still the one bound here). A socket file left by a killed daemon is removed at the next start
(nothing answers on it); one on which something answers is left alone (:class:`ControlError`: the
supervisor then fails to start if the path was configured, else runs without a control socket,
as a second daemon in another network namespace sharing the runtime directory would).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import selectors
import socket
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nfrewrite.service.metrics import table as MT

if TYPE_CHECKING:
    from nfrewrite.config.settings import Config

DEFAULT_RUNTIME_DIR = "/run/nfrewrite"
SOCKET_NAME = "control.sock"
DEFAULT_SOCKET = f"{DEFAULT_RUNTIME_DIR}/{SOCKET_NAME}"
SOCKET_MODE = 0o660
DIR_MODE = 0o750  # a directory made for the socket

MAX_CLIENTS = 16  # connections at once (status and trace together)
MAX_TRACES = 8  # trace clients at once (so that status always finds a place)
LISTEN_BACKLOG = 16
MAX_REQUEST = 4096  # bytes of the request line
MAX_DEPTH = 8  # how deep arrays and objects may nest in a request (a request needs 2)
REQUEST_TIMEOUT = 5.0  # seconds from accept until the request line is read
REPLY_TIMEOUT = 10.0  # seconds from the request until a status answer is written
MAX_TRACE_BUFFER = 256 * 1024  # bytes waiting for one trace client before lines are dropped
MAX_TRACE_SLACK = 64 * 1024  # beyond MAX_TRACE_BUFFER, for the few control lines; past: dropped
STALL_TIMEOUT = 30.0  # seconds a trace client may leave lines waiting without reading any
BUSY_WAIT = 2.0  # seconds the client retries while the daemon's listen backlog is full
DROP_REPORT_INTERVAL = 1.0  # seconds between two {"dropped": n} to one client
READY_TIMEOUT = 3.0  # seconds a trace client waits for every worker's confirmation
CLOSE_FLUSH = 0.5  # seconds the stop spends writing the last lines to trace clients
MAX_SOURCE_READS = 256  # trace records read from one worker per loop turn (then the others)
TICK = 0.2  # seconds between the loop's housekeeping turns



class ControlError(RuntimeError):
    """The control socket cannot be set up or used; the message is the one-line reason."""


class NotRunning(ControlError):
    """The daemon does not answer on the socket (the CLI exits 3)."""


class NoAccess(ControlError):
    """This user may not use the socket or its directory (the CLI exits 4)."""


class Busy(ControlError):
    """The daemon runs but takes no more connections now (the CLI exits 4, as for the
    daemon's own "busy" answer)."""


# -- where the socket is ---------------------------------------------------------------------------
def runtime_dir(environ: Mapping[str, str] | None = None) -> str:
    """The daemon's runtime directory: the first of ``$RUNTIME_DIRECTORY``, else /run/nfrewrite
    (the rule of ``nfrewrite.kernel.netsetup.state_dir``, without importing pyroute2)."""
    env = os.environ if environ is None else environ
    return env.get("RUNTIME_DIRECTORY", "").split(":")[0] or DEFAULT_RUNTIME_DIR


def socket_path(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The socket the daemon binds for ``config``."""
    return config.control.socket or os.path.join(runtime_dir(environ), SOCKET_NAME)


def socket_path_from_file(config_path: str,
                          environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """For the client: (socket path, a note when the config file could not tell it).

    Only ``[control] socket`` is read (a config that is being edited and does not validate still
    names the running daemon's socket); a file that cannot be read gives the default.
    """
    import tomllib

    default = os.path.join(runtime_dir(environ), SOCKET_NAME)
    try:
        with open(config_path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        return default, f"{config_path}: {e.strerror}; tried the default socket"
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return default, f"{config_path}: not valid TOML ({e}); tried the default socket"
    table = data.get("control")
    value = table.get("socket") if isinstance(table, dict) else None
    if isinstance(value, str) and value:
        return os.path.join(os.path.dirname(config_path), value), None
    return default, None


# -- the message format ----------------------------------------------------------------------------
def encode(message: Mapping[str, Any]) -> bytes:
    """One message: compact JSON and a newline, ASCII only: JSON escapes every control
    character, and ``ensure_ascii`` every other one (an interface name the kernel gave as
    undecodable bytes, or a line separator, reaches a terminal or a log as ``\\u`` text)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\Z)|[\[\]{}]')  # an unclosed string: to the end


def nesting(text: bytes) -> int:
    """How deep arrays and objects nest in ``text`` (JSON; brackets inside strings do not
    count), found without parsing it."""
    depth = deepest = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def decode(line: bytes) -> dict[str, Any]:
    """One received line as an object; ValueError if it is not a JSON object (also when it
    nests too deeply for the parser)."""
    try:
        value = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def status_request() -> dict[str, Any]:
    return {"cmd": "status"}


def trace_request(rules: Sequence[str] | None = None, count: int | None = None) -> dict[str, Any]:
    return {"cmd": "trace", "rules": list(rules) if rules else None, "count": count}


# -- the status, from the supervisor's state and the metrics ---------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def collect_samples(registry: Any) -> Samples:
    """Every sample the registry gives (what /metrics would show), by name and labels."""
    out: Samples = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def _series(samples: Samples, name: str) -> Iterator[tuple[dict[str, str], float]]:
    for (n, labels), value in samples.items():
        if n == name:
            yield dict(labels), value


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The series of ``name`` by one label's value (summed over its other labels)."""
    out: dict[str, float] = {}
    for labels, value in _series(samples, name):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


@dataclass(frozen=True)
class WorkerState:
    queue: int
    pid: int | None
    heartbeat_age: float | None  # seconds since its last message, None if it has none


@dataclass(frozen=True)
class ReloadState:
    time: float
    ok: bool
    error: str | None = None
    reloads: int = 0  # reloads tried since the start (the load at start is not one)


def build_status(
    *,
    config_path: str,
    config: Config,
    rules: Iterable[tuple[str, str, int]],
    rule_files: int,
    workers: Sequence[WorkerState],
    reload: ReloadState,
    samples: Samples,
    started: float,
    now: float | None = None,
    control_socket: str = "",
    trace_clients: int = 0,
    pid: int | None = None,
) -> dict[str, Any]:
    """The answer to ``status`` (JSON-ready). ``rules``: (name, file, line) in force, in order;
    ``samples``: :func:`collect_samples` of the supervisor's registry."""
    from nfrewrite import __version__

    now = time.time() if now is None else now
    seen = _by(samples, MT.PACKETS_SEEN.name, "queue")
    modified = _by(samples, MT.PACKETS_MODIFIED.name, "queue")
    dropped = _by(samples, MT.PACKETS_DROPPED.name, "queue")
    flows = _by(samples, MT.SEQADJ_FLOWS.name, "queue")
    restarts = _by(samples, MT.WORKER_RESTARTS.name, "queue")
    waiting = _by(samples, MT.KERNEL_QUEUE_WAITING.name, "queue")
    k_dropped = _by(samples, MT.KERNEL_QUEUE_DROPPED.name, "queue")
    k_user = _by(samples, MT.KERNEL_QUEUE_USER_DROPPED.name, "queue")
    hits = _by(samples, MT.RULE_APPLIED.name, "rule")
    offloads: dict[str, dict[str, bool]] = {}
    for labels, value in _series(samples, MT.OFFLOAD_ENABLED.name):
        offloads.setdefault(labels.get("port", ""), {})[labels.get("feature", "")] = value == 1
    queues = []
    for w in workers:
        q = str(w.queue)
        kernel = None
        if q in waiting:
            kernel = {"waiting": int(waiting[q]), "dropped": int(k_dropped.get(q, 0)),
                      "user_dropped": int(k_user.get(q, 0))}
        queues.append({
            "queue": w.queue, "worker_pid": w.pid,
            "heartbeat_age": None if w.heartbeat_age is None else round(w.heartbeat_age, 3),
            "packets_seen": int(seen.get(q, 0)), "packets_modified": int(modified.get(q, 0)),
            "packets_dropped": int(dropped.get(q, 0)), "flows_with_offsets": int(flows.get(q, 0)),
            "worker_restarts": int(restarts.get(q, 0)), "kernel": kernel,
        })
    return {
        "version": __version__,
        "pid": os.getpid() if pid is None else pid,
        "started": started,
        "uptime": round(now - started, 3),
        "config": os.path.abspath(config_path),
        "control_socket": control_socket,
        "metrics": f"http://{config.metrics.listen}/metrics",
        "last_reload": {"time": reload.time, "ok": reload.ok, "error": reload.error,
                        "reloads": reload.reloads},
        "bridges": [
            {"name": b.name, "ports": [{"name": p, "offloads": offloads.get(p, {})}
                                       for p in b.ports]}
            for b in config.bridges
        ],
        "queues": queues,
        "flows_with_offsets": sum(q["flows_with_offsets"] for q in queues),
        "rule_files": rule_files,
        "rules": [{"name": name, "file": path, "line": line, "hits": int(hits.get(name, 0))}
                  for name, path, line in rules],
        "trace_clients": trace_clients,
    }


# -- the two commands' text output ---------------------------------------------------------------
def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if d or h:
        parts.append(f"{h}h")
    if d or h or m:
        parts.append(f"{m}m")
    parts.append(f"{s}s")
    return " ".join(parts)


def _when(stamp: float, now: float) -> str:
    return (time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(stamp))
            + f" ({_duration(max(0.0, now - stamp))} ago)")


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Columns padded to their widest cell; ``right``: the columns aligned right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = set(right)
    return ["  ".join((c.rjust(w) if i in align else c.ljust(w))
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def format_status(status: Mapping[str, Any], now: float | None = None) -> str:
    """``nfrewrite status`` for a person (``--json`` prints the object itself)."""
    now = time.time() if now is None else now
    reload = status["last_reload"]
    result = "ok" if reload["ok"] else f"FAILED: {reload['error'] or 'see the daemon log'}"
    lines = [
        f"nfrewrite {status['version']} (pid {status['pid']}), up {_duration(status['uptime'])}",
        f"config       {status['config']}",
        f"last reload  {_when(reload['time'], now)}: {result}"
        + (f"; {reload['reloads']} reload(s) since start" if reload["reloads"] else ""),
        f"metrics      {status['metrics']}",
    ]
    for bridge in status["bridges"]:
        ports = []
        for port in bridge["ports"]:
            feats = " ".join(f"{k} {'on' if v else 'off'}" for k, v in port["offloads"].items())
            ports.append(f"{port['name']} ({feats})" if feats else port["name"])
        lines.append(f"bridge       {bridge['name']}: {', '.join(ports)}")
    if not status["bridges"]:
        lines.append("bridge       none (routed traffic, FORWARD)")
    lines.append("")
    rows = [["queue", "worker", "seen", "modified", "dropped", "backlog", "kernel drops",
             "flows w/ offset"]]
    for q in status["queues"]:
        k = q["kernel"]  # kernel drops: queue full + socket buffer full (0 with fail-open)
        rows.append([
            str(q["queue"]), str(q["worker_pid"] or "-"), str(q["packets_seen"]),
            str(q["packets_modified"]), str(q["packets_dropped"]),
            str(k["waiting"]) if k else "unbound",
            str(k["dropped"] + k["user_dropped"]) if k else "-",
            str(q["flows_with_offsets"]),
        ])
    lines += _table(rows, right=range(2, 8))
    rules = status["rules"]
    lines += ["", f"rules in force: {len(rules)} in {status['rule_files']} file(s)"]
    if rules:
        rows = [["hits", "rule", "defined at"]]
        rows += [[str(r["hits"]), r["name"], f"{r['file']}:{r['line']}"] for r in rules]
        lines += ["  " + line for line in _table(rows, right=[0])]
    return "\n".join(map(printable, lines))  # names and paths as the config gave them


def printable(text: object) -> str:
    """``text`` for a terminal or a log line: every character that is not printable (an escape
    sequence, a newline, an undecodable byte) shown as its Python escape."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _endpoint(addr: Any, port: Any) -> str:
    if addr is None:
        return "?"
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def format_trace(record: Mapping[str, Any]) -> str:
    """One ``trace`` line: time, queue, ``src:port -> dst:port``, rules, length before -> after
    (or ``dropped``), and the sequence offsets in force (``seq+N``: added to this packet's
    sequence numbers; ``ack-N``: to its acknowledgements) or ``offset none``."""
    stamp = float(record.get("time", 0.0))
    clock = time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1e6):06d}"
    after = "dropped" if record.get("verdict") == "drop" else str(record.get("len_after"))
    off = record.get("offset")
    offset = f"seq{off['seq']:+d} ack{-off['ack']:+d}" if off else "offset none"
    return printable(f"{clock} q{record.get('queue')} "
                     f"{_endpoint(record.get('src'), record.get('sport'))} -> "
                     f"{_endpoint(record.get('dst'), record.get('dport'))} "
                     f"{','.join(record.get('rules', []))} len {record.get('len_before')} -> "
                     f"{after} {offset}")


# -- the client ------------------------------------------------------------------------------------
def connect(path: str, timeout: float = REPLY_TIMEOUT, note: str | None = None,
            busy_wait: float = BUSY_WAIT) -> socket.socket:
    """A connection to the daemon's socket; :class:`NotRunning`, :class:`NoAccess` or
    :class:`Busy` if none.

    A UNIX socket whose listen backlog is full refuses a connection at once with EAGAIN (the
    daemon runs, but as many connections as its backlog holds wait to be accepted): that is
    retried for ``busy_wait`` seconds, then :class:`Busy`."""
    deadline = time.monotonic() + busy_wait
    pause = 0.01
    while True:
        try:
            return _connect_once(path, timeout, note)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Busy(f"busy: {path} took no connection within {busy_wait:g} s (too many "
                           "waiting); try again") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.2)


def _connect_once(path: str, timeout: float, note: str | None) -> socket.socket:
    extra = f" ({note})" if note else ""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException as e:
        sock.close()
        if isinstance(e, BlockingIOError):  # the backlog is full: connect retries
            raise
        if isinstance(e, PermissionError):
            raise NoAccess(f"permission denied: {path} (the daemon's user and group, and root, "
                           "may use it)") from None
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            raise NotRunning(f"not running: no control socket at {path}{extra}") from None
        if isinstance(e, ConnectionRefusedError):
            raise NotRunning(f"not running: nothing answers on {path} (a socket left by a "
                             f"stopped daemon){extra}") from None
        if isinstance(e, TimeoutError):
            raise NotRunning(f"not answering: {path} took no connection within "
                             f"{timeout:g} s{extra}") from None
        if isinstance(e, OSError):
            raise NotRunning(f"cannot connect to {path}: {e.strerror or e}{extra}") from None
        raise
    return sock


class Lines:
    """The messages of one connection, read as they arrive (``timeout`` None: wait forever)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def next(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None at the end of the connection; TimeoutError if none came."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return decode(line)


def send_request(sock: socket.socket, request: Mapping[str, Any]) -> None:
    """Send the request line; a daemon that refuses at once (busy) may have closed already,
    and its one line is then read as the answer."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(encode(request))


def ask_status(path: str, timeout: float = REPLY_TIMEOUT, note: str | None = None
               ) -> dict[str, Any]:
    """The daemon's status (:class:`NotRunning`/:class:`NoAccess`/:class:`ControlError`)."""
    with connect(path, timeout, note) as sock:
        try:
            send_request(sock, status_request())
            answer = Lines(sock).next(timeout)
        except TimeoutError:
            raise NotRunning(f"not answering: no status from {path} within {timeout:g} s") \
                from None
        except (ConnectionError, ValueError) as e:
            raise NotRunning(f"no answer from {path}: {e}") from None
    if answer is None:
        raise NotRunning(f"no answer from {path}: the connection closed")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "refused")))
    status: dict[str, Any] = answer["status"]
    return status


# -- the server ------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Client:
    sock: socket.socket
    accepted: float
    inbuf: bytes = b""
    out: bytearray = field(default_factory=bytearray)
    kind: str = ""  # "" (no request yet), "status", "trace"
    closing: bool = False  # close once ``out`` is written
    deadline: float = 0.0  # monotonic time by which the request (or a status answer) must be done
    rules: frozenset[str] | None = None  # trace: the rules asked for (None: every one)
    count: int | None = None
    sent: int = 0
    dropped: int = 0
    told_dropped: int = 0
    told_at: float = 0.0
    version: int = 0  # trace: the spec version it waits for
    ready: bool = False
    late: set[int] = field(default_factory=set)  # queues not confirmed when "ready" was sent
    events: int = 0  # what the selector watches now
    stalled_since: float = 0.0  # monotonic time since when ``out`` waits and nothing was taken


@dataclass(eq=False)
class _Source:
    queue: int
    sock: socket.socket
    acked: int = -1  # the last spec version the worker confirmed
    dropped: int = 0  # the worker's drop count as last told (since ``acked``)


_LISTENER = "listener"
_WAKE = "wake"


class ControlServer:
    """The daemon's control socket and the thread that serves it (see the module doc).

    ``status()``: the status object (called in the server's thread); ``rules()``: the names of
    the rules in force (to check a trace's ``--rule``).
    """

    def __init__(
        self,
        path: str,
        status: Callable[[], dict[str, Any]],
        rules: Callable[[], Sequence[str]],
        *,
        max_clients: int = MAX_CLIENTS,
        request_timeout: float = REQUEST_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._status = status
        self._rules = rules
        self.max_clients = max_clients
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.stalled = 0  # trace clients dropped for not reading
        self._last_surprise = ""
        self._log = log or (lambda line: print(f"nfrewrite: {line}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._pending: list[_Source] = []  # attached by the main thread, not yet in the selector
        self._clients: dict[socket.socket, _Client] = {}
        self._sources: dict[int, _Source] = {}
        self._spec: dict[str, Any] | None = None
        self._version = 0
        self._stop = False
        self._stop_reason = "stopping"
        self._sock = bind_socket(path)
        try:
            st = os.stat(path)
            self._bound = (st.st_dev, st.st_ino)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._sel = selectors.DefaultSelector()
        self._sock.setblocking(False)
        self._sel.register(self._sock, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))
        self._thread = threading.Thread(target=self._run, name="nfrewrite-control", daemon=True)
        self._thread.start()

    # -- the supervisor's side (main thread) ------------------------------------------------
    def attach(self, queue: int, sock: socket.socket) -> None:
        """A (new) worker's trace source for ``queue``; it replaces the previous one."""
        with self._lock:
            self._pending.append(_Source(queue, sock))
        self._wake()

    def trace_spec(self) -> dict[str, Any] | None:
        """What every worker should trace now: None, or ``{"version", "rules"}``."""
        return self._spec

    def counts(self) -> tuple[int, int]:
        """(connections, of which trace clients)."""
        with self._lock:
            clients = list(self._clients.values())
        return len(clients), sum(1 for c in clients if c.kind == "trace")

    def close(self, reason: str = "stopping") -> None:
        """Tell trace clients ``reason``, close every connection, remove the socket file."""
        if self._stop:
            return
        self._stop_reason = reason
        self._stop = True
        self._wake()
        self._thread.join(timeout=CLOSE_FLUSH + 2.0)
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.monotonic() + TICK
        try:
            while not self._stop:
                try:
                    self._step(max(0.0, next_tick - time.monotonic()))
                except Exception as e:  # noqa: BLE001 - the loop must outlive any surprise
                    self._surprise(e)
                now = time.monotonic()
                if now >= next_tick:  # also when every step fails: deadlines, "ready"
                    next_tick = now + TICK
                    try:
                        self._housekeeping(now)
                    except Exception as e:  # noqa: BLE001
                        self._surprise(e)
        finally:
            self._shutdown()

    def _surprise(self, e: Exception) -> None:
        """An exception in the loop: logged (the same one not again in a row), and a pause so
        that one that repeats does not spin."""
        text = f"control socket: {type(e).__name__}: {e}"
        if text != self._last_surprise:
            self._last_surprise = text
            self._log(text)
        time.sleep(TICK)

    def _step(self, timeout: float) -> None:
        for key, mask in self._sel.select(timeout):
            data = key.data
            if data == _LISTENER:
                self._accept()
            elif data == _WAKE:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
                self._take_pending()
            elif isinstance(data, _Source):
                self._read_source(data)
            elif isinstance(data, _Client):
                if mask & selectors.EVENT_WRITE:
                    self._flush(data)
                if mask & selectors.EVENT_READ and data.sock in self._clients:
                    self._read_client(data)

    def _take_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for source in pending:
            old = self._sources.pop(source.queue, None)
            if old is not None:
                self._drop_source(old)
            self._sources[source.queue] = source
            self._sel.register(source.sock, selectors.EVENT_READ, source)

    def _drop_source(self, source: _Source) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(source.sock)
        with contextlib.suppress(OSError):
            source.sock.close()
        if self._sources.get(source.queue) is source:
            del self._sources[source.queue]

    def _accept(self) -> None:
        for _ in range(self.max_clients):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)  # out of descriptors: do not spin on the listening socket
                return
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                with contextlib.suppress(OSError):
                    sock.send(encode({"ok": False, "error": f"busy: {self.max_clients} "
                                      "connections already; try again"}))
                sock.close()
                continue
            now = time.monotonic()
            client = _Client(sock, now, deadline=now + self.request_timeout)
            with self._lock:
                self._clients[sock] = client
            client.events = selectors.EVENT_READ
            self._sel.register(sock, client.events, client)

    def _close_client(self, client: _Client) -> None:
        with self._lock:
            self._clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        with contextlib.suppress(OSError):
            client.sock.close()
        if client.kind == "trace" and not self._stop:  # stopping: the spec goes at the end
            self._update_spec()

    def _read_client(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away (a trace ends so)
            self._close_client(client)
            return
        if client.kind:  # nothing more is expected after the request
            return
        client.inbuf += data
        if b"\n" not in client.inbuf:
            if len(client.inbuf) >= MAX_REQUEST:
                self._refuse(client, f"request longer than {MAX_REQUEST} bytes")
            return
        line = client.inbuf.partition(b"\n")[0]
        client.inbuf = b""
        if nesting(line) > MAX_DEPTH:  # before the parser, which recurses
            self._refuse(client, f"the request is nested deeper than {MAX_DEPTH} levels")
            return
        try:
            request = decode(line)
        except ValueError:
            self._refuse(client, "the request is not a JSON object on one line")
            return
        cmd = request.get("cmd")
        if cmd == "status":
            self._answer_status(client)
        elif cmd == "trace":
            self._start_trace(client, request)
        else:
            self._refuse(client, f"unknown command {cmd!r} (status, trace)")

    def _refuse(self, client: _Client, error: str) -> None:
        client.kind = client.kind or "refused"
        self._send(client, {"ok": False, "error": error}, force=True)
        client.closing = True
        client.deadline = time.monotonic() + REPLY_TIMEOUT
        self._flush(client)

    def _answer_status(self, client: _Client) -> None:
        client.kind = "status"
        try:
            status = self._status()
        except Exception as e:  # noqa: BLE001 - told to the client, the daemon goes on
            self._refuse(client, f"status failed: {type(e).__name__}: {e}")
            return
        status["trace_clients"] = sum(1 for c in self._clients.values() if c.kind == "trace")
        self._send(client, {"ok": True, "status": status}, force=True)
        client.closing = True
        client.deadline = time.monotonic() + REPLY_TIMEOUT
        self._flush(client)

    def _start_trace(self, client: _Client, request: Mapping[str, Any]) -> None:
        rules = request.get("rules")
        count = request.get("count")
        if rules is not None and (not isinstance(rules, list)
                                  or not all(isinstance(r, str) for r in rules)):
            self._refuse(client, "rules: want a list of rule names or null")
            return
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            self._refuse(client, "count: want a positive integer or null")
            return
        if rules:
            in_force = list(self._rules())
            known = set(in_force)  # once: not once per name asked
            unknown = [r for r in rules if r not in known]
            if unknown:
                shown = ", ".join(in_force[:10]) + (" ..." if len(in_force) > 10 else "")
                self._refuse(client, f"no rule named {', '.join(map(repr, unknown))} in force "
                                     f"(rules: {shown or 'none'})")
                return
        if len(self._tracers()) >= MAX_TRACES:
            self._refuse(client, f"busy: {MAX_TRACES} traces already; try again")
            return
        client.kind = "trace"
        client.rules = frozenset(rules) if rules else None
        client.count = count
        client.deadline = 0.0
        client.accepted = time.monotonic()  # from now on: how long it has waited to be ready
        self._update_spec()
        client.version = self._version
        self._send(client, {"ok": True, "trace": {
            "rules": sorted(client.rules) if client.rules is not None else None, "count": count,
            "queues": sorted(self._sources)}}, force=True)
        self._flush(client)
        self._check_ready(client, time.monotonic())

    def _update_spec(self) -> None:
        """Recompute what the workers should trace; a change gets a new version."""
        tracers = [c for c in self._clients.values() if c.kind == "trace" and not c.closing]
        spec: dict[str, Any] | None
        if not tracers:
            spec = None
        else:
            wanted: set[str] | None = set()
            for c in tracers:
                if c.rules is None:
                    wanted = None
                    break
                assert wanted is not None
                wanted |= c.rules
            spec = {"rules": sorted(wanted) if wanted is not None else None}
        current = self._spec
        if (current is None) != (spec is None) or (
                spec is not None and current is not None and spec["rules"] != current["rules"]):
            self._version += 1
            if spec is not None:
                spec["version"] = self._version
            self._spec = spec  # read by the main loop: one assignment

    def _read_source(self, source: _Source) -> None:
        for _ in range(MAX_SOURCE_READS):
            try:
                data = source.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker is gone
                self._drop_source(source)
                return
            try:
                message = json.loads(data)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "v" in message:
                source.acked = int(message["v"])
                source.dropped = 0
                now = time.monotonic()
                for c in self._tracers():
                    self._check_ready(c, now)
                    if source.queue in c.late and source.acked >= c.version:
                        c.late.discard(source.queue)
                        self._send(c, {"confirmed": {"queues": [source.queue]}}, force=True)
                        self._flush(c)
            if "d" in message:
                told = int(message["d"])
                if told > source.dropped:
                    for c in self._tracers():
                        c.dropped += told - source.dropped
                    source.dropped = told
            record = message.get("p")
            if isinstance(record, dict):
                self._forward(record)
            if "e" in message:  # the worker's tracing failed: at most once per spec
                for c in self._tracers():
                    self._send(c, {"warning": str(message["e"])}, force=True)
                    self._flush(c)

    def _tracers(self) -> list[_Client]:
        return [c for c in self._clients.values() if c.kind == "trace" and not c.closing]

    def _forward(self, record: dict[str, Any]) -> None:
        names = record.get("rules") or []
        line: bytes | None = None
        for c in self._tracers():
            if c.rules is not None and c.rules.isdisjoint(names):
                continue
            if len(c.out) >= MAX_TRACE_BUFFER:
                c.dropped += 1
                continue
            if line is None:
                line = encode({"packet": record})
            c.out += line
            c.sent += 1
            if c.count is not None and c.sent >= c.count:
                self._end_trace(c, "count")
            else:
                self._flush(c)

    def _end_trace(self, client: _Client, reason: str) -> None:
        self._send(client, {"end": reason, "dropped": client.dropped, "packets": client.sent},
                   force=True)
        client.closing = True
        client.deadline = time.monotonic() + REPLY_TIMEOUT
        self._update_spec()
        self._flush(client)

    def _check_ready(self, client: _Client, now: float) -> None:
        if client.ready or client.kind != "trace" or client.closing:
            return
        unconfirmed = sorted(q for q, s in self._sources.items() if s.acked < client.version)
        waited = now - client.accepted
        if unconfirmed and waited < READY_TIMEOUT:
            return
        client.ready = True
        client.late = set(unconfirmed)  # each told when it confirms after all
        self._send(client, {"ready": {"queues": sorted(self._sources),
                                      "unconfirmed": unconfirmed}}, force=True)
        self._flush(client)

    def _send(self, client: _Client, message: Mapping[str, Any], *, force: bool = False) -> None:
        """Queue a message for ``client``; beyond :data:`MAX_TRACE_BUFFER` only if ``force``
        (answers and the few control lines), and never beyond :data:`MAX_TRACE_SLACK` more: a
        client that lets that much wait is dropped."""
        if force or len(client.out) < MAX_TRACE_BUFFER:
            if len(client.out) >= MAX_TRACE_BUFFER + MAX_TRACE_SLACK:
                self._drop_stalled(client, f"let {len(client.out)} bytes wait")
                return
            client.out += encode(message)

    def _drop_stalled(self, client: _Client, why: str) -> None:
        """Close a trace client that does not read (its lines dropped are counted in the log)."""
        self.stalled += 1
        self._log(f"control socket: a trace client {why}: closed ({client.dropped} trace lines "
                  f"dropped for it, {client.sent} sent)")
        self._close_client(client)

    def _flush(self, client: _Client) -> None:
        if client.sock not in self._clients:
            return
        took = False
        while client.out:
            try:
                n = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # the client went away
                self._close_client(client)
                return
            del client.out[:n]
            took = True
        if not client.out:
            client.stalled_since = 0.0
            if client.closing:
                self._close_client(client)
                return
        elif took or not client.stalled_since:
            client.stalled_since = time.monotonic()
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        if wanted != client.events:
            client.events = wanted
            self._sel.modify(client.sock, wanted, client)

    def _housekeeping(self, now: float) -> None:
        for c in list(self._clients.values()):
            if c.deadline and now > c.deadline:  # no request, or an answer not taken in time
                self._close_client(c)
                continue
            if c.kind != "trace" or c.closing:
                continue
            if c.stalled_since and now - c.stalled_since > self.stall_timeout:
                self._drop_stalled(c, f"read nothing for {self.stall_timeout:g} s")
                continue
            self._check_ready(c, now)
            if (c.dropped != c.told_dropped and now - c.told_at >= DROP_REPORT_INTERVAL
                    and len(c.out) < MAX_TRACE_BUFFER):  # else told when it reads again
                c.told_dropped, c.told_at = c.dropped, now
                self._send(c, {"dropped": c.dropped})
                self._flush(c)

    def _shutdown(self) -> None:
        """The thread's end: last words to trace clients, then every descriptor closed."""
        for c in self._tracers():
            self._send(c, {"end": self._stop_reason, "dropped": c.dropped, "packets": c.sent},
                       force=True)
            c.closing = True
        deadline = time.monotonic() + CLOSE_FLUSH
        while time.monotonic() < deadline and any(c.out for c in self._clients.values()):
            for c in list(self._clients.values()):
                self._flush(c)
            if any(c.out for c in self._clients.values()):
                time.sleep(0.01)
        for c in list(self._clients.values()):
            self._close_client(c)
        for s in list(self._sources.values()):
            self._drop_source(s)
        with self._lock:
            pending, self._pending = self._pending, []
        for s in pending:
            with contextlib.suppress(OSError):
                s.sock.close()
        self._spec = None
        self._sel.close()
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def forget_in_child(self) -> None:
        """In a forked child: close its copies of our descriptors (no lock: a thread of the
        parent may have held it at the fork, and in the child no other thread runs)."""
        self._stop = True
        socks = [self._sock, *self._clients, *(s.sock for s in self._sources.values()),
                 *(s.sock for s in self._pending)]
        for sock in socks:
            with contextlib.suppress(OSError):
                fd = sock.detach()
                if fd >= 0:
                    os.close(fd)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(Exception):
            self._sel.close()


def _forget_in_child(ref: weakref.ref[ControlServer]) -> None:
    server = ref()
    if server is not None and not server._stop:
        server.forget_in_child()


def make_dirs(directory: str, mode: int = DIR_MODE) -> None:
    """Create ``directory`` and its missing parents, each made ``mode`` whatever the umask
    (set on the directory opened without following a link: one swapped in after ``mkdir`` is
    an error, never chmod'ed). Directories that exist are left as they are."""
    missing = []
    d = directory
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def bind_socket(path: str) -> socket.socket:
    """A listening UNIX socket at ``path``, mode 0660; a stale socket file there is replaced.

    Refuses (:class:`ControlError`) when the path is something other than a socket, or when
    something answers on it (another daemon). The socket is born 0660 (bound under umask
    0o117), never chmod'ed by name: whoever may write the directory could put a link there
    between the bind and a chmod, which would then change the mode of the link's target."""
    parent = os.path.dirname(path) or "."
    try:
        make_dirs(parent)
    except OSError as e:
        raise ControlError(f"control socket {path}: cannot create {parent}: {e.strerror}") from e
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror}") from e
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {path}: something else is there (not a socket);"
                               " remove it or set [control] socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by a daemon that was killed
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from e
        else:
            raise ControlError(f"control socket {path}: another nfrewrite answers there; "
                               "set [control] socket to another path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        old = os.umask(0o777 & ~SOCKET_MODE)  # born 0660, whatever the daemon's umask
        try:
            sock.bind(path)
            bound = True
        finally:
            os.umask(old)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise ControlError(f"control socket {path}: {e.strerror or e}") from e
    return sock
