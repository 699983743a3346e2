"""wm-deploy end to end through its console script: a diffusion policy and MPC over a world model on a
simulated task run against the wall clock, with the inference worker in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from apps import BIN, TINY_WM, cli, run_app, train_tiny_policy

from robots.runtime.report import RECORD_KEYS
from wm.data import DemoStore

REPORT_KEYS = (
    "achieved_hz",
    "tick_error_ms",
    "latency_ms",
    "stale_actions_sent",
    "stale_actions_dropped",
    "underruns",
    "safety_events",
    "success_rate",
)


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "maze.zarr"
    res = cli("wm-collect", "task=pointmaze", "episodes=4", f"store={path}", "image_size=32", "noise_std=0.3")
    assert res.returncode == 0, res.stderr
    return path


@pytest.fixture(scope="module")
def policy(maze, tmp_path_factory):
    return train_tiny_policy("pointmaze", maze, tmp_path_factory.mktemp("deploy") / "dp")


@pytest.fixture(scope="module")
def world_model(maze, tmp_path_factory):
    run = tmp_path_factory.mktemp("deploy") / "wm"
    res = cli(
        "wm-train", "model=dino_wm", "task=pointmaze", f"store={maze}", f"out={run}", "trainer.steps=2",
        "trainer.batch_size=8", "trainer.val_every=2", "model.n_hist=2", *TINY_WM,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return run


def test_policy_deployed_async_with_recording(policy, tmp_path):
    out, store = tmp_path / "run", tmp_path / "rec.zarr"
    res = cli(
        "wm-deploy", "robot=pointmaze", "controller=policy", f"checkpoint={policy}", f"out={out}",
        "episodes=2", "max_steps=12", "control_hz=20", f"record={store}", "runtime.replan_every=4",
        "runtime.realtime_priority=10", f"runtime.control_cpu={max(os.sched_getaffinity(0))}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "episode 1:" in res.stdout and "tick error p50 / p99" in res.stdout
    assert (  # the store was recorded at pointmaze's 10 Hz
        "note: the checkpoint was trained on data at 10 Hz, and its actions run at 20 Hz here: each was "
        "meant for 0.1 s; give runtime.policy_hz=10 to play them at that rate" in res.stderr
    )
    report = json.loads((out / "report.json").read_text())
    assert all(k in report for k in REPORT_KEYS)
    assert report["episodes"] == 2 and 0 <= report["success_rate"] <= 1
    assert report["tick_error_ms"]["p50"] is not None and report["latency_ms"]["p50"] > 0
    assert report["settings"]["runtime"]["stitching"] == "inpaint" and report["chunks"] >= 2
    assert report["settings"]["runtime"]["realtime_priority"] == 10  # asked; what was not applied:
    notes = [line.removeprefix("note: ") for line in res.stderr.splitlines() if "SCHED_FIFO" in line]
    assert report["settings"]["scheduling_notes"] == notes  # (the report said SCHED_FIFO where it was not)
    # pointmaze steps its physics 0.1 s a tick (10 Hz): at 20 Hz its world runs twice real time, said
    assert report["settings"]["sim_time_scale"] == 2.0 and report["settings"]["control_hz"] == 20
    assert (
        "note: robot=pointmaze steps its physics 0.1 s per tick, so at control_hz=20 it runs 2x" in res.stderr
    )
    assert (out / "timing.png").stat().st_size > 0
    kern = report["settings"]["kernels"]  # chosen in the worker process, asked for at the end of the run
    assert kern["mode"] == "measure" and kern["shapes"] == sum(kern["by_kernel"].values()) > 0
    assert f"CPU kernels (measure): {kern['shapes']} op shapes" in res.stdout
    with DemoStore.open(store) as s:
        assert s.n_episodes == 2 and all(k in s.schema.keys for k in RECORD_KEYS)
        ep = s.get_episode(0)
        sent = ep["sent"].astype(bool)
        assert sent.all() and np.isfinite(ep["action"]).all()
        assert np.all(np.abs(ep["action"]) <= 1.0)  # pointmaze's force limits
        assert np.all(ep["action_sent_time"] >= ep["timestamp"])  # sent after the observation was read
        assert np.all(np.diff(ep["chunk"]) >= 0) and ep["chunk"].max() >= 1  # chunks in order, several
        assert s.episode_info(0)["success"] in (True, False)
    res = cli("wm-info", f"store={store}", "verify=true", "contact_sheet=none")
    assert res.returncode == 0, res.stderr


def test_a_control_core_that_is_the_only_one_is_said_to_be_shared_with_the_worker(tmp_path):
    """Under a one-core mask (taskset -c N) with runtime.control_cpu=N, the worker ran on the control
    loop's core, possibly under its SCHED_FIFO, while the settings promise it the others: a note says so,
    and the report keeps it."""
    core = max(os.sched_getaffinity(0))
    res = subprocess.run(
        [str(BIN / "wm-deploy"), "robot=pointmaze", "controller=random", "max_steps=3", f"out={tmp_path}",
         f"runtime.control_cpu={core}"],
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    line = (
        f"core {core} is the only one this process may use: the inference worker shares it with the "
        "control loop"
    )
    assert f"note: {line}" in res.stdout
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["scheduling_notes"] == [line]


@pytest.mark.parametrize("stitching", ["replace", "average", "ensemble"])
def test_every_stitching_and_the_synchronous_baseline(policy, tmp_path, stitching):
    for mode in ("async", "sync") if stitching == "replace" else ("async",):  # sync merges no chunks
        out = tmp_path / mode
        res = cli(
            "wm-deploy", "robot=pointmaze", "controller=policy", f"checkpoint={policy}", f"out={out}",
            "max_steps=8", "control_hz=20", f"runtime.mode={mode}", f"runtime.stitching={stitching}",
            "runtime.replan_every=2",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["ticks"] == 8 and report["settings"]["runtime"]["mode"] == mode
        assert report["settings"]["kernels"]["shapes"] > 0  # the worker's process, or this one (sync)
        if mode == "sync":
            assert report["chunks"] == 4  # two actions executed per chunk, the robot waiting for each
            assert report["stale_actions_dropped"] == 0


PLANNER_OPTIONS = {
    "cem": ["planner=cem", "planner.samples=16", "planner.iterations=2"],
    # gradient planning in the worker, which computes under inference mode (it failed every chunk there)
    "cem_gd": ["planner=cem_gd", "planner.cem.samples=16", "planner.cem.iterations=2"]
    + ["planner.grad.steps=2"],
}


@pytest.mark.parametrize("planner", list(PLANNER_OPTIONS))
def test_mpc_with_history_deployed(world_model, tmp_path, planner):
    out = tmp_path / "mpc"
    res = cli(
        "wm-deploy", "robot=pointmaze", "controller=mpc", f"checkpoint={world_model}", f"out={out}",
        "max_steps=6", "control_hz=10", *PLANNER_OPTIONS[planner], "subgoals=off",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "the checkpoint was trained" not in res.stderr  # its rate and robot
    report = json.loads((out / "report.json").read_text())
    assert report["ticks"] == 6 and report["chunks"] >= 2 and report["stopped"] == []


def test_the_seed_reaches_the_planners_noise(world_model):
    """wm-deploy's and wm-serve's `seed` ("the controller's seed: controller=random, planners") never
    reached MPC's planner: every seed planned with the same noise."""
    from tools._cli import build
    from tools._controller import ControllerConfig, worker_controller

    options = {"controller": "mpc", "checkpoint": str(world_model), "subgoals": "off"}
    planner = {"name": "cem", "samples": 16, "elites": 4}
    settings = build(ControllerConfig, {**options, "planner": planner}).settings()
    seeds = [worker_controller(settings, [-1.0, -1.0], [1.0, 1.0], s).planner.cfg.seed for s in (1, 2, 1)]
    assert seeds[0] == seeds[2] != seeds[1]
    settings["planner"]["seed"] = None  # a fresh seed per planner, as asked
    assert worker_controller(settings, [-1.0, -1.0], [1.0, 1.0], 1).planner.cfg.seed is None
    settings["planner"] = {"name": "cem_gd", "cem": {"samples": 16, "elites": 4}}  # both stages seeded
    stages = [worker_controller(settings, [-1.0, -1.0], [1.0, 1.0], s).planner for s in (1, 2)]
    assert (
        stages[0].cem.cfg.seed != stages[1].cem.cfg.seed
        and stages[0].grad.cfg.seed != stages[1].grad.cfg.seed
    )


