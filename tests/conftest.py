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


# Tests that start real Flower processes (a SuperLink, SuperNodes, a simulation): marked
# `slow`, so that `pytest -m slow` runs them alone and `pytest -m "not slow"` the rest.
_REAL_PROCESS_FIXTURES = {"default_sim", "deployment"}
_REAL_PROCESS_MODULES = {"test_ledger_kill.py", "test_secagg_simulation.py", "test_simulation_e2e.py"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if _REAL_PROCESS_FIXTURES & set(item.fixturenames) or item.path.name in _REAL_PROCESS_MODULES:
            item.add_marker(pytest.mark.slow)
