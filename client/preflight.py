"""Before Flower starts: reach the server over TLS and verify it against the federation's CA.

Flower's SuperNode retries a server it cannot reach and logs a wrong CA deep in its
output; this check turns each failure a site can meet (a bad CA file, an unreachable
server, a certificate from another CA or without this host name) into one line.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from candor.common.errors import ConfigError, ConnectionFailed, KeyFileError

__all__ = ["CONNECT_TIMEOUT", "check_server", "split_address"]

CONNECT_TIMEOUT = 10.0  # seconds to wait for the server's TCP and TLS handshake


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


def _tls_context(ca_cert: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (ssl.SSLError, OSError) as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)
        raise KeyFileError(f"the federation's CA certificate {ca_cert} is not a readable PEM certificate "
                           f"({reason}); it comes from the coordinator's invite: import it again with "
                           "`candor-client start SITE_DIR --invite FILE --data PATH`") from None


def check_server(address: str, ca_cert: Path, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Open a TLS connection to the server at ``address``, verifying it against ``ca_cert``.

    Args:
        timeout: seconds for the connection and the handshake.

    Raises:
        ConfigError: ``address`` is not HOST:PORT.
        KeyFileError: ``ca_cert`` is missing, truncated or not PEM.
        ConnectionFailed: one line for each failure a site can meet: unreachable server,
            a certificate from another CA, or a certificate without this host name.
    """
    host, port = split_address(address)
    context = _tls_context(ca_cert)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        if "match" in str(err.verify_message) or "hostname" in str(err).lower():
            raise ConnectionFailed(f"the server's certificate is not valid for '{host}' ({err.verify_message}): dial a "
                                   "name the coordinator gave (--server HOST:PORT) or ask for a certificate with this "
                                   "name (`candor-server init --host`)") from None
        raise ConnectionFailed(f"the server at {address} presented a certificate that the federation's CA "
                               f"({ca_cert}) did not sign ({err.verify_message}): this invite belongs to another "
                               "federation, or someone is intercepting the connection; ask the coordinator for "
                               "a fresh invite") from None
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
