"""``candor-client start SITE_DIR --data PATH``: join the federation from a data holder.

``start`` validates the data first and refuses to start on any problem; it checks the
key and reaches the server over TLS (:mod:`client.preflight`) before it runs Flower's
SuperNode (:mod:`client.supernode`), so that a wrong CA, an unreadable key or a server
that is down each give one clear line. ``--budget-epsilon/--budget-delta`` set the site's
lifetime budget (:mod:`client.budget`), kept in the site directory across restarts.
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
    node_config = write_node_config(site, name, data, test, budget, explain_opt_out=explain_opt_out)
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
    p.add_argument("--runtime-port", type=int, help="local port of the SuperNode's Runtime API (default: a free one)")
    add_verbose_option(p, help="print every line of the SuperNode's log")
