"""The DINO-WM world model's registry entry: its config from a store, and its validation.

Validation reports one-step (teacher-forced) and multi-step (open-loop rollout) feature errors on
held-out episodes and saves decoded prediction strips as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wm.data import DemoStore
from wm.data.dataset import WindowDataset, WithFrames, frames_key
from wm.dino_wm import DinoWorldModel, WorldModelConfig
from wm.registry import ModelEntry, TrainContext

VAL_STEPS = 3  # open-loop steps for the multi-step validation error


def configure(options: dict[str, Any], ctx: TrainContext) -> dict[str, Any]:
    """The user's options completed with the store's keys and sizes; a frameskip no episode of the store
    is longer than is refused here, before the model (whose action embedding grows with it) is built."""
    shapes = ctx.key_shapes
    frameskip = options.get("frameskip", WorldModelConfig.frameskip)
    if isinstance(frameskip, int) and not isinstance(frameskip, bool):
        with DemoStore.open(ctx.store) as store:
            longest = int(store.episode_lengths().max()) if store.n_episodes else None
        if longest is not None and frameskip >= longest:
            raise ValueError(
                f"{ctx.store}: model.frameskip={frameskip} is not shorter than its longest episode "
                f"({longest} steps): a model frame is frameskip raw steps, so no window would reach a next "
                "frame; lower model.frameskip"
            )
    return {
        **options,
        "image_key": ctx.image_key,
        "proprio_key": ctx.proprio_key or "proprio",
        "action_key": "action",
        "image_size": shapes[ctx.image_key][:2],
        "action_dim": int(np.prod(shapes["action"])),
        "proprio_dim": int(np.prod(shapes[ctx.proprio_key])) if ctx.proprio_key else 0,
    }


def validation(
    model: DinoWorldModel,
    data_path: str,
    episodes: list[int],
    in_memory: bool,
    frames_from: str | None = None,
    n_batches: int = 4,
) -> Any:
    """Validation on held-out episodes: one-step and VAL_STEPS-step feature errors, plus a PNG strip
    (trained from cached features, its real frames come from `frames_from`, the store)."""
    # windows inside the episodes: the errors below are not masked where a window is padded (past the
    # end, the multi-step error scored the rollout against the last frame repeated)
    spec = model.window_spec(extra_steps=VAL_STEPS - 1, padding=False)  # (a rollout of 1 + extra steps)
    val_set: Any = WindowDataset(data_path, spec, episodes, in_memory=in_memory, train=False)
    if frames_from is not None:  # the frames the strip compares with, beside the cached features
        c = model.cfg
        offsets = spec.offsets[c.image_key][c.n_hist : c.n_hist + VAL_STEPS]
        val_set = WithFrames(val_set, frames_from, c.image_key, offsets, in_memory=False)

    @torch.no_grad()
    def val_fn(model: DinoWorldModel, step: int, out_dir: Path) -> dict[str, float]:
        if len(val_set) == 0:
            return {}
        device = next(model.parameters()).device
        rng = np.random.default_rng(0)  # the same windows every time: comparable numbers
        one, multi = [], []
        for b in range(n_batches):
            idx = rng.choice(len(val_set), size=min(32, len(val_set)), replace=False)
            batch = {k: v.to(device) for k, v in val_set.get_batch(idx).items()}
            e1, em, strip = _errors(model, batch)
            one.append(e1)
            multi.append(em)
            if b == 0 and strip is not None:
                path = Path(out_dir) / "val" / f"pred_{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(strip).save(path)
        return {"val_one_step_mse": float(np.mean(one)), f"val_{VAL_STEPS}_step_mse": float(np.mean(multi))}

    val_fn.val_set = val_set  # the windows it validates on: setup_training says when there are none
    return val_fn


def _errors(model: DinoWorldModel, batch: dict[str, torch.Tensor]) -> tuple[float, float, np.ndarray | None]:
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
    real = batch[c.image_key][:4, T : T + VAL_STEPS]  # (4, S, C, H, W)
    if real.ndim != 5:  # cached features: the frames beside them, if validation has the store
        real = batch.get(frames_key(c.image_key))
        if real is None:
            return one, multi, None
        real = real[:4]
    # Strip: real frames (top) and decoded open-loop predictions (bottom) for 4 windows.
    dec = model.decode({k: v[:4, 0] for k, v in roll.items()})  # (4, S, C, H, W)
    rows = [
        torch.cat(list(x.permute(0, 2, 3, 1)), dim=1) for pair in zip(real, dec, strict=True) for x in pair
    ]
    return one, multi, (torch.cat(rows, dim=0).clamp(0, 1) * 255).byte().cpu().numpy()


def inference_model(cfg: WorldModelConfig, normalizer: Any) -> DinoWorldModel:
    """The model rebuilt from a checkpoint: the encoder's structure from the config, its weights (like
    all others) from the checkpoint's state dict, so the pretrained file need not be there any more."""
    return DinoWorldModel(cfg, normalizer, load_encoder_weights=False)


ENTRY = ModelEntry(
    config_type=WorldModelConfig,
    build=DinoWorldModel,
    inference=inference_model,
    configure=configure,
    controllers=("mpc",),
    description="DINO-WM style world model: patch encoder, ViT predictor, decoder; planned over by MPC",
    proprio_norm="meanstd",
    validation=validation,
    val_metrics=("val_one_step_mse", f"val_{VAL_STEPS}_step_mse"),
    overridable=("cost_all_frames", "cost_proprio_weight", "predictor_precision"),
)
