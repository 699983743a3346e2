"""`wm-eval task=pointmaze controller=mpc checkpoint=DIR episodes=50 out=DIR`: closed-loop evaluation of
MPC over a world model (`controller=mpc`, `planner=cem|mppi|gd|cem_gd`), a policy (`controller=policy`)
or random actions, on any checkpoint the model registry loads.

Writes `out/results.json` (success rate, final distance to goal, planning time), one mp4 per recorded
episode (camera | the controller's view | goal, labelled success or failure), `out/report.html`
(everything in one page) and, with `budgets=[...]`, a plot of success against planner iterations.
A progress bar on stderr shows episodes done, running success and planning time per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tools._cli import bind, run

CONTROLLERS = ("mpc", "policy", "random")
POLICY_OPTIONS = {  # wm-eval policy.<name> -> the model config field it overrides at load time
    "sampler": "sampler",
    "sampler_steps": "sampler_steps",
    "edm_solver": "noise.edm_solver",
    "precision": "precision",
    "temporal_ensemble": "temporal_ensemble",
}


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
    planner: dict[str, Any] = field(default_factory=lambda: {"name": "cem"})
    planner_budget: dict[str, Any] = field(default_factory=dict)
    execute: int = 1
    subgoals: str = "auto"
    store: str | None = None
    graph: dict[str, Any] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=list)
    objective: str = "checkpoint"
    policy: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        from policies.base import Budget
        from policies.planners import planner_config
        from policies.subgoal import GraphConfig

        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got {self.controller!r}")
        if self.controller != "random" and not self.checkpoint:
            raise ValueError(
                f"controller={self.controller} needs checkpoint=DIR (a wm-train output directory)"
            )
        if self.episodes < 1 or self.parallel < 1 or self.videos < 0:
            raise ValueError("episodes and parallel must be >= 1 and videos >= 0")
        if self.objective not in ("checkpoint", "last_frame", "all_frames"):
            raise ValueError(f"objective must be checkpoint, last_frame or all_frames: {self.objective!r}")
        if self.subgoals not in ("auto", "on", "off"):
            raise ValueError(f"subgoals must be auto, on or off, got {self.subgoals!r}")
        unknown = sorted(set(self.policy) - set(POLICY_OPTIONS))
        if unknown:
            raise ValueError(f"policy options {unknown} unknown; valid: {', '.join(POLICY_OPTIONS)}")
        unknown = sorted(set(self.planner_budget) - {"iterations", "seconds"})
        if unknown:
            raise ValueError(f"planner_budget options {unknown} unknown; valid: iterations, seconds")
        Budget(self.planner_budget.get("iterations"), self.planner_budget.get("seconds"))
        GraphConfig(**self.graph)
        if "name" not in self.planner:
            raise ValueError("planner needs a name (planner=cem | mppi | gd | cem_gd)")
        most = planner_config(**self.planner).max_iterations  # validates the planner's own fields
        bad = [b for b in self.budgets if not 1 <= int(b) <= most]
        if bad:
            raise ValueError(
                f"budgets {bad} outside 1..{most}: a budget caps the {self.planner['name']} planner's own "
                f"{most} iterations; raise them (e.g. planner.iterations) to sweep higher"
            )


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation, write results.json, the videos and report.html; returns the results."""
    from policies.evaluate import RandomPolicy, run_episodes, summarize, timed
    from policies.progress import EvalProgress
    from policies.report import write_report
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from wm.registry import load_model
    from wm.trainer import pick_device

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    opts: dict[str, Any] = {"options": dict(cfg.task_options)}
    if cfg.max_steps:
        opts["max_steps"] = cfg.max_steps
    loaded = None
    if cfg.controller != "random":
        loaded = load_model(cfg.checkpoint, device, _overrides(cfg), controller=cfg.controller)
        opts["image_size"] = loaded.model.io_spec.image_size
    n = min(cfg.parallel, cfg.episodes)
    tasks = [make_task(cfg.task, SimConfig(**opts)) for _ in range(n)]
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    feat = tasks[0].action_feature
    videos: list[Path] = []

    def episodes(policy: Any, video: bool, desc: str) -> dict[str, Any]:
        with EvalProgress(cfg.episodes, disable=not cfg.progress, desc=desc) as bar:
            results, wall = timed(
                lambda: run_episodes(
                    tasks,
                    policy,
                    seeds,
                    video_dir=out / "videos" if video and cfg.videos else None,
                    videos=cfg.videos,
                    progress=bar.update,
                    written=videos,
                )
            )
        return summarize(results, wall)

    plot = None
    if cfg.controller == "random":
        results = episodes(RandomPolicy(feat.low, feat.high, cfg.seed), True, "random")
    elif cfg.controller == "policy":
        results = episodes(loaded.policy(), True, "policy")
    else:
        make = _mpc_builder(cfg, loaded, feat)
        mpc = make(cfg.planner_budget.get("iterations"))
        results = episodes(mpc, True, "mpc")
        results["subgoal_replans"] = mpc.subgoals.count if mpc.subgoals is not None else 0
        if cfg.budgets:
            results["budgets"], plot = _budget_sweep(cfg, make, episodes, out)
    if loaded is not None:
        results["inference"] = loaded.inference_settings()
    results.update(
        task=cfg.task, controller=cfg.controller, checkpoint=cfg.checkpoint, seeds=seeds[:1] + seeds[-1:]
    )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(out, results, videos, plot)
    if cfg.progress:
        where = f"results: {out / 'results.json'}; report: {report}"
        print(where + (f"; videos: {out / 'videos'}" if videos else ""), flush=True)
    return results


