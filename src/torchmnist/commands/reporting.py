"""`torchmnist report RUN|CHECKPOINT`: how a run went, as pictures and one Markdown page.

curves.png (losses, accuracy and learning rate over the run, from metrics.jsonl), confusion.png
(the confusion matrix on the test set) and mistakes.png (misclassified test images, the most
confident mistakes first), tied together by report.md with the run's config and final numbers.
Drawn with matplotlib's object interface (no pyplot, no display, no global state).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from torchmnist import config as cfg
from torchmnist.config import RESULT_KEYS, TrainConfig, checked, is_number
from torchmnist.data import loaders
from torchmnist.errors import UsageError, printable
from torchmnist.evaluation import probabilities as class_probabilities
from torchmnist.evaluation import test_data
from torchmnist.runtime import devices
from torchmnist.storage import rundir
from torchmnist.trained import load_model

REPORT_TITLE = "# Run report: "  # report.md's first line, which marks a report's folder
FIGURES = ("curves", "confusion", "mistakes")  # each written as NAME.png beside report.md
# With more classes than these, the matrix's cells are too small for their numbers, the axes
# too crowded for every name, the per-class row too wide: each gives way to what still reads.
MAX_COUNTED_CELLS, MAX_NAMED_CLASSES, MAX_CLASS_COLUMNS = 30, 50, 20
# About 160 bytes a record: over a million records, far beyond any run's.
MAX_METRICS_BYTES = 256 * 1024 * 1024


def report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
           data_dir: str | os.PathLike | None = None, download: bool = True,
           device: str = "auto", mistakes: int = 48, test: object = None) -> dict:
    """Write the figures and report.md into `out` (default RUN/report); return the paths
    and the numbers the report states. `run_dir` may also name a checkpoint in a run folder
    (best.pt), which is then the model scored. `test`: the test images of a run on data
    given from Python, as torchmnist.evaluate takes them."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise UsageError("torchmnist report needs matplotlib; install it with: pip install "
                         "'torchmnist[report]'") from None
    mistakes = cfg.count("--mistakes", mistakes, least=0)
    if not os.fspath(run_dir).strip():  # Path("") is the current folder
        raise UsageError("the run folder path is empty: name a run folder, or a checkpoint in "
                         "one")
    chosen = Path(run_dir)
    # A checkpoint file: its run's curves, and the test set scored with that checkpoint.
    run_dir = chosen.parent if chosen.is_file() else chosen
    config, records = _read_run(run_dir)
    out = Path(out) if out else run_dir / "report"
    written = {"report.md", *(f"{name}.png" for name in FIGURES)}
    rundir.refuse_foreign(out, _is_report, "a torchmnist report's folder or a run folder",
                          "--out", writes=written.__contains__)
    trained = load_model(chosen if chosen.is_file() else run_dir / "last.pt")
    spec = trained.spec
    digits = test_data(trained, data_dir, download=download, test=test)
    target = devices.resolve_device(device)
    x = loaders.normalize(digits.test.images, spec.mean, spec.std)
    probabilities = class_probabilities(trained.model.to(target), x, target).numpy()
    labels = digits.test.labels.numpy()
    predictions = probabilities.argmax(1)
    confusion = np.zeros((len(spec.classes),) * 2, dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)

    made = not out.exists()
    rundir.make_folder(out, "--out")
    figures = {name: out / f"{name}.png" for name in FIGURES}
    try:
        _save(_curves(records, config), figures["curves"])
        _save(_confusion(confusion, spec.classes), figures["confusion"])
        wrong = np.nonzero(predictions != labels)[0]
        wrong = wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind="stable")]
        _save(_mistakes(digits.test.images.numpy(), labels, predictions, probabilities,
                        wrong[:mistakes], spec.classes), figures["mistakes"])
    except BaseException:
        if made:  # leave no half-made report folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise

    numbers = {"test_accuracy": float((predictions == labels).mean()),
               "correct": int((predictions == labels).sum()), "total": len(labels),
               "misclassified": len(wrong), "model": trained.name, "dataset": spec.name}
    markdown = out / "report.md"
    text = _markdown(run_dir, config, records, numbers, confusion, spec.classes, figures,
                     min(mistakes, len(wrong)))
    rundir.write_text_atomically(markdown, text)
    return {"report": str(markdown), **{k: str(v) for k, v in figures.items()}, **numbers}


