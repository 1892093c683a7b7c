"""Rule ``examples`` as tests: each ``input`` goes through the engine, ``output`` must come out.

What it is for
--------------
``nfrewrite check`` calls :func:`check_examples` on a loaded :class:`~nfrewrite.rules.RuleSet`.
Every example of every rule becomes one TCP segment whose payload is the example's ``input``; the
segment is run through a fresh :class:`~nfrewrite.engine.Engine` and the payload that comes out
must equal ``output``. A mismatch is an error at the example's own ``path:line:col``::

    rules/10-web.toml:17:1: error: example does not hold (rule 'hide-server'): expected
    'Server: web\\r\\n' got 'Server: nginx\\r\\n'

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
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from nfrewrite import checksum as cs
from nfrewrite.diagnostics import Diagnostic
from nfrewrite.engine import DROP, Engine
from nfrewrite.packet import ACK, PSH, TcpPacket, parse
from nfrewrite.rules import Example, Match, PortRanges, Rule, RuleSet
from nfrewrite.seqadj import FlowTable

__all__ = ["ExampleOutcome", "check_examples", "example_packet", "run_example", "short_repr"]

EPHEMERAL = 40000
DEFAULT_V4 = (ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("198.51.100.1"))
DEFAULT_V6 = (ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("2001:db8::2"))
SEQ, ACK_NUM = 1000, 2000
MAX_PAYLOAD = 65535 - 60  # what fits in one IPv4 datagram with a 20-byte IP and TCP header
REPR_WIDTH = 48  # characters of payload shown around the first difference

ExampleOutcome = tuple[bytes | None, str | None]  # (payload out, or None and the dropping rule)


def check_examples(ruleset: RuleSet) -> list[Diagnostic]:
    """Run every example of every rule; one error per example that does not hold."""
    diagnostics: list[Diagnostic] = []
    sources: dict[str, list[str]] = {}
    for rule in ruleset.rules:
        for example in rule.examples:
            problem = _problem(ruleset, rule, example)
            if problem is None:
                continue
            lines = sources.get(rule.path)
            if lines is None:
                lines = sources[rule.path] = _read_lines(rule.path)
            source = lines[example.line - 1] if 0 < example.line <= len(lines) else ""
            diagnostics.append(
                Diagnostic(rule.path, example.line, example.col, "error", problem, source)
            )
    return diagnostics


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


def example_packet(match: Match, payload: bytes) -> bytes:
    """An IPv4/IPv6 TCP segment carrying ``payload`` that ``match`` applies to (see module doc)."""
    version = 4 if 4 in match.versions else 6
    defaults = DEFAULT_V4 if version == 4 else DEFAULT_V6
    src = _address_in(match.src, version, defaults[0])
    dst = _address_in(match.dst, version, defaults[1])
    sport = _first_port(match.sport)
    dport = _first_port(match.dport)
    if sport is None and dport is None:
        sport, dport = EPHEMERAL, EPHEMERAL + 1
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            EPHEMERAL if sport is None else sport,
            EPHEMERAL if dport is None else dport,
            SEQ, ACK_NUM, 5 << 4, PSH | ACK, 65535, 0, 0,
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
    pseudo = cs.ones_sum(src) + cs.ones_sum(dst) + 6 + len(tcp)
    tcp[16:18] = cs.fold_field(pseudo + cs.ones_sum(tcp)).to_bytes(2, "big")
    return bytes(ip + tcp)


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


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\r\n") for line in f]
    except OSError:
        return []
