"""Several processes, one run: torch.distributed as `torchrun` starts it.

torchrun starts N copies of the command and tells each who it is (RANK, LOCAL_RANK,
WORLD_SIZE). Every rank builds the same model and trains on its share of every batch;
DistributedDataParallel averages the gradients, so the weights stay identical. The rules that
keep N processes one run (docs/distributed.md): `--batch-size` is the whole job's batch; rank 0
alone writes the run folder and talks; whatever decides what happens next (an accuracy, a loss,
a signal) is agreed on by all ranks first (`all_sum`, `agree_on_signal`), since a rank that
took another branch would wait forever in the next collective. With a single process every
function here is a no-op.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from torchmnist.errors import UsageError

TIMEOUT = timedelta(minutes=10)  # how long a collective waits for a rank that does not come
_joined = False  # whether `start` made the process group (and `finish` should end it)


@dataclass(frozen=True)
class World:
    """Who this process is in the job."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder and talks to the user."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    """This process's place, from the variables torchrun sets (a single process without them)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (torchrun sets "
                         "them)") from None
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"RANK {rank} does not fit WORLD_SIZE {size}")
    return World(rank, local_rank, size)


def restart_count() -> int:
    """How often torchrun has restarted this job's processes (--max-restarts)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def is_connection_error(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (gloo's or NCCL's error)."""
    text = str(error)
    return (isinstance(error, dist.DistError) or "gloo" in text.lower() or "NCCL" in text
            or "Connection reset by peer" in text)


def rank_seed(seed: int, world: World, *more: int) -> int:
    """The seed of this rank's random streams: `seed` itself on rank 0 (which so draws what a
    single process draws), a mix of (seed, rank, ...) on the others, never another run's seed."""
    if world.rank == 0 and not more:
        return seed
    return int(np.random.SeedSequence([seed, world.rank, *more]).generate_state(1)[0])


def start(world: World, device: torch.device) -> torch.device:
    """Join the job's process group: NCCL between GPUs, gloo between CPU processes. Returns the
    device this rank trains on: on CUDA, GPU number LOCAL_RANK of its machine."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {world.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes "
                             "per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"distributed training runs on CUDA or the CPU, not {device.type}")
    global _joined
    if not dist.is_initialized():
        _joined = True
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=TIMEOUT, **_restart_store(world))
    return device


def _restart_store(world: World) -> dict:
    """After torchrun restarts the job, its rendezvous store still holds the dead processes'
    addresses under the same keys, which the new ones would try to reach ("Gloo
    connectFullMesh failed"): a key prefix per restart gives each attempt its own."""
    restarts = restart_count()
    if not restarts or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world.size, is_master=False, timeout=TIMEOUT)
    return {"store": dist.PrefixStore(f"torchmnist/restart-{restarts}", agent),
            "rank": world.rank, "world_size": world.size}


def finish() -> None:
    """Leave the process group `start` joined (one a caller made itself is left alone). Call
    it once nothing refers to the DistributedDataParallel wrapper any more."""
    global _joined
    if _joined and dist.is_initialized():
        # The wrapper's Reducer holds the group as well. Were it freed after the group left
        # the registry, the Reducer's destructor would tear the gloo group down while holding
        # the GIL, waiting for gloo's worker thread, which waits for the GIL to free a
        # finished collective's tensors: a hang at exit. Collected first, the wrapper leaves
        # the group to destroy_process_group, whose destructor lets go of the GIL while it
        # waits.
        gc.collect()
        dist.destroy_process_group()
    _joined = False


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `values` over every rank (a copy; `values` itself is left alone)."""
    total = values.clone()
    if world.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def agree_on_signal(signum: int | None, world: World, device: torch.device) -> int | None:
    """The signal any rank has received, told to all (torchrun forwards SIGTERM/SIGINT to every
    rank, but they do not all see it after the same step)."""
    if not world.distributed:
        return signum
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def same_buffers(module: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics, which each rank moves
    with its own images), so that all ranks test the weights rank 0 saves."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """What the training step calls: the model itself, or on several ranks the model inside
    DistributedDataParallel, whose backward averages the gradients of all ranks."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def convert_batchnorm(model: nn.Module, world: World) -> nn.Module:
    """--sync-bn: BatchNorm statistics over the whole job's batch, not each rank's share (on
    CUDA: torch's SyncBatchNorm synchronises GPUs only)."""
    if not world.distributed:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
