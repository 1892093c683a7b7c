"""The per-packet matching cost stays nearly flat from 1 to 1,000 rules (bench/bench_match.py);
bench/bench_select.py still runs (its figures are for reading, not asserted).

The benchmark's goal is a ratio of at most 1.2; this test allows 1.5 so a busy machine does not
make it flaky, while a lost index (cost growing with the number of rules: ratio >> 2) still fails.
"""

from __future__ import annotations

from bench.bench_match import run
from bench.bench_select import run as run_select


def test_matching_cost_is_flat_from_1_to_1000_rules() -> None:
    result = run()
    assert set(result) == {"match_1_rule_ns", "match_1000_rules_ns", "ratio"}
    assert result["match_1_rule_ns"] > 0
    assert result["ratio"] <= 1.5, result


def test_the_selection_benchmark_runs_and_reports_every_figure() -> None:
    result = run_select(pairs=20, ports=256)
    assert set(result) == {"ranges_1000", "ranges_10000", "portless_1000", "any_1000"}
    for figures in result.values():
        assert set(figures) == {"new_pair_us", "cached_us", "cache_mb"}
        assert figures["new_pair_us"] > 0 and figures["cached_us"] > 0
