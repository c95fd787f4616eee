"""A round a site was asked to train whose reply never arrived may have been charged at
the site: privacy.json names it and states ε as if it was spent (server/outputs.py)."""

from __future__ import annotations

import json
import time

import dp_accounting
import pytest
from flwr.app import ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.encoding import Encoder
from candor.common.errors import REFUSAL_CODE
from candor.common.privacy import MechanismRecord, epsilon
from candor.common.schema import Schema
from candor.server.outputs import RunRecorder

SIGMA, Q, STEPS = 1.1, 0.2, 15


def _meta(node: int) -> Metadata:
    return Metadata(run_id=7, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=600.0, message_type="train")


def trained(site: str, node: int, rounds: list[int]) -> Message:
    history = [MechanismRecord(round=r, noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS, run_id="7") for r in rounds]
    eps = epsilon(history, delta=1e-5)
    return Message(content=RecordDict({
        "metrics": MetricRecord({"num-examples": 100, "epsilon": eps, "delta": 1e-5}),
        "candor": ConfigRecord({"site": site, "accountant": "prv",
                                "history": json.dumps([h.to_dict() for h in history])}),
    }), metadata=_meta(node))


def failed(node: int, code: int, reason: str) -> Message:
    msg = Message(Error(code=code, reason=reason), reply_to=trained("x", node, [1]))
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def pld(rounds: int) -> float:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA)), STEPS * rounds))
    return acc.get_epsilon(1e-5)


@pytest.fixture
def recorder(tmp_path):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    return RunRecorder(tmp_path, cfg=RunConfig(), schema=schema, feature_names=Encoder(schema).feature_names)


def test_a_lost_reply_is_named_and_counted_as_if_spent(recorder):
    recorder.sampled(1, [1, 2])
    recorder.train_reply(1, trained("h1", 1, [1]))
    recorder.train_reply(1, trained("h2", 2, [1]))
    recorder.sampled(2, [1, 2])
    recorder.train_reply(2, trained("h1", 1, [1, 2]))  # h2's round-2 reply never arrives
    recorder.sampled(3, [1, 2])
    recorder.train_reply(3, trained("h1", 1, [1, 2, 3]))
    recorder.train_reply(3, failed(2, 0, "Error: Node Unavailable"))  # it died: it may have trained round 3 too
    sites = recorder.privacy_doc()["sites"]
    assert "unconfirmed_rounds" not in sites["h1"]
    h2 = sites["h2"]
    assert h2["unconfirmed_rounds"] == [2, 3]
    assert h2["epsilon"] == pytest.approx(pld(1), rel=0.02)  # what it reported
    assert h2["epsilon_if_unconfirmed_spent"] == pytest.approx(pld(3), rel=0.02)  # what it may have spent
    assert "its ledger is the record" in h2["unconfirmed_note"]


def test_a_refusal_or_a_later_reply_that_covers_the_round_is_not_unconfirmed(recorder):
    recorder.sampled(1, [1, 2])
    recorder.train_reply(1, trained("h1", 1, [1]))
    recorder.train_reply(1, trained("h2", 2, [1]))
    recorder.sampled(2, [1, 2])
    recorder.train_reply(2, trained("h1", 1, [1, 2]))  # h2's reply lost ...
    recorder.sampled(3, [1, 2])
    recorder.train_reply(3, trained("h2", 2, [1, 2, 3]))  # ... but its next history covers round 2
    recorder.train_reply(3, failed(1, REFUSAL_CODE, "site 'h1' refuses round 3: its lifetime ε would reach"))
    sites = recorder.privacy_doc()["sites"]
    assert "unconfirmed_rounds" not in sites["h1"] and "unconfirmed_rounds" not in sites["h2"]


def test_a_private_evaluation_is_recorded_even_from_a_site_that_never_trained(recorder):
    from candor.common.releases import evaluation_mechanism

    mech = evaluation_mechanism(round=1, noise_multiplier=3.0, run_id="7")
    msg = Message(content=RecordDict({
        "metrics": MetricRecord({"num-examples": 30, "dp-loss-sum": 4.0, "dp-correct-sum": 25.0, "dp-loss-clip": 4.0}),
        "candor": ConfigRecord({"site": "h9", "evaluation": "dp", "mechanism": json.dumps(mech.to_dict()),
                                "accountant": "prv", "delta": 1e-5, "epsilon": epsilon([mech], delta=1e-5)}),
    }), metadata=_meta(9))
    recorder.evaluate_reply(1, msg)
    p = recorder.privacy_doc()["sites"]["h9"]
    assert [h["kind"] for h in p["history"]] == ["evaluation"]
    assert p["epsilon"] == pytest.approx(epsilon([mech], delta=1e-5)) == p["epsilon_reported"]
