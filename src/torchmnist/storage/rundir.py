"""Run folders: which folders torchmnist may write into, and the lock that keeps one writer.

A run folder holds `.torchmnist-run`, a file only torchmnist writes. Training goes into a new
folder, an empty one, or a run folder; any other folder is refused before anything in it is
touched. For the whole run an OS lock (`fcntl.lockf` on `.torchmnist-lock`) keeps a second
writer out, and dies with its process, however it ends. Sweep folders (`.torchmnist-sweep`) and
`predict --save-preprocessed` folders (`.torchmnist-preprocessed`) follow the same rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from torchmnist import __version__
from torchmnist.errors import TrainingError, UsageError

MARKER = ".torchmnist-run"
SWEEP_MARKER = ".torchmnist-sweep"  # the same, for a sweep's folder (sweep.py)
PREPROCESSED_MARKER = ".torchmnist-preprocessed"  # predict --save-preprocessed's folder
LOCK = ".torchmnist-lock"
# Every temporary file torchmnist writes starts with this, so cleaning up after a killed run
# can never remove a file of the user's (such as their own `.notes.tmp`).
TEMPORARY_PREFIX = ".torchmnist-tmp."


def is_run(folder: Path) -> bool:
    """A folder torchmnist made: it holds the marker. A marker that is not a plain file (a link,
    a pipe) still counts here, so that the check of the run's files names what it is."""
    return os.path.lexists(folder / MARKER)


# What a run keeps in its folder: its checkpoints, settings, records and the marker and lock.
RUN_FILES = ("last.pt", "best.pt", "config.json", "metrics.jsonl", "train.log", "model.pt",
             "model.safetensors", MARKER, LOCK)


def is_run_name(name: str) -> bool:
    """The name of one of the files a run keeps in its folder."""
    return name in RUN_FILES or re.fullmatch(r"epoch-\d+\.pt", name) is not None


def is_run_file(path: Path) -> bool:
    """One of the files a run keeps in its folder, which nothing else may write over."""
    return is_run_name(path.name) and is_run(path.parent)


def refuse_foreign(folder: Path, ours: Callable[[Path], bool], what: str, flag: str,
                   writes: Callable[[str], bool]) -> None:
    """Refuse, touching nothing, a folder that is not new, empty or `ours` (a run's, a sweep's,
    a report's), or where a name it `writes` is not a plain file: a symbolic link would carry
    the writes elsewhere (`train.log -> ~/.bashrc`), a pipe would hang the command."""
    if folder.is_dir() and any(p.name != LOCK for p in folder.iterdir()) and not ours(folder):
        raise UsageError(f"{folder} is not empty and is not {what}; nothing in it was changed: "
                         f"choose a new or empty {flag}")
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if writes(entry.name) and not entry.is_file(follow_symlinks=False):
            raise UsageError(f"{folder / entry.name} is {_what_is(entry)}, not a plain file; "
                             f"nothing in {folder} was changed: remove it or choose another "
                             f"{flag}")


def _what_is(entry: os.DirEntry) -> str:
    mode = entry.stat(follow_symlinks=False).st_mode
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device"


def check_writable(folder: Path) -> None:
    """Refuse, touching nothing, a folder that training must not write into."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--run-dir {folder} is a file, not a folder")
    refuse_foreign(folder, is_run, f"a torchmnist run folder (it has no {MARKER})", "--run-dir",
                   writes=is_run_name)


class RunLock:
    """The exclusive lock on a run folder, held from `acquire` to `release`."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not on Windows: there the folder is not locked
            return
        try:
            # Never through a link nor waiting on a pipe, should one appear after the checks.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o644)
        except OSError as error:
            raise UsageError(f"cannot lock {self.path.parent} ({self.path.name}: "
                             f"{error.strerror or error}); choose another --run-dir") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"cannot lock {self.path.parent}: {self.path.name} is not a plain "
                             "file; choose another --run-dir")
        try:
            # A POSIX record lock, not flock: it belongs to this process alone, so DataLoader
            # workers (forked children, which may outlive a killed trainer by seconds) never
            # hold it, and the OS drops it the moment this process ends.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.path.parent} is in use by another torchmnist process "
                             f"(PID {holder}); wait for it to finish or choose another "
                             "--run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing it drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def make_folder(folder: Path, flag: str) -> None:
    """Make `folder` and its parents for torchmnist to write into. One that cannot be made (a
    file in the way, no permission, a read-only disk) is one sentence naming `flag`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        in_the_way = next((part for part in (folder, *folder.parents)
                           if part.exists() and not part.is_dir()), None)
        reason = f"{in_the_way} is a file" if in_the_way else error.strerror or str(error)
        raise UsageError(f"cannot make the folder {folder}: {reason}; choose another {flag}"
                         ) from None


# What a sweep writes into its folder (its trials' run folders are checked as runs).
SWEEP_FILES = (SWEEP_MARKER, "study.db", "study.db-journal", "study.db-wal", "study.db-shm",
               "study.lock", "best.toml", "best.json", "best.yaml", "history.png",
               "importances.png")


def is_sweep(folder: Path) -> bool:
    """A folder a sweep made: its marker, or (sweeps from before the marker) its study."""
    return (folder / SWEEP_MARKER).is_file() or (folder / "study.db").is_file()


def make_sweep_folder(folder: Path) -> None:
    """Make a sweep's folder, or reuse one a sweep made; any other non-empty one is refused."""
    refuse_foreign(folder, is_sweep, f"a torchmnist sweep folder (it has no {SWEEP_MARKER})",
                   "--run-dir", writes=SWEEP_FILES.__contains__)
    make_folder(folder, "--run-dir")
    (folder / SWEEP_MARKER).touch()


