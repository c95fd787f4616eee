"""Privacy policy: the one place where a site's privacy rules are computed.

Everything a site enforces, and everything it is shown, comes from here, so that what
a site is told is what it enforces:

- :class:`RunPrivacy`, the run's privacy settings at one site (accountant, δ, target ε
  or a fixed σ, rounds, the releases besides training to reserve): :meth:`RunPrivacy.plan_sigma`
  fixes σ for the whole run at the site's first round, calibrated so that every planned
  training round *plus* every other release of the run (the DP row counts, a private
  evaluation per round, the explanation: ``common.releases``) meets the target;
- :class:`LifetimeBudget`, the site's own lifetime limit over every run (its setting,
  never the coordinator's): ε, the δ it is stated at, and :data:`LIFETIME_ACCOUNTANT`;
- :class:`SiteLimits`, what a site allows a coordinator's run to ask of it (rounds, the
  ε one run may cost it, clipping norm, batch size, non-private training): a run outside
  them is refused before anything is read (:class:`~candor.common.errors.RunRefused`);
- :func:`check_release`, which refuses (:class:`~candor.common.errors.BudgetExceeded`)
  a release that would take the run past its target (or the site's own per-run limit)
  or the site past its budget;
- :func:`lifetime_spent`, the lifetime ε that ``candor-client start`` and ``ledger``
  report, computed by the same rule :func:`check_release` enforces.

The lifetime δ is the budget's δ when the site set one, otherwise the smallest δ of
anything recorded or planned (a smaller δ gives a larger ε: the conservative choice).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BudgetExceeded, ConfigError, RunRefused
from .privacy import (RECORDS_OF, Accountant, MechanismRecord, calibrate_noise_multiplier, check_accountant,
                      default_delta)

__all__ = ["LIFETIME_ACCOUNTANT", "LifetimeBudget", "LifetimeSpent", "RunPrivacy", "SiteLimits", "check_release",
           "lifetime_spent"]

logger = logging.getLogger(__name__)

# The lifetime budget is composed with PRV (Gopi et al. 2021), the tight numerical upper
# bound, whatever accountant a run uses: the site's limit does not depend on a
# coordinator's setting.
LIFETIME_ACCOUNTANT = "prv"
_NO_RECORD_DELTA = 1e-5  # δ shown beside ε = 0 when nothing was ever recorded
DEFAULT_EVAL_SIGMA = 10.0  # σ of a private evaluation that cannot be calibrated on its own side


@dataclass(frozen=True)
class RunPrivacy:
    """The run's privacy settings at one site.

    Attributes:
        accountant: "prv" or "rdp", for the run's ε.
        delta: the run's δ at this site (probability, in (0, 1)).
        target_epsilon: ε the whole run may cost this site (training and releases);
            0 = no target, train with ``noise_multiplier``.
        noise_multiplier: σ when there is no target.
        rounds: training rounds the run plans.
        explain_noise_multiplier: σ of the explanation release that follows training,
            reserved inside the target; ``None`` = no release planned.
        count_noise_multiplier: σ of the site's one DP count of its rows
            (``common.releases``), reserved inside the target; ``None`` = none.
        eval_noise_multiplier: σ of each round's DP evaluation release, reserved inside
            the target for every round; ``None`` = no private evaluation (kept local, or
            released in the clear and listed as unprotected).
    """

    accountant: str
    delta: float
    target_epsilon: float
    noise_multiplier: float
    rounds: int
    explain_noise_multiplier: float | None = None
    site_max_epsilon: float | None = None  # the site's own limit on one run's ε (SiteLimits)
    count_noise_multiplier: float | None = None
    eval_noise_multiplier: float | None = None
    split: str = ""  # how the site's records are split (SiteData.split): parallel composition when set

    def __post_init__(self) -> None:
        check_accountant(self.accountant)

    @classmethod
    def from_config(cls, cfg, *, num_records: int, explain: bool, limits: SiteLimits | None = None,
                    evaluation: str = "dp", counts: bool = True, split: str = "") -> RunPrivacy:
        """From the run config ``cfg`` (a :class:`~candor.common.config.RunConfig`) for a
        site with ``num_records`` training records (its DP count: δ must not encode the
        exact one); ``explain``: the site takes part in the explanation release;
        ``limits``: the site's own limits; ``evaluation``: the site's evaluation mode
        (``"dp"`` is a private release every round); ``counts``: the site releases DP
        row counts (the default; ``False`` for tools without a site, e.g. baselines)."""
        return cls(accountant=cfg.accountant, delta=cfg.target_delta or default_delta(num_records),
                   target_epsilon=cfg.target_epsilon, noise_multiplier=cfg.noise_multiplier,
                   rounds=cfg.num_server_rounds,
                   explain_noise_multiplier=cfg.explain_noise_multiplier if cfg.explain and explain else None,
                   site_max_epsilon=limits.max_run_epsilon if limits is not None else None,
                   count_noise_multiplier=cfg.count_noise_multiplier if counts else None,
                   eval_noise_multiplier=cfg.eval_noise_multiplier if evaluation == "dp" else None,
                   split=split)

    def accountant_for(self, history: Sequence[MechanismRecord] = ()) -> Accountant:
        return Accountant(self.accountant, delta=self.delta, history=history)

    def labelled(self, mechanism: MechanismRecord) -> MechanismRecord:
        """``mechanism`` with the records its kind touches and this site's split rule."""
        return dataclasses.replace(mechanism, records=RECORDS_OF[mechanism.kind], split=self.split)

    def explanation_reserve(self, *, round: int) -> list[MechanismRecord]:
        """The explanation release planned after training, as reserved in calibration:
        empty when none is planned, or when the release alone would exceed the target
        (training then uses the whole target and the release is refused by its own
        check, not every training round)."""
        if self.explain_noise_multiplier is None:
            return []
        from .explain import release_mechanism

        reserve = [self.labelled(release_mechanism(round=round, noise_multiplier=self.explain_noise_multiplier))]
        if self.target_epsilon > 0 and self.accountant_for(reserve).epsilon() >= self.target_epsilon:
            logger.warning("the explanation release alone exceeds target ε %s; training uses the whole target "
                           "and the release will be refused", self.target_epsilon)
            return []
        return reserve

    def release_reserve(self, run_history: Sequence[MechanismRecord]) -> list[MechanismRecord]:
        """The run's releases other than training, as calibration reserves them: those
        already recorded in ``run_history`` (the row counts), then those planned (one
        evaluation per round not yet evaluated, the explanation)."""
        from .releases import count_mechanism, evaluation_mechanism

        done = [m for m in run_history if m.kind != "training"]
        planned: list[MechanismRecord] = []
        if self.count_noise_multiplier is not None and not any(m.kind == "row-count" for m in done):
            planned.append(self.labelled(count_mechanism(round=1, noise_multiplier=self.count_noise_multiplier)))
        if (eval_sigma := self.eval_sigma()) is not None:
            evaluated = {m.round for m in done if m.kind == "evaluation"}
            planned += [self.labelled(evaluation_mechanism(round=r, noise_multiplier=eval_sigma))
                        for r in range(1, self.rounds + 1) if r not in evaluated]
        if not any(m.kind == "explanation" for m in done):
            planned += self.explanation_reserve(round=self.rounds + 1)
        reserve = done + planned
        if self.target_epsilon > 0 and reserve and self.accountant_for(reserve).epsilon() >= self.target_epsilon:
            raise BudgetExceeded(
                f"the run's releases besides training (row counts, {self.rounds} private evaluations, the "
                f"explanation) alone cost ε {self.accountant_for(reserve).epsilon():.3f} >= the run's target "
                f"{self.target_epsilon}; nothing would be left to train with. The coordinator can raise "
                "target-epsilon, count-noise-multiplier or eval-noise-multiplier")
        return reserve

    def eval_sigma(self) -> float | None:
        """σ of every private evaluation of the run (``None``: the site releases none).

        ``eval-noise-multiplier`` when the run config sets it. Otherwise (0, the default)
        calibrated: when the site's split lets the held-out records be composed apart from
        the training records (:func:`~candor.common.privacy.sides`), the smallest σ such
        that the held-out side (the row counts, one evaluation per round, the explanation)
        meets the run's target on its own, the training side having the same target;
        without a target, or without that split, :data:`DEFAULT_EVAL_SIGMA`.
        """
        if self.eval_noise_multiplier is None:
            return None
        if self.eval_noise_multiplier > 0:
            return self.eval_noise_multiplier
        if self.target_epsilon <= 0 or not self.split:
            return DEFAULT_EVAL_SIGMA
        from .releases import count_mechanism

        counts = ([self.labelled(count_mechanism(round=1, noise_multiplier=self.count_noise_multiplier))]
                  if self.count_noise_multiplier is not None else [])
        if counts and (alone := self.accountant_for(counts).epsilon()) >= self.target_epsilon:
            raise BudgetExceeded(f"the row counts alone (σ = {self.count_noise_multiplier:g}) cost ε {alone:.3f}, "
                                 f"more than the run's target {self.target_epsilon:g}: nothing else would fit. The "
                                 "coordinator can raise target-epsilon or count-noise-multiplier")
        prior = [*counts, *self.explanation_reserve(round=self.rounds + 1)]
        return calibrate_noise_multiplier(target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=1.0,
                                          steps=self.rounds, prior=prior,
                                          accountant=self.accountant, split=self.split, records="test")

    def plan_sigma(self, run_history: Sequence[MechanismRecord], *, sample_rate: float, steps_per_round: int) -> float:
        """σ of the run's training at this site: the one fixed at its first training round
        (read back from ``run_history``), else calibrated so that :attr:`rounds` rounds of
        ``steps_per_round`` steps at ``sample_rate`` plus every other release of the run
        (:meth:`release_reserve`) meet the target, else the fixed :attr:`noise_multiplier`."""
        training = [m for m in run_history if m.kind == "training"]
        if training:
            return training[0].noise_multiplier
        if self.target_epsilon <= 0:
            return self.noise_multiplier
        return calibrate_noise_multiplier(
            target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=sample_rate,
            steps=steps_per_round * self.rounds, prior=self.release_reserve(run_history),
            accountant=self.accountant, split=self.split)


