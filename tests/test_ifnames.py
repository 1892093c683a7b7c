"""One interface-name validator for ``check`` and for start-up.

``nfrewrite check`` (the unit's ``ExecStartPre``) and the daemon's start must agree on every name:
a name check accepts and start refuses puts the service in a restart loop. Names Linux accepts
such as "lan+0" and "wan#1" must work end to end (bridge, kernel rules, traffic); names start
cannot handle ("lan+" is an iptables wildcard, "br%d" a kernel name template) must be refused by
check with the file, line and column.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import Daemon, Lab, tcp_exchange
from nfrewrite.config.ifname import ifname_problem
from nfrewrite.config.settings import load_config
from nfrewrite.kernel.ruletext import QueueMatch, restore_text

# every kind of character the kernel, iptables or the config's quoting treat specially
CANDIDATES = [
    "lan+0", "wan#1", "eth0", "a!b", "!x", 'a"b', "a'b", "a\\b", "a*b", "-ab", "a,b", "a;b",
    "a@b", "a=b", "é", "x" * 15, "é" * 7 + "x",
    # refused:
    "", ".", "..", "a/b", "a:b", "a b", "a\tb", "x" * 16, "é" * 8, "à", "a\xa0b", "lan+", "+",
    "br%d", "a\x01b",
]
REFUSED = {"", ".", "..", "a/b", "a:b", "a b", "a\tb", "x" * 16, "é" * 8, "à", "a\xa0b", "lan+",
           "+", "br%d", "a\x01b"}


@pytest.mark.parametrize("name", CANDIDATES)
def test_check_and_the_kernel_rules_agree_on_every_name(name: str) -> None:
    """What the config accepts, the prefilter's QueueMatch (used at start) accepts, and the
    reverse; the two used to differ ("lan+0": check yes, start no; "a:b": check no, start yes)."""
    check_ok = ifname_problem(name) is None
    try:
        QueueMatch(in_port=name, out_port=name)
        start_ok = True
    except ValueError:
        start_ok = False
    assert check_ok == start_ok == (name not in REFUSED)


def test_an_odd_but_valid_name_reaches_iptables_quoted() -> None:
    text = restore_text([QueueMatch(in_port="wan#1", out_port='a"b')], 4, 0, 1)
    assert '-m physdev --physdev-in "wan#1" --physdev-out "a\\"b"' in text


def _config(tmp_path: Path, ports: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    path = tmp_path / "nfrewrite.toml"
    path.write_text(f'[[bridge]]\nname = "br0"\nports = [{ports}]\n')
    return path


@pytest.mark.parametrize(("port", "col", "why"), [
    ("lan+", 18, "ends with '+' (iptables would match every name that starts with the rest)"),
    ("br%d", 18, "contains '%' (the kernel would turn it into a number"),
    ("à", 18, "contains 'à', whose UTF-8 bytes the kernel counts as a space"),
])
def test_check_refuses_what_start_cannot_use_with_its_position(
    tmp_path: Path, port: str, col: int, why: str
) -> None:
    path = _config(tmp_path, f'"eth1", "{port}"')
    config, diags = load_config(str(path))
    assert config is None
    assert len(diags) == 1
    head = diags[0].format().splitlines()[0]
    assert head.startswith(f"{path}:3:{col}: error: port '{port}' is not a valid interface "
                           f"name: {why}")
    assert "pick another" in head


# -- end to end: the names Linux accepts work -----------------------------------------------------

RULE = """
[[rule]]
name = "server-header"
match = { sport = 8080, in_port = "wan#1", out_port = "lan+0" }
replace = [ { find = "Server: nginx", with = "Server: webby" } ]
"""
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.privileged
def test_the_kernel_accepts_exactly_the_names_we_accept_but_two_on_purpose(lab: Lab) -> None:
    """A veth by each name in the appliance namespace: the kernel agrees with the validator,
    except for the two refusals that are ours ('%' templates, the '+' wildcard), and names
    with a control character (which we refuse for logs and labels)."""
    ours = {"lan+", "+", "br%d", "a\x01b"}
    for i, name in enumerate(CANDIDATES):
        if not name:
            continue
        proc = lab.run("appliance", ["ip", "link", "add", name, "type", "veth", "peer", "name",
                                     f"peer{i}"], check=False)
        kernel_ok = proc.returncode == 0
        if kernel_ok:
            lab.run("appliance", ["ip", "link", "del", f"peer{i}"])
        expected = ifname_problem(name) is None or name in ours
        assert kernel_ok == expected, (name, proc.stderr)


@pytest.mark.privileged
def test_ports_named_lan_plus_0_and_wan_hash_1_pass_check_start_and_carry_traffic(
    lab: Lab, workdir: str
) -> None:
    for old, new in (("nfr0", "lan+0"), ("nfr1", "wan#1")):
        lab.run("appliance", ["ip", "link", "set", old, "name", new])
    os.makedirs(os.path.join(workdir, "rules"), mode=0o700)
    os.chmod(workdir, 0o700)
    Path(workdir, "rules", "10-http.toml").write_text(RULE)
    os.chmod(os.path.join(workdir, "rules", "10-http.toml"), 0o600)
    config = os.path.join(workdir, "nfrewrite.toml")
    Path(config).write_text('rules_dir = "rules"\n[[bridge]]\nname = "br0"\n'
                            'ports = ["lan+0", "wan#1"]\n[metrics]\nlisten = "127.0.0.1:9641"\n')
    os.chmod(config, 0o600)
    check = subprocess.run([sys.executable, "-m", "nfrewrite", "check", "-c", config],
                           capture_output=True, text=True, timeout=60, check=False,
                           env=lab.python_env())
    assert check.returncode == 0, check.stderr
    with Daemon(lab, config):
        saved = lab.run("appliance", ["iptables-save", "-t", "mangle"]).stdout
        assert "--physdev-in wan#1 --physdev-out lan+0" in saved
        lab.wait_reachable()
        got = tcp_exchange(lab, b"GET / HTTP/1.1\r\n\r\n", RESPONSE * 5)
        assert got.client_received == RESPONSE.replace(b"nginx", b"webby") * 5
