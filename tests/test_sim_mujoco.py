"""The pure-MuJoCo tasks (pointmaze, arm_push) with the real simulator: features, shapes,
determinism, sim-state round trips, goal observations, action validation, and their experts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robots.base import ActionError, Robot
from robots.registry import make_expert, make_task
from robots.sim.arm_push import ArmPushTask
from robots.sim.base import SimConfig, SimTask
from robots.sim.pointmaze import ARMS, PointMazeTask, arm_of, cell_of, shortest_path

SIZE = (24, 32)
# (task name, options): every configuration the tests cover
CONFIGS = [
    ("pointmaze", {}),
    ("pointmaze", {"goal_mode": "other_arm"}),
    ("arm_push", {"action_mode": "ee_delta"}),
    ("arm_push", {"action_mode": "joint_delta"}),
]
IDS = [f"{name}-{'-'.join(map(str, opts.values())) or 'default'}" for name, opts in CONFIGS]


def build(name: str, options: dict, state_only: bool = False, **kw) -> SimTask:
    return make_task(name, SimConfig(image_size=SIZE, state_only=state_only, options=options, **kw))


def run_random(task: SimTask, seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    """Reset with `seed`, send `steps` seeded random actions; all observations without timestamps."""
    rng = np.random.default_rng(100 + seed)
    feat = task.action_feature
    obs = [task.reset(seed)]
    for _ in range(steps):
        task.send_action(rng.uniform(feat.low, feat.high))
        obs.append(task.get_observation())
    return [{k: v for k, v in o.items() if k != "timestamp"} for o in obs]


def assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for oa, ob in zip(a, b, strict=True):
        assert oa.keys() == ob.keys()
        for k in oa:
            np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_features_before_connect_and_shapes(name, options):
    task = build(name, options)
    assert not task.is_connected
    assert isinstance(task, Robot)
    feats = task.observation_features
    assert set(feats) == {"image", "proprio"}
    assert feats["image"].shape == (*SIZE, 3) and feats["image"].dtype == "uint8"
    act = task.action_feature
    assert act.low is not None and act.high is not None and len(act.low) == act.shape[0]
    assert task.control_hz == 10.0
    task.schema(task=name)  # a valid store schema
    with task:
        obs = task.reset(0)
        for _ in range(3):
            task.send_action(np.asarray(act.high) * 0.5)
            obs = task.get_observation()
        assert set(obs) == set(feats) | {"timestamp"}
        for k, f in feats.items():
            assert obs[k].shape == f.shape and obs[k].dtype == np.dtype(f.dtype), k
            assert np.all(np.isfinite(obs[k]))
        assert obs["image"].std() > 5  # something is drawn
    assert not task.is_connected


@pytest.mark.parametrize(("name", "options"), CONFIGS[::2], ids=IDS[::2])
def test_state_only_has_no_image(name, options):
    task = build(name, options, state_only=True)
    keys = {"proprio", "object"} if name == "arm_push" else {"proprio"}  # the block and target, no camera
    assert set(task.observation_features) == keys
    with task:
        obs = task.reset(1)
        assert set(obs) == keys | {"timestamp"}
        assert task._renderer is None


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_same_seed_same_episode(name, options):
    with build(name, options) as a, build(name, options) as b:
        first = run_random(a, seed=3, steps=8)
        assert_same(first, run_random(b, seed=3, steps=8))
        assert_same(first, run_random(a, seed=3, steps=8))  # again on the same instance
        other = run_random(a, seed=4, steps=8)
        assert not np.array_equal(first[0]["proprio"], other[0]["proprio"])


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_sim_state_round_trip(name, options):
    with build(name, options) as task:
        run_random(task, seed=5, steps=4)
        state = task.get_sim_state()
        feat = task.action_feature
        actions = np.random.default_rng(0).uniform(feat.low, feat.high, size=(6, feat.shape[0]))

        def roll() -> list[dict[str, np.ndarray]]:
            out = []
            for a in actions:
                task.send_action(a)
                out.append({k: v for k, v in task.get_observation().items() if k != "timestamp"})
            return out

        first = roll()
        run_random(task, seed=9, steps=3)  # disturb everything, goal included
        task.set_sim_state(state)
        assert task.steps == 4
        assert_same(first, roll())


def test_a_task_connected_and_not_yet_reset_is_in_a_valid_start():
    """pointmaze sat at (0, 0), inside a wall, on its goal (success before any action); arm_push drew
    its target marker away from the target it counts success against."""
    from robots.sim.pointmaze import is_free

    with make_task("pointmaze", SimConfig(state_only=True)) as maze:
        assert is_free(cell_of(maze.get_observation()["proprio"][:2])) and not maze.is_success()
        assert not maze.done
    with make_task("arm_push", SimConfig(state_only=True)) as arm:
        np.testing.assert_allclose(arm._data.mocap_pos[0, :2], arm.target)
        assert not arm.is_success()


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_goal_observation_leaves_state_unchanged(name, options):
    with build(name, options) as task:
        run_random(task, seed=6, steps=3)
        before = {k: v for k, v in task.get_observation().items() if k != "timestamp"}
        state = task.get_sim_state()
        goal = task.goal_observation()
        assert set(goal) == set(task.observation_features)
        for k, f in task.observation_features.items():
            assert goal[k].shape == f.shape and goal[k].dtype == np.dtype(f.dtype)
        assert not np.array_equal(goal["image"], before["image"])
        after = {k: v for k, v in task.get_observation().items() if k != "timestamp"}
        assert_same([before], [after])
        np.testing.assert_array_equal(task.get_sim_state()["physics"], state["physics"])


def test_goal_observation_shows_the_goal():
    with build("pointmaze", {}) as task:
        task.reset(2)
        np.testing.assert_allclose(task.goal_observation()["proprio"][:2], task.goal, atol=1e-6)
    with build("arm_push", {}) as task:
        task.reset(2)
        saved = task.get_sim_state()
        task.goal_observation()
        task._place(task._home, task.target, task.target_yaw)
        assert task.is_success()
        task.set_sim_state(saved)
        assert not task.is_success()


@pytest.mark.parametrize(("name", "options"), CONFIGS[::2], ids=IDS[::2])
def test_send_action_validates_and_clips(name, options):
    with build(name, options, state_only=True) as task:
        task.reset(0)
        feat = task.action_feature
        big = np.asarray(feat.high) * 10
        applied = task.send_action(big)
        np.testing.assert_array_equal(applied, np.asarray(feat.high, dtype=np.float32))
        assert applied.dtype == np.float32
        with pytest.raises(ActionError):
            task.send_action(np.full(feat.shape, np.nan))
        with pytest.raises(ActionError):
            task.send_action(np.zeros(feat.shape[0] + 1))
        assert task.steps == 1


def test_other_arm_goals_are_in_another_arm():
    task = build("pointmaze", {"goal_mode": "other_arm"}, state_only=True)
    with task:
        arms_seen = set()
        for seed in range(40):
            task.reset(seed)
            start, goal = arm_of(cell_of(task.position)), arm_of(cell_of(task.goal))
            assert start != goal
            arms_seen.add((start, goal))
    assert len(arms_seen) == 6  # every ordered pair of distinct arms occurs
    assert sorted(c for cells in ARMS.values() for c in cells) == sorted(
        shortest_path((1, 3), (3, 3))
    )  # the arms cover the U, whose one path runs from one leg's end to the other's


@pytest.mark.parametrize("mode", ["ee_delta", "joint_delta"])
def test_arm_moves_in_commanded_direction(mode):
    with build("arm_push", {"action_mode": mode}, state_only=True) as task:
        task.reset(0)
        for direction in (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([-1.0, -1.0]) / np.sqrt(2)):
            dxy = 0.02 * direction
            action = dxy if mode == "ee_delta" else task.ee_to_joint_delta(dxy)
            ee0 = task.ee[:2]
            task.send_action(action)
            moved = task.ee[:2] - ee0
            assert moved @ direction > 0.015, (direction, moved)
            assert abs(moved @ np.array([-direction[1], direction[0]])) < 0.005


def test_a_teleop_device_drives_the_arm_in_the_robots_own_frame():
    """Device forward (+x) moves the pusher away from the arm's base (+y), left (+y) to its left (-x),
    proportionally: the default mapping moved it to the right and forward, and a gain of 1 m per full
    deflection saturated every push above 3 % at the 0.03 m step limit."""
    from robots.teleop.base import TeleopState
    from robots.teleop.mapping import teleop_mapper

    with build("arm_push", {}, state_only=True) as task:
        mapper = teleop_mapper(task, {})
        for motion, direction in (([1.0, 0, 0, 0, 0, 0], (0.0, 1.0)), ([0, 1.0, 0, 0, 0, 0], (-1.0, 0.0))):
            obs = task.reset(3)
            ee0 = task.ee[:2]
            for _ in range(3):
                task.send_action(mapper(TeleopState(motion=np.array(motion)), obs))
                obs = task.get_observation()
            moved = task.ee[:2] - ee0
            assert moved @ np.array(direction) > 0.06 and abs(moved @ np.array(direction)[::-1]) < 0.02, moved
        half = mapper(TeleopState(motion=np.array([0.5, 0, 0, 0, 0, 0])), obs)
        np.testing.assert_allclose(half, [0.0, 0.015], atol=1e-6)  # half a deflection, half a step


def test_arm_push_returns_the_step_the_workspace_let_it_take():
    """At the workspace's edge the command was cut short, but send_action said the whole step was applied
    (what a recording then stores, and what the runtime's safety checks read)."""
    with build("arm_push", {}, state_only=True) as task:
        task.reset(0)
        np.testing.assert_array_equal(task.send_action([0.01, -0.02]), np.float32([0.01, -0.02]))  # inside
        for _ in range(40):
            task.send_action([0.0, -0.03])  # towards the base, until the workspace stops it
        ee = task.ee[:2]
        applied = task.send_action([0.0, -0.03])
        assert applied.dtype == np.float32 and applied[0] == 0.0 and -0.002 < applied[1] <= 0.0, applied
        assert np.abs(task.ee[:2] - ee).max() < 0.002  # it stayed where it was, as reported
    with build("arm_push", {"action_mode": "joint_delta"}, state_only=True) as task:
        task.reset(0)
        for _ in range(60):
            applied = task.send_action([0.1, 0.0, 0.0])  # joint 1 up to its range's end (2.9 rad)
        assert applied[0] < 0.01 and task.joints[0] < 2.91, (applied, task.joints)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_expert_succeeds(name, options):
    task = build(name, options, state_only=True)
    expert = make_expert(name, noise_std=0.0)
    wins = 0
    with task:
        for seed in range(5):
            obs = task.reset(seed)
            expert.reset(task, np.random.default_rng(seed))
            while not task.done:
                task.send_action(expert.act(task, obs))
                obs = task.get_observation()
            wins += task.is_success()
    assert wins >= 4


def test_expert_with_noise_stays_in_limits():
    task = build("pointmaze", {}, state_only=True)
    expert = make_expert("pointmaze", noise_std=0.5)
    with task:
        obs = task.reset(0)
        expert.reset(task, np.random.default_rng(0))
        actions = [expert.act(task, obs) for _ in range(20)]
    assert np.all(np.abs(actions) <= 1.0) and np.std(actions) > 0.1


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="goal_mode"):
        build("pointmaze", {"goal_mode": "nowhere"})
    with pytest.raises(ValueError, match="action_mode"):
        build("arm_push", {"action_mode": "torque"})
    assert isinstance(build("pointmaze", {}), PointMazeTask)
    assert isinstance(build("arm_push", {}), ArmPushTask)


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("arm_push", {"show_target": "false"}, "show_target must be true or false, got 'false'"),  # drew it
        ("arm_push", {"success_radius": "abc"}, "success_radius must be a finite number > 0, got 'abc'"),
        (
            "pointmaze",
            {"success_radius": float("inf")},
            "success_radius must be a finite number > 0, got inf",
        ),
        ("pointmaze", {"success_radius": -0.1}, "success_radius must be a finite number > 0, got -0.1"),
        (  # every episode succeeded at reset
            "pointmaze",
            {"success_radius": 0.5},
            "success_radius must be under 0.5 m, the smallest distance an episode starts from its goal (at "
            "0.5 some episodes succeed before any action)",
        ),
        (
            "arm_push",
            {"success_radius": 0.3},
            "success_radius must be under 0.1 m, the smallest distance an episode starts from its goal (at "
            "0.3 some episodes succeed before any action)",
        ),
    ],
)
def test_option_values_of_the_wrong_kind_are_refused_in_one_line(name, options, words):
    """A string "false" drew the target, an infinite radius made every step a success, "abc" was a
    TypeError."""
    with pytest.raises(ValueError, match=f"^{re.escape(words)}$"):
        build(name, options)


