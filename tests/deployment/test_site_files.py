"""The formats a site and its coordinator exchange, each with one reader and one writer:
the invite, the site's budget file, the naming rule, the key fingerprint; and the TLS
preflight's refusal of a broken CA file. No process is started here.
"""

from __future__ import annotations

import subprocess
import tomllib

import pytest
import tomli_w

from candor.client.budget import SiteBudget
from candor.client.keys import create_node_key
from candor.client.preflight import check_server, split_address
from candor.client.site_dir import SiteDir
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.errors import ConfigError, KeyFileError, SiteError
from candor.common.invite import INVITE_VERSION, Invite
from candor.common.names import check_name
from candor.common.node_keys import fingerprint
from candor.common.partition import partition
from candor.common.processes import free_port
from candor.common.schema import Schema
from candor.server.pki import create_pki

from deploy_helpers import client, server


def _invite(tmp_path, **changes) -> Invite:
    pki = create_pki(tmp_path / "pki", federation="f", hosts=["127.0.0.1"])
    values = dict(federation="f", site="h1", server="127.0.0.1:9092", min_rows=30,
                  schema=Schema.load(DEMO_SCHEMA_PATH), ca_certificate=pki.ca_cert.read_text())
    return Invite(**{**values, **changes})


def _one_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- the invite -----------------------------------------------------------------------

def test_the_invite_file_keeps_its_format_and_round_trips(tmp_path):
    invite = _invite(tmp_path)
    path = tmp_path / "h1.toml"
    invite.write(path)
    schema = invite.schema
    expected = ("# Candor invite: give this file to the site. It holds nothing secret.\n" + tomli_w.dumps(
        {"candor-invite": {"version": 1, "federation": "f", "site": "h1", "server": "127.0.0.1:9092",
                           "min-rows": 30, "schema-sha256": schema.sha256(),
                           "ca-certificate": invite.ca_certificate, "schema": tomli_w.dumps(schema.to_dict())}}))
    assert path.read_text() == expected  # byte for byte what `candor-server invite` always wrote
    assert INVITE_VERSION == 1
    assert Invite.read(path) == invite


def _rewrite(path, **entries) -> None:
    doc = tomllib.loads(path.read_text())
    doc["candor-invite"].update(entries)
    path.write_text(tomli_w.dumps(doc))


@pytest.mark.parametrize("entries, fragment", [
    ({"version": 2}, "is a version-2 invite; this candor-client reads version 1"),
    ({"ca-certificate": "hello"}, "the 'ca-certificate' entry is not a PEM certificate"),
    ({"ca-certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
     "the 'ca-certificate' entry is not a PEM certificate"),
    ({"schema-sha256": "0" * 64}, "the schema does not match its own fingerprint; the file was altered"),
    ({"schema": "not = [toml"}, "is not a Candor invite"),
])
def test_a_broken_invite_is_refused_naming_the_file_and_what_to_do(tmp_path, entries, fragment):
    path = tmp_path / "h1.toml"
    _invite(tmp_path).write(path)
    _rewrite(path, **entries)
    with pytest.raises(SiteError) as err:
        Invite.read(path)
    assert fragment in str(err.value) and str(path) in str(err.value)
    assert "coordinator" in str(err.value)  # what to do


def test_a_missing_invite_and_a_file_that_is_no_invite(tmp_path):
    with pytest.raises(SiteError, match="not found"):
        Invite.read(tmp_path / "nope.toml")
    (tmp_path / "other.toml").write_text("a = 1\n")
    with pytest.raises(SiteError, match="is not a Candor invite"):
        Invite.read(tmp_path / "other.toml")


def test_an_invite_for_another_site_is_refused_and_joining_keeps_its_files(tmp_path):
    site = SiteDir(tmp_path / "site")
    site.dir.mkdir()
    site.save_config({"site": "h2"})
    invite = _invite(tmp_path)
    with pytest.raises(SiteError, match="invites site 'h1' but .* is site 'h2'"):
        site.join(invite, source=tmp_path / "h1.toml")
    site.save_config({"site": "h1"})
    config = site.join(invite, source=tmp_path / "h1.toml")
    assert config == {"site": "h1", "federation": "f", "server": "127.0.0.1:9092", "min-rows": 30,
                      "schema-sha256": invite.schema.sha256()}
    assert site.ca_cert.read_text() == invite.ca_certificate
    assert Schema.load(site.schema_path) == invite.schema and site.joined(site.config())


def test_client_init_with_the_servers_invite_joins_the_federation(tmp_path):
    fed = tmp_path / "fed"
    assert server("init", fed, "--name", "f", "--schema", DEMO_SCHEMA_PATH, "-c", "min-rows=25")[0] == 0
    bootstrap = tmp_path / "bootstrap"
    assert client("init", bootstrap, "--site-name", "h1")[0] == 0
    assert server("add-site", fed, "h1", bootstrap / "keys" / "node.pub")[0] == 0
    assert server("invite", fed, "h1")[0] == 0
    code, out, err = client("init", tmp_path / "site", "--site-name", "h1", "--invite", fed / "invites" / "h1.toml")
    assert code == 0, err
    assert "Joined federation 'f' (server 127.0.0.1:9092)" in out
    config = SiteDir(tmp_path / "site").config()
    assert config["min-rows"] == 25 and config["schema-sha256"] == Schema.load(DEMO_SCHEMA_PATH).sha256()


# --- names and keys -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["h1", "st-marys-hospital", "A.b_c-9", "x" * 63])
def test_good_names_pass(name):
    assert check_name(name, where="--site-name") == name


@pytest.mark.parametrize("name", ["", "-h1", ".x", "bad name", "a/b", "x" * 64, "é", "h1\n"])
def test_bad_names_are_refused_naming_the_option_the_rule_and_the_value(name):
    with pytest.raises(ConfigError) as err:
        check_name(name, where="--site-name")
    assert str(err.value).startswith(f"--site-name {name!r} must be 1-63 letters, digits")


def test_client_and_server_apply_the_same_name_rule(tmp_path):
    code, out, err = client("init", tmp_path / "s", "--site-name", "bad name!")
    assert code == 1 and "--site-name 'bad name!' must be 1-63 letters" in _one_line(err)
    code, out, err = server("init", tmp_path / "fed", "--name", "bad name!", "--schema", DEMO_SCHEMA_PATH)
    assert code == 1 and "the federation name 'bad name!' must be 1-63 letters" in _one_line(err)


def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path):
    line = create_node_key(tmp_path / "node.key", tmp_path / "node.pub", comment="h1")
    try:
        out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "node.pub")], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("ssh-keygen is not available")
    assert out.split()[1] == fingerprint(line)


