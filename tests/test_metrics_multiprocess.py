"""nfrewrite.service.metrics in multiprocess mode: totals across real worker processes add up
exactly.

Each scenario runs in a fresh interpreter (the mode is fixed when ``prometheus_client`` is first
imported, and this pytest process already imported it in-memory): a "supervisor" that calls
``setup_multiprocess_dir()`` first, starts two real worker processes (spawn, and fork), each
observing a known number of results, scrapes, lets one worker die, scrapes again, cleans up,
and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

PLANS: dict[int, dict[str, int]] = {
    0: {"modified": 300, "dropped": 7, "unparsed": 11, "errors": 2, "flows": 4, "evicted": 3},
    1: {"modified": 200, "dropped": 5, "unparsed": 13, "errors": 1, "flows": 6, "evicted": 0},
}
RULES = ("a", "b")


# -- run in child interpreters -----------------------------------------------------------------
def _worker(queue: int, plan: dict[str, int], ready: Any, stop: Any) -> None:
    from nfrewrite.core.constants import ACCEPT, DROP
    from nfrewrite.core.engine import Result
    from nfrewrite.core.packet import NOT_TCP
    from nfrewrite.service import metrics as M

    w = M.WorkerMetrics(queue, rules=RULES)
    for _ in range(plan["modified"]):
        w.observe(Result(ACCEPT, b"new", rules=("a",)), 1e-5)
    for _ in range(plan["dropped"]):
        w.observe(Result(DROP, rules=("b",)), 3e-6)
    for _ in range(plan["unparsed"]):
        w.observe(Result(ACCEPT, unparsed=NOT_TCP), 1e-6)
    for _ in range(plan["errors"]):
        w.error(OSError())
    w.flush()
    w.set_flows(plan["flows"], {"flows_evicted": plan["evicted"]})
    ready.set()
    stop.wait(60)


def scenario(start_method: str, proc_path: str) -> None:
    """The supervisor's side; prints one JSON line."""
    from nfrewrite.service import metrics as M

    path = M.setup_multiprocess_dir()  # first, before prometheus_client is imported
    import multiprocessing

    from prometheus_client import generate_latest

    dir_mode = os.stat(path).st_mode & 0o777
    sup = M.SupervisorMetrics([0, 1], ports=["eth1"], proc_path=proc_path)
    sup.rules_loaded(2)
    sup.reload(True, 1_700_000_000.0)
    sup.offloads("eth1", {"gro": False, "tso": True})

    ctx: Any = multiprocessing.get_context(start_method)
    workers = {}
    for q, plan in PLANS.items():
        ready, stop = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_worker, args=(q, plan, ready, stop))
        proc.start()
        if not ready.wait(60):
            raise RuntimeError(f"worker {q} did not report")
        workers[q] = (proc, stop)
    alive = generate_latest(sup.registry).decode()
    restricted = generate_latest(
        sup.registry.restricted_registry(["nfrewrite_packets_seen_total", "nfrewrite_rules_loaded"])
    ).decode()

    proc0, stop0 = workers[0]
    stop0.set()
    proc0.join(30)
    sup.worker_died(proc0.pid or 0)
    sup.worker_restarted(0)
    after_death = generate_latest(sup.registry).decode()

    proc1, stop1 = workers[1]
    stop1.set()
    proc1.join(30)
    files = sorted(os.listdir(path))
    M.cleanup_multiprocess_dir(path)
    print(
        json.dumps(
            {
                "dir_mode": dir_mode,
                "alive": alive,
                "restricted": restricted,
                "after_death": after_death,
                "files": files,
                "pids": [os.getpid(), proc0.pid, proc1.pid],
                "dir_gone": not os.path.exists(path),
                "env_after": os.environ.get(M.ENV),
            }
        )
    )


