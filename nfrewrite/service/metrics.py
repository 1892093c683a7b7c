"""Prometheus metrics: one table of metrics, a per-packet hook, a kernel-queue collector, /metrics.

What it is for
==============
Counting what the appliance does (packets seen, changed, dropped, passed as "not ours"; rewrites
per rule; time per packet; reloads; offloads; sequence-adjusted flows) and serving it over HTTP in
the Prometheus text format, with the right totals when the daemon runs one worker process per
NFQUEUE number plus a supervisor.  It must not: import ``prometheus_client`` at import time (see
below), label anything by address or port (every label value comes from a fixed set, the
configured queues and ports, or rule names), format label values per packet, or raise at scrape
time because a /proc file is missing or odd.

Theory of operation
===================
Rule 1: every metric is defined in :data:`METRICS`, in this file, and nowhere else.  Each entry
(:class:`MetricSpec`) gives the name, type, help, labels and, for gauges, how values from several
processes combine.  :class:`Metrics` turns the table into ``prometheus_client`` objects, once per
process; :class:`WorkerMetrics` (the per-packet side) and :class:`SupervisorMetrics` (reloads,
offloads, restarts, the scrape) are thin views over that one set.  There is no aggregator of our
own: the library adds the processes up.

Two modes, chosen by the library once per process, when ``prometheus_client`` is first imported:

* single-process (no ``PROMETHEUS_MULTIPROC_DIR``): values live in memory, and the scrape reads
  the :class:`Metrics` registry directly.  Unit tests and ``replay`` use this.
* multiprocess: the supervisor calls :func:`setup_multiprocess_dir` FIRST (before anything imports
  ``prometheus_client``; this module imports it lazily for that reason, and
  :func:`setup_multiprocess_dir` refuses to run if it was imported already).  It makes a fresh
  private (0700) directory and exports its path in the environment, so worker processes started
  afterwards (spawned or forked) inherit it.  Every process writes its values to its own
  memory-mapped files there (``<type>_<pid>.db``); the scrape, in the supervisor, reads all files
  with the library's ``MultiProcessCollector``: counters and histograms are summed over every pid
  that ever wrote (so totals survive a worker restart), gauges combine as their spec says
  (``livesum``: sum over live processes; ``mostrecent``: the last value set by anyone; ``livemax``).
  When a worker dies the supervisor calls :meth:`SupervisorMetrics.worker_died` (the library's
  ``mark_process_dead``), which drops that pid's ``live*`` gauge files; on stop,
  :func:`cleanup_multiprocess_dir` removes the directory.  Files of dead workers' counters stay
  (one set per restart) because their counts are part of the totals.  A run killed before that
  (``kill -9``, the watchdog, the OOM killer) leaves its directory behind, and the runtime
  directory is kept across restarts (for the sysctl record), so the name carries the creating
  pid (``nfrewrite-metrics-<pid>-XXXXXXXX``) and :func:`setup_multiprocess_dir`, given a parent,
  first removes the directories there whose pid is no longer a live process
  (:func:`remove_stale_multiprocess_dirs`).

Who writes what.  A worker owns the series labelled with its queue number (``queue`` = the
NFQUEUE number as a string) and the per-rule counters (summed over workers, no queue label); the
supervisor owns rules loaded, reload result and time, offloads and worker restarts.  Gauges the
supervisor sets use ``mostrecent``, so a worker (whose copy of them stays at the initial value,
time 0) can never hide them.  ``build_info`` is set by every process (``livemax``).

Kernel queue figures (waiting, dropped, user-dropped) are not counted by us: the
:class:`KernelQueueCollector` reads ``/proc/net/netfilter/nfnetlink_queue`` at scrape time, only
for our queue numbers.  The file shows the reading process's network namespace (the daemon runs in
the appliance's).  A queue that is not bound has no line, hence no sample.  Note: with
``NFQA_CFG_F_FAIL_OPEN`` (which the queue uses) the kernel accepts, uncounted, what it would
otherwise drop for a full queue or a full socket buffer; ``waiting`` is then the warning sign.

The hot path.  The queue loop calls :meth:`WorkerMetrics.observe` once per packet read from the
queue (a packet whose handling raised is passed on unchanged and observed as ``engine.PASS``;
:meth:`WorkerMetrics.error` counts the exception).  All label children are resolved when the
worker starts (reasons, error kinds) or when rules load (rule names), so a packet costs a few
bound-method calls and at most one dict lookup per rule that fired.

The HTTP server.  Anyone who can reach the port can open connections, so what one costs is
bounded, and the daemon's descriptors for reloads and worker restarts stay free.  One loop thread
accepts (listen backlog :data:`LISTEN_BACKLOG`) and reads each connection's request line and
headers itself, without a thread, up to the blank line (at most :data:`MAX_HEAD` bytes).  At most
:data:`MAX_WAITING` connections wait so, or with a whole request for a handler: when one more
comes, the oldest incomplete one is closed (else the oldest unserved one).  A connection that
sends nothing for :data:`IDLE_TIMEOUT`, or has not sent a whole request head within
:data:`REQUEST_TIMEOUT` of its accept, is closed.  At most :data:`MAX_HANDLERS` requests are served
at once, each by a short-lived thread that answers the one request (no keep-alive) and closes;
each of its writes may block for :data:`IDLE_TIMEOUT` at most, and the answer must be written
within :data:`RESPONSE_TIMEOUT` of the accept (the loop shuts the socket of a late one).  So the
server holds at most ``1 + MAX_WAITING + MAX_HANDLERS * FDS_PER_REQUEST`` descriptors and
``MAX_HANDLERS`` threads besides its own; :func:`serve` lowers both bounds (not below 1) if that
would not leave :data:`FD_RESERVE` free under the soft ``RLIMIT_NOFILE``.  A flood of new
connections can delay scrapes (each pushes out the oldest waiting one) but not exhaust
descriptors; slow or stalled requests never hold a handler.  A process forked while the server
runs (a worker) closes its copies of the server's sockets at once, so it keeps no client's
connection, nor the port, open.

API
===
``setup_multiprocess_dir(parent=None) -> str``; ``cleanup_multiprocess_dir(path)``;
``remove_stale_multiprocess_dirs(parent) -> list[str]``;
``default_metrics() -> Metrics`` (the process's one set; ``Metrics()`` for a private set in
single-process mode, e.g. a test); ``WorkerMetrics(queue_num, rules=(), metrics=None)`` with
``.set_rules(names)``, ``.observe(result, seconds)``, ``.error(exc_or_name)``,
``.set_flows(active, evicted_total)``; ``SupervisorMetrics(queue_nums, ports=(), metrics=None,
proc_path=NFQUEUE_PROC)`` with ``.rules_loaded(n)``, ``.reload(ok, when)``,
``.offloads(port, features)``, ``.worker_restarted(queue_num)``, ``.worker_died(pid)``,
``.registry`` (what to scrape); ``serve(listen, registry, *, limits=None,
idle_timeout=IDLE_TIMEOUT) -> Server``
(``.address``, ``.url``, ``.limits``, ``.counts()``, ``.close()``); ``connection_limits(reserve)``;
``parse_listen(listen)``; ``read_queue_stats(path)``;
``KernelQueueCollector(queue_nums, path)``; ``error_kind(exc)``; the specs (``METRICS``,
``PACKETS_SEEN`` ...), ``ERROR_KINDS``, ``TIME_BUCKETS``, ``DEFAULT_LISTEN``, ``ENV``.

How the daemon uses it::

    path = metrics.setup_multiprocess_dir()        # first thing: before prometheus_client loads
    sup = metrics.SupervisorMetrics(queues, ports=bridge_ports)
    server = metrics.serve(cfg.metrics.listen, sup.registry)
    sup.rules_loaded(len(ruleset)); sup.reload(True, time.time()); sup.offloads("eth1", {...})
    ...start workers; in each:  wm = metrics.WorkerMetrics(queue_num, rules=names)
    ...per packet:  t = perf_counter(); result = engine.process(...);
                    wm.observe(result, perf_counter() - t)
    ...now and then: wm.set_flows(flows.flows_active, flows.stats())
    ...a worker died: sup.worker_died(pid); restarted: sup.worker_restarted(queue_num)
    server.close(); metrics.cleanup_multiprocess_dir(path)   # on stop, in this order

``replay`` (one process, no environment variable): ``m = Metrics()``,
``WorkerMetrics(0, metrics=m)``, and ``prometheus_client.generate_latest(m.registry)``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import platform
import re
import resource
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from nfrewrite import __version__
from nfrewrite.core.engine import DROP
from nfrewrite.core.packet import REASONS

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from nfrewrite.core.engine import Result

ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROC_PREFIX = "nfrewrite-metrics-"  # then the creating pid, "-", mkdtemp's suffix
_STALE_NAME = re.compile(re.escape(MULTIPROC_PREFIX) + r"([1-9][0-9]*)-[a-z0-9_]+")
NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
DEFAULT_LISTEN = "127.0.0.1:9640"

# The HTTP server's bounds (see "The HTTP server" above).
MAX_WAITING = 64  # accepted connections whose request is incomplete or not served yet
MAX_HANDLERS = 4  # requests served at once, one thread each
LISTEN_BACKLOG = 64  # connections the kernel holds until the loop accepts them
IDLE_TIMEOUT = 2.0  # seconds a connection may stay silent (and a read or write may block)
REQUEST_TIMEOUT = 5.0  # seconds from accept until the request line and headers are read
MAX_HEAD = 16384  # bytes of request line and headers the loop reads before a handler takes over
RESPONSE_TIMEOUT = 15.0  # seconds from accept until the response is written
FDS_PER_REQUEST = 3  # the connection, plus the files a scrape opens (one value file at a time)
FD_RESERVE = 64  # descriptors the limits leave to the rest of the daemon (workers, reloads)

#: Per-packet processing time buckets (seconds): 1-2-5 steps from 2 us to 10 ms.
TIME_BUCKETS: tuple[float, ...] = (
    2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2,
)  # fmt: skip

#: Handler error kinds: the first class in an exception's MRO named here, else "other".
ERROR_KINDS: tuple[str, ...] = (
    "AssertionError",
    "AttributeError",
    "IndexError",
    "KeyError",
    "MemoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "RecursionError",
    "RuntimeError",
    "TypeError",
    "ValueError",
    "other",
)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: full name, type, help, label names; for gauges how processes combine."""

    name: str
    type: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    mode: str = ""  # gauge multiprocess_mode
    buckets: tuple[float, ...] = ()


