"""Training, as the guide lays it out: train -> epochs -> epoch -> train_step -> test -> save.

`setup.build` makes everything from the config; the loop over epochs and the loop over batches
follow, each in one screen, and `train_step` is the guide's zero_grad -> forward -> loss ->
backward -> step. Logging, checkpoints, signals, early stopping, CUDA graphs and DDP enter as
small named calls. Read top-down; the helpers follow the loop that calls them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from torchmnist import setup
from torchmnist.config import TrainConfig, eval_interval
from torchmnist.data.augment import augment
from torchmnist.data.datasets import OwnData
from torchmnist.errors import TrainingError, UsageError
from torchmnist.evaluation import Evaluation, evaluate_model, test_sums, to_evaluation
from torchmnist.runtime import devices, distributed, graphs
from torchmnist.runtime.signals import Stopped, StopSignals
from torchmnist.setup import Run
from torchmnist.storage import checkpoint

Tested = tuple[Evaluation | None, Evaluation | None]  # (test, validation) results of one test


class TrainResult(dict):
    """What `train` returns: the run's summary (the CLI's --json), as a dict, and `model`, the
    trained network (the weight average, with --ema) in eval mode on the training device."""

    def __init__(self, summary: dict, model: nn.Module):
        super().__init__(summary)
        self.model = model

    @property
    def summary(self) -> dict:
        return dict(self)


# ---- train: setup -> the epochs -> the summary ---------------------------------------------------


def train(config: TrainConfig, *, model: nn.Module | None = None, data: OwnData | None = None,
          resumed: dict | None = None,
          on_test: Callable[[float, int, int, bool], None] | None = None) -> TrainResult:
    """Train and test as `config` says; return the summary and the trained model. `model`:
    your own network (that very one is trained); `data`: your own images (torchmnist.OwnData);
    `resumed`: the checkpoint `config.resume` names, already read. `on_test(accuracy, step,
    epoch, last)` is called after each test; an exception it raises ends the run there."""
    if not isinstance(config, TrainConfig):
        raise UsageError(f"train takes a TrainConfig, not a {type(config).__name__}; "
                         "TrainConfig(**settings) makes one from a dict of settings")
    started = time.perf_counter()
    run = setup.build(config, model=model, data=data, resumed=resumed)
    run.on_test, config, progress = on_test, run.config, run.progress
    with run, _explained_errors(run):  # however training ends, the run is closed
        # Compilation, CUDA graphs and kernel loading, kept out of the training time.
        warmup_seconds = warm_up(run)
        setup_seconds = time.perf_counter() - started - warmup_seconds
        if config.tensorboard:
            _start_tensorboard(run)
        # The guide's loop over epochs: train, test, save; stop early at --target-accuracy,
        # for --patience, or on SIGINT/SIGTERM (saving first).
        tested: Tested = (None, None)
        with StopSignals() as stop, torch.autograd.set_detect_anomaly(config.detect_anomaly):
            for epoch in range(progress.epoch, run.epochs + 1):
                if progress.step >= run.total_steps:
                    break  # a finished run, resumed: nothing left to train
                hit = train_epoch(run, epoch, stop)  # a test within it that reached the target
                tested = hit or (test(run, epoch) if _tests_after(run, epoch) else (None, None))
                reached = _reached(run, tested)
                _end_epoch(run, epoch, tested)
                if _stopping_early(run, reached):
                    break
                if _signalled(run, stop) and epoch < run.epochs:
                    _stop(run, stop)  # between epochs
        # A finished run resumed, or one that chose on validation: the test set is scored now.
        result = tested[0] or _evaluate(run, run.test_batches)
        summary = _finish(run, result, tested[1], setup_seconds, warmup_seconds)
        run.log.print(f"done: test accuracy {100 * result.accuracy:.2f}%, "
                      f"{progress.seconds:.2f} s training; checkpoint {run.last_path}")
        return TrainResult(summary, run.tested_model.eval())


def train_epoch(run: Run, epoch: int, stop: StopSignals) -> Tested | None:
    """The guide's loop over the batches of one epoch, from `progress.batch` on. With
    --eval-interval Ns it tests as it goes, returning a test that reached --target-accuracy."""
    config, progress = run.config, run.progress
    run.epoch_began = progress.seconds
    run.model.train()  # dropout on, BatchNorm uses batch statistics
    total = run.epoch_steps(epoch)
    run.log.start_bar(total, progress.batch, desc=f"epoch {epoch}/{run.epochs}")
    step = run.graphed_step or functools.partial(train_step, run)  # --cuda-graph: replayed
    test_every = run.test_every  # --eval-interval Ns, parsed once, not at every step
    mark, hit = time.perf_counter(), None  # progress.seconds counts the time to mark
    batches = run.train_batches.batches(epoch, start=progress.batch)
    for x, y in itertools.islice(batches, total - progress.batch):  # x: (B, 1, 28, 28)
        loss, correct = step(x, y)
        _next_rate(run)
        progress.count(loss, correct, len(y))
        run.log.advance_bar()
        last = progress.batch == total
        logging = progress.batch % config.log_interval == 0 or last
        if logging:
            mark = _log_window(run, epoch, total, mark)  # the one wait for the device
        if test_every and progress.step % test_every == 0 and not last:
            progress.seconds += time.perf_counter() - mark
            tested = test(run, epoch)  # adds its own time
            mark = time.perf_counter()
            run.model.train()
            if _reached(run, tested):
                hit = tested
                break
        if config.save_interval and progress.batch % config.save_interval == 0 and not last:
            _save(run, run.last_path)  # the end of the epoch is saved after testing
        if _signalled(run, stop, now=logging):
            break
    progress.seconds += time.perf_counter() - mark
    run.log.close_bar()
    if stop.signum and progress.batch < total and hit is None:
        _stop(run, stop)  # mid-epoch; at its end the caller tests and saves first
    return hit


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step as the guide teaches it: zero_grad, forward, loss, backward, step (plus the
    recipe's augmentation, precision and average). Returns the loss and the count right as
    tensors: nothing here waits for the device, so --cuda-graph captures this very function."""
    config, optimizer = run.config, run.optimizer
    x = _layout(run, augment(x, config.augment, run.background))
    optimizer.zero_grad(set_to_none=True)
    with devices.autocast(run.device, config.amp):
        output = run.forward(x).float()  # (B, classes) log-probabilities
    if config.label_smoothing:
        # log_softmax of log-probabilities changes nothing, so on the model's output this is
        # nll_loss with smoothing, not a softmax taken twice.
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
    """`average.update_parameters(model)` for an EMA without its host-side test of
    `n_averaged`, a wait a CUDA graph cannot hold: the first update copies, later ones move
    `1 - decay` of the way."""
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


