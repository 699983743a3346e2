"""Smoke test over every registered task: build, reset, step, render, shapes, no NaN, seeded replay."""

from __future__ import annotations

import re

import numpy as np
import pytest

from robots.base import ActionError, Feature, Robot, RobotBase, RobotError
from robots.registry import make_expert, make_robot, make_task, task_names
from robots.sim.base import SimConfig


def _random_actions(task, n: int, seed: int) -> list[np.ndarray]:
    feat = task.action_feature
    rng = np.random.default_rng(seed)
    return [rng.uniform(np.asarray(feat.low), np.asarray(feat.high)).astype(feat.dtype) for _ in range(n)]


def _rollout(task, seed: int, actions) -> list[dict[str, np.ndarray]]:
    obs = [task.reset(seed)]
    for a in actions:
        task.send_action(a)
        obs.append(task.get_observation())
    return obs


@pytest.mark.parametrize("name", task_names())
def test_task_smoke(name):
    task = make_task(name, SimConfig(image_size=(48, 64), max_steps=50))
    assert isinstance(task, Robot)
    features = task.observation_features  # readable before connect
    feat = task.action_feature
    assert feat.low is not None and feat.high is not None
    with task:
        actions = _random_actions(task, 5, seed=0)
        first = _rollout(task, 3, actions)
        for obs in first:
            assert set(features) <= set(obs) and "timestamp" in obs
            for key, f in features.items():
                assert obs[key].shape == f.shape and obs[key].dtype == np.dtype(f.dtype), key
                assert np.all(np.isfinite(obs[key])), key
        images = [k for k, f in features.items() if f.kind == "image"]
        assert images and first[0][images[0]].shape == (48, 64, 3)
        assert first[-1][images[0]].std() > 0, "a blank render"
        second = _rollout(task, 3, actions)
        for a, b in zip(first, second, strict=True):
            for key in features:
                np.testing.assert_array_equal(
                    a[key], b[key], err_msg=f"{name}: seed 3 is not reproducible ({key})"
                )
        goal = task.goal_observation()
        for key, f in features.items():
            assert goal[key].shape == f.shape, key
        expert = make_expert(name)
        expert.reset(task, np.random.default_rng(0))
        a = expert.act(task, task.get_observation())
        assert np.asarray(a).shape == feat.shape and np.all(np.isfinite(a))
        with pytest.raises(ActionError, match="non-finite"):
            task.send_action(np.full(feat.shape, np.nan))
        with pytest.raises(ActionError, match="shape"):
            task.send_action(np.zeros(feat.shape[0] + 1))
        applied = task.send_action(np.asarray(feat.high) + 10.0)
        np.testing.assert_array_equal(applied, np.asarray(feat.high, dtype=feat.dtype))


@pytest.mark.parametrize("name", ["pointmaze", "arm_push", "pusht"])
def test_state_only_mode_has_no_images(name):
    task = make_task(name, SimConfig(state_only=True))
    assert not [k for k, f in task.observation_features.items() if f.kind == "image"]
    with task:
        obs = task.reset(0)
        assert all(np.all(np.isfinite(v)) for v in obs.values())


def test_unknown_task_lists_valid_names():
    with pytest.raises(RobotError, match="unknown task 'maze'; valid: .*pointmaze"):
        make_task("maze")


def test_not_connected():
    task = make_task("pointmaze")
    with pytest.raises(RobotError, match="not connected"):
        task.get_observation()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"state_only": "false"}, "state_only must be true or false, got 'false'"),  # was truthy: no images
        ({"max_steps": "10"}, "max_steps must be an integer >= 1, got '10'"),  # was a TypeError
        ({"max_steps": 2.5}, "max_steps must be an integer >= 1, got 2.5"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),  # failed in numpy at the first reset
        ({"seed": 1.5}, "seed must be a non-negative integer, got 1.5"),
        ({"options": None}, "options must be a mapping of option names to values, got None"),
    ],
)
def test_bad_sim_config_is_refused_in_one_line_when_built(kwargs, words):
    with pytest.raises(ValueError, match=f"^{re.escape(words)}$"):
        SimConfig(**kwargs)


def test_a_bad_reset_seed_is_one_line_naming_the_task():
    with make_task("pointmaze", SimConfig(state_only=True)) as task:
        for seed in (-1, 1.5, "3", True):
            with pytest.raises(
                ValueError, match=r"^pointmaze: reset seed must be a non-negative integer, got "
            ):
                task.reset(seed)
        assert task.reset(np.int64(3))["proprio"].shape == (4,)


