"""The site's node key: how the Candor server recognises this institution.

Flower's SuperNode authentication uses an ECDSA P-384 key pair in OpenSSH format. The
private key is generated here, written atomically with mode 0600, and never leaves
the machine; the public key (one ``ecdsa-sha2-nistp384 ...`` line) is what the site
sends to the coordinator, who registers it with ``candor-server add-site``. Its
fingerprint, and the coordinator's reader of that line, are in :mod:`common.node_keys`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from candor.common.atomic import write_atomic
from candor.common.errors import KeyFileError

__all__ = ["create_node_key", "load_private_key"]


def create_node_key(private_path: Path, public_path: Path, *, comment: str) -> str:
    """Write a new P-384 key pair; returns the public key line.

    Raises:
        KeyFileError: a key file exists already (a site's key is never replaced silently).
    """
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists already: refusing to replace this site's key; to replace it, "
                               "run `candor-client new-key SITE_DIR` (it keeps the old key in keys/retired/)")
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
        KeyFileError: missing, unreadable, not a P-384 key, or readable by other users.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"cannot read the site's private key {path} ({err.strerror}); "
                          "create one with `candor-client init`") from None
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"the site's private key {path} is readable by other users "
                          f"(mode {path.stat().st_mode & 0o777:o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path} is not an unencrypted OpenSSH private key ({err}); "
                          "create a new one with `candor-client init` in a new directory") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise KeyFileError(f"{path} is not an ECDSA P-384 key, which Flower's node authentication requires; "
                           "make a new one with `candor-client new-key SITE_DIR`")
    return key

