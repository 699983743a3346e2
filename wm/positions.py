"""Position encodings of the world model's predictor: the fixed 2-D sin-cos embedding of the patch
grid, rotary tables over absolute frame indices (and the query / key projection rows pre-rotated by
them), and the block-causal mask over frames. Tables are computed in float64 on the CPU, cached, and
moved to the caller's device and dtype.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

Grid = tuple[int, int]  # (rows, columns) of patches


@lru_cache(maxsize=32)
@torch.inference_mode(False)  # a cached table serves autograd too (a gradient planner after inference)
def _sincos_2d_cpu(h: int, w: int, dim: int) -> Tensor:
    """(h * w, dim) float32: first half encodes the row index, second half the column index."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:  # (h, w) -> (h * w, D/2)
        ang = pos.reshape(-1, 1) * omega  # (P, D/4)
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def sincos_2d(grid: Grid, dim: int, like: Tensor) -> Tensor:
    """Fixed 2-D sin-cos spatial embedding for `grid`, (P, dim), on `like`'s device and dtype."""
    return _sincos_2d_cpu(int(grid[0]), int(grid[1]), dim).to(like)


@lru_cache(maxsize=256)
@torch.inference_mode(False)  # a cached table serves autograd too (a gradient planner after inference)
def _rope_cpu(start: int, frames: int, head_dim: int, base: float, dtype: torch.dtype) -> Tensor:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    pos = torch.arange(start, start + frames, dtype=torch.float64)
    ang = torch.outer(pos, inv_freq)  # (T, hd/2), float64 on CPU: exact for large frame indices
    return torch.polar(torch.ones_like(ang), ang).to(dtype)  # computed in complex128


def rope_tables(start: int, frames: int, head_dim: int, base: float, like: Tensor) -> Tensor:
    """Complex rotations (frames, head_dim / 2) for absolute frame indices start .. start + frames - 1."""
    dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
    return _rope_cpu(int(start), int(frames), int(head_dim), float(base), dtype).to(like.device)


def rope_weights(w: Tensor, rot: Tensor, heads: int) -> Tensor:
    """Query and key projection rows w (2*H*hd, D), ordered (query | key, head, channel), rotated for
    each frame of rot (T, hd/2): (T, 2*H*hd, D) in w's dtype, with `x @ out[t].T` equal to rotating
    `x @ w.T` at frame t (`apply_rope`). Channel pair (2i, 2i+1) of an output is the complex number
    (w[2i] + j w[2i+1]) x, so multiplying the pair of rows by the rotation rotates the output."""
    rows = w.float().unflatten(0, (2, heads, -1, 2)).transpose(-1, -2)  # (2, H, hd/2, D, 2)
    rows = torch.view_as_complex(rows.contiguous()) * rot[:, None, None, :, None]  # (T, 2, H, hd/2, D)
    return torch.view_as_real(rows).transpose(-1, -2).reshape(rot.shape[0], *w.shape).to(w.dtype)


def apply_rope(x: Tensor, rot: Tensor, patches: int) -> Tensor:
    """Rotate x (B, H, T*P, hd) by its frame's angles; rot (T, hd/2) complex.

    Channel pairs (2i, 2i+1) rotate together at frequency base^(-2i/hd). One complex multiply:
    one read and one write of x, faster on CPU than the rotate-half formulation (BENCHMARKS.md,
    "Figures from development").
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T*P, hd/2)
    xc = xc.unflatten(2, (rot.shape[0], patches)) * rot[:, None]  # (B, H, T, P, hd/2)
    return torch.view_as_real(xc).flatten(-2).flatten(2, 3).to(x.dtype)  # (B, H, T*P, hd)


def block_causal_mask(frames: int, patches: int, window: int, device: torch.device | None = None) -> Tensor:
    """Boolean (T*P, T*P) mask, True where query frame i may attend key frame j: i - window < j <= i."""
    f = torch.arange(frames, device=device).repeat_interleave(patches)  # (T*P,) frame of each token
    diff = f[:, None] - f[None, :]
    return (diff >= 0) & (diff < window)
