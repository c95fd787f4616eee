"""``candor-server start | stop | status``: the federation's server (Flower's SuperLink).

``start`` runs the SuperLink with TLS, node authentication and its control plane closed
to all but the coordinator (:mod:`server.superlink`) and makes its registered nodes equal
the registry; ``status`` shows the server, its certificates' lifetimes (with a line for
each one that has expired or expires soon, and the command that renews it), every
site's connection and the runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from candor.common.certificates import day
from candor.common.commands import add_command
from candor.common.errors import CandorError
from candor.common.processes import flwr_json

from . import superlink
from .federation import CONNECTION, Federation
from .pki import lifetime_report, presented_certificate

__all__ = ["certificate_lines", "flwr_hint", "register", "restart_hint"]


def flwr_hint(fed: Federation) -> str:
    """The `flwr` command line that works against this federation's SuperLink."""
    return f"FLWR_HOME={fed.flwr_home} flwr ls {CONNECTION}"


def restart_hint(fed: Federation, state: superlink.Running) -> str:
    """The commands that restart the running server where it listens now."""
    options = (f" --host {state.host}" if state.host != "127.0.0.1" else "") + (
        f" --port {state.port}" if state.port != fed.port else "")
    return f"candor-server stop {fed.dir} && candor-server start {fed.dir}{options}"


def certificate_lines(fed: Federation, state: superlink.Running | None) -> list[str]:
    """``status``'s certificate section: each certificate's lifetime, then one line per
    certificate that has expired or expires soon, and whether the running server still
    presents an older certificate than ``pki/server.crt``."""
    try:
        lifetimes, findings = lifetime_report(fed.pki)
    except CandorError as err:
        return [f"Certificates: cannot read them ({err})"]
    now = dt.datetime.now(dt.timezone.utc)
    lines = [f"Certificates ({fed.pki.dir}):"]
    for life in lifetimes:
        left = life.days_left(now)
        lines.append(f"  {life.role:<7} {life.name:<40} valid {day(life.not_before)} to {day(life.not_after)} "
                     + (f"({left} days left)" if life.not_after > now else "(EXPIRED)"))
    if state is not None:
        host = state.local_address.rpartition(":")[0].strip("[]")
        served = presented_certificate(host, state.port)
        if served is not None and served != fed.pki.server_certificate():
            findings.append(f"NOTE: the running server still presents its previous certificate (valid until "
                            f"{day(served.not_valid_after_utc)}); restart it to use {fed.pki.server_cert}: "
                            f"{restart_hint(fed, state)}")
    return lines + findings


def cmd_start(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    if superlink.running(fed) is None and (created := superlink.ensure_credentials(fed)):
        print(f"Created {' and '.join(created)} in {fed.state_dir} and {fed.flwr_home} (the federation directory "
              "predates the closed control plane, or its credentials.yaml was removed).")
    state = superlink.start(fed, host=args.host, port=args.port)
    print(f"SuperLink running (pid {state.pid}) on https://{args.host}:{state.port}, TLS and node "
          f"authentication on, control API for the coordinator's token only; log {superlink.log_file(fed)}")
    try:
        for change in superlink.reconcile(fed):
            print(f"  {change}")
    except CandorError:
        superlink.stop(fed)
        raise
    print(f"{len(fed.sites)} site(s) allowed to join: {', '.join(sorted(fed.sites)) or 'none yet'}")
    print(f"Flower's CLI works against it: {flwr_hint(fed)}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    if superlink.stop(fed):
        print(f"Stopped the SuperLink of {fed.dir}.")
    else:
        print(f"The SuperLink of {fed.dir} was not running.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    state = superlink.running(fed)
    print(f"Federation '{fed.name}' in {fed.dir}")
    if state is None:
        print("SuperLink: not running (`candor-server start DIR`)")
    else:
        helpers = superlink.superexec_pids(state.pid)
        print(f"SuperLink: running, pid {state.pid}, https://{state.host}:{state.port}, up {superlink.uptime(state)}; "
              + (f"SuperExec pid {', '.join(map(str, helpers))}" if helpers else
                 "SuperExec NOT running (no run can start; `candor-server stop` and `start` again)"))
    for line in certificate_lines(fed, state):
        print(line)
    statuses = superlink.online(fed) if state else {}
    print(f"Sites ({len(fed.sites)} registered):")
    for name, e in sorted(fed.sites.items()):
        print(f"  {name:<24} {statuses.get(name, 'unknown' if not state else 'not registered'):<12} {e.fingerprint}")
    for name in sorted(set(statuses) - set(fed.sites)):
        print(f"  {name:<24} {statuses[name]:<12} (not in the registry)")
    runs = _run_dirs(fed)
    if state:
        try:
            listed = flwr_json(["ls", CONNECTION], env=superlink.env(fed))["runs"]
        except CandorError as err:
            listed = []
            print(f"Runs: cannot list ({err})")
        for r in listed:
            runs.setdefault(str(r["run-id"]), {}).update({"status": r.get("status"), "elapsed": r.get("elapsed")})
    print(f"Runs ({len(runs)}):" if runs else "Runs: none yet")
    for run_id, r in sorted(runs.items(), key=lambda kv: str(kv[1].get("started", ""))):
        print(f"  {run_id:<22} {str(r.get('status', '?')):<22} {str(r.get('elapsed') or ''):<10} {r.get('dir', '')}")
    return 0


def _run_dirs(fed: Federation) -> dict[str, dict[str, Any]]:
    """run id -> status, directory, start and duration, from each ``runs/*/run.json``."""
    out = {}
    for path in sorted(fed.runs_dir.glob("*/run.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[str(doc.get("run_id"))] = {"status": doc.get("status"), "dir": str(path.parent),
                                       "started": doc.get("started"),
                                       "elapsed": f"{doc['seconds']:.0f}s" if doc.get("seconds") else None}
    return out


def register(subparsers) -> None:
    p = add_command(subparsers, "start", cmd_start, help="start the server (Flower SuperLink, TLS + node authentication)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port (default: the federation's, from init)")
    add_command(subparsers, "stop", cmd_stop, help="stop the server")
    add_command(subparsers, "status", cmd_status, help="the server, the connected sites and the runs")
