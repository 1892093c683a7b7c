"""Whatever a user writes, the loader answers with diagnostics inside the file — never a crash.

Hypothesis builds rule files from the real schema's keys (and misspelt ones) with values of every
TOML type, writes them in random styles (the writer of ``test_rules_tomlpos``), and loads them.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfrewrite.config.rulefiles import load_rules
from tests.test_rules_tomlpos import Writer

scalar = st.one_of(
    st.integers(min_value=-70000, max_value=70000),
    st.booleans(),
    st.sampled_from(["tcp", "udp", "80", "80-90", "90-80", "10.0.0.0/8", "10.0.0.1/8", "::/0",
                     "2001:db8::1/32", "de ad", "zz", "", "eth1", "drop", "accept", "x" * 20]),
    st.text(max_size=6),
)
value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["find", "with", "find_hex", "with_hex", "input", "output", "sport",
                         "dport", "src", "dst", "ttl", "mss", "mss_max", "in_port", "protocol",
                         "fnd"]), inner, max_size=3),
    max_leaves=8,
)
rule_table = st.dictionaries(
    st.sampled_from(["name", "match", "replace", "set", "verdict", "examples", "nmae"]),
    value,
    max_size=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rule_table, min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_any_rule_file_gives_diagnostics_inside_the_file(
    rules: list[dict[str, Any]], rnd: random.Random
) -> None:
    text = Writer(rnd).document({"rule": rules})
    lines = text.split("\n")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "r.toml").write_text(text)
        ruleset, diagnostics = load_rules(d, allow_length_change=rnd.random() < 0.5,
                                          bridge_ports=rnd.choice([None, (), ("eth1",)]))
    errors = [x for x in diagnostics if x.severity == "error"]
    assert (ruleset is None) == bool(errors)
    for diag in diagnostics:
        assert 1 <= diag.line <= len(lines), diag
        assert diag.col >= 1
        assert diag.source == lines[diag.line - 1].rstrip("\r")
        assert diag.format().startswith(f"{d}/r.toml:{diag.line}:{diag.col}: ")
