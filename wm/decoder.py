"""Transposed-conv image decoder from patch features (and optionally proprioception), for
visualizing predicted latents.

Patch features (B, P, D) on a grid (h, w) become a (B, D, h, w) map, then n = ceil(log2(upsample))
stride-2 transposed-conv stages upsample it by 2^n; a final 3x3 conv gives RGB logits, resized
(bilinear) to the requested image size when grid * 2^n differs from it (e.g. a 14x14 grid with
upsample 14 to 196 or 224 px), then a sigmoid maps them to [0, 1].

With `proprio_dim > 0` the decoder also takes the latent's proprio vector (B, Dp). A coarse patch
grid (4x4 for a 64 px frame) says little about where a few-pixel agent is, while proprioception
(x, y) says it exactly. So an MLP maps proprio to K image points, and after the stem and every
upsampling stage but the last, a 1x1 conv adds a learned mix of Gaussian maps around those points
(widths `keypoint_sigmas` output pixels) to the features. The narrow maps let the decoder draw the
agent to the pixel; the wide ones give the points a gradient towards it from afar early in training.
(A per-pixel MLP of (row, col, proprio), tried first, must learn units that switch within a pixel,
and drew no agent in a short trial: BENCHMARKS.md, "Decoder:".)

The world model trains its video decoder on *detached* latents, so decoding never shapes the latent
space the predictor and planner work in (as DINO-WM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from wm.options import check_numbers


@dataclass(frozen=True)
class DecoderConfig:
    """`channels[i]` is the width of upsampling stage i (the last value repeats for extra stages);
    `upsample` is the total spatial factor from the patch grid to the image (8: 8x8 -> 64x64);
    `proprio_dim` > 0 makes the decoder take proprioception, drawn through `keypoints` image points
    (an MLP of hidden width `keypoint_hidden`) with Gaussian maps of widths `keypoint_sigmas` pixels."""

    in_dim: int
    channels: tuple[int, ...] = (128, 64, 32)
    upsample: int = 8
    proprio_dim: int = 0
    keypoints: int = 8
    keypoint_sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    keypoint_hidden: int = 64

    def __post_init__(self) -> None:
        # int() cut channels=(8.5,) to 8, keypoints=2.5 was a TypeError from torch, upsample=True was 1
        check_numbers(type(self), vars(self), "decoder")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "keypoint_sigmas", tuple(float(s) for s in self.keypoint_sigmas))
        if self.in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {self.in_dim}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels}")
        if not isinstance(self.upsample, int) or self.upsample < 1:
            raise ValueError(f"upsample must be an int >= 1, got {self.upsample!r}")
        if self.proprio_dim < 0 or self.keypoints < 1 or self.keypoint_hidden < 1:
            raise ValueError(
                f"proprio_dim must be >= 0, keypoints and keypoint_hidden >= 1, got {self.proprio_dim}, "
                f"{self.keypoints}, {self.keypoint_hidden}"
            )
        # a nan width drew NaN images
        if not self.keypoint_sigmas or not all(0 < s < math.inf for s in self.keypoint_sigmas):
            raise ValueError(f"keypoint_sigmas must be positive pixel widths, got {self.keypoint_sigmas}")

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


class _Keypoints(nn.Module):
    """Proprio (B, Dp) -> K image points (B, K, 2) as (row, col) in [-1, 1] (an MLP), and their
    Gaussian maps at any resolution."""

    def __init__(self, proprio_dim: int, hidden: int, n: int, sigmas: tuple[float, ...]) -> None:
        super().__init__()
        self.sigmas = sigmas
        self.net = nn.Sequential(nn.Linear(proprio_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * n))

    def forward(self, proprio: Tensor) -> Tensor:
        return rearrange(self.net(proprio), "b (k two) -> b k two", two=2)

    def maps(self, points: Tensor, hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
        """(B, K, 2) points -> (B, K * S, h, w) Gaussians on an (h, w) grid of pixel centres; the S
        widths are `sigmas` output pixels, at least one pixel of this grid (no sub-pixel aliasing at
        coarse stages). Separable: a row profile times a column profile."""
        profiles = []
        for axis, (n, n_out) in enumerate(zip(hw, out_hw, strict=True)):
            centres = (torch.arange(n, device=points.device, dtype=points.dtype) * 2 + 1) / n - 1  # (n,)
            sig = torch.tensor([max(s, n_out / n) * 2 / n_out for s in self.sigmas]).to(points)  # (S,)
            d = (centres - points[..., axis, None, None]) / sig[:, None]  # (B, K, S, n)
            profiles.append(torch.exp(-0.5 * d.pow(2)))
        maps = profiles[0][..., :, None] * profiles[1][..., None, :]  # (B, K, S, h, w)
        return rearrange(maps, "b k s h w -> b (k s) h w")


class Decoder(nn.Module):
    """Patch features (B, P, in_dim) on grid (h, w) [and proprio (B, proprio_dim)] -> images
    (B, 3, H, W) in [0, 1]."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.stage_width(0)
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_dim, c0, kernel_size=3, padding=1), _norm(c0), nn.SiLU())
        widths = [c0] + [cfg.stage_width(i) for i in range(cfg.stages)]
        self.stages = nn.ModuleList(_UpStage(a, b) for a, b in pairwise(widths))
        self.keypoints, self.fields = None, None
        if cfg.proprio_dim:
            self.keypoints = _Keypoints(
                cfg.proprio_dim, cfg.keypoint_hidden, cfg.keypoints, cfg.keypoint_sigmas
            )
            n_maps = cfg.keypoints * len(cfg.keypoint_sigmas)
            # 1x1 convs mixing the maps into the stem's and every stage's output but the last: at full
            # resolution they would cost as much as the rest of the decoder, and the last stage's
            # convolutions draw from the half-resolution maps just as precisely.
            self.fields = nn.ModuleList(
                nn.Conv2d(n_maps, c, kernel_size=1) for c in widths[: max(1, len(widths) - 1)]
            )
        self.to_rgb = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def _field(self, i: int, x: Tensor, points: Tensor | None, out_hw: tuple[int, int]) -> Tensor:
        """Stage i's map plus what the keypoints draw there (x unchanged without proprio, and at the
        last stage)."""
        if points is None or i >= len(self.fields):
            return x
        return x + self.fields[i](self.keypoints.maps(points, tuple(x.shape[-2:]), out_hw))

    def forward(
        self,
        features: Tensor,
        grid: tuple[int, int],
        out_hw: tuple[int, int],
        proprio: Tensor | None = None,
    ) -> Tensor:
        """features (B, P, in_dim) with P = grid[0] * grid[1], proprio (B, proprio_dim) when the config
        has proprio_dim > 0 (else None); returns (B, 3, *out_hw) in [0, 1]."""
        h, w = int(grid[0]), int(grid[1])
        if features.shape[1] != h * w or features.shape[2] != self.cfg.in_dim:
            raise ValueError(
                f"features {tuple(features.shape)} do not match grid {(h, w)} and in_dim {self.cfg.in_dim}"
            )
        dp = self.cfg.proprio_dim
        if dp and (proprio is None or proprio.shape != (features.shape[0], dp)):
            got = None if proprio is None else tuple(proprio.shape)
            raise ValueError(f"this decoder needs proprio ({features.shape[0]}, {dp}), got {got}")
        if not dp and proprio is not None:
            raise ValueError("this decoder was built without proprio (proprio_dim=0) but was given one")
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        points = None if proprio is None else self.keypoints(proprio)  # (B, K, 2)
        x = self.stem(rearrange(features, "b (h w) d -> b d h w", h=h, w=w))
        x = self._field(0, x, points, out_hw)
        for i, stage in enumerate(self.stages, start=1):
            x = self._field(i, stage(x), points, out_hw)
        logits = self.to_rgb(x)  # (B, 3, h * 2^n, w * 2^n)
        if tuple(logits.shape[-2:]) != out_hw:
            logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
        return logits.sigmoid()


__all__ = ["Decoder", "DecoderConfig"]
