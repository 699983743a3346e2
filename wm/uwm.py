"""Unified world model (UWM, Zhu et al. 2025): one diffusion transformer over an action chunk and future
frame latents, each modality at its own noise level. The noise levels choose what it does:

    policy(obs)                      actions denoised, frames absent
    forward_dynamics(obs, actions)   actions given clean, frames denoised
    inverse_dynamics(obs, frames)    frames given clean, actions denoised
    predict_video(obs)               actions absent, frames denoised
    sample_joint(obs)                both denoised together

"Absent" is one and the same thing in training and sampling (`absent`): the modality's input is pure
noise and its timestep the schedule's last, T - 1. "Clean" is timestep 0 (`corrupt` at t = 0). In
training each modality's timestep is drawn on its own: absent with probability `p_absent`, clean with
`p_clean`, else uniform. A sample without actions (action-free video; `has_action` False) always has
its actions absent and adds nothing to the action loss; each modality's loss is averaged over the
samples that have it (and its valid, unpadded steps).

Noise: the diffusion policies' schedule, sample prediction and samplers (`policies.diffusion.noise`);
the samplers run on one modality (or both, flattened together) through `_ModeNet`, which puts the
other modality's fixed input and timestep back in. Action predictions are clipped to the normalized
range; latents are not.

Frames are latents of a frozen image codec (`wm.latents.LatentCodec`, a submodule whose weights are
saved with the model), one codec for all V cameras (`image_keys`, one frame size). Training reads
them from the feature cache; inference encodes camera frames. Latent tensors are (B, T, V, C, h, w):
each step's latents of every camera, in the order of `image_keys`.

Batch keys for `compute_loss` (`window_spec()`), for each camera `<image>`:
    <image>            (B, n_obs + F, P, C) cached latents (or (B, n_obs + F, 3, H, W) frames in [0, 1]);
                       the first n_obs are the observation history, the rest the future frames
    <image>_is_pad     (B, n_obs + F) bool: future frames past the episode's end are left out of the loss
                       (the cameras share their steps: the first camera's is read)
    <proprio>          (B, n_obs, Dp) raw (optional; `<proprio>_is_pad` all True where a store has none)
    action             (B, horizon, Da) raw, from the current step on; action_is_pad (B, horizon)
    has_action         (B,) bool, optional (default all True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from policies.base import check_previous, last_steps
from policies.diffusion.noise import (
    SAMPLERS,
    Diffusion,
    Generators,
    Inpaint,
    NoiseConfig,
    check_ddim_steps,
    inpaint_guide,
    masked_mean,
    randn,
)
from wm.checks import check_finite, check_unit_frames
from wm.data.normalize import Normalizer
from wm.data.windows import WindowSpec
from wm.latents import LatentCodec, LatentConfig, build_codec
from wm.options import check_numbers, sub_config
from wm.precision import check_precision, resolve_precision
from wm.spec import IOSpec
from wm.uwm_net import DiTConfig, UWMNet


@dataclass(frozen=True)
class UWMConfig:
    """The cameras `image_keys` (a history and a predicted future of each) at `image_size`, each encoded
    by the codec `latent` (a `LatentConfig` dict) to `latent_shape` (C, h, w). Observations: `n_obs`
    steps up to the current one; actions: `horizon` steps from the current one, `n_action_exec`
    executed per chunk; predicted frames at `future` steps after the current one (inside the chunk by
    default). `shift`: per-sample augmentation, a random translation of each window's latents by up to
    `shift` cells (all its frames and cameras alike)."""

    image_keys: tuple[str, ...] = ("image",)
    image_size: tuple[int, int] = (64, 64)
    latent: dict[str, Any] = field(default_factory=dict)
    latent_shape: tuple[int, int, int] = (4, 16, 16)
    proprio_key: str | None = None
    proprio_dim: int = 0
    action_key: str = "action"
    action_dim: int = 2
    n_obs: int = 2
    horizon: int = 16
    n_action_exec: int = 8
    future: tuple[int, ...] = (8, 16)
    net: DiTConfig = field(default_factory=DiTConfig)
    noise: NoiseConfig = field(default_factory=lambda: NoiseConfig(prediction_type="sample"))
    p_absent: float = 0.1
    p_clean: float = 0.1
    video_weight: float = 1.0
    shift: int = 1
    sampler: str = "edm"
    sampler_steps: int = 3
    temporal_ensemble: float | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model")
        if isinstance(self.net, dict):
            object.__setattr__(self, "net", sub_config(DiTConfig, self.net, "model.net"))
        if isinstance(self.noise, dict):
            noise = {"prediction_type": "sample", **self.noise}
            object.__setattr__(self, "noise", sub_config(NoiseConfig, noise, "model.noise"))
        for name in ("image_size", "latent_shape", "future"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        keys = (self.image_keys,) if isinstance(self.image_keys, str) else tuple(self.image_keys)
        object.__setattr__(self, "image_keys", keys)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"image_keys must name one or more distinct cameras, got {list(keys)}")
        if self.noise.prediction_type != "sample":
            raise ValueError("UWM predicts the clean sample: model.noise.prediction_type must be 'sample'")
        if min(self.action_dim, self.n_obs, self.horizon, self.n_action_exec) < 1:
            raise ValueError("action_dim, n_obs, horizon and n_action_exec must be >= 1")
        if self.n_action_exec > self.horizon:
            raise ValueError(f"n_action_exec {self.n_action_exec} > horizon {self.horizon}")
        if not self.future or min(self.future) < 1 or len(set(self.future)) != len(self.future):
            raise ValueError(f"future must list distinct steps >= 1 after the current one, got {self.future}")
        if not (0 <= self.p_absent and 0 <= self.p_clean and self.p_absent + self.p_clean < 1):
            raise ValueError(f"p_absent {self.p_absent} and p_clean {self.p_clean} must be >= 0 with sum < 1")
        if self.video_weight < 0 or self.shift < 0:
            raise ValueError("video_weight and shift must be >= 0")
        if self.sampler not in SAMPLERS or self.sampler == "consistency" or self.sampler_steps < 1:
            raise ValueError(f"sampler must be ddpm, ddim or edm with sampler_steps >= 1, got {self.sampler}")
        check_ddim_steps(self.sampler, self.sampler_steps, self.noise)
        if (self.proprio_key is None) != (self.proprio_dim == 0):
            raise ValueError(f"proprio_key {self.proprio_key!r} and proprio_dim {self.proprio_dim} disagree")
        check_precision(self.precision, allow_auto=True)

    def window_spec(self) -> WindowSpec:
        """Frames at -(n_obs-1)..0 then the future steps; proprio at the observation steps; actions 0 ..
        horizon-1; windows may pad n_obs - 1 steps before an episode and, after it, n_action_exec - 1
        past the last action plus the future frames that reach beyond the chunk (they are left out of
        the loss when padded: measured from them, an episode's last steps were never the current one)
        (known from the config alone: training checks them against the store before any work)."""
        obs = tuple(range(-(self.n_obs - 1), 1))
        offsets = {k: obs + self.future for k in self.image_keys} | {
            self.action_key: tuple(range(self.horizon))
        }
        if self.proprio_key:
            offsets[self.proprio_key] = obs
        beyond = max(0, max(self.future) - (self.horizon - 1))  # future frames past the last action
        after = self.n_action_exec - 1 + beyond
        return WindowSpec(offsets, max_pad_before=self.n_obs - 1, max_pad_after=after)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UWMConfig:
        if "image_key" in d:  # written before several cameras: one camera
            d = {k: v for k, v in d.items() if k != "image_key"} | {"image_keys": [d["image_key"]]}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown uwm option(s) {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class _Mode:
    """The sampler's `cond` for one mode: which modality the sampled x is ("action", "frames" or
    "joint": both flattened), the other modality's fixed input and timestep, and the observation."""

    x: str
    obs: Tensor
    proprio: Tensor | None
    other: Tensor | None = None
    t_other: Tensor | None = None


