"""The command line as a user meets it: help, flags, recipes, errors, dry runs, JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
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

import torchmnist
from torchmnist import config
from torchmnist.commands import cli
from torchmnist.errors import UsageError


@pytest.mark.slow
def test_dry_run_with_empty_home_writes_a_complete_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = run_subprocess(["train", "--dry-run", "--json"], cwd=tmp_path,
                            env={"HOME": str(home)}, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    run_dir = tmp_path / summary["run_dir"]
    assert run_dir.parent.name == "runs" and run_dir.name.endswith("-synthetic-guide")
    for name in ("config.json", "train.log", "metrics.jsonl", "last.pt"):
        assert (run_dir / name).is_file(), name
    assert summary["epochs"] == 1  # one short epoch
    # Never touched ~/.torch/datasets. (On a GPU machine the CUDA driver keeps its compiled
    # kernels in ~/.nv; that is the driver's cache, not torchmnist's.)
    assert [p.name for p in home.iterdir() if p.name != ".nv"] == []
    assert "epoch 1/1 step 16: train loss" in (run_dir / "train.log").read_text()


def test_python_dash_m_and_console_script_share_the_parser(tmp_path):
    script = Path(sys.executable).with_name("torchmnist")  # installed next to this python
    if not script.exists() and os.environ.get("CI") != "true":
        pytest.skip("torchmnist is imported from src/, not installed: there is no console script")
    result = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True)
    module = run_subprocess(["train", "--help"], cwd=tmp_path)
    assert result.returncode == module.returncode == 0
    assert "--cuda-graph" in module.stdout
    assert result.stdout == module.stdout  # one parser: the same help, flag for flag


def _train_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["train"]


def test_every_train_flag_has_help_with_its_default():
    actions = {a.option_strings[0]: a for a in _train_parser()._actions}
    for field in dataclasses.fields(config.TrainConfig):
        action = actions["--" + field.name.replace("_", "-")]
        assert action.dest == field.name
        assert "default" in action.help, f"{field.name}: {action.help!r}"
    flat = " ".join(_train_parser().format_help().split())
    # The guide's values are the defaults; the official recipe's differences are shown too.
    assert "--test-batch-size N test batch size (does not change results) (default: 1000; " \
        "fast-gpu recipe: 10000)" in flat
    assert ("--batch-size N training batch size (default: 64; fast recipe: 64 (128 on CPUs "
            "without native bf16); fast-gpu recipe: 512; best recipe: 128)") in flat
    assert ("(default: 0.01; official recipe: 1.0; fast recipe: 0.15 (0.3 on CPUs without native "
            "bf16) (0.1 on fashion-mnist); fast-gpu recipe: 0.4; best recipe: 0.05)") in flat
    assert ("(default: 10; official recipe: 14; fast recipe: 0.75 (0.85 on CPUs without native "
            "bf16) (8 on fashion-mnist); fast-gpu recipe: 2; best recipe: 30 (45 on "
            "fashion-mnist))") in flat
    assert "--no-cuda" in flat


def test_every_recipe_is_offered_and_fast_gpu_differs_from_fast_only_in_its_steps():
    # ... and in replaying them from CUDA graphs in fp32, NCHW, testing in one batch
    assert sorted(config.RECIPES) == sorted(config.RECIPE_NAMES)
    fast, gpu = config.resolve({"recipe": "fast"}), config.resolve({"recipe": "fast-gpu"})
    differ = {k for k, v in fast.to_dict().items() if gpu.to_dict()[k] != v}
    assert differ == {"recipe", "lr", "batch_size", "epochs", "cuda_graph", "amp",
                      "channels_last", "test_batch_size"}


def test_a_recipe_can_depend_on_the_dataset():
    assert config.resolve({"recipe": "best"}).augment == "affine"
    fashion = config.resolve({"recipe": "best", "dataset": "fashion-mnist"})
    assert (fashion.augment, fashion.epochs) == ("translate", 45)
    fast = config.resolve({"recipe": "fast", "dataset": "fashion-mnist"})
    assert (fast.lr, fast.epochs) == (0.1, 8)
    assert config.resolve({"recipe": "fast"}).epochs == 0.75
    assert config.resolve({"recipe": "best", "dataset": "fashion-mnist",
                           "augment": "affine"}).augment == "affine"  # explicit still wins


def test_recipes_and_explicit_flags():
    guide = config.resolve({})
    assert (guide.model, guide.optimizer, guide.lr, guide.momentum, guide.batch_size,
            guide.epochs) == ("guide", "sgd", 0.01, 0.5, 64, 10)
    official = config.resolve({"recipe": "official"})
    assert (official.model, official.optimizer, official.lr, official.scheduler, official.gamma,
            official.epochs, official.test_batch_size) == (
        "official", "adadelta", 1.0, "step", 0.7, 14, 1000)
    mixed = config.resolve({"recipe": "official", "lr": 0.5, "epochs": 2})
    assert (mixed.model, mixed.lr, mixed.epochs) == ("official", 0.5, 2)


def test_no_cuda_means_cpu():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--no-cuda"])
    assert args.device == "cpu"


@pytest.mark.parametrize("flags, fragment", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "many"], "invalid int value: 'many'"),
    (["--dataset", "cifar"], "--dataset must be one of mnist, fashion-mnist, kmnist, or "
                             "folder:PATH"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "-0.5"], "--epochs must be positive"),
    (["--epochs", "inf"], "--epochs must be a finite number, not inf"),
    (["--epochs", "some"], "invalid number value: 'some'"),
    (["--save-interval", "-5"], "--save-interval must not be negative"),
    # Both once ended in a traceback from numpy's SeedSequence, or a segmentation fault.
    (["--seed", "-1"], "--seed must be from 0 to 2**63 - 1, not -1"),
    (["--seed", str(2**63)], f"--seed must be from 0 to 2**63 - 1, not {2**63}"),
    (["--threads", "100000"], "--threads must be from 1 to 1024, not 100000"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_exit_2_with_one_sentence(flags, fragment, capsys):
    try:
        code = cli.main(["train", "--dry-run", *flags])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    assert_one_sentence_error(capsys.readouterr().err, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["test", "r", "--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    (["predict", "r", "a.png", "--top", "0"], "argument --top: must be at least 1, not 0"),
    (["report", "r", "--mistakes", "-5"], "argument --mistakes: must be at least 0, not -5"),
    (["bench", "--trials", "0"], "argument --trials: must be at least 1, not 0"),
    (["bench", "--accuracy-trials", "-1"], "argument --accuracy-trials: must be at least 0"),
    (["serve", "r", "--port", "99999"], "argument --port: must be from 1 to 65535, not 99999"),
    (["serve", "r", "--max-bytes", "0"], "argument --max-bytes: must be at least 1, not 0"),
    (["sweep", "--jobs", "0"], "argument --jobs: must be at least 1, not 0"),
    (["sweep", "--prune-startup", "-1"], "argument --prune-startup: must be at least 0"),
    (["sweep", "--heartbeat", "0.5"], "argument --heartbeat: must be a whole number, not '0.5'"),
])
def test_the_other_commands_refuse_a_bad_count_as_they_parse_it(args, fragment, capsys):
    # Before anything is loaded or written: no checkpoint named here exists.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert_one_sentence_error(capsys.readouterr().err, fragment)
    assert not any(Path().iterdir())


def test_the_python_api_checks_what_the_command_line_parses(capsys):
    with pytest.raises(UsageError, match="--batch-size must be at least 1, not 0"):
        torchmnist.evaluate("r", batch_size=0)
    with pytest.raises(UsageError, match="--exit-threshold must be above 0 and at most 1"):
        torchmnist.evaluate("r", exit_threshold=1.5)
    with pytest.raises(UsageError, match="--mistakes must not be negative, not -1"):
        torchmnist.report("r", mistakes=-1)
    with pytest.raises(UsageError, match="--mistakes must be a whole number, not 2.5"):
        torchmnist.report("r", mistakes=2.5)  # was a TypeError from slicing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_missing_cuda_is_a_usage_error(capsys):
    code, _, err = run_main(["train", "--dry-run", "--device", "cuda"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "CUDA is not available")


def test_with_json_stdout_holds_the_summary_alone(capsys):
    code, out, err = run_main(["train", "--dry-run", "--json", "--run-dir", "r"], capsys)
    assert code == 0
    assert len(out.splitlines()) == 1  # `torchmnist train --json | jq` needs nothing between
    summary = json.loads(out)
    assert "done: test accuracy" in err  # the lines for people went to stderr
    assert Path("r/train.log").read_text().count("done: test accuracy") == 1
    for key in ("test_accuracy", "test_loss", "epochs", "train_seconds", "run_dir", "checkpoint"):
        assert key in summary, key
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["checkpoint"] == os.path.join("r", "last.pt")
    saved = json.loads(open("r/config.json").read())
    assert saved["dry_run"] is True and saved["run_dir"] == "r"


def test_bench_with_json_prints_only_its_report_on_stdout(capsys):
    code, out, err = run_main(["bench", "--dry-run", "--json", "--steps", "2", "--trials", "1",
                               "--loaders", "tensor", "--accuracy-trials", "1"], capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 1
    report = json.loads(out)
    assert report["loaders"][0]["loader"] == "tensor"
    assert "hardware:" in err and "time to accuracy" in err
    # Counted as said: not "median of 1 trials", "over 1 seeds (1 epochs)".
    assert "median of 1 trial;" in err and "over 1 seed (1 epoch)" in err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("phase", [
    ["--loaders", "tensor", "--trials", "1000", "--steps", "20", "--accuracy-trials", "0"],
    ["--loaders", "", "--accuracy-trials", "1000"],
], ids=["throughput", "time-to-accuracy"])
def test_a_signal_during_a_benchmark_leaves_no_temporary_run_behind(phase, signum, tmp_path):
    """SIGTERM's default action ended a benchmark on the spot, its temporary run folder left
    in the temp directory; one during a time-to-accuracy run said to resume a checkpoint in a
    folder about to be removed. Ctrl-C was told as "interrupted" in one phase and as a stop
    in the other."""
    temp = tmp_path / "temp"
    temp.mkdir()

    def ours() -> list[Path]:  # (torch keeps a compiler cache there too)
        return [p for p in temp.iterdir() if not p.name.startswith("torchinductor")]

    process = start_until([*TORCHMNIST, "bench", "--dry-run", *phase], tmp_path,
                          lambda: any((p / ".torchmnist-run").exists() or (p / "run").exists()
                                      for p in ours()), env={"TMPDIR": str(temp)})
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert_one_sentence_error(err, f"stopped: {signal.Signals(signum).name}; the benchmark's "
                              "runs were temporary, and nothing was kept")
    assert ours() == []


def test_a_stop_that_python_dropped_is_raised_at_the_next_check(monkeypatch):
    """A SIGTERM whose Stopped was raised inside an import lock's weakref callback was printed
    and dropped by Python, and the benchmark ran on for its 1,000 trials."""
    from torchmnist.runtime import signals

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda raised: dropped.append(raised.exc_type))

    class Dropping:
        def __del__(self):  # the handler runs here, where an exception is printed and dropped
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(signals.Stopped), signals.stop_by_unwinding():
        Dropping()
        assert dropped == [signals.Stopped]  # dropped, as in that run
        signals.raise_if_stopped()


def test_quiet_json_prints_the_summary_and_nothing_else(capsys):
    code, out, err = run_main(["train", "--dry-run", "--json", "--quiet", "--run-dir", "r"],
                              capsys)
    assert code == 0
    assert json.loads(out)["run_dir"] == "r"
    assert err == ""


def test_accuracy_is_printed_with_two_decimals(capsys):
    code, out, _ = run_main(["train", "--dry-run", "--run-dir", "r"], capsys)
    assert code == 0
    epoch_line = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    percent = epoch_line.split("(")[1].split("%")[0]
    assert len(percent.split(".")[1]) == 2, epoch_line


@pytest.mark.slow
def test_environment_switches_reach_torch(tmp_path):
    # Run in a fresh process: these switches are process-wide.
    script = (
        "import os, torch\n"
        "from torchmnist.commands import cli\n"
        "assert cli.main(['train', '--dry-run', '--deterministic', '--threads', '1',"
        " '--cuda-launch-blocking', '--run-dir', 'r']) == 0\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),"
        " os.environ.get('CUDA_LAUNCH_BLOCKING'), os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True 1 1 :4096:8"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_progress_shows_in_a_terminal_that_reports_no_size(tmp_path):
    """A fresh pseudo-terminal says it is 0x0 (as `script -c` and some CI runners give); the
    progress bar must still be drawn there, not hidden below a screen of 0 rows."""
    import pty

    leader, follower = pty.openpty()
    assert os.get_terminal_size(follower) == (0, 0)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([sys.executable, "-m", "torchmnist", "train", "--dry-run",
                                "--run-dir", str(tmp_path / "r")], cwd=tmp_path, env=env,
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "epoch 1/1: " in text and "%|" in text  # tqdm's bar: "epoch 1/1:  50%|#####  |"
    assert "done: test accuracy" in text


def test_the_first_lines_show_the_parameters_and_only_the_settings_changed(capsys):
    code, out, _ = run_main(["train", "--dry-run", "--recipe", "fast", "--lr", "0.2",
                             "--run-dir", "r"], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("model: "))
    assert line == ("model: 27,418 parameters; settings: the fast recipe's, except lr 0.2 (all "
                    f"in {os.path.join('r', 'config.json')})")
    assert json.loads(Path("r/config.json").read_text())["lr"] == 0.2


def test_each_epoch_keeps_a_line_with_losses_accuracy_time_and_rate(capsys):
    code, out, _ = run_main(["train", "--dry-run", "--epochs", "2", "--val-size", "100",
                             "--run-dir", "r"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("epoch ") and "/2 step" in line]
    assert len(lines) == 2
    metrics = [r for r in map(json.loads, Path("r/metrics.jsonl").read_text().splitlines())
               if r["kind"] == "epoch"]
    for line, record in zip(lines, metrics, strict=True):
        assert (f"train loss {record['train_loss']:.4f}, accuracy "
                f"{100 * record['train_accuracy']:.2f}%; ") in line
        assert f"validation loss {record['val_loss']:.4f}, accuracy" in line
        assert "; epoch " in line and f" s, lr {record['lr']:.4g}, " in line


def test_the_largest_seed_trains_and_resumes(tmp_path, capsys):
    seed = str(2**63 - 1)  # every generator the run seeds takes it, and the per-epoch orders
    code, _, err = run_main(["train", "--dry-run", "--seed", seed, "--epochs", "0.5",
                             "--run-dir", "r", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_main(["train", "--resume", "r", "--epochs", "1", "--quiet"], capsys)
    assert code == 0, err
    assert read_metrics(tmp_path / "r")[-1]["epoch"] == 1
