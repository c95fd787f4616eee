"""A real Flower simulation through `candor-sim`: 3 sites, 2 rounds, DP on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from independent_accounting import pld_epsilon
import pytest
import torch

from candor.common.encoding import Encoder
from candor.common.models import build_model
from candor.common.schema import Schema
from candor.common.training import TensorSplit, evaluate
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame

CANDOR_SIM = str(Path(sys.executable).parent / "candor-sim")
TARGET = 3.0  # the default 'target-epsilon'


@pytest.fixture(scope="module")
def run(default_sim):
    return default_sim  # tests/conftest.py: 3 sites, 2 rounds, default model, default target ε


def test_run_completes_and_writes_every_output(run):
    proc, out = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("metrics.json", "metrics.csv", "privacy.json", "model.pt", "progress.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert "round 2/2" in proc.stdout and "Privacy spent per site" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert set(r["sites"]) == {"hospital-1", "hospital-2", "hospital-3"}
        assert {"loss", "accuracy"} <= set(r["aggregate"])  # a private evaluation releases no AUROC
        assert all(m["release"] == "dp" for m in r["sites"].values())


def test_epsilon_is_cumulative_within_target_and_recomputable(run):
    proc, out = run
    privacy = json.loads((out / "privacy.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(privacy["sites"]) == {"hospital-1", "hospital-2", "hospital-3"}
    for site, p in privacy["sites"].items():
        assert [h["round"] for h in p["history"] if h["kind"] == "training"] == [1, 2]
        assert [h["kind"] for h in p["history"]] == ["row-count", "training", "evaluation", "training",
                                                     "evaluation", "explanation"]
        assert p["unprotected"] == [] and p["adjacency"] == "add/remove one row of the site's table"
        assert p["privacy_unit"] == "one record" and p["accountant"] == "prv"
        assert p["noise_seed"] == "public-seed (simulation only)"  # candor-sim's reproducible runs, stated
        assert p["delta"] < 1 / p["num_examples"]
        independent = pld_epsilon(p["history"], p["delta"])
        assert 1.0 <= p["epsilon"] / independent <= 1.05  # PRV is an upper bound; PLD agrees within 5%
        assert p["epsilon"] <= TARGET + 1e-6
        eps_round1 = metrics["rounds"][0]["train"][site]["epsilon"]
        assert eps_round1 < p["epsilon"]  # round 2 reports rounds 1..2 together, not round 2 alone
        ledger = json.loads((out / "ledgers" / f"{site}.json").read_text())
        assert [(e["kind"], e["round"]) for e in ledger["entries"]] == [(h["kind"], h["round"]) for h in p["history"]]


def test_model_beats_its_initialization(run):
    proc, out = run
    saved = torch.load(out / "model.pt", weights_only=False)
    schema = Schema.from_dict(saved["schema"])
    assert schema == Schema.load(DEMO_SCHEMA_PATH)
    encoder = Encoder(schema)
    from candor.common.validation import validate

    frame, _ = validate(breast_cancer_frame(), schema, source="embedded")
    x, y = encoder.encode(frame)
    data = TensorSplit(torch.from_numpy(x), torch.from_numpy(y))
    trained = build_model(saved["model"], num_features=encoder.num_features, num_outputs=1,
                          hidden=tuple(saved["hidden"]))
    trained.load_state_dict(saved["state_dict"])
    torch.manual_seed(42)
    initial = build_model(saved["model"], num_features=encoder.num_features, num_outputs=1,
                          hidden=tuple(saved["hidden"]))
    final, start = evaluate(trained, data, num_outputs=1), evaluate(initial, data, num_outputs=1)
    assert final["loss"] < start["loss"]
    assert final["accuracy"] > max(start["accuracy"], 0.7)  # 2 rounds of DP training at ε = 3


def test_bad_site_data_is_refused_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.csv"
    frame = breast_cancer_frame().head(40).astype({"mean_radius": object})
    frame.loc[3, "mean_radius"] = "abc"
    frame.drop(columns=["worst_area"]).to_csv(bad, index=False)
    good = tmp_path / "good.csv"
    breast_cancer_frame().head(60).to_csv(good, index=False)
    proc = subprocess.run(
        [CANDOR_SIM, "run", "--schema", str(DEMO_SCHEMA_PATH), "--site", f"a={good}",
         "--site", f"b={bad}", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "worst_area" in proc.stderr and "mean_radius" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--num-sites", "2", "-c", "secure-aggregation=true"], "secure-aggregation=true needs at least 3 sites"),
    (["--num-sites", "2", "-c", "min-sites=3"], "min-sites = 3 is more than the 2 simulated sites"),
])
def test_a_run_that_could_never_start_is_refused_at_once(tmp_path, extra, fragment):
    started = time.monotonic()
    proc = subprocess.run([CANDOR_SIM, "run", "--out", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and fragment in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30  # before Flower's engine starts (it alone takes 10-20 s)


def test_a_run_in_which_every_site_refuses_ends_non_zero_with_the_reasons(tmp_path):
    """Every site refuses round 1 (the target is unreachable for its data): the run stops
    there, exit code 1, with each site's reason; nothing is charged."""
    out = tmp_path / "out"
    proc = subprocess.run([CANDOR_SIM, "run", "--num-sites", "2", "--out", str(out), "-c", "num-server-rounds=3",
                           "-c", "target-epsilon=0.001"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "the run stopped: round 1: no site trained" in text and "more than the run's target 0.001" in text
    assert "Traceback" not in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(r["refusals"]) for r in metrics["rounds"]] == [2]  # round 1 only: it did not go on
    assert not any((out / "ledgers").glob("*.json"))