def test_arm_push_draws_the_target_unless_asked_not_to():
    plain, shown = build("arm_push", {"show_target": False}), build("arm_push", {})
    plain.connect()
    shown.connect()
    try:

        def disc(seed: int) -> np.ndarray:
            """Centroid (row, col) of the pixels the drawn target changes; they must be green."""
            a, b = plain.reset(seed=seed)["image"], shown.reset(seed=seed)["image"]
            changed = np.argwhere((a != b).any(-1))
            assert len(changed) > 0
            rgb = b[tuple(changed.T)].astype(int)
            assert (rgb[:, 1] > rgb[:, 0] + 40).mean() > 0.5
            return changed.mean(0)

        assert np.abs(disc(3) - disc(4)).max() > 1  # it moves with the target
        state = shown.get_sim_state()  # sim-state round trips carry the marker with the target
        shown.reset(seed=5)
        shown.set_sim_state(state)
        assert np.allclose(shown._data.mocap_pos[0, :2], shown.target)
    finally:
        plain.disconnect()
        shown.disconnect()


# ---------------------------------------------------------------------- the MuJoCo apps: sample store, demo
def test_the_sample_store_run_as_a_file_renders_with_egl():
    """`python tools/sample_store.py` imported mujoco before `tools/__init__` set MUJOCO_GL=egl, so mujoco
    took GLFW, which fails without a display."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import runpy; runpy.run_path('tools/sample_store.py'); "
        "import mujoco; print(mujoco.GLContext.__module__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "mujoco.egl"


def test_the_sample_store_interrupted_says_how_many_episodes_it_keeps(tmp_path):
    """Ctrl-C kept the finished episodes and said only "interrupted"."""
    import signal
    import time

    from wm.data import DemoStore

    out = tmp_path / "s.zarr"
    cmd = [
        sys.executable,
        "tools/sample_store.py",
        f"out={out}",
        "episodes=100000",
        "steps=5",
        "image_size=16",
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "meta").exists() or DemoStore.open(out).n_episodes < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    kept = DemoStore.open(out).n_episodes
    assert proc.returncode == 130 and f"{out} keeps the {kept} episodes finished" in err, err


def test_the_sample_store_takes_any_image_size_and_names_a_bad_value(tmp_path):
    """Above 640 px MuJoCo's framebuffer refused; a bad value was "need episodes >= 1, steps >= 2 and
    image_size >= 8", whichever it was."""
    from tools.sample_store import SampleConfig, record
    from wm.data import DemoStore

    out = tmp_path / "big.zarr"
    record(SampleConfig(out=str(out), episodes=1, steps=2, image_size=656))
    with DemoStore.open(out) as store:
        assert store.get_episode(0)["top"].shape == (2, 656, 656, 3)
    with pytest.raises(ValueError, match=r"^steps must be >= 2, got 1$"):
        SampleConfig(out=str(tmp_path / "x.zarr"), steps=1)
    with pytest.raises(
        ValueError, match=r"^out=.*big.zarr already exists; .* overwrite=true to replace a store$"
    ):
        SampleConfig(out=str(out))
    # a traceback from MuJoCo's framebuffer, and one from the store under a file
    with pytest.raises(ValueError, match=r"^image_size must be at most 4096, got 100000$"):
        SampleConfig(out=str(tmp_path / "x.zarr"), image_size=100_000)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a.png is a file"):
        SampleConfig(out=str(tmp_path / "a.png" / "x.zarr"))


