"""The search behind the fast-gpu recipe, run on a GPU: time to 99% test accuracy of variants of
the fast network's recipe, every step replayed from a CUDA graph.

Stage 1 runs each variant with a few seeds; stage 2 reruns the quickest variants that reached
99% with every seed, with more seeds. Every run is a whole `torchmnist train` (setup and graph
capture outside the clock, as `torchmnist bench` reports them), stopping at 99%.

    python benchmarks/gpu_search.py --data-dir ../shared/data --seeds 3 --final-seeds 10
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

from torchmnist import data
from torchmnist.commands import bench
from torchmnist.config import resolve
from torchmnist.runtime import devices

# label -> values over the fast-gpu recipe; the test runs about 8 times an epoch.
VARIANTS = {
    "fast-gpu as it was (512, lr 0.4, 2 ep, bf16, channels-last)": {},
    "512, fp32 (TF32 convolutions), NCHW": {"amp": "none", "channels_last": False},
    "512, lr 0.4, 1.5 ep, fp32, NCHW": {"epochs": 1.5, "amp": "none", "channels_last": False},
    "512, lr 0.6, 2 ep, fp32, NCHW": {"lr": 0.6, "amp": "none", "channels_last": False},
    "1024, lr 0.8, 3 ep, fp32, NCHW": {"batch_size": 1024, "lr": 0.8, "epochs": 3,
                                       "amp": "none", "channels_last": False},
    "256, lr 0.3, 1.5 ep, fp32, NCHW": {"batch_size": 256, "lr": 0.3, "epochs": 1.5,
                                        "amp": "none", "channels_last": False},
    "256, lr 0.2, 1 ep, fp32, NCHW": {"batch_size": 256, "lr": 0.2, "epochs": 1,
                                      "amp": "none", "channels_last": False},
    "256, lr 0.3, 1.25 ep, bf16, channels-last": {"batch_size": 256, "lr": 0.3,
                                                  "epochs": 1.25},
    "128, lr 0.2, 1 ep, fp32, NCHW": {"batch_size": 128, "lr": 0.2, "epochs": 1,
                                      "amp": "none", "channels_last": False},
}


def measure(label: str, values: dict, seeds: range, args) -> dict:
    batch = values.get("batch_size", 512)
    every = max(5, round(60000 / batch / 8))  # steps between tests
    config = resolve({"recipe": "fast-gpu", "target_accuracy": 0.99,
                      "eval_interval": f"{every}s", "data_dir": args.data_dir,
                      "device": args.device, **values})
    runs = [bench.time_to_accuracy(config, seed) for seed in seeds]
    seconds = [r["target_seconds"] if r["target_seconds"] is not None else r["train_seconds"]
               for r in runs]
    row = {"label": label, "values": values, "seeds": list(seeds),
           "accuracy": [r["test_accuracy"] for r in runs], "seconds": seconds,
           "reached": sum(r["target_seconds"] is not None for r in runs),
           "warmup_seconds": statistics.median(r["warmup_seconds"] for r in runs),
           "steps": [r["steps"] for r in runs]}
    print(f"{label:<58} {row['reached']:>2}/{len(runs)} reached, mean "
          f"{statistics.mean(row['accuracy']):.2%} (min {min(row['accuracy']):.2%}), median "
          f"{statistics.median(seconds):.3f} s (max {max(seconds):.3f}), median steps "
          f"{statistics.median(row['steps']):.0f}, capture {row['warmup_seconds']:.2f} s",
          flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--final-seeds", type=int, default=10)
    parser.add_argument("--finalists", type=int, default=2)
    parser.add_argument("--out", help="also write every row as JSON lines here")
    args = parser.parse_args()
    data.load = functools.lru_cache(data.load)  # read the files once, not once a run
    device = devices.resolve_device(args.device)
    print(bench.describe(bench.environment(device)))
    print(f"\nstage 1: {args.seeds} seeds each")
    rows = [measure(label, values, range(1, args.seeds + 1), args)
            for label, values in VARIANTS.items()]
    complete = sorted((r for r in rows if r["reached"] == len(r["seeds"])),
                      key=lambda r: statistics.median(r["seconds"]))
    print(f"\nstage 2: the {args.finalists} quickest that always reached 99%, "
          f"{args.final_seeds} seeds each (seeds 101 on)")
    final = [measure(r["label"], r["values"], range(101, 101 + args.final_seeds), args)
             for r in complete[:args.finalists]]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for row in rows + final:
                f.write(json.dumps({"stage": 2 if row in final else 1, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
