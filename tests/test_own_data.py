"""Your own data: images and labels from Python (torchmnist.OwnData) and image folders
(--dataset folder:PATH), carried through training, checkpoints, test, predict, export and
report with the normalisation and class names they were trained with."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, last_json, run_main
from PIL import Image

import torchmnist
from torchmnist import data
from torchmnist.storage import checkpoint
from torchmnist.trained import load_model

NAMES = ("zero", "one", "two", "three")  # the first four synthetic classes, as folder names


def _bars(n_train: int = 600, n_test: int = 200, seed: int = 3, classes: int = 4):
    """Learnable images (data.synthetic's bars) of the first `classes` classes only."""
    made = data.synthetic(seed=seed, n_train=n_train, n_test=n_test)

    def keep(split):
        wanted = split.labels < classes
        return split.images[wanted], split.labels[wanted]

    return keep(made.train), keep(made.test)


def _train(config: torchmnist.TrainConfig, own: torchmnist.OwnData | None = None):
    with contextlib.redirect_stdout(io.StringIO()):
        return torchmnist.train(config, data=own)


def _folder(root: Path, size: int = 28, seed: int = 5) -> Path:
    """An ImageFolder layout of PNGs: root/train/<class>/*.png and root/test/<class>/*.png."""
    (train_x, train_y), (test_x, test_y) = _bars(800, 240, seed=seed)
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / NAMES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.numpy()).resize((size, size)).save(folder / f"{i:04d}.png")
    return root


# ---------------------------------------------------------------------------------------------
# From Python


def test_own_tensors_train_a_model_with_their_own_classes(tmp_path):
    train, test = _bars()
    own = torchmnist.OwnData(train=train, test=test, classes=["a", "b", "c", "d"], name="bars")
    result = _train(torchmnist.TrainConfig(epochs=2, lr=0.05,
                                           run_dir=str(tmp_path / "run")), own)
    assert result["dataset"] == "own:bars"
    assert result.model.fc2.out_features == 4  # the guide's network, four outputs
    assert result["test_accuracy"] > 0.7  # chance is 25%
    # The checkpoint carries what a model trained on this data needs to be used anywhere.
    spec = checkpoint.load(tmp_path / "run" / "last.pt")[checkpoint.DATASET_SPEC]
    pixels = train[0].double() / 255
    assert spec["classes"] == ["a", "b", "c", "d"]
    assert spec["mean"] == pytest.approx(float(pixels.mean()))
    assert spec["std"] == pytest.approx(float(pixels.std()))
    # Scored again from Python on the same test images: the same number, to the image.
    again = torchmnist.evaluate(tmp_path / "run", test=test)
    assert again["correct"] == round(result["test_accuracy"] * len(test[1]))
    network = torchmnist.load(tmp_path / "run", device="cpu")
    assert network(torch.zeros(2, 1, 28, 28)).shape == (2, 4)
    found = torchmnist.predict(tmp_path / "run", [test[0][i].numpy() for i in range(20)])
    assert all(r["class"] in "abcd" for r in found)
    right = sum(r["class"] == "abcd"[int(y)] for r, y in zip(found, test[1][:20], strict=True))
    assert right >= 14


def test_float_images_and_a_dataset_of_pil_images_are_taken_as_well(tmp_path):
    (train_x, train_y), (test_x, test_y) = _bars(300, 100)

    class Pictures(torch.utils.data.Dataset):  # what a torchvision-style dataset yields
        classes = ["h0", "v1", "h2", "v3"]

        def __len__(self):
            return len(train_y)

        def __getitem__(self, i):
            return Image.fromarray(train_x[i].numpy()), int(train_y[i])

    floats = (test_x.unsqueeze(1).float() / 255, test_y)  # (N, 1, 28, 28) in [0, 1]
    own = torchmnist.OwnData(train=Pictures(), test=floats)
    result = _train(torchmnist.TrainConfig(epochs=1, run_dir=str(tmp_path / "r")), own)
    assert result["dataset"] == "own:own"
    spec = load_model(tmp_path / "r").spec
    assert spec.classes == ("h0", "v1", "h2", "v3")  # the Dataset's own class names
    # Floats in [0, 1] are stored as MNIST stores pixels, so they test as the uint8 images do.
    assert (torchmnist.evaluate(tmp_path / "r", test=floats)["correct"]
            == torchmnist.evaluate(tmp_path / "r", test=(test_x, test_y))["correct"])