# fmt: off
PACKETS_SEEN = MetricSpec(
    "nfrewrite_packets_seen_total", "counter",
    "Packets read from the NFQUEUE.", ("queue",))
PACKETS_MODIFIED = MetricSpec(
    "nfrewrite_packets_modified_total", "counter",
    "Packets accepted with rewritten bytes.", ("queue",))
PACKETS_DROPPED = MetricSpec(
    "nfrewrite_packets_dropped_total", "counter",
    'Packets dropped by a rule with verdict = "drop".', ("queue",))
PACKETS_UNPARSED = MetricSpec(
    "nfrewrite_packets_unparsed_total", "counter",
    "Packets accepted untouched because they are not a whole, first, well-formed TCP segment, "
    "by reason.", ("queue", "reason"))
HANDLER_ERRORS = MetricSpec(
    "nfrewrite_handler_errors_total", "counter",
    "Exceptions while handling a packet (the packet was accepted unchanged), by exception class.",
    ("queue", "kind"))
PROCESSING_TIME = MetricSpec(
    "nfrewrite_packet_processing_seconds", "histogram",
    "Time to handle one packet in the worker (parse, match, rewrite), in seconds.",
    ("queue",), buckets=TIME_BUCKETS)
RULE_APPLIED = MetricSpec(
    "nfrewrite_rule_applied_total", "counter",
    "Packets a rule changed or dropped (a packet that several rules edit counts for each).",
    ("rule",))
