"""Which node is a simulated site, and where its noise seeds come from (client/site.py):
explicit, never inferred from a missing key; a deployed site always draws OS entropy."""

from __future__ import annotations

import json

import pytest

from candor.client.site import NOISE_OS_ENTROPY, NOISE_PUBLIC_SEED, resolve_site
from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.errors import ConfigError


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({"noise_seed": "public-seed", "sites": [
        {"name": "a", "data": str(tmp_path / "a.csv"), "ledger": str(tmp_path / "a.json")},
        {"name": "b", "data": str(tmp_path / "b.csv"), "ledger": str(tmp_path / "b.json"), "budget_epsilon": 4.0}]}))
    return path


def test_a_deployed_site_draws_os_entropy_whatever_the_run_config_says(tmp_path, manifest):
    cfg = RunConfig(sim_manifest=str(manifest), schema=str(DEMO_SCHEMA_PATH))
    node = {"data-path": str(tmp_path / "mine.csv"), "site-dir": str(tmp_path), "site-name": "h1",
            "schema-path": str(DEMO_SCHEMA_PATH),
            "partition-id": 0, "num-partitions": 2}
    spec = resolve_site(node, cfg)
    assert (spec.name, spec.simulated, spec.public_seed, spec.noise_seed) == ("h1", False, False, NOISE_OS_ENTROPY)
    assert spec.data_path == str(tmp_path / "mine.csv")  # the manifest is never read for a deployed site


def test_a_candor_sim_site_seeds_from_the_public_seed_as_its_manifest_says(manifest):
    spec = resolve_site({"partition-id": 1, "num-partitions": 2}, RunConfig(sim_manifest=str(manifest)))
    assert (spec.name, spec.simulated, spec.noise_seed, spec.budget.epsilon) == ("b", True, NOISE_PUBLIC_SEED, 4.0)
    doc = json.loads(manifest.read_text())
    doc.pop("noise_seed")
    manifest.write_text(json.dumps(doc))
    assert resolve_site({"partition-id": 1, "num-partitions": 2}, RunConfig(sim_manifest=str(manifest))).noise_seed \
        == NOISE_OS_ENTROPY


def test_a_bare_flwr_run_is_simulated_on_the_demo_data_with_os_entropy():
    spec = resolve_site({"partition-id": 0, "num-partitions": 2}, RunConfig())
    assert spec.simulated and spec.noise_seed == NOISE_OS_ENTROPY
    assert spec.schema_path == str(DEMO_SCHEMA_PATH) and spec.name == "hospital-1"


@pytest.mark.parametrize("node", [{}, {"partition-id": 0}, {"site-name": "h1"}])
def test_a_node_that_is_neither_is_refused(node):
    with pytest.raises(ConfigError, match="candor-client start SITE_DIR --data PATH"):
        resolve_site(node, RunConfig())
