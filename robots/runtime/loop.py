"""The real-time control loop: the robot on its own clock, the model in a worker.

Each tick, at an absolute deadline (`robots.control`), does only this: take in a chunk if one has
arrived (stale actions dropped by the time actually measured), pick the action due now
(`schedule.Timeline`), pass it through the safety layer, send it; then read the newest observation
(after the send, so that no camera or bus read delays a command) and, when the worker is idle and a
chunk is due, hand it the observation history and, for real-time chunking, the actions already
committed. Nothing on the tick waits for the model.

In `sync` mode the same loop asks for a chunk when the last one is used up and waits for it (the robot
waits, as LeRobot's synchronous loop and openpi's client do): the baseline. With an `InlineWorker` the
chunk is computed on the control thread itself (the benchmark's baseline; no deadline can interrupt
it); with a `ProcessWorker` (wm-deploy) `wait_timeout_s` and the operator's stop bound the wait.

Faults end a run with one line (`EpisodeOutcome.stopped`), never with an unsafe command: the
worker's errors and death, no fresh action for too long (the watchdog), a robot that cannot be read.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import Robot, failure
from robots.control import Clock, MonotonicClock
from robots.runtime.realtime import QuietGC, check
from robots.runtime.safety import OUT_OF_LIMITS, SafetyConfig, SafetyLayer, Watchdog
from robots.runtime.schedule import STITCHING, Chunk, TickSchedule, Timeline
from robots.runtime.ticks import NO_CHUNK, ChunkRecord, EpisodeOutcome, TickRecord
from robots.runtime.worker import Reply, Request, ResetStopped, WorkerDied
from wm.interrupt import reraise_lost

# (observation, the last command sent or None) -> a human's action, or None: the controller's tick
TakeoverFn = Callable[[Mapping[str, np.ndarray], "np.ndarray | None"], "np.ndarray | None"]

MODES = ("async", "sync")
WAIT_POLL_S = 0.002  # how often a blocking wait for a chunk looks for it
COMMITTED_MAX = 64  # scheduled actions handed to an inpainting controller at most


MIN_HZ, MAX_HZ = 1e-3, 1e4  # control and policy rates: beyond them a period over- or underflows


@dataclass(frozen=True)
class RuntimeConfig:
    """mode: "async" (inference in the worker beside the ticks) or "sync" (the robot waits for each chunk).
    stitching: how a new chunk meets the pending actions (`schedule.STITCHING`); ensemble_m: ACT's
    coefficient. inpaint_overlap: stitching "inpaint": how many scheduled actions past the frozen ones
    the controller is also handed, to continue softly (None: all of them, RTC's soft mask, the smoothest
    seams; 0: only the frozen prefix, the rest chosen afresh from the new observation; an MPC controller
    also warm-starts from what it is handed). policy_hz: the rate the model's actions are meant for
    (None: the robot's); interpolate: between the actions of a slower policy, send the straight line
    instead of holding. action_latency_s: the robot's actuation latency, added to every due time.
    replan_every: async: request a new chunk at most every that many policy steps (and sooner only
    when the pending actions would not last until it arrives); sync: actions executed per chunk.
    latency_window: chunks over which the worst round trip is the latency estimate (it forgets old spikes).
    wait_timeout_s: the longest the robot waits at rest for a chunk it cannot go on without (an episode's
    first; every one in sync mode) before the episode ends with one line (the operator's stop ends the
    wait too). max_inference_errors: consecutive failed chunks that end the run. read_retries: attempts per
    tick to read the robot; max_read_failures: consecutive ticks without an observation that end the
    run (meanwhile the pending actions are sent: a chunk runs open loop that long at most).
    realtime_priority: run the control thread under SCHED_FIFO at this priority (1-99; None: normal
    scheduling); control_cpu: pin it to this core, the local inference worker to the others
    (`robots.runtime.realtime`; both need privileges, and say so in one line when they are missing).
    quiet_gc: keep Python's garbage collector off the tick path (`realtime.QuietGC`: young objects are
    collected in each tick's slack, the rest is frozen until the episode ends)."""

    mode: str = "async"
    stitching: str = "inpaint"
    ensemble_m: float = 0.01
    inpaint_overlap: int | None = None
    policy_hz: float | None = None
    interpolate: bool = False
    action_latency_s: float = 0.0
    replan_every: int = 1
    latency_window: int = 8
    wait_timeout_s: float = 300.0
    max_inference_errors: int = 3
    read_retries: int = 2
    max_read_failures: int = 5
    realtime_priority: int | None = None
    control_cpu: int | None = None
    quiet_gc: bool = True
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.stitching not in STITCHING:
            raise ValueError(f"stitching must be one of {', '.join(STITCHING)}, got {self.stitching!r}")
        if self.inpaint_overlap is not None and self.inpaint_overlap < 0:
            raise ValueError(f"inpaint_overlap must be >= 0 or null (all), got {self.inpaint_overlap}")
        if self.policy_hz is not None and not MIN_HZ <= self.policy_hz <= MAX_HZ:  # (1e-300: an overflow)
            raise ValueError(f"policy_hz must be in {MIN_HZ:g}..{MAX_HZ:g}, got {self.policy_hz}")
        if self.interpolate and self.policy_hz is None:  # a step of one period: nothing between to draw
            raise ValueError(
                "interpolate draws the line between the actions of a policy slower than the robot: "
                "give policy_hz (the rate its actions are meant for), or leave interpolate out"
            )
        if self.replan_every < 1 or self.latency_window < 1 or self.max_inference_errors < 1:
            raise ValueError("replan_every, latency_window and max_inference_errors must be >= 1")
        if self.latency_window > 10**6:  # a deque's length: 1e20 was an OverflowError traceback
            raise ValueError(f"latency_window must be at most 1000000, got {self.latency_window}")
        if self.read_retries < 1 or self.max_read_failures < 1:
            raise ValueError("read_retries and max_read_failures must be >= 1")
        if not 0 < self.wait_timeout_s < math.inf:  # every blocking wait has a deadline
            raise ValueError(f"wait_timeout_s must be a positive finite number, got {self.wait_timeout_s}")
        if not 0 <= self.action_latency_s <= 10:  # NaN made every latency figure null; 1e300 sent nothing
            raise ValueError(f"action_latency_s must be in 0..10 seconds, got {self.action_latency_s}")
        if self.mode == "sync" and self.stitching in ("ensemble", "average"):  # they had no effect
            raise ValueError(
                f"stitching={self.stitching} merges overlapping chunks, which mode=sync never has (each "
                "chunk runs to its end): use mode=async, or leave stitching out"
            )
        if not math.isfinite(self.ensemble_m):
            raise ValueError(f"ensemble_m must be a finite number, got {self.ensemble_m}")
        if self.ensemble_m != RuntimeConfig.ensemble_m and self.stitching != "ensemble":
            raise ValueError(f"ensemble_m is for stitching=ensemble, not {self.stitching}: leave it out")
        if self.inpaint_overlap is not None and (self.stitching != "inpaint" or self.mode == "sync"):
            raise ValueError("inpaint_overlap is for mode=async with stitching=inpaint: leave it out")
        check(self.realtime_priority, self.control_cpu)
        if self.mode == "sync" and (self.realtime_priority is not None or self.control_cpu is not None):
            raise ValueError(
                "realtime_priority and control_cpu are for mode=async: in sync mode the robot waits for "
                "every chunk, so there is no tick to keep on time while the model computes"
            )


class Runtime:
    """Runs episodes of `robot` with the chunks of `worker` (a `ProcessWorker`, a `RemoteWorker`, or in
    sync mode an `InlineWorker`, computing on this thread). `on_tick(record, obs)` is called after every
    tick's send (recording, live report); `done()` ends an episode early (a simulated task's success or
    step limit)."""

    def __init__(
        self,
        robot: Robot,
        worker: Any,
        cfg: RuntimeConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.robot, self.worker = robot, worker
        self.cfg = cfg = cfg or RuntimeConfig()
        self.clock = clock or MonotonicClock()
        self.period = 1.0 / robot.control_hz
        self.step_s = 1.0 / (cfg.policy_hz or robot.control_hz)
        self.window = max(1, int(worker.info.get("window", 1)))  # the controller's history (started worker)
        feat = robot.action_feature
        self.safety_cfg = cfg.safety
        self.positions = bool(getattr(robot, "position_actions", True))
        # between the actions of a policy slower than the loop, an absolute action (a position target, a
        # force) is sent again for its whole step; a delta is applied once (the ticks between hold)
        self.repeats = getattr(getattr(robot, "action_space", None), "mode", "absolute") == "absolute"
        if cfg.interpolate and not self.repeats:  # each tick sent a whole delta: N times the motion
            raise ValueError(
                f"runtime.interpolate draws the line between position targets; {robot.name} takes delta "
                "actions, each applied once (interpolated, each was sent on every tick): leave it out"
            )
        self.advances_on_send = bool(getattr(robot, "advances_on_send", False))  # a simulator (see _stamp)
        self.feature = feat
        try:  # its checks against the robot's actions, here, before a robot connects or a store opens
            SafetyLayer(feat, self.positions, self.safety_cfg)
        except ValueError as e:
            raise ValueError(f"runtime.safety: {e}") from None
        self._read_streak = 0
        self._stop_requested: Callable[[], bool] | None = None  # the running episode's

    # ------------------------------------------------------------------ one episode
    def run_episode(
        self,
        max_ticks: int,
        goal: Mapping[str, np.ndarray] | None = None,
        done: Callable[[], bool] | None = None,
        on_tick: Callable[[TickRecord, Mapping[str, np.ndarray]], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        takeover: TakeoverFn | None = None,
    ) -> EpisodeOutcome:
        """One episode of at most `max_ticks` ticks. The controller is reset (and told `goal`); the
        first chunk is awaited before the clock starts (the robot is at rest meanwhile), then the loop
        runs until `done()`, the tick limit, a fault or `stop_requested()`. `takeover(obs, last)` returns
        a human's action for a tick (`robots.runtime.intervention.Takeover`; `last`: the last command
        sent, None before the first) or None; after a takeover
        the controller resumes from a chunk of an observation taken after the hand-back."""
        self._stop_requested = stop_requested  # looked at on every tick and during blocking waits
        with QuietGC(self.cfg.quiet_gc) as quiet:
            return self._episode(max_ticks, goal, done, on_tick, takeover, quiet)

    def _episode(
        self,
        max_ticks: int,
        goal: Mapping[str, np.ndarray] | None,
        done: Callable[[], bool] | None,
        on_tick: Callable[[TickRecord, Mapping[str, np.ndarray]], None] | None,
        takeover: TakeoverFn | None,
        quiet: QuietGC,
    ) -> EpisodeOutcome:
        cfg, clock, out = self.cfg, self.clock, EpisodeOutcome()
        safety = SafetyLayer(self.feature, self.positions, self.safety_cfg)
        out.events = safety.events
        watchdog = Watchdog(self.safety_cfg)
        timeline = Timeline(self.period, cfg.action_latency_s, cfg.stitching, cfg.ensemble_m, cfg.interpolate)
        history: deque[tuple[float, dict[str, np.ndarray], np.ndarray | None]] = deque(
            maxlen=max(2, int(math.ceil(self.window * self.step_s / self.period)) + 2)
        )
        state = _State(latencies=deque(maxlen=cfg.latency_window))
        first = self._start(goal, safety, history, out, state)
        if first is None:
            return out
        captured, obs, _ = history[-1]
        # the operator's action for the next tick: the device is read after a tick's send, beside the
        # observation (a leader arm's bus read before the send delayed every command by its time)
        human_next = takeover(obs, None) if takeover is not None else None
        # The robot did not move while the first chunk computed: its observation is still current.
        out.started_at = clock.now()
        ticks = TickSchedule(out.started_at, self.period)
        request = state.requests.pop(first.seq)
        chunk = Chunk(first.actions, ticks.anchor, self.step_s, first.seq)
        self._take_chunk(
            chunk, first, request, timeline, out, state, next_tick=ticks.anchor, now=ticks.anchor
        )
        state.last_request_obs = ticks.anchor
        watchdog.start(ticks.anchor + cfg.action_latency_s)  # (the first action is due then, not at once)
        last_cmd: np.ndarray | None = None
        for _ in range(max_ticks):
            quiet.step()  # in the slack before the tick: the garbage of the previous one
            clock.sleep_until(ticks.next_tick)
            began = clock.now()
            tick_t, nominal = ticks.tick(began)  # the slot it serves; its deadline, for the error
            if self._operator_stopped():
                out.stopped = "stopped by the operator"
                break
            events: list[str] = []
            # ---- take in a chunk that has arrived
            if cfg.mode == "async":
                reply = self._poll(out)
                if reply is not None:
                    self._arrived(reply, timeline, out, state, tick_t, clock.now())
                if out.stopped:
                    self._hold(safety, nominal, began, captured, out, on_tick, obs)
                    break
            # ---- the action due now (or a human's)
            human = human_next
            pick, skipped = timeline.take(tick_t)
            if pick is None and self.repeats and human is None:
                pick = timeline.repeat_last(tick_t)  # (the hold sent a quarter of a 4-tick force)
            out.skipped += skipped
            now = clock.now()
            if human is not None:
                state.human, pick = True, None
                if np.isfinite(human).all():  # a device sending NaN is no fresh action (and is held)
                    watchdog.fresh(now)
            elif state.human:  # handed back: only chunks from observations after now are used
                state.human, state.resume_after, state.resuming = False, began, True
                timeline.clear()
                pick = None
                # the first chunk after it is awaited as an episode's first is (it may be computed from an
                # observation after the hand-back only), the arm holding; the watchdog counted from the
                # operator's last action
                watchdog.start(began, stop_after_s=cfg.wait_timeout_s)
            if pick is not None:
                watchdog.fresh(now)
                if now > pick.due + self.period / 2:
                    out.stale_sent += 1
            elif human is None and not state.resuming:
                if timeline.holds_last(tick_t):  # a delta's step still runs (applied once, not repeated)
                    watchdog.fresh(now)
                elif not len(timeline):  # (the last action of a slower policy still has its step: none)
                    out.underruns += 1
            if watchdog.check(now) == "stop":
                out.events["stop"] += 1
                out.stopped = self._watchdog_stop(watchdog, state, now)
                self._hold(safety, nominal, began, captured, out, on_tick, obs, events=("hold", "stop"))
                break
            if watchdog.state == "hold" and pick is None and human is None:
                out.events["hold"] += 1
                events.append("hold")
            before = Counter(safety.events)
            command = safety.filter(human if human is not None else pick.action if pick is not None else None)
            events += [e for e in safety.events if safety.events[e] > before[e]]
            sent_at = clock.now()
            if command is not None:
                try:
                    command = self._send(safety, command)
                except Exception as e:  # noqa: BLE001 - the robot is failing: say so, send nothing more
                    reraise_lost(e)  # an interrupt that ctypes turned into another error
                    out.events["send_failed"] += 1
                    events.append("send_failed")
                    out.stopped = f"{self.robot.name}: the command could not be sent ({failure(e)})"
                    command = None  # recorded as a tick that sent nothing (its lateness, its underrun)
                else:
                    last_cmd = command
                if safety.events["robot_out_of_limits"] > before["robot_out_of_limits"]:
                    events.append("robot_out_of_limits")
                    out.stopped = f"{self.robot.name}: {OUT_OF_LIMITS}"
            chunk_id = pick.chunk if pick is not None and command is not None else NO_CHUNK
            record = TickRecord(
                nominal,
                began,
                captured,
                sent_at,
                command,
                chunk_id,
                pick.index if chunk_id != NO_CHUNK else -1,
                pick.due if chunk_id != NO_CHUNK else math.nan,
                tuple(events),
                human is not None,
            )
            out.ticks.append(record)
            if (
                chunk_id != NO_CHUNK
                and chunk_id < len(out.chunks)
                and out.chunks[chunk_id].first_sent is None
            ):
                out.chunks[chunk_id].first_sent = sent_at
            if on_tick is not None:
                on_tick(record, obs)
            if out.stopped:  # found in this tick's send: no hold (the driver would clamp it around the
                break  # same reading); the robot keeps its last goal
            if done is not None and done():
                break
            # ---- the newest observation (after the send: the command never waits for a camera or bus)
            read = self._read(out)
            if read is not None:
                captured, obs = self._stamp(ticks.next_tick, read[0]), read[1]
            if takeover is not None:
                human_next = takeover(obs, last_cmd)
            if read is None:
                if out.stopped:  # this tick has sent its command: the hold is the next tick's, recorded
                    # beside the newest observation, as the ticks of the failed reads before it were
                    self._hold_at(ticks.next_tick, safety, captured, out, on_tick, obs)
                    break
                continue  # the pending actions go on; too many failed reads in a row end the episode
            history.append((captured, obs, last_cmd))
            # ---- ask for the next chunk
            if state.human:
                continue  # the operator drives; the controller is asked again once handed back
            if cfg.mode == "sync":  # the next chunk once this one's last action has had its step
                # (an operator taking over next tick is not kept waiting for a chunk they override)
                if not len(timeline) and not timeline.holds_last(ticks.next_tick) and human_next is None:
                    self._ask_and_wait(history, timeline, out, state, ticks, watchdog, captured)
                    if takeover is not None:  # the device again: the operator may have moved it meanwhile
                        human_next = takeover(obs, last_cmd)
            elif (
                not self.worker.busy
                and captured >= state.resume_after  # (an older one's chunk would be discarded)
                and self._due_request(timeline, state, captured)
            ):
                self._request(history, timeline, out, state, captured)
            if out.stopped:  # (only the request above can have set it since the read)
                self._hold_at(ticks.next_tick, safety, captured, out, on_tick, obs)
                break
        out.wall_s = clock.now() - out.started_at
        return out

    def _start(self, goal, safety: SafetyLayer, history, out: EpisodeOutcome, state: _State) -> Reply | None:
        """The episode's start, before the clock runs: the worker reset (and told `goal`), the first
        observation read into `history` (the first command's step capped from where the robot is), the
        first chunk awaited (the robot at rest). None, `out.stopped` saying why, when it cannot start."""
        try:  # a worker that died between episodes, a controller that cannot start one: a fault's line
            self.worker.reset(goal, self._operator_stopped)  # (they raised out of the run: exit 2, or a
        except (WorkerDied, RuntimeError) as e:  # bug's traceback)
            out.stopped = f"{e}; the episode did not start (nothing was sent)"
            return None
        except ResetStopped:  # the operator stopped while the worker was waited for
            out.stopped = "stopped by the operator"
            return None
        read = self._read(out)
        if read is None:
            return None
        captured, obs = read  # captured: when the read began (less the observation's lag), as every stamp
        key = getattr(self.robot, "position_key", None)
        if key is not None:  # the first command's step is capped from where the robot is
            problem = safety.start_from(obs[key])
            if problem is not None:
                out.stopped = f"{self.robot.name}: {problem}"
                return None
        history.append((captured, obs, None))
        return self._first_chunk(history, out, state)

    def _ask_and_wait(self, history, timeline, out, state, ticks: TickSchedule, watchdog, captured) -> None:
        """sync mode: ask for the next chunk and wait for it, the robot waiting (`wait_timeout_s` and the
        operator's stop bound the wait). A wait past the next tick's time restarts the schedule then;
        the chunk starts at the next tick."""
        reply = self._request(history, None, out, state, captured)
        now = self.clock.now()
        ticks.restart_if_passed(now)
        if reply is not None:
            self._arrived(reply, timeline, out, state, ticks.next_tick, now, sync=True)
            # the wait was the mode's, as for a first chunk: the watchdog counts from the chunk's first
            # due action (it stopped healthy runs whose model time plus action_latency_s passed
            # stop_after_s)
            watchdog.start(ticks.next_tick + self.cfg.action_latency_s)

    def _watchdog_stop(self, watchdog: Watchdog, state: _State, now: float) -> str:
        """The line that ends a run the watchdog stopped at `now`."""
        idle = now - (watchdog.last_fresh if watchdog.last_fresh is not None else now)
        if watchdog.stop_after_s is None:  # the safety settings' bound
            return (
                f"no fresh action for {idle:.2f} s (stop_after_s = {self.safety_cfg.stop_after_s}): "
                f"{self._why_no_action(state)}; holding position"
            )
        return (  # the bound a hand-back's first chunk is awaited with
            f"no chunk {idle:.2f} s after the operator handed back (wait_timeout_s = "
            f"{self.cfg.wait_timeout_s:g}): {self._why_no_action(state)}; holding position"
        )

    # ------------------------------------------------------------------ pieces
    def _stamp(self, next_tick: float, began: float) -> float:
        """The time an observation read after a tick's send shows the world at: when its read `began`
        (not when it returned: a bus read or camera frame taking milliseconds made every due time that
        much late and the measured latency that much short), or, for a simulated robot whose world
        advanced a whole period inside `send_action` (`advances_on_send`), the next tick, when the next
        command acts on that state. Chunks are scheduled from this time, so a simulated robot runs each
        action at the state it was computed for, as a real arm does."""
        return max(began, next_tick) if self.advances_on_send else began

    def _read(self, out: EpisodeOutcome) -> tuple[float, dict[str, np.ndarray]] | None:
        """The robot's observation and the clock's time when the read that gave it began (earlier by
        the robot's `observation_lag_s`: a camera frame older than the read), retried
        `read_retries` times; None (and, after too many failed ticks in a row, `out.stopped`) when it
        cannot be read."""
        read, err = retried(lambda: (self.clock.now(), self.robot.get_observation()), self.cfg.read_retries)
        if read is not None:
            self._read_streak = 0
            began, obs = read
            return began - max(0.0, float(getattr(self.robot, "observation_lag_s", 0.0))), obs
        out.events["read_failed"] += 1
        self._read_streak += 1
        if self._read_streak >= self.cfg.max_read_failures or not out.ticks:
            out.stopped = (
                f"{self.robot.name}: observation could not be read on {self._read_streak} "
                f"tick(s) in a row ({failure(err)}); holding position"
            )
        return None

    def _send(self, safety: SafetyLayer, command: np.ndarray) -> np.ndarray:
        """Send a command that passed the safety layer; returns what reached the robot (what its
        `send_action` reports it sent, which the safety layer's step cap and hold follow from now on)."""
        return safety.sent(self.robot.send_action(command), command)

    def _hold_at(self, tick_t, safety, captured, out, on_tick, obs) -> None:
        """The hold that ends a run on a fault found after a tick's send: on the next tick of the
        schedule, as a tick of its own (never a second command and record in the same tick)."""
        self.clock.sleep_until(tick_t)
        self._hold(safety, tick_t, self.clock.now(), captured, out, on_tick, obs)

    def _hold(self, safety, nominal, began, captured, out, on_tick, obs, events=("hold",)) -> None:
        """A tick without a fresh action: send the safety layer's hold command (or nothing); `events`
        go into its record ("stop" too where the watchdog ends the run); `captured`: the capture time of
        `obs`, the newest observation, which `on_tick` records beside the hold."""
        command = safety.filter(None)
        sent_at = self.clock.now()  # before the send, as a tick's own record
        if command is not None:
            try:
                command = self._send(safety, command)
            except Exception as e:  # noqa: BLE001 - the robot is failing: say so, send nothing more
                reraise_lost(e)  # an interrupt that ctypes turned into another error
                failed = f"{self.robot.name}: could not send the hold command ({failure(e)})"
                out.stopped = out.stopped or failed
                command = None
        out.events["hold"] += 1
        record = TickRecord(
            nominal, began, captured, sent_at, command, NO_CHUNK, -1, float("nan"), tuple(events)
        )
        out.ticks.append(record)
        if on_tick is not None and obs is not None:
            on_tick(record, obs)

    def _first_chunk(self, history, out: EpisodeOutcome, state: _State) -> Reply | None:
        """Request the first chunk and wait for it (the robot is at rest; no tick runs yet)."""
        t_obs = history[-1][0]
        for _ in range(self.cfg.max_inference_errors):
            reply = self._request(history, None, out, state, t_obs)
            if reply is None:
                return None
            if self._valid(reply, out, state):
                state.errors = 0
                return reply
            state.requests.pop(reply.seq, None)
            if out.stopped:
                return None
        out.stopped = (
            out.stopped
            or f"no valid first chunk after {self.cfg.max_inference_errors} tries: {state.last_error}"
        )
        return None

    def _request(self, history, timeline, out, state, t_obs) -> Reply | None:
        """Hand the worker the history and the actions scheduled from the newest observation's step on
        (`timeline`, async only; None otherwise): to continue (inpainting), else as a planner's warm
        start. Without a timeline (sync mode, the first chunk) wait for the worker to take it (a remote
        worker reconnects after a request it gave up on), then for the reply, and return it."""
        if timeline is None and self.worker.busy:
            self._wait(out, state, until_ready=True)
            if out.stopped:
                return None
        steps, actions = self._history(history)
        previous, frozen, guide = None, 0, self.cfg.stitching == "inpaint"
        if timeline is None:
            if self.cfg.mode == "sync" and not state.human and not state.resuming:
                previous, guide = state.unexecuted, False  # the rest of its last chunk, as below
        elif not guide:
            # the schedule from the observation's step on: a planner warm-starts from it (the last plan
            # shifted by the steps actually run, not by the `execute` it assumed); a policy ignores it
            previous = timeline.committed(t_obs, self.step_s, t_obs, COMMITTED_MAX)[0]
            previous = previous if len(previous) else None
        else:
            # The new chunk is taken in `latency` after its observation (the estimate is measured from an
            # observation's time to the tick that took its chunk in), and that tick drops the actions due
            # more than half a period before it (`Timeline.merge`): those run from the current schedule,
            # so they are the frozen ones, and every later one is the new chunk's to choose.
            until = t_obs + state.latency() - self.period / 2
            previous, frozen = timeline.committed(t_obs, self.step_s, until, COMMITTED_MAX)
            if self.cfg.inpaint_overlap is not None:
                previous = previous[: frozen + self.cfg.inpaint_overlap]
            if len(previous) == 0:
                previous, frozen = None, 0
        seq = state.next_seq
        state.next_seq += 1
        state.requests[seq] = _Request(t_obs, self.clock.now(), frozen)
        state.last_request_obs = t_obs
        try:
            self.worker.submit(Request(seq, steps, actions, previous, frozen, self.feature.shape, guide))
        except WorkerDied as e:
            out.stopped = str(e) + "; holding position"
            return None
        return self._wait(out, state) if timeline is None else None

    def _wait(self, out: EpisodeOutcome, state: _State, until_ready: bool = False) -> Reply | None:
        """Block for the reply (sync mode, the first chunk), the robot at rest, or with `until_ready` until
        the worker can take a request; the worker's death, the operator's stop and `wait_timeout_s`
        without a reply end the run."""
        deadline = self.clock.now() + self.cfg.wait_timeout_s
        while True:
            reply = self._poll(out)  # (until_ready: it keeps a remote worker's connection going; a reply
            # now answers a request already given up on, which is never executed)
            if until_ready:
                if out.stopped or not self.worker.busy:
                    return None
            elif reply is not None or out.stopped:
                return reply
            if self._operator_stopped():
                out.stopped = "stopped by the operator"
                return None
            if self.clock.now() >= deadline:
                out.stopped = (
                    f"no chunk after {self.cfg.wait_timeout_s:g} s of waiting (wait_timeout_s): "
                    f"{self._why_no_action(state)}; holding position"
                )
                return None
            self.clock.sleep_until(self.clock.now() + WAIT_POLL_S)  # a simulated clock moves on too

    def _operator_stopped(self) -> bool:
        return self._stop_requested is not None and self._stop_requested()

    def _poll(self, out: EpisodeOutcome) -> Reply | None:
        try:
            reply = self.worker.poll()
        except WorkerDied as e:
            out.stopped = str(e) + "; holding position"
            return None
        if reply is None and not self.worker.alive():
            describe = getattr(self.worker, "exit_description", lambda: "stopped")()
            out.stopped = f"the inference worker {describe}; holding position"
        return reply

    def _valid(self, reply: Reply, out: EpisodeOutcome, state: _State) -> bool:
        """A chunk is taken only whole and sound: the robot's action shape, real numbers, every one finite."""
        shape = self.feature.shape
        a = reply.actions
        why = None
        if reply.error is not None:
            why = reply.error
            out.events["inference_error"] += 1
        elif a is None or a.ndim != 2 or a.shape[1:] != shape or len(a) < 1:
            why = (
                f"chunk of shape {None if a is None else a.shape}, expected (T, {', '.join(map(str, shape))})"
            )
            out.events["bad_chunk"] += 1
        elif a.dtype.kind not in "fiu":  # bool, complex, object, strings: no action values
            why = f"chunk {reply.seq} has dtype {a.dtype}, expected real numbers"
            out.events["bad_chunk"] += 1
        elif not np.all(np.isfinite(a)):
            why = f"chunk {reply.seq} holds non-finite actions (NaN or inf)"
            out.events["non_finite_chunk"] += 1
        if why is None:
            return True
        state.errors += 1
        state.last_error = why
        if state.errors >= self.cfg.max_inference_errors:
            out.stopped = f"{state.errors} bad chunks in a row, the last: {why}; holding position"
        return False

    def _arrived(self, reply, timeline, out, state, next_tick, now, sync: bool = False) -> None:
        request = state.requests.pop(reply.seq, _Request(now, now, 0))
        if state.human or request.obs_time < state.resume_after:  # computed before a human's takeover ended
            out.events["discarded_chunk"] += 1
            return
        if not self._valid(reply, out, state):
            return
        state.errors, state.resuming = 0, False
        state.latencies.append(now - request.obs_time)
        obs_time = next_tick if sync else request.obs_time  # sync: the robot waited, starts at next_tick
        chunk = Chunk(reply.actions, obs_time, self.step_s, reply.seq)
        self._take_chunk(chunk, reply, request, timeline, out, state, next_tick=next_tick, now=now)

    def _take_chunk(self, chunk, reply, request: _Request, timeline, out, state, *, next_tick, now) -> None:
        """Merge an accepted chunk into the timeline from `next_tick` and record it."""
        actions = chunk.actions
        if self.cfg.mode == "sync":  # the next request's observation follows the executed actions
            rest = np.asarray(actions)[self.cfg.replan_every :]
            state.unexecuted = rest if len(rest) else None  # the schedule from there on, a warm start
            actions = actions[: self.cfg.replan_every]
            chunk = Chunk(actions, chunk.obs_time, chunk.step_s, chunk.seq)
        merged = timeline.merge(chunk, next_tick)
        while len(out.chunks) < chunk.seq:  # requests whose replies were refused
            out.chunks.append(ChunkRecord(len(out.chunks), math.nan, math.nan, math.nan, math.nan, 0, 0))
        out.chunks.append(
            ChunkRecord(
                chunk.seq,
                request.obs_time,
                request.sent,
                now,
                reply.seconds,
                merged.dropped_stale,
                request.frozen,
            )
        )

    def _due_request(self, timeline: Timeline, state: _State, now: float) -> bool:
        """Async: ask for a chunk `replan_every` policy steps after the last request, or sooner when the
        pending actions would run out before a chunk asked for now could arrive."""
        if now - state.last_request_obs >= self.cfg.replan_every * self.step_s - self.period / 2:
            return True
        return timeline.remaining_after(now + state.latency() + self.period) == 0

    def _history(self, history) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
        """The last `window` observations one policy step apart (nearest ticks), oldest first, and the
        actions sent between them."""
        items = list(history)
        newest = items[-1][0]
        steps, actions, idx = [], [], []
        for j in range(self.window - 1, -1, -1):
            t = newest - j * self.step_s
            i = min(range(len(items)), key=lambda n: abs(items[n][0] - t))
            if idx and i <= idx[-1]:
                continue
            idx.append(i)
        for n, i in enumerate(idx):
            steps.append(items[i][1])
            if n > 0:
                a = items[i][2]
                actions.append(np.zeros(self.feature.shape) if a is None else np.asarray(a, float))
        return steps, actions

    def _why_no_action(self, state: _State) -> str:
        waiting_for = getattr(self.worker, "waiting_for", None)  # a remote worker knows best
        if waiting_for is not None:
            return waiting_for()
        if not self.worker.alive():
            return f"the inference worker {getattr(self.worker, 'exit_description', lambda: 'stopped')()}"
        if self.worker.busy:
            t = state.requests.get(state.next_seq - 1)
            waited = f" for {self.clock.now() - t.sent:.2f} s" if t else ""
            return f"the inference worker has not answered chunk {state.next_seq - 1}{waited} (hung?)"
        if state.last_error:
            return f"the last chunk was refused: {state.last_error}"
        return "no chunk covers this time"


@dataclass(frozen=True)
class _Request:
    """A chunk request: the capture time of its observation, when it was sent, and how many committed
    actions it froze (inpainting)."""

    obs_time: float
    sent: float
    frozen: int


@dataclass
class _State:
    """Bookkeeping of the requests of one episode."""

    next_seq: int = 0
    requests: dict[int, _Request] = field(default_factory=dict)  # by sequence number
    latencies: deque = field(default_factory=lambda: deque(maxlen=8))
    last_request_obs: float = -math.inf
    errors: int = 0
    last_error: str = ""
    human: bool = False  # a human has taken over
    resuming: bool = False  # handed back, waiting for the first chunk since
    resume_after: float = -math.inf  # chunks of observations before this are not used
    unexecuted: np.ndarray | None = None  # sync: the last chunk past its executed actions (a warm start)

    def latency(self) -> float:
        """The latency estimate: the worst of the recent round trips (old spikes are forgotten)."""
        return max(self.latencies) if self.latencies else 0.0


def retried(read: Callable[[], Any], tries: int) -> tuple[Any, Exception | None]:
    """`read()`, tried up to `tries` times: (its value, None), or (None, the last error). A robot's or a
    device's read: the deploy runtime's ticks and wm-collect's follow one retry policy."""
    error: Exception | None = None
    for _ in range(tries):
        try:
            return read(), None
        except Exception as e:  # noqa: BLE001 - any read error is retried, then counted
            reraise_lost(e)  # an interrupt that ctypes turned into another error
            error = e
    return None, error
