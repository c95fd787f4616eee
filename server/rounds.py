"""The round loop: Flower's ``Strategy.start`` protocol, from any round.

Flower's ``Strategy.start`` always counts rounds from 1. A resumed run continues at the
round after its checkpoint, and its rounds must keep their numbers (sites key their
ledgers by (run, round); the audit log, metrics and privacy records too). :func:`run_rounds`
is the same loop, calling the strategy's methods in the order ``start`` does (read from
``flwr/serverapp/strategy/strategy.py`` of the installed Flower; docs/architecture.md
names this reliance and ``tests/server/test_rounds.py`` compares the two):

    for each round: configure_train -> send_and_receive -> aggregate_train
                    -> configure_evaluate -> send_and_receive -> aggregate_evaluate
                    -> after_round(round, global arrays)

It starts at ``first_round``; ``after_round`` is where the ServerApp checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["run_rounds"]

logger = logging.getLogger(__name__)


def run_rounds(strategy: Strategy, grid: Grid, *, arrays: ArrayRecord, first_round: int, last_round: int,
               timeout: float, train_config: ConfigRecord, evaluate_config: ConfigRecord,
               after_round: Callable[[int, ArrayRecord], None]) -> ArrayRecord:
    """Rounds ``first_round`` .. ``last_round`` of ``strategy`` from the global model
    ``arrays``; returns the global model after the last round."""
    for server_round in range(first_round, last_round + 1):
        logger.debug("[ROUND %d/%d]", server_round, last_round)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid),
            timeout=timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid),
            timeout=timeout)
        strategy.aggregate_evaluate(server_round, replies)
        after_round(server_round, arrays)
    return arrays
