"""Embedded data set, its schema, the partitioners and schema inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from candor.common.errors import CandorError
from candor.common.schema import Schema
from candor.common.validation import read_table, validate
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.partition import partition
from candor.simulations.schema_infer import INFER_WARNING, infer_schema

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
HEART = SHARED / "data" / "heart-disease" / "processed.cleveland.data"
HEART_COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach",
                 "exang", "oldpeak", "slope", "ca", "thal", "num"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return breast_cancer_frame()


def malignant_share(sites):
    return np.array([(s["diagnosis"] == "malignant").mean() for s in sites])


def test_frame_and_schema_agree(frame):
    assert frame.shape == (569, 31)
    assert all(c == c.lower() and " " not in c for c in frame.columns)
    assert frame["diagnosis"].value_counts().to_dict() == {"benign": 357, "malignant": 212}
    schema = Schema.load(DEMO_SCHEMA_PATH)
    assert [f.name for f in schema.features] == list(frame.columns[:-1])
    assert schema.label.positive == ("malignant",)
    clean, problems = validate(frame, schema, source="embedded", min_rows=100)
    assert problems == [] and len(clean) == 569


def test_iid_is_a_stratified_disjoint_cover(frame):
    sites = partition(frame, num_sites=4, label="diagnosis", seed=7)
    index = np.concatenate([s.index for s in sites])
    assert sorted(index) == list(frame.index)
    assert {len(s) for s in sites} <= {142, 143}
    np.testing.assert_allclose(malignant_share(sites), 212 / 569, atol=0.01)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_by_seed(frame, scheme):
    def split(seed):
        return [list(s.index) for s in partition(frame, num_sites=5, label="diagnosis",
                                                 scheme=scheme, seed=seed)]
    assert split(3) == split(3)
    assert split(3) != split(4)


def test_dirichlet_skews_labels_and_respects_min_rows(frame):
    iid = partition(frame, num_sites=5, label="diagnosis", seed=1)
    skewed = partition(frame, num_sites=5, label="diagnosis", scheme="dirichlet", alpha=0.1,
                       seed=1, min_rows=30)
    assert min(len(s) for s in skewed) >= 30
    assert sorted(np.concatenate([s.index for s in skewed])) == list(frame.index)
    assert np.ptp(malignant_share(iid)) < 0.02
    assert np.ptp(malignant_share(skewed)) > 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"num_sites": 20, "min_rows": 30}, "569 rows cannot give 20 sites 30 rows each"),
    ({"num_sites": 18, "min_rows": 30, "scheme": "dirichlet", "alpha": 0.01},
     "draws never gave all 18 sites 30 rows"),
    ({"num_sites": 0}, "'num_sites' must be an integer >= 1"),
    ({"num_sites": 2, "scheme": "shards"}, "'scheme' must be 'iid' or 'dirichlet'"),
    ({"num_sites": 2, "scheme": "dirichlet", "alpha": 0}, "'alpha' must be > 0"),
    ({"num_sites": 2, "label": "y"}, "label column 'y' is not in the frame"),
])
def test_impossible_partitions_say_why(frame, kwargs, message):
    with pytest.raises(CandorError, match=message):
        partition(frame, **{"label": "diagnosis", "seed": 0, **kwargs})


def test_infer_schema_on_a_small_table_and_its_round_trip(tmp_path):
    df = pd.DataFrame({"x": ["0.013", "0.51", "", "0.2"], "flag": ["yes", "no", "no", "YES"],
                       "colour": ["red", "blue", "red", "?"], "id": [str(i) for i in range(4)],
                       "y": ["bad", "good", "good", "bad"]})
    schema = infer_schema(df, label="y", source="site.csv")
    kinds = {f.name: f.kind for f in schema.features}
    assert kinds == {"x": "numeric", "flag": "boolean", "colour": "categorical", "id": "numeric"}
    x = schema.features[0]
    assert (x.lower, x.upper) == (0.01, 0.51)  # grid 0.01: 2 significant figures of 0.51
    assert schema.features[2].levels == ("blue", "red")
    assert schema.label.positive == ("good",) and schema.label.negative == ("bad",)
    schema.save(tmp_path / "site.toml")
    assert Schema.load(tmp_path / "site.toml") == schema
    assert "public" in INFER_WARNING and "disclose" in INFER_WARNING


def test_infer_schema_rejects_unusable_labels():
    df = pd.DataFrame({"x": ["1", "2"], "y": ["a", "a"]})
    with pytest.raises(CandorError, match="site.csv: label 'y': a label needs 2 to 20"):
        infer_schema(df, label="y", source="site.csv")
    with pytest.raises(CandorError, match="label 'z': column not found"):
        infer_schema(df, label="z", source="site.csv")


def test_infer_schema_on_the_cleveland_heart_disease_file(tmp_path):
    if not HEART.is_file():
        pytest.skip(f"shared data not found at {HEART}")
    raw = pd.read_csv(HEART, header=None, names=HEART_COLUMNS, dtype=str)
    schema = infer_schema(raw, label="num", source=HEART.name)
    assert schema.label.task == "multiclass" and schema.label.classes == ("0", "1", "2", "3", "4")
    kinds = {f.name: f.kind for f in schema.features}
    assert [k for k, v in kinds.items() if v == "boolean"] == ["sex", "fbs", "exang"]
    bounds = {f.name: (f.lower, f.upper) for f in schema.features if f.kind == "numeric"}
    # Cleveland ranges: age 29-77, chol 126-564, oldpeak 0-6.2 (rounded outward by hand).
    assert bounds["age"] == (29, 77) and bounds["chol"] == (120, 570)
    assert bounds["oldpeak"] == (0, 6.2)

    binary = raw.assign(num=(raw["num"].astype(int) > 0).astype(int).astype(str))
    schema = infer_schema(binary, label="num", source=HEART.name)
    assert schema.label.positive == ("1",) and schema.num_outputs == 1
    path = tmp_path / "cleveland.csv"
    binary.to_csv(path, index=False)
    clean, problems = validate(read_table(path), schema, source=str(path))
    assert {(p.column, p.severity, p.rows) for p in problems} == {("ca", "warning", 4),
                                                                  ("thal", "warning", 2)}
    assert len(clean) == 297  # FLamby keeps 303 because it drops ca and thal first
