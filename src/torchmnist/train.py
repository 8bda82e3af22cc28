"""Training: setup -> train (test after every epoch) -> save, as the guide lays it out.

`train(config)` is the whole run; `_train_epoch` is the loop the guide teaches, readable in one
screen. Checkpoints hold everything needed to continue from the very next batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim

from torchmnist import checkpoint, data, models
from torchmnist import device as devices
from torchmnist.config import TrainConfig
from torchmnist.errors import TrainingError, UsageError
from torchmnist.evaluate import evaluate_model
from torchmnist.runlog import RunLog
from torchmnist.signals import Stopped, StopSignals


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so a resume continues exactly."""

    epoch: int = 1  # the epoch in progress, counting from 1
    batch: int = 0  # batches of this epoch already trained
    step: int = 0  # optimiser steps in the whole run
    best_accuracy: float | None = None
    seconds: float = 0.0  # time spent training and testing, summed over resumes
    # Running loss sums, kept on the device so that adding to them never waits for it.
    epoch_loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    window_loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    window_batches: int = 0

    def state(self) -> dict:
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Progress:
        values = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        return cls(**values)


def build_optimizer(config: TrainConfig, model: nn.Module) -> optim.Optimizer:
    params = model.parameters()  # the model is already on its device (see the guide)
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adadelta":
        return optim.Adadelta(params, lr=config.lr)
    if config.optimizer == "adam":
        return optim.Adam(params, lr=config.lr)
    return optim.AdamW(params, lr=config.lr)


def build_scheduler(config: TrainConfig, optimizer: optim.Optimizer):
    if config.scheduler == "step":
        return optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    return None


def _new_run_dir(config: TrainConfig) -> Path:
    dataset = "synthetic" if config.dry_run else config.dataset
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs") / f"{stamp}-{dataset}-{config.model}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path("runs") / f"{stamp}-{dataset}-{config.model}-{suffix}"
    return run_dir


