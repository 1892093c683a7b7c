"""Rule set -> kernel prefilter: only packets that some rule could change ever leave the kernel.

Theory of operation
-------------------
Each rule's ``match`` becomes one :class:`~nfrewrite.kernel.ruletext.QueueMatch` (protocol TCP,
ports, addresses, bridge ports). A rule whose only action is a *same-length* literal ``replace`` (no
header ``set``, not ``drop``) also gets its ``find`` bytes as an xt ``string`` match, one kernel
rule per pattern, so a packet without the pattern stays in the kernel -- but only when asked
(``literals=True``): the engine matches per direction of a connection (a pattern split across
two segments is in neither, and the segment that ends in its beginning must be seen to be held,
:mod:`nfrewrite.core.stream`), so by default such a rule queues its whole port match like any
other. With ``literals=True`` (per-packet matching only) this is sound because a
pattern the kernel does not see in the packet cannot be in its TCP payload either (the string
match scans the whole packet, headers included: it can only over-approximate), and a same-length
edit leaves every other packet of the connection valid as it is.

A ``find_regex`` replace uses, in that mode, a literal that every match contains (its
longest run of single bytes in the pattern's top-level sequence, ``Regex.literal``: "Server: "
for ``Server: [^\r\n]*``); one without any (``[0-9]{4}``) or that may change a length queues
the rule's port match as any other rule does.

A length-changing rule gets no literal: once its first edit happens, every later segment of that
direction must have its sequence number moved, and the connmark that queues the rest of the flow
is set only when the edited packet's verdict is given. Segments already on their way behind it
would slip past a string prefilter unadjusted (seen in the lab: a FIN overtook the edited segment
and reached the server at the old sequence number). Queueing the rule's whole port match keeps the
direction in order through the queue; the other direction can only answer edited bytes after the
verdict, by which time the connmark (the rule :mod:`nfrewrite.kernel.ruletext` always puts first)
catches it.

A rule with a replace that grows also queues the SYNs of the opposite direction: the MSS they
announce bounds the segments this rule will grow, and the engine lowers it to leave room (so grown
segments rarely have to be cut at the MTU).

In host mode (:func:`compile_host_prefilter`) the rules that name no port go to the host chain
and those with ``out_port = "lo"`` to the loopback chain (their port is not written: only
packets leaving by ``lo`` enter that chain); rules naming a bridge port stay with bridged
traffic. A length-changing rule there queues the whole reverse direction of its match instead of
its SYNs: an edit made at INPUT (a request rewritten before the local server reads it) sets the
flow mark on a packet that crosses no POSTROUTING, so the connmark that would catch the local
stack's answers is never set; queueing them by match does it instead. The cost: the reverse
direction of such a rule's match is queued also on connections it never edits.

A rule whose only action is an MSS edit queues only segments with SYN set (``--tcp-flags SYN
SYN``: SYN and SYN-ACK), the only ones that carry the option.

Patterns longer than xt_string's 128-byte limit fall back to queueing by match alone.

Every QueueMatch carries its rule's ``(path, line, col)``. :func:`kernel_rules` compiles the
prefilter into kernel rules with :func:`nfrewrite.kernel.ruletext.plan` (chain trees keep a rule's
cost the *sum* of its src, dst, port-chunk and pattern counts, not their product) and turns a
refusal (more than ``MAX_KERNEL_RULES`` in one family) into a ``path:line:col`` diagnostic at the
rule needing most of them, showing that rule's line as it was loaded (``Rule.source``: the file is
not read again). ``nfrewrite check`` and the daemon's start and reload call it alike, so
check fails exactly where start or reload would.
"""

from __future__ import annotations

import dataclasses

from nfrewrite.config.diagnostics import Diagnostic
from nfrewrite.core.rules import Replace, Rule, RuleSet
from nfrewrite.kernel.ruletext import (
    MAX_LITERAL,
    HostMatches,
    Plan,
    QueueMatch,
    TooManyRules,
    plan,
)

#: the name a rule gives ``out_port`` to rewrite what the machine sends over its loopback
LOOPBACK = "lo"


