"""Run folders: only torchmnist's own folders are written into, a resumed run stays where its
checkpoint is, a run can be extended, and one folder has one writer at a time."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    TORCHMNIST,
    assert_one_sentence_error,
    last_json,
    read_metrics,
    run_main,
    run_subprocess,
    start_until,
)

from torchmnist.errors import UsageError
from torchmnist.storage import checkpoint, rundir


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "config.json").write_text("x\n")
    (folder / ".notes.tmp").write_text("n\n")
    (folder / "metrics.jsonl").write_text("k\n")
    before = _listing(folder)
    code, _, err = run_main(["train", "--dry-run", "--run-dir", str(folder)], capsys)
    assert code == 2
    assert_one_sentence_error(err, str(folder), "is not a torchmnist run folder",
                              "nothing in it was changed")
    assert _listing(folder) == before


def test_the_current_folder_of_a_project_is_refused(tmp_path, capsys):
    (tmp_path / "train.py").write_text("print('my project')\n")
    code, _, err = run_main(["train", "--dry-run", "--run-dir", "."], capsys)
    assert code == 2
    assert_one_sentence_error(err, "is not a torchmnist run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.py"]


def test_a_run_folder_that_cannot_be_made_is_one_usage_sentence(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("n\n")  # a file where a parent folder would go
    code, _, err = run_main(["train", "--dry-run", "--run-dir", "notes.txt/run"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "notes.txt/run", "notes.txt is a file",
                              "--run-dir")
    assert (tmp_path / "notes.txt").read_text() == "n\n"


@pytest.mark.parametrize("command, flag", [
    (["report", "RUN", "--out", "OUT"], "--out"),
    (["export", "RUN", "--format", "safetensors", "--out", "OUT/m.safetensors"], "--out"),
    (["predict", "RUN", "digit.png", "--save-preprocessed", "OUT"], "--save-preprocessed"),
])
def test_an_output_folder_that_cannot_be_made_is_one_usage_sentence(command, flag, tmp_path,
                                                                    capsys):
    from PIL import Image

    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    Image.new("L", (28, 28)).save("digit.png")
    Path("notes.txt").write_text("n\n")
    args = [{"RUN": "r", "OUT": "notes.txt/out"}.get(a, a.replace("OUT", "notes.txt/out"))
            for a in command]
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert_one_sentence_error(err, "cannot make the folder notes.txt/out: notes.txt is a file; "
                              f"choose another {flag}")
    assert Path("notes.txt").read_text() == "n\n"


def test_a_folder_is_a_run_by_its_marker_alone(tmp_path, capsys):
    # A checkpoint in a folder does not make it a run: without the marker, a resume there
    # is refused and nothing in the folder changes.
    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    (tmp_path / "r" / rundir.MARKER).unlink()
    assert not rundir.is_run(tmp_path / "r")
    before = _snapshot(tmp_path / "r")
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "is not a torchmnist run folder", rundir.MARKER,
                              "nothing in it was changed")
    assert _snapshot(tmp_path / "r") == before


def test_a_new_or_empty_folder_becomes_a_marked_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/deeper"):
        assert run_main(["train", "--dry-run", "--run-dir", name], capsys)[0] == 0
        assert rundir.is_run(tmp_path / name)
        assert (tmp_path / name / rundir.MARKER).is_file()


def test_only_torchmnist_temporaries_are_cleaned_up(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    (tmp_path / "r" / ".notes.tmp").write_text("mine\n")
    stale = tmp_path / "r" / f"{rundir.TEMPORARY_PREFIX}last.pt.abc123"  # from a killed run
    stale.write_bytes(b"half")
    odd = tmp_path / "r" / f"{rundir.TEMPORARY_PREFIX}folder"  # never one torchmnist makes
    odd.mkdir()
    assert run_main(["train", "--resume", "--run-dir", "r", "--epochs", "2"], capsys)[0] == 0
    assert (tmp_path / "r" / ".notes.tmp").read_text() == "mine\n"
    assert not stale.exists()
    assert odd.is_dir()


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Each entry's type and, for plain files, contents, without opening anything else
    (reading a named pipe would wait forever)."""
    return {p.name: (p.lstat().st_mode, p.read_bytes() if p.is_file() and not p.is_symlink()
                     else None) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl", "config.json", rundir.LOCK,
                                  rundir.MARKER, "best.pt", "epoch-002.pt"])
def test_a_run_file_that_is_a_link_or_a_pipe_is_refused_before_anything_is_written(
        name, tmp_path, capsys):
    """A run folder from elsewhere whose train.log links to ~/.bashrc must not have training
    append to that file; a named pipe must not hang the resume."""
    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    victim = tmp_path / "victim.txt"
    for kind in ("link", "pipe", "folder"):
        run = tmp_path / kind
        shutil.copytree(tmp_path / "r", run)
        (run / name).unlink(missing_ok=True)
        if kind == "link":
            victim.write_text("precious\n")
            (run / name).symlink_to(victim)
        elif kind == "pipe":
            os.mkfifo(run / name)
        else:
            (run / name).mkdir()
        before = _snapshot(run)
        code, _, err = run_main(["train", "--resume", kind, "--epochs", "3"], capsys)
        assert code == 2, (kind, err)
        shown = {"link": "a symbolic link", "pipe": "a named pipe", "folder": "a folder"}[kind]
        assert_one_sentence_error(err, f"{Path(kind) / name} is {shown}, not a plain file",
                                  "nothing in", "was changed")
        assert _snapshot(run) == before, kind
        assert victim.read_text() == "precious\n"


