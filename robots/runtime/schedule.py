"""When each action of a chunk runs: timestamps, stale dropping, stitching, interpolation.

Everything here is a pure function of the chunks, the clock readings passed in and the measured
latency; nothing reads a clock, so every decision is tested with a manual clock.

Times are seconds on one monotonic clock. A chunk computed from an observation captured at
`obs_time` has its action k due at `obs_time + k * step_s + action_latency_s` (the robot's own
actuation latency, configured per robot). The control loop ticks every `period_s`; the action a
tick sends is the one whose due time is nearest the tick (within half a period), or, with
interpolation, the line between the two due times around the tick (for a policy whose step is
longer than the robot's period).

Stitching merges a newly arrived chunk into the pending actions:

    replace    the new chunk's actions replace every pending action from its first one on
               (Diffusion Policy, UMI: the newest plan wins).
    average    LeRobot's async merge: where both have an action for the same time, 0.3 old +
               0.7 new; the new chunk's other actions as they are; old actions beyond it dropped.
    ensemble   ACT's temporal ensembling: every chunk's prediction for a time is kept, the action
               is their weighted mean with weight exp(-m * i), i = 0 for the oldest prediction (m < 0
               favours the newest, as `policies.chunking.TemporalEnsembler` takes it).
    inpaint    replace, for controllers that were given the committed prefix (`committed`) and
               start their chunk with it (real-time chunking): the seam is inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

STITCHING = ("replace", "average", "ensemble", "inpaint")
AVERAGE_OLD_WEIGHT = 0.3  # LeRobot 0.4.4's default aggregate: 0.3 * old + 0.7 * new


@dataclass(frozen=True)
class Chunk:
    """Raw actions (T, Da) computed from the observation captured at `obs_time`; action k is due at
    `obs_time + k * step_s + latency`. `seq` numbers the chunks of a run from 0."""

    actions: np.ndarray
    obs_time: float
    step_s: float
    seq: int = 0

    def __post_init__(self) -> None:
        a = np.asarray(self.actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] < 1:
            raise ValueError(f"a chunk is (T, Da) actions with T >= 1, got shape {a.shape}")
        if not self.step_s > 0:
            raise ValueError(f"a chunk's step must be positive, got {self.step_s}")
        object.__setattr__(self, "actions", a)

    def due_times(self, latency_s: float = 0.0) -> np.ndarray:
        """(T,) due time of every action."""
        return self.obs_time + latency_s + self.step_s * np.arange(len(self.actions))


@dataclass
class Slot:
    """One pending action: due time, value (Da,), the chunk and index it came from. An ensembled slot
    keeps the log of its predictions' total weight and how many it averages."""

    due: float
    action: np.ndarray
    chunk: int
    index: int
    log_weight: float = 0.0  # the first prediction's weight: exp(0)
    predictions: int = 1
    sent: bool = False


@dataclass(frozen=True)
class Pick:
    """What a tick sends: the action, the slot it came from (`chunk`, `index`), when it is due, and
    whether it was made for this tick (interpolated between two slots, or the last action repeated while
    it still covers the tick): then it is due at the tick it was made for."""

    action: np.ndarray
    chunk: int
    index: int
    due: float
    interpolated: bool = False


@dataclass(frozen=True)
class MergeResult:
    """How a chunk was taken in: actions kept, and actions dropped because their time had passed."""

    kept: int
    dropped_stale: int


# due times this close count as equal: an action due exactly half a period from two ticks (a latency
# an odd multiple of half a period) was taken for the earlier tick and then judged stale by float noise
TIE_S = 1e-9


def stale_count(due: np.ndarray, next_tick: float, period_s: float) -> int:
    """How many leading actions (due times ascending) can no longer be sent: their nearest tick is
    before `next_tick`, the first tick still to run (measured time, never an estimate)."""
    return int(np.searchsorted(due, next_tick - period_s / 2 - TIE_S, side="left"))


