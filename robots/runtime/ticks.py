"""What an episode of the runtime (`robots.runtime.loop`) recorded: a row a tick (`TickRecord`, kept
in columns by `TickLog`), a row a chunk (`ChunkRecord`), and the episode's outcome (`EpisodeOutcome`),
which the report (`robots.runtime.report`) and the recording read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NO_CHUNK = -1  # the chunk number recorded for a held command


@dataclass
class TickRecord:
    """One tick: its nominal time, when it started and sent, the observation's capture time, what was
    sent (what the robot reports reached it, e.g. after its driver's own clamping; None: nothing), the
    chunk and index it came from (NO_CHUNK: a held command or a human's), its due time, the safety
    events of this tick, and whether a human had taken over."""

    nominal: float
    started: float
    captured: float
    sent_at: float
    command: np.ndarray | None
    chunk: int
    index: int
    due: float
    events: tuple[str, ...] = ()
    intervention: bool = False


class TickLog:
    """An episode's `TickRecord`s, kept as columns: a list of records held about 0.7 kB a tick for the
    whole episode (1 GB after eight hours at 50 Hz, the length of one long real-arm episode); columns
    hold the numbers alone (8 bytes each, the command's included). Appended to, read as a sequence of
    `TickRecord`s (an index, a slice, iteration), rebuilt on each read."""

    _FLOATS = ("nominal", "started", "captured", "sent_at", "due")
    _INTS = ("chunk", "index")
    _FLAGS = ("sent", "intervention")  # a command was sent, a human's tick

    def __init__(self) -> None:
        self._n, self._cap = 0, 0
        self._floats = np.zeros((0, len(self._FLOATS)))
        self._ints = np.zeros((0, len(self._INTS)), np.int64)
        self._flags = np.zeros((0, len(self._FLAGS)), bool)
        self._commands: np.ndarray | None = None  # (cap, *command shape), its dtype: the first's
        self._events: dict[int, tuple[str, ...]] = {}  # the ticks that had any

    def append(self, t: TickRecord) -> None:
        if self._n == self._cap:
            self._grow(max(256, 2 * self._cap))
        i = self._n
        self._floats[i] = (t.nominal, t.started, t.captured, t.sent_at, t.due)
        self._ints[i] = (t.chunk, t.index)
        self._flags[i] = (t.command is not None, t.intervention)
        if t.command is not None:
            command = np.asarray(t.command)
            if self._commands is None:  # (its dtype: the first command's)
                self._commands = np.zeros((self._cap, *command.shape), command.dtype)
            elif self._commands.dtype != object and self._commands.shape[1:] != command.shape:
                self._commands = self._mixed()
            self._commands[i] = command
        if t.events:
            self._events[i] = tuple(t.events)
        self._n += 1

    def _grow(self, cap: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            b = np.zeros((cap, *a.shape[1:]), a.dtype)
            b[: self._n] = a[: self._n]
            return b

        self._floats, self._ints, self._flags = grown(self._floats), grown(self._ints), grown(self._flags)
        if self._commands is not None:
            self._commands = grown(self._commands)
        self._cap = cap

    def _mixed(self) -> np.ndarray:
        """The command column as objects, for commands of more than one shape (never on a robot, whose
        action has one shape)."""
        assert self._commands is not None
        mixed = np.empty(self._cap, object)
        for j in range(self._n):
            mixed[j] = self._commands[j].copy()
        return mixed

    def __len__(self) -> int:
        return self._n

    def column(self, name: str) -> np.ndarray:
        """One number of every tick so far, (n,): a time (nominal, started, captured, sent_at, due), chunk,
        index, sent (a command was sent) or intervention; what the report reads, without a record a
        tick (rebuilding them took seconds after a long episode, and the memory the columns save)."""
        if name in self._FLOATS:
            return self._floats[: self._n, self._FLOATS.index(name)]
        if name in self._INTS:
            return self._ints[: self._n, self._INTS.index(name)]
        return self._flags[: self._n, self._FLAGS.index(name)]

    def commands(self) -> np.ndarray | None:
        """(n, *command shape) the commands sent (rows of ticks that sent none are zeros), or None when
        none was sent or their shapes differ."""
        if self._commands is None or self._commands.dtype == object:
            return None
        return self._commands[: self._n]

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(self._n))]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"tick {i} of {self._n}")
        return self._record(j)

    def __iter__(self) -> Any:
        return (self._record(j) for j in range(self._n))

    def _record(self, j: int) -> TickRecord:
        nominal, started, captured, sent_at, due = (float(v) for v in self._floats[j])
        sent, human = (bool(v) for v in self._flags[j])
        command = None
        if sent and self._commands is not None:
            command = np.array(self._commands[j], copy=True)
        chunk, index = (int(v) for v in self._ints[j])
        events = self._events.get(j, ())
        return TickRecord(nominal, started, captured, sent_at, command, chunk, index, due, events, human)


@dataclass
class ChunkRecord:
    """One chunk: the capture time of its observation, when it arrived, the model's seconds, how many
    of its actions were dropped as stale, how many were frozen, and when its first action was sent."""

    seq: int
    obs_time: float
    requested: float
    arrived: float
    seconds: float
    dropped_stale: int
    frozen: int
    first_sent: float | None = None


@dataclass
class EpisodeOutcome:
    """Everything measured in one run; `stopped` is the one-line reason when a fault ended it."""

    ticks: TickLog = field(default_factory=TickLog)
    chunks: list[ChunkRecord] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)
    underruns: int = 0
    skipped: int = 0
    stale_sent: int = 0
    success: bool | None = None
    stopped: str | None = None
    wall_s: float = 0.0
    started_at: float = 0.0
