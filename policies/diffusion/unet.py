"""Diffusion Policy's 1D temporal convolutional UNet with FiLM conditioning (ConditionalUnet1D).

The action sequence is a 1D signal over time with Da channels. Each residual block is two
Conv1d-GroupNorm-Mish blocks; between them a FiLM layer scales and shifts every channel from the
conditioning vector [diffusion step embedding, global observation features]. The encoder halves the
time axis after every level but the last, the decoder doubles it back with skip connections, so the
horizon must be divisible by 2 ** (len(down_dims) - 1) (16 with (256, 512, 1024)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    down_dims: tuple[int, ...] = (256, 512, 1024)  # LeRobot's sizes (Diffusion Policy: 512, 1024, 2048)
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 128  # diffusion step embedding (Diffusion Policy: 256 for 512..2048)

    def __post_init__(self) -> None:
        object.__setattr__(self, "down_dims", tuple(int(d) for d in self.down_dims))
        if not self.down_dims or min(self.down_dims) < 1:
            raise ValueError(f"down_dims must be positive, got {self.down_dims}")
        bad = [d for d in self.down_dims if d % self.n_groups]
        if bad:
            raise ValueError(f"down_dims {bad} are not divisible by n_groups {self.n_groups}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.step_embed_dim < 2 or self.step_embed_dim % 2:
            raise ValueError(f"step_embed_dim must be even and >= 2, got {self.step_embed_dim}")

    @property
    def time_divisor(self) -> int:
        """The horizon must be a multiple of this."""
        return 2 ** (len(self.down_dims) - 1)


class SinusoidalPosEmb(nn.Module):
    """(B,) float timesteps -> (B, dim) sin/cos features (Transformer positional encoding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None]  # (B, dim / 2)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, c_in: int, c_out: int, kernel: int, n_groups: int) -> None:
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(n_groups, c_out), nn.Mish()
        )


class ResBlock1D(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from cond) between them, plus a residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, n_groups: int) -> None:
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x (B, C_in, T), cond (B, cond_dim) -> (B, C_out, T)."""
        scale, bias = rearrange(self.film(cond), "b (two c) -> two b c 1", two=2)
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """Denoiser `net(x (B, Ta, Da), t (B,), cond (B, To, Dc)) -> (B, Ta, Da)`; cond is flattened to one
    global conditioning vector of To * Dc features (Diffusion Policy's global conditioning)."""

    def __init__(self, cfg: UNetConfig, action_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        k, g, dsed = cfg.kernel_size, cfg.n_groups, cfg.step_embed_dim
        self.step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        film_dim = dsed + cond_dim
        dims = [action_dim, *cfg.down_dims]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down.append(
                nn.ModuleList(
                    [
                        ResBlock1D(c_in, c_out, film_dim, k, g),
                        ResBlock1D(c_out, c_out, film_dim, k, g),
                        nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity(),
                    ]
                )
            )
        mid = cfg.down_dims[-1]
        self.mid = nn.ModuleList([ResBlock1D(mid, mid, film_dim, k, g), ResBlock1D(mid, mid, film_dim, k, g)])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(pairs[1:]):
            self.up.append(
                nn.ModuleList(
                    [
                        ResBlock1D(c_out * 2, c_in, film_dim, k, g),
                        ResBlock1D(c_in, c_in, film_dim, k, g),
                        nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                    ]
                )
            )
        start = cfg.down_dims[0]
        self.final = nn.Sequential(Conv1dBlock(start, start, k, g), nn.Conv1d(start, action_dim, 1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if x.shape[1] % self.cfg.time_divisor:
            raise ValueError(
                f"the UNet needs a horizon divisible by {self.cfg.time_divisor}, got {x.shape[1]} steps"
            )
        c = self.step_encoder(t)  # (B, dsed)
        if cond is not None:
            c = torch.cat([c, rearrange(cond, "b to d -> b (to d)")], dim=-1)  # (B, film_dim)
        h = rearrange(x, "b t a -> b a t")
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, 2C, T')
            h = upsample(res2(res1(h, c), c))
        return rearrange(self.final(h), "b a t -> b t a")
