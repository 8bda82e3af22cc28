"""Training: setup -> train (testing as it goes) -> save, as the guide lays it out.

`train(config)` is the whole run. `setup` builds everything from the config (and a checkpoint,
when resuming); `_train_epoch` is the loop the guide teaches, readable in one screen; `_save`
writes everything needed to continue from the very next batch.

Read top-down: what a run holds, `train`, the loop (`_train_epochs` -> `_train_epoch` ->
`train_step`), testing, saving, and last the setup that builds a `Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchmnist import checkpoint, data, devices, distributed, exporting, graphs, models, rundir
from torchmnist.augment import augment
from torchmnist.config import (
    TrainConfig,
    differences,
    eval_interval,
    frozen_prefixes,
    idle_settings,
    resolve,
    schedule_length,
)
from torchmnist.errors import TrainingError, UsageError
from torchmnist.evaluation import Evaluation, evaluate_model, test_sums, to_evaluation
from torchmnist.runlog import RunLog
from torchmnist.signals import Stopped, StopSignals

# ---------------------------------------------------------------------------------------------
# What a run holds


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so a resume continues exactly."""

    epoch: int = 1  # the epoch in progress, counting from 1
    batch: int = 0  # batches of this epoch already trained
    step: int = 0  # optimiser steps in the whole run
    best_accuracy: float | None = None  # of validation with --val-size, else of test
    stale_tests: int = 0  # tests in a row without a better best_accuracy (--patience)
    target_seconds: float | None = None  # when --target-accuracy was reached
    seconds: float = 0.0  # time spent training and testing, summed over resumes
    # Running sums, kept on the device so that adding to them never waits for it.
    epoch_loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    epoch_correct_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    epoch_images: int = 0  # training images seen this epoch (the last batch may be short)
    window_loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    window_batches: int = 0

    def count(self, loss: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        """Add one trained batch. No .item() here: adding on the device keeps the GPU busy
        instead of waiting for it."""
        self.epoch_loss_sum += loss
        self.epoch_correct_sum += correct
        self.epoch_images += images
        self.window_loss_sum += loss
        self.window_batches += 1
        self.batch += 1
        self.step += 1

    def state_dict(self) -> dict:
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict) -> None:
        """Take a saved state; the loss sums stay on this Progress's device. Keys a newer
        checkpoint may add are ignored; ones an older one lacks keep their defaults."""
        for key, value in state.items():
            if key not in self.__dataclass_fields__:
                continue
            current = getattr(self, key)
            if isinstance(current, torch.Tensor):
                value = torch.as_tensor(value, dtype=current.dtype).to(current.device)
            setattr(self, key, value)


@dataclass
class Run:
    """Everything a training run holds, built by `setup`."""

    config: TrainConfig
    device: torch.device
    run_dir: Path
    model: nn.Module  # the module whose state_dict is saved, never a compiled wrapper
    forward: Callable  # what the loop calls: the model, or its torch.compile'd version
    optimizer: optim.Optimizer
    scheduler: optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    train_batches: data.TensorBatches | data.LoaderBatches
    test_batches: data.TensorBatches | data.LoaderBatches
    val_batches: data.TensorBatches | None  # --val-size: held out from the training set
    val_index: torch.Tensor | None  # which training images those are (saved in checkpoints)
    spec: data.DatasetSpec  # the data's normalisation and classes (saved in checkpoints)
    progress: Progress
    log: RunLog
    lock: rundir.RunLock  # held for the whole run
    # With --cuda-graph on CUDA: train_step and the test pass replayed from CUDA graphs.
    graphed_step: graphs.GraphedStep | None = None
    graphed_test: graphs.GraphedTest | None = None
    epoch_began: float = 0.0  # progress.seconds when this epoch (or its resumed part) began
    # This process's place among the processes torchrun started (one, without torchrun).
    world: distributed.World = field(default_factory=distributed.World)
    # The hardware and the precision chosen for it, as the first lines say them; saved in
    # every checkpoint beside the config, which holds the precision itself (amp).
    hardware: str = ""
    # Called after each test with (accuracy followed, step, epoch, whether it is the run's last
    # test); it may raise to end the run there (a sweep's pruner does).
    on_test: Callable[[float, int, int, bool], None] | None = None

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def epochs(self) -> int:
        """Epochs begun in the whole run; the last may be cut short by a fractional --epochs."""
        return schedule_length(self.config, len(self.train_batches)).epochs

    def epoch_steps(self, epoch: int) -> int:
        """Batches trained in `epoch`: all of them, except in a fractional last epoch."""
        per_epoch = len(self.train_batches)
        total = schedule_length(self.config, per_epoch).steps
        return min(per_epoch, total - (epoch - 1) * per_epoch)

    @property
    def background(self) -> float:
        """The normalised value of an empty pixel, which augmentation fills in."""
        return self.spec.normalized_background

    @property
    def tested_model(self) -> nn.Module:
        """The weights that are tested and shipped: the average when --ema is on."""
        return self.ema.module if self.ema is not None else self.model

    def close(self) -> None:
        """Let go of what the run holds, however it ended: the graphs' device memory, the
        loader workers, the log files and progress bar, the run folder's lock and, under
        torchrun, the process group (after the DistributedDataParallel wrapper: see
        distributed.finish). Safe to call more than once; each step is taken even if one before
        it fails (a full disk can make closing the log raise)."""
        self.graphed_step = self.graphed_test = None
        with contextlib.ExitStack() as steps:  # registered last to first: it calls them LIFO
            steps.callback(distributed.finish)
            steps.callback(setattr, self, "forward", self.model)
            steps.callback(self.lock.release)
            steps.callback(self.log.close)
            for batches in (self.test_batches, self.train_batches):
                steps.callback(batches.close)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TrainResult(dict):
    """What `train` returns: the run's summary (the CLI's --json), as a dict, and `model`, the
    trained network (the weight average, with --ema) in eval mode on the training device."""

    def __init__(self, summary: dict, model: nn.Module):
        super().__init__(summary)
        self.model = model

    @property
    def summary(self) -> dict:
        return dict(self)


# ---------------------------------------------------------------------------------------------
# train: setup -> the epochs -> the summary


