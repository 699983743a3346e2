"""A human taking over a deployed controller with a teleoperation device (and handing back).

While the operator moves the device (any motion axis beyond `deadband`), or from a START press to
the next one (a latch, for leader arms whose joints always report), the device's mapped action is
sent instead of the controller's, through the same safety layer, and the tick is recorded as an
intervention; the controller resumes from a fresh chunk computed after the hand-back
(`robots.runtime.loop`). Recorded runs thus hold corrections marked per step (HG-DAgger style).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from robots.real.lerobot_arm import first_line
from robots.teleop.base import Command, TeleopDevice, TeleopState


class Takeover:
    """`takeover(obs)` for `Runtime.run_episode`: the operator's action this tick, or None when the
    controller has control. `mapper(state, obs)` turns a device state into a robot action."""

    def __init__(
        self,
        device: TeleopDevice,
        mapper: Callable[[TeleopState, Mapping[str, np.ndarray]], np.ndarray],
        deadband: float = 0.05,
    ) -> None:
        if not 0 <= deadband < 1:
            raise ValueError(f"deadband must be in [0, 1), got {deadband}")
        self.device, self.mapper, self.deadband = device, mapper, deadband
        self.latched = False
        self.failures = 0  # polls in a row that raised

    def __call__(self, obs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        try:
            state = self.device.poll()
        except Exception as e:  # noqa: BLE001 - unplugged: the controller keeps (or takes back) the robot
            self.failures += 1
            self.latched = False
            if self.failures == 1:
                warnings.warn(
                    f"the takeover device {self.device.name} cannot be read ({type(e).__name__}: "
                    f"{first_line(e)}); the controller drives",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        self.failures = 0
        if Command.START in state.commands:
            self.latched = not self.latched
        moving = float(np.abs(np.asarray(state.motion, dtype=float)).max(initial=0.0)) > self.deadband
        if not (self.latched or moving):
            return None
        return np.asarray(self.mapper(state, obs), dtype=np.float64)

    def close(self) -> Any:
        return self.device.disconnect()
