"""Finding and checking dataset files, and the two loaders' shared contract."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    MNIST_FILES,
    assert_one_sentence_error,
    make_dataset_files,
    run_main,
    run_subprocess,
    write_idx,
)

from torchmnist import data
from torchmnist.config import TrainConfig
from torchmnist.data import datasets, loaders
from torchmnist.errors import UsageError
from torchmnist.training import train


def test_reads_plain_and_gzipped_files(tmp_path):
    make_dataset_files(tmp_path / "plain" / "MNIST" / "raw", seed=3)
    make_dataset_files(tmp_path / "gz" / "MNIST" / "raw", seed=3, compress=True)
    plain = data.load("mnist", tmp_path / "plain", download=False)
    gz = data.load("mnist", tmp_path / "gz", download=False)
    assert plain.train.images.shape == (256, 28, 28) and plain.train.images.dtype == torch.uint8
    assert plain.test.labels.shape == (128,) and plain.test.labels.dtype == torch.int64
    assert torch.equal(plain.train.images, gz.train.images)
    assert torch.equal(plain.test.labels, gz.test.labels)


def test_system_dataset_folder_is_searched(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets"
    make_dataset_files(system / "fashion-mnist", compress=True)  # as Debian's package has it
    monkeypatch.setattr(datasets, "SYSTEM_DATASETS_DIR", system)
    digits = data.load("fashion-mnist", tmp_path / "empty-root", download=False)
    assert len(digits.train) == 256
    assert digits.source == str(system / "fashion-mnist")
    assert digits.spec.classes[0] == "T-shirt/top"


def test_download_path_uses_torchvision_and_reports_failure(tmp_path, monkeypatch, capsys):
    calls = []

    def no_network(self, *args, **kwargs):
        calls.append(self.raw_folder)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n"
                           "<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    root = tmp_path / "data"
    code, _, err = run_main(["train", "--data-dir", str(root), "--epochs", "1"], capsys)
    assert calls == [str(root / "MNIST" / "raw")]
    assert code == 2
    assert_one_sentence_error(err, *MNIST_FILES, str(root / "MNIST" / "raw"),
                              str(data.SYSTEM_DATASETS_DIR / "mnist"),
                              "Name or service not known", "--data-dir")
    assert not list(tmp_path.glob("runs/*/last.pt"))


def test_missing_data_without_network_exits_2_in_a_fresh_process(tmp_path):
    # A real process with an empty home: the download is attempted where it can be, and with no
    # network (or --no-download, on machines that have one) the user gets one sentence.
    home = tmp_path / "home"
    home.mkdir()
    result = run_subprocess(["train", "--no-download"], cwd=tmp_path, env={"HOME": str(home)},
                            timeout=120)
    assert result.returncode == 2
    default_root = home / ".torch" / "datasets" / "MNIST" / "raw"
    assert_one_sentence_error(result.stderr, "MNIST files missing", *MNIST_FILES,
                              str(default_root), "/usr/share/datasets/mnist")


@pytest.mark.parametrize("kind", ["pipe", "device", "folder"])
def test_a_dataset_file_that_is_not_a_file_is_named_not_missing(kind, tmp_path, capsys,
                                                               monkeypatch):
    """Such a name was reported as missing, and the download then tried: torchvision would
    have written the file it fetched into the pipe, waiting for a reader forever."""
    raw = make_dataset_files(tmp_path / "d" / "MNIST" / "raw")
    images = raw / "train-images-idx3-ubyte"
    images.unlink()
    {"pipe": os.mkfifo, "device": lambda p: p.symlink_to("/dev/zero"),
     "folder": lambda p: p.mkdir()}[kind](images)
    monkeypatch.setattr(datasets, "_download", lambda *a: pytest.fail("a download was tried"))
    code, _, err = run_main(["train", "--data-dir", str(tmp_path / "d"), "--run-dir", "r"],
                            capsys)
    assert code == 2
    assert_one_sentence_error(err, f"{images} is not a regular file (a folder, a pipe or a "
                              "device) where MNIST's train-images-idx3-ubyte belongs")


def test_missing_download_is_turned_into_a_usage_error_when_urlopen_fails(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", unreachable)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", unreachable)
    with pytest.raises(UsageError, match="no route to host"):
        data.load("kmnist", tmp_path, download=True)


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "is truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:10]), "is truncated"),
    (lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]), "is not an IDX image"),
    (lambda p: p.write_bytes(p.read_bytes() + b"extra"), "longer than its header says"),
])
def test_damaged_image_file_exits_2_naming_it(tmp_path, damage, fragment, capsys):
    raw = make_dataset_files(tmp_path / "d" / "MNIST" / "raw")
    damage(raw / "train-images-idx3-ubyte")
    code, _, err = run_main(["train", "--data-dir", str(tmp_path / "d"), "--no-download"],
                            capsys)
    assert code == 2
    assert_one_sentence_error(err, str(raw / "train-images-idx3-ubyte"), fragment)


def test_bad_labels_and_mismatched_counts_are_refused(tmp_path):
    raw = make_dataset_files(tmp_path / "MNIST" / "raw")
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(128, 12))
    with pytest.raises(UsageError, match="label 12, outside 0-9"):
        data.load("mnist", tmp_path, download=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(100))
    with pytest.raises(UsageError, match="128 images but 100 labels"):
        data.load("mnist", tmp_path, download=False)


def test_corrupt_gzip_is_refused(tmp_path):
    raw = make_dataset_files(tmp_path / "MNIST" / "raw", compress=True)
    gz = raw / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:50])
    with pytest.raises(UsageError, match="t10k-images-idx3-ubyte.gz"):
        data.load("mnist", tmp_path, download=False)


@pytest.mark.mnist
def test_real_mnist_matches_its_published_facts(mnist_dir):
    digits = data.load("mnist", mnist_dir, download=False)
    assert digits.train.images.shape == (60000, 28, 28)
    assert digits.test.images.shape == (10000, 28, 28)
    counts = torch.bincount(digits.train.labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    pixels = digits.train.images.double() / 255
    assert round(pixels.mean().item(), 4) == digits.spec.mean == 0.1307
    assert round(pixels.std().item(), 4) == digits.spec.std == 0.3081


def _collect(batches, epoch=1, start=0):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in batches.batches(epoch, start)], strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_both_loaders_yield_identical_batches(num_workers):
    digits = data.synthetic(n_train=300, n_test=100)
    cpu = torch.device("cpu")
    tensor = data.make_batches("tensor", digits.train, digits.spec, 64, cpu, shuffle=True, seed=5)
    loader = data.make_batches("dataloader", digits.train, digits.spec, 64, cpu, shuffle=True,
                               seed=5, num_workers=num_workers)
    assert len(tensor) == len(loader) == 5  # 300 / 64, the last batch partial, not dropped
    for epoch in (1, 2):
        tx, ty = _collect(tensor, epoch)
        lx, ly = _collect(loader, epoch)
        assert tx.shape == (300, 1, 28, 28) and tx.dtype == torch.float32
        assert torch.equal(tx, lx) and torch.equal(ty, ly)  # bit for bit


def test_closing_a_loader_stops_its_workers_and_the_next_epoch_starts_new_ones():
    digits = data.synthetic(n_train=300, n_test=100)
    loader = data.LoaderBatches(digits.train, digits.spec, 64, torch.device("cpu"),
                                shuffle=True, seed=5, num_workers=2)
    before = set(multiprocessing.active_children())
    first = _collect(loader, 1)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2  # persistent: still running after the epoch
    loader.close()
    loader.close()  # twice is harmless
    assert not any(worker.is_alive() for worker in workers)
    assert all(torch.equal(a, b) for a, b in zip(first, _collect(loader, 1), strict=True))
    loader.close()


def test_closing_a_loader_mid_epoch_stops_its_workers_while_its_batches_are_still_held():
    # A run stopped by a signal or an error leaves its epoch's batches unfinished, held by the
    # traceback's frames; closing the loader must still stop the workers then.
    digits = data.synthetic(n_train=300, n_test=100)
    loader = data.LoaderBatches(digits.train, digits.spec, 64, torch.device("cpu"),
                                shuffle=True, seed=5, num_workers=2)
    before = set(multiprocessing.active_children())
    batches = loader.batches(1)
    next(batches)  # one batch taken, the rest of the epoch still in flight
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    loader.close()
    assert not any(worker.is_alive() for worker in workers)
    assert next(batches, None) is None  # the epoch's batches ended with the loader
    del batches


@pytest.mark.slow
def test_a_loader_still_open_when_python_exits_does_not_hang_it(tmp_path):
    # Workers ignore SIGTERM (so that a signal to the whole process group cannot kill them
    # under a run that is saving), and Python's exit sends SIGTERM to live workers and then
    # waits for them: without the loaders' exit hook this waited forever.
    script = tmp_path / "leak.py"
    script.write_text(
        "import torch\n"
        "from torchmnist import data\n"
        "digits = data.synthetic(n_train=256, n_test=64)\n"
        "KEPT = data.LoaderBatches(digits.train, digits.spec, 64, torch.device('cpu'),\n"
        "                          shuffle=True, num_workers=2)\n"
        "next(iter(KEPT.batches()))\n"
        "print('exiting', flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr


# Training from a script, its DataLoader workers started as `sys.argv[1]` says. spawn and
# forkserver (macOS and Windows use spawn; Linux uses forkserver from Python 3.14 on) start
# each worker by importing the script again; fork copies the running process.
_START_METHOD_SCRIPT = """
import multiprocessing, sys
import torchmnist

