"""Run the Candor Flower App on Flower's own simulation engine.

No hand-written federated loop: this starts a private ``flower-superlink --simulation``
on free loopback ports, submits the app with ``flwr run`` (Flower's CLI, pointed at a
throw-away ``FLWR_HOME``), streams its log, checks the run's final status (``flwr run``
exits 0 even when the ServerApp failed) and always stops every process it started.
Flower's per-run dependency installation is off: the app runs in this environment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.error import URLError
from urllib.request import urlopen

import tomli_w

from common.errors import CandorError

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "candor-sim"


class SimulationError(CandorError):
    """The simulated run did not complete."""


@dataclass(frozen=True)
class SimulationResult:
    run_id: int | None
    status: str
    seconds: float
    log_path: Path


def free_port() -> int:
    """A port that is free on 127.0.0.1 now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until true, or raise SimulationError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SimulationError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _healthy(port: int) -> bool:
    try:
        with urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


@contextmanager
def local_superlink(home: Path, env: Mapping[str, str]) -> Iterator[int]:
    """A simulation SuperLink on free loopback ports; yields its HTTP port."""
    port, control = free_port(), free_port()
    log_file = home / "superlink.log"
    cmd = [
        _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--control-api-address", f"127.0.0.1:{control}",
        "--disable-runtime-dependency-installation", "--log-file", str(log_file),
    ]
    proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
            return _healthy(port)

        wait_until(ready, timeout=60, what="the local SuperLink to start")
        yield port
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group (SuperLink, SuperExec, simulation, Ray), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(
    run_config: Mapping[str, Any],
    *,
    num_sites: int,
    log_path: Path,
    on_line: Callable[[str], None] = lambda line: None,
    num_cpus_per_site: int = 1,
) -> SimulationResult:
    """Simulate one run of the Candor app with ``num_sites`` sites.

    ``run_config`` overrides keys of ``[tool.flwr.app.config]``; ``on_line`` receives
    every streamed log line; the full log is written to ``log_path``.

    Raises:
        SimulationError: the SuperLink did not start, or the run did not complete.
    """
    start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="candor-flwr-"))
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "0",
        # Flower starts its helpers (flower-superexec, flwr-simulation) by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), os.environ.get("PYTHONPATH", "")])),
    }
    try:
        with local_superlink(home, env) as port:
            (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True},
            }}))
            overrides = home / "run_config.toml"
            overrides.write_text(tomli_w.dumps(dict(run_config)))
            cmd = [_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(overrides),
                   "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={num_cpus_per_site}"]
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1, start_new_session=True)
                try:
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        log_file.write(line)
                        on_line(line.rstrip("\n"))
                    proc.wait()
                finally:
                    _stop_group(proc)
            run_id, status = _last_run_status(env)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    result = SimulationResult(run_id, status, time.monotonic() - start, log_path)
    if status != "finished:completed":
        raise SimulationError(f"the simulated run ended as '{status}'; the full log is in {log_path}")
    return result


def _last_run_status(env: Mapping[str, str]) -> tuple[int | None, str]:
    """(run id, status) of the newest run, from `flwr ls --format json`."""
    out = subprocess.run([_bin("flwr"), "ls", CONNECTION, "--format", "json"], env=dict(env),
                         capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (ValueError, KeyError):
        return None, f"unknown ({out.stdout.strip() or out.stderr.strip()})"
    if not runs:
        return None, "not submitted"
    newest = max(runs, key=lambda r: int(r["run-id"]))
    return int(newest["run-id"]), str(newest["status"])
