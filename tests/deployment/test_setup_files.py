"""The files deployment creates: certificates, keys, federation directory, invite, node config.

No process is started here.
"""

from __future__ import annotations

import ipaddress
import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from candor.client.budget import SiteBudget
from candor.client.site_dir import SiteDir
from candor.client.supernode import write_node_config
from candor.client.keys import create_node_key, load_private_key
from candor.client.site import resolve_site
from candor.common.config import RunConfig
from candor.common.errors import CandorError
from candor.server.pki import create_pki
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame

from deploy_helpers import client, server


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_covers_every_host_and_loopback_and_chains_to_the_ca(tmp_path):
    pki = create_pki(tmp_path / "pki", federation="f", hosts=["fl.hospital.org", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.hospital.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.7"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (pki.ca_key, pki.server_key):
        assert _mode(key) == 0o600
        assert isinstance(load_pem_private_key(key.read_bytes(), None).curve, ec.SECP384R1)
    with pytest.raises(CandorError, match="exists already"):
        create_pki(tmp_path / "pki", federation="f", hosts=["10.0.0.7"])


def test_a_bad_host_is_refused_with_the_rule(tmp_path):
    with pytest.raises(CandorError, match="neither an IP address nor a valid DNS name"):
        create_pki(tmp_path / "pki", federation="f", hosts=["http://fl.org"])


def test_node_key_is_p384_openssh_private_0600(tmp_path):
    line = create_node_key(tmp_path / "k" / "node.key", tmp_path / "k" / "node.pub", comment="h1")
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" h1")
    assert _mode(tmp_path / "k" / "node.key") == 0o600 and _mode(tmp_path / "k") == 0o700
    assert isinstance(load_ssh_public_key((tmp_path / "k" / "node.pub").read_bytes()).curve, ec.SECP384R1)
    assert isinstance(load_private_key(tmp_path / "k" / "node.key").curve, ec.SECP384R1)
    with pytest.raises(CandorError, match="refusing to replace"):
        create_node_key(tmp_path / "k" / "node.key", tmp_path / "k" / "node2.pub", comment="h1")


def test_federation_init_refuses_a_used_directory_and_invites_hold_nothing_secret(tmp_path):
    fed = tmp_path / "fed"
    code, out, err = server("init", fed, "--name", "f", "--host", "fl.example.org", "--schema",
                            DEMO_SCHEMA_PATH, "-c", "min-rows=30")
    assert code == 0, err
    assert "valid for fl.example.org, localhost, 127.0.0.1" in out
    code, out, err = server("init", fed, "--name", "f", "--schema", DEMO_SCHEMA_PATH)
    assert code == 1 and "holds a federation already" in err
    code, out, err = server("init", tmp_path / "fed2", "--name", "f", "--schema", DEMO_SCHEMA_PATH,
                            "-c", "no-such-key=1")
    assert code == 1 and "Unknown run-config key 'no-such-key'" in err
    site = tmp_path / "site"
    assert client("init", site, "--site-name", "h1")[0] == 0
    assert server("add-site", fed, "h1", site / "keys" / "node.pub")[0] == 0
    code, out, err = server("invite", fed, "h1")
    assert code == 0, err
    text = (fed / "invites" / "h1.toml").read_text()
    assert "PRIVATE" not in text
    invite = tomllib.loads(text)["candor-invite"]
    assert invite["server"] == "fl.example.org:9092" and invite["min-rows"] == 30
    assert invite["ca-certificate"] == (fed / "pki" / "ca.crt").read_text()
    code, out, err = server("invite", fed, "nobody")
    assert code == 1 and "not registered" in err
    data = tmp_path / "site.csv"
    breast_cancer_frame().head(50).to_csv(data, index=False)
    code, out, err = client("check", "--schema", fed / "invites" / "h1.toml", "--data", data)
    assert code == 0 and "OK: 50 usable rows" in out, err  # the invite holds the schema, as the guide says


def test_node_config_reaches_the_client_app_with_its_toml_types(tmp_path):
    site = SiteDir(tmp_path / "site with space")
    site.dir.mkdir()
    path = write_node_config(site, "h1", tmp_path / "data 'x'.csv", None, SiteBudget(epsilon=2.5, delta=1e-6))
    node_config = parse_config_args([str(path)])  # exactly how flower-supernode reads it
    assert node_config["budget-epsilon"] == 2.5 and isinstance(node_config["budget-epsilon"], float)
    spec = resolve_site(node_config, RunConfig())
    assert spec.name == "h1" and spec.data_path == str(tmp_path / "data 'x'.csv")
    assert spec.ledger_path == str(site.dir / "ledger.json")
    assert (spec.budget_epsilon, spec.budget_delta) == (2.5, 1e-6)
    no_budget = parse_config_args([str(write_node_config(site, "h1", tmp_path / "d.csv", None, SiteBudget()))])
    assert resolve_site(no_budget, RunConfig()).budget_epsilon is None
