"""``candor-server run DIR [-c KEY=VALUE ...] [--resume [RUN_DIR]]``: submit a training run
and follow it to the end, or continue an interrupted one from its checkpoint.

The run's configuration is the federation's run-config defaults with the ``-c``
overrides on top (``common.config.merge_overrides``); ``min-sites`` defaults to every
registered site. The command waits for that many sites to connect, submits the app
with ``flwr run --stream`` (``common.processes.stream_flwr_run``), shows the ServerApp's
progress lines, and checks the run's final status: ``flwr run`` exits 0 even when the
ServerApp failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

from candor.common.atomic import write_atomic, write_json_atomic
from candor.common.commands import add_command, add_config_option, add_verbose_option
from candor.common.config import RunConfig, merge_overrides, stall_limit
from candor.common.errors import ConfigError, FederationError, Terminated
from candor.common.processes import APP_DIR, ProcessTimeout, RunStalled, flower_bin, run_status, stream_flwr_run, wait_until
from candor.common.progress import ProgressPrinter, site_privacy_line

from . import superlink
from .checkpoint import CHECKPOINT, resume_log
from .federation import CONNECTION, Federation

__all__ = ["register"]

FINISH_TIMEOUT = 120.0  # seconds to wait for Flower to report the run finished after `flwr run` returned
STOP_TIMEOUT = 60.0  # seconds `flwr stop` may take on Ctrl-C


def _wait_for_sites(fed: Federation, needed: int, timeout: float) -> None:
    """Wait until ``needed`` sites are online, printing each change; ``timeout`` in seconds."""
    last: list[str] = []

    def enough() -> bool:
        nonlocal last
        online = sorted(n for n, s in superlink.online(fed).items() if s == "online")
        if online != last:
            print(f"{len(online)}/{needed} sites connected: {', '.join(online) or 'none yet'}", flush=True)
            last = online
        return len(online) >= needed

    try:
        wait_until(enough, timeout=timeout, what=f"{needed} sites to connect", interval=1.0)
    except ProcessTimeout:
        missing = sorted(set(fed.sites) - set(last))
        raise FederationError(f"only {len(last)} of the {needed} sites needed are connected after {timeout:.0f} s "
                              f"(not connected: {', '.join(missing) or '-'}); ask them to run `candor-client start`, "
                              "or lower the requirement with -c min-sites=N") from None


def _new_run_dir(fed: Federation) -> Path:
    """``runs/<stamp>``, or ``runs/<stamp>-N`` if that exists already (not created yet)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = fed.runs_dir / stamp
    n = 1
    while out.exists():
        n += 1
        out = fed.runs_dir / f"{stamp}-{n}"
    return out


