"""The one configuration schema from Python and from files: recipes apply as on the CLI,
every config is checked when it is made, and --config files are read strictly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_one_sentence_error, last_json, run_main

import torchmnist
from torchmnist import config
from torchmnist.commands import cli
from torchmnist.errors import UsageError
from torchmnist.storage import rundir


def test_a_recipe_named_in_python_applies_as_on_the_cli():
    fast = torchmnist.TrainConfig(recipe="fast")
    assert (fast.model, fast.lr, fast.scheduler) == ("fast", 0.15, "onecycle")
    assert fast == config.resolve({"recipe": "fast"})  # the CLI's path
    assert torchmnist.TrainConfig(recipe="fast", lr=0.3).lr == 0.3  # given values win
    fashion = torchmnist.TrainConfig(recipe="best", dataset="fashion-mnist")
    assert (fashion.augment, fashion.epochs) == ("translate", 45)
    assert torchmnist.TrainConfig().model == "guide"


def test_a_dry_run_is_one_epoch_in_python_too():
    assert torchmnist.TrainConfig(dry_run=True).epochs == 1
    assert torchmnist.TrainConfig(dry_run=True, epochs=3).epochs == 3


@pytest.mark.parametrize("values, sentence", [
    ({"lr": -1}, "--lr must be positive, not -1"),
    ({"recipe": "quick"}, "unknown recipe 'quick'"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"momentum": float("nan")}, "--momentum must be a finite number"),
    # Wrongly typed values, named as a config file's are (they were TypeErrors from deep in).
    ({"lr": "abc"}, "lr must be a number, not 'abc'"),
    ({"seed": 1.5}, "seed must be a whole number, not 1.5"),
    ({"batch_size": None}, "batch_size must be a number, not None"),
    ({"nesterov": "yes"}, "nesterov must be true or false, not 'yes'"),
    # Checked here, where nothing runs: training once forked until memory ran out, and the
    # kernel killed other processes to make room.
    ({"loader": "dataloader", "num_workers": 100_000}, "--num-workers must be from 0 to 64"),
    # `--resume "$CKPT"` with CKPT unset started a fresh run, and `--init-from ""` trained from
    # scratch, without a word.
    ({"resume": ""}, "--resume was given an empty path: name a checkpoint or a run folder (or "
                     "give --resume alone"),
    ({"init_from": " "}, "--init-from was given an empty path"),
])
def test_a_config_is_checked_when_it_is_made(values, sentence):
    with pytest.raises(UsageError, match=sentence.replace("(", r"\(")):
        torchmnist.TrainConfig(**values)


@pytest.mark.parametrize("name", ["run_dir", "data_dir", "resume", "init_from"])
def test_a_path_named_in_another_encoding_is_refused_and_shown_escaped(name):
    """A folder named in Latin-1 reaches Python as "runs/x\udcff"; train.log's first line
    ended the run in UnicodeEncodeError, with a traceback."""
    with pytest.raises(UsageError) as caught:
        torchmnist.TrainConfig(**{name: "runs/x\udcff"})
    assert str(caught.value) == (f"--{name.replace('_', '-')} runs/x\\xff is not valid UTF-8, "
                                 "so it cannot be written to train.log and config.json; "
                                 "rename it")


def test_a_path_with_a_control_character_is_refused_and_shown_escaped():
    """`--run-dir $'runs/a\nb'` printed its last line as "checkpoint runs/a" and "b/last.pt"."""
    with pytest.raises(UsageError) as caught:
        torchmnist.TrainConfig(run_dir="runs/a\nb")
    assert str(caught.value).startswith("--run-dir runs/a\\nb holds a control character")
    assert torchmnist.TrainConfig(run_dir="runs/é and spaces").run_dir == "runs/é and spaces"


def test_an_empty_resume_or_init_path_saved_by_an_older_run_still_means_none():
    """They were taken as unset before they were refused; a checkpoint that saved one must
    still resume and test."""
    saved = config.checked({"init_from": "", "resume": " ", "lr": 0.1})
    assert saved == {"init_from": None, "resume": None, "lr": 0.1}
    made = torchmnist.TrainConfig(**{**saved, "resume": "r"})
    assert (made.init_from, made.resume) == (None, "r")


def test_paths_and_text_numbers_from_python_are_taken_as_a_config_file_takes_them(tmp_path):
    made = torchmnist.TrainConfig(run_dir=tmp_path / "run", data_dir=tmp_path, epochs="2")
    assert (made.run_dir, made.data_dir, made.epochs) == (str(tmp_path / "run"), str(tmp_path), 2)
    assert json.loads(json.dumps(made.to_dict())) == made.to_dict()  # config.json as it is


def test_numpy_numbers_from_python_are_taken_as_python_numbers():
    """A sweep written with np.arange or np.logspace gives numpy scalars: epochs=np.int64(3)
    was refused as "epochs must be a number", and a float32 lr was kept as numpy's own type."""
    made = torchmnist.TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), momentum=np.array(0.8),
                                  nesterov=np.bool_(True))
    assert (made.epochs, made.lr, made.momentum, made.nesterov) == (3, 0.5, 0.8, True)
    assert [type(v) for v in (made.epochs, made.lr, made.momentum, made.nesterov)] == \
        [int, float, float, bool]
    assert json.loads(json.dumps(made.to_dict())) == made.to_dict()
    with pytest.raises(UsageError, match=r"epochs must be a number, not array\(\[3\]\)"):
        torchmnist.TrainConfig(epochs=np.array([3]))  # an array is not one number


