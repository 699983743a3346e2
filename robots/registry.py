"""Registries of simulated tasks, real robots and teleoperation devices, by name.

Modules are imported only when their entry is used, so `robosuite`, `lerobot` or `pygame` load only for
the tasks, robots and devices that need them. An unknown name raises an error listing the valid ones.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from robots.base import Robot, RobotEntry, RobotError
from robots.sim.base import Expert, SimConfig, SimTask, TaskEntry, parse_options

# name -> "module:attribute" of a TaskEntry
TASKS: dict[str, str] = {
    "pointmaze": "robots.sim.pointmaze:ENTRY",
    "arm_push": "robots.sim.arm_push:ENTRY",
    "pusht": "robots.sim.pusht:ENTRY",
}
ROBOSUITE_PREFIX = "robosuite/"
# robosuite environments with a scripted expert; any other robosuite env can still be driven by a device.
ROBOSUITE_EXPERT_ENVS = ("Lift", "Stack", "Door")

# name -> "module:attribute" of a RobotEntry: real arms, driven through lerobot's follower robots
ROBOTS: dict[str, str] = {
    "so100_follower": "robots.real.lerobot_arm:SO100_FOLLOWER",
    "so101_follower": "robots.real.lerobot_arm:SO101_FOLLOWER",
    "koch_follower": "robots.real.lerobot_arm:KOCH_FOLLOWER",
}

# name -> "module:attribute" of a device class
DEVICES: dict[str, str] = {
    "keyboard": "robots.teleop.keyboard:KeyboardDevice",
    "spacemouse": "robots.teleop.spacemouse:SpaceMouseDevice",
    "gamepad": "robots.teleop.gamepad:GamepadDevice",
    "leader_arm": "robots.teleop.leader_arm:LeaderArmDevice",
}


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _did_you_mean(name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean {near[0]}?" if near else ""


def task_names() -> list[str]:
    return sorted(TASKS) + [ROBOSUITE_PREFIX + env for env in ROBOSUITE_EXPERT_ENVS]


def task_entry(name: str) -> TaskEntry:
    if name.startswith(ROBOSUITE_PREFIX):
        from robots.sim.robosuite_task import robosuite_entry

        return robosuite_entry(name[len(ROBOSUITE_PREFIX) :])
    if name not in TASKS:
        raise RobotError(
            f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}, or robosuite/<EnvName> "
            f"(e.g. {', '.join(ROBOSUITE_PREFIX + e for e in ROBOSUITE_EXPERT_ENVS)})"
            + _did_you_mean(name, task_names())
        )
    return _load(TASKS[name])


def make_task(name: str, config: SimConfig | None = None) -> SimTask:
    """Build the task `name` (not yet connected); its options (`config.options`) are checked against the
    dataclass the task declares them with (`task_entry(name).options`)."""
    return task_entry(name).make(config or SimConfig())


def make_expert(name: str, **kwargs: Any) -> Expert:
    return task_entry(name).expert(**kwargs)


def device_class(name: str) -> type:
    if name not in DEVICES:
        hint = _did_you_mean(name, list(DEVICES))
        raise RobotError(f"unknown teleop device {name!r}; valid: {', '.join(sorted(DEVICES))}{hint}")
    return _load(DEVICES[name])


def robot_entry(name: str) -> RobotEntry:
    if name not in ROBOTS:
        hint = _did_you_mean(name, list(ROBOTS))
        raise RobotError(f"unknown robot {name!r}; valid: {', '.join(sorted(ROBOTS))}{hint}")
    return _load(ROBOTS[name])


def make_robot(name: str, **options: Any) -> Robot:
    """Build the real robot `name` (not yet connected); its options are checked against the dataclass the
    robot declares them with (`robot_entry(name).options`)."""
    entry = robot_entry(name)
    return entry.make(parse_options(entry.options, options, name, what="robot"))