# --- the budget file ------------------------------------------------------------------

def test_the_budget_file_round_trips_and_is_only_written_when_set(tmp_path):
    path = tmp_path / "budget.toml"
    assert SiteBudget.read(path) == SiteBudget() and SiteBudget().as_dict() == {}
    budget = SiteBudget().updated(epsilon=2.8, delta=1e-5)
    budget.write(path)
    assert path.read_text() == "# This site's lifetime privacy budget (its own setting).\nepsilon = 2.8\ndelta = 1e-05\n"
    assert SiteBudget.read(path) == budget and budget.as_dict() == {"epsilon": 2.8, "delta": 1e-5}
    assert path.stat().st_mode & 0o777 == 0o600  # the site's own setting: its owner only
    assert budget.updated(delta=1e-6) == SiteBudget(2.8, 1e-6)


@pytest.mark.parametrize("values, fragment", [
    ({"epsilon": -1.0}, "--budget-epsilon must be a number > 0 (the lifetime ε this site allows); got -1.0"),
    ({"epsilon": 1.0, "delta": 1.0}, "--budget-delta must be in (0, 1); got 1.0"),
])
def test_a_bad_budget_names_the_option_and_the_value(values, fragment):
    with pytest.raises(ConfigError) as err:
        SiteBudget(**values)
    assert fragment in str(err.value)


@pytest.mark.parametrize("text", ["epsilon = [", "epsilon = 'x'", "epsilon = -2.0", "epsilon = 1.0\nepsillon = 2\n"])
def test_an_unreadable_budget_file_names_the_file(tmp_path, text):
    path = tmp_path / "budget.toml"
    path.write_text(text)
    with pytest.raises(SiteError) as err:
        SiteBudget.read(path)
    assert str(err.value).startswith(f"{path} is unreadable") and "--budget-epsilon" in str(err.value)


# --- the TLS preflight ----------------------------------------------------------------

def test_a_server_address_must_be_host_and_port():
    assert split_address("fl.org:9092") == ("fl.org", 9092)
    assert split_address("[::1]:9092") == ("::1", 9092)
    for bad in ("fl.org", "fl.org:x", ":9092"):
        with pytest.raises(ConfigError, match="must be HOST:PORT"):
            split_address(bad)


def test_a_ca_file_missing_a_line_is_one_clear_error_naming_the_file(tmp_path):
    pki = create_pki(tmp_path / "pki", federation="f", hosts=["127.0.0.1"])
    lines = pki.ca_cert.read_text().splitlines(keepends=True)
    broken = tmp_path / "ca.crt"
    broken.write_text("".join(lines[:3] + lines[4:]))  # one base64 line gone
    with pytest.raises(KeyFileError) as err:
        check_server(f"127.0.0.1:{free_port()}", broken)
    assert f"the federation's CA certificate {broken} is not a readable PEM certificate" in str(err.value)
    assert "--invite" in str(err.value)
    with pytest.raises(KeyFileError, match="not a readable PEM certificate"):
        check_server(f"127.0.0.1:{free_port()}", tmp_path / "missing.crt")


def test_candor_client_start_with_a_truncated_ca_file_prints_one_line(tmp_path):
    fed = tmp_path / "fed"
    assert server("init", fed, "--name", "f", "--schema", DEMO_SCHEMA_PATH, "--port", str(free_port()))[0] == 0
    site = tmp_path / "site"
    assert client("init", site, "--site-name", "h1")[0] == 0
    assert server("add-site", fed, "h1", site / "keys" / "node.pub")[0] == 0
    assert server("invite", fed, "h1")[0] == 0
    data = tmp_path / "h1.csv"
    partition(breast_cancer_frame(), num_sites=2, label="diagnosis", seed=3)[0].to_csv(data, index=False)
    ca = site / "federation" / "ca.crt"
    code, out, err = client("start", site, "--invite", fed / "invites" / "h1.toml", "--data", data,
                            "--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "0")
    assert code == 1 and "cannot reach the Candor server" in _one_line(err)  # a good CA: only the server is down
    ca.write_text("".join(ca.read_text().splitlines(keepends=True)[:-2]))  # the END line and one more gone
    code, out, err = client("start", site, "--data", data, "--server", f"127.0.0.1:{free_port()}")
    assert code == 1 and f"CA certificate {ca} is not a readable PEM certificate" in _one_line(err)
    assert "Data OK" in out and "Server" not in out
