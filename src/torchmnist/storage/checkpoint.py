"""Checkpoints: atomic saving, safe loading, and reading weights from other scripts' files.

A torchmnist checkpoint is one `torch.save` file holding a dict: the resolved config, the
model's, optimiser's, scheduler's, scaler's and weight average's state_dicts, the progress
counters, every RNG stream, the validation split, the data's spec, the metrics so far, and the
state of every other rank (`training_payload`; docs/reliability.md describes each key).
Everything in it is a tensor or a plain Python value, so it loads with
`torch.load(weights_only=True)`, which never runs code hidden in a pickle.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from torchmnist import __version__
from torchmnist.config import DATASETS, RESULT_KEYS, TrainConfig, checked, is_number
from torchmnist.errors import UsageError, is_utf8, printable
from torchmnist.runtime import devices
from torchmnist.storage.rundir import write_atomically

FORMAT_VERSION = 1
# The keys of a training checkpoint, one constant each: `training_payload` builds the dict,
# `restore` and `load_training` read it, and nothing else spells them.
CONFIG, MODEL, OPTIMIZER, SCHEDULER, SCALER, EMA = (
    "config", "model", "optimizer", "scheduler", "scaler", "ema")
PROGRESS, RNG, VAL_INDEX, DATASET_SPEC, METRICS = (
    "progress", "rng", "val_index", "dataset_spec", "metrics")
WORLD_SIZE, RANKS, HARDWARE = "world_size", "ranks", "hardware"


def training_payload(*, config: dict, model: dict, optimizer: dict, scheduler: dict | None,
                     scaler: dict | None, ema: dict | None, progress: dict, rng: dict,
                     val_index: torch.Tensor | None, dataset_spec: dict,
                     metrics: list[dict], world_size: int = 1,
                     ranks: list[dict] | None = None, hardware: str = "") -> dict[str, Any]:
    """Everything a run needs to continue from the very next batch."""
    return {CONFIG: config, MODEL: model, OPTIMIZER: optimizer, SCHEDULER: scheduler,
            SCALER: scaler, EMA: ema, PROGRESS: progress, RNG: rng, VAL_INDEX: val_index,
            DATASET_SPEC: dataset_spec, METRICS: metrics, WORLD_SIZE: world_size,
            RANKS: ranks or [], HARDWARE: hardware}


def restore(saved: dict, path: Path, *, model: nn.Module, optimizer, scheduler, scaler,
            ema) -> None:
    """Put a checkpoint's weights, optimiser, schedule, scaler, average and RNG streams back."""
    try:
        model.load_state_dict(saved[MODEL])
        _check_hyperparameters(optimizer.param_groups, saved[OPTIMIZER]["param_groups"])
        optimizer.load_state_dict(saved[OPTIMIZER])
        _check_optimizer_state(optimizer)
        if scheduler is not None:
            problem = _mismatch(saved[SCHEDULER], scheduler.state_dict(), "the schedule's")
            if problem:
                raise ValueError(problem)
            scheduler.load_state_dict(saved[SCHEDULER])
        if saved.get(SCALER):
            scaler.load_state_dict(saved[SCALER])
        if ema is not None:
            ema.load_state_dict(saved[EMA])
            if int(ema.n_averaged) < 0:  # 0 means "copy the weights at the next update"
                raise ValueError("the weight average's count of updates is negative")
        devices.set_rng_state(saved[RNG])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines()] or [type(error).__name__]
        # Below load_state_dict's heading ("Error(s) in loading ...:"), the first real line.
        detail = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
        raise UsageError(f"{path} does not fit the {saved[CONFIG].get('model')!r} model and "
                         f"its optimiser: {detail}") from None


def _check_hyperparameters(fresh: list[dict], saved: list[dict]) -> None:
    """Each saved setting of a parameter group (lr, betas...) of the fresh one's kind:
    load_state_dict takes any value, and the first step would fail on an lr of 'x'."""
    for mine, theirs in zip(fresh, saved, strict=False):  # torch itself names a count mismatch
        problem = _mismatch({k: v for k, v in theirs.items() if k != "params"}, mine,
                            "the optimiser's")
        if problem:
            raise ValueError(problem)


