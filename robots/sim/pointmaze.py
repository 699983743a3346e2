"""PointMaze: a point mass in the D4RL maze2d "umaze", the DINO-WM PointMaze setting, in MuJoCo.

The maze is D4RL's U_MAZE layout (row 0 at the top of the image, `#` wall, `O` free)::

    #####
    #OOO#      top arm:    cells (1, 2), (1, 3)
    #O###      base arm:   cells (1, 1), (2, 1), (3, 1)   (the bottom of the U, drawn as its left side)
    #OOO#      bottom arm: cells (3, 2), (3, 3)
    #####

Cells are 1 m squares; cell (r, c) has its centre at x = c - 2, y = 2 - r. The agent is a disc of
radius 0.15 m on two slide joints with viscous damping, driven by a 2-d force command in [-1, 1]
(full scale gives a terminal speed of 1 m/s). Control runs at 10 Hz (10 physics steps of 10 ms).

Observation: `image`, an orthographic top-down view of the maze interior (the goal is not drawn),
and `proprio` = (x, y, vx, vy). The goal is given as an observation (`goal_observation()`: the agent
drawn at the goal, zero velocity). Success: the agent within `success_radius` (0.2 m = 0.2 cell) of
the goal. Reset puts the start and the goal at cell centres with uniform jitter of +-0.25 m; options
(`SimConfig.options`): `goal_mode` "any" (goal in any free cell other than the start's) or
"other_arm" (goal in one of the two arms the start is not in).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import mujoco
import numpy as np

from robots.base import Feature
from robots.sim.base import SimConfig, SimTask, TaskEntry, check_radius, parse_options
from robots.sim.mujoco_utils import get_physics, make_renderer, set_physics
from wm.data.schema import ActionSpace

UMAZE = ("#####", "#OOO#", "#O###", "#OOO#", "#####")
ARMS: dict[str, tuple[tuple[int, int], ...]] = {
    "top": ((1, 2), (1, 3)),
    "base": ((1, 1), (2, 1), (3, 1)),
    "bottom": ((3, 2), (3, 3)),
}
FREE_CELLS = tuple(c for cells in ARMS.values() for c in cells)
GOAL_MODES = ("any", "other_arm")
AGENT_RADIUS = 0.15
JITTER = 0.25  # start and goal: cell centre + U(-JITTER, JITTER) on each axis
MIN_START_DISTANCE = 1.0 - 2 * JITTER  # m: start and goal in neighbouring cells, jittered towards each other
MASS, DAMPING, GEAR = 1.0, 3.0, 3.0  # terminal speed GEAR / DAMPING = 1.0 m/s, time constant 0.33 s
VIEW = 3.5  # side of the square the camera sees (m): the 3 x 3 interior plus a strip of wall


def cell_center(cell: tuple[int, int]) -> np.ndarray:
    r, c = cell
    return np.array([c - 2.0, 2.0 - r])


def cell_of(xy: np.ndarray) -> tuple[int, int]:
    return int(np.floor(2.5 - xy[1])), int(np.floor(xy[0] + 2.5))


def is_free(cell: tuple[int, int]) -> bool:
    r, c = cell
    return 0 <= r < len(UMAZE) and 0 <= c < len(UMAZE[0]) and UMAZE[r][c] == "O"


def arm_of(cell: tuple[int, int]) -> str:
    return next(name for name, cells in ARMS.items() if cell in cells)


def _maze_xml() -> str:
    walls = []
    for r, row in enumerate(UMAZE):
        for c, ch in enumerate(row):
            if ch == "#":
                x, y = cell_center((r, c))
                walls.append(f'<geom type="box" pos="{x} {y} 0.25" size="0.5 0.5 0.25" material="wall"/>')
    return f"""
