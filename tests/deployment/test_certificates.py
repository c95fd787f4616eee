"""Certificates that expire and rotate: stated lifetimes, `status`'s warnings, `rotate-certs`
(same CA; a new CA with an overlap), a CA bundle in an invite, and the site's preflight
lines against a real TLS server started in this process on 127.0.0.1. No Flower process
is started here (the real-process rotation is tests/deployment/test_rotation.py).

Certificates that expire soon or have expired are built here with ``cryptography`` and
explicit ``not_valid_before``/``not_valid_after`` (nothing waits for time to pass).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from candor.client.preflight import check_server
from candor.client.site_dir import SiteDir
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame
from candor.common.errors import ConnectionFailed, KeyFileError, SiteError
from candor.common.invite import Invite
from candor.server.federation import Federation
from candor.server.pki import ServerPKI, create_pki, lifetime_report

from deploy_helpers import client, server

UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _one_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- certificates built here, independently of server/pki.py -----------------------------

def _name(cn: str, federation: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Candor")]
    if federation is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, *, federation: str | None, not_before: dt.datetime, not_after: dt.datetime):
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(cn, federation)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_leaf(ca_key, ca_cert, *, not_before: dt.datetime, not_after: dt.datetime,
              hosts=("127.0.0.1", "localhost"), ca: bool = False):
    import ipaddress

    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name("test server", None)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def federation_ca(fed: Path):
    """The federation's CA key and certificate, read from its pki/."""
    key = serialization.load_pem_private_key((fed / "pki" / "ca.key").read_bytes(), None)
    return key, x509.load_pem_x509_certificate((fed / "pki" / "ca.crt").read_bytes())


def install_server(fed: Path, key, cert) -> None:
    (fed / "pki" / "server.key").write_bytes(key_pem(key))
    (fed / "pki" / "server.crt").write_bytes(pem(cert))


def init(tmp_path: Path, *extra: str, name: str = "f") -> Path:
    fed = tmp_path / "fed"
    code, out, err = server("init", fed, "--name", name, "--schema", DEMO_SCHEMA_PATH, *extra)
    assert code == 0, err
    return fed


