"""The model card: ``MODEL_CARD.md`` and ``model_card.json`` in the run directory.

Sections follow Hugging Face's model card (model details; uses and out-of-scope uses;
limitations and risks; training data; training procedure; evaluation; how to load),
with two additions a federated, private model needs: the privacy guarantee per site (ε,
δ, accountant, noise multiplier, sample rate, steps, privacy unit, and any release
besides training, such as the explanation), and the hashes that tie the card to the
audit log and to the model files (the audit log's final entry records the card's own
sha256 in turn). Row counts per site appear only where publishing them is allowed:
in simulations (run config ``sim-manifest`` set, or the embedded demo); not in
deployments, where a site has not agreed to it.
"""

from __future__ import annotations

import json

import logging
from pathlib import Path
from typing import Any

from candor.common.atomic import write_atomic, write_json_atomic
from candor.common.config import RunConfig
from candor.common.privacy import MechanismRecord, epsilon
from candor.common.hashing import sha256_file

from .audit import AuditLog
from .outputs import RunRecorder

logger = logging.getLogger(__name__)

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"


def row_counts_public(cfg: RunConfig) -> bool:
    """Row counts go into the card for simulations only (see module docstring)."""
    return bool(cfg.sim_manifest) or not cfg.schema


def _site_privacy(p: dict[str, Any]) -> dict[str, Any]:
    training = [h for h in p.get("history", []) if h.get("kind", "training") == "training"]
    return {
        "epsilon": p["epsilon"],
        "epsilon_training": epsilon([MechanismRecord(**h) for h in training], delta=p["delta"],
                                    accountant=p["accountant"]),
        "adjacency": p.get("adjacency"),
        "unprotected": p.get("unprotected", []),
        "delta": p["delta"],
        "accountant": p["accountant"],
        "privacy_unit": p.get("privacy_unit"),
        "noise_multiplier": sorted({h["noise_multiplier"] for h in training}),
        "sample_rate": sorted({h["sample_rate"] for h in training}),
        "steps": sum(h["steps"] for h in training),
        "rounds": len(training),
        "releases": p.get("releases", []),
    }


def card_doc(recorder: RunRecorder, log: AuditLog) -> dict[str, Any]:
    cfg, schema = recorder.cfg, recorder.schema
    metrics, privacy = recorder.metrics_doc(), recorder.privacy_doc()
    rounds = metrics["rounds"]
    evaluated = [r for r in rounds if r["sites"]]
    last = evaluated[-1] if evaluated else {"round": None, "sites": {}, "aggregate": {}}
    names = sorted(set(privacy["sites"]) | {s for r in rounds for s in (*r["sites"], *r["train"])})
    public = row_counts_public(cfg)
    sites = []
    for name in names:
        train = next((r["train"][name] for r in reversed(rounds) if name in r["train"]), {})
        entry: dict[str, Any] = {"name": name, "rounds_trained": sum(name in r["train"] for r in rounds)}
        if public:
            entry["train_rows"] = train.get("num-examples")
            entry["test_rows"] = last["sites"].get(name, {}).get("num_examples")
        sites.append(entry)
    start = log.entries[0]["body"] if log.entries else {}
    files = {name: sha256_file(recorder.dir / name)
             for name in ("model.pt", "model.safetensors", "model.onnx", "model_schema.json")
             if (recorder.dir / name).is_file()}
    rejected = [{"round": r["round"], **x} for r in rounds for x in r.get("rejected", [])]
    return {
        "model": {
            "name": schema.name or "candor-model",
            "architecture": cfg.model if cfg.model != "mlp" else f"mlp (hidden {cfg.hidden})",
            "task": schema.label.task,
            "outputs": schema.num_outputs,
            "framework": "PyTorch; exported as safetensors and ONNX",
            "trained_with": "Candor: federated learning (Flower) with DP-SGD at each site (Opacus)",
            "run_id": start.get("run_id"),
        },
        "intended_use": (
            "Scoring records that follow the schema below (same columns, units, bounds and levels) from "
            "populations like those of the participating sites, for research and decision support. Outputs "
            "are probabilities; a decision about a person needs local validation and a human in the loop."),
        "out_of_scope": [
            "records outside the schema's bounds or levels, or from populations no site represents",
            "learning anything about an individual whose record was used in training",
            "automated decisions about individuals without local validation",
        ],
        "limitations": _limitations(cfg, privacy, rejected),
        "schema": {"sha256": schema.sha256(), "label": schema.label.to_dict(),
                   "features": [f.to_dict() for f in schema.features]},
        "sites": sites,
        "row_counts_published": public,
        "training": {
            "rounds": cfg.num_server_rounds, "strategy": cfg.strategy, "local_epochs": cfg.local_epochs,
            "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "learning_rate": cfg.learning_rate,
            "max_grad_norm": cfg.max_grad_norm, "max_update_norm": cfg.max_update_norm, "seed": cfg.seed,
            "rejected_updates": rejected,
        },
        "privacy": {
            "dp": cfg.dp,
            "privacy_unit": privacy["privacy_unit"],
            "target_epsilon": privacy["target_epsilon"],
            "sites": {site: _site_privacy(p) for site, p in privacy["sites"].items()},
        },
        "evaluation": {
            "round": last["round"],
            "note": "Each site evaluates the final model on its own held-out split; 'overall' is the "
                    "example-weighted mean of the site values",
            "overall": last["aggregate"],
            "sites": last["sites"] if public else {s: {k: v for k, v in m.items() if k != "num_examples"}
                                                     for s, m in last["sites"].items()},
        },
        "integrity": {
            "files_sha256": files,
            "code_sha256": start.get("code_sha256"),
            "schema_sha256": schema.sha256(),
            "audit_log": {"file": "audit.jsonl", "entries_before_card": len(log.entries), "head_sha256": log.head,
                          "key_sha256": log.fingerprint, "key_ephemeral": log.ephemeral},
            "verify": "candor-server audit verify DIR",
        },
    }


