"""What every pure-MuJoCo task shares: an offscreen renderer at any size and the full physics state."""

from __future__ import annotations

import os

import mujoco
import numpy as np

from robots.base import RobotError

_INTEGRATION = mujoco.mjtState.mjSTATE_INTEGRATION


def make_renderer(model: mujoco.MjModel, image_size: tuple[int, int]) -> mujoco.Renderer:
    """A renderer of (height, width), growing the model's offscreen buffer when the size needs it."""
    h, w = image_size
    model.vis.global_.offwidth = max(w, model.vis.global_.offwidth)
    model.vis.global_.offheight = max(h, model.vis.global_.offheight)
    try:
        return mujoco.Renderer(model, h, w)
    except mujoco.FatalError as e:
        if os.environ.get("MUJOCO_GL"):
            raise
        raise RobotError(
            f"cannot create a MuJoCo renderer ({e}). Without a display, set MUJOCO_GL=egl (or osmesa) "
            "before mujoco is imported; the tools/ apps and the benchmarks do, a script of your own must."
        ) from e


def get_physics(model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
    """Full integration state (time, qpos, qvel, act, warm start, ctrl): set then step reproduces exactly."""
    physics = np.empty(mujoco.mj_stateSize(model, _INTEGRATION))
    mujoco.mj_getState(model, data, physics, _INTEGRATION)
    return physics


def set_physics(model: mujoco.MjModel, data: mujoco.MjData, physics: np.ndarray) -> None:
    mujoco.mj_setState(model, data, physics, _INTEGRATION)
    mujoco.mj_forward(model, data)
