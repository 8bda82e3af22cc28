"""Exact resume, and checkpoints that survive crashes, signals, divergence and bad files."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TORCHMNIST,
    assert_one_sentence_error,
    dry_train,
    last_json,
    read_metrics,
    run_main,
    run_subprocess,
    start_until,
)

from torchmnist.runtime.signals import StopSignals
from torchmnist.storage import checkpoint

ROOT = Path(__file__).resolve().parents[1]
LONG_DRY_RUN = ["--dry-run", "--epochs", "30", "--save-interval", "3", "--log-interval", "4",
                "--device", "cpu"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(loader, tmp_path):
    crash_resume = _load_script("crash_resume")
    result = crash_resume.check(tmp_path, loader=loader, kills=5, seed=1)
    assert result["weights_identical"], result
    assert result["losses_identical"], result
    assert len(result["resumed_at_epoch_batch"]) == 5
    # The kills came mid-epoch too, not only at epoch boundaries (a checkpoint every 3 of 16).
    assert any(batch > 0 for _, batch in result["resumed_at_epoch_batch"]), result


def _start(tmp_path: Path, run_dir: str) -> subprocess.Popen:
    return start_until([*TORCHMNIST, "train", "--run-dir", run_dir, *LONG_DRY_RUN], tmp_path,
                       (tmp_path / run_dir / "last.pt").exists)  # training has begun


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_prints_the_resume_command_and_resumes_exactly(signum, code, tmp_path):
    reference = run_subprocess(["train", "--run-dir", "ref", *LONG_DRY_RUN], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    process = _start(tmp_path, "run")
    time.sleep(0.3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert_one_sentence_error(stderr, signal.Signals(signum).name, "checkpoint saved",
                              "resume with: torchmnist train --resume run/last.pt")
    stopped_at = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["progress"]
    assert stopped_at["epoch"] <= 30

    command = stderr.split("resume with: ")[1].split()
    resumed = run_subprocess(command[1:], cwd=tmp_path)  # the printed command, as typed
    assert resumed.returncode == 0, resumed.stderr
    assert _identical(_weights(tmp_path / "run" / "last.pt"),
                      _weights(tmp_path / "ref" / "last.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_process_group_stops_cleanly_with_loader_workers(signum, code,
                                                                              tmp_path):
    # Ctrl-C in a terminal, `timeout` and `kill -- -PGID` signal every process of the group,
    # DataLoader workers included; the run must still save and print the resume command, not
    # die of a worker's death.
    process = start_until([*TORCHMNIST, "train", "--run-dir", "run", *LONG_DRY_RUN, "--loader",
                           "dataloader", "--num-workers", "2"], tmp_path,
                          (tmp_path / "run" / "last.pt").exists, start_new_session=True,
                          env={"PYTHONFAULTHANDLER": "1"})
    time.sleep(0.3)
    os.killpg(process.pid, signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # Hung once in CI (not reproduced in 28 runs; a likely cause since found and fixed:
        # Python's exit waiting for loader workers, which ignore SIGTERM, of a loader not yet
        # collected). faulthandler prints where every thread of the main process stands.
        os.kill(process.pid, signal.SIGABRT)
        _, stderr = process.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # its loader workers, if still there
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the run did not stop within 60 s of {signal.Signals(signum).name}; "
                    f"its stderr:\n{stderr}")
    assert process.returncode == code, stderr
    assert_one_sentence_error(stderr, signal.Signals(signum).name, "checkpoint saved",
                              "resume with:")


def test_a_second_ctrl_c_aborts_at_once():
    stop = StopSignals()
    stop._handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT  # the first only asks to stop after this step
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_a_signal_caught_just_before_training_began_is_acted_on():
    # A sweep catches signals around its trials; one that came while a trial was being set
    # up, before training installed its own handlers, once went unnoticed for the whole trial.
    with StopSignals() as sweep:
        os.kill(os.getpid(), signal.SIGTERM)
        assert sweep.signum == signal.SIGTERM
        with StopSignals() as training:
            assert training.signum == signal.SIGTERM
    with StopSignals() as alone:
        assert alone.signum is None


def test_diverged_loss_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    code, _, err = run_main(["train", "--dry-run", "--lr", "1e10", "--save-interval", "1",
                             "--log-interval", "1", "--run-dir", "r"], capsys)
    assert code == 1
    assert_one_sentence_error(err, "training diverged", "NaN or infinite", "lower --lr")
    saved = checkpoint.load(tmp_path / "r" / "last.pt")
    assert saved["progress"]["step"] >= 1
    assert all(t.isfinite().all() for t in saved["model"].values())


def test_anomaly_detection_names_the_operation_in_one_sentence(tmp_path, capsys):
    # On the CPU: which operation first returns NaN (and whether the forward pass already
    # overflows) is the device's business; the sentence is what is tested.
    # 1e5 diverges over a few steps, so a backward is the first to meet NaN (with 1e10 the
    # forward pass overflows first, which the plain divergence check reports).
    code, _, err = run_main(["train", "--dry-run", "--lr", "1e5", "--detect-anomaly",
                             "--save-interval", "1", "--log-interval", "1", "--run-dir", "r",
                             "--device", "cpu"], capsys)
    assert code == 1
    sentence = err.strip().splitlines()[-1]  # after torch's own warning with the forward trace
    assert sentence.startswith("torchmnist: error: training diverged at step")
    assert "returned nan values" in sentence and ".;" not in sentence  # torch's full stop
    saved = checkpoint.load(tmp_path / "r" / "last.pt")
    assert all(t.isfinite().all() for t in saved["model"].values())


@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    # What torch.save itself raises when the disk fills up under it: not an OSError.
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                  "writing file data/3: file write failed"), "file write failed"),
], ids=["oserror", "torch-runtimeerror"])
def test_failed_write_never_corrupts_the_previous_checkpoint(failure, reason, tmp_path, capsys,
                                                             monkeypatch):
    real_save = torch.save
    calls = []

    def disk_fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the fourth checkpoint: half written, then the disk is full
            f.write(b"PK\x03\x04 half a checkpoint")
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    code, _, err = run_main(["train", "--dry-run", "--save-interval", "3", "--run-dir", "r"],
                            capsys)
    assert code == 1
    assert_one_sentence_error(err, "could not write r/last.pt", reason, "free in r)",
                              "unchanged")
    monkeypatch.setattr(torch, "save", real_save)
    saved = checkpoint.load(tmp_path / "r" / "last.pt")
    assert saved["progress"]["batch"] == 9  # the third checkpoint, intact
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        ".torchmnist-lock", ".torchmnist-run", "config.json", "last.pt", "metrics.jsonl",
        "train.log"]  # no half-written leftovers


def test_best_and_kept_epoch_checkpoints(tmp_path, capsys):
    code, out, err = run_main(["train", "--dry-run", "--epochs", "5", "--lr", "0.05", "--keep",
                               "2", "--run-dir", "r", "--json"], capsys)
    assert code == 0, err
    summary = last_json(out)
    run_dir = tmp_path / "r"
    assert sorted(p.name for p in run_dir.glob("epoch-*.pt")) == ["epoch-004.pt", "epoch-005.pt"]
    accuracies = [r["test_accuracy"] for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    best = checkpoint.load(run_dir / "best.pt")
    assert best["progress"]["best_accuracy"] == max(accuracies) == summary["best_accuracy"]
    # Saved right after the best test: that epoch, all its 16 batches done.
    assert best["progress"]["epoch"] == accuracies.index(max(accuracies)) + 1
    assert best["progress"]["batch"] == 16


def test_more_epochs_continue_training(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    code, out, err = run_main(["train", "--resume", "--run-dir", "r", "--epochs", "3", "--json"],
                              capsys)
    assert code == 0, err
    assert last_json(out)["epochs"] == 3
    assert [r["epoch"] for r in read_metrics(tmp_path / "r") if r["kind"] == "epoch"] == [1, 2, 3]


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, capsys, monkeypatch):
    path = Path(dry_train("good", capsys=capsys)["checkpoint"])
    saved = torch.load(path, weights_only=True)
    # Save it the way a CUDA run would: every storage tagged with the location "cuda:0".
    # (A context of its own: undoing the whole monkeypatch would also undo the test's chdir.)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "_package_registry",
                      list(torch.serialization._package_registry))
        torch.serialization.register_package(0, lambda storage: "cuda:0", lambda obj, loc: None)
        torch.save(saved, path)
    if not torch.cuda.is_available():  # the control: without map_location it cannot load here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    assert checkpoint.load(path)["model"]["conv1.weight"].device.type == "cpu"
    code, out, err = run_main(["train", "--resume", str(path), "--epochs", "2", "--device",
                               "cpu", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["epochs"] == 2


def test_safetensors_weights_are_written_and_tested(tmp_path, capsys):
    from conftest import make_dataset_files

    make_dataset_files(tmp_path / "data" / "MNIST" / "raw")
    # On the CPU, where the same weights score the same loss to the last bit in every pass.
    code, out, err = run_main(["train", "--data-dir", "data", "--epochs", "1", "--save-model",
                               "--run-dir", "r", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    summary = last_json(out)
    from safetensors.torch import load_file

    tensors = load_file(summary["safetensors_file"])
    assert _identical(tensors, _weights(tmp_path / "r" / "last.pt"))
    results = []
    for name in ("last.pt", "model.pt", "model.safetensors"):
        code, out, err = run_main(["test", f"r/{name}", "--data-dir", "data", "--json",
                                   "--device", "cpu"], capsys)
        assert code == 0, err
        results.append(last_json(out)["test_loss"])
    assert results[0] == results[1] == results[2] == summary["test_loss"]
