"""Fixtures of the deployment tests: one real federation on 127.0.0.1 (see deploy_helpers)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import (
    BIN, BUDGET, BUDGET_SITE, DELTA, ENV, RUN_CONFIG, SITES, Deployment, Processes, make_site, server, stop_superlink,
)

from candor.common.processes import free_port
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.partition import partition


@pytest.fixture(scope="package")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    dep = Deployment(root=root, fed=root / "federation", port=free_port(), procs=Processes(root / "logs"))
    frame = breast_cancer_frame()
    parts = partition(frame, num_sites=4, label="diagnosis", seed=11)
    (root / "data").mkdir()
    for name, part in zip((*SITES, BUDGET_SITE), parts):
        dep.data[name] = root / "data" / f"{name}.csv"
        part.to_csv(dep.data[name], index=False)
    code, out, err = server("init", dep.fed, "--name", "loopback", "--host", "127.0.0.1", "--host", "localhost",
                            "--port", dep.port, "--schema", DEMO_SCHEMA_PATH,
                            "-c", "model=logreg", "-c", "num-server-rounds=2")
    assert code == 0, err
    try:
        for name in (*SITES, BUDGET_SITE):
            dep.sites[name] = make_site(dep, name)
        code, out, err = server("start", dep.fed)
        assert code == 0, err
        for name in SITES:
            dep.start_client(name)
        dep.start_client(BUDGET_SITE, "--budget-epsilon", BUDGET, "--budget-delta", DELTA)
        for name, proc in dep.clients.items():
            dep.procs.wait_for(proc, "connected as node", timeout=180)
        yield dep
    finally:
        dep.procs.stop_all()
        stop_superlink(dep.fed)


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    seconds: float


@pytest.fixture(scope="package")
def completed_run(deployment):
    """`candor-server run` for 2 rounds, once (a real process, with a deadline)."""
    start = time.monotonic()
    proc = subprocess.run([BIN / "candor-server", "run", deployment.fed, *RUN_CONFIG, "--wait-sites", "60"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    seconds = time.monotonic() - start
    runs = sorted(p.parent for p in (deployment.fed / "runs").glob("*/run.json"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return RunResult(proc.returncode, proc.stdout, proc.stderr, runs[-1], seconds)
