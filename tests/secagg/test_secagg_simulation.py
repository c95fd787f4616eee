"""A real `candor-sim` run with secure aggregation: 3 sites, 2 rounds, DP on (target ε 3).

The simulation runs a test-only ClientApp (plaintext_tap.py: Candor's site app with a
Flower mod inside ``secagg_mod``) that writes the plaintext update each site masks to a
directory on the site's own disk; the test recomputes plaintext FedAvg from them and
compares it with what the coordinator produced from the masked sum.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from plaintext_tap import PLAINTEXT_DIR_ENV

from candor.common.config import RunConfig
from candor.common.hashing import hash_arrays
from candor.common.processes import APP_DIR
from candor.server.secagg import error_bound

HERE = Path(__file__).resolve().parent
SITES = {"hospital-1", "hospital-2", "hospital-3"}
TARGET = 3.0


def tapped_app(where: Path) -> Path:
    """A Flower App directory: Candor's pyproject.toml, whose ClientApp is plaintext_tap's."""
    where.mkdir()
    component = 'clientapp = "candor.client.app:app"'
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    assert pyproject.count(component) == 1
    pyproject = re.sub(r"(?ms)^fab-include = \[.*?^\]", 'fab-include = ["plaintext_tap.py"]', pyproject)  # this app's files
    (where / "pyproject.toml").write_text(pyproject.replace(component, 'clientapp = "plaintext_tap:app"'))
    shutil.copy(HERE / "plaintext_tap.py", where / "plaintext_tap.py")
    return where


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("secagg-sim")
    out, dump = base / "run", base / "site-updates"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "candor-sim"), "run", "--app-dir", str(tapped_app(base / "app")),
         "--num-sites", "3", "--out", str(out), "-c", "num-server-rounds=2",
         "-c", "secure-aggregation=true", "-c", f"target-epsilon={TARGET}",
         "-c", "explain=false"],  # the explanation phase does not involve aggregation
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", PLAINTEXT_DIR_ENV: str(dump)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert dump.is_dir(), "no site wrote its plaintext update: the run did not use plaintext_tap's ClientApp"
    return out, dump, proc


def site_updates(dump: Path, r: int) -> list[dict]:
    out = []
    for path in sorted(dump.glob(f"*-round{r}.npz")):
        z = np.load(path)
        keys = [str(k) for k in z["keys"]]
        out.append({"n": int(z["num_examples"]), "keys": keys,
                    "global": {k: z[f"global_{i}"].astype(np.float64) for i, k in enumerate(keys)},
                    "delta": {k: z[f"delta_{i}"] for i, k in enumerate(keys)}})
    return out


def test_completes_with_dp_and_writes_epsilon_per_site(run):
    out, _, proc = run
    assert "secure aggregation (SecAgg+)" in proc.stdout and "Privacy spent per site" in proc.stdout
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["dp"] is True and set(privacy["sites"]) == SITES
    for p in privacy["sites"].values():
        assert [h["round"] for h in p["history"] if h["kind"] == "training"] == [1, 2]
        assert 0 < p["epsilon"] <= TARGET + 1e-6
        assert p["epsilon"] == pytest.approx(p["epsilon_reported"], rel=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    for r in metrics["rounds"]:
        assert set(r["train"]) == SITES and set(r["sites"]) == SITES
        assert all(t["secagg-clipped"] == 0 and t["epsilon"] > 0 for t in r["train"].values())


def test_coordinator_result_is_plaintext_fedavg_of_the_sites_updates(run):
    out, dump, _ = run
    cfg = RunConfig()
    record = json.loads((out / "secure_aggregation.json").read_text())["rounds"]
    assert [r["round"] for r in record] == [1, 2] and all(len(r["summed_sites"]) == 3 for r in record)
    final = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    rounds = {r: site_updates(dump, r) for r in (1, 2)}
    assert all(len(u) == 3 for u in rounds.values())
    for r, updates in rounds.items():
        glob = updates[0]["global"]
        assert all(all(np.array_equal(u["global"][k], glob[k]) for k in glob) for u in updates)
        total = sum(u["n"] for u in updates)
        fedavg = {k: glob[k] + sum(u["n"] * u["delta"][k] for u in updates) / total for k in glob}
        result = rounds[2][0]["global"] if r == 1 else {k: v.numpy().astype(np.float64) for k, v in final.items()}
        max_delta = max(float(np.abs(u["delta"][k]).max()) for u in updates for k in glob)
        tol = error_bound([u["n"] for u in updates], max_abs_delta=max_delta, clipping_range=cfg.secagg_clipping_range,
                          max_weight=cfg.secagg_max_weight, quantization_range=cfg.secagg_quantization_range)
        tol += 4 * float(np.spacing(np.float32(max(np.abs(v).max() for v in fedavg.values()))))
        assert max(float(np.abs(fedavg[k] - result[k]).max()) for k in glob) <= tol, r
        assert max(float(np.abs(fedavg[k] - glob[k]).max()) for k in glob) > 100 * tol  # the round moved the model
    # the recorded hash of the last aggregate is the saved model's (the one array hash, hash_arrays)
    assert record[-1]["aggregate_sha256"] == hash_arrays(ArrayRecord(final))


def test_audit_log_pins_each_secure_aggregate_and_no_update(run):
    out, _, _ = run
    log = out / "audit.jsonl"
    rounds = [e["body"] for e in map(json.loads, log.read_text().splitlines()) if e["kind"] == "round"]
    record = json.loads((out / "secure_aggregation.json").read_text())["rounds"]
    assert [b["round"] for b in rounds] == [1, 2]
    for body, secure in zip(rounds, record):
        assert body["secure_aggregation"] is True
        assert body["aggregate_sha256"] is not None  # the audit layer asked SecureAggregation for it
        assert body["aggregate_sha256"] == secure["aggregate_sha256"]  # one hash in both files
        assert body["aggregate_sha256"] == body["global_model_sha256"]  # FedAvg adopts the secure mean as is
        assert all("sha256" not in u for u in body["updates"])  # no per-site update hash: none was seen
        assert {u["site"] for u in body["updates"]} == set(secure["summed_sites"]) == SITES
