"""Whole-engine fuzzer: a million packets through parse -> match -> rewrite -> sequence adjust.

``python -m tests.fuzz [--count N] [--seed S] [--oracle-every K]`` (``make fuzz``): exit 0 when
every packet kept every invariant, 1 on any violation (each printed with the packet's hex, the seed
and the command that reproduces it).

Theory of operation
-------------------
No hypothesis here: one seeded :class:`random.Random` drives everything, so a run is a pure
function of ``(seed, count)`` and a failure at packet ``i`` reproduces with ``--count i+1``. Speed
matters (the default is 10**6 packets), so packets are built by a small struct-based builder in
this file whose checksums come from :func:`ones_sum`, an ``array``-based RFC 1071 sum that shares
no code with :mod:`nfrewrite.core.checksum`. scapy stays the independent oracle, but it is slow, so
it checks one packet in ``--oracle-every`` (default 200).

The packets, interleaved at random:

* conversations (:class:`Conn`): SYN, SYN-ACK, request and response data cut into random segments
  whose payloads are made of the rules' ``find`` patterns, pieces of them and filler, so same-length
  and length-changing rewrites happen in both directions and flows are created. The two receivers
  are simulated: they take the ENGINE'S OUTPUT (rewritten numbering), ACK what arrived in order and
  SACK what did not, so seq/ack/SACK mapping runs in both directions. Loss before and after the
  engine, exact and re-cut retransmissions, reordering, FIN and RST happen too. Timestamps and SACK
  options, IPv4 options and IPv6 extension headers come and go per connection.
* mutants: a recent packet with 1-3 mutations (bit flips, interesting bytes, truncation, trailers,
  field lies in every length/offset/type field, random seq/ack/flags/SACK edges, an inserted
  pattern), then most of the time the checksums are made right again (so the lie passes checksum
  verification), sometimes the TCP checksum is damaged on purpose.
* pure random bytes (with a plausible first byte half of the time).
* crafted one-off packets with random flags, options and SACK blocks; one in a hundred of them is
  a GSO-sized super-packet (up to 65,000 bytes of payload).
* now and then a packet in partial-checksum mode (the TCP field holds only the pseudo-header seed).

Invariants checked on EVERY packet (:func:`check`):

1. ``process`` raises nothing; the verdict is ACCEPT or DROP; DROP carries no packet.
2. A packet that does not parse is accepted untouched with ``unparsed`` in ``packet.REASONS``.
3. Output bytes parse as TCP, with the same version, addresses and ports.
4. Checksums never launder and never break: the output's TCP residual (how far the checksum is from
   verifying, mod 0xFFFF) equals the input's, whatever was edited (payload of any length, seq/ack,
   SACK, header fields), and likewise the IPv4 header checksum. A packet that verified leaves
   verifying; a corrupt one leaves corrupt by exactly the same error. In partial mode the output
   must verify (the seed was completed). Bytes after the IP datagram (link padding) are kept.
5. A grown packet is never larger than ``max(engine.mtu, input length)`` (the engine cuts grown
   segments at an edit boundary rather than exceed the link's MTU); a SYN carrying data is never
   cut (seqadj's rule), so it is exempt.
6. The flow table's books balance: created == active + evicted + expired + ended.

The oracle sample checks 4 again with scapy's own dissection and checksum functions.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from nfrewrite.config.rulefiles import load_rules
from nfrewrite.core.constants import ACCEPT, ACK, DROP, FIN, MAX_VERDICT_PACKET, PSH, RST, SYN
from nfrewrite.core.engine import Engine
from nfrewrite.core.packet import REASONS, TcpPacket, parse
from nfrewrite.core.rules import RuleSet
from nfrewrite.core.seqadj import FlowTable

DEFAULT_COUNT = 1_000_000
ORACLE_EVERY = 200
MAX_REPORTED = 5

RULES = """\
[[rule]]
name = "banner"
match = { sport = [80, 8080] }
replace = [ { find = "Server: nginx", with = "Server: webby" },
            { find_hex = "de ad be ef", with_hex = "ca fe ba be" } ]

[[rule]]
name = "grow"
match = { sport = [80, 8080] }
replace = [ { find = "nginx", with = "a-much-longer-name" } ]

[[rule]]
name = "shrink"
match = { sport = [80, 8080] }
replace = [ { find = "SECRET-TOKEN", with = "X" }, { find = "DELETE-ME", with = "" } ]

[[rule]]
name = "request"
match = { dport = [80, 8080] }
replace = [ { find = "GET /", with = "GET /prefix/" }, { find = "Cookie: ", with = "" },
            { find = "User-Agent: curl", with = "UA: x" }, { find = "HOST", with = "host" } ]

[[rule]]
name = "tiny"
match = { src = ["2001:2::/32", "198.18.0.0/15"], dport = "8000-8100" }
replace = [ { find = "ab", with = "abc" }, { find = "zz", with = "" } ]

