"""A coordinator killed mid-round (SIGKILL of every process of `candor-sim`, as when its
machine dies) resumes with `candor-sim run --resume RUN_DIR`: the run completes as the
same run, no site pays twice for a round, and the result is the run that was never
interrupted (FedAdam, whose moments live only in the coordinator's checkpoint)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from independent_accounting import pld_epsilon

from candor.common.processes import descendants, pid_alive, start_time
from candor.server.audit import verify_run

pytestmark = pytest.mark.slow

CANDOR_SIM = str(Path(sys.executable).parent / "candor-sim")
ARGS = ["--num-sites", "3", "-c", "num-server-rounds=3", "-c", "strategy=fedadam", "-c", "model=logreg"]
ROUNDS = 3


def sim(*args: str, tmp: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([CANDOR_SIM, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            **kw)


def ledger_entries(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted((run_dir / "ledgers").glob("*.json")):
        out[path.stem] = json.loads(path.read_text())["entries"]
    return out


@pytest.fixture
def short_tmp():
    tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _kill_mid_round(proc: subprocess.Popen, run_dir: Path, kill_round: int) -> tuple[dict[int, str], dict]:
    """SIGKILL every process of ``proc`` as soon as a site has charged ``kill_round``;
    returns the processes killed and the ledgers at that instant."""
    seen: dict[int, str] = {}
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 300
    while True:  # record the tree while it grows: Ray's agents start sessions of their own
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        seen.update(descendants(proc.pid))
        try:
            ledgers = ledger_entries(run_dir)
        except (OSError, ValueError):  # a ledger being replaced at this instant
            continue
        if any(e["round"] == kill_round and e["kind"] == "training" for entries in ledgers.values() for e in entries):
            break
        time.sleep(0.02)  # polling a file: there is no event to wait on
    for pid, started in [(proc.pid, start_time(proc.pid)), *seen.items()]:
        if start_time(pid) == started:
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return seen, ledgers


def test_a_run_killed_mid_round_resumes_charges_every_round_once_and_ends_as_if_never_interrupted(tmp_path, short_tmp):
    straight = tmp_path / "straight"
    done = sim(*ARGS, "--out", str(straight), tmp=short_tmp)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out[-3000:]

    run_dir = tmp_path / "killed"
    kill_round = random.Random().choice(range(2, ROUNDS + 1))
    seen, at_kill = _kill_mid_round(sim(*ARGS, "--out", str(run_dir), tmp=short_tmp), run_dir, kill_round)
    deadline = time.monotonic() + 30
    while any(pid_alive(p) and start_time(p) == s for p, s in seen.items()):
        assert time.monotonic() < deadline, "processes survived SIGKILL"
        time.sleep(0.1)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == kill_round - 1, "killed after the round completed: the test proves less"
    charged_at_kill = {s for s, entries in at_kill.items()
                       if any(e["round"] == kill_round and e["kind"] == "training" for e in entries)}

    resumed = sim("--resume", str(run_dir), tmp=short_tmp)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"round {kill_round - 1} of {ROUNDS} completed" in out

    # every site paid for every round once, with the mechanisms of the uninterrupted run
    ledgers, reference = ledger_entries(run_dir), ledger_entries(straight)
    assert set(ledgers) == set(reference) == {"hospital-1", "hospital-2", "hospital-3"}
    mechanism = lambda e: (e["kind"], e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"])  # noqa: E731
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    for site, entries in ledgers.items():
        assert len({e["run_id"] for e in entries}) == 1, "the resumed run is one run at the site"
        releases = [(e["kind"], e["round"]) for e in entries]  # the counts, 3 rounds, 3 evaluations, the explanation
        assert sorted(releases) == sorted([("row-count", 1), *[(k, r) for r in (1, 2, 3) for k in ("training", "evaluation")],
                                           ("explanation", ROUNDS + 1)]), releases
        assert [mechanism(e) for e in entries] == [mechanism(e) for e in reference[site]]
        independent = pld_epsilon(entries, delta=entries[0]["delta"])
        assert privacy[site]["epsilon"] == pytest.approx(independent, rel=0.02)
        assert sorted((h["kind"], h["round"]) for h in privacy[site]["history"]) == sorted(releases)
    # the sites that had charged the killed round sent the update they had kept, not a new one
    receipts = {s: [json.loads(line) for line in (run_dir / "ledgers" / f"{s}.receipts.jsonl").read_text().splitlines()]
                for s in ledgers}
    resent = {s for s, rs in receipts.items()
              if any(r.get("resent") and r["round"] == kill_round and r["kind"] == "train" for r in rs)}
    assert resent == charged_at_kill and charged_at_kill
    # the same model as the run that was never interrupted
    final, expected = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (run_dir, straight))
    assert final.keys() == expected.keys()
    for key in final:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    summary = verify_run(run_dir)
    assert (summary["rounds"], summary["resumes"]) == (ROUNDS, 1)
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "audit_key.resume.pem").exists()
    assert (run_dir / "flower.log").stat().st_size and (run_dir / "flower.resume-1.log").stat().st_size  # both kept


def test_resume_refuses_a_run_without_checkpoint_and_changed_options_in_one_line(tmp_path, capsys):
    from candor.simulations.cli import main

    (tmp_path / "run").mkdir()
    assert main(["run", "--resume", str(tmp_path / "run")]) == 1
    assert "checkpoint.pt: no checkpoint, so there is nothing to resume" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "run"), "-c", "num-server-rounds=5"]) == 1
    assert "leave out -c" in capsys.readouterr().err
