"""Start, stop and query the federation's Flower SuperLink.

The SuperLink always runs with TLS (the federation's server certificate) and SuperNode
authentication; it binds 127.0.0.1 unless told otherwise; Flower's per-run dependency
installation is off (the app runs in this environment). Its control plane is closed:
it runs under Candor's launcher (:mod:`server.superlink_main`), which admits to the
Control API only the coordinator's token and to ServerApp tasks only the SuperExec it
starts (:mod:`server.control_plane`). Launcher, SuperExec and ServerApps share one
process group, recorded in ``DIR/superlink.pid``, and log to ``DIR/logs/superlink.log``.
Its database (runs, registered nodes) lives in ``DIR/state/`` so both survive restarts.
The coordinator's ``flwr`` CLI is configured in ``DIR/flwr/`` (``config.toml`` and the
token in ``credentials.yaml``) as connection ``candor``: ``FLWR_HOME=DIR/flwr flwr ls
candor`` works against the running server, from this account only.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from candor.common.atomic import write_atomic, write_json_atomic
from candor.common.errors import ConfigError, FederationError
from candor.common.processes import (
    FlwrCommandFailed, flower_env, flwr_json, last_error_line, pid_alive, stop_pid_group, superlink_healthy,
    wait_until,
)

from . import control_plane
from .federation import CONNECTION, Federation
from .pki import certificate_hosts

__all__ = ["ACTIVE", "LAUNCHER", "Running", "ensure_credentials", "env", "log_file", "nodes", "online", "reconcile",
           "register", "running", "start", "stop", "superexec_pids", "unregister", "uptime"]

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_GRACE = 15.0
LAUNCHER = "candor.server.superlink_main"  # run as `python -m LAUNCHER`


@dataclass(frozen=True)
class Running:
    pid: int
    host: str
    port: int
    started: float

    @property
    def local_address(self) -> str:
        """The address this machine's `flwr` CLI uses (loopback if bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def pid_file(fed: Federation) -> Path:
    return fed.dir / "superlink.pid"


def log_file(fed: Federation) -> Path:
    return fed.dir / "logs" / "superlink.log"


def env(fed: Federation) -> dict[str, str]:
    """Environment for the SuperLink and the coordinator's `flwr` CLI calls."""
    return flower_env(fed.flwr_home)


