"""End to end on loopback: `candor-server run` trains 2 rounds with 4 real sites.

Three ordinary sites and one (h4) whose lifetime budget admits round 1 only. ε is
checked against dp-accounting's PLD accountant, not against our own code.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from candor.common.processes import wait_until

from deploy_helpers import BIN, BUDGET, BUDGET_SITE, DELTA, ENV, SITES, TARGET, client, pld_epsilon, server


def _ledger(site_dir):
    return json.loads((site_dir / "ledger.json").read_text())["entries"]


def test_run_finishes_streams_progress_and_writes_the_run_directory(deployment, completed_run):
    run = json.loads((completed_run.run_dir / "run.json").read_text())
    assert run["status"] == "finished:completed"
    out = completed_run.stdout
    for r, sites in ((1, 4), (2, 3)):  # per round: round, sites evaluated, loss, accuracy, ε per site
        line = next(l for l in out.splitlines() if l.startswith(f"round {r}/2"))
        # h4's budget admits neither round 2's training nor its private evaluation
        assert f"sites {sites}" in line and "loss" in line and "accuracy" in line, line
        assert all(re.search(rf"{s} \d+\.\d+", line) for s in SITES), line
    assert f"Run {run['run_id']}: finished:completed" in out
    saved = torch.load(completed_run.run_dir / "model.pt", weights_only=False)
    assert saved["state_dict"] and saved["model"] == "logreg"
    metrics = json.loads((completed_run.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(metrics["rounds"][0]["sites"]) == {*SITES, BUDGET_SITE}
    assert set(metrics["rounds"][1]["sites"]) == set(SITES)  # h4's budget does not admit another evaluation
    print(f"\ndeployed run: 2 rounds x 4 sites in {completed_run.seconds:.1f} s (incl. submission and ServerApp start)")


def test_every_site_ledger_holds_both_rounds_and_epsilon_matches_an_independent_accountant(
        deployment, completed_run):
    run_id = json.loads((completed_run.run_dir / "config.json").read_text())["run_id"]  # Candor's run id
    privacy = json.loads((completed_run.run_dir / "privacy.json").read_text())["sites"]
    for name in SITES:
        entries = _ledger(deployment.sites[name])
        # the row counts once, then each round's training and its private evaluation
        assert [(e["kind"], e["round"], e["run_id"]) for e in entries] == [
            ("row-count", 1, run_id), ("training", 1, run_id), ("evaluation", 1, run_id),
            ("training", 2, run_id), ("evaluation", 2, run_id)]
        independent = pld_epsilon(entries, entries[-1]["delta"])
        assert entries[-1]["epsilon_run"] == pytest.approx(independent, rel=0.02)  # what the site was told
        assert privacy[name]["epsilon"] == pytest.approx(independent, rel=0.02)  # what the server reports
        assert independent <= TARGET * 1.02
        code, out, err = client("ledger", deployment.sites[name], "--json")
        doc = json.loads(out)
        assert doc["rounds"] == 2 and doc["runs"][0]["run_id"] == run_id
        assert doc["total"]["epsilon"] == pytest.approx(pld_epsilon(entries, doc["total"]["delta"]), rel=0.02)


def test_a_nearly_spent_budget_refuses_the_round_that_would_exceed_it(deployment, completed_run):
    entries = _ledger(deployment.sites[BUDGET_SITE])
    training = [e for e in entries if e["kind"] == "training"]
    assert [e["round"] for e in training] == [1]  # round 2 was refused: nothing trained or recorded
    assert pld_epsilon(entries, DELTA) <= BUDGET  # no overspend
    assert pld_epsilon(entries + [{**training[0], "round": 2}], DELTA) > BUDGET  # the refusal was needed
    metrics = json.loads((completed_run.run_dir / "metrics.json").read_text())
    refusals = metrics["rounds"][1]["refusals"]
    assert len(refusals) == 1 and f"site '{BUDGET_SITE}' refuses round 2" in refusals[0]["reason"]
    assert metrics["rounds"][0]["refusals"] == []
    code, out, err = client("ledger", deployment.sites[BUDGET_SITE])
    assert code == 0 and f"Budget: ε ≤ {BUDGET:g}" in out
    # The budget is the site's own setting, kept in its directory across restarts.
    assert "epsilon = 2.8" in (deployment.sites[BUDGET_SITE] / "budget.toml").read_text()


def test_status_and_flowers_own_cli_see_the_federation(deployment, completed_run):
    run_id = json.loads((completed_run.run_dir / "run.json").read_text())["run_id"]
    code, out, err = server("status", deployment.fed)
    assert code == 0, err
    assert "SuperLink: running" in out
    for name in (*SITES, BUDGET_SITE):
        assert re.search(rf"^\s+{name}\s+online\s", out, re.M), out
    assert re.search(rf"{run_id}\s+finished:completed", out), out
    # A Flower user's view: `flwr ls` with the FLWR_HOME the federation keeps.
    ls = subprocess.run([BIN / "flwr", "ls", "candor", "--format", "json"], capture_output=True, text=True,
                        env={**ENV, "FLWR_HOME": str(deployment.fed / "flwr")}, timeout=60)
    runs = {r["run-id"]: r["status"] for r in json.loads(ls.stdout)["runs"]}
    assert runs[run_id] == "finished:completed"


def test_a_run_whose_server_app_fails_exits_non_zero(deployment, completed_run):
    # `flwr run` itself exits 0 when the ServerApp crashes; candor-server checks the status.
    proc = subprocess.run([BIN / "candor-server", "run", deployment.fed, "-c", "model=no_such_module:factory",
                           "-c", "min-sites=1", "--wait-sites", "60"], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ended as 'finished:failed'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_superlink_listens_on_loopback_only(deployment):
    listening = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == deployment.port:  # 0A = LISTEN
            listening.append(".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    assert listening == ["127.0.0.1"]


def test_removing_a_site_disconnects_it_and_its_key_cannot_return(deployment, completed_run):
    proc = deployment.clients["h3"]
    code, out, err = server("remove-site", deployment.fed, "h3")
    assert code == 0 and "unregistered and disconnected" in out, out + err
    wait_until(lambda: proc.poll() is not None, timeout=60, what="the removed site's client to stop")
    assert proc.returncode == 1
    assert "Traceback" not in deployment.procs.output(proc)
    code, out, err = server("add-site", deployment.fed, "h3", deployment.sites["h3"] / "keys" / "node.pub")
    assert code == 1 and "never re-admits a removed key" in err and len(err.strip().splitlines()) == 1
    code, out, err = server("sites", deployment.fed)
    assert "h3" not in out.split()
