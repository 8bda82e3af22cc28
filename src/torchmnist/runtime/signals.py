"""Stopping cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`, a container stop).

Training: the first signal raises a flag that the loop reads after a step; it saves and exits
with 128 + the signal's number. A second Ctrl-C aborts at once (checkpoints are atomic). Test,
predict, export and report stop at once, removing the file they may be half-way through; a
benchmark unwinds, so that its temporary run folders go with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from torchmnist.errors import TorchMnistError
from torchmnist.storage import rundir


class Stopped(TorchMnistError):
    """Training stopped on a signal after saving a checkpoint."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    @classmethod
    def with_nothing_kept(cls, signum: int) -> Stopped:
        """The stop of a command whose runs were temporary (a benchmark's)."""
        return cls(f"{signal.Signals(signum).name}; the benchmark's runs were temporary, and "
                   "nothing was kept", signum)


class StopSignals:
    """Context manager: while inside, SIGINT and SIGTERM ask the run to stop after this step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Handlers can only be installed from the main thread; elsewhere (an API call in a
        # worker thread) signals keep their usual meaning.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
                # Inside another StopSignals (a sweep's, around its trials), a signal that one
                # caught before this began (while a trial was set up) is this one's to act on.
                outer = getattr(self._previous[signum], "__self__", None)
                if isinstance(outer, StopSignals) and outer.signum and self.signum is None:
                    self.signum = outer.signum
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """While inside, SIGTERM removes the temporary files being written, then exits with 143 at
    once, as its default action would (an exception could land in an exporter as an error)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame) -> None:
        rundir.remove_own_temporaries()
        sys.stdout.flush()
        print("torchmnist: terminated (SIGTERM)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Signals stop_by_unwinding took. Raised inside a weakref callback or a __del__ (the import
# system runs some), the Stopped is printed and dropped by Python: raise_if_stopped raises it
# again at the next point that asks.
_unwinding: list[int] = []


def raise_if_stopped() -> None:
    """Stopped, if stop_by_unwinding took a signal whose exception Python dropped."""
    if _unwinding:
        raise Stopped.with_nothing_kept(_unwinding[-1])


@contextlib.contextmanager
def stop_by_unwinding() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise Stopped wherever the process is, so every `with`
    and `finally` runs (a benchmark's temporary folders go); a training run inside still stops
    after a step, with its own handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _unwinding.clear()

    def stop(signum: int, frame) -> None:
        _unwinding.append(signum)
        raise Stopped.with_nothing_kept(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
