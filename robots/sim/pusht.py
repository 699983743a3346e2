"""PushT (gym-pusht): push a T-shaped block onto a goal pose with a round planar pusher.

Observations: `image` (the env's own top-down render, right side up, at `config.image_size`) and
`proprio` (pusher position, px); with `state_only` (no camera) `object`, the block's (x, y, angle) in
px and radians, the rest of gym-pusht's state, the angle wrapped into the goal's +-pi (one pose, one
reading: pymunk's angle winds on, and a block at the goal read 2 pi away from it). Action: absolute
pusher target (x, y) in px, in [0, 512]; a PD controller tracks it for 10 physics substeps per action
(control at 10 Hz). Success is gym-pusht's: more than 95% of the goal T covered by the block. The
goal observation shows the block at the goal pose (the pusher stays where it is).

The expert is a sampling-based planner on cloned simulator state: it samples push primitives
(approach a contact point on the block around it, then push by a length at an angle), simulates
each on a scratch copy of the physics, and executes the one that brings the block keypoints
closest to the goal, re-planning after every primitive.
"""

from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import Feature
from robots.sim.base import NoOptions, SimConfig, SimTask, TaskEntry, parse_options
from wm.data.schema import ActionSpace

WORKSPACE = 512.0  # px; the action space and the walls
GOAL_POSE = (256.0, 256.0, math.pi / 4)  # gym-pusht's fixed goal (x, y, angle)
# outline of the T in the block frame (px), matching gym-pusht's add_tee(scale=30)
T_OUTLINE = np.array(
    [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], float
)
AGENT_RADIUS = 15.0
# px: a full teleop deflection sets the target this far ahead of the pusher (it follows at ~0.4 of it a step)
TELEOP_STEP = 20.0
_BODY_ATTRS = ("angle", "position", "velocity", "angular_velocity", "force", "torque")


def _load_env_class() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pygame's pkg_resources deprecation warning
        from gym_pusht.envs.pusht import PushTEnv
    return PushTEnv


def _no_contact_count(arbiter: Any, space: Any, data: Any) -> None:
    """Replaces gym-pusht's contact counter (a bound method) so the physics space can be pickled."""


