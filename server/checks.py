"""Checks on every received update before it is aggregated.

:class:`UpdateChecks` wraps any Message-API strategy (a
:class:`~candor.server.wrapper.StrategyWrapper`). It remembers the global model it
sent in ``configure_train`` and, in ``aggregate_train``, passes on only the replies whose
update

- is one ArrayRecord with exactly the global model's keys, shapes and dtypes,
- holds only finite values,
- moves the model by at most ``max_update_norm`` (L2 norm of ``update - global`` over
  all arrays; 0 = no bound),

and whose one MetricRecord has a finite ``num-examples`` > 0 (the aggregation weight).
Every other reply is rejected: logged with the site's name, reported through
``on_reject(round, site, reason)`` (the run recorder puts it in ``metrics.json``), and the
round goes on without it. Under secure aggregation the server never sees an individual
update: :class:`UpdateChecks` refuses to wrap a layer that hides them
(:class:`~candor.server.wrapper.HidesUpdates`), and the run has no per-update checks
(docs/trust.md).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from candor.common.errors import message
from candor.common.progress import PROGRESS

from .outputs import site_of
from .wrapper import HidesUpdates, StrategyWrapper, layers

__all__ = ["UpdateChecks", "check_update"]

logger = logging.getLogger(__name__)


def _metric_keys(msg: Message) -> frozenset[str]:
    return frozenset(next(iter(msg.content.metric_records.values())).keys())


def check_update(msg: Message, sent: dict[str, np.ndarray], *, max_update_norm: float) -> str | None:
    """Why the reply ``msg`` must not be aggregated, or ``None`` if it may."""
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return f"expected one ArrayRecord (the model update), got {len(records)}"
    metrics = list(msg.content.metric_records.values())
    weight = metrics[0].get("num-examples") if len(metrics) == 1 else None
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"expected one MetricRecord with a finite 'num-examples' > 0, got {weight!r}"
    update = records[0]
    missing, extra = sorted(set(sent) - set(update)), sorted(set(update) - set(sent))
    if missing or extra:
        return f"its arrays differ from the global model's: missing {missing}, unexpected {extra}"
    squared = 0.0
    for key, base in sent.items():
        array = update[key].numpy()
        if array.shape != base.shape or array.dtype != base.dtype:
            return (f"array '{key}' is {array.dtype}{list(array.shape)}; the global model's is "
                    f"{base.dtype}{list(base.shape)}")
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            return f"array '{key}' has {bad} non-finite value(s) (NaN or ±inf)"
        squared += float(np.sum(np.square(array.astype(np.float64) - base.astype(np.float64))))
    norm = math.sqrt(squared)
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}"
    return None


class UpdateChecks(StrategyWrapper):
    """Delegates to ``inner``; drops the updates :func:`check_update` rejects.

    Raises:
        TypeError: a layer inside ``inner`` hides the individual updates (secure
            aggregation): there would be nothing to check.
    """

    def __init__(self, inner: Strategy, *, max_update_norm: float = 0.0,
                 on_reject: Callable[[int, str, str], None] = lambda r, site, reason: None) -> None:
        super().__init__(inner)
        hiding = [type(layer).__name__ for layer in layers(inner) if isinstance(layer, HidesUpdates)]
        if hiding:
            raise TypeError(message("UpdateChecks(inner)", "checks each site's update, so it cannot wrap a layer "
                                    "that hides them from the server", got=hiding[0],
                                    fix="Under secure aggregation the updates cannot be checked (docs/trust.md)."))
        self.max_update_norm = max_update_norm
        self.on_reject = on_reject
        self._sent: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = {key: arrays[key].numpy() for key in arrays}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        checked = [(msg, check_update(msg, self._sent, max_update_norm=self.max_update_norm))
                   for msg in replies if not msg.has_error()]
        # Flower's strategies abort the whole round on replies whose metric keys differ:
        # keep the most common key set, reject the others.
        keysets = Counter(_metric_keys(m) for m, reason in checked if reason is None)
        usual = keysets.most_common(1)[0][0] if keysets else frozenset()
        accepted = []
        for msg, reason in checked:
            if reason is None and _metric_keys(msg) != usual:
                reason = f"its metrics have keys {sorted(_metric_keys(msg))}; the round's other updates have {sorted(usual)}"
            if reason is None:
                accepted.append(msg)
                continue
            site = site_of(msg)
            logger.warning("%s round %d: rejected the update of site '%s': %s", PROGRESS, server_round, site, reason)
            self.on_reject(server_round, site, reason)
        return super().aggregate_train(server_round, accepted)
