"""Transformer denoiser in the style of Diffusion Policy's TransformerForDiffusion.

Action tokens (one per step of the horizon) attend to each other (causally by default, as in
Diffusion Policy) and cross-attend to a short memory of conditioning tokens: the diffusion step
embedding followed by one token per observation step. A pre-norm `nn.TransformerDecoder` does the
work; learned positional embeddings are added to both the action and the memory tokens.

bf16 inference (`precision.set_inference_precision`, autograd off) runs a cached bf16 copy of the
whole denoiser under autocast (matrix products in bf16, LayerNorm and softmax as autocast decides),
and returns fp32; on a CPU only for input shapes where that copy was measured faster than the fp32
network (`Bf16Inference.run_in_precision`, `wm.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from policies.diffusion.precision import Bf16Inference, Shadow
from policies.diffusion.unet import SinusoidalPosEmb
from wm.options import check_numbers


@dataclass(frozen=True)
class TransformerConfig:
    dim: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1  # Diffusion Policy: 0.1 on the action tokens, 0.3 on attention
    causal: bool = True  # action token t attends to tokens <= t

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model.transformer")  # built directly too
        if self.dim < 1 or self.depth < 1 or self.heads < 1 or self.mlp_ratio < 1:
            raise ValueError(f"transformer sizes must be positive, got {self}")
        if self.dim % self.heads:
            raise ValueError(f"transformer dim {self.dim} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class TransformerDenoiser(Bf16Inference, nn.Module):
    """Denoiser `net(x (B, Ta, Din), t (B,), cond (B, To, Dc)) -> (B, Ta, Da)` for fixed Ta and To; Din is
    `in_dim` (default Da; more where the noisy actions come with input channels, `noise.Committed`)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        n_obs: int,
        in_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.horizon, self.n_obs = cfg, horizon, n_obs
        self._bf16 = Shadow()
        D = cfg.dim
        self.action_in = nn.Linear(in_dim or action_dim, D)
        self.action_pos = nn.Parameter(torch.zeros(1, horizon, D))
        self.step_emb = nn.Sequential(SinusoidalPosEmb(D), nn.Linear(D, D), nn.Mish(), nn.Linear(D, D))
        self.cond_in = nn.Linear(cond_dim, D) if cond_dim > 0 else None
        self.cond_pos = nn.Parameter(torch.zeros(1, 1 + n_obs, D))
        self.cond_mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.Mish(), nn.Linear(4 * D, D))
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerDecoderLayer(
            D, cfg.heads, cfg.mlp_ratio * D, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.depth)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, action_dim)
        mask = torch.triu(torch.full((horizon, horizon), float("-inf")), diagonal=1) if cfg.causal else None
        self.register_buffer("causal_mask", mask, persistent=False)
        nn.init.normal_(self.action_pos, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if x.shape[1] != self.horizon:
            raise ValueError(
                f"the transformer denoiser was built for horizon {self.horizon}, got {x.shape[1]} steps"
            )
        return self.run_in_precision(
            (x, t, cond), lambda: self.denoise(x, t, cond), lambda: self._denoise_bf16(x, t, cond)
        )

    def _denoise_bf16(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self._bf16(self).denoise(x, t, cond).float()

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The network itself (forward adds the horizon check and the bf16 dispatch)."""
        tokens = self.drop(self.action_in(x) + self.action_pos)  # (B, Ta, D)
        memory = self.step_emb(t)[:, None]  # (B, 1, D)
        if self.cond_in is not None and cond is not None:
            memory = torch.cat([memory, self.cond_in(cond)], dim=1)  # (B, 1 + To, D)
        memory = self.cond_mlp(self.drop(memory + self.cond_pos[:, : memory.shape[1]]))
        h = self.decoder(tokens, memory, tgt_mask=self.causal_mask, tgt_is_causal=self.cfg.causal)
        return self.head(self.norm(h))  # (B, Ta, Da)
