"""Image frames as this project reads them: 0..255, whatever their stored dtype.

Stores written here (and converted from LeRobot or robomimic) hold images as uint8. Diffusion
Policy's own stores may hold them as float32 in 0..255 (its PushT `img`); those read the same after
`to_uint8`. A float image key holding values in [0, 1] (or a hair above 1, as a resize leaves them)
would read almost black, so `check_scale` refuses it by name; `check_values` refuses frames `to_uint8`
would change silently: values outside 0..255 (a 12-bit camera stored as uint16, clipped to white) and
non-finite floats (NaN read as 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wm.data.errors import SchemaError
from wm.data.layout import rewrite_command

SAMPLED_FRAMES = 8  # frames `check_scale` looks at, evenly spaced over the store
CHECK_BLOCK = 256  # frames `check_values` looks at at once (bounds its temporary arrays)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, C) frames as uint8 0..255 (a copy only when they are not uint8 already); values
    outside 0..255 are clipped: `check_values` refuses frames where that would matter."""
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.rint(frames.astype(np.float32, copy=False)), 0, 255).astype(np.uint8)


def check_values(
    path: Path,
    key: str,
    frames: np.ndarray,
    steps: np.ndarray | None = None,
    episode_ends: np.ndarray | None = None,
) -> None:
    """Refuse (SchemaError, one line) frames of image key `key` that `to_uint8` would change silently:
    non-finite float values (read as 0) or values outside 0..255 (clipped; floats are rounded first).
    `steps`, the frames' global steps, and the store's `episode_ends` name the first bad frame's episode
    and step. uint8 frames pass without a look; others are looked at CHECK_BLOCK frames at a time."""
    if frames.dtype == np.uint8 or not frames.size:
        return
    floating = np.issubdtype(frames.dtype, np.floating)
    for lo in range(0, len(frames), CHECK_BLOCK):
        flat = frames[lo : lo + CHECK_BLOCK].reshape(min(CHECK_BLOCK, len(frames) - lo), -1)
        finite = np.ones(len(flat), dtype=bool)
        if floating:
            ok = np.isfinite(flat)
            finite = ok.all(axis=1)
            if not finite.all():
                flat = np.where(ok, flat, 0)  # the range of the finite values
        low, high = flat.min(axis=1), flat.max(axis=1)
        in_range = (low >= -0.5) & (high < 255.5) if floating else (low >= 0) & (high <= 255)
        bad = np.flatnonzero(~(finite & in_range))
        if len(bad):
            first = int(bad[0])
            at = _where(lo + first, steps, episode_ends)
            what = f"{path}: image key {key!r} ({frames.dtype})"
            if not finite[first]:
                ep = _episode(lo + first, steps, episode_ends)
                drop = "" if ep is None else f" ({rewrite_command(path, [ep])})"
                raise SchemaError(
                    f"{what} holds non-finite values (NaN or inf){at}; they would train as black "
                    f"pixels: repair or drop that episode{drop}"
                )
            raise SchemaError(
                f"{what} holds values in {float(low[first]):.6g}..{float(high[first]):.6g}{at}; images are "
                "read as 0..255 and these would be clipped: store them as uint8 scaled to 0..255, e.g. "
                "(x * 255 / x.max()).round().astype('uint8')"
            )


def _episode(row: int, steps: np.ndarray | None, episode_ends: np.ndarray | None) -> int | None:
    """The episode of frame `row`, None when it is not known."""
    if steps is None or episode_ends is None:
        return None
    return int(np.searchsorted(episode_ends, int(steps[row]), side="right"))


def _where(row: int, steps: np.ndarray | None, episode_ends: np.ndarray | None) -> str:
    """' in episode E, step S' (or ' at step S') of frame `row`, '' when its step is not known."""
    if steps is None:
        return ""
    step = int(steps[row])
    ep = _episode(row, steps, episode_ends)
    if ep is None:
        return f" at step {step}"
    return f" in episode {ep}, step {step - (int(episode_ends[ep - 1]) if ep else 0)}"


def check_scale(
    path: Path,
    key: str,
    sample: np.ndarray,
    steps: np.ndarray | None = None,
    episode_ends: np.ndarray | None = None,
) -> None:
    """`check_values`, and refuse a float image key whose `sample` of frames lies below 2 (SchemaError,
    one line): frames in [0, 1], a bicubic resize's overshoot included; 0..255 frames that dark are black."""
    check_values(path, key, sample, steps, episode_ends)
    if not np.issubdtype(sample.dtype, np.floating) or not sample.size:
        return
    top = float(np.max(sample))
    if 0 < top < 2.0:  # 1.02 after a resize passed, and trained as frames of 0..1 out of 255
        raise SchemaError(
            f"{path}: image key {key!r} holds float values in [0, 1] (max {top:.3g} over {len(sample)} "
            "sampled frames); images are read as 0..255: store them as uint8, e.g. "
            "(x * 255).round().astype('uint8')"
        )
