"""`wm-collect`: episodes land in the store, resume appends, Ctrl-C and SIGKILL keep finished episodes."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from apps import run_app

from robots.collect import Collector, open_store, recording_schema
from robots.registry import make_expert, make_task
from robots.sim.base import SimConfig
from robots.teleop.base import Command, TeleopState
from wm.data import DemoStore
from wm.data.dataset import WindowDataset
from wm.data.windows import WindowSpec

BIN = Path(sys.executable).parent


def collect(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "wm-collect"), *args], capture_output=True, text=True, timeout=300, **kw)


def test_collect_writes_episodes_the_dataset_reads_and_resumes(tmp_path):
    store = tmp_path / "maze.zarr"
    res = collect("task=pointmaze", "episodes=3", f"store={store}", "image_size=32", "preview=false")
    assert res.returncode == 0, res.stderr
    assert "saved 3 episodes" in res.stdout
    s = DemoStore.open(store)
    assert s.n_episodes == 3 and s.schema.robot and s.schema.fps == 10
    assert all(s.episode_info(i)["success"] for i in range(3))
    assert [s.episode_info(i)["seed"] for i in range(3)] == [0, 1, 2]
    given = s.episode_info(0)["collect"]  # the session's options: what recorded it, to rerun it
    assert given["episodes"] == 3 and given["image_size"] == 32 and given["max_steps"] is None
    assert "store" not in given and given["task"] == "pointmaze"
    spec = WindowSpec.history_horizon(["image", "proprio"], ["action"], n_obs=2, horizon=8)
    ds = WindowDataset(store, spec)
    item = ds[len(ds) // 2]
    assert item["image"].shape == (2, 3, 32, 32) and item["action"].shape == (8, 2)
    s.close()

    res = collect("task=pointmaze", "episodes=2", f"store={store}", "image_size=32", "preview=false")
    assert res.returncode == 0, res.stderr
    s = DemoStore.open(store)
    assert s.n_episodes == 5 and [s.episode_info(i)["seed"] for i in (3, 4)] == [3, 4]
    # A resume with a different image size would mix shapes: refused, store untouched.
    res = collect("task=pointmaze", "episodes=1", f"store={store}", "image_size=48", "preview=false")
    assert (
        res.returncode == 2
        and "its image is (32, 32, 3) uint8, this session's (48, 48, 3) uint8" in res.stderr
    )
    assert DemoStore.open(store).n_episodes == 5


def test_a_deploy_recording_and_a_collected_store_do_not_mix_and_say_why(tmp_path):
    """The refusal named the task options (image size, state_only) whatever differed; a wm-deploy
    recording into a wm-collect store of the same task differs by the runtime's own keys."""
    from robots.runtime.report import RECORD_KEYS
    from robots.runtime.report import recording_schema as deploy_schema
    from wm.data.errors import SchemaError

    task = make_task("pointmaze", SimConfig(image_size=(32, 32)))
    collected = recording_schema(task, "pointmaze")
    open_store(str(tmp_path / "s.zarr"), collected).close()
    with pytest.raises(SchemaError) as info:
        open_store(str(tmp_path / "s.zarr"), deploy_schema(collected))
    assert f"this session records {', '.join(sorted(RECORD_KEYS))}, which it does not hold; " in str(
        info.value
    )
    assert "a wm-deploy recording and a wm-collect store hold different keys" in str(info.value)


def test_same_seed_same_episodes(tmp_path):
    for name in ("a", "b"):
        res = collect("task=arm_push", "episodes=2", f"store={tmp_path / name}.zarr", "state_only=true")
        assert res.returncode == 0, res.stderr
    a, b = DemoStore.open(tmp_path / "a.zarr"), DemoStore.open(tmp_path / "b.zarr")
    for i in range(2):
        ea, eb = a.get_episode(i), b.get_episode(i)
        for key in ("proprio", "action"):
            np.testing.assert_array_equal(ea[key], eb[key])