def test_deploy_usage_errors_are_one_line(tmp_path, policy):
    leader = [
        "robot=so101_follower",
        "controller=random",
        f"out={tmp_path / 'a'}",
        "max_steps=5",
        "teleop=leader_arm",
    ]
    cases = [
        (["robot=so101_follower", "controller=random", f"out={tmp_path / 'a'}"], "max_steps="),
        (  # MPC plans to a goal, and a real robot gives none
            [
                "robot=so101_follower",
                "controller=mpc",
                f"checkpoint={policy}",
                f"out={tmp_path / 'a'}",
                "max_steps=5",
            ],
            "controller=mpc plans to a goal observation, which only simulated tasks give",
        ),
        (
            ["robot=so101_folower", "controller=random", f"out={tmp_path / 'a'}"],
            "did you mean so101_follower",
        ),
        (  # the limits were taken before it connected: the run planned and capped with uncalibrated ones
            ["robot=so101_follower", "controller=random", f"out={tmp_path / 'a'}", "max_steps=5"]
            + ["+robot_options.calibrate=true"],
            "robot_options.calibrate=true: wm-deploy takes so101_follower's joint limits before it connects",
        ),
        (["robot=pointmaze", f"out={tmp_path / 'a'}", "runtime.stitching=blend"], "stitching must be one of"),
        (
            ["robot=pointmaze", f"out={tmp_path / 'a'}", "runtime.safety.hold_after_s=3"],
            "hold_after_s <= stop_after_s",
        ),
        (["robot=pointmaze", f"out={tmp_path / 'a'}", "controller=mpc"], "checkpoint=DIR"),
        (
            ["robot=pointmaze", f"out={tmp_path / 'a'}", f"checkpoint={policy}", "controller=mpc"],
            "cannot serve",
        ),
        (  # a leader arm's START comes from command_device (a name), not from its own options
            [*leader, "+device_options.command_device=keyboard"],
            "device_options.command_device: give the device for episode commands as command_device=NAME",
        ),
        ([*leader, "+command_options.bakend=terminal"], "did you mean command_options.backend"),
        ([*leader, "command_device=null"], "teleop=leader_arm has no START button: give command_device="),
    ]
    for args, words in cases:
        res = run_app("wm-deploy", *args)
        assert res.returncode == 2, (args, res.stderr)
        assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert not (tmp_path / "a").exists()


