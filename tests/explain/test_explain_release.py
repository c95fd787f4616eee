"""The site's DP release of global importance: clipping, noise, accounting, ledger."""

from __future__ import annotations

import json
import time

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import brentq
from scipy.stats import norm

from candor.common.config import RunConfig
from candor.common.encoding import Encoder
from candor.common.explain import Explanation, clip_rows, release_importance, release_mechanism
from candor.common.models import build_model
from candor.client.outbox import Outbox
from candor.common.privacy import MechanismRecord, epsilon

from clinic_data import SCHEMA, records

rows = arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(1, 6)),
              elements=st.floats(0, 50, allow_nan=False, allow_infinity=False))


@settings(max_examples=200, deadline=None)
@given(v=rows, clip=st.floats(0.01, 10))
def test_clipping_bounds_every_row_and_keeps_small_rows(v, clip):
    out = clip_rows(v, clip)
    norms = np.linalg.norm(v, axis=1)
    assert (np.linalg.norm(out, axis=1) <= clip * (1 + 1e-9)).all()
    np.testing.assert_array_equal(out[norms <= clip], v[norms <= clip])
    big = norms > clip  # scaled, not truncated: direction kept
    np.testing.assert_allclose(out[big] * norms[big, None] / clip, v[big], rtol=1e-9, atol=1e-300)


@settings(max_examples=200, deadline=None)
@given(v=rows, clip=st.floats(0.01, 10), data=st.data())
def test_removing_one_record_moves_the_sum_by_at_most_clip(v, clip, data):
    i = data.draw(st.integers(0, len(v) - 1))
    change = clip_rows(v, clip).sum(0) - clip_rows(np.delete(v, i, axis=0), clip).sum(0)
    assert np.linalg.norm(change) <= clip * (1 + 1e-9)


def _explanation(n=40, f=5, seed=0) -> Explanation:
    c = np.random.default_rng(seed).normal(0, 0.4, size=(n, f))
    return Explanation(tuple(f"x{j}" for j in range(f)), c, np.zeros(n), np.zeros(n), np.ones(n, int), 0.0)


def test_noise_has_the_documented_std_and_no_bias():
    expl = _explanation()
    v = np.abs(expl.contributions)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    clipped_sum = (v * np.minimum(1, 0.5 / norms)).sum(0)  # computed here, not by clip_rows
    rng = np.random.default_rng(123)
    noise = np.array([release_importance(expl, clip=0.5, noise_multiplier=2.0, rng=rng).mean * 40 - clipped_sum
                      for _ in range(4000)])
    assert noise.std(axis=0) == pytest.approx(np.full(5, 2.0 * 0.5), rel=0.05)
    assert np.abs(noise.mean(axis=0)).max() < 4 * 1.0 / np.sqrt(4000)
    exact = release_importance(expl, clip=None, noise_multiplier=None)
    np.testing.assert_allclose(exact.mean, v.mean(0))


