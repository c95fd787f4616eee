"""Starting, watching and stopping Flower's processes (SuperLink, SuperNode, ``flwr``).

Shared by the simulation engine and the deployment commands. Every process is started
in its own session (process group) so that it and its children (SuperExec, ServerApp,
ClientApp processes) can be stopped together; every wait polls a condition against a
deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from .errors import CandorError

__all__ = [
    "APP_DIR", "FlwrCommandFailed", "ProcessTimeout", "descendants", "flower_bin", "start_time", "flower_env", "flwr_json", "free_port",
    "kill_recorded", "last_error_line", "pid_alive", "RunStalled", "run_status", "stop_group", "stop_pid_group", "stream_flwr_run",
    "superlink_healthy", "timestamped", "wait_until",
]

# The Flower App directory `flwr run` submits: the repository root, which holds
# pyproject.toml with [tool.flwr.app].
APP_DIR = Path(__file__).resolve().parents[1]


class ProcessTimeout(CandorError):
    """A condition was not met before its deadline."""


class FlwrCommandFailed(CandorError):
    """A ``flwr`` CLI call failed, printed no JSON, or did not answer in time."""


# How `flwr run` announces the run it submitted.
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """Path of a Flower executable, preferring the running interpreter's environment."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: ``FLWR_HOME``, no per-run dependency installs,
    no telemetry, one intra-op thread, this environment's
    executables first on PATH (Flower starts ``flower-superexec`` and the app processes
    by name). The app's code is the installed ``candor`` package."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",  # no usage reports from a data holder's machine
        "OMP_NUM_THREADS": "1",
        # torch's compile cache (opened by the imports of Opacus' dependencies) stays in
        # FLWR_HOME, not in a shared /tmp/torchinductor_<user> left behind by every run
        "TORCHINDUCTOR_CACHE_DIR": str(Path(flwr_home) / "torchinductor"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **extra,
    }


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1,
               error: type[Exception] = ProcessTimeout) -> None:
    """Poll ``condition`` until it is true; raise ``error`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def superlink_healthy(address: str, *, ca_cert: Path | None = None) -> bool:
    """True if the SuperLink at ``host:port`` answers ``/health`` (HTTPS if ``ca_cert``)."""
    if ca_cert is None:
        url, context = f"http://{address}/health", None
    else:
        url, context = f"https://{address}/health", ssl.create_default_context(cafile=str(ca_cert))
    try:
        with urlopen(url, timeout=1.0, context=context) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def stop_pid_group(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, wait up to ``grace`` s, then SIGKILL it
    and every descendant that left it."""
    tree = descendants(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        kill_recorded(tree)
        return
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)  # children that outlived their leader
    except ProcessLookupError:
        pass
    kill_recorded(tree)


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None if gone:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every living descendant of ``pid`` (children, their children, ...), read from
    /proc, as ``{pid: start time}``. Includes those that left ``pid``'s process group
    (Ray's agents start their own sessions), which ``killpg`` alone would miss."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        started = start_time(child)
        if started is not None and child not in found:
            found[child] = started
            todo += children.get(child, [])
    return found


def kill_recorded(processes: Mapping[int, str]) -> None:
    """SIGKILL each recorded ``{pid: start time}`` that is still that same process."""
    for pid, started in processes.items():
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``proc``'s process group (it must lead one), then SIGKILL the group and every
    descendant that left it; reap ``proc``."""
    tree = descendants(proc.pid)  # before anything dies: orphans are re-parented and lost
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_recorded({**tree, **descendants(proc.pid)})
    proc.wait()


def flwr_json(args: Sequence[str], *, env: Mapping[str, str], timeout: float = 60) -> dict:
    """Run ``flwr ARGS --format json`` and return its JSON document.

    Raises:
        FlwrCommandFailed: the command timed out, printed no JSON, or reported failure
            (the message ends with Flower's own last line about it).
    """
    cmd = [flower_bin("flwr"), *args, "--format", "json"]
    try:
        out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FlwrCommandFailed(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s; is the "
                                "SuperLink overloaded or stopped?") from None
    try:
        doc = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise FlwrCommandFailed(f"`flwr {' '.join(args)}` failed: {detail[-1] if detail else 'no output'}") from None
    if not doc.get("success", True):
        message = str(doc.get("error-message", "unknown error")).strip().splitlines()[-1]
        raise FlwrCommandFailed(f"`flwr {' '.join(args)}` failed: {message}")
    return doc


def run_status(connection: str, *, env: Mapping[str, str], run_id: int | None = None) -> tuple[int | None, str]:
    """(run id, status) of run ``run_id`` (default: the newest run), from ``flwr ls``."""
    try:
        runs = flwr_json(["ls", connection], env=env)["runs"]
    except (CandorError, KeyError) as err:
        return None, f"unknown ({err})"
    if run_id is not None:
        runs = [r for r in runs if int(r["run-id"]) == run_id]
    if not runs:
        return None, "not submitted"
    newest = max(runs, key=lambda r: int(r["run-id"]))
    return int(newest["run-id"]), str(newest["status"])


def timestamped(line: str) -> str:
    """``line`` prefixed with the local wall-clock time, ``HH:MM:SS.mmm `` (the form of
    every line Candor writes into a Flower log)."""
    now = time.time()
    return f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d} {line}"


def last_error_line(log_path: Path) -> str:
    """The last line of a log that reports an error (``ERROR``, ``Error``, ``error``), else its
    last line: what a failure message quotes. ``"no output"`` for an empty log, ``"no log"``
    for a missing or unreadable one."""
    try:
        lines = [l.strip() for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    errors = [l for l in lines if "ERROR" in l or "rror" in l]
    return (errors or lines or ["no output"])[-1]


def stream_flwr_run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    on_line: Callable[[str], None] = lambda line: None,
    on_start: Callable[[int], None] = lambda run_id: None,
    timestamps: bool = False,
    stall_timeout: float | None = None,
) -> int | None:
    """Run ``flwr run ... --stream`` to its end, in its own process group; the one reader of
    its output.

    Every line Flower prints is written to ``log_path`` (truncated first; prefixed by
    :func:`timestamped` if ``timestamps``) and passed, without its newline, to
    ``on_line``. When Flower announces the run ("Successfully started run N"),
    ``on_start(N)`` is called once, before that line reaches ``on_line``. The process
    group is stopped (SIGTERM, then SIGKILL) on return and on any exception; Ctrl-C is
    re-raised, so the caller may also stop the run on the SuperLink.

    ``flwr run`` exits 0 even when the ServerApp failed: check the run's status
    (:func:`run_status`) afterwards.

    ``stall_timeout`` is the watchdog: if Flower prints nothing for that many seconds the
    run is taken to be stuck (a ServerApp or ClientApp that hangs outside any of Flower's
    bounded waits), the process group is stopped and :class:`RunStalled` raised.

    Returns:
        The run id, or ``None`` if Flower never announced one (the run was not submitted).

    Raises:
        RunStalled: no line for ``stall_timeout`` seconds.
    """
    if "--stream" not in cmd:
        raise ValueError(f"stream_flwr_run: the command must contain --stream; got {list(cmd)}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_id: int | None = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        watchdog = _Watchdog(proc, stall_timeout) if stall_timeout else None
        last = ""
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                if watchdog:
                    watchdog.fed()
                log.write(timestamped(raw) if timestamps else raw)
                log.flush()
                line = raw.rstrip("\n")
                last = line or last
                if run_id is None and (found := _RUN_STARTED.search(line)):
                    run_id = int(found.group(1))
                    on_start(run_id)
                on_line(line)
            proc.wait()
        finally:
            if watchdog:
                watchdog.stop()
            stop_group(proc)
    if watchdog and watchdog.fired:
        raise RunStalled(f"the run printed nothing for {stall_timeout:.0f} s, longer than any wait it may be in "
                         f"(round-timeout and site-wait-timeout): it is stuck, and was stopped. Last line: "
                         f"{last.strip()[:300] or '(none)'}; the whole log is in {log_path}", run_id=run_id)
    return run_id


class RunStalled(CandorError):
    """A run printed nothing for longer than any bounded wait it may be in (the watchdog
    of :func:`stream_flwr_run`); its ``run_id`` if it had one."""

    def __init__(self, text: str, *, run_id: int | None = None) -> None:
        super().__init__(text)
        self.run_id = run_id


class _Watchdog:
    """Stops ``proc``'s process group when :meth:`fed` was not called for ``timeout`` s."""

    def __init__(self, proc: subprocess.Popen, timeout: float) -> None:
        import threading

        self.fired = False
        self._proc, self._timeout = proc, timeout
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flwr-run-watchdog", daemon=True)
        self._thread.start()

    def fed(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self._timeout / 4)):
            if time.monotonic() - self._last > self._timeout:
                self.fired = True
                stop_group(self._proc)  # ends the output: the reader's loop returns
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)
