"""Stand-ins for the two scripts torchmnist must stay compatible with, written independently of
torchmnist: the guide's ("Grokking PyTorch") and the official PyTorch MNIST example's.

Each trains its own network class with torchvision's MNIST dataset and DataLoader, measures test
accuracy with its own test loop, and saves `model.state_dict()` the way the original does. The
tests then check that `torchmnist test` loads that file and reports the same accuracy.

    python tests/reference_scripts.py guide|official DATA_ROOT OUT_FILE [--batches N]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class GuideScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.view(-1, 320)))
        return F.log_softmax(self.fc2(x), dim=1)


class OfficialScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("script", choices=["guide", "official"])
    parser.add_argument("data_root")
    parser.add_argument("out")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(1)
    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.1307,), (0.3081,))])
    train_data = datasets.MNIST(args.data_root, train=True, transform=transform)
    test_data = datasets.MNIST(args.data_root, train=False, transform=transform)
    train_loader = DataLoader(train_data, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_data, batch_size=1000)

    if args.script == "guide":
        model = GuideScriptNet()
        optimiser = optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    else:
        model = OfficialScriptNet()
        optimiser = optim.Adadelta(model.parameters(), lr=1.0)

    model.train()
    for i, (x, y) in enumerate(train_loader):
        if i == args.batches:
            break
        optimiser.zero_grad()
        F.nll_loss(model(x), y).backward()
        optimiser.step()

    model.eval()
    test_loss, correct = 0.0, 0
    with torch.inference_mode():
        for x, y in test_loader:
            output = model(x)
            test_loss += F.nll_loss(output, y, reduction="sum").item()
            correct += output.argmax(1).eq(y).sum().item()
    torch.save(model.state_dict(), args.out)
    print(json.dumps({"correct": correct, "test_accuracy": correct / len(test_data),
                      "test_loss": test_loss / len(test_data)}))


if __name__ == "__main__":
    main()
