"""Recording demonstrations into a crash-safe store, from a scripted expert or a human device.

`Collector` runs a fixed-rate loop at the task's control rate (or as fast as possible for scripted
experts), writes every step through the store's streaming writer, and commits an episode only when
it is finished: Ctrl-C or SIGKILL lose at most the episode in progress, and the next run on the
same store appends after the surviving episodes (episode seeds continue from the store's count).

A human operator drives a small state machine with the device's commands: START begins
recording, SAVE commits the episode, DISCARD drops it, RERECORD drops it and starts again at once,
QUIT ends the session (an episode being recorded is dropped, and counted as discarded). Commands
pressed within one tick act in the order pressed: Enter then q saves, then quits. A simulated task
that succeeds or reaches its step limit saves by itself.

The robot is a simulated task or a real arm (any `Robot`). A real arm has no reset and no success
signal: the operator sets the scene up by hand before START, and its episodes are saved by SAVE
alone, with no "success" in their info. Between episodes the operator still drives the robot.

Every operator command, recorded or not, passes a `robots.runtime.safety.SafetyLayer` on its way to
the robot: a non-finite one is never sent, each is clipped to the robot's limits, and the step of a
position target per tick is capped, the first one from the position the arm is at; what was sent is
recorded. Reads follow the deploy runtime's policy (`RuntimeConfig.read_retries`,
`max_read_failures`): a read that fails is retried within the tick, a tick that still has no reading
sends nothing new (the arm holds its last goal) and records nothing, and that many such ticks in a
row end the session with one line (`SessionStats.stopped`) saying whether an episode was lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import Robot, failure
from robots.control import Clock, ManualClock, MonotonicClock, RateLoop
from robots.runtime.loop import RuntimeConfig, retried
from robots.runtime.recorder import BackgroundEpisode
from robots.runtime.safety import OUT_OF_LIMITS, SafetyConfig, SafetyLayer
from robots.sim.base import Expert, SimTask
from robots.teleop.base import Command, TeleopDevice, TeleopState
from wm.data import DemoStore, KeySpec, Schema, SchemaError
from wm.interrupt import interrupts_held, reraise_lost
from wm.jsonvalues import json_native

LOOP_KEY = "loop_dt"  # seconds between the starts of consecutive steps, recorded per step
OPTIONS_KEY = "task_options"  # episode info: the simulated task's options (defaults filled in)
RUN_KEY = "collect"  # episode info: the settings of the session that recorded it


@dataclass
class SessionStats:
    saved: int = 0
    discarded: int = 0
    successes: int = 0
    steps: int = 0
    overruns: int = 0
    loop_hz: list[float] = field(default_factory=list)
    stopped: str | None = None  # the one-line reason a fault ended the session

    @property
    def success_rate(self) -> float:
        return self.successes / self.saved if self.saved else 0.0


def recording_schema(task: SimTask | Robot, task_name: str) -> Schema:
    base = task.schema(task_name)
    keys = dict(base.keys)
    keys[LOOP_KEY] = KeySpec((), "float32", "lowdim", units="s")
    return Schema(keys=keys, fps=base.fps, action_space=base.action_space, robot=base.robot, task=task_name)


def open_store(path: str, schema: Schema, task_options: Mapping[str, Any] | None = None) -> DemoStore:
    """Create the store, or open it for append (resume) after checking it records the same keys, in the
    same units, at the same rate, from the same robot, for the same task and (`task_options`: a simulated
    task's options as it runs them, which `Collector.task_options` records in every episode's info) with
    the same task options as its newest episode that recorded them; stores written without them append."""
    if not os.path.exists(path):
        try:
            return DemoStore.create(path, schema)
        except FileExistsError:  # another session made it meanwhile: append to it as to any (its writer
            pass  # lock refuses it while that session writes)
    store = DemoStore.open(path, mode="a")
    try:
        _check_append(path, store, schema, task_options)
    except BaseException:
        store.close()
        raise
    return store


def _check_append(
    path: str, store: DemoStore, schema: Schema, task_options: Mapping[str, Any] | None
) -> None:
    old, new = store.schema, schema
    if old.task != new.task:  # (before the keys: another task's keys differ, and said so, not why)
        raise SchemaError(
            f"{path}: recorded with task {old.task!r}, this session records {new.task!r}; use another store "
            "or the same task"
        )
    mine = {k: (s.shape, s.dtype) for k, s in schema.keys.items()}
    theirs = {k: (s.shape, s.dtype) for k, s in store.schema.keys.items()}
    if mine != theirs:
        raise SchemaError(f"{path}: {_key_difference(theirs, mine)}")
    # the same shapes in other units, at another rate, from another robot or task would mix silently
    same_robot = "use another store or the same robot and options (use_degrees, control_hz)"
    facts = [("robot", old.robot, new.robot, same_robot), ("fps", old.fps, new.fps, same_robot)]
    space = lambda a: (a.mode, a.frame, a.units)  # noqa: E731 - not its description's wording
    facts.append(
        ("action space (mode, frame, units)", space(old.action_space), space(new.action_space), same_robot)
    )
    facts += [(f"{k} units", old.keys[k].units, s.units, same_robot) for k, s in new.keys.items()]
    if task_options is not None:
        recorded = _recorded_options(store)
        given = json.loads(json.dumps(json_native(dict(task_options))))  # as the store holds them
        for k in sorted(recorded.keys() & given.keys()):  # an option one side lacks: another code version
            facts.append(
                (f"task_options.{k}", recorded[k], given[k], "use another store or the same task options")
            )
    for what, was, now, fix in facts:
        if was != now:
            raise SchemaError(f"{path}: recorded with {what} {was!r}, this session records {now!r}; {fix}")


def _key_difference(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    """What differs between a store's keys and a session's, (shape, dtype) each, and what to do: keys one
    side alone has are a recording of another kind (a wm-deploy recording's action_due, chunk, safety
    against a wm-collect store) or another camera setting; a shape, another image size."""
    extra, lacking = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    parts = [f"this session records {', '.join(extra)}, which it does not hold"] if extra else []
    parts += [f"it holds {', '.join(lacking)}, which this session does not record"] if lacking else []
    parts += [
        f"its {k} is {theirs[k][0]} {theirs[k][1]}, this session's {mine[k][0]} {mine[k][1]}"
        for k in sorted(mine.keys() & theirs.keys())
        if mine[k] != theirs[k]
    ]
    return (
        f"{'; '.join(parts)}; use another store, or the same task options (image size, state_only) "
        "(a wm-deploy recording and a wm-collect store hold different keys: they do not mix)"
    )


def _recorded_options(store: DemoStore) -> dict[str, Any]:
    """The task options the newest episode recording them was recorded with ({}: none recorded them)."""
    for i in reversed(range(store.n_episodes)):
        options = store.episode_info(i).get(OPTIONS_KEY)
        if isinstance(options, dict):
            return options
    return {}


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
    A simulated task runs as fast as it can (a ManualClock) unless `realtime` is set; a real robot always
    runs in real time (at its control rate: the per-tick step cap assumes it). `safety`, `read_retries`
    and `max_read_failures` apply to a human's commands and reads (module docstring); their defaults are
    the deploy runtime's.
    `task_options` (a simulated task's options, its defaults filled in) go into every episode's info,
    where `open_store` finds them to refuse appending with other ones; `run_config` (the session's
    settings, e.g. wm-collect's options) goes there too, under "collect", so every episode says what
    recorded it."""

    task: SimTask | Robot
    store: DemoStore
    seed: int = 0
    realtime: bool = False
    noise_std: float = 0.0
    on_episode: Callable[[SessionStats], None] | None = None
    preview: Preview | None = None
    stats: SessionStats = field(default_factory=SessionStats)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    read_retries: int = RuntimeConfig.read_retries
    max_read_failures: int = RuntimeConfig.max_read_failures
    task_options: Mapping[str, Any] | None = None
    run_config: Mapping[str, Any] | None = None
    _episode_t0: float = field(default=0.0, init=False, repr=False)
    _ended: Any = field(default=None, init=False, repr=False)  # the writer `_finish` last ended

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

    def _step(
        self, writer: Any, obs: dict[str, np.ndarray], action: np.ndarray, dt: float, now: float
    ) -> tuple[dict, np.ndarray]:
        """Send `action` and record it as applied; returns the next observation and the applied action."""
        applied = self.task.send_action(action)
        self._record(writer, obs, applied, dt, now)
        return self._next_observation(obs), applied

    def _record(
        self, writer: Any, obs: dict[str, np.ndarray], applied: np.ndarray, dt: float, now: float
    ) -> None:
        """One step; `now` is the loop clock's time of this tick. A simulator's step is stamped with it:
        run faster than real time it is on the loop's grid (start + k / hz; the computer's clock put
        steps 1-10 ms apart at 10 Hz), and in real time its observation, read right after the previous
        tick's send, shows the state at this tick (stamped with the read, every step lagged a period
        and the first two were ~0 s apart). A real arm's reading shows the present: its own stamp."""
        if self.simulated and "timestamp" in obs:
            obs = {**obs, "timestamp": np.float64(now)}
        writer.add_step({**obs, "action": applied, LOOP_KEY: np.float32(dt)})

    @property
    def simulated(self) -> bool:
        return isinstance(self.task, SimTask)

    def _next_observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """After an action: a simulator's state changed only by the step, so read it now; a real arm
        keeps moving, so it is read at the start of the next tick instead, beside the next action."""
        return self.task.get_observation() if self.simulated else obs

    def _finish(self, writer: Any, loop: RateLoop, info: dict[str, Any]) -> None:
        success = self.simulated and self.task.is_success()
        if self.simulated:
            info = {"success": success, **info}
        if self.task_options is not None:
            info = {**info, OPTIONS_KEY: dict(self.task_options)}
        if self.run_config is not None:
            info = {**info, RUN_KEY: dict(self.run_config)}
        background = isinstance(writer, BackgroundEpisode)
        with interrupts_held():  # an interrupt between the commit and its count: saved, counted discarded
            said, self._ended = writer.end(info), writer
            kept = writer.steps if background else writer.n_steps
            self.stats.steps += kept  # the saved episodes' (a dropped one's are not in the store)
            if kept:
                self.stats.saved += 1
                self.stats.successes += int(success)
            else:  # its first step was refused: nothing was saved
                self.stats.discarded += 1
        if background and said:  # a step the store refused: the ones before kept
            print(f"warning: {said}", file=sys.stderr, flush=True)
        self.stats.overruns += loop.overruns
        # Achieved rate in wall-clock time (a ManualClock's own rate is nominal by construction).
        wall = time.monotonic() - self._episode_t0
        self.stats.loop_hz.append(loop.iterations / wall if wall > 0 else loop.achieved_hz)
        if kept and self.on_episode is not None:
            self.on_episode(self.stats)

    def record_expert_episode(
        self, expert: Expert, label: str, replays: int = 0, replay_noise: float = 0.0
    ) -> None:
        """One expert episode (plus `replays` noisy replays of its actions from the same start state). It
        has at least one step: a start that already counts as success is the expert's first action (the
        episode k of a store is seed + k's, so skipping a start would leave the session stuck on it)."""
        seed = self.seed + self.store.n_episodes
        rng = np.random.default_rng(seed)
        obs = self.task.reset(seed)
        expert.reset(self.task, rng)
        actions = []
        loop, last = RateLoop(self.task.control_hz, self._clock()), None
        with self.store.begin_episode() as writer, self._counted_if_dropped(writer):
            while True:
                now = loop.clock.now()
                action = self._noise(rng, expert.act(self.task, obs), self.noise_std)
                obs, applied = self._step(writer, obs, action, 0.0 if last is None else now - last, now)
                actions.append(applied)  # replays add their noise to what was recorded, not to pre-clip
                # values (a clipped action's replay noise was clipped away)
                last = now
                if self.preview is not None:
                    self.preview.show(obs, f"{label} ep {self.store.n_episodes}")
                loop.wait()
                if self.task.done:
                    break
            self._finish(writer, loop, {"seed": seed, "source": label, "noise_std": self.noise_std})
        for r in range(replays):
            self._replay(seed, actions, replay_noise, rng, label, r)

    @contextlib.contextmanager
    def _counted_if_dropped(self, writer: Any) -> Iterator[None]:
        """An episode that Ctrl-C (or a fault) ends before it is saved is dropped by the store: counted as
        discarded (the summary said "0 discarded" and counted its steps)."""
        try:
            yield
        except BaseException:
            if writer is not self._ended:  # (one ended is counted: saved, or discarded if it kept nothing)
                self.stats.discarded += int(writer.n_steps > 0)
            raise

    def check_seeds(self, episodes: int, replays: int) -> None:
        """Refuse, in one line, a scripted session that would record a start state the store already holds:
        its episode k has seed `seed` + the store's episode count + k (1 + `replays` episodes each), and
        appending with another seed= re-recorded earlier episodes bit for bit."""
        n = self.store.n_episodes
        held: dict[int, int] = {}  # seed -> the first episode recorded from it (replays share theirs)
        for e in range(n):
            info = self.store.episode_info(e)
            if isinstance(info.get("seed"), int) and not str(info.get("source", "")).endswith("_replay"):
                held.setdefault(info["seed"], e)
        # which held seeds this session's seed + n + i * (1 + replays), i < episodes, would meet: by
        # arithmetic on the held ones (a set of the session's seeds took 55 GiB at episodes=1e9)
        first, stride = self.seed + n, 1 + replays
        again = sorted(
            h for h in held if h >= first and (h - first) % stride == 0 and (h - first) // stride < episodes
        )
        if again:
            raise ValueError(
                f"{self.store.path}: episode {held[again[0]]} was recorded from seed {again[0]}, and seed="
                f"{self.seed} would record it again (episode k of this session starts at seed + {n} + k); "
                f"give seed={max(held) + 1 - n} or more"
            )

    def _replay(self, seed: int, actions: list, std: float, rng: Any, label: str, r: int) -> None:
        obs = self.task.reset(seed)
        loop, last = RateLoop(self.task.control_hz, self._clock()), None
        with self.store.begin_episode() as writer, self._counted_if_dropped(writer):
            for action in actions:
                noisy, now = self._noise(rng, action, std), loop.clock.now()
                dt = 0.0 if last is None else now - last  # loop_dt as the expert's episode records it
                obs, _ = self._step(writer, obs, noisy, dt, now)
                last = now
                loop.wait()
                if self.task.done:
                    break
            self._finish(
                writer, loop, {"seed": seed, "source": f"{label}_replay", "replay": r, "noise_std": std}
            )

    def record_teleop(self, device: TeleopDevice, mapper: Callable[..., np.ndarray], episodes: int) -> None:
        """Human demonstrations: the operator's commands start, save, discard and re-record episodes."""
        real_time = self.realtime or not self.simulated  # a real arm at 26x its rate moved 26x too fast
        loop = RateLoop(self.task.control_hz, MonotonicClock() if real_time else self._clock())
        run = _Teleop(self._safety_layer())
        if self.simulated:
            run.obs = self.task.reset(self.seed + self.store.n_episodes)
        try:
            while self.stats.saved < episodes:
                state = self._read_tick(device, run)
                if run.failures >= self.max_read_failures:
                    break
                if self._tick(run, state, mapper, loop, device.name, episodes):
                    break
                if self.preview is not None and run.obs:
                    self.preview.show(run.obs, "REC" if run.writer is not None else "press start")
                loop.wait()
        finally:
            if run.writer is not None:  # quit, interrupted or stopped while recording: dropped
                if run.failures >= self.max_read_failures or run.send_failed:
                    self.stats.stopped += f"; the episode being recorded ({run.writer.n_steps} steps) is lost"
                self.stats.discarded += int(
                    run.writer.n_steps > 0
                )  # an episode begun and never stepped: none
                run.writer.discard()

    def _tick(
        self,
        run: _Teleop,
        state: TeleopState | None,
        mapper: Callable[..., np.ndarray],
        loop: RateLoop,
        source: str,
        episodes: int,
    ) -> bool:
        """One tick: the operator's commands in the order pressed, and the tick's action (none without a
        reading) once: before a SAVE (its step is the last of the episode saved), else after the commands
        (a START's episode begins with it). Enter then q saves, then quits; Enter then Backspace saves
        (nothing is left to discard). True: the session ends (QUIT, the last episode saved, or a command
        that could not be sent)."""
        pending = state is not None and run.failures == 0  # the tick's action is still to be sent

        def act() -> None:
            nonlocal pending
            if pending:
                pending = False
                self._act(run, mapper(state, run.obs), loop.clock.now())

        for command in [] if state is None else state.commands:
            if command is Command.QUIT:
                return True
            if command is Command.SAVE:
                act()
                if run.writer is not None and run.writer.n_steps:
                    self._save(run, loop, source)
            else:
                self._episode_command(run, command, loop)
            if run.send_failed or self.stats.saved >= episodes:
                return True
        act()
        if run.writer is not None and run.writer.n_steps and self.simulated and self.task.done:
            self._save(run, loop, source)
        return run.send_failed or self.stats.saved >= episodes

    def _safety_layer(self) -> SafetyLayer:
        return SafetyLayer(
            self.task.action_feature, bool(getattr(self.task, "position_actions", True)), self.safety
        )

    def _read_tick(self, device: TeleopDevice, run: _Teleop) -> TeleopState | None:
        """The device's state and (a real arm) the robot's observation, into `run.obs`, each tried
        `read_retries` times. A tick without them counts in `run.failures`; None: no device state."""
        state, error = retried(device.poll, self.read_retries)
        name = device.name
        if state is not None and not self.simulated:
            obs, error = retried(self.task.get_observation, self.read_retries)
            name = f"{self.task.name} (the robot)"
            if obs is not None:
                run.obs = obs  # the real arm now, beside the action it gets
        if error is None:
            run.failures = 0
            return state
        run.failures += 1
        if run.failures >= self.max_read_failures:
            self.stats.stopped = (
                f"{name} could not be read on {run.failures} ticks in a row ({failure(error)}); the robot "
                "holds its last goal"
            )
        return state

    def _episode_command(self, run: _Teleop, command: Command, loop: RateLoop) -> None:
        """DISCARD and RERECORD drop the episode being recorded; START and RERECORD begin a new one."""
        if run.writer is not None and command in (Command.DISCARD, Command.RERECORD):
            self.stats.discarded += int(run.writer.n_steps > 0)  # RERECORD twice: the empty one is no episode
            run.writer.discard()
            run.writer = None
        if run.writer is None and command in (Command.START, Command.RERECORD):
            if self.simulated:  # a fresh sampled start; a real scene is set up by hand
                run.obs = self.task.reset(self.seed + self.store.n_episodes)
                run.safety = self._safety_layer()  # the reset moved the robot: no step from before it
            writer = self.store.begin_episode()  # a real arm's rows written off its loop (`recorder`)
            run.writer, run.last = writer if self.simulated else BackgroundEpisode(writer), None
            loop.restart()
            self._episode_t0 = time.monotonic()

    def _act(self, run: _Teleop, action: np.ndarray, now: float) -> None:
        """Send the operator's `action` through the safety layer (recorded, as sent, when recording)."""
        key = getattr(self.task, "position_key", None)
        if key is not None and run.safety.last is None:  # the first step is capped from where the arm is
            problem = run.safety.start_from(run.obs[key])
            if problem is not None:
                self.stats.stopped = f"{self.task.name}: {problem}"
                run.send_failed = True
                return
        command = run.safety.filter(action)
        if command is None:  # nothing safe to send yet: the robot holds
            return
        try:
            reached = self.task.send_action(command)
        except Exception as e:  # noqa: BLE001 - the robot is failing: say so, send nothing more
            reraise_lost(e)  # an interrupt that ctypes turned into another error
            self.stats.stopped = f"{self.task.name}: the command could not be sent ({failure(e)})"
            run.send_failed = True
            return
        before = run.safety.events["robot_out_of_limits"]
        sent = run.safety.sent(reached, command)  # the cap follows what was sent
        if run.safety.events["robot_out_of_limits"] > before:  # its driver clamped around a bad reading
            self.stats.stopped = f"{self.task.name}: {OUT_OF_LIMITS}"
            run.send_failed = True
            return
        if run.writer is not None:  # recording; between episodes the operator still moves the robot
            self._record(run.writer, run.obs, sent, 0.0 if run.last is None else now - run.last, now)
            run.last = now
        run.obs = self._next_observation(run.obs)

    def _save(self, run: _Teleop, loop: RateLoop, source: str) -> None:
        info: dict[str, Any] = {"source": source}
        if self.simulated:
            info = {"seed": self.seed + self.store.n_episodes, **info}
        counted, writer = (self.stats.saved, self.stats.discarded), run.writer
        try:
            self._finish(writer, loop, info)
        finally:  # once committed, an error after it (Ctrl-C in `on_episode`) leaves nothing to discard
            run.writer = writer if (self.stats.saved, self.stats.discarded) == counted else None


@dataclass
class _Teleop:
    """What a teleop session carries from tick to tick: the safety layer, the newest observation, the
    episode being recorded (None between episodes) and its last step's time, failed reads in a row,
    and whether a command could not be sent (which ends the session)."""

    safety: SafetyLayer
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    writer: Any = None
    last: float | None = None
    failures: int = 0
    send_failed: bool = False