def train(config: TrainConfig, *, resumed: dict | None = None,
          on_test: Callable[[float, int, int, bool], None] | None = None) -> TrainResult:
    """Train and test as `config` says; return the summary and the trained model. `resumed`:
    the checkpoint `config.resume` names, when the caller has already read it
    (checkpoint.load_training), so that it is not read twice. `on_test(accuracy, step, epoch,
    last)` is called after each test (validation accuracy with --val-size; `last`: the run
    has trained its last step); an exception it raises ends the run there, files closed."""
    if not isinstance(config, TrainConfig):
        raise UsageError(f"train takes a TrainConfig, not a {type(config).__name__}; "
                         "TrainConfig(**settings) makes one from a dict of settings")
    # ---- setup ----------------------------------------------------------------------------
    setup_start = time.perf_counter()
    run, saved_from = setup(config, resumed)
    run.on_test = on_test
    with run:  # however training ends (done, an error, a signal), the run is closed
        # One-time work kept out of the training time: compilation, the capture of CUDA
        # graphs, and on an accelerator the loading of its kernels and libraries, which the
        # first steps would otherwise pay for.
        with _explained_errors(run):
            warmup_seconds = warm_up(run)
        setup_seconds = time.perf_counter() - setup_start - warmup_seconds
        if config.tensorboard:
            _start_tensorboard(run)
        # ---- train ------------------------------------------------------------------------
        test, val = _train_epochs(run) or (None, None)
        # ---- save -------------------------------------------------------------------------
        # Scored now if it was not in the loop: a finished run, resumed, or a run that chose
        # on a validation set, whose test set is scored this once.
        if test is None:
            test = _evaluate(run, run.test_batches)
        summary = _finish(run, test, val, saved_from, setup_seconds, warmup_seconds)
        run.log.print(f"done: test accuracy {100 * test.accuracy:.2f}%, "
                      f"{run.progress.seconds:.2f} s training; checkpoint {run.last_path}")
        return TrainResult(summary, run.tested_model.eval())


# ---------------------------------------------------------------------------------------------
# The loop: epochs, batches, and the guide's training step


def _train_epochs(run: Run) -> tuple[Evaluation | None, Evaluation | None] | None:
    """The guide's loop over epochs: train, test, log, save; stop early at --target-accuracy,
    for --patience, or on SIGINT/SIGTERM (saving first). Returns the last (test, validation)
    results, if anything was tested."""
    config, progress = run.config, run.progress
    interval = eval_interval(config)
    total_steps = schedule_length(config, len(run.train_batches)).steps
    test_every = interval.every if interval.unit == "steps" else 0
    result = None
    with (StopSignals() as stop, torch.autograd.set_detect_anomaly(config.detect_anomaly),
          _explained_errors(run)):
        for epoch in range(progress.epoch, run.epochs + 1):
            if progress.step >= total_steps:
                break  # a finished run, resumed: nothing left to train
            result = _train_epoch(run, epoch, stop, test_every)
            reached = result is not None  # reached the target in a test within the epoch
            if stop.signum and progress.batch < run.epoch_steps(epoch) and not reached:
                _stop(run, stop)  # mid-epoch
            if not reached and (test_every or epoch % interval.every == 0 or epoch == run.epochs):
                result = _test(run, epoch)
                reached = _reached(run, result[0])
            _end_epoch(run, epoch, result)
            if _stopping_early(run, reached):
                break
            if _signalled(run, stop) and epoch < run.epochs:
                _stop(run, stop)  # between epochs
    return result


