"""Test-time augmentation: `test --tta` and `predict --tta` average over 1-pixel shifts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import last_json, make_dataset_files, run_main
from PIL import Image
from torch import nn

from torchmnist import models
from torchmnist.commands.prediction import predict
from torchmnist.data.augment import TTA_SHIFTS, shift
from torchmnist.evaluation import evaluate, log_probabilities


def test_shift_moves_whole_pixels_and_fills_with_the_background():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    down_right = shift(x, 1, 2, background=-9.0)
    assert torch.equal(down_right[..., 1:, 2:], x[..., :4, :3])
    assert (down_right[..., 0, :] == -9).all() and (down_right[..., :, :2] == -9).all()
    up_left = shift(x, -1, -1, -9.0)
    assert torch.equal(up_left[..., :4, :4], x[..., 1:, 1:])
    assert (up_left[..., 4, :] == -9).all() and (up_left[..., :, 4] == -9).all()
    assert torch.equal(shift(x, 0, 0, -9.0), x)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert shift(channels_last, 1, 0, 0.0).is_contiguous(memory_format=torch.channels_last)


class _CentrePixel(nn.Module):
    """Class 1 when the centre pixel is ink (1), class 0 when it is background (0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ink = x[:, 0, 14, 14]
        return F.log_softmax(torch.stack([-ink, ink], 1) * 5, dim=1)


def test_tta_averages_probabilities_over_the_image_and_its_four_shifts():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 14, 15] = 1.0  # one pixel right of the centre: only the shift to the left sees it
    plain = log_probabilities(_CentrePixel(), x).exp()
    assert plain[0, 1].item() == pytest.approx(0.5)
    averaged = log_probabilities(_CentrePixel(), x, tta=True, background=0.0).exp()
    sure = 1 / (1 + math.exp(-10))  # the model's class-1 probability when it sees the ink
    assert len(TTA_SHIFTS) == 5
    assert averaged[0, 1].item() == pytest.approx((4 * 0.5 + sure) / 5, rel=1e-5)
    assert averaged.sum().item() == pytest.approx(1.0)


def test_test_and_predict_take_tta(tmp_path, capsys):
    make_dataset_files(tmp_path / "data" / "MNIST" / "raw")
    code, out, err = run_main(["train", "--data-dir", "data", "--epochs", "1", "--run-dir", "r",
                               "--json"], capsys)
    assert code == 0, err
    results = {}
    for flags in ([], ["--tta"]):
        code, out, err = run_main(["test", "r/last.pt", "--data-dir", "data", "--json", *flags],
                                  capsys)
        assert code == 0, err
        results[bool(flags)] = last_json(out)
    assert results[True]["tta"] is True and results[False]["tta"] is False
    assert results[True]["test_loss"] != results[False]["test_loss"]
    api = evaluate("r/last.pt", data_dir="data", tta=True)
    assert api["test_loss"] == pytest.approx(results[True]["test_loss"], rel=1e-6)

    code, out, err = run_main(["test", "r/last.pt", "--data-dir", "data", "--tta"], capsys)
    assert "with test-time augmentation" in out


def test_predict_with_tta_gives_other_probabilities_that_still_sum_to_one(tmp_path):
    torch.manual_seed(0)
    torch.save(models.build("guide").state_dict(), tmp_path / "m.pt")
    image = torch.zeros(60, 60, dtype=torch.uint8) + 230
    image[15:45, 25:32] = 10  # a dark stroke, "1"
    Image.fromarray(image.numpy()).save(tmp_path / "one.png")
    (plain,) = predict(tmp_path / "m.pt", [str(tmp_path / "one.png")], device="cpu", top=10)
    (tta,) = predict(tmp_path / "m.pt", [str(tmp_path / "one.png")], device="cpu", top=10,
                     tta=True)
    assert sum(t["probability"] for t in tta["top"]) == pytest.approx(1.0, abs=1e-5)
    assert tta["top"] != plain["top"]
