"""ArmPush: a 3-joint SCARA-like arm pushes a block to a target on a table, in pure MuJoCo.

The arm stands at the origin: three revolute joints about vertical axes (links 0.30, 0.25, 0.08 m)
with position actuators, and a capsule pusher (radius 1.5 cm) hanging from the last link down to
the table, so the end effector (`ee`, the pusher's tip, 2 cm above the table) moves in the
horizontal plane. The block (8 cm square, 4 cm high) slides on the table on two slide joints and a
hinge; Coulomb friction with the table is modelled by joint friction loss. Control runs at 10 Hz.

Action modes (`SimConfig.options["action_mode"]`):
  - "ee_delta" (default): (dx, dy) of the end effector in metres, each in [-0.03, 0.03]; mapped to
    joint targets by damped least squares on the site Jacobian (`mj_jacSite`), with a null-space
    pull towards the home posture; the commanded point is kept inside the reachable workspace.
  - "joint_delta": delta joint targets in radians, each in [-0.1, 0.1]; targets stay in the joint ranges.
`send_action` returns the step as applied: shortened where the workspace or a joint range ends.
Targets are taken relative to the current joint positions, so a blocked arm never winds up.

Observation: `image` (a camera over the table with the target drawn as a green disc, so that a
policy, which is given no goal observation, sees where to push; `show_target=false` hides it) and
`proprio` = joint positions (3) and ee position (3). The block pose is not in `proprio`: that is
what a world model has to see; with `state_only` (no camera) `object` carries it, with the target:
(block x, y, yaw, target x, y). Goal observation: the block at the target with the yaw it started the
episode with, the arm at its home posture. Success: block centre within `success_radius` (2.5 cm) of
the target (orientation ignored). Reset: block centre uniform in x [-0.12, 0.12] m, y [0.28, 0.42] m
with uniform yaw; target in the same box, 0.10 to 0.25 m from the block; the pusher starts near
home.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import mujoco
import numpy as np

from robots.base import Feature
from robots.sim.base import SimConfig, SimTask, TaskEntry, check_radius, parse_options
from robots.sim.mujoco_utils import get_physics, make_renderer, set_physics
from wm.data.schema import ActionSpace

ACTION_MODES = ("ee_delta", "joint_delta")
EE_STEP = 0.03  # m per action, each axis
JOINT_STEP = 0.1  # rad per action, each joint
LINKS = (0.30, 0.25, 0.08)
BLOCK_HALF = 0.04
PUSHER_RADIUS = 0.015
EE_HEIGHT = 0.02
BLOCK_BOX = ((-0.12, 0.28), (0.12, 0.42))  # (low xy, high xy) of block and target centres
MIN_TARGET_DISTANCE, MAX_TARGET_DISTANCE = 0.10, 0.25  # m, from the block's start to the target
REACH = (0.12, 0.60)  # the ee is kept within this ring around the base (m)
WORKSPACE = ((-0.35, 0.10), (0.35, 0.60))  # and inside this box (low xy, high xy)
HOME_EE = np.array([0.0, 0.16])
IK_DAMPING = 0.02
NULL_GAIN = 0.1  # fraction of the home-posture error corrected per step in the null space

ARM_PUSH_XML = f"""
<mujoco model="arm_push">
  <compiler angle="radian"/>
  <option timestep="0.004" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.35 0.35 0.35" specular="0 0 0"/>
  </visual>
  <default>
    <geom contype="0" conaffinity="0" density="300"/>
    <joint armature="0.01"/>
    <position kp="150" ctrllimited="false"/>
  </default>
  <asset>
    <material name="table" rgba="0.78 0.68 0.52 1" specular="0"/>
    <material name="arm" rgba="0.55 0.58 0.62 1" specular="0.1"/>
    <material name="block" rgba="0.85 0.2 0.15 1" specular="0"/>
  </asset>
  <worldbody>
    <light pos="0.3 -0.3 1.5" dir="-0.2 0.2 -1" diffuse="0.4 0.4 0.4" castshadow="false"/>
    <geom type="box" pos="0 0.3 -0.02" size="0.6 0.6 0.02" material="table"/>
    <geom type="cylinder" pos="0 0 0.06" size="0.05 0.06" rgba="0.25 0.25 0.28 1"/>
    <body name="link1" pos="0 0 0.13">
      <joint name="j1" type="hinge" axis="0 0 1" range="-2.9 2.9" damping="6"/>
      <geom type="capsule" fromto="0 0 0 0 {LINKS[0]} 0" size="0.025" material="arm"/>
      <body name="link2" pos="0 {LINKS[0]} 0">
        <joint name="j2" type="hinge" axis="0 0 1" range="-2.9 2.9" damping="3"/>
        <geom type="capsule" fromto="0 0 0.015 0 {LINKS[1]} 0.015" size="0.02" material="arm"/>
        <body name="link3" pos="0 {LINKS[1]} 0.015">
          <joint name="j3" type="hinge" axis="0 0 1" range="-2.9 2.9" damping="1"/>
          <geom type="capsule" fromto="0 0 0.015 0 {LINKS[2]} 0.015" size="0.015" material="arm"/>
          <geom name="pusher" type="capsule" fromto="0 {LINKS[2]} 0.015 0 {LINKS[2]} {EE_HEIGHT - 0.145}"
                size="{PUSHER_RADIUS}" rgba="0.15 0.15 0.18 1" contype="1" conaffinity="1" condim="3"
                friction="0.3 0.005 0.0001"/>
          <site name="ee" pos="0 {LINKS[2]} {EE_HEIGHT - 0.145}" size="0.005"/>
        </body>
      </body>
    </body>
    <body name="block" pos="0 0 {BLOCK_HALF / 2}">
      <joint name="block_x" type="slide" axis="1 0 0" frictionloss="0.4" damping="1"/>
      <joint name="block_y" type="slide" axis="0 1 0" frictionloss="0.4" damping="1"/>
      <joint name="block_yaw" type="hinge" axis="0 0 1" frictionloss="0.01" damping="0.01"/>
      <geom type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF / 2}" mass="0.2" material="block"
            contype="1" conaffinity="1" condim="3" friction="0.3 0.005 0.0001"/>
    </body>
    <body name="target_marker" mocap="true" pos="0 0.35 0.001">
      <geom name="target_marker" type="cylinder" size="0.03 0.001" rgba="0.2 0.65 0.3 1" group="3"/>
    </body>
    <camera name="table" pos="0 -0.102 0.94" xyaxes="1 0 0 0 0.940 0.342" fovy="45"/>
  </worldbody>
  <actuator>
    <position joint="j1"/>
    <position joint="j2"/>
    <position joint="j3"/>
  </actuator>
