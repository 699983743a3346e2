"""Patch encoders for world models: frozen pretrained backbones or a small CNN, behind one interface.

Every encoder maps images (B, 3, H, W) float in [0, 1] to patch tokens (B, P, D), P = h * w of
`patch_grid(H, W)`; normalization (ImageNet mean/std for the pretrained ones) happens inside.

    name             D    backbone                                          trainable
    dinov2_vits14    384  DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2)   no (frozen, eval, no_grad)
    dinov2_vitb14    768  DINOv2 ViT-B/14 (timm vit_base_patch14_dinov2)    no
    resnet18         256  torchvision ResNet-18 after layer3 (stride 16)    no
    cnn              64   small conv net, stride 8 (64x64 -> 8x8 patches)   yes, with the world model

The project's default demo uses `cnn`: no pretrained weights can be downloaded on the project's
machines, and a randomly initialized frozen DINOv2 gives meaningless features. With DINOv2 weights
the switch is one line: `encoder.name=dinov2_vits14 encoder.weights=/path/dinov2_vits14_pretrain.pth`
(the official file from https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth),
or `encoder.weights=timm` on a machine with internet access.

Image sizes. DINOv2 needs sides that are multiples of 14: frames are *resized* (bilinear, antialiased)
up to the next multiple of 14 (64x64 -> 70x70, 5x5 patches), never padded, so no border of constant
pixels leaks into the features; the positional embedding is interpolated to any grid (timm
`dynamic_img_size`). `image_size > 0` first resizes every frame to image_size x image_size
(DINO-WM resizes to 196 px: 14x14 patches). Convolutional encoders take any size: each stride-2 stage
gives ceil(side / 2).

Weights (`EncoderConfig.weights`): "none" (random init: normal for `cnn`; for the pretrained
backbones only with `allow_random=True`, which warns), "timm" (timm / torchvision pretrained download,
needs internet), or a local .pth/.pt/.safetensors file. A DINOv2 file may use timm's key layout or
the official facebookresearch/dinov2 one; ResNet-18 files use torchvision's layout. Loading is strict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from wm.checkpoint import damaged_entry, non_finite_keys, state_dict_diff
from wm.options import check_numbers

DINOV2_MODELS = {  # our name -> (timm model name, official file name, feature dim)
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth", 384),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth", 768),
}
ENCODER_NAMES = (*DINOV2_MODELS, "resnet18", "cnn")
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{stem}/{file}"
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_DIMS = {1: 64, 2: 128, 3: 256, 4: 512}


def state_dict_hash(module: nn.Module, label: str) -> str:
    """Short sha256 of `label` and the module's state dict (names, shapes, dtypes, bytes): a cache key."""
    h = hashlib.sha256(label.encode())
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class EncoderWeightsError(RuntimeError):
    """Pretrained weights are missing, cannot be downloaded, or do not fit the model."""


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "cnn"  # one of ENCODER_NAMES
    weights: str = "none"  # "none" | "timm" (download, needs internet) | path to a local checkpoint
    allow_random: bool = False  # let a pretrained backbone run with random weights (tests only)
    cnn_channels: tuple[int, ...] = (32, 64, 64)  # small CNN trained from scratch with the world model
    cnn_dim: int = 64  # its patch feature dim
    cnn_stride: int = 8  # total stride: 64x64 images -> 8x8 = 64 patches
    resnet_layer: int = 3  # ResNet-18 feature map after layerN (stride 16 at 3)
    image_size: int = 0  # > 0: resize frames to image_size x image_size first (DINO-WM: 224)

    def __post_init__(self) -> None:
        # A float reached torch as a TypeError (image_size=2.5), int() cut cnn_channels 8.7 to 8, the
        # string "false" was a true allow_random.
        check_numbers(type(self), vars(self), "encoder")
        object.__setattr__(self, "cnn_channels", tuple(int(c) for c in self.cnn_channels))
        if self.name not in ENCODER_NAMES:
            raise ValueError(f"encoder name {self.name!r} is not one of {ENCODER_NAMES}")
        if not self.weights:
            raise ValueError("encoder weights must be 'none', 'timm' or a checkpoint path, got ''")
        if self.name == "cnn" and self.weights == "timm":
            raise ValueError("the cnn encoder has no pretrained weights: use weights='none' or a local file")
        if not self.cnn_channels or min(self.cnn_channels) < 1 or self.cnn_dim < 1:
            raise ValueError(f"cnn_channels {self.cnn_channels} and cnn_dim {self.cnn_dim} must be positive")
        n_down = math.log2(self.cnn_stride) if self.cnn_stride >= 1 else -1
        if n_down != int(n_down) or not 0 <= n_down <= len(self.cnn_channels):
            raise ValueError(
                f"cnn_stride {self.cnn_stride} must be a power of 2 with at most one stride-2 stage per "
                f"entry of cnn_channels (here at most {2 ** len(self.cnn_channels)})"
            )
        if self.resnet_layer not in RESNET_DIMS:
            raise ValueError(f"resnet_layer must be 1, 2, 3 or 4, got {self.resnet_layer}")
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0 (0: keep the frame size), got {self.image_size}")


