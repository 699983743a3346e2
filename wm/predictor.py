"""Frame-block-causal transformer predictor over patch tokens (DINO-WM style), with a KV cache.

Tokens of T frames, each frame a grid of P = h * w patch tokens, go through pre-LN transformer
blocks; the output at frame t is the prediction of frame t + 1.

Attention. A token of frame t attends to every token of frames t - window + 1 .. t (block-causal
plus a sliding window of `window = config.max_frames` frames, the model's history length). Each
frame's queries attend to their key prefix with `scaled_dot_product_attention` and no mask
("frame_blocks", the default), so the fused kernels run and attention probabilities are never
materialized; "masked" runs one SDPA call with the equivalent boolean (T*P, T*P) mask (slower on
CPU, kept as a reference and for accelerators where one call is better).

Positions, valid for any grid and any rollout length:
- spatial: fixed 2-D sin-cos embeddings of the patch row / column index (in patch units, MAE
  style), computed for the grid passed in and added after the input projection; no learned table,
  so any image size (any grid) works.
- temporal: rotary embeddings (RoPE) over the absolute frame index applied to queries and keys.
  Scores depend only on frame differences, so keys cached at their absolute index stay valid as
  the window slides. Angles are computed in float64 so large indices lose no precision.

KV cache semantics (exact). `step` feeds one frame at a time; the cache keeps each layer's keys and
values of at most `window - 1` earlier frames. `step` on frames 0..t returns exactly
`forward(frames 0..t)[:, t]` (same sliding-window mask), up to float tolerance. While t < window
this is also `forward(last window frames)[:, -1]`. After the window slides and with depth > 1 it is
not: cached keys of layer l > 0 carry context from frames before the window (the receptive field
grows by window - 1 frames per layer, as in any sliding-window KV cache), a context training on
`window` frames never shows. So `DinoWorldModel.rollout` steps the cache only while the window has not
slid, then runs `forward` on the last `window` frames each step, as DINO-WM does (window times the
cost of a step; with a history of one frame, the default, the window never slides).

CPU inference (no autograd). Each linear layer runs `F.linear` (MKL's sgemm, PyTorch's own path) or
oneDNN's inner product (with GELU fused into the first MLP layer), whichever `wm.kernels` measured
faster on this machine for the layer's shape, dtype and row count (oneDNN's AVX-512 kernels won on
the project's AMD machines and lost on an Intel Xeon, so no fixed rule holds); training uses `F.linear`.
`precision` "bf16" (or "auto" on hardware with bf16 units) runs inference on a cached bf16 copy of the
whole predictor (weights and activations; the output comes back in the input's dtype): at DINO-WM's size
bf16 was faster than fp32 on both CPU kinds measured so far (AMD EPYC with AVX512-BF16: BENCHMARKS.md,
predictor section; Intel Xeon with AMX-BF16: the issue that introduced measured kernels), so "auto" follows
the hardware rather than a timing. Speeds and the kernels chosen: `benchmarks/bench_predictor.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from wm import kernels
from wm.positions import Grid, apply_rope, block_causal_mask, rope_tables, rope_weights, sincos_2d
from wm.precision import Shadow, check_precision, resolve_precision, tensor_key


@dataclass(frozen=True)
class PredictorConfig:
    """Predictor sizes. DINO-WM: in_dim = out_dim = 384 + 10 + 10, dim 404, depth 6, 16 x 64, MLP 2048.

    `max_frames` is the attention window (history length): a frame sees itself and the
    `max_frames - 1` frames before it, in `forward` and in the KV cache alike.
    `in_dim` / `out_dim` equal to `dim` use no input projection / output head (as DINO-WM).
    `attention`: "frame_blocks" (per-frame SDPA calls without a mask, fused kernels) or "masked"
    (one SDPA call with a boolean block-causal sliding-window mask; same result).
    `inference_chunk_tokens`: without autograd, `forward` runs the batch in chunks of at most this
    many tokens (whole samples, at least one) to bound memory; 0: never chunk; None (the default): as
    many tokens as keep each activation of a chunk within `CHUNK_BYTES` (see `Predictor.chunk_samples`).
    `onednn`: without autograd on CPU, let each linear layer choose between `F.linear` and oneDNN by
    measurement (see `linear`), and unmasked attention between SDPA and two matrix products (see
    `Attention.sdpa`); False: always `F.linear` and SDPA.
    `precision`: inference precision (autograd off): "fp32", "bf16" (a cached bf16 copy of the whole
    predictor) or "auto" (bf16 where the hardware has bf16 units, `wm.precision.resolve_precision`).
    Training always runs in fp32.
    """

    in_dim: int
    out_dim: int
    dim: int = 384
    depth: int = 6
    heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.0
    max_frames: int = 16
    rope_base: float = 10000.0
    attention: Literal["frame_blocks", "masked"] = "frame_blocks"
    inference_chunk_tokens: int | None = None
    onednn: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision, allow_auto=True)
        for name in ("in_dim", "out_dim", "dim", "depth", "heads", "head_dim", "mlp_dim", "max_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:  # True was taken as 1
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dim % 4:
            raise ValueError(f"dim must be divisible by 4 (2-D sin-cos embedding), got {self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embedding), got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        chunk = self.inference_chunk_tokens
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
            raise ValueError(f"inference_chunk_tokens must be None (auto) or an int >= 0, got {chunk!r}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1.0):  # nan: NaN outputs, no error
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base}")
        if not isinstance(self.onednn, bool):  # the string "false" was true
            raise ValueError(f"onednn must be True or False, got {self.onednn!r}")
        if self.attention not in ("frame_blocks", "masked"):
            raise ValueError(f"attention must be 'frame_blocks' or 'masked', got {self.attention!r}")

    @property
    def window(self) -> int:
        return self.max_frames

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


# ----------------------------------------------------------------------------- kernels

# oneDNN's inner products have no autograd formula, so they are a candidate only with autograd off.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# A linear layer is calibrated on at most this many rows of its input: which kernel wins can change
# between a few hundred rows and a few thousand (a batch of 30 predictor windows is 17640 rows); more
# rows would make the one-off calibration of a large batch cost seconds.
_CALIBRATION_ROWS = 4096
# The most bytes one activation of a default inference chunk holds (`Predictor.chunk_samples`): glibc's
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, the largest block its malloc reuses instead of mapping afresh.
CHUNK_BYTES = 32 * 2**20
# Attention is calibrated on at most this many samples of its batch (a default bf16 inference chunk at
# DINO-WM's size holds 9 windows).
_ATTENTION_CALIBRATION_SAMPLES = 8
# How much further than at its check a bf16 attention call's logits may reach (`_logit_reach`) and
# still run `_attention_bmm`: its error grows about in proportion, from at most half the bf16 tolerance.
_LOGIT_SLACK = 1.5
# Rotated query / key rows kept per attention layer (`Attention._rotated_rows`): a forward's, and the
# frames of a rollout a planner repeats at every replan (history plus horizon).
_ROTATED_CACHE = 16
# Where rotary positions go (`Attention._rotate_rows`) is measured on up to this many rows.
_ROPE_CALIBRATION_ROWS = 16384


def _linear_native(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool) -> Tensor:
    y = F.linear(x, w, b)
    return F.gelu(y) if gelu else y


def _linear_onednn(x: Tensor, w: Tensor, b: Tensor | None, gelu: bool) -> Tensor:
    attr = "gelu" if gelu else "none"
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], "none")


_LINEAR_KERNELS = {"native": _linear_native, "onednn": _linear_onednn}


def _attention_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _attention_bmm(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v as two batched matrix products and a softmax, the scale applied
    inside the first product; q (B, H, Lq, hd), k, v (B, H, Lk, hd) -> (B, H, Lq, hd), laid out in
    memory as SDPA's CPU output is, (B, Lq, H, hd), so that its callers' copies are the same for both
    (and timed here). The scores are materialized in the input dtype: in bf16 they are rounded before
    the softmax, where SDPA keeps them in fp32, so the error grows with the logits' size
    (`Attention.sdpa` bounds it)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    q3, k3, v3 = q.reshape(b * h, lq, d), k.reshape(b * h, lk, d), v.reshape(b * h, lk, d)
    scores = torch.baddbmm(
        q3.new_empty(1, 1, 1).expand(b * h, lq, lk), q3, k3.transpose(1, 2), beta=0.0, alpha=d**-0.5
    )
    out = torch.bmm(scores.softmax(-1), v3).view(b, h, lq, d)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _logit_reach(q: Tensor, k: Tensor) -> float:
    """A bound on |q . k| / sqrt(hd) over all query / key pairs: max |q| x max |k| / sqrt(hd)."""
    norm = functools.partial(torch.linalg.vector_norm, dim=-1, dtype=torch.float32)
    return (norm(q).amax() * norm(k).amax()).item() * q.shape[-1] ** -0.5


_ATTENTION_KERNELS = {"sdpa": _attention_sdpa, "bmm": _attention_bmm}


def _measurable(x: Tensor) -> bool:
    """Whether a call on `x` may use a kernel chosen by measurement: on CPU, autograd off, not under
    torch.compile (inductor chooses its own kernels), and `x` not empty (nothing to measure on: an empty
    batch's timings are call overhead, and would fix the choice for the smallest real one)."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and x.numel() > 0
    )


def _row_bucket(rows: int, cap: int) -> int:
    """The power of two at or above `rows`, at most `cap`: calls in one bucket share a measured choice."""
    return min(1 << max(rows - 1, 0).bit_length(), cap)


def linear(x: Tensor, layer: nn.Linear, gelu: bool = False, onednn: bool = True) -> Tensor:
    """`layer(x)` (then exact GELU when `gelu`), through `linear_weights`."""
    return linear_weights(x, layer.weight, layer.bias, layer.__dict__, gelu, onednn)


def linear_weights(
    x: Tensor, w: Tensor, b: Tensor | None, owner: dict, gelu: bool = False, onednn: bool = True
) -> Tensor:
    """`F.linear(x, w, b)` (then exact GELU when `gelu`). For CPU inference with `onednn` allowed, through
    the kernel `wm.kernels` measured faster for this weight shape, dtype and row count (rows bucketed by
    powers of two up to `_CALIBRATION_ROWS`, the size the calibration runs at; the choice is remembered
    in `owner`, the layer's `__dict__`); else `F.linear`."""
    if not (onednn and _ONEDNN_LINEAR) or not _measurable(x):
        return _linear_native(x, w, b, gelu)
    rows = x.numel() // x.shape[-1]
    bucket = _row_bucket(rows, _CALIBRATION_ROWS)
    memo = owner.setdefault("_kernel_memo", {})
    mk = (tuple(w.shape), b is not None, bucket, x.dtype, gelu, kernels.memo_token())
    name = memo.get(mk)
    if name is None:
        sample = x.reshape(-1, x.shape[-1])[:_CALIBRATION_ROWS]  # (rows, in)
        name = kernels.choose(
            f"linear {w.shape[1]}->{w.shape[0]} bias={b is not None} gelu={gelu} rows~{bucket} {x.dtype}",
            {n: functools.partial(fn, sample, w, b, gelu) for n, fn in _LINEAR_KERNELS.items()},
            native="native",
            tol=kernels.FP32_TOL if x.dtype == torch.float32 else kernels.BF16_TOL,
        )
        kernels.remember(memo, mk, name)
    return _LINEAR_KERNELS[name](x, w, b, gelu)


# ----------------------------------------------------------------------------- blocks


@dataclass
class KVCache:
    """Per-layer keys / values (B, H, n * P, hd) of the last n <= window - 1 frames, rotated at their
    absolute frame index; `next_frame` is the absolute index the next `step` frame gets."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    next_frame: int = 0
    frames: int = 0
    grid: Grid | None = None


class _RotatedRows(dict):
    """(first frame, frames, device, dtype) -> (tensor_key of qkv.weight, `rope_weights` rows); a deep
    copy (the predictor's bf16 copy) starts empty rather than holding fp32 rows it never uses."""

    def __deepcopy__(self, memo: dict) -> _RotatedRows:
        return _RotatedRows()


class Attention(nn.Module):
    """Multi-head attention with rotary temporal positions on q / k; no bias on the qkv projection."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.heads, self.dropout, self.onednn = cfg.heads, cfg.dropout, cfg.onednn
        self.head_dim, self.rope_base, self.inner = cfg.head_dim, cfg.rope_base, cfg.inner_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.inner_dim, bias=False)
        self.proj = nn.Linear(cfg.inner_dim, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.dropout)
        self._rotated = _RotatedRows()

    def qkv_heads(self, x: Tensor, start: int, patches: int) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T*P, D) of frames start .. start + T - 1 -> q, k (rotated at their frame), v, each
        (B, H, T*P, hd).

        A frame's rotation is linear and the same for all its tokens, so it can be folded into that
        frame's query / key projection rows (`rope_weights`) instead of applied to q and k (in bf16 a
        pass over both in fp32 and back); the rows then need one product per frame and, for several
        frames, a copy that joins their outputs. Which of the two is faster depends on the dtype and
        the CPU, so CPU inference chooses by measurement (`_rotate_rows`); autograd and other devices
        rotate q and k. The result is the same either way, up to rounding.
        """
        rot = rope_tables(start, x.shape[1] // patches, self.head_dim, self.rope_base, x)  # (T, hd/2)
        if self._rotate_rows(x, rot, patches):
            return self._qkv_rows(x, self._rotated_rows(start, rot), patches)
        return self._qkv_activations(x, rot, patches)

    def _qkv_activations(self, x: Tensor, rot: Tensor, patches: int) -> tuple[Tensor, Tensor, Tensor]:
        qkv = linear(x, self.qkv, onednn=self.onednn)  # (B, T*P, 3*H*hd)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
        return apply_rope(q, rot, patches), apply_rope(k, rot, patches), v

    def _qkv_rows(self, x: Tensor, w_qk: Tensor, patches: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k from each frame's rotated rows w_qk (T, 2*H*hd, D), v from the plain rows."""
        b, n, d = x.shape
        owner, inner = self.qkv.__dict__, self.inner
        frames = [x[:, t * patches : (t + 1) * patches].reshape(b * patches, d) for t in range(w_qk.shape[0])]
        qk = [
            linear_weights(xt, w_t, None, owner, onednn=self.onednn).view(b, patches, -1)
            for xt, w_t in zip(frames, w_qk, strict=True)
        ]  # T x (B, P, 2*H*hd)
        qk = qk[0] if len(qk) == 1 else torch.cat(qk, dim=1)  # (B, T*P, 2*H*hd)
        v = linear_weights(x, self.qkv.weight[2 * inner :], None, owner, onednn=self.onednn)  # (B, T*P, H*hd)
        q, k = rearrange(qk, "b n (two h d) -> two b h n d", two=2, h=self.heads).unbind(0)
        return q, k, rearrange(v, "b n (h d) -> b h n d", h=self.heads)

    def _rotation(self, rot: Tensor) -> Tensor:
        """The query / key projection rows rotated for the frames of rot (T, hd/2): (T, 2*H*hd, D)."""
        return rope_weights(self.qkv.weight[: 2 * self.inner].detach(), rot, self.heads)

    def _rotate_rows(self, x: Tensor, rot: Tensor, patches: int) -> bool:
        """Whether this call rotates projection rows rather than q and k: measured (`wm.kernels`) per
        frame count, row count (bucketed by powers of two) and dtype on whole samples of the batch, up to
        `_ROPE_CALIBRATION_ROWS` rows (the two differ in memory traffic, so smaller samples, which stay
        in cache, mislead). The rows are timed as rotated beforehand, as the cache serves them; a rollout
        step at a new frame index also computes them (1-2 ms a layer at DINO-WM's size, under a hundredth
        of a step at a batch of 30)."""
        if not _measurable(x):
            return False
        b, n, d = x.shape
        frames, rows = n // patches, b * n
        bucket = _row_bucket(rows, _ROPE_CALIBRATION_ROWS)
        memo = self.__dict__.setdefault("_kernel_memo", {})
        mk = (frames, patches, bucket, x.dtype, kernels.memo_token())
        name = memo.get(mk)
        if name is None:
            sample = x[: max(1, _ROPE_CALIBRATION_ROWS // n)]  # whole samples, (b', T*P, D)
            w_qk = functools.cache(lambda: self._rotation(rot))  # rotated at the first call only
            candidates = {  # k: rotated in both
                "activations": lambda: self._qkv_activations(sample, rot, patches)[1],
                "rows": lambda: self._qkv_rows(sample, w_qk(), patches)[1],
            }
            name = kernels.choose(
                f"rope {frames}x{patches} {d}->{2 * self.inner} rows~{bucket} {x.dtype}",
                candidates,
                native="activations",
                tol=kernels.FP32_TOL if x.dtype == torch.float32 else kernels.BF16_TOL,
            )
            kernels.remember(memo, mk, name)
        return name == "rows"

    def _rotated_rows(self, start: int, rot: Tensor) -> Tensor:
        """`rope_weights` of the query / key rows for these frames (inference only), cached (a few
        entries) until the weight changes."""
        w = self.qkv.weight
        key, version = (start, rot.shape[0], w.device, w.dtype), tensor_key([w])
        hit = self._rotated.get(key)
        if hit is None or hit[0] != version:
            if len(self._rotated) >= _ROTATED_CACHE:
                self._rotated.pop(next(iter(self._rotated)))  # the oldest
            hit = self._rotated[key] = (version, self._rotation(rot))
        return hit[1]

    def sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scaled dot-product attention, q (B, H, Lq, hd), k, v (B, H, Lk, hd) -> (B, H, Lq, hd). For
        unmasked CPU inference with measured kernels allowed (`onednn`), through the kernel `wm.kernels`
        measured faster for these lengths, head shape, dtype, key layout (a strided view or contiguous)
        and batch (bucketed by powers of two up to `_ATTENTION_CALIBRATION_SAMPLES`): PyTorch's fused
        SDPA or `_attention_bmm`.

        In bf16, `_attention_bmm`'s error grows with the logits' size, so it must come within half the
        bf16 tolerance at calibration, and a later call whose logits may reach further than
        `_LOGIT_SLACK` x those the layer was checked on (`_logit_reach`, a bound from the largest query
        and key norms) runs SDPA instead."""
        b, h, lq, d = q.shape
        if mask is not None or self.training or not self.onednn or not _measurable(q):
            p = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        bucket, bf16 = _row_bucket(b, _ATTENTION_CALIBRATION_SAMPLES), q.dtype != torch.float32
        layout = "contiguous" if k.is_contiguous() else "strided"
        memo = self.__dict__.setdefault("_kernel_memo", {})
        mk = ("attention", h, lq, k.shape[2], d, bucket, q.dtype, layout, kernels.memo_token())
        hit = memo.get(mk)
        if hit is None:
            cut = _ATTENTION_CALIBRATION_SAMPLES
            sample = q[:cut], k[:cut], v[:cut]
            name = kernels.choose(
                f"attention {h}x{d} q{lq} k{k.shape[2]} batch~{bucket} {q.dtype} k {layout}",
                {n: functools.partial(fn, *sample) for n, fn in _ATTENTION_KERNELS.items()},
                native="sdpa",
                tol={"bmm": kernels.BF16_TOL / 2} if bf16 else kernels.FP32_TOL,
            )
            hit = (name, _logit_reach(*sample[:2]) if name == "bmm" and bf16 else math.inf)
            kernels.remember(memo, mk, name, hit)
        name, reach = hit
        if reach < math.inf and _logit_reach(q, k) > _LOGIT_SLACK * reach:
            name = "sdpa"  # logits beyond what the two products were checked on
        return _ATTENTION_KERNELS[name](q, k, v)

    def frame_blocks(
        self, q: Tensor, k: Tensor, v: Tensor, patches: int, window: int
    ) -> Iterator[tuple[slice, Tensor]]:
        """Per frame t: its token rows and the attention of its queries against the keys of frames
        t-window+1 .. t (one unmasked SDPA call), (B, H, P, hd)."""
        for t in range(q.shape[2] // patches):
            lo, hi = max(0, t - window + 1) * patches, (t + 1) * patches
            yield slice(t * patches, hi), self.sdpa(q[:, :, t * patches : hi], k[:, :, lo:hi], v[:, :, lo:hi])

    def attend_frames(
        self, q: Tensor, k: Tensor, v: Tensor, patches: int, window: int, masked: bool
    ) -> Tensor:
        """Block-causal sliding-window attention over T frames; q, k, v (B, H, T*P, hd) -> (B, T*P, H*hd)."""
        if masked:
            mask = block_causal_mask(q.shape[2] // patches, patches, window, q.device)
            outs = [self.sdpa(q, k, v, mask)]
        else:
            outs = [o for _, o in self.frame_blocks(q, k, v, patches, window)]
        # SDPA's CPU output is laid out (B, N, H, hd): transposing back is free, so one copy in cat.
        out = torch.cat([o.transpose(1, 2) for o in outs], dim=1)  # (B, T*P, H, hd)
        return rearrange(out, "b n h d -> b n (h d)")

    def out(self, attn: Tensor) -> Tensor:
        return self.proj_drop(linear(attn, self.proj, onednn=self.onednn))


class MLP(nn.Module):
    """Linear, exact GELU, dropout, linear, dropout (GELU fused into the first linear on oneDNN)."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.onednn = cfg.onednn
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(linear(x, self.fc1, gelu=True, onednn=self.onednn))
        return self.drop(linear(h, self.fc2, onednn=self.onednn))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, start: int, patches: int, window: int, masked: bool) -> Tensor:
        """x (B, T*P, D) over T whole frames, the first at absolute index `start`."""
        q, k, v = self.attn.qkv_heads(self.norm1(x), start, patches)
        if masked or torch.is_grad_enabled():
            x = x + self.attn.out(self.attn.attend_frames(q, k, v, patches, window, masked))
        else:
            x = self._attend_residual(x, q, k, v, patches, window)
        return x + self.mlp(self.norm2(x))

    def _attend_residual(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, patches: int, window: int
    ) -> Tensor:
        """Inference form of `x + out(attend_frames(...))`: each frame block's attention output goes
        through the projection and the residual add straight into its rows of the result, so the
        per-block outputs are never concatenated (a full extra copy of the activations; its share of a
        DINO-WM-size forward on CPU is in BENCHMARKS.md, predictor section)."""
        y = torch.empty_like(x)
        for rows, o in self.attn.frame_blocks(q, k, v, patches, window):
            o = rearrange(o.transpose(1, 2), "b p h d -> b p (h d)")  # a view of SDPA's (B, P, H, hd) layout
            torch.add(x[:, rows], self.attn.out(o), out=y[:, rows])
        return y

    def step(
        self, x: Tensor, start: int, k_cache: Tensor | None, v_cache: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, P, D) of one frame; returns the block output and the keys / values it attended to
        (cached frames then this frame), (B, H, (n+1)*P, hd)."""
        q, k, v = self.attn.qkv_heads(self.norm1(x), start, x.shape[1])
        k_all = k if k_cache is None else torch.cat([k_cache, k], dim=2)  # (B, H, (n+1)*P, hd)
        v_all = v if v_cache is None else torch.cat([v_cache, v], dim=2)
        attn = rearrange(self.attn.sdpa(q, k_all, v_all), "b h n d -> b n (h d)")  # (B, P, H*hd)
        x = x + self.attn.out(attn)
        return x + self.mlp(self.norm2(x)), k_all, v_all


# ----------------------------------------------------------------------------- predictor


class Predictor(nn.Module):
    """Next-frame predictor over patch tokens; see the module docstring for attention and positions."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.in_dim, cfg.dim) if cfg.in_dim != cfg.dim else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.out_dim) if cfg.out_dim != cfg.dim else None
        self.apply(_init_weights)
        self._bf16 = Shadow()  # the bf16 copy inference runs on in bf16 (no state-dict entries)

    @property
    def window(self) -> int:
        return self.cfg.max_frames

    def _embed(self, tokens: Tensor, grid: Grid) -> Tensor:
        """tokens (..., P, in_dim) -> (..., P, dim) with the spatial embedding added."""
        patches = tokens.shape[-2]
        if grid[0] * grid[1] != patches or tokens.shape[-1] != self.cfg.in_dim:
            raise ValueError(
                f"tokens (..., {patches}, {tokens.shape[-1]}) do not match grid {tuple(grid)} "
                f"and in_dim {self.cfg.in_dim}"
            )
        x = linear(tokens, self.in_proj, onednn=self.cfg.onednn) if self.in_proj is not None else tokens
        return self.drop(x + sincos_2d(grid, self.cfg.dim, x))

    def _out(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return linear(x, self.head, onednn=self.cfg.onednn) if self.head is not None else x

    def forward(self, tokens: Tensor, grid: Grid) -> Tensor:
        """tokens (B, T, P, in_dim), P = grid[0] * grid[1] -> (B, T, P, out_dim); output t predicts frame t+1.

        Without autograd (no_grad / inference_mode) the batch runs in chunks of `chunk_samples`
        samples, so peak memory stays bounded for large batches.
        """
        if tokens.ndim != 4 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be (B, T >= 1, P, in_dim), got {tuple(tokens.shape)}")
        self._check_dtype("tokens", tokens)
        _check_grid(grid)
        batch, frames, patches, _ = tokens.shape
        per_chunk = self.chunk_samples(frames * patches, tokens)
        if torch.is_grad_enabled() or per_chunk == 0 or batch <= per_chunk:
            return self._run(tokens, grid)
        out = tokens.new_empty(batch, frames, patches, self.cfg.out_dim)
        for lo in range(0, batch, per_chunk):
            out[lo : lo + per_chunk] = self._run(tokens[lo : lo + per_chunk], grid)
        return out

    def _check_dtype(self, name: str, x: Tensor) -> None:
        """Tokens in the weights' dtype (autocast casts itself); float64 or integer tokens were a dtype
        error from a matrix product."""
        want = self.norm.weight.dtype
        if x.dtype != want and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{name} are {x.dtype} but the predictor's weights are {want}: convert with .to({want})"
            )

    def chunk_samples(self, tokens_per_sample: int, tokens: Tensor) -> int:
        """Samples per inference chunk of `forward` for these input tokens (0: do not chunk).

        By default (`inference_chunk_tokens=None`) a chunk is as many whole samples as keep its widest
        activation (the qkv projection or the MLP's hidden layer, in the dtype inference runs in) within
        `CHUNK_BYTES`, the largest block glibc's malloc serves from memory it keeps (its mmap threshold
        never rises above it on 64-bit Linux). Larger blocks are mapped afresh for every intermediate and
        every page faulted in on first touch: at DINO-WM's size and a batch of 30 that was a tenth of a
        bf16 forward's CPU time (BENCHMARKS.md, predictor section).
        """
        chunk = self.cfg.inference_chunk_tokens
        if chunk is None:
            width = max(3 * self.cfg.inner_dim, self.cfg.mlp_dim, self.cfg.out_dim, self.cfg.in_dim)
            size = 2 if self._bf16_active(tokens) else tokens.element_size()
            chunk = CHUNK_BYTES // (width * size)
        return chunk and max(1, chunk // tokens_per_sample)

    @property
    def precision(self) -> str:
        """The inference precision in use on the model's device: "fp32" or "bf16" ("auto" resolved)."""
        return resolve_precision(self.cfg.precision, self.norm.weight.device)

    def _bf16_active(self, x: Tensor) -> bool:
        p = self.cfg.precision
        if p == "fp32" or torch.is_grad_enabled() or x.dtype != torch.float32:
            return False
        return resolve_precision(p, x.device) == "bf16"

    def _run(self, tokens: Tensor, grid: Grid) -> Tensor:
        if self._bf16_active(tokens):
            return self._bf16(self)._forward(tokens.bfloat16(), grid).to(tokens.dtype)
        return self._forward(tokens, grid)

    def _forward(self, tokens: Tensor, grid: Grid) -> Tensor:
        frames, patches = tokens.shape[1:3]
        x = rearrange(self._embed(tokens, grid), "b t p d -> b (t p) d")
        masked = self.cfg.attention == "masked"
        for block in self.blocks:
            x = block(x, 0, patches, self.window, masked)
        x = self._out(x)
        return rearrange(x, "b (t p) d -> b t p d", t=frames)

    def init_cache(self, batch: int = 0, grid: Grid | None = None) -> KVCache:
        """An empty cache; `batch` is informational (the cache takes its size from the first step)."""
        del batch
        return KVCache(grid=None if grid is None else (int(grid[0]), int(grid[1])))

    def step(self, tokens_t: Tensor, grid: Grid, cache: KVCache) -> tuple[Tensor, KVCache]:
        """One new frame (B, P, in_dim) -> its output (B, P, out_dim) and the updated cache.

        Equals `forward` over all frames fed so far (at the last frame), with the same sliding window.
        The cache passed in is not modified. In bf16 (`precision`) the cache holds bf16 keys and values.
        Without autograd the batch runs in chunks as `forward`'s (`chunk_samples`, counting each sample
        as a whole window of tokens), each chunk's keys and values written into the new cache.
        """
        if tokens_t.ndim != 3:
            raise ValueError(f"tokens_t must be one frame (B, P, in_dim), got {tuple(tokens_t.shape)}")
        self._check_dtype("tokens_t", tokens_t)
        _check_grid(grid)
        grid = (int(grid[0]), int(grid[1]))
        if cache.grid is not None and cache.grid != grid:
            raise ValueError(f"cache was built for grid {cache.grid}, got {grid}")
        if cache.frames and cache.keys[0].shape[0] != tokens_t.shape[0]:  # was a torch.cat size error
            raise ValueError(
                f"tokens_t has batch {tokens_t.shape[0]} but the cache holds {cache.keys[0].shape[0]} "
                "samples: start a new cache (init_cache) for another batch"
            )
        window_tokens = tokens_t.shape[1] * self.window
        per_chunk = 0 if torch.is_grad_enabled() else self.chunk_samples(window_tokens, tokens_t)
        if self._bf16_active(tokens_t):
            out, new = self._bf16(self)._step(tokens_t.bfloat16(), grid, cache, per_chunk)
            return out.to(tokens_t.dtype), new
        return self._step(tokens_t, grid, cache, per_chunk)

    def _step(self, tokens_t: Tensor, grid: Grid, cache: KVCache, per_chunk: int) -> tuple[Tensor, KVCache]:
        batch, patches = tokens_t.shape[:2]
        frames = min(cache.frames + 1, self.window - 1)  # the new cache's
        if per_chunk == 0 or batch <= per_chunk:
            out, keys, values = self._step_chunk(tokens_t, grid, cache, slice(None), frames * patches, True)
            return out, KVCache(keys, values, cache.next_frame + 1, frames, grid)
        out = keys = values = None
        for lo in range(0, batch, per_chunk):
            rows = slice(lo, lo + per_chunk)
            y, k, v = self._step_chunk(tokens_t[rows], grid, cache, rows, frames * patches, False)
            if out is None:  # (B, ...) tensors the chunks write into
                out = y.new_empty(batch, *y.shape[1:])
                keys = [t.new_empty(batch, *t.shape[1:]) for t in k]
                values = [t.new_empty(batch, *t.shape[1:]) for t in v]
            out[rows] = y
            for i in range(len(k)):
                keys[i][rows], values[i][rows] = k[i], v[i]
        return out, KVCache(keys, values, cache.next_frame + 1, frames, grid)

    def _step_chunk(
        self, tokens_t: Tensor, grid: Grid, cache: KVCache, rows: slice, keep: int, own: bool
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """One frame of these samples (the cache's `rows`): the output, and per layer the keys and values
        (b, H, keep, hd) of the last `keep` tokens (the frames the next step may attend to): tensors of
        their own when `own`, else possibly views the caller copies."""
        x = self._embed(tokens_t, grid)  # (b, P, D)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            k_c = cache.keys[i][rows] if cache.frames else None
            v_c = cache.values[i][rows] if cache.frames else None
            x, k_all, v_all = block.step(x, cache.next_frame, k_c, v_c)
            # drop frames that left the window; copying the kept ones frees the (n+1)-frame tensor
            start = k_all.shape[2] - keep
            keys.append(k_all[:, :, start:].clone() if start and own else k_all[:, :, start:])
            values.append(v_all[:, :, start:].clone() if start and own else v_all[:, :, start:])
        return self._out(x), keys, values


def _check_grid(grid: Grid) -> None:
    """A patch grid is two whole numbers >= 1 (a grid of 2.5 x 1.6 passed the patch count check)."""
    if len(grid) != 2 or not all(g == int(g) and g >= 1 for g in grid):
        raise ValueError(f"grid must be two whole numbers >= 1 (patch rows, columns), got {tuple(grid)}")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["KVCache", "Predictor", "PredictorConfig", "block_causal_mask", "num_params", "sincos_2d"]
