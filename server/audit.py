"""The run's audit trail: ``audit.jsonl`` in the run directory, signed by the coordinator.

Format (hash chain, Ed25519 signatures, strict reader): :mod:`common.auditlog`. Entries:

- ``start``: the Candor run id (``common.names.RUN_ID_KEY``, the same across a resumed
  run) and the Flower run id, the resolved run config, the app's hash ``app_sha256``
  (:mod:`common.app_hash`, the definition every site checks the code it runs against;
  ``code_sha256`` holds the same value, under the name older logs and the model card
  use), the schema's sha256, the initial model's hash, and the signing key (fingerprint,
  and whether it is ephemeral);
- ``round``, one per round (written by :class:`~candor.server.audited.AuditedStrategy`,
  the outermost layer of the run's strategy): the hash of the model sent, every update
  received (site, ``common.hashing.hash_arrays`` of the update, the privacy spending and
  mechanism the site reported), the sites aggregated, the updates rejected by the checks
  (``server.checks``) and the refusals, whether secure aggregation hid the individual
  updates (then only the aggregate's hash is known, the same ``hash_arrays`` value as
  ``secure_aggregation.json``'s ``aggregate_sha256``), and the resulting global model's
  hash;
- ``resume``, where an interrupted run continued (``candor-server run --resume``): the
  round it continues after, the global model it continues from (the checkpoint's), the
  new Flower run id, and the entries after the checkpoint (``abandoned``: a round whose
  entry was written before the coordinator died, but whose checkpoint was not; it is
  run again, and both attempts stay on the record);
- ``final``: the final model's hash, the sha256 of every file the run publishes (model,
  exports, model card) and each site's privacy (ε, δ, accountant, mechanism history,
  explanation release included).

Durability: every append rewrites the whole file with :func:`common.atomic.write_atomic`
(temp file, fsync, rename, fsync of the directory): after ``kill -9`` at any instant the
file is the log before or after the append, never a torn line, so the reader can be
strict. A log is a few kB per round; rewriting it costs nothing next to a round.

Key (run-config ``audit-key``): the path of the coordinator's Ed25519 private key (PEM,
PKCS#8, unencrypted, mode 0600; :func:`write_private_key` creates one), or ``""``: an
ephemeral key generated for this run. So that an interrupted run can resume and go on
signing the same log, the ephemeral key is kept in the run directory
(``audit_key.resume.pem``, mode 0600) until the run's final entry, and then deleted: it
is never published, and after the run no one holds it. Its public key is
always written beside the log (``audit_public_key.pem``). An ephemeral key proves that
the log was not changed after the run, to whoever trusts the public key they were given
with it; a long-lived key whose fingerprint the coordinator publishes proves more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ArrayRecord, Message

from candor.common.app_hash import HASH_VERSION, installed_release
from candor.common.atomic import json_safe, write_atomic
from candor.common.auditlog import GENESIS, AuditLogError, entry_hash, key_fingerprint, load_public_key, read_log, sign_entry
from candor.common.config import RunConfig
from candor.common.errors import ConfigError, ModelFileError
from candor.common.hashing import canonical_json, hash_arrays, sha256_file
from candor.common.model_file import MODEL_FILE, ModelFile
from candor.common.schema import Schema

from .outputs import site_of

__all__ = ["AUDIT_LOG", "PUBLIC_KEY", "RESUME_KEY", "AuditLog", "forget_resume_key", "keep_resume_key",
           "resume_key", "describe_update", "load_private_key",
           "public_pem", "verify_run", "write_private_key"]

logger = logging.getLogger(__name__)

AUDIT_LOG = "audit.jsonl"
PUBLIC_KEY = "audit_public_key.pem"
RESUME_KEY = "audit_key.resume.pem"  # an ephemeral key, kept until the run's final entry
_PRIVACY_METRICS = {"epsilon": "epsilon", "delta": "delta", "noise-multiplier": "noise_multiplier",
                    "sample-rate": "sample_rate", "steps": "steps"}


# --- keys ---------------------------------------------------------------------------------

def load_private_key(path: str) -> tuple[Ed25519PrivateKey, bool]:
    """``(key, ephemeral)`` for run-config ``audit-key`` (``""``: a new ephemeral key).

    Raises:
        ConfigError: the file is missing, unreadable, encrypted, or not an Ed25519 key.
    """
    if not path:
        return Ed25519PrivateKey.generate(), True
    file = Path(path).expanduser()
    fix = ("Give the coordinator's audit key (an unencrypted Ed25519 PEM; `candor-server init` creates "
           "one) or audit-key=\"\" for an ephemeral key for this run only.")
    try:
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"The 'audit-key' parameter names {file}, which does not exist. {fix}") from None
    except TypeError:
        raise ConfigError(f"The 'audit-key' file {file} is password-protected; the server must read it "
                          f"unattended. {fix}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"The 'audit-key' file {file} is not a PEM private key ({err}). {fix}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"The 'audit-key' file {file} holds a {type(key).__name__}; the audit key must be "
                          f"Ed25519. {fix}")
    if file.stat().st_mode & 0o077:
        logger.warning("%s: the audit key is readable by other users; `chmod 600 %s`", file, file)
    return key, False


def write_private_key(path: str | Path) -> Ed25519PublicKey:
    """Create a new Ed25519 audit key at ``path`` (PEM PKCS#8, mode 0600, atomic); never
    overwrites. Returns its public key."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} exists; an audit key is never overwritten (move it away first)")
    key = Ed25519PrivateKey.generate()
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    return key.public_key()


