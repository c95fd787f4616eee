"""Code approval at the site, on real processes: a site runs only its installed Candor
release unless it approved other code.

The coordinator submits, with plain `flwr run` and its own FLWR_HOME, a copy of the
Candor app whose ClientApp writes a marker file in the site directory and trains without
noise (no accounting, no ledger). Every site refuses it before any of its code is
imported: the marker never appears, nothing is unpacked, no ledger entry or receipt is
written, the site logs one line naming the app hash and how to approve it, and the
coordinator sees each site's Error reply with that hash. After `candor-client approve`
of that copy at one site, that site runs it and the other still refuses.

This module builds its own two-site federation (the shared `deployment` fixture's sites
keep their ledgers for tests/deployment/test_run.py).
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import tomli_w
from deploy_helpers import Deployment, Processes, client, flwr, make_site, server, stop_superlink

from candor.common.app_hash import read_app_dir
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.partition import partition
from candor.common.processes import APP_DIR, free_port

pytestmark = pytest.mark.slow

SITES = ("a1", "a2")
MARKER = "TAMPERED-APP-RAN"

# The tampered ClientApp, a module added to a copy of Candor's app.
MARKER_APP = textwrap.dedent(f'''\
    """Not Candor's ClientApp: marks the site, then trains on its records without noise."""
    from pathlib import Path

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from candor.client import app as candor_app
    from candor.common.data import load_site
    from candor.common.models import build_model
    from candor.common.schema import Schema
    from candor.common.training import LocalTraining, train

    app = ClientApp()
    app.evaluate()(candor_app.handle_evaluate)


    @app.train()
    def train_without_noise(msg, context):
        node = context.node_config
        Path(str(node["site-dir"]), "{MARKER}").write_text(f"run {{msg.metadata.run_id}} from {{__file__}}\\n")
        schema = Schema.load(str(node["schema-path"]))
        data = load_site(schema, str(node["data-path"]), test_fraction=0.2, seed=0, min_rows=1)
        model = build_model("logreg", num_features=len(data.feature_names), num_outputs=schema.num_outputs,
                            hidden=(1,))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        result = train(model, data.train, settings=LocalTraining(steps=10, batch_size=32, learning_rate=0.5),
                       num_outputs=schema.num_outputs, generator=torch.Generator().manual_seed(0))
        return Message(RecordDict({{"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({{"num-examples": len(data.train),
                                                            "train-loss": result.loss}}),
                                   "candor": ConfigRecord({{"site": str(node["site-name"])}})}}), reply_to=msg)
