"""The app hash: one SHA-256 for the code of a Flower App, whether it is read from a FAB
(the zip ``flwr run`` submits), from an app directory, or from the Candor release a site
installed with pip.

In Flower's design the coordinator packages the app and every SuperNode runs that copy
of the ClientApp next to the raw records. A site therefore decides by this hash which
code may run on its data (``client.clientapp_main``, ``client.approval``), and the
coordinator's audit log records it under the same definition (``server.audit``).

Definition (``candor-app-hash 1``). An app is

- its **files**, each named by its path in the FAB (POSIX, relative, e.g.
  ``client/app.py``): every file of the FAB except ``pyproject.toml`` and Flower's
  metadata directory ``.info/`` (the manifest ``.info/CONTENT``, which Flower removes when
  it installs a FAB and never loads);
- its **components**: every entry of ``[tool.flwr.app.components]`` in its
  ``pyproject.toml`` (``clientapp``, ``serverapp``), i.e. which module Flower imports.
  ``pyproject.toml`` itself is not hashed: Flower re-serializes it when it builds a FAB,
  so its bytes are not reproducible; what else it holds is the coordinator's choice
  anyway (project name and version, run-config defaults) or unused at a site (its
  dependencies: Candor turns Flower's runtime dependency installation off).

The app hash is the SHA-256 of the UTF-8 text::

    candor-app-hash 1
    component clientapp candor.client.app:app
    component serverapp candor.server.app:app
    <sha256 of the file's bytes, hex>  <path>        one line per file, sorted by path

(components sorted by name, files by path in code-point order; every line ends with
``\\n``). The file lines are ``sha256sum``'s format, so the hash of an unpacked FAB can be
checked with ordinary tools. A FAB zip is not byte-reproducible (compression, Flower's
re-serialized pyproject.toml), which is why the zip's own SHA-256 (Flower's ``fab_hash``)
is not used.

Paths are refused (:class:`AppBundleError`) when a FAB holds one twice, an absolute
path, a ``..``, ``.`` or empty component, a backslash, a drive letter or a control
character, a symbolic link, or an encrypted entry.

**The installed release.** :func:`installed_release` computes the same hash from the
``candor`` package Python imports (``importlib.util.find_spec``; a wheel install and an
editable one alike), mapping ``candor/<folder>/...`` back to the FAB path
``<folder>/...`` (``pyproject.toml``'s ``[tool.setuptools.package-dir]``). Its files are
the ``*.py`` files at any depth of each of :data:`RELEASE_PACKAGES` and the package data
:data:`RELEASE_PACKAGE_DATA`, without ``__pycache__/`` and without ``test_*.py`` and
``*_test.py`` (which Flower's build always leaves out); its components are
:data:`RELEASE_COMPONENTS`. ``pyproject.toml``'s ``fab-include`` is
:data:`RELEASE_FAB_INCLUDE`, so that ``flwr run`` of the repository submits exactly these
files: the FAB of a release and the installation of the same release have one hash
(``tests/common/test_app_hash.py`` builds the FAB with Flower's own build to check it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tomllib
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import CandorError

__all__ = [
    "APP_SHA256_ENV", "AppBundleError", "AppContent", "AppDiff", "HASH_VERSION", "RELEASE_COMPONENTS",
    "RELEASE_FAB_INCLUDE", "RELEASE_PACKAGES", "RELEASE_PACKAGE_DATA", "fab_files", "import_layout",
    "installed_release", "installed_release_files", "read_app_dir", "read_fab", "read_unpacked_app",
    "running_app_sha256", "submitted_app_sha256",
]

HASH_VERSION = "candor-app-hash 1"
PYPROJECT = "pyproject.toml"
FLOWER_METADATA_DIR = ".info"

# FAB folder -> installed package (pyproject.toml: [tool.setuptools.package-dir]).
RELEASE_PACKAGES: dict[str, str] = {
    "common": "candor.common",
    "client": "candor.client",
    "server": "candor.server",
    "simulations": "candor.simulations",
}
# Package data a FAB of the release carries, per folder (relative glob, one level).
RELEASE_PACKAGE_DATA: dict[str, tuple[str, ...]] = {"common": ("schemas/*.toml",)}
# [tool.flwr.app.components] of the release (pyproject.toml; tested to agree).
RELEASE_COMPONENTS: dict[str, str] = {"clientapp": "candor.client.app:app", "serverapp": "candor.server.app:app"}
# [tool.flwr.app] fab-include of pyproject.toml (tested to agree): the release's files only.
RELEASE_FAB_INCLUDE: tuple[str, ...] = (
    *(f"{folder}/**/*.py" for folder in RELEASE_PACKAGES),
    *(f"{folder}/{pattern}" for folder, patterns in RELEASE_PACKAGE_DATA.items() for pattern in patterns),
)
# Set by the site's guard (client.clientapp_main) in the ClientApp process: the hash it verified.
APP_SHA256_ENV = "CANDOR_APP_SHA256"

MAX_FAB_BYTES = 10 * 1024 * 1024  # Flower's own FAB size limit (flwr.common.constant.FAB_MAX_SIZE)
MAX_UNPACKED_BYTES = 64 * 1024 * 1024  # what a FAB may expand to (a zip bomb is refused before reading)
MAX_FILES = 10_000
_COMPONENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AppBundleError(CandorError):
    """An app bundle (FAB) or app directory is malformed, or its code cannot be hashed."""


@dataclass(frozen=True)
class AppDiff:
    """What differs between an app and a base app (e.g. the installed release)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    components: tuple[tuple[str, str | None, str | None], ...] = ()  # (name, base's, app's)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.components)


