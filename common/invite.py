"""The invite: the one file a coordinator hands a site to join its federation.

``candor-server invite`` writes it and ``candor-client init/start --invite`` reads it;
both go through :class:`Invite`, so the format has one writer and one reader. It holds
nothing secret (a CA certificate, an address, the schema), so it may travel by any
channel; the site confirms the schema fingerprint it prints with the coordinator by a
second one. The file is TOML::

    # Candor invite: give this file to the site. It holds nothing secret.
    [candor-invite]
    version = 1                  # INVITE_VERSION; a reader refuses any other
    federation = "cardio"        # the federation's name
    site = "st-marys"            # the site it was made for
    server = "fl.example.org:9092"   # HOST:PORT the site dials
    min-rows = 20                # fewest usable rows a site may train on (run config min-rows)
    schema-sha256 = "..."        # Schema.sha256() of `schema`: a check against alteration
    ca-certificate = "-----BEGIN CERTIFICATE-----..."   # the federation's CA (PEM)
    schema = "..."               # the federation's schema, as TOML text

During a CA rotation (``candor-server rotate-certs --new-ca``) ``ca-certificate`` holds
two CA certificates, old then new (a PEM bundle, as OpenSSL reads one): a site that
imported it accepts the server before and after the switch to the new CA. The format
and its version do not change: the entry was always PEM text, and every TLS stack
Candor and Flower use reads a bundle from it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509

from .atomic import write_atomic
from .certificates import parse_pem_certificates
from .errors import SiteError
from .schema import Schema

__all__ = ["INVITE_VERSION", "Invite"]

INVITE_VERSION = 1
_TABLE = "candor-invite"
_HEADER = "# Candor invite: give this file to the site. It holds nothing secret.\n"
_ASK = "ask the coordinator for a fresh invite (`candor-server invite`)"


@dataclass(frozen=True)
class Invite:
    """What a site needs to join: where the server is, whom to trust, what data to hold.

    Attributes:
        federation: the federation's name.
        site: the site the invite was made for ("" in an invite that names none).
        server: ``HOST:PORT`` the site dials.
        min_rows: fewest usable rows a site may train on (run config ``min-rows``).
        schema: the federation's data contract.
        ca_certificate: the federation's CA certificate, PEM text (public); during a CA
            rotation, two (old and new), one after the other.
    """

    federation: str
    site: str
    server: str
    min_rows: int
    schema: Schema
    ca_certificate: str

    def __post_init__(self) -> None:
        if not isinstance(self.schema, Schema):
            raise TypeError(f"Invite.schema must be a Schema; got {type(self.schema).__name__}")
        if not isinstance(self.min_rows, int) or isinstance(self.min_rows, bool):
            raise TypeError(f"Invite.min_rows must be an int; got {self.min_rows!r}")

    def ca_certificates(self) -> list[x509.Certificate]:
        """The CA certificate(s) of ``ca_certificate`` (two during a CA rotation)."""
        return parse_pem_certificates(self.ca_certificate.encode())

    def write(self, path: Path) -> None:
        """Write the invite atomically to ``path`` (parent folders are created)."""
        doc = {_TABLE: {
            "version": INVITE_VERSION,
            "federation": self.federation,
            "site": self.site,
            "server": self.server,
            "min-rows": self.min_rows,
            "schema-sha256": self.schema.sha256(),
            "ca-certificate": self.ca_certificate,
            "schema": tomli_w.dumps(self.schema.to_dict()),
        }}
        write_atomic(path, _HEADER + tomli_w.dumps(doc))

    @classmethod
    def read(cls, path: Path) -> Invite:
        """Read and check an invite file.

        Raises:
            SiteError: the file is missing, not an invite, of another version, its CA
                certificate is not PEM, or its schema does not match its fingerprint.
            SchemaError: the schema in it breaks the schema format.
        """
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())[_TABLE]
            version = int(doc["version"])
            ca_pem, schema_text, server = str(doc["ca-certificate"]), str(doc["schema"]), str(doc["server"])
            schema_doc = tomllib.loads(schema_text)
            min_rows = int(doc.get("min-rows", 20))
        except FileNotFoundError:
            raise SiteError(f"invite file {path} not found; give the path of the file the coordinator sent "
                            "(written by `candor-server invite`)") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
            raise SiteError(f"{path} is not a Candor invite ({err}); ask the coordinator for the file "
                            "written by `candor-server invite`") from None
        if version != INVITE_VERSION:
            raise SiteError(f"{path} is a version-{version} invite; this candor-client reads version "
                            f"{INVITE_VERSION}: ask the coordinator for an invite written by the same Candor version")
        _check_ca_pem(ca_pem, path)
        schema = Schema.from_dict(schema_doc, source=f"{path} (schema)")
        if doc.get("schema-sha256") and schema.sha256() != doc["schema-sha256"]:
            raise SiteError(f"{path}: the schema does not match its own fingerprint; the file was altered: {_ASK}")
        return cls(federation=str(doc.get("federation", "")), site=str(doc.get("site", "")), server=server,
                   min_rows=min_rows, schema=schema, ca_certificate=ca_pem)


def _check_ca_pem(ca_pem: str, path: Path) -> None:
    """Refuse a ``ca-certificate`` entry that is not one or more complete PEM CA certificates.

    Raises:
        SiteError: no certificate, a damaged or truncated one, a private key, or a
            certificate that is not a CA's.
    """
    if "PRIVATE KEY" in ca_pem:
        raise SiteError(f"{path}: the 'ca-certificate' entry holds a private key, which must never leave the "
                        f"coordinator; do not use this file, and {_ASK}")
    try:
        certs = parse_pem_certificates(ca_pem.encode())
    except ValueError as err:
        raise SiteError(f"{path}: the 'ca-certificate' entry is not a PEM certificate ({err}); {_ASK}") from None
    blocks = len(certs)
    for number, cert in enumerate(certs, 1):
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            which = "" if blocks == 1 else f" (certificate {number} of {blocks})"
            raise SiteError(f"{path}: the 'ca-certificate' entry{which} is not a CA certificate "
                            f"({cert.subject.rfc4514_string()}); {_ASK}")