@pytest.mark.parametrize(("train", "fragment"), [
    ((torch.randn(8, 28, 28), torch.zeros(8, dtype=torch.long)), "floats in [0, 1]"),
    ((torch.zeros(8, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)),
     "28x28 grey images"),
    ((torch.zeros(8, 28, 28, dtype=torch.uint8), torch.zeros(7, dtype=torch.long)),
     "8 images but labels shaped (7,)"),
    ((torch.zeros(8, 28, 28, dtype=torch.uint8), torch.zeros(8)), "whole numbers"),
    ("images.npy", "must be a torch Dataset of (image, label) pairs or a pair of tensors"),
])
def test_own_data_that_cannot_work_is_refused_in_one_sentence(train, fragment):
    test = (torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(torchmnist.UsageError, match=None) as caught:
        _train(torchmnist.TrainConfig(epochs=1), torchmnist.OwnData(train=train, test=test))
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_labels_beyond_the_named_classes_are_refused():
    (train_x, train_y), test = _bars(100, 40)
    own = torchmnist.OwnData(train=(train_x, train_y), test=test, classes=["a", "b", "c"])
    with pytest.raises(torchmnist.UsageError, match="labels must run from 0 to 2"):
        _train(torchmnist.TrainConfig(epochs=1), own)


@pytest.mark.parametrize(("classes", "fragment"), [
    (["a", "a", "c", "d"], "two classes are named 'a'"),
    (["a", " ", "c", "d"], "a class has an empty name"),
    (["a", "\x1b[2J", "c", "d"], r"the class name '\x1b[2J' holds control characters"),
    (["a", "b" * 256, "c", "d"], "a class name is 256 characters, more than 255"),
    # "café" twice, its accent one character (NFC) and a combining one (NFD, as macOS writes
    # folder names): they print alike.
    (["caf\u00e9", "b", "cafe\u0301", "d"], "two classes are named alike, 'caf\u00e9' and "
                                           "'cafe\u0301': they differ only in how their "
                                           "accents are encoded"),
], ids=["twice", "blank", "terminal-escape", "too-long", "nfc-and-nfd"])
def test_class_names_that_cannot_be_told_apart_or_printed_are_refused(classes, fragment):
    (train_x, train_y), test = _bars(100, 40)
    own = torchmnist.OwnData(train=(train_x, train_y), test=test, classes=classes)
    with pytest.raises(torchmnist.UsageError) as caught:
        _train(torchmnist.TrainConfig(epochs=1), own)
    assert f"the classes of the own data cannot be used: {fragment}" in str(caught.value)


def test_any_name_makes_a_run_folder_inside_runs():
    """The name given to own data becomes part of the run folder's name: one of 300 letters
    ended in OSError "File name too long", and one with slashes must not leave runs/."""
    (train_x, train_y), test = _bars(100, 40)
    for name in ("ü" * 300, "../../escape"):
        own = torchmnist.OwnData(train=(train_x, train_y), test=test, name=name)
        result = _train(torchmnist.TrainConfig(epochs=1), own)
        folder = Path(result["run_dir"])
        assert folder.parent == Path("runs") and folder.is_dir()
        assert len(folder.name.encode()) <= 255


def test_a_test_class_the_training_labels_lack_is_refused():
    """As the test folder of an image folder dataset may not have a class the training folder
    lacks: the model could never predict it, and its images would only lower the score."""
    (train_x, train_y), (test_x, test_y) = _bars(100, 40)
    train_y = train_y % 2
    assert int(test_y.max()) >= 2
    own = torchmnist.OwnData(train=(train_x, train_y), test=(test_x, test_y))
    with pytest.raises(torchmnist.UsageError) as caught:
        _train(torchmnist.TrainConfig(epochs=1), own)
    assert str(caught.value).startswith("the test labels must run from 0 to 1 for 2 classes, "
                                        "not 0 to ")
    assert "OwnData(classes=...)" in str(caught.value)
    # Naming the classes says the training labels need not reach them all.
    named = torchmnist.OwnData(train=(train_x, train_y), test=(test_x, test_y),
                               classes=[str(k) for k in range(int(test_y.max()) + 1)])
    assert _train(torchmnist.TrainConfig(epochs=1), named)["test_accuracy"] >= 0


def test_dark_ink_on_white_paper_is_augmented_over_white(tmp_path, monkeypatch):
    from torchmnist import training

    (train_x, train_y), (test_x, test_y) = _bars(300, 100)
    paper = torchmnist.OwnData(train=(255 - train_x, train_y), test=(255 - test_x, test_y),
                               name="paper")
    filled = set()
    real = training.augment
    monkeypatch.setattr(training, "augment", lambda x, kind, background: filled.add(
        background) or real(x, kind, background))
    _train(torchmnist.TrainConfig(epochs=1, augment="translate",
                                  run_dir=str(tmp_path / "run")), paper)
    spec = load_model(tmp_path / "run").spec
    assert spec.background == 1.0 and data.DATASETS["mnist"].background == 0.0
    assert filled == {(1.0 - spec.mean) / spec.std}  # white, normalised, not MNIST's black
    # A checkpoint from before the background was stored reads as black; a bad one is damage.
    stored = spec.to_dict()
    assert data.DatasetSpec.from_dict({**stored, "background": 0.5}).background == 0.5
    del stored["background"]
    assert data.DatasetSpec.from_dict(stored).background == 0.0
    for bad in (1.5, -0.1, float("nan"), "white", True):
        with pytest.raises(ValueError, match="damaged"):
            data.DatasetSpec.from_dict({**stored, "background": bad})


def test_a_run_on_own_data_resumes_only_on_the_same_data(tmp_path):
    train, test = _bars(300, 100)
    own = torchmnist.OwnData(train=train, test=test, name="bars")
    _train(torchmnist.TrainConfig(epochs=1, run_dir=str(tmp_path / "r")), own)
    changed = train[0].clone()
    changed[0, 0, 0] ^= 1  # one pixel of one image
    other = torchmnist.OwnData(train=(changed, train[1]), test=test, name="bars")
    with pytest.raises(torchmnist.UsageError, match="differ from the ones this run was trained"):
        _train(torchmnist.TrainConfig(epochs=2, resume=str(tmp_path / "r")), other)
    resumed = _train(torchmnist.TrainConfig(epochs=2, resume=str(tmp_path / "r")), own)
    assert resumed["epochs"] == 2


def test_the_command_line_cannot_resume_or_test_data_given_from_python(tmp_path, capsys):
    train, test = _bars(200, 60)
    _train(torchmnist.TrainConfig(epochs=1, run_dir=str(tmp_path / "r")),
           torchmnist.OwnData(train=train, test=test))
    for args in (["test", str(tmp_path / "r")], ["train", "--resume", str(tmp_path / "r"),
                                                  "--epochs", "2"]):
        code, _, err = run_main(args, capsys)
        assert code == 2
        assert_one_sentence_error(err, "was given from Python")
    # Export needs only inputs for its parity check, so it works without the data.
    code, out, err = run_main(["export", str(tmp_path / "r"), "--format", "safetensors",
                               "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["dataset"] == "own:own"


# ---------------------------------------------------------------------------------------------
# Image folders


def test_an_image_folder_trains_tests_predicts_and_exports_alike(tmp_path, capsys,
                                                                  monkeypatch):
    _folder(tmp_path / "shapes", size=32)  # 32x32 files: read grey and resized to 28x28
    code, out, err = run_main(["train", "--dataset", "folder:shapes", "--epochs", "2", "--lr",
                               "0.05", "--save-model", "--json"], capsys)
    assert code == 0, err
    summary = last_json(out)
    run_dir = Path(summary["run_dir"])
    assert run_dir.name.endswith("-shapes-guide")  # named after the folder
    assert summary["dataset"] == f"folder:{tmp_path / 'shapes'}"  # absolute, found from anywhere
    assert summary["test_accuracy"] > 0.7
    spec = load_model(run_dir).spec
    assert spec.classes == tuple(sorted(NAMES))  # as torchvision's ImageFolder orders them
    # `test` reads only the test folder, from anywhere, and agrees with training.
    run_dir = run_dir.resolve()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "shapes" / "train").rename(tmp_path / "train-moved")
    for weights in (run_dir, run_dir / "model.safetensors"):  # its spec in the metadata
        code, out, err = run_main(["test", str(weights), "--json"], capsys)
        assert code == 0, err
        assert last_json(out)["test_accuracy"] == summary["test_accuracy"]
    # predict prepares a file as the folder's images were read: the same probabilities as the
    # loader's image give.
    picture = sorted((tmp_path / "shapes" / "test" / "two").iterdir())[0]
    code, out, err = run_main(["predict", str(run_dir), str(picture), "--json"], capsys)
    assert code == 0, err
    predicted = json.loads(out.strip().splitlines()[-1])
    predicted = predicted[0] if isinstance(predicted, list) else predicted
    from torchmnist.data import preprocess

    image = preprocess.as_stored(preprocess.read_grey(picture))
    x = torch.from_numpy(preprocess.normalise(image, spec.mean, spec.std))[None]
    with torch.no_grad():
        expected = torchmnist.load(run_dir, device="cpu")(x).exp()[0]
    assert predicted["class"] == spec.classes[int(expected.argmax())]
    assert predicted["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    code, out, err = run_main(["export", str(run_dir), "--format", "onnx", "--json"], capsys)
    assert code == 0, err


def test_a_dry_run_on_a_folder_takes_a_small_sample_of_it(tmp_path, capsys):
    _folder(tmp_path / "shapes")
    code, out, err = run_main(["train", "--dataset", "folder:shapes", "--dry-run", "--epochs",
                               "1", "--run-dir", "r", "--json"], capsys)
    assert code == 0, err
    assert "(a sample, dry run)" in err  # --json: the lines for people go to stderr
    # The dry run's test images are its sample; `test` scores the same ones.
    code, again, err = run_main(["test", "r", "--json"], capsys)
    assert code == 0, err
    tested = sum(1 for _ in (tmp_path / "shapes" / "test").rglob("*.png"))
    assert last_json(again)["total"] == min(tested, 512)
    assert last_json(again)["test_accuracy"] == last_json(out)["test_accuracy"]


def test_fine_tuning_from_mnist_shapes_onto_a_folder_with_fewer_classes(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--run-dir", "base"], capsys)[0] == 0
    _folder(tmp_path / "shapes")
    code, out, err = run_main(["train", "--dataset", "folder:shapes", "--epochs", "1",
                               "--init-from", "base", "--freeze", "conv1,conv2", "--run-dir",
                               "tuned"], capsys)
    assert code == 0, err
    assert "except fc2 (another number of classes), which starts afresh" in out
    base, tuned = (checkpoint.load(f"{name}/last.pt")["model"] for name in ("base", "tuned"))
    assert torch.equal(base["conv1.weight"], tuned["conv1.weight"])
    assert tuned["fc2.weight"].shape == (4, 50)


@pytest.mark.parametrize(("layout", "fragment"), [
    ("no test folder", "test is not a folder"),
    ("one class", "must hold a folder per class (at least two)"),
    ("a test class the training lacks", "has a class folder 'nine' that the training images"),
    ("a damaged image", "cannot use"),
    ("no images", "holds no images"),
    ("a class folder named with a newline", r"the class name 'b\nfake' holds control "),
    # Trained before: a model with an output for "c" that it never learned.
    ("an empty training class", "f/train/c holds no images (.png, .jpg, .jpeg, .bmp, .gif, "
                                ".tif, .tiff, .webp, .pgm): a class the model would never learn"),
    ("a training class linked to elsewhere", "f/train/c holds no images"),
])
def test_an_image_folder_that_cannot_work_is_refused_in_one_sentence(layout, fragment,
                                                                     tmp_path, capsys):
    root = tmp_path / "f"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            if layout != "no images":
                Image.fromarray(np.full((28, 28), 40 if name == "a" else 200, np.uint8)).save(
                    root / split / name / "1.png")
    if layout == "no test folder":
        for path in sorted((root / "test").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (root / "test").rmdir()
    elif layout == "one class":
        for path in (root / "train" / "b").iterdir():
            path.unlink()
        (root / "train" / "b").rmdir()
    elif layout == "a test class the training lacks":
        (root / "test" / "nine").mkdir()
    elif layout == "a class folder named with a newline":  # would print as a second line
        (root / "train" / "b").rename(root / "train" / "b\nfake")
    elif layout == "an empty training class":
        (root / "train" / "c").mkdir()
    elif layout == "a training class linked to elsewhere":  # a folder with no images in it
        (root / "train" / "c").symlink_to(tmp_path)
    elif layout == "a damaged image":
        (root / "train" / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run_main(["train", "--dataset", f"folder:{root}", "--epochs", "1",
                             "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, fragment)
    assert not Path("r").exists()  # nothing was written


def test_dataset_names_are_checked_before_anything_runs():
    with pytest.raises(torchmnist.UsageError, match="folder:PATH for your own images"):
        torchmnist.TrainConfig(dataset="cifar10")
    with pytest.raises(torchmnist.UsageError, match="must be a name or folder:PATH"):
        torchmnist.TrainConfig(dataset=[1, 2])


# ---------------------------------------------------------------------------------------------
# The cache of decoded image folders


def _small_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for label, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((28, 28), 30 * (i + 1) + 100 * label, np.uint8)).save(
                    root / split / name / f"{i}.png")
    _settle(root)
    return root


def _settle(root: Path) -> None:
    """Date every file an hour back: a folder written moments ago is not cached yet."""
    an_hour_ago = time.time() - 3600
    for path in root.rglob("*.png"):
        os.utime(path, (an_hour_ago, an_hour_ago))


def _reads(monkeypatch) -> list[Path]:
    """The image files decoded from now on."""
    from torchmnist.data import preprocess

    decoded, read_grey = [], preprocess.read_grey
    monkeypatch.setattr(preprocess, "read_grey",
                        lambda path: decoded.append(Path(path)) or read_grey(path))
    return decoded


def _same(a: data.DigitData, b: data.DigitData) -> bool:
    return (a.spec == b.spec and torch.equal(a.train.images, b.train.images)
            and torch.equal(a.train.labels, b.train.labels)
            and torch.equal(a.test.images, b.test.images))


def test_a_folder_is_decoded_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    root = _small_folder(tmp_path / "f")
    decoded = _reads(monkeypatch)
    first = data.load_folder(root)
    assert len(decoded) == 12
    again = data.load_folder(root)
    assert len(decoded) == 12  # nothing decoded the second time
    assert _same(first, again)
    assert len(list((tmp_path / "cache" / "folders").glob("*.pt"))) == 2  # one per split


@pytest.mark.parametrize("change", ["rewrite", "add", "remove", "rename"])
def test_a_changed_folder_is_decoded_again(change, tmp_path, monkeypatch):
    root = _small_folder(tmp_path / "f")
    data.load_folder(root)
    image = root / "train" / "a" / "0.png"
    if change == "rewrite":  # same size and name, other pixels
        Image.fromarray(np.full((28, 28), 77, np.uint8)).save(image)
    elif change == "add":
        Image.fromarray(np.full((28, 28), 77, np.uint8)).save(image.with_name("3.png"))
    elif change == "remove":
        image.unlink()
    else:
        image.rename(image.with_name("9.png"))
    decoded = _reads(monkeypatch)
    changed = data.load_folder(root)
    assert decoded and all(path.parts[-3] == "train" for path in decoded)  # test/ was kept
    monkeypatch.setenv("TORCHMNIST_CACHE_DIR", "off")
    assert _same(changed, data.load_folder(root))  # what decoding every file gives


def test_a_damaged_or_unwritable_cache_is_passed_over(tmp_path, monkeypatch):
    root = _small_folder(tmp_path / "f")
    expected = data.load_folder(root)
    for entry in (tmp_path / "cache" / "folders").glob("*.pt"):
        entry.write_bytes(b"PK\x03\x04 not a zip")
    decoded = _reads(monkeypatch)
    assert _same(data.load_folder(root), expected) and len(decoded) == 12
    # An entry rewritten with deflated tensors (as a zip bomb is) is never unpacked.
    for entry in (tmp_path / "cache" / "folders").glob("*.pt"):
        with zipfile.ZipFile(entry) as old:
            files = {name: old.read(name) for name in old.namelist()}
        with zipfile.ZipFile(entry, "w", zipfile.ZIP_DEFLATED) as new:
            for name, content in files.items():
                new.writestr(name, content)
    decoded.clear()
    assert _same(data.load_folder(root), expected) and len(decoded) == 12
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("TORCHMNIST_CACHE_DIR", str(tmp_path / "blocked"))
    assert _same(data.load_folder(root), expected)


def test_a_full_disk_while_keeping_a_folder_leaves_no_file_behind(tmp_path, monkeypatch):
    root = _small_folder(tmp_path / "f")
    expected = data.load_folder(root)
    shutil.rmtree(tmp_path / "cache")

    def full(*args, **kwargs):  # what torch.save into a file object raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", full)
    assert _same(data.load_folder(root), expected)
    assert list((tmp_path / "cache" / "folders").iterdir()) == []


def test_a_folder_written_moments_ago_is_not_cached_yet(tmp_path, monkeypatch):
    root = _small_folder(tmp_path / "f")
    (root / "train" / "a" / "0.png").touch()
    decoded = _reads(monkeypatch)
    data.load_folder(root)
    data.load_folder(root)
    assert len([p for p in decoded if p.parts[-3] == "train"]) == 12  # decoded both times
    assert len([p for p in decoded if p.parts[-3] == "test"]) == 6  # kept after the first


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHMNIST_CACHE_DIR", "off")
    root = _small_folder(tmp_path / "f")
    decoded = _reads(monkeypatch)
    data.load_folder(root)
    data.load_folder(root)
    assert len(decoded) == 24
    assert not (tmp_path / "cache").exists()
