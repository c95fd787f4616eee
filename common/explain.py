"""Why a Candor model decides: loading a saved model, predictions, per-record
attributions, and one site's (differentially private) release of global importance.

Method: **Integrated Gradients** (Sundararajan, Taly & Yan 2017, "Axiomatic
Attribution for Deep Networks", ICML), computed by Captum's ``IntegratedGradients``
(Gauss-Legendre quadrature of the path integral). Chosen over the alternatives because

* it satisfies *completeness*: the attributions of a record sum to ``F(x) - F(x')``,
  the model's output minus its output at the baseline. Captum returns the numerical
  error of the integral ("convergence delta"); :func:`attribute` checks it per record
  and refines the quadrature until it is below ``COMPLETENESS_TOLERANCE``;
* it needs only gradients of the forward function, so it is correct for the built-in
  MLP and logistic regression *and* for any plug-in model (DeepLift's rescale rules
  hook ``nn.ReLU`` modules and silently misattribute a functional ``F.relu``);
* it is deterministic (GradientShap and Shapley sampling draw random baselines or
  permutations; KernelSHAP costs many model evaluations per record and is still
  approximate). For logistic regression it has the closed form
  ``w_j x_j (σ(z) − σ(b)) / (z − b)`` (z the record's logit, b the bias), which the
  tests check.

What is explained, ``F``: the predicted probability of the positive class (binary) or
of the record's predicted class (multiclass). Contributions are therefore in
probability points: "age = 67 pushed the probability up by 0.12".

Baseline ``x'``: the all-zero encoded record, a function of the schema alone (the
same at every site; no data statistic leaks into it): every numeric feature at the
midpoint of its public bounds, no categorical level active, booleans false, nothing
missing. A contribution is relative to the model's output at that reference record.

Per original feature: the attributions of its encoded columns (one-hot levels and
missing-value indicator, :attr:`common.encoding.Encoder.groups`) are summed;
completeness holds for the sums too.

Global importance of one site, released (:func:`release_importance`). For each
held-out record ``i`` let ``v_i = (|A_{i,f}|)_f`` (absolute contribution per original
feature, ``F`` values) and ``v̄_i = v_i · min(1, C / ||v_i||_2)``. The released quantity
is::

    S̃ = Σ_i v̄_i + N(0, σ² C² I_F)      together with n, the number of held-out rows

sent as the mean ``S̃ / n`` and ``n`` (the same information). Under add/remove-one-record
adjacency ``Σ_i v̄_i`` changes by one ``v̄_i``, so its L2 sensitivity is ``C``, and the
release is the Gaussian mechanism with noise multiplier ``σ``: the Poisson-subsampled
Gaussian of DP-SGD with ``q = 1`` and one step. It is recorded as
``MechanismRecord(sample_rate=1.0, steps=1, noise_multiplier=σ)`` and composes with the
site's training history in the same accountant (:func:`common.privacy.epsilon`; Opacus'
PRV and RDP accountants both handle ``q = 1``). The model being explained is itself a
DP release, so this is adaptive composition. ``n`` is not protected, as in every
Candor reply (``num-examples``); the noisy mean can be slightly negative.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .encoding import Encoder
from .errors import ConfigError, DataValidationError, ModelFileError, Problem
from .model_file import MODEL_FILE, ModelFile
from .privacy import MechanismRecord
from .schema import Schema, is_missing
from .validation import read_table, validate

__all__ = [
    "Explanation",
    "ImportanceRelease",
    "LoadedModel",
    "Records",
    "attribute",
    "clip_rows",
    "load_model",
    "load_records",
    "predict",
    "release_importance",
    "release_mechanism",
]

logger = logging.getLogger(__name__)

COMPLETENESS_TOLERANCE = 1e-3  # probability points; max |Σ contributions − (F(x) − F(x'))|
_MAX_STEPS = 2048  # ReLU kinks slow the quadrature (error ~1/steps): refined per record


# --- loading ------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """A saved global model, ready to score records of its schema."""

    model: nn.Module  # in eval mode; maps encoded rows (N, d) to logits (N, outputs)
    schema: Schema
    encoder: Encoder
    spec: str  # "mlp", "logreg" or "module:factory"
    path: Path  # the model.pt that was read


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load ``model.pt`` from a run directory, a bundle directory, or the file itself
    (:class:`candor.common.model_file.ModelFile`: read with ``weights_only=True``, so a
    model file from elsewhere cannot run code on this machine).

    Raises:
        ModelFileError: the path holds no model file, or the file is unreadable, not a
            Candor model, or inconsistent with its own schema.
    """
    saved = ModelFile.load(path)
    given = Path(path)
    file = given / MODEL_FILE if given.is_dir() else given
    try:
        model = saved.build()
    except ModelFileError as err:
        raise ModelFileError(f"{file}: not a usable Candor model file ({err}); fetch the model "
                             "again from the coordinator's run directory or bundle") from None
    return LoadedModel(model, saved.schema, Encoder(saved.schema), saved.model, file)


