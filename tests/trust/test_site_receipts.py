"""Site receipts, and `candor-client audit`: the published log against the site's own records."""

from __future__ import annotations

import json
import shutil

import pytest
from trust_helpers import SITES

from candor.client.cli import main as client_main
from candor.client.receipts import append_receipt, ledger_path_for, read_receipts, receipts_path
from candor.common.auditlog import load_public_key, read_log
from candor.common.errors import CandorError


def test_receipts_live_beside_the_ledger():
    assert receipts_path("/sites/h1/ledger.json").as_posix() == "/sites/h1/receipts.jsonl"
    assert receipts_path("/run/ledgers/hospital-1.json").as_posix() == "/run/ledgers/hospital-1.receipts.jsonl"
    for ledger in ("/sites/h1/ledger.json", "/run/ledgers/hospital-1.json"):
        assert ledger_path_for(receipts_path(ledger)).as_posix() == ledger


def test_receipts_append_and_a_damaged_file_is_a_clear_error(tmp_path):
    path = tmp_path / "receipts.jsonl"
    append_receipt(path, {"round": 1})
    append_receipt(path, {"round": 2})
    assert [r["round"] for r in read_receipts(path)] == [1, 2]
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(CandorError, match=r"receipts.jsonl, line 3: not a receipt"):
        read_receipts(path)


def test_each_simulated_site_kept_its_receipts(sim_run):
    entries = read_log(sim_run / "audit.jsonl", load_public_key(sim_run / "audit_public_key.pem"))
    run_id = entries[0]["body"]["run_id"]
    for site in SITES:
        receipts = read_receipts(sim_run / "ledgers" / f"{site}.receipts.jsonl")
        assert {(r["round"], r["kind"]) for r in receipts} == {(1, "train"), (2, "train"), (1, "evaluate"),
                                                               (2, "evaluate")}
        assert {r["run_id"] for r in receipts} == {run_id} and {r["site"] for r in receipts} == {site}


def test_client_audit_agrees_with_a_real_run(sim_run, capsys):
    for site in SITES:
        assert client_main(["audit", str(sim_run / "ledgers" / f"{site}.receipts.jsonl"), str(sim_run)]) == 0
        out = capsys.readouterr().out
        assert f"Site '{site}'" in out and "is in the log, aggregated" in out and out.rstrip().endswith(
            "OK: the log agrees with your receipts and your ledger.")
        assert "Cost: this run spent ε = " in out


@pytest.fixture
def copy(sim_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sim_run, run, ignore=shutil.ignore_patterns("data"))
    return run


def rewrite(path, change):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_client_audit_catches_an_update_that_is_not_the_one_sent(copy, capsys):
    receipts = copy / "ledgers" / "hospital-2.receipts.jsonl"
    rewrite(receipts, lambda rs: next(r for r in rs if r["kind"] == "train" and r["round"] == 2).update(
        sent_update_sha256="0" * 64))
    assert client_main(["audit", str(receipts), str(copy / "audit.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "round 2: the update you sent (0000000000000000) is not in the log" in out
    assert "round 2: the log lists an update from 'hospital-2'" in out and "that you have no receipt for" in out


def test_client_audit_catches_a_ledger_that_disagrees_with_the_log(copy, capsys):
    ledger = copy / "ledgers" / "hospital-3.json"
    doc = json.loads(ledger.read_text())
    doc["entries"][0]["noise_multiplier"] *= 2
    ledger.write_text(json.dumps(doc))
    assert client_main(["audit", str(copy / "ledgers" / "hospital-3.receipts.jsonl"), str(copy)]) == 1
    # the counts, 2 rounds of training and of evaluation, the explanation: one of them changed
    assert "privacy: your ledger has 6 release(s) for this run" in capsys.readouterr().out


def test_client_audit_refuses_a_tampered_log_with_one_message(copy, capsys):
    log = copy / "audit.jsonl"
    log.write_bytes(log.read_bytes().replace(b'"hospital-1"', b'"hospital-9"', 1))
    assert client_main(["audit", str(copy / "ledgers" / "hospital-1.receipts.jsonl"), str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("candor-client: ") and "entry 1 (line 2)" in err and "Traceback" not in err
