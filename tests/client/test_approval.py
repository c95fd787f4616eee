"""Which code a site runs: the approved set, the approve commands, the guard in front of
Flower's ClientApp runner, Candor's SuperExec launcher, and the audit's app check."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord
from flwr.cli.build import build_fab_from_disk

from candor.client import clientapp_main as guard
from candor.client.approval import APPROVED_APPS, Approvals
from candor.client.cli import main as client_main
from candor.common.app_hash import APP_SHA256_ENV, installed_release, read_app_dir, read_fab, running_app_sha256
from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.errors import SiteError
from candor.common.hashing import hash_arrays
from candor.common.processes import APP_DIR
from candor.common.schema import Schema
from candor.server.audit import AuditLog

MARKER_MODULE = "from flwr.clientapp import ClientApp\nfrom candor.client import app as candor_app\napp = ClientApp()\n"


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = client_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def site(tmp_path) -> Path:
    site_dir = tmp_path / "site"
    code, out, err = run("init", site_dir, "--site-name", "h1")
    assert code == 0, err
    return site_dir


@pytest.fixture(scope="module")
def tampered(tmp_path_factory) -> Path:
    """A copy of the release whose clientapp is another module, with one file changed."""
    app = tmp_path_factory.mktemp("apps") / "tampered"
    app.mkdir()
    for folder in ("common", "client", "server", "simulations"):
        shutil.copytree(APP_DIR / folder, app / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    pyproject = pyproject.replace('clientapp = "candor.client.app:app"', 'clientapp = "marker_app:app"')
    (app / "pyproject.toml").write_text(pyproject.replace("fab-include = [", 'fab-include = [\n    "marker_app.py",'))
    (app / "marker_app.py").write_text(MARKER_MODULE)
    (app / "client" / "receipts.py").write_text((app / "client" / "receipts.py").read_text() + "\n# changed\n")
    return app


@pytest.fixture(scope="module")
def tampered_fab(tampered) -> bytes:
    return build_fab_from_disk(tampered)


# --- the approved set ----------------------------------------------------------------------

def test_approve_list_and_revoke(site, tampered_fab):
    approvals = Approvals(site)
    app, installed = read_fab(tampered_fab), installed_release()
    assert approvals.entries() == [] and approvals.active() == set()
    entry, new = approvals.approve(app, source="x.fab", installed=installed)
    assert new and entry.sha256 == app.sha256 and entry.installed_sha256 == installed.sha256
    assert entry.differs == {"added": 1, "removed": 0, "changed": 1, "components": 1}
    assert approvals.approve(app, source="y.fab", installed=installed) == (entry, False)
    assert stat.S_IMODE((site / APPROVED_APPS).stat().st_mode) == 0o600
    doc = json.loads((site / APPROVED_APPS).read_text())
    assert doc["format"] == "candor-approved-apps" and [a["sha256"] for a in doc["apps"]] == [app.sha256]
    assert approvals.active() == {app.sha256}
    with pytest.raises(SiteError, match="at least its first 12 hex digits"):
        approvals.revoke(app.sha256[:8])
    revoked = approvals.revoke(app.sha256[:16])
    assert revoked.revoked_at is not None and approvals.active() == set() and approvals.ever() == {app.sha256}
    with pytest.raises(SiteError, match="no approved app has sha256"):
        approvals.revoke(app.sha256)


def test_a_damaged_approvals_file_is_one_clear_error(site):
    (site / APPROVED_APPS).write_text('{"format": "candor-approved-apps", "version": 1, "apps": [{"sha256": "x"}]}')
    with pytest.raises(SiteError, match="not a Candor approved-apps file"):
        Approvals(site).entries()
    (site / APPROVED_APPS).write_text("{oops")
    with pytest.raises(SiteError, match="unreadable"):
        Approvals(site).active()


# --- the commands --------------------------------------------------------------------------

def test_approve_prints_what_differs_and_records_the_hash(site, tampered, tmp_path):
    sha = read_app_dir(tampered)[0].sha256
    code, out, err = run("approve", site, tampered, "--dry-run")
    assert code == 0, err
    assert f"App {tampered}: sha256 {sha}" in out
    assert "1 file(s) added, 0 removed, 1 changed, 1 component(s) changed" in out
    assert "component clientapp: candor.client.app:app -> marker_app:app" in out
    assert "  added    marker_app.py  (+3 -0 lines)" in out and "  changed  client/receipts.py  (+2 -0 lines)" in out
    assert "Not approved (--dry-run)." in out and not (site / APPROVED_APPS).exists()
    code, out, err = run("approve", site, tampered, "--diff")
    assert code == 0, err
    assert "+++ app/client/receipts.py" in out and "+# changed" in out and "+++ app/marker_app.py" in out
    assert f"Approved: site 'h1' runs app sha256 {sha}" in out
    code, out, err = run("approved", site)
    assert code == 0 and sha in out and "marker_app:app" in out and installed_release().sha256 in out
    fab = tmp_path / "release.fab"
    fab.write_bytes(build_fab_from_disk(APP_DIR))
    code, out, err = run("approve", site, fab)
    assert code == 0 and "This is the installed release" in out, out + err
    code, out, err = run("approve", "--revoke", sha[:12], site)
    assert code == 0 and f"Revoked: site 'h1' no longer runs app sha256 {sha}" in out
    code, out, err = run("approved", site, "--json")
    assert json.loads(out)["apps"][0]["revoked_at"] is not None
    code, out, err = run("approve", site, tmp_path / "missing.fab")
    assert code == 1 and "no such app directory or .fab file" in err and "Traceback" not in err


# --- the guard -----------------------------------------------------------------------------

@pytest.fixture
def guard_env(monkeypatch, site):
    monkeypatch.setenv(guard.SITE_DIR_ENV, str(site))
    monkeypatch.setenv(guard.SITE_NAME_ENV, "h1")
    monkeypatch.delenv(APP_SHA256_ENV, raising=False)  # restored after the test: verify_app sets it
    monkeypatch.setattr(guard, "_verdict", None)
    return site


def test_the_guard_runs_the_installed_release_from_the_installation(guard_env):
    import candor.client.app

    guard.verify_app(build_fab_from_disk(APP_DIR), skip_prompt=True)
    assert os.environ[APP_SHA256_ENV] == installed_release().sha256 == running_app_sha256()
    assert guard.load_verified_app(default_app_ref="", app_path=None, multi_app=True)("a/b", "1", "h") \
        is candor.client.app.app


def test_the_guard_refuses_other_code_before_loading_anything(guard_env, tampered_fab):
    sha = read_fab(tampered_fab).sha256
    with pytest.raises(guard.AppRefused) as refused:
        guard.verify_app(tampered_fab, skip_prompt=True)
    assert str(refused.value) == (f"site 'h1' refuses app sha256 {sha}: not its installed Candor release (sha256 "
                                  f"{installed_release().sha256[:16]}) nor an app it approved; approve it with "
                                  f"`candor-client approve {guard_env} APP_DIR_OR_FAB`")
    assert APP_SHA256_ENV not in os.environ
    with pytest.raises(guard.AppRefused, match="no app was verified"):
        guard.load_verified_app()("a/b", "1", "h")
    with pytest.raises(guard.AppRefused, match="refuses the app: the app the coordinator sent: not a FAB"):
        guard.verify_app(b"not a zip")


def test_an_approved_app_runs_its_own_bytes_not_the_installation(site, tampered_fab, tmp_path):
    Approvals(site).approve(read_fab(tampered_fab), source="t.fab", installed=installed_release())
    fab = tmp_path / "t.fab"
    fab.write_bytes(tampered_fab)
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from candor.client import clientapp_main as guard
        guard.verify_app(Path(sys.argv[1]).read_bytes(), skip_prompt=True)
        app = guard.load_verified_app()("a/b", "1", "h")
        print(type(app).__name__, sys.modules["marker_app"].__file__, sys.modules["candor.client.app"].__file__,
              sys.modules["candor.client.receipts"].__file__)
    """)
    env = {**os.environ, guard.SITE_DIR_ENV: str(site), guard.SITE_NAME_ENV: "h1", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(fab)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    kind, marker, client_app, receipts = out.stdout.split()
    assert kind == "ClientApp"
    unpacked = Path(marker).parent
    assert unpacked.name.startswith("candor-app-") and not unpacked.exists()  # removed at exit
    assert Path(client_app) == unpacked / "candor" / "client" / "app.py"
    assert Path(receipts) == unpacked / "candor" / "client" / "receipts.py"  # the approved (changed) copy


def test_the_guard_fails_closed_if_flowers_runner_changes():
    def run_clientapp():
        return install_from_fab  # noqa: F821 (only the names it looks up matter)

    runner = types.SimpleNamespace(run_clientapp=run_clientapp, install_from_fab=None)
    with pytest.raises(SystemExit, match="no longer calls get_load_client_app_fn"):
        guard.install_hooks(runner)
    import flwr.supernode.runtime.run_clientapp as real

    used = set(real.run_clientapp.__code__.co_names)
    assert {"install_from_fab", "get_load_client_app_fn", "install_app_dependencies", "pull_task_input"} <= used


# --- the SuperExec launcher ----------------------------------------------------------------

def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120)


