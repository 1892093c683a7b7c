"""Engine cost per 64 KB GSO super-packet, with and without the kernel's GSO flag passed in.

``python -m bench.bench_engine``: a flow of 64,000-byte super-packets carrying the bench pattern
every 1024 bytes (as ``make bench`` rows 4 and 5), each followed by the receiver's ACK, through
``Engine.process`` for row 4's same-length rule and row 5's length-changing one. Each job runs
twice, interleaved: ``gso=True`` (what the queue loop passes for a GSO skb: the kernel sets the
segments' checksums up itself, so the engine leaves the seed) and ``gso=None`` (not told: a
complete checksum over the 64 KB). Prints microseconds per data packet and per ACK, best of the
rounds (absolute times drift on a shared machine; the ratio is the figure).
"""

from __future__ import annotations

import os
import tempfile
import time

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from bench.lab_bench import PATTERN, PERIOD, SAME, SHORT
from nfrewrite.config.rulefiles import load_rules
from nfrewrite.core.engine import Engine
from nfrewrite.core.rules import RuleSet
from nfrewrite.core.seqadj import FlowTable

PACKETS = 200
SIZE = 64_000
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]


def _rules(with_: bytes) -> RuleSet:
    d = tempfile.mkdtemp(prefix="nfr-bench-engine-")
    os.mkdir(os.path.join(d, "rules"))
    with open(os.path.join(d, "rules", "r.toml"), "w") as f:
        f.write(f'[[rule]]\nname = "r"\nmatch = {{ dport = 5201 }}\n'
                f'replace = [ {{ find = "{PATTERN.decode()}", with = "{with_.decode()}" }} ]\n')
    rs, diags = load_rules(os.path.join(d, "rules"))
    assert rs is not None, [x.format() for x in diags]
    return rs


def _stream(with_: bytes) -> list[tuple[bytes, bytes]]:
    payload = ((PATTERN + b"y" * (PERIOD - len(PATTERN))) * (SIZE // PERIOD + 1))[:SIZE]
    shrink = (len(PATTERN) - len(with_)) * payload.count(PATTERN)
    out = []
    for i in range(PACKETS):
        data = IP(src="198.18.0.1", dst="198.18.0.2") / TCP(
            sport=40000, dport=5201, seq=1000 + i * SIZE, ack=1, flags="PA", options=TS)
        ack = IP(src="198.18.0.2", dst="198.18.0.1") / TCP(
            sport=5201, dport=40000, seq=1, ack=1000 + (i + 1) * (SIZE - shrink), flags="A",
            options=TS)
        out.append((bytes(data / Raw(payload)), bytes(ack)))
    return out


def _run(rules: RuleSet, stream: list[tuple[bytes, bytes]], gso: bool | None) -> tuple[float,
                                                                                        float]:
    engine = Engine(rules, FlowTable(), mtu=1500)
    t_data = t_ack = 0.0
    clock = time.perf_counter
    for i, (data, ack) in enumerate(stream):
        t0 = clock()
        res = engine.process(data, now=i * 1e-3, csum_partial=True, gso=gso)
        t1 = clock()
        engine.process(ack, now=i * 1e-3)
        t2 = clock()
        assert res.packet is not None
        t_data += t1 - t0
        t_ack += t2 - t1
    return t_data / len(stream) * 1e6, t_ack / len(stream) * 1e6


def main(rounds: int = 5) -> None:
    for label, with_ in (("same-length (row 4)", SAME), ("length-changing (row 5)", SHORT)):
        rules, stream = _rules(with_), _stream(with_)
        best: dict[bool | None, tuple[float, float]] = {}
        for _ in range(rounds):
            for gso in (True, None):
                got = _run(rules, stream, gso)
                if gso not in best or got[0] < best[gso][0]:
                    best[gso] = got
        (g_data, g_ack), (n_data, _) = best[True], best[None]
        print(f"engine, 64 KB packet, {label}: {g_data:.1f} us with gso=True vs {n_data:.1f} us "
              f"with a full checksum ({n_data / g_data:.2f}x); its ACK {g_ack:.1f} us")


if __name__ == "__main__":
    main()