SEQADJ_FLOWS = MetricSpec(
    "nfrewrite_seqadj_flows", "gauge",
    "TCP flows currently carrying a sequence offset (length-changing edits).",
    ("queue",), mode="livesum")
SEQADJ_EVICTIONS = MetricSpec(
    "nfrewrite_seqadj_flow_evictions_total", "counter",
    "Flows with a sequence offset evicted because the flow table was full.", ("queue",))
SEQADJ_REFUSED = MetricSpec(
    "nfrewrite_seqadj_edits_refused_total", "counter",
    "Length-changing edits not made because the flow table's memory budget ([flows] memory) "
    "was used up (their bytes passed unedited).", ("queue",))
SEQADJ_MEMORY = MetricSpec(
    "nfrewrite_seqadj_memory_bytes", "gauge",
    "Estimated bytes the sequence records hold (bounded by [flows] memory per worker).",
    ("queue",), mode="livesum")
SEQADJ_CUTS = MetricSpec(
    "nfrewrite_seqadj_segments_cut_total", "counter",
    "Segments cut because edits grew them past the MTU (or a super-packet past 65,531 bytes); "
    "the sender retransmits each cut's tail.", ("queue",))
RULES_LOADED = MetricSpec(
    "nfrewrite_rules_loaded", "gauge",
    "Rules in the rule set in force.", mode="mostrecent")
RELOAD_SUCCESSFUL = MetricSpec(
    "nfrewrite_last_reload_successful", "gauge",
    "1 if the last load or reload of config and rules succeeded, else 0.", mode="mostrecent")
RELOAD_TIMESTAMP = MetricSpec(
    "nfrewrite_last_reload_timestamp_seconds", "gauge",
    "Unix time of the last load or reload attempt, successful or not.", mode="mostrecent")
OFFLOAD_ENABLED = MetricSpec(
    "nfrewrite_offload_enabled", "gauge",
    "1 if an offload feature is on for a bridge port, else 0.", ("port", "feature"),
    mode="mostrecent")
WORKER_RESTARTS = MetricSpec(
    "nfrewrite_worker_restarts_total", "counter",
    "Worker processes restarted by the supervisor after they died.", ("queue",))
BUILD_INFO = MetricSpec(
    "nfrewrite_build_info", "gauge",
    "Always 1; the labels give the nfrewrite and Python versions.", ("version", "python"),
    mode="livemax")
# fmt: on

#: Rule 1: the whole set, in exposition order.
METRICS: tuple[MetricSpec, ...] = (
    PACKETS_SEEN,
    PACKETS_MODIFIED,
    PACKETS_DROPPED,
    PACKETS_UNPARSED,
    HANDLER_ERRORS,
    PROCESSING_TIME,
    RULE_APPLIED,
    SEQADJ_FLOWS,
    SEQADJ_EVICTIONS,
    SEQADJ_REFUSED,
    SEQADJ_CUTS,
    SEQADJ_MEMORY,
    RULES_LOADED,
    RELOAD_SUCCESSFUL,
    RELOAD_TIMESTAMP,
    OFFLOAD_ENABLED,
    WORKER_RESTARTS,
    BUILD_INFO,
)

#: Metrics the kernel-queue collector produces at scrape time (not in the per-process set).
KERNEL_QUEUE_WAITING = "nfrewrite_kernel_queue_waiting"
KERNEL_QUEUE_DROPPED = "nfrewrite_kernel_queue_dropped_total"
KERNEL_QUEUE_USER_DROPPED = "nfrewrite_kernel_queue_user_dropped_total"


