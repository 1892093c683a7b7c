"""What reading rule files and checking their examples costs, by shape of input.

Each shape is written to a temporary directory as ``nfrewrite.toml`` + ``rules/*.toml`` and timed
with the code ``nfrewrite check`` runs: ``load_all`` (read, parse, scan positions, validate) and
``check_examples`` (every example through the engine). Figures are the best of ``--repeat`` runs.

    python -m bench.bench_load                       # every shape
    python -m bench.bench_load strings examples      # some of them

Shapes:

  strings       50 files x 1 MiB, rules with 60 kB find/with strings (a reload of 50 MiB)
  comments      50 files x 1 MiB, mostly comment lines, a rule every 100 kB
  small-rules   one 1 MiB file of ~9,500 one-line rules (token-dense: the scanner's worst case)
  examples      1,000 rules, each on its own port with one 4 KB example (10 files)
  examples-all  1,000 rules with no match (each applies to every packet), one 4 KB example each
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable

from nfrewrite.config.examples import check_examples
from nfrewrite.config.settings import load_all

MIB = 2**20


def _write(directory: str, files: dict[str, str]) -> str:
    rules = os.path.join(directory, "rules")
    os.makedirs(rules, mode=0o700)
    os.chmod(directory, 0o700)
    for name, text in files.items():
        path = os.path.join(rules, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
    config = os.path.join(directory, "nfrewrite.toml")
    with open(config, "w") as f:
        f.write('rules_dir = "rules"\n')
    os.chmod(config, 0o600)
    return config


def _fill(make: Callable[[int], str], size: int = MIB - 1) -> str:
    parts: list[str] = []
    total = 0
    i = 0
    while True:
        entry = make(i)
        if total + len(entry) > size:
            return "".join(parts)
        parts.append(entry)
        total += len(entry)
        i += 1


def strings() -> dict[str, str]:
    def rule(k: int, i: int) -> str:
        p = f"s{k}-{i}-".ljust(60_000, "z")
        return (f'[[rule]]\nname = "s{k}-{i}"\nmatch = {{ dport = 9999 }}\n'
                f'replace = [ {{ find = "{p}", with = "{p.upper()}" }} ]\n')

    return {f"{k:02d}.toml": _fill(functools.partial(rule, k)) for k in range(50)}


def comments() -> dict[str, str]:
    def line(k: int, i: int) -> str:
        text = "# " + "c" * 198 + "\n"
        if i % 500 == 0:
            text += (f'[[rule]]\nname = "c{k}-{i}"\nmatch = {{ dport = 9999 }}\n'
                     f'replace = [ {{ find = "c{k}-{i}", with = "C{k}-{i}" }} ]\n')
        return text

    return {f"{k:02d}.toml": _fill(functools.partial(line, k)) for k in range(50)}


def small_rules() -> dict[str, str]:
    def rule(i: int) -> str:
        return (f'[[rule]]\nname = "r{i}"\nmatch = {{ dport = {1 + i % 60000} }}\n'
                f'replace = [ {{ find = "apple-{i}", with = "APPLE-{i}" }} ]\n')

    return {"00.toml": _fill(rule)}


def _examples(match: Callable[[int], str]) -> dict[str, str]:
    body = ("apple pie " * 410)[:4096]
    out = body.replace("apple", "APPLE")
    rules = [
        f'[[rule]]\nname = "e{i}"\n{match(i)}'
        f'replace = [ {{ find = "apple", with = "APPLE" }} ]\n'
        f'examples = [ {{ input = "{body}", output = "{out}" }} ]\n'
        for i in range(1000)
    ]
    return {f"{k:02d}.toml": "".join(rules[k * 100 : k * 100 + 100]) for k in range(10)}


def examples() -> dict[str, str]:
    return _examples(lambda i: f"match = {{ dport = {1000 + i} }}\n")


def examples_all() -> dict[str, str]:
    return _examples(lambda i: "")


SHAPES: dict[str, Callable[[], dict[str, str]]] = {
    "strings": strings,
    "comments": comments,
    "small-rules": small_rules,
    "examples": examples,
    "examples-all": examples_all,
}


def measure(shape: str, repeat: int = 3) -> dict[str, float]:
    """Best-of-``repeat`` seconds for ``load_all`` and ``check_examples`` on one shape."""
    files = SHAPES[shape]()
    size = sum(len(t.encode()) for t in files.values())
    with tempfile.TemporaryDirectory(prefix="nfr-bench-load-") as d:
        config = _write(d, files)
        load_s = check_s = float("inf")
        rules = 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            _, ruleset, diags = load_all(config)
            t1 = time.perf_counter()
            if ruleset is None:
                raise SystemExit(f"{shape}: " + "; ".join(x.format() for x in diags[:3]))
            problems = check_examples(ruleset)
            t2 = time.perf_counter()
            if problems:
                raise SystemExit(f"{shape}: " + problems[0].format())
            rules = len(ruleset.rules)
            load_s, check_s = min(load_s, t1 - t0), min(check_s, t2 - t1)
    return {"mib": size / MIB, "rules": rules, "load_s": load_s,
            "load_s_per_mib": load_s / (size / MIB), "examples_s": check_s}


def main(argv: list[str]) -> int:
    repeat = 3
    if argv[:1] == ["--repeat"]:
        repeat, argv = int(argv[1]), argv[2:]
    for shape in argv or list(SHAPES):
        r = measure(shape, repeat)
        print(f"{shape:13} {r['mib']:5.1f} MiB {r['rules']:6.0f} rules  load {r['load_s']:6.2f} s"
              f" ({r['load_s_per_mib']:.3f} s/MiB)  examples {r['examples_s']:6.2f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
