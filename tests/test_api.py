"""The Python API a Lightning or Keras user expects: the trained model back from `train`,
`load`, `predict` on pictures in memory, silence on request; and commands that take a run
folder and find its data themselves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import last_json, make_dataset_files, run_main
from PIL import Image
from torch import nn

import torchmnist
from torchmnist.storage import checkpoint


def _ring(size: int = 120) -> np.ndarray:
    ys, xs = np.indices((size, size))
    r = np.hypot(ys - size * 0.5, (xs - size * 0.5) * 1.5)
    return np.where((r > size * 0.2) & (r < size * 0.3), 20, 235).astype(np.uint8)


@pytest.fixture
def trained(tmp_path):
    config = torchmnist.TrainConfig(dry_run=True, run_dir=str(tmp_path / "run"), quiet=True)
    return torchmnist.train(config)


def test_train_gives_back_the_model_beside_the_summary(trained, tmp_path):
    assert isinstance(trained.model, nn.Module) and not trained.model.training
    saved = checkpoint.load(trained["checkpoint"])["model"]
    # (the model stays on the device it trained on; the checkpoint loads onto the CPU)
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in trained.model.state_dict().items())
    assert json.loads(json.dumps(trained)) == trained.summary  # still the --json summary


def test_load_gives_a_ready_network_from_a_run_folder(trained, tmp_path):
    network = torchmnist.load(tmp_path / "run", device="cpu")
    assert not network.training
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(network(x), trained.model.cpu()(x))


def test_quiet_prints_nothing_and_still_logs(tmp_path, capsys):
    torchmnist.train(torchmnist.TrainConfig(dry_run=True, run_dir=str(tmp_path / "q"),
                                            quiet=True))
    assert capsys.readouterr().out == ""
    assert "done: test accuracy" in (tmp_path / "q" / "train.log").read_text()
    code, out, _ = run_main(["train", "--dry-run", "--quiet", "--json", "--run-dir", "c"],
                            capsys)
    assert code == 0
    assert len(out.splitlines()) == 1 and "test_accuracy" in json.loads(out)


def test_predict_takes_pictures_in_memory_as_it_takes_files(trained, tmp_path):
    picture = _ring()
    Image.fromarray(picture).save(tmp_path / "ring.png")
    from_file = torchmnist.predict(trained["run_dir"], [str(tmp_path / "ring.png")],
                                   device="cpu")[0]
    inputs = [Image.fromarray(picture), picture, picture / 255.0,
              torch.from_numpy(picture)[None]]
    results = torchmnist.predict(trained["run_dir"], inputs, device="cpu")
    assert [r["file"] for r in results] == [f"<input {i}>" for i in range(4)]
    for result in results:
        assert result["prediction"] == from_file["prediction"]
        assert result["probability"] == pytest.approx(from_file["probability"], abs=1e-3)
    bad = torchmnist.predict(trained["run_dir"], [np.zeros((2, 3, 4, 5))], device="cpu")[0]
    assert "is not a picture" in bad["error"]
    # Rows of uneven lengths: numpy's ValueError ended the whole call.
    ragged, good = torchmnist.predict(trained["run_dir"], [[[0] * 28, [0] * 3], picture],
                                      device="cpu")
    assert ragged["error"].startswith("a list whose rows differ in length is not a picture")
    assert good["prediction"] == from_file["prediction"]


def test_test_labels_beyond_the_models_classes_are_named_with_the_range_they_need(trained):
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    for labels, given in (([0, 1, 2, 10], "0 to 10"), ([0, -1, 2, 1], "-1 to 2")):
        with pytest.raises(torchmnist.UsageError) as caught:
            torchmnist.evaluate(trained["run_dir"], test=(images, torch.tensor(labels)))
        assert str(caught.value) == ("the test labels must run from 0 to 9 for the model's 10 "
                                     f"classes, not {given}")


def test_commands_take_a_run_folder_and_find_its_data(tmp_path, capsys):
    make_dataset_files(tmp_path / "data" / "MNIST" / "raw")
    code, out, err = run_main(["train", "--data-dir", "data", "--epochs", "1", "--run-dir",
                               "run", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    trained_accuracy = last_json(out)["test_accuracy"]
    # Testing needs only the two test files, found where the run was trained from.
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / "data" / "MNIST" / "raw" / name).unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(tmp_path / "run", elsewhere / "run")
    code, out, err = run_main(["test", str(elsewhere / "run"), "--json", "--no-download",
                               "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == trained_accuracy
    code, out, err = run_main(["export", str(elsewhere / "run"), "--format", "safetensors",
                               "--json"], capsys)
    assert code == 0, err


def test_a_dry_run_is_tested_on_its_own_synthetic_data(trained, capsys):
    code, out, err = run_main(["test", trained["run_dir"], "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == trained["test_accuracy"]
    assert json.loads(out)["dry_run"] is True
    # And says so: "on mnist test set" read as MNIST's 10,000 images, not 512 synthetic ones.
    code, out, err = run_main(["test", trained["run_dir"], "--device", "cpu"], capsys)
    assert code == 0, err
    assert ": guide model on mnist test set (synthetic, dry run): loss " in out


def test_training_and_test_report_the_same_accuracy_and_loss(tmp_path, capsys):
    # Trained in bf16, every reported test number is the fp32 evaluation that `torchmnist
    # test` (and report, and the exported files) compute.
    code, out, err = run_main(["train", "--dry-run", "--recipe", "fast", "--run-dir", "r",
                               "--json", "--device", "cpu", "--amp", "bf16"], capsys)
    assert code == 0, err
    trained = last_json(out)
    code, out, err = run_main(["test", "r", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    tested = json.loads(out)
    assert tested["test_accuracy"] == trained["test_accuracy"]  # the same images right
    # The loss to float precision: training tests in channels-last order, `test` in NCHW.
    assert tested["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)


@pytest.mark.parametrize(("call", "sentence"), [
    (lambda run: torchmnist.predict(run, [_ring()], top="3"), "--top must be a whole number, "
                                                              "not '3'"),
    (lambda run: torchmnist.predict(run, [_ring()], batch_size=0), "--batch-size must be at "
                                                                   "least 1, not 0"),
    (lambda run: torchmnist.evaluate(run, batch_size=2.5), "--batch-size must be a whole "
                                                           "number, not 2.5"),
    (lambda run: torchmnist.load(run, device="gpu"), "--device must be auto, cpu, cuda, cuda:N "
                                                     "or mps, not 'gpu'"),
    (lambda run: torchmnist.predict(run, [_ring()], device="cuda:99"), "--device cuda:99 was "
                                                                       "asked for but "),
], ids=["top-text", "batch-zero", "batch-fraction", "device-gpu", "device-cuda-99"])
def test_api_arguments_are_checked_as_their_flags_are(call, sentence, trained):
    """These were a TypeError from a comparison, torch's "split_size can only be 0", and
    torch.device's list of every device type it knows."""
    with pytest.raises(torchmnist.UsageError) as caught:
        call(trained["run_dir"])
    assert str(caught.value).startswith(sentence)
    # A numpy count and a torch.device are taken as they are meant.
    assert len(torchmnist.predict(trained["run_dir"], [_ring()], top=np.int64(2))[0]["top"]) == 2
    assert isinstance(torchmnist.load(trained["run_dir"], device=torch.device("cpu")), nn.Module)


@pytest.mark.parametrize("settings, fix", [
    ({"model": nn.Linear(784, 10)}, "torchmnist.train(config, model=network)"),
    ({"dataset": torchmnist.OwnData(train=(torch.zeros(4, 28, 28), torch.zeros(4)),
                                    test=(torch.zeros(4, 28, 28), torch.zeros(4)))},
     "torchmnist.train(config, data=OwnData(...))"),
])
def test_a_config_holds_settings_and_names_where_objects_go(settings, fix):
    with pytest.raises(torchmnist.UsageError) as caught:
        torchmnist.TrainConfig(**settings)
    assert fix in str(caught.value)


@pytest.mark.parametrize("objects, fragment", [
    ({"model": "guide"}, "model must be an nn.Module, not str"),
    ({"data": (torch.zeros(4, 28, 28), torch.zeros(4))}, "data must be a torchmnist.OwnData"),
])
def test_train_names_an_object_it_cannot_take(objects, fragment, tmp_path):
    config = torchmnist.TrainConfig(dry_run=True, quiet=True, run_dir=str(tmp_path / "r"))
    with pytest.raises(torchmnist.UsageError, match=fragment):
        torchmnist.train(config, **objects)
    assert not (tmp_path / "r").exists()  # refused before the run folder is made
