"""The diffusion policies' registry entries (UNet and transformer denoisers): their config from a
store, their validation, and their controller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.chunking import ChunkPolicy
from policies.diffusion.noise import check_reaches_noise
from policies.diffusion.policy import DiffusionPolicy, DiffusionPolicyConfig, inference_policy
from wm.data.dataset import WindowDataset
from wm.options import is_whole
from wm.registry import ModelEntry, TrainContext

# inference settings `wm-eval policy.*` may change at load time
OVERRIDABLE = (
    "sampler",
    "sampler_steps",
    "precision",
    "noise.edm_solver",
    "temporal_ensemble",
    "inpaint_guidance",
)
CROP_SHARE = 0.875  # crop="auto": 7/8 of each side, Diffusion Policy's and LeRobot's 84 of 96


def crop_for(crop: Any, size: tuple[int, int]) -> list[int] | None:
    """The random-crop size for frames of `size` (H, W): "auto" -> 7/8 of each side; None -> no crop;
    [h, w] -> itself, n -> [n, n]; refused in one line when it does not fit the store's frames, or is
    none of these (the text "12" was split into a 1x2 crop, 8.7 cut to 8, 84 a TypeError)."""
    if crop is None:
        return None
    if crop == "auto":
        return [max(1, round(CROP_SHARE * s)) for s in size]
    if is_whole(crop):
        crop = [crop, crop]
    if isinstance(crop, str) or not (len(crop) == 2 and all(is_whole(c) for c in crop)):
        raise ValueError(
            f"model.obs.crop must be auto, null, a size n (n x n) or [h,w] in whole pixels, got {crop!r}"
        )
    h, w = (int(c) for c in crop)
    if not (0 < h <= size[0] and 0 < w <= size[1]):
        raise ValueError(
            f"model.obs.crop=[{h},{w}] does not fit the store's {size[0]}x{size[1]} frames; use "
            "model.obs.crop=auto (7/8 of the frame), null (no crop) or a smaller [h,w]"
        )
    return [h, w]


def configurer(denoiser: str) -> Any:
    """`configure` for the entry of one denoiser: the user's options completed with the store's
    cameras (the chosen one unless `obs.image_keys` lists several), image size and dims."""

    def configure(options: dict[str, Any], ctx: TrainContext) -> dict[str, Any]:
        given = options.get("denoiser", denoiser)
        if given != denoiser:
            raise ValueError(
                f"model type diffusion_{denoiser} with denoiser {given!r}; use diffusion_{given}"
            )
        check_reaches_noise(options.get("noise", {}))
        shapes = ctx.key_shapes
        obs = dict(options.get("obs", {}))
        keys = ctx.cameras(obs.get("image_keys"))
        size = ctx.camera_size(keys)  # the chosen cameras' (one size, or one line saying otherwise)
        obs.update(
            image_keys=keys,
            image_size=size,
            crop=crop_for(obs.get("crop", "auto"), size),
            proprio_key=ctx.proprio_key,
            proprio_dim=int(np.prod(shapes[ctx.proprio_key])) if ctx.proprio_key else 0,
        )
        return {
            **options,
            "denoiser": denoiser,
            "obs": obs,
            "action_key": "action",
            "action_dim": int(np.prod(shapes["action"])),
        }

    return configure


def validation(
    policy: DiffusionPolicy,
    data_path: str,
    episodes: list[int],
    in_memory: bool,
    frames_from: str | None = None,
    n_batches: int = 2,
) -> Any:
    """Error between sampled and demonstrated actions on held-out episodes (the executed part of the
    chunk, in raw action units)."""
    val_set = WindowDataset(data_path, policy.window_spec(), episodes, in_memory=in_memory, train=False)

    @torch.no_grad()
    def val_fn(policy: DiffusionPolicy, step: int, out_dir: Path) -> dict[str, float]:
        if len(val_set) == 0:
            return {}
        device = next(policy.parameters()).device
        c = policy.cfg
        rng = np.random.default_rng(0)
        errs = []
        for _ in range(n_batches):
            idx = rng.choice(len(val_set), size=min(32, len(val_set)), replace=False)
            batch = {k: v.to(device) for k, v in val_set.get_batch(idx).items()}
            gen = torch.Generator(device=device).manual_seed(0)
            pred = policy.sample_actions(batch, generator=gen)  # (B, n_exec, Da)
            start = c.n_obs - 1
            truth = batch[c.action_key][:, start : start + c.n_action_exec]
            pad = batch[c.action_key + "_is_pad"][:, start : start + c.n_action_exec]
            errs.append((pred - truth).pow(2).mean(-1)[~pad].mean().item())
        return {"val_action_mse": float(np.mean(errs))}

    val_fn.val_set = val_set  # the windows it validates on: setup_training says when there are none
    return val_fn


def chunk_policy(policy: DiffusionPolicy) -> ChunkPolicy:
    return ChunkPolicy(policy, policy.cfg.temporal_ensemble)


def _entry(denoiser: str, description: str) -> ModelEntry:
    return ModelEntry(
        config_type=DiffusionPolicyConfig,
        build=DiffusionPolicy,
        configure=configurer(denoiser),
        controllers=("policy",),
        description=description,
        proprio_norm="minmax",
        validation=validation,
        val_metrics=("val_action_mse",),
        policy=chunk_policy,
        inference=inference_policy,
        overridable=OVERRIDABLE,
    )


UNET = _entry("unet", "Diffusion Policy with a FiLM 1D temporal UNet denoiser")
TRANSFORMER = _entry("transformer", "Diffusion Policy with a transformer denoiser")
