"""The seams between controllers, world models and planners.

`Policy` is the one protocol every controller satisfies (MPC over a world model, diffusion
policies); `GoalConditioned` and `Previewable` are the optional extras a runner may use.
`ChunkController` is the extra a real-time runtime needs: a chunk computed from observations captured
earlier, continuing the chunk being executed meanwhile (real-time chunking).
`EpisodeRows` lets a runner say which rows of a batch are which episode, and which still run.
`AppliedActions` lets a runner say what the robot applied of the actions a controller asked for.
`PlanningModel` is all a planner may know about a world model: `encode`, `rollout`, `cost` and
`action_dim`; planners never see a simulator. `Planner` is what MPC needs
from a planner: `plan(z0, goal, warm_start) -> PlanResult`, the goal passed as an argument.

Shape letters: E parallel episodes, N samples, H planning horizon, A planning action dim
(a world model with frameskip f and raw action dim Da has A = f * Da), To observation steps,
Ta action steps, P patches, D features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from wm.checks import check_finite
from wm.options import is_whole

Latent = dict[str, torch.Tensor]
"""A latent state, e.g. {"visual": (..., P, D), "proprio": (..., Dp)}; all keys share the leading dims."""


@runtime_checkable
class PlanningModel(Protocol):
    """What a planner may call on a world model (and nothing else)."""

    action_dim: int  # A: one planning step's action (frameskip raw actions concatenated)

    def encode(self, obs: dict[str, torch.Tensor]) -> Latent:
        """obs values (E, To, ...) -> latent state of E episodes, leading dim (E,)."""
        ...

    def rollout(self, z0: Latent, actions: torch.Tensor) -> Latent:
        """z0 leading (E,), actions (E, N, H, A) -> predicted latents, leading (E, N, H).

        z0 is shared by the N samples of its episode; the model broadcasts it (`expand_latent`),
        so the start state is encoded once per episode, never once per sample.
        """
        ...

    def cost(self, pred: Latent, goal: Latent) -> torch.Tensor:
        """pred leading (E, N, H), goal leading (E,) -> (E, N); lower is better. Planners minimize it."""
        ...


@runtime_checkable
class MetricModel(Protocol):
    """A world model that declares the metric behind its planning cost, so that a latent graph
    (`policies.subgoal`) measures distances between states the way the planner does."""

    def cost_vectors(self, z: Latent) -> torch.Tensor:
        """z leading (N, T) or (N,) -> (N, K): the last frame of each state as a vector whose squared
        Euclidean distance to another state's vector is the model's single-frame planning cost."""
        ...


RawObs = Mapping[str, np.ndarray]
"""A raw observation of E robots or episodes: {key: (E, ...)}, as `Robot.get_observation` gives it per
robot (images (E, H, W, 3) uint8, proprioception (E, Dp)), stacked. See `policies.inputs`."""


@runtime_checkable
class Policy(Protocol):
    """Every controller of the project, batched over E parallel episodes or robots. A controller owns
    its inputs: it takes raw observations and keeps its own history, image resizing and
    normalization (`policies.inputs.ObsHistory`), so any runner can feed it what the robots return."""

    def reset(self) -> None:
        """Forget everything carried between calls (history, action queue, warm start, timings)."""
        ...

    def predict_action_chunk(self, obs: RawObs) -> torch.Tensor:
        """Record obs (values (E, ...)) and compute a fresh chunk: raw actions (E, Ta, Da) from now on."""
        ...

    def select_action(self, obs: RawObs) -> torch.Tensor:
        """Record obs and return the next raw action (E, Da), from the current chunk or a new one."""
        ...

    def inference_seconds(self) -> list[float]:
        """Seconds taken by each model call (a new chunk, a replan) since the last `reset`."""
        ...


@runtime_checkable
class GoalConditioned(Protocol):
    """A controller that is told its goal as an observation (MPC over a world model)."""

    def set_goal(self, goal_obs: RawObs) -> None:
        """The goal of each of the E episodes, a raw observation {key: (E, ...)}; kept across `reset`.
        (A `clear_goal()` method, where there is one, forgets it: wm-serve then hands the controller to
        another robot's session; one without is not reused.)"""
        ...


@runtime_checkable
class ChunkController(Protocol):
    """A controller a real-time runtime can drive asynchronously: the control loop executes the current
    chunk while the controller computes the next one from an observation captured earlier. By the time
    that chunk is ready the first `frozen` actions of the current one (counted from the new
    observation's step) have been executed, so the new chunk starts with exactly those (real-time
    chunking, RTC: Black, Galliker, Levine 2025)."""

    def chunk_from(
        self,
        steps: Sequence[RawObs],
        actions: Sequence[np.ndarray],
        previous: np.ndarray | None = None,
        frozen: int = 0,
        guide: bool = True,
    ) -> torch.Tensor:
        """A chunk of raw actions (E, T, Da) computed from observations captured earlier.

        steps: raw observations {key: (E, ...)} of consecutive control steps, oldest first, the newest
            last; at most the controller's `io_spec.window` are used (the last ones), fewer at an
            episode's start (the first is then repeated, as `ObsHistory` does).
        actions: actions[i] (E, Da) is the raw action executed between steps[i] and steps[i + 1]
            (len(actions) == len(steps) - 1).
        previous: (E, n, Da) the previous chunk's raw actions re-indexed so that previous[:, 0] is the
            action due at the newest step; None when there is none (then frozen must be 0).
        frozen: d, 0 <= d <= n: how many of those are committed (they execute while this computes).
        guide: whether previous past the frozen ones guides the chunk (inpainting); False: previous is
            only the schedule as it stands (frozen 0), which a planner warm-starts from and a policy
            ignores (the runtime's replace, average and ensemble stitching).

        Returns raw actions (E, T, Da), element 0 due at the newest observation's step, T >= d + 1,
        with out[:, :d] exactly previous[:, :d] (as float32). The call replaces the controller's
        history with `steps` / `actions` (earlier calls' observations do not matter) but may keep
        other state (a planner's warm start). Bad input raises ValueError naming what is wrong; the
        seconds of each model call go into `inference_seconds()`.
        """
        ...


@runtime_checkable
class Previewable(Protocol):
    """A controller that can show what it sees or expects, for evaluation videos; `preview_label`
    captions it ("prediction", "policy input")."""

    preview_label: str

    def preview(self) -> np.ndarray | None:
        """(E, H, W, 3) uint8 for the latest model call (a world model's decoded prediction, or the
        frame a policy read), or None before the first call."""
        ...


@runtime_checkable
class EpisodeRows(Protocol):
    """A batched controller that follows each of its E rows as one episode: a runner (which keeps
    finished episodes' rows in the batch until all of its episodes end) says which rows run."""

    def start_episodes(self, seeds: Sequence[int]) -> None:
        """After `reset`: the E rows' episode seeds (e.g. random draws per episode, whatever the batch)."""
        ...

    def set_active(self, active: np.ndarray) -> None:
        """Before each call: active (E,) bool, the rows whose episodes still run (the others' outputs are
        ignored; what they cost is not counted). `reset` makes every row active again."""
        ...


@runtime_checkable
class AppliedActions(Protocol):
    """A controller whose model reads the actions executed before an observation (a world model with
    past actions): a runner says what was applied, which a task's limits may have clipped, so the model
    is given what the robot did, as in the data it was trained on, not what the controller asked."""

    def applied(self, actions: np.ndarray) -> None:
        """After each `select_action`: actions (E, Da), what each row's robot applied of it (rows that
        sent nothing: the action as asked)."""
        ...


@dataclass(frozen=True)
class Budget:
    """A cap on one `plan` call: planner iterations and/or wall-clock seconds (None: no cap).

    The time cap is checked after each iteration, so a plan always runs at least one iteration and
    may overrun `seconds` by up to one iteration. Iteration caps never raise a planner's own count.
    """

    max_iterations: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        check_budget(self.max_iterations, self.seconds)


def check_budget(iterations: Any, seconds: Any, iterations_name: str = "max_iterations") -> None:
    """`Budget`'s checks, the iteration cap named as the caller's option calls it."""
    if iterations is not None and (not is_whole(iterations) or iterations < 1):  # NaN passed `< 1`
        raise ValueError(f"{iterations_name} must be an integer >= 1 or None, got {iterations!r}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0 or None, got {seconds}")


@dataclass
class PlanResult:
    """One plan for E episodes.

    actions: (E, H, A) within the planner's bounds; cost: (E,) the model's cost of those actions;
    iterations: iterations (or gradient steps) actually run, by the row that searched longest (the
    planners' info["rows_iterations"] (E,) gives each row's); info: planner-specific extras.
    """

    actions: torch.Tensor
    cost: torch.Tensor
    iterations: int
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Planner(Protocol):
    """Minimizes `model.cost` over action sequences of length `horizon`, batched over episodes."""

    horizon: int

    def plan(
        self,
        z0: Latent,
        goal: Latent,
        warm_start: torch.Tensor | None = None,
        budget: Budget | None = None,
        model: PlanningModel | None = None,
    ) -> PlanResult:
        """z0, goal leading (E,); warm_start (E, H, A) or None -> PlanResult with actions (E, H, A).
        `model`, when given, is planned over instead of the model the planner was built with (MPC passes
        a wrapper of that model that fixes the first actions, `policies.mpc.FixedPrefix`)."""
        ...


@runtime_checkable
class RowSeeded(Protocol):
    """A planner that can draw each row's sampling noise from a stream of that row's own: with the
    episodes' seeds given, a row's plans do not depend on which episodes plan beside it (up to the
    model's floating-point rounding, which can depend on the batch size)."""

    def seed_rows(self, seeds: Sequence[int] | None) -> None:
        """One seed (>= 0) per row of the next plans; None: one stream for the whole batch again."""
        ...


def latent_batch_size(z: Latent) -> int:
    """E, the leading dim shared by every tensor of a latent."""
    sizes = {v.shape[0] for v in z.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"latent tensors disagree on the leading dim: { {k: tuple(v.shape) for k, v in z.items()} }"
        )
    return sizes.pop()


def expand_latent(z: Latent, n: int) -> Latent:
    """(E, ...) -> (E, N, ...) views (torch.expand, no copy): one encoding shared by N samples."""
    return {k: v.unsqueeze(1).expand(v.shape[0], n, *v.shape[1:]) for k, v in z.items()}


def detach_latent(z: Latent) -> Latent:
    return {k: v.detach() for k, v in z.items()}


def shift_plan(actions: torch.Tensor, steps: int, fill: Literal["last", "zeros"] = "last") -> torch.Tensor:
    """Warm start for the next replan: drop the `steps` executed steps of a (E, H, A) plan and pad at
    the end to length H with the last step repeated ("last") or with zeros ("zeros")."""
    horizon = actions.shape[1]
    if not 0 <= steps <= horizon:
        raise ValueError(f"cannot shift a plan of horizon {horizon} by {steps} steps")
    kept = actions[:, steps:]  # (E, H - steps, A)
    if fill == "last":
        pad = actions[:, -1:].expand(-1, steps, -1)  # (E, steps, A)
    elif fill == "zeros":
        pad = actions.new_zeros(actions.shape[0], steps, actions.shape[2])
    else:
        raise ValueError(f"fill must be 'last' or 'zeros', got {fill!r}")
    return torch.cat([kept, pad], dim=1)


def check_chunk_request(
    steps: Sequence[RawObs],
    actions: Sequence[np.ndarray],
    previous: np.ndarray | torch.Tensor | None,
    frozen: int,
    action_dim: int,
    keys: Sequence[str] = (),
) -> torch.Tensor | None:
    """Validate a `ChunkController.chunk_from` request (one ValueError line naming what is wrong);
    returns `previous` as a float32 tensor (E, n, Da) (`check_previous`), or None. `keys`: those the
    controller reads, which give the batch size (`batch_of`)."""
    if not steps:
        raise ValueError("chunk_from needs at least one observation in steps")
    if len(actions) != len(steps) - 1:
        raise ValueError(f"{len(actions)} actions for {len(steps)} steps: need one between two steps")
    return check_previous(previous, frozen, batch_of(steps[-1], keys), action_dim)


def batch_of(obs: RawObs, keys: Sequence[str] = ()) -> int:
    """Episodes (E) in a raw observation: the leading size of the first of `keys` (those a controller
    reads) it holds, else of its first value with an axis. Other values are ignored as the controllers
    ignore them: a scalar timestamp first was a TypeError, a task string's length the batch size."""
    for key in [*(k for k in keys if k in obs), *obs]:
        value = obs[key]
        if np.ndim(value) >= 1 and not isinstance(value, str | bytes):
            return len(value)
    raise ValueError(f"no observation value has a batch axis (E, ...): keys {sorted(obs)}")


def check_previous(
    previous: np.ndarray | torch.Tensor | None, frozen: int, batch: int, action_dim: int
) -> torch.Tensor | None:
    """Validate a previous chunk (E, n, Da) and its `frozen` count (one ValueError line naming what is
    wrong); returns it as a float32 tensor on its device (CPU for numpy), or None when it is None."""
    if not is_whole(frozen):  # 1.5 was a TypeError later
        raise ValueError(f"frozen must be a whole number of actions, got {frozen!r}")
    if previous is None:
        if frozen != 0:
            raise ValueError(f"frozen = {frozen} without a previous chunk: nothing to freeze")
        return None
    prev = torch.as_tensor(previous, dtype=torch.float32)
    if prev.ndim != 3 or prev.shape[0] != batch or prev.shape[2] != action_dim:
        raise ValueError(f"previous must be (E, n, Da) = ({batch}, n, {action_dim}), got {tuple(prev.shape)}")
    if not 0 <= frozen <= prev.shape[1]:
        raise ValueError(f"frozen must be in [0, n = {prev.shape[1]}] (previous's length), got {frozen}")
    check_finite(prev, "previous")
    return prev


def with_prefix(chunk: torch.Tensor, previous: torch.Tensor | None, frozen: int) -> torch.Tensor:
    """chunk (E, T, Da) with its first `frozen` actions set exactly to previous[:, :frozen] (a copy)."""
    if previous is None or frozen == 0:
        return chunk
    if chunk.shape[1] <= frozen:
        raise ValueError(f"a chunk of {chunk.shape[1]} actions leaves none after the {frozen} frozen ones")
    out = chunk.clone()
    out[:, :frozen] = previous[:, :frozen].to(out)
    return out


def action_bounds(
    low: float | tuple[float, ...], high: float | tuple[float, ...], action_dim: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension bounds (A,), (A,) on `like`'s device and dtype; scalars are broadcast."""

    def as_tensor(b: float | tuple[float, ...], name: str) -> torch.Tensor:
        t = torch.as_tensor(b, dtype=like.dtype, device=like.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(action_dim)
        if t.numel() != action_dim:
            raise ValueError(f"{name} has {t.numel()} values, the model's action_dim is {action_dim}")
        return t

    return as_tensor(low, "low"), as_tensor(high, "high")


def last_steps(x: torch.Tensor, n: int) -> torch.Tensor:
    """(E, T, ...) -> (E, n, ...): the last n steps of a history, the first one repeated in front when
    T < n (an episode's first steps, padded as training windows are)."""
    if x.shape[1] >= n:
        return x[:, x.shape[1] - n :]
    return torch.cat([x[:, :1].expand(-1, n - x.shape[1], *x.shape[2:]), x], dim=1)