[[rule]]
name = "any-port-bytes"
match = { dst = "198.18.0.0/15" }
replace = [ { find_hex = "00 01 02", with_hex = "ff fe fd" } ]

[[rule]]
name = "headers"
match = { dport = 443 }
set = { ttl = 64, hop_limit = 65, dscp = 10, window = 1000, mss_max = 1400 }

[[rule]]
name = "mss"
match = { sport = 443 }
set = { mss = 1200 }

[[rule]]
name = "no-telnet"
match = { dport = 23 }
verdict = "drop"
"""

PATTERNS = (
    b"Server: nginx", b"nginx", b"\xde\xad\xbe\xef", b"SECRET-TOKEN", b"DELETE-ME", b"GET /",
    b"Cookie: ", b"User-Agent: curl", b"HOST", b"ab", b"zz", b"\x00\x01\x02",
)
SERVER_PORTS = (80, 80, 80, 8080, 8000, 8050, 8100, 443, 23, 22)
V4 = (bytes((198, 18, 0, 1)), bytes((198, 18, 0, 2)), bytes((198, 19, 1, 1)), bytes((10, 0, 0, 1)))
V6 = (
    bytes.fromhex("20010002000000000000000000000001"),
    bytes.fromhex("20010002000000000000000000000002"),
    bytes.fromhex("20010db8000000000000000000000009"),
)
INTERESTING = (0, 1, 0x7F, 0x80, 0xFE, 0xFF, 5, 6, 0x40, 0x45, 0x60, 0x0F, 0xF0, 0x11, 44, 43)
_MOD32 = 1 << 32


# -- an independent RFC 1071 sum and a small packet builder ---------------------------------------


def ones_sum(data: bytes | bytearray) -> int:
    """One's-complement 16-bit sum (end-around carry), 0..0xFFFF; not nfrewrite's algorithm."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    words = array("H", bytes(data))
    if sys.byteorder == "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _residual(total: int) -> int:
    return total % 0xFFFF


def tcp_residual(pkt: TcpPacket) -> int:
    """How far the TCP checksum is from verifying (0 = it verifies), by :func:`ones_sum`."""
    buf = bytes(pkt.buf)
    seg = buf[pkt.l4 : pkt.end]
    pseudo = ones_sum(pkt.src) + ones_sum(pkt.dst) + 6 + len(seg)
    return _residual(pseudo + ones_sum(seg))


def ip_residual(pkt: TcpPacket) -> int:
    return _residual(ones_sum(bytes(pkt.buf[: pkt.l4]))) if pkt.version == 4 else 0


def pseudo_seed(pkt: TcpPacket) -> int:
    total = _residual(ones_sum(pkt.src) + ones_sum(pkt.dst) + 6 + pkt.end - pkt.l4)
    return total or 0xFFFF


def fix_checksums(buf: bytearray) -> bool:
    """Make both checksums right if the packet parses as TCP; True if it did."""
    pkt = parse(buf)
    if not isinstance(pkt, TcpPacket):
        return False
    if pkt.version == 4:
        buf[10:12] = b"\0\0"
        buf[10:12] = struct.pack("!H", (~ones_sum(buf[: pkt.l4])) & 0xFFFF)
    c = pkt.l4 + 16
    buf[c : c + 2] = b"\0\0"
    seg = buf[pkt.l4 : pkt.end]
    total = ones_sum(pkt.src) + ones_sum(pkt.dst) + 6 + len(seg) + ones_sum(seg)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    buf[c : c + 2] = struct.pack("!H", (~total) & 0xFFFF)
    return True


def tcp_options(
    mss: int | None = None,
    wscale: int | None = None,
    sack_ok: bool = False,
    ts: tuple[int, int] | None = None,
    sack: list[tuple[int, int]] | tuple[tuple[int, int], ...] = (),
    eol: bool = False,
) -> bytes:
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", 2, 4, mss)
    if wscale is not None:
        out += b"\x01" + struct.pack("!BBB", 3, 3, wscale)
    if sack_ok:
        out += b"\x01\x01\x04\x02"
    if ts is not None:
        out += b"\x01\x01" + struct.pack("!BBII", 8, 10, ts[0] % _MOD32, ts[1] % _MOD32)
    if sack:
        room = (40 - len(out) - 2) // 8
        blocks = list(sack)[: max(room, 0)]
        if blocks:
            out += b"\x01\x01" + bytes((5, 2 + 8 * len(blocks))) + b"".join(
                struct.pack("!II", a % _MOD32, b % _MOD32) for a, b in blocks
            )
    if eol and len(out) < 40:
        out += b"\x00"
    out += b"\x00" * (-len(out) % 4)
    return out[:40]


