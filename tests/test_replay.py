"""`nfrewrite replay -c CONFIG IN OUT`: the live engine over a capture, streaming.

The captures are crafted with scapy as the appliance would receive them: each endpoint sends its
own bytes in its original numbering and acknowledges what it RECEIVED, i.e. the other side's
rewritten stream. The output must then show every rewritten payload, the sequence numbers of each
direction shifted by its own edits and the ACKs mapped back into the sender's numbering; tshark (an
independent dissector) must find every IP and TCP checksum good.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapNgWriter, RawPcapReader, RawPcapWriter

from nfrewrite.replay import Progress

REPO = Path(__file__).resolve().parent.parent
NFREWRITE = REPO / ".venv" / "bin" / "nfrewrite"
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed")

# Server -> client (sport 80): a growing edit. Client -> server (dport 80): a shrinking one.
RULES = """
[[rule]]
name    = "grow"
match   = { sport = 80 }
replace = [ { find = "secret", with = "[redacted!]" } ]
[[rule]]
name    = "shrink"
match   = { dport = 80 }
replace = [ { find = "Cookie: abcdef", with = "Cookie: x" } ]
[[rule]]
name    = "block-telnet"
match   = { dport = 23 }
verdict = "drop"
"""
EDITS = {80: (b"secret", b"[redacted!]"), 40000: (b"Cookie: abcdef", b"Cookie: x")}  # by sport
CLIENT_ISN, SERVER_ISN = 1000, 4_294_967_000  # the server's numbers wrap around 2**32
T0 = 1_700_000_000


def write_config(tmp_path: Path, rules: str = RULES) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "10-test.toml").write_text(rules)
    config = tmp_path / "nfrewrite.toml"
    config.write_text('rules_dir = "rules"\n')
    return config


@dataclass
class Segment:
    """One packet of the crafted connection and what must come out of the appliance."""

    ip: Packet  # as the appliance receives it
    seq_out: int
    ack_out: int
    payload_out: bytes
    time: float


def conversation(version: int) -> list[Segment]:
    """A connection: handshake, requests and responses in several segments each way, FINs."""
    addrs = ("192.0.2.10", "198.51.100.20") if version == 4 else ("2001:db8::10", "2001:db8::20")
    # per side: next original and next rewritten sequence number
    nxt = {"c": [CLIENT_ISN, CLIENT_ISN], "s": [SERVER_ISN, SERVER_ISN]}
    out: list[Segment] = []

    def send(side: str, flags: str, data: bytes = b"") -> None:
        other = "s" if side == "c" else "c"
        sport, dport = (40000, 80) if side == "c" else (80, 40000)
        find, repl = EDITS[sport]
        new = data.replace(find, repl)
        seq_orig, seq_rew = nxt[side]
        ack_rew = nxt[other][1] % 2**32  # the peer acknowledges what it received: rewritten
        ack_orig = nxt[other][0] % 2**32
        src, dst = addrs if side == "c" else addrs[::-1]
        ip: Packet = IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst)
        tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq_orig % 2**32,
                  ack=ack_rew if "A" in flags else 0, window=65535)
        pkt = ip / tcp / Raw(data) if data else ip / tcp
        consumed = len(data) + (1 if "S" in flags or "F" in flags else 0)
        nxt[side] = [seq_orig + consumed, seq_rew + len(new) + consumed - len(data)]
        out.append(Segment(pkt.__class__(bytes(pkt)), seq_rew % 2**32,
                           ack_orig if "A" in flags else 0, new, T0 + len(out) * 0.001 + 0.5))

    send("c", "S")
    send("s", "SA")
    send("c", "A")
    send("c", "PA", b"GET /a HTTP/1.1\r\nCookie: abcdef\r\n\r\n")
    send("s", "A")
    send("c", "PA", b"GET /b HTTP/1.1\r\nCookie: abcdef\r\nCookie: abcdef\r\n\r\n")
    send("s", "PA", b"HTTP/1.1 200 OK\r\nX-Token: secret\r\n\r\n")
    send("c", "A")
    send("s", "PA", b"the secret is secret; " * 20)
    send("s", "PA", b"no match in this one")
    send("c", "A")
    send("s", "PA", b"last secret")
    send("c", "FA")
    send("s", "FA")
    send("c", "A")
    return out


def eth() -> Packet:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # given: no ARP lookups


LINKS: dict[str, tuple[int, Callable[[Packet], Packet]]] = {
    "ethernet": (1, lambda ip: eth() / ip),
    "vlan": (1, lambda ip: eth()
             / Dot1Q(vlan=7) / Dot1Q(vlan=9) / ip),
    "raw": (101, lambda ip: ip),
    "sll": (113, lambda ip: CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6,
                                        src=b"\x02\x00\x00\x00\x00\x01\x00\x00") / ip),
    "sll2": (276, lambda ip: CookedLinuxV2(ifindex=3, lladdrtype=1, pkttype=0, lladdrlen=6,
                                           src=b"\x02\x00\x00\x00\x00\x01\x00\x00") / ip),
}


def write_pcap(path: Path, linktype: int, frames: Sequence[tuple[bytes, float]]) -> None:
    writer = RawPcapWriter(str(path), linktype=linktype)
    writer.write_header(None)
    for frame, when in frames:
        sec = int(when)
        writer.write_packet(frame, sec=sec, usec=round((when - sec) * 1e6))
    writer.close()


def read_pcap(path: Path) -> tuple[int, list[tuple[bytes, float, int]]]:
    """(link type, [(frame, time, wirelen)])"""
    reader = RawPcapReader(str(path))
    frames = [(data, meta.sec + meta.usec * (1e-9 if reader.nano else 1e-6), meta.wirelen)
              for data, meta in reader]
    linktype = int(reader.linktype)
    reader.close()
    return linktype, frames


def report(stdout: str) -> list[str]:
    """The summary's lines with runs of spaces collapsed (the columns are padded)."""
    return [" ".join(line.split()) for line in stdout.splitlines()]


