"""The ``nfrewrite`` command: ``check``, ``run``, ``replay``, ``status``, ``trace``.

Theory of operation
-------------------
Each subcommand is ONE decorated function: ``@command(name, help, *arguments)`` registers it, the
arguments are declared with :func:`arg` (same parameters as ``ArgumentParser.add_argument``), and
the function takes the parsed ``argparse.Namespace`` and returns the exit code. ``main`` builds the
parser from the registry, runs the chosen function and turns failures into exit codes:

    0  success
    1  invalid config or rules (diagnostics on stderr: ``path:line:col: error: text``, line, caret)
    2  usage error (argparse)
    3  ``status``/``trace``: the daemon does not answer (not running, a socket left by a killed
       one, no reply in time), one line on stderr
    4  runtime failure (one line on stderr; set NFREWRITE_DEBUG=1 for the traceback);
       ``status``/``trace``: also "permission denied" on the control socket, and "busy" (the
       daemon runs but takes no connection now: its limit, or a full listen backlog for 2 s)
    5  replay: the input capture is damaged part way (one line on stderr saying where; the output
       holds the packets before the damage, their summary goes to stdout)

Diagnostics and warnings go to stderr; a command's result (``check``'s summary line) to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nfrewrite.config.diagnostics import Diagnostic
from nfrewrite.config.examples import check_examples
from nfrewrite.config.settings import load_all

__all__ = [
    "EXIT_DAMAGED_INPUT",
    "EXIT_INVALID",
    "EXIT_NOT_RUNNING",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "arg",
    "command",
    "main",
]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3  # status, trace: as ``systemctl is-active`` says of a stopped unit
EXIT_RUNTIME = 4
EXIT_DAMAGED_INPUT = 5

DEFAULT_CONFIG = "/etc/nfrewrite/nfrewrite.toml"

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument of a subcommand, as for ``ArgumentParser.add_argument(*flags, **options)``."""
    return Arg(flags, options)


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    args: tuple[Arg, ...]
    handler: Handler


_COMMANDS: dict[str, _Command] = {}


def command(name: str, help: str, *args: Arg) -> Callable[[Handler], Handler]:
    """Register ``handler`` as subcommand ``name``."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = _Command(name, help, args, handler)
        return handler

    return register


CONFIG_ARG = arg(
    "-c", "--config", metavar="CONFIG", default=DEFAULT_CONFIG,
    help=f"config file (default {DEFAULT_CONFIG})",
)


# -- subcommands -------------------------------------------------------------------------------


@command(
    "check",
    "validate the config and every rule file, run each rule's examples through the engine; "
    "report all errors (exit 0 OK, 1 errors)",
    CONFIG_ARG,
    arg("--no-length-change", action="store_true",
        help="treat a replace that changes the payload length as an error"),
    arg("--show-kernel-rules", action="store_true",
        help="also print the iptables/ip6tables rules (kernel prefilter) the daemon would load"),
)
def cmd_check(args: argparse.Namespace) -> int:
    from nfrewrite.kernel.prefilter import kernel_rules
    from nfrewrite.kernel.ruletext import render

    config, ruleset, diagnostics = load_all(
        args.config, allow_length_change=not args.no_length_change
    )
    kernel = None
    if ruleset is not None:  # every rule's examples through the engine (nfrewrite.config.examples)
        diagnostics = diagnostics + check_examples(ruleset)
        # the kernel rules as start and reload compile them (the same function, the same verdict)
        queue = (config.queue.num, config.queue.workers) if config is not None else (0, 1)
        host = config.host.enabled if config is not None else False
        kernel, refused = kernel_rules(ruleset, *queue, host=host)
        diagnostics = diagnostics + refused
    print_diagnostics(diagnostics)
    errors = sum(1 for d in diagnostics if d.severity == "error")
    if errors or config is None or ruleset is None or kernel is None:
        warnings = len(diagnostics) - errors
        summary = f"{errors} error{'s' if errors != 1 else ''}"
        if warnings:
            summary += f", {warnings} warning{'s' if warnings != 1 else ''}"
        print(f"nfrewrite: check failed: {summary}", file=sys.stderr)
        return EXIT_INVALID
    if args.show_kernel_rules:
        print(render(kernel), end="")
    print(f"{len(ruleset.rules)} rules in {len(ruleset.files)} files OK")
    return EXIT_OK


@command(
    "run",
    "run the daemon in the foreground: bridges, queue workers, kernel rules, metrics "
    "(SIGHUP reloads rules, SIGTERM stops and removes the kernel rules)",
    CONFIG_ARG,
)
def cmd_run(args: argparse.Namespace) -> int:
    from nfrewrite.service.daemon import run

    return run(args.config)


def _mtu(value: str) -> int:
    """``--mtu``: an IP MTU, 68 (IPv4's minimum) to 65536 (loopback's)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 68 <= n <= 65536:
        raise argparse.ArgumentTypeError(f"{n} is not from 68 to 65536")
    return n


