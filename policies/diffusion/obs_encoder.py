"""Observation encoders for diffusion policies: per-step features from cameras and proprioception.

Two image backbones, one encoder per camera:

    resnet18  Diffusion Policy's: torchvision ResNet-18 (random init, no download) with every
              BatchNorm replaced by GroupNorm (16 channels a group) and avgpool/fc replaced by a
              spatial softmax over the last feature map (num_keypoints expected (x, y) positions),
              then a linear layer to `feature_dim`. Trained with the policy.
    patch     a `wm.encoders` patch encoder (the small trainable CNN, or a frozen pretrained
              DINOv2 / ResNet with local weights); its tokens (B, P, D) are mean-pooled ("mean") or
              average-pooled to a patch_grid x patch_grid grid and flattened ("grid"), then projected to
              `feature_dim`. It also accepts cached features (B, To, P, D) in place of the images.

Images come as (B, To, C, H, W) float in [0, 1] at `image_size`; training takes a random crop of
`crop` (one draw per sample, shared by its To frames), evaluation the center crop. Proprioception
(normalized by the policy) is appended. Output: (B, To, Dc) with Dc = cameras * feature_dim +
proprio_dim; the denoisers flatten or tokenize it.

bf16 inference (`precision.set_inference_precision`, autograd off) runs the image backbone (ResNet-18
or the patch encoder) as a cached bf16 copy and the small heads after it in fp32; on a CPU only for
input shapes where the copy was measured faster than the fp32 backbone (`wm.kernels`; speed and error
printed by `benchmarks/bench_precision.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from policies.diffusion.precision import Bf16Inference, Shadow
from wm.checks import check_unit_frames
from wm.data.augment import center_crop, random_crop
from wm.encoders import EncoderConfig, PatchEncoder, build_encoder
from wm.options import check_numbers, sub_config

BACKBONES = ("resnet18", "patch")
PATCH_POOLS = ("mean", "grid")


@dataclass(frozen=True)
class ObsEncoderConfig:
    image_keys: tuple[str, ...] = ("image",)
    image_size: tuple[int, int] = (96, 96)  # (H, W) of the frames given to the policy
    crop: tuple[int, int] | None = (84, 84)
    proprio_key: str | None = "proprio"
    proprio_dim: int = 0  # 0: no proprioception
    backbone: str = "resnet18"
    feature_dim: int = 64  # per camera and step
    num_keypoints: int = 32  # spatial softmax keypoints (resnet18)
    patch_encoder: EncoderConfig = field(default_factory=EncoderConfig)  # backbone "patch"
    patch_pool: str = "mean"
    patch_grid: int = 2

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model.obs")  # built directly too, not only from a config
        encoder = sub_config(EncoderConfig, self.patch_encoder, "model.obs.patch_encoder")
        object.__setattr__(self, "patch_encoder", encoder)
        object.__setattr__(self, "image_keys", tuple(self.image_keys))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
            if len(self.crop) != 2 or not (
                0 < self.crop[0] <= self.image_size[0] and 0 < self.crop[1] <= self.image_size[1]
            ):
                raise ValueError(f"crop {self.crop} must be positive and fit in image_size {self.image_size}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.patch_pool not in PATCH_POOLS:
            raise ValueError(f"patch_pool must be one of {PATCH_POOLS}, got {self.patch_pool!r}")
        if self.feature_dim < 1 or self.num_keypoints < 1 or self.patch_grid < 1 or self.proprio_dim < 0:
            raise ValueError(
                f"feature_dim, num_keypoints, patch_grid must be >= 1, proprio_dim >= 0 ({self})"
            )
        if not self.image_keys and not self.proprio_dim:
            raise ValueError("the policy observes nothing: give image_keys and/or proprio_dim > 0")
        if self.proprio_dim and not self.proprio_key:
            raise ValueError("proprio_dim > 0 needs a proprio_key")

    def blind_note(self) -> str | None:
        """A note when the resnet18 backbone cannot see its frames: its stride is 32, so frames of 32 px or
        less (after the crop) give a 1 x 1 feature map, every keypoint at its centre for any image."""
        side = self.crop or self.image_size
        if self.backbone != "resnet18" or not self.image_keys or max(side) > 32:
            return None
        return (
            f"model.obs.backbone=resnet18 on {side[0]} x {side[1]} frames (after the crop) has a 1 x 1 "
            "feature map: its keypoints are the same for every image, and the policy does not see its "
            "cameras; give larger frames (33 px or more) or model.obs.backbone=patch"
        )

    @property
    def out_dim(self) -> int:
        """Dc: features per observation step."""
        return len(self.image_keys) * self.feature_dim + self.proprio_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_encoder"] = dataclasses.asdict(self.patch_encoder)
        return d


class SpatialSoftmax(nn.Module):
    """Feature map (B, C, h, w) -> (B, 2K): the expected (x, y) in [-1, 1] of K softmax keypoint maps."""

    def __init__(self, channels: int, num_keypoints: int) -> None:
        super().__init__()
        self.keypoints = nn.Conv2d(channels, num_keypoints, 1)

    def forward(self, fmap: Tensor) -> Tensor:
        h, w = fmap.shape[-2:]
        attn = self.keypoints(fmap).flatten(2).softmax(-1)  # (B, K, h * w)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=fmap.device),
            torch.linspace(-1, 1, w, device=fmap.device),
            indexing="ij",
        )
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1).to(attn)  # (h * w, 2)
        return rearrange(attn @ grid, "b k xy -> b (k xy)")


def resnet18_groupnorm() -> nn.Module:
    """torchvision ResNet-18 (random init) up to layer4, BatchNorm -> GroupNorm(C // 16, C)."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(child.num_features // 16, child.num_features))
            else:
                swap(child)

    swap(net)
    return nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc: (B, 512, h, w)


def run_backbone(owner: Bf16Inference, backbone: nn.Module, x: Tensor) -> Tensor:
    """backbone(x) in the owner's inference precision (`Bf16Inference.run_in_precision`: bf16 where
    active and, on a CPU, measured faster), and, on a CPU, in the memory layout measured fastest: the
    weights as they are, or a channels-last copy (`owner._nhwc`, per precision) on a channels-last
    input. Frames permuted from (H, W, 3) arrive channels-last, where PyTorch's convolutions with
    contiguous weights copy every weight to channels-last at every call."""
    nhwc = owner._nhwc  # type: ignore[attr-defined]

    def in_bf16(net: nn.Module, xin: Tensor) -> Tensor:
        return net(xin.bfloat16()).to(x.dtype)

    def cl() -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    # (the inputs are converted inside the candidates: only the one that runs pays for it)
    variants: dict[str, Callable[[], Tensor]] = {}
    if x.ndim == 4:
        variants["fp32_nhwc"] = lambda: nhwc["fp32"](backbone)(cl())
        variants["bf16_nhwc"] = lambda: in_bf16(nhwc["bf16"](backbone), cl())
        if not x.is_contiguous():
            variants["fp32_nchw"] = lambda: backbone(x.contiguous())
            variants["bf16_nchw"] = lambda: in_bf16(owner._bf16(backbone), x.contiguous())  # type: ignore[attr-defined]
    return owner.run_in_precision(
        (x,),
        lambda: backbone(x),
        lambda: in_bf16(owner._bf16(backbone), x),  # type: ignore[attr-defined]
        variants,
    )


def layout_shadows() -> dict[str, Shadow]:
    """The channels-last copies `run_backbone` may run a backbone on, per precision."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {name: Shadow(dtype, channels_last=True) for name, dtype in dtypes.items()}


class ResNetKeypoints(Bf16Inference, nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> (N, feature_dim): ResNet-18/GroupNorm, spatial softmax, linear."""

    def __init__(self, cfg: ObsEncoderConfig) -> None:
        super().__init__()
        self.backbone = resnet18_groupnorm()
        self.pool = SpatialSoftmax(512, cfg.num_keypoints)
        self.out = nn.Sequential(nn.Linear(2 * cfg.num_keypoints, cfg.feature_dim), nn.ReLU())
        self._bf16 = Shadow()
        self._nhwc = layout_shadows()

    def forward(self, images: Tensor) -> Tensor:
        return self.out(self.pool(run_backbone(self, self.backbone, images * 2 - 1)))


class PatchFeatures(Bf16Inference, nn.Module):
    """Images (N, 3, H, W) or cached tokens (N, P, D) -> (N, feature_dim) through a wm patch encoder
    (`load_weights=False`: its structure only, for a model whose checkpoint holds its weights)."""

    def __init__(self, cfg: ObsEncoderConfig, load_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder: PatchEncoder = build_encoder(cfg.patch_encoder, load_weights=load_weights)
        side = cfg.crop or cfg.image_size
        self.grid = self.encoder.patch_grid(*side)
        n_tok = 1 if cfg.patch_pool == "mean" else cfg.patch_grid**2
        self.out = nn.Linear(n_tok * self.encoder.dim, cfg.feature_dim)
        self._bf16 = Shadow()
        self._nhwc = layout_shadows()

    def forward(self, x: Tensor) -> Tensor:
        # images (N, 3, H, W) or cached tokens (N, P, D)
        tokens = run_backbone(self, self.encoder, x) if x.ndim == 4 else x
        if self.cfg.patch_pool == "mean":
            pooled = tokens.mean(1)  # (N, D)
        else:
            fmap = rearrange(tokens, "n (h w) d -> n d h w", h=self.grid[0], w=self.grid[1])
            pooled = F.adaptive_avg_pool2d(fmap, self.cfg.patch_grid).flatten(1)  # (N, D * g * g)
        return self.out(pooled)


class ObsEncoder(nn.Module):
    """obs {camera: (B, To, C, H, W), proprio_key: (B, To, Dp) normalized} -> (B, To, Dc).
    `load_weights`: a patch encoder's pretrained weights read from their file (False: a model rebuilt
    from a checkpoint, which holds them; the file need not exist any more)."""

    def __init__(self, cfg: ObsEncoderConfig, load_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "resnet18":  # trained from scratch, as Diffusion Policy's
            self.cameras = nn.ModuleDict({_mkey(k): ResNetKeypoints(cfg) for k in cfg.image_keys})
        else:
            self.cameras = nn.ModuleDict({_mkey(k): PatchFeatures(cfg, load_weights) for k in cfg.image_keys})

    def check_obs(self, obs: dict[str, Tensor]) -> None:
        """One clear error for an observation this encoder was not trained on."""
        c = self.cfg
        missing = [k for k in c.image_keys if k not in obs]
        if missing:
            raise ValueError(
                f"observation lacks camera(s) {missing} (it has {sorted(obs)}); the policy was trained with "
                f"cameras {list(c.image_keys)}"
            )
        for k in c.image_keys:
            img = obs[k]
            if c.backbone == "patch" and img.ndim == 4:  # cached features (B, To, P, D)
                cam = self.cameras[_mkey(k)]
                P, D = cam.grid[0] * cam.grid[1], cam.encoder.dim
                if tuple(img.shape[-2:]) == (P, D) and img.is_floating_point():
                    continue
                raise ValueError(  # frames without their To axis were read as tokens (rows x columns)
                    f"camera {k!r}: expected images (E, To, 3, H, W) or cached features (E, To, {P}, {D}), "
                    f"got {img.dtype} of shape {tuple(img.shape)}"
                )
            if img.ndim != 5 or img.shape[2] != 3:
                raise ValueError(
                    f"camera {k!r}: expected images (E, To, 3, H, W), got shape {tuple(img.shape)}"
                )
            if tuple(img.shape[-2:]) != c.image_size:
                raise ValueError(
                    f"camera {k!r} images are {tuple(img.shape[-2:])} (H, W) but the policy was trained on "
                    f"{c.image_size}: resize the frames, or is this another camera setting?"
                )
            if not img.is_floating_point():
                raise ValueError(
                    f"camera {k!r}: images must be float in [0, 1], got {img.dtype} (divide by 255)"
                )
            if not self.training:  # (training reads the store's frames, in [0, 1] by construction)
                check_unit_frames(img, k)
        if c.proprio_dim:
            if c.proprio_key not in obs:
                raise ValueError(
                    f"observation lacks {c.proprio_key!r} (it has {sorted(obs)}); the policy needs it"
                )
            shape = tuple(obs[c.proprio_key].shape)
            if len(shape) != 3:  # (E, To) was a cat error deep in the encoder
                raise ValueError(f"{c.proprio_key!r}: expected (E, To, {c.proprio_dim}), got {shape}")
            if obs[c.proprio_key].shape[-1] != c.proprio_dim:
                raise ValueError(
                    f"{c.proprio_key!r} has {obs[c.proprio_key].shape[-1]} dims, the policy was trained on "
                    f"{c.proprio_dim}"
                )
        keys = list(c.image_keys) + ([c.proprio_key] if c.proprio_dim else [])
        batches = {k: obs[k].shape[0] for k in keys}
        if len(set(batches.values())) > 1:  # was a cat error deep in the encoder
            raise ValueError(f"observation keys hold different numbers of episodes (E): {batches}")

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        c = self.cfg
        feats = []
        for k in c.image_keys:
            x = obs[k]
            B = x.shape[0]
            if x.ndim == 5 and c.crop is not None:
                x = random_crop(x, c.crop) if self.training else center_crop(x, c.crop)
            flat = x.reshape(-1, *x.shape[2:])  # (B * To, C, H, W) or cached (B * To, P, D)
            feats.append(rearrange(self.cameras[_mkey(k)](flat), "(b t) f -> b t f", b=B))
        if c.proprio_dim:
            feats.append(obs[c.proprio_key].float())  # (B, To, Dp)
        return torch.cat(feats, dim=-1)  # (B, To, Dc)


def _mkey(key: str) -> str:
    return key.replace(".", "__")  # ModuleDict keys cannot hold dots
