"""MNIST-family datasets: finding and checking the files, and the two batch loaders.

Both loaders honour one contract: `batches(epoch, start)` yields `(x, y)` on the training
device, x float32 (B, 1, 28, 28) normalised, y int64 (B,). Training order is a permutation drawn
from a generator seeded by (seed, epoch) alone, so any epoch's order can be rebuilt on resume and
both loaders visit the samples in the same order. The test set is never shuffled.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import gzip
import math
import multiprocessing
import os
import unicodedata
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from torchmnist import cache, config
from torchmnist.errors import TrainingError, UsageError


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know of its data: how to normalise and what the classes are.

    A checkpoint stores it (`to_dict`), so a model trained on your own images is tested,
    exported and asked to predict with the numbers it was trained with, wherever it goes."""

    name: str  # the --dataset value, also the folder name under /usr/share/datasets
    folder: str  # torchvision's folder under the data root, and its dataset class name
    mean: float  # of the training pixels scaled to [0, 1]
    std: float
    classes: tuple[str, ...]
    # For your own data: a CRC-32 of its images and labels, so that resuming on other data is
    # refused. Built-in datasets have their files checked instead.
    fingerprint: str = ""
    # An empty pixel's value in [0, 1], which augmentation and test-time shifts fill in: black
    # (0) in the built-in datasets; for your own data the commonest value on the edges of the
    # training images, so that dark ink on white paper is shifted over white.
    background: float = 0.0

    @property
    def normalized_background(self) -> float:
        return (self.background - self.mean) / self.std

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": self.mean, "std": self.std,
                "classes": list(self.classes), "fingerprint": self.fingerprint,
                "background": self.background}

    @classmethod
    def from_dict(cls, values: object) -> DatasetSpec:
        """The spec a checkpoint stored, checked: a damaged one raises ValueError."""
        if not isinstance(values, dict):
            raise ValueError("the dataset description is not a table")
        name, mean, std = values.get("name"), values.get("mean"), values.get("std")
        classes, fingerprint = values.get("classes"), values.get("fingerprint", "")
        background = values.get("background", 0.0)  # absent from checkpoints before it
        numbers_ok = all(config.is_number(v) and math.isfinite(v)
                         for v in (mean, std, background))
        if not (isinstance(name, str) and numbers_ok and std > 0 and 0 <= background <= 1
                and isinstance(classes, list | tuple) and len(classes) >= 2
                and all(isinstance(c, str) for c in classes) and isinstance(fingerprint, str)):
            raise ValueError("the dataset description is damaged")
        problem = class_names_problem(classes)
        if problem:
            raise ValueError(problem)
        builtin = DATASETS.get(name)
        return cls(name, builtin.folder if builtin else "", float(mean), float(std),
                   tuple(classes), fingerprint, float(background))


MAX_CLASS_NAME = 255  # characters: the longest file name, as a class folder's name


def class_names_problem(classes: tuple[str, ...] | list[str]) -> str | None:
    """What is wrong with a dataset's class names, or None. Each is printed by predict, test
    and the report: it must be a line of printable text (no terminal escapes, no newline that
    would fake another line of output), and tell its class apart from the others."""
    for name in classes:
        if not name.strip():
            return "a class has an empty name"
        if len(name) > MAX_CLASS_NAME:
            return f"a class name is {len(name):,} characters, more than {MAX_CLASS_NAME}"
        if not name.isprintable():  # repr() shows such characters escaped
            return f"the class name {name!r} holds control characters"
    # Names that differ only in how an accent is encoded (NFC "é", NFD "e" and a combining
    # accent, as macOS names folders) print alike, so they are the same name here.
    seen: dict[str, str] = {}
    for name in classes:
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            return (f"two classes are named {name!r}" if seen[key] == name else
                    f"two classes are named alike, {seen[key]!r} and {name!r}: they differ "
                    "only in how their accents are encoded (Unicode NFC and NFD)")
        seen[key] = name
    return None


