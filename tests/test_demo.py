"""`make demo` works from a clean state and shows the rewritten header as it arrived."""

from __future__ import annotations

import os
import subprocess

import pytest

from lab.netns import list_namespaces

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.privileged
def test_make_demo_shows_the_rewrite_and_leaves_nothing_behind() -> None:
    res = subprocess.run(["make", "-s", "demo"], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "client got:     Server: httpd/0.6 Python/" in out
    assert "server received MSS 1360" in out
    assert "demo OK" in out
    assert [ns for ns in list_namespaces() if ns.startswith("nfrdemo-")] == []
