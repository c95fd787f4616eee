"""Before Flower starts: reach the server over TLS and verify it against the federation's CA.

Flower's SuperNode retries a server it cannot reach and logs a wrong CA deep in its
output; this check turns each failure a site can meet (a bad CA file, an unreachable
server, a certificate from another CA or without this host name, an expired server
certificate or CA, a CA the coordinator replaced) into one line that says what to do.

The site's CA file may hold several CA certificates (during the coordinator's CA
rotation, the old and the new one): the server is accepted if any of them signed its
certificate. To tell an expired server certificate from an expired CA, and a new CA of
the same federation from a stranger's, the check reads the certificate the server
presents a second time, without verifying it, only to name what is wrong.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from candor.common.certificates import day, parse_pem_certificates
from candor.common.errors import ConfigError, ConnectionFailed, KeyFileError

__all__ = ["CONNECT_TIMEOUT", "check_server", "split_address"]

CONNECT_TIMEOUT = 10.0  # seconds to wait for the server's TCP and TLS handshake
# OpenSSL's verify codes (ssl.SSLCertVerificationError.verify_code; openssl/x509_vfy.h)
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64
_NEW_INVITE = "`candor-client start SITE_DIR --invite NEW_INVITE --data PATH`"


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:9092``).

    Raises:
        ConfigError: ``address`` is not HOST:PORT.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"the server address {address!r} must be HOST:PORT (e.g. fl.hospital.org:9092); "
                          "pass --server HOST:PORT, or join again with the coordinator's invite")
    return host.strip("[]"), int(port)


def _unreadable(ca_cert: Path, reason: object) -> KeyFileError:
    return KeyFileError(f"the federation's CA certificate {ca_cert} is not a readable PEM certificate "
                        f"({reason}); it comes from the coordinator's invite: import it again with "
                        "`candor-client start SITE_DIR --invite FILE --data PATH`")


def trusted_cas(ca_cert: Path) -> list[x509.Certificate]:
    """The CA certificate(s) of the site's CA file (a bundle during a CA rotation)."""
    try:
        return parse_pem_certificates(ca_cert.read_bytes())
    except OSError as err:
        raise _unreadable(ca_cert, err.strerror or err) from None
    except ValueError as err:
        raise _unreadable(ca_cert, err) from None


def _tls_context(ca_cert: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (ssl.SSLError, OSError) as err:
        raise _unreadable(ca_cert, getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)) from None


def _presented(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The certificate the server presents, unverified (only to name what is wrong with it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def _federation(name: x509.Name) -> str | None:
    """The federation a Candor CA name belongs to (its OU; a CA made before Candor wrote
    one names it in its CN, ``Candor CA for NAME``), or None for any other name."""
    if [a.value for a in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] != ["Candor"]:
        return None
    if units := name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        return str(units[0].value)
    cn = [str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]
    match = re.fullmatch(r"Candor CA for (.+?)( \(\d{4}-\d\d-\d\d \d\d:\d\d\))?", cn[0]) if cn else None
    return match.group(1) if match else None


def _verify_failure(err: ssl.SSLCertVerificationError, *, address: str, host: str, port: int, ca_cert: Path,
                    timeout: float) -> ConnectionFailed:
    """One line for a certificate the site refused: what is wrong and what to do."""
    code, reason = err.verify_code, err.verify_message
    if code in (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH) or "match" in str(reason):
        return ConnectionFailed(f"the server's certificate is not valid for '{host}' ({reason}): dial a name the "
                                "coordinator gave (--server HOST:PORT) or ask for a certificate with this name "
                                "(`candor-server init --host`)")
    now = dt.datetime.now(dt.timezone.utc)
    presented = _presented(host, port, timeout)
    trusted = trusted_cas(ca_cert)
    if code == X509_V_ERR_CERT_HAS_EXPIRED:
        if presented is not None and presented.not_valid_after_utc <= now:
            return ConnectionFailed(f"the server's certificate at {address} expired on "
                                    f"{day(presented.not_valid_after_utc)}: ask the coordinator to renew it "
                                    "(`candor-server rotate-certs FED_DIR` and a restart of the server); this site "
                                    "needs nothing new, start it again afterwards")
        expired = [c for c in trusted if c.not_valid_after_utc <= now]
        if expired:
            return ConnectionFailed(f"the federation's CA certificate in {ca_cert} expired on "
                                    f"{day(expired[0].not_valid_after_utc)}: ask the coordinator for the new invite "
                                    f"(a new CA: `candor-server rotate-certs FED_DIR --new-ca`) and import it: "
                                    f"{_NEW_INVITE}")
        return ConnectionFailed(f"a certificate of the server at {address} has expired ({reason}): ask the "
                                "coordinator to renew it (`candor-server rotate-certs FED_DIR`)")
    if code == X509_V_ERR_CERT_NOT_YET_VALID:
        since = f" (valid from {presented.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)" if presented is not None else ""
        return ConnectionFailed(f"the server's certificate at {address} is not valid yet{since}: this machine's "
                                f"clock ({now:%Y-%m-%d %H:%M} UTC) is probably behind; set it right (NTP) and start "
                                "again")
    ours = {_federation(c.subject) for c in trusted} - {None}
    theirs = _federation(presented.issuer) if presented is not None else None
    if theirs is not None and theirs in ours:
        return ConnectionFailed(f"the server at {address} presented a certificate from a new CA of federation "
                                f"'{theirs}' that the CA certificate(s) this site trusts ({ca_cert}) did not sign: "
                                "the coordinator changed the federation's CA; ask the coordinator for the new invite "
                                f"and import it: {_NEW_INVITE}")
    return ConnectionFailed(f"the server at {address} presented a certificate that the federation's CA "
                            f"({ca_cert}) did not sign ({reason}): this invite belongs to another federation, "
                            "the coordinator changed the CA, or someone is intercepting the connection; ask the "
                            f"coordinator for the new invite and import it: {_NEW_INVITE}")


def check_server(address: str, ca_cert: Path, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Open a TLS connection to the server at ``address``, verifying it against ``ca_cert``.

    Args:
        ca_cert: the site's CA file: one PEM CA certificate, or several (a bundle).
        timeout: seconds for the connection and the handshake.

    Raises:
        ConfigError: ``address`` is not HOST:PORT.
        KeyFileError: ``ca_cert`` is missing, truncated or not PEM.
        ConnectionFailed: one line for each failure a site can meet: unreachable server,
            a certificate from another CA or from a new CA of the same federation, a
            certificate without this host name, an expired server certificate or CA, a
            server certificate not valid yet (this machine's clock).
    """
    host, port = split_address(address)
    trusted_cas(ca_cert)
    context = _tls_context(ca_cert)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise _verify_failure(err, address=address, host=host, port=port, ca_cert=ca_cert, timeout=timeout) from None
    except ssl.SSLError as err:
        raise ConnectionFailed(f"TLS with the server at {address} failed ({err.reason or err}); is that port the "
                               "Candor server's? Check --server HOST:PORT with the coordinator") from None
    except socket.gaierror:
        raise ConnectionFailed(f"cannot resolve the server's host name '{host}'; check the address "
                               f"({address}) or the machine's DNS") from None
    except (ConnectionRefusedError, TimeoutError, OSError) as err:
        reason = "connection refused" if isinstance(err, ConnectionRefusedError) else (
            "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err)))
        raise ConnectionFailed(f"cannot reach the Candor server at {address} ({reason}): is `candor-server start` "
                               "running there, and is the port open to this machine?") from None
