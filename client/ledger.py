"""The site's privacy ledger: every private round this site ever trained, in every run.

The ledger is the site's own record and the source of truth for its lifetime budget.
It lives in one JSON file, rewritten atomically (``common.atomic``) under an exclusive
``flock`` so that concurrent ClientApp processes of one site serialise. Entries are
only ever appended: a rewrite that would drop or change an existing entry is refused.
ε is never stored as the authority: it is recomputed from the recorded mechanisms
(the lifetime figure by ``candor.common.policy.lifetime_spent``); the value stored beside
each entry is what the site was told at the time, kept for audit.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from candor.common.atomic import write_json_atomic
from candor.common.errors import ConfigError, LedgerError
from candor.common.privacy import MechanismRecord

LEDGER_VERSION = 1


@dataclass(frozen=True)
class LedgerEntry:
    """One private round: the mechanism, the run it belonged to, what it cost."""

    mechanism: MechanismRecord
    accountant: str
    delta: float
    epsilon_run: float  # ε of this run's rounds so far, at the run's δ
    time: float  # UNIX seconds when recorded

    def to_dict(self) -> dict:
        return {**self.mechanism.to_dict(), "accountant": self.accountant, "delta": self.delta,
                "epsilon_run": self.epsilon_run, "time": self.time}

    @classmethod
    def from_dict(cls, d: dict) -> LedgerEntry:
        return cls(MechanismRecord.from_dict(d), str(d["accountant"]), float(d["delta"]),
                   float(d["epsilon_run"]), float(d["time"]))


class Ledger:
    """Append-only privacy ledger at ``path`` (created on first append)."""

    def __init__(self, path: str | os.PathLike, *, site: str) -> None:
        self.path = Path(path)
        self.site = site

    def entries(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        keep = ("It is the record of what this site has spent: nothing will train until it is readable; "
                "restore it from backup; do not delete it.")
        try:
            doc = json.loads(self.path.read_text())
            raw = doc["entries"]
            if not isinstance(raw, list):
                raise TypeError("'entries' is not a list")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"{self.path}: the privacy ledger is unreadable ({err}). {keep}") from None
        entries = []
        for n, item in enumerate(raw):
            try:
                entries.append(LedgerEntry.from_dict(item))
            except (ConfigError, ValueError, KeyError, TypeError) as err:
                raise LedgerError(f"{self.path}: entry {n} (round {item.get('round', '?') if isinstance(item, dict) else '?'}) "
                                  f"is not a valid record ({err}). {keep}") from None
        return entries

    def history(self, *, run_id: str | None = None) -> list[MechanismRecord]:
        return [e.mechanism for e in self.entries() if run_id is None or e.mechanism.run_id == run_id]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the site's ledger lock: check-then-append must not interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with open(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def append(self, entry: LedgerEntry) -> None:
        """Append ``entry`` durably (call while holding :meth:`locked`)."""
        entries = self.entries()
        doc = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "privacy_unit": "one record",
            "entries": [e.to_dict() for e in entries] + [entry.to_dict()],
        }
        write_json_atomic(self.path, doc, mode=0o600)  # the site's record: its owner only


def new_entry(mechanism: MechanismRecord, *, accountant: str, delta: float, epsilon_run: float) -> LedgerEntry:
    return LedgerEntry(mechanism, accountant, delta, epsilon_run, time.time())
