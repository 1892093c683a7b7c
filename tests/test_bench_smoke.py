"""`make bench` keeps working: a tiny run of the whole harness produces a number for every row and
every goal, and the lab is gone afterwards, also when the run is interrupted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from lab.netns import list_namespaces

pytestmark = pytest.mark.privileged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("1", "1i", "2", "3", "3g", "3t", "4", "4d", "4n", "4q", "4t", "5", "6", "7a", "7b", "7c",
        "7d", "8")


def _default_sigint() -> None:
    # Ctrl-C at a terminal: SIGINT is never ignored there. A test run started in the background
    # by a shell without job control inherits SIGINT ignored, and so would the bench.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _bench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint,
    )


def _lab_namespaces_of(pid: int) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(f"nfr-{pid}-")]


def test_a_short_bench_run_gives_a_figure_for_every_row_and_goal(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "results.json")
    proc = _bench("--quick", "--duration", "0.3", "--ping-count", "50", "--json", out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    with open(out) as f:
        results = json.load(f)
    for row in ROWS:
        assert results["medians"][row]["gbps"] > 0, row
    # these go through NFQUEUE
    for row in ROWS[3:]:
        assert results["medians"][row]["queued_pps"] > 0, row
    for row in ("3", "4"):
        assert results["medians"][row]["small_pps"] > 0, row
    for row in ("1", "2", "3", "4", "4t"):
        assert 0 < results["medians"][row]["p50_us"] <= results["medians"][row]["p99_us"], row
    assert len(results["goals"]) == 19  # the last: the trace hook while nobody traces
    queued = [g["name"].split()[0] for g in results["goals"] if "/ 3g" in g["name"]]
    assert queued == ["4q", "4t", "4"]  # the queued path against the reference with GSO
    assert any(g["name"].startswith("small") for g in results["goals"])
    assert results["goals"][-1]["name"].startswith("micro: trace hook off")
    assert all(math.isfinite(g["value"]) for g in results["goals"])
    assert len(results["workers_split"]["per_queue"]) == 2  # both queues got packets
    assert stdout.count("PASS") + stdout.count("MISS") == 19
    assert sum(g["name"].startswith("micro: ") and "literal" in g["name"]
               for g in results["goals"]) == 4  # the stream matcher's rows
    assert _lab_namespaces_of(proc.pid) == []


def test_ctrl_c_mid_run_removes_the_lab() -> None:
    proc = _bench("--quick", "--no-micro", "--duration", "2", "--json", os.devnull)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    seen = ""
    while time.monotonic() < deadline and "round 1/1: 3 " not in seen:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "round 1/1: 3 " in seen, seen
    time.sleep(1.0)  # the reference loop is bound and its iptables rule is in
    assert _lab_namespaces_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert _lab_namespaces_of(proc.pid) == []


def test_the_engine_micro_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import bench_engine

    bench_engine.main(rounds=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("with gso=True vs" in line for line in lines)