@contextlib.contextmanager
def tls_server(key, cert, tmp_path: Path):
    """A TLS server on 127.0.0.1 presenting ``cert`` (handshakes only), in a thread."""
    (tmp_path / "tls.key").write_bytes(key_pem(key))
    (tmp_path / "tls.crt").write_bytes(pem(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# --- stated lifetimes -------------------------------------------------------------------

def test_lifetimes_are_stated_and_init_shows_them(tmp_path):
    fed = init(tmp_path, "--host", "fl.example.org")
    ca = x509.load_pem_x509_certificate((fed / "pki" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((fed / "pki" / "server.crt").read_bytes())
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == 3650 * DAY  # 10 years
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 365 * DAY  # 1 year
    assert abs(cert.not_valid_before_utc - (_now() - dt.timedelta(minutes=5))) < dt.timedelta(minutes=1)

    fed2 = tmp_path / "fed2"
    code, out, err = server("init", fed2, "--name", "f", "--schema", DEMO_SCHEMA_PATH, "--cert-days", "90")
    assert code == 0, err
    cert = x509.load_pem_x509_certificate((fed2 / "pki" / "server.crt").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 90 * DAY
    end = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    ca_end = x509.load_pem_x509_certificate((fed2 / "pki" / "ca.crt").read_bytes()).not_valid_after_utc
    assert f"valid until {ca_end:%Y-%m-%d} (3650 days)" in out
    assert f"valid until {end} (90 days; renew with `candor-server rotate-certs {fed2}`)" in out
    for bad in ("0", "826", "-3"):
        code, out, err = server("init", tmp_path / f"bad{bad}", "--name", "f", "--schema", DEMO_SCHEMA_PATH,
                                "--cert-days", bad)
        assert code == 1 and "--cert-days must be a whole number of days in 1-825" in _one_line(err)
        assert f"got {bad}" in err and not (tmp_path / f"bad{bad}" / "pki").exists()


def test_status_shows_both_lifetimes_and_no_warning_for_fresh_certificates(tmp_path):
    fed = init(tmp_path)
    code, out, err = server("status", fed)
    assert code == 0, err
    ca = x509.load_pem_x509_certificate((fed / "pki" / "ca.crt").read_bytes())
    assert f"Certificates ({fed / 'pki'}):" in out
    ca_line = next(l for l in out.splitlines() if l.startswith("  CA "))
    assert "Candor CA for f" in ca_line and f"to {ca.not_valid_after_utc:%Y-%m-%d}" in ca_line
    server_line = next(l for l in out.splitlines() if l.startswith("  server "))
    assert "127.0.0.1" in server_line and "days left" in server_line
    assert "WARNING" not in out and "EXPIRED" not in out


# --- status warnings ----------------------------------------------------------------------

@pytest.mark.parametrize("days_left, warned", [(31, False), (29, True), (1, True)])
def test_status_warns_thirty_days_before_the_server_certificate_expires(tmp_path, days_left, warned):
    fed = init(tmp_path)
    ca_key, ca_cert = federation_ca(fed)
    now = _now()
    key, cert = make_leaf(ca_key, ca_cert, not_before=now - 300 * DAY,
                          not_after=now + days_left * DAY + dt.timedelta(hours=1))
    install_server(fed, key, cert)
    code, out, err = server("status", fed)
    assert code == 0, err
    lines = [l for l in out.splitlines() if l.startswith("WARNING")]
    if not warned:
        assert lines == [], out
        return
    assert lines == [f"WARNING: the server certificate ({fed / 'pki' / 'server.crt'}) expires on "
                     f"{cert.not_valid_after_utc:%Y-%m-%d}, in {days_left} day{'s' if days_left > 1 else ''}; sites "
                     f"cannot connect after that. Rotate it now: candor-server rotate-certs {fed}"], out


def test_status_says_clearly_when_the_server_certificate_has_expired_and_start_refuses_it(tmp_path):
    fed = init(tmp_path)
    ca_key, ca_cert = federation_ca(fed)
    now = _now()
    key, cert = make_leaf(ca_key, ca_cert, not_before=now - 400 * DAY, not_after=now - 3 * DAY - dt.timedelta(hours=1))
    install_server(fed, key, cert)
    code, out, err = server("status", fed)
    assert code == 0, err
    assert (f"EXPIRED: the server certificate ({fed / 'pki' / 'server.crt'}) expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, 4 days ago; no site can connect. Rotate it: "
            f"candor-server rotate-certs {fed}") in out.splitlines(), out
    assert "(EXPIRED)" in next(l for l in out.splitlines() if l.startswith("  server "))
    with pytest.raises(KeyFileError, match=f"expired on .*candor-server rotate-certs {fed}"):
        Federation.load(fed).pki.check()  # what `candor-server start` checks first
    code, out, err = server("start", fed)
    assert code == 1 and "expired on" in _one_line(err) and "rotate-certs" in err
    # The fix is the command the line names.
    code, out, err = server("rotate-certs", fed)
    assert code == 0, err
    Federation.load(fed).pki.check()
    assert "EXPIRED" not in server("status", fed)[1]


def test_status_warns_ninety_days_before_the_ca_expires_and_when_it_has(tmp_path):
    fed = init(tmp_path)
    now = _now()
    for ca_end, expected in ((now + 60 * DAY + dt.timedelta(hours=1), "WARNING: the CA certificate"),
                             (now - DAY - dt.timedelta(hours=1), "EXPIRED: the CA certificate")):
        ca_key, ca_cert = make_ca("Candor CA for f", federation="f", not_before=now - 3000 * DAY, not_after=ca_end)
        key, cert = make_leaf(ca_key, ca_cert, not_before=now - DAY, not_after=now + 200 * DAY)
        (fed / "pki" / "ca.key").write_bytes(key_pem(ca_key))
        (fed / "pki" / "ca.crt").write_bytes(pem(ca_cert))
        install_server(fed, key, cert)
        out = server("status", fed)[1]
        line = next(l for l in out.splitlines() if l.startswith(expected))
        assert f"'Candor CA for f' ({fed / 'pki' / 'ca.crt'})" in line and f"{ca_end:%Y-%m-%d}" in line
        assert f"candor-server rotate-certs {fed} --new-ca" in line, line
    assert "--overlap-days 0" in line and "--switch" in line  # an expired CA: no overlap to wait for


def test_the_report_counts_days_from_the_moment_given(tmp_path):
    pki = create_pki(tmp_path / "pki", federation="f", hosts=["127.0.0.1"], server_days=100)
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    end = cert.not_valid_after_utc
    for moment, fragment in ((end - 40 * DAY, None), (end - 10 * DAY, "in 10 days"),
                             (end - dt.timedelta(hours=2), "today"), (end + dt.timedelta(seconds=1), "EXPIRED")):
        lifetimes, lines = lifetime_report(pki, now=moment)
        assert [l.role for l in lifetimes] == ["CA", "server"]
        if fragment is None:
            assert lines == []
        else:
            assert len(lines) == 1 and fragment in lines[0], lines


# --- rotate-certs: a new server certificate from the same CA --------------------------------

def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _federation_with_a_site(tmp_path: Path, *hosts: str) -> tuple[Path, Path]:
    fed = init(tmp_path, *(a for h in hosts for a in ("--host", h)))
    site = tmp_path / "site"
    assert client("init", site, "--site-name", "h1")[0] == 0
    assert server("add-site", fed, "h1", site / "keys" / "node.pub")[0] == 0
    assert server("invite", fed, "h1")[0] == 0
    assert client("init", tmp_path / "joined", "--site-name", "h1", "--invite", fed / "invites" / "h1.toml")[0] == 0
    (tmp_path / "joined" / "ledger.json").write_text('{"entries": []}\n')  # stands for a site's ledger
    return fed, site


def test_rotate_certs_issues_a_new_server_certificate_from_the_same_ca_and_touches_nothing_else(tmp_path):
    fed, site = _federation_with_a_site(tmp_path, "fl.example.org")
    pki = ServerPKI.in_dir(fed / "pki")
    old_cert, old_key = pki.server_cert.read_bytes(), pki.server_key.read_bytes()
    kept = {name: (fed / name).read_bytes() for name in ("pki/ca.crt", "pki/ca.key", "sites.json",
                                                          "flwr/credentials.yaml", "state/control-token.sha256",
                                                          "state/superexec.secret", "invites/h1.toml")}
    sites_before = {name: _digests(tmp_path / name) for name in ("site", "joined")}
    code, out, err = server("rotate-certs", fed)
    assert code == 0, err
    assert pki.server_cert.read_bytes() != old_cert and pki.server_key.read_bytes() != old_key
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # the same CA
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, san.get_values_for_type(x509.DNSName))) == {"fl.example.org", "localhost"}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 365 * DAY
    assert _mode(pki.server_key) == 0o600 and _mode(pki.ca_key) == 0o600 and _mode(pki.dir) == 0o700
    assert not [p.name for p in pki.dir.iterdir() if p.name.startswith(".")]  # no temp file left
    assert {name: (fed / name).read_bytes() for name in kept} == kept
    assert {name: _digests(tmp_path / name) for name in ("site", "joined")} == sites_before
    assert "New server certificate from the same CA: valid for fl.example.org, localhost, 127.0.0.1 until " in out
    assert f"The server is not running: `candor-server start {fed}` uses the new certificate." in out


def test_rotate_certs_with_other_hosts_and_days_rewrites_only_the_invites_it_no_longer_covers(tmp_path):
    fed, _ = _federation_with_a_site(tmp_path, "fl.example.org")
    code, out, err = server("rotate-certs", fed, "--host", "fl2.example.org", "--host", "10.0.0.9",
                            "--cert-days", "30")
    assert code == 0, err
    cert = x509.load_pem_x509_certificate((fed / "pki" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, san.get_values_for_type(x509.DNSName))) == {"fl2.example.org", "localhost"}
    assert set(map(str, san.get_values_for_type(x509.IPAddress))) == {"10.0.0.9", "127.0.0.1"}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 30 * DAY
    assert tomllib.loads((fed / "federation.toml").read_text())["hosts"] == ["fl2.example.org", "10.0.0.9"]
    assert Invite.read(fed / "invites" / "h1.toml").server == "fl2.example.org:9092"
    assert "Rewrote h1.toml" in out
    code, out, err = server("rotate-certs", fed, "--cert-days", "900")
    assert code == 1 and "--cert-days must be a whole number of days in 1-825" in _one_line(err)
    code, out, err = server("rotate-certs", fed, "--host", "http://x")
    assert code == 1 and "neither an IP address nor a valid DNS name" in _one_line(err)
    assert x509.load_pem_x509_certificate((fed / "pki" / "server.crt").read_bytes()) == cert  # nothing changed


def test_status_says_when_the_running_server_still_presents_its_previous_certificate(tmp_path):
    import time

    from candor.server.superlink import Running
    from candor.server.superlink_cmds import certificate_lines

    fed = init(tmp_path)
    old_key = serialization.load_pem_private_key((fed / "pki" / "server.key").read_bytes(), None)
    old_cert = x509.load_pem_x509_certificate((fed / "pki" / "server.crt").read_bytes())
    code, out, err = server("rotate-certs", fed, "--no-restart")
    assert code == 0, err
    federation = Federation.load(fed)
    with tls_server(old_key, old_cert, tmp_path) as address:  # stands for the server started before the rotation
        port = int(address.rpartition(":")[2])
        lines = certificate_lines(federation, Running(1, "127.0.0.1", port, time.time()))
    assert lines[-1] == (f"NOTE: the running server still presents its previous certificate (valid until "
                         f"{old_cert.not_valid_after_utc:%Y-%m-%d}); restart it to use {fed / 'pki' / 'server.crt'}: "
                         f"candor-server stop {fed} && candor-server start {fed} --port {port}")
    new_key = serialization.load_pem_private_key((fed / "pki" / "server.key").read_bytes(), None)
    new_cert = x509.load_pem_x509_certificate((fed / "pki" / "server.crt").read_bytes())
    with tls_server(new_key, new_cert, tmp_path) as address:
        lines = certificate_lines(federation, Running(1, "127.0.0.1", int(address.rpartition(":")[2]), time.time()))
    assert not any(l.startswith("NOTE") for l in lines), lines


def test_a_server_certificate_never_outlives_its_ca(tmp_path):
    fed = init(tmp_path)
    now = _now()
    ca_key, ca_cert = make_ca("Candor CA for f", federation="f", not_before=now - 3000 * DAY,
                              not_after=now + 100 * DAY)
    (fed / "pki" / "ca.key").write_bytes(key_pem(ca_key))
    (fed / "pki" / "ca.crt").write_bytes(pem(ca_cert))
    code, out, err = server("rotate-certs", fed)
    assert code == 0, err
    cert = x509.load_pem_x509_certificate((fed / "pki" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc
    assert (f"until {ca_cert.not_valid_after_utc:%Y-%m-%d} (not 365 days: a certificate cannot outlive its CA, "
            f"which ends then; start a CA rotation: `candor-server rotate-certs {fed} --new-ca`)") in out


def test_an_interrupted_rotation_is_named_and_running_it_again_repairs_it(tmp_path):
    fed = init(tmp_path)
    pki = Federation.load(fed).pki
    # A crash between the key's rename and the certificate's: a new key beside the old certificate.
    pki.server_key.write_bytes(key_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(KeyFileError, match=f"does not belong to .*candor-server rotate-certs {fed}"):
        pki.check()
    assert server("rotate-certs", fed)[0] == 0
    pki.check()


# --- rotate-certs --new-ca and --switch ------------------------------------------------------

def test_a_ca_rotation_trusts_both_cas_during_the_overlap_then_only_the_new_one(tmp_path):
    fed, _ = _federation_with_a_site(tmp_path)
    pki = ServerPKI.in_dir(fed / "pki")
    old_ca = pki.ca_cert.read_bytes()
    old_server = pki.server_cert.read_bytes()
    kept = {name: (fed / name).read_bytes() for name in ("sites.json", "flwr/credentials.yaml",
                                                          "state/control-token.sha256")}
    sites_before = {name: _digests(tmp_path / name) for name in ("site", "joined")}

    code, out, err = server("rotate-certs", fed, "--new-ca", "--overlap-days", "14")
    assert code == 0, err
    bundle = x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())
    new_ca = x509.load_pem_x509_certificate((fed / "pki" / "next" / "ca.crt").read_bytes())
    assert [pem(c) for c in bundle] == [old_ca, pem(new_ca)]  # old first, then new
    assert pki.server_cert.read_bytes() == old_server  # the server keeps its certificate until the switch
    assert _mode(fed / "pki" / "next" / "ca.key") == 0o600 and _mode(fed / "pki" / "next") == 0o700
    invite = Invite.read(fed / "invites" / "h1.toml")
    assert [pem(c) for c in invite.ca_certificates()] == [old_ca, pem(new_ca)]
    assert "Rewrote 1 invite(s)" in out and "--switch" in out
    status = server("status", fed)[1]
    switch_day = (_now() + 14 * DAY).strftime("%Y-%m-%d")
    assert any(l.startswith("NOTE: a CA rotation is under way") and f"on or after {switch_day}" in l
               and f"candor-server rotate-certs {fed} --switch" in l for l in status.splitlines()), status
    code, out, err = server("rotate-certs", fed, "--new-ca")
    assert code == 1 and "under way already" in _one_line(err)

    # A site imports the two-CA invite before the switch: `start --invite` says so.
    site = SiteDir(tmp_path / "joined")
    code, out, err = client("start", site.dir, "--invite", fed / "invites" / "h1.toml", "--data", tmp_path / "no.csv")
    assert "This site trusts 2 CA certificates" in out, out + err
    assert site.ca_cert.read_bytes() == pki.ca_cert.read_bytes()

    code, out, err = server("rotate-certs", fed, "--switch")
    assert code == 0, err
    assert pki.ca_cert.read_bytes() == pem(new_ca) and not (fed / "pki" / "next").exists()
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    assert ca_key.public_key().public_numbers() == new_ca.public_key().public_numbers()  # the old CA's key is gone
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    cert.verify_directly_issued_by(new_ca)
    assert _mode(pki.server_key) == 0o600 and _mode(pki.ca_key) == 0o600
    assert [pem(c) for c in Invite.read(fed / "invites" / "h1.toml").ca_certificates()] == [pem(new_ca)]
    assert {name: (fed / name).read_bytes() for name in kept} == kept
    assert _digests(tmp_path / "site") == sites_before["site"]
    joined = _digests(tmp_path / "joined")  # only the CA file (and site.toml's copy of the invite) changed
    assert {k: v for k, v in joined.items() if k not in ("federation/ca.crt", "site.toml")} == {
        k: v for k, v in sites_before["joined"].items() if k not in ("federation/ca.crt", "site.toml")}
    assert "NOTE" not in server("status", fed)[1]
    code, out, err = server("rotate-certs", fed, "--switch")
    assert code == 1 and "no CA rotation is under way" in _one_line(err)


def test_the_two_steps_are_not_mixed_and_new_ca_issues_no_server_certificate(tmp_path):
    fed = init(tmp_path)
    for args, fragment in ((("--new-ca", "--switch"), "the two steps of a CA rotation"),
                           (("--new-ca", "--host", "x.org"), "--new-ca issues no server certificate"),
                           (("--new-ca", "--overlap-days", "-1"), "--overlap-days must be a whole number")):
        code, out, err = server("rotate-certs", fed, *args)
        assert code == 1 and fragment in _one_line(err), err
    assert not (fed / "pki" / "next").exists()


# --- the CA bundle in an invite ---------------------------------------------------------------

def _invite(tmp_path: Path, ca_text: str) -> Path:
    from candor.common.schema import Schema

    path = tmp_path / "invite.toml"
    Invite(federation="f", site="h1", server="127.0.0.1:9092", min_rows=20, schema=Schema.load(DEMO_SCHEMA_PATH),
           ca_certificate=ca_text).write(path)
    return path


def test_an_invite_carries_a_ca_bundle_and_its_check_covers_every_certificate(tmp_path):
    now = _now()
    old = make_ca("Candor CA for f", federation="f", not_before=now - DAY, not_after=now + 900 * DAY)
    new = make_ca("Candor CA for f (new)", federation="f", not_before=now - DAY, not_after=now + 3000 * DAY)
    bundle = (pem(old[1]) + pem(new[1])).decode()
    invite = Invite.read(_invite(tmp_path, bundle))
    assert invite.ca_certificate == bundle and invite.ca_certificates() == [old[1], new[1]]
    site = SiteDir(tmp_path / "site")
    site.dir.mkdir()
    site.save_config({"site": "h1"})
    site.join(invite, source=tmp_path / "invite.toml")
    assert site.ca_cert.read_text() == bundle

    leaf = make_leaf(*old, not_before=now - DAY, not_after=now + DAY)[1]
    lines = bundle.splitlines(keepends=True)
    for text, fragment in (
            ("".join(lines[:-3] + lines[-2:]), "is not a PEM certificate"),  # a line of the new CA gone
            (bundle + pem(old[1]).decode()[:120], "2 complete one(s)"),
            (bundle + key_pem(old[0]).decode(), "holds a private key"),
            (bundle + pem(leaf).decode(), "(certificate 3 of 3) is not a CA certificate")):
        with pytest.raises(SiteError) as err:
            Invite.read(_invite(tmp_path, text))
        assert fragment in str(err.value) and "coordinator" in str(err.value), str(err.value)


# --- the site's preflight against a real TLS server on 127.0.0.1 -------------------------------

@pytest.fixture
def cas(tmp_path):
    """The federation's old and new CA, the site's CA file for each and for the bundle."""
    now = _now()
    old = make_ca("Candor CA for f", federation=None, not_before=now - 100 * DAY, not_after=now + 3000 * DAY)
    new = make_ca("Candor CA for f (2026-12-01 10:00)", federation="f", not_before=now - DAY,
                  not_after=now + 3650 * DAY)
    files = {}
    for name, certs in (("old", [old[1]]), ("new", [new[1]]), ("bundle", [old[1], new[1]])):
        files[name] = tmp_path / f"{name}.crt"
        files[name].write_bytes(b"".join(pem(c) for c in certs))
    return old, new, files


def test_a_site_that_trusts_the_bundle_accepts_the_server_before_and_after_the_switch(cas, tmp_path):
    old, new, files = cas
    now = _now()
    for ca in (old, new):
        with tls_server(*make_leaf(*ca, not_before=now - DAY, not_after=now + 300 * DAY), tmp_path) as address:
            check_server(address, files["bundle"])
    with tls_server(*make_leaf(*new, not_before=now - DAY, not_after=now + 300 * DAY), tmp_path) as address:
        with pytest.raises(ConnectionFailed) as err:
            check_server(address, files["old"])  # a site that did not import the new invite
    assert str(err.value) == (
        f"the server at {address} presented a certificate from a new CA of federation 'f' that the CA "
        f"certificate(s) this site trusts ({files['old']}) did not sign: the coordinator changed the federation's "
        "CA; ask the coordinator for the new invite and import it: `candor-client start SITE_DIR --invite "
        "NEW_INVITE --data PATH`")


def test_an_expired_server_certificate_is_one_line_naming_the_date_and_the_remedy(cas, tmp_path):
    old, _, files = cas
    now = _now()
    key, cert = make_leaf(*old, not_before=now - 400 * DAY, not_after=now - 2 * DAY)
    with tls_server(key, cert, tmp_path) as address:
        with pytest.raises(ConnectionFailed) as err:
            check_server(address, files["bundle"])
        assert str(err.value) == (
            f"the server's certificate at {address} expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask the "
            "coordinator to renew it (`candor-server rotate-certs FED_DIR` and a restart of the server); this site "
            "needs nothing new, start it again afterwards")
        # ... and `candor-client start` prints it as its one line, after the data check.
        site = tmp_path / "site"
        assert client("init", site, "--site-name", "h1")[0] == 0
        fed = init(tmp_path)
        assert server("add-site", fed, "h1", site / "keys" / "node.pub")[0] == 0
        assert server("invite", fed, "h1")[0] == 0
        data = tmp_path / "h1.csv"
        breast_cancer_frame().head(60).to_csv(data, index=False)
        assert client("start", site, "--invite", fed / "invites" / "h1.toml", "--data", data,
                      "--server", address)[0] == 1
        (site / "federation" / "ca.crt").write_bytes(files["old"].read_bytes())
        code, out, err = client("start", site, "--data", data, "--server", address)
        assert code == 1 and "Data OK" in out and "Server" not in out
        line = _one_line(err)
        assert f"expired on {cert.not_valid_after_utc:%Y-%m-%d}: ask the coordinator to renew it" in line, line


def test_an_expired_ca_and_a_clock_behind_are_each_one_line(tmp_path):
    now = _now()
    expired_ca = make_ca("Candor CA for f", federation="f", not_before=now - 4000 * DAY, not_after=now - 5 * DAY)
    (tmp_path / "expired.crt").write_bytes(pem(expired_ca[1]))
    with tls_server(*make_leaf(*expired_ca, not_before=now - 30 * DAY, not_after=now + 30 * DAY), tmp_path) as address:
        with pytest.raises(ConnectionFailed) as err:
            check_server(address, tmp_path / "expired.crt")
    assert str(err.value).startswith(f"the federation's CA certificate in {tmp_path / 'expired.crt'} expired on "
                                     f"{expired_ca[1].not_valid_after_utc:%Y-%m-%d}: ask the coordinator for the "
                                     "new invite")
    ca = make_ca("Candor CA for f", federation="f", not_before=now - DAY, not_after=now + 3000 * DAY)
    (tmp_path / "ca.crt").write_bytes(pem(ca[1]))
    with tls_server(*make_leaf(*ca, not_before=now + 2 * DAY, not_after=now + 300 * DAY), tmp_path) as address:
        with pytest.raises(ConnectionFailed, match="is not valid yet .*this machine's clock"):
            check_server(address, tmp_path / "ca.crt")


def test_a_stranger_ca_keeps_its_line_and_a_wrong_name_is_still_named(cas, tmp_path):
    old, _, files = cas
    now = _now()
    stranger = make_ca("Some CA", federation=None, not_before=now - DAY, not_after=now + 300 * DAY)
    with tls_server(*make_leaf(*stranger, not_before=now - DAY, not_after=now + 30 * DAY), tmp_path) as address:
        with pytest.raises(ConnectionFailed) as err:
            check_server(address, files["bundle"])
    assert "did not sign" in str(err.value) and "new invite" in str(err.value)
    assert "new CA of federation" not in str(err.value)
    other_fed = make_ca("Candor CA for g", federation="g", not_before=now - DAY, not_after=now + 300 * DAY)
    with tls_server(*make_leaf(*other_fed, not_before=now - DAY, not_after=now + 30 * DAY), tmp_path) as address:
        with pytest.raises(ConnectionFailed, match="did not sign") as err:
            check_server(address, files["bundle"])
    assert "new CA of federation" not in str(err.value)  # another federation's CA is not "ours, changed"
    with tls_server(*make_leaf(*old, not_before=now - DAY, not_after=now + 30 * DAY, hosts=("fl.org",)),
                    tmp_path) as address:
        with pytest.raises(ConnectionFailed, match="not valid for '127.0.0.1'"):
            check_server(address, files["bundle"])
