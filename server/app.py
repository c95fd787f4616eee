"""The ServerApp: one Candor run, the same in simulation and deployment.

A run starts at round 1, or (run config ``resume = true``) continues an interrupted run
in ``out-dir`` after the last round its checkpoint holds (:mod:`candor.server.checkpoint`):
same Candor run id, same records, the audit log continued. Every round ends with the
checkpoint written; a finished run removes it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from candor.common.app_hash import submitted_app_sha256
from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.encoding import Encoder
from candor.common.errors import CandorError, ConfigError, RunFailed
from candor.common.hashing import hash_arrays
from candor.common.models import build_model
from candor.common.names import RUN_ID_KEY, new_run_id
from candor.common.progress import PROGRESS
from candor.common.schema import Schema

from .audit import AuditLog, forget_resume_key, load_private_key, resume_key
from .checkpoint import Checkpoint, restore_strategy_state, strategy_state
from .checkpoint import remove as remove_checkpoint
from .export import finalise
from .outputs import RunRecorder
from .rounds import run_rounds
from .secagg import SecureAggregation
from .strategy import assemble, build_strategy
from .wrapper import layers

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


@dataclass
class _Start:
    """Where the round loop starts: a new run from round 1, or a resumed one after its checkpoint."""

    run_id: str
    audit: AuditLog
    strategy: Strategy
    arrays: ArrayRecord
    first_round: int
    flower_run_ids: list[str]


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    torch.set_num_threads(1)
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        schema = Schema.load(cfg.schema or DEMO_SCHEMA_PATH)  # none named: a bare `flwr run .` of the demo
        checkpoint = _load_checkpoint(cfg) if cfg.resume else None
        key = resume_key(cfg.out_dir, cfg.audit_key) if checkpoint else load_private_key(cfg.audit_key)
        encoder = Encoder(schema)
        recorder = RunRecorder(cfg.out_dir or default_out_dir(), cfg=cfg, schema=schema,
                               feature_names=list(encoder.feature_names),
                               run_id=checkpoint.run_id if checkpoint else new_run_id())
        if checkpoint:
            start = _resume(checkpoint, cfg, recorder, key, flower_run_id=str(context.run_id))
        else:
            start = _begin(cfg, schema, encoder, recorder, key, grid=grid, flower_run_id=str(context.run_id))
    except CandorError as err:
        logger.error("%s cannot %s the run: %s", PROGRESS, "resume" if context.run_config.get("resume") else "start",
                     err)
        raise  # an exception, not SystemExit (which Flower's runtime does not catch): the run is finished:failed
    audit, strategy = start.audit, start.strategy
    shared = ConfigRecord({"schema-sha256": schema.sha256(), RUN_ID_KEY: start.run_id})

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        recorder.checkpoint(server_round, arrays)  # metrics, privacy, model.pt
        Checkpoint(run_id=start.run_id, round=server_round, run_config=cfg.replace(resume=False).to_run_config(),
                   arrays=arrays.to_torch_state_dict(), recorder=recorder.state_dict(),
                   audit_entries=len(audit.entries), audit_head=audit.head, strategy=strategy_state(strategy),
                   secagg_records=list(_secagg(strategy).records) if _secagg(strategy) else [],
                   flower_run_ids=start.flower_run_ids).save(recorder.dir)

    try:
        final = run_rounds(strategy, grid, arrays=start.arrays, first_round=start.first_round,
                           last_round=cfg.num_server_rounds, timeout=cfg.round_timeout, train_config=shared,
                           evaluate_config=shared, after_round=after_round)
    except RunFailed as err:
        recorder.write_tables()  # metrics.json keeps every refusal; there is no model to publish
        logger.error("%s the run stopped: %s. Outputs so far in %s", PROGRESS, err, recorder.dir.resolve())
        raise  # an exception, not SystemExit: Flower then reports the run as finished:failed
    if cfg.explain:
        from .explanations import explain_federated

        explain_federated(grid, recorder, final, cfg)
    recorder.finish(final)
    finalise(recorder, audit)  # exports, model card, the audit log's final entry (server/export.py)
    remove_checkpoint(recorder.dir)  # a finished run has nothing to resume
    forget_resume_key(recorder.dir)


def _begin(cfg: RunConfig, schema: Schema, encoder: Encoder, recorder: RunRecorder,
           key: tuple[Ed25519PrivateKey, bool], *, grid: Grid, flower_run_id: str) -> _Start:
    """A new run: the initial model, the audit log's start entry, the strategy."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_features=encoder.num_features, num_outputs=schema.num_outputs,
                        hidden=cfg.hidden_sizes)
    audit = AuditLog(recorder.dir, key[0], ephemeral=key[1])
    arrays = ArrayRecord(model.state_dict())
    # the hash of the app this run was submitted with (what every site checks: common/app_hash.py)
    audit.start(run_id=recorder.run_id, cfg=cfg, schema=schema, initial=arrays,
                app_sha256=submitted_app_sha256(grid.run), flower_run_id=flower_run_id)
    # audit > recording > secure aggregation or update checks > FedAvg-family (server/strategy.py)
    strategy = assemble(cfg, build_strategy(cfg), recorder=recorder, audit=audit)
    logger.info("%s run %s: %d rounds, strategy %s, DP %s%s, schema %s", PROGRESS, recorder.run_id,
                cfg.num_server_rounds, cfg.strategy, "on" if cfg.dp else "OFF",
                f" (target ε {cfg.target_epsilon} per site for the whole run)" if cfg.dp and cfg.target_epsilon else "",
                schema.sha256()[:12])
    return _Start(recorder.run_id, audit, strategy, arrays, 1, [flower_run_id])