DATASETS = {
    # Measured on the training images: MNIST from the original files, Fashion-MNIST from
    # Debian's dataset-fashion-mnist. KMNIST's are the values its authors publish.
    "mnist": DatasetSpec("mnist", "MNIST", 0.1307, 0.3081, tuple("0123456789")),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "FashionMNIST", 0.2860, 0.3530,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot")),
    "kmnist": DatasetSpec("kmnist", "KMNIST", 0.1918, 0.3483,
                          ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # IDX: uint8 data, 3 or 1 dimensions
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # the same in MNIST, Fashion-MNIST and KMNIST
SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install


Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, 1, 28, 28) float32, y (B,) int64


@dataclass
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8, on the CPU
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls) -> Split:
        """No images: the split a command that does not need it leaves unread."""
        return cls(torch.zeros(0, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))

    def shard(self, rank: int, ranks: int) -> Split:
        """Every `ranks`-th image from `rank` on: the part of a test set one process of a
        distributed run scores (their sums are added up after)."""
        if ranks == 1:
            return self
        return Split(self.images[rank::ranks], self.labels[rank::ranks])


@dataclass
class DigitData:
    spec: DatasetSpec
    train: Split
    test: Split
    source: str  # where the files came from, for the log
    val: Split | None = None  # held out from train (--val-size)


@dataclass
class OwnData:
    """Your own images to train and test on, from Python: `TrainConfig(dataset=OwnData(...))`.

    `train` and `test` are each a torch `Dataset` yielding (image, label) pairs, or a pair of
    tensors (images, labels). Images are 28x28 grey: uint8 0-255, or floats in [0, 1] (stored
    as uint8, as MNIST is), shaped (N, 28, 28) or (N, 1, 28, 28); a Dataset may also yield PIL
    images. Labels are whole numbers from 0 to the number of classes - 1. `classes` names them
    (default: the Dataset's own `classes`, else "0", "1", ...); `name` labels the run.
    """

    train: object
    test: object
    classes: tuple[str, ...] | list[str] | None = None
    name: str = "own"


