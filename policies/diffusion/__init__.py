"""Diffusion policies: observation encoders, UNet / transformer denoisers, DDPM / DDIM / EDM samplers,
consistency distillation, and the `DiffusionPolicy` controller (satisfies `policies.base.Policy`)."""

from policies.diffusion.chunking import ActionQueue, TemporalEnsembler
from policies.diffusion.consistency import DistillConfig, distill, distill_policy
from policies.diffusion.noise import Diffusion, NoiseConfig
from policies.diffusion.obs_encoder import ObsEncoder, ObsEncoderConfig
from policies.diffusion.policy import (
    MODEL_TYPES,
    DiffusionPolicy,
    DiffusionPolicyConfig,
    load_diffusion_policy,
)
from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser
from policies.diffusion.unet import ConditionalUnet1D, UNetConfig

__all__ = [
    "MODEL_TYPES",
    "ActionQueue",
    "ConditionalUnet1D",
    "Diffusion",
    "DiffusionPolicy",
    "DiffusionPolicyConfig",
    "DistillConfig",
    "NoiseConfig",
    "ObsEncoder",
    "ObsEncoderConfig",
    "TemporalEnsembler",
    "TransformerConfig",
    "TransformerDenoiser",
    "UNetConfig",
    "distill",
    "distill_policy",
    "load_diffusion_policy",
]
