"""model.pt: one writer and one reader (common/model_file.py); a bad file is one clear
line that never suggests loading it with code execution."""

from __future__ import annotations

import pickle

import pytest
import torch

from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.encoding import Encoder
from candor.common.errors import ModelFileError
from candor.common.model_file import ModelFile
from candor.common.models import build_model
from candor.common.schema import Schema


@pytest.fixture
def saved(tmp_path):
    schema = Schema.load(DEMO_SCHEMA_PATH)
    encoder = Encoder(schema)
    torch.manual_seed(0)
    model = build_model("logreg", num_features=encoder.num_features, num_outputs=1, hidden=())
    file = ModelFile(state_dict=model.state_dict(), model="logreg", hidden=(), feature_names=tuple(encoder.feature_names),
                     schema=schema)
    file.save(tmp_path / "model.pt")
    return file, model, tmp_path / "model.pt"


def test_a_saved_model_reads_back_whole(saved):
    file, model, path = saved
    again = ModelFile.load(path.parent)  # a directory holding model.pt, or the file itself
    assert again.model == "logreg" and again.feature_names == file.feature_names
    assert again.schema.sha256() == file.schema.sha256()
    x = torch.rand(5, len(file.feature_names))
    with torch.no_grad():
        assert torch.equal(again.build()(x), model(x))
    doc = torch.load(path, weights_only=True)
    assert (doc["format"], doc["version"]) == ("candor-model.pt", 1)


@pytest.mark.parametrize("content", [b"age,chol\n1,2\n", b"\x00garbage", b""])
def test_a_file_that_is_not_a_model_is_one_clear_line(tmp_path, content):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"model.pt: not a usable Candor model file") as err:
        ModelFile.load(bad)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pickle_with_code_is_refused_unread_and_no_unsafe_advice_is_given(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "payload": Payload()}, bad)
    with pytest.raises(ModelFileError, match="refused unread") as err:
        ModelFile.load(bad)
    assert "weights_only" not in str(err.value)


def test_a_newer_format_version_is_refused_with_what_to_do(saved, tmp_path):
    _, _, path = saved
    doc = torch.load(path, weights_only=True)
    doc["version"] = 2
    torch.save(doc, tmp_path / "newer.pt")
    with pytest.raises(ModelFileError, match="version 2.*use the Candor release that wrote it"):
        ModelFile.load(tmp_path / "newer.pt")


def test_no_model_in_a_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no model found"):
        ModelFile.load(tmp_path)
