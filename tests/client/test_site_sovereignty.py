"""A deployed site's own settings bound what a run may ask of it, and nothing in a run
config selects code or paths there (client/site.py, common/policy.py SiteLimits)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata

from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH, write_demo_sites
from candor.common.encoding import Encoder
from candor.common.errors import BudgetExceeded, ConfigError, RunRefused
from candor.common.models import build_model
from candor.common.policy import LifetimeBudget, RunPrivacy, SiteLimits, check_release
from candor.common.privacy import MechanismRecord
from candor.common.schema import Schema


@pytest.mark.parametrize("cfg, fragment", [
    (RunConfig(dp=False), "dp = false is outside this site's limit (private training only"),
    (RunConfig(num_server_rounds=9), "num-server-rounds = 9 is outside this site's limit (--max-rounds 5)"),
    (RunConfig(target_epsilon=8.0), "target-epsilon = 8.0 is outside this site's limit (--max-run-epsilon 4)"),
    (RunConfig(max_grad_norm=5.0), "max-grad-norm = 5.0 is outside this site's limit (--max-grad-norm 2)"),
    (RunConfig(batch_size=512), "batch-size = 512 is outside this site's limit (--max-batch-size 64)"),
])
def test_a_run_outside_the_sites_limits_is_refused_with_the_setting_and_the_limit(cfg, fragment):
    limits = SiteLimits(max_rounds=5, max_run_epsilon=4.0, max_grad_norm=2.0, max_batch_size=64)
    with pytest.raises(RunRefused, match="site 'h1' refuses this run") as err:
        limits.check(cfg, site="h1")
    assert fragment in str(err.value)
    limits.check(RunConfig(num_server_rounds=5, target_epsilon=4.0), site="h1")  # at the limits: accepted
    SiteLimits(allow_non_private=True).check(RunConfig(dp=False), site="h1")


def test_a_bad_limit_names_the_option():
    with pytest.raises(ConfigError, match="--max-run-epsilon must be a number > 0"):
        SiteLimits(max_run_epsilon=-1.0)


def test_the_sites_per_run_limit_holds_when_the_run_sets_no_target():
    run = RunPrivacy(accountant="prv", delta=1e-5, target_epsilon=0.0, noise_multiplier=0.5, rounds=50,
                     site_max_epsilon=2.0)
    mech = [MechanismRecord(round=r, noise_multiplier=0.5, sample_rate=0.2, steps=20, run_id="r") for r in (1, 2)]
    with pytest.raises(BudgetExceeded, match=r"the most one run may cost this site \(its --max-run-epsilon"):
        check_release(mech[1], run=run, run_history=mech[:1], lifetime_history=mech[:1], lifetime_deltas=[1e-5],
                      budget=LifetimeBudget(), site="h1")


# --- the ClientApp at a deployed site -------------------------------------------------
@pytest.fixture
def deployed(tmp_path):
    (name, data), = write_demo_sites(tmp_path, num_sites=1)
    schema = Schema.load(DEMO_SCHEMA_PATH)
    schema.save(tmp_path / "schema.toml")
    node = {"site-name": "h1", "data-path": str(data), "site-dir": str(tmp_path),
            "schema-path": str(tmp_path / "schema.toml"), "schema-sha256": schema.sha256()}
    return tmp_path, node, schema


def _train(tmp_path, node, site_schema, **run_config):
    from candor.client.app import app

    cfg = RunConfig(num_server_rounds=1, local_epochs=1.0).replace(**run_config)
    encoder = Encoder(site_schema)
    model = build_model("mlp", num_features=encoder.num_features, num_outputs=1, hidden=cfg.hidden_sizes)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
        {"server-round": 1, "schema-sha256": site_schema.sha256()})})
    meta = Metadata(run_id=5, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=600, message_type="train")
    ctx = Context(run_id=5, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    return app(Message(content=content, metadata=meta), ctx)


def test_a_run_config_data_loader_is_refused_without_importing_it(deployed, monkeypatch):
    tmp_path, node, schema = deployed
    (tmp_path / "intruder.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').write('ran')\n"
                                          "def load(*a, **k): raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reply = _train(tmp_path, node, schema, data_loader="intruder:load")
    assert reply.has_error() and "refuses this run: its run config names data-loader" in reply.error.reason
    reply = _train(tmp_path, node, schema, data_loader="os:system")
    assert reply.has_error() and "Nothing was imported" in reply.error.reason
    assert not (tmp_path / "MARKER").exists() and "intruder" not in sys.modules
    assert not (tmp_path / "ledger.json").exists()


def test_a_plug_in_model_runs_only_when_the_site_allows_it(deployed, monkeypatch):
    tmp_path, node, schema = deployed
    (tmp_path / "their_model.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reply = _train(tmp_path, node, schema, model="their_model:make")
    assert reply.has_error() and "is a plug-in this site has not allowed" in reply.error.reason
    assert not (tmp_path / "MARKER").exists()


def test_non_private_training_is_refused_unless_the_site_allows_it(deployed):
    tmp_path, node, schema = deployed
    reply = _train(tmp_path, node, schema, dp=False)
    assert reply.has_error() and "dp = false is outside this site's limit" in reply.error.reason
    reply = _train(tmp_path, {**node, "allow-non-private": True}, schema, dp=False)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""


def test_the_schema_is_the_sites_own_never_the_run_configs(deployed, tmp_path_factory):
    tmp_path, node, schema = deployed
    other = tmp_path_factory.mktemp("coordinator") / "schema.json"
    other.write_text(json.dumps({"label": {"name": "y", "task": "binary", "positive": ["1"], "negative": ["0"]},
                                 "features": [{"name": "x", "kind": "numeric", "lower": 0, "upper": 1}]}))
    reply = _train(tmp_path, node, schema, schema=str(other), sim_manifest=str(other))  # both ignored
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    entries = json.loads((tmp_path / "ledger.json").read_text())["entries"]
    assert [e["kind"] for e in entries] == ["row-count", "training"]  # trained on the site's own schema
    (tmp_path / "schema.toml").write_text((tmp_path / "schema.toml").read_text().replace("upper = ", "upper = 1", 1))
    reply = _train(tmp_path, node, schema)
    assert reply.has_error() and "is not the schema it accepted" in reply.error.reason
