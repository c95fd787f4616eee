"""``candor-sim``: a researcher's local simulations.

    candor-sim                          # = candor-sim run, the embedded default
    candor-sim run [--schema FILE] [--site NAME=PATH ...] [--out DIR] [-c KEY=VALUE ...]
    candor-sim run --resume RUN_DIR     # continue an interrupted run from its checkpoint
    candor-sim pooled [...same data options...]   # centralized baseline, same pipeline
    candor-sim schema infer DATA --label COLUMN -o FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from candor.common.commands import add_config_option, add_verbose_option
from candor.common.config import RunConfig, merge_overrides, stall_limit
from candor.common.errors import CandorError, ConfigError, run_command
from candor.common.progress import ProgressPrinter, site_privacy_line


def _prepare(args: argparse.Namespace, out: Path):
    """(schema path, sites) for the command's data options."""
    from candor.common.schema import Schema

    from candor.common.demo import DEMO_SCHEMA_PATH
    from .sites import check_sites, parse_site_arg, write_embedded_sites

    if args.site:
        if not args.schema:
            raise ConfigError("--site needs --schema: the schema every site is validated against "
                              "(draft one with `candor-sim schema infer DATA --label COLUMN -o FILE`)")
        schema_path = Path(args.schema).resolve()
        sites = [parse_site_arg(s) for s in args.site]
    else:
        schema_path = Path(args.schema).resolve() if args.schema else DEMO_SCHEMA_PATH
        sites = write_embedded_sites(out, num_sites=args.num_sites, scheme=args.partition, alpha=args.alpha,
                                     seed=args.partition_seed)
    schema = Schema.load(schema_path)
    return schema_path, schema, sites, check_sites


def _check_satisfiable(cfg: RunConfig, num_sites: int) -> None:
    """Refuse, before anything starts, a run that could never get a round going (Flower
    would wait for sites that do not exist)."""
    if cfg.min_sites > num_sites:
        raise ConfigError(f"min-sites = {cfg.min_sites} is more than the {num_sites} simulated sites: no round could "
                          f"start. Lower -c min-sites (at most {num_sites}) or add sites")
    if cfg.secure_aggregation and num_sites < 3:
        raise ConfigError(f"secure-aggregation=true needs at least 3 sites (SecAgg+ reconstructs each mask from "
                          f"the other sites' shares); this simulation has {num_sites}. Add sites, or "
                          "-c secure-aggregation=false")


def _resume_overrides(args: argparse.Namespace) -> tuple[Path, dict, int]:
    """(run directory, run config, number of sites) of the interrupted run ``args.resume``."""
    from candor.server.checkpoint import Checkpoint

    out = Path(args.resume).resolve()
    given = [opt for opt, value in (("--site", args.site), ("--schema", args.schema), ("--out", args.out),
                                    ("-c", args.config)) if value]
    if given:
        raise ConfigError(f"--resume continues the run in {out} with the data and run config it started with; "
                          f"leave out {', '.join(given)}")
    checkpoint = Checkpoint.load(out)  # refuses, with the reason, a run that cannot resume
    overrides = {**checkpoint.run_config, "resume": True}
    manifest = json.loads(Path(overrides["sim-manifest"]).read_text())
    print(f"Resuming run {checkpoint.run_id} in {out}: round {checkpoint.round} of "
          f"{overrides['num-server-rounds']} completed; every site's ledger keeps what it already paid for")
    return out, overrides, len(manifest["sites"])


def cmd_run(args: argparse.Namespace) -> int:
    from . import engine

    if args.resume:
        out, overrides, num_sites = _resume_overrides(args)
    else:
        out, overrides, num_sites = _new_run(args)
    print("Starting Flower's simulation engine (about 10-20 s before round 1)...", flush=True)
    app_dir = Path(args.app_dir).resolve() if args.app_dir else engine.APP_DIR
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"--app-dir {app_dir}: not a Flower App directory (no pyproject.toml); give a directory "
                          "whose pyproject.toml has [tool.flwr.app], or leave --app-dir out for Candor's own app")
    try:
        from candor.server.checkpoint import resume_log

        log = resume_log(out) if args.resume else out / "flower.log"  # the interrupted attempt's log is kept
        result = engine.run(overrides, num_sites=num_sites, log_path=log, app_dir=app_dir,
                            on_line=ProgressPrinter(verbose=args.verbose),
                            stall_timeout=stall_limit(RunConfig.from_run_config(overrides)))
    except CandorError:
        if (out / "checkpoint.pt").is_file():
            print(f"The run can continue from its last complete round: candor-sim run --resume {out}",
                  file=sys.stderr)
        raise
    _summary(out, result.seconds)
    return 0


def _new_run(args: argparse.Namespace) -> tuple[Path, dict, int]:
    from .sites import write_manifest

    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    schema_path, schema, sites, check_sites = _prepare(args, out)
    # min-sites defaults to every simulated site; -c min-sites=N lowers it.
    overrides = merge_overrides(args.config, base={"min-sites": len(sites)}, schema=str(schema_path),
                                out_dir=str(out))
    cfg = RunConfig.from_run_config(overrides)
    _check_satisfiable(cfg, len(sites))
    check_sites(sites, schema, min_rows=cfg.min_rows)
    overrides["sim-manifest"] = str(write_manifest(sites, out, evaluation=args.evaluation))
    print(f"Candor simulation: {len(sites)} sites ({', '.join(s.name for s in sites)}), "
          f"{cfg.num_server_rounds} rounds, " + (
              f"DP on, target ε = {cfg.target_epsilon} per site for the whole run" if cfg.dp and cfg.target_epsilon
              else f"DP on, noise multiplier {cfg.noise_multiplier}" if cfg.dp else "DP OFF (non-private baseline)"))
    return out, overrides, len(sites)


