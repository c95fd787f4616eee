"""THE training and evaluation loop: one copy, used by clients, simulations, baselines
and benchmarks. No Flower import.

Tabular fast path: a site's split is two tensors, and every batch is one indexing of
them, never B ``__getitem__`` calls plus a collate. Non-private training needs no
DataLoader at all (:class:`ShuffledBatches`: one seeded permutation per pass, cut into
contiguous slices). Private training hands Opacus a ``DPDataLoader`` over
:class:`BatchDataset` (``__getitems__`` plus an identity collate) built with the q the
site accounts for: Poisson sampling, each row included independently with probability
q, which is what the accountant assumes.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSplit:
    """Encoded rows of one split: ``x`` float32 (N, d); ``y`` float32 (N,) for a binary
    task or int64 (N,) class indices for a multiclass task."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class BatchDataset(Dataset):
    """A dataset whose batches are single tensor indexings."""

    def __init__(self, split: TensorSplit) -> None:
        self.x, self.y = split.x, split.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.x[index], self.y[index]


def _identity(batch):
    return batch


class ShuffledBatches:
    """Non-private batches: each pass over it draws one permutation of the rows from
    ``generator`` and yields it in contiguous slices of exactly ``batch_size`` rows (the
    last slice of a pass may be shorter).

    The batches are those of ``BatchSampler(RandomSampler(..., generator=generator),
    batch_size, drop_last=False)`` over the same generator on a first pass (both take
    ``torch.randperm(n, generator=generator)``), without a DataLoader's per-batch costs.
    """

    def __init__(self, split: TensorSplit, batch_size: int, generator: torch.Generator) -> None:
        self.x, self.y = split.x, split.y
        self.batch_size = batch_size
        self.generator = generator

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.x[index], self.y[index]


