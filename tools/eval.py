"""`wm-eval task=pointmaze controller=mpc checkpoint=DIR episodes=50 out=DIR`: closed-loop evaluation of
MPC over a world model (`controller=mpc`), a diffusion policy (`controller=policy`) or random actions.

Writes `out/results.json` (success rate, final distance to goal, planning time), an mp4 per recorded
episode (real frames beside the world model's decoded prediction) and, with `budgets=[...]`, a plot
of success against planner iterations.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from tools._cli import bind, run


@dataclass(frozen=True)
class EvalConfig:
    out: str
    task: str = "pointmaze"
    controller: str = "mpc"
    checkpoint: str | None = None
    episodes: int = 50
    parallel: int = 10
    seed: int = 1000
    videos: int = 4
    max_steps: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    planner: dict[str, Any] = field(default_factory=dict)
    execute: int = 1
    subgoals: str = "auto"
    graph: dict[str, Any] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=list)
    objective: str = "checkpoint"
    policy: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.controller not in ("mpc", "policy", "random"):
            raise ValueError(f"controller must be mpc, policy or random, got {self.controller!r}")
        if self.controller != "random" and not self.checkpoint:
            raise ValueError(
                f"controller={self.controller} needs checkpoint=DIR (a wm-train output directory)"
            )
        if self.episodes < 1 or self.parallel < 1:
            raise ValueError("episodes and parallel must be >= 1")
        if self.objective not in ("checkpoint", "last_frame", "all_frames"):
            raise ValueError(f"objective must be checkpoint, last_frame or all_frames: {self.objective!r}")
        if self.subgoals not in ("auto", "on", "off"):
            raise ValueError(f"subgoals must be auto, on or off, got {self.subgoals!r}")
        valid = ("sampler", "sampler_steps", "edm_solver", "precision")
        unknown = sorted(set(self.policy) - set(valid))
        if unknown:
            raise ValueError(f"policy options {unknown} unknown; valid: {', '.join(valid)}")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write results.json; returns the results."""
    from policies.evaluate import RandomPolicy, model_obs, run_episodes, summarize, timed
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from wm.trainer import pick_device

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    opts = {"options": dict(cfg.task_options), **({"max_steps": cfg.max_steps} if cfg.max_steps else {})}
    model, setup, policy, history = None, {}, None, 1
    if cfg.controller == "mpc":
        from wm.dino_wm import load_world_model

        model, ckpt = load_world_model(cfg.checkpoint, device)
        if cfg.objective != "checkpoint":  # the planning objective is the model's cost; override it here
            model.cfg = dataclasses.replace(model.cfg, cost_all_frames=cfg.objective == "all_frames")
        opts["image_size"] = model.cfg.image_size
        setup = ckpt.get("extra", {}).get("run_config", {})
        image_keys = [model.cfg.image_key]
        proprio_key = model.cfg.proprio_key if model.cfg.proprio_dim else None
    elif cfg.controller == "policy":
        from policies.diffusion import load_diffusion_policy

        policy, _ = load_diffusion_policy(cfg.checkpoint, device)
        over = {k: v for k, v in cfg.policy.items() if v is not None}
        if {"sampler", "sampler_steps", "edm_solver"} & set(over):
            policy.set_sampler(
                over.get("sampler", policy.sampler),
                int(over.get("sampler_steps", policy.sampler_steps)),
                over.get("edm_solver"),
            )
        if "precision" in over:
            policy.set_precision(over["precision"])
        opts["image_size"] = policy.cfg.obs.image_size
        image_keys, proprio_key = list(policy.cfg.obs.image_keys), policy.cfg.obs.proprio_key
        history = policy.cfg.n_obs
    n = min(cfg.parallel, cfg.episodes)
    tasks = [make_task(cfg.task, SimConfig(**opts)) for _ in range(n)]
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    if cfg.controller == "random":
        image_keys, proprio_key = [_first(tasks[0], "image")], None
    image_key = image_keys[0]

    def to_model(obs: list) -> dict:
        return {k: v.to(device) for k, v in model_obs(obs, image_keys, proprio_key).items()}

    def episodes(policy: Any, video: bool) -> dict[str, Any]:
        results, wall = timed(
            lambda: run_episodes(
                tasks,
                policy,
                seeds,
                to_model,
                image_key=image_key,
                predict_frames=_predictor(model) if model else None,
                video_dir=out / "videos" if video and cfg.videos else None,
                videos=cfg.videos,
                history=history,
            )
        )
        return summarize(results, wall)

    if cfg.controller == "random":
        feat = tasks[0].action_feature
        results = episodes(RandomPolicy(feat.low, feat.high, n, cfg.seed), video=True)
    elif cfg.controller == "policy":
        results = episodes(policy, video=True)
        results["inference"] = {
            "sampler": policy.sampler,
            "sampler_steps": policy.sampler_steps,
            "edm_solver": policy.diffusion.cfg.edm_solver,
            "precision": policy.precision,
        }
    else:
        policy = _mpc(cfg, model, tasks[0], setup, cfg.planner)
        results = episodes(policy, video=True)
        results["subgoal_replans"] = getattr(policy, "subgoal_count", 0)
        if cfg.budgets:
            results["budgets"] = _budget_sweep(cfg, model, tasks[0], setup, episodes, out)
    results.update(
        task=cfg.task, controller=cfg.controller, checkpoint=cfg.checkpoint, seeds=seeds[:1] + seeds[-1:]
    )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _first(task: Any, kind: str) -> str:
    return next(k for k, f in task.observation_features.items() if f.kind == kind)


