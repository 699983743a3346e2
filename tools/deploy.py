"""`wm-deploy robot=NAME checkpoint=DIR out=DIR [episodes=N] [record=STORE]`: run a controller on a
robot in real time.

The robot ticks at its own control rate on absolute deadlines while the controller (a diffusion
policy, MPC over a world model, or random actions: the same options as `wm-eval`) computes chunks
in an inference worker process (`runtime.mode=async`), or while the robot waits for each chunk
(`runtime.mode=sync`, the synchronous baseline; the chunk is computed in the worker process too, so
`runtime.wait_timeout_s` and Ctrl-C still end a hung model's wait). Every command passes the safety
layer; a fault (the model failing, hanging or dying, the robot not answering, no fresh action for
`runtime.safety.stop_after_s`) holds position and ends the episode with one line. Simulated tasks
run against the wall clock and report success.

With `teleop=DEVICE` an operator can take over (`robots.runtime.intervention`): moving the device, or
from START to START again, sends its action instead, recorded as an intervention. A device without all
the buttons (a leader arm, a SpaceMouse) gets them from `command_device` (the keyboard by default), as
in wm-collect.

With `server=HOST:PORT` the controller runs in `wm-serve` on that machine instead (its options are
the server's; `token=` or WM_SERVE_TOKEN proves this robot may use it); everything else is the same.

Writes `out/report.json` (achieved rate, tick error, latency, stale and dropped actions, underruns,
safety events, success), `out/timing.png`, and with `record=STORE` every tick into a store (each episode's
info: its seed, success, why it stopped, a simulated task's options; an existing store of another robot,
rate, task or task options is refused before the robot connects).
Ctrl-C or SIGTERM (a service manager stopping it, `docker stop`, `kill`) ends the run as cleanly as a
fault: the robot holds, the episode so far is recorded, the report written, the robot disconnected; a
second one interrupts at once.
Exit status: 0, 2 for a usage error, 3 when a fault stopped an episode, 130 on Ctrl-C, 143 on SIGTERM,
129 on SIGHUP (the ssh session or terminal that ran it closed: stopped as by Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from robots.runtime.loop import MAX_HZ, MIN_HZ, RuntimeConfig
from robots.runtime.recorder import BackgroundEpisode
from tools._cli import (
    FAULT_EXIT,
    UsageError,
    app,
    bind,
    build,
    changed,
    folder,
    record_of,
    say,
    sigterm_interrupts,
    store_path,
)
from tools._controller import (
    ControllerConfig,
    check_threads,
    refuse_temporal_ensemble,
    refuse_unguided_inpaint,
    trained_elsewhere,
    training_run,
)
from tools._device import DEFAULT_COMMAND_DEVICE, DeviceSettings


@dataclass(frozen=True, kw_only=True)
class DeployConfig(ControllerConfig):
    """`wm-deploy`'s options: the controller (`ControllerConfig`), the robot, the runtime."""

    out: str
    robot: str
    controller: str = "policy"
    robot_options: dict[str, Any] = field(default_factory=dict)
    episodes: int = 1
    seed: int = 1000
    max_steps: int | None = None
    control_hz: float | None = None
    record: str | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    inference_threads: int | None = None
    added_delay_s: float = 0.0
    status_every_s: float = 10.0
    teleop: str | None = None
    device_options: dict[str, Any] = field(default_factory=dict)
    command_device: str | None = DEFAULT_COMMAND_DEVICE
    command_options: dict[str, Any] = field(default_factory=dict)
    gains: dict[str, Any] = field(default_factory=dict)
    server: str | None = None
    token: str | None = field(default=None, repr=False)
    server_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.server is None:
            super().__post_init__()
            refuse_temporal_ensemble(self.policy, "in wm-deploy")
            rt = self.runtime
            if rt.stitching != "inpaint" or rt.mode == "sync":
                refuse_unguided_inpaint(self.policy, f"with runtime.mode={rt.mode}, stitching={rt.stitching}")
        else:
            if self.checkpoint:
                raise UsageError(
                    "with server=HOST:PORT the controller is the server's (wm-serve checkpoint=...): "
                    "give no checkpoint="
                )
            given = [f"controller={self.controller}" for _ in changed(self, ("controller",))]
            given += self.mpc_options_given() + self.planner_options_given() + self.policy_options_given()
            given += [
                f"{name}={getattr(self, name)}" for name in changed(self, ("inference_threads", "device"))
            ]  # (device= was taken, recorded in report.json and not used: the server's device runs it)
            if self.added_delay_s:  # it was reported as applied, and the figures were taken without it
                raise UsageError(
                    f"added_delay_s={self.added_delay_s:g}: the delay is added in wm-deploy's own inference "
                    "worker; with server=HOST:PORT the latency is the server's and the network's"
                )
            if given:
                raise UsageError(
                    f"{', '.join(given)}: with server=HOST:PORT the controller is the server's; "
                    "give these to wm-serve"
                )
            self.remote_config()  # its checks
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.seed < 0:  # a task's reset refused it, after the worker and the robot had started
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.control_hz is not None and not (math.isfinite(self.control_hz) and self.control_hz > 0):
            raise ValueError(f"control_hz must be a positive finite number, got {self.control_hz}")
        if self.control_hz is not None and not MIN_HZ <= self.control_hz <= MAX_HZ:  # 1e-300: an overflow
            raise ValueError(f"control_hz must be in {MIN_HZ:g}..{MAX_HZ:g}, got {self.control_hz}")
        if not self.status_every_s > 0:
            raise ValueError(f"status_every_s must be positive, got {self.status_every_s}")
        if not (math.isfinite(self.added_delay_s) and self.added_delay_s >= 0):
            raise ValueError(f"added_delay_s must be a finite number >= 0, got {self.added_delay_s}")
        self._check_paths()
        check_threads(self.inference_threads)
        from robots.registry import robot_entry, task_entry

        if self.teleop is not None:
            DeviceSettings.of(self).check(needs_start=False)
        elif self.device_options or self.command_options or self.gains or changed(self, ("command_device",)):
            raise UsageError(
                "device_options, command_device, command_options and gains apply to a takeover device: "
                "give teleop=DEVICE"
            )
        if is_sim(self.robot):
            build(task_entry(self.robot).options, self.robot_options, "robot_options")
            return
        build(robot_entry(self.robot).options, self.robot_options, "robot_options")  # names the robots
        if self.robot_options.get("calibrate") is True:  # the worker, the safety layer and the recording
            raise UsageError(  # took the limits before it: they planned and capped with the uncalibrated ones
                f"robot_options.calibrate=true: wm-deploy takes {self.robot}'s joint limits before it "
                "connects, and calibrating it then would change them; calibrate it first "
                "(`lerobot-calibrate`, or wm-collect with +robot_options.calibrate=true)"
            )
        if self.max_steps is None:
            raise UsageError(f"robot={self.robot} is a real robot: give max_steps= (ticks per episode)")
        if self.controller == "mpc" and self.server is None:
            raise UsageError(
                "controller=mpc plans to a goal observation, which only simulated tasks give; "
                f"robot={self.robot} is a real robot: deploy a policy (controller=policy)"
            )

    def _check_paths(self) -> None:
        """out= a folder and record= a store, or paths where they can be made: a file in the way was an
        OSError (a traceback under a file's parent) after the robot had connected."""
        folder("out", self.out, "give a folder (new, or an earlier run's)")
        if self.record == "":  # was no recording, without a word
            raise UsageError("record= is empty: give a store's path, or leave record out")
        if self.record is None:
            return
        store_path("record", self.record)
        out, rec = Path(self.out).resolve(), Path(self.record).resolve()
        if rec == out:
            raise UsageError(f"record={self.record} is also out=: give the store a path of its own")
        if rec in out.parents:  # (the report went inside the new store, which then refused a rerun and
            raise UsageError(  # its own drop_episodes: "holds files that are not the store's")
                f"out={self.out} is inside record={self.record}: give the run a folder outside the store"
            )

    def remote_config(self) -> Any:
        from robots.runtime.remote import RemoteConfig
        from robots.runtime.server import token_from_env

        try:
            return RemoteConfig(self.server, token_from_env(self.token), self.server_timeout_s)
        except ValueError as e:  # the client's request_timeout_s is wm-deploy's server_timeout_s
            raise UsageError(str(e).replace("request_timeout_s", "server_timeout_s")) from None


