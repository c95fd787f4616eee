"""The site's outbox: the last reply it charged in each run, kept to answer a repeat.

A resumed run (``candor-server run --resume``, ``candor-sim run --resume``) asks the sites
again for the round it was in when the coordinator died. A site that had already trained
that round has already paid for it (its ledger holds the round), and the reply may or may
not have arrived. Training again would be a second release of the same round, charged
twice or, worse, not at all. Sending the reply it already released is neither: it is the
same output of the same mechanism (post-processing costs no privacy), and it keeps a
resumed run identical to one that was never interrupted.

So, under the ledger's lock, before the round is appended to the ledger, the site writes
the reply it is about to send to ``OUTBOX/<run id>-<kind>.pt`` (``kind``: ``train`` or
``explain``; one file each, the latest round; atomic, mode 0600) beside the ledger. A
request for a round the ledger already holds for this run is answered from it when the
kept reply is for that round and was computed from the same model (its hash); otherwise
the site refuses that round, with the reason, and charges nothing. The order (outbox,
then ledger, then send) means a kept reply without a ledger entry was never sent: it is
simply replaced.

The file holds tensors, numbers and strings only, read back with
``torch.load(weights_only=True)``: nothing in it can execute code.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from candor.common.atomic import write_atomic
from candor.common.errors import SiteError

__all__ = ["KeptReply", "Outbox", "outbox_dir"]

OUTBOX_VERSION = 1


def outbox_dir(ledger_path: str | os.PathLike) -> Path:
    """The outbox of the site whose ledger is ``ledger_path`` (``ledger.json`` →
    ``ledger.outbox/``)."""
    path = Path(ledger_path)
    return path.with_name(path.stem + ".outbox")


@dataclass(frozen=True)
class KeptReply:
    """One reply as it was sent: for ``round`` of ``run_id``, computed from the model whose
    ``common.hashing.hash_arrays`` is ``received_sha256``."""

    run_id: str
    kind: str
    round: int
    received_sha256: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    arrays: dict[str, torch.Tensor] | None = None

    def array_record(self) -> ArrayRecord:
        return ArrayRecord(self.arrays or {})


class Outbox:
    """The kept replies of the site whose ledger is ``ledger_path``."""

    def __init__(self, ledger_path: str | os.PathLike) -> None:
        self.dir = outbox_dir(ledger_path)

    def _path(self, run_id: str, kind: str) -> Path:
        return self.dir / f"{run_id}-{kind}.pt"

    def keep(self, reply: KeptReply) -> None:
        """Write ``reply`` durably, replacing the run's previous one of its kind (call under
        the ledger's lock, before the ledger entry)."""
        buffer = io.BytesIO()
        torch.save({"version": OUTBOX_VERSION, "run_id": reply.run_id, "kind": reply.kind, "round": reply.round,
                    "received_sha256": reply.received_sha256, "metrics": dict(reply.metrics),
                    "config": dict(reply.config), "arrays": reply.arrays}, buffer)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self._path(reply.run_id, reply.kind), buffer.getvalue(), mode=0o600)

    def kept(self, run_id: str, kind: str) -> KeptReply | None:
        """The reply kept for ``run_id`` and ``kind``, or ``None`` if there is none.

        Raises:
            SiteError: the file exists but is not a reply this code wrote.
        """
        path = self._path(run_id, kind)
        if not path.exists():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d.get("version") != OUTBOX_VERSION:
                raise ValueError(f"version {d.get('version')!r}, expected {OUTBOX_VERSION}")
            return KeptReply(run_id=str(d["run_id"]), kind=str(d["kind"]), round=int(d["round"]),
                             received_sha256=str(d["received_sha256"]), metrics=dict(d["metrics"]),
                             config=dict(d["config"]), arrays=d["arrays"])
        except Exception as err:  # torch raises many types for a damaged file; none may pass as a reply
            raise SiteError(f"{path}: the kept reply is unreadable ({type(err).__name__}: {err}); the round it "
                            "holds is charged in the ledger and will not be sent again. Move the file away to "
                            "let the site skip that round") from None
