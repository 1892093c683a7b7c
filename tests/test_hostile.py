"""Hostile packets end to end: crafted frames through the appliance, captured at the server.

The client namespace sends frames built with scapy (raw AF_PACKET on its eth0, the server's MAC
as destination) through the appliance's bridge, where ``nfrewrite run`` has two rules: dport 8080
same-length ``secret`` -> ``SECRET`` (kernel prefilter: an xt string match), dport 8081
length-changing ``grow`` -> ``GROWN!!`` (every packet to that port queued). A raw AF_PACKET
sniffer on the server's eth0 records every frame that arrives from the client's MAC (before the
server's IP stack, whose TCP input is made to drop everything so that it never answers). For each
case the test asserts the exact frames that arrived, byte for byte, and the exact moves of
``nfrewrite_packets_seen_total``, ``..._modified_total`` and ``..._unparsed_total{reason}``
(scraped from inside the appliance before and after each case).

What this kernel does before our hook (measured here, asserted per case):

* br_netfilter validates IPv4/IPv6 headers before any hook (``br_validate_ipv4/6``): a wrong IPv4
  header checksum, IHL < 5, a total length beyond the frame or below the IHL, an IPv6 payload
  length beyond the frame: **dropped** (never reach the queue, never arrive). A total/payload
  length *shorter* than the frame: the frame is **trimmed** to it and goes on (the queue sees the
  trimmed packet; so does the server). IPv4 options are *not* parsed there: even an overrunning
  option passes (and we rewrite the segment behind it).
* Our chains make conntrack active in the namespace, so its defrag runs before our hook: a whole
  fragmented IPv4 datagram is reassembled (we see and rewrite it whole, even a pattern split
  across the fragment boundary) and the bridge refragments it at the largest fragment size it
  received; a lone first or later fragment is held until it expires and never forwarded; an IPv6
  atomic fragment arrives without its fragment header (nf_defrag_ipv6 strips it). A non-last IPv6
  fragment whose length is not a multiple of 8 is refused by defrag and reaches us as a fragment
  (reason ``fragment``). So through the bridge, ``truncated_ip``, ``bad_ip_version``, ``bad_ihl``
  and ``bad_total_length`` cannot reach the queue at all.
* The queue rules' ``tcp dport`` (nf_tables payload match) does not match when the port cannot
  be read (2 bytes of TCP), is read at the wrong place (an IHL lie with a valid checksum) or the
  IPv6 extension chain cannot be walked (an overrunning header): such packets pass the kernel
  unqueued and arrive untouched.
* Several segments of a *new* connection sent back to back are each queued with their own
  unconfirmed conntrack entry and the later ones are dropped when conntrack confirms them
  (``insert_failed`` and ``drop`` in /proc/net/stat/nf_conntrack; measured: 2 of 3, every time;
  asserted: whatever is missing is exactly what conntrack counts). The overlapping and
  out-of-window cases are therefore sent 0.1 s apart. Real connections start with a lone SYN and
  never see this (connections already open when the daemon first loads conntrack in a namespace
  are picked up mid-stream and could, by the same mechanism, lose a burst's later segments to
  retransmission once: inferred, not measured here).

What reaches the queue is passed untouched when it is not a whole, well-formed first TCP segment,
counted by reason (``truncated_tcp``, ``bad_data_offset``, ``bad_tcp_options``, ``fragment``,
``not_tcp``, ``bad_ext_header``); well-formed segments (urgent data, SYN with payload, IPv4 options,
IPv6 extension chains, overlapping and out-of-window segments, a wrong TCP checksum that is carried
through, never laundered) are rewritten exactly as the rules say. Afterwards the daemon is up, no
worker restarted, no handler error counted, and normal connections are rewritten.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from lab.netns import Daemon, Lab, LabError, Role, read_line, tcp_exchange, write_lab_config

pytestmark = pytest.mark.privileged

RULES = """
[[rule]]
name = "same"
match = { dport = 8080 }
replace = [ { find = "secret", with = "SECRET" } ]

