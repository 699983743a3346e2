"""Frozen image latents for diffusion over video: one codec interface whatever the source.

`LatentCodec` maps frames (b, 3, H, W) in [0, 1] to latents (b, C, h, w) (`encode`) and back
(`decode`), and is a frozen encoder for the feature cache (`wm.feature_cache.build_feature_cache`):
`codec(x)` gives channel-last tokens (b, h * w, C). Sources (`LatentConfig.source`):

    autoencoder  the project's small KL-autoencoder (`wm.autoencoder`), trained on the store's frames;
                 `path` is its run directory or checkpoint. Latents: posterior mean * latent_scale.
    sd_vae       a diffusers `AutoencoderKL` (Stable Diffusion / SDXL VAE) from a local directory `path`
                 holding its config.json and weights. Latents: (posterior mean - shift_factor) *
                 scaling_factor, or per channel (mean - latents_mean) * scaling_factor / latents_std
                 where the config gives those (as diffusers' pipelines do), on frames scaled to
                 [-1, 1]; sides must be multiples of 8 (of 2**(stages - 1)). Needs diffusers:
                 `pip install diffusers` (or the `vae` extra).
    encoder      a world-model patch encoder (`wm.encoders`, e.g. dinov2_vits14 with `path` its local
                 weights file): video diffusion in feature space; it cannot decode.

Nothing here downloads. With internet access, get the SDXL VAE once and point `path` at it:

    huggingface-cli download stabilityai/sdxl-vae config.json diffusion_pytorch_model.safetensors \\
        --local-dir ~/weights/sdxl-vae
    # then: wm-train model=uwm ... model.latent.source=sd_vae +model.latent.path=~/weights/sdxl-vae

A `LatentConfig` holds the source's structure (the autoencoder's config, the AutoencoderKL config, the
encoder config), so `build_codec(cfg, load_weights=False)` rebuilds the codec without the source files:
a model that holds the codec as a submodule saves its weights in its own checkpoint. Only
`load_weights=True` (and `latent_config_from_source`) read the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from wm.encoders import EncoderConfig, EncoderWeightsError, build_encoder, state_dict_hash
from wm.options import is_real

SOURCES = ("autoencoder", "sd_vae", "encoder")
DIFFUSERS_HINT = "pip install diffusers (or pip install -e '.[vae]')"


class LatentSourceError(EncoderWeightsError):
    """A latent source's files are missing, unreadable or do not fit its config."""


@dataclass(frozen=True)
class LatentConfig:
    """`source` (one of SOURCES), `path` (where its weights are read from: an autoencoder run directory
    or checkpoint, a diffusers AutoencoderKL directory, an encoder weights file) and `structure`: what
    rebuilds the network without those files (the autoencoder's config dict, the AutoencoderKL config,
    the encoder's `EncoderConfig` fields). Make one from the files with `latent_config_from_source`."""

    source: str
    path: str
    structure: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"latent source {self.source!r} is not one of {SOURCES}")
        if not self.structure:
            raise ValueError(
                f"latent config ({self.source}, {self.path!r}) has no structure: make it with "
                "latent_config_from_source(source, path)"
            )
        object.__setattr__(self, "structure", json.loads(json.dumps(self.structure)))  # JSON-able, a copy

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "structure": json.loads(json.dumps(self.structure))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown latent option(s) {unknown}")
        return cls(**d)


# ---------------------------------------------------------------------- reading a source's structure
def latent_config_from_source(source: str, path: str | Path, **encoder: Any) -> LatentConfig:
    """The config of the codec at `path` (see the module docstring), its structure read from the files.
    The encoder source takes its `EncoderConfig` fields as keywords (`name` required, e.g.
    name="dinov2_vits14", image_size=224); its `weights` are `path`."""
    if source not in SOURCES:
        raise ValueError(f"latent source {source!r} is not one of {SOURCES}")
    if source != "encoder" and encoder:
        raise ValueError(f"latent source {source} takes only a path, not {sorted(encoder)} (encoder options)")
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise LatentSourceError(f"latent source {source}: {path} does not exist")
    if source == "autoencoder":
        from wm.checkpoint import load_checkpoint

        structure = _autoencoder_checkpoint(load_checkpoint(path))["model_config"]
    elif source == "sd_vae":
        structure = _read_vae_config(path)
    else:
        if "name" not in encoder:
            raise ValueError("latent source encoder needs the encoder's name (e.g. name=dinov2_vits14)")
        allowed = {f.name for f in dataclasses.fields(EncoderConfig)} - {"weights"}  # weights: the path
        unknown = sorted(set(encoder) - allowed)
        if unknown:
            raise ValueError(f"latent source encoder: unknown encoder option(s) {unknown}")
        if not path.is_file():
            raise LatentSourceError(f"latent source encoder: {path} is not a weights file")
        structure = dataclasses.asdict(EncoderConfig(**{**encoder, "weights": str(path)}))
    return LatentConfig(source, str(path), structure)


