"""The design search behind --recipe fast: small CNNs trained for a fixed step budget on MNIST.

A standalone loop (the data as one normalised tensor, bf16 autocast, channels-last, SGD with
Nesterov momentum and a linear one-cycle schedule), so that candidate networks and settings can
be compared quickly. The numbers in docs/benchmarks.md came from runs like:

    python benchmarks/fast_search.py --arch 16-48 --batch-size 64 --epochs 1 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchmnist.data.augment import TTA_SHIFTS, shift


class Candidate(nn.Module):
    """conv k1 -> pool -> BN -> ReLU -> conv k2 -> pool -> BN -> ReLU -> linear (without
    BatchNorm the convolutions get their biases back)."""

    def __init__(self, w1: int, w2: int, k1: int = 5, k2: int = 5, pool_first: bool = True,
                 batchnorm: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda width: nn.Identity())
        self.c1, self.b1 = nn.Conv2d(1, w1, k1, bias=not batchnorm), norm(w1)
        self.c2, self.b2 = nn.Conv2d(w1, w2, k2, bias=not batchnorm), norm(w2)
        side = ((28 - k1 + 1) // 2 - k2 + 1) // 2
        self.fc, self.pool_first = nn.Linear(w2 * side * side, 10), pool_first

    def forward(self, x):
        for conv, bn in ((self.c1, self.b1), (self.c2, self.b2)):
            if self.pool_first:  # BN and ReLU on a quarter of the pixels
                x = F.relu(bn(F.max_pool2d(conv(x), 2)))
            else:
                x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        return self.fc(x.flatten(1))


def predict(model: nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Class scores; with `tta`, softmax averaged over the image and its 1-pixel shifts."""
    if not tta:
        return model(x)
    return sum(model(shift(x, dy, dx, -0.1307 / 0.3081)).float().softmax(1)
               for dy, dx in TTA_SHIFTS)


def load(root: Path, prefix: str):
    raw = root / "MNIST" / "raw"
    images = np.frombuffer((raw / f"{prefix}-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
    labels = np.frombuffer((raw / f"{prefix}-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    x = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()).float().div(255)
    x = x.sub(0.1307).div(0.3081).contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels.astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--arch", default="16-48", help="W1-W2[-K2] channels (and 2nd kernel)")
    parser.add_argument("--pool-last", action="store_true", help="BN and ReLU before pooling")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--no-bn", action="store_true", help="no BatchNorm (conv biases)")
    parser.add_argument("--schedule", choices=["linear", "cos", "constant"], default="linear",
                        help="one-cycle with linear (triangular) or cosine phases, or none")
    parser.add_argument("--tta", action="store_true", help="test on 5 shifted views")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    x_train, y_train = load(Path(args.data_dir), "train")
    x_test, y_test = load(Path(args.data_dir), "t10k")
    widths = [int(v) for v in args.arch.split("-")]
    accuracies, seconds = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        model = Candidate(widths[0], widths[1], k2=widths[2] if len(widths) > 2 else 5,
                          pool_first=not args.pool_last, batchnorm=not args.no_bn)
        model = model.to(memory_format=torch.channels_last)
        steps = int(args.epochs * len(y_train) / args.batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.2,
            anneal_strategy="cos" if args.schedule == "cos" else "linear", div_factor=10,
            final_div_factor=100) if args.schedule != "constant" else None
        order = torch.Generator().manual_seed(seed)
        start, step = time.perf_counter(), 0
        model.train()
        while step < steps:
            perm = torch.randperm(len(y_train), generator=order)
            for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
                if step == steps:
                    break
                index = perm[i:i + args.batch_size]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
                    loss = F.cross_entropy(model(x_train[index]), y_train[index],
                                           label_smoothing=args.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                step += 1
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=not args.no_bf16):
            correct = sum((predict(model, x_test[i:i + 2000], args.tta).argmax(1)
                           == y_test[i:i + 2000]).sum().item()
                          for i in range(0, len(y_test), 2000))
        seconds.append(time.perf_counter() - start)
        accuracies.append(correct / len(y_test))
    print(f"{vars(args)}: accuracy mean {statistics.mean(accuracies):.2%} "
          f"({', '.join(f'{a:.2%}' for a in accuracies)}), "
          f"{statistics.mean(seconds):.2f} s per run (training and testing), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
