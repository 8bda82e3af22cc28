"""Image folders decoded once: the 28x28 images of a `--dataset folder:PATH` split, kept between
runs so that the next run reads one file instead of decoding every image again.

An entry, one per folder, is used only while its key matches: the class, name, size and
modification time (to the nanosecond) of every image file, and what decodes them (torchmnist's
preprocessing source and Pillow's version). A folder changed in the last 2 seconds is not kept.
The cache is only ever a shortcut: an entry that cannot be read or written is ignored
(docs/cli.md says where it lives and how to turn it off).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from torchmnist.data import preprocess
from torchmnist.errors import TrainingError
from torchmnist.storage import checkpoint, rundir

FORMAT = 1  # raised when what an entry holds changes
UNSETTLED_NS = 2_000_000_000  # files changed this recently (2 s) may still be being written

# One image file of a split: (label, file name within its class folder, size, mtime in ns).
Entry = tuple[int, str, int, int]


def directory() -> Path | None:
    """Where entries are kept, or None when the cache is off."""
    chosen = os.environ.get("TORCHMNIST_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("off", "") else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torchmnist"


def _paths(root: Path, entries: list[Entry]) -> tuple[Path, str] | None:
    """The entry's file and the key it must hold, or None when the cache is off."""
    folder = directory()
    if folder is None:
        return None
    from PIL import __version__ as pillow

    decoder = hashlib.sha256(Path(preprocess.__file__).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([FORMAT, decoder, pillow, entries]).encode()).hexdigest()
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return folder / "folders" / f"{name}.pt", key


def load(root: Path, entries: list[Entry]) -> torch.Tensor | None:
    """The decoded images (N, 28, 28) uint8 of a split whose files are `entries`, if a fresh
    entry holds them; else None."""
    where = _paths(root, entries)
    if where is None or not where[0].is_file():
        return None
    path, key = where
    try:
        # checkpoint.load, not torch.load: the cache folder may be shared (TORCHMNIST_CACHE_DIR),
        # and an entry that unpacks to more than it holds is refused unread.
        saved = checkpoint.load(path)
    except Exception:  # noqa: BLE001 - a damaged entry is as good as none
        return None
    images = saved.get("images") if isinstance(saved, dict) else None
    if (saved.get("key") if isinstance(saved, dict) else None) != key or not (
            isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            and tuple(images.shape) == (len(entries), 28, 28)):
        return None
    return images


def store(root: Path, entries: list[Entry], images: torch.Tensor) -> None:
    """Keep a split's decoded images for the next run; quietly nothing if that fails."""
    # A file written in the last moments may be written again within the same tick of the
    # file system's clock, keeping its size and time: such a folder is not kept (yet).
    if max(mtime for *_, mtime in entries) > time.time_ns() - UNSETTLED_NS:
        return
    where = _paths(root, entries)
    if where is None:
        return
    path, key = where
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the entry and renamed over it: a reader never sees half a file.
        rundir.write_atomically(
            path, lambda f: torch.save({"key": key, "images": images.contiguous()}, f))
    except (OSError, TrainingError):  # a folder that cannot be made, a write that failed
        pass
