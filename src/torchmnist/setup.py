"""Setup: a config (and, when resuming, its checkpoint, read once) -> a `Run`, as a straight
pipeline: the config settled -> device and processes -> data -> model -> optimiser -> the saved
state restored -> the run folder. Everything that can refuse a run is checked before that folder
is touched; `training.py` then only trains what it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn, optim
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchmnist import models
from torchmnist.config import (
    OWN_PREFIX,
    TrainConfig,
    differences,
    eval_interval,
    frozen_prefixes,
    idle_settings,
    read_config_file,
    resolve,
    schedule_length,
)
from torchmnist.data import datasets, loaders, own
from torchmnist.errors import UsageError
from torchmnist.runtime import devices, distributed
from torchmnist.runtime.graphs import GraphedStep, GraphedTest
from torchmnist.runtime.runlog import RunLog
from torchmnist.storage import checkpoint, rundir

# ---- What a run holds ----------------------------------------------------------------------------


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
        """Add one trained batch, on the device: no .item(), which would wait for it."""
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
        """Take a saved state, the sums staying on this device; unknown keys are ignored, and
        missing ones keep their defaults."""
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
    train_batches: loaders.TensorBatches | loaders.LoaderBatches
    test_batches: loaders.TensorBatches | loaders.LoaderBatches
    val_batches: loaders.TensorBatches | None  # --val-size: held out from the training set
    val_index: torch.Tensor | None  # which training images those are (saved in checkpoints)
    spec: datasets.DatasetSpec  # the data's normalisation and classes (saved in checkpoints)
    progress: Progress
    log: RunLog
    lock: rundir.RunLock  # held for the whole run
    # With --cuda-graph on CUDA: train_step and the test pass replayed from CUDA graphs.
    graphed_step: GraphedStep | None = None
    graphed_test: GraphedTest | None = None
    epoch_began: float = 0.0  # progress.seconds when this epoch (or its resumed part) began
    # This process's place among the processes torchrun started (one, without torchrun).
    world: distributed.World = field(default_factory=distributed.World)
    hardware: str = ""  # the hardware and precision, as the first lines say them (saved)
    # Called after each test with (accuracy followed, step, epoch, whether it is the run's last
    # test); it may raise to end the run there (a sweep's pruner does).
    on_test: Callable[[float, int, int, bool], None] | None = None
    resumed_from: Path | None = None  # the checkpoint a resumed run went on from

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def epochs(self) -> int:  # epochs begun; the last may be cut short by --epochs 0.6
        return schedule_length(self.config, len(self.train_batches)).epochs

    @property
    def total_steps(self) -> int:
        return schedule_length(self.config, len(self.train_batches)).steps

    @property
    def test_every(self) -> int:  # steps between tests with --eval-interval Ns, else 0
        interval = eval_interval(self.config)
        return interval.every if interval.unit == "steps" else 0

    def epoch_steps(self, epoch: int) -> int:
        """Batches trained in `epoch`: all of them, except in a fractional last epoch."""
        per_epoch = len(self.train_batches)
        total = schedule_length(self.config, per_epoch).steps
        return min(per_epoch, total - (epoch - 1) * per_epoch)

    @property
    def background(self) -> float:  # an empty pixel, normalised: augmentation fills it in
        return self.spec.normalized_background

    @property
    def tested_model(self) -> nn.Module:  # what is tested and shipped: the --ema average, if on
        return self.ema.module if self.ema is not None else self.model

    def close(self) -> None:
        """Let go of the graphs, loader workers, log files, the folder's lock and the process
        group (after the DDP wrapper: distributed.finish), however the run ended. Each step is
        taken even if one before it fails (a full disk can make closing the log raise)."""
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


# ---- The pipeline --------------------------------------------------------------------------------


def from_flags(explicit: dict[str, Any]) -> tuple[TrainConfig, dict | None]:
    """`torchmnist train`'s config from the flags typed (over a --config file's), and the
    checkpoint --resume names, read once: a resumed run keeps its settings but for those flags."""
    if "config" in explicit:
        explicit = {**read_config_file(explicit.pop("config")), **explicit}
    run_dir = explicit.get("run_dir")
    if (not explicit.get("resume") and distributed.restart_count() and run_dir
            and (Path(run_dir) / "last.pt").exists()):
        # torchrun --max-restarts started this job again after a process died: the same
        # command then continues from the checkpoint the run had written.
        explicit["resume"] = run_dir
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


def build(config: TrainConfig, *, model: nn.Module | None = None,
          data: datasets.OwnData | None = None, resumed: dict | None = None) -> Run:
    """Build the run (`model`, `data`, `resumed`: as `training.train` takes them)."""
    loaders.refuse_in_a_starting_process()
    devices.prepare_environment(cuda_launch_blocking=config.cuda_launch_blocking,
                                deterministic=config.deterministic, threads=config.threads)
    world = distributed.from_environment()
    device = devices.resolve_device(config.device)
    amp, precision = devices.precision(device, config.amp)
    config = _settled(config, amp, model, data)
    _check_devices_and_world(config, device, world)
    saved, changes, resume_path = _read_resume(config, resumed, world)
    # Every check that needs no other process is done: now join them (torchrun).
    device = distributed.start(world, device)
    run_dir = _choose_run_dir(config, resume_path, world)
    config = dataclasses.replace(config, run_dir=str(run_dir))

    # Rank 0 draws what a single process draws; the others draw their own augmentation and
    # dropout (the model's first weights are rank 0's: DistributedDataParallel copies them).
    devices.seed_everything(distributed.rank_seed(config.seed, world))
    digits = _load_data(config, data, saved)
    val_index = None
    if config.val_size:
        val_index = saved.get(checkpoint.VAL_INDEX) if saved is not None else None
        digits, val_index = _hold_out(digits, config, val_index)
    train_batches, test_batches, val_batches = _make_batches(config, digits, device, world,
                                                             held_out=val_index is not None)
    model, notes = _build_model(config, model, digits, device, world, fresh=saved is None)
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
        checkpoint.restore(saved, resume_path, model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, ema=ema)
        _restore_progress(saved, resume_path, config, progress, world, len(train_batches))

    # Everything above only read; from here on the run folder is written, by rank 0 alone.
    lock, log = _open_run_dir(config, run_dir, world, saved)
    # What the step calls: on several processes the model inside DistributedDataParallel.
    forward = distributed.wrap(model, world, device)
    run = Run(config, device, run_dir, model, torch.compile(forward) if config.compile else forward,
              optimizer, scheduler, scaler, ema, train_batches, test_batches, val_batches,
              val_index, digits.spec, progress=progress, log=log, lock=lock, world=world,
              hardware=f"{devices.describe(device)}; {precision}", resumed_from=resume_path)
    crowded = devices.crowding_note(device, config.threads)
    _announce(run, digits, [precision, *notes, *([crowded] if crowded else [])])
    if saved is not None:
        _announce_resume(run, resume_path, changes)
    return run


def _settled(config: TrainConfig, amp: str, model: nn.Module | None,
             data: datasets.OwnData | None) -> TrainConfig:
    """The config as the run saves it: --amp auto as this device's precision (a resume elsewhere
    goes on in it), paths absolute, your own model and data recorded by name."""
    changes: dict[str, Any] = {"amp": amp}
    if config.dataset.startswith(datasets.FOLDER_PREFIX):
        folder = Path(config.dataset[len(datasets.FOLDER_PREFIX):]).expanduser().resolve()
        changes["dataset"] = f"{datasets.FOLDER_PREFIX}{folder}"
    if config.data_dir:
        changes["data_dir"] = str(Path(config.data_dir).expanduser().resolve())
    if model is not None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be an nn.Module, not {type(model).__name__}")
        changes["model"] = models.import_path(type(model))
    if data is not None:
        if not all(hasattr(data, a) for a in ("train", "test", "name")):
            raise UsageError(f"data must be a torchmnist.OwnData, not {type(data).__name__}")
        changes["dataset"] = OWN_PREFIX + (re.sub(r"[^\w.-]", "-", str(data.name)) or "own")
    return dataclasses.replace(config, **changes)


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


def _choose_run_dir(config: TrainConfig, resume_path: Path | None,
                    world: distributed.World) -> Path:
    """A resumed run goes on in its checkpoint's folder (wherever it now is) unless --run-dir
    names another; a new run takes --run-dir, else a new folder under runs/ named by rank 0 (the
    clock could differ between processes). Neither may replace another run's checkpoint."""
    if resume_path is not None:
        run_dir = Path(config.run_dir) if config.run_dir else resume_path.parent
        if (run_dir / "last.pt").exists() and not _same_place(run_dir, resume_path.parent):
            raise UsageError(f"{run_dir} holds a run of its own ({run_dir / 'last.pt'}), which "
                             f"continuing {resume_path} there would replace; choose a new or "
                             "empty --run-dir, or resume that run itself")
        return run_dir
    run_dir = distributed.broadcast(
        Path(config.run_dir) if config.run_dir else _new_run_dir(config), world)
    if (run_dir / "last.pt").exists():
        raise UsageError(f"{run_dir} already holds a run's checkpoint; pass --resume to "
                         "continue it, or choose another --run-dir")
    return run_dir