def running(fed: Federation) -> Running | None:
    """The running SuperLink of this federation, or None (a stale pid file is ignored)."""
    try:
        doc = json.loads(pid_file(fed).read_text())
        pid = int(doc["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(pid) or not _is_our_superlink(pid, fed):
        return None
    return Running(pid, str(doc["host"]), int(doc["port"]), float(doc["started"]))


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_our_superlink(pid: int, fed: Federation) -> bool:
    """``pid`` runs this federation's SuperLink: Candor's launcher (or, started by an
    earlier Candor, a bare ``flower-superlink``) with this federation's server certificate."""
    cmdline = _cmdline(pid)
    ours = LAUNCHER.encode() in cmdline or any(c.endswith(b"flower-superlink") for c in cmdline)
    return ours and str(fed.pki.server_cert).encode() in cmdline


def superexec_pids(pid: int) -> list[int]:
    """The ``flower-superexec`` processes in the SuperLink's process group (led by ``pid``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pid and any(c.endswith(b"flower-superexec") for c in _cmdline(int(proc.name))):
            found.append(int(proc.name))  # fields[2] is the process group id
    return found


def ensure_credentials(fed: Federation) -> list[str]:
    """Give the federation the closed control plane's secrets if it lacks them (a
    directory made before they existed) and write the coordinator's `flwr` CLI config
    for the default local address; returns what was created (empty if nothing was)."""
    token, created = control_plane.ensure(fed.state_dir, fed.flwr_home)
    if created:
        write_cli_config(fed, fed.local_address, token=token)
    return created


def write_cli_config(fed: Federation, address: str, *, token: str | None = None) -> None:
    """Point the coordinator's `flwr` CLI (FLWR_HOME=DIR/flwr) at this SuperLink: config.toml
    and the control token in credentials.yaml, both for ``address``."""
    if token is None:
        token, _ = control_plane.ensure(fed.state_dir, fed.flwr_home)
    control_plane.write_cli_config(fed.flwr_home, connection=CONNECTION, address=address, ca_cert=fed.pki.ca_cert,
                                   token=token)


def start(fed: Federation, *, host: str = "127.0.0.1", port: int | None = None) -> Running:
    """Start the SuperLink and wait until it answers over TLS.

    Raises:
        FederationError: it is running already, the port is taken, or it did not start.
        ConfigError: ``host`` is not named by the server certificate.
        KeyFileError: a certificate or key of the federation is missing, broken or exposed.
    """
    if (current := running(fed)) is not None:
        raise FederationError(f"the SuperLink of {fed.dir} is running already (pid {current.pid}, "
                          f"port {current.port}); stop it with `candor-server stop {fed.dir}`")
    fed.pki.check()
    if host not in ("0.0.0.0", "::", "") and host not in certificate_hosts(fed.pki.server_cert):
        raise ConfigError(f"--host {host}: the server certificate does not name it (it names "
                          f"{', '.join(certificate_hosts(fed.pki.server_cert))}), so nothing could verify the "
                          "server there; listen on 0.0.0.0 or one of those, or create the federation with that --host")
    port = port or fed.port
    _check_port_free(host, port)
    log_path = log_file(fed)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fed.state_dir.mkdir(mode=0o700, exist_ok=True)
    ensure_credentials(fed)
    control_plane.read_token_digest(fed.control_token_digest)  # private and well-formed, before anything starts
    control_plane.read_secret(fed.superexec_secret)
    cmd = [
        sys.executable, "-m", LAUNCHER,
        "--control-token-sha256", str(fed.control_token_digest),
        "--superexec-auth-secret-file", str(fed.superexec_secret),
        "--",  # Flower's own flower-superlink arguments; the launcher adds --isolation process and the secret
        "--ssl-ca-certfile", str(fed.pki.ca_cert),
        "--ssl-certfile", str(fed.pki.server_cert),
        "--ssl-keyfile", str(fed.pki.server_key),
        "--enable-supernode-auth",
        "--host", host, "--port", str(port),
        "--disable-runtime-dependency-installation",
        "--database", str(fed.state_dir / "superlink.db"),
    ]
    with open(log_path, "ab") as log:
        log.write(f"\n=== candor-server start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env(fed), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=fed.dir)
    state = Running(proc.pid, host, port, time.time())
    write_json_atomic(pid_file(fed), {"pid": proc.pid, "host": host, "port": port, "started": state.started})
    write_cli_config(fed, state.local_address)

    def ready() -> bool:
        if proc.poll() is not None:
            raise FederationError(f"the SuperLink exited with code {proc.returncode} while starting: "
                                  f"{last_error_line(log_path)} (full log: {log_path})")
        # Up once it answers over TLS and its launcher has started the SuperExec.
        return superlink_healthy(state.local_address, ca_cert=fed.pki.ca_cert) and bool(superexec_pids(proc.pid))

    try:
        wait_until(ready, timeout=START_TIMEOUT, what=f"the SuperLink to answer at {state.local_address}")
    except BaseException:
        stop_pid_group(proc.pid, grace=5)
        proc.wait()
        pid_file(fed).unlink(missing_ok=True)
        raise
    return state


def stop(fed: Federation) -> bool:
    """Stop the SuperLink, its SuperExec and its ServerApp processes (one process group);
    False if it was not running."""
    current = running(fed)
    if current is None:
        pid_file(fed).unlink(missing_ok=True)
        return False
    helpers = superexec_pids(current.pid)
    stop_pid_group(current.pid, grace=STOP_GRACE)
    wait_until(lambda: not pid_alive(current.pid) and not any(pid_alive(p) for p in helpers), timeout=STOP_GRACE,
               what=f"the SuperLink (pid {current.pid}) and its SuperExec to exit")
    pid_file(fed).unlink(missing_ok=True)
    return True


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise FederationError(f"cannot listen on {host}:{port} ({err.strerror}): another program (or another "
                              "federation) uses that port; pass `--port` to `candor-server start`") from None


# --- registered nodes ----------------------------------------------------------------

def nodes(fed: Federation) -> list[dict[str, Any]]:
    """The SuperLink's nodes (``flwr supernode list``): node-id, status, online-at, ..."""
    return flwr_json(["supernode", "list", CONNECTION], env=env(fed))["nodes"]


def register(fed: Federation, name: str, *, save: bool = True) -> int:
    """Register site ``name``'s key with the running SuperLink; returns its node id."""
    entry = fed.sites[name]
    key_file = fed.dir / "state" / f"{name}.pub"
    write_atomic(key_file, entry.public_key + "\n")
    try:
        doc = flwr_json(["supernode", "register", str(key_file), CONNECTION, "--name", name], env=env(fed))
    except FlwrCommandFailed as err:
        if "already in use" in str(err):
            raise FederationError(f"the SuperLink refuses site '{name}'s key ({entry.fingerprint}): it was registered "
                              "and removed before, and Flower never re-admits a removed key. Remove the site and "
                              "ask it for a new key (`candor-client new-key SITE_DIR`)") from None
        raise
    finally:
        key_file.unlink(missing_ok=True)
    node_id = int(doc["node-id"])
    entry.node_id = node_id
    if save:
        fed.save_registry()
    return node_id


def unregister(fed: Federation, node_id: int) -> None:
    flwr_json(["supernode", "unregister", str(node_id), CONNECTION], env=env(fed))


ACTIVE = ("registered", "online", "offline")


def reconcile(fed: Federation) -> list[str]:
    """Make the SuperLink's registered nodes equal the registry; returns what changed.

    Each `flwr` call is a process start (about 2 s): they run in parallel.
    """
    listed = {int(n["node-id"]): n["status"] for n in nodes(fed)}
    active = {nid for nid, status in listed.items() if status in ACTIVE}
    missing = [name for name, e in sorted(fed.sites.items()) if e.node_id is None or e.node_id not in active]
    wanted = {e.node_id for e in fed.sites.values() if e.node_id in active}
    extra = sorted(active - wanted)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            registered = list(pool.map(lambda name: register(fed, name, save=False), missing))
            list(pool.map(lambda node_id: unregister(fed, node_id), extra))
    finally:
        fed.save_registry()  # keep every node id obtained, even if another call failed
    return ([f"registered site '{n}' (node {i})" for n, i in zip(missing, registered)]
            + [f"unregistered node {i} (not in the registry)" for i in extra])


def online(fed: Federation) -> dict[str, str]:
    """Site name (or ``node N`` for a node not in the registry) -> status, for every node the
    SuperLink counts as active (registered, online or offline)."""
    out = {}
    for node in nodes(fed):
        if node["status"] in ACTIVE:
            nid = int(node["node-id"])
            out[fed.site_by_node(nid) or f"node {nid}"] = node["status"]
    return out


def uptime(state: Running) -> str:
    seconds = int(time.time() - state.started)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
