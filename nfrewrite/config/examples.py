"""Rule ``examples`` as tests: each ``input`` goes through the engine, ``output`` must come out.

What it is for
--------------
``nfrewrite check`` calls :func:`check_examples` on a loaded :class:`~nfrewrite.core.rules.RuleSet`.
Every example of every rule becomes one TCP segment whose payload is the example's ``input``; the
segment is run through a fresh :class:`~nfrewrite.core.engine.Engine` and the payload that comes out
must equal ``output``. A mismatch is an error at the example's own ``path:line:col``::

    rules/10-web.toml:17:1: error: example does not hold (rule 'hide-server'): expected
    'Server: web\\r\\n' got 'Server: nginx\\r\\n'

shown with the example's line as it was loaded (``Example.source``: the rule file is not read
again, so what is shown is what was checked).

It must not touch the network or a clock; it only builds bytes and calls the engine.

Theory of operation
-------------------
The segment is built to fall under the rule's own ``match``, so "direction" needs no separate
notion: the match names the packet's source and destination.

* IP version: IPv4 unless the rule's addresses allow only IPv6.
* Addresses: inside the first network of ``src``/``dst`` of that version (the network address + 1
  when the network has room for it, else the network address itself); without a condition,
  192.0.2.1 -> 198.51.100.1 (IPv6: 2001:db8::1 -> 2001:db8::2), documentation ranges.
* Ports: the low end of the first range of ``sport``/``dport``. A side without a condition gets
  the ephemeral port 40000 (so a rule with ``sport = 80`` sees a response 80 -> 40000, a rule with
  ``dport = 25`` a request 40000 -> 25); with no port condition at all, 40000 -> 40001.
* ``in_port``/``out_port``: the rule's own, when it has them.
* The segment: flags PSH|ACK, seq 1000, ack 2000, no options, correct checksums.

The engine gets the WHOLE ruleset, not just the rule under test: on the wire every rule that
matches a packet applies, in order, in one pass (and an earlier rule's pattern can win a position
over a later one's, or a ``drop`` rule can swallow the packet), so an example holds only if it
holds among its neighbours. It gets a fresh flow table too, so a length-changing replace is applied
exactly as to the first changed segment of a live connection.

A rule whose packet is dropped shows ``got <dropped by 'rule'>``; long payloads are shown as a
window around the first difference (:func:`short_repr`).

Cost, and its limit
-------------------
An example costs what the same packet costs on the wire: one search of its payload per distinct
``find`` pattern of the rules its packet meets, plus, per match found, one step over those
patterns. Examples of rules with their own ports are cheap (1,000 rules each with a 4 KB example:
~0.2 s); rules that all meet every packet make it quadratic (1,000 such rules whose patterns occur
~700 times in each 4 KB example: about a minute). So before running anything, ``check_examples``
adds up an estimate in *search steps* (payload bytes x patterns / 64, plus matches x patterns;
a step is roughly 50-100 ns) and, past ``EXAMPLE_STEPS_MAX`` (2**28, some 15-30 s), runs none and
reports an error at the example where the sum crossed the limit. Counting the matches is itself
a search (in C: as long again as running the examples when many patterns meet each packet, next
to nothing when each rule has its own ports); it stops as soon as the limit is crossed.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from nfrewrite.config.diagnostics import Diagnostic
from nfrewrite.core import checksum as cs
from nfrewrite.core.constants import ACK, DROP, PSH
from nfrewrite.core.engine import Engine
from nfrewrite.core.packet import TcpPacket, parse
from nfrewrite.core.rules import Example, Match, PortRanges, Rule, RuleSet
from nfrewrite.core.seqadj import FlowTable

__all__ = [
    "ExampleOutcome",
    "check_examples",
    "example_packet",
    "run_example",
    "search_steps",
    "short_repr",
]

EPHEMERAL = 40000
DEFAULT_V4 = (ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("198.51.100.1"))
DEFAULT_V6 = (ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("2001:db8::2"))
SEQ, ACK_NUM = 1000, 2000
MAX_PAYLOAD = 65535 - 60  # what fits in one IPv4 datagram with a 20-byte IP and TCP header
REPR_WIDTH = 48  # characters of payload shown around the first difference
EXAMPLE_STEPS_MAX = 2**28  # estimated search steps of all examples together (see module doc)
SCAN_BYTES_PER_STEP = 64  # payload bytes one bytes.find covers in about one step

ExampleOutcome = tuple[bytes | None, str | None]  # (payload out, or None and the dropping rule)


def check_examples(ruleset: RuleSet) -> list[Diagnostic]:
    """Run every example of every rule; one error per example that does not hold.

    If the examples together would cost more than ``EXAMPLE_STEPS_MAX`` search steps, none is
    run: one error, at the example where the estimate crossed the limit.
    """

    def error(rule: Rule, example: Example, problem: str) -> Diagnostic:
        # the line as loaded: the file is not opened again by name
        return Diagnostic(rule.path, example.line, example.col, "error", problem, example.source)

    todo = [(rule, example) for rule in ruleset.rules for example in rule.examples]
    total = 0
    for n, (rule, example) in enumerate(todo):
        steps, patterns, hits = search_steps(ruleset, rule, example, EXAMPLE_STEPS_MAX - total)
        total += steps
        if total > EXAMPLE_STEPS_MAX:
            return [error(rule, example, _too_costly(len(todo), n, total, patterns, hits))]
    diagnostics: list[Diagnostic] = []
    for rule, example in todo:
        problem = _problem(ruleset, rule, example)
        if problem is not None:
            diagnostics.append(error(rule, example, problem))
    return diagnostics


def search_steps(
    ruleset: RuleSet, rule: Rule, example: Example, limit: int = EXAMPLE_STEPS_MAX
) -> tuple[int, int, int]:
    """Estimated cost of running ``example``: (steps, distinct patterns searched, matches).

    Matches are counted (a search per pattern, in C) only while the steps stay within ``limit``;
    past it they are reported as 0 (not counted).
    """
    version, src, dst, sport, dport = _endpoints(rule.match)
    selection = ruleset.select(version, src, dst, sport, dport, rule.match.in_port,
                               rule.match.out_port)
    patterns = {rep.find for r in selection.rules for rep in r.replaces}
    # a find_regex is scanned like a literal; its matches are not counted ahead (each costs
    # one step, as a literal's, on a scan that is linear anyway)
    literals = {rep.find for r in selection.rules for rep in r.replaces if rep.regex is None}
    payload = example.input
    steps = len(payload) * len(patterns) // SCAN_BYTES_PER_STEP + 1
    if steps > limit:
        return steps, len(patterns), 0
    hits = 0
    for pattern in literals:
        hits += payload.count(pattern)
        if steps + hits * len(patterns) > limit:
            break
    return steps + hits * len(patterns), len(patterns), hits


def _too_costly(count: int, n: int, total: int, patterns: int, hits: int) -> str:
    counted = f", ~{hits} matches" if hits else ""
    return (
        f"examples too costly to check ({count} examples, none run): up to this one they need "
        f"an estimated {total:,} search steps, at most {EXAMPLE_STEPS_MAX:,} are allowed (this "
        f"example's packet meets {patterns} patterns{counted}; each match costs a step per "
        "pattern, on the wire too): give the rules narrower matches (ports, addresses) or "
        "shorter examples"
    )


def run_example(ruleset: RuleSet, rule: Rule, example: Example) -> ExampleOutcome:
    """The payload the engine makes of ``example.input`` (fresh engine, whole ruleset).

    Returns ``(payload, None)``, or ``(None, name)`` when rule ``name`` dropped the packet.
    """
    data = example_packet(rule.match, example.input)
    engine = Engine(ruleset, FlowTable())
    result = engine.process(data, in_port=rule.match.in_port, out_port=rule.match.out_port)
    if result.verdict == DROP:
        return None, result.rules[0] if result.rules else "?"
    if result.packet is None:
        return example.input, None
    out = parse(result.packet)
    if not isinstance(out, TcpPacket):  # the engine always emits a well-formed segment
        raise AssertionError(f"engine output does not parse: {out!r}")
    return out.payload, None


def _problem(ruleset: RuleSet, rule: Rule, example: Example) -> str | None:
    if len(example.input) > MAX_PAYLOAD:
        return f"example input is {len(example.input)} bytes; at most {MAX_PAYLOAD} fit a packet"
    got, dropped_by = run_example(ruleset, rule, example)
    if got == example.output:
        return None
    shown_exp, shown_got = short_repr(example.output, got)
    if dropped_by is not None:
        shown_got = f"<dropped by rule '{dropped_by}'>"
    return f"example does not hold (rule '{rule.name}'): expected {shown_exp} got {shown_got}"


# -- the packet ----------------------------------------------------------------------------------


def _endpoints(match: Match) -> tuple[int, bytes, bytes, int, int]:
    """(IP version, source, destination, source port, destination port) of ``match``'s packet."""
    version = 4 if 4 in match.versions else 6
    defaults = DEFAULT_V4 if version == 4 else DEFAULT_V6
    src = _address_in(match.src, version, defaults[0])
    dst = _address_in(match.dst, version, defaults[1])
    sport = _first_port(match.sport)
    dport = _first_port(match.dport)
    if sport is None and dport is None:
        return version, src, dst, EPHEMERAL, EPHEMERAL + 1
    return (version, src, dst, EPHEMERAL if sport is None else sport,
            EPHEMERAL if dport is None else dport)


