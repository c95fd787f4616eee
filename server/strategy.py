"""The run's strategy: Flower's aggregation strategy, and the stack of layers around it.

:func:`build_strategy` builds the aggregation strategy the run config names (FedAvg,
FedProx, FedAdam, FedMedian, FedTrimmedAvg, Krum). :func:`assemble` wraps it in Candor's
layers, each a :class:`~candor.server.wrapper.StrategyWrapper` that adds one capability;
this is the one place their order is fixed, outermost first::

    AuditedStrategy      hashes every reply as it arrives; one signed entry per round
    RecordingStrategy    every reply to metrics.json / privacy.json; replies in site order
    SecureAggregation    (secure-aggregation = true) the server sees only the weighted mean
      or UpdateChecks    (otherwise) drops malformed, non-finite or too-large updates
    FedAvg, FedProx, ... the aggregation strategy

Flower's ``Strategy.start`` drives the outermost layer, which calls the next one down.
"""

from __future__ import annotations

import logging
import math

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from candor.common.config import RunConfig
from candor.common.progress import PROGRESS

from .audit import AuditLog
from .audited import AuditedStrategy
from .checks import UpdateChecks
from .fedadam import FedAdam
from .outputs import RunRecorder
from .recording import RecordingStrategy
from .secagg import MIN_SITES, RECORD_FILE, SecureAggregation
from .site_wait import SiteWait

__all__ = ["FedAdam", "assemble", "build_strategy", "nan_aware_mean"]

logger = logging.getLogger(__name__)


def nan_aware_mean(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Example-weighted mean of every metric, skipping NaN (e.g. AUROC of a one-class split)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weighting_key])
        for key, value in metrics.items():
            if key == weighting_key or isinstance(value, list) or math.isnan(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


def build_strategy(cfg: RunConfig) -> Strategy:
    """Flower's aggregation strategy named by ``cfg.strategy``, with the run's sampling.

    Training waits for ``min-sites`` sites; with secure aggregation for at least
    :data:`~candor.server.secagg.MIN_SITES` (3), which a secure sum needs.
    """
    min_train = max(cfg.min_sites, MIN_SITES) if cfg.secure_aggregation else cfg.min_sites
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_train,
        min_evaluate_nodes=cfg.min_sites,
        min_available_nodes=min_train,
        train_metrics_aggr_fn=nan_aware_mean,
        evaluate_metrics_aggr_fn=nan_aware_mean,
    )
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return FedAdam(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, **common)
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.trimmed_beta, **common)
    if cfg.strategy == "krum":
        return Krum(num_malicious_nodes=cfg.krum_byzantine, **common)
    return FedAvg(**common)


def assemble(cfg: RunConfig, inner: Strategy, *, recorder: RunRecorder, audit: AuditLog) -> Strategy:
    """The run's strategy: ``inner`` (from :func:`build_strategy`) in Candor's layers.

    Outermost first: audit (:class:`~candor.server.audited.AuditedStrategy`), recording
    (:class:`~candor.server.recording.RecordingStrategy`), waiting for the sites a round
    needs with a deadline (:class:`~candor.server.site_wait.SiteWait`), then secure aggregation
    (:class:`~candor.server.secagg.SecureAggregation`, writing ``secure_aggregation.json``
    in the run directory) if ``cfg.secure_aggregation``, else the update checks
    (:class:`~candor.server.checks.UpdateChecks`, reporting rejections to ``recorder``),
    then ``inner``. The audit layer learns the secure aggregate's hash by asking the
    layers inside it (:class:`~candor.server.wrapper.HidesUpdates`).
    """
    if cfg.secure_aggregation:
        guarded: Strategy = SecureAggregation.from_config(inner, cfg, log_path=recorder.dir / RECORD_FILE)
        logger.info("%s secure aggregation (SecAgg+): the coordinator sees only the weighted sum of the "
                    "site updates", PROGRESS)
    else:
        guarded = UpdateChecks(inner, max_update_norm=cfg.max_update_norm, on_reject=recorder.rejected)
    waiting = SiteWait(guarded, min_train=_inner_min(inner, "min_train_nodes", cfg.min_sites),
                       min_evaluate=_inner_min(inner, "min_evaluate_nodes", cfg.min_sites),
                       timeout=cfg.site_wait_timeout)
    return AuditedStrategy(RecordingStrategy(waiting, recorder), audit, recorder)


def _inner_min(inner: Strategy, attribute: str, default: int) -> int:
    """The sites the aggregation strategy waits for (its ``min_available_nodes`` and
    ``attribute``), so that the waiting layer waits for exactly what it would."""
    return max(int(getattr(inner, attribute, default)), int(getattr(inner, "min_available_nodes", default)))