def test_the_superexec_starts_the_guard_for_clientapps_and_nothing_for_other_tasks():
    out = _python("""
        import json
        from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
        from candor.client.superexec_main import guard_path, redirect_tasks
        args = redirect_tasks(guard_path())
        print(json.dumps({"args": args, "commands": {str(k): v for k, v in TASK_TYPE_TO_COMMAND.items()}}))
    """)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    guard_script = Path(sys.executable).parent / "candor-clientapp"
    assert doc["args"][:3] == [str(guard_script), "--runtime-api-address", "127.0.0.1:1"]
    assert doc["commands"].pop("flwr-clientapp") == str(guard_script)
    assert {Path(c).name for c in doc["commands"].values()} == {"false"}
    assert "candor.client.clientapp_main" in guard_script.read_text()


def test_the_superexec_fails_closed():
    # A Flower whose executor picks its command elsewhere: the launcher refuses to start.
    out = _python("""
        import subprocess
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
        SubprocessExecutor.launch = lambda self, spec: subprocess.Popen(["flwr-clientapp"])
        from candor.client.superexec_main import guard_path, redirect_tasks
        redirect_tasks(guard_path())
    """)
    assert out.returncode == 1 and "would start [['flwr-clientapp'], ['flwr-clientapp']]" in out.stderr, out.stderr
    for bad in (["--executor", "kubernetes"], ["--executor-config", "x.yaml"], ["--allow-runtime-dependency-installation"]):
        proc = subprocess.run([sys.executable, "-m", "candor.client.superexec_main", "--insecure",
                               "--runtime-api-address", "127.0.0.1:1", *bad], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1 and "is refused" in proc.stderr, proc.stderr


# --- the audit's app check -----------------------------------------------------------------

def _log_and_receipt(tmp_path: Path, site: Path, app_sha: str, receipt_app: str) -> Path:
    run_dir = tmp_path / "run"
    initial = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    log = AuditLog(run_dir, Ed25519PrivateKey.generate(), ephemeral=True)
    log.start(run_id="7", cfg=RunConfig.from_run_config({"dp": False}), schema=Schema.load(DEMO_SCHEMA_PATH),
              initial=initial, app_sha256=app_sha)
    receipt = {"site": "h1", "run_id": "7", "round": 0, "kind": "evaluate", "app_sha256": receipt_app,
               "received_model_sha256": hash_arrays(initial), "time": 0.0}
    (site / "receipts.jsonl").write_text(json.dumps(receipt) + "\n")
    return run_dir


def test_audit_flags_a_run_whose_app_the_site_never_approved(site, tampered_fab, tmp_path):
    app = read_fab(tampered_fab)
    run_dir = _log_and_receipt(tmp_path, site, app.sha256, installed_release().sha256)
    code, out, err = run("audit", site, run_dir)
    assert code == 1, out + err
    assert f"App: sha256 {app.sha256[:16]}, NOT one this site approved." in out
    assert f"round 0: the log says app sha256 {app.sha256[:16]} ran, which this site never approved" in out
    assert f"round 0 (evaluate): your receipt says app sha256 {installed_release().sha256[:16]} handled it" in out
    Approvals(site).approve(app, source="t.fab", installed=installed_release())
    _log_and_receipt(tmp_path / "again", site, app.sha256, app.sha256)
    code, out, err = run("audit", site, tmp_path / "again" / "run")
    assert "an app this site approved" in out and "never approved" not in out and "your receipt says" not in out


def test_start_stops_with_one_line_when_the_superexec_exits(tmp_path):
    # What `candor-client start` does when Candor's SuperExec refuses this Flower (its self-test failed).
    from candor.client.site_dir import SiteDir
    from candor.client.supernode import _supervise
    from candor.common.errors import ConnectionFailed

    site = SiteDir(tmp_path)
    site.log_path.parent.mkdir()
    node = [sys.executable, "-c", "import time; print('SuperNode ID: 7', flush=True); time.sleep(60)"]
    superexec = [sys.executable, "-c", "import sys, time; time.sleep(0.5); "
                 "sys.exit('candor-superexec: Flower would start flwr-clientapp; nothing runs')"]
    with pytest.raises(ConnectionFailed, match=r"SuperExec \(candor.client.superexec_main\) exited with code 1: "
                                               r"candor-superexec: Flower would start flwr-clientapp; nothing runs"):
        _supervise(node, superexec, dict(os.environ), site, "h1", verbose=False)
    assert "--parent-pid" in site.log_path.read_text()
