"""The two batch loaders and the order they share.

Both honour one contract: `batches(epoch, start)` yields `(x, y)` on the training device, x
float32 (B, 1, 28, 28) normalised, y int64 (B,). Training order is a permutation drawn
from a generator seeded by (seed, epoch) alone, so any epoch's order can be rebuilt on resume
and both loaders visit the samples in the same order. The test set is never shuffled.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import multiprocessing
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from torchmnist.data.datasets import Batch, DatasetSpec, Split
from torchmnist.errors import TrainingError, UsageError

# ---- Batch order ---------------------------------------------------------------------------------


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
    """The image indices of each batch of `order` from batch `start` on; rank r of R takes every
    R-th image from r on, so the ranks together take the batch one process would. A last batch
    leaves out its last images (fewer than R), so every rank's share has the same size."""
    n = len(order)
    for i in range(start, batch_count(n, batch_size, ranks)):
        batch = order[i * batch_size:min((i + 1) * batch_size, n)]
        if ranks > 1:
            batch = batch[:len(batch) - len(batch) % ranks][rank::ranks]
        yield batch


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28) with ToTensor's then Normalize's very
    arithmetic, so both loaders produce bit-identical batches."""
    return images.unsqueeze(1).to(torch.float32).div(255).sub(mean).div(std)


class TensorBatches:
    """The whole split on the device as uint8; a batch is one gather and one normalisation
    there: no per-sample Python, no PIL, no worker processes."""

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
        # Windows; Linux from Python 3.14) is sent them through shared memory, where a NumPy
        # array would be pickled to every worker, slowly (benchmarks/start_methods.py).
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
        """What a spawn or forkserver worker is sent: the tensors (shared memory), or NumPy
        copies through the pipe where shared memory has no room (Docker gives 64 MiB)."""
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
    """Yields the epoch's order from batch `start` on (`set_epoch`), with several ranks this
    rank's share of each batch: the very batches of a single process, which
    DistributedSampler's padded, rank-strided split of the epoch would not give."""

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
    """Refuse to train while a new process imports the user's script: under spawn and
    forkserver every new process, DataLoader workers too, runs its top level again, so an
    unguarded `torchmnist.train(...)` would start a second run (`_inheriting` marks it)."""
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
        self.make_loader = functools.partial(
            # Each rank's shares are batch_size / ranks images (the last may be fewer).
            DataLoader, _PILDigits(split, spec), batch_size=batch_size // ranks,
            sampler=self.sampler, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0, worker_init_fn=_seed_worker,
            # The loader draws its workers' base seed from this generator; without one it
            # would draw from the global RNG and shift dropout's random stream.
            generator=torch.Generator().manual_seed(seed))
        self.loader: DataLoader | None = None  # made on first use, its workers with it
        self.running: Iterator[Batch] | None = None  # the batches being handed out
        if num_workers:
            _loaders_to_close_at_exit().add(self)

    def __len__(self) -> int:
        return batch_count(self.n, self.batch_size, self.ranks)

    def close(self) -> None:
        """Stop the workers now: a DataLoader shuts its persistent workers down when let go, so
        the batches in flight are closed and the loader dropped. Safe to call again."""
        if self.running is not None:
            self.running.close()
        self.running = self.loader = None

    def batches(self, epoch: int = 1, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start)
        if self.loader is None:
            self.loader = self.make_loader()
        self.running = self._to_device(self.loader)
        return self.running

    def _to_device(self, loader: DataLoader) -> Iterator[Batch]:
        with _out_of_shared_memory_told():
            for images, labels in loader:
                # non_blocking overlaps the copy with compute when the memory is pinned; a
                # no-op on the CPU.
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))


@contextlib.contextmanager
def _out_of_shared_memory_told() -> Iterator[None]:
    """One sentence where a full shared memory (a container's small /dev/shm) fails the
    workers' batches with a traceback or a SIGBUS."""
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
    """The loaders whose workers are stopped at exit: they ignore the SIGTERM multiprocessing
    then sends and waits on, which would wait forever. Registered after torch's own hook, this
    one runs before it."""
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
