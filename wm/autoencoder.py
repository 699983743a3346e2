"""A small convolutional KL-autoencoder (Stable Diffusion's VAE, scaled down for CPUs), trained on a
store's camera frames; its frozen posterior means are the image latents UWM denoises.

    encoder  pixel-unshuffle by `patch` (a 2x2 patch of pixels -> 12 channels), 3x3 conv to
             channels[0], then per level `blocks` residual blocks and a stride-2 conv to the next
             level; GroupNorm, SiLU, 3x3 conv to the posterior mean and log-variance (2 * latent_channels)
    decoder  the mirror image: nearest x2 upsampling + 3x3 conv between levels, a 3x3 conv to
             3 * patch**2 channels and a pixel shuffle back to (3, H, W), in [-1, 1] (clamped by `decode`)

The latent grid is the image divided by `downsample` = patch * 2**(len(channels) - 1): 64x64 frames ->
4 x 16 x 16 latents with the defaults. No convolution runs at full resolution (the stem unshuffles
pixels instead): convolutions over 64x64 maps cost most of a step on this project's CPUs. Training
minimizes reconstruction error (`recon_loss`, a per-pixel mean) plus `kl_weight` times the KL
divergence to N(0, I) summed over a sample's latent and divided by its pixel count: SD-VAE's
objective (per-sample sums) divided by a constant, so its kl_weight (1e-6) means the same here.

`latent_scale` (a buffer, saved with the weights) is 1 / std of the posterior means, estimated as a
running average over the training batches, so `encode_mean(x) * latent_scale` has about unit
variance (SD's `scaling_factor`, fitted instead of fixed). `default_autoencoder` trains (or reuses)
the store's default autoencoder with the one trainer; `wm-train model=autoencoder` trains any.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from wm.data.dataset import WindowDataset
from wm.data.normalize import Normalizer
from wm.data.windows import WindowSpec
from wm.locks import exclusive
from wm.options import check_numbers
from wm.registry import ModelEntry, TrainContext

RECON_LOSSES = ("l1", "mse")
LOGVAR_RANGE = (-30.0, 20.0)  # SD-VAE's clamp of the posterior log-variance
LOGVAR_INIT = -6.0  # initial posterior log-variance (std 0.05): noise of std 1 would drown the means at first
DEFAULT_STEPS = 1500
DEFAULT_BATCH = 64


@dataclass(frozen=True)
class AutoencoderConfig:
    """The frames of the cameras `image_keys` (one shared autoencoder), all of `image_size` (H, W); see
    the module docstring for the layout."""

    image_keys: tuple[str, ...] = ("image",)
    image_size: tuple[int, int] = (64, 64)
    patch: int = 2  # pixel-unshuffle factor of the stem
    channels: tuple[int, ...] = (32, 64)  # width of each level; each level after the first halves
    blocks: int = 1  # residual blocks per level, in the encoder and the decoder
    latent_channels: int = 4
    kl_weight: float = 1e-6
    recon_loss: str = "l1"  # "l1" | "mse"
    # pixels that differ from the batch's median frame (the static background) by more than
    # `foreground_threshold` weigh 1 + foreground_weight in the reconstruction loss: small moving
    # objects (a few-pixel target) are otherwise a rounding error of the mean
    foreground_weight: float = 10.0
    foreground_threshold: float = 0.1
    scale_momentum: float = 0.01  # weight of each batch in the running estimate of the latents' std

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model")
        self._check_kinds()
        keys = (self.image_keys,) if isinstance(self.image_keys, str) else tuple(self.image_keys)
        object.__setattr__(self, "image_keys", keys)
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        checks = {
            "image_keys must name one or more distinct cameras": bool(keys) and len(set(keys)) == len(keys),
            "image_size must be two positive ints (H, W)": len(self.image_size) == 2
            and min(self.image_size) > 0,
            "patch must be >= 1": self.patch >= 1,
            "channels must be non-empty and positive": bool(self.channels) and min(self.channels) > 0,
            "blocks must be >= 0": self.blocks >= 0,
            "latent_channels must be >= 1": self.latent_channels >= 1,
            "kl_weight must be finite and >= 0": math.isfinite(self.kl_weight) and self.kl_weight >= 0,
            "foreground_weight must be finite and >= 0": math.isfinite(self.foreground_weight)
            and self.foreground_weight >= 0,
            "foreground_threshold must be in [0, 1)": 0 <= self.foreground_threshold < 1,
            f"recon_loss must be one of {RECON_LOSSES}": self.recon_loss in RECON_LOSSES,
            "scale_momentum must be in (0, 1]": 0 < self.scale_momentum <= 1,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"AutoencoderConfig: {'; '.join(bad)}")
        h, w = self.image_size
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"AutoencoderConfig: image_size {h}x{w} is not divisible by the downsampling factor "
                f"{self.downsample} (patch {self.patch} * 2**{len(self.channels) - 1})"
            )

    def _check_kinds(self) -> None:
        """Refuse (ValueError, one line) list options given as something else: channels="32" became
        (3, 2), a camera list ["a", 5] was kept, channels=32 or image_keys=5 was a TypeError traceback."""
        wrong = [
            f"model.{name}={getattr(self, name)!r} is not a list of whole numbers"
            for name in ("image_size", "channels")
            if not isinstance(getattr(self, name), list | tuple)
        ]
        keys = self.image_keys
        names = isinstance(keys, list | tuple) and all(isinstance(k, str) for k in keys)
        if not (isinstance(keys, str) or names):
            wrong.append(f"model.image_keys={keys!r} is not a camera name or a list of camera names")
        elif any(not k for k in ([keys] if isinstance(keys, str) else keys)):
            wrong.append(f"model.image_keys={keys!r} holds an empty camera name")
        if wrong:
            raise ValueError("; ".join(wrong))

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return self.patch * 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_keys"], d["image_size"], d["channels"] = (
            list(self.image_keys),
            list(self.image_size),
            list(self.channels),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        if "image_key" in d:  # written before several cameras: one camera
            d = {k: v for k, v in d.items() if k != "image_key"} | {"image_keys": [d["image_key"]]}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown autoencoder option(s) {unknown}")
        return cls(**d)


# ---------------------------------------------------------------------- the network
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class _ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(GroupNorm(x))))), 3x3 convs at constant width."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(self.norm(x)))))


def _encoder(cfg: AutoencoderConfig) -> nn.Sequential:
    ch, p = cfg.channels, cfg.patch
    layers: list[nn.Module] = [nn.PixelUnshuffle(p), nn.Conv2d(3 * p * p, ch[0], 3, padding=1)]
    for i, c in enumerate(ch):
        layers += [_ResBlock(c) for _ in range(cfg.blocks)]
        if i < len(ch) - 1:
            layers.append(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1))
    layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def _decoder(cfg: AutoencoderConfig) -> nn.Sequential:
    ch, p = cfg.channels, cfg.patch
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)]
    for i in reversed(range(len(ch))):
        layers += [_ResBlock(ch[i]) for _ in range(cfg.blocks)]
        if i > 0:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
    layers += [_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3 * p * p, 3, padding=1), nn.PixelShuffle(p)]
    return nn.Sequential(*layers)


def rgb(x: Tensor) -> Tensor:
    """(..., C, H, W) frames as RGB, as the feature cache sees them: grayscale repeated, alpha dropped."""
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x[..., :3, :, :]


class Autoencoder(nn.Module):
    """The KL-autoencoder. Batch keys for `compute_loss` (`window_spec()`): each camera's `<image_key>`
    (B, 1, C, H, W) float in [0, 1]; every camera's frames train it. The normalizer the registry passes
    is not used (frames need none)."""

    def __init__(self, cfg: AutoencoderConfig, normalizer: Normalizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg)
        self.decoder = _decoder(cfg)
        with torch.no_grad():
            self.encoder[-1].bias[cfg.latent_channels :] = LOGVAR_INIT
        # 0 until the first training batch estimates it
        self.register_buffer("latent_scale", torch.zeros(()))

    def window_spec(self) -> WindowSpec:
        return WindowSpec({k: (0,) for k in self.cfg.image_keys})

    def feature_cache_source(self) -> None:
        return None  # it trains on pixels

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"autoencoder: expected float images (B, 3, H, W) in [0, 1], got {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.cfg.image_size:
            h, w = self.cfg.image_size
            raise ValueError(
                f"autoencoder: images are {x.shape[-2]}x{x.shape[-1]}, it was trained on {h}x{w} frames"
            )

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> posterior mean and log-variance, each (B, C, h, w)."""
        self._check(x)
        mean, logvar = self.encoder(x * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_mean(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the posterior mean (B, C, h, w), deterministic and unscaled."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, C, h, w), unscaled -> images (B, 3, H, W) in [0, 1]."""
        return ((self.decoder(z) + 1) / 2).clamp(0, 1)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        views = [rgb(batch[k][:, 0].float()) for k in c.image_keys]  # V x (B, 3, H, W) in [0, 1]
        x = torch.cat(views)  # (V * B, 3, H, W)
        mean, logvar = self.posterior(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # one posterior sample per image
        err = self.decoder(z) - (x * 2 - 1)  # in [-1, 1] units, as SD-VAE
        per_pixel = (err.abs() if c.recon_loss == "l1" else err.square()).mean(1, keepdim=True)  # (B,1,H,W)
        weights = torch.cat([self.pixel_weights(v) for v in views])  # each camera's own background
        recon = (per_pixel * weights).mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean() / x[0].numel()
        if self.training:
            self._update_scale(mean.detach())
        mse = (err.detach().clamp(-2, 2) / 2).square().mean()  # in [0, 1] pixel units, as validation
        metrics = {
            "recon": recon.detach(),
            "kl": kl.detach(),
            "mse": mse,
            "latent_scale": self.latent_scale.clone(),
        }
        return recon + c.kl_weight * kl, metrics

    @torch.no_grad()
    def pixel_weights(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) loss weights of images x (B, 3, H, W) in [0, 1]: 1 + foreground_weight where a
        pixel differs from the batch's median frame by more than foreground_threshold, normalized to a
        mean of 1 per image (a batch of one has no background to tell: all 1)."""
        c = self.cfg
        if c.foreground_weight == 0 or x.shape[0] < 2:
            return torch.ones_like(x[:, :1])
        background = x.median(dim=0, keepdim=True).values  # (1, 3, H, W)
        moving = ((x - background).abs().amax(1, keepdim=True) > c.foreground_threshold).to(x.dtype)
        w = 1 + c.foreground_weight * moving
        return w / w.mean(dim=(2, 3), keepdim=True)

    @torch.no_grad()
    def _update_scale(self, mean: Tensor) -> None:
        """Running estimate of 1 / std of the posterior means (variance averaged, `scale_momentum`)."""
        var = mean.float().var()
        if self.latent_scale > 0:
            m = self.cfg.scale_momentum
            var = (1 - m) / self.latent_scale.square() + m * var
        self.latent_scale.copy_(var.clamp_min(1e-12).rsqrt())


# ---------------------------------------------------------------------- registry entry
def configure(options: dict[str, Any], ctx: TrainContext) -> dict[str, Any]:
    """The user's options completed with the store's camera (or the `image_keys` listed) and its frame
    size, which every listed camera must share."""
    keys = ctx.cameras(options.get("image_keys"))
    return {**options, "image_keys": keys, "image_size": list(ctx.camera_size(keys))}


def validation(
    model: Autoencoder,
    data_path: str,
    episodes: list[int],
    in_memory: bool,
    frames_from: str | None = None,
    n_frames: int = 256,
) -> Any:
    """Reconstruction MSE (pixels in [0, 1]) of up to `n_frames` held-out frames, the same ones every
    time, and a PNG of 8 of them (top) over their reconstructions (bottom)."""
    val_set = WindowDataset(data_path, model.window_spec(), episodes, in_memory=in_memory, train=False)
    idx = np.random.default_rng(0).permutation(len(val_set))[:n_frames]

    @torch.no_grad()
    def val_fn(model: Autoencoder, step: int, out_dir: Path) -> dict[str, float]:
        if len(idx) == 0:
            return {}
        device = next(model.parameters()).device
        errs, strip = [], None
        for lo in range(0, len(idx), 64):
            batch = val_set.get_batch(idx[lo : lo + 64])
            x = torch.cat([rgb(batch[k][:, 0].to(device)) for k in model.cfg.image_keys])
            y = model.decode(model.encode_mean(x))
            errs.append((y - x).square().mean(dim=(1, 2, 3)))
            if strip is None:
                rows = [rearrange(v[:8], "n c h w -> h (n w) c") for v in (x, y)]
                strip = (torch.cat(rows, dim=0) * 255).round().byte().cpu().numpy()
        path = Path(out_dir) / "val" / f"recon_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(path)
        return {"val_recon_mse": float(torch.cat(errs).mean())}

    return val_fn


def no_statistics(ctx: TrainContext) -> Normalizer:
    """Frames need no statistics: an empty normalizer, so a store without actions trains too."""
    return Normalizer({}, {})


ENTRY = ModelEntry(
    config_type=AutoencoderConfig,
    build=Autoencoder,
    configure=configure,
    controllers=(),
    description="small convolutional KL-autoencoder of a store's frames: the default latent space of UWM",
    normalizer=no_statistics,
    validation=validation,
    val_metrics=("val_recon_mse",),
    needs_actions=False,
)


# ---------------------------------------------------------------------- the store's default autoencoder
def default_autoencoder(
    store_path: str | Path,
    image_keys: str | Sequence[str] | None = None,
    *,
    options: dict[str, Any] | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str = "auto",
    in_memory: bool = True,
    log: Callable[[str], Any] = print,
) -> Path:
    """The run directory of the default autoencoder of the camera(s) `image_keys` (None: the store's
    first camera; several: one autoencoder trained on all their frames) in the store at `store_path`:
    reused when its final step is already reached, else trained (resuming an
    interrupted run) with the one trainer, with the `model.*` `options` of configs/model/autoencoder.yaml
    (none: its defaults), into

        <store dir>/feature_cache/autoencoder/<store stem>__<camera>[+...]__<fingerprint[:12]>__<config hash>/

    The fingerprint (`DemoStore.frames_fingerprint`) changes when the cameras' frames do (episodes
    added, removed or rewritten), not when episode info does (an episode flagged action-free); the
    config hash covers the autoencoder's and the trainer's settings. `log` gets one line saying which
    it did. Processes that want the same autoencoder at once (two `wm-train model=uwm` on one store)
    take turns on a lock file beside the run directory: the first trains it, the others wait and
    reuse it."""
    from wm.checkpoint import latest_checkpoint, load_checkpoint
    from wm.data import DemoStore
    from wm.trainer import Trainer, TrainerConfig
    from wm.training import data_keys, setup_training

    store_path = Path(store_path).resolve()
    keys = [image_keys] if isinstance(image_keys, str) else list(image_keys or [])
    with DemoStore.open(store_path) as store:  # the other cameras: `configure` checks them (camera_size)
        image_key, proprio_key = data_keys(store, keys[0] if keys else None, None, need_actions=False)
        shapes = {k: tuple(s.shape) for k, s in store.schema.keys.items()}
    keys = keys or [image_key]
    ctx = TrainContext(str(store_path), image_key, proprio_key, shapes)
    options = {k: v for k, v in (options or {}).items() if k != "type"} | {"image_keys": keys}
    cfg = AutoencoderConfig.from_dict(configure(options, ctx))
    with DemoStore.open(store_path) as store:  # the frames alone: info edits keep the autoencoder
        fingerprint = store.frames_fingerprint(keys)
    trainer_cfg = TrainerConfig(
        steps=steps,
        batch_size=batch_size,
        lr=3e-3,
        warmup_steps=100,
        min_lr_ratio=0.05,
        ema_decay=0.999,
        log_every=50,
        val_every=0,
        ckpt_every=500,
        seed=seed,
        device=device,
    )
    run = _run_dir(store_path, keys, fingerprint, cfg, trainer_cfg)
    waiting = f"autoencoder: another process is training {run}; waiting for it"
    with exclusive(run.with_name(run.name + ".lock"), waiting, log):  # two runs on one store train it once
        if latest_checkpoint(run) is not None and load_checkpoint(run)["step"] >= steps:
            log(f"autoencoder: reusing {run}")
            return run
        what = f"{store_path.name}:{'+'.join(keys)} ({steps} steps)"
        log(f"autoencoder: training the default autoencoder of {what} in {run}")
        torch.manual_seed(seed)  # the model's initialization
        setup = setup_training(
            "autoencoder", str(store_path), options, image_key=image_key, seed=seed, in_memory=in_memory
        )
        if len(setup.train_set) < batch_size:  # (the trainer's line named neither option nor model)
            raise ValueError(
                f"{store_path}: its {len(setup.train_set)} training frames make no batch of {batch_size} for "
                "the default autoencoder: give a smaller batch_size (model.latent.batch_size for UWM)"
            )
        run_config = {"store": str(store_path), "store_fingerprint": fingerprint, "image_keys": keys}
        Trainer(
            setup.model,
            setup.train_set,
            trainer_cfg,
            run,
            model_type="autoencoder",
            model_config=setup.model_config,
            normalizer=setup.normalizer,
            val_fn=setup.val_fn,
            extra_state={"run_config": run_config},
            single_process=True,  # (under torchrun the other ranks wait on the lock above, not in DDP)
        ).fit()
    return run


def _run_dir(store: Path, keys: list[str], fingerprint: str, cfg: AutoencoderConfig, trainer: Any) -> Path:
    """`default_autoencoder`'s run directory: the store, camera and fingerprint, and a hash of the
    settings that change the weights (not the device)."""
    settings = {"model": cfg.to_dict(), "trainer": trainer.to_dict() | {"device": None, "num_workers": None}}
    config_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    stem = store.name.removesuffix(".zip").removesuffix(".zarr")
    return (
        store.parent
        / "feature_cache"
        / "autoencoder"
        / f"{stem}__{'+'.join(keys)}__{fingerprint[:12]}__{config_hash}"
    )