def is_sim(name: str) -> bool:
    """A simulated task (run against the wall clock), not a real robot."""
    from robots.registry import ROBOSUITE_PREFIX, TASKS

    return name in TASKS or name.startswith(ROBOSUITE_PREFIX)


def make_robot(cfg: DeployConfig, image_size: tuple[int, int] | None) -> Any:
    """The robot, not yet connected: a simulated task rendering at the model's image size, or a real
    arm from the robot registry."""
    from robots.registry import make_task
    from robots.sim.base import SimConfig

    if is_sim(cfg.robot):
        opts: dict[str, Any] = {"options": dict(cfg.robot_options)}
        if image_size is not None:
            opts["image_size"] = image_size
        if cfg.max_steps:
            opts["max_steps"] = cfg.max_steps
        robot = make_task(cfg.robot, SimConfig(**opts))
    else:
        from robots.registry import make_robot as make_real

        robot = make_real(cfg.robot, **cfg.robot_options)
    return robot


def set_control_hz(cfg: DeployConfig, robot: Any) -> float:
    """Drive `robot` at `control_hz=` (when given); returns how many times faster than the wall clock a
    simulated task's world then runs (a MuJoCo task still steps its physics by its own period each
    tick; robosuite builds its env at the new rate), 1 for a real robot."""
    if cfg.control_hz is not None:
        robot.control_hz = cfg.control_hz
    return robot.control_hz * robot.step_seconds() if is_sim(cfg.robot) else 1.0


