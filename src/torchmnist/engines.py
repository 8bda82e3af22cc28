"""Inference engines: what runs a trained network on normalised images (`--engine`).

`torch` runs the network itself. `onnxruntime` runs its ONNX export with ONNX Runtime on the
CPU: an `.onnx` file that `torchmnist export` wrote, or a checkpoint or run folder exported on
the fly and checked against torch first. Either way the engine is an `nn.Module` that takes
float32 (N, 1, 28, 28) normalised images and returns (N, classes) log-probabilities, so predict,
test (test-time augmentation included) and serve run the same code on both.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchmnist.config import ENGINES
from torchmnist.data import datasets, own
from torchmnist.data.loaders import normalize
from torchmnist.errors import TorchMnistError, UsageError
from torchmnist.runtime import devices
from torchmnist.storage import checkpoint
from torchmnist.trained import Trained, load_model

TOLERANCE = 1e-4  # the largest difference from torch an export may show, in log-probabilities
CHECK_IMAGES = 64  # synthetic images an on-the-fly export is checked on


class EngineError(TorchMnistError):
    """An export that does not compute what the network computes: exit 1."""

    exit_code = 1


def device_for(engine: str, device: str) -> torch.device:
    """Where `engine` runs: --device for torch; the CPU for ONNX Runtime (its CPU package)."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "onnxruntime":
        if str(device) not in ("auto", "cpu"):
            raise UsageError(f"--engine onnxruntime runs on the CPU, not --device {device}: "
                             "drop --device, or use --engine torch")
        return torch.device("cpu")
    return devices.resolve_device(device)


def load(path: str | os.PathLike, engine: str = "torch", *, model: str | None = None,
         dataset: str | None = None) -> Trained:
    """The trained network of `path`, run by `engine`: as `trained.load_model` gives it, with
    `.model` the engine."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    path = checkpoint.file_in(path)
    if engine == "torch":
        if path.suffix == ".onnx":
            raise UsageError(f"{path} is an ONNX model: run it with --engine onnxruntime")
        return load_model(path, model=model, dataset=dataset)
    _needs("onnx", "onnxscript", "onnxruntime")
    if path.suffix == ".onnx":
        return _from_onnx_file(path, model, dataset)
    trained = load_model(path, model=model, dataset=dataset)
    if hasattr(trained.model, "exits"):
        raise UsageError("--engine onnxruntime runs a whole network, and the early-exit model "
                         "leaves early only in torch: use --engine torch")
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        x = _check_images(trained.spec)
        write_onnx(trained.model.float().eval(), x, onnx_path,
                   checkpoint.contract(trained.name, trained.spec))
        session = OnnxRuntime(onnx_path.read_bytes())
    with torch.inference_mode():
        difference = float((session(x) - trained.model(x)).abs().max())
    if not difference <= TOLERANCE:
        raise EngineError(f"the ONNX export of the {trained.name} model differs from torch by "
                          f"{difference:.3g} (more than {TOLERANCE:g}): use --engine torch")
    session.parameters_count = sum(p.numel() for p in trained.model.parameters())
    trained.model = session
    return trained


class OnnxRuntime(nn.Module):
    """An ONNX model in an ONNX Runtime session on the CPU, called as the network is."""

    def __init__(self, model: bytes, threads: int | None = None):
        super().__init__()
        import onnxruntime

        self.model_bytes = model
        options = onnxruntime.SessionOptions()
        if threads is not None:  # else ONNX Runtime's choice: a thread per core
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(model, options,
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.parameters_count: int | None = None  # the network's, where it is known

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: images})[0])


def _from_onnx_file(path: Path, model: str | None, dataset: str | None) -> Trained:
    """An exported file, with the contract `export` wrote into it (model, data spec)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
        session = OnnxRuntime(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways
        raise UsageError(f"{path} is not an ONNX model ONNX Runtime can run "
                         f"({type(error).__name__})") from None
    contract = {p.key: p.value for p in graph.metadata_props}
    try:
        spec = datasets.DatasetSpec.from_dict(json.loads(contract[checkpoint.DATASET_SPEC]))
    except (KeyError, ValueError, TypeError):
        if dataset is None:
            raise UsageError(f"{path} does not say what data its model was trained on (it was "
                             "not written by torchmnist export): pass --dataset") from None
        spec = None
    if dataset is not None:
        if not datasets.is_builtin(dataset):
            raise UsageError(f"--dataset must be one of {', '.join(datasets.DATASETS)}, not "
                             f"{dataset!r}")
        spec = datasets.DATASETS[dataset]
    name = model or contract.get("model", "onnx")
    return Trained(session, name, spec.name, None, spec)


def _check_images(spec: datasets.DatasetSpec) -> torch.Tensor:
    images = own.synthetic(seed=0).test.images[:CHECK_IMAGES]
    return normalize(images, spec.mean, spec.std)


# ---- writing ONNX (also `torchmnist export --format onnx`) -------------------------------------

def write_onnx(network: nn.Module, x: torch.Tensor, path: Path, metadata: dict) -> None:
    """`network` as an ONNX file with a symbolic batch dimension, `metadata` inside it."""
    _needs("onnx", "onnxscript", "onnxruntime")
    import onnx

    network = onnx_ready(network)
    batch = torch.export.Dim("batch", min=1)
    with quiet():
        torch.onnx.export(network, (x[:2],), str(path), input_names=["image"],
                          output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                          dynamo=True, external_data=False)
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


class GlobalMaxPool(nn.Module):
    """`nn.AdaptiveMaxPool2d(1)` written as a max over height and width: the same numbers, and
    an operator (ReduceMax) that every supported torch's ONNX exporter translates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1), keepdim=True)


def onnx_ready(network: nn.Module) -> nn.Module:
    """A copy of `network` whose global max-pools are `GlobalMaxPool`s. torch 2.11's ONNX
    exporter has no translation of aten.adaptive_max_pool2d (the best model ends with one);
    2.14's has. The parity check afterwards compares against the unchanged network."""
    network = copy.deepcopy(network)
    for name, module in list(network.named_modules()):
        if (isinstance(module, nn.AdaptiveMaxPool2d) and not module.return_indices
                and module.output_size in (1, (1, 1))):
            parent, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent), child, GlobalMaxPool())
    return network


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    return OnnxRuntime(Path(path).read_bytes())(torch.from_numpy(x)).numpy()


@contextlib.contextmanager
def quiet():
    # The exporters print progress and warn about internals a user cannot act on.
    with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        yield


def _needs(*modules: str) -> None:
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise UsageError(f"this needs the Python packages {', '.join(missing)}; install them "
                         "with: pip install 'torchmnist[export]'")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
