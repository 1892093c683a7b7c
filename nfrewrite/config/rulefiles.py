"""Rule files -> one compiled RuleSet, or precise errors (never a silent typo).

Theory of operation
-------------------
``load_rules(rules_dir)`` reads ``rules_dir/*.toml`` in lexical order of file name (names starting
with ``.`` are skipped: editor droppings), validates every ``[[rule]]`` against the schema below and
compiles it into a :class:`~nfrewrite.core.rules.RuleSet`. Validation never stops at the first
mistake: each bad value is reported with its ``path:line:col`` (see
:mod:`nfrewrite.config.diagnostics`) and the loader goes on, so one run shows them all. Any error
means no ruleset (``None``); warnings do not.

Schema (every key but ``name`` is optional)::

    [[rule]]
    name     = "hide-banner"       # unique across files; [a-z0-9][a-z0-9_.-]*, <= 64 characters
    match    = { protocol = "tcp", # the only one for now (default)
                 sport = 80,       # dport/sport: int 0..65535, "lo-hi", or a non-empty list
                 dst = "10.0.0.0/8",  # src/dst: CIDR or list; IPv4/IPv6; host bits set = error
                 in_port = "eth1" }   # in_port/out_port: a port of a configured [[bridge]]
                                   # (or out_port = "lo" in host mode: the loopback)
                                   # no match at all = every TCP packet
    replace  = [ { find = "a", with = "b" }, { find_hex = "de ad", with_hex = "" },
                 { find_regex = 'Server: [^\\r\\n]*', with = 'Server: web', max_len = 256 } ]
    set      = { ttl = 64 }        # ttl 1..255 (IPv4), hop_limit 1..255 (IPv6), dscp 0..63,
                                   # window 0..65535, mss / mss_max 536..65535 (not both)
    verdict  = "accept"            # or "drop"
    examples = [ { input = "a", output = "b" } ]   # or input_hex / output_hex

Text (``find``/``with``) is encoded as UTF-8; ``find_hex``/``with_hex`` are hex bytes in which
whitespace is ignored. The two forms may be mixed in one entry (``find`` with ``with_hex`` and the
other way round): each side is just bytes. ``find`` must not be empty; ``with`` may be (deletes).
``find_regex`` is a regular expression over bytes (Python's syntax; what is accepted, and the
leftmost-longest semantics, in :mod:`nfrewrite.core.regex`), refused at the spot it is about
when it is not linear-time or its matches cannot be bounded by ``max_len`` (default
``DEFAULT_MAX_LEN``, 256; at most ``MAX_MAX_LEN``, 4096); its ``with`` inserts groups with
``\\1``..``\\9`` (``\\\\``: a backslash), its ``with_hex`` is literal bytes.

Warnings (the rule still loads): a rule with no replace, no set and no drop; ``with`` equal to
``find``; the same ``find`` twice in a rule; ``ttl`` on an IPv6-only rule (``hop_limit`` on an
IPv4-only one); replace/set on a dropping rule; ``in_port``/``out_port`` with no bridge configured
(an error in host mode: then the rule could only be meant for the machine's own traffic, which
no bridge port carries). ``out_port = "lo"`` names the loopback: valid in host mode only, and
``in_port = "lo"`` never (a loopback packet is rewritten once, as it is sent).
``load_rules(..., allow_length_change=False)`` turns a replace whose ``with`` differs in length
from its ``find`` into an error (for a daemon that cannot adjust sequence numbers).

Limits (a clear error, never a hang or a gigabyte of memory): at most ``MAX_RULE_FILES`` (1000)
rule files, each at most 1 MiB (``tomlfile.MAX_FILE_SIZE``, refused before it is read), at most
``MAX_RULES`` (10,000) rules in all (counting invalid ones; files after the one that crosses the
limit are not read), and every ``find``/``with``/example at most ``MAX_BYTES`` (64 KiB).

A rule's ``examples`` are only read here; ``nfrewrite check`` runs each through the engine
(:mod:`nfrewrite.config.examples`).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
from collections.abc import Collection

from nfrewrite.config.diagnostics import Diagnostic, has_errors, type_name
from nfrewrite.config.tomlfile import Opener, TomlFile
from nfrewrite.config.tomlpos import KeyPath
from nfrewrite.core.regex import (
    DEFAULT_MAX_LEN,
    MAX_MAX_LEN,
    RegexError,
    compile_regex,
    parse_template,
)
from nfrewrite.core.rules import (
    SET_KEYS,
    Example,
    HeaderSet,
    Match,
    Network,
    PortRanges,
    Replace,
    Rule,
    RuleSet,
    regex_problem,
)

__all__ = ["MAX_BYTES", "MAX_RULE_FILES", "MAX_RULES", "load_rules", "rule_files"]

RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
RULE_NAME_MAX = 64
MAX_RULES = 10_000  # rules in all files together
MAX_RULE_FILES = 1000  # *.toml files in the rules directory
MAX_BYTES = 64 * 1024  # one find / with / example input or output
VERDICTS = ("accept", "drop")
PROTOCOLS = ("tcp",)

RULE_KEYS = ("name", "match", "replace", "set", "verdict", "examples")
MATCH_KEYS = ("protocol", "sport", "dport", "src", "dst", "in_port", "out_port")
REPLACE_KEYS = ("find", "with", "find_hex", "with_hex", "find_regex", "max_len")
EXAMPLE_KEYS = ("input", "output", "input_hex", "output_hex")
# (lo, hi) for every integer under `set`
SET_RANGES = {
    "ttl": (1, 255),
    "hop_limit": (1, 255),
    "dscp": (0, 63),
    "window": (0, 65535),
    "mss": (536, 65535),
    "mss_max": (536, 65535),
}


#: ``out_port`` naming the loopback (host mode)
LOOPBACK = "lo"
_PORT_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


def load_rules(
    rules_dir: str,
    *,
    allow_length_change: bool = True,
    bridge_ports: Collection[str] | None = None,
    opener: Opener | None = None,
    dir_fd: int | None = None,
    host: bool = False,
) -> tuple[RuleSet | None, list[Diagnostic]]:
    """Read, validate and compile ``rules_dir/*.toml``. Returns (ruleset or None, diagnostics).

    ``opener``: how each file is opened (``nfrewrite.config.filesafety.SafeOpener``; default plain).
    ``dir_fd``: ``rules_dir`` already opened (by that SafeOpener), to list it through (see
    :func:`rule_files`).

    ``allow_length_change=False`` makes a replace whose ``with`` differs in length from its
    ``find`` an error. ``bridge_ports``, when given, are the only valid ``in_port``/``out_port``
    values (an empty collection means no bridge is configured: such a match is then a warning,
    and an error in ``host`` mode). ``host``: ``[host] enabled``, which makes ``out_port = "lo"``
    (the loopback) valid.
    """
    loader = _Loader(allow_length_change, bridge_ports, host)
    files, diagnostics = rule_files(rules_dir, dir_fd)
    if files is None:
        return None, diagnostics
    for n, path in enumerate(files):
        if loader.full:
            diagnostics.append(Diagnostic(rules_dir, 0, 0, "error", f"{len(files) - n} more rule "
                                          f"files not read: the limit of {MAX_RULES} rules is "
                                          "reached"))
            break
        doc = TomlFile.read(path, opener=opener)
        if doc.data is not None:
            loader.load_file(doc, doc.data)
        doc.sort()
        diagnostics.extend(doc.diagnostics)
    if has_errors(diagnostics):
        return None, diagnostics
    return RuleSet(loader.rules, files), diagnostics


def rule_files(
    rules_dir: str, dir_fd: int | None = None
) -> tuple[list[str] | None, list[Diagnostic]]:
    """The rule files ``load_rules`` reads, in order: ``rules_dir/*.toml``, regular files, names
    not starting with ``.``. None (with an error) when the directory cannot be listed or holds
    more than ``MAX_RULE_FILES`` of them.

    ``dir_fd``, when given, is ``rules_dir`` opened: the names are listed (and their types
    looked up) through it, not through the path, so the directory listed is the one that was
    checked on opening it. The paths returned are still ``rules_dir/name``, for the messages
    and for the opener, which walks them as the kernel does (see ``nfrewrite.config.filesafety``).
    """
    try:
        names = sorted(os.listdir(rules_dir if dir_fd is None else dir_fd))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        problem = f"cannot read rules directory: {reason}"
        return None, [Diagnostic(rules_dir, 0, 0, "error", problem)]

    def regular(name: str) -> bool:  # os.path.isfile, through dir_fd when there is one
        try:
            where = os.path.join(rules_dir, name) if dir_fd is None else name
            return stat.S_ISREG(os.stat(where, dir_fd=dir_fd).st_mode)
        except (OSError, ValueError):
            return False

    files = [
        os.path.join(rules_dir, n)
        for n in names
        if n.endswith(".toml") and not n.startswith(".") and regular(n)
    ]
    if len(files) > MAX_RULE_FILES:
        problem = (f"{len(files)} rule files (*.toml) in the rules directory; at most "
                   f"{MAX_RULE_FILES} are allowed (merge them)")
        return None, [Diagnostic(rules_dir, 0, 0, "error", problem)]
    if not files:
        return files, [
            Diagnostic(rules_dir, 0, 0, "warning", "no rule files (*.toml) in the rules directory")
        ]
    return files, []


class _Loader:
    """Validates rule files one after another, keeping what spans files (names, order)."""

    def __init__(self, allow_length_change: bool, bridge_ports: Collection[str] | None,
                 host: bool = False) -> None:
        self.allow_length_change = allow_length_change
        self.bridge_ports = bridge_ports
        self.host = host
        self.rules: list[Rule] = []
        self.names: dict[str, str] = {}  # name -> "path:line:col" of its first definition
        self.seen = 0  # [[rule]] entries read, valid or not (MAX_RULES counts these)
        self.full = False  # MAX_RULES reached: read no further

    def load_file(self, doc: TomlFile, data: dict[str, object]) -> None:
        doc.check_keys((), data, ("rule",), "a rule file")
        if "rule" not in data:
            if not doc.diagnostics:
                doc.diagnostics.append(
                    Diagnostic(doc.path, 0, 0, "warning", "no [[rule]] in this file")
                )
            return
        entries = data["rule"]
        if isinstance(entries, dict):
            doc.error(("rule",), "write each rule as [[rule]] (an array of tables), not [rule]")
            return
        if not isinstance(entries, list):
            doc.error(("rule",), f"rule must be an array of tables ([[rule]]), not "
                                 f"{type_name(entries)}")
            return
        for i, entry in enumerate(entries):
            if self.seen >= MAX_RULES:
                doc.error(("rule", i), f"too many rules: at most {MAX_RULES} in all rule files "
                                       f"together ({len(entries) - i} more in this file not read)")
                self.full = True
                return
            self.seen += 1
            table = doc.want_table(("rule", i), entry, "a rule")
            if table is not None:
                rule = self.rule(doc, ("rule", i), table)
                if rule is not None:
                    self.rules.append(rule)

    # -- one rule ------------------------------------------------------------------------------

    def rule(self, doc: TomlFile, kp: KeyPath, table: dict[str, object]) -> Rule | None:
        errors_before = _count_errors(doc)
        doc.check_keys(kp, table, RULE_KEYS, "a rule")
        name = self.name(doc, kp, table)

        match = Match()
        if "match" in table:
            m = doc.want_table(kp + ("match",), table["match"], "match")
            if m is not None:
                match = self.match(doc, kp + ("match",), m)

        replaces: tuple[Replace, ...] = ()
        if "replace" in table:
            replaces = self.replaces(doc, kp + ("replace",), table["replace"])

        header_set = HeaderSet()
        if "set" in table:
            s = doc.want_table(kp + ("set",), table["set"], "set")
            if s is not None:
                header_set = self.header_set(doc, kp + ("set",), s, match)

        verdict = "accept"
        if "verdict" in table:
            verdict = self.verdict(doc, kp + ("verdict",), table["verdict"]) or verdict

        examples: tuple[Example, ...] = ()
        if "examples" in table:
            examples = self.examples(doc, kp + ("examples",), table["examples"])

        if _count_errors(doc) > errors_before or name is None:
            return None
        if verdict == "drop" and (replaces or not header_set.empty):
            doc.warning(kp + ("verdict",), 'verdict = "drop": this rule\'s replace/set never '
                                           "reach the wire")
        if verdict != "drop" and not replaces and header_set.empty:
            doc.warning(kp, 'rule does nothing: give it replace, set, or verdict = "drop"')
        line, col = doc.at(kp)
        return Rule(name, len(self.rules), doc.path, line, col, match, replaces, header_set,
                    verdict, examples, _line(doc, line))

    def name(self, doc: TomlFile, kp: KeyPath, table: dict[str, object]) -> str | None:
        if "name" not in table:
            doc.error(kp, 'rule has no name (add name = "..." with [a-z0-9][a-z0-9_.-]*)')
            return None
        nkp = kp + ("name",)
        name = doc.want_str(nkp, table["name"], "name")
        if name is None:
            return None
        if not RULE_NAME.fullmatch(name):
            doc.error(nkp, f"rule name {name!r} is malformed: use lower-case letters, digits and "
                           "_ . - (starting with a letter or digit)")
            return None
        if len(name) > RULE_NAME_MAX:
            doc.error(nkp, f"rule name is longer than {RULE_NAME_MAX} characters")
            return None
        line, col = doc.at(nkp)
        first = self.names.get(name)
        if first is not None:
            doc.error(nkp, f"duplicate rule name '{name}' (first defined at {first})")
            return None
        self.names[name] = f"{doc.path}:{line}:{col}"
        return name

    # -- match ---------------------------------------------------------------------------------

    def match(self, doc: TomlFile, kp: KeyPath, table: dict[str, object]) -> Match:
        doc.check_keys(kp, table, MATCH_KEYS, "match")
        protocol = "tcp"
        if "protocol" in table:
            value = doc.want_str(kp + ("protocol",), table["protocol"], "protocol")
            if value is not None and value not in PROTOCOLS:
                doc.error(kp + ("protocol",), f"protocol {value!r} is not supported "
                                              "(only \"tcp\" for now)")
        sport = self.ports(doc, kp + ("sport",), table["sport"]) if "sport" in table else None
        dport = self.ports(doc, kp + ("dport",), table["dport"]) if "dport" in table else None
        src = self.networks(doc, kp + ("src",), table["src"]) if "src" in table else None
        dst = self.networks(doc, kp + ("dst",), table["dst"]) if "dst" in table else None
        if src and dst:
            sv = {n.version for n in src}
            dv = {n.version for n in dst}
            if not sv & dv:
                doc.error(kp + ("dst",), f"dst is IPv{min(dv)} but src is IPv{min(sv)}: "
                                         "this rule can never match")
        in_port = self.port_name(doc, kp + ("in_port",), table, "in_port")
        out_port = self.port_name(doc, kp + ("out_port",), table, "out_port")
        if out_port == LOOPBACK and in_port is not None:
            doc.error(kp + ("in_port",), "in_port cannot apply with out_port = \"lo\": the "
                                         "loopback's packets come from no port")
        return Match(protocol, sport, dport, src, dst, in_port, out_port)

    def ports(self, doc: TomlFile, kp: KeyPath, value: object) -> PortRanges | None:
        what = str(kp[-1])
        items = _one_or_list(doc, kp, value, what)
        if items is None:
            return None
        ranges: list[tuple[int, int]] = []
        for ikp, item in items:
            r = self.port_range(doc, ikp, item, what)
            if r is not None:
                ranges.append(r)
        return tuple(ranges) if len(ranges) == len(items) else None

    def port_range(
        self, doc: TomlFile, kp: KeyPath, value: object, what: str
    ) -> tuple[int, int] | None:
        if isinstance(value, int) and not isinstance(value, bool):
            port = doc.want_int(kp, value, what, 0, 65535)
            return None if port is None else (port, port)
        if not isinstance(value, str):
            doc.error(kp, f"{what} must be a port number, a \"lo-hi\" range or a list of those, "
                          f"not {type_name(value)}")
            return None
        if value.strip().isdigit():
            doc.error(kp, f"{what} must be an integer: write {value.strip()} without quotes")
            return None
        m = _PORT_RANGE.fullmatch(value)
        if not m:
            doc.error(kp, f"{what} range {value!r} is malformed (write \"lo-hi\", e.g. "
                          "\"8000-8080\")")
            return None
        lo, hi = int(m[1]), int(m[2])
        for part, p in ((1, lo), (2, hi)):
            if p > 65535:
                doc.error(kp, f"{what} range: port {p} is out of range (0..65535)",
                          offset=doc.string_offset(kp, value, m.start(part)))
                return None
        if lo > hi:
            doc.error(kp, f"{what} range {lo}-{hi} is reversed (did you mean \"{hi}-{lo}\"?)")
            return None
        return lo, hi

    def networks(self, doc: TomlFile, kp: KeyPath, value: object) -> tuple[Network, ...] | None:
        what = str(kp[-1])
        items = _one_or_list(doc, kp, value, what)
        if items is None:
            return None
        nets: list[Network] = []
        for ikp, item in items:
            text = doc.want_str(ikp, item, f"{what} (a CIDR like \"192.0.2.0/24\")")
            if text is None:
                continue
            try:
                nets.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    doc.error(ikp, f"{what} {text!r} is not an IPv4 or IPv6 address or CIDR "
                                   f"({exc})")
                else:
                    doc.error(ikp, f"{what} {text!r} has host bits set (did you mean "
                                   f"\"{loose}\"?)")
        return tuple(nets) if len(nets) == len(items) else None

    def port_name(
        self, doc: TomlFile, kp: KeyPath, table: dict[str, object], what: str
    ) -> str | None:
        if what not in table:
            return None
        name = doc.want_ifname(kp, table[what], what)
        if name is None:
            return None
        ports = self.bridge_ports
        if name == LOOPBACK and ports is not None and name not in ports:
            if what == "in_port":
                doc.error(kp, "in_port 'lo' cannot apply: the loopback's packets are rewritten "
                              "once, as they are sent: write out_port = \"lo\"")
            elif not self.host:
                doc.error(kp, "out_port 'lo' (the machine's own loopback traffic) needs host "
                              "mode: [host] enabled = true in the config")
            return name
        if ports is not None and not ports and self.host:
            doc.error(kp, f"{what} names a bridge port and no [[bridge]] is configured: the "
                          "machine's own traffic is matched by addresses and ports only "
                          "(out_port = \"lo\" names the loopback)")
        elif ports is not None and not ports:
            doc.warning(kp, f"{what} matches only bridged packets, and no [[bridge]] is "
                            "configured")
        elif ports is not None and name not in ports:
            close = difflib.get_close_matches(name, list(ports), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "bridge ports: " + ", ".join(
                sorted(ports))
            doc.error(kp, f"{what} '{name}' is not a port of any [[bridge]] ({hint})")
        return name

    # -- replace -------------------------------------------------------------------------------

    def replaces(self, doc: TomlFile, kp: KeyPath, value: object) -> tuple[Replace, ...]:
        if isinstance(value, dict):
            doc.error(kp, "replace must be an array: write replace = [ { find = \"...\", "
                          "with = \"...\" } ]")
            return ()
        if not isinstance(value, list):
            doc.error(kp, f"replace must be an array of {{ find, with }} tables, not "
                          f"{type_name(value)}")
            return ()
        out: list[Replace] = []
        finds: set[tuple[bytes, int]] = set()
        for ekp, table in doc.tables_in(kp, value, "a replace entry", REPLACE_KEYS):
            if "find_regex" in table:
                rep = self.regex_replace(doc, ekp, table)
            else:
                if "max_len" in table:
                    doc.error(ekp + ("max_len",), "max_len applies to find_regex only (a "
                                                  "literal's length is its own)", key=True)
                rep = self.literal_replace(doc, ekp, table)
            if rep is None:
                continue
            fkey = next(k for k in ("find", "find_hex", "find_regex") if k in table)
            key = (rep.find, 0 if rep.regex is None else rep.regex.max_len)
            if key in finds:
                doc.warning(ekp + (fkey,), f"the same {fkey} appears earlier in this rule; "
                                           "this entry never matches")
            finds.add(key)
            out.append(rep)
        return tuple(out)

    def literal_replace(self, doc: TomlFile, ekp: KeyPath,
                        table: dict[str, object]) -> Replace | None:
        find = self.bytes_of(doc, ekp, table, "find", "find_hex")
        with_ = self.bytes_of(doc, ekp, table, "with", "with_hex")
        if find is None or with_ is None:
            return None
        fkey = "find" if "find" in table else "find_hex"
        wkey = "with" if "with" in table else "with_hex"
        if not find:
            doc.error(ekp + (fkey,), f"{fkey} must not be empty")
            return None
        if find == with_:
            doc.warning(ekp + (wkey,), f"{wkey} equals {fkey}: this replace does nothing")
        elif len(find) != len(with_) and not self.allow_length_change:
            doc.error(ekp + (wkey,), "length-changing replace is not supported yet "
                                     f"({fkey} is {len(find)} bytes, {wkey} is "
                                     f"{len(with_)})")
            return None
        line, col = doc.at(ekp)
        return Replace(find, with_, line, col)

    def regex_replace(self, doc: TomlFile, ekp: KeyPath,
                      table: dict[str, object]) -> Replace | None:
        """A ``find_regex`` entry: the pattern checked (see :mod:`nfrewrite.core.regex`), its
        ``with`` (``\\1``..``\\9`` insert groups) and ``max_len``."""
        rkp = ekp + ("find_regex",)
        for other in ("find", "find_hex"):
            if other in table:
                doc.error(ekp + (other,), f"give find_regex or {other}, not both", key=True)
                return None
        pattern = doc.want_str(rkp, table["find_regex"], "find_regex")
        max_len: int | None = DEFAULT_MAX_LEN
        if "max_len" in table:
            max_len = doc.want_int(ekp + ("max_len",), table["max_len"], "max_len", 1,
                                   MAX_MAX_LEN)
        template = self.template(doc, ekp, table)
        if pattern is None or max_len is None or template is None:
            return None
        if len(pattern.encode()) > MAX_BYTES:
            doc.error(rkp, f"find_regex is longer than {MAX_BYTES} bytes")
            return None
        try:
            rx = compile_regex(pattern, template[0], max_len)
        except RegexError as exc:
            where = 0 if exc.offset is None else doc.string_offset(rkp, pattern, exc.offset)
            doc.error(rkp, f"find_regex refused: {exc}", offset=where)
            return None
        problem = regex_problem(rx)
        if problem is not None:
            doc.error(rkp, f"find_regex refused: {problem}")
            return None
        rep = Replace(rx.source, template[1], *doc.at(ekp), rx)
        if rep.changes_length and not self.allow_length_change:
            doc.error(rkp, "length-changing replace is not supported yet (a find_regex "
                           "replace may change a length)")
            return None
        return rep

    def template(self, doc: TomlFile, ekp: KeyPath, table: dict[str, object]
                 ) -> tuple[tuple[bytes | int, ...], bytes] | None:
        """A find_regex's ``with`` as (parts, bytes as written): text may insert groups, hex
        is literal bytes."""
        if "with" in table and "with_hex" not in table:
            wkp = ekp + ("with",)
            text = doc.want_str(wkp, table["with"], "with")
            if text is None:
                return None
            parts, bad = parse_template(text)
            if bad is not None:
                doc.error(wkp, "with of a find_regex: a backslash must start \\1..\\9 (a "
                               "group) or \\\\ (a backslash)",
                          offset=doc.string_offset(wkp, text, bad))
                return None
            if len(text.encode()) > MAX_BYTES:
                doc.error(wkp, f"with is longer than {MAX_BYTES} bytes")
                return None
            return parts, text.encode()
        raw = self.bytes_of(doc, ekp, table, "with", "with_hex")
        return None if raw is None else ((raw,), raw)

    def bytes_of(
        self, doc: TomlFile, kp: KeyPath, table: dict[str, object], text_key: str, hex_key: str
    ) -> bytes | None:
        """The bytes given by ``text_key`` (UTF-8 text) or ``hex_key`` (hex) — exactly one —
        at most ``MAX_BYTES`` of them."""
        if text_key in table and hex_key in table:
            doc.error(kp + (hex_key,), f"give {text_key} or {hex_key}, not both", key=True)
            return None
        if text_key in table:
            key = text_key
            text = doc.want_str(kp + (text_key,), table[text_key], text_key)
            value = None if text is None else text.encode()
        elif hex_key in table:
            key = hex_key
            value = self.hex(doc, kp + (hex_key,), table[hex_key], hex_key)
        else:
            doc.error(kp, f"missing {text_key} (or {hex_key})")
            return None
        if value is not None and len(value) > MAX_BYTES:
            doc.error(kp + (key,), f"{key} is {len(value)} bytes; at most {MAX_BYTES} are allowed "
                                   "(a pattern longer than a packet can never match)")
            return None
        return value

    def hex(self, doc: TomlFile, kp: KeyPath, value: object, what: str) -> bytes | None:
        text = doc.want_str(kp, value, what)
        if text is None:
            return None
        digits = 0
        for i, ch in enumerate(text):
            if ch in " \t\r\n":
                continue
            if ch not in "0123456789abcdefABCDEF":
                doc.error(kp, f"bad hex digit {ch!r} in {what} (hex digits and spaces only)",
                          offset=doc.string_offset(kp, text, i))
                return None
            digits += 1
        if digits % 2:
            doc.error(kp, f"{what} has an odd number of hex digits ({digits})")
            return None
        return bytes.fromhex("".join(text.split()))

    # -- set, verdict, examples ---------------------------------------------------------------

    def header_set(
        self, doc: TomlFile, kp: KeyPath, table: dict[str, object], match: Match
    ) -> HeaderSet:
        doc.check_keys(kp, table, SET_KEYS, "set")
        values: dict[str, int] = {}
        for key, (lo, hi) in SET_RANGES.items():
            if key in table:
                v = doc.want_int(kp + (key,), table[key], f"set.{key}", lo, hi)
                if v is not None:
                    values[key] = v
        if "mss" in values and "mss_max" in values:
            doc.error(kp + ("mss_max",), "set.mss and set.mss_max exclude each other "
                                         "(mss sets an exact value, mss_max clamps)", key=True)
        versions = match.versions
        if "ttl" in values and 4 not in versions:
            doc.warning(kp + ("ttl",), "set.ttl applies to IPv4 only, and this rule matches "
                                       "only IPv6 (use hop_limit)", key=True)
        if "hop_limit" in values and 6 not in versions:
            doc.warning(kp + ("hop_limit",), "set.hop_limit applies to IPv6 only, and this rule "
                                             "matches only IPv4 (use ttl)", key=True)
        return HeaderSet(**values)

    def verdict(self, doc: TomlFile, kp: KeyPath, value: object) -> str | None:
        text = doc.want_str(kp, value, "verdict")
        if text is None:
            return None
        if text not in VERDICTS:
            close = difflib.get_close_matches(text, VERDICTS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else 'use "accept" or "drop"'
            doc.error(kp, f"verdict {text!r} is not valid ({hint})")
            return None
        return text

    def examples(self, doc: TomlFile, kp: KeyPath, value: object) -> tuple[Example, ...]:
        if not isinstance(value, list):
            doc.error(kp, "examples must be an array: write examples = [ { input = \"...\", "
                          "output = \"...\" } ]")
            return ()
        out: list[Example] = []
        for ekp, table in doc.tables_in(kp, value, "an example", EXAMPLE_KEYS):
            given = self.bytes_of(doc, ekp, table, "input", "input_hex")
            expected = self.bytes_of(doc, ekp, table, "output", "output_hex")
            if given is None or expected is None:
                continue
            line, col = doc.at(ekp)
            out.append(Example(given, expected, line, col, _line(doc, line)))
        return tuple(out)


def _one_or_list(
    doc: TomlFile, kp: KeyPath, value: object, what: str
) -> list[tuple[KeyPath, object]] | None:
    """A match key's value as (key path, item) pairs: one value, or each of a non-empty list."""
    if not isinstance(value, list):
        return [(kp, value)]
    if not value:
        doc.error(kp, f"{what} is an empty list (it would match nothing)")
        return None
    return [(kp + (i,), v) for i, v in enumerate(value)]


def _line(doc: TomlFile, line: int) -> str:
    """Line ``line`` (1-based) of the text read, "" when there is none."""
    return doc.lines[line - 1] if 0 < line <= len(doc.lines) else ""


def _count_errors(doc: TomlFile) -> int:
    return sum(1 for d in doc.diagnostics if d.severity == "error")
