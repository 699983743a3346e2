"""Model-predictive control over a world model: a `Policy` made of a `PlanningModel`, a planner and a goal.

Each replan encodes the current observation once, plans from it with the previous plan shifted by
the executed steps as warm start, and hands out the first `execute` planned steps as raw actions.
Nothing is replayed from t=0 and no simulator is involved: MPC only calls `model.encode` (and the
planner only `model.rollout` / `model.cost`); the caller steps the environment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange

from policies.base import Budget, Latent, Planner, PlanningModel, PlanResult, latent_batch_size, shift_plan


@dataclass(frozen=True)
class MPCConfig:
    """How MPC uses its planner.

    execute: k planned steps executed per replan (k <= planner horizon).
    frameskip: f raw actions per planned step; a planned step of dim A holds f raw actions of
        dim A // f (concatenated in time order), so one replan yields k * f raw actions.
    max_iterations: cap on planner iterations (gradient steps for "gd") per replan; None: the
        planner's own count.
    seconds: wall-clock budget per replan, checked after each planner iteration (at least one
        iteration runs, and the last one may overrun); None: no time budget.
    warm_start: start each replan from the previous plan shifted by the k executed steps, padded
        with its last step ("last") or zeros ("zeros").
    """

    execute: int = 1
    frameskip: int = 1
    max_iterations: int | None = None
    seconds: float | None = None
    warm_start: bool = True
    fill: Literal["last", "zeros"] = "last"

    def __post_init__(self) -> None:
        if self.execute < 1 or self.frameskip < 1:
            raise ValueError(f"execute and frameskip must be >= 1, got {self.execute}, {self.frameskip}")
        if self.fill not in ("last", "zeros"):
            raise ValueError(f"fill must be 'last' or 'zeros', got {self.fill!r}")
        Budget(self.max_iterations, self.seconds)  # validates both

    @property
    def budget(self) -> Budget | None:
        if self.max_iterations is None and self.seconds is None:
            return None
        return Budget(self.max_iterations, self.seconds)


class MPC:
    """Receding-horizon control for E parallel episodes; satisfies `Policy`.

    Call `set_goal(goal_obs)` (kept across `reset()`), then `select_action(obs)` every control step.
    obs / goal_obs values are (E, To, ...) as the model's `encode` expects; actions are (E, Da) with
    Da = model.action_dim // frameskip. `plan_seconds` lists the time of every replan (encode + plan)
    since construction; `last_result` is the last `PlanResult`.
    """

    def __init__(
        self,
        model: PlanningModel,
        planner: Planner,
        cfg: MPCConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg = cfg if cfg is not None else MPCConfig()
        if model.action_dim % cfg.frameskip:
            raise ValueError(
                f"model action_dim {model.action_dim} is not a multiple of frameskip {cfg.frameskip}"
            )
        if cfg.execute > planner.horizon:
            raise ValueError(f"cannot execute {cfg.execute} steps of a horizon-{planner.horizon} plan")
        self.model, self.planner, self.clock = model, planner, clock
        self.raw_dim = model.action_dim // cfg.frameskip
        self.plan_seconds: list[float] = []
        self.last_result: PlanResult | None = None
        self._goal: Latent | None = None
        self._warm: torch.Tensor | None = None  # (E, H, A)
        self._queue: torch.Tensor | None = None  # (E, remaining raw steps, Da)

    @property
    def last_plan_seconds(self) -> float | None:
        return self.plan_seconds[-1] if self.plan_seconds else None

    @property
    def needs_replan(self) -> bool:
        """True when the next `select_action` will replan (the queue of the last chunk is empty)."""
        return self._queue is None or self._queue.shape[1] == 0

    @property
    def goal_latent(self) -> Latent | None:
        """The encoded goal every replan aims at (None before `set_goal`)."""
        return self._goal

    @goal_latent.setter
    def goal_latent(self, goal: Latent) -> None:
        """Aim the next replans at an already-encoded goal (a subgoal, say), leading dims (E, To)."""
        self._goal = goal

    def set_goal(self, goal_obs: dict[str, torch.Tensor]) -> None:
        """Encode the goal observations (E, To, ...) once; every replan reuses the latent."""
        with torch.no_grad():
            self._goal = self.model.encode(goal_obs)

    def reset(self) -> None:
        """Clear the action queue and the warm start (the goal stays)."""
        self._warm, self._queue = None, None

    def predict_action_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replan from obs (E, To, ...) -> raw actions (E, k * f, Da). The chunk is assumed executed:
        the next replan warm-starts from this plan shifted by k steps."""
        if self._goal is None:
            raise RuntimeError("MPC has no goal: call set_goal(goal_obs) first")
        start = self.clock()
        with torch.no_grad():
            z0 = self.model.encode(obs)  # leading (E,)
        E, k = latent_batch_size(z0), self.cfg.execute
        if latent_batch_size(self._goal) != E or (self._warm is not None and self._warm.shape[0] != E):
            raise ValueError(
                f"{E} episodes in obs but the goal or warm start has another count; reset()/set_goal()"
            )
        result = self.planner.plan(z0, self._goal, self._warm, self.cfg.budget)  # actions (E, H, A)
        self.plan_seconds.append(self.clock() - start)
        self.last_result = result
        self._warm = shift_plan(result.actions, k, self.cfg.fill) if self.cfg.warm_start else None
        return rearrange(result.actions[:, :k], "e k (f d) -> e (k f) d", f=self.cfg.frameskip)

    def select_action(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The next raw action (E, Da); replans (from obs) only when the queue of the last chunk is empty."""
        if self.needs_replan:
            self._queue = self.predict_action_chunk(obs)
        action, self._queue = self._queue[:, 0], self._queue[:, 1:]
        return action