@dataclass
class PushTTask(SimTask):
    """gym-pusht behind the SimTask interface (see the module docstring)."""

    name: str = "pusht"
    control_hz: float = 10.0
    action_space: ActionSpace = field(
        default_factory=lambda: ActionSpace("absolute", "planar", "px", "pusher target position (x, y)")
    )
    _env: Any = field(default=None, init=False, repr=False)
    _coverage: float = field(default=0.0, init=False, repr=False)

    # ------------------------------------------------------------------ features
    @property
    def observation_features(self) -> dict[str, Feature]:
        feats = {}
        if not self.config.state_only:
            feats["image"] = Feature((*self.config.image_size, 3), "uint8", "image")
        feats["proprio"] = Feature((2,), "float32", "proprio", units="px", names=("agent_x", "agent_y"))
        if self.config.state_only:  # no camera: the block's pose is the rest of the state (gym-pusht's)
            names = ("block_x", "block_y", "block_angle")
            feats["object"] = Feature((3,), "float32", "lowdim", units="px, rad", names=names)
        return feats

    @property
    def action_feature(self) -> Feature:
        return Feature(
            (2,),
            "float32",
            "action",
            units="px",
            names=("target_x", "target_y"),
            low=(0.0, 0.0),
            high=(WORKSPACE, WORKSPACE),
        )

    @property
    def position_key(self) -> str:
        """The pusher's position, in the target action's px: a runtime caps the first command's step from
        it (the first target was sent uncapped, hundreds of px from the pusher)."""
        return "proprio"

    @property
    def teleop_gains(self) -> dict[str, Any]:
        # The board is seen from above, image x right and y down: forward (+x of a device) moves the
        # pusher up the image, left (+y) to its left; a full deflection sets its target TELEOP_STEP px ahead.
        return {
            "axis_order": (1, 0, 2, 3, 4, 5),
            "axis_sign": (-1, -1, 1, 1, 1, 1),
            "translation_gain": TELEOP_STEP,
        }

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        h, w = self.config.image_size
        self._env = _load_env_class()(
            obs_type="state", render_mode="rgb_array", observation_width=w, observation_height=h
        )
        self._reset(np.random.default_rng(self.config.seed))

    def _disconnect(self) -> None:
        self._env.close()
        self._env = None

    # ------------------------------------------------------------------ episode
    def _reset(self, rng: np.random.Generator) -> None:
        env = self._env
        env.reset(seed=int(rng.integers(2**31)))  # gym-pusht samples agent and block poses
        env.collision_handeler.post_solve = _no_contact_count  # so that the space can be pickled
        self._coverage = float(env._get_coverage())

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {}
        if not self.config.state_only:
            obs["image"] = np.ascontiguousarray(self._env._render(visualize=False), dtype=np.uint8)
        obs["proprio"] = np.asarray(self._env.agent.position, dtype=np.float32)
        if self.config.state_only:
            obs["object"] = self.block_pose().astype(np.float32)
        return obs

    def _apply(self, action: np.ndarray) -> None:
        _, _, _, _, info = self._env.step(action.astype(np.float64))
        self._coverage = float(info["coverage"])

    def _success(self) -> bool:
        return self._coverage > self._env.success_threshold

    @property
    def coverage(self) -> float:
        """Fraction of the goal T covered by the block (gym-pusht's reward before scaling)."""
        return self._coverage

    def score(self) -> float:
        """gym-pusht's reward: coverage / 0.95, clipped to [0, 1]; its episode maximum is the score
        Diffusion Policy reports for PushT."""
        return float(np.clip(self._coverage / self._env.success_threshold, 0.0, 1.0))

    def goal_distance(self) -> float:
        """Mean distance (px) between the block's T outline vertices and the goal's."""
        self._require_connected()
        return keypoint_error(self.block_pose())

    def block_pose(self) -> np.ndarray:
        """Privileged: block (x, y, angle) in px and radians (gym-pusht's body origin), the angle in
        [goal - pi, goal + pi)."""
        b = self._env.block
        angle = GOAL_POSE[2] + (b.angle - GOAL_POSE[2] + math.pi) % (2 * math.pi) - math.pi
        return np.array([b.position[0], b.position[1], angle])

    def _goal_observation(self) -> dict[str, np.ndarray]:
        state = self.get_sim_state()
        try:
            self._env.block.angle = GOAL_POSE[2]
            self._env.block.position = GOAL_POSE[:2]
            self._env.space.reindex_shapes_for_body(self._env.block)  # drawing reads the shapes
            return self._observe()
        finally:
            self.set_sim_state(state)

    # ------------------------------------------------------------------ privileged state
    def get_sim_state(self) -> bytes:
        """The full physics state (pymunk space with contact cache) as bytes.

        pymunk's pickling is not bit-exact (body positions pass through the centre of gravity), so
        the live simulator is re-seated on a copy of the returned state: the running episode and any
        later `set_sim_state(state)` then continue identically.
        """
        self._require_connected()
        env = self._env
        core = (env.space, env.agent, env.block, env._block_shapes)
        bodies = [tuple(getattr(b, k) for k in _BODY_ATTRS) for b in (env.agent, env.block)]
        last = None if env._last_action is None else np.asarray(env._last_action, dtype=np.float64)
        state = pickle.dumps((core, bodies, last, self._coverage, self.steps))
        self.set_sim_state(state)
        return state

    def set_sim_state(self, state: bytes) -> None:
        self._require_connected()
        env = self._env
        core, bodies, last, coverage, steps = pickle.loads(state)
        env.space, env.agent, env.block, env._block_shapes = core
        env.collision_handeler = None  # the space carries its own handler now
        for body, values in zip((env.agent, env.block), bodies, strict=True):
            for k, v in zip(_BODY_ATTRS, values, strict=True):
                setattr(body, k, v)
        env._last_action = last
        self._coverage, self.steps = coverage, steps


def make(config: SimConfig) -> PushTTask:
    parse_options(NoOptions, config.options, "pusht")  # PushT takes no options: refuse any
    return PushTTask(config=config)


# ---------------------------------------------------------------------- expert
def block_points(pose: np.ndarray) -> np.ndarray:
    """The T outline at `pose` (x, y, angle) in world px, (8, 2)."""
    c, s = math.cos(pose[2]), math.sin(pose[2])
    return T_OUTLINE @ np.array([[c, s], [-s, c]]) + np.asarray(pose[:2])


GOAL_POINTS = block_points(np.array(GOAL_POSE))


def keypoint_error(pose: np.ndarray) -> float:
    """Mean distance (px) between the T outline vertices at `pose` and at the goal."""
    return float(np.linalg.norm(block_points(pose) - GOAL_POINTS, axis=1).mean())


