"""The releases a site makes besides training, each a Gaussian mechanism it records.

Under add/remove-one-row adjacency (``common.privacy.ADJACENCY``) an exact count alone
tells neighbouring tables apart, and so does any statistic of the held-out rows sent in
the clear. So a private site sends neither:

- **Row counts** (:func:`count_release`), once per run: its training and held-out row
  counts plus Gaussian noise of std σ_c on each. One record is in one split, so adding or
  removing it changes one coordinate by 1: L2 sensitivity 1, one Gaussian mechanism with
  noise multiplier σ_c (``count-noise-multiplier``). Everything that used to reveal n is
  computed from these noisy counts instead (post-processing): the sample rate q = B / ñ,
  the steps per round, the aggregation weights, δ, the explanation's denominator.
- **Evaluation** (:func:`evaluation_release`), every round: the sums over held-out
  records of the loss clipped to [0, L], divided by L (``eval-loss-clip``), and of the
  correct predictions, each plus Gaussian noise of std σ_e·√2 (``eval-noise-multiplier``).
  One record adds at most 1 to each sum: L2 sensitivity √2, one Gaussian mechanism with
  noise multiplier σ_e. The coordinator divides by the noisy held-out count.
  AUROC is not released: its sensitivity to one record is not bounded usefully on small
  splits (one positive among few moves it by up to 1/(positives x negatives) per pair, and
  ranks move together), so a private evaluation reports loss and accuracy only.

Every release is recorded in the ledger (``MechanismRecord(kind=...)``) before it is sent,
and composed into the site's ε with its training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .privacy import MechanismRecord
from .training import TensorSplit, _logits, loss_function

__all__ = ["Counts", "EvaluationSums", "count_mechanism", "count_release", "evaluation_from_sums",
           "evaluation_mechanism", "evaluation_release"]


@dataclass(frozen=True)
class Counts:
    """A site's DP row counts: ``train`` and ``test`` (noisy, rounded, at least 1)."""

    train: int
    test: int


def count_mechanism(*, round: int, noise_multiplier: float, run_id: str = "") -> MechanismRecord:
    return MechanismRecord(round=round, noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, run_id=run_id,
                           kind="row-count")


def count_release(n_train: int, n_test: int, *, noise_multiplier: float, rng: np.random.Generator) -> Counts:
    """The noisy counts: each + N(0, σ_c²), rounded, at least 1 (post-processing)."""
    noisy = np.array([n_train, n_test], dtype=float) + rng.normal(0.0, noise_multiplier, size=2)
    return Counts(train=max(1, int(round(noisy[0]))), test=max(1, int(round(noisy[1]))))


def evaluation_mechanism(*, round: int, noise_multiplier: float, run_id: str = "") -> MechanismRecord:
    return MechanismRecord(round=round, noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, run_id=run_id,
                           kind="evaluation")


@dataclass(frozen=True)
class EvaluationSums:
    """What a private evaluation sends: noisy sums of clipped loss / L and of correct
    predictions, and the noisy held-out count they are divided by."""

    loss_sum: float
    correct_sum: float
    count: int
    loss_clip: float

    def metrics(self) -> dict[str, float]:
        """The site's own view of its noisy sums: loss and accuracy (accuracy clipped to [0, 1])."""
        return evaluation_from_sums([self])


def evaluation_release(model: torch.nn.Module, data: TensorSplit, *, num_outputs: int, count: int,
                       loss_clip: float, noise_multiplier: float, rng: np.random.Generator) -> EvaluationSums:
    """The DP evaluation of ``model`` on the held-out ``data`` (see the module docstring)."""
    model.eval()
    with torch.no_grad():
        logits = _logits(model, data.x, num_outputs)
        losses = loss_function(num_outputs).__class__(reduction="none")(logits, data.y)
        if num_outputs == 1:
            correct = ((torch.sigmoid(logits) >= 0.5) == (data.y >= 0.5)).double()
        else:
            correct = (logits.argmax(-1) == data.y).double()
    clipped = torch.clamp(losses.double(), 0.0, loss_clip) / loss_clip
    std = noise_multiplier * math.sqrt(2.0)
    noise = rng.normal(0.0, std, size=2)
    return EvaluationSums(loss_sum=float(clipped.sum()) + float(noise[0]),
                          correct_sum=float(correct.sum()) + float(noise[1]), count=int(count), loss_clip=loss_clip)


def evaluation_from_sums(sums: list[EvaluationSums]) -> dict[str, float]:
    """Loss and accuracy over every site's noisy sums (example-weighted by construction)."""
    count = sum(s.count for s in sums)
    if count <= 0:
        return {}
    loss = sum(s.loss_sum * s.loss_clip for s in sums) / count
    accuracy = sum(s.correct_sum for s in sums) / count
    return {"loss": max(0.0, loss), "accuracy": min(1.0, max(0.0, accuracy))}
