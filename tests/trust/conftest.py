"""The trust tests read the suite's shared simulation (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sim_run(default_sim) -> Path:
    """The suite's shared 3-site, 2-round DP simulation (tests/conftest.py): its run directory."""
    proc, out = default_sim
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
