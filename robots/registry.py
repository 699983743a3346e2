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


def _nearest(name: Any, valid: list[str]) -> str | None:
    name = str(name)  # a number from the command line (`robot=5`) was a TypeError from difflib
    # a unique name the typed one starts ("so100" for so100_follower) is nearer than difflib finds it
    near = [v for v in valid if v.startswith(name)] if name else []
    near = near if len(near) == 1 else difflib.get_close_matches(name, valid, n=1)
    return near[0] if near else None


def _did_you_mean(name: Any, valid: list[str]) -> str:
    near = _nearest(name, valid)
    return f"; did you mean {near}?" if near else ""


def task_names() -> list[str]:
    return sorted(TASKS) + [ROBOSUITE_PREFIX + env for env in ROBOSUITE_EXPERT_ENVS]


def task_entry(name: str) -> TaskEntry:
    if isinstance(name, str) and name.startswith(ROBOSUITE_PREFIX):
        from robots.sim.robosuite_task import robosuite_entry

        return robosuite_entry(name[len(ROBOSUITE_PREFIX) :])
    if not isinstance(name, str) or name not in TASKS:  # `task=1` from the command line is an int
        # a robosuite env named without its prefix ("Lift") is a near match of its full name
        full = {n: n for n in task_names()} | {e: ROBOSUITE_PREFIX + e for e in ROBOSUITE_EXPERT_ENVS}
        near = _nearest(name, list(full))
        raise RobotError(
            f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}, or robosuite/<EnvName> "
            f"(e.g. {', '.join(ROBOSUITE_PREFIX + e for e in ROBOSUITE_EXPERT_ENVS)})"
            + (f"; did you mean {full[near]}?" if near else "")
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