# -- multiprocess directory ------------------------------------------------------------------------
def setup_multiprocess_dir(parent: str | None = None) -> str:
    """Create a fresh private directory for multiprocess values and export it in ``os.environ``.

    Call it in the supervisor before anything imports ``prometheus_client`` and before starting
    workers.  Returns the path.  Raises RuntimeError if it is too late (the library already chose
    in-memory values) or if a directory is already set.
    """
    if os.environ.get(ENV):
        raise RuntimeError(f"{ENV} is already set ({os.environ[ENV]}); one directory per run")
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError(
            "prometheus_client was imported before setup_multiprocess_dir(): its values would "
            "stay per-process; call setup_multiprocess_dir() first thing in the supervisor"
        )
    if parent is not None:
        remove_stale_multiprocess_dirs(parent)
    # the creating pid in the name tells a later run whether the directory is still in use
    path = tempfile.mkdtemp(prefix=f"{MULTIPROC_PREFIX}{os.getpid()}-", dir=parent)  # mode 0700
    os.environ[ENV] = path
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_multiprocess_dirs(parent: str) -> list[str]:
    """Remove the directories ``nfrewrite-metrics-<pid>-*`` in ``parent`` whose ``<pid>`` is not
    a live process (a run killed before its :func:`cleanup_multiprocess_dir`); return their paths.

    A directory of a live process (perhaps a daemon in another network namespace sharing
    ``parent``, or an unrelated process that got the pid again) is kept, as are names without a
    pid and directories holding anything but ``*.db`` files.  Errors are ignored: this is tidying.
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        found = _STALE_NAME.fullmatch(name)
        if found is None:
            continue
        pid = int(found[1])
        if pid != os.getpid() and _pid_alive(pid):  # our own pid: an earlier run's, reused
            continue
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        with contextlib.suppress(OSError):
            cleanup_multiprocess_dir(path)
            removed.append(path)
    return removed


def cleanup_multiprocess_dir(path: str) -> None:
    """Remove the value files (``*.db``) and the directory; unset the variable if it is ``path``.

    Only ``*.db`` files are removed: a directory holding anything else is left in place (OSError).
    """
    for name in glob.glob(os.path.join(glob.escape(path), "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)
    if os.environ.get(ENV) == path:
        del os.environ[ENV]


def _multiprocess_dir() -> str | None:
    """The directory if this process writes multiprocess values, else None (checked coherent)."""
    from prometheus_client import values

    path = os.environ.get(ENV) or None
    multi = bool(getattr(values.ValueClass, "_multiprocess", False))
    if multi != (path is not None):
        raise RuntimeError(
            f"prometheus_client chose {'multiprocess' if multi else 'in-memory'} values but "
            f"{ENV} is {'unset' if path is None else 'set'}: setup_multiprocess_dir() must run "
            "before prometheus_client is imported"
        )
    return path


# -- the set of metrics ----------------------------------------------------------------------------
class Metrics:
    """The metrics of :data:`METRICS` as ``prometheus_client`` objects: one set per process.

    Single-process mode: they are registered in :attr:`registry` (a new one per instance, so
    tests can make private sets).  Multiprocess mode: registered nowhere (the scrape reads the
    files), and only one set may exist per process, because two objects for the same series
    in one process would overwrite each other's file slot; use :func:`default_metrics`.
    """

    _multiprocess_pid: int | None = None

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        # ``_created`` series exist only in single-process mode; drop them so both modes expose
        # the same series (process-wide setting; this process is ours).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = _multiprocess_dir()
        if self.multiprocess_dir is not None:
            if Metrics._multiprocess_pid == os.getpid():
                raise RuntimeError("multiprocess mode: one Metrics per process, default_metrics()")
            Metrics._multiprocess_pid = os.getpid()
            self.registry: CollectorRegistry | None = None
        else:
            self.registry = CollectorRegistry()
        self._by_name: dict[str, Counter | Gauge | Histogram] = {}
        for spec in METRICS:
            made: Counter | Gauge | Histogram
            if spec.type == "counter":
                made = Counter(spec.name, spec.help, spec.labels, registry=self.registry)
            elif spec.type == "gauge":
                made = Gauge(
                    spec.name,
                    spec.help,
                    spec.labels,
                    registry=self.registry,
                    multiprocess_mode=spec.mode,  # type: ignore[arg-type]
                )
            elif spec.type == "histogram":
                made = Histogram(
                    spec.name, spec.help, spec.labels, registry=self.registry, buckets=spec.buckets
                )
            else:  # pragma: no cover - the table is static
                raise ValueError(f"{spec.name}: unknown type {spec.type!r}")
            self._by_name[spec.name] = made
        self.gauge(BUILD_INFO).labels(__version__, platform.python_version()).set(1)

    @property
    def multiprocess(self) -> bool:
        return self.multiprocess_dir is not None

    def counter(self, spec: MetricSpec) -> Counter:
        return cast("Counter", self._by_name[spec.name])

    def gauge(self, spec: MetricSpec) -> Gauge:
        return cast("Gauge", self._by_name[spec.name])

    def histogram(self, spec: MetricSpec) -> Histogram:
        return cast("Histogram", self._by_name[spec.name])


_default: Metrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> Metrics:
    """This process's set (created on first use; a forked child keeps using its parent's)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


