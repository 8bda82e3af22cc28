"""`--engine onnxruntime`: predict, test and serve on the ONNX export, with torch's answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, dry_train, run_main
from PIL import Image, ImageDraw

import torchmnist
from torchmnist import data, engines, models
from torchmnist.commands import exporting
from torchmnist.data import loaders

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    """A fast-recipe dry run: its model and synthetic test images, trained in a second."""
    run_dir = tmp_path_factory.mktemp("engines") / "run"
    config = torchmnist.TrainConfig.for_recipe("fast", dry_run=True, run_dir=str(run_dir),
                                               quiet=True)
    torchmnist.train(config)
    return run_dir


def _pictures(tmp_path: Path) -> list[str]:
    paths = []
    for i, shape in enumerate(([(50, 10), (50, 90)], [(20, 20), (80, 20), (35, 90)],
                               [(20, 50), (80, 50)])):
        picture = Image.new("L", (100, 100), 255)
        ImageDraw.Draw(picture).line(shape, fill=0, width=10)
        picture.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    return paths


def test_predict_and_test_answer_alike_on_both_engines(dry_run, tmp_path):
    pictures = _pictures(tmp_path)
    by_torch = torchmnist.predict(dry_run, pictures, device="cpu", tta=True)
    by_onnx = torchmnist.predict(dry_run, pictures, engine="onnxruntime", tta=True)
    assert [r["class"] for r in by_onnx] == [r["class"] for r in by_torch]
    for mine, theirs in zip(by_onnx, by_torch, strict=True):
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-4)
    tested = {engine: torchmnist.evaluate(dry_run, device="cpu" if engine == "torch" else "auto",
                                          engine=engine) for engine in engines.ENGINES}
    assert tested["onnxruntime"]["correct"] == tested["torch"]["correct"]
    assert tested["onnxruntime"]["test_loss"] == pytest.approx(tested["torch"]["test_loss"],
                                                               abs=1e-5)
    assert tested["onnxruntime"]["engine"] == "onnxruntime"


def test_an_exported_onnx_file_runs_with_its_own_contract(dry_run, tmp_path, capsys):
    onnx_file = exporting.export(dry_run, "onnx", tmp_path / "model.onnx")["file"]
    trained = engines.load(onnx_file, "onnxruntime")
    assert (trained.name, trained.spec.name) == ("fast", "mnist")
    x = loaders.normalize(torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8),
                          trained.spec.mean, trained.spec.std)
    expected = engines.load(dry_run, "torch").model(x)
    assert (trained.model(x) - expected).abs().max() < 1e-4
    pictures = _pictures(tmp_path)
    code, out, err = run_main(["predict", onnx_file, *pictures, "--engine", "onnxruntime"],
                              capsys)
    assert code == 0, err
    assert [line.split(":")[1].split()[0] for line in out.splitlines()] == [
        r["class"] for r in torchmnist.predict(dry_run, pictures, device="cpu")]


def test_engine_flags_that_cannot_work_are_one_sentence(dry_run, capsys):
    code, _, err = run_main(["test", str(dry_run), "--engine", "onnxruntime", "--device",
                             "cuda"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "runs on the CPU", "--device cuda")
    with pytest.raises(torchmnist.UsageError, match="--engine must be one of"):
        torchmnist.predict(dry_run, [], engine="tensorrt")


def test_the_torch_engine_names_the_flag_an_onnx_file_needs(dry_run, tmp_path, capsys):
    onnx_file = exporting.export(dry_run, "onnx", tmp_path / "model.onnx")["file"]
    code, _, err = run_main(["test", onnx_file], capsys)
    assert code == 2
    assert_one_sentence_error(err, "is an ONNX model", "--engine onnxruntime")


def test_the_early_exit_model_stays_on_torch(tmp_path, capsys):
    dry_train(tmp_path / "run", "--model", "early-exit", capsys=capsys)
    code, _, err = run_main(["test", str(tmp_path / "run"), "--engine", "onnxruntime"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "early-exit", "--engine torch")


def test_an_onnx_file_from_elsewhere_needs_its_dataset_named(tmp_path, capsys):
    network = models.build("guide").eval()
    path = tmp_path / "theirs.onnx"
    with engines.quiet():
        torch.onnx.export(network, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=True,
                          external_data=False)
    code, _, err = run_main(["predict", str(path), *_pictures(tmp_path), "--engine",
                             "onnxruntime"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "does not say what data", "--dataset")
    found = engines.load(path, "onnxruntime", dataset="mnist")
    assert found.spec.name == "mnist" and found.name == "onnx"


def test_serve_runs_on_onnx_runtime(dry_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from torchmnist.commands import serving

    picture = Path(_pictures(tmp_path)[0]).read_bytes()
    answers = {}
    for engine in engines.ENGINES:
        with TestClient(serving.create_app(dry_run, device="cpu" if engine == "torch" else
                                           "auto", engine=engine)) as client:
            assert client.get("/api/model").json()["engine"] == engine
            answers[engine] = client.post("/api/predict", content=picture,
                                          headers={"content-type": "image/png"}).json()
    assert answers["onnxruntime"]["class"] == answers["torch"]["class"]
    assert np.allclose(answers["onnxruntime"]["probabilities"], answers["torch"]["probabilities"],
                       atol=1e-4)


@pytest.mark.slow
@pytest.mark.mnist
def test_both_engines_predict_the_10000_test_images_identically(guide_run, mnist_dir, capsys):
    digits = data.load("mnist", mnist_dir).test
    runs = {engine: engines.load(guide_run["run_dir"], engine) for engine in engines.ENGINES}
    spec = runs["torch"].spec
    x = loaders.normalize(digits.images, spec.mean, spec.std)
    with torch.inference_mode():
        predictions = {engine: torch.cat([trained.model(chunk).argmax(1)
                                          for chunk in x.split(1000)])
                       for engine, trained in runs.items()}
    assert torch.equal(predictions["onnxruntime"], predictions["torch"])
    code, out, err = run_main(["test", guide_run["run_dir"], "--engine", "onnxruntime",
                               "--data-dir", str(mnist_dir), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["correct"] == int((predictions["torch"] == digits.labels).sum())
