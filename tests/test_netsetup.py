"""netsetup: the daemon makes the bridge, turns br_netfilter on, reads and sets port offloads.

Every call runs inside the lab's appliance namespace (a child ``python -c``), never in the host's.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from lab.netns import Lab, Role, tcp_exchange

pytestmark = pytest.mark.privileged

_PRELUDE = """
import dataclasses, json, sys
from nfrewrite.kernel.netsetup import (NetSetupError, enable_br_netfilter, read_offloads,
                                setup_bridge)
def out(obj):
    print(json.dumps(obj, default=lambda o: dataclasses.asdict(o)))
"""


def in_appliance(lab: Lab, code: str) -> object:
    """Run ``code`` (which calls ``out(...)`` once) in the appliance ns; return what it printed."""
    proc = lab.run(
        "appliance", [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        env=lab.python_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sysctl(lab: Lab, name: str) -> str:
    return str(lab.run("appliance", ["cat", f"/proc/sys/net/bridge/{name}"]).stdout.strip())


def test_setup_bridge_creates_it_turns_br_netfilter_on_and_traffic_flows(lab: Lab) -> None:
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        lab.run("appliance", ["sh", "-c", f"echo 0 > /proc/sys/net/bridge/{name}"])
    state = in_appliance(lab, """
        enable_br_netfilter()
        out(setup_bridge("br0", ["nfr0", "nfr1"], None))
    """)
    assert isinstance(state, dict)
    assert state["name"] == "br0" and state["created"] is True
    assert [p["name"] for p in state["ports"]] == ["nfr0", "nfr1"]
    assert sysctl(lab, "bridge-nf-call-iptables") == "1"
    assert sysctl(lab, "bridge-nf-call-ip6tables") == "1"
    detail = lab.run("appliance", ["ip", "-d", "link", "show", "br0"]).stdout
    assert "nf_call_iptables 1" in detail and "nf_call_ip6tables 1" in detail
    lab.wait_reachable()
    for family in (4, 6):
        req, resp = b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nhi"
        res = tcp_exchange(lab, req, resp, family=family)
        assert res.server_received == req
        assert res.client_received == resp


def test_setup_bridge_twice_reuses_the_bridge(lab: Lab) -> None:
    pair = in_appliance(lab, """
        a = setup_bridge("br0", ["nfr0", "nfr1"], None)
        b = setup_bridge("br0", ["nfr0", "nfr1"], None)
        out([a, b])
    """)
    assert isinstance(pair, list)
    first, second = pair
    assert first["created"] is True and second["created"] is False
    assert first["ifindex"] == second["ifindex"]
    bridges = lab.run("appliance", ["ip", "-j", "link", "show", "type", "bridge"]).stdout
    assert [b["ifname"] for b in json.loads(bridges)] == ["br0"]
    slaves = lab.run("appliance", ["ip", "-j", "link", "show", "master", "br0"]).stdout
    assert sorted(s["ifname"] for s in json.loads(slaves)) == ["nfr0", "nfr1"]


def _ethtool_k(lab: Lab, ifname: str) -> dict[str, bool]:
    """Independent reading through the ethtool binary, by the kernel feature bit behind each key.

    (Not by ethtool's aggregate lines: on this 6.18 kernel ``tx-tcp-accecn-segmentation`` stays on
    when TX checksumming goes off, so ``tcp-segmentation-offload`` prints "on" while the kernel's
    own TSO answer, and every classic TSO bit, is off.)
    """
    names = {
        "rx": "rx-checksumming", "tx": "tx-checksum-ip-generic", "tso": "tx-tcp-segmentation",
        "gso": "generic-segmentation-offload", "gro": "generic-receive-offload",
        "lro": "large-receive-offload",
    }
    lines = {}
    for line in lab.run("appliance", ["ethtool", "-k", ifname]).stdout.splitlines():
        key, _, val = line.strip().partition(":")
        if val:
            lines[key] = val.split()[0] == "on"
    return {short: lines[name] for short, name in names.items()}


def test_offloads_are_applied_and_read_back_as_the_kernel_has_them(lab: Lab) -> None:
    before = in_appliance(lab, 'out(read_offloads("nfr0"))')
    assert before == _ethtool_k(lab, "nfr0")
    assert isinstance(before, dict) and before["gro"] is False  # veth default
    state = in_appliance(lab, """
        out(setup_bridge("br0", ["nfr0", "nfr1"], {"gro": True, "tx": False}))
    """)
    assert isinstance(state, dict)
    for port in state["ports"]:
        assert port["offloads"]["gro"] is True
        assert port["offloads"]["tx"] is False
        assert port["offloads"]["tso"] is False  # the kernel drops TSO without TX checksum
        assert port["offloads"] == _ethtool_k(lab, port["name"])


def test_errors_name_the_interface_and_the_problem(lab: Lab) -> None:
    msgs = in_appliance(lab, """
        msgs = []
        for call in (
            lambda: setup_bridge("br0", ["nfr0", "nope9"], None),
            lambda: setup_bridge("br0", ["nfr0"], {"gro": True, "turbo": True}),
            lambda: setup_bridge("nfr1", ["nfr0"], None),
        ):
            try:
                call()
                msgs.append("no error")
            except NetSetupError as e:
                msgs.append(str(e))
        out(msgs)
    """)
    assert isinstance(msgs, list)
    assert "port nope9 does not exist" in msgs[0]
    assert "unknown offload key(s) turbo" in msgs[1]
    assert "nfr1 exists but is not a bridge" in msgs[2]


def test_a_port_of_another_bridge_is_not_stolen(lab: Lab) -> None:
    lab.run("appliance", ["ip", "link", "add", "other", "type", "bridge"])
    lab.run("appliance", ["ip", "link", "set", "nfr1", "master", "other"])
    msg = in_appliance(lab, """
        try:
            setup_bridge("br0", ["nfr0", "nfr1"], None)
            out("no error")
        except NetSetupError as e:
            out(str(e))
    """)
    assert "nfr1 already belongs to another master" in str(msg)


# -- the sysctls come back as they were, also after a kill -9 ------------------------------------

SYSCTLS = {
    "net/netfilter/nf_conntrack_tcp_be_liberal": "0",
    "net/bridge/bridge-nf-call-iptables": "0",
    "net/bridge/bridge-nf-call-ip6tables": "0",
}
GROWING = """
[[rule]]
name = "grow"
match = { sport = 8080 }
replace = [ { find = "Server: nginx", with = "Server: nginx-longer" } ]
"""


def _sysctls(lab: Lab) -> dict[str, str]:
    return {name: lab.run("appliance", ["cat", f"/proc/sys/{name}"]).stdout.strip()
            for name in SYSCTLS}


def test_sysctls_come_back_after_kill_9_a_restart_and_a_clean_stop(lab: Lab, workdir: str) -> None:
    """0 before; 1 while running; still 1 after kill -9 (nothing can run then); the restarted
    daemon must not take that 1 for the original: after its clean stop all are 0 again."""
    import os
    import signal

    from lab.netns import Daemon, write_lab_config

    for name, value in SYSCTLS.items():
        lab.run("appliance", ["sh", "-c", f"echo {value} > /proc/sys/{name}"])
    config = write_lab_config(workdir, {"10.toml": GROWING})
    run_dir = os.path.join(workdir, "run")
    os.mkdir(run_dir, 0o700)
    env = {"RUNTIME_DIRECTORY": run_dir}
    first = Daemon(lab, config, env=env).start()
    assert set(_sysctls(lab).values()) == {"1"}
    first.signal(signal.SIGKILL)
    first.wait(5)
    assert set(_sysctls(lab).values()) == {"1"}
    second = Daemon(lab, config, env=env).start()
    assert set(_sysctls(lab).values()) == {"1"}
    assert second.stop() == 0
    assert _sysctls(lab) == SYSCTLS, second.log()
    assert [n for n in os.listdir(run_dir) if n.startswith("sysctl-")] == []
    # the bridge keeps carrying traffic (its own nf_call_iptables option stays on)
    lab.wait_reachable()


def test_a_second_daemon_in_the_namespace_leaves_the_running_ones_sysctls_alone(
    lab: Lab, workdir: str
) -> None:
    """A second ``nfrewrite run`` beside the running one (same runtime directory, same metrics
    port) must fail without putting the sysctls back under the first or deleting its record."""
    import os
    import signal

    from lab.netns import Daemon, write_lab_config

    for name, value in SYSCTLS.items():
        lab.run("appliance", ["sh", "-c", f"echo {value} > /proc/sys/{name}"])
    config = write_lab_config(workdir, {"10.toml": GROWING})
    run_dir = os.path.join(workdir, "run")
    os.mkdir(run_dir, 0o700)
    env = {**lab.python_env(), "RUNTIME_DIRECTORY": run_dir}
    first = Daemon(lab, config, env=env).start()
    records = sorted(n for n in os.listdir(run_dir) if n.endswith(".json"))
    assert len(records) == 1 and set(_sysctls(lab).values()) == {"1"}
    second = lab.run("appliance", [sys.executable, "-m", "nfrewrite", "run", "-c", config],
                     env=env, check=False)
    assert second.returncode == 4, second.stderr
    assert first.proc is not None  # ip netns exec execs: its pid is the daemon's
    assert f"another nfrewrite (pid {first.proc.pid}) runs in this network" in second.stderr
    assert set(_sysctls(lab).values()) == {"1"}, second.stderr
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".json")) == records
    first.signal(signal.SIGTERM)
    assert first.wait(5) == 0
    assert _sysctls(lab) == SYSCTLS, first.log()
    assert [n for n in os.listdir(run_dir) if n.startswith("sysctl-")] == []


def test_two_namespaces_never_share_a_record(lab: Lab, workdir: str) -> None:
    """Same directory, two namespaces: two record files; a restore in one leaves the other's
    value and record alone."""
    import os

    code = textwrap.dedent(f"""
        import sys
        from nfrewrite.kernel.netsetup import CT_TCP_LIBERAL, SysctlKeeper
        keeper = SysctlKeeper({workdir!r})
        if sys.argv[1] == "set":
            keeper.set(CT_TCP_LIBERAL, True)
        else:
            keeper.restore()
        print(keeper.path)
    """)
    liberal = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"

    def keeper(role: Role, what: str) -> str:
        return str(lab.run(role, [sys.executable, "-c", code, what],
                           env=lab.python_env()).stdout.strip())

    def value(role: Role) -> str:
        return str(lab.run(role, ["cat", liberal]).stdout.strip())

    paths = {}
    for role in ("client", "appliance"):
        lab.run(role, ["sh", "-c", f"echo 0 > {liberal}"])
        paths[role] = keeper(role, "set")
        assert value(role) == "1"
    assert paths["client"] != paths["appliance"]
    keeper("appliance", "restore")
    assert (value("appliance"), value("client")) == ("0", "1")
    assert os.path.exists(paths["client"]) and not os.path.exists(paths["appliance"])
    keeper("client", "restore")
    assert value("client") == "0" and not os.path.exists(paths["client"])
