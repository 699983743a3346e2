"""Planners and MPC on an analytic world model whose optimum is known in closed form.

The model is a point in the plane, s_{t+1} = s_t + B (a_1 + ... + a_f) for the f raw actions of a
planning step, seen through a fixed linear "patch feature" map W (visual (P, D)) plus the state as
proprio. Its cost is DINO-WM's (last-frame patch-feature MSE + proprio term) plus optionally the mean
squared distance over all frames, which makes the optimum unique: reach the goal at the first step
(a_0 = B^-1 (g - s0)) and stay (a_t = 0). Out of reach, every action saturates towards the goal.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import pytest
import torch
from einops import rearrange

from policies.base import Budget, Planner, PlanningModel, Policy, expand_latent, latent_batch_size, shift_plan
from policies.build import with_bounds
from policies.mpc import MPC, MPCConfig
from policies.planners import (
    DEFAULT_PLANNER,
    PLANNERS,
    CEMConfig,
    CEMThenGradConfig,
    GradConfig,
    MPPIConfig,
    build_planner,
    planner_config,
)
from policies.subgoal import GraphConfig
from wm.spec import IOSpec

# B maps raw action (a0, a1) to (0.5 a1, -0.25 a0): to move +x push a1 up, to move +y push a0 down.
B = torch.tensor([[0.0, 0.5], [-0.25, 0.0]])
B_INV = torch.linalg.inv(B)


class PointModel:
    """Analytic PlanningModel. obs {"state": (E, To, 2)}; latent {"visual": (E, P, D), "proprio": (E, 2)}."""

    def __init__(
        self, frameskip: int = 1, frames_weight: float = 1.0, proprio_weight: float = 0.5, history: int = 1
    ):
        self.frameskip, self.frames_weight, self.proprio_weight = frameskip, frames_weight, proprio_weight
        self.action_dim = frameskip * B.shape[1]
        self.W = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))  # (P, D, S)
        self.io_spec = IOSpec(
            image_keys=(), image_size=(1, 1), proprio_key="state", proprio_dim=2, action_dim=2,
            history=history, frameskip=frameskip, past_actions=True,
        )  # fmt: skip
        self.inputs = []  # what encode was given

    def encode(self, obs):
        self.inputs.append(obs)
        s = obs["state"][:, -1]  # (E, S)
        return {"visual": self._features(s), "proprio": s}

    def rollout(self, z0, actions):
        raw = rearrange(actions, "e n h (f d) -> e n h f d", f=self.frameskip).sum(3)  # (E, N, H, Da)
        s0 = expand_latent(z0, actions.shape[1])["proprio"].unsqueeze(2)  # (E, N, 1, S)
        s = s0 + torch.cumsum((raw.unsqueeze(-2) * B.to(raw)).sum(-1), dim=2)  # (E, N, H, S)
        return {"visual": self._features(s), "proprio": s}

    def _features(self, s):
        """(..., S) -> (..., P, D), linear in the state.

        A sum over the 2 state dims rather than a matmul or one big broadcast: on the shared 2-core
        machine, multi-threaded kernels (MKL's transposed matmul in backward, elementwise ops above
        torch's 32k-element grain) cost milliseconds each under load, swamping the planner."""
        W = self.W.to(s)
        return s[..., 0, None, None] * W[..., 0] + s[..., 1, None, None] * W[..., 1]

    def cost(self, pred, goal):
        vis = ((pred["visual"][:, :, -1] - goal["visual"][:, None]) ** 2).mean((-2, -1))  # (E, N)
        last = ((pred["proprio"][:, :, -1] - goal["proprio"][:, None]) ** 2).sum(-1)  # (E, N)
        frames = ((pred["proprio"] - goal["proprio"][:, None, None]) ** 2).sum(-1).mean(-1)  # (E, N)
        return vis + self.proprio_weight * last + self.frames_weight * frames


class Recorder:
    """The PlanningModel surface and nothing else (slots: other attributes raise); records every call."""

    __slots__ = ("_model", "action_dim", "io_spec", "calls")

    def __init__(self, model):
        self._model, self.action_dim, self.io_spec, self.calls = model, model.action_dim, model.io_spec, []

    def encode(self, obs):
        self.calls.append(("encode", tuple(obs["state"].shape)))
        return self._model.encode(obs)

    def rollout(self, z0, actions):
        self.calls.append(("rollout", latent_batch_size(z0), tuple(actions.shape)))
        return self._model.rollout(z0, actions)

    def cost(self, pred, goal):
        self.calls.append(("cost", latent_batch_size(goal)))
        return self._model.cost(pred, goal)

    def count(self, name):
        return sum(c[0] == name for c in self.calls)


def obs_of(states):
    """(E, 2) states -> obs {"state": (E, To=1, 2)}."""
    return {"state": torch.as_tensor(states, dtype=torch.float32)[:, None]}


def raw_of(states):
    """(E, 2) states -> a raw robot observation {"state": (E, 2)}, what MPC takes."""
    return {"state": np.asarray(states, dtype=np.float32).reshape(-1, 2)}


# Test-sized configs (the defaults are DINO-WM/TD-MPC2 sized); bounds asymmetric per dimension.
LOW, HIGH = (-0.5, -1.0), (1.0, 0.3)
CONFIGS = {
    "cem": CEMConfig(horizon=5, samples=300, elites=30, iterations=30, low=LOW, high=HIGH),
    "mppi": MPPIConfig(horizon=5, samples=300, elites=30, iterations=30, low=LOW, high=HIGH),
    "gd": GradConfig(horizon=5, steps=300, lr=0.1, restarts=4, low=LOW, high=HIGH),
    "cem_gd": CEMThenGradConfig(
        cem=CEMConfig(horizon=5, samples=100, elites=10, iterations=10, low=LOW, high=HIGH),
        grad=GradConfig(horizon=5, steps=300, lr=0.1, low=LOW, high=HIGH),
    ),
}
NAMES = sorted(PLANNERS)
# Sampling planners stop improving near min_std (0.05) in directions the cost barely sees (late steps);
# Adam gets closer but crawls along the same ill-conditioned directions.
ACTION_TOL = {"cem": 0.1, "mppi": 0.1, "gd": 0.02, "cem_gd": 0.02}


def make(name, model, **overrides):
    cfg = CONFIGS[name]
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return build_planner(cfg, model)


def plan_for(name, model, s0, goal, **kw):
    z0, zg = model.encode(obs_of(s0)), model.encode(obs_of(goal))
    return make(name, model).plan(z0, zg, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_finds_the_analytic_optimum(name):
    model = Recorder(PointModel())
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    result = plan_for(name, model, s0, goal)
    expected = torch.zeros(1, 5, 2)
    expected[:, 0] = (goal - s0) @ B_INV.T  # reach the goal at the first step, then hold still
    assert expected[0, 0].tolist() == pytest.approx([-0.4, 0.2])  # within the bounds
    assert result.actions.shape == (1, 5, 2) and result.cost.shape == (1,)
    assert float(result.cost) < 2e-3
    assert (result.actions - expected).abs().max() < ACTION_TOL[name]
    # the reported cost is the model's cost of the returned actions
    z0, zg = model.encode(obs_of(s0)), model.encode(obs_of(goal))
    again = model.cost(model.rollout(z0, result.actions[:, None]), zg)[:, 0]
    torch.testing.assert_close(again, result.cost)


class BrokenCosts(PointModel):
    """A world model that gives no finite cost for some sequences: NaN (or -inf) where the first
    action's first dim is above `above`, or everywhere."""

    def __init__(self, above: float | None, bad: float = float("nan")) -> None:
        super().__init__()
        self.above, self.bad = above, bad

    def rollout(self, z0, actions):
        out = super().rollout(z0, actions)
        out["first"] = actions[:, :, 0, 0]  # (E, N)
        return out

    def cost(self, pred, goal):
        cost = super().cost(pred, goal)
        broken = torch.ones_like(cost, dtype=torch.bool) if self.above is None else pred["first"] > self.above
        return torch.where(broken, torch.full_like(cost, self.bad), cost)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_sequences_without_a_finite_cost_are_never_chosen(name, bad):
    """NaN (or -inf) costs for the sequences whose first action's first dim is above 0.2: each planner
    still comes near the optimum, whose first action (-0.4, 0.2) is among the scored ones; MPPI with
    every sample as an elite turned one NaN into a NaN plan, CEM's best sample was never updated."""
    model = BrokenCosts(above=0.2, bad=bad)
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    planners = [make(name, model)] + ([make(name, model, elites=None)] if name == "mppi" else [])
    planners += [make(name, model, return_best=True)] if name == "cem" else []
    for planner in planners:
        result = planner.plan(model.encode(obs_of(s0)), model.encode(obs_of(goal)))
        assert bool(result.actions.isfinite().all()) and float(result.cost) < 1e-2  # near the optimum
        assert float(result.actions[0, 0, 0]) <= 0.2  # a scored sequence


@pytest.mark.parametrize("name", NAMES)
def test_a_model_with_no_finite_cost_leaves_a_finite_plan_within_the_bounds(name):
    model = BrokenCosts(above=None)
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    result = make(name, model).plan(model.encode(obs_of(s0)), model.encode(obs_of(goal)))
    assert bool(result.actions.isfinite().all())
    assert bool((result.actions >= torch.tensor(LOW)).all() and (result.actions <= torch.tensor(HIGH)).all())


class NaNBeyond(PointModel):
    """A cost NaN by arithmetic, forward and gradient (as a bf16 overflow gives), where the first action's
    first dim is above `above`; its rollout refuses non-finite actions, as DINO-WM's does."""

    def __init__(self, above: float) -> None:
        super().__init__()
        self.above = above

    def rollout(self, z0, actions):
        if not bool(actions.isfinite().all()):
            raise ValueError("actions hold NaN or inf values")
        out = super().rollout(z0, actions)
        out["first"] = actions[:, :, 0, 0]  # (E, N)
        return out

    def cost(self, pred, goal):
        return super().cost(pred, goal) + 0 * torch.sqrt(self.above - pred["first"])


def test_a_nan_gradient_leaves_its_sequence_where_it_was():
    """A restart in the part of the box where the cost is NaN got a NaN gradient: Adam and the clamp kept
    the NaN, and the next rollout was given NaN actions (DINO-WM refuses them: the whole replan failed,
    the other restarts' plans with it). The optimum, first action (-0.4, 0.2), is where the cost is finite."""
    model = NaNBeyond(above=0.2)
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    planner = make("gd", model, restart_std=2.0)  # (cem_gd's gradient stage is this planner)
    z0, zg = model.encode(obs_of(s0)), model.encode(obs_of(goal))
    planned = planner.plan(z0, zg, warm_start=torch.full((1, 5, 2), 0.9))  # the warm start: NaN cost
    assert bool(planned.actions.isfinite().all()) and bool(planned.cost.isfinite().all())
    assert planned.actions[0, 0, 0] <= 0.2


@pytest.mark.parametrize("name", ["gd", "cem_gd"])
def test_gradient_planners_work_under_inference_mode(name):
    """The deploy runtime's worker computes under inference mode, its latents made there too: the
    gradient search runs on plain copies with autograd on (it raised on every chunk)."""
    model = PointModel()
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    expected = plan_for(name, model, s0, goal).actions
    with torch.inference_mode():
        result = plan_for(name, model, s0, goal)
    torch.testing.assert_close(result.actions, expected)


class InUnits(PointModel):
    """The same problem with actions in other units: raw = `scale` * PointModel's action + `shift`."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def rollout(self, z0, actions):
        return super().rollout(z0, (actions - self.shift) / self.scale)


@pytest.mark.parametrize("name", NAMES)
def test_the_same_problem_in_other_action_units_gets_the_same_plan(name):
    """Planners search the action box scaled to [-1, 1]: spreads and step sizes mean the same on every
    task, so PushT's pixels (0..512) or an end effector's 3 cm get the plan the unit box gets (the
    fixed min_std 0.05 / max_std 2 / lr 0.1 were in action units: too narrow or too wide)."""
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    plans = []
    for scale, shift in ((1.0, 0.0), (256.0 / 0.75, 300.0), (0.03, -0.01)):
        model = InUnits(scale, shift)
        low = tuple(scale * x + shift for x in LOW)
        high = tuple(scale * x + shift for x in HIGH)
        cfg = CONFIGS[name]
        if name == "cem_gd":
            cfg = dataclasses.replace(
                cfg,
                cem=dataclasses.replace(cfg.cem, low=low, high=high),
                grad=dataclasses.replace(cfg.grad, low=low, high=high),
            )
        else:
            cfg = dataclasses.replace(cfg, low=low, high=high)
        z0, zg = model.encode(obs_of(s0)), model.encode(obs_of(goal))
        result = build_planner(cfg, model).plan(z0, zg)
        plans.append(((result.actions - shift) / scale, result.cost))
    for actions, cost in plans[1:]:
        torch.testing.assert_close(actions, plans[0][0], atol=2e-3, rtol=0)
        assert float(cost) < 2e-3


@pytest.mark.parametrize("name", NAMES)
def test_out_of_reach_goal_saturates_towards_it(name):
    s0 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    goal = torch.tensor([[10.0, 10.0], [-10.0, -10.0]])  # (+x, +y) needs a1 up, a0 down; the reverse
    result = plan_for(name, PointModel(), s0, goal)
    a = result.actions  # (E, H, A)
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    assert ((a >= low) & (a <= high)).all()
    assert (a[0, :, 0] - LOW[0]).abs().max() < 0.05 and (a[0, :, 1] - HIGH[1]).abs().max() < 0.05
    assert (a[1, :, 0] - HIGH[0]).abs().max() < 0.05 and (a[1, :, 1] - LOW[1]).abs().max() < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_episodes_with_different_goals_are_planned_in_one_batched_call_per_iteration(name):
    model = Recorder(PointModel())
    s0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    goal = torch.tensor([[0.1, 0.05], [0.8, 1.1], [10.0, 10.0]])  # two reachable in one step, one not
    z0, zg = model.encode(obs_of(s0)), model.encode(obs_of(goal))
    model.calls.clear()
    result = make(name, model).plan(z0, zg)
    rollouts = [c for c in model.calls if c[0] == "rollout"]
    assert model.count("encode") == 0  # the start is never re-encoded, let alone per sample
    assert all(c[1] == 3 and c[2][0] == 3 and c[2][2:] == (5, 2) for c in rollouts)
    sizes = {c[2][1] for c in rollouts}
    if name in ("cem", "mppi"):  # one (E, N, H, A) call per iteration, plus scoring the final mean (N = 1)
        assert len(rollouts) == result.iterations + 1 and sizes == {300, 1}
    if name == "gd":  # one (E, R, H, A) call per step, plus scoring the last iterate
        assert len(rollouts) == result.iterations + 1 and sizes == {4}
    for e in (0, 1):
        expected = (goal[e] - s0[e]) @ B_INV.T
        assert (result.actions[e, 0] - expected).abs().max() < ACTION_TOL[name]
        assert result.cost[e] < 2e-3
    assert result.actions[2, :, 1].min() > HIGH[1] - 0.05 and result.actions[2, :, 0].max() < LOW[0] + 0.05


@pytest.mark.parametrize("name", NAMES)
def test_warm_start_helps_on_the_shifted_problem(name):
    model = PointModel()
    s0, goal = torch.tensor([[0.0, 0.0]]), torch.tensor([[-0.8, -0.4]])  # needs 2 saturated steps
    first = plan_for(name, model, s0, goal)
    s1 = s0 + first.actions[:, 0] @ B.T  # execute one step in the true dynamics
    warm = shift_plan(first.actions, 1)
    z1, zg = model.encode(obs_of(s1)), model.encode(obs_of(goal))
    few = Budget(max_iterations=2)
    cold = make(name, model).plan(z1, zg, budget=few)
    hot = make(name, model).plan(z1, zg, warm_start=warm, budget=few)
    assert hot.cost < cold.cost
    if name in ("cem", "mppi"):  # a narrower initial std around the warm start does better still
        assert make(name, model, warm_std=0.1).plan(z1, zg, warm_start=warm, budget=few).cost < hot.cost
    # with a stopping cost, the warm start gets there in fewer iterations
    stop = 1.5 * float(hot.cost)
    cold = make(name, model, **_stop_kw(name, stop)).plan(z1, zg)
    hot = make(name, model, **_stop_kw(name, stop)).plan(z1, zg, warm_start=warm)
    assert hot.iterations < cold.iterations


@pytest.mark.parametrize("name", ["cem", "mppi"])
def test_a_row_that_reaches_stop_cost_returns_the_plan_that_reached_it(name):
    """With the default return_best=False, a row whose best sample reached stop_cost returned the mean
    refitted after it, which was never scored and cost more than stop_cost."""
    model = PointModel()
    z0, zg = model.encode(obs_of(STARTS)), model.encode(obs_of(GOALS))
    free = make(name, model, samples=64, elites=8).plan(z0, zg, budget=Budget(max_iterations=8))
    stop = float(free.info["best_cost"].max()) * 1.2  # reached by every row within a few iterations
    result = make(name, model, samples=64, elites=8, stop_cost=stop).plan(z0, zg)
    reached = result.info["best_cost"] <= stop
    assert bool(reached.all()) and bool((result.cost <= stop).all()), (result.cost, stop)
    torch.testing.assert_close(result.actions, result.info["best_actions"], rtol=0, atol=0)
    again = model.cost(model.rollout(z0, result.actions.unsqueeze(1)), zg)[:, 0]
    torch.testing.assert_close(again, result.cost)  # the cost said is the plan's own


def _stop_kw(name, stop):
    if name == "cem_gd":
        cfg = CONFIGS["cem_gd"]
        return {key: dataclasses.replace(getattr(cfg, key), stop_cost=stop) for key in ("cem", "grad")}
    return {"stop_cost": stop}


@pytest.mark.parametrize("name", NAMES)
def test_seed_makes_plans_reproducible(name):
    model = PointModel()
    s0, goal = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.9, -0.7]])
    z0, zg = model.encode(obs_of(s0)), model.encode(obs_of(goal))
    budget = Budget(max_iterations=3)
    a = make(name, model).plan(z0, zg, budget=budget).actions
    b = make(name, model).plan(z0, zg, budget=budget).actions
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name in ("cem", "mppi"):
        c = make(name, model, seed=1).plan(z0, zg, budget=budget).actions
        assert not torch.equal(a, c)


STARTS = torch.tensor([[0.0, 0.0], [0.3, -0.2], [-0.4, 0.1], [0.2, 0.5]])
GOALS = torch.tensor([[0.9, -0.7], [0.1, 0.2], [-0.3, -0.5], [0.6, 0.0]])


@pytest.mark.parametrize("name", NAMES)
def test_seeded_rows_plan_alike_whichever_rows_share_their_batch(name):
    """After `seed_rows(episode seeds)` a row's noise comes from its own stream: its plans (a first one,
    then a warm-started one drawing further along the stream) are the same planned alone, beside other
    rows, or in another order, also when a stopping cost ends some rows' search before others'; without
    row seeds the batch's one stream makes them depend on the batch."""
    model, seeds, budget = PointModel(), [11, 12, 13, 14], Budget(max_iterations=3)

    def plans(rows, seeded=True, budget=budget, **overrides):
        planner = make(name, model, **overrides)
        if seeded:
            planner.seed_rows([seeds[i] for i in rows])
        z0, zg = model.encode(obs_of(STARTS[rows])), model.encode(obs_of(GOALS[rows]))
        first = planner.plan(z0, zg, budget=budget)
        second = planner.plan(z0, zg, warm_start=first.actions, budget=budget)
        return first.actions, second.actions, first.info["rows_iterations"]

    together = plans([0, 1, 2, 3])
    alone = [plans([i]) for i in range(4)]
    swapped = plans([3, 1])
    for i in range(4):
        for k in range(2):
            assert torch.equal(together[k][i], alone[i][k][0])
    for k in range(2):
        assert torch.equal(swapped[k][0], alone[3][k][0]) and torch.equal(swapped[k][1], alone[1][k][0])
    # a stopping cost stops each row's search on its own (row 0 never reaches it, the others do, after
    # different numbers of iterations), so a row's plans are still those it gets alone
    stopping = dict(budget=Budget(max_iterations=8), **_stop_kw(name, 0.1))
    stopped = plans([0, 1, 2, 3], **stopping)
    assert len(set(stopped[2].tolist())) > 1
    for i in range(4):
        alone_i = plans([i], **stopping)
        for k in range(3):
            assert torch.equal(stopped[k][i], alone_i[k][0])
    unseeded = plans([0, 1, 2, 3], seeded=False)[0]
    assert not torch.equal(unseeded[1], plans([1], seeded=False)[0][0])  # the batch's stream
    if name in ("cem", "mppi"):  # the planner's own seed still counts
        assert not torch.equal(plans([0], seed=5)[0], alone[0][0])


def test_row_seeds_are_checked_against_the_batch():
    model = PointModel()
    planner = make("cem", model)
    with pytest.raises(ValueError, match=">= 0"):
        planner.seed_rows([1, -2])
    planner.seed_rows([1, 2, 3])
    z0, zg = model.encode(obs_of(STARTS[:2])), model.encode(obs_of(GOALS[:2]))
    with pytest.raises(ValueError, match="3 row seeds for a batch of 2"):
        planner.plan(z0, zg, budget=Budget(max_iterations=1))
    planner.seed_rows(None)
    assert planner.plan(z0, zg, budget=Budget(max_iterations=1)).actions.shape == (2, 5, 2)
    # (planner seed, row seed) pairs whose 32-bit words would join alike still draw apart
    a, b = make("cem", model, seed=5 + 7 * 2**32), make("cem", model, seed=5)
    a.seed_rows([0])
    b.seed_rows([7])
    z0, zg = model.encode(obs_of(STARTS[:1])), model.encode(obs_of(GOALS[:1]))
    budget = Budget(max_iterations=1)
    assert not torch.equal(a.plan(z0, zg, budget=budget).actions, b.plan(z0, zg, budget=budget).actions)


def test_mpc_episodes_do_not_depend_on_the_episodes_beside_them():
    """MPC hands its episodes' seeds to the planner (`start_episodes`), so closed-loop episodes act the
    same in a batch of four or two or alone; `reset` returns the planner to one stream for any batch."""
    model = PointModel(frameskip=2)
    cfg = CEMConfig(horizon=3, samples=50, elites=5, iterations=3, low=-1.0, high=1.0)

    def run(rows):
        mpc = MPC(model, build_planner(cfg, model), MPCConfig(execute=1))
        mpc.set_goal(raw_of(GOALS[rows]))
        mpc.reset()
        mpc.start_episodes([100 + i for i in rows])
        s, actions = STARTS[rows].clone(), []
        for _ in range(6):
            a = mpc.select_action(raw_of(s))
            actions.append(a)
            s = s + a @ (1.1 * B).T
        mpc.reset()
        mpc.set_goal(raw_of(GOALS[:3]))
        mpc.select_action(raw_of(STARTS[:3]))  # a batch of another size, after reset: one stream again
        return torch.stack(actions, dim=1)  # (E, steps, Da)

    together = run([0, 1, 2, 3])
    for rows in ([0], [2, 3], [3, 1]):
        assert torch.equal(run(rows), together[rows])


def test_time_budget_stops_after_the_iteration_that_crosses_it():
    ticks = iter(range(1000))
    planner = build_planner(CONFIGS["cem"], PointModel(), clock=lambda: float(next(ticks)))
    z = PointModel().encode(obs_of([[0.0, 0.0]]))
    result = planner.plan(z, z, budget=Budget(seconds=3.5))  # clock reads 0 at start, then 1, 2, 3, 4
    assert result.iterations == 4


def test_a_kernel_calibration_inside_a_replan_does_not_eat_its_time_budget():
    """The model's first call calibrates a kernel (0.5 s here, once): on the wall clock the 0.3 s budget
    ran out in the first iteration, and wm-eval counted the calibration as planning time."""
    from wm import kernels
    from wm.kernels import KernelCache, Selector

    x = torch.randn(4, 4)
    candidates = {"native": lambda: x * 2, "fast": lambda: x + x}

    def slow_timer(fns):
        time.sleep(0.5)
        return {"native": 1.0, "fast": 0.5}

    class Calibrating(PointModel):
        def rollout(self, z0, actions):
            kernels.choose("rollout-op", candidates, "native")  # calibrates at the first call only
            return super().rollout(z0, actions)

    model = Calibrating()
    z = model.encode(obs_of([[0.0, 0.0]]))
    with kernels.using(Selector(KernelCache(None), timer=slow_timer)):
        result = build_planner(CONFIGS["cem"], model).plan(z, z, budget=Budget(seconds=0.3))
    assert result.iterations == CONFIGS["cem"].iterations > 1


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_build_planner_smoke(name, device):
    """Build by name from a mapping (as from YAML); plan 2 episodes in float64 on the inputs' device:
    shapes, dtype, device, bounds, no NaN."""
    common = {"horizon": 3, "low": -0.2, "high": [0.1, 0.2, 0.3, 0.4]}
    small = {
        "cem": {**common, "samples": 16, "elites": 4, "iterations": 2},
        "mppi": {**common, "samples": 16, "elites": 8, "iterations": 2},
        "gd": {**common, "steps": 2, "restarts": 2},
    }
    small["cem_gd"] = {"cem": small["cem"], "grad": small["gd"]}
    raw = {"name": name, **small[name]}
    model = PointModel(frameskip=2)  # A = 4
    planner = build_planner(raw, model)
    assert isinstance(planner, Planner) and planner.horizon == 3
    z0 = {k: v.to(device, torch.float64) for k, v in model.encode(obs_of([[0.0, 0.0], [1.0, 2.0]])).items()}
    zg = {k: v.to(device, torch.float64) for k, v in model.encode(obs_of([[1.0, 1.0], [0.0, 0.0]])).items()}
    result = planner.plan(z0, zg)
    a = result.actions
    assert a.shape == (2, 3, 4) and a.dtype == torch.float64 and result.cost.shape == (2,)
    assert a.device.type == device and result.cost.device.type == device
    assert torch.isfinite(a).all() and torch.isfinite(result.cost).all() and result.iterations >= 1
    assert (a >= -0.2).all() and (a <= torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=a.dtype, device=device)).all()