@pytest.mark.parametrize("name", ["pusht", "arm_push"])
def test_state_only_observations_carry_the_object_state(name, tmp_path):
    """Without a camera the pusher's state alone was the observation: the block (and arm pushing's
    target, new every episode) were nowhere, so a fast-mode store could not be learnt from."""
    task = make_task(name, SimConfig(state_only=True, max_steps=5))
    store = open_store(str(tmp_path / "s.zarr"), recording_schema(task, name))
    assert store.schema.keys["object"].kind == "lowdim"
    with task:
        Collector(task, store, seed=1).record_expert_episode(make_expert(name), "expert")
        obs, goal = task.get_observation(), task.goal_observation()
        pose = task.block_pose() if name == "pusht" else task.block_pose
        np.testing.assert_allclose(obs["object"][:3], pose, rtol=1e-6)
        if name == "arm_push":
            np.testing.assert_allclose(obs["object"][3:], task.target, rtol=1e-6)
            np.testing.assert_allclose(goal["object"][:2], task.target, rtol=1e-6)  # the block there
    recorded = store.get_episode(0)["object"]
    assert recorded.shape == (5, len(obs["object"])) and np.isfinite(recorded).all()


def test_a_simulator_run_faster_than_real_time_is_stamped_on_the_control_grid(tmp_path):
    """Scripted episodes run as fast as the simulator goes; their timestamps were the computer's clock
    (1-10 ms apart at 10 Hz), which a LeRobot export and anything reading time took as real."""
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=6))
    store = open_store(str(tmp_path / "s.zarr"), recording_schema(task, "pointmaze"))
    with task:
        Collector(task, store, seed=0).record_expert_episode(make_expert("pointmaze"), "expert", replays=1)
    for e in range(2):  # the expert's episode and its replay
        ts = store.get_episode(e)["timestamp"].ravel()
        np.testing.assert_allclose(np.diff(ts), 1.0 / task.control_hz, rtol=0, atol=1e-9)


def test_a_simulator_teleoperated_in_real_time_is_stamped_at_its_ticks(tmp_path):
    """Stamped with the time its observation was read (right after the previous tick's send), the first
    two steps were ~0 s apart and every later one a period early."""
    from robots.teleop.base import Command, TeleopState

    class Operator:  # START at poll 2, SAVE at poll 6, +x held
        name = "operator"

        def __init__(self) -> None:
            self.polls = 0

        def poll(self) -> TeleopState:
            self.polls += 1
            commands = {2: [Command.START], 6: [Command.SAVE]}.get(self.polls, [])
            return TeleopState(motion=np.array([1.0, 0, 0, 0, 0, 0]), commands=commands)

    task = make_task("pointmaze", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "t.zarr"), recording_schema(task, "pointmaze"))
    with task:
        mapper = lambda state, obs: np.clip(state.motion[:2], -1, 1)  # noqa: E731
        Collector(task, store, seed=0, realtime=True).record_teleop(Operator(), mapper, episodes=1)
    ts = store.get_episode(0)["timestamp"].ravel()
    np.testing.assert_allclose(np.diff(ts), 1.0 / task.control_hz, rtol=0, atol=0.02)


def test_noisy_replays(tmp_path):
    task = make_task("pointmaze", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "r.zarr"), recording_schema(task, "pointmaze"))
    collector = Collector(task, store, seed=7, noise_std=0.1)
    with task:
        collector.record_expert_episode(make_expert("pointmaze"), "expert", replays=2, replay_noise=0.2)
    assert store.n_episodes == 3
    infos = [store.episode_info(i) for i in range(3)]
    assert [i["source"] for i in infos] == ["expert", "expert_replay", "expert_replay"]
    assert {i["seed"] for i in infos} == {7}
    e0, e1 = store.get_episode(0), store.get_episode(1)
    np.testing.assert_array_equal(e0["proprio"][0], e1["proprio"][0])  # same start state
    assert not np.array_equal(e0["action"][: len(e1["action"])], e1["action"][: len(e0["action"])])


def test_replay_noise_is_added_to_the_recorded_actions(tmp_path):
    """Replays added their noise to the expert's pre-clip action: where that lay past the box, the noise
    was clipped away and the replay repeated the recorded action exactly."""
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=15))
    store = open_store(str(tmp_path / "r.zarr"), recording_schema(task, "pointmaze"))
    with task:
        Collector(task, store, seed=3, noise_std=2.0).record_expert_episode(
            make_expert("pointmaze"), "expert", replays=1, replay_noise=0.05
        )
    expert, replay = store.get_episode(0)["action"], store.get_episode(1)["action"]
    n = min(len(expert), len(replay))
    at_bound = np.abs(expert[:n]) == 1.0  # clipped: the noise before clipping was large
    assert at_bound.sum() >= 3
    assert (replay[:n][at_bound] != expert[:n][at_bound]).mean() > 0.3  # about half go inwards