</mujoco>"""


@dataclass
class ArmPushTask(SimTask):
    """Push the block to the target with a planar 3-joint arm; see the module docstring."""

    name: str = "arm_push"
    control_hz: float = 10.0
    action_mode: str = "ee_delta"
    action_space: ActionSpace = field(default_factory=ActionSpace, init=False)  # set from action_mode
    success_radius: float = 0.025
    show_target: bool = True  # draw the target (a green disc under the block's path) in the image
    frame_skip: int = 25  # 25 x 4 ms = one 10 Hz step
    target: np.ndarray = field(default_factory=lambda: np.zeros(2), init=False)
    target_yaw: float = field(default=0.0, init=False)
    _model: Any = field(default=None, init=False, repr=False)
    _data: Any = field(default=None, init=False, repr=False)
    _renderer: Any = field(default=None, init=False, repr=False)
    _home: np.ndarray = field(default_factory=lambda: np.zeros(3), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {self.action_mode!r}")
        if self.action_mode == "ee_delta":
            self.action_space = ActionSpace(mode="delta", frame="ee", units="m", description="ee (dx, dy)")
        else:
            self.action_space = ActionSpace(
                mode="delta", frame="joint", units="rad", description="joint targets"
            )

    @property
    def teleop_gains(self) -> dict[str, Any]:
        # The arm reaches along world +y from its base at the origin (the camera looks that way too):
        # seen from behind it, a device's forward (+x) is +y and its left (+y) is -x; a full deflection
        # is one whole step (EE_STEP). joint_delta takes a leader arm's joints (a motion device is refused).
        if self.action_mode != "ee_delta":
            return {}
        return {
            "axis_order": (1, 0, 2, 3, 4, 5),
            "axis_sign": (-1, 1, 1, 1, 1, 1),
            "translation_gain": EE_STEP,
        }

    # ------------------------------------------------------------------ features
    @property
    def observation_features(self) -> dict[str, Feature]:
        feats = {}
        if not self.config.state_only:
            feats["image"] = Feature((*self.config.image_size, 3), "uint8", "image")
        names = ("j1", "j2", "j3", "ee_x", "ee_y", "ee_z")
        feats["proprio"] = Feature((6,), "float32", "proprio", units="rad, m", names=names)
        if self.config.state_only:  # no camera: the block and the target it is pushed to
            names = ("block_x", "block_y", "block_yaw", "target_x", "target_y")
            feats["object"] = Feature((5,), "float32", "lowdim", units="m, rad", names=names)
        return feats

    @property
    def action_feature(self) -> Feature:
        if self.action_mode == "ee_delta":
            return Feature((2,), "float32", "action", "m", ("dx", "dy"), (-EE_STEP,) * 2, (EE_STEP,) * 2)
        return Feature(
            (3,), "float32", "action", "rad", ("dj1", "dj2", "dj3"), (-JOINT_STEP,) * 3, (JOINT_STEP,) * 3
        )

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        self._model = mujoco.MjModel.from_xml_string(ARM_PUSH_XML)
        self._data = mujoco.MjData(self._model)
        self._home = self.solve_ik(HOME_EE, np.array([-1.2, 2.2, 0.6]))
        if self.show_target:  # geom group 3 is not rendered; group 0 is
            self._model.geom_group[self._model.geom("target_marker").id] = 0
        if not self.config.state_only:
            self._renderer = make_renderer(self._model, self.config.image_size)
        # config.seed's start until the first reset, as PushT's (the target marker was drawn away from
        # the target that success is measured against)
        self._reset(np.random.default_rng(self.config.seed))

    def _disconnect(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self._renderer = self._model = self._data = None

    # ------------------------------------------------------------------ kinematics (privileged helpers)
    @property
    def joints(self) -> np.ndarray:
        return self._data.qpos[:3].copy()

    @property
    def ee(self) -> np.ndarray:
        """The end effector's (x, y, z) in metres."""
        return self._data.site("ee").xpos.copy()

    @property
    def block_pose(self) -> np.ndarray:
        """Privileged: the block's (x, y, yaw)."""
        return self._data.qpos[3:6].copy()

    def _jacobian(self) -> np.ndarray:
        jacp = np.zeros((3, self._model.nv))
        mujoco.mj_jacSite(self._model, self._data, jacp, None, self._model.site("ee").id)
        return jacp[:2, :3]  # (2, 3): ee (x, y) over the arm joints

    def ee_to_joint_delta(self, dxy: np.ndarray) -> np.ndarray:
        """Damped least-squares joint step for an ee step `dxy` at the current posture, with a
        null-space pull towards the home posture. Assumes kinematics are up to date."""
        jac = self._jacobian()
        pinv = jac.T @ np.linalg.inv(jac @ jac.T + IK_DAMPING**2 * np.eye(2))  # (3, 2)
        null = np.eye(3) - pinv @ jac
        return pinv @ dxy + NULL_GAIN * null @ (self._home - self._data.qpos[:3])

    def solve_ik(self, xy: np.ndarray, q0: np.ndarray, iters: int = 100) -> np.ndarray:
        """Joint positions putting the ee at `xy` (kinematics only; leaves qpos at the solution)."""
        self._data.qpos[:3] = q0
        for _ in range(iters):
            mujoco.mj_kinematics(self._model, self._data)
            mujoco.mj_comPos(self._model, self._data)  # the Jacobian needs cdof
            err = xy - self._data.site("ee").xpos[:2]
            if np.linalg.norm(err) < 1e-6:
                break
            jac = self._jacobian()
            self._data.qpos[:3] += jac.T @ np.linalg.solve(jac @ jac.T + 1e-4 * np.eye(2), err)
        return self._data.qpos[:3].copy()

    def _place(self, q: np.ndarray, block_xy: np.ndarray, block_yaw: float) -> None:
        """Put the arm at rest at `q` (targets too) and the block at rest at the given pose."""
        self._data.qpos[:3] = q
        self._data.qpos[3:5] = block_xy
        self._data.qpos[5] = block_yaw
        self._data.qvel[:] = 0.0
        self._data.ctrl[:] = q
        mujoco.mj_forward(self._model, self._data)

    # ------------------------------------------------------------------ observation and action
    def render(self) -> np.ndarray:
        """The camera image of the current state, uint8 (H, W, 3); needs `state_only=False`."""
        self._renderer.update_scene(self._data, camera="table")
        return self._renderer.render().copy()

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {}
        if self._renderer is not None:
            obs["image"] = self.render()
        obs["proprio"] = np.concatenate([self._data.qpos[:3], self.ee]).astype(np.float32)
        if self.config.state_only:
            obs["object"] = np.concatenate([self.block_pose, self.target]).astype(np.float32)
        return obs

    def _apply(self, action: np.ndarray) -> np.ndarray | None:
        """Step the arm; returns the action as applied when the workspace (ee_delta) or the joint limits
        (joint_delta) cut it short, else None (the action as sent)."""
        q = self._data.qpos[:3].copy()
        applied = None
        if self.action_mode == "ee_delta":
            ee = self._data.site("ee").xpos[:2].copy()
            asked = ee + action.astype(np.float64)
            want = np.clip(asked, *WORKSPACE)
            radius = np.linalg.norm(want)
            want = want * np.clip(radius, *REACH) / max(radius, 1e-9)
            step = want - ee
            if not np.array_equal(want, asked):  # kept inside the workspace: that step, within the limits
                step = np.clip(step, -EE_STEP, EE_STEP)
                applied = step.astype(np.float32)
            dq = self.ee_to_joint_delta(step)
        else:
            dq = action.astype(np.float64)
        low, high = self._model.jnt_range[:3].T
        target = np.clip(q + dq, low, high)
        if self.action_mode == "joint_delta" and not np.array_equal(target, q + dq):
            applied = np.clip(target - q, -JOINT_STEP, JOINT_STEP).astype(np.float32)
        self._data.ctrl[:] = target
        mujoco.mj_step(self._model, self._data, nstep=self.frame_skip)
        mujoco.mj_forward(self._model, self._data)  # positions and Jacobians of the new state
        return applied

    # ------------------------------------------------------------------ episodes
    def _reset(self, rng: np.random.Generator) -> None:
        (x0, y0), (x1, y1) = BLOCK_BOX
        block = rng.uniform((x0, y0), (x1, y1))
        while True:
            target = rng.uniform((x0, y0), (x1, y1))
            if MIN_TARGET_DISTANCE <= np.linalg.norm(target - block) <= MAX_TARGET_DISTANCE:
                break
        self.target, self.target_yaw = target, float(rng.uniform(-np.pi, np.pi))
        start_ee = HOME_EE + rng.uniform((-0.12, -0.03), (0.12, 0.03))
        mujoco.mj_resetData(self._model, self._data)  # (resets mocap_pos to the model's)
        self._data.mocap_pos[0, :2] = target
        q = self.solve_ik(start_ee, self._home)
        self._place(q, block, self.target_yaw)

    def _success(self) -> bool:
        return bool(self.goal_distance() < self.success_radius)

    def goal_distance(self) -> float:
        """Privileged: distance from the block to the target (m)."""
        return float(np.linalg.norm(self._data.qpos[3:5] - self.target))

    def _goal_observation(self) -> dict[str, np.ndarray]:
        saved = self.get_sim_state()
        try:  # (a failed render left the block on the target: the episode then read as a success)
            self._place(self._home, self.target, self.target_yaw)
            return self._observe()
        finally:
            self.set_sim_state(saved)

    # ------------------------------------------------------------------ privileged state
    def get_sim_state(self) -> dict[str, Any]:
        """Full MuJoCo integration state (time, qpos, qvel, act, warm start, ctrl), target and step count."""
        self._require_connected()
        physics = get_physics(self._model, self._data)
        return {
            "physics": physics,
            "target": self.target.copy(),
            "target_yaw": self.target_yaw,
            "steps": self.steps,
        }

    def set_sim_state(self, state: dict[str, Any]) -> None:
        self._require_connected()
        set_physics(self._model, self._data, state["physics"])
        self.target = np.array(state["target"], dtype=np.float64)
        self._data.mocap_pos[0, :2] = self.target
        self.target_yaw = float(state["target_yaw"])
        self.steps = int(state["steps"])