def test_a_home_folder_in_a_config_file_is_the_users_home(tmp_path, capsys, monkeypatch):
    """No shell expands "~" in a config file: run_dir = "~/runs/a" made a folder named "~" in
    the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "c.toml").write_text('run_dir = "~/runs/a"\ndry_run = true\n')
    code, _, err = run_main(["train", "--config", "c.toml"], capsys)
    assert code == 0, err
    assert rundir.is_run(tmp_path / "home" / "runs" / "a")
    assert not (tmp_path / "~").exists()
    config_made = torchmnist.TrainConfig(data_dir="~/data", init_from="~/w.pt", resume="~/r")
    assert (config_made.data_dir, config_made.init_from, config_made.resume) == (
        str(tmp_path / "home" / "data"), str(tmp_path / "home" / "w.pt"),
        str(tmp_path / "home" / "r"))


def test_train_takes_a_config_and_says_how_to_make_one_from_a_dict():
    with pytest.raises(UsageError, match=r"train takes a TrainConfig, not a dict; "
                                         r"TrainConfig\(\*\*settings\) makes one"):
        torchmnist.train({"dry_run": True})


def test_a_changed_copy_is_checked_and_keeps_the_rest():
    fast = torchmnist.TrainConfig(recipe="fast")
    assert dataclasses.replace(fast, epochs=2).lr == 0.15
    with pytest.raises(UsageError, match="--epochs must be positive"):
        dataclasses.replace(fast, epochs=0)


def test_a_resumed_config_takes_plain_defaults_for_keys_its_checkpoint_lacks():
    saved = torchmnist.TrainConfig(recipe="fast-gpu").to_dict()
    del saved["cuda_graph"]  # written before the setting existed, when runs were eager
    assert config.resolve({}, saved=saved).cuda_graph is False


# ---- --config ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("c.toml", 'recipe = "fast"\nlr = 0.2\neval_interval = 2\n'),
    ("c.json", '{"recipe": "fast", "lr": 0.2, "eval_interval": "2"}'),
    ("c.yaml", "recipe: fast\nlr: 0.2\neval_interval: 2\n"),
])
def test_config_files_set_values_and_flags_win(name, text, tmp_path):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    values = config.read_config_file(tmp_path / name)
    assert values == {"recipe": "fast", "lr": 0.2, "eval_interval": "2"}


def test_train_with_a_config_file_and_a_flag(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('recipe = "fast"\nlr = 0.2\ndry_run = true\n')
    code, out, err = run_main(["train", "--config", "c.toml", "--lr", "0.1", "--run-dir", "r",
                               "--json"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["recipe"], saved["lr"], saved["model"]) == ("fast", 0.1, "fast")
    assert last_json(out)["recipe"] == "fast"


def test_a_gpu_by_index_is_explained_wherever_it_is_asked_for(tmp_path, capsys):
    """--device cuda:1 was "invalid choice (choose from auto, cpu, cuda, mps)", which did not
    say how training picks another GPU than the first."""
    hint = ("training runs on --device cuda, the first GPU that CUDA_VISIBLE_DEVICES leaves "
            "visible: to train on cuda:1, run CUDA_VISIBLE_DEVICES=1 torchmnist train")
    for command in ("train", "bench", "sweep"):  # each parses the train flags
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--dry-run", "--device", "cuda:1"])
        assert exit_info.value.code == 2
        assert_one_sentence_error(capsys.readouterr().err, f"argument --device: {hint}")
    (tmp_path / "c.toml").write_text('device = "cuda:1"\n')
    code, _, err = run_main(["train", "--dry-run", "--config", "c.toml"], capsys)
    assert code == 2
    assert_one_sentence_error(err, f"--device cuda:1: {hint}")
    with pytest.raises(UsageError, match="to train on cuda:1, run CUDA_VISIBLE_DEVICES=1"):
        config.TrainConfig(device="cuda:1")
    # Any other name is still told the choices.
    with pytest.raises(SystemExit):
        cli.main(["train", "--dry-run", "--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_a_setting_that_does_nothing_in_this_run_is_said_to(capsys):
    """--momentum with Adam, --gamma without the step schedule: taken without a word, so a
    learner believed they had set them. Not refused: a sweep may search one beside the
    setting that enables it."""
    code, out, err = run_main(["train", "--dry-run", "--run-dir", "r", "--optimizer", "adam",
                               "--momentum", "0.9", "--nesterov", "--gamma", "0.5",
                               "--exit-threshold", "0.5"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: --momentum 0.9 does nothing here: it is for --optimizer sgd, and this run has "
        "--optimizer adam",
        "note: --nesterov does nothing here: it is for --optimizer sgd, and this run has "
        "--optimizer adam",
        "note: --gamma 0.5 does nothing here: it is for --scheduler step, and this run has "
        "--scheduler none",
        "note: --exit-threshold 0.5 does nothing here: it is for --model early-exit, and this "
        "run has --model guide"]
    assert "\n".join(notes) in open("r/train.log").read()
    # What a recipe sets, and what acts, says nothing: fast's momentum beside AdamW, --gamma
    # with the step schedule, a warm-up with onecycle.
    for flags in (["--recipe", "fast", "--optimizer", "adamw"],
                  ["--scheduler", "step", "--gamma", "0.5"],
                  ["--scheduler", "onecycle", "--warmup", "0.3"]):
        code, out, err = run_main(["train", "--dry-run", "--run-dir", "q", *flags], capsys)
        assert code == 0, err
        assert "note: " not in out, flags
        shutil.rmtree("q")
    code, out, _ = run_main(["train", "--dry-run", "--run-dir", "q", "--momentum", "0",
                             "--nesterov"], capsys)
    assert "note: --nesterov does nothing here: it needs --momentum above 0" in out


def test_a_yaml_key_may_override_one_merged_in(tmp_path):
    """Not a repeat: YAML's `<<` merges a mapping in, and the keys beside it win."""
    text = "quick: &q {lr: 0.1, momentum: 0.5}\nrun:\n  <<: *q\n  lr: 0.2\n"
    (tmp_path / "m.yaml").write_text(text)
    assert config.read_structured_file(tmp_path / "m.yaml", "--config")["run"] == {
        "lr": 0.2, "momentum": 0.5}


