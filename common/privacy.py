"""Privacy accounting: the mechanism history a site records, and the ε it implies.

Every private training step at a site is one application of the Poisson-subsampled
Gaussian mechanism (Abadi et al. 2016, "Deep Learning with Differential Privacy"):
each record is included in a batch independently with probability ``sample_rate``,
per-record gradients are clipped to L2 norm ``max_grad_norm`` and Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` is added to their sum.

The privacy unit is **one record at one site**: neighbouring datasets differ by adding or
removing one row of that site's table. A site's guarantee composes every step it ever
took, across rounds and runs, so the only state that matters is the list of
:class:`MechanismRecord` entries. ε is always recomputed from that list by a third-party
accountant (Opacus): PRV (Gopi et al. 2021, "Numerical Composition of Differential
Privacy", tight numerical upper bound) by default, or RDP (Mironov 2017, "Rényi
Differential Privacy"; Mironov et al. 2019 for the subsampled Gaussian). The Gaussian-DP
central-limit approximation is deliberately not offered: it can under-state ε.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ConfigError

PRIVACY_UNIT = "one record"
ADJACENCY = "add/remove one row of the site's table"
#: What a mechanism released: DP-SGD training steps, or one Gaussian release of the
#: held-out evaluation sums, the explanation, or the site's row counts (common.releases).
KINDS = ("training", "evaluation", "explanation", "row-count")
RECORDS = ("train", "test", "all")
#: The records each kind of release touches: training the training rows, evaluation and
#: the explanation the held-out rows, the row counts both (one coordinate each).
RECORDS_OF = {"training": "train", "evaluation": "test", "explanation": "test", "row-count": "all"}
PRIVACY_UNIT_LONG = "one record (one row of one site's table; add/remove adjacency)"
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class MechanismRecord:
    """One private release at one site: a round of DP-SGD training, or one Gaussian
    release (``sample_rate`` 1, one step) of another kind.

    Attributes:
        round: server round (1-based) the release belongs to.
        noise_multiplier: σ, noise std divided by the L2 sensitivity (the clipping norm) (> 0).
        sample_rate: Poisson inclusion probability q of each record, in (0, 1].
        steps: number of noisy gradient steps taken with these parameters (>= 0).
        run_id: the run the round belongs to ("" where not known).
        kind: what was released, one of :data:`KINDS` (older records: ``"training"``).
        records: whose records it touched: ``"train"`` (the training rows), ``"test"``
            (the held-out rows) or ``"all"`` (both, or not known: older records).
        split: how the site's records were split between the two (``SiteData.split``);
            ``""`` = not by the record alone.
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str = ""
    kind: str = "training"
    records: str = "all"
    split: str = ""

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(
                f"noise multiplier must be > 0 for a private round (got {self.noise_multiplier})"
            )
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample rate must be in (0, 1] (got {self.sample_rate})")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0 (got {self.steps})")
        if self.kind not in KINDS:
            raise ConfigError(f"a mechanism's kind is one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.records not in RECORDS:
            raise ConfigError(f"a mechanism's records are one of {', '.join(RECORDS)} (got {self.records!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MechanismRecord:
        return cls(
            round=int(d["round"]),
            noise_multiplier=float(d["noise_multiplier"]),
            sample_rate=float(d["sample_rate"]),
            steps=int(d["steps"]),
            run_id=str(d.get("run_id", "")),
            kind=str(d.get("kind", "training")),
            records=str(d.get("records", "all")),
            split=str(d.get("split", "")),
        )


def _compress(history: Iterable[MechanismRecord]) -> tuple[tuple[float, float, int], ...]:
    """(σ, q, steps) triples, merging consecutive identical mechanisms.

    Composition of k identical steps then m identical steps with the same (σ, q) is the
    composition of k + m steps, so merging changes nothing but the accountant's cost.
    """
    out: list[tuple[float, float, int]] = []
    for rec in history:
        if rec.steps == 0:
            continue
        if out and out[-1][0] == rec.noise_multiplier and out[-1][1] == rec.sample_rate:
            out[-1] = (rec.noise_multiplier, rec.sample_rate, out[-1][2] + rec.steps)
        else:
            out.append((rec.noise_multiplier, rec.sample_rate, rec.steps))
    return tuple(out)


def _opacus_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant  # lazy: opacus is slow to import

    return {"prv": PRVAccountant, "rdp": RDPAccountant}[check_accountant(name)]()


@functools.lru_cache(maxsize=4096)
def _epsilon(triples: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if not triples:
        return 0.0
    acc = _opacus_accountant(accountant)
    acc.load_state_dict({"history": list(triples), "mechanism": acc.mechanism()})
    with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(0) on its way to a finite ε
        return float(acc.get_epsilon(delta=delta))


def sides(history: Sequence[MechanismRecord]) -> list[list[MechanismRecord]]:
    """The compositions whose largest ε is the guarantee of ``history`` (parallel composition).

    When every release that touched only one split (``records`` "train" or "test") was
    made under one split rule that decides each record's split by the record alone
    (``split`` non-empty, the same for all), a record is in exactly one split: adding or
    removing it changes only the releases of its split (and those of both, "all"). Its
    privacy loss is then that of the training side (train + all) or of the held-out side
    (test + all), never both (McSherry 2009, "Privacy Integrated Queries", parallel
    composition; adaptively chosen releases included). Otherwise, e.g. runs that split
    differently, every release is composed with every other: an upper bound in all cases.
    """
    history = list(history)
    splits = {m.split for m in history if m.records != "all"}
    if len(splits) != 1 or "" in splits:
        return [history]
    return [[m for m in history if m.records in ("train", "all")], [m for m in history if m.records in ("test", "all")]]


def epsilon(history: Sequence[MechanismRecord], *, delta: float, accountant: str = "prv") -> float:
    """The ε of the whole ``history`` at ``delta`` (0 for an empty history): the largest
    ε of its :func:`sides`, each composed by the accountant.

    Results are cached: many simulated sites share the same parameters.
    """
    check_accountant(accountant)
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1) (got {delta})")
    return max(_epsilon(_compress(side), float(delta), accountant) for side in sides(history))


def check_accountant(name: str) -> str:
    """``name`` if it is one of :data:`ACCOUNTANTS`; an unknown name is an error, never a
    silent fallback."""
    if name not in ACCOUNTANTS:
        raise ConfigError(
            f"The 'accountant' parameter must be one of {', '.join(ACCOUNTANTS)}; got {name!r}. "
            "(The Gaussian-DP approximation is not offered: it can under-state ε.)"
        )
    return name


def default_delta(num_records: int) -> float:
    """δ well below 1/n: the largest power of ten <= 1/(10 n), capped at 1e-5.

    A δ of order 1/n would allow a mechanism that publishes one whole record; 1/(10 n)
    or less is the usual requirement. Units: probability, dimensionless.
    """
    if num_records < 1:
        raise ConfigError(f"a site needs at least one record to set δ (got {num_records})")
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10.0 * num_records))))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[MechanismRecord] = (),
    accountant: str = "prv",
    tolerance: float = 0.01,
    split: str = "",
    records: str = "train",
) -> float:
    """Smallest σ (to ``tolerance`` in ε) such that ``prior`` + ``steps`` steps at
    (σ, ``sample_rate``) stays at or below ``target_epsilon`` at ``delta``. The planned
    steps are releases of ``records`` (default the training rows) under the site's
    ``split`` rule.

    Bisection on the accountant's own ε, so the result is a guarantee under that
    accountant, not an estimate: the returned σ always satisfies ε <= target.

    Raises:
        ConfigError: the target is unreachable (prior spending alone exceeds it, or
            σ would have to exceed 1e4).
    """
    if not target_epsilon > 0:
        raise ConfigError(f"target epsilon must be > 0 (got {target_epsilon})")
    prior = tuple(prior)

    def eps_at(sigma: float) -> float:
        # the side(s) the planned steps belong to: another side's spending does not move with σ
        planned = MechanismRecord(round=0, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                                  records=records, split=split)
        history = prior + (planned,)
        return max(epsilon(side, delta=delta, accountant=accountant)
                   for side in sides(history) if any(m is planned for m in side))

    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise ConfigError(
            f"the site's other releases in this run (spent or planned) already cost ε = {spent:.3f} of the "
            f"run's target of {target_epsilon}; nothing more fits in it: the coordinator can raise target-epsilon"
        )
    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(
                f"target ε = {target_epsilon} at δ = {delta:g} is unreachable for "
                f"{steps} steps at sample rate {sample_rate:.4g}: raise the target, or "
                "train fewer rounds / local epochs"
            )
    # Invariant: eps_at(hi) <= target < eps_at(lo) (eps_at(0) is infinite).
    while True:
        mid = (lo + hi) / 2
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            hi = mid
            if target_epsilon - eps_mid <= tolerance:
                return hi
        else:
            lo = mid
        if hi - lo < 1e-6:
            return hi


