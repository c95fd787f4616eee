"""``model.pt``: the one format of a saved global model, with its one writer and reader.

A ``model.pt`` is a ``torch.save`` of a dict of plain types and tensors only, so that
``torch.load(weights_only=True)`` reads it and a file from elsewhere cannot run code::

    {"format": "candor-model.pt", "version": 1,
     "state_dict": {name: tensor}, "model": "mlp" | "logreg" | "module:factory",
     "hidden": [64, 32], "feature_names": [encoded column names, in order],
     "schema": {the federation's schema as a dict}, "schema_sha256": "..."}

Files written before the ``format``/``version`` keys existed are version 1 too. The
run directory (``server.outputs``), the exports and the audit check (``server``) and
``candor-client predict``/``explain`` (``common.explain``) all go through
:meth:`ModelFile.save` and :meth:`ModelFile.load`.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomic
from .errors import ModelFileError, SchemaError
from .schema import Schema

__all__ = ["MODEL_FILE", "ModelFile"]

MODEL_FILE = "model.pt"
FORMAT = "candor-model.pt"
VERSION = 1
_KEYS = ("state_dict", "model", "hidden", "feature_names", "schema", "schema_sha256")


@dataclass(frozen=True)
class ModelFile:
    """A global model with what is needed to use it: architecture, encoded feature
    names and the schema that defines the encoding."""

    state_dict: dict[str, torch.Tensor]
    model: str
    hidden: tuple[int, ...]
    feature_names: tuple[str, ...]
    schema: Schema

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({
            "format": FORMAT,
            "version": VERSION,
            "state_dict": self.state_dict,
            "model": self.model,
            "hidden": list(self.hidden),
            "feature_names": list(self.feature_names),
            "schema": self.schema.to_dict(),
            "schema_sha256": self.schema.sha256(),
        }, buffer)
        return buffer.getvalue()

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file, fsync, rename): a kill leaves the old file or the new."""
        write_atomic(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelFile:
        """Read and check ``path`` (a ``model.pt``, or a directory holding one).

        Raises:
            ModelFileError: no such file, or a file that is not a Candor model (not a
                weights-only PyTorch file, missing keys, an unknown version, a schema that
                does not match its fingerprint or its feature names).
        """
        given = Path(path)
        file = given / MODEL_FILE if given.is_dir() else given
        if not file.is_file():
            raise ModelFileError(f"{given}: no model found; give a run directory or bundle directory containing "
                                 f"{MODEL_FILE}, or the {MODEL_FILE} file itself")

        def corrupt(why: str) -> ModelFileError:
            return ModelFileError(f"{file}: not a usable Candor model file ({why}); fetch the model "
                                  "again from the coordinator's run directory or bundle")

        try:
            doc = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False, which would run the file's code: never pass it on
            raise corrupt("it holds objects other than tensors and plain values, which are refused unread") from None
        except Exception as err:  # noqa: BLE001  torch's reader fails in many ways on a file that is no model
            raise corrupt(f"not a PyTorch file ({type(err).__name__})") from None
        if not isinstance(doc, dict) or any(k not in doc for k in _KEYS):
            raise corrupt(f"expected the keys {', '.join(_KEYS)}")
        if doc.get("format", FORMAT) != FORMAT or doc.get("version", 1) != VERSION:
            raise corrupt(f"format {doc.get('format')!r} version {doc.get('version')!r}; this Candor reads "
                          f"{FORMAT!r} version {VERSION}: use the Candor release that wrote it")
        try:
            schema = Schema.from_dict(doc["schema"], source=str(file))
        except SchemaError as err:
            raise corrupt(f"its schema is invalid: {err}") from None
        if schema.sha256() != doc["schema_sha256"]:
            raise corrupt("its schema does not match the schema fingerprint stored with it")
        from .encoding import Encoder

        if list(doc["feature_names"]) != Encoder(schema).feature_names:
            raise corrupt("its encoded feature names do not match its schema")
        return cls(state_dict=dict(doc["state_dict"]), model=str(doc["model"]),
                   hidden=tuple(int(h) for h in doc["hidden"]), feature_names=tuple(doc["feature_names"]),
                   schema=schema)

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode.

        Raises:
            ModelFileError: the weights do not fit the named architecture.
        """
        from .models import build_model

        module = build_model(self.model, num_features=len(self.feature_names),
                             num_outputs=self.schema.num_outputs, hidden=self.hidden)
        try:
            module.load_state_dict(self.state_dict)
        except (RuntimeError, TypeError) as err:
            raise ModelFileError(f"the weights do not fit a '{self.model}' model: "
                                 f"{str(err).splitlines()[0]}") from None
        return module.eval()
