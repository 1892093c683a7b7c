"""A namespace network lab: client -- appliance -- server (and two smaller shapes).

Theory of operation
-------------------
Tests, ``make demo`` and the benchmark all need the same picture: a client and a server on one
IPv4/IPv6 segment, with the appliance namespace in the middle holding the two bridge ports::

    client ns                appliance ns                    server ns
    eth0 198.18.0.1/24  <->  nfr0 [br0] nfr1  <->  eth0 198.18.0.2/24
         2001:2::1/64                                   2001:2::2/64

``Lab`` creates the namespaces (named ``nfr-<pid>-<random>-cli|app|srv`` so that parallel runs never
collide), the two veth pairs (created *inside* the appliance namespace with the peer moved straight
into its final namespace: nothing ever appears in the host's own namespace), the addresses
(``nodad`` on IPv6 so nothing waits for duplicate address detection) and, when asked, the bridge.
By default the bridge is left to the daemon (``nfrewrite.kernel.netsetup``), which is what is being
tested.

What it must not do: touch the host's network namespace (every command runs through
``ip netns exec`` or ``ip -n``), use addresses outside 198.18.0.0/15 and 2001:2::/48, use a shell,
or leave anything behind. ``close()`` (also reached from ``__exit__`` on any exception, including
``KeyboardInterrupt``) kills every process still living in its namespaces (``ip netns pids``) and
deletes them. ``cleanup_stale()`` removes leftovers of runs whose owning process has died.

Two more shapes (``Lab(shape=...)``), for the daemon's host and routed modes; the bridge shape
above stays the default and is built as it always was::

    shape="host":   client ns eth0 198.18.0.1/24  <->  eth0 198.18.0.2/24  host ns
                              2001:2::1/64                2001:2::2/64    (daemon + servers)

    shape="routed": client ns eth0 198.18.0.1/24 <-> nfr0 198.18.0.254/24 [router ns] nfr1
                                   2001:2::1/64      2001:2::fe/64         198.18.1.254/24
                                                                           2001:2:0:1::fe/64
                    <-> eth0 198.18.1.2/24, 2001:2:0:1::2/64 server ns

In the host shape the roles "appliance" and "server" are the one host namespace (the daemon and
the servers it rewrites run side by side), so ``Daemon`` and ``tcp_exchange`` work unchanged.
The client's end is a NIC's wire: the host's peer (``wire0``) is bridged, in the client's
namespace, to one more veth pair whose sending end (``wire1``) has TX checksumming off, so the
kernel completes every checksum from the seed the host left, as a NIC would, before the client's
``eth0`` receives the packet. (A veth alone hands a ``CHECKSUM_PARTIAL`` packet to its peer as
it is: a capture there shows seeds, and the receiver trusts them unchecked.) What the client's
``eth0`` captures is then what a wire would carry, and its kernel verifies every checksum. In
the routed shape the client and the server route through the router, which forwards IPv4 and
IPv6 (the lab turns that on, in the router's namespace: the daemon never does).

The lab is test tooling, so it drives ``ip``/``ethtool`` as subprocesses (argument lists only);
product code (``netsetup``) uses pyroute2.

``steer_receive()`` has one CPU receive everything a device gets (RPS), for a test that must know
the order in which packets crossed the receive path (see ``tests/test_replay_live.py``).

``tcp_exchange()`` runs ``python -m lab.peer`` on both sides and returns the exact bytes
each end received, with hard timeouts everywhere so that a broken data path fails a test instead of
hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

Role = Literal["client", "appliance", "server"]
Shape = Literal["bridge", "host", "routed"]
ROLES: tuple[Role, ...] = ("client", "appliance", "server")
_SUFFIX: dict[Role, str] = {"client": "cli", "appliance": "app", "server": "srv"}

DEFAULT_PREFIX = "nfr"

#: ethtool -K names for the short keys accepted in ``client_offloads``.
ETHTOOL_K_NAMES: dict[str, str] = {
    "rx": "rx",
    "tx": "tx",
    "tso": "tso",
    "gso": "gso",
    "gro": "gro",
    "lro": "lro",
    "sg": "sg",
}


class LabError(RuntimeError):
    """A lab step failed; the message names the command and what it printed."""


@dataclass(frozen=True, slots=True)
class TcpResult:
    """What each end of one TCP connection received, byte for byte."""

    server_received: bytes
    client_received: bytes


def _run_host(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run an ``ip`` command that manages namespaces (never one that configures the host)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ns_pids(ns: str) -> list[int]:
    out = _run_host(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _kill_ns_processes(ns: str, deadline_s: float = 3.0) -> None:
    """SIGKILL every process living in namespace ``ns`` and wait until none is left."""
    end = time.monotonic() + deadline_s
    while True:
        pids = [p for p in _ns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > end:
            return
        time.sleep(0.05)


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    _run_host(["ip", "netns", "del", ns], check=False)


def list_namespaces() -> list[str]:
    out = _run_host(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, include_live_owners: bool = False) -> list[str]:
    """Delete lab namespaces ``<prefix>-<pid>-...`` whose creating process no longer exists.

    Namespaces of a live owner (another test run in parallel) are left alone unless
    ``include_live_owners`` is set. Returns the names deleted.
    """
    removed = []
    for ns in list_namespaces():
        parts = ns.split("-")
        if len(parts) < 4 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if not include_live_owners and _pid_alive(int(parts[1])):
            continue
        _delete_ns(ns)
        removed.append(ns)
    return removed


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """Turn a plain SIGTERM (``timeout``, a CI runner's cancel) into SystemExit, so ``with Lab()``
    unwinds and deletes its namespaces instead of the process dying with them still there."""
    import threading

    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


class Lab:
    """client -- appliance -- server namespaces; use as a context manager."""

    client_v4 = "198.18.0.1"
    server_v4 = "198.18.0.2"
    client_v6 = "2001:2::1"
    server_v6 = "2001:2::2"
    prefixlen_v4 = 24
    prefixlen_v6 = 64
    bridge_name = "br0"
    bridge_ports: tuple[str, str] = ("nfr0", "nfr1")
    peer_ifname = "eth0"

    def __init__(
        self,
        *,
        make_bridge: bool = False,
        client_offloads: Mapping[str, bool] | None = None,
        server_offloads: Mapping[str, bool] | None = None,
        prefix: str = DEFAULT_PREFIX,
        shape: Shape = "bridge",
    ) -> None:
        if not prefix.isalnum():
            raise ValueError(f"prefix must be letters/digits only (it is split on '-'): {prefix!r}")
        if shape not in ("bridge", "host", "routed"):
            raise ValueError(f"shape must be 'bridge', 'host' or 'routed', not {shape!r}")
        if make_bridge and shape != "bridge":
            raise ValueError("make_bridge needs the bridge shape")
        self.shape = shape
        if shape == "routed":
            self.server_v4, self.server_v6 = "198.18.1.2", "2001:2:0:1::2"
        self.make_bridge = make_bridge
        self.client_offloads = dict(client_offloads or {})
        self.server_offloads = dict(server_offloads or {})
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self._ns: dict[Role, str] = {r: f"{self.tag}-{_SUFFIX[r]}" for r in ROLES}
        if shape == "host":  # the daemon and the servers share the host namespace
            self._ns["appliance"] = self._ns["server"] = f"{self.tag}-hst"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    # -- naming ---------------------------------------------------------------------------
    def ns_name(self, role: Role) -> str:
        return self._ns[role]

    @property
    def namespaces(self) -> list[str]:
        return list(dict.fromkeys(self._ns[r] for r in ROLES))

    def addr(self, role: Literal["client", "server"], family: int = 4) -> str:
        if family == 4:
            return self.client_v4 if role == "client" else self.server_v4
        if family == 6:
            return self.client_v6 if role == "client" else self.server_v6
        raise ValueError(f"family must be 4 or 6, not {family!r}")

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        _exit_cleanly_on_sigterm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for role in ROLES:
            if self._ns[role] in self._created:
                continue
            _run_host(["ip", "netns", "add", self._ns[role]])
            self._created.append(self._ns[role])
            self.run(role, ["ip", "link", "set", "lo", "up"])
            # Inside our own namespace only: no DAD, so IPv6 works at once.
            for key in ("all", "default"):
                self.run(role, ["sysctl", "-q", "-w", f"net.ipv6.conf.{key}.accept_dad=0"])
        if self.shape == "host":
            self._build_host()
        elif self.shape == "routed":
            self._build_routed()
        else:
            self._build_bridged()
        ends: tuple[tuple[Role, dict[str, bool]], ...] = (
            ("client", self.client_offloads), ("server", self.server_offloads))
        for role, offloads in ends:
            if offloads:
                self.set_offloads(role, "eth0", offloads)
        if self.make_bridge:
            self.add_bridge()

    def _address(self, role: Role, ifname: str, v4: str, v6: str) -> None:
        self.run(role, ["ip", "addr", "add", v4, "dev", ifname])
        self.run(role, ["ip", "-6", "addr", "add", v6, "dev", ifname, "nodad"])
        self.run(role, ["ip", "link", "set", ifname, "up"])

    def _build_host(self) -> None:
        """The host's eth0 and the client's eth0 on one subnet, through the client's "wire"."""
        cli = self._ns["client"]
        _run_host(["ip", "-n", self._ns["server"], "link", "add", self.peer_ifname, "type", "veth",
                   "peer", "name", "wire0", "netns", cli])
        _run_host(["ip", "-n", cli, "link", "add", "wire1", "type", "veth",
                   "peer", "name", self.peer_ifname])
        self.run("client", ["ip", "link", "add", "wire", "type", "bridge",
                            "stp_state", "0", "forward_delay", "0"])
        for port in ("wire0", "wire1"):
            self.run("client", ["ip", "link", "set", port, "master", "wire"])
            self.run("client", ["ip", "link", "set", port, "up"])
        self.run("client", ["ip", "link", "set", "wire", "up"])
        self.set_offloads("client", "wire1", {"tx": False})
        ends: tuple[tuple[Role, str, str], ...] = (
            ("client", self.client_v4, self.client_v6), ("server", self.server_v4, self.server_v6))
        for role, v4, v6 in ends:
            self._address(role, "eth0", f"{v4}/{self.prefixlen_v4}", f"{v6}/{self.prefixlen_v6}")

    #: the router's addresses in the routed shape: (client side, server side), per family
    ROUTER_V4 = ("198.18.0.254", "198.18.1.254")
    ROUTER_V6 = ("2001:2::fe", "2001:2:0:1::fe")

    def _build_routed(self) -> None:
        """Two subnets, the router between them forwarding both families."""
        rtr = self._ns["appliance"]
        sides: tuple[Role, Role] = ("client", "server")
        for port, end in zip(self.bridge_ports, sides, strict=True):
            _run_host(["ip", "-n", rtr, "link", "add", port, "type", "veth",
                       "peer", "name", self.peer_ifname, "netns", self._ns[end]])
        ends: tuple[tuple[Role, str, str, int], ...] = (
            ("client", self.client_v4, self.client_v6, 0),
            ("server", self.server_v4, self.server_v6, 1))
        for r, v4, v6, side in ends:
            gw4, gw6 = self.ROUTER_V4[side], self.ROUTER_V6[side]
            self._address(r, "eth0", f"{v4}/{self.prefixlen_v4}", f"{v6}/{self.prefixlen_v6}")
            self._address("appliance", self.bridge_ports[side], f"{gw4}/{self.prefixlen_v4}",
                          f"{gw6}/{self.prefixlen_v6}")
            self.run(r, ["ip", "route", "add", "default", "via", gw4])
            self.run(r, ["ip", "-6", "route", "add", "default", "via", gw6])
        self.run("appliance", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.run("appliance", ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])

    def _build_bridged(self) -> None:
        app = self._ns["appliance"]
        p_client, p_server = self.bridge_ports
        ports: tuple[tuple[str, Role], ...] = ((p_client, "client"), (p_server, "server"))
        for port, role in ports:
            # Created inside the appliance ns, peer moved straight into the end ns.
            _run_host(
                ["ip", "-n", app, "link", "add", port, "type", "veth",
                 "peer", "name", self.peer_ifname, "netns", self._ns[role]]
            )
        ends: tuple[tuple[Role, str, str], ...] = (
            ("client", self.client_v4, self.client_v6),
            ("server", self.server_v4, self.server_v6),
        )
        for r, v4, v6 in ends:
            self.run(r, ["ip", "addr", "add", f"{v4}/{self.prefixlen_v4}", "dev", "eth0"])
            self.run(
                r, ["ip", "-6", "addr", "add", f"{v6}/{self.prefixlen_v6}", "dev", "eth0", "nodad"]
            )
            self.run(r, ["ip", "link", "set", "eth0", "up"])

    def add_bridge(self) -> None:
        """Create ``br0`` in the appliance ns and enslave both ports (the plain-bridge case)."""
        self.run("appliance", ["ip", "link", "add", self.bridge_name, "type", "bridge",
                               "stp_state", "0", "forward_delay", "0"])
        for port in self.bridge_ports:
            self.run("appliance", ["ip", "link", "set", port, "master", self.bridge_name])
            self.run("appliance", ["ip", "link", "set", port, "up"])
        self.run("appliance", ["ip", "link", "set", self.bridge_name, "up"])

    def set_offloads(self, role: Role, ifname: str, offloads: Mapping[str, bool]) -> None:
        argv = ["ethtool", "-K", ifname]
        for key, on in offloads.items():
            argv += [ETHTOOL_K_NAMES.get(key, key), "on" if on else "off"]
        self.run(role, argv)

    def close(self) -> None:
        """Kill what we started, then every process left in our namespaces; delete them."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for ns in reversed(self._created):
            _delete_ns(ns)
        self._created.clear()

    # -- running things -------------------------------------------------------------------
    def _wrap(self, role: Role, argv: Sequence[str]) -> list[str]:
        if role not in self._ns:
            raise ValueError(f"unknown role {role!r}; one of {ROLES}")
        return ["ip", "netns", "exec", self._ns[role], *argv]

    def run(
        self,
        role: Role,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: bytes | str | None = None,  # mirrors subprocess.run
        text: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside a namespace, output captured; raises LabError on failure."""
        full = self._wrap(role, argv)
        if isinstance(input, bytes) and text:
            text = False
        try:
            proc = subprocess.run(
                full, capture_output=True, timeout=timeout, input=input, text=text,
                check=False, env=dict(env) if env is not None else None,
            )
        except subprocess.TimeoutExpired as e:
            raise LabError(f"[{role}] {' '.join(argv)} timed out after {timeout}s") from e
        if check and proc.returncode != 0:
            err = proc.stderr
            if isinstance(err, bytes):
                err = err.decode(errors="replace")
            raise LabError(f"[{role}] {' '.join(argv)} failed ({proc.returncode}): {err.strip()}")
        return proc

    def popen(self, role: Role, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside a namespace; it is killed by ``close()`` if still running."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc: subprocess.Popen[Any] = subprocess.Popen(self._wrap(role, argv), **kw)
        self._procs.append(proc)
        return proc

    def tcpdump(self, role: Role, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``tcpdump -n <args>`` in a namespace and return once its filter is attached
        (it printed "listening on"), so no packet sent afterwards is missed."""
        proc = self.popen(role, ["tcpdump", "-n", *args], **kw)
        assert proc.stderr is not None
        for _ in range(3):  # "listening on" may follow a "verbose output suppressed" line
            line = proc.stderr.readline()
            if b"listening on" in line:
                return proc
        proc.kill()
        raise LabError(f"[{role}] tcpdump did not start: {line!r}")

    def steer_receive(self, role: Role, ifname: str, cpu: int) -> None:
        """Have CPU ``cpu`` alone process what ``ifname`` receives (RPS on every receive queue).

        A veth hands a packet to the receive path of the CPU that sent it, so packets sent from
        two CPUs are received on two CPUs at once and taps, netfilter hooks and sockets after
        them may see them in different orders. Steered, every received packet waits in that one
        CPU's backlog, which it empties in order, one packet through the whole receive path
        (taps, bridge, netfilter, NFQUEUE, socket) before the next. Written through the
        namespace's own sysfs, so only this lab's device changes.
        """
        if cpu < 0:
            raise ValueError(f"cpu must be >= 0, not {cpu}")
        mask = 1 << cpu
        words = []  # the kernel's cpumask format: 32-bit hex words, most significant first
        while True:
            words.append(f"{mask & 0xFFFFFFFF:08x}")
            mask >>= 32
            if not mask:
                break
        text = ",".join(reversed(words)) + "\n"
        base = f"/sys/class/net/{ifname}/queues"
        queues = self.run(role, ["ls", base]).stdout.split()
        rx = [q for q in queues if q.startswith("rx-")]
        if not rx:
            raise LabError(f"[{role}] {ifname} has no receive queues in {base}")
        for q in rx:
            path = f"{base}/{q}/rps_cpus"
            self.run(role, ["tee", path], input=text)
            now = self.run(role, ["cat", path]).stdout.strip()
            if int(now.replace(",", ""), 16) != 1 << cpu:
                raise LabError(f"[{role}] {path} reads {now!r} after writing {text.strip()!r}")

    def tcp_counters(self, role: Role) -> dict[str, int]:
        """A namespace's ``Tcp.*`` and ``TcpExt.*`` counters (``/proc/net/{snmp,netstat}``;
        IPv4 and IPv6 share them), e.g. ``"Tcp.InCsumErrors"``, ``"TcpExt.TCPDSACKRecv"``."""
        out: dict[str, int] = {}
        for f in ("/proc/net/snmp", "/proc/net/netstat"):
            lines = self.run(role, ["cat", f]).stdout.splitlines()
            for head, vals in zip(lines[::2], lines[1::2], strict=True):
                prefix, names = head.split(":", 1)
                _, values = vals.split(":", 1)
                for n, v in zip(names.split(), values.split(), strict=True):
                    out[f"{prefix}.{n}"] = int(v)
        return out

    def python_env(self) -> dict[str, str]:
        """Environment for ``sys.executable`` children: this package importable."""
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def wait_reachable(self, timeout: float = 10.0, families: Sequence[int] = (4, 6)) -> None:
        """Ping client -> server (each family) until it answers or ``timeout`` passes."""
        end = time.monotonic() + timeout
        for fam in families:
            target = self.addr("server", fam)
            while True:
                proc = self.run(
                    "client",
                    [sys.executable, "-m", "lab.peer", "ping", "--connect", target,
                     "--timeout", "1"],
                    check=False, env=self.python_env(),
                )
                if proc.returncode == 0:
                    break
                if time.monotonic() > end:
                    raise LabError(f"server {target} not reachable from client within {timeout}s")
                time.sleep(0.1)

    def link_names(self, role: Role) -> list[str]:
        out = self.run(role, ["ip", "-j", "link", "show"]).stdout
        return [str(link["ifname"]) for link in json.loads(out)]


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    end = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf


def tcp_exchange(
    lab: Lab,
    data_c2s: bytes,
    data_s2c: bytes,
    *,
    family: int = 4,
    port: int = 8080,
    timeout: float = 10.0,
    chunk: int = 0,
    source: str | None = None,
) -> TcpResult:
    """One TCP connection client -> server: each side sends its data, half-closes, reads to EOF.

    Returns exactly what each end received. ``chunk`` > 0 sends in writes of that size (several
    segments); ``source`` binds the client to one of its (extra) addresses. Raises ``LabError``
    (with both peers' stderr) on any failure or timeout.
    """
    env = lab.python_env()
    srv_argv = [
        sys.executable, "-m", "lab.peer", "server",
        "--bind", lab.addr("server", family), "--port", str(port),
        "--timeout", str(timeout), "--chunk", str(chunk),
    ]
    server = lab.popen("server", srv_argv, stdin=subprocess.PIPE, env=env)
    try:
        assert server.stdin is not None
        server.stdin.write(data_s2c)
        server.stdin.close()
        server.stdin = None  # communicate() must not touch it again
        line = read_line(server, timeout)
        if line.strip() != b"READY":
            server.kill()
            _, err = server.communicate(timeout=5)
            why = err.decode(errors="replace")
            raise LabError(f"lab peer server did not start: {line!r} {why}")
        cli_argv = [
            sys.executable, "-m", "lab.peer", "client",
            "--connect", lab.addr("server", family), "--port", str(port),
            "--timeout", str(timeout), "--chunk", str(chunk),
        ]
        if source:
            cli_argv += ["--source", source]
        client = lab.run("client", cli_argv, input=data_c2s, text=False, timeout=timeout + 5,
                         check=False, env=env)
        try:
            s_out, s_err = server.communicate(timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            server.kill()
            s_out, s_err = server.communicate(timeout=5)
        if client.returncode != 0 or server.returncode != 0:
            raise LabError(
                f"tcp_exchange failed: client rc={client.returncode} "
                f"stderr={client.stderr.decode(errors='replace').strip()!r}; "
                f"server rc={server.returncode} stderr={s_err.decode(errors='replace').strip()!r}"
            )
        return TcpResult(
            server_received=bytes.fromhex(json.loads(s_out)["received"]),
            client_received=bytes.fromhex(json.loads(client.stdout)["received"]),
        )
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)


@contextlib.contextmanager
def lab(**kw: Any) -> Iterator[Lab]:
    """Functional spelling: ``with lab(make_bridge=True) as l: ...``."""
    with Lab(**kw) as the_lab:
        yield the_lab


# -- the daemon in the lab ------------------------------------------------------------------------

LAB_CONFIG = """\
rules_dir = "rules"
{bridge}
[queue]
num     = {queue_num}
workers = {workers}
gso     = {gso}

[metrics]
listen = "127.0.0.1:{metrics_port}"
{host}"""
LAB_BRIDGE = """
[[bridge]]
name  = "br0"
ports = ["nfr0", "nfr1"]
{offloads}"""


def write_lab_config(
    directory: str,
    rules: Mapping[str, str],
    *,
    queue_num: int = 0,
    workers: int = 1,
    metrics_port: int = 9640,
    offloads: str = "",
    gso: bool = True,
    bridge: bool = True,
    host: bool = False,
) -> str:
    """Write ``nfrewrite.toml`` and ``rules/<name>`` files for the lab's bridge; returns the path.
    ``bridge=False``: no ``[[bridge]]`` (the routed and host shapes); ``host``: ``[host] enabled``.

    Files are made 0600/0700 so the daemon's permission check is satisfied.
    """
    os.makedirs(os.path.join(directory, "rules"), mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name, text in rules.items():
        path = os.path.join(directory, "rules", name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
    config = os.path.join(directory, "nfrewrite.toml")
    with open(config, "w") as f:
        section = LAB_BRIDGE.format(offloads=f"offloads = {offloads}\n" if offloads else "")
        f.write(LAB_CONFIG.format(queue_num=queue_num, workers=workers,
                                  metrics_port=metrics_port, gso=str(gso).lower(),
                                  bridge=section if bridge else "",
                                  host="\n[host]\nenabled = true\n" if host else ""))
    os.chmod(config, 0o600)
    return config


class Daemon:
    """``nfrewrite run`` inside the lab's appliance namespace, its stderr captured to a file.

    ``start()`` returns once the daemon logged "ready" (or raises LabError with its log).
    """

    def __init__(self, lab: Lab, config: str, *, env: Mapping[str, str] | None = None) -> None:
        self.lab = lab
        self.config = config
        # the daemon's metrics directory beside the config, so a killed daemon leaves nothing
        # in /tmp (the lab's user removes the config's directory)
        self.env = {
            **lab.python_env(),
            "RUNTIME_DIRECTORY": os.path.dirname(os.path.abspath(config)),
            **(env or {}),
        }
        self.log_path = os.path.join(os.path.dirname(config), f"daemon-{secrets.token_hex(3)}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self._offset = self._log.tell()
        self.proc = self.lab.popen(
            "appliance",
            [sys.executable, "-m", "nfrewrite", "run", "-c", self.config],
            stdout=self._log, stderr=self._log, env=self.env,
        )
        self.wait_log("nfrewrite: ready", timeout)
        return self

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, *, after: int = 0) -> None:
        """Wait until ``text`` appears in the log (past byte ``after``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log()[after:]:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise LabError(f"daemon log never showed {text!r}:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self, timeout: float = 10.0) -> str:
        """SIGHUP; waits for the reload to finish; returns the log lines it wrote."""
        mark = len(self.log())
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log()[mark:]
            if "reload done" in tail or "reload failed" in tail:
                return tail
            time.sleep(0.05)
        raise LabError(f"reload did not finish:\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout)

    def wait(self, timeout: float = 5.0) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        finally:
            with contextlib.suppress(Exception):
                self._log.close()
        return rc

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