def main():
    multiprocessing.set_start_method(sys.argv[1], force=True)
    torchmnist.train(torchmnist.TrainConfig(dry_run=True, loader="dataloader", num_workers=2,
                                            epochs=0.25, device="cpu", quiet=True,
                                            run_dir=sys.argv[2]))

"""


def _train_started_by(method: str, script: Path, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), method, str(run)], cwd=script.parent,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_workers_started_by_spawn_or_forkserver_train_as_forked_ones(tmp_path):
    script = tmp_path / "guarded.py"
    script.write_text(_START_METHOD_SCRIPT + 'if __name__ == "__main__":\n    main()\n')
    weights = {}
    for method in ("fork", "forkserver", "spawn"):
        done = _train_started_by(method, script, tmp_path / method)
        assert done.returncode == 0, done.stderr
        weights[method] = torch.load(tmp_path / method / "last.pt", weights_only=True)["model"]
    for method in ("forkserver", "spawn"):
        for name, value in weights["fork"].items():
            assert torch.equal(weights[method][name], value), (method, name)


# Under spawn the parent used to wait forever: it writes each worker its dataset through a
# pipe, and a NumPy copy filled the pipe of a worker that had died.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_script_that_trains_unguarded_is_told_why_its_workers_fail(method, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(_START_METHOD_SCRIPT + "main()\n")
    done = _train_started_by(method, script, tmp_path / "run")
    assert done.returncode != 0
    assert ("torchmnist was asked to train inside a new process as it started (spawn and "
            "forkserver run the script's top level again in every process, DataLoader workers "
            'included): put the training call under `if __name__ == "__main__":`') in done.stderr


@pytest.mark.parametrize("room", [True, False], ids=["room", "full"])
def test_spawned_workers_get_shared_tensors_or_numpy_copies_where_shared_memory_is_full(
        room, monkeypatch):
    """What a spawn or forkserver worker is sent (pickled as multiprocessing pickles it): the
    tensors, through shared memory, where it has room; NumPy copies where it has not (Docker's
    64 MiB /dev/shm). Either way the worker's samples are the parent's."""
    from multiprocessing.reduction import ForkingPickler

    monkeypatch.setattr(loaders, "_shared_memory_holds", lambda size: room)
    digits = data.synthetic(n_train=100, n_test=10)
    dataset = loaders._PILDigits(digits.train, digits.spec)
    sent = ForkingPickler.loads(ForkingPickler.dumps(dataset))
    assert (sent.split is not None) == room
    assert (sent._arrays is None) == room
    assert len(sent) == len(dataset) == 100
    for index in (0, 57, 99):
        (x, y), (sx, sy) = dataset[index], sent[index]
        assert torch.equal(x, sx) and y == sy


def test_a_loader_out_of_shared_memory_is_told_in_one_sentence(monkeypatch, capsys):
    def full(self):
        raise RuntimeError("DataLoader worker (pid 4321) is killed by signal: Bus error. It is "
                           "possible that dataloader's workers are out of shared memory. Please "
                           "try to raise your shared memory limit.")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", full)
    code, _, err = run_main(["train", "--dry-run", "--loader", "dataloader", "--num-workers", "2",
                             "--device", "cpu", "--run-dir", "r"], capsys)
    assert code == 1
    assert_one_sentence_error(err, "the DataLoader's worker processes ran out of shared memory (",
                              "give the container more (docker run --shm-size=1g), or use "
                              "--num-workers 0 or the tensor loader")


def test_a_run_that_ends_in_an_error_has_stopped_its_loader_workers(tmp_path):
    config = TrainConfig(dry_run=True, loader="dataloader", num_workers=2, device="cpu",
                         quiet=True, run_dir=str(tmp_path / "r"))
    before = set(multiprocessing.active_children())

    def fail(*_):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here") as caught:
        train(config, on_test=fail)
    # The traceback still holds the run (train's frame), and so its loaders: closing them
    # cannot have been left to the garbage collector.
    assert caught.value.__traceback__ is not None
    assert set(multiprocessing.active_children()) - before == set()


class _ThreeClasses(torch.nn.Module):
    """Your own network, but for three classes where the data has ten."""

    def forward(self, x):
        return torch.log_softmax(x.flatten(1)[:, :3], dim=1)


def test_a_model_refused_before_training_has_started_no_loader_workers(tmp_path):
    config = TrainConfig(dry_run=True, loader="dataloader",
                         num_workers=2, device="cpu", quiet=True, run_dir=str(tmp_path / "r"))
    before = set(multiprocessing.active_children())
    with pytest.raises(UsageError, match=r"must return \(2, 10\) log-probabilities") as caught:
        train(config, model=_ThreeClasses())
    # Its traceback, still held here, holds setup's loaders: none has started its workers.
    assert caught.value.__traceback__ is not None
    assert set(multiprocessing.active_children()) - before == set()
    assert not (tmp_path / "r").exists()


def test_training_order_is_shuffled_per_epoch_and_rebuildable():
    digits = data.synthetic(n_train=256, n_test=64)
    batches = data.TensorBatches(digits.train, digits.spec, 32, torch.device("cpu"),
                                 shuffle=True, seed=1)
    _, epoch1 = _collect(batches, 1)
    _, epoch2 = _collect(batches, 2)
    _, again = _collect(batches, 1)
    assert not torch.equal(epoch1, digits.train.labels)  # shuffled
    assert not torch.equal(epoch1, epoch2)  # a new order each epoch
    assert torch.equal(epoch1, again)  # the same order for the same (seed, epoch)
    _, tail = _collect(batches, 1, start=3)  # a resumed epoch continues where it stopped
    assert torch.equal(tail, epoch1[3 * 32:])


def test_test_set_is_never_shuffled():
    digits = data.synthetic(n_train=64, n_test=100)
    for kind in ("tensor", "dataloader"):
        batches = data.make_batches(kind, digits.test, digits.spec, 32, torch.device("cpu"),
                                    shuffle=False)
        _, labels = _collect(batches, epoch=3)
        assert torch.equal(labels, digits.test.labels), kind


def test_normalisation_matches_torchvision_transforms():
    from PIL import Image
    from torchvision import transforms

    digits = data.synthetic(n_train=8, n_test=8)
    spec = data.DATASETS["fashion-mnist"]
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((spec.mean,), (spec.std,))])
    expected = torch.stack([reference(Image.fromarray(img.numpy()))
                            for img in digits.train.images])
    assert torch.equal(data.normalize(digits.train.images, spec.mean, spec.std), expected)
