"""firewall: our NFQUEUE rules go in, are swapped atomically, and come out leaving no trace.

Kernel tests run the Firewall inside the lab's appliance namespace (a child ``python -c``), for
both iptables variants (each in its own lab, so the two never share a namespace).
"""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from lab.netns import Lab, tcp_exchange
from nfrewrite.kernel.ruletext import (
    CHAIN,
    FORWARD_JUMP,
    POST_JUMP,
    QueueMatch,
    compile_rules,
    queue_target,
    render,
    restore_text,
)

VARIANTS = ["nft", "legacy"]

# -- compiling (no kernel) -----------------------------------------------------------------


def test_single_port_uses_tcp_match_and_several_use_multiport() -> None:
    matches = [QueueMatch(sports=[(80, 80)]), QueueMatch(dports=[(80, 80), (8000, 8080)])]
    rules = compile_rules(matches, 4, 0, 1)
    assert rules[0][:4] == ["-m", "connmark", "--mark", "0x1000000/0x1000000"]
    assert rules[1] == ["-p", "tcp", "--sport", "80", *queue_target(0, 1)]
    assert rules[2] == ["-p", "tcp", "-m", "multiport", "--dports", "80,8000:8080",
                        *queue_target(0, 1)]


def test_more_than_fifteen_multiport_slots_split_into_several_rules() -> None:
    ports = [(p, p) for p in range(1000, 1020)]
    rules = compile_rules([QueueMatch(dports=ports)], 4, 0, 1)[1:]
    assert len(rules) == 2
    listed = ",".join(r[r.index("--dports") + 1] for r in rules).split(",")
    assert listed == [str(p) for p in range(1000, 1020)]


def test_addresses_go_to_their_own_family_and_a_foreign_only_match_is_dropped() -> None:
    m = QueueMatch(src=["198.18.0.0/24", "2001:2::/64"])
    assert compile_rules([m], 4, 0, 1)[1][2:4] == ["-s", "198.18.0.0/24"]
    assert compile_rules([m], 6, 0, 1)[1][2:4] == ["-s", "2001:2::/64"]
    only4 = QueueMatch(dst=["198.18.0.2/32"])
    assert len(compile_rules([only4], 6, 0, 1)) == 1  # just the connmark rule
    assert len(compile_rules([QueueMatch(version=6)], 4, 0, 1)) == 1


def test_ports_literal_and_bridge_ports_compile_to_physdev_and_string() -> None:
    m = QueueMatch(in_port="nfr1", out_port="nfr0", literal=b"Server: nginx")
    rule = compile_rules([m], 4, 7, 1)[1]
    assert rule == ["-p", "tcp", "-m", "physdev", "--physdev-in", "nfr1", "--physdev-out", "nfr0",
                    "-m", "string", "--algo", "bm", "--hex-string", "|5365727665723a206e67696e78|",
                    "-j", "NFQUEUE", "--queue-num", "7", "--queue-bypass"]


def test_workers_become_queue_balance() -> None:
    assert queue_target(4, 3) == ["-j", "NFQUEUE", "--queue-balance", "4:6", "--queue-bypass"]
    with pytest.raises(ValueError):
        queue_target(65535, 2)


@pytest.mark.parametrize("bad", [
    {"version": 5}, {"sports": [(10, 5)]}, {"dports": []}, {"src": ["300.1.1.1/32"]},
    {"in_port": "a" * 16}, {"literal": b""}, {"literal": b"x" * 129},
])
def test_bad_matches_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        QueueMatch(**bad)  # type: ignore[arg-type]


def test_render_shows_both_families_readably() -> None:
    text = render([QueueMatch(sports=[(80, 80)])], [QueueMatch(dports=[(443, 443)])], 0, 1)
    assert "# IPv4: iptables-restore" in text and "# IPv6: ip6tables-restore" in text
    assert "-A NFREWRITE -p tcp --sport 80 -j NFQUEUE --queue-num 0 --queue-bypass" in text
    assert "-A NFREWRITE -p tcp --dport 443 -j NFQUEUE --queue-num 0 --queue-bypass" in text
    assert text.count("COMMIT") == 2


# -- in the kernel ---------------------------------------------------------------------------

