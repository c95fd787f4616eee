"""Resuming a run, piece by piece: the round loop from any round, the checkpoint of the
strategy's state, the site's outbox, and the audit log continued across a resume."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from candor.client.outbox import KeptReply, Outbox
from candor.common.auditlog import AuditLogError
from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.errors import ConfigError, SiteError
from candor.common.hashing import hash_arrays
from candor.common.schema import Schema
from candor.server.audit import AuditLog, verify_run
from candor.server.checkpoint import Checkpoint, restore_strategy_state, strategy_state
from candor.server.rounds import run_rounds
from candor.server.strategy import build_strategy

SHAPES = {"w": (4, 3), "b": (4,)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a Flower process need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class DeltaGrid(Grid):
    """Node ``i`` trains by adding a fixed per-(node, round) float32 delta; evaluation
    replies carry a loss. Only what the strategies use."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for n, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{time.monotonic_ns()}{n}"
            r = int(msg.content["config"]["server-round"])
            if msg.metadata.message_type == "train":
                rng = np.random.default_rng([node, r])
                arrays = ArrayRecord({k: Array((a.numpy() + 0.1 * rng.standard_normal(a.shape)).astype(np.float32))
                                      for k, a in msg.content["arrays"].items()})
                content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 * node})})
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.5})})
            reply = Message(content=content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        raise NotImplementedError

    run = create_message = push_messages = pull_messages = set_run  # pragma: no cover


def initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(0, 0.5, s).astype(np.float32)) for k, s in SHAPES.items()})


def close(a: ArrayRecord, b: ArrayRecord) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6)


def loop(strategy, arrays, first, last, seen=None):
    return run_rounds(strategy, DeltaGrid(), arrays=arrays, first_round=first, last_round=last, timeout=10,
                      train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                      after_round=lambda r, a: (seen if seen is not None else []).append((r, hash_arrays(a))))


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_the_round_loop_is_flowers_and_an_interrupted_run_resumes_to_the_same_model(name):
    cfg = RunConfig(strategy=name, min_sites=3)
    flower = build_strategy(cfg).start(grid=DeltaGrid(), initial_arrays=initial(), num_rounds=4, timeout=10)
    seen: list = []
    straight = loop(build_strategy(cfg), initial(), 1, 4, seen)
    close(straight, flower.arrays)  # Flower's Strategy.start, from round 1 (sums in sampled order: to the ulp)
    assert [r for r, _ in seen] == [1, 2, 3, 4]
    first = build_strategy(cfg)
    halfway = loop(first, initial(), 1, 2)
    state = strategy_state(first)
    assert (name == "fedadam") == bool(state) and all(set(v) == set(SHAPES) for v in state.values())
    second = build_strategy(cfg)
    restore_strategy_state(second, state)
    resumed = loop(second, halfway, 3, 4)
    close(resumed, straight)
    assert {a.dtype for a in resumed.to_numpy_ndarrays()} == {np.dtype(np.float32)}  # FedAdam under NumPy 2 too


def test_fedadam_keeps_moving_the_model_after_round_one():
    """Flower's FedAdam returned float64 arrays (NEP 50); every later float32 update then
    failed the update checks and the model froze: the global model must change each round."""
    seen: list = []
    loop(build_strategy(RunConfig(strategy="fedadam", min_sites=3)), initial(), 1, 3, seen)
    assert len({h for _, h in seen}) == 3


def test_a_strategy_state_that_does_not_fit_is_refused():
    state = strategy_state(_trained("fedadam"))
    with pytest.raises(ConfigError, match="does not keep"):
        restore_strategy_state(build_strategy(RunConfig(strategy="fedavg", min_sites=3)), state)


def _trained(name):
    strategy = build_strategy(RunConfig(strategy=name, min_sites=3))
    loop(strategy, initial(), 1, 1)
    return strategy


def test_the_checkpoint_round_trips_and_a_damaged_one_is_refused_with_the_file(tmp_path):
    cp = Checkpoint(run_id="run-abc", round=2, run_config={"num-server-rounds": 4},
                    arrays={"w": torch.ones(2, 2)}, recorder={"rounds": {}}, audit_entries=3, audit_head="h",
                    strategy=strategy_state(_trained("fedadam")), flower_run_ids=["11"])
    cp.save(tmp_path)
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o600
    back = Checkpoint.load(tmp_path)
    assert (back.run_id, back.round, back.audit_entries, back.flower_run_ids) == ("run-abc", 2, 3, ["11"])
    assert set(back.strategy) == {"m_t", "v_t"} and torch.equal(back.arrays["w"], torch.ones(2, 2))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"checkpoint.pt: the checkpoint is unreadable"):
        Checkpoint.load(tmp_path)
    with pytest.raises(ConfigError, match="nothing to resume"):
        Checkpoint.load(tmp_path / "elsewhere")


