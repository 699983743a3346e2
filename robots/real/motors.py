"""lerobot's motor buses (Feetech, Dynamixel) for the follower arms (`robots.real.lerobot_arm`) and the
leader arms (`robots.teleop.leader_arm`): positions read without lerobot's clamp, joint limits, the
calibration checked, compared with what the motors hold and written only where it differs, ports
released after a failed transfer, and lerobot's connect errors said by motor."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from robots.base import RobotError, device_errors


@contextlib.contextmanager
def port_released_on_error(bus: Any) -> Iterator[None]:
    """Free the motor bus's port when a call through it raises. The Feetech and Dynamixel SDKs mark the
    port in use before writing a packet and free it after the reply; an OSError from pyserial in between
    (one glitch of the USB adapter) left it marked, and every later call failed with "Port is in use!"
    although the line was fine again: one glitch ended the session."""
    try:
        yield
    except BaseException:
        handler = getattr(bus, "port_handler", None)
        if handler is not None and hasattr(handler, "is_using"):
            handler.is_using = False
        raise


@contextlib.contextmanager
def bus_call(robot: str, port: str, bus: Any) -> Iterator[None]:
    """A read or write through the motor `bus` while the robot runs: the port freed when it raises
    (`port_released_on_error`), and the error a `DeviceError` of `robot` naming the bus's `port`."""
    with device_errors(robot, f"motor bus on {port!r}"), port_released_on_error(bus):
        yield


def present_positions(bus: Any, raw: Mapping[str, int], motors: list[str]) -> np.ndarray:
    """Raw servo positions in lerobot's normalised units, (len(motors),) float32, without the clamp to the
    calibrated range that lerobot's normalisation applies in the -100..100 and 0..100 modes: an arm resting
    outside its range (a gripper past its calibrated end) read as at the end, so the first command was
    capped from where the arm was not and jumped by more than the step cap. Each motor's map is
    lerobot's own, taken at the two ends of its range and extended linearly (it is affine in every mode)."""
    ids = [bus.motors[name].id for name in motors]
    lo = [bus.calibration[name].range_min for name in motors]
    hi = [bus.calibration[name].range_max for name in motors]
    # lerobot's map at both ends of every range: two calls for all motors, not two per motor
    at_lo = bus._normalize(dict(zip(ids, lo, strict=True)))
    at_hi = bus._normalize(dict(zip(ids, hi, strict=True)))
    out = [
        at_lo[i] + (raw[name] - a) * (at_hi[i] - at_lo[i]) / (b - a)
        for i, name, a, b in zip(ids, motors, lo, hi, strict=True)
    ]
    return np.array(out, dtype=np.float32)