def _matches_of(rule: Rule, literals: bool = False, *, host: bool = False) -> list[QueueMatch]:
    m = rule.match
    versions = m.versions
    base = {
        "version": next(iter(versions)) if len(versions) == 1 else None,
        "sports": m.sport,
        "dports": m.dport,
        "src": None if m.src is None else tuple(str(n) for n in m.src),
        "dst": None if m.dst is None else tuple(str(n) for n in m.dst),
        "in_port": m.in_port,
        "out_port": m.out_port,
        "origin": (rule.path, rule.line, rule.col),
    }
    literal_only = (
        literals
        and rule.verdict != "drop"
        and rule.set.empty
        and rule.replaces
        and all(len(lit) <= MAX_LITERAL and not r.changes_length
                for r in rule.replaces if (lit := _literal(r)) is not None)
        and all(_literal(r) is not None for r in rule.replaces)
    )
    hs = rule.set
    mss_only = (
        rule.verdict != "drop"
        and not rule.replaces
        and (hs.mss is not None or hs.mss_max is not None)
        and hs.ttl is None and hs.hop_limit is None and hs.dscp is None and hs.window is None
    )
    if mss_only:
        return [QueueMatch(**base, syn_only=True)]  # type: ignore[arg-type]
    if not literal_only:
        out = [QueueMatch(**base)]  # type: ignore[arg-type]
        changes_length = any(r.changes_length for r in rule.replaces)
        if host and changes_length:
            # the reverse direction, whole: an edit made at INPUT marks its packet, but no later
            # hook of ours copies that mark into the connmark (see the module docstring)
            reverse = {
                **base,
                "sports": base["dports"], "dports": base["sports"],
                "src": base["dst"], "dst": base["src"], "in_port": None, "out_port": None,
            }
            out.append(QueueMatch(**reverse))  # type: ignore[arg-type]
        elif any(r.growth > 0 for r in rule.replaces):
            # the SYNs of the other direction announce the MSS that bounds this direction's
            # segments: the engine lowers it to leave room for growth (see engine.py)
            reverse = {
                **base,
                "sports": base["dports"], "dports": base["sports"],
                "src": base["dst"], "dst": base["src"],
                "in_port": base["out_port"], "out_port": base["in_port"],
            }
            out.append(QueueMatch(**reverse, syn_only=True))  # type: ignore[arg-type]
        return out
    finds = dict.fromkeys(_literal(r) for r in rule.replaces)
    return [QueueMatch(**base, literal=f) for f in finds]  # type: ignore[arg-type]


def _literal(rep: Replace) -> bytes | None:
    """Bytes every match of ``rep`` contains: its ``find``, or a ``find_regex``'s longest run
    of single bytes in its top-level sequence (None: it has none)."""
    return rep.find if rep.regex is None else rep.regex.literal


def _split(matches: list[QueueMatch]) -> tuple[list[QueueMatch], list[QueueMatch]]:
    """IPv4 and IPv6 lists (duplicates removed, rule order kept)."""
    v4: dict[QueueMatch, None] = {}
    v6: dict[QueueMatch, None] = {}
    for qm in matches:
        if qm.version in (None, 4):
            v4[qm] = None
        if qm.version in (None, 6):
            v6[qm] = None
    return list(v4), list(v6)


def compile_prefilter(
    ruleset: RuleSet, literals: bool = False
) -> tuple[list[QueueMatch], list[QueueMatch]]:
    """The IPv4 and IPv6 prefilters of the FORWARD hook for ``ruleset`` (duplicates removed,
    rule order kept); ``literals``: string matches for same-length literal rules (see the module
    doc). Rules naming the loopback are host mode's only: nothing forwarded leaves by it."""
    return _split([qm for rule in ruleset.rules if rule.match.out_port != LOOPBACK
                   for qm in _matches_of(rule, literals)])


def compile_host_prefilter(ruleset: RuleSet) -> HostMatches:
    """Host mode's prefilters: (host IPv4, host IPv6, loopback IPv4, loopback IPv6). The host
    chain gets the rules that name no port (a bridge port never carries the machine's own
    packets as such), the loopback chain those with ``out_port = "lo"`` (the chain is entered
    only by packets leaving by it, so no port is written)."""
    host: list[QueueMatch] = []
    loopback: list[QueueMatch] = []
    for rule in ruleset.rules:
        ports = (rule.match.in_port, rule.match.out_port)
        if ports == (None, None):
            into = host
        elif ports == (None, LOOPBACK):
            into = loopback
        else:
            continue
        into += [dataclasses.replace(qm, in_port=None, out_port=None)
                 for qm in _matches_of(rule, host=True)]
    return (*_split(host), *_split(loopback))


def kernel_plan(ruleset: RuleSet, queue_num: int = 0, workers: int = 1, *,
                host: bool = False) -> Plan:
    """The kernel rules for ``ruleset`` (``host``: with host mode's chains). Raises
    :class:`~nfrewrite.kernel.ruletext.TooManyRules`."""
    return plan(*compile_prefilter(ruleset), queue_num, workers,
                compile_host_prefilter(ruleset) if host else None)


def kernel_rules(
    ruleset: RuleSet, queue_num: int = 0, workers: int = 1, *, host: bool = False
) -> tuple[Plan | None, list[Diagnostic]]:
    """The kernel rules for ``ruleset``, or None and the error at the rule that needs most of
    them. ``nfrewrite check`` and the daemon (start and reload) both ask this one function, so
    check refuses exactly what start would refuse, and ``--show-kernel-rules`` prints what start
    loads."""
    try:
        return kernel_plan(ruleset, queue_num, workers, host=host), []
    except TooManyRules as e:
        path, line, col = e.origin or ("<rules>", 0, 0)
        # the line as it was loaded (and checked): the file is not opened again by name
        source = next((r.source for r in ruleset.rules if (r.path, r.line, r.col) == e.origin), "")
        return None, [Diagnostic(path, line, col, "error", str(e), source)]
