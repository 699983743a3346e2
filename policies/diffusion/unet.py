"""Diffusion Policy's 1D temporal convolutional UNet with FiLM conditioning (ConditionalUnet1D).

The action sequence is a 1D signal over time with Da channels. Each residual block is two
Conv1d-GroupNorm-Mish blocks; between them a FiLM layer scales and shifts every channel from the
conditioning vector [diffusion step embedding, global observation features]. The encoder halves the
time axis after every level but the last, the decoder doubles it back with skip connections, so the
horizon must be divisible by 2 ** (len(down_dims) - 1) (16 with (256, 512, 1024)).

CPU inference. PyTorch sends a batch-1 Conv1d with a kernel under 4 wide to its native im2col
kernel (`_slow_conv2d_forward`), not oneDNN, and at batch 1 that kernel took most of a LeRobot-size
UNet call (profile in BENCHMARKS.md, diffusion policy section). With autograd off on a CPU,
`Conv1d` here calls oneDNN directly for layers with more than `_NATIVE_MAX_WEIGHTS` weights and
keeps the native kernel for smaller ones at batch 1, where oneDNN's fixed cost per call dominates.
At batch 1 a LeRobot-size call is bound by reading the weights (~260 MB in fp32): bf16 inference
(`precision.set_inference_precision(net, "bf16")`) runs the convolutions on cached bf16 copies of
the weights (half the traffic, AVX512-BF16 / AMX or GPU tensor cores) as plain matrix products,
with the rest of the network (GroupNorm, Mish, FiLM, step embedding) in fp32. Per-call times in
both precisions: measured by `benchmarks/bench_precision.py`, figures in BENCHMARKS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from policies.diffusion.precision import Bf16Inference, tensor_key

_MKLDNN = torch.backends.mkldnn.is_available()
# At batch 1 oneDNN and the bf16 matrix product each have a fixed cost per call that exceeds a small
# layer's work, so PyTorch's native fp32 kernel is faster for small layers. Up to these many weights a
# batch-1 layer keeps the native fp32 kernel (fp32 inference / bf16 inference); the per-layer timings
# that set them are in BENCHMARKS.md ("Figures from development"). At batch > 1 PyTorch itself
# dispatches to oneDNN.
_NATIVE_MAX_WEIGHTS = 131_072
_NATIVE_MAX_WEIGHTS_BF16 = 65_536


class _InferenceWeights(Bf16Inference):
    """Inference weights of a conv layer: its own (fp32), or a bf16 copy when `bf16_inference` is set,
    cached until the weights change (see `precision.py`). Training (autograd on) always uses the fp32
    weights."""

    _bf16_cache: tuple | None = None

    def inference_weights(self, x: Tensor) -> tuple[Tensor, Tensor | None, torch.dtype]:
        w, b = self.weight, self.bias  # type: ignore[attr-defined]
        if not self.bf16_inference:
            return w, b, x.dtype
        key = tensor_key([w] if b is None else [w, b])
        if self._bf16_cache is None or self._bf16_cache[0] != key:
            self._bf16_cache = (key, w.detach().bfloat16(), None if b is None else b.detach().bfloat16())
        return self._bf16_cache[1], self._bf16_cache[2], torch.bfloat16

    def clear_bf16(self) -> None:
        self._bf16_cache = None


class Conv1d(_InferenceWeights, nn.Conv1d):
    """`nn.Conv1d` (same parameters and state dict) with a faster inference path (autograd off).

    fp32 on a CPU: oneDNN called directly. bf16 (`bf16_inference`) on a CPU: the convolution as one
    matrix product of the (C_out, C_in * k) weight with the unfolded input, which reads the weights
    once (faster than oneDNN's bf16 convolution at batch 1; figures in BENCHMARKS.md). Small layers
    at batch 1 (`_NATIVE_MAX_WEIGHTS*`) keep PyTorch's native fp32 kernel in either precision.
    Elsewhere `F.conv1d` in the weights' dtype. The input is cast in and the output cast back."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        small = _NATIVE_MAX_WEIGHTS_BF16 if self.bf16_inference else _NATIVE_MAX_WEIGHTS
        if x.device.type == "cpu" and x.shape[0] == 1 and self.weight.numel() <= small:
            return super().forward(x)  # PyTorch's native fp32 kernel: the fastest for a small layer
        w, b, dtype = self.inference_weights(x)
        xin = x.to(dtype)
        if x.device.type != "cpu":
            y = F.conv1d(xin, w, b, self.stride, self.padding, self.dilation, self.groups)
        elif dtype == torch.bfloat16 and self.groups == 1 and self.dilation == (1,):
            (k,), (stride,), (pad,) = self.kernel_size, self.stride, self.padding
            cols = F.pad(xin, (pad, pad)).unfold(2, k, stride)  # (B, C_in, L_out, k)
            cols = cols.transpose(2, 3).reshape(x.shape[0], -1, cols.shape[2])  # (B, C_in * k, L_out)
            y = torch.matmul(w.reshape(w.shape[0], -1), cols)  # (B, C_out, L_out)
            y = y if b is None else y + b[:, None]
        elif _MKLDNN and dtype in (torch.float32, torch.bfloat16):
            y = torch.mkldnn_convolution(
                xin.contiguous(), w, b, self.padding, self.stride, self.dilation, self.groups
            )
        else:
            y = F.conv1d(xin, w, b, self.stride, self.padding, self.dilation, self.groups)
        return y.to(x.dtype)


class ConvTranspose1d(_InferenceWeights, nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` with the same bf16 inference option as `Conv1d`."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if torch.is_grad_enabled() or output_size is not None or not self.bf16_inference:
            return super().forward(x, output_size)
        w, b, dtype = self.inference_weights(x)
        y = F.conv_transpose1d(
            x.to(dtype), w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )
        return y.to(x.dtype)


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
    """(B,) float timesteps -> (B, dim) fp32 sin/cos features (Transformer positional encoding). The
    frequencies are computed in fp32 at each call, not stored, so a bf16 copy of the network keeps them
    exact (in bf16, t = 99 would be off by up to ~0.4 rad)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.half = dim // 2

    def forward(self, t: Tensor) -> Tensor:
        i = torch.arange(self.half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000) * i / max(self.half - 1, 1))
        arg = t.float()[:, None] * freqs[None]  # (B, dim / 2)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, c_in: int, c_out: int, kernel: int, n_groups: int) -> None:
        super().__init__(
            Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(n_groups, c_out), nn.Mish()
        )


class ResBlock1D(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from cond) between them, plus a residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, n_groups: int) -> None:
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual = Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

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
                        Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity(),
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
                        ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                    ]
                )
            )
        start = cfg.down_dims[0]
        self.final = nn.Sequential(Conv1dBlock(start, start, k, g), Conv1d(start, action_dim, 1))

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
