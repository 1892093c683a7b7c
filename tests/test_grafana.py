"""``examples/grafana/nfrewrite.json``: every query names only metrics the daemon exports (the
metrics module's table and its kernel queue collector), every exported metric is on the
dashboard, and every query is PromQL that ``promtool`` parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfrewrite.service import metrics as M
from tests.conftest import IN_CI

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "nfrewrite.json"

#: Series a query may use that Prometheus itself makes for every target.
PROMETHEUS_OWN = {"up"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported() -> set[str]:
    """Every series name a scrape of the daemon can hold, from the metrics module's table."""
    names: set[str] = set()
    for spec in (*M.METRICS, *M.KERNEL_QUEUE_METRICS):
        if spec.type == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            names.add(spec.name)
    return names


def queries() -> Iterator[str]:
    """Every PromQL text in the dashboard: panel targets, annotations, variable queries."""
    return _queries(json.loads(DASHBOARD.read_text()))


def _queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(
                    value.get("query"), str):
                yield value["query"]
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (label names, label values, functions,
    keywords, grouping clauses, durations and Grafana variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    names = set()
    for m in _IDENT.finditer(text):
        name = m.group()
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or name in _KEYWORDS:
            continue  # a function call or a keyword
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
            continue  # the exponent or suffix of a number
        names.add(name)
    return names


def test_the_name_extraction_sees_through_promql() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{job=~"$job", x="b c"}'
            '[$__rate_interval]))) / on (queue) group_left b_total offset 5m + 1e3 > bool 0')
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names('label_values(nfrewrite_build_info{job=~"$job"}, instance)') == {
        "nfrewrite_build_info", "instance"}


def test_every_query_names_only_metrics_the_daemon_exports() -> None:
    allowed = exported() | PROMETHEUS_OWN
    found = list(queries())
    assert len(found) >= 20
    for expr in found:
        names = metric_names(expr)
        if expr.startswith("label_values("):  # label_values(metric, label): a label name last
            names.discard(expr.rstrip(")").rsplit(",", 1)[1].strip())
        assert names, expr
        assert names <= allowed, (expr, names - allowed)


def test_every_metric_the_daemon_exports_is_on_the_dashboard() -> None:
    used = set().union(*(metric_names(q) for q in queries()))
    for spec in (*M.METRICS, *M.KERNEL_QUEUE_METRICS):
        series = ({f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
                  if spec.type == "histogram" else {spec.name})
        assert used & series, spec.name


def test_the_dashboard_is_grafana_json_with_unique_panel_ids() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "nfrewrite" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for wanted in ("rewrites per rule", "packets seen, modified, dropped", "backlog",
                   "kernel drops", "processing time", "sequence offset",
                   "refused edits and cut segments", "reload"):
        assert wanted in titles, wanted


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    """Each query as a recording rule (Grafana's variables given values), checked offline."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool not installed (Debian package prometheus)", pytrace=False)
        pytest.skip("promtool not installed (Debian package prometheus)")
    rules = []
    for i, expr in enumerate(q for q in queries() if not q.startswith("label_values(")):
        concrete = (expr.replace("$__rate_interval", "1m").replace("$job", ".+")
                    .replace("$instance", ".+"))
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    got = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert got.returncode == 0, got.stdout + got.stderr