def test_a_planner_mapping_without_a_name_is_the_default_planner():
    """`with_bounds` took a mapping without a name for CEM, `build_planner` refused it (a TypeError)."""
    raw = with_bounds({"samples": 16, "elites": 4}, {"low": -0.5, "high": 0.5})
    planner = build_planner(raw, PointModel())
    assert isinstance(planner, PLANNERS[DEFAULT_PLANNER][1]) and planner.cfg.low == -0.5


def test_planner_bounds_may_narrow_the_tasks_box_never_widen_it():
    """`+planner.low=-50 +planner.high=50` replaced the robot's limits: the plans ran clipped on every
    step (wm-eval's clipped_steps counted them all)."""
    box = {"low": (-1.0, -0.5), "high": (1.0, 0.5)}
    narrowed = with_bounds({"low": -0.5, "high": [0.5, 0.25]}, box)
    assert narrowed["low"] == -0.5 and narrowed["high"] == [0.5, 0.25]
    with pytest.raises(ValueError, match=r"planner.low=-50.0 reaches outside the task's action limits"):
        with_bounds({"low": -50.0}, box)
    with pytest.raises(ValueError, match=r"planner.grad.high=\[1.0, 0.6\] reaches outside"):
        with_bounds({"name": "cem_gd", "cem": {}, "grad": {"high": [1.0, 0.6]}}, box)
    with pytest.raises(ValueError, match=r"planner.high must be a number or 2 numbers, got \[1.0, 1.0"):
        with_bounds({"high": [1.0, 1.0, 1.0]}, box)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: CEMConfig(samples=10, elites=20),
        lambda: CEMConfig(low=1.0, high=0.0),
        lambda: CEMConfig(warm_std=0.0),  # a warm start would never be searched around
        lambda: CEMConfig(init_std=4.0, max_std=0.1),  # the first iteration sampled at 4, past the ceiling
        lambda: MPPIConfig(warm_std=0.01, min_std=0.05),
        lambda: CEMConfig(samples=1, elites=1),  # the mean overwrote the only sample: no search
        lambda: CEMConfig(low=(0.0, 0.0), high=(1.0, 1.0, 1.0)),
        lambda: MPPIConfig(temperature=0.0),
        lambda: GradConfig(init="random"),
        lambda: CEMThenGradConfig(cem=CEMConfig(horizon=4), grad=GradConfig(horizon=5)),
        lambda: planner_config("cem", sample=3),
        lambda: planner_config("ilqr"),
        lambda: MPCConfig(execute=0),
        lambda: Budget(max_iterations=0),
    ],
)
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize(
    "build, said",
    [
        (lambda: MPCConfig(execute=2.5), "mpc.execute=2.5 is not a whole number"),  # a TypeError at replan
        (lambda: MPCConfig(warm_start="no"), "mpc.warm_start='no' is not true or false"),  # was true
        (lambda: GraphConfig(neighbors=2.5), "graph.neighbors=2.5 is not a whole number"),  # topk() failed
        (lambda: GraphConfig(stride=2.5), "graph.stride=2.5 is not a whole number"),  # float node indices
    ],
)
def test_mpc_and_graph_numbers_of_the_wrong_kind_are_one_line(build, said):
    with pytest.raises(ValueError, match=rf"^{re.escape(said)}$"):
        build()


