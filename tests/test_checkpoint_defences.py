"""Damaged and crafted checkpoints, in one place: every defence of the loader and of a resume,
each named in one sentence before anything is run or written, the run folder kept as it was.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, dry_train, run_main
from PIL import Image

from torchmnist import config as cfg
from torchmnist import models
from torchmnist.storage import checkpoint


def _image(path: Path) -> None:
    """A readable image file, for the commands that also read one."""
    Image.fromarray(np.full((28, 28), 255, dtype=np.uint8)).save(path)


class _Payload:
    """Unpickling this runs code (here: it creates a file), the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {"w": torch.zeros(1)}, "progress": {},
                "config": {}, "hook": _Payload(marker)}, path)
    for args in (["test", str(path), "--data-dir", "x", "--no-download"],
                 ["train", "--resume", str(path)]):
        code, _, err = run_main(args, capsys)
        assert code == 2
        assert_one_sentence_error(err, "refusing to load", str(path), "exec")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: unsafe loading does run the payload
    assert marker.exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable checkpoint"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(bytes(range(256)) * 64), "not a readable checkpoint"),
])
def test_damaged_checkpoints_are_refused_by_test_and_by_resume(damage, fragment, tmp_path,
                                                               capsys):
    path = Path(dry_train("good", capsys=capsys)["checkpoint"])
    damage(path)
    for args in (["test", str(path), "--no-download"], ["train", "--resume", str(path)]):
        code, _, err = run_main(args, capsys)
        assert code == 2
        assert_one_sentence_error(err, str(path), fragment)


def test_wrong_model_checkpoint_is_refused_on_resume(tmp_path, capsys):
    path = Path(dry_train("good", capsys=capsys)["checkpoint"])
    saved = torch.load(path, weights_only=True)
    saved["model"] = models.OfficialNet().state_dict()  # config still says "guide"
    torch.save(saved, path)
    code, _, err = run_main(["train", "--resume", str(path)], capsys)
    assert code == 2
    assert_one_sentence_error(err, str(path), "does not fit the 'guide' model")


