"""Prefilter -> iptables rule text: our chains, how rules are laid out in them, and their bound.

Theory of operation
-------------------
Packets reach userspace only through rules. Ours live in two chains we own, in the ``mangle`` table
of both IPv4 (``iptables``) and IPv6 (``ip6tables``)::

    mangle FORWARD      ... host rules ...  -j NFREWRITE        (appended once, at the end)
    mangle POSTROUTING  ... host rules ...  -j NFREWRITE_POST   (appended once, at the end)

    NFREWRITE       -m connmark --mark FLOW_MARK/FLOW_MARK -j NFQUEUE ...   (always first)
                    -p tcp <prefilter of QueueMatch 1> -j NFQUEUE ...
                    -p tcp <prefilter of QueueMatch 2> -j NFQUEUE ...
    NFREWRITE_POST  -m mark --mark FLOW_MARK/FLOW_MARK -j CONNMARK --save-mark (only our bit)

With more than ``GROUP_ABOVE`` prefilter rules, they are grouped by port (see :func:`layout`): the
kernel walks a chain rule by rule, so a packet that matches none of 1000 flat rules (every ACK
coming back, every flow no rule names) would cost 1000 rule evaluations. ``NFREWRITE`` then holds
the connmark rule, one jump per used port bucket (``-p tcp --dport 5120:6143 -j NFREWRITE_D5``;
``_S<k>`` for rules with source ports only) and the rules no bucket can hold; the buckets hold the
rules. All prefilter rules have the same target, so regrouping changes nothing but the cost.

Bounded size: QueueMatches that differ only in their ``literal`` (a rule's find patterns) form one
group, and a group whose src x dst x sport-chunks x dport-chunks x literals product is larger than
its sum becomes a *chain tree* instead of one flat rule per combination::

    NFREWRITE       -p tcp --dport 10000:10897 -j NFREWRITE_T0_1   (entry: single values, the
                                                                    port envelope, physdev, SYN)
    NFREWRITE_T0_1  -p tcp -m multiport --dports <15 ports> -g NFREWRITE_T0_2   (one per chunk)
    NFREWRITE_T0_2  -p tcp -s <src> -g NFREWRITE_T0_3                            (one per CIDR)
    NFREWRITE_T0_3  -p tcp -d <dst> -g NFREWRITE_T0_4                            (one per CIDR)
    NFREWRITE_T0_4  -p tcp -m string ... -j NFQUEUE ...                          (one per pattern)

Levels go dports, sports, src, dst, patterns (the costly string match last). ``-g`` (goto) makes a
chain that ends without a verdict return to the caller of the tree, after the entry: a packet
walks at most one path, and is queued exactly when some combination matches, as with the flat
rules. 64 src x 64 dst x 300 ports x 50 patterns is 200 rules, not 4 million. Address lists are
also merged first (adjacent and nested CIDRs collapse). What is left is capped: above
``MAX_KERNEL_RULES`` rules in one family, :func:`plan` raises :class:`TooManyRules` naming the rule
(``QueueMatch.origin``) with the largest share. ``plan`` is the one compilation:
``Firewall.install`` and ``swap`` load what it made, and ``render`` (``nfrewrite check
--show-kernel-rules``) shows it (from QueueMatches, or a :class:`Plan` made before);
``nfrewrite.kernel.prefilter.kernel_rules`` turns its refusal into a positioned diagnostic for
``check`` and for the daemon's start and reload alike (a reload swaps in the very plan its loader
checked).

Why ``mangle`` and why ``FORWARD``: bridged traffic (with br_netfilter) and routed traffic both
cross the FORWARD hook. An NFQUEUE verdict of ACCEPT ends the traversal of the *current table* at
that hook; by sitting in mangle (priority -150) we leave the filter table (priority 0) and
everything after it intact: the host's firewall still judges every packet after us. Our jump is
appended at the end of mangle FORWARD, so host mangle rules in place when we start run before us as
well.

Why the connmark: when the engine changes a payload length, every later packet of that flow, in
both directions, must reach the queue for its sequence numbers to be adjusted, whatever the
prefilter says. The queue worker marks such a packet (``FLOW_MARK`` bit in the verdict's packet
mark, see ``nfrewrite.kernel.queue``); ``NFREWRITE_POST`` copies that one bit into the conntrack
mark, and the first rule of ``NFREWRITE`` queues every packet of a flow whose conntrack mark
carries it. Only the ``FLOW_MARK`` bit is ever read or written, so the host's use of the other mark
bits is untouched.

Host mode (``[host] enabled``): the machine's own TCP crosses no FORWARD hook, so three more
jumps, at the end of mangle ``INPUT`` and ``OUTPUT``, lead into two more chains of ours::

    mangle INPUT   ... ! -i lo -j NFREWRITE_HOST   (what the machine receives, not by loopback)
    mangle OUTPUT  ... ! -o lo -j NFREWRITE_HOST   (what it sends, not by loopback)
    mangle OUTPUT  ...   -o lo -j NFREWRITE_LO     (what it sends itself over the loopback)

``NFREWRITE_HOST`` holds the connmark rule and the prefilter of the rules that name no port;
``NFREWRITE_LO`` the connmark rule and the prefilter of the rules with ``out_port = "lo"``, so
turning host mode on never queues a local service's loopback traffic unless a rule says so. A
loopback packet crosses OUTPUT and then INPUT: it is queued once, at OUTPUT (both directions of
a loopback connection leave by ``lo``), and never at INPUT, where a second pass through a flow's
sequence adjuster would map its numbers twice. These chains are separate from ``NFREWRITE``
because a ``physdev-out`` match is refused in any chain OUTPUT can reach; their port buckets and
trees are named after them (``NFREWRITE_HOST_D<k>``, ``NFREWRITE_LO_T<n>_<level>``), and the
bound counts all chains of a family together. Locally sent packets cross POSTROUTING, so
``NFREWRITE_POST`` saves their flow mark; a packet edited at INPUT crosses no later hook of ours,
its mark is never saved, so in host mode a length-changing rule also queues the whole reverse
direction of its match (see :mod:`nfrewrite.kernel.prefilter`).

``--queue-bypass`` lets packets pass while no process is bound to the queue (daemon stopped or
killed); ``--queue-balance a:b`` spreads flows over several workers with a symmetric hash, so both
directions of a flow reach the same worker.

This module only writes text (``iptables-restore`` input) and runs nothing: loading it into the
kernel is :mod:`nfrewrite.kernel.firewall`'s job. ``nfrewrite check`` and the prefilter compile
and bound the rules without starting a process.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from nfrewrite.config.ifname import ifname_problem
from nfrewrite.core.constants import FLOW_MARK, FLOW_MARK_MASK

CHAIN = "NFREWRITE"
POST_CHAIN = "NFREWRITE_POST"
#: host mode: the machine's own TCP (OUTPUT, INPUT), and what it sends over the loopback
HOST_CHAIN = "NFREWRITE_HOST"
LO_CHAIN = "NFREWRITE_LO"
TABLE = "mangle"
FORWARD_JUMP = f"-A FORWARD -j {CHAIN}"
POST_JUMP = f"-A POSTROUTING -j {POST_CHAIN}"
#: the jumps of host mode, as ``iptables-save`` prints them
HOST_JUMPS = (
    f"-A INPUT ! -i lo -j {HOST_CHAIN}",
    f"-A OUTPUT ! -o lo -j {HOST_CHAIN}",
    f"-A OUTPUT -o lo -j {LO_CHAIN}",
)


#: xt_string's limit (XT_STRING_MAX_PATTERN_SIZE).
MAX_LITERAL = 128
#: xt_multiport's limit: 15 ports, a range counting two.
MULTIPORT_SLOTS = 15

PortRange = tuple[int, int]


class FirewallError(RuntimeError):
    """Our rules could not be built (:class:`TooManyRules`), or installing, swapping or removing
    them failed (:mod:`nfrewrite.kernel.firewall`; the message carries iptables' own words)."""


@dataclass(frozen=True, slots=True)
class QueueMatch:
    """One prefilter: TCP packets matching all given fields go to the queue.

    ``None`` means "any". ``version`` 4/6 restricts the family; ``sports``/``dports`` are lists of
    inclusive (lo, hi) ranges; ``src``/``dst`` CIDR lists may mix families (each family's rules use
    its own); ``in_port``/``out_port`` are bridge port names; ``literal`` adds an xt string match
    (Boyer-Moore over the whole packet) as a cheap "might contain" test.
    """

    version: int | None = None
    sports: Sequence[PortRange] | None = None
    dports: Sequence[PortRange] | None = None
    src: Sequence[str] | None = None
    dst: Sequence[str] | None = None
    in_port: str | None = None
    out_port: str | None = None
    literal: bytes | None = None
    syn_only: bool = False  # only segments with SYN set (the MSS option lives only there)
    #: (path, line, col) of the rule this comes from, for errors; not part of equality
    origin: tuple[str, int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.version not in (None, 4, 6):
            raise ValueError(f"version must be 4, 6 or None, not {self.version!r}")
        for name in ("sports", "dports"):
            ranges = getattr(self, name)
            if ranges is None:
                continue
            norm = tuple((int(lo), int(hi)) for lo, hi in ranges)
            if not norm:
                raise ValueError(f"{name}: empty list (use None for any port)")
            for lo, hi in norm:
                if not 0 <= lo <= hi <= 65535:
                    raise ValueError(f"{name}: bad port range {lo}-{hi}")
            object.__setattr__(self, name, norm)
        for name in ("src", "dst"):
            cidrs = getattr(self, name)
            if cidrs is None:
                continue
            if isinstance(cidrs, str):
                cidrs = [cidrs]
            norm_c = tuple(str(ipaddress.ip_network(c, strict=False)) for c in cidrs)
            if not norm_c:
                raise ValueError(f"{name}: empty list (use None for any address)")
            object.__setattr__(self, name, norm_c)
        for name in ("in_port", "out_port"):
            port = getattr(self, name)
            problem = None if port is None else ifname_problem(port)
            if problem is not None:
                raise ValueError(f"{name}: {port!r} is not a valid interface name: {problem}")
        if self.literal is not None and not 1 <= len(self.literal) <= MAX_LITERAL:
            raise ValueError(f"literal must be 1..{MAX_LITERAL} bytes, not {len(self.literal)}")


# -- compiling ---------------------------------------------------------------------------------


def queue_target(queue_num: int, workers: int) -> list[str]:
    if workers < 1 or not 0 <= queue_num <= 65535 or queue_num + workers - 1 > 65535:
        raise ValueError(f"bad queue numbers: num={queue_num} workers={workers}")
    if workers == 1:
        return ["-j", "NFQUEUE", "--queue-num", str(queue_num), "--queue-bypass"]
    last = queue_num + workers - 1
    return ["-j", "NFQUEUE", "--queue-balance", f"{queue_num}:{last}", "--queue-bypass"]


def _fmt_range(r: PortRange) -> str:
    lo, hi = r
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _port_chunks(ranges: Sequence[PortRange]) -> list[list[PortRange]]:
    """Split ranges into groups that each fit one multiport match (15 slots)."""
    chunks: list[list[PortRange]] = [[]]
    used = 0
    for r in ranges:
        cost = 1 if r[0] == r[1] else 2
        if used + cost > MULTIPORT_SLOTS:
            chunks.append([])
            used = 0
        chunks[-1].append(r)
        used += cost
    return chunks


def _port_args(direction: Literal["s", "d"], group: Sequence[PortRange] | None) -> list[str]:
    if group is None:
        return []
    if len(group) == 1:
        return [f"--{direction}port", _fmt_range(group[0])]
    return ["-m", "multiport", f"--{direction}ports", ",".join(_fmt_range(r) for r in group)]


def _family_cidrs(cidrs: Sequence[str] | None, family: int) -> list[str | None] | None:
    """[None] for "any"; the family's CIDRs, as few as cover the same addresses (adjacent and
    nested networks merged); None if the list has none of this family."""
    if cidrs is None:
        return [None]
    nets = [ipaddress.ip_network(c) for c in cidrs]
    mine: list[str | None] = []
    if family == 4:
        v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
        mine += [str(n) for n in ipaddress.collapse_addresses(v4)]
    else:
        v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
        mine += [str(n) for n in ipaddress.collapse_addresses(v6)]
    return mine or None


def _quote(arg: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.,:/@+=-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Port buckets: ``NFREWRITE_D<k>`` holds the rules whose destination ports all lie in
#: ``[k * BUCKET, (k + 1) * BUCKET)`` (``_S<k>`` for source ports when a rule names no destination
#: port). A rule spanning up to ``MAX_BUCKETS_PER_RULE`` buckets is copied into each.
BUCKET = 1024
MAX_BUCKETS_PER_RULE = 4
#: Up to this many prefilter rules the chain stays flat (easiest to read); above it, grouped.
GROUP_ABOVE = 32
#: At most this many iptables rules per family (all our chains together): one restore of 25,000
#: rules takes about a second (nf_tables and legacy alike); more is refused (:class:`TooManyRules`).
MAX_KERNEL_RULES = 25_000

#: (direction "d"/"s", bucket numbers) of a compiled rule, or None: it stays in the main chain.
BucketKey = tuple[str, tuple[int, ...]] | None
#: "path:line:col" of the rule a QueueMatch comes from, as (path, line, col).
Origin = tuple[str, int, int]


def _buckets(group: Sequence[PortRange]) -> tuple[int, ...] | None:
    found = sorted({b for lo, hi in group for b in range(lo // BUCKET, hi // BUCKET + 1)})
    return tuple(found) if len(found) <= MAX_BUCKETS_PER_RULE else None


class TooManyRules(FirewallError):
    """The prefilter of one family would exceed ``MAX_KERNEL_RULES``; ``origin`` is the rule
    (``(path, line, col)``, or None if unknown) that contributes most, ``own`` its share."""

    def __init__(self, family: int, total: int, origin: Origin | None, own: int) -> None:
        self.family, self.total, self.origin, self.own = family, total, origin, own
        super().__init__(
            f"the kernel prefilter would need {total} IPv{family} iptables rules, more than "
            f"{MAX_KERNEL_RULES}; this rule alone needs {own}: merge its src/dst addresses "
            "into fewer, wider CIDRs and its ports into ranges, or use fewer find patterns"
        )


@dataclass(frozen=True, slots=True)
class _Unit:
    """One entry in the main chain (or a bucket) and the chains only it jumps to (a tree)."""

    entry: list[str]
    key: BucketKey
    chains: dict[str, list[list[str]]]
    origin: Origin | None

    @property
    def size(self) -> int:
        return 1 + sum(len(rules) for rules in self.chains.values())


def tree_chain(group: int, level: int, chain: str = CHAIN) -> str:
    return f"{chain}_T{group}_{level}"


def _units(
    matches: Iterable[QueueMatch], family: int, queue_num: int, workers: int, chain: str = CHAIN
) -> list[_Unit]:
    """The connmark rule, then per group of QueueMatches that differ only in their literal: its
    flat rules (one per combination of values), or one entry into a chain tree when that is
    smaller (see the module docstring)."""
    target = queue_target(queue_num, workers)
    mark = f"0x{FLOW_MARK:x}/0x{FLOW_MARK_MASK:x}"
    units = [_Unit(["-m", "connmark", "--mark", mark, *target], None, {}, None)]
    groups: dict[QueueMatch, tuple[list[bytes | None], Origin | None]] = {}
    for m in matches:
        if m.version not in (None, family):
            continue
        base = dataclasses.replace(m, literal=None)
        seen, _ = groups.setdefault(base, ([], m.origin))
        if m.literal not in seen:
            seen.append(m.literal)
    trees = 0
    for m, (found, origin) in groups.items():
        srcs = _family_cidrs(m.src, family)
        dsts = _family_cidrs(m.dst, family)
        if srcs is None or dsts is None:
            continue  # restricted to addresses of the other family only
        # a match without literal queues whatever the payload: its literal siblings add nothing
        literals: list[bytes | None] = [None] if None in found else found
        tail: list[str] = []
        if m.in_port or m.out_port:
            tail += ["-m", "physdev"]
            if m.in_port:
                tail += ["--physdev-in", m.in_port]
            if m.out_port:
                tail += ["--physdev-out", m.out_port]
        if m.syn_only:
            tail += ["-m", "tcp", "--tcp-flags", "SYN", "SYN"]
        # each dimension: the match arguments of each of its values ([] = any)
        dchunks = _chunks_or_any(m.dports)
        schunks = _chunks_or_any(m.sports)
        dims: dict[str, list[list[str]]] = {
            "dport": [_port_args("d", g) for g in dchunks],
            "sport": [_port_args("s", g) for g in schunks],
            "src": [[] if s is None else ["-s", s] for s in srcs],
            "dst": [[] if d is None else ["-d", d] for d in dsts],
            "literal": [[] if lit is None else
                        ["-m", "string", "--algo", "bm", "--hex-string", f"|{lit.hex()}|"]
                        for lit in literals],
        }
        flat = math.prod(len(values) for values in dims.values())
        if flat > 1 + sum(len(level) for level in _levels(dims)):  # the tree is smaller
            envelopes = {name: (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
                         for name, ranges in (("sport", m.sports), ("dport", m.dports))
                         if ranges is not None}
            key = _key_of(m.sports, m.dports)
            units.append(_tree(trees, dims, tail, target, key, origin, envelopes, chain))
            trees += 1
            continue
        for lit in dims["literal"]:
            for s in dims["src"]:
                for d in dims["dst"]:
                    for schunk, sg in zip(schunks, dims["sport"], strict=True):
                        for dchunk, dg in zip(dchunks, dims["dport"], strict=True):
                            rule = ["-p", "tcp", *s, *d, *sg, *dg, *tail, *lit, *target]
                            units.append(_Unit(rule, _key_of(schunk, dchunk), {}, origin))
    return units


def _chunks_or_any(ranges: Sequence[PortRange] | None) -> list[list[PortRange] | None]:
    return [None] if ranges is None else list(_port_chunks(ranges))


def _key_of(sports: Sequence[PortRange] | None, dports: Sequence[PortRange] | None) -> BucketKey:
    """The bucket a rule (or a tree's entry) with these ports belongs in: by destination port if
    it names one, else by source port; None (main chain) if they span too many buckets."""
    for direction, ranges in (("d", dports), ("s", sports)):
        if ranges is not None:
            found = _buckets(ranges)
            return None if found is None else (direction, found)
    return None


def _levels(dims: dict[str, list[list[str]]]) -> list[list[list[str]]]:
    """A tree's chains, in walking order: each dimension with several values, and the literal
    (even a single one: the costly match goes last)."""
    return [dims[name] for name in ("dport", "sport", "src", "dst", "literal")
            if len(dims[name]) > 1 or (name == "literal" and dims[name][0])]


def _tree(
    number: int,
    dims: dict[str, list[list[str]]],
    tail: list[str],
    target: list[str],
    key: BucketKey,
    origin: Origin | None,
    envelopes: dict[str, PortRange],
    chain: str = CHAIN,
) -> _Unit:
    """One entry rule (the single-valued dimensions and the tail) jumping to a chain per
    multi-valued dimension; each chain's rules go (``-g``) to the next, the last one's queue.
    The literal, the expensive match, is always tested last."""
    fixed: list[str] = []
    for name in ("src", "dst", "sport", "dport"):
        if len(dims[name]) == 1:
            fixed += dims[name][0]
        elif name in envelopes:  # a cheap superset: most packets need not enter the tree
            fixed += [f"--{name}", _fmt_range(envelopes[name])]
    levels = _levels(dims)
    names = [tree_chain(number, i + 1, chain) for i in range(len(levels))]
    chains: dict[str, list[list[str]]] = {}
    for i, (name, values) in enumerate(zip(names, levels, strict=True)):
        then = target if i == len(levels) - 1 else ["-g", names[i + 1]]
        chains[name] = [["-p", "tcp", *v, *then] for v in values]
    return _Unit(["-p", "tcp", *fixed, *tail, "-j", names[0]], key, chains, origin)


def compile_rules(
    matches: Iterable[QueueMatch], family: int, queue_num: int, workers: int
) -> list[list[str]]:
    """The argument lists (after ``-A NFREWRITE``) for one family, connmark rule first, before
    grouping into port buckets (a chain tree counts as its one entry rule)."""
    return [u.entry for u in _units(matches, family, queue_num, workers)]


def bucket_chain(direction: str, bucket: int, chain: str = CHAIN) -> str:
    return f"{chain}_{direction.upper()}{bucket}"


@dataclass(frozen=True, slots=True)
class Layout:
    """One family's rules: ``main`` for ``NFREWRITE``, then every other chain of ours by name
    (port buckets and chain trees), in the order ``restore_text`` writes them."""

    main: list[list[str]]
    chains: dict[str, list[list[str]]]

    @property
    def count(self) -> int:
        """iptables rules in all our prefilter chains (``NFREWRITE_POST``'s one not counted)."""
        return len(self.main) + sum(len(rules) for rules in self.chains.values())


def layout(
    matches: Iterable[QueueMatch], family: int, queue_num: int, workers: int, chain: str = CHAIN
) -> Layout:
    """Main-chain rules and the other chains. Every prefilter rule has the same target, so their
    order does not matter and they can be regrouped: the kernel walks a chain rule by rule, and
    a packet (an ACK on its way back, say) that matches none of 1000 flat rules costs ~1000 rule
    evaluations; grouped by port it costs a few dozen jumps and one bucket. ``chain``: the main
    chain (``CHAIN``, or ``HOST_CHAIN``/``LO_CHAIN`` in host mode); the others are named after it.

    Raises :class:`TooManyRules` above ``MAX_KERNEL_RULES``."""
    units = _units(matches, family, queue_num, workers, chain)
    result = _arrange(units, chain)
    _check_bound(family, result.count, units[1:])
    return result


def _arrange(units: list[_Unit], chain: str) -> Layout:
    trees = {name: rules for u in units for name, rules in u.chains.items()}
    if len(units) - 1 <= GROUP_ABOVE:
        return Layout([u.entry for u in units], trees)
    main = [units[0].entry]
    residual: list[list[str]] = []
    by_bucket: dict[tuple[str, int], list[list[str]]] = {}
    for u in units[1:]:
        if u.key is None:
            residual.append(u.entry)
            continue
        direction, buckets = u.key
        for b in buckets:
            by_bucket.setdefault((direction, b), []).append(u.entry)
    chains: dict[str, list[list[str]]] = {}
    for (direction, b), rules in sorted(by_bucket.items()):
        name = bucket_chain(direction, b, chain)
        lo, hi = b * BUCKET, min(65535, (b + 1) * BUCKET - 1)
        main.append(["-p", "tcp", f"--{direction}port", f"{lo}:{hi}", "-j", name])
        chains[name] = rules
    return Layout(main + residual, {**chains, **trees})


def _check_bound(family: int, count: int, units: list[_Unit]) -> None:
    """:class:`TooManyRules` if ``count`` rules (all our chains of one family) are too many,
    naming the rule with the largest share of ``units`` (the connmark rules left out)."""
    if count <= MAX_KERNEL_RULES:
        return
    own: dict[Origin | None, int] = {}
    for u in units:
        own[u.origin] = own.get(u.origin, 0) + u.size
    worst = max(own, key=lambda o: own[o])
    raise TooManyRules(family, count, worst, own[worst])


@dataclass(frozen=True, slots=True)
class HostLayouts:
    """Host mode's chains of one family: ``host`` (``NFREWRITE_HOST``, the machine's own TCP
    but the loopback) and ``lo`` (``NFREWRITE_LO``, what rules naming ``out_port = "lo"`` queue)."""

    host: Layout
    lo: Layout


@dataclass(frozen=True, slots=True)
class Plan:
    """Both families' layouts: what ``Firewall.install``/``swap`` load and ``render`` shows.
    ``host_v4``/``host_v6``: host mode's chains, None when it is off."""

    v4: Layout
    v6: Layout
    queue_num: int
    workers: int
    host_v4: HostLayouts | None = None
    host_v6: HostLayouts | None = None

    def family(self, family: int) -> Layout:
        return self.v4 if family == 4 else self.v6

    def host_family(self, family: int) -> HostLayouts | None:
        return self.host_v4 if family == 4 else self.host_v6


#: host mode's QueueMatches: (host IPv4, host IPv6, loopback IPv4, loopback IPv6)
HostMatches = tuple[Sequence[QueueMatch], Sequence[QueueMatch], Sequence[QueueMatch],
                    Sequence[QueueMatch]]


def plan(
    matches_v4: Iterable[QueueMatch],
    matches_v6: Iterable[QueueMatch],
    queue_num: int = 0,
    workers: int = 1,
    host: HostMatches | None = None,
) -> Plan:
    """THE compilation of a prefilter into kernel rules: ``nfrewrite check`` (through
    ``prefilter.kernel_rules``), the daemon's start and its reload all call it, so what check
    shows or refuses is what start loads or refuses. ``host``: host mode's matches (None: off);
    the bound then holds for all chains of a family together. Raises :class:`TooManyRules`."""
    v4 = layout(matches_v4, 4, queue_num, workers)
    v6 = layout(matches_v6, 6, queue_num, workers)
    if host is None:
        return Plan(v4, v6, queue_num, workers)
    hosts: dict[int, HostLayouts] = {}
    for family, forward, host_matches, lo_matches in ((4, v4, host[0], host[2]),
                                                      (6, v6, host[1], host[3])):
        units_host = _units(host_matches, family, queue_num, workers, HOST_CHAIN)
        units_lo = _units(lo_matches, family, queue_num, workers, LO_CHAIN)
        hl = HostLayouts(_arrange(units_host, HOST_CHAIN), _arrange(units_lo, LO_CHAIN))
        total = forward.count + hl.host.count + hl.lo.count
        if total > MAX_KERNEL_RULES:
            units_fwd = _units(matches_v4 if family == 4 else matches_v6, family, queue_num,
                               workers)
            _check_bound(family, total, units_fwd[1:] + units_host[1:] + units_lo[1:])
        hosts[family] = hl
    return Plan(v4, v6, queue_num, workers, hosts[4], hosts[6])


def is_our_chain(name: str) -> bool:
    """A port bucket or tree chain, or a host mode chain (``NFREWRITE`` and ``NFREWRITE_POST``
    are named directly)."""
    if name in (HOST_CHAIN, LO_CHAIN):
        return True
    return re.fullmatch(re.escape(CHAIN) + r"(?:_HOST|_LO)?_(?:[DS]\d+|T\d+_\d+)",
                        name) is not None


def restore_text(
    matches: Iterable[QueueMatch] | Layout,
    family: int,
    queue_num: int = 0,
    workers: int = 1,
    *,
    add_forward_jump: bool = True,
    add_post_jump: bool = True,
    delete_jumps: Sequence[str] = (),
    existing_chains: Iterable[str] = (),
    host: HostLayouts | None = None,
    add_host_jumps: Sequence[str] | None = None,
) -> str:
    """The ``*-restore --noflush`` input that (re)fills our chains for one family.

    ``matches``: the family's QueueMatches (compiled here) or its ready :class:`Layout` (then
    ``queue_num``/``workers`` are not used). ``existing_chains``: chain names ``iptables-save``
    shows now; chains of ours among them that the new layout does not use are flushed and deleted
    in the same transaction (their jumps must be among ``delete_jumps``). ``host``: host mode's
    chains, filled too; ``add_host_jumps``: which of ``HOST_JUMPS`` to add (None: all of them,
    when ``host`` is given)."""
    lay = matches if isinstance(matches, Layout) else layout(matches, family, queue_num, workers)
    layouts = {CHAIN: lay}
    if host is not None:
        layouts[HOST_CHAIN] = host.host
        layouts[LO_CHAIN] = host.lo
    lines = [f"*{TABLE}", f":{CHAIN} - [0:0]", f":{POST_CHAIN} - [0:0]"]
    lines += [f":{name} - [0:0]" for name in layouts if name != CHAIN]
    lines += [f":{name} - [0:0]" for each in layouts.values() for name in each.chains]
    for jump in delete_jumps:
        lines.append("-D" + jump[2:])
    used = set(layouts)
    for main, each in layouts.items():
        for rule in each.main:
            lines.append(f"-A {main} " + " ".join(_quote(a) for a in rule))
        for name, rules in each.chains.items():
            used.add(name)
            for rule in rules:
                lines.append(f"-A {name} " + " ".join(_quote(a) for a in rule))
    stale = sorted(c for c in existing_chains if is_our_chain(c) and c not in used)
    lines += [f"-F {name}" for name in stale] + [f"-X {name}" for name in stale]
    mark = f"0x{FLOW_MARK:x}/0x{FLOW_MARK_MASK:x}"
    lines.append(
        f"-A {POST_CHAIN} -m mark --mark {mark} -j CONNMARK --save-mark "
        f"--nfmask 0x{FLOW_MARK_MASK:x} --ctmask 0x{FLOW_MARK_MASK:x}"
    )
    if add_forward_jump:
        lines.append(FORWARD_JUMP)
    if add_post_jump:
        lines.append(POST_JUMP)
    if host is not None:
        lines += HOST_JUMPS if add_host_jumps is None else add_host_jumps
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render(
    matches_v4: Iterable[QueueMatch] | Plan,
    matches_v6: Iterable[QueueMatch] = (),
    queue_num: int = 0,
    workers: int = 1,
) -> str:
    """Human-readable view of what ``install`` loads (``nfrewrite check --show-kernel-rules``):
    of a :class:`Plan`, or of the two families' QueueMatches."""
    p = (matches_v4 if isinstance(matches_v4, Plan)
         else plan(matches_v4, matches_v6, queue_num, workers))
    out = []
    for family, tool in ((4, "iptables"), (6, "ip6tables")):
        lay = p.family(family)
        host = p.host_family(family)
        count = lay.count + (0 if host is None else host.host.count + host.lo.count)
        out.append(f"# IPv{family}: {tool}-restore --noflush (jumps added only if missing); "
                   f"{count} rules")
        out.append(restore_text(lay, family, host=host).rstrip("\n"))
    return "\n".join(out) + "\n"
