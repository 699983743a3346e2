"""The safety layer every command passes on its way to the robot, and the watchdog.

On every tick, whatever the controller produced goes through `SafetyLayer.filter` before
`send_action`: a non-finite or misshapen action is never sent (the last safe command is held and
the event counted), actions are clipped to the robot's limits and to an optional workspace box,
and the change per tick of position targets is capped (`max_step`, LeRobot's
`max_relative_target` idea, against the last command rather than a bus read, so it costs nothing
per tick; the first command of a run against the present position, `start_from`, which refuses to
start from a reading it cannot cap from), and after each send follows what the robot reports it
actually sent (`sent`). The watchdog
turns "no fresh valid action" into holding position after `hold_after_s` and into a controlled stop
(the run ends with a message) after `stop_after_s`. Nothing here turns torque off.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from robots.base import Feature

# bit i of a recorded tick's "safety" is EVENTS[i]: new events go at the end
EVENTS = (
    "non_finite",
    "bad_shape",
    "clipped",
    "workspace",
    "step_capped",
    "hold",
    "stop",
    "robot_out_of_limits",  # the robot reported sending a command outside its limits (its driver's clamp)
)


# why a run ends at a command its robot reports sending outside the limits (the runtime and wm-collect)
OUT_OF_LIMITS = (
    "it reports sending a command outside its limits (its driver's own clamp around a position reading: "
    "check the sensors); nothing more was sent"
)


@dataclass(frozen=True)
class SafetyConfig:
    """max_step: per-tick change cap of position targets, in action units (a number for every dimension
    or one per dimension); None: `max_step_fraction` of each dimension's range (the default), or no cap
    when the robot has no limits. workspace_low / workspace_high: an extra box on the action (e.g. an
    end-effector position); None: none. hold_after_s / stop_after_s: the watchdog (see module doc)."""

    max_step: float | tuple[float, ...] | None = None
    max_step_fraction: float = 0.1
    workspace_low: tuple[float, ...] | None = None
    workspace_high: tuple[float, ...] | None = None
    hold_after_s: float = 0.5
    stop_after_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_step is not None:
            steps = np.asarray(self.max_step, dtype=np.float64)
            if steps.ndim > 1 or steps.size == 0 or not np.all(steps > 0):  # NaN is not > 0
                raise ValueError(
                    f"max_step must be a positive number or one per dimension, got {self.max_step}"
                )
        for name, none in (("workspace_low", -np.inf), ("workspace_high", np.inf)):
            bound = getattr(self, name)
            if bound is None:
                continue
            values = np.asarray(bound, dtype=np.float64)
            if np.any(np.isnan(values)):
                raise ValueError(f"{name} holds NaN: give a number (or {none} for no bound) per dimension")
            if np.any(values == -none):  # (a lower bound of +inf clipped every command to the upper limit)
                raise ValueError(f"{name} holds {-none}: {none} is no bound on a dimension")
        if not 0 < self.hold_after_s <= self.stop_after_s < np.inf:  # inf: a silent controller held for ever
            raise ValueError(
                f"need 0 < hold_after_s <= stop_after_s < inf, got {self.hold_after_s}, {self.stop_after_s}"
            )
        if not 0 < self.max_step_fraction <= 1:
            raise ValueError(f"max_step_fraction must be in (0, 1], got {self.max_step_fraction}")
        if (self.workspace_low is None) != (self.workspace_high is None):
            raise ValueError("give both workspace_low and workspace_high, or neither")


@dataclass
class SafetyLayer:
    """Filters commands for one robot. `feature`: the robot's action feature (shape, limits);
    `positions`: actions are position targets (the step cap applies, holding repeats the last
    command), not deltas, velocities or forces (holding sends zeros)."""

    feature: Feature
    positions: bool
    cfg: SafetyConfig = field(default_factory=SafetyConfig)
    events: Counter = field(default_factory=Counter)
    last: np.ndarray | None = None  # the last command sent

    def __post_init__(self) -> None:
        shape = self.feature.shape
        self.low = np.broadcast_to(
            np.asarray(self.feature.low if self.feature.low is not None else -np.inf, float), shape
        )
        self.high = np.broadcast_to(
            np.asarray(self.feature.high if self.feature.high is not None else np.inf, float), shape
        )
        self.step = self._step_cap(shape)
        self.box: tuple[np.ndarray, np.ndarray] | None = None  # the workspace, within the limits
        if self.cfg.workspace_low is not None:
            wl = np.asarray(self.cfg.workspace_low, float)
            wh = np.asarray(self.cfg.workspace_high, float)
            if wl.shape != shape or wh.shape != shape or np.any(wl > wh):
                raise ValueError(
                    f"workspace bounds must be two {shape} boxes with low <= high, got {wl} and {wh}"
                )
            self.box = np.maximum(self.low, wl), np.minimum(self.high, wh)
            outside = np.flatnonzero(self.box[0] > self.box[1])
            if len(outside):  # (every command was clipped to a corner of the limits)
                i = int(outside[0])
                raise ValueError(
                    f"the workspace's dimension {i} [{wl.flat[i]:g}, {wh.flat[i]:g}] lies outside the "
                    f"robot's limits [{self.low.flat[i]:g}, {self.high.flat[i]:g}]"
                )

    def _step_cap(self, shape: tuple[int, ...]) -> np.ndarray | None:
        if self.cfg.max_step is not None:
            if not self.positions:  # it was ignored: a user believed a cap was on
                raise ValueError(
                    "max_step caps the change of position targets per tick; this robot's actions are not "
                    "positions (deltas, velocities), so it would cap nothing: leave it out"
                )
            try:
                cap = np.broadcast_to(np.asarray(self.cfg.max_step, float), shape)
            except ValueError:
                raise ValueError(
                    f"max_step must be one number or {shape[-1]}, got {self.cfg.max_step}"
                ) from None
            return cap
        if not self.positions:
            return None
        span = self.high - self.low
        if not np.any(np.isfinite(span)):
            return None  # no limits to take a fraction of
        return span * self.cfg.max_step_fraction  # inf (no cap) on a dimension without limits

    def rest(self) -> np.ndarray | None:
        """The command that holds the robot still: the last target for position actions (before the first,
        the present position given to `start_from`), zeros for the others; None for a position robot with
        neither (hold = send nothing)."""
        if self.positions:
            return None if self.last is None else np.clip(self.last, self.low, self.high)
        return np.clip(np.zeros(self.feature.shape), self.low, self.high)

    def start_from(self, present: np.ndarray) -> str | None:
        """The robot's present position (position actions): the first command's step is capped from it
        (without it the first command is not capped). Returns why the run must not start, in one line:
        a reading the step cap cannot start from (not finite), or a joint further outside its limits
        than one step (every command within the limits would jump more than the cap); None when fine."""
        p = np.asarray(present, dtype=np.float64)
        if not self.positions or p.shape != self.feature.shape:
            return None
        if self.step is not None:
            bad = np.flatnonzero(~np.isfinite(p))
            if bad.size:
                return (
                    f"the robot's position reads {p[bad].tolist()} at dimension(s) {bad.tolist()}: the first "
                    "command's step cannot be capped from it; nothing was sent (check the sensors)"
                )
            outside = np.maximum(self.low - p, p - self.high)  # > 0 where outside the limits
            far = np.flatnonzero(outside > self.step)
            if far.size:
                i = int(far[0])
                lo, hi, step = self.low[i], self.high[i], self.step[i]
                return (
                    f"dimension {i} of the robot's position is {p[i]:.4g}, {outside[i]:.4g} outside its "
                    f"limits [{lo:.4g}, {hi:.4g}], more than one step ({step:.4g}): the first command "
                    "would jump; nothing was sent (move it within its range, or recalibrate)"
                )
        if np.all(np.isfinite(p)):
            self.last = p
        return None

    def filter(self, action: np.ndarray | None) -> np.ndarray | None:
        """The command to send for `action` (None: hold). Returns None only when there is nothing safe
        to send (a position robot before its first command)."""
        if action is None:
            return self._hold()
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.feature.shape:
            self.events["bad_shape"] += 1
            return self._hold()
        if not np.all(np.isfinite(a)):
            self.events["non_finite"] += 1
            return self._hold()
        clipped = np.clip(a, self.low, self.high)
        if np.any(clipped != a):
            self.events["clipped"] += 1
        if self.box is not None:
            boxed = np.clip(clipped, *self.box)
            if np.any(boxed != clipped):
                self.events["workspace"] += 1
            clipped = boxed
        if self.step is not None and self.last is not None:
            capped = np.clip(clipped, self.last - self.step, self.last + self.step)
            if np.any(capped != clipped):
                self.events["step_capped"] += 1
                if self.box is not None and np.any((capped < self.box[0]) | (capped > self.box[1])):
                    self.events["workspace"] += 1  # on its way into the box from outside it, at the cap
            clipped = capped
        self.last = clipped
        return clipped.copy()

    def sent(self, reported: np.ndarray | None, command: np.ndarray) -> np.ndarray:
        """What reached the robot for `command` (the last `filter` result): what the robot reports it sent
        (`Robot.send_action`'s return, e.g. after lerobot's own `max_relative_target` clamp) when that is
        a sound action within the limits, else `command` (a report outside the limits is counted:
        `robot_out_of_limits`). The step cap and the hold follow it from now on."""
        r = None if reported is None else np.asarray(reported, dtype=np.float64)
        sound = r is not None and r.shape == self.feature.shape and bool(np.all(np.isfinite(r)))
        if sound and np.any(
            (r < self.low - _SLACK * (1 + abs(self.low))) | (r > self.high + _SLACK * (1 + abs(self.high)))
        ):
            self.events["robot_out_of_limits"] += 1
            sound = False
        applied = r if sound else command
        self.last = np.array(applied, dtype=np.float64)
        return self.last.copy()

    def _hold(self) -> np.ndarray | None:
        cmd = self.rest()
        if cmd is not None and not self.positions:
            self.last = cmd
        return cmd


_SLACK = 1e-4  # relative: a report this far past a limit is its unit conversion's rounding, not a fault


@dataclass
class Watchdog:
    """Time since the last fresh valid action: `check(now)` says "ok", "hold" or "stop"."""

    cfg: SafetyConfig
    last_fresh: float | None = None
    state: str = "ok"
    stop_after_s: float | None = None  # the present wait's stop limit until a fresh action (None: cfg's)

    def fresh(self, now: float) -> None:
        self.last_fresh, self.state, self.stop_after_s = now, "ok", None

    def start(self, now: float, stop_after_s: float | None = None) -> None:
        """A first chunk is awaited from now on: a run's, or, with a longer `stop_after_s` (the arm
        holding meanwhile), the first after a human handed the robot back."""
        self.last_fresh, self.state, self.stop_after_s = now, "ok", stop_after_s

    def check(self, now: float) -> str:
        if self.last_fresh is None:
            return "ok"
        idle = now - self.last_fresh
        stop = self.cfg.stop_after_s if self.stop_after_s is None else self.stop_after_s
        self.state = "stop" if idle > stop else "hold" if idle > self.cfg.hold_after_s else "ok"
        return self.state
