"""Stopping training on Ctrl-C at a step boundary: `InterruptFlag` turns the first SIGINT into a
request the training loop honours after the current step (so the checkpoint it saves is never of a
half-applied step), and `TrainingInterrupted` says where that checkpoint went."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """`Trainer.fit` stopped on Ctrl-C (SIGINT) at a step boundary: `path` holds a checkpoint of `step`
    (rank 0; None on the other ranks) that a rerun into the same `out_dir` resumes from."""

    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.path = step, path


class InterruptFlag:
    """While active (in the main thread), a first SIGINT only sets `requested`, so the training loop
    stops at the next step boundary and saves (never a half-applied step); a second one raises
    KeyboardInterrupt at once, quitting without saving. A SIGINT that is ignored stays ignored."""

    def __init__(self, message: str | None) -> None:
        self.requested = False
        self._message = message
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._message:
            try:  # os.write: a buffered print could re-enter a write the signal interrupted
                os.write(sys.stderr.fileno(), f"\n{self._message}\n".encode())
            except (OSError, ValueError):
                pass

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = previous if previous is not None else signal.default_int_handler
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