''')


def _tampered_copy(target: Path) -> Path:
    """A copy of Candor's app (pyproject.toml and the packages) whose clientapp is MARKER_APP."""
    target.mkdir(parents=True)
    for folder in ("common", "client", "server", "simulations"):
        shutil.copytree(APP_DIR / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    assert pyproject.count('clientapp = "candor.client.app:app"') == 1 and pyproject.count("fab-include = [") == 1
    pyproject = pyproject.replace('clientapp = "candor.client.app:app"', 'clientapp = "candor_marker:app"')
    pyproject = pyproject.replace("fab-include = [", 'fab-include = [\n    "candor_marker.py",')
    (target / "pyproject.toml").write_text(pyproject)
    (target / "candor_marker.py").write_text(MARKER_APP)
    return target


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("approval")
    dep = Deployment(root=root, fed=root / "federation", port=free_port(), procs=Processes(root / "logs"))
    (root / "data").mkdir()
    for name, part in zip(SITES, partition(breast_cancer_frame(), num_sites=len(SITES), label="diagnosis", seed=5)):
        dep.data[name] = root / "data" / f"{name}.csv"
        part.to_csv(dep.data[name], index=False)
    code, out, err = server("init", dep.fed, "--name", "approval", "--host", "127.0.0.1", "--port", dep.port,
                            "--schema", DEMO_SCHEMA_PATH, "-c", "model=logreg")
    assert code == 0, err
    try:
        for name in SITES:
            dep.sites[name] = make_site(dep, name)
        code, out, err = server("start", dep.fed)
        assert code == 0, out + err
        for name in SITES:
            dep.start_client(name)
        for proc in dep.clients.values():
            dep.procs.wait_for(proc, "connected as node", timeout=180)
        yield dep
    finally:
        dep.procs.stop_all()
        stop_superlink(dep.fed)


@pytest.fixture(scope="module")
def tampered(fed):
    app_dir = _tampered_copy(fed.root / "tampered")
    return app_dir, read_app_dir(app_dir)[0].sha256


def _submit(dep: Deployment, app_dir: Path, name: str) -> tuple[str, str, Path]:
    """Plain `flwr run APP candor --stream` with the coordinator's FLWR_HOME; (run status, output, run dir)."""
    out_dir = dep.root / "runs" / name
    config = dep.root / f"{name}.toml"
    config.write_text(tomli_w.dumps({"schema": str(dep.fed / "schema.toml"), "out-dir": str(out_dir),
                                     "model": "logreg", "num-server-rounds": 1, "min-sites": len(SITES),
                                     "explain": False, "round-timeout": 120.0, "target-delta": 1e-5}))
    proc = flwr(dep.fed / "flwr", "run", app_dir, "candor", "--stream", "--run-config", config, timeout=600)
    output = proc.stdout + proc.stderr
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output[-3000:]
    status = "unknown"
    for _ in range(120):
        ls = flwr(dep.fed / "flwr", "ls", "candor", "--format", "json")
        status = {r["run-id"]: r["status"] for r in json.loads(ls.stdout)["runs"]}.get(found.group(1), "unknown")
        if status.startswith("finished"):
            break
        time.sleep(0.5)
    return status, output, out_dir


def _site_state(site: Path) -> dict[str, bytes | None]:
    return {name: (site / name).read_bytes() if (site / name).exists() else None
            for name in ("ledger.json", "receipts.jsonl", MARKER)}


def test_every_site_refuses_an_app_that_is_not_its_installed_release(fed, tampered):
    app_dir, sha = tampered
    before = {name: _site_state(fed.sites[name]) for name in SITES}
    logs_before = {name: (fed.sites[name] / "logs" / "supernode.log").read_text() for name in SITES}
    status, output, _ = _submit(fed, app_dir, "tampered")
    assert status == "finished:failed", output[-3000:]  # every site refused the round: nothing to aggregate
    for name in SITES:
        site = fed.sites[name]
        # The coordinator sees each site's refusal, naming the site, the app hash and the fix.
        assert (f"site '{name}' refuses app sha256 {sha}: not its installed Candor release" in output
                and f"candor-client approve {site} APP_DIR_OR_FAB" in output), output[-4000:]
        # Nothing ran: no marker, no ledger entry, no receipt; nothing of the app was unpacked.
        assert _site_state(site) == before[name]
        assert not (site / MARKER).exists()
        assert not (site / "flwr" / "apps").exists()
        # The site logged one line per refused message, with the hash and how to approve it; no traceback.
        new = (site / "logs" / "supernode.log").read_text()[len(logs_before[name]):]
        refusals = [line for line in new.splitlines() if "refuses app sha256" in line]
        assert len(refusals) >= 1 and all(sha in line and "candor-client approve" in line for line in refusals), new
        assert "Traceback" not in new and "MARKER" not in new, new
    assert "Traceback" not in fed.procs.output(fed.clients[SITES[0]])
    assert "refuses app sha256" in fed.procs.output(fed.clients[SITES[0]])  # what `candor-client start` shows


def test_after_approval_one_site_runs_the_app_and_the_other_still_refuses(fed, tampered):
    app_dir, sha = tampered
    approver, other = SITES
    code, out, err = client("approve", fed.sites[approver], app_dir)
    assert code == 0, err
    assert f"App {app_dir}: sha256 {sha}" in out
    assert "component clientapp: candor.client.app:app -> candor_marker:app" in out
    assert re.search(r"^\s+added\s+candor_marker\.py\s+\(\+\d+ -0 lines\)", out, re.M), out
    assert f"Approved: site '{approver}' runs app sha256 {sha}" in out
    code, out, err = client("approved", fed.sites[approver])
    assert code == 0 and sha in out, out + err

    ledgers_before = {name: _site_state(fed.sites[name])["ledger.json"] for name in SITES}
    status, output, run_dir = _submit(fed, app_dir, "approved-at-one-site")
    marker = fed.sites[approver] / MARKER
    assert marker.exists(), output[-4000:]
    # The approved bytes ran, unpacked by the guard (not the FAB directory Flower would install).
    assert "candor-app-" in marker.read_text() and "candor_marker.py" in marker.read_text()
    assert not (fed.sites[other] / MARKER).exists()
    assert f"site '{other}' refuses app sha256 {sha}" in output, output[-4000:]
    assert f"site '{approver}' refuses app" not in output
    # It trained without noise, so it charged no training round; the evaluation it took from Candor's
    # ClientApp is a private release, charged with the site's row counts. The refusing site charged nothing.
    assert _site_state(fed.sites[other])["ledger.json"] == ledgers_before[other]
    added = json.loads(_site_state(fed.sites[approver])["ledger.json"])["entries"][
        len(json.loads(ledgers_before[approver] or b'{"entries": []}')["entries"]):]
    assert [e["kind"] for e in added] == ["row-count", "evaluation"]
    receipts = [json.loads(line) for line in (fed.sites[approver] / "receipts.jsonl").read_text().splitlines()]
    assert receipts and all(r["app_sha256"] == sha for r in receipts)  # what handled each message
    log = (fed.sites[approver] / "logs" / "supernode.log").read_text()
    assert f"site '{approver}' runs app sha256 {sha} (an app this site approved" in log
    assert status.startswith("finished"), output[-3000:]


def test_only_the_sites_own_superexec_can_take_its_tasks(fed):
    # The SuperNode's Runtime API (loopback) refuses AcquireTask without the SuperExec secret.
    import urllib.error
    import urllib.request

    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    header = next(line for line in (fed.sites[SITES[0]] / "logs" / "supernode.log").read_text().splitlines()
                  if line.startswith("=== candor-client start"))
    port = int(re.search(r"--port (\d+)", header).group(1))
    assert "--isolation process --superexec-auth-secret-file" in header
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/runtime/acquire-task", method="POST",
                                     data=AcquireTaskRequest(supported_task_types=["flwr-clientapp"]).SerializeToString(),
                                     headers={"Content-Type": "application/protobuf", "Accept": "application/protobuf"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 401
