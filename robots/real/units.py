"""The units of lerobot's normalised joint values, stated one way for arms and leader arms alike.

lerobot's motor buses normalise each motor by its `MotorNormMode`: degrees from the middle of the
calibrated range ("degrees"), -100..100 over that range ("range_m100_100") or 0..100 ("range_0_100",
grippers). A features' or a device's `units` names them as, e.g., "deg; gripper 0..100": the body
joints' unit (or each joint's, when they differ), then the gripper's. Two arms whose joints share a
units string read and take the same values for the same pose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# lerobot's MotorNormMode value -> the unit it stands for
NORM_UNITS = {"degrees": "deg", "range_m100_100": "-100..100", "range_0_100": "0..100"}
GRIPPER = "gripper"


def joint_units(modes: Mapping[str, str]) -> str:
    """{motor name: lerobot norm mode value} -> "deg; gripper 0..100" (body joints, then the gripper)."""
    unknown = sorted(set(modes.values()) - set(NORM_UNITS))
    if unknown:
        raise ValueError(f"unknown lerobot norm mode(s) {unknown}; known: {', '.join(NORM_UNITS)}")
    body = {name: NORM_UNITS[mode] for name, mode in modes.items() if name != GRIPPER}
    parts = []
    if len(set(body.values())) == 1:
        parts.append(next(iter(body.values())))
    else:
        parts.append(", ".join(f"{name} {unit}" for name, unit in body.items()))
    if GRIPPER in modes:
        parts.append(f"{GRIPPER} {NORM_UNITS[modes[GRIPPER]]}")
    return "; ".join(p for p in parts if p)


def bus_units(bus: Any) -> str:
    """The units of a lerobot motor bus's normalised values (its motors' norm modes); opens nothing."""
    return joint_units({name: str(motor.norm_mode.value) for name, motor in bus.motors.items()})


def arm_units(use_degrees: bool) -> str:
    """The units of a lerobot SO / Koch arm: body joints in degrees or -100..100, the gripper 0..100
    (what lerobot's `use_degrees` chooses where an arm has it)."""
    body = "degrees" if use_degrees else "range_m100_100"
    return joint_units({"joint": body, GRIPPER: "range_0_100"})
