"""The recording layer: every reply, with the site name it carries, goes to the run recorder.

:class:`RecordingStrategy` wraps any Message-API strategy (FedAvg, FedProx, FedAdam, ...,
or a wrapper of one) and hands each training and evaluation reply to the
:class:`~candor.server.outputs.RunRecorder` (``metrics.json``, ``privacy.json``). It also
passes the inner strategy the replies without errors, in a fixed order (by site name):
floating-point sums then do not depend on the order replies arrived in, so seeded runs
are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from candor.common.errors import RunFailed

from candor.common.releases import EvaluationSums, evaluation_from_sums

from .outputs import RunRecorder, evaluation_sums, site_of
from .wrapper import StrategyWrapper

__all__ = ["RecordingStrategy"]


class RecordingStrategy(StrategyWrapper):
    """Delegates to ``inner``; records every reply with ``recorder``.

    A training round in which sites replied but none trained (every one refused: its
    budget, its limits, the app) cannot make progress, and neither can the rounds after
    it: :meth:`aggregate_train` raises :class:`~candor.common.errors.RunFailed` with
    every site's reason, and the run ends non-zero instead of "completing" untrained.
    """

    def __init__(self, inner: Strategy, recorder: RunRecorder) -> None:
        super().__init__(inner)
        self.recorder = recorder

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.sampled(server_round, [m.metadata.dst_node_id for m in messages])
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            self.recorder.train_reply(server_round, msg)
        trained = _in_site_order(replies)
        if replies and not trained:
            reasons = "; ".join(sorted({m.error.reason for m in replies}))
            raise RunFailed(f"round {server_round}: no site trained, every one of the {len(replies)} that replied "
                            f"refused or failed ({reasons}); no later round can do better, so the run stops")
        return super().aggregate_train(server_round, trained)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every evaluation reply and aggregate them. Sites that release their
        evaluation privately send noisy sums (``common.releases``): the aggregate is then
        the sum of every site's sums over the sum of their noisy counts (sites sending
        exact metrics count as exact sums), computed here, not by the inner strategy's
        weighted mean of per-site ratios; AUROC only when every site sent it in the clear.
        Sites that keep their evaluation local send nothing and are left out."""
        replies = list(replies)
        for msg in replies:
            self.recorder.evaluate_reply(server_round, msg)
        released = [m for m in _in_site_order(replies) if len(next(iter(m.content.metric_records.values()), {}))]
        metrics = [dict(next(iter(m.content.metric_records.values()))) for m in released]
        if metrics and all(evaluation_sums(m) is None for m in metrics):
            aggregate = super().aggregate_evaluate(server_round, released)
        else:
            sums = [evaluation_sums(m) or EvaluationSums(loss_sum=m["loss"] * m["num-examples"],
                                                         correct_sum=m["accuracy"] * m["num-examples"],
                                                         count=int(m["num-examples"]), loss_clip=1.0)
                    for m in metrics]
            aggregate = MetricRecord(evaluation_from_sums(sums)) if sums else None
        self.recorder.evaluate_aggregate(server_round, aggregate)
        return aggregate


def _in_site_order(replies: list[Message]) -> list[Message]:
    """The replies without errors, sorted by site name."""
    return sorted((m for m in replies if not m.has_error()), key=site_of)
