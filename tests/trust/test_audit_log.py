"""The signed, hash-chained audit log: any changed byte fails and names its entry."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord

from candor.common.auditlog import AuditLogError, entry_hash, load_public_key, parse_log, read_log
from candor.common.config import RunConfig
from candor.common.errors import ConfigError
from candor.common.schema import Schema
from candor.server.audit import (AUDIT_LOG, PUBLIC_KEY, RESUME_KEY, AuditLog, forget_resume_key, load_private_key,
                                 verify_run, write_private_key)
from candor.server.trust_cmds import register
from candor.common.demo import DEMO_SCHEMA_PATH


def small_log(tmp_path, key=None) -> AuditLog:
    log = AuditLog(tmp_path, key or Ed25519PrivateKey.generate(), ephemeral=key is None)
    log.start(run_id="42", cfg=RunConfig(), schema=Schema.load(DEMO_SCHEMA_PATH),
              initial=ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}))
    for r in (1, 2):
        log.append("round", {"round": r, "updates": [{"site": "a", "sha256": "ab" * 32, "privacy": {"epsilon": 1.5e-5}}],
                             "global_model_sha256": f"{r}" * 64})
    return log


def line_of(data: bytes, pos: int) -> int:
    return data[:pos].count(b"\n")


def test_every_single_byte_change_fails_and_names_its_entry(tmp_path):
    small_log(tmp_path)
    key = load_public_key(tmp_path / PUBLIC_KEY)
    data = (tmp_path / AUDIT_LOG).read_bytes()
    assert len(parse_log(data, key)) == 3
    for pos in range(len(data)):
        for flip in (0x01, 0x20) if chr(data[pos]).isalpha() else (0x01,):  # 0x20: case, e.g. 1.5e-05 -> 1.5E-05
            mutated = bytearray(data)
            mutated[pos] ^= flip
            with pytest.raises(AuditLogError) as err:
                parse_log(bytes(mutated), key)
            assert f"entry {line_of(data, pos)} (line {line_of(data, pos) + 1})" in str(err.value), (pos, flip)


def test_removed_reordered_or_truncated_entries_fail(tmp_path):
    small_log(tmp_path)
    key = load_public_key(tmp_path / PUBLIC_KEY)
    lines = (tmp_path / AUDIT_LOG).read_bytes().splitlines(keepends=True)
    with pytest.raises(AuditLogError, match=r"entry 1 \(line 2\).*sequence number 2"):
        parse_log(lines[0] + lines[2], key)
    with pytest.raises(AuditLogError, match=r"entry 1 \(line 2\)"):
        parse_log(lines[0] + lines[2] + lines[1], key)
    with pytest.raises(AuditLogError, match=r"entry 2 \(line 3\) is incomplete"):
        parse_log(b"".join(lines)[:-5], key)
    assert len(parse_log(lines[0] + lines[1], key)) == 2  # a prefix is a valid (unfinished) log


def test_signatures_are_checked_with_the_public_key_only(tmp_path):
    log = small_log(tmp_path)
    # ephemeral: kept only for a resume, owner-only, until the run ends; then no one holds it
    holding = [p.name for p in tmp_path.iterdir() if b"PRIVATE" in p.read_bytes()]
    assert holding == [RESUME_KEY] and (tmp_path / RESUME_KEY).stat().st_mode & 0o777 == 0o600
    forget_resume_key(tmp_path)
    assert not any(b"PRIVATE" in p.read_bytes() for p in tmp_path.iterdir())
    entries = read_log(tmp_path / AUDIT_LOG, load_public_key(tmp_path / PUBLIC_KEY))
    assert [e["kind"] for e in entries] == ["start", "round", "round"]
    assert entries[0]["body"]["audit_key"] == {"algorithm": "ed25519", "sha256": log.fingerprint, "ephemeral": True}
    assert entries[2]["prev"] == entry_hash(entries[1])
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(AuditLogError, match=r"entry 0 \(line 1\) \(start\): the signature does not verify"):
        read_log(tmp_path / AUDIT_LOG, load_public_key(other))


def test_a_long_lived_key_file_is_0600_never_overwritten_and_signs_the_log(tmp_path):
    path = tmp_path / "keys" / "audit.pem"
    public = write_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="never overwritten"):
        write_private_key(path)
    key, ephemeral = load_private_key(str(path))
    assert not ephemeral and key.public_key().public_bytes_raw() == public.public_bytes_raw()
    small_log(tmp_path / "run", key=key)
    entries = read_log(tmp_path / "run" / AUDIT_LOG, public)  # the key file's public half verifies it
    assert entries[0]["body"]["audit_key"]["ephemeral"] is False


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    (b"not a key", "is not a PEM private key"),
    ("rsa", "holds a RSAPrivateKey; the audit key must be Ed25519"),
    ("encrypted", "is password-protected"),
])
def test_a_bad_audit_key_is_one_clear_message(tmp_path, content, fragment):
    path = tmp_path / "audit.pem"
    if content == "rsa":
        content = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    elif content == "encrypted":
        content = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_private_key(str(path))
    assert "'audit-key'" in str(err.value) and fragment in str(err.value) and str(path) in str(err.value)


def _append_forever(run, key_path):
    key, _ = load_private_key(str(key_path))
    log = AuditLog(run, key, ephemeral=False)
    for r in range(100000):
        log.append("round", {"round": r, "padding": "x" * 4000})


def test_the_log_survives_sigkill_at_any_instant(tmp_path):
    key = tmp_path / "audit.pem"
    public = write_private_key(key)
    fork = multiprocessing.get_context("fork")  # the parent's imports: kills land mid-write, not mid-import
    survived = []
    for delay in (0.05, 0.13, 0.31):
        run = tmp_path / f"run-{delay}"
        proc = fork.Process(target=_append_forever, args=(run, key))
        proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if (run / AUDIT_LOG).exists():
            entries = read_log(run / AUDIT_LOG, public)  # strict reader: never a torn line
            assert [e["seq"] for e in entries] == list(range(len(entries)))
            survived.append(len(entries))
    assert max(survived, default=0) > 1  # the kills did land between appends


def test_verify_passes_on_a_real_run(sim_run):
    report = verify_run(sim_run)
    assert report["rounds"] == 2 and report["sites"] == ["hospital-1", "hospital-2", "hospital-3"]
    assert report["ephemeral"] is True
    assert {"model.pt", "model.safetensors", "model.onnx", "MODEL_CARD.md", "model_card.json"} <= set(report["files"])


def test_changing_any_byte_of_the_real_log_or_of_a_recorded_file_fails_naming_the_entry(sim_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sim_run, run, ignore=shutil.ignore_patterns("data", "ledgers"))
    log = (run / AUDIT_LOG).read_bytes()
    last = log.count(b"\n") - 1
    for pos in range(0, len(log), max(1, len(log) // 150)):
        mutated = bytearray(log)
        mutated[pos] ^= 0x01
        (run / AUDIT_LOG).write_bytes(bytes(mutated))
        with pytest.raises(AuditLogError, match=rf"entry {line_of(log, pos)} \(line"):
            verify_run(run)
    (run / AUDIT_LOG).write_bytes(log)
    for name in ("model.pt", "model.safetensors", "MODEL_CARD.md", "model.onnx"):
        original = (run / name).read_bytes()
        for pos in (0, len(original) // 2, len(original) - 1):
            mutated = bytearray(original)
            mutated[pos] ^= 0x01
            (run / name).write_bytes(bytes(mutated))
            with pytest.raises(AuditLogError, match=rf"{name}: sha256 .* recorded in .*entry {last} \(final\)"):
                verify_run(run)
        (run / name).write_bytes(original)
    verify_run(run)


def test_an_unfinished_run_does_not_verify(sim_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sim_run, run, ignore=shutil.ignore_patterns("data", "ledgers"))
    lines = (run / AUDIT_LOG).read_bytes().splitlines(keepends=True)
    (run / AUDIT_LOG).write_bytes(b"".join(lines[:-1]))
    with pytest.raises(AuditLogError, match=r"not 'final': the run did not finish"):
        verify_run(run)


def test_the_verify_and_publish_commands(sim_run, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="candor-server")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify", str(sim_run)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 4 entries of run ") and "The key was ephemeral" in out
    args = parser.parse_args(["publish", str(sim_run), str(tmp_path / "bundle")])
    assert args.func(args) == 0
    assert "audit verify" in capsys.readouterr().out
    args = parser.parse_args(["audit", "verify", str(tmp_path / "bundle"), "--public-key", str(tmp_path / "none.pem")])
    with pytest.raises(AuditLogError, match="public key file not found"):
        args.func(args)
