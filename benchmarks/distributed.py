"""One process against N processes under torchrun, on this machine.

Trains the same recipe, for the same seeds, as one process (with every core) and as N torchrun
processes (each with cores / N threads: torchrun's OMP_NUM_THREADS=1 on a 2-core machine), and
prints the training time (`train_seconds`: steps and tests, not start-up), the whole wall time
of the command (start-up, data loading and process-group set-up included) and the test
accuracy, with the hardware and torch version.

    python benchmarks/distributed.py --data-dir ../shared/data --seeds 3 --recipe fast
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torchmnist.commands import bench
from torchmnist.runtime import devices


def run(command: list[str], env: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset root for MNIST (default: torchmnist's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = devices.resolve_device(args.device)
    print(bench.describe(bench.environment(device)))
    print(f"{args.recipe} recipe, seeds 1-{args.seeds}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(args.nproc), "-m", "torchmnist"]
    single = [sys.executable, "-m", "torchmnist"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    rows = {"1 process": [], f"{args.nproc} processes (torchrun)": []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(1, args.seeds + 1):
            for (name, results), launcher in zip(rows.items(), (single, torchrun), strict=True):
                flags = ["train", "--recipe", args.recipe, "--seed", str(seed), "--device",
                         args.device, "--json", "--quiet", "--run-dir",
                         str(Path(folder) / f"{len(results)}-{name[0]}")]
                if args.data_dir:
                    flags += ["--data-dir", args.data_dir]
                summary, wall = run(launcher + flags, env)
                results.append((summary["train_seconds"], wall, summary["test_accuracy"]))
                print(f"  seed {seed}, {name}: {summary['train_seconds']:.2f} s training, "
                      f"{wall:.1f} s wall, {100 * summary['test_accuracy']:.2f}%", flush=True)
    print("\n| run | training s (median) | wall s (median) | test accuracy (mean) |")
    print("|---|---|---|---|")
    for name, results in rows.items():
        train_s, wall_s, accuracy = zip(*results, strict=True)
        print(f"| {name} | {statistics.median(train_s):.2f} | {statistics.median(wall_s):.1f} | "
              f"{100 * statistics.mean(accuracy):.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
