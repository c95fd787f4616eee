"""What must not get in, and how each refusal reads: one clear line, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess

import pandas as pd

from candor.common.processes import free_port, stop_group
from candor.server.pki import create_pki

from deploy_helpers import BIN, ENV, client, copy_site, server


def _one_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_client_whose_key_is_not_registered_cannot_join(deployment):
    # An impostor holding h1's invite (nothing secret) but its own key.
    impostor = deployment.root / "impostor"
    code, out, err = client("init", impostor, "--site-name", "h1")
    assert code == 0, err
    proc = subprocess.run([BIN / "candor-client", "start", impostor, "--invite", deployment.fed / "invites" / "h1.toml",
                           "--data", deployment.data["h1"]], capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert "refused this site's key" in line and "add-site" in line, line
    assert "connected as node" not in proc.stdout
    assert "Exit Code" not in proc.stdout  # Flower's own report of the failure just explained is not repeated


def test_a_client_trusting_another_ca_cannot_connect(deployment, tmp_path):
    other = create_pki(tmp_path / "other-ca", federation="other", hosts=["127.0.0.1"])
    site = copy_site(deployment, "h1", "wrong-ca")
    shutil.copy(other.ca_cert, site / "federation" / "ca.crt")
    code, out, err = client("start", site, "--data", deployment.data["h1"])
    assert code == 1
    assert "did not sign" in _one_line(err) and "connected" not in out
    # Flower's own SuperNode refuses the same certificate (the check above is not the only one).
    # Output to a file, not a pipe: its SuperExec child holds the pipe open until the
    # SuperNode is reaped, so waiting for the pipe's end would wait forever.
    log = tmp_path / "supernode.log"
    with open(log, "w") as fh:
        node = subprocess.Popen([BIN / "flower-supernode", "--superlink", f"127.0.0.1:{deployment.port}",
                                 "--root-certificates", other.ca_cert, "--auth-supernode-private-key",
                                 site / "keys" / "node.key", "--port", str(free_port())],
                                stdout=fh, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        assert node.wait(timeout=120) != 0
    finally:
        stop_group(node)
    assert "CERTIFICATE_VERIFY_FAILED" in log.read_text()


def test_a_client_whose_data_violates_the_schema_refuses_to_start(deployment, tmp_path):
    frame = pd.read_csv(deployment.data["h2"], dtype=str)
    frame.loc[frame.index[:3], "mean_radius"] = "-4"  # below the schema's lower bound 0
    frame.loc[frame.index[3], "worst_area"] = "n/a?"
    bad = tmp_path / "h2-broken.csv"
    frame.to_csv(bad, index=False)
    code, out, err = client("start", copy_site(deployment, "h2", "bad-data"), "--data", bad)
    assert code == 1 and "Traceback" not in err
    assert str(bad) in err and "mean_radius" in err and "worst_area" in err and "(3 rows)" in err, err
    assert "Server" not in out and "connected" not in out  # refused before any network contact


def test_a_server_that_is_down_is_one_clear_line(deployment):
    site = copy_site(deployment, "h2", "server-down")
    code, out, err = client("start", site, "--data", deployment.data["h2"], "--server", f"127.0.0.1:{free_port()}",
                            "--connect-timeout", "0")
    assert code == 1
    assert "cannot reach the Candor server" in _one_line(err)


def test_an_unreadable_or_exposed_key_is_one_clear_line(deployment):
    site = copy_site(deployment, "h2", "bad-key")
    key = site / "keys" / "node.key"
    os.chmod(key, 0o644)
    code, out, err = client("start", site, "--data", deployment.data["h2"])
    assert code == 1 and "readable by other users" in _one_line(err)
    key.write_text("not a key\n")
    os.chmod(key, 0o600)
    code, out, err = client("start", site, "--data", deployment.data["h2"])
    assert code == 1 and "not an unencrypted OpenSSH private key" in _one_line(err)


def test_add_site_refuses_private_keys_wrong_curves_and_duplicates(deployment, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    fed, h1 = deployment.fed, deployment.sites["h1"]
    code, out, err = server("add-site", fed, "x1", h1 / "keys" / "node.key")
    assert code == 1 and "PRIVATE key" in _one_line(err)
    ed = tmp_path / "ed25519.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    code, out, err = server("add-site", fed, "x1", ed)
    assert code == 1 and "not an ECDSA P-384 key" in _one_line(err)
    code, out, err = server("add-site", fed, "x1", h1 / "keys" / "node.pub")
    assert code == 1 and "registered already, as site 'h1'" in _one_line(err)
    code, out, err = server("add-site", fed, "bad name!", ed)
    assert code == 1 and "site name" in _one_line(err)
