"""UWM's registry entry: its config from a store (and its latent codec: the store's default
autoencoder, trained first when none is cached), validation, and its controller `UWMPolicy`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.chunking import ChunkPolicy
from policies.diffusion.noise import check_reaches_noise
from wm.data.dataset import WindowDataset
from wm.data.normalize import Normalizer
from wm.latents import LatentConfig, build_codec, latent_config_from_source
from wm.options import check_not_derived, is_whole
from wm.registry import ModelEntry, TrainContext
from wm.training import check_windows
from wm.uwm import UWM, UWMConfig
from wm.uwm_net import check_patch

OVERRIDABLE = ("sampler", "sampler_steps", "precision", "noise.edm_solver", "temporal_ensemble")


def latent_config(options: dict[str, Any], ctx: TrainContext, image_keys: list[str]) -> dict[str, Any]:
    """The codec's full config: `source: auto` (the default) trains the store's default autoencoder of
    the cameras `image_keys` first (`steps`, `batch_size`: its training), or reuses the one cached for
    that store and those cameras;
    `source: autoencoder | sd_vae | encoder` with `path` (and for `encoder` its `name`) reads the
    structure from those files; a config that already holds its structure (a checkpoint's) is kept."""
    given = dict(options or {})
    source = given.pop("source", "auto")
    if source == "auto":
        from wm.autoencoder import DEFAULT_BATCH, DEFAULT_STEPS, default_autoencoder

        steps, batch = given.pop("steps", DEFAULT_STEPS), given.pop("batch_size", DEFAULT_BATCH)
        # int() would cut steps=2.5 to 2 and take batch_size=true as 1: whole numbers >= 1 only
        wrong = [
            f"model.latent.{name}={v!r} is not a whole number >= 1"
            for name, v in (("steps", steps), ("batch_size", batch))
            if not (is_whole(v) and v >= 1)
        ]
        if wrong:
            raise ValueError("; ".join(wrong))
        steps, batch = int(steps), int(batch)
        if given:
            raise ValueError(
                f"model.latent.source=auto takes only steps= and batch_size=, got {sorted(given)}"
            )
        run = default_autoencoder(
            ctx.store, image_keys, steps=steps, batch_size=batch, in_memory=ctx.in_memory, log=print
        )
        return latent_config_from_source("autoencoder", str(run)).to_dict()
    try:  # already complete (a checkpoint's config)
        return LatentConfig.from_dict({"source": source, **given}).to_dict()
    except (TypeError, ValueError):
        pass
    if "path" not in given:
        raise ValueError(
            f"model.latent.source={source} needs +model.latent.path= (its checkpoint or files), "
            f"got {sorted(given) or 'no other option'}"
        )
    return latent_config_from_source(source, **given).to_dict()


def configure(options: dict[str, Any], ctx: TrainContext) -> dict[str, Any]:
    """The user's options completed with the store's camera (or the `image_keys` listed: each gets a
    history and a predicted future), image size, proprio and action dims, and the latent codec's config
    and latent shape."""
    shapes = ctx.key_shapes
    keys = ctx.cameras(options.get("image_keys"))
    size = ctx.camera_size(keys)
    derived = {
        "image_keys": keys,
        "image_size": size,
        "proprio_key": ctx.proprio_key,
        "proprio_dim": int(np.prod(shapes[ctx.proprio_key])) if ctx.proprio_key else 0,
        "action_key": "action",
        "action_dim": int(np.prod(shapes["action"])),
    }
    latent = options.get("latent") or {}
    if not isinstance(latent, Mapping):  # `.get` of a str was an AttributeError (a bug's traceback)
        raise ValueError(
            f"model.latent is a group of options, got {latent!r}: give model.latent.source={latent} "
            "(and +model.latent.path=...)"
        )
    check_not_derived(options, derived)  # before the default autoencoder trains (minutes)
    check_reaches_noise(options.get("noise", {}))
    # before it too: the config but its codec, and its windows in the store's episodes (setup_training
    # checks the training episodes' when the config is complete)
    unbuilt = UWMConfig.from_dict({**options, **derived, "latent": {}})
    check_windows(ctx.store, unbuilt.window_spec(), None)
    if latent.get("source", "auto") == "auto":  # the default autoencoder's grid
        from wm.autoencoder import AutoencoderConfig
        from wm.autoencoder import configure as autoencoder_options

        f = AutoencoderConfig.from_dict(autoencoder_options({"image_keys": keys}, ctx)).downsample
        check_patch(unbuilt.net.patch, (size[0] // f, size[1] // f))
    latent = latent_config(latent, ctx, keys)
    codec = build_codec(LatentConfig.from_dict(latent), load_weights=False)
    return {**options, **derived, "latent": latent, "latent_shape": tuple(codec.latent_shape(*size))}


def validation(
    model: UWM,
    data_path: str,
    episodes: list[int],
    in_memory: bool,
    frames_from: str | None = None,
    n_batches: int = 2,
) -> Any:
    """On held-out windows: the policy's executed-action error (raw units) and forward dynamics' latent
    error with the true actions, against copying the current frame."""
    val_set = WindowDataset(data_path, model.window_spec(), episodes, in_memory=in_memory, train=False)

    @torch.no_grad()
    def val_fn(model: UWM, step: int, out_dir: Path) -> dict[str, float]:
        if len(val_set) == 0:
            return {}
        c, device = model.cfg, next(model.parameters()).device
        rng = np.random.default_rng(0)
        act, fwd, copy = [], [], []
        for _ in range(n_batches):
            idx = rng.choice(len(val_set), size=min(32, len(val_set)), replace=False)
            batch = {k: v.to(device) for k, v in val_set.get_batch(idx).items()}
            gen = torch.Generator(device=device).manual_seed(0)
            frames = model.views(batch)  # (B, n_obs + F, V, C, h, w)
            obs = {k: batch[k][:, : c.n_obs] for k in c.image_keys}
            if c.proprio_key:
                obs[c.proprio_key] = batch[c.proprio_key]
            truth = batch[c.action_key]
            ok = ~batch[c.action_key + "_is_pad"][:, : c.n_action_exec]
            pred = model.sample_actions(obs, generator=gen)
            act.append((pred - truth[:, : c.n_action_exec]).pow(2).mean(-1)[ok].mean().item())
            future, valid = frames[:, c.n_obs :], ~batch[c.image_keys[0] + "_is_pad"][:, c.n_obs :]
            pred_v = model.forward_dynamics(obs, truth, generator=gen)
            fwd.append((pred_v - future).pow(2).flatten(2).mean(-1)[valid].mean().item())
            still = frames[:, c.n_obs - 1 : c.n_obs]  # the current frame, as a prediction of every future one
            copy.append((still - future).pow(2).flatten(2).mean(-1)[valid].mean().item())
        return {
            "val_action_mse": float(np.mean(act)),
            "val_forward_latent_mse": float(np.mean(fwd)),
            "val_copy_latent_mse": float(np.mean(copy)),
        }

    val_fn.val_set = val_set  # the windows it validates on: setup_training says when there are none
    return val_fn


class UWMPolicy(ChunkPolicy):
    """`ChunkPolicy` of a UWM whose preview (evaluation videos) is the model's predicted future: forward
    dynamics of the last chunk, decoded, at the first future step, of its first camera (the one the
    videos show beside it)."""

    def __init__(self, model: UWM, seed: int | None = 0) -> None:
        super().__init__(model, model.cfg.temporal_ensemble, seed)
        # the preview's own noise: recording videos must not change the actions (their generator's draws)
        self._preview_generator = torch.Generator(device=self._generator.device)
        if seed is None:
            self._preview_generator.seed()
        else:
            self._preview_generator.manual_seed(seed + 1)
        c = model.cfg
        camera = f" ({c.image_keys[0]})" if len(c.image_keys) > 1 else ""
        self.preview_label = f"UWM: predicted t+{c.future[0]}{camera}"
        self._last: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None

    def reset(self) -> None:
        super().reset()
        self._last = None

    def _sample(self, **guidance: Any) -> torch.Tensor:
        full = guidance.pop("full", False)
        inputs = self.history.inputs()
        chunk = self._sample_from(inputs, full=True, **guidance)  # (E, horizon, Da)
        self._last = (inputs, chunk)
        return chunk if full else chunk[:, : self.model.cfg.n_action_exec]

    def preview(self) -> np.ndarray | None:
        """(E, H, W, 3) uint8: the frame the model expects `future[0]` steps after its last chunk began
        (None before the first chunk, or for a codec that cannot decode)."""
        if self._last is None or not self.model.codec.can_decode:
            return None
        obs, chunk = self._last
        latents = self.model.forward_dynamics(obs, chunk, generator=self._preview_generator)
        frame = self.model.decode(latents[:, :1, :1])[:, 0, 0]  # (E, 3, H, W)
        return (frame.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def inference_model(cfg: UWMConfig, normalizer: Normalizer) -> UWM:
    """The model rebuilt from a checkpoint: the codec's structure from the config, its weights (like all
    others) from the checkpoint's state dict."""
    return UWM(cfg, normalizer, load_codec=False)


ENTRY = ModelEntry(
    config_type=UWMConfig,
    build=UWM,
    configure=configure,
    controllers=("policy",),
    description="Unified world model: one video-action diffusion transformer (policy, dynamics, video)",
    proprio_norm="minmax",
    validation=validation,
    val_metrics=("val_action_mse", "val_forward_latent_mse", "val_copy_latent_mse"),
    policy=UWMPolicy,
    inference=inference_model,
    overridable=OVERRIDABLE,
    action_free=True,
)
