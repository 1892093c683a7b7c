"""Host mode and routed mode: the machine's own TCP rewritten (OUTPUT and INPUT), and a router's.

The host lab (``Lab(shape="host")``) has two namespaces: the client, and the host, which runs the
daemon with ``[host] enabled = true`` and the servers it rewrites. The client receives through a
"wire" that completes checksums as a NIC would (see ``lab.netns``), so a capture there shows what
the host really sent. The routed lab has a client and a server on two subnets, the router between
them running the daemon without a bridge (FORWARD).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.netns import Daemon, Lab, read_line, tcp_exchange, write_lab_config
from nfrewrite.config.settings import load_all, load_config
from nfrewrite.kernel.prefilter import compile_host_prefilter, compile_prefilter, kernel_plan
from nfrewrite.kernel.ruletext import HOST_CHAIN, HOST_JUMPS, LO_CHAIN, render, restore_text
from tests.test_seqadj_e2e import C2S, RULES, S2C, rewritten_count, stream, undo

HOST = {"shape": "host"}
ROUTED = {"shape": "routed"}

HTTP_RULES = """
[[rule]]
name = "banner"
match = { sport = 8080 }
replace = [ { find = "Server: SimpleHTTP/", with = "Server: web/" },
            { find = "hello", with = "HELLO" } ]

[[rule]]
name = "request-path"
match = { dport = 8080 }
replace = [ { find = "GET /very-long-secret-name.txt", with = "GET /p.txt" } ]
"""


# -- config and kernel rules (no kernel) ------------------------------------------------------


def _files(tmp_path: Path, config: str, rules: str) -> str:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "10.toml").write_text(rules)
    path = tmp_path / "nfrewrite.toml"
    path.write_text(config)
    return str(path)


def test_host_mode_is_off_by_default_and_its_key_is_checked(tmp_path: Path) -> None:
    config, diags = load_config(_files(tmp_path, "", ""))
    assert config is not None and not config.host.enabled and diags == []
    config, diags = load_config(_files(tmp_path, "[host]\nenabled = true\n", ""))
    assert config is not None and config.host.enabled
    config, diags = load_config(_files(tmp_path, '[host]\nenabled = "yes"\nenbled = 1\n', ""))
    assert config is None
    text = [d.format().splitlines()[0] for d in diags]
    assert any(":2:11: error: host.enabled must be true or false" in t for t in text), text
    assert any(":3:1: error:" in t and "enabled" in t for t in text), text


LO_RULE = '[[rule]]\nname = "lo"\nmatch = {{ {match} }}\nset = {{ ttl = 9 }}\n'


@pytest.mark.parametrize(("config", "match", "message"), [
    ("", 'out_port = "lo"', "out_port 'lo' (the machine's own loopback traffic) needs host mode"),
    ("[host]\nenabled = true\n", 'in_port = "lo"', "in_port 'lo' cannot apply"),
    ("[host]\nenabled = true\n", 'in_port = "eth1"',
     "in_port names a bridge port and no [[bridge]] is configured"),
    ('[host]\nenabled = true\n[[bridge]]\nname = "br0"\nports = ["eth1"]\n',
     'in_port = "eth1", out_port = "lo"', "in_port cannot apply with out_port = \"lo\""),
])
def test_ports_that_cannot_apply_to_host_traffic_are_refused_where_written(
    tmp_path: Path, config: str, match: str, message: str
) -> None:
    _, ruleset, diags = load_all(_files(tmp_path, config, LO_RULE.format(match=match)),
                                 permissions=False)
    assert ruleset is None
    errors = [d.format().splitlines()[0] for d in diags if d.severity == "error"]
    assert len(errors) == 1 and message in errors[0] and ":3:" in errors[0], errors


def test_bridge_ports_stay_valid_in_host_mode_and_lo_is_valid_there(tmp_path: Path) -> None:
    config = '[host]\nenabled = true\n[[bridge]]\nname = "br0"\nports = ["eth1"]\n'
    rules = LO_RULE.format(match='out_port = "lo"') + LO_RULE.format(
        match='in_port = "eth1"').replace('name = "lo"', 'name = "bridged"')
    _, ruleset, diags = load_all(_files(tmp_path, config, rules), permissions=False)
    assert ruleset is not None, [d.format() for d in diags]


def _ruleset(tmp_path: Path, rules: str, config: str = "[host]\nenabled = true\n") -> object:
    _, ruleset, diags = load_all(_files(tmp_path, config, rules), permissions=False)
    assert ruleset is not None, [d.format() for d in diags]
    return ruleset


def test_host_chains_get_portless_rules_lo_rules_and_whole_reverse_of_length_changes(
    tmp_path: Path
) -> None:
    rules = HTTP_RULES + """
