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

from omegaconf import DictConfig

from policies.base import Budget
from policies.subgoal import GraphConfig
from tools._cli import UsageError, app, bind, build, one_of

CONTROLLERS = ("mpc", "policy", "random")
POLICY_OPTIONS = {  # wm-eval policy.<name> -> the model config field it overrides at load time
    "sampler": "sampler",
    "sampler_steps": "sampler_steps",
    "edm_solver": "noise.edm_solver",
    "precision": "precision",
    "temporal_ensemble": "temporal_ensemble",
}


@dataclass(frozen=True)
class PolicyOptions:
    """`policy.*`: overrides of a policy checkpoint's inference settings (None: the checkpoint's own)."""

    sampler: str | None = None
    sampler_steps: int | None = None
    edm_solver: str | None = None
    precision: str | None = None
    temporal_ensemble: float | None = None


@dataclass(frozen=True)
class PlannerBudget:
    """`planner_budget.*`: a cap on every replan (None: none)."""

    iterations: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        Budget(self.iterations, self.seconds)  # its checks


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
    planner_budget: PlannerBudget = field(default_factory=PlannerBudget)
    execute: int = 1
    subgoals: str = "auto"
    store: str | None = None
    graph: GraphConfig = field(default_factory=GraphConfig)
    budgets: list[int] = field(default_factory=list)
    objective: str = "checkpoint"
    precision: str | None = None
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        from policies.planners import PLANNERS
        from robots.registry import task_entry

        one_of("controller", self.controller, CONTROLLERS)
        if self.controller != "random" and not self.checkpoint:
            raise UsageError(
                f"controller={self.controller} needs checkpoint=DIR (a wm-train output directory)"
            )
        if self.episodes < 1 or self.parallel < 1 or self.videos < 0:
            raise ValueError("episodes and parallel must be >= 1 and videos >= 0")
        one_of("objective", self.objective, ("checkpoint", "last_frame", "all_frames"))
        one_of("subgoals", self.subgoals, ("auto", "on", "off"))
        if self.precision is not None:
            one_of("precision", self.precision, ("fp32", "bf16", "auto"))
            if self.controller != "mpc":
                raise UsageError(
                    "precision= sets the world model's planning precision; for a policy use policy.precision="
                )
        build(task_entry(self.task).options, self.task_options, "task_options")
        rest = {k: v for k, v in self.planner.items() if k != "name"}
        name = self.planner.get("name")
        one_of("planner.name", name, list(PLANNERS))
        most = build(PLANNERS[name][0], rest, "planner").max_iterations
        bad = [b for b in self.budgets if not 1 <= int(b) <= most]
        if bad:
            raise ValueError(
                f"budgets {bad} outside 1..{most}: a budget caps the {name} planner's own "
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

    out = Path(cfg.out)
    device = _device(cfg.device)
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
    out.mkdir(parents=True, exist_ok=True)  # after everything that can refuse the command

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
        mpc = make(cfg.planner_budget.iterations)
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
    where = f"wrote results {out / 'results.json'}, report {report}"
    print(where + (f", videos {out / 'videos'}" if videos else ""), flush=True)
    return results


def _device(name: str) -> Any:
    from wm.trainer import pick_device

    try:
        return pick_device(name)
    except RuntimeError as e:  # torch's words for a device name it does not know or does not have
        raise UsageError(f"device={name}: {str(e).splitlines()[0]}") from e


def _overrides(cfg: EvalConfig) -> dict[str, Any]:
    """Inference settings for the registry to build the model with (not patched on afterwards)."""
    if cfg.controller == "policy":
        return {POLICY_OPTIONS[k]: v for k, v in cfg.policy.__dict__.items() if v is not None}
    over: dict[str, Any] = {"predictor_precision": cfg.precision} if cfg.precision else {}
    if cfg.objective != "checkpoint":
        over["cost_all_frames"] = cfg.objective == "all_frames"
    return over


def _mpc_builder(cfg: EvalConfig, loaded: Any, feat: Any) -> Any:
    """A function of an iteration cap -> a fresh MPC over the loaded world model (the subgoal graph is
    built once and shared)."""
    from policies.build import build_graph, build_mpc
    from policies.mpc import MPCConfig

    store = _graph_store(cfg, loaded.checkpoint)
    graph = build_graph(loaded.model, store, cfg.graph) if store else None
    seconds = cfg.planner_budget.seconds

    def make(iterations: int | None) -> Any:
        mpc_cfg = MPCConfig(execute=cfg.execute, max_iterations=iterations, seconds=seconds)
        return build_mpc(loaded.model, feat.low, feat.high, cfg.planner, mpc_cfg, graph)

    return make


def _graph_store(cfg: EvalConfig, ckpt: dict[str, Any]) -> str | None:
    """The store the subgoal graph is built from: `store=`, else the one the checkpoint was trained on.
    With subgoals=auto and no store found, subgoals are off, and the evaluation says so."""
    if cfg.subgoals == "off":
        return None
    run = ckpt.get("extra", {}).get("run_config", {})
    store = cfg.store or run.get("store")
    if store and Path(store).exists():
        _say_if_changed(str(store), run)
        return str(store)
    why = (
        f"the training store {store!r} does not exist" if store else "the checkpoint names no training store"
    )
    if cfg.subgoals == "on":
        raise ValueError(f"subgoals=on needs the training store: {why}; pass store=PATH")
    print(f"note: subgoals off: {why} (pass store=PATH to use them)", flush=True)
    return None


def _say_if_changed(store: str, run: dict[str, Any]) -> None:
    """One line when the store differs from the one the world model was trained on (its fingerprint)."""
    from wm.data import DemoStore

    if "store_fingerprint" not in run:
        return
    with DemoStore.open(store) as s:
        if s.fingerprint == run["store_fingerprint"]:
            return
        now = s.n_episodes
    print(
        f"note: subgoals from {store}, which is not the store the world model was trained on "
        f"({run.get('store_episodes')} episodes then, {now} now; content differs)",
        flush=True,
    )


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


def _main(cfg: DictConfig) -> int:
    res = evaluate(bind(EvalConfig, cfg))
    keys = ("success_rate", "mean_final_distance", "mean_max_score", "planning_seconds_per_step")
    print(json.dumps({k: res[k] for k in keys if res[k] is not None}))
    return 0


main = app("eval", _main)

if __name__ == "__main__":
    main()