def test_weights_only_files_cannot_be_resumed(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save(models.GuideNet().state_dict(), path)
    code, _, err = run_main(["train", "--resume", str(path)], capsys)
    assert code == 2
    assert_one_sentence_error(err, "holds model weights only", "torchmnist test")


def test_something_else_entirely_is_refused(tmp_path, capsys):
    path = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": [2, 3]}, path)
    code, _, err = run_main(["test", str(path), "--no-download"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "neither a torchmnist checkpoint nor a model state_dict")


def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tmp_path, capsys):
    torch.manual_seed(0)
    state = models.build("guide").state_dict()
    state["fc1.bias"][3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    _image(tmp_path / "x.png")
    for command in (["test", "nan.pt", "--json"], ["predict", "nan.pt", "x.png", "--json"],
                    ["export", "nan.pt", "--format", "safetensors"]):
        code, out, err = run_main(command, capsys)
        assert code == 2, command
        assert_one_sentence_error(err, "nan.pt holds NaN or infinite values in fc1.bias")
        assert out == ""


def _rezipped(source: Path, target: Path, compression: int, change=None) -> None:
    """`source`'s archive written again entry by entry, with `compression`; `change` may
    rewrite the bytes of the whole new archive."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for entry in old.infolist():
            new.writestr(entry.filename, old.read(entry.filename))
    if change is not None:
        target.write_bytes(change(target.read_bytes()))


def _claim_larger(archive: bytes) -> bytes:
    """The central directory says the first tensor's entry holds 2 GB (as an archive whose
    entries share their bytes does, added up); the bytes themselves are unchanged."""
    name = next(n for n in zipfile.ZipFile(io.BytesIO(archive)).namelist()
                if n.endswith("/data/0")).encode()
    at = archive.rindex(name) - 46  # the directory's record of it: 46 bytes, then the name
    assert archive[at:at + 4] == b"PK\x01\x02"
    claim = (2**31 - 1).to_bytes(4, "little")  # its compressed and uncompressed sizes
    return archive[:at + 20] + claim + claim + archive[at + 28:]


@pytest.mark.parametrize(("make", "problem"), [
    (lambda src, dst: _rezipped(src, dst, zipfile.ZIP_DEFLATED), "compressed entries, which "
     "torch.save never writes (and which could unpack to any size); it is not loaded"),
    (lambda src, dst: _rezipped(src, dst, zipfile.ZIP_STORED, _claim_larger),
     "entries claim 2,147,"),
], ids=["deflated", "sizes-beyond-the-file"])
def test_a_checkpoint_that_unpacks_beyond_its_own_size_is_refused_unread(make, problem,
                                                                        weights_file, tmp_path,
                                                                        capsys):
    """torch.load reads deflated entries and entries that share bytes: a 2 MB file of one
    deflated 2 GB tensor took 2.7 GB to load. torch.save never writes either."""
    make(weights_file, tmp_path / "bomb.pt")
    for command in (["test", "bomb.pt", "--no-download"], ["predict", "bomb.pt", "x.png"],
                    ["export", "bomb.pt", "--format", "safetensors"]):
        code, out, err = run_main(command, capsys)
        assert code == 2, command
        assert_one_sentence_error(err, f"bomb.pt is a zip archive with {problem}"
                                  if "compressed" in problem else f"bomb.pt is a zip archive "
                                  f"whose {problem}")
        assert out == ""


@pytest.mark.parametrize("config", [None, [1, 2]], ids=["no-config", "config-list"])
def test_a_checkpoint_with_a_crafted_config_is_refused(config, capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    saved = checkpoint.load(run / "last.pt")
    if config is None:
        del saved["config"]
    else:
        saved["config"] = config
    torch.save(saved, run / "last.pt")
    for command in (["test", "r/last.pt", "--no-download"],
                    ["train", "--resume", "r", "--epochs", "2"]):
        code, _, err = run_main(command, capsys)
        assert code == 2, command
        assert_one_sentence_error(err, "r/last.pt")
        assert "damaged checkpoint" in err or "no config" in err


@pytest.mark.parametrize("classes, problem", [
    (list("0123456789"[:3]) + ["\x1b[31m3\x1b[0m\nfake line"] + list("456789"),
     r"the class name '\x1b[31m3\x1b[0m\nfake line' holds control characters"),
    (list("0123356789"), "two classes are named '3'"),
    (list("012345678") + [""], "a class has an empty name"),
], ids=["terminal-escapes", "twice", "empty"])
def test_class_names_a_checkpoint_cannot_print_are_refused(classes, problem, tmp_path, capsys):
    """predict, test and the report print the class names a checkpoint stores: a crafted one
    must not drive the terminal, fake a line of output, or give two classes one name."""
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    saved = checkpoint.load(run / "last.pt")
    saved["dataset_spec"]["classes"] = classes
    torch.save(saved, tmp_path / "crafted.pt")
    _image(tmp_path / "x.png")
    before = sorted(tmp_path.rglob("*"))
    for command in (["predict", "crafted.pt", "x.png"], ["test", "crafted.pt", "--no-download"],
                    ["export", "crafted.pt", "--format", "safetensors"]):
        code, out, err = run_main(command, capsys)
        assert code == 2, command
        assert_one_sentence_error(err, f"crafted.pt is a damaged checkpoint: {problem}")
        assert out == ""
    assert sorted(tmp_path.rglob("*")) == before  # no export was written


@pytest.mark.parametrize("key, value, problem", [
    ("lr", "abc", "lr must be a number, not 'abc'"),
    ("seed", 1.5, "seed must be a whole number, not 1.5"),
    ("data_dir", 123, "data_dir must be text, not 123"),
    ("dry_run", "yes", "dry_run must be true or false, not 'yes'"),
], ids=["lr-text", "seed-fraction", "data-dir-number", "dry-run-text"])
def test_a_wrongly_typed_setting_in_a_checkpoint_is_named(key, value, problem, capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    saved = checkpoint.load(run / "last.pt")
    saved["config"][key] = value
    torch.save(saved, run / "last.pt")
    for command in (["test", "r", "--no-download"], ["train", "--resume", "r", "--epochs", "2"],
                    ["report", "r", "--no-download"]):
        code, _, err = run_main(command, capsys)
        assert code == 2, command
        assert_one_sentence_error(err, "r/last.pt is a damaged checkpoint: in its config,",
                                  problem)


def _set(*keys_and_value):
    """A change to a loaded checkpoint: _set("progress", "epoch", "x") sets saved[..][..]."""
    *keys, last, value = keys_and_value

    def change(saved):
        for key in keys:
            saved = saved[key]
        saved[last] = value
    return change


def _sparse_weight(saved):
    saved["model"]["conv1.weight"] = saved["model"]["conv1.weight"].to_sparse()


@pytest.mark.parametrize("change, problem", [
    (_set("progress", "epoch", "x"), "its progress has no count for epoch"),
    (_set("progress", "step", 1.5), "its progress has no count for step"),
    (_set("progress", "seconds", None), "its progress has no number for seconds"),
    (_set("progress", "epoch_loss_sum", "a"), "its progress has no number for epoch_loss_sum"),
    (_set("optimizer", "x"), "it has no optimiser state"),
    (_set("metrics", [1, 2]), "its metrics are not a list of records"),
    (_set("metrics", [{"a": torch.ones(1)}]), "its metrics hold values that are not plain JSON "
                                               "numbers or text"),
    (_set("metrics", [{"a": [[0.5]]}]), "its metrics hold values that are not plain JSON numbers "
                                        "or text"),
    (_set("metrics", [{"a": float("nan")}]), "its metrics hold values that are not plain JSON "
                                             "numbers or text"),
    (_set("world_size", "two"), "its number of processes is not a whole number"),
    (_set("ranks", 5), "its per-process states are not a list"),
    (_set("ranks", [5]), "a process's progress or random generator states are missing"),
    # Found only once the batches are known: a dry run's epoch has 16.
    (_set("progress", "batch", 10**6), "it is at batch 1000000 of an epoch of 16 batches"),
    # torch.load rebuilds a sparse tensor, which a convolution then fails on deep in ATen.
    (_sparse_weight, "conv1.weight is not a dense tensor of real numbers"),
    (_set("rng", "python", "x"), "its random generator states do not load (state with "
                                 "version x passed to Random.setstate()"),
    (_set("rng", "numpy", [1, 2]), "its random generator states do not load"),
    (_set("rng", "torch", torch.zeros(3, dtype=torch.uint8)),
     "its random generator states do not load (Expected a CPUGeneratorImplState of size"),
    (_set("rng", "cuda", "x"), "its random generator states do not load (the CUDA states are "
                               "not byte tensors)"),
    (lambda saved: saved["rng"].pop("python"), "its random generator states do not load "
                                                "(no 'python' state)"),
    (_set("optimizer", "state", 0, "junk"), "its optimiser's per-weight states are not "
                                            "mappings"),
    (_set("optimizer", "param_groups", [5]), "its optimiser's parameter groups are damaged"),
], ids=["epoch-text", "step-fraction", "seconds-none", "sum-text", "optimizer-text",
        "metrics-numbers", "metrics-tensor", "metrics-nested", "metrics-nan", "world-text",
        "ranks-number", "ranks-number-list",
        "batch-beyond-epoch", "sparse-weight", "rng-python", "rng-numpy", "rng-torch",
        "rng-cuda", "rng-missing", "optimizer-state-text", "optimizer-groups-numbers"])
def test_a_damaged_training_state_is_named_and_the_run_folder_kept(change, problem, capsys,
                                                                     recwarn):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    saved = checkpoint.load(run / "last.pt")
    change(saved)
    torch.save(saved, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "r/last.pt is a damaged checkpoint: " + problem)
    assert [str(w.message) for w in recwarn] == []  # torch's own notes would reach stderr
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before if name != "train.log")


@pytest.mark.parametrize("change, problem", [
    (_set("optimizer", "state", 0, "momentum_buffer", torch.zeros(3)),
     "the optimiser's momentum_buffer has shape (3,) where its weight has shape (10, 1, 5, 5)"),
    (_set("optimizer", "state", 0, "momentum_buffer", torch.zeros(10, 1, 5, 5).to_sparse()),
     "the optimiser's momentum_buffer is not a dense tensor (torch.sparse_coo)"),
    (_set("optimizer", "param_groups", 0, "lr", "x"), "the optimiser's lr is 'x', not a finite "
                                                      "number"),
    (_set("optimizer", "param_groups", 0, "momentum", float("nan")),
     "the optimiser's momentum is nan, not a finite number"),
    (_set("optimizer", "param_groups", 0, "nesterov", 3), "the optimiser's nesterov is 3, not "
                                                          "true or false"),
], ids=["buffer-shape", "buffer-sparse", "lr-text", "momentum-nan", "nesterov-number"])
def test_optimiser_values_that_would_fail_the_first_step_are_named(change, problem, capsys):
    """load_state_dict takes a momentum buffer of any shape and a setting of any type; the
    first step then failed with a traceback."""
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    saved = checkpoint.load(run / "last.pt")
    change(saved)
    torch.save(saved, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "r/last.pt does not fit the 'guide' model and its optimiser: "
                              + problem)
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("change, problem", [
    (_set("scheduler", "x"), "the schedule's state is 'x', not a mapping"),
    (_set("scheduler", "total_steps", "x"), "the schedule's total_steps is 'x', not a finite "
                                            "number"),
    (_set("scheduler", "_schedule_phases", "x"), "the schedule's _schedule_phases is 'x', not "
                                                 "a list of 2"),
    (_set("scheduler", "_last_lr", ["x"]), "the schedule's _last_lr is ['x'], not 1 finite "
                                           "number"),
    (_set("ema", "module.conv1.weight", torch.zeros(3)), "size mismatch for module.conv1.weight"),
    (_set("ema", "n_averaged", torch.tensor(-5)), "the weight average's count of updates is "
                                                  "negative"),
], ids=["schedule-text", "total-steps-text", "phases-text", "last-lr-text", "ema-shape",
        "ema-count-negative"])
def test_a_damaged_schedule_or_weight_average_is_named_before_training(change, problem, capsys):
    """OneCycleLR.load_state_dict takes any values, and the first step then failed with a
    TypeError (exit 1)."""
    assert run_main(["train", "--dry-run", "--run-dir", "r", "--epochs", "2", "--keep", "2",
                     "--scheduler", "onecycle", "--ema", "0.99"], capsys)[0] == 0
    saved = checkpoint.load("r/epoch-001.pt")
    change(saved)
    torch.save(saved, "r/epoch-001.pt")
    before = {p.name: p.read_bytes() for p in Path("r").iterdir() if p.is_file()}
    code, _, err = run_main(["train", "--resume", "r/epoch-001.pt", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "r/epoch-001.pt does not fit the 'guide' model and its "
                              "optimiser: " + problem)
    after = {p.name: p.read_bytes() for p in Path("r").iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize("settings", [
    {"recipe": "guide"}, {"recipe": "official"}, {"recipe": "fast"}, {"recipe": "best"},
    {"optimizer": "adam", "scheduler": "onecycle"}, {"optimizer": "adamw", "scheduler": "step"},
], ids=["guide", "official", "fast", "best", "adam-onecycle", "adamw-step"])
def test_every_optimisers_saved_state_passes_its_own_check(settings):
    """The kinds compared are those each optimiser and schedule really save."""
    from torchmnist.setup import build_optimizer, build_scheduler

    config = cfg.TrainConfig(**settings)
    model = models.build(config.model)
    optimizer = build_optimizer(config, model)
    schedule = build_scheduler(config, optimizer, 10)
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()
    saved = optimizer.state_dict()
    again = build_optimizer(config, models.build(config.model))
    fresh_schedule = build_scheduler(config, again, 10)
    checkpoint._check_hyperparameters(again.param_groups, saved["param_groups"])
    again.load_state_dict(saved)
    checkpoint._check_optimizer_state(again)
    if schedule is not None:
        assert checkpoint._mismatch(schedule.state_dict(), fresh_schedule.state_dict(),
                                    "the schedule's") is None


def test_metrics_nested_deeper_than_the_stack_are_named_not_a_recursion_error(capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    saved = checkpoint.load(run / "last.pt")
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    saved["metrics"].append({"kind": "train", "step": 1, "x": deep})
    # Pickled here by Python's pure-Python pickler, which follows the recursion limit raised
    # below; the C pickler stops at a fixed depth of its own from Python 3.12 on. torchmnist
    # loads it with the default limit.
    python_pickle = types.ModuleType("python_pickle")
    python_pickle.Pickler = pickle._Pickler
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        torch.save(saved, run / "last.pt", pickle_module=python_pickle)
    finally:
        sys.setrecursionlimit(limit)
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "r/last.pt", "damaged", "metrics")


@pytest.mark.parametrize("index", [torch.tensor([5, 5]), torch.tensor([1.0, 2.0]),
                                   torch.tensor([3, 10**6]), torch.tensor([3])],
                         ids=["repeated", "fractions", "beyond", "too-few"])
def test_a_damaged_validation_split_is_named(index, capsys):
    assert run_main(["train", "--dry-run", "--val-size", "2", "--epochs", "0.5",
                     "--run-dir", "r"], capsys)[0] == 0
    saved = checkpoint.load("r/last.pt")
    saved["val_index"] = index
    torch.save(saved, "r/last.pt")
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "1"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "validation split", "damaged")


def test_a_wrongly_typed_setting_in_config_json_is_named(capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    config = json.loads((run / "config.json").read_text())
    config.update(scheduler="step", lr="fast")  # the figure's title formats the rate
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(["report", "r", "--no-download"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "config.json", "damaged", "lr", "'fast'")
    assert not (run / "report").exists()


@pytest.mark.parametrize("recipe", ["guide", "fast", "best"])
def test_saved_settings_pass_their_own_check_unchanged(recipe, capsys):
    run = Path(recipe)
    code, _, err = run_main(["train", "--dry-run", "--recipe", recipe, "--run-dir", recipe,
                             "--epochs", "0.25"], capsys)
    assert code == 0, err
    for saved in (checkpoint.load(run / "last.pt")["config"],
                  json.loads((run / "config.json").read_text())):
        again = cfg.checked(saved)
        assert again == saved
        assert [type(v) for v in again.values()] == [type(v) for v in saved.values()]
