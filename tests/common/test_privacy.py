"""Privacy accounting, checked against accountants outside the code under test
(Google's dp-accounting, and Opacus' accountants driven directly)."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from candor.common.errors import ConfigError
from candor.common.privacy import MechanismRecord, calibrate_noise_multiplier, default_delta, epsilon


def pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps by dp-accounting's PLD accountant."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    return acc.compose(event).get_epsilon(delta)


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


CASES = [  # (target ε, q, steps, δ): small hospital, larger bank, long run
    (1.0, 0.28, 60, 1e-5),
    (3.0, 0.04, 500, 1e-5),
    (8.0, 0.0256, 200, 1e-6),
]


@pytest.mark.parametrize("target, q, steps, delta", CASES)
def test_calibrated_sigma_meets_target_by_independent_pld(target, q, steps, delta):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    independent = pld_epsilon(sigma, q, steps, delta)
    assert independent <= target * 1.005  # PRV and PLD agree to ~0.01 (FIELD_NOTES)
    assert independent >= target * 0.9  # and the noise is not wastefully large


@pytest.mark.parametrize("target, q, steps, delta", CASES)
def test_calibration_with_rdp_is_a_guarantee_under_rdp(target, q, steps, delta):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps,
                                       accountant="rdp")
    assert rdp_epsilon(sigma, q, steps, delta) <= target


def test_calibration_accounts_for_prior_spending():
    prior = [MechanismRecord(round=1, noise_multiplier=2.0, sample_rate=0.1, steps=50)]
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, delta=1e-5, sample_rate=0.1, steps=100, prior=prior)
    acc = PRVAccountant()
    acc.history = [(2.0, 0.1, 50), (sigma, 0.1, 100)]
    assert acc.get_epsilon(delta=1e-5) <= 4.0


def test_unreachable_target_is_a_clear_error():
    prior = [MechanismRecord(round=1, noise_multiplier=0.5, sample_rate=1.0, steps=100)]
    with pytest.raises(ConfigError, match="already cost"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, prior=prior)


def test_epsilon_of_three_rounds_equals_one_accountant_fed_all_steps():
    rounds = [MechanismRecord(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=40) for r in (1, 2, 3)]
    acc = PRVAccountant()
    for _ in range(120):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    assert epsilon(rounds, delta=1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon(rounds, delta=1e-5) > epsilon(rounds[:1], delta=1e-5)
    rdp = RDPAccountant()
    rdp.history = [(1.1, 0.05, 120)]
    assert epsilon(rounds, delta=1e-5, accountant="rdp") == pytest.approx(rdp.get_epsilon(delta=1e-5), rel=1e-9)


def test_heterogeneous_rounds_compose():
    a = MechanismRecord(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=30)
    b = MechanismRecord(round=2, noise_multiplier=2.0, sample_rate=0.2, steps=30)
    both = epsilon([a, b], delta=1e-5)
    assert both > max(epsilon([a], delta=1e-5), epsilon([b], delta=1e-5))
    assert both < epsilon([a], delta=1e-5) + epsilon([b], delta=1e-5)  # tighter than basic composition


def test_empty_history_spends_nothing():
    assert epsilon([], delta=1e-5) == 0.0


@pytest.mark.parametrize("n", [1, 30, 199, 5_000, 300_000])
def test_default_delta_is_well_below_one_over_n(n):
    assert default_delta(n) <= 0.1 / n
    assert default_delta(n) <= 1e-5


def test_gaussian_dp_approximation_is_refused():
    with pytest.raises(ConfigError, match="under-state"):
        epsilon([MechanismRecord(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10)], delta=1e-5,
                accountant="gdp")


@pytest.mark.parametrize("field, value", [("noise_multiplier", 0.0), ("sample_rate", 1.5), ("steps", -1)])
def test_mechanism_record_rejects_impossible_values(field, value):
    kwargs = dict(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10) | {field: value}
    with pytest.raises(ConfigError):
        MechanismRecord(**kwargs)


def test_paper_reference_point():
    """Abadi et al. 2016: q=0.01, σ=4, 10k steps, δ=1e-5 (FIELD_NOTES: PRV 0.957, PLD 0.947)."""
    eps = epsilon([MechanismRecord(round=1, noise_multiplier=4.0, sample_rate=0.01, steps=10_000)], delta=1e-5)
    assert math.isclose(eps, 0.957, abs_tol=0.02)
