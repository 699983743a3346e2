"""Closed-loop evaluation of any `Policy` on simulated tasks, several episodes in parallel.

The policy gets the raw observations of E episodes (what the tasks return, stacked) and returns E
actions per control step: one planner or sampler call serves all of them. Only this runner touches
the simulators (reset, send_action, success, goal observation); the policy never sees them.
Optional videos show each episode's camera frames beside what the policy shows (a world model's
decoded prediction, or the frame a policy read) and the goal, labelled with the outcome.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.base import (
    AppliedActions,
    EpisodeRows,
    GoalConditioned,
    Policy,
    Previewable,
    RawObs,
    batch_of,
    check_chunk_request,
    with_prefix,
)
from policies.video import compose_frame, write_episode_video
from robots.base import RobotError
from robots.sim.base import SimTask
from wm.seeding import derived_rng


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    final_distance: float | None
    max_score: float | None = None  # the task's partial credit (`SimTask.score`), best over the episode
    plan_seconds: list[float] = field(default_factory=list)
    act_seconds: float = 0.0  # time spent choosing actions (batched calls shared among episodes)
    error: str | None = None  # why the episode was ended early (a non-finite action): a failure
    clipped_steps: int = 0  # steps whose action the task cut short (its action limits, a workspace)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "success": self.success,
            "steps": self.steps,
            "final_distance": self.final_distance,
            "max_score": self.max_score,
            "replans": len(self.plan_seconds),
            "mean_plan_seconds": float(np.mean(self.plan_seconds)) if self.plan_seconds else None,
            "action_seconds_per_step": self.act_seconds / max(1, self.steps),
            "error": self.error,
            "clipped_steps": self.clipped_steps,
        }


def stack_obs(obs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One observation per episode -> a raw batch {key: (E, ...)} (the `Policy` input)."""
    return {k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]}


class RandomPolicy:
    """Uniform random actions within the task's limits (the baseline); satisfies `Policy`,
    `ChunkController` and `EpisodeRows`. Its chunks hold `chunk` actions (more in `chunk_from` when more
    are frozen). Each row draws from its own generator, seeded from (`seed`, its episode's seed) once a
    runner names the episodes (else from (`seed`, the row)): an episode's actions never depend on which
    episodes share its batch."""

    def __init__(self, low: np.ndarray, high: np.ndarray, seed: int = 0, chunk: int = 1) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.low, self.high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        self.seed, self.chunk = seed, chunk
        self.rngs: list[np.random.Generator] = []  # one per row

    def reset(self) -> None:
        pass

    def start_episodes(self, seeds: Sequence[int]) -> None:
        self.rngs = [derived_rng(self.seed, s) for s in seeds]

    def set_active(self, active: np.ndarray) -> None:
        pass  # finished rows draw on from their own generators, which no other row reads

    def inference_seconds(self) -> list[float]:
        return []  # no model is called

    def predict_action_chunk(self, obs: RawObs) -> torch.Tensor:
        """(E, chunk, Da) random actions."""
        return self._draw(len(next(iter(obs.values()))), self.chunk)

    def chunk_from(
        self,
        steps: Sequence[RawObs],
        actions: Sequence[np.ndarray],
        previous: np.ndarray | None = None,
        frozen: int = 0,
        guide: bool = True,
    ) -> torch.Tensor:
        """(E, max(chunk, frozen + 1), Da) random actions, the first `frozen` previous's
        (`ChunkController.chunk_from`; the observations are only checked, `guide` changes nothing)."""
        prev = check_chunk_request(steps, actions, previous, frozen, len(self.low))
        E = batch_of(steps[-1])
        return with_prefix(self._draw(E, max(self.chunk, frozen + 1)), prev, frozen)

    def _draw(self, batch: int, length: int) -> torch.Tensor:
        """(batch, length, Da), each row from its own generator."""
        if len(self.rngs) != batch:  # no episodes named (wm-deploy): one generator per row
            self.rngs = [derived_rng(self.seed, row) for row in range(batch)]
        rows = [rng.uniform(self.low, self.high, (length, len(self.low))) for rng in self.rngs]
        return torch.from_numpy(np.stack(rows)).float()

    def select_action(self, obs: RawObs) -> torch.Tensor:
        return self.predict_action_chunk(obs)[:, 0]


