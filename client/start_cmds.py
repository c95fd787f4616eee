"""``candor-client start SITE_DIR --data PATH``: join the federation from a data holder.

``start`` validates the data first and refuses to start on any problem; it checks the
key and reaches the server over TLS (:mod:`client.preflight`) before it runs Flower's
SuperNode (:mod:`client.supernode`), so that a wrong CA, an unreadable key or a server
that is down each give one clear line. ``--budget-epsilon/--budget-delta`` set the site's
lifetime budget (:mod:`client.budget`), and ``--max-rounds``, ``--max-run-epsilon``,
``--max-grad-norm``, ``--max-batch-size``, ``--allow-non-private`` its limits on any run
(:class:`candor.common.policy.SiteLimits`), both kept in the site directory across
restarts; ``--data-loader`` and ``--allow-model-plugin`` name the only plug-in code the
site runs. A coordinator's run config can change none of these.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from candor.common.commands import add_command, add_verbose_option
from candor.common.errors import SiteError
from candor.common.schema import Schema

from .budget import SiteBudget
from .keys import load_private_key
from .preflight import check_server
from .site_cmds import import_invite
from .site_dir import SiteDir
from .supernode import run_supernode, write_node_config

__all__ = ["register"]


def _budget_lines(site: SiteDir, name: str, budget: SiteBudget) -> list[str]:
    """What ``start`` prints about the site's lifetime budget and what its ledger has
    spent: :func:`candor.common.policy.lifetime_spent`, the rule the ClientApp enforces."""
    if budget.epsilon is None:
        return ["Privacy budget: none set (each run's target applies); set one with --budget-epsilon E."]
    # common.policy and .ledger import opacus and pandas: imported here, not at the top.
    from candor.common.policy import lifetime_spent

    from .ledger import Ledger

    entries = Ledger(site.ledger_path, site=name).entries()
    spent = lifetime_spent([e.mechanism for e in entries], [e.delta for e in entries], budget)
    lines = [f"Privacy budget: lifetime ε ≤ {budget.epsilon:g} at δ = " +
             (f"{budget.delta:g}" if budget.delta else "the smallest δ of this site's runs") +
             f"; spent so far ε = {spent.epsilon:.3f} at δ = {spent.delta:g} ({spent.accountant.upper()}) "
             f"over {spent.rounds} rounds."]
    if spent.epsilon >= budget.epsilon:
        lines.append("The budget is spent: this site will refuse every private training round.")
    return lines


_LIMIT_OPTIONS = ("max_rounds", "max_run_epsilon", "max_grad_norm", "max_batch_size")


def _update_limits(site: SiteDir, config: dict, args: argparse.Namespace) -> dict:
    """The site's limits and plug-ins: site.toml's ``[limits]`` with this start's options
    applied (saved when they change). Returns the ``[limits]`` table."""
    limits = dict(config.get("limits", {}))
    for name in _LIMIT_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            limits[name.replace("_", "-")] = value
    if args.allow_non_private is not None:
        limits["allow-non-private"] = args.allow_non_private
    if args.data_loader is not None:
        limits["data-loader"] = args.data_loader
    if args.allow_model_plugin:
        limits["model-plugins"] = sorted(set(limits.get("model-plugins", [])) | set(args.allow_model_plugin))
    from candor.common.policy import SiteLimits

    SiteLimits(**{name: limits.get(name.replace("_", "-")) for name in _LIMIT_OPTIONS},
               allow_non_private=bool(limits.get("allow-non-private")))  # a bad value: one line, nothing saved
    if limits != config.get("limits", {}):
        config["limits"] = limits
        site.save_config(config)
    return limits


def _limits_line(limits: dict) -> str:
    shown = [f"{k} {limits[k]:g}" for k in ("max-rounds", "max-run-epsilon", "max-grad-norm", "max-batch-size")
             if limits.get(k)]
    private = ("non-private runs allowed (--allow-non-private)" if limits.get("allow-non-private")
               else "private runs only")
    plugins = ", ".join(limits.get("model-plugins", [])) or "none"
    return (f"Run limits (this site's own, in site.toml): {', '.join(shown) or 'no numeric limits'}; {private}; "
            f"data loader {limits.get('data-loader') or 'built-in CSV/Parquet'}; model plug-ins allowed: {plugins}.")


def cmd_start(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    config = site.config()
    name = str(config["site"])
    if args.invite:
        config = import_invite(site, Path(args.invite))
    if not site.joined(config):
        raise SiteError(f"site '{name}' has not joined a federation yet: pass the coordinator's invite once, "
                        f"`candor-client start {site.dir} --invite FILE --data PATH`")
    server = args.server or str(config["server"])
    try:
        stored = SiteBudget.read(site.budget_path)
    except SiteError:
        if args.budget_epsilon is None:
            raise
        stored = SiteBudget()  # the unreadable budget file is replaced by the budget given now
    budget = stored.updated(epsilon=args.budget_epsilon, delta=args.budget_delta)
    if budget != stored:
        budget.write(site.budget_path)
    if args.explain_opt_out is not None and args.explain_opt_out != config.get("explain-opt-out", False):
        config["explain-opt-out"] = args.explain_opt_out
        site.save_config(config)
    explain_opt_out = bool(config.get("explain-opt-out", False))
    limits = _update_limits(site, config, args)

    from candor.common.validation import load_table  # imports pandas: only here

    # 1. The data, against the federation's schema: any problem stops here.
    schema = Schema.load(site.schema_path)
    data = Path(args.data).expanduser().resolve()
    test = Path(args.test).expanduser().resolve() if args.test else None
    rows = len(load_table(data, schema, min_rows=int(config.get("min-rows", 20))))
    if test is not None:
        load_table(test, schema, min_rows=1)
    print(f"Data OK: {data} has {rows} usable rows for schema {schema.sha256()[:12]}.")
    for line in _budget_lines(site, name, budget):
        print(line)

    # 2. The key and the server, before Flower starts.
    load_private_key(site.private_key)
    check_server(server, site.ca_cert)
    print(f"Server {server} reached over TLS; certificate verified against {site.ca_cert}.")

    # 3. Flower's SuperNode.
    print(_limits_line(limits))
    node_config = write_node_config(site, name, data, test, budget, explain_opt_out=explain_opt_out,
                                    limits=limits, schema_sha256=str(config.get("schema-sha256", "")))
    if explain_opt_out:
        print("This site sends no feature importances (explain opt-out, kept in site.toml).")
    return run_supernode(site, name, server=server, node_config=node_config, runtime_port=args.runtime_port,
                         verbose=args.verbose)


def register(subparsers) -> None:
    p = add_command(subparsers, "start", cmd_start,
                    help="validate the data, then join the federation (Flower SuperNode)")
    p.add_argument("--data", required=True, help="this site's CSV or Parquet file")
    p.add_argument("--test", help="optional held-out test file (default: a split of --data)")
    p.add_argument("--invite", help="the coordinator's invite file (needed once)")
    p.add_argument("--server", help="HOST:PORT of the server (default: from the invite)")
    p.add_argument("--budget-epsilon", type=float, metavar="E",
                   help="lifetime ε this site allows over all runs (kept in SITE_DIR/budget.toml)")
    p.add_argument("--budget-delta", type=float, metavar="D",
                   help="δ of the lifetime budget (default: each run's δ)")
    p.add_argument("--explain-opt-out", dest="explain_opt_out", action="store_const", const=True,
                   help="send nothing for the federated explanation of the final model (kept in site.toml)")
    p.add_argument("--explain-opt-in", dest="explain_opt_out", action="store_const", const=False,
                   help="undo --explain-opt-out")
    p.add_argument("--max-rounds", type=int, metavar="N", help="refuse any run of more than N rounds (kept in site.toml)")
    p.add_argument("--max-run-epsilon", type=float, metavar="E",
                   help="the most ε one run may cost this site, training and releases together (kept in site.toml)")
    p.add_argument("--max-grad-norm", type=float, metavar="C", help="refuse any run clipping at a norm above C")
    p.add_argument("--max-batch-size", type=int, metavar="B", help="refuse any run with an expected batch above B")
    p.add_argument("--allow-non-private", dest="allow_non_private", action="store_const", const=True,
                   help="let runs with dp=false train on this site's data (default: private runs only)")
    p.add_argument("--private-only", dest="allow_non_private", action="store_const", const=False,
                   help="undo --allow-non-private")
    p.add_argument("--data-loader", metavar="MODULE:FUNCTION",
                   help="this site's own plug-in data loader (docs/plugins.md); a run config cannot name one")
    p.add_argument("--allow-model-plugin", action="append", default=[], metavar="MODULE:FACTORY",
                   help="a plug-in model this site allows a run to use (repeatable)")
    p.add_argument("--runtime-port", type=int, help="local port of the SuperNode's Runtime API (default: a free one)")
    add_verbose_option(p, help="print every line of the SuperNode's log")