def _autoencoder_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    if ckpt["model_type"] != "autoencoder":
        raise LatentSourceError(
            f"latent source autoencoder: {ckpt['path']} holds a {ckpt['model_type']!r} model, not an "
            "autoencoder (train one: wm-train model=autoencoder)"
        )
    return ckpt


def _read_vae_config(path: Path) -> dict[str, Any]:
    """The AutoencoderKL config in `path`/config.json, without its private ("_...") entries."""
    file = path / "config.json"
    if not file.is_file():
        raise LatentSourceError(
            f"latent source sd_vae: {path} has no config.json (expected a diffusers AutoencoderKL "
            "directory, e.g. huggingface-cli download stabilityai/sdxl-vae --local-dir DIR)"
        )
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise LatentSourceError(f"latent source sd_vae: cannot read {file} ({e})") from e
    if not isinstance(cfg, dict):
        kind = type(cfg).__name__
        raise LatentSourceError(f"latent source sd_vae: {file} holds a JSON {kind}, not a config object")
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise LatentSourceError(
            f"latent source sd_vae: {file} describes a {cfg['_class_name']}, not an AutoencoderKL"
        )
    structure = {k: v for k, v in cfg.items() if not k.startswith("_")}
    _vae_factors(structure, str(file))
    return structure


@dataclass(frozen=True)
class VaeFactors:
    """How an AutoencoderKL's posterior mean m becomes latents: (m - center) * scaling / spread, center
    and spread per channel (`latents_mean`, `latents_std`) or one number (`shift_factor`, 1)."""

    scaling: float
    center: tuple[float, ...] | float
    spread: tuple[float, ...] | float = 1.0

    def to_latents(self, mean: Tensor) -> Tensor:
        """Posterior means (b, C, h, w) -> latents."""
        return (mean - _channels(self.center, mean)) * self.scaling / _channels(self.spread, mean)

    def from_latents(self, z: Tensor) -> Tensor:
        """Latents (b, C, h, w) -> the posterior means the decoder takes."""
        return z * _channels(self.spread, z) / self.scaling + _channels(self.center, z)

    def label(self) -> str:
        """What of the config the latents depend on, for the feature cache's key."""
        text = f":{self.scaling!r}:{self.center!r}"  # (as before latents_mean: the caches made stay valid)
        return text if self.spread == 1.0 else f"{text}:{self.spread!r}"


