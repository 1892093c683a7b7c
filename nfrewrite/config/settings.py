"""``nfrewrite.toml`` -> a frozen :class:`Config`; and :func:`load_all`, config plus rules at once.

Theory of operation
-------------------
The config file is small and every key has a default, so a missing file section simply means the
default. Everything present is validated: unknown keys (with a "did you mean"), types, ranges,
interface names. Like the rule loader, validation reports every problem with ``path:line:col``
(see :mod:`nfrewrite.config.diagnostics`) and never stops at the first; any error means no Config.

Schema (defaults in brackets)::

    rules_dir = "rules"            # [rules] relative to this file's directory
    [[bridge]]                     # zero or more
    name     = "br0"               # required; interface name (config.ifname.ifname_problem)
    ports    = ["eth1", "eth2"]    # required, >= 1, each an interface name used by one bridge only
    offloads = { gro = false }     # optional; keys rx tx tso gso gro lro -> bool [leave as is]
    [queue]
    num      = 0                   # [0] first NFQUEUE number, 0..65535 (num + workers - 1 too)
    workers  = 1                   # [1] 1..64; >1 balances over queues num..num+workers-1
    maxlen   = 4096                # [4096] kernel queue length, 1..2**31-1
    sock_buf = 8388608             # [8 MiB] netlink socket receive buffer in bytes, 4096..2**31-1
    gso      = true                # [true] take GSO super-packets whole (one queue round trip
                                   # per up to 64 KB instead of per wire segment); false: the
                                   # kernel segments them before queueing
    [metrics]
    listen   = "127.0.0.1:9640"    # ["127.0.0.1:9640"] host:port; IPv6 as "[::1]:9640"
    [flows]
    max          = 65536           # [65536] tracked flows, 1..2**31-1
    idle_timeout = 300             # [300] seconds (integer or float) > 0, at most a week
    memory       = "256M"          # ["256M"] memory budget of each worker's sequence records:
                                   # bytes, or a string with K, M or G (powers of 1024),
                                   # 64K..1T; when it is used up, new length-changing edits are
                                   # refused (counted; see nfrewrite.core.seqadj)
    state_max_age = 60             # [60] seconds (integer or float), 0..a week: the sequence
                                   # records are kept in the runtime directory (a journal that
                                   # outlives a worker, a snapshot at stop) and a start loads
                                   # them if they are at most this old; 0: neither kept nor loaded
    hold_ms      = 5               # [5] milliseconds a segment that ends in the beginning of a
                                   # pattern waits for the next one of its direction, 0..1000
                                   # (0: never held; see nfrewrite.core.stream)
    [host]
    enabled  = false               # [false] true: also rewrite the machine's own TCP (mangle
                                   # OUTPUT and INPUT; the loopback only for rules with
                                   # out_port = "lo"); with or without bridges
    [control]
    socket   = "/run/nfrewrite/control.sock"  # [$RUNTIME_DIRECTORY/control.sock, else this]
                                   # the UNIX socket of ``nfrewrite status``/``trace``; a
                                   # relative path is taken from this file's directory
    [security]
    strict_permissions = true      # [true] false: a rule file or the rules directory that is
                                   # writable by group/others or owned by another user is only
                                   # a warning. The config file itself is always checked (this
                                   # switch is read from it; see nfrewrite.config.filesafety)

:func:`load_all` loads the config and then the rules of its ``rules_dir``, passing the configured
bridge ports (and whether host mode is on) so ``in_port``/``out_port`` can be checked against
them; diagnostics of both come back
in one list (the config file's, its ownership/permission problems first, then the rules
directory's, then each rule file's in the order they are read). Every file is opened and checked
by :class:`nfrewrite.config.filesafety.SafeOpener` and read from the descriptor it checked (no
second open by name that a swap could redirect); the rule files are listed through the descriptor
of the rules directory it checked. Any file larger than 1 MiB is refused before it is read
(``tomlfile.MAX_FILE_SIZE``).

``rules_dir`` is put after the config file's directory with ``.`` and doubled ``/`` dropped but
``..`` kept: the kernel (and SafeOpener) take a ``..`` after a link to a directory to the parent
of the link's target, and folding the text would name another directory than ``ls`` shows.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from nfrewrite.config.diagnostics import Diagnostic, Severity, has_errors, type_name
from nfrewrite.config.filesafety import SafeOpener
from nfrewrite.config.rulefiles import load_rules
from nfrewrite.config.tomlfile import TomlFile
from nfrewrite.config.tomlpos import KeyPath
from nfrewrite.core.rules import RuleSet

__all__ = [
    "Bridge",
    "Config",
    "ControlConfig",
    "Diagnostic",
    "FlowsConfig",
    "HostConfig",
    "MetricsConfig",
    "Offloads",
    "QueueConfig",
    "SecurityConfig",
    "load_all",
    "load_config",
]

TOP_KEYS = ("rules_dir", "bridge", "queue", "metrics", "flows", "security", "control", "host")
BRIDGE_KEYS = ("name", "ports", "offloads")
# the offload features a bridge port may set: the one list (nfrewrite.kernel.netsetup maps each to
# its ethtool name and reads them all back; the metrics label values come from there)
OFFLOAD_KEYS = ("rx", "tx", "tso", "gso", "gro", "lro")
QUEUE_KEYS = ("num", "workers", "maxlen", "sock_buf", "gso")
METRICS_KEYS = ("listen",)
FLOWS_KEYS = ("max", "idle_timeout", "memory", "state_max_age", "hold_ms")
SECURITY_KEYS = ("strict_permissions",)
CONTROL_KEYS = ("socket",)
HOST_KEYS = ("enabled",)
#: Longest path a UNIX socket can be bound at (``sun_path`` holds 108 bytes with the final NUL).
MAX_SOCKET_PATH = 107

INT31 = 2**31 - 1
WEEK = 7 * 24 * 3600
MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MEMORY_MIN = 64 << 10
MEMORY_MAX = 1 << 40


@dataclass(frozen=True, slots=True)
class Offloads:
    """ethtool-style features to set on a bridge's ports at start; ``None`` leaves one as is."""

    rx: bool | None = None
    tx: bool | None = None
    tso: bool | None = None
    gso: bool | None = None
    gro: bool | None = None
    lro: bool | None = None

    def items(self) -> tuple[tuple[str, bool], ...]:
        """The features that are set, as (name, on) pairs in a fixed order."""
        out: list[tuple[str, bool]] = []
        for name in OFFLOAD_KEYS:
            value: bool | None = getattr(self, name)
            if value is not None:
                out.append((name, value))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Bridge:
    name: str
    ports: tuple[str, ...]
    offloads: Offloads = field(default_factory=Offloads)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    num: int = 0
    workers: int = 1
    maxlen: int = 4096
    sock_buf: int = 8 * 1024 * 1024
    gso: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    host: str = "127.0.0.1"  # without brackets, also for IPv6
    port: int = 9640

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FlowsConfig:
    max: int = 65536
    idle_timeout: float = 300.0
    memory: int = 256 << 20  # bytes
    state_max_age: float = 60.0  # seconds; 0: the records are not kept across a restart
    hold: float = 0.005  # seconds a segment ending in a pattern's beginning may be held


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    strict_permissions: bool = True


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """``[control]``: ``socket`` is the path as configured (resolved against the config file's
    directory), or None when not set: then the daemon's runtime directory decides (see
    :mod:`nfrewrite.service.control`)."""

    socket: str | None = None


