"""Image frames as this project reads them: 0..255, whatever their stored dtype.

Stores written here (and converted from LeRobot or robomimic) hold images as uint8. Diffusion
Policy's own stores may hold them as float32 in 0..255 (its PushT `img`); those read the same after
`to_uint8`. A float image key holding values in [0, 1] would read almost black, so `check_scale`
refuses it by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wm.data.errors import SchemaError

SAMPLED_FRAMES = 8  # frames `check_scale` looks at, evenly spaced over the store


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, C) frames as uint8 0..255 (a copy only when they are not uint8 already)."""
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.rint(frames.astype(np.float32, copy=False)), 0, 255).astype(np.uint8)


def check_scale(path: Path, key: str, sample: np.ndarray) -> None:
    """Refuse a float image key whose `sample` of frames lies within [0, 1] (SchemaError, one line)."""
    if not np.issubdtype(sample.dtype, np.floating) or not sample.size:
        return
    top = float(np.nanmax(sample))
    if 0 < top <= 1.0:
        raise SchemaError(
            f"{path}: image key {key!r} holds float values in [0, 1] (max {top:.3g} over {len(sample)} "
            "sampled frames); images are read as 0..255: store them as uint8, e.g. "
            "(x * 255).round().astype('uint8')"
        )