def _mismatch(saved: Any, fresh: Any, name: str) -> str | None:
    """Where `saved` is not of `fresh`'s kind, looking into mappings and lists, or None (only
    keys both have: another torch version may save a few more or fewer)."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"{name} state is {_short(saved)}, not a mapping"
        for key in [k for k in saved if k in fresh]:
            problem = _mismatch(saved[key], fresh[key], f"{name} {key}")
            if problem:
                return problem
        return None
    if isinstance(fresh, list | tuple) and not _are_numbers(fresh):
        if not (isinstance(saved, list | tuple) and len(saved) == len(fresh)):
            return f"{name} is {_short(saved)}, not a list of {len(fresh)}"
        for i, (theirs, mine) in enumerate(zip(saved, fresh, strict=True)):
            problem = _mismatch(theirs, mine, f"{name}[{i}]")
            if problem:
                return problem
        return None
    if _kind(saved) != _kind(fresh):
        return f"{name} is {_short(saved)}, not {_kind(fresh)}"
    return None


def _kind(value: Any) -> str:
    if value is None or isinstance(value, bool):  # foreach, fused: None means "let torch pick"
        return "true or false"
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value = value.item()  # a rate kept on the device
    if is_number(value) and math.isfinite(value):
        return "a finite number"
    if _are_numbers(value):
        return f"{len(value)} finite number{'' if len(value) == 1 else 's'}"
    return "text" if isinstance(value, str) else type(value).__name__


def _are_numbers(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(_kind(v) == "a finite number" for v in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_optimizer_state(optimizer) -> None:
    """The tensors kept per weight (momentum, Adam's moments), which load_state_dict does not
    check: one of another shape would fail the first step."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:  # Adam's step, say
                continue
            if value.layout != torch.strided:
                raise ValueError(f"the optimiser's {key} is not a dense tensor ({value.layout})")
            if value.shape != param.shape:
                raise ValueError(f"the optimiser's {key} has shape {tuple(value.shape)} where "
                                 f"its weight has shape {tuple(param.shape)}")


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (see `rundir.write_atomically`)."""
    payload = {"format_version": FORMAT_VERSION, "torchmnist_version": __version__,
               "torch_version": str(torch.__version__), **payload}
    write_atomically(Path(path), lambda f: torch.save(payload, f))


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write bare weights: `.safetensors` (with text `metadata`) or a torch state_dict file."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save as to_safetensors

        write_atomically(path, lambda f: f.write(to_safetensors(tensors, metadata=metadata)))
    else:
        write_atomically(path, lambda f: torch.save(tensors, f))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint or state_dict file safely, or explain in one sentence why not."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint file at {path}")
    if path.stat().st_size == 0:
        raise UsageError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        return _load_safetensors(path)
    _check_torch_save_format(path)
    try:
        with warnings.catch_warnings():
            # The outcome is told, not torch's warnings on pickle protocols and sparse checks.
            for warning in ("Detected pickle protocol", "Validating sparse tensor",
                            "Sparse invariant checks"):
                warnings.filterwarnings("ignore", message=warning)
            # Sparse tensors checked as they load: a malformed one could crash the process later.
            with torch.sparse.check_sparse_tensor_invariants():
                loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only=True stopped the unpickler: it names the GLOBAL it refused when the file
        # asks for a Python object (os.system, say); anything else is not a pickle at all.
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise UsageError(
                f"refusing to load {path}: it asks for the Python object {refused.group(1)}, "
                "which could run code when unpickled, and torchmnist only loads tensors and "
                "plain values") from None
        if "Unsupported operand" in str(error):
            # Protocols other than 2 and 3 write opcodes the weights-only unpickler lacks.
            raise UsageError(
                f"{path} was written by torch.save with a pickle protocol that torch cannot "
                "load without the risk of running code in it; if you trust the file, load it "
                "with torch.load(weights_only=False) and save it again with torch.save"
            ) from None
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt?)") from None
    except Exception as error:  # noqa: BLE001 - damaged bytes fail in many ways (KeyError,
        # struct.error, zipfile.BadZipFile, RuntimeError, ...), all of which mean the same
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt?)"
                         f"{': ' + detail if detail else ''}") from None
    _refuse_empty_tensors(loaded, path)
    return loaded


def _refuse_empty_tensors(loaded: Any, path: Path) -> None:
    """One sentence for a tensor on the meta device (no values), which loads without complaint
    and fails where it is first used ("Cannot copy out of meta tensor")."""
    # A loop over each container once: nesting may be deep, and a list may hold itself.
    pending, seen = collections.deque([("", loaded)]), set()
    while pending:
        where, value = pending.popleft()
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise UsageError(f"{path} is a damaged checkpoint: {where or 'it'} holds no values "
                             "(a tensor on the meta device)")
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            pending += [(f"{where}.{key}".lstrip("."), item) for key, item in value.items()]
        elif isinstance(value, list | tuple):
            pending += [(f"{where}[{i}]", item) for i, item in enumerate(value)]


# torch.save's format before torch 1.6 (still written with _use_new_zipfile_serialization=False)
# starts with the pickle of torch.serialization's magic number, 0x1950a86a20f9469cfc6c: LONG1
# with its 10 bytes from protocol 2 on, the decimal LONG in protocols 0 and 1.
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_LEGACY_MAGIC_TEXT = b"L119547037146038801333356L"


def _check_torch_save_format(path: Path) -> None:
    """Name a file that torch.save did not write, from its first bytes, in one sentence (torch's
    own errors, "Invalid magic number" and alike, describe its parser, not the file)."""
    with open(path, "rb") as f:
        start = f.read(32)
    if start.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError):
            # Most often a checkpoint cut short: the archive's directory is written last.
            raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                             "its zip archive has no complete directory") from None
        names = [entry.filename for entry in entries]
        # torch.save's archive is one folder holding data.pkl (the pickle) and data/ (tensors);
        # TorchScript's (torch.jit.save, `torchmnist export --format torchscript`) adds code/.
        if any(re.fullmatch(r"[^/]+/code/.+", name) for name in names):
            raise UsageError(f"{path} is a TorchScript program (such as `torchmnist export` "
                             "writes), not a checkpoint; use the checkpoint it was exported "
                             "from, or run it with torch.jit.load")
        if not any(re.fullmatch(r"[^/]+/data\.pkl", name) for name in names):
            raise UsageError(f"{path} is a zip archive, but not one that torch.save writes "
                             "(it holds no data.pkl)")
        _check_stored_sizes(path, entries)  # (TorchScript, named above, deflates its code)
    elif start.startswith(b"\x80"):
        if _LEGACY_MAGIC not in start:
            raise UsageError(f"{path} is a Python pickle, but not one that torch.save writes")
    elif path.suffix == ".onnx":
        raise UsageError(f"{path} is an ONNX model, not a checkpoint; use the checkpoint it "
                         "was exported from, or run it with onnxruntime")
    elif not start.startswith(_LEGACY_MAGIC_TEXT):
        raise UsageError(f"{path} is not a readable checkpoint: it is neither a file that "
                         "torch.save writes nor safetensors")


def _check_stored_sizes(path: Path, entries: list[zipfile.ZipInfo]) -> None:
    """Refuse an archive that unpacks to more bytes than it holds, before torch reads it:
    torch.save stores entries as they are, but torch.load also reads compressed and overlapping
    ones, with which a few megabytes could unpack to all the memory there is."""
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise UsageError(f"{path} is a zip archive with compressed entries, which torch.save "
                         "never writes (and which could unpack to any size); it is not "
                         "loaded")
    claimed, size = sum(entry.file_size for entry in entries), path.stat().st_size
    if claimed > size:
        raise UsageError(f"{path} is a zip archive whose entries claim {claimed:,} bytes, more "
                         f"than its own {size:,}: not one that torch.save writes; it is not "
                         "loaded")


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        start = f.read(9)
    return (len(start) == 9 and start[8:9] == b"{"
            and int.from_bytes(start[:8], "little") < path.stat().st_size)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        # safetensors opens UTF-8 names only; others are read here and handed over as bytes.
        return load_file(path) if is_utf8(str(path)) else load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{printable(str(path))} is not a readable safetensors file: "
                         f"{error}") from None


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "format_version" in obj and MODEL in obj


def weights(obj: Any, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state_dict in a loaded file (a checkpoint, a plain state_dict such as the guide's
    `model.pth`, a safetensors file's tensors), and the run's config for a checkpoint."""
    if is_training_checkpoint(obj):
        config = obj.get(CONFIG)
        if not isinstance(config, dict):
            what = ("has no config" if config is None else
                    f"has a {type(config).__name__} where its config should be")
            raise UsageError(f"{path} is a damaged checkpoint: it {what}")
        try:
            config = checked(config)
        except UsageError as error:
            raise UsageError(f"{path} is a damaged checkpoint: in its config, {error}") from None
        # An average of the weights is what the run tested: ship that one.
        state = obj[EMA] if obj.get(EMA) else obj[MODEL]
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k != "n_averaged"}
        return _checked_tensors(state, path), config
    if isinstance(obj, dict) and obj and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return _checked_tensors(obj, path), None
    raise UsageError(f"{path} is neither a torchmnist checkpoint nor a model state_dict")


