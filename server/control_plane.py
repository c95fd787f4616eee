"""The secrets that close the SuperLink's control plane to everyone but the coordinator.

Flower 1.42 serves its Control API (``flwr run``, ``ls``, ``stop``, ``log``,
``supernode register`` ...) and its Runtime API on the federation port that every site
reaches, and open-source Flower authenticates neither. Candor's launcher
(:mod:`server.superlink_main`) closes both with two secrets, made here:

* **the coordinator's control token**, ``secrets.token_urlsafe(32)`` (256 random bits).
  The server keeps only its SHA-256 (``DIR/state/control-token.sha256``, hex, mode
  0600); the token itself lives in the coordinator's ``flwr`` CLI home,
  ``DIR/flwr/credentials.yaml`` (mode 0600), under the three keys Flower's OIDC CLI
  plugin reads for the connection's address. The stock ``flwr`` CLI then sends it as
  ``Authorization: Bearer <token>`` on every Control API call; nothing else opens the
  Control API.
* **the SuperExec secret**, 32 random bytes (``DIR/state/superexec.secret``, 0600), held
  by the SuperLink and by the SuperExec the launcher starts: only a caller holding it
  can claim a ServerApp task on the Runtime API.

Sites never receive either (an invite holds only public things).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

import tomli_w
import yaml

from candor.common.atomic import write_atomic
from candor.common.errors import KeyFileError

__all__ = ["CREDENTIALS_FILE", "SUPEREXEC_SECRET_FILE", "TOKEN_DIGEST_FILE", "credential_keys", "ensure",
           "new_token", "read_secret", "read_token", "read_token_digest", "token_digest", "token_matches",
           "write_cli_config", "write_superexec_secret", "write_token_digest"]

TOKEN_DIGEST_FILE = "control-token.sha256"  # in DIR/state/
SUPEREXEC_SECRET_FILE = "superexec.secret"  # in DIR/state/
CREDENTIALS_FILE = "credentials.yaml"  # in DIR/flwr/ (FLWR_HOME), Flower's file credential store

# Flower's CLI credential-store keys (flwr/cli/constant.py: AUTHN_TYPE_STORE_KEY,
# ACCESS_TOKEN_STORE_KEY, REFRESH_TOKEN_STORE_KEY); values are base64 (Flower's
# FileCredentialStore). authn-type "oidc" makes `flwr` load both tokens and send the
# access token as a Bearer header.
_AUTHN_TYPE_KEY = "flower.account-auth.{address}.authn-type"
_ACCESS_TOKEN_KEY = "flower.account-auth.{address}.oidc-access-token"
_REFRESH_TOKEN_KEY = "flower.account-auth.{address}.oidc-refresh-token"
_AUTHN_TYPE = "oidc"
# Flower's CLI needs a refresh token to load the pair; the SuperLink refuses every refresh.
_NO_REFRESH = "refresh-refused"


def new_token() -> str:
    """A new coordinator control token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str | bytes) -> bytes:
    """SHA-256 of the token's UTF-8 bytes: what the server keeps instead of the token."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def token_matches(token: str | bytes, digest: bytes) -> bool:
    """True if ``token`` hashes to ``digest`` (constant-time comparison of the digests)."""
    return hmac.compare_digest(token_digest(token), digest)


def credential_keys(address: str) -> tuple[str, str, str]:
    """The credential-store keys (authn type, access token, refresh token) for ``address``,
    which must be the ``address`` string of the connection in ``FLWR_HOME/config.toml``."""
    return (_AUTHN_TYPE_KEY.format(address=address), _ACCESS_TOKEN_KEY.format(address=address),
            _REFRESH_TOKEN_KEY.format(address=address))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_cli_config(flwr_home: Path, *, connection: str, address: str, ca_cert: Path, token: str) -> None:
    """Point the coordinator's ``flwr`` CLI (``FLWR_HOME=flwr_home``) at the SuperLink at
    ``address`` as connection ``connection``, carrying the control token.

    Writes ``config.toml`` and ``credentials.yaml`` (0600, only this address's keys)
    together, so that the two always name the same address.
    """
    flwr_home.mkdir(mode=0o700, exist_ok=True)
    authn, access, refresh = credential_keys(address)
    write_atomic(flwr_home / CREDENTIALS_FILE, yaml.safe_dump({
        authn: _b64(_AUTHN_TYPE), access: _b64(token), refresh: _b64(_NO_REFRESH)}), mode=0o600)
    write_atomic(flwr_home / "config.toml", tomli_w.dumps({"superlink": {
        "default": connection,
        connection: {"address": address, "root-certificates": str(ca_cert)},
    }}))


def read_token(flwr_home: Path) -> str | None:
    """The control token in ``flwr_home/credentials.yaml`` (whatever address it is stored
    under), or None if there is none, or it is unreadable or ambiguous."""
    try:
        doc = yaml.safe_load((flwr_home / CREDENTIALS_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict):
        return None
    tokens = set()
    for key, value in doc.items():
        if isinstance(key, str) and key.startswith("flower.account-auth.") and key.endswith(".oidc-access-token"):
            try:
                tokens.add(base64.b64decode(str(value), validate=True).decode())
            except (ValueError, UnicodeDecodeError):
                return None
    return tokens.pop() if len(tokens) == 1 else None


def write_token_digest(path: Path, token: str) -> None:
    write_atomic(path, token_digest(token).hex() + "\n", mode=0o600)


def read_token_digest(path: Path) -> bytes:
    """The 32-byte digest in ``path`` (64 hex digits).

    Raises:
        KeyFileError: missing, unreadable, writable by others, or not 64 hex digits.
    """
    _check_private(path)
    try:
        digest = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path}: the coordinator's control-token digest is unreadable ({err}); delete it and "
                           "run `candor-server start` to make a new token") from None
    if len(digest) != 32:
        raise KeyFileError(f"{path}: a control-token digest is 64 hex digits (SHA-256); got {len(digest) * 2}. "
                           "Delete it and run `candor-server start` to make a new token")
    return digest


def write_superexec_secret(path: Path) -> None:
    write_atomic(path, secrets.token_bytes(32), mode=0o600)


def read_secret(path: Path) -> bytes:
    """The SuperExec secret (raw bytes, as Flower reads it).

    Raises:
        KeyFileError: missing, unreadable, readable by others, or shorter than 32 bytes.
    """
    _check_private(path)
    try:
        secret = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"{path}: the SuperExec secret is unreadable ({err.strerror})") from None
    if len(secret) < 32:
        raise KeyFileError(f"{path}: the SuperExec secret must be at least 32 bytes; got {len(secret)}. Delete it "
                           "and run `candor-server start` to make a new one")
    return secret


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise KeyFileError(f"{path} is missing; `candor-server start` makes it") from None
    if mode & 0o077:
        raise KeyFileError(f"{path} is open to other users (mode {mode:o}); run `chmod 600 {path}`")


def ensure(state_dir: Path, flwr_home: Path) -> tuple[str, list[str]]:
    """Make sure the federation has both secrets and a matching token/digest pair.

    A federation directory made before the control plane was closed has neither; a
    credentials file that was deleted, or no longer matches the digest, gets a new token
    (the old one stops working). Returns (the token, the names of what was created).
    The caller writes the token into the CLI config for the address it serves on.
    """
    created = []
    secret = state_dir / SUPEREXEC_SECRET_FILE
    if not secret.exists():
        write_superexec_secret(secret)
        created.append("the SuperExec secret")
    digest_path = state_dir / TOKEN_DIGEST_FILE
    token = read_token(flwr_home)
    digest = None
    if digest_path.exists():
        digest = read_token_digest(digest_path)
    if token is None or digest is None or not token_matches(token, digest):
        token = new_token()
        write_token_digest(digest_path, token)
        created.append("the coordinator's control token")
    return token, created