def test_appending_with_another_seed_never_records_a_start_state_again(tmp_path):
    """The session's episode k starts at seed + the store's count + k: another seed= re-recorded earlier
    episodes bit for bit. Refused before anything is recorded, saying which seed= is free."""
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=3))
    path = str(tmp_path / "s.zarr")
    with open_store(path, recording_schema(task, "pointmaze")) as store, task:
        collector = Collector(task, store, seed=3)
        collector.check_seeds(1, 0)
        collector.record_expert_episode(make_expert("pointmaze"), "expert")  # seed 3
    with open_store(path, recording_schema(task, "pointmaze")) as store:
        Collector(task, store, seed=4).check_seeds(5, 0)  # seeds 5.. (the same seed= goes on)
        Collector(task, store, seed=0).check_seeds(2, 0)  # seeds 1, 2
        with pytest.raises(ValueError, match=r"episode 0 was recorded from seed 3, and seed=1 would record "):
            Collector(task, store, seed=1).check_seeds(3, 0)  # seeds 2, 3, 4
        with pytest.raises(ValueError, match=r"give seed=3 or more$"):
            Collector(task, store, seed=0).check_seeds(2, 1)  # seeds 1, 3 (1 + replays each)
        Collector(task, store, seed=0).check_seeds(1, 1)  # seed 1 alone (its replay shares it)
        Collector(task, store, seed=-1).check_seeds(3, 1)  # seeds 0, 2, 4 step over 3
        # "record until I stop it": the session's seeds were gathered in a set first (55 GiB, then dead)
        Collector(task, store, seed=4).check_seeds(10**12, 0)
        with pytest.raises(ValueError, match=r"seed=2 would record it again"):
            Collector(task, store, seed=2).check_seeds(10**12, 0)
        assert store.n_episodes == 1


class _Operator:
    """A teleop device replaying one scripted state per poll (then QUIT)."""

    name = "operator"

    def __init__(self, commands: dict[int, Command], motions: dict[int, np.ndarray] | None = None) -> None:
        self.commands, self.motions, self.polls = commands, motions or {}, 0

    def poll(self) -> TeleopState:
        self.polls += 1
        command = self.commands.get(self.polls, Command.QUIT if self.polls > max(self.commands) else None)
        motion = self.motions.get(self.polls, np.array([1.0, 0, 0, 0, 0, 0]))
        return TeleopState(motion=motion, commands=[command] if command else [])


def test_teleop_session_on_a_simulated_task(tmp_path):
    """START / DISCARD / SAVE from the operator; simulated episodes keep their seed and success."""
    from robots.teleop.mapping import teleop_mapper
    from tools.collect import CollectConfig

    task = make_task("pusht", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "t.zarr"), recording_schema(task, "pusht"))
    mapper = teleop_mapper(task, CollectConfig(task="pusht", store="t.zarr", teleop="keyboard").gains)
    operator = _Operator({2: Command.START, 4: Command.DISCARD, 5: Command.START, 8: Command.SAVE})
    with task:
        Collector(task, store, seed=3).record_teleop(operator, mapper, episodes=2)
    assert store.n_episodes == 1 and operator.polls == 9  # quit after one saved episode
    info = store.episode_info(0)
    assert info == {"seed": 3, "source": "operator", "success": False, "length": 4}
    ep = store.get_episode(0)
    # forward held: each target is ahead of the agent, up PushT's image (its y grows downwards)
    assert np.all(ep["action"][:, 1] < ep["proprio"][:, 1])


def test_teleop_commands_pass_the_safety_layer_on_a_simulated_task(tmp_path):
    """A NaN from the device is never sent (the last command is held, and recorded as sent), and a
    position target (PushT's) moves at most a tenth of its range per tick."""
    from robots.teleop.mapping import teleop_mapper
    from tools.collect import CollectConfig

    task = make_task("pusht", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "t.zarr"), recording_schema(task, "pusht"))
    gains = {"translation_gain": 200.0}  # px per tick: far more than the cap
    mapper = teleop_mapper(
        task, CollectConfig(task="pusht", store="t.zarr", teleop="keyboard", gains=gains).gains
    )
    right, left, nan = -np.eye(6)[1], np.eye(6)[1], np.full(6, np.nan)  # the device's y: PushT's image x
    motions = {1: right, 2: left, 3: nan, 4: right, 5: left, 6: left}
    operator = _Operator({1: Command.START, 6: Command.SAVE}, motions)
    with task:
        Collector(task, store, seed=3).record_teleop(operator, mapper, episodes=1)
    action = store.get_episode(0)["action"]  # (6, 2) pusher targets, px
    assert action.shape == (6, 2) and np.isfinite(action).all()
    np.testing.assert_array_equal(action[2], action[1])  # the NaN tick held the last command
    steps = np.abs(np.diff(action[:, 0]))
    cap = 0.1 * 512
    assert steps.max() == pytest.approx(cap, abs=1e-3)  # the reversals were capped, not skipped