[[rule]]
name = "grow"
match = { dport = 8081 }
replace = [ { find = "grow", with = "GROWN!!" } ]
"""
SAME, GROW = 8080, 8081

#: In the client ns: read hex frames (one per line) from stdin, send each on eth0, answer "sent".
SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
print("READY", flush=True)
for line in sys.stdin:
    gap, *frames = line.split()
    for frame in frames:
        s.send(bytes.fromhex(frame))
        time.sleep(float(gap))
    print("sent", flush=True)
"""

#: In the server ns: every frame that eth0 receives from the client's MAC (argv[1]), except ARP
#: and ICMPv6; on a line "flush" on stdin prints them (a JSON list of hex) and starts over.
SNIFFER = r"""
import json, select, socket, sys
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
print("READY", flush=True)
got = []
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if s in r:
        frame, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING or frame[6:12] != mac:
            continue
        if frame[12:14] == b"\x08\x06":
            continue
        if frame[12:14] == b"\x86\xdd" and frame[20] == 58:
            continue
        if frame[12:14] == b"\x86\xdd" and frame[20] == 0 and frame[54:55] == b"\x3a":
            continue  # MLD report (ICMPv6 behind a hop-by-hop header): the kernel's own, late
        got.append(frame.hex())
    if sys.stdin in r:
        line = sys.stdin.readline()
        if not line:
            break
        print(json.dumps(got), flush=True)
        got = []
"""

#: In the appliance ns: on each line on stdin, GET /metrics and print it as one JSON string.
SCRAPER = r"""
import json, sys, urllib.request
o = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for line in sys.stdin:
    print(json.dumps(o.open("http://127.0.0.1:9640/metrics", timeout=5).read().decode()),
          flush=True)
"""


def _started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    line = read_line(proc, 10)
    if line.strip() != b"READY":
        proc.kill()
        raise LabError(f"helper did not start: {line!r} {proc.communicate()[1]!r}")
    return proc


def _ask(proc: subprocess.Popen[bytes], line: str, timeout: float = 10) -> bytes:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    answer = read_line(proc, timeout)
    if not answer.endswith(b"\n"):
        raise LabError(f"no answer to {line[:40]!r}: {answer!r}")
    return answer


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@dataclass
class Observed:
    arrived: list[bytes]
    seen: int
    modified: int
    unparsed: dict[str, int] = field(default_factory=dict)


class Rig:
    """Persistent sender (client), sniffer (server) and scraper (appliance) for one lab."""

    def __init__(self, lab: Lab) -> None:
        env = lab.python_env()
        self.client_mac = self._mac(lab, "client")
        self.server_mac = self._mac(lab, "server")
        self.sniffer = _started(lab.popen("server", [sys.executable, "-c", SNIFFER,
                                                     self.client_mac], stdin=subprocess.PIPE,
                                          env=env))
        self.sender = _started(lab.popen("client", [sys.executable, "-c", SENDER],
                                         stdin=subprocess.PIPE, env=env))
        self.scraper = lab.popen("appliance", [sys.executable, "-c", SCRAPER],
                                 stdin=subprocess.PIPE, env=env)

    @staticmethod
    def _mac(lab: Lab, role: Role) -> str:
        out = lab.run(role, ["ip", "-j", "link", "show", "eth0"]).stdout
        return str(json.loads(out)[0]["address"])

    def scrape(self) -> Samples:
        return _samples(json.loads(_ask(self.scraper, "get")))

    def send(self, frames: list[bytes], want: int, gap: float = 0.0) -> Observed:
        """Send; collect what arrives until ``want`` frames did (or 3 s passed), then 0.2 s more
        for anything unexpected (0.3 s in all when nothing should arrive)."""
        before = self.scrape()
        _ask(self.sender, " ".join([str(gap), *(f.hex() for f in frames)]))
        arrived: list[bytes] = []
        deadline = time.monotonic() + 3.0
        time.sleep(0.1)
        while len(arrived) < want and time.monotonic() < deadline:
            arrived += [bytes.fromhex(h) for h in json.loads(_ask(self.sniffer, "flush"))]
            time.sleep(0.02)
        time.sleep(0.2)
        arrived += [bytes.fromhex(h) for h in json.loads(_ask(self.sniffer, "flush"))]
        after = self.scrape()

        def moved(name: str, **labels: str) -> int:
            k = (name, frozenset(labels.items()))
            return int(after.get(k, 0) - before.get(k, 0))

        from nfrewrite.core.packet import REASONS

        unparsed = {r: moved("nfrewrite_packets_unparsed_total", queue="0", reason=r)
                    for r in REASONS}
        return Observed(
            arrived=arrived,
            seen=moved("nfrewrite_packets_seen_total", queue="0"),
            modified=moved("nfrewrite_packets_modified_total", queue="0"),
            unparsed={r: n for r, n in unparsed.items() if n},
        )