def test_a_moved_run_resumes_where_it_is_now(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "runs/a"], capsys)[0] == 0
    shutil.move(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    code, out, err = run_main(["train", "--resume", "runs/b", "--epochs", "2", "--json"], capsys)
    assert code == 0, err
    summary = last_json(out)
    assert not (tmp_path / "runs" / "a").exists()
    assert Path(summary["run_dir"]) == Path("runs/b")
    assert Path(summary["checkpoint"]) == Path("runs/b/last.pt")
    assert [r["epoch"] for r in read_metrics(tmp_path / "runs" / "b") if r["kind"] == "epoch"] \
        == [1, 2]


def test_resuming_a_copy_leaves_the_original_alone(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "a"], capsys)[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    original = _listing(tmp_path / "a")
    assert run_main(["train", "--resume", "c", "--epochs", "2"], capsys)[0] == 0
    assert _listing(tmp_path / "a") == original


def test_resuming_into_the_folder_of_another_run_is_refused(tmp_path, capsys):
    """--resume A --run-dir B once continued A in B, replacing B's own checkpoints and records
    without a word."""
    assert run_main(["train", "--dry-run", "--run-dir", "a"], capsys)[0] == 0
    assert run_main(["train", "--dry-run", "--run-dir", "b", "--seed", "5"], capsys)[0] == 0
    before = _listing(tmp_path / "b")
    code, _, err = run_main(["train", "--resume", "a", "--run-dir", "b", "--epochs", "2"],
                            capsys)
    assert code == 2
    assert_one_sentence_error(err, "b/last.pt", "a/last.pt", "would replace")
    assert _listing(tmp_path / "b") == before
    # Its own folder, however it is spelled, and a new one are fine.
    for run_dir, epochs in (("./a/", "2"), ("c", "3")):
        code, _, err = run_main(["train", "--resume", "a/last.pt", "--run-dir", run_dir,
                                 "--epochs", epochs], capsys)
        assert code == 0, err


def test_going_back_to_an_earlier_checkpoint_says_what_it_replaces(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "r", "--epochs", "2", "--keep", "2"],
                    capsys)[0] == 0
    code, out, err = run_main(["train", "--resume", "r/epoch-001.pt", "--epochs", "2"], capsys)
    assert code == 0, err
    assert "resume: r/last.pt and metrics.jsonl go on from this checkpoint; what they held " \
           "after it is replaced" in out
    code, out, err = run_main(["train", "--resume", "r", "--epochs", "3"], capsys)
    assert code == 0, err
    assert "resuming from r/last.pt" in out and "is replaced" not in out