def _checked_tensors(state_dict: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict, if it is one and every value in it is finite; else one sentence."""
    if not (isinstance(state_dict, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items())):
        raise UsageError(f"{path} is a damaged checkpoint: its weights are not a mapping of "
                         "names to tensors")
    for name, tensor in state_dict.items():
        # torch.load also rebuilds sparse, quantised and complex tensors, which no layer takes.
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex():
            raise UsageError(f"{path} is a damaged checkpoint: {name} is not a dense tensor of "
                             f"real numbers ({tensor.layout}, {tensor.dtype})")
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise UsageError(f"{path} holds NaN or infinite values in {name}; weights like "
                             "these give no usable predictions")
    return _strip_wrappers(state_dict)


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel saves "module.conv1.weight", torch.compile "_orig_mod.conv1...".
    state_dict = collections.OrderedDict(state_dict)  # torch strips in place: not the caller's
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return dict(state_dict)


def find_resume(resume: str, run_dir: str | None, runs_dir: str = "runs") -> Path:
    """--resume PATH names a checkpoint or a run directory; a bare --resume ("last") means
    last.pt in --run-dir, or in the most recently written run under runs/."""
    if resume != "last":
        path = Path(resume)
        return path / "last.pt" if path.is_dir() else path
    if run_dir is not None:
        return Path(run_dir) / "last.pt"
    # Plain files only; of two written in one tick of a coarse clock, the later name (runs
    # are named by their date and time).
    candidates = sorted((p for p in Path(runs_dir).glob("*/last.pt") if p.is_file()),
                        key=lambda p: (p.stat().st_mtime_ns, p.parent.name))
    if not candidates:
        raise UsageError(f"--resume found no checkpoint: there is no {runs_dir}/*/last.pt here; "
                         "pass --resume PATH or --run-dir DIR")
    return candidates[-1]


def load_training(path: Path) -> dict:
    """Load a full training checkpoint (not bare weights), ready to resume from."""
    saved = load(path)
    if not is_training_checkpoint(saved) or PROGRESS not in saved:
        raise UsageError(f"{path} holds model weights only, not a training checkpoint to resume "
                         "(use `torchmnist test` to evaluate it)")
    for key in (CONFIG, PROGRESS):
        if not isinstance(saved.get(key), dict):
            raise UsageError(f"{path} is a damaged checkpoint: it has no {key} to resume from")
    problem = _training_state_problem(saved)
    if problem:
        raise UsageError(f"{path} is a damaged checkpoint: {problem}")
    _checked_tensors(saved[MODEL], path)  # a mapping of finite tensors
    # The weights and the average, if there is one, and the settings each of its field's type.
    _, saved[CONFIG] = weights(saved, path)
    return saved


def _training_state_problem(saved: dict) -> str | None:
    """What is wrong with the parts only a resume reads, or None: checked before anything is
    written, so a crafted file never half-rewrites the run folder."""
    if not isinstance(saved.get(RANKS) or [], list):
        return "its per-process states are not a list"
    for own in [saved, *(saved.get(RANKS) or [])]:
        if not (isinstance(own, dict) and isinstance(own.get(PROGRESS), dict)
                and isinstance(own.get(RNG), dict)):
            return "a process's progress or random generator states are missing"
        problem = _progress_problem(own[PROGRESS])
        if problem:
            return f"its progress {problem}"
        problem = devices.rng_state_problem(own[RNG])
        if problem:
            return f"its random generator states do not load ({problem})"
    problem = _optimizer_problem(saved.get(OPTIMIZER))
    if problem:
        return problem
    world_size = saved.get(WORLD_SIZE, 1)
    if not (is_number(world_size, whole=True) and world_size >= 1):
        return "its number of processes is not a whole number"
    metrics = saved.get(METRICS) or []
    if not (isinstance(metrics, list) and all(isinstance(r, dict) for r in metrics)):
        return "its metrics are not a list of records"
    if not all(_is_plain_record(r) for r in metrics):
        return "its metrics hold values that are not plain JSON numbers or text"
    return None


def _is_plain_record(record: dict) -> bool:
    """A metrics record as torchmnist writes it: names to numbers, text or null, nothing nested
    (from Python 3.12 json.dumps nests deeper than the next checkpoint's pickler can)."""
    return all(isinstance(name, str) and (
        value is None or isinstance(value, str) or is_number(value, whole=True)
        or (is_number(value) and math.isfinite(value))) for name, value in record.items())


def _optimizer_problem(state: Any) -> str | None:
    # The layout torch's Optimizer.state_dict() has; its values are checked once the optimiser
    # they are for exists (restore).
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        return "it has no optimiser state"
    if not all(isinstance(per_weight, dict) for per_weight in state["state"].values()):
        return "its optimiser's per-weight states are not mappings"
    if not all(isinstance(group, dict) and isinstance(group.get("params"), list)
               for group in state["param_groups"]):
        return "its optimiser's parameter groups are damaged"
    return None


def _progress_problem(progress: dict) -> str | None:
    # Keys a checkpoint lacks keep their defaults (older versions saved fewer).
    for key in ("epoch", "batch", "step", "stale_tests", "epoch_images", "window_batches"):
        value = progress.get(key, 1)
        if not (is_number(value, whole=True) and value >= (1 if key == "epoch" else 0)):
            return f"has no count for {key}"
    for key in ("seconds", "best_accuracy", "target_seconds"):
        value = progress.get(key, 0.0)
        if not ((value is None and key != "seconds")
                or (is_number(value) and math.isfinite(value))):
            return f"has no number for {key}"
    for key in ("epoch_loss_sum", "epoch_correct_sum", "window_loss_sum"):
        value = progress.get(key, 0.0)
        if not ((isinstance(value, torch.Tensor) and value.numel() == 1) or is_number(value)):
            return f"has no number for {key}"
    return None


def check_compatible(saved_config: dict, config: TrainConfig) -> list[str]:
    """Refuse a resume that would not continue the same run; describe the harmless changes."""
    values = config.to_dict()
    keys = RESULT_KEYS
    if saved_config.get("scheduler") == "onecycle":  # its schedule is laid over all epochs
        keys = (*RESULT_KEYS, "epochs")
    # A key the checkpoint lacks was added after it was written; its run used the default.
    saved_config = {**TrainConfig().to_dict(), **saved_config}
    conflicts = [k for k in keys if saved_config.get(k) != values[k]]
    if conflicts:
        details = ", ".join(f"{k} (checkpoint: {saved_config.get(k)!r}, now: {values[k]!r})"
                            for k in conflicts)
        raise UsageError(f"cannot resume with a different {details}; these change the result, "
                         "so start a new run or drop those flags")
    return [f"{k}: {saved_config[k]!r} in the checkpoint, {values[k]!r} now (now wins)"
            for k in values if k not in ("resume", "run_dir") and k in saved_config
            and saved_config[k] != values[k]]


MODEL_FOLDER_KEY = "torchmnist_model_folder"  # in the config.json of `export --format folder`


def file_in(path: str | os.PathLike) -> Path:
    """A checkpoint file as given; for a run folder its last.pt, for a model folder (`export
    --format folder`) its model.safetensors."""
    if not os.fspath(path).strip():  # Path("") is the current folder, a surprise here
        raise UsageError("the checkpoint path is empty: name a checkpoint or a run folder")
    path = Path(path)
    if not path.is_dir():
        return path
    return path / "model.safetensors" if is_model_folder(path) else path / "last.pt"


def is_model_folder(folder: Path) -> bool:
    """A folder `torchmnist export --format folder` wrote: its config.json says so."""
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            return json.loads(f.read(1_000_000)).get(MODEL_FOLDER_KEY) == 1
    except (OSError, ValueError, AttributeError):
        return False


def contract(name: str, spec: Any) -> dict[str, str]:
    """What an exported file (and model.safetensors) expects and returns, as its metadata."""
    made = ("white ink on black, MNIST-style" if spec.name in DATASETS
            else "made as the training images were")
    return {
        "torchmnist_version": __version__, "model": name, "dataset": spec.name,
        DATASET_SPEC: json.dumps(spec.to_dict(), allow_nan=False),
        "mean": repr(spec.mean), "std": repr(spec.std),
        "classes": json.dumps(spec.classes, allow_nan=False),
        "input": f"float32 (N, 1, 28, 28): 28x28 images in [0, 1], {made} "
                 f"(torchmnist.data.preprocess), then (x - {spec.mean}) / {spec.std}",
        "output": f"float32 (N, {len(spec.classes)}) log-probabilities (logits): softmax gives "
                  "probabilities",
    }