def _train_epoch(run: Run, epoch: int, stop: StopSignals, test_every: int = 0,
                 ) -> tuple[Evaluation | None, Evaluation | None] | None:
    """Train one epoch from `progress.batch` on. With `test_every` steps, test as it goes and
    return the test that reached --target-accuracy, if one did (the epoch then ends early)."""
    config, progress, log = run.config, run.progress, run.log
    run.epoch_began = progress.seconds
    run.model.train()  # dropout on, BatchNorm uses batch statistics
    total = run.epoch_steps(epoch)
    log.start_bar(total, progress.batch, desc=f"epoch {epoch}/{run.epochs}")
    mark, hit = time.perf_counter(), None
    # With --cuda-graph, the same train_step replayed from its captured kernels.
    step = run.graphed_step or functools.partial(train_step, run)
    batches = run.train_batches.batches(epoch, start=progress.batch)
    for x, y in itertools.islice(batches, total - progress.batch):  # x: (B, 1, 28, 28)
        loss, correct = step(x, y)
        # One-cycle sets the rate of the next step; after the run's last step there is none
        # (its line would run on below zero), so the rate logged last is the one last used.
        if (config.scheduler == "onecycle"
                and run.scheduler.last_epoch + 1 < run.scheduler.total_steps):
            run.scheduler.step()
        progress.count(loss, correct, len(y))
        log.advance_bar()
        last_batch = progress.batch == total

        logging = progress.batch % config.log_interval == 0 or last_batch
        if logging:
            mark = _log_window(run, epoch, total, mark)  # the one wait for the device
        if test_every and progress.step % test_every == 0 and not last_batch:
            progress.seconds += time.perf_counter() - mark
            test, val = _test(run, epoch)  # adds its own time
            mark = time.perf_counter()
            run.model.train()
            if _reached(run, test):
                hit = test, val
                break
        if config.save_interval and progress.batch % config.save_interval == 0 and not last_batch:
            _save(run, run.last_path)  # the end of the epoch is saved after testing
        if _signalled(run, stop, now=logging):
            break  # the caller saves and stops (after testing, if the epoch is complete)
    progress.seconds += time.perf_counter() - mark
    log.close_bar()
    return hit


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on one batch, as the guide teaches it: zero_grad, forward, loss,
    backward, step (plus the recipe's augmentation, precision and average). Returns the loss
    and how many of the batch the model got right, as tensors on the device: nothing here
    waits for the device, so with --cuda-graph this very function is captured and replayed."""
    config, optimizer = run.config, run.optimizer
    x = _layout(run, augment(x, config.augment, run.background))
    optimizer.zero_grad(set_to_none=True)
    with devices.autocast(run.device, config.amp):
        output = run.forward(x).float()  # (B, classes) log-probabilities
    if config.label_smoothing:
        # cross_entropy applies log_softmax itself, and log_softmax of log-probabilities is
        # the same log-probabilities (they already sum to one in probability): so on the
        # model's output it is nll_loss with smoothing, not a softmax taken twice.
        loss = F.cross_entropy(output, y, label_smoothing=config.label_smoothing)
    else:
        loss = F.nll_loss(output, y)
    run.scaler.scale(loss).backward()  # the scaler is a no-op unless --amp fp16
    run.scaler.step(optimizer)
    run.scaler.update()
    if run.ema is not None:
        update_average(run.ema, run.model, config.ema)
    correct = (output.detach().argmax(1) == y).sum()
    return loss.detach(), correct


@torch.no_grad()
def update_average(average: AveragedModel, model: nn.Module, decay: float) -> None:
    """What `average.update_parameters(model)` does with an EMA, without its host-side test of
    `n_averaged` (a wait for the device every step, which a CUDA graph cannot hold): the first
    update copies the weights and buffers, each later one moves them `1 - decay` of the way."""
    first = average.n_averaged == 0  # a tensor on the device, not a Python bool
    weight = torch.where(first, 1.0, 1.0 - decay)  # lerp by 1 is an exact copy
    kept = itertools.chain(average.module.parameters(), average.module.buffers())
    current = itertools.chain(model.parameters(), model.buffers())
    for average_value, value in zip(kept, current, strict=True):
        if average_value.is_floating_point():
            average_value.lerp_(value, weight)
        else:  # BatchNorm's batch counter, averaged as AveragedModel averages integers
            average_value.copy_(torch.where(first, value, average_value * decay
                                            + value * (1 - decay)))
    average.n_averaged += 1


def _layout(run: Run, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if run.config.channels_last else x


def _rate(run: Run) -> float:
    """The current learning rate, as a number (with --cuda-graph it lives on the device)."""
    return float(run.optimizer.param_groups[0]["lr"])


def _log_window(run: Run, epoch: int, total: int, mark: float) -> float:
    """The logging branch: the mean loss since the last log line (the one place a training
    step waits for the device), as a metric and a line. Returns the new time mark."""
    progress, world = run.progress, run.world
    window_loss = (distributed.all_sum(progress.window_loss_sum, world).item()
                   / (progress.window_batches * world.size))
    if not math.isfinite(window_loss):
        _check_finite(run)  # raises
    now = time.perf_counter()
    progress.seconds += now - mark
    run.log.metric({"kind": "train", "epoch": epoch, "step": progress.step,
                    "batch": progress.batch, "train_loss": window_loss, "test_loss": None,
                    "test_accuracy": None, "seconds": round(progress.seconds, 3),
                    "lr": _rate(run)})
    run.log.step_line(f"epoch {epoch} [{progress.batch}/{total}] loss {window_loss:.4f}",
                      postfix=f"loss {window_loss:.4f}")
    progress.window_loss_sum.zero_()
    progress.window_batches = 0
    return now


def _signalled(run: Run, stop: StopSignals, now: bool = True) -> bool:
    """Whether a SIGINT/SIGTERM asks the run to stop. A single process looks after every
    step. The ranks of a distributed run must all stop after the same step, so they agree on
    it (one tiny all-reduce) where they already wait for each other: at each log line
    (`now`) and between epochs."""
    if run.world.distributed:
        if not now:
            return False
        stop.signum = distributed.agree_on_signal(stop.signum, run.world, run.device)
    return stop.signum is not None


def _stop(run: Run, stop: StopSignals) -> None:
    """Save where the run stands and leave with 128 + the signal's number."""
    progress = run.progress
    _save(run, run.last_path)
    run.log.print(f"stopped by {stop.name} at epoch {progress.epoch}, batch {progress.batch}; "
                  f"saved {run.last_path}")
    run.log.close()
    raise Stopped(f"{stop.name} at epoch {progress.epoch}, batch {progress.batch} (step "
                  f"{progress.step}); checkpoint saved; resume with: "
                  f"{'the same torchrun command and ' if run.world.distributed else ''}"
                  f"torchmnist train --resume {run.last_path}", stop.signum)


def _reached(run: Run, result: Evaluation | None) -> bool:
    target = run.config.target_accuracy
    if target is None or result is None or result.accuracy < target:
        return False
    if run.progress.target_seconds is None:
        run.progress.target_seconds = run.progress.seconds
    return True


def _stopping_early(run: Run, reached: bool) -> bool:
    """Whether the run ends before its last epoch: --target-accuracy reached, or --patience
    run out. Says which."""
    config, progress = run.config, run.progress
    if reached:
        run.log.print(f"reached the target accuracy {100 * config.target_accuracy:.2f}% after "
                      f"{progress.target_seconds:.2f} s, at step {progress.step}")
        return True
    if config.patience and progress.stale_tests >= config.patience:
        run.log.print(f"stopping early: {config.patience} tests in a row without a better "
                      f"{'validation' if run.val_batches else 'test'} accuracy than "
                      f"{100 * progress.best_accuracy:.2f}%")
        return True
    return False


def _end_epoch(run: Run, epoch: int,
               result: tuple[Evaluation | None, Evaluation | None] | None) -> None:
    """Log the epoch, step a per-epoch schedule, save. An epoch cut short (a fractional
    --epochs, or the target reached) stays open in the checkpoint, so that a longer run resumed
    from it trains the rest of that epoch, exactly as a fresh run of that length would."""
    config, progress = run.config, run.progress
    complete = progress.batch == len(run.train_batches)
    lr = _rate(run)  # the rate this epoch ended with
    if complete and config.scheduler == "step":
        run.scheduler.step()
    test, val = result or (None, None)
    train_loss, train_accuracy = _train_measures(run)
    record = {"kind": "epoch", "epoch": epoch, "step": progress.step,
              "train_loss": train_loss, "train_accuracy": train_accuracy,
              "test_loss": test.loss if test else None,
              "test_accuracy": test.accuracy if test else None,
              "seconds": round(progress.seconds, 3), "lr": lr}
    if run.val_batches is not None:
        record.update(val_loss=val.loss if val else None,
                      val_accuracy=val.accuracy if val else None)
    run.log.metric(record)
    if complete:
        progress.epoch, progress.batch = epoch + 1, 0
        progress.epoch_loss_sum.zero_()
        progress.epoch_correct_sum.zero_()
        progress.epoch_images = 0
    _save(run, run.last_path)
    if config.keep:
        _save(run, run.run_dir / f"epoch-{epoch:03d}.pt")
    if config.keep and run.world.main:
        kept = sorted(run.run_dir.glob("epoch-[0-9][0-9][0-9].pt"))
        for old in kept[:-config.keep]:
            old.unlink()


# ---------------------------------------------------------------------------------------------
# Testing


def _test(run: Run, epoch: int) -> tuple[Evaluation | None, Evaluation | None]:
    """Validate (with --val-size) and test, log, keep best.pt and count --patience; return
    (test, validation) results. With a validation set the test set is only scored here when
    --target-accuracy watches it. The time counts as training time (it is how a target is
    seen)."""
    progress, config = run.progress, run.config
    start = time.perf_counter()
    val = test = None
    # In fp32 whatever --amp trains in: every accuracy torchmnist reports then comes from the
    # one evaluation that `torchmnist test`, report and the exported files compute, and they
    # agree to the image.
    if run.val_batches is not None:
        val = _evaluate(run, run.val_batches)
    if run.val_batches is None or config.target_accuracy is not None:
        test = (run.graphed_test() if run.graphed_test is not None
                else _evaluate(run, run.test_batches))
    progress.seconds += time.perf_counter() - start
    # The line that stays for each test, as Keras keeps one per epoch. The training loss and
    # accuracy are over this epoch's batches so far, as trained: augmented, with dropout on,
    # each batch scored just before its own update (and the loss label-smoothed when the
    # recipe smooths), so they are not the test set's measures on training images.
    shown = [(name, r) for name, r in (("validation", val), ("test", test)) if r is not None]
    train_loss, train_accuracy = _train_measures(run)
    run.log.print(f"epoch {epoch}/{run.epochs} step {progress.step}: train loss "
                  f"{train_loss:.4f}, accuracy {100 * train_accuracy:.2f}%; "
                  + "; ".join(
                      f"{name} loss {r.loss:.4f}, accuracy {r.correct}/{r.total} "
                      f"({100 * r.accuracy:.2f}%)" for name, r in shown)
                  + f"; epoch {progress.seconds - run.epoch_began:.2f} s, lr {_rate(run):.4g}, "
                  f"{progress.seconds:.2f} s so far")
    chosen = val if val is not None else test  # what best.pt and --patience follow
    if chosen.accuracy > (progress.best_accuracy or 0.0):
        progress.best_accuracy, progress.stale_tests = chosen.accuracy, 0
        _save(run, run.run_dir / "best.pt")
    else:
        progress.stale_tests += 1
    if run.on_test is not None:
        total = schedule_length(config, len(run.train_batches)).steps
        run.on_test(chosen.accuracy, progress.step, epoch, progress.step >= total)
    return test, val


def _evaluate(run: Run, batches) -> Evaluation:
    """Score the tested weights on `batches`; in a distributed run each rank scores its part
    of the images and the sums are added up, so every rank gets the same, whole result."""
    config, world = run.config, run.world
    if not world.distributed:
        return evaluate_model(run.tested_model, batches, channels_last=config.channels_last)
    distributed.same_buffers(run.tested_model, world)  # every rank tests rank 0's weights
    run.tested_model.eval()
    loss_sum, correct, total = test_sums(run.tested_model, batches,
                                         channels_last=config.channels_last)
    sums = distributed.all_sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(
        float(total), dtype=torch.float64, device=loss_sum.device)]), world)
    return to_evaluation(sums[0], sums[1], int(sums[2].item()))


