"""A round waits for the sites it needs for a stated time, saying which are missing,
then the run stops with the reason (server/site_wait.py), instead of Flower's wait
without a deadline."""

from __future__ import annotations

import logging
import time
from unittest import mock

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from candor.common.errors import RunFailed
from candor.server.site_wait import SiteWait

from trust_helpers import reply


class Grid:
    """A grid whose connected nodes change from one poll to the next."""

    def __init__(self, *polls: list[int]) -> None:
        self.polls = list(polls)

    def get_node_ids(self) -> list[int]:
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]


def layer(timeout: float) -> SiteWait:
    return SiteWait(FedAvg(min_train_nodes=3, min_available_nodes=3), min_train=3, min_evaluate=2, timeout=timeout)


def test_a_round_starts_as_soon_as_the_sites_it_needs_are_connected(caplog):
    wait = layer(timeout=30)
    with mock.patch.object(FedAvg, "configure_train", return_value=["m"]) as inner, \
            caplog.at_level(logging.WARNING, logger="candor.server.site_wait"):
        assert wait.configure_train(1, ArrayRecord(), ConfigRecord(), Grid([1], [1, 2], [1, 2, 3])) == ["m"]
    assert inner.call_count == 1
    assert "round 1: waiting for sites to train: 1 of the 3 needed are connected" in caplog.text
    assert "2 of the 3 needed" in caplog.text and "site-wait-timeout 30 s" in caplog.text


def test_a_site_that_never_comes_back_stops_the_run_after_the_stated_time(caplog):
    wait = layer(timeout=1.5)
    w = {"w": np.zeros(2, dtype=np.float32)}
    with mock.patch.object(FedAvg, "aggregate_train", return_value=(None, None)):
        wait.aggregate_train(1, [reply("h1", w, node=1), reply("h2", w, node=2), reply("h3", w, node=3)])
    started = time.monotonic()
    with mock.patch.object(FedAvg, "configure_train") as inner, pytest.raises(RunFailed) as err:
        wait.configure_train(2, ArrayRecord(), ConfigRecord(), Grid([1, 2]))
    assert 1.5 <= time.monotonic() - started < 5
    assert not inner.called  # Flower's own wait, which has no deadline, is never reached
    assert ("round 2: only 2 of the 3 sites needed to train connected within site-wait-timeout = 1.5 s "
            "(missing: h3)") in str(err.value)
    assert "-c min-sites" in str(err.value) and "-c site-wait-timeout" in str(err.value)


def test_evaluation_waits_for_its_own_minimum():
    wait = layer(timeout=30)
    with mock.patch.object(FedAvg, "configure_evaluate", return_value=[]) as inner:
        wait.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Grid([4, 5]))
    assert inner.call_count == 1