def test_reset_without_a_seed_starts_a_new_episode_each_time_from_the_configs_seed():
    """reset() replayed the episode of `config.seed` each time: ten episodes "collected" so were one."""

    def starts(task) -> list[list[float]]:
        return [task.reset()["proprio"].tolist() for _ in range(3)]

    with make_task("pointmaze", SimConfig(state_only=True, seed=7)) as task:
        first = starts(task)
        assert first[0] == task.reset(7)["proprio"].tolist()  # the first is config.seed's episode
    assert len({tuple(s) for s in first}) == 3
    with make_task("pointmaze", SimConfig(state_only=True, seed=7)) as task:
        assert starts(task) == first  # the same config, the same episodes


@pytest.mark.parametrize("action", [["0.1", "x"], [0.1 + 1j, 0.0], [0.1, None]])
def test_an_action_that_is_not_real_numbers_is_refused_naming_the_robot(action):
    """A string was a bare numpy ValueError; a complex action lost its imaginary part with a warning."""
    with make_task("pointmaze", SimConfig(state_only=True)) as task:
        task.reset(0)
        with pytest.raises(ActionError, match=r"^pointmaze: action must be real numbers, got "):
            task.send_action(action)
        assert task.steps == 0


@pytest.mark.parametrize("name", task_names())
def test_sim_state_needs_a_connected_task(name):
    """Before connect (or after disconnect) it was a TypeError or AttributeError from inside the simulator."""
    task = make_task(name, SimConfig(state_only=True))
    with pytest.raises(RobotError, match="not connected"):
        task.get_sim_state()
    with pytest.raises(RobotError, match="not connected"):
        task.set_sim_state(b"")


@pytest.mark.parametrize(
    "action, words",
    [
        ([[0.1, 0.2], [0.3]], "action is not an array of numbers"),  # was numpy's bare ValueError
        (np.array([True, False]), "action must be real numbers, got bool"),  # was sent as [1.0, 0.0]
        (0.5, "action shape () != expected (2,)"),
    ],
)
def test_an_action_of_the_wrong_kind_is_refused_in_one_line_naming_the_robot(action, words):
    with make_task("pointmaze", SimConfig(state_only=True)) as task:
        task.reset(0)
        with pytest.raises(ActionError, match=rf"^pointmaze: {re.escape(words)}") as info:
            task.send_action(action)
        assert "\n" not in str(info.value)
        assert task.steps == 0


class _Unlimited(RobotBase):
    """A robot whose float32 actions have no limits (a driver that reports none)."""

    @property
    def observation_features(self) -> dict[str, Feature]:
        return {}

    @property
    def action_feature(self) -> Feature:
        return Feature((2,), "float32", "action")

    def _connect(self) -> None:
        self.sent: list[np.ndarray] = []

    def _disconnect(self) -> None:
        pass

    def _observe(self) -> dict[str, np.ndarray]:
        return {}

    def _apply(self, action: np.ndarray) -> None:
        self.sent.append(action)


def test_an_action_beyond_the_robots_dtype_is_refused_not_sent_as_inf():
    """1e39 is finite in float64 and passed the check; cast to the robot's float32 it was sent as inf."""
    with _Unlimited(name="arm") as robot:
        with pytest.raises(ActionError, match=r"^arm: action \[1e\+39, 0\.0\] overflows float32; refused$"):
            robot.send_action(np.array([1e39, 0.0]))
        assert robot.sent == []
        np.testing.assert_array_equal(robot.send_action([3e38, -1.0]), np.float32([3e38, -1.0]))


@pytest.mark.parametrize(
    "name, near",
    [
        ("Lift", "robosuite/Lift"),  # a robosuite env without its prefix: no hint before
        ("lift", "robosuite/Lift"),
        ("point", "pointmaze"),
        ("maze", "pointmaze"),
        (3, None),  # `task=3` from the command line: was AttributeError: 'int' object has no attribute ...
    ],
)
def test_an_unknown_task_is_one_line_with_the_list_and_the_near_match(name, near):
    with pytest.raises(
        RobotError, match=rf"^unknown task {re.escape(repr(name))}; valid: .*pointmaze"
    ) as info:
        make_task(name)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(f"; did you mean {near}?") if near else "did you mean" not in message


@pytest.mark.parametrize(
    "name, near",
    [("so100", "so100_follower"), ("koch", "koch_follower"), ("so100_folower", "so100_follower"), (5, None)],
)
def test_an_unknown_robot_is_one_line_with_the_list_and_the_near_match(name, near):
    """ "so100" had no hint (difflib's ratio is below its cutoff) and a number was difflib's TypeError."""
    with pytest.raises(
        RobotError, match=rf"^unknown robot {re.escape(repr(name))}; valid: koch_follower, "
    ) as info:
        make_robot(name)
    message = str(info.value)
    assert message.endswith(f"; did you mean {near}?") if near else "did you mean" not in message
