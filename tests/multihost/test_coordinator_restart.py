"""The coordinator's machine dies mid-run and the run is resumed, over real network stacks
(the coordinator and each site in its own network namespace: tests/multihost/netns.py).

A deployed run (3 sites) is killed as soon as some site has charged round 2: every
process of the coordinator (SuperLink, SuperExec, ServerApp, `candor-server run`, `flwr
run`) gets SIGKILL at once, as when its machine dies. The sites keep running. The
coordinator is started again (same address, state database, certificate), the sites
reconnect by themselves, and `candor-server run FED --resume RUN_DIR` finishes the run:

- every site's ledger holds each (run, round, kind) once, under one Candor run id, and
  training rounds 1..N each once; ε recomputed from each ledger (dp-accounting's PLD)
  matches privacy.json;
- the sites that had charged round 2 before the kill sent the update they had kept
  (a receipt with ``"resent": true``), not a new one;
- the audit log verifies with one resume; no checkpoint or resume key is left; no
  process or namespace is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch

import netns
from independent_accounting import pld_epsilon
from netns import COORDINATOR, SITES

from candor.common.processes import pid_alive, wait_until
from candor.server.audit import verify_run

pytestmark = pytest.mark.slow

ROUNDS = 3
KILL_ROUND = 2
RUN_CONFIG = ["-c", "model=logreg", "-c", f"num-server-rounds={ROUNDS}", "-c", f"min-sites={len(SITES)}",
              "-c", "explain=false", "-c", "round-timeout=60", "-c", "site-wait-timeout=60",
              "-c", "target-epsilon=3", "-c", "target-delta=1e-5", "--wait-sites", "90"]


class Restart:
    """What the killed-and-resumed run did: its directory, outputs, timings, ledgers at the kill."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _ledgers(h) -> dict[str, list[dict]]:
    out = {}
    for name in SITES:
        try:
            out[name] = h.ledger(name)
        except ValueError:  # never expected (the ledger is replaced atomically); read again next time
            out[name] = []
    return out


def _charged(ledgers: dict[str, list[dict]], round_: int) -> set[str]:
    return {s for s, entries in ledgers.items()
            if any(e["round"] == round_ and e["kind"] == "training" for e in entries)}


def _kill_the_coordinator(h) -> dict[int, str]:
    """SIGKILL every process in the coordinator's namespace, until none is left (its machine
    dies: no process gets to clean up); returns what was killed, pid -> command."""
    ns = h.net.nodes[COORDINATOR].ns
    killed: dict[int, str] = {}

    def gone() -> bool:
        for pid in netns.pids_in(ns):
            try:
                killed.setdefault(pid, open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:160])
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                pass
        return not [p for p in netns.pids_in(ns) if pid_alive(p)]

    wait_until(gone, timeout=30, what="every process of the coordinator to die", interval=0.05)
    return killed


@pytest.fixture(scope="module")
def restart(harness) -> Restart:
    h = harness
    began = time.monotonic()
    h.start_coordinator()
    for name in SITES:
        h.start_site(name, "--connect-timeout", 90)
    for name in SITES:
        h.net.wait_for(h.clients[name], "connected as node", timeout=120)
    first = h.run(*RUN_CONFIG, label="run")
    submitted = time.monotonic()
    at_kill: dict[str, list[dict]] = {}

    def round2_charged() -> bool:
        nonlocal at_kill
        if first.poll() is not None:
            raise AssertionError("the run ended before round 2:\n" + h.net.output(first)[-3000:])
        at_kill = _ledgers(h)
        return bool(_charged(at_kill, KILL_ROUND))

    wait_until(round2_charged, timeout=240, what=f"a site to charge round {KILL_ROUND}", interval=0.05)
    killed = _kill_the_coordinator(h)
    killed_at = time.monotonic()
    run_dir = sorted(p.parent for p in (h.fed / "runs").glob("*/run_config.toml"))[-1]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)

    restart_seconds = h.restart_coordinator()
    resumed = h.run("--resume", run_dir, "--wait-sites", "120", label="resume")
    resume_began = time.monotonic()
    wait_until(lambda: resumed.poll() is not None, timeout=300, what="the resumed run to end", interval=0.5)
    return Restart(run_dir=run_dir, first_output=h.net.output(first), output=h.net.output(resumed),
                   returncode=resumed.returncode, checkpoint_round=int(checkpoint["round"]), killed=killed,
                   charged_before_kill=_charged(at_kill, KILL_ROUND),
                   kill_after=killed_at - submitted, restart_seconds=restart_seconds,
                   resume_seconds=time.monotonic() - resume_began, seconds=time.monotonic() - began)


