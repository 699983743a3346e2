"""Leader-arm teleoperation through lerobot's teleoperators (the `lerobot` extra).

`LeaderArmDevice` builds a lerobot teleoperator by its registered type name (`so101_leader`,
`so100_leader`: Feetech motors, needing `feetech-servo-sdk`; `koch_leader`, `omx_leader`:
Dynamixel motors, needing `dynamixel-sdk`) and returns, at each `poll()`, its `get_action()`
(`{"<motor>.pos": value}`) as `TeleopState.joints` in the arm's motor order (`joint_names`, e.g.
shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper for the SO arms). Values
are lerobot's normalised units (degrees, or -100..100, and 0..100 for the gripper), the same
units as the matching lerobot follower arm; `ActionMapper.joint_scale` / `joint_offset` calibrate
anything else. The gripper is one of the joints, so `TeleopState.gripper` stays None.

Calibration: lerobot's own calibration file for `arm_id` (under `calibration_dir`, default
lerobot's cache) must exist. When the motors disagree with it, the file is written to the motors,
as lerobot does when you press ENTER at its prompt. Without one, connecting fails and says how
to run `lerobot-calibrate`, unless `calibrate=True` (lerobot's interactive calibration).

A leader arm has no buttons: episode commands (start, save, discard, re-record, quit) come from
`command_device`, typically a `KeyboardDevice`, which is connected and polled with the arm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from robots.base import RobotError
from robots.teleop.base import DeviceNotFoundError, TeleopDevice, TeleopState

# type name -> lerobot module whose import registers its config class
LEADER_MODULES = {
    "so100_leader": "lerobot.teleoperators.so_leader",
    "so101_leader": "lerobot.teleoperators.so_leader",
    "koch_leader": "lerobot.teleoperators.koch_leader",
    "omx_leader": "lerobot.teleoperators.omx_leader",
}
MOTOR_SDK = {
    "so100_leader": "feetech",
    "so101_leader": "feetech",
    "koch_leader": "dynamixel",
    "omx_leader": "dynamixel",
}


class LeaderArmDevice:
    """A lerobot leader arm as a teleop device.

    Args:
        port: serial port of the arm's motor bus (find it with `lerobot-find-port`).
        teleop_type: lerobot teleoperator type, one of `LEADER_MODULES`.
        arm_id: lerobot id of the arm; names its calibration file.
        calibration_dir: where lerobot's calibration file is; default lerobot's cache.
        use_degrees: SO arms only: joints in degrees (True) or -100..100 (False).
        calibrate: run lerobot's interactive calibration when the arm has none.
        command_device: device whose commands are merged into each poll (e.g. a keyboard).
    """

    name = "leader_arm"

    def __init__(
        self,
        port: str = "/dev/ttyACM0",
        teleop_type: str = "so101_leader",
        arm_id: str = "leader",
        calibration_dir: str | Path | None = None,
        use_degrees: bool = True,
        calibrate: bool = False,
        command_device: TeleopDevice | None = None,
    ) -> None:
        if teleop_type not in LEADER_MODULES:
            raise ValueError(f"leader arm type {teleop_type!r} is not one of {sorted(LEADER_MODULES)}")
        self.port = port
        self.teleop_type = teleop_type
        self.arm_id = arm_id
        self.calibration_dir = None if calibration_dir is None else Path(calibration_dir)
        self.use_degrees = use_degrees
        self.calibrate = calibrate
        self.command_device = command_device
        self._teleop: Any = None
        self._joint_names: list[str] = []
        self._connected = False

    # ------------------------------------------------------------------ lerobot teleoperator
    def teleoperator(self) -> Any:
        """The lerobot teleoperator (built on first use; opens nothing)."""
        if self._teleop is None:
            self._teleop = _build_teleoperator(
                self.teleop_type, self.port, self.arm_id, self.calibration_dir, self.use_degrees
            )
        return self._teleop

    @property
    def joint_names(self) -> list[str]:
        """Motor names in the order of `TeleopState.joints`."""
        return [k.removesuffix(".pos") for k in self.teleoperator().action_features]

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        if self._connected:
            return
        teleop = self.teleoperator()
        try:
            teleop.connect(calibrate=self.calibrate)
        except (ConnectionError, RuntimeError) as e:
            _close_quietly(teleop)
            raise DeviceNotFoundError(
                f"leader arm {self.teleop_type} on {self.port!r} did not answer ({e}); check that the port "
                "exists (`ls /dev/ttyACM* /dev/ttyUSB*`, or `lerobot-find-port`), that your user may open it "
                "(`sudo usermod -aG dialout $USER`, then log in again), and that the arm's motors are powered"
            ) from e
        if not teleop.is_calibrated:
            if not teleop.calibration:
                _close_quietly(teleop)
                raise RobotError(
                    f"leader arm {self.arm_id!r} has no calibration in {teleop.calibration_dir}; run "
                    f"`lerobot-calibrate --teleop.type={self.teleop_type} --teleop.port={self.port} "
                    f"--teleop.id={self.arm_id}` or pass calibrate=True"
                )
            teleop.bus.write_calibration(teleop.calibration)  # the file wins, as at lerobot's prompt
        if self.command_device is not None:
            self.command_device.connect()
        self._joint_names = self.joint_names
        self._connected = True

    def disconnect(self) -> None:
        if not self._connected:
            return
        self._connected = False
        if self.command_device is not None:
            self.command_device.disconnect()
        self._teleop.disconnect()

    def poll(self) -> TeleopState:
        if not self._connected:
            raise RuntimeError("leader arm: not connected; call connect() first")
        action = self._teleop.get_action()
        joints = np.array([action[f"{name}.pos"] for name in self._joint_names], dtype=np.float64)
        commands = [] if self.command_device is None else self.command_device.poll().commands
        return TeleopState(joints=joints, commands=commands)


def _build_teleoperator(
    teleop_type: str, port: str, arm_id: str, calibration_dir: Path | None, use_degrees: bool
) -> Any:
    import importlib

    try:
        importlib.import_module(LEADER_MODULES[teleop_type])
        from lerobot.teleoperators import TeleoperatorConfig, make_teleoperator_from_config
    except ImportError as e:
        raise DeviceNotFoundError(
            f"leader arm: lerobot is not installed ({e}); install the `lerobot` extra: "
            "pip install -e '.[lerobot]'"
        ) from e
    config_cls = TeleoperatorConfig.get_choice_class(teleop_type)
    kwargs: dict[str, Any] = {"port": port, "id": arm_id, "calibration_dir": calibration_dir}
    if "use_degrees" in {f.name for f in dataclasses.fields(config_cls)}:
        kwargs["use_degrees"] = use_degrees
    try:
        return make_teleoperator_from_config(config_cls(**kwargs))
    except ImportError as e:  # the motor SDK is imported when the bus is built
        sdk = MOTOR_SDK[teleop_type]
        raise DeviceNotFoundError(
            f"leader arm: the {sdk} motor SDK is missing ({e}); pip install 'lerobot[{sdk}]'"
        ) from e


def _close_quietly(teleop: Any) -> None:
    """Close the serial port after a failed connect, without talking to the motors."""
    try:
        if teleop.bus.is_connected:
            teleop.bus.port_handler.closePort()
    except Exception:  # noqa: BLE001 - best effort on an already failed connection
        pass