@dataclass
class Timeline:
    """The pending actions of one run, sorted by due time, and the stitching that merges new chunks.

    `period_s`: the control loop's period; `latency_s`: the robot's action latency (added to every due
    time); `stitching`: one of `STITCHING`; `ensemble_m`: ACT's coefficient for "ensemble";
    `interpolate`: between slots, send the straight line between their actions (for a policy step
    longer than the period) instead of holding the nearest slot.
    """

    period_s: float
    latency_s: float = 0.0
    stitching: str = "replace"
    ensemble_m: float = 0.01
    interpolate: bool = False
    slots: list[Slot] = field(default_factory=list)
    last: Slot | None = None  # the slot the latest tick sent (an interpolated tick: its left end)
    step_s: float = 0.0  # the policy step of the latest chunk merged

    def __post_init__(self) -> None:
        if self.stitching not in STITCHING:
            raise ValueError(f"stitching must be one of {', '.join(STITCHING)}, got {self.stitching!r}")
        if not self.period_s > 0:
            raise ValueError(f"the control period must be positive, got {self.period_s}")
        if not math.isfinite(self.ensemble_m):
            raise ValueError(f"ensemble_m must be a finite number, got {self.ensemble_m}")

    def __len__(self) -> int:
        return len(self.slots)

    def clear(self) -> None:
        self.slots, self.last = [], None

    def holds_last(self, tick_time: float) -> bool:
        """Whether the last action sent still covers the tick at `tick_time`: a policy slower than the
        loop means each action for a whole policy step, also the last of a chunk."""
        return self.last is not None and tick_time < self.last.due + self.step_s - self.period_s / 2

    def repeat_last(self, tick_time: float) -> Pick | None:
        """The last action sent again, for the tick at `tick_time`, while it still covers it
        (`holds_last`): what an absolute action (a position target, a force) means between the slots
        of a policy slower than the loop. None when it does not cover the tick."""
        if not self.holds_last(tick_time):
            return None
        last = self.last
        return Pick(last.action.copy(), last.chunk, last.index, tick_time, interpolated=True)

    # ------------------------------------------------------------------ merging
    def merge(self, chunk: Chunk, next_tick: float) -> MergeResult:
        """Take in `chunk`, which arrived before the tick at `next_tick`: its actions whose time has
        passed are dropped (counted), the rest stitched into the pending ones."""
        due = chunk.due_times(self.latency_s)
        stale = stale_count(due, next_tick, self.period_s)
        new = [Slot(float(due[k]), chunk.actions[k].copy(), chunk.seq, k) for k in range(stale, len(due))]
        if new and stale and self.interpolate:  # the line to the first slot starts at the chunk's own
            # newest passed action, never sent (the seam tick held, or blended the old chunk's action
            # with this one's next, a value neither predicted)
            k = stale - 1
            new.insert(0, Slot(float(due[k]), chunk.actions[k].copy(), chunk.seq, k, sent=True))
        if new:
            self.slots = self._stitch(new, chunk.step_s)
        self.step_s = chunk.step_s
        return MergeResult(kept=sum(not s.sent for s in new), dropped_stale=stale)

    def _stitch(self, new: list[Slot], step_s: float) -> list[Slot]:
        first = new[0].due - step_s / 2
        before = [s for s in self.slots if s.due < first]
        if self.stitching in ("replace", "inpaint"):
            return before + new
        old = {round((s.due - new[0].due) / step_s): s for s in self.slots if s.due >= first}
        for i, s in enumerate(new):
            o = old.get(i)
            if o is None or abs(o.due - s.due) > step_s / 2:
                continue
            if self.stitching == "average":
                s.action = AVERAGE_OLD_WEIGHT * o.action + (1 - AVERAGE_OLD_WEIGHT) * s.action
            else:  # ensemble: the new prediction is the o.predictions-th (0-based) for this time; the
                # weights in logs, so no m overflows them (m < 0: each weighs more than all before it)
                log_new = -self.ensemble_m * o.predictions
                total = float(np.logaddexp(o.log_weight, log_new))
                share = math.exp(log_new - total)  # the new prediction's part of the mean, in (0, 1]
                s.action = (1 - share) * o.action + share * s.action
                s.log_weight, s.predictions = total, o.predictions + 1
        return before + new

    # ------------------------------------------------------------------ ticks
    def take(self, tick_time: float) -> tuple[Pick | None, int]:
        """The action for the tick at `tick_time` (its nominal time) and how many slots were passed
        over without ever being sent. Without interpolation it is the slot due within half a period
        of the tick, the nearest one when a policy faster than the loop has several (None between
        the slots of a policy slower than the loop, or when nothing is pending); with it, the
        straight line between the slots due around the tick. Slots whose time is over are consumed."""
        half = self.period_s / 2
        dues = [s.due for s in self.slots]
        if not self.interpolate:
            i = int(np.searchsorted(dues, tick_time + half, side="right"))  # slots [0, i) are due by now
            j = i - 1  # a policy faster than the loop has several: the nearest the tick (ties: earlier)
            while j > 0 and abs(dues[j - 1] - tick_time) <= abs(dues[j] - tick_time) + TIE_S:
                j -= 1
            return self._pick(j, j + 1, tick_time - half)
        i = int(np.searchsorted(dues, tick_time + TIE_S, side="right"))  # slots [0, i) at or before the tick
        if i == 0 or i == len(self.slots):  # before the first slot, or past the last: no line to draw
            return self._pick(i - 1, i, tick_time - half)
        left, right = self.slots[i - 1], self.slots[i]
        w = (tick_time - left.due) / (right.due - left.due)
        skipped = self._consume(i - 1)  # `left` stays the anchor until the tick passes `right`
        left.sent, self.last = True, left
        action = (1 - w) * left.action + w * right.action
        if w <= TIE_S:  # exactly on `left`
            return Pick(action, left.chunk, left.index, left.due), skipped
        return Pick(action, left.chunk, left.index, tick_time, True), skipped  # due now: made for this tick

    def _consume(self, n: int) -> int:
        """Drop the first n slots; returns how many of them were never sent."""
        gone, self.slots = self.slots[:n], self.slots[n:]
        return sum(not s.sent for s in gone)

    def _pick(self, j: int, i: int, not_before: float) -> tuple[Pick | None, int]:
        """Send slot j (consuming slots [0, i)) unless it is due before `not_before` (its tick is over)."""
        if j < 0:
            return None, 0
        current = self.slots[j]
        fresh = current.due >= not_before - TIE_S
        skipped = self._consume(j) + (self._consume(1) if not fresh else 0)
        if not fresh:
            return None, skipped
        if current.sent:  # already sent as an interpolation anchor at this very time
            self._consume(i - j)
            return None, skipped
        self._consume(i - j)
        current.sent, self.last = True, current
        return Pick(current.action.copy(), current.chunk, current.index, current.due), skipped

    def remaining_after(self, t: float) -> int:
        """Pending slots due after time t (how many ticks the queue can still feed from t on)."""
        return sum(1 for s in self.slots if s.due > t)

    def committed(self, obs_time: float, step_s: float, until: float, length: int) -> tuple[np.ndarray, int]:
        """The actions scheduled (the one the latest tick sent, then the pending ones) on the grid of a
        chunk about to be computed from the observation at `obs_time` (element j due at
        obs_time + j * step_s + latency), `length` of them at most, and how many are frozen: those due
        before `until` (from then on the new chunk can still be sent). Returns ((n, Da), d); n = 0 when
        nothing is scheduled at the observation's step."""
        anchor = self.last is not None and not (self.slots and self.slots[0] is self.last)
        known = ([self.last] if anchor else []) + self.slots
        if not known:
            return np.zeros((0, 0)), 0
        dues = np.array([s.due for s in known])
        acts = np.stack([s.action for s in known])
        grid = obs_time + self.latency_s + step_s * np.arange(length)
        inside = (grid >= dues[0] - step_s / 2) & (grid <= dues[-1] + step_s / 2)
        if not inside[0]:
            return np.zeros((0, acts.shape[1])), 0
        n = int(np.argmin(inside)) if not inside.all() else length
        out = np.stack([np.interp(grid[:n], dues, acts[:, d]) for d in range(acts.shape[1])], axis=1)
        frozen = int(np.searchsorted(grid[:n], until, side="left"))
        return out, min(frozen, n)