def default_data_dir() -> Path:
    """The guide's convention: datasets next to torchvision's models, under ~/.torch."""
    env = os.environ.get("TORCHMNIST_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".torch" / "datasets"


# ---------------------------------------------------------------------------------------------
# Finding, downloading and checking the files


def _places(spec: DatasetSpec, root: Path) -> list[Path]:
    """Where a dataset's files are looked for, in order: torchvision's layout under the root;
    the layout of the guide's own script (~/.torch/datasets/mnist/MNIST/raw, one folder per
    dataset); and Debian's dataset packages."""
    return [root / spec.folder / "raw", root / spec.name / spec.folder / "raw",
            SYSTEM_DATASETS_DIR / spec.name]


def _candidates(spec: DatasetSpec, root: Path, name: str) -> list[Path]:
    return [place / f"{name}{suffix}" for place in _places(spec, root) for suffix in ("", ".gz")]


def _locate(spec: DatasetSpec, root: Path, splits: tuple[str, ...] = ("train", "test"),
            ) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for name in (name for split in splits for name in FILES[split]):
        candidates = _candidates(spec, root, name)
        path = next((p for p in candidates if p.is_file()), None)
        odd = next((p for p in candidates if p.exists() and not p.is_file()), None)
        if path is None and odd is not None:
            # Not "missing": and a download would write its file into a pipe there, and wait.
            raise UsageError(f"{odd} is not a regular file (a folder, a pipe or a device) "
                             f"where {spec.folder}'s {name} belongs: move it away, or point "
                             "--data-dir at another folder")
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def _download(spec: DatasetSpec, root: Path) -> str | None:
    """Fetch the four files with torchvision into root/<folder>/raw; return why it failed."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, spec.folder)
    raw = root / spec.folder / "raw"
    made = [folder for folder in (root, root / spec.folder, raw) if not folder.exists()]
    before = set(raw.iterdir()) if raw.is_dir() else set()
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as error:  # no network, a proxy, a full disk: all end the same way
        # Leave no debris: the files and folders this attempt made (a mistyped --data-dir
        # would otherwise keep an empty MNIST/raw).
        for path in (set(raw.iterdir()) if raw.is_dir() else set()) - before:
            if path.is_file():
                path.unlink()
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        reason = str(error).strip().splitlines()
        return reason[-1] if reason else type(error).__name__
    return None


def read_idx(path: Path, magic: int, max_items: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzipped), checking magic number, shape and size.

    The header is read and checked first, and the data then read only up to the size the
    header implies (plus one byte, to tell a file that is longer): a small .gz file that
    expands to gigabytes is never decompressed whole."""
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header = 4 + 4 * ndim
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(header)
            if len(head) < header:
                raise UsageError(f"dataset file {path} is truncated: {len(head)} bytes is "
                                 f"shorter than the {header}-byte IDX header")
            found_magic = int.from_bytes(head[:4], "big")
            if found_magic != magic:
                raise UsageError(f"dataset file {path} is not an IDX "
                                 f"{'image' if ndim == 3 else 'label'} file (magic number "
                                 f"{found_magic:#010x}, expected {magic:#010x})")
            shape = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big")
                          for i in range(ndim))
            if ndim == 3 and shape[1:] != (28, 28):
                raise UsageError(f"dataset file {path} holds {shape[1]}x{shape[2]} images, not "
                                 "28x28")
            if max_items is not None and shape[0] > max_items:
                raise UsageError(f"dataset file {path} holds {shape[0]} items, more than the "
                                 f"{max_items} of its split: are the train and test files "
                                 "swapped?")
            size = math.prod(shape)
            body = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise UsageError(f"cannot read dataset file {path}: {error}") from None
    if len(body) != size:
        state = "truncated" if len(body) < size else "longer than its header says"
        found = f"found {header + len(body)}" if len(body) < size else "found more"
        raise UsageError(f"dataset file {path} is {state}: expected {header + size} bytes for "
                         f"{shape[0]} items, {found}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _read_split(files: dict[str, Path], split: str) -> Split:
    image_name, label_name = FILES[split]
    # More items than the dataset has is a mistake (the two splits swapped, another
    # dataset's files); fewer is a subset someone made, and is read.
    images = read_idx(files[image_name], IMAGE_MAGIC, SPLIT_SIZES[split])
    labels = read_idx(files[label_name], LABEL_MAGIC, SPLIT_SIZES[split])
    if len(images) != len(labels):
        raise UsageError(f"dataset files {files[image_name]} and {files[label_name]} disagree: "
                         f"{len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise UsageError(f"dataset file {files[label_name]} has label {labels.max()}, "
                         "outside 0-9")
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def load(dataset: str, data_dir: str | os.PathLike | None = None, download: bool = True,
         splits: tuple[str, ...] = ("train", "test"),
         classes: tuple[str, ...] | None = None) -> DigitData:
    """Find (or download) and check a dataset's files, and decode them into tensors: both
    splits, or only those named (testing a model needs only the two test files; the training
    split is then empty). `folder:PATH` reads an image folder (`load_folder`), whose labels
    follow `classes` when given (a trained model's)."""
    if dataset.startswith(FOLDER_PREFIX):
        return load_folder(dataset[len(FOLDER_PREFIX):], splits, classes)
    if dataset.startswith(OWN_PREFIX):
        raise UsageError(f"the data of this run ({dataset}) was given from Python: pass it "
                         "again as TrainConfig(dataset=OwnData(...)), or the test images as "
                         "torchmnist.evaluate(..., test=(images, labels))")
    spec = builtin_spec(dataset)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    files, missing = _locate(spec, root, splits)
    failure = "downloading is off (--no-download)"
    if missing and download:
        failure = _download(spec, root)
        files, missing = _locate(spec, root, splits)
    if missing:
        *others, last = _places(spec, root)
        places = f"{', '.join(str(p) for p in others)} and {last}"
        raise UsageError(
            f"{spec.folder} files missing: {', '.join(missing)} (searched {places}, plain or "
            f".gz; {failure or 'the download gave no files'}); put the files in "
            f"{root / spec.folder / 'raw'}, or point --data-dir or TORCHMNIST_DATA_DIR at a "
            f"folder that has {spec.folder}/raw")
    sources = sorted({str(path.parent) for path in files.values()})
    train, test = (_read_split(files, split) if split in splits else Split.empty()
                   for split in ("train", "test"))
    return DigitData(spec, train, test, source=", ".join(sources))


# ---------------------------------------------------------------------------------------------
# Your own data: tensors or a Dataset from Python, or an image folder (--dataset folder:PATH)

# --dataset folder:PATH, and what the config records for data given from Python (own:NAME).
FOLDER_PREFIX, OWN_PREFIX = config.FOLDER_PREFIX, config.OWN_PREFIX
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")


def is_builtin(dataset: str) -> bool:
    return dataset in DATASETS


def dry_run_words(dataset: str) -> str:
    """What a dry run's images are, as training and `test` say it after the dataset's name:
    synthetic ones for a built-in dataset, a sample of your own for the others."""
    return " (synthetic, dry run)" if is_builtin(dataset) else " (a sample, dry run)"


def builtin_spec(dataset: str) -> DatasetSpec:
    """The spec of a built-in dataset, or one sentence saying the name is not one."""
    if dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, not {dataset!r}")
    return DATASETS[dataset]


def short_name(dataset: str) -> str:
    """The dataset as a run folder's name shows it: mnist, the image folder's name, own data's
    name."""
    if dataset.startswith(FOLDER_PREFIX):
        dataset = Path(dataset[len(FOLDER_PREFIX):]).name or "folder"
    elif dataset.startswith(OWN_PREFIX):
        dataset = dataset[len(OWN_PREFIX):]
    # At most 48 characters: a file name holds 255 bytes, and a letter may take 4 of them.
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in dataset)[:48] or "data"


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
    from torchmnist import preprocess

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
    """--dataset folder:PATH: PATH/train/<class>/* and PATH/test/<class>/*, the layout of
    torchvision's ImageFolder, for 28x28-ish grey images (others are made grey and resized).
    Only the splits named are read; the spec is measured on the training images when they
    are read (testing a model uses the spec in its checkpoint)."""
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
    """A small learnable stand-in for a dataset, made in memory: for --dry-run and tests.

    Class k is a bar, 6 pixels wide and 20 long, at its own place: horizontal for even k,
    vertical for odd k, 2k pixels from the edge, jittered by a pixel, on noise. Structure a
    network learns in a few steps, so that a dry run shows a falling loss and an accuracy far
    above chance (the guide's recipe: about 40% after its one epoch, 80% after two), and a
    broken training step shows at once.
    """
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


