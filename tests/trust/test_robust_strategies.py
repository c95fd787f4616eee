"""Flower's robust strategies, selectable by run config; FedMedian ignores an outlier."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from trust_helpers import reply

from candor.common.config import RunConfig
from candor.common.errors import ConfigError
from candor.server.strategy import build_strategy

HONEST = [0.9, 1.0, 1.2]
OUTLIER = 1000.0


def site_replies():
    values = HONEST + [OUTLIER]
    return [reply(f"site-{i}", {"w": np.full(4, v, dtype=np.float32)}, num_examples=10 * (i + 1))
            for i, v in enumerate(values)]


def test_each_strategy_name_builds_flowers_strategy_with_its_settings():
    assert type(build_strategy(RunConfig(strategy="fedmedian"))) is FedMedian
    trimmed = build_strategy(RunConfig(strategy="fedtrimmedavg", trimmed_beta=0.3))
    assert type(trimmed) is FedTrimmedAvg and trimmed.beta == 0.3
    krum = build_strategy(RunConfig(strategy="krum", krum_byzantine=1, min_sites=5))
    assert type(krum) is Krum and krum.num_malicious_nodes == 1
    assert RunConfig.from_run_config({"strategy": "fedmedian"}).strategy == "fedmedian"


def test_fedmedian_ignores_one_outlier_that_drags_fedavg_away():
    median, _ = build_strategy(RunConfig(strategy="fedmedian", min_sites=3)).aggregate_train(1, site_replies())
    np.testing.assert_allclose(median["w"].numpy(), np.median(HONEST + [OUTLIER]))  # (1.0 + 1.2) / 2
    assert median["w"].numpy().max() < max(HONEST)
    mean, _ = build_strategy(RunConfig(strategy="fedavg")).aggregate_train(1, site_replies())
    assert mean["w"].numpy().min() > 100  # the same outlier moves FedAvg's weighted mean (400.x)


def test_trimmed_mean_and_krum_leave_the_outlier_out():
    trimmed, _ = build_strategy(RunConfig(strategy="fedtrimmedavg", trimmed_beta=0.25)).aggregate_train(
        1, site_replies())
    np.testing.assert_allclose(trimmed["w"].numpy(), np.mean([1.0, 1.2]), rtol=1e-6)  # one cut at each end
    chosen, _ = build_strategy(RunConfig(strategy="krum", krum_byzantine=0, min_sites=3)).aggregate_train(
        1, site_replies())
    assert np.isclose(chosen["w"].numpy()[0], HONEST).any()  # Krum picks one honest site's update


@pytest.mark.parametrize("settings, fragment", [
    ({"strategy": "krum", "krum-byzantine": 1, "min-sites": 4}, "'min-sites' parameter must be at least 2 x "
                                                               "krum-byzantine + 3 = 5"),
    ({"strategy": "fedtrimmedavg", "trimmed-beta": 0.5}, "'trimmed-beta' parameter must be a fraction in [0, 0.5)"),
    ({"max-update-norm": -1.0}, "'max-update-norm' parameter must be a number >= 0"),
    ({"krum-byzantine": -1}, "'krum-byzantine' parameter must be an integer >= 0"),
    ({"strategy": "fedmedian", "secure-aggregation": True, "min-sites": 3}, "cannot be combined with strategy "
                                                                            "'fedmedian'"),
])
def test_bad_robustness_settings_are_one_clear_message(settings, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(settings)
    assert fragment in str(err.value)


def test_fedavg_stays_the_default():
    assert type(build_strategy(RunConfig())) is FedAvg
