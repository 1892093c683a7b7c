"""The kernel queue collector: NFQUEUE figures the kernel keeps, read from /proc at scrape time.

Kernel queue figures (waiting, dropped, user-dropped) are not counted by us: the
:class:`KernelQueueCollector` reads ``/proc/net/netfilter/nfnetlink_queue`` at scrape time, only
for our queue numbers.  The file shows the reading process's network namespace (the daemon runs in
the appliance's).  A queue that is not bound has no line, hence no sample.  Note: with
``NFQA_CFG_F_FAIL_OPEN`` (which the queue uses) the kernel accepts, uncounted, what it would
otherwise drop for a full queue or a full socket buffer; ``waiting`` is then the warning sign.

Nothing here raises at scrape time because the file is missing or odd: a missing file or a bad
line gives no sample.  ``prometheus_client`` is imported only when a scrape asks for the families.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nfrewrite.service.metrics.table import (
    KERNEL_QUEUE_DROPPED,
    KERNEL_QUEUE_USER_DROPPED,
    KERNEL_QUEUE_WAITING,
    check_queue_num,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


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
        self.queue_nums = tuple(sorted({check_queue_num(q) for q in queue_nums}))
        self.path = path

    def _families(self) -> tuple[Any, Any, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        return (
            GaugeMetricFamily(KERNEL_QUEUE_WAITING.name, KERNEL_QUEUE_WAITING.help,
                              labels=KERNEL_QUEUE_WAITING.labels),
            CounterMetricFamily(KERNEL_QUEUE_DROPPED.name, KERNEL_QUEUE_DROPPED.help,
                                labels=KERNEL_QUEUE_DROPPED.labels),
            CounterMetricFamily(KERNEL_QUEUE_USER_DROPPED.name, KERNEL_QUEUE_USER_DROPPED.help,
                                labels=KERNEL_QUEUE_USER_DROPPED.labels),
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
