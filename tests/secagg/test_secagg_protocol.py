"""SecAgg+ between the real server wrapper (server/secagg.py) and the real site mod
(client/secagg.py's secagg_mod on a ClientApp's train function), on an in-process grid.

The reference is computed independently: Flower's own plaintext ``FedAvg.aggregate_train``
on the sites' local models, and a float64 FedAvg of the same updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp.strategy import FedAvg
from secagg_grid import FakeSite, initial_arrays, stage_of

from candor.client.secagg import secagg_mod
from candor.common.config import RunConfig
from candor.common.hashing import hash_arrays
from candor.server.recording import RecordingStrategy
from candor.server.secagg import SecureAggregation, SecureAggregationError, error_bound
from candor.server.strategy import build_strategy

NS = [120, 300, 45, 800, 77]


def make_sites(ns=NS, **kw) -> dict[int, FakeSite]:
    return {101 + i: FakeSite(name=f"site-{i + 1}", num_examples=n, seed=i, **kw) for i, n in enumerate(ns)}


class FakeRecorder:
    """What RecordingStrategy hands to RunRecorder, kept for inspection."""

    def __init__(self) -> None:
        self.train: list[Message] = []

    def sampled(self, server_round: int, count: int) -> None:
        pass

    def train_reply(self, server_round: int, msg: Message) -> None:
        self.train.append(msg)

    def evaluate_reply(self, server_round: int, msg: Message) -> None:
        pass

    def evaluate_aggregate(self, server_round: int, aggregate) -> None:
        pass


@dataclass
class Run:
    grid: Any
    secure: SecureAggregation
    recorder: FakeRecorder
    models: dict[int, ArrayRecord]  # round -> global model after it (0 = initial)
    inner_calls: list[list[Message]] = field(default_factory=list)  # what the wrapped strategy aggregated


def run_secure(loopback, sites, *, rounds=1, strategy="fedavg", inner=None, drop=None, tamper=None, **secagg) -> Run:
    cfg = RunConfig(secure_aggregation=True, strategy=strategy, min_sites=len(sites), dp=False,
                    **{f"secagg_{k}": v for k, v in secagg.items()})
    grid = loopback(sites, run_config=cfg.to_run_config(), drop=drop, tamper=tamper)
    inner = inner or build_strategy(cfg)
    inner.fraction_evaluate = 0.0  # the loopback sites only train
    run = Run(grid=grid, secure=None, recorder=FakeRecorder(), models={})  # type: ignore[arg-type]
    original = inner.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        run.inner_calls.append(replies)
        return original(server_round, replies)

    inner.aggregate_train = spy
    run.secure = SecureAggregation.from_config(inner, cfg)
    RecordingStrategy(run.secure, run.recorder).start(
        grid=grid, initial_arrays=initial_arrays(), num_rounds=rounds, timeout=10,
        evaluate_fn=lambda r, arrays: run.models.__setitem__(r, arrays))
    return run


def as64(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy().astype(np.float64) for k in arrays}


def reference(sites: list[FakeSite], r: int, glob: ArrayRecord) -> tuple[dict, ArrayRecord]:
    """(float64 FedAvg of the updates, Flower's plaintext FedAvg of the local models)."""
    g = as64(glob)
    total = sum(s.num_examples for s in sites)
    exact = {k: g[k] + sum(s.num_examples * (s.trained[r][k].astype(np.float64) - g[k]) for s in sites) / total
             for k in g}
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.trained[r].items()}),
                                   "metrics": MetricRecord({"num-examples": s.num_examples})}),
                       dst_node_id=1, message_type=MessageType.TRAIN) for s in sites]
    flower, _ = FedAvg().aggregate_train(r, replies)
    return exact, flower


def tolerance(sites: list[FakeSite], r: int, glob: ArrayRecord, cfg=RunConfig()) -> float:
    g = as64(glob)
    max_delta = max(np.abs(s.trained[r][k].astype(np.float64) - g[k]).max() for s in sites for k in g)
    ulp = np.spacing(np.float32(max(np.abs(v).max() for v in g.values()) + max_delta))
    return error_bound([s.num_examples for s in sites], max_abs_delta=max_delta,
                       clipping_range=cfg.secagg_clipping_range, max_weight=cfg.secagg_max_weight,
                       quantization_range=cfg.secagg_quantization_range) + 4 * float(ulp)


