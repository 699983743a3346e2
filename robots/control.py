"""Fixed-rate control loops: pure scheduling functions plus a clock.

Deadlines are absolute (`start + k * period`), so the loop never drifts; an iteration that runs late
skips to the schedule's first slot at least half a period away (`RateLoop`) instead of bursting
through the missed ticks. The clock is a parameter: `MonotonicClock` for real
runs, `ManualClock` for tests and for as-fast-as-possible simulation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    """`time.monotonic`, with a sleep that wakes early and spins the last millisecond for precision."""

    spin_s: float = 0.001

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        remaining = t - time.monotonic()
        if remaining > self.spin_s:
            time.sleep(remaining - self.spin_s)
        while time.monotonic() < t:
            pass


@dataclass
class ManualClock:
    """A clock that only moves when told to (tests) or when a loop sleeps (it jumps to the deadline)."""

    t: float = 0.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)

    def advance(self, dt: float) -> None:
        self.t += dt


def next_deadline(start: float, period: float, tick: int) -> float:
    """Absolute end time of tick number `tick` (0-based) of a loop that started at `start`."""
    return start + (tick + 1) * period


@dataclass
class RateLoop:
    """Keeps a loop at `hz`: call `wait()` at the end of every iteration.

    Deadlines are absolute (no drift). After an iteration whose work ran past its deadline, the next one
    begins at the schedule's first slot at least half a period away; the slots in between are skipped
    (`skipped`), never caught up: each iteration of a teleoperation loop ends by sending one step-capped
    target, and catching up sent several within a few milliseconds.
    Records per-tick lateness; `overruns` counts iterations whose work ran past their deadline.
    """

    hz: float
    clock: Clock = field(default_factory=MonotonicClock)
    tick: int = field(default=0, init=False)  # the schedule's slot of the current iteration
    iterations: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)
    overruns: int = field(default=0, init=False)
    max_late_s: float = field(default=0.0, init=False)
    _start: float = field(default=0.0, init=False)
    _first: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        try:  # inf gave a zero period (ZeroDivisionError at the first late tick); a string, a TypeError
            ok = not isinstance(self.hz, bool) and math.isfinite(self.hz) and self.hz > 0
            ok = ok and math.isfinite(1.0 / self.hz)  # a period that is finite too
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"loop rate must be a positive finite number of Hz, got {self.hz!r}")
        self.period = 1.0 / self.hz
        self.restart()

    def restart(self) -> None:
        """Start a new schedule now (e.g. a teleoperated episode after an operator pause), its counts at 0."""
        self._start = self._first = self.clock.now()
        self.tick = self.iterations = self.skipped = self.overruns = 0
        self.max_late_s = 0.0

    def wait(self) -> float:
        """Sleep until this tick's deadline; returns how late the work finished (<= 0: on time)."""
        deadline = next_deadline(self._start, self.period, self.tick)
        now = self.clock.now()
        if deadline - now > 2 * self.period:
            # The clock went back (a deadline is never that far ahead of a clock that only moves forward):
            # resynchronize, this tick due now, instead of sleeping until a deadline of the old time.
            self._start = now - (self.tick + 1) * self.period
            deadline = now
        late = now - deadline
        if late > 0:
            self.overruns += 1
            self.max_late_s = max(self.max_late_s, late)
            skip = math.ceil((late + self.period / 2) / self.period - 1e-9)  # slots until one >= p/2 away
            self.tick += skip
            self.skipped += skip
            deadline += skip * self.period
        self.clock.sleep_until(deadline)
        self.tick += 1
        self.iterations += 1
        return late

    @property
    def achieved_hz(self) -> float:
        elapsed = self.clock.now() - self._first
        return self.iterations / elapsed if elapsed > 0 else 0.0
