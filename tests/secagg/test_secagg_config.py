"""Secure-aggregation settings: validated once in RunConfig; protocol sizes derived from them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import candor.common.config as config
from candor.common.config import SECAGG_STRATEGIES, STRATEGIES, RunConfig
from candor.common.errors import ConfigError
from candor.server.secagg import num_shares_for, rounding_bound, threshold_for, weight_shift


def test_off_by_default_and_every_secure_strategy_is_a_known_strategy():
    assert RunConfig().secure_aggregation is False
    assert set(SECAGG_STRATEGIES) <= set(STRATEGIES)
    assert RunConfig.from_run_config({"secure-aggregation": "true"}).secure_aggregation is True


def test_strategies_that_need_each_update_are_refused(monkeypatch):
    extra = tuple(n for n in ("fedmedian", "krum") if n not in STRATEGIES)  # in case the list loses them
    monkeypatch.setattr(config, "STRATEGIES", STRATEGIES + extra)
    names = sorted(set(STRATEGIES + extra) - set(SECAGG_STRATEGIES))
    for name in names:
        assert RunConfig(strategy=name, min_sites=5).strategy == name  # fine without secure aggregation
        with pytest.raises(ConfigError, match=f"strategy '{name}'.*weighted sum"):
            RunConfig.from_run_config({"strategy": name, "min-sites": 5, "secure-aggregation": True})


def test_per_site_update_checks_are_refused_with_secure_aggregation():
    if "max_update_norm" not in RunConfig.__dataclass_fields__:
        pytest.skip("no per-site update bound in this RunConfig")
    assert RunConfig(max_update_norm=5.0).max_update_norm == 5.0
    with pytest.raises(ConfigError, match="max-update-norm"):
        RunConfig(max_update_norm=5.0, secure_aggregation=True)


@pytest.mark.parametrize("key, value, fragment", [
    ("secagg-num-shares", 2, "'secagg-num-shares' parameter must be a fraction in (0, 1] of the sampled sites or a whole count >= 3"),
    ("secagg-num-shares", 4.5, "whole count >= 3. Got 4.5"),
    ("secagg-num-shares", 0.0, "Got 0.0"),
    ("secagg-reconstruction-threshold", 0.4, "'secagg-reconstruction-threshold' parameter must be a fraction in [0.5, 1]"),
    ("secagg-clipping-range", 0.0, "'secagg-clipping-range' parameter must be a number > 0"),
    ("secagg-max-weight", -1.0, "'secagg-max-weight' parameter must be a number > 0"),
    ("secagg-quantization-range", 2**31, "'secagg-quantization-range' parameter must be an integer in [2, 2^31)"),
])
def test_bad_settings_name_the_key_the_rule_and_the_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    assert fragment in str(err.value)


@given(sites=st.integers(3, 300), shares=st.one_of(st.floats(0.01, 1.0), st.integers(3, 400).map(float)),
       threshold=st.floats(0.5, 1.0))
def test_shares_and_threshold_are_consistent(sites, shares, threshold):
    n = num_shares_for(shares, sites)
    t = threshold_for(threshold, n)
    assert 3 <= n <= sites and (n == sites or n % 2 == 1)  # a symmetric ring of neighbours, or everyone
    assert 2 <= t <= n and t > n / 2  # a strict majority: one site's seed and key never both leak


def test_default_threshold_tolerates_a_minority_of_dropouts():
    assert [threshold_for(0.5, n) for n in (3, 4, 5, 20)] == [2, 3, 3, 11]
    assert threshold_for(1.0, 7) == 7


def test_error_terms_shrink_with_site_size_and_grow_with_the_weight_scale():
    small = rounding_bound([100, 100, 100], clipping_range=8, max_weight=1000, quantization_range=2**22)
    assert small == pytest.approx(3 * (16 / 2**22) / (3 * round(0.1 * 2**22) / 2**22))
    assert rounding_bound([1000] * 3, clipping_range=8, max_weight=1000, quantization_range=2**22) < small / 9
    assert rounding_bound([100] * 3, clipping_range=8, max_weight=10000, quantization_range=2**22) > small * 9
    assert weight_shift([100, 100, 100], max_weight=1000, quantization_range=2**22) < 1e-12
    assert 0 < weight_shift([7, 100, 1234], max_weight=1000, quantization_range=2**22) < 1e-5
