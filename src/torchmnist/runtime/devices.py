"""Device choice, seeding, determinism and threads: the only module that asks torch.cuda/mps.

Everything here runs before the first tensor touches an accelerator, because two of the
switches (CUDA_LAUNCH_BLOCKING and CUBLAS_WORKSPACE_CONFIG) are read only when CUDA starts.
"""

from __future__ import annotations

import os
import platform
import random
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchmnist.errors import UsageError, counted


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


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn --device auto|cpu|cuda|mps into a torch.device, or explain why it is unavailable.
    From Python, `cuda:N` and a torch.device are taken too."""
    name = str(name)
    if name == "auto":
        available = torch.accelerator.is_available()
        return torch.accelerator.current_accelerator() if available else torch.device("cpu")
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
    """What keeps `set_rng_state` from taking a saved state, or None: tried for real on the CPU
    generators (put back afterwards); a CUDA state is only checked for its type."""
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


# ---- CUDA graphs: a captured sequence of kernels replayed with one launch (see graphs.py) --------


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
    """Capture one call of `function` in a CUDA graph; return (graph, its output). Each replay
    runs the kernels on the same memory, with fresh random numbers."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread may use CUDA while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = function()
    return graph, output


def describe(device: torch.device) -> str:
    """The hardware a number was measured on, for logs and benchmark tables. On the CPU it
    names the vector extensions and whether bf16 is native, since those decide the speed."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    bf16 = "native" if bf16_native(device) else "emulated"
    return (f"{cpu_name()} ({cpu_extensions()}; bf16 {bf16}), {os.cpu_count()} cores, "
            f"{counted(torch.get_num_threads(), 'torch thread')}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- Precision: bf16 where the hardware computes in it, fp32 where it would only be emulated -----

# The vector extensions that decide how fast a CPU trains, as torch's cpuinfo names them, and
# as a reader knows them; _NATIVE_BF16 are those that compute in bf16.
_EXTENSIONS = (("avx2", "AVX2"), ("avx512_f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
               ("sve", "SVE"), ("bf16", "BF16"), ("avx512_bf16", "AVX512-BF16"),
               ("amx_bf16", "AMX-BF16"))
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def _cpu_capabilities() -> dict:
    """The CPU's instruction sets, as torch's cpuinfo reads them."""
    if hasattr(torch.cpu, "get_capabilities"):  # torch 2.12 and later
        return dict(torch.cpu.get_capabilities())
    # torch 2.11 answers for the x86 sets only, through private helpers.
    return {"avx2": torch.cpu._is_avx2_supported(), "avx512_f": torch.cpu._is_avx512_supported(),
            "avx512_vnni": torch.cpu._is_vnni_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "amx_bf16": torch.cpu._is_amx_tile_supported()}


def cpu_extensions() -> str:
    """The CPU's vector extensions that matter here, and the kernels torch runs with (fewer
    where ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA cap them): "AVX2 AVX-512 AVX512-BF16,
    torch kernels AVX512"."""
    capabilities = _cpu_capabilities()
    names = [shown for key, shown in _EXTENSIONS if capabilities.get(key)]
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return (f"{' '.join(names) or 'no vector extensions'}, torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}"
            + (f", oneDNN capped at {capped}" if capped else ""))


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes in bf16 itself, so bf16 autocast beats fp32: on a CPU, the
    instructions (AVX512-BF16, AMX, Arm BF16) and kernels that use them, oneDNN's and torch's
    (their caps honoured). Emulated bf16 is slower than fp32 (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False  # MPS: not measured, so fp32, which every Mac runs
    capabilities = _cpu_capabilities()
    # torch has no public check of oneDNN's bf16 support; this private one honours its cap.
    return (any(capabilities.get(name) for name in _NATIVE_BF16)
            and torch.backends.cpu.get_cpu_capability() in ("AVX512", "SVE256")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision(device: torch.device, amp: str) -> tuple[str, str]:
    """What a run asking for --amp `amp` trains in on `device` (none, bf16 or fp16), and the
    line its log opens with to say so. `auto` (the fast and best recipes) is bf16 where the
    device computes in it, else fp32; an explicit choice is kept, with a note where it is slow."""
    native = bf16_native(device)
    where = "on this CPU" if device.type == "cpu" else f"on {device.type}"
    if amp == "auto":
        if native:
            return "bf16", f"precision: bf16 autocast (bf16: native {where})"
        return "none", f"precision: fp32 (bf16: emulated {where}, so using fp32)"
    if amp == "bf16" and not native:
        return "bf16", (f"precision: bf16 autocast, as asked (note: bf16 is emulated {where} "
                        "and slower than fp32; --amp auto chooses for the hardware)")
    return amp, {"none": "precision: fp32", "bf16": f"precision: bf16 autocast (native {where})",
                 "fp16": "precision: fp16 autocast with a gradient scaler"}[amp]


def busy_cores(window: float = 0.05) -> float | None:
    """How many of this machine's cores other work kept busy over the next `window` seconds
    (from /proc/stat, so Linux only; None elsewhere). This process is idle meanwhile."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, and idle + waiting for I/O

    try:
        total_before, idle_before = ticks()
        time.sleep(window)
        total_after, idle_after = ticks()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle_after - idle_before) / total)


def crowding_note(device: torch.device, threads: int | None) -> str | None:
    """A note when other work keeps a core busy and torch runs a thread per core, its threads
    then waiting behind that work. Not changed for the user: it changes the arithmetic."""
    if device.type != "cpu" or threads is not None or "OMP_NUM_THREADS" in os.environ:
        return None
    busy = busy_cores()
    if busy is None:
        return None
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    free = max(1, round(cores - busy))  # the threads that would run beside that work
    if threads <= free:
        return None
    return (f"note: other work keeps {busy:.1f} of {counted(cores, 'core')} busy, and torch "
            f"runs {counted(threads, 'thread')}: that can take several times as long as "
            f"--threads {free}, which runs beside it")
