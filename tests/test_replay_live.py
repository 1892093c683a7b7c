"""`nfrewrite replay` does to a capture exactly what the live daemon did to the same traffic.

In the lab, tshark captures both ends while the daemon rewrites a connection in both directions
(same-length and length-changing edits, so sequence adjustment is exercised). The packets as they
were sent (client->server from the client's capture, server->client from the server's) are merged
in time order and replayed offline; the result must equal, packet for packet and byte for byte at
the IP layer, what arrived at the other ends. tshark then validates the checksums of the output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap, wrpcap

from nfrewrite.lab import Daemon, Lab, tcp_exchange, write_lab_config

pytestmark = pytest.mark.privileged

RULES = """
[[rule]]
name = "c2s"
match = { dport = 8080 }
replace = [ { find = "hello", with = "HELLO" }, { find = "grow", with = "grown-longer" } ]

[[rule]]
name = "s2c"
match = { sport = 8080 }
replace = [ { find = "shrink-me-please", with = "ok" } ]
"""

NO_OFFLOAD = {"tx": False, "tso": False, "gso": False}



def _tshark(lab: Lab, role: str, pcap: str) -> subprocess.Popen[bytes]:
    proc = lab.popen(role, ["tshark", "-q", "-i", "eth0", "-f", "tcp port 8080", "-w", pcap],  # type: ignore[arg-type]
                     stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (os.path.exists(pcap) and os.path.getsize(pcap)):
        time.sleep(0.1)
    time.sleep(1.0)
    return proc


def _ip_packets(pcap: str) -> list[tuple[float, bytes]]:
    return [(float(p.time), bytes(p[IP])) for p in rdpcap(pcap) if IP in p and TCP in p]


@pytest.mark.parametrize(
    "lab", [{"client_offloads": NO_OFFLOAD, "server_offloads": NO_OFFLOAD}], indirect=True
)
def test_replay_reproduces_the_live_daemon_packet_for_packet(lab: Lab, workdir: str) -> None:
    config = write_lab_config(workdir, {"10.toml": RULES})
    cli_pcap = os.path.join(workdir, "client.pcapng")
    srv_pcap = os.path.join(workdir, "server.pcapng")
    up = b"".join(b"hello %d grow;" % i for i in range(3000))
    down = b"".join(b"<shrink-me-please %d>" % i for i in range(3000))
    with Daemon(lab, config):
        lab.wait_reachable()
        caps = [_tshark(lab, "client", cli_pcap), _tshark(lab, "server", srv_pcap)]
        got = tcp_exchange(lab, up, down, chunk=1000)
        time.sleep(1.0)
        for cap in caps:
            cap.send_signal(signal.SIGINT)
            cap.wait(10)
    assert b"grown-longer" in got.server_received and b"<ok " in got.client_received

    client_side = _ip_packets(cli_pcap)
    server_side = _ip_packets(srv_pcap)
    c2s = lambda raw: IP(raw)[TCP].dport == 8080  # noqa: E731
    sent = sorted([p for p in client_side if c2s(p[1])] + [p for p in server_side
                                                           if not c2s(p[1])])
    arrived_c2s = [raw for _, raw in server_side if c2s(raw)]
    arrived_s2c = [raw for _, raw in client_side if not c2s(raw)]
    assert len(arrived_c2s) > 20 and len(arrived_s2c) > 20

    replay_in = os.path.join(workdir, "in.pcap")
    replay_out = os.path.join(workdir, "out.pcap")
    pkts = [IP(raw) for _, raw in sent]
    for p, (t, _) in zip(pkts, sent, strict=True):
        p.time = t
    wrpcap(replay_in, pkts)  # raw IP link type
    res = subprocess.run(
        [sys.executable, "-m", "nfrewrite", "replay", "-c", config, replay_in, replay_out],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr
    out = [bytes(p[IP]) for p in rdpcap(replay_out)]
    assert [raw for raw in out if c2s(raw)] == arrived_c2s
    assert [raw for raw in out if not c2s(raw)] == arrived_s2c

    bad = subprocess.run(
        ["tshark", "-r", replay_out, "-o", "tcp.check_checksum:TRUE",
         "-o", "ip.check_checksum:TRUE",
         "-Y", "tcp.checksum.status == 0 || ip.checksum.status == 0"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert bad.strip() == ""
    total = subprocess.run(["tshark", "-r", replay_out], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert len(total.splitlines()) == len(out)
