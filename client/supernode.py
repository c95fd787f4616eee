"""Running and supervising Flower's SuperNode for a site.

:func:`write_node_config` writes what the SuperNode passes to the ClientApp
(``node_config.toml``, read by ``client.site.resolve_site``); :func:`run_supernode` starts
``flower-supernode`` with the site's key and CA and, beside it, Candor's SuperExec, which
runs every ClientApp through the site's code guard (``candor-clientapp``: only the
installed Candor release or an app the site approved runs); it logs everything both
print to ``logs/supernode.log``, shows the lines that matter, and turns the failures
Flower only logs (a refused key, a wrong CA) into one clear error. It runs until the
SuperNode exits, or until Ctrl-C / SIGTERM, which stop it, its SuperExec and their
ClientApp processes.
"""

from __future__ import annotations

import ctypes
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.atomic import write_atomic
from candor.common.errors import ConnectionFailed
from candor.common.processes import flower_bin, flower_env, free_port, last_error_line, timestamped

from .approval import Approvals
from .budget import SiteBudget
from .clientapp_main import SITE_DIR_ENV, SITE_NAME_ENV
from .site_dir import SiteDir

__all__ = ["KeyRefused", "SUPEREXEC_POLL_SECONDS", "SUPEREXEC_SECRET", "run_supernode", "write_node_config"]

# Flower's SuperExec polls the SuperNode for a ClientApp process to start every 1 s by
# default: on average 0.5 s of every message. 0.2 s saves ~0.4 s per message for ~2.7 %
# of a core while idle (1 s: 0.6 %, 0.1 s: 4.2 %; measured here). The server keeps
# Flower's default: its SuperExec starts one ServerApp per run. An explicit
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL in the environment wins.
SUPEREXEC_POLL_SECONDS = "0.2"
SUPEREXEC_SECRET = "superexec.secret"  # the SuperNode's and its SuperExec's shared secret, in the site directory
STOP_GRACE = 10.0  # seconds the SuperNode gets to exit after SIGTERM, before SIGKILL
PUMP_DRAIN = 15.0  # seconds to wait for the last lines once the SuperNode has exited


def write_node_config(site: SiteDir, name: str, data: Path, test: Path | None, budget: SiteBudget,
                      *, explain_opt_out: bool = False, limits: dict[str, Any] | None = None,
                      schema_sha256: str = "", evaluation: str = "dp") -> Path:
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
    config["evaluation"] = evaluation
    write_atomic(site.node_config_path, tomli_w.dumps(config))
    return site.node_config_path


def run_supernode(site: SiteDir, name: str, *, server: str, node_config: Path, runtime_port: int | None,
                  verbose: bool) -> int:
    """Run Flower's SuperNode for site ``name`` until it exits or is stopped; 0 if stopped.

    Two processes: ``flower-supernode --isolation process`` and, beside it, Candor's
    SuperExec (:mod:`candor.client.superexec_main`), which starts the site's guard
    ``candor-clientapp`` (:mod:`candor.client.clientapp_main`) for every message instead
    of Flower's ``flwr-clientapp``: the site runs only its installed Candor release or an
    app it approved (:mod:`candor.client.approval`). Both share a fresh secret
    (``SITE_DIR/superexec.secret``, 0600), so no other local process can take a task
    from the SuperNode's Runtime API.

    Args:
        server: ``HOST:PORT`` of the SuperLink.
        runtime_port: local port of the SuperNode's Runtime API (``None``: a free one).
        verbose: print every line of the SuperNode's log.

    Raises:
        ConnectionFailed: the server refused the key or the certificate, or the SuperNode
            or its SuperExec exited.
    """
    port = runtime_port or free_port()
    secret = site.dir / SUPEREXEC_SECRET
    write_atomic(secret, secrets.token_bytes(32), mode=0o600)  # new at each start; only these two read it
    supernode = [
        flower_bin("flower-supernode"),
        "--superlink", server,
        "--root-certificates", str(site.ca_cert),
        "--auth-supernode-private-key", str(site.private_key),
        "--node-config", str(node_config),
        "--isolation", "process",  # its SuperExec is ours, started below
        "--superexec-auth-secret-file", str(secret),
        # the SuperNode's local Runtime API for its ClientApp processes: loopback, own port
        "--host", "127.0.0.1", "--port", str(port),
    ]
    superexec = [sys.executable, "-P", "-m", "candor.client.superexec_main", "--insecure",
                 "--runtime-api-address", f"127.0.0.1:{port}", "--superexec-auth-secret-file", str(secret)]
    site.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = flower_env(site.flwr_home, **{SITE_DIR_ENV: str(site.dir), SITE_NAME_ENV: name})
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_SECONDS)
    print(_code_line(site), flush=True)
    return _supervise(supernode, superexec, env, site, name, server=server, verbose=verbose)


