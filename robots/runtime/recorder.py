"""Recording an episode off a robot's control loop (wm-deploy's, and wm-collect's on a real arm).

`EpisodeWriter.add_step` buffers steps and writes them every `FLUSH_STEPS` (compression, a resize of
every array, the disk): tens to hundreds of milliseconds on the tick that reached the flush, during
which the arm got no command. `BackgroundEpisode` takes each tick's row on a queue (a copy: the
loop keeps its arrays) and a thread adds them to the writer; the tick path only copies and enqueues.
The heavy parts of a write (compression, copies, file I/O) run outside the GIL.

A step the store refuses (a non-finite reading) stops the recording, not the robot: the steps before it
are kept, and `end` commits them with the reason in the episode's info (`recording_stopped`). A write
the disk refuses (full, an I/O error) keeps its steps in the writer, which writes them at its next
flush: the recording goes on while no more than `MAX_UNWRITTEN` steps wait, then stops there; an
episode whose commit the disk still refuses is discarded with one line, and the next episode tries
again (the run is not ended for it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from robots.base import first_line
from robots.runtime.realtime import ordinary_scheduling

_DONE = object()  # the end of the queue
MAX_UNWRITTEN = 256  # steps held in memory while the disk refuses writes (each retried at every step)


class BackgroundEpisode:
    """One episode's rows for `writer` (a `wm.data.writer.EpisodeWriter`), written by a thread of its own.
    `add_step(row)` from the loop (`n_steps`: the rows given); then `end(info)` or `discard()` (each
    waits for the queued rows), or `close()` on any exit path (waits, and leaves the episode
    uncommitted). Used by wm-deploy's recording and wm-collect's on a real arm. The thread runs at
    normal priority on `cpus` (None: the cores it inherits), whatever the control thread that starts it
    runs under (`realtime.ordinary_scheduling`)."""

    def __init__(self, writer: Any, cpus: tuple[int, ...] | None = None) -> None:
        self.writer = writer
        self._cpus = cpus
        self.n_steps = 0  # rows given (queued)
        self.steps = 0  # rows the writer took (0 once `end` discarded them)
        self.unwritten = 0  # of those, rows taken since the disk began refusing writes (0: it is not)
        self.stopped: str | None = None  # why the recording stopped before the episode's end
        self._rows: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="wm-recorder", daemon=True)
        self._thread.start()

    def add_step(self, row: Mapping[str, Any]) -> None:
        """Queue one step's row (its arrays copied); never blocks on the disk."""
        if self.stopped is None:
            self._rows.put({k: np.array(v, copy=True) for k, v in row.items()})
            self.n_steps += 1

    def _write(self) -> None:
        ordinary_scheduling(self._cpus)
        while (row := self._rows.get()) is not _DONE:
            if self.stopped is not None:
                continue
            try:
                self.writer.add_step(row)
                self.steps += 1
                self.unwritten = 0
            except OSError as e:  # a flush the disk refused: the writer keeps the row, and retries
                self.steps += 1
                self.unwritten += 1
                if self.unwritten >= MAX_UNWRITTEN:
                    self.stopped = (
                        f"step {self.steps - 1}: the disk refused writes for {self.unwritten} steps "
                        f"({type(e).__name__}: {first_line(e)})"
                    )
            except Exception as e:  # noqa: BLE001 - said at the end; the robot is not stopped for it
                self.stopped = f"step {self.steps} was refused ({type(e).__name__}: {first_line(e)})"

    def close(self) -> None:
        """Wait for the queued rows to be written (or refused); idempotent."""
        if self._thread.is_alive():
            self._rows.put(_DONE)
            self._thread.join()

    def end(self, info: Mapping[str, Any]) -> str | None:
        """Commit the episode with `info` (and `recording_stopped` when it stopped early; nothing when no
        step was taken: discarded). Returns a line to say when the recording stopped early."""
        self.close()
        if self.steps == 0:
            self.writer.discard()
        else:
            try:
                self.writer.end(
                    dict(info) if self.stopped is None else {**info, "recording_stopped": self.stopped}
                )
            except OSError as e:  # still no space: the run goes on; the next episode tries again
                self.writer.discard()
                lost, self.steps = self.steps, 0
                return (
                    f"the disk refused the episode's recording ({type(e).__name__}: {first_line(e)}); "
                    f"its {lost} steps were not saved"
                )
        if self.stopped is None:
            return None
        kept = f"the {self.steps} steps before it are kept" if self.steps else "the episode was not saved"
        return f"the recording stopped at {self.stopped}; {kept}"

    def discard(self) -> None:
        self.close()
        self.writer.discard()