class Accountant:
    """The ε of a growing mechanism history, under one accountant at one δ.

    A small facade over Opacus' accountants (the mechanism behind it stays Opacus'):
    :meth:`compose` returns the accountant with more records, :meth:`epsilon` the
    cumulative ε, :meth:`would_exceed` whether a planned record would take it past a
    limit, :meth:`state_dict` / :meth:`from_state_dict` the whole state, which is
    nothing but the history, δ and the accountant's name: ε is always recomputed.

    Raises:
        ConfigError: unknown accountant name, or δ outside (0, 1).
    """

    def __init__(self, name: str = "prv", *, delta: float, history: Iterable[MechanismRecord] = ()) -> None:
        self.name = check_accountant(name)
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1) (got {delta})")
        self.delta = float(delta)
        self.history: tuple[MechanismRecord, ...] = tuple(history)

    def compose(self, *records: MechanismRecord) -> Accountant:
        """This accountant with ``records`` appended (self is unchanged)."""
        return Accountant(self.name, delta=self.delta, history=self.history + records)

    def epsilon(self) -> float:
        """Cumulative ε of the whole history at :attr:`delta` (0 for no history)."""
        return epsilon(self.history, delta=self.delta, accountant=self.name)

    def would_exceed(self, record: MechanismRecord, *, limit: float) -> bool:
        """True if composing ``record`` would bring ε above ``limit``."""
        return self.compose(record).epsilon() > limit

    def state_dict(self) -> dict:
        return {"accountant": self.name, "delta": self.delta, "history": [h.to_dict() for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> Accountant:
        return cls(str(state["accountant"]), delta=float(state["delta"]),
                   history=[MechanismRecord.from_dict(h) for h in state["history"]])