def check_takeover(cfg: DeployConfig, robot: Any) -> None:
    """A takeover device whose motion cannot drive `robot` refused before anything starts (its build,
    after the robot connects, says it again)."""
    if cfg.teleop is not None:
        DeviceSettings.of(cfg).check_motion(robot)


def task_options(cfg: DeployConfig) -> dict[str, Any] | None:
    """A simulated task's options as it runs them (its defaults filled in), as wm-collect records them in
    every episode's info: a store is recorded into only with the same ones. None for a real robot."""
    if not is_sim(cfg.robot):
        return None
    import dataclasses

    from robots.registry import task_entry

    return dataclasses.asdict(build(task_entry(cfg.robot).options, cfg.robot_options, "robot_options"))


def make_takeover(cfg: DeployConfig, robot: Any) -> Any:
    """The operator's takeover device (connected), or None without `teleop=`. It is built as wm-collect
    builds its device: one without all the buttons (a leader arm) gets `command_device` for START."""
    if cfg.teleop is None:
        return None
    from robots.runtime.intervention import robot_takeover

    device = DeviceSettings.of(cfg).build(robot)  # (`check_takeover` said before anything began that it maps)
    takeover = robot_takeover(device, robot, cfg.gains)
    device.connect()  # a failure leaves nothing of it open (a leader arm closes its command device too)
    return takeover


def say_trained_elsewhere(cfg: DeployConfig, robot: Any, info: dict[str, Any]) -> None:
    """Notes when the model's training data came from another robot or at another rate (`trained_elsewhere`):
    the checkpoint read here, or what the server read of its own (`info["trained_on"]`)."""
    if cfg.server is not None:
        run = info.get("trained_on")
        run = run if isinstance(run, dict) else {}
    else:
        run = training_run(cfg.checkpoint) if cfg.checkpoint else {}
    hz, given = cfg.runtime.policy_hz or robot.control_hz, cfg.runtime.policy_hz is not None
    fix = "" if given else "give runtime.policy_hz={fps} to play them at that rate"
    for note in trained_elsewhere(run, cfg.robot, hz, fix):
        print(f"note: {note}", file=sys.stderr)


