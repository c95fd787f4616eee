"""Every release is accounted: two site tables that differ in one record produce messages
whose only differences are outputs of recorded mechanisms (or functions of them); no
exact count leaves the site, and the ε the site states covers all of it."""

from __future__ import annotations

import json
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from independent_accounting import pld_epsilon

from candor.client.app import app
from candor.common.config import RunConfig
from candor.common.data import record_split
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.encoding import Encoder
from candor.common.models import build_model
from candor.common.schema import Schema

ROUNDS = 2
# what may differ between the two tables' messages: the outputs of a recorded mechanism,
# and what is computed from them alone (the DP counts give the weights, q, steps, δ, ε)
RELEASED = {"arrays", "num-examples", "sample-rate", "steps", "epsilon", "delta", "noise-multiplier",
            "dp-loss-sum", "dp-correct-sum", "history", "mechanism"}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _site(directory, frame):
    directory.mkdir()
    frame.to_csv(directory / "site.csv", index=False)
    (directory / "sites.json").write_text(json.dumps({"noise_seed": "public-seed", "sites": [
        {"name": "h1", "data": str(directory / "site.csv"), "ledger": str(directory / "ledger.json")}]}))
    return directory


def _messages(directory, schema):
    """The site's replies to one run: train and evaluate each round, then explain."""
    cfg = RunConfig(schema=str(DEMO_SCHEMA_PATH), sim_manifest=str(directory / "sites.json"), model="logreg",
                    num_server_rounds=ROUNDS)
    encoder = Encoder(schema)
    torch.manual_seed(0)
    model = build_model("logreg", num_features=encoder.num_features, num_outputs=1, hidden=())
    replies = []
    for kind, r in [*[(k, r) for r in range(1, ROUNDS + 1) for k in ("train", "evaluate")], ("query.explain", 3)]:
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
            {"server-round": r, "schema-sha256": schema.sha256(), "candor-run-id": "run-neighbours"})})
        meta = Metadata(run_id=7, message_id=f"m{kind}{r}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600, message_type=kind)
        context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                          state=RecordDict(), run_config=cfg.to_run_config())
        reply = app(Message(content=content, metadata=meta), context)
        assert not reply.has_error(), reply.error.reason
        replies.append((kind, r, reply))
    return replies


def _fields(reply: Message) -> dict:
    out = {}
    for record in (*reply.content.metric_records.values(), *reply.content.config_records.values()):
        out.update(dict(record))
    if reply.content.array_records:
        out["arrays"] = {k: v.numpy().tobytes() for k, v in next(iter(reply.content.array_records.values())).items()}
    return out


def test_one_record_more_changes_only_what_recorded_mechanisms_released(tmp_path):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    frame = breast_cancer_frame().head(200)
    table = _site(tmp_path / "d", frame)
    neighbour = _site(tmp_path / "d-plus-one", plus_one(frame))
    exact_train, exact_test = (len(part) for part in record_split(frame, test_fraction=0.2, key=_split_key()))
    first, second = _messages(table, schema), _messages(neighbour, schema)
    for (kind, r, a), (_, _, b) in zip(first, second):
        fa, fb = _fields(a), _fields(b)
        assert fa.keys() == fb.keys(), (kind, r)
        differing = {k for k in fa if fa[k] != fb[k]}
        released = RELEASED | ({f.name for f in schema.features} if kind == "query.explain" else set())
        assert differing <= released, (kind, r, differing - released)
        # no exact count is in any message: num-examples is the DP count, never n
        assert "train-loss" not in fa
        if "num-examples" in fa:
            assert fa["num-examples"] not in (exact_train, exact_test), (kind, r, fa["num-examples"])
    # the ε the site states covers every release it made, recomputed by an outside accountant
    ledger = json.loads((table / "ledger.json").read_text())["entries"]
    assert sorted({e["kind"] for e in ledger}) == ["evaluation", "explanation", "row-count", "training"]
    stated = _fields(first[-1][2])["epsilon"]
    assert 1.0 <= stated / pld_epsilon(ledger, ledger[-1]["delta"]) <= 1.05


def test_a_record_s_split_does_not_depend_on_the_other_rows():
    frame = breast_cancer_frame().head(200)
    plus = plus_one(frame)
    _, held_out = record_split(frame, test_fraction=0.2, key=7)
    _, held_out_plus = record_split(plus, test_fraction=0.2, key=7)
    assert set(held_out.index) == set(held_out_plus.index) - {200}  # only the new row may join the held-out rows
    assert 0.1 < len(held_out) / len(frame) < 0.3


def plus_one(frame):
    """``frame`` and one more record (row 300 of the data set), as a neighbouring table."""
    import pandas as pd

    return pd.concat([frame, breast_cancer_frame().iloc[[300]]], ignore_index=True)


def _split_key() -> int:
    from candor.common.data import stable_seed

    return stable_seed(RunConfig().seed, "h1", "split")
