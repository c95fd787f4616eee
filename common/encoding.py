"""Schema -> arrays, identical at every site.

The encoding is a function of the schema alone, never of any site's data, so every
site produces the same columns with the same meaning and no statistics leak:

* numeric ``x`` with public bounds ``[lower, upper]``:
  ``(x - lower) / (upper - lower) * 2 - 1``, i.e. -1 at ``lower`` and +1 at ``upper``;
* categorical: one-hot over ALL declared levels (levels absent at a site are
  all-zero columns), named ``<name>=<level>``;
* boolean: 0/1;
* ``missing = "indicator"``: one more 0/1 column ``<name>__missing`` right after the
  feature's own columns, read from the validator's column of the same name.

Input is the clean frame from :func:`common.validation.validate` /
:func:`~common.validation.load_table`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from candor.common.schema import Schema, indicator_column, normalise_value

__all__ = ["Encoder"]


def _codes(column: pd.Series, mapping: dict[str, int]) -> np.ndarray:
    """``mapping[normalise_value(v)]`` for each value of ``column``, -1 where absent."""
    positions, uniques = pd.factorize(column, use_na_sentinel=False)
    lookup = np.array([mapping.get(normalise_value(u), -1) for u in uniques], dtype=np.int64)
    return lookup[positions]


class Encoder:
    """Encodes clean frames for one schema.

    Attributes:
        feature_names: encoded column names, e.g. ``["age", "cp=1", "cp=2", "fbs",
            "fbs__missing"]``.
        groups: original feature name -> indices of its encoded columns (indicator
            included), for reporting attributions per original feature.
        num_features: number of encoded columns ``d``.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._features = {f.name: f for f in schema.features}
        names: list[str] = []
        groups: dict[str, list[int]] = {}
        for feature in schema.features:
            start = len(names)
            if feature.kind == "categorical":
                names += [f"{feature.name}={level}" for level in feature.levels]
            else:
                names.append(feature.name)
            if feature.missing == "indicator":
                names.append(indicator_column(feature.name))
            groups[feature.name] = list(range(start, len(names)))
        self._names = tuple(names)
        self._groups = groups

    @property
    def feature_names(self) -> list[str]:
        return list(self._names)

    @property
    def groups(self) -> dict[str, list[int]]:
        return {name: list(idx) for name, idx in self._groups.items()}

    @property
    def num_features(self) -> int:
        return len(self._names)

    def _column(self, df: pd.DataFrame, name: str) -> pd.Series:
        if name not in df.columns:
            raise ValueError(
                f"encoder: column '{name}' is not in the frame; encode the frame returned "
                "by common.validation.validate or load_table"
            )
        return df[name]

    def _floats(self, df: pd.DataFrame, name: str) -> np.ndarray:
        try:
            return self._column(df, name).to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"encoder: column '{name}' must hold numbers; validate the frame first"
            ) from None

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode the features of a clean frame as float32 of shape ``(N, num_features)``."""
        out = np.zeros((len(df), self.num_features), dtype=np.float32)
        for feature in self.schema.features:
            cols = self._groups[feature.name]
            if feature.kind == "numeric":
                x = self._floats(df, feature.name)
                out[:, cols[0]] = (x - feature.lower) / (feature.upper - feature.lower) * 2 - 1
            elif feature.kind == "categorical":
                column = self._column(df, feature.name)
                codes = _codes(column, {level: i for i, level in enumerate(feature.levels)})
                if (codes < 0).any():
                    bad = sorted({str(v) for v in column[codes < 0]})[:3]
                    raise ValueError(
                        f"encoder: feature '{feature.name}' has values that are not levels "
                        f"of the schema ({bad}); validate the frame first"
                    )
                out[np.arange(len(df)), np.asarray(cols)[codes]] = 1.0
            else:
                out[:, cols[0]] = self._floats(df, feature.name)
            if feature.missing == "indicator":
                out[:, cols[-1]] = self._floats(df, indicator_column(feature.name))
        if np.isnan(out).any():
            raise ValueError("encoder: the frame has missing values; validate it first")
        return out

    def transform_label(self, df: pd.DataFrame) -> np.ndarray:
        """Binary: float32 0/1 of shape ``(N,)``; multiclass: int64 class index ``(N,)``."""
        label = self.schema.label
        column = self._column(df, label.name)
        if label.task == "binary":
            mapping = {v: 1 for v in label.positive} | {v: 0 for v in label.negative}
            dtype = np.float32
        else:
            mapping = {v: i for i, v in enumerate(label.classes)}
            dtype = np.int64
        codes = _codes(column, mapping)
        if (codes < 0).any():
            bad = sorted({str(v) for v in column[codes < 0]})[:3]
            raise ValueError(
                f"encoder: label '{label.name}' has values outside the schema ({bad}); "
                "validate the frame first"
            )
        return codes.astype(dtype)

    def encode(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(transform(df), transform_label(df))``."""
        return self.transform(df), self.transform_label(df)

    def decode_value(self, feature: str, x: float | np.ndarray) -> float | np.ndarray:
        """Map an encoded numeric value (-1 .. 1 within bounds) back to the feature's units."""
        spec = self._features.get(feature)
        if spec is None or spec.kind != "numeric":
            raise ValueError(
                f"encoder: decode_value needs a numeric feature of the schema (got '{feature}')"
            )
        return spec.lower + (x + 1) / 2 * (spec.upper - spec.lower)