def test_a_runs_own_config_json_reproduces_it_in_a_new_folder(tmp_path, capsys):
    assert run_main(["train", "--dry-run", "--recipe", "fast", "--run-dir", "a"], capsys)[0] == 0
    assert rundir.is_run(tmp_path / "a")
    code, _, err = run_main(["train", "--config", "a/config.json", "--run-dir", "b"], capsys)
    assert code == 0, err
    a, b = (json.loads((tmp_path / n / "config.json").read_text()) for n in "ab")
    assert {k: v for k, v in a.items() if k != "run_dir"} == \
        {k: v for k, v in b.items() if k != "run_dir"}


@pytest.mark.parametrize("name, text, fragment", [
    ("c.json", '{"lrr": 1, "foo": 2}', "has unknown settings: foo, lrr"),
    ("c.toml", 'lr = "fast"\n', "lr must be a number, not 'fast'"),
    ("c.toml", "nesterov = 1\n", "nesterov must be true or false, not 1"),
    ("c.toml", "batch_size = 6.5\n", "batch_size must be a whole number, not 6.5"),
    ("c.toml", "lr = [\n", "is not valid TOML"),
    ("c.json", "[1, 2]", "must hold a table of settings, not a list"),
    ("c.ini", "lr=1", "must end in .toml, .yaml, .yml or .json"),
    # TOML refuses a repeated key; JSON and YAML kept the last one without a word.
    ("c.toml", "lr = 0.1\nlr = 0.2\n", "is not valid TOML: Cannot overwrite a value"),
    ("c.json", '{"lr": 0.1, "lr": 0.2}', "is not valid JSON: 'lr' is given twice"),
    ("c.yaml", "lr: 0.1\nlr: 0.2\n", "is not valid YAML: 'lr' is given twice"),
])
def test_bad_config_files_exit_2_naming_the_problem(name, text, fragment, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    code, _, err = run_main(["train", "--config", name, "--dry-run", "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, name, fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("given, fragment", [
    ("/dev/zero", "cannot read --config /dev/zero: it is not a regular file"),
    ("pipe.yaml", "cannot read --config pipe.yaml: it is not a regular file"),
    ("folder.yaml", "cannot read --config folder.yaml: it is a folder"),
    ("big.yaml", "--config big.yaml is 10,485,761 bytes, more than a settings file holds"),
], ids=["device", "pipe", "folder", "too-big"])
def test_a_config_that_is_no_settings_file_is_refused_without_reading_it(given, fragment,
                                                                         tmp_path, capsys):
    # /dev/zero was read until memory ran out (12 GB in 20 s), and a pipe waited on forever.
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "big.yaml").write_bytes(b" " * (10 * 1024 * 1024 + 1))
    code, _, err = run_main(["train", "--config", given, "--dry-run", "--run-dir", "r"], capsys)
    assert code == 2
    assert_one_sentence_error(err, fragment)


