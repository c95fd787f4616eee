"""The federation's certificate authority, the SuperLink's TLS certificate, their lifetimes
and their rotation.

Everything is generated with the ``cryptography`` library (no ``openssl`` calls).
Keys are ECDSA P-384; private keys are PEM (PKCS#8, unencrypted: the SuperLink reads
them unattended), written atomically (temp file, fsync, rename) with mode 0600. The CA
signs only server certificates, whose subject alternative names cover every host name
or IP address a site may use to reach the server, plus 127.0.0.1 and ``localhost``.

**Lifetimes** (stated here, shown by ``candor-server init`` and ``status``):

* the CA: :data:`CA_DAYS` (10 years). Every site trusts it; replacing it means a new
  invite at every site, so it is long-lived and ``status`` warns :data:`CA_WARN_DAYS`
  (90) days ahead, time for a CA rotation's overlap.
* the server certificate: :data:`SERVER_DAYS` (1 year) by default, 1 to
  :data:`MAX_SERVER_DAYS` (825, the longest server-certificate lifetime common TLS
  clients accept) with ``init --cert-days`` / ``rotate-certs --cert-days``, and never
  beyond its CA's own end. Replacing it needs nothing from the sites (same CA), so
  ``status`` warns :data:`SERVER_WARN_DAYS` (30) days ahead.

Both start :data:`CLOCK_SKEW` before the moment they are made, so that a site whose
clock is a little behind accepts a fresh certificate.

**Files** in ``pki/``::

    ca.crt        the CA certificate(s) every party trusts (sites via their invite, the
                  coordinator's flwr CLI, the SuperExec): one CA; during a CA rotation
                  two, old first (a PEM bundle)
    ca.key        the key of the CA that signs server.crt (0600)
    server.crt    the SuperLink's certificate; server.key (0600)
    next/         only during a CA rotation (``rotate-certs --new-ca`` to ``--switch``):
                  ca.crt, ca.key (0600) of the new CA, and rotation.toml (when the
                  rotation started, when the overlap ends)

**Rotation.** :func:`issue_server_certificate` replaces the server certificate and key
from the same CA (new key; the hosts kept or changed). A CA rotation has two steps:
:func:`begin_ca_rotation` makes a new CA in ``next/`` and puts both CA certificates in
``ca.crt`` (so every invite written from then on carries both), while the server keeps
its certificate from the old CA; after the overlap, :func:`finish_ca_rotation` issues
the server certificate from the new CA, makes the new CA the only one in ``ca.crt`` and
``ca.key`` (the old CA's key is deleted) and removes ``next/``. A site that imported the
bundle accepts the server before and after the switch. Every step can be run again
after a crash at any instant and ends in a consistent directory; :meth:`ServerPKI.check`
finds a key that does not belong to its certificate (an interrupted rotation).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from candor.common.atomic import write_atomic
from candor.common.certificates import common_name, day, parse_pem_certificates
from candor.common.errors import ConfigError, FederationError, KeyFileError

__all__ = ["CA_DAYS", "CA_WARN_DAYS", "DEFAULT_OVERLAP_DAYS", "MAX_SERVER_DAYS", "SERVER_DAYS", "SERVER_WARN_DAYS",
           "CaRotation", "Issued", "Lifetime", "ServerPKI", "begin_ca_rotation", "certificate_hosts", "check_days",
           "create_pki", "finish_ca_rotation", "issue_server_certificate", "lifetime_report",
           "load_certificates", "presented_certificate", "subject_alt_names"]

CA_DAYS = 3650  # 10 years: the CA is what every site trusts; replacing it needs a new invite at each site
SERVER_DAYS = 365  # 1 year: replacing the server certificate needs nothing from the sites
MAX_SERVER_DAYS = 825  # the longest server-certificate lifetime common TLS clients accept
SERVER_WARN_DAYS = 30  # `status` warns this many days before the server certificate expires
CA_WARN_DAYS = 90  # ... and before the CA expires (time for a CA rotation's overlap)
DEFAULT_OVERLAP_DAYS = 30  # a CA rotation: days between the new invites and the switch
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start this long before they are made
ALWAYS_ON_HOSTS = ("127.0.0.1", "localhost")
_ROTATION_FILE = "rotation.toml"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CaRotation:
    """A CA rotation under way: both CAs are trusted from ``started`` on; the switch to
    the new CA is due on or after ``switch_after``."""

    started: dt.datetime
    switch_after: dt.datetime


@dataclass(frozen=True)
class ServerPKI:
    """Paths of the federation's CA and server certificate (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> ServerPKI:
        return cls(directory / "ca.crt", directory / "ca.key", directory / "server.crt", directory / "server.key")

    @property
    def dir(self) -> Path:
        return self.ca_cert.parent

    @property
    def next_dir(self) -> Path:
        """The new CA during a CA rotation."""
        return self.dir / "next"

    @property
    def next_ca_cert(self) -> Path:
        return self.next_dir / "ca.crt"

    @property
    def next_ca_key(self) -> Path:
        return self.next_dir / "ca.key"

    def rotation(self) -> CaRotation | None:
        """The CA rotation under way, or None.

        Raises:
            KeyFileError: ``next/rotation.toml`` is unreadable.
        """
        path = self.next_dir / _ROTATION_FILE
        try:
            doc = tomllib.loads(path.read_text())
            return CaRotation(_aware(doc["started"]), _aware(doc["switch-after"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise KeyFileError(f"{path} is unreadable ({err}); finish the CA rotation with `candor-server "
                               f"rotate-certs DIR --switch` (it needs only {self.next_dir}/ca.crt and ca.key)") from None

    def ca_certificates(self) -> list[x509.Certificate]:
        """Every CA certificate in ``ca.crt`` (two during a CA rotation, old first)."""
        return load_certificates(self.ca_cert)

    def server_certificate(self) -> x509.Certificate:
        return load_certificates(self.server_cert)[0]

    def signing_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The CA key and the certificate of ``ca.crt`` it belongs to (the CA that signs
        the server certificate).

        Raises:
            KeyFileError: the key is unreadable, exposed, or belongs to none of the CAs.
        """
        key = _load_key(self.ca_key)
        return key, _certificate_of(key, self.ca_certificates(), self.ca_key, self.ca_cert)

    def check(self, *, now: dt.datetime | None = None) -> None:
        """Check the files the SuperLink needs before it starts.

        Raises:
            KeyFileError: a file is missing, a certificate is not PEM, a private key is
                readable by other users or does not belong to its certificate, the server
                certificate is not signed by a CA of ``ca.crt``, or it has expired.
        """
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise KeyFileError(f"{path} is missing: the federation directory is incomplete "
                                   "(re-create it with `candor-server init`)")
        cas = self.ca_certificates()
        server = self.server_certificate()
        for key in (self.ca_key, self.server_key, self.next_ca_key):
            if key.exists() and key.stat().st_mode & 0o077:
                raise KeyFileError(f"{key} is readable by other users (mode {key.stat().st_mode & 0o777:o}); "
                                   f"run `chmod 600 {key}`")
        fed_dir = self.dir.parent
        if _public(_load_key(self.server_key).public_key()) != _public(server.public_key()):
            raise KeyFileError(f"{self.server_key} does not belong to {self.server_cert} (a certificate rotation "
                               f"was interrupted?): issue a matching pair with `candor-server rotate-certs {fed_dir}`")
        if _issuer_of(server, cas) is None:
            raise KeyFileError(f"{self.server_cert} is not signed by the CA in {self.ca_cert} (a CA rotation was "
                               f"interrupted?): issue a new one with `candor-server rotate-certs {fed_dir}`")
        now = now or _utcnow()
        if server.not_valid_after_utc <= now:
            raise KeyFileError(f"the server certificate {self.server_cert} expired on {day(server.not_valid_after_utc)}: "
                               f"no site could connect; issue a new one with `candor-server rotate-certs {fed_dir}`")


def load_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file holding one or more (a CA bundle).

    Raises:
        KeyFileError: the file is unreadable or holds no PEM certificate.
    """
    try:
        certs = parse_pem_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path} is not a readable PEM certificate ({err}); the federation's PKI is damaged: "
                           "restore pki/ from a backup, or re-create the federation with `candor-server init`") from None
    return certs


def _aware(value: dt.datetime | str) -> dt.datetime:
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as err:
        raise KeyFileError(f"{path} is not a readable private key ({err}); restore pki/ from a backup") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path} is not an EC private key; restore pki/ from a backup")
    return key