def _train_measures(run: Run) -> tuple[float, float]:
    """This epoch's mean training loss and accuracy so far, over the batches of every rank."""
    progress, world = run.progress, run.world
    sums = distributed.all_sum(torch.stack([
        progress.epoch_loss_sum.float(), progress.epoch_correct_sum.float(),
        torch.tensor(float(progress.epoch_images), device=progress.epoch_loss_sum.device)]),
        world).tolist()
    # Each rank's loss is the mean over its equal share of a batch: their mean is the batch's.
    return sums[0] / max(progress.batch * world.size, 1), sums[1] / max(sums[2], 1)


# ---------------------------------------------------------------------------------------------
# Saving and finishing


def _save(run: Run, path: Path) -> None:
    # Never replace a good checkpoint with a diverged state: a save waits for the device
    # anyway, so checking the weights here costs nothing extra.
    _check_finite(run)
    # Each rank's random streams and running sums, so that every rank continues exactly; a
    # collective, so every rank saves at the same points, and rank 0 writes the file.
    ranks = distributed.gather({checkpoint.RNG: devices.rng_state(),
                                checkpoint.PROGRESS: run.progress.state_dict()}, run.world)
    if not run.world.main:
        return
    optimizer_state = run.optimizer.state_dict()
    for group in optimizer_state["param_groups"]:  # a rate on the device (--cuda-graph) is
        group["lr"] = float(group["lr"])  # saved as a number, so any device can resume it
    checkpoint.save(path, checkpoint.training_payload(
        config=run.config.to_dict(), model=run.model.state_dict(), optimizer=optimizer_state,
        scheduler=run.scheduler.state_dict() if run.scheduler is not None else None,
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        ema=run.ema.state_dict() if run.ema is not None else None,
        progress=ranks[0][checkpoint.PROGRESS], rng=ranks[0][checkpoint.RNG],
        val_index=run.val_index, dataset_spec=run.spec.to_dict(), metrics=run.log.history,
        world_size=run.world.size, ranks=ranks[1:], hardware=run.hardware))


def _check_finite(run: Run) -> None:
    finite = torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()
    if not (finite.item() and run.progress.epoch_loss_sum.isfinite().item()):
        raise TrainingError(
            f"training diverged: the loss or the weights became NaN or infinite by epoch "
            f"{run.progress.epoch}, batch {run.progress.batch}; the last checkpoint written, if "
            "any, holds the state before that, so try again with a lower --lr "
            "(--detect-anomaly finds the operation)")


