"""The site's node key: how the Candor server recognises this institution.

Flower's SuperNode authentication uses an ECDSA P-384 key pair in OpenSSH format. The
private key is generated here, written atomically with mode 0600, and never leaves
the machine; the public key (one ``ecdsa-sha2-nistp384 ...`` line) is what the site
sends to the coordinator, who registers it with ``candor-server add-site``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from candor.common.atomic import write_atomic
from candor.common.errors import CandorError

__all__ = ["create_node_key", "fingerprint", "load_private_key"]


def create_node_key(private_path: Path, public_path: Path, *, comment: str) -> str:
    """Write a new P-384 key pair; returns the public key line.

    Raises:
        CandorError: a key file exists already (a site's key is never replaced silently).
    """
    for path in (private_path, public_path):
        if path.exists():
            raise CandorError(f"{path} exists already: refusing to replace this site's key")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}".strip()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_path.parent, 0o700)
    write_atomic(private_path, private, mode=0o600)
    write_atomic(public_path, line + "\n", mode=0o644)
    return line


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load and check the site's private key as the SuperNode will.

    Raises:
        CandorError: missing, unreadable, not a P-384 key, or readable by other users.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CandorError(f"cannot read the site's private key {path} ({err.strerror}); "
                          "create one with `candor-client init`") from None
    if path.stat().st_mode & 0o077:
        raise CandorError(f"the site's private key {path} is readable by other users "
                          f"(mode {path.stat().st_mode & 0o777:o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise CandorError(f"{path} is not an unencrypted OpenSSH private key ({err}); "
                          "create a new one with `candor-client init` in a new directory") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise CandorError(f"{path} is not an ECDSA P-384 key, which Flower's node authentication requires")
    return key


def fingerprint(public_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line (as ``ssh-keygen -l``)."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
