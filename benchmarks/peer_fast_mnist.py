"""A published peer, timed beside torchmnist in the same run: the final recipe of
tuomaso/train_mnist_fast on GitHub ("99% on MNIST in 0.76 s" on a GTX 1660 Ti), written here
from its published description, not copied:

    network   conv 1->24 (5x5), max-pool 2, ReLU; conv 24->32 (3x3), max-pool 2, ReLU;
              fully connected 800 -> 256, ReLU, -> 10
    training  Adam, lr 1e-2, betas (0.7, 0.9); OneCycleLR over one epoch; batch 256; fp32
    data      the whole dataset on the device, normalised there, shuffled once: every run
              takes the same fixed order
    clock     model creation + training + the test pass

One untimed run first loads the GPU's kernels (the notebook is timed warm as well), then one
timed run per seed. Prints the hardware and torch version with the numbers.

    python benchmarks/peer_fast_mnist.py --data-dir ../shared/data --device cuda --seeds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from torchmnist import data
from torchmnist.commands import bench
from torchmnist.runtime import devices


class PeerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5)
        self.conv2 = nn.Conv2d(24, 32, 3)
        self.fc1 = nn.Linear(800, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, 24, 12, 12)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, 32, 5, 5)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # (B, 10)


def prepared(digits: data.DigitData, device: torch.device):
    """Both splits on the device, normalised; the training set in one fixed shuffled order."""
    spec = digits.spec

    def normalised(images):
        return ((images.to(device).float() / 255 - spec.mean) / spec.std).unsqueeze(1)

    order = torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(0))
    return (normalised(digits.train.images[order]), digits.train.labels[order].to(device),
            normalised(digits.test.images), digits.test.labels.to(device))


def run(train_x, train_y, test_x, test_y, seed: int, batch_size: int = 256) -> tuple[float,
                                                                                      float]:
    """(test accuracy, seconds) of one timed run."""
    device = train_x.device
    devices.synchronize(device)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = PeerNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.7, 0.9))
    steps = -(-len(train_y) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    model.train()
    for i in range(steps):
        x, y = train_x[i * batch_size:(i + 1) * batch_size], train_y[i * batch_size:(i + 1)
                                                                       * batch_size]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    with torch.inference_mode():
        correct = sum((model(x).argmax(1) == y).sum() for x, y in
                      zip(test_x.split(1000), test_y.split(1000), strict=True))
    accuracy = correct.item() / len(test_y)  # waits for the device
    return accuracy, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset root (default: torchmnist's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = devices.resolve_device(args.device)
    tensors = prepared(data.load("mnist", args.data_dir, download=False), device)
    run(*tensors, seed=0)  # untimed: loads the kernels
    results = [run(*tensors, seed=seed) for seed in range(1, args.seeds + 1)]
    accuracies, seconds = [r[0] for r in results], [r[1] for r in results]
    print(bench.describe(bench.environment(device)))
    print(f"peer recipe (tuomaso/train_mnist_fast, final): {args.seeds} seeds")
    print(f"mean test accuracy {statistics.mean(accuracies):.2%} (min {min(accuracies):.2%}, "
          f"max {max(accuracies):.2%}); median {statistics.median(seconds):.3f} s (min "
          f"{min(seconds):.3f}, max {max(seconds):.3f})")
    if args.json:
        print(json.dumps({"hardware": devices.describe(device), "torch": str(torch.__version__),
                          "accuracies": accuracies, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
