"""Exact resume, as one matrix: a run stopped and resumed ends bit for bit where the same run
trained in one go ends, with every loader, at either kind of stop point, with each feature
that keeps state of its own.

Every run ends in a fractional epoch (2.5). Stop points: the end of an epoch (the run resumes
its own `epoch-001.pt` in another folder), and the middle of one (a run of 1.5 epochs, resumed
to 2.5, trains the rest of that epoch first). The
one-cycle schedule is laid over the whole run, so a run cannot be lengthened: it is resumed
from its epoch checkpoint only. Stops by signal and by SIGKILL, on several processes and with
CUDA graphs are tested where those live (test_resume, test_distributed, test_graphs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import dry_train, read_metrics

FEATURES = {
    "plain": [],
    "momentum, augmentation, label smoothing and a weight average": [
        "--momentum", "0.9", "--augment", "affine", "--label-smoothing", "0.1", "--ema", "0.9"],
    "a validation split and patience": ["--val-size", "256", "--patience", "5"],
    "the fast recipe: one-cycle, bf16": ["--recipe", "fast", "--amp", "bf16"],
}
CASES = [pytest.param(loader, stop, feature,
                      marks=[pytest.mark.slow] if loader == "dataloader" else [],
                      id=f"{loader}-{stop}-{feature.split(':')[0].split(',')[0]}")
         for loader in ("tensor", "dataloader") for stop in ("epoch end", "mid-epoch")
         for feature in FEATURES
         if not (stop == "mid-epoch" and "one-cycle" in feature)]


def _state(run: Path) -> tuple[dict, dict]:
    """The run's last checkpoint, and its last epoch's record in metrics.jsonl."""
    saved = torch.load(run / "last.pt", weights_only=True)
    last_epoch = [r for r in read_metrics(run) if r["kind"] == "epoch"][-1]
    return saved, {k: v for k, v in last_epoch.items() if k != "seconds"}


@pytest.mark.parametrize("loader, stop, feature", CASES)
def test_a_resumed_run_ends_exactly_where_one_run_does(loader, stop, feature, tmp_path,
                                                       capsys):
    flags = ["--loader", loader, "--num-workers", "2", "--device", "cpu", "--epochs", "2.5",
             "--keep", "3", "--save-interval", "5", "--log-interval", "3", *FEATURES[feature]]
    dry_train(tmp_path / "whole", *flags, capsys=capsys)
    if stop == "epoch end":
        dry_train(tmp_path / "resumed", "--resume", str(tmp_path / "whole" / "epoch-001.pt"),
                  capsys=capsys)
    else:
        dry_train(tmp_path / "resumed", *flags, "--epochs", "1.5", capsys=capsys)
        dry_train(tmp_path / "resumed", "--resume", "--epochs", "2.5", capsys=capsys)

    whole, whole_record = _state(tmp_path / "whole")
    resumed, resumed_record = _state(tmp_path / "resumed")
    assert resumed["progress"]["step"] == whole["progress"]["step"] > 16
    for part in ("model", "ema"):
        if whole[part] is not None:
            assert resumed[part].keys() == whole[part].keys()
            assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part])
    assert resumed["optimizer"]["state"].keys() == whole["optimizer"]["state"].keys()
    for i, buffers in whole["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][i][k], v)
                   for k, v in buffers.items())
    if whole["val_index"] is not None:
        assert torch.equal(resumed["val_index"], whole["val_index"])
    assert resumed["progress"]["best_accuracy"] == whole["progress"]["best_accuracy"]
    # The last epoch's training and test losses and accuracies, as logged, agree too.
    assert resumed_record == whole_record
