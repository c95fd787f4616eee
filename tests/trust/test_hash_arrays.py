"""hash_arrays: one fingerprint for the same arrays, however they travelled."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import torch
from flwr.app import ArrayRecord

from candor.common.hashing import hash_arrays


def test_same_hash_for_torch_state_dict_array_record_and_numpy():
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).state_dict()
    as_numpy = {k: v.numpy() for k, v in state.items()}
    assert hash_arrays(state) == hash_arrays(ArrayRecord(state)) == hash_arrays(as_numpy)
    assert hash_arrays(dict(reversed(list(as_numpy.items())))) == hash_arrays(as_numpy)  # key order is irrelevant
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in as_numpy.items()}
    assert hash_arrays(big_endian) == hash_arrays(as_numpy)


def test_matches_the_documented_canonical_bytes():
    arrays = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 1), dtype=np.int64)}
    expected = hashlib.sha256()
    for key in ("a", "b"):
        a = arrays[key]
        header = json.dumps({"dtype": a.dtype.str, "key": key, "shape": list(a.shape)}, sort_keys=True,
                            separators=(",", ":"))
        expected.update(header.encode() + b"\n" + a.astype(a.dtype.newbyteorder("<")).tobytes())
    assert hash_arrays(arrays) == expected.hexdigest()


def test_any_change_of_name_dtype_shape_or_value_changes_the_hash():
    base = {"w": np.zeros((2, 3), dtype=np.float32)}
    variants = [{"v": base["w"]}, {"w": base["w"].astype(np.float64)}, {"w": base["w"].reshape(3, 2)},
                {"w": np.where(np.arange(6).reshape(2, 3) == 5, np.float32(1e-30), base["w"])}, {}]
    hashes = {hash_arrays(base)} | {hash_arrays(v) for v in variants}
    assert len(hashes) == len(variants) + 1


def test_the_app_hash_is_the_documented_shell_pipeline_on_the_bundle_flwr_run_submits(tmp_path):
    """docs/deployment.md's recomputation, on the FAB Flower builds from this repository,
    gives the installed release's hash, which the audit log's start entry records."""
    from flwr.cli.build import build_fab_from_disk

    from candor.common.app_hash import installed_release
    from candor.common.processes import APP_DIR

    (tmp_path / "app.fab").write_bytes(build_fab_from_disk(APP_DIR))
    subprocess.run([sys.executable, "-m", "zipfile", "-e", "app.fab", "app/"], cwd=tmp_path, check=True)
    shell = subprocess.run(
        "{ printf 'candor-app-hash 1\\n'; "
        "printf 'component clientapp candor.client.app:app\\ncomponent serverapp candor.server.app:app\\n'; "
        "find . -type f ! -path ./pyproject.toml ! -path './.info/*' | sed 's|^\\./||' | LC_ALL=C sort "
        "| xargs sha256sum; } | sha256sum", shell=True, cwd=tmp_path / "app", capture_output=True, text=True,
        check=True)
    assert installed_release().sha256 == shell.stdout.split()[0]