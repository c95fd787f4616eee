"""Schema file format: loading, every rule, round trip and fingerprint."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from candor.common.errors import SchemaError
from candor.common.schema import Feature, Label, Schema, normalise_value, parse_boolean

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schema.md"

VALID = {
    "name": "toy",
    "label": {"name": "y", "task": "binary", "positive": ["yes", 1], "negative": ["no", 0]},
    "features": [
        {"name": "age", "kind": "numeric", "lower": 18, "upper": 90},
        {"name": "bp", "kind": "numeric", "lower": 50, "upper": 250,
         "out_of_bounds": "clip", "missing": "indicator"},
        {"name": "cp", "kind": "categorical", "levels": [1, 2, 3, 4],
         "missing": "impute", "impute": 4},
        {"name": "smoker", "kind": "boolean"},
    ],
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data) if path.suffix == ".toml" else json.dumps(data))
    return path


def _edit(feature: str | None = None, **changes) -> dict:
    """VALID with keys of one feature (or of the label, feature=None) replaced/removed."""
    data = copy.deepcopy(VALID)
    target = data["label"] if feature is None else next(
        f for f in data["features"] if f["name"] == feature)
    for key, value in changes.items():
        if value is ...:
            target.pop(key)
        else:
            target[key] = value
    return data


def test_loads_toml_and_json_to_the_same_schema(tmp_path):
    a = Schema.load(_write(tmp_path / "s.toml", VALID))
    b = Schema.load(_write(tmp_path / "s.json", VALID))
    assert a == b
    assert a.name == "toy" and a.num_outputs == 1
    age, bp, cp, smoker = a.features
    assert (age.lower, age.upper, age.out_of_bounds, age.missing) == (18.0, 90.0, "reject", "drop")
    assert bp.impute == 50.0  # indicator default: the lower bound
    assert cp.levels == ("1", "2", "3", "4") and cp.impute == "4"
    assert smoker.impute is None
    assert a.label.positive == ("yes", "1") and a.label.negative == ("no", "0")


def test_multiclass_outputs():
    data = _edit(task="multiclass", positive=..., negative=..., classes=["a", "b", "c"])
    assert Schema.from_dict(data).num_outputs == 3


def test_is_frozen():
    schema = Schema.from_dict(VALID)
    with pytest.raises(AttributeError):
        schema.features[0].lower = 0  # type: ignore[misc]


# (changes to VALID, substrings the error must contain: feature/label, key, value, rule)
BAD = {
    "lower not below upper": (_edit("age", lower=90, upper=18),
                              ["feature 'age'", "'lower' must be a number below 'upper'",
                               "lower=90", "upper=18"]),
    "lower equal upper": (_edit("age", lower=5, upper=5), ["feature 'age'", "lower=5"]),
    "lower not a number": (_edit("age", lower="zero"), ["feature 'age'", "'lower'", "'zero'"]),
    "upper infinite": (_edit("age", upper=float("inf")), ["feature 'age'", "upper=inf"]),
    "missing upper": (_edit("age", upper=...), ["feature 'age'", "required key 'upper'"]),
    "typo key": (_edit("age", uper=90), ["feature 'age'", "unknown key 'uper'",
                                         "did you mean 'upper'"]),
    "key of another kind": (_edit("age", levels=[1]), ["feature 'age'", "unknown key 'levels'"]),
    "bad kind": (_edit("age", kind="number"), ["feature 'age'", "'kind'", "'number'"]),
    "bad out_of_bounds": (_edit("age", out_of_bounds="wrap"),
                          ["feature 'age'", "'out_of_bounds'", "'wrap'", "'clip'"]),
    "bad missing": (_edit("age", missing="zero"), ["feature 'age'", "'missing'", "'zero'"]),
    "impute with drop": (_edit("age", impute=30),
                         ["feature 'age'", "'impute'", "impute=30", "missing='drop'"]),
    "impute rule without value": (_edit("cp", impute=...),
                                  ["feature 'cp'", "'impute' needs an 'impute' value"]),
    "impute outside bounds": (_edit("bp", impute=300),
                              ["feature 'bp'", "'impute' must be a number within", "300"]),
    "impute not a level": (_edit("cp", impute=7),
                           ["feature 'cp'", "'impute' must be one of the levels", "7"]),
    "impute not boolean": (_edit("smoker", missing="impute", impute="maybe"),
                           ["feature 'smoker'", "'impute' must be a boolean", "'maybe'"]),
    "levels empty": (_edit("cp", levels=[]), ["feature 'cp'", "'levels' must not be empty"]),
    "levels not a list": (_edit("cp", levels="1234"), ["feature 'cp'", "'levels'", "'1234'"]),
    "levels duplicate after normalising": (_edit("cp", levels=[1, "1.0"]),
                                           ["feature 'cp'", "'levels'", "unique", "'1.0'"]),
    "level is a missing token": (_edit("cp", levels=[1, "NA"]),
                                 ["feature 'cp'", "'levels'", "'NA'", "missing"]),
    "reserved name": (_edit("smoker", name="bp__missing"),
                      ["feature 'bp__missing'", "'name'", "__missing"]),
    "label bad task": (_edit(task="regression"), ["label 'y'", "'task'", "'regression'"]),
    "label positive and negative overlap": (_edit(negative=["no", "1.0"]),
                                            ["label 'y'", "'positive' and 'negative'", "'1'"]),
    "label positive empty": (_edit(positive=[]), ["label 'y'", "'positive' must not be empty"]),
    "label negative absent": (_edit(negative=...), ["label 'y'", "required key 'negative'"]),
    "label classes on binary": (_edit(classes=["a", "b"]), ["label 'y'", "unknown key 'classes'"]),
    "multiclass with one class": (_edit(task="multiclass", positive=..., negative=...,
                                        classes=["a"]),
                                  ["label 'y'", "'classes'", "at least 2", "['a']"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_broken_rule_names_file_item_key_value_and_rule(tmp_path, case):
    data, expected = BAD[case]
    path = _write(tmp_path / "schema.toml", data)
    with pytest.raises(SchemaError) as info:
        Schema.load(path)
    message = str(info.value)
    assert message.startswith("schema.toml: "), message
    for text in expected:
        assert text in message, (text, message)


def test_duplicate_feature(tmp_path):
    data = copy.deepcopy(VALID)
    data["features"].append({"name": "age", "kind": "boolean"})
    with pytest.raises(SchemaError, match=r"schema.toml: feature 'age': 'name' is listed twice"):
        Schema.load(_write(tmp_path / "schema.toml", data))


def test_label_also_a_feature(tmp_path):
    data = copy.deepcopy(VALID)
    data["features"].append({"name": "y", "kind": "boolean"})
    with pytest.raises(SchemaError, match=r"schema.toml: label 'y': .*must not also be a feature"):
        Schema.load(_write(tmp_path / "schema.toml", data))


@pytest.mark.parametrize("change, expected", [
    ({"version": 2}, "unknown key 'version'"),
    ({"features": []}, "at least one feature"),
    ({"features": {"name": "a"}}, "'features' must be an array of tables"),
    ({"label": "y"}, "'label' must be a table"),
])
def test_top_level_rules(change, expected):
    data = {**copy.deepcopy(VALID), **change}
    with pytest.raises(SchemaError, match=re.escape(expected)):
        Schema.from_dict(data, source="fed.toml")


def test_missing_label_table():
    data = {k: v for k, v in VALID.items() if k != "label"}
    with pytest.raises(SchemaError, match="fed.json: schema: required key 'label' is missing"):
        Schema.from_dict(data, source="fed.json")


def test_unreadable_files(tmp_path):
    with pytest.raises(SchemaError, match="schema file not found"):
        Schema.load(tmp_path / "absent.toml")
    (tmp_path / "s.yaml").write_text("a: 1")
    with pytest.raises(SchemaError, match=r"must end in \.toml or \.json"):
        Schema.load(tmp_path / "s.yaml")
    (tmp_path / "bad.toml").write_text("[label\nname = 1")
    with pytest.raises(SchemaError, match="bad.toml: not valid TOML"):
        Schema.load(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SchemaError, match="bad.json: not valid JSON"):
        Schema.load(tmp_path / "bad.json")


@pytest.mark.parametrize("name", ["out.toml", "out.json"])
def test_save_load_round_trip_and_stable_fingerprint(tmp_path, name):
    schema = Schema.from_dict(VALID)
    path = tmp_path / name
    path.write_text("old content")  # replaced atomically
    schema.save(path)
    again = Schema.load(path)
    assert again == schema
    assert again.sha256() == schema.sha256()
    assert Schema.from_dict(again.to_dict()) == schema
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_fingerprint_ignores_spelling_but_not_meaning():
    base = Schema.from_dict(VALID).sha256()
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    respelled = _edit("cp", levels=["1.0", " 2", 3.0, 4], impute="4.0")
    respelled["features"][0].update(lower=18.0, out_of_bounds="reject", missing="drop")
    assert Schema.from_dict(respelled).sha256() == base
    assert Schema.from_dict(_edit("age", upper=91)).sha256() != base


def test_direct_construction_validates():
    with pytest.raises(SchemaError, match="'lower' must be a number below 'upper'"):
        Feature(name="x", kind="numeric", lower=1, upper=0)
    with pytest.raises(SchemaError, match="'lower' applies only to numeric"):
        Feature(name="x", kind="boolean", lower=0)
    with pytest.raises(SchemaError, match="'positive' must not be empty"):
        Label(name="y", task="binary", negative=("0",))


def test_docs_examples_are_valid_and_agree():
    text = DOCS.read_text()
    toml_block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    json_block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    import tomllib
    from_toml = Schema.from_dict(tomllib.loads(toml_block), source="docs toml")
    from_json = Schema.from_dict(json.loads(json_block), source="docs json")
    assert from_toml == from_json


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_integers_normalise_the_same_in_every_spelling(n):
    expected = str(n)
    assert normalise_value(n) == normalise_value(f" {n} ") == normalise_value(f"{n}.0") == expected
    assert normalise_value(float(n)) == expected


def test_normalise_keeps_text_and_decimals():
    assert normalise_value(" malignant ") == "malignant"
    assert normalise_value("2.50") == normalise_value(2.5) == "2.5"
    assert normalise_value("Yes") == "Yes"  # case-sensitive


@pytest.mark.parametrize("raw, expected", [
    ("TRUE", True), ("yes", True), ("1", True), (1.0, True), ("No", False), (" 0 ", False),
    ("false", False), ("maybe", None), ("2", None), ("", None),
])
def test_parse_boolean(raw, expected):
    assert parse_boolean(raw) is expected
