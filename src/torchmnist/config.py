"""The one configuration schema, shared by the CLI, the Python API and the checkpoints.

`TrainConfig` holds every setting of a training run. The CLI builds its flags from the
fields below (their `help` and `choices` metadata), the API takes a `TrainConfig`, and every
checkpoint stores the resolved config as a plain dict so a run can be resumed or inspected.

A *recipe* is a named set of defaults. Resolution order, later wins:
dataclass defaults (= the guide's recipe) -> the chosen recipe -> values the user gave explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torchmnist.errors import UsageError

DATASETS = ("mnist", "fashion-mnist", "kmnist")
MODELS = ("guide", "official")
OPTIMIZERS = ("sgd", "adadelta", "adam", "adamw")
SCHEDULERS = ("none", "step")
LOADERS = ("tensor", "dataloader")
DEVICES = ("auto", "cpu", "cuda", "mps")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **meta})


@dataclass
class TrainConfig:
    # What to train.
    recipe: str = _opt("guide", "named set of defaults; explicit flags override it",
                       choices=("guide", "official"))
    dataset: str = _opt("mnist", "dataset to train and test on", choices=DATASETS)
    model: str = _opt("guide", "network: the guide's small CNN or the official example's",
                      choices=MODELS)
    # Where the data comes from.
    data_dir: str | None = _opt(None, "dataset root (torchvision layout, e.g. DIR/MNIST/raw); "
                                "default: $TORCHMNIST_DATA_DIR, else ~/.torch/datasets")
    download: bool = _opt(True, "download missing dataset files with torchvision")
    # Optimisation.
    optimizer: str = _opt("sgd", "optimiser", choices=OPTIMIZERS)
    lr: float = _opt(0.01, "learning rate")
    momentum: float = _opt(0.5, "SGD momentum (sgd only)")
    scheduler: str = _opt("none", "learning-rate schedule; step multiplies the rate by --gamma "
                          "after every epoch", choices=SCHEDULERS)
    gamma: float = _opt(0.7, "StepLR factor applied after each epoch (with --scheduler step)")
    batch_size: int = _opt(64, "training batch size")
    test_batch_size: int = _opt(1000, "test batch size (does not change results)")
    epochs: int = _opt(10, "number of epochs to train")
    seed: int = _opt(1, "random seed for python, numpy and torch (CUDA too) and the data order")
    # Data pipeline.
    loader: str = _opt("tensor", "tensor: whole dataset as tensors on the device, batches are "
                       "slices; dataloader: the guide's torch DataLoader with PIL transforms",
                       choices=LOADERS)
    num_workers: int = _opt(4, "DataLoader worker processes (--loader dataloader)")
    pin_memory: bool | None = _opt(None, "pin host memory for faster copies to the GPU "
                                   "(--loader dataloader); default: on when training on CUDA")
    # Device and reproducibility.
    device: str = _opt("auto", "auto picks the available accelerator (torch.accelerator), "
                       "else the CPU", choices=DEVICES)
    deterministic: bool = _opt(False, "use only deterministic algorithms (torch, cuDNN, cuBLAS)")
    threads: int | None = _opt(None, "torch CPU threads, like OMP_NUM_THREADS; set it when "
                               "several jobs share a machine (default: torch's choice)")
    cuda_launch_blocking: bool = _opt(False, "set CUDA_LAUNCH_BLOCKING=1 so CUDA errors point "
                                      "at the failing call")
    detect_anomaly: bool = _opt(False, "autograd anomaly detection: name the operation whose "
                                "backward produced NaN (slow; for debugging)")
    # Output.
    log_interval: int = _opt(10, "batches between log lines")
    save_interval: int = _opt(10, "batches between checkpoints (0: only at the end of each "
                              "epoch)")
    keep: int = _opt(0, "also keep the checkpoints of the last N epochs as epoch-NNN.pt")
    save_model: bool = _opt(False, "also write the final weights as model.pt and "
                            "model.safetensors in the run directory")
    run_dir: str | None = _opt(None, "run directory (default: runs/<date-time>-<dataset>-"
                               "<model>)")
    resume: str | None = _opt(None, "resume from PATH (a checkpoint or run directory), or "
                              "with no PATH from last.pt in --run-dir, else in the newest run "
                              "under runs/; default: start a new run")
    json: bool = _opt(False, "print a JSON summary as the last line on stdout")
    dry_run: bool = _opt(False, "run the whole pipeline quickly on a small synthetic dataset "
                         "made in memory, one epoch unless --epochs is given (offline, never "
                         "touches the data directory)")

    @classmethod
    def for_recipe(cls, recipe: str = "guide", **overrides: Any) -> TrainConfig:
        """A recipe's config with some values changed: `TrainConfig.for_recipe("official",
        epochs=1)`. (A bare `TrainConfig(...)` starts from the guide's values.)"""
        return resolve({"recipe": recipe, **overrides})

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
        # Its checkpoint is 14 MB (1.2M parameters plus Adadelta's two buffers each); writing
        # one every 10 batches costs about 15% of an epoch on 2 CPU cores.
        "save_interval": 100,
    },
}

# Keys that change what a run computes. Resuming with a different value would not continue the
# same run, so it is refused. Every other key (epochs, logging, output, workers) may change.
RESULT_KEYS = (
    "recipe", "dataset", "model", "optimizer", "lr", "momentum", "scheduler", "gamma", "batch_size",
    "seed", "loader", "deterministic", "dry_run",
)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def default_for(name: str, recipe: str = "guide") -> Any:
    """The value `name` takes under `recipe` when the user does not set it."""
    if name in RECIPES[recipe]:
        return RECIPES[recipe][name]
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


def resolve(explicit: dict[str, Any], saved: dict[str, Any] | None = None) -> TrainConfig:
    """Build the config from the values a user set explicitly, filling the rest from the
    recipe, or, when resuming, from the `saved` config of the checkpoint."""
    unknown = set(explicit) - set(field_names())
    if unknown:
        raise UsageError(f"unknown config keys: {', '.join(sorted(unknown))}")
    if saved is not None:
        base = {k: v for k, v in saved.items() if k in field_names()}
    else:
        recipe = explicit.get("recipe", "guide")
        if recipe not in RECIPES:
            raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        base = dict(RECIPES[recipe])
        if explicit.get("dry_run") and "epochs" not in explicit:
            base["epochs"] = 1  # a dry run checks the pipeline, one short epoch is enough
    config = TrainConfig(**{**base, **explicit})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Reject values that cannot work, with one sentence naming the setting."""
    for name in dataclasses.fields(config):
        choices = name.metadata.get("choices")
        value = getattr(config, name.name)
        if choices and value not in choices:
            raise UsageError(f"--{_flag(name.name)} must be one of {', '.join(choices)}, "
                             f"not {value!r}")
    positive = {"batch_size": config.batch_size, "test_batch_size": config.test_batch_size,
                "epochs": config.epochs, "log_interval": config.log_interval}
    if config.threads is not None:
        positive["threads"] = config.threads
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"--{_flag(name)} must be at least 1, not {value}")
    for name in ("save_interval", "num_workers", "keep"):
        if getattr(config, name) < 0:
            raise UsageError(f"--{_flag(name)} must not be negative, not {getattr(config, name)}")
    if not config.lr > 0:
        raise UsageError(f"--lr must be positive, not {config.lr}")
    if config.momentum < 0:
        raise UsageError(f"--momentum must not be negative, not {config.momentum}")
    if not config.gamma > 0:
        raise UsageError(f"--gamma must be positive, not {config.gamma}")


def _flag(name: str) -> str:
    return name.replace("_", "-")
