"""torchmnist: the "Grokking PyTorch" MNIST pipeline as an installable package.

    import torchmnist
    result = torchmnist.train(torchmnist.TrainConfig(recipe="fast"))
    network = result.model  # the trained nn.Module; torchmnist.load(run_dir) gives it back
    # your own images: torchmnist.train(config, data=torchmnist.OwnData(train=(x, y), test=(x, y)))
    summary = torchmnist.evaluate(result["run_dir"])
    for p in torchmnist.predict(result["run_dir"], ["my_digit.jpg"]):
        print(p["file"], p["class"], p["probability"])
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

from torchmnist.config import TrainConfig  # noqa: E402
from torchmnist.errors import TorchMnistError, TrainingError, UsageError  # noqa: E402

# The calls that need torch are imported when first used, not with the package: importing
# torch takes about 1.7 s, which `torchmnist --version` and `--help` need not wait for, and
# without torch `torchmnist.data.preprocess` (NumPy and Pillow only) still works, for a program
# that runs an exported ONNX model with onnxruntime.
_LAZY = {
    "OwnData": ("torchmnist.data", "OwnData"),
    "evaluate": ("torchmnist.evaluation", "evaluate"),
    "export": ("torchmnist.commands.exporting", "export"),
    "load": ("torchmnist.trained", "load_network"),
    "predict": ("torchmnist.commands.prediction", "predict"),
    "report": ("torchmnist.commands.reporting", "report"),
    "train": ("torchmnist.training", "train"),
}

__all__ = ["TrainConfig", "TorchMnistError", "TrainingError", "UsageError", "__version__",
           *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'torchmnist' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