class _ModeNet(nn.Module):
    """`net(x_t, t, cond: _Mode)` for `Diffusion`: the UWM network seen as a denoiser of one modality.
    It clips the action estimate (not the latents), so every sampler steps from the clipped estimate:
    for ddim that is the Euler step EDM takes, not diffusers' DDIM, whose eps stays unclipped."""

    def __init__(self, net: UWMNet, action_shape: tuple[int, int], clip: float | None) -> None:
        super().__init__()
        self.net, self.action_shape, self.clip = net, action_shape, clip

    def forward(self, x: Tensor, t: Tensor, m: _Mode) -> Tensor:
        B = x.shape[0]
        if m.x == "action":
            a, _ = self.net(x, t, m.other, m.t_other, m.obs, m.proprio)
            return self._clip(a)
        if m.x == "frames":
            return self.net(m.other, m.t_other, x, t, m.obs, m.proprio)[1]
        n_a = self.action_shape[0] * self.action_shape[1]
        acts = x[:, :n_a].reshape(B, *self.action_shape)
        frames = x[:, n_a:].reshape(B, *self.net.frame_shape)
        a, v = self.net(acts, t, frames, t, m.obs, m.proprio)
        return torch.cat([self._clip(a).reshape(B, -1), v.reshape(B, -1)], dim=1)

    def _clip(self, a: Tensor) -> Tensor:
        return a if self.clip is None else a.clamp(-self.clip, self.clip)