def deploy(cfg: DeployConfig) -> tuple[dict[str, Any], int]:
    """Run the episodes; returns the report and the exit status."""
    from policies.evaluate import goal_observation
    from robots.collect import OPTIONS_KEY, open_store
    from robots.runtime.loop import Runtime
    from robots.runtime.realtime import realtime, usable_cores, worker_cpus
    from robots.runtime.report import (
        LiveStatus,
        TickRows,
        digest,
        live_line,
        recording_schema,
    )
    from robots.runtime.worker import ControllerSpec, ProcessWorker, check_robot

    out = Path(cfg.out)
    robot = make_robot(cfg, None)  # not connected: its action bounds, which the controller plans within
    time_scale = set_control_hz(cfg, robot)
    if time_scale != 1:
        print(
            f"note: robot={cfg.robot} steps its physics {time_scale / robot.control_hz:g} s per tick, so at "
            f"control_hz={robot.control_hz:g} it runs {time_scale:g}x real time (a recording says "
            f"{robot.control_hz:g} fps); leave control_hz unset to run it in real time",
            file=sys.stderr,
        )
    check_takeover(cfg, robot)  # before the worker loads a model
    options = task_options(cfg)
    feat = robot.action_feature
    threads = _inference_threads(cfg)
    spec = ControllerSpec(
        "tools._controller:worker_controller",
        {"settings": cfg.settings(), "low": list(feat.low), "high": list(feat.high), "seed": cfg.seed},
        threads=threads,
        delay_s=cfg.added_delay_s,
        cpus=worker_cpus(cfg.runtime.control_cpu),
        quiet_gc=cfg.runtime.quiet_gc,
    )
    # (`worker_cpus` has none for the worker: it runs on the control loop's core, said at the start)
    one_core = cfg.runtime.control_cpu is not None and usable_cores() == 1 and cfg.server is None
    if cfg.server is not None:
        from robots.runtime.remote import RemoteWorker

        worker: Any = RemoteWorker(cfg.remote_config(), feat.low, feat.high)
        until_episodes = worker.kept_alive  # the server closes a session silent for its session_timeout_s
    else:
        worker = ProcessWorker(spec)  # sync mode too: a computation on this thread had no deadline
        until_episodes = contextlib.nullcontext
    stop = _StopFlag()
    outcomes, store, takeover, kernels, recording = [], None, None, None, None
    episodes_began, written, scheduling = False, {}, []
    cleanup = contextlib.ExitStack()  # each runs (last first), whatever one before it raised
    # SIGTERM's default action ended the process where it stood (the worker loading, the robot or a
    # takeover device connecting, the cleanup): it interrupts as Ctrl-C does until the cleanup has run
    cleanup.enter_context(sigterm_interrupts(_StopFlag.SIGNALS[1:]))
    try:
        worker.start()
        with until_episodes():  # (a real robot's calibration prompt may take minutes)
            if is_sim(cfg.robot):  # rendered at the model's image size, known once the worker loaded it
                robot = make_robot(cfg, worker.info.get("image_size"))
                set_control_hz(cfg, robot)
            check_robot(worker.info, robot)  # the model reads what this robot gives, or one line says not
            say_trained_elsewhere(cfg, robot, worker.info)
            runtime = Runtime(robot, worker, cfg.runtime)  # its safety settings checked against the robot
            if cfg.record:  # a store this run cannot record into is refused before the robot connects
                schema = recording_schema(robot.schema(cfg.robot if is_sim(cfg.robot) else ""))
                store = open_store(cfg.record, schema, options)
            out.mkdir(parents=True, exist_ok=True)
            robot.connect()
            takeover = make_takeover(cfg, robot)
        sim = is_sim(cfg.robot)
        action_spec = robot.action_feature.key_spec()
        with stop, realtime(cfg.runtime.realtime_priority, cfg.runtime.control_cpu) as notes:
            if one_core:
                notes.append(
                    f"core {cfg.runtime.control_cpu} is the only one this process may use: the inference "
                    "worker shares it with the control loop"
                )
            scheduling.extend(notes)  # (the report says what was not as asked)
            for line in notes:
                say(f"note: {line}")
            episodes_began = True
            for i in range(cfg.episodes):
                goal = None
                if sim:
                    robot.reset(cfg.seed + i)
                    # (with server= the controller is the server's: a goal where the task has one)
                    goal = goal_observation(robot, needed=cfg.controller == "mpc" and cfg.server is None)
                if stop.is_set():  # asked while the robot reset: no episode begins (nor counts as failed)
                    break
                # written by a thread of its own: a flush on the tick path held the arm (`recorder`)
                recording = BackgroundEpisode(store.begin_episode(), spec.cpus) if store is not None else None
                live = LiveStatus(cfg.status_every_s, say)
                rows = TickRows(action_spec, robot.position_actions)

                def on_tick(
                    rec: Any, obs: Any, writer: Any = recording, live: Any = live, rows: TickRows = rows
                ) -> None:
                    if writer is not None:
                        row = rows.row(rec, obs)
                        if row is not None:
                            writer.add_step(row)
                    live(rec)

                limit = cfg.max_steps or (robot.config.max_steps if sim else 0)
                outcome = runtime.run_episode(
                    limit,
                    goal=goal,
                    done=(lambda: robot.done) if sim else None,
                    on_tick=on_tick,
                    stop_requested=stop.is_set,
                    takeover=takeover,
                )
                outcome.success = robot.is_success() if sim else None
                outcomes.append(digest(outcome))  # the report's numbers, not every tick's record
                if recording is not None:
                    if outcome.ticks:
                        info = {"seed": cfg.seed + i, "success": outcome.success, "stopped": outcome.stopped}
                        said = recording.end(info if options is None else {**info, OPTIONS_KEY: options})
                        if said is not None:
                            print(f"warning: episode {i}: {said}", file=sys.stderr, flush=True)
                    else:
                        recording.discard()
                    recording = None
                say(live_line(outcomes[-1].figures, i))
                if stop.is_set() or (outcome.stopped and (not sim or not worker.alive() or worker.busy)):
                    break  # a real robot stops at a fault; a simulated one goes on while the model can
            kernels = worker.kernels()  # the CPU kernels the model ran on (None: not known here)
    finally:
        with cleanup:
            # From here a first signal is noted (the exit status says it), not acted on: the worker, the
            # robot and the store close and the report is written last, even after one of them failed
            # (a signal there, or a disconnect that raised, lost the whole report); a second interrupts.
            cleanup.enter_context(stop)
            if episodes_began:
                cleanup.callback(
                    lambda: written.update(
                        report=_report(cfg, worker, robot, outcomes, kernels, time_scale, scheduling)
                    )
                )
            if store is not None:
                cleanup.callback(store.close)  # (an unfinished episode: not committed)
            if recording is not None:  # its thread's writes end before the store closes
                cleanup.callback(recording.close)
            cleanup.callback(robot.disconnect)  # a no-op when it never connected
            if takeover is not None:
                cleanup.callback(takeover.close)
            cleanup.callback(worker.close)
    status = 128 + stop.signum if stop.signum else FAULT_EXIT if any(o.stopped for o in outcomes) else 0
    return written["report"], status


