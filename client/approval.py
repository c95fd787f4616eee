"""Which app code this site runs: its installed Candor release, and what it approved.

A site runs an app (the FAB the coordinator's ``flwr run`` sent) only if the app's hash
(:mod:`candor.common.app_hash`) is

- the hash of the Candor release installed at the site, always (upgrading Candor with
  pip changes it: the site reviewed that release when it installed it), or
- one the site approved explicitly with ``candor-client approve SITE_DIR APP``, recorded
  in ``SITE_DIR/approved_apps.json`` (mode 0600, rewritten atomically under a lock)::

      {"format": "candor-approved-apps", "version": 1, "apps": [
        {"sha256": "...", "approved_at": 1795914228.4, "source": "/path/app.fab",
         "components": {"clientapp": "...", "serverapp": "..."}, "files": 78,
         "differs": {"added": 1, "removed": 0, "changed": 2, "components": 1},
         "installed_sha256": "...", "revoked_at": null}]}

Revoking keeps the entry (with ``revoked_at``): the file is also the site's record of
what it once allowed, which ``candor-client audit`` reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from candor.common.app_hash import AppContent, AppDiff
from candor.common.atomic import write_atomic
from candor.common.errors import SiteError

__all__ = ["APPROVED_APPS", "ApprovedApp", "Approvals"]

APPROVED_APPS = "approved_apps.json"
_FORMAT = "candor-approved-apps"
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class ApprovedApp:
    """One app a site approved (or approved and later revoked)."""

    sha256: str
    approved_at: float
    source: str
    components: dict[str, str]
    files: int
    differs: dict[str, int] = field(default_factory=dict)
    installed_sha256: str = ""  # the site's installed release when it approved
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Approvals:
    """The approved apps of the site directory ``site_dir``."""

    def __init__(self, site_dir: str | Path) -> None:
        self.dir = Path(site_dir)
        self.path = self.dir / APPROVED_APPS

    def entries(self) -> list[ApprovedApp]:
        """Every entry, revoked ones included (none if the file does not exist).

        Raises:
            SiteError: the file is unreadable or not in its format.
        """
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SiteError(f"{self.path}: the site's approved apps are unreadable ({err}); restore the file from "
                            "backup, or delete it and approve the apps again") from None
        try:
            if doc.get("format") != _FORMAT or doc.get("version") != 1:
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            apps = [ApprovedApp(**entry) for entry in doc["apps"]]
            if any(not _is_sha256(a.sha256) for a in apps):
                raise ValueError("an entry's sha256 is not 64 lower-case hex digits")
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise SiteError(f"{self.path}: not a Candor approved-apps file ({err}); restore it from backup, or "
                            "delete it and approve the apps again") from None
        return apps

    def active(self) -> set[str]:
        """The hashes of the apps approved and not revoked."""
        return {a.sha256 for a in self.entries() if a.active}

    def ever(self) -> set[str]:
        """Every hash this site approved at some time, revoked ones included."""
        return {a.sha256 for a in self.entries()}

    def approve(self, app: AppContent, *, source: str, installed: AppContent) -> tuple[ApprovedApp, bool]:
        """Record ``app`` as approved; (entry, whether it is new). Approving a revoked app
        again adds a new entry (the old one stays, revoked)."""
        sha = app.sha256
        with self._locked() as entries:
            for entry in entries:
                if entry.sha256 == sha and entry.active:
                    return entry, False
            diff: AppDiff = app.diff(installed)
            entry = ApprovedApp(sha256=sha, approved_at=time.time(), source=source, components=dict(app.components),
                                files=len(app.files), installed_sha256=installed.sha256,
                                differs={"added": len(diff.added), "removed": len(diff.removed),
                                         "changed": len(diff.changed), "components": len(diff.components)})
            entries.append(entry)
        return entry, True

    def revoke(self, sha256: str) -> ApprovedApp:
        """Revoke the active approval whose hash is ``sha256`` (or starts with it, at
        least 12 digits, if only one does); returns the revoked entry.

        Raises:
            SiteError: no such active approval, or the prefix is ambiguous or too short.
        """
        prefix = sha256.strip().lower()
        if len(prefix) < 12 or not set(prefix) <= _HEX:
            raise SiteError(f"--revoke: give the app's sha256 (at least its first 12 hex digits, as "
                            f"`candor-client approved {self.dir}` lists them); got {sha256!r}")
        with self._locked() as entries:
            found = [i for i, e in enumerate(entries) if e.active and e.sha256.startswith(prefix)]
            if len(found) != 1:
                raise SiteError(f"{self.path}: {'no' if not found else 'more than one'} approved app has sha256 "
                                f"{prefix}...; `candor-client approved {self.dir}` lists them")
            i = found[0]
            entries[i] = ApprovedApp(**{**asdict(entries[i]), "revoked_at": time.time()})
            return entries[i]

    @contextmanager
    def _locked(self) -> Iterator[list[ApprovedApp]]:
        """The entries, for read-modify-write under an exclusive lock; written back (0600,
        atomically) when the block ends without an exception."""
        if not self.dir.is_dir():
            raise SiteError(f"{self.dir} is not a site directory; create it with `candor-client init`")
        with open(os.open(self.dir / f".{APPROVED_APPS}.lock", os.O_RDWR | os.O_CREAT, 0o600)) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = self.entries()
                yield entries
                doc: dict[str, Any] = {"format": _FORMAT, "version": 1, "apps": [asdict(e) for e in entries]}
                write_atomic(self.path, json.dumps(doc, indent=2) + "\n", mode=0o600)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX
