"""Serialisation of the sequence records (:class:`~nfrewrite.core.seqadj.FlowTable`): bytes out,
bytes in, nothing else (the service writes and reads the files, :mod:`nfrewrite.service.flowstore`).

Why
===
A flow whose edits changed the length of its stream carries a sequence offset that only its record
knows; a connection whose record is lost stalls or loses bytes.  The records must outlive the
worker process that holds them (a crash, a restart of the daemon), so they are written out as
bytes and read back into a fresh table that maps every sequence number, ACK and SACK edge exactly
as the original would.

Format (version 1)
==================
A state is a sequence of *frames*, each ``length (u32) | crc32 (u32) | body`` (little-endian, the
CRC over the body), so that it can be written as a snapshot (all at once) or as a journal (frames
appended as flows change) and read back the same way:

* the first frame is the header: ``b"NFRFLOWS"``, the format version, the byte order of the
  position arrays (they are written as the machine's ``array('q')`` memory: the file never leaves
  the host), whether the state is a complete snapshot, and an opaque digest of the rule set it was
  written under;
* then one frame per flow record, either the whole record of one flow (the latest frame of a key
  wins) or a tombstone (the flow is gone);
* a complete snapshot ends with an end frame carrying the number of flow frames before it.

A record holds everything the flow's behaviour depends on: the key, the two directions' state and
their *kept* edits (collapsed ones are not needed: ``base`` and ``floor`` stand for them), the
replacements once per distinct byte string, and the flow's times as the writer's clock gave
them (the daemon's is ``time.monotonic()``, one clock for every process of a boot; a reader with
another clock passes the difference, ``clock_shift``; a time that lands in the reader's future,
as after a reboot, is taken as ``now``).

What reading checks
===================
Anything that is not exactly what a writer of this version produces raises :class:`StateError`
with a one-line reason: the magic, the version, the byte order, each frame's length and CRC, each
record's structure (arrays of equal length, ordered and disjoint edits, replacement indices in
range); a snapshot without its end frame (truncated) or with a wrong count.  The one exception:
in a journal, a last frame cut short (its length runs past the end) is dropped and reported
(``LoadedState.torn``): that is what a crash in the middle of an append leaves, and the writer
appends a flow's record before the packet that changed it is let go (see the store).  A rule set
digest that differs from the reader's is not an error: the records still map sequence numbers
(a record holds replacements, not rules); rules that are gone only stop producing new edits.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nfrewrite.core.seqadj import Flow, FlowKey, FlowTable, _Way

__all__ = [
    "FORMAT_VERSION",
    "LoadedState",
    "StateError",
    "encode_end",
    "encode_flow",
    "encode_header",
    "encode_table",
    "encode_tombstone",
    "decode_state",
    "restore",
]

FORMAT_VERSION = 1
MAGIC = b"NFRFLOWS"
_ORDER = b"<" if sys.byteorder == "little" else b">"

_FRAME = struct.Struct("<II")  # body length, crc32 of the body
_HEADER = struct.Struct("<8sHcB32s")  # magic, version, byte order, complete?, rules digest
_KIND_FLOW, _KIND_GONE, _KIND_END = 1, 2, 3
#: flow: kind, ip version, the two endpoints' address lengths, created / last seen / ended
#: times (NaN: not ended), probation, direction of a SYN on a live flow (255: none) and its ISN
_FLOW = struct.Struct("<BBBBdddBBI")
#: direction: bit flags, ISN, window scale, origin, hi, una, edge, base, floor, fin, edits kept,
#: distinct replacements
_WAY = struct.Struct("<BIBqqqqqqqII")
_STARTED, _DATA_SEEN, _FIN_ACKED, _HAS_ISN, _HAS_WSCALE, _HAS_UNA, _HAS_EDGE, _HAS_FLOOR, \
    _HAS_FIN = (1 << i for i in range(9))
_WAY_BITS = (1 << 9) - 1
_LEN = struct.Struct("<I")
_END = struct.Struct("<BQ")
_DIGEST_SIZE = 32


class StateError(ValueError):
    """The bytes are not a state this version can read; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class LoadedState:
    """A decoded state: the latest record of each flow still present, in writing order."""

    flows: dict[FlowKey, Flow]
    digest: bytes  # the rule set digest it was written under
    complete: bool  # a snapshot (with its end frame), not a journal
    frames: int  # flow frames read (records and tombstones)
    torn: bool  # a journal whose last frame was cut short (dropped)


