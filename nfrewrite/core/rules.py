"""Rule files -> one immutable, compiled :class:`RuleSet` (or precise errors, never a silent typo).

Theory of operation
-------------------
``load_rules(rules_dir)`` reads ``rules_dir/*.toml`` in lexical order of file name (names starting
with ``.`` are skipped: editor droppings), validates every ``[[rule]]`` against DESIGN §3 and
compiles it. Validation never stops at the first mistake: each bad value is reported with its
``path:line:col`` (see :mod:`nfrewrite.config.diagnostics`) and the loader goes on, so one run
shows them all. Any error means no ruleset (``None``); warnings do not.

Schema (DESIGN §3; every key but ``name`` is optional)::

    [[rule]]
    name     = "hide-banner"       # unique across files; [a-z0-9][a-z0-9_.-]*, <= 64 characters
    match    = { protocol = "tcp", # the only one for now (default)
                 sport = 80,       # dport/sport: int 0..65535, "lo-hi", or a non-empty list
                 dst = "10.0.0.0/8",  # src/dst: CIDR or list; IPv4/IPv6; host bits set = error
                 in_port = "eth1" }   # in_port/out_port: a port of a configured [[bridge]]
                                   # no match at all = every TCP packet
    replace  = [ { find = "a", with = "b" }, { find_hex = "de ad", with_hex = "" } ]
    set      = { ttl = 64 }        # ttl 1..255 (IPv4), hop_limit 1..255 (IPv6), dscp 0..63,
                                   # window 0..65535, mss / mss_max 536..65535 (not both)
    verdict  = "accept"            # or "drop"
    examples = [ { input = "a", output = "b" } ]   # or input_hex / output_hex

Warnings (the rule still loads): a rule with no replace, no set and no drop; ``with`` equal to
``find``; the same ``find`` twice in a rule; ``ttl`` on an IPv6-only rule (``hop_limit`` on an
IPv4-only one); replace/set on a dropping rule; ``in_port``/``out_port`` with no bridge configured.
``load_rules(..., allow_length_change=False)`` turns a replace whose ``with`` differs in length
from its ``find`` into an error (for a daemon that cannot adjust sequence numbers).

Limits (a clear error, never a hang or a gigabyte of memory): at most ``MAX_RULE_FILES`` (1000)
rule files, each at most 1 MiB (``diagnostics.MAX_FILE_SIZE``, refused before it is read), at most
``MAX_RULES`` (10,000) rules in all (counting invalid ones; files after the one that crosses the
limit are not read), and every ``find``/``with``/example at most ``MAX_BYTES`` (64 KiB).

The compiled shape, which the engine consumes::

    RuleSet
      .rules: tuple[Rule, ...]        global order: file name, then position in the file
      .files: tuple[str, ...]         the files read, in that order
      .select(version, src, dst, sport, dport, in_port=None, out_port=None) -> Selection
      .cache_info() -> {"groups", "selections", "bytes"}   what the selection cache holds

    Rule(name, index, path, line, col, match, replaces, set, verdict, examples, source)   frozen
      match:    Match(protocol, sport, dport, src, dst, in_port, out_port)
                  .matches(version, src, dst, sport, dport, in_port, out_port) -> bool
                  ports are tuples of inclusive (lo, hi) ranges, addresses tuples of networks;
                  None means "any"
      replaces: tuple[Replace(find: bytes, with_: bytes, line, col), ...]
      set:      HeaderSet(ttl, hop_limit, dscp, window, mss, mss_max), each int | None
      verdict:  "accept" | "drop"
      examples: tuple[Example(input: bytes, output: bytes, line, col, source), ...]
      source:   the text of the line at ``line`` as it was read (diagnostics made after loading
                show it from here: the file is never read again by name)

    Selection                       shared by every packet with the same set of matching rules
      .rules: tuple[Rule, ...]      the rules that match, in rule order
      .has_replaces: bool           False: find_edits always returns [] (skip the payload)
      .same_length: bool            no replace of these rules changes a length
      .max_growth: int              the most one replace adds to a payload (0: none grows)
      .find_edits(payload) -> list[(start, end, replacement, rule)]

``src``/``dst`` given to ``select``/``matches`` are the raw 4- or 16-byte addresses from the packet.

Replace semantics (``Selection.find_edits``)
--------------------------------------------
All ``find`` patterns of all selected rules are searched in ONE left-to-right pass over the
ORIGINAL payload. At each position the leftmost match wins; when several patterns match at the same
position, the first in rule order wins (and within one rule, the first in its ``replace`` list) —
not the longest. Matches never overlap: the search resumes after the end of the match it took. A
replacement's output is never searched again, so rules cannot feed each other and no rewrite can
loop. The result is sorted by ``start``; applying it is the engine's job. A pattern split across two
segments is not seen (DESIGN §3).

How it searches: one ``bytes.find`` per pattern, merged (each pattern's next occurrence at or after
the current position is kept; the leftmost, first-in-order one is taken; only the occurrences it
passed over are searched again). Measured on a 1460-byte payload (``bench/bench_match.py``,
``compare_search``): a compiled ``re`` alternation of the escaped literals costs 10-80 µs, since
``re`` does not optimise literal alternations, while ``bytes.find`` scans the payload in well under
a microsecond per pattern. A Selection holds only the patterns of the rules that matched, so this
cost grows with the patterns that apply to a packet, never with the size of the ruleset.

Text (``find``/``with``) is encoded as UTF-8; ``find_hex``/``with_hex`` are hex bytes in which
whitespace is ignored. The two forms may be mixed in one entry (``find`` with ``with_hex`` and the
other way round): each side is just bytes. ``find`` must not be empty; ``with`` may be (deletes).

Matching cost
-------------
Every condition of every rule is indexed, so a packet never walks the rule list. Each field gives
a bitmask of the rules whose condition on it holds (bit ``i``: the ``i``-th rule in rule order; a
rule without the condition has its bit set in every mask), and the rules that apply are the AND of
the masks, read back lowest bit first, hence in rule order:

* ``sport``/``dport``: the ranges of all rules cut 0..65535 into intervals (at every ``lo`` and
  ``hi + 1``) on which no rule's condition changes; a port's interval is read from a table by
  port (128 KiB per field). The masks of the intervals are precomputed or, when they would take
  more than ``INDEX_BYTES`` (1 MiB: thousands of rules with distinct ranges), every ``step``-th
  of them, the others rebuilt from the rules whose range starts or ends in between.
* ``in_port``/``out_port``: a dict by port name; a name no rule gives, or none, is one class.
* ``src``/``dst``: per IP version and per prefix length some rule uses, a dict keyed by the
  address's leading bits: a handful of lookups per address, whatever the number of networks.

The port and bridge-port part is cached by *class*, ``(sport interval, dport interval, in_port
class, out_port class)``, not by the packet's values: a field no rule tests is one class, so with
no ``sport`` condition anywhere all 65,536 source ports share one entry, and with ranges each
interval does. An entry whose rules have no address condition holds the Selection itself;
otherwise it holds two masks, and the addresses are looked up per packet. Selections are shared
per distinct set of rules (keyed by mask). The cache holds at most ``GROUP_CACHE`` (65,536) keys,
``SELECTION_CACHE`` (4096) Selections and an estimated ``CACHE_BYTES`` (64 MiB) for both; it is
emptied as a whole when it would pass a bound, and refills from the packets that follow
(``RuleSet.cache_info()`` shows its size). So a packet of a known class costs two table reads and a
dict lookup; a new class costs a few big-integer ANDs and reading the result, never a walk over
the rules (``bench/bench_select.py``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
from array import array
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import accumulate

from nfrewrite.config.diagnostics import Diagnostic, has_errors, type_name
from nfrewrite.config.tomlfile import Opener, TomlFile
from nfrewrite.config.tomlpos import KeyPath

__all__ = [
    "Example",
    "HeaderSet",
    "Match",
    "Network",
    "PortRanges",
    "Replace",
    "Rule",
    "RuleSet",
    "Selection",
    "load_rules",
    "rule_files",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRanges = tuple[tuple[int, int], ...]
Edit = tuple[int, int, bytes, "Rule"]

RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
RULE_NAME_MAX = 64
MAX_RULES = 10_000  # rules in all files together
MAX_RULE_FILES = 1000  # *.toml files in the rules directory
MAX_BYTES = 64 * 1024  # one find / with / example input or output
VERDICTS = ("accept", "drop")
PROTOCOLS = ("tcp",)

RULE_KEYS = ("name", "match", "replace", "set", "verdict", "examples")
MATCH_KEYS = ("protocol", "sport", "dport", "src", "dst", "in_port", "out_port")
REPLACE_KEYS = ("find", "with", "find_hex", "with_hex")
SET_KEYS = ("ttl", "hop_limit", "dscp", "window", "mss", "mss_max")
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


# ---------------------------------------------------------------------------------------------
# The compiled shape
# ---------------------------------------------------------------------------------------------


def _in_ranges(port: int, ranges: PortRanges) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


CompiledNets = tuple[tuple[int, int, int], ...]  # (version, network as int, mask as int)


def _compile_nets(nets: tuple[Network, ...] | None) -> CompiledNets | None:
    if nets is None:
        return None
    return tuple((n.version, int(n.network_address), int(n.netmask)) for n in nets)


def _addr_in(version: int, addr: bytes, nets: CompiledNets) -> bool:
    value = int.from_bytes(addr, "big")
    return any(v == version and value & mask == net for v, net, mask in nets)


@dataclass(frozen=True, slots=True)
class Match:
    """What a rule applies to. ``None`` in any field means "any"."""

    protocol: str = "tcp"
    sport: PortRanges | None = None
    dport: PortRanges | None = None
    src: tuple[Network, ...] | None = None
    dst: tuple[Network, ...] | None = None
    in_port: str | None = None
    out_port: str | None = None
    _src: CompiledNets | None = field(init=False, repr=False, compare=False)
    _dst: CompiledNets | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_src", _compile_nets(self.src))
        object.__setattr__(self, "_dst", _compile_nets(self.dst))

    @property
    def versions(self) -> frozenset[int]:
        """IP versions this match can apply to (an address condition narrows them)."""
        found = {4, 6}
        for nets in (self.src, self.dst):
            if nets is not None:
                found &= {n.version for n in nets}
        return frozenset(found)

    @property
    def has_addresses(self) -> bool:
        return self.src is not None or self.dst is not None

    def matches_ports(
        self, sport: int, dport: int, in_port: str | None, out_port: str | None
    ) -> bool:
        return (
            (self.sport is None or _in_ranges(sport, self.sport))
            and (self.dport is None or _in_ranges(dport, self.dport))
            and (self.in_port is None or in_port == self.in_port)
            and (self.out_port is None or out_port == self.out_port)
        )

    def matches_addresses(self, version: int, src: bytes, dst: bytes) -> bool:
        return (self._src is None or _addr_in(version, src, self._src)) and (
            self._dst is None or _addr_in(version, dst, self._dst)
        )

    def matches(
        self,
        version: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        in_port: str | None,
        out_port: str | None,
    ) -> bool:
        return self.matches_ports(sport, dport, in_port, out_port) and self.matches_addresses(
            version, src, dst
        )


@dataclass(frozen=True, slots=True)
class Replace:
    find: bytes
    with_: bytes
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class HeaderSet:
    """Header edits; ``None`` leaves a field alone."""

    ttl: int | None = None
    hop_limit: int | None = None
    dscp: int | None = None
    window: int | None = None
    mss: int | None = None  # set the MSS option of SYNs that carry one to exactly this
    mss_max: int | None = None  # lower the MSS option of SYNs to this if it is larger

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in SET_KEYS)


@dataclass(frozen=True, slots=True)
class Example:
    """A payload and what the rule should turn it into (to be checked by a later issue)."""

    input: bytes
    output: bytes
    line: int
    col: int
    source: str = ""  # the text of line ``line`` as read (for diagnostics after loading)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    index: int  # global order: file name, then position
    path: str
    line: int  # where the [[rule]] is
    col: int
    match: Match
    replaces: tuple[Replace, ...]
    set: HeaderSet
    verdict: str  # "accept" | "drop"
    examples: tuple[Example, ...]
    source: str = ""  # the text of line ``line`` as read (for diagnostics after loading)


class Selection:
    """The rules that match one kind of packet, with their replace patterns ready to search."""

    __slots__ = ("_patterns", "has_replaces", "max_growth", "rules", "same_length")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        patterns: list[tuple[bytes, bytes, Rule]] = []
        seen: set[bytes] = set()
        growth = 0
        same_length = True
        for rule in rules:
            for rep in rule.replaces:
                delta = len(rep.with_) - len(rep.find)
                if delta:
                    same_length = False
                    growth = max(growth, delta)
                if rep.find not in seen:  # an identical later pattern could never win
                    seen.add(rep.find)
                    patterns.append((rep.find, rep.with_, rule))
        self._patterns = tuple(patterns)
        self.has_replaces = bool(patterns)
        self.same_length = same_length  # no replace of these rules changes a length
        self.max_growth = growth  # the most one replace adds to a payload (0: none grows)

    def __repr__(self) -> str:
        return f"Selection({[r.name for r in self.rules]!r})"

    @property
    def single_pattern(self) -> tuple[bytes, bytes, Rule] | None:
        """(find, with, rule) when the selection searches for exactly one pattern, else None."""
        return self._patterns[0] if len(self._patterns) == 1 else None

    def find_edits(self, payload: bytes | bytearray) -> list[Edit]:
        """Every replace of the selected rules in ``payload``: (start, end, replacement, rule).

        One pass over the original payload; leftmost match first, ties to rule order;
        non-overlapping; sorted by start. See the module docstring.
        """
        patterns = self._patterns
        if not patterns:
            return []
        edits: list[Edit] = []
        if len(patterns) == 1:
            # bytes.split finds the same occurrences (leftmost, non-overlapping) in C; the ends
            # are the running sums of piece + pattern lengths (a GSO super-packet can hold dozens)
            find, with_, rule = patterns[0]
            if find not in payload:
                return edits
            size = len(find)
            ends = accumulate([len(piece) + size for piece in payload.split(find)[:-1]])
            return [(end - size, end, with_, rule) for end in ends]
        # Several patterns: keep each one's next occurrence at or after `pos`; take the leftmost
        # (the first pattern on ties), move `pos` past it, refresh the occurrences it passed.
        nexts = [payload.find(p[0]) for p in patterns]
        count = len(patterns)
        pos = 0
        while True:
            best = best_i = -1
            for i in range(count):
                at = nexts[i]
                if 0 <= at < pos:
                    at = nexts[i] = payload.find(patterns[i][0], pos)
                if at >= 0 and (best < 0 or at < best):
                    best, best_i = at, i
            if best < 0:
                return edits
            find, with_, rule = patterns[best_i]
            pos = best + len(find)
            edits.append((best, pos, with_, rule))


# ---------------------------------------------------------------------------------------------
# Selection: which rules apply to a packet (see "Matching cost" in the module docstring)
# ---------------------------------------------------------------------------------------------

INDEX_BYTES = 1 << 20  # most bytes of rule masks one port index keeps (it recomputes the rest)


def _bits(positions: Iterable[int], nbytes: int) -> int:
    """The mask with the given bit positions set (built in O(nbytes), not O(bits * nbytes))."""
    buf = bytearray(nbytes)
    for p in positions:
        buf[p >> 3] |= 1 << (p & 7)
    return int.from_bytes(buf, "little")


def _positions(mask: int) -> list[int]:
    """The bit positions set in ``mask``, lowest first."""
    text = bin(mask)[:1:-1]  # lowest bit first, without "0b"
    found: list[int] = []
    at = text.find("1")
    while at >= 0:
        found.append(at)
        at = text.find("1", at + 1)
    return found


def _merged(ranges: PortRanges) -> list[tuple[int, int]]:
    """``ranges`` sorted, with overlapping and adjacent ranges joined (so they are disjoint)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class _PortIndex:
    """One port field (``sport`` or ``dport``): the rules whose condition on it holds, per port.

    The rules' ranges cut 0..65535 into intervals ("classes") at every ``lo`` and ``hi + 1``; on
    one interval every rule's condition is either true or false throughout. ``classes[port]`` is
    the interval's number (a 128 KiB table), ``mask(klass)`` the rules true on it, as a bitmask
    (bit ``i``: the ``i``-th rule in rule order; rules with no condition on this field: always
    set).
    Between two neighbouring intervals exactly the rules with a range starting or ending there
    change ("toggles"). The mask of every ``step``-th interval is kept, the others are rebuilt
    from the nearest kept one and the toggles after it, with ``step`` chosen so that the kept
    masks take at most ``INDEX_BYTES``: memory grows with the rules, never with the traffic.
    """

    __slots__ = ("classes", "kept", "step", "toggles")

    def __init__(self, conditions: list[PortRanges | None], nbytes: int) -> None:
        wild: list[int] = []
        at: dict[int, list[int]] = {}  # interval start -> rules whose condition changes there
        for pos, ranges in enumerate(conditions):
            if ranges is None:
                wild.append(pos)
                continue
            for lo, hi in _merged(ranges):  # disjoint: a rule toggles at most once per boundary
                at.setdefault(lo, []).append(pos)
                if hi < 65535:
                    at.setdefault(hi + 1, []).append(pos)
        bounds = sorted({0, *at})
        self.toggles = tuple(tuple(at.get(b, ())) for b in bounds)
        self.step = max(1, -(-len(bounds) * (nbytes + 32) // INDEX_BYTES))
        kept: list[int] = []
        mask = _bits(wild, nbytes)
        for i, toggled in enumerate(self.toggles):
            for pos in toggled:
                mask ^= 1 << pos
            if i % self.step == 0:
                kept.append(mask)
        self.kept = tuple(kept)
        if self.step == 1:
            self.toggles = ()  # every mask is kept
        self.classes = array("H")  # at most 65,536 intervals: their numbers fit 16 bits
        for i, (lo, hi) in enumerate(zip(bounds, [*bounds[1:], 65536], strict=True)):
            self.classes += array("H", (i,)) * (hi - lo)

    def mask(self, klass: int) -> int:
        base, extra = divmod(klass, self.step)
        mask = self.kept[base]
        start = base * self.step
        for toggled in self.toggles[start + 1: start + extra + 1]:
            for pos in toggled:
                mask ^= 1 << pos
        return mask


class _NameIndex:
    """``in_port`` or ``out_port``: the rules whose condition holds, per bridge port name. A name
    no rule gives (or none: not bridged) is one class, ``None``: it passes the rules without the
    condition only."""

    __slots__ = ("classes", "masks", "wild")

    def __init__(self, conditions: list[str | None], nbytes: int) -> None:
        wild = [pos for pos, name in enumerate(conditions) if name is None]
        names: dict[str, list[int]] = {}
        for pos, name in enumerate(conditions):
            if name is not None:
                names.setdefault(name, []).append(pos)
        self.wild = _bits(wild, nbytes)
        self.masks = {n: _bits(wild + ps, nbytes) for n, ps in names.items()}
        self.classes: dict[str | None, str] = {n: n for n in names}  # .get(name): its class

    def mask(self, klass: str | None) -> int:
        return self.wild if klass is None else self.masks[klass]


class _AddressIndex:
    """``src`` or ``dst``: the rules whose condition holds for an address. Per IP version and per
    prefix length some rule uses, a dict from the address's leading bits to the rules with that
    network; an address is looked up once per such length (a handful), not once per rule."""

    __slots__ = ("tables", "wild")

    def __init__(self, conditions: list[CompiledNets | None], nbytes: int) -> None:
        self.wild = _bits((p for p, nets in enumerate(conditions) if nets is None), nbytes)
        by_len: dict[tuple[int, int], dict[int, list[int]]] = {}
        for pos, nets in enumerate(conditions):
            for version, net, netmask in nets or ():
                shift = (32 if version == 4 else 128) - netmask.bit_count()
                by_len.setdefault((version, shift), {}).setdefault(net >> shift, []).append(pos)
        self.tables: dict[int, tuple[tuple[int, dict[int, tuple[int, ...]]], ...]] = {
            v: tuple((shift, {k: tuple(ps) for k, ps in table.items()})
                     for (tv, shift), table in sorted(by_len.items()) if tv == v)
            for v in (4, 6)
        }

    def mask(self, version: int, addr: bytes) -> int:
        mask = self.wild
        value = int.from_bytes(addr, "big")
        for shift, table in self.tables[version]:
            hit = table.get(value >> shift)
            if hit is not None:
                for pos in hit:
                    mask |= 1 << pos
        return mask


class _Cache:
    """What ``RuleSet.select`` remembers: groups by class key, Selections by rule mask, and an
    estimate of the bytes both hold. Emptied as a whole when it would pass either bound."""

    __slots__ = ("bytes", "groups", "selections")

    def __init__(self) -> None:
        self.groups: dict[_GroupKey, _Group] = {}
        self.selections: dict[int, Selection] = {}
        self.bytes = 0

    def clear(self) -> None:
        self.groups.clear()
        self.selections.clear()
        self.bytes = 0


# (Selection when no candidate has an address condition, else None; the candidates without one;
# the candidates with one) -- the last two as rule masks
_Group = tuple[Selection | None, int, int]
_GroupKey = tuple[int, int, str | None, str | None]  # sport class, dport class, in/out port


class RuleSet:
    """An immutable, compiled set of rules. See the module docstring for the shape and costs."""

    __slots__ = (
        "_addressed",
        "_cache",
        "_dport",
        "_dst",
        "_files",
        "_in",
        "_nbytes",
        "_order",
        "_out",
        "_rules",
        "_sport",
        "_src",
    )

    GROUP_CACHE = 65536  # class keys remembered
    SELECTION_CACHE = 4096  # distinct Selections remembered
    CACHE_BYTES = 64 << 20  # estimated bytes both may hold together

    def __init__(self, rules: Iterable[Rule], files: Iterable[str] = ()) -> None:
        self._rules = tuple(rules)
        self._files = tuple(files)
        # bit i of every mask is order[i]: rule order (index), whatever order rules came in
        order = sorted(self._rules, key=lambda r: r.index)
        self._order = tuple(order)
        nbytes = self._nbytes = (len(order) + 7) // 8
        matches = [r.match for r in order]
        self._sport = _PortIndex([m.sport for m in matches], nbytes)
        self._dport = _PortIndex([m.dport for m in matches], nbytes)
        self._in = _NameIndex([m.in_port for m in matches], nbytes)
        self._out = _NameIndex([m.out_port for m in matches], nbytes)
        self._src = _AddressIndex([m._src for m in matches], nbytes)
        self._dst = _AddressIndex([m._dst for m in matches], nbytes)
        self._addressed = _bits((p for p, m in enumerate(matches) if m.has_addresses), nbytes)
        self._cache = _Cache()  # last: __setattr__ refuses everything from here on

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self._rules)} rules in {len(self._files)} files)"

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, "_cache"):
            raise AttributeError("RuleSet is immutable")
        object.__setattr__(self, name, value)

    def __reduce__(self) -> tuple[type[RuleSet], tuple[tuple[Rule, ...], tuple[str, ...]]]:
        """Pickle as its rules and files (for worker processes); indexes are rebuilt there."""
        return RuleSet, (self._rules, self._files)

    def cache_info(self) -> dict[str, int]:
        """How much the selection cache holds: class keys, Selections, estimated bytes."""
        cache = self._cache
        return {"groups": len(cache.groups), "selections": len(cache.selections),
                "bytes": cache.bytes}

    def select(
        self,
        version: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        in_port: str | None = None,
        out_port: str | None = None,
    ) -> Selection:
        """The rules that apply to a packet, as a shared :class:`Selection`."""
        # the class of each field (see the indexes); this runs for every packet
        key = (self._sport.classes[sport], self._dport.classes[dport],
               self._in.classes.get(in_port), self._out.classes.get(out_port))
        group = self._cache.groups.get(key)
        if group is None:
            group = self._make_group(key)
        selection, plain, addressed = group
        if selection is not None:
            return selection
        addressed &= self._src.mask(version, src) & self._dst.mask(version, dst)
        return self._selection(plain | addressed)

    def _make_group(self, key: _GroupKey) -> _Group:
        sport, dport, in_port, out_port = key
        mask = (self._sport.mask(sport) & self._dport.mask(dport) & self._in.mask(in_port)
                & self._out.mask(out_port))
        addressed = mask & self._addressed
        plain = mask ^ addressed
        group: _Group = (None if addressed else self._selection(plain), plain, addressed)
        cache = self._cache
        cost = _KEY_BYTES + (2 * self._nbytes if addressed else 0)
        if len(cache.groups) >= self.GROUP_CACHE or cache.bytes + cost > self.CACHE_BYTES:
            cache.clear()  # bounded; it refills from the packets that follow
            if group[0] is not None:
                group = (self._selection(plain), plain, addressed)  # counted again
        cache.groups[key] = group
        cache.bytes += cost
        return group

    def _selection(self, mask: int) -> Selection:
        cache = self._cache
        sel = cache.selections.get(mask)
        if sel is None:
            order = self._order
            sel = Selection(tuple(order[p] for p in _positions(mask)))
            cost = (_SELECTION_BYTES + self._nbytes + 8 * len(sel.rules)
                    + _PATTERN_BYTES * len(sel._patterns))
            if (len(cache.selections) >= self.SELECTION_CACHE
                    or cache.bytes + cost > self.CACHE_BYTES):
                cache.clear()  # groups point at Selections: both go, so both stay bounded
            cache.selections[mask] = sel
            cache.bytes += cost
        return sel