def _resume_dir(fed: Federation, given: str | None) -> Path:
    """The run directory to resume: ``given``, or the newest run of ``fed`` with a checkpoint."""
    if given:
        out = Path(given).resolve()
        if not (out / CHECKPOINT).is_file():
            raise ConfigError(f"{out}: no {CHECKPOINT}, so there is nothing to resume (the run finished, or stopped "
                              "before its first round completed)")
        return out
    found = sorted((p.parent for p in fed.runs_dir.glob(f"*/{CHECKPOINT}")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"no run in {fed.runs_dir} has a checkpoint to resume from (finished runs have none)")
    return found[-1]


def cmd_run(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    state = superlink.running(fed)
    if state is None:
        raise FederationError(f"the SuperLink of {fed.dir} is not running; start it with `candor-server start {fed.dir}`")
    if args.resume is not None:
        if args.config:
            raise ConfigError("--resume continues a run with the run config it started with; leave out -c")
        out = _resume_dir(fed, args.resume or None)
        config_file = out / "run_config.toml"
        overrides = {**tomllib.loads(config_file.read_text()), "resume": True}
    else:
        out = _new_run_dir(fed)
        overrides = merge_overrides(args.config, base={"min-sites": max(len(fed.sites), 1), **fed.run_config_defaults()},
                                    schema=str(fed.schema_path), out_dir=str(out))
    cfg = RunConfig.from_run_config(overrides)
    if cfg.min_sites > len(fed.sites):
        raise ConfigError(f"the run needs {cfg.min_sites} sites (min-sites) but only {len(fed.sites)} are "
                          "registered; add sites or lower -c min-sites")
    if cfg.secure_aggregation and len(fed.sites) < 3:
        raise ConfigError(f"secure-aggregation=true needs at least 3 sites (SecAgg+ reconstructs each mask from the "
                          f"other sites' shares); {len(fed.sites)} are registered. Add sites, or "
                          "-c secure-aggregation=false")
    _wait_for_sites(fed, cfg.min_sites, args.wait_sites)
    if cfg.resume:
        config_file = out / "run_config.resume.toml"
        write_atomic(config_file, tomli_w.dumps(overrides))
        print(f"Resuming the run in {out} ({cfg.num_server_rounds} rounds in all; it continues after its last "
              "complete round)", flush=True)
    else:
        out.mkdir(parents=True)
        config_file = out / "run_config.toml"
        write_atomic(config_file, tomli_w.dumps(overrides))
        print(f"Submitting a run of {cfg.num_server_rounds} rounds to {len(fed.sites)} registered sites "
              f"(at least {cfg.min_sites} per round); outputs in {out}", flush=True)
    started = time.time()
    log = resume_log(out) if cfg.resume else out / "flower.log"
    run_id = _submit_and_stream(fed, config_file, log, verbose=args.verbose,
                                stall_timeout=stall_limit(cfg))
    if run_id is None:
        raise FederationError(f"the run was not submitted; see {log}")
    status = _final_status(fed, run_id)
    seconds = time.time() - started
    earlier = json.loads((out / "run.json").read_text()).get("flower_run_ids", []) if (out / "run.json").is_file() else []
    write_json_atomic(out / "run.json", {"run_id": str(run_id), "status": status, "started": started,
                                          "seconds": seconds, "federation": fed.name,
                                          "flower_run_ids": [*earlier, str(run_id)]})
    _summary(out, run_id, status, seconds)
    if status != "finished:completed":
        resume = (f"; once the cause is fixed, continue it with `candor-server run {fed.dir} --resume {out}`"
                  if (out / CHECKPOINT).is_file() else "")
        raise FederationError(f"run {run_id} ended as '{status}'; the server's log is in {log} "
                              f"(also: FLWR_HOME={fed.flwr_home} flwr log {run_id} {CONNECTION}){resume}")
    return 0


def _submit_and_stream(fed: Federation, config_file: Path, log_path: Path, *, verbose: bool,
                       stall_timeout: float) -> int | None:
    """`flwr run --stream`: log every line with its time, show progress lines; returns the run id.
    On Ctrl-C or SIGTERM the run is stopped on the SuperLink too."""
    cmd = [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(config_file)]
    run_id: int | None = None

    def started(found: int) -> None:
        nonlocal run_id
        run_id = found
        print(f"Run {run_id} started; follow it with Flower too: "
              f"FLWR_HOME={fed.flwr_home} flwr log {run_id} {CONNECTION}", flush=True)

    try:
        return stream_flwr_run(cmd, env=superlink.env(fed), log_path=log_path, timestamps=True, on_start=started,
                               on_line=ProgressPrinter(verbose=verbose), stall_timeout=stall_timeout)
    except (KeyboardInterrupt, Terminated, RunStalled):  # Ctrl-C, SIGTERM, the watchdog: the run is stopped too
        if run_id is not None:
            print(f"\nStopping run {run_id}...", file=sys.stderr)
            subprocess.run([flower_bin("flwr"), "stop", str(run_id), CONNECTION], env=superlink.env(fed),
                           capture_output=True, timeout=STOP_TIMEOUT)
        raise


def _final_status(fed: Federation, run_id: int, timeout: float = FINISH_TIMEOUT) -> str:
    """The run's status once Flower reports it finished (`flwr run` exits 0 on failure)."""
    status = "unknown"

    def finished() -> bool:
        nonlocal status
        _, status = run_status(CONNECTION, env=superlink.env(fed), run_id=run_id)
        return status.startswith("finished")

    try:
        wait_until(finished, timeout=timeout, what=f"run {run_id} to finish", interval=0.5)
    except ProcessTimeout:
        pass
    return status


def _summary(out: Path, run_id: int, status: str, seconds: float) -> None:
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
        print(site_privacy_line(site, p))
    print(f"Outputs: {out}")


def register(subparsers) -> None:
    p = add_command(subparsers, "run", cmd_run, help="submit a training run and follow it to the end")
    add_config_option(p, help="run-config override for this run (repeatable)")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint (default: the newest run that has one); "
                        "sites charge the rounds they already trained once")
    p.add_argument("--wait-sites", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for min-sites sites to connect before giving up (default 300)")
    add_verbose_option(p, help="show every line of Flower's log")
