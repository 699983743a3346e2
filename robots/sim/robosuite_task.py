"""Any robosuite environment behind the SimTask interface: `robosuite/<EnvName>` in the registry.

Options (`config.options`): `robots` (default "Panda"; a list for two-arm envs), `controller` (default
the robot's robosuite default, for Panda an OSC pose controller with delta actions in [-1, 1]; also a
composite name such as "BASIC", a part controller name such as "OSC_POSITION", a .json path or a
config dict), `camera` (a name or list, default "agentview"), `control_freq` (default 20 Hz) and
`env_kwargs` (passed to `robosuite.make`).

Observations: one image per camera, key `<camera>_image`, uint8 (H, W, 3), right side up (robosuite
renders upside down; we flip); `proprio`, the concatenation of every robot's end-effector position,
quaternion (x, y, z, w) and gripper joint positions (names say which is which); `object`, the env's
privileged "object-state" vector where it has one. Images are rendered once per observation with
reflections, multisampling and shadows off (same scene, several times faster: measured by
`benchmarks/expert_success_pusht_robosuite.py`, figures in BENCHMARKS.md).

Goals (`goal_observation()`: the scene at its goal, rendered, with the robot where it is):
Lift, the cube 10 cm above where it is; Stack, cube A resting on cube B; Door, the door open by
0.45 rad (handle turned when latched). Other envs have no goal defined and raise an error.
Scripted experts with privileged object poses exist for Lift, Stack and Door. Limitation: the Door
expert opens the unlatched door only; robosuite's latched door does not unlatch under its lever
press, so the registry's `robosuite/Door` is unlatched by default (`DEFAULT_ENV_KWARGS`).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import Feature, RobotError
from robots.sim.base import SimConfig, SimTask, TaskEntry, parse_options
from wm.data.schema import ActionSpace

PROPRIO_SUFFIXES = ("eef_pos", "eef_quat", "gripper_qpos")
GOAL_ENVS = ("Lift", "Stack", "Door")


def _robosuite() -> Any:
    """Import robosuite quietly (it logs a warning about an optional IK dependency)."""
    logger = logging.getLogger("robosuite_logs")
    if not logger.filters:  # robosuite sets its own level while importing: a filter outlasts that
        logger.addFilter(lambda record: record.levelno >= logging.ERROR)
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        import robosuite
    for name in ("robosuite_logs", "robosuite"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return robosuite


def env_names() -> list[str]:
    return sorted(_robosuite().ALL_ENVIRONMENTS)


def controller_config(controller: Any, robot: str) -> dict:
    """A composite controller config from a name, part-controller name, .json path or dict."""
    rs = _robosuite()
    if isinstance(controller, dict):
        return controller
    if controller is not None and not isinstance(controller, str):  # (a list: a TypeError in `in`)
        raise RobotError(
            "robosuite controller must be a controller name, a .json path or a config dict, got "
            f"{controller!r}"
        )
    if controller is None or str(controller).endswith(".json") or controller in rs.ALL_COMPOSITE_CONTROLLERS:
        return rs.load_composite_controller_config(controller=controller, robot=robot)
    if controller in rs.ALL_PART_CONTROLLERS:
        cfg = rs.load_composite_controller_config(robot=robot)
        part = rs.load_part_controller_config(default_controller=controller)
        for arm, arm_cfg in cfg["body_parts"].items():
            if "gripper" in arm_cfg:
                part = {**part, "gripper": arm_cfg["gripper"]}
            cfg["body_parts"][arm] = dict(part)
        return cfg
    raise RobotError(
        f"unknown robosuite controller {controller!r}; valid: {sorted(rs.ALL_COMPOSITE_CONTROLLERS)}, "
        f"{sorted(rs.ALL_PART_CONTROLLERS)}, a .json path or a config dict"
    )


def _action_space(cfg: dict) -> ActionSpace:
    parts = [p for p in cfg.get("body_parts", {}).values() if isinstance(p, dict) and "type" in p]
    kind = parts[0]["type"] if parts else ""
    mode = "absolute" if parts and parts[0].get("input_type") == "absolute" else "delta"
    frame = "joint" if kind.startswith("JOINT") else "ee" if kind.startswith(("OSC", "IK")) else "other"
    desc = f"robosuite {kind or cfg.get('type', '')} controller input in [-1, 1] (scaled by the controller)"
    return ActionSpace(mode, frame, "normalized", desc)


def _vector_names(key: str, n: int) -> list[str]:
    axes = {"eef_pos": "xyz", "eef_quat": "xyzw"}
    for suffix, letters in axes.items():
        if key.endswith(suffix) and n == len(letters):
            return [f"{key}.{c}" for c in letters]
    return [f"{key}.{i}" for i in range(n)]


# robosuite.make arguments the task sets, and what a user sets instead
OWN_KWARGS = {
    "robots": "use the task option robots=",
    "controller_configs": "use the task option controller=",
    "camera_names": "use the task option camera=",
    "camera_heights": "use image_size=",
    "camera_widths": "use image_size=",
    "control_freq": "use the task option control_freq=",
    "horizon": "use max_steps=",
    "ignore_done": "episodes end at max_steps or success",
    "has_renderer": "images are rendered offscreen",
    "has_offscreen_renderer": "use state_only= to render no images",
    "use_camera_obs": "cameras are rendered by the task",
    "hard_reset": "the task resets robosuite without a hard reset",
}


def _names(value: Any) -> list[str]:
    """A name or a list of names as a list; [] when it is neither (or an empty list)."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else []
    return names if names and all(isinstance(n, str) and n for n in names) else []


