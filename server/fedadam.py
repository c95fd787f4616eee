"""Flower's FedAdam, returning the global model in the dtypes it was sent in."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam

__all__ = ["FedAdam"]


class FedAdam(FlowerFedAdam):
    """Flower's FedAdam, returning the global model in the dtypes it was sent in.

    Flower's bias-corrected step size is a NumPy float64 scalar; under NumPy 2's promotion
    rules (NEP 50) it turns every float32 array of the new model into float64. The next
    round's updates, float32 again, then failed Candor's update checks (a dtype that is
    not the global model's) and the model stopped moving after round 1. Casting back to
    the dtype of the model that was sent keeps FedAdam's arithmetic and the model's format.
    """

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sent = self.current_arrays
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or sent is None:
            return arrays, metrics
        return ArrayRecord({k: Array(np.asarray(a.numpy(), dtype=sent[k].dtype)) for k, a in arrays.items()}), metrics
