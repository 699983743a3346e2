"""Smoke test over every registered task: build, reset, step, render, shapes, no NaN, seeded replay."""

from __future__ import annotations

import numpy as np
import pytest

from robots.base import ActionError, Robot, RobotError
from robots.registry import make_expert, make_task, task_names
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
