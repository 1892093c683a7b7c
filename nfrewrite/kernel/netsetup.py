"""Bridges, ports, br_netfilter switches and port offloads: the L2 plumbing the daemon needs.

Theory of operation
-------------------
nfrewrite sits in the middle of a transparent bridge. For bridged IPv4/IPv6 packets to traverse the
iptables FORWARD hook (where ``nfrewrite.kernel.firewall`` sends them to NFQUEUE), br_netfilter
must be asked to call iptables for bridged traffic. That switch is the sysctl
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

The sysctls the daemon changes (the two br_netfilter switches above and conntrack's
``nf_conntrack_tcp_be_liberal``, see :func:`set_conntrack_tcp_liberal`) belong to the whole
network namespace, in production the host's own, so a clean stop puts them back as they were.
A :class:`SysctlKeeper` writes the original value to a record file *before* it changes a sysctl,
and a later run that finds the record keeps that original instead of reading the value the
crashed run left (a restart after ``kill -9`` would otherwise take "1" for the original). The
record lives in the daemon's runtime directory (``$RUNTIME_DIRECTORY``, else ``/run/nfrewrite``;
the unit must keep it across restarts: ``RuntimeDirectoryPreserve=yes``), one file per network
namespace, named by the namespace's inode; inside it the namespace's cookie (``SO_NETNS_COOKIE``,
never reused while the machine runs) and the boot id tell a record of a namespace that is gone,
or of an earlier boot, from a current one: such a record is ignored. Only these three sysctls
are ever written back, and only with a value read from them.

One daemon per network namespace (and runtime directory): a keeper first takes an exclusive
``flock`` on ``sysctl-netns-<inode>.lock`` beside the record and holds it for the run; a second
daemon that cannot get it within a few seconds refuses to start and touches nothing, so it
cannot write back the originals under the running one or delete its record. Forked children
(workers, the reload loader) close their inherited copy of the lock at once
(``os.register_at_fork``), so after a ``kill -9`` of the supervisor the lock is free as soon as
the supervisor is gone. The lock file holds its holder's pid, for the refusal's message; the
holder deletes it on a clean stop, and a taker checks that the file it locked is still the one
at that name. The runtime directory may have been left by another user (root running the
daemon by hand in the service's ``/run/nfrewrite``): it must be owned by this process's user and
writable by nobody else, or the keeper refuses; the record and the lock file are opened relative
to the directory, without following a symlink and without blocking on a FIFO, and used only if
they are regular files owned by this user; the temporary file of a new record is created
exclusively.

What it must not do: run ``ip``/``ethtool``/``sysctl`` subprocesses (pyroute2 and /proc only), touch
interfaces other than the named bridge and ports, or take the bridge down on stop: the bridge stays
up so traffic keeps flowing when the daemon exits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError

from nfrewrite.config.ifname import ifname_problem
from nfrewrite.config.settings import OFFLOAD_KEYS

#: short key (one of the config's OFFLOAD_KEYS, each one here) -> ethtool "long" offload name (as
#: ``ethtool -k`` prints it).
OFFLOAD_NAMES: dict[str, str] = {
    "rx": "rx-checksumming",
    "tx": "tx-checksumming",
    "tso": "tcp-segmentation-offload",
    "gso": "generic-segmentation-offload",
    "gro": "generic-receive-offload",
    "lro": "large-receive-offload",
}

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


def enable_br_netfilter(
    proc_bridge: Path = PROC_BRIDGE, keeper: SysctlKeeper | None = None
) -> None:
    """Turn on bridge-nf-call-iptables/-ip6tables in the current network namespace.

    With ``keeper`` the original values are recorded first, for :meth:`SysctlKeeper.restore`.
    """
    if not proc_bridge.is_dir():
        raise NetSetupError(
            f"{proc_bridge} does not exist: br_netfilter is not loaded (modprobe br_netfilter)"
        )
    for name in BR_NF_SYSCTLS:
        path = proc_bridge / name
        if keeper is not None:
            keeper.set(path, True)
            continue
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
        except OSError as e:
            raise NetSetupError(f"cannot enable {path}: {e.strerror}") from e


CT_TCP_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def set_conntrack_tcp_liberal(
    on: bool, path: Path = CT_TCP_LIBERAL, keeper: SysctlKeeper | None = None
) -> bool | None:
    """Set conntrack's TCP window checking to liberal (or back); returns the previous setting
    (with ``keeper``: the setting before nfrewrite first changed it, from its record).

    Why: after a length-changing rewrite, each side acknowledges sequence numbers that conntrack
    (which saw the packets before we changed them) never saw sent. In strict mode it marks those
    ACKs INVALID and detaches them from their connection, so the connmark that sends the rest of
    the flow to the queue no longer matches them and they reach the sender unadjusted. Liberal
    mode only stops marking out-of-window packets INVALID. Per network namespace. Returns None
    when conntrack is not there (nothing to do).
    """
    if keeper is not None:
        return keeper.set(path, on)
    try:
        previous = path.read_text().strip() == "1"
        if previous != on:
            path.write_text("1\n" if on else "0\n")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NetSetupError(f"cannot set {path}: {e.strerror}") from e
    return previous


#: the sysctls a :class:`SysctlKeeper` may change and write back (all booleans)
KEPT_SYSCTLS: tuple[Path, ...] = (*(PROC_BRIDGE / n for n in BR_NF_SYSCTLS), CT_TCP_LIBERAL)
DEFAULT_STATE_DIR = "/run/nfrewrite"
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)


def state_dir() -> str:
    """Where the daemon keeps its sysctl record: the first of systemd's ``$RUNTIME_DIRECTORY``
    (``RuntimeDirectory=nfrewrite``), else ``/run/nfrewrite``."""
    given = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return given or DEFAULT_STATE_DIR


def _netns_identity() -> tuple[int, int | None, str]:
    """(inode, cookie or None, boot id) of this process's network namespace."""
    inode = os.stat("/proc/self/ns/net").st_ino
    cookie: int | None = None
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return inode, cookie, boot


