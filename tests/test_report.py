"""`torchmnist report` and `--tensorboard`: what a run looked like, as pictures."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, read_metrics, run_main
from PIL import Image

from torchmnist.storage import checkpoint


def _dry_run(capsys, *flags, run_dir="r"):
    code, _, err = run_main(["train", "--dry-run", "--epochs", "3", "--run-dir", run_dir,
                             "--log-interval", "4", *flags], capsys)
    assert code == 0, err


def test_report_draws_the_figures_and_ties_them_together(capsys):
    _dry_run(capsys, "--lr", "0.05")
    code, out, err = run_main(["report", "r", "--json", "--mistakes", "10"], capsys)
    assert code == 0, err
    result = json.loads(out)
    for name in ("curves", "confusion", "mistakes"):
        path = Path(result[name])
        assert path.parent == Path("r/report") and path.suffix == ".png"
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 200
    markdown = Path(result["report"]).read_text()
    for figure in ("curves.png", "confusion.png", "mistakes.png"):
        assert f"]({figure})" in markdown
    # The numbers stated are the run's: accuracy from the model, epochs from metrics.jsonl.
    epochs = [r for r in read_metrics(Path("r")) if r["kind"] == "epoch"]
    assert f"{100 * epochs[-1]['test_accuracy']:.2f}%" in markdown
    assert f"{100 * result['test_accuracy']:.2f}%" in markdown
    assert result["total"] == 512 and result["correct"] + result["misclassified"] == 512
    assert "| `lr` | `0.05` |" in markdown  # the settings that differ from the defaults
    assert markdown.count("\n| 3 | ") == 1  # one row per epoch in the table


def test_report_curves_fit_the_run(capsys):
    from torchmnist.commands import reporting

    # A constant rate gets no panel of its own; the accuracy axis stays within the data and
    # never passes 100%, also for a run with one test.
    _dry_run(capsys, "--epochs", "1", run_dir="plain")
    config = json.loads(Path("plain/config.json").read_text())
    figure = reporting._curves(read_metrics(Path("plain")), config)
    loss, accuracy = figure.axes
    assert "learning rate 0.01 throughout" in loss.get_title()
    tested = [100 * r["test_accuracy"] for r in read_metrics(Path("plain"))
              if r["kind"] == "epoch"]
    low, high = accuracy.get_ylim()
    assert high <= 100 and low <= tested[0] <= high and high - low < 5
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert labels[0].startswith("training: negative log-likelihood")
    # A schedule gets its panel; a label-smoothed training loss says so.
    _dry_run(capsys, "--recipe", "fast", "--epochs", "0.75", run_dir="fast")
    config = json.loads(Path("fast/config.json").read_text())
    figure = reporting._curves(read_metrics(Path("fast")), config)
    assert [a.get_title() for a in figure.axes][2] == "learning rate"
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("training: cross-entropy with label smoothing 0.1")
    code, _, err = run_main(["report", "fast"], capsys)
    assert code == 0, err
    markdown = Path("fast/report/report.md").read_text()
    assert "; 0.75 epochs, 12 steps" in markdown
    settings = markdown.split("## Configuration")[1]
    assert "| `recipe` | `\"fast\"` |" in settings and "| `epochs` | `0.75` |" in settings
    for key in ("json", "threads", "run_dir", "log_interval", "quiet"):
        assert f"| `{key}` |" not in settings, key
    # A checkpoint in the run folder: the same curves, that checkpoint scored.
    code, out, err = run_main(["report", "fast/best.pt", "--out", "best-report", "--json"],
                              capsys)
    assert code == 0, err
    assert json.loads(out)["total"] == 512 and Path("best-report/curves.png").is_file()


def test_class_names_with_tex_and_markdown_marks_are_shown_as_written(capsys):
    """Class folders such as "$1", "$5" (bank notes) or "a|b": matplotlib read "$...$" as TeX
    and ended the report in a parse error with a traceback, and report.md's tables split at
    "|" and GitHub's markdown read "$...$" as math."""
    _dry_run(capsys)
    saved = checkpoint.load("r/last.pt")
    names = ["$1", "$\\frac{$", "a|b", "*x*", "4", "5", "6", "7", "8", "<b>9"]
    saved["dataset_spec"]["classes"] = names
    torch.save(saved, "r/last.pt")
    code, _, err = run_main(["report", "r", "--json"], capsys)
    assert code == 0, err
    text = Path("r/report/report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| class |"))
    assert row == ("| class | \\$1 | \\$\\\\frac{\\$ | a\\|b | \\*x\\* | 4 | 5 | 6 | 7 | 8 | "
                   "\\<b\\>9 |")
    assert len(row.split(" | ")) == 11  # one cell a class, after the heading
    for figure in ("confusion", "mistakes"):
        assert Path(f"r/report/{figure}.png").stat().st_size > 0


