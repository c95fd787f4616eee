"""The site's receipts: what it received from the coordinator and what it sent back.

One JSON object per line, in a file beside the site's ledger (:func:`receipts_path`)::

    {"site": "hospital-1", "run_id": "run-...", "flower_run_id": "...", "round": 2, "kind": "train",
     "app_sha256": "...", "received_model_sha256": "...", "sent_update_sha256": "...", "time": 1795914228.4}

``run_id`` is the Candor run id (:data:`common.names.RUN_ID_KEY`, one across a resumed
run), ``flower_run_id`` the Flower run that carried the message. A repeated request for
an already-charged round (a resumed run) gets a second receipt, ``"resent": true``.

``kind`` is ``"train"`` (the update sent: ``sent_update_sha256``) or ``"evaluate"`` (no
update). Model hashes are :func:`common.hashing.hash_arrays`, the function the
coordinator's audit log uses, so ``candor-client audit`` can match the two;
``app_sha256`` is the app hash (:mod:`common.app_hash`) of the code that handled the
message, as the site's guard verified it (``running_app_sha256``). Like the ledger, the file
is only appended to, by rewriting it atomically (``common.atomic``) under an exclusive
``flock``: concurrent ClientApp processes of one site serialise, and ``kill -9`` leaves
the file before or after an append.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message

from candor.common.app_hash import running_app_sha256
from candor.common.atomic import write_atomic
from candor.common.errors import SiteError
from candor.common.hashing import hash_arrays
from candor.common.names import run_id_of

from .site import SiteSpec


def receipts_path(ledger_path: str | Path) -> Path:
    """``DIR/receipts.jsonl`` for ``DIR/ledger.json`` (a deployed site);
    ``DIR/NAME.receipts.jsonl`` for ``DIR/NAME.json`` (a simulated site)."""
    ledger = Path(ledger_path)
    return ledger.with_name("receipts.jsonl" if ledger.name == "ledger.json" else f"{ledger.stem}.receipts.jsonl")


def ledger_path_for(receipts: str | Path) -> Path:
    """The ledger beside a receipts file (inverse of :func:`receipts_path`)."""
    path = Path(receipts)
    if path.name == "receipts.jsonl":
        return path.with_name("ledger.json")
    return path.with_name(path.name.removesuffix(".receipts.jsonl") + ".json")


def read_receipts(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise SiteError(f"{path}: the receipts file is unreadable ({err}); restore it from backup") from None
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise SiteError(f"{path}, line {n}: not a receipt (invalid JSON); the file was edited or damaged; "
                              "restore it from backup") from None
        out.append(entry)
    return out


def append_receipt(path: str | Path, entry: dict[str, Any]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                text = path.read_text(encoding="utf-8") if path.exists() else ""
                write_atomic(path, text + json.dumps(entry, sort_keys=True) + "\n", mode=0o600)  # the site's own
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as err:
        raise SiteError(f"{path}: cannot write the site's receipt ({err}); free space or fix permissions "
                          "on the site directory") from None


def record_receipt(spec: SiteSpec, msg: Message, *, kind: str, sent: ArrayRecord | None = None,
                   resent: bool = False) -> None:
    """Append the receipt of handling ``msg`` (and of sending ``sent``; ``resent``: the
    update kept from an earlier request for the same round) to the site's file."""
    entry = {"site": spec.name, "run_id": run_id_of(msg), "flower_run_id": str(msg.metadata.run_id),
             "round": int(msg.content["config"]["server-round"]), "kind": kind, "app_sha256": running_app_sha256(),
             "received_model_sha256": hash_arrays(msg.content["arrays"]), "time": time.time()}
    if sent is not None:
        entry["sent_update_sha256"] = hash_arrays(sent)
    if resent:
        entry["resent"] = True
    append_receipt(receipts_path(spec.ledger_path), entry)
