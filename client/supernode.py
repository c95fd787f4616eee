"""Running and supervising Flower's SuperNode for a site.

:func:`write_node_config` writes what the SuperNode passes to the ClientApp
(``node_config.toml``, read by ``client.site.resolve_site``); :func:`run_supernode` starts
``flower-supernode`` with the site's key and CA, logs everything it prints to
``logs/supernode.log``, shows the lines that matter, and turns the failures Flower only
logs (a refused key, a wrong CA) into one clear error. It runs until the SuperNode exits,
or until Ctrl-C / SIGTERM, which stop it and its ClientApp processes.
"""

from __future__ import annotations

import ctypes
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.atomic import write_atomic
from candor.common.errors import ConnectionFailed
from candor.common.processes import flower_bin, flower_env, free_port, last_error_line, timestamped

from .budget import SiteBudget
from .site_dir import SiteDir

__all__ = ["SUPEREXEC_POLL_SECONDS", "run_supernode", "write_node_config"]

# Flower's SuperExec polls the SuperNode for a ClientApp process to start every 1 s by
# default: on average 0.5 s of every message. 0.2 s saves ~0.4 s per message for ~2.7 %
# of a core while idle (1 s: 0.6 %, 0.1 s: 4.2 %; measured here). The server keeps
# Flower's default: its SuperExec starts one ServerApp per run. An explicit
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL in the environment wins.
SUPEREXEC_POLL_SECONDS = "0.2"
STOP_GRACE = 10.0  # seconds the SuperNode gets to exit after SIGTERM, before SIGKILL
PUMP_DRAIN = 15.0  # seconds to wait for the last lines once the SuperNode has exited


def write_node_config(site: SiteDir, name: str, data: Path, test: Path | None, budget: SiteBudget,
                      *, explain_opt_out: bool = False, limits: dict[str, Any] | None = None,
                      schema_sha256: str = "") -> Path:
    """Write ``node_config.toml`` (a file: paths with spaces or quotes stay intact); returns its path.

    ``limits``: site.toml's ``[limits]`` (``max-rounds``, ..., ``data-loader``,
    ``model-plugins``), passed as node config keys (client/site.py reads them)."""
    config: dict[str, Any] = {
        "site-name": name,
        "data-path": str(data),
        "schema-path": str(site.schema_path),
        "site-dir": str(site.dir),
    }
    if schema_sha256:
        config["schema-sha256"] = schema_sha256
    for key, value in (limits or {}).items():
        config[key] = ",".join(value) if key == "model-plugins" else value
    if test is not None:
        config["test-path"] = str(test)
    if budget.epsilon is not None:
        config["budget-epsilon"] = float(budget.epsilon)
    if budget.delta is not None:
        config["budget-delta"] = float(budget.delta)
    if explain_opt_out:
        config["explain-opt-out"] = True
    write_atomic(site.node_config_path, tomli_w.dumps(config))
    return site.node_config_path


def run_supernode(site: SiteDir, name: str, *, server: str, node_config: Path, runtime_port: int | None,
                  verbose: bool) -> int:
    """Run Flower's SuperNode for site ``name`` until it exits or is stopped; 0 if stopped.

    Args:
        server: ``HOST:PORT`` of the SuperLink.
        runtime_port: local port of the SuperNode's Runtime API (``None``: a free one).
        verbose: print every line of the SuperNode's log.

    Raises:
        ConnectionFailed: the server refused the key or the certificate, or the SuperNode exited.
    """
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink", server,
        "--root-certificates", str(site.ca_cert),
        "--auth-supernode-private-key", str(site.private_key),
        "--node-config", str(node_config),
        "--isolation", "subprocess",
        # the SuperNode's local Runtime API for its ClientApp processes: loopback, own port
        "--host", "127.0.0.1", "--port", str(runtime_port or free_port()),
    ]
    site.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = flower_env(site.flwr_home)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_SECONDS)
    return _supervise(cmd, env, site, name, verbose=verbose)


class _Stop(Exception):
    pass


def _supervise(cmd: list[str], env: dict[str, str], site: SiteDir, name: str, *, verbose: bool) -> int:
    """Run the SuperNode in this process group; log everything; turn known failures into one line.

    The SuperNode's children (SuperExec, ClientApp processes) share its output pipe and
    exit when they see it gone, which they only do once it is reaped: so this loop
    waits on the process, not on the end of the pipe.
    """
    failure: str | None = None
    connected = False
    stopping = False

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    lines: queue.Queue[str | None] = queue.Queue()
    with open(site.log_path, "a") as log:
        log.write(f"\n=== candor-client start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=site.dir,
                                preexec_fn=_die_with_parent)
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    raw = lines.get(timeout=0.2)
                except queue.Empty:
                    if proc.poll() is not None:  # reaped: now its children see it gone and exit
                        reader.join(timeout=PUMP_DRAIN)
                        if lines.empty():
                            break
                    continue
                if raw is None:
                    break
                log.write(timestamped(raw))
                log.flush()
                line = raw.strip()
                if "SuperNode ID:" in line and not connected:
                    connected = True
                    print(f"Site '{name}' connected as node {line.rsplit(':', 1)[1].strip()}; waiting for "
                          "training requests (Ctrl-C to stop).", flush=True)
                elif "Failed to activate SuperNode" in line or "code: 2004" in line:
                    failure = (f"the server refused this site's key ({site.public_key}): the coordinator has not "
                               f"registered it yet (`candor-server add-site DIR {name} node.pub`) or has removed "
                               "this site")
                elif "CERTIFICATE_VERIFY_FAILED" in line:
                    failure = (f"the server's certificate was not signed by the federation's CA ({site.ca_cert}): "
                               "ask the coordinator for a fresh invite")
                elif "Receiving:" in line or "refuses round" in line or "ERROR" in line or verbose:
                    print(_short(line), flush=True)
            proc.wait()
        except (KeyboardInterrupt, _Stop):
            stopping = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            _stop_child(proc)
    if stopping:
        print(f"Site '{name}' stopped.")
        return 0
    if failure:
        raise ConnectionFailed(failure)
    if connected and proc.returncode == 0:
        raise ConnectionFailed(f"the SuperNode stopped (the coordinator may have removed site '{name}'); "
                               f"its log is {site.log_path}")
    raise ConnectionFailed(f"the SuperNode exited with code {proc.returncode}: {last_error_line(site.log_path)} "
                           f"(full log: {site.log_path})")


def _pump(stream, lines: queue.Queue) -> None:
    for raw in stream:
        lines.put(raw)
    lines.put(None)


def _die_with_parent() -> None:
    """In the SuperNode, before exec: get SIGTERM if `candor-client` dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _short(line: str) -> str:
    """A log line without Flower's coloured level prefix ("INFO :      ")."""
    return re.sub(r"^(\x1b\[[0-9;]*m)?[A-Z]+\s*(\x1b\[0m)?\s*:\s*", "", line)


def _stop_child(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM the SuperNode (its SuperExec and ClientApp processes watch its pid), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