<mujoco model="pointmaze_umaze">
  <option timestep="0.01" gravity="0 0 0" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.6 0.6 0.6" diffuse="0.4 0.4 0.4" specular="0 0 0"/>
  </visual>
  <asset>
    <material name="wall" rgba="0.25 0.3 0.45 1" specular="0" reflectance="0"/>
    <material name="floor" rgba="0.92 0.92 0.88 1" specular="0" reflectance="0"/>
  </asset>
  <worldbody>
    <geom type="plane" size="2.5 2.5 0.1" material="floor" contype="0" conaffinity="0"/>
    {"".join(walls)}
    <body name="agent" pos="0 0 {AGENT_RADIUS}">
      <joint name="x" type="slide" axis="1 0 0" damping="{DAMPING}"/>
      <joint name="y" type="slide" axis="0 1 0" damping="{DAMPING}"/>
      <geom type="sphere" size="{AGENT_RADIUS}" mass="{MASS}" condim="1" rgba="0.9 0.15 0.1 1"/>
    </body>
    <camera name="top" pos="0 0 5" projection="orthographic" fovy="{VIEW}"/>
  </worldbody>
  <actuator>
    <motor joint="x" gear="{GEAR}" ctrlrange="-1 1" ctrllimited="true"/>
    <motor joint="y" gear="{GEAR}" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>"""


@dataclass
class PointMazeTask(SimTask):
    """The U-maze point mass. Goal modes "any" and "other_arm"; see the module docstring."""

    name: str = "pointmaze"
    control_hz: float = 10.0
    action_space: ActionSpace = field(
        default_factory=lambda: ActionSpace(
            mode="absolute", frame="planar", units="", description="force command (x, y), full scale = 3 N"
        )
    )
    goal_mode: str = "any"
    success_radius: float = 0.2
    frame_skip: int = 10
    goal: np.ndarray = field(default_factory=lambda: np.zeros(2), init=False)
    _model: Any = field(default=None, init=False, repr=False)
    _data: Any = field(default=None, init=False, repr=False)
    _renderer: Any = field(default=None, init=False, repr=False)

    @property
    def position_actions(self) -> bool:
        return False  # absolute force commands: holding still is zero force

    @property
    def teleop_gains(self) -> dict[str, Any]:
        # The maze is seen from above, x right and y up: forward (+x of a device) pushes the agent up
        # the image (+y), left (+y) to its left (-x), as on the other tasks' views.
        return {"axis_order": (1, 0, 2, 3, 4, 5), "axis_sign": (-1, 1, 1, 1, 1, 1)}

    def __post_init__(self) -> None:
        if self.goal_mode not in GOAL_MODES:
            raise ValueError(f"goal_mode must be one of {GOAL_MODES}, got {self.goal_mode!r}")

    # ------------------------------------------------------------------ features
    @property
    def observation_features(self) -> dict[str, Feature]:
        feats = {}
        if not self.config.state_only:
            feats["image"] = Feature((*self.config.image_size, 3), "uint8", "image")
        feats["proprio"] = Feature((4,), "float32", "proprio", units="m, m/s", names=("x", "y", "vx", "vy"))
        return feats

    @property
    def action_feature(self) -> Feature:
        return Feature((2,), "float32", "action", names=("fx", "fy"), low=(-1.0, -1.0), high=(1.0, 1.0))

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        self._model = mujoco.MjModel.from_xml_string(_maze_xml())
        self._data = mujoco.MjData(self._model)
        if not self.config.state_only:
            self._renderer = make_renderer(self._model, self.config.image_size)
        # config.seed's start until the first reset, as PushT's (the agent sat at (0, 0), inside a wall,
        # on its goal: success before any action)
        self._reset(np.random.default_rng(self.config.seed))

    def _disconnect(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self._renderer = self._model = self._data = None

    # ------------------------------------------------------------------ observation and action
    @property
    def position(self) -> np.ndarray:
        """Privileged: the agent's (x, y), float64."""
        return self._data.qpos[:2].copy()

    @property
    def velocity(self) -> np.ndarray:
        return self._data.qvel[:2].copy()

    def render(self) -> np.ndarray:
        """The camera image of the current state, uint8 (H, W, 3); needs `state_only=False`."""
        self._renderer.update_scene(self._data, camera="top")
        return self._renderer.render().copy()

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {}
        if self._renderer is not None:
            obs["image"] = self.render()
        obs["proprio"] = np.concatenate([self._data.qpos[:2], self._data.qvel[:2]]).astype(np.float32)
        return obs

    def _apply(self, action: np.ndarray) -> None:
        self._data.ctrl[:] = action
        mujoco.mj_step(self._model, self._data, nstep=self.frame_skip)
        mujoco.mj_forward(self._model, self._data)  # positions of the new state, for rendering

    # ------------------------------------------------------------------ episodes
    def _sample_point(self, cells: tuple[tuple[int, int], ...], rng: np.random.Generator) -> np.ndarray:
        cell = cells[rng.integers(len(cells))]
        return cell_center(cell) + rng.uniform(-JITTER, JITTER, size=2)

    def _reset(self, rng: np.random.Generator) -> None:
        start = self._sample_point(FREE_CELLS, rng)
        start_cell = cell_of(start)
        if self.goal_mode == "other_arm":
            arms = [name for name in ARMS if name != arm_of(start_cell)]
            candidates = ARMS[arms[rng.integers(len(arms))]]
        else:
            candidates = tuple(c for c in FREE_CELLS if c != start_cell)
        self.goal = self._sample_point(candidates, rng)
        mujoco.mj_resetData(self._model, self._data)
        self._data.qpos[:2] = start
        mujoco.mj_forward(self._model, self._data)

    def _success(self) -> bool:
        return bool(self.goal_distance() < self.success_radius)

    def goal_distance(self) -> float:
        """Privileged: distance from the agent to the goal (m)."""
        return float(np.linalg.norm(self.position - self.goal))

    def _goal_observation(self) -> dict[str, np.ndarray]:
        saved = self.get_sim_state()
        try:  # (a failed render left the agent at the goal: the episode then read as a success)
            self._data.qpos[:2] = self.goal
            self._data.qvel[:] = 0.0
            mujoco.mj_forward(self._model, self._data)
            return self._observe()
        finally:
            self.set_sim_state(saved)

    # ------------------------------------------------------------------ privileged state
    def get_sim_state(self) -> dict[str, Any]:
        """Full MuJoCo integration state (time, qpos, qvel, act, warm start, ctrl), goal and step count."""
        self._require_connected()
        physics = get_physics(self._model, self._data)
        return {"physics": physics, "goal": self.goal.copy(), "steps": self.steps}

    def set_sim_state(self, state: dict[str, Any]) -> None:
        self._require_connected()
        set_physics(self._model, self._data, state["physics"])
        self.goal = np.array(state["goal"], dtype=np.float64)
        self.steps = int(state["steps"])


