"""`nfrewrite check -c CONFIG`: each mistake reported at its exact path:line:col, all in one run.

Each case writes a config and rule files to a temporary directory and runs the real command
(``python -m nfrewrite check``) there. In the case texts, ``⟪`` marks the exact spot the message
must point at; it is removed before the file is written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARK = "⟪"
GOOD_RULE = '[[rule]]\nname = "ok"\nset = { ttl = 64 }\n'
CONFIG = 'rules_dir = "rules"\n'


@dataclass
class Result:
    rc: int
    out: str
    err: str


def nfrewrite(*args: str, cwd: Path) -> Result:
    env = dict(os.environ)
    env.pop("NFREWRITE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "nfrewrite", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the markers; return the text and the (line, col) of each marker."""
    spots: list[tuple[int, int]] = []
    out: list[str] = []
    line, col = 1, 1
    for ch in text:
        if ch == MARK:
            spots.append((line, col))
            continue
        out.append(ch)
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
    return "".join(out), spots


def lay_out(tmp_path: Path, config: str, rules: dict[str, str]) -> dict[str, list[tuple[int, int]]]:
    """Write nfrewrite.toml and rules/*; return the marked spots per written path."""
    spots: dict[str, list[tuple[int, int]]] = {}
    text, spots["nfrewrite.toml"] = unmark(config)
    (tmp_path / "nfrewrite.toml").write_text(text)
    (tmp_path / "rules").mkdir(exist_ok=True)
    for name, body in rules.items():
        text, spots[f"rules/{name}"] = unmark(body)
        (tmp_path / "rules" / name).write_text(text)
    return spots


def check(tmp_path: Path) -> Result:
    return nfrewrite("check", "-c", "nfrewrite.toml", cwd=tmp_path)


def assert_reported(err: str, where: str, severity: str, text: str) -> None:
    """A diagnostic ``where: severity: ...text...`` followed by its source line and caret."""
    lines = err.splitlines()
    heads = [i for i, ln in enumerate(lines) if ln.startswith(f"{where}: {severity}: ")]
    assert heads, f"no {severity} at {where} in:\n{err}"
    hits = [i for i in heads if text in lines[i]]
    assert hits, f"{where}: {severity} does not say {text!r}:\n{err}"
    i = hits[0]
    col = int(where.rsplit(":", 1)[1])
    source, caret = lines[i + 1], lines[i + 2]
    assert source.startswith("    ")
    assert caret == " " * (4 + col - 1) + "^"  # under column `col` of the 4-space-indented line