[[rule]]
name = "local"
match = { dport = 9000, out_port = "lo" }
replace = [ { find = "abc", with = "xyz" } ]
"""
    ruleset = _ruleset(tmp_path, rules)
    host4, host6, lo4, lo6 = compile_host_prefilter(ruleset)  # type: ignore[arg-type]
    # the banner rule (sport 8080, shrinks) and its whole reverse; the request rule and its own
    assert {(m.sports, m.dports, m.syn_only) for m in host4} == {
        (((8080, 8080),), None, False), (None, ((8080, 8080),), False)}
    assert host4 == host6
    # no string match in the kernel: a pattern split across segments must reach the engine
    assert [(m.dports, m.literal, m.out_port) for m in lo4] == [(((9000, 9000),), None, None)]
    assert lo4 == lo6
    forward4, _ = compile_prefilter(ruleset)  # type: ignore[arg-type]
    assert all(m.dports != ((9000, 9000),) for m in forward4)  # nothing forwarded leaves by lo
    text = render(kernel_plan(ruleset, host=True))  # type: ignore[arg-type]
    for jump in HOST_JUMPS:
        assert text.count(jump) == 2  # both families
    assert f"-A {LO_CHAIN} -p tcp --dport 9000 -j NFQUEUE" in text
    assert f"-A {HOST_CHAIN} -m connmark --mark 0x1000000/0x1000000" in text
    assert HOST_CHAIN not in render(kernel_plan(ruleset))  # type: ignore[arg-type]


def test_a_plan_without_host_mode_deletes_what_a_host_mode_run_left() -> None:
    text = restore_text([], 4, existing_chains=[HOST_CHAIN, LO_CHAIN, "NFREWRITE_HOST_T0_1"],
                        delete_jumps=list(HOST_JUMPS), add_forward_jump=False,
                        add_post_jump=False)
    lines = text.splitlines()
    for jump in HOST_JUMPS:
        assert "-D" + jump[2:] in lines
    for chain in (HOST_CHAIN, LO_CHAIN, "NFREWRITE_HOST_T0_1"):
        assert f"-X {chain}" in lines
    assert not any(line.startswith("-A INPUT") or line.startswith("-A OUTPUT") for line in lines)


# -- the host lab -----------------------------------------------------------------------------


def _http_server(lab: Lab, workdir: str) -> subprocess.Popen[bytes]:
    www = os.path.join(workdir, "www")
    os.mkdir(www)
    with open(os.path.join(www, "p.txt"), "w") as f:
        f.write("hello from the host\n" * 3)
    return lab.popen("server", [sys.executable, "-m", "http.server", "8080", "--bind", "::",
                                "--directory", www])


def _curl(lab: Lab, url: str) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 10
    while True:
        res = lab.run("client", ["curl", "-sS", "-D", "-", "--max-time", "10", url], check=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            return res
        time.sleep(0.2)  # the server may still be starting


def _http_checks(lab: Lab, workdir: str) -> None:
    """The request path shrinks on its way in (the server has only /p.txt), the response header
    shrinks and its body changes, same length, on the way out; IPv4 and IPv6."""
    server = _http_server(lab, workdir)
    try:
        for host in (lab.server_v4, f"[{lab.server_v6}]"):
            res = _curl(lab, f"http://{host}:8080/very-long-secret-name.txt")
            assert res.returncode == 0, res.stderr
            assert "HTTP/1.0 200 OK" in res.stdout
            assert "Server: web/" in res.stdout and "SimpleHTTP" not in res.stdout
            assert res.stdout.endswith("HELLO from the host\n" * 3)
    finally:
        server.terminate()


def _exchange_checks(lab: Lab, size: int, seed: int, port: int = 8080) -> None:
    """Growing and shrinking edits both ways; every byte maps back; nearly all rewritten."""
    for family in (4, 6):
        up = stream(size, list(C2S), seed + family)
        down = stream(size, list(S2C), seed + family + 1)
        got = tcp_exchange(lab, up, down, family=family, timeout=60, port=port)
        assert undo(got.server_received, C2S) == up
        assert undo(got.client_received, S2C) == down
        assert rewritten_count(got.server_received, C2S) > 0.95 * sum(up.count(p) for p in C2S)
        assert rewritten_count(got.client_received, S2C) > 0.95 * sum(down.count(p) for p in S2C)


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [HOST], indirect=True)
def test_host_mode_rewrites_what_the_host_sends_and_receives(lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": HTTP_RULES}, bridge=False, host=True)
    with Daemon(lab, config) as daemon:
        lab.wait_reachable()
        _http_checks(lab, workdir)
        assert "host mode: queueing this machine's own TCP" in daemon.log()


#: wire-size segments at both ends: the statistic rule drops per skb, and a GSO super-packet
#: would make each drop lose ~45 segments at once
WIRE_SIZE_HOST = {**HOST, "client_offloads": {"tso": False, "gso": False},
                  "server_offloads": {"tso": False, "gso": False}}


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [WIRE_SIZE_HOST], indirect=True)
def test_host_mode_length_changes_both_ways_with_two_percent_loss(lab: Lab, workdir: str) -> None:
    """The host's own TCP stack is one end: its segments are edited at OUTPUT, the client's at
    INPUT (before the server reads them); 2 % of what each end receives is dropped."""
    config = write_lab_config(workdir, {"10.toml": RULES}, bridge=False, host=True)
    for tool in ("iptables", "ip6tables"):
        for role in ("client", "server"):  # the host's drop sits after our mangle INPUT
            lab.run(role, [tool, "-A", "INPUT", "-p", "tcp", "-m", "statistic", "--mode",
                           "random", "--probability", "0.02", "-j", "DROP"])
    with Daemon(lab, config):
        lab.wait_reachable()
        _exchange_checks(lab, 400_000, seed=20)
    dropped = sum(
        int(line.split()[0].strip("[]").split(":")[0])
        for tool in ("iptables", "ip6tables") for role in ("client", "server")
        for line in lab.run(role, [f"{tool}-save", "-c"]).stdout.splitlines()
        if "statistic" in line
    )
    assert dropped > 20  # loss really happened


def _tshark(pcap: str, *, only: str) -> list[list[str]]:
    out = subprocess.run(
        ["tshark", "-r", pcap, "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
         "-Y", only, "-T", "fields", "-e", "tcp.len", "-e", "tcp.checksum.status",
         "-e", "ip.checksum.status"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


CSUM_RULES = """
[[rule]]
name = "same-length"
match = { sport = 8080 }
replace = [ { find = "secret", with = "public" } ]