def _new_run_dir(config: TrainConfig) -> Path:
    dataset = ("synthetic" if config.dry_run and datasets.is_builtin(config.dataset)
               else datasets.short_name(config.dataset))
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


def _load_data(config: TrainConfig, data: datasets.OwnData | None,
               saved: dict | None) -> datasets.DigitData:
    """A built-in dataset, your folder or your `data` (a dry run: synthetic images, or a sample
    of yours); resuming on other data than the checkpoint's is refused."""
    if config.dry_run and datasets.is_builtin(config.dataset):
        return own.synthetic(config.dataset, seed=config.seed)
    if data is not None:
        digits = own.from_own(data, config.dataset)
    else:
        digits = own.load_dataset(config.dataset, config.data_dir, download=config.download)
    stored = (saved or {}).get(checkpoint.DATASET_SPEC) or {}
    if stored.get("fingerprint") and stored["fingerprint"] != digits.spec.fingerprint:
        raise UsageError(f"cannot resume: the images or labels of {config.dataset} differ from "
                         "the ones this run was trained on (their checksums differ)")
    return own.subset(digits, config.seed) if config.dry_run else digits


def _hold_out(digits: datasets.DigitData, config: TrainConfig, saved_index: torch.Tensor | None,
              ) -> tuple[datasets.DigitData, torch.Tensor]:
    """Split --val-size images off the training set: a permutation of its own (epoch 0 of the
    seed's orders, which training never uses), or the split a checkpoint recorded."""
    n = len(digits.train)
    if config.val_size >= n:
        raise UsageError(f"--val-size {config.val_size} leaves nothing to train on: the "
                         f"training set has {n} images")
    if saved_index is None:
        index = loaders.epoch_order(n, config.seed, 0)[:config.val_size].sort().values
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
    held = dataclasses.replace(digits, train=datasets.Split(images[keep], labels[keep]),
                               val=datasets.Split(images[index], labels[index]))
    return held, index