class SysctlKeeperBusy(NetSetupError):
    """Another process holds this network namespace's lock (another nfrewrite runs here)."""


#: keepers holding a lock in this process; a forked child closes their descriptors
_HOLDERS: weakref.WeakSet[SysctlKeeper] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for keeper in list(_HOLDERS):
        keeper._drop()  # the module's own fork hook
    _HOLDERS.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _pid_in(fd: int) -> str:
    """`` (pid N)`` as the lock's holder wrote it in the file, else ""."""
    try:
        text = os.pread(fd, 16, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SysctlKeeper:
    """Sets this network namespace's sysctls and puts them back on :meth:`restore`, also when a
    run in between was killed (see the module doc). One per daemon run; it holds the
    namespace's lock from :meth:`lock` (or its first :meth:`set`/:meth:`restore`) to
    :meth:`unlock` or the end of the process."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or state_dir()
        inode, self._cookie, self._boot = _netns_identity()
        self._name = f"sysctl-netns-{inode}.json"
        self._lock_name = f"sysctl-netns-{inode}.lock"
        self.path = os.path.join(self.directory, self._name)
        self.lock_path = os.path.join(self.directory, self._lock_name)
        self._dir_fd: int | None = None
        self._lock_fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this keeper holds the namespace's lock."""
        return self._lock_fd is not None

    def lock(self, wait: float = 0.0) -> None:
        """Take the namespace's lock, trying for up to ``wait`` seconds; raises
        SysctlKeeperBusy if another process keeps it, NetSetupError if the directory or the
        lock file is not safe to use."""
        if self._lock_fd is not None:
            return
        dir_fd = self._open_directory()
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fd = self._open_ours(self._lock_name, self.lock_path,
                                         os.O_RDWR | os.O_CREAT, dir_fd)
                except FileNotFoundError as e:  # the directory went away
                    raise NetSetupError(f"cannot create {self.lock_path}: {e.strerror}") from e
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _pid_in(fd)
                    os.close(fd)
                    if time.monotonic() >= deadline:
                        raise SysctlKeeperBusy(
                            f"another nfrewrite{holder} runs in this network namespace (it "
                            f"holds {self.lock_path}); stop it first") from None
                    time.sleep(0.1)
                    continue
                except OSError as e:
                    os.close(fd)
                    raise NetSetupError(f"cannot lock {self.lock_path}: {e.strerror}") from e
                if self._same_file(fd, dir_fd):
                    with contextlib.suppress(OSError):  # for the message of a second daemon
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    break
                os.close(fd)  # its holder removed it on stop: lock the new one
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd, self._lock_fd = dir_fd, fd
        _HOLDERS.add(self)

    def unlock(self) -> None:
        """Delete the lock file and release the lock (nothing if not held)."""
        if self._lock_fd is None or self._dir_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._lock_name, dir_fd=self._dir_fd)
        self._drop()
        _HOLDERS.discard(self)

    def _drop(self) -> None:
        for fd in (self._lock_fd, self._dir_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = self._dir_fd = None

    def _held_dir(self) -> int:
        """The directory's descriptor, the lock taken (now, without waiting) if not held."""
        self.lock()
        assert self._dir_fd is not None
        return self._dir_fd

    def _same_file(self, fd: int, dir_fd: int) -> bool:
        try:
            named = os.stat(self._lock_name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _open_directory(self) -> int:
        """A descriptor of the runtime directory (created 0700 if missing), after checking that
        it is ours and writable by nobody else."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise NetSetupError(f"cannot use {self.directory} for the sysctl record: "
                                f"{e.strerror}") from e
        st = os.fstat(fd)
        uid = os.geteuid()
        if st.st_uid != uid or st.st_mode & 0o022:
            os.close(fd)
            raise NetSetupError(
                f"{self.directory} is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):04o}; the sysctl record needs a directory owned by "
                f"uid {uid} that no one else can write: set RUNTIME_DIRECTORY to one (mode 0700) "
                f"or stop the service that owns this one")
        return fd

    @staticmethod
    def _open_ours(name: str, path: str, flags: int, dir_fd: int) -> int:
        """Open ``name`` in the directory, refusing a symlink, a FIFO or anything that is not a
        regular file of this user that only this user can write."""
        try:
            fd = os.open(name, flags | _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise NetSetupError(f"cannot open {path}: {why}; remove it after checking what put "
                                "it there") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(fd)
            raise NetSetupError(f"{path} is not a regular file of uid {os.geteuid()} writable "
                                "only by it; remove it after checking what put it there")
        return fd

    def set(self, path: Path, on: bool) -> bool | None:
        """Set the boolean sysctl ``path``; return its original value (the one recorded by an
        earlier run if there is a record) or None if the sysctl does not exist."""
        if path not in KEPT_SYSCTLS:
            raise ValueError(f"{path} is not a sysctl nfrewrite changes")
        want = "1" if on else "0"
        try:
            current = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise NetSetupError(f"cannot read {path}: {e.strerror}") from e
        record = self._load()
        original = record.get(str(path))
        if original is None and current != want:
            original = record[str(path)] = current
            self._save(record)  # before the change: a crash right after it still finds it
        if current != want:
            try:
                path.write_text(want + "\n")
            except OSError as e:
                raise NetSetupError(f"cannot set {path}: {e.strerror}") from e
        return (original if original is not None else current) == "1"

    def restore(self) -> list[str]:
        """Write every recorded original back, then delete the record; ``["name=value", ...]``
        of what was written. Raises NetSetupError (record kept) if a sysctl cannot be written,
        SysctlKeeperBusy (nothing done) if another process holds the lock."""
        record = self._load()
        done: list[str] = []
        for path in KEPT_SYSCTLS:
            original = record.get(str(path))
            if original is None:
                continue
            try:
                if path.read_text().strip() != original:
                    path.write_text(original + "\n")
                    done.append(f"{path.name}={original}")
            except FileNotFoundError:
                continue
            except OSError as e:
                raise NetSetupError(f"cannot restore {path} to {original}: {e.strerror}; the "
                                    f"original stays recorded in {self.path}") from e
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name, dir_fd=self._held_dir())
        return done

    def _load(self) -> dict[str, str]:
        """The recorded originals; {} without a record or with one of another namespace that had
        the same inode, or of an earlier boot."""
        try:
            fd = self._open_ours(self._name, self.path, os.O_RDONLY, self._held_dir())
        except FileNotFoundError:
            return {}
        try:
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(65536))
        except (OSError, ValueError) as e:
            raise NetSetupError(f"cannot read the sysctl record {self.path}: {e}; remove it after "
                                "checking the sysctls it names") from e
        if (not isinstance(data, dict) or data.get("boot_id") != self._boot
                or data.get("netns_cookie") != self._cookie):
            return {}
        values = data.get("originals")
        if not isinstance(values, dict):
            return {}
        known = {str(p) for p in KEPT_SYSCTLS}
        return {k: v for k, v in values.items() if k in known and v in ("0", "1")}

    def _save(self, originals: dict[str, str]) -> None:
        data = {"boot_id": self._boot, "netns_cookie": self._cookie, "originals": originals}
        dir_fd = self._held_dir()
        tmp = f"{self._name}.{os.getpid()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        created = False
        try:
            try:
                fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            except FileExistsError:  # left by a killed run with our pid; we hold the lock
                os.unlink(tmp, dir_fd=dir_fd)
                fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            created = True
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as e:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
            raise NetSetupError(f"cannot record the original sysctl values in {self.path}: "
                                f"{e.strerror}; nothing was changed") from e


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
