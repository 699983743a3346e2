"""Stopping training on Ctrl-C or SIGTERM at a step boundary: `InterruptFlag` turns the first SIGINT
or SIGTERM (what a cluster's scheduler sends before it preempts a job: SLURM, Kubernetes) into a
request the training loop honours after the current step (so the checkpoint it saves is never of a
half-applied step), and `TrainingInterrupted` says where that checkpoint went. `interrupts_held`
keeps Ctrl-C out of a block that must finish once started (a store's commit). `sigterm_interrupts`
makes SIGTERM interrupt as Ctrl-C does (`interrupt`), and neither is lost where Python cannot raise it
(`_redeliver_lost`) or where ctypes turns it into another error (`reraise_lost`)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
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
def interrupts_held(*, second_interrupts: bool = False) -> Iterator[None]:
    """Ctrl-C (SIGINT), and SIGTERM where Python handles it (the apps that turn it into an interrupt),
    held until the block ends, then delivered to the handler they would have met. `second_interrupts`:
    only the first is held, a second interrupts at once (a block that waits on another process, which
    may hang: a user's second Ctrl-C still stops it).

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

    def hold(signum: int, frame: Any) -> None:
        if second_interrupts and caught:
            caught.clear()  # delivered now, in the block: the first is not delivered again
            previous[signum](signum, frame)
            return
        caught.append(signum)

    for signum in held:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum in held:
            signal.signal(signum, previous[signum])
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


_last_signum: int = signal.SIGINT  # the signal `interrupt` handled last (Ctrl-C's own handler: SIGINT)
# ctypes' words for an exception raised while it converted argument N of a foreign call: the exception
# itself is gone (no __context__), only its type's name is kept in the message
_CTYPES_INTERRUPTED = re.compile(r"argument \d+: KeyboardInterrupt\b")


def interrupt(signum: int, frame: Any) -> None:
    """A signal handler that interrupts as Ctrl-C does (KeyboardInterrupt, so the cleanups run), carrying
    `signum` for the exit status: 128 + signum (143 for SIGTERM).

    Python runs a handler wherever the main thread is, also inside a weakref callback, a `__del__` or a
    garbage-collector callback, where an exception cannot propagate: Python prints "Exception ignored"
    and the work ran on to the end (a store rewrite stopped by SIGTERM finished and exited 0). Such an
    interrupt is delivered again (`_redeliver_lost`) a moment later, where the work can meet it. One
    raised where ctypes converts a call's arguments (PyOpenGL's EGL calls in a renderer) comes out as
    another error: `reraise_lost` gives it back its meaning."""
    global _last_signum
    _last_signum = signum
    _redeliver_lost()
    interrupted = KeyboardInterrupt()
    interrupted.signum = signum  # type: ignore[attr-defined]
    raise interrupted


REDELIVER_AFTER_S = 0.005  # a lost interrupt comes again this much later, out of the callback that lost it


def _redeliver_lost() -> None:
    """Wrap `sys.unraisablehook` (once; again if something replaced it) so that an interrupt of
    `interrupt`'s that Python could not raise is scheduled again. Not from the hook itself: a handler
    tripped there would run inside the hook, where it is lost too; a timer thread trips it once the main
    thread is back in ordinary code (if it lands in a callback again, it comes back again)."""
    hook = sys.unraisablehook
    if getattr(hook, "redelivers_interrupts", False):
        return

    def redeliver(unraisable: Any) -> None:
        signum = getattr(unraisable.exc_value, "signum", None)
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and signum is not None:
            threading.Timer(REDELIVER_AFTER_S, _signal_main, (signum,)).start()
            return
        hook(unraisable)

    redeliver.redelivers_interrupts = True  # type: ignore[attr-defined]
    sys.unraisablehook = redeliver


def _signal_main(signum: int) -> None:
    """The signal again, to the main thread, while `interrupt` still handles it: a real signal, which
    also ends a wait the main thread is blocked in (`_thread.interrupt_main` only set Python's flag: a
    sleep, a join or a socket wait ran to its end first, or forever); once the work is over and the
    handler gone, nothing (the default action would end the process where it stands)."""
    if signal.getsignal(signum) is interrupt:
        signal.pthread_kill(threading.main_thread().ident or 0, signum)


@contextlib.contextmanager
def sigterm_interrupts(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within it, SIGTERM (`timeout`, SLURM, `docker stop`, `kill`; or each of `signals`) interrupts as
    Ctrl-C does (`interrupt`: the cleanups run, exit status 128 + signum, 143 for SIGTERM) instead of
    ending the process where it stood, a staging folder or a half-written store left behind; the handlers
    before it come back after. Ctrl-C (SIGINT) goes through `interrupt` too, so that one landing in a
    callback is not lost either, unless something other than Python's own handler has it (an ignored
    SIGINT, as background jobs of non-interactive shells inherit, stays ignored)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signals = tuple(s for s in signals if s != signal.SIGINT)
    global _last_signum
    before = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        _last_signum = signal.SIGINT  # (Python's own handler's, which is what interrupts from now on)


def reraise_lost(e: BaseException) -> None:
    """Raise the interrupt that `e` (or an exception it was raised from) stands for, if it stands for one:
    ctypes turns a KeyboardInterrupt raised while it converts a foreign call's arguments (where a signal
    handler can run, e.g. in PyOpenGL's `eglMakeCurrent` when a MuJoCo renderer draws) into
    `ctypes.ArgumentError("argument 1: KeyboardInterrupt: ")`, which an app took for a bug (SIGTERM to
    wm-collect: exit 1 and a traceback, not 143) and a retried robot read ignored. Call it first in any
    handler of `Exception` that does not re-raise; otherwise it returns."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ctypes.ArgumentError) and _CTYPES_INTERRUPTED.match(str(cause)):
            interrupted = KeyboardInterrupt()
            interrupted.signum = _last_signum  # type: ignore[attr-defined]
            raise interrupted from e
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