def test_collect_with_a_spacemouse_takes_start_from_the_keyboard(tmp_path, monkeypatch, capsys):
    """`wm-collect teleop=spacemouse`: a keyboard is added for the episode commands, as for a leader
    arm; START from it, SAVE from the SpaceMouse's right button."""
    import tools.collect
    from robots.teleop.fakes import FakeClock, FakeHid, FakeKeyListener

    clock = FakeClock()
    keys = FakeKeyListener([(2, "b", True), (2, "b", False)], clock)
    push = bytes([1]) + struct.pack("<6h", 0, -350, 0, 0, 0, 0)  # the cap pushed away: +x

    class Hand(FakeHid):
        """The operator between polls: keys pressed on the keyboard, the right button at poll 5."""

        polls = 0

        def device(self):
            dev = super().device()
            read = dev.read

            def poll_read(n: int, timeout_ms: int = 0) -> list[int]:
                report = read(n)
                if report:
                    return report
                self.polls += 1  # the poll's reports are read: the keyboard is polled next
                if self.polls > 50:
                    raise KeyboardInterrupt  # an operator giving up on a session that cannot start
                keys.replay_until(self.polls)
                self.reports += [push] + ([bytes([3, 2, 0]), bytes([3, 0, 0])] if self.polls == 4 else [])
                return []

            dev.read = poll_read
            return dev

    hid = Hand(
        [{"vendor_id": 0x256F, "product_id": 0xC635, "path": b"/dev/hidraw7", "usage_page": 1, "usage": 8}]
    )
    monkeypatch.setattr(tools.collect, "_stop_on_signals", lambda: None)
    cfg = tools.collect.CollectConfig(
        task="pointmaze", store=str(tmp_path / "s.zarr"), teleop="spacemouse", episodes=1, preview="false",
        state_only=True, device_options={"hid_module": hid},
        command_options={"backend": "pynput", "listener_factory": keys.factory, "clock": clock},
    )  # fmt: skip
    assert tools.collect.collect(cfg) == 0
    assert capsys.readouterr().out.startswith("saved 1 episodes")
    store = DemoStore.open(tmp_path / "s.zarr")
    options = {"goal_mode": "any", "success_radius": 0.2}  # pointmaze's own, recorded to refuse others
    info = store.episode_info(0)
    given = info.pop("collect")
    assert info == {
        "seed": 0, "source": "spacemouse", "success": False, "length": 4, "task_options": options
    }  # fmt: skip
    assert given["teleop"] == "spacemouse" and given["device_options"]["hid_module"].startswith("<")
    assert np.all(store.get_episode(0)["action"][:, 1] > 0)  # pushed forward: up the top-down view, +y
    assert not keys.running  # the keyboard was disconnected with the SpaceMouse


