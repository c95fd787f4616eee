"""The run's progress plot: accuracy per round (aggregate and per site) and cumulative ε."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from candor.common.atomic import write_figure_atomic
from candor.common.privacy import MechanismRecord, epsilon


def plot_progress(metrics: dict[str, Any], privacy: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["round"] for r in rounds]
    ax_acc.plot(xs, [r["aggregate"].get("accuracy") for r in rounds], "k-o", lw=2, label="all sites (weighted)")
    sites = sorted({s for r in rounds for s in r["sites"]})
    for site in sites:
        ax_acc.plot(xs, [r["sites"].get(site, {}).get("accuracy") for r in rounds], "--", alpha=0.7, label=site)
    ax_acc.set(xlabel="round", ylabel="held-out accuracy", title="Accuracy per round")
    ax_acc.legend(fontsize=8)
    for site, p in sorted(privacy.get("sites", {}).items()):
        records = [MechanismRecord(**h) for h in p["history"]]
        ys = [epsilon(records[: i + 1], delta=p["delta"], accountant=p["accountant"]) for i in range(len(records))]
        ax_eps.plot([h["round"] for h in p["history"]], ys, "-o", label=f"{site} (δ={p['delta']:g})")
    ax_eps.set(xlabel="round", ylabel="cumulative ε", title="Privacy spent (one record at one site)")
    if privacy.get("target_epsilon"):
        ax_eps.axhline(privacy["target_epsilon"], color="r", ls=":", label="target ε")
    if not privacy.get("sites"):
        ax_eps.text(0.5, 0.5, "DP off: no guarantee", ha="center", transform=ax_eps.transAxes)
    ax_eps.legend(fontsize=8)
    fig.tight_layout()
    write_figure_atomic(fig, path)
