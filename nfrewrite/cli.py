"""The ``nfrewrite`` command: ``check``, ``run``, ``replay``.

Theory of operation
-------------------
Each subcommand is ONE decorated function: ``@command(name, help, *arguments)`` registers it, the
arguments are declared with :func:`arg` (same parameters as ``ArgumentParser.add_argument``), and
the function takes the parsed ``argparse.Namespace`` and returns the exit code. ``main`` builds the
parser from the registry, runs the chosen function and turns failures into exit codes:

    0  success
    1  invalid config or rules (diagnostics on stderr: ``path:line:col: error: text``, line, caret)
    2  usage error (argparse)
    4  runtime failure (one line on stderr; set NFREWRITE_DEBUG=1 for the traceback)
    5  replay: the input capture is damaged part way (one line on stderr saying where; the output
       holds the packets before the damage, their summary goes to stdout)

Diagnostics and warnings go to stderr; a command's result (``check``'s summary line) to stdout.
"""

from __future__ import annotations

import argparse
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
        kernel, refused = kernel_rules(ruleset, *queue)
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