def keep_resume_key(run_dir: str | Path, key: Ed25519PrivateKey) -> None:
    """Keep the run's ephemeral ``key`` in ``run_dir`` (mode 0600) until :func:`forget_resume_key`."""
    write_atomic(Path(run_dir) / RESUME_KEY, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)


def forget_resume_key(run_dir: str | Path) -> None:
    (Path(run_dir) / RESUME_KEY).unlink(missing_ok=True)


def resume_key(run_dir: str | Path, audit_key: str) -> tuple[Ed25519PrivateKey, bool]:
    """``(key, ephemeral)`` that signs the resumed run in ``run_dir``: the coordinator's
    key file ``audit_key``, or the ephemeral key the run kept.

    Raises:
        ConfigError: the run had an ephemeral key and it is gone.
    """
    if audit_key:
        return load_private_key(audit_key)
    path = Path(run_dir) / RESUME_KEY
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the run was signed with an ephemeral key kept there until the run "
                          "ended, and without it the audit log cannot be continued. Start a new run")
    return load_private_key(str(path))[0], True


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- writing --------------------------------------------------------------------------------

class AuditLog:
    """The append-only signed log of one run, in ``run_dir``."""

    def __init__(self, run_dir: str | Path, key: Ed25519PrivateKey, *, ephemeral: bool, _resumed: bool = False) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / AUDIT_LOG
        self._key = key
        self.ephemeral = ephemeral
        self.fingerprint = key_fingerprint(key.public_key())
        self.entries: list[dict[str, Any]] = []
        self._text = ""
        if _resumed:
            return
        if self.path.exists():
            logger.warning("%s: replacing the audit log of an earlier run in this directory", self.path)
        write_atomic(self.dir / PUBLIC_KEY, public_pem(key.public_key()))
        if ephemeral:
            keep_resume_key(self.dir, key)

    @classmethod
    def resume(cls, run_dir: str | Path, key: Ed25519PrivateKey, *, ephemeral: bool, checkpoint_entries: int,
               checkpoint_head: str, after_round: int, global_model_sha256: str, flower_run_id: str) -> AuditLog:
        """The log of the interrupted run in ``run_dir``, verified with ``key``'s public key,
        with a ``resume`` entry appended.

        Raises:
            AuditLogError: the log is not intact, is signed with another key, or does not
                contain the checkpoint's entries.
        """
        log = cls(run_dir, key, ephemeral=ephemeral, _resumed=True)
        entries = read_log(log.path, key.public_key())
        if len(entries) < checkpoint_entries or (
                entry_hash(entries[checkpoint_entries - 1]) if checkpoint_entries else GENESIS) != checkpoint_head:
            raise AuditLogError(f"{log.path}: does not contain the {checkpoint_entries} entries the checkpoint was "
                                "written after; the run cannot be continued on this log")
        if entries[-1]["kind"] == "final":
            raise ConfigError(f"{log.path}: the run finished (the log ends with its final entry); there is nothing "
                              "to resume")
        log.entries = entries
        log._text = log.path.read_text(encoding="utf-8")
        abandoned = [{"seq": e["seq"], "kind": e["kind"], "round": e["body"].get("round")}
                     for e in entries[checkpoint_entries:]]
        log.append("resume", {"after_round": after_round, "global_model_sha256": global_model_sha256,
                              "flower_run_id": flower_run_id, "abandoned": abandoned})
        return log

    @property
    def head(self) -> str:
        """Hash of the last entry (what the next entry links to)."""
        return entry_hash(self.entries[-1]) if self.entries else GENESIS

    def append(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        entry = sign_entry(self._key, seq=len(self.entries), prev=self.head, time=time.time(), kind=kind,
                           body=json_safe(body))
        text = self._text + canonical_json(entry) + "\n"
        write_atomic(self.path, text)
        self._text = text
        self.entries.append(entry)
        return entry

    def start(self, *, run_id: str, cfg: RunConfig, schema: Schema, initial: ArrayRecord,
              app_sha256: str | None = None, flower_run_id: str | None = None) -> None:
        """Append the ``start`` entry. ``app_sha256``: the app hash of the FAB the run was
        submitted with, if the caller knows it (``common.app_hash.submitted_app_sha256(
        grid.run)``); by default the Candor release installed here, whose
        ``candor.server.app`` is the ServerApp that runs."""
        app = app_sha256 or installed_release().sha256
        self.append("start", {
            "run_id": run_id,
            "flower_run_id": flower_run_id,
            "run_config": cfg.to_run_config(),
            "app_sha256": app,
            "code_sha256": app,
            "code_files": f"{HASH_VERSION}: candor.common.app_hash (docs/deployment.md, Code approval at the site)",
            "schema_sha256": schema.sha256(),
            "initial_model_sha256": hash_arrays(initial),
            "audit_key": {"algorithm": "ed25519", "sha256": self.fingerprint, "ephemeral": self.ephemeral},
        })

    def round(self, server_round: int, *, sent_model_sha256: str, updates: list[dict[str, Any]],
              rejected: list[dict[str, Any]], refusals: list[dict[str, Any]], global_model_sha256: str,
              secure_aggregation: bool, aggregate_sha256: str | None = None) -> None:
        """Append the ``round`` entry. ``updates`` are :func:`describe_update` of every reply
        without an error, rejected ones included; ``rejected`` and ``refusals`` are the run
        recorder's lists for the round. With ``secure_aggregation`` no update hash is kept
        (none was seen) and ``aggregate_sha256`` pins the secure aggregate instead."""
        updates = sorted(({**u} for u in updates), key=lambda u: u["site"])
        rejected_sites = {r["site"] for r in rejected}
        body: dict[str, Any] = {
            "round": server_round,
            "sent_model_sha256": sent_model_sha256,
            "secure_aggregation": secure_aggregation,
            "sites": [u["site"] for u in updates if u["site"] not in rejected_sites],
            "updates": updates,
            "rejected": rejected,
            "refusals": refusals,
            "global_model_sha256": global_model_sha256,
        }
        if secure_aggregation:
            for u in updates:
                u.pop("sha256", None)
            body["aggregate_sha256"] = aggregate_sha256
        self.append("round", body)

    def final(self, *, model_sha256: str, files: Iterable[str], privacy: dict[str, Any]) -> None:
        self.append("final", {
            "model_sha256": model_sha256,
            "files": {name: sha256_file(self.dir / name) for name in sorted(files)},
            "privacy": {site: {k: p.get(k) for k in ("epsilon", "delta", "accountant", "history", "releases")
                               if k in p} for site, p in privacy.get("sites", {}).items()},
        })


def describe_update(msg: Message) -> dict[str, Any]:
    """What the log keeps of one training reply: site, ``hash_arrays`` of its update (or
    ``None`` if it carries no single ArrayRecord), and the privacy it reported."""
    arrays = list(msg.content.array_records.values())
    metrics = next(iter(msg.content.metric_records.values()), {})
    ident = msg.content.config_records.get("candor", {})
    privacy = {name: metrics[key] for key, name in _PRIVACY_METRICS.items() if key in metrics}
    if privacy and "accountant" in ident:
        privacy["accountant"] = str(ident["accountant"])
    return {"site": site_of(msg), "sha256": hash_arrays(arrays[0]) if len(arrays) == 1 else None,
            "privacy": privacy or None}


# --- verifying ------------------------------------------------------------------------------

def verify_run(run_dir: str | Path, *, public_key: str | Path | None = None) -> dict[str, Any]:
    """Check the run directory (or published bundle) ``run_dir`` against its audit log.

    Checks every entry's text, link and signature (with ``public_key``, default the
    directory's ``audit_public_key.pem``); that each round started from the previous
    round's global model; that the log ends with a ``final`` entry; that every file the
    final entry names is present with the recorded sha256; and that ``model.pt`` holds the
    last round's global model. Returns a summary.

    Raises:
        AuditLogError: naming the entry (and file) that fails.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditLogError(f"{run_dir}: not a directory; give a run directory or a published bundle")
    key = load_public_key(Path(public_key) if public_key else run_dir / PUBLIC_KEY)
    log = run_dir / AUDIT_LOG
    entries = read_log(log, key)
    start = entries[0]
    if start["kind"] != "start":
        raise AuditLogError(f"{log}: entry 0 is '{start['kind']}', not 'start'")
    expected = start["body"]["initial_model_sha256"]
    after = {0: expected}  # round -> the global model after it, as recorded
    completed: dict[int, set[str]] = {}
    resumes = 0
    for e in entries[1:]:
        where = f"{log}: entry {e['seq']} ({e['kind']})"
        if e["kind"] == "round":
            if e["body"]["sent_model_sha256"] != expected:
                raise AuditLogError(f"{where}: round {e['body']['round']} sent a model ({e['body']['sent_model_sha256'][:16]}) "
                                    f"that is not the previous global model ({expected[:16]})")
            expected = e["body"]["global_model_sha256"]
            after[e["body"]["round"]] = expected
            completed[e["body"]["round"]] = set(e["body"]["sites"])
        elif e["kind"] == "resume":
            r = e["body"]["after_round"]
            if after.get(r) != e["body"]["global_model_sha256"]:
                raise AuditLogError(f"{where}: the run resumed after round {r} from a model "
                                    f"({e['body']['global_model_sha256'][:16]}) that is not that round's global model "
                                    f"in the log ({str(after.get(r))[:16]})")
            expected = e["body"]["global_model_sha256"]
            for abandoned in [n for n in completed if n > r]:
                del completed[abandoned]  # run again after the resume
            resumes += 1
        elif e["kind"] != "final" or e is not entries[-1]:
            raise AuditLogError(f"{where}: unexpected entry kind here")
    rounds = len(completed)
    sites = set().union(*completed.values()) if completed else set()
    final = entries[-1]
    where = f"{log}: entry {final['seq']} (final)"
    if final["kind"] != "final":
        raise AuditLogError(f"{log}: the last entry ({final['seq']}, {final['kind']}) is not 'final': the run did "
                            "not finish (the log itself is intact up to that entry)")
    if final["body"]["model_sha256"] != expected:
        raise AuditLogError(f"{where}: the final model ({final['body']['model_sha256'][:16]}) is not the last "
                            f"round's global model ({expected[:16]})")
    for name, sha in sorted(final["body"]["files"].items()):
        path = run_dir / name
        if not path.is_file():
            raise AuditLogError(f"{path}: missing; {where} records its sha256")
        actual = sha256_file(path)
        if actual != sha:
            raise AuditLogError(f"{path}: sha256 {actual[:16]} differs from {sha[:16]} recorded in {where}: "
                                "the file is not the one this run produced")
    model = run_dir / MODEL_FILE
    if not model.is_file() or MODEL_FILE not in final["body"]["files"]:
        raise AuditLogError(f"{model}: the model file is missing or not recorded in {where}")
    try:
        state = ModelFile.load(model).state_dict
    except ModelFileError as err:
        raise AuditLogError(f"{err} (recorded in {where})") from None
    if hash_arrays(state) != expected:
        raise AuditLogError(f"{model}: its weights are not the global model recorded in {where}")
    return {"entries": len(entries), "rounds": rounds, "sites": sorted(sites), "run_id": start["body"]["run_id"],
            "key_sha256": key_fingerprint(key), "ephemeral": start["body"]["audit_key"]["ephemeral"], "resumes": resumes,
            "model_sha256": expected, "files": sorted(final["body"]["files"])}
