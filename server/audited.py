"""The audit layer: one signed ``round`` entry in the run's audit log per round.

:class:`AuditedStrategy` is the outermost layer of the run's strategy
(:func:`candor.server.strategy.assemble`): it hashes every update as it arrives from the
grid, before any layer inside it sees the replies (some, like FedMedian, consume the
replies' arrays), lets the inner layers aggregate, and appends the round to the
:class:`~candor.server.audit.AuditLog` (format: :mod:`candor.server.audit`). It reads the
updates the checks rejected and the refusals from the run recorder's round entry. If a
layer inside it hides the individual updates (:class:`~candor.server.wrapper.HidesUpdates`,
i.e. secure aggregation), the entry keeps no per-update hash and pins the aggregate's
hash, which it asks that layer for.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from candor.common.hashing import hash_arrays

from .audit import AuditLog, describe_update
from .outputs import RunRecorder
from .wrapper import HidesUpdates, StrategyWrapper, layers

__all__ = ["AuditedStrategy"]


class AuditedStrategy(StrategyWrapper):
    """Delegates to ``inner``; appends one signed ``round`` entry to ``log`` per round.

    Args:
        inner: the rest of the stack (recording, checks or secure aggregation, the
            aggregation strategy).
        log: the run's audit log (its ``start`` entry already written).
        recorder: the run recorder whose round entries list rejections and refusals.
    """

    outermost = True  # it must hash the replies as they arrive, before any layer consumes them

    def __init__(self, inner: Strategy, log: AuditLog, recorder: RunRecorder) -> None:
        super().__init__(inner)
        self.log = log
        self.recorder = recorder
        self._hiding: HidesUpdates | None = next(
            (layer for layer in layers(inner) if isinstance(layer, HidesUpdates)), None)
        self._sent = ""

    @property
    def secure_aggregation(self) -> bool:
        """Whether a layer inside hides the individual updates from the server."""
        return self._hiding is not None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = hash_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = [describe_update(m) for m in replies if not m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry = self.recorder.rounds.get(server_round, {})
        self.log.round(
            server_round,
            sent_model_sha256=self._sent,
            updates=updates,
            rejected=entry.get("rejected", []),
            refusals=entry.get("refusals", []),
            global_model_sha256=hash_arrays(arrays) if arrays is not None else self._sent,
            secure_aggregation=self._hiding is not None,
            aggregate_sha256=self._hiding.aggregate_sha256(server_round) if self._hiding is not None else None,
        )
        return arrays, metrics
