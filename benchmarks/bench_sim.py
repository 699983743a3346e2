"""Simulated tasks: steps per second with and without camera rendering, and collection throughput.

For each task: random in-limit actions for `--steps` steps, once with cameras (at `--size` px) and
once in state-only mode; then `wm-collect`'s recording path (`Collector` with the task's scripted
expert, as fast as possible, into a fresh store) for `--episodes` episodes: episodes per minute and
the expert's success rate.

    python benchmarks/bench_sim.py [--tasks pointmaze arm_push pusht robosuite/Lift] [--episodes 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; mujoco reads it when first imported

import numpy as np

from robots.collect import Collector, open_store, recording_schema
from robots.registry import make_expert, make_task, task_names
from robots.sim.base import SimConfig


def steps_per_second(name: str, steps: int, size: int, state_only: bool) -> float:
    task = make_task(name, SimConfig(image_size=(size, size), state_only=state_only, max_steps=10**9))
    feat = task.action_feature
    rng = np.random.default_rng(0)
    low, high = np.asarray(feat.low), np.asarray(feat.high)
    with task:
        task.reset(0)
        task.send_action(rng.uniform(low, high))
        task.get_observation()
        t0 = time.perf_counter()
        for _ in range(steps):
            task.send_action(rng.uniform(low, high))
            task.get_observation()
        return steps / (time.perf_counter() - t0)


def collection_rate(name: str, episodes: int, size: int, work: Path) -> tuple[float, float, float]:
    """(episodes per minute, success rate, mean episode length) recording with the scripted expert."""
    task = make_task(name, SimConfig(image_size=(size, size)))
    store = open_store(str(work / f"{name.replace('/', '_')}.zarr"), recording_schema(task, name))
    collector = Collector(task, store, seed=0)
    expert = make_expert(name)
    with task:
        t0 = time.perf_counter()
        for _ in range(episodes):
            collector.record_expert_episode(expert, "expert")
        dt = time.perf_counter() - t0
    lengths = store.episode_lengths()
    store.close()
    return episodes / dt * 60, collector.stats.success_rate, float(np.mean(lengths))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=task_names())
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; images {args.size}x{args.size}\n")
    print(
        f"{'task':20s} {'steps/s (render)':>17s} {'steps/s (state)':>16s} {'episodes/min':>13s} "
        f"{'success':>8s} {'mean length':>12s}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench_sim_"))
    try:
        for name in args.tasks:
            render = steps_per_second(name, args.steps, args.size, state_only=False)
            state = steps_per_second(name, args.steps, args.size, state_only=True)
            epm, success, length = collection_rate(name, args.episodes, args.size, work)
            print(f"{name:20s} {render:>17.0f} {state:>16.0f} {epm:>13.1f} {success:>8.0%} {length:>12.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
