"""Recording demonstrations into a crash-safe store, from a scripted expert or a human device.

`Collector` runs a fixed-rate loop at the task's control rate (or as fast as possible for scripted
experts), writes every step through the store's streaming writer, and commits an episode only when
it is finished: Ctrl-C or SIGKILL lose at most the episode in progress, and the next run on the
same store appends after the surviving episodes (episode seeds continue from the store's count).

A human operator drives a small state machine with the device's commands: START begins
recording, SAVE commits the episode, DISCARD drops it, RERECORD drops it and starts again at once,
QUIT ends the session. A simulated task that succeeds or reaches its step limit saves by itself.

The robot is a simulated task or a real arm (any `Robot`). A real arm has no reset and no success
signal: the operator sets the scene up by hand before START, and its episodes are saved by SAVE
alone, with no "success" in their info. Between episodes the operator still drives the robot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import Robot
from robots.control import Clock, ManualClock, MonotonicClock, RateLoop
from robots.sim.base import Expert, SimTask
from robots.teleop.base import Command, TeleopDevice
from wm.data import DemoStore, KeySpec, Schema, SchemaError

LOOP_KEY = "loop_dt"  # seconds between the starts of consecutive steps, recorded per step


@dataclass
class SessionStats:
    saved: int = 0
    discarded: int = 0
    successes: int = 0
    steps: int = 0
    overruns: int = 0
    loop_hz: list[float] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / self.saved if self.saved else 0.0


def recording_schema(task: SimTask | Robot, task_name: str) -> Schema:
    base = task.schema(task_name)
    keys = dict(base.keys)
    keys[LOOP_KEY] = KeySpec((), "float32", "lowdim", units="s")
    return Schema(keys=keys, fps=base.fps, action_space=base.action_space, robot=base.robot, task=task_name)


def open_store(path: str, schema: Schema) -> DemoStore:
    """Create the store, or open it for append (resume) after checking it records the same keys."""
    if not os.path.exists(path):
        return DemoStore.create(path, schema)
    store = DemoStore.open(path, mode="a")
    mine = {k: (s.shape, s.dtype) for k, s in schema.keys.items()}
    theirs = {k: (s.shape, s.dtype) for k, s in store.schema.keys.items()}
    if mine != theirs:
        store.close()
        raise SchemaError(
            f"{path}: holds keys {theirs}, but this task records {mine}; use another store or the same "
            "task options (image size, state_only)"
        )
    return store


class Preview:
    """An optional OpenCV window showing the first camera; silently absent when there is no display."""

    def __init__(self, mode: str, image_key: str | None) -> None:
        self.key = image_key
        has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        self.enabled = image_key is not None and (mode == "true" or (mode == "auto" and has_display))
        self._cv2: Any = None
        if self.enabled:
            try:
                import cv2

                self._cv2 = cv2
            except ImportError:
                self.enabled = False

    def show(self, obs: dict[str, np.ndarray], status: str) -> None:
        if not self.enabled:
            return
        img = obs[self.key][..., ::-1]  # RGB -> BGR
        scale = max(1, 384 // img.shape[0])
        img = np.ascontiguousarray(np.kron(img, np.ones((scale, scale, 1), dtype=img.dtype)))
        self._cv2.putText(img, status, (8, 20), self._cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 255), 1)
        try:
            self._cv2.imshow("wm-collect", img)
            self._cv2.waitKey(1)
        except Exception:  # no usable GUI backend after all: go headless
            self.enabled = False

    def close(self) -> None:
        if self.enabled:
            self._cv2.destroyAllWindows()


@dataclass
class Collector:
    """Records episodes of `task` (a simulated task, or a real robot for `record_teleop`) into `store`.
    `clock=None` runs in real time for human devices; a ManualClock (as-fast-as-possible) is used for
    scripted experts unless `realtime` is set."""

    task: SimTask | Robot
    store: DemoStore
    seed: int = 0
    realtime: bool = False
    noise_std: float = 0.0
    on_episode: Callable[[SessionStats], None] | None = None
    preview: Preview | None = None
    stats: SessionStats = field(default_factory=SessionStats)
    _episode_t0: float = field(default=0.0, init=False, repr=False)

    def _clock(self) -> Clock:
        """A new episode's clock; also marks the episode's wall-clock start."""
        self._episode_t0 = time.monotonic()
        return MonotonicClock() if self.realtime else ManualClock(time.monotonic())

    def _noise(self, rng: np.random.Generator, action: np.ndarray, std: float) -> np.ndarray:
        if std <= 0:
            return action
        feat = self.task.action_feature
        span = 1.0
        if feat.low is not None and feat.high is not None:
            span = (np.asarray(feat.high) - np.asarray(feat.low)) / 2  # noise relative to the action range
        return action + rng.normal(0.0, 1.0, action.shape) * std * span

    def _step(self, writer: Any, obs: dict[str, np.ndarray], action: np.ndarray, dt: float) -> dict:
        applied = self.task.send_action(action)
        writer.add_step({**obs, "action": applied, LOOP_KEY: np.float32(dt)})
        self.stats.steps += 1
        return self._next_observation(obs)

    @property
    def simulated(self) -> bool:
        return isinstance(self.task, SimTask)

    def _next_observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """After an action: a simulator's state changed only by the step, so read it now; a real arm
        keeps moving, so it is read at the start of the next tick instead, beside the next action."""
        return self.task.get_observation() if self.simulated else obs

    def _finish(self, writer: Any, loop: RateLoop, info: dict[str, Any]) -> None:
        if self.simulated:
            success = self.task.is_success()
            info = {"success": success, **info}
            self.stats.successes += int(success)
        writer.end(info)
        self.stats.saved += 1
        self.stats.overruns += loop.overruns
        # Achieved rate in wall-clock time (a ManualClock's own rate is nominal by construction).
        wall = time.monotonic() - self._episode_t0
        self.stats.loop_hz.append(loop.tick / wall if wall > 0 else loop.achieved_hz)
        if self.on_episode is not None:
            self.on_episode(self.stats)

    def record_expert_episode(
        self, expert: Expert, label: str, replays: int = 0, replay_noise: float = 0.0
    ) -> None:
        """One expert episode (plus `replays` noisy replays of its actions from the same start state)."""
        seed = self.seed + self.store.n_episodes
        rng = np.random.default_rng(seed)
        obs = self.task.reset(seed)
        expert.reset(self.task, rng)
        actions = []
        loop, last = RateLoop(self.task.control_hz, self._clock()), None
        with self.store.begin_episode() as writer:
            while not self.task.done:
                now = loop.clock.now()
                action = self._noise(rng, expert.act(self.task, obs), self.noise_std)
                actions.append(action)
                obs = self._step(writer, obs, action, 0.0 if last is None else now - last)
                last = now
                if self.preview is not None:
                    self.preview.show(obs, f"{label} ep {self.store.n_episodes}")
                loop.wait()
            self._finish(writer, loop, {"seed": seed, "source": label, "noise_std": self.noise_std})
        for r in range(replays):
            self._replay(seed, actions, replay_noise, rng, label, r)

    def _replay(self, seed: int, actions: list, std: float, rng: Any, label: str, r: int) -> None:
        obs = self.task.reset(seed)
        loop = RateLoop(self.task.control_hz, self._clock())
        with self.store.begin_episode() as writer:
            for action in actions:
                obs = self._step(writer, obs, self._noise(rng, action, std), 1.0 / self.task.control_hz)
                loop.wait()
                if self.task.done:
                    break
            self._finish(
                writer, loop, {"seed": seed, "source": f"{label}_replay", "replay": r, "noise_std": std}
            )

    def record_teleop(self, device: TeleopDevice, mapper: Callable[..., np.ndarray], episodes: int) -> None:
        """Human demonstrations: the operator's commands start, save, discard and re-record episodes."""
        loop = RateLoop(self.task.control_hz, MonotonicClock() if self.realtime else self._clock())
        recording, writer, last = False, None, None
        obs = self.task.reset(self.seed + self.store.n_episodes) if self.simulated else {}
        try:
            while self.stats.saved < episodes:
                state = device.poll()
                if not self.simulated:
                    obs = self.task.get_observation()  # the real arm now, beside the action it gets
                cmds = set(state.commands)
                if Command.QUIT in cmds:
                    break
                if writer is not None and (Command.DISCARD in cmds or Command.RERECORD in cmds):
                    writer.discard()
                    writer, recording = None, False
                    self.stats.discarded += 1
                if not recording and (Command.START in cmds or Command.RERECORD in cmds):
                    if self.simulated:  # a fresh sampled start; a real scene is set up by hand
                        obs = self.task.reset(self.seed + self.store.n_episodes)
                    writer, recording, last = self.store.begin_episode(), True, None
                    loop.restart()
                    self._episode_t0 = time.monotonic()
                action = mapper(state, obs)
                now = loop.clock.now()
                if recording:
                    obs = self._step(writer, obs, action, 0.0 if last is None else now - last)
                    last = now
                    if Command.SAVE in cmds or (self.simulated and self.task.done):
                        info: dict[str, Any] = {"source": device.name}
                        if self.simulated:
                            info = {"seed": self.seed + self.store.n_episodes, **info}
                        self._finish(writer, loop, info)
                        writer, recording = None, False
                else:
                    self.task.send_action(action)  # the operator can move the robot between episodes
                    obs = self._next_observation(obs)
                if self.preview is not None:
                    self.preview.show(obs, "REC" if recording else "press start")
                loop.wait()
        finally:
            if writer is not None:
                writer.discard()
