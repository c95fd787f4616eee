"""The trust tests' one real simulation, shared by every module that needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CANDOR_SIM = str(Path(sys.executable).parent / "candor-sim")


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory) -> Path:
    """A finished 3-site, 2-round DP simulation (logistic regression): its run directory."""
    out = tmp_path_factory.mktemp("trust-sim") / "run"
    proc = subprocess.run(
        [CANDOR_SIM, "run", "--num-sites", "3", "--out", str(out), "-c", "num-server-rounds=2", "-c", "model=logreg"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