def nfrewrite(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NFREWRITE_DEBUG"}
    return subprocess.run([str(NFREWRITE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def tshark_bad_checksums(path: Path) -> str:
    """What tshark prints for packets with a bad IP or TCP checksum (nothing when all good)."""
    assert TSHARK is not None
    proc = subprocess.run(
        [TSHARK, "-r", str(path), "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
         "-Y", 'tcp.checksum.status == "Bad" || ip.checksum.status == "Bad"'],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return proc.stdout


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    assert TSHARK is not None
    cmd = [TSHARK, "-r", str(path), "-o", "tcp.check_checksum:TRUE", "-o",
           "ip.check_checksum:TRUE", "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return [line.split("\t") for line in proc.stdout.splitlines()]


# -- the rewrite, per link type and IP version ---------------------------------------------------


@needs_tshark
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("link", sorted(LINKS))
def test_replay_rewrites_both_directions_and_maps_seq_and_ack(
    tmp_path: Path, link: str, version: int
) -> None:
    linktype, frame_of = LINKS[link]
    segments = conversation(version)
    frames = [(bytes(frame_of(s.ip)), s.time) for s in segments]
    if link == "ethernet" and version == 4:  # Ethernet minimum-size padding rides along
        frames = [(f + b"\x00" * max(0, 60 - len(f)), t) for f, t in frames]
    write_pcap(tmp_path / "in.pcap", linktype, frames)
    config = write_config(tmp_path)

    proc = nfrewrite("replay", "-c", str(config), "in.pcap", "out.pcap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress line when stderr is not a terminal

    out_type, out = read_pcap(tmp_path / "out.pcap")
    assert out_type == linktype and len(out) == len(segments)
    for (frame_in, t_in), (frame, t_out, wirelen), seg in zip(frames, out, segments, strict=True):
        assert t_out == pytest.approx(t_in, abs=1e-6)
        assert wirelen == len(frame)
        head = len(bytes(frame_of(seg.ip))) - len(bytes(seg.ip))
        assert frame[:head] == frame_in[:head]  # the link header is kept
        pad = len(frame_in) - len(bytes(frame_of(seg.ip)))
        assert frame[len(frame) - pad:] == frame_in[len(frame_in) - pad:]  # trailer kept
        ip = (IP if version == 4 else IPv6)(frame[head:len(frame) - pad])
        tcp = ip[TCP]
        assert (tcp.seq, tcp.ack, bytes(tcp.payload)) == (seg.seq_out, seg.ack_out,
                                                          seg.payload_out), seg.ip.summary()

    assert tshark_bad_checksums(tmp_path / "out.pcap") == ""
    statuses = tshark_fields(tmp_path / "out.pcap", "tcp.checksum.status", "tcp.len")
    assert [s[0] for s in statuses] == ["1"] * len(segments)  # tshark saw TCP: all "Good"

    lines = report(proc.stdout)
    assert f"packets read {len(segments)}" in lines
    assert f"packets written {len(segments)}" in lines
    assert "rule grow 3 rewritten" in lines  # three server segments had "secret"
    assert "rule shrink 2 rewritten" in lines
    assert "rule block-telnet 0 dropped" in lines
    assert "flows with a sequence offset 1" in lines


@needs_tshark
def test_the_tshark_check_catches_a_corrupted_checksum(tmp_path: Path) -> None:
    """Positive control: the same filter does print a packet whose checksum is wrong."""
    segments = conversation(4)
    good = bytes(eth() / segments[3].ip)
    bad = bytearray(good)
    bad[14 + 20 + 16] ^= 0x5A  # the TCP checksum field
    write_pcap(tmp_path / "good.pcap", 1, [(good, T0)])
    write_pcap(tmp_path / "bad.pcap", 1, [(good, T0), (bytes(bad), T0 + 1)])
    assert tshark_bad_checksums(tmp_path / "good.pcap") == ""
    assert len(tshark_bad_checksums(tmp_path / "bad.pcap").splitlines()) == 1
    bad_ip = bytearray(good)
    bad_ip[14 + 10] ^= 0x01  # the IPv4 header checksum
    write_pcap(tmp_path / "bad_ip.pcap", 1, [(bytes(bad_ip), T0)])
    assert len(tshark_bad_checksums(tmp_path / "bad_ip.pcap").splitlines()) == 1


def test_a_corrupt_packet_stays_corrupt(tmp_path: Path) -> None:
    """A rewritten packet whose checksum was wrong on arrival leaves wrong by the same amount."""
    seg = conversation(4)[6]  # server data with "secret"
    raw = bytearray(bytes(seg.ip))
    raw[20 + 16] ^= 0x10
    write_pcap(tmp_path / "in.pcap", 101, [(bytes(raw), T0)])
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path)), "in.pcap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, out = read_pcap(tmp_path / "out.pcap")
    from nfrewrite.core.packet import TcpPacket, parse

    pkt = parse(out[0][0])
    assert isinstance(pkt, TcpPacket) and b"[redacted!]" in pkt.payload
    assert not pkt.tcp_checksum_ok()


# -- checksums of a sender-side capture (TX offload) --------------------------------------------


def offload_capture(tmp_path: Path) -> None:
    """Packets whose TCP checksum field holds only the pseudo-header sum (TX offload): the middle
    of the crafted connection (all rewritten: payload or numbers) and one of another connection."""
    from nfrewrite.core.packet import TcpPacket, parse

    other = IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=9999, dport=443) / b"secret"
    frames = []
    for i, ip in enumerate([s.ip for s in conversation(4)[6:10]] + [other]):
        pkt = parse(bytearray(bytes(ip)))  # a bytearray is the packet's own: written below
        assert isinstance(pkt, TcpPacket)
        struct.pack_into("!H", pkt.buf, pkt.l4 + 16, pkt.pseudo_header_seed())
        frames.append((bytes(eth() / IP(bytes(pkt.buf))), T0 + i))
    write_pcap(tmp_path / "in.pcap", 1, frames)


@needs_tshark
def test_csum_partial_auto_completes_seed_only_checksums_of_rewritten_packets(
    tmp_path: Path,
) -> None:
    offload_capture(tmp_path)
    config = str(write_config(tmp_path))
    proc = nfrewrite("replay", "-c", config, "in.pcap", "out.pcap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "checksums completed 4 (TX offload: seed only)" in report(proc.stdout)
    rows = tshark_fields(tmp_path / "out.pcap", "tcp.checksum.status")
    # the rewritten packets verify; the last (not rewritten) is written as it came, seed only
    assert [r[0] for r in rows] == ["1", "1", "1", "1", "0"]

    proc = nfrewrite("replay", "--csum-partial", "no", "-c", config, "in.pcap", "no.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0 and "checksums completed" not in proc.stdout
    rows = tshark_fields(tmp_path / "no.pcap", "tcp.checksum.status")
    assert [r[0] for r in rows] == ["0"] * 5  # carried through as if complete: still wrong

    proc = nfrewrite("replay", "--csum-partial", "yes", "-c", config, "in.pcap", "yes.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0
    rows = tshark_fields(tmp_path / "yes.pcap", "tcp.checksum.status")
    assert [r[0] for r in rows] == ["1", "1", "1", "1", "0"]


# -- drops, not-ours, pcapng ---------------------------------------------------------------------


def test_dropped_packets_are_left_out_and_counted_and_non_ip_frames_pass(tmp_path: Path) -> None:
    telnet = IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=5555, dport=23, flags="PA") / b"x"
    udp_like = IP(src="192.0.2.1", dst="192.0.2.2", proto=17) / Raw(b"\x00" * 8)
    arp = Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(b"\x00" * 28)
    frames = [
        (bytes(eth() / telnet), T0),
        (bytes(arp), T0 + 1),
        (bytes(eth() / udp_like), T0 + 2),
        (bytes(eth() / conversation(4)[6].ip), T0 + 3),
        (b"\x02\x00\x00\x00", T0 + 4),  # shorter than an Ethernet header
    ]
    write_pcap(tmp_path / "in.pcap", 1, frames)
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path)), "in.pcap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, out = read_pcap(tmp_path / "out.pcap")
    assert [f for f, _, _ in out][:2] == [frames[1][0], frames[2][0]]
    assert len(out) == 4 and b"[redacted!]" in out[2][0] and out[3][0] == frames[4][0]
    lines = report(proc.stdout)
    assert "packets dropped 1" in lines and "rule block-telnet 1 dropped" in lines
    assert "packets not ours 3 (not_ip 1, not_tcp 1, truncated_link_header 1)" in lines
    assert "packets written 4" in lines


def test_pcapng_input_becomes_a_nanosecond_pcap(tmp_path: Path) -> None:
    segments = conversation(6)
    writer = PcapNgWriter(str(tmp_path / "in.pcapng"))
    for i, seg in enumerate(segments):
        frame = eth() / seg.ip
        frame.time = T0 + i * 0.25
        writer.write(frame)
    writer.close()
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path)), "in.pcapng", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reader = RawPcapReader(str(tmp_path / "out.pcap"))
    assert reader.nano and reader.linktype == 1
    got = [(meta.sec, meta.usec, data) for data, meta in reader]
    reader.close()
    assert [(s, ns) for s, ns, _ in got] == [
        (T0 + i // 4, (i % 4) * 250_000_000) for i in range(len(segments))
    ]
    assert b"[redacted!]" in got[6][2]


def test_an_empty_capture_gives_an_empty_capture(tmp_path: Path) -> None:
    write_pcap(tmp_path / "in.pcap", 113, [])
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path)), "in.pcap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_pcap(tmp_path / "out.pcap") == (113, [])
    assert "packets read 0" in report(proc.stdout)


# -- exit codes ----------------------------------------------------------------------------------


def test_invalid_rules_exit_1_with_positions(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[rule]]\nname = "x"\nmatch = { dport = 99999 }\n')
    write_pcap(tmp_path / "in.pcap", 1, [])
    proc = nfrewrite("replay", "-c", str(config), "in.pcap", "out.pcap", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{tmp_path}/rules/10-test.toml:3:19: error: dport")
    assert not (tmp_path / "out.pcap").exists()


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "cannot read missing.pcap: No such file or directory"),
        (b"", "not a readable pcap or pcapng capture"),
        (b"this is not a capture at all", "not a readable pcap or pcapng capture"),
        (struct.pack("<IHHIIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105),
         "link type 105 is not supported"),
    ],
)
def test_unreadable_input_exits_4_with_one_line(
    tmp_path: Path, content: bytes | None, expect: str
) -> None:
    name = "missing.pcap"
    if content is not None:
        name = "in.pcap"
        (tmp_path / name).write_bytes(content)
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path)), name, "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 4
    assert len(proc.stderr.splitlines()) == 1 and expect in proc.stderr, proc.stderr
    assert proc.stderr.startswith("nfrewrite replay: error: ")
    assert not (tmp_path / "out.pcap").exists() and proc.stdout == ""