# ---------------------------------------------------------------------------- expert
def shortest_path(start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    """Breadth-first search over free cells (4-connected); the cells from `start` to `goal`, both included."""
    parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nxt = (cell[0] + dr, cell[1] + dc)
            if is_free(nxt) and nxt not in parent:
                parent[nxt] = cell
                queue.append(nxt)
    path, cell = [], goal
    while cell is not None:
        path.append(cell)
        cell = parent.get(cell)
    return path[::-1]


def line_of_sight(a: np.ndarray, b: np.ndarray, clearance: float) -> bool:
    """True when a disc of radius `clearance` moving from `a` to `b` stays in free cells."""
    n = max(2, int(np.ceil(np.linalg.norm(b - a) / 0.05)) + 1)
    offsets = clearance * np.array([[1, 1], [1, -1], [-1, 1], [-1, -1], [0, 0]])
    for p in np.linspace(a, b, n):
        if not all(is_free(cell_of(p + o)) for o in offsets):
            return False
    return True


@dataclass
class PointMazeExpert:
    """Scripted demonstrator with privileged state: BFS over cells to the goal's cell, then the
    farthest waypoint (cell centre on the path, or the goal) in line of sight, tracked by a PD law
    on a desired velocity; clipped to [-1, 1]. `noise_std` adds Gaussian noise before clipping."""

    noise_std: float = 0.0
    max_speed: float = 0.8  # m/s
    kp: float = 2.5  # 1/s: desired speed = kp * distance near the goal
    kd: float = 4.0  # N s/m: velocity error gain
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    def reset(self, task: SimTask, rng: np.random.Generator) -> None:
        self._rng = rng

    def act(self, task: SimTask, obs: dict[str, np.ndarray]) -> np.ndarray:
        assert isinstance(task, PointMazeTask), "PointMazeExpert drives a PointMazeTask"
        pos, vel, goal = task.position, task.velocity, task.goal
        path = shortest_path(cell_of(pos), cell_of(goal))
        waypoints = [cell_center(c) for c in path[:-1]] + [goal]
        target_i = next(
            (
                i
                for i in range(len(waypoints) - 1, 0, -1)
                if line_of_sight(pos, waypoints[i], AGENT_RADIUS + 0.03)
            ),
            0,
        )
        target = waypoints[target_i]
        err = target - pos
        dist = float(np.linalg.norm(err))
        speed = self.max_speed if target_i < len(waypoints) - 1 else min(self.max_speed, self.kp * dist)
        v_des = err / max(dist, 1e-9) * speed
        force = DAMPING * v_des + self.kd * (v_des - vel)  # feed-forward against damping + D term
        action = force / GEAR
        if self.noise_std > 0:
            action = action + self._rng.normal(0.0, self.noise_std, size=2)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class PointMazeOptions:
    """`SimConfig.options` of pointmaze (see the module docstring)."""

    goal_mode: Literal["any", "other_arm"] = "any"
    success_radius: float = 0.2  # m

    def __post_init__(self) -> None:
        if self.goal_mode not in GOAL_MODES:
            raise ValueError(f"goal_mode must be one of {GOAL_MODES}, got {self.goal_mode!r}")
        check_radius(self.success_radius, below=MIN_START_DISTANCE)


def make(config: SimConfig) -> PointMazeTask:
    opts = parse_options(PointMazeOptions, config.options, "pointmaze")
    return PointMazeTask(config=config, goal_mode=opts.goal_mode, success_radius=float(opts.success_radius))


ENTRY = TaskEntry(
    make=make,
    expert=PointMazeExpert,
    description="Point mass in the D4RL U-maze (DINO-WM PointMaze); 2-d force in [-1, 1]; options: goal_mode",
    options=PointMazeOptions,
)
