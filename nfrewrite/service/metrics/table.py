"""The metric table: every metric nfrewrite exports, its type, help, labels and buckets.

Rule 1: every metric is defined here and nowhere else.  Each entry (:class:`MetricSpec`) gives
the name, type, help, labels and, for gauges, how values from several processes combine.
:data:`METRICS` is the set each process holds (:class:`~nfrewrite.service.metrics.process.Metrics`
turns it into ``prometheus_client`` objects); :data:`KERNEL_QUEUE_METRICS` are the ones the
kernel-queue collector produces at scrape time.

Label values come only from fixed sets: the configured queue numbers (:func:`check_queue_num`),
the configured bridge ports, rule names, :data:`ERROR_KINDS` and the parser's reasons; never an
address or a port of the traffic.  This module imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

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
SEQADJ_RESTORED = MetricSpec(
    "nfrewrite_seqadj_flows_restored_total", "counter",
    "Flows whose sequence records a worker restored at its start (from its predecessor's journal "
    "or the snapshot of a clean stop).", ("queue",))
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

STREAM_HOLDS = MetricSpec(
    "nfrewrite_stream_holds_total", "counter",
    "Segments held back because they ended in the beginning of a pattern (outcome=held), and "
    "how their groups ended: joined (the next segment came in time), expired (released as they "
    "were after [flows] hold_ms), flushed (an out-of-order segment came), refused (not held: "
    "the hold bounds were reached).", ("queue", "outcome"))
#: the outcomes of STREAM_HOLDS, and the engine's counter behind each
HOLD_OUTCOMES = {"held": "holds", "joined": "hold_joined", "expired": "hold_expired",
                 "flushed": "hold_flushed", "refused": "hold_refused"}
#: Rule 1: the set every process holds, in exposition order.
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
    SEQADJ_RESTORED,
    SEQADJ_MEMORY,
    STREAM_HOLDS,
    RULES_LOADED,
    RELOAD_SUCCESSFUL,
    RELOAD_TIMESTAMP,
    OFFLOAD_ENABLED,
    WORKER_RESTARTS,
    BUILD_INFO,
)

# fmt: off
#: What the kernel-queue collector reads from /proc at scrape time (not in the per-process set).
KERNEL_QUEUE_WAITING = MetricSpec(
    "nfrewrite_kernel_queue_waiting", "gauge",
    "Packets in the kernel queue waiting for a verdict (read at scrape time).", ("queue",))
KERNEL_QUEUE_DROPPED = MetricSpec(
    "nfrewrite_kernel_queue_dropped_total", "counter",
    "Packets the kernel dropped because the queue was full (not counted with fail-open: those "
    "pass unrewritten).", ("queue",))
KERNEL_QUEUE_USER_DROPPED = MetricSpec(
    "nfrewrite_kernel_queue_user_dropped_total", "counter",
    "Packets the kernel dropped because the netlink socket buffer was full (not counted with "
    "fail-open).", ("queue",))
# fmt: on

KERNEL_QUEUE_METRICS: tuple[MetricSpec, ...] = (
    KERNEL_QUEUE_WAITING,
    KERNEL_QUEUE_DROPPED,
    KERNEL_QUEUE_USER_DROPPED,
)


def check_queue_num(q: int) -> int:
    """``q`` if it is a queue number (the ``queue`` label), else ValueError."""
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= 65535:
        raise ValueError(f"queue number {q!r}: want an integer 0..65535")
    return q
