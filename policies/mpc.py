"""Model-predictive control over a world model: a `Policy` made of a `PlanningModel`, a planner and a goal.

MPC owns its inputs: it keeps the raw observations (and the actions it handed out) in an
`ObsHistory` shaped by the world model's `io_spec` (history frames `frameskip` steps apart, the past
actions between them), so a runner feeds it what the robots return. Each replan encodes the history
once, lets an optional subgoal selector pick what to aim at from that same latent, plans with the
previous plan shifted by the executed steps as warm start, and hands out the first `execute`
planned steps as raw actions. MPC calls only `model.encode` (and the planner only `model.rollout` /
`model.cost`); the caller steps the robot or simulator.

For a real-time runtime, `chunk_from` (`ChunkController`) plans from given observations with the first
raw actions committed: the planner plans over `FixedPrefix`, a wrapper of the model whose rollout
executes those actions whatever a candidate holds there, so every planner respects them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from einops import rearrange

from policies.base import (
    Budget,
    Latent,
    Planner,
    PlanningModel,
    PlanResult,
    RawObs,
    RowSeeded,
    check_chunk_request,
    latent_batch_size,
    shift_plan,
)
from policies.inputs import ObsHistory, check_raw, to_model_inputs
from wm import kernels
from wm.checks import check_finite
from wm.options import check_numbers


class GoalSelector(Protocol):
    """Chooses what each replan aims at (`policies.subgoal.SubgoalSelector`)."""

    def select(self, z0: Latent, goal: Latent, active: np.ndarray | None = None) -> Latent:
        """z0, goal leading (E, ...) -> the goal latent to plan toward, same layout as `goal`; rows not
        `active` (E,) bool (None: all are) keep their goal."""
        ...


@dataclass(frozen=True)
class MPCConfig:
    """How MPC uses its planner.

    execute: k planned steps executed per replan (k <= planner horizon); a planned step holds the
        world model's `frameskip` raw actions, so one replan yields k * frameskip raw actions.
    max_iterations: cap on planner iterations (gradient steps for "gd") per replan; None: the
        planner's own count (a cap never raises it).
    seconds: wall-clock budget per replan, checked after each planner iteration (at least one
        iteration runs, and the last one may overrun); a one-off kernel calibration inside it is not
        counted (`wm.kernels.compute_clock`); None: no time budget.
    warm_start: start each replan from the previous plan shifted by the k executed steps, padded
        with its last step ("last") or zeros ("zeros").
    """

    execute: int = 1
    max_iterations: int | None = None
    seconds: float | None = None
    warm_start: bool = True
    fill: Literal["last", "zeros"] = "last"

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "mpc")  # execute=2.5 was a TypeError at the first replan
        if self.execute < 1:
            raise ValueError(f"execute must be >= 1, got {self.execute}")
        if self.fill not in ("last", "zeros"):
            raise ValueError(f"fill must be 'last' or 'zeros', got {self.fill!r}")
        Budget(self.max_iterations, self.seconds)  # validates both

    @property
    def budget(self) -> Budget | None:
        if self.max_iterations is None and self.seconds is None:
            return None
        return Budget(self.max_iterations, self.seconds)


class FixedPrefix:
    """A `PlanningModel` whose rollout executes the raw actions `prefix` (E, d, Da) first, whatever a
    candidate holds there; `encode`, `cost` and `action_dim` are the wrapped model's. A planner over it
    plans the rest of the sequence given the committed actions (`MPC.chunk_from`)."""

    def __init__(self, model: PlanningModel, prefix: torch.Tensor, frameskip: int) -> None:
        self.model, self.prefix, self.frameskip = model, prefix, frameskip
        self.action_dim = model.action_dim

    def encode(self, obs: dict[str, torch.Tensor]) -> Latent:
        return self.model.encode(obs)

    def rollout(self, z0: Latent, actions: torch.Tensor) -> Latent:
        """z0 leading (E,), actions (E, N, H, f * Da) -> the model's rollout of `fix(actions)`."""
        return self.model.rollout(z0, self.fix(actions))

    def cost(self, pred: Latent, goal: Latent) -> torch.Tensor:
        return self.model.cost(pred, goal)

    def fix(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (E, N, H, f * Da) -> the same with the first d raw actions of every sequence replaced by
        the prefix (differentiable in the others, for gradient planners)."""
        raw = rearrange(actions, "e n h (f d) -> e n (h f) d", f=self.frameskip)
        d = self.prefix.shape[1]
        prefix = self.prefix.to(raw).unsqueeze(1).expand(-1, raw.shape[1], -1, -1)  # (E, N, d, Da)
        raw = torch.cat([prefix, raw[:, :, d:]], dim=2)
        return rearrange(raw, "e n (h f) d -> e n h (f d)", f=self.frameskip)


class MPC:
    """Receding-horizon control for E parallel episodes; satisfies `Policy`, `GoalConditioned`,
    `Previewable`, `ChunkController`, `EpisodeRows` and `AppliedActions`.

    `model` is a `PlanningModel` with an `io_spec` (`wm.spec.IOSpec`): its observation keys, image
    size, history and frameskip. Call `set_goal(goal_obs)` (kept across `reset()`), then
    `select_action(obs)` every control step with raw observations {key: (E, ...)}; actions are raw,
    (E, Da) with Da = io_spec.action_dim. `subgoals`, when given, picks the goal of every replan
    from the replan's own latent (`policies.subgoal.SubgoalSelector`). `last_result` is the last
    `PlanResult`.
    """

    preview_label = "prediction"

    def __init__(
        self,
        model: PlanningModel,
        planner: Planner,
        cfg: MPCConfig | None = None,
        subgoals: GoalSelector | None = None,
        clock: Callable[[], float] = kernels.compute_clock,
    ) -> None:
        self.cfg = cfg = cfg if cfg is not None else MPCConfig()
        self.io = io = model.io_spec  # type: ignore[attr-defined]
        if model.action_dim != io.frameskip * io.action_dim:
            raise ValueError(
                f"model action_dim {model.action_dim} is not frameskip {io.frameskip} x raw {io.action_dim}"
            )
        if cfg.execute > planner.horizon:
            raise ValueError(f"cannot execute {cfg.execute} steps of a horizon-{planner.horizon} plan")
        self.model, self.planner, self.subgoals, self.clock = model, planner, subgoals, clock
        self.device = _device_of(model)
        self.history = ObsHistory(io, self.device)
        self.last_result: PlanResult | None = None
        self._seconds: list[float] = []
        self._goal: Latent | None = None
        self._z0: Latent | None = None  # the latest replan's start latent
        self._warm: torch.Tensor | None = None  # (E, H, A)
        self._queue: torch.Tensor | None = None  # (E, remaining raw steps, Da)
        self._last_action: torch.Tensor | None = None  # (E, Da), executed before the next observation
        self._active: np.ndarray | None = None  # (E,) bool, the rows still running; None: all

    @property
    def needs_replan(self) -> bool:
        """True when the next `select_action` will replan (the queue of the last chunk is empty)."""
        return self._queue is None or self._queue.shape[1] == 0

    @property
    def goal_latent(self) -> Latent | None:
        """The encoded goal every replan aims at (None before `set_goal`)."""
        return self._goal

    def set_goal(self, goal_obs: RawObs) -> None:
        """Encode the goal observations {key: (E, ...)} once; every replan reuses the latent."""
        check_raw(goal_obs, self.io)  # one clear line for a goal from another task or robot
        with torch.no_grad():
            self._goal = self.model.encode(to_model_inputs([goal_obs], self.io, self.device))

    def clear_goal(self) -> None:
        """Forget the goal: replans are refused until `set_goal`."""
        self._goal = None

    def reset(self) -> None:
        """Clear the history, the action queue, the warm start and the timings (the goal stays)."""
        self.history.reset()
        self._warm = self._queue = self._last_action = self._z0 = self._active = None
        self.last_result = None
        self._seconds = []
        if isinstance(self.planner, RowSeeded):
            self.planner.seed_rows(None)

    def start_episodes(self, seeds: Sequence[int]) -> None:
        """Each row's sampling noise from a stream of its episode's own (a `RowSeeded` planner), so an
        episode's plans do not depend on which episodes share its batch; `reset` ends that."""
        if isinstance(self.planner, RowSeeded):
            self.planner.seed_rows(seeds)

    def set_active(self, active: np.ndarray) -> None:
        """The rows still running (E,) bool: finished ones get no subgoal search, nor are counted."""
        active = np.asarray(active, dtype=bool)
        if active.ndim != 1:
            raise ValueError(f"set_active takes one flag per episode (E,), got shape {active.shape}")
        self._active = active

    def inference_seconds(self) -> list[float]:
        """Seconds of every replan (encode + plan) since the last `reset`."""
        return list(self._seconds)

    def predict_action_chunk(self, obs: RawObs) -> torch.Tensor:
        """Record obs and replan -> raw actions (E, k * frameskip, Da). The chunk is assumed executed:
        the next replan warm-starts from this plan shifted by k steps. A world model that reads past
        observations (its window is more than one step) needs those of the steps in between, which a
        chunk call does not see: refused; `select_action` (every step) or `chunk_from` give them."""
        if self.io.window > 1:
            raise ValueError(
                f"MPC.predict_action_chunk: this world model reads {self.io.history} observations "
                f"{self.io.frameskip} control steps apart, and a chunk call sees one observation per chunk; "
                "use select_action every step, or chunk_from with the observations in between"
            )
        self._check_goal()
        self.history.push(obs, self._last_action)
        return self._replan()

    def select_action(self, obs: RawObs) -> torch.Tensor:
        """Record obs; the next raw action (E, Da), replanning only when the last chunk is used up."""
        self._check_goal()  # before recording: a refused call leaves no step in the history
        self.history.push(obs, self._last_action)
        if self.needs_replan:
            self._queue = self._replan()
        action, self._queue = self._queue[:, 0], self._queue[:, 1:]
        self._last_action = action
        return action

    def applied(self, actions: np.ndarray) -> None:
        """`AppliedActions.applied`: the next observation's past action is (E, Da) `actions`, what the
        robot applied of the last `select_action`."""
        if self._last_action is None:
            raise RuntimeError("MPC.applied: no select_action since reset to have been applied")
        raw = np.asarray(actions)
        if raw.dtype.kind not in "biuf":  # (torch's TypeError listed every dtype it takes)
            raise ValueError(f"MPC.applied: actions must be numbers, got an array of {raw.dtype}")
        got = torch.as_tensor(raw, dtype=self._last_action.dtype)
        check_finite(got, "MPC.applied's actions")  # (the next plan would start from a NaN past action)
        if got.shape != self._last_action.shape:
            raise ValueError(
                f"MPC.applied: actions of shape {tuple(got.shape)}, the last select_action gave "
                f"{tuple(self._last_action.shape)}"
            )
        self._last_action = got.to(self._last_action.device)

    def chunk_from(
        self,
        steps: Sequence[RawObs],
        actions: Sequence[np.ndarray],
        previous: np.ndarray | None = None,
        frozen: int = 0,
        guide: bool = True,
    ) -> torch.Tensor:
        """`ChunkController.chunk_from`: refill the history with steps / actions and plan toward the goal
        (subgoals as in every replan) with the first `frozen` raw actions of every candidate fixed to
        previous[:, :frozen] (`FixedPrefix`). Warm start (when `cfg.warm_start`): `previous` packed into
        planning steps and padded to the horizon with its last step (with or without `guide`: the
        schedule from the newest step on, which is the last plan shifted by the steps actually run),
        else MPC's own (the last plan shifted by `execute` steps, as after `predict_action_chunk`).
        Returns the whole plan as raw actions (E, H * frameskip, Da), the first `frozen` exactly
        previous's."""
        prev = check_chunk_request(steps, actions, previous, frozen, self.io.action_dim, self.io.obs_keys)
        self._check_goal()
        f = self.io.frameskip
        if frozen >= self.planner.horizon * f:
            raise ValueError(
                f"{frozen} frozen actions leave none to plan in a horizon of {self.planner.horizon} x {f}"
            )
        self.history.refill(steps, actions)
        own = prev is None or prev.shape[1] == 0 or not self.cfg.warm_start
        warm = self._warm if own else self._warm_from(prev)
        result = self._plan(warm, FixedPrefix(self.model, prev[:, :frozen], f) if frozen else None)
        return rearrange(result.actions, "e h (f d) -> e (h f) d", f=f)

    def _check_goal(self) -> None:
        if self._goal is None:
            raise RuntimeError("MPC has no goal: call set_goal(goal_obs) first")

    def _replan(self) -> torch.Tensor:
        k = self.cfg.execute
        if k > self.planner.horizon:  # a planner swapped in since __init__
            raise ValueError(f"cannot execute {k} steps of a horizon-{self.planner.horizon} plan")
        result = self._plan(self._warm)
        return rearrange(result.actions[:, :k], "e k (f d) -> e (k f) d", f=self.io.frameskip)

    def _plan(self, warm: torch.Tensor | None, fixed: FixedPrefix | None = None) -> PlanResult:
        """Encode the history, pick the goal and plan from `warm` (E, H, A) (over `fixed` when given,
        the plan's prefix then set to it); keeps the timing, the result and the next warm start."""
        self._check_goal()
        start = self.clock()
        with torch.no_grad():
            z0 = self.model.encode(self.history.inputs())  # leading (E,), encoded once per replan
        E = latent_batch_size(z0)
        if latent_batch_size(self._goal) != E or (warm is not None and warm.shape[0] != E):
            raise ValueError(
                f"{E} episodes in obs but the goal or warm start has another count; reset()/set_goal()"
            )
        if self._active is not None and self._active.shape != (E,):
            raise ValueError(f"set_active got {self._active.shape[0]} rows' flags for {E} episodes")
        if warm is not None and warm.shape[1] != self.planner.horizon:  # the horizon changed: cut or pad
            warm = self._fit_horizon(warm)
        goal = self._goal if self.subgoals is None else self.subgoals.select(z0, self._goal, self._active)
        if fixed is None:  # `model` only when needed: a planner that predates it still serves replans
            result = self.planner.plan(z0, goal, warm, self.cfg.budget)  # actions (E, H, A)
        else:
            result = self.planner.plan(z0, goal, warm, self.cfg.budget, model=fixed)
            result.actions = fixed.fix(result.actions.unsqueeze(1)).squeeze(1)
        self._seconds.append(self.clock() - start)
        self._check_cost(result.cost)
        self.last_result, self._z0 = result, z0
        self._warm = (
            shift_plan(result.actions, self.cfg.execute, self.cfg.fill) if self.cfg.warm_start else None
        )
        return result

    def _check_cost(self, cost: torch.Tensor) -> None:
        """A running episode whose every scored plan cost NaN or inf has no plan: the planner's fallback (the
        middle of the action box, or the warm start) drove the robot as if planned, and no finite action
        check could catch it. Refused (a worker counts an inference error; the robot holds)."""
        bad = ~cost.detach().isfinite().cpu().numpy()  # (E,)
        if self._active is not None:
            bad &= self._active
        if bad.any():
            rows = np.flatnonzero(bad).tolist()
            raise ValueError(
                f"the world model gave no finite cost for episode(s) {rows}: no plan (NaN or inf in its "
                "rollout or cost; check the checkpoint, or plan in fp32: precision=fp32)"
            )

    def _warm_from(self, previous: torch.Tensor) -> torch.Tensor:
        """previous raw (E, n, Da), n >= 1 -> a warm start (E, H, f * Da): packed into planning steps (the
        last raw action repeated to fill the last step), cut or padded to the horizon with its last step."""
        f, n = self.io.frameskip, previous.shape[1]
        raw = torch.cat([previous, previous[:, -1:].expand(-1, -n % f, -1)], dim=1)  # (E, ceil(n/f) f, Da)
        return self._fit_horizon(rearrange(raw, "e (h f) d -> e h (f d)", f=f))

    def _fit_horizon(self, plan: torch.Tensor) -> torch.Tensor:
        """plan (E, h, A), h >= 1 -> (E, H, A) for the planner's horizon H: cut, or padded with its last
        step."""
        H = self.planner.horizon
        plan = plan[:, :H]
        return torch.cat([plan, plan[:, -1:].expand(-1, H - plan.shape[1], -1)], dim=1)

    @torch.no_grad()
    def preview(self) -> np.ndarray | None:
        """The world model's decoded prediction after the first planned step of the latest replan,
        (E, H, W, 3) uint8; None before the first replan or for a model that cannot decode."""
        decode: Any = getattr(self.model, "decode", None)
        if self.last_result is None or self._z0 is None or decode is None:
            return None
        pred = self.model.rollout(self._z0, self.last_result.actions[:, None, :1])  # leading (E, 1, 1)
        img = decode({k: v[:, 0, 0] for k, v in pred.items()})  # (E, 3, H, W)
        return (img.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _device_of(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")
