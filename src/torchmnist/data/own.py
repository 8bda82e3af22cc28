"""Your own data: tensors or a Dataset from Python, an image folder (--dataset folder:PATH),
and the small samples a dry run trains on."""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from torchmnist.data import cache, preprocess
from torchmnist.data.datasets import (
    DATASETS,
    FOLDER_PREFIX,
    IMAGE_SUFFIXES,
    OWN_PREFIX,
    DatasetSpec,
    DigitData,
    OwnData,
    Split,
    class_names_problem,
    load,
)
from torchmnist.data.loaders import epoch_order
from torchmnist.errors import UsageError

# ---- Your own data: tensors or a Dataset from Python, or an image folder (folder:PATH) --------

def _own_spec(name: str, train: Split, test: Split, classes: tuple[str, ...]) -> DatasetSpec:
    """Normalisation measured on the training images, as MNIST's 0.1307 and 0.3081 were."""
    # In float64 sums over chunks: exact enough, and never a float copy of the whole set.
    total = squares = 0.0
    for chunk in train.images.split(4096):
        values = chunk.to(torch.float64).div_(255)
        total, squares = total + float(values.sum()), squares + float(values.square().sum())
    n = train.images.numel()
    mean = total / max(n, 1)
    std = math.sqrt(max(squares / max(n, 1) - mean * mean, 0.0) * n / max(n - 1, 1))
    if not std > 0:
        raise UsageError(f"the training images of {name} are all the same grey: nothing to "
                         "learn from")
    crc = 0
    for tensor in (train.images, train.labels, test.images, test.labels):
        crc = zlib.crc32(tensor.contiguous().numpy().tobytes(), crc)
    return DatasetSpec(name, "", mean, std, classes, f"{crc:08x}", _edge_value(train.images))


def _edge_value(images: torch.Tensor) -> float:
    """The commonest value, in [0, 1], of the pixels on the edges of (N, 28, 28) uint8 images:
    what their empty background is."""
    edges = torch.cat([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]],
                      dim=1)  # (N, 108)
    return int(torch.bincount(edges.flatten(), minlength=256).argmax()) / 255


def _as_uint8(images: torch.Tensor, what: str) -> torch.Tensor:
    """(N, 28, 28) or (N, 1, 28, 28) images, uint8 or floats in [0, 1] -> (N, 28, 28) uint8."""
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise UsageError(f"{what} must be 28x28 grey images shaped (N, 28, 28) or "
                         f"(N, 1, 28, 28), not {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise UsageError(f"{what} must be uint8 (0-255) or floats in [0, 1], not "
                         f"{images.dtype}")
    if len(images) and not (images.min() >= 0 and images.max() <= 1):
        raise UsageError(f"{what} must hold floats in [0, 1] (give them before normalising: "
                         f"torchmnist normalises itself), not values from "
                         f"{float(images.min()):.3g} to {float(images.max()):.3g}")
    return images.mul(255).round_().to(torch.uint8)


