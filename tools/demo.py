"""`wm-demo out=DIR`: the whole pipeline on a fresh machine, in minutes on a CPU.

1. Record pointmaze demonstrations with the scripted expert (with action noise for diversity).
2. Train the world model (the small CNN encoder; see configs/model/dino_wm.yaml for DINOv2).
3. Plan with MPC to goals in a different arm of the U-maze from the start (`eval.task_options.goal_mode`),
   and run a random-action baseline on the same seeds. Prints both success rates and where the videos
   (when some were recorded) and the HTML report are; writes DIR/results.json with `success_rate`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools._cli import UsageError, app, bind, build, folder
from tools.collect import CollectConfig, collect
from tools.eval import EvalConfig, evaluate

GOALS = {  # pointmaze's goal_mode, in the closing line's words
    None: "",
    "any": " with goals in any other cell of the maze",
    "other_arm": " with goals in another arm of the maze",
}


@dataclass(frozen=True)
class DemoConfig:
    out: str = "out/demo"
    task: str = "pointmaze"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    collect: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        folder("out", self.out, "give the demo's folder (new, or an earlier run's)")


@dataclass(frozen=True)
class DemoSteps:
    """The config of every step, built and checked before the first one starts."""

    collect: CollectConfig  # `episodes`: the store's total (a rerun tops the store up)
    train: Any  # tools.train.TrainAppConfig
    mpc: EvalConfig
    random: EvalConfig


def _step(cls: type, path: str, fixed: dict[str, Any], user: dict[str, Any]) -> Any:
    taken = sorted(set(fixed) & set(user))
    if taken:
        raise UsageError(f"{path}.{taken[0]} is set by wm-demo itself (from out=, task=, seed=)")
    return build(cls, {**fixed, **user}, path)


def steps(cfg: DemoConfig) -> DemoSteps:
    from tools.train import TrainAppConfig, check_best_metric
    from wm.encoders import EncoderConfig, check_weights
    from wm.registry import model_entry
    from wm.trainer import TrainerConfig

    out = Path(cfg.out)
    store, run_dir = str(out / "demos.zarr"), str(out / "world_model")
    mpc_only = (
        "planner",
        "execute",
        "subgoals",
        "graph",
        "planner_budget",
        "objective",
        "store",
        "precision",
    )
    evals = dict(cfg.eval)
    if cfg.task == "pointmaze":  # the demo's goals: another arm of the maze, unless given otherwise
        evals["task_options"] = {"goal_mode": "other_arm", **(evals.get("task_options") or {})}
    common = {k: v for k, v in evals.items() if k not in (*mpc_only, "budgets")}  # the random baseline
    trainer = build(TrainerConfig, cfg.trainer, "trainer")
    kind = cfg.model.get("type")
    if kind is not None and "mpc" not in model_entry(kind).controllers:  # refused after training, before
        raise UsageError(
            f"model={kind} cannot serve MPC, which the demo plans with (a world model: model=dino_wm); "
            "train other models with wm-train"
        )
    fixed = {"task": cfg.task, "store": store, "teleop": "scripted", "seed": cfg.seed, "preview": "false"}
    plan = DemoSteps(
        collect=_step(CollectConfig, "collect", fixed, {"episodes": 200, **cfg.collect}),
        train=_step(
            TrainAppConfig,
            "train",
            {"store": store, "out": run_dir, "task": cfg.task, "seed": cfg.seed},
            {"model": dict(cfg.model), "trainer": dict(cfg.trainer)},
        ),
        mpc=_step(
            EvalConfig,
            "eval",
            {"out": str(out / "eval_mpc"), "task": cfg.task, "controller": "mpc", "checkpoint": run_dir},
            evals,
        ),
        random=_step(
            EvalConfig,
            "eval",
            {"out": str(out / "eval_random"), "task": cfg.task, "controller": "random"},
            common,
        ),
    )
    check_best_metric(plan.train.model["type"], trainer.best_metric)  # wm-train's, before collecting
    check_model_options(plan.train.model)
    encoder = plan.train.model.get("encoder")
    if isinstance(encoder, Mapping):  # its weights file, too (the rest of the model needs the data)
        check_weights(build(EncoderConfig, dict(encoder), "model.encoder"))
    return plan


def check_model_options(model: Mapping[str, Any]) -> None:
    """The model's options checked as its config type checks them (model.predictor_dim=abc was refused
    only after 200 episodes were collected), with its defaults where the store decides (frame size,
    dimensions); where its YAML's own options fail so (a check needing the store), left to training."""
    from omegaconf import OmegaConf

    import configs
    from wm.registry import model_entry

    kind = str(model.get("type"))
    config_type = model_entry(kind).config_type
    try:
        config_type.from_dict({k: v for k, v in model.items() if k != "type"})
    except ValueError as e:
        yaml = Path(configs.__file__).parent / "model" / f"{kind}.yaml"
        defaults = OmegaConf.to_container(OmegaConf.load(yaml)) if yaml.is_file() else None
        try:
            config_type.from_dict({k: v for k, v in dict(defaults or {}).items() if k != "type"})
        except ValueError:
            return
        raise UsageError(str(e) if str(e).startswith("model.") else f"model: {e}") from None


