"""PushT (gym-pusht) and robosuite tasks: features, stepping, seeding, sim state, goals, experts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from robots.base import ActionError, RobotError
from robots.registry import make_task
from robots.sim.base import SimConfig

pytest.importorskip("gym_pusht")
robosuite_task = pytest.importorskip("robots.sim.robosuite_task")
from robots.sim import pusht  # noqa: E402


def run_expert(task, expert, seed: int) -> bool:
    obs = task.reset(seed)
    expert.reset(task, np.random.default_rng(seed))
    while not task.done:
        task.send_action(expert.act(task, obs))
        obs = task.get_observation()
    return task.is_success()


def rollout(task, actions, read=lambda task: task.get_observation()) -> list:
    """Send each action, check that the task reports an action of its action shape as sent, and
    return `read(task)` after every step."""
    out = []
    for a in actions:
        sent = task.send_action(a)
        assert np.shape(sent) == task.action_feature.shape
        out.append(read(task))
    return out


def check_obs(obs: dict, feats: dict) -> None:
    assert set(obs) == set(feats) | {"timestamp"}
    for k, f in feats.items():
        assert obs[k].shape == f.shape and obs[k].dtype == np.dtype(f.dtype), k
        assert np.all(np.isfinite(obs[k].astype(np.float64))), k


# ---------------------------------------------------------------------- PushT
@pytest.fixture(scope="module")
def push():
    task = pusht.make(SimConfig(image_size=(48, 64)))
    yield task
    task.disconnect()


def test_pusht_features_before_connect():
    task = pusht.make(SimConfig(image_size=(48, 64)))
    assert not task.is_connected
    assert task.observation_features["image"].shape == (48, 64, 3)
    assert task.action_feature.high == (512.0, 512.0) and task.control_hz == 10
    assert "image" not in pusht.make(SimConfig(state_only=True)).observation_features


def test_pusht_step_seed_and_render(push):
    obs = push.reset(3)
    check_obs(obs, push.observation_features)
    actions = [np.array([100.0 + 20 * i, 300.0]) for i in range(8)]
    run1 = rollout(push, actions)
    push.reset(3)
    run2 = rollout(push, actions)
    assert not np.array_equal(run1[0]["proprio"], run1[-1]["proprio"])  # the pusher moved
    for a, b in zip(run1, run2, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["proprio"], b["proprio"])
    assert not np.array_equal(push.reset(4)["proprio"], obs["proprio"])
    # orientation: the blue pusher is drawn where its coordinates say (x right, y down, as in gym-pusht)
    push.reset(5)
    obs = rollout(push, [np.array([400.0, 80.0])] * 10)[-1]
    blue = (obs["image"][..., 2] > 190) & (obs["image"][..., 0] < 100)
    rows, cols = np.nonzero(blue)
    assert abs(rows.mean() - obs["proprio"][1] / 512 * 48) < 3
    assert abs(cols.mean() - obs["proprio"][0] / 512 * 64) < 3


def test_pusht_clipping_and_nan(push):
    push.reset(0)
    assert np.allclose(push.send_action(np.array([900.0, -5.0])), [512.0, 0.0])
    with pytest.raises(ActionError):
        push.send_action(np.array([np.nan, 1.0]))
    with pytest.raises(ActionError):
        push.send_action(np.zeros(3))


def test_pusht_sim_state_round_trip(push):
    push.reset(1)
    block = push.block_pose()
    for _ in range(5):  # push into the block so contacts are cached
        push.send_action(block[:2])
    state = push.get_sim_state()
    pushes = [block[:2] + [5.0 * i, 0.0] for i in range(6)]
    first = rollout(push, pushes, read=lambda task: task.block_pose())
    push.set_sim_state(state)
    again = rollout(push, pushes, read=lambda task: task.block_pose())
    assert not np.array_equal(first[0], first[-1])  # the block moved, so equal runs mean something
    np.testing.assert_array_equal(np.array(first), np.array(again))


def test_pusht_goal_observation(push):
    push.reset(2)
    before, pose = push.get_observation(), push.block_pose()
    goal = push.goal_observation()
    assert set(goal) == set(push.observation_features)
    assert goal["image"].shape == before["image"].shape
    assert not np.array_equal(goal["image"], before["image"])
    np.testing.assert_array_equal(push.block_pose(), pose)
    np.testing.assert_array_equal(push.get_observation()["image"], before["image"])
    assert pusht.coverage(np.array(pusht.GOAL_POSE)) > 0.999


def test_pusht_block_angle_reads_one_value_per_pose():
    """pymunk's angle winds on: a block turned once round read 2 pi from the goal while at it (three
    seeds of sixty ended so), and a state-based goal cost saw a solved episode as far off."""
    task = pusht.make(SimConfig(state_only=True))
    with task:
        task.reset(4)
        for turns in (-1, 0, 2):
            task._env.block.angle = pusht.GOAL_POSE[2] + 2 * math.pi * turns + 0.1
            assert task.get_observation()["object"][2] == pytest.approx(pusht.GOAL_POSE[2] + 0.1)
        task._env.block.angle = pusht.GOAL_POSE[2] - 3.0
        assert task.block_pose()[2] == pytest.approx(pusht.GOAL_POSE[2] - 3.0)
        np.testing.assert_allclose(task.goal_observation()["object"], pusht.GOAL_POSE, atol=1e-5)


def test_pusht_expert_succeeds():
    task = pusht.make(SimConfig(state_only=True, max_steps=200))
    expert = pusht.ENTRY.expert()
    for seed in (0, 1):
        assert run_expert(task, expert, seed)
        assert task.score() == 1.0  # gym-pusht's reward: coverage / 0.95, clipped
    task.reset(2)
    assert 0.0 <= task.score() < 1.0 and task.score() == pytest.approx(task.coverage / 0.95)


# ---------------------------------------------------------------------- robosuite
@pytest.fixture(scope="module")
def lift():
    task = robosuite_task.robosuite_entry("Lift").make(SimConfig(image_size=(64, 64), max_steps=120))
    yield task
    task.disconnect()


def test_robosuite_unknown_env_lists_names():
    with pytest.raises(RobotError, match="valid: .*Lift.*Stack"):
        robosuite_task.robosuite_entry("NoSuchEnv")


@pytest.mark.parametrize(
    "options, words",
    [
        ({"env_kwargs": {"horizon": 500}}, "env_kwargs.horizon is set by the task itself: use max_steps="),
        ({"robots": "Pandaa"}, "unknown robosuite robot 'Pandaa'; did you mean Panda?"),
        (  # a TypeError: unhashable type 'list'
            {"controller": ["OSC_POSE"]},
            "robosuite controller must be a controller name, a .json path or a config dict, got ['OSC_POSE']",
        ),
        ({"control_freq": 0}, "robosuite control_freq must be a number > 0 Hz, got 0"),
        (
            {"control_freq": float("inf")},
            "robosuite control_freq must be a number > 0 Hz, got inf",
        ),  # was 1/0
        ({"control_freq": "abc"}, "robosuite control_freq must be a number > 0 Hz, got 'abc'"),
        (  # its actions ran 0.032 s, not 0.0333: step_seconds, videos and wm-deploy's pace were off
            {"control_freq": 30},
            "robosuite control_freq=30: robosuite steps its 500 Hz simulation a whole number of times per "
            "action (it would run 0.032 s, not 0.03333 s); choose a divisor of 500, e.g. 10, 20, 25 or 50",
        ),
        ({"control_freq": 1000}, "control_freq=1000: robosuite steps its 500 Hz simulation"),  # stood still
        ({"robots": []}, "robosuite robots must be a robot name or a non-empty list of them, got []"),
        ({"camera": []}, "robosuite camera must be a camera name or a non-empty list of them, got []"),
        (  # camera was ignored
            {"camera": "frontview", "cameras": ["agentview"]},
            "robosuite camera='frontview' and cameras=['agentview']: give one of them",
        ),
        ({"env_kwargs": {"bogus": 1}}, "robosuite.make refused the options: TypeError: "),
    ],
)
def test_robosuite_options_it_cannot_take_are_one_line(options, words):
    """They were a traceback reported as a bug (TypeError, KeyError, robosuite's SimulationError)."""
    with pytest.raises(RobotError, match=re.escape(words)):
        _ = make_task("robosuite/Lift", SimConfig(image_size=(32, 32), options=options)).observation_features


def test_the_simulation_rate_control_freq_is_checked_against_is_robosuites():
    import robosuite.macros

    from robots.sim.robosuite_task import SIMULATION_HZ

    assert SIMULATION_HZ * robosuite.macros.SIMULATION_TIMESTEP == pytest.approx(1.0)
    task = make_task("robosuite/Lift", SimConfig(image_size=(32, 32), options={"control_freq": 25}))
    with task:
        task.reset(0)
        assert task.step_seconds() == pytest.approx(0.04)


def test_a_rate_set_after_construction_is_checked_and_rebuilds_the_env():
    """`wm-deploy control_hz=` sets the task's rate after its options were checked: 1000 Hz reached
    robosuite.make unchecked and the world stood still (no simulation step per action) while the run
    looked normal. An env built at another rate kept running at that one."""
    task = make_task("robosuite/Lift", SimConfig(state_only=True))
    _ = task.action_feature  # the env is built (at 20 Hz) for the robot's dimensions
    for bad in (1000, 30):
        with pytest.raises(RobotError, match=rf"robosuite control_hz={bad}: robosuite steps its 500 Hz"):
            task.control_hz = bad
    task.control_hz = 50
    with task:
        task.reset(0)
        assert task.step_seconds() == pytest.approx(0.02) and task.env.control_freq == 50
        # connected, the rebuilt env lost the episode: the next observation failed, an action went to
        # a fresh env in robosuite.make's initial state
        with pytest.raises(RobotError, match="control_hz cannot change while connected"):
            task.control_hz = 25
        task.control_hz = 50  # (the same rate: nothing to rebuild)
        assert task.get_observation() and task.env.control_freq == 50


def test_a_camera_robosuite_lacks_is_refused_every_time_and_leaves_no_env():
    """The env was kept after the refusal: the next use raised KeyError and connect() passed, with a
    camera that rendering then failed on."""
    task = make_task(
        "robosuite/Lift", SimConfig(image_size=(16, 16), options={"camera": ["agentview", "nope"]})
    )
    for _ in range(2):
        with pytest.raises(RobotError, match="no camera 'nope'; valid: .*agentview"):
            task.connect()
        assert task._env is None and not task.is_connected


def test_two_cameras_at_an_odd_size_and_the_callers_global_generator_left_alone():
    """Each camera is its own image feature, rendered at any (height, width). Building the env drew from
    NumPy's global generator (robosuite.make resets it): a caller's seeded stream moved."""
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    options = {"camera": ["agentview", "frontview"]}
    task = make_task("robosuite/Lift", SimConfig(image_size=(24, 40), options=options))
    feats = task.observation_features  # builds the env
    assert np.random.random() == expected
    with task:
        obs = task.reset(0)
        check_obs(obs, feats)
        assert obs["agentview_image"].shape == (24, 40, 3)
        assert not np.array_equal(obs["agentview_image"], obs["frontview_image"])
        assert set(task.goal_observation()) == set(feats)


def test_lift_features_step_and_seed(lift):
    feats = lift.observation_features  # readable before connect (builds the env)
    assert feats["agentview_image"].shape == (64, 64, 3) and feats["proprio"].shape == (9,)
    assert lift.action_feature.shape == (7,) and lift.action_space.mode == "delta"
    obs = lift.reset(5)
    check_obs(obs, feats)
    acts = [np.array([0.3, -0.2, 0.1, 0, 0, 0, -1.0])] * 4
    proprio = lambda task: task.get_observation()["proprio"]  # noqa: E731
    run1 = rollout(lift, acts, read=proprio)
    start2 = lift.reset(5)
    np.testing.assert_array_equal(start2["object"], obs["object"])
    run2 = rollout(lift, acts, read=proprio)
    assert not np.array_equal(run1[0], run1[-1])  # the arm moved
    np.testing.assert_array_equal(np.array(run1), np.array(run2))
    assert not np.array_equal(lift.reset(6)["object"], obs["object"])
    assert np.allclose(lift.send_action(np.full(7, 3.0)), 1.0)
    with pytest.raises(ActionError):
        lift.send_action(np.full(7, np.inf))


def test_lift_image_right_side_up(lift):
    img = lift.reset(0)["agentview_image"].astype(float)
    h = img.shape[0]
    # agentview looks down at the white table from above the robot: the table fills the lower part
    assert img[-h // 4 :].mean() > img[: h // 4].mean() + 20


def test_lift_sim_state_and_goal(lift):
    lift.reset(2)
    for _ in range(3):
        lift.send_action(np.array([0.5, 0.5, -0.3, 0, 0, 0.2, 1.0]))
    state = lift.get_sim_state()
    acts = [np.array([0.2, -0.4, 0.3, 0.1, 0, 0, -1.0])] * 5
    proprio = lambda task: task.get_observation()["proprio"]  # noqa: E731
    first = rollout(lift, acts, read=proprio)
    lift.set_sim_state(state)
    assert lift.steps == 3  # the episode's count too: a look-ahead does not use up max_steps
    again = rollout(lift, acts, read=proprio)
    assert not np.array_equal(first[0], first[-1])  # the arm moved
    np.testing.assert_array_equal(np.array(first), np.array(again))
    before, st = lift.get_observation(), lift.get_sim_state()
    goal = lift.goal_observation()
    assert set(goal) == set(lift.observation_features)
    assert goal["object"][2] > before["object"][2] + 0.09  # the cube is lifted in the goal
    np.testing.assert_array_equal(lift.get_sim_state(), st)
    np.testing.assert_array_equal(lift.get_observation()["agentview_image"], before["agentview_image"])


def test_a_state_saved_at_reset_restores_after_steps_and_back(lift):
    """The Panda gripper's command is (1,) after a reset and (2,) after a step: a state saved at one was
    refused at the other ("sim state of shape (426,), expected (427,)"), which is saving the start,
    rolling out and going back."""
    acts = [np.array([0.2, -0.4, 0.3, 0.1, 0, 0, -1.0])] * 3
    proprio = lambda task: task.get_observation()["proprio"]  # noqa: E731
    lift.reset(4)
    start = lift.get_sim_state()
    first = rollout(lift, acts, read=proprio)
    middle = lift.get_sim_state()
    lift.set_sim_state(start)
    assert lift.steps == 0
    # (to 1e-8, not bit for bit: robosuite's controller keeps a little of its own between a reset and a
    # first step, which the state does not carry; from mid-episode states replays are exact, above)
    np.testing.assert_allclose(np.array(rollout(lift, acts, read=proprio)), np.array(first), atol=1e-7)
    lift.reset(5)
    lift.set_sim_state(middle)  # (and a state saved mid-episode after a new reset)
    np.testing.assert_array_equal(lift.get_sim_state(), middle)
    with pytest.raises(RobotError, match=r"^robosuite/Lift: sim state of \d+ values, expected \d+$"):
        lift.set_sim_state(middle[:-1])


def test_the_stack_goal_is_a_stacked_scene_by_stacks_own_check():
    """Cube A sat 1 mm above cube B: no contact, so the goal scene failed Stack's own success check."""
    task = make_task("robosuite/Stack", SimConfig(state_only=True))
    with task:
        for seed in range(2):
            task.reset(seed)
            robosuite_task._pose_goal(task.env, "Stack")
            task.env.sim.forward()
            assert task.env._check_success()


def test_lift_expert_succeeds():
    entry = robosuite_task.robosuite_entry("Lift")
    task = entry.make(SimConfig(state_only=True, max_steps=120))
    assert "agentview_image" not in task.observation_features
    expert = entry.expert()
    assert all(run_expert(task, expert, seed) for seed in (0, 1))
    task.disconnect()


def test_the_stack_expert_grips_cube_a_square_and_away_from_cube_b():
    """Seeds 1 and 31 failed: the fingers, closing at the gripper's first heading, came down across
    cube A's corners or onto cube B beside it and closed on nothing."""
    task = make_task("robosuite/Stack", SimConfig(state_only=True))
    expert = robosuite_task.ScriptedExpert("Stack")
    with task:
        assert all(run_expert(task, expert, seed) for seed in (1, 31))
        assert "regrasps" not in expert._mem  # the first grasp held


def test_the_stack_expert_picks_cube_a_again_after_losing_it():
    """Cube A taken out of the closed gripper while it is carried (put back on the table 10 cm from cube
    B): the expert sees it gone, picks it up again and stacks it."""
    task = make_task("robosuite/Stack", SimConfig(state_only=True))
    expert = robosuite_task.ScriptedExpert("Stack")
    with task:
        obs, moved = task.reset(0), False
        expert.reset(task, np.random.default_rng(0))
        while not task.done:
            if expert._phase == 3 and not moved:  # carrying
                sim, joint = task.env.sim, task.env.cubeA.joints[0]
                pose = np.array(sim.data.get_joint_qpos(joint))
                pose[:3] = [*sim.data.body_xpos[task.env.cubeB_body_id][:2] + [0.0, -0.1], 0.83]
                sim.data.set_joint_qpos(joint, pose)
                sim.data.set_joint_qvel(joint, np.zeros(6))
                sim.forward()
                moved = True
            task.send_action(expert.act(task, obs))
            obs = task.get_observation()
        assert moved and expert._mem["regrasps"] == 1 and task.is_success()


def test_a_task_says_how_long_a_step_is_whatever_rate_it_is_driven_at():
    """wm-deploy's control_hz= on a simulated task: PushT still steps its physics 0.1 s (its world runs
    faster than real time), robosuite builds its env at the new rate."""
    from tools.deploy import DeployConfig, make_robot, set_control_hz

    for robot, scale, step in (("pusht", 2.0, 0.1), ("robosuite/Lift", 1.0, 0.05)):
        cfg = DeployConfig(out="unused", robot=robot, controller="random", control_hz=20)
        task = make_robot(cfg, None)
        assert set_control_hz(cfg, task) == pytest.approx(scale)
        with task:
            task.reset(0)
            assert task.step_seconds() == pytest.approx(step)


def test_goal_undefined_env_raises():
    task = robosuite_task.robosuite_entry("PickPlaceCan").make(SimConfig(state_only=True))
    task.reset(0)
    with pytest.raises(RobotError, match="PickPlaceCan"):
        task.goal_observation()
    with pytest.raises(RobotError, match="no scripted expert"):
        robosuite_task.robosuite_entry("PickPlaceCan").expert()
    task.disconnect()


def test_a_policy_is_evaluated_on_an_env_without_a_goal_but_mpc_is_refused():
    """Goals are asked of a task only for a controller that plans to one (MPC): a policy (here random)
    runs on robosuite's PickPlaceCan, which defines no goal observation; MPC gets the task's one line."""
    from policies.evaluate import RandomPolicy, goal_observation, run_episodes
    from robots.base import RobotError
    from robots.sim.base import SimConfig

    task = make_task("robosuite/PickPlaceCan", SimConfig(state_only=True, max_steps=3))
    try:
        feat = task.action_feature
        (result,) = run_episodes([task], RandomPolicy(feat.low, feat.high, 0), [1000])
        assert result.steps == 3 and result.success is False
        with pytest.raises(
            RobotError, match="no goal observation is defined for robosuite env 'PickPlaceCan'"
        ):
            goal_observation(task, needed=True)
    finally:
        task.disconnect()