def _picture(image: object, what: str) -> torch.Tensor:
    """One image a Dataset yielded (a PIL image, a tensor or an array) as (28, 28)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.array(image.convert("L"))
    picture = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.array(image))
    if picture.numel() != 28 * 28:
        raise UsageError(f"{what} yields an image shaped {tuple(picture.shape)}: give 28x28 "
                         "grey images (torchvision's transforms.Resize and Grayscale make them)")
    return picture.reshape(28, 28)


def to_split(part: object, what: str) -> Split:
    """A pair of tensors (images, labels) or a torch Dataset of (image, label) as a Split."""
    arrays = (torch.Tensor, np.ndarray)
    if (isinstance(part, tuple | list) and len(part) == 2
            and all(isinstance(v, arrays) for v in part)):
        images, labels = (torch.as_tensor(v).detach().cpu() for v in part)
    elif isinstance(part, Dataset) or (hasattr(part, "__getitem__") and hasattr(part, "__len__")
                                       and not isinstance(part, str | bytes | dict)):
        pairs = [part[i] for i in range(len(part))]
        if not pairs:
            raise UsageError(f"{what} is empty")
        if not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
            raise UsageError(f"{what} must yield (image, label) pairs")
        images = torch.stack([_picture(image, what) for image, _ in pairs])
        labels = torch.as_tensor([int(label) for _, label in pairs])
    else:
        raise UsageError(f"{what} must be a torch Dataset of (image, label) pairs or a pair of "
                         f"tensors (images, labels), not {type(part).__name__}")
    images = _as_uint8(images, f"the images of {what}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UsageError(f"{what} has {len(images)} images but labels shaped "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UsageError(f"the labels of {what} must be whole numbers, not {labels.dtype}")
    return Split(images, labels.to(torch.int64).contiguous())


def from_own(own: OwnData, dataset: str) -> DigitData:
    """Your data from Python, checked and stored as the built-in datasets are; `dataset` is
    the name the config records for it (own:NAME)."""
    train, test = to_split(own.train, "the training data"), to_split(own.test, "the test data")
    if not len(train) or not len(test):
        raise UsageError(f"the {'training' if not len(train) else 'test'} data is empty")
    classes = own.classes or getattr(own.train, "classes", None)
    counted = classes is None
    if counted:  # as an image folder's classes are its training folders
        classes = [str(k) for k in range(max(int(train.labels.max()) + 1, 2))]
    classes = tuple(str(c) for c in classes)
    if len(classes) < 2:
        raise UsageError("own data needs at least two classes")
    problem = class_names_problem(classes)
    if problem:
        raise UsageError(f"the classes of the own data cannot be used: {problem}")
    for split, what in ((train, "training"), (test, "test")):
        low, top = int(split.labels.min()), int(split.labels.max())
        if low < 0 or top >= len(classes):
            # A test label that no training label reaches is a class the model never learns.
            raise UsageError(f"the {what} labels must run from 0 to {len(classes) - 1} for "
                             f"{len(classes)} classes, not {low} to {top}" + (
                                 " (the classes are counted from the training labels; name "
                                 "them all with OwnData(classes=...))"
                                 if counted and what == "test" else ""))
    spec = _own_spec(dataset, train, test, classes)
    return DigitData(spec, train, test, source="data given from Python")


def _read_image_folder(root: Path, classes: tuple[str, ...] | None = None,
                       ) -> tuple[Split, tuple[str, ...]]:
    """An ImageFolder layout (root/<class>/<image>), classes in sorted order as torchvision
    takes them, each image made 28x28 grey as `preprocess.as_stored` makes it."""
    found = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()
                         and not d.name.startswith(".")))
    problem = class_names_problem(found)
    if problem:  # a folder name that would print as terminal escapes or a second line
        raise UsageError(f"the class folders of {root} cannot be used: {problem}; rename it")
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise UsageError(f"{root} must hold a folder per class (at least two), with the "
                             f"images of that class in it; found {len(classes)}")
    elif set(found) - set(classes):
        extra = sorted(set(found) - set(classes))[0]
        raise UsageError(f"{root} has a class folder {extra!r} that the training images do "
                         "not have")
    entries = _image_files(root, classes)
    if not entries:
        raise UsageError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                         "folders")
    labels = torch.tensor([label for label, *_ in entries], dtype=torch.int64)
    images = cache.load(root, entries)
    if images is None:
        decoded = []
        for label, name, *_ in entries:
            path = root / classes[label] / name
            try:
                image = preprocess.as_stored(preprocess.read_grey(path))
            except preprocess.ImageError as error:
                raise UsageError(f"cannot use {path}: {error}") from None
            decoded.append(torch.from_numpy(np.round(image * 255).astype(np.uint8)))
        images = torch.stack(decoded)
        cache.store(root, entries, images)
    return Split(images, labels), classes


def _image_files(root: Path, classes: tuple[str, ...]) -> list[cache.Entry]:
    """Every image file of a split, by class and then by name, with its size and time."""
    entries = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        with os.scandir(folder) as found:
            files = sorted((f for f in found if os.path.splitext(f.name)[1].lower()
                            in IMAGE_SUFFIXES and f.is_file()), key=lambda f: f.name)
        for f in files:
            stat = f.stat()
            entries.append((label, f.name, stat.st_size, stat.st_mtime_ns))
    return entries


def load_folder(path: str | os.PathLike, splits: tuple[str, ...] = ("train", "test"),
                classes: tuple[str, ...] | None = None) -> DigitData:
    """--dataset folder:PATH: PATH/train/<class>/* and PATH/test/<class>/* (ImageFolder's
    layout), only the splits named; the spec is measured on the training images if read."""
    root = Path(path).expanduser()
    for split in splits:
        if not (root / split).is_dir():
            raise UsageError(f"--dataset folder:{path}: {root / split} is not a folder; an image "
                             f"folder dataset holds train/<class>/ and test/<class>/ folders "
                             "of images")
    train, classes = (_read_image_folder(root / "train", classes) if "train" in splits
                      else (Split.empty(), classes))
    if "train" in splits:
        # A class with no training images is an output the model never learns (a copy that
        # failed, a link to elsewhere): torchvision's ImageFolder refuses it too.
        counts = torch.bincount(train.labels, minlength=len(classes))
        empty = [name for name, count in zip(classes, counts.tolist(), strict=True) if not count]
        if empty:
            raise UsageError(f"{root / 'train' / empty[0]} holds no images "
                             f"({', '.join(IMAGE_SUFFIXES)}): a class the model would never "
                             "learn; add its images or remove the folder")
    test, test_classes = (_read_image_folder(root / "test", classes) if "test" in splits
                          else (Split.empty(), classes))
    classes = classes or test_classes
    name = FOLDER_PREFIX + str(root)  # the spec's name is the --dataset value
    if "train" in splits:
        spec = _own_spec(name, train, test, classes)
    else:  # the caller puts the checkpoint's spec in its place
        spec = DatasetSpec(name, "", 0.0, 1.0, classes)
    return DigitData(spec, train, test, source=str(root))


def subset(digits: DigitData, seed: int, n_train: int = 1024, n_test: int = 512) -> DigitData:
    """A dry run on your own data: a seeded sample of it, as small as the synthetic set."""
    def sample(split: Split, n: int, salt: int) -> Split:
        index = epoch_order(len(split), seed, salt)[:n].sort().values
        return Split(split.images[index], split.labels[index])

    # Orders of "epochs" that training never reaches, so the sample is its own draw.
    return dataclasses.replace(digits, train=sample(digits.train, n_train, 2**31 - 1),
                               test=sample(digits.test, n_test, 2**31 - 2),
                               source=f"{digits.source} (a sample, dry run)")


def synthetic(dataset: str = "mnist", seed: int = 0, n_train: int = 1024, n_test: int = 512,
              ) -> DigitData:
    """A small learnable stand-in for a dataset, made in memory, for --dry-run and tests: class
    k is a 6x20 bar, horizontal for even k, vertical for odd, 2k pixels from the edge, jittered,
    on noise. A dry run then shows a falling loss and an accuracy far above chance (the guide's
    recipe: about 40% after one epoch), and a broken training step shows at once."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> Split:
        labels = torch.randint(0, 10, (n,), generator=g)
        jitter = torch.randint(-1, 2, (n,), generator=g)
        images = torch.zeros(n, 28, 28)
        for i in range(n):
            k = int(labels[i])
            start = max(2 + 2 * k + int(jitter[i]), 0)
            if k % 2 == 0:
                images[i, start:start + 6, 4:24] = 1.0
            else:
                images[i, 4:24, start:start + 6] = 1.0
        images = (images + 0.1 * torch.randn(n, 28, 28, generator=g)).clamp(0, 1)
        return Split((images * 255).round().to(torch.uint8), labels)

    return DigitData(DATASETS[dataset], make(n_train), make(n_test), source="synthetic")




def load_dataset(dataset: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 splits: tuple[str, ...] = ("train", "test"),
                 classes: tuple[str, ...] | None = None) -> DigitData:
    """Any --dataset: a built-in one's files or an image folder (labels after `classes`)."""
    if dataset.startswith(FOLDER_PREFIX):
        return load_folder(dataset[len(FOLDER_PREFIX):], splits, classes)
    if dataset.startswith(OWN_PREFIX):
        raise UsageError(f"the data of this run ({dataset}) was given from Python: pass it "
                         "again to torchmnist.train(config, data=OwnData(...)), or the test "
                         "images as torchmnist.evaluate(..., test=(images, labels))")
    return load(dataset, data_dir, download, splits)
