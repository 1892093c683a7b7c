"""Bridges, ports, br_netfilter switches and port offloads: the L2 plumbing the daemon needs.

Theory of operation
-------------------
nfrewrite sits in the middle of a transparent bridge. For bridged IPv4/IPv6 packets to traverse the
iptables FORWARD hook (where ``nfrewrite.firewall`` sends them to NFQUEUE), br_netfilter must be
asked to call iptables for bridged traffic. That switch is the sysctl
``net.bridge.bridge-nf-call-iptables`` (and ``-ip6tables``), which modern kernels keep per network
namespace; it is written through ``/proc/sys/net/bridge/...`` of the namespace this process lives
in.
For bridges we manage we also set the bridge's own ``nf_call_iptables``/``nf_call_ip6tables``
options (netlink ``IFLA_BR_NF_CALL_*``): br_netfilter calls iptables when *either* is on, so our
bridge keeps working even if someone turns the global sysctl off later.

``setup_bridge`` is idempotent: it creates the bridge if it is missing (STP off, forward delay 0 so
ports forward at once), reuses it if present, enslaves the ports, brings everything up, applies the
requested offload changes and reads the offloads back *after* applying them (the kernel may refuse
or couple features: no TX checksum means no TSO). The result is returned for logging and metrics.

Offloads matter to a packet rewriter: with GRO on an ingress port the kernel builds super-packets;
without the NFQUEUE GSO flag it segments them again and completes checksums before userspace sees
them, so correctness does not depend on them, but throughput and what a capture shows do.

Offloads are read and set with pyroute2's ``Ethtool`` using the legacy per-feature ethtool ioctls
(``ETHTOOL_G/S{RXCSUM,TXCSUM,TSO,GSO,GRO}`` and ``ETHTOOL_G/SFLAGS`` for LRO), which the kernel
still maps onto its feature bits exactly as ``ethtool -K rx/tx/tso/gso/gro/lro`` does. pyroute2's
netlink ethtool (``ETHTOOL_MSG_FEATURES_*``) has no features request in this version, so the ioctl
path is the one that works; nothing falls back to the ``ethtool`` binary.

What it must not do: run ``ip``/``ethtool``/``sysctl`` subprocesses (pyroute2 and /proc only), touch
interfaces other than the named bridge and ports, or undo anything on stop: the bridge stays up so
traffic keeps flowing when the daemon exits.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError

from nfrewrite.diagnostics import ifname_problem

#: short key -> ethtool "long" offload name (as ``ethtool -k`` prints it).
OFFLOAD_NAMES: dict[str, str] = {
    "rx": "rx-checksumming",
    "tx": "tx-checksumming",
    "tso": "tcp-segmentation-offload",
    "gso": "generic-segmentation-offload",
    "gro": "generic-receive-offload",
    "lro": "large-receive-offload",
}
OFFLOAD_KEYS: tuple[str, ...] = tuple(OFFLOAD_NAMES)

BR_NF_SYSCTLS: tuple[str, ...] = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")
PROC_BRIDGE = Path("/proc/sys/net/bridge")


class NetSetupError(RuntimeError):
    """Bridge/port/offload setup failed; the message names the interface and the fix."""


@dataclass(frozen=True, slots=True)
class PortState:
    name: str
    ifindex: int
    offloads: dict[str, bool]


@dataclass(frozen=True, slots=True)
class BridgeState:
    name: str
    ifindex: int
    created: bool
    ports: tuple[PortState, ...] = field(default_factory=tuple)

    @property
    def offloads(self) -> dict[str, dict[str, bool]]:
        """``{port: {short key: enabled}}`` as read after applying the requested changes."""
        return {p.name: dict(p.offloads) for p in self.ports}


def enable_br_netfilter(proc_bridge: Path = PROC_BRIDGE) -> None:
    """Turn on bridge-nf-call-iptables/-ip6tables in the current network namespace."""
    if not proc_bridge.is_dir():
        raise NetSetupError(
            f"{proc_bridge} does not exist: br_netfilter is not loaded (modprobe br_netfilter)"
        )
    for name in BR_NF_SYSCTLS:
        path = proc_bridge / name
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
        except OSError as e:
            raise NetSetupError(f"cannot enable {path}: {e.strerror}") from e


CT_TCP_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def set_conntrack_tcp_liberal(on: bool, path: Path = CT_TCP_LIBERAL) -> bool | None:
    """Set conntrack's TCP window checking to liberal (or back); returns the previous setting.

    Why: after a length-changing rewrite, each side acknowledges sequence numbers that conntrack
    (which saw the packets before we changed them) never saw sent. In strict mode it marks those
    ACKs INVALID and detaches them from their connection, so the connmark that sends the rest of
    the flow to the queue no longer matches them and they reach the sender unadjusted. Liberal
    mode only stops marking out-of-window packets INVALID. Per network namespace. Returns None
    when conntrack is not there (nothing to do).
    """
    try:
        previous = path.read_text().strip() == "1"
        if previous != on:
            path.write_text("1\n" if on else "0\n")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NetSetupError(f"cannot set {path}: {e.strerror}") from e
    return previous


def read_offloads(ifname: str) -> dict[str, bool]:
    """The offload features of ``ifname`` with short keys rx, tx, tso, gso, gro, lro."""
    with Ethtool() as eth:
        return _read_offloads(eth, ifname)


def _read_offloads(eth: Any, ifname: str) -> dict[str, bool]:
    try:
        flags: dict[str, bool] = eth.get_offload_flags(ifname)
    except (OSError, NetlinkError) as e:
        raise NetSetupError(f"{ifname}: cannot read offload features: {e}") from e
    return {key: bool(flags.get(long_name, False)) for key, long_name in OFFLOAD_NAMES.items()}


def apply_offloads(ifname: str, offloads: Mapping[str, bool]) -> dict[str, bool]:
    """Set the requested features on ``ifname``; return all features as read back afterwards."""
    with Ethtool() as eth:
        return _apply_offloads(eth, ifname, offloads)


def _apply_offloads(eth: Any, ifname: str, offloads: Mapping[str, bool]) -> dict[str, bool]:
    unknown = sorted(set(offloads) - set(OFFLOAD_NAMES))
    if unknown:
        raise NetSetupError(
            f"{ifname}: unknown offload key(s) {', '.join(unknown)}; "
            f"known: {', '.join(OFFLOAD_KEYS)}"
        )
    current = _read_offloads(eth, ifname)
    for key, want in offloads.items():
        if current[key] == bool(want):
            continue
        try:
            eth.set_offload_flag(ifname, OFFLOAD_NAMES[key], int(bool(want)))
        except (OSError, NetlinkError) as e:
            raise NetSetupError(
                f"{ifname}: cannot turn {key} ({OFFLOAD_NAMES[key]}) "
                f"{'on' if want else 'off'}: {e}"
            ) from e
    after = _read_offloads(eth, ifname)
    refused = [k for k, want in offloads.items() if after[k] != bool(want)]
    if refused:
        raise NetSetupError(
            f"{ifname}: the kernel kept {', '.join(f'{k}={after[k]}' for k in refused)} "
            f"(fixed feature or a dependency, e.g. tso needs tx); change the offloads setting"
        )
    return after


def largest_mtu(default: int = 1500) -> int:
    """The largest MTU of this namespace's links, loopback aside (``default`` if none or on
    error). A queued packet longer than this cannot have come off a wire as one frame: it is a
    GSO/GRO super-packet, which the engine may grow past it (the kernel segments it)."""
    try:
        with IPRoute() as ipr:
            mtus = [
                int(link.get_attr("IFLA_MTU") or 0)
                for link in ipr.get_links()
                if link.get_attr("IFLA_IFNAME") != "lo"
            ]
    except (OSError, NetlinkError):
        return default
    return max(mtus, default=0) or default


def _lookup(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _link_kind(ipr: Any, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def setup_bridge(
    name: str, ports: Sequence[str], offloads: Mapping[str, bool] | None = None
) -> BridgeState:
    """Create or reuse bridge ``name``, enslave ``ports``, bring all up, apply ``offloads``.

    Returns the bridge state with each port's offloads read after applying the changes. Names are
    checked first with the validator ``nfrewrite check`` uses (:func:`ifname_problem`).
    """
    for what, ifname in (("bridge", name), *(("port", p) for p in ports)):
        problem = ifname_problem(ifname)
        if problem is not None:
            raise NetSetupError(f"{what} {ifname!r} is not a valid interface name: {problem}")
    with IPRoute() as ipr:
        br_index = _lookup(ipr, name)
        created = False
        if br_index is None:
            try:
                ipr.link(
                    "add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0
                )
            except NetlinkError as e:
                raise NetSetupError(f"cannot create bridge {name}: {e}") from e
            br_index = _lookup(ipr, name)
            if br_index is None:
                raise NetSetupError(f"bridge {name} vanished right after creation")
            created = True
        elif _link_kind(ipr, br_index) != "bridge":
            raise NetSetupError(f"{name} exists but is not a bridge; pick another bridge name")
        try:
            ipr.link(
                "set", index=br_index, kind="bridge",
                br_nf_call_iptables=1, br_nf_call_ip6tables=1,
            )
        except NetlinkError as e:
            raise NetSetupError(f"{name}: cannot enable nf_call_iptables: {e}") from e

        port_index: dict[str, int] = {}
        for port in ports:
            idx = _lookup(ipr, port)
            if idx is None:
                raise NetSetupError(f"bridge {name}: port {port} does not exist")
            link = ipr.get_links(idx)[0]
            master = link.get_attr("IFLA_MASTER")
            if master not in (None, 0, br_index):
                raise NetSetupError(
                    f"bridge {name}: port {port} already belongs to another master "
                    f"(ifindex {master}); release it first"
                )
            if master != br_index:
                try:
                    ipr.link("set", index=idx, master=br_index)
                except NetlinkError as e:
                    if e.code == errno.EBUSY:
                        raise NetSetupError(
                            f"bridge {name}: port {port} is busy (enslaved elsewhere?)"
                        ) from e
                    raise NetSetupError(f"bridge {name}: cannot enslave {port}: {e}") from e
            ipr.link("set", index=idx, state="up")
            port_index[port] = idx
        ipr.link("set", index=br_index, state="up")

    states = []
    with Ethtool() as eth:
        for port in ports:
            now = _apply_offloads(eth, port, offloads) if offloads else _read_offloads(eth, port)
            states.append(PortState(name=port, ifindex=port_index[port], offloads=now))
    return BridgeState(name=name, ifindex=br_index, created=created, ports=tuple(states))
