"""Real arms through lerobot's follower robots (the `lerobot` extra), as our `Robot`.

`LerobotArm` builds a lerobot follower by its registered type name: `so100_follower`,
`so101_follower` (Feetech STS3215 servos, `lerobot.robots.so_follower`, needing `feetech-servo-sdk`)
or `koch_follower` (Dynamixel servos, needing `dynamixel-sdk`). Only lerobot talks to the hardware;
this adapter adds what our `Robot` promises:

- Features before `connect()`: "state" (Dj,) float32, the joint positions in lerobot's motor order
  (e.g. shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper) and units (degrees,
  or -100..100 with `use_degrees=False`; the gripper 0..100), and one (H, W, 3) uint8 RGB image per
  camera. The joint limits (the features' low/high) are the calibrated ranges from lerobot's
  calibration file (one full turn, +-180 degrees, for a joint without one). A joint outside its range
  reads where it is (past 100, say), not at the range's end as lerobot's normalised reading says: the
  first command is step-capped from the true position, or refused when that is over a step away.
- `send_action(a)`: the action (Dj,) of absolute goal positions in those units is refused when it is
  misshapen or not finite (nothing reaches the bus) and clipped to the joint limits, then sent with
  lerobot's `send_action({"<motor>.pos": value})`; what was sent is returned (it differs when
  `max_relative_target` capped a step).
- `max_relative_target` (a per-step cap from the present position, in the joints' units, as lerobot's)
  is off by default: it costs an extra bus read per command, and our control loops cap steps
  themselves. Set it to turn it on. Unlike lerobot's, it caps from the true reading and keeps the goal
  within the limits; a joint farther outside its range than one step gets its command refused.
- `disconnect()` leaves the servos' torque ON by default: the arm holds its last goal instead of
  dropping (lerobot's own default turns torque off). `torque_off_on_disconnect=True` lets it go limp,
  e.g. to move it by hand; support the arm first. Connecting again keeps it holding: lerobot's
  `configure()`, which writes with torque off, is skipped when the motors already hold all it writes.

Calibration comes from lerobot's file `<calibration_dir>/<arm_id>.json` (default: lerobot's cache).
Without one (or with one that is not JSON, lacks a motor or has an empty or reversed range), connecting
refuses and says how to run `lerobot-calibrate`, unless `calibrate=True` (lerobot's interactive
calibration, a full one where the file is unusable; a file that cannot be read is refused even then).
When the motors disagree with the file, the file is written to them, as lerobot does when you press
ENTER at its prompt; like lerobot, this assumes the arm is at rest.

Cameras are lerobot's OpenCV cameras, given as {name: {index_or_path, width, height, fps}} (optional:
warmup_s, rotation, fourcc).
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robots.base import (
    ActionError,
    Feature,
    RobotBase,
    RobotEntry,
    RobotError,
    device_errors,
    first_line,
)
from robots.real.motors import (
    bus_call,
    calibration_problem,
    calibration_registers,
    close_port,
    configured,
    holds,
    joint_limits,
    motor_check_problem,
    present_positions,
    unreadable_calibration,
    write_calibration,
)
from robots.real.units import arm_units
from robots.teleop.base import DeviceNotFoundError
from wm.data.schema import ActionSpace
from wm.options import is_real, is_whole

# type name -> lerobot module whose import registers its config class
FOLLOWER_MODULES = {
    "so100_follower": "lerobot.robots.so_follower",
    "so101_follower": "lerobot.robots.so_follower",
    "koch_follower": "lerobot.robots.koch_follower",
}
# type name -> (lerobot extra, pip package) of its motor SDK
MOTOR_SDK = {
    "so100_follower": ("feetech", "feetech-servo-sdk"),
    "so101_follower": ("feetech", "feetech-servo-sdk"),
    "koch_follower": ("dynamixel", "dynamixel-sdk"),
}
CAMERA_REQUIRED = ("index_or_path", "width", "height", "fps")
CAMERA_OPTIONAL = ("warmup_s", "rotation", "fourcc")
CAMERA_ROTATIONS = (0, 90, 180, -90)  # lerobot's Cv2Rotation values
RESERVED_KEYS = ("state", "action", "timestamp")
STATE_KEY = "state"


@dataclass(frozen=True)
class LerobotArmOptions:
    """Options of a lerobot follower arm (see the module docstring).

    port: serial port of the arm's motor bus (find it with `lerobot-find-port`).
    arm_id: lerobot id of the arm; names its calibration file.
    calibration_dir: where lerobot's calibration file is; default lerobot's cache.
    calibrate: run lerobot's interactive calibration when the file is missing or disagrees.
    use_degrees: joints in degrees (True) or lerobot's -100..100 (False); the gripper is 0..100.
    control_hz: the rate the arm is driven at.
    max_relative_target: a cap on each command's step from the present position, one value or one per
        motor; None (default) leaves it off.
    torque_off_on_disconnect: disconnecting turns the servos' torque off (the arm goes limp).
    cameras: {name: {index_or_path, width, height, fps, [warmup_s, rotation, fourcc]}}.
    max_frame_age_ms: a camera frame older than this is not an observation (the read fails, as for a
        camera that stopped); None: three frame periods of the camera's fps, at least 50 ms
        (lerobot's own bound is 500 ms, which lets a stalled camera pass old frames for half a second).
    """

    port: str = "/dev/ttyACM0"
    arm_id: str = "follower"
    calibration_dir: str | None = None
    calibrate: bool = False
    use_degrees: bool = True
    control_hz: float = 30.0
    max_relative_target: float | dict[str, float] | None = None
    torque_off_on_disconnect: bool = False
    cameras: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_frame_age_ms: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.arm_id, int) and not isinstance(self.arm_id, bool):  # `arm_id=1` from the CLI
            object.__setattr__(self, "arm_id", str(self.arm_id))
        for name in ("port", "arm_id"):  # port=5 was built and failed in pyserial at connect()
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.calibration_dir is not None and not isinstance(self.calibration_dir, str | Path):
            raise ValueError(f"calibration_dir must be a path, got {self.calibration_dir!r}")
        if not isinstance(self.cameras, Mapping):  # a list or None was an AttributeError
            raise ValueError(
                f"cameras must be a mapping of camera names to their options, got {self.cameras!r}"
            )
        for name in ("calibrate", "use_degrees", "torque_off_on_disconnect"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "false" from a hand-written config is truthy
                raise ValueError(f"{name} must be true or false, got {value!r}")
        _check_positive("control_hz", self.control_hz)
        if self.max_frame_age_ms is not None:
            _check_positive("max_frame_age_ms", self.max_frame_age_ms)
        caps = self.max_relative_target
        values = caps.items() if isinstance(caps, Mapping) else [] if caps is None else [("", caps)]
        for motor, value in values:
            _check_positive(f"max_relative_target.{motor}" if motor else "max_relative_target", value)
        for name, cam in self.cameras.items():
            _check_camera(name, cam)


def _check_positive(name: str, value: Any) -> None:
    """A number option is a finite number > 0: NaN or inf turned a bound off or a rate into nonsense."""
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_camera(name: Any, cam: Any) -> None:
    if not isinstance(name, str):  # `cameras: {0: ...}` became feature key 0: a bare TypeError in the store
        raise ValueError(f"camera name {name!r} must be text, e.g. wrist or front")
    if name in RESERVED_KEYS or not name or "/" in name or "." in name:
        reserved = ", ".join(RESERVED_KEYS)
        raise ValueError(f"camera name {name!r} is not allowed (reserved: {reserved}; no / or . in it)")
    if not isinstance(cam, Mapping):
        raise ValueError(f"cameras.{name} must be a mapping with {', '.join(CAMERA_REQUIRED)}")
    import difflib

    for key in cam:
        if key not in CAMERA_REQUIRED + CAMERA_OPTIONAL:
            near = difflib.get_close_matches(str(key), CAMERA_REQUIRED + CAMERA_OPTIONAL, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ValueError(f"unknown camera option cameras.{name}.{key}{hint}")
    missing = [k for k in CAMERA_REQUIRED if k not in cam]
    if missing:
        raise ValueError(f"cameras.{name} needs {', '.join(missing)}")
    for key in ("width", "height", "fps"):
        if not is_whole(cam[key]) or cam[key] <= 0:
            raise ValueError(f"cameras.{name}.{key} must be a positive integer, got {cam[key]!r}")
    where = cam["index_or_path"]
    if not (is_whole(where) or isinstance(where, str)) or where == "":
        raise ValueError(f"cameras.{name}.index_or_path must be a camera index or a path, got {where!r}")
    warmup = cam.get("warmup_s", 1)
    if not is_real(warmup) or not 0 <= warmup < math.inf:
        # lerobot reads frames for warmup_s before connect() returns: inf never returned
        raise ValueError(f"cameras.{name}.warmup_s must be a finite number >= 0, got {warmup!r}")
    if "rotation" in cam and cam["rotation"] not in CAMERA_ROTATIONS:
        raise ValueError(
            f"cameras.{name}.rotation must be one of {CAMERA_ROTATIONS}, got {cam['rotation']!r}"
        )
    fourcc = cam.get("fourcc")
    if fourcc is not None and (not isinstance(fourcc, str) or len(fourcc) != 4):
        raise ValueError(f"cameras.{name}.fourcc must be 4 characters (e.g. MJPG), got {fourcc!r}")


class LerobotArm(RobotBase):
    """A lerobot follower arm (`robot_type`, one of `FOLLOWER_MODULES`) as a `Robot`."""

    def __init__(self, robot_type: str = "so101_follower", options: LerobotArmOptions | None = None) -> None:
        if robot_type not in FOLLOWER_MODULES:
            raise RobotError(f"lerobot arm type {robot_type!r} is not one of {sorted(FOLLOWER_MODULES)}")
        self.options = options if options is not None else LerobotArmOptions()
        # every follower here has the body joints in one mode and the gripper in 0..100
        self.units = arm_units(self.options.use_degrees)
        space = ActionSpace(mode="absolute", frame="joint", units=self.units, description="goal positions")
        super().__init__(name=robot_type, control_hz=self.options.control_hz, action_space=space)
        self._robot: Any = None
        self._motors: list[str] = []
        self._cameras: list[str] = []
        self._lag_s = 0.0

    # ------------------------------------------------------------------ lerobot robot
    def lerobot_robot(self) -> Any:
        """The lerobot follower (built on first use, with its calibration file; opens nothing)."""
        if self._robot is None:
            robot = _build_follower(self.name, self.options)
            self._motors = list(robot.bus.motors)
            self._cameras = [k for k, v in robot.observation_features.items() if isinstance(v, tuple)]
            caps = self.options.max_relative_target
            if isinstance(caps, Mapping) and set(caps) != set(self._motors):
                raise ValueError(f"max_relative_target needs one value per motor: {', '.join(self._motors)}")
            self._robot = robot
        return self._robot

    @property
    def port(self) -> str:
        """The serial port of the arm's motor bus."""
        return self.options.port

    @property
    def motor_names(self) -> list[str]:
        """Joint names in the order of "state" and of the action."""
        self.lerobot_robot()
        return list(self._motors)

    # ------------------------------------------------------------------ features
    @property
    def observation_features(self) -> dict[str, Feature]:
        robot = self.lerobot_robot()
        feats = {STATE_KEY: self._joint_feature("proprio")}
        for cam in self._cameras:
            feats[cam] = Feature(tuple(robot.observation_features[cam]), "uint8", "image")
        return feats

    @property
    def action_feature(self) -> Feature:
        return self._joint_feature("action")

    @property
    def position_key(self) -> str:
        return STATE_KEY  # the joints' present positions, in the action's units

    def _joint_feature(self, kind: str) -> Feature:
        low, high = joint_limits(self.lerobot_robot())
        # in float32 (the actions' type), rounded inward: rounded outward, a goal clipped to the low limit
        # became one encoder count below the calibrated range once lerobot truncated it to an integer
        low32 = [_float32_toward(v, np.inf) for v in low]
        high32 = [_float32_toward(v, -np.inf) for v in high]
        names = tuple(self._motors)
        return Feature((len(names),), "float32", kind, self.units, names, tuple(low32), tuple(high32))

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        robot = self.lerobot_robot()
        o = self.options
        if not robot.calibration and not o.calibrate:
            raise RobotError(
                f"{self.name} {o.arm_id!r} has no calibration in {robot.calibration_dir}; run "
                f"`lerobot-calibrate --robot.type={self.name} --robot.port={o.port} --robot.id={o.arm_id}` "
                "or give calibrate=true (in wm-collect: +robot_options.calibrate=true)"
            )
        problem = calibration_problem(robot) if robot.calibration else None
        if problem is not None and not o.calibrate:  # lerobot failed at the first read, or clipped backwards
            raise RobotError(
                f"{self.name} {o.arm_id!r}: {problem}; move it away and calibrate the arm again with "
                f"`lerobot-calibrate --robot.type={self.name} --robot.port={o.port} --robot.id={o.arm_id}` "
                "or give calibrate=true (in wm-collect: +robot_options.calibrate=true)"
            )
        # lerobot's `connect()`, step by step, so that each failure gets its own message and a calibration
        # file that disagrees with the motors never prompts. Unlike lerobot, the cameras open before the
        # motors are touched (a camera that fails leaves the arm as it was), and an arm that already holds
        # lerobot's configuration with torque on (as our last session left it) is not configured again.
        try:
            robot.bus.connect()
        except (ConnectionError, RuntimeError) as e:
            _close_quietly(robot)
            some = motor_check_problem(e, robot.bus)
            if some is not None:  # the port answered
                raise DeviceNotFoundError(f"{self.name} on {o.port!r}: {some}") from e
            raise DeviceNotFoundError(
                f"{self.name} on {o.port!r} did not answer ({first_line(e)}); check that the port exists "
                "(`ls /dev/ttyACM* /dev/ttyUSB*`, or `lerobot-find-port`), that your user may open it "
                "(`sudo usermod -aG dialout $USER`, then log in again), and that the arm's motors are powered"
            ) from e
        try:
            for name, cam in robot.cameras.items():
                self._connect_camera(name, cam)
            self._set_up_motors(robot, recalibrate=problem is not None)
        except BaseException:
            _close_quietly(robot)
            raise

    def _set_up_motors(self, robot: Any, recalibrate: bool = False) -> None:
        """Write the calibration file to motors that disagree with it (`recalibrate`: the file is unusable,
        run lerobot's calibration), then lerobot's `configure()` (torque on, position mode), unless the
        motors already hold all it would write: `configure()` runs with torque off, so an arm left holding
        would drop for its writes."""
        touched = False  # the motors' torque may have been turned off
        try:
            registers = None if recalibrate else calibration_registers(robot.bus, robot.calibration)
            if registers is None or not holds(robot.bus, registers):
                touched = True
                if self.options.calibrate:
                    if recalibrate:  # lerobot would offer the unusable file at its prompt (ENTER wrote it)
                        robot.calibration = {}
                    robot.calibrate()  # lerobot's interactive calibration
                else:  # the file wins, as at lerobot's prompt
                    write_calibration(robot.bus, robot.calibration, registers)
            elif configured(robot):
                return  # torque stays on: the arm keeps holding its goal
            touched = True
            robot.configure()
        except (OSError, RuntimeError) as e:  # ConnectionError, or pyserial's own
            torque = (
                "the motors' torque may be OFF (support the arm)" if touched else "the arm was left as it was"
            )
            raise RobotError(
                f"{self.name} on {self.options.port!r}: setting up the motors failed ({first_line(e)}); "
                f"{torque}; check the cables and the motors' power, then connect again"
            ) from e

    def _connect_camera(self, name: str, cam: Any) -> None:
        try:
            cam.connect()
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            where = self.options.cameras[name]["index_or_path"]
            raise DeviceNotFoundError(
                f"{self.name}: camera {name!r} ({where}) did not open ({first_line(e)}); the arm was left "
                "as it was; list the cameras with `lerobot-find-cameras opencv`, and check the width, height "
                "and fps it supports"
            ) from e

    def _disconnect(self) -> None:
        try:
            self._robot.disconnect()  # torque stays on unless torque_off_on_disconnect
        except Exception as e:  # e.g. unplugged: lerobot's torque-off write failed before it closed anything
            _close_quietly(self._robot)  # connect() may open them again
            torque = (
                "its torque may still be on"
                if self.options.torque_off_on_disconnect
                else "torque was left on"
            )
            raise RobotError(
                f"{self.name} on {self.options.port!r}: disconnecting failed ({first_line(e)}); the port and "
                f"cameras were closed, {torque}; check the cables and the motors' power"
            ) from e

    # ------------------------------------------------------------------ observation and action
    def _observe(self) -> dict[str, np.ndarray]:
        # lerobot's `get_observation()`, with this arm's bound on how old a camera frame may be.
        began = time.perf_counter()  # lerobot stamps its frames on this clock
        bus = self._robot.bus
        with bus_call(self.name, self.options.port, bus):
            raw = bus.sync_read("Present_Position", normalize=False)
        out = {STATE_KEY: present_positions(bus, raw, self._motors)}
        oldest = began
        for cam in self._cameras:
            where = self.options.cameras[cam]["index_or_path"]
            with device_errors(self.name, f"camera {cam!r} ({where})"):
                frame, captured = _latest_frame(self._robot.cameras[cam], self.frame_age_ms(cam))
            out[cam] = np.asarray(frame, dtype=np.uint8)  # (H, W, 3) RGB
            oldest = min(oldest, captured)
        self._lag_s = began - oldest
        return out

    @property
    def observation_lag_s(self) -> float:
        """How long before its read began the last observation's oldest camera frame was captured."""
        return self._lag_s

    def frame_age_ms(self, camera: str) -> float:
        """The oldest a frame of `camera` may be to count as an observation."""
        if self.options.max_frame_age_ms is not None:
            return self.options.max_frame_age_ms
        return max(50.0, 3 * 1000.0 / float(self.options.cameras[camera]["fps"]))

    def _apply(self, action: np.ndarray) -> np.ndarray:
        if self.options.max_relative_target is not None:
            action = self._capped(action)
        goal = {f"{m}.pos": float(v) for m, v in zip(self._motors, action, strict=True)}
        with bus_call(self.name, self.options.port, self._robot.bus):
            sent = self._robot.send_action(goal)
        return np.array([sent[f"{m}.pos"] for m in self._motors], dtype=np.float32)

    def _capped(self, action: np.ndarray) -> np.ndarray:
        """`action` (within the limits) moved at most max_relative_target from the joints' present positions
        (one bus read), as lerobot's cap does, but from the true reading (lerobot's clamps to the range, so a
        gripper past its end stepped by more than the cap) and never outside the limits (lerobot's capped
        goal around a reading outside the range went to the bus). A goal that cannot be both, a joint
        farther outside its range than one step, is refused: nothing is sent."""
        bus, caps = self._robot.bus, self.options.max_relative_target
        with bus_call(self.name, self.options.port, bus):
            raw = bus.sync_read("Present_Position", normalize=False)
        present = present_positions(bus, raw, self._motors).astype(np.float64)
        cap = np.array(
            [caps[m] if isinstance(caps, Mapping) else caps for m in self._motors], dtype=np.float64
        )
        feat = self.action_feature
        goal = np.clip(np.clip(action, present - cap, present + cap), feat.low, feat.high)
        far = np.abs(goal - present) > cap * (1 + 1e-9)  # the limits pulled it more than a step away
        if far.any():
            i = int(np.flatnonzero(far)[0])
            raise ActionError(
                f"{self.name}: {self._motors[i]} is at {present[i]:.1f}, outside its limits "
                f"{feat.low[i]:.1f}..{feat.high[i]:.1f} by more than max_relative_target ({cap[i]:g}): the "
                "command was refused; move the joint back into its range (or calibrate the arm again)"
            )
        return goal.astype(np.float32)


def _float32_toward(value: float, direction: float) -> float:
    """The float32 nearest `value`, or the next one toward `direction` where it lies beyond `value`."""
    near = np.float32(value)
    beyond = float(near) < value if direction > 0 else float(near) > value
    return float(np.nextafter(near, np.float32(direction)) if beyond else near)


def _latest_frame(camera: Any, max_age_ms: float) -> tuple[Any, float]:
    """A lerobot camera's newest frame (no older than `max_age_ms`) and when it was captured
    (`time.perf_counter()`, lerobot's stamp). A frame that arrived between the stamp's read and the
    frame's is given the earlier stamp: the frame is taken as no newer than it may be."""
    before = camera.latest_timestamp
    frame = camera.read_latest(max_age_ms=max_age_ms)
    with camera.frame_lock:
        stamp = camera.latest_timestamp if camera.latest_frame is frame else before
    return frame, float(stamp if stamp is not None else time.perf_counter())


def _build_follower(robot_type: str, o: LerobotArmOptions) -> Any:
    try:
        importlib.import_module(FOLLOWER_MODULES[robot_type])
        from lerobot.cameras.opencv import OpenCVCameraConfig
        from lerobot.robots import RobotConfig, make_robot_from_config
    except ImportError as e:
        raise DeviceNotFoundError(
            f"{robot_type}: lerobot is not installed ({e}); install the `lerobot` extra: "
            "pip install -e '.[lerobot]'"
        ) from e
    cameras = {name: OpenCVCameraConfig(**_camera_kwargs(cam)) for name, cam in o.cameras.items()}
    config = RobotConfig.get_choice_class(robot_type)(
        port=o.port,
        id=o.arm_id,
        calibration_dir=None if o.calibration_dir is None else Path(o.calibration_dir),
        use_degrees=o.use_degrees,
        max_relative_target=None,  # the cap is ours (`LerobotArm._capped`)
        disable_torque_on_disconnect=o.torque_off_on_disconnect,
        cameras=cameras,
    )
    try:
        return make_robot_from_config(config)
    except ImportError as e:  # the motor SDK is imported when the bus is built
        extra, package = MOTOR_SDK[robot_type]
        raise DeviceNotFoundError(
            f"{robot_type}: the {extra} motor SDK is missing ({e}); pip install 'lerobot[{extra}]' "
            f"(it brings {package})"
        ) from e
    except Exception as e:
        fpath = unreadable_calibration(e)
        if fpath is None:
            raise
        raise RobotError(
            f"{robot_type} {o.arm_id!r}: the calibration file {fpath} cannot be read ({first_line(e)}); "
            f"move it away and run `lerobot-calibrate --robot.type={robot_type} --robot.port={o.port} "
            f"--robot.id={o.arm_id}`"
        ) from e


def _camera_kwargs(cam: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(cam)
    where = kwargs["index_or_path"]
    if isinstance(where, str):
        kwargs["index_or_path"] = int(where) if where.isdigit() else Path(where)
    return kwargs


def _close_quietly(robot: Any) -> None:
    """Close the cameras and the serial port after a failed connect, without talking to the motors."""
    for cam in robot.cameras.values():
        try:
            if cam.is_connected:
                cam.disconnect()
        except Exception:  # noqa: BLE001 - best effort on an already failed connection
            pass
    close_port(robot.bus)


def _entry(robot_type: str, description: str) -> RobotEntry:
    return RobotEntry(
        make=functools.partial(LerobotArm, robot_type), options=LerobotArmOptions, description=description
    )


SO100_FOLLOWER = _entry("so100_follower", "SO-100 follower arm (Feetech STS3215 servos) through lerobot")
SO101_FOLLOWER = _entry("so101_follower", "SO-101 follower arm (Feetech STS3215 servos) through lerobot")
KOCH_FOLLOWER = _entry("koch_follower", "Koch v1.1 follower arm (Dynamixel servos) through lerobot")
