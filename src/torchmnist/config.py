"""The one configuration schema, shared by the CLI, the Python API and the checkpoints.

`TrainConfig` holds every setting of a training run. The CLI builds its flags from the
fields below (their `help` and `choices` metadata), the API takes a `TrainConfig`, and every
checkpoint stores the resolved config as a plain dict so a run can be resumed or inspected.

A *recipe* is a named set of defaults. Resolution order, later wins:
the plain defaults (= the guide's recipe) -> the chosen recipe (and its dataset's values) ->
values given explicitly. So `TrainConfig(recipe="fast", lr=0.2)` is the fast recipe at rate 0.2,
as `torchmnist train --recipe fast --lr 0.2` is; every config is checked when it is made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import reprlib
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torchmnist.errors import UsageError, is_utf8, printable
from torchmnist.storage import rundir

RECIPE_NAMES = ("guide", "official", "fast", "fast-gpu", "best")  # the keys of RECIPES
DATASETS = ("mnist", "fashion-mnist", "kmnist")  # besides folder:PATH and own data
FOLDER_PREFIX, OWN_PREFIX = "folder:", "own:"  # the same as in data.py, which needs torch
MODELS = ("guide", "official", "fast", "fast-narrow", "best", "early-exit")
OPTIMIZERS = ("sgd", "adadelta", "adam", "adamw")
SCHEDULERS = ("none", "step", "onecycle")
AMP = ("auto", "none", "bf16", "fp16")
AUGMENTATIONS = ("none", "translate", "affine", "translate-erase")
LOADERS = ("tensor", "dataloader")
DEVICES = ("auto", "cpu", "cuda", "mps")
ENGINES = ("torch", "onnxruntime")  # what runs a trained network: engines.py


def gpu_index_problem(device: str) -> str | None:
    """Why training does not take a GPU by its index (cuda:1), and what does pick it."""
    found = re.fullmatch(r"cuda:(\d+)", str(device))
    if not found:
        return None
    return (f"training runs on --device cuda, the first GPU that CUDA_VISIBLE_DEVICES leaves "
            f"visible: to train on {device}, run CUDA_VISIBLE_DEVICES={found.group(1)} "
            "torchmnist train ... (on several GPUs at once, torchrun)")


def _device_text(text: str) -> str:
    """--device's text; a GPU by index gets its explanation, not argparse's list of choices."""
    problem = gpu_index_problem(text)
    if problem:
        import argparse

        raise argparse.ArgumentTypeError(problem)
    return text


class _Unset:
    """A field's value until `__post_init__` fills it from the recipe or the plain default."""

    def __repr__(self) -> str:
        return "<from the recipe>"


UNSET: Any = _Unset()


GROUPS = ("recipe", "data", "model", "optimisation", "schedule and stopping",
          "precision and speed", "checkpoints", "logging", "device",
          "distributed (under torchrun)")  # --help's sections


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None,
         type: Callable[[str], Any] | None = None, *, group: str, metavar: str | None = None,
         switch: str | None = None) -> Any:
    """A setting, with what the CLI needs to make its flag: `type` parses the flag's text
    (default: the type of the default value); `switch` is "flag" (--x turns it on) or "on-off"
    (--x / --no-x), and every yes/no setting must say which; `group` is its --help section."""
    if group not in GROUPS:
        raise TypeError(f"unknown group {group!r}")
    if switch not in (None, "flag", "on-off"):
        raise TypeError(f"unknown switch {switch!r}")
    if isinstance(default, bool) and switch is None:
        # argparse's type=bool would read "--x False" as True.
        raise TypeError("a yes/no setting needs switch='flag' or switch='on-off'")
    return field(default=UNSET, metadata={
        "help": help, "choices": choices, "default": default, "group": group,
        "metavar": metavar, "switch": switch, "type": type or _type_of(default)})


