"""`candor-sim` stopped with SIGTERM or Ctrl-C mid-run leaves nothing behind: every
process it started (SuperLink, SuperExec, flwr-simulation, Ray's workers and agents,
which start sessions of their own) is gone, and so are its temporary directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from candor.common.processes import start_time, descendants, pid_alive

pytestmark = pytest.mark.slow

CANDOR_SIM = str(Path(sys.executable).parent / "candor-sim")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_stops_every_process_and_removes_the_temporary_files(tmp_path, sig, code):
    tmp = Path(tempfile.mkdtemp(prefix="hy-", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    try:
        _run_and_stop(tmp, tmp_path, sig, code)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_and_stop(tmp: Path, tmp_path: Path, sig: int, code: int) -> None:
    proc = subprocess.Popen([CANDOR_SIM, "run", "--num-sites", "3", "--out", str(tmp_path / "out"),
                             "-c", "num-server-rounds=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}, start_new_session=True)
    seen: dict[int, str] = {}
    lines: list[str] = []
    training = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "round 1/" in line:
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not training.is_set():  # record the tree while it grows: Ray's agents re-parent early
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        seen.update(descendants(proc.pid))
        training.wait(0.2)
    seen.update(descendants(proc.pid))
    assert any("ray" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").lower()
               for p in seen if start_time(p) == seen[p]), "Ray was not running: the test proves nothing"
    os.kill(proc.pid, sig)  # the command only, as `kill`, `timeout` or a terminal's Ctrl-C would
    assert proc.wait(timeout=90) == code, "".join(lines)[-3000:]
    reader.join(timeout=10)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            for pid, started in seen.items() if start_time(pid) == started and pid_alive(pid)}  # zombies: exited
    assert left == {}, f"still running after candor-sim exited: {left}"
    assert "every process it started was stopped" in "".join(lines)
    assert list(tmp.iterdir()) == [], "temporary files left behind"
