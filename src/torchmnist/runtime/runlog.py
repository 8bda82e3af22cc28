"""A run's records: what it prints (also kept in train.log), its metrics.jsonl, and with
--tensorboard the same metrics as TensorBoard events.

On a terminal, progress within an epoch is a tqdm bar; elsewhere (a pipe, a file, CI) it is
plain lines, so logs stay readable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from torchmnist.errors import UsageError
from torchmnist.storage import rundir

# metrics.jsonl record (kind, key) -> TensorBoard scalar tag
_TENSORBOARD_TAGS = {
    ("train", "train_loss"): "loss/train", ("epoch", "train_loss"): "loss/train_epoch",
    ("epoch", "test_loss"): "loss/test", ("epoch", "test_accuracy"): "accuracy/test",
    ("train", "lr"): "learning_rate",
}


def _terminal_size() -> tuple[int, int]:
    """(columns, rows) of the terminal stderr is on; (0, 0) when it says none."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


class RunLog:
    def __init__(self, run_dir: Path, *, history: list[dict[str, Any]] | None = None,
                 progress_bar: bool | None = None, quiet: bool = False,
                 to_stderr: bool = False, write: bool = True):
        """`write=False`: keep nothing on disk (the ranks other than 0 of a distributed run,
        which share rank 0's run folder)."""
        self.run_dir, self.write = run_dir, write
        self.history: list[dict[str, Any]] = list(history or [])
        self.quiet = quiet  # nothing on the console; train.log still gets every line
        # With --json, stdout holds only the summary (`train --json | jq`): lines go to stderr.
        self.to_stderr = to_stderr
        self.progress_bar = (not quiet and sys.stderr.isatty() if progress_bar is None
                             else progress_bar)
        self._bar: tqdm | None = None
        if not write:
            self._log = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
            self._metrics = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
            self._writer = None
            return
        self._log = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115
        # Rewritten whole from the checkpoint's history: records an interrupted run wrote after
        # its checkpoint do not appear twice, and a full disk leaves the old file.
        text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in self.history)
        rundir.write_text_atomically(run_dir / "metrics.jsonl", text)
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._writer = None  # a TensorBoard SummaryWriter, with --tensorboard

    def print(self, line: str) -> None:
        """Show a line to the user and keep it in train.log."""
        if self._bar is not None:
            self._bar.write(line)
        elif not self.quiet:
            print(line, file=sys.stderr if self.to_stderr else sys.stdout, flush=True)
        self._append(self._log, line)

    @staticmethod
    def _append(file, line: str) -> None:
        try:
            file.write(line + "\n")
            file.flush()
        except OSError as error:  # a full disk: say which file, not just "No space left"
            raise rundir.cannot_write(Path(file.name), error, "the checkpoints saved so far "
                                      "are unchanged") from None

    def step_line(self, line: str, postfix: str) -> None:
        """A per-interval training line: the bar's postfix on a terminal, a plain line else."""
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._append(self._log, line)
        else:
            self.print(line)

    def metric(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._append(self._metrics, json.dumps(record, allow_nan=False))
        if self._writer is not None:
            for key, value in record.items():
                tag = _TENSORBOARD_TAGS.get((record["kind"], key))
                if tag and value is not None:
                    self._writer.add_scalar(tag, value, global_step=record["step"])

    def start_tensorboard(self, step: int) -> None:
        """Write TensorBoard event files into the run directory from `step` on; events a
        crashed run wrote after the checkpoint it resumes from are hidden (purge_step)."""
        if not self.write:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package; install it with: "
                             "pip install 'torchmnist[tensorboard]'") from None
        # Records at the checkpoint's own step were written before it was saved: keep them.
        self._writer = SummaryWriter(log_dir=str(self.run_dir),
                                     purge_step=step + 1 if step else None)

    def images(self, tag: str, images, step: int) -> None:
        """An image grid for TensorBoard: images (N, 1, H, W) in [0, 1]."""
        if self._writer is not None:
            from torchvision.utils import make_grid

            self._writer.add_image(tag, make_grid(images, nrow=8, padding=2), global_step=step)

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.progress_bar:
            # A terminal of no size (`script`, some CI runners) would hide tqdm's bar: 80x24.
            columns, rows = _terminal_size()
            sized = columns > 0 and rows > 0
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                             dynamic_ncols=sized, ncols=None if sized else 80,
                             nrows=None if sized else 24)

    def advance_bar(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Close the bar and every file; safe to call more than once."""
        self.close_bar()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._log.close()
        self._metrics.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
