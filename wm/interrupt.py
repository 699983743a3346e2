"""Stopping training on Ctrl-C or SIGTERM at a step boundary: `InterruptFlag` turns the first SIGINT
or SIGTERM (what a cluster's scheduler sends before it preempts a job: SLURM, Kubernetes) into a
request the training loop honours after the current step (so the checkpoint it saves is never of a
half-applied step), and `TrainingInterrupted` says where that checkpoint went. `interrupts_held`
keeps Ctrl-C out of a block that must finish once started (a store's commit)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """`Trainer.fit` stopped on Ctrl-C (SIGINT) or SIGTERM (`signum`) at a step boundary: `path` holds a
    checkpoint of `step` (rank 0; None on the other ranks) that a rerun into the same `out_dir`
    resumes from."""

    def __init__(self, step: int, path: Path | None, signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.path, self.signum = step, path, int(signum)


class InterruptFlag:
    """While active (in the main thread), a first SIGINT or SIGTERM only sets `requested` (and `signum`),
    so the training loop stops at the next step boundary and saves (never a half-applied step); a
    second one raises KeyboardInterrupt at once, quitting without saving. `message(signum)` is said
    on the first. A signal that is ignored stays ignored."""

    def __init__(self, message: Callable[[int], str] | None) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._message = message
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if self._message:
            try:  # os.write: a buffered print could re-enter a write the signal interrupted
                os.write(sys.stderr.fileno(), f"\n{self._message(signum)}\n".encode())
            except (OSError, ValueError):
                pass

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                    self._previous[signum] = previous if previous is not None else default
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT), and SIGTERM where Python handles it (the apps that turn it into an interrupt),
    held until the block ends, then delivered to the handler they would have met.

    zarr v3 runs every read and write on its own event-loop thread while the caller waits: a
    KeyboardInterrupt raised in the wait leaves the write running behind whatever the caller does
    next (a store's commit record landed after the episode it commits was discarded: a store that
    no longer opened). Main thread only (no other thread meets KeyboardInterrupt); a signal that is
    ignored, or handled outside Python (SIGTERM's default), is left as it is. Blocks nest."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    held = [s for s, handler in previous.items() if callable(handler)]
    caught: list[int] = []
    for signum in held:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum in held:
            signal.signal(signum, previous[signum])
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)