@dataclass(frozen=True)
class AppContent:
    """What the app hash covers: components and ``path -> sha256`` of every file."""

    components: Mapping[str, str]
    files: Mapping[str, str] = field(default_factory=dict)

    def listing(self) -> str:
        """The hashed text (module docstring)."""
        lines = [HASH_VERSION]
        lines += [f"component {name} {self.components[name]}" for name in sorted(self.components)]
        lines += [f"{self.files[path]}  {path}" for path in sorted(self.files)]
        return "\n".join(lines) + "\n"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.listing().encode("utf-8")).hexdigest()

    def diff(self, base: AppContent) -> AppDiff:
        names = sorted(set(self.components) | set(base.components))
        return AppDiff(
            added=tuple(sorted(set(self.files) - set(base.files))),
            removed=tuple(sorted(set(base.files) - set(self.files))),
            changed=tuple(sorted(p for p in set(self.files) & set(base.files) if self.files[p] != base.files[p])),
            components=tuple((n, base.components.get(n), self.components.get(n)) for n in names
                             if base.components.get(n) != self.components.get(n)),
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_path(name: str, where: str) -> str:
    """``name`` if it is a safe relative POSIX path; else AppBundleError."""
    rule = ("every path in an app must be relative, in POSIX form, without '..', '.', empty parts, "
            "backslashes, drive letters or control characters")
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or _CONTROL.search(name) or re.match(r"^[A-Za-z]:", name)
            or any(part in ("", ".", "..") for part in parts)):
        raise AppBundleError(f"{where}: holds the path {name!r}; {rule}. It is not a FAB built by `flwr build`; "
                             "refuse it")
    return name


def _hashed(path: str) -> bool:
    return path != PYPROJECT and path.split("/", 1)[0] != FLOWER_METADATA_DIR


