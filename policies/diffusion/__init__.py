"""Diffusion policies: observation encoders, UNet / transformer denoisers, DDPM / DDIM / EDM samplers,
consistency distillation, and the `DiffusionPolicy` model (its controller is
`policies.chunking.ChunkPolicy`; its registry entries are in `policies.diffusion.entry`)."""

from policies.diffusion.noise import Diffusion, NoiseConfig
from policies.diffusion.obs_encoder import ObsEncoder, ObsEncoderConfig
from policies.diffusion.policy import MODEL_TYPES, DiffusionPolicy, DiffusionPolicyConfig
from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser
from policies.diffusion.unet import ConditionalUnet1D, UNetConfig

__all__ = [
    "MODEL_TYPES",
    "ConditionalUnet1D",
    "Diffusion",
    "DiffusionPolicy",
    "DiffusionPolicyConfig",
    "NoiseConfig",
    "ObsEncoder",
    "ObsEncoderConfig",
    "TransformerConfig",
    "TransformerDenoiser",
    "UNetConfig",
]