def _finish(run: Run, result: Evaluation, val: Evaluation | None, saved_from: Path | None,
            setup_seconds: float, warmup_seconds: float) -> dict:
    """Write the final weights (--save-model) and return the run's summary."""
    config, progress = run.config, run.progress
    model_files = []
    if config.save_model:
        model_files = [run.run_dir / "model.pt", run.run_dir / "model.safetensors"]
        for path in model_files if run.world.main else []:  # rank 0 writes the run folder
            # The safetensors file carries what `torchmnist export` writes into one.
            checkpoint.save_weights(path, run.tested_model.state_dict(),
                                    metadata=exporting.contract(config.model, run.spec))
    best = run.run_dir / "best.pt"
    return {
        "test_accuracy": result.accuracy, "test_loss": result.loss,
        "best_accuracy": progress.best_accuracy,
        "val_accuracy": val.accuracy if val else None,
        "val_loss": val.loss if val else None,
        "epochs": progress.epoch - 1 + (progress.batch > 0),  # epochs begun
        "steps": progress.step, "train_seconds": round(progress.seconds, 3),
        "target_accuracy": config.target_accuracy,
        "target_seconds": (round(progress.target_seconds, 3)
                           if progress.target_seconds is not None else None),
        "setup_seconds": round(setup_seconds, 3), "warmup_seconds": round(warmup_seconds, 3),
        "run_dir": str(run.run_dir), "checkpoint": str(run.last_path),
        "best_checkpoint": str(best) if best.exists() else None,
        "model_file": str(model_files[0]) if model_files else None,
        "safetensors_file": str(model_files[1]) if model_files else None,
        "device": str(run.device), "dataset": config.dataset, "model": config.model,
        "recipe": config.recipe, "resumed_from": str(saved_from) if saved_from else None,
    }


@contextlib.contextmanager
def _explained_errors(run: Run):
    """Turn the two RuntimeErrors a user's flags can cause into one sentence each: anomaly
    detection (--detect-anomaly) naming the operation whose backward produced NaN (its forward
    trace is already on stderr), and --deterministic meeting an operation that has no
    deterministic kernel on this device (some CUDA backward passes)."""
    try:
        yield
    except RuntimeError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if run.config.detect_anomaly and "returned nan values" in first:
            raise TrainingError(f"training diverged at step {run.progress.step + 1}: "
                                f"{first.rstrip('.')}; "
                                "the last checkpoint written, if any, holds the state before "
                                "that") from None
        if run.config.deterministic and "deterministic implementation" in first:
            raise UsageError(f"--deterministic cannot be honoured on this device: "
                             f"{first.rstrip('.')}; drop --deterministic to train with it"
                             ) from None
        if run.world.distributed and distributed.is_connection_error(error):
            raise TrainingError(f"rank {run.world.rank} lost another process of this job "
                                f"(killed, or stopped by an error of its own): {first}; torchrun "
                                "--max-restarts N restarts the job from the last checkpoint"
                                ) from None
        raise


# ---------------------------------------------------------------------------------------------
# Setup: config (and the checkpoint, when resuming) -> device -> data -> model -> optimiser
# -> run folder


def from_flags(explicit: dict) -> tuple[TrainConfig, dict | None]:
    """The config of `torchmnist train` from the flags a user set (and a config file's), with
    the checkpoint a --resume names, read once. A resumed run keeps its saved settings; only
    flags given now may change them."""
    if not explicit.get("resume"):
        return resolve(explicit), None
    path = checkpoint.find_resume(explicit["resume"], explicit.get("run_dir"))
    resumed = checkpoint.load_training(path)
    saved_config = resumed[checkpoint.CONFIG]
    saved_model = str(saved_config.get("model", ""))
    if ":" in saved_model and explicit.get("model") != saved_model:
        raise UsageError(f"{path} was trained with your own model {saved_model}; pass "
                         f"--model {saved_model} to resume it (torchmnist imports no code "
                         "that a checkpoint names by itself)")
    return resolve({**explicit, "resume": str(path)}, saved=saved_config), resumed