# ------------------------------------------------------------------------------------------- MPC


class RecordingPlanner:
    """Wraps a planner and keeps the warm starts and budgets it was given."""

    def __init__(self, planner):
        self.planner, self.horizon, self.warm_starts, self.budgets = planner, planner.horizon, [], []

    def plan(self, z0, goal, warm_start=None, budget=None):
        self.warm_starts.append(None if warm_start is None else warm_start.clone())
        self.budgets.append(budget)
        return self.planner.plan(z0, goal, warm_start, budget)


def make_mpc(execute=2, frameskip=2, max_iterations=10, history=1):
    model = Recorder(PointModel(frameskip=frameskip, history=history))
    cfg = CEMConfig(horizon=5, samples=100, elites=10, iterations=30, low=-1.0, high=1.0)
    planner = RecordingPlanner(build_planner(cfg, model))
    mpc = MPC(model, planner, MPCConfig(execute=execute, max_iterations=max_iterations))
    return mpc, model, planner


def test_mpc_executes_k_times_f_raw_actions_and_replans_only_when_the_queue_empties():
    mpc, model, planner = make_mpc(execute=2, frameskip=2)
    assert isinstance(mpc, Policy) and isinstance(model, PlanningModel)
    mpc.set_goal(raw_of([[1.0, 0.5], [-1.0, 0.0]]))
    assert model.count("encode") == 1 and model.count("rollout") == 0  # the goal is encoded once
    obs = raw_of([[0.0, 0.0], [0.0, 0.0]])
    actions = [mpc.select_action(obs) for _ in range(9)]  # 4 raw actions per replan: replans at 0, 4, 8
    assert all(a.shape == (2, 2) for a in actions)
    assert len(planner.warm_starts) == 3 and len(mpc.inference_seconds()) == 3
    assert mpc.inference_seconds()[-1] > 0
    assert model.count("encode") == 1 + 3  # one encode per replan, none per sample or per step
    assert all(b == Budget(max_iterations=10) for b in planner.budgets)
    assert mpc.last_result.iterations <= 10
    # the chunk is the plan's first k steps unpacked into k * f raw actions, in order
    chunk = mpc.predict_action_chunk(obs)
    plan = mpc.last_result.actions  # (E, H, A = f * Da)
    assert chunk.shape == (2, 4, 2)
    torch.testing.assert_close(chunk[:, 0], plan[:, 0, :2])
    torch.testing.assert_close(chunk[:, 1], plan[:, 0, 2:])
    torch.testing.assert_close(chunk[:, 3], plan[:, 1, 2:])