@dataclass(frozen=True)
class LifetimeBudget:
    """A site's own lifetime privacy budget, over every run it ever takes part in.

    Attributes:
        epsilon: the lifetime ε the site allows; ``None`` = no limit.
        delta: the δ it is stated at; ``None`` = the smallest δ recorded or planned.
    """

    epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"--budget-epsilon must be a number > 0 (the lifetime ε this site allows); "
                              f"got {self.epsilon}. Give a positive number")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"--budget-delta must be in (0, 1); got {self.delta}. Give a δ such as 1e-5, "
                              "or leave it out to use the smallest δ of the site's runs")

    def updated(self, *, epsilon: float | None = None, delta: float | None = None) -> LifetimeBudget:
        """This budget with the values given (``None`` keeps the current one)."""
        return type(self)(self.epsilon if epsilon is None else float(epsilon),
                          self.delta if delta is None else float(delta))

    def as_dict(self) -> dict[str, float]:
        """The values set: ``{"epsilon": ..., "delta": ...}`` (either may be absent)."""
        return {key: value for key, value in (("epsilon", self.epsilon), ("delta", self.delta)) if value is not None}

    def delta_for(self, deltas: Sequence[float]) -> float:
        """The lifetime δ, given the δs recorded in the ledger (and any planned one)."""
        return self.delta or min(deltas, default=_NO_RECORD_DELTA)


