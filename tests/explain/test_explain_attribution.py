"""Attributions: the known truth, completeness, and the per-feature grouping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from candor.common.encoding import Encoder
from candor.common.explain import COMPLETENESS_TOLERANCE, attribute, release_importance
from candor.common.models import build_model
from candor.common.schema import Schema
from candor.common.training import LocalTraining, TensorSplit, train

FEATURES = ["f0", "f1", "f2", "f3", "f4", "f5"]


def _numeric_schema(names, *, task="binary") -> Schema:
    label = ({"name": "y", "task": "binary", "positive": [1], "negative": [0]} if task == "binary"
             else {"name": "y", "task": "multiclass", "classes": ["a", "b", "c"]})
    return Schema.from_dict({"label": label, "features": [
        {"name": n, "kind": "numeric", "lower": 0, "upper": 10} for n in names]})


@pytest.fixture(scope="module")
def known_truth():
    """Logistic regression trained on data where only f1 and f4 move the label."""
    schema = _numeric_schema(FEATURES)
    encoder = Encoder(schema)
    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 10, size=(4000, len(FEATURES)))
    frame = pd.DataFrame(raw, columns=FEATURES)
    x = encoder.transform(frame)
    logit = 3.0 * x[:, 1] - 2.5 * x[:, 4]
    y = (rng.uniform(size=len(x)) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    split = TensorSplit(torch.from_numpy(x[:3000]), torch.from_numpy(y[:3000]))
    torch.manual_seed(0)
    model = build_model("logreg", num_features=encoder.num_features, num_outputs=1)
    train(model, split, settings=LocalTraining(steps=600, batch_size=64, learning_rate=0.5),
          num_outputs=1, generator=torch.Generator().manual_seed(0))
    return model.eval(), encoder, torch.from_numpy(x[3000:])


def test_the_two_features_that_matter_rank_first(known_truth):
    model, encoder, held_out = known_truth
    expl = attribute(model, encoder, held_out)
    exact = release_importance(expl, clip=None, noise_multiplier=None)
    assert set(np.array(FEATURES)[np.argsort(-exact.mean)[:2]]) == {"f1", "f4"}
    # ... and still after the DP release (1000 rows, σ = 1, C = 1: noise 0.001 per feature).
    private = release_importance(expl, clip=1.0, noise_multiplier=1.0, rng=np.random.default_rng(0))
    assert set(np.array(FEATURES)[np.argsort(-private.mean)[:2]]) == {"f1", "f4"}
    assert private.mean[[1, 4]].min() > 5 * np.delete(private.mean, [1, 4]).max()


def test_completeness_logistic_regression_matches_the_closed_form(known_truth):
    model, encoder, x = known_truth
    expl = attribute(model, encoder, x[:200])
    w = model[0].weight.detach().double().numpy()[0]
    b = float(model[0].bias.detach())
    xd = x[:200].double().numpy()
    z = xd @ w + b
    sig = 1 / (1 + np.exp(-z))
    sig0 = 1 / (1 + np.exp(-b))
    # IG along the straight path of a sigmoid of a linear score: w_j x_j (σ(z) − σ(b)) / (z − b).
    expected = xd * w * ((sig - sig0) / (z - b))[:, None]
    np.testing.assert_allclose(expl.contributions, expected, atol=1e-5)
    np.testing.assert_allclose(expl.output, sig, atol=1e-6)
    np.testing.assert_allclose(expl.baseline, sig0, atol=1e-6)
    np.testing.assert_allclose(expl.contributions.sum(1), sig - sig0, atol=1e-5)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_completeness_on_an_mlp(task):
    schema = _numeric_schema(FEATURES, task=task)
    encoder = Encoder(schema)
    torch.manual_seed(3)
    model = build_model("mlp", num_features=6, num_outputs=schema.num_outputs, hidden=(16, 8)).eval()
    x = torch.rand(50, 6, generator=torch.Generator().manual_seed(4)) * 2 - 1
    expl = attribute(model, encoder, x)
    with torch.no_grad():
        logits = model(x)
        logits0 = model(torch.zeros(1, 6))
    if task == "binary":
        p, p0 = torch.sigmoid(logits[:, 0]).numpy(), float(torch.sigmoid(logits0[0, 0]))
        assert (expl.target == 1).all()
    else:
        probs, probs0 = torch.softmax(logits, -1), torch.softmax(logits0, -1)[0]
        assert (expl.target == probs.argmax(-1).numpy()).all()
        p, p0 = probs.max(-1).values.numpy(), probs0[expl.target].numpy()
    np.testing.assert_allclose(expl.output, p, atol=1e-6)
    np.testing.assert_allclose(expl.contributions.sum(1), p - p0, atol=COMPLETENESS_TOLERANCE)
    assert expl.gap <= COMPLETENESS_TOLERANCE


def test_encoded_columns_are_summed_per_original_feature(schema):
    """For a linear score each feature's contribution is its active columns' w·x share."""
    encoder = Encoder(schema)
    torch.manual_seed(0)
    model = build_model("logreg", num_features=encoder.num_features, num_outputs=1).eval()
    frame = pd.DataFrame({"age": [60.0, 90.0], "chol": [250.0, 400.0], "cp": ["b", "c"],
                          "smoker": [0.0, 1.0], "smoker__missing": [1.0, 0.0]})
    x = torch.from_numpy(encoder.transform(frame))
    expl = attribute(model, encoder, x)
    assert expl.features == ("age", "chol", "cp", "smoker")
    assert expl.contributions.shape == (2, 4)
    w = model[0].weight.detach().double().numpy()[0]
    b = float(model[0].bias.detach())
    z = x.double().numpy() @ w + b
    ratio = (1 / (1 + np.exp(-z)) - 1 / (1 + np.exp(-b))) / (z - b)
    # columns: age, chol, cp=a, cp=b, cp=c, smoker, smoker__missing
    np.testing.assert_allclose(expl.contributions[:, 2], [w[3] * ratio[0], w[4] * ratio[1]], atol=1e-6)
    np.testing.assert_allclose(expl.contributions[:, 3], [w[6] * ratio[0], w[5] * ratio[1]], atol=1e-6)
    assert expl.contributions[0, 0] == pytest.approx(0.0, abs=1e-9)  # age 60 = the reference record's
