"""Device choice, seeding, determinism and threads: the only module that asks torch.cuda/mps.

Everything here runs before the first tensor touches an accelerator, because two of the
switches (CUDA_LAUNCH_BLOCKING and CUBLAS_WORKSPACE_CONFIG) are read only when CUDA starts.
"""

from __future__ import annotations

import os
import platform
import random
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchmnist.errors import UsageError


def prepare_environment(*, cuda_launch_blocking: bool, deterministic: bool,
                        threads: int | None) -> None:
    """Set process-wide switches. Call once, before choosing the device."""
    if cuda_launch_blocking:
        # Makes every kernel launch synchronous, so a CUDA error is reported at the Python line
        # that caused it instead of at some later, unrelated call.
        os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; the variable must be set before
        # CUDA initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: these switches are process-wide, and one deterministic run must not make
    # the next run in the same process (the API, `bench`) deterministic too.
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    if threads is not None:
        # What OMP_NUM_THREADS does, from inside the process: several jobs on one machine each
        # take a share of the cores instead of all fighting for all of them.
        torch.set_num_threads(threads)


def _accelerator() -> torch.device | None:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        if accelerator.is_available():
            return accelerator.current_accelerator()
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return None


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn --device auto|cpu|cuda|mps into a torch.device, or explain why it is unavailable.
    From Python, `cuda:N` and a torch.device are taken too."""
    name = str(name)
    if name == "auto":
        return _accelerator() or torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not (index or name == "mps"):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")
    if index and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but CUDA is not available on this "
                         "machine; use --device cpu or --device auto")
    if index and index.group(1) and int(index.group(1)) >= torch.cuda.device_count():
        raise UsageError(f"--device {name} was asked for but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), from cuda:0")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available on this machine; "
                         "use --device cpu or --device auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed every generator the run draws from (torch.manual_seed also seeds all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state_problem(state: dict) -> str | None:
    """What keeps `set_rng_state` from taking a saved state, or None. Tried for real on the
    CPU generators, whose states are put back afterwards, so that every damage torch, numpy
    or random would refuse is found (a CUDA state is only checked for its type here)."""
    current = rng_state()
    try:
        set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    except KeyError as error:
        return f"no {error.args[0]!r} state"
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    finally:
        set_rng_state(current)
    cuda = state.get("cuda", [])
    if not (isinstance(cuda, list | tuple) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
        return "the CUDA states are not byte tensors"
    return None


def _as_tuple(value):
    # random.setstate wants the nested tuples back that a round trip may have made into lists.
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def autocast(device: torch.device, amp: str):
    """The mixed-precision context for --amp: bf16 on CPU or CUDA, fp16 on CUDA."""
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(f"--amp fp16 needs a CUDA device (this run is on {device.type}); use "
                         "--amp bf16")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    # No cache of low-precision weight copies: a CUDA graph cannot hold one across its
    # capture, and each weight is used once per forward here, so the cache saved nothing.
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "none", cache_enabled=False)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time measures work done, not queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------
# CUDA graphs: a captured sequence of kernels replayed with one launch (see graphs.py)


def rehearse(function: Callable[[], Any], times: int) -> None:
    """Call `function` `times` times on a side stream, as CUDA graph capture wants: the lazy
    set-up (cuBLAS and cuDNN workspaces, optimiser state) happens here, not in the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            function()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture(function: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture one call of `function` in a CUDA graph; return (graph, its output). Nothing is
    computed now: each `graph.replay()` runs the captured kernels on the same memory, with
    fresh random numbers from the default generator."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread may use CUDA while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = function()
    return graph, output


def describe(device: torch.device) -> str:
    """The hardware a number was measured on, for logs and benchmark tables."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
