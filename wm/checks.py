"""Checks on a model's inference inputs, shared by every model: one line naming the input.

Training reads the store's arrays, which the store's schema already holds finite and in range; these
run where a robot's or a user's values come in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_finite(x: Tensor, what: str) -> None:
    """Refuse (ValueError) NaN or inf in `x` (`what` names it: "'state'", "the actions"): a model fed
    one gives NaN outputs, or a plan from nothing, without an error of its own."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"NaN or inf values in {what}: a faulty sensor reading or a damaged input?")


def check_unit_frames(frames: Tensor, key: str) -> None:
    """Float camera frames hold [0, 1] (a hair of rounding either side allowed): 0..255 frames converted
    with .float() and not divided were encoded as another picture, with no error. One line naming `key`;
    NaN and inf are left to the caller's `check_finite` (an inf was told to "divide by 255"); an empty
    batch has no values to check."""
    if frames.numel() == 0:  # (torch: "cannot compute aminmax over an empty dimension")
        return
    lo, hi = (float(v) for v in torch.aminmax(frames.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # (a NaN or inf reaches min or max: no second pass)
        return
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{key!r} frames hold values in [{lo:.4g}, {hi:.4g}]: expected float frames in [0, 1] "
            "(divide 0..255 frames by 255)"
        )
