"""Planners over a `PlanningModel`: CEM, MPPI, gradient descent, and CEM refined by gradient descent.

Every planner plans for E episodes at once: each iteration is ONE `model.rollout` call on actions
(E, N, H, A) from the start latents z0 (leading E), which the model broadcasts over the N samples,
so nothing is encoded per sample (planners never call `encode` at all, nor any simulator). Actions
stay within per-dimension bounds [low, high]: samples and means are clamped, gradient steps are
projected back. Planners search in the box mapped to [-1, 1] per dimension (a dimension without
finite bounds stays as it is), so their spreads and step sizes (`init_std`, `min_std`, `max_std`,
`lr`, `restart_std`) mean the same on every task: 1 is the box's half-width, whether the actions are
pixels (PushT, 0..512), metres (an end-effector delta of 0.03) or joint degrees; the model and the
caller only ever see actions in their own units. The device and dtype come from z0; randomness from
a seeded `torch.Generator`: one for the batch, or, after `seed_rows(seeds)` (`RowSeeded`, which MPC
calls with its episodes' seeds), one per row seeded from the planner's seed and the row's, so that an
episode draws the same noise whichever episodes share its batch. `stop_cost` is per row: a row whose
best cost reaches it stops searching while the others search on, so it ends as it would alone, and
returns the sample that reached it (with `return_best=False` too: the Gaussian refitted after it was
never scored); a time budget still couples the rows (they stop together).
`warm_start` (E, H, A), usually the previous plan shifted by the executed steps (MPC does the
shifting, see `base.shift_plan`), replaces the initial mean (CEM, MPPI) or initial iterate (GD).
A `plan` call may pass another `model` to plan over (same `action_dim`), e.g. MPC's `FixedPrefix`
wrapper of the planner's own model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
from einops import einsum, repeat

from policies.base import (
    Budget,
    Latent,
    PlanningModel,
    PlanResult,
    action_bounds,
    detach_latent,
    latent_batch_size,
)
from wm import kernels
from wm.options import is_whole
from wm.seeding import derived_torch_seed

Bound = float | tuple[float, ...]
Clock = Callable[[], float]


@dataclass(frozen=True)
class _PlannerConfig:
    horizon: int = 5
    low: Bound = -1.0  # per action dim, or one float for all; -inf/inf for an unbounded dim
    high: Bound = 1.0
    seed: int | None = 0  # None: a fresh random seed per planner
    stop_cost: float | None = None  # an episode stops searching once its best cost is <= this

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            b = getattr(self, name)
            b = (
                float(b)
                if isinstance(b, (int, float))
                else tuple(float(x) for x in torch.as_tensor(b, dtype=torch.float64).reshape(-1))
            )
            object.__setattr__(self, name, b)  # normalize lists/tensors to hashable floats/tuples
        low, high = torch.as_tensor(self.low), torch.as_tensor(self.high)
        if low.numel() > 1 and high.numel() > 1 and low.numel() != high.numel():
            raise ValueError(f"low has {low.numel()} values and high {high.numel()}")
        if not bool((low < high).all()):
            raise ValueError(f"need low < high in every dim, got low={self.low} high={self.high}")
        _check_count("horizon", self.horizon)
        if self.stop_cost is not None and math.isnan(self.stop_cost):
            raise ValueError("stop_cost must be a number or None, got nan")


@dataclass(frozen=True)
class _SamplingConfig(_PlannerConfig):
    samples: int = 300  # N per episode
    iterations: int = 30
    init_std: float = 1.0  # in half-widths of the action box (module docstring)
    warm_std: float | None = None  # initial std when warm-started (a narrower search); None: init_std
    min_std: float = 0.05
    max_std: float = 2.0
    include_mean: bool = True  # sample 0 of each iteration is the current mean (scores the warm start)
    return_best: bool = False  # return the best sample seen instead of the final mean

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("samples", self.samples)
        _check_count("iterations", self.iterations)
        for name in ("init_std", "warm_std"):  # inf: inf * 0 noise is a NaN sample
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        warm_ok = self.warm_std is None or self.warm_std > 0
        if not 0 <= self.min_std <= self.max_std or not self.init_std > 0 or not warm_ok:
            raise ValueError(f"need init_std, warm_std > 0 and 0 <= min_std <= max_std, got {self}")
        for name in ("init_std", "warm_std"):  # the first iteration samples at it, unclamped
            value = getattr(self, name)
            if value is not None and not self.min_std <= value <= self.max_std:
                raise ValueError(
                    f"{name} {value} is outside min_std..max_std ({self.min_std}..{self.max_std}), the floor "
                    "and ceiling of the sampling spread"
                )
        if self.include_mean and self.samples < 2:  # (the mean overwrote the only sample)
            raise ValueError("samples must be >= 2 with include_mean (sample 0 is the mean: no search)")

    @property
    def max_iterations(self) -> int:
        """The most iterations a plan runs; a `Budget` can only lower it."""
        return self.iterations


@dataclass(frozen=True)
class CEMConfig(_SamplingConfig):
    """Cross-entropy method; DINO-WM's PushT setting by default (H 5, 300 samples, 30 elites, 30 iters)."""

    name: ClassVar[str] = "cem"
    elites: int = 30
    momentum: float = 0.0  # mean/std <- momentum * old + (1 - momentum) * elite fit (V-JEPA 2-AC)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("elites", self.elites)
        if not 1 <= self.elites <= self.samples:
            raise ValueError(f"need 1 <= elites <= samples, got {self.elites} of {self.samples}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class MPPIConfig(_SamplingConfig):
    """MPPI with TD-MPC2's elite refit: weights exp(-cost / temperature) over the top-`elites` samples
    (None: all). TD-MPC2 multiplies its (reward) scores by its temperature: this one divides, so a larger
    temperature here flattens the weights."""

    name: ClassVar[str] = "mppi"
    samples: int = 512
    iterations: int = 6
    temperature: float = 0.5
    elites: int | None = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.elites is not None:
            _check_count("elites", self.elites)
        if self.elites is not None and not 1 <= self.elites <= self.samples:
            raise ValueError(f"need 1 <= elites <= samples, got {self.elites} of {self.samples}")
        if not 0 < self.temperature < math.inf:  # inf: -inf / inf is a NaN weight
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")


@dataclass(frozen=True)
class GradConfig(_PlannerConfig):
    """Adam on the action sequence through the differentiable rollout, projected onto the bounds."""

    name: ClassVar[str] = "gd"
    steps: int = 100
    lr: float = 0.1
    init: Literal["zeros", "warm"] = "warm"  # "warm": start from warm_start when given, else zeros
    restarts: int = 1  # sequences per episode; restart 0 starts at the init, others at init + noise
    restart_std: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("steps", self.steps)  # a step count that is not an int never equals the step
        _check_count("restarts", self.restarts)
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be finite and > 0, got {self.lr}")
        if not 0 <= self.restart_std < math.inf:
            raise ValueError(f"restart_std must be finite and >= 0, got {self.restart_std}")
        if self.init not in ("zeros", "warm"):
            raise ValueError(f"init must be 'zeros' or 'warm', got {self.init!r}")

    @property
    def max_iterations(self) -> int:
        """The most gradient steps a plan runs; a `Budget` can only lower it."""
        return self.steps


@dataclass(frozen=True)
class CEMThenGradConfig:
    """CEM, then gradient refinement starting from the CEM plan. A time budget is split by `time_share`;
    an iteration budget caps each stage separately."""

    name: ClassVar[str] = "cem_gd"
    cem: CEMConfig = field(default_factory=CEMConfig)
    grad: GradConfig = field(default_factory=lambda: GradConfig(steps=30))
    time_share: float = 0.5  # fraction of a time budget given to CEM

    def __post_init__(self) -> None:
        if (self.cem.horizon, self.cem.low, self.cem.high) != (
            self.grad.horizon,
            self.grad.low,
            self.grad.high,
        ):
            raise ValueError("cem and grad must share horizon and bounds")
        if self.grad.init != "warm":
            raise ValueError("grad.init must be 'warm' so that the gradient stage starts from the CEM plan")
        if not 0 < self.time_share < 1:
            raise ValueError(f"time_share must be in (0, 1), got {self.time_share}")

    @property
    def max_iterations(self) -> int:
        """An iteration budget caps each stage; the longer stage's count is the most it can cap."""
        return max(self.cem.iterations, self.grad.steps)


def _check_count(name: str, value: Any) -> None:
    """A count option (horizon, samples, ...) must be an int >= 1: NaN, inf or 2.5 ran forever or failed
    deep in torch."""
    if not is_whole(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


PlannerConfig = CEMConfig | MPPIConfig | GradConfig | CEMThenGradConfig


class _Planner:
    """Shared plumbing: bounds, initial plan, generators, budget."""

    def __init__(self, model: PlanningModel, cfg: Any, clock: Clock = kernels.compute_clock) -> None:
        self.model, self.cfg, self.clock = model, cfg, clock
        self.horizon: int = cfg.horizon
        self._gen: torch.Generator | None = None
        self._row_seeds: tuple[int, ...] | None = None
        self._row_gens: list[torch.Generator] = []

    def seed_rows(self, seeds: Sequence[int] | None) -> None:
        """`RowSeeded.seed_rows`: row e's noise from a generator seeded from (cfg.seed, seeds[e]) (a fresh
        random seed instead where cfg.seed is None); None: the batch's generator."""
        if seeds is not None:
            seeds = tuple(int(s) for s in seeds)
            if any(s < 0 for s in seeds):
                raise ValueError(f"row seeds must be >= 0, got {list(seeds)}")
        self._row_seeds, self._row_gens = seeds, []

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor, rows: torch.Tensor | None = None):
        """Standard normal noise of shape (E, ...) like `like`: row e from its own generator when the rows
        are seeded (`seed_rows`), else all from the batch's. `rows` (E,) bool: with seeded rows, only
        those draw (the others get zeros and their streams stay where they are, as they would alone)."""
        if self._row_seeds is None:
            return torch.randn(shape, generator=self._gen, device=like.device, dtype=like.dtype)
        if len(self._row_seeds) != shape[0]:
            raise ValueError(f"{len(self._row_seeds)} row seeds for a batch of {shape[0]} episodes")
        if shape[0] == 0:
            return torch.empty(shape, device=like.device, dtype=like.dtype)
        if not self._row_gens or self._row_gens[0].device != like.device:
            self._row_gens = [self._row_generator(s, like.device) for s in self._row_seeds]
        kw = dict(device=like.device, dtype=like.dtype)
        drawing = [True] * shape[0] if rows is None else rows.tolist()
        noise = [
            torch.randn(shape[1:], generator=g, **kw) if d else torch.zeros(shape[1:], **kw)
            for g, d in zip(self._row_gens, drawing, strict=True)
        ]
        return torch.stack(noise)  # (E, ...)

    def _row_generator(self, seed: int, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.cfg.seed is None:
            gen.seed()
        else:
            gen.manual_seed(derived_torch_seed(self.cfg.seed, seed))
        return gen

    def _setup(self, z0: Latent, warm_start: torch.Tensor | None, use_warm: bool = True):
        """-> E, bounds (A,), (A,), initial plan (E, H, A), all on z0's device, the bounds and the plan in
        the searched space (`_raw` maps a plan back to action units); the batch's generator made."""
        ref = next(iter(z0.values()))
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        like = torch.empty(0, device=ref.device, dtype=dtype)
        E, H, A = latent_batch_size(z0), self.cfg.horizon, self.model.action_dim
        low, high = action_bounds(self.cfg.low, self.cfg.high, A, like)
        boxed = low.isfinite() & high.isfinite()
        self._box = (low, high)  # in action units
        # (halved first: bounds near the dtype's largest value overflowed to inf, and the plan was NaN)
        self._center = torch.where(boxed, low / 2 + high / 2, torch.zeros_like(low))  # (A,)
        self._scale = torch.where(boxed, high / 2 - low / 2, torch.ones_like(low))  # (A,)
        low, high = self._searched(low), self._searched(high)  # -1 / 1 where bounded
        if warm_start is not None and use_warm:
            if tuple(warm_start.shape) != (E, H, A):
                raise ValueError(f"warm_start must be {(E, H, A)}, got {tuple(warm_start.shape)}")
            if not bool(warm_start.isfinite().all()):  # a NaN would be the plan (its samples score NaN)
                raise ValueError("warm_start has non-finite values (NaN or inf)")
            init = self._searched(warm_start.detach().to(like)).clamp(low, high)
        else:  # the middle of the box where it is bounded, else zero
            init = repeat(torch.zeros_like(low).clamp(low, high), "a -> e h a", e=E, h=H).clone()
        if self._gen is None or self._gen.device != ref.device:
            self._gen = torch.Generator(device=ref.device)
            if self.cfg.seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(self.cfg.seed)
        return E, low, high, init

    def _searched(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions (..., A) in action units -> the searched space ([-1, 1] over a bounded dim)."""
        return (actions - self._center) / self._scale

    def _raw(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions (..., A) in the searched space -> action units (what the model and the caller see),
        within the bounds exactly (the mapping's rounding never steps past them)."""
        return (self._center + self._scale * actions).clamp(*self._box)

    def _limit(self, n: int, budget: Budget | None) -> int:
        return n if budget is None or budget.max_iterations is None else min(n, budget.max_iterations)

    def _out_of_time(self, start: float, budget: Budget | None) -> bool:
        return budget is not None and budget.seconds is not None and self.clock() - start >= budget.seconds

    def _searching(self, best_cost: torch.Tensor) -> torch.Tensor:
        """best_cost (E,) -> (E,) True for the rows still searching: all of them without a `stop_cost`."""
        if self.cfg.stop_cost is None:
            return torch.ones_like(best_cost, dtype=torch.bool)
        return ~(best_cost <= self.cfg.stop_cost)


class CEM(_Planner):
    """Cross-entropy method: sample around a Gaussian, score, refit it to the elites."""

    cfg: CEMConfig

    @torch.no_grad()
    def plan(
        self,
        z0: Latent,
        goal: Latent,
        warm_start: torch.Tensor | None = None,
        budget: Budget | None = None,
        model: PlanningModel | None = None,
    ) -> PlanResult:
        """z0, goal leading (E,); warm_start (E, H, A) -> actions (E, H, A), cost (E,); over `model`
        when given, else the planner's own."""
        start, cfg, model = self.clock(), self.cfg, self.model if model is None else model
        z0, goal = detach_latent(z0), detach_latent(goal)
        E, low, high, mean = self._setup(z0, warm_start)  # mean (E, H, A)
        warm = warm_start is not None and cfg.warm_std is not None
        std = torch.full_like(mean, cfg.warm_std if warm else cfg.init_std)  # (E, H, A)
        best_cost = mean.new_full((E,), float("inf"))
        best_actions = mean.clone()
        episodes = torch.arange(E, device=mean.device)
        shape = (E, cfg.samples, *mean.shape[1:])  # (E, N, H, A)
        searching = torch.ones(E, dtype=torch.bool, device=mean.device)  # (E,) not yet at stop_cost
        rows_iterations = torch.zeros(E, dtype=torch.long, device=mean.device)  # (E,)
        iterations = 0
        while iterations < self._limit(cfg.iterations, budget):
            iterations += 1
            rows_iterations += searching
            # --- sample: N sequences per episode around the mean, clamped to the bounds
            noise = self._noise(shape, mean, searching)
            actions = (mean.unsqueeze(1) + std.unsqueeze(1) * noise).clamp(low, high)  # (E, N, H, A)
            if cfg.include_mean:
                actions[:, 0] = mean
            # --- score: one batched rollout for every episode and sample
            costs = _finite(model.cost(model.rollout(z0, self._raw(actions)), goal))  # (E, N)
            it_cost, it_idx = costs.min(dim=1)  # (E,), (E,)
            improved = (it_cost < best_cost) & searching
            best_cost = torch.where(improved, it_cost, best_cost)
            best_actions = torch.where(improved[:, None, None], actions[episodes, it_idx], best_actions)
            # --- refit: the Gaussian to the elites (mean clamped into the bounds, std floored); a row
            # that has stopped keeps its own
            new_mean, new_std = self._refit(actions, costs, mean, std)
            new_mean, new_std = new_mean.clamp(low, high), new_std.clamp(cfg.min_std, cfg.max_std)
            mean = torch.where(searching[:, None, None], new_mean, mean)
            std = torch.where(searching[:, None, None], new_std, std)
            searching &= self._searching(best_cost)
            if not bool(searching.any()) or self._out_of_time(start, budget):
                break
        counts = (iterations, rows_iterations)
        return self._result(model, z0, goal, mean, std, best_actions, best_cost, counts)

    def _refit(self, actions: torch.Tensor, costs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        """costs (E, N), +inf where the model gave no finite cost; an episode without any keeps its
        Gaussian (refitting it to unscored samples would be a random walk)."""
        m = self.cfg.momentum
        _, idx = costs.topk(self.cfg.elites, dim=1, largest=False)  # (E, K)
        elites = _gather(actions, idx)  # (E, K, H, A)
        new_mean, new_std = elites.mean(dim=1), elites.std(dim=1, unbiased=False)  # (E, H, A)
        return _keep_unscored(costs, mean, std, m * mean + (1 - m) * new_mean, m * std + (1 - m) * new_std)

    def _result(self, model, z0, goal, mean, std, best_actions, best_cost, counts) -> PlanResult:
        """counts: (iterations run, (E,) iterations each row searched)."""
        mean, best_actions, std = self._raw(mean), self._raw(best_actions), std * self._scale  # action units
        iterations, rows_iterations = counts
        info = {"mean": mean, "std": std, "best_actions": best_actions, "best_cost": best_cost}
        info["rows_iterations"] = rows_iterations
        if self.cfg.return_best:
            return PlanResult(best_actions, best_cost, iterations, info)
        # the refitted mean has not been scored yet: one more rollout, N = 1; a row that reached
        # stop_cost returns the sample that did, a row whose mean the model gave no finite cost (NaN,
        # -inf) its best scored sample
        cost = _finite(model.cost(model.rollout(z0, mean.unsqueeze(1)), goal)[:, 0])  # (E,)
        take = ~self._searching(best_cost) | (cost.isinf() & best_cost.isfinite())  # (E,)
        actions = torch.where(take[:, None, None], best_actions, mean)
        return PlanResult(actions, torch.where(take, best_cost, cost), iterations, info)


class MPPI(CEM):
    """MPPI: the loop of CEM, refit by exp(-cost / temperature) weights over the elites (`MPPIConfig`)."""

    cfg: MPPIConfig

    def _refit(self, actions: torch.Tensor, costs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        k = self.cfg.elites or costs.shape[1]
        elite_cost, idx = costs.topk(k, dim=1, largest=False)  # (E, K)
        elites = _gather(actions, idx)  # (E, K, H, A)
        # by the costs above each row's best (elite_cost is sorted): the same weights as exp(-cost / T) in
        # exact arithmetic, and finite where cost / T alone overflows (huge costs, a small temperature).
        # A sample without a finite cost (+inf) weighs 0; a row with none (NaN) is kept below
        w = torch.softmax(-(elite_cost - elite_cost[:, :1]) / self.cfg.temperature, dim=1)  # (E, K)
        w = w.nan_to_num(nan=0.0)
        new_mean = einsum(w, elites, "e k, e k h a -> e h a")
        var = einsum(w, (elites - new_mean.unsqueeze(1)) ** 2, "e k, e k h a -> e h a")
        return _keep_unscored(costs, mean, std, new_mean, var.sqrt())


class GradientPlanner(_Planner):
    """Adam on (E, R, H, A) action sequences (R restarts per episode) through `model.rollout`."""

    cfg: GradConfig

    def plan(
        self,
        z0: Latent,
        goal: Latent,
        warm_start: torch.Tensor | None = None,
        budget: Budget | None = None,
        model: PlanningModel | None = None,
    ) -> PlanResult:
        """z0, goal leading (E,); warm_start (E, H, A) -> actions (E, H, A), cost (E,); over `model`
        when given, else the planner's own."""
        # A caller under inference mode (the deploy runtime's worker) would leave nothing to
        # differentiate: the search runs on plain copies, with autograd on
        with torch.inference_mode(False), torch.enable_grad():
            return self._plan(z0, goal, warm_start, budget, model)

    def _plan(self, z0, goal, warm_start, budget, model) -> PlanResult:
        start, cfg, model = self.clock(), self.cfg, self.model if model is None else model
        z0, goal = _plain(z0), _plain(goal)
        warm_start = None if warm_start is None else warm_start.detach().clone()
        E, low, high, init = self._setup(z0, warm_start, use_warm=cfg.init == "warm")
        actions = repeat(init, "e h a -> e r h a", r=cfg.restarts).clone()  # (E, R, H, A)
        noise = self._noise(actions[:, 1:].shape, init)
        actions[:, 1:] = (actions[:, 1:] + cfg.restart_std * noise).clamp(low, high)
        actions.requires_grad_(True)
        opt = torch.optim.Adam([actions], lr=cfg.lr)
        best_cost = init.new_full((E,), float("inf"))
        best_actions = init.clone()
        episodes = torch.arange(E, device=init.device)
        searching = torch.ones(E, dtype=torch.bool, device=init.device)  # (E,) not yet at stop_cost
        rows_steps = torch.zeros(E, dtype=torch.long, device=init.device)  # (E,)
        limit, step = self._limit(cfg.steps, budget), 0
        while True:
            # --- score: one batched rollout, sequences are independent so one summed loss suffices
            # (unclamped: the iterate is already projected, and a clamp would stop the gradient of a
            # value its mapping rounds a hair past a bound)
            costs = model.cost(model.rollout(z0, self._center + self._scale * actions), goal)  # (E, R)
            c, r = _finite(costs.detach()).min(dim=1)  # (E,)
            improved = (c < best_cost) & searching
            best_cost = torch.where(improved, c, best_cost)
            best_actions = torch.where(improved[:, None, None], actions.detach()[episodes, r], best_actions)
            searching &= self._searching(best_cost)
            stop = not bool(searching.any()) or (step > 0 and self._out_of_time(start, budget))
            if step == limit or stop:
                break
            # --- refit: one Adam step, projected back onto the bounds (model parameters get no .grad);
            # a row that has stopped keeps its sequences
            # a sequence whose cost is NaN (a bf16 overflow in part of the box) has a NaN gradient: it
            # stays where it is (Adam and clamp_ kept the NaN, and the next rollout refused NaN actions,
            # failing the whole replan for the other restarts)
            (grad,) = torch.autograd.grad(costs.sum(), [actions])
            actions.grad = torch.where(grad.isfinite(), grad, torch.zeros_like(grad))
            before = actions.detach().clone()
            opt.step()
            with torch.no_grad():
                actions.clamp_(low, high)
                moved = searching[:, None, None, None] & actions.isfinite()
                actions.copy_(torch.where(moved, actions, before))
            rows_steps += searching
            step += 1
        info = {"final": self._raw(actions.detach()), "rows_iterations": rows_steps}
        return PlanResult(self._raw(best_actions), best_cost, step, info)


class CEMThenGradient:
    """CEM for a global guess, then gradient steps from CEM's best plan (its mean, or the best sample
    when that scored better); returns the best plan seen."""

    def __init__(
        self, model: PlanningModel, cfg: CEMThenGradConfig, clock: Clock = kernels.compute_clock
    ) -> None:
        self.cfg, self.clock, self.horizon = cfg, clock, cfg.cem.horizon
        self.cem, self.grad = CEM(model, cfg.cem, clock), GradientPlanner(model, cfg.grad, clock)

    def seed_rows(self, seeds: Sequence[int] | None) -> None:
        """`RowSeeded.seed_rows` for both stages."""
        self.cem.seed_rows(seeds)
        self.grad.seed_rows(seeds)

    def plan(
        self,
        z0: Latent,
        goal: Latent,
        warm_start: torch.Tensor | None = None,
        budget: Budget | None = None,
        model: PlanningModel | None = None,
    ) -> PlanResult:
        start = self.clock()
        cem_budget = grad_budget = budget
        if budget is not None and budget.seconds is not None:
            cem_budget = Budget(budget.max_iterations, budget.seconds * self.cfg.time_share)
        first = self.cem.plan(z0, goal, warm_start, cem_budget, model)
        if budget is not None and budget.seconds is not None:
            grad_budget = Budget(budget.max_iterations, max(budget.seconds - (self.clock() - start), 1e-9))
        # the gradient stage starts from CEM's best plan: its final mean, or a sample that scored better
        better = first.info["best_cost"] < first.cost  # (E,)
        begin = torch.where(better[:, None, None], first.info["best_actions"], first.actions)
        second = self.grad.plan(z0, goal, begin, grad_budget, model)
        # the gradient stage scores its start (the CEM plan) first, so it is never worse than CEM
        rows = first.info["rows_iterations"] + second.info["rows_iterations"]  # (E,)
        info = {"cem": first, "grad_steps": second.iterations, "rows_iterations": rows}
        return PlanResult(second.actions, second.cost, first.iterations + second.iterations, info)


def _finite(costs: torch.Tensor) -> torch.Tensor:
    """costs with +inf where they are not finite (NaN, or -inf from a broken model): such a sample is
    never the best, never an elite while a scored one is left, and gets no weight. At least fp32 (a
    model's bf16 costs made MPPI's weights bf16, which its fp32 samples could not be averaged with)."""
    costs = costs.to(torch.promote_types(costs.dtype, torch.float32))
    return torch.where(costs.isfinite(), costs, torch.full_like(costs, math.inf))


def _keep_unscored(costs, mean, std, new_mean, new_std) -> tuple[torch.Tensor, torch.Tensor]:
    """The refitted (E, H, A) Gaussian, but the old one for an episode none of whose costs (E, N) were
    finite."""
    scored = costs.isfinite().any(dim=1)[:, None, None]  # (E, 1, 1)
    return torch.where(scored, new_mean, mean), torch.where(scored, new_std, std)


def _plain(z: Latent) -> Latent:
    """Detached copies of a latent's tensors (plain tensors even when made under inference mode)."""
    return {k: v.detach().clone() for k, v in z.items()}


def _gather(actions: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """actions (E, N, H, A), idx (E, K) -> (E, K, H, A)."""
    return actions.gather(1, idx[:, :, None, None].expand(-1, -1, *actions.shape[2:]))


PLANNERS: dict[str, tuple[type, type]] = {
    "cem": (CEMConfig, CEM),
    "mppi": (MPPIConfig, MPPI),
    "gd": (GradConfig, GradientPlanner),
    "cem_gd": (CEMThenGradConfig, CEMThenGradient),
}
DEFAULT_PLANNER = CEMConfig.name  # a planner config without a name


def planner_config(name: str = DEFAULT_PLANNER, **kwargs: Any) -> PlannerConfig:
    """A config by planner name, e.g. from YAML: `planner_config("cem", samples=100)`; for "cem_gd",
    `cem` and `grad` may be mappings."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; known: {sorted(PLANNERS)}")
    cfg_type = PLANNERS[name][0]
    if cfg_type is CEMThenGradConfig:
        for key, sub in (("cem", CEMConfig), ("grad", GradConfig)):
            if isinstance(kwargs.get(key), Mapping):
                kwargs[key] = sub(**kwargs[key])
    unknown = set(kwargs) - {f.name for f in fields(cfg_type)}
    if unknown:
        raise ValueError(f"unknown fields for planner {name!r}: {sorted(unknown)}")
    return cfg_type(**kwargs)


def build_planner(
    cfg: PlannerConfig | Mapping[str, Any], model: PlanningModel, clock: Clock = kernels.compute_clock
) -> CEM | MPPI | GradientPlanner | CEMThenGradient:
    """A planner for `model` from a config or a mapping with a "name" ("cem" | "mppi" | "gd" | "cem_gd")."""
    if isinstance(cfg, Mapping):
        cfg = planner_config(**cfg)
    for cfg_type, planner_type in PLANNERS.values():
        if type(cfg) is cfg_type:
            return planner_type(model, cfg, clock)
    raise TypeError(f"not a planner config: {type(cfg).__name__}")
