"""Exports load without Candor and reproduce model.pt; the published bundle holds exactly
the shareable files and verifies on its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord
from onnx.reference import ReferenceEvaluator
from safetensors import safe_open

from candor.common.auditlog import AuditLogError
from candor.common.config import RunConfig
from candor.common.encoding import Encoder
from candor.common.models import build_model
from candor.common.schema import Schema
from candor.common.validation import load_table, validate
from candor.server.audit import verify_run
from candor.server.export import export_model, publish
from candor.server.outputs import RunRecorder

DOC = Path(__file__).resolve().parents[2] / "docs" / "trust.md"
BUNDLE_FILES = {"model.pt", "model.safetensors", "model.onnx", "model_schema.json", "schema.json", "MODEL_CARD.md",
                "model_card.json", "audit.jsonl", "audit_public_key.pem"}


def doc_loader() -> dict:
    """Run the loading example of docs/trust.md (its first python block after '## Exports')."""
    section = DOC.read_text().split("## Exports", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def candor_logits(run: Path, csv: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Logits of model.pt through Candor's own pipeline (validation, encoder, model factory)."""
    doc = torch.load(run / "model.pt", weights_only=True)
    schema = Schema.from_dict(doc["schema"])
    encoder = Encoder(schema)
    model = build_model(doc["model"], num_features=encoder.num_features, num_outputs=schema.num_outputs,
                        hidden=tuple(doc["hidden"]))
    model.load_state_dict(doc["state_dict"])
    frame = load_table(csv, schema, min_rows=1)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(encoder.transform(frame))).numpy(), frame