# (name, rule file with ⟪ at the offending spot, severity, words the message must contain)
RULE_CASES: list[tuple[str, str, str, str]] = [
    ("unknown rule key", f'[[rule]]\nname = "a"\nset = {{ ttl = 1 }}\n{MARK}verdit = "drop"\n',
     "error", "unknown key 'verdit' in a rule (did you mean 'verdict'?)"),
    ("unknown match key",
     f'[[rule]]\nname = "a"\nmatch = {{ {MARK}dprt = 80 }}\nset = {{ ttl = 1 }}\n',
     "error", "unknown key 'dprt' in match (did you mean 'dport'?)"),
    ("unknown replace key",
     f'[[rule]]\nname = "a"\nreplace = [ {{ find = "a", {MARK}wiht = "b" }} ]\n',
     "error", "unknown key 'wiht' in a replace entry (did you mean 'with'?)"),
    ("unknown key without suggestion",
     f'[[rule]]\nname = "a"\n{MARK}zzz = 1\nset = {{ ttl = 1 }}\n',
     "error", "unknown key 'zzz' in a rule (allowed: name, match"),
    ("wrong type for a port", f'[[rule]]\nname = "a"\nmatch = {{ dport = {MARK}true }}\n'
     "set = { ttl = 1 }\n", "error", "dport must be a port number"),
    ("quoted integer", f'[[rule]]\nname = "a"\nset = {{ ttl = {MARK}"64" }}\n',
     "error", "set.ttl must be an integer, not string (write 64 without quotes)"),
    ("port out of range", f'[[rule]]\nname = "a"\nmatch = {{ dport = {MARK}70000 }}\n'
     "set = { ttl = 1 }\n", "error", "dport 70000 is out of range (0..65535)"),
    ("port out of range in a list",
     f'[[rule]]\nname = "a"\nmatch = {{ dport = [80, {MARK}70000] }}\nset = {{ ttl = 1 }}\n',
     "error", "dport 70000 is out of range"),
    ("port out of range inside a range string",
     f'[[rule]]\nname = "a"\nmatch = {{ sport = "1-{MARK}70000" }}\nset = {{ ttl = 1 }}\n',
     "error", "sport range: port 70000 is out of range (0..65535)"),
    ("reversed range", f'[[rule]]\nname = "a"\nmatch = {{ sport = {MARK}"90-80" }}\n'
     "set = { ttl = 1 }\n", "error", 'sport range 90-80 is reversed (did you mean "80-90"?)'),
    ("malformed range", f'[[rule]]\nname = "a"\nmatch = {{ sport = {MARK}"80..90" }}\n'
     "set = { ttl = 1 }\n", "error", "sport range '80..90' is malformed"),
    ("bad IPv4 CIDR", f'[[rule]]\nname = "a"\nmatch = {{ src = {MARK}"10.0.0.300/8" }}\n'
     "set = { ttl = 1 }\n", "error", "src '10.0.0.300/8' is not an IPv4 or IPv6 address or CIDR"),
    ("bad IPv6 CIDR",
     f'[[rule]]\nname = "a"\nmatch = {{ dst = ["10.0.0.0/8", {MARK}"2001:db8::g/32"] }}'
     "\nset = { ttl = 1 }\n", "error", "dst '2001:db8::g/32' is not an IPv4 or IPv6"),
    ("IPv4 host bits set", f'[[rule]]\nname = "a"\nmatch = {{ src = {MARK}"10.1.2.3/8" }}\n'
     "set = { ttl = 1 }\n", "error", 'has host bits set (did you mean "10.0.0.0/8"?)'),
    ("IPv6 host bits set", f'[[rule]]\nname = "a"\nmatch = {{ dst = {MARK}"2001:db8::1/32" }}\n'
     "set = { hop_limit = 1 }\n", "error", 'has host bits set (did you mean "2001:db8::/32"?)'),
    ("src and dst families conflict",
     f'[[rule]]\nname = "a"\nmatch = {{ src = "10.0.0.0/8", dst = {MARK}"2001:db8::/32" }}\n'
     "set = { ttl = 1 }\n", "error", "dst is IPv6 but src is IPv4: this rule can never match"),
    ("bad hex digit", f'[[rule]]\nname = "a"\nreplace = [ {{ find_hex = "de ad {MARK}zz", '
     'with_hex = "00 00" } ]\n', "error", "bad hex digit 'z' in find_hex"),
    ("odd hex", f'[[rule]]\nname = "a"\nreplace = [ {{ find = "ab", with_hex = {MARK}"616" }} ]\n',
     "error", "with_hex has an odd number of hex digits (3)"),
    ("empty find", f'[[rule]]\nname = "a"\nreplace = [ {{ find = {MARK}"", with = "x" }} ]\n',
     "error", "find must not be empty"),
    ("missing with", f'[[rule]]\nname = "a"\nreplace = [ {MARK}{{ find = "x" }} ]\n',
     "error", "missing with (or with_hex)"),
    ("find and find_hex together",
     f'[[rule]]\nname = "a"\nreplace = [ {{ find = "x", {MARK}find_hex = "78", with = "y" }} ]\n',
     "error", "give find or find_hex, not both"),
    ("missing name", f'{MARK}[[rule]]\nset = {{ ttl = 1 }}\n', "error", "rule has no name"),
    ("malformed name", f'[[rule]]\nname = {MARK}"Hide Banner"\nset = {{ ttl = 1 }}\n',
     "error", "rule name 'Hide Banner' is malformed"),
    ("find equal to with",
     f'[[rule]]\nname = "a"\nreplace = [ {{ find = "x", with = {MARK}"x" }} ]\n',
     "warning", "with equals find: this replace does nothing"),
    ("rule that does nothing", f'{MARK}[[rule]]\nname = "a"\nmatch = {{ dport = 80 }}\n',
     "warning", 'rule does nothing: give it replace, set, or verdict = "drop"'),
    ("bad verdict", f'[[rule]]\nname = "a"\nverdict = {MARK}"dorp"\n',
     "error", "verdict 'dorp' is not valid (did you mean 'drop'?)"),
    ("unsupported protocol", f'[[rule]]\nname = "a"\nmatch = {{ protocol = {MARK}"udp" }}\n'
     "set = { ttl = 1 }\n", "error", "protocol 'udp' is not supported"),
    ("mss out of range", f'[[rule]]\nname = "a"\nset = {{ mss = {MARK}100 }}\n',
     "error", "set.mss 100 is out of range (536..65535)"),
    ("mss and mss_max together",
     f'[[rule]]\nname = "a"\nset = {{ mss = 1400, {MARK}mss_max = 1300 }}\n',
     "error", "set.mss and set.mss_max exclude each other"),
    ("replace written as a table",
     f'[[rule]]\nname = "a"\nreplace = {MARK}{{ find = "a", with = "b" }}\n',
     "error", "replace must be an array"),
    ("single [rule] table", f'{MARK}[rule]\nname = "a"\n', "error",
     "write each rule as [[rule]]"),
    ("TOML syntax: bare word value", f'[[rule]]\nname = "a"\nverdict = {MARK}drop\n',
     "error", "invalid TOML: invalid value"),
    ("TOML syntax: duplicate key", f'[[rule]]\nname = "a"\n{MARK}name = "b"\n',
     "error", "invalid TOML: duplicate key"),
    ("TOML syntax: unclosed header", f'[[rule{MARK}]\nname = "a"\n', "error",
     "invalid TOML: expected ']]'"),
    ("error inside [[rule.replace]] tables",
     '[[rule]]\nname = "a"\n[[rule.replace]]\nfind = "x"\nwith = "y"\n\n'
     f'[[rule.replace]]  # second\nfind = {MARK}""\nwith = "z"\n',
     "error", "find must not be empty"),
    ("error under a [rule.match] header",
     f'[[rule]]\nname = "a"\nset.ttl = 1\n[rule.match]\nsport = 80\n  {MARK}dst_port = 1\n',
     "error", "unknown key 'dst_port' in match"),
    ("error in a dotted key in the second rule",
     '[[rule]]\nname = "a"\nset.ttl = 1\n\n[[rule]]\nname = "b"\nset.ttl = 1\n'
     f'match.dport = [ 80,\n   # https\n   {MARK}"443-80" ]\n',
     "error", "dport range 443-80 is reversed"),
    ("regex backreference",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = '(a){MARK}\\1', with = 'b' }} ]\n",
     "error", "find_regex refused: backreferences"),
    ("regex lookahead",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = '{MARK}(?=x)y', with = 'b' }} ]\n",
     "error", "find_regex refused: lookaround"),
    ("regex unbounded repetition not at the end",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = 'Server:.{MARK}*\\r\\n', "
     "with = 'b' } ]\n", "error", "an unbounded repetition (* + {m,}) is allowed only"),
    ("regex longer than its max_len",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = {MARK}'[0-9]{{1,64}}', with = 'b', "
     "max_len = 16 } ]\n", "error", "a match can be 64 bytes long, more than max_len = 16"),
    ("max_len out of range",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = 'a[^\\n]*', with = 'b', "
     f"max_len = {MARK}1000000 }} ]\n", "error", "max_len 1000000 is out of range (1..4096)"),
    ("max_len on a literal",
     f'[[rule]]\nname = "a"\nreplace = [ {{ find = "x", with = "y", {MARK}max_len = 9 }} ]\n',
     "error", "max_len applies to find_regex only"),
    ("regex with a bad escape in with",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = '(a)', with = 'x{MARK}\\n' }} ]\n",
     "error", "a backslash must start"),
    ("find_regex and find together",
     f"[[rule]]\nname = \"a\"\nreplace = [ {{ find_regex = 'a', {MARK}find = 'a', "
     "with = 'b' } ]\n", "error", "give find_regex or find, not both"),
    ("ttl on an IPv6-only rule", f'[[rule]]\nname = "a"\nmatch = {{ dst = "::/0" }}\n'
     f'set = {{ {MARK}ttl = 64 }}\n', "warning", "set.ttl applies to IPv4 only"),
]