def example_packet(match: Match, payload: bytes) -> bytes:
    """An IPv4/IPv6 TCP segment carrying ``payload`` that ``match`` applies to (see module doc)."""
    version, src, dst, sport, dport = _endpoints(match)
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH", sport, dport, SEQ, ACK_NUM, 5 << 4, PSH | ACK, 65535, 0, 0,
        )
    )
    tcp += payload
    if version == 4:
        ip = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src, dst)
        )
        ip[10:12] = cs.fold_field(cs.ones_sum(ip)).to_bytes(2, "big")
    else:
        ip = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst))
    pkt = parse(ip + tcp, csum_partial=True)  # the TCP checksum is written by finish()
    assert isinstance(pkt, TcpPacket)
    return pkt.finish()


def _address_in(
    nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None,
    version: int,
    default: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bytes:
    for net in nets or ():
        if net.version == version:
            addr = net.network_address + 1 if net.num_addresses > 1 else net.network_address
            return addr.packed
    return default.packed


def _first_port(ranges: PortRanges | None) -> int | None:
    return ranges[0][0] if ranges else None


# -- messages ------------------------------------------------------------------------------------


def short_repr(expected: bytes, got: bytes | None) -> tuple[str, str]:
    """Short reprs of two payloads: whole when short, else a window from near the first difference.

    Text that is valid UTF-8 is shown as a Python str literal, anything else as a bytes literal;
    a cut is marked with ``...`` and the offset where the window starts.
    """
    other = b"" if got is None else got
    diff = next(
        (i for i, (a, b) in enumerate(zip(expected, other, strict=False)) if a != b),
        min(len(expected), len(other)),
    )
    start = 0 if max(len(expected), len(other)) <= REPR_WIDTH else max(0, diff - REPR_WIDTH // 4)
    return _window(expected, start), _window(other, start)


def _window(data: bytes, start: int) -> str:
    chunk = data[start : start + REPR_WIDTH]
    text: str
    try:
        text = repr(chunk.decode("utf-8"))
    except UnicodeDecodeError:
        text = repr(chunk)
    if start == 0 and len(data) <= REPR_WIDTH:
        return text
    head = f"[@{start}] ..." if start else ""
    tail = "..." if start + REPR_WIDTH < len(data) else ""
    return f"{head}{text}{tail} ({len(data)} bytes)"
