"""`wm-collect task=NAME teleop=scripted|DEVICE episodes=N store=PATH`: record demonstrations.

Scripted experts run as fast as the simulator allows (or in real time with `realtime=true`);
human devices run at the task's control rate. Everything goes through the crash-safe store: Ctrl-C
keeps the finished episodes, and running again on the same store appends after them: for the same
task, robot and task options (every episode's info records them), else it is refused in one line.

`robot=NAME` records a real arm (a name from `robots.registry.ROBOTS`, its options in
`robot_options`) instead of a simulated task; `task` then names what the demonstrations show. E.g. a
leader arm teleoperating an SO-101 follower, episode commands from the keyboard:

    wm-collect robot=so101_follower +robot_options.port=/dev/ttyACM1 teleop=leader_arm \
        +device_options.port=/dev/ttyACM0 task=pick_cube episodes=20 store=pick.zarr

A device without all the episode buttons (a leader arm, a SpaceMouse) gets its episode commands from
`command_device`. A leader arm must report the robot's joints in the robot's units: one that does not
is refused before anything is opened, with what to set (`use_degrees`). A fault that ends the session
(the robot or device unreadable for `RuntimeConfig.max_read_failures` ticks in a row) is one line, and
the exit status is wm-deploy's for a fault (3); the episodes saved before it are kept.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from robots.collect import Collector, Preview, SessionStats, open_store, recording_schema
from robots.registry import make_expert, make_robot, make_task, robot_entry, task_entry
from robots.sim.base import SimConfig
from robots.teleop.mapping import teleop_mapper
from tools._cli import (
    FAULT_EXIT,
    UsageError,
    app,
    bind,
    build,
    changed,
    interrupt,
    one_of,
    record_of,
    store_path,
)
from tools._device import DEFAULT_COMMAND_DEVICE, DeviceSettings


@dataclass(frozen=True)
class CollectConfig:
    task: str
    store: str
    teleop: str = "scripted"
    episodes: int = 10
    seed: int = 0
    image_size: int = 64
    state_only: bool = False
    max_steps: int | None = None
    noise_std: float = 0.0
    replays: int = 0
    replay_noise_std: float = 0.1
    realtime: str = "auto"
    preview: str = "auto"
    gains: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    device_options: dict[str, Any] = field(default_factory=dict)
    robot: str | None = None
    robot_options: dict[str, Any] = field(default_factory=dict)
    command_device: str | None = DEFAULT_COMMAND_DEVICE
    command_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        store_path("store", self.store)
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        for name in ("seed", "replays"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("noise_std", "replay_noise_std"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name, value in (("realtime", self.realtime), ("preview", self.preview)):
            one_of(name, str(value).lower(), ("auto", "true", "false"))
        if self.robot is None:
            build(task_entry(self.task).options, self.task_options, "task_options")
            if self.robot_options:
                raise UsageError("robot_options apply to a real robot (robot=NAME); none is given")
        else:
            self._check_robot()
        if self.state_only and changed(self, ("image_size",)):
            raise UsageError("image_size sets the camera, which state_only=true leaves out: give one of them")
        if self.teleop == "scripted":
            for name in ("gains", "device_options", "command_options"):
                if getattr(self, name):
                    raise UsageError(f"{name} apply to teleop devices; teleop=scripted takes none")
            if changed(self, ("command_device",)):
                raise UsageError("command_device starts a human's episodes; teleop=scripted takes none")
            if self.replays == 0 and changed(self, ("replay_noise_std",)):
                raise UsageError("replay_noise_std is the noise of replays: give replays=N too")
            if self.robot is None:
                make_expert(self.task)  # a task without one (robosuite/NutAssembly) is refused here
        else:
            DeviceSettings.of(self).check(needs_start=True)
            if str(self.realtime).lower() == "false":  # an episode ran by in the time of a key press
                raise UsageError(
                    f"realtime=false: teleop={self.teleop} records a human at the task's control rate; "
                    "leave realtime out (it is for scripted experts)"
                )
            given = changed(self, ("noise_std", "replays", "replay_noise_std"))  # scripted experts' only
            if given:
                raise UsageError(
                    f"{', '.join(given)}: noise and replays apply to scripted experts; "
                    f"teleop={self.teleop} records the operator's actions as sent"
                )

    def _check_robot(self) -> None:
        build(robot_entry(self.robot).options, self.robot_options, "robot_options")
        if self.teleop == "scripted":
            raise UsageError("robot= records a human operator (e.g. teleop=leader_arm); scripted experts "
                             "need a simulated task")  # fmt: skip
        if self.task_options:
            raise UsageError("task_options apply to simulated tasks; a real robot takes robot_options")
        if str(self.realtime).lower() == "false":
            raise UsageError("realtime=false: a real robot runs in real time")


def task_options(cfg: CollectConfig) -> dict[str, Any] | None:
    """The simulated task's options as it runs them (its defaults filled in): recorded in every episode's
    info, and an existing store is appended to only with the same ones; None for a real robot."""
    if cfg.robot is not None:
        return None
    return dataclasses.asdict(build(task_entry(cfg.task).options, cfg.task_options, "task_options"))


def run_config(cfg: CollectConfig) -> dict[str, Any]:
    """What every episode's info records of the session (`robots.collect.RUN_KEY`): its options, but
    the store's path (the store is where it is) and the task's options (recorded on their own). An
    object given from Python (a device's HID module, a clock) is recorded by its type's name."""
    return {k: v for k, v in record_of(cfg).items() if k not in ("store", "task_options")}


def sim_config(cfg: CollectConfig) -> SimConfig:
    kwargs: dict[str, Any] = {"image_size": cfg.image_size, "state_only": cfg.state_only, "seed": cfg.seed}
    if cfg.max_steps is not None:
        kwargs["max_steps"] = cfg.max_steps
    return SimConfig(options=dict(cfg.task_options), **kwargs)


def _stop_on_signals() -> None:
    """Ctrl-C (and SIGTERM) end the session cleanly, keeping finished episodes, even when the process
    inherited an ignored SIGINT (as background jobs of non-interactive shells do). The exit status is 0
    after Ctrl-C in the session (how an operator ends one), 143 after SIGTERM, and 128 + the signal's
    number outside the session (the robot or device connecting)."""
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def collect(cfg: CollectConfig) -> int:
    if cfg.robot is None:
        task = make_task(cfg.task, sim_config(cfg))
    else:
        task = make_robot(cfg.robot, **cfg.robot_options)
    device = None if cfg.teleop == "scripted" else DeviceSettings.of(cfg).build(task)
    if threading.current_thread() is threading.main_thread():
        _stop_on_signals()
    try:
        with task:  # a robot or device that is not there stops the run here, before the store is touched
            if device is not None:
                device.connect()
            return record(cfg, task, device)
    finally:
        if device is not None:
            device.disconnect()


def record(cfg: CollectConfig, task: Any, device: Any) -> int:
    """The session on a connected robot (and device): episodes into the store, a progress bar, a summary."""
    scripted = device is None
    realtime = str(cfg.realtime).lower() == "true" or (str(cfg.realtime).lower() == "auto" and not scripted)
    options = task_options(cfg)
    expert = make_expert(cfg.task) if scripted else None  # before the store: none leaves an empty one
    store = open_store(cfg.store, recording_schema(task, cfg.task), options)
    start = store.n_episodes
    bar = tqdm(total=cfg.episodes * (1 + (cfg.replays if scripted else 0)), unit="ep", dynamic_ncols=True)

    def progress(stats: SessionStats) -> None:
        bar.update(1)
        hz = stats.loop_hz[-1] if stats.loop_hz else 0.0
        success = {} if cfg.robot else {"success": f"{stats.success_rate:.0%}"}
        bar.set_postfix(**success, loop_hz=f"{hz:.1f}", stored=store.n_episodes)

    images = [k for k, f in task.observation_features.items() if f.kind == "image"]
    preview = Preview(str(cfg.preview).lower(), images[0] if images else None)
    collector = Collector(
        task,
        store,
        seed=cfg.seed,
        realtime=realtime,
        noise_std=cfg.noise_std,
        on_episode=progress,
        preview=preview,
        task_options=options,
        run_config=run_config(cfg),
    )
    interrupted: int | None = None  # the signal that ended the session
    try:
        if expert is not None:
            collector.check_seeds(cfg.episodes, cfg.replays)
            for _ in range(cfg.episodes):
                collector.record_expert_episode(expert, "expert", cfg.replays, cfg.replay_noise_std)
        else:
            collector.record_teleop(device, teleop_mapper(task, cfg.gains), cfg.episodes)
    except KeyboardInterrupt as e:
        interrupted = getattr(e, "signum", signal.SIGINT)
    finally:
        bar.close()
        preview.close()
        store.close()
    s = collector.stats
    success = "" if cfg.robot else f"success {s.success_rate:.0%}, "
    why = f"stopped: {s.stopped}; " if s.stopped else "interrupted: " if interrupted is not None else ""
    print(
        f"{why}saved {s.saved} episodes ({s.discarded} discarded, "
        f"{success}{s.steps} steps) to store {cfg.store} (now {start + s.saved} episodes)"
    )
    if s.stopped:
        return FAULT_EXIT
    # Ctrl-C is how an operator ends a session (0); SIGTERM (a job's time limit, `docker stop`) cut it short
    return 128 + signal.SIGTERM if interrupted == signal.SIGTERM else 0


def _main(cfg: DictConfig) -> int:
    return collect(bind(CollectConfig, cfg, job_folder=None, job_file="store"))


main = app("collect", _main)

if __name__ == "__main__":
    main()
