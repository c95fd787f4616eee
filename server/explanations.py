"""The federated explanation of the final model: ask every site, aggregate, record.

After training, :func:`explain_federated` sends the final global model to every
connected site as a ``query.explain`` message (handled by ``client/explain_app.py``).
Each site replies with its mean |contribution| per original feature over its held-out
rows (a DP release in private runs; see :mod:`common.explain`), or with no statistic
if it opted out. The coordinator

* aggregates: global importance = row-weighted mean of the site means,
  ``Σ_k n_k m_k / Σ_k n_k`` (post-processing of the releases);
* writes ``explanations.json`` and ``importance.png`` (global importance, and each
  site's importance side by side) into the run directory;
* adds each site's release to its privacy record
  (:meth:`~server.outputs.RunRecorder.record_release`), so the ε in privacy.json is
  training plus explanation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from candor.common.atomic import write_figure_atomic, write_json_atomic
from candor.common.config import RunConfig
from candor.common.errors import CandorError
from candor.common.names import RUN_ID_KEY
from candor.common.privacy import MechanismRecord, epsilon
from candor.common.progress import PROGRESS

from .outputs import RunRecorder

__all__ = ["aggregate", "card_section", "explain_federated", "plot_importance"]

logger = logging.getLogger(__name__)

METHOD = ("Integrated Gradients (Captum), of the predicted probability of the positive class "
          "(multiclass: of the predicted class), against the schema's reference record (numeric "
          "features at the midpoint of their bounds, no category, booleans false); "
          "contributions summed per original feature")
STATISTIC = "mean absolute contribution per original feature over each site's held-out rows, in probability points"


def explain_federated(grid: Grid, recorder: RunRecorder, arrays: ArrayRecord, cfg: RunConfig) -> None:
    """Ask every connected site to explain ``arrays``; write explanations.json and importance.png."""
    if not len(arrays):
        logger.warning("%s explanation skipped: there is no final model", PROGRESS)
        return
    explain_round = cfg.num_server_rounds + 1
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({
        "server-round": explain_round, "schema-sha256": recorder.schema.sha256(), RUN_ID_KEY: recorder.run_id})})
    nodes = list(grid.get_node_ids())
    logger.info("%s explaining the final model at %d sites", PROGRESS, len(nodes))
    messages = [Message(content=content, message_type="query.explain", dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    features = [f.name for f in recorder.schema.features]
    sites: dict[str, dict[str, Any]] = {}
    for msg in replies:
        if msg.has_error():
            sites[f"node {msg.metadata.src_node_id}"] = {"release": "refused", "reason": msg.error.reason}
            logger.warning("%s a site did not explain: %s", PROGRESS, msg.error.reason)
            continue
        try:
            site, entry = _parse(msg, features, recorder)
        except (CandorError, KeyError, ValueError, TypeError, StopIteration) as err:
            site, entry = f"node {msg.metadata.src_node_id}", {"release": "invalid", "reason": repr(err)}
            logger.warning("%s node %s sent an unusable explanation reply (%r); ignored",
                           PROGRESS, msg.metadata.src_node_id, err)
        sites[site] = entry
    if len(replies) < len(nodes):
        logger.warning("%s %d of %d sites did not answer the explanation request within %.0f s",
                       PROGRESS, len(nodes) - len(replies), len(nodes), cfg.round_timeout)
    doc = {
        "round": explain_round,
        "method": METHOD,
        "statistic": STATISTIC,
        "release": ({"kind": "dp", "mechanism": "Gaussian (clipped per-record vectors, noise σ·C on the sum)",
                     "clip": cfg.explain_clip, "noise_multiplier": cfg.explain_noise_multiplier}
                    if cfg.dp else {"kind": "exact", "note": "non-private run: exact statistics were sent"}),
        "features": features,
        **aggregate(sites, features),
        "sites": dict(sorted(sites.items())),
    }
    write_json_atomic(recorder.dir / "explanations.json", doc)
    if doc["num_examples"]:
        plot_importance(doc, recorder.dir / "importance.png")
    top = ", ".join(f"{f} {doc['global'][f]:.3f}" for f in doc["ranking"][:5])
    logger.info("%s global importance (top 5): %s", PROGRESS, top or "none: no site released one")


def _parse(msg: Message, features: list[str], recorder: RunRecorder) -> tuple[str, dict[str, Any]]:
    """(site, entry) of one reply; a private release is added to the site's privacy record."""
    ident = msg.content.config_records["candor"]
    site, release = str(ident["site"]), str(ident["release"])
    entry: dict[str, Any] = {"release": release}
    if release != "opted-out":
        metrics = next(iter(msg.content.metric_records.values()))
        entry["num_examples"] = int(metrics["num-examples"])
        entry["importance"] = {f: float(metrics[f]) for f in features}
    if release == "dp":
        mechanism = MechanismRecord.from_dict(json.loads(str(ident["mechanism"])))
        delta, accountant = float(ident["delta"]), str(ident["accountant"])
        entry.update(noise_multiplier=mechanism.noise_multiplier, clip=float(ident["clip"]), delta=delta,
                     epsilon_explanation=epsilon([mechanism], delta=delta, accountant=accountant))
        entry["epsilon_total"] = recorder.record_release(
            site, mechanism, what="explanation", delta=delta, accountant=accountant,
            epsilon_reported=float(ident["epsilon"]))
    return site, entry