def setup(config: TrainConfig, resumed: dict | None = None) -> tuple[Run, Path | None]:
    """Build the run: device, data, model, optimiser; restore a checkpoint when resuming
    (`resumed`: that checkpoint, already read). Everything that can refuse the run is checked
    before the run folder is touched."""
    data.refuse_in_a_starting_process()
    config = _absolute_dataset(config)
    devices.prepare_environment(cuda_launch_blocking=config.cuda_launch_blocking,
                                deterministic=config.deterministic, threads=config.threads)
    world = distributed.from_environment()
    device = devices.resolve_device(config.device)
    # --amp auto becomes what this device computes in; the saved config records that, so a
    # resume on another machine continues in the same precision.
    amp, precision = devices.precision(device, config.amp)
    config = _replace(config, amp=amp)
    _check_devices_and_world(config, device, world)
    saved, changes, resume_path = _read_resume(config, resumed, world)
    # Every check that needs no other process is done: now join them (torchrun).
    device = distributed.start(world, device)

    # Rank 0 draws what a single process draws; the others draw their own augmentation and
    # dropout (the model's first weights are rank 0's: DistributedDataParallel copies them).
    devices.seed_everything(distributed.rank_seed(config.seed, world))
    digits = _load_data(config, saved)
    val_index = None
    if config.val_size:
        val_index = saved.get(checkpoint.VAL_INDEX) if saved is not None else None
        digits, val_index = _hold_out(digits, config, val_index)
    train_batches, test_batches, val_batches = _make_batches(config, digits, device, world,
                                                             held_out=val_index is not None)
    model, notes = _build_model(config, digits, device, world, fresh=saved is None)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, len(train_batches))
    scaler = devices.grad_scaler(device, config.amp)
    # On the model's device, its step counter too: update_average reads it there.
    ema = (AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(config.ema),
                         use_buffers=True) if config.ema else None)
    progress = Progress(epoch_loss_sum=torch.zeros((), device=device),
                        epoch_correct_sum=torch.zeros((), device=device),
                        window_loss_sum=torch.zeros((), device=device))
    if saved is not None:
        # A resumed run goes on in the folder that holds its checkpoint, wherever that folder
        # has been moved or copied to, unless --run-dir names another.
        run_dir = Path(config.run_dir) if config.run_dir else resume_path.parent
        if (run_dir / "last.pt").exists() and not _same_place(run_dir, resume_path.parent):
            raise UsageError(f"{run_dir} holds a run of its own ({run_dir / 'last.pt'}), which "
                             f"continuing {resume_path} there would replace; choose a new or "
                             "empty --run-dir, or resume that run itself")
        checkpoint.restore(saved, resume_path, model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, ema=ema)
        progress.load_state_dict(saved[checkpoint.PROGRESS])
        if world.rank:
            _restore_rank(saved, world, progress, config.seed)
        if progress.batch > len(train_batches):
            raise UsageError(f"{resume_path} is a damaged checkpoint: it is at batch "
                             f"{progress.batch} of an epoch of {len(train_batches)} batches")
        total = schedule_length(config, len(train_batches)).steps
        if progress.step > total:
            raise UsageError(f"{resume_path} has already trained {progress.step} steps, and "
                             f"--epochs {config.epochs} ends at step {total}; pass more epochs "
                             "to go on, or start a new run")
    else:
        # Named by rank 0 (a name from the clock could differ between processes).
        run_dir = distributed.broadcast(
            Path(config.run_dir) if config.run_dir else _new_run_dir(config), world)
        if (run_dir / "last.pt").exists():
            raise UsageError(f"{run_dir} already holds a run's checkpoint; pass --resume to "
                             "continue it, or choose another --run-dir")
    # Everything above only read; from here on the run folder is written, by rank 0 alone.
    config, lock, log = _open_run_dir(config, run_dir, world, saved)
    # What the step calls: on several processes the model inside DistributedDataParallel.
    forward = distributed.wrap(model, world, device)
    run = Run(config, device, run_dir, model, torch.compile(forward) if config.compile else forward,
              optimizer, scheduler, scaler, ema, train_batches, test_batches, val_batches,
              val_index, digits.spec, progress=progress, log=log, lock=lock, world=world,
              hardware=f"{devices.describe(device)}; {precision}")
    crowded = devices.crowding_note(device, config.threads)
    _announce(run, digits, [precision, *notes, *([crowded] if crowded else [])])
    if saved is not None:
        log.print(f"resuming from {resume_path} at epoch {progress.epoch}, batch "
                  f"{progress.batch} (step {progress.step})")
        last = run_dir / "last.pt"
        if last.exists() and not _same_place(last, resume_path):
            # Going back to an earlier checkpoint (best.pt, epoch-002.pt) is allowed: say what
            # it costs, since nothing else would.
            log.print(f"  resume: {last} and metrics.jsonl go on from this checkpoint; what "
                      "they held after it is replaced")
        for change in changes:
            log.print(f"  resume: {change}")
    return run, resume_path


def _absolute_dataset(config: TrainConfig) -> TrainConfig:
    """--dataset folder:PATH with PATH absolute, so that a resume, test or export finds it
    from anywhere."""
    if not config.dataset.startswith(data.FOLDER_PREFIX):
        return config
    folder = Path(config.dataset[len(data.FOLDER_PREFIX):]).expanduser().resolve()
    return _replace(config, dataset=f"{data.FOLDER_PREFIX}{folder}")


def _check_devices_and_world(config: TrainConfig, device: torch.device,
                             world: distributed.World) -> None:
    """Refuse flags that this device or this number of processes cannot honour."""
    devices.autocast(device, config.amp)  # refuses fp16 off CUDA before any work is done
    if config.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm synchronises GPUs only "
                         "(on the CPU each process's BatchNorm sees its own share of a batch)")
    if config.batch_size % world.size:
        raise UsageError(f"--batch-size {config.batch_size} does not divide among {world.size} "
                         f"processes: it is the whole job's batch, of which each process takes "
                         f"an equal share; choose a multiple of {world.size}")


def _read_resume(config: TrainConfig, resumed: dict | None, world: distributed.World,
                 ) -> tuple[dict | None, list[str], Path | None]:
    """With --resume: the checkpoint, what this run's settings change of it, and its path."""
    if not config.resume:
        return None, [], None
    resume_path = checkpoint.find_resume(config.resume, config.run_dir)
    saved = resumed if resumed is not None else checkpoint.load_training(resume_path)
    changes = checkpoint.check_compatible(saved[checkpoint.CONFIG], config)
    saved_world = saved.get(checkpoint.WORLD_SIZE, 1)
    if saved_world != world.size and not config.allow_new_world_size:
        raise UsageError(f"{resume_path} was trained by {saved_world} process(es) and this "
                         f"run has {world.size}: the batches would be shared out differently, "
                         "so it would not continue the same run; pass --allow-new-world-size "
                         "to go on all the same")
    return saved, changes, resume_path


def _load_data(config: TrainConfig, saved: dict | None) -> data.DigitData:
    """The run's data: a built-in dataset's files, your image folder, or the OwnData given
    to the config; for a dry run, synthetic images (built-in datasets) or a small sample of
    yours. Resuming on data other than the checkpoint's is refused."""
    own = config.__dict__.get("own_data")
    if config.dry_run and data.is_builtin(config.dataset):
        return data.synthetic(config.dataset, seed=config.seed)
    if own is not None:
        digits = data.from_own(own, config.dataset)
    else:
        digits = data.load(config.dataset, config.data_dir, download=config.download)
    stored = (saved or {}).get(checkpoint.DATASET_SPEC) or {}
    if stored.get("fingerprint") and stored["fingerprint"] != digits.spec.fingerprint:
        raise UsageError(f"cannot resume: the images or labels of {config.dataset} differ from "
                         "the ones this run was trained on (their checksums differ)")
    return data.subset(digits, config.seed) if config.dry_run else digits


def _hold_out(digits: data.DigitData, config: TrainConfig, saved_index: torch.Tensor | None,
              ) -> tuple[data.DigitData, torch.Tensor]:
    """Split --val-size images off the training set: a permutation of its own (epoch 0 of the
    seed's orders, which training never uses), or the split a checkpoint recorded."""
    n = len(digits.train)
    if config.val_size >= n:
        raise UsageError(f"--val-size {config.val_size} leaves nothing to train on: the "
                         f"training set has {n} images")
    if saved_index is None:
        index = data.epoch_order(n, config.seed, 0)[:config.val_size].sort().values
    elif not (isinstance(saved_index, torch.Tensor) and saved_index.dim() == 1
              and saved_index.dtype == torch.int64 and len(saved_index) == config.val_size
              and bool(((saved_index >= 0) & (saved_index < n)).all())
              and len(saved_index.unique()) == len(saved_index)):
        raise UsageError(f"the checkpoint's validation split is damaged: it is not "
                         f"{config.val_size} different training images of the {n}")
    else:
        index = saved_index
    keep = torch.ones(n, dtype=torch.bool)
    keep[index] = False
    images, labels = digits.train.images, digits.train.labels
    held = dataclasses.replace(digits, train=data.Split(images[keep], labels[keep]),
                               val=data.Split(images[index], labels[index]))
    return held, index


