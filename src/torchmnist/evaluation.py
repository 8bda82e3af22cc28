"""Testing: the test loop, and evaluating a saved checkpoint or state_dict."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchmnist import config as cfg
from torchmnist import engines
from torchmnist.data import datasets, loaders, own
from torchmnist.data.augment import TTA_SHIFTS, shift
from torchmnist.errors import UsageError
from torchmnist.runtime import devices
from torchmnist.trained import Trained


@dataclass
class Evaluation:
    loss: float  # mean negative log-likelihood per test image
    accuracy: float  # fraction in [0, 1]
    correct: int
    total: int


def log_probabilities(model: nn.Module, x: torch.Tensor, *, tta: bool = False,
                      background: float = 0.0) -> torch.Tensor:
    """The model's (B, classes) log-probabilities in float32; with `tta`, the log of the
    probabilities averaged over the image and its four 1-pixel shifts, whose uncovered pixels
    take the normalised `background` value."""
    if not tta:
        return model(x).float()
    views = [model(shift(x, dy, dx, background)).float().exp() for dy, dx in TTA_SHIFTS]
    return (sum(views) / len(views)).log()


def evaluate_model(model: nn.Module, test_batches, *, amp: str = "none",
                   channels_last: bool = False, tta: bool = False,
                   background: float = 0.0) -> Evaluation:
    """One pass over the test set in eval mode (dropout off, BatchNorm's running statistics)
    without autograd; `tta` as in `log_probabilities`."""
    model.eval()
    loss_sum, correct, total = test_sums(model, test_batches, amp=amp,
                                         channels_last=channels_last, tta=tta,
                                         background=background)
    return to_evaluation(loss_sum, correct, total)


def test_sums(model: nn.Module, test_batches, *, amp: str = "none", channels_last: bool = False,
              tta: bool = False, background: float = 0.0,
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed loss, correct count, images) of one pass, the sums still on the device: nothing
    here waits for it, so a CUDA graph can hold the whole pass (graphs.py)."""
    loss_sum, correct, total = None, None, 0
    with torch.inference_mode():
        for x, y in test_batches.batches():
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with devices.autocast(x.device, amp):
                output = log_probabilities(model, x, tta=tta, background=background)  # (B, classes)
            batch_loss = F.nll_loss(output, y, reduction="sum")
            batch_correct = (output.argmax(dim=1) == y).sum()
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
            total += len(y)
    if total == 0:
        raise UsageError("the test set is empty")
    return loss_sum, correct, total


def to_evaluation(loss_sum: torch.Tensor, correct: torch.Tensor, total: int) -> Evaluation:
    n_correct = int(correct.item())  # the one wait for the device in a test pass
    return Evaluation(loss_sum.item() / total, n_correct / total, n_correct, total)


def probabilities(model: nn.Module, x: torch.Tensor, device: torch.device,
                  batch_size: int = 1000, *, tta: bool = False,
                  background: float = 0.0) -> torch.Tensor:
    """Class probabilities (N, classes), on the CPU, for normalised images x (N, 1, 28, 28);
    `tta` as in `log_probabilities`."""
    model.eval()
    with torch.inference_mode():
        # The models end in log_softmax; softmax of log-probabilities gives them back.
        return torch.cat([log_probabilities(model, chunk.to(device), tta=tta,
                                            background=background).softmax(dim=1).cpu()
                          for chunk in x.split(batch_size)])


def test_data(trained: Trained, data_dir: str | os.PathLike | None = None,
              download: bool = True, test: object = None) -> datasets.DigitData:
    """A trained model's test set, with its normalisation and classes: `test` when given (as
    OwnData takes it); a dry run's own data; else its dataset's test files from `data_dir`,
    its run's folder, or the default places."""
    config = trained.config or {}
    if test is not None:
        digits = datasets.DigitData(trained.spec, datasets.Split.empty(),
                                    own.to_split(test, "the test data"),
                                    source="data given from Python")
    elif config.get("dry_run") and datasets.is_builtin(trained.dataset):
        digits = own.synthetic(trained.dataset, seed=config.get("seed", 1))
    else:
        if data_dir is None:
            data_dir = config.get("data_dir")
        digits = own.load_dataset(trained.dataset, data_dir, download=download,
                                  splits=("test",), classes=trained.spec.classes)
        if config.get("dry_run"):  # the sample of your data that the dry run tested on
            digits = own.subset(digits, config.get("seed", 1))
    if len(digits.test):
        low, top, classes = (int(digits.test.labels.min()), int(digits.test.labels.max()),
                             len(trained.spec.classes))
        if low < 0 or top >= classes:
            raise UsageError(f"the test labels must run from 0 to {classes - 1} for the model's "
                             f"{classes} classes, not {low} to {top}")
    return dataclasses.replace(digits, spec=trained.spec)


def evaluate(checkpoint_path: str | os.PathLike, *, model: str | None = None,
             dataset: str | None = None, data_dir: str | os.PathLike | None = None,
             download: bool = True, device: str = "auto", batch_size: int = 1000,
             tta: bool = False, exit_threshold: float | None = None,
             test: object = None, engine: str = "torch") -> dict:
    """Test a checkpoint, run folder or plain state_dict (the guide's `model.pth`) on its
    dataset's test set (`load_model` finds model and dataset), or on `test`, images of your
    own as OwnData takes them; `engine`: torch or onnxruntime (engines.py)."""
    batch_size = cfg.count("--batch-size", batch_size)
    if exit_threshold is not None:
        cfg.check("exit_threshold", exit_threshold)
    target = engines.device_for(engine, device)
    trained = engines.load(checkpoint_path, engine, model=model, dataset=dataset)
    network, model_name, dataset = trained.model.to(target), trained.name, trained.dataset
    digits = test_data(trained, data_dir, download=download, test=test)
    test_batches = loaders.TensorBatches(digits.test, digits.spec, batch_size, target,
                                         shuffle=False)
    early_exit = hasattr(network, "exits")
    if early_exit:
        if exit_threshold is not None:
            network.exit_threshold = exit_threshold
        network.exits = [0, 0, 0]
    result = evaluate_model(network, test_batches, tta=tta,
                            background=digits.spec.normalized_background)
    # A dry run's model is scored on its run's synthetic images, or its sample of a folder.
    dry_run = bool((trained.config or {}).get("dry_run")) and test is None
    return {"checkpoint": str(checkpoint_path), "model": model_name, "dataset": dataset,
            "dry_run": dry_run, "test_loss": result.loss, "test_accuracy": result.accuracy,
            "correct": result.correct, "total": result.total, "tta": tta,
            "device": str(target), "engine": engine,
            "exits": _exits(network) if early_exit else None}


def _exits(network: nn.Module) -> dict:
    """Where an early-exit network's test images left, and what that cost per image."""
    counts = list(network.exits)
    mean = sum(c * macs for c, macs in zip(counts, network.MACS, strict=True)) / sum(counts)
    return {"threshold": network.exit_threshold, "per_head": counts, "mean_macs": mean,
            "full_macs": network.MACS[-1], "compute_fraction": mean / network.MACS[-1]}
