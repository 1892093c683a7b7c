"""`nfrewrite replay` and the capture file itself: every record whole, damage reported, not hidden.

The captures are built here byte by byte (a few lines of ``struct``: pcap and pcapng), so that
records can be longer than 65,535 bytes, link type fields can carry FCS bits and files can be cut
or damaged anywhere. scapy builds the packets and serves as an independent reader where it can
(records up to 65,535 bytes).
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapNgReader, RawPcapReader

from nfrewrite.config.settings import load_all
from nfrewrite.core.rules import RuleSet
from nfrewrite.replay import DamagedInput, ReplayError, replay
from tests.test_replay import T0, TSHARK, nfrewrite, report, write_config

RULES = """
[[rule]]
name    = "shrink"
match   = { sport = 80 }
replace = [ { find = "a-long-secret", with = "x" } ]
[[rule]]
name    = "grow"
match   = { sport = 81 }
replace = [ { find = "secret", with = "[redacted!]" } ]
[[rule]]
name    = "same"
match   = { sport = 82 }
replace = [ { find = "secret", with = "SECRET" } ]
"""

# -- writing captures by hand -------------------------------------------------------------------

Frame = tuple[bytes, float] | tuple[bytes, float, int]  # frame, time[, original length]


def pcap_bytes(linktype: int, frames: Sequence[Frame], snaplen: int = 262144) -> bytes:
    """A microsecond pcap, little-endian, as libpcap writes it."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)]
    for frame, when, *orig in frames:
        sec = int(when)
        out.append(struct.pack("<IIII", sec, round((when - sec) * 1e6), len(frame),
                               orig[0] if orig else len(frame)))
        out.append(frame)
    return b"".join(out)


def block(btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def shb() -> bytes:
    return block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(linktype: int, snaplen: int = 0, options: bytes = b"") -> bytes:
    if options:
        options += b"\x00" * 4  # opt_endofopt
    return block(1, struct.pack("<HHI", linktype, 0, snaplen) + options)


def epb(frame: bytes, when: float, iface: int = 0, orig: int | None = None) -> bytes:
    ticks = round(when * 1e6)
    return block(6, struct.pack("<IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame),
                                len(frame) if orig is None else orig) + frame)


def read_out(path: Path) -> tuple[int, int, list[tuple[bytes, int]]]:
    """(link type field, snaplen, [(frame, original length)]) of a pcap the replay wrote."""
    data = path.read_bytes()
    magic, _, _, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic in (0xA1B2C3D4, 0xA1B23C4D)
    at, frames = 24, []
    while at < len(data):
        _, _, caplen, wirelen = struct.unpack_from("<IIII", data, at)
        frames.append((data[at + 16:at + 16 + caplen], wirelen))
        at += 16 + caplen
    assert at == len(data)
    return linktype, snaplen, frames


def ruleset(tmp_path: Path, rules: str = RULES) -> RuleSet:
    config, rs, diagnostics = load_all(str(write_config(tmp_path, rules)))
    assert rs is not None and not diagnostics, diagnostics
    return rs


def lo(ip: bytes) -> bytes:
    """``ip`` in the Ethernet header of a loopback capture (what tcpdump -i lo records)."""
    return bytes(Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00") / IP(ip))


def segment(sport: int, payload: bytes, seq: int = 1000, flags: str = "PA") -> bytes:
    """An IPv4 TCP segment to port 40000 with correct checksums."""
    return bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(
        sport=sport, dport=40000, seq=seq, ack=1, flags=flags, window=65535) / payload)


# -- 1. records longer than 65,535 bytes -------------------------------------------------------


def test_a_65549_byte_loopback_frame_is_taken_whole_and_rewritten(tmp_path: Path) -> None:
    """A full 64 KB segment captured on loopback: 14 bytes of Ethernet + a 65,535-byte datagram.
    All frames come out whole; the one the shrinking rule matches is rewritten (65,535 - 12
    bytes), with the checksums of a freshly built packet. One a same-length rule matches passes
    unchanged, as live (65,535 bytes do not fit a verdict), and the summary says so."""
    filler = b"0123456789abcdef" * 4094  # 65,504 bytes; + "a-long-secret" + 2 = 65,495 payload
    payload = filler[:65_495 - 13 - 20] + b"a-long-secret" + filler[:20]
    ip = segment(80, payload)
    assert len(ip) == 65_535
    frames: list[Frame] = [(lo(ip), T0), (lo(segment(9, payload)), T0),
                           (lo(segment(82, payload.replace(b"a-long-", b"aa-the-"))), T0)]
    assert len(frames[0][0]) == 65_549
    (tmp_path / "lo.pcap").write_bytes(pcap_bytes(1, frames))
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path, RULES)), "lo.pcap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = report(proc.stdout)
    assert "packets not ours 0" in lines and "rule shrink 1 rewritten" in lines
    assert ("packets too long to change 1 (matched, over 65,531 bytes: live, a verdict cannot "
            "carry them back changed unless edits shrink them)") in lines
    _, snaplen, out = read_out(tmp_path / "out.pcap")
    expect = lo(segment(80, payload.replace(b"a-long-secret", b"x")))
    assert len(expect) == 65_549 - 12
    assert out == [(expect, len(expect)), (frames[1][0], 65_549), (frames[2][0], 65_549)]
    assert snaplen == 262144


