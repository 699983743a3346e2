"""`wm-eval task=pointmaze controller=mpc checkpoint=DIR episodes=50 out=DIR`: closed-loop evaluation of
MPC over a world model (`controller=mpc`, `planner=cem|mppi|gd|cem_gd`), a policy (`controller=policy`)
or random actions, on any checkpoint the model registry loads.

Writes `out/results.json` (success rate, final distance to goal, planning time, the videos), one mp4 per
recorded episode (camera | the controller's view | goal, labelled success or failure), `out/report.html`
(everything in one page) and, with `budgets=[...]`, a plot of success against planner iterations.
A progress bar on stderr shows episodes done, running success and planning time per step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools._cli import UsageError, app, bind, build, folder, record_of, sigterm_interrupts
from tools._controller import (
    ControllerConfig,
    _mpc_builder,
    load_checkpoint_model,
    refuse_unguided_inpaint,
    trained_elsewhere,
)
from wm.interrupt import interrupts_held
from wm.locks import remove_left_by_dead

BUDGET_PLOT = "success_vs_budget.png"


def seen_starts(store: Any, seed: int, episodes: int) -> str | None:
    """A note when episodes seed..seed + episodes - 1 start where episodes of the training store `store`
    started (the seeds its episodes recorded: wm-collect's, from seed= on): evaluated on the training
    data's start states, with nothing said (wm-demo seed=1000, or a store of over 1000 episodes). None
    without such a store (moved, damaged: the evaluation does not need it)."""
    from wm.data import DemoStore
    from wm.data.errors import StoreError

    if not isinstance(store, str) or not Path(store).exists():
        return None
    try:
        with DemoStore.open(store) as s:
            infos = [s.episode_info(e) for e in range(s.n_episodes)]
    except (StoreError, OSError):
        return None
    seeds = {i["seed"] for i in infos if isinstance(i.get("seed"), int) and not isinstance(i["seed"], bool)}
    seen = sorted(s for s in seeds if seed <= s < seed + episodes)
    if not seen:
        return None
    return (
        f"{len(seen)} of the {episodes} episodes start where episodes of the training store {store} started "
        f"(seeds {seen[0]}..{seen[-1]}); give seed={max(seeds) + 1} or more to evaluate on unseen starts"
    )


MAX_EPISODES = 1_000_000


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ControllerConfig):
    """`wm-eval`'s options: the controller (`ControllerConfig`) and the episodes it is evaluated on."""

    out: str
    task: str = "pointmaze"
    episodes: int = 50
    parallel: int = 10
    seed: int = 1000
    videos: int = 4
    max_steps: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        from robots.registry import task_entry

        super().__post_init__()
        folder("out", self.out, "give a folder (new, or an earlier run's)")
        for name, least in (("episodes", 1), ("parallel", 1), ("videos", 0)):
            if getattr(self, name) < least:
                raise UsageError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.episodes > MAX_EPISODES:  # a list of that many seeds ran out of memory (a traceback)
            raise UsageError(f"episodes must be at most {MAX_EPISODES:,}, got {self.episodes:,}")
        refuse_unguided_inpaint(self.policy, "in wm-eval")
        if self.seed < 0:
            raise UsageError(f"seed must be >= 0 (episode i uses seed + i), got {self.seed}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"max_steps must be >= 1 (null: the task's default), got {self.max_steps}")
        build(task_entry(self.task).options, self.task_options, "task_options")
        if self.budgets and self.controller != "mpc":
            raise UsageError(f"budgets sweep planner iterations; controller={self.controller} does not plan")
        most, name = self.planner_iterations(), self.planner.get("name")
        bad = [b for b in self.budgets if not 1 <= int(b) <= most]
        if bad:
            raise UsageError(
                f"budgets {bad} outside 1..{most}: a budget caps the {name} planner's own "
                f"{most} iterations; raise them (e.g. planner.iterations) to sweep higher"
            )


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation, write results.json, the videos and report.html; returns the results."""
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from wm import kernels

    kernels_before = kernels.selector().mark()  # a -m sweep's jobs share the process and its selector
    opts: dict[str, Any] = {"options": dict(cfg.task_options)}
    if cfg.max_steps is not None:
        opts["max_steps"] = cfg.max_steps
    loaded = None
    if cfg.controller != "random":
        loaded = load_checkpoint_model(cfg)
        opts["image_size"] = loaded.model.io_spec.image_size
    tasks = [make_task(cfg.task, SimConfig(**opts)) for _ in range(min(cfg.parallel, cfg.episodes))]
    try:  # closed on every exit: a renderer left to the interpreter's exit failed there, in EGL
        if loaded is not None:
            run = (loaded.checkpoint.get("extra") or {}).get("run_config") or {}
            for note in trained_elsewhere(run, cfg.task, tasks[0].control_hz):
                print(f"note: {note}", flush=True)
            seen = seen_starts(run.get("store"), cfg.seed, cfg.episodes)
            if seen:
                print(f"note: {seen}", flush=True)
        results, videos = _run(cfg, tasks, loaded, kernels_before)
    finally:
        for task in tasks:
            task.disconnect()
    if results["errors"]:
        print(
            f"warning: {results['errors']} of {results['episodes']} episodes ended on a non-finite action "
            "from the controller (counted as failures; see per_episode errors in results.json)",
            file=sys.stderr,
            flush=True,
        )
    if (results.get("kernels") or {}).get("budget_exhausted"):  # the next run measures the rest: its
        # results can differ from these (the README's "a shared cache makes two evaluations identical")
        print(
            "note: the kernel calibration budget ran out: some layer shapes ran PyTorch's kernels unmeasured "
            "and uncached, so a rerun may choose other kernels and differ slightly (WM_KERNELS=native "
            "gives identical reruns)",
            flush=True,
        )
    out = Path(cfg.out)
    where = f"wrote results {out / 'results.json'}, report {out / 'report.html'}"
    print(where + (f", videos {out / 'videos'}" if videos else ""), flush=True)
    return results


def _run(
    cfg: EvalConfig, tasks: list[Any], loaded: Any, kernels_before: Any
) -> tuple[dict[str, Any], list[Path]]:
    """(results, the videos in out/) of the episodes on `tasks`. The run writes everything in a staging
    folder of its own, and only a finished run replaces the earlier run's outputs, all together: an
    error, Ctrl-C or SIGTERM leaves out/ as it was. `kernels_before`: the kernel selector's mark."""
    from policies.evaluate import run_episodes, summarize, timed
    from policies.progress import EvalProgress
    from wm import kernels

    out = Path(cfg.out)
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    policy, make = _controller(cfg, loaded, tasks[0].action_feature)  # before out/: it may refuse
    staged: list[Path] = []  # this run's videos, in the staging folder `stage` (made below) until it is over

    def episodes(policy: Any, video: bool, desc: str) -> dict[str, Any]:
        with EvalProgress(cfg.episodes, disable=not cfg.progress, desc=desc) as bar:
            results, wall = timed(
                lambda: run_episodes(
                    tasks,
                    policy,
                    seeds,
                    video_dir=stage / "videos" if video and cfg.videos else None,
                    videos=cfg.videos,
                    progress=bar.update,
                    written=staged,
                )
            )
        return summarize(results, wall)

    plot = None
    with _output_folder(out):  # what refuses the command during the run leaves no empty out/ behind
        remove_left_by_dead(out, STAGING_RE)  # a run killed with -9 could not remove its own
        stage = Path(tempfile.mkdtemp(prefix=f".wm-eval-{os.getpid()}-", dir=out))
        try:
            results = episodes(policy, True, cfg.controller)
            if cfg.controller == "mpc":
                results["subgoal_replans"] = policy.subgoals.count if policy.subgoals is not None else 0
                if cfg.budgets:
                    results["budgets"], plot = _budget_sweep(cfg, make, episodes, stage)
            if loaded is not None:  # the file and step evaluated (checkpoint=DIR is its newest: it moves
                # when the run trains on, and the recorded config then reruns on other weights)
                results["checkpoint_file"] = str(Path(loaded.checkpoint["path"]).resolve())
                results["checkpoint_step"] = loaded.checkpoint.get("step")
                results["inference"] = loaded.inference_settings()
                # which CPU kernels (fp32, bf16, int8) this evaluation's layers ran on
                results["kernels"] = kernels.selector().summary(since=kernels_before)
            results.update(
                task=cfg.task,
                controller=cfg.controller,
                checkpoint=cfg.checkpoint,
                seeds=seeds[:1] + seeds[-1:],
                videos=[f"videos/{p.name}" for p in staged],  # this run's, the only ones out/videos holds
                parallel=cfg.parallel,  # noise is per episode; a model's rounding varies with the batch
                max_steps=tasks[0].config.max_steps,  # the task's default when max_steps=null
                config=record_of(cfg),  # every option this run was given: what reruns it
            )
            return _publish(out, stage, results, staged, plot)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _publish(
    out: Path, stage: Path, results: dict[str, Any], staged: list[Path], plot: Path | None
) -> tuple[dict[str, Any], list[Path]]:
    """Write results.json and report.html in `stage`, then replace the earlier run's outputs in `out`
    with them, the videos and the plot, in renames that no interrupt parts; returns (the results as
    written, the videos' paths)."""
    from policies.report import write_report
    from wm.jsonvalues import json_finite

    results = json_finite(results)  # valid JSON: no NaN or Infinity
    (stage / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    write_report(stage, results, staged, plot)
    with interrupts_held():
        _clear_outputs(out)
        videos = [_move(p, out / "videos") for p in staged]
        if plot is not None:
            _move(plot, out)
        for name in ("results.json", "report.html"):
            os.replace(stage / name, out / name)
    return results, videos


def _controller(cfg: EvalConfig, loaded: Any, feat: Any) -> tuple[Any, Any]:
    """(the controller, for MPC the function of an iteration cap that builds more: else None); MPC's own
    refusals (subgoals=on without a store, execute > horizon) come from here."""
    from policies.evaluate import RandomPolicy

    if cfg.controller == "random":  # episode S's actions are S's alone (as a planner's, `planner.seed`)
        return RandomPolicy(feat.low, feat.high, 0), None
    if cfg.controller == "policy":
        return loaded.policy(), None
    make = _mpc_builder(cfg, loaded, feat)
    return make(cfg.planner_budget.iterations), make


@contextlib.contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """Creates `out` (and its missing parents); when the block raises, removes those of them it created
    that are still empty (never a folder that existed before, nor one with anything in it)."""
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


STAGING_RE = re.compile(r"\.wm-eval-(?P<pid>\d+)-.+")  # a run's staging folder in out/


def _move(path: Path, folder: Path) -> Path:
    """Moves `path` into `folder` (made when missing), replacing a file of its name; returns the new path."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(path, folder / path.name))


def _clear_outputs(out: Path) -> None:
    """Removes what an earlier run into `out` wrote that this one may not write again (its videos, its
    budget plot), so that `out` shows one run; nothing else in `out` is touched."""
    from policies.video import episode_video_path

    videos = out / "videos"
    for ok in (True, False):
        for old in videos.glob(episode_video_path(videos / "episode_*", ok).name):  # episode_*_success.mp4
            old.unlink()
    if videos.is_dir() and not any(videos.iterdir()):
        videos.rmdir()
    (out / BUDGET_PLOT).unlink(missing_ok=True)


def _budget_sweep(cfg: EvalConfig, make: Any, episodes: Any, out: Path) -> tuple[list, Path]:
    points = []
    for iters in sorted({int(b) for b in cfg.budgets}):  # the curve joins its points left to right
        res = episodes(make(iters), False, f"budget {iters}")
        points.append(
            {
                "iterations": iters,
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
    path = out / BUDGET_PLOT
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points, path


def _main(cfg: DictConfig) -> int:
    with sigterm_interrupts():  # the earlier run's outputs kept, no staging folder left behind
        res = evaluate(bind(EvalConfig, cfg))
    keys = ("success_rate", "mean_final_distance", "mean_max_score", "planning_seconds_per_step")
    print(json.dumps({k: res[k] for k in keys if res[k] is not None}))
    return 0


main = app("eval", _main)

if __name__ == "__main__":
    main()
