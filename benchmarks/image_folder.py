"""MNIST as an image folder (--dataset folder:PATH) against MNIST from its IDX files.

Writes the 70,000 MNIST images as PNGs in torchvision's ImageFolder layout (train/<digit>/,
test/<digit>/) in a temporary folder, times reading that folder (decoding every PNG, then again
from torchmnist's cache of decoded folders, kept in the same temporary folder) against reading
the IDX files, checks that the pixels are the same, and trains the fast recipe on both for the
same seeds (their setup reads the folder from the cache). The two differ only in the
normalisation (measured on the folder's images, against MNIST's published 0.1307/0.3081) and in
the order of the training images (sorted by class in the folder), so the accuracies should
agree within seed-to-seed noise. Prints the numbers with the hardware and torch version.

    python benchmarks/image_folder.py --data-dir ../shared/data --seeds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import torchmnist
from torchmnist import data
from torchmnist.commands import bench
from torchmnist.runtime import devices


def write_folder(digits: data.DigitData, root: Path) -> None:
    for split in ("train", "test"):
        part = getattr(digits, split)
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(part.images, part.labels, strict=True)):
            Image.fromarray(image.numpy()).save(root / split / str(int(label)) / f"{i:05d}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset root for MNIST (default: torchmnist's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = devices.resolve_device(args.device)
    print(bench.describe(bench.environment(device)))
    print(f"fast recipe, seeds 1-{args.seeds}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        start = time.perf_counter()
        mnist = data.load("mnist", args.data_dir, download=False)
        idx_seconds = time.perf_counter() - start
        write_folder(mnist, root / "mnist-png")
        os.environ["TORCHMNIST_CACHE_DIR"] = str(root / "cache")
        start = time.perf_counter()
        pngs = data.load_folder(root / "mnist-png")  # decodes every file, and keeps them
        png_seconds = time.perf_counter() - start
        start = time.perf_counter()
        cached = data.load_folder(root / "mnist-png")
        cached_seconds = time.perf_counter() - start
        assert torch.equal(cached.train.images, pngs.train.images)
        print(f"reading: IDX files {idx_seconds:.2f} s, 70,000 PNGs {png_seconds:.2f} s "
              f"decoded, {cached_seconds:.2f} s from the cache; measured mean "
              f"{pngs.spec.mean:.4f}, std {pngs.spec.std:.4f} (MNIST's: 0.1307, 0.3081)")
        same = all(sorted(map(bytes, getattr(pngs, s).images.numpy()))
                   == sorted(map(bytes, getattr(mnist, s).images.numpy()))
                   for s in ("train", "test"))
        print(f"same images as the IDX files (as sets): {same}")
        for name, dataset in (("IDX files", "mnist"), ("image folder", f"folder:{root}/mnist-png")):
            runs = [torchmnist.train(torchmnist.TrainConfig(
                recipe="fast", dataset=dataset, data_dir=args.data_dir, seed=seed,
                device=args.device, quiet=True, run_dir=str(root / f"{name}-{seed}")))
                for seed in range(1, args.seeds + 1)]
            accuracies = [r["test_accuracy"] for r in runs]
            print(f"  {name:<14} mean {100 * statistics.mean(accuracies):.2f}% ("
                  + ", ".join(f"{100 * a:.2f}" for a in accuracies) + "), setup median "
                  f"{statistics.median(r['setup_seconds'] for r in runs):.1f} s, training "
                  f"median {statistics.median(r['train_seconds'] for r in runs):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