def aggregate(sites: dict[str, dict[str, Any]], features: list[str]) -> dict[str, Any]:
    """``global`` (row-weighted mean of the site importances), ``ranking``, ``num_examples``."""
    released = [s for s in sites.values() if "importance" in s]
    total = sum(s["num_examples"] for s in released)
    if not total:
        return {"global": {}, "ranking": [], "num_examples": 0}
    glob = {f: sum(s["num_examples"] * s["importance"][f] for s in released) / total for f in features}
    return {"global": glob, "ranking": sorted(features, key=lambda f: -glob[f]), "num_examples": total}


def plot_importance(doc: dict[str, Any], path: Path, *, top: int = 20) -> None:
    """Global importance (left) and each site's importance side by side (right), top features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    features = doc["ranking"][:top][::-1]  # largest at the top
    sites = [s for s, e in doc["sites"].items() if "importance" in e]
    y = np.arange(len(features))
    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.35 * len(features)), sharey=True)
    ax_g.barh(y, [doc["global"][f] for f in features], color="k")
    ax_g.set(yticks=y, yticklabels=features, xlabel="mean |contribution| (probability)",
             title=f"All sites (row-weighted, n = {doc['num_examples']})")
    height = 0.8 / max(len(sites), 1)
    for i, site in enumerate(sites):
        e = doc["sites"][site]
        ax_s.barh(y - 0.4 + (i + 0.5) * height, [e["importance"][f] for f in features], height=height,
                  label=f"{site} (n = {e['num_examples']})")
    ax_s.set(xlabel="mean |contribution| (probability)", title="Per site")
    ax_s.legend(fontsize=8)
    if doc["release"]["kind"] == "dp":
        fig.suptitle(f"Feature importance, DP release per site (σ = {doc['release']['noise_multiplier']}, "
                     f"C = {doc['release']['clip']}): noisy, values may be < 0", fontsize=10)
    fig.tight_layout()
    write_figure_atomic(fig, path)


def card_section(doc: dict[str, Any], *, top: int = 10) -> str:
    """The model card's "Explanations" section (Markdown) from explanations.json."""
    lines = ["## Explanations", "", f"Method: {doc['method']}.", f"Statistic: {doc['statistic']}.", ""]
    release = doc["release"]
    if release["kind"] == "dp":
        lines.append(f"Each site sent a differentially private release: per-record vectors clipped to L2 norm "
                     f"C = {release['clip']}, Gaussian noise σ·C with σ = {release['noise_multiplier']} on "
                     f"their sum, charged to the site's privacy ledger; the ε below is that release alone, and "
                     f"privacy.json's ε for each site includes it.")
    else:
        lines.append("This run was not private: sites sent exact statistics.")
    lines += ["", "| site | release | rows | ε (explanation) |", "|---|---|---|---|"]
    for site, e in doc["sites"].items():
        eps = f"{e['epsilon_explanation']:.3f}" if "epsilon_explanation" in e else "—"
        lines.append(f"| {site} | {e['release']} | {e.get('num_examples', '—')} | {eps} |")
    if doc["ranking"]:
        lines += ["", "Global importance (row-weighted over sites):", ""]
        lines += [f"{i}. {f}: {doc['global'][f]:.3f}" for i, f in enumerate(doc["ranking"][:top], start=1)]
    return "\n".join(lines) + "\n"