def test_unwritable_output_and_same_file_exit_4(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    write_pcap(tmp_path / "in.pcap", 1, [(bytes(eth() / conversation(4)[0].ip), T0)])
    proc = nfrewrite("replay", "-c", config, "in.pcap", "no/such/dir/out.pcap", cwd=tmp_path)
    assert proc.returncode == 4 and "cannot write no/such/dir/out.pcap" in proc.stderr
    proc = nfrewrite("replay", "-c", config, "in.pcap", "in.pcap", cwd=tmp_path)
    assert proc.returncode == 4 and "is the input file" in proc.stderr
    assert read_pcap(tmp_path / "in.pcap")[1]  # untouched


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert nfrewrite("replay", "-c", "x.toml", "in.pcap", cwd=tmp_path).returncode == 2
    proc = nfrewrite("replay", "--csum-partial", "maybe", "a", "b", cwd=tmp_path)
    assert proc.returncode == 2


# -- progress ------------------------------------------------------------------------------------


def test_progress_redraws_one_line_at_most_ten_times_a_second() -> None:
    out = io.StringIO()
    meter = Progress(2_000_000, out)
    for i in range(1000):  # a tight loop: far less than 0.1 s
        meter.update(i * 2000, i)
    assert out.getvalue().count("\r") == 1
    assert out.getvalue().startswith("\rreplay:   0.0%")
    meter.close()
    assert out.getvalue().endswith("\r\033[K")


def test_progress_shows_on_a_terminal(tmp_path: Path) -> None:
    """Through a pseudo-terminal the CLI draws the progress line and erases it at the end."""
    import pty

    frames = [(bytes(eth() / s.ip), T0) for s in conversation(4)] * 100
    write_pcap(tmp_path / "in.pcap", 1, frames)
    config = str(write_config(tmp_path))
    code = (
        "import sys, nfrewrite.replay as r\n"
        "r.Progress.__init__.__defaults__ = (0.0001,)\n"  # redraw as often as asked (test only)
        "from nfrewrite.cli import main\n"
        f"sys.exit(main(['replay', '-c', {config!r}, 'in.pcap', 'out.pcap']))\n"
    )
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=follower, timeout=60, check=False)
    os.close(follower)
    err = os.read(leader, 65536).decode()
    os.close(leader)
    assert proc.returncode == 0
    assert "\rreplay:" in err and "% " in err and err.endswith("\r\033[K")


