"""Random training-window throughput: our store vs LeRobotDataset (image mode and video mode).

The same episodes (96x96x3 camera images of moving discs over a textured table, 2-d state,
2-d actions, 10 fps) go into our store and, through `wm-convert`'s converter (which writes with
lerobot's own `LeRobotDataset.create` / `add_frame` / `save_episode`), into LeRobot v3.0 datasets
in image mode (PNG in parquet) and video mode (AV1 mp4, decoded with pyav). Each loader serves
windows of 2 frames of images plus 16 actions, shuffled, batch 64, with 0 and 2 DataLoader
workers; samples per second are measured over the same number of batches after a warm-up batch
(`--rounds N`: every loader N times, interleaved; the best round is shown, and each round's ratio).
Both sides deliver float32 (T, C, H, W) images in [0, 1] and float32 actions, with no augmentation.

    python benchmarks/bench_loader.py [--episodes 40] [--steps 150] [--batches 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from wm.data import DemoStore, KeySpec, Schema
from wm.data.convert.lerobot import store_to_lerobot
from wm.data.dataset import WindowDataset, make_loader
from wm.data.windows import WindowSpec

FPS = 10
SIZE = 96
N_OBS, HORIZON = 2, 16


def synthetic_episode(rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
    """Two discs moving smoothly over a fixed per-episode texture: compressible like real frames."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    table = (
        120
        + 40 * np.sin(xx / rng.uniform(4, 12))[..., None] * np.cos(yy / rng.uniform(4, 12))[..., None]
        + rng.normal(0, 6, (SIZE, SIZE, 3))
    )
    pos = rng.uniform(20, 76, (2, 2))
    vel = rng.normal(0, 1.5, (2, 2))
    frames, states, actions = [], [], []
    for _ in range(steps):
        act = rng.normal(0, 0.3, 2)
        vel = 0.9 * vel + act
        pos = np.clip(pos + vel, 10, 86)
        img = table.copy()
        for (cx, cy), color in zip(pos, ([220, 60, 50], [40, 90, 210]), strict=True):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 64] = color
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        states.append(pos[0].copy())
        actions.append(act)
    return {
        "top": np.stack(frames),
        "state": np.asarray(states, dtype=np.float32),
        "action": np.asarray(actions, dtype=np.float32),
    }


def build_store(path: Path, episodes: int, steps: int, seed: int) -> DemoStore:
    schema = Schema(
        keys={
            "top": KeySpec((SIZE, SIZE, 3), "uint8", "image"),
            "state": KeySpec((2,), "float32", "proprio"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=FPS,
        task="push_discs",
    )
    store = DemoStore.create(path, schema, overwrite=True)
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        store.append_episode(synthetic_episode(rng, steps), {"task": "push_discs"})
    return store


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def throughput(dataset: torch.utils.data.Dataset, workers: int, batches: int, seed: int) -> float:
    if isinstance(dataset, WindowDataset):  # ours: whole-batch reads (the loader our trainer uses)
        loader = make_loader(dataset, 64, shuffle=True, num_workers=workers, seed=seed)
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=64,
            shuffle=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
        )
    if len(loader) < batches + 1:  # one pass: a second would time a new epoch's worker start
        raise SystemExit(f"{len(loader)} batches of 64 in an epoch, fewer than --batches + 1: add data")
    it = iter(loader)
    next(it)  # warm-up: worker start, file opening, decoder setup
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["action"])
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def ours(path: Path) -> WindowDataset:
    spec = WindowSpec.history_horizon(["top"], ["action"], n_obs=N_OBS, horizon=HORIZON)
    return WindowDataset(path, spec)


def lerobot(root: Path, video: bool) -> torch.utils.data.Dataset:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    first = -(N_OBS - 1)
    delta = {
        "observation.images.top": [i / FPS for i in range(first, 1)],
        "action": [i / FPS for i in range(first, first + HORIZON)],
    }
    return LeRobotDataset(
        "local/bench", root=root, delta_timestamps=delta, video_backend="pyav" if video else None
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every loader")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        t = time.perf_counter()
        store = build_store(work / "ours.zarr", args.episodes, args.steps, args.seed)
        print(
            f"wrote {store.n_episodes} episodes / {store.n_steps} frames in {time.perf_counter() - t:.1f} s"
        )
        roots = {}
        for mode in ("image", "video"):
            t = time.perf_counter()
            roots[mode] = store_to_lerobot(store, work / f"lerobot_{mode}", use_videos=mode == "video")
            print(f"converted to LeRobot {mode} mode in {time.perf_counter() - t:.1f} s")
        store.close()

        sizes = {
            "ours": dir_size(work / "ours.zarr"),
            "lerobot_image": dir_size(roots["image"]),
            "lerobot_video": dir_size(roots["video"]),
        }
        datasets = {
            "ours": lambda: ours(work / "ours.zarr"),
            "lerobot_image": lambda: lerobot(roots["image"], False),
            "lerobot_video": lambda: lerobot(roots["video"], True),
        }
        # per loader and worker count, one rate per round; rounds interleave the loaders
        rounds: dict[str, dict[int, list[float]]] = {name: {w: [] for w in args.workers} for name in sizes}
        for _ in range(args.rounds):
            for workers in args.workers:
                for name, make in datasets.items():
                    rounds[name][workers].append(throughput(make(), workers, args.batches, args.seed))
        rates = {name: {w: max(r) for w, r in by.items()} for name, by in rounds.items()}

        from wm.precision import describe_hardware

        print(f"\n{describe_hardware()}; {os.cpu_count()} cores, torch {torch.__version__}")
        print(f"windows: {N_OBS} frames of {SIZE}x{SIZE}x3 + {HORIZON} actions, batch 64, shuffled")
        print(f"best of {args.rounds} interleaved round(s)\n")
        print(
            f"{'loader':16s} {'size on disk':>14s} "
            + " ".join(f"{f'{w} workers':>16s}" for w in args.workers)
        )
        for name in sizes:
            cells = " ".join(f"{rates[name][w]:>10.0f} smp/s" for w in args.workers)
            print(f"{name:16s} {sizes[name] / 2**20:>10.1f} MiB {cells}")
        print()

        def span(a: str, b: str, w: int) -> str:
            r = sorted(x / y for x, y in zip(rounds[a][w], rounds[b][w], strict=True))
            return f"{r[0]:.1f}x" if len(r) == 1 else f"{r[0]:.1f}-{r[-1]:.1f}x (per round)"

        for w in args.workers:
            print(
                f"{w} workers: ours / LeRobot image = {span('ours', 'lerobot_image', w)}, "
                f"ours / LeRobot video = {span('ours', 'lerobot_video', w)}"
            )
        if args.json is not None:
            figures = {"sizes_bytes": sizes, "samples_per_s": rates, "rounds_samples_per_s": rounds}
            args.json.write_text(json.dumps(figures, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
