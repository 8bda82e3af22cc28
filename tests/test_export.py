"""`torchmnist export`: ONNX, TorchScript and safetensors files that compute what the model does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TORCHMNIST,
    assert_one_sentence_error,
    make_dataset_files,
    run_main,
    start_until,
)
from PIL import Image

from torchmnist import engines, models
from torchmnist.commands.prediction import predict

ROOT = Path(__file__).resolve().parents[1]
from torchmnist.commands import exporting  # noqa: E402


@pytest.fixture
def small_data(tmp_path) -> Path:
    make_dataset_files(tmp_path / "data" / "MNIST" / "raw", n_train=64, n_test=300)
    return tmp_path / "data"


def _state_dict(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pt"
    torch.save(models.build(name).state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("fmt", list(exporting.FORMATS))
def test_every_model_exports_in_every_format_and_passes_parity(name, fmt, tmp_path, small_data,
                                                               capsys):
    source = _state_dict(tmp_path, name)
    code, out, err = run_main(["export", str(source), "--format", fmt, "--data-dir",
                               str(small_data), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["parity_images"] == 256 and result["max_abs_diff"] <= 1e-4
    assert result["same_predictions"] == 1.0
    assert Path(result["file"]) == source.with_name(name + exporting.FORMATS[fmt])
    assert Path(result["file"]).is_dir() if fmt == "folder" else Path(result["file"]).is_file()
    assert not list(tmp_path.glob(".torchmnist-tmp.*"))  # the file it was written under


def test_onnx_has_a_dynamic_batch_and_carries_its_input_contract(tmp_path, small_data):
    import onnxruntime

    result = exporting.export(_state_dict(tmp_path, "fast"), "onnx", tmp_path / "m.onnx",
                              data_dir=small_data)
    session = onnxruntime.InferenceSession(result["file"], providers=["CPUExecutionProvider"])
    network = models.build("fast")
    network.load_state_dict(torch.load(tmp_path / "fast.pt", weights_only=True))
    network.eval()
    for batch in (1, 7, 300):
        x = torch.randn(batch, 1, 28, 28)
        (y,) = session.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            assert np.abs(y - network(x).numpy()).max() < 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["model"], meta["dataset"], float(meta["mean"]), float(meta["std"])) == (
        "fast", "mnist", 0.1307, 0.3081)
    assert json.loads(meta["classes"]) == list("0123456789")


def test_global_max_pools_reach_the_exporter_as_a_plain_max():
    # torch 2.11's ONNX exporter cannot translate aten.adaptive_max_pool2d, which ends the best
    # model; the copy that is exported must not contain it and must compute the same numbers.
    torch.manual_seed(0)
    network = models.build("best").eval()
    ready = engines.onnx_ready(network)
    assert any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in network.modules())
    assert not any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in ready.modules())
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(ready(x), network(x))
    program = torch.export.export(ready, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.amax.default" in targets
    assert not any("adaptive_max_pool" in target for target in targets)


def test_a_failing_exporter_is_reported_by_its_innermost_cause(tmp_path, small_data, capsys,
                                                               monkeypatch):
    def refuse(*args, **kwargs):
        try:
            raise ValueError("No ONNX function found for aten.some_op\nmore detail")
        except ValueError as cause:
            raise RuntimeError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m") from cause

    monkeypatch.setattr(torch.onnx, "export", refuse)
    code, _, err = run_main(["export", str(_state_dict(tmp_path, "guide")), "--format", "onnx",
                             "--data-dir", str(small_data)], capsys)
    assert code == 1
    assert_one_sentence_error(err, "the onnx export of the guide model failed",
                              "(ValueError: No ONNX function found for aten.some_op)",
                              "was not written")
    assert "\x1b" not in err and "step 3/3" not in err
    assert not (tmp_path / "guide.onnx").exists()


def test_a_failed_parity_check_exits_1_and_keeps_the_old_file(tmp_path, small_data, capsys,
                                                              monkeypatch):
    source = _state_dict(tmp_path, "guide")
    out = tmp_path / "shipped.pt"
    out.write_bytes(b"the file users already have")
    real = exporting._run_torchscript
    monkeypatch.setattr(exporting, "_run_torchscript", lambda path, x: real(path, x) + 1e-3)
    code, _, err = run_main(["export", str(source), "--format", "torchscript", "--out",
                             str(out), "--data-dir", str(small_data)], capsys)
    assert code == 1
    assert_one_sentence_error(err, "does not match PyTorch", "largest absolute difference",
                              "exceeds 0.0001", "was not written")
    assert out.read_bytes() == b"the file users already have"
    assert not list(tmp_path.glob(".torchmnist-tmp.*"))


def test_an_export_writes_under_a_temporary_name_of_its_own(tmp_path, small_data):
    """Two exports to one --out (make -j) must not write into the same temporary file; the
    export once used one fixed name beside --out, and would write over and remove a file of
    that name."""
    source = _state_dict(tmp_path, "guide")
    other = tmp_path / ".torchmnist-tmp.model.onnx.onnx"  # the name every export once used
    other.write_bytes(b"another export's half-written file")
    exporting.export(source, "onnx", tmp_path / "model.onnx", data_dir=small_data)
    assert other.read_bytes() == b"another export's half-written file"
    assert [p.name for p in tmp_path.glob(".torchmnist-tmp.*")] == [other.name]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_export_packages_are_named(tmp_path, small_data, capsys, monkeypatch):
    monkeypatch.setattr(engines, "_importable", lambda module: module != "onnxruntime")
    code, _, err = run_main(["export", str(_state_dict(tmp_path, "guide")), "--format", "onnx",
                             "--data-dir", str(small_data)], capsys)
    assert code == 2
    assert_one_sentence_error(err, "onnxruntime", "pip install 'torchmnist[export]'")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_file_is_one_usage_sentence(tmp_path, small_data, capsys):
    # /proc is a folder in which no one, root included, can make a file.
    code, _, err = run_main(["export", str(_state_dict(tmp_path, "guide")), "--format",
                             "safetensors", "--out", "/proc/model.safetensors", "--data-dir",
                             str(small_data)], capsys)
    assert code == 2
    assert_one_sentence_error(err, "cannot write into /proc: ", "choose another --out")


@pytest.mark.parametrize("out, fmt", [("model.onnx", "onnx"), ("m.TorchScript.pt", "torchscript"),
                                      ("deploy/model.safetensors", "safetensors")])
def test_the_format_is_taken_from_the_name_of_out(out, fmt, tmp_path, small_data, capsys):
    code, stdout, err = run_main(["export", str(_state_dict(tmp_path, "guide")), "--out",
                                  str(tmp_path / out), "--data-dir", str(small_data), "--json"],
                                 capsys)
    assert code == 0, err
    assert json.loads(stdout)["format"] == fmt
    assert (tmp_path / out).is_file()


@pytest.mark.parametrize("args, fragment", [
    ([], "say which format to write: --format onnx, pt2, torchscript, safetensors or folder, "
         "or an --out ending .onnx"),
    (["--out", "model.pt"], "say which format to write"),  # a state_dict's name as well
    (["--format", "safetensors", "--out", "model.onnx"],
     "--out model.onnx is named as an ONNX file, but --format is safetensors"),
    (["--format", "onnx", "--out", "model.safetensors"],
     "--out model.safetensors is named as a safetensors file, but --format is onnx: give an "
     "--out ending .onnx, or leave --format out"),
])
def test_a_format_that_is_not_said_or_contradicts_out_is_refused(args, fragment, tmp_path,
                                                                  small_data, capsys):
    code, _, err = run_main(["export", str(_state_dict(tmp_path, "guide")), *args,
                             "--data-dir", str(small_data)], capsys)
    assert code == 2
    assert_one_sentence_error(err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "guide.pt"]


def test_exporting_onto_the_checkpoint_itself_is_refused(tmp_path, small_data, capsys):
    source = tmp_path / "model.safetensors"
    exporting.export(_state_dict(tmp_path, "guide"), "safetensors", source, data_dir=small_data)
    before = source.read_bytes()
    code, _, err = run_main(["export", str(source), "--format", "safetensors", "--data-dir",
                             str(small_data)], capsys)
    assert code == 2
    assert_one_sentence_error(err, "would overwrite")
    assert source.read_bytes() == before


def test_save_model_writes_the_same_safetensors_metadata_as_export(tmp_path, capsys):
    from safetensors import safe_open

    code, _, err = run_main(["train", "--dry-run", "--epochs", "1", "--save-model", "--quiet",
                             "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    exported = exporting.export(tmp_path / "run", "safetensors", tmp_path / "exported")
    metadata = []
    for path in (tmp_path / "run" / "model.safetensors", exported["file"]):
        with safe_open(str(path), framework="pt") as f:
            metadata.append(f.metadata())
    assert metadata[0] == metadata[1]
    assert {"model", "dataset", "input", "output", "classes"} <= set(metadata[0])


@pytest.mark.slow
@pytest.mark.mnist
def test_a_trained_model_runs_in_onnxruntime_without_torch_in_the_process(guide_run, mnist_dir,
                                                                         tmp_path):
    result = exporting.export(guide_run["checkpoint"], "onnx", tmp_path / "guide.onnx",
                              data_dir=mnist_dir)
    assert result["max_abs_diff"] <= 1e-4
    from torchmnist import data

    test = data.load("mnist", mnist_dir).test
    files = []
    for i in range(20):
        path = tmp_path / f"{i}.png"
        Image.fromarray(255 - test.images[i].numpy()).resize((140, 140)).save(path)
        files.append(str(path))
    # `import torch` fails in this process: the example must do without it.
    blocked = ("import sys, runpy; sys.modules['torch'] = None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", blocked, str(ROOT / "examples" /
                          "onnx_predict.py"), result["file"], *files],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    onnx_results = [json.loads(line) for line in run.stdout.splitlines()]
    torch_results = predict(guide_run["checkpoint"], files, device="cpu")
    assert [r["prediction"] for r in onnx_results] == [r["prediction"] for r in torch_results]
    for a, b in zip(onnx_results, torch_results, strict=True):
        assert abs(a["probability"] - b["probability"]) < 1e-4
    assert np.mean([r["prediction"] == int(test.labels[i])
                    for i, r in enumerate(onnx_results)]) >= 0.85


def test_sigterm_during_an_export_leaves_neither_the_file_nor_its_temporary(tmp_path,
                                                                           small_data):
    """SIGTERM's default action ended the process on the spot, with the ONNX file it was
    writing left beside --out as .torchmnist-tmp.*."""
    source = _state_dict(tmp_path, "guide")
    out = tmp_path / "exported"
    out.mkdir()
    process = start_until([*TORCHMNIST, "export", str(source), "--format", "onnx", "--out",
                           str(out / "m.onnx"), "--data-dir", str(small_data)], tmp_path,
                          lambda: bool(list(out.glob(".torchmnist-tmp.*"))),  # under way
                          every=0.005)
    # Held still while the signal is sent, so that the export cannot finish first.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "torchmnist: terminated (SIGTERM)"
    assert list(out.iterdir()) == []


# ---- pt2 and model folders -------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    import torchmnist

    run_dir = tmp_path_factory.mktemp("export") / "run"
    torchmnist.train(torchmnist.TrainConfig.for_recipe("fast", dry_run=True, quiet=True,
                                                       run_dir=str(run_dir)))
    return run_dir


def test_a_pt2_program_reloads_with_torch_export_alone(dry_run, tmp_path):
    import torchmnist

    result = exporting.export(dry_run, out=tmp_path / "model.pt2")
    assert result["format"] == "pt2" and result["max_abs_diff"] <= 1e-4
    extra = {"torchmnist.json": ""}
    program = torch.export.load(result["file"], extra_files=extra)
    assert json.loads(extra["torchmnist.json"])["model"] == "fast"
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(program.module()(x), torchmnist.load(dry_run, device="cpu")(x),
                              atol=1e-5)


def test_a_model_folder_is_shareable_and_every_command_takes_it(dry_run, tmp_path, capsys):
    import torchmnist

    folder = tmp_path / "shared" / "fast-mnist"
    exporting.export(dry_run, "folder", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                         "model.safetensors"]
    about = json.loads((folder / "config.json").read_text())
    assert about["model"] == "fast" and about["dataset_spec"]["name"] == "mnist"
    assert about["test_accuracy"] == json.loads(
        (dry_run / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
    # Made to be shared: none of this machine's paths travel with it.
    assert str(dry_run) not in (folder / "config.json").read_text()
    assert "run_dir" not in about["training_config"]
    card = (folder / "README.md").read_text()
    for heading in ("## Data and training", "## Intended use", "## Limitations",
                    "## How to load"):
        assert heading in card
    assert "Test accuracy: **" in card and "seed 1" in card

    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(torchmnist.load(folder, device="cpu")(x),
                           torchmnist.load(dry_run, device="cpu")(x))
    picture = tmp_path / "one.png"
    Image.fromarray(np.pad(np.full((20, 4), 255, np.uint8), 4)).save(picture)
    expected = torchmnist.predict(dry_run, [picture], device="cpu")
    assert torchmnist.predict(folder, [picture], device="cpu") == expected
    code, out, err = run_main(["predict", str(folder), str(picture), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["class"] == expected[0]["class"]
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from torchmnist.commands import serving

    with TestClient(serving.create_app(folder, device="cpu")) as client:
        assert client.get("/api/model").json()["checkpoint"] == "fast-mnist/model.safetensors"
        assert client.post("/api/predict", content=picture.read_bytes(), headers={
            "content-type": "image/png"}).json()["class"] == expected[0]["class"]
    # Exported again over itself: replaced whole; a folder of someone else's is refused.
    exporting.export(dry_run, "folder", folder)
    assert not list(folder.parent.glob(".torchmnist-tmp.*"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    code, _, err = run_main(["export", str(dry_run), "--format", "folder", "--out", str(theirs)],
                            capsys)
    assert code == 2 and (theirs / "notes.txt").read_text() == "mine"
    assert_one_sentence_error(err, "neither empty nor a model folder", "choose a new folder")


@pytest.mark.slow
@pytest.mark.mnist
def test_pt2_and_folder_exports_agree_with_the_checkpoint_on_the_test_set(guide_run, mnist_dir,
                                                                         tmp_path):
    import torchmnist
    from torchmnist import data
    from torchmnist.data import loaders

    digits = data.load("mnist", mnist_dir).test
    run = guide_run["run_dir"]
    network = torchmnist.load(run, device="cpu")
    x = loaders.normalize(digits.images, 0.1307, 0.3081)
    pt2 = exporting.export(run, "pt2", tmp_path / "m.pt2", data_dir=mnist_dir)["file"]
    folder = exporting.export(run, "folder", tmp_path / "m", data_dir=mnist_dir)["file"]
    with torch.inference_mode():
        expected = network(x).argmax(1)
        assert torch.equal(torch.export.load(pt2).module()(x).argmax(1), expected)
        assert torch.equal(torchmnist.load(folder, device="cpu")(x).argmax(1), expected)
    tested = torchmnist.evaluate(folder, data_dir=mnist_dir, device="cpu")
    assert tested["correct"] == int((expected == digits.labels).sum())
