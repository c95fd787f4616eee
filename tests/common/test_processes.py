"""The one reader of `flwr run --stream` (common.processes.stream_flwr_run), and the
progress lines it picks out (common.progress). A stand-in for `flwr` prints what Flower
prints; no Flower process is started."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import time

import pytest

from candor.common.processes import RunStalled, last_error_line, pid_alive, stream_flwr_run, wait_until
from candor.common.progress import PROGRESS, progress_text, show_line

FAKE_FLWR = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"child {child.pid}", flush=True)
    print("Loading project configuration...", flush=True)
    print("Successfully started run 4242", flush=True)
    print("INFO :      [candor] round 1/2  sites 3  loss 0.41", flush=True)
    print("Successfully started run 9", flush=True)
    print("ERROR :     something failed", flush=True)
""")


def test_the_reader_logs_every_line_finds_the_run_id_and_stops_the_process_group(tmp_path):
    lines, started = [], []
    log = tmp_path / "logs" / "flower.log"
    run_id = stream_flwr_run([sys.executable, "-c", FAKE_FLWR, "--stream"], env=os.environ, log_path=log,
                             on_line=lines.append, on_start=lambda rid: started.append((rid, len(lines))),
                             timestamps=True)
    assert run_id == 4242 and started == [(4242, 2)]  # once, before its own line reaches on_line
    assert lines[1:] == ["Loading project configuration...", "Successfully started run 4242",
                         "INFO :      [candor] round 1/2  sites 3  loss 0.41", "Successfully started run 9",
                         "ERROR :     something failed"]
    logged = log.read_text().splitlines()
    assert len(logged) == len(lines)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} " + re.escape(l), s) for l, s in zip(lines, logged))
    child = int(lines[0].split()[1])
    wait_until(lambda: not pid_alive(child), timeout=10, what="the child of the stopped group to exit")


def test_without_timestamps_the_log_is_flowers_output_verbatim(tmp_path):
    log = tmp_path / "flower.log"
    assert stream_flwr_run([sys.executable, "-c", "print('no run here')", "--stream"], env=os.environ,
                           log_path=log) is None
    assert log.read_text() == "no run here\n"


STUCK_FLWR = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"child {child.pid}", flush=True)
    print("Successfully started run 77", flush=True)
    print("INFO :      [candor] round 1/5 | sites 3", flush=True)
    time.sleep(600)  # a ServerApp stuck outside every bounded wait
""")


def test_the_watchdog_stops_a_run_that_prints_nothing_and_says_so(tmp_path):
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(RunStalled, match=r"printed nothing for 2 s.*Last line: INFO :      \[candor\] round 1/5") as err:
        stream_flwr_run([sys.executable, "-c", STUCK_FLWR, "--stream"], env=os.environ, log_path=tmp_path / "f.log",
                        on_line=lines.append, stall_timeout=2)
    assert err.value.run_id == 77 and time.monotonic() - started < 30
    child = int(lines[0].split()[1])
    wait_until(lambda: not pid_alive(child), timeout=10, what="the stuck run's child to be stopped")


def test_the_watchdog_limit_is_longer_than_every_bounded_wait():
    from candor.common.config import STALL_MARGIN, RunConfig, stall_limit

    assert stall_limit(RunConfig(round_timeout=100, site_wait_timeout=900)) == 900 + STALL_MARGIN
    assert stall_limit(RunConfig()) > RunConfig().round_timeout


def test_the_reader_wants_a_streaming_command(tmp_path):
    with pytest.raises(ValueError, match="--stream"):
        stream_flwr_run(["flwr", "run", "."], env=os.environ, log_path=tmp_path / "x.log")


def test_progress_lines_are_shown_without_their_prefix_and_errors_always(capsys):
    assert PROGRESS == "[candor]"
    assert progress_text("INFO :      [candor] round 1/2  sites 3") == "round 1/2  sites 3"
    assert progress_text("INFO :      round 1") is None
    for line in ("INFO : [candor] round 2/2", "INFO : quiet", "ERROR : bad", "Traceback (most recent call last):"):
        show_line(line)
    show_line("INFO : shown when verbose", verbose=True)
    assert capsys.readouterr().out.splitlines() == ["round 2/2", "ERROR : bad", "Traceback (most recent call last):",
                                                    "INFO : shown when verbose"]


def test_last_error_line_quotes_the_last_error(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("start\nERROR first\nmore\nValueError: second\nbye\n")
    assert last_error_line(log) == "ValueError: second"
    log.write_text("only\nlines\n")
    assert last_error_line(log) == "lines"
    log.write_text("")
    assert last_error_line(log) == "no output"
    assert last_error_line(tmp_path / "missing.log") == "no log"


def test_once_the_server_app_said_why_it_stopped_flowers_report_of_it_is_not_repeated(capsys):
    from candor.common.progress import ProgressPrinter

    show = ProgressPrinter()
    for line in ("INFO : [candor] round 1/2", "ERROR : a site failed", "ERROR : [candor] the run stopped: round 2: x",
                 "ERROR :     Simulation raised an exception", "Traceback (most recent call last):",
                 "ERROR :     Exit Code: 700"):
        show(line)
    assert capsys.readouterr().out.splitlines() == ["round 1/2", "ERROR : a site failed", "the run stopped: round 2: x"]
    verbose = ProgressPrinter(verbose=True)
    verbose("INFO : [candor] cannot start the run: bad key")
    verbose("Traceback (most recent call last):")
    assert capsys.readouterr().out.splitlines() == ["cannot start the run: bad key", "Traceback (most recent call last):"]
