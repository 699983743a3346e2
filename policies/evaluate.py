"""Closed-loop evaluation of any `Policy` on simulated tasks, several episodes in parallel.

The policy gets batched observations of E episodes and returns E actions per control step: one
planner call serves all of them. Only this runner touches the simulators (reset, send_action,
success, goal observation); the policy never sees them. Optional videos show each episode's real
camera frames beside the world model's decoded prediction from its latest plan.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robots.sim.base import SimTask


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    final_distance: float | None
    max_score: float | None = None  # the task's partial credit (`SimTask.score`), best over the episode
    plan_seconds: list[float] = field(default_factory=list)
    act_seconds: float = 0.0  # time spent choosing actions (batched calls shared among episodes)

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
        }


def model_obs(
    obs: Sequence[dict[str, np.ndarray]] | Sequence[Sequence[dict[str, np.ndarray]]],
    image_keys: str | Sequence[str],
    proprio_key: str | None,
) -> dict[str, torch.Tensor]:
    """Task observations -> the batched model format: images (E, T, C, H, W) float in [0, 1] and
    proprio (E, T, Dp). `obs` is one observation per episode (T = 1) or a history list per episode."""
    hist = [[o] if isinstance(o, dict) else list(o) for o in obs]
    keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    out = {}
    for key in keys:
        img = np.stack([np.stack([o[key] for o in h]) for h in hist])  # (E, T, H, W, C)
        out[key] = torch.from_numpy(img).permute(0, 1, 4, 2, 3).float() / 255.0
    if proprio_key is not None:
        out[proprio_key] = torch.from_numpy(
            np.stack([np.stack([o[proprio_key] for o in h]) for h in hist])
        ).float()
    return out


class RandomPolicy:
    """Uniform random actions within the task's limits (the baseline); satisfies `Policy`."""

    def __init__(self, low: np.ndarray, high: np.ndarray, episodes: int, seed: int = 0) -> None:
        self.low, self.high, self.episodes = np.asarray(low), np.asarray(high), episodes
        self.rng = np.random.default_rng(seed)
        self.plan_seconds: list[float] = []

    def reset(self) -> None:
        pass

    def set_goal(self, goal_obs: dict) -> None:
        pass

    def predict_action_chunk(self, obs: dict) -> torch.Tensor:
        a = self.rng.uniform(self.low, self.high, (self.episodes, 1, len(self.low)))
        return torch.from_numpy(a).float()

    def select_action(self, obs: dict) -> torch.Tensor:
        return self.predict_action_chunk(obs)[:, 0]


def run_episodes(
    tasks: Sequence[SimTask],
    policy: Any,
    seeds: Sequence[int],
    to_model: Callable[[Sequence[dict]], dict],
    *,
    predict_frames: Callable[[dict, Any], np.ndarray] | None = None,
    video_dir: Path | None = None,
    videos: int = 0,
    image_key: str | None = None,
    history: int = 1,
) -> list[EpisodeResult]:
    """Run `len(seeds)` episodes, `len(tasks)` at a time; the first `videos` episodes are recorded to
    `video_dir`. `predict_frames(obs_batch, policy)`, when given, returns the decoded prediction
    (E, H, W, 3) uint8 shown beside the real frames in the videos. `to_model` receives, per episode,
    the last `history` observations (the first one repeated at the start of an episode)."""
    results: list[EpisodeResult] = []
    E = len(tasks)
    for start in range(0, len(seeds), E):
        batch = list(seeds[start : start + E])
        record = video_dir if (video_dir is not None and start < videos) else None
        results += _run_batch(
            tasks[: len(batch)],
            policy,
            batch,
            to_model,
            predict_frames,
            record,
            image_key,
            videos - start,
            history,
        )
    return results


def _run_batch(
    tasks, policy, seeds, to_model, predict_frames, video_dir, image_key, n_video, history
) -> list[EpisodeResult]:
    E = len(tasks)
    obs = [t.reset(s) for t, s in zip(tasks, seeds, strict=True)]
    hist = [deque([o] * history, maxlen=history) for o in obs]
    if hasattr(policy, "set_goal"):  # goal-conditioned controllers (MPC); policies ignore goals
        policy.set_goal(to_model([t.goal_observation() for t in tasks]))
    policy.reset()
    active = np.ones(E, dtype=bool)
    steps = np.zeros(E, dtype=int)
    act_seconds = np.zeros(E)
    timings = getattr(policy, "plan_seconds", [])  # MPC records each replan
    n_plans = len(timings)
    plan_times: list[list[float]] = [[] for _ in range(E)]
    frames: list[list[np.ndarray]] = [[] for _ in range(E)]
    scores = [t.score() for t in tasks]
    predicted = None
    while active.any():
        batch_obs = to_model(hist)
        t0 = time.perf_counter()
        action = policy.select_action(batch_obs)  # (E, Da)
        act_seconds[active] += (time.perf_counter() - t0) / E  # one batched call served E episodes
        if len(timings) > n_plans:  # a replan happened this step
            for e in np.flatnonzero(active):
                plan_times[e].append(timings[-1] / E)  # one batched call served E episodes
            n_plans = len(timings)
            if predict_frames is not None and video_dir is not None:
                predicted = predict_frames(batch_obs, policy)
        act = action.detach().cpu().numpy()
        for e in np.flatnonzero(active):
            if video_dir is not None and image_key is not None and e < n_video:
                side = predicted[e] if predicted is not None else np.zeros_like(obs[e][image_key])
                frames[e].append(np.concatenate([obs[e][image_key], side], axis=1))
            tasks[e].send_action(act[e])
            obs[e] = tasks[e].get_observation()
            hist[e].append(obs[e])
            if scores[e] is not None:
                scores[e] = max(scores[e], tasks[e].score())
            steps[e] += 1
            if tasks[e].done:
                active[e] = False
    out = []
    for e, task in enumerate(tasks):
        result = EpisodeResult(seeds[e], task.is_success(), int(steps[e]), task.goal_distance(), scores[e])
        result.plan_seconds, result.act_seconds = plan_times[e], float(act_seconds[e])
        out.append(result)
        if video_dir is not None and frames[e]:
            write_video(Path(video_dir) / f"episode_{seeds[e]:04d}.mp4", frames[e], fps=task.control_hz)
    return out


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Frames (H, W, 3) uint8 -> an mp4 (H.264 through imageio's ffmpeg), sides padded to even sizes."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for f in frames:
            writer.append_data(np.pad(f, pad))
    return path


def summarize(results: Sequence[EpisodeResult], wall_seconds: float) -> dict[str, Any]:
    dist = [r.final_distance for r in results if r.final_distance is not None]
    scores = [r.max_score for r in results if r.max_score is not None]
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
        "per_episode": [r.to_dict() for r in results],
    }


def timed(fn: Callable[[], list[EpisodeResult]]) -> tuple[list[EpisodeResult], float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