def _resume(checkpoint: Checkpoint, cfg: RunConfig, recorder: RunRecorder, key: tuple[Ed25519PrivateKey, bool], *,
            flower_run_id: str) -> _Start:
    """The interrupted run of ``checkpoint``: its audit log continued (a ``resume`` entry),
    its records, its strategy's state and global model, from the round after the checkpoint."""
    arrays = checkpoint.array_record()
    audit = AuditLog.resume(recorder.dir, key[0], ephemeral=key[1], checkpoint_entries=checkpoint.audit_entries,
                            checkpoint_head=checkpoint.audit_head, after_round=checkpoint.round,
                            global_model_sha256=hash_arrays(arrays), flower_run_id=flower_run_id)
    recorder.load_state_dict(checkpoint.recorder, through_round=checkpoint.round)
    strategy = assemble(cfg, build_strategy(cfg), recorder=recorder, audit=audit)
    restore_strategy_state(strategy, checkpoint.strategy)
    if (secagg := _secagg(strategy)) is not None:
        secagg.records = list(checkpoint.secagg_records)
    logger.info("%s resuming run %s after round %d of %d (Flower run %s); every site's ledger keeps the "
                "rounds it already paid for, charged once", PROGRESS, checkpoint.run_id, checkpoint.round,
                cfg.num_server_rounds, flower_run_id)
    return _Start(checkpoint.run_id, audit, strategy, arrays, checkpoint.round + 1,
                  [*checkpoint.flower_run_ids, flower_run_id])


def _secagg(strategy: Strategy) -> SecureAggregation | None:
    return next((layer for layer in layers(strategy) if isinstance(layer, SecureAggregation)), None)


def _load_checkpoint(cfg: RunConfig) -> Checkpoint:
    """The checkpoint of the run in ``cfg.out_dir``, checked against ``cfg``."""
    if not cfg.out_dir:
        raise ConfigError("resume = true needs out-dir, the directory of the run to continue")
    checkpoint = Checkpoint.load(cfg.out_dir)
    given = cfg.replace(resume=False).to_run_config()
    changed = sorted(k for k in set(given) | set(checkpoint.run_config)
                     if given.get(k) != checkpoint.run_config.get(k))
    if changed:
        raise ConfigError(f"{cfg.out_dir}: the run started with different settings for {', '.join(changed)} "
                          f"(e.g. {changed[0]} = {checkpoint.run_config.get(changed[0])!r}, now "
                          f"{given.get(changed[0])!r}); a run resumes with the run config it started with")
    return checkpoint
