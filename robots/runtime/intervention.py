"""A human taking over a deployed controller with a teleoperation device (and handing back).

While the operator moves the device (a motion axis that reaches the robot's actions beyond
`deadband`: a SpaceMouse cap pressed down does not take over a planar pusher), or from a START press
to the next one (a latch, for leader arms whose joints always report), the device's mapped action is
sent instead of the controller's, through the same safety layer, and the tick is recorded as an
intervention; the controller resumes from a fresh chunk computed after the hand-back
(`robots.runtime.loop`). Recorded runs thus hold corrections marked per step (HG-DAgger style).

The gripper stays as the controller left it (the last command sent) from the takeover's first tick
until the operator changes the device's gripper reading during it (a toggle press, the trigger): a
device's gripper state is its own (a keyboard's toggle starts open), and sending it at once opened a
gripper holding an object to correct the arm's path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from robots.base import failure
from robots.teleop.base import Command, TeleopDevice, TeleopState
from robots.teleop.mapping import robot_gains, robot_mapper
from wm.interrupt import reraise_lost


class Takeover:
    """`takeover(obs, last)` for `Runtime.run_episode`: the operator's action this tick, or None when the
    controller has control; `last` is the last command sent (None before the first). `mapper(state,
    obs)` turns a device state into a robot action; `axes`: the device motion axes that reach it;
    `gripper`: the mapper's gripper mode when the action's last dimension is the gripper, else None;
    `positions`: the robot's actions are position targets (`robot_takeover` gives the four for a robot)."""

    def __init__(
        self,
        device: TeleopDevice,
        mapper: Callable[[TeleopState, Mapping[str, np.ndarray]], np.ndarray],
        deadband: float = 0.05,
        axes: Sequence[int] = range(6),
        gripper: str | None = None,
        max_failures: int = 3,
        positions: bool = True,
    ) -> None:
        if not 0 <= deadband < 1:
            raise ValueError(f"deadband must be in [0, 1), got {deadband}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        self.max_failures = max_failures  # failed polls in a row that end a takeover
        self.positions = positions  # the robot's actions are position targets (`Robot.position_actions`)
        self.device, self.mapper, self.deadband = device, mapper, deadband
        self.axes, self.gripper = list(axes), gripper
        self.latched = False
        self.active = False  # the operator had the robot on the last poll
        self.owns_gripper = False  # the operator changed the gripper during this takeover
        self._grip: float | None = None  # the gripper reading at the takeover's start (before: the last poll)
        self.failures = 0  # polls in a row that raised

    def __call__(self, obs: Mapping[str, np.ndarray], last: np.ndarray | None = None) -> np.ndarray | None:
        try:
            state = self.device.poll()
        except Exception as e:  # noqa: BLE001 - unplugged: the controller keeps (or takes back) the robot
            reraise_lost(e)  # an interrupt that ctypes turned into another error
            self.failures += 1
            if self.active and self.failures < self.max_failures and last is not None:
                # a glitch (a corrupt status packet on a leader arm's bus): the operator keeps the robot,
                # which holds (it was handed back at once, the latch lost): its last command where
                # actions are positions; zeros where they are steps, velocities or forces (repeating the
                # last one moved the arm on), the gripper's kept
                held = np.array(last, dtype=np.float64)
                if not self.positions:
                    held[..., : -1 if self.gripper is not None else None] = 0.0
                return held
            if self.failures == 1 or self.active:
                warnings.warn(
                    f"the takeover device {self.device.name} cannot be read ({failure(e)}); the controller "
                    "drives",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.latched = self.active = False
            return None
        self.failures = 0
        if Command.START in state.commands:
            self.latched = not self.latched
        motion = np.abs(np.asarray(state.motion, dtype=float).reshape(6)[self.axes])
        moving = float(motion.max(initial=0.0)) > self.deadband
        gripped = self._gripper_changed(state)
        if not (self.latched or moving):
            self.active = False
            return None
        self.owns_gripper = (self.owns_gripper and self.active) or gripped
        self.active = True
        action = np.array(self.mapper(state, obs), dtype=np.float64)
        if self.gripper is not None and not self.owns_gripper and last is not None and len(last):
            action[-1] = float(np.asarray(last).reshape(-1)[-1])
        return action

    def _gripper_changed(self, state: TeleopState) -> bool:
        """Whether the device's gripper reading, as the mapper reads it (across 0 for a binary gripper),
        moved by more than `deadband` from where it was when the takeover began (until then, from the
        poll before); NaN always. Against the takeover's start, not the last poll: a trigger squeezed
        slowly (under `deadband` a tick: over about 1.3 s at 30 Hz) never took the gripper."""
        g = -1.0 if state.gripper is None else float(state.gripper)
        if self.gripper == "binary" and np.isfinite(g):
            g = 1.0 if g > 0 else -1.0
        changed = self._grip is not None and not (abs(g - self._grip) <= self.deadband)  # (NaN: changed)
        if not self.active or self._grip is None:  # (the controller drives: it follows the device)
            self._grip = g
        return changed

    def close(self) -> Any:
        return self.device.disconnect()


def robot_takeover(device: TeleopDevice, robot: Any, gains: Mapping[str, Any]) -> Takeover:
    """The takeover of `robot` by `device` (connected or not) with the robot's own teleop conventions
    under the user's `gains` (`robots.teleop.mapping.robot_gains`)."""
    mapper = robot_gains(robot, gains)
    axes, has_gripper = mapper.reach(robot.action_feature, robot.action_space)
    return Takeover(
        device,
        robot_mapper(mapper, robot),
        axes=axes,
        gripper=mapper.gripper if has_gripper else None,
        positions=bool(getattr(robot, "position_actions", True)),
    )
