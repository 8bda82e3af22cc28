"""Kill a training run with SIGKILL at random moments, resume it each time, and check that it
ends with exactly the model an uninterrupted run produces, bit for bit (on the CPU).

    python scripts/crash_resume.py                      # tensor loader, dry-run data
    python scripts/crash_resume.py --loader dataloader --kills 6
    python scripts/crash_resume.py -- --data-dir ../shared/data --epochs 1   # real MNIST

Flags after `--` go to `torchmnist train` (default: a dry run of 30 short epochs with a
checkpoint every 3 batches). Exits 0 when the weights and the logged losses match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_TRAIN_FLAGS = ["--dry-run", "--epochs", "30", "--save-interval", "3",
                       "--log-interval", "4", "--device", "cpu"]


def _command(run_dir: Path, loader: str, train_flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torchmnist", "train", "--run-dir", str(run_dir),
            "--loader", loader, "--num-workers", "2", *train_flags]


def _losses(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["epoch"], r["step"], r["train_loss"], r["test_loss"]) for r in records]


def check(workdir: Path, *, loader: str = "tensor", kills: int = 4, seed: int = 0,
          train_flags: list[str] | None = None) -> dict:
    """Run the experiment in `workdir`; return what happened and whether the results match."""
    train_flags = train_flags or DEFAULT_TRAIN_FLAGS
    rng = random.Random(seed)

    reference = workdir / "uninterrupted"
    finished = subprocess.run(_command(reference, loader, [*train_flags, "--json"]), check=True,
                              capture_output=True, text=True)
    train_seconds = json.loads(finished.stdout.strip().splitlines()[-1])["train_seconds"]

    crashed = workdir / "crashed"
    last = crashed / "last.pt"
    kills_done, resumed_at = [], []
    while True:
        resume = ["--resume"] if last.exists() else []
        if resume:
            progress = torch.load(last, weights_only=True)["progress"]
            resumed_at.append([progress["epoch"], progress["batch"]])
        before = last.stat().st_mtime_ns if last.exists() else None
        process = subprocess.Popen(_command(crashed, loader, [*train_flags, *resume]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if len(kills_done) == kills:  # the last start runs to the end
            _, stderr = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"the final resume failed: {stderr.decode()}")
            break
        # Wait until this process has written a checkpoint of its own, so the kill lands in
        # training rather than in start-up, then at a random moment after that.
        while process.poll() is None and (
                not last.exists() or last.stat().st_mtime_ns == before):
            time.sleep(0.01)
        delay = rng.uniform(0, train_seconds / (kills + 1))  # leaves training for the next kill
        try:
            process.wait(timeout=delay)  # it may finish before its moment comes
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL: no handler runs, nothing is flushed
            process.wait()
        kills_done.append(round(delay, 2))

    ours = torch.load(crashed / "last.pt", weights_only=True)["model"]
    theirs = torch.load(reference / "last.pt", weights_only=True)["model"]
    weights_equal = ours.keys() == theirs.keys() and all(
        torch.equal(ours[k], theirs[k]) for k in ours)
    losses_equal = _losses(crashed) == _losses(reference)
    return {"loader": loader, "uninterrupted_train_seconds": train_seconds,
            "kill_seconds_after_a_checkpoint": kills_done, "resumed_at_epoch_batch": resumed_at,
            "weights_identical": weights_equal, "losses_identical": losses_equal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", choices=["tensor", "dataloader"], default="tensor")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs before the final resume")
    parser.add_argument("--seed", type=int, default=0, help="seed for the kill moments")
    parser.add_argument("train_flags", nargs="*", help="flags for torchmnist train (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = check(Path(workdir), loader=args.loader, kills=args.kills, seed=args.seed,
                       train_flags=args.train_flags or None)
    print(json.dumps(result))
    return 0 if result["weights_identical"] and result["losses_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