@pytest.mark.parametrize(
    "body,severity,words", [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES]
)
def test_each_rule_mistake_is_reported_at_its_exact_spot(
    tmp_path: Path, body: str, severity: str, words: str
) -> None:
    spots = lay_out(tmp_path, CONFIG, {"10-x.toml": body})
    [(line, col)] = spots["rules/10-x.toml"]
    result = check(tmp_path)
    assert_reported(result.err, f"rules/10-x.toml:{line}:{col}", severity, words)
    if severity == "error":
        assert result.rc == 1
        assert result.out == ""
    else:
        assert result.rc == 0, result.err
        assert result.out == "1 rules in 1 files OK\n"


CONFIG_CASES: list[tuple[str, str, str]] = [
    ("unknown top-level key", f'{MARK}rule_dir = "rules"\n',
     "unknown key 'rule_dir' in the config file (did you mean 'rules_dir'?)"),
    ("unknown table", f'[{MARK}queu]\nnum = 1\n', "unknown key 'queu' in the config file "
     "(did you mean 'queue'?)"),
    ("queue number out of range", f'[queue]\nnum = {MARK}65536\n',
     "queue.num 65536 is out of range (0..65535)"),
    ("zero workers", f'[queue]\nworkers = {MARK}0\n', "queue.workers 0 is out of range (1..64)"),
    ("queues past 65535", f'[queue]\nnum = 65535\nworkers = {MARK}2\n',
     "queues 65535..65536 run past 65535"),
    ("bridge name too long", f'[[bridge]]\nname = {MARK}"a-very-long-bridge"\nports = ["eth1"]\n',
     "not a valid interface name: longer than 15 bytes"),
    ("bridge without ports", f'{MARK}[[bridge]]\nname = "br0"\n', "bridge has no ports"),
    ("bridge with an empty port list", f'[[bridge]]\nname = "br0"\nports = {MARK}[]\n',
     "ports must name at least one interface"),
    ("port of two bridges",
     f'[[bridge]]\nname = "br0"\nports = ["eth1"]\n'
     f'[[bridge]]\nname = "br1"\nports = [{MARK}"eth1"]\n',
     "port 'eth1' is already a port of bridge 'br0'"),
    ("unknown offload",
     f'[[bridge]]\nname = "br0"\nports = ["eth1"]\noffloads = {{ {MARK}gr0 = false }}\n',
     "unknown key 'gr0' in offloads (did you mean 'gro'?)"),
    ("offload not a boolean",
     f'[[bridge]]\nname = "br0"\nports = ["eth1"]\noffloads = {{ gro = {MARK}"off" }}\n',
     "offloads.gro must be true or false, not string"),
    ("IPv6 listen without brackets", f'[metrics]\nlisten = {MARK}"::1:9640"\n',
     'write an IPv6 address in brackets, e.g. "[::1]:9640"'),
    ("listen port out of range", f'[metrics]\nlisten = {MARK}"127.0.0.1:99999"\n',
     "port 99999 is out of range (1..65535)"),
    ("negative idle timeout", f'[flows]\nidle_timeout = {MARK}-1\n',
     "flows.idle_timeout -1 is out of range"),
    ("missing rules dir", f'rules_dir = {MARK}"nope"\n', "rules directory 'nope' does not exist"),
    ("rules_dir not a string", f'rules_dir = {MARK}7\n', "rules_dir must be a string, not integer"),
    ("TOML syntax error", f'[queue{MARK}\nnum = 1\n',
     "invalid TOML: expected ']' at the end of a table declaration"),
]


