"""Shared test plumbing.

Privileged tests (real kernel, network namespaces) are marked ``@pytest.mark.privileged``.
A non-root developer sees them skipped; under CI (``CI=true``) a privileged test that cannot run
is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from lab.netns import Lab

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Config and rule files the tests write must not be group/other-writable (the daemon refuses
# those, as sshd does): make that independent of the caller's umask.
os.umask(0o022)


def _can_run_privileged() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/proc/sys/net/bridge"):
        return "kernel without br_netfilter"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    why = _can_run_privileged()
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"privileged test cannot run under CI: {why}", pytrace=False)
    pytest.skip(f"privileged: {why}")


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh client -- appliance -- server namespace lab (``lab.netns.Lab``), torn down after.

    Options through indirect parametrization: ``@pytest.mark.parametrize("lab", [{"make_bridge":
    True}], indirect=True)``.
    """
    from lab.netns import Lab

    with Lab(**getattr(request, "param", {})) as the_lab:
        yield the_lab


@pytest.fixture
def workdir() -> Iterator[str]:
    """A private temporary directory for a lab test's config, rules and captures.

    Request it before ``lab`` so it is removed after the lab has killed every process in it.
    """
    with tempfile.TemporaryDirectory(prefix="nfr-test-") as d:
        yield d