def _frame(body: bytes) -> bytes:
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def encode_header(digest: bytes, *, complete: bool) -> bytes:
    """The first frame of a state; ``digest`` identifies the rule set (at most 32 bytes)."""
    if len(digest) > _DIGEST_SIZE:
        raise ValueError("a rule set digest has at most 32 bytes")
    return _frame(_HEADER.pack(MAGIC, FORMAT_VERSION, _ORDER, int(complete), digest))


def encode_end(count: int) -> bytes:
    """The end frame of a snapshot of ``count`` flow frames."""
    return _frame(_END.pack(_KIND_END, count))


def _key_bytes(key: FlowKey) -> tuple[int, int, int, bytes]:
    version, (a, pa), (b, pb) = key
    return version, len(a), len(b), a + struct.pack("<H", pa) + b + struct.pack("<H", pb)


def encode_tombstone(key: FlowKey) -> bytes:
    """A frame saying that the flow of ``key`` is gone."""
    version, la, lb, raw = _key_bytes(key)
    return _frame(struct.pack("<BBBB", _KIND_GONE, version, la, lb) + raw)


def _opt(value: int | None, bit: int) -> tuple[int, int]:
    return (0, 0) if value is None else (value, bit)


def _encode_way(way: _Way, out: list[bytes]) -> None:
    head = way.head
    n = len(way.starts) - head
    repls = way.repls[head:] if head else way.repls
    distinct = list(dict.fromkeys(repls))
    isn, b_isn = _opt(way.isn, _HAS_ISN)
    wscale, b_wscale = _opt(way.wscale, _HAS_WSCALE)
    una, b_una = _opt(way.una, _HAS_UNA)
    edge, b_edge = _opt(way.edge, _HAS_EDGE)
    floor, b_floor = _opt(way.floor, _HAS_FLOOR)
    fin, b_fin = _opt(way.fin, _HAS_FIN)
    bits = (b_isn | b_wscale | b_una | b_edge | b_floor | b_fin
            | (_STARTED if way.started else 0) | (_DATA_SEEN if way.data_seen else 0)
            | (_FIN_ACKED if way.fin_acked else 0))
    out.append(_WAY.pack(bits & 0xFF, isn, wscale, way.origin, way.hi, una, edge, way.base,
                         floor, fin, n, len(distinct)))
    out.append(bytes([bits >> 8]))
    for r in distinct:
        out.append(_LEN.pack(len(r)))
        out.append(r)
    if n:
        out.append(way.starts[head:].tobytes() if head else way.starts.tobytes())
        out.append(way.ends[head:].tobytes() if head else way.ends.tobytes())
        out.append(way.nstarts[head:].tobytes() if head else way.nstarts.tobytes())
        if len(distinct) > 1:
            index = {r: i for i, r in enumerate(distinct)}
            out.append(array("I", map(index.__getitem__, repls)).tobytes())


def encode_flow(flow: Flow) -> bytes:
    """The frame of one flow's whole record."""
    assert flow.key is not None
    version, la, lb, raw = _key_bytes(flow.key)
    ended = math.nan if flow.ended_at is None else flow.ended_at
    syn_dir, syn_isn = (255, 0) if flow._new_syn is None else flow._new_syn
    out = [_FLOW.pack(_KIND_FLOW, version, la, lb, flow.created, flow.last_seen,
                      ended, int(flow.probation), syn_dir, syn_isn), raw]
    _encode_way(flow.ways[0], out)
    _encode_way(flow.ways[1], out)
    return _frame(b"".join(out))


def encode_table(table: FlowTable, digest: bytes, *, complete: bool = True) -> bytes:
    """A complete snapshot of ``table``: header, every flow (least recently used first), end;
    or (``complete`` False) the start of a journal: the same without the end."""
    parts = [encode_header(digest, complete=complete)]
    parts.extend(encode_flow(flow) for flow in table._flows.values())
    if complete:
        parts.append(encode_end(len(parts) - 1))
    return b"".join(parts)