@pytest.mark.parametrize(
    "body,words", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_each_config_mistake_is_reported_at_its_exact_spot(
    tmp_path: Path, body: str, words: str
) -> None:
    spots = lay_out(tmp_path, body, {"10-ok.toml": GOOD_RULE})
    [(line, col)] = spots["nfrewrite.toml"]
    result = check(tmp_path)
    assert_reported(result.err, f"nfrewrite.toml:{line}:{col}", "error", words)
    assert result.rc == 1
    assert result.out == ""


def test_duplicate_rule_name_across_files_points_at_both(tmp_path: Path) -> None:
    spots = lay_out(tmp_path, CONFIG, {
        "10-a.toml": f'# first\n[[rule]]\nname = {MARK}"banner"\nset = {{ ttl = 1 }}\n',
        "20-b.toml": f'[[rule]]\nname = {MARK}"banner"\nset = {{ ttl = 2 }}\n',
    })
    (l1, c1), (l2, c2) = spots["rules/10-a.toml"][0], spots["rules/20-b.toml"][0]
    result = check(tmp_path)
    assert result.rc == 1
    assert_reported(result.err, f"rules/20-b.toml:{l2}:{c2}", "error",
                    f"duplicate rule name 'banner' (first defined at rules/10-a.toml:{l1}:{c1})")


def test_in_port_must_be_a_port_of_a_configured_bridge(tmp_path: Path) -> None:
    config = 'rules_dir = "rules"\n[[bridge]]\nname = "br0"\nports = ["eth1", "eth2"]\n'
    spots = lay_out(tmp_path, config, {
        "10-x.toml": f'[[rule]]\nname = "a"\nmatch = {{ in_port = {MARK}"eth3" }}\n'
                     'set = { ttl = 1 }\n',
    })
    [(line, col)] = spots["rules/10-x.toml"]
    result = check(tmp_path)
    assert result.rc == 1
    assert_reported(result.err, f"rules/10-x.toml:{line}:{col}", "error",
                    "in_port 'eth3' is not a port of any [[bridge]]")


def test_invalid_utf8_is_reported_at_the_byte(tmp_path: Path) -> None:
    lay_out(tmp_path, CONFIG, {})
    (tmp_path / "rules" / "10-x.toml").write_bytes(b'[[rule]]\nname = "a\xff"\n')
    result = check(tmp_path)
    assert result.rc == 1
    assert "rules/10-x.toml:2:10: error: not valid UTF-8 (byte 0xff)" in result.err


def test_all_errors_of_all_files_are_reported_in_one_run(tmp_path: Path) -> None:
    config = f'rules_dir = "rules"\n[queue]\nnum = {MARK}-1\n{MARK}wrokers = 2\n'
    first = (
        "# several mistakes in one file\n"
        "[[rule]]\n"
        f'name = {MARK}"Bad"\n'
        f'match = {{ dport = {MARK}"443-80", src = {MARK}"10.0.0.1/8" }}\n'
        f'replace = [ {{ find = {MARK}"", with = "x" }}, '
        f'{{ find_hex = "0{MARK}g", with = "y" }} ]\n'
        "\n"
        "[[rule]]\n"
        'name = "fine"\n'
        f'set = {{ ttl = {MARK}0, window = 1 }}\n'
    )
    second = f'[[rule]]\nname = "other"\nverdict = {MARK}"reject"\n'
    spots = lay_out(tmp_path, config, {"10-first.toml": first, "20-second.toml": second})
    result = check(tmp_path)
    assert result.rc == 1
    expected = (
        [f"nfrewrite.toml:{ln}:{c}: error:" for ln, c in spots["nfrewrite.toml"]]
        + [f"rules/10-first.toml:{ln}:{c}: error:" for ln, c in spots["rules/10-first.toml"]]
        + [f"rules/20-second.toml:{ln}:{c}: error:" for ln, c in spots["rules/20-second.toml"]]
    )
    head = re.compile(r"^\S+:\d+:\d+: (error|warning):")
    heads = [ln for ln in result.err.splitlines() if head.match(ln)]
    assert [h.split(" error:")[0] + " error:" for h in heads] == expected, result.err
    assert len(expected) == 9
    assert result.err.rstrip().endswith("nfrewrite: check failed: 9 errors")


def test_ok_prints_one_summary_line_on_stdout(tmp_path: Path) -> None:
    lay_out(tmp_path, CONFIG, {"10-a.toml": GOOD_RULE, "20-b.toml": GOOD_RULE.replace("ok", "ok2")})
    result = check(tmp_path)
    assert (result.rc, result.out, result.err) == (0, "2 rules in 2 files OK\n", "")


def test_the_shipped_config_and_rules_are_valid() -> None:
    result = nfrewrite("check", "-c", "nfrewrite.toml", cwd=REPO)
    assert result.rc == 0, result.err
    assert re.fullmatch(r"\d+ rules in \d+ files OK\n", result.out)
    assert result.err == ""  # not even a warning


def test_length_changing_replaces_can_be_refused(tmp_path: Path) -> None:
    spots = lay_out(tmp_path, CONFIG, {
        "10-x.toml": f'[[rule]]\nname = "a"\nreplace = [ {{ find = "ab", with = {MARK}"abc" }} ]\n',
    })
    [(line, col)] = spots["rules/10-x.toml"]
    assert check(tmp_path).rc == 0
    result = nfrewrite("check", "--no-length-change", "-c", "nfrewrite.toml", cwd=tmp_path)
    assert result.rc == 1
    assert_reported(result.err, f"rules/10-x.toml:{line}:{col}", "error",
                    "length-changing replace is not supported yet (find is 2 bytes, with is 3)")


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    result = nfrewrite("check", "-c", "absent.toml", cwd=tmp_path)
    assert result.rc == 1
    assert result.err.startswith("absent.toml: error: cannot read: No such file or directory")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert nfrewrite(cwd=tmp_path).rc == 2
    assert nfrewrite("check", "--bogus", cwd=tmp_path).rc == 2
    assert nfrewrite("frobnicate", cwd=tmp_path).rc == 2


def test_run_refuses_an_unreadable_config_like_check(tmp_path: Path) -> None:
    run = nfrewrite("run", "-c", "x.toml", cwd=tmp_path)
    assert run.rc == 1
    assert "x.toml" in run.err


def test_the_console_script_is_the_same_command(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "nfrewrite"
    if not script.exists():
        pytest.skip("console script not installed")
    lay_out(tmp_path, CONFIG, {"10-a.toml": GOOD_RULE})
    proc = subprocess.run([str(script), "check", "-c", "nfrewrite.toml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (0, "1 rules in 1 files OK\n")


def test_a_runtime_failure_is_one_line_and_exit_4(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nfrewrite import cli

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the disk caught fire")

    monkeypatch.delenv("NFREWRITE_DEBUG", raising=False)
    monkeypatch.setattr(cli, "load_all", boom)
    assert cli.main(["check", "-c", "x.toml"]) == 4
    assert capsys.readouterr().err == "nfrewrite check: error: the disk caught fire\n"