[[rule]]
name = "shorter"
match = { sport = 8080 }
replace = [ { find = "ODD-LONG", with = "ev" } ]
"""


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [HOST], indirect=True)
@pytest.mark.parametrize(("tx", "tso"), [(True, True), (True, False), (False, True),
                                         (False, False)])
def test_checksums_on_the_wire_for_each_offload_state_of_the_hosts_veth(
    lab: Lab, workdir: str, tx: bool, tso: bool
) -> None:
    """What the host sends, rewritten at OUTPUT (CHECKSUM_PARTIAL, GSO super-packets with TSO or
    software GSO), arrives with right IP and TCP checksums whatever the host's eth0 offloads:
    tshark on the client's capture finds none bad, and the client's kernel counts no error."""
    lab.run("server", ["ethtool", "-K", "eth0", "tx", "on" if tx else "off"])
    # with TX checksumming off the kernel cannot turn TSO on: asked anyway, as a NIC would be
    lab.run("server", ["ethtool", "-K", "eth0", "tso", "on" if tso else "off"], check=False)
    features = lab.run("server", ["ethtool", "-k", "eth0"]).stdout
    assert re.search(r"^tcp-segmentation-offload: (on|off)", features, re.M)
    config = write_lab_config(workdir, {"10.toml": CSUM_RULES}, bridge=False, host=True)
    # ~540 KB: about 370 wire segments, each with edits; 3000 edits, fewer than a flow keeps
    # unacknowledged (4096 per direction, past which edits are refused)
    body = b"".join(b"secret" + os.urandom(90 + i % 7).hex().encode() + b"x" * (i % 3)
                    + (b"ODD-LONG" if i % 4 == 0 else b"") for i in range(2400))
    pcap = os.path.join(workdir, "client.pcap")
    with Daemon(lab, config):
        lab.wait_reachable()
        before = lab.tcp_counters("client")["Tcp.InCsumErrors"]
        cap = lab.tcpdump("client", ["-U", "-i", "eth0", "-w", pcap, "tcp src port 8080"],
                          stdout=subprocess.DEVNULL)
        for family in (4, 6):
            got = tcp_exchange(lab, b"q", body, family=family, timeout=30)
            arrived = got.client_received
            assert arrived.replace(b"public", b"secret").replace(b"ev", b"ODD-LONG") == body
            assert arrived.count(b"public") > 2350 and arrived.count(b"ev") > 580
        time.sleep(0.3)
        cap.send_signal(signal.SIGINT)
        cap.communicate(timeout=5)
        after = lab.tcp_counters("client")["Tcp.InCsumErrors"]
    rows = _tshark(pcap, only="tcp.srcport == 8080")
    rewritten = _tshark(pcap, only='tcp.srcport == 8080 && frame contains "public"')
    assert len(rewritten) >= 300, len(rewritten)
    bad = [r for r in rows if r[1] == "0" or (len(r) > 2 and r[2] == "0")]  # 0 = bad
    assert bad == [], f"{len(bad)} of {len(rows)} segments with a bad checksum"
    assert all(r[1] == "1" for r in rows)  # every TCP checksum was verified as good
    assert after == before


def _loopback_exchange(lab: Lab, address: str, port: int, data: bytes) -> bytes:
    """A connection inside the host namespace, over its loopback: what the client received."""
    env = lab.python_env()
    server = lab.popen("server", [sys.executable, "-m", "lab.peer", "server", "--bind", address,
                                  "--port", str(port), "--timeout", "10"],
                       stdin=subprocess.PIPE, env=env)
    assert server.stdin is not None
    server.stdin.write(data)
    server.stdin.close()
    server.stdin = None
    assert read_line(server, 10).strip() == b"READY"
    client = lab.run("server", [sys.executable, "-m", "lab.peer", "client", "--connect", address,
                                "--port", str(port), "--timeout", "10"],
                     input=b"", text=False, env=env, timeout=15)
    server.communicate(timeout=15)
    return bytes.fromhex(json.loads(client.stdout)["received"])


LOOPBACK_RULES = """
[[rule]]
name = "everywhere-but-the-loopback"
match = { sport = 8080 }
replace = [ { find = "Server: nginx", with = "Server: webby" } ]

