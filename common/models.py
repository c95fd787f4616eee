"""Model factory: the built-in tabular models and the plug-in hook.

Built-ins (both Opacus-compatible: only ``nn.Linear`` and ``nn.ReLU``):

- ``"mlp"``: inputs -> 64 -> 32 -> outputs with ReLU (widths from ``hidden``);
- ``"logreg"``: one ``nn.Linear`` (logistic regression on the logits).

Outputs are logits: 1 for a binary task (``BCEWithLogitsLoss`` on a (B,) target), K for
a K-class task (``CrossEntropyLoss``).

Plug-in: ``model = "package.module:factory"`` imports ``factory`` and calls
``factory(num_features=..., num_outputs=...)``; it must return an ``nn.Module`` that
maps a float tensor (B, num_features) to logits (B, num_outputs) and that Opacus can
wrap (see ``opacus.validators.ModuleValidator``; no BatchNorm).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .errors import ConfigError


def build_model(spec: str, *, num_features: int, num_outputs: int, hidden: tuple[int, ...] = (64, 32)) -> nn.Module:
    """A fresh model for ``spec`` ("mlp", "logreg" or "module:factory")."""
    if spec == "logreg":
        return nn.Sequential(nn.Linear(num_features, num_outputs))
    if spec == "mlp":
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        return nn.Sequential(*layers)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"The 'model' parameter names '{spec}', which cannot be imported ({err}). "
            "Use 'mlp', 'logreg', or 'package.module:factory' importable at every site."
        ) from None
    model = factory(num_features=num_features, num_outputs=num_outputs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"The model factory '{spec}' returned {type(model).__name__}, not a torch nn.Module.")
    return model


def state_to_numpy(model: nn.Module) -> dict:
    """The model's parameters as numpy arrays (a private model's ``_module.`` prefix removed)."""
    inner = getattr(model, "_module", model)
    return {k: v.detach().cpu().numpy() for k, v in inner.state_dict().items()}


def load_numpy_state(model: nn.Module, state: dict) -> None:
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