def train(config: TrainConfig) -> dict:
    """Train and test as `config` says; return the run's summary (also the CLI's --json)."""
    # ---- setup ----------------------------------------------------------------------------
    devices.prepare_environment(cuda_launch_blocking=config.cuda_launch_blocking,
                                deterministic=config.deterministic, threads=config.threads)
    device = devices.resolve_device(config.device)
    setup_start = time.perf_counter()
    saved, changes, resume_path = None, [], None
    if config.resume:
        resume_path = checkpoint.find_resume(config.resume, config.run_dir)
        saved = checkpoint.load_training(resume_path)
        changes = checkpoint.check_compatible(saved["config"], config)

    devices.seed_everything(config.seed)
    if config.dry_run:
        digits = data.synthetic(config.dataset, seed=config.seed)
    else:
        digits = data.load(config.dataset, config.data_dir, download=config.download)
    pin_memory = config.pin_memory if config.pin_memory is not None else device.type == "cuda"
    loader_options = dict(num_workers=config.num_workers, pin_memory=pin_memory)
    train_batches = data.make_batches(config.loader, digits.train, digits.spec, config.batch_size,
                                      device, shuffle=True, seed=config.seed, **loader_options)
    test_batches = data.make_batches(config.loader, digits.test, digits.spec,
                                     config.test_batch_size, device, shuffle=False,
                                     **loader_options)

    model = models.build(config.model).to(device)  # before the optimiser takes its parameters
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    progress = Progress(epoch_loss_sum=torch.zeros((), device=device),
                        window_loss_sum=torch.zeros((), device=device))
    if saved is not None:
        run_dir = Path(config.run_dir) if config.run_dir else resume_path.parent
        _restore(saved, resume_path, model, optimizer, scheduler)
        progress = Progress.from_state(saved["progress"], device)
    else:
        run_dir = Path(config.run_dir) if config.run_dir else _new_run_dir(config)
        if (run_dir / "last.pt").exists():
            raise UsageError(f"{run_dir} already holds a run's checkpoint; pass --resume to "
                             "continue it, or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_temporaries(run_dir)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log = RunLog(run_dir, history=saved["metrics"] if saved else None)
    last_path = run_dir / "last.pt"

    def save(path: Path) -> None:
        # Never replace a good checkpoint with a diverged state: this save waits for the device
        # anyway, so checking the weights here costs nothing extra.
        _check_finite(model, progress)
        checkpoint.save(path, {
            "config": config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": None, "progress": progress.state(), "rng": devices.rng_state(),
            "metrics": log.history})

    log.print(f"torchmnist: {config.recipe} recipe, {config.model} model on {digits.spec.name}"
              f"{' (synthetic, dry run)' if config.dry_run else ''}, device {device} "
              f"({devices.describe(device)}), torch {torch.__version__}")
    log.print(f"data: {len(digits.train)} train / {len(digits.test)} test images from "
              f"{digits.source}; {config.loader} loader")
    log.print("config: " + json.dumps(config.to_dict()))
    if saved is not None:
        log.print(f"resuming from {resume_path} at epoch {progress.epoch}, batch "
                  f"{progress.batch} (step {progress.step})")
        for change in changes:
            log.print(f"  resume: {change}")
    setup_seconds = time.perf_counter() - setup_start

    # ---- train ----------------------------------------------------------------------------
    result = None
    with StopSignals() as stop, torch.autograd.set_detect_anomaly(config.detect_anomaly):
        for epoch in range(progress.epoch, config.epochs + 1):
            _train_epoch(model, optimizer, train_batches, epoch, progress, config, log,
                         save=lambda: save(last_path), stop=stop)
            if stop.signum and progress.batch < len(train_batches):
                _stop(stop, progress, last_path, save, log)  # mid-epoch
            test_start = time.perf_counter()
            result = evaluate_model(model, test_batches)
            progress.seconds += time.perf_counter() - test_start
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            log.metric({"kind": "epoch", "epoch": epoch, "step": progress.step,
                        "train_loss": progress.epoch_loss_sum.item() / len(train_batches),
                        "test_loss": result.loss, "test_accuracy": result.accuracy,
                        "seconds": round(progress.seconds, 3), "lr": lr})
            log.print(f"epoch {epoch}/{config.epochs}: test loss {result.loss:.4f}, accuracy "
                      f"{result.correct}/{result.total} ({100 * result.accuracy:.2f}%), "
                      f"{progress.seconds:.1f} s so far")
            improved = result.accuracy > (progress.best_accuracy or 0.0)
            if improved:
                progress.best_accuracy = result.accuracy
            progress.epoch, progress.batch = epoch + 1, 0
            progress.epoch_loss_sum.zero_()
            save(last_path)
            if improved:
                save(run_dir / "best.pt")
            if config.keep:
                save(run_dir / f"epoch-{epoch:03d}.pt")
                for old in sorted(run_dir.glob("epoch-*.pt"))[:-config.keep]:
                    old.unlink()
            if stop.signum and epoch < config.epochs:
                _stop(stop, progress, last_path, save, log)  # between epochs

    # ---- save -----------------------------------------------------------------------------
    if result is None:  # resumed a run that had already finished: report where it stands
        log.print(f"nothing to train: the checkpoint already finished epoch {progress.epoch - 1}")
        result = evaluate_model(model, test_batches)
    model_files = []
    if config.save_model:
        model_files = [run_dir / "model.pt", run_dir / "model.safetensors"]
        for path in model_files:
            checkpoint.save_weights(path, model.state_dict())
    summary = {
        "test_accuracy": result.accuracy, "test_loss": result.loss,
        "best_accuracy": progress.best_accuracy, "epochs": progress.epoch - 1,
        "steps": progress.step, "train_seconds": round(progress.seconds, 3),
        "setup_seconds": round(setup_seconds, 3), "run_dir": str(run_dir),
        "checkpoint": str(last_path),
        "best_checkpoint": str(run_dir / "best.pt") if (run_dir / "best.pt").exists() else None,
        "model_file": str(model_files[0]) if model_files else None,
        "safetensors_file": str(model_files[1]) if model_files else None,
        "device": str(device), "dataset": config.dataset, "model": config.model,
        "recipe": config.recipe,
    }
    log.print(f"done: test accuracy {100 * result.accuracy:.2f}%, {progress.seconds:.1f} s "
              f"training; checkpoint {last_path}")
    log.close()
    return summary


def _restore(saved: dict, path: Path, model: nn.Module, optimizer: optim.Optimizer,
             scheduler) -> None:
    """Put the saved state back: weights, optimiser, schedule and every RNG stream."""
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        devices.set_rng_state(saved["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path} does not fit the {saved['config'].get('model')!r} model and "
                         f"its optimiser: {detail}") from None


def _check_finite(model: nn.Module, progress: Progress) -> None:
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not (finite.item() and progress.epoch_loss_sum.isfinite().item()):
        raise TrainingError(
            f"training diverged: the loss or the weights became NaN or infinite by epoch "
            f"{progress.epoch}, batch {progress.batch}; the last checkpoint written, if any, holds "
            "the state before that, so try again with a lower --lr (--detect-anomaly finds the "
            "operation)")


def _stop(stop: StopSignals, progress: Progress, last_path: Path, save, log: RunLog) -> None:
    """Save where the run stands and leave with 128 + the signal's number."""
    save(last_path)
    log.print(f"stopped by {stop.name} at epoch {progress.epoch}, batch {progress.batch}; "
              f"saved {last_path}")
    log.close()
    raise Stopped(f"{stop.name} at epoch {progress.epoch}, batch {progress.batch} (step "
                  f"{progress.step}); checkpoint saved; resume with: torchmnist train --resume "
                  f"{last_path}", stop.signum)


def _train_epoch(model: nn.Module, optimizer: optim.Optimizer, train_batches, epoch: int,
                 progress: Progress, config: TrainConfig, log: RunLog, save,
                 stop: StopSignals) -> None:
    model.train()  # dropout on
    total = len(train_batches)
    log.start_bar(total, progress.batch, desc=f"epoch {epoch}/{config.epochs}")
    mark = time.perf_counter()
    for x, y in train_batches.batches(epoch, start=progress.batch):  # x: (B, 1, 28, 28)
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(x), y)
        loss.backward()
        optimizer.step()

        # No .item() here: adding on the device keeps the GPU busy instead of waiting for it.
        progress.epoch_loss_sum += loss.detach()
        progress.window_loss_sum += loss.detach()
        progress.window_batches += 1
        progress.batch += 1
        progress.step += 1
        log.advance_bar()
        last_batch = progress.batch == total

        if progress.batch % config.log_interval == 0 or last_batch:
            # The logging branch: the one place a training step waits for the device.
            window_loss = progress.window_loss_sum.item() / progress.window_batches
            if not math.isfinite(window_loss):
                _check_finite(model, progress)  # raises
            now = time.perf_counter()
            progress.seconds, mark = progress.seconds + now - mark, now
            log.metric({"kind": "train", "epoch": epoch, "step": progress.step,
                        "batch": progress.batch, "train_loss": window_loss, "test_loss": None,
                        "test_accuracy": None, "seconds": round(progress.seconds, 3),
                        "lr": optimizer.param_groups[0]["lr"]})
            log.step_line(f"epoch {epoch} [{progress.batch}/{total}] loss {window_loss:.4f}",
                          postfix=f"loss {window_loss:.4f}")
            progress.window_loss_sum.zero_()
            progress.window_batches = 0
        if config.save_interval and progress.batch % config.save_interval == 0 and not last_batch:
            save()  # the end of the epoch is saved after testing
        if stop.signum:
            break  # the caller saves and stops (after testing, if the epoch is complete)
    progress.seconds += time.perf_counter() - mark
    log.close_bar()
