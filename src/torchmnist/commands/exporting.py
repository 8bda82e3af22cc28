"""`torchmnist export`: ship a trained model as ONNX, a torch.export program (pt2),
TorchScript, safetensors, or a model folder (safetensors, config.json and a model card), verified.

Every exported model takes normalised float32 (N, 1, 28, 28) images and returns (N, classes)
log-probabilities. What was written is loaded back as its users will load it and run on 256
test images; only if it matches PyTorch within 1e-4 does it appear under its name, so a failed
export never replaces a good one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchmnist.config import PATH_FIELDS
from torchmnist.data import datasets, loaders, own
from torchmnist.engines import quiet, run_onnx, write_onnx
from torchmnist.errors import TorchMnistError, UsageError, printable
from torchmnist.evaluation import test_data
from torchmnist.storage import checkpoint, rundir
from torchmnist.trained import load_model

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt",
           "safetensors": ".safetensors", "folder": "-model"}
KINDS = {"onnx": "an ONNX", "pt2": "a torch.export", "torchscript": "a TorchScript",
         "safetensors": "a safetensors", "folder": "a model folder's"}
TOLERANCE = 1e-4
PARITY_IMAGES = 256


class ExportError(TorchMnistError):
    """The exported file does not compute what the model computes: exit 1."""

    exit_code = 1


def format_named_by(out: str | os.PathLike) -> str | None:
    """The format a file name says (m.onnx, m.torchscript.pt, m.safetensors), or None (m.pt
    could as well be a state_dict)."""
    name = Path(out).name.lower()
    return next((format for format, suffix in FORMATS.items()
                 if format != "folder" and name.endswith(suffix)), None)


def export(checkpoint_path: str | os.PathLike, format: str | None = None,
           out: str | os.PathLike | None = None, *, model: str | None = None,
           dataset: str | None = None, data_dir: str | os.PathLike | None = None,
           download: bool = True) -> dict:
    """Export, check parity on 256 test images, and return what was written and measured.
    Without `format`, the one `out`'s name ends as (model.onnx); a folder is asked for by
    name (`format="folder"`)."""
    source = checkpoint.file_in(checkpoint_path)  # a run folder: its last.pt
    format, out = _format_and_target(source, format, out)
    trained = load_model(source, model=model, dataset=dataset)
    spec = trained.spec
    network = trained.model.float().eval()
    if hasattr(network, "exit_threshold"):  # early-exit: the file holds the whole network
        network.exit_threshold = 1.0

    if trained.dataset.startswith(datasets.OWN_PREFIX):
        # Data given from Python is not on disk; synthetic images exercise every layer as well.
        test = own.synthetic(seed=0).test
    else:
        test = test_data(trained, data_dir, download=download).test
    x = loaders.normalize(test.images[:PARITY_IMAGES], spec.mean, spec.std)  # (256, 1, 28, 28)
    with torch.inference_mode():
        expected = network(x).numpy()

    rundir.make_folder(out.parent, "--out")
    # Written under a temporary name ending as the format's files do, checked, then renamed
    # to --out; made first, it also asks whether the folder takes a file at all.
    try:
        partial = (rundir.temporary_folder_beside(out) if format == "folder" else
                   rundir.temporary_beside(out, FORMATS[format]))
    except OSError as error:
        raise UsageError(f"cannot write into {out.parent}: {error.strerror or error}; choose "
                         "another --out") from None
    try:
        try:
            if format == "onnx":
                write_onnx(network, x, partial, checkpoint.contract(trained.name, spec))
                actual = run_onnx(partial, x.numpy())
            elif format == "pt2":
                _write_pt2(network, x, partial, checkpoint.contract(trained.name, spec))
                actual = _run_pt2(partial, x)
            elif format == "torchscript":
                _write_torchscript(network, x, partial, checkpoint.contract(trained.name, spec))
                actual = _run_torchscript(partial, x)
            elif format == "folder":
                _write_folder(trained, network, partial)
                actual = _run_safetensors(partial, trained.name, x)
            else:
                checkpoint.save_weights(partial, network.state_dict(),
                                        checkpoint.contract(trained.name, spec))
                actual = _run_safetensors(partial, trained.name, x)
        except TorchMnistError:
            raise
        except Exception as error:  # noqa: BLE001 - an exporter or runtime that fails
            raise ExportError(f"the {format} export of the {trained.name} model failed "
                              f"({_root_cause(error)}); {out} was not written") from None
        difference = float(np.abs(actual - expected).max())
        agree = float((actual.argmax(1) == expected.argmax(1)).mean())
        if not difference <= TOLERANCE:
            raise ExportError(f"the {format} export does not match PyTorch: largest absolute "
                              f"difference {difference:.3g} on {len(x)} test images exceeds "
                              f"{TOLERANCE:g}; {out} was not written")
        rundir.replace_atomically(partial, out)
    finally:
        rundir.drop_temporary(partial)
    return {"file": str(out), "format": format, "model": trained.name, "dataset": spec.name,
            "parity_images": len(x), "max_abs_diff": difference, "same_predictions": agree,
            "tolerance": TOLERANCE, "bytes": _size(out)}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _format_and_target(source: Path, format: str | None,
                       out: str | os.PathLike | None) -> tuple[str, Path]:
    """The format to write and the file to write it to, or one sentence: `out` names the
    format when `format` does not, a folder takes a file named after the checkpoint, and
    neither the checkpoint, a file its run keeps nor a device is ever written over."""
    named = format_named_by(out) if out and not Path(out).is_dir() else None
    if format is None:
        if named is None:
            raise UsageError("say which format to write: --format onnx, pt2, torchscript, "
                             "safetensors or folder, or an --out ending .onnx, .pt2, "
                             ".torchscript.pt or .safetensors")
        format = named
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if named not in (None, format):
        # A file that says one format and holds another is opened by the wrong tool later.
        raise UsageError(f"--out {printable(str(out))} is named as {KINDS[named]} file, but "
                         f"--format is {format}: give an --out ending {FORMATS[format]}, or "
                         "leave --format out")
    default_name = source.name.split(".")[0] + FORMATS[format]
    out = Path(out) if out else source.with_name(default_name)
    if format == "folder":
        if out.exists() and not (checkpoint.is_model_folder(out) or (
                out.is_dir() and not out.is_symlink() and not any(out.iterdir()))):
            raise UsageError(f"--out {printable(str(out))} is neither empty nor a model folder "
                             "torchmnist exported, and exporting would replace it; choose a "
                             "new folder")
        return format, out
    if out.is_dir():  # a folder: the file goes inside it, named after the checkpoint
        out = out / default_name
    if out.exists() and out.resolve() == source.resolve():
        raise UsageError(f"exporting would overwrite {source} itself; choose --out")
    if out.exists() and not out.is_file():
        # The export is renamed over --out: /dev/null itself would become the file.
        raise UsageError(f"--out {out} is not a regular file (a device or a pipe), which "
                         "exporting would replace; choose a file name")
    if out.is_file() and rundir.is_run_file(out):
        raise UsageError(f"exporting would overwrite {out}, which its run keeps; choose "
                         "another --out")
    return format, out


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception, without terminal colours: the ONNX exporter
    wraps the operator it could not translate in two layers of generic advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0][:300]}"


def _write_pt2(network: nn.Module, x: torch.Tensor, path: Path, metadata: dict) -> None:
    """A torch.export program (TorchScript's successor) with a symbolic batch dimension: load it
    with torch.export.load(path).module(), or compile it ahead of time (AOTInductor)."""
    batch = torch.export.Dim("batch", min=1)
    with quiet():
        program = torch.export.export(network, (x[:2],), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, str(path), extra_files={
            "torchmnist.json": json.dumps(metadata, allow_nan=False)})


def _run_pt2(path: Path, x: torch.Tensor) -> np.ndarray:
    with quiet():
        program = torch.export.load(str(path))
    with torch.inference_mode():
        return program.module()(x).numpy()


def _write_folder(trained, network: nn.Module, folder: Path) -> None:
    """A model folder as people share them: model.safetensors (its contract inside),
    config.json, and README.md, the model card. torchmnist.load, predict, test and serve take
    the folder itself."""
    contract = checkpoint.contract(trained.name, trained.spec)
    checkpoint.save_weights(folder / "model.safetensors", network.state_dict(), contract)
    # The run's settings, without this machine's paths: a model folder is made to be shared.
    config = {k: v for k, v in (trained.config or {}).items() if k not in PATH_FIELDS}
    prefix = datasets.FOLDER_PREFIX
    if str(config.get("dataset", "")).startswith(prefix):
        config["dataset"] = prefix + Path(config["dataset"][len(prefix):]).name
    tested = [r for r in trained.history if r.get("test_accuracy") is not None]
    about = {checkpoint.MODEL_FOLDER_KEY: 1, "model": trained.name,
             "dataset_spec": trained.spec.to_dict(), "input": contract["input"],
             "output": contract["output"], "torchmnist_version": contract["torchmnist_version"],
             "parameters": sum(p.numel() for p in network.parameters()),
             "test_accuracy": tested[-1]["test_accuracy"] if tested else None,
             "training_config": config or None}
    rundir.write_text_atomically(folder / "config.json",
                                 json.dumps(about, indent=2, allow_nan=False) + "\n")
    rundir.write_text_atomically(folder / "README.md", _model_card(about, tested))


def _model_card(about: dict, tested: list[dict]) -> str:
    """README.md of a model folder: what it is, how it did, what it is for, how to load it."""
    spec, config = about["dataset_spec"], about["training_config"] or {}
    name, dataset = about["model"], spec["name"]
    if tested:
        last = tested[-1]
        accuracy = (f"**{100 * last['test_accuracy']:.2f}%** on the {dataset} test set, from one "
                    f"training run (seed {config.get('seed', '?')}, {last.get('step', '?')} "
                    "steps); other seeds land within a few tenths of a point (the recipe's "
                    "spread over seeds is in torchmnist's docs/benchmarks.md)")
    else:
        accuracy = ("not recorded: the weights came without their run's metrics; measure it "
                    "with `torchmnist test FOLDER`")
    dry = " (a dry run on synthetic images: not a model to use)" if config.get("dry_run") else ""
    recipe = (f"{config['recipe']}: optimiser {config.get('optimizer')}, learning rate "
              f"{config.get('lr')}, batch size {config.get('batch_size')}, "
              f"{config.get('epochs')} epoch(s), seed {config.get('seed')}"
              if config.get("recipe") else "not recorded (bare weights)")
    classes = ", ".join(spec["classes"][:20]) + (", ..." if len(spec["classes"]) > 20 else "")
    return f"""# {name} model for {dataset}{dry}

A torchmnist `{name}` network ({about['parameters']:,} parameters) trained on {dataset}
({len(spec['classes'])} classes: {classes}), exported by torchmnist {about['torchmnist_version']}.

## Data and training

- Data: {dataset}; inputs normalised with mean {spec['mean']:.4f} and std {spec['std']:.4f}
  measured on its training images.
- Recipe: {recipe}; model `{name}` (all settings: `training_config` in config.json).
- Test accuracy: {accuracy}.

## Intended use

Classifying single 28x28 grey images of the kind the training set holds: handwritten digits
written alone, centred and white on black as MNIST made them (Fashion-MNIST: one garment
centred). `torchmnist predict` and `serve` turn photos, scans and drawings into such images
first (crop, scale, centre, invert where the page is light).

## Limitations

- It answers one of its classes for any input: it cannot say "this is not a digit".
- Accuracy holds for images like its test set; handwriting far from the training set's
  (other scripts, several characters, heavy noise) scores lower, untested here.
- Inputs must be normalised as above, float32 of shape (N, 1, 28, 28); the output is (N,
  {len(spec['classes'])}) log-probabilities (softmax gives probabilities).

## How to load

```bash
torchmnist predict FOLDER digit.jpg     # or: torchmnist test FOLDER, torchmnist serve FOLDER
```

```python
import torchmnist
network = torchmnist.load("FOLDER")     # the nn.Module, in eval mode
torchmnist.predict("FOLDER", ["digit.jpg"])

from safetensors.torch import load_file  # without torchmnist's loader:
state_dict = load_file("FOLDER/model.safetensors")  # the `{name}` network's weights
```
"""


def _write_torchscript(network: nn.Module, x: torch.Tensor, path: Path, metadata: dict) -> None:
    with quiet():
        traced = torch.jit.trace(network, x[:2])  # the networks have no data-dependent branches
    with quiet():  # deprecated for torch.export, yet what libtorch and older deployments load
        torch.jit.save(traced, str(path),
                       _extra_files={"torchmnist.json": json.dumps(metadata, allow_nan=False)})


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(x).numpy()


def _run_safetensors(path: Path, name: str, x: torch.Tensor) -> np.ndarray:
    reloaded = load_model(path, model=name).model
    if hasattr(reloaded, "exit_threshold"):  # early-exit: compared as the whole network
        reloaded.exit_threshold = 1.0
    with torch.inference_mode():
        return reloaded(x).numpy()
