"""A user's own model and data loader, by import path (docs/plugins.md)."""

import pytest
import torch

from candor.common.data import load_plugin_site
from candor.common.errors import ConfigError
from candor.common.models import build_model
from candor.common.training import LocalTraining, evaluate, train


def test_plugin_model_and_loader_train_privately(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    torch.save({"x": x, "y": (x[:, 0] > 0).float()}, tmp_path / "site.pt")
    site = load_plugin_site("plugin_example:load", str(tmp_path / "site.pt"), test_path=None,
                            test_fraction=0.2, seed=1)
    assert len(site.train) == 240 and site.feature_names[0] == "x0"
    model = build_model("plugin_example:make_model", num_features=5, num_outputs=1)
    train(model, site.train, settings=LocalTraining(steps=80, batch_size=32, learning_rate=0.5, noise_multiplier=0.8),
          num_outputs=1, generator=torch.Generator().manual_seed(0))
    assert evaluate(model, site.test, num_outputs=1)["accuracy"] > 0.8


@pytest.mark.parametrize("spec", ["no_such_module:f", "plugin_example:no_such_function"])
def test_unimportable_plugins_are_clear_errors(spec):
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_plugin_site(spec, "x", test_path=None, test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_model(spec, num_features=3, num_outputs=1)