# ---------------------------------------------------------------------- the interface
class PatchEncoder(nn.Module):
    """Images (B, 3, H, W) float in [0, 1] -> patch tokens (B, P, D). Frozen encoders (`trainable`
    False) have no trainable parameters, stay in eval mode whatever `train()` is asked, and run
    under no_grad."""

    name: str
    dim: int
    trainable: bool

    def __init__(self, name: str, dim: int, trainable: bool, image_size: int, imagenet_norm: bool) -> None:
        super().__init__()
        self.name, self.dim, self.trainable, self.image_size = name, dim, trainable, image_size
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet_norm else ((0.5,) * 3, (0.5,) * 3)
        # Not persistent: they are not weights, so they stay out of the state dict and weights_hash.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # Subclasses define the backbone's input size and grid, and the features of normalized input.
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the backbone sees for frames of (height, width)."""
        if self.image_size:
            return self.image_size, self.image_size
        return height, width

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def _features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) normalized -> (B, P, D)
        raise NotImplementedError

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) patch grid for frames of (height, width); P = h * w."""
        return self._grid(*self.input_size(height, width))

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{self.name}: expected float images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} "
                f"{images.dtype} (convert uint8 frames with .float() / 255)"
            )
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            size = self.input_size(*images.shape[-2:])
            if tuple(images.shape[-2:]) != size:
                images = F.interpolate(
                    images, size=size, mode="bilinear", align_corners=False, antialias=True
                )
            return self._features((images - self.mean) / self.std)  # (B, P, D)

    def train(self, mode: bool = True) -> PatchEncoder:
        return super().train(mode and self.trainable)  # frozen encoders stay in eval mode

    def weights_hash(self) -> str:
        """Short sha256 of the encoder name and its state dict (names, shapes, dtypes, bytes): a cache key."""
        return state_dict_hash(self, self.name)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()


def _halvings(side: int, n: int) -> int:
    """Side after n stride-2 convolutions (kernel 3, padding 1, or ResNet's 7/3 stem): ceil each time."""
    for _ in range(n):
        side = (side + 1) // 2
    return side


