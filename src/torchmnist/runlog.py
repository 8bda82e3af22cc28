"""A run's records: what it prints (also kept in train.log) and its metrics.jsonl.

On a terminal, progress within an epoch is a tqdm bar; elsewhere (a pipe, a file, CI) it is
plain lines, so logs stay readable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    def __init__(self, run_dir: Path, *, history: list[dict[str, Any]] | None = None,
                 progress_bar: bool | None = None):
        self.run_dir = run_dir
        self.history: list[dict[str, Any]] = list(history or [])
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._bar: tqdm | None = None
        self._log = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115
        # metrics.jsonl is rewritten from the history a checkpoint carries, so records written
        # after that checkpoint by an interrupted run do not appear twice after a resume.
        with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
            for record in self.history:
                f.write(json.dumps(record) + "\n")
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def print(self, line: str) -> None:
        """Show a line to the user and keep it in train.log."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def step_line(self, line: str, postfix: str) -> None:
        """A per-interval training line: the bar's postfix on a terminal, a plain line else."""
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._log.write(line + "\n")
            self._log.flush()
        else:
            self.print(line)

    def metric(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.progress_bar:
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                             dynamic_ncols=True)

    def advance_bar(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        self._log.close()
        self._metrics.close()
