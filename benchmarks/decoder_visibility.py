"""How well a DINO-WM checkpoint's video decoder draws what moves (the agent), not only the scene.

For each of the first `--episodes` episodes of a store: the background is the per-pixel median
frame of the episode (the agent moves, the scene does not); "agent pixels" are those that differ
from it by more than 0.1 in some channel. Two sets of latents are decoded with `model.decode`:
- encoded: every frame's own latent, `encode({image, proprio})` (visual and proprio),
- predicted: frame t's latent as the world model predicts it, a one-step `rollout` from the
  latent of frame t - frameskip with the true actions in between (what evaluation videos show).
For each set it prints:
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
from einops import rearrange

from wm.data import DemoStore
from wm.dino_wm import MOTION_THRESHOLD as THRESHOLD  # the training loss's "this pixel moved"
from wm.dino_wm import DinoWorldModel
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


def decoded_frames(model: DinoWorldModel, episode: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"encoded" | "predicted": (decoded, real)} frames (N, 3, H, W) of one episode's raw arrays."""
    io = model.io_spec
    key, f = io.image_keys[0], io.frameskip
    frames = torch.from_numpy(np.asarray(episode[key])).float() / 255.0
    frames = rearrange(frames, "t h w c -> t c h w")
    obs = {key: frames[None]}
    if io.proprio_key:
        obs[io.proprio_key] = torch.from_numpy(np.asarray(episode[io.proprio_key])).float()[None]
    z = model.encode(obs)  # leading (1, T)
    out = {"encoded": (model.decode(z)[0], frames)}
    T = frames.shape[0]
    if T > f:
        # Frame t from frame t - f: E = T - f one-frame histories, each with its f raw actions.
        actions = torch.from_numpy(np.asarray(episode[io.action_key])).float()  # (T, A)
        steps = torch.stack([actions[t : t + f].reshape(-1) for t in range(T - f)])  # (E, f*A)
        z0 = {k: rearrange(v[0, : T - f], "e ... -> e 1 ...") for k, v in z.items()}  # leading (E, 1)
        pred = model.rollout(z0, steps[:, None, None])  # leading (E, 1, 1)
        out["predicted"] = (model.decode({k: v[:, 0, 0] for k, v in pred.items()}), frames[f:])
    return out


@torch.no_grad()
def measure(model: DinoWorldModel, store: str, episodes: int) -> dict[str, dict[str, float]]:
    """Per latent set ("encoded", "predicted"): agent / background MSE, median centroid error, and
    the share of frames with the decoded agent within 3 px."""
    io = model.io_spec
    keys = [io.image_keys[0], io.action_key, *([io.proprio_key] if io.proprio_key else [])]
    stats: dict[str, dict[str, list]] = {}
    with DemoStore.open(store) as s:
        for i in range(min(episodes, s.n_episodes)):
            episode = s.get_episode(i, keys=keys)
            frames = torch.from_numpy(np.asarray(episode[io.image_keys[0]])).float() / 255.0
            background = rearrange(frames, "t h w c -> t c h w").median(0).values  # (C, H, W)
            for name, (decoded, real) in decoded_frames(model, episode).items():
                st = stats.setdefault(name, {"agent": [], "rest": [], "dist": []})
                decoded = decoded.clamp(0, 1)
                truth = (real - background).abs().amax(1) > THRESHOLD  # (N, H, W)
                err = (decoded - real).pow(2).mean(1)  # (N, H, W)
                st["agent"].append(err[truth].mean().item() if truth.any() else float("nan"))
                st["rest"].append(err[~truth].mean().item())
                drawn = (decoded - background).abs().amax(1) > THRESHOLD
                d = (centroid(truth) - centroid(drawn)).norm(dim=1)
                st["dist"].append(torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d))
    results = {}
    for name, st in stats.items():
        d = torch.cat(st["dist"])
        results[name] = {
            "agent_mse": float(np.nanmean(st["agent"])),
            "background_mse": float(np.mean(st["rest"])),
            "median_centroid_error_px": float(d.median()),
            "agent_drawn_within_3px": float((d <= 3).float().mean()),
            "frames": float(d.numel()),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--episodes", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.checkpoint, controller="mpc").model
    for name, values in measure(model, args.store, args.episodes).items():
        print(f"{name}:")
        for key, value in values.items():
            print(f"  {key:28s} {value:.4g}")


if __name__ == "__main__":
    main()
