"""torchmnist sweep: Optuna studies over train flags, on SQLite and on a real PostgreSQL server.

The trials are dry runs (1,024 synthetic images), so a whole sweep takes seconds; what is
checked is the machinery: search specs, pruning, workers sharing a study, a killed sweep
resuming, the best settings written as a config file train reads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TORCHMNIST, assert_one_sentence_error, run_main, start_until

from torchmnist import config
from torchmnist.commands import sweep

pytest.importorskip("optuna")


def _sweep(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCHMNIST_DATA_DIR"}
    return subprocess.run([sys.executable, "-m", "torchmnist", "sweep", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _summary(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- search specs ----------------------------------------------------------------------------

def test_param_specs_become_optuna_ranges_and_choices():
    assert sweep.parse_param("lr=log:1e-3:1") == sweep.Param("lr", "log", 1e-3, 1.0)
    assert sweep.parse_param("epochs=int:1:3") == sweep.Param("epochs", "int", 1, 3)
    assert sweep.parse_param("batch-size=choice:64,128").choices == (64, 128)
    assert sweep.parse_param("nesterov=choice:true,false").choices == (True, False)
    assert sweep.parse_param("augment=choice:none,translate").choices == ("none", "translate")


@pytest.mark.parametrize(("spec", "fragment"), [
    ("lr=log:0:1", "--param lr: a log range needs LOW > 0"),
    ("lr=log:1:0.1", "--param lr: the range needs finite LOW < HIGH"),
    ("lr=normal:0:1", "--param lr: the kind 'normal' is not one of"),
    ("lr=float:a:1", "--param lr: 'float:a:1' holds something that is not a number"),
    ("lr=float:-1:1", "--param lr: --lr must be positive"),
    ("batch_size=choice:64,big", "--param batch_size: batch_size must be a number"),
    ("model=choice:guide,resnet", "--param model: --model must be one of"),
    ("colour=choice:red", "--param colour: 'colour' is not a train setting"),
    ("run_dir=choice:a", "--param run_dir: 'run_dir' is not a train setting"),
    ("lr", "--param 'lr' must look like lr=log:1e-3:1"),
    ("lr=choice:", "--param lr: choice needs at least one value"),
    ("lr=log:1", "--param lr: log needs LOW:HIGH"),
])
def test_a_bad_search_spec_exits_2_naming_the_parameter(spec, fragment, capsys):
    code, _, err = run_main(["sweep", "--dry-run", "--param", spec, "--run-dir", "s"], capsys)
    assert code == 2
    assert_one_sentence_error(err, fragment)
    assert err.startswith("torchmnist: error: " + fragment)  # named once, not twice
    assert not Path("s").exists()


def test_a_space_file_and_the_sweep_options_are_checked(capsys):
    Path("space.toml").write_text('[params]\nlr = "log:1e-3:1"\nbatch_size = [64, 128]\n')
    space = sweep.read_space("space.toml")
    assert [p.describe() for p in space] == ["lr log [0.001, 1.0]", "batch_size in {64, 128}"]
    Path("bad.toml").write_text('momentum = "float:0:2:3"\n')
    Path("list.toml").write_text('batch_size = [64, "many"]\n')
    for args, fragment in [
        (["--space", "bad.toml"], "--space bad.toml: momentum: float needs LOW:HIGH"),
        # A bad choice in a list is named with its file, as one in choice:A,B is.
        (["--space", "list.toml"], "--space list.toml: batch_size: batch_size must be a "
                                   "number, not 'many'"),
        ([], "a sweep needs something to search"),
        (["--space", "space.toml", "--sampler", "grid"],
         "--sampler grid needs values to enumerate: lr is a continuous range"),
        (["--space", "space.toml", "--objective", "time"], "--objective time needs "
                                                           "--target-accuracy"),
        (["--space", "space.toml", "--objective", "val_accuracy"], "needs a validation set"),
        (["--space", "space.toml", "--param", "lr=log:1e-2:1"], "--param lr is given more "
                                                                 "than once"),
        (["--space", "space.toml", "--lr", "-1"], "--lr must be positive"),
        # The name heads best.toml as a comment: a newline would start a line of settings.
        (["--space", "space.toml", "--study-name", "mine\nlr = 100"],
         "--study-name must be one line of printable text, not 'mine\\nlr = 100'"),
    ]:
        code, _, err = run_main(["sweep", "--dry-run", "--run-dir", "s", *args], capsys)
        assert code == 2, args
        assert_one_sentence_error(err, fragment)
        assert err.count("bad.toml") <= 1, err


def test_a_folder_that_is_not_a_sweeps_is_refused_untouched(capsys):
    Path("project").mkdir()
    Path("project/history.png").write_bytes(b"someone's own figure")
    code, _, err = run_main(["sweep", "--dry-run", "--param", "lr=choice:0.01", "--trials", "1",
                             "--run-dir", "project"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "project", "not a torchmnist sweep folder")
    assert [p.name for p in Path("project").iterdir()] == ["history.png"]
    assert Path("project/history.png").read_bytes() == b"someone's own figure"


def test_a_sweep_file_that_is_a_link_is_refused_untouched(capsys):
    Path("s").mkdir()
    Path("s/.torchmnist-sweep").touch()
    Path("mine.png").write_bytes(b"my own figure")
    Path("s/history.png").symlink_to(Path("mine.png").resolve())
    code, _, err = run_main(["sweep", "--dry-run", "--param", "lr=choice:0.01", "--trials", "1",
                             "--run-dir", "s"], capsys)
    assert code == 2
    assert_one_sentence_error(err, "s/history.png is a symbolic link, not a plain file",
                              "nothing in s was changed")
    assert sorted(p.name for p in Path("s").iterdir()) == [".torchmnist-sweep", "history.png"]
    assert Path("mine.png").read_bytes() == b"my own figure"


# ---- on SQLite -------------------------------------------------------------------------------

FLAGS = ["--dry-run", "--epochs", "3", "--param", "lr=choice:0.00001,0.05", "--param",
         "momentum=choice:0,0.5", "--prune-startup", "1", "--json"]


@pytest.mark.slow
def test_two_jobs_share_a_sqlite_study_prune_and_write_the_best_settings(tmp_path, capsys):
    summary = _summary(_sweep(tmp_path, *FLAGS, "--trials", "8", "--jobs", "2", "--run-dir",
                              "s"))
    states = summary["states"]
    # (Which trials are pruned depends on which finish first, here: the test below counts
    # them where the order is fixed.)
    assert states.get("complete", 0) + states.get("pruned", 0) == 8
    assert summary["best"]["params"]["lr"] == 0.05
    folders = sorted(p.name for p in (tmp_path / "s").glob("trial-*"))
    assert folders == [f"trial-{i:04d}" for i in range(8)]
    assert all((tmp_path / "s" / f / "last.pt").exists() for f in folders)
    for name in ("study.db", "best.toml", "history.png", "importances.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0, name
    # The best settings are a config file train reads, with the sweep's train flags in it.
    best = config.read_config_file(tmp_path / "s/best.toml")
    assert best["lr"] == 0.05 and best["dry_run"] is True and best["epochs"] == 3
    os.chdir(tmp_path)
    code, _, err = run_main(["train", "--config", "s/best.toml", "--run-dir", "again"], capsys)
    assert code == 0, err


def test_a_hopeless_trial_is_pruned_after_its_first_test(capsys):
    # One worker, in this process: the same proposals in the same order every time.
    code, out, err = run_main(["sweep", *FLAGS, "--trials", "6", "--run-dir", "p"], capsys)
    assert code == 0, err
    rows = [line.split(" | ") for line in err.splitlines() if line.startswith("| ")][1:]
    hopeless = [row for row in rows if row[2] == "1e-05"]  # lr 1e-5 learns nothing in an epoch
    assert hopeless and all(row[1] == "pruned after test 1" for row in hopeless), err
    assert json.loads(out.strip().splitlines()[-1])["states"]["complete"] >= 1


def test_a_grid_over_time_to_target_ends_with_the_grid_and_writes_json(capsys):
    code, out, err = run_main(["sweep", "--dry-run", "--epochs", "2", "--param",
                               "batch_size=choice:32,64", "--sampler", "grid", "--trials", "5",
                               "--objective", "time", "--target-accuracy", "0.3",
                               "--best-format", "json", "--run-dir", "g", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trials"] == 2  # the grid is done before --trials
    assert (summary["objective"], summary["direction"]) == ("target_seconds", "minimize")
    assert {t for t in summary["states"]} == {"complete"}
    best = json.loads(Path("g/best.json").read_text())
    assert best["batch_size"] in (32, 64) and best["target_accuracy"] == 0.3
    assert config.read_config_file("g/best.json")["batch_size"] == best["batch_size"]


def test_a_random_search_writes_yaml_and_opens_its_storage_once(capsys, monkeypatch):
    opened = []
    real = sweep._storage
    monkeypatch.setattr(sweep, "_storage", lambda s: opened.append(s) or real(s))
    code, out, err = run_main(["sweep", "--dry-run", "--epochs", "1", "--param",
                               "lr=log:0.001:0.1", "--param", "momentum=float:0:0.9",
                               "--sampler", "random", "--trials", "3", "--best-format", "yaml",
                               "--run-dir", "r", "--json"], capsys)
    assert code == 0, err
    assert len(opened) == 1  # one database engine for the whole sweep in this process
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trials"] == 3 and summary["states"] == {"complete": 3}
    best = config.read_config_file("r/best.yaml")
    assert best["lr"] == summary["best"]["params"]["lr"]
    assert 0.001 <= best["lr"] <= 0.1 and 0 <= best["momentum"] <= 0.9
    assert best["dry_run"] is True and best["epochs"] == 1
    code, _, err = run_main(["train", "--config", "r/best.yaml", "--run-dir", "again"], capsys)
    assert code == 0, err


def test_a_finished_sweep_run_again_adds_nothing_and_more_trials_extend_it(capsys):
    def sweep_of(trials: str) -> dict:  # in this process: one worker needs no other
        code, out, err = run_main(["sweep", *FLAGS, "--epochs", "1", "--trials", trials,
                                   "--run-dir", "s"], capsys)
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])

    assert sweep_of("3")["trials"] == sweep_of("3")["trials"] == 3
    assert sweep_of("5")["trials"] == 5


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_reruns_its_interrupted_trials_from_their_checkpoints(
        tmp_path):
    flags = ["--dry-run", "--epochs", "8", "--save-interval", "4", "--param",
             "lr=log:1e-3:0.5", "--trials", "4", "--jobs", "2", "--heartbeat", "1",
             "--pruner", "none", "--run-dir", "s"]
    job = start_until([*TORCHMNIST, "sweep", *flags], tmp_path,
                      (tmp_path / "s/trial-0002/last.pt").exists,  # trial 2 is under way
                      stderr=subprocess.STDOUT, start_new_session=True)
    os.killpg(job.pid, signal.SIGKILL)  # the sweep and both workers, at once
    job.communicate()
    time.sleep(3.5)  # past 3 heartbeats: the interrupted trials are now stale
    result = _sweep(tmp_path, *flags, "--json")
    summary = _summary(result)
    told = f"{summary}\n{result.stderr}"
    assert summary["states"]["fail"] >= 1, told  # what the kill interrupted...
    assert summary["states"]["complete"] == 4, told  # ...run again: 4 trials in the end
    assert "(resuming " in result.stderr, told  # from the checkpoint in the trial's folder
    # A trial run again goes on in the folder of the one it repeats: no folder of its own.
    folders = list((tmp_path / "s").glob("trial-*"))
    assert len(folders) == summary["trials"] - summary["states"]["fail"], told
    assert all((f / "last.pt").exists() for f in folders), told


@pytest.mark.slow
def test_a_diverging_trial_fails_in_one_line_and_the_sweep_goes_on(tmp_path):
    result = _sweep(tmp_path, "--dry-run", "--param", "lr=log:1000:10000", "--trials", "2",
                    "--pruner", "none", "--run-dir", "s", "--json")
    summary = _summary(result)
    assert summary["states"] == {"fail": 2} and summary["best"] is None
    said = result.stderr
    assert said.count(": failed: training diverged: the loss or the weights became NaN") == 2
    # Optuna's own record of the failure (a traceback, then "failed with value None") is left
    # out: the line above says it.
    assert "Traceback" not in said and "failed with value" not in said, said
    assert "plots skipped: no trial has completed" in said


@pytest.mark.slow
def test_a_stopped_sweep_goes_on_from_the_trial_it_stopped_in(tmp_path):
    flags = ["--dry-run", "--epochs", "30", "--save-interval", "3", "--param",
             "lr=log:1e-3:0.5", "--trials", "2", "--pruner", "none", "--run-dir", "s"]
    job = start_until([*TORCHMNIST, "sweep", *flags], tmp_path,
                      (tmp_path / "s/trial-0000/last.pt").exists)  # trial 0 is under way
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr
    assert_one_sentence_error(stderr, "SIGTERM", "trial 0", "checkpoint is saved",
                              "run the same sweep command")

    result = _sweep(tmp_path, *flags, "--json")
    summary = _summary(result)
    # Queued when it stopped, trial 0 goes on first, as trial 1, in its own folder.
    assert "(resuming s/trial-0000) [worker 0]" in result.stderr.splitlines()[2]
    assert summary["states"] == {"complete": 2, "fail": 1}
    assert "| 0 | fail, run again as 1 |" in result.stderr
    assert sorted(p.name for p in (tmp_path / "s").glob("trial-*")) == ["trial-0000",
                                                                        "trial-0002"]


def _torchmnist_processes_in(folder: Path) -> list[str]:
    """The torchmnist processes whose working folder is `folder` (Linux's /proc)."""
    found = []
    for process in Path("/proc").iterdir():
        try:
            if (process.name.isdigit() and Path(os.readlink(process / "cwd")) == folder
                    and b"torchmnist" in (process / "cmdline").read_bytes()):
                found.append((process / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


# Two workers, each with a trial long enough to be stopped once it has saved a checkpoint.
TWO_WORKERS = ["--dry-run", "--epochs", "30", "--save-interval", "3", "--param",
               "lr=log:1e-3:0.5", "--trials", "2", "--jobs", "2", "--pruner", "none",
               "--run-dir", "s"]


def _two_workers_training(cwd: Path) -> subprocess.Popen:
    """A 2-worker sweep in its own process group, once both its trials have a checkpoint."""
    return start_until([*TORCHMNIST, "sweep", *TWO_WORKERS], cwd,
                       lambda: all((cwd / f"s/trial-000{i}/last.pt").exists() for i in (0, 1)),
                       start_new_session=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux's /proc")
def test_sigterm_to_a_sweep_with_workers_stops_them_and_queues_their_trials(tmp_path):
    job = _two_workers_training(tmp_path)
    job.send_signal(signal.SIGTERM)  # to the sweep alone, as `timeout` or a scheduler sends it
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr
    # Told once, by the sweep, not also by each worker.
    assert [line for line in stderr.splitlines() if "torchmnist: stopped" in line] == [
        "torchmnist: stopped: SIGTERM: 2 of 2 sweep workers stopped, their trials queued "
        "again; run the same sweep command to go on"], stderr
    assert "Traceback" not in stderr
    assert _torchmnist_processes_in(tmp_path) == []  # no worker outlives the sweep

    result = _sweep(tmp_path, *TWO_WORKERS, "--json")
    summary = _summary(result)
    assert summary["states"] == {"complete": 2, "fail": 2}, result.stderr
    assert all(f"(resuming s/trial-000{i})" in result.stderr for i in (0, 1)), result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux's /proc")
def test_ctrl_c_in_a_terminal_stops_a_sweep_with_workers_once(tmp_path):
    # A terminal's Ctrl-C reaches every process of the group: the workers stop their trials
    # themselves, and the sweep's SIGTERM to them comes on top. Workers once died of that
    # second signal after their trial had stopped (exit -15), so their trials were not queued.
    import optuna

    job = _two_workers_training(tmp_path)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.startswith("torchmnist:")] == [
        "torchmnist: stopped: SIGINT: 2 of 2 sweep workers stopped, their trials queued "
        "again; run the same sweep command to go on"], stderr
    assert _torchmnist_processes_in(tmp_path) == []
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's/study.db'}")
    states = sorted(t.state.name for t in study.get_trials(deepcopy=False))
    assert states == ["FAIL", "FAIL", "WAITING", "WAITING"], states  # both queued again


# ---- on PostgreSQL, two workers started apart -------------------------------------------------

def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own in the test's temp dir, on a free localhost port."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (initdb, pg_ctl) is missing; .ci/run installs it")
        pytest.skip("needs PostgreSQL's initdb and pg_ctl (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg")
    # PostgreSQL refuses to run as root: then it runs as the postgres user, in a temporary
    # folder of its own that it can reach (pytest's are private to their owner).
    as_user = (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else [])
    folder = Path(tempfile.mkdtemp(prefix="torchmnist-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(folder / "db"), "-A", "trust", "-U",
                    "postgres"], check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(folder / "db"), "-l", str(folder / "log"), "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(folder / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_started_apart_share_one_study_on_postgresql(tmp_path, postgres):
    flags = ["--dry-run", "--epochs", "1", "--param", "lr=log:1e-3:0.5", "--trials", "6",
             "--storage", postgres, "--study-name", "shared", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "TORCHMNIST_DATA_DIR"}
    workers = [subprocess.Popen([sys.executable, "-m", "torchmnist", "sweep", *flags,
                                 "--run-dir", f"machine-{i}"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(s["storage"].startswith("postgresql://") for s in summaries)
    assert max(s["trials"] for s in summaries) >= 6
    # Each ran some of the study's trials, in its own folder; together, all of them.
    ran = [{int(p.name.split("-")[1]) for p in (tmp_path / f"machine-{i}").glob("trial-*")}
           for i in range(2)]
    assert ran[0] and ran[1] and not ran[0] & ran[1]
    assert len(ran[0] | ran[1]) >= 6
