"""The networks, with the parameter names of the scripts they come from.

Keeping `conv1`, `conv2`, `fc1`, `fc2` (and the dropout modules' names) means a `state_dict`
saved by the guide's script or the official PyTorch example loads here as is, and back.
All return log-probabilities, so the loss is `F.nll_loss`, as in the originals.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from torchmnist.errors import UsageError


class GuideNet(nn.Module):
    """The network of "Grokking PyTorch": two 5x5 convolutions, 21,840 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()  # drops whole feature maps, p=0.5
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, 10, 12, 12)
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))  # (B, 20, 4, 4)
        x = x.flatten(1)  # (B, 320)
        x = F.relu(self.fc1(x))  # (B, 50)
        return F.log_softmax(self.fc2(x), dim=1)  # (B, classes)


class OfficialNet(nn.Module):
    """The network of the official PyTorch MNIST example: two 3x3 convolutions, 1.2M
    parameters, most of them in fc1."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.relu(self.conv1(x))  # (B, 32, 26, 26)
        x = F.relu(self.conv2(x))  # (B, 64, 24, 24)
        x = self.dropout1(F.max_pool2d(x, 2))  # (B, 64, 12, 12)
        x = x.flatten(1)  # (B, 9216)
        x = self.dropout2(F.relu(self.fc1(x)))  # (B, 128)
        return F.log_softmax(self.fc2(x), dim=1)  # (B, classes)


class FastNet(nn.Module):
    """The quickest network to 99% on a CPU with native bf16 (docs/benchmarks.md): the guide's
    two 5x5 convolutions, wider (16 and 48 channels suit the vector units), BatchNorm instead of
    dropout, pooling *before* BatchNorm and ReLU (a quarter of the pixels). 27,418 parameters."""

    def __init__(self, num_classes: int = 10, first: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, first, kernel_size=5, bias=False)  # BatchNorm has the bias
        self.bn1 = nn.BatchNorm2d(first)
        self.conv2 = nn.Conv2d(first, 48, kernel_size=5, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.fc = nn.Linear(48 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))  # (B, first, 12, 12)
        x = F.relu(self.bn2(F.max_pool2d(self.conv2(x), 2)))  # (B, 48, 4, 4)
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)  # (B, classes)


class NarrowFastNet(FastNet):
    """FastNet with 8 channels in its first convolution: the fast recipe's network on CPUs
    that compute in fp32 only (AVX2), where it trains 1.6 times as many images a second as
    FastNet (fp32, batch 128) and still averages 99% in 0.85 epochs. 17,602 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes, first=8)


