"""Network faults over real network stacks: the coordinator and each site in its own
network namespace, reaching each other only over veth links (tests/multihost/netns.py).

1. a site's link cut mid-round (min-sites 2 of 3): the round completes with the others,
   the site rejoins the next round; the run finishes; every ledger checked against
   dp-accounting's PLD and against the coordinator's privacy.json; no ledger entry twice;
2. the coordinator unreachable when the sites start (its link down, its server not
   running): each site says what it waits for, retries, joins when the server comes up;
   a server that never comes up ends `candor-client start` within its bound;
3. a site's clock skewed (libfaketime): 4 min behind trains normally; 3 h either way
   and 400 days ahead are each refused with one line naming the clock.

Everything (namespaces, veths, processes) is removed at the end, and checked.
"""

from __future__ import annotations

import json
import re
import time

import pytest

import netns
from independent_accounting import pld_epsilon
from netns import S2_SKEW, SITES, SPARE

from candor.common.processes import wait_until

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 40  # seconds a round waits for replies: the cut site's reply never comes
ROUNDS = 3  # round 1 without the cut site; Flower's backoff (up to 20 s) may make it miss round 2 too
RUN_CONFIG = ["-c", "model=logreg", "-c", f"num-server-rounds={ROUNDS}", "-c", "min-sites=2", "-c", "explain=false",
              "-c", f"round-timeout={ROUND_TIMEOUT}", "-c", "site-wait-timeout=60", "-c", "target-epsilon=3",
              "-c", "target-delta=1e-5", "--wait-sites", "90"]
CUT = "s3"