def test_mpc_warm_starts_from_the_shifted_plan_and_reset_clears_it():
    mpc, model, planner = make_mpc(execute=2, frameskip=1)
    mpc.set_goal(raw_of([[1.0, 0.5]]))
    obs = raw_of([[0.0, 0.0]])
    mpc.select_action(obs)
    first_plan = mpc.last_result.actions
    mpc.select_action(obs)  # second action of the chunk: no replan
    assert len(planner.warm_starts) == 1 and planner.warm_starts[0] is None
    mpc.select_action(obs)  # queue empty: replan, warm-started from the plan shifted by 2 steps
    assert len(planner.warm_starts) == 2
    torch.testing.assert_close(planner.warm_starts[1], shift_plan(first_plan, 2))
    mpc.reset()
    mpc.select_action(obs)  # reset emptied the queue (replan now) and dropped the warm start
    assert len(planner.warm_starts) == 3 and planner.warm_starts[2] is None
    mpc.reset()
    with pytest.raises(ValueError):
        mpc.select_action(raw_of([[0.0, 0.0], [1.0, 1.0]]))  # 2 episodes against a 1-episode goal


@pytest.mark.parametrize("name", NAMES)
def test_mpc_refuses_to_act_on_a_model_that_gives_no_finite_cost(name):
    """Every planner falls back to a finite plan within the bounds (the box's middle, or the warm start)
    when no sequence has a finite cost; MPC handed it out as a plan, and the robot was driven to mid-range
    with nothing said. A finished episode (not active) is not asked for a plan."""
    model = BrokenCosts(above=None)
    mpc = MPC(model, make(name, model), MPCConfig(execute=1))
    mpc.set_goal(raw_of([[0.2, -0.1], [0.3, 0.0]]))
    obs = raw_of([[0.1, -0.2], [0.0, 0.0]])
    with pytest.raises(
        ValueError, match=r"^the world model gave no finite cost for episode\(s\) \[0, 1\]: no"
    ):
        mpc.select_action(obs)
    mpc.set_active(np.array([False, False]))
    assert mpc.select_action(obs).shape == (2, 2)


