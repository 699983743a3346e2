"""UWM speed against the reference design (issue 14, measured item 4), at equal width, depth and tokens.

    python benchmarks/bench_uwm_speed.py [--width 192 --depth 6 --heads 4 --patch 4] [--batch 32]
        [--steps 10 --repeats 20 --warmup 2] [--threads N] [--cameras 1]
    (the reference's own size: --width 768 --depth 12 --heads 12)

Task shape (arm-push-like): `--cameras` cameras (1; the reference's robomimic / LIBERO configs read
2) of 64x64 frames, 2 observation steps, 16 actions of dim 2, proprio dim 6, future frames at steps
(8, 16), our small autoencoder (`wm.autoencoder`, random init) giving 4 x 16 x 16 latents; all
weights random (speed only).

    ours       `wm.uwm.UWM`: the observation projected to the model width before the AdaLN maps; trains
               on cached latent tokens (B, n_obs + F, P, C), so a step encodes no image; a policy chunk
               encodes the two observation frames with the codec, then EDM Heun 3 steps (5 network
               calls) or DPM-Solver++(2M) 3 steps (3 calls).
    reference  `RefUWM` below, re-implemented from ../shared/UWM.md: each block's AdaLN map takes
               concat(MLP(two timestep embeddings), flattened observation features + proprio) -> 6 D;
               a ResNet-18 with GroupNorm (random init, fc -> `width` features per frame and camera,
               one network shared by the cameras, trained with the model) runs on every observation
               frame at every step and chunk; each camera's future frames
               are encoded by the same autoencoder at every step (a posterior sample, no grad);
               epsilon prediction; DDIM-10 in policy mode (future frames pure noise at t = T - 1).

Equal token count: ours cuts each future frame's (C, h, w) latent into p x p patches (F h w / p^2
tokens); the reference's Conv3d patchifier covers 2 frames at once, so its kernel is (2, p / 2, p)
(for p = 2: (2, 1, 2)), which gives the same F h w / p^2 frame tokens, per camera. Both have `horizon` action
tokens and the same registers (`--registers`); attention is full in both and uses the same kernel
(`F.scaled_dot_product_attention`); both run fp32 on the same threads.

Measured, interleaving ours and the reference so drift hits both (medians after warm-up):
parameters (denoiser, AdaLN share, trained observation encoder, frozen codec); training step time
(forward + backward + AdamW step; no EMA in either); the reference's step with its image encoders
replaced by precomputed features, whence its share of step time spent encoding images; policy chunk
time at batch 1. Prints a table and, last, one JSON line with the figures and the CPU model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from einops import rearrange
from torch import Tensor, nn

from policies.diffusion.noise import Diffusion, NoiseConfig
from policies.diffusion.unet import SinusoidalPosEmb
from wm.autoencoder import Autoencoder, AutoencoderConfig
from wm.data.normalize import Normalizer, compute_stats
from wm.precision import cpu_info, describe_hardware
from wm.uwm import UWM, UWMConfig
from wm.uwm_net import DiTConfig

IMAGE_SIZE = (64, 64)
N_OBS, HORIZON, FUTURE, ACTION_DIM, PROPRIO_DIM = 2, 16, (8, 16), 2, 6


# ----------------------------------------------------------------------------- reference design
def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # x (B, N, D), shift / scale (B, D)


class RefBlock(nn.Module):
    """DiT block whose AdaLN-Zero map reads the whole conditioning vector (cond_dim -> 6 D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, cond_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = mlp_ratio * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, D), c (B, cond_dim) -> (B, N, D)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)  # 6 x (B, D)
        qkv = self.qkv(_modulate(self.norm1(x), sh1, sc1))
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        att = rearrange(nn.functional.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        x = x + g1[:, None] * self.proj(att)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class RefDiT(nn.Module):
    """net(actions (B, Ta, Da), t_a (B,), frames (B, F, V, C, h, w), t_v (B,), obs (B, Do)) -> epsilon
    predictions of both. Tokens: actions, Conv3d frame patches (2, p/2, p) of each camera, registers;
    one position table."""

    def __init__(self, a: argparse.Namespace, latent: tuple[int, int, int], obs_dim: int) -> None:
        super().__init__()
        D, (C, h, w), n_f = a.width, latent, len(FUTURE)
        self.kernel = (2, a.patch // 2, a.patch)
        self.grid = (n_f // 2, h // self.kernel[1], w // self.kernel[2])
        n_tokens = HORIZON + a.cameras * self.grid[0] * self.grid[1] * self.grid[2] + a.registers
        self.t_sin = SinusoidalPosEmb(D)
        self.t_mlp = nn.Sequential(nn.Linear(2 * D, D), nn.SiLU(), nn.Linear(D, D))
        self.action_in = nn.Sequential(nn.Linear(ACTION_DIM, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.action_out = nn.Sequential(
            nn.Linear(D, D), nn.GELU(approximate="tanh"), nn.Linear(D, ACTION_DIM)
        )
        self.patchify = nn.Conv3d(C, D, self.kernel, stride=self.kernel)
        self.frame_out = nn.Linear(D, C * self.kernel[0] * self.kernel[1] * self.kernel[2])
        self.registers = nn.Parameter(torch.randn(1, a.registers, D) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, D) * 0.02)
        cond_dim = D + obs_dim
        self.blocks = nn.ModuleList(RefBlock(D, a.heads, a.mlp_ratio, cond_dim) for _ in range(a.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * D))

    def forward(
        self, act: Tensor, t_a: Tensor, frames: Tensor, t_v: Tensor, obs: Tensor
    ) -> tuple[Tensor, Tensor]:
        B, Ta = act.shape[:2]
        c = torch.cat([self.t_mlp(torch.cat([self.t_sin(t_a), self.t_sin(t_v)], -1)), obs], -1)  # (B, D + Do)
        V = frames.shape[2]
        vid = self.patchify(rearrange(frames, "b f v c h w -> (b v) c f h w"))  # (B V, D, F/2, h/kh, w/kw)
        vid = rearrange(vid, "(b v) d f h w -> b (v f h w) d", v=V)
        x = torch.cat([self.action_in(act), vid, self.registers.expand(B, -1, -1)], 1) + self.pos  # (B, N, D)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        x = _modulate(self.norm_out(x), shift, scale)
        (gf, gh, gw), (kf, kh, kw) = self.grid, self.kernel
        v = self.frame_out(x[:, Ta : Ta + vid.shape[1]])
        v = rearrange(
            v, "b (v f h w) (c x y z) -> b (f x) v c (h y) (w z)", v=V, f=gf, h=gh, w=gw, x=kf, y=kh, z=kw
        )
        return self.action_out(x[:, :Ta]), v


class _RefActionNet(nn.Module):
    """`Diffusion`'s net(x_t, t, cond) in policy mode: cond = (obs vector, frame noise, frame timestep)."""

    def __init__(self, dit: RefDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: Tensor, t: Tensor, cond: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        obs, frames, t_v = cond
        return self.dit(x, t, frames, t_v, obs)[0]


def _group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(c // 16, c)


class RefUWM(nn.Module):
    """The reference: ResNet-18 (GroupNorm) observation encoder, frozen autoencoder run every step, the DiT
    above, DDPM epsilon loss over 100 squared-cosine steps, DDIM-10 in policy mode."""

    def __init__(self, a: argparse.Namespace, latent: tuple[int, int, int]) -> None:
        super().__init__()
        self.ae = Autoencoder(AutoencoderConfig(image_size=IMAGE_SIZE)).requires_grad_(False)
        self.ae.latent_scale.fill_(1.0)  # random init leaves 0 (untrained); 1 keeps the latents non-zero
        self.obs_encoder = torchvision.models.resnet18(
            weights=None, norm_layer=_group_norm, num_classes=a.width
        )
        self.obs_dim = N_OBS * (a.cameras * a.width + PROPRIO_DIM)  # a feature per camera and frame
        self.dit = RefDiT(a, latent, self.obs_dim)
        self.diffusion = Diffusion(_RefActionNet(self.dit), NoiseConfig(prediction_type="epsilon"))

    def encode_obs(self, frames: Tensor, proprio: Tensor) -> Tensor:
        """frames (B, To, V, 3, H, W) in [0, 1], proprio (B, To, Dp) -> (B, Do) flattened features."""
        B = frames.shape[0]
        feats = self.obs_encoder(rearrange(frames, "b t v c h w -> (b t v) c h w"))  # (B To V, D)
        return torch.cat([feats.reshape(B, -1), proprio.reshape(B, -1)], -1)

    @torch.no_grad()
    def encode_future(self, frames: Tensor) -> Tensor:
        """frames (B, F, V, 3, H, W) -> posterior samples (B, F, V, C, h, w), scaled."""
        B, F_ = frames.shape[:2]
        mean, logvar = self.ae.posterior(rearrange(frames, "b f v c h w -> (b f v) c h w"))
        z = (mean + torch.randn_like(mean) * (0.5 * logvar).exp()) * self.ae.latent_scale
        return rearrange(z, "(b f v) c h w -> b f v c h w", b=B, f=F_)

    def loss_from_features(self, obs: Tensor, future: Tensor, actions: Tensor) -> Tensor:
        """obs (B, Do), future latents (B, F, V, C, h, w), normalized actions (B, Ta, Da): epsilon MSE, each
        modality at its own uniform timestep, equal weights."""
        B, T = obs.shape[0], self.diffusion.cfg.num_train_steps
        abar = self.diffusion.alphas_cumprod
        t_a, t_v = torch.randint(0, T, (B,)), torch.randint(0, T, (B,))
        eps_a, eps_v = torch.randn_like(actions), torch.randn_like(future)
        x_a = abar[t_a].sqrt()[:, None, None] * actions + (1 - abar[t_a]).sqrt()[:, None, None] * eps_a
        ab_v = abar[t_v].view(B, *[1] * (future.ndim - 1))
        x_v = ab_v.sqrt() * future + (1 - ab_v).sqrt() * eps_v
        pred_a, pred_v = self.dit(x_a, t_a.float(), x_v, t_v.float(), obs)
        return (pred_a - eps_a).square().mean() + (pred_v - eps_v).square().mean()

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """batch: image (B, To + F, V, 3, H, W) in [0, 1], proprio (B, To, Dp), action (B, Ta, Da)
        normalized."""
        img = batch["image"]
        obs = self.encode_obs(img[:, :N_OBS], batch["proprio"])
        return self.loss_from_features(obs, self.encode_future(img[:, N_OBS:]), batch["action"])

    @torch.inference_mode()
    def policy(self, frames: Tensor, proprio: Tensor, steps: int = 10) -> Tensor:
        """frames (B, To, V, 3, H, W), proprio (B, To, Dp) -> normalized actions (B, Ta, Da) by
        DDIM-`steps`."""
        obs = self.encode_obs(frames, proprio)
        B, T = obs.shape[0], self.diffusion.cfg.num_train_steps
        C, h, w = self.ae.cfg.latent_channels, *(s // self.ae.cfg.downsample for s in IMAGE_SIZE)
        noise = torch.randn(B, len(FUTURE), frames.shape[2], C, h, w)
        cond = (obs, noise, torch.full((B,), float(T - 1)))
        return self.diffusion.sample((B, HORIZON, ACTION_DIM), cond, "ddim", steps)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ours and the inputs
def cameras(n: int) -> tuple[str, ...]:
    return tuple("image" if i == 0 else f"image{i}" for i in range(n))


def build_ours(a: argparse.Namespace, solver: str) -> UWM:
    ae_cfg = AutoencoderConfig(image_keys=cameras(a.cameras), image_size=IMAGE_SIZE)
    side = [s // ae_cfg.downsample for s in IMAGE_SIZE]
    cfg = UWMConfig(
        image_keys=cameras(a.cameras),
        image_size=IMAGE_SIZE,
        latent={"source": "autoencoder", "path": "(bench)", "structure": ae_cfg.to_dict()},
        latent_shape=(ae_cfg.latent_channels, *side),
        proprio_key="proprio",
        proprio_dim=PROPRIO_DIM,
        action_dim=ACTION_DIM,
        n_obs=N_OBS,
        horizon=HORIZON,
        future=FUTURE,
        net=DiTConfig(
            dim=a.width,
            depth=a.depth,
            heads=a.heads,
            mlp_ratio=a.mlp_ratio,
            registers=a.registers,
            patch=a.patch,
        ),
        noise=NoiseConfig(prediction_type="sample", edm_solver=solver),
        sampler="edm",
        sampler_steps=3,
    )
    dims = {"action": ACTION_DIM, "proprio": PROPRIO_DIM}
    stats = {k: compute_stats(np.array([[-1.0] * d, [1.0] * d])) for k, d in dims.items()}  # to [-1, 1]
    model = UWM(cfg, Normalizer({"action": "minmax", "proprio": "minmax"}, stats), load_codec=False)
    model.codec.model.latent_scale.fill_(1.0)
    return model


def batches(B: int, latent: tuple[int, int, int], V: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(ours: cached latent tokens of each camera, as the feature cache gives them; reference: frames
    in [0, 1], (B, T, V, 3, H, W))."""
    T, (C, h, w) = N_OBS + len(FUTURE), latent
    common = {
        "proprio": torch.randn(B, N_OBS, PROPRIO_DIM),
        "action": torch.rand(B, HORIZON, ACTION_DIM) * 2 - 1,
        "action_is_pad": torch.zeros(B, HORIZON, dtype=torch.bool),
    }
    ours = dict(common)
    for key in cameras(V):
        ours[key] = torch.randn(B, T, h * w, C)  # (B, n_obs + F, P, C)
        ours[key + "_is_pad"] = torch.zeros(B, T, dtype=torch.bool)
    return ours, {"image": torch.rand(B, T, V, 3, *IMAGE_SIZE), **common}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ada_params(dit: nn.Module) -> int:
    return sum(n_params(b.ada) for b in dit.blocks) + n_params(dit.ada_out)


# ----------------------------------------------------------------------------- timing
def train_step(loss_fn: Callable[[], Tensor], opt: torch.optim.Optimizer) -> float:
    """Seconds of one forward + backward + AdamW step."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()
    return time.perf_counter() - t0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], float]], n: int, warmup: int) -> dict[str, float]:
    """Median seconds of each fn over n rounds (each round runs every fn once, in turn) after warm-up."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + n):
        for k, fn in fns.items():
            s = fn()
            if i >= warmup:
                runs[k].append(s)
    return {k: statistics.median(v) for k, v in runs.items()}


def parameters(ours: UWM, ref: RefUWM) -> dict[str, int]:
    """Parameter counts; printed as a table."""
    n = {
        "ours_denoiser": n_params(ours.net),
        "ours_adaln": ada_params(ours.net),
        "ref_denoiser": n_params(ref.dit),
        "ref_adaln": ada_params(ref.dit),
        "ref_obs_encoder": n_params(ref.obs_encoder),
        "codec_frozen": n_params(ours.codec),
    }
    n["ours_trained"], n["ref_trained"] = n["ours_denoiser"], n["ref_denoiser"] + n["ref_obs_encoder"]
    print(f"{'parameters (M)':<34} {'ours':>9} {'reference':>10} {'ref/ours':>9}")
    for name, o, r in (
        ("denoiser", n["ours_denoiser"], n["ref_denoiser"]),
        ("  of which AdaLN maps", n["ours_adaln"], n["ref_adaln"]),
        ("observation encoder (trained)", 0, n["ref_obs_encoder"]),
        ("trained in all", n["ours_trained"], n["ref_trained"]),
        ("image autoencoder (frozen)", n["codec_frozen"], n_params(ref.ae)),
    ):
        ratio = f"{r / o:.2f}" if o else "-"
        print(f"{name:<34} {o / 1e6:>9.2f} {r / 1e6:>10.2f} {ratio:>9}")
    o_share, r_share = n["ours_adaln"] / n["ours_denoiser"], n["ref_adaln"] / n["ref_denoiser"]
    print(f"{'AdaLN share of the denoiser':<34} {o_share:>9.1%} {r_share:>10.1%}")
    return n


def training(ours: UWM, ref: RefUWM, a: argparse.Namespace) -> dict[str, float]:
    """Median training-step seconds: ours, the reference, the reference given its encoders' outputs."""
    ours_batch, ref_batch = batches(a.batch, ours.cfg.latent_shape, a.cameras)
    ours.train()
    ref.train()
    opt_o = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-4)
    opt_r = torch.optim.AdamW([q for q in ref.parameters() if q.requires_grad], lr=1e-4)
    with torch.no_grad():  # the reference's encoder outputs, precomputed for its encoder-free step
        feats = ref.encode_obs(ref_batch["image"][:, :N_OBS], ref_batch["proprio"])
        fut = ref.encode_future(ref_batch["image"][:, N_OBS:])
    fns = {
        "ours": lambda: train_step(lambda: ours.compute_loss(ours_batch)[0], opt_o),
        "ref": lambda: train_step(lambda: ref.compute_loss(ref_batch), opt_r),
        "ref_no_encode": lambda: train_step(
            lambda: ref.loss_from_features(feats, fut, ref_batch["action"]), opt_r
        ),
    }
    t = interleaved(fns, a.steps, a.warmup)
    share = 1 - t["ref_no_encode"] / t["ref"]
    print(f"\ntraining step, batch {a.batch} (s, median of {a.steps})")
    print(f"  {'ours (cached latents)':<36} {t['ours']:8.3f}")
    print(f"  {'reference (encodes every step)':<36} {t['ref']:8.3f}   ref/ours {t['ref'] / t['ours']:.2f}x")
    print(
        f"  {'reference, encoder outputs given':<36} {t['ref_no_encode']:8.3f}   encoding share {share:.1%}"
    )
    return t


def chunks(ours: UWM, ref: RefUWM, a: argparse.Namespace) -> dict[str, float]:
    """Median policy-chunk seconds at batch 1, each from two raw observation frames."""
    dpm, bf16 = build_ours(a, "dpmpp_2m"), build_ours(a, "dpmpp_2m")
    bf16.cfg = dataclasses.replace(bf16.cfg, precision="bf16")  # the sampler under bf16 autocast
    for model in (dpm, bf16):
        model.load_state_dict(ours.state_dict())
    for model in (ours, dpm, bf16, ref):
        model.eval()
    frames = torch.rand(1, N_OBS, a.cameras, 3, *IMAGE_SIZE)  # (1, To, V, 3, H, W)
    proprio = torch.randn(1, N_OBS, PROPRIO_DIM)
    obs = {key: frames[:, :, v] for v, key in enumerate(cameras(a.cameras))} | {"proprio": proprio}
    fns = {
        "ours_heun3": lambda: timed(lambda: ours.policy(obs)),
        "ours_dpmpp2m3": lambda: timed(lambda: dpm.policy(obs)),
        "ours_dpmpp2m3_bf16": lambda: timed(lambda: bf16.policy(obs)),
        "ref_ddim10": lambda: timed(lambda: ref.policy(frames, proprio, 10)),
    }
    t = interleaved(fns, a.repeats, a.warmup)
    print(f"\npolicy chunk, batch 1, from {N_OBS} raw frames (ms, median of {a.repeats})")
    labels = (
        "ours EDM Heun-3 (5 calls)",
        "ours DPM++2M-3 (3 calls)",
        "ours DPM++2M-3, bf16 autocast",
        "reference DDIM-10 (10 calls)",
    )
    for k, label in zip(t, labels, strict=True):
        print(f"  {label:<36} {t[k] * 1e3:8.1f}   ref/this {t['ref_ddim10'] / t[k]:.2f}x")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, what in (
        ("--width", 192, "model width"),
        ("--depth", 6, "blocks"),
        ("--heads", 4, "attention heads"),
        ("--mlp-ratio", 4, "MLP hidden / width"),
        ("--registers", 4, "register tokens"),
        ("--patch", 4, "latent cells per frame-token side (configs/model/uwm.yaml: 4)"),
        ("--batch", 32, "training batch"),
        ("--steps", 10, "timed training steps per model"),
        ("--repeats", 20, "timed policy chunks per sampler"),
        ("--warmup", 2, "untimed rounds first"),
        ("--threads", os.cpu_count() or 1, "torch threads"),
        ("--cameras", 1, "cameras (the reference's robomimic / LIBERO configs: 2)"),
    ):
        p.add_argument(flag, type=int, default=default, help=what)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ours = build_ours(a, "heun")
    ref = RefUWM(a, ours.cfg.latent_shape)
    n_tokens = ref.dit.pos.shape[1]
    ours_tokens = HORIZON + ours.net.frame_pos.shape[1] + ours.net.registers.shape[1]
    if ours_tokens != n_tokens:
        raise RuntimeError(f"token counts differ: ours {ours_tokens}, reference {n_tokens}")

    print(describe_hardware())
    print(f"torch {torch.__version__}, {a.threads} threads, fp32; load avg {os.getloadavg()}")
    print(f"width {a.width}, depth {a.depth}, heads {a.heads}, {n_tokens} tokens each, batch {a.batch}\n")
    n = parameters(ours, ref)
    train = training(ours, ref, a)
    chunk = chunks(ours, ref, a)
    print(f"\nload avg at the end {os.getloadavg()}")
    names = ("width", "depth", "heads", "mlp_ratio", "registers", "batch", "cameras")
    settings = {k: getattr(a, k) for k in names}
    ratios = {
        "trained_params": n["ref_trained"] / n["ours_trained"],
        "denoiser_params": n["ref_denoiser"] / n["ours_denoiser"],
        "train_step": train["ref"] / train["ours"],
        "chunk_heun3": chunk["ref_ddim10"] / chunk["ours_heun3"],
        "chunk_dpmpp2m3": chunk["ref_ddim10"] / chunk["ours_dpmpp2m3"],
    }
    figures = {
        "cpu": cpu_info()[0],
        "threads": a.threads,
        "torch": torch.__version__,
        "settings": {**settings, "tokens": n_tokens, "steps": a.steps, "repeats": a.repeats},
        "params": n,
        "train_step_s": train,
        "ref_encode_share": 1 - train["ref_no_encode"] / train["ref"],
        "chunk_s": chunk,
        "ratios": ratios,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
