"""Reading X.509 certificates as the coordinator and the sites both do: a PEM file may
hold one certificate or a bundle (during a CA rotation), and a cut or altered block must
be noticed, not silently dropped (``cryptography`` parses the complete blocks only)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["common_name", "day", "parse_pem_certificates"]

_BEGIN = b"-----BEGIN CERTIFICATE-----"


def parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in the PEM ``data``, in order.

    Raises:
        ValueError: no certificate, or a block that does not parse (the reason says which);
            callers turn it into their domain error, naming the file.
    """
    blocks = data.count(_BEGIN)
    if not blocks:
        raise ValueError("no PEM certificate in it")
    certs = x509.load_pem_x509_certificates(data)
    if len(certs) != blocks:
        raise ValueError(f"{blocks} certificate blocks but only {len(certs)} complete one(s): it was cut or altered")
    return certs


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject common name (its whole subject if it has none)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def day(moment: dt.datetime) -> str:
    """A certificate date as the reports print it: ``YYYY-MM-DD`` (UTC)."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d")
