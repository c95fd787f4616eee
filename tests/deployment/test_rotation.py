"""Certificates rotated on a running federation, for real (SuperLink, SuperExec, SuperNode
on 127.0.0.1; this module starts its own, not the shared `deployment` fixture).

1. `candor-server rotate-certs` on an idle server (same CA): it restarts the server with
   the new certificate; the connected site h1 reconnects by itself, and h2, started for
   the first time with its original invite, connects; the coordinator's `flwr` still
   lists the run made before, and makes a new one.
2. `rotate-certs --new-ca`: h3 starts with its two-CA invite while the server keeps the
   old CA's certificate; `rotate-certs --switch`: h3, still running, reconnects to the
   server's new certificate; h1, which trusts only the old CA, is told the CA changed;
   the coordinator's `flwr` and SuperExec trust the new CA.

Each site starts once: Flower keeps a SuperNode that was killed "online" for two
heartbeat intervals (60 s) and refuses the same key until then.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from candor.client.preflight import check_server
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.errors import ConnectionFailed
from candor.common.processes import free_port, wait_until
from candor.server.pki import presented_certificate

from deploy_helpers import Deployment, Processes, flwr, make_site, server, stop_superlink, write_outsider_app

pytestmark = pytest.mark.slow  # real SuperLink, SuperExec and SuperNode processes

RECONNECTED = "Connection successful after"  # Flower's SuperNode, once it reaches a restarted server


def _digests(directory: Path) -> dict[str, str]:
    """What a site keeps (not its logs or the SuperNode's FLWR_HOME)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).parts[0] not in ("logs", "flwr")}


@dataclass
class Running:
    dep: Deployment
    run_id: str  # a run the coordinator made before any rotation

    @property
    def fed(self) -> Path:
        return self.dep.fed

    @property
    def site(self) -> Path:
        return self.dep.sites["h1"]

    def start(self, name: str):
        """`candor-client start` of site ``name`` with its invite; the process, once connected."""
        proc = self.dep.start_client(name)
        self.dep.procs.wait_for(proc, "connected as node", timeout=120)
        return proc

    def runs(self) -> dict[str, str]:
        proc = flwr(self.fed / "flwr", "ls", "candor", "--format", "json", timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {str(r["run-id"]): r["status"] for r in json.loads(proc.stdout)["runs"]}

    def run_app(self, tmp_path: Path) -> str:
        """A run of the coordinator's own app (its ServerApp writes a marker); its id, once finished."""
        marker = tmp_path / "ran"
        proc = flwr(self.fed / "flwr", "run", write_outsider_app(tmp_path / "app"), "candor", "--stream",
                    "--run-config", f'marker="{marker}"')
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run_id = marker.read_text().split()[1]  # the SuperExec started the ServerApp
        wait_until(lambda: self.runs().get(run_id) == "finished:completed", timeout=30, what=f"run {run_id}")
        return run_id

    def site_log(self) -> str:
        return (self.site / "logs" / "supernode.log").read_text(errors="replace")

    def server_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.fed / "pki" / "server.crt").read_bytes())


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation")
    dep = Deployment(root=root, fed=root / "federation", port=free_port(), procs=Processes(root / "logs"))
    code, out, err = server("init", dep.fed, "--name", "rotating", "--port", dep.port, "--schema", DEMO_SCHEMA_PATH,
                            "-c", "model=logreg")
    assert code == 0, err
    try:
        for name in ("h1", "h2", "h3"):
            dep.sites[name] = make_site(dep, name)  # each with the invite of the original CA
            dep.data[name] = root / f"{name}.csv"
            breast_cancer_frame().head(80).to_csv(dep.data[name], index=False)
        code, out, err = server("start", dep.fed)
        assert code == 0, out + err
        state = Running(dep, "")
        state.run_id = state.run_app(root / "before")
        state.start("h1")
        yield state
    finally:
        dep.procs.stop_all()
        stop_superlink(dep.fed)


def test_a_rotated_server_certificate_keeps_the_sites_and_the_runs(running, tmp_path):
    fed, dep = running.fed, running.dep
    old_cert, ca_before = running.server_cert(), (fed / "pki" / "ca.crt").read_bytes()
    site_before = _digests(running.site)
    log_before = len(running.site_log())
    pid_before = json.loads((fed / "superlink.pid").read_text())["pid"]

    code, out, err = server("rotate-certs", fed)
    assert code == 0, out + err
    assert f"Restarted the server (pid {pid_before} -> " in out, out  # idle: it restarts the server itself
    assert running.server_cert() != old_cert and (fed / "pki" / "ca.crt").read_bytes() == ca_before
    assert presented_certificate("127.0.0.1", dep.port) == running.server_cert()
    code, out, err = server("status", fed)
    assert code == 0 and "SuperLink: running" in out and "NOTE" not in out and "WARNING" not in out, out

    # The connected site reconnects by itself (same CA) ...
    wait_until(lambda: RECONNECTED in running.site_log()[log_before:], timeout=60, what="h1 to reconnect")
    assert dep.clients["h1"].poll() is None
    # ... and a site started for the first time with the invite it joined with connects.
    assert "certificate verified against" in dep.procs.output(running.start("h2"))
    # The coordinator's flwr (its FLWR_HOME) lists the run made before, and makes a new one.
    assert running.runs()[running.run_id] == "finished:completed"
    running.run_app(tmp_path)
    assert _digests(running.site) == site_before  # nothing the site keeps changed


def test_a_new_ca_with_an_overlap_keeps_a_site_that_imported_the_bundle(running, tmp_path):
    fed, dep = running.fed, running.dep
    code, out, err = server("rotate-certs", fed, "--new-ca", "--overlap-days", "0")
    assert code == 0, out + err
    assert "Restarted" not in out  # nothing to restart: the server keeps the old CA's certificate
    # h3 starts with its new two-CA invite while the server still presents the old CA's certificate.
    h3 = running.start("h3")
    assert "This site trusts 2 CA certificates" in dep.procs.output(h3)
    assert "the CA rotation's overlap ended" in server("status", fed)[1]
    h3_log = dep.sites["h3"] / "logs" / "supernode.log"
    log_before = len(h3_log.read_text(errors="replace"))

    code, out, err = server("rotate-certs", fed, "--switch")
    assert code == 0, out + err
    assert "Restarted the server" in out, out
    new_ca = x509.load_pem_x509_certificate((fed / "pki" / "ca.crt").read_bytes())
    presented = presented_certificate("127.0.0.1", dep.port)
    presented.verify_directly_issued_by(new_ca)  # the server now presents the new CA's certificate
    # h3, trusting the bundle, reconnects to it by itself, without another invite.
    wait_until(lambda: RECONNECTED in h3_log.read_text(errors="replace")[log_before:], timeout=60,
               what="h3 to reconnect")
    assert h3.poll() is None
    # h1 trusts only the old CA: its preflight says what to do.
    with pytest.raises(ConnectionFailed, match="new CA of federation 'rotating'.*ask the coordinator for the new invite"):
        check_server(f"127.0.0.1:{dep.port}", running.site / "federation" / "ca.crt")
    # The coordinator's flwr and the SuperExec trust the new CA: the old run is listed, a new one runs.
    assert running.runs()[running.run_id] == "finished:completed"
    running.run_app(tmp_path)
    out = server("status", fed)[1]
    assert "NOTE" not in out and "WARNING" not in out, out