def _limitations(cfg: RunConfig, privacy: dict[str, Any], rejected: list[dict[str, Any]]) -> list[str]:
    out = [
        "Evaluated only on the participating sites' held-out splits; no external validation.",
        "Sites differ in size and population; small sites' metrics are noisy.",
    ]
    clear = sorted(s for s, p in privacy.get("sites", {}).items() if p.get("unprotected"))
    if not cfg.dp:
        out.append("Row counts and evaluation metrics were sent to the coordinator in the clear.")
    elif clear:
        out.append(f"Sites {', '.join(clear)} sent their evaluation metrics in the clear (their choice); those "
                   "held-out records are not covered by the ε stated for them.")
    else:
        out.append("Evaluation metrics and row counts are differentially private releases (noisy sums and "
                   "counts, in each site's ε): per-round metrics carry that noise, most on small sites.")
    if cfg.dp:
        out.append("Differential privacy protects one record at one site; a person with several records, "
                   "or records at several sites, is protected correspondingly less (group privacy).")
    else:
        out.append("Trained WITHOUT differential privacy: the model may reveal training records. Do not "
                   "publish it beyond the participating sites.")
    if rejected:
        out.append(f"{len(rejected)} update(s) were rejected by the server's checks (see training.rejected_updates).")
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return "-" if value is None else str(value)


