"""Training behaviour on the synthetic dry-run data: reproducibility, checkpoints, resume."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_sentence_error, dry_train, last_json, read_metrics, run_main

import torchmnist
from torchmnist import setup, training
from torchmnist.errors import TrainingError
from torchmnist.runtime import devices, distributed
from torchmnist.storage import checkpoint


def _losses(run_dir: Path) -> list[float]:
    return [(r["kind"], r["train_loss"], r["test_loss"]) for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_same_seed_gives_identical_losses(tmp_path, loader, capsys):
    # --deterministic: on CUDA some backward kernels otherwise add in a varying order.
    flags = ["--epochs", "2", "--loader", loader, "--num-workers", "0", "--deterministic",
             "--log-interval", "4"]
    dry_train(tmp_path / "a", *flags, capsys=capsys)
    dry_train(tmp_path / "b", *flags, capsys=capsys)
    dry_train(tmp_path / "c", *flags, "--seed", "2", capsys=capsys)
    a, b, c = (_losses(tmp_path / n) for n in "abc")
    assert len(a) == 2 * (4 + 1)  # 16 batches / 4 per log line, plus one record per epoch
    assert a == b
    assert a != c


def test_both_loaders_train_the_same_model(tmp_path, capsys):
    # Same order, same normalisation arithmetic: the two loaders give the same run, bit for bit
    # (on the CPU; on a GPU the tensor loader normalises there, with the GPU's rounding).
    tensor = dry_train(tmp_path / "t", "--loader", "tensor", "--device", "cpu", capsys=capsys)
    loader = dry_train(tmp_path / "d", "--loader", "dataloader", "--num-workers", "2",
                       "--device", "cpu", capsys=capsys)
    assert _losses(tmp_path / "t") == _losses(tmp_path / "d")
    assert tensor["test_accuracy"] == loader["test_accuracy"]


def test_training_learns_the_synthetic_task(tmp_path, capsys):
    summary = dry_train(tmp_path / "r", "--epochs", "8", "--lr", "0.05", capsys=capsys)
    metrics = read_metrics(tmp_path / "r")
    epochs = [r for r in metrics if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert summary["test_accuracy"] > 0.9  # chance is 0.1


def test_metrics_records_have_the_documented_fields(tmp_path, capsys):
    dry_train(tmp_path / "r", "--recipe", "official", "--epochs", "2", capsys=capsys)
    records = read_metrics(tmp_path / "r")
    for record in records:
        assert {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "seconds",
                "lr"} <= record.keys()
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["lr"] for r in epochs] == [1.0, 0.7]  # Adadelta with StepLR(gamma=0.7)
    assert all(r["test_accuracy"] is not None for r in epochs)


def test_the_step_counts_what_the_model_got_right_before_its_update(tmp_path):
    """The training accuracy of the epoch line: each batch scored by the weights that then
    learn from it, as trained (BatchNorm on batch statistics), summed over the epoch."""
    # fp32 and the plain layout, so that the forward pass below is the step's own.
    config = torchmnist.TrainConfig.for_recipe("fast", dry_run=True, device="cpu", amp="none",
                                               channels_last=False, run_dir=str(tmp_path / "r"),
                                               quiet=True)
    run = setup.build(config)
    try:
        for x, y in itertools.islice(run.train_batches.batches(1), 3):
            with torch.no_grad():
                expected = (run.model(x).argmax(1) == y).sum()
            before = run.model.state_dict()["conv1.weight"].clone()
            _, correct = training.train_step(run, x, y)
            assert correct.item() == expected.item()
            assert not torch.equal(before, run.model.state_dict()["conv1.weight"])
    finally:
        run.close()


def test_closing_a_run_takes_every_step_even_when_one_fails(tmp_path, monkeypatch):
    import multiprocessing

    config = torchmnist.TrainConfig(dry_run=True, loader="dataloader", num_workers=2,
                                    device="cpu", quiet=True, run_dir=str(tmp_path / "r"))
    left = []
    monkeypatch.setattr(training.distributed, "finish", lambda: left.append(True))
    before = set(multiprocessing.active_children())
    run = setup.build(config)
    next(iter(run.train_batches.batches(1)))  # the workers are running

    def full_disk():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run.log, "close", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run.close()
    # Closing the log failed; the steps after it were still taken.
    assert set(multiprocessing.active_children()) - before == set()
    assert run.lock._fd is None and left == [True]


def test_the_epoch_record_holds_the_training_accuracy_over_every_image(tmp_path, capsys):
    # The dry run's 1,024 images in batches of 100: the last batch has 24, and counts as 24.
    dry_train(tmp_path / "r", "--epochs", "2", "--batch-size", "100", capsys=capsys)
    epochs = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "epoch"]
    for record in epochs:
        assert 0 < record["train_accuracy"] <= 1
        correct = record["train_accuracy"] * 1024
        assert correct == pytest.approx(round(correct), abs=1e-6)
    assert epochs[1]["train_accuracy"] > epochs[0]["train_accuracy"]


def test_checkpoint_holds_model_optimiser_and_progress(tmp_path, capsys):
    summary = dry_train(tmp_path / "r", "--save-model", capsys=capsys)
    saved = checkpoint.load(summary["checkpoint"])  # weights_only=True
    assert saved["format_version"] == checkpoint.FORMAT_VERSION
    assert saved["config"]["model"] == "guide"
    assert saved["progress"]["epoch"] == 2 and saved["progress"]["batch"] == 0
    assert saved["progress"]["step"] == 16
    assert saved["optimizer"]["state"]  # SGD momentum buffers
    weights = torch.load(summary["model_file"], weights_only=True)
    assert torch.equal(weights["fc2.weight"], saved["model"]["fc2.weight"])


def test_a_fractional_epoch_count_ends_the_last_epoch_early(tmp_path, capsys):
    summary = dry_train(tmp_path / "r", "--recipe", "fast", "--epochs", "1.5", "--lr", "0.2",
                        capsys=capsys)
    assert summary["steps"] == 24  # 16 batches an epoch, then half of one
    records = read_metrics(tmp_path / "r")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [16, 24]
    assert all(r["test_accuracy"] is not None for r in epochs)  # the short epoch is tested
    # The one-cycle schedule spans exactly those 24 steps: the last one runs at its floor,
    # --lr / 10 / 100, and no rate logged is negative.
    assert epochs[-1]["lr"] == pytest.approx(0.2 / 1000)
    assert min(r["lr"] for r in records) > 0
    saved = checkpoint.load(summary["checkpoint"])
    assert saved["config"]["epochs"] == 1.5 and saved["progress"]["step"] == 24


def test_resume_keeps_the_saved_settings_unless_overridden(tmp_path, capsys):
    dry_train(tmp_path / "r", "--recipe", "official", "--epochs", "1", capsys=capsys)
    code, out, err = run_main(["train", "--run-dir", str(tmp_path / "r"), "--resume",
                               "--epochs", "2", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["model"] == "official"  # not the guide recipe's default
    assert "epochs: 1 in the checkpoint, 2 now (now wins)" in err  # --json: on stderr


def test_resume_with_a_different_batch_size_is_refused(tmp_path, capsys):
    dry_train(tmp_path / "r", capsys=capsys)
    before = (tmp_path / "r" / "last.pt").read_bytes()
    code, _, err = run_main(["train", "--run-dir", str(tmp_path / "r"), "--resume",
                             "--batch-size", "32"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "batch_size (checkpoint: 64, now: 32)")
    assert (tmp_path / "r" / "last.pt").read_bytes() == before


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    dry_train(tmp_path / "r", capsys=capsys)
    code, _, err = run_main(["train", "--dry-run", "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2
    assert_one_sentence_error(err, "already holds a run's checkpoint", "--resume")


def test_python_api_matches_the_cli(tmp_path, capsys):
    summary = torchmnist.train(torchmnist.TrainConfig(dry_run=True, epochs=1,
                                                      run_dir=str(tmp_path / "api")))
    cli_summary = dry_train(tmp_path / "cli", "--epochs", "1", capsys=capsys)
    assert summary["test_accuracy"] == cli_summary["test_accuracy"]
    official = torchmnist.TrainConfig.for_recipe("official", epochs=1)
    assert (official.model, official.optimizer, official.epochs) == ("official", "adadelta", 1)


def test_a_deterministic_run_does_not_leave_the_process_deterministic():
    # The switches are process-wide; the API and `bench` run many trainings in one process.
    devices.prepare_environment(cuda_launch_blocking=False, deterministic=True, threads=None)
    assert torch.are_deterministic_algorithms_enabled()
    devices.prepare_environment(cuda_launch_blocking=False, deterministic=False, threads=None)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


def test_an_operation_without_a_deterministic_kernel_ends_in_one_sentence():
    # CUDA's adaptive max-pool backward (in the best model) has no deterministic kernel; the
    # CPU has none such, so the error torch raises there is raised here by hand.
    from types import SimpleNamespace

    from torchmnist.errors import UsageError
    from torchmnist.training import _explained_errors

    run = SimpleNamespace(config=torchmnist.TrainConfig(deterministic=True),
                          progress=SimpleNamespace(step=3), world=distributed.World())
    message = ("adaptive_max_pool2d_backward_cuda does not have a deterministic implementation, "
               "but you set 'torch.use_deterministic_algorithms(True)'. You can turn off ...")
    with pytest.raises(UsageError, match="--deterministic cannot be honoured on this device: "
                       "adaptive_max_pool2d_backward_cuda"):
        with _explained_errors(run):
            raise RuntimeError(message)
    with pytest.raises(RuntimeError, match="out of memory"):  # anything else passes through
        with _explained_errors(run):
            raise RuntimeError("CUDA out of memory")
    # In a distributed run, a peer that went away: one sentence, not gloo's message and trace.
    run.world = distributed.World(rank=1, local_rank=1, size=2)
    with pytest.raises(TrainingError, match="rank 1 lost another process of this job"):
        with _explained_errors(run):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:937: "
                               "Connection reset by peer")


@pytest.mark.slow
@pytest.mark.parametrize("flags, code", [([], 0), (["--lr", "1e10"], 1)],
                         ids=["finished", "diverged"])
def test_files_and_the_bar_are_closed_however_training_ends(flags, code, tmp_path):
    # -X dev reports every file left open when it is garbage-collected (ResourceWarning).
    done = subprocess.run([sys.executable, "-X", "dev", "-m", "torchmnist", "train", "--dry-run",
                           "--run-dir", "r", "--device", "cpu", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr
    assert "ResourceWarning" not in done.stderr, done.stderr


# ---- validation and early stopping ---------------------------------------------------------


def test_a_validation_split_chooses_and_the_test_set_is_scored_once(tmp_path, capsys):
    summary = dry_train(tmp_path / "v", "--val-size", "256", "--epochs", "3", "--device", "cpu",
                        capsys=capsys)
    log = (tmp_path / "v" / "train.log").read_text()
    assert "data: 768 train / 256 validation / 512 test images" in log
    epochs = [r for r in read_metrics(tmp_path / "v") if r["kind"] == "epoch"]
    assert [r["test_accuracy"] for r in epochs] == [None] * 3  # never looked at in training
    assert all(r["val_accuracy"] is not None for r in epochs)
    assert summary["best_accuracy"] == max(r["val_accuracy"] for r in epochs)
    assert summary["test_accuracy"] is not None and summary["val_accuracy"] is not None
    saved = checkpoint.load(tmp_path / "v" / "last.pt")
    index = saved["val_index"]
    assert len(index) == 256 and len(set(index.tolist())) == 256
    assert saved["config"]["val_size"] == 256


def test_patience_stops_when_the_choice_no_longer_improves(tmp_path, capsys):
    # A rate so small the accuracy cannot move: the first test is the best there will be.
    summary = dry_train(tmp_path / "p", "--val-size", "256", "--epochs", "10", "--patience", "2",
                        "--lr", "1e-12", "--device", "cpu", capsys=capsys)
    assert summary["epochs"] == 3
    assert "stopping early: 2 tests in a row without a better validation accuracy" in \
        (tmp_path / "p" / "train.log").read_text()


def test_target_accuracy_watches_the_test_set_even_with_validation(tmp_path, capsys):
    summary = dry_train(tmp_path / "t", "--val-size", "256", "--target-accuracy", "0.01",
                        "--eval-interval", "4s", "--epochs", "2", capsys=capsys)
    assert summary["target_seconds"] is not None and summary["steps"] == 4


def test_a_validation_split_must_leave_training_images(tmp_path, capsys):
    code, _, err = run_main(["train", "--dry-run", "--val-size", "1024", "--run-dir", "x"],
                            capsys)
    assert code == 2
    assert_one_sentence_error(err, "--val-size 1024 leaves nothing to train on")


def test_a_dry_run_learns_and_a_broken_step_shows(tmp_path, capsys, monkeypatch):
    summary = dry_train(tmp_path / "ok", "--device", "cpu", capsys=capsys)
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "ok") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert summary["test_accuracy"] > 0.3  # the guide's one epoch; chance is 0.1
    # The same dry run with the optimiser's step removed: the check above would catch it.
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
    broken = dry_train(tmp_path / "broken", "--device", "cpu", capsys=capsys)
    assert broken["test_accuracy"] < 0.2


@pytest.mark.slow
def test_on_test_sees_each_test_and_may_end_the_run(tmp_path):
    seen = []
    config = torchmnist.TrainConfig(dry_run=True, epochs=3, quiet=True,
                                    run_dir=str(tmp_path / "all"))
    result = training.train(config, on_test=lambda *args: seen.append(args))
    assert [(step, epoch, last) for _, step, epoch, last in seen] == [
        (16, 1, False), (32, 2, False), (48, 3, True)]
    assert seen[-1][0] == result["test_accuracy"]

    class Enough(Exception):
        pass

    def stop_after_epoch_2(accuracy, step, epoch, last):
        if epoch == 2:
            raise Enough

    with pytest.raises(Enough):
        training.train(torchmnist.TrainConfig(dry_run=True, epochs=3, quiet=True,
                                              run_dir=str(tmp_path / "cut")),
                       on_test=stop_after_epoch_2)
    saved = checkpoint.load(tmp_path / "cut/last.pt")  # saved before the test that raised
    assert 16 <= saved["progress"]["step"] < 32
    # The lock went with the run: the folder resumes at once.
    code = subprocess.run([sys.executable, "-m", "torchmnist", "train", "--resume",
                           str(tmp_path / "cut"), "--quiet"], capture_output=True).returncode
    assert code == 0