def test_the_outbox_keeps_one_reply_per_run_and_kind_owner_only(tmp_path):
    ledger = tmp_path / "ledger.json"
    box = Outbox(ledger)
    assert box.kept("run-1", "train") is None
    arrays = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    box.keep(KeptReply("run-1", "train", 3, "abc", {"train-loss": 0.25}, {}, arrays))
    box.keep(KeptReply("run-1", "explain", 5, "def", {"age": 0.1}, {"release": "dp"}))
    kept = box.kept("run-1", "train")
    assert (kept.round, kept.received_sha256, kept.metrics) == (3, "abc", {"train-loss": 0.25})
    assert hash_arrays(kept.array_record()) == hash_arrays(ArrayRecord(arrays))  # resent exactly as sent
    assert box.kept("run-1", "explain").config == {"release": "dp"}
    assert box.kept("run-2", "train") is None
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in box.dir.iterdir())
    (box.dir / "run-1-train.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SiteError, match="run-1-train.pt: the kept reply is unreadable"):
        box.kept("run-1", "train")


def _log(tmp_path, key):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    log = AuditLog(tmp_path, key, ephemeral=True)
    models = [hash_arrays(ArrayRecord({"w": Array(np.full(2, float(i), dtype=np.float32))})) for i in range(5)]
    log.start(run_id="run-x", cfg=RunConfig(), schema=schema,
              initial=ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}))
    for r in (1, 2):
        log.round(r, sent_model_sha256=models[r - 1], updates=[], rejected=[], refusals=[],
                  global_model_sha256=models[r], secure_aggregation=False)
    return log, models


def test_a_resumed_log_keeps_the_abandoned_round_and_verifies(tmp_path):
    key = Ed25519PrivateKey.generate()
    log, models = _log(tmp_path, key)
    entries, head = len(log.entries), log.head  # the checkpoint after round 2
    log.round(3, sent_model_sha256=models[2], updates=[], rejected=[], refusals=[],
              global_model_sha256=models[3], secure_aggregation=False)  # written; its checkpoint never was
    resumed = AuditLog.resume(tmp_path, key, ephemeral=True, checkpoint_entries=entries, checkpoint_head=head,
                              after_round=2, global_model_sha256=models[2], flower_run_id="12")
    assert resumed.entries[-1]["body"]["abandoned"] == [{"seq": 3, "kind": "round", "round": 3}]
    for r in (3, 4):
        resumed.round(r, sent_model_sha256=models[r - 1], updates=[], rejected=[], refusals=[],
                      global_model_sha256=models[r], secure_aggregation=False)
    _finish(tmp_path, resumed, models[4])
    summary = verify_run(tmp_path)
    assert (summary["rounds"], summary["resumes"]) == (4, 1)


def test_a_resume_from_a_model_that_is_not_the_rounds_global_model_fails_verification(tmp_path):
    key = Ed25519PrivateKey.generate()
    log, models = _log(tmp_path, key)
    resumed = AuditLog.resume(tmp_path, key, ephemeral=True, checkpoint_entries=len(log.entries),
                              checkpoint_head=log.head, after_round=2, global_model_sha256=models[4],
                              flower_run_id="12")
    _finish(tmp_path, resumed, models[4])
    with pytest.raises(AuditLogError, match=r"resumed after round 2 from a model .* not that round's global model"):
        verify_run(tmp_path)


def test_a_log_signed_by_another_key_or_cut_short_cannot_be_continued(tmp_path):
    key = Ed25519PrivateKey.generate()
    log, models = _log(tmp_path, key)
    with pytest.raises(AuditLogError, match="signature does not verify"):
        AuditLog.resume(tmp_path, Ed25519PrivateKey.generate(), ephemeral=True, checkpoint_entries=3,
                        checkpoint_head=log.head, after_round=2, global_model_sha256=models[2], flower_run_id="1")
    with pytest.raises(AuditLogError, match="does not contain the 5 entries"):
        AuditLog.resume(tmp_path, key, ephemeral=True, checkpoint_entries=5, checkpoint_head=log.head,
                        after_round=2, global_model_sha256=models[2], flower_run_id="1")


def _finish(run_dir, log, model_sha):
    """A final entry naming a model file with ``model_sha`` (verify_run checks the weights)."""
    from candor.common.model_file import MODEL_FILE

    state = {"w": torch.full((2,), 4.0)}
    assert hash_arrays(ArrayRecord(state)) == model_sha
    schema = Schema.load(DEMO_SCHEMA_PATH)
    from candor.common.model_file import ModelFile

    from candor.common.encoding import Encoder

    ModelFile(state_dict=state, model="logreg", hidden=(), feature_names=tuple(Encoder(schema).feature_names),
              schema=schema).save(
        run_dir / MODEL_FILE)
    log.final(model_sha256=model_sha, files=[MODEL_FILE], privacy={"sites": {}})
    json.loads((run_dir / "audit.jsonl").read_text().splitlines()[-1])