# -- 2. damage: reported with record number and byte offset, never taken for the end -------------


def sample_frames() -> list[bytes]:
    """Frames of several sizes, some rewritten (different lengths), one not IP."""
    frames = [lo(segment(81, b"the secret %d " % i * (i * 7 + 1), seq=1000 + i))
              for i in range(6)]
    frames.insert(2, b"\x00" * 12 + b"\x08\x06" + b"\x00" * 28)  # ARP
    frames.append(lo(segment(82, b"same secret")))
    return frames


def replayed(rs: RuleSet, data: bytes, tmp_path: Path) -> tuple[str, list[tuple[bytes, int]]]:
    """Replay ``data`` in-process: ("ok" or the error, the frames of the output ([] if none))."""
    (tmp_path / "cut.cap").write_bytes(data)
    out = tmp_path / "out.pcap"
    if out.exists():
        out.unlink()
    try:
        summary = replay(rs, str(tmp_path / "cut.cap"), str(out))
        result = "ok"
        assert summary.written == len(read_out(out)[2])
    except DamagedInput as exc:
        result = f"damaged: {exc}"
        assert exc.summary.written == len(read_out(out)[2])
    except ReplayError as exc:
        assert not out.exists()
        return f"refused: {exc}", []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file
    return result, read_out(out)[2]


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_capture_cut_at_any_byte_is_damage_at_the_record_it_cuts(
    tmp_path: Path, kind: str
) -> None:
    """Every cut of the file: at a record boundary the replay is complete for what is there;
    inside the file header (or a pcapng's first blocks) the input is refused; inside a record
    header, record data or any part of a block it is damage, named by record number and the
    offset where that record starts, and the output holds exactly the records before it, as the
    whole file's replay wrote them."""
    rs = ruleset(tmp_path)
    frames = sample_frames()
    if kind == "pcap":
        head = pcap_bytes(1, [])
        records = [pcap_bytes(1, [(f, T0 + i)])[24:] for i, f in enumerate(frames)]
        what = "record"
    else:
        # SHB, IDB, then the packets with a name resolution block among them (not a packet)
        head = shb() + idb(1, options=option(9, b"\x06"))
        records = [epb(f, T0 + i) for i, f in enumerate(frames)]
        records.insert(3, block(4, struct.pack("<HH", 0, 0)))
        what = "block"
    data = head + b"".join(records)
    status, full = replayed(rs, data, tmp_path)
    assert status == "ok" and len(full) == len(frames)
    assert sum(1 for f, _ in full if b"[redacted!]" in f) == 6  # the rules did run

    starts = [len(head)]
    for r in records:
        starts.append(starts[-1] + len(r))
    first_number = 1 if kind == "pcap" else 3  # pcapng: blocks 1 and 2 are SHB and IDB
    seen = {"refused": 0, "boundary": 0, "header": 0, "data": 0}
    for cut in range(len(data)):
        status, out = replayed(rs, data[:cut], tmp_path)
        if cut == 28 and kind == "pcapng":  # a section header alone: a capture of nothing
            assert (status, out) == ("ok", [])
            continue
        if cut < len(head):
            seen["refused"] += 1
            assert status.startswith("refused: "), (cut, status)
            continue
        k = max(i for i, s in enumerate(starts) if s <= cut)  # the record the cut is in
        packets_before = sum(1 for r in records[:k] if r[:4] != b"\x04\x00\x00\x00")
        if cut == starts[k]:
            seen["boundary"] += 1
            assert status == "ok", (cut, status)
        else:
            seen["header" if cut - starts[k] < (16 if kind == "pcap" else 8) else "data"] += 1
            assert status.startswith(
                f"damaged: {tmp_path}/cut.cap: {what} {first_number + k} at byte offset "
                f"{starts[k]}: the file ends inside "
            ), (cut, status)
            assert f"holds the {packets_before:,} packet" in status
        assert out == full[:packets_before], cut
    assert all(seen.values()), seen


