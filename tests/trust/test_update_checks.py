"""Update checks: a bad update is rejected with its site named, the others are aggregated."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from trust_helpers import reply

from candor.common.config import RunConfig
from candor.common.encoding import Encoder
from candor.common.hashing import hash_arrays
from candor.common.schema import Schema
from candor.server.audit import AuditLog
from candor.server.audited import AuditedStrategy
from candor.server.checks import UpdateChecks
from candor.server.outputs import RunRecorder
from candor.server.recording import RecordingStrategy
from candor.common.demo import DEMO_SCHEMA_PATH

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


class Offline(FedAvg):
    """FedAvg without a grid: configure_train sends nothing (the test supplies the replies)."""

    def configure_train(self, server_round, arrays, config, grid):
        return []


def good(value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in GLOBAL.items()}


def replies():
    nan = good(0.1)
    nan["w"][0, 1] = np.nan
    return [
        reply("a", good(1.0), num_examples=10),
        reply("bad-nan", nan),
        reply("bad-shape", {"w": np.zeros((3, 2), dtype=np.float32), "b": GLOBAL["b"]}),
        reply("bad-norm", good(100.0)),
        reply("b", good(2.0), num_examples=30),
    ]


def start(strategy, server_round=1):
    strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord(), None)


def test_bad_updates_are_rejected_with_the_site_named_and_the_rest_aggregated(caplog):
    rejected = []
    checks = UpdateChecks(Offline(), max_update_norm=50.0, on_reject=lambda r, site, why: rejected.append((r, site, why)))
    start(checks)
    with caplog.at_level(logging.WARNING, logger="candor.server.checks"):
        arrays, _ = checks.aggregate_train(1, replies())
    assert [(r, site) for r, site, _ in rejected] == [(1, "bad-nan"), (1, "bad-shape"), (1, "bad-norm")]
    why = {site: reason for _, site, reason in rejected}
    assert "array 'w' has 1 non-finite value(s)" in why["bad-nan"]
    assert "array 'w' is float32[3, 2]; the global model's is float32[2, 3]" in why["bad-shape"]
    assert "update norm 300 exceeds max-update-norm 50" in why["bad-norm"]  # 100 * sqrt(9 values)
    for site in ("bad-nan", "bad-shape", "bad-norm"):
        assert any(f"site '{site}'" in rec.getMessage() for rec in caplog.records)
    expected = (10 * 1.0 + 30 * 2.0) / 40  # weighted mean of the two good updates only
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), expected), rtol=1e-6)
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(3, expected), rtol=1e-6)


def test_without_a_norm_bound_a_large_but_well_formed_update_passes():
    rejected = []
    checks = UpdateChecks(Offline(), max_update_norm=0.0, on_reject=lambda *a: rejected.append(a[1]))
    start(checks)
    checks.aggregate_train(1, replies())
    assert rejected == ["bad-nan", "bad-shape"]


@pytest.mark.parametrize("make, fragment", [
    (lambda: reply("x", {"w": GLOBAL["w"]}), "missing ['b']"),
    (lambda: reply("x", {**good(0.0), "extra": np.zeros(1, dtype=np.float32)}), "unexpected ['extra']"),
    (lambda: reply("x", {k: v.astype(np.float64) for k, v in good(0.0).items()}), "is float64[2, 3]"),
    (lambda: reply("x", good(0.0), num_examples=0), "'num-examples' > 0"),
    (lambda: reply("x", good(0.0), metrics={"sneaky": 1.0}), "its metrics have keys"),
])
def test_each_rule_names_what_is_wrong(make, fragment):
    rejected = {}
    checks = UpdateChecks(Offline(), on_reject=lambda r, site, why: rejected.update({site: why}))
    start(checks)
    arrays, _ = checks.aggregate_train(1, [reply("a", good(1.0)), make(), reply("b", good(1.0))])
    assert list(rejected) == ["x"] and fragment in rejected["x"]
    np.testing.assert_allclose(arrays["b"].numpy(), 1.0)


def test_rejections_reach_metrics_json_and_the_audit_log(tmp_path):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    cfg = RunConfig(dp=False, max_update_norm=50.0)
    recorder = RunRecorder(tmp_path, cfg=cfg, schema=schema, feature_names=Encoder(schema).feature_names)
    log = AuditLog(tmp_path, Ed25519PrivateKey.generate(), ephemeral=True)
    checks = UpdateChecks(Offline(), max_update_norm=cfg.max_update_norm, on_reject=recorder.rejected)
    strategy = AuditedStrategy(RecordingStrategy(checks, recorder), log, recorder)
    start(strategy)
    sent = replies()
    hashes = {site_reply.content["candor"]["site"]: hash_arrays(site_reply.content["arrays"]) for site_reply in sent}
    arrays, _ = strategy.aggregate_train(1, sent)
    recorder.write_tables()

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [x["site"] for x in metrics["rounds"][0]["rejected"]] == ["bad-nan", "bad-norm", "bad-shape"]
    body = log.entries[-1]["body"]
    assert body["round"] == 1 and body["sites"] == ["a", "b"]
    assert [x["site"] for x in body["rejected"]] == ["bad-nan", "bad-norm", "bad-shape"]
    assert {u["site"]: u["sha256"] for u in body["updates"]} == hashes  # hashed as received, rejected ones too
    assert body["sent_model_sha256"] == hash_arrays(GLOBAL)
    assert body["global_model_sha256"] == hash_arrays(arrays)