def number(text: str) -> int | float:
    """A flag's number: a whole one stays an int (2, not 2.0, in configs and messages)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _type_of(default: Any) -> type:
    return default.__class__ if isinstance(default, int | float) else str


@dataclass
class TrainConfig:
    # What to train.
    recipe: str = _opt("guide", "named set of defaults; explicit flags override it: guide, "
                       "official, fast (quickest to 99%% on a CPU), fast-gpu (on a GPU), best "
                       "(highest accuracy)", choices=RECIPE_NAMES, group="recipe")
    dataset: str = _opt("mnist", "dataset to train and test on: mnist, fashion-mnist, kmnist, "
                        "or folder:PATH, your own images in PATH/train/<class>/ and "
                        "PATH/test/<class>/ (from Python, also torchmnist.OwnData)",
                        group="data", metavar="DATASET")
    model: str = _opt("guide", "network: the guide's small CNN (guide), the official "
                      "example's (official), torchmnist's fast and best ones, or your own as "
                      "an import path, package.module:Class (from Python, also a class or "
                      "an nn.Module instance)", group="model", metavar="MODEL")
    # Where the data comes from.
    data_dir: str | None = _opt(None, "dataset root (torchvision layout, e.g. DIR/MNIST/raw); "
                                "default: $TORCHMNIST_DATA_DIR, else ~/.torch/datasets",
                                group="data", metavar="DIR")
    download: bool = _opt(True, "download missing dataset files with torchvision",
                          group="data", switch="on-off")
    # Optimisation.
    optimizer: str = _opt("sgd", "optimiser", choices=OPTIMIZERS, group="optimisation")
    lr: float = _opt(0.01, "learning rate", group="optimisation", metavar="LR")
    momentum: float = _opt(0.5, "SGD momentum (sgd only)", group="optimisation", metavar="M")
    nesterov: bool = _opt(False, "Nesterov momentum (sgd only)",
                          group="optimisation", switch="on-off")
    weight_decay: float = _opt(0.0, "weight decay", group="optimisation", metavar="WD")
    scheduler: str = _opt("none", "learning-rate schedule: step multiplies the rate by --gamma "
                          "after every epoch; onecycle warms up linearly to --lr over "
                          "--warmup of the run, then anneals linearly, every step",
                          choices=SCHEDULERS, group="schedule and stopping")
    gamma: float = _opt(0.7, "StepLR factor applied after each epoch (with --scheduler step)",
                        group="schedule and stopping", metavar="G")
    warmup: float = _opt(0.2, "fraction of the run spent warming up (with --scheduler onecycle)",
                         group="schedule and stopping", metavar="F")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss",
                                  group="optimisation", metavar="F")
    ema: float = _opt(0.0, "decay of an exponential moving average of the weights, which is "
                      "then the model tested and saved (0: off)",
                      group="optimisation", metavar="DECAY")
    exit_threshold: float = _opt(0.9, "--model early-exit: in testing, an image leaves at "
                                 "the first head whose top probability reaches this (1: every "
                                 "image runs the whole network)", group="model", metavar="T")
    init_from: str | None = _opt(None, "start from the weights of this checkpoint, run folder "
                                 "or state_dict (fine-tuning): shapes must match, except a "
                                 "final layer for another number of classes, which starts "
                                 "afresh; nothing else of that run is taken",
                                 group="model", metavar="CKPT")
    freeze: str = _opt("", "comma-separated parameter name prefixes (conv1,conv2) to keep "
                       "fixed: left out of the optimiser, so they stay bit for bit as "
                       "loaded", group="model", metavar="PREFIXES")
    batch_size: int = _opt(64, "training batch size", group="optimisation", metavar="N")
    test_batch_size: int = _opt(1000, "test batch size (does not change results)",
                                group="optimisation", metavar="N")
    epochs: float = _opt(10, "number of epochs to train; a fraction such as 0.6 ends the last "
                         "epoch early (the schedule spans exactly the steps taken)", type=number,
                         group="optimisation", metavar="E")
    seed: int = _opt(1, "random seed for python, numpy and torch (CUDA too) and the data order",
                     group="optimisation", metavar="S")
    # Data pipeline.
    loader: str = _opt("tensor", "tensor: whole dataset as tensors on the device, batches are "
                       "slices; dataloader: the guide's torch DataLoader with PIL transforms",
                       choices=LOADERS, group="data")
    num_workers: int = _opt(4, "DataLoader worker processes (--loader dataloader)",
                            group="data", metavar="N")
    pin_memory: bool | None = _opt(None, "pin host memory for faster copies to the GPU "
                                   "(--loader dataloader); default: on when training on CUDA",
                                   group="data", switch="on-off")
    augment: str = _opt("none", "on-device augmentation of each training batch: translate "
                        "shifts each image by up to 2 pixels; affine also rotates (up to 10 "
                        "degrees) and scales (0.9-1.1); translate-erase also blanks a random "
                        "rectangle in half the images; the best recipe takes translate (and 45 "
                        "epochs) on fashion-mnist", choices=AUGMENTATIONS, group="data")
    # Speed.
    amp: str = _opt("none", "mixed precision: bf16 autocast (CPU or CUDA), fp16 with a "
                    "gradient scaler (CUDA), or auto: bf16 where the device computes in it "
                    "natively (AVX512-BF16 or AMX CPUs, recent GPUs), else fp32",
                    choices=AMP, group="precision and speed")
    channels_last: bool = _opt(False, "keep images and weights in channels-last memory order",
                               group="precision and speed", switch="on-off")
    compile: bool = _opt(False, "torch.compile the model (compile time is reported apart)",
                         group="precision and speed", switch="flag")
    cuda_graph: bool = _opt(False, "capture the whole training step, and the test pass, in CUDA "
                            "graphs and replay them: one launch a step instead of about fifty "
                            "(CUDA only; elsewhere, or if a capture fails, the step runs eagerly "
                            "and the log says why; capture time is reported apart)",
                            group="precision and speed", switch="on-off")
    target_accuracy: float | None = _opt(None, "stop as soon as the test accuracy reaches this "
                                         "fraction (e.g. 0.99) and report the time it took, "
                                         "for time-to-accuracy benchmarks: it watches the test "
                                         "set even with --val-size; default: train all "
                                         "epochs", type=float,
                                         group="schedule and stopping", metavar="A")
    eval_interval: str = _opt("1", "test every N epochs, or every N steps with an s suffix "
                              "(500s)", group="schedule and stopping", metavar="N[s]")
    val_size: int = _opt(0, "hold out N training images (chosen by --seed) for validation: "
                         "best.pt, --patience and the per-epoch choice then follow validation "
                         "accuracy, and the test set is scored once, at the end (0: off)",
                         group="data", metavar="N")
    patience: int = _opt(0, "stop when validation accuracy (test accuracy without "
                         "--val-size) has not improved for N tests in a row (0: off)",
                         group="schedule and stopping", metavar="N")
    # Device and reproducibility.
    device: str = _opt("auto", "auto picks the available accelerator (torch.accelerator), "
                       "else the CPU", choices=DEVICES, type=_device_text, group="device")
    deterministic: bool = _opt(False, "use only deterministic algorithms (torch, cuDNN, cuBLAS)",
                               group="device", switch="flag")
    threads: int | None = _opt(None, "torch CPU threads, like OMP_NUM_THREADS; set it when "
                               "several jobs share a machine (default: torch's choice)",
                               type=int, group="device", metavar="N")
    cuda_launch_blocking: bool = _opt(False, "set CUDA_LAUNCH_BLOCKING=1 so CUDA errors point "
                                      "at the failing call", group="device", switch="flag")
    detect_anomaly: bool = _opt(False, "autograd anomaly detection: name the operation whose "
                                "backward produced NaN (slow; for debugging)",
                                group="device", switch="flag")
    # Several processes (torchrun); distributed.py.
    sync_bn: bool = _opt(False, "BatchNorm statistics over the whole batch of all processes "
                         "instead of each process's share (SyncBatchNorm; CUDA only)",
                         group="distributed (under torchrun)", switch="flag")
    allow_new_world_size: bool = _opt(False, "resume a checkpoint written by another number of "
                                      "processes (the batches then split differently, so the "
                                      "run no longer continues exactly)",
                                      group="distributed (under torchrun)", switch="flag")
    # Output.
    log_interval: int = _opt(10, "batches between log lines", group="logging", metavar="N")
    save_interval: int = _opt(10, "batches between checkpoints (0: only at the end of each "
                              "epoch)", group="checkpoints", metavar="N")
    keep: int = _opt(0, "also keep the checkpoints of the last N epochs as epoch-NNN.pt",
                     group="checkpoints", metavar="N")
    save_model: bool = _opt(False, "also write the final weights as model.pt and "
                            "model.safetensors in the run directory",
                            group="checkpoints", switch="flag")
    tensorboard: bool = _opt(False, "also write TensorBoard scalars (losses, accuracy, learning "
                             "rate) and an image grid into the run directory, for "
                             "`tensorboard --logdir runs`", group="logging", switch="flag")
    run_dir: str | None = _opt(None, "run directory (default: runs/<date-time>-<dataset>-"
                               "<model>)", group="checkpoints", metavar="DIR")
    resume: str | None = _opt(None, "resume from PATH (a checkpoint or run directory), or "
                              "with no PATH from last.pt in --run-dir, else in the newest run "
                              "under runs/; default: start a new run",
                              group="checkpoints", metavar="PATH")
    json: bool = _opt(False, "print a JSON summary on stdout, and nothing else there: the "
                      "lines for people go to stderr", group="logging", switch="flag")
    quiet: bool = _opt(False, "print nothing while training (errors still go to stderr, the "
                       "--json line to stdout, every line to train.log)",
                       group="logging", switch="flag")
    dry_run: bool = _opt(False, "run the whole pipeline quickly on a small synthetic dataset "
                         "made in memory, one epoch unless --epochs is given (offline, never "
                         "touches the data directory)", group="data", switch="flag")

    def __post_init__(self) -> None:
        # Settings only: your own data and network objects go to torchmnist.train itself.
        if not isinstance(self.dataset, str | _Unset):
            raise UsageError(f"dataset must be a name or folder:PATH, not "
                             f"{type(self.dataset).__name__}; your own data goes to train: "
                             "torchmnist.train(config, data=OwnData(...))")
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not UNSET}
        for name, value in _recipe_values(given).items():
            setattr(self, name, value)
        if isinstance(self.model, type):  # your own network's class: recorded by import path
            self.model = f"{self.model.__module__}:{self.model.__qualname__}"
        elif not isinstance(self.model, str):
            raise UsageError(f"model must be a name, an import path or a class, not a "
                             f"{type(self.model).__name__}; a network object goes to train: "
                             "torchmnist.train(config, model=network)")
        # Values given from Python are checked as a config file's are: lr="abc" is named here
        # rather than failing as a TypeError wherever it is first compared.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):  # run_dir=Path("runs/a")
                value = os.fspath(value)
            if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
                value = value.item()  # epochs=np.int64(3), as np.arange and alike give them
            if f.name in PATH_FIELDS and isinstance(value, str) and value.startswith("~"):
                value = os.path.expanduser(value)  # in a config file no shell expands "~/runs"
            setattr(self, f.name, coerce(f.name, value))
        validate(self)

    @classmethod
    def for_recipe(cls, recipe: str = "guide", **overrides: Any) -> TrainConfig:
        """`for_recipe("official", epochs=1)` is `TrainConfig(recipe="official", epochs=1)`."""
        return cls(recipe=recipe, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Recipes list only what differs from the dataclass defaults, which are the guide's own.
RECIPES: dict[str, dict[str, Any]] = {
    "guide": {},
    "official": {
        "model": "official",
        "optimizer": "adadelta",
        "lr": 1.0,
        "scheduler": "step",
        "gamma": 0.7,
        "epochs": 14,
        "test_batch_size": 1000,
        # Its checkpoints are large (1.2M parameters and Adadelta's two buffers each).
        "save_interval": 100,
    },
    # The shortest time to 99% test accuracy; docs/benchmarks.md has the measurements behind
    # every value.
    "fast": {
        "model": "fast", "optimizer": "sgd", "lr": 0.15, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "scheduler": "onecycle", "warmup": 0.2, "label_smoothing": 0.1,
        "batch_size": 64, "epochs": 0.75, "amp": "auto", "channels_last": True,
        "log_interval": 100, "save_interval": 0,
    },
    # The highest accuracy: a wider network, augmentation and an average of the weights.
    # best.pt is chosen on 5,000 held-out training images, and the test set is scored once.
    "best": {
        "model": "best", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "scheduler": "onecycle", "warmup": 0.15, "label_smoothing": 0.1,
        "batch_size": 128, "epochs": 30, "augment": "affine", "ema": 0.999, "amp": "auto",
        "channels_last": True, "log_interval": 100, "save_interval": 200, "val_size": 5000,
    },
}

# On a GPU a step of the fast model is launch-bound, so fewer, larger steps win, each replayed
# from a CUDA graph; in graphs fp32 (TF32 convolutions) in NCHW order beat bf16 in
# channels-last order, and the test set is scored in one batch (docs/benchmarks.md).
RECIPES["fast-gpu"] = {**RECIPES["fast"], "lr": 0.4, "batch_size": 512, "epochs": 2,
                       "cuda_graph": True, "amp": "none", "channels_last": False,
                       "test_batch_size": 10_000}

# Where a recipe's values depend on the CPU it trains on. Without native bf16 (AVX2 CPUs) the
# fast recipe trains in fp32, where FastNet's 16-channel first layer costs more than it gives
# (docs/benchmarks.md, "The fast recipe on CPUs without native bf16").
CPU_FP32_RECIPES: dict[str, dict[str, Any]] = {
    "fast": {"model": "fast-narrow", "batch_size": 128, "lr": 0.3, "epochs": 0.85},
}

# Where a recipe's values depend on the dataset (docs/benchmarks.md, Fashion-MNIST): clothes
# need more steps than digits, are hurt by rotation and scaling, and keep improving for longer.
DATASET_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("fast", "fashion-mnist"): {"lr": 0.1, "epochs": 8},
    # All 60,000 images: a validation split cost accuracy there and gained nothing.
    ("best", "fashion-mnist"): {"augment": "translate", "epochs": 45, "val_size": 0},
}

# Keys that change what a run computes. Resuming with a different value would not continue the
# same run, so it is refused. Every other key (epochs, logging, output, workers) may change.
RESULT_KEYS = (
    "recipe", "dataset", "model", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
    "scheduler", "gamma", "warmup", "label_smoothing", "ema", "batch_size", "seed", "loader",
    "augment", "amp", "channels_last", "compile", "deterministic", "dry_run", "init_from",
    "freeze", "val_size", "sync_bn",
)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def plain_default(name: str) -> Any:
    """The value `name` takes when neither the user nor the recipe sets it (the guide's)."""
    return next(f.metadata["default"] for f in dataclasses.fields(TrainConfig)
                if f.name == name)


def default_for(name: str, recipe: str = "guide") -> Any:
    """The value `name` takes under `recipe` when the user does not set it."""
    if name in RECIPES[recipe]:
        return RECIPES[recipe][name]
    return plain_default(name)


def _recipe_values(given: dict[str, Any]) -> dict[str, Any]:
    """Every field's value: the ones given, then the recipe's, then the plain defaults."""
    recipe = given.get("recipe", "guide")
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    dataset = given.get("dataset", RECIPES[recipe].get("dataset", "mnist"))
    base = dict(RECIPES[recipe])
    if recipe in CPU_FP32_RECIPES and _on_cpu_without_bf16(given.get("device", "auto")):
        base.update(CPU_FP32_RECIPES[recipe])
    base.update(DATASET_RECIPES.get((recipe, dataset), {}))
    if given.get("dry_run") and "epochs" not in given:
        base["epochs"] = 1  # a dry run checks the pipeline, one short epoch is enough
    if given.get("dry_run") and base.get("val_size") and "val_size" not in given:
        base["val_size"] = 256  # a recipe's split, scaled to the 1,024 synthetic images
    return {name: given[name] if name in given else base.get(name, plain_default(name))
            for name in field_names()}


def _on_cpu_without_bf16(device: Any) -> bool:
    """Whether --device `device` trains on a CPU that only emulates bf16 (devices.py decides)."""
    from torchmnist.runtime import devices  # here: without torch, --help answers at once

    try:
        chosen = devices.resolve_device(device)
    except UsageError:
        return False  # validate() and the run name the unavailable device
    return chosen.type == "cpu" and not devices.bf16_native(chosen)


# Settings that say where output goes or what to continue, not what is computed: a run's
# first lines leave them out (config.json has them all).
_NOT_SHOWN = ("run_dir", "resume", "json", "quiet", "allow_new_world_size")


def differences(config: TrainConfig) -> dict[str, Any]:
    """The settings of `config` that differ from its recipe's values (on its dataset)."""
    recipe = _recipe_values({"recipe": config.recipe, "dataset": config.dataset,
                             "dry_run": config.dry_run, "device": config.device})
    # amp "auto" becomes what the device computes in, which the precision line tells.
    return {name: value for name, value in config.to_dict().items()
            if name not in _NOT_SHOWN and value != recipe[name]
            and not (name == "amp" and recipe[name] == "auto")}


# Settings that act only beside another's value: (setting, the other, the value it needs).
_ONLY_WITH = (("momentum", "optimizer", "sgd"), ("nesterov", "optimizer", "sgd"),
              ("gamma", "scheduler", "step"), ("warmup", "scheduler", "onecycle"),
              ("exit_threshold", "model", "early-exit"))


def idle_settings(config: TrainConfig) -> list[str]:
    """A sentence for each changed setting that does nothing in this run (--momentum with Adam):
    not refused, since a sweep may search it beside the setting that enables it."""
    def shown(name: str) -> str:  # as it is typed: --nesterov, --momentum 0.9
        value = getattr(config, name)
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{_flag(name)}"
        return f"--{_flag(name)} {value if isinstance(value, str) else json.dumps(value)}"

    changed = differences(config)
    idle = [f"{shown(name)} does nothing here: it is for --{_flag(other)} {needed}, and this "
            f"run has {shown(other)}" for name, other, needed in _ONLY_WITH
            if name in changed and getattr(config, other) != needed]
    if "nesterov" in changed and config.nesterov and config.optimizer == "sgd" \
            and not config.momentum > 0:
        idle.append("--nesterov does nothing here: it needs --momentum above 0")
    return idle


def resolve(explicit: dict[str, Any], saved: dict[str, Any] | None = None) -> TrainConfig:
    """Build the config from the values a user set explicitly, filling the rest from the
    recipe, or, when resuming, from the `saved` config of the checkpoint."""
    unknown = set(explicit) - set(field_names())
    if unknown:
        raise UsageError(f"unknown config keys: {', '.join(sorted(unknown))}")
    if saved is None:
        return TrainConfig(**explicit)  # the recipe fills the rest
    # Resuming: the checkpoint's values (a key it lacks, the plain default), never the
    # recipe's; not its run_dir: a resumed run goes on where its checkpoint now is.
    base = {name: plain_default(name) for name in field_names()}
    base.update((k, v) for k, v in saved.items() if k in field_names() and k != "run_dir")
    return TrainConfig(**{**base, **explicit})


MAX_THREADS = 1024  # far more than any machine's cores; tens of thousands crash OpenMP
MAX_WORKERS = 64  # DataLoader processes, each a Python of its own; MNIST needs a few
MAX_SEED = 2**63 - 1  # the range torch, numpy and SeedSequence all take
MAX_SETTINGS_BYTES = 10 * 1024 * 1024  # --config and --space files
PATH_FIELDS = ("run_dir", "data_dir", "resume", "init_from")  # "~" is the home folder in each

# The one table of value checks: setting -> (test, what it must be). However a value arrives (a
# flag, a config file, a checkpoint, Python), a failing one is named in one sentence:
# "--lr must be positive, not -1". Types and choices come from each field's metadata.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("batch_size", "test_batch_size", "log_interval"),
                    (lambda v: v >= 1, "be at least 1")),
    **dict.fromkeys(("save_interval", "keep", "val_size", "patience", "momentum",
                     "weight_decay"), (lambda v: v >= 0, "not be negative")),
    **dict.fromkeys(("epochs", "lr", "gamma"), (lambda v: v > 0, "be positive")),
    **dict.fromkeys(("warmup", "label_smoothing", "ema"),
                    (lambda v: 0 <= v < 1, "be at least 0 and below 1")),
    "threads": (lambda v: v is None or 1 <= v <= MAX_THREADS, f"be from 1 to {MAX_THREADS}"),
    "num_workers": (lambda v: 0 <= v <= MAX_WORKERS, f"be from 0 to {MAX_WORKERS} (each worker "
                    "is a process of its own)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, "be from 0 to 2**63 - 1"),
    "exit_threshold": (lambda v: 0 < v <= 1, "be above 0 and at most 1"),
    "target_accuracy": (lambda v: v is None or 0 < v <= 1, "be a fraction in (0, 1], such as "
                        "0.99"),
}


