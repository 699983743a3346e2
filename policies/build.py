"""Building controllers at the edge: MPC over a world model (with optional latent-graph subgoals).

Everything here reads the world model's `io_spec` (keys, frameskip) and its declared metric
(`cost_vectors`), never its config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from policies.inputs import to_model_inputs
from policies.mpc import MPC, MPCConfig
from policies.planners import DEFAULT_PLANNER, build_planner
from policies.subgoal import GraphConfig, LatentGraph, SubgoalSelector
from wm.data import DemoStore
from wm.spec import IOSpec


def planner_bounds(low: np.ndarray, high: np.ndarray, frameskip: int) -> dict[str, Any]:
    """Bounds for a planning step of `frameskip` raw actions (planners search the box scaled to
    [-1, 1], so their spreads and step sizes need no scaling to the task's units)."""
    lo = np.tile(np.asarray(low, dtype=float), frameskip)
    hi = np.tile(np.asarray(high, dtype=float), frameskip)
    return {"low": tuple(lo), "high": tuple(hi)}


def with_bounds(planner_cfg: Mapping[str, Any], bounds: dict[str, Any]) -> dict[str, Any]:
    """The planner config with the task's action bounds filled in where it gives none: at the top for
    cem / mppi / gd, in both stages for cem_gd. Bounds it gives may narrow the task's box, never widen
    it (a plan outside the robot's limits is clipped on every step it runs)."""
    if planner_cfg.get("name", DEFAULT_PLANNER) == "cem_gd":
        cem = _within(planner_cfg.get("cem", {}), bounds, "planner.cem")
        grad = _within(planner_cfg.get("grad", {}), bounds, "planner.grad")
        return {**planner_cfg, "cem": cem, "grad": grad}
    return _within(planner_cfg, bounds, "planner")


def _within(cfg: Mapping[str, Any], bounds: dict[str, Any], where: str) -> dict[str, Any]:
    out = {**bounds, **cfg}
    for key, inside in (("low", np.greater_equal), ("high", np.less_equal)):
        given, limit = cfg.get(key), np.asarray(bounds[key], dtype=float)
        if given is None:
            continue
        try:
            ok = bool(np.all(inside(np.broadcast_to(np.asarray(given, dtype=float), limit.shape), limit)))
        except (ValueError, TypeError):
            need = f"a number or {limit.size} numbers"
            raise ValueError(f"{where}.{key} must be {need}, got {given!r}") from None
        if not ok:
            raise ValueError(
                f"{where}.{key}={given!r} reaches outside the task's action limits ({key} "
                f"{[round(float(v), 6) for v in limit]}): give bounds within them, or leave it out"
            )
    return out


def build_mpc(
    model: Any,
    low: np.ndarray,
    high: np.ndarray,
    planner_cfg: Mapping[str, Any],
    mpc_cfg: MPCConfig | None = None,
    graph: LatentGraph | None = None,
) -> MPC:
    """MPC over `model` for raw actions bounded by [low, high] (the robot's action limits); with a
    `graph`, every replan aims at latent-graph subgoals when the goal is far."""
    io = model.io_spec
    if len(np.atleast_1d(low)) != io.action_dim:
        raise ValueError(
            f"the robot's actions have {len(np.atleast_1d(low))} dims, the world model's {io.action_dim}: "
            "a model trained on another task?"
        )
    cfg = with_bounds(planner_cfg, planner_bounds(low, high, io.frameskip))
    subgoals = SubgoalSelector(graph, model) if graph is not None else None
    return MPC(model, build_planner(cfg, model), mpc_cfg, subgoals)


def graph_nodes(store: DemoStore, io: IOSpec, cfg: GraphConfig) -> tuple[np.ndarray, np.ndarray]:
    """The global steps of the subgoal graph's nodes in `store` (every `cfg.stride` steps of every
    episode, sorted) and each one's episode; ValueError in one line for a store the graph cannot be built
    from: without the world model's keys (`io`), with other shapes of them (a torch reshape error when
    the graph was built), or without episodes (a numpy error before)."""
    missing = [k for k in io.obs_keys if k not in store.schema.keys]
    if missing:
        raise ValueError(f"{store.path} lacks the world model's keys {missing}: not its training store?")
    wanted = {k: "(H, W, 3)" for k in io.image_keys}
    if io.proprio_key is not None:
        wanted[io.proprio_key] = f"({io.proprio_dim},)"
    for key, shape in wanted.items():
        have = tuple(store.schema.keys[key].shape)
        fits = len(have) == 3 and have[-1] == 3 if key in io.image_keys else have == (io.proprio_dim,)
        if not fits:
            raise ValueError(
                f"{store.path}: key {key!r} is {have}, the world model reads {shape}: not its training store?"
            )
    if not store.n_episodes:
        raise ValueError(f"{store.path} holds no episodes to build the subgoal graph from")
    steps, episode = [], []
    for e in range(store.n_episodes):
        sl = store.episode_slice(e)
        idx = np.arange(sl.start, sl.stop, cfg.stride)
        steps.append(idx)
        episode.append(np.full(len(idx), e))
    return np.concatenate(steps), np.concatenate(episode)


@torch.no_grad()
def build_graph(model: Any, store_path: str, cfg: GraphConfig, batch: int = 256) -> LatentGraph:
    """Latent graph over the store's frames, every `cfg.stride` steps of every episode, encoded and
    measured by the world model itself (`encode`, `cost_vectors`); only the nodes' rows are read, `batch`
    at a time (the whole store was read, then most of it thrown away)."""
    io = model.io_spec
    device = next(model.parameters()).device
    vectors, parts = [], {}
    with DemoStore.open(store_path) as store:
        steps_all, episode = graph_nodes(store, io, cfg)
        for i in range(0, len(steps_all), batch):
            frames = {k: store.read_rows(k, steps_all[i : i + batch]) for k in io.obs_keys}  # N nodes
            z = model.encode(to_model_inputs([frames], io, device))  # leading (N, 1)
            vectors.append(model.cost_vectors(z).cpu())
            for k, v in z.items():
                parts.setdefault(k, []).append(v.cpu())
    latents = {k: torch.cat(v) for k, v in parts.items()}
    return LatentGraph(torch.cat(vectors), latents, episode, cfg)
