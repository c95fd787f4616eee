"""The model card: the privacy.json ε per site, the model file's hash, tied to the audit log."""

from __future__ import annotations

import json

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord
from trust_helpers import SITES, reply

from candor.common.auditlog import entry_hash, load_public_key, read_log
from candor.common.config import RunConfig
from candor.common.encoding import Encoder
from candor.common.hashing import sha256_file
from candor.common.schema import Schema
from candor.server.audit import AuditLog
from candor.server.model_card import card_doc, render_markdown
from candor.server.outputs import RunRecorder
from candor.common.demo import DEMO_SCHEMA_PATH


def test_card_reports_each_sites_epsilon_as_privacy_json_and_the_release(sim_run):
    card = json.loads((sim_run / "model_card.json").read_text())
    privacy = json.loads((sim_run / "privacy.json").read_text())
    assert sorted(card["privacy"]["sites"]) == sorted(privacy["sites"]) == list(SITES)
    for site, p in privacy["sites"].items():
        c = card["privacy"]["sites"][site]
        assert c["epsilon"] == p["epsilon"] and c["delta"] == p["delta"] and c["accountant"] == p["accountant"]
        training = [h for h in p["history"] if h["kind"] == "training"]
        assert c["rounds"] == 2 and c["steps"] == sum(h["steps"] for h in training)
        assert c["releases"] == p["releases"]
        assert [r["kind"] for r in c["releases"]] == ["training", "evaluation", "explanation", "row-count"]
        assert c["unprotected"] == [] and c["adjacency"] == p["adjacency"]
    md = (sim_run / "MODEL_CARD.md").read_text()
    for site, p in privacy["sites"].items():
        assert f"| {site} | {p['epsilon']:.4g} |" in md
    assert "explanation (1 x σ = 3)" in md and "evaluation (2 x σ = " in md and "row-count (1 x σ = 20)" in md
    assert "Nothing left any site in the clear." in md


def test_card_hashes_tie_it_to_the_model_files_and_the_audit_log(sim_run):
    card = json.loads((sim_run / "model_card.json").read_text())
    files = card["integrity"]["files_sha256"]
    for name in ("model.pt", "model.safetensors", "model.onnx", "model_schema.json"):
        assert files[name] == sha256_file(sim_run / name)
    entries = read_log(sim_run / "audit.jsonl", load_public_key(sim_run / "audit_public_key.pem"))
    log = card["integrity"]["audit_log"]
    assert log["entries_before_card"] == len(entries) - 1
    assert log["head_sha256"] == entry_hash(entries[-2])  # the last round's entry
    assert log["key_sha256"] == entries[0]["body"]["audit_key"]["sha256"] and log["key_ephemeral"] is True
    final = entries[-1]["body"]["files"]
    assert final["MODEL_CARD.md"] == sha256_file(sim_run / "MODEL_CARD.md")
    assert final["model_card.json"] == sha256_file(sim_run / "model_card.json")
    md = (sim_run / "MODEL_CARD.md").read_text()
    assert md.startswith("---\n") and f"`model.pt` sha256 `{files['model.pt']}`" in md
    assert "ephemeral key" in md


def test_card_follows_the_model_card_sections_and_lists_the_schema(sim_run):
    md = (sim_run / "MODEL_CARD.md").read_text()
    for heading in ("## Model details", "## Uses", "### Out-of-scope use", "## Limitations and risks",
                    "## Training data", "## Training procedure", "### Privacy", "## Evaluation", "## Integrity"):
        assert heading in md
    card = json.loads((sim_run / "model_card.json").read_text())
    schema = Schema.load(DEMO_SCHEMA_PATH)
    assert [f["name"] for f in card["schema"]["features"]] == [f.name for f in schema.features]
    assert card["schema"]["sha256"] == schema.sha256()
    assert set(card["evaluation"]["sites"]) == set(SITES) and "accuracy" in card["evaluation"]["overall"]
    assert card["row_counts_published"] is True and all(s["train_rows"] > 0 for s in card["sites"])


def test_a_deployment_card_publishes_no_row_counts(tmp_path):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    cfg = RunConfig(dp=False, schema=str(DEMO_SCHEMA_PATH))  # deployment: a schema, no sim-manifest
    recorder = RunRecorder(tmp_path, cfg=cfg, schema=schema, feature_names=Encoder(schema).feature_names)
    update = {"0.weight": np.zeros((1, 30), dtype=np.float32), "0.bias": np.zeros(1, dtype=np.float32)}
    recorder.train_reply(1, reply("clinic-a", update, num_examples=1234))
    recorder.evaluate_reply(1, reply("clinic-a", update, num_examples=321, metrics={"accuracy": 0.8}))
    log = AuditLog(tmp_path, Ed25519PrivateKey.generate(), ephemeral=True)
    log.start(run_id="1", cfg=cfg, schema=schema, initial=ArrayRecord({k: Array(v) for k, v in update.items()}))
    card = card_doc(recorder, log)
    assert card["row_counts_published"] is False
    assert card["sites"] == [{"name": "clinic-a", "rounds_trained": 1}]
    assert card["evaluation"]["sites"] == {"clinic-a": {"accuracy": 0.8, "release": "clear"}}
    text = json.dumps(card) + render_markdown(card)
    assert "1234" not in text and "321" not in text
    assert "WITHOUT differential privacy" in text


def test_card_states_the_explanation_release(sim_run):
    md = (sim_run / "MODEL_CARD.md").read_text()
    card = json.loads((sim_run / "model_card.json").read_text())
    assert "## Explanations" in md
    assert card["explanations"]["release"]["kind"] == "dp"