# -- worker side: the per-packet hook --------------------------------------------------------------
def error_kind(exc: BaseException | type[BaseException] | str) -> str:
    """The ``kind`` label for an exception (or class, or class name): one of :data:`ERROR_KINDS`."""
    if isinstance(exc, str):
        return exc if exc in ERROR_KINDS else "other"
    cls = exc if isinstance(exc, type) else type(exc)
    for klass in cls.__mro__:
        if klass.__name__ in ERROR_KINDS and klass.__module__ == "builtins":
            return klass.__name__
    return "other"


class WorkerMetrics:
    """The counters one worker (one queue number) feeds; :meth:`observe` is the per-packet call."""

    def __init__(
        self, queue_num: int, rules: Iterable[str] = (), metrics: Metrics | None = None
    ) -> None:
        m = metrics if metrics is not None else default_metrics()
        q = str(_check_queue(queue_num))
        self.queue_num = queue_num
        self._seen = m.counter(PACKETS_SEEN).labels(q).inc
        self._modified = m.counter(PACKETS_MODIFIED).labels(q).inc
        self._dropped = m.counter(PACKETS_DROPPED).labels(q).inc
        unparsed = m.counter(PACKETS_UNPARSED)
        self._unparsed: dict[str, Callable[..., None]] = {
            r: unparsed.labels(q, r).inc for r in REASONS
        }
        errors = m.counter(HANDLER_ERRORS)
        self._errors: dict[str, Callable[..., None]] = {
            k: errors.labels(q, k).inc for k in ERROR_KINDS
        }
        self._time = m.histogram(PROCESSING_TIME).labels(q).observe
        self._rule_counter = m.counter(RULE_APPLIED)
        self._rules: dict[str, Callable[..., None]] = {}
        self._flows = m.gauge(SEQADJ_FLOWS).labels(q)
        self._table_counters = [
            (m.counter(spec).labels(q), name)
            for spec, name in ((SEQADJ_EVICTIONS, "flows_evicted"),
                               (SEQADJ_REFUSED, "edits_refused"), (SEQADJ_CUTS, "segments_cut"))
        ]
        self._table_last: dict[str, int] = {}
        self._flows.set(0)
        self._memory = m.gauge(SEQADJ_MEMORY).labels(q)
        self.set_rules(rules)

    def set_rules(self, names: Iterable[str]) -> None:
        """Create the per-rule counters (at 0) for a rule set's names; call at start and reload.

        Counters of rules no longer loaded are kept (a counter must not vanish mid-run); the set
        stays bounded by the rule names this process has loaded.
        """
        for name in names:
            if name not in self._rules:
                self._rules[name] = self._rule_counter.labels(name).inc

    def observe(self, result: Result, seconds: float) -> None:
        """Count one packet from the queue: its outcome, the rules that acted, its time."""
        self._seen()
        self._time(seconds)
        reason = result.unparsed
        if reason is not None:
            self._unparsed[reason]()
            return
        if result.verdict == DROP:
            self._dropped()
        elif result.packet is not None:
            self._modified()
        if result.rules:
            rules = self._rules
            for name in result.rules:
                inc = rules.get(name)
                if inc is None:  # a rule set loaded without set_rules(): still a rule name
                    self.set_rules((name,))
                    inc = rules[name]
                inc()

    def error(self, exc: BaseException | type[BaseException] | str) -> None:
        """Count an exception raised while handling a packet (see :func:`error_kind`)."""
        self._errors[error_kind(exc)]()

    def set_flows(self, active: int, totals: Mapping[str, int]) -> None:
        """Copy the FlowTable's figures: flows active now, and its running counts since it was
        made (``FlowTable.stats()``: ``flows_evicted``, ``edits_refused``, ``segments_cut``),
        and the estimated bytes its records hold now (``memory_bytes``, a gauge).

        Each counter advances by the difference from last time; a smaller value means a new
        table (counting from 0).
        """
        self._flows.set(active)
        self._memory.set(totals.get("memory_bytes", 0))
        last = self._table_last
        for counter, name in self._table_counters:
            total = totals.get(name, 0)
            delta = total - last.get(name, 0)
            if delta < 0:
                delta = total
            if delta > 0:
                counter.inc(delta)
            last[name] = total


# -- kernel queue figures ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QueueStats:
    """One line of ``/proc/net/netfilter/nfnetlink_queue``."""

    queue: int
    portid: int
    waiting: int
    copy_mode: int
    copy_range: int
    dropped: int
    user_dropped: int
    id_sequence: int


_PROC_READ_LIMIT = 8 << 20  # 65536 queues x ~60 bytes fits with room to spare