@dataclass(frozen=True)
class SiteLimits:
    """What a site allows a coordinator's run to ask of it: the site's own setting
    (``candor-client start --max-rounds ... --max-run-epsilon ...``), never the run's.

    Attributes:
        max_rounds: the most training rounds one run may have; ``None`` = no limit.
        max_run_epsilon: the most ε one run may cost this site (training and releases
            together, at the run's δ); ``None`` = no limit beyond the run's target.
        max_grad_norm: the largest clipping norm C a run may use; ``None`` = no limit.
        max_batch_size: the largest expected batch a run may use; ``None`` = no limit.
        allow_non_private: whether a run with ``dp = false`` (updates and explanation
            statistics without differential privacy) may train on this site's data.
    """

    max_rounds: int | None = None
    max_run_epsilon: float | None = None
    max_grad_norm: float | None = None
    max_batch_size: int | None = None
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        for name in ("max_rounds", "max_run_epsilon", "max_grad_norm", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number > 0 (a limit this site sets on "
                                  f"every run); got {value}. Give a positive number, or leave it out for no limit")

    def check(self, cfg, *, site: str) -> None:
        """Refuse the run config ``cfg`` if it asks more of this site than it allows.

        Raises:
            RunRefused: naming the setting, the value the run asks, the site's limit and
                the option that sets it.
        """
        def refuse(setting: str, asked: object, limit: str) -> RunRefused:
            return RunRefused(f"site '{site}' refuses this run: {setting} = {asked} is outside this site's "
                              f"limit ({limit}). The coordinator can run within it; the site sets its limits with "
                              "`candor-client start`")

        if not cfg.dp and not self.allow_non_private:
            raise refuse("dp", "false", "private training only: without DP its updates would leave unprotected; "
                                        "--allow-non-private permits it")
        if self.max_rounds is not None and cfg.num_server_rounds > self.max_rounds:
            raise refuse("num-server-rounds", cfg.num_server_rounds, f"--max-rounds {self.max_rounds}")
        if cfg.dp and self.max_run_epsilon is not None and cfg.target_epsilon > self.max_run_epsilon:
            raise refuse("target-epsilon", cfg.target_epsilon, f"--max-run-epsilon {self.max_run_epsilon:g}")
        if self.max_grad_norm is not None and cfg.max_grad_norm > self.max_grad_norm:
            raise refuse("max-grad-norm", cfg.max_grad_norm, f"--max-grad-norm {self.max_grad_norm:g}")
        if self.max_batch_size is not None and cfg.batch_size > self.max_batch_size:
            raise refuse("batch-size", cfg.batch_size, f"--max-batch-size {self.max_batch_size}")


@dataclass(frozen=True)
class LifetimeSpent:
    """What a site has spent over its lifetime: ε at δ under the lifetime accountant."""

    epsilon: float
    delta: float
    accountant: str
    rounds: int


def lifetime_spent(history: Sequence[MechanismRecord], deltas: Sequence[float], budget: LifetimeBudget) -> LifetimeSpent:
    """The lifetime ε of ``history`` (every entry of the site's ledger, whose δs are
    ``deltas``), by the rule :func:`check_release` enforces."""
    delta = budget.delta_for(deltas)
    eps = Accountant(LIFETIME_ACCOUNTANT, delta=delta, history=history).epsilon()
    return LifetimeSpent(eps, delta, LIFETIME_ACCOUNTANT, len(history))


def check_release(planned: MechanismRecord, *, run: RunPrivacy, run_history: Sequence[MechanismRecord],
                  lifetime_history: Sequence[MechanismRecord], lifetime_deltas: Sequence[float],
                  budget: LifetimeBudget, site: str, what: str = "round") -> None:
    """Refuse ``planned`` if it would take this run's ε past its target or the site's
    lifetime ε past its budget.

    Args:
        what: how the refusal names the release ("round" for training, or e.g.
            "the explanation release").

    Raises:
        BudgetExceeded: naming the site, the release, the ε it would reach, the limit and
            δ; nothing has been trained, sent or recorded.
    """
    label = f"round {planned.round}" if what == "round" else what
    if run.target_epsilon > 0 or run.site_max_epsilon is not None:
        eps = run.accountant_for([*run_history, planned]).epsilon()
        if run.target_epsilon > 0 and eps > run.target_epsilon:
            raise BudgetExceeded(
                f"site '{site}' refuses {label}: it would bring this run's ε to "
                f"{eps:.3f} > target {run.target_epsilon} (δ = {run.delta:g})")
        if run.site_max_epsilon is not None and eps > run.site_max_epsilon:
            raise BudgetExceeded(
                f"site '{site}' refuses {label}: it would bring this run's ε to {eps:.3f} > "
                f"{run.site_max_epsilon}, the most one run may cost this site (its --max-run-epsilon; "
                f"δ = {run.delta:g}). Nothing was trained or recorded.")
    if budget.epsilon is not None:
        before = lifetime_spent(lifetime_history, [*lifetime_deltas, run.delta], budget)
        after = Accountant(LIFETIME_ACCOUNTANT, delta=before.delta, history=lifetime_history).compose(planned)
        eps = after.epsilon()
        if eps > budget.epsilon:
            raise BudgetExceeded(
                f"site '{site}' refuses {label}: its lifetime ε would reach "
                f"{eps:.3f} > its budget {budget.epsilon} (δ = {before.delta:g}; spent so far "
                f"{before.epsilon:.3f}). Nothing was trained or recorded.")