def _start_realtime(store: Path) -> subprocess.Popen:
    args = [
        "task=pointmaze",
        "episodes=50",
        f"store={store}",
        "image_size=32",
        "realtime=true",
        "preview=false",
    ]
    return subprocess.Popen(
        [str(BIN / "wm-collect"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_episodes(store: Path, n: int, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (store / "meta").exists():
            with DemoStore.open(store) as s:
                if s.n_episodes >= n:
                    return
        time.sleep(0.2)
    raise AssertionError(f"{store}: fewer than {n} episodes after {timeout} s")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 0), (signal.SIGTERM, 143)])
def test_ctrl_c_keeps_finished_episodes(tmp_path, signum, status):
    """Ctrl-C ends a session (exit status 0); SIGTERM (a job's time limit) exited 0 as well, a session cut
    short looked finished to the job script."""
    store = tmp_path / "int.zarr"
    proc = _start_realtime(store)
    _wait_for_episodes(store, 1)
    time.sleep(0.5)  # well inside the next episode (10 Hz, 20+ steps)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "interrupted: saved" in out
    s = DemoStore.open(store)
    assert s.n_episodes >= 1 and s.array("image").shape[0] == s.n_steps  # the partial episode was dropped
    # the summary counts it as discarded, and counts the saved episodes' steps only (its were counted)
    assert f"saved {s.n_episodes} episodes (1 discarded, " in out and f"{s.n_steps} steps)" in out


SIGTERM_BEFORE_THE_SESSION = """
import os, signal, sys
import tools.collect
from robots.sim.pointmaze import PointMazeTask
opened, disconnect = tools.collect.open_store, PointMazeTask.disconnect
def open_then_terminated(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # the robot connected, the session not begun
    return opened(*args)
def disconnect_said(self):
    print("disconnected", flush=True)
    disconnect(self)
tools.collect.open_store, PointMazeTask.disconnect = open_then_terminated, disconnect_said
sys.argv = ["wm-collect", "task=pointmaze", "episodes=1", "state_only=true", "store=" + sys.argv[1]]
tools.collect.main()
"""


CTRL_C_RIGHT_AFTER_A_COMMIT = """
import os, signal, sys
from wm.data.store import DemoStore
commit = DemoStore._commit
def commit_then_ctrl_c(self, *args):
    index = commit(self, *args)
    if index == 1:
        os.kill(os.getpid(), signal.SIGINT)  # delivered once the commit's own hold ends
    return index
DemoStore._commit = commit_then_ctrl_c
import tools.collect
sys.argv = ["wm-collect", "task=pointmaze", "episodes=4", "state_only=true", "store=" + sys.argv[1]]
tools.collect.main()
"""


def test_an_episode_committed_as_ctrl_c_comes_is_counted_saved(tmp_path):
    """Ctrl-C right after an episode's commit, before its count: the summary said "saved 1 episodes
    (1 discarded, success 200%) ... (now 1 episodes)" over a store of 2."""
    res = subprocess.run(
        [sys.executable, "-c", CTRL_C_RIGHT_AFTER_A_COMMIT, str(tmp_path / "s.zarr")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with DemoStore.open(tmp_path / "s.zarr") as s:
        assert s.n_episodes == 2
    said = res.stdout
    assert "interrupted: saved 2 episodes (0 discarded, success " in said and "(now 2 episodes)" in said


def test_sigterm_before_the_session_disconnects_and_exits_143(tmp_path):
    """SIGTERM outside the session was an interrupt without its signal: exit status 130, as for Ctrl-C
    (wm-deploy and wm-train exit 143)."""
    res = subprocess.run(
        [sys.executable, "-c", SIGTERM_BEFORE_THE_SESSION, str(tmp_path / "s.zarr")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert res.stdout.split() == ["disconnected"] and res.stderr.strip().endswith("interrupted")


def test_sigkill_then_resume(tmp_path):
    store = tmp_path / "kill.zarr"
    proc = _start_realtime(store)
    _wait_for_episodes(store, 1)
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with DemoStore.open(store) as s:
        survived = s.n_episodes
        firsts = [s.get_episode(i)["proprio"].copy() for i in range(survived)]
    res = collect("task=pointmaze", "episodes=1", f"store={store}", "image_size=32", "preview=false")
    assert res.returncode == 0, res.stderr
    s = DemoStore.open(store)
    assert s.n_episodes == survived + 1 and s.array("image").shape[0] == s.n_steps
    for i, p in enumerate(firsts):
        np.testing.assert_array_equal(s.get_episode(i)["proprio"], p)
    assert s.episode_info(survived)["seed"] == survived


def test_bad_names_list_valid_ones(tmp_path):
    res = run_app("wm-collect", "task=maze", "episodes=1", f"store={tmp_path / 'x.zarr'}")
    assert res.returncode == 2 and "valid: arm_push, pointmaze, pusht" in res.stderr
    res = run_app(
        "wm-collect", "task=pointmaze", "teleop=joystick", "episodes=1", f"store={tmp_path / 'x.zarr'}"
    )
    assert res.returncode == 2 and "unknown teleop device 'joystick'; valid:" in res.stderr
    res = run_app(
        "wm-collect", "robot=so101_folower", "teleop=leader_arm", "task=wave", f"store={tmp_path / 'x.zarr'}"
    )
    assert res.returncode == 2 and res.stderr.endswith("; did you mean so101_follower?\n")
    res = run_app(
        "wm-collect",
        "task=pusht",
        "teleop=keyboard",
        "noise_std=0.3",
        "replays=2",
        f"store={tmp_path / 'x.zarr'}",
    )
    assert res.returncode == 2 and (  # they were accepted and the clean operator's actions recorded
        "noise_std, replays: noise and replays apply to scripted experts; teleop=keyboard records"
        in res.stderr
    )
    assert not (tmp_path / "x.zarr").exists()
    # a human's episode ran by in the time of a key press (200 steps in 0.13 s), saved as a demonstration
    res = run_app(
        "wm-collect", "task=pointmaze", "teleop=keyboard", "realtime=false", f"store={tmp_path / 'x.zarr'}"
    )
    assert res.returncode == 2 and res.stderr == (
        "error: realtime=false: teleop=keyboard records a human at the task's control rate; leave realtime "
        "out (it is for scripted experts)\n"
    )
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize(
    "option",
    ["seed=-1", "noise_std=nan", "noise_std=inf", "replay_noise_std=nan", "replay_noise_std=-0.1"],
)
def test_bad_numbers_are_refused_in_one_line_before_the_store_is_made(tmp_path, option):
    """They passed the checks: the store was made, then the first episode failed (a NaN action; a
    negative seed with numpy's words) or the replays did, leaving a store behind."""
    store = tmp_path / "x.zarr"
    res = run_app("wm-collect", "task=pointmaze", "state_only=true", "replays=1", f"store={store}", option)
    name = option.split("=")[0]
    assert (
        res.returncode == 2
        and res.stderr.startswith(f"error: {name} must be ")
        and res.stderr.count("\n") == 1
    )
    assert not store.exists()


def test_a_start_that_already_succeeds_is_an_episode_of_the_experts_first_action(tmp_path, monkeypatch):
    """With a start state that already succeeds (a success radius larger than the start's distance
    did, before such radii were refused), the expert recorded no step and the session ended with "an
    episode needs at least one step"."""
    from robots.sim.arm_push import ArmPushTask

    monkeypatch.setattr(ArmPushTask, "_success", lambda self: True)
    task = make_task("arm_push", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "s.zarr"), recording_schema(task, "arm_push"))
    with task:
        task.reset(0)
        assert task.is_success()  # the case: nothing is left to do at the start
        collector = Collector(task, store, seed=0)
        for _ in range(2):
            collector.record_expert_episode(make_expert("arm_push"), "expert", replays=1)
    assert store.n_episodes == 4 and list(store.episode_lengths()) == [1, 1, 1, 1]
    assert all(store.episode_info(i)["success"] for i in range(4))
    assert [store.episode_info(i)["seed"] for i in range(4)] == [0, 0, 2, 2]  # seed + k still


def test_a_store_is_not_appended_to_for_another_task_or_with_other_task_options(tmp_path, monkeypatch):
    """Only keys, units, rate and robot were compared: demos of another task, or with the target not
    drawn / goals of another mode, were appended silently and nothing recorded which was which."""
    import tools.collect
    from wm.data.schema import SchemaError

    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=3))
    path = str(tmp_path / "s.zarr")
    open_store(path, recording_schema(task, "pick_cube")).close()
    with pytest.raises(SchemaError, match="recorded with task 'pick_cube', this session records 'stack'"):
        open_store(path, recording_schema(task, "stack"))

    # a store whose episodes were recorded without options (before they were) is still appended to
    schema = recording_schema(task, "pick_cube")
    with open_store(path, schema) as store, task:
        Collector(task, store).record_expert_episode(make_expert("pointmaze"), "expert")
    with open_store(path, schema, {"goal_mode": "other_arm"}) as store, task:
        collector = Collector(task, store, task_options={"goal_mode": "other_arm"})
        collector.record_expert_episode(make_expert("pointmaze"), "expert")
    assert DemoStore.open(path).episode_info(1)["task_options"] == {"goal_mode": "other_arm"}
    with pytest.raises(SchemaError, match="recorded with task_options.goal_mode 'other_arm', this session"):
        open_store(path, schema, {"goal_mode": "any"})
    open_store(path, schema, {"goal_mode": "other_arm", "added_later": 1}).close()  # one side lacks it

    # wm-collect records the task's options with its defaults filled in, and refuses others in one line
    monkeypatch.setattr(tools.collect, "_stop_on_signals", lambda: None)
    store = tmp_path / "c.zarr"
    args = ["task=pointmaze", "state_only=true", "episodes=1", "preview=false", f"store={store}"]
    cfg = tools.collect.CollectConfig(task="pointmaze", store=str(store), episodes=1, state_only=True,
                                      preview="false", max_steps=3)  # fmt: skip
    assert tools.collect.collect(cfg) == 0
    assert DemoStore.open(store).episode_info(0)["task_options"] == {
        "goal_mode": "any",
        "success_radius": 0.2,
    }
    res = run_app("wm-collect", *args, "task=pusht")  # the task said, not its keys ("records object")
    assert res.returncode == 2 and "recorded with task 'pointmaze', this session records 'pusht'" in (
        res.stderr
    )
    res = run_app("wm-collect", *args, "+task_options.goal_mode=other_arm")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "recorded with task_options.goal_mode 'any', this session records 'other_arm'" in res.stderr
    assert run_app("wm-collect", *args, "+task_options.success_radius=0.2", "max_steps=3").returncode == 0
    assert DemoStore.open(store).n_episodes == 2


def test_replays_record_loop_dt_as_the_expert_does(tmp_path):
    """A replay's first step recorded 1/hz (the expert's: 0, no step before it) and every later step the
    nominal period, not the loop clock's time between steps."""
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=5))
    store = open_store(str(tmp_path / "s.zarr"), recording_schema(task, "pointmaze"))
    with task:
        Collector(task, store, seed=0).record_expert_episode(make_expert("pointmaze"), "expert", replays=1)
    expert, replay = (store.get_episode(i)["loop_dt"] for i in range(2))
    assert expert[0] == replay[0] == 0.0
    np.testing.assert_array_equal(replay, expert[: len(replay)])