def check(name: str, value: Any) -> Any:
    """`value` if it passes the table's check for setting `name`, else one sentence."""
    if isinstance(value, float) and not math.isfinite(value):  # inf and nan pass comparisons
        raise UsageError(f"--{_flag(name)} must be a finite number, not {value}")
    test, what = CHECKS.get(name, (lambda v: True, ""))
    if not test(value):
        raise UsageError(f"--{_flag(name)} must {what}, not {_shown(value)}")
    return value


def validate(config: TrainConfig) -> None:
    """Reject values that cannot work, with one sentence naming the setting."""
    if config.model not in MODELS and not _IMPORT_PATH.fullmatch(config.model):
        raise UsageError(f"--model must be one of {', '.join(MODELS)} or an import path such as "
                         f"mypackage.nets:MyNet, not {_shown(config.model)}")
    dataset = config.dataset
    if not (dataset in DATASETS or (dataset.startswith(FOLDER_PREFIX)
                                    and dataset[len(FOLDER_PREFIX):].strip())
            or dataset.startswith(OWN_PREFIX)):
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, or folder:PATH for "
                         f"your own images, not {_shown(dataset)}")
    for f in dataclasses.fields(config):
        value, choices = getattr(config, f.name), f.metadata["choices"]
        if choices and value not in choices:
            hint = gpu_index_problem(value) if f.name == "device" else None
            raise UsageError(f"--device {value}: {hint}" if hint else f"--{_flag(f.name)} must "
                             f"be one of {', '.join(choices)}, not {_shown(value)}")
        check(f.name, value)
        if f.name in PATH_FIELDS and isinstance(value, str):
            _check_path(f.name, value)
    if config.model == "early-exit" and config.label_smoothing:
        raise UsageError("--model early-exit trains its heads on the mean of their F.nll_loss, "
                         "which label smoothing would turn into a reward for disagreeing "
                         "heads: pass --label-smoothing 0")
    eval_interval(config)