def test_mpc_reaches_the_goals_in_closed_loop_with_a_mismatched_model():
    """The test steps the true dynamics (10 % stronger than the model's); MPC only sees observations."""
    mpc, model, planner = make_mpc(execute=1, frameskip=2, max_iterations=None)
    goals = torch.tensor([[1.5, 0.8], [-0.5, -1.2]])
    mpc.set_goal(raw_of(goals))
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    for _ in range(24):
        a = mpc.select_action(raw_of(s))  # (E, Da)
        assert a.abs().max() <= 1.0
        s = s + a @ (1.1 * B).T
    assert (s - goals).norm(dim=1).max() < 0.05
    assert {c[0] for c in model.calls} == {"encode", "rollout", "cost"}
    assert len(mpc.inference_seconds()) == 12  # replans every f * k = 2 raw steps, never from t=0


def test_mpc_feeds_the_model_its_history_and_the_actions_between():
    """A world model with 2 history frames and frameskip 2 gets the frames 2 control steps apart (the
    first one repeated at the start) and the 2 raw actions MPC handed out between them."""
    mpc, model, planner = make_mpc(execute=1, frameskip=2, history=2)
    mpc.set_goal(raw_of([[1.0, 0.5]]))
    sent = []
    for t in range(5):
        sent.append(mpc.select_action(raw_of([[float(t), 0.0]]))[0].numpy())
    replans = [obs for obs in model._model.inputs[1:]]  # [0] is the goal
    assert len(replans) == 3  # at steps 0, 2, 4
    assert replans[0]["state"][0, :, 0].tolist() == [0.0, 0.0]  # the start repeated
    assert replans[0]["past_action"].abs().sum() == 0  # no action before the first observation
    assert replans[2]["state"][0, :, 0].tolist() == [2.0, 4.0]  # steps t - 2 and t
    torch.testing.assert_close(replans[2]["past_action"][0, 0], torch.from_numpy(np.concatenate(sent[2:4])))
    mpc.reset()
    mpc.select_action(raw_of([[7.0, 0.0]]))
    assert model._model.inputs[-1]["state"][0, :, 0].tolist() == [7.0, 7.0]  # reset forgot the history