# ---------------------------------------------------------------------------------------------
# Batch order


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a permutation that depends on (seed, epoch) only."""
    # SeedSequence mixes the two numbers, so seed 1 epoch 2 and seed 2 epoch 1 differ.
    order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(order_seed))


def batch_count(n: int, batch_size: int, ranks: int = 1) -> int:
    """Batches in an epoch of `n` images. With several ranks each takes an equal share of every
    batch; a last batch too small to give every rank an image is left out."""
    count = math.ceil(n / batch_size)
    if ranks > 1 and 0 < n % batch_size < ranks:
        count -= 1
    return count


def rank_batches(order: torch.Tensor, batch_size: int, start: int = 0, rank: int = 0,
                 ranks: int = 1) -> Iterator[torch.Tensor]:
    """The image indices of each batch of an epoch's `order`, from batch `start` on: the whole
    batch for a single process; for rank r of R, every R-th image of it from r on, so that the
    R ranks together take exactly the batch one process would. A last batch that does not
    divide evenly leaves out its last images (fewer than R), so that every rank's share is the
    same size and the average of the ranks' mean losses is the batch's mean loss."""
    n = len(order)
    for i in range(start, batch_count(n, batch_size, ranks)):
        batch = order[i * batch_size:min((i + 1) * batch_size, n)]
        if ranks > 1:
            batch = batch[:len(batch) - len(batch) % ranks][rank::ranks]
        yield batch


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28), the very arithmetic of torchvision's
    ToTensor (divide by 255) then Normalize (subtract mean, divide by std, both float32
    tensors), so both loaders produce bit-identical batches."""
    return images.unsqueeze(1).to(torch.float32).div(255).sub(mean).div(std)


class TensorBatches:
    """The whole split lives on the device as uint8; a batch is an index into it.

    No per-sample Python, no PIL, no worker processes: one gather and one normalisation per
    batch, all on the device.
    """

    def __init__(self, split: Split, spec: DatasetSpec, batch_size: int, device: torch.device,
                 *, shuffle: bool, seed: int = 0, rank: int = 0, ranks: int = 1):
        self.images = split.images.to(device)  # (N, 28, 28) uint8
        self.labels = split.labels.to(device)  # (N,) int64
        # Made once, on the device: a batch then allocates only its own tensors.
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device)
        self.batch_size, self.device, self.shuffle, self.seed = batch_size, device, shuffle, seed
        # Distributed training: this rank's share of every batch (see rank_batches).
        self.rank, self.ranks = rank, ranks

    def __len__(self) -> int:
        return batch_count(len(self.labels), self.batch_size, self.ranks)

    def close(self) -> None:
        """Nothing to stop: no worker processes (LoaderBatches has them)."""

    def batches(self, epoch: int = 1, start: int = 0) -> Iterator[Batch]:
        n = len(self.labels)
        if not self.shuffle and self.ranks == 1:  # in order: slices, no gather
            for i in range(start, len(self)):
                lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
                yield normalize(self.images[lo:hi], self.mean, self.std), self.labels[lo:hi]
            return
        order = (epoch_order(n, self.seed, epoch) if self.shuffle
                 else torch.arange(n)).to(self.device)
        for index in rank_batches(order, self.batch_size, start, self.rank, self.ranks):
            yield normalize(self.images[index], self.mean, self.std), self.labels[index]