DEFAULT_CAMERA = "agentview"
SIMULATION_HZ = 500  # robosuite.macros.SIMULATION_TIMESTEP = 0.002 s; each action runs whole steps of it


@dataclass(frozen=True)
class RobosuiteOptions:
    """`SimConfig.options` of `robosuite/<EnvName>` (see the module docstring)."""

    robots: str | list[str] = "Panda"  # a list for two-arm envs
    controller: str | dict[str, Any] | None = None  # None: the robot's robosuite default
    camera: str | list[str] = DEFAULT_CAMERA
    cameras: str | list[str] | None = None  # the same as camera (either spelling)
    control_freq: float = 20.0  # Hz
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to robosuite.make

    def __post_init__(self) -> None:
        check_control_freq(self.control_freq, "control_freq")
        for what, value in (("camera", self.camera), ("cameras", self.cameras)):
            if value is not None and not _names(value):
                raise RobotError(
                    f"robosuite {what} must be a camera name or a non-empty list of them, got {value!r}"
                )
        if self.cameras is not None and self.camera != DEFAULT_CAMERA:  # one of them would be ignored
            raise RobotError(
                f"robosuite camera={self.camera!r} and cameras={self.cameras!r}: give one of them "
                "(the same option)"
            )
        if not _names(self.robots):
            raise RobotError(
                f"robosuite robots must be a robot name or a non-empty list of them, got {self.robots!r}"
            )
        if not isinstance(self.env_kwargs, Mapping):  # None or a list was a TypeError from the check below
            raise RobotError(
                f"robosuite env_kwargs must be a mapping of robosuite.make arguments, got {self.env_kwargs!r}"
            )
        taken = {k: OWN_KWARGS[k] for k in self.env_kwargs if k in OWN_KWARGS}
        if taken:
            k, use = next(iter(taken.items()))
            raise RobotError(f"env_kwargs.{k} is set by the task itself: {use}")
        names = [self.robots] if isinstance(self.robots, str) else list(self.robots)
        known = list(_robosuite().ALL_ROBOTS)
        for name in names:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise RobotError(f"unknown robosuite robot {name!r}{hint} (valid: {', '.join(known)})")


