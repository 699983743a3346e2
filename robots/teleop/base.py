"""The teleoperation device protocol and what a device reports.

A device reports, at each `poll()`, a `TeleopState`: a 6-d motion command in [-1, 1] (x, y, z,
roll, pitch, yaw in the device's frame), an optional gripper command, optional absolute joint
targets (leader arms), and the operator commands pressed since the last poll (start, save,
discard, re-record, quit). `robots.teleop.mapping` turns a state into a robot action with gains.

Hardware that is not here (keyboards under a display server, HID devices, joysticks, leader arms)
is replaced in tests by recorded event streams fed to the same parsing code as the real device.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from robots.base import Feature


class Command(enum.Enum):
    START = "start"
    SAVE = "save"
    DISCARD = "discard"
    RERECORD = "rerecord"
    QUIT = "quit"


@dataclass
class TeleopState:
    motion: np.ndarray = field(default_factory=lambda: np.zeros(6))  # (6,) in [-1, 1]
    gripper: float | None = None  # -1 open .. 1 closed
    joints: np.ndarray | None = None  # absolute joint targets (leader arms)
    commands: list[Command] = field(default_factory=list)  # pressed since the last poll, in order


class DeviceNotFoundError(RuntimeError):
    """The device is not plugged in or not accessible; the message says how to check."""


@runtime_checkable
class TeleopDevice(Protocol):
    name: str

    def connect(self) -> None: ...

    def disconnect(self) -> None: ...

    def poll(self) -> TeleopState: ...


@runtime_checkable
class JointDevice(Protocol):
    """A device reporting absolute joint targets (a leader arm). `check_drives(feature, converts)` refuses,
    in one line naming what to set, a robot whose actions (`feature`) are other joints or other units
    (`converts`: the mapper's joint_scale / joint_offset turn them into the robot's)."""

    def check_drives(self, feature: Feature, converts: bool = False) -> None: ...
