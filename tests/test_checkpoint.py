"""Loading checkpoints and weights files: what is accepted, and what is refused how."""

from __future__ import annotations

import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, read_metrics, run_main

from torchmnist import models
from torchmnist.commands import exporting
from torchmnist.storage import checkpoint
from torchmnist.trained import load_model


def _test(path, capsys, *flags):
    return run_main(["test", str(path), "--data-dir", "no-data", "--no-download", *flags], capsys)


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"),
    # Fixed noise, so the test's id is the same in every process (pytest-xdist compares them).
    (np.random.default_rng(0).bytes(4096), "not a readable checkpoint"),
    # Another kind of file (here a PNG's signature and header) is named as such.
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "neither a file that torch.save writes nor "
                                        "safetensors"),
    # The start of a zip whose directory never came (a checkpoint cut short looks like this).
    (b"PK\x03\x04" + bytes(64), "not a readable checkpoint (truncated or corrupt?)"),
    # A pickle that is not one torch.save wrote is named as such.
    (b"\x80\x02K\x01.", "a Python pickle, but not one that torch.save writes"),
], ids=["empty", "noise", "image", "zip", "pickle"])
def test_unreadable_files_exit_2(tmp_path, content, fragment, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    code, _, err = _test(path, capsys)
    assert code == 2
    assert_one_sentence_error(err, str(path), fragment)


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")


def _torch_save(path, **options):
    torch.save(models.OfficialNet().state_dict(), path, **options)


@pytest.mark.parametrize("name, write, fragment", [
    # numpy's .npz, or any other zip, holds no data.pkl at the top of one folder.
    ("arrays.npz", lambda p: _zip(p, ["a.npy", "b.npy"]),
     "is a zip archive, but not one that torch.save writes"),
    # What `torchmnist export --format torchscript` writes is a program, not a checkpoint.
    ("model.torchscript.pt", lambda p: _zip(p, ["m/data.pkl", "m/code/__torch__/m.py"]),
     "is a TorchScript program"),
    # torch.jit.save itself, which deflates its code: named as a program, not as a zip bomb.
    ("model.ts", lambda p: exporting._write_torchscript(models.GuideNet().eval(),
                                                        torch.zeros(2, 1, 28, 28), p, {}),
     "is a TorchScript program"),
    ("compressed.npz", lambda p: np.savez_compressed(p, a=np.zeros(9)),
     "is a zip archive, but not one that torch.save writes"),
    ("model.onnx", lambda p: p.write_bytes(b"\x08\x08\x12\x07pytorch"), "is an ONNX model"),
    # torch.save itself, with protocols its safe loader cannot read: in both of its formats.
    ("legacy-p1.pt", lambda p: _torch_save(p, _use_new_zipfile_serialization=False,
                                           pickle_protocol=1),
     "written by torch.save with a pickle protocol that torch cannot load"),
    ("legacy-p4.pt", lambda p: _torch_save(p, _use_new_zipfile_serialization=False,
                                           pickle_protocol=4),
     "written by torch.save with a pickle protocol that torch cannot load"),
    ("zip-p4.pt", lambda p: _torch_save(p, pickle_protocol=4),
     "written by torch.save with a pickle protocol that torch cannot load"),
], ids=["npz", "torchscript", "torch-jit-save", "npz-compressed", "onnx", "legacy-p1",
        "legacy-p4", "zip-p4"])
def test_files_that_are_not_checkpoints_are_named(tmp_path, name, write, fragment, capsys):
    path = tmp_path / name
    write(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch's warnings about the format, shown or not
        code, _, err = _test(path, capsys)
    assert code == 2
    assert_one_sentence_error(err, str(path), fragment)
    assert [str(w.message) for w in caught] == []


def _on_meta(tensors: dict) -> dict:
    return {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}


def test_tensors_with_no_values_are_named_wherever_they_are(tmp_path, capsys):
    """A tensor on the meta device (a shape without values, from a model never materialised)
    loaded without complaint, then ended a resume with torch's own words, or a traceback
    where a test read it ("Tensor.item() cannot be called on meta tensors")."""
    torch.save(_on_meta(models.GuideNet().state_dict()), "weights.pt")
    code, _, err = run_main(["train", "--dry-run", "--init-from", "weights.pt", "--run-dir",
                             "fine"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "weights.pt", "damaged", "conv1.weight",
                              "meta device")
    code, _, err = _test("weights.pt", capsys)
    assert code == 2 and "conv1.weight holds no values" in err
    # Deep inside a run's checkpoint: the optimiser's momentum, on resume.
    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    saved = torch.load("r/last.pt", weights_only=True)
    saved["optimizer"]["state"][0] = _on_meta(saved["optimizer"]["state"][0])
    torch.save(saved, "r/last.pt")
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "r/last.pt", "damaged",
                              "optimizer.state.0.momentum_buffer")


def test_a_pickle_that_holds_itself_is_looked_through_once(tmp_path, capsys):
    looped: list = [torch.zeros(2)]
    looped.append(looped)
    torch.save({"weights": looped}, "looped.pt")
    code, _, err = _test("looped.pt", capsys)
    assert code == 2
    assert_one_sentence_error(err, "neither a torchmnist checkpoint nor a model state_dict")


def test_both_formats_that_torch_load_reads_safely_are_loaded(tmp_path):
    state = models.OfficialNet().state_dict()
    for options in ({}, {"_use_new_zipfile_serialization": False},
                    {"_use_new_zipfile_serialization": False, "pickle_protocol": 3}):
        path = tmp_path / "weights.pt"
        torch.save(state, path, **options)
        loaded = checkpoint.load(path)
        assert list(loaded) == list(state)
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_file_exits_2(capsys):
    code, _, err = _test("nowhere.pt", capsys)
    assert code == 2
    assert_one_sentence_error(err, "no checkpoint file at nowhere.pt")


def test_weights_for_another_model_are_named(tmp_path, capsys):
    path = tmp_path / "guide.pth"
    torch.save(models.GuideNet().state_dict(), path)
    code, _, err = _test(path, capsys, "--model", "official")
    assert code == 2
    assert_one_sentence_error(err, "does not hold weights for the 'official' model",
                              "--model guide")


def test_unknown_weights_ask_for_a_model(tmp_path, capsys):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(784, 10).state_dict(), path)
    code, _, err = _test(path, capsys)
    assert code == 2
    assert_one_sentence_error(err, "does not match any known model", "--model")


def test_wrapped_state_dicts_are_unwrapped():
    plain = models.GuideNet().state_dict()
    for prefix in ("module.", "_orig_mod."):
        wrapped = {prefix + k: v for k, v in plain.items()}
        unwrapped, config = checkpoint.weights(wrapped, "x")
        assert list(unwrapped) == list(plain) and config is None


def test_save_is_atomic_and_keeps_usual_permissions(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(2)}})
    checkpoint.save(path, {"model": {"w": torch.zeros(2)}})
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_loaded_model_carries_its_runs_epoch_records(tmp_path, capsys):
    code, _, _ = run_main(["train", "--dry-run", "--epochs", "2", "--run-dir",
                           str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0
    trained = load_model(tmp_path / "run")
    assert trained.history == read_metrics(tmp_path / "run")  # what metrics.jsonl holds
    assert sorted({r["epoch"] for r in trained.history}) == [1, 2]
    bare = tmp_path / "weights.pt"
    torch.save(trained.model.state_dict(), bare)
    assert load_model(bare).history == []