def _overrides(cfg: EvalConfig) -> dict[str, Any]:
    """Inference settings for the registry to build the model with (not patched on afterwards)."""
    if cfg.controller == "policy":
        return {POLICY_OPTIONS[k]: v for k, v in cfg.policy.items() if v is not None}
    if cfg.objective != "checkpoint":
        return {"cost_all_frames": cfg.objective == "all_frames"}
    return {}


def _mpc_builder(cfg: EvalConfig, loaded: Any, feat: Any) -> Any:
    """A function of an iteration cap -> a fresh MPC over the loaded world model (the subgoal graph is
    built once and shared)."""
    from policies.build import build_graph, build_mpc
    from policies.mpc import MPCConfig
    from policies.subgoal import GraphConfig

    store = _graph_store(cfg, loaded.checkpoint)
    graph = build_graph(loaded.model, store, GraphConfig(**cfg.graph)) if store else None
    seconds = cfg.planner_budget.get("seconds")

    def make(iterations: int | None) -> Any:
        mpc_cfg = MPCConfig(execute=cfg.execute, max_iterations=iterations, seconds=seconds)
        return build_mpc(loaded.model, feat.low, feat.high, cfg.planner, mpc_cfg, graph)

    return make


def _graph_store(cfg: EvalConfig, ckpt: dict[str, Any]) -> str | None:
    """The store the subgoal graph is built from: `store=`, else the one the checkpoint was trained on.
    With subgoals=auto and no store found, subgoals are off, and the evaluation says so."""
    if cfg.subgoals == "off":
        return None
    recorded = ckpt.get("extra", {}).get("run_config", {}).get("store")
    store = cfg.store or recorded
    if store and Path(store).exists():
        return str(store)
    why = (
        f"the training store {store!r} does not exist" if store else "the checkpoint names no training store"
    )
    if cfg.subgoals == "on":
        raise ValueError(f"subgoals=on needs the training store: {why}; pass store=PATH")
    print(f"note: subgoals off: {why} (pass store=PATH to use them)", flush=True)
    return None


def _budget_sweep(cfg: EvalConfig, make: Any, episodes: Any, out: Path) -> tuple[list, Path]:
    points = []
    for iters in cfg.budgets:
        res = episodes(make(int(iters)), False, f"budget {iters}")
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
    path = out / "success_vs_budget.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points, path


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