# -- building frames --------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Frames:
    """Crafted frames client -> server (scapy builds them; the lies are patched in after)."""

    def __init__(self, lab: Lab, rig: Rig) -> None:
        from scapy.layers.l2 import Ether

        self.eth = Ether(src=rig.client_mac, dst=rig.server_mac)
        self.lab = lab
        self.n = 0

    def _ident(self) -> int:
        self.n += 1
        return 0x4E00 + self.n

    def v4(self, dport: int, payload: bytes = b"", *, flags: str = "PA", seq: int = 1000,
           urgptr: int = 0, options: bytes = b"", ip_options: bytes = b"",
           sport: int | None = None) -> bytearray:
        from scapy.layers.inet import IP, TCP
        from scapy.packet import Raw

        ident = self._ident()
        ip = IP(src=self.lab.client_v4, dst=self.lab.server_v4, id=ident)
        tcp = TCP(sport=sport or 20000 + self.n, dport=dport, flags=flags, seq=seq, ack=1,
                  urgptr=urgptr, options=[])
        pkt = self.eth / ip / tcp
        if payload:
            pkt = pkt / Raw(payload)
        raw = bytearray(bytes(pkt))
        if options:
            raw = self._tcp_options_v4(raw, options)
        if ip_options:  # raw bytes (a multiple of 4) after the 20-byte header
            raw[34:34] = ip_options
            raw[14] = 0x40 | (20 + len(ip_options)) // 4
            self.fix_v4(raw)
        return raw

    @staticmethod
    def _tcp_options_v4(raw: bytearray, options: bytes) -> bytearray:
        """Insert raw TCP option bytes (a multiple of 4), fixing doff, lengths and checksums."""
        ihl = (raw[14] & 0x0F) * 4
        l4 = 14 + ihl
        raw[l4 + 20:l4 + 20] = options
        raw[l4 + 12] = ((20 + len(options)) // 4) << 4 | (raw[l4 + 12] & 0x0F)
        Frames.fix_v4(raw)
        return raw

    @staticmethod
    def fix_v4(raw: bytearray, *, tcp: bool = True, total: int | None = None) -> bytearray:
        """Set the IPv4 total length (to ``total`` or the frame's), the header checksum and
        (``tcp``) the TCP checksum over what the header claims."""
        ihl = (raw[14] & 0x0F) * 4
        tot = len(raw) - 14 if total is None else total
        raw[16:18] = tot.to_bytes(2, "big")
        raw[24:26] = b"\0\0"
        raw[24:26] = _csum(bytes(raw[14:14 + ihl])).to_bytes(2, "big")
        if tcp:
            l4 = 14 + ihl
            seg = bytearray(raw[l4:14 + tot])
            if len(seg) >= 18:
                seg[16:18] = b"\0\0"
                pseudo = bytes(raw[26:34]) + b"\0\x06" + len(seg).to_bytes(2, "big")
                raw[l4 + 16:l4 + 18] = _csum(pseudo + bytes(seg)).to_bytes(2, "big")
        return raw

    def v6(self, dport: int, payload: bytes = b"", *, ext: list[object] | None = None,
           flags: str = "PA", seq: int = 1000) -> bytearray:
        from scapy.layers.inet import TCP
        from scapy.layers.inet6 import IPv6
        from scapy.packet import Raw

        ident = self._ident()
        pkt = IPv6(src=self.lab.client_v6, dst=self.lab.server_v6, fl=ident)
        for hdr in ext or []:
            pkt = pkt / hdr
        pkt = pkt / TCP(sport=20000 + self.n, dport=dport, flags=flags, seq=seq, ack=1)
        if payload:
            pkt = pkt / Raw(payload)
        return bytearray(bytes(self.eth / pkt))


def rewritten(frame: bytes | bytearray, find: bytes, with_: bytes) -> bytes:
    """What a well-formed frame looks like after the rule: payload replaced, lengths and
    checksums recomputed by scapy from scratch (an independent reference)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    pkt = Ether(frame)
    pkt[Raw].load = pkt[Raw].load.replace(find, with_)
    if IP in pkt:
        del pkt[IP].len, pkt[IP].chksum
    else:
        del pkt[IPv6].plen
    del pkt[TCP].chksum
    return bytes(pkt)



def _ones_sum(data: bytes) -> int:
    return ~_csum(data) & 0xFFFF


def _tcp_residual_v4(frame: bytes) -> int:
    """One's complement sum over pseudo-header and segment, checksum included (0xFFFF: right)."""
    ihl = (frame[14] & 0x0F) * 4
    tot = int.from_bytes(frame[16:18], "big")
    seg = frame[14 + ihl:14 + tot]
    return _ones_sum(frame[26:34] + b"\0\x06" + len(seg).to_bytes(2, "big") + seg)


def _reassemble_v4(frames: list[bytes]) -> tuple[bytes, list[tuple[int, bool, int]]]:
    """IP payload of a fragmented datagram and its (offset, more-fragments, length) list."""
    parts = []
    for fr in frames:
        ihl = (fr[14] & 0x0F) * 4
        word = int.from_bytes(fr[20:22], "big")
        tot = int.from_bytes(fr[16:18], "big")
        parts.append(((word & 0x1FFF) * 8, bool(word & 0x2000), fr[14 + ihl:14 + tot]))
    parts.sort()
    data = b"".join(p[2] for p in parts)
    return data, [(off, mf, len(d)) for off, mf, d in parts]


def _engine(workdir: str) -> Callable[[bytes], bytes | None]:
    """The same rules in the offline engine (what ``nfrewrite replay`` runs): a reference."""
    from nfrewrite.config.settings import load_all
    from nfrewrite.core.engine import Engine
    from nfrewrite.core.seqadj import FlowTable

    _, ruleset, _ = load_all(os.path.join(workdir, "nfrewrite.toml"))
    assert ruleset is not None
    engine = Engine(ruleset, FlowTable())

    def run(frame: bytes) -> bytes | None:
        res = engine.process(frame[14:], now=time.monotonic())
        if res.verdict == 0:
            return None
        return frame[:14] + res.packet if res.packet is not None else frame

    return run


def _conntrack_stats(lab: Lab) -> dict[str, int]:
    """/proc/net/stat/nf_conntrack of the appliance, summed over CPUs."""
    lines = lab.run("appliance", ["cat", "/proc/net/stat/nf_conntrack"]).stdout.splitlines()
    names = lines[0].split()
    rows = [[int(x, 16) for x in line.split()] for line in lines[1:]]
    return {n: sum(r[i] for r in rows) for i, n in enumerate(names)}


@dataclass
class Case:
    """One hostile input: frames sent, what must arrive at the server, what the metrics say.

    ``expect`` is the exact list of frames that must arrive (in order); None means a custom
    ``check`` decides. ``seen``/``modified``/``unparsed`` are the exact moves of the worker's
    counters (0 seen: the packet never reached the queue).
    """

    frames: list[bytearray]
    expect: list[bytes] | None
    seen: int
    modified: int = 0
    unparsed: dict[str, int] = field(default_factory=dict)
    gap: float = 0.0
    check: Callable[[list[bytes]], None] | None = None
    why: str = ""


def _cases(f: Frames, workdir: str) -> dict[str, Case]:
    from scapy.layers.inet6 import (
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        PadN,
    )

    def same(frame: bytearray) -> list[bytes]:
        return [bytes(frame)]

    def sec(frame: bytearray) -> list[bytes]:
        return [rewritten(frame, b"secret", b"SECRET")]

    def sec_raw(frame: bytearray) -> list[bytes]:
        # scapy cannot dissect an overrunning IP option: patch the bytes, checksums from scratch
        return [bytes(f.fix_v4(bytearray(frame.replace(b"secret", b"SECRET"))))]

    def grow(frame: bytearray) -> list[bytes]:
        return [rewritten(frame, b"grow", b"GROWN!!")]

    c: dict[str, Case] = {}
    # -- well-formed, rewritten as the rules say --------------------------------------------
    for name, fr, exp in (
        ("ok_same_v4", f.v4(SAME, b"a secret b"), sec),
        ("ok_grow_v4", f.v4(GROW, b"a grow b"), grow),
        ("ok_same_v6", f.v6(SAME, b"a secret b"), sec),
        ("ok_grow_v6", f.v6(GROW, b"a grow b"), grow),
        ("urgent_data", f.v4(SAME, b"secret!!", flags="PAU", urgptr=3), sec),
        ("syn_with_payload_same", f.v4(SAME, b"secret in a syn", flags="S"), sec),
        ("syn_with_payload_grow", f.v4(GROW, b"grow in a syn", flags="S"), grow),
        # the kernel does not parse IPv4 options on a bridge (br_validate_ipv4: "we should
        # really parse IP options here"): even an overrunning one passes; we skip them by IHL
        ("ipv4_options_nop", f.v4(SAME, b"a secret b", ip_options=b"\x01\x01\x01\x00"), sec_raw),
        ("ipv4_options_overrun", f.v4(SAME, b"a secret b", ip_options=b"\x44\x28\x05\x00"),
         sec_raw),
        ("v6_ext_chain_hbh_dstopt", f.v6(SAME, b"a secret b", ext=[
            IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 4)]),
            IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 4)])]), sec),
        ("v6_routing_no_segments_left", f.v6(SAME, b"a secret b", ext=[
            IPv6ExtHdrRouting(type=0, addresses=["2001:2::2"], segleft=0)]), sec),
    ):
        c[name] = Case([fr], exp(fr), seen=1, modified=1)
    c["zero_length_payload"] = Case([fr := f.v4(GROW, b"", flags="A")], same(fr), seen=1)

    bad = f.v4(SAME, b"a secret b")
    bad[14 + 20 + 16] ^= 0x01

    def bad_csum(arrived: list[bytes]) -> None:
        # rewritten, and the TCP checksum wrong by exactly what it was wrong on arrival
        (got,) = arrived
        want = sec(bad)[0]
        assert got[:50] + got[52:] == want[:50] + want[52:]
        assert _tcp_residual_v4(got) == _tcp_residual_v4(bytes(bad)) != 0xFFFF

    c["tcp_checksum_wrong"] = Case([bad], None, seen=1, modified=1, check=bad_csum,
                                   why="corruption carried through, never laundered")

    # -- malformed TCP: reaches the queue, passed untouched, counted by reason ---------------
    t = f.v4(GROW, b"")
    c["truncated_tcp_10_bytes"] = Case([fr := f.fix_v4(t[:14 + 20 + 10], tcp=False)], same(fr),
                                       seen=1, unparsed={"truncated_tcp": 1})
    t = f.v4(GROW, b"")
    c["truncated_tcp_2_bytes"] = Case(
        [fr := f.fix_v4(t[:14 + 20 + 2], tcp=False)], same(fr), seen=0,
        why="the dport cannot be read: the kernel's `tcp dport` does not match, never queued")
    d = f.v4(GROW, b"a grow b")
    d[14 + 20 + 12] = 0x40 | (d[14 + 20 + 12] & 0x0F)
    c["data_offset_4"] = Case([fr := f.fix_v4(d)], same(fr), seen=1,
                              unparsed={"bad_data_offset": 1})
    d = f.v4(GROW, b"a grow b")
    d[14 + 20 + 12] = 0xF0 | (d[14 + 20 + 12] & 0x0F)
    c["data_offset_past_end"] = Case([fr := f.fix_v4(d)], same(fr), seen=1,
                                     unparsed={"bad_data_offset": 1})
    c["tcp_option_overrun"] = Case([fr := f.v4(GROW, b"a grow b", options=b"\x02\x0a\x05\xb4")],
                                   same(fr), seen=1, unparsed={"bad_tcp_options": 1})
    c["tcp_option_length_0"] = Case([fr := f.v4(GROW, b"a grow b", options=b"\x08\x00\x00\x00")],
                                    same(fr), seen=1, unparsed={"bad_tcp_options": 1})
    # -- IP header lies ------------------------------------------------------------------------
    h = f.v4(GROW, b"a grow b")
    h[14] = 0x44
    c["ihl_4"] = Case([f.fix_v4(h, tcp=False)], [], seen=0,
                      why="br_validate_ipv4 drops ihl < 5")
    h = f.v4(GROW, b"a grow b")
    h[14] = 0x4F
    c["ihl_past_total_length"] = Case([f.fix_v4(h, tcp=False)], [], seen=0,
                                      why="br_validate_ipv4 drops total length < ihl")
    h = f.v4(GROW, b"a grow b")
    h[14] = 0x46
    c["ihl_6_lie"] = Case(
        [fr := f.fix_v4(h, tcp=False)], same(fr), seen=0,
        why="valid header checksum: passes validation; the kernel then reads the ports 4 bytes "
            "late, so dport is not 8081 and nothing queues it")
    tl = f.v4(GROW, b"a grow b")
    c["total_length_past_frame"] = Case([f.fix_v4(tl, tcp=False, total=len(tl) - 14 + 10)], [],
                                        seen=0, why="br_validate_ipv4 drops it")
    tl = f.v4(GROW, b"a grow b and more")
    c["total_length_cuts_payload"] = Case(
        [f.fix_v4(tl, tcp=False, total=44)], [bytes(tl[:14 + 44])], seen=1,
        why="br_validate_ipv4 trims the frame to the total length before any hook: the pattern "
            "is gone, the trimmed packet passes untouched")
    tl = f.v4(GROW, b"a grow b")
    c["total_length_cuts_tcp_header"] = Case(
        [f.fix_v4(tl, tcp=False, total=32)], [bytes(tl[:14 + 32])], seen=1,
        unparsed={"truncated_tcp": 1}, why="trimmed by the kernel, then truncated_tcp")
    ck = f.v4(SAME, b"a secret b")
    ck[24] ^= 0x10
    c["ipv4_header_checksum_wrong"] = Case([ck], [], seen=0, why="br_validate_ipv4 drops it")
    # -- fragments -----------------------------------------------------------------------------
    whole = f.v4(SAME, b"0123456789abcdef" + b"secret" + b"x" * 21)
    first = bytearray(whole[:34] + whole[34:34 + 24])
    first[20:22] = (0x2000).to_bytes(2, "big")  # MF, offset 0; "secret" split 4 + 2
    second = bytearray(whole[:34] + whole[34 + 24:])
    second[20:22] = (24 // 8).to_bytes(2, "big")

    def frag_pair(arrived: list[bytes]) -> None:
        # conntrack's defrag reassembles before our hook: we see (and rewrite) the whole
        # datagram, even across the fragment boundary; the bridge refragments it at the largest
        # fragment size it received (32 payload bytes), keeping the IP ID
        data, layout = _reassemble_v4(arrived)
        assert data == sec(whole)[0][34:]
        assert layout == [(0, True, 32), (32, False, len(data) - 32)]
        assert all(a[18:20] == whole[18:20] for a in arrived)

    c["fragment_pair_v4"] = Case([f.fix_v4(first, tcp=False), f.fix_v4(second, tcp=False)], None,
                                 seen=1, modified=1, check=frag_pair)
    lone = f.v4(SAME, b"0123456789abcdef" + b"secret" + b"y" * 21)
    lone1 = bytearray(lone[:34] + lone[34:34 + 32])
    lone1[20:22] = (0x2000).to_bytes(2, "big")
    c["first_fragment_alone_v4"] = Case([f.fix_v4(lone1, tcp=False)], [], seen=0,
                                        why="held by defrag until it expires; never forwarded")
    lone = f.v4(SAME, b"0123456789abcdef" + b"secret" + b"z" * 21)
    lone2 = bytearray(lone[:34] + lone[34 + 32:])
    lone2[20:22] = (32 // 8).to_bytes(2, "big")
    c["later_fragment_alone_v4"] = Case([f.fix_v4(lone2, tcp=False)], [], seen=0,
                                        why="held by defrag until it expires; never forwarded")
    # -- IPv6 ----------------------------------------------------------------------------------
    atomic = f.v6(SAME, b"a secret b", ext=[IPv6ExtHdrFragment(offset=0, m=0, id=77)])
    plain = bytearray(atomic[:14 + 40] + atomic[14 + 48:])
    plain[14 + 4:14 + 6] = (len(plain) - 54).to_bytes(2, "big")
    plain[14 + 6] = 6
    c["v6_atomic_fragment"] = Case(
        [atomic], sec(plain), seen=1, modified=1,
        why="nf_defrag_ipv6 removes an atomic fragment header before our hook")
    c["v6_first_fragment_odd_length"] = Case(
        [fr := f.v6(SAME, b"a secret b", ext=[IPv6ExtHdrFragment(offset=0, m=1, id=78)])],
        same(fr), seen=1, unparsed={"fragment": 1},
        why="a non-last fragment whose length is not a multiple of 8 is refused by "
            "nf_defrag_ipv6 and continues as is: it reaches us as a fragment")
    c["v6_later_fragment_alone"] = Case(
        [f.v6(SAME, b"a secret b", ext=[IPv6ExtHdrFragment(offset=8, m=0, id=79)])], [], seen=0,
        why="held by defrag until it expires")
    c["v6_routing_segments_left"] = Case(
        [fr := f.v6(SAME, b"a secret b", ext=[
            IPv6ExtHdrRouting(type=0, addresses=["2001:2::2"], segleft=1)])],
        same(fr), seen=1, unparsed={"not_tcp": 1},
        why="the pseudo-header's destination would be the final one: not ours")
    c["v6_nine_extension_headers"] = Case(
        [fr := f.v6(SAME, b"a secret b", ext=[IPv6ExtHdrDestOpt() for _ in range(9)])],
        same(fr), seen=1, unparsed={"bad_ext_header": 1})
    ov = f.v6(SAME, b"a secret b", ext=[IPv6ExtHdrDestOpt()])
    ov[14 + 40 + 1] = 30
    c["v6_ext_header_overrun"] = Case(
        [ov], same(ov), seen=0, why="the kernel cannot find the TCP header: `tcp dport` does "
                                    "not match, never queued")
    pl = f.v6(GROW, b"a grow b")
    pl[18:20] = (len(pl) - 54 + 8).to_bytes(2, "big")
    c["v6_payload_length_past_frame"] = Case([pl], [], seen=0, why="br_validate_ipv6 drops it")
    pl = f.v6(GROW, b"a grow b and more")
    pl[18:20] = (24).to_bytes(2, "big")
    c["v6_payload_length_cuts_payload"] = Case([pl], [bytes(pl[:14 + 40 + 24])], seen=1,
                                               why="trimmed by br_validate_ipv6")
    # -- overlapping / out-of-window segments (sent 0.1 s apart, see the burst case) -----------
    segs = [f.v4(SAME, b"secret-aaaa", seq=5000, sport=31000),
            f.v4(SAME, b"et-aaaa secret", seq=5004, sport=31000),
            f.v4(SAME, b"secret far away", seq=5000 + 2**31, sport=31000)]
    c["overlap_and_out_of_window_same_length"] = Case(
        segs, [x for s_ in segs for x in sec(s_)], seen=3, modified=3, gap=0.1,
        why="same-length edits are stateless: each segment on its own")
    engine = _engine(workdir)
    gsegs = [f.v4(GROW, b"grow-1", seq=7000, sport=31001),
             f.v4(GROW, b"ow-1 grow-2", seq=7002, sport=31001),
             f.v4(GROW, b"grow-1 grow-2 grow-3", seq=7000, sport=31001),
             f.v4(GROW, b"grow far away", seq=7000 + 2**31, sport=31001)]
    reference = [engine(bytes(g)) for g in gsegs]

    def overlap_grow(arrived: list[bytes]) -> None:
        # the flow's adjuster re-cuts overlaps from its record, so every copy of a stream byte
        # carries the same edit; a segment 2**31 ahead is outside any window the receiver
        # could have offered: dropped, and it moves nothing in the record (a blind attacker's
        # way to make later matches pass unedited, see nfrewrite.core.seqadj)
        from scapy.layers.inet import TCP
        from scapy.layers.l2 import Ether

        assert [bytes(Ether(a)[TCP].payload) for a in arrived] == [
            b"GROWN!!-1", b"GROWN!!-1 GROWN!!-2", b"GROWN!!-1 GROWN!!-2 GROWN!!-3"]
        assert [Ether(a)[TCP].seq for a in arrived] == [7000, 7000, 7000]
        assert reference[3] is None  # the offline engine drops it too
        assert arrived == reference[:3]  # byte for byte what the offline engine makes of them

    c["overlap_and_out_of_window_length_changing"] = Case(
        gsegs, None, seen=4, modified=3, gap=0.1, check=overlap_grow)
    return c



@pytest.mark.parametrize("lab", [{"client_offloads": {"gro": False},
                                  "server_offloads": {"gro": False}}], indirect=True)
def test_hostile_packets_pass_as_the_kernel_and_rules_say_and_the_daemon_carries_on(
    lab: Lab, workdir: str
) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES}, offloads="{ gro = false }")
    with Daemon(lab, config) as daemon:
        lab.wait_reachable()
        # the server's stack must not answer (its RSTs would be queued for marked flows);
        # its AF_PACKET sniffer still sees every frame
        lab.run("server", ["iptables", "-A", "INPUT", "-p", "tcp", "-j", "DROP"])
        lab.run("server", ["ip6tables", "-A", "INPUT", "-p", "tcp", "-j", "DROP"])
        rig = Rig(lab)
        failures = []
        for name, case in _cases(Frames(lab, rig), workdir).items():
            n_want = len(case.expect) if case.expect is not None else len(case.frames)
            obs = rig.send([bytes(x) for x in case.frames], n_want, gap=case.gap)
            problems = []
            if case.expect is not None and obs.arrived != case.expect:
                problems.append(f"arrived {[a.hex() for a in obs.arrived]}, expected "
                                f"{[e.hex() for e in case.expect]}")
            if case.check is not None:
                try:
                    case.check(obs.arrived)
                except AssertionError as e:
                    problems.append(f"check failed: {e!r}; arrived "
                                    f"{[a.hex() for a in obs.arrived]}")
            got = (obs.seen, obs.modified, obs.unparsed)
            want = (case.seen, case.modified, case.unparsed)
            if got != want:
                problems.append(f"(seen, modified, unparsed) {got}, expected {want}")
            if problems:
                failures.append(f"{name} ({case.why}): " + "; ".join(problems))
        assert not failures, "\n".join(failures)

        # a burst of a *new* connection: all three are queued, each with its own unconfirmed
        # conntrack entry; every one after the first that won the race is dropped when conntrack
        # confirms it (measured: 2 of 3, every time)
        f = Frames(lab, rig)
        burst = [f.v4(SAME, b"secret-%d" % i, seq=9000 + 100 * i, sport=32000) for i in range(3)]
        ct_before = _conntrack_stats(lab)
        obs = rig.send([bytes(x) for x in burst], 3)
        ct = {k: v - ct_before[k] for k, v in _conntrack_stats(lab).items()}
        expected = [rewritten(x, b"secret", b"SECRET") for x in burst]
        assert (obs.seen, obs.modified) == (3, 3)
        assert obs.arrived and obs.arrived[0] == expected[0]
        assert all(a in expected for a in obs.arrived)
        assert ct["insert_failed"] == ct["drop"] == 3 - len(obs.arrived), ct

        # after all that: still up, no worker restarted, no handler error, and a normal
        # connection right after is rewritten correctly in both families
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.log().count(" bound queue ") == 1
        s = rig.scrape()
        assert sum(v for (n, _), v in s.items() if n == "nfrewrite_handler_errors_total") == 0
        lab.run("server", ["iptables", "-D", "INPUT", "-p", "tcp", "-j", "DROP"])
        lab.run("server", ["ip6tables", "-D", "INPUT", "-p", "tcp", "-j", "DROP"])
        for family in (4, 6):
            res = tcp_exchange(lab, b"a secret, a secret", b"ok", family=family, port=SAME)
            assert res.server_received == b"a SECRET, a SECRET"
            res = tcp_exchange(lab, b"grow " * 200, b"ok", family=family, port=GROW)
            assert res.server_received == b"GROWN!! " * 200  # one write below the MSS
