"""The plug-in example of docs/plugins.md, exercised by test_plugins.py."""

import torch
from torch import nn

from candor.common.training import TensorSplit


def make_model(*, num_features: int, num_outputs: int) -> nn.Module:
    """A user's own network: any nn.Module Opacus can wrap (no BatchNorm)."""
    return nn.Sequential(nn.Linear(num_features, 16), nn.Tanh(), nn.Linear(16, num_outputs))


def load(data_path: str, *, test_path, test_fraction: float, seed: int):
    """A user's own loader: here, a tensor file holding x (N, d) and y (N,)."""
    blob = torch.load(data_path)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blob["y"]), generator=g)
    cut = int(len(order) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    names = [f"x{i}" for i in range(blob["x"].shape[1])]
    return TensorSplit(blob["x"][train], blob["y"][train]), TensorSplit(blob["x"][test], blob["y"][test]), names