def _keyboard_session(tmp_path, keys: list[tuple[float, str]]) -> tuple[Collector, DemoStore]:
    """A pynput keyboard (FakeKeyListener) on pointmaze: tick k sees the keys pressed up to time k; w is
    held from tick 1 to 5. `keys`: (time, key name) pressed and released 10 ms later."""
    from robots.teleop.fakes import FakeClock, FakeKeyListener
    from robots.teleop.keyboard import KeyboardDevice
    from robots.teleop.mapping import teleop_mapper

    class Key:  # pynput's KeyCode / Key attributes
        def __init__(self, name: str) -> None:
            self.char, self.name = (name, None) if len(name) == 1 else (None, name)

    w = Key("w")
    events = [(1.0, w, True), (5.0, w, False)]
    events += [(t + dt, Key(k), dt == 0) for t, k in keys for dt in (0, 0.01)]
    clock = FakeClock()
    listener = FakeKeyListener(events, clock)
    keyboard = KeyboardDevice(backend="pynput", listener_factory=listener.factory, clock=clock)

    class Ticked:
        name, polls = "keyboard", 0

        def poll(self) -> TeleopState:
            self.polls += 1
            assert self.polls < 40, "the session did not end"
            listener.replay_until(float(self.polls))
            return keyboard.poll()

    keyboard.connect()
    task = make_task("pointmaze", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "s.zarr"), recording_schema(task, "pointmaze"))
    collector = Collector(task, store, seed=0)
    with task:
        collector.record_teleop(Ticked(), teleop_mapper(task, {}), episodes=5)
    return collector, store


