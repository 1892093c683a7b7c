"""`nfrewrite replay` over what `tcpdump -i lo` really records: 64 KB segments, 65,549-byte frames.

Inside the lab's client namespace (its own loopback, TSO on, MTU 65536) a connection over
127.0.0.1 sends 512 KB in which a pattern recurs; tcpdump writes the capture. Its longest frames
must be longer than 65,535 bytes, and the replay must take them whole: no packet "not ours", the
shrinking rule applied to every segment that holds the pattern, and the output's records as long
as the input's minus the bytes the edits removed.
"""

from __future__ import annotations

import os
import struct
import sys

import pytest

from lab.netns import Lab
from tests.test_replay import nfrewrite, report, write_config

pytestmark = pytest.mark.privileged

RULES = """
[[rule]]
name    = "shrink"
match   = { dport = 9000 }
replace = [ { find = "a-long-secret", with = "x" } ]
"""

CHUNK = b"." * 987 + b"a-long-secret"  # 1000 bytes: one occurrence per 1000

TALK = f"""
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 9000))
srv.listen(1)
got = []
def serve():
    conn, _ = srv.accept()
    while data := conn.recv(1 << 20):
        got.append(len(data))
    conn.close()
t = threading.Thread(target=serve)
t.start()
c = socket.create_connection(("127.0.0.1", 9000))
c.sendall({CHUNK!r} * 512)
c.close()
t.join()
print(sum(got))
"""


def records(path: str) -> list[tuple[bytes, int]]:
    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4
    at, out = 24, []
    while at < len(data):
        _, _, caplen, wirelen = struct.unpack_from("<IIII", data, at)
        out.append((data[at + 16:at + 16 + caplen], wirelen))
        at += 16 + caplen
    return out


def test_a_loopback_capture_of_64kb_segments_is_replayed_whole(lab: Lab, workdir: str) -> None:
    pcap = os.path.join(workdir, "lo.pcap")
    dump = lab.tcpdump("client", ["-i", "lo", "-U", "-s", "0", "-w", pcap, "tcp port 9000"])
    proc = lab.run("client", [sys.executable, "-c", TALK], env=lab.python_env(), timeout=60)
    assert proc.stdout.strip() == str(len(CHUNK) * 512)
    dump.terminate()
    dump.wait(timeout=10)

    frames = records(pcap)
    longest = max(len(f) for f, _ in frames)
    assert longest > 65_535, longest  # what scapy's readers would have cut
    assert all(len(f) == w for f, w in frames)  # tcpdump -s 0: every frame whole

    tmp = os.path.join(workdir, "replay")
    os.mkdir(tmp)
    from pathlib import Path

    config = write_config(Path(tmp), RULES)
    out = os.path.join(workdir, "out.pcap")
    # --mtu 65536: the loopback's, so that nothing is cut
    result = nfrewrite("replay", "-c", str(config), "--mtu", "65536", pcap, out, cwd=Path(tmp))
    assert result.returncode == 0, result.stderr
    lines = report(result.stdout)
    assert "packets not ours 0" in lines, lines
    assert "segments cut" not in result.stdout and "too long" not in result.stdout
    written = records(out)
    assert len(written) == len(frames)
    for (before, _), (after, wirelen) in zip(frames, written, strict=True):
        n = before.count(b"a-long-secret")
        assert after.count(b"a-long-secret") == 0 and wirelen == len(after)
        assert len(after) == len(before) - 12 * n
    # (the rule's count leaves out retransmitted edits, so it can be below the frames' count)
    hits = sum(1 for f, _ in frames if b"a-long-secret" in f)
    counted = [int(line.split()[2]) for line in lines if line.startswith("rule shrink ")]
    assert hits and 0 < counted[0] <= hits, lines