def check_control_freq(freq: Any, option: str) -> None:
    """Refuse (RobotError, one line naming `option`) a rate robosuite cannot run: it steps its simulation
    int(SIMULATION_HZ / freq) times per action, so 30 Hz ran 0.032 s steps and 1000 Hz none at all (the
    world stood still while the run looked normal)."""
    if (
        isinstance(freq, bool)
        or not isinstance(freq, int | float | np.integer | np.floating)
        or not 0 < freq < float("inf")
    ):
        raise RobotError(f"robosuite {option} must be a number > 0 Hz, got {freq!r}")
    steps = SIMULATION_HZ / freq
    if steps < 1 or abs(steps - round(steps)) > 1e-9:
        raise RobotError(
            f"robosuite {option}={freq!r}: robosuite steps its {SIMULATION_HZ} Hz simulation a whole "
            f"number of times per action (it would run {int(steps + 1e-9) / SIMULATION_HZ:g} s, not "
            f"{1 / freq:.4g} s); choose a divisor of {SIMULATION_HZ}, e.g. 10, 20, 25 or 50"
        )


@dataclass
class RobosuiteTask(SimTask):
    """A robosuite env (see the module docstring). The env is built on first use of the features."""

    env_name: str = "Lift"
    name: str = "robosuite"
    control_hz: float = 20.0
    _env: Any = field(default=None, init=False, repr=False)
    _meta: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        opts = parse_options(RobosuiteOptions, self.config.options, f"robosuite/{self.env_name}")
        self.name = f"robosuite/{self.env_name}"
        self.robots = opts.robots
        first = self.robots if isinstance(self.robots, str) else self.robots[0]
        self.controller_cfg = controller_config(opts.controller, first)
        cams = opts.camera if opts.cameras is None else opts.cameras
        self.cameras = [cams] if isinstance(cams, str) else list(cams)
        self.control_hz = float(opts.control_freq)
        self.env_kwargs = {**DEFAULT_ENV_KWARGS.get(self.env_name, {}), **opts.env_kwargs}
        self.action_space = _action_space(self.controller_cfg)

    def __setattr__(self, name: str, value: Any) -> None:
        """A rate set after construction (`wm-deploy control_hz=`) is checked as the option is, and an env
        already built at another rate is rebuilt at this one on next use."""
        if name == "control_hz":
            check_control_freq(value, "control_hz")
            if getattr(self, "_connected", False) and value != self.control_hz:  # (the episode's env is
                raise RobotError(  # rebuilt: its state gone, the next observation failed)
                    f"{self.name}: control_hz cannot change while connected (its env is rebuilt at the new "
                    "rate); set it before connect(), or disconnect() first"
                )
            if getattr(self, "_env", None) is not None and value != self.control_hz:
                self._env.close()
                object.__setattr__(self, "_env", None)
        super().__setattr__(name, value)

    def step_seconds(self) -> float:
        """robosuite's control period: its env is built with `control_freq=control_hz`."""
        return float(self._env.control_timestep) if self._env is not None else 1.0 / self.control_hz

    # ------------------------------------------------------------------ the env
    @property
    def env(self) -> Any:
        """The robosuite env (built on first access; features need it for the robot's dimensions)."""
        if self._env is None:
            self._build()
        return self._env

    def _make(self, rs: Any, render: bool, h: int, w: int) -> Any:
        return rs.make(
            self.env_name,
            robots=self.robots,
            controller_configs=self.controller_cfg,
            has_renderer=False,
            has_offscreen_renderer=render,
            use_camera_obs=False,
            camera_names=self.cameras,
            camera_heights=h,
            camera_widths=w,
            control_freq=self.control_hz,
            ignore_done=True,
            hard_reset=False,
            horizon=10**9,
            **self.env_kwargs,
        )

    def _build(self) -> None:
        rs = _robosuite()
        render = not self.config.state_only
        h, w = self.config.image_size
        saved = np.random.get_state()  # robosuite.make resets the env from NumPy's global generator
        try:
            env = self._make(rs, render, h, w)
        except (TypeError, ValueError, KeyError, AssertionError, rs.utils.errors.SimulationError) as e:
            raise RobotError(
                f"{self.name}: robosuite.make refused the options: {type(e).__name__}: {e}"
            ) from e
        finally:
            np.random.set_state(saved)
        missing = [cam for cam in self.cameras if cam not in env.sim.model.camera_names] if render else []
        if missing:  # refused once and for all: the env is closed, not kept half-checked for the next use
            valid = env.sim.model.camera_names
            env.close()
            raise RobotError(f"{self.name}: no camera {missing[0]!r}; valid: {', '.join(valid)}")
        self._env = env
        if render:
            fast_rendering(self._env.sim)
        obs = self._env._get_observations(force_update=True)
        keys = [k for k in obs if k.startswith("robot") and k.endswith(PROPRIO_SUFFIXES)]
        names = [n for k in keys for n in _vector_names(k, np.size(obs[k]))]
        low, high = self._env.action_spec
        self._meta = {
            "proprio_keys": keys,
            "proprio_names": tuple(names),
            "object_dim": int(np.size(obs["object-state"])) if "object-state" in obs else 0,
            "low": tuple(float(x) for x in low),
            "high": tuple(float(x) for x in high),
        }

    # ------------------------------------------------------------------ features
    @property
    def observation_features(self) -> dict[str, Feature]:
        self.env  # noqa: B018  (dimensions come from the built env)
        feats = {}
        if not self.config.state_only:
            for cam in self.cameras:
                feats[f"{cam}_image"] = Feature((*self.config.image_size, 3), "uint8", "image")
        names = self._meta["proprio_names"]
        feats["proprio"] = Feature((len(names),), "float32", "proprio", units="m, quat, m", names=names)
        if self._meta["object_dim"]:
            feats["object"] = Feature((self._meta["object_dim"],), "float32", "lowdim", units="m, quat")
        return feats

    @property
    def action_feature(self) -> Feature:
        self.env  # noqa: B018
        low, high = self._meta["low"], self._meta["high"]
        names = tuple(f"a{i}" for i in range(len(low)))
        if len(low) == 7 and self.action_space.frame == "ee":
            names = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")
        return Feature((len(low),), "float32", "action", units="normalized", names=names, low=low, high=high)

    # ------------------------------------------------------------------ connection and episode
    def _connect(self) -> None:
        self.env  # noqa: B018

    def _disconnect(self) -> None:
        self._env.close()
        self._env = None

    def _reset(self, rng: np.random.Generator) -> None:
        """Reset robosuite, which samples object placements from NumPy's *global* generator: that one is
        seeded from `rng` for the reset and then restored, so callers' global state is untouched."""
        saved = np.random.get_state()
        np.random.seed(int(rng.integers(2**31)))
        try:
            self.env.reset()
        finally:
            np.random.set_state(saved)

    def _observe(self) -> dict[str, np.ndarray]:
        env, out = self._env, {}
        if not self.config.state_only:
            h, w = self.config.image_size
            for cam in self.cameras:
                out[f"{cam}_image"] = np.ascontiguousarray(env.sim.render(w, h, camera_name=cam)[::-1])
        obs = env._get_observations(force_update=True)
        proprio = [np.ravel(obs[k]) for k in self._meta["proprio_keys"]]
        out["proprio"] = np.concatenate(proprio).astype(np.float32)
        if self._meta["object_dim"]:
            out["object"] = np.asarray(obs["object-state"], dtype=np.float32)
        return out

    def _apply(self, action: np.ndarray) -> None:
        self._env.step(action.astype(np.float64))
        self._env.sim.forward()  # kinematics of the new state (robosuite leaves those of the last substep)

    def _success(self) -> bool:
        return bool(self._env._check_success())

    # ------------------------------------------------------------------ privileged state
    def get_sim_state(self) -> np.ndarray:
        """The episode's step count, robosuite's step counter, the grippers' speed-limited commands,
        MuJoCo's full integration state (time, qpos, qvel, warm start, controls, mocap, ...) and the body
        placements in the model (Door moves its door there), as one float64 vector."""
        self._require_connected()
        import mujoco

        m, d = self._env.sim.model._model, self._env.sim.data._data
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        phys = np.empty(mujoco.mj_stateSize(m, spec))
        mujoco.mj_getState(m, d, phys, spec)
        grips = [np.ravel(g.current_action) for g in self._grippers()]
        counters = [self.steps, self._env.timestep, *(len(g) for g in grips)]  # (a Panda gripper's command
        # is (1,) after a reset and (2,) after a step: a state saved at one did not restore at the other)
        return np.concatenate([counters, *grips, phys, m.body_pos.ravel(), m.body_quat.ravel()])

    def _grippers(self) -> list:
        return [g for r in self._env.robots for g in r.gripper.values() if hasattr(g, "current_action")]

    def set_sim_state(self, state: np.ndarray) -> None:
        self._require_connected()
        import mujoco

        m, d = self._env.sim.model._model, self._env.sim.data._data
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        grips = self._grippers()
        n, nb = mujoco.mj_stateSize(m, spec), m.nbody
        state = np.asarray(state, dtype=np.float64).ravel()
        sizes = state[2 : 2 + len(grips)]  # each gripper's command's length, as saved
        if len(sizes) < len(grips) or not np.all((sizes >= 0) & (sizes == np.round(sizes))):
            raise RobotError(f"{self.name}: a sim state of {state.size} values is not one of this task's")
        expected = 2 + len(grips) + int(sizes.sum()) + n + 7 * nb
        if state.size != expected:
            raise RobotError(f"{self.name}: sim state of {state.size} values, expected {expected}")
        self.steps, self._env.timestep = int(state[0]), int(state[1])
        i = 2 + len(grips)
        for g, k in zip(grips, sizes.astype(int), strict=True):
            g.current_action = state[i : i + k].copy()
            i += k
        mujoco.mj_setState(m, d, state[i : i + n], spec)
        m.body_pos[:] = state[i + n : i + n + 3 * nb].reshape(nb, 3)
        m.body_quat[:] = state[i + n + 3 * nb :].reshape(nb, 4)
        self._env.sim.forward()

    def _goal_observation(self) -> dict[str, np.ndarray]:
        if self.env_name not in GOAL_ENVS:
            raise RobotError(
                f"{self.name}: no goal observation is defined for robosuite env {self.env_name!r} "
                f"(defined for {', '.join(GOAL_ENVS)})"
            )
        state = self.get_sim_state()
        try:
            _pose_goal(self._env, self.env_name)
            self._env.sim.forward()
            return self._observe()
        finally:
            self.set_sim_state(state)


