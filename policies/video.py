"""Evaluation video frames and episode videos a person can read at a glance.

`compose_frame` puts the real camera frame, the controller's view (e.g. the world model's decoded
prediction) and the goal image side by side, each under a caption, upscaled with nearest-neighbour
so 64 px simulator frames stay crisp. `write_episode_video` draws a green SUCCESS or red FAILURE
banner (with the seed) over every frame, since the outcome is known only at the end, puts the
outcome in the file name too, and writes a browser-playable video: H.264 in mp4 with yuv420p pixels
by default, or VP9 in WebM. Text uses PIL's built-in default font: no font files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wm.media import video_writer

SUCCESS_RGB = (20, 140, 60)  # banner colours: green for success, red for failure
FAILURE_RGB = (190, 30, 30)
_CAPTION_BG = (32, 32, 32)
_TEXT_RGB = (255, 255, 255)
_GAP = 2  # px of caption background between panels

# codec name -> (ffmpeg encoder, file suffix, extra ffmpeg output options)
_CODECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "h264": ("libx264", ".mp4", ("-movflags", "+faststart")),  # moov atom first: plays before fully read
    "vp9": ("libvpx-vp9", ".webm", ("-crf", "32", "-b:v", "0", "-row-mt", "1")),
}
MIME = {".mp4": "video/mp4", ".webm": "video/webm"}


@dataclass(frozen=True)
class VideoConfig:
    min_height: int = 256  # panels are upscaled (nearest-neighbour, integer factor) to at least this
    caption_height: int = 16  # px of caption strip above each panel
    banner_height: int = 24  # px of success/failure banner above the panels
    codec: str = "h264"  # "h264" (mp4) or "vp9" (webm)
    quality: float = 8.0  # imageio's scale for H.264, 1 (worst) to 10 (best, still lossy: yuv420p)

    def __post_init__(self) -> None:
        if self.min_height < 1:
            raise ValueError(f"min_height must be >= 1, got {self.min_height}")
        if self.caption_height < 8 or self.banner_height < 8:
            raise ValueError("caption_height and banner_height must be >= 8 px to hold text")
        if self.codec not in _CODECS:
            raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {self.codec!r}")
        if not 1 <= self.quality <= 10:
            raise ValueError(f"quality must be in [1, 10], got {self.quality}")

    @property
    def suffix(self) -> str:
        return _CODECS[self.codec][1]


DEFAULT = VideoConfig()


def compose_frame(
    real: np.ndarray,
    prediction: np.ndarray | None = None,
    goal: np.ndarray | None = None,
    *,
    prediction_label: str = "prediction",
    cfg: VideoConfig = DEFAULT,
) -> np.ndarray:
    """Panels side by side, each (H_i, W_i, 3) uint8, captioned "camera", `prediction_label`, "goal";
    a None panel is left out. Returns (caption_height + H, W, 3) uint8 with H >= cfg.min_height."""
    panels = [(real, "camera"), (prediction, prediction_label), (goal, "goal")]
    panels = [(_check_rgb(img, label), label) for img, label in panels if img is not None]
    tallest = max(img.shape[0] for img, _ in panels)
    height = tallest * max(1, math.ceil(cfg.min_height / tallest))  # integer factor for the tallest
    columns = []
    for img, label in panels:
        body = _resize_height(img, height)  # (height, W_i, 3)
        caption = _text_strip(label, body.shape[1], cfg.caption_height, _CAPTION_BG)
        columns.append(np.concatenate([caption, body], axis=0))
    gap = np.empty((cfg.caption_height + height, _GAP, 3), np.uint8)
    gap[:] = _CAPTION_BG
    parts = [columns[0]]
    for col in columns[1:]:
        parts += [gap, col]
    return np.concatenate(parts, axis=1)


def upscale(img: np.ndarray, min_height: int) -> np.ndarray:
    """(H, W, C) -> (k H, k W, C) by pixel repetition; k is the smallest integer >= 1 reaching min_height."""
    k = max(1, math.ceil(min_height / img.shape[0]))
    return img if k == 1 else np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def add_banner(
    frame: np.ndarray, success: bool, seed: int | None = None, cfg: VideoConfig = DEFAULT
) -> np.ndarray:
    """(H, W, 3) uint8 -> (banner_height + H, W, 3): a green "SUCCESS" or red "FAILURE" strip on top."""
    text = "SUCCESS" if success else "FAILURE"
    if seed is not None:
        text += f"   seed {seed}"
    strip = _text_strip(text, frame.shape[1], cfg.banner_height, SUCCESS_RGB if success else FAILURE_RGB)
    return np.concatenate([strip, frame], axis=0)


def episode_video_path(path: Path, success: bool, cfg: VideoConfig = DEFAULT) -> Path:
    """`videos/episode_0003.mp4` -> `videos/episode_0003_success.mp4` (suffix from the codec)."""
    return path.with_name(f"{path.stem}_{'success' if success else 'failure'}{cfg.suffix}")


def write_episode_video(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: float,
    success: bool,
    *,
    seed: int | None = None,
    cfg: VideoConfig = DEFAULT,
) -> Path:
    """Write frames (H, W, 3) uint8, all one size (e.g. from `compose_frame`; smaller ones are upscaled
    to cfg.min_height), under a success/failure banner. Frames are consumed one at a time, so a
    generator keeps memory flat. Returns the written path, `episode_video_path(path, success, cfg)`;
    the file appears only once complete."""
    out = episode_video_path(Path(path), success, cfg)
    encoder, _, options = _CODECS[cfg.codec]
    quality = cfg.quality if cfg.codec == "h264" else None
    with video_writer(out, fps, codec=encoder, quality=quality, output_params=options) as writer:
        size, count = None, 0
        for frame in frames:
            img = _even(add_banner(upscale(_check_rgb(frame, "frame"), cfg.min_height), success, seed, cfg))
            if size is None:
                size = img.shape
            elif img.shape != size:
                raise ValueError(f"frame {count} has shape {img.shape} after the banner, the first {size}")
            writer.append_data(img)
            count += 1
        if count == 0:
            raise ValueError("no frames to write")
    return out


def _check_rgb(img: np.ndarray, label: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{label} must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    return img


def _resize_height(img: np.ndarray, height: int) -> np.ndarray:
    """(H, W, 3) -> (height, round(W height / H), 3), nearest-neighbour."""
    h, w = img.shape[:2]
    if h == height:
        return img
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.NEAREST))


def _even(img: np.ndarray) -> np.ndarray:
    """Pad the bottom and right by one row/column of black where odd: H.264 4:2:0 needs even sides."""
    h, w = img.shape[:2]
    return np.pad(img, ((0, h % 2), (0, w % 2), (0, 0))) if (h % 2 or w % 2) else img


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # embedded in Pillow; nothing read from disk or the net


def _text_strip(text: str, width: int, height: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """(height, width, 3) uint8 strip of colour `rgb` with `text` in white, left-aligned."""
    strip = Image.new("RGB", (width, height), rgb)
    draw = ImageDraw.Draw(strip)
    font = _font(max(8, height - 6))
    top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
    draw.text((4, (height - (bottom + top)) // 2), text, fill=_TEXT_RGB, font=font)
    return np.asarray(strip)
