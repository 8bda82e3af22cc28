"""Command line: `torchmnist train`, `test`, `predict`, `export`, `report` and `bench`.

This module only turns flags into a config and calls the Python API; the `train` flags are
generated from the fields of `TrainConfig`, so the CLI, the API and the checkpoints cannot drift
apart. Errors a user can cause end in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from torchmnist import __version__
from torchmnist import config as cfg
from torchmnist.errors import TorchMnistError, counted, printable
from torchmnist.runtime import signals

_BENCH_LOADERS = ("tensor", "dataloader:0", "dataloader:2", "dataloader:4")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one sentence, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole(low: int, high: int | None = None):
    """An argparse type for a count or a port: a whole number from `low` (to `high`), so that a
    bad value ends at parsing, in one sentence naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
        return value

    return parse


def _default_text(name: str) -> str:
    def shown(value: Any) -> str:
        return "off" if value is False else "on" if value is True else str(value)

    text = f"default: {shown(cfg.default_for(name))}"
    for recipe in cfg.RECIPE_NAMES:
        on_fp32_cpus = cfg.CPU_FP32_RECIPES.get(recipe, {})
        if recipe != "guide" and (cfg.default_for(name, recipe) != cfg.default_for(name)
                                  or name in on_fp32_cpus):
            text += f"; {recipe} recipe: {shown(cfg.default_for(name, recipe))}"
        if name in on_fp32_cpus:
            text += f" ({shown(on_fp32_cpus[name])} on CPUs without native bf16)"
        for (for_recipe, dataset), values in cfg.DATASET_RECIPES.items():
            if for_recipe == recipe and name in values:
                text += f" ({shown(values[name])} on {dataset})"
    return text


def _add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                     helps: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field, made from its metadata, in --help's sections; `helps`
    gives another command's own words for some of them."""
    helps = helps or {}
    groups = {name: parser.add_argument_group(name) for name in cfg.GROUPS}
    groups["recipe"].add_argument(
        "--config", metavar="FILE", help="read settings from a TOML, YAML or JSON file (a run's "
        "own config.json too), with the flags' names as keys (lr, batch_size, ...); flags given "
        "on the command line win")
    for f in dataclasses.fields(cfg.TrainConfig):
        if f.name in skip:
            continue
        group, flag = groups[f.metadata["group"]], "--" + f.name.replace("_", "-")
        help_text = helps.get(f.name, f.metadata["help"])
        # Some fields explain their default themselves, and another command's words are whole.
        if "default:" not in help_text and f.name not in helps:
            help_text += f" ({_default_text(f.name)})"
        if f.metadata["switch"] == "flag":
            group.add_argument(flag, action="store_true", help=help_text)
        elif f.metadata["switch"] == "on-off":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "resume":  # --resume alone: the newest run's last.pt
            group.add_argument(flag, nargs="?", const="last", metavar=f.metadata["metavar"],
                               help=help_text)
        else:
            group.add_argument(flag, type=f.metadata["type"], choices=f.metadata["choices"],
                               metavar=f.metadata["metavar"], help=help_text)
        if f.name == "device":
            group.add_argument("--no-cuda", dest="device", action="store_const", const="cpu",
                               help="train on the CPU even if a GPU is present (= --device cpu)")


# Flags shared by the commands that use a trained model.


