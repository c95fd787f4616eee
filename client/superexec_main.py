"""``python -P -m candor.client.superexec_main ARGS``: a site's SuperExec that starts only
Candor's guard.

Flower's SuperExec starts a task's process by bare name from
``flwr.supercore.constant.TASK_TYPE_TO_COMMAND`` (a ClientApp: ``flwr-clientapp``, found
on PATH) and ``flower-superexec`` has no option to change it. This launcher sets the
ClientApp entry to the absolute path of Candor's ``candor-clientapp``
(:mod:`candor.client.clientapp_main`) and every other task type to a command that exits
at once (a site runs ClientApps only), checks that Flower's executor would now launch
the guard (its ``Popen`` is captured, nothing starts), and only then runs Flower's own
``flower_superexec()`` with the same arguments. If the check fails (a Flower version
that chooses the command elsewhere) it exits non-zero before it contacts the SuperNode,
and ``candor-client start`` stops with that line: fail closed.

``candor-client start`` runs it beside ``flower-supernode --isolation process
--superexec-auth-secret-file SITE_DIR/superexec.secret`` (:mod:`candor.client.supernode`):
with the shared secret only this SuperExec can take the SuperNode's tasks from its
Runtime API.

Refused arguments (they would let a task run elsewhere than this guard):
``--executor`` other than ``subprocess``, ``--executor-config``, ``--plugin-config`` and
``--allow-runtime-dependency-installation``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["GUARD", "guard_path", "main", "redirect_tasks"]

GUARD = "candor-clientapp"
_GUARD_MODULE = "candor.client.clientapp_main"
_REFUSED_OPTIONS = ("--executor-config", "--plugin-config", "--allow-runtime-dependency-installation")


class GuardUnavailable(SystemExit):
    pass


def guard_path() -> Path:
    """The absolute path of this installation's ``candor-clientapp`` console script."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        path = folder / GUARD
        if path.is_file() and os.access(path, os.X_OK):
            if _GUARD_MODULE not in path.read_text(errors="replace"):
                raise GuardUnavailable(f"candor-superexec: {path} does not start {_GUARD_MODULE}; reinstall Candor")
            return path.absolute()
    raise GuardUnavailable(f"candor-superexec: no executable {GUARD} beside {sys.executable}; reinstall Candor "
                           "(`pip install candor-fl`), whose console scripts include it")


def redirect_tasks(guard: Path) -> list[str]:
    """Point Flower's task commands at the guard (ClientApp) or at a refusal (the rest);
    return the argument list Flower's executor would now start for a ClientApp.

    Raises:
        GuardUnavailable: Flower's executor would not start the guard.
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    refuse = shutil.which("false") or "/bin/false"
    for task_type in TaskType:
        TASK_TYPE_TO_COMMAND[task_type] = str(guard) if task_type == TaskType.CLIENT_APP else refuse
    seen: list[list[str]] = []
    real = subprocess.Popen
    subprocess.Popen = lambda args, **kwargs: seen.append(list(args))  # type: ignore[assignment,misc]
    try:
        for suppress in (False, True):
            SubprocessExecutor().launch(ExecutionSpec(
                task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1", token="self-test",
                insecure=True, root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                suppress_output=suppress, task_id=1))
    except Exception as err:  # a changed ExecutionSpec or executor: fail closed
        raise GuardUnavailable(f"candor-superexec: Flower's SubprocessExecutor self-test failed ({type(err).__name__}: "
                               f"{err}); this Candor release cannot guard this Flower version") from None
    finally:
        subprocess.Popen = real  # type: ignore[misc]
    if len(seen) != 2 or any(args[:1] != [str(guard)] for args in seen):
        raise GuardUnavailable(f"candor-superexec: Flower's executor would start {[a[:1] for a in seen]}, not {guard}; "
                               "this Candor release cannot guard this Flower version, so nothing runs")
    return seen[0]


def _check_arguments(argv: list[str]) -> None:
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in _REFUSED_OPTIONS:
            raise GuardUnavailable(f"candor-superexec: {name} is refused (a task must run through {GUARD})")
        if name == "--executor":
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if value != "subprocess":
                raise GuardUnavailable(f"candor-superexec: --executor {value} is refused (only 'subprocess' starts "
                                       f"{GUARD})")


def main() -> None:
    _check_arguments(sys.argv[1:])
    args = redirect_tasks(guard_path())
    print(f"candor-superexec: ClientApp tasks start {args[0]} (self-test passed)", flush=True)
    sys.argv[0] = "flower-superexec"
    importlib.import_module("flwr.supercore.cli.flower_superexec").flower_superexec()


if __name__ == "__main__":
    main()
