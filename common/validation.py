"""Check a site's table against the federation's schema and clean it.

:func:`read_table` reads CSV (every cell as text, so the validator sees raw values;
the delimiter ``,`` ``;`` tab or ``|`` is detected from the header line) or Parquet.
:func:`validate` returns the clean frame and every finding as a
:class:`~common.errors.Problem`; :func:`load_table` does both and raises
:class:`~common.errors.DataValidationError` if any finding is an error.

The clean frame holds only schema columns, in this order: each feature in schema
order (numeric: float64 in the column's units, clipped if the schema says so;
categorical: the normalised level string; boolean: float64 0/1), directly followed
by ``<name>__missing`` (float64 0/1, 1 where the value was missing and imputed) for a
feature with ``missing = "indicator"``; then the label as the raw stripped string.
Rows with a missing value under ``missing = "drop"`` are removed; so are rows with
an invalid value, which are also reported as errors.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from candor.common.errors import DataValidationError, Problem
from candor.common.schema import (
    Feature,
    Schema,
    indicator_column,
    is_missing,
    normalise_value,
    parse_boolean,
)

__all__ = ["load_table", "read_table", "validate"]

logger = logging.getLogger(__name__)

_MAX_EXAMPLES = 3
_DELIMITERS = ",;\t|"


def _fail(path: Path, rule: str, action: str) -> DataValidationError:
    return DataValidationError([Problem(file=str(path), column=None, rule=rule, action=action)])


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``.csv`` (all cells as strings, header names stripped) or ``.parquet`` file.

    Raises:
        DataValidationError: with one problem if the file is missing, unreadable, not
            CSV/Parquet, or has no data rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise _fail(path, "is a directory, not a data file",
                    "Give the .csv or .parquet file itself (e.g. --data DIR/site.csv).")
    if suffix not in (".csv", ".parquet"):
        raise _fail(path, f"unsupported file type '{suffix or '(none)'}'",
                    "Provide the data as a .csv or .parquet file.")
    if not path.is_file():
        raise _fail(path, "file not found", "Check the path to the data file.")
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                header = handle.readline()
            try:
                sep = csv.Sniffer().sniff(header, delimiters=_DELIMITERS).delimiter
            except csv.Error:
                sep = ","
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                             encoding="utf-8-sig", skipinitialspace=True)
            df.columns = [str(c).strip() for c in df.columns]
    except pd.errors.EmptyDataError:
        raise _fail(path, "the file is empty",
                    "Export the table with a header row and data.") from None
    except (OSError, ValueError, NotImplementedError) as err:
        kind = "Parquet" if suffix == ".parquet" else "UTF-8 CSV"
        raise _fail(path, f"cannot read the file as {kind} ({type(err).__name__}: {err})",
                    f"Check that the file is a valid {kind} file.") from None
    if len(df) == 0:
        raise _fail(path, "the file has no data rows", "Export the table with its data rows.")
    return df


def _per_value(series: pd.Series, func: Callable[[Any], Any], na_result: Any) -> np.ndarray:
    """``func`` applied to each distinct value of ``series`` (NaN/None give ``na_result``)."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    results = np.empty(len(uniques) + 1, dtype=object)
    results[:-1] = [func(u) for u in uniques]
    results[-1] = na_result
    return results[codes]  # code -1 picks na_result


def _examples(series: pd.Series, mask: np.ndarray) -> tuple[str, ...]:
    return tuple(str(v) for v in pd.unique(series[mask])[:_MAX_EXAMPLES])


