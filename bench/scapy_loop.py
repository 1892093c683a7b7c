"""The anchor: the same-length rewrite of bench row 4 written the usual way, with scapy.

``python -m bench.scapy_loop --queue N --find HEX --with HEX`` binds NFQUEUE ``N`` like
:mod:`bench.ref_nfq` and, for each packet, parses it with scapy, replaces every ``find`` in the
TCP payload with ``with`` (same length), deletes both checksums so scapy recomputes them, rebuilds
the bytes and accepts the packet with them. Packets without the pattern are accepted unchanged.
This is the common "NetfilterQueue + scapy" recipe, kept honest (nothing cached, no shortcuts);
its throughput is the yardstick for how far the purpose-built packet core gets.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from bench.ref_nfq import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scapy_loop")
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--find", required=True, help="hex")
    p.add_argument("--with", dest="with_", required=True, help="hex, same length as --find")
    a = p.parse_args(argv)
    find, with_ = bytes.fromhex(a.find), bytes.fromhex(a.with_)
    if len(find) != len(with_):
        p.error("--find and --with must have the same length")
    counts = {"packets": 0, "modified": 0}

    def rewrite(nfq_pkt: Any) -> None:
        counts["packets"] += 1
        pkt = IP(nfq_pkt.get_payload())
        if pkt.haslayer(TCP) and pkt.haslayer(Raw):
            load = pkt[Raw].load
            if find in load:
                pkt[Raw].load = load.replace(find, with_)
                del pkt[IP].chksum
                del pkt[TCP].chksum
                nfq_pkt.set_payload(bytes(pkt))
                counts["modified"] += 1
        nfq_pkt.accept()

    serve(a.queue, rewrite)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