def _add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The one way every command that uses a trained model names it."""
    parser.add_argument("checkpoint", metavar="RUN|CHECKPOINT", help="a run folder (its "
                        "last.pt), a torchmnist checkpoint (last.pt, best.pt, epoch-NNN.pt), a "
                        "model folder from export --format folder, bare weights (a state_dict "
                        "such as the guide's model.pth, or a .safetensors file), or with "
                        "--engine onnxruntime an .onnx file from export")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL", help="the network: "
                        f"{', '.join(cfg.MODELS)}, or your own as package.module:Class, which "
                        "must be named here for a checkpoint of it to load (default: from the "
                        "checkpoint, else recognised from the weights' names and shapes)")
    parser.add_argument("--dataset", choices=cfg.DATASETS, help="what the model was trained "
                        "on, which sets the normalisation and class names (default: from the "
                        "checkpoint, else mnist)")


def _add_data_flags(parser: argparse.ArgumentParser, purpose: str = "",
                    default: str = "") -> None:
    parser.add_argument("--data-dir", metavar="DIR", help=f"dataset root {purpose}(default: "
                        f"{default}$TORCHMNIST_DATA_DIR, else ~/.torch/datasets)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="download missing dataset files (default: on)")


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=cfg.DEVICES, default="auto",
                        help="device (default: auto)")


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _add_engine_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=cfg.ENGINES, default="torch",
                        help="what runs the network: torch, or onnxruntime (its ONNX export, made "
                        "and checked on the fly, or an .onnx file from torchmnist export; on "
                        "the CPU) (default: torch)")


def _add_tta_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the probabilities over each image "
                        "and its four 1-pixel shifts (5 times the work)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")  # without importing torch, which takes seconds
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"torchmnist {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchmnist", description="Train and test MNIST models the way "
                     "'Grokking PyTorch' teaches, fast, on CPU or GPU.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser(
        "train", help="train a model, testing after every epoch",
        description="Train a model, testing after every epoch and checkpointing as it goes. "
        "Flags you give override the recipe's values.",
        # Only flags the user typed reach the namespace, so recipes and resumes know what was
        # asked for explicitly and what was left to them.
        argument_default=argparse.SUPPRESS)
    _add_train_flags(train)

    test = commands.add_parser(
        "test", help="evaluate a checkpoint or state_dict on the test set",
        description="Evaluate a torchmnist checkpoint, or a plain state_dict such as the "
        "guide's model.pth or the official example's mnist_cnn.pt, on the test set.")
    _add_checkpoint_argument(test)
    _add_model_flags(test)
    _add_data_flags(test)
    _add_device_flag(test)
    _add_engine_flag(test)
    test.add_argument("--batch-size", type=_whole(1), default=1000, metavar="N",
                      help="test batch size (default: 1000)")
    _add_tta_flag(test)
    test.add_argument("--exit-threshold", type=float, metavar="T", help="--model early-exit: "
                      "an image leaves at the first head whose top probability reaches T "
                      "(default: the run's)")
    _add_json_flag(test)

    predict = commands.add_parser(
        "predict", help="classify image files with a trained model",
        description="Classify photos, scans or drawings: each image is turned into a 28x28 "
        "image the way the model's dataset was made (grey, ink white on black, cropped, scaled, "
        "centred), then classified. Exit status 2 if any file could not be read.")
    _add_checkpoint_argument(predict)
    predict.add_argument("inputs", nargs="+", metavar="IMAGE|DIR|GLOB",
                         help="image files (PNG, JPEG, BMP, GIF, TIFF, WebP, ...), directories "
                         "(their files), glob patterns, or - for the image piped in")
    predict.add_argument("--top", type=_whole(1), default=3, metavar="K",
                         help="also show the K most likely classes (default: 3)")
    predict.add_argument("--json", action="store_true",
                         help="one JSON object per image per line")
    predict.add_argument("--save-preprocessed", metavar="DIR",
                         help="write the 28x28 images the model saw into DIR as PNGs")
    _add_tta_flag(predict)
    _add_model_flags(predict)
    _add_device_flag(predict)
    _add_engine_flag(predict)

    export = commands.add_parser(
        "export", help="write a model as ONNX, pt2, TorchScript, safetensors or a model folder, "
        "checked for parity",
        description="Export the model of a checkpoint; the file is then run (onnxruntime, "
        "torch.export.load, torch.jit.load, safetensors) on 256 test images and must match "
        "PyTorch within 1e-4, "
        "else it is not written and the exit status is 1. Inputs: normalised float32 "
        "(N, 1, 28, 28); outputs: (N, classes) log-probabilities.")
    _add_checkpoint_argument(export)
    export.add_argument("--format", choices=("onnx", "pt2", "torchscript", "safetensors",
                                             "folder"),
                        help="what to write: onnx; pt2, a torch.export program; torchscript; "
                        "safetensors; folder: model.safetensors, config.json and a README.md "
                        "model card, which load, predict, test and serve take (default: what "
                        "--out's name ends as: .onnx, .pt2, .torchscript.pt, .safetensors)")
    export.add_argument("--out", metavar="PATH", help="where to write (default: beside the "
                        "checkpoint, e.g. last.onnx)")
    _add_model_flags(export)
    _add_data_flags(export, "for the parity images ")
    _add_json_flag(export)

    report = commands.add_parser(
        "report", help="figures and a Markdown report of a run",
        description="Draw a run's loss, accuracy and learning-rate curves (metrics.jsonl), its "
        "confusion matrix and its most confident mistakes on the test set, and write "
        "report.md tying them to the run's config and final numbers.")
    report.add_argument("checkpoint", metavar="RUN|CHECKPOINT", help="a run folder (its "
                        "last.pt), or a checkpoint in one (best.pt, epoch-NNN.pt): the figures "
                        "of its run, the test set scored with that checkpoint")
    report.add_argument("--out", metavar="DIR", help="where to write (default: RUN/report)")
    report.add_argument("--mistakes", type=_whole(0), default=48, metavar="N",
                        help="misclassified images to show (default: 48)")
    _add_data_flags(report, default="the run's, else ")
    _add_device_flag(report)
    _add_json_flag(report)

    bench = commands.add_parser(
        "bench", help="measure throughput per loader and time to accuracy",
        description="Measure training and inference throughput of a recipe with each loader, "
        "and its time to accuracy over several seeds; every number is a median of trials, "
        "printed with the hardware and torch version.", argument_default=argparse.SUPPRESS)
    bench.add_argument("--trials", type=_whole(1), default=3, metavar="N",
                       help="throughput trials per loader (default: 3)")
    bench.add_argument("--steps", type=_whole(1), default=200, metavar="N",
                       help="timed training steps per throughput trial (default: 200)")
    bench.add_argument("--loaders", default=",".join(_BENCH_LOADERS), metavar="LIST",
                       help="loaders to compare, e.g. tensor,dataloader:2 (WORKERS after the "
                       "colon); premade times the steps on batches made before the clock, "
                       "the bound no loader can beat; empty to skip (default: %(default)s)")
    bench.add_argument("--accuracy-trials", type=_whole(0), default=3, metavar="N",
                       help="whole training runs, one per seed from --seed on, for time to "
                       "accuracy; 0 to skip (default: 3)")
    bench.add_argument("--json", action="store_true", help="print the report as one JSON line")
    _add_train_flags(bench, skip=("run_dir", "resume", "json", "keep", "save_model", "quiet"))

    _add_sweep_parser(commands)

    serve = commands.add_parser(
        "serve", help="a web page to draw a digit on, and an HTTP API, for a trained model",
        description="Serve a trained model: a page to draw on or drop a photo on (/), "
        "POST /api/predict for programs, the Open Inference Protocol under /v2, GET /api/model, "
        "/api/health (liveness), /api/ready (readiness) and /metrics (Prometheus), OpenAPI "
        "docs at /docs. Needs pip install 'torchmnist[serve]'.")
    _add_checkpoint_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on; "
                       "0.0.0.0 serves other machines too (default: %(default)s, this one "
                       "only)")
    serve.add_argument("--port", type=_whole(1, 65535), default=8000,
                       help="the port to listen on (default: %(default)s)")
    serve.add_argument("--max-bytes", type=_whole(1), default=5 * 1024 * 1024, metavar="N",
                       help="refuse a request body larger than this (default: 5 MiB)")
    serve.add_argument("--max-pixels", type=_whole(1), default=25_000_000, metavar="N",
                       help="refuse an image with more pixels than this (default: 25 million)")
    serve.add_argument("--top", type=_whole(1), default=3, metavar="K",
                       help="classes in each answer's top list (default: 3)")
    serve.add_argument("--max-batch", type=_whole(1, 4096), default=64, metavar="N",
                       help="the most images one forward pass takes (default: %(default)s)")
    serve.add_argument("--workers", type=_whole(1, 64), default=1, metavar="N",
                       help="server processes sharing the port, each with its own model and "
                       "batches: more throughput on several cores (default: 1)")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                       help="how long a request waits for others to share its forward pass "
                       "(default: %(default)s)")
    _add_model_flags(serve)
    _add_device_flag(serve)
    _add_engine_flag(serve)
    return parser


# The sweep's own options; every other flag of `sweep` is a train flag for all its trials.
_SWEEP_OPTIONS = ("param", "space", "trials", "jobs", "objective", "sampler", "pruner",
                  "prune_startup", "storage", "study_name", "best_format", "heartbeat", "worker",
                  "share", "run_dir", "json", "quiet")


def _add_sweep_parser(commands) -> None:
    from torchmnist.commands.sweep import BEST_FORMATS, OBJECTIVES, SAMPLERS

    sweep = commands.add_parser(
        "sweep", help="search hyper-parameters with Optuna, over any train flag",
        description="Search train settings with Optuna: each trial is a run folder under the "
        "sweep's folder, hopeless trials are pruned on their per-test accuracy, and the best "
        "settings are written as a config file for train --config. Train flags given here apply "
        "to every trial (e.g. --recipe fast --dry-run).", argument_default=argparse.SUPPRESS)
    s = sweep.add_argument_group("sweep")
    s.add_argument("--param", action="append", metavar="NAME=SPEC",
                   help="a setting to search: lr=log:1e-3:1, momentum=float:0:0.99, "
                   "epochs=int:1:3, batch_size=choice:64,128,256 (repeat the flag)")
    s.add_argument("--space", metavar="FILE", help="settings to search from a TOML, YAML or "
                   "JSON file: each key a setting, each value a spec as in --param or a list of "
                   "choices")
    s.add_argument("--trials", type=_whole(1), metavar="N", help="trials in the study, all "
                   "workers together; a resumed or joined study goes on to N (default: 20)")
    s.add_argument("--jobs", type=_whole(1), metavar="J", help="trials at once on this machine, "
                   "each in its own process with cores/J torch threads (default: 1)")
    s.add_argument("--objective", choices=OBJECTIVES, help="what a trial is scored on: "
                   "accuracy (validation with --val-size, else test), val_accuracy, "
                   "test_accuracy, or time to --target-accuracy (default: accuracy)")
    s.add_argument("--sampler", choices=SAMPLERS, help="how settings are proposed (default: "
                   "tpe; grid needs choice or int parameters)")
    s.add_argument("--pruner", choices=("median", "none"), help="stop a trial whose accuracy "
                   "after a test is below the median of earlier trials at that step (default: "
                   "median)")
    s.add_argument("--prune-startup", type=_whole(0), metavar="N", help="trials that run to the "
                   "end before any is pruned (default: 5)")
    s.add_argument("--storage", metavar="URL", help="the study's database, e.g. "
                   "postgresql://user:pass@host/db, which workers on several machines share "
                   "(default: SQLite in the sweep folder)")
    s.add_argument("--study-name", metavar="NAME", help="the study to create or join (default: "
                   "the sweep folder's name)")
    s.add_argument("--best-format", choices=BEST_FORMATS, help="the file the best settings are "
                   "written to (default: toml, i.e. best.toml)")
    s.add_argument("--heartbeat", type=_whole(1), metavar="S", help="seconds between a running "
                   "trial's heartbeats; a trial silent for 3 of them is run again (default: 10)")
    # One of --jobs' processes, and how many trials it runs.
    s.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    s.add_argument("--share", type=int, help=argparse.SUPPRESS)
    _add_train_flags(sweep, skip=("resume", "allow_new_world_size"), helps={
        # The three train flags that speak for the sweep here.
        "run_dir": "the sweep's folder: the study, trial-NNNN/ run folders, best.toml, plots "
                   "(default: runs/sweep-<date-time>)",
        "json": "print the sweep's summary as JSON on stdout, the rest on stderr",
        "quiet": "print nothing but errors (and the --json line)"})


def _serve(args: argparse.Namespace) -> int:
    from torchmnist.commands import serving

    arguments = dict(checkpoint_path=args.checkpoint, device=args.device, model=args.model,
                     dataset=args.dataset, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                     top=args.top, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     engine=args.engine)
    app = serving.create_app(**arguments)  # here too: a bad flag or file ends here, said once
    serving.run(app, args.host, args.port, args.workers, arguments)
    return 0


def _sweep(explicit: dict[str, Any], argv: list[str]) -> int:
    from torchmnist.commands import sweep

    options = {k: explicit.pop(k) for k in _SWEEP_OPTIONS if k in explicit}
    summary = sweep.main(options, explicit, argv)
    if summary is not None and options.get("json"):
        print(json.dumps(summary, allow_nan=False, default=str))
    return 0


def _bench(explicit: dict[str, Any]) -> int:
    from torchmnist.commands import bench

    options = {k: explicit.pop(k) for k in ("trials", "steps", "loaders", "accuracy_trials",
                                            "json") if k in explicit}
    if "config" in explicit:
        explicit = {**cfg.read_config_file(explicit.pop("config")), **explicit}
    config = cfg.resolve(explicit)
    trials, steps = options.get("trials", 3), options.get("steps", 200)
    accuracy_trials = options.get("accuracy_trials", 3)
    loaders = options.get("loaders", ",".join(_BENCH_LOADERS))
    # With --json, stdout holds only the JSON report; the table goes to stderr.
    with signals.stop_by_unwinding():
        report = bench.run(config, loaders=bench.parse_loaders(loaders) if loaders else [],
                           steps=steps, trials=trials, accuracy_trials=accuracy_trials,
                           out=sys.stderr if options.get("json") else None)
    if options.get("json"):
        print(json.dumps(report, allow_nan=False))
    return 0


def _test(args: argparse.Namespace) -> int:
    from torchmnist.data.datasets import dry_run_words
    from torchmnist.evaluation import evaluate

    result = evaluate(args.checkpoint, model=args.model, dataset=args.dataset,
                      data_dir=args.data_dir, download=args.download, device=args.device,
                      batch_size=args.batch_size, tta=args.tta,
                      exit_threshold=args.exit_threshold, engine=args.engine)
    how = (" with test-time augmentation" if args.tta else "") + (
        " on ONNX Runtime" if args.engine == "onnxruntime" else "")
    exits = result["exits"]
    early = (f"; leaving at threshold {exits['threshold']:g}: heads 1/2/3 took "
             f"{'/'.join(str(n) for n in exits['per_head'])} images, "
             f"{100 * exits['compute_fraction']:.0f}% of the whole network's compute"
             if exits else "")
    dry = dry_run_words(result["dataset"]) if result["dry_run"] else ""
    _show(args, result, f"{result['checkpoint']}: {result['model']} model on {result['dataset']} "
          f"test set{dry}{how}: loss {result['test_loss']:.4f}, accuracy {result['correct']}/"
          f"{result['total']} ({100 * result['test_accuracy']:.2f}%){early}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from torchmnist.commands.exporting import export

    result = export(args.checkpoint, args.format, args.out, model=args.model,
                    dataset=args.dataset, data_dir=args.data_dir, download=args.download)
    _show(args, result, f"wrote {result['file']} ({result['format']}, {result['model']} model, "
          f"{result['bytes']:,} bytes); parity on {result['parity_images']} test images: "
          f"largest absolute difference {result['max_abs_diff']:.2e} (limit "
          f"{result['tolerance']:g}), same predictions {100 * result['same_predictions']:.1f}%")
    return 0


def _show(args: argparse.Namespace, result: dict, sentence: str) -> None:
    """The result as one JSON line with --json, else as a sentence (its paths escaped as
    every name torchmnist prints is: a folder in another encoding, a newline)."""
    print(json.dumps(result, allow_nan=False) if args.json else printable(sentence))


def _report(args: argparse.Namespace) -> int:
    from torchmnist.commands.reporting import report

    result = report(args.checkpoint, args.out, data_dir=args.data_dir, download=args.download,
                    device=args.device, mistakes=args.mistakes)
    _show(args, result, f"wrote {result['report']} with {Path(result['curves']).name}, "
          f"{Path(result['confusion']).name} and {Path(result['mistakes']).name}: test accuracy "
          f"{100 * result['test_accuracy']:.2f}%, {result['misclassified']} misclassified")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from torchmnist.commands.prediction import predict

    results = predict(args.checkpoint, args.inputs, top=args.top, model=args.model,
                      dataset=args.dataset, device=args.device,
                      save_preprocessed=args.save_preprocessed, tta=args.tta,
                      engine=args.engine)
    failed = [r for r in results if "error" in r]
    for result in results:
        if args.json:
            print(json.dumps(result, allow_nan=False), flush=True)
        elif "error" in result:
            print(f"torchmnist: error: {result['file']}: {result['error']}", file=sys.stderr)
        else:
            others = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%"
                               for t in result["top"])
            print(f"{result['file']}: {result['class']} ({100 * result['probability']:.1f}%)"
                  f"  top {len(result['top'])}: {others}")
    if failed and args.json:
        print(f"torchmnist: error: {len(failed)} of {counted(len(results), 'file')} could not "
              f"be predicted (see {'its' if len(results) == 1 else 'their'} \"error\")",
              file=sys.stderr)
    return 2 if failed else 0


def _rank() -> str:
    """" (rank N)" in a distributed run (torchrun), whose processes all print their errors."""
    size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f" (rank {rank})" if size.isdigit() and int(size) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        explicit = {k: v for k, v in vars(args).items() if k != "command"}
        if args.command == "train":
            # Imported here, as every command's code is: --help and --version answer without
            # importing torch, which takes seconds.
            from torchmnist import setup, training
            from torchmnist.runtime import distributed

            config, resumed = setup.from_flags(explicit)
            summary = training.train(config, resumed=resumed)
            if config.json and distributed.from_environment().main:
                print(json.dumps(summary, allow_nan=False))
            return 0
        if args.command == "bench":
            return _bench(explicit)
        if args.command == "serve":
            return _serve(args)
        if args.command == "sweep":
            raw = list(sys.argv[1:] if argv is None else argv)
            return _sweep(explicit, raw[raw.index("sweep") + 1:])
        commands = {"predict": _predict, "export": _export, "report": _report, "test": _test}
        with signals.terminate_cleanly():
            return commands[args.command](args)
    except TorchMnistError as error:
        # In a distributed run a stop is told once, by rank 0; errors by every rank.
        if error.told and not (error.label == "stopped" and _rank()
                               and os.environ.get("RANK") != "0"):
            print(f"torchmnist: {error.label}{_rank()}: {printable(str(error))}",
                  file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("torchmnist: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # e.g. the run directory cannot be written: disk full, permissions
        where = f": {error.filename}" if error.filename else ""
        print(f"torchmnist: error: {printable(f'{error.strerror or error}{where}')}",
              file=sys.stderr)
        return 1
