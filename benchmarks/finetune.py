"""Fine-tuning between MNIST and Fashion-MNIST (--init-from, --freeze), against training from
scratch with the same budget.

For each direction, the fast recipe trains a source model (seed 1); then, for each seed, one
epoch of the fast recipe on the target dataset: from scratch, from the source's weights with
every layer training, and from the source's weights with its convolutional features frozen
(only the classifier, 7,690 of 27,418 parameters, trains). Prints test accuracy per seed and
the mean, with the hardware and torch version.

    python benchmarks/finetune.py --data-dir ../shared/data --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torchmnist
from torchmnist.commands import bench
from torchmnist.runtime import devices

FEATURES = "conv1,bn1,conv2,bn2"  # the fast network's convolutional part


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset root for MNIST (default: torchmnist's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = devices.resolve_device(args.device)
    print(bench.describe(bench.environment(device)))
    print(f"seeds 1-{args.seeds}; budget: 1 epoch of the fast recipe on the target")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)

        def train(name: str, **values) -> dict:
            config = torchmnist.TrainConfig(recipe="fast", data_dir=args.data_dir,
                                            device=args.device, quiet=True,
                                            run_dir=str(root / name), **values)
            return torchmnist.train(config)

        for source, target in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
            base = train(f"{source}-base", dataset=source, seed=1)
            print(f"\n{source} -> {target} (the {source} model: "
                  f"{100 * base['test_accuracy']:.2f}% on {source})")
            ways = {"from scratch": {},
                    "from its weights, all layers training": {"init_from": base["run_dir"]},
                    "from its weights, features frozen": {"init_from": base["run_dir"],
                                                          "freeze": FEATURES}}
            for way, (label, values) in enumerate(ways.items()):
                runs = [train(f"{source}-{target}-{way}-{seed}", dataset=target, epochs=1,
                              seed=seed, **values)
                        for seed in range(1, args.seeds + 1)]
                accuracies = [r["test_accuracy"] for r in runs]
                print(f"  {label:<40} mean {100 * statistics.mean(accuracies):.2f}% ("
                      + ", ".join(f"{100 * a:.2f}" for a in accuracies) + "), median "
                      f"{statistics.median(r['train_seconds'] for r in runs):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