def claim(folder: Path) -> RunLock:
    """Check the folder, make it, lock it and mark it as a run; return the held lock."""
    check_writable(folder)
    make_folder(folder, "--run-dir")
    lock = RunLock(folder)
    lock.acquire()
    try:
        check_writable(folder)  # filled by someone else between the check and the lock?
        if not (folder / MARKER).is_file():
            (folder / MARKER).write_text(json.dumps({"torchmnist": __version__}) + "\n",
                                         encoding="utf-8")
    except BaseException:
        lock.release()
        raise
    return lock


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write so that a crash at any instant leaves either the old file or the new one: into a
    temporary file beside it, flushed to disk, then renamed over `path` (atomic). A failure
    removes the temporary file and leaves `path` as it was."""
    tmp = None
    try:
        tmp = temporary_beside(path)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        raise cannot_write(path, error, "the previous file there, if any, is unchanged"
                           ) from None
    finally:
        # Whatever stopped the write (a full disk, a writer's own error, a second Ctrl-C),
        # its half-written file goes with it. (After the rename there is nothing to remove.)
        if tmp is not None:
            drop_temporary(tmp)
    _fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    """`write_atomically` for a text file (UTF-8): config.json, metrics.jsonl, report.md."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def temporary_beside(path: Path, suffix: str = "") -> Path:
    """A new empty file beside `path`, a name no other writer has, with the permissions open()
    would give it (mkstemp gives 0600)."""
    fd, name = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", suffix=suffix,
                                dir=path.parent)
    _OWN_TEMPORARIES.add(Path(name))
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def temporary_folder_beside(path: Path) -> Path:
    """A new empty folder beside `path`, to fill and then put in its place (replace_atomically)."""
    made = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", dir=path.parent))
    _OWN_TEMPORARIES.add(made)
    os.chmod(made, 0o777 & ~_umask())
    return made


def replace_atomically(new: Path, path: Path) -> None:
    """Put the file or folder `new` where `path` is. A folder already there (an earlier export)
    is moved aside first and removed after: `path` is never half of either."""
    if new.is_dir() and path.is_dir():
        old = temporary_folder_beside(path)
        os.replace(path, old)
        os.replace(new, path)
        drop_temporary(old)
    else:
        os.replace(new, path)
    _OWN_TEMPORARIES.discard(new)


# The temporary files and folders this process has made and not yet renamed or removed, for a
# SIGTERM to remove on its way out (signals.terminate_cleanly).
_OWN_TEMPORARIES: set[Path] = set()


def drop_temporary(tmp: Path) -> None:
    """Remove a temporary file or folder made here, if a rename has not taken it."""
    _remove(tmp)
    _OWN_TEMPORARIES.discard(tmp)  # after: a signal between the two finds nothing to remove


def remove_own_temporaries() -> None:
    """Remove every temporary file this process is still writing (a signal's last act)."""
    for tmp in list(_OWN_TEMPORARIES):
        try:
            _remove(tmp)
        except OSError:
            pass


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def cannot_write(path: Path, error: BaseException, kept: str) -> TrainingError:
    """The one sentence for a write that failed: the file, why, the space left where it was
    going, and what is still as it was (`kept`)."""
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              else (str(error).strip().splitlines() or ["unknown error"])[-1])
    try:
        free = f"; {_size(shutil.disk_usage(path.parent).free)} free in {path.parent}"
    except OSError:
        free = ""
    return TrainingError(f"could not write {path} ({reason}{free}); {kept}")


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and harmless to skip.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete half-written temporary files that a killed torchmnist process left behind."""
    for tmp in folder.glob(TEMPORARY_PREFIX + "*"):
        if not tmp.is_dir() or tmp.is_symlink():  # torchmnist never makes such a folder
            tmp.unlink(missing_ok=True)