GRAD_SAMPLE_MODES = ("hooks", "ghost")


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training does.

    Attributes:
        steps: optimizer steps in the round.
        batch_size: expected (private) or exact (non-private) batch size.
        learning_rate: step size of the local optimizer.
        optimizer: "sgd" or "adam".
        momentum: SGD momentum.
        proximal_mu: FedProx μ (Li et al. 2020). After each optimizer step the weights
            take the proximal step of μ/2·||w - w_global||²: w <- (w + lr·μ·w_global) /
            (1 + lr·μ), stable for any lr·μ. It is data-independent, so under DP it is
            post-processing and costs no privacy (a penalty inside the loss would be
            dropped by Opacus' per-sample gradients).
        noise_multiplier: σ; ``None`` trains without DP.
        max_grad_norm: per-record clipping bound C (private only).
        grad_sample_mode: how Opacus clips per-record gradients (private only).
            "hooks": materialises each record's gradient, then clips. "ghost": ghost
            clipping (Li et al. 2022, "Large Language Models Can Be Strong
            Differentially Private Learners"; Bu et al. 2023 for the two-pass
            "book-keeping" form Opacus implements): per-record gradient norms from
            activations and output gradients, then a second backward pass over the
            clip-weighted loss; the same clipped sum, without per-record gradients.
            Correct only with per-record losses of shape (B,), which ``train``
            ensures (tests/common/test_ghost_clipping.py compares it with "hooks").
    """

    steps: int
    batch_size: int
    learning_rate: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    proximal_mu: float = 0.0
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"
    sample_rate: float | None = None  # private only: Poisson q; None = batch_size / n (the exact n)

    def __post_init__(self) -> None:
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"The 'grad_sample_mode' parameter must be one of {', '.join(GRAD_SAMPLE_MODES)}. "
                              f"Got {self.grad_sample_mode!r} instead.")


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's non-empty batches
    steps: int  # optimizer steps taken
    sample_rate: float  # Poisson q (private) or batch_size / n (non-private)


def sample_rate(num_rows: int, batch_size: int) -> float:
    """Poisson inclusion probability q = min(1, batch_size / num_rows)."""
    return min(1.0, batch_size / num_rows)


def steps_for_epochs(num_rows: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps that make ``epochs`` expected passes: round(epochs / q), >= 1."""
    return max(1, round(epochs / sample_rate(num_rows, batch_size)))


def loss_function(num_outputs: int) -> nn.Module:
    return nn.BCEWithLogitsLoss() if num_outputs == 1 else nn.CrossEntropyLoss()


def _logits(model: nn.Module, x: torch.Tensor, num_outputs: int) -> torch.Tensor:
    out = model(x)
    # Binary: squeeze (B, 1) -> (B,) so per-sample losses are (B,), never (B, 1).
    return out.squeeze(-1) if num_outputs == 1 else out


def train(
    model: nn.Module,
    data: TensorSplit,
    *,
    settings: LocalTraining,
    num_outputs: int,
    generator: torch.Generator,
) -> TrainResult:
    """Train ``model`` in place for ``settings.steps`` steps on ``data``.

    With ``settings.noise_multiplier`` set, this is DP-SGD (Abadi et al. 2016) through
    Opacus: Poisson sampling at q (``settings.sample_rate``, default batch_size / n), per-sample clipping to
    ``max_grad_norm``, Gaussian noise σ·C. The caller accounts for exactly
    (σ, q, ``TrainResult.steps``): this function takes precisely that many noisy steps.
    """
    n = len(data)
    q = settings.sample_rate or sample_rate(n, settings.batch_size)
    criterion = loss_function(num_outputs)
    global_params = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    params = list(model.parameters())
    lr_mu = settings.learning_rate * settings.proximal_mu
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum)
    if settings.noise_multiplier is None:
        loader = ShuffledBatches(data, settings.batch_size, generator)
        train_model = model
    else:
        from opacus import PrivacyEngine  # imported lazily: it reconfigures logging
        from opacus.data_loader import DPDataLoader

        # Poisson sampling at exactly the q the site accounts for. (make_private's own
        # conversion would sample at 1 / ceil(n / B), which is not B / n.)
        loader = DPDataLoader(BatchDataset(data), sample_rate=q, collate_fn=_identity, generator=generator)
        ghost = settings.grad_sample_mode == "ghost"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode advisory, see docs/privacy.md
            private = PrivacyEngine(accountant="prv").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=settings.noise_multiplier,
                max_grad_norm=settings.max_grad_norm,
                poisson_sampling=False,  # the loader above already samples (Poisson, at q)
                noise_generator=generator,
                grad_sample_mode=settings.grad_sample_mode,
                **({"criterion": criterion} if ghost else {}),
            )
        # Ghost mode also returns the criterion, wrapped: its loss.backward() runs both passes.
        train_model, optimizer, criterion, loader = private if ghost else (private[0], private[1], criterion, private[2])
    train_model.train()
    # torch warns that Opacus' backward hooks fire although inputs need no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    total, counted, step = 0.0, 0, 0
    while step < settings.steps:
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch still runs forward/backward (zero per-sample
            # gradients) and takes its step: noise only, as the accountant assumes.
            loss = criterion(_logits(train_model, xb, num_outputs), yb)
            loss.backward()
            optimizer.step()
            if len(yb):
                total += float(loss.detach())
                counted += 1
            if global_params is not None:
                with torch.no_grad():
                    for p, g in zip(params, global_params):
                        p.add_(g, alpha=lr_mu).div_(1 + lr_mu)
            step += 1
            if step >= settings.steps:
                break
    return TrainResult(loss=total / max(counted, 1), steps=step, sample_rate=q)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorSplit, *, num_outputs: int) -> dict[str, float]:
    """Loss, accuracy and (binary tasks) AUROC of ``model`` on ``data``.

    AUROC is NaN when the split holds a single class (it is undefined there).
    """
    from sklearn.metrics import roc_auc_score

    model.eval()
    logits = _logits(model, data.x, num_outputs)
    loss = float(loss_function(num_outputs)(logits, data.y))
    if num_outputs == 1:
        scores = torch.sigmoid(logits).numpy()
        labels = data.y.numpy()
        accuracy = float(((scores >= 0.5) == (labels >= 0.5)).mean())
        auroc = float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else math.nan
        return {"loss": loss, "accuracy": accuracy, "auroc": auroc}
    accuracy = float((logits.argmax(-1) == data.y).float().mean())
    return {"loss": loss, "accuracy": accuracy}
