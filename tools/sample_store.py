"""`python -m tools.sample_store out=PATH`: a small real-physics sample store for trying the tools.

A ball on a table (MuJoCo), pushed by smooth random forces, seen from a top camera (rendered
headless with EGL). It stands in for demonstrations until `wm-collect` records real ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from robots.sim.base import MAX_IMAGE_SIZE
from tools._cli import UsageError, app, bind, store_path
from wm.data import ActionSpace, DemoStore, KeySpec, Schema

# mujoco is imported in `record`, not at the top: it picks its GL backend from MUJOCO_GL when first
# imported, and run as a file (`python tools/sample_store.py`) a top-level `import mujoco` ran before
# `tools._cli` brought in `tools/__init__`, which sets EGL: mujoco took GLFW, which needs a display.

BALL_XML = """
<mujoco>
  <option timestep="0.02"/>
  <worldbody>
    <light pos="0 0 3"/>
    <geom type="plane" size="0.5 0.5 0.1" rgba="0.85 0.85 0.8 1"/>
    <geom type="box" pos="0 0.52 0.03" size="0.52 0.02 0.03" rgba="0.3 0.3 0.35 1"/>
    <geom type="box" pos="0 -0.52 0.03" size="0.52 0.02 0.03" rgba="0.3 0.3 0.35 1"/>
    <geom type="box" pos="0.52 0 0.03" size="0.02 0.52 0.03" rgba="0.3 0.3 0.35 1"/>
    <geom type="box" pos="-0.52 0 0.03" size="0.02 0.52 0.03" rgba="0.3 0.3 0.35 1"/>
    <camera name="top" pos="0 0 1.35" xyaxes="1 0 0 0 1 0"/>
    <body name="ball" pos="0 0 0.05">
      <joint name="x" type="slide" axis="1 0 0" damping="1"/>
      <joint name="y" type="slide" axis="0 1 0" damping="1"/>
      <geom type="sphere" size="0.05" rgba="0.9 0.25 0.2 1" mass="0.5"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="x" ctrlrange="-1 1"/>
    <motor joint="y" ctrlrange="-1 1"/>
  </actuator>
</mujoco>
"""


@dataclass(frozen=True)
class SampleConfig:
    out: str
    episodes: int = 8
    steps: int = 50
    image_size: int = 64
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, least in (("episodes", 1), ("steps", 2), ("image_size", 8), ("seed", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.image_size > MAX_IMAGE_SIZE:  # MuJoCo's framebuffer failed with a fatal error
            raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {self.image_size}")
        store_path("out", self.out)
        if Path(self.out).exists() and not self.overwrite:
            raise UsageError(
                f"out={self.out} already exists; choose another path, or overwrite=true to replace a store"
            )


def sample_schema(size: int) -> Schema:
    return Schema(
        keys={
            "top": KeySpec((size, size, 3), "uint8", "image"),
            "state": KeySpec((4,), "float32", "proprio", units="m, m/s", names=("x", "y", "vx", "vy")),
            "action": KeySpec((2,), "float32", "action", units="N", names=("fx", "fy")),
            "timestamp": KeySpec((), "float64", "timestamp", units="s"),
        },
        fps=1 / 0.02,
        action_space=ActionSpace(mode="absolute", frame="planar", units="N", description="force on the ball"),
        robot="ball",
        task="random_push",
    )


def record(cfg: SampleConfig) -> int:
    import mujoco

    from robots.sim.mujoco_utils import make_renderer

    model = mujoco.MjModel.from_xml_string(BALL_XML)
    data = mujoco.MjData(model)
    rng = np.random.default_rng(cfg.seed)
    store = DemoStore.create(cfg.out, sample_schema(cfg.image_size), overwrite=cfg.overwrite)
    try:
        renderer = make_renderer(model, (cfg.image_size, cfg.image_size))  # it grows the framebuffer
    except BaseException:
        store.close()
        raise
    try:
        for _ in range(cfg.episodes):
            mujoco.mj_resetData(model, data)
            data.qpos[:] = rng.uniform(-0.35, 0.35, 2)
            mujoco.mj_forward(model, data)  # positions of bodies and cameras for the first render
            force = rng.uniform(-1, 1, 2)
            with store.begin_episode() as ep:
                for t in range(cfg.steps):
                    force = np.clip(0.8 * force + 0.5 * rng.normal(size=2), -1, 1)  # smooth random pushes
                    renderer.update_scene(data, "top")
                    obs = {"top": renderer.render(), "state": np.concatenate([data.qpos, data.qvel])}
                    ep.add_step({**obs, "action": force, "timestamp": np.float64(t * model.opt.timestep)})
                    data.ctrl[:] = force
                    mujoco.mj_step(model, data)
                ep.end({"success": bool(np.linalg.norm(data.qpos) < 0.2), "notes": "random pushes"})
    except KeyboardInterrupt:  # the episode being written is dropped; the finished ones stay
        print(f"{cfg.out} keeps the {store.n_episodes} episodes finished", file=sys.stderr)
        raise
    finally:
        renderer.close()
        store.close()
    print(f"wrote {cfg.episodes} episodes x {cfg.steps} steps to {cfg.out}")
    return 0


def _main(cfg: DictConfig) -> int:
    return record(bind(SampleConfig, cfg, job_folder=None, job_file="out"))


main = app("sample_store", _main)

if __name__ == "__main__":
    main()
