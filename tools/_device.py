"""The teleop device of `wm-collect` and `wm-deploy`'s takeover, one way for both apps: `teleop=NAME`,
`device_options=`, `command_device=NAME` / `command_options=` (the episode commands of a device
without all the buttons: a leader arm, a SpaceMouse) and `gains=` (`ActionMapper`)."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from robots.registry import device_class
from tools._cli import UsageError, build, check

DEFAULT_COMMAND_DEVICE = "keyboard"  # wm-collect's and wm-deploy's command_device unless given
JOINT_GAINS = ("joint_scale", "joint_offset")  # the gains a leader arm's mapping reads; motion reads the rest


@dataclass(frozen=True)
class DeviceSettings:
    """`command_device` None: none (only where the device's motion alone is enough: a SpaceMouse taking
    over in wm-deploy)."""

    teleop: str
    device_options: Mapping[str, Any]
    command_device: str | None
    command_options: Mapping[str, Any]
    gains: Mapping[str, Any]

    @classmethod
    def of(cls, cfg: Any) -> DeviceSettings:
        """The settings of an app's config holding these five fields."""
        return cls(cfg.teleop, cfg.device_options, cfg.command_device, cfg.command_options, cfg.gains)

    def check(self, needs_start: bool) -> None:
        """Usage errors, in one line, before anything is opened. `needs_start`: the app cannot work without
        START presses (wm-collect's episodes); else only a device without motion (a leader arm) needs
        them (wm-deploy's takeover)."""
        from robots.teleop.mapping import ActionMapper

        if "command_device" in self.device_options:
            raise UsageError(
                "device_options.command_device: give the device for episode commands as command_device=NAME "
                "(its options as command_options)"
            )
        cls = device_class(self.teleop)
        _finite(check(cls, dict(self.device_options), "device_options"), "device_options")
        build(ActionMapper, dict(self.gains), "gains")
        joints = hasattr(cls, "check_drives")  # a leader arm: joint targets, no motion
        # (accepted, and the mapping never read them: a leader arm at gains.translation_gain=0.1 still
        # moved the follower 1:1)
        unused = sorted(k for k in self.gains if (k in JOINT_GAINS) != joints)
        if unused:
            named = " / ".join(JOINT_GAINS)
            why = (
                f"a leader arm's joints map through {named} alone"
                if joints
                else f"{named} convert a leader arm's joints"
            )
            raise UsageError(
                f"gains.{', gains.'.join(unused)}: teleop={self.teleop} does not use them ({why})"
            )
        if not takes_command_device(cls):  # its own buttons start and end episodes
            if self.command_options or self.command_device not in (None, DEFAULT_COMMAND_DEVICE):
                raise UsageError(
                    f"command_device, command_options: teleop={self.teleop} has its own START / SAVE "
                    "buttons; leave them out"
                )
            return
        if self.command_device is None:
            if needs_start or hasattr(cls, "check_drives"):  # a leader arm reports no motion
                raise UsageError(
                    f"teleop={self.teleop} has no START button: give command_device=NAME (e.g. keyboard)"
                )
            if self.command_options:
                raise UsageError("command_options apply to a command device: give command_device=NAME")
            return
        _finite(
            check(device_class(self.command_device), dict(self.command_options), "command_options"),
            "command_options",
        )

    def build(self, robot: Any) -> Any:
        """The device (not connected) with its command device; a device reporting joints (a leader arm)
        is refused, in one line, unless they are the joints of `robot`'s actions, in their units (or
        converted by gains.joint_scale / joint_offset, one value per joint)."""
        from robots.teleop.base import JointDevice
        from robots.teleop.mapping import ActionMapper

        cls = device_class(self.teleop)
        options = check(cls, dict(self.device_options), "device_options")  # (a layout a dataclass again)
        if takes_command_device(cls) and self.command_device is not None:
            commands = device_class(self.command_device)
            options["command_device"] = commands(
                **check(commands, dict(self.command_options), "command_options")
            )
        if not hasattr(cls, "check_drives"):
            self.check_motion(robot)
        device = cls(**options)
        _check_own_port(device, robot, self.teleop)
        if isinstance(device, JointDevice):
            mapper = ActionMapper(**self.gains)
            device.check_drives(robot.action_feature, converts=mapper.converts_joints)
            joints = device.joint_names  # a length the mapping refused at the first reading, arms set up
            for name in ("joint_scale", "joint_offset"):
                values = getattr(mapper, name)
                if values is not None and len(values) != len(joints):
                    raise UsageError(
                        f"gains.{name} has {len(values)} values for the {len(joints)} joints of "
                        f"{self.teleop} ({', '.join(joints)})"
                    )
        return device

    def check_motion(self, robot: Any) -> None:
        """Refuse, in one line, a motion device (a keyboard, a SpaceMouse, a gamepad) whose motion cannot
        drive `robot`'s actions (an arm that takes joint positions): the mapping raised at the operator's
        first touch, out of the control loop. A leader arm's joints are checked when it is built."""
        import numpy as np

        from robots.teleop.base import TeleopState
        from robots.teleop.mapping import present_action, robot_gains

        if hasattr(device_class(self.teleop), "check_drives"):  # a leader arm (joints, no motion)
            return
        mapper = robot_gains(robot, self.gains)
        feat = robot.action_feature
        current = None if present_action(robot) is None else np.zeros(feat.shape)
        try:  # a device at rest, the robot at zero (absolute actions without a present value: refused)
            mapper(TeleopState(), feat, robot.action_space, current=current)
        except ValueError as e:
            raise UsageError(f"teleop={self.teleop} cannot drive {robot.name}: {e}") from None


def _finite(values: Mapping[str, Any], path: str) -> None:
    """A device's number options (a SpaceMouse's full_scale, a keyboard's hold_s) are finite: NaN made a
    device report NaN motion, or hold every command; inf, move forever."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{path}.{name} must be a finite number, got {value}")


def takes_command_device(device_cls: type) -> bool:
    """A device without all the episode buttons (a leader arm, a SpaceMouse) takes another device for
    its episode commands."""
    return "command_device" in inspect.signature(device_cls).parameters


def _check_own_port(device: Any, robot: Any, name: str) -> None:
    """A device and a robot on one serial port (a leader arm and its follower, both on the default
    /dev/ttyACM0) refused, in one line: Linux opens a tty twice, and the leader's calibration and
    configuration went to the follower's motors (its limits rewritten, its torque turned off)."""
    ports = [getattr(device, "port", None), getattr(robot, "port", None)]
    if all(isinstance(p, str) for p in ports) and os.path.realpath(ports[0]) == os.path.realpath(ports[1]):
        raise UsageError(
            f"teleop={name} and the robot are both on {ports[1]}: give each its own port "
            "(device_options.port, robot_options.port; `lerobot-find-port` tells them apart)"
        )