# ---- What the loops call -------------------------------------------------------------------------


def _next_rate(run: Run) -> None:
    """One-cycle sets the next step's rate; after the last step there is none (the line would
    run on below zero)."""
    scheduler = run.scheduler
    if run.config.scheduler == "onecycle" and scheduler.last_epoch + 1 < scheduler.total_steps:
        scheduler.step()


def _tests_after(run: Run, epoch: int) -> bool:
    """Whether the epoch ends with a test: always with --eval-interval Ns or after the last
    epoch, else every N epochs."""
    interval = eval_interval(run.config)
    return interval.unit == "steps" or epoch % interval.every == 0 or epoch == run.epochs


def _layout(run: Run, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if run.config.channels_last else x


def _rate(run: Run) -> float:
    """The current learning rate, as a number (with --cuda-graph it lives on the device)."""
    return float(run.optimizer.param_groups[0]["lr"])


def _log_window(run: Run, epoch: int, total: int, mark: float) -> float:
    """The mean loss since the last log line (the one wait for the device) as a metric and a
    line; returns the new time mark."""
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
    """Whether a SIGINT/SIGTERM asks the run to stop. Distributed ranks must stop after the
    same step, so they agree (a tiny all-reduce) where they wait anyway: at log lines (`now`)
    and between epochs."""
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


def _reached(run: Run, tested: Tested) -> bool:
    """Whether a test reached --target-accuracy; the first time, when is noted."""
    target, result = run.config.target_accuracy, tested[0]
    if target is None or result is None or result.accuracy < target:
        return False
    if run.progress.target_seconds is None:
        run.progress.target_seconds = run.progress.seconds
    return True


def _stopping_early(run: Run, reached: bool) -> bool:
    """Whether --target-accuracy or --patience ends the run early; says which."""
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


def _end_epoch(run: Run, epoch: int, tested: Tested) -> None:
    """Log the epoch, step a per-epoch schedule, save. An epoch cut short stays open in the
    checkpoint, so a longer run resumed from it trains the rest of it, as a fresh run would."""
    config, progress = run.config, run.progress
    complete = progress.batch == len(run.train_batches)
    lr = _rate(run)  # the rate this epoch ended with
    if complete and config.scheduler == "step":
        run.scheduler.step()
    test, val = tested
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


# ---- Testing -------------------------------------------------------------------------------------


def test(run: Run, epoch: int) -> Tested:
    """Validate (--val-size) and test, log, keep best.pt, count --patience; return (test,
    validation). With validation the test set is scored only for --target-accuracy. The time
    counts as training time (it is how a target is seen)."""
    progress, config = run.progress, run.config
    start = time.perf_counter()
    val = scored = None
    # In fp32 whatever --amp trains in: one evaluation, the one `test`, report and the
    # exported files compute, so they agree to the image.
    if run.val_batches is not None:
        val = _evaluate(run, run.val_batches)
    if run.val_batches is None or config.target_accuracy is not None:
        scored = (run.graphed_test() if run.graphed_test is not None
                  else _evaluate(run, run.test_batches))
    progress.seconds += time.perf_counter() - start
    # The line that stays, as Keras keeps one per epoch. Training loss and accuracy are over
    # this epoch's batches as trained (augmented, dropout on, scored before their update).
    shown = [(name, r) for name, r in (("validation", val), ("test", scored)) if r is not None]
    train_loss, train_accuracy = _train_measures(run)
    run.log.print(f"epoch {epoch}/{run.epochs} step {progress.step}: train loss "
                  f"{train_loss:.4f}, accuracy {100 * train_accuracy:.2f}%; "
                  + "; ".join(
                      f"{name} loss {r.loss:.4f}, accuracy {r.correct}/{r.total} "
                      f"({100 * r.accuracy:.2f}%)" for name, r in shown)
                  + f"; epoch {progress.seconds - run.epoch_began:.2f} s, lr {_rate(run):.4g}, "
                  f"{progress.seconds:.2f} s so far")
    chosen = val if val is not None else scored  # what best.pt and --patience follow
    if chosen.accuracy > (progress.best_accuracy or 0.0):
        progress.best_accuracy, progress.stale_tests = chosen.accuracy, 0
        _save(run, run.run_dir / "best.pt")
    else:
        progress.stale_tests += 1
    if run.on_test is not None:
        run.on_test(chosen.accuracy, progress.step, epoch, progress.step >= run.total_steps)
    return scored, val


def _evaluate(run: Run, batches) -> Evaluation:
    """Score the tested weights on `batches`; distributed, each rank its part, sums added up."""
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


# ---- Saving and finishing ------------------------------------------------------------------------


def _save(run: Run, path: Path) -> None:
    _check_finite(run)  # never a diverged state over a good one (the save waits anyway)
    # Each rank's streams and sums, so every rank continues exactly (rank 0 writes the file).
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


def _finish(run: Run, result: Evaluation, val: Evaluation | None, setup_seconds: float,
            warmup_seconds: float) -> dict:
    """Write the final weights (--save-model) and return the run's summary."""
    config, progress = run.config, run.progress
    model_files = []
    if config.save_model:
        model_files = [run.run_dir / "model.pt", run.run_dir / "model.safetensors"]
        for path in model_files if run.world.main else []:  # rank 0 writes the run folder
            # The safetensors file carries what `torchmnist export` writes into one.
            checkpoint.save_weights(path, run.tested_model.state_dict(),
                                    metadata=checkpoint.contract(config.model, run.spec))
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
        "recipe": config.recipe,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
    }


@contextlib.contextmanager
def _explained_errors(run: Run):
    """One sentence for the RuntimeErrors flags can cause: --detect-anomaly naming the backward
    that produced NaN, --deterministic meeting an operation with no deterministic kernel, and a
    lost rank."""
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


# ---- Before the first step -----------------------------------------------------------------------


def _start_tensorboard(run: Run) -> None:
    run.log.start_tensorboard(run.progress.step)
    x, _ = next(iter(run.test_batches.batches()))  # the test set's first images, unshuffled
    spec = run.spec
    run.log.images("test images", (x[:64].float().cpu() * spec.std + spec.mean).clamp(0, 1),
                   run.progress.step)


def warm_up(run: Run) -> float:
    """Compile (or load an accelerator's kernels for) the training and test passes on real
    batches, then put back every state they touched, so results do not change. With
    --cuda-graph on CUDA, capture them instead (graphs.py)."""
    if not (run.config.compile or run.config.cuda_graph or run.device.type != "cpu"):
        return 0.0
    start = time.perf_counter()
    # Every batch shape the run will see; a new one would recompile inside the timed loop.
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
