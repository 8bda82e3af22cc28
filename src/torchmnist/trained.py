"""A trained network, from any file torchmnist reads, ready for inference: what `test`,
`predict`, `export`, `report`, `serve` and `torchmnist.load` start from.

A training checkpoint or run folder brings its model name, dataset spec (normalisation and
classes) and metrics; a plain state_dict or safetensors file is recognised by its parameter
names and shapes. The file itself is read by `checkpoint.load`, which refuses hostile ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchmnist import models
from torchmnist.data import datasets
from torchmnist.errors import UsageError
from torchmnist.runtime import devices
from torchmnist.storage import checkpoint


@dataclass
class Trained:
    """A trained network ready for inference, and what it was trained on."""

    model: nn.Module  # in eval mode
    name: str  # the --model name
    dataset: str  # the --dataset value
    config: dict | None  # the run's config, for a full checkpoint
    spec: Any = None  # datasets.DatasetSpec: the normalisation and the class names
    history: list = field(default_factory=list)  # a full checkpoint's metrics.jsonl records


def load_network(path: str | os.PathLike, *, model: str | None = None,
                 dataset: str | None = None, device: str = "auto") -> nn.Module:
    """The trained network of a checkpoint, run folder, state_dict or safetensors file, on
    `device` and in eval mode, ready for `network(x)` on normalised (N, 1, 28, 28) images.
    (`torchmnist.load`.)"""
    return load_model(path, model=model, dataset=dataset).model.to(
        devices.resolve_device(device))


def load_model(path: str | os.PathLike, *, model: str | None = None,
               dataset: str | None = None) -> Trained:
    """The network in a checkpoint, plain state_dict or safetensors file, on the CPU: model and
    dataset from the checkpoint's config, else recognised by its parameters' names and shapes
    (and MNIST unless named)."""
    path = checkpoint.file_in(path)
    saved = checkpoint.load(path)
    state_dict, config = checkpoint.weights(saved, path)
    config = config or {}
    spec = _dataset_spec(saved, config, dataset, path)
    written = _safetensors_metadata(path)  # what torchmnist wrote into one: its model's name
    named = written.get("model") if isinstance(written, dict) else None
    name = (model or config.get("model") or (named if isinstance(named, str) else None)
            or models.matching_model(state_dict, len(spec.classes)))
    if name is None:
        raise UsageError(f"{path} does not match any known model "
                         f"({', '.join(models.MODELS)}); name one with --model")
    if models.is_import_path(name) and model is None:
        raise UsageError(f"{path} holds your own model {name}; pass --model {name} to load it "
                         "(torchmnist imports no code that a checkpoint names by itself)")
    if name not in models.MODELS and not models.is_import_path(name):
        raise UsageError(f"--model must be one of {', '.join(models.MODELS)} or an import path "
                         f"such as mypackage.nets:MyNet, not {name!r}")
    network = models.build(name, len(spec.classes))
    try:
        network.load_state_dict(state_dict)
    except RuntimeError:
        found = models.matching_model(state_dict, len(spec.classes))
        hint = f" (it matches --model {found})" if found else ""
        raise UsageError(f"{path} does not hold weights for the {name!r} model{hint}") from None
    if hasattr(network, "exit_threshold") and "exit_threshold" in config:  # early-exit
        network.exit_threshold = config["exit_threshold"]
    full = checkpoint.is_training_checkpoint(saved)
    history = (saved.get(checkpoint.METRICS) or []) if full else []
    return Trained(network.eval(), name, spec.name, config or None, spec, history)


def _safetensors_spec(path: Path) -> Any:
    """The dataset spec a safetensors file written by torchmnist keeps in its metadata (as JSON
    text under DATASET_SPEC), or None; {} for metadata that cannot be read."""
    metadata = _safetensors_metadata(path)
    if metadata is None or not isinstance(metadata, dict):
        return None if metadata is None else {}
    try:
        text = metadata.get(checkpoint.DATASET_SPEC)
        return json.loads(text) if text is not None else None
    except (TypeError, ValueError):
        return {}


def _safetensors_metadata(path: Path) -> Any:
    """A safetensors file's text metadata (`__metadata__`), None for another kind of file or
    none at all, {} for metadata that cannot be read."""
    if not (path.suffix == ".safetensors" or checkpoint.looks_like_safetensors(path)):
        return None
    try:
        # The header itself (8 bytes of length, then JSON), which safetensors' safe_open would
        # read, but only from a file with a UTF-8 name.
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length < path.stat().st_size:
                return {}
            header = json.loads(f.read(length))
        return header.get("__metadata__")
    except Exception:  # noqa: BLE001 - unreadable metadata: a damaged spec, said by the caller
        return {}


def _dataset_spec(saved: Any, config: dict, dataset: str | None, path: Path):
    """What the network was trained on: the spec its checkpoint stored, else (a checkpoint
    from before specs were stored, or bare weights) the built-in dataset named by --dataset,
    by its config, else MNIST."""
    if dataset is not None:
        if not datasets.is_builtin(dataset):
            raise UsageError(f"--dataset {dataset} cannot be given for {path}: only a "
                             "checkpoint of a run on that data knows its normalisation and "
                             "classes")
        return datasets.DATASETS[dataset]
    stored = (saved.get(checkpoint.DATASET_SPEC) if checkpoint.is_training_checkpoint(saved)
              else _safetensors_spec(path))
    if stored is not None:
        try:
            return datasets.DatasetSpec.from_dict(stored)
        except ValueError as error:
            raise UsageError(f"{path} is a damaged checkpoint: {error}") from None
    name = config.get("dataset") or "mnist"
    if not isinstance(name, str) or not datasets.is_builtin(name):
        raise UsageError(f"{path} is a damaged checkpoint: it was trained on {name!r} but does "
                         "not say how that data was normalised")
    return datasets.DATASETS[name]