def fast_rendering(sim: Any) -> None:
    """Reflections, multisampling and shadows off: the same scene at about a quarter of the cost."""
    import mujoco

    model = sim.model._model
    model.mat_reflectance[:] = 0.0
    model.vis.quality.offsamples = 0
    ctx = sim._render_context_offscreen
    ctx.gl_ctx.make_current()
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()  # rebuilds the framebuffers without multisampling
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def _set_free_pos(env: Any, joint: str, pos: np.ndarray) -> None:
    start, _ = env.sim.model.get_joint_qpos_addr(joint)
    env.sim.data.qpos[start : start + 3] = pos
    start_v, _ = env.sim.model.get_joint_qvel_addr(joint)
    env.sim.data.qvel[start_v : start_v + 6] = 0.0


def _pose_goal(env: Any, env_name: str) -> None:
    """Put the scene of `env_name` at its goal (see the module docstring)."""
    if env_name == "Lift":
        pos = np.array(env.sim.data.body_xpos[env.cube_body_id]) + [0.0, 0.0, 0.10]
        _set_free_pos(env, env.cube.joints[0], pos)
    elif env_name == "Stack":
        top = np.array(env.sim.data.body_xpos[env.cubeB_body_id])
        top[2] += env.cubeB.size[2] + env.cubeA.size[2] - 0.0005  # touching: Stack's success needs contact
        _set_free_pos(env, env.cubeA.joints[0], top)
        start, _ = env.sim.model.get_joint_qpos_addr(env.cubeA.joints[0])
        b_start, _ = env.sim.model.get_joint_qpos_addr(env.cubeB.joints[0])
        env.sim.data.qpos[start + 3 : start + 7] = env.sim.data.qpos[b_start + 3 : b_start + 7]
    elif env_name == "Door":
        env.sim.data.qpos[env.hinge_qpos_addr] = 0.45
        if env.use_latch:
            env.sim.data.qpos[env.handle_qpos_addr] = 0.5 * np.pi / 2


