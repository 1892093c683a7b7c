"""`nfrewrite check` runs every rule's examples through the engine; one that does not hold is an
error at the example's own path:line:col (exit 1)."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from nfrewrite.config.examples import check_examples, example_packet, run_example, short_repr
from nfrewrite.config.rulefiles import load_rules
from nfrewrite.core.packet import TcpPacket, parse
from nfrewrite.core.rules import Match

REPO = Path(__file__).resolve().parent.parent
NFREWRITE = REPO / ".venv" / "bin" / "nfrewrite"


def check(tmp_path: Path, rules: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "nfrewrite.toml").write_text('rules_dir = "rules"\n')
    (tmp_path / "rules" / "50-test.toml").write_text(rules)
    return subprocess.run(
        [str(NFREWRITE), "check", "-c", "nfrewrite.toml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )


def test_the_shipped_rules_examples_hold_through_the_real_cli() -> None:
    proc = subprocess.run(
        [str(NFREWRITE), "check", "-c", "nfrewrite.toml"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "example" not in proc.stderr


def test_an_example_that_does_not_hold_fails_check_at_its_position(tmp_path: Path) -> None:
    proc = check(tmp_path, (
        '[[rule]]\n'
        'name = "grow"\n'
        'match = { dport = 25 }\n'
        'replace = [ { find = "HELO", with = "EHLO x" } ]\n'
        'examples = [\n'
        '  { input = "HELO a", output = "EHLO x a" },\n'
        '  { input = "HELO a", output = "EHLO a" },\n'
        ']\n'
    ))
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert first == (
        "rules/50-test.toml:7:3: error: example does not hold (rule 'grow'): "
        "expected 'EHLO a' got 'EHLO x a'"
    )
    assert proc.stderr.splitlines()[1:3] == [
        '      { input = "HELO a", output = "EHLO a" },',
        "      ^",
    ]
    assert "1 error" in proc.stderr and proc.stdout == ""


def test_examples_run_with_the_whole_ruleset_so_an_earlier_rule_can_win(tmp_path: Path) -> None:
    # Both rules match port 80; at the same position the first in rule order wins, so the second
    # rule's example (true on its own) does not hold among its neighbours.
    proc = check(tmp_path, (
        '[[rule]]\nname = "first"\nmatch = { sport = 80 }\n'
        'replace = [ { find = "nginx", with = "httpd" } ]\n'
        '[[rule]]\nname = "second"\nmatch = { sport = 80 }\n'
        'replace = [ { find = "nginx/1.2", with = "web/9.9" } ]\n'
        '[[rule.examples]]\ninput = "nginx/1.2"\noutput = "web/9.9"\n'
    ))
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "rules/50-test.toml:9:1: error: example does not hold (rule 'second'): "
        "expected 'web/9.9' got 'httpd/1.2'"
    )


def test_a_dropped_example_says_which_rule_dropped_it(tmp_path: Path) -> None:
    proc = check(tmp_path, (
        '[[rule]]\nname = "block"\nmatch = { dport = 23 }\nverdict = "drop"\n'
        'examples = [ { input = "root", output = "root" } ]\n'
    ))
    assert proc.returncode == 1
    assert "expected 'root' got <dropped by rule 'block'>" in proc.stderr
    assert proc.stderr.startswith("rules/50-test.toml:5:14: error:")


def test_examples_that_hold_pass_hex_ipv6_and_length_changes(tmp_path: Path) -> None:
    proc = check(tmp_path, (
        '[[rule]]\nname = "v6"\nmatch = { src = "2001:db8:5::/48", sport = "1000-2000" }\n'
        'replace = [ { find_hex = "00ff", with_hex = "ffffff" } ]\n'
        'examples = [ { input_hex = "00 00ff 00", output_hex = "00ffffff00" } ]\n'
    ))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "1 rules in 1 files OK\n"


def test_the_example_packet_falls_under_the_rules_match() -> None:
    match = Match(
        sport=((1000, 2000),), dport=((25, 25), (587, 587)),
        src=(ipaddress.ip_network("10.9.0.0/16"),),
        dst=(ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("192.0.2.8/32")),
    )
    pkt = parse(example_packet(match, b"hello"))
    assert isinstance(pkt, TcpPacket)
    assert (pkt.version, pkt.sport, pkt.dport, pkt.payload) == (4, 1000, 25, b"hello")
    assert (pkt.src, pkt.dst) == (bytes([10, 9, 0, 1]), bytes([192, 0, 2, 8]))
    assert match.matches(pkt.version, pkt.src, pkt.dst, pkt.sport, pkt.dport, None, None)
    assert pkt.tcp_checksum_ok() and pkt.ip_checksum_ok()
    only_v6 = Match(dst=(ipaddress.ip_network("2001:db8::/32"),))
    pkt6 = parse(example_packet(only_v6, b""))
    assert isinstance(pkt6, TcpPacket) and pkt6.version == 6 and pkt6.tcp_checksum_ok()


def test_run_example_on_the_shipped_rules() -> None:
    ruleset, _ = load_rules(str(REPO / "rules"))
    assert ruleset is not None
    ran = 0
    for rule in ruleset.rules:
        for ex in rule.examples:
            assert run_example(ruleset, rule, ex) == (ex.output, None)
            ran += 1
    assert ran >= 4


def test_short_repr_shows_a_window_around_the_first_difference() -> None:
    assert short_repr(b"abc", b"abd") == ("'abc'", "'abd'")
    exp = b"x" * 100 + b"EXPECTED" + b"y" * 100
    got = b"x" * 100 + b"GOT" + b"y" * 100
    e, g = short_repr(exp, got)
    assert e.startswith("[@88] ...'xxxxxxxxxxxxEXPECTED") and e.endswith("... (208 bytes)")
    assert g.startswith("[@88] ...'xxxxxxxxxxxxGOT")
    assert short_repr(b"\xff\x00", b"\xff") == ("b'\\xff\\x00'", "b'\\xff'")


def test_a_failing_example_shows_its_line_as_loaded_not_as_the_file_says_now(
    tmp_path: Path,
) -> None:
    """The example's line comes from the text that was loaded: the file replaced since (here by
    a link to another file) is not read again, by name or through the link."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.toml").write_text(
        '[[rule]]\nname = "r"\nreplace = [ { find = "a", with = "b" } ]\n'
        'examples = [ { input = "a", output = "c" } ]\n')
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is not None and diags == []
    (tmp_path / "other.toml").write_text("1\n2\n3\nFOUR, read through a link\n")
    (tmp_path / "rules" / "a.toml").unlink()
    (tmp_path / "rules" / "a.toml").symlink_to(tmp_path / "other.toml")
    failed = check_examples(ruleset)
    assert [(d.line, d.col, d.source) for d in failed] == [
        (4, 14, 'examples = [ { input = "a", output = "c" } ]')]


