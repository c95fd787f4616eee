"""The run directory: everything a run leaves behind, rewritten atomically every round.

Files (formats in docs/outputs.md):
- ``config.json``   the resolved run config and the schema's sha256;
- ``metrics.json``  per round: aggregate and per-site evaluation, training loss, refusals;
- ``metrics.csv``   the same, one row per (round, site) plus "aggregate" rows;
- ``privacy.json``  per site: cumulative ε recomputed here from the site's mechanism
                    history (and the ε the site reported), δ, accountant, privacy unit;
- ``model.pt``      the global model: state dict, schema, model spec (checkpointed
                    every round);
- ``progress.png``  accuracy and cumulative ε per round.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from candor.common.atomic import json_safe, write_atomic, write_json_atomic
from candor.common.config import RunConfig
from candor.common.errors import CHARGED_CODE, REFUSAL_CODE
from candor.common.model_file import MODEL_FILE, ModelFile
from candor.common.privacy import ADJACENCY, KINDS, PRIVACY_UNIT, MechanismRecord, epsilon
from candor.common.releases import EvaluationSums
from candor.common.progress import PROGRESS
from candor.common.schema import Schema

logger = logging.getLogger(__name__)


_ORDER = ("row-count", "training", "evaluation", "explanation")  # a round's releases in the order they are made
_MECHANISMS = {
    "training": "DP-SGD: Poisson-subsampled Gaussian, per-record clipping (Abadi et al. 2016)",
    "evaluation": "Gaussian on the held-out sums of clipped loss and correct predictions (common/releases.py)",
    "explanation": "Gaussian on the sum of clipped per-record |contribution| vectors (common/explain.py)",
    "row-count": "Gaussian on the training and held-out row counts (common/releases.py)",
}


def evaluation_sums(metrics: dict[str, Any]) -> EvaluationSums | None:
    """The DP evaluation sums a site's evaluation reply carries, or ``None`` (in the clear)."""
    if "dp-loss-sum" not in metrics:
        return None
    return EvaluationSums(loss_sum=float(metrics["dp-loss-sum"]), correct_sum=float(metrics["dp-correct-sum"]),
                          count=int(metrics["num-examples"]), loss_clip=float(metrics["dp-loss-clip"]))


def site_of(msg: Message) -> str:
    """The site name a reply carries (its node id if it carries none)."""
    return str(msg.content.config_records.get("candor", {}).get("site", msg.metadata.src_node_id))


