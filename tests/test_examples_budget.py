"""``check`` bounds the work of running examples: a positioned refusal instead of an hour.

Each example costs what its packet costs on the wire; rules that all meet every packet, with
patterns that occur all over the examples, make that quadratic. Past ``EXAMPLE_STEPS_MAX``
estimated search steps no example is run and one error names the example where the estimate
crossed the limit. Ordinary rule sets (rules with their own ports) stay far below it.
"""

from __future__ import annotations

import os
from pathlib import Path

from nfrewrite.config.examples import EXAMPLE_STEPS_MAX, check_examples, search_steps
from nfrewrite.config.rulefiles import load_rules
from nfrewrite.core.rules import RuleSet


def _load(directory: Path, files: dict[str, str]) -> RuleSet:
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        os.chmod(path, 0o600)
    ruleset, diags = load_rules(str(directory))
    assert ruleset is not None, [d.format() for d in diags]
    return ruleset


def test_examples_whose_packets_meet_hundreds_of_busy_patterns_are_refused_at_a_position(
    tmp_path: Path,
) -> None:
    # 400 rules for every packet, patterns "a", "aa", ... each found all over a 60 kB payload of
    # "a": the engine would take ~60,000 matches x 400 patterns per example (seconds each)
    rules = []
    for k in range(1, 401):
        example = ""
        if k <= 3:
            example = (f'examples = [ {{ input = "{"a" * 60_000}", '
                       f'output = "{"b" * 60_000}" }} ]\n')
        rules.append(f'[[rule]]\nname = "r{k}"\n'
                     f'replace = [ {{ find = "{"a" * k}", with = "{"b" * k}" }} ]\n{example}')
    ruleset = _load(tmp_path, {"10-busy.toml": "".join(rules)})
    first = ruleset.rules[0]
    steps, patterns, hits = search_steps(ruleset, first, first.examples[0])
    assert patterns == 400 and hits > 60_000
    assert steps < EXAMPLE_STEPS_MAX < 2 * steps  # the second example crosses the limit

    diagnostics = check_examples(ruleset)

    assert len(diagnostics) == 1, [d.format() for d in diagnostics]
    d = diagnostics[0]
    second = ruleset.rules[1].examples[0]
    assert (d.path, d.line, d.col, d.severity) == (
        str(tmp_path / "10-busy.toml"), second.line, second.col, "error")
    assert "examples too costly to check (3 examples, none run)" in d.message
    assert "meets 400 patterns" in d.message
    assert "narrower matches" in d.message


def test_a_thousand_rules_with_their_own_ports_and_4_kb_examples_are_all_run(
    tmp_path: Path,
) -> None:
    body = ("apple pie " * 410)[:4096]
    rules = [
        f'[[rule]]\nname = "e{i}"\nmatch = {{ dport = {1000 + i} }}\n'
        f'replace = [ {{ find = "apple", with = "APPLE" }} ]\n'
        f'examples = [ {{ input = "{body}", output = "{body.replace("apple", "APPLE")}" }} ]\n'
        for i in range(1000)
    ]
    # one wrong example among them: proves they ran
    rules[500] = rules[500].replace('output = "APPLE', 'output = "apple', 1)
    files = {f"{k:02d}.toml": "".join(rules[k * 100 : k * 100 + 100]) for k in range(10)}
    ruleset = _load(tmp_path, files)
    rule = ruleset.rules[0]
    assert search_steps(ruleset, rule, rule.examples[0])[:2] == (4096 // 64 + 1 + 410, 1)

    diagnostics = check_examples(ruleset)

    assert [d.message.split(":")[0] for d in diagnostics] == [
        "example does not hold (rule 'e500')"]
