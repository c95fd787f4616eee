"""The waiting layer: a round waits for the sites it needs, for a stated time, then the
run stops with the reason.

Flower's strategies wait for ``min_available_nodes`` connected sites with no time limit
(``flwr.serverapp.strategy.strategy_utils.sample_nodes``): one crashed site under the
default ``min-sites`` (every site) stalls a deployed run silently and forever.
:class:`SiteWait` waits first, before each round's training and evaluation, until the
grid has the sites the round needs, saying what it waits for (how many, and which known
sites are missing) each time that changes; after ``site-wait-timeout`` seconds it stops
the run with :class:`~candor.common.errors.RunFailed` (``finished:failed``, exit 1), naming
the missing sites and the settings that decide it. The inner strategy then samples
without waiting. Site names are learnt from the replies that pass through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from candor.common.errors import RunFailed
from candor.common.progress import PROGRESS

from .outputs import site_of
from .wrapper import StrategyWrapper

__all__ = ["SiteWait"]

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # as Flower's own sample_nodes polls


class SiteWait(StrategyWrapper):
    """Delegates to ``inner``; before it samples, waits up to ``timeout`` seconds for
    ``min_train`` (training) or ``min_evaluate`` (evaluation) connected sites."""

    def __init__(self, inner: Strategy, *, min_train: int, min_evaluate: int, timeout: float) -> None:
        super().__init__(inner)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout}")
        self.min_train = min_train
        self.min_evaluate = min_evaluate
        self.timeout = timeout
        self._sites: dict[int, str] = {}  # node id -> site name, from replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._wait(grid, self.min_train, server_round, "train")
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._wait(grid, self.min_evaluate, server_round, "evaluate")
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._learn(replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._learn(replies)
        return super().aggregate_evaluate(server_round, replies)

    def _learn(self, replies: list[Message]) -> None:
        for msg in replies:
            if not msg.has_error():
                self._sites[msg.metadata.src_node_id] = site_of(msg)

    def _missing(self, connected: list[int]) -> str:
        gone = sorted(name for node, name in self._sites.items() if node not in connected)
        return ", ".join(gone) if gone else "not yet known (no site has replied yet)"

    def _wait(self, grid: Grid, needed: int, server_round: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        shown = None
        while len(connected := list(grid.get_node_ids())) < needed:
            if len(connected) != shown:
                shown = len(connected)
                logger.warning("%s round %d: waiting for sites to %s: %d of the %d needed are connected (missing: %s);"
                               " giving up at %s (site-wait-timeout %.0f s)", PROGRESS, server_round, what,
                               len(connected), needed, self._missing(connected),
                               time.strftime("%H:%M:%S", time.localtime(time.time() + deadline - time.monotonic())),
                               self.timeout)
            if time.monotonic() > deadline:
                raise RunFailed(f"round {server_round}: only {len(connected)} of the {needed} sites needed to {what} "
                                f"connected within site-wait-timeout = {self.timeout:g} s (missing: "
                                f"{self._missing(connected)}). Ask the missing sites to run `candor-client start`, "
                                "or run with a lower -c min-sites or a longer -c site-wait-timeout")
            time.sleep(POLL_SECONDS)