@dataclass
class Net:
    """Addresses and IP-layer extras of one packet (or of every packet of a connection)."""

    version: int
    src: bytes
    dst: bytes
    ttl: int = 64
    tos: int = 0
    ip_opts: bytes = b""  # IPv4 options (multiple of 4)
    ext: tuple[str, ...] = ()  # IPv6 extension headers: hbh, dst, rt, frag


def build(
    net: Net,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes,
    opts: bytes = b"",
    window: int = 29200,
    ident: int = 0,
) -> bytes:
    """A complete packet with correct checksums (computed by :func:`ones_sum`)."""
    doff = 20 + len(opts)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq % _MOD32, ack % _MOD32, (doff // 4) << 4,
                    flags, window, 0, 0)
    )
    tcp += opts
    tcp += payload
    pseudo = ones_sum(net.src) + ones_sum(net.dst) + 6 + len(tcp)
    total = pseudo + ones_sum(tcp)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    tcp[16:18] = struct.pack("!H", (~total) & 0xFFFF)
    if net.version == 4:
        ihl = 20 + len(net.ip_opts)
        hdr = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl // 4), net.tos, ihl + len(tcp), ident, 0x4000,
                        net.ttl, 6, 0, net.src, net.dst)
        )
        hdr += net.ip_opts
        hdr[10:12] = struct.pack("!H", (~ones_sum(hdr)) & 0xFFFF)
        return bytes(hdr + tcp)
    chain = b""
    kinds = list(net.ext)
    codes = {"hbh": 0, "dst": 60, "rt": 43, "frag": 44}
    for i, kind in enumerate(kinds):
        nh = codes[kinds[i + 1]] if i + 1 < len(kinds) else 6
        if kind in ("hbh", "dst"):
            chain += bytes((nh, 0, 1, 4, 0, 0, 0, 0))  # PadN
        elif kind == "rt":
            chain += bytes((nh, 2, 0, 0, 0, 0, 0, 0)) + V6[2]  # type 0, segments left 0
        else:
            chain += bytes((nh, 0, 0, 0)) + struct.pack("!I", ident)  # atomic fragment
    first = codes[kinds[0]] if kinds else 6
    hdr6 = struct.pack("!IHBB16s16s", (6 << 28) | (net.tos << 20) | ident % (1 << 20),
                       len(chain) + len(tcp), first, net.ttl, net.src, net.dst)
    return hdr6 + chain + bytes(tcp)


def random_net(rng: random.Random, swap: bool = False) -> Net:
    if rng.random() < 0.55:
        src, dst = rng.sample(V4, 2)
        opts = rng.choice((b"", b"", b"", b"\x01\x01\x01\x01", b"\x94\x04\x00\x00"))
        return Net(4, src, dst, rng.randint(1, 255), rng.randrange(256), opts)
    src, dst = rng.sample(V6, 2)
    kinds = ("hbh", "dst", "rt", "frag")
    ext = tuple(rng.choice(kinds) for _ in range(rng.choice((0, 0, 0, 1, 2))))
    if "hbh" in ext:
        ext = ("hbh",) + tuple(e for e in ext if e != "hbh")  # hop-by-hop must come first
    return Net(6, src, dst, rng.randint(1, 255), rng.randrange(256), b"", ext)


def reverse(net: Net) -> Net:
    return Net(net.version, net.dst, net.src, net.ttl, net.tos, net.ip_opts, net.ext)


