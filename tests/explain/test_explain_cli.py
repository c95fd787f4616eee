"""`candor-client predict` / `explain`: outputs, loaders, and one clear error per mistake."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from candor.client.cli import main
from candor.common.encoding import Encoder
from candor.common.explain import load_model
from candor.common.schema import Schema

from clinic_data import SCHEMA, records, save_model


@pytest.fixture
def run_dir(tmp_path, schema):
    model = save_model(tmp_path / "run", schema, spec="mlp")
    return tmp_path / "run", model


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "records.csv"
    records(12, seed=2).drop(columns=["outcome"]).to_csv(path, index=False)
    return path


def _encoded(schema, path):
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    clean = pd.DataFrame({"age": frame.age.astype(float), "chol": frame.chol.astype(float), "cp": frame.cp,
                          "smoker": (frame.smoker == "yes").astype(float),
                          "smoker__missing": (frame.smoker == "").astype(float)})
    return torch.from_numpy(Encoder(schema).transform(clean))


def test_predict_writes_probability_and_class_per_record(run_dir, data, schema, tmp_path):
    path, model = run_dir
    out = tmp_path / "pred.csv"
    assert main(["predict", str(path), "--data", str(data), "--out", str(out), "--id-column", "id"]) == 0
    pred = pd.read_csv(out, dtype={"record": str})
    with torch.no_grad():
        expected = torch.sigmoid(model(_encoded(schema, data))[:, 0]).numpy()
    assert list(pred.columns) == ["record", "probability", "predicted"]
    assert list(pred.record) == [f"p{i}" for i in range(12)]
    np.testing.assert_allclose(pred.probability, expected, atol=1e-5)
    assert list(pred.predicted) == ["yes" if p >= 0.5 else "no" for p in expected]


def test_explain_lists_signed_contributions_that_add_up(run_dir, data, tmp_path, capsys):
    path, _ = run_dir
    out, png = tmp_path / "expl.csv", tmp_path / "p3.png"
    assert main(["explain", str(path / "model.pt"), "--data", str(data), "--out", str(out), "--top", "4",
                 "--record", "3", "--plot", str(png)]) == 0
    expl = pd.read_csv(out, dtype={"record": str, "value": str})
    assert len(expl) == 12 * 4 and set(expl.feature) == {"age", "chol", "cp", "smoker"}
    per_record = expl.groupby("record")
    total = per_record.contribution.sum()
    gap = per_record.probability.first() - per_record.reference_probability.first()
    np.testing.assert_allclose(total, gap, atol=1e-3)  # all 4 features listed: completeness
    first = expl[expl.record == "1"].iloc[0]
    direction = "up" if first.contribution >= 0 else "down"
    assert first.reason == f"{first.feature} = {first.value} pushed P(yes) {direction} by {abs(first.contribution):.3f}"
    age = expl[(expl.record == "1") & (expl.feature == "age")].iloc[0]
    assert float(age.value) == float(records(12, seed=2).age[0]) and age.reference == "60"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "pushed P(yes)" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["run dir", "bundle dir", "file"])
def test_the_loader_takes_a_run_dir_a_bundle_dir_or_the_file(run_dir, tmp_path, where):
    path, _ = run_dir
    if where == "bundle dir":
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "model.pt").write_bytes((path / "model.pt").read_bytes())
        path = bundle
    elif where == "file":
        path = path / "model.pt"
    loaded = load_model(path)
    assert loaded.spec == "mlp" and loaded.path.name == "model.pt" and not loaded.model.training


def _fails(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_records_of_another_schema_are_refused_in_one_message(run_dir, tmp_path, capsys):
    path, _ = run_dir
    other = tmp_path / "other.csv"
    pd.DataFrame({"income": ["50"], "loan": ["200"]}).to_csv(other, index=False)
    err = _fails(capsys, ["predict", str(path), "--data", str(other), "--out", str(tmp_path / "p.csv")])
    assert err.count("error:") == 1 and str(other) in err
    assert "none of the model's 4 feature columns (age, chol, cp, smoker) is in the file" in err
    assert "schema of this model ('clinic')" in err
    assert not (tmp_path / "p.csv").exists()


def test_renamed_columns_are_named_with_a_hint(run_dir, data, tmp_path, capsys):
    path, _ = run_dir
    renamed = tmp_path / "renamed.csv"
    pd.read_csv(data, dtype=str, keep_default_na=False).rename(columns={"chol": "chol_mg"}).to_csv(renamed, index=False)
    err = _fails(capsys, ["predict", str(path), "--data", str(renamed), "--out", str(tmp_path / "p.csv")])
    assert "column 'chol': column required by the schema is missing" in err
    assert "the file has 'chol_mg': rename it" in err


def test_a_missing_column_an_empty_file_and_bad_values_are_clear(run_dir, data, tmp_path, capsys):
    path, _ = run_dir
    frame = pd.read_csv(data, dtype=str, keep_default_na=False)
    missing = tmp_path / "missing.csv"
    frame.drop(columns=["smoker"]).to_csv(missing, index=False)
    err = _fails(capsys, ["explain", str(path), "--data", str(missing), "--out", str(tmp_path / "e.csv")])
    assert "column 'smoker': column required by the schema is missing" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    out = str(tmp_path / "p.csv")
    assert "the file is empty" in _fails(capsys, ["predict", str(path), "--data", str(empty), "--out", out])
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(frame.columns) + "\n")
    assert "no data rows" in _fails(capsys, ["predict", str(path), "--data", str(header_only), "--out", out])
    bad = frame.copy()
    bad.loc[1, "age"], bad.loc[2, "chol"], bad.loc[3, "cp"] = "150", "", "z"
    bad_path = tmp_path / "bad.csv"
    bad.to_csv(bad_path, index=False)
    err = _fails(capsys, ["predict", str(path), "--data", str(bad_path), "--out", str(tmp_path / "p.csv")])
    assert "3 problems" in err
    assert "column 'age': values must lie within the schema bounds [20, 100]" in err
    assert "column 'chol': missing values; the schema drops such rows" in err
    assert "column 'cp': values must be one of the schema levels" in err


def test_model_and_option_mistakes_are_clear(run_dir, data, tmp_path, capsys):
    path, _ = run_dir

    def error(command, model, *options):
        argv = [command, str(model), "--data", str(data), "--out", str(tmp_path / "e.csv"), *options]
        return _fails(capsys, argv)

    assert "no model found" in error("predict", tmp_path / "nowhere")
    broken = tmp_path / "broken" / "model.pt"
    broken.parent.mkdir()
    broken.write_bytes(b"not a model")
    assert "not a usable Candor model file" in error("predict", broken.parent)
    doc = torch.load(path / "model.pt", weights_only=True)
    doc["schema_sha256"] = "0" * 64
    torch.save(doc, broken)
    assert "does not match the schema fingerprint" in error("predict", broken)
    assert "--record and --plot go together" in error("explain", path, "--record", "2")
    assert "matches 0 records" in error("explain", path, "--record", "99", "--plot", str(tmp_path / "x.png"))
    assert "--id-column is not in the file" in error("predict", path, "--id-column", "mrn")
    assert "is the input file" in _fails(capsys, ["predict", str(path), "--data", str(data), "--out", str(data)])


def test_multiclass_predictions_and_explanations_name_the_class(tmp_path, data):
    schema = Schema.from_dict({**SCHEMA, "label": {"name": "outcome", "task": "multiclass",
                                                   "classes": ["low", "mid", "high"]}})
    model = save_model(tmp_path / "run", schema, spec="mlp")
    pred, expl = tmp_path / "pred.csv", tmp_path / "expl.csv"
    assert main(["predict", str(tmp_path / "run"), "--data", str(data), "--out", str(pred)]) == 0
    assert main(["explain", str(tmp_path / "run"), "--data", str(data), "--out", str(expl), "--top", "4"]) == 0
    with torch.no_grad():
        probs = torch.softmax(model(_encoded(schema, data)), -1).numpy()
    table = pd.read_csv(pred)
    classes = ["low", "mid", "high"]
    np.testing.assert_allclose(table[[f"probability[{c}]" for c in classes]], probs, atol=1e-5)
    assert list(table.predicted) == [classes[k] for k in probs.argmax(1)]
    np.testing.assert_allclose(table.probability, probs.max(1), atol=1e-5)
    explained = pd.read_csv(expl).groupby("record")
    assert list(explained.outcome.first()) == list(table.predicted)
    np.testing.assert_allclose(explained.contribution.sum(),
                               explained.probability.first() - explained.reference_probability.first(), atol=1e-3)