def demo(cfg: DemoConfig) -> int:
    from tools.train import train

    plan = steps(cfg)  # every config checked before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    have, wanted = _episodes(Path(plan.collect.store)), plan.collect.episodes
    _check_top_up(have, wanted, Path(plan.train.out), plan.collect.store)
    if have < wanted:  # resumable: a rerun tops the store up instead of starting over
        status = collect(dataclasses.replace(plan.collect, episodes=wanted - have))
        have = _episodes(Path(plan.collect.store))
        if status or have < wanted:  # Ctrl-C (0) or SIGTERM (143) in the collection: it trained on the
            # episodes so far, and the rerun was refused for the model trained on them
            print(
                f"the demo stopped: its store holds {have} of the {wanted} episodes; the same command "
                "again collects the rest and goes on",
                file=sys.stderr,
            )
            return status or 128 + signal.SIGINT
    times["collect_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train(plan.train)
    times["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mpc = evaluate(plan.mpc)
    times["eval_mpc_s"] = time.perf_counter() - t
    rnd = evaluate(plan.random)
    times["total_s"] = sum(times.values()) + (time.perf_counter() - t - times["eval_mpc_s"])
    results = {
        "success_rate": mpc["success_rate"],
        "random_success_rate": rnd["success_rate"],
        "episodes": mpc["episodes"],
        "goal_mode": _goal_mode(plan.mpc),
        "mean_final_distance": mpc["mean_final_distance"],
        "random_mean_final_distance": rnd["mean_final_distance"],
        "planning_seconds_per_step": mpc["planning_seconds_per_step"],
        # absolute: relative to where the command ran, they named nothing from results.json's folder
        "videos": str((out / "eval_mpc" / "videos").absolute()) if mpc["videos"] else None,
        "report": str((out / "eval_mpc" / "report.html").absolute()),
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + "\n".join(closing_lines(results, cfg.task, out / "results.json")))
    return 0


def closing_lines(results: dict[str, Any], task: str, path: Path) -> list[str]:
    """What wm-demo prints at the end, all from its `results` (written to `path`): the goals as the
    evaluation set them, the videos only when some were recorded."""
    goals = GOALS.get(results["goal_mode"], f" (goal_mode={results['goal_mode']})")
    lines = [
        f"MPC success {results['success_rate']:.0%} vs random actions {results['random_success_rate']:.0%} "
        f"on {results['episodes']} {task} episodes{goals}"
    ]
    if results["videos"]:
        lines.append(f"videos (camera | world-model prediction | goal): {results['videos']}")
    lines.append(f"report (results{', videos' if results['videos'] else ''}): {results['report']}")
    lines.append(f"results: {path}; took {results['seconds']['total_s'] / 60:.1f} min")
    return lines


def _goal_mode(cfg: EvalConfig) -> str | None:
    """The evaluation's `goal_mode` task option, given or default; None for a task without one."""
    from robots.registry import task_entry

    options = build(task_entry(cfg.task).options, cfg.task_options, "task_options")
    return getattr(options, "goal_mode", None)


def _check_top_up(have: int, wanted: int, run_dir: Path, store: str) -> None:
    """Refuse, before the store changes, a top-up under a world model already trained on it: the trainer
    resumes only on the data it started with, so the grown store was refused after it had grown, and
    every rerun after it too."""
    from wm.checkpoint import latest_checkpoint

    if have < wanted and have > 0 and run_dir.is_dir() and latest_checkpoint(run_dir) is not None:
        raise UsageError(
            f"{run_dir} holds a world model trained on the {have} episodes of {store}; collect.episodes="
            f"{wanted} would add {wanted - have} it cannot resume on: delete {run_dir} to retrain on all of "
            "them (the store is kept), or give another out="
        )


def _episodes(store: Path) -> int:
    from wm.data import DemoStore

    if not store.exists():
        return 0
    with DemoStore.open(store) as s:
        return s.n_episodes


def _main(cfg: DictConfig) -> int:
    return demo(bind(DemoConfig, cfg))


main = app("demo", _main)

if __name__ == "__main__":
    main()