# Registry defaults per env, overridable through `env_kwargs`. Door: the scripted expert cannot open
# robosuite's latched door (0/10; the gripper slips off the handle when turning it far enough), so
# `robosuite/Door` is the unlatched variant; `task_options.env_kwargs.use_latch=true` restores the latch.
DEFAULT_ENV_KWARGS: dict[str, dict[str, Any]] = {"Door": {"use_latch": False}}


def robosuite_entry(env_name: str) -> TaskEntry:
    """The registry entry of robosuite env `env_name`; an unknown name lists robosuite's envs."""
    valid = env_names()
    if env_name not in valid:  # a typo (robosuite/Lfit, robosuite/lift) names the nearest env
        by_case = {v.lower(): v for v in valid}
        near = by_case.get(env_name.lower()) or next(iter(difflib.get_close_matches(env_name, valid)), None)
        hint = f"; did you mean robosuite/{near}?" if near else ""
        raise RobotError(f"unknown robosuite environment {env_name!r}; valid: {', '.join(valid)}{hint}")

    def make(config: SimConfig) -> RobosuiteTask:
        return RobosuiteTask(config=config, env_name=env_name)

    def expert(**kwargs: Any) -> ScriptedExpert:
        if env_name not in EXPERTS:
            have = ", ".join(EXPERTS)
            raise RobotError(f"no scripted expert for robosuite/{env_name}; there are for {have}")
        return ScriptedExpert(env_name=env_name, **kwargs)

    return TaskEntry(make=make, expert=expert, description=f"robosuite {env_name}", options=RobosuiteOptions)


