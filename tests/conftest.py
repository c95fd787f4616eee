"""The suite's one shared real simulation: `candor-sim run` with the default model,
3 sites, 2 rounds, DP at the default target. Tests that only read a finished run
directory share it (a simulation costs 20-40 s of the suite's budget)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CANDOR_SIM = str(Path(sys.executable).parent / "candor-sim")


@pytest.fixture(scope="session")
def default_sim(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """(the finished `candor-sim` process, its run directory)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = subprocess.run(
        [CANDOR_SIM, "run", "--num-sites", "3", "--out", str(out), "-c", "num-server-rounds=2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, out