def _to_float(value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        return np.nan
    return number if np.isfinite(number) else np.nan


class _Findings:
    """Collects problems for one file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def add(self, column: str | None, rule: str, action: str, *, severity: str = "error",
            series: pd.Series | None = None, mask: np.ndarray | None = None, rows: int = 0) -> None:
        if mask is not None:
            rows = int(mask.sum())
            if rows == 0:
                return
        examples = _examples(series, mask) if series is not None and mask is not None else ()
        self.problems.append(Problem(file=self.source, column=column, rule=rule, rows=rows,
                                     examples=examples, action=action, severity=severity))


def _clean_feature(series: pd.Series, feature: Feature, found: _Findings
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (values, missing mask, invalid mask) for one feature column."""
    name = feature.name
    missing = _per_value(series, is_missing, True).astype(bool)
    if feature.kind == "numeric":
        values = _per_value(series, _to_float, np.nan).astype(np.float64)
        invalid = ~missing & np.isnan(values)
        found.add(name, "values must be finite numbers",
                  "Correct these cells or remove the rows; leave a cell empty if the "
                  "value is unknown.", series=series, mask=invalid)
        outside = ~missing & ~invalid & ((values < feature.lower) | (values > feature.upper))
        bounds = f"[{feature.lower:g}, {feature.upper:g}]"
        if feature.out_of_bounds == "clip":
            found.add(name, f"values outside the schema bounds {bounds} were clipped to them "
                      "(out_of_bounds = 'clip')", "Check that these are not entry errors.",
                      severity="warning", series=series, mask=outside)
            values = np.clip(values, feature.lower, feature.upper)
        else:
            found.add(name, f"values must lie within the schema bounds {bounds} "
                      "(out_of_bounds = 'reject')",
                      "Correct these values or remove the rows; if they are genuine, ask the "
                      "federation to widen the bounds or to set out_of_bounds = 'clip'.",
                      series=series, mask=outside)
            invalid |= outside
    elif feature.kind == "categorical":
        values = _per_value(series, normalise_value, "")
        invalid = ~missing & ~np.isin(values, list(feature.levels))
        found.add(name, f"values must be one of the schema levels {list(feature.levels)}",
                  "Map these values to a declared level, or ask the federation to add the "
                  "level to the schema.", series=series, mask=invalid)
    else:
        parsed = _per_value(series, parse_boolean, None)
        invalid = ~missing & np.array([p is None for p in parsed], dtype=bool)
        values = np.array([np.nan if p is None else float(p) for p in parsed], dtype=np.float64)
        found.add(name, "values must be boolean: true/false, 1/0 or yes/no (any case)",
                  "Correct these cells or remove the rows.", series=series, mask=invalid)

    if feature.missing == "drop":
        found.add(name, "missing values; these rows are dropped (missing = 'drop')",
                  "Fill them in if you can; otherwise no action is needed.",
                  severity="warning", series=series, mask=missing)
    else:
        fill = feature.impute if feature.kind != "boolean" else float(feature.impute)
        indicator = feature.missing == "indicator"
        flag = f" and flagged in '{indicator_column(name)}'" if indicator else ""
        found.add(name, f"missing values; imputed with {feature.impute!r}{flag} "
                  f"(missing = '{feature.missing}')",
                  "Fill them in if you can; otherwise no action is needed.",
                  severity="warning", series=series, mask=missing)
        values = values.copy()
        values[missing] = fill
    return values, missing, invalid


def _clean_label(series: pd.Series, schema: Schema, found: _Findings
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Return (raw stripped label strings, unusable mask)."""
    label = schema.label
    missing = _per_value(series, is_missing, True).astype(bool)
    found.add(label.name, "the label is missing; these rows cannot be used",
              "Fill in the label or remove these rows.", series=series, mask=missing)
    invalid = ~missing & ~np.isin(_per_value(series, normalise_value, ""), list(label.allowed))
    if label.task == "binary":
        rule = (f"label values must be one of positive {list(label.positive)} or "
                f"negative {list(label.negative)}")
    else:
        rule = f"label values must be one of the classes {list(label.classes)}"
    found.add(label.name, rule, "Map these values to a declared label value, or remove the rows.",
              series=series, mask=invalid)
    raw = _per_value(series, lambda v: str(v).strip(), "")
    return raw, missing | invalid


def _clean_columns(schema: Schema) -> list[str]:
    columns = []
    for feature in schema.features:
        columns.append(feature.name)
        if feature.missing == "indicator":
            columns.append(indicator_column(feature.name))
    return columns + [schema.label.name]


def validate(df: pd.DataFrame, schema: Schema, *, source: str, min_rows: int = 1
             ) -> tuple[pd.DataFrame, list[Problem]]:
    """Check ``df`` against ``schema`` and return the clean frame and every finding.

    Args:
        df: the table as read by :func:`read_table` (raw strings or typed Parquet values).
        schema: the federation's schema.
        source: file name used in every problem.
        min_rows: usable rows (after cleaning) the site needs, e.g. for DP training; >= 0.

    Returns:
        ``(clean, problems)``. ``clean`` is laid out as described in the module
        docstring; it is empty (with the schema's columns) when a column is missing.
        Rows with any error are excluded from it. ``problems`` includes warnings.
    """
    found = _Findings(source)
    df = df.rename(columns=str)
    label = schema.label
    expected = [f.name for f in schema.features] + [label.name]
    for column in df.columns:
        if column not in expected:
            found.add(column, "column is not in the schema and is ignored",
                      "Remove it, or ask the federation to add it to the schema.",
                      severity="warning")
    absent = [name for name in expected if name not in df.columns]
    for name in absent:
        close = difflib.get_close_matches(name, [c for c in df.columns if c not in expected], n=1)
        hint = f"; the file has '{close[0]}': rename it" if close else ""
        found.add(name, "column required by the schema is missing", f"Add the column{hint}.",
                  rows=len(df))

    out: dict[str, np.ndarray] = {}
    unusable = np.zeros(len(df), dtype=bool)
    for feature in schema.features:
        if feature.name not in df.columns:
            continue
        values, missing, invalid = _clean_feature(df[feature.name], feature, found)
        out[feature.name] = values
        if feature.missing == "indicator":
            out[indicator_column(feature.name)] = missing.astype(np.float64)
        unusable |= invalid
        if feature.missing == "drop":
            unusable |= missing
    if label.name in df.columns:
        out[label.name], bad_label = _clean_label(df[label.name], schema, found)
        unusable |= bad_label

    if absent:
        return pd.DataFrame(columns=_clean_columns(schema)), found.problems
    clean = pd.DataFrame(out, columns=_clean_columns(schema))[~unusable].reset_index(drop=True)
    if len(clean) < min_rows:
        found.add(None, f"only {len(clean)} usable rows after cleaning, but DP training needs at "
                  f"least {min_rows}", "Add rows, or fix the problems above that remove rows.")
    if label.task == "binary" and len(clean):
        positive = np.isin(_per_value(clean[label.name], normalise_value, ""), list(label.positive))
        if positive.all() or not positive.any():
            only = "positive" if positive.all() else "negative"
            found.add(label.name, f"only one label class is present (all {len(clean)} usable rows "
                      f"are {only})", "Check the label column; training still works, but local "
                      "metrics such as AUC are undefined at this site.", severity="warning",
                      rows=len(clean))
    return clean, found.problems


def load_table(path: str | os.PathLike, schema: Schema, *, min_rows: int = 1) -> pd.DataFrame:
    """Read and validate a data file; log warnings and return the clean frame.

    Raises:
        DataValidationError: listing every problem (warnings too) if any is an error.
    """
    clean, problems = validate(read_table(path), schema, source=str(path), min_rows=min_rows)
    if any(p.severity == "error" for p in problems):
        raise DataValidationError(problems)
    for problem in problems:
        logger.warning("%s", problem)
    return clean
