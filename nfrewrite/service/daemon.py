"""The daemon's lifecycle: start order, worker processes, signals, reload, sd_notify.

Theory of operation
-------------------
One supervisor process and ``[queue] workers`` worker processes (one per NFQUEUE number,
``num .. num+workers-1``). The supervisor never touches a packet; a worker never touches the
firewall or the network set-up.

Start (each step only after the previous one succeeded)::

    config + rules valid -> this network namespace's lock -> metrics dir + HTTP
    -> control socket -> bridges/ports/offloads -> workers bound (fail-open set)
    -> firewall rules installed -> READY=1

so that no packet is queued before a worker is there to take it (and if one were, the rules'
``--queue-bypass`` would let it pass). Stop is the reverse: STOPPING=1, control socket closed
(a running ``nfrewrite trace`` is told, the socket file removed), firewall rules removed
(new packets stay in the kernel), workers told to stop (they verdict what is waiting and unbind),
HTTP closed, sysctls put back, lock released, metrics dir removed. Bridges stay up so traffic
keeps flowing without us. The sysctls (br_netfilter's switches, conntrack's liberal TCP mode) are
changed through a ``netsetup.SysctlKeeper``, which records their originals in the runtime
directory first, so the clean stop after a ``kill -9`` and a restart still restores the values
from before the first run. The keeper's lock makes it one daemon per network namespace: a second
one waits ``LOCK_WAIT`` seconds for it (a killed predecessor's last moments), then exits 4
without touching anything; only the holder of the lock ever puts sysctls back.

Descriptors: the HTTP server bounds its own (see ``metrics``), and the supervisor keeps a few in
reserve (``fdreserve``), freed around a reload, a worker restart and the stop, so that a full
descriptor table cannot stop those. A worker restart that fails for want of descriptors even so
stops the daemon cleanly (rules removed, exit 4) for systemd to restart it.

Workers are forked children with ``PR_SET_PDEATHSIG``: if the supervisor is killed (even with
``kill -9``) they die too, their queues unbind and ``--queue-bypass`` passes traffic; a restart
re-installs the rules idempotently (one copy). A worker that dies is restarted by the supervisor
and counted.

Each worker talks to the supervisor over one pipe: "bound" once its queue is configured, a
heartbeat from its packet loop at least twice a second, and it receives new compiled rule sets.
The supervisor sends ``WATCHDOG=1`` only while every worker's heartbeat is fresh, so a stuck packet
loop makes systemd restart the service. The same pipe carries what to trace (a ``("trace", spec)``
message, sent by the main loop when the control server's wish changed, and to a worker that
starts during a trace); trace records come back on a second channel per worker, a socket pair
whose supervisor end the control server reads (:mod:`nfrewrite.service.control`,
:mod:`nfrewrite.service.trace`), so records never wait behind heartbeats or block a worker. The
control server answers ``nfrewrite status`` from its own thread with a snapshot of the
supervisor's state and the metrics.

SIGHUP (``systemctl reload``): RELOADING=1, re-read config and rules; on any error log every
diagnostic (``path:line:col``) and keep the running rules; else swap the kernel prefilter
atomically and hand the new rule set to every worker (which swaps ``engine.ruleset`` between two
packets; per-flow sequence state is kept). Then READY=1. Changes to bridges, queue numbers, host
mode or the metrics address need a restart and are reported as such.

Reading and validating the files is the slow part (it grows with their size;
``bench/bench_load.py`` measures it per MiB for several shapes of rule file), so it runs off the
main loop, in a forked *loader* process that sends back ``(config, ruleset, diagnostics, kernel
plan)`` over a pipe (the plan it computed to validate the rules is the one swapped in, unless the
queue numbers changed). Meanwhile the loop goes on as usual: it reads
heartbeats, restarts dead workers and keeps ``WATCHDOG=1`` coming, so ``WatchdogSec`` need not
cover the reload. Only one reload runs at a time: a SIGHUP that arrives during a reload is
remembered, and one more reload (however many SIGHUPs came) starts when the current one has
finished, so files edited meanwhile are read. A loader that dies or sends nothing usable is a failed
reload: the running rules stay. So is a loader that has sent nothing after :data:`LOADER_TIMEOUT`
(hung, say, on a file system that stopped answering): it is killed, and a SIGHUP that came
meanwhile starts the next reload. SIGTERM during a reload kills the loader (it holds nothing: no
kernel state is touched before its result is back) and stops as usual. Applying a result (kernel
prefilter swap, rule set to the workers, their confirmations) stays on the main loop, which
pings the watchdog between those steps too.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from nfrewrite.config.diagnostics import Diagnostic, has_errors
from nfrewrite.config.settings import Config, load_all
from nfrewrite.core.rules import RuleSet
from nfrewrite.kernel import netsetup
from nfrewrite.service import metrics
from nfrewrite.service.fdreserve import FdReserve
from nfrewrite.service.trace import WorkerTracer

if TYPE_CHECKING:
    from nfrewrite.kernel.ruletext import Plan

HEARTBEAT_STALE = 5.0  # seconds without a heartbeat before a worker counts as stuck
BIND_TIMEOUT = 10.0
STOP_TIMEOUT = 1.5
RELOAD_TIMEOUT = 3.0
LOCK_WAIT = 3.0  # seconds a starting daemon waits for the namespace's lock
#: Seconds a reload's loader may take before it counts as hung: killed, a failed reload.  The
#: environment variable ``NFREWRITE_LOADER_TIMEOUT`` overrides it (the tests use a short one).
LOADER_TIMEOUT = 300.0
LOADER_EXIT_WAIT = 1.0  # seconds a loader that sent its result is given to exit before a kill
PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    print(f"nfrewrite: {message}", file=sys.stderr, flush=True)


class StartError(RuntimeError):
    """A start step failed; the message is the one-line reason."""


def load(config_path: str) -> tuple[Config | None, RuleSet | None, list[Diagnostic]]:
    """Config and rules, validated as ``nfrewrite check`` does (file permissions included, and
    the kernel rules through the same ``prefilter.kernel_rules``: a rule set check refuses for
    needing too many of them is refused here, before anything is set up or swapped)."""
    config, ruleset, diags, _ = load_with_plan(config_path)
    return config, ruleset, diags


def load_with_plan(
    config_path: str,
) -> tuple[Config | None, RuleSet | None, list[Diagnostic], Plan | None]:
    """:func:`load`, and the kernel plan it computed for the rules (None when they are refused)."""
    from nfrewrite.kernel.prefilter import kernel_rules

    config, ruleset, diags = load_all(config_path)
    if config is not None and ruleset is not None:
        kernel, refused = kernel_rules(ruleset, config.queue.num, config.queue.workers,
                                       host=config.host.enabled)
        if kernel is None:
            return config, None, diags + refused, None
        return config, ruleset, diags, kernel
    return config, ruleset, diags, None


def loader_timeout() -> float:
    """:data:`LOADER_TIMEOUT`, or ``NFREWRITE_LOADER_TIMEOUT`` if that is a positive number."""
    with contextlib.suppress(ValueError):
        given = float(os.environ.get("NFREWRITE_LOADER_TIMEOUT", ""))
        if given > 0:
            return given
    return LOADER_TIMEOUT


# -- worker side ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def worker_main(  # noqa: C901 - closures sharing one worker's state: a packet's path in one place
    queue_num: int,
    config: Config,
    ruleset: RuleSet,
    conn: Connection,
    trace_sock: socket.socket | None = None,
) -> None:
    """A worker process: one queue, one engine, until SIGTERM. ``trace_sock``: its end of the
    trace channel (see :mod:`nfrewrite.service.trace`), if the supervisor made one."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from time import monotonic, perf_counter

    from nfrewrite.core.constants import HOLD
    from nfrewrite.core.engine import PASS, Engine, Result
    from nfrewrite.core.seqadj import FlowTable
    from nfrewrite.core.stream import HoldLimits
    from nfrewrite.kernel.queue import TRACK_FLOW, PacketMeta, Payload, QueueWorker
    from nfrewrite.service.flowstore import open_store

    flows = FlowTable(max_flows=config.flows.max, idle_timeout=config.flows.idle_timeout,
                      memory=config.flows.memory)
    store = open_store(queue_num, config, ruleset, flows, log)  # records restored, journal on
    engine = Engine(ruleset, flows, mtu=netsetup.largest_mtu(),
                    hold_limits=HoldLimits(deadline=config.flows.hold))
    ruleset.prepare()  # compiled now, not on a packet whose hold deadline is running
    wm = metrics.WorkerMetrics(queue_num, rules=[r.name for r in ruleset.rules])
    tracer = WorkerTracer(queue_num, trace_sock, flows, log=log)
    observe = wm.observe
    process = engine.process

    def handler(payload: Payload, meta: PacketMeta) -> tuple[int, bytes | None]:
        t0 = perf_counter()
        try:
            res = process(
                payload,
                in_port=meta.in_port,
                out_port=meta.out_port,
                now=monotonic(),
                csum_partial=meta.csum_partial,
                gso=meta.gso,
                hold=qw.packet_id,
            )
        except Exception as e:
            wm.error(e)
            observe(PASS, perf_counter() - t0)
            raise  # the queue accepts the packet unmodified and logs once per kind
        if res.released:
            release(res.released)
        observe(res, perf_counter() - t0)
        if tracer.active:  # trace hook: the one test per packet while nobody traces
            tracer.packet(payload, meta, res)
        if res.verdict == HOLD:
            return HOLD, None
        if res.track:
            if store is not None and flows.urgent:  # a new edit: on record before it leaves
                store.write_changed()
            return res.verdict | TRACK_FLOW, res.packet
        return res.verdict, res.packet

    def release(pairs: Sequence[tuple[object, Result]]) -> None:
        """Verdicts of held packets, in stream order (see nfrewrite.core.stream)."""
        if store is not None and flows.urgent:  # their edits on record before they leave
            store.write_changed()
        for token, held in pairs:
            assert isinstance(token, int)
            wm.observe_released(held)
            qw.release(token, held.verdict | (TRACK_FLOW if held.track else 0), held.packet)

    def timer(now: float) -> float | None:
        due = engine.release_due(now)
        if due:
            release(due)
        return engine.next_deadline()

    def on_idle() -> None:
        conn.send(("hb",))
        wm.flush()
        if store is not None:
            store.idle()
        wm.set_flows(flows.flows_active, flows.stats())
        wm.set_holds(engine.holds.stats())
        while conn.poll():
            msg = conn.recv()
            if msg[0] == "rules":
                new: RuleSet = msg[1]
                new.prepare()
                engine.ruleset = new
                if store is not None:
                    store.set_rules(new)
                wm.set_rules([r.name for r in new.rules])
                conn.send(("rules-ok",))
            elif msg[0] == "trace":
                tracer.configure(msg[1])
        tracer.idle()

    qw = QueueWorker(
        queue_num,
        handler,
        maxlen=config.queue.maxlen,
        sock_buf=config.queue.sock_buf,
        gso=config.queue.gso,
        on_idle=on_idle,
        log=log,
        timer=timer,
        on_batch=wm.flush,  # the batch's metrics tallies, once its verdicts are out
    )
    signal.signal(signal.SIGTERM, lambda *_: qw.stop())
    try:
        qw.bind()
    except Exception as e:  # noqa: BLE001 - any failed bind is the supervisor's StartError
        conn.send(("error", str(e)))
        return
    conn.send(("bound",))
    try:
        qw.run()
    finally:
        qw.unbind()
        tracer.close()
        if store is not None:
            log(f"queue {queue_num}: {store.save()} flows' sequence records saved")


