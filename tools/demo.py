"""`wm-demo out=DIR`: the whole pipeline on a fresh machine, in minutes on a CPU.

1. Record pointmaze demonstrations with the scripted expert (with action noise for diversity).
2. Train the world model (the small CNN encoder; see configs/model/dino_wm.yaml for DINOv2).
3. Plan with MPC to goals in a different arm of the U-maze from the start, and run a random-action
   baseline on the same seeds. Prints both success rates and where the videos and the HTML report
   are; writes DIR/results.json with `success_rate`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tools._cli import bind, run


@dataclass(frozen=True)
class DemoConfig:
    out: str = "out/demo"
    task: str = "pointmaze"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    collect: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)


def demo(cfg: DemoConfig) -> int:
    from tools.collect import CollectConfig, collect
    from tools.eval import EvalConfig, evaluate
    from tools.train import TrainAppConfig, train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store, run_dir = out / "demos.zarr", out / "world_model"
    times: dict[str, float] = {}
    t = time.perf_counter()
    have = _episodes(store)
    wanted = int(cfg.collect.get("episodes", 200))
    if have < wanted:  # resumable: a rerun tops the store up instead of starting over
        collect(
            CollectConfig(
                task=cfg.task,
                store=str(store),
                teleop="scripted",
                seed=cfg.seed,
                preview="false",
                **{**cfg.collect, "episodes": wanted - have},
            )
        )
    times["collect_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train(
        TrainAppConfig(
            store=str(store),
            out=str(run_dir),
            model=dict(cfg.model),
            trainer=dict(cfg.trainer),
            task=cfg.task,
            seed=cfg.seed,
        )
    )
    times["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    common = {k: v for k, v in cfg.eval.items() if k not in ("planner", "execute", "subgoals", "graph")}
    mpc = evaluate(
        EvalConfig(
            out=str(out / "eval_mpc"), task=cfg.task, controller="mpc", checkpoint=str(run_dir), **cfg.eval
        )
    )
    times["eval_mpc_s"] = time.perf_counter() - t
    rnd = evaluate(EvalConfig(out=str(out / "eval_random"), task=cfg.task, controller="random", **common))
    times["total_s"] = sum(times.values()) + (time.perf_counter() - t - times["eval_mpc_s"])
    results = {
        "success_rate": mpc["success_rate"],
        "random_success_rate": rnd["success_rate"],
        "episodes": mpc["episodes"],
        "goal_mode": cfg.eval.get("task_options", {}).get("goal_mode", "any"),
        "mean_final_distance": mpc["mean_final_distance"],
        "random_mean_final_distance": rnd["mean_final_distance"],
        "planning_seconds_per_step": mpc["planning_seconds_per_step"],
        "videos": str(out / "eval_mpc" / "videos"),
        "report": str(out / "eval_mpc" / "report.html"),
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nMPC success {mpc['success_rate']:.0%} vs random actions {rnd['success_rate']:.0%} "
        f"on {mpc['episodes']} {cfg.task} episodes with goals in another arm of the maze"
    )
    print(f"videos (camera | world-model prediction | goal): {results['videos']}")
    print(f"report (results, videos): {results['report']}")
    print(f"results: {out / 'results.json'}; took {times['total_s'] / 60:.1f} min")
    return 0


def _episodes(store: Path) -> int:
    from wm.data import DemoStore

    if not store.exists():
        return 0
    with DemoStore.open(store) as s:
        return s.n_episodes


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(lambda: demo(bind(DemoConfig, cfg)))


if __name__ == "__main__":
    main()