def read_queue_stats(path: str = NFQUEUE_PROC) -> dict[int, QueueStats]:
    """Parse the kernel's per-queue figures by queue number; a missing file or bad line is skipped.

    Columns: queue, portid, waiting, copy mode, copy range, queue_dropped, user_dropped,
    id sequence, 1.  Never raises for the file's content or absence.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_PROC_READ_LIMIT)
    except OSError:
        return {}
    out: dict[int, QueueStats] = {}
    for line in raw.decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            nums = [int(x) for x in fields[:8]]
        except ValueError:
            continue
        if min(nums) < 0:
            continue
        out[nums[0]] = QueueStats(*nums)
    return out


class KernelQueueCollector:
    """Scrape-time collector: waiting / dropped / user-dropped for our queue numbers only."""

    def __init__(self, queue_nums: Iterable[int], path: str = NFQUEUE_PROC) -> None:
        self.queue_nums = tuple(sorted({_check_queue(q) for q in queue_nums}))
        self.path = path

    def _families(self) -> tuple[Any, Any, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        return (
            GaugeMetricFamily(
                KERNEL_QUEUE_WAITING,
                "Packets in the kernel queue waiting for a verdict (read at scrape time).",
                labels=["queue"],
            ),
            CounterMetricFamily(
                KERNEL_QUEUE_DROPPED,
                "Packets the kernel dropped because the queue was full (not counted with "
                "fail-open: those pass unrewritten).",
                labels=["queue"],
            ),
            CounterMetricFamily(
                KERNEL_QUEUE_USER_DROPPED,
                "Packets the kernel dropped because the netlink socket buffer was full (not "
                "counted with fail-open).",
                labels=["queue"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        waiting, dropped, user_dropped = self._families()
        stats = read_queue_stats(self.path)
        for q in self.queue_nums:
            s = stats.get(q)
            if s is None:
                continue
            label = [str(q)]
            waiting.add_metric(label, s.waiting)
            dropped.add_metric(label, s.dropped)
            user_dropped.add_metric(label, s.user_dropped)
        yield waiting
        yield dropped
        yield user_dropped


# -- supervisor side ---------------------------------------------------------------------------
class SupervisorMetrics:
    """What the supervisor reports, and :attr:`registry`, the collector to serve on /metrics."""

    def __init__(
        self,
        queue_nums: Iterable[int],
        ports: Iterable[str] = (),
        metrics: Metrics | None = None,
        proc_path: str = NFQUEUE_PROC,
    ) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        m = metrics if metrics is not None else default_metrics()
        self.metrics = m
        self.queue_nums = tuple(sorted({_check_queue(q) for q in queue_nums}))
        if not self.queue_nums:
            raise ValueError("SupervisorMetrics needs at least one queue number")
        self.ports = frozenset(ports)
        self._rules_loaded = m.gauge(RULES_LOADED)
        self._reload_ok = m.gauge(RELOAD_SUCCESSFUL)
        self._reload_time = m.gauge(RELOAD_TIMESTAMP)
        self._offloads = m.gauge(OFFLOAD_ENABLED)
        restarts = m.counter(WORKER_RESTARTS)
        self._restarts = {q: restarts.labels(str(q)) for q in self.queue_nums}

        try:  # lets /metrics?name[]=... filter what the two collectors without names give
            registry = CollectorRegistry(support_collectors_without_names=True)
        except TypeError:  # prometheus-client < 0.25: name[] selects nothing, the rest works
            registry = CollectorRegistry()
        self.registry: CollectorRegistry = registry
        if m.multiprocess_dir is not None:
            MultiProcessCollector(  # type: ignore[no-untyped-call]
                self.registry, path=m.multiprocess_dir
            )
        else:
            assert m.registry is not None
            self.registry.register(cast("Collector", m.registry))
        self.kernel = KernelQueueCollector(self.queue_nums, proc_path)
        self.registry.register(cast("Collector", self.kernel))

    def rules_loaded(self, n: int) -> None:
        self._rules_loaded.set(n)

    def reload(self, ok: bool, when: float) -> None:
        """Record a load or reload attempt (the first load at start counts as one)."""
        self._reload_ok.set(1 if ok else 0)
        self._reload_time.set(when)

    def offloads(self, port: str, features: Mapping[str, bool]) -> None:
        """Record a configured bridge port's offload features (ethtool names, e.g. ``gro``)."""
        if port not in self.ports:
            raise ValueError(f"offloads for port {port!r}: not a configured bridge port")
        for feature, on in features.items():
            self._offloads.labels(port, feature).set(1 if on else 0)

    def worker_restarted(self, queue_num: int) -> None:
        counter = self._restarts.get(queue_num)
        if counter is None:
            raise ValueError(f"worker_restarted({queue_num}): not one of {self.queue_nums}")
        counter.inc()

    def worker_died(self, pid: int) -> None:
        """Forget a dead worker's live gauges (its counters stay in the totals)."""
        path = self.metrics.multiprocess_dir
        if path is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _check_queue(q: int) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= 65535:
        raise ValueError(f"queue number {q!r}: want an integer 0..65535")
    return q


# -- HTTP --------------------------------------------------------------------------------------
_LANDING = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>nfrewrite</title></head>
<body><h1>nfrewrite</h1><p><a href="/metrics">Metrics</a></p></body></html>
"""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` -> (host, port).  The host may not be empty."""
    host, sep, port_s = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen {listen!r}: write an IPv6 address in brackets, '[::1]:9640'")
    if not sep or not host:
        raise ValueError(
            f"listen {listen!r}: want 'host:port' (127.0.0.1 for loopback only, 0.0.0.0 or [::] "
            "for every interface)"
        )
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"listen {listen!r}: port must be 0..65535")
    return host, int(port_s)


