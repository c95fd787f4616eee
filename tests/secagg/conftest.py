"""Fixtures of the secure-aggregation tests (the in-process grid is in secagg_grid.py)."""

from __future__ import annotations

import pytest
from secagg_grid import FakeSite, LoopbackGrid


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a Flower process need a task identity (run 7, the SuperLink node 1)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture
def loopback():
    """``loopback(sites, **kw)``: a LoopbackGrid whose sites run ``secagg_mod`` around
    ``FakeSite.train`` (secagg_grid.site_app)."""

    def make(sites: dict[int, FakeSite], **kwargs) -> LoopbackGrid:
        return LoopbackGrid(sites, **kwargs)

    return make
