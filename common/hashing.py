"""Content hashes that the coordinator and the sites compute identically.

``hash_arrays`` fingerprints a model or an update independently of how it travelled
(Flower ``ArrayRecord``, torch state dict, or numpy arrays): SHA-256 over, for each
array in order of its key (sorted by Unicode code point),

    header + b"\\n" + data

where ``header`` is the canonical JSON ``{"dtype":"<f4","key":"0.weight","shape":[64,30]}``
(sorted keys, no spaces; ``dtype`` is numpy's ``dtype.str``, always little-endian) and
``data`` is the array's raw little-endian bytes in C order. Any language can
reproduce it: the header fixes the length of the data that follows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["canonical_json", "hash_arrays", "sha256_file"]


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text, no NaN: one text per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _numpy(value: Any) -> np.ndarray:
    """A Flower ``Array``, torch tensor or array-like as a numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    if array.dtype.hasobject:
        raise ValueError("hash_arrays: object arrays have no canonical bytes")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def hash_arrays(arrays: Mapping[str, Any]) -> str:
    """Hex SHA-256 of ``arrays`` (an ``ArrayRecord`` or ``dict[str, ndarray | Tensor]``)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = _numpy(arrays[key])
        header = canonical_json({"dtype": array.dtype.str, "key": key, "shape": list(array.shape)})
        digest.update(header.encode("utf-8") + b"\n")
        digest.update(array.tobytes(order="C"))
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