def max_diff(a: dict[str, np.ndarray], b: ArrayRecord | dict) -> float:
    return max(float(np.abs(a[k] - (b[k].numpy() if isinstance(b, ArrayRecord) else b[k])).max()) for k in a)


# --- correctness ------------------------------------------------------------------------

def test_secure_mean_equals_plaintext_fedavg_within_the_quantisation_bound(loopback):
    sites = make_sites()
    run = run_secure(loopback, sites, rounds=2)
    for r in (1, 2):
        exact, flower = reference(list(sites.values()), r, run.models[r - 1])
        tol = tolerance(list(sites.values()), r, run.models[r - 1])
        assert tol < 3e-5
        assert max_diff(exact, run.models[r]) <= tol
        assert max_diff(as64(flower), run.models[r]) <= tol
        # the check can fail for the right reason: ignoring the weights is far outside the bound
        unweighted = {k: np.mean([s.trained[r][k] for s in sites.values()], axis=0) for k in exact}
        assert max_diff(exact, unweighted) > 100 * tol


def test_secure_fedadam_matches_fedadam_on_the_plaintext_updates(loopback):
    sites = make_sites()
    run = run_secure(loopback, sites, strategy="fedadam")
    plain = build_strategy(RunConfig(strategy="fedadam", min_sites=len(sites)))
    list(plain.configure_train(1, run.models[0], ConfigRecord(), run.grid))  # FedAdam keeps the current model
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.trained[1].items()}),
                                   "metrics": MetricRecord({"num-examples": s.num_examples})}),
                       dst_node_id=1, message_type=MessageType.TRAIN) for s in sites.values()]
    expected, _ = plain.aggregate_train(1, replies)
    moved = max_diff(as64(expected), run.models[0])
    assert max_diff(as64(expected), run.models[1]) <= 20 * tolerance(list(sites.values()), 1, run.models[0])
    assert moved > 1e-3


def test_fedprox_mu_reaches_the_sites_inside_the_masked_round(loopback):
    sites = make_sites(NS[:3])
    run_secure(loopback, sites, strategy="fedprox")
    assert all(s.configs[1]["proximal-mu"] == pytest.approx(0.01) for s in sites.values())


# --- what the server holds ----------------------------------------------------------------

def test_server_never_receives_an_individual_update(loopback):
    sites = make_sites()
    run = run_secure(loopback, sites)
    cfg = RunConfig()
    q, c, m = cfg.secagg_quantization_range, cfg.secagg_clipping_range, cfg.secagg_max_weight
    # 1. No reply the server received carries model-sized plaintext: every ArrayRecord is empty...
    assert run.grid.received
    for msg in run.grid.received:
        assert all(len(record) == 0 for record in msg.content.array_records.values()), stage_of(msg)
        assert set(msg.content.config_records) <= {RECORD_KEY_CONFIGS, "candor"}
    # ...and each masked vector looks nothing like the site's quantised update.
    collected = [msg for msg in run.grid.received if Key.MASKED_PARAMETERS in msg.content.config_records.get(
        RECORD_KEY_CONFIGS, {})]
    assert len(collected) == len(sites)
    for msg in collected:
        site = sites[msg.metadata.src_node_id]
        masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        ratio = round(site.num_examples / m * q) / q
        update = np.concatenate([[0.0]] + [(site.trained[1][k].astype(np.float64)
                                            - run.models[0][k].numpy().astype(np.float64)).ravel() for k in run.models[0]])
        plain = np.round((np.clip(update * ratio, -c, c) + c) * q / (2 * c))
        plain[0] = round(site.num_examples / m * q)
        assert np.mean(np.abs(masked - plain) < q) < 0.05  # unmasked, every coordinate would be within 1 level
        assert np.mean(masked < q) < 0.05  # quantised values live in [0, Q]; masks spread them over [0, 2^32)
    # 2. The wrapped strategy (FedAvg's aggregation) is handed exactly one message: the secure mean.
    assert len(run.inner_calls) == 1 and len(run.inner_calls[0]) == 1
    (carrier,) = run.inner_calls[0]
    assert hash_arrays(carrier.content["arrays"]) == hash_arrays(run.models[1]) == run.secure.records[0]["aggregate_sha256"]
    assert run.secure.aggregate_sha256(1) == run.secure.records[0]["aggregate_sha256"]  # what the audit layer asks
    assert carrier.content["metrics"]["num-examples"] == sum(NS)
    for s in sites.values():
        assert max_diff(as64(ArrayRecord({k: Array(v) for k, v in s.trained[1].items()})), run.models[1]) > 1e-3
    # 3. The recorder gets every site's clear privacy metrics, and no arrays.
    assert sorted(str(msg.content["candor"]["site"]) for msg in run.recorder.train) == sorted(
        s.name for s in sites.values())
    for msg in run.recorder.train:
        assert not msg.content.array_records
        assert msg.content["metrics"]["epsilon"] == 1.25 and msg.content["metrics"]["secagg-clipped"] == 0


