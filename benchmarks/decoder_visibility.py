"""How well a DINO-WM checkpoint's decoder draws what moves (the agent), not only the static scene.

For each of the first `--episodes` episodes of a store: the background is the per-pixel median
frame of the episode (the agent moves, the scene does not); "agent pixels" are those that differ
from it by more than 0.1 in some channel. Every frame is encoded and decoded; printed:
- MSE over agent pixels and over the rest,
- the distance (pixels) between the centroid of the true agent pixels and that of the decoded
  frame's own foreground (|decoded - background| > 0.1), and the share of frames whose decoded
  foreground lies within 3 px of the truth ("agent drawn").

    python benchmarks/decoder_visibility.py --checkpoint out/demo/world_model --store out/demo/demos.zarr
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from wm.data import DemoStore
from wm.dino_wm import MOTION_THRESHOLD as THRESHOLD  # the training loss's "this pixel moved"
from wm.registry import load_model


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 2) row/col centroids (NaN where the mask is empty)."""
    n, h, w = mask.shape
    rows = torch.arange(h, dtype=torch.float32)[None, :, None]
    cols = torch.arange(w, dtype=torch.float32)[None, None, :]
    m = mask.float()
    total = m.sum((1, 2))
    out = torch.stack([(m * rows).sum((1, 2)) / total, (m * cols).sum((1, 2)) / total], 1)
    out[total == 0] = float("nan")
    return out


@torch.no_grad()
def measure(checkpoint: str, store: str, episodes: int) -> dict[str, float]:
    model = load_model(checkpoint, controller="mpc").model
    key = model.io_spec.image_keys[0]
    agent_mse, rest_mse, dists = [], [], []
    with DemoStore.open(store) as s:
        for i in range(min(episodes, s.n_episodes)):
            frames = torch.from_numpy(np.asarray(s.get_episode(i, keys=[key])[key])).float() / 255.0
            frames = frames.permute(0, 3, 1, 2)  # (T, C, H, W)
            background = frames.median(0).values
            truth = (frames - background).abs().amax(1) > THRESHOLD  # (T, H, W)
            decoded = model.decode({"visual": model.encode_images(frames[None])})[0].clamp(0, 1)
            err = (decoded - frames).pow(2).mean(1)  # (T, H, W)
            agent_mse.append(err[truth].mean().item() if truth.any() else float("nan"))
            rest_mse.append(err[~truth].mean().item())
            drawn = (decoded - background).abs().amax(1) > THRESHOLD
            d = (centroid(truth) - centroid(drawn)).norm(dim=1)
            dists.append(torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d))
    d = torch.cat(dists)
    return {
        "agent_mse": float(np.nanmean(agent_mse)),
        "background_mse": float(np.mean(rest_mse)),
        "median_centroid_error_px": float(d.median()),
        "agent_drawn_within_3px": float((d <= 3).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--episodes", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, value in measure(args.checkpoint, args.store, args.episodes).items():
        print(f"{name:28s} {value:.4g}")


if __name__ == "__main__":
    main()