# ---------------------------------------------------------------------- DINOv2
class DinoV2Encoder(PatchEncoder):
    """Frozen DINOv2 ViT through timm; patch tokens after the final norm (cls/register tokens dropped)."""

    patch = 14

    def __init__(self, cfg: EncoderConfig) -> None:
        import timm

        timm_name, _, dim = DINOV2_MODELS[cfg.name]
        super().__init__(cfg.name, dim, False, cfg.image_size, imagenet_norm=True)
        if cfg.weights == "timm":
            try:
                self.vit = timm.create_model(timm_name, pretrained=True, dynamic_img_size=True)
            except Exception as e:
                raise EncoderWeightsError(_download_failed(cfg.name, e)) from e
        elif cfg.weights == "none":
            self.vit = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True)
        else:
            with torch.device("meta"):  # no random init to throw away (seconds for ViT-B)
                self.vit = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True)
            sd = _dinov2_to_timm(read_weights_file(cfg.weights), self.vit, cfg.weights)
            _load_into(self.vit, sd, cfg.weights)
        self._freeze()

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = super().input_size(height, width)
        return -(-h // self.patch) * self.patch, -(-w // self.patch) * self.patch  # up to multiples of 14

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch, width // self.patch

    def _features(self, x: Tensor) -> Tensor:
        tokens = self.vit.forward_features(x)  # (B, prefix + P, D), final norm applied
        return tokens[:, self.vit.num_prefix_tokens :]  # (B, P, D)


def _dinov2_to_timm(sd: dict[str, Tensor], model: nn.Module, where: str) -> dict[str, Tensor]:
    """A DINOv2 state dict in timm's or the official (facebookresearch/dinov2) layout, in timm's layout.

    Official -> timm: `mask_token` (iBOT masking, unused at inference) is dropped; chunked blocks
    `blocks.<chunk>.<i>.` become `blocks.<i>.`; `register_tokens` (the DINOv2-with-registers
    models) are refused with a clear error. Names such
    as `blocks.N.ls1.gamma` already match. A positional embedding for another square grid (official
    files: 37x37 + cls, for 518 px, which is also timm's default) is resampled to the model's grid."""
    from timm.layers import resample_abs_pos_embed

    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # BlockChunk -> flat blocks
        out["reg_token" if key == "register_tokens" else key] = value
    target = model.state_dict()
    if "reg_token" in out and "reg_token" not in target:
        raise EncoderWeightsError(
            f"{where}: a DINOv2 checkpoint *with registers* (register_tokens); the dinov2_vits14/vitb14 "
            "encoders take the original DINOv2 weights (dinov2_vits14_pretrain.pth, no registers)"
        )
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != target["pos_embed"].shape:
        n_prefix = model.num_prefix_tokens  # the cls token has a position (DINOv2 without registers)
        old = math.isqrt(pos.shape[1] - n_prefix)
        if old * old == pos.shape[1] - n_prefix:  # square grid: resample (bicubic); otherwise _check_keys
            out["pos_embed"] = resample_abs_pos_embed(
                pos,
                new_size=list(model.patch_embed.grid_size),
                old_size=[old, old],
                num_prefix_tokens=n_prefix,
            )
    return out


# ---------------------------------------------------------------------- ResNet-18
class ResNetEncoder(PatchEncoder):
    """Frozen torchvision ResNet-18 up to layer`resnet_layer`; its feature map cells are the patches."""

    def __init__(self, cfg: EncoderConfig) -> None:
        import torchvision

        super().__init__(cfg.name, RESNET_DIMS[cfg.resnet_layer], False, cfg.image_size, imagenet_norm=True)
        self.layer = cfg.resnet_layer
        if cfg.weights == "timm":
            try:
                full = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
            except Exception as e:
                raise EncoderWeightsError(_download_failed(cfg.name, e)) from e
        elif cfg.weights == "none":
            full = torchvision.models.resnet18(weights=None)
        else:
            with torch.device("meta"):
                full = torchvision.models.resnet18(weights=None)
            full.fc = nn.Identity()  # never used (the encoder stops at layerN): a file without it, or of
            # another class count (fine-tuned), fits
            weights = read_weights_file(cfg.weights)
            _load_into(full, {k: v for k, v in weights.items() if not k.startswith("fc.")}, cfg.weights)
        stages = [full.conv1, full.bn1, full.relu, full.maxpool]
        stages += [getattr(full, f"layer{i}") for i in range(1, self.layer + 1)]
        self.backbone = nn.Sequential(*stages)
        self._freeze()

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        n = 2 + (self.layer - 1)  # conv1 and maxpool halve, then layer2..layerN
        return _halvings(height, n), _halvings(width, n)

    def _features(self, x: Tensor) -> Tensor:
        return rearrange(self.backbone(x), "b d h w -> b (h w) d")


# ---------------------------------------------------------------------- small CNN
class ConvEncoder(PatchEncoder):
    """conv3x3-GELU stages (the first log2(stride) with stride 2), a 1x1 projection, and a LayerNorm
    (no affine) over each patch token.

    No normalization inside the stages: GroupNorm's backward pass was a large share of a training step
    on this project's CPUs (BENCHMARKS.md, "Figures from development"). The output LayerNorm fixes
    the features' scale, so a world model trained jointly cannot shrink its prediction loss by
    shrinking the features."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__("cnn", cfg.cnn_dim, True, cfg.image_size, imagenet_norm=False)
        self.n_down = int(math.log2(cfg.cnn_stride))
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(cfg.cnn_channels):
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2 if i < self.n_down else 1, padding=1),
                nn.GELU(),
            ]
            c_in = c
        layers.append(nn.Conv2d(c_in, cfg.cnn_dim, 1))
        self.net = nn.Sequential(*layers)
        self.out_norm = nn.LayerNorm(cfg.cnn_dim, elementwise_affine=False)
        if cfg.weights != "none":
            sd = read_weights_file(cfg.weights)
            _check_keys(sd, self.state_dict(), cfg.weights)
            self.load_state_dict(sd, strict=True)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return _halvings(height, self.n_down), _halvings(width, self.n_down)

    def _features(self, x: Tensor) -> Tensor:
        return self.out_norm(rearrange(self.net(x), "b d h w -> b (h w) d"))


# ---------------------------------------------------------------------- building and loading
def build_encoder(cfg: EncoderConfig, load_weights: bool = True) -> PatchEncoder:
    """The encoder `cfg` names, with its weights loaded (see the module docstring). With
    `load_weights=False` only its structure: a model rebuilt from a checkpoint, whose state dict holds
    the weights (the original file need not exist any more, nor the network be reachable)."""
    if not load_weights:
        cfg = dataclasses.replace(cfg, weights="none", allow_random=True)
    if cfg.name == "cnn":
        return ConvEncoder(cfg)
    if load_weights:
        check_weights(cfg)
    return DinoV2Encoder(cfg) if cfg.name in DINOV2_MODELS else ResNetEncoder(cfg)


def check_weights(cfg: EncoderConfig) -> None:
    """A pretrained backbone's weights exist (or random weights were asked for, with a warning); a
    trained-from-scratch CNN needs none."""
    if cfg.name == "cnn":
        return
    if cfg.weights == "none":
        if not cfg.allow_random:
            raise EncoderWeightsError(
                f"encoder {cfg.name!r} is a frozen pretrained backbone and needs pretrained weights: "
                f"{_how_to_get(cfg.name)} Give allow_random=true (model.encoder.allow_random=true) only to "
                "test with random weights (its features are meaningless), or use the encoder name cnn "
                "(model.encoder.name=cnn), which trains from scratch."
            )
        warnings.warn(
            f"encoder {cfg.name!r} runs with RANDOM weights (allow_random=True): its frozen features are "
            "meaningless for a world model",
            stacklevel=3,
        )
    elif cfg.weights != "timm" and not Path(cfg.weights).expanduser().is_file():
        raise EncoderWeightsError(
            f"{cfg.name}: weights file {cfg.weights} does not exist. {_how_to_get(cfg.name)}"
        )


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or torch weights file, unwrapped from {"model"|"state_dict"|"teacher": ...}
    and stripped of a "module." / "backbone." / "_orig_mod." prefix shared by every key. For third-party
    backbone files; the project's own checkpoints are read by `wm.checkpoint.load_checkpoint`."""
    path = Path(path).expanduser()  # a config's "~/weights/..." (no shell expands it in key=value)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            damaged = damaged_entry(path) if path.is_file() else None
            if damaged is not None:
                raise EncoderWeightsError(
                    f"{path} is damaged: the bytes of its entry {damaged!r} do not match the checksum saved "
                    "with them (changed on disk or in a download); download or copy it again"
                )
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except EncoderWeightsError:
        raise
    except pickle.UnpicklingError as e:  # torch's message is several lines of advice on weights_only
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle of tensors at all
            raise EncoderWeightsError(f"{path}: cannot read the checkpoint; not a torch weights file") from e
        raise EncoderWeightsError(
            f"{path}: holds pickled Python objects besides tensors ({found.group(1)}: a whole model saved "
            "with torch.save(model)?); save and pass its state_dict() instead"
        ) from e
    except Exception as e:
        msg = str(e).strip().split("\n")[0][:200]
        raise EncoderWeightsError(
            f"{path}: cannot read the checkpoint; not a torch (.pt/.pth) or .safetensors weights file? "
            f"({type(e).__name__}: {msg})"
        ) from e
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise EncoderWeightsError(f"{path}: not a state dict of tensors (got {type(sd).__name__})")
    if any(k.startswith("backbone.") for k in sd):  # a training checkpoint's: its heads are not the model's
        sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}  # (DINOv2's dino_head, ibot_head)
    stripped = None
    while stripped != sd:  # nested, in any order: torch.compile of DDP is _orig_mod.module.
        stripped = sd
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _load_into(model: nn.Module, sd: dict[str, Tensor], where: str | Path) -> None:
    """Load `sd` strictly into `model` (built on the meta device), in the model's dtypes."""
    target = model.state_dict()
    # files saved before BatchNorm counted its batches (torchvision's ImageNet ResNets) have no counters;
    # torch's own loading fills them in, and they do nothing in eval
    counters = [k for k in target if k.endswith(".num_batches_tracked") and k not in sd]
    sd = {**sd, **{k: torch.zeros((), dtype=torch.long) for k in counters}}
    _check_keys(sd, target, where)
    sd = {k: v.to(target[k].dtype).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (none in these models) would be left uninitialized
        raise EncoderWeightsError(f"{where}: no values for {left[:5]} after loading")


def _check_keys(sd: dict[str, Tensor], target: dict[str, Tensor], where: str | Path) -> None:
    """Raise EncoderWeightsError naming missing, unexpected and mis-shaped keys (a few of each)."""
    problems = state_dict_diff(target, sd)
    if problems:
        raise EncoderWeightsError(f"{where}: checkpoint does not fit the model; " + "; ".join(problems))
    bad = sorted(non_finite_keys(sd))
    if bad:  # loaded, they gave NaN features and no error
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise EncoderWeightsError(
            f"{where}: non-finite weights (NaN or inf) in {', '.join(bad[:5])}{more}: a corrupt file or one "
            "saved from a diverged run"
        )


def _how_to_get(name: str) -> str:
    if name in DINOV2_MODELS:
        file = DINOV2_MODELS[name][1]
        url = DINOV2_URL.format(stem=name, file=file)
    else:
        file, url = Path(RESNET18_URL).name, RESNET18_URL
    return (
        f"download {url} on a machine with internet access and give the encoder's weights=/path/{file} "
        f"(wm-train: model.encoder.weights=/path/{file}, or model.obs.patch_encoder.weights= for a "
        "policy's encoder; weights=timm where downloads work)."
    )


def _download_failed(name: str, e: Exception) -> str:
    return (
        f"{name}: downloading pretrained weights failed ({type(e).__name__}: {str(e)[:200]}). This machine "
        f"probably has no internet access (or HF_HUB_OFFLINE is set). Use a local file instead: "
        f"{_how_to_get(name)}"
    )