def joint_limits(robot: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each joint's (low, high) in lerobot's normalised units: the calibrated range for degrees (one full
    turn without calibration), -100..100 or 0..100 for the range modes."""
    low, high = [], []
    for name, motor in robot.bus.motors.items():
        mode = str(motor.norm_mode.value)
        if mode == "degrees":
            resolution = robot.bus.model_resolution_table[motor.model] - 1
            cal = robot.calibration.get(name)
            half = (cal.range_max - cal.range_min if cal else resolution) / 2 * 360 / resolution
            low.append(-half)
            high.append(half)
        else:
            low.append(-100.0 if mode == "range_m100_100" else 0.0)
            high.append(100.0)
    return tuple(low), tuple(high)


def calibration_problem(device: Any) -> str | None:
    """What is wrong with the calibration file of a lerobot robot or teleoperator `device`, or None: a motor
    it lacks (lerobot failed at the first read) or one the arm lacks, a range that is empty or reversed
    (lerobot failed at the first read, or the joint limits were reversed and clipping sent every command to
    one end) or outside the servo's positions, or a value its register cannot hold (lerobot turned the
    torque off, then failed writing it: the arm dropped). Nothing is sent to the motors."""
    bus, cal, fpath = device.bus, device.calibration, device.calibration_fpath
    missing = [m for m in bus.motors if m not in cal]
    if missing:
        return f"the calibration file {fpath} has no {', '.join(missing)}"
    extra = [m for m in cal if m not in bus.motors]
    if extra:
        return f"the calibration file {fpath} has motors this arm does not: {', '.join(map(str, extra))}"
    bad = [m for m in bus.motors if not cal[m].range_min < cal[m].range_max]
    if bad:
        return f"the calibration file {fpath} has range_min >= range_max for {', '.join(bad)}"
    for m, motor in bus.motors.items():
        top = bus.model_resolution_table[motor.model] - 1
        if not 0 <= cal[m].range_min < cal[m].range_max <= top:
            return (
                f"the calibration file {fpath} has the range {cal[m].range_min}..{cal[m].range_max} for {m}, "
                f"outside its servo's positions 0..{top}"
            )
    from lerobot.motors.motors_bus import get_address

    for name, values in calibration_registers(bus, cal).items():
        for m, value in values.items():
            motor = bus.motors[m]
            _, length = get_address(bus.model_ctrl_table, motor.model, name)
            try:
                raw = bus._encode_sign(name, {motor.id: int(value)})[motor.id]
            except ValueError:
                raw = -1
            if not 0 <= raw < 1 << (8 * length):
                return f"the calibration file {fpath} has {name} {value} for {m}, more than its servo holds"
    return None


def calibration_registers(bus: Any, calibration: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """The registers that hold `calibration` on the motors of `bus` (register -> motor -> raw value): what
    lerobot's `write_calibration` writes (recorded, not sent), and, where the servos invert a joint
    themselves (Dynamixel: lerobot's bus does not apply the drive mode), each motor's Drive_Mode, which
    `write_calibration` leaves as it was: a Koch servo once calibrated as a leader's elbow stayed inverted,
    moving its joint the other way from the file's ranges (and lerobot's check never passed, so every
    connect turned the torque off to write the file again)."""
    try:
        with _recorded_writes(bus) as writes:
            bus.write_calibration(dict(calibration), cache=False)
    except _Unrecorded as e:
        raise RobotError(f"{e}: {SUPPORTED_LEROBOT}") from None
    if not getattr(bus, "apply_drive_mode", True):
        writes["Drive_Mode"] = {m: int(c.drive_mode) for m, c in calibration.items()}
    return writes


READ_TRIES = 3  # reads of a register before a bus error is the bus's (a corrupt packet happens)


def holds(bus: Any, registers: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the motors of `bus` (connected) hold every raw value of `registers` (register -> motor ->
    value); False where a register cannot be read back (a name this bus does not know). A read that fails
    on the bus (a corrupt status packet) is tried again; failing `READ_TRIES` times it raises: one bad
    packet answered "they differ", and the motors were written with their torque off (the arm dropped)."""
    for name, values in registers.items():
        for attempt in range(READ_TRIES):
            try:
                with port_released_on_error(bus):  # (a cut transfer left the port marked in use)
                    present = bus.sync_read(name, list(values), normalize=False)
                break
            except (OSError, RuntimeError):  # ConnectionError: the bus, not the register
                if attempt == READ_TRIES - 1:
                    raise
            except Exception:  # noqa: BLE001 - a register this bus cannot read back: not known to hold
                return False
        if any(int(present[m]) != int(v) for m, v in values.items()):
            return False
    return True


def write_calibration(
    bus: Any, calibration: Mapping[str, Any], registers: Mapping[str, Mapping[str, Any]]
) -> None:
    """Write `calibration` (its `calibration_registers`) to the motors of `bus`, with their torque off as
    lerobot's prompt does (position limits and offsets are in the servos' EEPROM)."""
    bus.disable_torque()
    for name, values in registers.items():
        for motor, value in values.items():
            bus.write(name, motor, value, normalize=False)
    bus.calibration = dict(calibration)