def plain_train_request(node: int = 3) -> Message:
    msg = Message(RecordDict({"arrays": initial_arrays(), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "x"
    return msg


def site_context(node: int = 3, **settings) -> "Context":
    from flwr.app import Context

    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                   run_config=RunConfig(min_sites=3, **settings).to_run_config())


def test_a_site_refuses_to_send_its_update_in_the_clear_when_the_run_is_secure():
    from candor.client import app as client_app

    def must_not_train(msg, ctx):
        raise AssertionError("the train function ran on a clear request in a secure run")

    # the mod itself, and the site's real ClientApp (whose train function carries it)
    for reply in (secagg_mod(plain_train_request(), site_context(secure_aggregation=True), must_not_train),
                  client_app.app(plain_train_request(), site_context(secure_aggregation=True))):
        assert reply.has_error() and reply.error.code == client_app.REFUSED
        assert "in the clear" in reply.error.reason


def test_without_secure_aggregation_the_mod_passes_the_request_through_unchanged():
    msg, ctx = plain_train_request(), site_context(secure_aggregation=False)
    seen = []

    def train(m, c):
        seen.append((m, c))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=m)

    reply = secagg_mod(msg, ctx, train)
    assert seen == [(msg, ctx)] and reply.content["metrics"]["num-examples"] == 1


def test_the_sites_clientapp_answers_a_secagg_stage_with_its_public_keys():
    """The real candor ClientApp routes a SecAgg+ stage to the protocol, not to plain training."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from candor.client import app as client_app

    setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
                          Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32,
                          Key.MAX_WEIGHT: 1000.0})
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=3, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "x"
    reply = client_app.app(msg, site_context(secure_aggregation=True))
    assert not reply.has_error()
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert isinstance(keys[Key.PUBLIC_KEY_1], bytes) and isinstance(keys[Key.PUBLIC_KEY_2], bytes)


# --- dropouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, summed", [
    ("setup", {101, 102, 104, 105}),
    ("share_keys", {101, 102, 104, 105}),
    ("collect_masked_vectors", {101, 102, 104, 105}),
    ("unmask", {101, 102, 103, 104, 105}),  # its masked update was already in the sum
])
def test_one_dropout_at_any_stage_still_gives_fedavg_of_the_summed_sites(loopback, stage, summed):
    sites = make_sites()
    run = run_secure(loopback, sites, drop={stage: {103}})
    included = [sites[n] for n in sorted(summed)]
    exact, _ = reference(included, 1, run.models[0])
    assert max_diff(exact, run.models[1]) <= tolerance(included, 1, run.models[0])
    record = run.secure.records[0]
    assert record["summed_sites"] == sorted(s.name for s in included)
    assert record["dropped_nodes"][{"collect_masked_vectors": "collect"}.get(stage, stage)] == [103]


def test_dropouts_at_two_stages_and_a_budget_refusal(loopback):
    sites = make_sites(NS + [60, 90])
    sites[107].refuse_rounds = {1}  # answers the training stage with a refusal
    run = run_secure(loopback, sites, drop={"setup": {102}, "collect_masked_vectors": {104}})
    included = [sites[n] for n in (101, 103, 105, 106)]
    exact, _ = reference(included, 1, run.models[0])
    assert max_diff(exact, run.models[1]) <= tolerance(included, 1, run.models[0])
    assert [m.has_error() for m in run.recorder.train].count(True) == 1


def test_too_many_dropouts_skip_the_round_without_unmasking_anything(loopback):
    sites = make_sites(NS[:3])
    run = run_secure(loopback, sites, rounds=2, drop={"collect_masked_vectors": {102, 103}})
    assert not [m for m in run.grid.sent if stage_of(m) == "unmask"]  # one site's vector is never unmasked
    assert max_diff(as64(run.models[0]), run.models[2]) == 0.0  # both rounds skipped: model unchanged
    assert all("skipped" in r["note"] for r in run.secure.records)
    assert run.inner_calls == []


# --- range checks --------------------------------------------------------------------------------

def test_clipping_is_counted_by_the_site_and_reported(loopback, caplog):
    sites = make_sites(NS[:3])
    sites[101].scale = 30.0  # (120 / 1000) x |update| exceeds c = 8 for a few coordinates
    with caplog.at_level(logging.WARNING):
        run = run_secure(loopback, sites)
    clipped = {str(m.content["candor"]["site"]): m.content["metrics"]["secagg-clipped"] for m in run.recorder.train}
    assert clipped["site-1"] > 0 and clipped["site-2"] == clipped["site-3"] == 0
    assert run.secure.records[0]["clipped_coordinates"] == clipped["site-1"]
    assert "clipped" in caplog.text


def test_a_site_whose_clear_weight_differs_from_its_masked_weight_is_caught(loopback):
    def lie(stage, nid, reply):
        if stage == "collect_masked_vectors" and nid == 102:
            metrics = reply.content["metrics"]
            metrics["num-examples"] = int(metrics["num-examples"]) + 100

    with pytest.raises(SecureAggregationError, match="securely summed weight"):
        run_secure(loopback, make_sites(), tamper=lie)


def test_fewer_than_three_sites_are_refused(loopback):
    # at construction: the wrapped strategy may sample fewer than 3 sites
    with pytest.raises(ValueError, match="at least 3 sites"):
        SecureAggregation(FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2))
    # in a round: a strategy that samples 2 sites anyway
    with pytest.raises(SecureAggregationError, match="at least 3 sites"):
        inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
        secure = SecureAggregation(inner)
        secure.inner.min_available_nodes = secure.inner.min_train_nodes = 2  # bypass the wrapper's floor
        grid = loopback(make_sites(NS[:2]))
        secure.configure_train(1, initial_arrays(), ConfigRecord(), grid)


def test_build_strategy_raises_min_sites_to_three_for_secure_aggregation():
    cfg = RunConfig(secure_aggregation=True, min_sites=2)
    inner = build_strategy(cfg)
    assert inner.min_train_nodes == inner.min_available_nodes == 3
    SecureAggregation.from_config(inner, cfg)  # accepted
    assert build_strategy(RunConfig(min_sites=2)).min_train_nodes == 2  # plain runs keep min-sites


# --- the run's stack: the audit log and secure_aggregation.json name the aggregate alike ---------

def test_audit_log_and_secure_aggregation_json_hash_each_aggregate_alike(loopback, tmp_path):
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from candor.common.demo import DEMO_SCHEMA_PATH
    from candor.common.encoding import Encoder
    from candor.common.schema import Schema
    from candor.server.audit import AuditLog
    from candor.server.outputs import RunRecorder
    from candor.server.strategy import assemble

    sites = make_sites(NS[:3])
    cfg = RunConfig(secure_aggregation=True, min_sites=3, dp=False)
    schema = Schema.load(DEMO_SCHEMA_PATH)
    recorder = RunRecorder(tmp_path, cfg=cfg, schema=schema, feature_names=Encoder(schema).feature_names)
    audit = AuditLog(tmp_path, Ed25519PrivateKey.generate(), ephemeral=True)
    inner = build_strategy(cfg)
    inner.fraction_evaluate = 0.0  # the loopback sites only train
    models = {}
    assemble(cfg, inner, recorder=recorder, audit=audit).start(
        grid=loopback(sites, run_config=cfg.to_run_config()), initial_arrays=initial_arrays(), num_rounds=2,
        timeout=10, evaluate_fn=lambda r, arrays: models.__setitem__(r, arrays))
    secure = json.loads((tmp_path / "secure_aggregation.json").read_text())["rounds"]
    logged = [e["body"] for e in audit.entries if e["kind"] == "round"]
    assert [r["round"] for r in secure] == [b["round"] for b in logged] == [1, 2]
    for r, (record, body) in enumerate(zip(secure, logged), start=1):
        assert body["secure_aggregation"] is True
        assert body["aggregate_sha256"] == record["aggregate_sha256"] == hash_arrays(models[r])
        assert body["global_model_sha256"] == hash_arrays(models[r])  # FedAvg adopts the secure mean as is
        assert all("sha256" not in u for u in body["updates"])
