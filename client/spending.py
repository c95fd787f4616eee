"""A site's privacy spending in one run: check, then record, every release under the
ledger's lock.

The rules themselves (σ for the run, the run's target, the site's lifetime budget) are
:mod:`candor.common.policy`'s; this class applies them to the site's own ledger so that
check-then-append never interleaves between concurrent ClientApp processes of one site::

    spending = Spending(ledger, run=run_privacy, budget=spec.budget, run_id=..., site=...)
    with spending.locked():
        sigma = run_privacy.plan_sigma(spending.run_history, sample_rate=q, steps_per_round=k)
        spending.check(planned)          # BudgetExceeded: nothing trained or recorded
        ...train or compute the release...
        eps_run = spending.charge(record)  # appended durably before anything is sent
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from candor.common.policy import LifetimeBudget, RunPrivacy, check_release
from candor.common.privacy import MechanismRecord

from .ledger import Ledger, new_entry

__all__ = ["Spending"]


class Spending:
    """``site``'s spending in run ``run_id``, against ``run``'s settings and its ``budget``
    (``run`` may be set after :meth:`locked`, once the site's DP counts are known:
    ``client/counts.py``)."""

    def __init__(self, ledger: Ledger, *, run: RunPrivacy | None, budget: LifetimeBudget, run_id: str,
                 site: str) -> None:
        self.ledger = ledger
        self.run = run
        self.budget = budget
        self.run_id = run_id
        self.site = site
        self.run_history: list[MechanismRecord] = []
        self._lifetime: list[MechanismRecord] = []
        self._deltas: list[float] = []

    @contextmanager
    def locked(self) -> Iterator[Spending]:
        """Hold the ledger's lock and read the run's and the lifetime's history."""
        with self.ledger.locked():
            entries = self.ledger.entries()
            self._lifetime = [e.mechanism for e in entries]
            self._deltas = [e.delta for e in entries]
            self.run_history = [m for m in self._lifetime if m.run_id == self.run_id]
            yield self

    def check(self, planned: MechanismRecord, *, what: str = "round") -> None:
        """Refuse ``planned`` (BudgetExceeded) past the run's target or the lifetime budget."""
        check_release(planned, run=self.run, run_history=self.run_history, lifetime_history=self._lifetime,
                      lifetime_deltas=self._deltas, budget=self.budget, site=self.site, what=what)

    def charge(self, record: MechanismRecord) -> float:
        """Append ``record`` to the ledger (durably); returns this run's ε including it."""
        self.run_history.append(record)
        self._lifetime.append(record)
        self._deltas.append(self.run.delta)
        eps_run = self.run.accountant_for(self.run_history).epsilon()
        self.ledger.append(new_entry(record, accountant=self.run.accountant, delta=self.run.delta,
                                     epsilon_run=eps_run))
        return eps_run
