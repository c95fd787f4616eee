"""The embedded demo: scikit-learn's bundled breast-cancer table and its schema.

The Wisconsin Diagnostic Breast Cancer table ships with scikit-learn, so ``make
simulate`` and a bare ``flwr run .`` need no files and no network. Its schema,
``common/schemas/breast_cancer.toml``, is package data. Only simulated sites use it:
a deployed site always names its own data (``candor-client start --data``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_atomic
from .partition import partition

__all__ = ["DEMO_LABEL", "DEMO_SCHEMA_PATH", "breast_cancer_frame", "demo_site", "write_demo_sites"]

DEMO_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "breast_cancer.toml"
DEMO_LABEL = "diagnosis"


def breast_cancer_frame() -> pd.DataFrame:
    """569 rows: 30 numeric features with snake_case names (``mean_radius``, ...) and
    the label ``diagnosis`` = ``"malignant"`` | ``"benign"``."""
    from sklearn.datasets import load_breast_cancer  # lazy: only the demo needs it

    bunch = load_breast_cancer(as_frame=True)
    df = bunch.data.rename(columns=lambda c: str(c).strip().replace(" ", "_"))
    df[DEMO_LABEL] = np.asarray(bunch.target_names)[bunch.target.to_numpy()].astype(str)
    return df


def write_demo_sites(out_dir: Path, *, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
                     seed: int = 0) -> list[tuple[str, Path]]:
    """Split the demo table into ``num_sites`` hospitals, one CSV each in ``out_dir/data``
    (written atomically); returns ``(name, path)`` per hospital."""
    parts = partition(breast_cancer_frame(), num_sites=num_sites, label=DEMO_LABEL, scheme=scheme,
                      alpha=alpha, seed=seed)
    sites = []
    for i, part in enumerate(parts, start=1):
        path = out_dir / "data" / f"hospital-{i}.csv"
        write_atomic(path, part.to_csv(index=False))
        sites.append((f"hospital-{i}", path))
    return sites


def demo_site(partition_id: int, num_partitions: int) -> dict[str, str]:
    """The site of simulated node ``partition_id`` in a bare ``flwr run .`` (no manifest):
    the demo table split iid over ``num_partitions`` hospitals, cached in the temp dir.
    Returns ``{"name", "data", "ledger"}``."""
    root = Path(tempfile.gettempdir()) / f"candor-embedded-{num_partitions}"
    name, data = write_demo_sites(root, num_sites=num_partitions)[partition_id % num_partitions]
    return {"name": name, "data": str(data), "ledger": str(root / "ledgers" / f"{name}.json")}
