"""Leader-arm teleoperation through lerobot's teleoperators (the `lerobot` extra).

`LeaderArmDevice` builds a lerobot teleoperator by its registered type name (`so101_leader`,
`so100_leader`: Feetech motors, needing `feetech-servo-sdk`; `koch_leader`, `omx_leader`:
Dynamixel motors, needing `dynamixel-sdk`) and returns, at each `poll()`, its `get_action()`
(`{"<motor>.pos": value}`) as `TeleopState.joints` in the arm's motor order (`joint_names`, e.g.
shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper for the SO arms). Values
are lerobot's normalised units, stated by `units` (`robots.real.units`): the SO leaders report their
body joints in degrees (or -100..100 with `use_degrees=False`), the Koch and OMX leaders in -100..100
only (lerobot gives them no `use_degrees`, and a `use_degrees` given for them is refused); grippers
0..100. A follower must take the same joints in the same units: `check_drives(feature)` refuses one
that does not, naming what to set (`ActionMapper.joint_scale` / `joint_offset` convert anything
else). The gripper is one of the joints, so `TeleopState.gripper` stays None.

Calibration: lerobot's own calibration file for `arm_id` (under `calibration_dir`, default
lerobot's cache) must exist, be JSON, and give every motor a range with range_min < range_max. When
the motors disagree with it, the file is written to the motors with their torque off (Dynamixel servos
refuse it otherwise), as lerobot does when you press ENTER at its prompt; then lerobot's `configure()`
sets the motors up. Without a usable file, connecting fails and says how to run `lerobot-calibrate`,
unless `calibrate=True` (lerobot's interactive calibration; a file that is not JSON is refused even
then). A failure while setting the motors up closes the port and says so in one line.

A leader arm has no buttons: episode commands (start, save, discard, re-record, quit) come from
`command_device`, typically a `KeyboardDevice`, which is connected and polled with the arm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from robots.base import Feature, RobotError, first_line
from robots.real.motors import (
    bus_call,
    calibration_problem,
    calibration_registers,
    close_port,
    holds,
    motor_check_problem,
    unreadable_calibration,
    write_calibration,
)
from robots.real.units import arm_units, bus_units
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
        use_degrees: SO leaders only: joints in degrees (True) or -100..100 (False); None: the type's
            own units (degrees for the SO leaders); refused for a type without the option.
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
        use_degrees: bool | None = None,
        calibrate: bool = False,
        command_device: TeleopDevice | None = None,
    ) -> None:
        if teleop_type not in LEADER_MODULES:
            raise ValueError(f"leader arm type {teleop_type!r} is not one of {sorted(LEADER_MODULES)}")
        for name, flag in (("use_degrees", use_degrees), ("calibrate", calibrate)):
            if not (isinstance(flag, bool) or (flag is None and name == "use_degrees")):  # "false" is true
                raise ValueError(f"{name} must be true or false, got {flag!r}")
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

    @property
    def units(self) -> str:
        """The units of `TeleopState.joints`, from the bus's norm modes, e.g. "deg; gripper 0..100"."""
        return bus_units(self.teleoperator().bus)

    @property
    def takes_use_degrees(self) -> bool:
        """Whether lerobot lets this leader type report degrees or -100..100 (`use_degrees`)."""
        return _takes_use_degrees(_config_class(self.teleop_type))

    def check_drives(self, feature: Feature, converts: bool = False) -> None:
        """Refuse (ValueError, one line naming what to set) to give this arm's joints as the actions
        `feature` when their names or order differ (where the feature names them) or their units do
        (where it states them, unless `converts`: the mapper's joint_scale / joint_offset are set)."""
        names = tuple(self.joint_names)
        if feature.names and tuple(feature.names) != names:
            raise ValueError(
                f"leader arm {self.teleop_type} has joints ({', '.join(names)}) but the robot's actions "
                f"are ({', '.join(feature.names)}); use the leader of the follower's kind "
                "(device_options.teleop_type)"
            )
        units = self.units
        if converts or not feature.units or feature.units == units:
            return
        raise ValueError(
            f"leader arm {self.teleop_type} reports its joints in {units!r} but the robot's actions are "
            f"in {feature.units!r}; {self._units_fix(feature.units)}, or convert them with "
            "gains.joint_scale and gains.joint_offset"
        )

    def _units_fix(self, wanted: str) -> str:
        if wanted not in (arm_units(True), arm_units(False)):
            return "give the robot this arm's units"
        if self.takes_use_degrees:
            return f"set device_options.use_degrees={str(wanted == arm_units(True)).lower()}"
        mine = str(self.units == arm_units(True)).lower()
        return f"set robot_options.use_degrees={mine} ({self.teleop_type} has no use_degrees option)"

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        if self._connected:
            return
        teleop = self.teleoperator()
        if self.command_device is not None:
            self.command_device.connect()
        try:
            self._open(teleop)
        except BaseException:
            if self.command_device is not None:
                self.command_device.disconnect()
            raise
        self._joint_names = self.joint_names
        self._connected = True

    def _open(self, teleop: Any) -> None:
        """lerobot's `connect()` step by step, as `LerobotArm` connects: each failure gets its own one-line
        message and closes the port, and a calibration file that disagrees with the motors is written
        with their torque off, before `configure()` turns the gripper's on."""
        try:
            teleop.bus.connect()
        except (ConnectionError, RuntimeError) as e:
            close_port(teleop.bus)
            some = motor_check_problem(e, teleop.bus)
            if some is not None:  # the port answered
                raise DeviceNotFoundError(f"leader arm {self.teleop_type} on {self.port!r}: {some}") from e
            raise DeviceNotFoundError(
                f"leader arm {self.teleop_type} on {self.port!r} did not answer ({first_line(e)}); check "
                "that the port exists (`ls /dev/ttyACM* /dev/ttyUSB*`, or `lerobot-find-port`), that your "
                "user may open it (`sudo usermod -aG dialout $USER`, then log in again), and that the arm's "
                "motors are powered"
            ) from e
        if not teleop.calibration and not self.calibrate:
            close_port(teleop.bus)
            raise RobotError(
                f"leader arm {self.arm_id!r} has no calibration in {teleop.calibration_dir}; run "
                f"`lerobot-calibrate --teleop.type={self.teleop_type} --teleop.port={self.port} "
                f"--teleop.id={self.arm_id}` "
                "or give calibrate=true (in wm-collect and wm-deploy: +device_options.calibrate=true)"
            )
        problem = calibration_problem(teleop) if teleop.calibration else None
        if problem is not None and not self.calibrate:  # lerobot failed at the first read
            close_port(teleop.bus)
            raise RobotError(
                f"leader arm {self.arm_id!r}: {problem}; move it away and calibrate the arm again with "
                f"`lerobot-calibrate --teleop.type={self.teleop_type} --teleop.port={self.port} "
                f"--teleop.id={self.arm_id}` "
                "or give calibrate=true (in wm-collect and wm-deploy: +device_options.calibrate=true)"
            )
        try:
            registers = None if problem is not None else calibration_registers(teleop.bus, teleop.calibration)
            if registers is None or not holds(teleop.bus, registers):
                if self.calibrate:
                    if problem is not None:  # lerobot would offer the unusable file (ENTER wrote it)
                        teleop.calibration = {}
                    teleop.calibrate()  # lerobot's interactive calibration
                else:  # the file wins, as at lerobot's prompt
                    write_calibration(teleop.bus, teleop.calibration, registers)
            teleop.configure()
        except Exception as e:
            close_port(teleop.bus)
            raise RobotError(
                f"leader arm {self.teleop_type} on {self.port!r}: setting up its motors failed "
                f"({first_line(e)}); check its power and cables, and that {teleop.calibration_fpath} is "
                f"this arm's calibration (else run `lerobot-calibrate --teleop.type={self.teleop_type} "
                f"--teleop.port={self.port} --teleop.id={self.arm_id}`)"
            ) from e
        except BaseException:  # Ctrl-C at lerobot's calibration prompt
            close_port(teleop.bus)
            raise

    def disconnect(self) -> None:
        if not self._connected:
            return
        self._connected = False
        try:
            self._teleop.disconnect()
        except Exception:  # noqa: BLE001 - e.g. unplugged: lerobot's torque-off write fails; close the port
            close_port(self._teleop.bus)
        finally:
            if self.command_device is not None:
                self.command_device.disconnect()

    def poll(self) -> TeleopState:
        if not self._connected:
            raise RuntimeError("leader arm: not connected; call connect() first")
        with bus_call(self.name, self.port, self._teleop.bus):
            action = self._teleop.get_action()
        joints = np.array([action[f"{name}.pos"] for name in self._joint_names], dtype=np.float64)
        commands = [] if self.command_device is None else self.command_device.poll().commands
        return TeleopState(joints=joints, commands=commands)


