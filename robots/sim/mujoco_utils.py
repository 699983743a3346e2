"""What every pure-MuJoCo task shares: an offscreen renderer at any size and the full physics state."""

from __future__ import annotations

import numpy as np

import robots.sim.base  # noqa: F401  (sets MUJOCO_GL=egl before mujoco loads)

import mujoco  # isort: skip

_INTEGRATION = mujoco.mjtState.mjSTATE_INTEGRATION


def make_renderer(model: mujoco.MjModel, image_size: tuple[int, int]) -> mujoco.Renderer:
    """A renderer of (height, width), growing the model's offscreen buffer when the size needs it."""
    h, w = image_size
    model.vis.global_.offwidth = max(w, model.vis.global_.offwidth)
    model.vis.global_.offheight = max(h, model.vis.global_.offheight)
    return mujoco.Renderer(model, h, w)


def get_physics(model: mujoco.MjModel, data: mujoco.MjData) -> np.ndarray:
    """Full integration state (time, qpos, qvel, act, warm start, ctrl): set then step reproduces exactly."""
    physics = np.empty(mujoco.mj_stateSize(model, _INTEGRATION))
    mujoco.mj_getState(model, data, physics, _INTEGRATION)
    return physics


def set_physics(model: mujoco.MjModel, data: mujoco.MjData, physics: np.ndarray) -> None:
    mujoco.mj_setState(model, data, physics, _INTEGRATION)
    mujoco.mj_forward(model, data)
