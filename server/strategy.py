"""Strategy assembly, and the recording wrapper that sees every reply.

``RecordingStrategy`` wraps any Message-API strategy (FedAvg, FedProx, FedAdam, ...):
it delegates every decision to the wrapped strategy and hands each reply, with the
site name the reply carries, to the :class:`~server.outputs.RunRecorder`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from candor.common.config import RunConfig

from .outputs import RunRecorder, site_of

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
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites,
        min_available_nodes=cfg.min_sites,
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


class RecordingStrategy(Strategy):
    """Delegates to ``inner``; records every reply with ``recorder``."""

    def __init__(self, inner: Strategy, recorder: RunRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.recorder.sampled(server_round, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            self.recorder.train_reply(server_round, msg)
        # A fixed order (by site) makes the floating-point sums, hence seeded runs, reproducible.
        return self.inner.aggregate_train(server_round, sorted(
            (m for m in replies if not m.has_error()), key=site_of))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:
            self.recorder.evaluate_reply(server_round, msg)
        aggregate = self.inner.aggregate_evaluate(server_round, sorted(
            (m for m in replies if not m.has_error()), key=site_of))
        self.recorder.evaluate_aggregate(server_round, aggregate)
        return aggregate