@command(
    "replay", "apply the rules to a capture, offline (summary on stdout)", CONFIG_ARG,
    arg("input", metavar="IN.pcap", help="capture to read (pcap or pcapng; Ethernet, raw IP, "
        "Linux cooked SLL/SLL2)"),
    arg("output", metavar="OUT.pcap", help="capture to write (pcap, same link type)"),
    arg("--csum-partial", choices=("auto", "yes", "no"), default="auto",
        help="TCP checksums of the input hold only the pseudo-header sum (a capture on a sender "
             "with TX offload): auto = per rewritten packet, when it does not verify but equals "
             "that sum (default); yes = always; no = never"),
    arg("--in-port", metavar="PORT", default=None,
        help="bridge port the packets came in on (for rules with match.in_port)"),
    arg("--out-port", metavar="PORT", default=None,
        help="bridge port the packets go out on (for rules with match.out_port)"),
    arg("--mtu", metavar="N", type=_mtu, default=1500,
        help="MTU of the link the packets leave by: a segment that edits grow past it is cut, "
             "as live (the summary counts the bytes not emitted); default 1500"),
)
def cmd_replay(args: argparse.Namespace) -> int:
    from nfrewrite.replay import DamagedInput, ReplayError, replay, stderr_progress

    config, ruleset, diagnostics = load_all(args.config)
    print_diagnostics(diagnostics)
    if config is None or ruleset is None or any(d.severity == "error" for d in diagnostics):
        print("nfrewrite replay: invalid config or rules (see nfrewrite check)", file=sys.stderr)
        return EXIT_INVALID
    try:
        summary = replay(
            ruleset, args.input, args.output, flows=config.flows,
            csum_partial=args.csum_partial, in_port=args.in_port, out_port=args.out_port,
            mtu=args.mtu, progress=stderr_progress(),
        )
    except DamagedInput as exc:
        print(f"nfrewrite replay: error: {exc}", file=sys.stderr)
        print(exc.summary.format())
        return EXIT_DAMAGED_INPUT
    except ReplayError as exc:
        print(f"nfrewrite replay: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(summary.format())
    return EXIT_OK


# -- watching the running daemon: status, trace ------------------------------------------------


def _control_socket(config: str) -> tuple[str, str | None]:
    from nfrewrite.service.control import socket_path_from_file

    return socket_path_from_file(config)


def _control_failed(command: str, exc: Exception) -> int:
    """One line for a control socket that cannot be used; the exit code it means."""
    from nfrewrite.service.control import NotRunning, printable

    print(f"nfrewrite {command}: {printable(exc)}", file=sys.stderr)
    # NoAccess: the daemon may well run, we cannot tell (as a refusal from the daemon): 4;
    # Busy: it runs and takes no connection now (as its own "busy" answer): 4
    return EXIT_NOT_RUNNING if isinstance(exc, NotRunning) else EXIT_RUNTIME


@command(
    "status",
    "what the running daemon does: uptime, last reload, bridges, queues and workers, rules in "
    "force with their hit counts (exit 0 it answered, 3 it does not)",
    CONFIG_ARG,
    arg("--json", action="store_true", help="print the status as one JSON object"),
)
def cmd_status(args: argparse.Namespace) -> int:
    import json

    from nfrewrite.service.control import ControlError, ask_status, format_status

    path, note = _control_socket(args.config)
    try:
        status = ask_status(path, note=note)
    except ControlError as exc:
        return _control_failed("status", exc)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(format_status(status))
    return EXIT_OK


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive number")
    return n


@command(
    "trace",
    "live: one line per packet a rule changed or dropped (time, queue, addresses, rules, length "
    "before -> after, sequence offset); ends on Ctrl-C, --count, or when the daemon stops",
    CONFIG_ARG,
    arg("--rule", metavar="NAME", action="append", default=None,
        help="only packets this rule acted on (repeat for several)"),
    arg("--count", metavar="N", type=_positive, default=None, help="stop after N packets"),
    arg("--json", action="store_true", help="one JSON object per packet"),
)
def cmd_trace(args: argparse.Namespace) -> int:
    from nfrewrite.service.control import ControlError, connect, trace_request

    path, note = _control_socket(args.config)
    try:
        sock = connect(path, note=note)
    except ControlError as exc:
        return _control_failed("trace", exc)
    with sock:
        return _trace(sock, path, trace_request(args.rule, args.count), args.count, args.json)


def _trace(sock: Any, path: str, request: dict[str, Any], count: int | None,
           as_json: bool) -> int:
    """Read a trace until it ends; Ctrl-C and a closed stdout end it cleanly too."""
    import json

    from nfrewrite.service.control import (
        READY_TIMEOUT,
        REPLY_TIMEOUT,
        STALL_TIMEOUT,
        Lines,
        format_trace,
        printable,
        send_request,
    )
    from nfrewrite.service.trace import MAX_RECORDS_PER_SECOND

    def say(text: str) -> None:
        print(f"nfrewrite trace: {text}", file=sys.stderr, flush=True)

    lines = Lines(sock)
    packets = dropped = 0
    end: dict[str, Any] | None = None
    try:
        send_request(sock, request)
        first = lines.next(REPLY_TIMEOUT)
        if first is None:
            say(f"no answer from {path}: the connection closed")
            return EXIT_NOT_RUNNING
        if not first.get("ok"):
            say(f"error: {printable(first.get('error', 'refused'))}")
            return EXIT_RUNTIME
        # "ready" comes within READY_TIMEOUT; then packets whenever a rule acts on one
        timeout: float | None = READY_TIMEOUT + REPLY_TIMEOUT
        while count is None or packets < count:
            message = lines.next(timeout)
            if message is None:
                break
            if "packet" in message:
                record = message["packet"]
                line = json.dumps(record) if as_json else format_trace(record)
                print(line, flush=True)
                packets += 1
            elif "ready" in message:
                timeout = None
                ready = message["ready"]
                queues = ", ".join(map(str, ready.get("queues", []))) or "none"
                late = ready.get("unconfirmed") or []
                say(f"tracing queue(s) {queues}" + (
                    f" (not confirmed yet: {', '.join(map(str, late))})" if late else "")
                    + "; Ctrl-C to stop")
            elif "confirmed" in message:
                queues = ", ".join(map(str, message["confirmed"].get("queues", [])))
                say(f"queue(s) {queues} confirmed")
            elif "warning" in message:
                say(printable(message["warning"]))
            elif "end" not in message and message.get("dropped", 0) > dropped:
                dropped = message["dropped"]
                say(f"{dropped} trace lines dropped so far (each worker sends at most "
                    f"{MAX_RECORDS_PER_SECOND} per second; a slow reader loses lines too)")
            if "end" in message:
                end = message
                break
    except KeyboardInterrupt:
        say(f"{packets} packets traced" + (f", {dropped} lines dropped" if dropped else ""))
        return EXIT_OK
    except TimeoutError:
        say(f"no answer from {path} in time")
        return EXIT_NOT_RUNNING
    except BrokenPipeError:  # stdout closed (| head): the trace is over
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ConnectionError, ValueError) as exc:
        say(f"the connection to {path} broke: {exc}")
        return EXIT_NOT_RUNNING
    if end is not None:
        dropped = max(dropped, int(end.get("dropped", 0)))
    summary = f"{packets} packets traced" + (f", {dropped} lines dropped" if dropped else "")
    if count is not None and packets >= count:
        if dropped:
            say(summary)
        return EXIT_OK
    if end is not None and end.get("end") == "stopping":
        say(f"the daemon stopped; {summary}")
    else:
        say(f"the daemon closed the trace (it stopped, or this reader took no line for "
            f"{STALL_TIMEOUT:g} s); {summary}")
    return EXIT_NOT_RUNNING


# -- plumbing ----------------------------------------------------------------------------------


def print_diagnostics(diagnostics: Sequence[Diagnostic]) -> None:
    for d in diagnostics:
        print(d.format(), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfrewrite", description="Transparent TCP packet rewriting on NFQUEUE."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in _COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for a in cmd.args:
            p.add_argument(*a.flags, **a.options)
        p.set_defaults(handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_RUNTIME
    except Exception as exc:  # a runtime failure: one line, not a traceback
        if os.environ.get("NFREWRITE_DEBUG"):
            raise
        reason = str(exc) or type(exc).__name__
        print(f"nfrewrite {args.command}: error: {reason}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