def render_markdown(card: dict[str, Any]) -> str:
    m, p, e, i = card["model"], card["privacy"], card["evaluation"], card["integrity"]
    lines = [
        "---", "library_name: pytorch", "pipeline_tag: tabular-classification",
        "tags: [tabular-classification, federated-learning, differential-privacy, candor]", "---", "",
        f"# Model card: {m['name']}", "",
        f"A {m['architecture']} {m['task']} classifier trained by federated learning across "
        f"{len(card['sites'])} sites, " + ("with differentially private SGD at every site." if p["dp"]
                                            else "WITHOUT differential privacy."), "",
        "## Model details", "",
        *(f"- **{k.replace('_', ' ')}**: {_fmt(v)}" for k, v in m.items()), "",
        "## Uses", "", card["intended_use"], "", "### Out-of-scope use", "",
        *(f"- {x}" for x in card["out_of_scope"]), "",
        "## Limitations and risks", "", *(f"- {x}" for x in card["limitations"]), "",
        "## Training data", "",
        f"Each site's records stayed at the site. The schema (sha256 `{card['schema']['sha256']}`):", "",
        "| feature | kind | bounds / levels | missing |", "|---|---|---|---|",
        *(f"| {f['name']} | {f['kind']} | "
          f"{_fmt([f['lower'], f['upper']]) if f['kind'] == 'numeric' else _fmt(f.get('levels', ['false', 'true']))}"
          f" | {f['missing']} |" for f in card["schema"]["features"]),
        f"| **label** `{card['schema']['label']['name']}` | {card['schema']['label']['task']} | | |", "",
        "| site | rounds trained | training rows | test rows |", "|---|---|---|---|",
        *(f"| {s['name']} | {s['rounds_trained']} | {_fmt(s.get('train_rows', 'not published'))} | "
          f"{_fmt(s.get('test_rows', 'not published'))} |" for s in card["sites"]), "",
        "## Training procedure", "",
        *(f"- **{k.replace('_', ' ')}**: {_fmt(v) if k != 'rejected_updates' else len(v)}"
          for k, v in card["training"].items()), "",
        "### Privacy", "",
    ]
    if p["dp"]:
        unprotected = sorted({k for s in p["sites"].values() for k in s.get("unprotected", [])})
        lines += [f"Privacy unit: {p['privacy_unit']}. ε is cumulative over the whole run, for every release "
                  "listed: training, the row counts, each round's evaluation, the explanation. "
                  + (f"Released in the clear at some site (not covered by its ε): {', '.join(unprotected)}."
                     if unprotected else "Nothing left any site in the clear."), "",
                  "| site | ε | δ | accountant | noise multiplier σ | sample rate q | steps | other releases |",
                  "|---|---|---|---|---|---|---|---|"]
        for site, s in sorted(p["sites"].items()):
            releases = ", ".join(f"{r['kind']} ({r['releases']} x σ = {_fmt(r['noise_multiplier'])})"
                                 if r.get("noise_multiplier") else f"{r['kind']} (IN THE CLEAR)"
                                 for r in s["releases"] if r["kind"] != "training") or "-"
            lines.append(f"| {site} | {_fmt(s['epsilon'])} | {_fmt(s['delta'])} | {s['accountant']} | "
                         f"{_fmt(s['noise_multiplier'])} | {_fmt(s['sample_rate'])} | {s['steps']} | {releases} |")
    else:
        lines.append("None: this model was trained without differential privacy.")
    keys = sorted({k for v in [e["overall"], *e["sites"].values()] for k in v})
    lines += ["", "## Evaluation", "", e["note"] + f" (round {e['round']}).", "",
              "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
              *(f"| {name} | " + " | ".join(_fmt(v.get(k)) for k in keys) + " |"
                for name, v in [("**overall**", e["overall"]), *sorted(e["sites"].items())]), "",
              *_explanations(card),
              "## How to load", "",
              "`model.safetensors` + `model_schema.json` with plain PyTorch, or `model.onnx` with any ONNX "
              "runtime; `model.pt` with Candor. Example: docs/trust.md.", "",
              "## Integrity", "",
              *(f"- `{name}` sha256 `{sha}`" for name, sha in i["files_sha256"].items()),
              f"- app code sha256 `{i['code_sha256']}`",
              f"- audit log: {i['audit_log']['entries_before_card']} entries before this card, last entry's "
              f"hash `{i['audit_log']['head_sha256']}`; signed with Ed25519 key `{i['audit_log']['key_sha256']}`"
              + (" (an ephemeral key, created for this run only)" if i["audit_log"]["key_ephemeral"] else ""),
              f"- the log's final entry records this card's sha256. Verify with `{i['verify']}` (DIR: the run "
              "directory or the published bundle).", ""]
    return "\n".join(lines)


def _explanations(card: dict[str, Any]) -> list[str]:
    """The "Explanations" section, when the run released feature importances."""
    if not card.get("explanations"):
        return []
    from .explanations import card_section

    return [card_section(card["explanations"]), ""]


def write_model_card(recorder: RunRecorder, log: AuditLog) -> list[str]:
    """Write both card files into the run directory; returns their names."""
    card = card_doc(recorder, log)
    explanations = Path(recorder.dir) / "explanations.json"
    if explanations.exists():
        card["explanations"] = json.loads(explanations.read_text())
    write_json_atomic(Path(recorder.dir) / CARD_JSON, card)
    write_atomic(Path(recorder.dir) / CARD_MD, render_markdown(card))
    return [CARD_MD, CARD_JSON]
