"""A site's data, from files to tensors: validate against the schema, encode with the
schema alone, split into training and held-out rows. One copy, used by the ClientApp,
the pooled baseline and the benchmarks."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .encoding import Encoder
from .schema import Schema
from .training import TensorSplit
from .validation import load_table


@dataclass(frozen=True)
class SiteData:
    """One site's encoded training and held-out splits."""

    train: TensorSplit
    test: TensorSplit
    feature_names: tuple[str, ...]


def stable_seed(*parts: object) -> int:
    """A 31-bit seed that is the same in every process for the same parts."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def split_frame(df: pd.DataFrame, *, label: str, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shuffle and split; stratified on ``label`` when every class has >= 2 rows."""
    from sklearn.model_selection import train_test_split

    counts = df[label].value_counts()
    stratify = df[label] if len(counts) > 1 and counts.min() >= 2 else None
    train, test = train_test_split(df, test_size=test_fraction, random_state=seed % (2**32), shuffle=True, stratify=stratify)
    return train, test


def to_tensors(df: pd.DataFrame, encoder: Encoder) -> TensorSplit:
    x, y = encoder.encode(df)
    return TensorSplit(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(y)))


def load_site(
    schema: Schema,
    data_path: str,
    *,
    test_path: str | None = None,
    test_fraction: float,
    seed: int,
    min_rows: int,
) -> SiteData:
    """Validate, split and encode a site's data.

    With ``test_path`` the site's held-out rows come from that file; otherwise
    ``test_fraction`` of ``data_path`` is held out (stratified, seeded by ``seed``).

    Raises:
        DataValidationError: the data break the schema (every problem listed).
    """
    encoder = Encoder(schema)
    frame = load_table(data_path, schema, min_rows=min_rows)
    if test_path:
        train_df, test_df = frame, load_table(test_path, schema, min_rows=1)
    else:
        train_df, test_df = split_frame(frame, label=schema.label.name, test_fraction=test_fraction, seed=seed)
    return SiteData(to_tensors(train_df, encoder), to_tensors(test_df, encoder), tuple(encoder.feature_names))
