"""Shared fixtures: the real MNIST folder, small IDX files made on the spot, and CLI runners."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from torchmnist import config, models
from torchmnist.commands import cli
from torchmnist.data import datasets
from torchmnist.runtime import devices

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The root holding MNIST/raw, from TORCHMNIST_DATA_DIR (CI points it at ../shared/data).

    Under CI=true a missing folder fails the test instead of skipping it, so a broken setup
    cannot pass for a green run.
    """
    root = os.environ.get("TORCHMNIST_DATA_DIR")
    raw = Path(root) / "MNIST" / "raw" if root else None
    if raw is None or not all((raw / name).is_file() for name in MNIST_FILES):
        message = f"real MNIST files not found (TORCHMNIST_DATA_DIR={root!r})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(root).resolve()


ROOT = Path(__file__).resolve().parents[1]


def _checkout_state() -> str | None:
    """`git status` of the checkout, untracked files included; None outside a git checkout."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _checkout_unchanged():
    """Tests write only under their temporary folders: after the suite, the checkout is as it
    was before it (a test that wrote a run folder into it once went unnoticed)."""
    before = _checkout_state()
    yield
    after = _checkout_state()
    if before is not None and after != before:
        pytest.fail(f"the tests changed the checkout; git status before:\n{before}\nafter:\n"
                    f"{after}")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own directory, with no data folder unless it asks for one, and
    its own cache of decoded image folders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHMNIST_DATA_DIR", raising=False)
    monkeypatch.setenv("TORCHMNIST_CACHE_DIR", str(tmp_path / "cache"))  # decoded image folders
    monkeypatch.setattr(datasets, "SYSTEM_DATASETS_DIR", tmp_path / "no-system-datasets")
    # A recipe's values for CPUs without native bf16 (config.CPU_FP32_RECIPES) are taken where
    # the CPU lacks it; here every machine gets the same values, so that the tests expect the
    # same models and schedules on any CI machine. What the run trains in (--amp auto) is
    # still this CPU's choice. test_precision.py covers the variants themselves.
    monkeypatch.setattr(config, "_on_cpu_without_bf16", lambda device: False)
    # Whether other work keeps a core busy is read at each run's start (a note); the suite's
    # own processes must not make lines appear in one test and not in another.
    monkeypatch.setattr(devices, "busy_cores", lambda window=0.05: 0.0)


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write a uint8 array as an IDX file, the format of the MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_dataset_files(folder: Path, n_train: int = 256, n_test: int = 128, *,
                       compress: bool = False, seed: int = 0) -> Path:
    """Four small valid IDX files (random pixels, labels 0-9) in `folder`."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28)), compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n),
                  compress=compress)
    return folder


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process; return (exit code, stdout, stderr)."""
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def dry_train(run_dir: Path | str, *flags: str, capsys) -> dict:
    """`torchmnist train --dry-run --run-dir RUN_DIR --json FLAGS`, in this process: its
    summary, or the test fails with what the run printed."""
    code, out, err = run_main(["train", "--dry-run", "--run-dir", str(run_dir), "--json",
                               *flags], capsys)
    assert code == 0, err
    return last_json(out)


def run_subprocess(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600,
                   input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run `python -m torchmnist ARGS` as a user would, in a fresh process; `input`, if given,
    is piped to its standard input."""
    full_env = {k: v for k, v in os.environ.items() if k != "TORCHMNIST_DATA_DIR"}
    full_env.update(env or {})
    command = [sys.executable, "-m", "torchmnist", *args]
    if input is None:
        return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    done = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, input=input,
                          timeout=timeout)
    return subprocess.CompletedProcess(command, done.returncode, done.stdout.decode(),
                                       done.stderr.decode())


TORCHMNIST = (sys.executable, "-m", "torchmnist")  # the command, as a user runs it


def start_until(command: list[str], cwd: Path, ready: Callable[[], bool], *,
                env: dict | None = None, every: float = 0.01, **popen) -> subprocess.Popen:
    """Start `command` (stdout and stderr piped, as text, unless `popen` says otherwise) and
    return it once `ready()` holds, to be signalled or killed at that moment. If it ends first,
    or 120 s pass, it is killed and the test fails with what it printed."""
    full_env = {k: v for k, v in os.environ.items() if k != "TORCHMNIST_DATA_DIR"}
    full_env.update(env or {})
    process = subprocess.Popen(command, cwd=cwd, env=full_env, **{
        "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen})
    deadline = time.monotonic() + 120
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            ended = process.poll() is not None
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"{' '.join(map(str, command))} "
                        f"{'ended before it was ready' if ended else 'was not ready in 120 s'}:"
                        f"\n{out or ''}{err or ''}")
        time.sleep(every)
    return process


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_sentence_error(stderr: str, *fragments: str) -> None:
    """User errors end in one line on stderr, without a traceback, naming what is wrong."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture
def weights_file(tmp_path) -> Path:
    """A bare state_dict of the guide's network, as the guide's own script saves one."""
    torch.manual_seed(0)
    path = tmp_path / "guide.pth"
    torch.save(models.build("guide").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def guide_run(mnist_dir, tmp_path_factory) -> dict:
    """One epoch of the guide recipe on real MNIST (about 95%), shared by the tests that use a
    trained model: predict, export, report."""
    import contextlib
    import io

    import torchmnist

    run_dir = tmp_path_factory.mktemp("guide") / "run"
    config = torchmnist.TrainConfig.for_recipe("guide", epochs=1, data_dir=str(mnist_dir),
                                               run_dir=str(run_dir), save_interval=0)
    with contextlib.redirect_stdout(io.StringIO()):
        return torchmnist.train(config)
