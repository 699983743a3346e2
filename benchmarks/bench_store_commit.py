"""Append cost as a store grows: milliseconds an episode, per block of episodes.

Appends `--episodes` short state-only episodes (`--steps` steps of a 10-d state and a 7-d action,
and an info record like wm-collect's) to a new store and prints, for each block of `--block`
episodes, the mean time of `append_episode` (data, `meta/episode_ends`, the info entry, the
commit). Beside it, in the same run, the time of the commit record alone as store format 1 wrote
it: the list of every episode's info in the root attributes, rewritten whole at each commit (a
zarr group's `attrs.update`, the call format 1 made), at the same episode counts. A store of
format 2 should cost the same in its last block as in its first.

    python benchmarks/bench_store_commit.py [--episodes 3000] [--block 500] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wm.data import ActionSpace, DemoStore, KeySpec, Schema
from wm.precision import cpu_info


def info_record(i: int) -> dict:
    """What wm-collect records an episode with: its seed, success, and the task's options."""
    return {
        "seed": i,
        "success": bool(i % 3),
        "expert": "scripted",
        "task_options": {"image_size": 96, "state_only": True, "control_hz": 10, "goal_mode": "random"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=3000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.episodes < 1 or args.block < 1 or args.steps < 1:
        raise SystemExit("--episodes, --block and --steps must be at least 1")
    schema = Schema(
        keys={
            "state": KeySpec((10,), "float32", "proprio"),
            "action": KeySpec((7,), "float32", "action"),
        },
        fps=10,
        action_space=ActionSpace(mode="absolute", frame="joint"),
    )
    rng = np.random.default_rng(0)
    episode = {
        "state": rng.normal(size=(args.steps, 10)).astype(np.float32),
        "action": rng.normal(size=(args.steps, 7)).astype(np.float32),
    }
    print(f"# CPU: {cpu_info()[0]}; {args.episodes} episodes of {args.steps} steps, blocks of {args.block}")
    root = Path(tempfile.mkdtemp(prefix="bench_store_commit_"))
    try:
        store = DemoStore.create(root / "s.zarr", schema)
        old = zarr.open_group(str(root / "format1.zarr"), mode="w")
        records: list[dict] = []
        done = 0
        while done < args.episodes:
            n = min(args.block, args.episodes - done)
            t0 = time.perf_counter()
            for i in range(done, done + n):
                store.append_episode(episode, info_record(i))
            ours = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            for i in range(done, done + n):
                records.append({"length": args.steps, **info_record(i)})
                old.attrs.update({"wm_episodes": records})
            format1 = (time.perf_counter() - t0) / n
            row = {
                "episodes": f"{done + 1}-{done + n}",
                "append_ms": round(ours * 1000, 2),
                "format1_commit_record_ms": round(format1 * 1000, 2),
            }
            print(json.dumps(row), flush=True)
            done += n
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