def test_a_chunk_call_is_refused_for_a_model_that_reads_past_observations():
    """predict_action_chunk sees one observation per chunk: a model with history would get frames a
    whole chunk apart (and stale past actions) as if they were `frameskip` steps apart."""
    mpc, _, _ = make_mpc(execute=1, frameskip=2, history=2)
    mpc.set_goal(raw_of([[1.0, 0.5]]))
    with pytest.raises(ValueError, match="reads 2 observations 2 control steps apart"):
        mpc.predict_action_chunk(raw_of([[0.0, 0.0]]))
    mpc, _, _ = make_mpc(execute=2, frameskip=2, history=1)  # one observation: exact
    mpc.set_goal(raw_of([[1.0, 0.5]]))
    assert mpc.predict_action_chunk(raw_of([[0.0, 0.0]])).shape == (1, 4, 2)


def test_a_goal_from_another_task_is_one_clear_error():
    """A goal observation without the key the model reads (a store converted with `state`, a task that
    calls it `proprio`): one line naming both, before anything is encoded (it was a bare KeyError)."""
    mpc, model, _ = make_mpc(execute=1)
    with pytest.raises(ValueError, match=r"observation lacks \['state'\] \(it has \['proprio'\]\)"):
        mpc.set_goal({"proprio": np.zeros((1, 2), np.float32)})
    assert model._model.inputs == []


