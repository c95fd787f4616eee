"""The run's checkpoint: what the coordinator needs to continue an interrupted run.

After every round the ServerApp writes ``checkpoint.pt`` in the run directory, atomically
(temp file, fsync, rename: ``common.atomic``), so that a kill at any instant leaves the
previous round's checkpoint or this one's. It holds:

- the Candor run id (``common.names.RUN_ID_KEY``: sites key the run by it) and the run
  config the run started with;
- the last complete round and the global model after it;
- the aggregation strategy's state (:func:`strategy_state`: FedAdam's, FedYogi's and
  FedAdagrad's moments ``m_t``/``v_t``; FedAvg, FedProx, FedMedian, FedTrimmedAvg and Krum
  keep none between rounds);
- the run recorder's state (metrics and privacy so far, what every site reported) and
  the secure-aggregation records;
- the audit log's length and head at that point (the entries a resume finds after it
  belong to the round that was abandoned; the log keeps them).

``candor-server run --resume`` / ``candor-sim run --resume`` submit the run again with
``resume = true``; the ServerApp (``server.app``) loads this file and continues with the
next round. On a successful finish the file is removed: a finished run has nothing to
resume. It holds tensors, numbers and strings only, and is read with
``torch.load(weights_only=True)``: a damaged or foreign file is refused, never executed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from candor.common.atomic import write_atomic
from candor.common.errors import ConfigError

from .wrapper import layers

__all__ = ["CHECKPOINT", "Checkpoint", "remove", "resume_log", "restore_strategy_state", "strategy_state"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
_STATE_ATTRIBUTES = ("m_t", "v_t")  # FedOpt's moments (flwr.serverapp.strategy.fedopt), dicts of arrays


@dataclass
class Checkpoint:
    run_id: str
    round: int
    run_config: dict[str, Any]
    arrays: dict[str, torch.Tensor]
    recorder: dict[str, Any]
    audit_entries: int
    audit_head: str
    strategy: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    secagg_records: list[dict[str, Any]] = field(default_factory=list)
    flower_run_ids: list[str] = field(default_factory=list)

    def save(self, run_dir: str | Path) -> None:
        buffer = io.BytesIO()
        torch.save({"version": CHECKPOINT_VERSION, "run_id": self.run_id, "round": self.round,
                    "run_config": json.dumps(self.run_config, sort_keys=True), "arrays": self.arrays,
                    "recorder": json.dumps(self.recorder, sort_keys=True), "audit_entries": self.audit_entries,
                    "audit_head": self.audit_head, "strategy": self.strategy,
                    "secagg_records": json.dumps(self.secagg_records), "flower_run_ids": list(self.flower_run_ids)},
                   buffer)
        write_atomic(Path(run_dir) / CHECKPOINT, buffer.getvalue(), mode=0o600)

    @classmethod
    def load(cls, run_dir: str | Path) -> Checkpoint:
        """The checkpoint in ``run_dir``.

        Raises:
            ConfigError: there is none (the run stopped before its first round completed,
                or it finished), or the file is damaged or not a Candor checkpoint.
        """
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise ConfigError(
                f"{path}: no checkpoint, so there is nothing to resume: the run either finished (its outputs are "
                "complete) or stopped before its first round completed (start it again, without --resume)")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"version {d.get('version')!r}, expected {CHECKPOINT_VERSION}")
            return cls(run_id=str(d["run_id"]), round=int(d["round"]), run_config=json.loads(d["run_config"]),
                       arrays=dict(d["arrays"]), recorder=json.loads(d["recorder"]),
                       audit_entries=int(d["audit_entries"]), audit_head=str(d["audit_head"]),
                       strategy={k: dict(v) for k, v in d["strategy"].items()},
                       secagg_records=json.loads(d["secagg_records"]), flower_run_ids=list(d["flower_run_ids"]))
        except Exception as err:  # torch raises many types for a damaged file; none may pass as a checkpoint
            raise ConfigError(f"{path}: the checkpoint is unreadable ({type(err).__name__}: {err}); the run cannot "
                              "resume from it. Its outputs so far are in the same directory; start a new run") from None

    def array_record(self) -> ArrayRecord:
        return ArrayRecord(self.arrays)


def resume_log(run_dir: str | Path) -> Path:
    """Where a resumed attempt's Flower log goes: ``flower.resume-N.log`` (the first free N),
    so that the interrupted attempt's ``flower.log`` is kept."""
    n = 1
    while (path := Path(run_dir) / f"flower.resume-{n}.log").exists():
        n += 1
    return path


def remove(run_dir: str | Path) -> None:
    """Remove the checkpoint of a finished run."""
    (Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The aggregation strategy's state between rounds: the moments of Flower's FedOpt
    family (``m_t``, ``v_t``; ``None`` before the first aggregation), as tensors."""
    inner = list(layers(strategy))[-1]
    return {name: {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
            for name in _STATE_ATTRIBUTES if (value := getattr(inner, name, None))}


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put :func:`strategy_state`'s ``state`` back into the aggregation strategy.

    Raises:
        ConfigError: the state names moments this strategy does not keep (the run config
            changed strategy).
    """
    inner = list(layers(strategy))[-1]
    for name, value in state.items():
        if name not in _STATE_ATTRIBUTES or not hasattr(inner, name):
            raise ConfigError(f"the checkpoint holds '{name}', which the strategy {type(inner).__name__} does not "
                              "keep; resume with the run config the run started with")
        setattr(inner, name, {k: v.numpy() for k, v in value.items()})