def make_app(registry: Collector) -> WSGIApplication:
    """The WSGI app: ``/`` landing page, ``/metrics`` (the library's app), else 404; GET/HEAD."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/", "/metrics"):
            return _reply(start_response, "404 Not Found", b"not found\n", head=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return _reply(
                start_response,
                "405 Method Not Allowed",
                b"method not allowed\n",
                extra=[("Allow", "GET, HEAD")],
            )
        if path == "/":
            return _reply(
                start_response,
                "200 OK",
                _LANDING,
                ctype="text/html; charset=utf-8",
                head=method == "HEAD",
            )
        got: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            got[:] = [status, headers]
            return lambda data: None

        body = b"".join(metrics_app(dict(environ, REQUEST_METHOD="GET"), capture))
        status, headers = got
        headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    return app


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    *,
    ctype: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
    head: bool = False,
) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), *(extra or [])]
    start_response(status, headers)
    return [] if head else [body]


class _Prefixed(io.RawIOBase):
    """Reads ``prefix`` first (the request the loop already read), then ``raw``."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        self._prefix = prefix
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int | None:
        view = memoryview(buf).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(view)  # type: ignore[attr-defined, no-any-return]


class _Handler(WSGIRequestHandler):
    """One request whose head the loop has read, with the socket timeout :data:`IDLE_TIMEOUT`
    (the server's ``idle_timeout``)."""

    timeout = IDLE_TIMEOUT  # applied by StreamRequestHandler.setup() to every read and write
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)  # the socket the files wrap
        head = self.server.head_of(self.request)
        raw = self.connection.makefile("rb", buffering=0)
        self.rfile = io.BufferedReader(_Prefixed(head, cast("BinaryIO", raw)))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class name
        """No line per request."""


@dataclass(slots=True, eq=False)
class _Conn:
    sock: socket.socket
    addr: Any
    accepted: float  # time.monotonic()
    last: float  # when bytes last arrived (or the accept)
    head: bytes = b""  # what the loop read of the request


class _HTTPServer(WSGIServer):
    """The listening socket, the WSGI app, and the loop that admits connections.

    socketserver's own loop (and ThreadingMixIn) would give every connection a thread at once
    and keep it as long as the client likes; this one does not (see :func:`serve`).
    """

    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        sockaddr: tuple[Any, ...],
        family: socket.AddressFamily,
        *,
        max_waiting: int = MAX_WAITING,
        max_handlers: int = MAX_HANDLERS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.address_family = family
        super().__init__(sockaddr, _Handler)
        self.max_waiting = max_waiting
        self.max_handlers = max_handlers
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, _Conn] = {}  # request head incomplete; oldest first
        self._ready: list[_Conn] = []  # request head read, no handler free yet
        self._active: dict[socket.socket, _Conn] = {}  # a handler thread has it
        self._stop = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN (DNS, maybe slow); not needed.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    # -- the loop (one thread) ------------------------------------------------------------
    def run(self, poll_interval: float) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            self._sel = sel
            self.socket.setblocking(False)  # accept() in batches until it would block
            sel.register(self.socket, selectors.EVENT_READ)
            while not self._stop:
                try:
                    self._step(poll_interval)
                except Exception as e:  # noqa: BLE001 - the loop must outlive any surprise
                    print(f"nfrewrite: metrics HTTP: {type(e).__name__}: {e}", file=sys.stderr)
                    time.sleep(poll_interval)
            for conn in [*self._waiting.values(), *self._ready]:
                self._close(conn.sock)
            self._waiting.clear()
            self._ready.clear()
            with self._lock:
                for conn in self._active.values():
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)

    def _step(self, poll_interval: float) -> None:
        events = self._sel.select(poll_interval)
        now = time.monotonic()
        for key, _ in events:  # request bytes first: a scrape is not evicted by the accepts below
            conn = self._waiting.get(cast("socket.socket", key.fileobj))
            if conn is not None:
                self._read_head(conn, now)
        if any(key.fileobj is self.socket for key, _ in events):
            self._accept(now)
        self._expire(now)
        self._dispatch()

    def _read_head(self, conn: _Conn, now: float) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop_waiting(conn)
            return
        conn.head += data
        conn.last = now
        if b"\r\n\r\n" in conn.head or b"\n\n" in conn.head or len(conn.head) >= MAX_HEAD:
            del self._waiting[conn.sock]  # complete (or too long: the handler answers that)
            self._sel.unregister(conn.sock)
            self._ready.append(conn)

    def _drop_waiting(self, conn: _Conn) -> None:
        del self._waiting[conn.sock]
        self._sel.unregister(conn.sock)
        self._close(conn.sock)

    def _accept(self, now: float) -> None:
        import selectors

        for _ in range(self.max_waiting):  # a bounded batch, then look at the rest again
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)  # out of fds elsewhere: do not spin on the listen socket
                return
            if len(self._waiting) + len(self._ready) >= self.max_waiting:
                # full: the oldest incomplete request goes, else the oldest unserved one
                if self._waiting:
                    self._drop_waiting(next(iter(self._waiting.values())))
                else:
                    self._close(self._ready.pop(0).sock)
            sock.setblocking(False)
            self._waiting[sock] = _Conn(sock, addr, now, now)
            self._sel.register(sock, selectors.EVENT_READ)

    def _expire(self, now: float) -> None:
        """Close connections silent for ``idle_timeout`` or without a whole request head within
        REQUEST_TIMEOUT of the accept; cut answers not written within RESPONSE_TIMEOUT."""
        for conn in [
            c
            for c in self._waiting.values()
            if now - c.last > self.idle_timeout or now - c.accepted > REQUEST_TIMEOUT
        ]:
            self._drop_waiting(conn)
        for conn in [c for c in self._ready if now - c.accepted > RESPONSE_TIMEOUT]:
            self._ready.remove(conn)
            self._close(conn.sock)
        with self._lock:
            for conn in self._active.values():
                if now - conn.accepted > RESPONSE_TIMEOUT:
                    # the handler's blocked write returns; it closes the socket itself
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)

    def _dispatch(self) -> None:
        while self._ready:
            with self._lock:
                if len(self._active) >= self.max_handlers:
                    return
                conn = self._ready.pop(0)
                self._active[conn.sock] = conn
            conn.sock.setblocking(True)
            threading.Thread(
                target=self._handle, args=(conn,), name="nfrewrite-metrics-request", daemon=True
            ).start()

    def _handle(self, conn: _Conn) -> None:
        try:
            self.finish_request(conn.sock, conn.addr)
        except Exception:  # noqa: BLE001, S110 - a client that went away; nothing to report
            pass
        finally:
            with self._lock:
                self._active.pop(conn.sock, None)
            self._close(conn.sock)

    def head_of(self, sock: socket.socket) -> bytes:
        """What the loop read of the request on ``sock`` (for its handler)."""
        with self._lock:
            conn = self._active.get(sock)
        return conn.head if conn is not None else b""

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.close()

    def counts(self) -> tuple[int, int]:
        """(connections waiting for their request or a handler, requests being served)."""
        with self._lock:
            return len(self._waiting) + len(self._ready), len(self._active)

    def forget_in_child(self) -> None:
        """In a forked child: close its copies of our sockets (the parent's stay open), so that a
        worker never keeps a client's connection or the port open.  No lock: a thread of the
        parent may have held it at the fork, and in the child no other thread runs."""
        self._stop = True
        socks = [self.socket, *self._waiting, *(c.sock for c in self._ready), *self._active]
        for sock in socks:
            fd = sock.detach()  # closed now even if a handler's file objects refer to it
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _forget_in_child(ref: weakref.ref[_HTTPServer]) -> None:
    httpd = ref()
    if httpd is not None:
        httpd.forget_in_child()