class _PILDigits(Dataset):
    """Per-sample work exactly as torchvision.datasets.MNIST does it: uint8 array -> PIL image
    -> ToTensor -> Normalize. This is the guide's pipeline, kept for comparison and teaching."""

    def __init__(self, split: Split, spec: DatasetSpec):
        from torchvision import transforms

        # Tensors, as torchvision keeps them: a worker started by spawn or forkserver (macOS,
        # Windows; Linux from Python 3.14) is sent them through shared memory. A NumPy array
        # was pickled to every worker, which kept the workers 1.4 s behind as a run began
        # (benchmarks/start_methods.py); the parent waited forever if a worker died first.
        self.split: Split | None = split
        self.n = len(split)
        self._arrays: tuple[np.ndarray, list[int]] | None = None
        self.transform = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize((spec.mean,), (spec.std,))])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if self._arrays is None:  # once per process: NumPy indexes one image faster
            self._arrays = self.split.images.numpy(), self.split.labels.tolist()
        images, labels = self._arrays
        return self.transform(Image.fromarray(images[index])), labels[index]

    def __getstate__(self) -> dict:
        """What a spawn or forkserver worker is sent: the tensors (shared memory), or, where
        shared memory has no room for them (a container's /dev/shm: Docker gives 64 MiB),
        NumPy copies through the pipe, slower to start but never short of room."""
        split = self.split
        if split.images.is_shared() or _shared_memory_holds(split.images.nbytes
                                                            + split.labels.nbytes):
            return {**self.__dict__, "_arrays": None}  # each worker makes its own views
        return {**self.__dict__, "split": None,
                "_arrays": (split.images.numpy(), split.labels.tolist())}


SHARED_MEMORY = Path("/dev/shm")
# Room kept for the batches the workers send back, which travel through shared memory too:
# 4 workers, 2 batches ahead each, of 1,000 test images in float32 are 25 MiB, for each loader.
SHARED_MEMORY_HEADROOM = 256 * 2**20


def _shared_memory_free() -> int | None:
    """Bytes free in /dev/shm; None where there is none (only Linux has one, of fixed size)."""
    try:
        found = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return found.f_bavail * found.f_frsize


def _shared_memory_holds(size: int) -> bool:
    """Whether `size` bytes fit in shared memory beside the batches' headroom."""
    free = _shared_memory_free()
    return free is None or free >= size + SHARED_MEMORY_HEADROOM


class _EpochSampler(Sampler[int]):
    """Yields the epoch's order from batch `start` on; `set_epoch` picks the epoch (as
    DistributedSampler does) and lets a resumed run skip the batches it already took.

    With several ranks it yields this rank's share of each batch (`rank_batches`): the job
    then trains on the very batches of a single process, which DistributedSampler's
    rank-strided split of the whole epoch, padded with repeated images, would not give."""

    def __init__(self, n: int, seed: int, shuffle: bool, batch_size: int, rank: int = 0,
                 ranks: int = 1):
        self.n, self.seed, self.shuffle, self.batch_size = n, seed, shuffle, batch_size
        self.rank, self.ranks = rank, ranks
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        for index in rank_batches(order, self.batch_size, self.start, self.rank, self.ranks):
            yield from index.tolist()

    def __len__(self) -> int:
        return sum(len(index) for index in rank_batches(
            torch.arange(self.n), self.batch_size, self.start, self.rank, self.ranks))


