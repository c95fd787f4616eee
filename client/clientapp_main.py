"""``candor-clientapp``: the site's guard in front of Flower's ClientApp process.

In Flower's design the coordinator packages the app (a FAB) and every SuperNode runs that
copy of the ClientApp next to the raw records. Candor's SuperExec
(:mod:`candor.client.superexec_main`) starts this command wherever Flower would start
``flwr-clientapp``, with the same arguments, and this command runs Flower's own
``flwr-clientapp`` main unchanged except for two names of Flower's ClientApp runner
``flwr.supernode.runtime.run_clientapp``:

- ``install_from_fab(fab_bytes, ...)``, which Flower calls right after it pulled the
  message, context, run and FAB from the SuperNode, before anything of the app is on disk
  or imported, becomes :func:`verify_app`: it computes the app hash of the bytes
  (:mod:`candor.common.app_hash`) and accepts only the Candor release installed at the
  site or an app the site approved (:mod:`candor.client.approval`). It unpacks nothing.
  A refusal raises :class:`AppRefused`, an ordinary exception: Flower's runner turns it
  into an ``Error`` reply to the coordinator (code 2, reason ``<class
  '...AppRefused'>:<'site ... refuses app sha256 ...'>``), and the site's log gets one
  line. Nothing is trained and nothing of the site's data or ledger is touched.
- ``get_load_client_app_fn(...)`` becomes :func:`load_verified_app`: the installed
  release is imported from the installed ``candor`` package (no app directory on
  ``sys.path``); an approved other app is unpacked from the very bytes that were hashed
  into a fresh directory (``common.app_hash.import_layout``) and loaded with Flower's own
  ``load_app``, after the guard's ``candor`` modules are dropped from ``sys.modules``, so
  the code that runs is exactly what the site approved.

The site directory and name reach the guard in the environment
(``CANDOR_SITE_DIR``, ``CANDOR_SITE_NAME``), set by ``candor-client start`` for the
SuperExec; never from the run config. Without them only the installed release runs.

If Flower's runner no longer looks these names up, the guard exits before it contacts
the SuperNode (fail closed): no reply is sent and the coordinator's round times out for
this site.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from candor.common.app_hash import (
    APP_SHA256_ENV, RELEASE_COMPONENTS, AppBundleError, AppContent, fab_files, import_layout, installed_release, read_fab,
)
from candor.common.errors import CandorError

from .approval import Approvals

__all__ = ["AppRefused", "SITE_DIR_ENV", "SITE_NAME_ENV", "load_verified_app", "main", "verify_app"]

SITE_DIR_ENV = "CANDOR_SITE_DIR"
SITE_NAME_ENV = "CANDOR_SITE_NAME"
_RUNNER = "flwr.supernode.runtime.run_clientapp"
_HOOKED = ("install_from_fab", "get_load_client_app_fn")

logger = logging.getLogger(__name__)


class AppRefused(CandorError):
    """This site refuses to run the app the coordinator sent (an Exception, never
    SystemExit: Flower's runner must send the Error reply)."""


@dataclass(frozen=True)
class _Verdict:
    sha256: str
    installed: bool
    fab: bytes | None = None  # an approved other app: the bytes that were hashed
    content: AppContent | None = None


_verdict: _Verdict | None = None


def _log(level: int, text: str) -> None:
    from flwr.supercore import log  # Flower's logger: the line lands in the site's supernode.log

    log(level, "%s", text)


def _site() -> tuple[str, Path | None]:
    site_dir = os.environ.get(SITE_DIR_ENV)
    return os.environ.get(SITE_NAME_ENV) or "this site", Path(site_dir) if site_dir else None


_refusal_logged = False


def _refused(text: str) -> AppRefused:
    global _refusal_logged
    _log(logging.ERROR, text)
    _refusal_logged = True
    return AppRefused(text)


def verify_app(fab_file: bytes, *args, **kwargs) -> None:
    """Flower's ``install_from_fab``, replaced: verify the FAB's bytes, unpack nothing.

    Raises:
        AppRefused: the app is malformed, or neither the installed release nor approved.
    """
    global _verdict
    started = time.perf_counter()
    name, site_dir = _site()
    approve = f"candor-client approve {site_dir or 'SITE_DIR'} APP_DIR_OR_FAB"
    if not isinstance(fab_file, bytes):
        raise _refused(f"site '{name}' refuses the app: it was not given as bytes ({type(fab_file).__name__})")
    try:
        app = read_fab(fab_file, where="the app the coordinator sent")
    except AppBundleError as err:
        raise _refused(f"site '{name}' refuses the app: {err}") from None
    try:
        installed = installed_release()
    except AppBundleError as err:
        raise _refused(f"site '{name}' refuses app sha256 {app.sha256}: {err}") from None
    sha = app.sha256
    if sha == installed.sha256:
        _verdict = _Verdict(sha256=sha, installed=True)
        what = "its installed Candor release"
    else:
        note = ""
        try:
            approved = Approvals(site_dir).active() if site_dir else set()
        except CandorError as err:
            approved, note = set(), f" (its approved apps are unreadable: {err})"
        if sha not in approved:
            raise _refused(f"site '{name}' refuses app sha256 {sha}: not its installed Candor release (sha256 "
                           f"{installed.sha256[:16]}) nor an app it approved{note}; approve it with `{approve}`")
        try:
            import_layout(app.files)
        except AppBundleError as err:
            raise _refused(f"site '{name}' refuses app sha256 {sha}: {err}") from None
        _verdict = _Verdict(sha256=sha, installed=False, fab=fab_file, content=app)
        what = "an app this site approved"
    os.environ[APP_SHA256_ENV] = sha  # client.receipts records it
    _log(logging.INFO, f"site '{name}' runs app sha256 {sha} ({what}; verified in "
                       f"{1000 * (time.perf_counter() - started):.0f} ms)")


def load_verified_app(default_app_ref: str = "", app_path: str | None = None, multi_app: bool = True):
    """Flower's ``get_load_client_app_fn``, replaced: a loader of the app :func:`verify_app`
    accepted, and of nothing else."""

    def load(fab_id: str, fab_version: str, fab_hash: str):
        from flwr.clientapp import ClientApp

        if _verdict is None:
            raise AppRefused("no app was verified in this process; refusing to load one")
        app = _installed_client_app() if _verdict.installed else _approved_client_app(_verdict)
        if not isinstance(app, ClientApp):
            raise AppRefused(f"the clientapp component of app sha256 {_verdict.sha256} is not a Flower ClientApp")
        return app

    return load


def _installed_client_app():
    module_name, _, attribute = RELEASE_COMPONENTS["clientapp"].partition(":")
    package = sys.modules["candor.client"]  # imported from the installation before any app was seen
    module = importlib.import_module(module_name)
    if Path(module.__file__).resolve().parent != Path(next(iter(package.__path__))).resolve():
        raise AppRefused(f"{module_name} was imported from {module.__file__}, not from the installed Candor release")
    return getattr(module, attribute)


def _approved_client_app(verdict: _Verdict):
    """Unpack the approved bytes into a new directory and load their clientapp as Flower does."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.supercore.object_ref import load_app

    files = fab_files(verdict.fab)
    root = Path(tempfile.mkdtemp(prefix=f"candor-app-{verdict.sha256[:12]}-"))
    atexit.register(shutil.rmtree, root, True)
    for path, targets in import_layout(p for p in files if not p.startswith(".info/")).items():
        for target in targets:
            dest = root / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(files[path])
    for name in [m for m in sys.modules if m == "candor" or m.startswith("candor.")]:
        del sys.modules[name]  # `candor.*` now resolves to the approved bytes, not to the installation
    importlib.invalidate_caches()
    return load_app(verdict.content.components["clientapp"], LoadClientAppError, root)


def _no_dependency_installation(*args, **kwargs):
    raise AppRefused("runtime dependency installation is refused at this site: the app runs in the environment "
                     "Candor is installed in")


def install_hooks(runner) -> None:
    """Replace the two names in Flower's runner module; SystemExit if it no longer uses them."""
    used = set(runner.run_clientapp.__code__.co_names)
    missing = [name for name in (*_HOOKED, "install_app_dependencies") if not hasattr(runner, name) or name not in used]
    if missing:
        raise SystemExit(f"candor-clientapp: Flower's {_RUNNER}.run_clientapp no longer calls {', '.join(missing)}; "
                         "this Candor release cannot guard this Flower version, so nothing runs (install the Flower "
                         "version Candor requires)")
    runner.install_from_fab = verify_app
    runner.get_load_client_app_fn = load_verified_app
    runner.install_app_dependencies = _no_dependency_installation


def main() -> None:
    runner = importlib.import_module(_RUNNER)
    install_hooks(runner)
    sys.argv = [a for a in sys.argv if a != "--allow-runtime-dependency-installation"]
    logging.getLogger("flwr").addFilter(_QuietRefusal())
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


class _QuietRefusal(logging.Filter):
    """Drop what Flower logs about a refusal (its traceback, its exit-code notice): the
    guard logged it as one line already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AppRefused):
            return False
        return not (_refusal_logged and str(record.msg).startswith("Exit Code:"))


if __name__ == "__main__":
    main()
