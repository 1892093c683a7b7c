"""Where a daemon worker's time goes: ``nfrewrite.service.daemon.worker_main`` under cProfile.

    python -m bench.profile_worker --queue 0 --config nfrewrite.toml --out prof.txt

Runs exactly the daemon's worker (queue loop, engine, metrics) for one queue, in this process,
under :mod:`cProfile`, until SIGTERM; then writes to ``--out`` the CPU time split (user = Python
and libraries, system = the kernel: netlink copies, verdicts and the packet's onward path, which
runs in the verdict's system call) and the functions with the most own time. The bench's
``nfq`` mode supplies the NFQUEUE rule (``python -m bench.run`` does not use this; it is the tool
behind the profile findings in the bench report).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import multiprocessing
import os
import pstats
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_worker")
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)

    from nfrewrite.service import metrics

    mp_dir = metrics.setup_multiprocess_dir(None)
    from nfrewrite.service.daemon import load, worker_main

    config, ruleset, diags = load(a.config)
    if config is None or ruleset is None:
        print("\n".join(d.format() for d in diags), file=sys.stderr)
        return 1
    parent, child = multiprocessing.Pipe()
    prof = cProfile.Profile()
    t0, wall0 = os.times(), time.monotonic()
    print("READY", flush=True)  # bound a moment later; the bench waits for reachability
    prof.enable()
    try:
        # no journal of the sequence records: a profile leaves nothing in the runtime directory
        flows = dataclasses.replace(config.flows, state_max_age=0)
        worker_main(a.queue, dataclasses.replace(config, flows=flows), ruleset, child)
    finally:
        prof.disable()
        t1, wall1 = os.times(), time.monotonic()
        metrics.cleanup_multiprocess_dir(mp_dir)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(a.top)
    with open(a.out, "w") as f:
        f.write(f"wall {wall1 - wall0:.2f} s, user {t1.user - t0.user:.2f} s, "
                f"system {t1.system - t0.system:.2f} s\n")
        f.write(text.getvalue())
    parent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