def test_regex_examples_run_through_the_same_matcher(tmp_path: Path) -> None:
    """Leftmost-longest, cut at max_len, groups and case-insensitivity: what check promises is
    what the engine does on the wire (the same Engine and Selection)."""
    proc = check(tmp_path, (
        '[[rule]]\nname = "server"\nmatch = { sport = 80 }\n'
        "replace = [ { find_regex = 'Server: [^\\r\\n]*', with = 'Server: web' },\n"
        "            { find_regex = '(?i)x-powered-by: php/([0-9]{1,2})[0-9.]*', "
        "with = 'X-Powered-By: PHP/\\1', max_len = 24 } ]\n"
        'examples = [\n'
        '  { input = "HTTP/1.0 200 OK\\r\\nServer: SimpleHTTP/0.6 Python/3.11\\r\\n\\r\\n", '
        'output = "HTTP/1.0 200 OK\\r\\nServer: web\\r\\n\\r\\n" },\n'
        '  { input = "x-powered-by: PHP/8.2.7\\r\\n", output = "X-Powered-By: PHP/8\\r\\n" },\n'
        '  { input = "Server: a\\r\\nServer: b", output = "Server: web\\r\\nServer: web" },\n'
        '  { input = "Server: nginx", output = "Server: nginx" },\n'
        ']\n'
    ))
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == ("rules/50-test.toml:10:3: error: example does not hold (rule 'server'): "
                        "expected 'Server: nginx' got 'Server: web'")
    assert "1 error" in proc.stderr