@pytest.mark.parametrize(
    ("make_cfg", "option"),
    [
        (lambda: CEMConfig(samples=2.5, elites=1), "samples"),
        (lambda: CEMConfig(iterations=float("inf")), "iterations"),  # ran forever without a budget
        (lambda: CEMConfig(iterations=float("nan")), "iterations"),  # ran no iteration at all
        (lambda: CEMConfig(elites=2.5), "elites"),
        (lambda: CEMConfig(horizon=float("nan")), "horizon"),
        (lambda: CEMConfig(init_std=float("inf")), "init_std"),
        (lambda: CEMConfig(warm_std=float("inf")), "warm_std"),
        (lambda: CEMConfig(stop_cost=float("nan")), "stop_cost"),  # silently never stopped
        (lambda: MPPIConfig(temperature=float("inf")), "temperature"),
        (lambda: GradConfig(steps=2.5), "steps"),  # `step == limit` never held: ran forever
        (lambda: GradConfig(steps=float("nan")), "steps"),
        (lambda: GradConfig(restarts=1.5), "restarts"),
        (lambda: GradConfig(lr=float("inf")), "lr"),
        (lambda: GradConfig(restart_std=float("nan")), "restart_std"),  # NaN restarts
        (lambda: GradConfig(restart_std=-0.5), "restart_std"),
    ],
)
def test_bad_option_values_are_one_error_naming_the_option(make_cfg, option):
    with pytest.raises(ValueError, match=option):
        make_cfg()