@pytest.mark.parametrize("then", ["q", "backspace"])
def test_keys_pressed_within_one_tick_act_in_the_order_pressed(tmp_path, then):
    """Enter then q (or Backspace) typed within one control tick: the commands were applied as a set,
    QUIT (DISCARD) before SAVE, and the episode the operator had saved was lost."""
    keys = [(1.0, "b"), (5.5, "enter"), (5.53, then)] + ([(7.5, "q")] if then != "q" else [])
    collector, store = _keyboard_session(tmp_path, keys)
    assert store.n_episodes == 1 and store.episode_lengths()[0] == 6  # ticks 1..6, as Enter alone
    assert (collector.stats.saved, collector.stats.discarded) == (1, 0)


def test_rerecord_twice_in_a_row_discards_one_episode(tmp_path):
    """x pressed twice: the second dropped the empty episode the first had begun, counted as a second
    discard."""
    keys = [(1.0, "b"), (2.5, "x"), (2.53, "x"), (4.5, "enter"), (6.5, "q")]
    collector, store = _keyboard_session(tmp_path, keys)
    assert store.n_episodes == 1 and (collector.stats.saved, collector.stats.discarded) == (1, 1)


def test_an_episode_dropped_by_quit_is_counted(tmp_path):
    """q while recording drops the episode; the summary counted it neither saved nor discarded."""
    collector, store = _keyboard_session(tmp_path, [(1.0, "b"), (3.5, "q")])
    assert store.n_episodes == 0 and (collector.stats.saved, collector.stats.discarded) == (0, 1)
    collector, store = _keyboard_session(
        tmp_path / "b", [(1.0, "b"), (2.5, "enter"), (2.53, "b"), (4.5, "q")]
    )
    assert store.n_episodes == 1 and (collector.stats.saved, collector.stats.discarded) == (1, 1)