def _config_class(teleop_type: str) -> Any:
    """lerobot's teleoperator config class for `teleop_type` (importing lerobot registers it)."""
    import importlib

    try:
        importlib.import_module(LEADER_MODULES[teleop_type])
        from lerobot.teleoperators import TeleoperatorConfig
    except ImportError as e:
        raise DeviceNotFoundError(
            f"leader arm: lerobot is not installed ({e}); install the `lerobot` extra: "
            "pip install -e '.[lerobot]'"
        ) from e
    return TeleoperatorConfig.get_choice_class(teleop_type)


def _takes_use_degrees(config_cls: Any) -> bool:
    return "use_degrees" in {f.name for f in dataclasses.fields(config_cls)}


def _build_teleoperator(
    teleop_type: str, port: str, arm_id: str, calibration_dir: Path | None, use_degrees: bool | None
) -> Any:
    config_cls = _config_class(teleop_type)
    from lerobot.teleoperators import make_teleoperator_from_config

    kwargs: dict[str, Any] = {"port": port, "id": arm_id, "calibration_dir": calibration_dir}
    if use_degrees is not None:
        if not _takes_use_degrees(config_cls):
            raise ValueError(
                f"device_options.use_degrees: leader arm {teleop_type} has no use_degrees option (lerobot "
                "reports its joints in -100..100 only); leave it unset, and give the follower "
                "use_degrees=false to match"
            )
        kwargs["use_degrees"] = use_degrees
    try:
        return make_teleoperator_from_config(config_cls(**kwargs))
    except ImportError as e:  # the motor SDK is imported when the bus is built
        sdk = MOTOR_SDK[teleop_type]
        raise DeviceNotFoundError(
            f"leader arm: the {sdk} motor SDK is missing ({e}); pip install 'lerobot[{sdk}]'"
        ) from e
    except Exception as e:
        fpath = unreadable_calibration(e)
        if fpath is None:
            raise
        raise RobotError(
            f"leader arm {arm_id!r}: the calibration file {fpath} cannot be read ({first_line(e)}); move it "
            f"away and run `lerobot-calibrate --teleop.type={teleop_type} --teleop.port={port} "
            f"--teleop.id={arm_id}`"
        ) from e