def _components(pyproject: bytes | None, where: str) -> dict[str, str]:
    """``[tool.flwr.app.components]`` of a pyproject.toml, validated."""
    if pyproject is None:
        raise AppBundleError(f"{where}: has no {PYPROJECT}; a Flower App names its components there")
    try:
        doc = tomllib.loads(pyproject.decode("utf-8"))
        table = doc["tool"]["flwr"]["app"]["components"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as err:
        raise AppBundleError(f"{where}: its {PYPROJECT} has no readable [tool.flwr.app.components] ({err})") from None
    if not isinstance(table, dict) or "clientapp" not in table:
        raise AppBundleError(f"{where}: its {PYPROJECT} names no clientapp in [tool.flwr.app.components]")
    out = {}
    for name, ref in table.items():
        if not isinstance(ref, str) or not _COMPONENT.match(ref) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise AppBundleError(f"{where}: component {name!r} = {ref!r} in {PYPROJECT} is not of the form "
                                 "'package.module:attribute'")
        out[name] = ref
    return out


def fab_files(fab: bytes, *, where: str = "the app bundle") -> dict[str, bytes]:
    """Every file of a FAB, ``path -> bytes``, with its paths checked (module docstring).

    Raises:
        AppBundleError: not a zip, too large, or an entry breaks the path rules.
    """
    if len(fab) > MAX_FAB_BYTES:
        raise AppBundleError(f"{where}: {len(fab)} bytes; a FAB is at most {MAX_FAB_BYTES} bytes")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as err:
        raise AppBundleError(f"{where}: not a FAB (zip) file ({err})") from None
    with archive:
        for info in archive.infolist():  # directory entries too; a NUL cuts Python's name short: check the original
            _check_path(info.orig_filename.removesuffix("/") if info.is_dir() else info.orig_filename, where)
        infos = [i for i in archive.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise AppBundleError(f"{where}: holds {', '.join(map(repr, twice))} more than once; which copy runs "
                                 "would depend on the unpacker. Refuse it")
        if len(infos) > MAX_FILES or sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
            raise AppBundleError(f"{where}: more than {MAX_FILES} files or {MAX_UNPACKED_BYTES} bytes unpacked")
        files = {}
        for info in infos:
            _check_path(info.filename, where)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise AppBundleError(f"{where}: {info.filename!r} is a symbolic link; an app holds regular files only")
            if info.flag_bits & 0x1:
                raise AppBundleError(f"{where}: {info.filename!r} is encrypted")
            try:
                files[info.filename] = archive.read(info)
            except (zipfile.BadZipFile, OSError, RuntimeError) as err:
                raise AppBundleError(f"{where}: {info.filename!r} cannot be read ({err})") from None
    return files


def read_fab(fab: bytes, *, where: str = "the app bundle") -> AppContent:
    """The hashed content of a FAB's bytes (``read_fab(fab).sha256`` is its app hash)."""
    files = fab_files(fab, where=where)
    return AppContent(components=_components(files.get(PYPROJECT), where),
                      files={path: _sha256(data) for path, data in files.items() if _hashed(path)})


def read_app_dir(app_dir: str | os.PathLike) -> tuple[AppContent, bytes]:
    """(content, FAB bytes) of an app directory, built with Flower's own ``flwr build``
    code (``build_fab_from_disk``), so that the files are exactly the ones ``flwr run``
    of that directory would submit (its ``fab-include``, ``.gitignore`` and Flower's rules).

    Raises:
        AppBundleError: not a directory, or Flower refuses to build it.
    """
    path = Path(app_dir)
    if not (path / PYPROJECT).is_file():
        raise AppBundleError(f"{path}: not a Flower App directory (no {PYPROJECT}); give the app's directory or "
                             "its .fab file")
    from flwr.cli.build import build_fab_from_disk  # the CLI's build: typer, click; only here

    try:
        fab = build_fab_from_disk(path)
    except Exception as err:  # Flower raises ValueError, click and its own errors for a bad app
        raise AppBundleError(f"{path}: Flower cannot build it into a FAB ({type(err).__name__}: {err})") from None
    return read_fab(fab, where=str(path)), fab


def read_unpacked_app(app_dir: str | os.PathLike) -> AppContent:
    """The hashed content of a FAB as Flower unpacked it (e.g. the directory the ServerApp
    runs from, ``flwr.common.config.get_project_dir(run.fab_id, run.fab_version,
    run.fab_hash)``): every regular file in it, nothing filtered.

    Raises:
        AppBundleError: no pyproject.toml, a symbolic link, or an unreadable file.
    """
    root = Path(app_dir)
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            if (here / name).is_symlink():
                raise AppBundleError(f"{here / name}: a symbolic link in an unpacked app")
        for name in filenames:
            path = _check_path((here / name).relative_to(root).as_posix(), str(root))
            if _hashed(path):
                try:
                    files[path] = _sha256((here / name).read_bytes())
                except OSError as err:
                    raise AppBundleError(f"{here / name}: unreadable ({err})") from None
    try:
        pyproject = (root / PYPROJECT).read_bytes()
    except OSError:
        pyproject = None
    return AppContent(components=_components(pyproject, str(root)), files=files)


def submitted_app_sha256(run) -> str | None:
    """The app hash of the FAB a Flower ``Run`` was submitted with, read from the
    directory Flower unpacked it into in this process's FLWR_HOME (the ServerApp's
    process: ``flwr.common.config.get_project_dir``); ``None`` if it is not there."""
    from flwr.common.config import get_project_dir

    try:
        return read_unpacked_app(get_project_dir(run.fab_id, run.fab_version, run.fab_hash)).sha256
    except (AppBundleError, ValueError, AttributeError):
        return None


def _package_dir(module: str) -> Path:
    """The one directory Python imports ``module`` (a regular package) from."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise AppBundleError(f"the installed Candor release has no package {module} ({err}); reinstall Candor") from None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if len(locations) != 1 or not spec.origin or Path(spec.origin).name != "__init__.py":
        raise AppBundleError(f"{module} is not one installed package directory (found {locations}); another "
                             f"'{module.replace('.', '/')}' folder on sys.path shadows it: remove it or reinstall Candor")
    return Path(locations[0])


def _release_file(folder: str, rel: PurePosixPath) -> bool:
    """Whether ``rel`` (inside the package folder) belongs to the release: module docstring."""
    name = rel.name
    if "__pycache__" in rel.parts:
        return False
    if name.endswith(".py"):
        return not (name.startswith("test_") or name.endswith("_test.py"))
    return any(len(rel.parts) == len(PurePosixPath(p).parts) and rel.match(p)
               for p in RELEASE_PACKAGE_DATA.get(folder, ()))


def installed_release_files() -> dict[str, Path]:
    """FAB path -> installed file, for every file of the installed release."""
    out: dict[str, Path] = {}
    for folder, module in RELEASE_PACKAGES.items():
        root = _package_dir(module)
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            for name in [*dirnames, *filenames]:
                if (here / name).is_symlink():
                    raise AppBundleError(f"{here / name}: a symbolic link inside the installed Candor package; the "
                                         "installed release is hashed from regular files only (reinstall Candor)")
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                rel = PurePosixPath((here / name).relative_to(root).as_posix())
                if _release_file(folder, rel):
                    out[_check_path(f"{folder}/{rel}", str(root))] = here / name
    return out


def installed_release() -> AppContent:
    """The hashed content of the Candor release Python imports here."""
    files = {}
    for path, source in sorted(installed_release_files().items()):
        try:
            files[path] = _sha256(source.read_bytes())
        except OSError as err:
            raise AppBundleError(f"{source}: unreadable ({err}); the installed Candor release cannot be hashed") from None
    return AppContent(components=dict(RELEASE_COMPONENTS), files=files)


_RUNNING: str | None = None


def running_app_sha256() -> str:
    """The app hash of the code running in this process: what the site's guard verified
    (``$CANDOR_APP_SHA256``), else the installed release (a simulation, a test), once."""
    global _RUNNING
    verified = os.environ.get(APP_SHA256_ENV)
    if verified:
        return verified
    if _RUNNING is None:
        _RUNNING = installed_release().sha256
    return _RUNNING


def import_layout(paths: Iterable[str]) -> dict[str, list[str]]:
    """Where each file of an app goes in the directory it is imported from: FAB path ->
    the paths it is written to.

    Every file stays at its FAB path (as Flower unpacks it); a file under one of Candor's
    package folders is also written under ``candor/<folder>/`` (the layout pip installs),
    so that ``candor.*`` names resolve to the app's own bytes and never fall through to a
    different installed release.

    Raises:
        AppBundleError: the app also has its own ``candor/<folder>/`` for such a folder
            (two sources for one package), or one path would be both a file and a folder.
    """
    paths = sorted(paths)
    folders = {p.split("/", 1)[0] for p in paths if "/" in p} & set(RELEASE_PACKAGES)
    own = {p.split("/")[1] for p in paths if p.startswith("candor/") and p.count("/") >= 2}
    both = sorted(folders & own)
    if both:
        raise AppBundleError(f"the app holds both {both[0]}/ and candor/{both[0]}/: two sources for the package "
                             f"{RELEASE_PACKAGES[both[0]]}; refuse it")
    layout = {p: [p, f"candor/{p}"] if p.split("/", 1)[0] in folders else [p] for p in paths}
    targets = {t for ts in layout.values() for t in ts}
    for target in sorted(targets):
        parts = target.split("/")
        clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in targets), None)
        if clash:
            raise AppBundleError(f"the app holds {clash!r} as a file and as the folder of {target!r}; refuse it")
    return layout