class RunRecorder:
    def __init__(self, out_dir: str | Path, *, cfg: RunConfig, schema: Schema, feature_names: list[str],
                 run_id: str = "") -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.run_id = run_id  # the Candor run id (common.names.RUN_ID_KEY)
        self.schema = schema
        self.feature_names = feature_names
        self.rounds: dict[int, dict[str, Any]] = {}
        self.privacy: dict[str, dict[str, Any]] = {}
        self._asked: dict[int, set[int]] = {}  # round -> nodes asked to train
        self._answered: dict[int, set[int]] = {}  # round -> nodes that trained or refused (a known outcome)
        self._node_of: dict[str, int] = {}  # site -> its node id
        self._evaluation: dict[str, str] = {}  # site -> what it releases of its evaluation (dp, local, clear)
        write_json_atomic(self.dir / "config.json", {
            "run_id": run_id,
            "run_config": cfg.replace(resume=False).to_run_config(),
            "schema_sha256": schema.sha256(),
            "schema": schema.to_dict(),
        })

    def _round(self, r: int) -> dict[str, Any]:
        return self.rounds.setdefault(r, {"round": r, "aggregate": {}, "sites": {}, "train": {}, "refusals": [],
                                          "rejected": []})

    # --- called by RecordingStrategy ------------------------------------------
    def sampled(self, server_round: int, nodes: list[int]) -> None:
        """The nodes asked to train in ``server_round``."""
        self._round(server_round)["sampled"] = len(nodes)
        self._asked[server_round] = set(nodes)

    def train_reply(self, server_round: int, msg: Message) -> None:
        entry = self._round(server_round)
        node = msg.metadata.src_node_id
        if msg.has_error():
            reason = msg.error.reason
            entry["refusals"].append({"node": node, "reason": reason})
            logger.warning("%s round %d: a site did not train: %s", PROGRESS, server_round, reason)
            if msg.error.code == REFUSAL_CODE or (msg.error.code != CHARGED_CODE and "refuses" in reason):
                self._answered.setdefault(server_round, set()).add(node)  # refused before spending anything
            return  # CHARGED_CODE: the site had spent the round earlier; it stays unconfirmed here
        self._answered.setdefault(server_round, set()).add(node)
        ident = msg.content.config_records.get("candor", {})
        site = site_of(msg)
        self._node_of[site] = node
        metrics = dict(next(iter(msg.content.metric_records.values())))
        entry["train"][site] = metrics
        if ident.get("resent"):
            entry.setdefault("resent", []).append(site)  # the update it kept from the abandoned attempt
        if "history" in ident:
            history = [MechanismRecord.from_dict(h) for h in json.loads(str(ident["history"]))]
            delta = float(metrics["delta"])
            accountant = str(ident["accountant"])
            recomputed = epsilon(history, delta=delta, accountant=accountant)
            if not math.isclose(recomputed, float(metrics["epsilon"]), rel_tol=1e-6, abs_tol=1e-9):
                logger.warning("%s site %s reported ε = %.4f; its history gives %.4f (reporting the latter)",
                               PROGRESS, site, metrics["epsilon"], recomputed)
            p = self.privacy.setdefault(site, {"history": []})
            p.update({
                "epsilon_reported": float(metrics["epsilon"]),
                "delta": delta,
                "accountant": accountant,
                "privacy_unit": PRIVACY_UNIT,
                "noise_seed": str(ident.get("noise-seed", "unknown")),
                "max_grad_norm": self.cfg.max_grad_norm,
                "num_examples": int(metrics["num-examples"]),  # the site's DP count of its training rows
            })
            self._merge(site, history)
        if "evaluation" in ident:
            self._evaluation[site] = str(ident["evaluation"])

    def _merge(self, site: str, mechanisms: list[MechanismRecord]) -> float:
        """Add ``mechanisms`` to ``site``'s history (one entry per release: kind and round),
        and recompute its ε from the whole history. Returns it."""
        p = self.privacy[site]
        known = {(h.get("kind", "training"), h["round"]) for h in p["history"]}
        for m in mechanisms:
            if (m.kind, m.round) not in known:
                p["history"].append({k: v for k, v in m.to_dict().items() if k != "run_id"})
                known.add((m.kind, m.round))
        p["history"].sort(key=lambda h: (h["round"], _ORDER.index(h.get("kind", "training"))))
        p["epsilon"] = epsilon([MechanismRecord(**h) for h in p["history"]], delta=p["delta"],
                               accountant=p["accountant"])
        return p["epsilon"]

    def evaluate_reply(self, server_round: int, msg: Message) -> None:
        if msg.has_error():
            logger.warning("%s round %d: a site did not evaluate: %s", PROGRESS, server_round, msg.error.reason)
            return
        site = site_of(msg)
        ident = msg.content.config_records.get("candor", {})
        if "evaluation" in ident:
            self._evaluation[site] = str(ident["evaluation"])
        m = dict(next(iter(msg.content.metric_records.values()), {}))
        if not m:  # the site keeps its evaluation local
            self._round(server_round)["sites"][site] = {"release": "local"}
            return
        sums = evaluation_sums(m)
        if sums is not None:  # a DP release: the site's noisy sums, recorded with its mechanism
            m = {**sums.metrics(), "num_examples": sums.count, "release": "dp"}
            if "mechanism" in ident:  # recorded even for a site that has not trained (yet)
                self.privacy.setdefault(site, {"delta": float(ident["delta"]), "accountant": str(ident["accountant"]),
                                               "privacy_unit": PRIVACY_UNIT, "history": []})
                self._merge(site, [MechanismRecord.from_dict(json.loads(str(ident["mechanism"])))])
                if "epsilon" in ident:
                    self.privacy[site]["epsilon_reported"] = float(ident["epsilon"])
        else:
            m["num_examples"] = int(m.pop("num-examples"))
            m["release"] = "clear"
        self._round(server_round)["sites"][site] = m

    def rejected(self, server_round: int, site: str, reason: str) -> None:
        """An update the checks (server.checks) kept out of the aggregate."""
        self._round(server_round)["rejected"].append({"site": site, "reason": reason})

    def evaluate_aggregate(self, server_round: int, aggregate: MetricRecord | None) -> None:
        self._round(server_round)["aggregate"] = dict(aggregate or {})

    def record_release(self, site: str, mechanism: MechanismRecord, *, what: str, delta: float,
                       accountant: str, epsilon_reported: float | None = None) -> float:
        """Add a private release other than training and evaluation (the explanation) to
        ``site``'s history; ``epsilon`` becomes the total, recomputed. Returns it."""
        p = self.privacy.setdefault(site, {"epsilon": 0.0, "delta": delta, "accountant": accountant,
                                           "privacy_unit": PRIVACY_UNIT, "history": []})
        p.setdefault("epsilon_before_" + what, p["epsilon"])
        if epsilon_reported is not None:
            p["epsilon_reported"] = epsilon_reported
        return self._merge(site, [mechanism])

    # --- checkpoint hook (strategy.start's evaluate_fn) -----------------------
    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return
        self.save_model(arrays)
        self.write_tables()
        self._progress(server_round)

    def save_model(self, arrays: ArrayRecord) -> None:
        ModelFile(state_dict=arrays.to_torch_state_dict(), model=self.cfg.model, hidden=tuple(self.cfg.hidden_sizes),
                  feature_names=tuple(self.feature_names), schema=self.schema).save(self.dir / MODEL_FILE)

    def metrics_doc(self) -> dict[str, Any]:
        rounds = []
        for r in sorted(self.rounds):
            e = self.rounds[r]
            rounds.append({"round": r, "aggregate": e["aggregate"], "sites": dict(sorted(e["sites"].items())),
                           "train": dict(sorted(e["train"].items())), "sampled": e.get("sampled"), "refusals": e["refusals"],
                           "rejected": e["rejected"]})
        return {"task": self.schema.label.task, "rounds": rounds}

    def _unconfirmed(self, site: str, p: dict[str, Any]) -> list[int]:
        """Rounds ``site`` was asked to train whose outcome never arrived (no reply, or a
        failure other than a refusal) and that its reported history does not cover: it may
        have trained and charged its ledger before the reply was lost."""
        me = {site, self._node_of.get(site)}  # rounds before a resume name sites, later ones nodes
        covered = {h["round"] for h in p.get("history", [])}
        return sorted(r for r, asked in self._asked.items()
                      if me & asked and not me & self._answered.get(r, set()) and r not in covered)

    def _site_privacy(self, site: str, p: dict[str, Any]) -> dict[str, Any]:
        unconfirmed = self._unconfirmed(site, p)
        training = [h for h in p.get("history", []) if h.get("kind", "training") == "training"]
        lost = [h["round"] for h in training if site not in self.rounds.get(h["round"], {}).get("train", {})]
        if lost:  # in the site's history (spent), but its update never reached the coordinator
            p = {**p, "charged_without_update": lost,
                 "charged_without_update_note": "rounds the site reports it trained and charged whose update the "
                                                "coordinator never received (a lost reply); epsilon includes them"}
        if not unconfirmed or not training:
            return p
        last = training[-1]  # σ is fixed for the run; q and steps are the site's own
        assumed = [MechanismRecord(**{**last, "round": r}) for r in unconfirmed]
        history = [MechanismRecord(**h) for h in p["history"]] + assumed
        return {**p, "unconfirmed_rounds": unconfirmed,
                "epsilon_if_unconfirmed_spent": epsilon(history, delta=p["delta"], accountant=p["accountant"]),
                "unconfirmed_note": "rounds the site was asked to train whose reply never arrived: it may have "
                                    "trained and charged them (its ledger is the record); "
                                    "epsilon_if_unconfirmed_spent counts them at the run's mechanism"}

    def privacy_doc(self) -> dict[str, Any]:
        return {
            "dp": self.cfg.dp,
            "privacy_unit": "one record at one site (add/remove one row of that site's table)",
            "target_epsilon": self.cfg.target_epsilon if self.cfg.dp else None,
            "note": "epsilon is the cumulative guarantee over every round of this run listed in "
                    "history, recomputed by the coordinator from that history",
            "sites": {site: {**self._site_privacy(site, p), **self._coverage(site, p)}
                      for site, p in sorted(self.privacy.items())},
        }

    def _coverage(self, site: str, p: dict[str, Any]) -> dict[str, Any]:
        """What left ``site`` and what covered it: the adjacency, one entry per kind of
        release with its mechanism, and the kinds released in the clear."""
        history = p.get("history", [])
        releases = []
        for kind in KINDS:
            mine = [h for h in history if h.get("kind", "training") == kind]
            if mine:
                releases.append({"kind": kind, "mechanism": _MECHANISMS[kind], "releases": len(mine),
                                 "noise_multiplier": sorted({h["noise_multiplier"] for h in mine})})
        mode = self._evaluation.get(site, "dp")
        if mode == "clear":
            releases.append({"kind": "evaluation", "mechanism": "none"})
        return {"adjacency": ADJACENCY, "evaluation": mode, "releases": releases,
                "unprotected": ["evaluation"] if mode == "clear" else []}

    def write_tables(self) -> None:
        write_json_atomic(self.dir / "metrics.json", self.metrics_doc())
        write_json_atomic(self.dir / "privacy.json", self.privacy_doc())
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["round", "site", "num_examples", "loss", "accuracy", "auroc", "train_loss", "epsilon"])
        for r in sorted(self.rounds):
            e = self.rounds[r]
            for site, m in sorted(e["sites"].items()):
                t = e["train"].get(site, {})
                writer.writerow([r, site, m.get("num_examples"), m.get("loss"), m.get("accuracy"),
                                 m.get("auroc"), t.get("train-loss"), t.get("epsilon")])
            a = e["aggregate"]
            writer.writerow([r, "aggregate", sum(m.get("num_examples", 0) for m in e["sites"].values()),
                             a.get("loss"), a.get("accuracy"), a.get("auroc"), None, None])
        write_atomic(self.dir / "metrics.csv", out.getvalue())

    # --- checkpoint state (server.checkpoint) ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, as JSON-safe data; node ids are replaced by the site
        names they are known by (a resumed run's nodes have new ids)."""
        name = {node: site for site, node in self._node_of.items()}
        named = lambda nodes: sorted(str(name.get(n, n)) for n in nodes)  # noqa: E731
        return {"rounds": {str(r): e for r, e in self.rounds.items()}, "privacy": self.privacy,
                "evaluation": self._evaluation,
                "asked": {str(r): named(v) for r, v in self._asked.items()},
                "answered": {str(r): named(v) for r, v in self._answered.items()}}

    def load_state_dict(self, state: dict[str, Any], *, through_round: int) -> None:
        """Restore :meth:`state_dict`, keeping rounds up to ``through_round``."""
        self.rounds = {int(r): e for r, e in state["rounds"].items() if int(r) <= through_round}
        self.privacy = state["privacy"]
        self._evaluation = dict(state.get("evaluation", {}))
        self._asked = {int(r): set(v) for r, v in state["asked"].items() if int(r) <= through_round}
        self._answered = {int(r): set(v) for r, v in state["answered"].items() if int(r) <= through_round}

    def _progress(self, server_round: int) -> None:
        e = self.rounds.get(server_round, {})
        a = e.get("aggregate", {})
        trained, refused = len(e.get("train", {})), len(e.get("refusals", []))
        parts = [f"{PROGRESS} round {server_round}/{self.cfg.num_server_rounds}",
                 f"sites {len(e.get('sites', {}))} (trained {trained}" + (f", refused {refused})" if refused else ")")]
        for key in ("loss", "accuracy", "auroc"):
            if key in a:
                parts.append(f"{key} {a[key]:.3f}")
        if self.cfg.dp and e.get("train"):
            eps = ", ".join(f"{s} {m['epsilon']:.2f}" for s, m in sorted(e["train"].items()) if "epsilon" in m)
            parts.append(f"ε {eps}")
        logger.info(" | ".join(parts))

    def finish(self, arrays: ArrayRecord | None) -> None:
        if arrays is not None:
            self.save_model(arrays)
        self.write_tables()
        from .plot import plot_progress

        plot_progress(self.metrics_doc(), json_safe(self.privacy_doc()), self.dir / "progress.png")
        logger.info("%s outputs in %s", PROGRESS, self.dir.resolve())