# ---------------------------------------------------------------------------- expert
@dataclass
class ArmPushExpert:
    """Scripted pusher with privileged block pose. Pushing line: from the block centre to the target.
    Approach: orbit the block at `orbit_radius` until the pusher is behind it, then go to the
    pre-push point on the line; push along the line with a lateral correction, slowing near the
    target; re-approach when the pusher drifts off the line. Works in ee space; in joint_delta mode
    the ee step goes through the task's damped least-squares map. `noise_std` (action units) adds
    Gaussian noise before clipping."""

    noise_std: float = 0.0
    speed: float = 0.025  # m per step
    orbit_radius: float = 0.10
    clearance: float = 0.075  # block half-diagonal + pusher radius + margin
    standoff: float = 0.075  # pre-push point distance behind the block centre
    _pushing: bool = field(default=False, repr=False)
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    def reset(self, task: SimTask, rng: np.random.Generator) -> None:
        self._rng, self._pushing = rng, False

    def ee_step(self, ee: np.ndarray, block: np.ndarray, target: np.ndarray) -> np.ndarray:
        """The ee step (m) towards pushing `block` to `target`; all points (x, y)."""
        to_go = target - block
        dist = float(np.linalg.norm(to_go))
        u = to_go / max(dist, 1e-9)
        n = np.array([-u[1], u[0]])
        rel = ee - block
        s, t = float(rel @ u), float(rel @ n)  # along the pushing line, across it
        if self._pushing and (abs(t) > 0.03 or s > -BLOCK_HALF):
            self._pushing = False
        if not self._pushing and s < -BLOCK_HALF - PUSHER_RADIUS and abs(t) < 0.012:
            self._pushing = True
        if self._pushing:
            return u * min(self.speed, 0.7 * dist + 0.004) - 0.8 * t * n
        pre = block - self.standoff * u
        if _segment_distance(block, ee, pre) > self.clearance:
            goal = pre
        else:  # orbit towards the back of the block (angle pi in the (u, n) frame), 60 degrees at a time
            phi = np.arctan2(t, s)
            dphi = np.angle(np.exp(1j * (np.pi - phi)))
            phi = phi + np.clip(dphi, -1.0, 1.0)
            goal = block + self.orbit_radius * (np.cos(phi) * u + np.sin(phi) * n)
        step = goal - ee
        return step * min(1.0, self.speed / max(float(np.linalg.norm(step)), 1e-9))

    def act(self, task: SimTask, obs: dict[str, np.ndarray]) -> np.ndarray:
        assert isinstance(task, ArmPushTask), "ArmPushExpert drives an ArmPushTask"
        dxy = self.ee_step(task.ee[:2], task.block_pose[:2], task.target)
        if task.action_mode == "ee_delta":
            action, limit = dxy, EE_STEP
        else:
            action, limit = task.ee_to_joint_delta(dxy), JOINT_STEP
            action = action * min(1.0, limit / max(float(np.abs(action).max()), 1e-9))
        if self.noise_std > 0:
            action = action + self._rng.normal(0.0, self.noise_std, size=action.shape)
        return np.clip(action, -limit, limit).astype(np.float32)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point `p` to the segment from `a` to `b`."""
    ab = b - a
    h = np.clip((p - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + h * ab)))


@dataclass(frozen=True)
class ArmPushOptions:
    """`SimConfig.options` of arm_push (see the module docstring)."""

    action_mode: Literal["ee_delta", "joint_delta"] = "ee_delta"
    success_radius: float = 0.025  # m
    show_target: bool = True  # draw the target in the image (policies see the goal only there)

    def __post_init__(self) -> None:
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {self.action_mode!r}")
        check_radius(self.success_radius, below=MIN_TARGET_DISTANCE)
        if not isinstance(self.show_target, bool):  # "false" would draw it
            raise ValueError(f"show_target must be true or false, got {self.show_target!r}")


def make(config: SimConfig) -> ArmPushTask:
    opts = parse_options(ArmPushOptions, config.options, "arm_push")
    return ArmPushTask(
        config=config,
        action_mode=opts.action_mode,
        success_radius=float(opts.success_radius),
        show_target=bool(opts.show_target),
    )


ENTRY = TaskEntry(
    make=make,
    expert=ArmPushExpert,
    description=(
        "Planar 3-joint arm pushes a block to a target; options: action_mode ee_delta | joint_delta, "
        "show_target (draw the target)"
    ),
    options=ArmPushOptions,
)
