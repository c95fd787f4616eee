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

from .budget import SiteBudget
from .site_dir import SiteDir

__all__ = ["ledger_report", "register"]

# common.privacy and .ledger import opacus and pandas: they are imported inside the
# command, so that `candor-client --help` stays fast.
ACCOUNTANTS = ("prv", "rdp")  # = common.privacy.ACCOUNTANTS


def ledger_report(site: SiteDir, name: str, budget: dict[str, float], *, accountant: str,
                  delta: float | None) -> dict[str, Any]:
    """The ledger's runs and lifetime total, as ``candor-client ledger --json`` prints them.

    Args:
        budget: the site's budget file's values (``SiteBudget.as_dict()``).
        accountant: accountant of the lifetime total (``prv`` or ``rdp``).
        delta: δ of the lifetime total; ``None``: the budget's, else the smallest recorded.
    """
    from candor.common.privacy import PRIVACY_UNIT_LONG, epsilon

    from .ledger import Ledger

    ledger = Ledger(site.ledger_path, site=name)
    entries = ledger.entries()
    runs: dict[str, list] = {}
    for e in entries:
        runs.setdefault(e.mechanism.run_id, []).append(e)
    delta = delta or budget.get("delta") or min((e.delta for e in entries), default=1e-5)
    total = epsilon([e.mechanism for e in entries], delta=delta, accountant=accountant)
    per_run = []
    for run_id, items in runs.items():
        run_delta = items[-1].delta
        per_run.append({
            "run_id": run_id, "rounds": len(items), "steps": sum(e.mechanism.steps for e in items),
            "delta": run_delta, "first": items[0].time, "last": items[-1].time,
            "epsilon": epsilon([e.mechanism for e in items], delta=run_delta, accountant=items[-1].accountant),
            "accountant": items[-1].accountant,
        })
    return {"site": name, "ledger": str(site.ledger_path), "privacy_unit": PRIVACY_UNIT_LONG,
            "runs": per_run, "rounds": len(entries),
            "total": {"epsilon": total, "delta": delta, "accountant": accountant},
            "budget": budget or None}


def cmd_ledger(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = str(site.config()["site"])
    budget = SiteBudget.read(site.budget_path).as_dict()
    doc = ledger_report(site, name, budget, accountant=args.accountant, delta=args.delta)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    per_run, total = doc["runs"], doc["total"]
    print(f"Site '{name}': privacy ledger {site.ledger_path} ({doc['rounds']} rounds in {len(per_run)} runs)")
    print(f"Privacy unit: {doc['privacy_unit']}. ε recomputed from the recorded mechanisms.")
    if per_run:
        print(f"  {'run':<22} {'rounds':>6} {'steps':>7} {'δ':>9} {'ε (run)':>9}  last round")
        for r in per_run:
            print(f"  {r['run_id'] or '-':<22} {r['rounds']:>6} {r['steps']:>7} {r['delta']:>9.2g} "
                  f"{r['epsilon']:>9.3f}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(r['last']))}")
    print(f"Lifetime total: ε = {total['epsilon']:.3f} at δ = {total['delta']:g} ({total['accountant'].upper()}, "
          "all rounds of all runs composed)")
    if "epsilon" in budget:
        print(f"Budget: ε ≤ {budget['epsilon']:g}: {100 * total['epsilon'] / budget['epsilon']:.0f}% spent, "
              f"{max(budget['epsilon'] - total['epsilon'], 0):.3f} left")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "ledger", cmd_ledger, help="what this site has spent, per run and in total")
    p.add_argument("--delta", type=float, help="δ for the lifetime total (default: the budget's, else the smallest recorded)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    p.add_argument("--json", action="store_true")
