"""The fast recipe on this CPU beside the published peer recipe, in one run, as a ratio.

For each seed, one after the other so that a slow minute of a shared machine falls on all of
them alike: the peer (tuomaso/train_mnist_fast's final recipe, `peer_fast_mnist.py`), then
`torchmnist train --recipe fast` as this CPU gets it (bf16 where native, else the fp32
variant), then each extra setting given with --also. Times are what each reports: the peer's
model creation + training + test pass, torchmnist's train_seconds (training and testing).

    python benchmarks/cpu_recipe.py --data-dir ../shared/data --seeds 5
    python benchmarks/cpu_recipe.py --data-dir ../shared/data --seeds 5 \\
        --also "model=fast,batch_size=64,lr=0.15,epochs=0.75,amp=none"

To see what a CPU without native bf16 does, on one that has it, cap torch's kernels at AVX2:
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_recipe.py ...` (the
hardware line then says "torch kernels AVX2, oneDNN capped at AVX2; bf16 emulated").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import peer_fast_mnist
import torch

from torchmnist import data
from torchmnist.commands import bench
from torchmnist.config import TrainConfig, coerce
from torchmnist.runtime import devices
from torchmnist.training import train


def settings(text: str) -> dict:
    """"model=fast,lr=0.15" -> {"model": "fast", "lr": 0.15}."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {name: coerce(name, value) for name, value in pairs}


def fast(data_dir: str | None, seed: int, extra: dict) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(TrainConfig(recipe="fast", device="cpu", data_dir=data_dir, seed=seed,
                                   run_dir=str(Path(run_dir) / "run"), quiet=True, **extra))
    return result["test_accuracy"], result["train_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset root (default: torchmnist's)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--also", action="append", default=[], metavar="NAME=VALUE,...",
                        help="another variant of the fast recipe to time beside it")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    tensors = peer_fast_mnist.prepared(data.load("mnist", args.data_dir, download=False), device)
    variants = {"fast": {}, **{text: settings(text) for text in args.also}}
    peer_fast_mnist.run(*tensors, seed=0)  # untimed: the first run pays for loading kernels
    fast(args.data_dir, 0, {})
    rows: dict[str, list[tuple[float, float]]] = {"peer": [], **{name: [] for name in variants}}
    for seed in range(1, args.seeds + 1):
        rows["peer"].append(peer_fast_mnist.run(*tensors, seed=seed))
        for name, extra in variants.items():
            rows[name].append(fast(args.data_dir, seed, extra))
    print(bench.describe(bench.environment(device)))
    print(devices.precision(device, TrainConfig(recipe="fast", device="cpu").amp)[1])
    print(f"seeds 1-{args.seeds}, interleaved; time: median (min-max)")
    peer_seconds = statistics.median(s for _, s in rows["peer"])
    for name, results in rows.items():
        accuracies, seconds = [a for a, _ in results], [s for _, s in results]
        median = statistics.median(seconds)
        label = "peer (tuomaso/train_mnist_fast, final)" if name == "peer" else \
            f"--recipe fast {name if name != 'fast' else ''}".strip()
        print(f"{label}: accuracy {statistics.mean(accuracies):.2%} mean (min "
              f"{min(accuracies):.2%}); {median:.2f} s ({min(seconds):.2f}-{max(seconds):.2f})"
              f"; the peer's time / this one's: {peer_seconds / median:.2f}")
    if args.json:
        print(json.dumps({"environment": bench.environment(device), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
