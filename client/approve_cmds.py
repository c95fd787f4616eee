"""``candor-client approve`` and ``approved``: which app code this site runs.

By default a site runs only an app whose hash (:mod:`candor.common.app_hash`) is the
Candor release it installed. Other code runs only after the site approved it::

    candor-client approve SITE_DIR APP_DIR_OR_FAB [--diff] [--dry-run]
    candor-client approve SITE_DIR --revoke SHA256
    candor-client approved SITE_DIR [--json]

``approve`` hashes the app exactly as it would reach the site (an app directory is
built into a FAB with Flower's own build, as ``flwr run`` would), prints what differs
from this site's installation (components; files added, removed and changed, with line
counts; ``--diff`` prints the unified diff of every changed or added text file), and
records the hash in ``SITE_DIR/approved_apps.json`` (:mod:`candor.client.approval`). The
command itself is the approval: it asks nothing; ``--dry-run`` only shows.
"""

from __future__ import annotations

import argparse
import difflib
import json
import time
from pathlib import Path

from candor.common.app_hash import AppBundleError, AppContent, fab_files, import_layout, installed_release, \
    installed_release_files, read_app_dir, read_fab
from candor.common.commands import add_command
from candor.common.errors import SiteError

from .approval import Approvals
from .site_dir import SiteDir

__all__ = ["register"]


def _read_app(path: Path) -> tuple[AppContent, dict[str, bytes]]:
    """(content, FAB path -> bytes) of an app directory or a .fab file."""
    if path.is_dir():
        content, fab = read_app_dir(path)
    elif path.is_file():
        try:
            fab = path.read_bytes()
        except OSError as err:
            raise SiteError(f"{path}: unreadable ({err})") from None
        content = read_fab(fab, where=str(path))
    else:
        raise SiteError(f"{path}: no such app directory or .fab file")
    import_layout(content.files)  # an app this site could never load is refused here, not at run time
    return content, fab_files(fab, where=str(path))


def _lines(data: bytes | None) -> list[str] | None:
    """The text lines of a file, or None for a binary one."""
    if data is None:
        return []
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _counts(old: list[str] | None, new: list[str] | None) -> str:
    if old is None or new is None:
        return "binary"
    plus = minus = 0
    for line in difflib.unified_diff(old, new, n=0):
        if line.startswith("+") and not line.startswith("+++"):
            plus += 1
        elif line.startswith("-") and not line.startswith("---"):
            minus += 1
    return f"+{plus} -{minus} lines"


def show_difference(app: AppContent, files: dict[str, bytes], installed: AppContent, *, diff: bool) -> None:
    """Print what ``app`` changes against the installed release."""
    d = app.diff(installed)
    sources = installed_release_files()
    print(f"Differences from this site's installed Candor release: {len(d.added)} file(s) added, {len(d.removed)} "
          f"removed, {len(d.changed)} changed" + (f", {len(d.components)} component(s) changed" if d.components else ""))
    for name, base, new in d.components:
        print(f"  component {name}: {base or '(none)'} -> {new or '(none)'}")
    rows = [("added", p) for p in d.added] + [("removed", p) for p in d.removed] + [("changed", p) for p in d.changed]
    for kind, path in sorted(rows, key=lambda r: r[1]):
        old = _lines(sources[path].read_bytes()) if kind != "added" else []
        new = _lines(files[path]) if kind != "removed" else []
        print(f"  {kind:<8} {path}  ({_counts(old, new)})")
    if not diff:
        if d.added or d.changed:
            print("  (--diff prints every added and changed file's lines)")
        return
    for kind, path in sorted(rows, key=lambda r: r[1]):
        if kind == "removed":
            continue
        old = _lines(sources[path].read_bytes()) if kind == "changed" else []
        new = _lines(files[path])
        if old is None or new is None:
            print(f"--- {path}: binary, not shown")
            continue
        print("".join(difflib.unified_diff(old, new, fromfile=f"installed/{path}", tofile=f"app/{path}")), end="")


def cmd_approve(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = site.config()["site"]
    approvals = Approvals(site.dir)
    if args.revoke:
        if args.app:
            raise SiteError("give either an app to approve or --revoke SHA256, not both")
        entry = approvals.revoke(args.revoke)
        print(f"Revoked: site '{name}' no longer runs app sha256 {entry.sha256} (approved "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.approved_at))} from {entry.source}).")
        return 0
    if not args.app:
        raise SiteError("give the app to approve (its directory or .fab file), or --revoke SHA256")
    source = Path(args.app).expanduser().resolve()
    try:
        app, files = _read_app(source)
        installed = installed_release()
    except AppBundleError as err:
        raise SiteError(str(err)) from None
    print(f"App {source}: sha256 {app.sha256}")
    print(f"This site's installed Candor release: sha256 {installed.sha256}")
    if app.sha256 == installed.sha256:
        print(f"This is the installed release: site '{name}' always runs it; nothing to record.")
        return 0
    show_difference(app, files, installed, diff=args.diff)
    if args.dry_run:
        print("Not approved (--dry-run).")
        return 0
    entry, new = approvals.approve(app, source=str(source), installed=installed)
    print(("Approved" if new else "Already approved") + f": site '{name}' runs app sha256 {entry.sha256} when the "
          f"coordinator sends it (recorded in {approvals.path}; revoke with `candor-client approve {site.dir} "
          f"--revoke {entry.sha256[:16]}`).")
    return 0


def cmd_approved(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = site.config()["site"]
    try:
        installed = installed_release().sha256
    except AppBundleError as err:
        raise SiteError(str(err)) from None
    entries = Approvals(site.dir).entries()
    if args.json:
        print(json.dumps({"site": name, "installed_sha256": installed,
                          "apps": [e.__dict__ for e in entries]}, indent=2))
        return 0
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    print(f"Site '{name}' runs:")
    print(f"  {installed}  the installed Candor release (always)")
    for e in (e for e in entries if e.active):
        d = e.differs
        print(f"  {e.sha256}  approved {when(e.approved_at)} from {e.source} ({e.files} files; vs the release "
              f"then installed: +{d.get('added', 0)} -{d.get('removed', 0)} ~{d.get('changed', 0)} files, "
              f"{d.get('components', 0)} component(s) changed; clientapp {e.components.get('clientapp')})")
    revoked = [e for e in entries if not e.active]
    if revoked:
        print("Revoked (no longer run):")
        for e in revoked:
            print(f"  {e.sha256}  approved {when(e.approved_at)}, revoked {when(e.revoked_at)} ({e.source})")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "approve", cmd_approve,
                    help="let this site run an app other than its installed Candor release (prints what differs)")
    p.add_argument("app", nargs="?", help="the app's directory or .fab file (none with --revoke)")
    p.add_argument("--revoke", metavar="SHA256", help="withdraw an approval (the app's sha256, or its first 12+ digits)")
    p.add_argument("--diff", action="store_true", help="print the unified diff of every added and changed file")
    p.add_argument("--dry-run", action="store_true", help="show what differs; record nothing")
    p = add_command(subparsers, "approved", cmd_approved, help="list the app code this site runs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
