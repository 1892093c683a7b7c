"""The reference: the least a NetfilterQueue program can do, accept every packet unread.

``python -m bench.ref_nfq --queue N`` binds NFQUEUE ``N`` (copy mode "packet", the daemon's queue
length and socket buffer) and gives every packet ACCEPT from NetfilterQueue's own C receive loop,
without reading the payload. Its throughput is what the kernel <-> userspace round trip alone
allows through one Python process; the daemon's queued figures are divided by it. It prints
``READY`` once bound and, on SIGTERM/SIGINT, one JSON line with the number of packets seen.

It installs no firewall rule: the bench puts one NFQUEUE rule in the lab's appliance namespace.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from typing import Any

from netfilterqueue import NetfilterQueue

MAXLEN = 4096  # the daemon's default [queue] maxlen
SOCK_BUF = 8 << 20  # the daemon's default [queue] sock_buf


class _Stop(Exception):
    pass


def _stop(*_: object) -> None:
    raise _Stop


def serve(queue_num: int, callback: Any, ready: str = "READY") -> None:
    """Bind ``queue_num`` with ``callback``, print ``ready``, loop until SIGTERM/SIGINT."""
    nfq = NetfilterQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the kernel may cap the buffer
        nfq.bind(queue_num, callback, max_len=MAXLEN, sock_len=SOCK_BUF)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(ready, flush=True)
    try:
        nfq.run()
    except _Stop:
        pass
    finally:
        nfq.unbind()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ref_nfq")
    p.add_argument("--queue", type=int, default=0)
    a = p.parse_args(argv)
    seen = [0]

    def accept(pkt: Any) -> None:
        seen[0] += 1
        pkt.accept()

    serve(a.queue, accept)
    print(json.dumps({"packets": seen[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
