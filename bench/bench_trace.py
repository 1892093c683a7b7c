"""The trace hook's cost per packet: the worker's packet handler with and without it, side by side.

``python -m bench.bench_trace``: row 4's job (``make bench``: same-length replace of the bench
pattern, present every 1024 bytes, in 64,000-byte GSO super-packets) and the same job in wire-size
segments (1448 payload bytes, one or two copies each: row 4n), through three handlers:

``none``
    the daemon's worker handler *without* the trace hook: ``daemon.worker_main``'s own source with
    the hook's lines (the ``if`` marked ``# trace hook`` and its body) taken out, compiled here;
``off``
    the daemon's worker handler as it runs (``daemon.worker_main`` itself), nobody tracing;
``on``
    the same while a client traces every rule: records go to a trace socket that a thread drains,
    at most ``trace.MAX_RECORDS_PER_SECOND`` a second, the rest dropped and counted.

The handlers are the real ones: ``worker_main`` runs here with a stand-in for the queue (which
hands over the handler and the idle hook instead of binding NFQUEUE) and a stand-in pipe, so engine,
metrics and hook are exactly what a worker runs. Rounds interleave the three (A B C, C B A, ...)
so drift on a shared machine hits all alike; each figure is the median over rounds of the time
per packet, and *noise* is half the spread (max - min) of ``none``'s rounds relative to its
median. The hook is "within noise" when ``off / none - 1`` is at most that.
"""

from __future__ import annotations
import __future__

import contextlib
import inspect
import os
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from bench.lab_bench import BULK_PORT, PATTERN, PERIOD, SAME, rule_same
from nfrewrite.config.rulefiles import load_rules
from nfrewrite.config.settings import Config, FlowsConfig
from nfrewrite.core.rules import RuleSet
from nfrewrite.kernel.queue import PacketMeta
from nfrewrite.service import daemon
from nfrewrite.service.trace import socket_pair

ROUNDS = 40
PASSES = 3  # over the packet list per round and handler
SUPER = 64_000
WIRE = 1448
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
Handler = Callable[[bytes, PacketMeta], tuple[int, bytes | None]]


def _ruleset() -> RuleSet:
    with tempfile.TemporaryDirectory(prefix="nfr-bench-trace-") as d:
        with open(os.path.join(d, "10-same.toml"), "w") as f:
            f.write(rule_same())
        rs, diags = load_rules(d)
    assert rs is not None, [x.format() for x in diags]
    return rs


def _packets(size: int, count: int) -> list[bytes]:
    payload = ((PATTERN + b"y" * (PERIOD - len(PATTERN))) * (size // PERIOD + 2))
    out = []
    for i in range(count):
        start = (i * size) % PERIOD
        data = IP(src="198.18.0.1", dst="198.18.0.2") / TCP(
            sport=40000, dport=BULK_PORT, seq=1000 + i * size, ack=1, flags="PA", options=TS)
        out.append(bytes(data / Raw(payload[start:start + size])))
    return out


class _Pipe:
    """The worker's end of its pipe: what the supervisor would send, queued."""

    def __init__(self) -> None:
        self.inbox: list[Any] = []

    def send(self, message: Any) -> None:
        pass

    def poll(self) -> bool:
        return bool(self.inbox)

    def recv(self) -> Any:
        return self.inbox.pop(0)


class _Worker:
    """A worker's handler and idle hook, as ``worker_main`` gave them to the stand-in queue."""

    def __init__(self, handler: Handler, on_idle: Callable[[], None], pipe: _Pipe) -> None:
        self.handler = handler
        self.on_idle = on_idle
        self.pipe = pipe

    def trace(self, spec: dict[str, Any] | None) -> None:
        self.pipe.inbox.append(("trace", spec))
        self.on_idle()


R = TypeVar("R")


def with_workers(mains: Sequence[tuple[Callable[..., None], socket.socket | None]],
                 ruleset: RuleSet, body: Callable[[list[_Worker]], R]) -> R:
    """Run each ``worker_main`` with a stand-in queue whose ``run()`` (the packet loop) starts the
    next one, and the last one's calls ``body`` with every worker: so ``body`` runs while all
    of them are "serving" (a worker closes its trace socket when its loop returns)."""
    import nfrewrite.kernel.queue as queue_module

    made: list[_Worker] = []
    result: list[R] = []

    class StandInQueue:
        def __init__(self, queue_num: int, handler: Handler, **kw: Any) -> None:
            self.handler, self.on_idle = handler, kw["on_idle"]
            self.packet_id: int | None = None  # no packet is ever held here

        def bind(self) -> None: ...
        def unbind(self) -> None: ...
        def stop(self) -> None: ...

        def run(self) -> None:
            made.append(_Worker(self.handler, self.on_idle, pipes[len(made)]))
            if len(made) < len(mains):
                start(len(made))
            else:
                result.append(body(list(made)))

    pipes = [_Pipe() for _ in mains]

    def start(i: int) -> None:
        main, sock = mains[i]
        no_journal = Config("bench.toml", flows=FlowsConfig(state_max_age=0))
        main(i, no_journal, ruleset, pipes[i], sock)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)}
    real_queue, real_die = queue_module.QueueWorker, daemon._die_with_parent
    queue_module.QueueWorker = StandInQueue  # type: ignore[misc, assignment]
    daemon._die_with_parent = lambda: None  # not in this process
    try:
        start(0)
    finally:
        queue_module.QueueWorker = real_queue  # type: ignore[misc]
        daemon._die_with_parent = real_die
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return result[0]