# --- records to score ---------------------------------------------------------
@dataclass(frozen=True)
class Records:
    """Validated records to score, in file order."""

    frame: pd.DataFrame  # clean frame (common.validation layout, label column filled in)
    ids: list[str]  # the --id-column value, or the 1-based data row number
    warnings: list[Problem]


def load_records(path: str | os.PathLike, schema: Schema, *, id_column: str | None = None) -> Records:
    """Read records to score and validate them with the core validator.

    The label column is not needed (it is ignored if present). A row the model cannot
    score (a missing value under ``missing = "drop"``) is an error here, not a silent
    drop, so that output row ``k`` is input row ``k``.

    Raises:
        DataValidationError: every problem, in the validator's words.
    """
    source = str(path)
    table = read_table(path)
    names = [f.name for f in schema.features]
    if not set(names) & set(table.columns):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise DataValidationError([Problem(
            file=source, column=None, rows=len(table),
            rule=f"none of the model's {len(names)} feature columns ({shown}) is in the file: the records "
                 f"do not follow the schema of this model{f' ({schema.name!r})' if schema.name else ''}",
            action="Check that the records and the model belong to the same federation.")])
    problems: list[Problem] = []
    if id_column is not None and id_column not in table.columns:
        problems.append(Problem(file=source, column=id_column, rule="the --id-column is not in the file",
                                rows=len(table), action="Name a column of the file, or omit --id-column "
                                "to number the records by row."))
    ids = (table[id_column].astype(str).str.strip().tolist() if id_column in table.columns
           else [str(i) for i in range(1, len(table) + 1)])
    for feature in schema.features:
        if feature.missing == "drop" and feature.name in table.columns:
            mask = table[feature.name].map(is_missing).to_numpy(dtype=bool)
            if mask.any():
                problems.append(Problem(
                    file=source, column=feature.name, rows=int(mask.sum()),
                    rule="missing values; the schema drops such rows (missing = 'drop'), so the "
                         "model cannot score them",
                    action="Fill in these values, or remove the rows."))
    label = schema.label
    features = table.drop(columns=[c for c in (label.name, id_column) if c in table.columns])
    features[label.name] = label.allowed[0]  # a placeholder: scoring needs no label
    clean, found = validate(features, schema, source=source)
    unscorable = {p.column for p in problems}
    problems += [p for p in found if p.column != label.name
                 and not (p.column in unscorable and p.severity == "warning")]
    if any(p.severity == "error" for p in problems):
        raise DataValidationError(problems)
    if len(clean) != len(table):  # not reachable: every excluded row is reported above
        raise RuntimeError(f"{source}: {len(table) - len(clean)} rows could not be scored")
    return Records(clean, ids, [p for p in problems if p.severity != "error"])


