"""The site's privacy ledger: append-only, durable, and intact after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from candor.client.ledger import Ledger, new_entry
from candor.common.errors import CandorError, LedgerError
from candor.common.policy import LifetimeBudget, lifetime_spent
from candor.common.privacy import MechanismRecord, epsilon


def _entry(r: int, run: str = "run-1"):
    mech = MechanismRecord(round=r, noise_multiplier=1.2, sample_rate=0.1, steps=20, run_id=run)
    return new_entry(mech, accountant="prv", delta=1e-5, epsilon_run=0.0)


def test_entries_accumulate_across_runs(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json", site="h1")
    with ledger.locked():
        ledger.append(_entry(1, "a"))
        ledger.append(_entry(2, "a"))
        ledger.append(_entry(1, "b"))
    reopened = Ledger(tmp_path / "ledger.json", site="h1")
    assert [e.mechanism.round for e in reopened.entries()] == [1, 2, 1]
    assert len(reopened.history(run_id="a")) == 2
    entries = reopened.entries()
    lifetime = lifetime_spent([e.mechanism for e in entries], [e.delta for e in entries], LifetimeBudget()).epsilon
    assert lifetime == pytest.approx(epsilon(reopened.history(), delta=1e-5))
    assert lifetime > epsilon(reopened.history(run_id="a"), delta=1e-5)


def test_ledger_is_not_world_writable(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json", site="h1")
    with ledger.locked():
        ledger.append(_entry(1))
    assert not os.stat(tmp_path / "ledger.json").st_mode & 0o002
    assert os.stat(tmp_path / "ledger.json").st_mode & 0o777 == 0o600  # a site's records: its owner only
    assert os.stat(tmp_path / "ledger.json.lock").st_mode & 0o777 == 0o600


def test_corrupt_ledger_is_a_clear_error_not_a_reset(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(CandorError, match="do not delete"):
        Ledger(path, site="h1").entries()
    ledger = Ledger(path, site="h1")
    path.unlink()
    with ledger.locked():
        ledger.append(_entry(1))
        ledger.append(_entry(2))
    doc = json.loads(path.read_text())
    doc["entries"][1]["noise_multiplier"] = -1.0  # damaged: an impossible mechanism
    path.write_text(json.dumps(doc))
    damaged = path.read_bytes()
    with pytest.raises(LedgerError, match=r"ledger.json: entry 1 \(round 2\) is not a valid record.*do not delete"):
        with ledger.locked():
            ledger.append(_entry(3))  # never written over what it cannot read
    assert path.read_bytes() == damaged


WRITER = textwrap.dedent("""
    import sys
    from candor.client.ledger import Ledger, new_entry
    from candor.common.privacy import MechanismRecord
    ledger = Ledger(sys.argv[1], site="h1")
    r = 0
    while True:
        r += 1
        with ledger.locked():
            ledger.append(new_entry(MechanismRecord(round=r, noise_multiplier=1.0, sample_rate=0.1, steps=5),
                                    accountant="prv", delta=1e-5, epsilon_run=0.0))
        print(r, flush=True)
""")


def test_ledger_survives_sigkill_at_any_instant(tmp_path):
    path = tmp_path / "ledger.json"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        # Kill after a varying number of completed appends: mid-write most of the time.
        target = 3 + 7 * attempt
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if int(line) >= target or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        doc = json.loads(path.read_text())  # never torn: the old file or the new one
        rounds = [e["round"] for e in doc["entries"]]
        assert rounds == list(range(1, len(rounds) + 1))  # no entry lost, duplicated or reordered
        assert len(rounds) >= target  # every append the writer acknowledged is durable
        path.unlink()