# ---------------------------------------------------------------------- scripted experts
def _quat_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _rotvec(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector of rotation matrix `r`."""
    angle = np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def _yaw(r: np.ndarray) -> float:
    """The heading of rotation matrix `r`'s x axis in the horizontal plane (radians)."""
    return float(np.arctan2(r[1, 0], r[0, 0]))


ALIGN_STEPS = 10  # steps above a cube a scripted expert waits for its turn to settle before going down
MAX_REGRASPS = 3  # a scripted expert's fresh picks after a missed or lost grasp, per episode


@dataclass
class ScriptedExpert:
    """Waypoint scripts on privileged object poses for Lift, Stack and Door (Panda, OSC pose deltas).

    Each `act` reads the end effector and the objects from the simulator, advances a small phase
    machine, and returns a delta action that moves the gripper towards the phase's target while
    holding its orientation: the initial one, turned about the vertical before a pick so that the
    fingers close square to the cube's faces and away from a neighbouring cube. A cube that leaves
    the gripper while carried (a missed or slipped grasp) is picked again, up to `MAX_REGRASPS` times.
    `noise_std`: Gaussian action noise as a fraction of the action half-range (1).
    """

    env_name: str = "Lift"
    noise_std: float = 0.0
    gain: float = 12.0  # action per metre of error (an action of 1 moves the OSC goal by 5 cm)
    _phase: int = field(default=0, init=False)
    _count: int = field(default=0, init=False)
    _rot0: Any = field(default=None, init=False, repr=False)
    _rot_err: float = field(default=0.0, init=False, repr=False)
    _rng: np.random.Generator = field(default_factory=np.random.default_rng, init=False, repr=False)
    _mem: dict = field(default_factory=dict, init=False, repr=False)

    def reset(self, task: SimTask, rng: np.random.Generator) -> None:
        self._phase, self._count, self._rot0, self._rng, self._mem = 0, 0, None, rng, {}

    def act(self, task: SimTask, obs: dict[str, np.ndarray]) -> np.ndarray:
        env = task.env
        eef = np.array(env.sim.data.site_xpos[env.robots[0].eef_site_id["right"]])
        rot = np.array(env.sim.data.site_xmat[env.robots[0].eef_site_id["right"]]).reshape(3, 3)
        if self._rot0 is None:
            self._rot0 = rot
        target, grip = getattr(self, f"_{self.env_name.lower()}")(env, eef)
        action = np.zeros(7)
        action[:3] = np.clip((target - eef) * self.gain, -1, 1)
        rot_err = _rotvec(self._mem.get("rot", self._rot0) @ rot.T)
        self._rot_err = float(np.linalg.norm(rot_err))
        action[3:6] = np.clip(rot_err, -0.5, 0.5)
        action[6] = grip
        if self.noise_std > 0:
            action = action + self._rng.normal(0.0, self.noise_std, 7)
        return np.clip(action, -1, 1).astype(np.float32)

    def _step(self, done: bool, hold: int = 0) -> None:
        """Advance to the next phase once `done` has held for `hold` more steps."""
        self._count = self._count + 1 if done else 0
        if done and self._count > hold:
            self._phase, self._count = self._phase + 1, 0

    def _pick(
        self, eef: np.ndarray, obj: np.ndarray, obj_rot: np.ndarray, away: np.ndarray | None = None
    ) -> tuple[np.ndarray, float] | None:
        """Phases 0-2: above the object, turned to it (`_facing`), down to it, close the gripper. None once
        grasped."""
        if self._phase == 0:
            target = obj + [0, 0, 0.08]
            self._mem.setdefault("rot", self._facing(obj_rot, away))
            above = np.linalg.norm((target - eef)[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.02
            # turned to the cube, or above it long enough (action noise keeps the turn from settling)
            self._step(above and (self._rot_err < 0.05 or self._count_phase() > ALIGN_STEPS))
            return target, -1.0
        if self._phase == 1:
            target = obj + [0, 0, -0.005]
            self._step(np.linalg.norm(target - eef) < 0.012 or self._count_phase() > 30)
            return target, -1.0
        if self._phase == 2:
            self._mem.setdefault("grasp", eef.copy())
            self._step(True, hold=8)
            if self._phase == 3:
                self._mem["held"] = eef - obj  # where the object sits in the closed gripper
            return self._mem["grasp"], 1.0
        return None

    def _facing(self, box_rot: np.ndarray, away: np.ndarray | None = None) -> np.ndarray:
        """The gripper's first orientation turned about the vertical so that its fingers (which close
        along its x axis) come square to the faces of a box whose rotation matrix is `box_rot`: fingers
        closing across a corner land on its top. A box looks the same every quarter turn, so of the
        two ways to grip it this takes the one whose fingers close most across the direction `away`
        (towards a neighbouring object a finger would land on), else the smaller turn."""
        yaw0 = _yaw(self._rot0)
        turn = (_yaw(box_rot) - yaw0 + np.pi / 4) % (np.pi / 2) - np.pi / 4
        if away is not None and np.linalg.norm(away[:2]) > 0:
            toward = np.arctan2(away[1], away[0])
            other = turn - np.copysign(np.pi / 2, turn)
            turn = min((turn, other), key=lambda t: abs(np.cos(yaw0 + t - toward)))
        c, s = np.cos(turn), np.sin(turn)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ self._rot0

    def _dropped(self, eef: np.ndarray, obj: np.ndarray) -> bool:
        """The object has left the gripper since the grasp (missed, or slipped while carried): start the
        pick again from above it, at most `MAX_REGRASPS` times an episode."""
        regrasps = self._mem.get("regrasps", 0)
        if np.linalg.norm(eef - obj - self._mem["held"]) < 0.03 or regrasps >= MAX_REGRASPS:
            return False
        self._phase, self._count, self._mem = 0, 0, {"regrasps": regrasps + 1}
        return True

    def _lift(self, env: Any, eef: np.ndarray) -> tuple[np.ndarray, float]:
        cube = np.array(env.sim.data.body_xpos[env.cube_body_id])
        cube_rot = np.array(env.sim.data.body_xmat[env.cube_body_id]).reshape(3, 3)
        picked = self._pick(eef, cube, cube_rot)
        if picked is None and self._dropped(eef, cube):
            picked = self._pick(eef, cube, cube_rot)
        return picked or (self._mem["grasp"] + [0, 0, 0.15], 1.0)

    def _stack(self, env: Any, eef: np.ndarray) -> tuple[np.ndarray, float]:
        a = np.array(env.sim.data.body_xpos[env.cubeA_body_id])
        b = np.array(env.sim.data.body_xpos[env.cubeB_body_id])
        a_rot = np.array(env.sim.data.body_xmat[env.cubeA_body_id]).reshape(3, 3)
        picked = self._pick(eef, a, a_rot, away=b - a)
        if picked is not None:
            return picked
        if self._phase in (3, 4) and self._dropped(eef, a):
            return self._pick(eef, a, a_rot, away=b - a)
        above = b[2] + env.cubeB.size[2] + env.cubeA.size[2]  # cube A's centre when resting on B
        offset = eef - a  # keeps the grasp: move the gripper so that the cube reaches the target
        if self._phase == 3:  # up, then over B
            target = np.array([b[0], b[1], above + 0.05]) + offset
            if eef[2] < above + 0.03 + offset[2]:
                target[:2] = eef[:2]
            self._step(np.linalg.norm((a - b)[:2]) < 0.006 and abs(a[2] - above - 0.05) < 0.02)
            return target, 1.0
        if self._phase == 4:  # down onto B
            target = np.array([b[0], b[1], above + 0.005]) + offset
            self._step(a[2] - above < 0.01, hold=2)
            return target, 1.0
        if self._phase == 5:  # release
            self._mem.setdefault("release", eef.copy())
            self._step(True, hold=8)
            return self._mem["release"], -1.0
        return self._mem["release"] + [0, 0, 0.08], -1.0

    def _door(self, env: Any, eef: np.ndarray) -> tuple[np.ndarray, float]:
        """Grasp the lever from above (the hand stays 2 cm off the door), press it down, pull the door."""
        handle = np.array(env._handle_xpos)
        hinge = np.array(env.sim.data.xanchor[env.sim.model.joint_name2id(env.door.joints[0])])
        out = np.array([0.0, 1.0, 0.0])  # the door faces +y (towards the robot)
        grasp = handle + out * 0.022
        if self._phase == 0:  # above the lever
            target = grasp + [0, 0, 0.07]
            self._step(np.linalg.norm(target - eef) < 0.015)
            return target, -1.0
        if self._phase == 1:  # fingers around the lever
            self._step(np.linalg.norm(grasp - eef) < 0.01 or self._count_phase() > 30)
            return grasp, -1.0
        if self._phase == 2:
            self._mem.setdefault("grasp", eef.copy())
            self._step(True, hold=8)
            return self._mem["grasp"], 1.0
        if self._phase == 3 and env.use_latch:  # press the lever down to unlatch
            target = self._mem["grasp"] + [0, 0, -0.08]
            self._step(env.sim.data.qpos[env.handle_qpos_addr] > 0.6 or self._count_phase() > 25)
            return target, 1.0
        r = (eef - hinge)[:2]
        self._mem.setdefault("radius", np.linalg.norm(r))
        tangent = np.array([-r[1], r[0]]) / np.linalg.norm(r)  # opening direction, towards the robot
        if tangent @ out[:2] < 0:
            tangent = -tangent
        radial = r / np.linalg.norm(r) * (self._mem["radius"] - np.linalg.norm(r))
        self._mem.setdefault("press_z", eef[2])  # keep the lever pressed while pulling
        target = np.array([*(eef[:2] + tangent * 0.04 + radial), self._mem["press_z"] - 0.01])
        return target, 1.0

    def _count_phase(self) -> int:
        self._mem["t"] = self._mem.get("t", 0) + 1 if self._mem.get("tp") == self._phase else 1
        self._mem["tp"] = self._phase
        return self._mem["t"]


EXPERTS = ("Lift", "Stack", "Door")