# -- reading ------------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise StateError("a record is shorter than its contents")
        piece = self.data[self.pos:end]
        self.pos = end
        return piece

    def unpack(self, s: struct.Struct) -> tuple[object, ...]:
        return s.unpack(self.take(s.size))

    def positions(self, n: int) -> array[int]:
        a = array("q")
        a.frombytes(self.take(8 * n))
        return a


def _decode_key(r: _Reader, version: int, la: int, lb: int) -> FlowKey:
    sizes = {4: 4, 6: 16}
    if version not in sizes or la != sizes[version] or lb != sizes[version]:
        raise StateError(f"a flow key has IP version {version} and addresses of {la}/{lb} bytes")
    a = r.take(la)
    (pa,) = struct.unpack("<H", r.take(2))
    b = r.take(lb)
    (pb,) = struct.unpack("<H", r.take(2))
    if (a, pa) > (b, pb):
        raise StateError("a flow key's endpoints are not in canonical order")
    return version, (a, pa), (b, pb)


def _decode_way(r: _Reader, intern: Mapping[bytes, bytes]) -> _Way:
    (low, isn, wscale, origin, hi, una, edge, base, floor, fin, n, ndistinct) = r.unpack(_WAY)
    bits = int(low) | r.take(1)[0] << 8  # type: ignore[call-overload]
    if bits & ~_WAY_BITS:
        raise StateError("a direction's flags have unknown bits")
    distinct: list[bytes] = []
    for _ in range(int(ndistinct)):  # type: ignore[call-overload]
        (size,) = r.unpack(_LEN)
        piece = r.take(int(size))  # type: ignore[call-overload]
        distinct.append(intern.get(piece, piece))
    n = int(n)  # type: ignore[call-overload]
    way = _Way()
    way.started = bool(bits & _STARTED)
    way.data_seen = bool(bits & _DATA_SEEN)
    way.fin_acked = bool(bits & _FIN_ACKED)
    way.isn = int(isn) if bits & _HAS_ISN else None  # type: ignore[call-overload]
    way.wscale = int(wscale) if bits & _HAS_WSCALE else None  # type: ignore[call-overload]
    way.una = int(una) if bits & _HAS_UNA else None  # type: ignore[call-overload]
    way.edge = int(edge) if bits & _HAS_EDGE else None  # type: ignore[call-overload]
    way.floor = int(floor) if bits & _HAS_FLOOR else None  # type: ignore[call-overload]
    way.fin = int(fin) if bits & _HAS_FIN else None  # type: ignore[call-overload]
    way.origin, way.hi, way.base = int(origin), int(hi), int(base)  # type: ignore[call-overload]
    if n:
        if not distinct:
            raise StateError("a direction has edits but no replacements")
        way.starts, way.ends, way.nstarts = r.positions(n), r.positions(n), r.positions(n)
        if len(distinct) > 1:
            index = array("I")
            index.frombytes(r.take(4 * n))
            if max(index) >= len(distinct):
                raise StateError("an edit refers to a replacement that is not there")
            way.repls = [distinct[i] for i in index]
        else:
            way.repls = distinct * n
        _check_edits(way)
    elif distinct:
        raise StateError("a direction has replacements but no edits")
    return way


def _check_edits(way: _Way) -> None:
    starts, ends, nstarts, repls = way.starts, way.ends, way.nstarts, way.repls
    prev_end = None if way.floor is None else way.floor
    prev_nend: int | None = None
    for i in range(len(starts)):
        if not starts[i] < ends[i] or (prev_end is not None and starts[i] < prev_end):
            raise StateError("a direction's edits overlap or are out of order")
        if prev_nend is not None and nstarts[i] < prev_nend:
            raise StateError("a direction's rewritten positions are out of order")
        prev_end = ends[i]
        prev_nend = nstarts[i] + len(repls[i])