def _make_batches(config: TrainConfig, digits: data.DigitData, device: torch.device,
                  world: distributed.World, held_out: bool):
    """The training, test and (--val-size) validation batches. With several processes each
    trains on its share of every batch and tests on its part of the test images
    (distributed.py)."""
    pin_memory = config.pin_memory if config.pin_memory is not None else device.type == "cuda"
    loader_options = dict(num_workers=config.num_workers, pin_memory=pin_memory)
    train_batches = data.make_batches(config.loader, digits.train, digits.spec, config.batch_size,
                                      device, shuffle=True, seed=config.seed, rank=world.rank,
                                      ranks=world.size, **loader_options)
    test_batches = data.make_batches(config.loader, digits.test.shard(world.rank, world.size),
                                     digits.spec, config.test_batch_size, device, shuffle=False,
                                     **loader_options)
    val_batches = (data.TensorBatches(digits.val.shard(world.rank, world.size), digits.spec,
                                      config.test_batch_size, device, shuffle=False)
                   if held_out else None)
    return train_batches, test_batches, val_batches


def _build_model(config: TrainConfig, digits: data.DigitData, device: torch.device,
                 world: distributed.World, fresh: bool) -> tuple[nn.Module, list[str]]:
    """The network on its device, with --init-from's weights (a fresh run only: a resumed one
    has its own), --sync-bn, --freeze and --channels-last applied; and what to tell of it."""
    network = config.__dict__.get("network")  # TrainConfig(model=MyNet()): that very one
    classes = len(digits.spec.classes)
    model = (network if network is not None else models.build(config.model, classes)).to(device)
    if hasattr(model, "exit_threshold"):  # --model early-exit
        model.exit_threshold = config.exit_threshold
    if models.is_import_path(config.model):
        # Two training images, normalised as the loaders do it: taken from a loader, they
        # would start its worker processes before the run could close them.
        sample = digits.train.images[:2].to(device)  # (2, 28, 28) uint8
        models.check_output(model, data.normalize(sample, digits.spec.mean, digits.spec.std),
                            classes)
    notes = []
    if config.init_from and fresh:
        notes.append(_load_initial_weights(model, config.init_from))
    if config.sync_bn:
        model = distributed.convert_batchnorm(model, world)
    _freeze(model, config)  # before the optimiser takes the parameters it trains
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, notes


def _load_initial_weights(model: nn.Module, source: str) -> str:
    """--init-from: copy another run's weights in (fine-tuning); return the line to log."""
    path = checkpoint.file_in(source)
    state, _ = checkpoint.weights(checkpoint.load(path), path)
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if extra or missing:
        name = (extra or missing)[0]
        raise UsageError(f"--init-from {path} does not fit this model: {name} is "
                         f"{'only there' if extra else 'missing there'}")
    # The final layer is the one whose size is the number of classes.
    final = next(reversed([n for n, _ in model.named_parameters()])).rsplit(".", 1)[0]
    fresh = []
    for key, value in own.items():
        if state[key].shape != value.shape:
            if key.rsplit(".", 1)[0] != final:
                raise UsageError(f"--init-from {path} does not fit this model: {key} is "
                                 f"{tuple(state[key].shape)} there, {tuple(value.shape)} here")
            fresh.append(key)
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    kept = f", except {final} (another number of classes), which starts afresh" if fresh else ""
    return f"initial weights from {path}{kept}"


def _freeze(model: nn.Module, config: TrainConfig) -> None:
    """--freeze: parameters under these name prefixes get no gradient, so the optimiser never
    sees them (the guide's requires_grad=False aside)."""
    names = [name for name, _ in model.named_parameters()]
    prefixes = frozen_prefixes(config)
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise UsageError(f"--freeze {prefix} names no parameter of the {config.model} model "
                             f"(its parameters: {', '.join(names)})")
    for name, parameter in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            parameter.requires_grad_(False)
    if prefixes and not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--freeze {config.freeze} leaves no parameter to train")


def build_optimizer(config: TrainConfig, model: nn.Module) -> optim.Optimizer:
    # Only what trains (--freeze leaves some out); already on its device, as the guide says.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = config.weight_decay
    on_cuda = params[0].device.type == "cuda"
    # On CUDA one fused kernel updates every parameter; elsewhere torch picks its default.
    fused = {"fused": True} if on_cuda else {}
    # Optimisers that count steps keep the count on the device when a CUDA graph replays them.
    capturable = {"capturable": True} if on_cuda and config.cuda_graph else {}
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum,
                         nesterov=config.nesterov and config.momentum > 0, weight_decay=decay,
                         **fused)
    if config.optimizer == "adadelta":
        return optim.Adadelta(params, lr=config.lr, weight_decay=decay, **capturable)
    if config.optimizer == "adam":
        return optim.Adam(params, lr=config.lr, weight_decay=decay, **fused, **capturable)
    return optim.AdamW(params, lr=config.lr, weight_decay=decay, **fused, **capturable)


def build_scheduler(config: TrainConfig, optimizer: optim.Optimizer, steps_per_epoch: int):
    """`step` is stepped once an epoch; `onecycle` once a step (see `_train_epoch`)."""
    if config.scheduler == "step":
        return optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    if config.scheduler == "onecycle":
        return optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr,
            total_steps=schedule_length(config, steps_per_epoch).steps,
            pct_start=config.warmup, anneal_strategy="linear", div_factor=10,
            final_div_factor=100, cycle_momentum=False)
    return None


