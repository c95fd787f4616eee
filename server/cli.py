"""``candor-server``: what the coordinator of a federation runs.

    candor-server init DIR --name FEDERATION --host NAME_OR_IP [--host ...] --schema FILE [--port P] [-c k=v ...]
    candor-server add-site DIR SITE_NAME PUBLIC_KEY_FILE
    candor-server remove-site DIR SITE_NAME
    candor-server sites DIR
    candor-server invite DIR SITE_NAME [-o FILE]
    candor-server start DIR [--host H] [--port P]
    candor-server stop DIR
    candor-server run DIR [-c key=value ...] [--wait-sites SECONDS]
    candor-server status DIR

Underneath is Flower's deployment engine (a SuperLink with TLS and SuperNode
authentication); ``FLWR_HOME=DIR/flwr flwr ls candor`` and ``flwr log`` keep working.
A user's mistake (a :class:`~common.errors.CandorError`) prints one clear message and
exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.atomic import write_atomic, write_json_atomic
from candor.common.errors import CandorError, run_command
from candor.common.processes import APP_DIR, flower_bin, flwr_json, run_status, stop_group, wait_until

from . import superlink
from .federation import CONNECTION, DEFAULT_PORT, Federation
from .pki import certificate_hosts

INVITE_VERSION = 1
PROGRESS = "[candor]"  # = server.outputs.PROGRESS, the prefix of the ServerApp's progress lines


def _run_config(values: dict[str, Any]):
    """The validated RunConfig for hyphenated ``values`` over the defaults."""
    from candor.common.config import RunConfig  # imports torch/opacus: only in the commands that need it

    return RunConfig.from_run_config({**RunConfig().to_run_config(), **values})


def _overrides(items: list[str]) -> dict[str, Any]:
    from candor.common.config import parse_override

    out = dict(parse_override(t) for t in items)
    _run_config(out)  # names the bad key or value
    return out


def _hint(fed: Federation) -> str:
    return f"FLWR_HOME={fed.flwr_home} flwr ls {CONNECTION}"


# --- init / sites / invite ------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    fed = Federation.create(Path(args.dir), name=args.name, hosts=args.host or ["127.0.0.1"], port=args.port,
                            schema=Path(args.schema), run_config=_overrides(args.config))
    print(f"Created federation '{fed.name}' in {fed.dir}")
    print(f"  CA certificate   {fed.pki.ca_cert}  (sites get it in their invite)")
    print(f"  server cert      valid for {', '.join(certificate_hosts(fed.pki.server_cert))}; sites dial {fed.address}")
    print(f"  schema           {fed.schema_path} (sha256 {fed.schema().sha256()[:12]})")
    print(f"  run config       {fed.run_config_path}")
    print("Next: for each institution, `candor-server add-site DIR NAME node.pub` with the public key it sends you,\n"
          f"then `candor-server invite DIR NAME` and `candor-server start {fed.dir}`.")
    return 0


def cmd_add_site(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    entry = fed.add_site(args.site, Path(args.public_key))
    print(f"Added site '{entry.name}' (key {entry.fingerprint}).")
    if superlink.running(fed):
        node_id = superlink.register(fed, entry.name)
        print(f"Registered with the running server as node {node_id}: the site can connect now.")
    else:
        print("The server is not running; the site is registered with it at the next `candor-server start`.")
    print(f"Send the site its invite: `candor-server invite {fed.dir} {entry.name}`.")
    return 0


def cmd_remove_site(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    entry = fed.remove_site(args.site)
    if superlink.running(fed) and entry.node_id is not None:
        superlink.unregister(fed, entry.node_id)
        print(f"Removed site '{entry.name}': its node {entry.node_id} is unregistered and disconnected now.")
    else:
        print(f"Removed site '{entry.name}' from the registry; the server drops it at the next start.")
    print("Its key can never join again; the site keeps its ledger and may rejoin only with a new key.")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    if not fed.sites:
        print(f"No sites registered in {fed.dir}. Add one with `candor-server add-site DIR NAME node.pub`.")
        return 0
    print(f"{'site':<24} {'node id':<22} {'added':<26} key")
    for name, e in sorted(fed.sites.items()):
        print(f"{name:<24} {str(e.node_id or '-'):<22} {e.added:<26} {e.fingerprint}")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    if args.site not in fed.sites:
        raise CandorError(f"site '{args.site}' is not registered; add it first: "
                          f"`candor-server add-site {fed.dir} {args.site} node.pub`")
    schema = fed.schema()
    cfg = _run_config(fed.run_config_defaults())
    doc = {"candor-invite": {
        "version": INVITE_VERSION,
        "federation": fed.name,
        "site": args.site,
        "server": args.server or fed.address,
        "min-rows": cfg.min_rows,
        "schema-sha256": schema.sha256(),
        "ca-certificate": fed.pki.ca_cert.read_text(),
        "schema": tomli_w.dumps(schema.to_dict()),
    }}
    out = Path(args.output) if args.output else fed.dir / "invites" / f"{args.site}.toml"
    write_atomic(out, "# Candor invite: give this file to the site. It holds nothing secret.\n" + tomli_w.dumps(doc))
    print(f"Wrote {out}\n  server {doc['candor-invite']['server']}, schema sha256 {schema.sha256()[:12]}, "
          "CA certificate (public). Nothing secret: send it by any channel,\n  and confirm the schema "
          "fingerprint with the site by another one.")
    print(f"The site runs: candor-client start SITE_DIR --invite {out.name} --data ITS_DATA.csv")
    return 0


# --- start / stop / status ------------------------------------------------------------

def cmd_start(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    state = superlink.start(fed, host=args.host, port=args.port)
    print(f"SuperLink running (pid {state.pid}) on https://{args.host}:{state.port}, TLS and node "
          f"authentication on; log {superlink.log_file(fed)}")
    try:
        for change in superlink.reconcile(fed):
            print(f"  {change}")
    except CandorError:
        superlink.stop(fed)
        raise
    print(f"{len(fed.sites)} site(s) allowed to join: {', '.join(sorted(fed.sites)) or 'none yet'}")
    print(f"Flower's CLI works against it: {_hint(fed)}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    if superlink.stop(fed):
        print(f"Stopped the SuperLink of {fed.dir}.")
    else:
        print(f"The SuperLink of {fed.dir} was not running.")
    return 0


def _online(fed: Federation) -> dict[str, str]:
    """site name (or node id) -> status, from the SuperLink."""
    out = {}
    for node in superlink.nodes(fed):
        if node["status"] in superlink.ACTIVE:
            nid = int(node["node-id"])
            out[fed.site_by_node(nid) or f"node {nid}"] = node["status"]
    return out


def cmd_status(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    state = superlink.running(fed)
    print(f"Federation '{fed.name}' in {fed.dir}")
    if state is None:
        print("SuperLink: not running (`candor-server start DIR`)")
    else:
        print(f"SuperLink: running, pid {state.pid}, https://{state.host}:{state.port}, up {superlink.uptime(state)}")
    statuses = _online(fed) if state else {}
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


# --- run --------------------------------------------------------------------------------

def _wait_for_sites(fed: Federation, needed: int, timeout: float) -> None:
    last: list[str] = []

    def enough() -> bool:
        nonlocal last
        online = sorted(n for n, s in _online(fed).items() if s == "online")
        if online != last:
            print(f"{len(online)}/{needed} sites connected: {', '.join(online) or 'none yet'}", flush=True)
            last = online
        return len(online) >= needed

    try:
        wait_until(enough, timeout=timeout, what=f"{needed} sites to connect", interval=1.0)
    except CandorError:
        missing = sorted(set(fed.sites) - set(last))
        raise CandorError(f"only {len(last)} of the {needed} sites needed are connected after {timeout:.0f} s "
                          f"(not connected: {', '.join(missing) or '-'}); ask them to run `candor-client start`, "
                          "or lower the requirement with -c min-sites=N") from None


def cmd_run(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    state = superlink.running(fed)
    if state is None:
        raise CandorError(f"the SuperLink of {fed.dir} is not running; start it with `candor-server start {fed.dir}`")
    overrides = {**fed.run_config_defaults(), **_overrides(args.config)}
    if "min-sites" not in overrides:
        overrides["min-sites"] = max(len(fed.sites), 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = fed.runs_dir / stamp
    n = 1
    while out.exists():
        n += 1
        out = fed.runs_dir / f"{stamp}-{n}"
    overrides.update({"schema": str(fed.schema_path), "out-dir": str(out)})
    cfg = _run_config(overrides)
    if cfg.min_sites > len(fed.sites):
        raise CandorError(f"the run needs {cfg.min_sites} sites (min-sites) but only {len(fed.sites)} are "
                          "registered; add sites or lower -c min-sites")
    _wait_for_sites(fed, cfg.min_sites, args.wait_sites)
    out.mkdir(parents=True)
    config_file = out / "run_config.toml"
    write_atomic(config_file, tomli_w.dumps(overrides))
    print(f"Submitting a run of {cfg.num_server_rounds} rounds to {len(fed.sites)} registered sites "
          f"(at least {cfg.min_sites} per round); outputs in {out}", flush=True)
    started = time.time()
    run_id = _submit_and_stream(fed, config_file, out / "flower.log", verbose=args.verbose)
    if run_id is None:
        raise CandorError(f"the run was not submitted; see {out / 'flower.log'}")
    status = _final_status(fed, run_id)
    seconds = time.time() - started
    write_json_atomic(out / "run.json", {"run_id": str(run_id), "status": status, "started": started,
                                          "seconds": seconds, "federation": fed.name})
    _summary(out, run_id, status, seconds, fed)
    if status != "finished:completed":
        raise CandorError(f"run {run_id} ended as '{status}'; the server's log is in {out / 'flower.log'} "
                          f"(also: FLWR_HOME={fed.flwr_home} flwr log {run_id} {CONNECTION})")
    return 0


def _submit_and_stream(fed: Federation, config_file: Path, log_path: Path, *, verbose: bool) -> int | None:
    """`flwr run --stream`: log every line, show progress lines; returns the run id."""
    cmd = [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(config_file)]
    run_id = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=superlink.env(fed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {line}")
                log.flush()
                line = line.rstrip("\n")
                if run_id is None and (m := re.search(r"Successfully started run (\d+)", line)):
                    run_id = int(m.group(1))
                    print(f"Run {run_id} started; follow it with Flower too: "
                          f"FLWR_HOME={fed.flwr_home} flwr log {run_id} {CONNECTION}", flush=True)
                elif PROGRESS in line:
                    print(line[line.index(PROGRESS) + len(PROGRESS):].strip(), flush=True)
                elif verbose or "ERROR" in line or "Traceback" in line:
                    print(line, flush=True)
            proc.wait()
        except KeyboardInterrupt:
            if run_id is not None:
                print(f"\nStopping run {run_id}...", file=sys.stderr)
                subprocess.run([flower_bin("flwr"), "stop", str(run_id), CONNECTION], env=superlink.env(fed),
                               capture_output=True, timeout=60)
            raise
        finally:
            stop_group(proc)
    return run_id


def _final_status(fed: Federation, run_id: int, timeout: float = 120.0) -> str:
    """The run's status once Flower reports it finished (`flwr run` exits 0 on failure)."""
    status = "unknown"

    def finished() -> bool:
        nonlocal status
        _, status = run_status(CONNECTION, env=superlink.env(fed), run_id=run_id)
        return status.startswith("finished")

    try:
        wait_until(finished, timeout=timeout, what=f"run {run_id} to finish", interval=0.5)
    except CandorError:
        pass
    return status


