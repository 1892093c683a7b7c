"""The per-packet hook is cheap: no label lookups per packet, a few microseconds per call.

Print the figures for both modes (each in a fresh interpreter, since the mode is fixed when
``prometheus_client`` is first imported):

    .venv/bin/python -m tests.test_metrics_hotpath
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nfrewrite.core.constants import ACCEPT
from nfrewrite.core.engine import PASS, Result
from nfrewrite.core.packet import NOT_TCP
from nfrewrite.service import metrics as M

ROOT = Path(__file__).resolve().parent.parent
CALLS = 100_000
REPEATS = 5

#: What the loop sees most (no rule matched), a rewrite by one rule, and a packet not ours.
CASES = {
    "pass": PASS,
    "modified_1_rule": Result(ACCEPT, b"x", rules=("hide-server-banner",)),
    "unparsed": Result(ACCEPT, unparsed=NOT_TCP),
}


def measure(multiprocess: bool, calls: int = CALLS) -> dict[str, float]:
    """Best-of-REPEATS nanoseconds per observe() for each case, in this process."""
    path = M.setup_multiprocess_dir() if multiprocess else None
    try:
        w = M.WorkerMetrics(0, rules=["hide-server-banner"])
        out: dict[str, float] = {}
        for name, result in CASES.items():
            best = float("inf")
            for _ in range(REPEATS):
                observe = w.observe
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    observe(result, 1.5e-5)
                best = min(best, (time.perf_counter_ns() - t0) / calls)
            out[name] = best
        return out
    finally:
        if path is not None:
            M.cleanup_multiprocess_dir(path)


def measure_in_child(multiprocess: bool, calls: int = CALLS) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, tests.test_metrics_hotpath as t; "
            f"print(json.dumps(t.measure({multiprocess!r}, {calls!r})))",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, float] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_observe_resolves_no_labels_per_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client.metrics import MetricWrapperBase

    m = M.Metrics()
    w = M.WorkerMetrics(0, rules=["a", "hide-server-banner"], metrics=m)

    def no_labels(*args: object, **kwargs: object) -> None:
        raise AssertionError("labels() called on the hot path")

    monkeypatch.setattr(MetricWrapperBase, "labels", no_labels)
    for result in (*CASES.values(), Result(ACCEPT, b"x", rules=("a",)), Result(0, rules=("a",))):
        w.observe(result, 1e-5)
    w.flush()  # nor does the flush that moves the tallies
    w.error(OSError())


@pytest.mark.parametrize("multiprocess", [False, True], ids=["single", "multiprocess"])
def test_observe_costs_microseconds(multiprocess: bool) -> None:
    # Generous bound (slow CI machines): it catches a per-packet label lookup or file open,
    # not a few percent.  For the figures, run the command in the module docstring.
    costs = measure_in_child(multiprocess, calls=10_000)
    assert max(costs.values()) < 25_000, costs


if __name__ == "__main__":
    for mode in (False, True):
        figures = measure_in_child(mode)
        label = "multiprocess" if mode else "single-process"
        print(f"{label:15}", "  ".join(f"{k}={v / 1000:.2f}us" for k, v in figures.items()))