def _code_line(site: SiteDir) -> str:
    """What code this site will run, as ``start`` prints it."""
    from candor.common.app_hash import installed_release

    approved = Approvals(site.dir).active()
    return (f"Code: this site runs only its installed Candor release (app sha256 {installed_release().sha256[:16]})"
            + (f" and {len(approved)} app(s) it approved" if approved else "")
            + f"; `candor-client approved {site.dir}` lists them.")


class _Stop(Exception):
    pass


class KeyRefused(ConnectionFailed):
    """The server refused the site's key before the SuperNode connected. Not always
    final: a server that has just started registers its sites' keys only after it
    answers, and after a site's restart Flower counts its previous start connected for up
    to 60 s (``candor-client start`` retries within ``--connect-timeout``)."""


def _supervise(supernode_cmd: list[str], superexec_cmd: list[str], env: dict[str, str], site: SiteDir, name: str,
               *, server: str = "the server", verbose: bool) -> int:
    """Run the SuperNode and its SuperExec in this process group; log everything; turn
    known failures into one line.

    The SuperExec is started with ``--parent-pid`` of the SuperNode (it exits when the
    SuperNode does; its ClientApp processes watch it in turn); if it exits while the
    SuperNode runs (e.g. its self-test refused this Flower version), both stop. Each
    process has its own output pipe, pumped into one log; the loop waits on the
    SuperNode, not on the end of a pipe.

    Once connected, a lost connection is one line (Flower's SuperNode retries by itself,
    with backoff, without limit) and its return another.
    """
    failure: str | None = None
    key_refused = False
    connected = False
    lost_at: float | None = None  # when the connection to the server was lost (monotonic), while it is
    stopping = False
    exec_failure: str | None = None

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []

    def start(tag: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=site.dir,
                                preexec_fn=_die_with_parent)
        procs.append(proc)
        readers.append(threading.Thread(target=_pump, args=(proc.stdout, lines, tag), daemon=True))
        readers[-1].start()
        return proc

    with open(site.log_path, "a") as log:
        log.write(f"\n=== candor-client start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(supernode_cmd)}\n")
        try:
            node = start("supernode", supernode_cmd)
            superexec_cmd = [*superexec_cmd, "--parent-pid", str(node.pid)]
            log.write(f"=== and its SuperExec: {' '.join(superexec_cmd)}\n")
            superexec = start("superexec", superexec_cmd)
            last_exec_line = ""
            while True:
                try:
                    tag, raw = lines.get(timeout=0.2)
                except queue.Empty:
                    if node.poll() is not None:  # reaped: now its SuperExec and ClientApps see it gone and exit
                        for reader in readers:
                            reader.join(timeout=PUMP_DRAIN)
                        if lines.empty():
                            break
                    elif superexec.poll() is not None and exec_failure is None:
                        readers[1].join(timeout=PUMP_DRAIN)  # its last lines say why
                        exec_failure = (f"the site's SuperExec (candor.client.superexec_main) exited with code "
                                        f"{superexec.returncode}: {last_exec_line or 'no output'} (full log: "
                                        f"{site.log_path})")
                        if lines.empty():
                            break
                    elif exec_failure is not None and lines.empty():
                        break
                    continue
                if raw is None:
                    continue
                log.write(timestamped(raw))
                log.flush()
                line = raw.strip()
                if tag == "superexec" and line:
                    last_exec_line = _short(line)
                if "SuperNode ID:" in line and not connected:
                    connected = True
                    print(f"Site '{name}' connected as node {line.rsplit(':', 1)[1].strip()}; waiting for "
                          "training requests (Ctrl-C to stop).", flush=True)
                elif "Failed to activate SuperNode" in line or "code: 2004" in line:
                    key_refused = not connected
                    failure = (f"the server refused this site's key ({site.public_key}): the coordinator has not "
                               f"registered it yet (`candor-server add-site DIR {name} node.pub`) or has removed "
                               "this site; or, if this site was stopped less than a minute ago, the server still "
                               "counts it as connected (Flower's 60 s heartbeat): start it again in a minute")
                elif "CERTIFICATE_VERIFY_FAILED" in line:
                    failure = (f"the server's certificate did not verify against the federation's CA ({site.ca_cert}): "
                               "it expired, or the coordinator changed the CA; run `candor-client start` again for "
                               "the exact reason, and ask the coordinator for a renewed certificate or the new invite")
                elif "Connection attempt failed" in line and connected and lost_at is None:
                    lost_at = time.monotonic()
                    print(f"Lost the connection to {_server(server)} ({time.strftime('%H:%M:%S')}); Flower's "
                          "SuperNode keeps retrying with backoff (at most 20 s between tries) until it answers "
                          "(Ctrl-C to stop).", flush=True)
                elif "Connection successful after" in line and lost_at is not None:
                    print(f"Reconnected to {_server(server)} after {time.monotonic() - lost_at:.0f} s.", flush=True)
                    lost_at = None
                elif "address already in use" in line.lower():
                    failure = ("a local port of this site's SuperNode is already in use (another site or program on "
                               "this machine holds it): pass another --runtime-port, or leave it out to get a free one")
                elif (failure is not None or "Exit Code:" in line) and not verbose:
                    # Flower's own report of a failure ("Exit Code: 305" comes before its explanation): the
                    # failure is explained in one line below, or quoted from the log when it is not a known one
                    continue
                elif ("Receiving:" in line or "refuses" in line or "ERROR" in line
                      or "an app this site approved" in line or verbose):
                    print(_short(line), flush=True)
            node.poll()
        except (KeyboardInterrupt, _Stop):
            stopping = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            for proc in procs:
                _stop_child(proc)
    if stopping:
        print(f"Site '{name}' stopped.")
        return 0
    if failure:
        raise (KeyRefused if key_refused else ConnectionFailed)(failure)
    if exec_failure:
        raise ConnectionFailed(exec_failure)
    # Flower's SuperNode stops itself, exit code 0, on the server's first HTTP 401: a key
    # the server does not (or no longer) accept, or a signed timestamp outside its window
    # (this machine's clock more than 5 s ahead of the server's or 5 min behind it)
    clock = ("this machine's clock differs from the server's by more than Flower's node authentication allows "
             "(5 s ahead, 5 min behind): check it (NTP) and start again")
    if connected and node.returncode == 0:
        raise ConnectionFailed(f"the SuperNode stopped (the coordinator may have removed site '{name}'; or {clock}); "
                               f"its log is {site.log_path}")
    if node.returncode == 0:
        raise ConnectionFailed(f"{_server(server, at=True)} refused this site's signed requests and Flower stopped the "
                               f"SuperNode before it connected: {clock}; or the coordinator removed site '{name}' "
                               f"(its log is {site.log_path})")
    raise ConnectionFailed(f"the SuperNode exited with code {node.returncode}: {last_error_line(site.log_path)} "
                           f"(full log: {site.log_path})")


def _server(address: str, *, at: bool = False) -> str:
    """``the server HOST:PORT`` (``the server at HOST:PORT``), or ``the server`` if unnamed."""
    if address == "the server":
        return address
    return f"the server at {address}" if at else f"the server {address}"


def _pump(stream, lines: queue.Queue, tag: str) -> None:
    for raw in stream:
        lines.put((tag, raw))
    lines.put((tag, None))


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
    """SIGTERM the SuperNode or its SuperExec (ClientApp processes watch the SuperExec's pid), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