def _is_report(folder: Path) -> bool:
    """A folder a report was written into (its report.md begins with the title), or a run's,
    whose own files have other names than a report's."""
    try:
        with open(folder / "report.md", encoding="utf-8") as f:
            if f.readline().startswith(REPORT_TITLE):
                return True
    except (OSError, UnicodeDecodeError):
        pass
    return rundir.is_run(folder)


def _read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    if not run_dir.is_dir():
        raise UsageError(f"no run directory at {run_dir}")
    needed = ("config.json", "metrics.jsonl", "last.pt")
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise UsageError(f"{run_dir} is not a torchmnist run directory: {', '.join(missing)} "
                         "missing")
    path = run_dir / "config.json"
    _refuse_larger(path, cfg.MAX_SETTINGS_BYTES, "a run's settings")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        # (RecursionError: nesting deeper than Python's stack, which no torchmnist file has)
        raise UsageError(f"{path} is damaged: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is damaged: it holds a {type(config).__name__}, not an "
                         "object of settings")
    try:
        config = checked(config)
    except UsageError as error:
        raise UsageError(f"{path} is damaged: {error}") from None
    return config, _read_metrics(run_dir / "metrics.jsonl")


def _refuse_larger(path: Path, most: int, what: str) -> None:
    """One sentence, before reading it, for a file bigger than `what` can honestly be."""
    size = path.stat().st_size
    if size > most:
        raise UsageError(f"{path} is {size:,} bytes, more than {what} holds ({most:,} at "
                         "most): it is not a torchmnist file")