@dataclass(frozen=True, slots=True)
class HostConfig:
    """``[host]``: ``enabled`` also queues the machine's own TCP (see
    :mod:`nfrewrite.kernel.ruletext`, host mode)."""

    enabled: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    path: str  # the config file as given
    rules_dir: str = "rules"  # resolved against the config file's directory
    bridges: tuple[Bridge, ...] = ()
    queue: QueueConfig = field(default_factory=QueueConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    flows: FlowsConfig = field(default_factory=FlowsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    host: HostConfig = field(default_factory=HostConfig)

    @property
    def bridge_ports(self) -> tuple[str, ...]:
        return tuple(p for b in self.bridges for p in b.ports)


def load_config(path: str) -> tuple[Config | None, list[Diagnostic]]:
    """Read and validate the config file. Returns (Config or None on any error, diagnostics)."""
    doc = TomlFile.read(path)
    config = None if doc.data is None else _build(doc, doc.data)
    doc.sort()
    if has_errors(doc.diagnostics):
        return None, doc.diagnostics
    return config, doc.diagnostics


def load_all(
    config_path: str,
    *,
    allow_length_change: bool = True,
    permissions: bool = True,
    euid: int | None = None,
) -> tuple[Config | None, RuleSet | None, list[Diagnostic]]:
    """Config, then the rules of its ``rules_dir``; all diagnostics of both in one list.

    Rules are still loaded (to report their errors) when the config has errors elsewhere, but not
    when the config cannot be parsed or its ``rules_dir`` is invalid.

    ``permissions`` (default on): open the config file and the rule files through one
    :class:`nfrewrite.config.filesafety.SafeOpener` (``euid`` = the daemon's user, default this
    process's), which checks who may write them, the rules directory and every directory above,
    on the descriptors the files are then read from. An error there makes the config (config
    file) or the ruleset (rules) ``None``, like any other error: the daemon refuses to start or
    to reload.
    """
    safe = SafeOpener(euid) if permissions else None
    doc = TomlFile.read(config_path, opener=safe.opener("config file", "error") if safe else None)
    config = None if doc.data is None else _build(doc, doc.data)
    rules_dir: str | None = None
    if doc.data is not None:
        raw = doc.data.get("rules_dir", "rules")
        if isinstance(raw, str) and raw:
            rules_dir = _resolve(config_path, raw)
            if not os.path.isdir(rules_dir):
                exists = os.path.exists(rules_dir)
                problem = "is not a directory" if exists else "does not exist"
                if "rules_dir" in doc.data:
                    doc.error(("rules_dir",), f"rules directory {rules_dir!r} {problem}")
                else:
                    doc.diagnostics.append(Diagnostic(
                        config_path, 0, 0, "error",
                        f"rules directory {rules_dir!r} {problem} (rules_dir defaults to "
                        "\"rules\", next to this file)"))
                rules_dir = None
    doc.sort()
    diagnostics = list(doc.diagnostics)
    config_ok = not has_errors(diagnostics)
    rules_ok = True
    rules_severity: Severity = "error" if _strict(doc.data) else "warning"
    dir_fd: int | None = None  # the rules directory as checked: the rule files are listed in it
    if safe is not None and rules_dir is not None:
        dir_fd, found = safe.open(rules_dir, "rules directory", rules_severity, directory=True)
        diagnostics.extend(found)
        rules_ok = not has_errors(found)
    ruleset: RuleSet | None = None
    try:
        if rules_dir is not None:
            ports = config.bridge_ports if config is not None else None
            host = config.host.enabled if config is not None else _host_enabled(doc.data)
            ruleset, rule_diags = load_rules(
                rules_dir, allow_length_change=allow_length_change, bridge_ports=ports, host=host,
                opener=safe.opener("rule file", rules_severity) if safe else None,
                dir_fd=dir_fd,
            )
            diagnostics.extend(rule_diags)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    if not rules_ok:
        ruleset = None
    if not config_ok:
        return None, ruleset, diagnostics
    return config, ruleset, diagnostics


def _strict(data: dict[str, object] | None) -> bool:
    """``security.strict_permissions`` as written, for the permission check (default True; a
    value that is not a boolean is reported by the validator and counts as True here)."""
    security = data.get("security") if data is not None else None
    value = security.get("strict_permissions") if isinstance(security, dict) else None
    return value if isinstance(value, bool) else True


def _host_enabled(data: dict[str, object] | None) -> bool:
    """``host.enabled`` as written, for checking rules against a config with errors elsewhere."""
    host = data.get("host") if data is not None else None
    value = host.get("enabled") if isinstance(host, dict) else None
    return value is True


def _resolve(config_path: str, rules_dir: str) -> str:
    """``rules_dir`` after the config file's directory; no ``..`` folded (see the module doc)."""
    joined = os.path.join(os.path.dirname(config_path), rules_dir)
    kept = "/".join(p for p in joined.split("/") if p not in ("", "."))
    return ("/" + kept if joined.startswith("/") else kept) or "."


# ---------------------------------------------------------------------------------------------


def _build(doc: TomlFile, data: dict[str, object]) -> Config | None:
    doc.check_keys((), data, TOP_KEYS, "the config file")
    rules_dir = "rules"
    if "rules_dir" in data:
        value = doc.want_str(("rules_dir",), data["rules_dir"], "rules_dir")
        if value == "":
            doc.error(("rules_dir",), "rules_dir must not be empty")
        elif value is not None:
            rules_dir = value
    bridges = _bridges(doc, data["bridge"]) if "bridge" in data else ()
    queue = _queue(doc, data["queue"]) if "queue" in data else QueueConfig()
    metrics = _metrics(doc, data["metrics"]) if "metrics" in data else MetricsConfig()
    flows = _flows(doc, data["flows"]) if "flows" in data else FlowsConfig()
    security = SecurityConfig()
    if "security" in data:
        table = _table(doc, "security", data["security"], SECURITY_KEYS)
        if "strict_permissions" in table:
            kp: KeyPath = ("security", "strict_permissions")
            strict = doc.want_bool(kp, table["strict_permissions"], "security.strict_permissions")
            security = SecurityConfig(strict if strict is not None else True)
    control = _control(doc, data["control"]) if "control" in data else ControlConfig()
    host = HostConfig()
    if "host" in data:
        table = _table(doc, "host", data["host"], HOST_KEYS)
        if "enabled" in table:
            on = doc.want_bool(("host", "enabled"), table["enabled"], "host.enabled")
            host = HostConfig(bool(on))
    if has_errors(doc.diagnostics):
        return None
    return Config(doc.path, _resolve(doc.path, rules_dir), bridges, queue, metrics, flows,
                  security, control, host)


def _bridges(  # noqa: C901 - each entry's checks fill the tables the cross-entry checks read
    doc: TomlFile, value: object
) -> tuple[Bridge, ...]:
    kp: KeyPath = ("bridge",)
    if isinstance(value, dict):
        doc.error(kp, "write each bridge as [[bridge]] (an array of tables), not [bridge]")
        return ()
    if not isinstance(value, list):
        doc.error(kp, f"bridge must be an array of tables ([[bridge]]), not {type_name(value)}")
        return ()
    bridges: list[Bridge] = []
    names: dict[str, KeyPath] = {}
    port_owner: dict[str, str] = {}
    for bkp, table in doc.tables_in(kp, value, "a bridge", BRIDGE_KEYS):
        name: str | None = None
        if "name" not in table:
            doc.error(bkp, 'bridge has no name (add name = "br0")')
        else:
            name = doc.want_ifname(bkp + ("name",), table["name"], "bridge name")
            if name is not None and name in names:
                line, col = doc.at(names[name])
                doc.error(bkp + ("name",), f"duplicate bridge '{name}' (first at "
                                           f"{doc.path}:{line}:{col})")
                name = None
            elif name is not None:
                names[name] = bkp + ("name",)
        ports: list[str] = []
        if "ports" not in table:
            doc.error(bkp, 'bridge has no ports (add ports = ["eth1", "eth2"])')
        elif not isinstance(table["ports"], list):
            doc.error(bkp + ("ports",), f"ports must be an array of interface names, not "
                                        f"{type_name(table['ports'])}")
        elif not table["ports"]:
            doc.error(bkp + ("ports",), "ports must name at least one interface")
        else:
            for j, item in enumerate(table["ports"]):
                pkp = bkp + ("ports", j)
                port = doc.want_ifname(pkp, item, "port")
                if port is None:
                    continue
                owner = port_owner.get(port)
                if port in ports:
                    doc.error(pkp, f"port '{port}' is listed twice")
                elif owner is not None:
                    doc.error(pkp, f"port '{port}' is already a port of bridge '{owner}'")
                else:
                    ports.append(port)
                    port_owner[port] = name or "?"
        offloads = Offloads()
        if "offloads" in table:
            okp = bkp + ("offloads",)
            otable = doc.want_table(okp, table["offloads"], "offloads")
            if otable is not None:
                doc.check_keys(okp, otable, OFFLOAD_KEYS, "offloads")
                flags: dict[str, bool] = {}
                for key in OFFLOAD_KEYS:
                    if key in otable:
                        flag = doc.want_bool(okp + (key,), otable[key], f"offloads.{key}")
                        if flag is not None:
                            flags[key] = flag
                offloads = Offloads(**flags)
        if name is not None:
            bridges.append(Bridge(name, tuple(ports), offloads))
    for bname, nkp in names.items():
        if bname in port_owner:
            doc.error(nkp, f"bridge '{bname}' is also listed as a port of bridge "
                           f"'{port_owner[bname]}'")
    return tuple(bridges)


def _table(doc: TomlFile, name: str, value: object, keys: tuple[str, ...]) -> dict[str, object]:
    table = doc.want_table((name,), value, f"[{name}]")
    if table is None:
        return {}
    doc.check_keys((name,), table, keys, f"[{name}]")
    return table


def _queue(doc: TomlFile, value: object) -> QueueConfig:
    table = _table(doc, "queue", value, QUEUE_KEYS)
    ranges = {"num": (0, 65535), "workers": (1, 64), "maxlen": (1, INT31),
              "sock_buf": (4096, INT31)}
    values: dict[str, int] = {}
    for key, (lo, hi) in ranges.items():
        if key in table:
            v = doc.want_int(("queue", key), table[key], f"queue.{key}", lo, hi)
            if v is not None:
                values[key] = v
    gso = True
    if "gso" in table:
        flag = doc.want_bool(("queue", "gso"), table["gso"], "queue.gso")
        gso = True if flag is None else flag
    queue = QueueConfig(**values, gso=gso)
    last = queue.num + queue.workers - 1
    if last > 65535 and "num" in values and "workers" in values:
        doc.error(("queue", "workers"), f"queues {queue.num}..{last} run past 65535 "
                                        "(lower num or workers)")
    return queue


def _metrics(doc: TomlFile, value: object) -> MetricsConfig:
    table = _table(doc, "metrics", value, METRICS_KEYS)
    if "listen" not in table:
        return MetricsConfig()
    kp: KeyPath = ("metrics", "listen")
    text = doc.want_str(kp, table["listen"], "metrics.listen")
    if text is None:
        return MetricsConfig()
    parsed = _host_port(text)
    if isinstance(parsed, str):
        doc.error(kp, f"metrics.listen {text!r}: {parsed}")
        return MetricsConfig()
    return MetricsConfig(*parsed)


def _host_port(text: str) -> tuple[str, int] | str:
    """("host", port) from "host:port" / "[v6]:port", or the reason it is malformed."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text.startswith(":", close + 1):
            return 'write an IPv6 address as "[::1]:9640"'
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            return 'missing port (write "host:port", e.g. "127.0.0.1:9640")'
        if ":" in host:
            return 'write an IPv6 address in brackets, e.g. "[::1]:9640"'
        if not host:
            return 'missing host (use "0.0.0.0:PORT" to listen on all IPv4 addresses)'
        if any(ch.isspace() or ch in "/[]" for ch in host):
            return f"{host!r} is not a host name or address"
    if not port_text.isdigit():
        return f"port {port_text!r} is not a number"
    port = int(port_text)
    if not 1 <= port <= 65535:
        return f"port {port} is out of range (1..65535)"
    return host, port


def _flows(doc: TomlFile, value: object) -> FlowsConfig:
    table = _table(doc, "flows", value, FLOWS_KEYS)
    flows = FlowsConfig()
    max_flows = flows.max
    idle = flows.idle_timeout
    if "max" in table:
        max_flows = doc.want_int(("flows", "max"), table["max"], "flows.max", 1, INT31) or max_flows
    if "idle_timeout" in table:
        kp: KeyPath = ("flows", "idle_timeout")
        raw = table["idle_timeout"]
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            doc.error(kp, f"flows.idle_timeout must be a number of seconds, not {type_name(raw)}")
        elif not 0 < raw <= WEEK:
            doc.error(kp, f"flows.idle_timeout {raw} is out of range (more than 0, at most {WEEK})")
        else:
            idle = float(raw)
    memory = flows.memory
    if "memory" in table:
        memory = _memory(doc, ("flows", "memory"), table["memory"]) or memory
    max_age = flows.state_max_age
    if "state_max_age" in table:
        kp = ("flows", "state_max_age")
        raw = table["state_max_age"]
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            doc.error(kp, f"flows.state_max_age must be a number of seconds, not {type_name(raw)}")
        elif not 0 <= raw <= WEEK:
            doc.error(kp, f"flows.state_max_age {raw} is out of range (0 to {WEEK})")
        else:
            max_age = float(raw)
    hold = flows.hold
    if "hold_ms" in table:
        ms = doc.want_int(("flows", "hold_ms"), table["hold_ms"], "flows.hold_ms", 0, 1000)
        if ms is not None:
            hold = ms / 1000
    return FlowsConfig(max_flows, idle, memory, max_age, hold)


def _memory(doc: TomlFile, kp: KeyPath, raw: object) -> int | None:
    """A byte count: an integer, or a string of digits with an optional K, M or G (powers of
    1024); None (after an error) if it is not one or out of range."""
    name = ".".join(str(k) for k in kp)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        doc.error(kp, f'{name} must be a size like "256M" or a number of bytes, '
                      f"not {type_name(raw)}")
        return None
    if isinstance(raw, int):
        value = raw
    else:
        text = raw.strip()
        unit = text[-1:].upper() if text[-1:].isalpha() else ""
        digits = text[: len(text) - len(unit)]
        if unit not in MEMORY_UNITS or not (digits.isascii() and digits.isdigit()):
            doc.error(kp, f'{name} {raw!r} is not a size (write e.g. "256M", "1G", "65536K")')
            return None
        value = int(digits) * MEMORY_UNITS[unit]
    if not MEMORY_MIN <= value <= MEMORY_MAX:
        doc.error(kp, f"{name} {raw!r} is out of range (64K..1T)")
        return None
    return value


def _control(doc: TomlFile, value: object) -> ControlConfig:
    table = _table(doc, "control", value, CONTROL_KEYS)
    if "socket" not in table:
        return ControlConfig()
    kp: KeyPath = ("control", "socket")
    text = doc.want_str(kp, table["socket"], "control.socket")
    if text is None:
        return ControlConfig()
    if not text:
        doc.error(kp, "control.socket must not be empty (leave it out for the default)")
        return ControlConfig()
    if "\0" in text:
        doc.error(kp, "control.socket must not contain a NUL character")
        return ControlConfig()
    path = _resolve(doc.path, text)
    if text.endswith("/"):
        doc.error(kp, f"control.socket {text!r} names a directory; name the socket file in it, "
                      f"e.g. {text.rstrip('/') + '/control.sock'!r}")
        return ControlConfig()
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        doc.error(kp, f"control.socket {path!r} is {size} bytes long; a UNIX socket path can "
                      f"have at most {MAX_SOCKET_PATH}")
        return ControlConfig()
    return ControlConfig(path)
