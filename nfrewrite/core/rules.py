"""The compiled rule set: which rules apply to a packet, and where their patterns are in it.

Theory of operation
-------------------
A :class:`RuleSet` is immutable and holds only what matching and rewriting need. The rule files
become one in :mod:`nfrewrite.config.rulefiles` (read, validated, compiled into these classes);
tests and benchmarks build rules directly, and a worker process receives the set pickled as its
rules and rebuilds the indexes. This module reads no file, so importing the engine does not import
the TOML loader.

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
loop. A ``find_regex`` takes, at its start, its longest match of at most ``max_len`` bytes
(leftmost-longest; :mod:`nfrewrite.core.regex`); a selection with one is searched there. The
result is sorted by ``start``; applying it is the engine's job. A pattern split across two
segments is found by the engine holding the first one back (:mod:`nfrewrite.core.stream`,
``Selection.pending_from``) and searching both as one piece.

How it searches: one pattern, by ``bytes.split`` in C. Several: by Hyperscan when it is installed
(block mode, every occurrence reported with its start in one linear scan, then the leftmost-first
ones taken); measured (64 KB packet holding one pattern once, and one holding it as often as it
fits): 100 patterns 1.38 ms -> 9 us and 29 ms -> 2.2 ms; 1,000 patterns 17.5 ms -> 19 us and
344 ms -> 4.8 ms (the rest of the hostile cost is one Python callback per occurrence). Without
Hyperscan: one ``bytes.find`` per pattern, merged (each pattern's next occurrence at or after
the current position is kept; the leftmost, first-in-order one is taken; only the occurrences it
passed over are searched again). Measured on a 1460-byte payload (``bench/bench_match.py``,
``compare_search``): a compiled ``re`` alternation of the escaped literals costs 10-80 µs, since
``re`` does not optimise literal alternations, while ``bytes.find`` scans the payload in well under
a microsecond per pattern. A Selection holds only the patterns of the rules that matched, so this
cost grows with the patterns that apply to a packet, never with the size of the ruleset.

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

import ipaddress
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from nfrewrite.core.prefixes import Prefixes
from nfrewrite.core.regex import Regex

_hs: Any
try:  # Hyperscan: linear-time multi-pattern search in C (optional; see find_edits)
    import hyperscan as _hs
except ImportError:  # pragma: no cover - the pure fallback below stays correct
    _hs = None

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
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRanges = tuple[tuple[int, int], ...]
Edit = tuple[int, int, bytes, "Rule"]

#: the keys of a rule's ``set`` table, the fields of :class:`HeaderSet`
SET_KEYS = ("ttl", "hop_limit", "dscp", "window", "mss", "mss_max")


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
    """One ``replace`` entry. A ``find_regex`` one has ``regex`` (``find``: its source text,
    ``with_``: its ``with`` as written); a literal one has ``regex = None``."""

    find: bytes
    with_: bytes
    line: int
    col: int
    regex: Regex | None = None

    @property
    def changes_length(self) -> bool:
        """Whether a match may be replaced by bytes of another length."""
        rx = self.regex
        if rx is None:
            return len(self.find) != len(self.with_)
        return (rx.uses_groups or rx.cut or rx.min_width != rx.max_width
                or rx.max_replacement != rx.min_width)

    @property
    def growth(self) -> int:
        """The most one match's replacement adds to a payload (may be negative)."""
        rx = self.regex
        if rx is None:
            return len(self.with_) - len(self.find)
        return rx.max_replacement - rx.min_width


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
    """A payload and what the rule should turn it into (``nfrewrite check`` runs it through the
    engine: :mod:`nfrewrite.config.examples`)."""

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

    __slots__ = ("_hs_db", "_literals_by_hyperscan", "_patterns", "_prefix_dbs", "_present_db",
                 "_prefixes", "_regexes", "_rev_db",
                 "has_regex", "has_replaces", "max_growth", "rules", "same_length")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        patterns: list[tuple[bytes, bytes, Rule]] = []
        regexes: list[Regex | None] = []
        seen: set[tuple[bytes, int]] = set()
        growth = 0
        same_length = True
        for rule in rules:
            for rep in rule.replaces:
                if rep.changes_length:
                    same_length = False
                    growth = max(growth, rep.growth)
                rx = rep.regex
                key = (rep.find, 0 if rx is None else rx.max_len)
                if key not in seen:  # an identical later pattern could never win
                    seen.add(key)
                    patterns.append((rep.find, rep.with_, rule))
                    regexes.append(rx)
        self._patterns = tuple(patterns)
        self._regexes = tuple(regexes)
        self.has_regex = any(rx is not None for rx in regexes)
        #: several literals are searched by Hyperscan when it is installed and can take them all
        #: (it refuses an expression past ~16,000 characters: a literal of ~4,000 bytes as \xHH)
        self._literals_by_hyperscan = _hs is not None and all(
            len(p[0]) <= HS_LITERAL_MAX for p in patterns)
        self.has_replaces = bool(patterns)
        self.same_length = same_length  # no replace of these rules changes a length
        self.max_growth = growth  # the most one replace adds to a payload (0: none grows)
        self._prefixes: Prefixes | None = None  # built on first use
        self._hs_db: Any = None  # the Hyperscan database of several literals, on first use
        self._rev_db: Any = None  # with a regex: every pattern reversed, on first use
        self._present_db: Any = None  # several literals: which occur (each reported once)
        # regex prefixes by max_len (whether they are matched at the end), on first use
        self._prefix_dbs: dict[int, tuple[bool, Any]] | None = None

    def __repr__(self) -> str:
        return f"Selection({[r.name for r in self.rules]!r})"

    @property
    def single_pattern(self) -> tuple[bytes, bytes, Rule] | None:
        """(find, with, rule) when the selection searches for exactly one literal pattern."""
        if len(self._patterns) == 1 and not self.has_regex:
            return self._patterns[0]
        return None

    def present(self, payload: bytes) -> list[int] | None:
        """Which of several literal patterns occur in ``payload`` (their positions in the
        pattern list), by one Hyperscan scan reporting each pattern once; None when this
        selection is not several literals or Hyperscan is missing. When exactly one occurs,
        the leftmost-first search is that pattern's own occurrences: ``bytes.replace`` in C
        makes them (the engine's same-length path), not a Python step per occurrence."""
        if self.has_regex or len(self._patterns) < 2 or not self._literals_by_hyperscan:
            return None
        db = self._present_db
        if db is None:
            db = self._present_db = _hs_database([_hex(p[0]) for p in self._patterns],
                                                 _hs.HS_FLAG_SINGLEMATCH)
        found: list[int] = []
        db.scan(payload, match_event_handler=lambda i, s, e, f, c: found.append(i))
        return found

    def pending_from(self, payload: bytes) -> int:
        """Where the undecided tail of a stream that ends with ``payload`` begins: the earliest
        position from which the rest is a proper prefix of some pattern (a match may begin
        there and end in bytes still to come, or, for a regex, grow) and that no match found
        before it reaches past; ``len(payload)`` when there is none. Matches that begin before
        it are final: more bytes cannot make an earlier match begin, nor (every match being at
        most ``max_len`` long) one that begins more than ``max_len`` before the end longer.

        Literals cost one set lookup per length up to the longest pattern's (the proper
        prefixes of all patterns are built on first use: the stream matcher's memory, per
        Selection); regexes one anchored Hyperscan scan of the last ``max_len - 1`` bytes,
        reversed (:mod:`nfrewrite.core.regex`).
        """
        n = len(payload)
        literal = self._literal_candidates(payload)
        found: list[Edit] | None = None
        x = 0  # candidates before x are inside a match found
        while True:
            at = next((c for c in literal if c >= x), n)
            if self.has_regex:
                at = min(at, self._regex_candidate(payload, x))
            if at >= n:
                return n
            if found is None:
                found = self.find_edits(payload)
            inside = [end for start, end, _, _ in found if start < at < end]
            if not inside:
                return at
            x = inside[0]

    def prepare(self) -> None:
        """Build what the search and the holds need now rather than on the first packet (a
        regex's Hyperscan databases take milliseconds to compile: as long as a deadline)."""
        if self.has_replaces:
            self.pending_from(b"")
            self.find_edits(b"")
            if self.has_regex:
                self._regex_candidate(b"", 0)

    def _literal_candidates(self, payload: bytes) -> list[int]:
        prefixes = self._prefixes
        if prefixes is None:
            prefixes = self._prefixes = Prefixes(
                [p[0] for p, rx in zip(self._patterns, self._regexes, strict=True) if rx is None])
        return prefixes.candidates(payload)

    def _regex_candidate(self, payload: bytes, x: int) -> int:
        """The earliest position at or after ``x``, within ``max_len - 1`` of the end, from
        which the rest of ``payload`` is a proper prefix of a regex's match (``len(payload)``:
        none). One Hyperscan scan per distinct ``max_len`` of the tail for the prefixes ending
        at its end, with the leftmost start: one report. (Hyperscan cannot give the start of
        every pattern: then the prefixes, reversed and anchored, over the tail reversed: a
        report per candidate.)"""
        dbs = self._prefix_dbs
        if dbs is None:
            dbs = self._prefix_dbs = {}
            by_len: dict[int, list[Regex]] = {}
            for rx in self._regexes:
                if rx is not None:
                    by_len.setdefault(rx.max_len, []).append(rx)
            for length, group in by_len.items():
                try:
                    dbs[length] = (True, _hs_database([rx.prefix_end for rx in group
                                                       if rx.prefix_end],
                                                      _hs.HS_FLAG_SOM_LEFTMOST))
                except _hs.error:
                    dbs[length] = (False, _hs_database([rx.prefix for rx in group],
                                                       _hs.HS_FLAG_ALLOWEMPTY))
        n = len(payload)
        best = [n]
        for length, (at_end, db) in dbs.items():
            lo = max(x, n - length + 1, 0)
            tail = payload[lo:]
            if at_end:
                def on_end(i: int, start: int, end: int, flags: int, context: object,
                           lo: int = lo) -> None:
                    if lo + start < best[0]:
                        best[0] = lo + start

                db.scan(tail, match_event_handler=on_end)
            else:
                def on_match(i: int, start: int, end: int, flags: int, context: object) -> None:
                    if end and n - end < best[0]:
                        best[0] = n - end

                db.scan(tail[::-1], match_event_handler=on_match)
        return best[0]

    def _regex_candidates(self, payload: bytes) -> set[int]:
        """Every position from which the rest of ``payload`` is a proper prefix of a regex's
        match of at most ``max_len`` (for tests: the hold decision wants the earliest only)."""
        found: set[int] = set()
        x = 0
        while True:
            at = self._regex_candidate(payload, x)
            if at >= len(payload):
                return found
            found.add(at)
            x = at + 1

    def find_edits(self, payload: bytes | bytearray) -> list[Edit]:
        """Every replace of the selected rules in ``payload``: (start, end, replacement, rule).

        One pass over the original payload; leftmost match first, ties to rule order (a regex
        takes its longest match there, at most ``max_len``); non-overlapping; sorted by start.
        See the module docstring.
        """
        patterns = self._patterns
        if not patterns:
            return []
        if self.has_regex:
            return self._find_reverse(payload)
        if not payload:
            if len(patterns) > 1 and self._literals_by_hyperscan and self._hs_db is None:
                self._find_hyperscan(b"x")  # prepare(): compile now
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
        if self._literals_by_hyperscan:
            return self._find_hyperscan(payload)
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

    def _find_hyperscan(self, payload: bytes | bytearray) -> list[Edit]:
        """Several patterns, by Hyperscan: every occurrence of every pattern in one linear scan,
        reported with its start; then the leftmost-first, non-overlapping ones are taken, the
        first pattern on ties (the same edits as the merged ``bytes.find`` search)."""
        patterns = self._patterns
        db = self._hs_db
        if db is None:
            db = self._hs_db = _hs_database([_hex(p[0]) for p in patterns],
                                            _hs.HS_FLAG_SOM_LEFTMOST)
        hits: list[tuple[int, int, int]] = []
        add = hits.append

        def on_match(i: int, start: int, end: int, flags: int, context: object) -> None:
            add((start, i, end))

        db.scan(bytes(payload), match_event_handler=on_match)
        hits.sort()
        edits: list[Edit] = []
        pos = 0
        for start, i, end in hits:
            if start >= pos:
                _, with_, rule = patterns[i]
                edits.append((start, end, with_, rule))
                pos = end
        return edits

    def _find_reverse(self, payload: bytes | bytearray) -> list[Edit]:
        """With a regex among the patterns: first a forward scan for what every match begins
        with (no start of match: cheap), whose ends give the windows where matches can be;
        then, in each window, every pattern reversed over the window reversed, in one
        Hyperscan scan with leftmost start of match. Each report there is a forward match's
        start with its longest end (see :mod:`nfrewrite.core.regex`); sorted by start, then
        rule order, then longest first, the leftmost non-overlapping ones are taken.

        The windows keep the second scan to the neighbourhood of matches: Hyperscan's cost per
        byte for a bounded repetition depends on the input (``b(?:a|aa){1,100}`` over 64 KB of
        ``a`` costs ~3 ms with no match at all, the forward scan ~12 us)."""
        patterns = self._patterns
        regexes = self._regexes
        if self._rev_db is None:
            exprs = [(_hex(p[0]), _hex(p[0][::-1]), len(p[0]), len(p[0]), len(p[0]))
                     if rx is None else
                     (rx.forward, rx.reverse, rx.forward_min, rx.forward_max, rx.max_width)
                     for p, rx in zip(patterns, regexes, strict=True)]
            self._rev_db = (
                _hs_database([e[0] for e in exprs], 0),
                _hs_database([e[1] for e in exprs], _hs.HS_FLAG_SOM_LEFTMOST),
                [e[3] for e in exprs],  # a match starts at most this far before a report
                [e[4] - e[2] for e in exprs])  # and ends at most this far after it
        fwd_db, rev_db, back, ahead = self._rev_db
        data = bytes(payload)
        n = len(data)
        spans: list[tuple[int, int]] = []
        add_span = spans.append

        def on_forward(i: int, start: int, end: int, flags: int, context: object) -> None:
            add_span((end - back[i], end + ahead[i]))

        fwd_db.scan(data, match_event_handler=on_forward)
        if not spans:
            return []
        spans.sort()
        hits: list[tuple[int, int, int]] = []
        add = hits.append
        lo, hi = spans[0]
        for a, b in [*spans[1:], (1 << 62, 0)]:  # the last: beyond every window
            if a <= hi:
                hi = max(hi, b)
                continue
            lo, top = max(lo, 0), min(hi, n)

            def on_match(i: int, start: int, end: int, flags: int, context: object,
                         top: int = top) -> None:
                add((top - end, i, end - start))  # forward start, pattern, -(longest end)

            rev_db.scan(data[lo:top][::-1], match_event_handler=on_match)
            lo, hi = a, b
        hits.sort()
        edits: list[Edit] = []
        pos = 0
        for start, i, length in hits:
            if start < pos:
                continue
            end = start + length
            _, with_, rule = patterns[i]
            rx = regexes[i]
            if rx is not None:
                if rx.cut and length > rx.max_len:
                    end = start + rx.max_len
                with_ = rx.replacement(data, start, end)
            edits.append((start, end, with_, rule))
            pos = end
        return edits