def _summary(out: Path, run_id: int, status: str, seconds: float, fed: Federation) -> None:
    print(f"\nRun {run_id}: {status} in {seconds:.1f} s.")
    try:
        metrics = json.loads((out / "metrics.json").read_text())
        privacy = json.loads((out / "privacy.json").read_text())
    except (OSError, ValueError):
        return
    if metrics["rounds"]:
        last = metrics["rounds"][-1]
        print("Final held-out metrics (example-weighted over sites): " +
              ", ".join(f"{k} {v:.3f}" for k, v in last["aggregate"].items() if isinstance(v, (int, float))))
    for site, p in sorted(privacy.get("sites", {}).items()):
        print(f"  {site:<20} ε = {p['epsilon']:.3f} for this run (δ = {p['delta']:g}, {p['accountant'].upper()}, "
              f"{len(p['history'])} rounds)")
    print(f"Outputs: {out}")


# --- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candor-server", description="Operate a Candor federation's server.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a federation directory (CA, server certificate, schema, registry)")
    p.add_argument("dir")
    p.add_argument("--name", required=True, help="the federation's name")
    p.add_argument("--host", action="append", metavar="NAME_OR_IP",
                   help="a host name or IP address sites use to reach the server (repeatable; "
                        "127.0.0.1 is always included; the first is written into invites)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the server's port (default {DEFAULT_PORT})")
    p.add_argument("--schema", required=True, help="the federation's schema file (.toml/.json)")
    p.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config default for this federation (repeatable)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add-site", help="allow an institution to join, by its public key")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("public_key", help="the site's node.pub (from `candor-client init`)")
    p.set_defaults(func=cmd_add_site)

    p = sub.add_parser("remove-site", help="revoke a site (disconnects it if the server runs)")
    p.add_argument("dir")
    p.add_argument("site")
    p.set_defaults(func=cmd_remove_site)

    p = sub.add_parser("sites", help="list the registered sites")
    p.add_argument("dir")
    p.set_defaults(func=cmd_sites)

    p = sub.add_parser("invite", help="write the file to hand a site (CA certificate, address, schema)")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("-o", "--output", help="where to write it (default DIR/invites/SITE.toml)")
    p.add_argument("--server", help="HOST:PORT the site should dial (default: the first --host of init)")
    p.set_defaults(func=cmd_invite)

    p = sub.add_parser("start", help="start the server (Flower SuperLink, TLS + node authentication)")
    p.add_argument("dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port (default: the federation's, from init)")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop the server")
    p.add_argument("dir")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("run", help="submit a training run and follow it to the end")
    p.add_argument("dir")
    p.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for this run (repeatable)")
    p.add_argument("--wait-sites", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for min-sites sites to connect before giving up (default 300)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every line of Flower's log")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="the server, the connected sites and the runs")
    p.add_argument("dir")
    p.set_defaults(func=cmd_status)

    from . import trust_cmds  # `audit verify` and `publish` (server/audit.py, server/export.py)

    trust_cmds.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command("candor-server", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
