"""Module boundaries: what a pure module pulls in when it is imported, in a fresh interpreter.

The compiled rule set and the engine run in every queue worker and in ``nfrewrite check``; the
TOML loader, the file reader and the iptables runner are separate modules so that importing the
first does not load the second. A stray import (a constant taken from the wrong module) would
bring them back without any test failing, so these check it directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
READERS = ("tomllib", "subprocess", "nfrewrite.config")

CASES = [
    # module imported, module name prefixes that must not be loaded by it
    ("nfrewrite.core.rules", READERS),
    ("nfrewrite.core.engine", READERS),
    ("nfrewrite.kernel.ruletext", ("subprocess", "nfrewrite.config")),
    ("nfrewrite.kernel.prefilter", ("subprocess", "tomllib")),
    ("nfrewrite.kernel.ifname", ("subprocess", "tomllib", "nfrewrite.config")),
    ("nfrewrite.config.diagnostics", ("subprocess", "tomllib", "nfrewrite.config.tomlfile")),
]


@pytest.mark.parametrize(("module", "forbidden"), CASES)
def test_importing_a_pure_module_loads_no_reader_or_runner(
    module: str, forbidden: tuple[str, ...]
) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({forbidden!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert proc.stdout.split() == [], f"importing {module} loaded {proc.stdout.strip()}"