def random_payload(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        r = rng.random()
        if r < 0.35:
            out += rng.choice(PATTERNS)
        elif r < 0.5:
            p = rng.choice(PATTERNS)
            cut = rng.randrange(1, len(p)) if len(p) > 1 else 1
            out += p[:cut] if rng.random() < 0.5 else p[cut:]
        elif r < 0.8:
            out += b"x" * rng.randint(1, 30)
        else:
            out += rng.randbytes(rng.randint(1, 20))
    return bytes(out[:size])


# -- conversations ---------------------------------------------------------------------------------


def _sdiff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed number."""
    return (a - b + (1 << 31)) % _MOD32 - (1 << 31)


@dataclass
class Receiver:
    """What the receiving end of one direction holds, in the numbering it sees (rewritten)."""

    nxt: int | None = None
    ooo: list[tuple[int, int]] = field(default_factory=list)  # (start, end), relative to nxt base
    fin: bool = False

    def take(self, seq: int, length: int, flags: int) -> None:
        if flags & SYN:
            self.nxt = (seq + 1) % _MOD32
            self.ooo.clear()
            seq = self.nxt
        if self.nxt is None:
            return
        end = _sdiff(seq + length, self.nxt)
        start = _sdiff(seq, self.nxt)
        if length and start > 0:
            self.ooo.append((start, end))
            self.ooo = self.ooo[-4:]
            return
        if end > 0:
            self.nxt = (self.nxt + end) % _MOD32
            moved = end
            self.ooo = [(a - moved, b - moved) for a, b in self.ooo]
            changed = True
            while changed:
                changed = False
                for a, b in list(self.ooo):
                    if a <= 0:
                        self.ooo.remove((a, b))
                        if b > 0:
                            self.nxt = (self.nxt + b) % _MOD32
                            self.ooo = [(x - b, y - b) for x, y in self.ooo]
                            changed = True
                            break
        if flags & FIN and end >= 0 and not self.fin:
            self.nxt = (self.nxt + 1) % _MOD32
            self.fin = True

    def sack(self) -> list[tuple[int, int]]:
        if self.nxt is None:
            return []
        return [((self.nxt + a) % _MOD32, (self.nxt + b) % _MOD32) for a, b in self.ooo if b > 0]


class Conn:
    """One TCP connection, both ends simulated; direction 0 is client -> server."""

    def __init__(self, rng: random.Random, cport: int) -> None:
        self.rng = rng
        self.sport = rng.choice(SERVER_PORTS)
        self.ports = ((cport, self.sport), (self.sport, cport))
        net = random_net(rng)
        self.nets = (net, reverse(net))
        self.isn = (rng.getrandbits(32), rng.getrandbits(32))
        if rng.random() < 0.1:  # near the wrap
            self.isn = ((1 << 32) - rng.randint(1, 3000), self.isn[1])
        self.data = (random_payload(rng, rng.randint(10, 600)),
                     random_payload(rng, rng.randint(0, 4000)))
        self.mss = rng.choice((4, 16, 64, 200, 536, 1400))
        self.ts = rng.random() < 0.5
        self.sack_ok = rng.random() < 0.6
        self.sent = [0, 0]
        self.rcv = (Receiver(), Receiver())  # rcv[d]: the receiver of direction d
        self.state = 0  # 0 SYN, 1 SYN-ACK, 2 data, 3 closing, 4 done
        self.fin_sent = [False, False]
        self.clock = rng.getrandbits(32)

    @property
    def done(self) -> bool:
        return self.state >= 4

    def _opts(self, d: int, syn: bool = False) -> bytes:
        self.clock += 1
        ts = (self.clock, self.clock - 7) if self.ts else None
        if syn:
            return tcp_options(mss=1460, wscale=7, sack_ok=self.sack_ok, ts=ts)
        sack = self.rcv[1 - d].sack() if self.sack_ok else []
        return tcp_options(ts=ts, sack=sack)

    def _seg(self, d: int, start: int, end: int, flags: int) -> bytes:
        seq = self.isn[d] + 1 + start
        ack_nxt = self.rcv[1 - d].nxt
        if ack_nxt is not None:
            flags |= ACK
        return build(self.nets[d], *self.ports[d], seq, ack_nxt or 0, flags,
                     self.data[d][start:end], self._opts(d))

    def next_packet(self) -> tuple[int, bytes]:
        """(direction, packet) of the next thing one of the ends sends."""
        rng = self.rng
        if self.state == 0:
            self.state = 1
            return 0, build(self.nets[0], *self.ports[0], self.isn[0], 0, SYN, b"",
                            self._opts(0, syn=True))
        if self.state == 1:
            self.state = 2
            return 1, build(self.nets[1], *self.ports[1], self.isn[1], self.isn[0] + 1, SYN | ACK,
                            b"", self._opts(1, syn=True))
        d = 0 if self.sent[0] < len(self.data[0]) and rng.random() < 0.7 else rng.randrange(2)
        r = rng.random()
        if r < 0.01:
            self.state = 4
            return d, self._seg(d, self.sent[d], self.sent[d], RST)
        if r < 0.15 and self.sent[d]:  # retransmission, maybe cut differently
            a = rng.randrange(self.sent[d])
            b = min(self.sent[d], a + rng.randint(1, self.mss))
            if rng.random() < 0.5:  # keep the original cut
                a -= a % self.mss
                b = min(self.sent[d], a + self.mss)
            return d, self._seg(d, a, b, PSH)
        if r < 0.3:  # a bare ACK (maybe a SACK) from this end
            return d, self._seg(d, self.sent[d], self.sent[d], 0)
        if self.sent[d] < len(self.data[d]):
            a = self.sent[d]
            b = min(len(self.data[d]), a + self.mss)
            self.sent[d] = b
            return d, self._seg(d, a, b, PSH)
        if not self.fin_sent[d]:
            self.fin_sent[d] = True
            return d, self._seg(d, self.sent[d], self.sent[d], FIN)
        if self.fin_sent[0] and self.fin_sent[1]:
            self.state = 3 if self.state == 2 else 4
            pkt = self._seg(d, self.sent[d] + 1, self.sent[d] + 1, 0)
            return d, pkt
        return d, self._seg(d, self.sent[d], self.sent[d], FIN)

    def deliver(self, d: int, data: bytes) -> None:
        """The bytes the engine let through reach the receiver of direction ``d``."""
        pkt = parse(data)
        if isinstance(pkt, TcpPacket):
            self.rcv[d].take(pkt.seq, pkt.payload_len, pkt.flags)


# -- mutation --------------------------------------------------------------------------------------


def mutate(rng: random.Random, base: bytes) -> bytes:
    buf = bytearray(base)
    for _ in range(rng.randint(1, 3)):
        if not buf:
            break
        op = rng.randrange(10)
        n = len(buf)
        if op == 0:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[rng.randrange(n)] = rng.choice(INTERESTING)
        elif op == 2:
            del buf[rng.randrange(n + 1) :]
        elif op == 3:
            buf += rng.randbytes(rng.randint(1, 16))
        elif op in (4, 5):
            _lie(rng, buf)
        elif op == 6:
            pkt = parse(buf)
            if isinstance(pkt, TcpPacket):
                off = pkt.l4 + rng.choice((4, 8, 12, 13))
                if off in (pkt.l4 + 12, pkt.l4 + 13):
                    buf[pkt.l4 + 13] = rng.randrange(256)
                else:
                    buf[off : off + 4] = rng.randbytes(4)
        elif op == 7:
            pkt = parse(buf)
            if isinstance(pkt, TcpPacket):
                opt = pkt.find_option(5)
                if opt is not None and opt.length > 2:
                    i = opt.offset + 2 + rng.randrange(opt.length - 2)
                    buf[i] = rng.randrange(256)
                elif pkt.doff > 20:
                    buf[pkt.l4 + 20 + rng.randrange(pkt.doff - 20)] = rng.randrange(256)
        elif op == 8:
            pkt = parse(buf)
            if isinstance(pkt, TcpPacket):
                at = pkt.payload_offset + rng.randint(0, pkt.payload_len)
                pat = rng.choice(PATTERNS)
                buf[at:at] = pat
                _grow_lengths(buf, pkt, len(pat))
        else:
            i = rng.randrange(n)
            buf[i : i + 2] = rng.randbytes(2)
    if rng.random() < 0.6:
        fix_checksums(buf)
    if rng.random() < 0.1:
        pkt = parse(buf)
        if isinstance(pkt, TcpPacket):
            buf[pkt.l4 + 16] ^= rng.randint(1, 255)
    return bytes(buf)


def _grow_lengths(buf: bytearray, pkt: TcpPacket, by: int) -> None:
    if pkt.version == 4:
        struct.pack_into("!H", buf, 2, (struct.unpack_from("!H", buf, 2)[0] + by) & 0xFFFF)
    else:
        struct.pack_into("!H", buf, 4, (struct.unpack_from("!H", buf, 4)[0] + by) & 0xFFFF)


def _lie(rng: random.Random, buf: bytearray) -> None:
    """Make one header field say something untrue (lengths, offsets, types, fragments)."""
    n = len(buf)
    version = buf[0] >> 4
    choice = rng.randrange(8)
    if choice == 0:
        buf[0] = (rng.choice((4, 6, rng.randrange(16))) << 4) | (buf[0] & 0x0F)
    elif version == 4 and n >= 20:
        if choice == 1:
            buf[0] = 0x40 | rng.randrange(16)
        elif choice == 2:
            total = rng.choice((0, n - 1, n + 1, rng.randrange(65536), n))
            struct.pack_into("!H", buf, 2, total & 0xFFFF)
        elif choice == 3:
            buf[6] = rng.choice((0x20, 0x00, 0x40, 0x01, rng.randrange(256)))
            buf[7] = rng.choice((0, 0, 1, rng.randrange(256)))
        elif choice == 4:
            buf[9] = rng.choice((6, 17, 1, rng.randrange(256)))
        else:
            _lie_tcp(rng, buf)
    elif version == 6 and n >= 40:
        if choice == 1:
            plen = rng.choice((0, n - 40 - 1, n - 39, rng.randrange(65536)))
            struct.pack_into("!H", buf, 4, plen & 0xFFFF)
        elif choice == 2:
            buf[6] = rng.choice((0, 43, 44, 60, 6, 17, 59, rng.randrange(256)))
        elif choice == 3 and n > 42:
            buf[40 + rng.randrange(min(8, n - 40))] = rng.choice(INTERESTING)
        else:
            _lie_tcp(rng, buf)


def _lie_tcp(rng: random.Random, buf: bytearray) -> None:
    pkt = parse(buf)
    if not isinstance(pkt, TcpPacket):
        return
    l4 = pkt.l4
    if rng.random() < 0.5:
        buf[l4 + 12] = (rng.randrange(16) << 4) | (buf[l4 + 12] & 0x0F)
    elif pkt.doff > 20:
        i = l4 + 20 + rng.randrange(pkt.doff - 20)
        buf[i] = rng.choice((0, 1, 2, 3, 4, 5, 8, 255, 40, 10, rng.randrange(256)))


def crafted(rng: random.Random) -> bytes:
    """A one-off packet: random flags, options, SACK blocks; now and then a super-packet, some
    of them within a few bytes of the 65,535-byte limit (where a growing edit cannot fit)."""
    net = random_net(rng)
    opts = tcp_options(mss=rng.choice((None, 1460, 9000)), wscale=rng.choice((None, 7)),
                       sack_ok=rng.random() < 0.3, ts=(1, 2) if rng.random() < 0.5 else None,
                       sack=[(rng.getrandbits(32), rng.getrandbits(32))
                             for _ in range(rng.randint(0, 4))],
                       eol=rng.random() < 0.2)
    payload = bytearray(random_payload(rng, rng.randint(0, 1600)))
    if rng.random() < 0.01:
        headers = len(build(net, 1, 1, 0, 0, 0, b"", opts))
        most = 0xFFFF - (headers if net.version == 4 else headers - 40)
        size = rng.choice((rng.randint(300, most), most - rng.randint(0, 40)))
        payload = bytearray(b"x" * size)  # a few patterns, not thousands
        for _ in range(rng.randint(1, 3)):
            pattern = rng.choice(PATTERNS)
            at = rng.randrange(size - len(pattern))
            payload[at : at + len(pattern)] = pattern
    raw = build(net, rng.randrange(65536), rng.choice(SERVER_PORTS), rng.getrandbits(32),
                rng.getrandbits(32), rng.randrange(256), bytes(payload), opts)
    if rng.random() < 0.2:  # link padding after the datagram
        raw += bytes(rng.randint(1, 300))
    return raw


def random_bytes(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 19, 20, 21, 39, 40, 41, 60, rng.randrange(200)))
    buf = bytearray(rng.randbytes(size))
    if buf and rng.random() < 0.5:
        buf[0] = rng.choice((0x45, 0x46, 0x4F, 0x60, 0x44))
        if len(buf) > 9 and buf[0] >> 4 == 4:
            buf[9] = 6
        if len(buf) > 6 and buf[0] >> 4 == 6:
            buf[6] = 6
    return bytes(buf)


def partial(data: bytes) -> bytes | None:
    """The packet as TX offload hands it over: the TCP field holds only the pseudo-header seed."""
    pkt = parse(data)
    if not isinstance(pkt, TcpPacket):
        return None
    buf = bytearray(data)
    struct.pack_into("!H", buf, pkt.l4 + 16, pseudo_seed(pkt))
    return bytes(buf)


# -- invariants ------------------------------------------------------------------------------------


@dataclass
class Stats:
    packets: int = 0
    modified: int = 0
    dropped: int = 0
    tracked: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    unparsed: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    corrupt_in: int = 0
    corrupt_modified: int = 0
    length_changed: int = 0
    oracle_checked: int = 0
    oracle_skipped: int = 0
    engine_seconds: float = 0.0  # inside Engine.process only


def check(  # noqa: C901 - the invariants in order; the first one broken is the answer
    data: bytes, res: object, csum_partial: bool, stats: Stats, mtu: int = 1500
) -> str | None:
    """The invariants for one packet; a description of the first one broken, or None."""
    from nfrewrite.core.engine import Result

    if not isinstance(res, Result):
        return f"process returned {res!r}, not a Result"
    if res.verdict not in (ACCEPT, DROP):
        return f"verdict {res.verdict!r}"
    if res.verdict == DROP:
        stats.dropped += 1
        if res.packet is not None:
            return "a DROP verdict carries a packet"
    for name in res.rules:
        stats.rules[name] += 1
    if res.track:
        stats.tracked += 1
    pin = parse(data, csum_partial=csum_partial)
    if not isinstance(pin, TcpPacket):
        if res.unparsed != pin.reason:
            return f"unparsed {res.unparsed!r}, but parse says {pin.reason!r}"
        if res.unparsed not in REASONS:
            return f"unparsed reason {res.unparsed!r} not in packet.REASONS"
        stats.unparsed[res.unparsed] += 1
        if res.packet is not None or res.verdict != ACCEPT:
            return "an unparsed packet was not passed untouched"
        return None
    if res.unparsed is not None:
        return f"a TCP packet reported unparsed {res.unparsed!r}"
    in_tcp = tcp_residual(pin)
    if in_tcp and not csum_partial:
        stats.corrupt_in += 1
    if res.packet is None:
        return None
    stats.modified += 1
    out = parse(res.packet)
    if not isinstance(out, TcpPacket):
        return f"output does not parse as TCP: {out!r}"
    if (out.version, out.src, out.dst, out.sport, out.dport) != (
        pin.version, pin.src, pin.dst, pin.sport, pin.dport
    ):
        return "output changed version, addresses or ports"
    if res.packet[out.end :] != data[pin.end :]:
        return "bytes after the IP datagram changed"
    if out.end - out.l4 != pin.end - pin.l4:
        stats.length_changed += 1
    # a packet that fits the MTU must still fit after; a longer one is a GSO super-packet (the
    # kernel segments it), which may grow to what a verdict carries back
    limit = max(mtu, len(data)) if pin.end <= mtu else MAX_VERDICT_PACKET
    if len(res.packet) > limit and not pin.flags & SYN:
        return f"grew to {len(res.packet)} bytes, more than {limit} ({len(data)} in, MTU {mtu})"
    out_tcp = tcp_residual(out)
    if csum_partial:
        if out_tcp:
            return f"partial mode: output TCP checksum is off by {out_tcp:#06x}"
    elif out_tcp != in_tcp:
        return f"TCP checksum residual {in_tcp:#06x} in, {out_tcp:#06x} out"
    if in_tcp and not csum_partial:
        stats.corrupt_modified += 1
    if ip_residual(out) != ip_residual(pin):
        return f"IPv4 header residual {ip_residual(pin):#06x} in, {ip_residual(out):#06x} out"
    return None


def oracle(data: bytes, out: bytes, csum_partial: bool) -> str | None:
    """Invariant 4 again, by scapy's dissection and checksum functions, and scapy's residuals
    must equal :func:`tcp_residual`/:func:`ip_residual` (the verifier used on every packet)."""
    from scapy.layers.inet import IP, TCP, in4_chksum
    from scapy.layers.inet6 import IPv6, in6_chksum
    from scapy.packet import Packet, Padding
    from scapy.utils import checksum

    def segment(tcp: Packet) -> bytes:
        seg = bytes(tcp)
        pad = tcp.getlayer(Padding)
        return seg[: len(seg) - len(pad.load)] if pad is not None else seg

    def residuals(raw: bytes) -> tuple[int, int]:
        if raw[0] >> 4 == 4:
            ip = IP(raw)
            tcp = (~in4_chksum(6, ip, segment(ip[TCP])) & 0xFFFF) % 0xFFFF
            hdr = (~checksum(raw[: ip.ihl * 4]) & 0xFFFF) % 0xFFFF
            return tcp, hdr
        tcp6 = IPv6(raw)[TCP]
        value = int(in6_chksum(6, tcp6.underlayer, segment(tcp6)))  # type: ignore[no-untyped-call]
        return (~value & 0xFFFF) % 0xFFFF, 0

    tcp_in, ip_in = residuals(data)
    tcp_out, ip_out = residuals(out)
    for raw, mode, (tcp_r, ip_r) in ((data, csum_partial, (tcp_in, ip_in)),
                                     (out, False, (tcp_out, ip_out))):
        pkt = parse(raw, csum_partial=mode)
        assert isinstance(pkt, TcpPacket)
        if (tcp_residual(pkt), ip_residual(pkt)) != (tcp_r, ip_r):
            return (f"scapy and this file's verifier disagree: scapy {tcp_r:#06x}/{ip_r:#06x}, "
                    f"ours {tcp_residual(pkt):#06x}/{ip_residual(pkt):#06x}")
    if csum_partial:
        if tcp_out:
            return f"scapy: partial-mode output TCP checksum off by {tcp_out:#06x}"
    elif tcp_out != tcp_in:
        return f"scapy: TCP residual {tcp_in:#06x} in, {tcp_out:#06x} out"
    if ip_out != ip_in:
        return f"scapy: IPv4 header residual {ip_in:#06x} in, {ip_out:#06x} out"
    return None


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Violation:
    index: int
    what: str
    packet: bytes
    csum_partial: bool


@dataclass
class Report:
    seed: int
    count: int
    seconds: float
    stats: Stats
    flows: dict[str, int]
    violations: list[Violation]

    @property
    def rate(self) -> float:
        return self.stats.packets / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        s = self.stats
        lines = [
            f"fuzz: seed {self.seed}: {s.packets} packets in {self.seconds:.1f} s "
            f"({self.rate:,.0f} packets/s with generation and checks; Engine.process alone "
            f"{s.packets / max(s.engine_seconds, 1e-9):,.0f} packets/s)",
            f"  inputs: {dict(sorted(s.kinds.items()))}",
            f"  modified {s.modified} (length changed {s.length_changed}), dropped {s.dropped}, "
            f"tracked {s.tracked}, corrupt in {s.corrupt_in} (of which modified "
            f"{s.corrupt_modified})",
            f"  unparsed: {dict(sorted(s.unparsed.items()))}",
            f"  rules fired: {dict(sorted(s.rules.items()))}",
            f"  flows: {self.flows}",
            f"  scapy oracle: {s.oracle_checked} checked, {s.oracle_skipped} not dissectable",
            f"  violations: {len(self.violations)}",
        ]
        for v in self.violations[:MAX_REPORTED]:
            lines += [
                f"VIOLATION at packet {v.index} (csum_partial={v.csum_partial}): {v.what}",
                f"  packet ({len(v.packet)} bytes): {_hex(v.packet)}",
                f"  reproduce: python -m tests.fuzz --seed {self.seed} --count {v.index + 1}",
            ]
        return "\n".join(lines)


def _hex(data: bytes, most: int = 4096) -> str:
    text = data.hex()
    return text if len(text) <= most else text[:most] + "... (the rest: run the reproducer)"


def load_fuzz_rules() -> RuleSet:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "fuzz.toml").write_text(RULES)
        ruleset, diagnostics = load_rules(d)
    if ruleset is None:
        raise SystemExit("\n".join(x.format() for x in diagnostics))
    return ruleset


def run(  # noqa: C901 - one loop whose state every step reads (connections, recent packets, clock)
    count: int = DEFAULT_COUNT, seed: int = 1, oracle_every: int = ORACLE_EVERY,
    max_violations: int = 20,
) -> Report:
    """Feed ``count`` packets through one Engine; check every invariant on every packet."""
    rng = random.Random(seed)
    # a small table (evictions); odd seeds also give it a tiny memory budget (refusals)
    flows = FlowTable(max_flows=128, idle_timeout=30.0, close_grace=2.0,
                      memory=64 << 10 if seed % 2 else 64 << 20)
    engine = Engine(load_fuzz_rules(), flows)
    stats = Stats()
    violations: list[Violation] = []
    recent: deque[bytes] = deque(maxlen=512)
    conns: list[Conn] = []
    next_port = 1024
    now = 0.0
    start = time.perf_counter()
    while stats.packets < count:
        index = stats.packets
        now += 0.001
        if rng.random() < 0.0001:
            now += rng.choice((3.0, 40.0))  # let ended and idle flows expire
        while len(conns) < 24:
            next_port = next_port + 1 if next_port < 65535 else 1024
            conns.append(Conn(rng, next_port))
        r = rng.random()
        conn: Conn | None = None
        direction = 0
        if r < 0.6:
            kind = "stream"
            conn = rng.choice(conns)
            direction, data = conn.next_packet()
            if conn.done:
                conns.remove(conn)
            if rng.random() < 0.03:
                continue  # lost before it reached us
            if rng.random() < 0.03:  # corrupted on the way to us
                buf = bytearray(data)
                pkt = parse(buf)
                if isinstance(pkt, TcpPacket):
                    buf[pkt.l4 + 16] ^= rng.randint(1, 255)
                data = bytes(buf)
            recent.append(data)
        elif r < 0.9 and recent:
            kind = "mutant"
            data = mutate(rng, rng.choice(recent))
        elif r < 0.95:
            kind = "random"
            data = random_bytes(rng)
        else:
            kind = "crafted"
            data = crafted(rng)
            recent.append(data)
        csum_partial = False
        if rng.random() < 0.02:
            seeded = partial(data)
            if seeded is not None:
                data, csum_partial = seeded, True
        stats.packets += 1
        stats.kinds[kind] += 1
        try:
            t0 = time.perf_counter()
            res = engine.process(data, now=now, csum_partial=csum_partial)
            stats.engine_seconds += time.perf_counter() - t0
            what = check(data, res, csum_partial, stats, engine.mtu)
            if what is None and res.packet is not None and stats.modified % oracle_every == 0:
                try:
                    what = oracle(data, res.packet, csum_partial)
                    stats.oracle_checked += 1
                except Exception:  # noqa: BLE001 - what scapy cannot dissect is counted, skipped
                    stats.oracle_skipped += 1
        except Exception:  # noqa: BLE001 - any exception out of the engine is a finding
            what = "exception:\n" + traceback.format_exc()
            res = None
        if what is not None:
            violations.append(Violation(index, what, data, csum_partial))
            if len(violations) >= max_violations:
                break
        lost = rng.random() < 0.03  # lost after us
        if conn is not None and res is not None and res.verdict == ACCEPT and not lost:
            conn.deliver(direction, res.packet if res.packet is not None else data)
        if index % 4096 == 0:
            books = flows.stats()
            if books["flows_created"] != (books["flows_active"] + books["flows_evicted"]
                                          + books["flows_expired"] + books["flows_ended"]):
                violations.append(Violation(index, f"flow table books: {books}", data, False))
    seconds = time.perf_counter() - start
    return Report(seed, count, seconds, stats, flows.stats(), violations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="packets (default 1e6)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    parser.add_argument("--oracle-every", type=int, default=ORACLE_EVERY,
                        help=f"check one output in K with scapy (default {ORACLE_EVERY})")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    report = run(args.count, seed, args.oracle_every)
    print(report.summary())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