@pytest.mark.slow
def test_resuming_from_another_folder_writes_nothing_there(tmp_path):
    run = tmp_path / "project" / "runs" / "a"
    assert run_subprocess(["train", "--dry-run", "--run-dir", str(run)],
                          cwd=tmp_path).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = run_subprocess(["train", "--resume", str(run), "--epochs", "2", "--json"],
                             cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert list(elsewhere.iterdir()) == []
    assert last_json(resumed.stdout)["epochs"] == 2


@pytest.mark.parametrize("first, then, steps", [("0.5", "2", 32), ("0.02", "1", 16)])
def test_a_fractional_run_can_be_extended_to_the_fresh_run(first, then, steps, tmp_path,
                                                           capsys):
    """16 batches an epoch: the extended run takes every step a fresh run of the new length
    takes (none skipped, none trained twice) and, with no schedule, ends with its weights."""
    assert run_main(["train", "--dry-run", "--run-dir", "part", "--epochs", first, "--device",
                     "cpu"], capsys)[0] == 0
    code, out, err = run_main(["train", "--resume", "--run-dir", "part", "--epochs", then,
                               "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["steps"] == steps
    assert run_main(["train", "--dry-run", "--run-dir", "fresh", "--epochs", then, "--device",
                     "cpu"], capsys)[0] == 0
    extended, fresh = _weights(tmp_path / "part" / "last.pt"), \
        _weights(tmp_path / "fresh" / "last.pt")
    assert all(torch.equal(extended[k], fresh[k]) for k in fresh)


def test_resuming_a_finished_fractional_run_trains_nothing_more(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "r", "--epochs", "0.5"], capsys)[0] == 0
    before = read_metrics(tmp_path / "r")
    code, out, err = run_main(["train", "--resume", "--run-dir", "r", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["steps"] == 8
    assert read_metrics(tmp_path / "r") == before


def test_resuming_with_fewer_epochs_than_done_is_refused_and_writes_nothing(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "r", "--epochs", "2"], capsys)[0] == 0
    before = _listing(tmp_path / "r")
    code, _, err = run_main(["train", "--resume", "--run-dir", "r", "--epochs", "1"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "has already trained 32 steps", "--epochs 1 ends at step 16")
    assert _listing(tmp_path / "r") == before


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tmp_path):
    first = start_until([*TORCHMNIST, "train", "--dry-run", "--run-dir", "r", "--epochs", "200",
                         "--device", "cpu"], tmp_path,
                        (tmp_path / "r" / "last.pt").exists,  # training has begun
                        stdout=subprocess.DEVNULL)
    try:
        second = run_subprocess(["train", "--resume", "--run-dir", "r", "--epochs", "300"],
                                cwd=tmp_path)
        assert second.returncode == 2
        assert_one_sentence_error(second.stderr, "is in use by another torchmnist process",
                                  f"PID {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed process's lock went with it (its loader workers never held it): the folder
    # can be locked again at once.
    with rundir.RunLock(tmp_path / "r"):
        pass


def test_the_lock_is_never_taken_through_a_link_or_a_pipe(tmp_path):
    """Even a link or a pipe that appears after the folder's checks: the lock would truncate
    the linked file to write its PID there."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for kind in ("link", "pipe"):
        folder = tmp_path / kind
        folder.mkdir()
        if kind == "link":
            (folder / rundir.LOCK).symlink_to(victim)
        else:
            os.mkfifo(folder / rundir.LOCK)
        with pytest.raises(UsageError, match=f"cannot lock {folder}"):
            rundir.RunLock(folder).acquire()
    assert victim.read_text() == "precious\n"


def test_a_log_that_cannot_be_written_is_named_and_the_checkpoints_kept(tmp_path, capsys,
                                                                        monkeypatch):
    """A full disk while appending to train.log: one sentence naming the file, not a bare
    "No space left on device"."""
    from torchmnist.runtime import runlog

    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    kept = _listing(tmp_path / "r")

    def full_disk(path, *args, **kwargs):  # /dev/full: every write fails with ENOSPC
        return open("/dev/full" if Path(path).name == "train.log" else path, *args, **kwargs)

    monkeypatch.setattr(runlog, "open", full_disk, raising=False)
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 1
    assert_one_sentence_error(err, "could not write /dev/full (No space left on device",
                              "the checkpoints saved so far are unchanged")
    now = _listing(tmp_path / "r")
    assert {name: now[name] for name in ("last.pt", "best.pt", "metrics.jsonl")} == \
        {name: kept[name] for name in ("last.pt", "best.pt", "metrics.jsonl")}


def test_the_files_a_resume_rewrites_are_replaced_whole_or_not_at_all(tmp_path, capsys,
                                                                      monkeypatch):
    """config.json and metrics.jsonl are rewritten when a run resumes: a disk that fails the
    write must leave them as they were, not truncated."""
    assert run_main(["train", "--dry-run", "--run-dir", "r"], capsys)[0] == 0
    kept = _listing(tmp_path / "r")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "2"], capsys)
    assert code == 1
    assert_one_sentence_error(err, "r/config.json", "No space left on device",
                              "unchanged")
    now = _listing(tmp_path / "r")
    assert {k: v for k, v in now.items() if k != "train.log"} == \
        {k: v for k, v in kept.items() if k != "train.log"}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, ValueError("the writer's own error")],
                         ids=["ctrl-c", "writer-error"])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(stop, tmp_path):
    """A second Ctrl-C while a checkpoint is written, or an error of the writer's own (PIL,
    matplotlib), ends the write: the old file stays, and so does nothing half-written."""
    target = tmp_path / "best.pt"
    target.write_bytes(b"the old weights")

    def write(f):
        f.write(b"half of the new")
        raise stop

    with pytest.raises((KeyboardInterrupt, ValueError)):
        rundir.write_atomically(target, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert target.read_bytes() == b"the old weights"


def test_a_bare_resume_continues_the_newest_run_and_passes_over_what_is_no_checkpoint(capsys):
    code, _, err = run_main(["train", "--resume", "--epochs", "2"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "--resume", "no runs/*/last.pt")
    for name in ("older", "newer"):
        assert run_main(["train", "--dry-run", "--run-dir", f"runs/{name}"], capsys)[0] == 0
    Path("runs/pipe").mkdir()
    os.mkfifo("runs/pipe/last.pt")  # no checkpoint (it was picked, being newest, and failed)
    for name, when in (("older", 1_000), ("newer", 2_000), ("pipe", 3_000)):
        os.utime(f"runs/{name}/last.pt", (when, when))  # (a file system's clock may be coarse)
    older = Path("runs/older/last.pt").read_bytes()
    code, out, err = run_main(["train", "--resume", "--epochs", "2", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["run_dir"] == "runs/newer"
    assert Path("runs/older/last.pt").read_bytes() == older
