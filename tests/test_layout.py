"""The layout is a promise: ``nfrewrite.core`` is pure, ``nfrewrite.config`` reads files only.

Each module is imported alone in a fresh interpreter (an import made by an earlier test must not
hide one made here), and the test fails if anything that talks to the kernel, the network or
another process got loaded on the way. The core is what the fuzzer and the benchmarks drive, and
what ``replay`` runs offline: it must stay bytes in, bytes out.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import nfrewrite.config
import nfrewrite.core

#: never loaded by the core: sockets, processes, the queue, netlink, the metrics library
IO_MODULES = ("socket", "subprocess", "netfilterqueue", "pyroute2", "prometheus_client")
#: and the core does not reach back into the file side or the shell
CORE_FORBIDDEN = (*IO_MODULES, "tomllib", "nfrewrite.config", "nfrewrite.kernel",
                  "nfrewrite.service", "scapy")
CONFIG_FORBIDDEN = (*IO_MODULES, "nfrewrite.kernel", "nfrewrite.service", "scapy")


def _modules(package: object) -> list[str]:
    name = package.__name__  # type: ignore[attr-defined]
    return [f"{name}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]  # type: ignore[attr-defined]


def _loaded_by(module: str) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def _hits(loaded: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_the_packages_hold_modules() -> None:
    # a renamed package must not turn the tests below into zero cases
    assert len(_modules(nfrewrite.core)) >= 5
    assert len(_modules(nfrewrite.config)) >= 4


@pytest.mark.parametrize("module", _modules(nfrewrite.core))
def test_core_module_is_pure(module: str) -> None:
    assert _hits(_loaded_by(module), CORE_FORBIDDEN) == []


@pytest.mark.parametrize("module", _modules(nfrewrite.config))
def test_config_module_does_no_network_or_kernel_io(module: str) -> None:
    assert _hits(_loaded_by(module), CONFIG_FORBIDDEN) == []


def test_the_check_detects_a_forbidden_import() -> None:
    # the probe itself works: a shell module does load what the core must not
    assert "subprocess" in _hits(_loaded_by("nfrewrite.kernel.firewall"), CORE_FORBIDDEN)


#: pure modules outside the core: the rule-text compiler and the prefilter are what ``check``
#: runs, the runner (``kernel.firewall``) is separate so that they load no process machinery
PURE_ELSEWHERE = [
    ("nfrewrite.kernel.ruletext", ("subprocess", "tomllib", "pyroute2")),
    ("nfrewrite.kernel.prefilter", ("subprocess", "tomllib", "pyroute2")),
    ("nfrewrite.config.ifname", ("subprocess", "tomllib", "nfrewrite.config.tomlfile")),
    ("nfrewrite.config.diagnostics", ("subprocess", "tomllib", "nfrewrite.config.tomlfile")),
]


@pytest.mark.parametrize(("module", "forbidden"), PURE_ELSEWHERE)
def test_pure_module_outside_the_core_loads_no_reader_or_runner(
    module: str, forbidden: tuple[str, ...]
) -> None:
    assert _hits(_loaded_by(module), forbidden) == []