def refuse_in_a_starting_process() -> None:
    """Refuse to train while a new process imports the user's script. Under the spawn and
    forkserver start methods (macOS and Windows; Linux from Python 3.14) every new process,
    a DataLoader worker included, runs the main script's top level again: an unguarded
    `torchmnist.train(...)` would start a second run there (which then finds the first run's
    folder locked). Python marks the process while it imports the script (_inheriting, the
    flag multiprocessing checks for its own version of this mistake)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise UsageError(
            "torchmnist was asked to train inside a new process as it started (spawn and "
            "forkserver run the script's top level again in every process, DataLoader workers "
            'included): put the training call under `if __name__ == "__main__":`')


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C in a terminal (and `timeout`, `kill -- -PGID`) signals the whole process group,
    # workers included. A worker that died of it would make the loader raise before the main
    # process could save and stop; so workers ignore the two signals and the main process,
    # which handles them, shuts the workers down itself (LoaderBatches.close).
    import random
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Each worker's torch seed is base_seed + worker_id, and the base seed comes from the
    # loader's own generator; derive numpy's and python's from it so workers are reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class LoaderBatches:
    """The guide's path: torch DataLoader with worker processes, pinned memory and
    non-blocking copies to the device."""

    def __init__(self, split: Split, spec: DatasetSpec, batch_size: int, device: torch.device,
                 *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, ranks: int = 1):
        self.device, self.batch_size, self.n, self.ranks = device, batch_size, len(split), ranks
        self.sampler = _EpochSampler(len(split), seed, shuffle, batch_size, rank, ranks)
        self.loader = DataLoader(
            # Each rank's shares are batch_size / ranks images (the last may be fewer).
            _PILDigits(split, spec), batch_size=batch_size // ranks, sampler=self.sampler,
            num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0, worker_init_fn=_seed_worker,
            # The loader draws its workers' base seed from this generator; without one it
            # would draw from the global RNG and shift dropout's random stream.
            generator=torch.Generator().manual_seed(seed))
        if num_workers:
            _loaders_to_close_at_exit().add(self)

    def __len__(self) -> int:
        return batch_count(self.n, self.batch_size, self.ranks)

    def close(self) -> None:
        """Stop the worker processes now; the next epoch would start new ones. Safe to call
        more than once."""
        # The persistent workers' iterator, which the DataLoader keeps (it has no public
        # handle on it); torch's own shutdown of them: finish, then join.
        iterator, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if iterator is not None:
            iterator._shutdown_workers()

    def batches(self, epoch: int = 1, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start)
        with _out_of_shared_memory_told():
            for images, labels in self.loader:
                # non_blocking overlaps the copy with compute when the memory is pinned; a
                # no-op on the CPU.
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))


@contextlib.contextmanager
def _out_of_shared_memory_told() -> Iterator[None]:
    """The workers send every batch through shared memory; where it is full (a container's
    small /dev/shm), torch fails with a traceback or a worker dies of SIGBUS. Say so, and what
    to do, in one sentence."""
    try:
        yield
    except RuntimeError as error:
        if "shared memory" not in str(error):
            raise
        free = _shared_memory_free()
        where = (f"{free / 2**20:.0f} MiB free in {SHARED_MEMORY}" if free is not None
                 else f"no {SHARED_MEMORY} here")
        raise TrainingError(
            f"the DataLoader's worker processes ran out of shared memory ({where}): give the "
            "container more (docker run --shm-size=1g), or use --num-workers 0 or the tensor "
            "loader") from None


@functools.cache
def _loaders_to_close_at_exit() -> weakref.WeakSet:
    """The loaders whose workers are stopped when Python exits, if they are still running.

    Workers ignore SIGTERM (_seed_worker), and Python's multiprocessing, at exit, sends SIGTERM
    to every worker still alive and then waits for it: a loader not yet closed (or collected)
    at exit would wait forever. This hook, registered after torch's own (which makes the
    workers' shutdown a no-op once Python is exiting), runs before it and stops them."""
    loaders = weakref.WeakSet()

    def close_all() -> None:
        for batches in list(loaders):
            batches.close()

    atexit.register(close_all)
    return loaders


def make_batches(kind: str, split: Split, spec: DatasetSpec, batch_size: int,
                 device: torch.device, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, ranks: int = 1,
                 ) -> TensorBatches | LoaderBatches:
    """Batches of `split`; with `ranks` > 1, this rank's share of each (see rank_batches)."""
    if kind == "tensor":
        return TensorBatches(split, spec, batch_size, device, shuffle=shuffle, seed=seed,
                             rank=rank, ranks=ranks)
    return LoaderBatches(split, spec, batch_size, device, shuffle=shuffle, seed=seed,
                         num_workers=num_workers, pin_memory=pin_memory, rank=rank, ranks=ranks)