@pytest.mark.parametrize(
    ("kind", "damage", "message"),
    [
        ("pcap", lambda r: r[:8] + struct.pack("<I", 0xFFFF0000) + r[12:],
         "record 3 at byte offset {at}: its header says 4,294,901,760 bytes captured, more "
         "than a record can hold (262,144): damaged here"),
        ("pcapng", lambda b: b[:4] + struct.pack("<I", len(b) + 1) + b[8:],
         "block 5 at byte offset {at}: its length {n1} is not a multiple of 4: damaged here"),
        ("pcapng", lambda b: b[:4] + struct.pack("<I", 8) + b[8:],
         "block 5 at byte offset {at}: its length 8 is shorter than a block: damaged here"),
        ("pcapng", lambda b: b[:4] + struct.pack("<I", 0x7FFFFFFC) + b[8:],
         "block 5 at byte offset {at}: its length 2,147,483,644 is more than 16,777,216: "
         "damaged here"),
        ("pcapng", lambda b: b[:-4] + struct.pack("<I", len(b) + 4),
         "block 5 at byte offset {at}: its trailing length {n4} differs from its length {n}: "
         "damaged here"),
        ("pcapng", lambda b: b[:8] + struct.pack("<I", 7) + b[12:],
         "block 5 at byte offset {at}: a packet of interface 7, which is not defined (1 are)"),
        ("pcapng", lambda b: b[:20] + struct.pack("<I", 70000) + b[24:],
         "block 5 at byte offset {at}: its captured length 70,000 runs past its end"),
    ],
)
def test_damaged_records_stop_the_replay_with_exit_5_where_and_how_many(
    tmp_path: Path, kind: str, damage: object, message: str
) -> None:
    """A damaged record (third packet) in an otherwise whole file: exit 5, one line on stderr
    saying where and what, the summary of what was replayed on stdout, and the output holding the
    two packets before it (rewritten)."""
    frames = sample_frames()[:2] + sample_frames()[3:6]  # IP only
    assert callable(damage)
    if kind == "pcap":
        head = pcap_bytes(1, [])
        records = [pcap_bytes(1, [(f, T0 + i)])[24:] for i, f in enumerate(frames)]
    else:
        head = shb() + idb(1)
        records = [epb(f, T0 + i) for i, f in enumerate(frames)]
    at = len(head) + len(records[0]) + len(records[1])
    n = len(records[2])
    records[2] = damage(records[2])
    (tmp_path / "in.cap").write_bytes(head + b"".join(records))
    (tmp_path / "out.pcap").write_text("an older output\n")
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path, RULES)), "in.cap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    expect = message.format(at=str(at), n=f"{n:,}", n1=f"{n + 1:,}", n4=f"{n + 4:,}")
    if "runs past" in expect:
        expect += f" ({n - 32:,} bytes)"
    assert proc.stderr.splitlines() == [
        f"nfrewrite replay: error: in.cap: {expect}; out.pcap holds the 2 packets replayed "
        "before it (the rest of the capture is not there: cut short or damaged)"
    ]
    lines = report(proc.stdout)
    assert "packets read 2" in lines and "packets written 2" in lines
    assert "rule grow 2 rewritten" in lines
    out = read_out(tmp_path / "out.pcap")[2]
    assert len(out) == 2 and all(b"[redacted!]" in f for f, _ in out)