def test_the_kill_came_mid_round_2_with_round_1_checkpointed(restart):
    assert restart.checkpoint_round == KILL_ROUND - 1, "killed after round 2 completed: the test proves less"
    assert restart.charged_before_kill
    commands = " | ".join(restart.killed.values())
    for part in ("candor.server.superlink_main", "flower-superexec", "candor-server run", "flwr run"):
        assert part in commands, f"{part} was not running at the kill: {commands}"
    print(f"\nkilled {len(restart.killed)} processes {restart.kill_after:.1f} s after the run was submitted; "
          f"round {KILL_ROUND} charged by {sorted(restart.charged_before_kill)} before the kill")


def test_the_resumed_run_completes(restart):
    assert restart.returncode == 0, restart.output[-4000:]
    doc = json.loads((restart.run_dir / "run.json").read_text())
    assert doc["status"] == "finished:completed"
    assert len(doc["flower_run_ids"]) == 1  # the killed attempt never wrote run.json
    assert f"Run {doc['run_id']}: finished:completed" in restart.output
    metrics = json.loads((restart.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    print(f"\nrestart {restart.restart_seconds:.1f} s, resumed run {restart.resume_seconds:.1f} s, "
          f"whole test {restart.seconds:.1f} s")


def test_every_round_is_charged_once_under_one_run_id_and_matches_an_independent_accountant(harness, restart):
    h = harness
    run_id = json.loads((restart.run_dir / "config.json").read_text())["run_id"]
    privacy = json.loads((restart.run_dir / "privacy.json").read_text())["sites"]
    figures = []
    for name in SITES:
        entries = h.ledger(name)
        keys = [(e["run_id"], e["round"], e["kind"]) for e in entries]
        assert len(keys) == len(set(keys)), f"{name}: a ledger entry recorded twice: {keys}"
        assert {e["run_id"] for e in entries} == {run_id}, f"{name}: the resumed run is not one run at the site"
        assert sorted((e["kind"], e["round"]) for e in entries) == sorted(
            [("row-count", 1), *[(kind, r) for r in range(1, ROUNDS + 1) for kind in ("training", "evaluation")]])
        site_eps = pld_epsilon(entries, entries[-1]["delta"])
        assert privacy[name]["epsilon"] == pytest.approx(site_eps, rel=0.02)
        assert site_eps <= 3.0 * 1.02
        figures.append(f"{name}: {len(entries)} releases, ε(PLD of the ledger) {site_eps:.3f}, "
                       f"privacy.json {privacy[name]['epsilon']:.3f}")
    print("\n" + "\n".join(figures))


def test_the_sites_that_had_charged_round_2_resent_the_update_they_kept(harness, restart):
    """A site charges a round once it has trained it, whether or not the coordinator is still
    there to take the update: the sites that were training round 2 at the kill charge it just
    after (their reply goes nowhere). Each site that charged round 2 in the killed attempt
    resends that update to the resumed run; the others train round 2 there, once."""
    h = harness
    killed_run = re.search(r"Run (\d+) started", restart.first_output).group(1)
    resumed_run = re.search(r"Run (\d+) started", restart.output).group(1)
    resent, charged_in_killed_attempt = set(), set()
    for name in SITES:
        receipts = [json.loads(line) for line in (h.sites[name] / "receipts.jsonl").read_text().splitlines()]
        round2 = [r for r in receipts if r["round"] == KILL_ROUND and r["kind"] == "train"]
        first = [r for r in round2 if not r.get("resent")]
        again = [r for r in round2 if r.get("resent")]
        assert len(first) == 1 and len(again) <= 1, round2
        if first[0]["flower_run_id"] == killed_run:
            charged_in_killed_attempt.add(name)
        if again:
            resent.add(name)
            assert again[0]["flower_run_id"] == resumed_run and first[0]["flower_run_id"] == killed_run, round2
            assert again[0]["sent_update_sha256"] == first[0]["sent_update_sha256"]  # the same release again
        else:
            assert first[0]["flower_run_id"] == resumed_run, round2
    assert restart.charged_before_kill <= resent == charged_in_killed_attempt
    print(f"\nround {KILL_ROUND}: charged before the kill {sorted(restart.charged_before_kill)}, charged in the "
          f"killed attempt {sorted(charged_in_killed_attempt)}, resent to the resumed run {sorted(resent)}")


def test_the_audit_log_verifies_with_one_resume_and_nothing_to_resume_is_left(restart):
    summary = verify_run(restart.run_dir)
    assert (summary["resumes"], summary["rounds"]) == (1, ROUNDS)
    assert not (restart.run_dir / "checkpoint.pt").exists()
    assert not (restart.run_dir / "audit_key.resume.pem").exists()


def test_everything_is_removed_at_the_end(harness, restart):
    netns.assert_all_removed(harness)
