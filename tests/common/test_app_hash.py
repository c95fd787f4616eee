"""The app hash: one definition for a FAB, an app directory and the installed release."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk, build_fab_from_files
from flwr.cli.utils import collect_files

from candor.common.app_hash import (
    RELEASE_COMPONENTS, RELEASE_FAB_INCLUDE, AppBundleError, fab_files, import_layout, installed_release,
    installed_release_files, read_app_dir, read_fab, read_unpacked_app,
)
from candor.common.processes import APP_DIR

PYPROJECT = """\
[project]
name = "tiny"
version = "1.0.0"

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "tiny.server:app"
clientapp = "tiny.client:app"
"""


def _zip(files: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release_fab() -> bytes:
    return build_fab_from_disk(APP_DIR)  # what `flwr run` of the repository submits


def test_the_fab_flower_builds_from_the_repository_has_the_installed_release_hash(release_fab):
    installed = installed_release()
    assert read_fab(release_fab) == installed  # same components, same files, same file hashes
    assert read_fab(release_fab).sha256 == installed.sha256
    files, _ = build_fab_from_files(collect_files(APP_DIR))
    assert read_fab(files).sha256 == installed.sha256


def test_flwr_build_on_the_command_line_gives_the_same_hash(tmp_path):
    proc = subprocess.run([Path(sys.executable).parent / "flwr", "build", "--app", APP_DIR], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fab,) = tmp_path.glob("*.fab")
    assert read_fab(fab.read_bytes()).sha256 == installed_release().sha256


def test_the_fab_holds_only_pyproject_and_the_release_packages(release_fab):
    names = set(fab_files(release_fab))
    assert {"pyproject.toml", ".info/CONTENT", "client/app.py", "server/app.py", "common/schemas/breast_cancer.toml"} <= names
    assert all(n.split("/", 1)[0] in {"common", "client", "server", "simulations"} for n in names
               - {"pyproject.toml", ".info/CONTENT"}), sorted(names)
    assert not any(n.startswith(("docs/", "tests/", "benchmarks/")) for n in names)


def test_pyproject_names_the_release_components_and_its_fab_include():
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == RELEASE_COMPONENTS
    assert app["fab-include"] == list(RELEASE_FAB_INCLUDE)


def test_installed_files_are_the_ones_python_imports():
    import candor.client.app
    import candor.common.schema

    files = installed_release_files()
    assert files["client/app.py"] == Path(candor.client.app.__file__)
    assert files["common/schema.py"] == Path(candor.common.schema.__file__)
    assert "common/schemas/breast_cancer.toml" in files
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in files)


def test_the_hash_is_the_documented_listing():
    client, helper = b"app = 'client'\n", b"x = 1\n"
    fab = _zip({"pyproject.toml": PYPROJECT.encode(), "tiny/client.py": client, "tiny/b/helper.py": helper,
                ".info/CONTENT": b"whatever Flower writes"})
    listing = ("candor-app-hash 1\n"
               "component clientapp tiny.client:app\n"
               "component serverapp tiny.server:app\n"
               f"{hashlib.sha256(helper).hexdigest()}  tiny/b/helper.py\n"
               f"{hashlib.sha256(client).hexdigest()}  tiny/client.py\n")
    assert read_fab(fab).sha256 == hashlib.sha256(listing.encode()).hexdigest()


def test_zip_bytes_and_pyproject_formatting_do_not_change_the_hash_but_components_do():
    files = {"tiny/client.py": b"app = 1\n", "tiny/server.py": b"app = 2\n"}
    plain = _zip({"pyproject.toml": PYPROJECT.encode(), **files})
    other = _zip({**dict(reversed(list(files.items()))),
                  "pyproject.toml": ("# a comment\n" + PYPROJECT.replace(" = ", "=")).encode()},
                 compression=zipfile.ZIP_DEFLATED)
    assert hashlib.sha256(plain).digest() != hashlib.sha256(other).digest()
    assert read_fab(plain).sha256 == read_fab(other).sha256
    swapped = _zip({"pyproject.toml": PYPROJECT.replace("tiny.client:app", "tiny.server:app").encode(), **files})
    assert read_fab(swapped).sha256 != read_fab(plain).sha256


@pytest.mark.parametrize("added", ["torch/__init__.py", "candor/__init__.py", "candor/client/app.py",
                                   "client/extra.py", "deep/a/b/c/d.py", "notes.md", "common/schemas/other.toml"])
def test_any_added_file_changes_the_hash(release_fab, added):
    files = fab_files(release_fab)
    assert read_fab(_zip({**files, added: b"print('not the release')\n"})).sha256 != installed_release().sha256


def test_one_changed_byte_or_a_removed_file_changes_the_hash(release_fab):
    files = fab_files(release_fab)
    changed = {**files, "client/app.py": files["client/app.py"] + b"\n"}
    removed = {k: v for k, v in files.items() if k != "client/receipts.py"}
    hashes = {read_fab(release_fab).sha256, read_fab(_zip(changed)).sha256, read_fab(_zip(removed)).sha256}
    assert len(hashes) == 3


def test_an_app_directory_is_hashed_as_flower_would_submit_it(tmp_path, release_fab):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(APP_DIR / "pyproject.toml", copy)
    for folder in ("common", "client", "server", "simulations"):
        shutil.copytree(APP_DIR / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "docs").mkdir()
    (copy / "docs" / "extra.md").write_text("not in the FAB: fab-include leaves it out\n")
    content, fab = read_app_dir(copy)
    assert content.sha256 == installed_release().sha256 and "docs/extra.md" not in fab_files(fab)
    (copy / "client" / "sneaky.py").write_text("import os\n")
    assert read_app_dir(copy)[0].diff(installed_release()).added == ("client/sneaky.py",)


def test_an_unpacked_fab_has_the_same_hash(tmp_path, release_fab):
    for name, data in fab_files(release_fab).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    shutil.rmtree(tmp_path / ".info")  # as Flower's install_from_fab leaves it
    assert read_unpacked_app(tmp_path).sha256 == installed_release().sha256


@pytest.mark.parametrize("name", ["/etc/passwd.py", "../up.py", "tiny/../../up.py", "tiny//x.py", "./x.py",
                                  "tiny/./x.py", "tiny\\x.py", "C:/x.py", "tiny/new\nline.py", "tiny/\x7f.py"])
def test_path_tricks_are_refused(name):
    with pytest.raises(AppBundleError, match="holds the path"):
        read_fab(_zip({"pyproject.toml": PYPROJECT.encode(), name: b"x = 1\n"}))


def test_a_nul_in_a_name_is_refused_though_python_would_cut_the_name_there():
    fab = _zip({"pyproject.toml": PYPROJECT.encode(), "tiny/A.py": b"x = 1\n"}).replace(b"tiny/A.py", b"tiny/\x00.py")
    with pytest.raises(AppBundleError, match="holds the path"):
        read_fab(fab)


def test_duplicate_paths_symbolic_links_and_missing_components_are_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", PYPROJECT)
        z.writestr("tiny/client.py", "app = 1\n")
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("tiny/client.py", "app = 2\n")
    with pytest.raises(AppBundleError, match="more than once"):
        read_fab(buffer.getvalue())
    link = zipfile.ZipInfo("tiny/link.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", PYPROJECT)
        z.writestr(link, "/etc/passwd")
    with pytest.raises(AppBundleError, match="symbolic link"):
        read_fab(buffer.getvalue())
    with pytest.raises(AppBundleError, match="no pyproject.toml"):
        read_fab(_zip({"tiny/client.py": b"app = 1\n"}))
    bad = PYPROJECT.replace('clientapp = "tiny.client:app"', 'clientapp = "tiny.client:app; import os"')
    with pytest.raises(AppBundleError, match="is not of the form"):
        read_fab(_zip({"pyproject.toml": bad.encode()}))
    with pytest.raises(AppBundleError, match="not a FAB"):
        read_fab(b"not a zip")


def test_import_layout_maps_candor_folders_and_refuses_two_sources():
    layout = import_layout(["pyproject.toml", "client/app.py", "common/x.py", "mine.py", "other/y.py"])
    assert layout["client/app.py"] == ["client/app.py", "candor/client/app.py"]
    assert layout["mine.py"] == ["mine.py"] and layout["other/y.py"] == ["other/y.py"]
    with pytest.raises(AppBundleError, match="both client/ and candor/client/"):
        import_layout(["client/app.py", "candor/client/evil.py"])
    with pytest.raises(AppBundleError, match="as a file and as the folder"):
        import_layout(["candor", "client/app.py"])


def test_a_candor_folder_shadowing_the_installation_is_not_the_installed_release(tmp_path):
    # Python would import candor.client from an earlier sys.path entry: the hash follows the import.
    shadow = tmp_path / "candor" / "client"
    shutil.copytree(Path(installed_release_files()["client/app.py"]).parent, shadow,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (shadow / "app.py").write_text((shadow / "app.py").read_text() + "\n# changed\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from candor.common.app_hash import installed_release; "
            "print(installed_release().sha256)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != installed_release().sha256
