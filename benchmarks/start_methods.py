"""The guide's DataLoader under each way Python starts its worker processes.

fork copies the running process (Linux up to Python 3.13); spawn starts a fresh interpreter
(macOS, Windows); forkserver forks from a clean server process (Linux from Python 3.14). spawn
and forkserver send each worker the dataset, so what it holds decides what crosses: torch
tensors go through shared memory. For each method this times, on MNIST's 60,000 training
images, the first training batch (the workers starting), the next `--batches` (workers that
are still taking in their copy of the dataset lag here) and the `--batches` after those (the
steady pace), `--repeats` times in fresh processes. Prints the numbers with the hardware and
torch version.

    python benchmarks/start_methods.py --data-dir ../shared/data --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import subprocess
import sys
import time

import torch

from torchmnist import data
from torchmnist.commands import bench


def measure(method: str, data_dir: str | None, workers: int, batches: int) -> dict:
    """In this process: the seconds of the first batch, the next `batches` batches and the
    `batches` after those."""
    multiprocessing.set_start_method(method, force=True)
    digits = data.load("mnist", data_dir, download=False)
    loader = data.LoaderBatches(digits.train, digits.spec, 64, torch.device("cpu"),
                                shuffle=True, seed=1, num_workers=workers)
    try:
        start = time.perf_counter()
        stream = loader.batches(1)
        next(stream)
        first = time.perf_counter() - start
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            for _ in itertools.islice(stream, batches):
                pass
            seconds.append(time.perf_counter() - start)
        return {"first_batch_s": first, "next_batches_s": seconds[0], "steady_s": seconds[1]}
    finally:
        loader.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset root for MNIST (default: torchmnist's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="fork,forkserver,spawn")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single measurement, as a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.data_dir, args.workers, args.batches)))
        return 0
    print(bench.describe(bench.environment(torch.device("cpu"))))
    print(f"DataLoader, {args.workers} workers, batch 64; median of {args.repeats} fresh "
          "processes")
    print(f"{'start method':<14}{'first batch s':>14}{f'next {args.batches} batches s':>22}"
          f"{f'the {args.batches} after s':>20}")
    for method in args.methods.split(","):
        runs = []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "--one", method, "--workers", str(args.workers),
                       "--batches", str(args.batches)]
            if args.data_dir:
                command += ["--data-dir", args.data_dir]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout))
        first, rest, steady = (statistics.median(r[key] for r in runs)
                               for key in ("first_batch_s", "next_batches_s", "steady_s"))
        print(f"{method:<14}{first:>14.2f}{rest:>22.2f}{steady:>20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
