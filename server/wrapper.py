"""The one delegating base of the coordinator's strategy wrappers.

A Candor strategy is a stack of layers around one of Flower's aggregation strategies
(FedAvg, FedProx, FedAdam, FedMedian, ...): each layer adds one capability (recording,
update checks, secure aggregation, the signed audit trail) and delegates everything
else. :class:`StrategyWrapper` is that delegation, written once: it forwards every method
of Flower's ``Strategy`` interface to ``inner``, so that a wrapper overrides only what it
adds. The round loop (:func:`candor.server.rounds.run_rounds`, Flower's ``Strategy.start``
protocol from any round, so that a resumed run continues at its round) calls the outermost layer, which
calls the next, down to the aggregation strategy. The order of the layers is fixed in one
place, :func:`candor.server.strategy.assemble`.

Like Flower's ``DifferentialPrivacyFixedClippingBase``, a wrapper refuses at construction
an inner strategy it does not fit: the base refuses what is not a ``Strategy``, a layer
added twice, and wrapping a layer that must be outermost; each wrapper adds its own rules.

:class:`HidesUpdates` is the one question a layer may ask the layers inside it: whether
one of them shows the server only an aggregate of the updates (secure aggregation), and
that aggregate's hash.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar, Protocol, runtime_checkable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from candor.common.errors import message

__all__ = ["HidesUpdates", "StrategyWrapper", "layers"]


@runtime_checkable
class HidesUpdates(Protocol):
    """A layer after which the server holds only an aggregate of the sites' updates."""

    def aggregate_sha256(self, server_round: int) -> str | None:
        """``candor.common.hashing.hash_arrays`` of the aggregate computed in
        ``server_round``, or ``None`` if that round produced none (skipped)."""


def layers(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy`` and every layer inside it, outermost first, ending with the
    aggregation strategy."""
    while isinstance(strategy, StrategyWrapper):
        yield strategy
        strategy = strategy.inner
    yield strategy


class StrategyWrapper(Strategy):
    """Delegates every ``Strategy`` method to ``inner``; subclasses override what they add.

    Args:
        inner: the strategy this layer wraps (another wrapper, or Flower's aggregation
            strategy).

    Raises:
        TypeError: ``inner`` is not a ``Strategy``, already contains a layer of this type,
            or contains a layer that must be outermost.
    """

    #: A layer that must see the replies exactly as they arrive from the grid (nothing
    #: may wrap it).
    outermost: ClassVar[bool] = False

    def __init__(self, inner: Strategy) -> None:
        name = type(self).__name__
        if not isinstance(inner, Strategy):
            raise TypeError(message(f"{name}(inner)", "must wrap a Flower Message-API Strategy",
                                    got=type(inner).__name__))
        for layer in layers(inner):
            if type(layer) is type(self):
                raise TypeError(message(f"{name}(inner)", f"adds its capability once; the strategy it wraps "
                                        f"already contains a {name}", got=_stack(inner),
                                        fix="Build the stack with candor.server.strategy.assemble."))
            if isinstance(layer, StrategyWrapper) and layer.outermost:
                raise TypeError(message(f"{name}(inner)", f"cannot wrap {type(layer).__name__}, which must be "
                                        "the outermost layer", got=_stack(inner),
                                        fix="Build the stack with candor.server.strategy.assemble."))
        self.inner = inner

    def summary(self) -> None:
        return self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _stack(strategy: Strategy) -> str:
    return " > ".join(type(layer).__name__ for layer in layers(strategy))