def _hex(literal: bytes) -> bytes:
    """A literal as a Hyperscan expression: every byte as \\xHH (no NUL ends the C string)."""
    return b"".join(b"\\x%02x" % c for c in literal)


def regex_problem(rx: Regex) -> str | None:
    """Why Hyperscan cannot run ``rx`` (None: it can): the loader asks, so ``check`` refuses what
    the matcher would fail on."""
    if _hs is None:
        return "find_regex needs Hyperscan (the Python package hyperscan), not installed here"
    for expression, flags in ((rx.forward, 0), (rx.reverse, _hs.HS_FLAG_SOM_LEFTMOST),
                              (rx.prefix, _hs.HS_FLAG_ALLOWEMPTY)):
        try:
            _hs_database([expression], flags)
        except _hs.error as exc:
            return f"the matcher (Hyperscan) cannot compile it: {exc}; use smaller bounds"
    return None


#: compiled Hyperscan databases by (expressions, flags), shared by every Selection of the
#: process (a Selection is rebuilt whenever the selection cache is emptied; compiling a regex's
#: databases takes milliseconds, as long as a hold's deadline); emptied as a whole when full
_HS_CACHE: dict[tuple[tuple[bytes, ...], int], Any] = {}
HS_CACHE_MAX = 256
#: the longest literal given to Hyperscan (several literals with a longer one are searched by
#: ``bytes.find``, merged): Hyperscan refuses an expression of 16,000 characters, 4,000 bytes
#: written as \xHH, and takes ~20 ms per such failure
HS_LITERAL_MAX = 2048


