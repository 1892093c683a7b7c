"""The worker's store of sequence records (``nfrewrite.service.flowstore``), without a queue.

A worker's table journalled, then read back by the next one (as after a crash: no clean save);
a clean save read back; a stale, a damaged and a truncated file refused with one log line each
(the worker starts empty); a reload changes no record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nfrewrite.config.settings import load_all
from nfrewrite.core.constants import ACK
from nfrewrite.core.engine import Engine
from nfrewrite.core.rules import RuleSet
from nfrewrite.core.seqadj import FlowTable
from nfrewrite.service.flowstore import FlowStore
from tests.test_flowstate import find_edits, keys


def ruleset(tmp_path: Path, with_: str = "GROWN!!") -> RuleSet:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "10.toml").write_text(
        f'[[rule]]\nname = "grow"\nreplace = [ {{ find = "grow", with = "{with_}" }} ]\n')
    os.chmod(rules, 0o755)
    cfg = tmp_path / "nfrewrite.toml"
    cfg.write_text(f'rules_dir = "{rules}"\n')
    _config, rs, diags = load_all(str(cfg))
    assert rs is not None, diags
    return rs


def worker(tmp_path: Path, rs: RuleSet, logs: list[str],
           max_age: float = 60.0) -> tuple[FlowStore, FlowTable]:
    table = FlowTable()
    store = FlowStore(str(tmp_path / "run"), 3, table, rs, max_age, logs.append)
    store.load(rs)
    store.open()
    return store, table


def edit_once(table: FlowTable) -> None:
    key = keys(1)[0][0]
    flow = table.create(key, time.monotonic())
    assert flow is not None
    flow.rewrite(0, 1000, 5000, ACK, b"..AB..", [], time.monotonic(), find_edits)


def test_the_journal_of_a_worker_that_died_is_read_by_the_next(tmp_path: Path) -> None:
    rs, logs = ruleset(tmp_path), list[str]()
    store, table = worker(tmp_path, rs, logs)
    edit_once(table)
    assert table.urgent
    store.write_changed()  # what the handler does before the verdict
    assert not table.urgent and table.changed == {}
    # the worker dies here: no save; the next one reads the journal
    _store2, table2 = worker(tmp_path, rs, logs)
    assert len(table2) == 1 and table2.flows_restored == 1
    assert "1 flows restored" in logs[-1] and "did not stop cleanly" in logs[-1]
    flow = next(iter(table2._flows.values()))
    assert flow.ways[0].top_offset() == 3  # AB -> xxxxx


def test_a_clean_save_is_read_back_and_a_reload_changes_no_record(tmp_path: Path) -> None:
    rs, logs = ruleset(tmp_path), list[str]()
    store, table = worker(tmp_path, rs, logs)
    edit_once(table)
    engine = Engine(rs, table)
    other = ruleset(tmp_path, "GREW")
    engine.ruleset = other  # what the worker does on a reload
    store.set_rules(other)
    assert len(table) == 1 and next(iter(table._flows.values())).ways[0].top_offset() == 3
    assert store.save() == 1
    _s, table2 = worker(tmp_path, rs, logs)
    assert len(table2) == 1
    assert "did not stop cleanly" not in logs[-1]
    assert "written under other rules" in logs[-1]  # saved after the reload, read with the old


def test_a_stale_file_is_ignored(tmp_path: Path) -> None:
    rs, logs = ruleset(tmp_path), list[str]()
    store, table = worker(tmp_path, rs, logs)
    edit_once(table)
    store.save()
    old = time.time() - 61
    os.utime(store.path, (old, old))
    _s, table2 = worker(tmp_path, rs, logs)
    assert len(table2) == 0
    assert "more than flows.state_max_age 60 s): ignored" in logs[-1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_file_is_refused_with_a_log_line_and_set_aside(tmp_path: Path,
                                                                  damage: str) -> None:
    rs, logs = ruleset(tmp_path), list[str]()
    store, table = worker(tmp_path, rs, logs)
    edit_once(table)
    store.save()
    data = Path(store.path).read_bytes()
    if damage == "flip":
        data = data[:40] + bytes([data[40] ^ 1]) + data[41:]
    elif damage == "truncate":
        data = data[:-5]
    else:
        data = b"not a state at all"
    Path(store.path).write_bytes(data)
    store2, table2 = worker(tmp_path, rs, logs)
    assert len(table2) == 0
    line = next(x for x in logs if "refused" in x)
    assert line.startswith(f"queue 3: sequence records {store.path}: refused (")
    assert line.endswith("); starting with no records")
    assert os.path.exists(store.path + ".refused")
    assert len(table2) == 0 and store2.table is table2


def test_an_unwritable_directory_is_said_once_and_the_worker_goes_on(tmp_path: Path) -> None:
    rs, logs = ruleset(tmp_path), list[str]()
    (tmp_path / "run").write_text("a file where the directory should be")
    store, table = worker(tmp_path, rs, logs)
    assert "will not survive this worker" in logs[-1]
    assert table.changed is None
    said = len(logs)
    edit_once(table)
    store.write_changed()
    store.idle()
    assert len(logs) == said