# -- the tests ---------------------------------------------------------------------------------
def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return got[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module", params=["spawn", "fork"])
def outcome(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    proc_file = tmp_path_factory.mktemp("proc") / "nfnetlink_queue"
    proc_file.write_text("    0  100  2 2 65531  0  0  8  1\n    3  100  5 2 65531  1  1  8  1\n")
    proc = run_python(
        "import tests.test_metrics_multiprocess as t; "
        f"t.scenario({request.param!r}, {str(proc_file)!r})"
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_totals_across_worker_processes_add_up_exactly(outcome: dict[str, Any]) -> None:
    got = samples(outcome["alive"])
    for q, plan in PLANS.items():
        queue = str(q)
        seen = plan["modified"] + plan["dropped"] + plan["unparsed"]
        assert value(got, "nfrewrite_packets_seen_total", queue=queue) == seen
        assert value(got, "nfrewrite_packets_modified_total", queue=queue) == plan["modified"]
        assert value(got, "nfrewrite_packets_dropped_total", queue=queue) == plan["dropped"]
        assert (
            value(got, "nfrewrite_packets_unparsed_total", queue=queue, reason="not_tcp")
            == plan["unparsed"]
        )
        assert (
            value(got, "nfrewrite_handler_errors_total", queue=queue, kind="OSError")
            == plan["errors"]
        )
        assert value(got, "nfrewrite_packet_processing_seconds_count", queue=queue) == seen
        assert (
            value(got, "nfrewrite_packet_processing_seconds_bucket", queue=queue, le="2e-06")
            == plan["unparsed"]
        )
        assert value(got, "nfrewrite_seqadj_flows", queue=queue) == plan["flows"]
        assert value(got, "nfrewrite_seqadj_flow_evictions_total", queue=queue) == plan["evicted"]
    assert value(got, "nfrewrite_rule_applied_total", rule="a") == sum(
        p["modified"] for p in PLANS.values()
    )
    assert value(got, "nfrewrite_rule_applied_total", rule="b") == sum(
        p["dropped"] for p in PLANS.values()
    )


def test_supervisor_figures_and_kernel_queue_show_once(outcome: dict[str, Any]) -> None:
    got = samples(outcome["alive"])
    assert value(got, "nfrewrite_rules_loaded") == 2
    assert value(got, "nfrewrite_last_reload_successful") == 1
    assert value(got, "nfrewrite_last_reload_timestamp_seconds") == 1_700_000_000.0
    assert value(got, "nfrewrite_offload_enabled", port="eth1", feature="gro") == 0
    assert value(got, "nfrewrite_offload_enabled", port="eth1", feature="tso") == 1
    assert value(got, "nfrewrite_worker_restarts_total", queue="1") == 0
    build = [k for k in got if k[0] == "nfrewrite_build_info"]
    assert len(build) == 1 and got[build[0]] == 1
    assert value(got, "nfrewrite_kernel_queue_waiting", queue="0") == 2
    assert not [k for k in got if dict(k[1]).get("queue") == "3"]  # not our queue
    assert not [k for k in got if "pid" in dict(k[1])]  # every gauge combines across processes


def test_name_filter_selects_from_the_merged_files(outcome: dict[str, Any]) -> None:
    got = samples(outcome["restricted"])
    assert {name for name, _ in got} == {"nfrewrite_packets_seen_total", "nfrewrite_rules_loaded"}
    assert value(got, "nfrewrite_packets_seen_total", queue="1") == 218


def test_a_dead_worker_leaves_its_counts_but_not_its_live_gauges(outcome: dict[str, Any]) -> None:
    got = samples(outcome["after_death"])
    assert value(got, "nfrewrite_packets_seen_total", queue="0") == 318
    assert ("nfrewrite_seqadj_flows", frozenset({("queue", "0")})) not in got
    assert value(got, "nfrewrite_seqadj_flows", queue="1") == PLANS[1]["flows"]
    assert value(got, "nfrewrite_worker_restarts_total", queue="0") == 1


def test_private_directory_is_created_then_removed(outcome: dict[str, Any]) -> None:
    assert outcome["dir_mode"] == 0o700
    supervisor, dead, alive = outcome["pids"]
    assert f"counter_{dead}.db" in outcome["files"]
    assert f"gauge_livesum_{dead}.db" not in outcome["files"]  # mark_process_dead removed it
    assert f"gauge_livesum_{alive}.db" in outcome["files"]
    assert f"gauge_mostrecent_{supervisor}.db" in outcome["files"]
    assert outcome["dir_gone"] is True
    assert outcome["env_after"] is None


def test_importing_the_module_does_not_import_prometheus_client() -> None:
    proc = run_python(
        "import sys, nfrewrite.service.metrics; "
        "assert 'prometheus_client' not in sys.modules, 'imported'; print('ok')"
    )
    assert proc.returncode == 0, proc.stderr


def test_setup_refuses_when_prometheus_client_was_imported_first() -> None:
    proc = run_python(
        "import prometheus_client\n"
        "from nfrewrite.service import metrics as M\n"
        "try:\n"
        "    M.setup_multiprocess_dir()\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: prometheus_client was imported before" in proc.stdout


def test_setup_refuses_a_second_directory_and_metrics_refuse_a_mismatch(tmp_path: Path) -> None:
    proc = run_python(
        "import os\n"
        "from nfrewrite.service import metrics as M\n"
        "p = M.setup_multiprocess_dir()\n"
        "try:\n"
        "    M.setup_multiprocess_dir()\n"
        "except RuntimeError as e:\n"
        "    print('second:', e)\n"
        "M.default_metrics()\n"
        "try:\n"
        "    M.Metrics()\n"
        "except RuntimeError as e:\n"
        "    print('twice:', e)\n"
        "M.cleanup_multiprocess_dir(p)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "second: PROMETHEUS_MULTIPROC_DIR is already set" in proc.stdout
    assert "twice: multiprocess mode: one Metrics per process" in proc.stdout

    env_late = run_python(
        "import os, prometheus_client\n"
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
        "from nfrewrite.service import metrics as M\n"
        "try:\n"
        "    M.Metrics()\n"
        "except RuntimeError as e:\n"
        "    print('mismatch:', e)\n"
    )
    assert env_late.returncode == 0, env_late.stderr
    assert "mismatch: prometheus_client chose in-memory values" in env_late.stdout


def test_cleanup_leaves_a_directory_holding_anything_but_value_files(tmp_path: Path) -> None:
    from nfrewrite.service import metrics as M

    d = tmp_path / "m"
    d.mkdir()
    (d / "counter_1.db").write_bytes(b"")
    (d / "precious.txt").write_text("keep me")
    with pytest.raises(OSError):
        M.cleanup_multiprocess_dir(str(d))
    assert (d / "precious.txt").exists()
    assert not (d / "counter_1.db").exists()
    M.cleanup_multiprocess_dir(str(tmp_path / "never-existed"))  # nothing to do, no error


def test_a_run_killed_before_its_cleanup_leaves_a_directory_the_next_run_removes(
    tmp_path: Path,
) -> None:
    """The runtime directory outlives a run (``RuntimeDirectoryPreserve``), so the directory of a
    run killed with ``kill -9`` would stay in memory (tmpfs) until reboot: the next run removes
    it, and keeps those of live processes, of unknown names and with foreign files."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited: no process has this pid now (short of a quick reuse)
    stale = tmp_path / f"nfrewrite-metrics-{dead_pid}-abc_1234"
    stale.mkdir()
    (stale / f"counter_{dead_pid}.db").write_bytes(b"x")
    live = tmp_path / f"nfrewrite-metrics-{os.getpid()}-def_5678"  # this test process: alive
    live.mkdir()
    (live / f"counter_{os.getpid()}.db").write_bytes(b"x")
    unknown = tmp_path / "nfrewrite-metrics-abcd1234"  # no pid in the name: not ours to judge
    unknown.mkdir()
    foreign = tmp_path / f"nfrewrite-metrics-{dead_pid}-ghi_9012"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")

    def run_killed() -> str:
        """A run that makes its directory, writes a value and dies without its cleanup."""
        proc = run_python(
            "import os, signal\n"
            "from nfrewrite.service import metrics as M\n"
            f"p = M.setup_multiprocess_dir({str(tmp_path)!r})\n"
            "M.SupervisorMetrics([0]).rules_loaded(1)\n"
            "print(os.getpid(), p, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        assert proc.returncode == -9, proc.stderr
        pid, path = proc.stdout.split()
        assert os.path.basename(path).startswith(f"nfrewrite-metrics-{pid}-"), path
        assert os.listdir(path), "the killed run wrote its values"
        return path

    first = run_killed()
    assert not stale.exists()
    assert live.is_dir() and unknown.is_dir() and (foreign / "precious.txt").exists()
    second = run_killed()
    assert not os.path.exists(first)  # what the killed first run left, the second removed
    assert os.path.isdir(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, unknown.name, foreign.name, os.path.basename(second)]
    )
