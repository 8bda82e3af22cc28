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


def test_the_lists_of_models_agree_and_state_their_sizes():
    from torchmnist import config

    assert tuple(models.MODELS) == config.MODELS
    sizes = {"fast": 27_418, "fast-narrow": 17_602, "best": 131_690,
             "early-exit": 40_206}  # as their docstrings say
    for name, size in sizes.items():
        assert sum(p.numel() for p in models.build(name).parameters()) == size
        assert f"{size:,} parameters" in " ".join(models.MODELS[name].__doc__.split())


# ---- early exit -------------------------------------------------------------------------------


def test_early_exit_trains_every_head_on_the_mean_of_their_losses():
    torch.manual_seed(0)
    model = models.EarlyExitNet().train()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    heads = []
    h, out = model._stage1(x)
    heads.append(out)
    h, out = model._stage2(h)
    heads.append(out)
    heads.append(model._stage3(h)[1])
    torch.manual_seed(0)
    mean_loss = sum(torch.nn.functional.nll_loss(out, y) for out in heads) / 3
    torch.testing.assert_close(torch.nn.functional.nll_loss(model(x), y), mean_loss)


def test_early_exit_leaves_early_when_sure_and_counts_where(capsys):
    from conftest import run_main

    code, _, err = run_main(["train", "--dry-run", "--model", "early-exit", "--recipe", "fast",
                             "--label-smoothing", "0", "--run-dir", "r", "--device", "cpu"],
                            capsys)
    assert code == 0, err
    fractions = []
    for threshold in ("1", "0.9", "0.5"):
        code, out, err = run_main(["test", "r", "--json", "--exit-threshold", threshold,
                                   "--device", "cpu"], capsys)
        assert code == 0, err
        exits = __import__("json").loads(out)["exits"]
        assert sum(exits["per_head"]) == 512  # every test image left somewhere, once
        fractions.append(exits["compute_fraction"])
    assert fractions[0] == 1.0  # threshold 1: the whole network for every image
    assert fractions[0] >= fractions[1] >= fractions[2] > 0


def test_early_exit_with_label_smoothing_is_refused(capsys):
    from conftest import assert_one_sentence_error, run_main

    code, _, err = run_main(["train", "--dry-run", "--model", "early-exit", "--label-smoothing",
                             "0.1", "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "pass --label-smoothing 0")
