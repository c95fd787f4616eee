"""The privacy policy (common/policy.py): σ for the run, the run's target, the lifetime
budget, and the lifetime ε reported by the same rule that is enforced. Expected ε values
come from dp-accounting, outside the code under test."""

from __future__ import annotations

import dp_accounting
import pytest

from candor.common.config import RunConfig
from candor.common.errors import BudgetExceeded, ConfigError
from candor.common.policy import LIFETIME_ACCOUNTANT, LifetimeBudget, RunPrivacy, check_release, lifetime_spent
from candor.common.privacy import Accountant, MechanismRecord


def pld_epsilon(parts: list[tuple[float, float, int]], delta: float) -> float:
    """ε of the composition of (σ, q, steps) parts by dp-accounting's PLD accountant."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in parts:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def run_privacy(**kw) -> RunPrivacy:
    values = dict(accountant="prv", delta=1e-5, target_epsilon=3.0, noise_multiplier=0.0, rounds=3,
                  explain_noise_multiplier=3.0)
    return RunPrivacy(**{**values, **kw})


def rec(round: int, sigma: float = 1.2, q: float = 0.1, steps: int = 30, run_id: str = "r1") -> MechanismRecord:
    return MechanismRecord(round=round, noise_multiplier=sigma, sample_rate=q, steps=steps, run_id=run_id)


def test_unknown_accountant_is_an_error_never_a_silent_fallback():
    with pytest.raises(ConfigError, match="accountant"):
        Accountant("gdp", delta=1e-5)
    with pytest.raises(ConfigError, match="accountant"):
        run_privacy(accountant="RDP ")


def test_accountant_state_round_trips_and_composes():
    acc = Accountant("rdp", delta=1e-6).compose(rec(1), rec(2))
    again = Accountant.from_state_dict(acc.state_dict())
    assert again.history == acc.history and again.name == "rdp" and again.delta == 1e-6
    assert again.epsilon() == acc.epsilon() > Accountant("rdp", delta=1e-6, history=[rec(1)]).epsilon()
    assert acc.would_exceed(rec(3), limit=acc.epsilon()) and not acc.would_exceed(rec(3), limit=1e3)


def test_sigma_covers_every_planned_round_and_the_explanation_release():
    run = run_privacy()
    sigma = run.plan_sigma([], sample_rate=0.1, steps_per_round=30)
    total = pld_epsilon([(sigma, 0.1, 90), (3.0, 1.0, 1)], 1e-5)  # 3 rounds + the Gaussian release
    assert total <= 3.0 * 1.005
    assert total >= 3.0 * 0.95  # the noise is not wastefully large
    # Without the release, the same target buys less noise.
    assert run_privacy(explain_noise_multiplier=None).plan_sigma([], sample_rate=0.1, steps_per_round=30) < sigma


def test_sigma_is_fixed_at_the_first_round_for_the_whole_run():
    run = run_privacy()
    assert run.plan_sigma([rec(1, sigma=2.5)], sample_rate=0.3, steps_per_round=7) == 2.5
    assert run_privacy(target_epsilon=0.0, noise_multiplier=1.7).plan_sigma([], sample_rate=0.1,
                                                                             steps_per_round=30) == 1.7


def test_a_release_larger_than_the_target_is_not_reserved():
    run = run_privacy(target_epsilon=1.0)  # a σ = 3 Gaussian alone costs ε ≈ 1.3 at δ = 1e-5
    assert run.explanation_reserve(round=4) == []
    sigma = run.plan_sigma([], sample_rate=0.1, steps_per_round=30)
    assert pld_epsilon([(sigma, 0.1, 90)], 1e-5) == pytest.approx(1.0, abs=0.02)


def test_from_config_takes_the_run_settings_and_the_sites_opt_out():
    cfg = RunConfig(target_epsilon=2.0, num_server_rounds=4, accountant="rdp", explain_noise_multiplier=5.0)
    run = RunPrivacy.from_config(cfg, num_records=500, explain=True)
    assert (run.accountant, run.delta, run.target_epsilon, run.rounds, run.explain_noise_multiplier) == (
        "rdp", 1e-5, 2.0, 4, 5.0)
    assert RunPrivacy.from_config(cfg, num_records=500, explain=False).explain_noise_multiplier is None
    assert RunPrivacy.from_config(cfg.replace(explain=False), num_records=500, explain=True).explain_noise_multiplier is None


def test_the_run_target_refuses_the_round_that_would_exceed_it():
    run = run_privacy(target_epsilon=1.0, explain_noise_multiplier=None)
    history = [rec(1, sigma=0.8)]
    with pytest.raises(BudgetExceeded, match=r"site 'h1' refuses round 2: it would bring this run's ε to"):
        check_release(rec(2, sigma=0.8), run=run, run_history=history, lifetime_history=history,
                      lifetime_deltas=[1e-5], budget=LifetimeBudget(), site="h1")


def test_the_lifetime_budget_spans_runs_and_names_what_was_spent():
    earlier = [rec(1, run_id="old"), rec(2, run_id="old")]
    budget = LifetimeBudget(epsilon=pld_epsilon([(1.2, 0.1, 70)], 1e-5))  # room for 10 more steps, not 30
    run = run_privacy(target_epsilon=0.0, noise_multiplier=1.2)
    with pytest.raises(BudgetExceeded) as err:
        check_release(rec(1, run_id="new"), run=run, run_history=[], lifetime_history=earlier,
                      lifetime_deltas=[1e-5, 1e-5], budget=budget, site="h1", what="the explanation release")
    spent = lifetime_spent(earlier, [1e-5, 1e-5], budget)
    assert "refuses the explanation release: its lifetime ε would reach" in str(err.value)
    assert f"spent so far {spent.epsilon:.3f}" in str(err.value)  # the report's figure is the enforced one
    assert spent.epsilon == pytest.approx(pld_epsilon([(1.2, 0.1, 60)], 1e-5), abs=0.02)
    check_release(rec(1, steps=5, run_id="new"), run=run, run_history=[], lifetime_history=earlier,
                  lifetime_deltas=[1e-5, 1e-5], budget=budget, site="h1")


def test_the_lifetime_delta_is_the_budgets_else_the_smallest_recorded():
    history = [rec(1), rec(2)]
    assert lifetime_spent(history, [1e-5, 1e-7], LifetimeBudget(epsilon=5.0)).delta == 1e-7
    stated = lifetime_spent(history, [1e-5, 1e-7], LifetimeBudget(epsilon=5.0, delta=1e-4))
    assert stated.delta == 1e-4 and stated.accountant == LIFETIME_ACCOUNTANT == "prv"
    assert stated.epsilon < lifetime_spent(history, [1e-7], LifetimeBudget()).epsilon
    assert lifetime_spent([], [], LifetimeBudget()).epsilon == 0.0
