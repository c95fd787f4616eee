"""The federation's certificate authority and the SuperLink's TLS certificate.

Everything is generated with the ``cryptography`` library (no ``openssl`` calls).
Keys are ECDSA P-384; private keys are PEM (PKCS#8, unencrypted: the SuperLink reads
them unattended), written atomically with mode 0600. The CA signs exactly one thing,
the server certificate, whose subject alternative names cover every host name or IP
address a site may use to reach the server, plus 127.0.0.1 and ``localhost``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from candor.common.atomic import write_atomic
from candor.common.errors import ConfigError, FederationError, KeyFileError

__all__ = ["ServerPKI", "certificate_hosts", "create_pki", "subject_alt_names"]

CA_DAYS = 3650  # the CA outlives many server certificates
SERVER_DAYS = 825  # the longest server-certificate lifetime common clients accept
ALWAYS_ON_HOSTS = ("127.0.0.1", "localhost")


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

    def check(self) -> None:
        """Check the files the SuperLink needs before it starts.

        Raises:
            KeyFileError: a file is missing, a certificate is not PEM, or a private key is
                readable by other users.
        """
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise KeyFileError(f"{path} is missing: the federation directory is incomplete "
                                   "(re-create it with `candor-server init`)")
        for cert in (self.ca_cert, self.server_cert):
            _load_certificate(cert)
        for key in (self.ca_key, self.server_key):
            if key.exists() and key.stat().st_mode & 0o077:
                raise KeyFileError(f"{key} is readable by other users (mode {key.stat().st_mode & 0o777:o}); "
                                   f"run `chmod 600 {key}`")


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path} is not a readable PEM certificate ({err}); the federation's PKI is damaged: "
                           "restore pki/ from a backup, or re-create the federation with `candor-server init`") from None


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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_pki(directory: Path, *, federation: str, hosts: list[str]) -> ServerPKI:
    """Create a CA and a server certificate for ``hosts`` in ``directory``.

    Raises:
        ConfigError: a host is not an IP address or DNS name.
        FederationError: the files exist already.
    """
    pki = ServerPKI.in_dir(directory)
    sans = subject_alt_names(hosts)
    for path in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key):
        if path.exists():
            raise FederationError(f"{path} exists already: refusing to replace the federation's keys; "
                                  "create a new federation in a new directory")
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Candor"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"Candor CA for {federation}")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Candor"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} server")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    write_atomic(pki.ca_key, _key_pem(ca_key), mode=0o600)
    write_atomic(pki.server_key, _key_pem(server_key), mode=0o600)
    write_atomic(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return pki


def certificate_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses in a certificate's SAN extension.

    Raises:
        KeyFileError: the file is not a readable PEM certificate.
    """
    cert = _load_certificate(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