class Server:
    """A running metrics HTTP server (daemon thread); :meth:`close` stops it and frees the port."""

    def __init__(self, httpd: _HTTPServer) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.run,
            args=(0.05,),  # how long close() waits for the loop to notice
            name="nfrewrite-metrics-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def limits(self) -> tuple[int, int]:
        """(connections kept waiting, requests served at once)."""
        return self._httpd.max_waiting, self._httpd.max_handlers

    def counts(self) -> tuple[int, int]:
        """(connections waiting for or with an unserved request, requests being served)."""
        return self._httpd.counts()

    def close(self) -> None:
        self._httpd._stop = True
        self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:
        return 3


def connection_limits(reserve: int = FD_RESERVE) -> tuple[int, int]:
    """(connections kept waiting, requests served at once) that fit in this process's soft
    RLIMIT_NOFILE with ``reserve`` descriptors, and those it has open now, left to the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    spare = soft - _open_fds() - 1 - reserve  # 1: the listening socket
    handlers = max(1, min(MAX_HANDLERS, spare // (2 * FDS_PER_REQUEST)))
    waiting = max(1, min(MAX_WAITING, spare - handlers * FDS_PER_REQUEST))
    return waiting, handlers


def serve(
    listen: str,
    registry: Collector,
    *,
    limits: tuple[int, int] | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Server:
    """Serve ``registry`` on ``listen`` ("host:port", "[::1]:port") in a daemon thread.

    ``limits``: (connections waiting with an incomplete or unserved request, requests served at
    once); by default
    :func:`connection_limits` (what fits beside :data:`FD_RESERVE`), computed now.
    ``idle_timeout``: :data:`IDLE_TIMEOUT` unless a test needs another.
    """
    if idle_timeout <= 0:
        raise ValueError(f"idle_timeout {idle_timeout!r}: want a positive number")
    waiting, handlers = limits if limits is not None else connection_limits()
    if waiting < 1 or handlers < 1:
        raise ValueError(f"limits {limits!r}: want two positive numbers")
    host, port = parse_listen(listen)
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"listen {listen!r}: no address")
    family, _, _, _, sockaddr = infos[0]
    httpd = _HTTPServer(sockaddr, family, max_waiting=waiting, max_handlers=handlers,
                        idle_timeout=idle_timeout)
    httpd.set_app(make_app(registry))
    return Server(httpd)
