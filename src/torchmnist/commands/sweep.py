"""`torchmnist sweep`: hyper-parameter search with Optuna over any `train` flag.

Each trial is an ordinary run folder (`SWEEP/trial-0007/`) trained by `training.train` with the
sweep's train flags plus the trial's parameters; after each test its accuracy goes to Optuna's
pruner. The study lives in a database (SQLite in the sweep folder, or a server that workers on
several machines share). `--jobs J` runs J worker processes here with cores / J torch threads
each. Trials send heartbeats, so one whose worker died is run again from its checkpoint. At
the end: the table of trials, best.toml for `train --config`, and Optuna's plots
(docs/cli.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from torchmnist import config as cfg
from torchmnist.errors import TorchMnistError, TrainingError, UsageError, counted
from torchmnist.runtime.signals import Stopped, StopSignals
from torchmnist.storage import rundir

KINDS = ("log", "float", "int", "choice")
OBJECTIVES = ("accuracy", "val_accuracy", "test_accuracy", "time")
SAMPLERS = ("tpe", "random", "grid")
BEST_FORMATS = ("toml", "json", "yaml")
# Train settings a trial's parameters may not touch: where a trial runs and what it prints are
# the sweep's to decide.
NOT_SWEPT = ("run_dir", "resume", "json", "quiet", "allow_new_world_size")


@dataclass(frozen=True)
class Param:
    """One searched setting: a range (log, float, int) or a list of choices."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} {self.kind} [{self.low}, {self.high}]"


