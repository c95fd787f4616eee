"""The validator on real files: every finding names file, column, rows, rule, action."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from candor.common.errors import DataValidationError
from candor.common.schema import Schema
from candor.common.validation import load_table, read_table, validate

SCHEMA = Schema.from_dict({
    "label": {"name": "y", "task": "binary", "positive": ["yes", 1], "negative": ["no", 0]},
    "features": [
        {"name": "age", "kind": "numeric", "lower": 18, "upper": 90},
        {"name": "bp", "kind": "numeric", "lower": 50, "upper": 250,
         "out_of_bounds": "clip", "missing": "indicator"},
        {"name": "cp", "kind": "categorical", "levels": [1, 2, 3, 4],
         "missing": "impute", "impute": 4},
        {"name": "smoker", "kind": "boolean"},
    ],
})
COLUMNS = ["age", "bp", "cp", "smoker", "y"]
GOOD_ROWS = 10


def good_rows(n: int = GOOD_ROWS) -> list[dict[str, str]]:
    return [{"age": str(30 + i), "bp": str(110 + i), "cp": str(1 + i % 4),
             "smoker": ["yes", "No", "1", "FALSE"][i % 4], "y": ["yes", "no", "1", "0"][i % 4]}
            for i in range(n)]


def write_csv(path, rows, columns=COLUMNS, sep=","):
    lines = [sep.join(columns)] + [sep.join(r.get(c, "") for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(path, schema=SCHEMA, min_rows=1):
    return validate(read_table(path), schema, source=str(path), min_rows=min_rows)


def test_good_file_gives_clean_frame_and_no_problems(tmp_path):
    clean, problems = run(write_csv(tmp_path / "site.csv", good_rows()))
    assert problems == []
    assert list(clean.columns) == ["age", "bp", "bp__missing", "cp", "smoker", "y"]
    assert len(clean) == GOOD_ROWS
    for column in ["age", "bp", "bp__missing", "smoker"]:
        assert clean[column].dtype == np.float64
    assert clean["smoker"].tolist()[:4] == [1.0, 0.0, 1.0, 0.0]
    assert clean["cp"].tolist()[:4] == ["1", "2", "3", "4"]
    assert clean["y"].tolist()[:4] == ["yes", "no", "1", "0"]  # raw label kept


# column, injected values, rows affected, examples, severity, part of the rule
BAD_VALUES = {
    "non-numeric": ("age", ["abc", "4O", "abc"], 3, ("abc", "4O"), "error", "finite numbers"),
    "infinite": ("age", ["inf"], 1, ("inf",), "error", "finite numbers"),
    "out of bounds, reject": ("age", ["17", "91", "200", "150"], 4, ("17", "91", "200"),
                              "error", "within the schema bounds [18, 90]"),
    "out of bounds, clip": ("bp", ["300", "10"], 2, ("300", "10"), "warning",
                            "were clipped to them"),
    "unknown category": ("cp", ["5", "x"], 2, ("5", "x"), "error",
                         "one of the schema levels ['1', '2', '3', '4']"),
    "invalid boolean": ("smoker", ["maybe"], 1, ("maybe",), "error", "values must be boolean"),
    "missing, drop": ("age", ["", "?", "NA"], 3, ("", "?", "NA"), "warning",
                      "these rows are dropped (missing = 'drop')"),
    "missing, impute": ("cp", [""], 1, ("",), "warning", "imputed with '4'"),
    "missing, indicator": ("bp", ["", "n/a"], 2, ("", "n/a"), "warning",
                           "flagged in 'bp__missing'"),
    "label outside task": ("y", ["maybe", "2"], 2, ("maybe", "2"), "error",
                           "positive ['yes', '1'] or negative ['no', '0']"),
    "missing label": ("y", ["", "?"], 2, ("", "?"), "error", "the label is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_each_bad_value_is_reported_once_with_everything_needed(tmp_path, case):
    column, values, rows, examples, severity, rule = BAD_VALUES[case]
    bad = [{**good_rows(1)[0], column: v} for v in values]
    path = write_csv(tmp_path / "site.csv", good_rows() + bad)
    clean, problems = run(path)

    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert (problem.file, problem.column, problem.rows) == (str(path), column, rows)
    assert problem.examples == examples
    assert problem.severity == severity
    assert rule in problem.rule
    assert problem.action and problem.action in str(problem) and problem.rule in str(problem)
    kept = GOOD_ROWS + (rows if severity == "warning" and "dropped" not in rule else 0)
    assert len(clean) == kept


def test_clip_impute_and_indicator_values(tmp_path):
    base = good_rows(1)[0]
    rows = good_rows() + [{**base, "bp": "300"}, {**base, "bp": ""}, {**base, "cp": "?"}]
    clean, _ = run(write_csv(tmp_path / "site.csv", rows))
    tail = clean.tail(3)
    assert tail["bp"].tolist() == [250.0, 50.0, float(base["bp"])]
    assert tail["bp__missing"].tolist() == [0.0, 1.0, 0.0]
    assert tail["cp"].tolist() == [base["cp"], base["cp"], "4"]


def test_missing_column_is_an_error_with_a_rename_hint(tmp_path):
    columns = ["Age", "bp", "cp", "smoker", "y"]
    rows = [{("Age" if k == "age" else k): v for k, v in r.items()} for r in good_rows()]
    path = write_csv(tmp_path / "site.csv", rows, columns)
    clean, problems = run(path)
    by_column = {p.column: p for p in problems}
    missing = by_column["age"]
    assert (missing.file, missing.rows, missing.severity) == (str(path), GOOD_ROWS, "error")
    assert "missing" in missing.rule and "rename it" in missing.action and "'Age'" in missing.action
    assert by_column["Age"].severity == "warning"
    assert clean.empty and list(clean.columns) == ["age", "bp", "bp__missing", "cp", "smoker", "y"]


def test_unknown_column_is_a_warning_and_ignored(tmp_path):
    rows = [{**r, "zip": "12345"} for r in good_rows()]
    path = write_csv(tmp_path / "site.csv", rows, COLUMNS + ["zip"])
    clean, problems = run(path)
    [problem] = problems
    assert (problem.file, problem.column, problem.severity) == (str(path), "zip", "warning")
    assert "not in the schema and is ignored" in problem.rule and problem.action
    assert "zip" not in clean.columns and len(clean) == GOOD_ROWS


def test_too_few_usable_rows_says_how_many_and_how_many_are_needed(tmp_path):
    rows = good_rows() + [{**good_rows(1)[0], "age": ""}] * 5
    path = write_csv(tmp_path / "site.csv", rows)
    _, problems = run(path, min_rows=20)
    [short] = [p for p in problems if p.severity == "error"]
    assert (short.file, short.column) == (str(path), None)
    assert f"only {GOOD_ROWS} usable rows" in short.rule and "at least 20" in short.rule
    assert short.action


def test_single_label_class_is_a_warning(tmp_path):
    rows = [{**r, "y": "yes"} for r in good_rows()]
    path = write_csv(tmp_path / "site.csv", rows)
    _, problems = run(path)
    [problem] = problems
    assert (problem.file, problem.column, problem.rows, problem.severity) == (
        str(path), "y", GOOD_ROWS, "warning")
    assert "only one label class" in problem.rule and problem.action


def test_multiclass_label_outside_classes(tmp_path):
    data = SCHEMA.to_dict()
    data["label"] = {"name": "y", "task": "multiclass", "classes": ["yes", "no", "1", "0"]}
    rows = good_rows() + [{**good_rows(1)[0], "y": "2"}]
    _, problems = run(write_csv(tmp_path / "site.csv", rows), Schema.from_dict(data))
    [problem] = problems
    assert problem.column == "y" and problem.rows == 1 and "one of the classes" in problem.rule


@pytest.mark.parametrize("name, content, rule", [
    ("absent.csv", None, "file not found"),
    ("site.xlsx", b"PK\x03\x04", "unsupported file type '.xlsx'"),
    ("empty.csv", b"", "the file is empty"),
    ("header.csv", b"age,bp,cp,smoker,y\n", "no data rows"),
    ("latin1.csv", "age,bp,cp,smoker,y\n40,120,2,no,né\n".encode("latin-1"), "cannot read"),
    ("broken.parquet", b"not parquet at all", "cannot read the file as Parquet"),
    ("a-folder", "dir", "is a directory, not a data file"),
    ("folder.csv", "dir", "is a directory, not a data file"),
])
def test_unreadable_files_give_one_problem(tmp_path, name, content, rule):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataValidationError) as info:
        read_table(path)
    [problem] = info.value.problems
    assert (problem.file, problem.column, problem.severity) == (str(path), None, "error")
    assert rule in problem.rule and problem.action


def test_semicolon_csv_and_typed_parquet_validate_like_plain_csv(tmp_path):
    rows = good_rows()
    expected, _ = run(write_csv(tmp_path / "a.csv", rows))
    semicolon, problems = run(write_csv(tmp_path / "b.csv", rows, sep=";"))
    assert problems == []
    pd.testing.assert_frame_equal(semicolon, expected)

    typed = pd.DataFrame(rows).astype({"age": "int64", "bp": "float64"})
    typed.loc[0, "bp"] = np.nan  # a real NaN, not a token
    typed.to_parquet(tmp_path / "c.parquet")
    clean, problems = run(tmp_path / "c.parquet")
    assert [(p.column, p.rows, p.severity) for p in problems] == [("bp", 1, "warning")]
    pd.testing.assert_frame_equal(clean.drop(index=0), expected.drop(index=0), check_dtype=False)


def test_load_table_raises_with_every_problem_and_logs_warnings(tmp_path, caplog):
    base = good_rows(1)[0]
    bad = good_rows() + [{**base, "age": "abc"}, {**base, "cp": "9"}, {**base, "bp": ""}]
    with pytest.raises(DataValidationError) as info:
        load_table(write_csv(tmp_path / "bad.csv", bad), SCHEMA)
    found = sorted((p.column, p.severity) for p in info.value.problems)
    assert found == [("age", "error"), ("bp", "warning"), ("cp", "error")]
    assert "2 problems in the data" in str(info.value)

    warn = good_rows() + [{**base, "bp": ""}]
    with caplog.at_level(logging.WARNING, logger="candor.common.validation"):
        clean = load_table(write_csv(tmp_path / "warn.csv", warn), SCHEMA)
    assert len(clean) == GOOD_ROWS + 1
    assert "bp__missing" in caplog.text