def _summary(out: Path, seconds: float) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    privacy = json.loads((out / "privacy.json").read_text())
    last = metrics["rounds"][-1] if metrics["rounds"] else None
    print(f"\nFinished in {seconds:.1f} s.")
    if last:
        a = last["aggregate"]
        print("Final held-out metrics (example-weighted over sites): " +
              ", ".join(f"{k} {v:.3f}" for k, v in a.items() if isinstance(v, (int, float))))
    if privacy["sites"]:
        print(f"Privacy spent per site (privacy unit: {privacy['privacy_unit']}):")
        for site, p in sorted(privacy["sites"].items()):
            print(site_privacy_line(site, p))
    else:
        print("DP was off: the model carries no privacy guarantee.")
    print(f"Outputs: {out}  (metrics.json, metrics.csv, privacy.json, model.pt, progress.png, flower.log)")


def cmd_pooled(args: argparse.Namespace) -> int:
    from .baselines import pooled

    out = Path(args.out or Path("runs") / (time.strftime("%Y%m%d-%H%M%S") + "-pooled")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    schema_path, schema, sites, check_sites = _prepare(args, out)
    cfg = RunConfig.from_run_config(merge_overrides(args.config, schema=str(schema_path), out_dir=str(out)))
    check_sites(sites, schema, min_rows=cfg.min_rows)
    result = pooled(schema, sites, cfg)
    from candor.common.atomic import write_json_atomic

    write_json_atomic(out / "pooled.json", result)
    print(f"Pooled (centralized) baseline, {'DP' if cfg.dp else 'non-private'}: " +
          ", ".join(f"{s} acc {m['accuracy']:.3f}" for s, m in result["sites"].items()) +
          f"; mean per-site accuracy {result['mean_site_accuracy']:.3f}")
    print(f"Outputs: {out / 'pooled.json'}")
    return 0


def cmd_schema_infer(args: argparse.Namespace) -> int:
    from candor.common.validation import read_table

    from .schema_infer import INFER_WARNING, infer_schema

    frame = read_table(args.data)
    schema = infer_schema(frame, label=args.label, source=str(args.data))
    schema.save(args.output)
    print(f"Wrote a draft schema to {args.output}: {len(schema.features)} features, label "
          f"'{schema.label.name}' ({schema.label.task}).")
    print(f"WARNING: {INFER_WARNING}", file=sys.stderr)
    return 0


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schema", help="the federation's schema file (TOML or JSON; see docs/schema.md)")
    p.add_argument("--site", action="append", default=[], metavar="NAME=PATH[,TEST]",
                   help="a simulated site and its CSV/Parquet file (repeat per site); default: the "
                        "embedded breast-cancer data split across simulated hospitals")
    p.add_argument("--num-sites", type=int, default=4, help="embedded data: number of hospitals (default 4)")
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid",
                   help="embedded data: iid split or Dirichlet label skew (default iid)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--partition-seed", type=int, default=0, help="seed of the embedded split (default 0)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    add_config_option(p, help="override a run-config key, as `flwr run -c` (e.g. -c num-server-rounds=5 -c dp=false)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candor-sim", description="Local federated simulations with DP-SGD.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="simulate a federated run (the default command)")
    _data_options(run)
    add_verbose_option(run, help="show Flower's whole log")
    run.add_argument("--evaluation", choices=("dp", "local", "clear"), default="dp",
                     help="what each simulated site releases of its evaluation: dp (private, the default, as a "
                          "deployed site), local (nothing) or clear (exact metrics, listed as unprotected)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the interrupted run in RUN_DIR from its last complete round (same data and "
                          "run config; sites charge the rounds they already trained once)")
    run.add_argument("--app-dir", help="a Flower App directory to simulate instead of Candor's own (e.g. one whose "
                                       "ClientApp wraps Candor's with mods of your own); same run config keys")
    run.set_defaults(func=cmd_run)
    pooled = sub.add_parser("pooled", help="centralized baseline: pool every site's training rows")
    _data_options(pooled)
    pooled.set_defaults(func=cmd_pooled)
    schema = sub.add_parser("schema", help="schema tools").add_subparsers(dest="schema_command", required=True)
    infer = schema.add_parser("infer", help="draft a schema from a data file")
    infer.add_argument("data", type=Path)
    infer.add_argument("--label", required=True, help="the label column")
    infer.add_argument("-o", "--output", type=Path, required=True, help="schema file to write (.toml)")
    infer.set_defaults(func=cmd_schema_infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "pooled", "schema", "-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    return run_command("candor-sim", args, stopped="stopped; every process it started was stopped and its "
                                                    "temporary files removed.")


if __name__ == "__main__":
    sys.exit(main())
