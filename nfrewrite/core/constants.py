"""The numbers the pure core and the kernel shell must agree on, defined once.

Theory of operation
-------------------
The engine decides (a verdict, maybe new bytes), the queue loop carries the decision out, the
firewall compiles the rules that bring a flow's packets back: each reads these values, and a
second copy of any of them in one place would let the two sides drift apart silently. This
module holds only constants and imports nothing, so every part can import it: the core stays
pure, and the shell need not import a neighbour (say, the firewall's subprocess driver) for one
number.
"""

from __future__ import annotations

# -- verdicts: what Engine.process decides and the queue loop gives the kernel ---------------------
DROP = 0
ACCEPT = 1
#: Not a netfilter verdict: "no verdict yet". The engine held the packet (its payload ends in
#: the beginning of a pattern); the shell keeps it queued and gives its verdict when the engine
#: releases it (see :mod:`nfrewrite.core.stream`). Never sent to the kernel.
HOLD = 0x7F

#: The packet-mark bit that says "this flow has a sequence offset: queue all of it". The queue
#: loop sets it in the verdict; the firewall copies it into the conntrack mark and back, and
#: touches no other bit, so the host's own use of the mark is left alone.
FLOW_MARK = 0x01000000
FLOW_MARK_MASK = 0x01000000

#: The longest packet a verdict can hand back to NFQUEUE: 65,535 minus the 4-byte attribute
#: header, because the payload travels in a netlink attribute whose 16-bit length counts that
#: header too. libnetfilter_queue writes a longer one's length truncated; the kernel then parses
#: the verdict without a payload ("netlink: 3 bytes leftover after parsing attributes") and sends
#: the *original* packet on (seen: a super-packet grown to 65,535 bytes reached the client with
#: its old bytes at its old sequence numbers, inside a connection whose offsets had moved).
MAX_VERDICT_PACKET = 0xFFFF - 4

# -- TCP flags (the header's 14th byte, offset 13) -------------------------------------------------
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80
