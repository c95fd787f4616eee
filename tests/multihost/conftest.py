"""Fixtures of the multi-host tests: a coordinator and four sites, each in its own network
namespace, joined by veths to one bridge (tests/multihost/netns.py).

One federation for the module. Its start is itself a fault: every site runs
`candor-client start` while the coordinator cannot be reached (s1 while the coordinator's
link is down, s2 and s3 while its server is not running); then the link comes up and
`candor-server start --host 10.251.0.1` runs, and the sites must join by themselves.
s2's clock runs 4 minutes behind (libfaketime) throughout; s4 is a spare site for the
clock probes and the bounded-wait check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

import netns
from netns import S2_SKEW, SITES, SPARE, Harness, Network

CONNECT_TIMEOUT = 90  # seconds each site waits for the coordinator (--connect-timeout): ample on a busy machine


@dataclass
class StartRecord:
    """When each site started waiting and when it connected (monotonic seconds)."""

    link_up: float = 0.0
    server_started: float = 0.0
    connected: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def faketime(tmp_path_factory) -> netns.Faketime:
    try:
        return netns.Faketime.build(tmp_path_factory.mktemp("faketime"))
    except RuntimeError as err:
        pytest.skip(f"clock-skew tests need libfaketime: {err}")


@pytest.fixture(scope="module")
def harness(tmp_path_factory, faketime):
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    removed = netns.remove_leftovers()
    if removed:
        print(f"\nremoved leftovers of an earlier run: {', '.join(removed)}")

    from candor.common.demo import breast_cancer_frame
    from candor.common.partition import partition

    root = tmp_path_factory.mktemp("multihost")
    net = Network.create([*SITES, SPARE])
    h = Harness(net=net, root=root)
    try:
        h.init("-c", "model=logreg", "-c", "num-server-rounds=2", "-c", "explain=false")
        (root / "data").mkdir()
        for name, part in zip((*SITES, SPARE), partition(breast_cancer_frame(), num_sites=4, label="diagnosis",
                                                          seed=11)):
            part.to_csv(root / "data" / f"{name}.csv", index=False)
            h.add_site(name, root / "data" / f"{name}.csv")
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def joined(harness, faketime) -> StartRecord:
    """The sites started before the coordinator could be reached, then joined."""
    h, record = harness, StartRecord()
    h.net.link_down(netns.COORDINATOR)
    h.start_site("s1", "--connect-timeout", CONNECT_TIMEOUT)
    h.net.wait_for(h.clients["s1"], "Waiting for the Candor server", timeout=90)
    record.link_up = time.monotonic()
    h.net.link_up(netns.COORDINATOR)
    h.start_site("s2", "--connect-timeout", CONNECT_TIMEOUT, env=faketime.env(S2_SKEW))
    h.start_site("s3", "--connect-timeout", CONNECT_TIMEOUT)
    for name in ("s2", "s3"):
        h.net.wait_for(h.clients[name], "Waiting for the Candor server", timeout=90)
    record.server_started = time.monotonic()
    h.start_coordinator()
    for name in SITES:
        record.connected[name] = h.net.wait_for(h.clients[name], "connected as node", timeout=120)
    return record
