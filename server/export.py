"""What leaves the run directory: portable exports of the model, and the published bundle.

:func:`export_model` writes, from ``model.pt``:

- ``model.safetensors``: the weights (Hugging Face's safetensors: no pickle, so loading
  cannot run code; readable from PyTorch, numpy, JAX, Rust...);
- ``model_schema.json``: what another institution needs to use those weights without
  Candor: the layers, how each input column is encoded from a raw record, what the
  outputs mean, and the federation's schema;
- ``model.onnx``: the whole network as ONNX (opset 17, TorchScript exporter), input
  ``features`` float32 (batch, d), output ``logits`` (batch, outputs);
- ``schema.json``: the federation's schema, readable by ``Schema.load`` and
  ``candor-client check --schema``.

:func:`finalise` runs at the end of a run: exports, model card, final audit entry.
:func:`publish` copies a verified run's shareable files, and only those, to a new folder.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from candor.common.atomic import write_atomic, write_json_atomic
from candor.common.auditlog import AuditLogError
from candor.common.hashing import hash_arrays
from candor.common.model_file import MODEL_FILE, ModelFile
from candor.common.schema import Schema, indicator_column

from .audit import AUDIT_LOG, PUBLIC_KEY, AuditLog, verify_run
from .outputs import RunRecorder

logger = logging.getLogger(__name__)

EXPORTS = ("model.safetensors", "model_schema.json", "model.onnx", "schema.json")
CARD_FILES = ("MODEL_CARD.md", "model_card.json")
BUNDLE = (MODEL_FILE, *EXPORTS, *CARD_FILES, AUDIT_LOG, PUBLIC_KEY)  # everything publish copies
OPTIONAL = {"model.onnx"}  # absent when a plug-in model cannot be exported to ONNX
FORMAT = "candor-model/1"


def _layers(model: nn.Module) -> list[dict[str, Any]] | None:
    """The layers of a Linear/ReLU ``nn.Sequential`` (the built-in models), else ``None``."""
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[dict[str, Any]] = []
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            layers.append({"type": "linear", "in": module.in_features, "out": module.out_features,
                           "weight": f"{name}.weight", "bias": f"{name}.bias" if module.bias is not None else None})
        elif isinstance(module, nn.ReLU):
            layers.append({"type": "relu"})
        else:
            return None
    return layers


def _inputs(schema: Schema) -> list[dict[str, Any]]:
    """One entry per encoded input column, in order (common.encoding.Encoder's rules)."""
    columns: list[dict[str, Any]] = []
    for f in schema.features:
        missing = {"missing": f.missing, **({"impute": f.impute} if f.impute is not None else {})}
        if f.kind == "numeric":
            columns.append({"name": f.name, "feature": f.name, "encoding": "scaled", "lower": f.lower,
                            "upper": f.upper, "out_of_bounds": f.out_of_bounds, **missing})
        elif f.kind == "categorical":
            columns += [{"name": f"{f.name}={level}", "feature": f.name, "encoding": "one-hot", "level": level,
                         **missing} for level in f.levels]
        else:
            columns.append({"name": f.name, "feature": f.name, "encoding": "boolean", **missing})
        if f.missing == "indicator":
            columns.append({"name": indicator_column(f.name), "feature": f.name, "encoding": "missing-indicator"})
    return columns


def model_schema(saved: ModelFile, model: nn.Module) -> dict[str, Any]:
    schema = saved.schema
    label = schema.label
    if label.task == "binary":
        outputs = {"task": "binary", "logits": 1, "probability": "sigmoid(logit) = P(class 1)",
                   "class_1": list(label.positive), "class_0": list(label.negative)}
    else:
        outputs = {"task": "multiclass", "logits": len(label.classes), "probability": "softmax(logits)",
                   "classes": list(label.classes)}
    return {
        "format": FORMAT,
        "weights": "model.safetensors",
        "model_sha256": hash_arrays(saved.state_dict),
        "architecture": {"model": saved.model, "hidden": list(saved.hidden), "layers": _layers(model)},
        "inputs": _inputs(schema),
        "encoding": {
            "scaled": "(x - lower) / (upper - lower) * 2 - 1 (out_of_bounds 'clip': clip x to [lower, upper] first)",
            "one-hot": "1.0 if the value equals level (compared as text, numbers normalised: 1 == 1.0), else 0.0",
            "boolean": "1.0 for true / 1 / yes, 0.0 for false / 0 / no",
            "missing-indicator": "1.0 if the feature's value was missing (and imputed), else 0.0",
            "missing": "'drop': the model cannot score a record missing it; 'impute': use 'impute'; "
                       "'indicator': use 'impute' and set the indicator column",
        },
        "outputs": outputs,
        "schema_sha256": schema.sha256(),
        "schema": schema.to_dict(),
    }


def _safetensors(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes that are the same for the same tensors and metadata.

    safetensors keeps ``__metadata__`` in a hash map whose order changes from process to
    process, so two identical runs would export different bytes. The JSON header (8-byte
    little-endian length, then the header, space-padded) is rewritten with sorted keys:
    the same characters in a fixed order, so its length, the padding and the tensor
    offsets are unchanged, and ``safe_open`` reads it as before.
    """
    raw = safetensors_bytes(state, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    ordered = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(ordered) > size:
        raise RuntimeError("safetensors header grew when its keys were sorted")  # not reachable: same characters
    return raw[:8] + ordered.ljust(size, b" ") + raw[8 + size:]


def export_model(run_dir: str | Path) -> list[str]:
    """Write the exports of ``run_dir/model.pt``; returns the names written."""
    run_dir = Path(run_dir)
    saved = ModelFile.load(run_dir / MODEL_FILE)
    model, schema = saved.build(), saved.schema
    spec = model_schema(saved, model)
    state = {k: v.detach().contiguous() for k, v in saved.state_dict.items()}
    write_atomic(run_dir / "model.safetensors", _safetensors(state, {
        "format": FORMAT, "model_sha256": spec["model_sha256"], "schema_sha256": spec["schema_sha256"]}))
    write_json_atomic(run_dir / "model_schema.json", spec)
    write_json_atomic(run_dir / "schema.json", schema.to_dict())
    written = ["model.safetensors", "model_schema.json", "schema.json"]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (torch.zeros(1, len(spec["inputs"])),), buffer, dynamo=False, opset_version=17,
                              input_names=["features"], output_names=["logits"],
                              dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as err:  # a plug-in model the exporter cannot trace: the other exports stand
        logger.warning("model.onnx not written: torch.onnx cannot export this model (%s: %s)",
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        (run_dir / "model.onnx").unlink(missing_ok=True)
    else:
        write_atomic(run_dir / "model.onnx", buffer.getvalue())
        written.append("model.onnx")
    return written


def finalise(recorder: RunRecorder, log: AuditLog) -> None:
    """End of a run, after ``recorder.finish``: exports, model card, final audit entry."""
    from .model_card import write_model_card

    exports = export_model(recorder.dir)
    cards = write_model_card(recorder, log)
    log.final(model_sha256=hash_arrays(ModelFile.load(recorder.dir / MODEL_FILE).state_dict), files=[MODEL_FILE, *exports, *cards],
              privacy=recorder.privacy_doc())


def publish(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Verify ``run_dir``, then copy its shareable files (:data:`BUNDLE`) to the new or
    empty folder ``out_dir``. Never copies ledgers, site data, logs or private keys.
    Returns the names copied."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    verify_run(run_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AuditLogError(f"{out_dir}: exists and is not an empty folder; publish into a new folder")
    names = [n for n in BUNDLE if (run_dir / n).is_file() or n not in OPTIONAL]
    missing = [n for n in names if not (run_dir / n).is_file()]
    if missing:
        raise AuditLogError(f"{run_dir}: missing {', '.join(missing)}; only a finished run can be published")
    for name in names:
        write_atomic(out_dir / name, (run_dir / name).read_bytes())
    verify_run(out_dir)
    return names