def test_the_reader_agrees_with_scapys_on_whole_files(tmp_path: Path) -> None:
    """scapy as an oracle: pcap (µs, ns) and pcapng read by scapy give the same frames, lengths
    and timestamps as the replay of a rule set that matches nothing writes out."""
    from scapy.utils import PcapNgWriter, RawPcapWriter

    frames = sample_frames()
    rs = ruleset(tmp_path, '[[rule]]\nname = "none"\nmatch = { sport = 7 }\n'
                           'replace = [ { find = "zz", with = "z" } ]\n')
    for name, nano in (("us.pcap", False), ("ns.pcap", True)):
        writer = RawPcapWriter(str(tmp_path / name), linktype=1, nano=nano)
        writer.write_header(None)
        for i, f in enumerate(frames):
            writer.write_packet(f, sec=T0 + i, usec=123456 + i, wirelen=len(f) + i)
        writer.close()
    writer_ng = PcapNgWriter(str(tmp_path / "ng.pcapng"))
    for i, f in enumerate(frames):
        pkt = Ether(f)
        pkt.time = T0 + i + 0.5
        writer_ng.write(pkt)
    writer_ng.close()
    for name in ("us.pcap", "ns.pcap", "ng.pcapng"):
        reader = (RawPcapNgReader if name.endswith("ng") else RawPcapReader)(str(tmp_path / name))
        oracle = [(data, meta.wirelen) for data, meta in reader]
        reader.close()
        replay(rs, str(tmp_path / name), str(tmp_path / "out.pcap"))
        assert read_out(tmp_path / "out.pcap")[2] == oracle, name
        out_reader = RawPcapReader(str(tmp_path / "out.pcap"))
        times = [(m.sec, m.usec) for _, m in out_reader]
        out_reader.close()
        if name == "us.pcap":
            assert times == [(T0 + i, 123456 + i) for i in range(len(frames))]
        elif name == "ns.pcap":
            assert times == [(T0 + i, 123456 + i) for i in range(len(frames))]  # ns kept
        else:
            assert times == [(T0 + i, 500_000_000) for i in range(len(frames))]


# -- 3. segments cut at the MTU ------------------------------------------------------------------


