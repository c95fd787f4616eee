"""What `candor-client start` and `candor-client ledger` show a site is what the
ClientApp enforces: the same lifetime ε, checked against dp-accounting."""

from __future__ import annotations

import json

import dp_accounting
import pytest

from candor.client.budget import SiteBudget
from candor.client.cli import main
from candor.client.ledger import Ledger, new_entry
from candor.client.site_dir import SiteDir
from candor.client.start_cmds import _budget_lines
from candor.common.errors import BudgetExceeded
from candor.common.policy import RunPrivacy, check_release
from candor.common.privacy import MechanismRecord


def pld(parts, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in parts:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


@pytest.fixture
def site(tmp_path):
    site = SiteDir(tmp_path / "site")
    site.dir.mkdir()
    site.save_config({"site": "h1"})
    ledger = Ledger(site.ledger_path, site="h1")
    with ledger.locked():  # two runs, one at a smaller δ, one with RDP as its run accountant
        for r, run, delta, acc in ((1, "a", 1e-5, "prv"), (2, "a", 1e-5, "prv"), (1, "b", 1e-6, "rdp")):
            mech = MechanismRecord(round=r, noise_multiplier=1.1, sample_rate=0.2, steps=15, run_id=run)
            ledger.append(new_entry(mech, accountant=acc, delta=delta, epsilon_run=0.0))
    return site


def test_the_ledger_total_is_the_enforced_lifetime_epsilon(site, capsys):
    budget = SiteBudget(epsilon=5.0)
    budget.write(site.budget_path)
    assert main(["ledger", str(site.dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    total = doc["total"]
    assert (total["delta"], total["accountant"]) == (1e-6, "prv")  # the smallest δ recorded; PRV
    assert total["epsilon"] == pytest.approx(pld([(1.1, 0.2, 45)], 1e-6), rel=0.02)
    assert [r["accountant"] for r in doc["runs"]] == ["prv", "rdp"] and "total_requested" not in doc
    # start prints the same figure
    line = _budget_lines(site, "h1", budget)[0]
    assert f"spent so far ε = {total['epsilon']:.3f} at δ = 1e-06 (PRV) over 3 rounds" in line
    # and the ClientApp refuses a round exactly when that figure would pass the budget
    entries = Ledger(site.ledger_path, site="h1").entries()
    run = RunPrivacy(accountant="prv", delta=1e-5, target_epsilon=0.0, noise_multiplier=1.1, rounds=1)
    tight = SiteBudget(epsilon=total["epsilon"] + 1e-6)
    with pytest.raises(BudgetExceeded, match=f"spent so far {total['epsilon']:.3f}"):
        check_release(MechanismRecord(round=2, noise_multiplier=1.1, sample_rate=0.2, steps=15, run_id="b"),
                      run=run, run_history=[], lifetime_history=[e.mechanism for e in entries],
                      lifetime_deltas=[e.delta for e in entries], budget=tight, site="h1")


def test_another_accountant_or_delta_is_shown_beside_the_enforced_total(site, capsys):
    assert main(["ledger", str(site.dir), "--json", "--accountant", "rdp", "--delta", "1e-5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["accountant"] == "prv"
    assert doc["total_requested"]["accountant"] == "rdp" and doc["total_requested"]["delta"] == 1e-5
    assert main(["ledger", str(site.dir)]) == 0
    assert "the figure the budget is enforced against" in capsys.readouterr().out
