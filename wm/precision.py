"""The precision names the project accepts, and the one check of them.

Used by the trainer (`TrainerConfig.precision`: bf16 autocast for training) and by the diffusion
policy (`DiffusionPolicyConfig.precision`, `policies.diffusion.precision.set_inference_precision`:
bf16 inference on cached weight copies).
"""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """Return `precision` if it is one of `PRECISIONS`, else raise a ValueError naming the valid ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision
