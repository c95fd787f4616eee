"""A small mixed schema (numeric, categorical, boolean with missing indicator) and a
synthetic table for it, plus a saved model in the run directory format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from candor.common.config import RunConfig
from candor.common.encoding import Encoder
from candor.common.models import build_model
from candor.common.schema import Schema

SCHEMA = {
    "name": "clinic",
    "label": {"name": "outcome", "task": "binary", "positive": ["yes"], "negative": ["no"]},
    "features": [
        {"name": "age", "kind": "numeric", "lower": 20, "upper": 100},
        {"name": "chol", "kind": "numeric", "lower": 100, "upper": 400, "missing": "drop"},
        {"name": "cp", "kind": "categorical", "levels": ["a", "b", "c"]},
        {"name": "smoker", "kind": "boolean", "missing": "indicator"},
    ],
}


def records(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    smoker = rng.choice(["yes", "no", ""], size=n)
    return pd.DataFrame({
        "id": [f"p{i}" for i in range(n)],
        "age": rng.integers(20, 101, size=n).astype(str),
        "chol": rng.integers(100, 401, size=n).astype(str),
        "cp": rng.choice(["a", "b", "c"], size=n),
        "smoker": smoker,
        "outcome": rng.choice(["yes", "no"], size=n),
    })


def save_model(run_dir, schema: Schema, *, spec: str = "logreg", seed: int = 0) -> torch.nn.Module:
    """A model.pt exactly as the coordinator writes it (server.outputs.RunRecorder)."""
    from flwr.app import ArrayRecord

    from candor.server.outputs import RunRecorder

    encoder = Encoder(schema)
    torch.manual_seed(seed)
    model = build_model(spec, num_features=encoder.num_features, num_outputs=schema.num_outputs, hidden=(8,))
    cfg = RunConfig(model=spec, hidden="8")
    RunRecorder(run_dir, cfg=cfg, schema=schema, feature_names=encoder.feature_names).save_model(
        ArrayRecord(model.state_dict()))
    return model.eval()
