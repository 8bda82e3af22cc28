"""`torchmnist predict`: classify image files (photos, scans, drawings) with a trained model.

Each file is read with Pillow, turned into a 28x28 image the way the model's dataset was made
(`preprocess`), normalised with the dataset's mean and std, and classified. A file that fails
gets an error of its own; the others are still predicted.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch

from torchmnist import config as cfg
from torchmnist import engines
from torchmnist.data.preprocess import (
    ImageError,
    normalise,
    prepare,
    prepare_bytes,
    prepare_picture,
)
from torchmnist.errors import UsageError, printable
from torchmnist.evaluation import probabilities
from torchmnist.storage import rundir

_GLOB_CHARACTERS = set("*?[")
# What a directory scan takes, by extension, as torchvision's ImageFolder does; a file named
# explicitly is tried whatever its name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".heic", ".heif", ".avif")
STDIN = "-"  # as an input, as in most tools: the image piped in (unless a file has that name)
# An image file piped in is held in memory whole; the largest photo torchmnist reads (120
# million pixels) takes well under this as a PNG or JPEG.
MAX_STDIN_BYTES = 256 * 1024 * 1024


def expand(inputs: list[str]) -> list[tuple[str, str | None]]:
    """Files to predict, in order, from paths, directories (their image files, sorted) and
    glob patterns; each with the reason it cannot be used, if it cannot. Every input gets at
    least one entry, whatever is wrong with it."""
    files: list[tuple[str, str | None]] = []
    for item in inputs:
        try:
            files += _expand_one(item)
        except OSError as error:  # a name too long, a folder that cannot be listed, ...
            files.append((item, f"cannot read it: {error.strerror or error}"))
    return files


def _expand_one(item: str) -> list[tuple[str, str | None]]:
    if not item.strip():  # Path("") would be the current folder, every image in it
        return [(item, "an empty name: give a file, a folder or a pattern")]
    path = Path(item)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file() and not p.name.startswith("."))
        return [(str(p), None) for p in found] or [(item, "the directory has no image files")]
    if path.exists():
        return [(item, None)]
    if _GLOB_CHARACTERS & set(item):
        matches = sorted(m for m in _glob(item) if Path(m).is_file())
        return [(m, None) for m in matches] or [(item, "no files match this pattern")]
    return [(item, "no such file or directory")]


def _glob(pattern: str) -> list[str]:
    """The names a pattern matches; `**` matches folders at any depth, as bash's globstar.
    pathlib, not glob.glob(recursive=True), which follows links to folders: two links back up
    the tree make the walk exponential. Hidden names are passed over unless the pattern names
    one (`'.cache/**/*.png'`), as the shell does."""
    parts = Path(pattern).parts
    if "**" not in parts:  # (within a name, as in "a**b", it is one "*")
        return glob.glob(pattern)
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARACTERS & set(part))
    base, rest = Path(*parts[:first]), Path(*parts[first:])
    if rest.parts[-1] == "**":  # pathlib gives folders only for a last "**"; bash, the files too
        rest = rest / "*"
    hidden_too = any(part.startswith(".") and part not in (".", "..") for part in rest.parts)
    return [str(path) for path in base.glob(str(rest))
            if hidden_too or not any(name.startswith(".")
                                     for name in path.relative_to(base).parts)]


def _sources(inputs: list) -> list[tuple[str, object, str | None]]:
    """(name, path or picture, problem) for each image the inputs give."""
    sources: list[tuple[str, object, str | None]] = []
    for index, item in enumerate(inputs):
        if isinstance(item, str) and item == STDIN and not os.path.lexists(STDIN):
            read = any(name == "<stdin>" for name, _, _ in sources)
            sources.append(("<stdin>", None, "standard input is read once; give - once") if read
                           else ("<stdin>", *_read_stdin()))
        elif isinstance(item, bytes | bytearray):  # an image file's contents
            sources.append((f"<input {index}>", bytes(item), None))
        elif isinstance(item, str | os.PathLike):
            sources += [(file, file, problem) for file, problem in expand([os.fspath(item)])]
        elif isinstance(item, np.ndarray | torch.Tensor | list | tuple) or _is_pil(item):
            if isinstance(item, torch.Tensor):
                item = item.detach().cpu().numpy()
            sources.append((f"<input {index}>", item, None))
        else:  # a number or None, which numpy would make an array of no shape
            what = "None" if item is None else type(item).__name__
            sources.append((f"<input {index}>", item, f"{what} is not a picture: give a path, "
                            "a PIL image, an array or a tensor"))
    return sources


def _read_stdin() -> tuple[bytes | None, str | None]:
    """The image file piped in, or why there is none."""
    if sys.stdin is None or not hasattr(sys.stdin, "buffer"):
        return None, "there is no standard input to read"
    if sys.stdin.isatty():  # a read would wait for the user to type an image
        return None, ("standard input is a terminal, not an image: pipe one in, as in "
                      "torchmnist predict RUN - < digit.png")
    data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        return None, (f"standard input holds more than {MAX_STDIN_BYTES:,} bytes, more than "
                      "any image torchmnist reads")
    return data, None


def _is_pil(item: object) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)


def predict(checkpoint_path: str | os.PathLike, inputs: list, *, top: int = 3,
            model: str | None = None, dataset: str | None = None, device: str = "auto",
            save_preprocessed: str | os.PathLike | None = None,
            batch_size: int = 256, tta: bool = False, engine: str = "torch") -> list[dict]:
    """One result per image, in order: {"file", "prediction", "class", "probability", "top"},
    or {"file", "error"} for one that could not be read. `inputs` are paths, folders and glob
    patterns (as on the command line; "-" is the image on standard input), or pictures in
    memory: PIL images, NumPy arrays or tensors (`preprocess.prepare_picture`), or an image
    file's bytes, whose "file" is "<input N>". `tta` averages the probabilities over each
    image and its four 1-pixel shifts; `engine`: torch or onnxruntime (engines.py)."""
    top, batch_size = cfg.count("--top", top), cfg.count("--batch-size", batch_size)
    if isinstance(inputs, str | os.PathLike | bytes | bytearray | np.ndarray | torch.Tensor) \
            or _is_pil(inputs):
        inputs = [inputs]  # one image, not a sequence of them (nor of a path's letters)
    try:
        inputs = list(inputs)
    except TypeError:
        what = "None" if inputs is None else type(inputs).__name__
        raise UsageError(f"predict takes an image or a list of them (paths, folders, globs, PIL "
                         f"images, arrays or tensors), not {what}") from None
    target = engines.device_for(engine, device)
    trained = engines.load(checkpoint_path, engine, model=model, dataset=dataset)
    spec = trained.spec
    network = trained.model.to(target)

    results: list[dict] = []
    images: list[np.ndarray] = []
    sources = _sources(inputs)
    for name, source, problem in sources:
        if problem is None:
            try:
                images.append(prepare(source, spec.name) if isinstance(source, str)
                              else prepare_bytes(source, spec.name) if isinstance(source, bytes)
                              else prepare_picture(source, spec.name))
            except ImageError as error:
                problem = str(error)
        results.append({"file": printable(name), "error": problem} if problem
                       else {"file": printable(name)})
    if save_preprocessed is not None:
        given = [source for _, source, _ in sources if isinstance(source, str)]
        _save_images([r["file"] for r in results if "error" not in r], images, save_preprocessed,
                     given)

    by_image = iter(())  # class probabilities of each readable image, in order
    if images:
        x = torch.from_numpy(np.stack([normalise(im, spec.mean, spec.std) for im in images]))
        by_image = iter(probabilities(network, x, target, batch_size, tta=tta,
                                      background=spec.normalized_background))
    for result in results:
        if "error" not in result:
            result.update(answer(next(by_image), spec.classes, top))
    return results


def answer(probabilities: torch.Tensor, classes: list[str], top: int) -> dict:
    """One image's answer from its class probabilities: the most likely class
    ("prediction", "class", "probability") and the `top` most likely ("top")."""
    best = torch.topk(probabilities, min(top, len(classes)))
    ranked = [{"prediction": int(i), "class": classes[int(i)], "probability": float(v)}
              for v, i in zip(best.values, best.indices, strict=True)]
    return {**ranked[0], "top": ranked}


def _save_images(files: list[str], images: list[np.ndarray], folder: str | os.PathLike,
                 given: list[str]) -> None:
    """Write the 28x28 images the model saw as PNGs named after their files, into a new, empty
    or earlier such folder (`.torchmnist-preprocessed`); an input image is never overwritten."""
    from PIL import Image

    folder = Path(folder)
    targets: list[Path] = []
    used: set[str] = set()
    for file in files:
        # An image with no file ("<stdin>", "<input 0>") gets a name a shell takes as it is.
        stem = (file[1:-1].replace(" ", "-") if file.startswith("<") and file.endswith(">")
                else Path(file).stem)
        name, n = stem, 1
        while name in used:  # two inputs with the same name, from different folders
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        targets.append(folder / f"{name}.png")
    inputs = {_identity(path) for path in given} - {None}
    for target in targets:
        if _identity(target) in inputs:
            raise UsageError(f"--save-preprocessed {folder} would write over the input image "
                             f"{printable(str(target))}; choose another folder")
    rundir.refuse_foreign(folder, lambda f: (f / rundir.PREPROCESSED_MARKER).is_file(),
                          f"a folder of images torchmnist saved (it has no "
                          f"{rundir.PREPROCESSED_MARKER})", "--save-preprocessed",
                          writes={target.name for target in targets}.__contains__)
    rundir.make_folder(folder, "--save-preprocessed")
    (folder / rundir.PREPROCESSED_MARKER).touch()
    for target, image in zip(targets, images, strict=True):
        picture = Image.fromarray(np.round(image * 255).astype(np.uint8))
        rundir.write_atomically(target, lambda f, picture=picture: picture.save(f, format="PNG"))


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """The file a path names (device and inode), so that two names of one file compare equal."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino
