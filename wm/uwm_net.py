"""The UWM denoiser: one transformer over action-chunk tokens and future-frame latent tokens, each
modality at its own diffusion timestep, conditioned by AdaLN-Zero on both timesteps and on the
current observation.

Tokens, in sequence order:
    action tokens   (Ta)          a 2-layer MLP of each normalized action (Da -> D), learned positions
    frame tokens    (F * V * h/p * w/p) future-frame latents (C, h, w) of each of the V cameras cut into
                                  p x p patches, each patch concatenated with the same camera's
                                  observation latents' patch at the same place (as image-to-video
                                  diffusion concatenates the conditioning frame), a linear map
                                  ((1 + To) C p p -> D), learned positions per frame, camera and patch,
                                  plus (with several cameras) a learned embedding of the camera, shared
                                  by all its tokens (without it each token learns its camera alone: the
                                  two-camera test task had not learned forward dynamics after 1500 steps)
    obs tokens      (To * V * h/p * w/p + To, only with `obs_tokens`) the observation latents patched
                                  the same way by their own linear map, and one token per proprio step
    registers       (R)           learned tokens that carry no input (Darcet et al.)
All tokens attend to all (bidirectional); a pre-norm block is attention then MLP, each scaled and
shifted by the conditioning and gated (AdaLN-Zero, Peebles & Xie).

Conditioning vector c (B, D) = emb_a(t_a) + emb_v(t_v) + obs_proj(observation), with obs_proj a
linear map of the flattened observation latents and normalized proprioception straight to the model
width, then an MLP. The reference design instead concatenates the (3072-d) observation features with
the timestep embedding and maps that to every block's six AdaLN vectors: two thirds of its
parameters. Here each block's AdaLN map is D -> 6 D whatever the observation size.

Zero at initialization: every AdaLN gate, the final AdaLN map and both output heads start at zero,
so the untrained network outputs exactly 0 and every block starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from policies.diffusion.unet import SinusoidalPosEmb


def check_patch(patch: int, grid: tuple[int, int]) -> None:
    """The patch side must divide the (h, w) latent grid."""
    h, w = grid
    if h % patch or w % patch:
        raise ValueError(f"UWM patch {patch} does not divide the {h}x{w} latent grid; choose model.net.patch")


@dataclass(frozen=True)
class DiTConfig:
    """dim / depth / heads / mlp_ratio: the transformer; registers: extra learned tokens; patch: side of
    the latent patch one frame token covers; obs_tokens: the observation also enters as tokens (not
    only through the AdaLN conditioning); dropout: on attention and MLP outputs."""

    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 4
    registers: int = 4
    patch: int = 2
    obs_tokens: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.dim, self.depth, self.heads, self.mlp_ratio, self.patch) < 1 or self.registers < 0:
            raise ValueError(f"UWM transformer sizes must be positive, got {self}")
        if self.dim % self.heads:
            raise ValueError(f"UWM transformer dim {self.dim} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm attention + MLP, both modulated and gated by the conditioning (AdaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, D), c (B, D) -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # 6 x (B, D)
        q, k, v = rearrange(
            self.qkv(modulate(self.norm1(x), shift1, scale1)),
            "b n (three h d) -> three b h n d",
            three=3,
            h=self.heads,
        )
        p = self.dropout if self.training else 0.0
        att = rearrange(F.scaled_dot_product_attention(q, k, v, dropout_p=p), "b h n d -> b n (h d)")
        x = x + gate1[:, None] * self.drop(self.proj(att))
        return x + gate2[:, None] * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class UWMNet(nn.Module):
    """net(actions (B, Ta, Da), t_a (B,), frames (B, F, V, C, h, w), t_v (B,), obs (B, To, V, C, h, w),
    proprio (B, To, Dp) | None) -> (action prediction (B, Ta, Da), frame prediction (B, F, V, C, h, w)),
    V cameras.

    Inputs are the diffusion's VP-scaled noisy samples and (fractional) training timesteps; observations
    are clean latents and normalized proprioception (zeros where a sample has none)."""

    def __init__(
        self,
        cfg: DiTConfig,
        action_dim: int,
        horizon: int,
        latent_shape: tuple[int, int, int],
        n_future: int,
        n_obs: int,
        proprio_dim: int,
        n_views: int = 1,
    ) -> None:
        super().__init__()
        C, h, w = latent_shape
        p, D, V = cfg.patch, cfg.dim, n_views
        check_patch(p, (h, w))
        self.cfg, self.latent_shape, self.n_future, self.horizon = cfg, tuple(latent_shape), n_future, horizon
        self.n_views = V
        self.grid = (h // p, w // p)
        n_patch = self.grid[0] * self.grid[1]
        self.action_in = nn.Sequential(nn.Linear(action_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.action_pos = nn.Parameter(torch.randn(1, horizon, D) * 0.02)
        self.frame_in = nn.Linear((1 + n_obs) * C * p * p, D)
        self.frame_pos = nn.Parameter(torch.randn(1, n_future * V * n_patch, D) * 0.02)
        self.camera_emb = nn.Parameter(torch.randn(1, V, 1, D) * 0.02) if V > 1 else None  # (1, V, 1, D)
        self.registers = nn.Parameter(torch.randn(1, cfg.registers, D) * 0.02)
        obs_dim = n_obs * (V * C * h * w + proprio_dim)
        self.obs_proj = nn.Sequential(nn.Linear(obs_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.t_emb_a = nn.Sequential(SinusoidalPosEmb(D), nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.t_emb_v = nn.Sequential(SinusoidalPosEmb(D), nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        if cfg.obs_tokens:
            self.obs_in = nn.Linear(C * p * p, D)
            self.obs_pos = nn.Parameter(torch.randn(1, n_obs * V * n_patch, D) * 0.02)
            self.proprio_in = nn.Linear(proprio_dim, D) if proprio_dim else None
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.action_out = nn.Linear(D, action_dim)
        self.frame_out = nn.Linear(D, C * p * p)
        for layer in (self.ada_out[1], self.action_out, self.frame_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """(F, V, C, h, w): the predicted frames of one sample."""
        return (self.n_future, self.n_views, *self.latent_shape)

    def _frame_tokens(self, frames: Tensor, obs: Tensor) -> Tensor:
        """frames (B, F, V, C, h, w), obs (B, To, V, C, h, w) -> (B, F * V * h/p * w/p, (1 + To) C p p):
        each future patch beside the same camera's observation patches at the same place."""
        p, F_ = self.cfg.patch, frames.shape[1]
        fut = rearrange(frames, "b f v c (gh p1) (gw p2) -> b f v (gh gw) (c p1 p2)", p1=p, p2=p)
        now = rearrange(obs, "b t v c (gh p1) (gw p2) -> b v (gh gw) (t c p1 p2)", p1=p, p2=p)
        both = torch.cat([fut, now[:, None].expand(-1, F_, -1, -1, -1)], dim=-1)
        return rearrange(both, "b f v n d -> b (f v n) d")

    def _camera(self, x: Tensor) -> Tensor:
        """Tokens (B, T * V * n, D), step-major then camera, plus their camera's embedding."""
        if self.camera_emb is None:
            return x
        B, _, D = x.shape
        per_step = x.view(B, -1, self.n_views, self.grid[0] * self.grid[1], D)  # (B, T, V, n, D)
        return (per_step + self.camera_emb[:, None]).flatten(1, 3)

    def _patch(self, x: Tensor) -> Tensor:
        """(B, T, V, C, h, w) -> (B, T * V * h/p * w/p, C p p) patches, frame-major, then camera."""
        p = self.cfg.patch
        return rearrange(x, "b t v c (gh p1) (gw p2) -> b (t v gh gw) (c p1 p2)", p1=p, p2=p)

    def _unpatch(self, x: Tensor) -> Tensor:
        """(B, F * V * h/p * w/p, C p p) -> (B, F, V, C, h, w)."""
        p, (gh, gw) = self.cfg.patch, self.grid
        return rearrange(
            x, "b (t v gh gw) (c p1 p2) -> b t v c (gh p1) (gw p2)", v=self.n_views, gh=gh, gw=gw, p1=p, p2=p
        )

    def forward(
        self,
        actions: Tensor,
        t_a: Tensor,
        frames: Tensor,
        t_v: Tensor,
        obs: Tensor,
        proprio: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        B, Ta = actions.shape[:2]
        flat = [obs.reshape(B, -1)] + ([proprio.reshape(B, -1)] if proprio is not None else [])
        c = self.t_emb_a(t_a) + self.t_emb_v(t_v) + self.obs_proj(torch.cat(flat, dim=1))  # (B, D)
        tokens = [
            self.action_in(actions) + self.action_pos,
            self._camera(self.frame_in(self._frame_tokens(frames, obs)) + self.frame_pos),
        ]
        if self.cfg.obs_tokens:
            tokens.append(self._camera(self.obs_in(self._patch(obs)) + self.obs_pos))
            if self.proprio_in is not None and proprio is not None:
                tokens.append(self.proprio_in(proprio))  # (B, To, D)
        tokens.append(self.registers.expand(B, -1, -1))
        x = torch.cat(tokens, dim=1)  # (B, N, D)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        x = modulate(self.norm_out(x), shift, scale)
        n_frame = self.frame_pos.shape[1]
        return self.action_out(x[:, :Ta]), self._unpatch(self.frame_out(x[:, Ta : Ta + n_frame]))
