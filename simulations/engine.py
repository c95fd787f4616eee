"""Run the Candor Flower App on Flower's own simulation engine.

No hand-written federated loop: this starts a private ``flower-superlink --simulation``
on free loopback ports, submits the app with ``flwr run`` (Flower's CLI, pointed at a
throw-away ``FLWR_HOME``), streams its log, checks the run's final status (``flwr run``
exits 0 even when the ServerApp failed) and always stops every process it started.
Flower's per-run dependency installation is off: the app runs in this environment.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import tomli_w

from candor.common.errors import CandorError
from candor.common.processes import (
    APP_DIR, flower_bin, flower_env, free_port, run_status, stop_group, stream_flwr_run, superlink_healthy, wait_until,
)

logger = logging.getLogger(__name__)

CONNECTION = "candor-sim"


class SimulationError(CandorError):
    """The simulated run did not complete."""


@dataclass(frozen=True)
class SimulationResult:
    run_id: int | None
    status: str
    seconds: float
    log_path: Path


@contextmanager
def local_superlink(home: Path, env: Mapping[str, str]) -> Iterator[int]:
    """A simulation SuperLink on a free loopback port; yields its HTTP port. (Its Control
    API is on the same port, open to this machine's users for the run's duration: a
    researcher's own simulation, no site's data; deployment closes it, docs/deployment.md.)"""
    port = free_port()
    log_file = home / "superlink.log"
    cmd = [
        flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", "--log-file", str(log_file),
    ]
    proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
            return superlink_healthy(f"127.0.0.1:{port}")

        wait_until(ready, timeout=60, what="the local SuperLink to start", error=SimulationError)
        yield port
    finally:
        stop_group(proc)


_RAY_TMP_MAX = 40  # Ray's socket paths add ~67 characters; Linux allows 107 (AF_UNIX)


def _ray_temp_dir() -> Path:
    """A throw-away directory for Ray's session files, removed with the run: in the
    temp dir when its path is short enough for Ray's sockets, else in /tmp."""
    base = tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="candor-ray-", dir=base if len(base) + 20 <= _RAY_TMP_MAX else "/tmp"))


def run(
    run_config: Mapping[str, Any],
    *,
    num_sites: int,
    log_path: Path,
    on_line: Callable[[str], None] = lambda line: None,
    num_cpus_per_site: int = 1,
    app_dir: Path = APP_DIR,
    stall_timeout: float | None = None,
) -> SimulationResult:
    """Simulate one run of the Candor app (or the Flower App in ``app_dir``) with
    ``num_sites`` sites.

    ``run_config`` overrides keys of ``[tool.flwr.app.config]``; ``on_line`` receives
    every streamed log line (without its newline); the full log is written to
    ``log_path`` as Flower printed it (``common.processes.stream_flwr_run``). With
    ``stall_timeout``, a run that prints nothing for that long is stopped (the watchdog).

    Raises:
        SimulationError: the SuperLink did not start, or the run did not complete.
        RunStalled: the watchdog stopped a run that made no progress.
    """
    start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="candor-flwr-"))
    ray_tmp = _ray_temp_dir()
    env = flower_env(home, RAY_DEDUP_LOGS="0", RAY_TMPDIR=str(ray_tmp))
    try:
        with local_superlink(home, env) as port:
            (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True},
            }}))
            overrides = home / "run_config.toml"
            overrides.write_text(tomli_w.dumps(dict(run_config)))
            cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(overrides),
                   "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={num_cpus_per_site}"]
            submitted = stream_flwr_run(cmd, env=env, log_path=log_path, on_line=on_line, stall_timeout=stall_timeout)
            run_id, status = run_status(CONNECTION, env=env, run_id=submitted)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result = SimulationResult(run_id, status, time.monotonic() - start, log_path)
    if status != "finished:completed":
        raise SimulationError(f"the simulated run ended as '{status}'; the full log is in {log_path}")
    return result
