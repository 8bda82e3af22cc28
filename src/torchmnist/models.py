"""The networks, with the parameter names of the scripts they come from.

Keeping `conv1`, `conv2`, `fc1`, `fc2` (and the dropout modules' names) means a `state_dict`
saved by the guide's script or the official PyTorch example loads here as is, and back.
Both return log-probabilities, so the loss is `F.nll_loss`, as in the originals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GuideNet(nn.Module):
    """The network of "Grokking PyTorch": two 5x5 convolutions, 21,840 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()  # drops whole feature maps, p=0.5
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, 10, 12, 12)
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))  # (B, 20, 4, 4)
        x = x.flatten(1)  # (B, 320)
        x = F.relu(self.fc1(x))  # (B, 50)
        return F.log_softmax(self.fc2(x), dim=1)  # (B, 10)


class OfficialNet(nn.Module):
    """The network of the official PyTorch MNIST example: two 3x3 convolutions, 1.2M
    parameters, most of them in fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.relu(self.conv1(x))  # (B, 32, 26, 26)
        x = F.relu(self.conv2(x))  # (B, 64, 24, 24)
        x = self.dropout1(F.max_pool2d(x, 2))  # (B, 64, 12, 12)
        x = x.flatten(1)  # (B, 9216)
        x = self.dropout2(F.relu(self.fc1(x)))  # (B, 128)
        return F.log_softmax(self.fc2(x), dim=1)  # (B, 10)


MODELS: dict[str, type[nn.Module]] = {"guide": GuideNet, "official": OfficialNet}


def build(name: str) -> nn.Module:
    return MODELS[name]()


def matching_model(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the model whose parameters have exactly these names and shapes, if any."""
    for name, model_class in MODELS.items():
        expected = model_class().state_dict()
        if expected.keys() == state_dict.keys() and all(
                expected[k].shape == state_dict[k].shape for k in expected):
            return name
    return None