def _check_path(name: str, value: str) -> None:
    """A path goes into train.log and config.json: printable UTF-8 only. --resume "$UNSET" must
    not start a fresh run."""
    if not is_utf8(value):
        raise UsageError(f"--{_flag(name)} {printable(value)} is not valid UTF-8, so it cannot "
                         "be written to train.log and config.json; rename it")
    if not value.isprintable():
        raise UsageError(f"--{_flag(name)} {printable(value)} holds a control character (a "
                         "newline, a tab, an escape), which the log would print as it is; "
                         "rename it")
    if name in ("resume", "init_from") and not value.strip():
        raise UsageError(f"--{_flag(name)} was given an empty path: name a checkpoint or a run "
                         "folder" + (" (or give --resume alone to continue the newest run)"
                                     if name == "resume" else ""))


_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.<>]*")


def frozen_prefixes(config: TrainConfig) -> list[str]:
    return [part.strip() for part in config.freeze.split(",") if part.strip()]


class Schedule(NamedTuple):
    steps: int  # optimiser steps in the whole run
    epochs: int  # epochs begun; the last may be cut short by a fractional --epochs


def schedule_length(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The run's length; a fractional --epochs rounds to the nearest step, at least one."""
    total = max(1, round(config.epochs * steps_per_epoch))
    return Schedule(total, math.ceil(total / steps_per_epoch))


class Interval(NamedTuple):
    """--eval-interval, parsed: test every `every` epochs, or every `every` steps."""

    unit: str  # "epochs" or "steps"
    every: int


def eval_interval(config: TrainConfig) -> Interval:
    """"2" is Interval("epochs", 2), "500s" Interval("steps", 500); checked with the config."""
    text = str(config.eval_interval).strip()
    unit, number = ("steps", text[:-1]) if text.endswith("s") else ("epochs", text)
    if not number.isdigit() or int(number) < 1:
        raise UsageError(f"--eval-interval must be a number of epochs (2) or of steps (500s), "
                         f"not {_shown(config.eval_interval)}")
    return Interval(unit, int(number))


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ---- Config files (--config) ---------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A value for a message: its repr, cut short (YAML's aliases let a few lines hold a list of
    millions of items)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 2, 4, 4, 4
    short.maxstring = short.maxother = 60
    return short.repr(value)


def is_number(value: Any, *, whole: bool = False) -> bool:
    """An int or a float (only an int when `whole`), never a bool: True is an int to Python,
    but not a number in a settings file, a checkpoint or a metrics record."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and (isinstance(value, int) or not whole))


def count(flag: str, value: Any, least: int = 1) -> int:
    """A count given to an API call (--top): a whole number of at least `least`, as the flag."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{flag} must be a whole number, not {_shown(value)}")
    if value < least:
        raise UsageError(f"{flag} must not be negative, not {value}" if least == 0
                         else f"{flag} must be at least {least}, not {value}")
    return int(value)