def _mpc(cfg: EvalConfig, model: Any, task: Any, setup: dict, planner: dict) -> Any:
    from policies.build import build_graph, build_mpc, with_subgoals
    from policies.subgoal import GraphConfig

    mpc = build_mpc(model, task, dict(planner), cfg.execute)
    store = setup.get("store")
    if cfg.subgoals == "off" or (cfg.subgoals == "auto" and not (store and Path(store).exists())):
        return mpc
    if not store or not Path(store).exists():
        raise ValueError(f"subgoals=on needs the training store, which the checkpoint names as {store!r}")
    return with_subgoals(mpc, build_graph(model, store, GraphConfig(**cfg.graph)))


def _predictor(model: Any) -> Any:
    """Decoded frames of the latest plan's first predicted step, per episode: (E, H, W, 3) uint8."""

    @torch.no_grad()
    def predict(obs: dict, policy: Any) -> np.ndarray:
        result = policy.last_result
        pred = model.rollout(model.encode(obs), result.actions[:, None, :1])  # leading (E, 1, 1)
        img = model.decode({k: v[:, 0, 0] for k, v in pred.items()})  # (E, 3, H, W)
        return (img.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy()

    return predict


def _budget_sweep(cfg: EvalConfig, model: Any, task: Any, setup: dict, episodes: Any, out: Path) -> list:
    points = []
    for iters in cfg.budgets:
        res = episodes(_mpc(cfg, model, task, setup, {**cfg.planner, "iterations": int(iters)}), video=False)
        points.append(
            {
                "iterations": int(iters),
                "success_rate": res["success_rate"],
                "planning_seconds_per_step": res["planning_seconds_per_step"],
            }
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([p["iterations"] for p in points], [p["success_rate"] for p in points], marker="o")
    ax.set(xlabel="planner iterations per replan", ylabel="success rate", ylim=(0, 1.02), title=cfg.task)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "success_vs_budget.png", dpi=120)
    return points


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def body() -> int:
        res = evaluate(bind(EvalConfig, cfg))
        keys = ("success_rate", "mean_final_distance", "mean_max_score", "planning_seconds_per_step")
        print(json.dumps({k: res[k] for k in keys if res[k] is not None}))
        return 0

    run(body)


if __name__ == "__main__":
    main()