@contextlib.contextmanager
def wm_serve(*args: str, env: dict | None = None):
    """`wm-serve` in its own process on a free port; yields (port, its process)."""
    proc = subprocess.Popen(
        [str(BIN / "wm-serve"), "port=0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines)
        yield int(lines[-1].split(" on tcp://127.0.0.1:")[1].split(";")[0]), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_policy_served_by_wm_serve_is_deployed_from_another_process(policy, tmp_path):
    out = tmp_path / "remote"
    with wm_serve("controller=policy", f"checkpoint={policy}") as (port, proc):
        res = cli(
            "wm-deploy", "robot=pointmaze", f"server=127.0.0.1:{port}", f"out={out}", "episodes=2",
            "max_steps=12", "control_hz=20", "runtime.replan_every=4",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "note: the checkpoint was trained on data at 10 Hz, and its actions run at 20 Hz" in res.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["episodes"] == 2 and 0 <= report["success_rate"] <= 1 and report["chunks"] >= 4
        server = report["settings"]["server"]
        assert server["address"] == f"127.0.0.1:{port}" and server["reconnects"] == 0
        assert server["reply_taken_in_ms"]["p50"] >= server["inference_ms"]["p50"] > 0
        assert 0 < server["network_rtt_ms"] < 50 and abs(server["clock_offset_ms"]) < 5  # one clock here
        assert report["settings"]["checkpoint"] == str(policy)
        assert report["settings"]["kernels"] is None  # the server chose them: its log says which
        given = report["settings"]["config"]  # every option, to rerun it (there were no such record)
        assert given["episodes"] == 2 and given["max_steps"] == 12 and given["runtime"]["replan_every"] == 4
        # the model reads a 4-d proprioception; arm_push gives 6: refused before the robot moves
        res = cli("wm-deploy", "robot=arm_push", f"server=127.0.0.1:{port}", f"out={tmp_path / 'x'}")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "the model reads 'proprio' of shape (4,); arm_push gives (6,)" in res.stderr
        res = cli(
            "wm-deploy", "robot=pointmaze", f"server=127.0.0.1:{port}", f"out={out}", "token=not-the-token",
            "max_steps=4", "control_hz=20",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr  # a server without a token takes any client on loopback
        assert "not-the-token" not in (out / "report.json").read_text()  # the options are; never the token
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        log = proc.stdout.read()
        assert "stopped: " in log and "CPU kernels (measure): " in log


def test_serve_usage_errors_are_one_line(policy, tmp_path):
    cases = [
        (["host=0.0.0.0", f"checkpoint={policy}"], "host=0.0.0.0 exposes the server beyond this machine"),
        (["controller=policy"], "checkpoint=DIR"),
        (["port=70000", f"checkpoint={policy}"], "port must be 0..65535"),
    ]
    for args, words in cases:
        res = run_app("wm-serve", *args)
        assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
    res = run_app(
        "wm-deploy", "robot=pointmaze", "server=localhost:1", f"checkpoint={policy}", f"out={tmp_path}"
    )
    assert res.returncode == 2 and "give no checkpoint=" in res.stderr
    res = run_app(
        "wm-deploy", "robot=pointmaze", "server=localhost:1", "policy.sampler_steps=2", f"out={tmp_path}"
    )
    assert res.returncode == 2 and (  # the server's controller: ignored before
        "policy.sampler_steps: with server=HOST:PORT the controller is the server's; give these to wm-serve"
        in res.stderr
    )
    res = run_app(
        "wm-deploy", "robot=pointmaze", "server=localhost:1", "controller=mpc", "planner.samples=9",
        f"out={tmp_path}",
    )  # fmt: skip
    assert res.returncode == 2 and (  # the server's controller ran, and report.json said "policy"
        "controller=mpc, planner.samples: with server=HOST:PORT the controller is the server's" in res.stderr
    )
    for args, words in [
        (
            ["server=nowhere"],
            "server must be HOST:PORT (a name, an IPv4 address or [an IPv6 one], no scheme), got",
        ),
        (["server=http://gpu-host:5555"], "no scheme), got 'http://gpu-host:5555'"),  # was a traceback
        # the delay was reported as applied, and the figures were taken without it
        (["server=localhost:1", "added_delay_s=0.3"], "added_delay_s=0.3: the delay is added in wm-deploy's"),
        (["server=localhost:1", "inference_threads=2"], "inference_threads=2: with server=HOST:PORT the"),
        (["server=localhost:1", "device=cpu"], "device=cpu: with server=HOST:PORT the"),  # taken, unused
    ]:
        res = run_app("wm-deploy", "robot=pointmaze", *args, f"out={tmp_path}")
        assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
    res = run_app(
        "wm-deploy", "robot=pointmaze", "server=localhost:1", "server_timeout_s=inf", f"out={tmp_path}"
    )
    assert res.returncode == 2 and "server_timeout_s must be a positive finite number, got inf" in res.stderr


def test_a_server_with_a_token_takes_only_robots_that_prove_it(policy, tmp_path):
    secret = "a long shared secret"
    with wm_serve("controller=policy", f"checkpoint={policy}", env={"WM_SERVE_TOKEN": secret}) as (
        port,
        proc,
    ):
        base = ["wm-deploy", "robot=pointmaze", f"server=127.0.0.1:{port}", f"out={tmp_path}", "max_steps=4"]
        res = cli(*base)
        assert res.returncode == 2 and "requires a token: give token=" in res.stderr, res.stderr
        res = cli(*base, "token=not the secret at all")
        assert res.returncode == 2 and "authentication failed" in res.stderr, res.stderr
        res = cli(*base, f"token={secret}")
        assert res.returncode == 0, res.stderr
        assert secret not in res.stdout + res.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        log = proc.stdout.read()
    assert "authentication failed" in log and re.search(r"[1-9]\d* refused", log) and secret not in log


def test_mpc_served_by_wm_serve(world_model, tmp_path):
    planner = ["planner.samples=16", "planner.iterations=2", "subgoals=off"]
    with wm_serve("controller=mpc", f"checkpoint={world_model}", *planner) as (port, _):
        res = cli(
            "wm-deploy", "robot=pointmaze", f"server=127.0.0.1:{port}", f"out={tmp_path}", "max_steps=6",
            "control_hz=10",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ticks"] == 6 and report["chunks"] >= 2 and report["settings"]["controller"] == "mpc"


def test_an_mpc_server_refuses_what_no_robot_could_use_before_it_serves(world_model, tmp_path):
    """It bound and said "serving", then refused every robot at its hello (wm-eval refuses these at once)."""
    cases = [
        (["execute=50"], "cannot execute 50 steps of a horizon-"),
        (["subgoals=on", f"store={tmp_path / 'gone.zarr'}"], "gone.zarr does not exist (the store subgoals"),
    ]
    for args, words in cases:
        res = run_app("wm-serve", "controller=mpc", f"checkpoint={world_model}", "port=0", *args)
        assert res.returncode == 2 and words in res.stderr and "serving" not in res.stdout, res.stderr


def test_a_run_a_fault_stopped_exits_with_3(tmp_path):
    """The documented status of a fault (here the watchdog: a controller slower than stop_after_s)
    reaches the shell through the app's entry point (it was turned into 2, a usage error)."""
    res = cli(
        "wm-deploy", "robot=pointmaze", "controller=random", f"out={tmp_path / 'run'}", "episodes=1",
        "added_delay_s=1", "runtime.safety.hold_after_s=0.1", "runtime.safety.stop_after_s=0.2",
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "STOPPED: no fresh action for" in res.stdout


def test_a_worker_that_dies_between_episodes_ends_the_run_as_a_fault(tmp_path, monkeypatch):
    """The worker killed (the OOM killer) while a simulated robot reset: its reset raised out of the
    run, which exited 2 (a usage error) without a STOPPED line."""
    import multiprocessing

    from robots.sim.pointmaze import PointMazeTask
    from tools.deploy import DeployConfig, deploy

    resets, reset = [], PointMazeTask.reset

    def reset_and_kill_the_worker(self, *args, **kwargs):
        resets.append(1)
        if len(resets) == 2:  # before episode 1: the worker idle
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                child.join(5)
        return reset(self, *args, **kwargs)

    monkeypatch.setattr(PointMazeTask, "reset", reset_and_kill_the_worker)
    out = tmp_path / "run"
    report, status = deploy(
        DeployConfig(robot="pointmaze", controller="random", out=str(out), max_steps=5, episodes=3)
    )
    assert status == 3 and report["episodes"] == 2
    said = report["stopped"][-1]
    assert said.startswith("the inference worker killed by SIGKILL")
    assert said.endswith("; the episode did not start (nothing was sent)")


def recording_deploy(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """wm-deploy of a random controller on pointmaze at 20 Hz recording into tmp_path / "rec.zarr"
    (report in tmp_path / "run"), returned once its first status line says the robot runs."""
    out, store = tmp_path / "run", tmp_path / "rec.zarr"
    proc = subprocess.Popen(
        [str(BIN / "wm-deploy"), "robot=pointmaze", "controller=random", f"out={out}", "control_hz=20",
         "status_every_s=0.2", f"record={store}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if " ticks at " in line:
                return proc, out, store
        raise AssertionError(f"wm-deploy ended before a status line: {proc.stderr.read()}")
    except BaseException:
        proc.kill()
        raise


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_ends_the_run_cleanly_with_the_report_and_the_recording(tmp_path, signum):
    """SIGTERM (a service manager stopping wm-deploy, `docker stop`) or SIGHUP (the ssh session that ran
    it dropped) ended the process where it stood: the robot was not disconnected, no report was written
    and the episode's recording was lost. It stops as Ctrl-C does, and exits 128 + signum."""
    proc, out, store = recording_deploy(tmp_path, "episodes=1", "max_steps=100000")
    try:
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert "STOPPED: stopped by the operator" in stdout, stdout
    report = json.loads((out / "report.json").read_text())
    recorded = DemoStore.open(store)
    assert recorded.n_episodes == 1 and recorded.n_steps == report["ticks"] > 0
    assert recorded.episode_info(0)["stopped"] == "stopped by the operator"


def test_a_reader_of_stdout_that_goes_away_stops_neither_the_run_nor_its_recording(tmp_path):
    """`wm-deploy ... | head`, or a tee that died: the next status line's print raised BrokenPipeError out
    of the control loop mid-episode, the episode's recording was discarded, and it exited 141 in silence."""
    proc, out, store = recording_deploy(tmp_path, "episodes=2", "max_steps=40")
    try:
        proc.stdout.close()  # what read it went away
        stderr = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    report = json.loads((out / "report.json").read_text())
    with DemoStore.open(store) as recorded:
        assert report["episodes"] == recorded.n_episodes == 2 and recorded.n_steps == report["ticks"] == 80


SIGTERM_WHILE_CONNECTING = """
import os, signal, sys
from robots.sim.pointmaze import PointMazeTask
from tools.deploy import DeployConfig, deploy
connect, disconnect = PointMazeTask.connect, PointMazeTask.disconnect
def connect_then_terminated(self):
    connect(self)
    os.kill(os.getpid(), signal.SIGTERM)  # while the run sets up, after the robot connected
def disconnect_said(self):
    print("disconnected", flush=True)
    disconnect(self)
PointMazeTask.connect, PointMazeTask.disconnect = connect_then_terminated, disconnect_said
try:
    deploy(DeployConfig(robot="pointmaze", controller="random", out=sys.argv[1], max_steps=3))
except KeyboardInterrupt as e:
    print("interrupted", e.signum)
"""


def test_sigterm_before_the_episodes_start_still_disconnects_the_robot(tmp_path):
    """SIGTERM's default action was only replaced for the episode loop: one while a takeover device
    connected (the arm already connected) ended the process where it stood, without `disconnect()`."""
    res = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_CONNECTING, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["disconnected", "interrupted", str(int(signal.SIGTERM))], res.stdout


SIGNAL_OR_FAULT_AFTER_THE_EPISODES = """
import os, signal, sys
from robots.base import RobotError
from robots.runtime.worker import ProcessWorker
from robots.sim.pointmaze import PointMazeTask
from tools.deploy import DeployConfig, deploy
out, case = sys.argv[1], sys.argv[2]
kernels, disconnect, reset = ProcessWorker.kernels, PointMazeTask.disconnect, PointMazeTask.reset
resets = []
def kernels_interrupted(self):  # the episodes are over; the worker may still be finishing a chunk
    os.kill(os.getpid(), signal.SIGINT)
    return kernels(self)
def disconnect_failed(self):
    disconnect(self)
    raise RobotError("the arm's bus went away")
def reset_interrupted(self, seed=None):
    resets.append(seed)
    if len(resets) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # while the second episode's robot resets
    return reset(self, seed)
if case == "kernels":
    ProcessWorker.kernels = kernels_interrupted
elif case == "disconnect":
    PointMazeTask.disconnect = disconnect_failed
else:
    PointMazeTask.reset = reset_interrupted
try:
    cfg = DeployConfig(robot="pointmaze", controller="random", out=out, max_steps=3, episodes=3)
    report, status = deploy(cfg)
    print("status", status, "episodes", report["episodes"])
except RobotError as e:
    print("raised", e)
"""


@pytest.mark.parametrize(
    "case, said",
    [
        ("kernels", "status 130 episodes 3"),
        ("disconnect", "raised the arm's bus went away"),
        ("reset", "status 130 episodes 1"),
    ],
)
def test_the_report_is_written_after_a_signal_or_a_failed_cleanup(tmp_path, case, said):
    """One Ctrl-C or SIGTERM after the last episode (the worker finishing a chunk, the robot
    disconnecting) or a disconnect that raised lost the whole report; one while the robot reset began an
    episode that ended at once and counted as a failure."""
    res = subprocess.run(
        [sys.executable, "-c", SIGNAL_OR_FAULT_AFTER_THE_EPISODES, str(tmp_path / "run"), case],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert said in res.stdout, res.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["episodes"] == (1 if case == "reset" else 3) and (tmp_path / "run" / "timing.png").exists()


def test_sync_mode_bounds_the_wait_for_a_chunk_too(tmp_path):
    """runtime.mode=sync computed each chunk on the control thread: a model slower than
    runtime.wait_timeout_s (or hung) was waited for without end, Ctrl-C unread until it returned. The
    worker process computes it in sync mode too, and the wait has its deadline."""
    res = cli(
        "wm-deploy", "robot=pointmaze", "controller=random", f"out={tmp_path / 'run'}", "episodes=1",
        "runtime.mode=sync", "added_delay_s=5", "runtime.wait_timeout_s=0.5", "max_steps=2",
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "STOPPED: no chunk after 0.5 s of waiting (wait_timeout_s)" in res.stdout, res.stdout


def test_bad_values_paths_and_takeover_devices_are_refused_before_anything_starts(tmp_path):
    """Each was refused late (after the worker had loaded and the robot had connected: control_hz=inf,
    seed=-1, a file as out= or record=, in unclear words or a traceback), accepted (added_delay_s=nan,
    whose NaN then made report.json invalid), or, for a keyboard taking over an arm that takes joint
    positions, raised out of the control loop at the operator's first key press."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    base = ["robot=pointmaze", "controller=random", "max_steps=3", f"out={tmp_path / 'a'}"]
    cases = [
        (["control_hz=inf"], "control_hz must be a positive finite number, got inf"),
        (["added_delay_s=nan"], "added_delay_s must be a finite number >= 0, got nan"),
        (["seed=-1"], "seed must be >= 0, got -1"),
        ([f"out={afile}"], f"out={afile}: {afile} is a file; give a folder"),
        ([f"out={afile / 'run'}"], f"out={afile / 'run'}: {afile} is a file"),
        ([f"record={afile}"], f"record={afile}: is a file, not a store"),
        ([f"record={afile / 'rec.zarr'}"], f"record={afile / 'rec.zarr'}: {afile} is a file"),
        ([f"record={tmp_path / 'a'}"], "is also out=: give the store a path of its own"),
        (  # the report went inside the new store: a rerun, and the store's own drop_episodes, refused
            [f"out={tmp_path / 'rec.zarr' / 'run'}", f"record={tmp_path / 'rec.zarr'}"],
            f"out={tmp_path / 'rec.zarr' / 'run'} is inside record={tmp_path / 'rec.zarr'}: give the run a",
        ),
        (["record="], "record= is empty: give a store's path, or leave record out"),  # recorded nothing
        (["inference_threads=99999999999999999999"], "inference_threads must be in 1..4096"),  # traceback
        # checked only as the first episode began: after the worker loaded, the out folder and the record
        # store were made and the robot connected; or a traceback (an overflow)
        (
            [
                "runtime.safety.workspace_low=[0,0,0]",
                "runtime.safety.workspace_high=[1,1,1]",
                f"record={tmp_path / 'a' / 'rec.zarr'}",
            ],
            "runtime.safety: workspace bounds must be two (2,) boxes with low <= high",
        ),  # fmt: skip
        (["runtime.safety.max_step=0.1"], "runtime.safety: max_step caps the change of position targets"),
        (["runtime.latency_window=99999999999999999999"], "latency_window must be at most 1000000"),
        (["runtime.policy_hz=1e-300"], "policy_hz must be in 0.001..10000, got 1e-300"),
        (["control_hz=1e-300"], "control_hz must be in 0.001..10000, got 1e-300"),
        (
            ["robot=so101_follower", "teleop=keyboard"],
            "teleop=keyboard cannot drive so101_follower: a joint action space needs joint targets",
        ),
    ]
    for args, words in cases:
        res = run_app("wm-deploy", *base, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert not (tmp_path / "a").exists()


def test_a_recording_keeps_its_task_options_and_a_store_of_others_is_refused_before_the_robot_connects(
    tmp_path, monkeypatch
):
    """wm-collect records a simulated task's options in every episode and refuses a store of other ones;
    wm-deploy recorded none and mixed them (success_radius changes what `success` means). A store it
    cannot record into was refused only after the robot (a real arm: its bus configured) connected."""
    from robots.sim.pointmaze import PointMazeTask
    from tools.deploy import DeployConfig, deploy
    from wm.data import SchemaError

    connects = []
    connect = PointMazeTask.connect
    monkeypatch.setattr(PointMazeTask, "connect", lambda self: (connects.append(1), connect(self))[1])
    rec = tmp_path / "rec.zarr"
    run = dict(robot="pointmaze", controller="random", max_steps=2, record=str(rec), status_every_s=60.0)
    report, status = deploy(DeployConfig(out=str(tmp_path / "a"), **run))
    assert status == 0 and report["ticks"] == 2 and connects == [1]
    with DemoStore.open(rec) as s:
        assert s.episode_info(0)["task_options"] == {"goal_mode": "any", "success_radius": 0.2}
    other = DeployConfig(out=str(tmp_path / "b"), robot_options={"success_radius": 0.4}, **run)
    with pytest.raises(SchemaError, match="task_options.success_radius 0.2, this session records 0.4"):
        deploy(other)
    assert connects == [1] and not (tmp_path / "b").exists()  # refused before the robot connected


def test_report_json_is_strict_json_and_the_plots_are_written_without_ticks(tmp_path):
    """Settings of inf (`runtime.wait_timeout_s=inf`, a workspace bound of -inf: "no bound") were written
    as Infinity, which JSON parsers refuse; a run whose every episode stopped before its first tick
    warned from matplotlib on stderr (a log scale of no data)."""
    import warnings

    from robots.runtime.report import run_report, write_report
    from robots.runtime.ticks import EpisodeOutcome

    outcomes = [EpisodeOutcome(stopped="no valid first chunk after 3 tries: x", success=False)]
    settings = {"runtime": {"wait_timeout_s": float("inf")}, "safety": {"workspace_low": (-np.inf, 0.0)}}
    report = run_report(outcomes, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(tmp_path, report, outcomes)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    written = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert written["settings"]["runtime"]["wait_timeout_s"] is None
    assert written["settings"]["safety"]["workspace_low"] == [None, 0.0]
    assert written["ticks"] == 0 and written["achieved_hz"] is None and written["success_rate"] == 0.0
    assert written["tick_error_ms"] == {"p50": None, "p99": None, "max": None}
    assert [p.name for p in paths] == ["report.json", "timing.png"] and paths[1].stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "timing.png"]
