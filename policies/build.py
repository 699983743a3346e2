"""Building controllers at the edge: MPC over a world model (with optional latent-graph subgoals)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from policies.evaluate import model_obs
from policies.mpc import MPC, MPCConfig
from policies.planners import build_planner
from policies.subgoal import GraphConfig, LatentGraph, SubgoalMPC
from wm.data import DemoStore


def planner_bounds(low: np.ndarray, high: np.ndarray, frameskip: int) -> dict[str, Any]:
    """Bounds and initial spread for a planning step of `frameskip` raw actions."""
    lo = np.tile(np.asarray(low, dtype=float), frameskip)
    hi = np.tile(np.asarray(high, dtype=float), frameskip)
    return {"low": tuple(lo), "high": tuple(hi), "init_std": float(np.mean(hi - lo) / 2)}


def with_bounds(planner_cfg: dict[str, Any], bounds: dict[str, Any]) -> dict[str, Any]:
    """The planner config with the task's action bounds filled in where it gives none: at the top for
    cem / mppi / gd (init_std only for the sampling planners), in both stages for cem_gd."""
    name = planner_cfg.get("name", "cem")
    if name == "cem_gd":
        cem = {**bounds, **planner_cfg.get("cem", {})}
        grad = {k: v for k, v in bounds.items() if k != "init_std"} | planner_cfg.get("grad", {})
        return {**planner_cfg, "cem": cem, "grad": grad}
    own = bounds if name in ("cem", "mppi") else {k: v for k, v in bounds.items() if k != "init_std"}
    return {**own, **planner_cfg}


def build_mpc(model: Any, task: Any, planner_cfg: dict[str, Any], execute: int) -> MPC:
    feat = task.action_feature
    cfg = with_bounds(planner_cfg, planner_bounds(feat.low, feat.high, model.cfg.frameskip))
    planner = build_planner(cfg, model)
    return MPC(model, planner, MPCConfig(execute=execute, frameskip=model.cfg.frameskip))


@torch.no_grad()
def build_graph(model: Any, store_path: str, cfg: GraphConfig, batch: int = 256) -> LatentGraph:
    """Latent graph over the store's frames, every `cfg.stride` steps of every episode."""
    c = model.cfg
    device = next(model.parameters()).device
    with DemoStore.open(store_path) as store:
        keys = [c.image_key] + ([c.proprio_key] if c.proprio_dim else [])
        steps, episode = [], []
        for e in range(store.n_episodes):
            sl = store.episode_slice(e)
            idx = np.arange(sl.start, sl.stop, cfg.stride)
            steps.append(idx)
            episode.append(np.full(len(idx), e))
        steps_all = np.concatenate(steps)
        data = {k: store.read(k, slice(0, store.n_steps))[steps_all] for k in keys}
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(steps_all), batch):
        frames = [{k: v[j] for k, v in data.items()} for j in range(i, min(i + batch, len(steps_all)))]
        obs = model_obs(frames, c.image_key, c.proprio_key if c.proprio_dim else None)
        z = model.encode({k: v.to(device) for k, v in obs.items()})
        for k in ("visual", "proprio"):
            if k in z:
                parts.setdefault(k, []).append(z[k][:, 0].cpu())
    latents = {k: torch.cat(v) for k, v in parts.items()}
    return LatentGraph(latents, np.concatenate(episode), cfg, model.cfg.cost_proprio_weight)


def with_subgoals(mpc: MPC, graph: LatentGraph) -> SubgoalMPC:
    return SubgoalMPC(mpc, graph)
