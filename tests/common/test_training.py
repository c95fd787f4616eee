"""The one training loop: exact step counts, seeded reproducibility, DP clipping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from candor.common.models import build_model
from candor.common.training import LocalTraining, TensorSplit, evaluate, sample_rate, steps_for_epochs, train


def _data(n: int = 400, d: int = 8, seed: int = 0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g) * 2 - 1
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    return TensorSplit(x, y)


def _train(noise, seed=1, steps=30, data=None, **kw):
    torch.manual_seed(0)
    model = build_model("mlp", num_features=8, num_outputs=1)
    settings = LocalTraining(steps=steps, batch_size=32, learning_rate=0.5, noise_multiplier=noise, **kw)
    result = train(model, data or _data(), settings=settings, num_outputs=1,
                   generator=torch.Generator().manual_seed(seed))
    return model, result


@pytest.mark.parametrize("noise", [None, 1.0])
def test_takes_exactly_the_steps_it_is_told(noise):
    _, result = _train(noise, steps=37)
    assert result.steps == 37
    assert result.sample_rate == pytest.approx(32 / 400)


@pytest.mark.parametrize("noise", [None, 1.0])
def test_same_seed_same_model(noise):
    a, _ = _train(noise, seed=5)
    b, _ = _train(noise, seed=5)
    c, _ = _train(noise, seed=6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_private_training_learns_and_beats_initialization():
    data = _data()
    torch.manual_seed(0)
    start = evaluate(build_model("mlp", num_features=8, num_outputs=1), data, num_outputs=1)
    model, _ = _train(1.0, steps=150)
    end = evaluate(model, data, num_outputs=1)
    assert end["loss"] < start["loss"] and end["accuracy"] > 0.85


def test_one_record_moves_a_noiseless_dp_step_by_at_most_lr_times_clip():
    """Sensitivity: with σ = 0 the update of a batch differs by <= lr·C/B when one record
    is removed (sum of clipped gradients / expected batch size)."""
    data = _data(n=64)
    q_batch = 64  # q = 1: every record in every batch
    lr, clip = 0.1, 0.5

    def one_step(split):
        torch.manual_seed(0)
        model = build_model("logreg", num_features=8, num_outputs=1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(50)  # large gradients, so clipping is active
        train(model, split, settings=LocalTraining(steps=1, batch_size=q_batch, learning_rate=lr,
                                                   noise_multiplier=1e-12, max_grad_norm=clip),
              num_outputs=1, generator=torch.Generator().manual_seed(0))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    full = one_step(data)
    minus_one = one_step(TensorSplit(data.x[1:], data.y[1:]))
    # Opacus divides the noisy sum by the expected batch size q·n (n = 64 and 63 here).
    assert (full - minus_one).norm() <= lr * clip / 63 + lr * clip * 64 / (64 * 63) + 1e-6


def test_sample_rate_and_steps():
    assert sample_rate(100, 32) == 0.32 and sample_rate(10, 32) == 1.0
    assert steps_for_epochs(100, 32, 3) == 9 and steps_for_epochs(10, 32, 0.1) == 1


def test_proximal_step_pulls_towards_the_global_model():
    far, _ = _train(None, steps=60, proximal_mu=0.0)
    near, _ = _train(None, steps=60, proximal_mu=5.0)
    torch.manual_seed(0)
    start = torch.cat([p.flatten() for p in build_model("mlp", num_features=8, num_outputs=1).parameters()])
    dist = lambda m: (torch.cat([p.detach().flatten() for p in m.parameters()]) - start).norm()
    assert dist(near) < dist(far)


def test_multiclass_training_runs():
    data = _data()
    y = (data.x[:, 0] > 0.3).long() + (data.x[:, 0] > -0.3).long()
    torch.manual_seed(0)
    model = build_model("logreg", num_features=8, num_outputs=3)
    train(model, TensorSplit(data.x, y), settings=LocalTraining(steps=100, batch_size=32, learning_rate=0.5,
                                                                  noise_multiplier=0.5),
          num_outputs=3, generator=torch.Generator().manual_seed(0))
    assert evaluate(model, TensorSplit(data.x, y), num_outputs=3)["accuracy"] > 0.6
