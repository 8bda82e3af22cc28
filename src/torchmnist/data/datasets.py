"""The MNIST family: what each dataset is (its normalisation and classes), and finding,
downloading and checking its IDX files."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torchmnist import config
from torchmnist.errors import UsageError


@dataclass(frozen=True)
class DatasetSpec:
    """How to normalise a model's data and what its classes are; stored in its checkpoints."""

    name: str  # the --dataset value, also the folder name under /usr/share/datasets
    folder: str  # torchvision's folder under the data root, and its dataset class name
    mean: float  # of the training pixels scaled to [0, 1]
    std: float
    classes: tuple[str, ...]
    # Your own data's CRC-32 of images and labels: a resume on other data is refused.
    fingerprint: str = ""
    # An empty pixel in [0, 1], which augmentation and test-time shifts fill in: 0 in the
    # built-in datasets; in yours the commonest value on the training images' edges.
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
    """What is wrong with a dataset's class names, or None: each is printed, so it must be one
    line of printable text (no terminal escapes), different from the others."""
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
    """Your own images to train and test on, from Python: `train(config, data=OwnData(...))`.

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


# ---- Finding, downloading and checking the files -------------------------------------------------


def _places(spec: DatasetSpec, root: Path) -> list[Path]:
    """Where a dataset's files are looked for: torchvision's layout under the root, the guide's
    (~/.torch/datasets/mnist/MNIST/raw), Debian's dataset packages."""
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
        # Leave no debris (a mistyped --data-dir would otherwise keep an empty MNIST/raw).
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
    """Read one IDX file (maybe gzipped), checking magic number, shape and size: the data only
    up to the size the header implies, plus a byte, so a .gz bomb is never unpacked whole."""
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
    """Find (or download), check and decode a built-in dataset's splits, or only those named (a
    split not named is empty); `classes` (own.load_dataset's signature) is unused here."""
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


