"""Scripted-expert success rates and simulator speed for the pure-MuJoCo tasks (pointmaze, arm_push).

For every configuration: success rate and mean / max episode length of the expert over `--seeds`
seeds (state_only, the task's default `max_steps`), then control steps per second with random
actions with rendering at `--size` and without (state_only), and the render time of one frame.

    python benchmarks/expert_success.py [--seeds 50] [--noise 0.0] [--size 64] [--timing-steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; mujoco reads it when first imported

import numpy as np

from robots.registry import make_expert, make_task
from robots.sim.base import SimConfig

CONFIGS = {
    "pointmaze": ("pointmaze", {"goal_mode": "any"}),
    "pointmaze/other_arm": ("pointmaze", {"goal_mode": "other_arm"}),
    "arm_push/ee_delta": ("arm_push", {"action_mode": "ee_delta"}),
    "arm_push/joint_delta": ("arm_push", {"action_mode": "joint_delta"}),
}


def expert_success(name: str, options: dict, seeds: int, noise: float) -> dict[str, float]:
    task = make_task(name, SimConfig(state_only=True, options=options))
    expert = make_expert(name, noise_std=noise)
    wins, lengths = [], []
    with task:
        for seed in range(seeds):
            obs = task.reset(seed)
            expert.reset(task, np.random.default_rng(seed))
            while not task.done:
                task.send_action(expert.act(task, obs))
                obs = task.get_observation()
            wins.append(task.is_success())
            lengths.append(task.steps)
    return {
        "success": float(np.mean(wins)),
        "mean_len": float(np.mean(lengths)),
        "max_len": int(max(lengths)),
    }


def steps_per_second(name: str, options: dict, state_only: bool, size: int, steps: int) -> float:
    task = make_task(name, SimConfig(image_size=(size, size), state_only=state_only, options=options))
    feat = task.action_feature
    actions = np.random.default_rng(0).uniform(feat.low, feat.high, size=(steps, *feat.shape))
    with task:
        task.reset(0)
        start = time.perf_counter()
        for a in actions:
            task.send_action(a)
            task.get_observation()
        return steps / (time.perf_counter() - start)


def render_ms(name: str, options: dict, size: int, frames: int = 200) -> float:
    task = make_task(name, SimConfig(image_size=(size, size), options=options))
    with task:
        task.reset(0)
        task.render()  # warm-up
        start = time.perf_counter()
        for _ in range(frames):
            task.render()
        return 1000 * (time.perf_counter() - start) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.0, help="expert noise_std (action units)")
    parser.add_argument("--size", type=int, default=64, help="image side for the timing runs")
    parser.add_argument("--timing-steps", type=int, default=500, help="0 skips the timing runs")
    args = parser.parse_args()
    for label, (name, options) in CONFIGS.items():
        row = {"task": label, **expert_success(name, options, args.seeds, args.noise)}
        if args.timing_steps:
            row["steps_per_s_render"] = round(
                steps_per_second(name, options, False, args.size, args.timing_steps)
            )
            row["steps_per_s_state_only"] = round(
                steps_per_second(name, options, True, args.size, args.timing_steps)
            )
            row["render_ms"] = round(render_ms(name, options, args.size), 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