@pytest.fixture(scope="module")
def bundle(sim_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("published") / "bundle"
    publish(sim_run, out)
    return out


def test_bundle_holds_exactly_the_shareable_files_and_verifies_alone(bundle):
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    text = b"".join(p.read_bytes() for p in bundle.iterdir())
    assert b"PRIVATE KEY" not in text
    report = verify_run(bundle)
    assert report["rounds"] == 2


def test_the_documented_loader_reproduces_model_pt_without_candor(sim_run, bundle):
    ns = doc_loader()
    model, spec = ns["load_published_model"](bundle)
    csv = sim_run / "data" / "hospital-1.csv"
    expected, frame = candor_logits(sim_run, csv)
    features = [c["feature"] for c in spec["inputs"]]
    records = pd.read_csv(csv).loc[frame.index, features].to_dict("records")
    with torch.no_grad():
        logits = model(torch.from_numpy(ns["encode"](spec, records))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert spec["outputs"]["task"] == "binary" and spec["schema_sha256"] == Schema.load(bundle / "schema.json").sha256()
    with safe_open(bundle / "model.safetensors", "np") as f:
        assert f.metadata()["model_sha256"] == spec["model_sha256"]


def test_onnx_export_reproduces_model_pt(sim_run, bundle):
    expected, frame = candor_logits(sim_run, sim_run / "data" / "hospital-2.csv")
    proto = onnx.load(bundle / "model.onnx")
    onnx.checker.check_model(proto)
    doc = torch.load(sim_run / "model.pt", weights_only=True)
    x = Encoder(Schema.from_dict(doc["schema"])).transform(frame)
    (logits,) = ReferenceEvaluator(proto).run(None, {"features": x})
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_candors_own_loader_reads_the_bundle(bundle):
    from candor.common.explain import load_model

    loaded = load_model(bundle)
    assert loaded is not None


def test_publish_refuses_a_non_empty_folder_and_an_unfinished_run(sim_run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(AuditLogError, match="not an empty folder"):
        publish(sim_run, tmp_path / "busy")
    run = tmp_path / "run"
    shutil.copytree(sim_run, run, ignore=shutil.ignore_patterns("data", "ledgers"))
    lines = (run / "audit.jsonl").read_bytes().splitlines(keepends=True)
    (run / "audit.jsonl").write_bytes(b"".join(lines[:-1]))
    with pytest.raises(AuditLogError, match="did not finish"):
        publish(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_schema_describes_every_encoded_column(sim_run):
    spec = json.loads((sim_run / "model_schema.json").read_text())
    doc = torch.load(sim_run / "model.pt", weights_only=True)
    assert [c["name"] for c in spec["inputs"]] == list(doc["feature_names"])
    layers = spec["architecture"]["layers"]  # the shared run trains the default MLP 30-64-32-1
    linear = [(layer["in"], layer["out"]) for layer in layers if layer["type"] == "linear"]
    assert linear == [(30, 64), (64, 32), (32, 1)]
    assert all(layer["weight"] in doc["state_dict"] for layer in layers if layer["type"] == "linear")


MIXED = {"label": {"name": "y", "task": "multiclass", "classes": ["a", "b", "c"]},
         "features": [{"name": "age", "kind": "numeric", "lower": 0, "upper": 100},
                      {"name": "cp", "kind": "categorical", "levels": [1, 2, 3]},
                      {"name": "smoker", "kind": "boolean", "missing": "indicator"}]}


def test_exports_of_an_mlp_with_categorical_and_boolean_inputs(tmp_path):
    schema = Schema.from_dict(MIXED)
    encoder = Encoder(schema)
    torch.manual_seed(0)
    model = build_model("mlp", num_features=encoder.num_features, num_outputs=3, hidden=(8, 4))
    recorder = RunRecorder(tmp_path, cfg=RunConfig(hidden="8,4"), schema=schema, feature_names=encoder.feature_names)
    recorder.save_model(ArrayRecord(model.state_dict()))
    assert sorted(export_model(tmp_path)) == ["model.onnx", "model.safetensors", "model_schema.json", "schema.json"]
    records = [{"age": 30, "cp": 2, "smoker": "yes"}, {"age": 80.5, "cp": "3", "smoker": "no"},
               {"age": 0, "cp": 1.0, "smoker": "TRUE"}, {"age": 99, "cp": " 2.0", "smoker": 1.0}]
    clean, problems = validate(pd.DataFrame([{**r, "y": "a"} for r in records]).astype(str), schema, source="t")
    assert not problems
    with torch.no_grad():
        expected = model(torch.from_numpy(encoder.transform(clean))).numpy()
    ns = doc_loader()
    loaded, spec = ns["load_published_model"](tmp_path)
    with torch.no_grad():
        got = loaded(torch.from_numpy(ns["encode"](spec, records)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    (onnx_logits,) = ReferenceEvaluator(onnx.load(tmp_path / "model.onnx")).run(None, {"features": encoder.transform(clean)})
    np.testing.assert_allclose(onnx_logits, expected, rtol=1e-5, atol=1e-6)
    assert spec["outputs"] == {"task": "multiclass", "logits": 3, "probability": "softmax(logits)",
                               "classes": ["a", "b", "c"]}


def test_exports_of_the_same_model_are_byte_identical_across_processes(tmp_path):
    """safetensors orders its metadata by a per-process hash seed; the export must not."""
    schema = Schema.from_dict(MIXED)
    encoder = Encoder(schema)
    torch.manual_seed(0)
    model = build_model("mlp", num_features=encoder.num_features, num_outputs=3, hidden=(8, 4))
    outputs = []
    for seed in ("1", "2", "3"):
        run = tmp_path / seed
        RunRecorder(run, cfg=RunConfig(hidden="8,4"), schema=schema,
                    feature_names=encoder.feature_names).save_model(ArrayRecord(model.state_dict()))
        subprocess.run([sys.executable, "-c", "import sys; from candor.server.export import export_model; "
                        "export_model(sys.argv[1])", str(run)], check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        outputs.append({name: (run / name).read_bytes() for name in ("model.pt", "model.safetensors")})
    assert outputs[0] == outputs[1] == outputs[2]
    with safe_open(tmp_path / "1" / "model.safetensors", "np") as f:
        assert f.metadata()["format"] == "candor-model/1" and set(f.keys()) == set(model.state_dict())