# ---------------------------------------------------------------------- teleop devices: failure paths
SPACEMOUSE_INFO = {
    "vendor_id": 0x256F,
    "product_id": 0xC635,
    "path": b"/dev/hidraw7",
    "usage_page": 1,
    "usage": 8,
}


def test_a_spacemouse_that_goes_silent_while_pushed_stops_instead_of_repeating_the_push():
    """A unit streams motion reports while its cap is off centre; a wireless one that dropped out while
    pushed (its receiver still plugged in) sent nothing more, and its last push was repeated for ever."""
    from robots.registry import device_class
    from robots.teleop.fakes import FakeClock, FakeHid

    hid, clock = FakeHid([SPACEMOUSE_INFO]), FakeClock(100.0)
    dev = device_class("spacemouse")(hid_module=hid, deadzone=0.0, clock=clock, stale_s=0.25)
    dev.connect()
    push = bytes([1]) + struct.pack("<6h", 0, -350, 0, 0, 0, 0)  # the cap pushed away: +x
    try:
        for t in (100.0, 100.1, 100.2):  # reports streaming in: the push holds
            hid.reports.append(push)
            clock.t = t
            assert dev.poll().motion[0] == 1.0
        clock.t = 100.4  # no report for 0.2 s: still within stale_s
        assert dev.poll().motion[0] == 1.0
        clock.t = 100.5  # 0.3 s of silence while pushed: the unit is gone
        np.testing.assert_array_equal(dev.poll().motion, np.zeros(6))
        hid.reports.append(push[:4])  # a report too short for its id is no report
        clock.t = 100.6
        np.testing.assert_array_equal(dev.poll().motion, np.zeros(6))
        hid.reports.append(push)  # the unit is back, still pushed
        clock.t = 100.7
        assert dev.poll().motion[0] == 1.0
    finally:
        dev.disconnect()


def test_a_keyboard_whose_terminal_cannot_be_restored_is_no_longer_connected():
    """tcsetattr failing (the terminal already gone) left the keyboard marked connected: a later connect()
    returned early and its polls read a dead file descriptor."""
    import os
    import pty
    import termios

    from robots.registry import device_class
    from robots.teleop.fakes import FakeClock

    master, slave = pty.openpty()
    dev = device_class("keyboard")(backend="terminal", fd=slave, clock=FakeClock(0.0))
    dev.connect()
    os.close(slave)  # the terminal goes away before the restore
    try:
        with pytest.raises(termios.error):
            dev.disconnect()
        with pytest.raises(RuntimeError, match="not connected"):
            dev.poll()
        dev.disconnect()  # nothing left to restore: no second error
    finally:
        os.close(master)


def test_a_cut_escape_sequence_does_not_outlive_a_keyboard_session():
    """A lone ESC read just before disconnect() was kept, and read at the next session's first poll as the Esc
    key: QUIT."""
    import os
    import pty

    from robots.registry import device_class
    from robots.teleop.fakes import FakeClock

    master, slave = pty.openpty()
    dev = device_class("keyboard")(backend="terminal", fd=slave, clock=FakeClock(0.0))
    try:
        dev.connect()
        os.write(master, b"\x1b")  # an arrow's ESC, cut by the disconnect
        assert dev.poll().commands == []
        dev.disconnect()
        dev.connect()
        os.write(master, b"w")
        state = dev.poll()
        assert state.commands == [] and state.motion[0] == 1.0
    finally:
        dev.disconnect()
        os.close(master)
        os.close(slave)


def test_ctrl_c_right_after_an_episode_is_saved_does_not_count_it_as_discarded(tmp_path):
    """Ctrl-C in the progress callback, after the episode was committed, left the committed writer as "the
    episode being recorded": the session's end counted it discarded too ("saved 1 (1 discarded)")."""
    task = make_task("pointmaze", SimConfig(state_only=True))
    store = open_store(str(tmp_path / "t.zarr"), recording_schema(task, "pointmaze"))

    def interrupted(stats) -> None:
        raise KeyboardInterrupt

    collector = Collector(task, store, seed=0, on_episode=interrupted)
    with task, pytest.raises(KeyboardInterrupt):
        collector.record_teleop(_Operator({2: Command.START, 5: Command.SAVE}), lambda s, o: s.motion[:2], 2)
    assert store.n_episodes == 1 and store.episode_info(0)["length"] == 4
    assert collector.stats.saved == 1 and collector.stats.discarded == 0
