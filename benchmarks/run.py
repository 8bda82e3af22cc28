"""The measurements behind docs/benchmarks.md, one named benchmark at a time.

    python benchmarks/run.py loaders   --data-dir ../shared/data   # guide recipe, per loader
    python benchmarks/run.py fast      --data-dir ../shared/data   # fast recipe, 5 seeds
    python benchmarks/run.py fast-gpu  --device cuda               # fast-gpu recipe, 10 seeds
    python benchmarks/run.py fast-gpu-variants --device cuda       # fewer kernels a step?
    python benchmarks/gpu_search.py --seeds 3 --final-seeds 10     # the fast-gpu search
    python benchmarks/peer_fast_mnist.py --device cuda --seeds 10  # the published peer
    python benchmarks/cpu_recipe.py --seeds 5 --data-dir ../shared/data  # fast beside the peer
    python benchmarks/run.py official  --data-dir ../shared/data   # the baseline to 99%
    python benchmarks/run.py fashion                               # fast recipe, Fashion-MNIST
    python benchmarks/run.py best      --data-dir ../shared/data   # best recipe, 3 seeds
    python benchmarks/run.py best-fashion                          # best recipe, Fashion-MNIST

Each prints the hardware, torch version, threads and number of trials with its numbers
(`torchmnist bench` does the measuring). Add --device cuda on a GPU machine.
"""

from __future__ import annotations

import argparse
import sys

from torchmnist.commands import bench
from torchmnist.config import resolve

ALL_LOADERS = [("tensor", 0), ("premade", 0), ("dataloader", 0), ("dataloader", 2),
               ("dataloader", 4)]
TENSOR = [("tensor", 0), ("premade", 0)]  # the tensor loader and the bound no loader can beat

# name -> list of (label, config values, loaders to time, whole runs)
BENCHMARKS = {
    "loaders": [
        # One epoch of the guide recipe; checkpoints and log lines as the guide has them.
        ("guide, tensor loader", {"epochs": 1}, ALL_LOADERS, 3),
        ("guide, tensor loader, channels-last", {"epochs": 1, "channels_last": True},
         TENSOR, 3),
        ("guide, tensor loader, channels-last, bf16",
         {"epochs": 1, "channels_last": True, "amp": "bf16"}, TENSOR, 3),
        ("guide, DataLoader, 4 workers (the guide's)",
         {"epochs": 1, "loader": "dataloader", "num_workers": 4}, [], 3),
    ],
    "fast": [("fast recipe", {"recipe": "fast"}, [("tensor", 0), ("dataloader", 0),
                                                   ("dataloader", 2)], 5),
             ("fast recipe, seeds 6-10", {"recipe": "fast", "seed": 6}, [], 5),
             ("the fast recipe before: 1 epoch at lr 0.1",
              {"recipe": "fast", "epochs": 1, "lr": 0.1}, [], 5),
             ("the fast recipe before, compiled",
              {"recipe": "fast", "epochs": 1, "lr": 0.1, "compile": True}, [], 2)],
    # On a GPU (--device cuda): docs/benchmarks.md, "On an NVIDIA H100".
    "fast-gpu": [("fast-gpu recipe", {"recipe": "fast-gpu"}, [], 10),
                 ("fast-gpu recipe, stopping at 99%", {"recipe": "fast-gpu",
                                                       "target_accuracy": 0.99,
                                                       "eval_interval": "15s"}, [], 10),
                 ("fast recipe as it was then (1 epoch, lr 0.1), stopping at 99%",
                  {"recipe": "fast", "epochs": 1, "lr": 0.1, "target_accuracy": 0.99,
                   "eval_interval": "100s"}, [], 3)],
    # docs/benchmarks.md, "with CUDA graphs": the recipe against itself eager, and against the
    # bf16 channels-last variant it was before the GPU search.
    "fast-gpu-variants": [
        (f"fast-gpu recipe, stopping at 99%, {label}",
         {"recipe": "fast-gpu", "target_accuracy": 0.99, "eval_interval": "15s", **values},
         [], 10)
        for label, values in (("as it is", {}), ("eager", {"cuda_graph": False}),
                              ("bf16, channels-last", {"amp": "bf16",
                                                       "channels_last": True}))],
    "official": [("official recipe to 99%", {"recipe": "official", "target_accuracy": 0.99,
                                              "save_interval": 0}, [], 1)],
    "fashion": [("fast recipe, Fashion-MNIST (8 epochs at lr 0.1)",
                 {"recipe": "fast", "dataset": "fashion-mnist"}, [], 3)],
    "best": [("best recipe", {"recipe": "best"}, [], 3)],
    "best-fashion": [("best recipe, Fashion-MNIST", {"recipe": "best",
                                                     "dataset": "fashion-mnist"}, [], 3)],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("--data-dir", help="dataset root (default: torchmnist's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trials", type=int, default=3, help="throughput trials per loader")
    args = parser.parse_args()
    for label, values, loaders, runs in BENCHMARKS[args.name]:
        print(f"\n## {label}")
        config = resolve({**values, "data_dir": args.data_dir, "device": args.device})
        bench.run(config, loaders=loaders, steps=200, trials=args.trials, accuracy_trials=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
