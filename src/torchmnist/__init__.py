"""torchmnist: the "Grokking PyTorch" MNIST pipeline as an installable package.

    import torchmnist
    summary = torchmnist.train(torchmnist.TrainConfig(epochs=1))
    result = torchmnist.evaluate(summary["checkpoint"])
"""

__version__ = "0.1.0"

from torchmnist.config import TrainConfig  # noqa: E402
from torchmnist.errors import TorchMnistError, TrainingError, UsageError  # noqa: E402
from torchmnist.evaluate import evaluate  # noqa: E402
from torchmnist.train import train  # noqa: E402

__all__ = ["TrainConfig", "TorchMnistError", "TrainingError", "UsageError", "__version__",
           "evaluate", "train"]