# -- streaming -----------------------------------------------------------------------------------

MEASURE = """
import resource, sys
from nfrewrite.cli import main

def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

assert main(["replay", "-c", sys.argv[1], "small.pcap", "small-out.pcap"]) == 0
before = rss_kib()
assert main(["replay", "-c", sys.argv[1], "big.pcap", "big-out.pcap"]) == 0
print("RSS", before, rss_kib())
"""


def write_many(path: Path, count: int) -> None:
    """``count`` small frames, fast: a few templates written as raw pcap records. One packet in a
    hundred belongs to one of 100 connections whose server says "secret" (a length change: each
    gets a flow); the rest are plain HTTPS-port traffic."""
    mac = eth()
    plain = [bytes(mac / IP(src="192.0.2.1", dst="192.0.2.2")
                   / TCP(sport=50000 + i, dport=443, flags="PA") / (b"x" * 20)) for i in range(99)]
    hits = [bytes(mac / IP(src="192.0.2.2", dst="192.0.2.1")
                  / TCP(sport=80, dport=40000 + i, flags="PA", seq=1000 + i) / b"a secret")
            for i in range(100)]
    record = struct.Struct("<IIII")
    with open(path, "wb", 1 << 20) as f:
        f.write(struct.pack("<IHHIIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for k in range(count):
            frame = hits[(k // 100) % 100] if k % 100 == 0 else plain[k % 99]
            f.write(record.pack(T0 + k // 1000, (k % 1000) * 1000, len(frame), len(frame)))
            f.write(frame)


def test_replay_streams_a_large_capture_in_bounded_memory(tmp_path: Path) -> None:
    """200 000 packets (18 MB of capture) cost no more memory than 2 000: nothing is loaded whole.

    The peak RSS after a 2 000-packet warm-up (imports, rule caches, flows) and after the big
    capture are compared in one fresh process; holding the capture, even as bare bytes objects,
    would add well over 20 MB."""
    write_many(tmp_path / "small.pcap", 2_000)
    write_many(tmp_path / "big.pcap", 200_000)
    size = (tmp_path / "big.pcap").stat().st_size
    assert size > 17_000_000
    config = str(write_config(tmp_path))
    proc = subprocess.run([sys.executable, "-c", MEASURE, config], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    before, after = (int(v) for v in proc.stdout.splitlines()[-1].split()[1:])
    assert after - before < 8 * 1024, (before, after)  # KiB
    lines = report(proc.stdout)
    assert "packets read 200000" in lines and "packets written 200000" in lines
    assert "rule grow 100 rewritten" in lines and "flows with a sequence offset 100" in lines
    assert (tmp_path / "big-out.pcap").stat().st_size == size + 2000 * 5  # "[redacted!]" is +5


def test_pcapng_with_two_link_types_is_refused_in_one_line(tmp_path: Path) -> None:
    segments = conversation(4)
    first = eth() / segments[0].ip
    first.sniffed_on = "eth0"
    second = CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x02" + b"\x00" * 7) / (
        segments[1].ip)
    second.sniffed_on = "any"
    writer = PcapNgWriter(str(tmp_path / "in.pcapng"))
    writer.write(first)
    writer.write(second)
    writer.close()
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path)), "in.pcapng", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 4 and len(proc.stderr.splitlines()) == 1
    assert "interfaces with link types 1 and 113" in proc.stderr
    assert not (tmp_path / "out.pcap").exists()


def test_in_port_and_out_port_stand_for_the_bridge_ports(tmp_path: Path) -> None:
    config = write_config(tmp_path, (
        '[[rule]]\nname = "from-eth1"\nmatch = { in_port = "eth1", out_port = "eth2" }\n'
        'replace = [ { find = "secret", with = "SECRET" } ]\n'
    ))
    config.write_text('rules_dir = "rules"\n[[bridge]]\nname = "br0"\nports = ["eth1", "eth2"]\n')
    write_pcap(tmp_path / "in.pcap", 101, [(bytes(conversation(4)[6].ip), T0)])
    plain = nfrewrite("replay", "-c", str(config), "in.pcap", "a.pcap", cwd=tmp_path)
    assert "rule from-eth1 0 rewritten" in report(plain.stdout)
    ported = nfrewrite("replay", "-c", str(config), "--in-port", "eth1", "--out-port", "eth2",
                       "in.pcap", "b.pcap", cwd=tmp_path)
    assert "rule from-eth1 1 rewritten" in report(ported.stdout)
    assert b"SECRET" in read_pcap(tmp_path / "b.pcap")[1][0][0]