def _read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, each checked; a bad line is named by its number."""
    _refuse_larger(path, MAX_METRICS_BYTES, "a run's metrics log")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is damaged: {error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}, line {number}, is not JSON: {error.msg}") from None
        except RecursionError:
            raise UsageError(f"{path}, line {number}, is not a torchmnist metrics record: "
                             "it nests deeper than Python's stack") from None
        problem = _record_problem(record)
        if problem:
            raise UsageError(f"{path}, line {number}, is not a torchmnist metrics record: "
                             f"{problem}")
        records.append(record)
    return records


def _record_problem(record) -> str | None:
    """Why a record is not one that training writes, or None: checked here so that the
    figures and the table need not guess."""
    if not isinstance(record, dict):
        return f"it is a {type(record).__name__}, not an object"
    if record.get("kind") not in ("train", "epoch"):
        return "its kind is neither train nor epoch"
    for key in ("epoch", "step"):
        if not is_number(record.get(key), whole=True):
            return f"it has no whole-number {key}"
    for key in ("train_loss", "seconds"):
        if not is_number(record.get(key)):
            return f"it has no number for {key}"
    for key in ("train_accuracy", "test_loss", "test_accuracy", "val_loss", "val_accuracy", "lr"):
        if record.get(key) is not None and not is_number(record[key]):
            return f"its {key} is not a number"
    return None


def _loss_names(config: dict) -> tuple[str, str]:
    """What the two loss curves are, since they need not be the same loss."""
    smoothing = config.get("label_smoothing") or 0
    trained = (f"cross-entropy with label smoothing {smoothing:g}" if smoothing
               else "negative log-likelihood")
    return trained, "negative log-likelihood"


def _save(figure, path: Path) -> None:
    rundir.write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=110))


def _curves(records: list[dict], config: dict):
    """The curves figure: losses, accuracy, and the learning rate when it was scheduled."""
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    # Validation (--val-size) and test results, each where it was measured.
    measured = {name: [r for r in epochs if r.get(f"{key}_accuracy") is not None]
                for name, key in (("validation", "val"), ("test", "test"))}
    measured = {name: rs for name, rs in measured.items() if rs}
    rates = sorted((r["step"], r["lr"]) for r in train + epochs if r.get("lr") is not None)
    # A rate that never changed needs no panel; a schedule does, however few points it left.
    constant_rate = config.get("scheduler", "none") == "none"
    figure = Figure(figsize=(8 if constant_rate else 12, 3.8), layout="constrained")
    panels = figure.subplots(1, 2 if constant_rate else 3)
    loss, accuracy = panels[0], panels[1]
    trained_loss, tested_loss = _loss_names(config)
    loss.plot([r["step"] for r in train], [r["train_loss"] for r in train], ".-", lw=1, ms=3,
              label=f"training: {trained_loss}, mean over each log interval")
    for name, rs in measured.items():
        key = "val" if name == "validation" else "test"
        loss.plot([r["step"] for r in rs], [r[f"{key}_loss"] for r in rs], "o-",
                  label=f"{name}: {tested_loss}")
    title = "loss" + (f" (learning rate {config.get('lr', rates[0][1] if rates else 0):g} "
                      "throughout)" if constant_rate else "")
    loss.set(title=title, xlabel="step", yscale="log")
    loss.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    values = [100 * r[f"{'val' if n == 'validation' else 'test'}_accuracy"]
              for n, rs in measured.items() for r in rs]
    top = 100.0
    if values:
        # Within the data (and never above 100%), with room above the top label.
        low, high = min(values), max(values)
        pad = max((high - low) * 0.15, 0.25)
        top = min(high + 2 * pad, 100)
        accuracy.set_ylim(max(low - pad, 0), top)
    for name, rs in measured.items():
        key = "val" if name == "validation" else "test"
        ys = [100 * r[f"{key}_accuracy"] for r in rs]
        accuracy.plot([r["step"] for r in rs], ys, "o-", label=name)
        for r, y in zip(rs, ys, strict=True):
            bottom, ceiling = accuracy.get_ylim()
            below = ceiling - y < 0.1 * (ceiling - bottom)  # a label at the top goes under it
            accuracy.annotate(f"{y:.2f}", (r["step"], y), textcoords="offset points",
                              xytext=(0, -11 if below else 6), ha="center", fontsize=7)
    if len(measured) > 1:
        accuracy.legend(fontsize=7)
    last_step = max([r["step"] for r in train + epochs], default=1)
    for axes in panels:
        axes.set_xlim(0, last_step * 1.05)  # a short run's one point sits on a step axis too
        axes.grid(alpha=0.3)
    accuracy.set(title=(f"{next(iter(measured))} " if len(measured) == 1 else "")
                 + "accuracy (%)", xlabel="step")
    if not constant_rate:
        panels[2].plot([step for step, _ in rates], [lr for _, lr in rates], ".", ms=3)
        panels[2].set(title="learning rate", xlabel="step")
    return figure


def _confusion(confusion: np.ndarray, classes: tuple[str, ...]):
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    n = len(classes)
    side = min(max(7.0, 0.16 * n + 2), 16.0)  # inches: the cells stay visible up to ~100
    figure = Figure(figsize=(side, side - 0.8), layout="constrained")
    axes = figure.subplots()
    shown = np.where(confusion > 0, confusion, np.nan)  # empty cells stay white
    image = axes.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(confusion.max(), 2)))
    counted = n <= MAX_COUNTED_CELLS
    if counted:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", fontsize=7,
                          color="white" if count > confusion.max() ** 0.5 * 3 else "black")
    named = range(0, n, -(-n // MAX_NAMED_CLASSES))  # every class, or every k-th
    axes.set(xticks=named, yticks=named, xlabel="predicted", ylabel="true",
             title="confusion matrix (test set, log colour" + ("" if counted else
                                                                "; each class in report.md") + ")")
    names = [_plain(classes[i]) for i in named]
    wide = max(map(len, classes)) > 2
    axes.set_xticklabels(names, rotation=45 if wide else 0, ha="right" if wide else "center",
                         fontsize=8)
    axes.set_yticklabels(names, fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def _mistakes(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
              probabilities: np.ndarray, chosen: np.ndarray, classes: tuple[str, ...]):
    from matplotlib.figure import Figure

    columns = 8
    rows = max(1, -(-len(chosen) // columns))
    figure = Figure(figsize=(columns * 1.3, rows * 1.5 + 0.4), layout="constrained")
    figure.suptitle(f"misclassified test images, most confident first ({len(chosen)} shown)",
                    fontsize=10)
    grid = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axes in grid:
        axes.axis("off")
    if len(chosen) == 0:
        grid[0].text(0, 0.5, "no mistakes", fontsize=10)
    for axes, index in zip(grid, chosen, strict=False):
        axes.imshow(images[index], cmap="gray", vmin=0, vmax=255)
        axes.set_title(f"#{index}: true {_plain(classes[labels[index]])}\npredicted "
                       f"{_plain(classes[predictions[index]])} "
                       f"{100 * probabilities[index, predictions[index]]:.0f}%", fontsize=7)
    return figure


def _plain(text: str) -> str:
    """A class name as matplotlib should draw it: as written. Between two $ it reads TeX, and
    a name such as "$5" beside another ends in a parse error or in the wrong text."""
    return text.replace("$", r"\$")


_MARKDOWN_MARKS = re.compile(r"([\\`*_\[\]<>|$~])")


def _md(text: str) -> str:
    """Text as itself in report.md: a | in a class or folder name would split a table cell,
    $ start GitHub's math, * and _ emphasis, < an HTML tag; a folder named in another encoding
    than UTF-8 is shown escaped (the file is UTF-8)."""
    return _MARKDOWN_MARKS.sub(r"\\\1", printable(text))


def _epochs_text(config: dict, last: dict) -> str:
    """"0.75 epochs", "1 epoch", "10 epochs": what the run was asked for, fractions kept."""
    epochs = config.get("epochs", last.get("epoch", 0))
    return f"{epochs:g} epoch{'' if epochs == 1 else 's'}"


def _markdown(run_dir: Path, config: dict, records: list[dict], numbers: dict,
              confusion: np.ndarray, classes: tuple[str, ...], figures: dict[str, Path],
              shown: int) -> str:
    epochs = [r for r in records if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    dataset_name = "synthetic (dry run)" if config.get("dry_run") else numbers["dataset"]
    lines = [
        f"{REPORT_TITLE}{_md(run_dir.name)}", "",
        f"{config.get('recipe', '?')} recipe, {_md(numbers['model'])} model, "
        f"{_md(dataset_name)}; "
        f"{_epochs_text(config, last)}, {last.get('step', 0)} steps, "
        f"{last.get('seconds', 0):.1f} s of training.", "",
        "| | |", "|---|---|",
        f"| test accuracy | **{100 * numbers['test_accuracy']:.2f}%** "
        f"({numbers['correct']}/{numbers['total']}) |",
        f"| misclassified | {numbers['misclassified']} |",
    ]
    if last.get("test_loss") is not None:
        lines.append(f"| test loss (last epoch) | {last['test_loss']:.4f} |")
    if last.get("train_loss") is not None:
        lines.append(f"| training loss (last epoch) | {last['train_loss']:.4f} |")
    trained_loss, tested_loss = _loss_names(config)
    lines += ["", f"The training loss is the {trained_loss} of the training batches, as the run "
              f"minimised it; test and validation losses are the {tested_loss} of the unaltered "
              "images, so the two need not meet."]
    lines += ["", "## Curves", "", f"![loss, accuracy and learning rate]({figures['curves'].name})",
              "", "| epoch | step | training loss | test loss | test accuracy | seconds |",
              "|---|---|---|---|---|---|"]
    for r in epochs:
        accuracy = f"{100 * r['test_accuracy']:.2f}%" if r.get("test_accuracy") is not None \
            else ""
        test_loss = f"{r['test_loss']:.4f}" if r.get("test_loss") is not None else ""
        lines.append(f"| {r['epoch']} | {r['step']} | {r['train_loss']:.4f} | {test_loss} | "
                     f"{accuracy} | {r['seconds']} |")
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((off[i, j], i, j) for i in range(len(classes)) for j in range(len(classes))
                    if off[i, j]), reverse=True)[:5]
    lines += ["", "## Confusion matrix", "", f"![confusion matrix]({figures['confusion'].name})",
              ""]
    if len(classes) <= MAX_CLASS_COLUMNS:  # one row, a column per class
        lines += ["| class | " + " | ".join(map(_md, classes)) + " |",
                  "|---|" + "---|" * len(classes),
                  "| accuracy | " + " | ".join(f"{100 * a:.1f}%" for a in per_class) + " |", ""]
    else:  # a row per class, with its count of test images
        lines += ["| class | test images | accuracy |", "|---|---|---|"]
        lines += [f"| {_md(name)} | {total} | {100 * a:.1f}% |"
                  for name, total, a in zip(classes, confusion.sum(1), per_class, strict=True)]
        lines.append("")
    if pairs:
        lines.append("Most frequent confusions: " + "; ".join(
            f"{_md(classes[i])} read as {_md(classes[j])} ({n}×)" for n, i, j in pairs) + ".")
    lines += ["", "## Mistakes", "",
              f"The {shown} most confident mistakes (of {numbers['misclassified']}), each with "
              "its test-set index, true class and prediction:", "",
              f"![misclassified test images]({figures['mistakes'].name})", "",
              "## Configuration", "", "Settings that change the result and differ from the "
              "guide's defaults:", "", "| setting | value |", "|---|---|"]
    defaults = TrainConfig().to_dict()
    for key, value in config.items():
        if key in (*RESULT_KEYS, "epochs") and value != defaults.get(key):
            shown_value = json.dumps(value, allow_nan=False).replace("|", "\\|")
            lines.append(f"| `{key}` | `{shown_value}` |")  # (a | would end the cell)
    lines += ["", "The whole resolved configuration is `config.json` in the run directory.", ""]
    return "\n".join(lines)