class ScaledCost(PointModel):
    """(PointModel's cost + 1) times `scale`: finite, but over a small temperature past float32's range."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def cost(self, pred, goal):
        return (super().cost(pred, goal) + 1) * self.scale


def test_mppi_weights_survive_costs_that_overflow_over_the_temperature():
    """-cost / temperature was -inf for every elite: NaN weights, zeroed, so every refit moved the mean
    to the middle of the box whatever the costs said."""
    scale = 1e38
    model = ScaledCost(scale)
    s0, goal = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.2, -0.1]])
    planner = make("mppi", model, temperature=0.1)
    result = planner.plan(model.encode(obs_of(s0)), model.encode(obs_of(goal)))
    assert bool(result.actions.isfinite().all())
    assert float(result.cost) / scale - 1 < 1e-2  # near the optimum, as with unscaled costs
    assert float(result.actions[0, 0, 0]) == pytest.approx(-0.4, abs=ACTION_TOL["mppi"])


def unbounded(name):
    """CONFIGS[name] without action bounds."""
    free = {"low": -float("inf"), "high": float("inf")}
    cfg = CONFIGS[name]
    if name == "cem_gd":
        return dataclasses.replace(
            cfg, cem=dataclasses.replace(cfg.cem, **free), grad=dataclasses.replace(cfg.grad, **free)
        )
    return dataclasses.replace(cfg, **free)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_warm_start_is_one_clear_error(name, bad):
    """A NaN warm start (or inf in a dim without bounds) was the initial mean: every sample NaN, no cost
    finite, and the non-finite mean came back as the plan (or the GD iterate did)."""
    model = PointModel()
    z0, zg = model.encode(obs_of([[0.1, -0.2]])), model.encode(obs_of([[0.2, -0.1]]))
    warm = torch.zeros(1, 5, 2)
    warm[0, 0, 1] = bad
    with pytest.raises(ValueError, match="warm_start"):
        build_planner(unbounded(name), model).plan(z0, zg, warm)


class NaNForOneSequence(PointModel):
    """No finite cost when a rollout scores a single sequence per episode (how CEM scores its final mean)."""

    def cost(self, pred, goal):
        cost = super().cost(pred, goal)
        return torch.full_like(cost, float("nan")) if cost.shape[1] == 1 else cost


def test_cem_then_gradient_starts_from_the_best_scored_plan_when_the_mean_scores_nan():
    """`best_cost < NaN` is False: the gradient stage started from CEM's unscored mean, not its best
    sample."""
    model = NaNForOneSequence()
    cfg = dataclasses.replace(CONFIGS["cem_gd"], grad=dataclasses.replace(CONFIGS["cem_gd"].grad, restarts=2))
    planner = build_planner(cfg, model)
    starts = []
    grad_plan = planner.grad.plan

    def recording(z0, goal, warm, *rest):
        starts.append(warm.clone())
        return grad_plan(z0, goal, warm, *rest)

    planner.grad.plan = recording
    z0, zg = model.encode(obs_of([[0.1, -0.2]])), model.encode(obs_of([[0.2, -0.1]]))
    result = planner.plan(z0, zg)
    first = result.info["cem"]
    assert bool(first.info["best_cost"].isfinite().all())
    torch.testing.assert_close(starts[0], first.info["best_actions"])


@pytest.mark.parametrize("name", ["cem", "mppi"])
def test_a_mean_the_model_scores_nan_is_not_the_plan_when_a_sample_scored(name):
    """The refitted mean is scored once more at the end: a NaN there was the plan's cost and the
    unscored mean its actions, beside a best sample with a finite cost."""
    model = NaNForOneSequence()
    z0, zg = model.encode(obs_of([[0.1, -0.2]])), model.encode(obs_of([[0.2, -0.1]]))
    result = make(name, model).plan(z0, zg)
    assert bool(result.cost.isfinite().all())
    torch.testing.assert_close(result.cost, result.info["best_cost"])
    torch.testing.assert_close(result.actions, result.info["best_actions"])


def test_mpc_warm_start_follows_a_planner_with_another_horizon():
    """A planner of horizon 3 swapped in after a horizon-5 replan was handed the old (E, 5, A) warm
    start and refused it; now it gets the shifted plan cut to its horizon (padded when it is longer)."""
    mpc, model, planner = make_mpc(execute=2, frameskip=1)
    mpc.set_goal(raw_of([[1.0, 0.5]]))
    obs = raw_of([[0.0, 0.0]])
    mpc.select_action(obs)
    mpc.select_action(obs)
    first_plan = mpc.last_result.actions  # (1, 5, 2)
    cfg = CEMConfig(horizon=3, samples=100, elites=10, iterations=30, low=-1.0, high=1.0)
    mpc.planner = shorter = RecordingPlanner(build_planner(cfg, model))
    mpc.select_action(obs)  # replan with the shorter planner
    torch.testing.assert_close(shorter.warm_starts[0], shift_plan(first_plan, 2)[:, :3])
    assert mpc.last_result.actions.shape == (1, 3, 2)
    mpc.select_action(obs)
    mpc.planner = longer = RecordingPlanner(build_planner(dataclasses.replace(cfg, horizon=6), model))
    short_plan = mpc.last_result.actions
    mpc.select_action(obs)  # padded with the shifted plan's last step
    expected = shift_plan(short_plan, 2)
    padded = torch.cat([expected, expected[:, -1:].expand(-1, 3, -1)], dim=1)  # (1, 6, 2)
    torch.testing.assert_close(longer.warm_starts[0], padded)
    mpc.planner = RecordingPlanner(build_planner(dataclasses.replace(cfg, horizon=1), model))
    mpc.select_action(obs)
    with pytest.raises(ValueError, match="cannot execute 2 steps of a horizon-1 plan"):
        mpc.select_action(obs)


@pytest.mark.parametrize("cap", [float("nan"), 2.5, True, 0])
def test_a_budget_cap_that_is_no_whole_count_is_refused(cap):
    """max_iterations=nan passed `< 1` and reached the planners' loop limits uncapped; 2.5 was a count."""
    with pytest.raises(ValueError, match="max_iterations must be an integer >= 1 or None"):
        Budget(max_iterations=cap)
    assert Budget(max_iterations=np.int64(3)).max_iterations == 3


@pytest.mark.parametrize("name", ["cem", "mppi", "gd", "cem_gd"])
def test_bf16_costs_and_bounds_at_the_dtypes_largest_value_still_plan(name):
    """A model whose cost came back in bf16 made MPPI's weights bf16 (a RuntimeError against its fp32
    samples); bounds of float32's largest magnitude (how some environments write "unbounded") overflowed
    the box's half-width to inf and every plan was NaN, blamed on the world model."""

    class Bf16Cost(PointModel):
        def cost(self, pred, goal):
            return super().cost(pred, goal).to(torch.bfloat16)

    huge = float(np.finfo(np.float32).max)
    cfg = CONFIGS[name]
    stages = [s for s in ("cem", "grad") if name == "cem_gd"]  # (both its stages)
    unbounded = dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), low=-huge, high=huge) for s in stages}
    ) if stages else dataclasses.replace(cfg, low=-huge, high=huge)  # fmt: skip
    for model, cfg in ((Bf16Cost(), CONFIGS[name]), (PointModel(), unbounded)):
        z0, zg = model.encode(obs_of([[0.0, 0.0]])), model.encode(obs_of([[0.3, -0.1]]))
        result = build_planner(cfg, model).plan(z0, zg)
        assert result.actions.isfinite().all() and result.cost.isfinite().all(), (name, cfg)
