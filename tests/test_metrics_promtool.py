"""Prometheus's own tool accepts our scrape, our alert rules, and our example config.

``promtool`` comes from Debian's ``prometheus`` package.  Locally a missing promtool skips these
tests; under CI (``CI=true``) it is a failure, never a silent skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nfrewrite.core.constants import ACCEPT, DROP
from nfrewrite.core.engine import Result
from nfrewrite.core.packet import REASONS
from nfrewrite.service import metrics as M
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = "promtool not found (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"{msg}: required under CI", pytrace=False)
        pytest.skip(msg)
    return path


def run(promtool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def busy_scrape(tmp_path: Path) -> str:
    from prometheus_client import generate_latest

    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("    0  100  2 2 65531  4  5  8  1\n")
    m = M.Metrics()
    sup = M.SupervisorMetrics([0, 1], ports=["eth1"], metrics=m, proc_path=str(proc))
    for q in (0, 1):
        w = M.WorkerMetrics(q, rules=["hide-server-banner"], metrics=m)
        w.observe(Result(ACCEPT, b"x", rules=("hide-server-banner",)), 2e-5)
        w.observe(Result(DROP, rules=("hide-server-banner",)), 2e-5)
        w.observe(Result(ACCEPT, unparsed=REASONS[-1]), 1e-6)
        w.flush()
        w.error(ValueError())
        w.set_flows(2, {"flows_evicted": 1})
    sup.rules_loaded(1)
    sup.reload(True, 1_700_000_000.0)
    sup.offloads("eth1", {"gro": False})
    sup.worker_restarted(1)
    return generate_latest(sup.registry).decode()


def test_promtool_accepts_a_scrape(promtool: str, tmp_path: Path) -> None:
    text = busy_scrape(tmp_path)
    assert "nfrewrite_kernel_queue_dropped_total" in text
    proc = run(promtool, "check", "metrics", stdin=text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == ""  # no lint remarks either


def test_alert_rules_are_valid(promtool: str) -> None:
    proc = run(promtool, "check", "rules", str(EXAMPLES / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_behave_as_their_unit_tests_say(promtool: str) -> None:
    proc = run(promtool, "test", "rules", "tests/test_metrics_alerts.promtool.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_example_scrape_config_is_valid(promtool: str) -> None:
    proc = run(promtool, "check", "config", str(EXAMPLES / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_only_use_metrics_we_export() -> None:
    """Every nfrewrite_* name in the rules exists (a renamed metric would silently never fire)."""
    exported = {s.name for s in M.METRICS + M.KERNEL_QUEUE_METRICS}
    for spec in M.METRICS:
        if spec.type == "histogram":
            exported |= {spec.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    text = (EXAMPLES / "alerts.yml").read_text()
    used = set()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for word in line.replace("(", " ").replace(")", " ").replace("{", " ").split():
            if word.startswith("nfrewrite_"):
                used.add(word.rstrip(",[]"))
    assert used, "no metric names found"
    assert used <= exported, used - exported
