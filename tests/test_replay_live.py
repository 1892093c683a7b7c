"""`nfrewrite replay` does to a capture exactly what the live daemon did to the same traffic.

In the lab the daemon rewrites a connection in both directions (same-length and length-changing
edits, so sequence and ACK adjustment are exercised) while tshark captures at both ends and, with
one socket on all interfaces, inside the appliance. The packets as the daemon's queue received
them are replayed offline, in the order the queue received them; the result must equal, packet
for packet and byte for byte at the IP layer, what the daemon let out of the appliance (both
directions, interleaved as they left) and, per direction, what arrived at the other end.
tshark then validates the checksums of the output.

Why the order is the queue's own, and why that order can be known exactly
--------------------------------------------------------------------------
The engine's state at a packet depends on every packet it handled before, including those of the
other direction (an ACK is mapped through the offsets of the segments seen so far), so the replay
must be fed in the daemon's order, not in an order that merely looks plausible. The end captures
do not give that order: a veth hands a packet to the receive path of the CPU that sent it, and a
client's pure ACK sent from its delayed-ACK timer on one CPU and the data segment its writer sends
right after on another are then received concurrently, on two CPUs, and may reach the queue in
the other order than the client's capture shows (fed in capture order, this test once failed so).
A tap inside the appliance alone does not cure it: with two CPUs receiving on the same port at
once, the tap of one packet and its NFQUEUE enqueue are not atomic, and the other CPU's packet can
pass between them; nor can captures of two ports be merged by timestamp. An NFLOG rule before the
queue has the same gap (two actions of one hook, not one), and a netlink monitor device, which would
show the queue's own messages, is not built into every kernel (this one's lacks it).

So the test makes the appliance's receive path serial: RPS steers everything ``nfr0`` and
``nfr1`` receive to one CPU (``Lab.steer_receive``). That CPU empties its backlog in order and
takes each packet through the whole receive path (the packet-socket tap, the bridge, br_netfilter's
FORWARD hook, the NFQUEUE enqueue) before it takes the next one, so the order in which one packet
socket bound to all interfaces sees the arriving packets *is* the queue's order, both directions
interleaved; the queue's single worker reads them in that order. Which CPU sent a packet no
longer matters. (The capture file is read in file order: the timestamps are taken when a packet
entered a backlog, possibly on another CPU, so sorting by them would bring the race back.)

The other half is what leaves. The worker gives one verdict at a time, and each verdict takes its
packet synchronously through the rest of the hooks to the egress port (veths have no qdisc),
where the same socket sees it leave: that is the daemon's output order. Each end's ``eth0`` is
steered to one CPU as well, so the packets the verdicts hand to it, one after another, are
received in that order and the end's capture shows them as the daemon sent them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import CookedLinux, CookedLinuxV2
from scapy.utils import rdpcap, wrpcap

from lab.netns import Daemon, Lab, Role, tcp_exchange, write_lab_config

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

PACKET_OUTGOING = 4  # the cooked header's packet type of a packet the capturing host sent


def _tshark(lab: Lab, role: Role, iface: str, pcap: str) -> subprocess.Popen[bytes]:
    proc = lab.popen(role, ["tshark", "-q", "-i", iface, "-f", "tcp port 8080", "-w", pcap],
                     stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (os.path.exists(pcap) and os.path.getsize(pcap)):
        time.sleep(0.1)
    time.sleep(1.0)
    return proc


def _ip_packets(pcap: str) -> list[tuple[float, bytes]]:
    """The TCP/IP packets of a capture, in file order (the order the socket saw them)."""
    return [(float(p.time), bytes(p[IP])) for p in rdpcap(pcap) if IP in p and TCP in p]


def _appliance_packets(pcap: str) -> tuple[list[tuple[float, bytes]], list[bytes]]:
    """(arriving, leaving) packets of the all-interfaces capture in the appliance, file order."""
    arriving: list[tuple[float, bytes]] = []
    leaving: list[bytes] = []
    for p in rdpcap(pcap):
        if IP not in p or TCP not in p:
            continue
        cooked = p[CookedLinux] if CookedLinux in p else p[CookedLinuxV2]
        if cooked.pkttype == PACKET_OUTGOING:
            leaving.append(bytes(p[IP]))
        else:
            arriving.append((float(p.time), bytes(p[IP])))
    return arriving, leaving


def c2s(raw: bytes) -> bool:
    return bool(IP(raw)[TCP].dport == 8080)


@pytest.mark.parametrize(
    "lab", [{"client_offloads": NO_OFFLOAD, "server_offloads": NO_OFFLOAD}], indirect=True
)
def test_replay_reproduces_the_live_daemon_packet_for_packet(lab: Lab, workdir: str) -> None:
    cpu = min(os.sched_getaffinity(0))
    receivers: tuple[tuple[Role, str], ...] = (
        ("appliance", "nfr0"), ("appliance", "nfr1"), ("client", "eth0"), ("server", "eth0"))
    for role, dev in receivers:
        lab.steer_receive(role, dev, cpu)
    # one worker: one reader of the queue, one verdict at a time
    config = write_lab_config(workdir, {"10.toml": RULES}, workers=1)
    with open(config, "a") as f:
        # Segments that end in a pattern's beginning are held for the next one (the stream
        # matcher). Whether a hold expires is a matter of time: the daemon's clock when its timer
        # fires, the replay's the capture's timestamps, taken elsewhere. A deadline far longer
        # than any gap in this exchange makes that decision the same in both (every group is
        # completed by its next segment), so the comparison stays exact, holds included.
        f.write("\n[flows]\nhold_ms = 1000\n")
    cli_pcap = os.path.join(workdir, "client.pcapng")
    srv_pcap = os.path.join(workdir, "server.pcapng")
    app_pcap = os.path.join(workdir, "appliance.pcapng")
    up = b"".join(b"hello %d grow;" % i for i in range(3000))
    down = b"".join(b"<shrink-me-please %d>" % i for i in range(3000))
    with Daemon(lab, config):
        lab.wait_reachable()
        caps = [_tshark(lab, "client", "eth0", cli_pcap), _tshark(lab, "server", "eth0", srv_pcap),
                _tshark(lab, "appliance", "any", app_pcap)]
        got = tcp_exchange(lab, up, down, chunk=1000)
        time.sleep(1.0)
        for cap in caps:
            cap.send_signal(signal.SIGINT)
            cap.wait(10)
    assert b"grown-longer" in got.server_received and b"<ok " in got.client_received

    client_side = [raw for _, raw in _ip_packets(cli_pcap)]
    server_side = [raw for _, raw in _ip_packets(srv_pcap)]
    queued, left = _appliance_packets(app_pcap)
    arrived_c2s = [raw for raw in server_side if c2s(raw)]
    arrived_s2c = [raw for raw in client_side if not c2s(raw)]
    assert len(arrived_c2s) > 20 and len(arrived_s2c) > 20
    # the appliance capture is complete: it holds every packet each end sent, no other
    assert sorted(raw for _, raw in queued if c2s(raw)) == sorted(
        raw for raw in client_side if c2s(raw))
    assert sorted(raw for _, raw in queued if not c2s(raw)) == sorted(
        raw for raw in server_side if not c2s(raw))

    replay_in = os.path.join(workdir, "in.pcap")
    replay_out = os.path.join(workdir, "out.pcap")
    pkts = [IP(raw) for _, raw in queued]
    last = 0.0
    for p, (t, _) in zip(pkts, queued, strict=True):
        # the daemon's clock runs forward in queue order; a backlog timestamp may not
        last = max(last, t)
        p.time = last
    wrpcap(replay_in, pkts)  # raw IP link type
    res = subprocess.run(
        [sys.executable, "-m", "nfrewrite", "replay", "-c", config, replay_in, replay_out],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr
    held = re.search(r"^segments held +(\d+)", res.stdout, re.M)
    assert held and int(held[1]) > 0, res.stdout  # the exchange exercised the holds
    out = [bytes(p[IP]) for p in rdpcap(replay_out)]
    assert out == left
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
