"""Per-sample image augmentation: random shift, random crop and color jitter.

Every sample gets its own draw (Unlike UWM, which shares one draw across the batch); the frames of
one sample share it, so motion between frames is not distorted. Works on float images
(B, T, C, H, W) in [0, 1], on any device; the dataset calls it with B = 1 per sample, a trainer can
call it on a whole batch on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wm.data.windows import whole_number

# RGB -> YIQ, used to rotate hue.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class AugmentConfig:
    """`shift_pad`: DrQ random shift by up to this many pixels (replicate padding, then crop back).
    `crop`: (h, w) random crop in training, center crop in evaluation. Jitter strengths as in
    torchvision's ColorJitter (factors drawn from [1 - s, 1 + s]; hue in [-hue, hue] turns)."""

    shift_pad: int = 0
    crop: tuple[int, int] | None = None
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shift_pad", whole_number("shift_pad", self.shift_pad))
        if self.shift_pad < 0:
            raise ValueError(f"shift_pad must be >= 0, got {self.shift_pad}")
        if self.crop is not None:
            if isinstance(self.crop, (str, bytes)) or not hasattr(self.crop, "__len__"):
                raise ValueError(f"crop must be (h, w) with positive sizes, got {self.crop!r}")
            object.__setattr__(self, "crop", tuple(whole_number("crop size", c) for c in self.crop))
            if len(self.crop) != 2 or min(self.crop) < 1:
                raise ValueError(f"crop must be (h, w) with positive sizes, got {self.crop}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")

    @property
    def active(self) -> bool:
        return bool(
            self.shift_pad or self.crop or self.brightness or self.contrast or self.saturation or self.hue
        )


def _uniform(b: int, lo: float, hi: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=gen, device=device)


def _crop_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop (B, T, C, H, W) to (h, w) at a per-sample (top, left), by gathering rows then columns."""
    B, T, C, H, W = x.shape
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, None, :, None]  # (B, 1, 1, h, 1)
    x = torch.gather(x, 3, rows.expand(B, T, C, h, W))
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, None, :]  # (B, 1, 1, 1, w)
    return torch.gather(x, 4, cols.expand(B, T, C, h, w))


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Shift each sample by up to `pad` pixels in each direction (edges replicated)."""
    B, T, C, H, W = x.shape
    padded = F.pad(x.reshape(B * T, C, H, W), (pad, pad, pad, pad), mode="replicate").reshape(
        B, T, C, H + 2 * pad, W + 2 * pad
    )
    top = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=x.device)
    left = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=x.device)
    return _crop_at(padded, top, left, H, W)


def random_crop(x: torch.Tensor, size: tuple[int, int], gen: torch.Generator | None = None) -> torch.Tensor:
    B, _, _, H, W = x.shape
    h, w = size
    top = torch.randint(0, H - h + 1, (B,), generator=gen, device=x.device)
    left = torch.randint(0, W - w + 1, (B,), generator=gen, device=x.device)
    return _crop_at(x, top, left, h, w)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    H, W = x.shape[-2:]
    h, w = size
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each with a per-sample factor. RGB (C = 3) takes all
    four; RGBA (C = 4) the same on its colour channels, alpha untouched; grayscale (C = 1) brightness
    and contrast (it has no saturation or hue)."""
    C = x.shape[2]
    if C == 4:
        return torch.cat([color_jitter(x[:, :, :3], cfg, gen), x[:, :, 3:]], dim=2)
    if C == 1:
        cfg = AugmentConfig(brightness=cfg.brightness, contrast=cfg.contrast)
    elif C != 3:
        raise ValueError(f"color jitter takes 1, 3 or 4 channels, got images of shape {tuple(x.shape)}")
    B, dev, dtype = x.shape[0], x.device, x.dtype
    shape = (B, 1, 1, 1, 1)  # factors are drawn in float32 and cast: half / bfloat16 images stay so
    gray_w = _GRAY.to(x)[None, None, :, None, None] if C == 3 else torch.ones_like(x[:1, :1, :, :1, :1])
    if cfg.brightness:
        x = x * _uniform(B, 1 - cfg.brightness, 1 + cfg.brightness, gen, dev).view(shape).to(dtype)
    if cfg.contrast:
        mean = (x * gray_w).sum(2, keepdim=True).mean((3, 4), keepdim=True)  # (B, T, 1, 1, 1)
        factor = _uniform(B, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev).view(shape).to(dtype)
        x = (x - mean) * factor + mean
    if cfg.saturation:
        gray = (x * gray_w).sum(2, keepdim=True)  # (B, T, 1, H, W)
        factor = _uniform(B, 1 - cfg.saturation, 1 + cfg.saturation, gen, dev).view(shape).to(dtype)
        x = (x - gray) * factor + gray
    if cfg.hue:
        theta = _uniform(B, -cfg.hue, cfg.hue, gen, dev) * 2 * torch.pi
        cos, sin = torch.cos(theta), torch.sin(theta)
        work = torch.promote_types(dtype, torch.float32)  # linalg.inv takes no half precision
        rot = torch.zeros(B, 3, 3, device=dev, dtype=work)  # rotation of the I/Q plane
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        yiq = _YIQ.to(dev, work)
        mat = (torch.linalg.inv(yiq) @ rot @ yiq).to(dtype)  # (B, 3, 3)
        x = torch.einsum("bij,btjhw->btihw", mat, x)
    return x.clamp(0.0, 1.0)


def augment(
    x: torch.Tensor, cfg: AugmentConfig, train: bool = True, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Apply `cfg` to float images (B, T, C, H, W) in [0, 1]. In evaluation only the center crop applies."""
    if x.ndim != 5:
        raise ValueError(f"augment expects (B, T, C, H, W) images, got shape {tuple(x.shape)}")
    if not x.is_floating_point():  # colour jitter would clamp 0..255 to [0, 1]: a white image
        raise ValueError(
            f"augment expects float images in [0, 1], got {x.dtype}: convert with x.float() / 255"
        )
    if cfg.crop is not None and (cfg.crop[0] > x.shape[-2] or cfg.crop[1] > x.shape[-1]):
        raise ValueError(f"crop {cfg.crop} is larger than the images {tuple(x.shape[-2:])}")
    if not train:
        return center_crop(x, cfg.crop) if cfg.crop is not None else x
    if cfg.shift_pad:
        x = random_shift(x, cfg.shift_pad, gen)
    if cfg.crop is not None:
        x = random_crop(x, cfg.crop, gen)
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        x = color_jitter(x, cfg, gen)
    return x