def run_episodes(
    tasks: Sequence[SimTask],
    policy: Policy,
    seeds: Sequence[int],
    *,
    video_dir: Path | None = None,
    videos: int = 0,
    progress: Callable[[EpisodeResult], None] | None = None,
    written: list[Path] | None = None,
) -> list[EpisodeResult]:
    """Run `len(seeds)` episodes, `len(tasks)` at a time, feeding `policy` the tasks' raw observations
    (a `GoalConditioned` policy is told each episode's goal observation first). The first `videos`
    episodes are recorded to `video_dir`: the camera, what a `Previewable` policy shows, and the goal,
    labelled with the outcome; their paths are appended to `written` when given. `progress(result)` is
    called as each episode ends. An episode over at its reset state is sent no action (0 steps); one
    the policy gives a non-finite action ends there, a failure with its `error`, and the others go on."""
    results: list[EpisodeResult] = []
    E = len(tasks)
    for start in range(0, len(seeds), E):
        batch = list(seeds[start : start + E])
        record = video_dir if (video_dir is not None and start < videos) else None
        results += _run_batch(tasks[: len(batch)], policy, batch, record, videos - start, progress, written)
    return results


def goal_observation(task: Any, needed: bool) -> Any:
    """The task's goal observation; None where the task defines none and the controller takes no goal
    (a policy on a robosuite env without a defined goal), else the task's one-line error."""
    try:
        return task.goal_observation()
    except RobotError:
        if needed:
            raise
        return None


def _run_batch(tasks, policy, seeds, video_dir, n_video, progress, written) -> list[EpisodeResult]:
    E = len(tasks)
    obs = [t.reset(s) for t, s in zip(tasks, seeds, strict=True)]
    image_key = next((k for k, f in tasks[0].observation_features.items() if f.kind == "image"), None)
    goals = [goal_observation(t, isinstance(policy, GoalConditioned)) for t in tasks]
    if isinstance(policy, GoalConditioned):
        policy.set_goal(stack_obs(goals))
    policy.reset()
    rows = policy if isinstance(policy, EpisodeRows) else None
    if rows is not None:
        rows.start_episodes(seeds)
    recorder = _Recorder(video_dir, n_video, image_key, goals, written) if video_dir is not None else None
    active = np.ones(E, dtype=bool)
    steps = np.zeros(E, dtype=int)
    act_seconds = np.zeros(E)
    plan_times: list[list[float]] = [[] for _ in range(E)]
    clipped = np.zeros(E, dtype=int)
    # partial credit: the best over the states the policy reached (Diffusion Policy's PushT figure
    # takes env.step's rewards); the reset state only says whether the task has a score
    scores = [None if t.score() is None else -math.inf for t in tasks]
    out: list[EpisodeResult | None] = [None] * E

    def finish(e: int, error: str | None = None) -> None:
        """End episode e on the state it is in: a failure when `error` says why it was stopped."""
        active[e] = False
        task = tasks[e]
        if scores[e] is not None and steps[e] == 0:  # it ended on its reset state
            scores[e] = task.score()
        success = task.is_success() if error is None else False
        result = EpisodeResult(seeds[e], success, int(steps[e]), task.goal_distance(), scores[e], error=error)
        result.plan_seconds, result.act_seconds = plan_times[e], float(act_seconds[e])
        result.clipped_steps = int(clipped[e])
        out[e] = result
        if recorder is not None:  # the state success was judged on ends the video
            recorder.add(e, obs[e])
            recorder.write(e, result, task.control_hz)
        if progress is not None:
            progress(result)

    for e in range(E):
        if tasks[e].done:  # over at its reset state (e.g. it starts at the goal): no action is sent
            finish(e)
    n_calls = 0
    while active.any():
        if rows is not None:
            rows.set_active(active.copy())
        t0 = time.perf_counter()
        action = policy.select_action(stack_obs(obs))  # (E, Da)
        served = int(active.sum())  # one batched call served the episodes still running
        act_seconds[active] += (time.perf_counter() - t0) / served
        calls = policy.inference_seconds()
        if len(calls) > n_calls:  # the policy called its model this step
            for e in np.flatnonzero(active):
                plan_times[e] += [s / served for s in calls[n_calls:]]
            n_calls = len(calls)
            if recorder is not None:
                recorder.new_preview(policy)
        act = action.detach().cpu().numpy()
        sent = act.astype(np.float64)  # (E, Da) what each row's task applied; as asked where none did
        for e in np.flatnonzero(active):
            a = np.asarray(act[e], dtype=np.float64)
            if a.shape == tuple(tasks[e].action_feature.shape) and not np.all(np.isfinite(a)):
                # the controller failed this episode (a task never takes such an action): it ends here,
                # a failure saying why, and the other episodes go on
                finish(e, error=f"non-finite action at step {int(steps[e])}: {a.tolist()}")
                sent[e] = 0.0  # not applied: a controller reading past actions refused the whole batch
                continue
            if recorder is not None:
                recorder.add(e, obs[e])
            applied = tasks[e].send_action(act[e])
            clipped[e] += bool(np.any(applied != a.astype(applied.dtype)))  # not applied as asked
            if applied.shape == a.shape:
                sent[e] = applied
            obs[e] = tasks[e].get_observation()
            if scores[e] is not None:
                scores[e] = max(scores[e], tasks[e].score())
            steps[e] += 1
            if tasks[e].done:
                finish(e)
        if isinstance(policy, AppliedActions) and sent.ndim == 2:
            policy.applied(sent)  # its model reads past actions as the robot applied them
    return [r for r in out if r is not None]


