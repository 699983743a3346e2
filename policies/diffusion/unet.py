"""Diffusion Policy's 1D temporal convolutional UNet with FiLM conditioning (ConditionalUnet1D).

The action sequence is a 1D signal over time with Da channels. Each residual block is two
Conv1d-GroupNorm-Mish blocks; between them a FiLM layer scales and shifts every channel from the
conditioning vector [diffusion step embedding, global observation features]. The encoder halves the
time axis after every level but the last, the decoder doubles it back with skip connections, so the
horizon must be divisible by 2 ** (len(down_dims) - 1) (16 with (256, 512, 1024)).

CPU inference. Which convolution kernel is fastest at batch 1 depends on the CPU and the layer: PyTorch
sends a batch-1 Conv1d to its native im2col kernel, oneDNN has a fixed cost per call that exceeds a
small layer's work, and a LeRobot-size call is bound by reading its weights (~260 MB in fp32), which
bf16 copies halve (AVX512-BF16 / AMX). So with autograd off on a CPU each `Conv1d` / `ConvTranspose1d`
chooses its kernel per input shape by measurement (`wm.kernels`): in fp32 among PyTorch's own kernel,
oneDNN called directly and one matrix product of the weight with the unfolded input; with bf16
inference (`precision.set_inference_precision(net, "bf16" | "auto")`) also among the same three on a
cached bf16 copy of the weights. PyTorch's fp32 kernel is always a candidate and the reference the
others are checked against. The FiLM layers (`Linear`: at batch 1 one row of conditioning against a
(2 C, step_embed_dim + cond_dim) weight, bound by reading it too) choose the same way between PyTorch's
linear kernel on the fp32 and, in bf16, the bf16 weights; at inference all residual blocks' FiLM layers
run as one such layer on their stacked weights (`ConditionalUnet1D.fused_film`: they all read the same
conditioning). GroupNorm, Mish and the step embedding stay fp32. On a GPU: PyTorch's kernel, on the
bf16 weights in bf16 mode. Choices per layer and per-call times: `benchmarks/bench_precision.py`.

The default precision "auto" on a CPU also offers int8 weights: the layer's weight matrix
quantized per output row (symmetric, `wm.precision.quantize_int8_rows`), multiplied with the unfolded
input in bf16 by PyTorch's weight-only int8 kernel (`torch._weight_int8pack_mm`), the fp32 scale
applied to its output; the kernel's K is zero-padded to a multiple of 64 (its vector block). It reads a
quarter of the fp32 weights' bytes, so it wins where a call is bound by reading weights (the large
layers at batch 1, convolutions and FiLM), on CPUs with or without bf16 units; like every other
candidate it is taken only where measured faster and within its tolerance (`wm.kernels.INT8_TOL`) of
PyTorch's fp32 output on the call's own input. "fp32" and "bf16" never use it.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from policies.diffusion.precision import MEMO_LIMIT, STACKED_CACHE, Bf16Inference, tensor_key
from wm import kernels
from wm.options import check_numbers
from wm.precision import quantize_int8_rows

_MKLDNN = torch.backends.mkldnn.is_available()


def _onednn_bf16() -> bool:
    """Whether oneDNN's bf16 convolution runs here: it needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT, and
    raises elsewhere (an AVX2-only CPU)."""
    try:
        return _MKLDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query
        return False


_MKLDNN_BF16 = _onednn_bf16()
_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
_INT8_K = 64  # the int8 kernel's K block (see `int8_fits`)
Kernel = Callable[[nn.Module, Tensor], Tensor]


class _InferenceLayer(Bf16Inference):
    """The inference path shared by the conv and linear layers: `KERNELS` maps a name to `fn(layer, x) ->
    y` (fp32 in, fp32 out); "native" is PyTorch's fp32 forward, names ending in "_bf16" run on
    `bf16_weights()`, names ending in "_int8" on `int8_weights()`."""

    KERNELS: dict[str, Kernel] = {}
    _bf16_cache: tuple | None = None
    _int8_cache: tuple | None = None

    def bf16_weights(self) -> tuple[Tensor, Tensor | None]:
        """bf16 copies of the weight and bias, cached until the fp32 tensors change."""
        w, b = self.weight, self.bias  # type: ignore[attr-defined]
        key = tensor_key([w] if b is None else [w, b])
        if self._bf16_cache is None or self._bf16_cache[0] != key:
            self._bf16_cache = (key, w.detach().bfloat16(), None if b is None else b.detach().bfloat16())
        return self._bf16_cache[1], self._bf16_cache[2]

    def int8_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The weight as the matrix the matmul kernels multiply (`weight_matrix`), quantized per row:
        (int8 (N, K') with K zero-padded to K' a multiple of `_INT8_K`, unit bf16 scales (N,) for the
        kernel, fp32 scale (N,)), cached until the fp32 weight changes."""
        w = self.weight  # type: ignore[attr-defined]
        key = tensor_key([w])
        if self._int8_cache is None or self._int8_cache[0] != key:
            q, scale = quantize_int8_rows(self.weight_matrix().detach())
            q = F.pad(q, (0, -q.shape[1] % _INT8_K))  # zero columns: K a multiple of _INT8_K
            self._int8_cache = (key, q, torch.ones_like(scale, dtype=torch.bfloat16), scale)
        return self._int8_cache[1:]

    def clear_bf16(self) -> None:
        self._bf16_cache = self._int8_cache = None

    def weight_matrix(self) -> Tensor:
        """The fp32 weight as the (N, K) matrix of the matmul kernels."""
        raise NotImplementedError

    def one_product(self) -> bool:
        """Whether the layer is one product of `weight_matrix` with its (unfolded) input, as the "matmul"
        kernels compute it: a convolution without groups or dilation."""
        return self.groups == 1 and self.dilation == (1,)  # type: ignore[attr-defined]

    def int8_fits(self) -> bool:
        """Whether the int8 kernel may run this layer. PyTorch's kernel reads K in whole vector blocks with
        no remainder loop (K = 10 crashes the process on an AVX2 build; a crash cannot be caught by
        calibration), so the int8 matrix and the input rows are zero-padded to K a multiple of `_INT8_K`
        (`int8_weights`, `_int8_product`), and only N a multiple of 16 is offered."""
        if not _INT8_MM or "matmul_int8" not in self.KERNELS or not self.one_product():
            return False
        return self.weight_matrix().shape[0] % 16 == 0

    def kernel_names(self, precision: str) -> list[str]:
        """The fp32 kernels, and with reduced precision the same on bf16 weights; `infer` adds int8."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def infer(self, x: Tensor) -> Tensor:
        """The layer without autograd: the kernel chosen for this input shape and precision."""
        precision = self.active_precision(x)
        default = "native_bf16" if precision == "bf16" else "native"
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # GPU, or inductor picks kernels
            return self.KERNELS[default](self, x)  # type: ignore[arg-type]
        # int8 weights: only with "auto" (the fastest within tolerance); "fp32" / "bf16" are what they say
        auto = self.inference_precision == "auto"
        memo = self.__dict__.setdefault("_kernel_memo", {})
        # the weights' identity too: int8 / bf16 accuracy was checked on these weights (`kernels.choose`)
        mk = (x.shape, x.dtype, precision, auto, kernels.memo_token(), tensor_key((self.weight,)))
        name = memo.get(mk)
        if name is None:
            if len(memo) > MEMO_LIMIT:  # entries of earlier weights (a training run's validations)
                memo.clear()
            int8 = auto and self.int8_fits()  # the layer's shape decides: checked once per memo entry
            names = self.kernel_names(precision) + (["matmul_int8"] if int8 else [])
            name = kernels.choose(
                f"{self.describe()} x={kernels.shapes(x)} {x.dtype} {precision}{'+int8' if int8 else ''}",
                {n: functools.partial(self.KERNELS[n], self, x) for n in names},
                native="native",
                tol={n: _KERNEL_TOL.get(n.rpartition("_")[2], kernels.FP32_TOL) for n in names},
                default=default,
            )
            kernels.remember(memo, mk, name)
        return self.KERNELS[name](self, x)  # type: ignore[arg-type]


_KERNEL_TOL = {"bf16": kernels.BF16_TOL, "int8": kernels.INT8_TOL}  # by kernel-name suffix


def _int8_product(layer: _InferenceLayer, rows: Tensor, bias: Tensor | None) -> Tensor:
    """rows (M, K) bf16 -> rows @ W.T * scale (+ bias) (M, N) fp32, W the layer's int8 weight matrix
    (PyTorch's weight-only kernel, unit scales), each output column then times its fp32 scale. The rows
    are zero-padded to the int8 matrix's K' (one contiguous copy)."""
    q, ones, scale = layer.int8_weights()
    rows = F.pad(rows, (0, q.shape[1] - rows.shape[1])) if q.shape[1] > rows.shape[1] else rows.contiguous()
    y = torch._weight_int8pack_mm(rows, q, ones).float()
    return y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale)


def _weights(layer: _InferenceLayer, bf16: bool) -> tuple[Tensor, Tensor | None]:
    return layer.bf16_weights() if bf16 else (layer.weight, layer.bias)  # type: ignore[attr-defined]


def _conv_native_bf16(layer: Conv1d, x: Tensor) -> Tensor:
    w, b = layer.bf16_weights()
    y = F.conv1d(x.bfloat16(), w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    return y.to(x.dtype)


def _conv_onednn(layer: Conv1d, x: Tensor, bf16: bool) -> Tensor:
    w, b = _weights(layer, bf16)
    xin = x.to(w.dtype).contiguous()
    return torch.mkldnn_convolution(xin, w, b, layer.padding, layer.stride, layer.dilation, layer.groups).to(
        x.dtype
    )


def _conv_matmul(layer: Conv1d, x: Tensor, bf16: bool) -> Tensor:
    """The convolution as one matrix product of the (C_out, C_in * k) weight with the unfolded input,
    which reads the weights once."""
    w, b = _weights(layer, bf16)
    y = torch.matmul(w.reshape(w.shape[0], -1), _unfold(layer, x.to(w.dtype)))  # (B, C_out, L_out)
    y = y if b is None else y + b[:, None]
    return y.to(x.dtype)


def _unfold(layer: Conv1d, x: Tensor) -> Tensor:
    """x (B, C_in, L) -> the columns (B, C_in * k, L_out) the convolution's weight matrix multiplies."""
    (k,), (stride,), (pad,) = layer.kernel_size, layer.stride, layer.padding
    cols = F.pad(x, (pad, pad)).unfold(2, k, stride)  # (B, C_in, L_out, k)
    return cols.transpose(2, 3).reshape(x.shape[0], -1, cols.shape[2])


def _conv_matmul_int8(layer: Conv1d, x: Tensor) -> Tensor:
    """`_conv_matmul` on int8 weights: the (B * L_out, C_in * k) bf16 rows of the unfolded input (one
    copy) times the (C_out, C_in * k) matrix."""
    (k,), (stride,), (pad,) = layer.kernel_size, layer.stride, layer.padding
    cols = F.pad(x.bfloat16(), (pad, pad)).unfold(2, k, stride)  # (B, C_in, L_out, k)
    rows = cols.permute(0, 2, 1, 3).reshape(-1, cols.shape[1] * k)  # (B * L_out, C_in * k)
    y = _int8_product(layer, rows, layer.bias).reshape(x.shape[0], cols.shape[2], -1)
    return y.transpose(1, 2).to(x.dtype)  # (B, C_out, L_out)


class Conv1d(_InferenceLayer, nn.Conv1d):
    """`nn.Conv1d` (same parameters and state dict) whose inference (autograd off) runs the kernel
    chosen by measurement for each input shape (see the module docstring)."""

    KERNELS: dict[str, Kernel] = {
        "native": lambda m, x: nn.Conv1d.forward(m, x),
        "onednn": functools.partial(_conv_onednn, bf16=False),
        "matmul": functools.partial(_conv_matmul, bf16=False),
        "native_bf16": _conv_native_bf16,
        "onednn_bf16": functools.partial(_conv_onednn, bf16=True),
        "matmul_bf16": functools.partial(_conv_matmul, bf16=True),
        "matmul_int8": _conv_matmul_int8,
    }

    def weight_matrix(self) -> Tensor:
        return self.weight.reshape(self.out_channels, -1)  # (C_out, C_in * k)

    def kernel_names(self, precision: str) -> list[str]:
        names = ["native"]
        if _MKLDNN:
            names.append("onednn")
        if self.one_product():
            names.append("matmul")
        if precision != "bf16":
            return names
        return names + [f"{n}_bf16" for n in names if n != "onednn" or _MKLDNN_BF16]

    def describe(self) -> str:
        return (
            f"conv1d {self.in_channels}->{self.out_channels} k{self.kernel_size[0]} s{self.stride[0]} "
            f"p{self.padding[0]} d{self.dilation[0]} g{self.groups} bias={self.bias is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return self.infer(x)


def _tconv_native_bf16(layer: ConvTranspose1d, x: Tensor) -> Tensor:
    w, b = layer.bf16_weights()
    y = F.conv_transpose1d(
        x.bfloat16(), w, b, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
    )
    return y.to(x.dtype)


def _col2im(layer: ConvTranspose1d, cols: Tensor, bias: Tensor | None) -> Tensor:
    """(B, C_out * k, L_in) per-input-step columns -> (B, C_out, L): the overlapping columns summed into
    place (`F.fold`), plus the bias."""
    (k,), (stride,), (pad,), (out_pad,) = layer.kernel_size, layer.stride, layer.padding, layer.output_padding
    length = (cols.shape[2] - 1) * stride - 2 * pad + k + out_pad
    y = F.fold(cols, (1, length), (1, k), padding=(0, pad), stride=(1, stride))[:, :, 0]
    return y if bias is None else y + bias[:, None]


def _tconv_matmul(layer: ConvTranspose1d, x: Tensor, bf16: bool) -> Tensor:
    """The transposed convolution as one matrix product of the (C_out * k, C_in) weight with the input,
    then the overlapping columns summed into place (col2im)."""
    w, b = _weights(layer, bf16)  # (C_in, C_out, k)
    cols = torch.matmul(w.reshape(w.shape[0], -1).t(), x.to(w.dtype))  # (B, C_out * k, L_in)
    return _col2im(layer, cols, b).to(x.dtype)


def _tconv_matmul_int8(layer: ConvTranspose1d, x: Tensor) -> Tensor:
    """`_tconv_matmul` on int8 weights: (B * L_in, C_in) rows times the (C_out * k, C_in) matrix."""
    rows = x.bfloat16().transpose(1, 2).reshape(-1, x.shape[1])  # (B * L_in, C_in)
    cols = _int8_product(layer, rows, None).reshape(x.shape[0], x.shape[2], -1)  # (B, L_in, C_out * k)
    cols = cols.transpose(1, 2)  # (B, C_out * k, L_in)
    return _col2im(layer, cols, layer.bias).to(x.dtype)


class ConvTranspose1d(_InferenceLayer, nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` with the same inference path as `Conv1d`."""

    KERNELS: dict[str, Kernel] = {
        "native": lambda m, x: nn.ConvTranspose1d.forward(m, x),
        "matmul": functools.partial(_tconv_matmul, bf16=False),
        "native_bf16": _tconv_native_bf16,
        "matmul_bf16": functools.partial(_tconv_matmul, bf16=True),
        "matmul_int8": _tconv_matmul_int8,
    }

    def weight_matrix(self) -> Tensor:
        return self.weight.reshape(self.in_channels, -1).t()  # (C_out * k, C_in)

    def kernel_names(self, precision: str) -> list[str]:
        names = ["native"]
        if self.one_product():
            names.append("matmul")
        return names + [f"{n}_bf16" for n in names] if precision == "bf16" else names

    def describe(self) -> str:
        return (
            f"conv_transpose1d {self.in_channels}->{self.out_channels} k{self.kernel_size[0]} "
            f"s{self.stride[0]} p{self.padding[0]} op{self.output_padding[0]} d{self.dilation[0]} "
            f"g{self.groups} bias={self.bias is not None}"
        )

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if torch.is_grad_enabled() or output_size is not None or self.padding_mode != "zeros":
            return super().forward(x, output_size)
        return self.infer(x)


def _linear_native_bf16(layer: Linear, x: Tensor) -> Tensor:
    w, b = layer.bf16_weights()
    return F.linear(x.bfloat16(), w, b).to(x.dtype)


def _linear_int8(layer: Linear, x: Tensor) -> Tensor:
    """x (..., K) -> (..., N) on the int8 weight matrix."""
    rows = x.bfloat16().reshape(-1, x.shape[-1])
    return _int8_product(layer, rows, layer.bias).reshape(*x.shape[:-1], -1).to(x.dtype)


class Linear(_InferenceLayer, nn.Linear):
    """`nn.Linear` (same parameters and state dict) with the conv layers' inference path: PyTorch's fp32
    kernel, its bf16 one on bf16 weights, and with "auto" int8 weights, chosen per input shape by
    measurement. The FiLM layers: at batch 1 each reads a (2 C, step_embed_dim + cond_dim) weight for one
    row of conditioning, bound by reading its weights like the large convolutions."""

    KERNELS: dict[str, Kernel] = {
        "native": lambda m, x: nn.Linear.forward(m, x),
        "native_bf16": _linear_native_bf16,
        "matmul_int8": _linear_int8,
    }

    def weight_matrix(self) -> Tensor:
        return self.weight  # (out_features, in_features)

    def one_product(self) -> bool:
        return True

    def kernel_names(self, precision: str) -> list[str]:
        return ["native", "native_bf16"] if precision == "bf16" else ["native"]

    def describe(self) -> str:
        return f"linear {self.in_features}->{self.out_features} bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.infer(x)


@dataclass(frozen=True)
class UNetConfig:
    down_dims: tuple[int, ...] = (256, 512, 1024)  # LeRobot's sizes (Diffusion Policy: 512, 1024, 2048)
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 128  # diffusion step embedding (Diffusion Policy: 256 for 512..2048)

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model.unet")  # built directly too, not only from a config
        object.__setattr__(self, "down_dims", tuple(int(d) for d in self.down_dims))
        if not self.down_dims or min(self.down_dims) < 1:
            raise ValueError(f"down_dims must be positive, got {self.down_dims}")
        if self.n_groups < 1:  # 0 was a ZeroDivisionError below
            raise ValueError(f"n_groups must be >= 1, got {self.n_groups}")
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
        self.film = nn.Sequential(nn.Mish(), Linear(cond_dim, 2 * c_out))
        self.residual = Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, film: Tensor | None = None) -> Tensor:
        """x (B, C_in, T), cond (B, cond_dim) -> (B, C_out, T); `film` (B, 2 C_out), where given, is
        `self.film(cond)` computed by the caller (`ConditionalUnet1D.film_outputs`)."""
        film = self.film(cond) if film is None else film
        scale, bias = rearrange(film, "b (two c) -> two b c 1", two=2)
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """Denoiser `net(x (B, Ta, Din), t (B,), cond (B, To, Dc)) -> (B, Ta, Da)`; cond is flattened to one
    global conditioning vector of To * Dc features (Diffusion Policy's global conditioning). Din is
    `in_dim` (default Da; more where the noisy actions come with input channels, `noise.Committed`)."""

    def __init__(self, cfg: UNetConfig, action_dim: int, cond_dim: int, in_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        k, g, dsed = cfg.kernel_size, cfg.n_groups, cfg.step_embed_dim
        self.step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        film_dim = dsed + cond_dim
        dims = [in_dim or action_dim, *cfg.down_dims]
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
        # the residual blocks' FiLM layers in the order they run (a list: not registered a second time)
        self._film_layers = [m.film[1] for m in self.modules() if isinstance(m, ResBlock1D)]

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if x.shape[1] % self.cfg.time_divisor:
            raise ValueError(
                f"the UNet needs a horizon divisible by {self.cfg.time_divisor}, got {x.shape[1]} steps"
            )
        c = self.step_encoder(t)  # (B, dsed)
        if cond is not None:
            c = torch.cat([c, rearrange(cond, "b to d -> b (to d)")], dim=-1)  # (B, film_dim)
        films = iter(self.film_outputs(c))
        h = rearrange(x, "b t a -> b a t")
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c, next(films)), c, next(films))
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, c, next(films))
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, 2C, T')
            h = upsample(res2(res1(h, c, next(films)), c, next(films)))
        return rearrange(self.final(h), "b a t -> b t a")

    def film_outputs(self, c: Tensor) -> Iterable[Tensor | None]:
        """Every residual block's FiLM output (B, 2 C), in the order the blocks run. At inference, one
        product of the conditioning with all blocks' FiLM weights stacked (`fused_film`): one weight read
        and one kernel choice instead of one per block. With autograd on, in training mode or under
        torch.compile, None for each: every block computes its own."""
        if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling():
            return itertools.repeat(None)
        fused = self.fused_film()
        return torch.split(fused(F.mish(c)), [f.out_features for f in self._film_layers], dim=1)

    def fused_film(self) -> Linear:
        """The residual blocks' FiLM layers as one `Linear` (weights and biases stacked in block order),
        built again when any of theirs changes (an optimizer step, `load_state_dict`, a device move) and
        run in their inference precision. Kept outside the module tree: not in the state dict."""
        films = self._film_layers
        key = tensor_key([t for f in films for t in (f.weight, f.bias)])
        cached = self.__dict__.get(STACKED_CACHE)
        if cached is None or cached[0] != key:
            fused = Linear(films[0].in_features, sum(f.out_features for f in films), device="meta").eval()
            fused.weight = nn.Parameter(torch.cat([f.weight.detach() for f in films]), requires_grad=False)
            fused.bias = nn.Parameter(torch.cat([f.bias.detach() for f in films]), requires_grad=False)
            self.__dict__[STACKED_CACHE] = cached = (key, fused)  # (__dict__: not registered as a submodule)
        cached[1].inference_precision = films[0].inference_precision
        return cached[1]
