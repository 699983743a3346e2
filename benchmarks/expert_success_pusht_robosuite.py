"""Expert success rates and speeds of the PushT and robosuite tasks.

    python benchmarks/expert_success_pusht_robosuite.py --seeds 30
    python benchmarks/expert_success_pusht_robosuite.py --tasks robosuite/Door \
        --options '{"env_kwargs": {"use_latch": false}}'

For each task: expert success over seeds 0..N-1 (state-only mode), seconds per episode, steps per
second with and without rendering (random actions), and for robosuite the render time per 84 px
frame with robosuite's default settings and with ours (no reflections, multisampling or shadows).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; mujoco reads it when first imported

import numpy as np

from robots.registry import task_entry
from robots.sim.base import SimConfig


def expert_success(name: str, seeds: int, max_steps: int, options: dict) -> tuple[float, float, list[int]]:
    entry = task_entry(name)
    task = entry.make(SimConfig(state_only=True, max_steps=max_steps, options=options))
    expert = entry.expert()
    task.connect()
    wins, t0 = [], time.perf_counter()
    for seed in range(seeds):
        obs = task.reset(seed)
        expert.reset(task, np.random.default_rng(seed))
        while not task.done:
            task.send_action(expert.act(task, obs))
            obs = task.get_observation()
        wins.append(int(task.is_success()))
    task.disconnect()
    return float(np.mean(wins)), (time.perf_counter() - t0) / seeds, [s for s, w in enumerate(wins) if not w]


def steps_per_second(name: str, state_only: bool, options: dict, n: int = 100) -> float:
    task = task_entry(name).make(SimConfig(image_size=(84, 84), state_only=state_only, options=options))
    task.reset(0)
    feat, rng = task.action_feature, np.random.default_rng(0)
    low, high = np.array(feat.low), np.array(feat.high)
    t0 = time.perf_counter()
    for _ in range(n):
        task.send_action(rng.uniform(low, high))
        task.get_observation()
    task.disconnect()
    return n / (time.perf_counter() - t0)


def robosuite_render_ms(env_name: str, n: int = 50) -> tuple[float, float]:
    from robots.sim.robosuite_task import _robosuite, fast_rendering

    rs = _robosuite()
    env = rs.make(
        env_name,
        robots="Panda",
        has_renderer=False,
        has_offscreen_renderer=True,
        use_camera_obs=False,
        ignore_done=True,
        hard_reset=False,
    )
    env.reset()

    def ms() -> float:
        env.sim.render(84, 84, camera_name="agentview")
        t0 = time.perf_counter()
        for _ in range(n):
            env.sim.render(84, 84, camera_name="agentview")
        return (time.perf_counter() - t0) / n * 1e3

    before = ms()
    fast_rendering(env.sim)
    after = ms()
    env.close()
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tasks = ["pusht", "robosuite/Lift", "robosuite/Stack", "robosuite/Door"]
    ap.add_argument("--tasks", nargs="*", default=tasks)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--options", default="{}", help="JSON config.options for robosuite tasks")
    args = ap.parse_args()
    for name in args.tasks:
        options = json.loads(args.options) if name.startswith("robosuite/") else {}
        rate, sec, failed = expert_success(name, args.seeds, args.max_steps, options)
        row = {
            "task": name,
            "options": options,
            "expert_success": rate,
            "seeds": args.seeds,
            "failed_seeds": failed,
            "s_per_episode": round(sec, 2),
            "steps_per_s_state_only": round(steps_per_second(name, True, options), 1),
            "steps_per_s_rendering_84px": round(steps_per_second(name, False, options), 1),
        }
        if name.startswith("robosuite/"):
            before, after = robosuite_render_ms(name.split("/", 1)[1])
            row["render_ms_84px_default"], row["render_ms_84px_fast"] = round(before, 1), round(after, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