def _hs_database(expressions: list[bytes], flags: int) -> Any:
    """A block-mode Hyperscan database of ``expressions`` (ids: their positions)."""
    if _hs is None:  # pragma: no cover - a regex rule needs Hyperscan (the loader says so)
        raise RuntimeError("Hyperscan is not installed")
    key = (tuple(expressions), flags)
    db = _HS_CACHE.get(key)
    if db is None:
        db = _hs.Database(mode=_hs.HS_MODE_BLOCK)
        db.compile(expressions=expressions, ids=list(range(len(expressions))),
                   elements=len(expressions), flags=[flags] * len(expressions))
        if len(_HS_CACHE) >= HS_CACHE_MAX:
            _HS_CACHE.clear()
        _HS_CACHE[key] = db
    return db


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

    def prepare(self) -> None:
        """Compile the search of the Selection each rule's own packets get (a packet under the
        rule's match: its first network, its ports' low ends), so that a worker pays for it
        when it takes the rules, not on a packet that a hold's deadline is counting."""
        for rule in self._order:
            if not rule.replaces:
                continue
            m = rule.match
            version = 4 if 4 in m.versions else 6
            size = 4 if version == 4 else 16
            src, dst = (next((n.network_address.packed for n in nets or () if n.version == version),
                             bytes(size)) for nets in (m.src, m.dst))
            sport = m.sport[0][0] if m.sport else 40000
            dport = m.dport[0][0] if m.dport else 40001
            self.select(version, src, dst, sport, dport, m.in_port, m.out_port).prepare()

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
