"""Careless and hostile inputs: odd file names, non-finite numbers, crafted files, swapped or
oversized data. Each ends in one sentence (or one line per file) and leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_sentence_error, dry_train, make_dataset_files, run_main, write_idx
from PIL import Image

from torchmnist import data
from torchmnist.errors import UsageError
from torchmnist.trained import load_model


def _ring(size: int = 200) -> np.ndarray:
    """A dark ring (a "0") on a light page, uint8."""
    ys, xs = np.indices((size, size))
    r = np.hypot(ys - size * 0.5, (xs - size * 0.5) * 1.5)
    return np.where((r > size * 0.2) & (r < size * 0.3), 20, 235).astype(np.uint8)


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
    dry_train("r", capsys=capsys)
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


# ---- crafted and hand-edited files ---------------------------------------------------------


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
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
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
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    os.truncate(run / name, size)
    code, _, err = run_main(["report", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, f"{name} is {size:,} bytes, more than {what} holds")
    assert not (run / "report").exists()


@pytest.mark.parametrize("text", ["[1]\n", '{"a": ' * 100_000 + "1" + "}" * 100_000],
                         ids=["list", "deep"])
def test_report_refuses_a_config_that_is_not_an_object(text, capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    (run / "config.json").write_text(text)
    code, _, err = run_main(["report", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "config.json is damaged")


def test_report_writes_only_into_a_folder_it_may_fill(capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
    Path("notes").mkdir()
    Path("notes/report.md").write_text("my own notes\n")
    code, _, err = run_main(["report", "r", "--out", "notes", "--mistakes", "4"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "notes", "not a torchmnist report's folder")
    assert [p.name for p in Path("notes").iterdir()] == ["report.md"]
    assert Path("notes/report.md").read_text() == "my own notes\n"
    # A report's own folder is written again; a run folder takes a report beside its files.
    for out in ("reports", "reports", str(run)):
        code, _, err = run_main(["report", "r", "--out", out, "--mistakes", "4"], capsys)
        assert code == 0, (out, err)
    assert (run / "report.md").read_text().startswith("# Run report: r")


# ---- export paths ---------------------------------------------------------------------------


def test_export_never_writes_over_a_file_its_run_keeps(capsys):
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
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
    run = Path(dry_train("r", capsys=capsys)["run_dir"])
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
    with pytest.raises(UsageError, match="10001 items.*train and test files swapped"):
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