class _Recorder:
    """Per-episode video frames: the camera, the policy's preview (when it has one), the goal. The
    small panels are kept and composed (upscaled) only while the video is written."""

    def __init__(
        self,
        video_dir: Path,
        n_video: int,
        image_key: str | None,
        goals: list[dict | None],
        written: list | None,
    ) -> None:
        self.dir, self.n, self.key = Path(video_dir), n_video, image_key
        # no goal panel where the task defines no goal (`goal_observation` gave None)
        self.goals = [g.get(image_key) if image_key and g is not None else None for g in goals]
        self.frames: dict[int, list[tuple[np.ndarray, np.ndarray | None, str]]] = {}
        self.preview: np.ndarray | None = None
        self.label = "prediction"
        self.written = written

    def new_preview(self, policy: Any) -> None:
        self.preview = policy.preview() if isinstance(policy, Previewable) else None
        if self.preview is not None:
            self.label = policy.preview_label

    def add(self, e: int, obs: dict[str, np.ndarray]) -> None:
        if e >= self.n or self.key is None:
            return
        side = self.preview[e] if self.preview is not None else None
        self.frames.setdefault(e, []).append((obs[self.key], side, self.label))

    def write(self, e: int, result: EpisodeResult, fps: float) -> None:
        if self.frames.get(e):
            path = self.dir / f"episode_{result.seed:04d}.mp4"
            goal = self.goals[e]
            frames = (
                compose_frame(real, side, goal, prediction_label=lbl)
                for real, side, lbl in self.frames.pop(e)
            )
            path = write_episode_video(path, frames, fps, result.success, seed=result.seed)
            if self.written is not None:
                self.written.append(path)


def summarize(results: Sequence[EpisodeResult], wall_seconds: float) -> dict[str, Any]:
    """The run's figures; means over the episodes with a finite value (a diverged simulation's NaN
    distance is null in its own per-episode entry, and made the mean of all the others null too)."""
    dist = [r.final_distance for r in results if _finite(r.final_distance)]
    scores = [r.max_score for r in results if _finite(r.max_score)]
    plans = [t for r in results for t in r.plan_seconds]
    steps = sum(r.steps for r in results)
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r.success for r in results])) if results else 0.0,
        "mean_final_distance": float(np.mean(dist)) if dist else None,
        "mean_max_score": float(np.mean(scores)) if scores else None,
        "planning_seconds_per_replan_per_episode": float(np.mean(plans)) if plans else 0.0,
        "planning_seconds_per_step": float(sum(plans) / steps) if steps else 0.0,
        "action_seconds_per_step": float(sum(r.act_seconds for r in results) / steps) if steps else 0.0,
        "wall_seconds": wall_seconds,
        "errors": sum(r.error is not None for r in results),  # episodes stopped (a non-finite action)
        "clipped_steps": sum(r.clipped_steps for r in results),  # actions the tasks cut short
        "per_episode": [r.to_dict() for r in results],
    }


def timed(fn: Callable[[], list[EpisodeResult]]) -> tuple[list[EpisodeResult], float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