class UWM(nn.Module):
    """The model: `compute_loss` for the one trainer, the five modes, and `sample_actions` (a
    `policies.chunking.ChunkModel`, so `ChunkPolicy` makes it a `Policy`). Call `.eval()` to sample."""

    row_generators = True  # every mode takes one generator per row (`policies.diffusion.noise.randn`)

    def __init__(self, cfg: UWMConfig, normalizer: Normalizer, load_codec: bool = True) -> None:
        super().__init__()
        self.cfg, self.normalizer = cfg, normalizer
        self.codec: LatentCodec = build_codec(LatentConfig.from_dict(cfg.latent), load_weights=load_codec)
        shape = tuple(self.codec.latent_shape(*cfg.image_size))
        if shape != cfg.latent_shape:
            raise ValueError(f"the latent codec gives {shape} latents, the config says {cfg.latent_shape}")
        net = UWMNet(
            cfg.net,
            cfg.action_dim,
            cfg.horizon,
            cfg.latent_shape,
            len(cfg.future),
            cfg.n_obs,
            cfg.proprio_dim,
            len(cfg.image_keys),
        )
        clip = cfg.noise.clip_range if cfg.noise.clip_sample else None
        noise = dataclasses.replace(cfg.noise, clip_sample=False)  # _ModeNet clips the actions only
        self.diffusion = Diffusion(_ModeNet(net, (cfg.horizon, cfg.action_dim), clip), noise)
        self.sampler, self.sampler_steps = cfg.sampler, cfg.sampler_steps

    @property
    def net(self) -> UWMNet:
        return self.diffusion.net.net

    @property
    def model_type(self) -> str:
        return "uwm"

    @property
    def precision(self) -> str:
        return resolve_precision(self.cfg.precision, self.diffusion.betas.device)

    @property
    def absent_t(self) -> int:
        """The timestep that marks a modality absent, in training and in every mode: the schedule's last."""
        return self.cfg.noise.num_train_steps - 1

    @property
    def io_spec(self) -> IOSpec:
        c = self.cfg
        return IOSpec(
            image_keys=c.image_keys,
            image_size=c.image_size,
            proprio_key=c.proprio_key,
            proprio_dim=c.proprio_dim,
            action_dim=c.action_dim,
            action_key=c.action_key,
            history=c.n_obs,
        )

    def window_spec(self) -> WindowSpec:
        """The config's (`UWMConfig.window_spec`)."""
        return self.cfg.window_spec()

    def feature_cache_source(self) -> tuple[nn.Module, tuple[str, ...]]:
        """Latents of every camera are computed once into the feature cache by the frozen codec."""
        return self.codec, self.cfg.image_keys

    # ------------------------------------------------------------------ inputs
    def latents(self, x: Tensor, key: str) -> Tensor:
        """Camera `key`'s frames (B, T, 3, H, W) in [0, 1] or cached latent tokens (B, T, P, C) ->
        latents (B, T, C, h, w)."""
        c = self.cfg
        C, h, w = c.latent_shape
        if x.ndim == 4 and x.shape[-2:] == (h * w, C):
            return rearrange(x.float(), "b t (h w) c -> b t c h w", h=h, w=w)
        if x.ndim == 5 and x.shape[2] == 3:
            if not x.is_floating_point():
                raise ValueError(
                    f"{key!r} frames are {x.dtype}: expected float frames in [0, 1] "
                    "(convert uint8 frames with .float() / 255)"
                )
            if tuple(x.shape[-2:]) != c.image_size:
                raise ValueError(
                    f"{key!r} frames are {tuple(x.shape[-2:])}; the model was trained on {c.image_size}"
                )
            if not self.training:  # (training reads the store's frames, in [0, 1] by construction)
                check_unit_frames(x, key)
            B, T = x.shape[:2]
            z = self.codec.encode(rearrange(x.float(), "b t c h w -> (b t) c h w"))
            return rearrange(z, "(b t) c h w -> b t c h w", b=B, t=T)
        raise ValueError(
            f"{key!r} is {tuple(x.shape)}: expected frames (B, T, 3, {c.image_size[0]}, "
            f"{c.image_size[1]}) or cached latents (B, T, {h * w}, {C})"
        )

    def views(self, data: dict[str, Tensor], steps: int | None = None) -> Tensor:
        """Every camera's frames or cached latents in `data` (a batch or an observation, values (B, T,
        ...)) -> latents (B, T, V, C, h, w), or of the last `steps` steps (the first repeated when T is
        shorter)."""
        missing = [k for k in self.cfg.image_keys if k not in data]
        if missing:
            raise KeyError(f"the observation has no camera(s) {missing} (keys: {sorted(data)})")
        device = self.diffusion.betas.device
        out = []
        for key in self.cfg.image_keys:
            z = self.latents(data[key].to(device), key)
            out.append(z if steps is None else last_steps(z, steps))
        sizes = {k: z.shape[:2] for k, z in zip(self.cfg.image_keys, out, strict=True)}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"the cameras' (batch, steps) differ: { ({k: tuple(v) for k, v in sizes.items()}) }"
            )
        return torch.stack(out, dim=2)

    def observation(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """obs values (B, T, ...) -> observation latents (B, n_obs, V, C, h, w) and normalized proprio
        (B, n_obs, Dp) (None without proprio); the last n_obs steps, the first repeated when T < n_obs.
        A batch size that differs between keys, or a NaN or inf (a NaN action would reach the robot), is
        one clear error."""
        c = self.cfg
        device = self.diffusion.betas.device
        z = self.views(obs, c.n_obs)
        check_finite(z, f"the observation's camera(s) {list(c.image_keys)}")
        if not c.proprio_key:
            return z, None
        if c.proprio_key not in obs:
            raise KeyError(f"the observation has no proprioception {c.proprio_key!r} (keys: {sorted(obs)})")
        raw = obs[c.proprio_key]
        if raw.ndim != 3 or raw.shape[-1] != c.proprio_dim or raw.shape[0] != z.shape[0]:
            raise ValueError(
                f"proprioception {c.proprio_key!r} is {tuple(raw.shape)}: expected (B, T, {c.proprio_dim}) "
                f"with B = {z.shape[0]}, the cameras' batch"
            )
        p = self.normalizer.normalize(c.proprio_key, last_steps(raw.to(device).float(), c.n_obs))
        check_finite(p, f"proprioception {c.proprio_key!r}")
        return z, p

    # ------------------------------------------------------------------ training
    def corrupt(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The VP forward process at integer timesteps t (B,); at `absent_t` the input is the noise alone."""
        abar = self.diffusion.alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1))
        x = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        return torch.where((t == self.absent_t).view_as(abar), noise, x)

    def timesteps(self, B: int, absent: Tensor | None = None) -> Tensor:
        """(B,) training timesteps of one modality: absent with p_absent (always where `absent`), clean
        (0) with p_clean, else uniform over the schedule."""
        c, device = self.cfg, self.diffusion.betas.device
        t = torch.randint(0, c.noise.num_train_steps, (B,), device=device)
        u = torch.rand(B, device=device)
        t = torch.where(u < c.p_absent + c.p_clean, torch.zeros_like(t), t)
        t = torch.where(u < c.p_absent, torch.full_like(t, self.absent_t), t)
        return t if absent is None else torch.where(absent, torch.full_like(t, self.absent_t), t)

    def augment(self, z: Tensor) -> Tensor:
        """z (B, ..., h, w) translated per sample by up to `shift` latent cells (edges repeated), all of
        a sample's frames and cameras alike."""
        s = self.cfg.shift
        if s == 0:
            return z
        B, h, w = z.shape[0], *z.shape[-2:]
        padded = F.pad(z.reshape(B, -1, h, w), (s, s, s, s), mode="replicate")  # (B, N, h + 2s, w + 2s)
        N = padded.shape[1]
        dy, dx = (torch.randint(0, 2 * s + 1, (B,), device=z.device) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h, device=z.device))[:, None, :, None]  # (B, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=z.device))[:, None, None, :]  # (B, 1, 1, w)
        out = padded[
            torch.arange(B, device=z.device)[:, None, None, None],
            torch.arange(N, device=z.device)[None, :, None, None],
            rows,
            cols,
        ]
        return out.reshape(z.shape)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        frames = self.views(batch)  # (B, n_obs + F, V, C, h, w)
        B = frames.shape[0]
        if self.training:
            frames = self.augment(frames)
        obs, future = frames[:, : c.n_obs], frames[:, c.n_obs :]
        frame_ok = ~batch[c.image_keys[0] + "_is_pad"][:, c.n_obs :]  # (B, F)
        proprio = None
        if c.proprio_key:
            proprio = self.normalizer.normalize(c.proprio_key, batch[c.proprio_key].float())
            pad = batch.get(c.proprio_key + "_is_pad")
            if pad is not None and pad.all(-1).any():  # a store without proprio: zeros, "unknown"
                proprio = proprio.masked_fill(pad.all(-1)[:, None, None], 0.0)
        actions = batch[c.action_key].float()
        if actions.shape[1:] != (c.horizon, c.action_dim):
            raise ValueError(
                f"{c.action_key!r} is {tuple(actions.shape)}, expected (B, {c.horizon}, {c.action_dim})"
            )
        x0_a = self.normalizer.normalize(c.action_key, actions)
        has_action = batch.get("has_action", torch.ones(B, dtype=torch.bool, device=x0_a.device)).bool()
        action_ok = ~batch[c.action_key + "_is_pad"] & has_action[:, None]  # (B, Ta)

        t_a, t_v = self.timesteps(B, absent=~has_action), self.timesteps(B)
        noisy_a = self.corrupt(x0_a, t_a, torch.randn_like(x0_a))
        noisy_v = self.corrupt(future, t_v, torch.randn_like(future))
        pred_a, pred_v = self.net(noisy_a, t_a.float(), noisy_v, t_v.float(), obs, proprio)
        loss_a = masked_mean((pred_a - x0_a).pow(2).mean(-1), action_ok)
        loss_v = masked_mean((pred_v - future).pow(2).flatten(2).mean(-1), frame_ok)
        loss = loss_a + c.video_weight * loss_v
        return loss, {"loss": loss.detach(), "action_loss": loss_a.detach(), "video_loss": loss_v.detach()}

    # ------------------------------------------------------------------ modes
    def _absent(self, shape: tuple[int, ...], generator: Generators) -> tuple[Tensor, Tensor]:
        """An absent modality's input (pure noise, the same as `corrupt` at absent_t) and its timesteps."""
        device = self.diffusion.betas.device
        noise = randn(shape, generator, device)
        return noise, torch.full((shape[0],), float(self.absent_t), device=device)

    def _clean(self, x0: Tensor, generator: Generators) -> tuple[Tensor, Tensor]:
        """A given modality's input: `corrupt` at t = 0, as in training."""
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        noise = randn(tuple(x0.shape), generator, x0.device)
        return self.corrupt(x0, t, noise), t.float()

    def _sample(
        self,
        shape: tuple[int, ...],
        mode: _Mode,
        generator: Generators,
        guide: Inpaint | None = None,
    ) -> Tensor:
        with torch.autocast(
            self.diffusion.betas.device.type, torch.bfloat16, enabled=self.precision == "bf16"
        ):
            x = self.diffusion.sample(shape, mode, self.sampler, self.sampler_steps, generator, guide)
        return x.float()

    def _shapes(self, B: int) -> tuple[tuple[int, int, int], tuple[int, ...]]:
        c = self.cfg
        return (B, c.horizon, c.action_dim), (B, *self.net.frame_shape)

    @torch.inference_mode()
    def policy(
        self, obs: dict[str, Tensor], generator: Generators = None, guide: Inpaint | None = None
    ) -> Tensor:
        """obs values (B, T, ...) -> raw actions (B, horizon, Da) from the current step, frames absent."""
        z, p = self.observation(obs)
        a_shape, v_shape = self._shapes(z.shape[0])
        other, t_other = self._absent(v_shape, generator)
        x = self._sample(a_shape, _Mode("action", z, p, other, t_other), generator, guide)
        return self.normalizer.unnormalize(self.cfg.action_key, x)

    @torch.inference_mode()
    def forward_dynamics(
        self, obs: dict[str, Tensor], actions: Tensor, generator: Generators = None
    ) -> Tensor:
        """obs, raw actions (B, horizon, Da) from the current step -> future latents (B, F, V, C, h, w)."""
        z, p = self.observation(obs)
        a_shape, v_shape = self._shapes(z.shape[0])
        if tuple(actions.shape) != a_shape:
            raise ValueError(f"actions are {tuple(actions.shape)}, expected {a_shape}")
        x0 = self.normalizer.normalize(self.cfg.action_key, actions.to(z.device).float())
        check_finite(x0, "the actions")
        other, t_other = self._clean(x0, generator)
        return self._sample(v_shape, _Mode("frames", z, p, other, t_other), generator)

    @torch.inference_mode()
    def inverse_dynamics(
        self, obs: dict[str, Tensor], future: Tensor, generator: Generators = None
    ) -> Tensor:
        """obs, future frames (B, F, V, 3, H, W) in [0, 1] or latents (B, F, V, C, h, w) -> raw actions
        (B, horizon, Da)."""
        z, p = self.observation(obs)
        a_shape, v_shape = self._shapes(z.shape[0])
        fut = future.to(z.device)
        if fut.ndim == 6 and fut.shape[3] == 3 and tuple(fut.shape[3:]) != self.cfg.latent_shape:
            # frames: `latents` refuses uint8 ones (they were encoded as 0..255 floats), and another size
            fut = torch.stack(
                [self.latents(fut[:, :, v], k) for v, k in enumerate(self.cfg.image_keys)], dim=2
            )
        if tuple(fut.shape) != v_shape:
            raise ValueError(f"future latents are {tuple(fut.shape)}, expected {v_shape}")
        fut = fut.float()
        check_finite(fut, "the future frames")
        other, t_other = self._clean(fut, generator)
        x = self._sample(a_shape, _Mode("action", z, p, other, t_other), generator)
        return self.normalizer.unnormalize(self.cfg.action_key, x)

    @torch.inference_mode()
    def predict_video(self, obs: dict[str, Tensor], generator: Generators = None) -> Tensor:
        """obs -> future latents (B, F, V, C, h, w), actions absent (marginalized)."""
        z, p = self.observation(obs)
        a_shape, v_shape = self._shapes(z.shape[0])
        other, t_other = self._absent(a_shape, generator)
        return self._sample(v_shape, _Mode("frames", z, p, other, t_other), generator)

    @torch.inference_mode()
    def sample_joint(self, obs: dict[str, Tensor], generator: Generators = None) -> tuple[Tensor, Tensor]:
        """obs -> raw actions (B, horizon, Da) and future latents (B, F, V, C, h, w), denoised together."""
        z, p = self.observation(obs)
        B = z.shape[0]
        a_shape, v_shape = self._shapes(B)
        n_a = a_shape[1] * a_shape[2]
        x = self._sample((B, n_a + int(torch.Size(v_shape[1:]).numel())), _Mode("joint", z, p), generator)
        actions = self.normalizer.unnormalize(self.cfg.action_key, x[:, :n_a].reshape(a_shape))
        return actions, x[:, n_a:].reshape(v_shape)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, F, V, C, h, w) -> frames (B, F, V, 3, H, W) in [0, 1] (codecs that can decode)."""
        C, h, w = self.cfg.latent_shape
        if latents.ndim != 6 or tuple(latents.shape[3:]) != (C, h, w):  # any cameras: the preview's first
            raise ValueError(f"latents are {tuple(latents.shape)}, expected (B, F, V, {C}, {h}, {w})")
        B, F_ = latents.shape[:2]
        x = self.codec.decode(rearrange(latents, "b f v c h w -> (b f v) c h w"))
        return rearrange(x, "(b f v) c h w -> b f v c h w", b=B, f=F_)

    # ------------------------------------------------------------------ the policy seam
    @torch.inference_mode()
    def sample_actions(
        self,
        obs: dict[str, Tensor],
        generator: Generators = None,
        previous: Tensor | None = None,
        frozen: int = 0,
        full: bool = False,
    ) -> Tensor:
        """`ChunkModel.sample_actions`: policy mode; raw (E, n_action_exec, Da) from the current step, or
        (E, horizon, Da) with `full`; `previous` / `frozen` guide the chunk by soft inpainting."""
        c = self.cfg
        E = next(iter(obs.values())).shape[0]
        prev = check_previous(previous, frozen, E, c.action_dim)
        guide = None
        if prev is not None:
            prev = self.normalizer.normalize(c.action_key, prev.to(self.diffusion.betas.device).float())
            guide = inpaint_guide(prev, c.horizon, 0, frozen)
        actions = self.policy(obs, generator, guide)
        return actions if full else actions[:, : c.n_action_exec]
