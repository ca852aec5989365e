"""Export progress on stderr: one tqdm bar over the export's planned steps, plain lines when stderr is no TTY.

An export is a handful of long steps (checkpoint, GGUF conversion, one quantisation per precision, ONNX
export, int8 calibration) with no output of their own for a minute or more; the bar says which step runs and
how far the export is. Messages from the stages print above the bar. Off a terminal (CI logs, pipes) the
same information comes as one plain line per message and per finished step, never as carriage returns.
"""

from __future__ import annotations

import sys
from typing import TextIO


class ExportProgress:
    """Callable like a message sink (``progress("text")``); ``step(label)`` marks one planned step done."""

    def __init__(self, total: int, *, desc: str = "export", file: TextIO | None = None,
                 tty: bool | None = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.tty = self.file.isatty() if tty is None else tty
        self.total, self.done = total, 0
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.file, unit="step", dynamic_ncols=True,
                             bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {elapsed} {postfix}")

    def __call__(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=self.file)
        else:
            print(msg, file=self.file, flush=True)

    def step(self, label: str) -> None:
        """One planned step finished (``label`` names it)."""
        self.done = min(self.done + 1, self.total)
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=self.file, flush=True)

    def add_steps(self, n: int) -> None:
        """Steps that became known once the checkpoint was read (e.g. a Base model's speaker encoder)."""
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def null_step(_label: str) -> None:
    """A ``step`` callback for callers that show no progress."""