def test_a_run_on_many_classes_gets_a_report_that_reads(capsys):
    """A folder dataset of 60 classes: the confusion matrix wrote a number into each of its
    3,600 cells, too small for them (300 classes took 30 s to draw), crowded every name on the
    axes, and report.md gave one table row 61 cells wide."""
    classes = [f"c{i:02d}" for i in range(60)]
    for split, count in (("train", 2), ("test", 1)):
        for i, name in enumerate(classes):
            (Path("f") / split / name).mkdir(parents=True)
            for k in range(count):  # a bar at a place of its own for each class
                pixels = np.zeros((28, 28), np.uint8)
                pixels[2 + i % 24: 6 + i % 24, 2 + (i // 24) * 8 + k: 8 + (i // 24) * 8] = 255
                Image.fromarray(pixels).save(Path("f") / split / name / f"{k}.png")
    code, _, err = run_main(["train", "--dataset", "folder:f", "--epochs", "1", "--run-dir", "r",
                             "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_main(["report", "r", "--mistakes", "4"], capsys)
    assert code == 0, err
    lines = Path("r/report/report.md").read_text().splitlines()
    at = lines.index("| class | test images | accuracy |")
    rows = lines[at + 2: at + 62]
    assert [row.split(" | ")[0] for row in rows] == [f"| {name}" for name in classes]
    assert all(row.split(" | ")[1] == "1" for row in rows)
    assert not any(line.startswith("| class | c00 |") for line in lines)


def test_the_confusion_matrix_shows_counts_and_names_while_they_fit():
    from torchmnist.commands import reporting

    for n, counted, named in ((10, True, 10), (30, True, 30), (60, False, 30), (300, False, 50)):
        confusion = np.eye(n, dtype=np.int64) * 5 + 1
        figure = reporting._confusion(confusion, tuple(f"class{i}" for i in range(n)))
        axes = figure.axes[0]
        assert len(axes.texts) == (n * n if counted else 0), n
        names = [label.get_text() for label in axes.get_xticklabels()]
        assert len(names) == named and names[0] == "class0", n


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    Path("empty").mkdir()
    code, _, err = run_main(["report", "empty"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "not a torchmnist run directory", "config.json")
    code, _, err = run_main(["report", "nowhere"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "no run directory at nowhere")


def test_a_report_file_that_is_a_link_is_refused_and_what_it_names_untouched(capsys):
    """A run folder from elsewhere, its report folder included, may link a figure's name to
    any file; the report must not draw over that file."""
    _dry_run(capsys)
    Path("r/report").mkdir()
    Path("r/report/report.md").write_text("# Run report: r\n")
    Path("mine.png").write_bytes(b"my own figure")
    Path("r/report/curves.png").symlink_to(Path("mine.png").resolve())
    code, out, err = run_main(["report", "r"], capsys)
    assert code == 2 and out == ""
    assert_one_sentence_error(err, "r/report/curves.png", "symbolic link",
                              "nothing in r/report was changed", "--out")
    assert Path("mine.png").read_bytes() == b"my own figure"
    assert sorted(p.name for p in Path("r/report").iterdir()) == ["curves.png", "report.md"]


def test_a_report_made_again_on_a_failing_disk_leaves_the_old_one_whole(capsys, monkeypatch):
    _dry_run(capsys)
    assert run_main(["report", "r"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in Path("r/report").iterdir()}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    code, out, err = run_main(["report", "r"], capsys)
    assert code == 1 and out == ""
    assert_one_sentence_error(err, "r/report/curves.png", "No space left on device",
                              "unchanged")
    assert {p.name: p.read_bytes() for p in Path("r/report").iterdir()} == before


@pytest.mark.mnist
def test_report_of_a_real_run(guide_run, mnist_dir, tmp_path, capsys):
    code, out, err = run_main(["report", guide_run["run_dir"], "--out", "rep", "--data-dir",
                               str(mnist_dir), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["total"] == 10000
    assert result["test_accuracy"] == pytest.approx(guide_run["test_accuracy"])
    assert "most confident mistakes" in Path("rep/report.md").read_text()


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_gets_the_metrics_and_an_image_grid(capsys):
    _dry_run(capsys, "--tensorboard")
    events = _events(Path("r"))
    tags = events.Tags()
    assert {"loss/train", "loss/train_epoch", "loss/test", "accuracy/test",
            "learning_rate"} <= set(tags["scalars"])
    assert tags["images"] == ["test images"]
    metrics = read_metrics(Path("r"))
    epochs = [r for r in metrics if r["kind"] == "epoch"]
    accuracy = events.Scalars("accuracy/test")
    assert [e.step for e in accuracy] == [r["step"] for r in epochs]
    assert [e.value for e in accuracy] == pytest.approx([r["test_accuracy"] for r in epochs])
    train = [r for r in metrics if r["kind"] == "train"]
    assert [e.step for e in events.Scalars("loss/train")] == [r["step"] for r in train]


def test_tensorboard_after_a_resume_continues_without_duplicates(capsys):
    _dry_run(capsys, "--tensorboard", "--epochs", "1")
    code, _, err = run_main(["train", "--resume", "r/last.pt", "--epochs", "2", "--tensorboard"],
                            capsys)
    assert code == 0, err
    steps = [e.step for e in _events(Path("r")).Scalars("accuracy/test")]
    assert steps == sorted(set(steps)) and len(steps) == 2


def test_missing_optional_packages_are_named(capsys, monkeypatch):
    _dry_run(capsys, "--epochs", "1")
    for module in ("matplotlib", "matplotlib.figure"):  # importing them now fails
        monkeypatch.setitem(sys.modules, module, None)
    code, _, err = run_main(["report", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "needs matplotlib", "pip install 'torchmnist[report]'")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, _, err = run_main(["train", "--dry-run", "--run-dir", "t", "--tensorboard"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "--tensorboard needs the tensorboard package",
                              "pip install 'torchmnist[tensorboard]'")
