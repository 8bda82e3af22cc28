"""Careless and hostile inputs: odd file names, non-finite numbers, crafted files, swapped or
oversized data. Each ends in one sentence (or one line per file) and leaves nothing behind."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tracemalloc
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, make_dataset_files, run_main, write_idx
from PIL import Image

from torchmnist import config as cfg
from torchmnist import data, models
from torchmnist.errors import UsageError
from torchmnist.storage import checkpoint
from torchmnist.trained import load_model


def _ring(size: int = 200) -> np.ndarray:
    """A dark ring (a "0") on a light page, uint8."""
    ys, xs = np.indices((size, size))
    r = np.hypot(ys - size * 0.5, (xs - size * 0.5) * 1.5)
    return np.where((r > size * 0.2) & (r < size * 0.3), 20, 235).astype(np.uint8)


@pytest.fixture
def weights_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "guide.pth"
    torch.save(models.build("guide").state_dict(), path)
    return path


# ---- predict: every argument gets its own line -------------------------------------------


def test_a_bad_argument_does_not_stop_the_others(weights_file, tmp_path, capsys):
    Image.fromarray(_ring()).save(tmp_path / "good.png")
    long_name = "x" * 300 + ".png"  # longer than a file name may be
    code, out, err = run_main(["predict", str(weights_file), long_name, "good.png", "--json"],
                              capsys)
    assert code == 2
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["file"] for line in lines] == [long_name, "good.png"]
    assert "File name too long" in lines[0]["error"]
    assert "class" in lines[1]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["test", ""], ["predict", "", "x.png"],
                                     ["export", "", "--format", "safetensors"], ["report", ""],
                                     ["serve", ""]], ids=lambda c: c[0])
def test_an_empty_checkpoint_path_is_named_not_taken_as_the_current_folder(command, capsys):
    """Path("") is "."; `torchmnist test "$RUN"` with RUN unset looked for ./last.pt."""
    code, out, err = run_main(command, capsys)
    assert code == 2
    assert_one_sentence_error(err, "path is empty: name a ")
    assert out == ""


def test_an_empty_image_argument_is_an_error_of_its_own(weights_file, tmp_path, capsys):
    """`predict CKPT "$IMAGE"` with IMAGE unset predicted every image in the current folder."""
    Image.fromarray(_ring()).save(tmp_path / "elsewhere.png")
    code, out, _ = run_main(["predict", str(weights_file), "", "--json"], capsys)
    assert code == 2
    assert [json.loads(line) for line in out.splitlines()] == [
        {"file": "", "error": "an empty name: give a file, a folder or a pattern"}]


def test_a_directory_scan_takes_image_files_only(weights_file, tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    Image.fromarray(_ring()).save(folder / "a.png")
    Image.fromarray(_ring()).save(folder / "b.JPG")
    (folder / "labels.csv").write_text("a.png,0\n")
    code, out, _ = run_main(["predict", str(weights_file), "digits", "--json"], capsys)
    assert code == 0
    assert [json.loads(line)["file"] for line in out.splitlines()] == ["digits/a.png",
                                                                       "digits/b.JPG"]
    # Named explicitly, a file that is not an image is an error line of its own.
    code, out, _ = run_main(["predict", str(weights_file), "digits/labels.csv", "--json"], capsys)
    assert code == 2
    assert json.loads(out)["error"] == "not an image file Pillow can read"


def test_a_double_star_glob_searches_every_depth_without_following_links(weights_file,
                                                                          tmp_path, capsys):
    """`'photos/**/*.png'` as bash's globstar: any depth, hidden folders passed over, and
    links to folders not followed (with these two links back up, glob.glob(recursive=True)
    walked 200,000 paths in 20 s and went on)."""
    for name in ("photos/top.png", "photos/2024/may/deep.png", "photos/.thumbs/t.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_ring()).save(tmp_path / name)
    (tmp_path / "photos/2024/up").symlink_to("..")
    (tmp_path / "photos/2024/may/up").symlink_to("../..")
    code, out, _ = run_main(["predict", str(weights_file), "photos/**/*.png", "--json"], capsys)
    assert code == 0
    assert [json.loads(line)["file"] for line in out.splitlines()] == [
        "photos/2024/may/deep.png", "photos/top.png"]
    code, out, _ = run_main(["predict", str(weights_file), "photos/.thumbs/**/*.png",
                             "photos/**/none.png", "--json"], capsys)
    assert code == 2
    assert [json.loads(line) for line in out.splitlines()][0]["file"] == "photos/.thumbs/t.png"
    assert json.loads(out.splitlines()[1]) == {"file": "photos/**/none.png",
                                               "error": "no files match this pattern"}
    # A last "**" means every file below, as in bash (pathlib alone gives the folders).
    code, out, _ = run_main(["predict", str(weights_file), "photos/**", "--json"], capsys)
    assert code == 0
    assert [json.loads(line)["file"] for line in out.splitlines()] == [
        "photos/2024/may/deep.png", "photos/top.png"]


def test_a_run_folder_renamed_in_another_encoding_is_tested_reported_and_exported(capsys):
    """A run folder moved to a Latin-1 name: report ended in UnicodeEncodeError (report.md is
    UTF-8), and the safetensors export failed its parity check, as safetensors opens files by
    UTF-8 names only."""
    _dry_run(capsys)
    run = os.fsdecode(b"run\xff")  # "run\udcff"
    os.rename("r", run)
    code, out, err = run_main(["test", run], capsys)
    assert code == 0, err
    assert out.startswith("run\\xff: guide model on mnist test set")
    code, out, err = run_main(["report", run], capsys)
    assert code == 0, err
    assert out.startswith("wrote run\\xff/report/report.md")
    assert Path(run, "report", "report.md").read_text().startswith("# Run report: run\\\\xff")
    code, out, err = run_main(["export", run, "--format", "safetensors", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["same_predictions"] == 1.0
    assert Path(run, "last.safetensors").is_file()


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_printed_escaped(weights_file, tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(_ring()).save(tmp_path / name)
    for flags in ([], ["--json"]):
        result = subprocess.run([sys.executable, "-m", "torchmnist", "predict",
                                 str(weights_file), name, *flags], cwd=tmp_path,
                                capture_output=True, text=True,
                                env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        assert result.returncode == 0, result.stderr
        assert "caf\\xe9.png" in result.stdout.replace("\\\\", "\\")


@pytest.mark.slow
def test_a_file_name_made_to_drive_the_terminal_is_printed_escaped(weights_file, tmp_path):
    """A newline in a name split one result over two lines, and an escape sequence in one
    reached the terminal (here, one that clears the screen), in results and errors alike."""
    for name in ("two\nlines.png", "clear\x1b[2J.png"):
        Image.fromarray(_ring()).save(tmp_path / name)
    (tmp_path / "bad\x1b[31m.png").write_bytes(b"not an image")
    for flags in ([], ["--json"]):
        result = subprocess.run([sys.executable, "-m", "torchmnist", "predict",
                                 str(weights_file), str(tmp_path), *flags], cwd=tmp_path,
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert "\x1b" not in result.stdout + result.stderr
        # One line an image: results on stdout, and without --json errors on stderr.
        lines = result.stdout.splitlines() + ([] if flags else result.stderr.splitlines())
        assert len(lines) == 3, lines
        names = [json.loads(line)["file"] for line in lines] if flags else lines
        for shown in ("bad\\x1b[31m.png", "clear\\x1b[2J.png", "two\\nlines.png"):
            assert sum(shown in name for name in names) == 1, (shown, names)
    # An error sentence that names such a file: the image folder's damaged image, say.
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.fromarray(_ring()).save(tmp_path / "data" / split / label / "x.png")
    (tmp_path / "data" / "train" / "a" / "bad\x1b[2J.png").write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "torchmnist", "train", "--dataset",
                             "folder:data", "--run-dir", "r"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "\x1b" not in result.stderr
    assert_one_sentence_error(result.stderr, "bad\\x1b[2J.png: not an image file")


# ---- strict JSON and finite numbers -------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--momentum", "nan"),
                                         ("--weight-decay", "inf"), ("--gamma", "inf")])
def test_non_finite_flags_are_refused(flag, value, capsys):
    code, _, err = run_main(["train", "--dry-run", flag, value, "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, f"{flag} must be a finite number")
    assert not Path("r").exists()


def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tmp_path, capsys):
    torch.manual_seed(0)
    state = models.build("guide").state_dict()
    state["fc1.bias"][3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    Image.fromarray(_ring()).save(tmp_path / "x.png")
    for command in (["test", "nan.pt", "--json"], ["predict", "nan.pt", "x.png", "--json"],
                    ["export", "nan.pt", "--format", "safetensors"]):
        code, out, err = run_main(command, capsys)
        assert code == 2, command
        assert_one_sentence_error(err, "nan.pt holds NaN or infinite values in fc1.bias")
        assert out == ""


# ---- crafted and hand-edited files ---------------------------------------------------------


def _dry_run(capsys, run_dir="r"):
    assert run_main(["train", "--dry-run", "--run-dir", run_dir], capsys)[0] == 0
    return Path(run_dir)


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
    run = _dry_run(capsys)
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
    run = _dry_run(capsys)
    saved = checkpoint.load(run / "last.pt")
    saved["dataset_spec"]["classes"] = classes
    torch.save(saved, tmp_path / "crafted.pt")
    Image.fromarray(_ring()).save(tmp_path / "x.png")
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
    run = _dry_run(capsys)
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
    run = _dry_run(capsys)
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
    run = _dry_run(capsys)
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
    run = _dry_run(capsys)
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
    assert_one_sentence_error(err, "r/last.pt is a damaged checkpoint: its metrics hold values "
                                   "that are not plain JSON numbers or text")


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
    assert_one_sentence_error(err, "the checkpoint's validation split is damaged: it is not 2 "
                                   "different training images of the 1024")


def test_a_wrongly_typed_setting_in_config_json_is_named(capsys):
    run = _dry_run(capsys)
    config = json.loads((run / "config.json").read_text())
    config.update(scheduler="step", lr="fast")  # the figure's title formats the rate
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(["report", "r", "--no-download"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "config.json is damaged: lr must be a number, not 'fast'")
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


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "it is a list, not an object"),
    ('{"kind": "train", "epoch": 1}', "it has no whole-number step"),
    # Records that the figures or the table would read a field of, which it lacks.
    ('{"kind": "epoch", "step": 16, "train_loss": 2.2, "seconds": 0.8}',
     "it has no whole-number epoch"),
    ('{"kind": "epoch", "epoch": 1, "step": 16, "seconds": 0.8}',
     "it has no number for train_loss"),
    ('{"kind": "epoch", "epoch": 1, "step": 16, "train_loss": 2.2, "seconds": "0.8"}',
     "it has no number for seconds"),
    ('{"kind": "epoch", "epoch": 1, "step": 16, "train_loss": 2.2, "seconds": 0.8, '
     '"val_accuracy": "high"}', "its val_accuracy is not a number"),
    ("{not json", "is not JSON"),
    ("[" * 100_000 + "]" * 100_000, "it nests deeper than Python's stack"),
], ids=["list", "no-step", "no-epoch", "no-train-loss", "seconds-text", "val-text",
        "not-json", "deep"])
def test_report_names_the_bad_line_of_metrics_and_leaves_nothing(line, problem, capsys):
    run = _dry_run(capsys)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(2, line)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_main(["report", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "metrics.jsonl, line 3", problem)
    assert not (run / "report").exists()


@pytest.mark.parametrize("name, size, what", [
    ("config.json", 10 * 2**20 + 1, "a run's settings"),
    ("metrics.jsonl", 256 * 2**20 + 1, "a run's metrics log"),
])
def test_report_refuses_a_run_file_too_big_to_be_one_before_reading_it(name, size, what, capsys):
    """A run folder from elsewhere with a config.json or metrics.jsonl of many gigabytes was
    read whole into memory. (The files here are sparse: no disk is spent on them.)"""
    run = _dry_run(capsys)
    os.truncate(run / name, size)
    code, _, err = run_main(["report", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, f"{name} is {size:,} bytes, more than {what} holds")
    assert not (run / "report").exists()


@pytest.mark.parametrize("text", ["[1]\n", '{"a": ' * 100_000 + "1" + "}" * 100_000],
                         ids=["list", "deep"])
def test_report_refuses_a_config_that_is_not_an_object(text, capsys):
    run = _dry_run(capsys)
    (run / "config.json").write_text(text)
    code, _, err = run_main(["report", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "config.json is damaged")


def test_report_writes_only_into_a_folder_it_may_fill(capsys):
    run = _dry_run(capsys)
    Path("notes").mkdir()
    Path("notes/report.md").write_text("my own notes\n")
    code, _, err = run_main(["report", "r", "--out", "notes", "--mistakes", "4"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "notes is not empty and is not a torchmnist report's folder")
    assert [p.name for p in Path("notes").iterdir()] == ["report.md"]
    assert Path("notes/report.md").read_text() == "my own notes\n"
    # A report's own folder is written again; a run folder takes a report beside its files.
    for out in ("reports", "reports", str(run)):
        code, _, err = run_main(["report", "r", "--out", out, "--mistakes", "4"], capsys)
        assert code == 0, (out, err)
    assert (run / "report.md").read_text().startswith("# Run report: r")


# ---- export paths ---------------------------------------------------------------------------


def test_export_never_writes_over_a_file_its_run_keeps(capsys):
    run = _dry_run(capsys)
    assert run_main(["train", "--resume", "r", "--epochs", "2", "--keep", "1", "--quiet"],
                    capsys)[0] == 0
    for name in ("best.pt", "last.pt", "epoch-002.pt", "metrics.jsonl", "config.json"):
        before = (run / name).read_bytes()
        code, _, err = run_main(["export", "r", "--format", "onnx", "--out", f"r/{name}"],
                                capsys)
        assert code == 2, name
        assert_one_sentence_error(err, f"exporting would overwrite r/{name}")  # last.pt: itself
        assert (run / name).read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".torchmnist-tmp")]


def test_export_never_replaces_a_device_or_a_pipe(capsys):
    # Renamed over --out, the export once replaced a named pipe, and as root /dev/null would go.
    run = _dry_run(capsys)
    os.mkfifo("out.onnx")
    code, _, err = run_main(["export", str(run), "--format", "onnx", "--out", "out.onnx"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "--out out.onnx is not a regular file")
    assert Path("out.onnx").is_fifo()
    assert [p.name for p in Path().iterdir() if p.name.startswith(".torchmnist-tmp")] == []


def test_export_takes_any_suffix_and_a_folder(weights_file, tmp_path, capsys):
    make_dataset_files(tmp_path / "data" / "MNIST" / "raw", n_train=64, n_test=300)
    code, out, err = run_main(["export", str(weights_file), "--format", "safetensors", "--out",
                               "model.bin", "--data-dir", "data", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["file"] == "model.bin"
    assert load_model("model.bin").name == "guide"  # readable under any name
    (tmp_path / "exports").mkdir()
    code, out, err = run_main(["export", str(weights_file), "--format", "safetensors", "--out",
                               "exports", "--data-dir", "data", "--json"], capsys)
    assert code == 0, err
    assert Path(json.loads(out)["file"]) == Path("exports/guide.safetensors")
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["guide.safetensors"]


# ---- data ------------------------------------------------------------------------------------


def test_swapped_train_and_test_files_are_refused(tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 100))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10_001, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 10_001))
    with pytest.raises(UsageError, match="holds 10001 items, more than the 10000 of its split: "
                                         "are the train and test files swapped"):
        data.load("mnist", tmp_path / "data", download=False)


def test_a_gzip_bomb_is_read_only_as_far_as_its_header_says(tmp_path):
    # A valid header for 100 images, then 64 MB of zeros that compress to almost nothing.
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (100, 28, 28))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header)
        for _ in range(64):
            f.write(bytes(2**20))
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match="longer than its header says"):
            data.read_idx(path, data.IMAGE_MAGIC, 10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # 100 images are 78 KB; the 64 MB were never held


def test_a_header_claiming_too_many_items_is_refused_before_reading(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (5_000_000, 28, 28))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header))
    with pytest.raises(UsageError, match="holds 5000000 items, more than the 60000"):
        data.read_idx(path, data.IMAGE_MAGIC, 60_000)


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    import torchvision.datasets

    def failing_download(root, train=True, download=False):
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"half a file")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", failing_download)
    with pytest.raises(UsageError, match="Error downloading"):
        data.load("mnist", tmp_path / "typo", download=True)
    assert list(tmp_path.iterdir()) == []


def test_the_guide_scripts_own_folder_is_searched(tmp_path):
    make_dataset_files(tmp_path / "datasets" / "mnist" / "MNIST" / "raw", n_train=32, n_test=16)
    digits = data.load("mnist", tmp_path / "datasets", download=False)
    assert (len(digits.train), len(digits.test)) == (32, 16)
    assert "datasets/mnist/MNIST/raw" in digits.source


# ---- images that would take gigabytes -------------------------------------------------------


def test_an_image_above_the_pixel_limit_is_refused_without_decoding(weights_file, tmp_path,
                                                                    capsys):
    Image.new("1", (11_000, 11_000)).save(tmp_path / "huge.png")  # 121 million pixels
    code, out, _ = run_main(["predict", str(weights_file), "huge.png", "--json"], capsys)
    assert code == 2
    assert json.loads(out)["error"] == ("the image is 11000x11000 pixels, more than the 120 "
                                        "million torchmnist reads; scale it down first")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_large_photo_is_reduced_while_read_and_stays_small_in_memory(weights_file, tmp_path):
    side = 10_000  # 100 million pixels
    page = Image.new("L", (side, side), 235)
    page.paste(Image.fromarray(_ring(4000)), (3000, 3000))
    page.save(tmp_path / "photo.png")
    del page
    # The peak resident memory of this process image alone: VmHWM (ru_maxrss would carry over
    # the memory of the pytest process it was forked from).
    script = ("import json, re\n"
              "from torchmnist.commands.prediction import predict\n"
              f"result = predict({str(weights_file)!r}, ['photo.png'], device='cpu')[0]\n"
              "status = open('/proc/self/status').read()\n"
              "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024\n"
              "print(json.dumps({'result': result, 'peak': peak}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert "class" in report["result"], report
    assert report["peak"] < 1.5 * 2**30, report["peak"]
