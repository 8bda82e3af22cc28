"""torchmnist: the "Grokking PyTorch" MNIST pipeline as an installable package.

    import torchmnist
    result = torchmnist.train(torchmnist.TrainConfig(recipe="fast"))
    network = result.model  # the trained nn.Module; torchmnist.load(run_dir) gives it back
    # your own images: TrainConfig(dataset=torchmnist.OwnData(train=(x, y), test=(x, y)))
    summary = torchmnist.evaluate(result["run_dir"])
    for p in torchmnist.predict(result["run_dir"], ["my_digit.jpg"]):
        print(p["file"], p["class"], p["probability"])
"""

__version__ = "0.1.0"

from torchmnist.config import TrainConfig  # noqa: E402
from torchmnist.errors import TorchMnistError, TrainingError, UsageError  # noqa: E402

__all__ = ["TrainConfig", "TorchMnistError", "TrainingError", "UsageError", "__version__"]

try:
    import torch  # noqa: F401
except ImportError:
    # Without torch, `torchmnist.preprocess` (NumPy and Pillow only) still works: a program that
    # runs an exported ONNX model with onnxruntime prepares its images with it.
    pass
else:
    from torchmnist.checkpoint import load_network as load  # noqa: E402
    from torchmnist.data import OwnData  # noqa: E402
    from torchmnist.evaluation import evaluate  # noqa: E402
    from torchmnist.exporting import export  # noqa: E402
    from torchmnist.prediction import predict  # noqa: E402
    from torchmnist.reporting import report  # noqa: E402
    from torchmnist.training import train  # noqa: E402

    __all__ += ["OwnData", "evaluate", "export", "load", "predict", "report", "train"]