def _certificate_of(key, certs: list[x509.Certificate], key_path: Path, cert_path: Path) -> x509.Certificate:
    for cert in certs:
        if _public(cert.public_key()) == _public(key.public_key()):
            return cert
    raise KeyFileError(f"{key_path} belongs to none of the certificates in {cert_path} (an interrupted CA "
                       "rotation?); restore pki/ from a backup")


def _issuer_of(cert: x509.Certificate, cas: list[x509.Certificate]) -> x509.Certificate | None:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return ca
        except (ValueError, TypeError, InvalidSignature):
            continue
    return None


def _parse_host(host: str) -> x509.GeneralName:
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or not all(labels) or any(len(l) > 63 or not l.replace("-", "").isalnum() for l in labels):
        raise ConfigError(f"--host {host!r} is neither an IP address nor a valid DNS name "
                          "(letters, digits, '-' and '.', e.g. fl.hospital.org); give the name or address sites dial")
    return x509.DNSName(host.rstrip(".").lower())


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hosts`` plus 127.0.0.1 and localhost, without duplicates."""
    names: list[x509.GeneralName] = []
    for host in [*hosts, *ALWAYS_ON_HOSTS]:
        name = _parse_host(host)
        if name not in names:
            names.append(name)
    return names


def check_days(days: int, *, option: str = "--cert-days") -> int:
    """``days`` if it is a valid server-certificate lifetime.

    Raises:
        ConfigError: not a whole number of days in 1-MAX_SERVER_DAYS.
    """
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_SERVER_DAYS:
        raise ConfigError(f"{option} must be a whole number of days in 1-{MAX_SERVER_DAYS} (the longest "
                          f"server-certificate lifetime common TLS clients accept); got {days!r}. "
                          f"The default is {SERVER_DAYS}")
    return days


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, federation: str) -> x509.Name:
    # A common name is at most 64 characters (RFC 5280's ub-common-name).
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Candor"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation[:64]),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _new_ca(federation: str, now: dt.datetime, *, label: str = "") -> tuple[ec.EllipticCurvePrivateKey,
                                                                              x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(f"Candor CA for {federation}{label}", federation)
    start = now - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


@dataclass(frozen=True)
class Issued:
    """A server certificate just issued: its hosts, its end, and whether its CA's end cut
    it short of the lifetime asked for."""

    certificate: x509.Certificate
    hosts: list[str]
    days: int
    capped: bool

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


def _server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, federation: str,
                        hosts: list[str], days: int, now: dt.datetime
                        ) -> tuple[ec.EllipticCurvePrivateKey, Issued]:
    sans = subject_alt_names(hosts)
    start = now - CLOCK_SKEW
    end = start + dt.timedelta(days=check_days(days))
    capped = end > ca_cert.not_valid_after_utc
    if capped:
        end = ca_cert.not_valid_after_utc  # a certificate cannot outlive the CA that vouches for it
    if end <= now:
        raise FederationError(f"the CA '{common_name(ca_cert)}' expired on {day(end)}: it cannot issue a usable "
                              "server certificate; start a new CA with `candor-server rotate-certs DIR --new-ca`")
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{federation} server", federation))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, Issued(cert, _hosts(cert), days, capped)


def _write_server(pki: ServerPKI, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    # Key first, then certificate, each atomically: a crash between the two leaves a key
    # that does not match its certificate, which ServerPKI.check names (run it again).
    write_atomic(pki.server_key, _key_pem(key), mode=0o600)
    write_atomic(pki.server_cert, _pem(cert))


def create_pki(directory: Path, *, federation: str, hosts: list[str], server_days: int = SERVER_DAYS) -> ServerPKI:
    """Create a CA (:data:`CA_DAYS`) and a server certificate for ``hosts``
    (``server_days``) in ``directory``.

    Raises:
        ConfigError: a host is not an IP address or DNS name, or ``server_days`` is out of range.
        FederationError: the files exist already.
    """
    pki = ServerPKI.in_dir(directory)
    subject_alt_names(hosts)  # validates the hosts before anything is made
    check_days(server_days)
    for path in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key):
        if path.exists():
            raise FederationError(f"{path} exists already: refusing to replace the federation's keys; "
                                  "create a new federation in a new directory")
    now = _utcnow()
    ca_key, ca_cert = _new_ca(federation, now)
    server_key, issued = _server_certificate(ca_key, ca_cert, federation=federation, hosts=hosts,
                                             days=server_days, now=now)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    write_atomic(pki.ca_key, _key_pem(ca_key), mode=0o600)
    write_atomic(pki.ca_cert, _pem(ca_cert))
    _write_server(pki, server_key, issued.certificate)
    return pki


def issue_server_certificate(pki: ServerPKI, *, federation: str, hosts: list[str], days: int = SERVER_DAYS,
                             now: dt.datetime | None = None) -> Issued:
    """Replace the server certificate and key with new ones from the same CA (the one
    whose key is ``ca.key``), for ``hosts`` and ``days``. Nothing else in ``pki/`` changes.

    Raises:
        ConfigError: a host or ``days`` is invalid.
        KeyFileError: the CA's files are missing, broken or exposed.
        FederationError: the CA has expired.
    """
    ca_key, ca_cert = pki.signing_ca()
    key, issued = _server_certificate(ca_key, ca_cert, federation=federation, hosts=hosts, days=days,
                                      now=now or _utcnow())
    _write_server(pki, key, issued.certificate)
    return issued


def begin_ca_rotation(pki: ServerPKI, *, federation: str, overlap_days: int = DEFAULT_OVERLAP_DAYS,
                      now: dt.datetime | None = None) -> tuple[x509.Certificate, CaRotation]:
    """Make a new CA in ``next/`` and trust both: ``ca.crt`` becomes the old CA followed by
    the new one. The server certificate, ``ca.key`` and the server key do not change.

    Raises:
        ConfigError: ``overlap_days`` is negative.
        FederationError: a CA rotation is under way already.
        KeyFileError: the current CA's files are missing, broken or exposed.
    """
    if isinstance(overlap_days, bool) or not isinstance(overlap_days, int) or overlap_days < 0:
        raise ConfigError(f"--overlap-days must be a whole number of days >= 0 (the time sites have to import "
                          f"the new invite before the switch); got {overlap_days!r}")
    if (current := pki.rotation()) is not None:
        raise FederationError(f"a CA rotation is under way already (since {day(current.started)}, new CA in "
                              f"{pki.next_dir}): finish it with `candor-server rotate-certs {pki.dir.parent} --switch`")
    _, old = pki.signing_ca()
    now = now or _utcnow()
    key, cert = _new_ca(federation, now, label=f" ({now.strftime('%Y-%m-%d %H:%M')})")
    pki.next_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(pki.next_dir, 0o700)
    write_atomic(pki.next_ca_key, _key_pem(key), mode=0o600)
    write_atomic(pki.next_ca_cert, _pem(cert))
    write_atomic(pki.ca_cert, _pem(old) + _pem(cert))  # the bundle: old first
    rotation = CaRotation(now, now + dt.timedelta(days=overlap_days))
    # Written last: a crash before it leaves no rotation under way, and running this again
    # makes a fresh new CA (the bundle is rebuilt from the signing CA and that one).
    write_atomic(pki.next_dir / _ROTATION_FILE, tomli_w.dumps(
        {"started": rotation.started.isoformat(timespec="seconds"),
         "switch-after": rotation.switch_after.isoformat(timespec="seconds")}))
    return cert, rotation


def finish_ca_rotation(pki: ServerPKI, *, federation: str, hosts: list[str], days: int = SERVER_DAYS,
                       now: dt.datetime | None = None) -> Issued:
    """Switch to the new CA: a server certificate from it, then the new CA as the only one
    in ``ca.crt`` and ``ca.key`` (the old CA's key is deleted), and ``next/`` removed.

    Raises:
        FederationError: no CA rotation is under way.
        KeyFileError: the new CA's files are missing, broken or exposed.
    """
    if pki.rotation() is None:
        raise FederationError(f"no CA rotation is under way in {pki.dir}: start one with "
                              f"`candor-server rotate-certs {pki.dir.parent} --new-ca`")
    new_key = _load_key(pki.next_ca_key)
    new_cert = _certificate_of(new_key, load_certificates(pki.next_ca_cert), pki.next_ca_key, pki.next_ca_cert)
    server_key, issued = _server_certificate(new_key, new_cert, federation=federation, hosts=hosts, days=days,
                                             now=now or _utcnow())
    # Each write is atomic and this order can be run again from the start after a crash
    # at any point: next/ goes last, and until then the bundle trusts the new server
    # certificate.
    _write_server(pki, server_key, issued.certificate)
    write_atomic(pki.ca_key, _key_pem(new_key), mode=0o600)
    write_atomic(pki.ca_cert, _pem(new_cert))
    (pki.next_dir / _ROTATION_FILE).unlink()
    shutil.rmtree(pki.next_dir)
    return issued


def _hosts(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def certificate_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses in a certificate's SAN extension.

    Raises:
        KeyFileError: the file is not a readable PEM certificate.
    """
    return _hosts(load_certificates(cert_path)[0])


# --- lifetimes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Lifetime:
    """One certificate's validity: ``role`` is "CA", "new CA" (during a CA rotation) or "server"."""

    role: str
    path: Path
    name: str
    not_before: dt.datetime
    not_after: dt.datetime

    def days_left(self, now: dt.datetime) -> int:
        """Whole days until the end (negative once expired)."""
        return (self.not_after - now) // dt.timedelta(days=1)


def _in(days: int) -> str:
    if days < 0:
        return f"{-days} day{'s' if days != -1 else ''} ago"
    return "today" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"


def lifetime_report(pki: ServerPKI, *, now: dt.datetime | None = None) -> tuple[list[Lifetime], list[str]]:
    """Each certificate's lifetime, and one line per thing to act on: a certificate that
    has expired (``EXPIRED: ...``) or expires soon (``WARNING: ...``, :data:`SERVER_WARN_DAYS`
    and :data:`CA_WARN_DAYS` ahead), and a CA rotation under way (``NOTE: ...``, or
    ``WARNING: ...`` once its overlap has ended). Each line names the certificate, its
    file, the date and the exact command to run.

    Raises:
        KeyFileError: a certificate of ``pki`` is unreadable.
    """
    now = now or _utcnow()
    fed_dir = pki.dir.parent
    rotation = pki.rotation()
    server = pki.server_certificate()
    cas = pki.ca_certificates()
    issuer = _issuer_of(server, cas)
    lifetimes = [Lifetime("CA" if ca is issuer or (issuer is None and i == 0) else "new CA", pki.ca_cert,
                          common_name(ca), ca.not_valid_before_utc, ca.not_valid_after_utc) for i, ca in enumerate(cas)]
    lifetimes.append(Lifetime("server", pki.server_cert, ", ".join(_hosts(server)), server.not_valid_before_utc,
                              server.not_valid_after_utc))
    lines = []
    rotate = f"candor-server rotate-certs {fed_dir}"
    for life in lifetimes:
        left = life.days_left(now)
        ends = f"{day(life.not_after)}, {_in(left)}"
        if life.role == "server":
            what = f"the server certificate ({life.path})"
            if life.not_after <= now:
                lines.append(f"EXPIRED: {what} expired on {ends}; no site can connect. Rotate it: {rotate}")
            elif left < SERVER_WARN_DAYS:
                lines.append(f"WARNING: {what} expires on {ends}; sites cannot connect after that. "
                             f"Rotate it now: {rotate}")
        elif life.role == "CA":
            what = f"the CA certificate '{life.name}' ({life.path})"
            act = (f"switch to the new CA: {rotate} --switch" if rotation else
                   f"start a CA rotation: {rotate} --new-ca, and send every site its new invite")
            if life.not_after <= now:
                lines.append(f"EXPIRED: {what} expired on {ends}; no site can verify the server. Replace it, "
                             + (act if rotation else f"without an overlap: {rotate} --new-ca --overlap-days 0, "
                                f"then {rotate} --switch, and send every site its new invite"))
            elif left < CA_WARN_DAYS:
                lines.append(f"WARNING: {what} expires on {ends}; every site needs the new CA before then: {act}")
    if rotation is not None:
        if now < rotation.switch_after:
            lines.append(f"NOTE: a CA rotation is under way since {day(rotation.started)}: invites carry both CA "
                         "certificates; once every site has imported its new invite (`candor-client start SITE_DIR "
                         f"--invite NEW_INVITE`), switch on or after {day(rotation.switch_after)}: {rotate} --switch")
        else:
            lines.append(f"WARNING: the CA rotation's overlap ended on {day(rotation.switch_after)}: switch to the "
                         f"new CA now: {rotate} --switch")
    return lifetimes, lines


def presented_certificate(host: str, port: int, *, timeout: float = 5.0) -> x509.Certificate | None:
    """The certificate the server at ``host:port`` presents (unverified: for comparing it
    with ``server.crt``), or None if it cannot be reached."""
    try:
        return x509.load_pem_x509_certificate(ssl.get_server_certificate((host, port), timeout=timeout).encode())
    except (OSError, ssl.SSLError, ValueError):
        return None
