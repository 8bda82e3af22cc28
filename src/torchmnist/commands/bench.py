"""`torchmnist bench`: training and inference throughput per loader, and time to accuracy.

Every number is the median of N trials and is printed with the hardware, the torch version and
the thread count it was measured with. Throughput runs real training steps of the recipe
(its model, optimiser, precision, augmentation) through the real loaders; time to accuracy runs
the whole `torchmnist train` of the recipe once per seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import io
import itertools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchmnist import __version__, setup
from torchmnist import config as cfg
from torchmnist.errors import UsageError, counted
from torchmnist.evaluation import evaluate_model
from torchmnist.runtime import devices
from torchmnist.runtime.signals import Stopped, raise_if_stopped
from torchmnist.training import train, train_step, warm_up


def environment(device: torch.device) -> dict:
    # The host's CPU even when the numbers are a GPU's; bf16 is the measured device's.
    cpu = {"cpu": devices.cpu_name(), "cpu_extensions": devices.cpu_extensions(),
           "bf16": "native" if devices.bf16_native(device) else "emulated"}
    return {"hardware": devices.describe(device), "torch": str(torch.__version__),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "torchmnist": __version__, "commit": _commit(), **cpu}


def describe(env: dict) -> str:
    """The line every benchmark prints above its numbers: what they were measured on and with
    (`environment`'s fields)."""
    commit = f" at {env['commit']}" if env["commit"] else ""
    return (f"hardware: {env['hardware']}; torch {env['torch']}; python {env['python']}; "
            f"torchmnist {env['torchmnist']}{commit}")


def _commit() -> str | None:
    """The git commit torchmnist runs from (with "+changes" when the tree differs from it),
    as airbench records it beside its numbers; None outside a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


# Batches made before the clock starts: the model and optimiser alone, which no loader can beat.
PREMADE = "premade"


def parse_loaders(text: str) -> list[tuple[str, int]]:
    """"tensor,dataloader:2" -> [("tensor", 0), ("dataloader", 2)]."""
    variants = []
    for item in text.split(","):
        kind, _, workers = item.strip().partition(":")
        if (kind not in (*cfg.LOADERS, PREMADE) or (workers and not workers.isdigit())
                or (kind == PREMADE and workers)):
            raise UsageError(f"--loaders takes tensor, dataloader[:WORKERS] or premade, "
                             f"comma-separated, not {item!r}")
        variants.append((kind, int(workers or 0)))
    return variants


def _quietly(function, *args):
    # The runs print their usual log; a benchmark shows only its table.
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


class _Made:
    """Batches made in advance, offered the way a loader offers them."""

    def __init__(self, batches: list):
        self.made = batches

    def batches(self, epoch: int = 1, start: int = 0):
        return iter(self.made)


def _endless(loader):
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count(1):
        yield from loader.batches(epoch)


def throughput(config: cfg.TrainConfig, loader: str, workers: int, steps: int,
               warmup: int = 10, graph: bool = False) -> dict | None:
    """Training images/s, milliseconds a step and inference images/s for one loader, after
    `warmup` steps; with `graph`, the step (and test pass) replayed from CUDA graphs, or None
    where they cannot be captured."""
    raise_if_stopped()
    premade = loader == PREMADE
    with tempfile.TemporaryDirectory() as run_dir:
        # Many epochs, so that a per-step schedule never runs out during the timed steps.
        config = dataclasses.replace(config, loader="tensor" if premade else loader,
                                     num_workers=workers, epochs=10_000, run_dir=run_dir,
                                     resume=None, cuda_graph=graph)
        run = _quietly(setup.build, config)
        try:
            if graph:
                _quietly(warm_up, run)
                if run.graphed_step is None:
                    return None
            step = run.graphed_step or functools.partial(train_step, run)
            train_batches, test_batches = _endless(run.train_batches), run.test_batches
            if premade:
                train_batches = iter(list(itertools.islice(train_batches, warmup + steps)))
                test_batches = _Made(list(test_batches.batches()))
            run.model.train()
            for done, (x, y) in enumerate(itertools.islice(train_batches, warmup + steps)):
                if done == warmup:
                    devices.synchronize(run.device)
                    start = time.perf_counter()
                step(x, y)
            devices.synchronize(run.device)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            if run.graphed_test is not None and not premade:
                result = run.graphed_test()
            else:
                result = evaluate_model(run.tested_model, test_batches,
                                        channels_last=config.channels_last)
            infer_rate = result.total / (time.perf_counter() - start)
        finally:
            run.close()
            del run
            # Now: the next trial's forked loader workers must not inherit these CUDA graphs.
            gc.collect()
    return {"train_images_per_s": steps * config.batch_size / seconds,
            "ms_per_step": 1000 * seconds / steps, "test_images_per_s": infer_rate}


def time_to_accuracy(config: cfg.TrainConfig, seed: int) -> dict:
    """One whole training run of the recipe with this seed, in a temporary run directory."""
    raise_if_stopped()
    with tempfile.TemporaryDirectory() as run_dir:
        config = dataclasses.replace(config, seed=seed, run_dir=str(Path(run_dir) / "run"),
                                     resume=None, json=False)
        try:
            return _quietly(train, config)
        except Stopped as stopped:
            # Its checkpoint goes with the temporary folder: no --resume to offer.
            raise Stopped.with_nothing_kept(stopped.signum) from None


def run(config: cfg.TrainConfig, *, loaders: list[tuple[str, int]], steps: int, trials: int,
        accuracy_trials: int, out=None) -> dict:
    out = out or sys.stdout  # looked up now, so a redirected stdout is honoured
    device = devices.resolve_device(config.device)
    env = environment(device)
    data_name = "synthetic" if config.dry_run else config.dataset
    amp, precision = devices.precision(device, config.amp)
    config = dataclasses.replace(config, amp=amp)  # what every trial then trains in
    print(f"torchmnist bench: recipe {config.recipe}, model {config.model}, batch "
          f"{config.batch_size}, amp {config.amp}, {data_name} data", file=out)
    print(describe(env), file=out)
    print(precision, file=out)
    print(f"throughput: median of {counted(trials, 'trial')}; the resolved config is in the "
          "--json report",
          file=out)
    # The numbers beside everything that produced them: the whole resolved config.
    report = {"environment": env, "recipe": config.recipe, "precision": precision,
              "config": config.to_dict(),
              "trials": trials, "loaders": []}
    if loaders:
        print(f"\n{'loader':<16}{'step':<7}{'ms/step':>9}{'train img/s':>13}{'s/60k img':>11}"
              f"{'test img/s':>12}", file=out)
        # On CUDA every loader is timed twice: the eager step, and its CUDA-graph replay.
        modes = (False, True) if device.type == "cuda" else (False,)
        for kind, workers in loaders:
            for graph in modes:
                rates = [throughput(config, kind, workers, steps, graph=graph)
                         for _ in range(trials)]
                name = f"{kind}:{workers}" if kind == "dataloader" else kind
                if any(r is None for r in rates):
                    print(f"{name:<16}{'graph':<7}  (no CUDA graph for this configuration)",
                          file=out)
                    continue
                row = {key: statistics.median(r[key] for r in rates) for key in rates[0]}
                epoch_seconds = 60000 / row["train_images_per_s"]
                mode = "graph" if graph else "eager"
                print(f"{name:<16}{mode:<7}{row['ms_per_step']:>9.3f}"
                      f"{row['train_images_per_s']:>13,.0f}{epoch_seconds:>11.2f}"
                      f"{row['test_images_per_s']:>12,.0f}", file=out)
                report["loaders"].append({"loader": name, "step": mode, **row,
                                          "epoch_seconds_60k": epoch_seconds})
    if accuracy_trials:
        runs = [time_to_accuracy(config, config.seed + i) for i in range(accuracy_trials)]
        accuracies = [r["test_accuracy"] for r in runs]
        seconds = [r["target_seconds"] if r["target_seconds"] is not None else r["train_seconds"]
                   for r in runs]
        report["time_to_accuracy"] = {
            "seeds": [config.seed + i for i in range(accuracy_trials)],
            "test_accuracy": accuracies, "seconds": seconds,
            "mean_accuracy": statistics.mean(accuracies),
            "median_seconds": statistics.median(seconds),
            "target_accuracy": config.target_accuracy,
            "reached": [r["target_seconds"] is not None for r in runs]
            if config.target_accuracy else None,
        }
        print(f"\ntime to accuracy over {counted(accuracy_trials, 'seed')} "
              f"({counted(config.epochs, 'epoch')}"
              f"{f', stopping at {config.target_accuracy:.2%}' if config.target_accuracy else ''}"
              f"): mean test accuracy {statistics.mean(accuracies):.2%} (min {min(accuracies):.2%},"
              f" max {max(accuracies):.2%}), median {statistics.median(seconds):.2f} s of "
              f"training (min {min(seconds):.2f}, max {max(seconds):.2f})", file=out)
    return report
