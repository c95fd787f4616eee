"""Encoding depends on the schema alone: identical at every site, [-1, 1] at the bounds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from candor.common.encoding import Encoder
from candor.common.schema import Schema
from candor.common.validation import read_table, validate

SCHEMA = Schema.from_dict({
    "label": {"name": "y", "task": "binary", "positive": ["yes"], "negative": ["no"]},
    "features": [
        {"name": "age", "kind": "numeric", "lower": 20, "upper": 80},
        {"name": "cp", "kind": "categorical", "levels": [1, 2, 3, 4]},
        {"name": "smoker", "kind": "boolean"},
        {"name": "bp", "kind": "numeric", "lower": 50, "upper": 250, "missing": "indicator"},
    ],
})
SHARED = pd.DataFrame({  # the same patients, recorded at both sites
    "age": ["20", "80", "50", "35"],
    "cp": ["1", "4", "2.0", "3"],
    "smoker": ["yes", "no", "TRUE", "0"],
    "bp": ["50", "250", "", "150"],
    "y": ["yes", "no", "no", "yes"],
})


def site_file(tmp_path, name, rng, age, cp_levels, y_values):
    """The shared records hidden among 300 rows drawn from a site-specific distribution."""
    n = 300
    local = pd.DataFrame({
        "age": rng.uniform(*age, n).round(1).astype(str),
        "cp": rng.choice(cp_levels, n).astype(str),
        "smoker": rng.choice(["yes", "no"], n),
        "bp": rng.uniform(60, 240, n).round().astype(str),
        "y": rng.choice(y_values, n),
    })
    frame = pd.concat([local.iloc[:150], SHARED, local.iloc[150:]], ignore_index=True)
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def encode_file(path):
    clean, problems = validate(read_table(path), SCHEMA, source=str(path))
    assert not [p for p in problems if p.severity == "error"]
    return Encoder(SCHEMA).encode(clean)


def test_same_records_encode_identically_at_sites_with_different_distributions(tmp_path):
    rng = np.random.default_rng(0)
    young = site_file(tmp_path, "young.csv", rng, (20, 35), [1, 2], ["yes"])
    old = site_file(tmp_path, "old.csv", rng, (60, 80), [3, 4], ["yes", "no"])
    (xa, ya), (xb, yb) = encode_file(young), encode_file(old)
    rows = slice(150, 150 + len(SHARED))
    np.testing.assert_array_equal(xa[rows], xb[rows])
    np.testing.assert_array_equal(ya[rows], yb[rows])
    assert not np.array_equal(xa.mean(axis=0), xb.mean(axis=0))  # the sites do differ


def test_shared_records_have_the_values_computed_by_hand(tmp_path):
    clean, _ = validate(SHARED, SCHEMA, source="shared")
    x, y = Encoder(SCHEMA).encode(clean)
    #                 age    cp=1 cp=2 cp=3 cp=4 smoker bp   bp__missing
    expected = [[-1.0,   1, 0, 0, 0, 1, -1.0, 0],
                [1.0,    0, 0, 0, 1, 0, 1.0, 0],
                [0.0,    0, 1, 0, 0, 1, -1.0, 1],   # bp missing: imputed at lower = 50
                [-0.5,   0, 0, 1, 0, 0, 0.0, 0]]
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert x.dtype == np.float32 and x.shape == (4, 8)
    assert y.dtype == np.float32 and y.tolist() == [1, 0, 0, 1]


def test_layout_names_and_groups():
    encoder = Encoder(SCHEMA)
    assert encoder.feature_names == ["age", "cp=1", "cp=2", "cp=3", "cp=4", "smoker", "bp",
                                     "bp__missing"]
    assert encoder.groups == {"age": [0], "cp": [1, 2, 3, 4], "smoker": [5], "bp": [6, 7]}
    assert encoder.num_features == 8


def test_one_hot_covers_levels_absent_from_a_site():
    site = pd.DataFrame({"age": [30.0, 40.0], "cp": ["1", "1"], "smoker": [1.0, 0.0],
                         "bp": [100.0, 120.0], "bp__missing": [0.0, 0.0], "y": ["no", "yes"]})
    x = Encoder(SCHEMA).transform(site)
    assert x.shape == (2, 8)
    np.testing.assert_array_equal(x[:, 1:5], [[1, 0, 0, 0], [1, 0, 0, 0]])


def test_multiclass_label_is_the_class_index():
    data = SCHEMA.to_dict()
    data["label"] = {"name": "y", "task": "multiclass", "classes": ["low", "mid", "high"]}
    encoder = Encoder(Schema.from_dict(data))
    y = encoder.transform_label(pd.DataFrame({"y": ["high", "low", " mid ", "high"]}))
    assert y.dtype == np.int64 and y.tolist() == [2, 0, 1, 2]


def test_unvalidated_frames_are_refused():
    encoder = Encoder(SCHEMA)
    with pytest.raises(ValueError, match="column 'cp' is not in the frame"):
        encoder.transform(pd.DataFrame({"age": [30.0]}))
    with pytest.raises(ValueError, match="column 'smoker' must hold numbers"):
        encoder.transform(SHARED.drop(columns="y"))
    with pytest.raises(ValueError, match="not levels"):
        encoder.transform(pd.DataFrame({"age": [30.0], "cp": ["7"], "smoker": [1.0],
                                        "bp": [60.0], "bp__missing": [0.0]}))
    with pytest.raises(ValueError, match="outside the schema"):
        encoder.transform_label(pd.DataFrame({"y": ["maybe"]}))
    with pytest.raises(ValueError, match="numeric feature"):
        encoder.decode_value("cp", 0.0)


@given(st.floats(min_value=20, max_value=80))
def test_numeric_encoding_is_within_unit_range_and_decodes_back(age):
    frame = pd.DataFrame({"age": [age], "cp": ["1"], "smoker": [0.0], "bp": [50.0],
                          "bp__missing": [0.0]})
    encoder = Encoder(SCHEMA)
    value = float(encoder.transform(frame)[0, 0])
    assert -1.0 <= value <= 1.0
    assert encoder.decode_value("age", value) == pytest.approx(age, abs=1e-4)