HOST_V4 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:HOSTCHAIN - [0:0]
-A FORWARD -j HOSTCHAIN
-A HOSTCHAIN -s 198.18.0.99/32 -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A FORWARD -s 198.18.0.98/32 -j MARK --set-xmark 0x7/0xff
COMMIT
"""
HOST_V6 = HOST_V4.replace("198.18.0.99/32", "2001:2::99/128").replace(
    "198.18.0.98/32", "2001:2::98/128")


def tool(family: int, variant: str, what: str) -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}-{what}"


def saved(lab: Lab, variant: str, family: int) -> str:
    """iptables-save of every table without comments and counters."""
    out = lab.run("appliance", [tool(family, variant, "save")]).stdout
    lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in out.splitlines()
             if not ln.startswith("#")]
    return "\n".join(lines)


def fw(lab: Lab, variant: str, op: str, v4: str = "[]", v6: str = "[]", *,
       queue: int = 0, workers: int = 1, check: bool = True) -> str:
    code = textwrap.dedent(f"""
        from nfrewrite.kernel.firewall import Firewall, FirewallError
        from nfrewrite.kernel.ruletext import QueueMatch
        fw = Firewall({queue}, {workers}, variant={variant!r})
        try:
            if {op!r} == "remove":
                fw.remove()
            else:
                getattr(fw, {op!r})({v4}, {v6})
        except FirewallError as e:
            print("FirewallError:", e)
    """)
    proc = lab.run("appliance", [sys.executable, "-c", code], env=lab.python_env(), check=check)
    return str(proc.stdout)


def chain_rules(lab: Lab, variant: str, family: int) -> list[str]:
    return [ln for ln in saved(lab, variant, family).splitlines() if ln.startswith(f"-A {CHAIN} ")]


@pytest.mark.privileged
@pytest.mark.parametrize("variant", VARIANTS)
def test_install_swap_remove_leaves_the_host_ruleset_exactly_as_it_was(
    lab: Lab, variant: str
) -> None:
    lab.run("appliance", [tool(4, variant, "restore")], input=HOST_V4)
    lab.run("appliance", [tool(6, variant, "restore")], input=HOST_V6)
    before = {f: saved(lab, variant, f) for f in (4, 6)}

    assert fw(lab, variant, "install", "[QueueMatch(sports=[(80, 80)])]",
              "[QueueMatch(dports=[(443, 443)])]") == ""
    for family in (4, 6):
        text = saved(lab, variant, family)
        assert text.splitlines().count(FORWARD_JUMP) == 1
        assert text.splitlines().count(POST_JUMP) == 1
        assert "-A HOSTCHAIN" in text and "MARK --set-xmark 0x7/0xff" in text  # host rules kept
    assert any("--sport 80 -j NFQUEUE --queue-num 0 --queue-bypass" in r
               for r in chain_rules(lab, variant, 4))
    assert any("--dport 443 -j NFQUEUE" in r for r in chain_rules(lab, variant, 6))
    # Our jump comes after the host's mangle rule (appended, not inserted).
    mangle = saved(lab, variant, 4).split("*mangle")[1].splitlines()
    assert mangle.index(FORWARD_JUMP) > mangle.index(
        "-A FORWARD -s 198.18.0.98/32 -j MARK --set-xmark 0x7/0xff")

    fw(lab, variant, "install", "[QueueMatch(sports=[(80, 80)])]", "[]")
    # A crash between two starts can leave a second jump; the next install repairs it.
    lab.run("appliance", [tool(4, variant, "restore").replace("-restore", ""), "-t", "mangle",
                          "-A", "FORWARD", "-j", CHAIN])
    fw(lab, variant, "install", "[QueueMatch(sports=[(80, 80)])]", "[]")
    for family in (4, 6):
        lines = saved(lab, variant, family).splitlines()
        assert lines.count(FORWARD_JUMP) == 1 and lines.count(POST_JUMP) == 1

    fw(lab, variant, "swap", "[QueueMatch(sports=[(8080, 8080)], literal=b'nginx')]", "[]")
    v4 = chain_rules(lab, variant, 4)
    assert len(v4) == 2 and "--sport 8080" in v4[1] and "nginx" in v4[1]
    assert len(chain_rules(lab, variant, 6)) == 1  # the connmark rule only

    assert fw(lab, variant, "remove") == ""
    after = {f: saved(lab, variant, f) for f in (4, 6)}
    assert after == before
    assert fw(lab, variant, "remove") == ""  # removing twice is harmless


@pytest.mark.privileged
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_failing_swap_keeps_the_previous_rules(lab: Lab, variant: str) -> None:
    fw(lab, variant, "install", "[QueueMatch(sports=[(80, 80)])]", "[]")
    before = saved(lab, variant, 4)
    good = restore_text([QueueMatch(sports=[(9999, 9999)])], 4, 0, 1,
                        add_forward_jump=False, add_post_jump=False)
    broken = good.replace("COMMIT", f"-A {CHAIN} -p tcp -m nosuchmatch -j ACCEPT\nCOMMIT")
    proc = lab.run("appliance", [tool(4, variant, "restore"), "--noflush"], input=broken,
                   check=False)
    assert proc.returncode != 0
    assert saved(lab, variant, 4) == before
    fw(lab, variant, "remove")


@pytest.mark.privileged
@pytest.mark.parametrize("variant", VARIANTS)
def test_remove_on_a_fresh_namespace_only_leaves_empty_builtin_chains(
    lab: Lab, variant: str
) -> None:
    fw(lab, variant, "install", "[QueueMatch(dports=[(80, 80)])]", "[]")
    fw(lab, variant, "remove")
    for family in (4, 6):
        lines = [ln for ln in saved(lab, variant, family).splitlines()
                 if ln not in ("*mangle", "COMMIT") and not ln.endswith(" ACCEPT [0:0]")]
        assert lines == []


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [{"make_bridge": True}], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rules_see_bridged_traffic_and_bypass_lets_it_through_with_no_listener(
    lab: Lab, variant: str
) -> None:
    fw(lab, variant, "install", "[QueueMatch(dports=[(8080, 8080)], in_port='nfr0')]",
       "[QueueMatch(dports=[(8080, 8080)], in_port='nfr0')]", queue=5)
    lab.wait_reachable()
    for family in (4, 6):
        res = tcp_exchange(lab, b"ping" * 100, b"pong" * 100, family=family, port=8080)
        assert res.server_received == b"ping" * 100
        assert res.client_received == b"pong" * 100
        counted = lab.run("appliance", [tool(family, variant, "save"), "-c", "-t", "mangle"]).stdout
        hits = [ln for ln in counted.splitlines() if "--dport 8080" in ln]
        assert len(hits) == 1
        counters = re.match(r"\[(\d+):", hits[0])
        assert counters is not None, hits[0]
        packets = int(counters.group(1))
        assert packets >= 3  # SYN, data, FIN at least: every client->server packet was queued
    fw(lab, variant, "remove")


def test_many_rules_are_grouped_by_port_and_a_swap_drops_unused_buckets() -> None:
    many = [QueueMatch(dports=[(10000 + i, 10000 + i)], literal=b"p%d" % i) for i in range(40)]
    many += [QueueMatch(sports=[(80, 80)]), QueueMatch(dports=[(1, 65535)])]
    text = restore_text(many, 4, 0, 1, existing_chains=["NFREWRITE_D3", "HOSTCHAIN"])
    lines = text.splitlines()
    main = [ln for ln in lines if ln.startswith(f"-A {CHAIN} ")]
    assert main[1:] == [
        f"-A {CHAIN} -p tcp --dport 9216:10239 -j {CHAIN}_D9",
        f"-A {CHAIN} -p tcp --sport 0:1023 -j {CHAIN}_S0",
        f"-A {CHAIN} -p tcp --dport 1:65535 -j NFQUEUE --queue-num 0 --queue-bypass",  # no bucket
    ]
    assert sum(ln.startswith(f"-A {CHAIN}_D9 ") for ln in lines) == 40
    assert f"-A {CHAIN}_S0 -p tcp --sport 80 -j NFQUEUE --queue-num 0 --queue-bypass" in lines
    # a bucket chain of an earlier layout goes; a chain that is not ours stays
    assert f"-X {CHAIN}_D3" in lines and not any("HOSTCHAIN" in ln for ln in lines)
    # a rule spanning two buckets is in both; one spanning many stays in the main chain
    spans = [QueueMatch(dports=[(1000, 1030)], literal=b"p%d" % i) for i in range(33)]
    two = restore_text(spans, 4, 0, 1).splitlines()
    assert f"-A {CHAIN} -p tcp --dport 0:1023 -j {CHAIN}_D0" in two
    assert f"-A {CHAIN} -p tcp --dport 1024:2047 -j {CHAIN}_D1" in two
    # few rules: one flat chain, as before
    flat = restore_text(many[:32], 4, 0, 1).splitlines()
    assert not any(f":{CHAIN}_" in ln and "POST" not in ln for ln in flat)


@pytest.mark.privileged
@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_rules_install_swap_to_flat_and_remove_cleanly(lab: Lab, variant: str) -> None:
    lab.run("appliance", [tool(4, variant, "restore")], input=HOST_V4)
    before = saved(lab, variant, 4)
    many = "[QueueMatch(dports=[(10000 + i, 10000 + i)], literal=b'p%d' % i) for i in range(40)]"
    assert fw(lab, variant, "install", many, many.replace("10000", "20000")) == ""
    text = saved(lab, variant, 4)
    assert f":{CHAIN}_D9 " in text and text.count(f"-A {CHAIN}_D9 ") == 40
    assert f":{CHAIN}_D19 " in saved(lab, variant, 6)
    assert fw(lab, variant, "swap", "[QueueMatch(sports=[(80, 80)])]", "[]") == ""
    text = saved(lab, variant, 4)
    assert f"{CHAIN}_D9" not in text and len(chain_rules(lab, variant, 4)) == 2
    assert f"{CHAIN}_D19" not in saved(lab, variant, 6)
    assert fw(lab, variant, "swap", many, "[]") == ""
    assert fw(lab, variant, "remove") == ""
    assert saved(lab, variant, 4) == before
    assert f"{CHAIN}" not in saved(lab, variant, 6)


def test_install_and_swap_take_a_plan_made_for_their_queues_only() -> None:
    """A reload swaps in the plan its loader checked; one made for other queues is refused, not
    loaded with the wrong queue numbers."""
    from nfrewrite.kernel.firewall import Firewall
    from nfrewrite.kernel.ruletext import Plan, plan

    matches = [QueueMatch(sports=[(80, 80)])]
    fw = Firewall(3, 2, variant="nft")
    made = plan(matches, [], 3, 2)
    assert isinstance(made, Plan) and fw._plan(made, []) is made
    assert fw._plan(matches, []) == made  # the same compilation either way
    with pytest.raises(ValueError, match="plan for queue 0 x1, firewall for queue 3 x2"):
        fw.swap(plan(matches, [], 0, 1))