[[rule]]
name = "named-loopback"
match = { sport = 8081, out_port = "lo" }
replace = [ { find = "Server: nginx", with = "Server: local-proxy" } ]
"""


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [HOST], indirect=True)
def test_sigterm_restores_the_rulesets_and_the_loopback_is_only_rewritten_when_named(
    lab: Lab, workdir: str
) -> None:
    lab.run("server", ["iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"])
    lab.run("server", ["ip6tables", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"])

    def saves() -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            "\n".join(ln for ln in lab.run("server", [tool]).stdout.splitlines()
                      if not ln.startswith("#"))
            for tool in ("iptables-save", "ip6tables-save"))

    before = saves()
    config = write_lab_config(workdir, {"10.toml": LOOPBACK_RULES}, bridge=False, host=True)
    response = b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\n"
    daemon = Daemon(lab, config).start()
    try:
        during = saves()
        for jump in HOST_JUMPS:
            assert during[0].count(jump) == 1 and during[1].count(jump) == 1
        lab.wait_reachable()
        # over the veth, the host's response is rewritten ...
        assert tcp_exchange(lab, b"q", response).client_received == response.replace(
            b"nginx", b"webby")
        # ... over the loopback it is not (both families), unless a rule names "lo"
        for address in ("127.0.0.1", "::1"):
            assert _loopback_exchange(lab, address, 8080, response) == response
            assert _loopback_exchange(lab, address, 8081, response) == response.replace(
                b"nginx", b"local-proxy")
    finally:
        assert daemon.stop(timeout=5) == 0
    assert saves() == before


# -- the routed lab ---------------------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [ROUTED], indirect=True)
def test_routed_mode_rewrites_forwarded_traffic_end_to_end(lab: Lab, workdir: str) -> None:
    """client 198.18.0.1 -> router (no bridge, FORWARD) -> server 198.18.1.2, both families."""
    exchange_rules = RULES.replace("8080", "8090")  # "hello" may turn up in its random data
    config = write_lab_config(workdir, {"10.toml": HTTP_RULES, "20.toml": exchange_rules},
                              bridge=False)
    with Daemon(lab, config) as daemon:
        lab.wait_reachable()
        _http_checks(lab, workdir)
        _exchange_checks(lab, 400_000, seed=30, port=8090)
        assert "queueing routed (FORWARD) traffic" in daemon.log()
        assert HOST_CHAIN not in lab.run("appliance", ["iptables-save", "-t", "mangle"]).stdout
        assert daemon.stop() == 0
    assert "NFREWRITE" not in lab.run("appliance", ["iptables-save", "-t", "mangle"]).stdout
