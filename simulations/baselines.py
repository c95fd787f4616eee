"""Centralized (pooled) baseline on the same pipeline: the same validation, split,
encoding, model and training loop as the federated run, with every site's training rows
pooled in one place. It is what federation is compared against, not something a
consortium could run: pooling is exactly what Candor avoids."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from candor.common.config import RunConfig
from candor.common.data import load_site, stable_seed
from candor.common.models import build_model
from candor.common.policy import RunPrivacy
from candor.common.privacy import MechanismRecord
from candor.common.schema import Schema
from candor.common.training import LocalTraining, TensorSplit, evaluate, sample_rate, steps_for_epochs, train

from .sites import SimSite


def pooled(schema: Schema, sites: list[SimSite], cfg: RunConfig) -> dict:
    """Train on the union of the sites' training splits; evaluate on each site's test split.

    Trains ``num_server_rounds * local_epochs`` epochs. With DP the privacy unit is one
    record of the pool, calibrated to ``target_epsilon`` over all steps.
    """
    torch.set_num_threads(1)
    data = {s.name: load_site(schema, str(s.data), test_path=str(s.test) if s.test else None,
                              test_fraction=cfg.test_fraction, seed=stable_seed(cfg.seed, s.name, "split"),
                              min_rows=cfg.min_rows) for s in sites}
    train_split = TensorSplit(torch.cat([d.train.x for d in data.values()]), torch.cat([d.train.y for d in data.values()]))
    n = len(train_split)
    epochs = cfg.num_server_rounds * cfg.local_epochs
    steps = steps_for_epochs(n, cfg.batch_size, epochs)
    settings = LocalTraining(steps=steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                             optimizer=cfg.optimizer, momentum=cfg.momentum, max_grad_norm=cfg.max_grad_norm)
    privacy = None
    if cfg.dp:
        # The pool is one "site" training one long round: the same policy as a site's.
        run = dataclasses.replace(RunPrivacy.from_config(cfg, num_records=n, explain=False, evaluation="local", counts=False), rounds=1)
        q = sample_rate(n, cfg.batch_size)
        sigma = run.plan_sigma([], sample_rate=q, steps_per_round=steps)
        settings = dataclasses.replace(settings, noise_multiplier=sigma)
        record = MechanismRecord(round=1, noise_multiplier=sigma, sample_rate=q, steps=steps)
        privacy = {"epsilon": run.accountant_for([record]).epsilon(), "delta": run.delta,
                   "accountant": run.accountant, "history": [record.to_dict()]}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_features=train_split.x.shape[1], num_outputs=schema.num_outputs,
                        hidden=cfg.hidden_sizes)
    train(model, train_split, settings=settings, num_outputs=schema.num_outputs,
          generator=torch.Generator().manual_seed(stable_seed(cfg.seed, "pooled")))
    per_site = {name: {**evaluate(model, d.test, num_outputs=schema.num_outputs), "num_examples": len(d.test)}
                for name, d in data.items()}
    return {
        "mode": "pooled",
        "dp": cfg.dp,
        "privacy": privacy,
        "num_train_rows": n,
        "sites": per_site,
        "mean_site_accuracy": float(np.mean([m["accuracy"] for m in per_site.values()])),
    }
