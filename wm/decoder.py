"""Transposed-conv image decoder from patch features, for visualizing predicted latents.

Patch features (B, P, D) on a grid (h, w) become a (B, D, h, w) map, then n = ceil(log2(upsample))
stride-2 transposed-conv stages upsample it by 2^n; a final 3x3 conv gives RGB logits, resized
(bilinear) to the requested image size when grid * 2^n differs from it (e.g. a 14x14 grid with
upsample 14 to 196 or 224 px), then a sigmoid maps them to [0, 1].

The world model trains this decoder on *detached* encoder features (reconstruction loss only), so
decoding never shapes the latent space the predictor and planner work in (as DINO-WM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class DecoderConfig:
    """`channels[i]` is the width of upsampling stage i (the last value repeats for extra stages);
    `upsample` is the total spatial factor from the patch grid to the image (8: 8x8 -> 64x64)."""

    in_dim: int
    channels: tuple[int, ...] = (128, 64, 32)
    upsample: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {self.in_dim}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels}")
        if not isinstance(self.upsample, int) or self.upsample < 1:
            raise ValueError(f"upsample must be an int >= 1, got {self.upsample!r}")

    @property
    def stages(self) -> int:
        return math.ceil(math.log2(self.upsample)) if self.upsample > 1 else 0

    def stage_width(self, i: int) -> int:
        return self.channels[min(i, len(self.channels) - 1)]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class _UpStage(nn.Module):
    """x2 transposed conv, then a 3x3 conv, each followed by SiLU. No normalization at these
    resolutions: GroupNorm at full image size dominated the decoder's cost on CPUs (the stem keeps one)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1),
            nn.SiLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Patch features (B, P, in_dim) on grid (h, w) -> images (B, 3, H, W) in [0, 1]."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.stage_width(0)
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_dim, c0, kernel_size=3, padding=1), _norm(c0), nn.SiLU())
        widths = [c0] + [cfg.stage_width(i) for i in range(cfg.stages)]
        self.stages = nn.Sequential(*(_UpStage(a, b) for a, b in pairwise(widths)))
        self.to_rgb = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def forward(self, features: Tensor, grid: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
        """features (B, P, in_dim) with P = grid[0] * grid[1]; returns (B, 3, *out_hw) in [0, 1]."""
        h, w = int(grid[0]), int(grid[1])
        if features.shape[1] != h * w or features.shape[2] != self.cfg.in_dim:
            raise ValueError(
                f"features {tuple(features.shape)} do not match grid {(h, w)} and in_dim {self.cfg.in_dim}"
            )
        x = rearrange(features, "b (h w) d -> b d h w", h=h, w=w)
        logits = self.to_rgb(self.stages(self.stem(x)))  # (B, 3, h * 2^n, w * 2^n)
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        if tuple(logits.shape[-2:]) != out_hw:
            logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
        return logits.sigmoid()


__all__ = ["Decoder", "DecoderConfig"]
