"""Draft a schema from a table, for simulations and as a starting point for a federation.

The draft discloses the table it was inferred from; see :data:`INFER_WARNING`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from candor.common.errors import SchemaError
from candor.common.schema import Feature, Label, Schema, is_missing, normalise_value, parse_boolean

__all__ = ["INFER_WARNING", "infer_schema"]

logger = logging.getLogger(__name__)

INFER_WARNING = (
    "This schema was inferred from one site's data: its bounds are that data's minimum "
    "and maximum (rounded) and its levels are the categories that occur there, so it "
    "discloses that data. Replace them with public domain bounds and levels before the "
    "schema is shared or used for training."
)
MAX_LEVELS = 20


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _nice_bounds(lo: float, hi: float) -> tuple[float, float]:
    """``[lo, hi]`` rounded outward on a grid of 2 significant figures of max(|lo|, |hi|)."""
    magnitude = max(abs(lo), abs(hi))
    exponent = math.floor(math.log10(magnitude)) - 1 if magnitude > 0 else 0
    step = 10.0 ** exponent
    lower = math.floor(lo / step + 1e-9) * step
    upper = math.ceil(hi / step - 1e-9) * step
    if upper <= lower:  # constant column
        upper = lower + step
    digits = max(0, -exponent)
    return round(lower, digits), round(upper, digits)


def _sorted(values: set[str]) -> list[str]:
    """Numerically if every value is a number, else as strings."""
    if all(_number(v) is not None for v in values):
        return sorted(values, key=float)
    return sorted(values)


def _distinct(series: pd.Series) -> set[str]:
    return {normalise_value(v) for v in pd.unique(series) if not is_missing(v)}


def _infer_feature(name: str, series: pd.Series) -> Feature | None:
    values = _distinct(series)
    if not values:
        logger.warning("column '%s' has no values; left out of the schema", name)
        return None
    if None not in {parse_boolean(v) for v in values}:
        return Feature(name=name, kind="boolean")
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers):
        lower, upper = _nice_bounds(min(numbers), max(numbers))
        return Feature(name=name, kind="numeric", lower=lower, upper=upper)
    if len(values) <= MAX_LEVELS:
        return Feature(name=name, kind="categorical", levels=tuple(_sorted(values)))
    logger.warning("column '%s' has %d distinct non-numeric values (more than %d); left out "
                   "of the schema", name, len(values), MAX_LEVELS)
    return None


def _infer_label(name: str, series: pd.Series) -> Label:
    values = _sorted(_distinct(series))
    if len(values) == 2:
        truthy = [v for v in values if parse_boolean(v) is True]
        positive = truthy[0] if truthy else values[-1]  # the larger number / last string
        logger.info("label '%s': binary, positive = %r", name, positive)
        return Label(name=name, task="binary", positive=(positive,),
                     negative=tuple(v for v in values if v != positive))
    if 2 < len(values) <= MAX_LEVELS:
        return Label(name=name, task="multiclass", classes=tuple(values))
    raise SchemaError(
        f"label '{name}': a label needs 2 to {MAX_LEVELS} distinct values "
        f"(got {len(values)}: {values[:5]})"
    )


def infer_schema(df: pd.DataFrame, *, label: str, source: str) -> Schema:
    """Draft a schema from ``df``; every missing rule is ``"drop"``.

    Columns whose values all read as booleans (``0/1``, ``yes/no``, ``true/false``,
    any case) become boolean; other all-numeric columns numeric, with bounds
    rounded outward to 2 significant figures; other columns with at most 20 distinct
    values categorical (levels sorted); the rest are left out (logged). The label is
    binary with 2 distinct values (positive: the true-like one, else the larger number
    or the last in sort order), multiclass with 3-20.

    The caller writes the result (``Schema.save``) and must show :data:`INFER_WARNING`.

    Raises:
        SchemaError: naming ``source``, if the label is absent or unusable.
    """
    try:
        if label not in df.columns:
            raise SchemaError(f"label '{label}': column not found (columns: {list(df.columns)})")
        features = [_infer_feature(str(c), df[c]) for c in df.columns if c != label]
        return Schema(features=tuple(f for f in features if f is not None),
                      label=_infer_label(label, df[label]), name=Path(source).stem)
    except SchemaError as err:
        raise SchemaError(f"{source}: {err}") from None