MAX_BEHIND = 3  # periods behind schedule after which the loop re-anchors (nearer: it skips to the slot due)


@dataclass
class TickSchedule:
    """The control loop's ticks: tick k of the schedule is due at `anchor + k * period`.

    `tick(began)` says which slot a tick that began at `began` serves and advances past it; a tick far
    behind (more than `MAX_BEHIND` periods: a hiccup) re-anchors the schedule at `began`, never bursting
    the missed ticks; one late by more than half a period serves the slot due now, the passed slots'
    actions dropped (`Timeline.take`'s skipped), never sent late or back to back (a burst of position
    targets is a jump of several step caps in a moment). `restart_if_passed(now)` restarts the
    schedule after a blocking wait (sync mode) that ran past the next tick's time; that tick's
    deadline is kept as the next tick's `nominal`, for its error."""

    anchor: float
    period: float
    k: int = 0  # ticks since the schedule was anchored
    missed: float | None = None  # the deadline a blocking wait made the robot miss

    @property
    def next_tick(self) -> float:
        """When the next tick is due."""
        return self.anchor + self.k * self.period

    def tick(self, began: float) -> tuple[float, float]:
        """(the time of the slot the tick that began at `began` serves, the tick's deadline for its error:
        the time it was due, `next_tick` before the call, or the deadline a blocking wait missed); the
        schedule moves past the slot served."""
        tick_t = self.next_tick
        self.k += 1
        nominal, self.missed = (tick_t if self.missed is None else self.missed), None
        if began - tick_t > MAX_BEHIND * self.period:
            self.anchor, self.k, tick_t = began, 1, began
        elif began - tick_t > self.period / 2:
            passed = int((began - tick_t) / self.period + 0.5)
            self.k, tick_t = self.k + passed, tick_t + passed * self.period
        return tick_t, nominal

    def restart_if_passed(self, now: float) -> None:
        """After a blocking wait that ended at `now`: past the next tick's time, the schedule restarts at
        `now`, and that tick's time is the deadline the next tick missed."""
        due = self.next_tick
        if now > due:
            self.missed, self.anchor, self.k = due, now, 0


def seam_jumps(sent: Sequence[np.ndarray], chunks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Jumps |a_t - a_(t-1)| (max over dims) between consecutive sent actions, split into those where
    the chunk changed (seams) and those inside a chunk."""
    a = np.asarray(sent, dtype=np.float64)
    c = np.asarray(chunks)
    if len(a) < 2:
        return np.zeros(0), np.zeros(0)
    jump = np.abs(np.diff(a, axis=0)).max(axis=1)
    seam = c[1:] != c[:-1]
    return jump[seam], jump[~seam]
