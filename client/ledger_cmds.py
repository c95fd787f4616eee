"""``candor-client ledger SITE_DIR``: what this site has spent, per run and in total.

ε is recomputed from the mechanisms the ledger records (:mod:`client.ledger`), per run
at that run's δ and accountant, and for the site's whole lifetime at one δ.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from candor.common.commands import add_command
from candor.common.privacy import ACCOUNTANTS

from .budget import SiteBudget
from .site_dir import SiteDir

__all__ = ["ledger_report", "register"]

# common.policy's accountants and .ledger import opacus and pandas: they are imported
# inside the command, so that `candor-client --help` stays fast (common.privacy itself
# imports only numpy).


def ledger_report(site: SiteDir, name: str, budget: SiteBudget, *, accountant: str | None = None,
                  delta: float | None = None) -> dict[str, Any]:
    """The ledger's runs and lifetime total, as ``candor-client ledger --json`` prints them.

    The lifetime total is :func:`candor.common.policy.lifetime_spent`, the figure the
    ClientApp checks the budget against. ``accountant`` or ``delta`` ask for the total
    under another accountant or δ as well (``total_requested``); the budget is enforced
    as ``total`` states.
    """
    from candor.common.policy import lifetime_spent
    from candor.common.privacy import KINDS, PRIVACY_UNIT_LONG, Accountant

    from .ledger import Ledger

    entries = Ledger(site.ledger_path, site=name).entries()
    runs: dict[str, list] = {}
    for e in entries:
        runs.setdefault(e.mechanism.run_id, []).append(e)
    history = [e.mechanism for e in entries]
    spent = lifetime_spent(history, [e.delta for e in entries], budget)
    per_run = []
    for run_id, items in runs.items():
        last = items[-1]
        training = [e for e in items if e.mechanism.kind == "training"]
        per_run.append({
            "run_id": run_id, "rounds": len(training), "steps": sum(e.mechanism.steps for e in training),
            "releases": {kind: n for kind in KINDS if (n := sum(e.mechanism.kind == kind for e in items))},
            "delta": last.delta, "first": items[0].time, "last": last.time,
            "epsilon": Accountant(last.accountant, delta=last.delta, history=[e.mechanism for e in items]).epsilon(),
            "accountant": last.accountant,
        })
    doc = {"site": name, "ledger": str(site.ledger_path), "privacy_unit": PRIVACY_UNIT_LONG,
           "runs": per_run, "rounds": sum(e.mechanism.kind == "training" for e in entries),
           "total": {"epsilon": spent.epsilon, "delta": spent.delta, "accountant": spent.accountant},
           "budget": budget.as_dict() or None}
    if (accountant or spent.accountant) != spent.accountant or (delta or spent.delta) != spent.delta:
        asked = Accountant(accountant or spent.accountant, delta=delta or spent.delta, history=history)
        doc["total_requested"] = {"epsilon": asked.epsilon(), "delta": asked.delta, "accountant": asked.name}
    return doc


def cmd_ledger(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = str(site.config()["site"])
    budget = SiteBudget.read(site.budget_path)
    doc = ledger_report(site, name, budget, accountant=args.accountant, delta=args.delta)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    per_run, total = doc["runs"], doc["total"]
    print(f"Site '{name}': privacy ledger {site.ledger_path} ({doc['rounds']} training rounds in {len(per_run)} runs, "
          "with the row counts, evaluations and explanations those runs released)")
    print(f"Privacy unit: {doc['privacy_unit']}. ε recomputed from the recorded mechanisms.")
    if per_run:
        print(f"  {'run':<22} {'rounds':>6} {'steps':>7} {'δ':>9} {'ε (run)':>9}  last round")
        for r in per_run:
            print(f"  {r['run_id'] or '-':<22} {r['rounds']:>6} {r['steps']:>7} {r['delta']:>9.2g} "
                  f"{r['epsilon']:>9.3f}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(r['last']))}")
    print(f"Lifetime total: ε = {total['epsilon']:.3f} at δ = {total['delta']:g} ({total['accountant'].upper()}, "
          "every release of every run composed; the figure the budget is enforced against)")
    if "total_requested" in doc:
        asked = doc["total_requested"]
        print(f"  as asked: ε = {asked['epsilon']:.3f} at δ = {asked['delta']:g} ({asked['accountant'].upper()})")
    if budget.epsilon is not None:
        print(f"Budget: ε ≤ {budget.epsilon:g}: {100 * total['epsilon'] / budget.epsilon:.0f}% spent, "
              f"{max(budget.epsilon - total['epsilon'], 0):.3f} left")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "ledger", cmd_ledger, help="what this site has spent, per run and in total")
    p.add_argument("--delta", type=float,
                   help="also show the lifetime total at this δ (the budget is enforced at the budget's δ, "
                        "else the smallest recorded)")
    p.add_argument("--accountant", choices=ACCOUNTANTS,
                   help="also show the lifetime total under this accountant (the budget is enforced with PRV)")
    p.add_argument("--json", action="store_true")
