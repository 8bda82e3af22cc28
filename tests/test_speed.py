"""The speed features: recipes, augmentation, precision, compile, EMA, target accuracy, bench.

These check behaviour on small synthetic data; speed itself is measured in benchmarks/."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_sentence_error, dry_train, last_json, read_metrics, run_main

import torchmnist
from torchmnist import models
from torchmnist.commands import bench
from torchmnist.data.augment import ERASE_MAX, MAX_SHIFT, affine, augment, erase, translate
from torchmnist.runtime import devices
from torchmnist.storage import checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe, flags, floor", [
    ("fast", ["--epochs", "3"], 0.9),
    # 8 steps an epoch on this data: a 0.999 average would still be the initial weights.
    ("best", ["--epochs", "6", "--ema", "0.9"], 0.5),
])
def test_recipes_run_and_learn(recipe, flags, floor, capsys):
    # The floors were measured on the CPU; on a GPU, bf16 and cuDNN's kernels take these few
    # steps another way (best: 48% after 6 epochs on an H200).
    summary = dry_train("r", "--recipe", recipe, *flags, "--device", "cpu", capsys=capsys)
    assert summary["model"] == recipe
    assert summary["test_accuracy"] > floor  # chance is 0.1
    losses = [r["train_loss"] for r in read_metrics(Path("r")) if r["kind"] == "epoch"]
    assert losses[-1] < losses[0]


def test_translate_moves_whole_images_by_whole_pixels():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    x[:, :, :MAX_SHIFT + 1, :] = -1.0  # background frame, so nothing is cut off
    x[:, :, -MAX_SHIFT - 1:, :] = -1.0
    x[:, :, :, :MAX_SHIFT + 1] = -1.0
    x[:, :, :, -MAX_SHIFT - 1:] = -1.0
    y = translate(x, background=-1.0)
    assert y.shape == x.shape
    moved = 0
    for image, shifted in zip(x, y, strict=True):
        matches = [(dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)
                   if torch.equal(torch.roll(image, (dr, dc), dims=(1, 2)), shifted)]
        assert len(matches) == 1  # exactly one whole-pixel shift explains each output
        moved += matches[0] != (0, 0)
    assert moved > 40  # per-sample shifts, not one for the batch (24 of 25 are non-zero)


def test_augmentation_is_seeded_and_keeps_the_background():
    x = torch.full((8, 1, 28, 28), -0.42)
    torch.manual_seed(3)
    assert torch.allclose(affine(x, background=-0.42), x)  # empty images stay empty
    x[:, :, 10:18, 10:18] = 2.0
    torch.manual_seed(3)
    a = augment(x, "affine", -0.42)
    torch.manual_seed(3)
    b = augment(x, "affine", -0.42)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert not torch.equal(a[0], a[1])  # each image gets its own rotation, scale and shift
    assert augment(x, "none", -0.42) is x


def test_target_accuracy_stops_early_and_reports_its_time(capsys):
    summary = dry_train("r", "--recipe", "fast", "--epochs", "10", "--target-accuracy", "0.5",
                        "--eval-interval", "4s", capsys=capsys)
    assert summary["epochs"] < 10
    assert summary["target_seconds"] is not None
    assert summary["target_seconds"] <= summary["train_seconds"]
    assert summary["test_accuracy"] >= 0.5
    tests = [r for r in read_metrics(Path("r")) if r["kind"] == "epoch"]
    assert tests[-1]["test_accuracy"] >= 0.5


def test_unreached_target_trains_every_epoch(capsys):
    summary = dry_train("r", "--epochs", "2", "--target-accuracy", "1.0", capsys=capsys)
    assert summary["epochs"] == 2 and summary["target_seconds"] is None


def test_eval_interval_in_epochs_skips_tests_but_not_the_last(capsys):
    dry_train("r", "--epochs", "3", "--eval-interval", "2", capsys=capsys)
    tested = [r["epoch"] for r in read_metrics(Path("r"))
              if r["kind"] == "epoch" and r["test_accuracy"] is not None]
    assert tested == [2, 3]


@pytest.mark.parametrize("flags, fragment", [
    (["--eval-interval", "ten"], "--eval-interval must be a number of epochs"),
    (["--eval-interval", "0s"], "--eval-interval must be a number of epochs"),
    (["--target-accuracy", "99"], "--target-accuracy must be a fraction"),
    (["--ema", "1.5"], "--ema must be at least 0 and below 1"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
])
def test_bad_speed_flags_exit_2(flags, fragment, capsys):
    code, _, err = run_main(["train", "--dry-run", "--run-dir", "r", *flags], capsys)
    assert code == 2
    assert_one_sentence_error(err, fragment)


def test_ema_weights_are_the_ones_tested_and_shipped(tmp_path, capsys):
    from conftest import make_dataset_files

    make_dataset_files(tmp_path / "data" / "MNIST" / "raw")
    code, out, err = run_main(["train", "--data-dir", "data", "--epochs", "2", "--ema", "0.9",
                               "--run-dir", "r", "--save-model", "--json"], capsys)
    assert code == 0, err
    summary = last_json(out)
    saved = checkpoint.load("r/last.pt")
    shipped, _ = checkpoint.weights(saved, "r/last.pt")
    assert not torch.equal(shipped["fc2.weight"], saved["model"]["fc2.weight"])
    assert torch.equal(shipped["fc2.weight"], torch.load("r/model.pt")["fc2.weight"])
    code, out, err = run_main(["test", "r/last.pt", "--data-dir", "data", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def test_onecycle_run_cannot_be_stretched_on_resume(capsys):
    dry_train("r", "--recipe", "fast", capsys=capsys)
    code, _, err = run_main(["train", "--resume", "--run-dir", "r", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "epochs (checkpoint: 1, now: 2)")


@pytest.mark.slow
def test_resume_is_exact_with_augmentation_ema_bf16_and_onecycle(tmp_path):
    spec = importlib.util.spec_from_file_location("crash", ROOT / "scripts" / "crash_resume.py")
    crash_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crash_resume)
    flags = ["--recipe", "fast", "--dry-run", "--epochs", "25", "--augment", "affine", "--ema",
             "0.9", "--save-interval", "3", "--log-interval", "4", "--device", "cpu",
             "--amp", "bf16"]
    result = crash_resume.check(tmp_path, kills=3, seed=2, train_flags=flags)
    assert result["weights_identical"] and result["losses_identical"], result


def test_compile_saves_the_plain_module_and_reports_compile_time(capsys):
    summary = dry_train("r", "--recipe", "fast", "--compile", capsys=capsys)
    assert summary["warmup_seconds"] > 0
    saved = checkpoint.load(summary["checkpoint"])
    assert not any(k.startswith("_orig_mod.") for k in saved["model"])
    assert saved["model"].keys() == models.FastNet().state_dict().keys()


def test_bench_prints_environment_and_every_loader(capsys):
    code, out, err = run_main(["bench", "--dry-run", "--recipe", "fast", "--trials", "1",
                               "--steps", "5", "--accuracy-trials", "2", "--loaders",
                               "tensor,premade,dataloader:0,dataloader:2", "--json"], capsys)
    assert code == 0, err
    # --json: the header goes to stderr, the line every benchmark script prints too.
    environment = bench.describe(bench.environment(devices.resolve_device("auto")))
    assert environment in err.splitlines()
    assert f"torch {torch.__version__}" in environment
    assert f"torchmnist {torchmnist.__version__}" in environment
    assert "median of 1 trial;" in err
    report = json.loads(out)
    # What airbench records: the resolved config and the code's version beside the numbers.
    assert report["config"]["recipe"] == "fast" and report["config"]["batch_size"] == 64
    assert report["environment"]["torchmnist"] == torchmnist.__version__
    rows = [(row["loader"], row["step"]) for row in report["loaders"]]
    assert [name for name, step in rows if step == "eager"] == [
        "tensor", "premade", "dataloader:0", "dataloader:2"]
    # On CUDA each loader's step is timed again, replayed from a graph.
    assert {step for _, step in rows} == ({"eager", "graph"} if torch.cuda.is_available()
                                          else {"eager"})
    assert all(row["train_images_per_s"] > 0 for row in report["loaders"])
    assert report["time_to_accuracy"]["seeds"] == [1, 2]
    assert len(report["time_to_accuracy"]["test_accuracy"]) == 2


@pytest.mark.parametrize("loaders", ["tensor,gpu", "premade:2", "dataloader:x"])
def test_bench_rejects_a_bad_loader_list(loaders, capsys):
    code, _, err = run_main(["bench", "--dry-run", "--loaders", loaders], capsys)
    assert code == 2
    assert_one_sentence_error(err, "--loaders", "dataloader[:WORKERS]")


def test_erase_blanks_one_rectangle_in_about_half_the_images():
    torch.manual_seed(0)
    x = torch.rand(512, 1, 28, 28) + 1.0  # nothing equals the background -1 yet
    y = erase(x, background=-1.0)
    blank = y == -1.0
    touched = blank.flatten(1).any(1)
    assert 0.4 < touched.float().mean().item() < 0.6
    assert torch.equal(y[~blank], x[~blank])  # everything else is left alone
    for mask in blank[touched, 0]:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == height * width  # one solid rectangle, clipped at the edges
        assert height <= ERASE_MAX and width <= ERASE_MAX


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a CUDA machine this script is what runs the CUDA tests")
def test_the_cuda_check_script_runs_its_test_part_and_asks_for_the_data(tmp_path):
    # benchmarks/cuda_check.sh runs only where a GPU is lent, rarely: its shell, its options
    # and its logs are checked here, where its CUDA tests skip.
    script = ["bash", str(ROOT / "benchmarks" / "cuda_check.sh"), str(tmp_path / "logs"), "cuda"]
    env = {**os.environ, "PYTHON": sys.executable, "TORCHMNIST_DATA_DIR": str(tmp_path)}
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"torch {torch.__version__} | no CUDA device" in done.stdout
    log = (tmp_path / "logs" / "cuda_tests.log").read_text()
    assert re.search(r"\d+ passed, \d+ skipped", log) and "failed" not in log, log
    del env["TORCHMNIST_DATA_DIR"]
    refused = subprocess.run([*script[:2], str(tmp_path / "refused"), "cuda"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "set TORCHMNIST_DATA_DIR to the folder holding MNIST/raw" in refused.stderr
    assert not (tmp_path / "refused").exists()  # it stopped before making its log folder
