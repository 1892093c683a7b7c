"""Header fields by name: offsets of the IPv4, IPv6 and TCP fields we use, big-endian accessors.

Theory of operation
-------------------
Each field nfrewrite reads or writes has a name here: its offset from the start of its own
header (the IP header starts the packet; the TCP header starts at ``l4``; an option at its kind
byte). Code then says ``u16(buf, l4 + TCP_WINDOW)[0]`` where it said
``(buf[l4 + 14] << 8) | buf[l4 + 15]``, and the offsets can be checked against the RFCs' header
pictures in one place. One-byte fields are read by indexing (``buf[l4 + TCP_FLAGS]``).

The accessors are ``struct``'s own C methods, bound once, because that measured fastest on
CPython 3.11 for the hot path (every queued packet is parsed, and most are edited), per access:

==========================  =======  =======  =====================================
                            16 bits  32 bits
==========================  =======  =======  =====================================
``Struct.unpack_from``       ~64 ns   ~58 ns   returns a 1-tuple: ``u16(buf, off)[0]``
byte shifts                  ~74 ns  ~190 ns
``int.from_bytes`` (slice)  ~140 ns  ~137 ns   the slice copies
a Python function around     +15 to +60 ns     any of them: the frame
``Struct.pack_into``         ~50 ns            ``put16(buf, off, value)``
two byte stores              ~62 ns
slice = ``int.to_bytes``    ~174 ns
==========================  =======  =======  =====================================

That is why a read returns a 1-tuple (``[0]`` at the call site) instead of going through a
function that would return the int, and why fields that are read together are read in one
call: :data:`tcp_ports`, and :data:`ip4_header`/:data:`ip6_header`, which give the parser all it
needs of an IP header at once (``parse`` of a wire-size segment takes ~20 % less time than
with byte shifts per field). A value out of range for its field raises ``struct.error``.

:func:`ip_length` is the one place that knows how IPv4 and IPv6 state a datagram's length: the
queue loop uses it to tell a copy cut short, the replay tool to cut link padding off.

Pure: bytes in, integers out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

# -- IPv4 header (RFC 791) -----------------------------------------------------------------------
IP4_VERSION_IHL = 0  # version (high 4 bits), header length in 32-bit words (low 4 bits)
IP4_TOS = 1  # DSCP (high 6 bits), ECN (low 2 bits)
IP4_TOTAL_LENGTH = 2  # 16 bits: the datagram, header included
IP4_FRAGMENT = 6  # 16 bits: reserved, DF, MF, 13-bit fragment offset
IP4_TTL = 8  # the 16-bit word here is TTL and protocol (what the header checksum sums)
IP4_PROTOCOL = 9
IP4_CHECKSUM = 10  # 16 bits
IP4_SRC = 12  # 4 bytes
IP4_DST = 16  # 4 bytes
IP4_HEADER_MIN = 20

# -- IPv6 header (RFC 8200) ----------------------------------------------------------------------
IP6_VERSION_CLASS = 0  # version (4 bits), traffic class (8 bits across bytes 0-1), flow label
IP6_PAYLOAD_LENGTH = 4  # 16 bits: what follows the fixed header, extension headers included
IP6_NEXT_HEADER = 6
IP6_HOP_LIMIT = 7
IP6_SRC = 8  # 16 bytes
IP6_DST = 24  # 16 bytes
IP6_HEADER = 40
# extension headers: hop-by-hop, routing, destination options, fragment
EXT_NEXT_HEADER = 0
EXT_LENGTH = 1  # in 8-byte units, not counting the first 8 (not for the fragment header)
EXT_ROUTING_SEGMENTS_LEFT = 3
EXT_FRAGMENT_OFFSET = 2  # 16 bits: 13-bit offset, 2 reserved bits, M flag
EXT_FRAGMENT_LENGTH = 8

# -- TCP header (RFC 9293) -----------------------------------------------------------------------
TCP_SPORT = 0  # 16 bits
TCP_DPORT = 2  # 16 bits
TCP_SEQ = 4  # 32 bits
TCP_ACK = 8  # 32 bits
TCP_DATA_OFFSET = 12  # header length in 32-bit words (high 4 bits); the word here ends in flags
TCP_FLAGS = 13
TCP_WINDOW = 14  # 16 bits
TCP_CHECKSUM = 16  # 16 bits
TCP_URGENT = 18  # 16 bits
TCP_HEADER_MIN = 20
# an option, from its kind byte
TCPOPT_LENGTH = 1  # the whole option's length (absent for EOL and NOP)
TCPOPT_VALUE = 2  # MSS (16 bits), window scale (8), TS value (32), a SACK block's left edge (32)
TCPOPT_TS_ECHO = 6  # the timestamp option's echo reply (32 bits)

# struct's C methods, bound once: no Python frame per access (see the module docstring)
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

#: ``u16(buf, offset)[0]``: the big-endian 16-bit field at ``offset`` (a 1-tuple).
u16: Callable[[Buffer, int], tuple[int]] = _U16.unpack_from
#: ``u32(buf, offset)[0]``: the big-endian 32-bit field at ``offset`` (a 1-tuple).
u32: Callable[[Buffer, int], tuple[int]] = _U32.unpack_from
#: ``put16(buf, offset, value)``: write ``value`` as a big-endian 16-bit field.
put16: Callable[[bytearray, int, int], None] = _U16.pack_into
#: ``pack32(value)``: the 4 bytes of a big-endian 32-bit field (a 32-bit edit is weighed for the
#: checksum as bytes, old and new).
pack32: Callable[[int], bytes] = _U32.pack
#: ``tcp_ports(buf, l4)``: source and destination port of the TCP header at ``l4``, one read.
tcp_ports: Callable[[Buffer, int], tuple[int, int]] = struct.Struct("!HH").unpack_from

# What the parser needs of each IP header, in one read each (the format's fields lie at the
# offsets named above; tests/test_fields.py checks them against scapy).
#: ``ip4_header(buf, 0)``: version and IHL byte, total length, fragment word, protocol,
#: source, destination.
ip4_header: Callable[[Buffer, int], tuple[int, int, int, int, bytes, bytes]] = struct.Struct(
    "!BxHxxHxBxx4s4s"
).unpack_from
#: ``ip6_header(buf, 0)``: payload length, next header, source, destination.
ip6_header: Callable[[Buffer, int], tuple[int, int, bytes, bytes]] = struct.Struct(
    "!4xHBx16s16s"
).unpack_from


def ip_length(data: Buffer) -> int | None:
    """The length the IP header states for its datagram, header included; None when ``data`` is
    too short to say or not IPv4/IPv6. Bytes after that length (link padding) are not its."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4 and len(data) >= IP4_TOTAL_LENGTH + 2:
        return u16(data, IP4_TOTAL_LENGTH)[0]
    if version == 6 and len(data) >= IP6_PAYLOAD_LENGTH + 2:
        return IP6_HEADER + u16(data, IP6_PAYLOAD_LENGTH)[0]
    return None