def _inference_threads(cfg: DeployConfig) -> int:
    """The local inference worker's torch threads: `inference_threads`, else all the cores this process
    may use but one (the machine's count under a cpuset gave far more threads than cores)."""
    from robots.runtime.realtime import usable_cores

    return cfg.inference_threads or max(1, usable_cores() - 1)


def _report(
    cfg: DeployConfig,
    worker: Any,
    robot: Any,
    outcomes: list,
    kernels: Any,
    time_scale: float,
    scheduling: list[str],
) -> dict[str, Any]:
    """Write the run's report (report.json and the plots in `cfg.out`) and say where; returns it.
    `scheduling`: the notes of what of runtime.realtime_priority / control_cpu was not as asked."""
    from robots.runtime.report import run_report, server_figures
    from robots.runtime.report import write_report as write_run_report
    from robots.runtime.worker import kernel_line

    threads = _inference_threads(cfg)
    settings = {
        "robot": cfg.robot,
        "control_hz": robot.control_hz,
        "sim_time_scale": time_scale if is_sim(cfg.robot) else None,
        "controller": worker.info.get("controller", cfg.controller),
        "checkpoint": worker.info.get("checkpoint", cfg.checkpoint),
        "runtime": {k: v for k, v in cfg.runtime.__dict__.items() if k != "safety"},
        "scheduling_notes": scheduling,  # (the runtime's settings are what was asked)
        "safety": cfg.runtime.safety.__dict__,
        "added_delay_s": cfg.added_delay_s,
        "inference_threads": threads if cfg.server is None else None,  # remote: the server's own
        "seed": cfg.seed,
        "kernels": kernels,
        # every option this run was given (policy and planner settings, episodes, robot options): what
        # reruns it; never the token
        "config": {k: v for k, v in record_of(cfg).items() if k != "token"},
    }
    if kernels is not None:
        say(kernel_line(kernels))
    if cfg.server is not None:
        settings["server"] = server_figures(worker)
    report = run_report(outcomes, settings)
    paths = write_run_report(Path(cfg.out), report, outcomes)
    say(f"wrote {', '.join(map(str, paths))}" + (f", recording {cfg.record}" if cfg.record else ""))
    return report


class _StopFlag:
    """Ctrl-C, SIGTERM or SIGHUP asks the control loop to stop at the next tick (it holds position and
    ends the run cleanly); a second one interrupts at once. SIGTERM's and SIGHUP's default action ended
    the process where it stood: no disconnect, no report, the episode's recording lost, the inference
    worker left running."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the ssh session or terminal closed

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopFlag:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def _main(cfg: DictConfig) -> int:
    report, status = deploy(bind(DeployConfig, cfg, job_file="record"))
    keys = ("success_rate", "achieved_hz", "tick_error_ms", "latency_ms", "underruns", "stale_actions_sent")
    say(json.dumps({k: report[k] for k in keys if report.get(k) is not None}))
    return status


main = app("deploy", _main)

if __name__ == "__main__":
    main()
