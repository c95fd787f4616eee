"""A site's node public key, as the site sends it and the coordinator registers it.

Flower's SuperNode authentication uses ECDSA P-384 keys; the public key travels as one
OpenSSH line, ``ecdsa-sha2-nistp384 AAAA... COMMENT`` (``keys/node.pub``, written by
``candor-client init``). Both sides show its fingerprint, which the coordinator confirms
with the site by a second channel before registering it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from .errors import KeyFileError

__all__ = ["fingerprint", "read_public_key"]


def fingerprint(public_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line: ``SHA256:`` and the unpadded
    base64 of the SHA-256 of the key blob (what ``ssh-keygen -lf node.pub`` prints)."""
    parts = public_line.split()
    if len(parts) < 2:
        raise ValueError(f"fingerprint: expected an OpenSSH public key line 'TYPE BASE64 [COMMENT]'; got {public_line!r}")
    blob = base64.b64decode(parts[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_public_key(path: Path) -> str:
    """The OpenSSH ``ecdsa-sha2-nistp384`` public key line in ``path``, checked.

    Returns:
        The line's first three fields (type, key, comment), as Flower registers it.

    Raises:
        KeyFileError: unreadable file, a private key, or not a P-384 public key in OpenSSH format.
    """
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"cannot read the public key file {path} ({err}); give the node.pub file the site "
                           "sent (written by `candor-client init`)") from None
    if "PRIVATE KEY" in text:
        raise KeyFileError(f"{path} is a PRIVATE key: never send or copy it; the site sends its "
                           "public key (node.pub, printed by `candor-client init`)")
    try:
        key = load_ssh_public_key(text.encode())
    except (ValueError, TypeError, IndexError) as err:
        raise KeyFileError(f"{path} is not an OpenSSH public key ({err}); the site's file is the "
                           "one printed by `candor-client init` (one line 'ecdsa-sha2-nistp384 ...')") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise KeyFileError(f"{path} is not an ECDSA P-384 key ('ecdsa-sha2-nistp384 ...'), which Flower's "
                           "node authentication requires; create one with `candor-client init`")
    return " ".join(text.split()[:3])