def _channels(value: tuple[float, ...] | float, like: Tensor) -> Tensor | float:
    """A per-channel `value` shaped to broadcast over `like` (b, C, h, w); one number as it is."""
    if isinstance(value, float):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _vae_factors(structure: dict[str, Any], where: str) -> VaeFactors:
    """The `VaeFactors` of an AutoencoderKL config: scaling_factor a finite number > 0 (missing:
    diffusers' default 0.18215), shift_factor a finite number or null (0), latents_mean / latents_std
    both null or lists of latent_channels finite numbers (std > 0; not beside a shift_factor). Decode
    divides by the scaling and std, so a 0, NaN or string there would give NaN or inf frames rather than
    an error; latents_mean / latents_std were ignored (latents of another offset and spread)."""
    scaling, shift = structure.get("scaling_factor", 0.18215), structure.get("shift_factor")
    mean, std = structure.get("latents_mean"), structure.get("latents_std")
    channels = structure.get("latent_channels", 4)
    wrong = []
    if not (is_real(scaling) and math.isfinite(scaling) and scaling > 0):
        wrong.append(f"scaling_factor={scaling!r} is not a finite number > 0")
    if shift is not None and not (is_real(shift) and math.isfinite(shift)):
        wrong.append(f"shift_factor={shift!r} is not a finite number (or null)")
    for name, values, least in (("latents_mean", mean, -math.inf), ("latents_std", std, 0.0)):
        if values is not None and not (
            isinstance(values, list)
            and len(values) == channels
            and all(is_real(v) and math.isfinite(v) and v > least for v in values)
        ):
            wrong.append(
                f"{name}={values!r:.80} is not null or a list of latent_channels={channels} finite numbers"
                + (" > 0" if least == 0 else "")
            )
    if (mean is None) != (std is None):
        wrong.append("latents_mean and latents_std go together (one is null)")
    if mean is not None and shift is not None:
        wrong.append("shift_factor beside latents_mean: which offset applies is not defined")
    if wrong:
        raise LatentSourceError(f"latent source sd_vae: {where}: {'; '.join(wrong)}")
    if mean is None:
        return VaeFactors(float(scaling), float(shift or 0.0))
    return VaeFactors(float(scaling), tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _diffusers_vae() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise LatentSourceError(f"latent source sd_vae needs diffusers: {DIFFUSERS_HINT} ({e})") from None
    return AutoencoderKL


# ---------------------------------------------------------------------- the codec
class LatentCodec(nn.Module):
    """A frozen encoder/decoder pair (always eval, no_grad, no trainable parameters) with the feature
    cache's encoder interface: `name`, `trainable` (False), `dim` (C), `weights_hash()`,
    `input_size(h, w)`, `patch_grid(h, w)` and `forward`."""

    trainable = False

    def __init__(self, cfg: LatentConfig, model: nn.Module) -> None:
        super().__init__()
        self.cfg, self.model = cfg, model
        s = cfg.structure
        if cfg.source == "autoencoder":
            self.name, self.dim = "autoencoder", int(s["latent_channels"])
            from wm.autoencoder import AutoencoderConfig

            self.factor = AutoencoderConfig.from_dict(s).downsample
        elif cfg.source == "sd_vae":
            self.name, self.dim = "sd_vae", int(s.get("latent_channels", 4))
            self.factor = 2 ** (len(s.get("block_out_channels", (64,))) - 1)
            self.factors = _vae_factors(s, f"the config of {cfg.path}")
        else:
            self.name, self.dim, self.factor = model.name, int(model.dim), 0
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def can_decode(self) -> bool:
        return self.cfg.source != "encoder"

    def train(self, mode: bool = True) -> LatentCodec:
        return super().train(False)  # frozen: eval mode whatever is asked

    def weights_hash(self) -> str:
        """Short sha256 of the source name, the state dict (names, shapes, dtypes, bytes) and what else
        the latents depend on (an sd_vae's scaling, shift or per-channel mean and std, from its
        config.json): a cache key."""
        label = f"{self.cfg.source}:{self.name}"
        if self.cfg.source == "sd_vae":  # not weights: a corrected scaling_factor reused the old latents
            label += self.factors.label()
        return state_dict_hash(self, label)

    # ------------------------------------------------------------------ sizes
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the codec sees for frames of (height, width); a size it cannot take is an error."""
        if self.cfg.source == "encoder":
            return self.model.input_size(height, width)
        if self.cfg.source == "autoencoder":
            size = tuple(self.cfg.structure["image_size"])
            if (height, width) != size:
                raise ValueError(
                    f"latent codec autoencoder: frames are {height}x{width}, it was trained on "
                    f"{size[0]}x{size[1]} frames (train one on this store: wm-train model=autoencoder)"
                )
        elif height % self.factor or width % self.factor:
            raise ValueError(
                f"latent codec sd_vae: frames are {height}x{width}; both sides must be multiples of "
                f"{self.factor}"
            )
        return height, width

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h', w'): the latent grid of frames of (height, width)."""
        if self.cfg.source == "encoder":
            return self.model.patch_grid(height, width)
        h, w = self.input_size(height, width)
        return h // self.factor, w // self.factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h', w') of the latents of frames of (height, width)."""
        return (self.dim, *self.patch_grid(height, width))

    # ------------------------------------------------------------------ encode / decode
    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"latent codec {self.name}: expected float images (B, 3, H, W) in [0, 1], got "
                f"{tuple(x.shape)} {x.dtype}"
            )
        self.input_size(*x.shape[-2:])

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Frames (b, 3, H, W) in [0, 1] -> latents (b, C, h', w'), deterministic (the posterior mean)."""
        self._check(x)
        if self.cfg.source == "autoencoder":
            return self.model.encode_mean(x) * self.model.latent_scale
        if self.cfg.source == "sd_vae":
            return self.factors.to_latents(self.model.encode(x * 2 - 1).latent_dist.mean)
        h, w = self.model.patch_grid(*x.shape[-2:])
        return rearrange(self.model(x), "b (h w) d -> b d h w", h=h, w=w)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents (b, C, h', w') -> frames (b, 3, H, W) in [0, 1]."""
        if not self.can_decode:
            raise ValueError(f"latent codec {self.name} (a patch encoder) cannot decode latents to frames")
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(
                f"latent codec {self.name}: expected latents (b, {self.dim}, h, w), got {tuple(z.shape)}"
            )
        if self.cfg.source == "autoencoder":
            return self.model.decode(z / self.model.latent_scale)
        x = self.model.decode(self.factors.from_latents(z)).sample  # (b, 3, H, W) in [-1, 1]
        return ((x + 1) / 2).clamp(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Frames (b, 3, H, W) in [0, 1] -> latent tokens (b, h' * w', C), channel-last, for the cache."""
        return rearrange(self.encode(x), "b c h w -> b (h w) c")


# ---------------------------------------------------------------------- building
def build_codec(cfg: LatentConfig, load_weights: bool = True) -> LatentCodec:
    """The codec `cfg` describes; its weights read from `cfg.path` when `load_weights`, else left as
    initialized (to be loaded from a checkpoint that holds them)."""
    if load_weights and not Path(cfg.path).exists():
        raise LatentSourceError(f"latent source {cfg.source}: {cfg.path} does not exist")
    if cfg.source == "autoencoder":
        return LatentCodec(cfg, _build_autoencoder(cfg, load_weights))
    if cfg.source == "sd_vae":
        return LatentCodec(cfg, _build_vae(cfg, load_weights))
    enc = EncoderConfig(**cfg.structure)
    if not load_weights:  # random weights stand in for the checkpoint's, so no "RANDOM weights" warning
        enc = dataclasses.replace(enc, weights="none", allow_random=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return LatentCodec(cfg, build_encoder(enc))


def _build_autoencoder(cfg: LatentConfig, load_weights: bool) -> nn.Module:
    from wm.autoencoder import Autoencoder, AutoencoderConfig
    from wm.checkpoint import load_checkpoint, load_model_weights

    model = Autoencoder(AutoencoderConfig.from_dict(cfg.structure))
    if load_weights:
        ckpt = _autoencoder_checkpoint(load_checkpoint(cfg.path))
        load_model_weights(model, ckpt, use_ema=True)
        if not model.latent_scale > 0:
            raise LatentSourceError(
                f"latent source autoencoder: {ckpt['path']} has no latent scale (untrained)"
            )
    return model


# what building an AutoencoderKL from a bad config raises (diffusers checks little of one): an unknown
# block type, 2.5 channels, norm_num_groups 0 (ZeroDivisionError), fewer block_out_channels than blocks
# (IndexError)
VAE_CONFIG_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError, LookupError)


def _build_vae(cfg: LatentConfig, load_weights: bool) -> nn.Module:
    AutoencoderKL = _diffusers_vae()
    if not load_weights:
        try:
            return AutoencoderKL.from_config(cfg.structure)
        except VAE_CONFIG_ERRORS as e:
            msg = " ".join(str(e).split())[:300]
            raise LatentSourceError(
                f"latent source sd_vae: the AutoencoderKL config of {cfg.path} does not build ({msg})"
            ) from e
    path = Path(cfg.path)
    if _read_vae_config(path) != cfg.structure:
        raise LatentSourceError(
            f"latent source sd_vae: {path}/config.json differs from the structure this config was made "
            "with; make the config again (latent_config_from_source)"
        )
    try:
        model, info = AutoencoderKL.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True
        )
    except (OSError, *VAE_CONFIG_ERRORS) as e:
        msg = " ".join(str(e).split())[:300]
        raise LatentSourceError(f"latent source sd_vae: cannot load the weights in {path} ({msg})") from e
    # diffusers only logs weights the file lacks and leaves them on the meta device: the feature cache
    # then failed with "Cannot copy out of meta tensor" (an original LDM-format file: all of them)
    missing = list(info.get("missing_keys") or []) + [n for n, t in model.state_dict().items() if t.is_meta]
    unexpected = list(info.get("unexpected_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing or unexpected:
        said = [
            f"{len(keys)} {what} (the first {keys[0]!r})"
            for what, keys in (("missing", sorted(set(missing))), ("unexpected", unexpected))
            if keys
        ]
        raise LatentSourceError(
            f"latent source sd_vae: the weights in {path} do not fit its AutoencoderKL ({', '.join(said)}): "
            "a partial file, or another format (an original Stable Diffusion checkpoint must be converted "
            "to diffusers' layout)"
        )
    return model