def _open_run_dir(config: TrainConfig, run_dir: Path, world: distributed.World,
                  saved: dict | None) -> tuple[TrainConfig, rundir.RunLock, RunLog]:
    """Claim and lock the run folder (rank 0), write the config as it will be saved, and
    open the log. The lock is held for the whole run; the caller releases it."""
    lock = rundir.claim(run_dir) if world.main else rundir.RunLock(run_dir)  # (not acquired)
    try:
        if world.main:
            rundir.remove_stale_temporaries(run_dir)
        # The data folder as an absolute path, so that test, export and report find it from
        # any working directory.
        config = _replace(config, run_dir=str(run_dir), data_dir=(
            str(Path(config.data_dir).expanduser().resolve()) if config.data_dir else None))
        if world.main:
            rundir.write_text_atomically(
                run_dir / "config.json",
                json.dumps(config.to_dict(), indent=2, allow_nan=False) + "\n")
        log = RunLog(run_dir, history=saved[checkpoint.METRICS] if saved else None,
                     quiet=config.quiet or not world.main, to_stderr=config.json,
                     write=world.main)
    except BaseException:
        lock.release()
        raise
    return config, lock, log


def _new_run_dir(config: TrainConfig) -> Path:
    dataset = ("synthetic" if config.dry_run and data.is_builtin(config.dataset)
               else data.short_name(config.dataset))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs") / f"{stamp}-{dataset}-{config.model}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path("runs") / f"{stamp}-{dataset}-{config.model}-{suffix}"
    return run_dir


def _same_place(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder, however each is spelled."""
    try:
        return a.samefile(b)
    except OSError:
        return False


def _announce(run: Run, digits: data.DigitData, notes: list[str]) -> None:
    """The run's first lines: what trains on what, where, with which settings."""
    config, log = run.config, run.log
    dry = data.dry_run_words(config.dataset) if config.dry_run else ""
    log.print(f"torchmnist: {config.recipe} recipe, {config.model} model on {digits.spec.name}"
              f"{dry}, device {run.device} "
              f"({devices.describe(run.device)}), torch {torch.__version__}")
    held = f" / {len(digits.val)} validation" if run.val_batches is not None else ""
    log.print(f"data: {len(digits.train)} train{held} / {len(digits.test)} test images from "
              f"{digits.source}; {config.loader} loader")
    parameters = sum(p.numel() for p in run.model.parameters())
    changed = differences(config)
    log.print(f"model: {parameters:,} parameters; settings: the {config.recipe} recipe's" + (
        ", except " + ", ".join(f"{k} {json.dumps(v)}" for k, v in changed.items())
        if changed else "") + f" (all in {run.run_dir / 'config.json'})")
    if run.world.distributed:
        log.print(f"distributed: {run.world.size} processes ({distributed.backend()}), each "
                  f"trains on {config.batch_size // run.world.size} of every batch of "
                  f"{config.batch_size}" + (", BatchNorm synchronised" if config.sync_bn else ""))
    for note in notes + [f"note: {idle}" for idle in idle_settings(config)]:
        log.print(note)


def _restore_rank(saved: dict, world: distributed.World, progress: Progress,
                  seed: int) -> None:
    """Ranks 1.. of a distributed run take their own random streams and running sums from the
    checkpoint. Under --allow-new-world-size a rank the checkpoint has no state for starts its
    streams afresh and its sums at zero (rank 0's hold rank 0's own batches only)."""
    ranks = saved.get(checkpoint.RANKS) or []
    if world.rank <= len(ranks):
        own = ranks[world.rank - 1]
        progress.load_state_dict(own[checkpoint.PROGRESS])
        devices.set_rng_state(own[checkpoint.RNG])
        return
    devices.seed_everything(distributed.rank_seed(seed, world, progress.step))
    for total in (progress.epoch_loss_sum, progress.epoch_correct_sum, progress.window_loss_sum):
        total.zero_()
    progress.epoch_images = 0


def _start_tensorboard(run: Run) -> None:
    run.log.start_tensorboard(run.progress.step)
    x, _ = next(iter(run.test_batches.batches()))  # the test set's first images, unshuffled
    spec = run.spec
    run.log.images("test images", (x[:64].float().cpu() * spec.std + spec.mean).clamp(0, 1),
                   run.progress.step)


def warm_up(run: Run) -> float:
    """Compile (or, on an accelerator, load the kernels of) the training and test graphs on
    real batches, then put back every state they touched: warm-up time stays out of the
    training time and the run's results do not change. With --cuda-graph on CUDA, capture the
    step and the test pass instead (graphs.py), which rehearses them the same way."""
    if not (run.config.compile or run.config.cuda_graph or run.device.type != "cpu"):
        return 0.0
    start = time.perf_counter()
    # Every batch shape the run will see: a full and a last, partial training batch, and test
    # batches; a new shape would otherwise recompile inside the timed loop.
    train_starts = {0, len(run.train_batches) - 1}
    examples = [next(iter(run.train_batches.batches(1, start))) for start in train_starts]
    if run.config.cuda_graph:
        run.log.print(graphs.install(run, train_step, examples))
        if run.graphed_step is not None:
            devices.synchronize(run.device)
            return time.perf_counter() - start
    if not (run.config.compile or run.device.type != "cpu"):
        return 0.0
    model_state = {k: v.clone() for k, v in run.model.state_dict().items()}
    rng = devices.rng_state()
    shapes = [(True, batch) for batch in examples]
    shapes += [(False, next(iter(run.test_batches.batches(1, start))))
               for start in {0, len(run.test_batches) - 1}]
    for training, (x, y) in shapes:
        run.model.train(training)
        with torch.set_grad_enabled(training), devices.autocast(run.device, run.config.amp):
            loss = F.nll_loss(run.forward(_layout(run, x)).float(), y)
        if training:
            loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    run.model.load_state_dict(model_state)  # BatchNorm's running statistics moved
    devices.set_rng_state(rng)
    devices.synchronize(run.device)
    return time.perf_counter() - start


def _replace(config: TrainConfig, **changes) -> TrainConfig:
    """dataclasses.replace that keeps what the config was given from Python (your own model
    instance and data), which a copy would otherwise lose."""
    new = dataclasses.replace(config, **changes)
    for key in ("network", "own_data"):
        if key in config.__dict__:
            new.__dict__[key] = config.__dict__[key]
    return new