def test_release_needs_both_parameters_or_neither():
    with pytest.raises(Exception, match="both clip and noise_multiplier"):
        release_importance(_explanation(), clip=1.0, noise_multiplier=None)


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Theorem 8: the exact (ε, δ) curve of the Gaussian mechanism."""
    def d(eps):
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - np.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma))
    return brentq(lambda e: d(e) - delta, 1e-9, 100)


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_the_release_is_accounted_as_the_gaussian_mechanism(sigma):
    mech = release_mechanism(round=6, noise_multiplier=sigma, run_id="r")
    assert (mech.sample_rate, mech.steps, mech.noise_multiplier) == (1.0, 1, sigma)
    exact = _analytic_gaussian_epsilon(sigma, 1e-5)
    assert exact <= epsilon([mech], delta=1e-5) <= exact * 1.02  # PRV: a tight upper bound
    assert exact <= epsilon([mech], delta=1e-5, accountant="rdp")


def test_the_release_composes_with_training():
    training = [MechanismRecord(round=r, noise_multiplier=2.4, sample_rate=0.28, steps=11) for r in (1, 2)]
    mech = release_mechanism(round=3, noise_multiplier=3.0)
    total = epsilon(training + [mech], delta=1e-5)
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.28, dp_accounting.GaussianDpEvent(2.4)), 22), dp_accounting.GaussianDpEvent(3.0)]
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    independent = pld.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(1e-5)
    assert total == pytest.approx(independent, rel=0.02)
    assert epsilon(training, delta=1e-5) < total < epsilon(training, delta=1e-5) + epsilon([mech], delta=1e-5)


# --- the ClientApp handler -------------------------------------------------------
def _site(tmp_path, schema, **entry):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    records(200, seed=5).to_csv(tmp_path / "site.csv", index=False)
    manifest = {"sites": [{"name": "h1", "data": str(tmp_path / "site.csv"),
                           "ledger": str(tmp_path / "ledger.json"), **entry}]}
    (tmp_path / "sites.json").write_text(json.dumps(manifest))
    return tmp_path / "ledger.json"


def _ask(tmp_path, schema, *, message_type="query.explain", server_round=3, **run_config):
    from candor.client.app import app

    cfg = RunConfig(schema=str(tmp_path / "schema.json"), sim_manifest=str(tmp_path / "sites.json"),
                    num_server_rounds=2, target_epsilon=0.0, noise_multiplier=1.0, explain_clip=0.5,
                    explain_noise_multiplier=2.0).replace(**run_config)
    encoder = Encoder(schema)
    torch.manual_seed(0)
    model = build_model("mlp", num_features=encoder.num_features, num_outputs=1, hidden=cfg.hidden_sizes)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
        {"server-round": server_round, "schema-sha256": schema.sha256()})})
    meta = Metadata(run_id=77, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=600, message_type=message_type)
    context = Context(run_id=77, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config=cfg.to_run_config())
    return app(Message(content=content, metadata=meta), context)


def test_a_private_release_is_ledgered_before_it_is_sent(tmp_path, schema):
    ledger = _site(tmp_path, schema)
    reply = _ask(tmp_path, schema)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content.metric_records["metrics"]
    ident = reply.content.config_records["candor"]
    assert set(metrics) == {"num-examples", "age", "chol", "cp", "smoker"}
    # divided by the site's DP count of its 40 held-out rows (20 % of 200), never the exact count
    assert metrics["num-examples"] == Outbox(ledger).kept("77", "row-count").metrics["test"]
    assert ident["site"] == "h1" and ident["release"] == "dp"
    entries = json.loads(ledger.read_text())["entries"]
    assert [e["kind"] for e in entries] == ["row-count", "explanation"]
    e = entries[1]
    assert (e["round"], e["sample_rate"], e["steps"], e["noise_multiplier"], e["run_id"]) == (3, 1.0, 1, 2.0, "77")
    assert json.loads(ident["mechanism"])["noise_multiplier"] == 2.0
    assert ident["epsilon"] == pytest.approx(epsilon([MechanismRecord.from_dict(x) for x in entries],
                                                     delta=ident["delta"]))


def test_a_release_past_the_lifetime_budget_is_refused_and_not_recorded(tmp_path, schema):
    ledger = _site(tmp_path, schema, budget_epsilon=1.0)  # one σ = 2 Gaussian alone costs ε ≈ 2
    reply = _ask(tmp_path, schema)
    assert reply.has_error() and "lifetime ε would reach" in reply.error.reason
    # only the row counts (ε ≈ 0.17, within the budget) are charged; the release is not
    assert [e["kind"] for e in json.loads(ledger.read_text())["entries"]] == ["row-count"]


def test_an_opted_out_site_sends_no_statistic_and_spends_nothing(tmp_path, schema):
    ledger = _site(tmp_path, schema, explain_opt_out=True)
    reply = _ask(tmp_path, schema)
    assert not reply.has_error()
    assert len(reply.content.metric_records) == 0
    assert reply.content.config_records["candor"]["release"] == "opted-out"
    assert not ledger.exists()


def test_a_non_private_run_sends_exact_statistics_unledgered(tmp_path, schema):
    ledger = _site(tmp_path, schema)
    reply = _ask(tmp_path, schema, dp=False)
    assert reply.content.config_records["candor"]["release"] == "exact"
    assert min(v for k, v in reply.content.metric_records["metrics"].items() if k != "num-examples") >= 0
    assert not ledger.exists()


def test_training_reserves_the_release_so_the_run_meets_its_target(tmp_path, schema):
    """With target-epsilon set, client/app.py calibrates training with the release as a
    prior: one training round, then the release, stay within the target together."""
    ledger = _site(tmp_path, schema, evaluation="local")  # no evaluation release: the run is train + explain
    run = dict(num_server_rounds=1, target_epsilon=3.0, accountant="rdp", batch_size=40, local_epochs=1.0,
               explain_noise_multiplier=4.0)
    trained = _ask(tmp_path, schema, message_type="train", server_round=1, **run)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    explained = _ask(tmp_path, schema, server_round=2, **run)
    assert not explained.has_error(), explained.error.reason if explained.has_error() else ""
    history = [MechanismRecord.from_dict(e) for e in json.loads(ledger.read_text())["entries"]]
    rows = Outbox(ledger).kept("77", "row-count").metrics["train"]  # the DP count of the 160 training rows
    assert [(h.kind, h.round, h.sample_rate) for h in history] == [
        ("row-count", 1, 1.0), ("training", 1, min(1.0, 40 / rows)), ("explanation", 2, 1.0)]
    delta = explained.content.config_records["candor"]["delta"]
    assert 2.9 < epsilon(history, delta=delta, accountant="rdp") <= 3.0


# --- the coordinator --------------------------------------------------------------
def test_global_importance_is_the_row_weighted_mean_of_the_released_sites():
    from candor.server.explanations import aggregate

    sites = {"a": {"release": "dp", "num_examples": 10, "importance": {"x": 0.1, "y": 0.3}},
             "b": {"release": "dp", "num_examples": 30, "importance": {"x": 0.5, "y": 0.1}},
             "c": {"release": "opted-out"}, "node 9": {"release": "refused", "reason": "budget"}}
    out = aggregate(sites, ["x", "y"])
    assert out["num_examples"] == 40
    assert out["global"] == pytest.approx({"x": (1 + 15) / 40, "y": (3 + 3) / 40})
    assert out["ranking"] == ["x", "y"]
    assert aggregate({"c": {"release": "opted-out"}}, ["x"]) == {"global": {}, "ranking": [], "num_examples": 0}


def test_the_recorder_adds_the_release_to_the_site_privacy_history(tmp_path, schema):
    from candor.server.explanations import card_section
    from candor.server.outputs import RunRecorder

    recorder = RunRecorder(tmp_path, cfg=RunConfig(), schema=schema, feature_names=Encoder(schema).feature_names)
    training = [MechanismRecord(round=r, noise_multiplier=2.4, sample_rate=0.28, steps=11) for r in (1, 2)]
    recorder.privacy["h1"] = {"epsilon": epsilon(training, delta=1e-5), "delta": 1e-5, "accountant": "prv",
                              "history": [{k: v for k, v in t.to_dict().items() if k != "run_id"} for t in training]}
    mech = release_mechanism(round=3, noise_multiplier=3.0)
    total = recorder.record_release("h1", mech, what="explanation", delta=1e-5, accountant="prv")
    p = recorder.privacy_doc()["sites"]["h1"]
    assert [h["round"] for h in p["history"]] == [1, 2, 3]
    assert p["epsilon"] == total == pytest.approx(epsilon(training + [mech], delta=1e-5))
    assert p["epsilon_before_explanation"] == pytest.approx(epsilon(training, delta=1e-5))
    assert [(r["kind"], r["releases"], r["noise_multiplier"]) for r in p["releases"]] == [
        ("training", 2, [2.4]), ("explanation", 1, [3.0])]
    assert p["unprotected"] == [] and p["adjacency"] == "add/remove one row of the site's table"
    doc = {"method": "IG", "statistic": "mean", "release": {"kind": "dp", "clip": 0.5, "noise_multiplier": 3.0},
           "sites": {"h1": {"release": "dp", "num_examples": 29, "epsilon_explanation": 1.28},
                     "h2": {"release": "opted-out"}},
           "global": {"x": 0.2}, "ranking": ["x"]}
    card = card_section(doc)
    assert "| h2 | opted-out | — | — |" in card and "differentially private" in card and "1. x: 0.200" in card
