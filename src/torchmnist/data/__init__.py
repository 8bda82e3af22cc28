"""The data: the MNIST family's files (datasets), your own images (own), the two batch loaders
(loaders), the image cache, turning photos into MNIST images (preprocess), and augmentation.

`torchmnist.data.load`, `.OwnData` and the other public names of those modules are found here
too, imported when first used: `preprocess` needs only NumPy and Pillow, not torch."""

import importlib

_MODULES = ("datasets", "own", "loaders")


def __getattr__(name: str):
    for module in _MODULES:
        found = importlib.import_module(f"torchmnist.data.{module}")
        if not name.startswith("_") and hasattr(found, name):
            return getattr(found, name)
    raise AttributeError(f"module 'torchmnist.data' has no attribute {name!r}")