def coerce(name: str, value: Any) -> Any:
    """A value from a config file as the field `name` takes it, or one sentence saying why not:
    text is parsed as the flag's text is; numbers, booleans and null must fit the field."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    default = f.metadata["default"]
    if value is None and default is None:
        return None
    if isinstance(default, bool) or (default is None and name == "pin_memory"):
        if isinstance(value, bool):
            return value
        raise UsageError(f"{name} must be true or false, not {_shown(value)}")
    if isinstance(value, str) and not isinstance(default, str):
        try:
            return f.metadata["type"](value)
        except ValueError:
            raise UsageError(f"{name} must be a number, not {_shown(value)}") from None
    if isinstance(default, str) or f.metadata["type"] is str:
        if isinstance(value, str):
            return value
        if name == "eval_interval" and is_number(value, whole=True):
            return str(value)  # eval_interval = 2 means 2 epochs, as "2" does
        raise UsageError(f"{name} must be text, not {_shown(value)}")
    if not is_number(value):
        raise UsageError(f"{name} must be a number, not {_shown(value)}")
    if f.metadata["type"] is int and not float(value).is_integer():
        raise UsageError(f"{name} must be a whole number, not {_shown(value)}")
    return int(value) if f.metadata["type"] is int else value


def checked(values: dict[str, Any]) -> dict[str, Any]:
    """Saved settings (a checkpoint's, a config.json) each as its field takes it, so a damaged
    value is named at once; keys that are not settings are kept as they are."""
    known = set(field_names())
    values = {key: coerce(key, value) if key in known else value for key, value in values.items()}
    for key in ("resume", "init_from"):  # an empty path, which meant none before it was refused
        if isinstance(values.get(key), str) and not values[key].strip():
            values[key] = None
    return values


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a TOML, YAML or JSON file (a config.json too), each checked."""
    path = Path(path)
    values = read_structured_file(path, "--config")
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a table of settings, not a "
                         f"{type(values).__name__}")
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise UsageError(f"--config {path} has unknown settings: {', '.join(unknown)}")
    values.pop("resume", None)  # what to resume is said on the command line, never in a file
    if rundir.is_run(path.parent):  # a run's own config.json: a new run, not that folder
        values.pop("run_dir", None)
    try:
        return {name: coerce(name, value) for name, value in values.items()}
    except UsageError as error:
        raise UsageError(f"--config {path}: {error}") from None