def coverage(pose: np.ndarray) -> float:
    """gym-pusht's coverage for a block at `pose`: area of goal T covered / area of the T."""
    from shapely.geometry import Polygon

    goal = Polygon(GOAL_POINTS)
    return goal.intersection(Polygon(block_points(pose))).area / goal.area


def _contacts(spacing: float = 10.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(point, outward normal) pairs on the T outline, block frame; concave corners are left out."""
    out = []
    edges = [  # start, end, outward normal
        ((-60, 0), (60, 0), (0, -1)),
        ((60, 0), (60, 30), (1, 0)),
        ((60, 30), (35, 30), (0, 1)),
        ((15, 50), (15, 120), (1, 0)),
        ((15, 120), (-15, 120), (0, 1)),
        ((-15, 120), (-15, 50), (-1, 0)),
        ((-35, 30), (-60, 30), (0, 1)),
        ((-60, 30), (-60, 0), (-1, 0)),
    ]
    for a, b, n in edges:
        a, b = np.array(a, float), np.array(b, float)
        k = max(1, int(round(np.linalg.norm(b - a) / spacing)))
        for t in (np.arange(k) + 0.5) / k:
            out.append((a + t * (b - a), np.array(n, float)))
    return out


def _polyline(points: list[np.ndarray], step: float) -> list[np.ndarray]:
    """Targets along a polyline, at most `step` px apart, ending exactly on each vertex."""
    out = []
    for a, b in zip(points[:-1], points[1:], strict=True):
        n = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
        out += [a + (b - a) * (i / n) for i in range(1, n + 1)]
    return out


class _Scratch:
    """A private gym-pusht physics space for rollouts; state is set softly (poses and velocities)."""

    def __init__(self) -> None:
        self.env = _load_env_class()(obs_type="state")
        self.env.reset(seed=0)

    def set(self, s: tuple) -> None:
        a, b = self.env.agent, self.env.block
        a.position, a.velocity = s[0], s[1]
        b.angle, b.position, b.velocity, b.angular_velocity = s[2], s[3], s[4], s[5]

    def get(self) -> tuple:
        a, b = self.env.agent, self.env.block
        return (a.position, a.velocity, b.angle, b.position, b.velocity, b.angular_velocity)

    def pose(self) -> np.ndarray:
        b = self.env.block
        return np.array([b.position[0], b.position[1], b.angle])

    def run(self, targets: list[np.ndarray]) -> None:
        """gym-pusht's step (PD tracking, 10 substeps of 10 ms) without rewards or observations."""
        agent, space = self.env.agent, self.env.space
        for tx, ty in targets:
            for _ in range(10):
                vx, vy = agent.velocity
                px, py = agent.position
                agent.velocity = (
                    vx + (100 * (tx - px) + 20 * (0.0 - vx)) * 0.01,
                    vy + (100 * (ty - py) + 20 * (0.0 - vy)) * 0.01,
                )
                space.step(0.01)


@dataclass
class PushTPlanner:
    """Sampling-based planner over push primitives on cloned physics state (privileged expert).

    Each re-plan samples primitives: approach a contact point of the block (around it if the way is
    blocked), then push `length` px along the inward normal turned by `angle`; plus short pushes
    continuing from where the pusher is. Every primitive is rolled out on a scratch copy of the
    current physics state and scored by the keypoint error to the goal (near the goal: by coverage)
    plus `step_cost` px per step; the best one is executed open loop, then the planner re-plans.
    `noise_std`: Gaussian action noise as a fraction of the action half-range (256 px).
    """

    noise_std: float = 0.0
    lengths: tuple[float, ...] = (4.0, 10.0, 25.0, 50.0, 80.0)
    angles_deg: tuple[float, ...] = (-30.0, 0.0, 30.0)
    approach_speed: float = 25.0
    push_speed: float = 15.0
    rate_offset: float = 8.0
    _queue: list = field(default_factory=list, init=False, repr=False)
    _rng: np.random.Generator = field(default_factory=np.random.default_rng, init=False, repr=False)
    _scratch: Any = field(default=None, init=False, repr=False)

    def reset(self, task: SimTask, rng: np.random.Generator) -> None:
        self._queue, self._rng = [], rng
        if self._scratch is None:
            self._scratch = _Scratch()

    def act(self, task: SimTask, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self._scratch is None:
            self.reset(task, np.random.default_rng(0))
        if not self._queue:
            self._queue = self._plan(task)
        target = np.asarray(self._queue.pop(0), dtype=np.float64)
        if self.noise_std > 0:
            target = target + self._rng.normal(0.0, self.noise_std * WORKSPACE / 2, 2)
        return np.clip(target, 0.0, WORKSPACE).astype(np.float32)

    # ------------------------------------------------------------------ planning
    def _plan(self, task: SimTask) -> list[np.ndarray]:
        from shapely.geometry import LineString, Point, Polygon

        env, sim = task._env, self._scratch
        a, b = env.agent, env.block
        start = (a.position, a.velocity, b.angle, b.position, b.velocity, b.angular_velocity)
        pose = np.array([b.position[0], b.position[1], b.angle])
        err0 = keypoint_error(pose)
        agent = np.array(a.position)
        tee = Polygon(block_points(pose))
        clear = tee.buffer(AGENT_RADIUS + 6)
        c, s = math.cos(pose[2]), math.sin(pose[2])
        rot = np.array([[c, -s], [s, c]])
        cog = pose[:2] + rot @ np.array([0.0, 45.0])
        candidates = []  # (targets, final pose)

        def push(origin: np.ndarray, d: np.ndarray, dist: float) -> list[np.ndarray]:
            return _polyline([origin, origin + d * dist], self.push_speed) + [origin + d * dist] * 3

        # -- sample: short pushes continuing from the pusher's current place
        if tee.distance(Point(agent)) < AGENT_RADIUS + 10:
            for ang in np.linspace(0, 2 * np.pi, 16, endpoint=False):
                d = np.array([math.cos(ang), math.sin(ang)])
                for dist in (3.0, 8.0, 16.0):
                    targets = push(agent, d, dist)
                    sim.set(start)
                    sim.run(targets)
                    candidates.append((targets, sim.pose()))
        # -- sample: approach a contact point, then push
        back = agent
        near = tee.distance(Point(agent)) < AGENT_RADIUS + 8
        if near:
            p = np.array(tee.exterior.interpolate(tee.exterior.project(Point(agent))).coords[0])
            back = agent + (agent - p) / max(np.linalg.norm(agent - p), 1e-6) * 15
        for point, normal in _contacts():
            pw, nw = pose[:2] + rot @ point, rot @ normal
            c0 = pw + nw * (AGENT_RADIUS + 4)
            w_in = c0 + nw * 30
            route = [agent] + ([back] if near else [])
            if LineString([route[-1], w_in]).intersects(clear):
                route += self._around(route[-1], w_in, cog)
            route += [w_in]
            approach = _polyline(route, self.approach_speed) + _polyline([w_in, c0], 10.0)
            sim.set(start)
            sim.run(approach)
            mid = sim.get()
            for ang in self.angles_deg:
                t = math.radians(ang)
                d = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ -nw
                for length in self.lengths:
                    targets = push(c0, d, length + 4)
                    sim.set(mid)
                    sim.run(targets)
                    candidates.append((approach + targets, sim.pose()))
        # -- score: keypoint error (coverage near the goal) plus a cost per step
        errs = np.array([keypoint_error(p) for _, p in candidates])
        steps = np.array([len(t) for t, _ in candidates])
        order = np.argsort((errs - err0) / (steps + self.rate_offset))  # fastest error decrease per step
        if errs[order[0]] >= err0:
            order = np.argsort(errs)
        if errs.min() < 15:
            top = np.argsort(errs)[:12]
            scores = [(1 - coverage(candidates[i][1])) * 100 + 0.05 * len(candidates[i][0]) for i in top]
            order = top[np.argsort(scores)]
        return list(candidates[order[0]][0])

    @staticmethod
    def _around(start: np.ndarray, end: np.ndarray, cog: np.ndarray, radius: float = 110.0) -> list:
        """Waypoints from `start` to `end` along a circle of `radius` around the block."""
        a0 = math.atan2(*(start - cog)[::-1])
        a1 = math.atan2(*(end - cog)[::-1])
        delta = (a1 - a0 + math.pi) % (2 * math.pi) - math.pi
        n = max(1, int(math.ceil(abs(delta) / math.radians(20))))
        return [
            cog + radius * np.array([math.cos(a0 + delta * i / n), math.sin(a0 + delta * i / n)])
            for i in range(n + 1)
        ]


def _expert(**kwargs: Any) -> PushTPlanner:
    return PushTPlanner(**kwargs)


ENTRY = TaskEntry(make=make, expert=_expert, description=__doc__.splitlines()[0])