def test_the_demo_refuses_an_empty_out_or_a_file_before_any_work(tmp_path):
    """`wm-demo out=` ran the whole demo into the current folder (Path("") is "."); out= a file was
    refused only as out=FILE/eval_mpc, a path the user never gave."""
    from tools._cli import UsageError
    from tools.demo import DemoConfig

    with pytest.raises(UsageError, match=r"^out= is empty; give the demo's folder"):
        DemoConfig(out="")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match=r"^out=.*a_file is a file; give the demo's folder"):
        DemoConfig(out=str(tmp_path / "a_file"))
    assert DemoConfig(out=str(tmp_path / "new")).out.endswith("new")


def test_a_demo_stopped_while_it_collects_stops_and_its_rerun_goes_on(tmp_path):
    """SIGTERM (or Ctrl-C) during the demo's collection: it trained and evaluated on the episodes so far,
    exited 0, and the same command again was refused (a model trained on fewer episodes than asked)."""
    import signal
    import time

    from apps import BIN

    out = tmp_path / "demo"
    args = [str(BIN / "wm-demo"), f"out={out}", "collect.episodes=400", "trainer.steps=2", "eval.episodes=2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "demos.zarr" / "meta").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # collecting
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    said = re.search(r"the demo stopped: its store holds (\d+) of the 400 episodes; the same command", stderr)
    assert said and int(said.group(1)) < 400, stderr
    assert not (out / "world_model").exists() and not (out / "results.json").exists()


@pytest.mark.parametrize("name", ["pointmaze", "arm_push"])
def test_a_goal_observation_that_fails_leaves_the_task_as_it_was(name, monkeypatch):
    """The goal pose was set, observed and restored without a `finally`: a render that failed left the
    agent (the block) at the goal, and the episode then read as a success."""
    task = build(name, {})
    with task:
        task.reset(3)
        before = (task.goal_distance(), task.is_success())

        def fails() -> None:
            raise RuntimeError("the renderer went away")

        monkeypatch.setattr(task, "_observe", fails)
        with pytest.raises(RuntimeError, match="the renderer went away"):
            task.goal_observation()
        assert (task.goal_distance(), task.is_success()) == before and before[1] is False
