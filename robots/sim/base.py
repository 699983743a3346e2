"""Simulated tasks: a robot plus a scene with seeded reset states, goals and a success signal.

A `SimTask` is a `Robot` (same features, `send_action` validation and clipping) with what a
simulator can offer beyond a real arm: `reset(seed)`, `is_success()`, a goal given as an
observation (image plus proprioception, so goal-conditioned planners can use it), and privileged
`get_sim_state` / `set_sim_state` for scripted experts and sampling-based planners on cloned state.
`state_only=True` skips rendering entirely (fast mode); images are then absent from the features.

Headless rendering needs `MUJOCO_GL=egl` (or osmesa) in the environment before mujoco is first
imported. Importing this package does not set it: the entry points that render do (the `tools/` apps
through `tools/__init__.py`, each rendering benchmark, the test suite's conftest).
"""

from __future__ import annotations

import difflib
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from robots.base import RobotBase, RobotError
from wm.options import check_numbers, is_real, is_whole

MAX_IMAGE_SIZE = 4096  # pixels a side a simulated camera renders


@dataclass(frozen=True)
class SimConfig:
    """Options every simulated task takes. `image_size` is (height, width). `seed` seeds the episodes of
    `reset()` called without a seed: `seed`, `seed + 1`, ... in turn."""

    image_size: tuple[int, int] = (64, 64)
    state_only: bool = False
    max_steps: int = 200
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # task-specific (controller, robot, ...)

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, int | np.integer):
            size = (size, size)
        if not isinstance(size, Iterable) or isinstance(size, str):  # 64.5 or None was a TypeError
            raise ValueError(
                f"image_size must be (height, width) of 8 to {MAX_IMAGE_SIZE} pixels, got {self.image_size!r}"
            )
        size = tuple(size)
        check_numbers(SimConfig, {"image_size": size}, "SimConfig")  # int() cut (64.7, 64) to (64, 64)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8 or max(size) > MAX_IMAGE_SIZE:  # (a framebuffer MuJoCo or
            raise ValueError(  # OpenCV cannot make was a traceback, after the store was created)
                f"image_size must be (height, width) of 8 to {MAX_IMAGE_SIZE} pixels, got {self.image_size}"
            )
        object.__setattr__(self, "image_size", size)
        if not isinstance(self.state_only, bool | np.bool_):  # "false" would be true
            raise ValueError(f"state_only must be true or false, got {self.state_only!r}")
        if not is_whole(self.max_steps) or self.max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        check_seed(self.seed, "seed")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping of option names to values, got {self.options!r}")


def check_radius(radius: Any, below: float, name: str = "success_radius") -> None:
    """A one-line error unless `radius` is a finite number > 0 and under `below`, the task's smallest
    start-to-goal distance (an infinite radius, or one the start can be inside, is success at reset)."""
    if not is_real(radius) or not 0 < radius < np.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {radius!r}")
    if radius >= below:
        raise ValueError(
            f"{name} must be under {below:g} m, the smallest distance an episode starts from its goal (at "
            f"{radius!r} some episodes succeed before any action)"
        )


def check_seed(seed: Any, where: str) -> int:
    """`seed` as an int, or a one-line error naming `where` when it is not a non-negative integer."""
    if not is_whole(seed) or seed < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {seed!r}")
    return int(seed)


@dataclass
class SimTask(RobotBase):
    """Base class of simulated tasks. Subclasses implement the `_`-methods of RobotBase plus
    `_reset(rng)`, `_success()`, `_goal_observation()` and the sim-state pair."""

    # The world advances one control period inside `send_action` and stands still between sends: an
    # observation read after a send shows the state the next send acts on, so the real-time runtime
    # stamps it with the next tick's time (a real arm's reading shows the present).
    advances_on_send: ClassVar[bool] = True

    config: SimConfig = field(default_factory=SimConfig)
    steps: int = field(default=0, init=False)
    _rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(0), init=False, repr=False
    )
    _unseeded_resets: int = field(default=0, init=False, repr=False)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Sample a new start state and goal (seeded), return the first observation. Without a seed, the
        episodes follow `config.seed`: `config.seed`, `config.seed + 1`, ... (a new episode each time)."""
        if seed is None:
            seed, self._unseeded_resets = self.config.seed + self._unseeded_resets, self._unseeded_resets + 1
        seed = check_seed(seed, f"{self.name}: reset seed")
        if not self.is_connected:
            self.connect()
        self._rng = np.random.default_rng(seed)
        self.steps = 0
        self._reset(self._rng)
        return self.get_observation()

    def send_action(self, action: np.ndarray) -> np.ndarray:
        applied = super().send_action(action)
        self.steps += 1
        return applied

    def step_seconds(self) -> float:
        """Simulated seconds one step advances the world. MuJoCo tasks step their physics by a fixed
        period (frame skip x timestep), the one their class's `control_hz` names, whatever rate they
        are then driven at; a task whose simulator takes its rate from `control_hz` overrides this."""
        return 1.0 / type(self).control_hz

    @property
    def done(self) -> bool:
        """The episode is over: success, or `max_steps` actions sent."""
        return self.steps >= self.config.max_steps or self.is_success()

    def is_success(self) -> bool:
        self._require_connected()
        return bool(self._success())

    def goal_observation(self) -> dict[str, np.ndarray]:
        """The goal as an observation: the same features `get_observation` returns (no timestamp)."""
        self._require_connected()
        return self._goal_observation()

    def goal_distance(self) -> float | None:
        """Privileged: how far the task is from its goal, in the task's own units (for evaluation
        reports only); None for tasks without a natural distance."""
        return None

    def score(self) -> float | None:
        """Privileged: partial credit in [0, 1] for the current state (for evaluation reports only;
        its maximum over an episode is reported); None for tasks without one."""
        return None

    @abstractmethod
    def _reset(self, rng: np.random.Generator) -> None: ...

    @abstractmethod
    def _success(self) -> bool: ...

    @abstractmethod
    def _goal_observation(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def get_sim_state(self) -> Any:
        """Privileged: a copy of the full simulator state (for experts and planners on cloned state)."""

    @abstractmethod
    def set_sim_state(self, state: Any) -> None: ...


class Expert(Protocol):
    """A demonstrator with privileged access to the simulator (scripted or sampling-based)."""

    def reset(self, task: SimTask, rng: np.random.Generator) -> None: ...

    def act(self, task: SimTask, obs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class NoOptions:
    """The options of a task that takes none."""


O = TypeVar("O")


def parse_options(cls: type[O], options: Mapping[str, Any], task: str, what: str = "task") -> O:
    """`SimConfig.options` (or a real robot's options, `what="robot"`) as the frozen dataclass `cls` a task
    declares its options with. A name the task does not declare is an error naming the nearest valid one:
    a typo is never silently ignored."""
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for name in options:
        if name not in valid:
            near = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise RobotError(
                f"unknown option {name!r} for {what} {task}{hint} (its options: {', '.join(valid) or 'none'})"
            )
    return cls(**options)


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: how to build it, its expert, and the dataclass its options
    (`SimConfig.options`) are checked against before anything is built."""

    make: Callable[[SimConfig], SimTask]
    expert: Callable[..., Expert]
    description: str = ""
    options: type = NoOptions


def check_registry_name(name: str, valid: list[str], what: str) -> None:
    if name not in valid:
        raise RobotError(f"unknown {what} {name!r}; valid: {', '.join(sorted(valid))}")