# -- loader side (one reload) ------------------------------------------------------------------


def loader_main(config_path: str, conn: Connection) -> None:
    """A reload's loader process: read and validate everything, send the result, exit."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result = load_with_plan(config_path)
    except Exception as e:  # noqa: BLE001 - told to the supervisor, which keeps the old rules
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("loaded", *result))


@dataclass
class Reload:
    """The reload in progress: its loader process and the read end of its pipe."""

    process: Any
    conn: Connection
    deadline: float  # monotonic time after which the loader counts as hung


# -- supervisor side --------------------------------------------------------------------------


@dataclass
class Worker:
    queue_num: int
    process: Any = None
    conn: Connection | None = None
    last_beat: float = 0.0


@dataclass
class Supervisor:
    config_path: str
    config: Config
    ruleset: RuleSet
    notifier: Any = None
    workers: list[Worker] = field(default_factory=list)
    _hup: bool = False
    _stop: bool = False
    _reloading: Reload | None = None  # the loader at work, if any
    _reload_again: bool = False  # a SIGHUP came during that reload: one more follows it
    control: Any = None  # the control socket's server (nfrewrite.service.control), once up
    _trace_sent: dict[str, Any] | None = None  # the trace spec the workers were last sent
    _started: float = 0.0  # time.time() at start
    _last_reload: Any = None  # control.ReloadState of the load at start or the last reload
    _reloads: int = 0  # reloads tried since the start
    _reload_errors: list[str] = field(default_factory=list)  # the failed reload's first errors

    def __post_init__(self) -> None:
        from nfrewrite.service.sdnotify import Notifier

        self.notifier = Notifier()
        self._ctx = multiprocessing.get_context("fork")

    # signals only set flags; the main loop does the work
    def _on_hup(self, *_: object) -> None:
        self._hup = True

    def _on_term(self, *_: object) -> None:
        self._stop = True

    def run(self) -> int:
        from nfrewrite.kernel.firewall import Firewall
        from nfrewrite.kernel.prefilter import kernel_plan

        cfg = self.config
        queues = list(range(cfg.queue.num, cfg.queue.num + cfg.queue.workers))
        self._started = time.time()
        self.sysctls = netsetup.SysctlKeeper()
        try:  # first: a second daemon here must leave the running one's state alone
            self.sysctls.lock(wait=LOCK_WAIT)
        except netsetup.NetSetupError as e:
            log(f"error: {e}")
            return 4
        mp_dir = metrics.setup_multiprocess_dir(os.environ.get("RUNTIME_DIRECTORY"))
        self._fds = FdReserve()  # before the HTTP server sizes itself by what is left
        server = None
        firewall: Firewall | None = None
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        try:
            self.sup = metrics.SupervisorMetrics(queues, ports=cfg.bridge_ports)
            server = metrics.serve((cfg.metrics.host, cfg.metrics.port), self.sup.registry)
            log(f"metrics on http://{cfg.metrics.listen}/metrics")
            self._start_control()
            self._setup_network()
            self._ensure_liberal_conntrack(self.ruleset)
            for q in queues:
                self.workers.append(self._start_worker(q))
            firewall = Firewall(cfg.queue.num, cfg.queue.workers)
            firewall.install(kernel_plan(self.ruleset, cfg.queue.num, cfg.queue.workers,
                                         host=cfg.host.enabled))
            self.firewall = firewall
            self.sup.rules_loaded(len(self.ruleset.rules))
            self.sup.reload(True, time.time())
            self._note_reload(True, start=True)
            status = self._status()
            log(f"ready: {status}")
            self.notifier.ready(status)
            self._loop()
            return 0
        except StartError as e:
            log(f"error: {e}")
            return 4
        finally:
            self.notifier.stopping()
            self._stop_control()
            self._cancel_reload()
            self._fds.release()  # room for the teardown, however full the table is
            if firewall is not None:
                try:
                    firewall.remove()
                except OSError as e:  # out of descriptors even so: free the HTTP server's
                    log(f"removing firewall rules: {e}; closing the metrics server, retrying")
                    if server is not None:
                        server.close()
                        server = None
                    try:
                        firewall.remove()
                    except Exception as e2:  # noqa: BLE001 - keep stopping
                        log(f"error removing firewall rules: {e2}")
                except Exception as e:  # noqa: BLE001 - keep stopping
                    log(f"error removing firewall rules: {e}")
            self._stop_workers()
            try:  # also what a killed earlier run left changed (its record)
                restored = self.sysctls.restore()
                if restored:
                    log(f"sysctls restored: {' '.join(restored)}")
            except netsetup.NetSetupError as e:
                log(f"error: {e}")
            self.sysctls.unlock()
            if server is not None:
                server.close()
            metrics.cleanup_multiprocess_dir(mp_dir)
            log("stopped")

    def _status(self) -> str:
        n = len(self.ruleset.rules)
        q = self.config.queue
        last = q.num + q.workers - 1
        queues = f"queue {q.num}" if q.workers == 1 else f"queues {q.num}-{last}"
        return f"{n} rules in {len(self.ruleset.files)} files, {queues}"

    _liberal_before: bool | None = None
    _liberal_set = False

    def _ensure_liberal_conntrack(self, ruleset: RuleSet) -> None:
        """Length-changing rules need conntrack's liberal TCP window mode (see netsetup)."""
        from nfrewrite.kernel.netsetup import NetSetupError, set_conntrack_tcp_liberal

        grows = any(r.changes_length for rule in ruleset.rules for r in rule.replaces)
        if grows and not self._liberal_set:
            try:
                self._liberal_before = set_conntrack_tcp_liberal(True, keeper=self.sysctls)
            except NetSetupError as e:
                raise StartError(str(e)) from e
            self._liberal_set = True
            if self._liberal_before is False:
                log("length-changing rules: net.netfilter.nf_conntrack_tcp_be_liberal=1 "
                    "(restored on stop)")

    def _setup_network(self) -> None:
        from nfrewrite.kernel.netsetup import NetSetupError, enable_br_netfilter, setup_bridge

        if self.config.host.enabled:
            log("host mode: queueing this machine's own TCP (OUTPUT, INPUT; the loopback only "
                "for rules with out_port = \"lo\")")
        if not self.config.bridges:
            log("no [[bridge]] configured: queueing routed (FORWARD) traffic")
            return
        try:
            enable_br_netfilter(keeper=self.sysctls)
            for b in self.config.bridges:
                state = setup_bridge(b.name, b.ports, dict(b.offloads.items()) or None)
                verb = "created" if state.created else "reused"
                log(f"bridge {b.name} {verb}, ports {', '.join(b.ports)}")
                for port in state.ports:
                    feats = " ".join(
                        f"{k}={'on' if v else 'off'}" for k, v in port.offloads.items()
                    )
                    log(f"port {port.name} offloads: {feats}")
                    self.sup.offloads(port.name, port.offloads)
        except NetSetupError as e:
            raise StartError(str(e)) from e

    def _start_worker(self, queue_num: int) -> Worker:
        parent, child = self._ctx.Pipe()
        trace_end = self._trace_channel(queue_num)
        proc = self._ctx.Process(
            target=worker_main,
            args=(queue_num, self.config, self.ruleset, child, trace_end),
            name=f"nfrewrite-q{queue_num}",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            if trace_end is not None:
                trace_end.close()
        child.close()
        if not parent.poll(BIND_TIMEOUT):
            proc.kill()
            raise StartError(f"worker for queue {queue_num} did not bind in {BIND_TIMEOUT:.0f} s")
        try:
            msg = parent.recv()
        except EOFError:
            msg = ("error", f"worker exited with code {proc.exitcode}")
        if msg[0] != "bound":
            proc.join(1)
            raise StartError(msg[1])
        log(f"worker {proc.pid} bound queue {queue_num} (fail-open)")
        if self._trace_sent is not None:  # a trace is running: this worker joins it
            with contextlib.suppress(OSError):
                parent.send(("trace", self._trace_sent))
        return Worker(queue_num, proc, parent, time.monotonic())

    def _loop(self) -> None:
        while not self._stop:
            self._read_messages(timeout=0.25)
            self._restart_dead_workers()
            if self._hup:
                self._hup = False
                with self._fds.released():  # a loader is a fork and a pipe
                    self._start_reload()
            self._finish_reload()
            self._sync_trace()
            self._ping_watchdog()

    def _ping_watchdog(self, *, force: bool = False) -> None:
        """``WATCHDOG=1`` if due (or ``force``: before a step that may block the loop for a
        while, such as handing 50 MiB of rules to a worker) and every worker's heartbeat is
        fresh."""
        now = time.monotonic()
        if all(now - w.last_beat < HEARTBEAT_STALE for w in self.workers):
            self.notifier.watchdog(now, force=force)

    def _read_messages(self, timeout: float) -> set[int]:
        """Wait up to ``timeout`` for worker messages (or a loader's result); note heartbeats;
        return the indexes of the workers that confirmed a new rule set."""
        conns: list[Any] = [w.conn for w in self.workers if w.conn is not None]
        if self._reloading is not None:
            conns.append(self._reloading.conn)
        ready = multiprocessing.connection.wait(conns, timeout=timeout)
        now = time.monotonic()
        confirmed: set[int] = set()
        for i, w in enumerate(self.workers):
            if w.conn is None or w.conn not in ready:
                continue
            try:
                while w.conn.poll():
                    kind = w.conn.recv()[0]
                    w.last_beat = now
                    if kind == "rules-ok":
                        confirmed.add(i)
            except (EOFError, OSError):
                pass
        return confirmed

    def _restart_dead_workers(self) -> None:
        for i, w in enumerate(self.workers):
            if w.process.is_alive() or self._stop:
                continue
            log(f"worker {w.process.pid} for queue {w.queue_num} died "
                f"(exit {w.process.exitcode}); restarting")
            self.sup.worker_died(w.process.pid)
            if w.conn is not None:
                w.conn.close()
            try:
                with self._fds.released():
                    self.workers[i] = self._start_worker(w.queue_num)
            except StartError as e:
                log(f"error: restart failed: {e}")
                w.conn = None
                continue
            except OSError as e:  # even the reserve did not do: stop cleanly, to be restarted
                raise StartError(f"restarting the worker for queue {w.queue_num}: {e}") from e
            self.sup.worker_restarted(w.queue_num)

    def _start_reload(self) -> None:
        """SIGHUP: start a loader, or note that one more reload must follow the running one."""
        if self._reloading is not None:
            if not self._reload_again:
                log("reload: SIGHUP during a reload; one more reload follows this one")
            self._reload_again = True
            return
        self.notifier.reloading()
        parent, child = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=loader_main, args=(self.config_path, child), name="nfrewrite-reload",
            daemon=True,
        )
        try:
            proc.start()
        except OSError as e:  # fork refused (memory, process limit): the old rules stay
            parent.close()
            child.close()
            self._reload_failed(f"reload failed: cannot start the loader: {e}; keeping the "
                                "running rules")
            return
        child.close()
        self._reloading = Reload(proc, parent, time.monotonic() + loader_timeout())
        log(f"reload: reading config and rules (loader {proc.pid})")

    def _finish_reload(self) -> None:
        """Apply the loader's result once it is there (a dead loader is a failed reload)."""
        r = self._reloading
        if r is None:
            return
        if not r.conn.poll():  # still loading (a loader that died leaves its pipe readable: EOF)
            if time.monotonic() > r.deadline:
                self._loader_hung(r)
            return
        with self._fds.released():  # applying runs iptables-restore and sends to workers
            self._take_reload_result(r)

    def _take_reload_result(self, r: Reload) -> None:
        msg: tuple[Any, ...] | None
        self._ping_watchdog(force=True)
        try:
            msg = r.conn.recv()
        except Exception:  # noqa: BLE001 - EOF, a broken pickle, no memory: a failed reload
            msg = None
        r.conn.close()
        r.process.join(LOADER_EXIT_WAIT)  # it has sent all it had: no reason to wait long
        if r.process.is_alive():
            r.process.kill()
            r.process.join()
        self._reloading = None
        if msg is None or msg[0] != "loaded":
            why = msg[1] if msg is not None else f"loader exited with code {r.process.exitcode}"
            self._reload_failed(f"reload failed: {why}; keeping the running rules")
        else:
            self._apply(msg[1], msg[2], msg[3], msg[4] if len(msg) > 4 else None)
        self._reload_next()

    def _reload_next(self) -> None:
        """A reload ended: start the one a SIGHUP during it asked for, if any."""
        if self._reload_again:
            self._reload_again = False
            self._hup = True

    def _loader_hung(self, r: Reload) -> None:
        """The loader outlived its deadline: kill it; a failed reload."""
        self._reloading = None
        r.process.kill()
        r.process.join()
        r.conn.close()
        self._reload_failed(f"reload failed: the loader sent nothing in {loader_timeout():.0f} s;"
                            " killed it; keeping the running rules")
        self._reload_next()

    def _cancel_reload(self) -> None:
        """Stopping: kill the loader of a reload in progress, if any."""
        r = self._reloading
        if r is None:
            return
        self._reloading = None
        r.process.kill()
        r.process.join()
        r.conn.close()
        log("reload: cancelled (stopping)")

    def _reload_failed(self, message: str) -> None:
        log(message)
        self.sup.reload(False, time.time())
        self._note_reload(False, message)
        self.notifier.ready(f"reload failed; {self._status()}")

    def _apply(
        self,
        config: Config | None,
        ruleset: RuleSet | None,
        diags: list[Diagnostic],
        kernel: Plan | None = None,
    ) -> None:
        """A loader's result: diagnostics to stderr, then the new rules in force, or none.
        ``kernel`` is the plan the loader computed for them; it is recomputed if it targets other
        queues than the running ones (a ``[queue]`` change waits for a restart)."""
        from multiprocessing.reduction import ForkingPickler

        from nfrewrite.kernel.prefilter import kernel_plan

        for d in diags:
            print(d.format(), file=sys.stderr, flush=True)
        if config is None or ruleset is None or has_errors(diags):
            self._reload_errors = [d.format().splitlines()[0] for d in diags
                                   if d.severity == "error"]
            self._reload_failed("reload failed: keeping the running rules")
            return
        for what in ("bridges", "queue", "metrics", "control", "host"):
            if getattr(config, what) != getattr(self.config, what):
                log(f"reload: [{what}] changed; it takes effect at the next restart")
        self._ping_watchdog(force=True)
        try:
            self._ensure_liberal_conntrack(ruleset)
            fw = self.firewall
            host = self.config.host.enabled
            if kernel is not None and (kernel.queue_num, kernel.workers) == (fw.queue_num,
                                                                             fw.workers) and (
                    (kernel.host_v4 is not None) == host):
                fw.swap(kernel)
            else:
                fw.swap(kernel_plan(ruleset, fw.queue_num, fw.workers, host=host))
        except Exception as e:  # noqa: BLE001 - old rules stay in force
            self._reload_failed(f"reload failed: kernel rules not swapped: {e}")
            return
        self.ruleset = ruleset
        # pickled once for all workers; each send waits for its worker to read it, so the
        # watchdog is fed before each
        self._ping_watchdog(force=True)
        message = ForkingPickler.dumps(("rules", ruleset))
        pending: set[int] = set()
        for i, w in enumerate(self.workers):
            self._ping_watchdog(force=True)
            if w.conn is not None:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(message)
                    pending.add(i)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while pending and time.monotonic() < deadline and not self._stop:
            pending -= self._read_messages(timeout=0.1)
            self._ping_watchdog()
        if pending:
            log(f"reload: {len(pending)} worker(s) did not confirm the new rules in time")
        self.sup.rules_loaded(len(ruleset.rules))
        self.sup.reload(True, time.time())
        self._note_reload(True)
        status = self._status()
        log(f"reload done: {status}")
        self.notifier.ready(status)

    # -- the control socket (nfrewrite status, nfrewrite trace) -----------------------------------
    def _start_control(self) -> None:
        from nfrewrite.service import control

        path = control.socket_path(self.config)
        try:
            self.control = control.ControlServer(
                path, self._control_status, lambda: [r.name for r in self.ruleset.rules], log=log)
        except control.ControlError as e:
            if self.config.control.socket is not None:  # asked for: a start failure
                raise StartError(str(e)) from e
            # the default, taken (say by a daemon in another network namespace sharing the
            # runtime directory, which worked before there was a socket): run without one
            log(f"warning: {e}; nfrewrite status and trace cannot reach this daemon")
            return
        log(f"control socket {path}")

    def _stop_control(self) -> None:
        """Stopping: trace clients are told, the socket file removed."""
        if self.control is not None:
            self.control.close("stopping")

    def _trace_channel(self, queue_num: int) -> socket.socket | None:
        """A trace socket pair for a worker about to start: the supervisor's end goes to the
        control server, the worker's end is returned (None: no tracing for this worker)."""
        if self.control is None:
            return None
        from nfrewrite.service.trace import socket_pair

        try:
            ours, theirs = socket_pair()
        except OSError as e:  # out of descriptors: the worker runs, untraceable
            log(f"worker for queue {queue_num}: no trace channel ({e.strerror}); "
                "it cannot be traced")
            return None
        self.control.attach(queue_num, ours)
        return theirs

    def _sync_trace(self) -> None:
        """Send the workers what to trace when the control server's wish changed."""
        if self.control is None:
            return
        spec = self.control.trace_spec()
        if spec == self._trace_sent:
            return
        self._trace_sent = spec
        for w in self.workers:
            if w.conn is not None:
                with contextlib.suppress(OSError):
                    w.conn.send(("trace", spec))

    def _note_reload(self, ok: bool, message: str | None = None, *, start: bool = False) -> None:
        """Remember the outcome of the load at start or a reload, for ``status``."""
        from nfrewrite.service.control import ReloadState

        if not start:
            self._reloads += 1
        error = None
        if not ok:
            error = message or "reload failed"
            if self._reload_errors:
                more = len(self._reload_errors) - 1
                error = self._reload_errors[0] + (f" (and {more} more errors)" if more else "")
        self._reload_errors = []
        self._last_reload = ReloadState(time.time(), ok, error, self._reloads)

    def _control_status(self) -> dict[str, Any]:
        """The answer to ``nfrewrite status`` (called in the control server's thread: reads a
        snapshot of what the main loop keeps, never waits for it)."""
        from nfrewrite.service import control

        now = time.monotonic()
        ruleset = self.ruleset
        workers = [
            control.WorkerState(
                w.queue_num, w.process.pid if w.process is not None else None,
                (now - w.last_beat) if w.conn is not None else None)
            for w in list(self.workers)
        ]
        return control.build_status(
            config_path=self.config_path, config=self.config,
            rules=[(r.name, r.path, r.line) for r in ruleset.rules],
            rule_files=len(ruleset.files), workers=workers,
            reload=self._last_reload or control.ReloadState(self._started, True),
            samples=control.collect_samples(self.sup.registry), started=self._started,
            control_socket=self.control.path if self.control is not None else "",
        )

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            if w.process is None:
                continue
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)


def run(config_path: str) -> int:
    """``nfrewrite run``: returns the exit code (0 stopped cleanly, 1 invalid files, 4 failure)."""
    config, ruleset, diags = load(config_path)
    for d in diags:
        print(d.format(), file=sys.stderr, flush=True)
    if config is None or ruleset is None or has_errors(diags):
        return 1
    return Supervisor(config_path, config, ruleset).run()


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    return run((argv or sys.argv[1:])[0])
