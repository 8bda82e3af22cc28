"""End-to-end runs on the real MNIST files (TORCHMNIST_DATA_DIR; CI points it at
../shared/data). These are the issue's acceptance runs, as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import last_json, run_main, run_subprocess

pytestmark = pytest.mark.mnist

REFERENCE = Path(__file__).with_name("reference_scripts.py")


@pytest.mark.slow
def test_guide_recipe_one_epoch_reaches_95_percent(mnist_dir, tmp_path):
    result = run_subprocess(["train", "--data-dir", str(mnist_dir), "--epochs", "1", "--json"],
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["model"] == "guide" and summary["epochs"] == 1


@pytest.mark.slow
def test_official_recipe_one_epoch_reaches_98_percent(mnist_dir, tmp_path):
    result = run_subprocess(["train", "--recipe", "official", "--data-dir", str(mnist_dir),
                             "--epochs", "1", "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["test_accuracy"] >= 0.98, summary
    assert summary["model"] == "official"


@pytest.mark.slow
def test_fast_recipe_reaches_99_percent_in_one_epoch(mnist_dir, capsys):
    code, out, err = run_main(["train", "--recipe", "fast", "--data-dir", str(mnist_dir),
                               "--run-dir", "r", "--json"], capsys)
    assert code == 0, err
    summary = last_json(out)
    assert summary["epochs"] == 1 and summary["model"] == "fast"
    assert summary["test_accuracy"] >= 0.99, summary


@pytest.mark.slow
def test_dataloader_path_trains_on_real_data(mnist_dir, capsys):
    # The guide's pipeline with worker processes; a short run must learn well past chance.
    code, out, err = run_main(["train", "--data-dir", str(mnist_dir), "--loader", "dataloader",
                               "--num-workers", "2", "--epochs", "1", "--lr", "0.05",
                               "--batch-size", "256", "--run-dir", "r", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["test_accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("script, batches", [("guide", 300), ("official", 60)])
def test_state_dicts_from_the_original_scripts_load_and_score_the_same(
        script, batches, mnist_dir, tmp_path, capsys):
    weights = tmp_path / ("model.pth" if script == "guide" else "mnist_cnn.pt")
    made = subprocess.run([sys.executable, str(REFERENCE), script, str(mnist_dir), str(weights),
                           "--batches", str(batches)], capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stderr
    measured = json.loads(made.stdout.strip().splitlines()[-1])
    assert measured["test_accuracy"] > 0.5  # the script really trained

    for model_flag in ([], ["--model", script]):  # recognised from the weights, or named
        code, out, err = run_main(["test", str(weights), "--data-dir", str(mnist_dir), "--json",
                                   *model_flag], capsys)
        assert code == 0, err
        result = last_json(out)
        assert result["model"] == script
        assert result["correct"] == measured["correct"]
        assert result["test_loss"] == pytest.approx(measured["test_loss"], rel=1e-4)


def test_test_command_on_a_torchmnist_checkpoint(guide_run, mnist_dir, capsys):
    # The epoch of the guide recipe that predict, export and report share.
    code, out, err = run_main(["test", guide_run["checkpoint"], "--data-dir", str(mnist_dir)],
                              capsys)
    assert code == 0, err
    assert f"({100 * guide_run['test_accuracy']:.2f}%)" in out