def _make_batches(config: TrainConfig, digits: datasets.DigitData, device: torch.device,
                  world: distributed.World, held_out: bool):
    """The training, test and (--val-size) validation batches; each rank's share of them."""
    pin_memory = config.pin_memory if config.pin_memory is not None else device.type == "cuda"
    loader_options = dict(num_workers=config.num_workers, pin_memory=pin_memory)
    train_batches = loaders.make_batches(config.loader, digits.train, digits.spec,
                                         config.batch_size, device, shuffle=True,
                                         seed=config.seed, rank=world.rank, ranks=world.size,
                                         **loader_options)
    test_batches = loaders.make_batches(config.loader, digits.test.shard(world.rank, world.size),
                                        digits.spec, config.test_batch_size, device,
                                        shuffle=False, **loader_options)
    val_batches = (loaders.TensorBatches(digits.val.shard(world.rank, world.size), digits.spec,
                                         config.test_batch_size, device, shuffle=False)
                   if held_out else None)
    return train_batches, test_batches, val_batches


def _build_model(config: TrainConfig, network: nn.Module | None, digits: datasets.DigitData,
                 device: torch.device, world: distributed.World,
                 fresh: bool) -> tuple[nn.Module, list[str]]:
    """The network on its device, with --init-from (a fresh run only), --sync-bn, --freeze and
    --channels-last applied; and what to tell of it."""
    classes = len(digits.spec.classes)
    model = (network if network is not None else models.build(config.model, classes)).to(device)
    if hasattr(model, "exit_threshold"):  # --model early-exit
        model.exit_threshold = config.exit_threshold
    if models.is_import_path(config.model):
        # Two images normalised here: a loader would start its workers before the run could
        # close them.
        sample = digits.train.images[:2].to(device)  # (2, 28, 28) uint8
        models.check_output(model, loaders.normalize(sample, digits.spec.mean, digits.spec.std),
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
    current = model.state_dict()
    extra = [k for k in state if k not in current]
    missing = [k for k in current if k not in state]
    if extra or missing:
        name = (extra or missing)[0]
        raise UsageError(f"--init-from {path} does not fit this model: {name} is "
                         f"{'only there' if extra else 'missing there'}")
    # The final layer is the one whose size is the number of classes.
    final = next(reversed([n for n, _ in model.named_parameters()])).rsplit(".", 1)[0]
    fresh = []
    for key, value in current.items():
        if state[key].shape != value.shape:
            if key.rsplit(".", 1)[0] != final:
                raise UsageError(f"--init-from {path} does not fit this model: {key} is "
                                 f"{tuple(state[key].shape)} there, {tuple(value.shape)} here")
            fresh.append(key)
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    kept = f", except {final} (another number of classes), which starts afresh" if fresh else ""
    return f"initial weights from {path}{kept}"


def _freeze(model: nn.Module, config: TrainConfig) -> None:
    """--freeze: parameters under these name prefixes get requires_grad=False."""
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


def _restore_progress(saved: dict, path: Path, config: TrainConfig, progress: Progress,
                      world: distributed.World, steps_per_epoch: int) -> None:
    """Where the saved run stood (ranks 1..: their own streams), checked against its length."""
    progress.load_state_dict(saved[checkpoint.PROGRESS])
    if world.rank:
        _restore_rank(saved, world, progress, config.seed)
    if progress.batch > steps_per_epoch:
        raise UsageError(f"{path} is a damaged checkpoint: it is at batch {progress.batch} of "
                         f"an epoch of {steps_per_epoch} batches")
    total = schedule_length(config, steps_per_epoch).steps
    if progress.step > total:
        raise UsageError(f"{path} has already trained {progress.step} steps, and --epochs "
                         f"{config.epochs} ends at step {total}; pass more epochs to go on, or "
                         "start a new run")


def _restore_rank(saved: dict, world: distributed.World, progress: Progress,
                  seed: int) -> None:
    """Ranks 1.. take their own random streams and sums from the checkpoint; a rank it has no
    state for (--allow-new-world-size) starts them afresh."""
    ranks = saved.get(checkpoint.RANKS) or []
    if world.rank <= len(ranks):
        mine = ranks[world.rank - 1]
        progress.load_state_dict(mine[checkpoint.PROGRESS])
        devices.set_rng_state(mine[checkpoint.RNG])
        return
    devices.seed_everything(distributed.rank_seed(seed, world, progress.step))
    for total in (progress.epoch_loss_sum, progress.epoch_correct_sum, progress.window_loss_sum):
        total.zero_()
    progress.epoch_images = 0


def _open_run_dir(config: TrainConfig, run_dir: Path, world: distributed.World,
                  saved: dict | None) -> tuple[rundir.RunLock, RunLog]:
    """Claim and lock the run folder (rank 0; the caller releases it), write config.json and
    open the log."""
    lock = rundir.claim(run_dir) if world.main else rundir.RunLock(run_dir)  # (not acquired)
    try:
        if world.main:
            rundir.remove_stale_temporaries(run_dir)
            rundir.write_text_atomically(
                run_dir / "config.json",
                json.dumps(config.to_dict(), indent=2, allow_nan=False) + "\n")
        log = RunLog(run_dir, history=saved[checkpoint.METRICS] if saved else None,
                     quiet=config.quiet or not world.main, to_stderr=config.json,
                     write=world.main)
    except BaseException:
        lock.release()
        raise
    return lock, log


def _announce(run: Run, digits: datasets.DigitData, notes: list[str]) -> None:
    """The run's first lines: what trains on what, where, with which settings."""
    config, log = run.config, run.log
    dry = datasets.dry_run_words(config.dataset) if config.dry_run else ""
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


def _announce_resume(run: Run, resume_path: Path, changes: list[str]) -> None:
    progress, last = run.progress, run.run_dir / "last.pt"
    run.log.print(f"resuming from {resume_path} at epoch {progress.epoch}, batch "
                  f"{progress.batch} (step {progress.step})")
    if last.exists() and not _same_place(last, resume_path):
        # Going back to an earlier checkpoint (best.pt, epoch-002.pt) is allowed: say what it
        # costs, since nothing else would.
        run.log.print(f"  resume: {last} and metrics.jsonl go on from this checkpoint; what "
                      "they held after it is replaced")
    for change in changes:
        run.log.print(f"  resume: {change}")
