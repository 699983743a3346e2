"""Building a DINO-WM training run from a store: keys, split, normalizer, datasets, validation.

`setup_dino_wm` is called by `wm-train` (the edge) and returns what the one `Trainer` needs.
Validation reports one-step (teacher-forced) and multi-step (open-loop rollout) feature errors on
held-out episodes and saves decoded prediction strips as PNG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wm.data import DemoStore, SchemaError
from wm.data.dataset import WindowDataset
from wm.data.normalize import Normalizer
from wm.data.windows import split_episodes
from wm.dino_wm import DinoWorldModel, WorldModelConfig

log = logging.getLogger(__name__)

VAL_STEPS = 3  # open-loop steps for the multi-step validation error


@dataclass
class TrainSetup:
    model: torch.nn.Module
    train_set: WindowDataset
    val_set: WindowDataset | None
    normalizer: Normalizer
    model_config: dict[str, Any]
    val_fn: Any


def data_keys(store: DemoStore, image_key: str | None, proprio_key: str | None) -> tuple[str, str | None]:
    """The camera and proprioception keys to train on (the store's first of each kind by default)."""
    images = store.schema.keys_of_kind("image")
    proprios = store.schema.keys_of_kind("proprio")
    image_key = image_key or (images[0] if images else None)
    if image_key is None or image_key not in store.schema.keys:
        raise SchemaError(f"{store.path}: no camera key {image_key!r} to train on (image keys: {images})")
    proprio_key = proprio_key or (proprios[0] if proprios else None)
    if proprio_key is not None and proprio_key not in store.schema.keys:
        raise SchemaError(f"{store.path}: no proprioception key {proprio_key!r} (proprio keys: {proprios})")
    if "action" not in store.schema.keys:
        raise SchemaError(f"{store.path}: no 'action' key; the world model needs actions")
    return image_key, proprio_key


def prepare_data(
    store_path: str,
    image_key: str | None,
    proprio_key: str | None,
    val_ratio: float,
    seed: int,
    proprio_mode: str,
) -> tuple[str, str | None, dict[str, Any], list[int], list[int], Normalizer]:
    """Keys, their specs, the seeded episode split, and a normalizer fitted on the training episodes
    (actions min-max, proprioception `proprio_mode`)."""
    with DemoStore.open(store_path) as store:
        image_key, proprio_key = data_keys(store, image_key, proprio_key)
        train_eps, val_eps = split_episodes(store.n_episodes, val_ratio, seed)
        modes = {"action": "minmax"} | ({proprio_key: proprio_mode} if proprio_key else {})
        normalizer = Normalizer.fit(store, modes, episodes=train_eps)
        return image_key, proprio_key, dict(store.schema.keys), train_eps, val_eps, normalizer


def cached_features(store_path: str, encoder: Any, image_key: str) -> str:
    """The path of the frozen `encoder`'s feature cache of `image_key`, built or extended first; every
    model's cache lives beside its store, in `<store dir>/feature_cache/`."""
    from wm.feature_cache import build_feature_cache

    cache_root = Path(store_path).resolve().parent / "feature_cache"
    return str(build_feature_cache(store_path, encoder, image_key, cache_root))


def setup_dino_wm(
    store_path: str,
    model_cfg: dict[str, Any],
    *,
    image_key: str | None,
    proprio_key: str | None,
    val_ratio: float,
    seed: int,
    in_memory: bool,
    feature_cache: str = "auto",
) -> TrainSetup:
    """Everything a DINO-WM training run needs, from the store at `store_path`. With a frozen encoder
    and `feature_cache="auto"`, its patch features are computed once into a zarr cache beside the
    store (`<store dir>/feature_cache/`) and training reads those instead of images."""
    image_key, proprio_key, spec, train_eps, val_eps, normalizer = prepare_data(
        store_path, image_key, proprio_key, val_ratio, seed, proprio_mode="meanstd"
    )
    cfg_dict = {k: v for k, v in model_cfg.items() if k != "type"}
    cfg_dict.update(
        image_key=image_key,
        proprio_key=proprio_key or "proprio",
        action_key="action",
        image_size=spec[image_key].shape[:2],
        action_dim=int(np.prod(spec["action"].shape)),
        proprio_dim=int(np.prod(spec[proprio_key].shape)) if proprio_key else 0,
    )
    cfg = WorldModelConfig.from_dict(cfg_dict)
    model = DinoWorldModel(cfg, normalizer)
    data_path = store_path
    if not model.encoder.trainable and feature_cache == "auto":
        data_path = cached_features(store_path, model.encoder, image_key)
    window = model.window_spec(extra_steps=VAL_STEPS)
    train_set = WindowDataset(data_path, model.window_spec(), train_eps, in_memory=in_memory)
    val_set = WindowDataset(data_path, window, val_eps, in_memory=in_memory, train=False) if val_eps else None
    return TrainSetup(model, train_set, val_set, normalizer, cfg.to_dict(), make_val_fn(val_set))


def make_val_fn(val_set: WindowDataset | None, n_batches: int = 4, batch_size: int = 32) -> Any:
    """Validation on held-out episodes: one-step and VAL_STEPS-step feature errors, plus a PNG strip."""

    @torch.no_grad()
    def val_fn(model: DinoWorldModel, step: int, out_dir: Path) -> dict[str, float]:
        if val_set is None or len(val_set) == 0:
            return {}
        model.eval()
        device = next(model.parameters()).device
        rng = np.random.default_rng(0)  # the same windows every time: comparable numbers
        one, multi = [], []
        for b in range(n_batches):
            idx = rng.choice(len(val_set), size=min(batch_size, len(val_set)), replace=False)
            batch = {k: v.to(device) for k, v in val_set.get_batch(idx).items()}
            e1, em, strip = _errors(model, batch)
            one.append(e1)
            multi.append(em)
            if b == 0:
                path = Path(out_dir) / "val" / f"pred_{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(strip).save(path)
        model.train()
        return {"val_one_step_mse": float(np.mean(one)), f"val_{VAL_STEPS}_step_mse": float(np.mean(multi))}

    return val_fn


def _errors(model: DinoWorldModel, batch: dict[str, torch.Tensor]) -> tuple[float, float, np.ndarray]:
    c, T = model.cfg, model.cfg.n_hist
    z = model.encode(batch)
    acts = batch[c.action_key]
    acts = acts.reshape(acts.shape[0], -1, c.frameskip * c.action_dim)  # (B, F - 1, f*A)
    pred = model.predict({k: v[:, :T] for k, v in z.items()}, acts[:, :T])
    one = (pred["visual"] - z["visual"][:, 1 : T + 1]).pow(2).mean().item()
    z0 = {k: v[:, :T] for k, v in z.items()}
    if T > 1:
        z0["past_action"] = acts[:, : T - 1]
    roll = model.rollout(z0, acts[:, None, T - 1 : T - 1 + VAL_STEPS])  # leading (B, 1, VAL_STEPS)
    truth = z["visual"][:, T : T + VAL_STEPS]
    multi = (roll["visual"][:, 0] - truth).pow(2).mean().item()
    # Strip: real frames (top) and decoded open-loop predictions (bottom) for 4 windows.
    real = batch[c.image_key][:4, T : T + VAL_STEPS]  # (4, S, C, H, W)
    dec = model.decode({k: v[:4, 0] for k, v in roll.items()})  # (4, S, C, H, W)
    if real.ndim != 5:  # cached features: no pixels to compare with
        return one, multi, np.zeros((1, 1, 3), np.uint8)
    rows = [
        torch.cat(list(x.permute(0, 2, 3, 1)), dim=1) for pair in zip(real, dec, strict=True) for x in pair
    ]
    strip = (torch.cat(rows, dim=0).clamp(0, 1) * 255).byte().cpu().numpy()
    return one, multi, strip


def setup_diffusion(
    store_path: str,
    model_cfg: dict[str, Any],
    *,
    image_key: str | None,
    proprio_key: str | None,
    val_ratio: float,
    seed: int,
    in_memory: bool,
    feature_cache: str = "auto",
) -> TrainSetup:
    """A diffusion-policy training run (model types diffusion_unet / diffusion_transformer).

    With `obs.backbone=patch`, a frozen patch encoder (a pretrained DINOv2, say), one camera, no crop
    and `feature_cache="auto"`, the camera's patch features are computed once into the same cache
    the world model uses and training reads them; the policy still takes images at inference. A
    trainable encoder, random crops (they need pixels) or several cameras read images."""
    from policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig

    image_key, proprio_key, spec, train_eps, val_eps, normalizer = prepare_data(
        store_path, image_key, proprio_key, val_ratio, seed, proprio_mode="minmax"
    )
    cfg_dict = {k: v for k, v in model_cfg.items() if k != "type"}
    obs = dict(cfg_dict.get("obs", {}))
    obs.update(
        image_keys=obs.get("image_keys") or [image_key],
        image_size=spec[image_key].shape[:2],
        proprio_key=proprio_key,
        proprio_dim=int(np.prod(spec[proprio_key].shape)) if proprio_key else 0,
    )
    cfg_dict.update(obs=obs, action_key="action", action_dim=int(np.prod(spec["action"].shape)))
    cfg = DiffusionPolicyConfig.from_dict(cfg_dict)
    expected = "diffusion_" + cfg.denoiser
    if model_cfg["type"] != expected:
        raise ValueError(f"model type {model_cfg['type']!r} with denoiser {cfg.denoiser!r}; use {expected!r}")
    policy = DiffusionPolicy(cfg, normalizer)
    spec_w = policy.window_spec()
    data_path = _policy_feature_cache(policy, store_path, feature_cache)
    train_set = WindowDataset(data_path, spec_w, train_eps, in_memory=in_memory)
    val_set = WindowDataset(data_path, spec_w, val_eps, in_memory=in_memory, train=False) if val_eps else None
    return TrainSetup(policy, train_set, val_set, normalizer, cfg.to_dict(), make_policy_val_fn(val_set))


def _policy_feature_cache(policy: Any, store_path: str, feature_cache: str) -> str:
    """The store a policy trains from: the feature cache when it applies (see `setup_diffusion`)."""
    oc = policy.cfg.obs
    if feature_cache != "auto" or oc.backbone != "patch":
        return store_path
    encoders = [cam.encoder for cam in policy.obs_encoder.cameras.values()]
    if any(e.trainable for e in encoders):
        return store_path
    why = (
        "several cameras (the cache holds one)"
        if len(oc.image_keys) > 1
        else f"random crops to {oc.crop} need pixels (set model.obs.crop=null to train from the cache)"
        if oc.crop is not None and tuple(oc.crop) != tuple(oc.image_size)
        else None
    )
    if why is not None:
        log.info("feature cache not used: %s", why)
        return store_path
    return cached_features(store_path, encoders[0], oc.image_keys[0])


def make_policy_val_fn(val_set: WindowDataset | None, n_batches: int = 2, batch_size: int = 32) -> Any:
    """Validation for policies: error between sampled and demonstrated actions on held-out episodes
    (the executed part of the chunk, in raw action units)."""

    @torch.no_grad()
    def val_fn(policy: Any, step: int, out_dir: Path) -> dict[str, float]:
        if val_set is None or len(val_set) == 0:
            return {}
        policy.eval()
        device = next(policy.parameters()).device
        c = policy.cfg
        rng = np.random.default_rng(0)
        errs = []
        for _ in range(n_batches):
            idx = rng.choice(len(val_set), size=min(batch_size, len(val_set)), replace=False)
            batch = {k: v.to(device) for k, v in val_set.get_batch(idx).items()}
            obs = {k: batch[k] for k in (*c.obs.image_keys, c.obs.proprio_key) if k}
            gen = torch.Generator(device=device).manual_seed(0)
            pred = policy.predict_action_chunk(obs, generator=gen)  # (B, n_exec, Da)
            start = c.n_obs - 1
            truth = batch[c.action_key][:, start : start + c.n_action_exec]
            pad = batch[c.action_key + "_is_pad"][:, start : start + c.n_action_exec]
            err = (pred - truth).pow(2).mean(-1)[~pad]
            errs.append(err.mean().item())
        policy.train()
        return {"val_action_mse": float(np.mean(errs))}

    return val_fn