def read_structured_file(path: Path, flag: str) -> Any:
    """What the TOML, YAML or JSON file `flag` names holds, or one sentence naming the flag."""
    try:
        found = path.stat()
        # A pipe would be waited on forever, /dev/zero read until memory runs out.
        if not stat.S_ISREG(found.st_mode):
            what = "a folder" if stat.S_ISDIR(found.st_mode) else "not a regular file"
            raise UsageError(f"cannot read {flag} {path}: it is {what}")
        if found.st_size > MAX_SETTINGS_BYTES:
            raise UsageError(f"{flag} {path} is {found.st_size:,} bytes, more than a settings "
                             f"file holds ({MAX_SETTINGS_BYTES:,} at most)")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {flag} {path}: "
                         f"{getattr(error, 'strerror', None) or error}") from None
    return _parse_config(path, text, flag)


def _parse_config(path: Path, text: str, flag: str) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise UsageError(f"a TOML {flag} needs Python 3.11, or the tomli package "
                                     "before it (pip install tomli)") from None
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"a YAML {flag} needs PyYAML; install it with: pip install "
                                 "pyyaml (or use TOML or JSON)") from None
            return yaml.load(text, Loader=_unique_keys_yaml_loader(yaml))  # a SafeLoader
        if suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - each parser has its own error class
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"{flag} {path} is not valid {suffix[1:].upper()}: {first}") from None
    raise UsageError(f"{flag} {path}: the name must end in .toml, .yaml, .yml or .json")


# TOML refuses a key given twice; JSON and YAML parsers keep the last one without a word, so
# that of two `lr` lines the one further down would silently win. They are refused alike.

def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"{key!r} is given twice")
        values[key] = value
    return values


def _unique_keys_yaml_loader(yaml):
    """PyYAML's SafeLoader (no Python objects, no code), refusing a key given twice in one
    mapping; a key that overrides one merged in with `<<` is not a repeat."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