def _decode_flow(body: bytes, now: float, shift: float, intern: Mapping[bytes, bytes]) -> Flow:
    r = _Reader(body)
    (_kind, version, la, lb, created, last_seen, ended_at, probation, syn_dir,
     syn_isn) = r.unpack(_FLOW)
    key = _decode_key(r, int(version), int(la), int(lb))  # type: ignore[call-overload]
    ways = (_decode_way(r, intern), _decode_way(r, intern))
    if r.pos != len(body):
        raise StateError("a flow record has bytes after its end")
    times = (created, last_seen)
    if not all(isinstance(t, float) and math.isfinite(t) for t in times):
        raise StateError("a flow record has a time that is not a number")
    flow = Flow(key, now)
    flow.ways = ways
    flow.created = min(now, float(created) + shift)  # type: ignore[arg-type]
    flow.last_seen = min(now, float(last_seen) + shift)  # type: ignore[arg-type]
    ended = float(ended_at)  # type: ignore[arg-type]
    flow.ended_at = None if math.isnan(ended) else min(now, ended + shift)
    flow.probation = bool(probation)
    if syn_dir not in (0, 1, 255):
        raise StateError("a flow record has a SYN direction that is not 0 or 1")
    flow._new_syn = None if syn_dir == 255 else (int(syn_dir), int(syn_isn))  # type: ignore[call-overload]
    return flow


def decode_state(
    data: bytes, now: float, *, clock_shift: float = 0.0,
    intern: Mapping[bytes, bytes] | None = None,
) -> LoadedState:
    """Read a snapshot or a journal (see the module doc).  Flows' times are the writer's plus
    ``clock_shift``, at most ``now``.  ``intern``: byte strings to share for equal replacements
    (the rule set's own), if given."""
    intern = intern or {}
    pos = 0
    size = len(data)
    header: tuple[object, ...] | None = None
    flows: dict[FlowKey, Flow] = {}
    frames = 0
    torn = False
    end_count: int | None = None
    while pos < size:
        if end_count is not None:
            raise StateError("bytes after the end of a snapshot")
        if pos + _FRAME.size > size:
            torn = True
            break
        length, crc = _FRAME.unpack_from(data, pos)
        body_at = pos + _FRAME.size
        if body_at + length > size:
            torn = True
            break
        body = data[body_at:body_at + length]
        pos = body_at + length
        if zlib.crc32(body) != crc:
            where = "header" if header is None else f"frame {frames + 1}"
            raise StateError(f"checksum mismatch in the {where}")
        if header is None:
            header = _decode_header(body)
            continue
        kind = body[0] if body else 0
        if kind == _KIND_FLOW:
            flow = _decode_flow(body, now, clock_shift, intern)
            assert flow.key is not None
            flows.pop(flow.key, None)  # the latest record goes last (writing order)
            flows[flow.key] = flow
        elif kind == _KIND_GONE:
            r = _Reader(body)
            _k, version, la, lb = struct.unpack("<BBBB", r.take(4))
            flows.pop(_decode_key(r, version, la, lb), None)
        elif kind == _KIND_END and len(body) == _END.size:
            end_count = int(_END.unpack(body)[1])
            if end_count != frames:
                raise StateError(f"the end frame counts {end_count} records, {frames} were read")
            continue
        else:
            raise StateError(f"frame {frames + 1} is of an unknown kind {kind}")
        frames += 1
    if header is None:
        raise StateError("no header (an empty or truncated file)")
    complete = bool(header[3])
    if complete and (torn or end_count is None):
        raise StateError("a snapshot without its end (truncated)")
    digest = bytes(header[4]).rstrip(b"\0")  # type: ignore[call-overload]
    return LoadedState(flows, digest, complete, frames, torn)


def _decode_header(body: bytes) -> tuple[object, ...]:
    if len(body) != _HEADER.size or body[:8] != MAGIC:
        raise StateError("not a flow state (no NFRFLOWS header)")
    header = _HEADER.unpack(body)
    if header[1] != FORMAT_VERSION:
        raise StateError(f"format version {header[1]}, this program reads {FORMAT_VERSION}")
    if header[2] != _ORDER:
        raise StateError("written on a machine of the other byte order")
    return header


def restore(table: FlowTable, flows: Iterable[Flow]) -> int:
    """Put decoded flows into ``table`` (empty or not; a key already there is kept as it is),
    within its limits (flow count, memory budget); returns how many were taken."""
    taken = 0
    for flow in flows:
        if table.adopt(flow):
            taken += 1
    return taken
