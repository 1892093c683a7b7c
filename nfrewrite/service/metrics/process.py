"""The values each process keeps: the worker's per-packet hook and the supervisor's figures.

:class:`Metrics` turns the table (:data:`~nfrewrite.service.metrics.table.METRICS`) into
``prometheus_client`` objects, once per process; :class:`WorkerMetrics` (the per-packet side) and
:class:`SupervisorMetrics` (reloads, offloads, restarts, the scrape) are thin views over that one
set.  There is no aggregator of our own: the library adds the processes up.

Two modes, chosen by the library once per process, when ``prometheus_client`` is first imported:

* single-process (no ``PROMETHEUS_MULTIPROC_DIR``): values live in memory, and the scrape reads
  the :class:`Metrics` registry directly.  Unit tests use this.
* multiprocess: the supervisor calls :func:`setup_multiprocess_dir` FIRST (before anything imports
  ``prometheus_client``; this package imports it lazily for that reason, and
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
time 0) can never hide them.  ``build_info`` is set by every process (``livemax``).  The
supervisor's registry also holds the kernel-queue collector
(:mod:`~nfrewrite.service.metrics.kernelqueue`).

The hot path.  The queue loop calls :meth:`WorkerMetrics.observe` once per packet read from the
queue (a packet whose handling raised is passed on unchanged and observed as ``engine.PASS``;
:meth:`WorkerMetrics.error` counts the exception).  ``observe`` only adds to plain ints (and the
histogram's bucket tallies, found by bisection); :meth:`WorkerMetrics.flush` moves what was
tallied into the ``prometheus_client`` objects, one ``inc`` per series that moved. In
multiprocess mode each ``inc`` takes the library's lock and writes a memory-mapped file, which
costs more than the rest of an unedited packet's handling; the worker flushes once per batch of
packets drained from the queue (after their verdicts are out) and on its idle tick, so a scrape
lags the packets by at most one batch or one idle interval, and the counts are exact after a
flush. All label children are resolved when the worker starts (reasons, error kinds) or when
rules load (rule names): neither a packet nor a flush looks a label up.

The histogram is fed through two attributes of the library's histogram child (``_sum`` and
``_buckets``, the per-bucket values its ``observe`` increments); the child's own bucket bounds
(``_upper_bounds``) are the ones tallied against, so a flush adds exactly what the same
``observe`` calls would have. A library without them is caught when the worker starts, and the
observations are then replayed through ``observe`` at flush instead.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import os
import platform
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, cast

from nfrewrite import __version__
from nfrewrite.core.constants import DROP
from nfrewrite.core.packet import REASONS
from nfrewrite.service.metrics.kernelqueue import NFQUEUE_PROC, KernelQueueCollector
from nfrewrite.service.metrics.table import (
    BUILD_INFO,
    ERROR_KINDS,
    HANDLER_ERRORS,
    HOLD_OUTCOMES,
    METRICS,
    OFFLOAD_ENABLED,
    PACKETS_DROPPED,
    PACKETS_MODIFIED,
    PACKETS_SEEN,
    PACKETS_UNPARSED,
    PROCESSING_TIME,
    RELOAD_SUCCESSFUL,
    RELOAD_TIMESTAMP,
    RULE_APPLIED,
    RULES_LOADED,
    SEQADJ_CUTS,
    SEQADJ_EVICTIONS,
    SEQADJ_FLOWS,
    SEQADJ_MEMORY,
    SEQADJ_REFUSED,
    SEQADJ_RESTORED,
    STREAM_HOLDS,
    WORKER_RESTARTS,
    MetricSpec,
    check_queue_num,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.registry import Collector

    from nfrewrite.core.engine import Result


ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROC_PREFIX = "nfrewrite-metrics-"  # then the creating pid, "-", mkdtemp's suffix
_STALE_NAME = re.compile(re.escape(MULTIPROC_PREFIX) + r"([1-9][0-9]*)-[a-z0-9_]+")


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
    """The counters one worker (one queue number) feeds; :meth:`observe` is the per-packet call,
    :meth:`flush` hands its tallies to the library (see the module doc)."""

    def __init__(
        self, queue_num: int, rules: Iterable[str] = (), metrics: Metrics | None = None
    ) -> None:
        m = metrics if metrics is not None else default_metrics()
        q = str(check_queue_num(queue_num))
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
        self._time = m.histogram(PROCESSING_TIME).labels(q)
        self._rule_counter = m.counter(RULE_APPLIED)
        self._rules: dict[str, Callable[..., None]] = {}
        self._flows = m.gauge(SEQADJ_FLOWS).labels(q)
        self._table_counters = [
            (m.counter(spec).labels(q), name)
            for spec, name in ((SEQADJ_EVICTIONS, "flows_evicted"),
                               (SEQADJ_REFUSED, "edits_refused"), (SEQADJ_CUTS, "segments_cut"),
                               (SEQADJ_RESTORED, "flows_restored"))
        ]
        self._table_last: dict[str, int] = {}
        self._flows.set(0)
        self._memory = m.gauge(SEQADJ_MEMORY).labels(q)
        holds = m.counter(STREAM_HOLDS)
        self._holds = [(holds.labels(q, outcome), name) for outcome, name in HOLD_OUTCOMES.items()]
        self._holds_last: dict[str, int] = {}
        # -- the tallies observe() adds to and flush() empties
        self.n_seen = 0
        self.n_modified = 0
        self.n_dropped = 0
        self.n_unparsed: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.n_rules: dict[str, int] = {}
        self._time_sum = 0.0
        bounds = getattr(self._time, "_upper_bounds", None)
        self._direct = not (bounds and hasattr(self._time, "_sum")
                            and len(getattr(self._time, "_buckets", ())) == len(bounds))
        self._bounds: list[float] = list(bounds or ())
        self._time_counts = [0] * len(self._bounds)
        self._times: list[float] = []  # the fallback without the child's attributes
        self.set_rules(rules)

    def set_rules(self, names: Iterable[str]) -> None:
        """Create the per-rule counters (at 0) for a rule set's names; call at start and reload.

        Counters of rules no longer loaded are kept (a counter must not vanish mid-run); the set
        stays bounded by the rule names this process has loaded.
        """
        for name in names:
            if name not in self._rules:
                self._rules[name] = self._rule_counter.labels(name).inc
                self.n_rules[name] = 0

    def observe(self, result: Result, seconds: float) -> None:
        """Count one packet from the queue: its outcome, the rules that acted, its time (tallied
        until the next :meth:`flush`)."""
        self.n_seen += 1
        if self._direct:
            self._times.append(seconds)
        else:
            self._time_sum += seconds
            self._time_counts[bisect.bisect_left(self._bounds, seconds)] += 1
        reason = result.unparsed
        if reason is not None:
            self.n_unparsed[reason] += 1  # KeyError: not one of REASONS (a bug, not a label)
            return
        if result.verdict == DROP:
            self.n_dropped += 1
        elif result.packet is not None:
            self.n_modified += 1
        if result.rules:
            self._count_rules(result.rules)

    def _count_rules(self, names: Iterable[str]) -> None:
        tally = self.n_rules
        for name in names:
            if name not in tally:  # a rule set loaded without set_rules(): still a rule name
                self.set_rules((name,))
            tally[name] += 1

    def flush(self) -> None:
        """Move the tallies into the library's values (one ``inc`` per series that moved)."""
        if self.n_seen:
            self._seen(self.n_seen)
            self.n_seen = 0
            if self._direct:
                times, self._times = self._times, []
                for seconds in times:
                    self._time.observe(seconds)
            else:
                self._time._sum.inc(self._time_sum)
                self._time_sum = 0.0
                counts, buckets = self._time_counts, self._time._buckets
                for i, n in enumerate(counts):
                    if n:
                        buckets[i].inc(n)
                        counts[i] = 0
            for reason, n in self.n_unparsed.items():
                if n:
                    self._unparsed[reason](n)
                    self.n_unparsed[reason] = 0
        if self.n_modified:
            self._modified(self.n_modified)
            self.n_modified = 0
        if self.n_dropped:
            self._dropped(self.n_dropped)
            self.n_dropped = 0
        for name, n in self.n_rules.items():
            if n:
                self._rules[name](n)
                self.n_rules[name] = 0

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


    def observe_released(self, result: Result) -> None:
        """Count the outcome of a packet held earlier and released now (it was seen when held;
        tallied until the next :meth:`flush`)."""
        if result.verdict == DROP:
            self.n_dropped += 1
        elif result.packet is not None:
            self.n_modified += 1
        if result.rules:
            self._count_rules(result.rules)

    def set_holds(self, totals: Mapping[str, int]) -> None:
        """Copy the engine's hold counters (``Engine.holds.stats()``), as :meth:`set_flows`."""
        last = self._holds_last
        for counter, name in self._holds:
            total = totals.get(name, 0)
            delta = total - last.get(name, 0)
            if delta < 0:
                delta = total
            if delta > 0:
                counter.inc(delta)
            last[name] = total


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
        self.queue_nums = tuple(sorted({check_queue_num(q) for q in queue_nums}))
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
        kernel = KernelQueueCollector(self.queue_nums, proc_path)
        self.registry.register(cast("Collector", kernel))

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