def parse_param(text: str) -> Param:
    """`name=log:LOW:HIGH`, `name=float:LOW:HIGH`, `name=int:LOW:HIGH` or `name=choice:A,B,C`."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        raise UsageError(f"--param {text!r} must look like lr=log:1e-3:1 or "
                         "batch_size=choice:64,128")
    return _param(name, spec.strip(), f"--param {name}")


def _param(name: str, spec: Any, where: str) -> Param:
    if name not in cfg.field_names() or name in NOT_SWEPT:
        raise UsageError(f"{where}: {name!r} is not a train setting a sweep can search (the "
                         "settings are train's flags, e.g. lr, batch_size, momentum)")
    if isinstance(spec, list):  # a list in a space file: the choices
        try:
            choices = tuple(cfg.coerce(name, v) for v in spec)
        except UsageError as error:  # says which setting, not which file
            raise UsageError(f"{where}: {error}") from None
        return _checked(Param(name, "choice", choices=choices), where)
    if not isinstance(spec, str):
        raise UsageError(f"{where} must be text such as log:1e-3:1, or a list of choices")
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise UsageError(f"{where}: the kind {kind!r} is not one of {', '.join(KINDS)} "
                         "(e.g. log:1e-3:1, int:1:5, choice:64,128)")
    if kind == "choice":
        values = [v.strip() for v in rest.split(",") if v.strip()]
        if not values:
            raise UsageError(f"{where}: choice needs at least one value")
        try:
            choices = tuple(cfg.coerce(name, _text_value(name, v)) for v in values)
        except UsageError as error:  # says which setting, not where it was written
            raise UsageError(f"{where}: {error}") from None
        return _checked(Param(name, kind, choices=choices), where)
    bounds = rest.split(":")
    if len(bounds) != 2:
        raise UsageError(f"{where}: {kind} needs LOW:HIGH, as in {kind}:1:5")
    number = int if kind == "int" else float
    try:
        low, high = number(bounds[0]), number(bounds[1])
    except ValueError:
        raise UsageError(f"{where}: {spec!r} holds something that is not a number") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"{where}: the range needs finite LOW < HIGH, not {low} and {high}")
    if kind == "log" and low <= 0:
        raise UsageError(f"{where}: a log range needs LOW > 0, not {low}")
    return _checked(Param(name, kind, low, high), where)


def _text_value(name: str, text: str) -> Any:
    """A choice as typed: true/false for a yes/no setting, none for an unset one, else text."""
    default = cfg.plain_default(name)
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if default is None and text.lower() in ("none", "null"):
        return None
    return text


def _checked(param: Param, where: str) -> Param:
    """Refuse values the train command itself would refuse (lr -1, an unknown model)."""
    values = param.choices if param.kind == "choice" else (param.low, param.high)
    for value in values:
        try:
            cfg.resolve({param.name: value})
        except UsageError as error:
            raise UsageError(f"{where}: {error}") from None
        except TypeError:
            raise UsageError(f"{where}: {value!r} is not a value {param.name} takes") from None
    return param


def read_space(path: str | os.PathLike) -> list[Param]:
    """A search space file (TOML, YAML, JSON): setting -> spec ("log:1e-3:1") or a list of
    choices, maybe under a `params` table."""
    path = Path(path)
    values = cfg.read_structured_file(path, "--space")
    if isinstance(values, dict) and isinstance(values.get("params"), dict):
        values = values["params"]
    if not isinstance(values, dict) or not values:
        raise UsageError(f"--space {path} must hold a table of settings to search")
    return [_param(name, spec, f"--space {path}: {name}") for name, spec in values.items()]


@dataclass
class Sweep:
    """What `torchmnist sweep` was asked for."""

    space: list[Param]
    base: dict[str, Any]  # the train flags every trial gets
    folder: Path
    storage: str
    study_name: str
    trials: int = 20
    jobs: int = 1
    objective: str = "accuracy"
    sampler: str = "tpe"
    pruner: str = "median"
    prune_startup: int = 5
    best_format: str = "toml"
    heartbeat: int = 10
    json: bool = False
    quiet: bool = False

    @property
    def metric(self) -> str:  # the summary key the trials are scored on
        if self.objective == "time":
            return "target_seconds"
        if self.objective == "accuracy":
            return "val_accuracy" if self.base.get("val_size") else "test_accuracy"
        return self.objective

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == "time" else "maximize"


def build(options: dict[str, Any], base: dict[str, Any]) -> Sweep:
    """Check the options and the train flags; one sentence for anything wrong."""
    if "config" in base:  # the trials' settings from a file, flags win
        base = {**cfg.read_config_file(base.pop("config")), **base}
    space = [parse_param(p) for p in options.get("param", [])]
    if options.get("space"):
        space = read_space(options["space"]) + space
    if not space:
        raise UsageError("a sweep needs something to search: --param lr=log:1e-3:1 (repeat "
                         "it), or --space FILE")
    names = [p.name for p in space]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--param {twice[0]} is given more than once")
    objective = options.get("objective", "accuracy")
    if objective == "val_accuracy" and not base.get("val_size"):
        raise UsageError("--objective val_accuracy needs a validation set: pass --val-size N")
    if objective == "time" and base.get("target_accuracy") is None:
        raise UsageError("--objective time needs --target-accuracy A: the time to reach it is "
                         "what is minimised")
    if options.get("sampler") == "grid":
        ranges = [p.name for p in space if p.kind in ("log", "float")]
        if ranges:
            raise UsageError(f"--sampler grid needs values to enumerate: {ranges[0]} is a "
                             "continuous range; give it as choice:A,B,C or int:LOW:HIGH")
    cfg.resolve({k: v for k, v in base.items() if k not in NOT_SWEPT})  # the flags themselves
    folder = Path(options.get("run_dir") or Path("runs") / datetime.now().strftime(
        "sweep-%Y%m%d-%H%M%S"))
    storage = options.get("storage") or f"sqlite:///{(folder / 'study.db').resolve()}"
    name = options.get("study_name") or re.sub(r"[^\w.-]", "-", folder.resolve().name)
    if not name.strip() or not name.isprintable():
        # It heads best.toml as a comment, where a newline would start a line of settings.
        raise UsageError(f"--study-name must be one line of printable text, not {name!r}")
    # (Counts such as --trials are checked as the command line is parsed.)
    given = {k: options[k] for k in ("trials", "jobs", "sampler", "pruner", "prune_startup",
                                     "best_format", "heartbeat", "json", "quiet") if k in options}
    return Sweep(space, base, folder, storage, name, objective=objective, **given)


# ---- the study --------------------------------------------------------------------------------

def _optuna():
    try:
        import optuna
    except ImportError:
        raise UsageError("torchmnist sweep needs Optuna; install it with: pip install "
                         "'torchmnist[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for handler in logging.getLogger("optuna").handlers:
        if _OWN_ERRORS not in handler.filters:
            handler.addFilter(_OWN_ERRORS)
    return optuna


class _OwnErrors(logging.Filter):
    """Drops Optuna's traceback and 'Trial N failed with value None.' for a trial a torchmnist
    error ended (it diverged, or was stopped): the sweep says that itself, in one line."""

    def __init__(self) -> None:
        super().__init__()
        self._next: str | None = None  # the second record of a dropped failure

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._next is not None and message.startswith(self._next):
            self._next = None
            return False
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, TorchMnistError):
            return True
        self._next = " ".join(message.split()[:2]) + " failed with value"  # "Trial 3 ..."
        return False


_OWN_ERRORS = _OwnErrors()


def _storage(sweep: Sweep):
    """The study's database, with heartbeats, so a trial whose worker died is run again."""
    optuna = _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    sqlite = sweep.storage.startswith("sqlite")
    engine = {"connect_args": {"timeout": 60}} if sqlite else None

    class Storage(RDBStorage):
        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            """Optuna's stale trials, and running ones that never sent a heartbeat (their worker
            died within milliseconds of taking them), which would otherwise run for ever."""
            stale = super()._get_stale_trial_ids(study_id)
            try:
                from optuna.storages._rdb import models
                from optuna.storages._rdb.storage import _create_scoped_session
                from optuna.trial import TrialState
            except ImportError:  # Optuna's internals moved: its own rule alone
                return stale
            limit = datetime.now() - timedelta(seconds=self.grace_period)
            with _create_scoped_session(self.scoped_session, True) as session:
                beating = {t for (t,) in session.query(models.TrialHeartbeatModel.trial_id)}
                for trial in session.query(models.TrialModel).filter(
                        models.TrialModel.state == TrialState.RUNNING,
                        models.TrialModel.study_id == study_id):
                    if (trial.trial_id not in beating and trial.trial_id not in stale
                            and trial.datetime_start is not None
                            and trial.datetime_start < limit):
                        stale.append(trial.trial_id)
            return stale

    class LockedSQLite(Storage):
        """SQLite has no row locks, so two workers could both take a queued trial: a file lock
        makes read-and-take one step (a database server locks the row itself)."""

        def set_trial_state_values(self, trial_id, state, values=None):
            import fcntl

            with open(sweep.folder / "study.lock", "a") as lock:
                fcntl.lockf(lock, fcntl.LOCK_EX)
                return super().set_trial_state_values(trial_id, state, values)

    kind = LockedSQLite if sqlite and os.name == "posix" else Storage

    def open_storage():
        return kind(sweep.storage, engine_kwargs=engine,
                    heartbeat_interval=sweep.heartbeat, grace_period=3 * sweep.heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))

    try:
        for attempt in range(5):
            try:
                return open_storage()
            except Exception as error:  # noqa: BLE001 - see below
                # Workers started together on an empty database all create its tables; all
                # but one fail on a name the first has just taken, and then find the tables.
                text = f"{type(error).__name__} {error}"
                if attempt == 4 or not any(sign in text for sign in (
                        "IntegrityError", "UniqueViolation", "DuplicateTable",
                        "already exists")):
                    raise
                time.sleep(0.5 + attempt)
    except ImportError as error:  # the database's driver, e.g. psycopg2 for PostgreSQL
        raise UsageError(f"--storage {_safe_url(sweep.storage)} needs a database driver that "
                         f"is not installed: {error}") from None
    except optuna.exceptions.StorageInternalError as error:
        raise UsageError(f"cannot open --storage {_safe_url(sweep.storage)}: "
                         f"{str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - SQLAlchemy's errors for a wrong URL or server
        raise UsageError(f"cannot open --storage {_safe_url(sweep.storage)}: "
                         f"{type(error).__name__}: {str(error).splitlines()[0]}") from None


def _safe_url(url: str) -> str:
    """The storage URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _sampler(sweep: Sweep, worker: int, trials_before: int):
    optuna = _optuna()
    import numpy as np

    # Each worker, and each resumption, its own stream: none proposes what another tried.
    seed = int(np.random.SeedSequence([sweep.base.get("seed", 1), worker, trials_before])
               .generate_state(1)[0])
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "grid":
        grid = {p.name: list(p.choices) if p.kind == "choice"
                else list(range(int(p.low), int(p.high) + 1)) for p in sweep.space}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(sweep: Sweep):
    optuna = _optuna()
    if sweep.pruner == "none" or sweep.objective == "time":
        # Time to a target is minimised while the tests report accuracy, which the pruner
        # would read the wrong way round.
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_startup)


def _study(sweep: Sweep, storage, worker: int = 0, trials_before: int = 0):
    """The sweep's study on an open `storage` (made if new), with worker `worker`'s sampler."""
    optuna = _optuna()
    try:
        return optuna.create_study(storage=storage, study_name=sweep.study_name,
                                   direction=sweep.direction,
                                   sampler=_sampler(sweep, worker, trials_before),
                                   pruner=_pruner(sweep), load_if_exists=True)
    except ValueError as error:  # e.g. the study exists with the other direction
        raise UsageError(f"study {sweep.study_name!r}: {error}") from None


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))


def trials_left(sweep: Sweep, storage) -> int:
    """Trials the study still needs, once those whose heartbeat stopped are queued again."""
    optuna = _optuna()
    study = _study(sweep, storage)
    optuna.storages.fail_stale_trials(study)
    return max(0, sweep.trials - _finished(study))


def work(sweep: Sweep, worker: int = 0, share: int | None = None, storage=None) -> None:
    """Run `share` trials (default: as many as the study still needs), stopping once the study
    has `sweep.trials`. Signals are caught throughout, not only while a trial trains: one
    between trials ends the work at the next safe point, never before a trial is queued again."""
    with StopSignals() as stop:
        _work(sweep, worker, share, storage, stop)
        if stop.signum:  # between trials: none was running, none needs queueing
            raise Stopped(f"{stop.name} between trials; run the same sweep command to go on",
                          stop.signum)


def _work(sweep: Sweep, worker: int, share: int | None, storage, stop: StopSignals) -> None:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    storage = storage or _storage(sweep)
    left = trials_left(sweep, storage) if share is None else share
    if left <= 0:
        return
    before = len(_study(sweep, storage).get_trials(deepcopy=False))
    study = _study(sweep, storage, worker, before)
    # Stop once the trials done and running reach the count, whoever ran them.
    enough = MaxTrialsCallback(sweep.trials, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                     TrialState.RUNNING))

    def on_signal(study, trial) -> None:  # one that came as the last trial was wrapped up
        if stop.signum:
            study.stop()

    try:
        study.optimize(lambda trial: _objective(sweep, trial, worker), n_trials=left,
                       callbacks=[enough, on_signal], catch=(TrainingError,))
    except Stopped as halted:
        # The trial saved its checkpoint and Optuna marked it failed: queued again, it goes on
        # from there when the same sweep command runs again.
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        frozen = next(t for t in study.get_trials(deepcopy=False)
                      if t.number == halted.trial_number)
        RetryHeartbeatStaleTrialCallback()(study, frozen)
        signum = halted.exit_code - 128
        raise Stopped(f"{signal.Signals(signum).name} during trial {halted.trial_number}, "
                      "whose checkpoint is saved; run the same sweep command to go on from it",
                      signum) from None


def _trial_folder(sweep: Sweep, trial) -> Path:
    """A retried trial goes on in the folder of the trial it repeats."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return sweep.folder / f"trial-{(history[0] if history else trial.number):04d}"


def _objective(sweep: Sweep, trial, worker: int) -> float:
    optuna = _optuna()
    from torchmnist import setup, training

    params = {p.name: p.suggest(trial) for p in sweep.space}
    folder = _trial_folder(sweep, trial)
    explicit = {**sweep.base, **params, "run_dir": str(folder), "quiet": True, "json": False}
    resumed_from = (folder / "last.pt").exists()
    if resumed_from:  # the trial whose worker died: on from its checkpoint
        explicit["resume"] = str(folder)
    config, resumed = setup.from_flags(explicit)
    trial.set_user_attr("run_dir", str(folder))
    shown = ", ".join(f"{k} {_short(v)}" for k, v in params.items())

    # The pruner compares trials after the same epoch, or with --eval-interval Ns, step.
    by_epoch = cfg.eval_interval(config).unit != "steps"

    def report(accuracy: float, step: int, epoch: int, last: bool) -> None:
        trial.report(accuracy, epoch if by_epoch else step)
        if not last and trial.should_prune():  # after the last step there is nothing to save
            where = f"epoch {epoch}" if by_epoch else f"step {step}"
            _say(sweep, f"trial {trial.number}: {shown}: pruned after {where} (accuracy "
                        f"{100 * accuracy:.2f}%)")
            raise optuna.TrialPruned(f"accuracy {accuracy:.4f} at step {step}")

    _say(sweep, f"trial {trial.number}: {shown}" + (f" (resuming {folder})" if resumed_from
                                                    else "") + f" [worker {worker}]")
    try:
        summary = training.train(config, resumed=resumed, on_test=report)
    except TrainingError as error:  # diverged: the trial fails, the sweep goes on
        _say(sweep, f"trial {trial.number}: {shown}: failed: {error}")
        raise
    except Stopped as halted:
        halted.trial_number = trial.number  # for work(), which queues it again
        raise
    value = summary[sweep.metric]
    for key in ("test_accuracy", "val_accuracy", "train_seconds", "target_seconds"):
        trial.set_user_attr(key, summary[key])
    if value is None:  # the target accuracy was never reached: as slow as can be
        value = math.inf
    _say(sweep, f"trial {trial.number}: {shown}: {_value_text(sweep, value)} "
                f"({summary['train_seconds']:.1f} s training)")
    return value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _value_text(sweep: Sweep, value: float | None) -> str:
    if value is None:
        return "-"
    if sweep.objective == "time":
        return "did not reach the target" if math.isinf(value) else f"{value:.2f} s"
    return f"{100 * value:.2f}%"


def _say(sweep: Sweep, line: str) -> None:
    if not sweep.quiet:
        print(line, file=sys.stderr if sweep.json else sys.stdout, flush=True)


# ---- several workers on this machine ----------------------------------------------------------

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_workers(sweep: Sweep, argv: list[str], storage) -> None:
    """Start `sweep.jobs` workers (this command with --worker N), cores / jobs torch threads
    each unless --threads says otherwise, and wait for them."""
    threads = [] if "threads" in sweep.base else [
        "--threads", str(max(1, _cores() // sweep.jobs))]
    command = [sys.executable, "-m", "torchmnist", "sweep", *argv, "--run-dir",
               str(sweep.folder), "--storage", sweep.storage, "--study-name", sweep.study_name,
               *threads]
    left = trials_left(sweep, storage)
    shares = [left // sweep.jobs + (i < left % sweep.jobs) for i in range(sweep.jobs)]
    workers = [subprocess.Popen([*command, "--worker", str(i), "--share", str(share)])
               for i, share in enumerate(shares) if share]
    try:
        # A signal here is passed on to the workers as SIGTERM, once: each saves its trial and
        # stops. (Not SIGINT: after a terminal's Ctrl-C, which reaches them too, a second one
        # would make them abort without saving.)
        with StopSignals() as stop:
            passed_on = False
            while any(w.poll() is None for w in workers):
                if stop.signum and not passed_on:
                    for w in workers:
                        if w.poll() is None:
                            w.send_signal(signal.SIGTERM)
                    passed_on = True
                time.sleep(0.1)
        codes = [w.returncode for w in workers]
    finally:
        for w in workers:  # a second Ctrl-C or an error here: no worker outlives the sweep
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait()
    failed = [c for c in codes if c]
    # Stopped by a signal: 130 or 143, or -2 or -15 if it came before the handler did.
    stops = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
    if failed and set(failed) <= stops:
        signum = stop.signum or (failed[0] - 128 if failed[0] > 0 else -failed[0])
        raise Stopped(f"{signal.Signals(signum).name}: {len(failed)} of {len(workers)} sweep "
                      "workers stopped, their trials queued again; run the same sweep command "
                      "to go on", signum)
    if stop.signum and not failed:  # each worker stopped between its trials
        raise Stopped(f"{stop.name}: the sweep's workers stopped between trials; run the same "
                      "sweep command to go on", stop.signum)
    if failed:
        error = TorchMnistError(f"{len(failed)} of {len(workers)} sweep workers failed (exit "
                                f"{failed[0]}); their errors are above")
        error.exit_code = failed[0] if failed[0] > 0 else 1
        raise error


# ---- results ----------------------------------------------------------------------------------

def results(sweep: Sweep, storage) -> dict[str, Any]:
    """Print the table of trials; write the best settings and the plots; return the summary."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    study = _study(sweep, storage)
    trials = study.get_trials(deepcopy=False)
    # A trial stopped (or whose worker died) goes on as a later one: which one.
    again = {RetryHeartbeatStaleTrialCallback.retry_history(t)[-1]: t.number for t in trials
             if RetryHeartbeatStaleTrialCallback.retry_history(t)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    names = [p.name for p in sweep.space]
    lines = ["| trial | state | " + " | ".join(names) + f" | {sweep.metric} | seconds |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if (
            t.datetime_complete and t.datetime_start) else None
        state = t.state.name.lower()
        if t.state == TrialState.PRUNED and t.intermediate_values:
            state += f" after test {len(t.intermediate_values)}"
        if t.number in again:
            state += f", run again as {again[t.number]}"
        lines.append(f"| {t.number} | {state} | " + " | ".join(
            _short(t.params.get(n, "-")) for n in names) + f" | {_value_text(sweep, t.value)} | "
            f"{'-' if seconds is None else f'{seconds:.1f}'} |")
    summary: dict[str, Any] = {
        "study": sweep.study_name, "storage": _safe_url(sweep.storage),
        "folder": str(sweep.folder), "objective": sweep.metric, "direction": sweep.direction,
        "trials": len(trials),
        "states": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState
                   if any(t.state == s for t in trials)},
        "best": None, "best_config": None, "plots": []}
    _say(sweep, "\n".join(lines))
    if complete:
        best = study.best_trial
        summary["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                           "run_dir": best.user_attrs.get("run_dir")}
        path = write_best(sweep, best.params)
        summary["best_config"] = str(path)
        _say(sweep, f"best: trial {best.number}, {_value_text(sweep, best.value)} with "
                    + ", ".join(f"{k} {_short(v)}" for k, v in best.params.items())
                    + f"; train with: torchmnist train --config {path}")
    summary["plots"], notes = (_plots(sweep, study) if complete else
                               ([], ["plots skipped: no trial has completed"]))
    for note in notes:
        _say(sweep, note)
    return summary


def write_best(sweep: Sweep, params: dict[str, Any]) -> Path:
    """The best settings, with every trial's train flags, as a file train --config reads."""
    values = {k: v for k, v in {**sweep.base, **params}.items()
              if k not in NOT_SWEPT and v is not None}
    path = sweep.folder / f"best.{sweep.best_format}"
    if sweep.best_format == "json":
        text = json.dumps(values, indent=2, allow_nan=False) + "\n"
    elif sweep.best_format == "yaml":
        try:
            import yaml
        except ImportError:
            raise UsageError("--best-format yaml needs PyYAML: pip install "
                             "'torchmnist[yaml]'") from None
        text = yaml.safe_dump(values, sort_keys=False)
    else:
        text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    head = f"# torchmnist sweep {sweep.study_name}: the best trial's settings\n"
    if sweep.jobs > 1 and "threads" not in sweep.base:
        # On a CPU the sums of a step depend on how many threads share them.
        head += (f"# its trial ran with {max(1, _cores() // sweep.jobs)} torch thread(s): pass "
                 "--threads with that number to reproduce its score exactly\n")
    text = (head if sweep.best_format != "json" else "") + text
    rundir.write_text_atomically(path, text)
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: the same quoting and escapes


def _plots(sweep: Sweep, study) -> tuple[list[str], list[str]]:
    """Optuna's optimisation history and parameter importances, as PNG files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots
    except ImportError:
        return [], ["plots skipped: they need matplotlib (pip install 'torchmnist[report]')"]
    written, notes = [], []
    for name, draw in (("history", plots.plot_optimization_history),
                       ("importances", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw(study)
            figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            path = sweep.folder / f"{name}.png"
            rundir.write_atomically(
                path, lambda f, figure=figure: figure.savefig(f, format="png", dpi=100))
            plt.close(figure)
            written.append(str(path))
        except (ValueError, RuntimeError) as error:  # e.g. importances of fewer than 2 trials
            notes.append(f"{name} plot skipped: {str(error).splitlines()[0]}")
    return written, notes


def main(options: dict[str, Any], base: dict[str, Any], argv: list[str]) -> dict[str, Any] | None:
    """The sweep command: one worker here, or `--jobs` of them, then the results."""
    sweep = build(options, base)
    rundir.make_sweep_folder(sweep.folder)
    worker = options.get("worker")
    if worker is not None:  # one of the --jobs processes
        try:
            work(sweep, worker, options.get("share"))
        except Stopped as stop:
            stop.told = False  # the sweep that started this worker tells it, once for all
            raise
        return None
    _say(sweep, f"sweep {sweep.study_name}: {counted(sweep.trials, 'trial')}, {sweep.jobs} at a "
                f"time, "
                f"{sweep.direction} {sweep.metric}; {sweep.sampler} sampler, "
                f"{'no' if sweep.pruner == 'none' else sweep.pruner} pruner; searching "
                + "; ".join(p.describe() for p in sweep.space)
                + f"; study in {_safe_url(sweep.storage)}; trials in {sweep.folder}")
    if sweep.metric == "test_accuracy" and sweep.objective == "accuracy":
        _say(sweep, "objective: test accuracy, as no --val-size holds out a validation set; "
                    "settings chosen on the test set make its accuracy optimistic")
    start = time.perf_counter()
    storage = _storage(sweep)  # opened once for this process
    _study(sweep, storage)  # made once here, before workers open it side by side
    if sweep.jobs == 1:
        work(sweep, storage=storage)
    else:
        run_workers(sweep, argv, storage)
    summary = results(sweep, storage)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
