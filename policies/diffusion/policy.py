"""Diffusion Policy (Chi et al.): observation features condition a denoiser over an action chunk.

At each replanning step the last `n_obs` observations are encoded ONCE into (E, To, Dc) features;
the sampler then calls the denoiser (`unet`: ConditionalUnet1D with FiLM, or `transformer`) a few
times over normalized actions (E, horizon, Da). The chunk covers steps -(n_obs-1) .. horizon-n_obs
relative to the current observation; the `n_action_exec` actions starting at the current step are
executed (Diffusion Policy: obs 2, horizon 16, 8 executed).

Batch keys for `compute_loss` (from `WindowDataset` with `window_spec()`; give the dataset no crop,
the policy crops itself):
    <camera>            (B, n_obs, 3, H, W) float in [0, 1] at cfg.obs.image_size
    <proprio_key>       (B, n_obs, Dp) raw, normalized inside with the policy's Normalizer
    <action_key>        (B, horizon, Da) raw, normalized inside
    <action_key>_is_pad (B, horizon) bool, padded steps are left out of the loss

Checkpoints: `model_type` "diffusion_unet" / "diffusion_transformer", `model_config` =
`DiffusionPolicyConfig.to_dict()`, the normalizer (action + proprio statistics, also in the state
dict) and EMA weights; `wm.registry.load_model` rebuilds the policy from one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from policies.base import check_previous, last_steps
from policies.diffusion.noise import (
    SAMPLERS,
    Committed,
    Diffusion,
    Generators,
    NoiseConfig,
    check_ddim_steps,
    check_steps,
    inpaint_guide,
)
from policies.diffusion.obs_encoder import ObsEncoder, ObsEncoderConfig
from policies.diffusion.precision import check_precision, set_inference_precision
from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser
from policies.diffusion.unet import ConditionalUnet1D, UNetConfig
from wm.checks import check_finite
from wm.data.normalize import Normalizer
from wm.data.windows import WindowSpec
from wm.options import check_numbers, sub_config
from wm.precision import resolve_precision
from wm.spec import IOSpec

log = logging.getLogger(__name__)
DENOISERS = ("unet", "transformer")
MODEL_TYPES = tuple(f"diffusion_{d}" for d in DENOISERS)
INPAINT_GUIDANCE = ("estimate", "gradient")
_SUB = {"obs": ObsEncoderConfig, "unet": UNetConfig, "transformer": TransformerConfig, "noise": NoiseConfig}


@dataclass(frozen=True)
class DiffusionPolicyConfig:
    """`sampler` / `sampler_steps`: the default inference sampler (see `noise.py`); `consistency` marks a
    distilled student (sampler "consistency"). `temporal_ensemble`, for the policy's controller
    (`policies.chunking.ChunkPolicy`): None executes `n_action_exec` actions per chunk from a queue;
    a float m samples a chunk every step and averages the overlapping predictions with weights
    exp(-m * i), i = 0 the oldest (`policies.chunking.TemporalEnsembler`). `committed_steps` > 0 trains
    the denoiser to continue up to that many committed actions from the current step on, given as input
    (`noise.Committed`, training-time real-time chunking for `wm-deploy`'s asynchronous inpainting); 0:
    a plain denoiser, continued by guidance alone. `inpaint_guidance`: how a sample is guided towards
    the actions of a chunk being executed (`noise.Inpaint`): "estimate" edits each denoised estimate,
    "gradient" is RTC's guidance through the denoiser's Jacobian, its weight clipped at
    `inpaint_max_weight`."""

    obs: ObsEncoderConfig = field(default_factory=ObsEncoderConfig)
    action_key: str = "action"
    action_dim: int = 2
    n_obs: int = 2
    horizon: int = 16
    n_action_exec: int = 8
    denoiser: str = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sampler: str = "edm"
    sampler_steps: int = 3
    consistency: bool = False
    temporal_ensemble: float | None = None
    committed_steps: int = 0
    inpaint_guidance: str = "estimate"
    inpaint_max_weight: float = 5.0
    # inference: "bf16" runs the image backbone and the denoiser in bf16 where measured faster; "auto" is
    # bf16 where the hardware has bf16 units, else fp32 (`wm.precision.resolve_precision`), and on a CPU
    # the UNet's large layers may take int8 weights where measured faster (`policies.diffusion.unet`)
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model")
        for name, cls in _SUB.items():
            object.__setattr__(self, name, sub_config(cls, getattr(self, name), f"model.{name}"))
            if not isinstance(getattr(self, name), cls):  # a checkpoint's "noise": "x" failed at build
                raise ValueError(f"model.{name} must be a mapping of options, got {getattr(self, name)!r}")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"denoiser must be one of {DENOISERS}, got {self.denoiser!r}")
        if self.action_dim < 1 or self.n_obs < 1 or self.n_action_exec < 1:
            raise ValueError("action_dim, n_obs and n_action_exec must be >= 1")
        if self.horizon < self.n_obs - 1 + self.n_action_exec:
            raise ValueError(
                f"horizon {self.horizon} must cover the n_obs - 1 = {self.n_obs - 1} past steps and the "
                f"n_action_exec = {self.n_action_exec} executed ones"
            )
        if self.denoiser == "unet" and self.horizon % self.unet.time_divisor:
            raise ValueError(
                f"the UNet with {len(self.unet.down_dims)} levels needs a horizon divisible by "
                f"{self.unet.time_divisor}, got {self.horizon}"
            )
        if not 0 <= self.committed_steps <= self.horizon - self.n_obs:
            raise ValueError(
                f"committed_steps must be in [0, horizon - n_obs = {self.horizon - self.n_obs}] (at least "
                f"one action left to sample), got {self.committed_steps}"
            )
        if self.inpaint_guidance not in INPAINT_GUIDANCE:
            raise ValueError(
                f"inpaint_guidance must be one of {INPAINT_GUIDANCE}, got {self.inpaint_guidance!r}"
            )
        if self.temporal_ensemble is not None and not math.isfinite(self.temporal_ensemble):
            raise ValueError(
                f"temporal_ensemble must be a finite number or null, got {self.temporal_ensemble}"
            )
        if not self.inpaint_max_weight > 0:
            raise ValueError(f"inpaint_max_weight must be > 0, got {self.inpaint_max_weight}")
        _check_sampler(self.sampler, self.sampler_steps, self.consistency)
        check_ddim_steps(self.sampler, self.sampler_steps, self.noise)
        check_precision(self.precision, allow_auto=True)

    @property
    def model_type(self) -> str:
        return f"diffusion_{self.denoiser}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["obs"] = self.obs.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionPolicyConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown diffusion-policy option(s) {unknown}")
        return cls(**d)


def _check_sampler(sampler: str, steps: int, consistency: bool) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if (sampler == "consistency") != consistency:
        raise ValueError(
            "the 'consistency' sampler goes with a distilled policy (consistency=True) and only it"
        )
    check_steps(steps, "sampler_steps")


class DiffusionPolicy(nn.Module):
    """The diffusion-policy model: a `TrainableModel` (`compute_loss`) and a `ChunkModel`
    (`sample_actions` on its input tensors); `policies.chunking.ChunkPolicy` makes it a `Policy`
    controller. Call `.eval()` before sampling (dropout); inference always uses the center crop.
    `load_encoder_weights=False`: a patch encoder's pretrained file is not read (`inference_policy`)."""

    row_generators = True  # `sample_actions` takes one generator per row (`ChunkModel`)

    def __init__(
        self, cfg: DiffusionPolicyConfig, normalizer: Normalizer, load_encoder_weights: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = normalizer
        self.obs_encoder = ObsEncoder(cfg.obs, load_weights=load_encoder_weights)
        Dc, Da = cfg.obs.out_dim, cfg.action_dim
        committed = Committed(cfg.n_obs - 1, cfg.committed_steps) if cfg.committed_steps else None
        in_dim = 2 * Da + 1 if committed else Da  # noisy actions [+ committed actions, their mask]
        if cfg.denoiser == "unet":
            net: nn.Module = ConditionalUnet1D(cfg.unet, Da, cfg.n_obs * Dc, in_dim)
        else:
            net = TransformerDenoiser(cfg.transformer, Da, Dc, cfg.horizon, cfg.n_obs, in_dim)
        self.diffusion = Diffusion(net, cfg.noise, consistency=cfg.consistency, committed=committed)
        self.sampler, self.sampler_steps = cfg.sampler, cfg.sampler_steps
        self.set_precision(cfg.precision)

    @property
    def model_type(self) -> str:
        return self.cfg.model_type

    def set_sampler(self, sampler: str, steps: int, edm_solver: str | None = None) -> None:
        """Switch the inference sampler (e.g. to benchmark DDPM vs DDIM vs EDM on one trained model);
        `edm_solver` ("heun" or "dpmpp_2m"), when given, also switches the EDM sampler's solver."""
        _check_sampler(sampler, steps, self.cfg.consistency)
        check_ddim_steps(sampler, steps, self.diffusion.cfg)
        if edm_solver is not None:  # NoiseConfig validates the name
            self.diffusion.cfg = dataclasses.replace(self.diffusion.cfg, edm_solver=edm_solver)
        self.sampler, self.sampler_steps = sampler, steps

    def set_precision(self, precision: str) -> None:
        """Inference precision: "fp32"; "bf16" for the image backbone (a cached bf16 copy) and the
        denoiser (the UNet's convolutions on cached bf16 weight copies, the transformer as a bf16 copy
        under autocast), each where it was measured faster on this machine (`wm.kernels`); or "auto":
        bf16 on hardware with bf16 units, else fp32, and on a CPU each large UNet layer also offered int8
        weights (per output row), taken where measured faster and within `wm.kernels.INT8_TOL`. Training
        always runs in fp32 on the fp32 weights."""
        set_inference_precision(self, precision)  # validates the name
        self.precision_setting = precision

    @property
    def precision(self) -> str:
        """The inference precision in use on the model's device: "fp32" or "bf16" ("auto" resolved)."""
        return resolve_precision(self.precision_setting, self.diffusion.betas.device)

    @property
    def io_spec(self) -> IOSpec:
        """What the policy reads: its cameras and proprioception over `n_obs` consecutive steps."""
        c = self.cfg
        return IOSpec(
            image_keys=tuple(c.obs.image_keys),
            image_size=c.obs.image_size,
            proprio_key=c.obs.proprio_key if c.obs.proprio_dim else None,
            proprio_dim=c.obs.proprio_dim,
            action_dim=c.action_dim,
            action_key=c.action_key,
            history=c.n_obs,
        )

    def feature_cache_source(self) -> tuple[nn.Module, tuple[str, ...]] | None:
        """The frozen patch encoder and the cameras when training can read cached features: a patch
        backbone that is frozen, the same weights for every camera (one cache encodes them all with
        one encoder), and no random crop (crops need pixels)."""
        oc = self.cfg.obs
        if oc.backbone != "patch":
            return None
        encoders = [cam.encoder for cam in self.obs_encoder.cameras.values()]
        why = (
            "its patch encoder trains"
            if any(e.trainable for e in encoders)
            else "its cameras' encoders have different weights"
            if len({e.weights_hash() for e in encoders}) > 1
            else f"random crops to {oc.crop} need pixels (set model.obs.crop=null to train from the cache)"
            if oc.crop is not None and tuple(oc.crop) != tuple(oc.image_size)
            else None
        )
        if why is not None:
            log.info("feature cache not used: %s", why)
            return None
        return encoders[0], tuple(oc.image_keys)

    def window_spec(self) -> WindowSpec:
        """Observations at -(n_obs-1)..0; actions from -(n_obs-1) over `horizon` steps, padded at most
        n_action_exec - 1 steps past an episode's end."""
        c = self.cfg
        obs_keys = list(c.obs.image_keys) + ([c.obs.proprio_key] if c.obs.proprio_dim else [])
        return WindowSpec.history_horizon(
            obs_keys, (c.action_key,), c.n_obs, c.horizon, n_action_exec=c.n_action_exec
        )

    # ------------------------------------------------------------------ encoding
    def encode(self, obs: dict[str, Tensor], augment: bool = False) -> Tensor:
        """obs values (E, To, ...) -> features (E, n_obs, Dc). The last n_obs steps are used; a shorter
        history (an episode's first steps) is padded by repeating its first step, as in training."""
        self.obs_encoder.check_obs(obs)
        c, device = self.cfg, self.diffusion.betas.device
        keys = list(c.obs.image_keys) + ([c.obs.proprio_key] if c.obs.proprio_dim else [])
        hist = {k: last_steps(obs[k].to(device), c.n_obs) for k in keys}
        if c.obs.proprio_dim:
            hist[c.obs.proprio_key] = self.normalizer.normalize(
                c.obs.proprio_key, hist[c.obs.proprio_key].float()
            )
        was = self.obs_encoder.training
        self.obs_encoder.train(augment)  # random crop only when augmenting
        try:
            return self.obs_encoder(hist)
        finally:
            self.obs_encoder.train(was)

    def prepare(self, batch: dict[str, Tensor], augment: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """A training batch -> normalized actions (B, horizon, Da), features (B, n_obs, Dc) and the
        valid steps (B, horizon) (None without an is_pad mask)."""
        c = self.cfg
        actions = batch[c.action_key]
        if actions.shape[1:] != (c.horizon, c.action_dim):
            raise ValueError(
                f"{c.action_key!r} is {tuple(actions.shape)}, expected (B, {c.horizon}, {c.action_dim})"
            )
        x0 = self.normalizer.normalize(c.action_key, actions.float())
        pad = batch.get(c.action_key + "_is_pad")
        return x0, self.encode(batch, augment), None if pad is None else ~pad

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, valid = self.prepare(batch, augment=self.training)
        loss = self.diffusion.loss(x0, cond, valid)
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def sample_actions(
        self,
        obs: dict[str, Tensor],
        generator: Generators = None,
        previous: Tensor | None = None,
        frozen: int = 0,
        full: bool = False,
    ) -> Tensor:
        """obs values (E, To, ...) -> raw actions (E, n_action_exec, Da) from the current step on, or
        with `full` every action the model predicts from the current step on (E, horizon - n_obs + 1, Da).
        `generator` seeds the sampler's noise (same seed and obs, same actions): one for the batch, or a
        sequence of E, one per row (a row's actions then do not depend on the rows sampled beside it).

        previous (E, n, Da): raw actions of a chunk being executed, previous[:, 0] due at the current
        step; the sampler is guided by soft inpainting (`noise.Inpaint`, weights `noise.inpaint_weights`,
        the config's `inpaint_guidance`) towards its first `frozen` actions fully and, with decaying
        weight, towards the rest of it; a denoiser trained with `committed_steps` also takes the first
        min(frozen, committed_steps) of them as input. Guidance brings the frozen actions close to
        previous's, not exactly onto them (float rounding); `ChunkPolicy.chunk_from` sets them exactly."""
        c = self.cfg
        self._check_finite(obs)
        cond = self.encode(obs)  # (E, n_obs, Dc), once for every denoising step
        start = c.n_obs - 1  # the chunk starts at the oldest observation
        prev = check_previous(previous, frozen, cond.shape[0], c.action_dim)
        guide = None
        if prev is not None:
            prev = self.normalizer.normalize(c.action_key, prev.to(cond.device).float())
            weight = c.inpaint_max_weight if c.inpaint_guidance == "gradient" else None
            guide = inpaint_guide(prev, c.horizon, start, frozen, min(frozen, c.committed_steps), weight)
        x = self.diffusion.sample(
            (cond.shape[0], c.horizon, c.action_dim), cond, self.sampler, self.sampler_steps, generator, guide
        )
        if not torch.isfinite(x).all():  # the runtime would blame the model; say what the input was
            raise ValueError(self._overflow(obs))
        end = c.horizon if full else start + c.n_action_exec
        return self.normalizer.unnormalize(c.action_key, x[:, start:end])

    def _check_finite(self, obs: dict[str, Tensor]) -> None:
        """NaN or inf in an observation is refused in one line naming its key (it gave NaN actions)."""
        c = self.cfg.obs
        for k in list(c.image_keys) + ([c.proprio_key] if c.proprio_dim else []):
            if k in obs:
                check_finite(obs[k], repr(k))

    def _overflow(self, obs: dict[str, Tensor]) -> str:
        """Why finite observations gave non-finite actions, for one line: the proprioception's largest
        normalized value (a glitched sensor word far outside the training range overflows the network)."""
        c = self.cfg.obs
        if not (c.proprio_dim and c.proprio_key in obs):
            return "the sampled actions are not finite: the network overflowed on these images (damaged?)"
        norm = self.normalizer.normalize(c.proprio_key, obs[c.proprio_key].float()).abs().max()
        return (
            f"the sampled actions are not finite: {c.proprio_key!r} reaches {float(norm):.3g} after "
            "normalization, where training spans [-1, 1]: a faulty sensor reading (or damaged weights)?"
        )


def inference_policy(cfg: DiffusionPolicyConfig, normalizer: Normalizer) -> DiffusionPolicy:
    """The policy rebuilt from a checkpoint: a patch encoder's structure from the config, its weights
    (like all others) from the checkpoint's state dict, so a pretrained file need not be there any more
    (a run copied to the robot's computer, or `weights=timm` without the network)."""
    return DiffusionPolicy(cfg, normalizer, load_encoder_weights=False)
