"""The audit log format: append-only, hash-chained, Ed25519-signed JSON lines.

Line ``n`` of ``audit.jsonl`` is entry ``n``, the canonical JSON
(:func:`common.hashing.canonical_json`) of::

    {"seq": n, "prev": PREV, "time": UNIX_SECONDS, "kind": "start" | "round" | "final",
     "body": {...}, "sig": SIG}

The entry's *payload* is the canonical JSON of the entry without ``"sig"`` (UTF-8).
``SIG`` is the base64 Ed25519 signature (RFC 8032) of the payload by the coordinator's
audit key; ``PREV`` is the hex SHA-256 of entry ``n - 1``'s payload (64 zeros for entry
0). A reader accepts a line only if it is exactly the canonical form of what it parses
to, so changing any byte breaks the text, a signature or a link, and the reader names
the first entry affected. Both the coordinator (``candor-server audit verify``) and the
sites (``candor-client audit``) read logs through :func:`parse_log`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import CandorError
from .hashing import canonical_json

__all__ = ["GENESIS", "AuditLogError", "entry_hash", "key_fingerprint", "load_public_key", "parse_log",
           "read_log", "sign_entry"]

GENESIS = "0" * 64
_FIELDS = {"seq", "prev", "time", "kind", "body", "sig"}


class AuditLogError(CandorError):
    """An audit log, or a file it vouches for, is not what was signed."""


def _payload(entry: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in entry.items() if k != "sig"}).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """Hex SHA-256 of the entry's payload: what the next entry's ``prev`` holds."""
    return hashlib.sha256(_payload(entry)).hexdigest()


def sign_entry(key: Ed25519PrivateKey, *, seq: int, prev: str, time: float, kind: str,
               body: dict[str, Any]) -> dict[str, Any]:
    entry = {"seq": seq, "prev": prev, "time": time, "kind": kind, "body": body}
    entry["sig"] = base64.b64encode(key.sign(_payload(entry))).decode("ascii")
    return entry


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32-byte Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise AuditLogError(f"{path}: public key file not found; give the audit log's public key "
                            "(audit_public_key.pem from the run directory or bundle)") from None
    except (OSError, ValueError) as err:
        raise AuditLogError(f"{path}: not a PEM public key ({err}); give the audit log's "
                            "audit_public_key.pem") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditLogError(f"{path}: the audit key must be Ed25519; this is a {type(key).__name__}")
    return key


def parse_log(data: bytes, public_key: Ed25519PublicKey, *, source: str = "audit.jsonl") -> list[dict[str, Any]]:
    """Every entry of the log ``data``, after checking each line, link and signature.

    Raises:
        AuditLogError: naming the first entry (0-based; line = entry + 1) that fails.
    """
    if not data:
        raise AuditLogError(f"{source}: the audit log is empty")
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise AuditLogError(f"{source}: entry {len(lines) - 1} (line {len(lines)}) is incomplete: the "
                            "file does not end with a newline (truncated or edited)")
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    for n, raw in enumerate(lines[:-1]):
        where = f"{source}: entry {n} (line {n + 1})"
        try:
            text = raw.decode("utf-8")
            entry = json.loads(text)
        except (UnicodeDecodeError, ValueError) as err:
            raise AuditLogError(f"{where} is not valid JSON ({err}): the log was edited or damaged") from None
        if not isinstance(entry, dict) or set(entry) != _FIELDS or not isinstance(entry["body"], dict):
            raise AuditLogError(f"{where} does not have exactly the fields {sorted(_FIELDS)}: the log was edited")
        try:
            canonical = canonical_json(entry)
        except ValueError:
            canonical = None
        if canonical != text:
            raise AuditLogError(f"{where} is not in canonical form: the line was edited after it was written")
        if entry["seq"] != n:
            raise AuditLogError(f"{where} has sequence number {entry['seq']!r}, expected {n}: entries were "
                                "removed, inserted or reordered")
        if entry["prev"] != prev:
            raise AuditLogError(f"{where}: its link to entry {n - 1} is broken (an earlier entry was changed, "
                                "removed or reordered)")
        try:
            sig = base64.b64decode(str(entry["sig"]), validate=True)
            if base64.b64encode(sig).decode("ascii") != entry["sig"]:
                raise ValueError("non-canonical base64")  # unused bits changed: same bytes, edited text
            public_key.verify(sig, _payload(entry))
        except (InvalidSignature, ValueError):
            raise AuditLogError(
                f"{where} ({entry['kind']}): the signature does not verify with public key "
                f"{key_fingerprint(public_key)[:16]}: the entry was changed after it was signed, or the "
                "key is not the coordinator's") from None
        prev = entry_hash(entry)
        entries.append(entry)
    return entries


def read_log(path: str | os.PathLike, public_key: Ed25519PublicKey) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditLogError(f"{path}: no audit log here; give a run directory, a published bundle, "
                            "or the audit.jsonl file") from None
    except OSError as err:
        raise AuditLogError(f"{path}: cannot read the audit log ({err})") from None
    return parse_log(data, public_key, source=str(path))