def worker_main_without_hook() -> Callable[..., None]:
    """``daemon.worker_main`` compiled from its source without the trace hook's lines."""
    lines = inspect.getsource(daemon.worker_main).splitlines(keepends=True)
    (at,) = [i for i, line in enumerate(lines) if "# trace hook" in line]
    indent = len(lines[at]) - len(lines[at].lstrip())
    end = at + 1
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip()) > indent:
        end += 1
    source = "".join(lines[:at] + lines[end:])
    assert "tracer.packet" not in source
    namespace = dict(vars(daemon))
    code = compile(source, daemon.__file__ or "daemon.py", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    main: Callable[..., None] = namespace["worker_main"]
    return main


@contextlib.contextmanager
def _drained(sock: socket.socket) -> Iterator[list[int]]:
    """A thread reading the supervisor's end of a trace socket; yields [records read]."""
    count = [0]
    stop = threading.Event()

    def drain() -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, BlockingIOError):
                if sock.recv(65536):
                    count[0] += 1

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()


def _time_per_packet(handler: Handler, packets: list[bytes], meta: PacketMeta) -> float:
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(PASSES):
        for data in packets:
            handler(data, meta)
    return (clock() - start) / (PASSES * len(packets))


def measure(size: int, count: int, rounds: int = ROUNDS) -> dict[str, float]:
    """One job: medians (ns per packet) of ``none``, ``off``, ``on``; the ratios to ``none``
    (medians of the ratios within a round, so drift between rounds cancels); and the noise: the
    median distance from 1 of the same ratio between two identical ``none`` handlers."""
    ruleset = _ruleset()
    packets = _packets(size, count)
    gso = size > WIRE
    meta = PacketMeta(None, None, None, None, 0, csum_partial=gso, queue_num=0, gso=gso)
    ours, theirs = socket_pair()
    without = worker_main_without_hook()
    mains = [(without, None), (without, None), (daemon.worker_main, None),
             (daemon.worker_main, theirs)]

    def body(workers: list[_Worker]) -> dict[str, list[float]]:
        none, none2, off, on = workers
        on.trace({"version": 1, "rules": None})
        _, new = off.handler(packets[0], meta)
        assert new is not None and PATTERN not in new and SAME in new, "row 4's edit not made"
        times: dict[str, list[float]] = {"none": [], "none2": [], "off": [], "on": []}
        order = list(zip(times, (none, none2, off, on), strict=True))
        for r in range(rounds):  # each round every handler once, in a rotating order
            turn = order[r % 4:] + order[:r % 4]
            for name, worker in (turn if r % 2 == 0 else turn[::-1]):
                times[name].append(_time_per_packet(worker.handler, packets, meta))
        on.trace(None)
        return times

    with _drained(ours) as records:
        times = with_workers(mains, ruleset, body)
    ours.close()
    theirs.close()

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times["none"], strict=True))

    noise = statistics.median(abs(a / b - 1) for a, b in zip(times["none2"], times["none"],
                                                               strict=True))
    return {
        "none_ns": round(statistics.median(times["none"]), 1),
        "off_ns": round(statistics.median(times["off"]), 1),
        "on_ns": round(statistics.median(times["on"]), 1),
        "off_ratio": round(ratio("off"), 4), "on_ratio": round(ratio("on"), 4),
        "same_ratio": round(ratio("none2"), 4), "noise": round(noise, 4),
        "records": records[0],
    }


def run(rounds: int = ROUNDS) -> dict[str, float]:
    """Row 4's job (64 KB super-packets) and row 4n's (wire-size segments), flat; ``ok`` is 1
    when the hook costs row 4 no more than the noise."""
    out: dict[str, float] = {}
    for prefix, size, count in (("super", SUPER, 20), ("wire", WIRE, 400)):
        for k, v in measure(size, count, rounds).items():
            out[f"{prefix}_{k}"] = v
    out["ok"] = float(out["super_off_ratio"] - 1 <= out["super_noise"])
    return out


def describe(r: dict[str, float]) -> list[str]:
    lines = []
    for prefix, label in (("super", "row 4, 64 KB super-packets"),
                          ("wire", "row 4n, 1448 B segments")):
        def pct(key: str, p: str = prefix) -> str:
            return f"{(r[f'{p}_{key}'] - 1) * 100:+.2f}%"

        lines.append(
            f"trace hook, {label}: no hook {r[f'{prefix}_none_ns'] / 1000:.2f} us/packet; "
            f"hook, nobody tracing {pct('off_ratio')}; tracing {pct('on_ratio')} "
            f"({r[f'{prefix}_records']:.0f} records); noise +-{r[f'{prefix}_noise'] * 100:.2f}% "
            f"(two identical handlers: {pct('same_ratio')})")
    return lines


if __name__ == "__main__":
    print("\n".join(describe(run())))
