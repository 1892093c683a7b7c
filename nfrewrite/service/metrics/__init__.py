"""Prometheus metrics: one table of metrics, a per-packet hook, a kernel-queue collector, /metrics.

What it is for
==============
Counting what the appliance does (packets seen, changed, dropped, passed as "not ours"; rewrites
per rule; time per packet; reloads; offloads; sequence-adjusted flows) and serving it over HTTP in
the Prometheus text format, with the right totals when the daemon runs one worker process per
NFQUEUE number plus a supervisor.  It must not: import ``prometheus_client`` at import time (see
:mod:`.process`), label anything by address or port (every label value comes from a fixed set, the
configured queues and ports, or rule names), format label values per packet, or raise at scrape
time because a /proc file is missing or odd.

The parts, one job each
=======================
* :mod:`.table`: every metric (name, type, help, labels, buckets, how processes combine); the
  only place a metric is defined.
* :mod:`.process`: the values one process keeps (:class:`Metrics`), the worker's per-packet hook
  (:class:`WorkerMetrics`), the supervisor's figures and scrape registry
  (:class:`SupervisorMetrics`), and the multiprocess directory the processes share.
* :mod:`.kernelqueue`: the scrape-time collector of the kernel's NFQUEUE figures (/proc).
* :mod:`.server`: the HTTP server, bounded in connections, threads and time.

This package re-exports what the daemon and the tests use (the API below), so callers write
``from nfrewrite.service import metrics`` and ``metrics.X``.  A test that changes a constant
patches the module that reads it (e.g. ``metrics.server.REQUEST_TIMEOUT``): a re-exported copy
is only a copy.

API
===
``setup_multiprocess_dir(parent=None) -> str``; ``cleanup_multiprocess_dir(path)``;
``remove_stale_multiprocess_dirs(parent) -> list[str]``;
``default_metrics() -> Metrics`` (the process's one set; ``Metrics()`` for a private set in
single-process mode, e.g. a test); ``WorkerMetrics(queue_num, rules=(), metrics=None)`` with
``.set_rules(names)``, ``.observe(result, seconds)``, ``.error(exc_or_name)``,
``.set_flows(active, totals)``; ``SupervisorMetrics(queue_nums, ports=(), metrics=None,
proc_path=NFQUEUE_PROC)`` with ``.rules_loaded(n)``, ``.reload(ok, when)``,
``.offloads(port, features)``, ``.worker_restarted(queue_num)``, ``.worker_died(pid)``,
``.registry`` (what to scrape); ``serve((host, port), registry, *, limits=None,
idle_timeout=IDLE_TIMEOUT) -> Server``
(``.address``, ``.url``, ``.limits``, ``.counts()``, ``.close()``); ``connection_limits(reserve)``;
``read_queue_stats(path)``; ``KernelQueueCollector(queue_nums, path)``; ``error_kind(exc)``;
the metric sets ``METRICS`` and ``KERNEL_QUEUE_METRICS`` (each spec by name in :mod:`.table`),
``ERROR_KINDS``, ``TIME_BUCKETS``, ``ENV``; the server's bounds ``MAX_WAITING``,
``MAX_HANDLERS``, ``IDLE_TIMEOUT``, ``FDS_PER_REQUEST``, ``FD_RESERVE`` (the others in
:mod:`.server`).

How the daemon uses it::

    path = metrics.setup_multiprocess_dir()        # first thing: before prometheus_client loads
    sup = metrics.SupervisorMetrics(queues, ports=bridge_ports)
    server = metrics.serve((cfg.metrics.host, cfg.metrics.port), sup.registry)
    sup.rules_loaded(len(ruleset)); sup.reload(True, time.time()); sup.offloads("eth1", {...})
    ...start workers; in each:  wm = metrics.WorkerMetrics(queue_num, rules=names)
    ...per packet:  t = perf_counter(); result = engine.process(...);
                    wm.observe(result, perf_counter() - t)
    ...now and then: wm.set_flows(flows.flows_active, flows.stats())
    ...a worker died: sup.worker_died(pid); restarted: sup.worker_restarted(queue_num)
    server.close(); metrics.cleanup_multiprocess_dir(path)   # on stop, in this order

A test (one process, no environment variable): ``m = Metrics()``,
``WorkerMetrics(0, metrics=m)``, and ``prometheus_client.generate_latest(m.registry)``.
"""

from nfrewrite.service.metrics.kernelqueue import (
    NFQUEUE_PROC,
    KernelQueueCollector,
    QueueStats,
    read_queue_stats,
)
from nfrewrite.service.metrics.process import (
    ENV,
    Metrics,
    SupervisorMetrics,
    WorkerMetrics,
    cleanup_multiprocess_dir,
    default_metrics,
    error_kind,
    remove_stale_multiprocess_dirs,
    setup_multiprocess_dir,
)
from nfrewrite.service.metrics.server import (
    FD_RESERVE,
    FDS_PER_REQUEST,
    IDLE_TIMEOUT,
    MAX_HANDLERS,
    MAX_WAITING,
    Server,
    connection_limits,
    serve,
)
from nfrewrite.service.metrics.table import (
    ERROR_KINDS,
    HOLD_OUTCOMES,
    KERNEL_QUEUE_METRICS,
    METRICS,
    TIME_BUCKETS,
    MetricSpec,
)

__all__ = [
    "ENV",
    "ERROR_KINDS",
    "FDS_PER_REQUEST",
    "FD_RESERVE",
    "HOLD_OUTCOMES",
    "IDLE_TIMEOUT",
    "KERNEL_QUEUE_METRICS",
    "MAX_HANDLERS",
    "MAX_WAITING",
    "METRICS",
    "NFQUEUE_PROC",
    "TIME_BUCKETS",
    "KernelQueueCollector",
    "MetricSpec",
    "Metrics",
    "QueueStats",
    "Server",
    "SupervisorMetrics",
    "WorkerMetrics",
    "cleanup_multiprocess_dir",
    "connection_limits",
    "default_metrics",
    "error_kind",
    "read_queue_stats",
    "remove_stale_multiprocess_dirs",
    "serve",
    "setup_multiprocess_dir",
]