@contextlib.contextmanager
def _recorded_writes(bus: Any) -> Iterator[dict[str, dict[str, Any]]]:
    """Within it, `bus.write` / `bus.sync_write` record (register -> motor -> the last value) instead of
    sending; a write past them (`_write`, `_sync_write`) raises `_Unrecorded`."""
    writes: dict[str, dict[str, Any]] = {}

    def write(data_name: str, motor: str, value: Any, **_: Any) -> None:
        writes.setdefault(data_name, {})[motor] = value

    def sync_write(data_name: str, values: Any, **_: Any) -> None:
        per_motor = values if isinstance(values, Mapping) else dict.fromkeys(bus.motors, values)
        for motor, value in per_motor.items():
            write(data_name, motor, value)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _Unrecorded(
            f"lerobot {_lerobot_version()} wrote the motor bus other than through write / sync_write, which "
            "this wrapper records to check what a calibration or configuration would change; nothing was sent"
        )

    recorder = {"write": write, "sync_write": sync_write, "_write": refuse, "_sync_write": refuse}
    vars(bus).update(recorder)  # shadow the bus's methods on this instance only
    try:
        yield writes
    finally:
        for name in recorder:
            del vars(bus)[name]


def configured(robot: Any) -> bool:
    """Whether the motors of the lerobot follower `robot` (connected) already hold every value its
    `configure()` would write, torque on included: then configuring again changes nothing but lets the
    arm drop meanwhile. What `configure()` writes is learnt by running it with the bus's writes recorded
    instead of sent, so this follows lerobot's own code (operating modes, PID gains, gripper limits...)."""
    bus = robot.bus
    try:
        with _recorded_writes(bus) as writes:
            robot.configure()
    except _Unrecorded:
        return False
    if not writes or any(name in bus.normalized_data for name in writes):
        return False  # nothing to compare, or values in user units: configure, as lerobot does
    return holds(bus, writes)


class _Unrecorded(Exception):
    """lerobot reached the bus other than through `write` / `sync_write` (a newer lerobot)."""


SUPPORTED_LEROBOT = "this stack is made for lerobot 0.4.4 (constraints.txt): pip install 'lerobot==0.4.4'"


def _lerobot_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lerobot")
    except PackageNotFoundError:
        return "(version unknown)"


def unreadable_calibration(e: BaseException) -> Path | None:
    """The calibration file a lerobot robot or teleoperator was loading when its constructor raised `e` (a
    damaged file: not JSON, a field missing or of the wrong type), or None for any other error."""
    import traceback

    fpath = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_name == "_load_calibration":
            fpath = frame.f_locals.get("fpath")
    return None if fpath is None else Path(fpath)


def close_port(bus: Any) -> None:
    """Close a motor bus's serial port after a failure, without talking to the motors, and clear the
    motor SDK's "in use" mark a transfer the failure cut short left (every later connect of that arm
    failed with "did not answer")."""
    try:
        if bus.is_connected:
            bus.port_handler.closePort()
    except Exception:  # noqa: BLE001 - best effort on an already failed connection
        pass
    try:
        bus.port_handler.is_using = False
    except Exception:  # noqa: BLE001
        pass


def motor_check_problem(e: BaseException, bus: Any) -> str | None:
    """The motors lerobot's motor check found missing or of another model (its message lists them below
    its first line), by name and id, when some answered; None when none did (the port or the power)."""
    text = str(e)
    if "motor check failed" not in text:
        return None
    names = {m.id: name for name, m in getattr(bus, "motors", {}).items()}
    missing = [int(i) for i in re.findall(r"^\s*- (\d+) \(expected model", text, re.M)]
    wrong = [int(i) for i in re.findall(r"^\s*- (\d+) \([^)]*\): expected", text, re.M)]
    if names and len(missing) == len(names):
        return None  # nothing answered: the port, the permissions or the power

    def listed(ids: list[int]) -> str:
        return ", ".join(f"{names.get(i, '?')} (id {i})" for i in ids)

    said = [f"motor(s) {listed(missing)} did not answer"] if missing else []
    said += [f"motor(s) {listed(wrong)} are another model"] if wrong else []
    if not said:
        return None
    return "; ".join(said) + ": check the cable to them and their ids (`lerobot-setup-motors` sets them)"