# Estimated sizes for the cache bound: a group key with its dict slot and group tuple; a Selection
# with its tuples and mask key (plus 8 per rule and the mask's own bytes); one search pattern.
_KEY_BYTES = 240
_SELECTION_BYTES = 300
_PATTERN_BYTES = 72


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

_PORT_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


def load_rules(
    rules_dir: str,
    *,
    allow_length_change: bool = True,
    bridge_ports: Collection[str] | None = None,
    opener: Opener | None = None,
    dir_fd: int | None = None,
) -> tuple[RuleSet | None, list[Diagnostic]]:
    """Read, validate and compile ``rules_dir/*.toml``. Returns (ruleset or None, diagnostics).

    ``opener``: how each file is opened (``nfrewrite.config.filesafety.SafeOpener``; default plain).
    ``dir_fd``: ``rules_dir`` already opened (by that SafeOpener), to list it through (see
    :func:`rule_files`).

    ``allow_length_change=False`` makes a replace whose ``with`` differs in length from its
    ``find`` an error. ``bridge_ports``, when given, are the only valid ``in_port``/``out_port``
    values (an empty collection means no bridge is configured: such a match is then a warning).
    """
    loader = _Loader(allow_length_change, bridge_ports)
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

    def __init__(self, allow_length_change: bool, bridge_ports: Collection[str] | None) -> None:
        self.allow_length_change = allow_length_change
        self.bridge_ports = bridge_ports
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
        return Match(protocol, sport, dport, src, dst, in_port, out_port)

    def ports(self, doc: TomlFile, kp: KeyPath, value: object) -> PortRanges | None:
        what = str(kp[-1])
        if isinstance(value, list):
            if not value:
                doc.error(kp, f"{what} is an empty list (it would match nothing)")
                return None
            items = [(kp + (i,), v) for i, v in enumerate(value)]
        else:
            items = [(kp, value)]
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
        if isinstance(value, list):
            if not value:
                doc.error(kp, f"{what} is an empty list (it would match nothing)")
                return None
            items = [(kp + (i,), v) for i, v in enumerate(value)]
        else:
            items = [(kp, value)]
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
        if ports is not None and not ports:
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
        finds: set[bytes] = set()
        for i, entry in enumerate(value):
            ekp = kp + (i,)
            table = doc.want_table(ekp, entry, "a replace entry")
            if table is None:
                continue
            doc.check_keys(ekp, table, REPLACE_KEYS, "a replace entry")
            find = self.bytes_of(doc, ekp, table, "find", "find_hex")
            with_ = self.bytes_of(doc, ekp, table, "with", "with_hex")
            if find is None or with_ is None:
                continue
            fkey = "find" if "find" in table else "find_hex"
            wkey = "with" if "with" in table else "with_hex"
            if not find:
                doc.error(ekp + (fkey,), f"{fkey} must not be empty")
                continue
            if find == with_:
                doc.warning(ekp + (wkey,), f"{wkey} equals {fkey}: this replace does nothing")
            elif len(find) != len(with_) and not self.allow_length_change:
                doc.error(ekp + (wkey,), "length-changing replace is not supported yet "
                                         f"({fkey} is {len(find)} bytes, {wkey} is "
                                         f"{len(with_)})")
                continue
            if find in finds:
                doc.warning(ekp + (fkey,), f"the same {fkey} appears earlier in this rule; "
                                           "this entry never matches")
            finds.add(find)
            line, col = doc.at(ekp)
            out.append(Replace(find, with_, line, col))
        return tuple(out)

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
        for i, entry in enumerate(value):
            ekp = kp + (i,)
            table = doc.want_table(ekp, entry, "an example")
            if table is None:
                continue
            doc.check_keys(ekp, table, EXAMPLE_KEYS, "an example")
            given = self.bytes_of(doc, ekp, table, "input", "input_hex")
            expected = self.bytes_of(doc, ekp, table, "output", "output_hex")
            if given is None or expected is None:
                continue
            line, col = doc.at(ekp)
            out.append(Example(given, expected, line, col, _line(doc, line)))
        return tuple(out)


def _line(doc: TomlFile, line: int) -> str:
    """Line ``line`` (1-based) of the text read, "" when there is none."""
    return doc.lines[line - 1] if 0 < line <= len(doc.lines) else ""


def _count_errors(doc: TomlFile) -> int:
    return sum(1 for d in doc.diagnostics if d.severity == "error")