@pytest.mark.parametrize(("where", "not_emitted"), [(0, 5), (1450, 15)])
def test_segments_cut_at_the_mtu_are_counted_with_the_bytes_not_emitted(
    tmp_path: Path, where: int, not_emitted: int
) -> None:
    """A 1,500-byte segment that "secret" -> "[redacted!]" grows by 5: at MTU 1500 it is cut,
    at the replacement's end when that fits (5 bytes not emitted), before it when it would
    straddle the MTU (the 11-byte replacement and the 4 bytes after it: 15 bytes). The next segment
    starts that many bytes after the end of what was emitted: the hole the summary reports.
    With --mtu 1505 nothing is cut and the stream has no hole."""
    body = bytearray(b"." * 1460)
    body[where:where + 6] = b"secret"
    first = segment(81, bytes(body), seq=1000)
    second = segment(81, b"more", seq=2460)
    assert len(first) == 1500
    (tmp_path / "in.pcap").write_bytes(pcap_bytes(101, [(first, T0), (second, T0 + 1)]))
    config = str(write_config(tmp_path, RULES))

    proc = nfrewrite("replay", "-c", config, "in.pcap", "out.pcap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"segments cut at the MTU 1 ({not_emitted} bytes not emitted; live the sender "
            "resends them; --mtu 1500)") in report(proc.stdout)
    out = [IP(f) for f, _ in read_out(tmp_path / "out.pcap")[2]]
    assert len(out[0]) == 1500 - (not_emitted - 5)
    emitted_end = out[0][TCP].seq + len(out[0][TCP].payload)
    assert out[1][TCP].seq - emitted_end == not_emitted
    assert bytes(out[0][TCP].payload) == bytes(body).replace(b"secret", b"[redacted!]")[
        :1460 + 5 - not_emitted]

    proc = nfrewrite("replay", "-c", config, "--mtu", "1505", "in.pcap", "big.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "segments cut" not in proc.stdout
    out = [IP(f) for f, _ in read_out(tmp_path / "big.pcap")[2]]
    assert len(out[0]) == 1505 and out[1][TCP].seq == out[0][TCP].seq + 1465

    assert nfrewrite("replay", "-c", config, "--mtu", "40", "in.pcap", "x.pcap",
                     cwd=tmp_path).returncode == 2


# -- 4. link type fields with FCS bits ------------------------------------------------------------


def with_fcs(frame: bytes) -> bytes:
    return frame + struct.pack("<I", zlib.crc32(frame))


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_ethernet_with_fcs_is_stripped_and_restored(tmp_path: Path, kind: str) -> None:
    """Link type field 0x24000001 (Ethernet, FCS present, 2 x 16 bits), or a pcapng interface
    with if_fcslen 4: a rewritten frame with a good FCS gets a fresh good one, one with a bad FCS
    keeps its (now certainly wrong) one, a frame not rewritten is written as it came, and a
    frame the snaplen cut inside its FCS is truncated_ip, unchanged."""
    plain = [lo(segment(81, b"a secret", seq=1000)),
             lo(segment(81, b"b secret", seq=5000)),
             lo(segment(9, b"not ours to rewrite"))]
    frames = [with_fcs(f) for f in plain]
    frames[1] = frames[1][:-4] + b"\xde\xad\xbe\xef"
    cut = with_fcs(plain[2])[:-2]  # the last two bytes of the FCS not captured
    if kind == "pcap":
        data = pcap_bytes(0x24000001, [(f, T0) for f in frames] + [(cut, T0, len(cut) + 2)])
    else:
        data = shb() + idb(1, options=option(13, b"\x04")) + b"".join(
            epb(f, T0) for f in frames) + epb(cut, T0, orig=len(cut) + 2)
    (tmp_path / "in.cap").write_bytes(data)
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path, RULES)), "in.cap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = report(proc.stdout)
    assert lines[0] == ("replay in.cap -> out.pcap (Ethernet, link type 1 (field 0x24000001), "
                        "4-byte FCS)")
    assert "rule grow 2 rewritten" in lines and "packets not ours 0" in lines
    linktype, _, out = read_out(tmp_path / "out.pcap")
    assert linktype == 0x24000001
    grown = [lo(segment(81, x + b" [redacted!]", seq=s))
             for x, s in ((b"a", 1000), (b"b", 5005))]  # the flow's offset: +5
    assert out == [
        (with_fcs(grown[0]), len(frames[0]) + 5),
        (grown[1] + b"\xde\xad\xbe\xef", len(frames[1]) + 5),
        (frames[2], len(frames[2])),
        (cut, len(cut) + 2),
    ]
    if TSHARK is not None:  # an independent check of the FCS and TCP checksums
        proc = subprocess.run(
            [TSHARK, "-r", str(tmp_path / "out.pcap"), "-o", "eth.check_fcs:TRUE", "-o",
             "tcp.check_checksum:TRUE", "-T", "fields", "-e", "eth.fcs.status", "-e",
             "tcp.checksum.status"], capture_output=True, text=True, timeout=60, check=True)
        assert [line.split("\t") for line in proc.stdout.splitlines()] == [
            ["1", "1"], ["0", "1"], ["1", "1"], ["", "1"]]  # good, bad, good, not captured


@pytest.mark.parametrize(
    ("field", "expect"),
    [
        (0x24000000 | 101, "link type 101 with a 4-byte FCS is not supported (of frames with an "
                           "FCS, only Ethernet with a 4-byte one is)"),
        (0x14000001, "link type 1 with a 2-byte FCS is not supported"),
        (0x08000001, "link type field 0x08000001 has unknown flag bits set (0x08000000)"),
        (0x24000000 | 147, "link type 147 (field 0x24000093) is not supported"),
    ],
)
def test_fcs_and_flag_bits_that_cannot_be_handled_are_refused_by_name(
    tmp_path: Path, field: int, expect: str
) -> None:
    (tmp_path / "in.pcap").write_bytes(pcap_bytes(field, [(b"\x00" * 60, T0)]))
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path, RULES)), "in.pcap", "out.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 4 and len(proc.stderr.splitlines()) == 1
    assert expect in proc.stderr, proc.stderr


# -- 5. the output: written aside, renamed on success only --------------------------------------


