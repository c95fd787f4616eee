"""The ServerApp: one Candor run, the same in simulation and deployment."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from candor.common.app_hash import submitted_app_sha256
from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.encoding import Encoder
from candor.common.errors import CandorError, RunFailed
from candor.common.models import build_model
from candor.common.progress import PROGRESS
from candor.common.schema import Schema

from .audit import AuditLog, load_private_key
from .export import finalise
from .outputs import RunRecorder
from .strategy import assemble, build_strategy

logging.getLogger("flwr").propagate = False
logger = logging.getLogger(__name__)

app = ServerApp()


def _setup_logging() -> None:
    """Progress lines go to stderr, which Flower streams to `flwr run --stream`."""
    root = logging.getLogger("candor.server")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # opacus installs a root handler; print once


def default_out_dir() -> str:
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    torch.set_num_threads(1)
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        schema = Schema.load(cfg.schema or DEMO_SCHEMA_PATH)  # none named: a bare `flwr run .` of the demo
        audit_key, ephemeral = load_private_key(cfg.audit_key)
    except CandorError as err:
        logger.error("%s cannot start the run: %s", PROGRESS, err)
        raise  # an exception, not SystemExit (which Flower's runtime does not catch): the run is finished:failed
    encoder = Encoder(schema)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_features=encoder.num_features, num_outputs=schema.num_outputs,
                        hidden=cfg.hidden_sizes)
    recorder = RunRecorder(cfg.out_dir or default_out_dir(), cfg=cfg, schema=schema,
                           feature_names=list(encoder.feature_names))
    audit = AuditLog(recorder.dir, audit_key, ephemeral=ephemeral)
    initial = ArrayRecord(model.state_dict())
    # the hash of the app this run was submitted with (what every site checks: common/app_hash.py)
    audit.start(run_id=str(context.run_id), cfg=cfg, schema=schema, initial=initial,
                app_sha256=submitted_app_sha256(grid.run))
    # audit > recording > secure aggregation or update checks > FedAvg-family (server/strategy.py)
    strategy = assemble(cfg, build_strategy(cfg), recorder=recorder, audit=audit)
    shared = ConfigRecord({"schema-sha256": schema.sha256()})
    logger.info("%s run %s: %d rounds, strategy %s, DP %s%s, schema %s", PROGRESS, context.run_id,
                cfg.num_server_rounds, cfg.strategy, "on" if cfg.dp else "OFF",
                f" (target ε {cfg.target_epsilon} per site for the whole run)" if cfg.dp and cfg.target_epsilon else "",
                schema.sha256()[:12])
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord(dict(shared)),
            evaluate_config=ConfigRecord(dict(shared)),
            evaluate_fn=lambda r, arrays: recorder.checkpoint(r, arrays),
        )
    except RunFailed as err:
        recorder.write_tables()  # metrics.json keeps every refusal; there is no model to publish
        logger.error("%s the run stopped: %s. Outputs so far in %s", PROGRESS, err, recorder.dir.resolve())
        raise  # an exception, not SystemExit: Flower then reports the run as finished:failed
    if cfg.explain:
        from .explanations import explain_federated

        explain_federated(grid, recorder, result.arrays, cfg)
    recorder.finish(result.arrays if len(result.arrays) else None)
    finalise(recorder, audit)  # exports, model card, the audit log's final entry (server/export.py)
