"""RunConfig: the only reader of run-config keys."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from candor.common.config import RunConfig
from candor.common.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_declares_every_key_with_the_dataclass_default():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_run_config()


def test_round_trip():
    cfg = RunConfig(num_server_rounds=7, dp=False, model="logreg")
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize("key, value, fragment", [
    ("num-server-rounds", 0, "'num-server-rounds' parameter must be an integer >= 1. Got 0"),
    ("target-epsilon", -1.0, "'target-epsilon' parameter must be a number >= 0"),
    ("accountant", "gdp", "under-state"),
    ("strategy", "fedsgd", "one of fedavg, fedprox, fedadam"),
    ("batch-size", "big", "must be of type int; got 'big'"),
    ("test-fraction", 1.0, "'test-fraction' parameter must be a number in (0, 1)"),
    ("hidden", "64,,x", "comma-separated positive layer widths"),
    ("no-such-key", 1, "Unknown run-config key 'no-such-key'"),
])
def test_bad_values_name_the_key_the_rule_and_the_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    assert fragment in str(err.value)


def test_dp_needs_a_target_or_a_noise_multiplier():
    with pytest.raises(ConfigError, match="target-epsilon"):
        RunConfig(dp=True, target_epsilon=0.0, noise_multiplier=0.0)
    assert RunConfig(dp=False, target_epsilon=0.0).dp is False


def test_merge_overrides_layers_base_then_items_then_fixed_and_types_the_values():
    from candor.common.config import merge_overrides

    values = merge_overrides(["num-server-rounds=7", "local-epochs=1", "dp=false", "hidden=16,8",
                              "num-server-rounds=9"],
                             base={"min-sites": 4, "num-server-rounds": 2, "model": "logreg"},
                             schema="/s.toml", out_dir="/out", sim_manifest=None)
    assert values == {"min-sites": 4, "num-server-rounds": 9, "model": "logreg", "local-epochs": 1.0,
                      "dp": False, "hidden": "16,8", "schema": "/s.toml", "out-dir": "/out"}
    assert isinstance(values["local-epochs"], float)  # typed as RunConfig reads it
    cfg = RunConfig.from_run_config(values)
    assert (cfg.num_server_rounds, cfg.min_sites, cfg.out_dir) == (9, 4, "/out")
    assert merge_overrides([]) == {}
    assert merge_overrides(["min-sites=3"], base={"min-sites": 4}) == {"min-sites": 3}  # -c wins over base


@pytest.mark.parametrize("items, fragment", [
    (["no-such-key=1"], "Unknown run-config key 'no-such-key'"),
    (["num-server-rounds=0"], "'num-server-rounds' parameter must be an integer >= 1. Got 0"),
    (["num-server-rounds"], "-c expects KEY=VALUE"),
])
def test_merge_overrides_names_the_bad_key_or_value(items, fragment):
    from candor.common.config import merge_overrides

    with pytest.raises(ConfigError) as err:
        merge_overrides(items)
    assert fragment in str(err.value)
