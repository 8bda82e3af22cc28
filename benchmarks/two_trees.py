"""`torchmnist bench` of two source trees, interleaved, to tell whether a change moved speed.

Each round runs the same bench command once with each tree's `src/` first on PYTHONPATH, one
after the other, so that a slow minute of a shared machine falls on both alike; the medians of
the rounds and their ratio are printed with the hardware line each bench reports.

    git worktree add /tmp/before <commit>
    python benchmarks/two_trees.py /tmp/before . --rounds 3 -- \\
        --recipe fast --loaders tensor --trials 3 --steps 200 --accuracy-trials 1 \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def bench(tree: Path, flags: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve() / "src")}
    done = subprocess.run([sys.executable, "-m", "torchmnist", "bench", "--json", *flags],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def numbers(report: dict) -> dict[str, float]:
    """Images a second per loader (training), and seconds to the target accuracy."""
    found = {f"train img/s, {row['loader']} {row['step']}": row["train_images_per_s"]
             for row in report.get("loaders", [])}
    if "time_to_accuracy" in report:
        found["seconds to accuracy"] = report["time_to_accuracy"]["median_seconds"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: bench's flags
    seen: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    hardware = ""
    for round_ in range(1, args.rounds + 1):
        for name in ("before", "after"):
            report = bench(getattr(args, name), flags)
            env = report["environment"]
            hardware = f"{env['hardware']}, torch {env['torch']}"
            for key, value in numbers(report).items():
                seen[name].setdefault(key, []).append(value)
            print(f"round {round_} {name}: {json.dumps(numbers(report))}", flush=True)
    print(f"hardware: {hardware}")
    for key in seen["before"]:
        b, a = statistics.median(seen["before"][key]), statistics.median(seen["after"][key])
        print(f"{key}: before {b:.4g}, after {a:.4g} (after/before {a / b:.3f}; "
              f"median of {args.rounds})")


if __name__ == "__main__":
    main()