def test_a_refused_input_leaves_an_existing_output_as_it_was(tmp_path: Path) -> None:
    """A pcapng whose interface is DLT_NULL is refused at its first packet: the file already at
    the output path is not touched (nor deleted), and no temporary file is left behind."""
    (tmp_path / "null.pcapng").write_bytes(shb() + idb(0) + epb(b"\x02\x00\x00\x00" + segment(
        81, b"secret"), T0))
    (tmp_path / "o.pcap").write_text("x\n")
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path, RULES)), "null.pcapng", "o.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 4 and "link type 0 is not supported" in proc.stderr
    assert (tmp_path / "o.pcap").read_text() == "x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "nfrewrite.toml", "null.pcapng", "o.pcap", "rules"]


def test_a_successful_replay_replaces_the_output_and_keeps_its_mode(tmp_path: Path) -> None:
    (tmp_path / "in.pcap").write_bytes(pcap_bytes(101, [(segment(81, b"secret"), T0)]))
    config = str(write_config(tmp_path, RULES))
    (tmp_path / "o.pcap").write_text("x\n")
    os.chmod(tmp_path / "o.pcap", 0o640)
    os.symlink("o.pcap", tmp_path / "link.pcap")
    proc = nfrewrite("replay", "-c", config, "in.pcap", "link.pcap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.pcap").is_symlink()  # written through, as a plain open would
    assert stat.S_IMODE((tmp_path / "o.pcap").stat().st_mode) == 0o640
    assert b"[redacted!]" in read_out(tmp_path / "o.pcap")[2][0][0]
    proc = nfrewrite("replay", "-c", config, "in.pcap", "new.pcap", cwd=tmp_path)
    assert proc.returncode == 0
    assert stat.S_IMODE((tmp_path / "new.pcap").stat().st_mode) == 0o644  # umask 022
    proc = nfrewrite("replay", "-c", config, "in.pcap", "/dev/null", cwd=tmp_path)
    assert proc.returncode == 0 and stat.S_ISCHR(os.stat("/dev/null").st_mode)


# -- 6. snaplen -----------------------------------------------------------------------------------


def test_snaplen_cut_packets_are_truncated_ip_and_the_snaplen_is_kept(tmp_path: Path) -> None:
    """snaplen 128: a long segment captured cut is truncated_ip (not bad_total_length), written
    unchanged; a short one is rewritten; the output header keeps 128. A frame that grows past the
    snaplen raises the header's snaplen to its length (or readers would cut it)."""
    long = lo(segment(81, b"secret" * 100))
    short = lo(segment(81, b"secret", seq=9000))
    (tmp_path / "in.pcap").write_bytes(pcap_bytes(1, [(long[:128], T0, len(long)),
                                                      (short, T0)], snaplen=128))
    config = str(write_config(tmp_path, RULES))
    proc = nfrewrite("replay", "-c", config, "in.pcap", "out.pcap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "packets not ours 1 (truncated_ip 1)" in report(proc.stdout)
    linktype, snaplen, out = read_out(tmp_path / "out.pcap")
    assert (linktype, snaplen) == (1, 128)
    assert out[0] == (long[:128], len(long)) and b"[redacted!]" in out[1][0]

    exact = lo(segment(81, b"x" * 40 + b"secret", seq=9000))
    (tmp_path / "full.pcap").write_bytes(pcap_bytes(1, [(exact, T0)], snaplen=len(exact)))
    proc = nfrewrite("replay", "-c", config, "full.pcap", "grown.pcap", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, snaplen, out = read_out(tmp_path / "grown.pcap")
    assert snaplen == len(exact) + 5 == len(out[0][0])
    reader = RawPcapReader(str(tmp_path / "grown.pcap"))  # a reader that honours the snaplen
    assert [len(d) for d, _ in reader] == [len(exact) + 5]
    reader.close()


def test_pcapng_snaplen_is_kept(tmp_path: Path) -> None:
    frame = lo(segment(81, b"secret" * 100))
    (tmp_path / "in.pcapng").write_bytes(shb() + idb(1, 300) + epb(frame[:300], T0, orig=len(
        frame)))
    proc = nfrewrite("replay", "-c", str(write_config(tmp_path, RULES)), "in.pcapng", "o.pcap",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "packets not ours 1 (truncated_ip 1)" in report(proc.stdout)
    assert read_out(tmp_path / "o.pcap")[:2] == (1, 300)
