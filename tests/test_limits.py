"""Oversized files and absurd rule sets get a clear error at once, never a hang.

Limits: a config or rule file over 1 MiB is refused before it is read; a find/with/example over
64 KiB, more than 10,000 rules in all, or more than 1000 rule files are errors. Each is checked
through the loader and through the real ``nfrewrite check`` (messages and exit code), and the big
cases are time-bounded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from nfrewrite.config.diagnostics import Diagnostic
from nfrewrite.config.rulefiles import MAX_BYTES, MAX_RULE_FILES, MAX_RULES, load_rules
from nfrewrite.config.settings import load_all
from nfrewrite.config.tomlfile import MAX_FILE_SIZE

CONFIG = 'rules_dir = "rules"\n'


def lay_out(tmp_path: Path, rules: dict[str, str], config: str = CONFIG) -> Path:
    (tmp_path / "nfrewrite.toml").write_text(config)
    (tmp_path / "rules").mkdir(exist_ok=True)
    for name, text in rules.items():
        (tmp_path / "rules" / name).write_text(text)
    return tmp_path / "nfrewrite.toml"


def check(config: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("nfrewrite")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nfrewrite"]
    return subprocess.run([*cmd, "check", "-c", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)


def rules_text(first: int, count: int) -> str:
    return "".join(
        f'[[rule]]\nname = "r{i}"\nmatch = {{ dport = {i % 65535 + 1} }}\n'
        f'replace = [ {{ find = "a{i}", with = "b{i}" }} ]\n'
        for i in range(first, first + count)
    )


def errors(diags: list[Diagnostic]) -> list[str]:
    return [d.format().splitlines()[0] for d in diags if d.severity == "error"]


# -- file size -------------------------------------------------------------------------------------


def test_a_10_mb_pattern_is_refused_by_file_size_before_toml_parses_it(tmp_path: Path) -> None:
    big = 'x' * (10 * 1024 * 1024)
    config = lay_out(tmp_path, {"big.toml": f'[[rule]]\nname = "big"\n'
                                            f'replace = [ {{ find = "{big}", with = "y" }} ]\n'})
    start = time.perf_counter()
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert time.perf_counter() - start < 0.5
    assert ruleset is None
    assert errors(diags) == [
        f"{tmp_path}/rules/big.toml: error: file is too large (10.0 MiB, more than 1.0 MiB, the "
        "limit for a config or rule file): is this the right file?"
    ]
    start = time.perf_counter()
    proc = check(config)
    assert time.perf_counter() - start < 10
    assert proc.returncode == 1
    assert f"{tmp_path}/rules/big.toml: error: file is too large (10.0 MiB" in proc.stderr


def test_a_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    body = '[[rule]]\nname = "ok"\nset = { ttl = 64 }\n'
    body += "#" * (MAX_FILE_SIZE - len(body) - 1) + "\n"
    lay_out(tmp_path, {"a.toml": body})
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is not None and len(ruleset) == 1, diags
    (tmp_path / "rules" / "a.toml").write_text(body + "\n")
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is None and "more than 1.0 MiB" in errors(diags)[0]


def test_an_oversized_config_file_is_refused(tmp_path: Path) -> None:
    config = lay_out(tmp_path, {"a.toml": '[[rule]]\nname = "ok"\nset = { ttl = 64 }\n'},
                     config=CONFIG + "# " + "x" * (2 * 1024 * 1024) + "\n")
    cfg, ruleset, diags = load_all(str(config))
    assert cfg is None and ruleset is None
    assert errors(diags) == [
        f"{config}: error: file is too large (2.0 MiB, more than 1.0 MiB, the limit for a config "
        "or rule file): is this the right file?"
    ]
    proc = check(config)
    assert proc.returncode == 1 and "nfrewrite.toml: error: file is too large" in proc.stderr


# -- pattern length --------------------------------------------------------------------------------


def test_a_pattern_longer_than_64_kib_is_an_error_at_its_position(tmp_path: Path) -> None:
    long = "p" * (MAX_BYTES + 1)
    exact = "q" * MAX_BYTES
    hex_long = "ab" * (MAX_BYTES + 1)
    config = lay_out(tmp_path, {"a.toml": (
        '[[rule]]\nname = "long"\n'
        f'replace = [ {{ find = "{long}", with = "y" }} ]\n'
        '[[rule]]\nname = "long-with"\n'
        f'replace = [ {{ find = "y", with = "{long}" }} ]\n'
        '[[rule]]\nname = "hex"\n'
        f'replace = [ {{ find_hex = "{hex_long}", with = "" }} ]\n'
        '[[rule]]\nname = "exact"\n'
        f'replace = [ {{ find = "{exact}", with = "z" }} ]\n'
    )})
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    path = f"{tmp_path}/rules/a.toml"
    n = MAX_BYTES + 1
    assert ruleset is None
    assert errors(diags) == [
        f"{path}:3:22: error: find is {n} bytes; at most {MAX_BYTES} are allowed (a pattern "
        "longer than a packet can never match)",
        f"{path}:6:34: error: with is {n} bytes; at most {MAX_BYTES} are allowed (a pattern "
        "longer than a packet can never match)",
        f"{path}:9:26: error: find_hex is {n} bytes; at most {MAX_BYTES} are allowed (a pattern "
        "longer than a packet can never match)",
    ]
    proc = check(config)
    assert proc.returncode == 1
    assert f"{path}:3:22: error: find is {n} bytes; at most {MAX_BYTES}" in proc.stderr
    assert "check failed: 3 errors" in proc.stderr


def test_examples_are_bounded_like_patterns(tmp_path: Path) -> None:
    lay_out(tmp_path, {"a.toml": (
        '[[rule]]\nname = "ex"\nreplace = [ { find = "a", with = "b" } ]\n'
        f'examples = [ {{ input = "{"a" * (MAX_BYTES + 1)}", output = "b" }} ]\n'
    )})
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is None
    assert [e.split(": error: ")[1] for e in errors(diags)] == [
        f"input is {MAX_BYTES + 1} bytes; at most {MAX_BYTES} are allowed (a pattern longer "
        "than a packet can never match)"
    ]


# -- rule count and file count ---------------------------------------------------------------------


def test_ten_thousand_rules_load_and_one_more_is_an_error(tmp_path: Path) -> None:
    lay_out(tmp_path, {"a.toml": rules_text(0, 5000), "b.toml": rules_text(5000, 5000)})
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is not None and len(ruleset) == MAX_RULES, errors(diags)
    (tmp_path / "rules" / "c.toml").write_text(rules_text(10_000, 2))
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is None
    assert errors(diags) == [
        f"{tmp_path}/rules/c.toml:1:1: error: too many rules: at most {MAX_RULES} in all rule "
        "files together (2 more in this file not read)"
    ]


def test_a_hundred_thousand_rules_fail_fast_with_a_clear_error(tmp_path: Path) -> None:
    files = {f"{n:03d}.toml": rules_text(n * 1000, 1000) for n in range(100)}
    config = lay_out(tmp_path, files)
    start = time.perf_counter()
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    elapsed = time.perf_counter() - start
    assert ruleset is None
    assert errors(diags) == [
        f"{tmp_path}/rules/010.toml:1:1: error: too many rules: at most {MAX_RULES} in all rule "
        "files together (1000 more in this file not read)",
        f"{tmp_path}/rules: error: 89 more rule files not read: the limit of {MAX_RULES} rules "
        "is reached",
    ]
    assert elapsed < 8, f"took {elapsed:.1f} s"  # only the first 11 files are read
    proc = check(config)
    assert proc.returncode == 1
    assert "error: too many rules: at most 10000 in all rule files together" in proc.stderr
    assert "check failed: 2 errors" in proc.stderr


@pytest.mark.parametrize("extra", [0, 1])
def test_at_most_a_thousand_rule_files(tmp_path: Path, extra: int) -> None:
    count = MAX_RULE_FILES + extra
    files = {f"{n:04d}.toml": f'[[rule]]\nname = "r{n}"\nset = {{ ttl = 64 }}\n'
             for n in range(count)}
    config = lay_out(tmp_path, files)
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    if not extra:
        assert ruleset is not None and len(ruleset) == count
        return
    assert ruleset is None
    assert errors(diags) == [
        f"{tmp_path}/rules: error: {count} rule files (*.toml) in the rules directory; at most "
        f"{MAX_RULE_FILES} are allowed (merge them)"
    ]
    proc = check(config)
    assert proc.returncode == 1
    assert f"rules: error: {count} rule files (*.toml) in the rules directory" in proc.stderr