class BestNet(nn.Module):
    """A wider network for the highest accuracy (--recipe best): three stages of 3x3
    convolutions with BatchNorm, 28 -> 14 -> 7 -> 1 pixels. 131,690 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stage1 = nn.Sequential(conv(1, 32, 5), nn.MaxPool2d(2))  # (B, 32, 14, 14)
        self.stage2 = nn.Sequential(conv(32, 64), conv(64, 64), nn.MaxPool2d(2))  # (B, 64, 7, 7)
        self.stage3 = nn.Sequential(conv(64, 128), nn.AdaptiveMaxPool2d(1))  # (B, 128, 1, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)  # (B, classes)


class EarlyExitNet(nn.Module):
    """The guide's aside on dynamic control flow made useful: three stages, each with a head.
    Training returns the mean of the heads' log-probabilities, so F.nll_loss trains them all. In
    eval mode an image leaves at the first head sure to `exit_threshold`; `exits` counts where,
    `MACS` is each exit's cost. 40,206 parameters."""

    data_dependent = True  # eval takes a different path per batch: no CUDA graph holds it
    # Multiply-accumulates to leave at each head, the stages summed: 24*24*16*25 + 256*10,
    # + 8*8*32*16*25 + 512*10, + 4*4*64*32*9 + 64*10.
    MACS = (232_960, 232_960 + 824_320, 232_960 + 824_320 + 295_552)

    def __init__(self, num_classes: int = 10, exit_threshold: float = 0.9) -> None:
        super().__init__()
        self.exit_threshold = exit_threshold
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.head1 = nn.Linear(16 * 4 * 4, num_classes)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.head2 = nn.Linear(32 * 4 * 4, num_classes)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.head3 = nn.Linear(64, num_classes)
        self.exits = [0, 0, 0]  # images that left at each head (eval)

    def _stage1(self, x):  # (B, 1, 28, 28) -> (B, 16, 12, 12), and head 1 on a 4x4 summary
        x = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return x, F.log_softmax(self.head1(F.max_pool2d(x, 3).flatten(1)), dim=1)

    def _stage2(self, x):  # -> (B, 32, 4, 4)
        x = F.relu(self.bn2(F.max_pool2d(self.conv2(x), 2)))
        return x, F.log_softmax(self.head2(x.flatten(1)), dim=1)

    def _stage3(self, x):  # -> (B, 64, 4, 4)
        x = F.relu(self.bn3(self.conv3(x)))
        return x, F.log_softmax(self.head3(x.amax((2, 3))), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        if self.training or self.exit_threshold >= 1:
            x, out1 = self._stage1(x)
            x, out2 = self._stage2(x)
            _, out3 = self._stage3(x)
            if self.training:
                return (out1 + out2 + out3) / 3  # nll of this = the mean of the heads' nll
            if not torch.compiler.is_compiling():  # (while exporting, the batch stays free)
                self.exits[2] += len(x)
            return out3  # the whole network (what an exported file holds)
        # Each stage runs only on the images no earlier head was sure of. Which ones those
        # are depends on the data, so this waits for the device once per stage.
        out = torch.empty(len(x), self.head3.out_features, device=x.device)
        remaining = torch.arange(len(x), device=x.device)
        for head, stage in enumerate((self._stage1, self._stage2, self._stage3)):
            x, log_p = stage(x)
            done = log_p.float().exp().amax(1) >= (self.exit_threshold if head < 2 else 0)
            out[remaining[done]] = log_p[done].float()
            self.exits[head] += int(done.sum())
            x, remaining = x[~done], remaining[~done]
            if len(remaining) == 0:
                break
        return out


MODELS: dict[str, type[nn.Module]] = {"guide": GuideNet, "official": OfficialNet,
                                      "fast": FastNet, "fast-narrow": NarrowFastNet,
                                      "best": BestNet,
                                      "early-exit": EarlyExitNet}


def build(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh network: a built-in one by name, with `num_classes` outputs, or your own by
    import path (`package.module:Class`, a class whose constructor takes no arguments)."""
    if name in MODELS:
        return MODELS[name](num_classes)
    network_class = import_model(name)
    try:
        return network_class()
    except Exception as error:  # noqa: BLE001 - the user's constructor may fail in any way
        kind = type(error).__name__
        raise UsageError(f"--model {name}: {network_class.__name__}() failed ({kind}: "
                         f"{error}); an imported model is made with no arguments") from None


def is_import_path(name: str) -> bool:
    return ":" in name


def import_path(network_class: type) -> str:
    """How the config records your own network: package.module:Class."""
    return f"{network_class.__module__}:{network_class.__qualname__}"


def import_model(path: str) -> type[nn.Module]:
    """The nn.Module class an import path names, or one sentence saying why not."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--model {path!r} is neither a built-in model ({', '.join(MODELS)}) "
                         "nor an import path such as mypackage.nets:MyNet")
    try:
        found = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - whatever importing the user's module raises
        raise UsageError(f"--model {path}: cannot import {module_name} "
                         f"({type(error).__name__}: {error})") from None
    for part in attribute.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise UsageError(f"--model {path} does not name an nn.Module class")
    return found


def check_output(network: nn.Module, x: torch.Tensor, classes: int) -> None:
    """Refuse, in one sentence, a network that does not map (B, 1, 28, 28) images to (B,
    classes) log-probabilities, which the loss (F.nll_loss, as in the guide) expects."""
    training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(x[:2])
    except Exception as error:  # noqa: BLE001 - the user's forward may fail in any way
        raise UsageError(f"the model fails on a batch of (2, 1, 28, 28) images: "
                         f"{type(error).__name__}: {error}") from None
    finally:
        network.train(training)
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (len(x[:2]), classes)):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the model must return ({len(x[:2])}, {classes}) log-probabilities "
                         f"for ({len(x[:2])}, 1, 28, 28) images, not {shape}")
    if not torch.allclose(out.float().exp().sum(1), torch.ones(len(out), device=out.device),
                          atol=1e-3):
        raise UsageError("the model must return log-probabilities (end its forward with "
                         "F.log_softmax(x, dim=1), as the guide's network does): the loss is "
                         "F.nll_loss")


def matching_model(state_dict: dict[str, torch.Tensor], num_classes: int = 10) -> str | None:
    """The name of the model whose parameters have exactly these names and shapes, if any."""
    for name, model_class in MODELS.items():
        expected = model_class(num_classes).state_dict()
        if expected.keys() == state_dict.keys() and all(
                expected[k].shape == state_dict[k].shape for k in expected):
            return name
    return None