# --- predictions and attributions --------------------------------------------
def _probabilities(model: nn.Module, x: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """(N,) P(positive) for a binary task, (N, K) class probabilities otherwise."""
    logits = model(x)
    return torch.sigmoid(logits.squeeze(-1)) if num_outputs == 1 else torch.softmax(logits, dim=-1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, num_outputs: int) -> np.ndarray:
    """Probabilities: (N,) of the positive class (binary) or (N, K) per class."""
    model.eval()
    return _probabilities(model, x, num_outputs).double().numpy()


@dataclass(frozen=True)
class Explanation:
    """Integrated-Gradients contributions of the original features to ``output``.

    Attributes:
        features: original feature names, schema order.
        contributions: (N, F) signed, in probability points.
        output: (N,) F(x): P(positive), or P(predicted class) for multiclass.
        baseline: (N,) F(x') for the same class (constant for a binary task).
        target: (N,) the class explained (1 for binary).
        gap: max over records of |Σ contributions − (output − baseline)|.
    """

    features: tuple[str, ...]
    contributions: np.ndarray
    output: np.ndarray
    baseline: np.ndarray
    target: np.ndarray
    gap: float


def attribute(model: nn.Module, encoder: Encoder, x: torch.Tensor, *, n_steps: int = 64) -> Explanation:
    """Integrated Gradients of every record of ``x`` (N, d), summed per original feature.

    Records whose completeness gap exceeds ``COMPLETENESS_TOLERANCE`` are integrated
    again with twice the steps (up to 2048); a gap left above it is logged.
    """
    from captum.attr import IntegratedGradients

    num_outputs = encoder.schema.num_outputs
    model.eval()
    with torch.no_grad():
        probs = _probabilities(model, x, num_outputs)
    target = torch.ones(len(x), dtype=torch.long) if num_outputs == 1 else probs.argmax(-1)
    targets = None if num_outputs == 1 else target  # captum's output index per record
    baselines = torch.zeros_like(x)
    ig = IntegratedGradients(lambda inp: _probabilities(model, inp, num_outputs))

    def integrate(rows: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        attr, delta = ig.attribute(x[rows], baselines=baselines[rows], n_steps=steps,
                                   target=None if targets is None else targets[rows],
                                   internal_batch_size=max(steps, 16384), return_convergence_delta=True)
        return attr.detach(), delta.detach().abs()

    attr, delta = integrate(torch.arange(len(x)), n_steps)
    while n_steps < _MAX_STEPS and (rows := torch.nonzero(delta > COMPLETENESS_TOLERANCE)[:, 0]).numel():
        n_steps *= 2  # refine only the records whose integral has not converged
        attr[rows], delta[rows] = integrate(rows, n_steps)
    gap = float(delta.max()) if len(x) else 0.0
    if gap > COMPLETENESS_TOLERANCE:
        logger.warning("Integrated Gradients: completeness gap %.2g exceeds %.0e after %d steps",
                       gap, COMPLETENESS_TOLERANCE, n_steps)
    with torch.no_grad():
        base = _probabilities(model, baselines, num_outputs)
    pick = (lambda p: p) if num_outputs == 1 else (lambda p: p.gather(1, target[:, None]).squeeze(1))
    attr = attr.double().numpy()
    groups = encoder.groups
    contributions = np.stack([attr[:, groups[f.name]].sum(axis=1) for f in encoder.schema.features], axis=1)
    return Explanation(tuple(f.name for f in encoder.schema.features), contributions,
                       pick(probs).double().numpy(), pick(base).double().numpy(), target.numpy(), gap)


# --- the site's global-importance release -------------------------------------
@dataclass(frozen=True)
class ImportanceRelease:
    """What a site sends: ``mean`` = S̃ / n per original feature (see module docstring)."""

    features: tuple[str, ...]
    mean: np.ndarray  # (F,) released mean |contribution|, probability points
    num_examples: int  # n, the held-out rows the statistic is over
    clip: float | None  # C; None for the exact, non-private statistic
    noise_multiplier: float | None  # σ; None for the exact, non-private statistic


def clip_rows(v: np.ndarray, clip: float) -> np.ndarray:
    """Each row of ``v`` scaled to L2 norm at most ``clip`` (rows within it unchanged)."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def release_importance(explanation: Explanation, *, clip: float | None, noise_multiplier: float | None,
                       rng: np.random.Generator | None = None, count: int | None = None) -> ImportanceRelease:
    """Mean |contribution| per original feature over the explained records.

    With ``clip`` and ``noise_multiplier`` set, the DP release of the module
    docstring (sum of clipped rows + N(0, (σC)²) per feature, divided by ``count``: the
    site's DP count of its held-out rows, ``common.releases``, never the exact n, which
    would leave the site in the clear); with both ``None``, the exact mean (non-private
    runs only). ``rng`` draws the noise; the default seeds from the operating system, as
    it must outside tests.
    """
    v = np.abs(explanation.contributions)
    n = len(v)
    if n == 0:
        raise ConfigError("the federated explanation: this site has no held-out records to compute feature "
                          "importance on; give it a test split (--test FILE, or a larger test-fraction)")
    if (clip is None) != (noise_multiplier is None):
        raise ValueError("set both clip and noise_multiplier for a private release, or neither")
    if clip is None:
        return ImportanceRelease(explanation.features, v.mean(axis=0), n, None, None)
    if not clip > 0 or not noise_multiplier > 0:
        raise ValueError(f"clip and noise multiplier must be > 0 (got {clip}, {noise_multiplier})")
    rng = rng if rng is not None else np.random.default_rng()
    total = clip_rows(v, clip).sum(axis=0) + rng.normal(0.0, noise_multiplier * clip, size=v.shape[1])
    public = max(1, int(count)) if count is not None else n
    return ImportanceRelease(explanation.features, total / public, public, clip, noise_multiplier)


def release_mechanism(*, round: int, noise_multiplier: float, run_id: str = "") -> MechanismRecord:
    """The release as the accountant sees it: a Gaussian mechanism = q = 1, one step."""
    return MechanismRecord(round=round, noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, run_id=run_id,
                           kind="explanation")
