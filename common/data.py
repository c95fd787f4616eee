"""A site's data, from files to tensors: validate against the schema, encode with the
schema alone, split into training and held-out rows. One copy, used by the ClientApp,
the pooled baseline and the benchmarks."""

from __future__ import annotations

import hashlib

import importlib
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .encoding import Encoder
from .errors import ConfigError
from .schema import Schema
from .training import TensorSplit
from .validation import load_table


@dataclass(frozen=True)
class SiteData:
    """One site's encoded training and held-out splits.

    ``split`` describes how a record's split was decided, for the accountant's parallel
    composition (``common.privacy``): ``"hash:KEY:FRACTION"`` (each record by a hash of
    its own values, :func:`record_split`) or ``"files"`` (the file it is in): either way
    by the record alone. ``""`` (a plug-in loader's split): not known to be, so every
    release is composed with every other.
    """

    train: TensorSplit
    test: TensorSplit
    feature_names: tuple[str, ...]
    split: str = ""


def load_plugin_site(spec: str, data_path: str, *, test_path: str | None, test_fraction: float,
                     seed: int) -> SiteData:
    """A site's data from a user's loader ``spec`` = "package.module:function".

    The function is called as ``function(data_path, test_path=..., test_fraction=...,
    seed=...)`` and returns a :class:`SiteData` (or a ``(train, test, feature_names)``
    tuple of two :class:`TensorSplit` and a sequence of names). It replaces validation
    and encoding, so it is responsible for encoding every site identically; the privacy
    machinery (Poisson sampling, clipping, noise, accounting) is unchanged.
    """
    module_name, _, attr = spec.partition(":")
    try:
        loader = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"The 'data-loader' parameter names '{spec}', which cannot be imported ({err}).") from None
    out = loader(data_path, test_path=test_path, test_fraction=test_fraction, seed=seed)
    if isinstance(out, SiteData):
        return out
    try:
        train, test, names = out
        assert isinstance(train, TensorSplit) and isinstance(test, TensorSplit)
    except (TypeError, ValueError, AssertionError):
        raise ConfigError(f"The data loader '{spec}' must return SiteData or (train, test, feature_names) "
                          f"with TensorSplit splits; got {type(out).__name__}.") from None
    return SiteData(train, test, tuple(names))


def stable_seed(*parts: object) -> int:
    """A 31-bit seed that is the same in every process for the same parts."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def record_split(df: pd.DataFrame, *, test_fraction: float, key: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out rows chosen record by record: a row is held out when the SHA-256 of
    ``key`` and its own values, read as a number in [0, 1), is below ``test_fraction``.

    Whether a record is held out depends on that record alone, never on the other rows:
    adding or removing one row moves no other row between the splits. That is what lets
    the accountant compose releases of the training rows and of the held-out rows in
    parallel (a record is in one of them; ``common.privacy.epsilon``). A seeded shuffle
    would not: one row more reshuffles them all.
    """
    text = df.astype(str).agg("\x1f".join, axis=1)
    u = np.array([int.from_bytes(hashlib.sha256(f"{key}\x1e{row}".encode()).digest()[:8], "big") / 2**64
                  for row in text], dtype=float)
    held_out = u < test_fraction
    return df[~held_out], df[held_out]


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

    With ``test_path`` the site's held-out rows come from that file; otherwise about
    ``test_fraction`` of ``data_path`` is held out, record by record (:func:`record_split`,
    keyed by ``seed``).

    Raises:
        DataValidationError: the data break the schema (every problem listed).
    """
    encoder = Encoder(schema)
    frame = load_table(data_path, schema, min_rows=min_rows)
    if test_path:
        train_df, test_df = frame, load_table(test_path, schema, min_rows=1)
        split = "files"
    else:
        train_df, test_df = record_split(frame, test_fraction=test_fraction, key=seed)
        split = f"hash:{seed}:{test_fraction:g}"
    return SiteData(to_tensors(train_df, encoder), to_tensors(test_df, encoder), tuple(encoder.feature_names), split)