class FaultRun:
    """What the link-cut run did: its process, output, directory and timings."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


CLOCK_PROBES = {"+3h": "ahead", "-3h": "behind", "+400d": "ahead"}  # libfaketime offset -> expected direction


@pytest.fixture(scope="module")
def fault_run(harness, joined, faketime) -> FaultRun:
    """`candor-server run` (3 rounds, min-sites 2); s3's link is cut as soon as s3 receives
    round 1's training message, and restored once the coordinator has aggregated round 1
    without it. While round 1 waits for s3, the spare site s4 tries `candor-client start`
    with its clock 3 h ahead, 3 h behind and 400 days ahead (the clock probes: the server
    is up, the run does not need s4)."""
    import shutil

    h = harness
    began = time.monotonic()
    cut_site = h.clients[CUT]
    seen = len(h.net.output(cut_site))
    run = h.run(*RUN_CONFIG)
    h.net.wait_for(cut_site, "Receiving: train message", timeout=180, after=seen)
    h.net.link_down(CUT)
    cut_at = time.monotonic()
    probes = {}
    for offset in CLOCK_PROBES:
        site = h.root / "variants" / f"clock{offset}"
        shutil.copytree(h.sites[SPARE], site, ignore=shutil.ignore_patterns("flwr", "logs", "ledger.json*"))
        probes[offset] = (h.start_site(SPARE, site_dir=site, label=f"clock{offset}", env=faketime.env(offset)),
                          time.monotonic(), site)

    def flower_log() -> str:
        logs = sorted((h.fed / "runs").glob("*/flower.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    ended = {}

    def probes_ended() -> bool:
        for offset, (proc, started, _) in probes.items():
            if offset not in ended and proc.poll() is not None:
                ended[offset] = time.monotonic() - started
        return len(ended) == len(probes)

    def round1_aggregated() -> bool:
        probes_ended()
        if run.poll() is not None:
            raise AssertionError("the run ended with s3's link still cut:\n" + h.net.output(run)[-3000:])
        return "aggregate_train: Received" in flower_log()

    wait_until(round1_aggregated, timeout=ROUND_TIMEOUT + 60, what="round 1's training to be aggregated",
               interval=0.5)
    aggregated_at = time.monotonic()
    h.net.link_up(CUT)
    restored_at = time.monotonic()
    wait_until(probes_ended, timeout=120, what="the clock probes to end", interval=0.5)
    wait_until(lambda: run.poll() is not None, timeout=420, what="the run to end", interval=0.5)
    run_dir = sorted(p.parent for p in (h.fed / "runs").glob("*/run.json"))[-1]
    return FaultRun(returncode=run.returncode, output=h.net.output(run), run_dir=run_dir, flower_log=flower_log(),
                    seconds=time.monotonic() - began, cut_after=cut_at - began,
                    link_down_for=restored_at - cut_at, aggregated_after_cut=aggregated_at - cut_at,
                    probes={offset: (proc.returncode, h.net.output(proc), ended[offset], site)
                            for offset, (proc, _, site) in probes.items()})


def _round_line(output: str, r: int) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"round {r}/{ROUNDS}"))


def _trained(line: str) -> set[str]:
    """The sites a round line lists with an ε (those whose training the coordinator aggregated)."""
    return set(re.findall(r"(s\d) \d+\.\d+", line.split("ε", 1)[1])) if "ε" in line else set()


# --- fault 2: the coordinator unreachable when the sites start ----------------------------

def test_sites_started_before_the_coordinator_wait_with_a_clear_line_then_join(harness, joined):
    h = harness
    for name in SITES:
        out = h.net.output(h.clients[name])
        waiting = next(line for line in out.splitlines() if line.startswith("Waiting for the Candor server"))
        assert f"at {h.address}" in waiting and "--connect-timeout" in waiting and "up to 90 s" in waiting, waiting
        assert "Traceback" not in out
        assert re.search(r"Server \S+ answered after \d+ s \(\d+ attempts\)", out), out
    # s1 started while the coordinator's link was down, s2 and s3 while no server listened
    assert "(no route to host)" in h.net.output(h.clients["s1"]) or "(no answer" in h.net.output(h.clients["s1"])
    assert all("(connection refused)" in h.net.output(h.clients[n]) for n in ("s2", "s3"))
    for name in SITES:  # joined once the server was up, within the bound, by themselves
        assert joined.server_started < joined.connected[name] < joined.server_started + 90
    print(f"\nconnected {', '.join(f'{n} {joined.connected[n] - joined.server_started:.1f} s' for n in SITES)} "
          "after `candor-server start` began")


def test_a_server_that_never_comes_up_ends_start_within_its_bound(harness):
    h = harness
    site = h.root / "variants" / "never"
    import shutil

    shutil.copytree(h.sites[SPARE], site, ignore=shutil.ignore_patterns("flwr", "logs", "ledger.json*"))
    began = time.monotonic()
    proc = h.client(SPARE, "start", site, "--invite", h.fed / "invites" / f"{SPARE}.toml", "--data", h.data[SPARE],
                    "--server", f"{netns.COORDINATOR_IP}:9",
                    "--connect-timeout", "6", timeout=60)
    seconds = time.monotonic() - began
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Waiting for the Candor server at 10.251.0.1:9 (connection refused)" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"cannot reach the Candor server at 10\.251\.0\.1:9 \(connection refused\) within "
                     r"--connect-timeout 6 s \(\d+ attempts\)", err[0]), err[0]
    assert seconds < 6 + 20  # the bound, plus data validation and imports
    print(f"\ngave up after {seconds:.1f} s (bound 6 s): {err[0][:100]}...")


# --- fault 1: a site's link cut mid-round -------------------------------------------------

def test_the_run_completes_with_the_others_and_the_cut_site_rejoins(harness, fault_run):
    h, run = harness, fault_run
    assert run.returncode == 0, run.output[-4000:]
    doc = json.loads((run.run_dir / "run.json").read_text())
    assert doc["status"] == "finished:completed"
    assert f"Run {doc['run_id']}: finished:completed" in run.output
    lines = [_round_line(run.output, r) for r in range(1, ROUNDS + 1)]
    assert "trained 2" in lines[0] and _trained(lines[0]) == {"s1", "s2"}, lines[0]  # round 1 without s3
    assert all({"s1", "s2"} <= _trained(line) for line in lines)
    back = [r for r, line in enumerate(lines, 1) if CUT in _trained(line)]
    assert back and back[-1] == ROUNDS, lines  # s3 trains again in a later round, and stays
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    out = h.net.output(h.clients[CUT])
    assert "Lost the connection to the server" in out and re.search(r"Reconnected to the server \S+ after \d+ s", out)
    assert h.clients[CUT].poll() is None  # the cut site's client never stopped
    print(f"\nrun {run.seconds:.0f} s; s3 cut {run.cut_after:.0f} s into the run for {run.link_down_for:.0f} s; "
          f"round 1 aggregated without it {run.aggregated_after_cut:.0f} s after the cut\n" + "\n".join(lines))


def _mechanism(m: dict) -> tuple:
    """One private release: its round, kind (training unless named) and mechanism."""
    return m["round"], m.get("kind", "training"), m["noise_multiplier"], m["sample_rate"], m["steps"]


def test_every_ledger_matches_an_independent_accountant_and_nothing_is_recorded_twice(harness, fault_run):
    h = harness
    run_id = json.loads((fault_run.run_dir / "config.json").read_text())["run_id"]  # Candor's, as ledgers hold it
    privacy = json.loads((fault_run.run_dir / "privacy.json").read_text())["sites"]
    figures = []
    for name in SITES:
        keys = [(e["run_id"], e["round"], e.get("kind", "training")) for e in h.ledger(name)]
        assert len(keys) == len(set(keys)), f"{name}: a ledger entry recorded twice: {keys}"
        entries = [e for e in h.ledger(name) if e["run_id"] == run_id]
        site_eps = pld_epsilon(entries, entries[-1]["delta"])
        history = privacy[name]["history"]
        server_eps = pld_epsilon(history, privacy[name]["delta"])
        assert privacy[name]["epsilon"] == pytest.approx(server_eps, rel=0.02)  # the coordinator's own figure
        assert entries[-1]["epsilon_run"] == pytest.approx(site_eps, rel=0.02)  # what the site was told
        recorded = [_mechanism(e) for e in entries]
        reported = [_mechanism(m) for m in history]
        assert set(reported) <= set(recorded), (reported, recorded)  # nothing reported the site did not record
        trained = sorted({r for r, kind, *_ in recorded if kind == "training"})
        if name == CUT:
            # s3's round-1 update (trained and recorded before the cut) reached the coordinator late or never:
            # whatever the coordinator reports, the site's own ledger never counts less
            assert set(recorded) - set(reported) <= {m for m in recorded if m[0] == 1}, (recorded, reported)
            assert ROUNDS in trained
            assert site_eps >= server_eps - 1e-6
        else:
            assert sorted(recorded) == sorted(reported) and trained == list(range(1, ROUNDS + 1))
            assert privacy[name]["epsilon"] == pytest.approx(site_eps, rel=0.02)
        assert site_eps <= 3.0 * 1.02  # the run's target
        figures.append(f"{name}: ledger {len(recorded)} releases, training rounds {trained}, ε(PLD) {site_eps:.3f}; "
                       f"privacy.json {len(reported)} releases, ε {privacy[name]['epsilon']:.3f} "
                       f"(PLD of its history {server_eps:.3f})")
    print("\n" + "\n".join(figures))


# --- fault 3: a site's clock skewed -------------------------------------------------------

def test_a_site_four_minutes_behind_trains_normally(harness, fault_run):
    h = harness
    out = h.net.output(h.clients["s2"])
    assert "connected as node" in out and "Traceback" not in out
    trained = [e["round"] for e in h.ledger("s2") if e.get("kind", "training") == "training"]
    assert trained == list(range(1, ROUNDS + 1))
    assert int(S2_SKEW) == -240


@pytest.mark.parametrize("offset, expected", [
    ("+3h", r"this machine's clock is 3\.0 h ahead of the server's"),
    ("-3h", r"this machine's clock is 3\.0 h behind the server's .*TLS says: the server's certificate at "
            r"10\.251\.0\.1:9092 is not valid yet"),
    ("+400d", r"this machine's clock is 400 days ahead of the server's .*TLS says: the server's certificate at "
              r"10\.251\.0\.1:9092 expired on"),
])
def test_a_skewed_clock_is_one_clear_line_at_start(fault_run, offset, expected):
    code, out, seconds, site = fault_run.probes[offset]
    assert code == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("candor-client:")]
    assert len(errors) == 1, out
    assert re.search(expected, errors[0]), errors[0]
    assert "Flower's node authentication refuses" in errors[0] and "NTP" in errors[0]
    assert "connected as node" not in out and not (site / "ledger.json").exists()
    print(f"\n{offset}: exit {code} after {seconds:.1f} s: {errors[0][:200]}...")


# --- the end: nothing left ------------------------------------------------------------------

def test_everything_is_removed_at_the_end(harness, fault_run):
    netns.assert_all_removed(harness)


def test_the_clock_limits_start_checks_are_flowers():
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE

    from candor.client.start_cmds import FLOWER_AHEAD_LIMIT, FLOWER_BEHIND_LIMIT

    assert FLOWER_AHEAD_LIMIT == SYSTEM_TIME_TOLERANCE
    assert FLOWER_BEHIND_LIMIT == TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE
