"""The lab itself: namespaces appear and vanish, the bridge carries both families, bytes arrive."""

from __future__ import annotations

import subprocess

import pytest

from lab.netns import Lab, LabError, cleanup_stale, list_namespaces, tcp_exchange

pytestmark = pytest.mark.privileged


def test_lab_creates_three_namespaces_and_removes_them_with_their_processes() -> None:
    with Lab() as lab:
        names = lab.namespaces
        assert set(names) <= set(list_namespaces())
        assert sorted(lab.link_names("appliance")) == sorted(["lo", *lab.bridge_ports])
        detached = ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]
        sleeper = lab.run("server", detached).stdout.strip()
        assert sleeper.isdigit()
    left = set(list_namespaces())
    assert not set(names) & left
    assert _gone_or_zombie(int(sleeper))


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_lab_is_cleaned_up_when_the_body_raises() -> None:
    names: list[str] = []
    with pytest.raises(KeyboardInterrupt), Lab() as lab:
        names = lab.namespaces
        raise KeyboardInterrupt
    assert names and not set(names) & set(list_namespaces())


@pytest.mark.parametrize("lab", [{"make_bridge": True}], indirect=True)
@pytest.mark.parametrize("family", [4, 6])
def test_plain_bridge_carries_tcp_both_ways_byte_for_byte(lab: Lab, family: int) -> None:
    lab.wait_reachable(families=[family])
    c2s = bytes(range(256)) * 300
    s2c = b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\n" + b"z" * 70000
    res = tcp_exchange(lab, c2s, s2c, family=family, chunk=1400)
    assert res.server_received == c2s
    assert res.client_received == s2c


def test_without_a_bridge_nothing_gets_across_and_the_error_is_clear(lab: Lab) -> None:
    with pytest.raises(LabError, match="not reachable"):
        lab.wait_reachable(timeout=1.5, families=[4])
    with pytest.raises(LabError, match="tcp_exchange failed"):
        tcp_exchange(lab, b"a", b"b", timeout=1.5)


@pytest.mark.parametrize("lab", [{"client_offloads": {"tx": False}}], indirect=True)
def test_client_offloads_are_applied(lab: Lab) -> None:
    out = lab.run("client", ["ethtool", "-k", "eth0"]).stdout
    assert "tx-checksumming: off" in out


def test_cleanup_stale_removes_only_dead_owners() -> None:
    # A namespace named like a lab of a pid that cannot exist (pid_max is < 2**22).
    dead = "nfr-4194305-abcdef-cli"
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        with Lab() as live:
            removed = cleanup_stale()
            assert dead in removed
            assert not set(live.namespaces) & set(removed)
            assert set(live.namespaces) <= set(list_namespaces())
    finally:
        subprocess.run(["ip", "netns", "del", dead], check=False, capture_output=True)