def test_a_yaml_alias_bomb_is_refused_in_a_short_sentence(tmp_path, capsys):
    # Eight nested aliases under lr, the deepest alone 9**8 (43 million) strings. Its whole
    # repr, in the message, took 23 s and 1.5 GB, and was as long as the list.
    pytest.importorskip("yaml")
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    text = "lr: [" + ", ".join(line.split(": ", 1)[1] for line in lines) + "]\n"
    (tmp_path / "bomb.yaml").write_text(text)
    code, _, err = run_main(["train", "--config", "bomb.yaml", "--dry-run"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "lr must be a number, not [['x', 'x', 'x', 'x', ...]")
    assert len(err) < 400


def test_version_names_torchmnist_and_torch(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_main(["--version"], capsys)
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"torchmnist {torchmnist.__version__} (torch ")


def _fresh_python(script: str) -> subprocess.CompletedProcess:
    """`script` run in a new interpreter, where nothing is imported yet; it must succeed."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_the_metadata_has_one_version_and_the_spdx_license():
    import importlib.metadata
    from pathlib import Path

    metadata = importlib.metadata.metadata("torchmnist")
    assert metadata["Version"] == torchmnist.__version__  # written in __init__.py alone
    root = Path(__file__).resolve().parents[1]
    try:
        import tomllib
    except ImportError:  # Python 3.10: the package's own dependency
        import tomli as tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert metadata["License-Expression"] == "MIT"
    assert "LICENSE" in (metadata.get_all("License-File") or [])
    assert "MIT License" in (root / "LICENSE").read_text()
    assert (Path(torchmnist.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"],
                                  ["predict", "--help"]], ids=" ".join)
def test_version_and_help_answer_without_importing_torch(args):
    """`import torchmnist` imported torch (about 1.7 s) for every command, --version and
    --help included; the calls that need it are now imported when first used."""
    done = _fresh_python("import sys\n"
                         "from torchmnist.commands import cli\n"
                         "try:\n"
                         f"    cli.main({args!r})\n"
                         "except SystemExit as stop:\n"
                         "    assert stop.code == 0, stop.code\n"
                         "print('torch' in sys.modules, file=sys.stderr)\n")
    assert done.stderr.strip().splitlines()[-1] == "False"
    assert done.stdout  # the version or the help was printed


def test_the_package_gives_its_calls_when_they_are_first_used():
    done = _fresh_python("import sys, torchmnist\n"
                         "before = 'torch' in sys.modules\n"
                         "from torchmnist import predict, train\n"
                         "print(before, 'torch' in sys.modules, train is torchmnist.train,\n"
                         "      sorted(set(torchmnist.__all__) - set(dir(torchmnist))))\n")
    assert done.stdout.strip() == "False True True []"
    with pytest.raises(AttributeError, match="module 'torchmnist' has no attribute 'trian'"):
        torchmnist.trian  # noqa: B018


def test_the_best_recipe_chooses_on_a_validation_split():
    assert torchmnist.TrainConfig(recipe="best").val_size == 5000
    # Fashion-MNIST keeps the values it was measured with until it is measured with a split.
    assert torchmnist.TrainConfig(recipe="best", dataset="fashion-mnist").val_size == 0
    assert torchmnist.TrainConfig(recipe="best", dry_run=True).val_size == 256  # of 1,024


def test_the_lists_that_must_agree_do():
    from torchmnist import data, models
    from torchmnist.data import preprocess

    assert tuple(models.MODELS) == config.MODELS
    assert tuple(data.DATASETS) == config.DATASETS
    assert set(preprocess.STYLES) == set(config.DATASETS)
    assert set(config.RECIPE_NAMES) == set(config.RECIPES)
    assert (data.FOLDER_PREFIX, data.OWN_PREFIX) == (config.FOLDER_PREFIX, config.OWN_PREFIX)


def test_train_help_is_grouped_and_every_flag_has_help(capsys):
    from torchmnist.commands import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":")
                and not line.startswith(" ") and line[:-1] in config.GROUPS]
    assert headings == list(config.GROUPS)
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings:
            assert action.help, action.option_strings
    # Each field's flag sits in its field's section.
    section = {a.dest: g.title for g in train._action_groups for a in g._group_actions}
    for f in dataclasses.fields(config.TrainConfig):
        assert section[f.name] == f.metadata["group"], f.name


def test_a_yes_no_setting_must_say_how_its_flag_works():
    with pytest.raises(TypeError, match="switch='flag' or switch='on-off'"):
        config._opt(False, "a setting", group="logging")
    assert config._opt(False, "a setting", group="logging", switch="flag").metadata["switch"]
