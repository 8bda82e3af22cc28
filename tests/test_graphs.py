"""--cuda-graph: the training step and test pass replayed from CUDA graphs.

The capture itself needs CUDA; what it relies on is tested on the CPU too: the rehearsal's
state is put back exactly, the graph-safe weight average equals torch's AveragedModel, and the
flag falls back to the eager step with one log line wherever graphs cannot be used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_main
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import torchmnist
from torchmnist import models, setup, training  # noqa: E402
from torchmnist.runtime import devices, graphs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_graph_safe_average_equals_averaged_model_bit_for_bit():
    torch.manual_seed(0)
    model = models.build("fast")  # BatchNorm: float buffers and an integer batch counter
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 1, 28, 28))  # moves BatchNorm's running statistics and counter
        reference.update_parameters(model)
        training.update_average(ours, model, 0.9)
        for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name
    assert int(ours.n_averaged) == 5


def _setup(tmp_path: Path, **values) -> setup.Run:
    config = torchmnist.TrainConfig.for_recipe(
        values.pop("recipe", "fast"), dry_run=True, device="cpu", run_dir=str(tmp_path),
        **values)
    with contextlib.redirect_stdout(io.StringIO()):
        run = setup.build(config)
    return run


def _state(run: setup.Run) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in run.model.state_dict().items()}
    if run.ema is not None:
        state.update({f"ema.{k}": v.clone() for k, v in run.ema.state_dict().items()})
    return state


@pytest.mark.parametrize("recipe, values", [
    ("fast", {}),  # SGD with Nesterov momentum, BatchNorm
    ("best", {"ema": 0.99}),  # and a weight average, and augmentation (random numbers)
    ("guide", {"optimizer": "adam", "lr": 1e-3}),  # Adam's moments and step count; dropout
], ids=["sgd-nesterov", "ema-augment", "adam-dropout"])
def test_a_rehearsal_leaves_no_trace_on_the_run(recipe, values, tmp_path):
    """Before a capture the step is rehearsed (weights, statistics, optimiser state and random
    streams all move); after `restore`, training goes on exactly as if it had not been."""
    with _setup(tmp_path / "a", recipe=recipe, **values) as plain, \
            _setup(tmp_path / "b", recipe=recipe, **values) as rehearsed:
        batches = list(zip(range(4), plain.train_batches.batches(1), strict=False))
        saved = graphs._Saved(rehearsed)
        for _, (x, y) in batches[:3]:
            training.train_step(rehearsed, x, y)
        assert not all(torch.equal(a, b) for a, b in
                       zip(_state(plain).values(), _state(rehearsed).values(), strict=True))
        saved.restore(rehearsed)  # the random streams too: both runs now draw the same numbers
        for _, (x, y) in batches:
            training.train_step(rehearsed, x, y)
        devices.set_rng_state(saved.rng)
        for _, (x, y) in batches:
            training.train_step(plain, x, y)
        for (name, a), b in zip(_state(plain).items(), _state(rehearsed).values(), strict=True):
            assert torch.equal(a, b), name


def test_cuda_graph_on_the_cpu_trains_eagerly_and_says_why(tmp_path, capsys):
    flags = ["train", "--dry-run", "--recipe", "fast", "--device", "cpu"]
    assert run_main([*flags, "--run-dir", str(tmp_path / "eager")], capsys)[0] == 0
    code, out, _ = run_main([*flags, "--cuda-graph", "--run-dir", str(tmp_path / "g")], capsys)
    assert code == 0
    assert "CUDA graphs off: CUDA graphs need a CUDA device, and this run is on cpu" in out
    eager, graphed = _weights(tmp_path / "eager" / "last.pt"), _weights(tmp_path / "g" / "last.pt")
    assert all(torch.equal(eager[k], graphed[k]) for k in eager)


def test_the_fast_gpu_recipe_graphs_by_default():
    assert torchmnist.TrainConfig.for_recipe("fast-gpu").cuda_graph
    assert not torchmnist.TrainConfig.for_recipe("fast").cuda_graph
    assert not torchmnist.TrainConfig.for_recipe("fast-gpu", cuda_graph=False).cuda_graph


@pytest.mark.parametrize("values, fragment", [
    ({"amp": "fp16"}, "fp16 loss scaler"),
    ({"compile": True}, "--compile"),
    ({"detect_anomaly": True}, "anomaly detection"),
], ids=["fp16", "compile", "anomaly"])
def test_settings_a_graph_cannot_hold_are_named(values, fragment):
    config = dataclasses.replace(torchmnist.TrainConfig(cuda_graph=True), **values)
    run = type("FakeRun", (), {"config": config, "device": torch.device("cuda")})()
    assert fragment in graphs.reason_not_to_graph(run)


# ---- on CUDA ----------------------------------------------------------------------------------


def _cuda_run(tmp_path: Path, name: str, *flags: str, capsys) -> tuple[dict, str]:
    code, out, err = run_main(["train", "--dry-run", "--device", "cuda", "--deterministic",
                               "--run-dir", str(tmp_path / name), "--log-interval", "4",
                               *flags], capsys)
    assert code == 0, err
    return _weights(tmp_path / name / "last.pt"), out


@needs_cuda
@pytest.mark.parametrize("flags", [
    ["--recipe", "fast"],  # one-cycle rates, Nesterov momentum, bf16, BatchNorm
    ["--recipe", "guide"],  # dropout's random numbers
    # best's augmentation and weight average, on the fast network: the best network's adaptive
    # max-pool has no deterministic backward on CUDA
    ["--recipe", "best", "--model", "fast", "--ema", "0.9"],
], ids=["fast", "guide", "augment-ema"])
def test_a_graphed_run_trains_the_eager_run_model(flags, tmp_path, capsys):
    """The replayed step is the eager step: same weights (one-cycle rates, momentum, dropout's
    and augmentation's random numbers, the weight average included)."""
    flags = [*flags, "--epochs", "2"]
    eager, _ = _cuda_run(tmp_path, "eager", *flags, "--no-cuda-graph", capsys=capsys)
    graphed, out = _cuda_run(tmp_path, "graphed", *flags, "--cuda-graph", capsys=capsys)
    assert "CUDA graphs: the training step captured" in out
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    rates = [r["lr"] for r in read_metrics(tmp_path / "graphed") if r["kind"] == "train"]
    eager_rates = [r["lr"] for r in read_metrics(tmp_path / "eager") if r["kind"] == "train"]
    assert rates == pytest.approx(eager_rates, rel=1e-6)  # the graph's rate is a float32


@needs_cuda
def test_a_graphed_run_resumes_exactly(tmp_path, capsys):
    """Resumed from the checkpoint of its first epoch, with graphs captured anew, a run ends
    with the weights of the run that went straight through."""
    flags = ["--recipe", "fast", "--cuda-graph", "--epochs", "3"]
    whole, _ = _cuda_run(tmp_path, "whole", *flags, "--keep", "3", capsys=capsys)
    resumed, out = _cuda_run(tmp_path, "resumed", *flags, "--resume",
                             str(tmp_path / "whole" / "epoch-001.pt"), capsys=capsys)
    assert "resuming from" in out and "CUDA graphs: the training step captured" in out
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


@needs_cuda
def test_a_failed_capture_falls_back_to_the_eager_step(tmp_path, capsys, monkeypatch):
    flags = ["--recipe", "fast", "--epochs", "1"]
    eager, _ = _cuda_run(tmp_path, "eager", *flags, "--no-cuda-graph", capsys=capsys)

    def broken(function):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.devices, "capture", broken)
    fallback, out = _cuda_run(tmp_path, "fallback", *flags, "--cuda-graph", capsys=capsys)
    assert ("CUDA graph capture failed (operation not permitted when stream is capturing); "
            "the step runs eagerly") in out
    for k in eager:
        torch.testing.assert_close(fallback[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)


@needs_cuda
def test_the_graphed_test_pass_scores_as_the_eager_one(tmp_path):
    """The recipe trains in bf16; every test pass, graphed or not, scores in float32."""
    config = torchmnist.TrainConfig.for_recipe("fast", dry_run=True, device="cuda",
                                               cuda_graph=True, run_dir=str(tmp_path),
                                               amp="bf16")
    with contextlib.redirect_stdout(io.StringIO()):
        run = setup.build(config)
    with run:  # closed however the test ends: an open log would warn in a later test
        with contextlib.redirect_stdout(io.StringIO()):
            training.warm_up(run)
        assert run.graphed_test is not None
        for x, y in list(run.train_batches.batches(1))[:5]:
            run.graphed_step(x, y)
        graphed = run.graphed_test()
        eager = training.evaluate_model(run.tested_model, run.test_batches,
                                        channels_last=config.channels_last)
    assert graphed.correct == eager.correct
    assert graphed.loss == pytest.approx(eager.loss, rel=1e-5)
