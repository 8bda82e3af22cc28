"""The two networks keep the shapes and parameter names of the scripts they come from."""

from __future__ import annotations

import pytest
import torch

from torchmnist import models


@pytest.mark.parametrize("name, params, keys", [
    ("guide", 21840, ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                      "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]),
    ("official", 1199882, ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                           "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]),
])
def test_architecture_matches_the_original(name, params, keys):
    model = models.build(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert list(model.state_dict()) == keys
    out = model.eval()(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(3))  # log-probabilities


def test_guide_layers_are_the_guides():
    model = models.GuideNet()
    assert model.conv1.kernel_size == (5, 5) and model.conv1.out_channels == 10
    assert model.conv2.out_channels == 20 and isinstance(model.conv2_drop, torch.nn.Dropout2d)
    assert (model.fc1.in_features, model.fc1.out_features) == (320, 50)


def test_official_dropout_rates():
    model = models.OfficialNet()
    assert (model.dropout1.p, model.dropout2.p) == (0.25, 0.5)
    assert (model.fc1.in_features, model.fc1.out_features) == (9216, 128)


def test_models_are_recognised_from_their_weights():
    assert models.matching_model(models.GuideNet().state_dict()) == "guide"
    assert models.matching_model(models.OfficialNet().state_dict()) == "official"
    assert models.matching_model({"fc.weight": torch.zeros(10, 784)}) is None
