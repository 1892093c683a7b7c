"""GSO super-packets through the queue: taken whole, rewritten, checksummed right, in the lab.

The daemon sets the queue's GSO flag by default (``[queue] gso``). The client's veth keeps its
default offloads (TSO and TX checksum on), so its TCP stack hands the bridge super-packets of up to
64 KB whose TCP checksum field holds only the pseudo-header seed. What is checked, per family:

* also when the bridge ports cannot segment (``offloads = { tso = false, gso = false }``), so the
  kernel segments the changed super-packets in software on the way out;
* the super-packets really come to the queue whole: the kernel's own per-queue packet counter
  (``/proc/net/netfilter/nfnetlink_queue``) moves far fewer times than there are wire segments,
  and with ``gso = false`` at least once per wire segment (the kernel segments them first);
* every occurrence arrives rewritten, byte for byte, and nothing else changed (but for an
  occurrence split between two packets, the documented limit: at most one per packet);
* the server's TCP layer counted no checksum error. A changed super-packet goes back as
  CHECKSUM_NONE and is segmented by the kernel, which sets each segment's checksum up itself (the
  engine leaves the seed; ``tests/test_queue.py`` shows the kernel ignores the field); every
  wire-size packet we change (the end of a write, a retransmission) gets the engine's complete
  checksum, which the server verifies. (A wrong one means a drop, a retransmission that is
  rewritten the same way, and a stall.)

Retransmissions do happen, and are not asserted on: the same-length literal rule gets the xt
``string`` prefilter, so a packet of the flow without the pattern (a short one at the end of a
write) stays in the kernel and overtakes the packets waiting in the queue. The receiver sees
reordering and the sender retransmits early. Seen: 0-40 such retransmissions per 4 MB, nearly
all reported back as duplicates (D-SACK); a receiver reports one D-SACK block per ACK, so the two
counts need not match exactly (a CI run had 39 against 35).
"""

from __future__ import annotations

import os

import pytest

from lab.netns import Daemon, Lab, tcp_exchange, write_lab_config

pytestmark = pytest.mark.privileged

PATTERN, REPLACEMENT = b"NFREWRITE-GSO-16", b"nfrewrite-gso-16"
RULE = f"""
[[rule]]
name = "gso"
match = {{ dport = 8080 }}
replace = [ {{ find = "{PATTERN.decode()}", with = "{REPLACEMENT.decode()}" }} ]
"""
SIZE = 4 << 20
WIRE_PAYLOAD = 1448  # a full-size segment's payload on the lab's 1500-byte MTU (timestamps on)


def _body() -> bytes:
    # the pattern every 1000 bytes, random filler (so that no other run of bytes matches)
    unit = os.urandom(SIZE // 1000 * (1000 - len(PATTERN))).hex().encode()
    step = 1000 - len(PATTERN)
    return b"".join(PATTERN + unit[i : i + step] for i in range(0, SIZE // 1000 * step, step))


def _queued(lab: Lab) -> int:
    """Packets the kernel has queued so far, all queues of the appliance namespace."""
    text = lab.run("appliance", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return sum(int(cols[7]) for cols in (line.split() for line in text.splitlines())
               if len(cols) >= 8)


@pytest.mark.parametrize(("gso", "port_offloads"), [
    (True, ""),
    # the bridge ports cannot segment: a changed super-packet (CHECKSUM_NONE) is cut into wire
    # segments in software on its way out (as it is anyway: it is not CHECKSUM_PARTIAL)
    (True, "{ tso = false, gso = false }"),
    (False, ""),
], ids=["gso", "gso-ports-without-tso", "no-gso"])
@pytest.mark.parametrize("family", [4, 6])
def test_super_packets_are_queued_whole_and_arrive_rewritten_with_right_checksums(
    lab: Lab, workdir: str, family: int, gso: bool, port_offloads: str
) -> None:
    body = _body()
    config = write_lab_config(workdir, {"10-gso.toml": RULE}, gso=gso, offloads=port_offloads)
    with Daemon(lab, config):
        lab.wait_reachable()
        queued_before = _queued(lab)
        server_before = lab.tcp_counters("server")
        got = tcp_exchange(lab, body, b"ok", family=family, timeout=60, chunk=1 << 16)
        queued = _queued(lab) - queued_before
        server_after = lab.tcp_counters("server")
    arrived = got.server_received
    # nothing but occurrences changed; an occurrence split between two packets is not seen (the
    # documented limit): at most one per packet boundary
    assert arrived.replace(REPLACEMENT, PATTERN) == body
    missed = arrived.count(PATTERN)
    assert missed <= queued and missed < body.count(PATTERN) // 20, (missed, queued)
    assert got.client_received == b"ok"
    assert server_after["Tcp.InCsumErrors"] - server_before["Tcp.InCsumErrors"] == 0
    wire_segments = SIZE // WIRE_PAYLOAD
    if gso:
        assert queued < wire_segments / 4, (queued, wire_segments)
    else:
        assert queued >= wire_segments, (queued, wire_segments)
