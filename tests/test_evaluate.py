"""The evaluation runner with a fake task and a fake policy: what the policy is fed (raw observations,
history padded at the start, the goal), early termination, timing attribution, videos, progress."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from policies.base import GoalConditioned, PlanResult, Policy
from policies.evaluate import EpisodeResult, RandomPolicy, run_episodes, summarize
from policies.inputs import ObsHistory
from policies.mpc import MPC, MPCConfig
from policies.subgoal import GraphConfig, LatentGraph, SubgoalSelector
from robots.base import Feature, RobotError
from wm.spec import IOSpec

IMG = (8, 8, 3)


@dataclass
class LineTask:
    """A point on a line: the action adds to its position; success once it reaches `target`."""

    target: float = 3.0
    max_steps: int = 6
    control_hz: float = 10.0
    pos: float = 0.0
    steps: int = 0
    sent: list = field(default_factory=list)

    @property
    def observation_features(self) -> dict[str, Feature]:
        return {"image": Feature(IMG, "uint8", "image"), "proprio": Feature((1,), "float32", "proprio")}

    @property
    def action_feature(self) -> Feature:
        return Feature((1,), "float32", "action", low=(-1.0,), high=(1.0,))

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self.pos, self.steps, self.sent = float(seed % 2), 0, []  # odd seeds start one step ahead
        return self.get_observation()

    def get_observation(self) -> dict[str, np.ndarray]:
        img = np.full(IMG, int(np.clip(20 * self.pos, 0, 255)), np.uint8)
        return {"image": img, "proprio": np.array([self.pos], np.float32), "timestamp": np.float64(0)}

    def goal_observation(self) -> dict[str, np.ndarray]:
        return {"image": np.full(IMG, 200, np.uint8), "proprio": np.array([self.target], np.float32)}

    def send_action(self, action: np.ndarray) -> np.ndarray:
        self.sent.append(float(action[0]))
        self.pos += float(action[0])
        self.steps += 1
        return action

    def is_success(self) -> bool:
        return self.pos >= self.target

    @property
    def done(self) -> bool:
        return self.is_success() or self.steps >= self.max_steps

    def goal_distance(self) -> float:
        return abs(self.target - self.pos)

    def score(self) -> None:
        return None


class FakePolicy:
    """Moves +1 per step; calls its "model" every `every` steps (a fixed 0.5 s each); records the
    history tensors its model would read (3 steps) and the goal it was given."""

    def __init__(self, every: int = 2) -> None:
        io = IOSpec(image_keys=("image",), image_size=(8, 8), proprio_key="proprio", proprio_dim=1,
                    action_dim=1, history=3)  # fmt: skip
        self.history, self.every = ObsHistory(io), every
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.goal = None
        self.step, self.calls = 0, []

    def set_goal(self, goal_obs):
        self.goal = goal_obs

    def reset(self):
        self.history.reset()
        self.step, self.calls = 0, []

    def inference_seconds(self):
        return list(self.calls)

    def predict_action_chunk(self, obs):
        self.history.push(obs)
        self.inputs.append(self.history.inputs())
        self.calls.append(0.5)
        return torch.ones(len(obs["proprio"]), self.every, 1)

    def select_action(self, obs):
        if self.step % self.every == 0:
            self._chunk = self.predict_action_chunk(obs)
        else:
            self.history.push(obs)
        action = self._chunk[:, self.step % self.every]
        self.step += 1
        return action


def test_runner_feeds_raw_observations_and_stops_finished_episodes(tmp_path):
    tasks = [LineTask(), LineTask()]
    policy = FakePolicy(every=2)
    assert isinstance(policy, Policy) and isinstance(policy, GoalConditioned)
    finished = []
    written = []
    results = run_episodes(
        tasks,
        policy,
        [0, 1],
        video_dir=tmp_path / "videos",
        videos=2,
        progress=finished.append,
        written=written,
    )
    # Seed 1 starts at 1: it reaches 3 after 2 steps; seed 0 after 3.
    assert [r.seed for r in results] == [0, 1] and [r.steps for r in results] == [3, 2]
    assert all(r.success for r in results) and [r.seed for r in finished] == [1, 0]
    assert tasks[1].sent == [1.0, 1.0]  # nothing sent to a finished episode
    # The goal reached the policy as a raw batch; the first history is the start repeated.
    assert policy.goal["proprio"].tolist() == [[3.0], [3.0]]
    first = policy.inputs[0]
    assert first["proprio"].shape == (2, 3, 1) and first["proprio"][:, :, 0].tolist() == [
        [0, 0, 0],
        [1, 1, 1],
    ]
    assert first["image"].shape == (2, 3, 3, 8, 8) and first["image"].dtype == torch.float32
    assert policy.inputs[1]["proprio"][0, :, 0].tolist() == [0.0, 1.0, 2.0]  # consecutive steps
    # Timing: calls at steps 0 and 2 (0.5 s each); the first served both episodes, the second episode 0
    # alone (episode 1 had ended).
    assert results[0].plan_seconds == [0.25, 0.5] and results[1].plan_seconds == [0.25]
    summary = summarize(results, 1.0)
    assert summary["planning_seconds_per_step"] == (0.5 * 2) / 5
    # Videos: one per recorded episode, labelled with the outcome, one frame per step and the final
    # state (success is judged on it; the video stopped a step before), >= 256 px high.
    assert sorted(p.name for p in written) == ["episode_0000_success.mp4", "episode_0001_success.mp4"]
    frames = imageio.mimread(tmp_path / "videos" / "episode_0000_success.mp4")
    assert len(frames) == 4 and frames[0].shape[0] >= 256  # 3 steps
    assert len(imageio.mimread(tmp_path / "videos" / "episode_0001_success.mp4")) == 3  # 2 steps


def test_random_policy_needs_no_extras():
    policy = RandomPolicy(np.array([-1.0]), np.array([1.0]), seed=0)
    assert isinstance(policy, Policy) and not isinstance(policy, GoalConditioned)
    task = LineTask(target=100.0, max_steps=4)  # unreachable: every episode runs to max_steps
    results = run_episodes([task], policy, [0, 2])  # one task, two episodes in turn
    assert [r.seed for r in results] == [0, 2] and [r.steps for r in results] == [4, 4]
    assert all(r.plan_seconds == [] for r in results) and not any(r.success for r in results)
    assert len(task.sent) == 4 and all(-1.0 <= a <= 1.0 for a in task.sent) and len(set(task.sent)) == 4


@dataclass
class ScoredLineTask(LineTask):
    """Partial credit that falls as the point moves away from 0."""

    def score(self) -> float:
        return float(np.clip(1.0 - self.pos / 10.0, 0.0, 1.0))


def test_max_score_is_over_the_states_the_policy_reached():
    """As Diffusion Policy's PushT runner (the best reward of env.step): the reset state's score is
    the task's doing, not the policy's (a PushT block placed near the goal scored at reset)."""
    task = ScoredLineTask(target=100.0, max_steps=3)
    (result,) = run_episodes([task], FakePolicy(every=2), [0])  # positions 1, 2, 3 after reset at 0
    assert result.max_score == 0.9
    assert summarize([result], 1.0)["mean_max_score"] == 0.9


def test_one_non_finite_distance_leaves_the_others_mean():
    """A diverged simulation's NaN final distance made mean_final_distance null for the whole run."""
    results = [
        EpisodeResult(s, False, 3, d, score)
        for s, d, score in [(0, 2.0, 0.5), (1, math.nan, math.inf), (2, 4.0, 0.7)]
    ]
    summary = summarize(results, 1.0)
    assert summary["mean_final_distance"] == 3.0 and summary["mean_max_score"] == pytest.approx(0.6)


class NoGoalLineTask(LineTask):
    """A task that defines no goal (a robosuite env without one)."""

    def goal_observation(self):
        raise RobotError("this task defines no goal")


def test_videos_of_a_task_without_a_goal_have_no_goal_panel(tmp_path):
    policy = RandomPolicy(np.array([-1.0]), np.array([1.0]), seed=0)
    written = []
    (result,) = run_episodes([NoGoalLineTask(max_steps=2)], policy, [0], video_dir=tmp_path, videos=1,
                             written=written)  # fmt: skip
    assert result.steps == 2 and [p.name for p in written] == ["episode_0000_failure.mp4"]
    frame = imageio.mimread(written[0])[0]
    with_goal = []
    run_episodes([LineTask(max_steps=2)], policy, [2], video_dir=tmp_path, videos=1, written=with_goal)
    assert frame.shape[1] < imageio.mimread(with_goal[0])[0].shape[1]  # one panel fewer


def test_random_episodes_do_not_depend_on_the_batch_they_run_in():
    """Each episode draws from its own generator (the policy's seed and the episode's): `parallel`, a
    speed setting, changes no episode, whether the others in its batch end sooner or later."""

    def per_seed(parallel: int) -> dict[int, tuple[int, float]]:
        tasks = [LineTask(target=2.0, max_steps=6) for _ in range(parallel)]
        policy = RandomPolicy(np.array([-0.5]), np.array([1.0]), seed=7)
        results = run_episodes(tasks, policy, [10, 11, 12, 13, 14, 15])
        return {r.seed: (r.steps, r.final_distance) for r in results}

    alone, batched = per_seed(1), per_seed(3)
    assert alone == batched
    assert len({steps for steps, _ in alone.values()}) > 1  # episodes of one batch ended at different steps
    other = RandomPolicy(np.array([-0.5]), np.array([1.0]), seed=8)
    (result,) = run_episodes([LineTask(target=2.0, max_steps=6)], other, [10])
    assert (result.steps, result.final_distance) != alone[10]  # the policy's seed matters too


def test_random_episodes_of_distinct_seed_pairs_draw_differently():
    """(policy seed 5 + 7 * 2**32, episode 0) and (5, episode 7) join to the same 32-bit words; each
    pair still has its own stream."""
    low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    first, second = RandomPolicy(low, high, seed=5 + 7 * 2**32), RandomPolicy(low, high, seed=5)
    first.start_episodes([0])
    second.start_episodes([7])
    obs = {"proprio": np.zeros((1, 1))}
    assert not torch.equal(first.predict_action_chunk(obs), second.predict_action_chunk(obs))


class LineModel:
    """A `PlanningModel` and `MetricModel` over `LineTask` observations: the latent is the position."""

    action_dim = 1
    io_spec = IOSpec(image_keys=("image",), image_size=(8, 8), proprio_key="proprio", proprio_dim=1,
                     action_dim=1, history=1)  # fmt: skip

    def encode(self, obs):
        return {"state": obs["proprio"][:, -1]}  # (E, 1)

    def cost_vectors(self, z):
        return z["state"]


class ForwardPlanner:
    """Plans +1 whatever the goal (the test counts subgoals, not plans)."""

    horizon = 1

    def plan(self, z0, goal, warm_start=None, budget=None):
        E = len(z0["state"])
        return PlanResult(actions=torch.ones(E, 1, 1), cost=torch.zeros(E), iterations=1)


def test_subgoal_replans_are_counted_for_running_episodes_only():
    """Finished episodes stay in the batch until the others end; their replans are not counted. The
    goal (100) is always far, so every replan of a running episode aims at a subgoal."""
    line = torch.arange(0.0, 120.0)[:, None]  # (N, 1): one demonstration along the line
    graph = LatentGraph(line, {"state": line.clone()}, np.zeros(len(line), dtype=int), GraphConfig())
    model = LineModel()
    selector = SubgoalSelector(graph, model)
    mpc = MPC(model, ForwardPlanner(), MPCConfig(execute=1), subgoals=selector)
    tasks = [LineTask(target=100.0, max_steps=n) for n in (2, 5, 3)]  # episodes end at different steps
    results = run_episodes(tasks, mpc, [0, 2, 4])
    assert [r.steps for r in results] == [2, 5, 3]
    assert selector.count == sum(r.to_dict()["replans"] for r in results) == 10


class NaNRowPolicy(FakePolicy):
    """FakePolicy whose first row's actions are NaN from step `at` on (a diverged controller)."""

    def __init__(self, at: int) -> None:
        super().__init__(every=1)
        self.at = at

    def select_action(self, obs):
        action = super().select_action(obs).clone()
        if self.step > self.at:
            action[0] = float("nan")
        return action


def test_non_finite_action_ends_its_episode_as_a_failure_and_the_others_go_on(tmp_path):
    tasks = [LineTask(target=5.0), LineTask(target=5.0)]
    written = []
    results = run_episodes(tasks, NaNRowPolicy(at=1), [0, 2], video_dir=tmp_path, videos=2, written=written)
    first, second = results
    assert (first.success, first.steps) == (False, 1) and "non-finite action at step 1" in first.error
    assert tasks[0].sent == [1.0]  # the NaN never reached the task
    assert (second.success, second.steps, second.error) == (True, 5, None)  # the other episode went on
    summary = summarize(results, 1.0)
    assert summary["errors"] == 1 and summary["per_episode"][0]["error"] == first.error
    assert [p.name for p in written] == ["episode_0000_failure.mp4", "episode_0002_success.mp4"]
    assert len(imageio.mimread(written[0])) == 2  # the reset state and the state it stopped on


class NaNRowPlanner(ForwardPlanner):
    """Plans +1, but row 0's plan at the second replan is NaN (a diverged plan at a finite cost)."""

    def __init__(self) -> None:
        self.calls = 0

    def plan(self, z0, goal, warm_start=None, budget=None, model=None):
        self.calls += 1
        actions = torch.ones(len(z0["state"]), 1, 1)
        if self.calls == 2:
            actions[0] = float("nan")
        return PlanResult(actions, torch.zeros(len(actions)), 1)


def test_a_non_finite_plan_ends_its_episode_and_a_model_reading_past_actions_goes_on():
    """The failed row's NaN was handed back as an applied action: MPC over a model that reads past
    actions kept it in its history, which refused the whole batch at the next step (every result lost)."""
    tasks = [LineTask(target=5.0, max_steps=6), LineTask(target=5.0, max_steps=6)]
    mpc = MPC(PastActionLineModel(), NaNRowPlanner(), MPCConfig(execute=1))
    first, second = run_episodes(tasks, mpc, [0, 2])
    assert (first.success, first.steps) == (False, 1) and "non-finite action at step 1" in first.error
    assert (second.success, second.error) == (True, None)


def test_an_episode_over_at_its_reset_state_is_sent_no_action(tmp_path):
    """Seed 1 starts at the target: success with 0 steps, and its video is the one state it was judged on."""
    tasks = [LineTask(target=1.0), LineTask(target=1.0)]
    written = []
    results = run_episodes(tasks, FakePolicy(every=1), [0, 1], video_dir=tmp_path, videos=2, written=written)
    assert [(r.seed, r.success, r.steps) for r in results] == [(0, True, 1), (1, True, 0)]
    assert tasks[1].sent == [] and tasks[0].sent == [1.0]
    assert results[1].plan_seconds == []  # no model call served it
    assert len(imageio.mimread(tmp_path / "episode_0001_success.mp4")) == 1
    done = [LineTask(target=0.0)]  # every episode over at reset: the policy is never called
    (only,) = run_episodes(done, FakePolicy(every=1), [0])
    assert (only.success, only.steps) == (True, 0) and done[0].sent == []


class ClippingLineTask(LineTask):
    """LineTask that clips actions to its limits, as `RobotBase.check_action` does, and says so."""

    def send_action(self, action: np.ndarray) -> np.ndarray:
        return super().send_action(np.clip(action, -1.0, 1.0).astype(np.float32))


class DoubleStepPolicy(FakePolicy):
    def predict_action_chunk(self, obs):
        return 2 * super().predict_action_chunk(obs)  # beyond the limit of 1


def test_clipped_actions_are_counted_and_a_call_is_shared_by_the_episodes_it_served():
    """An action outside the limits was clipped without a trace in the results; a batched call's time was
    divided among all episodes, finished ones too, so a late call counted for a fraction of itself."""
    tasks = [ClippingLineTask(target=6.0, max_steps=3), ClippingLineTask(target=6.0, max_steps=1)]
    results = run_episodes(tasks, DoubleStepPolicy(every=1), [0, 2])
    assert tasks[0].sent == [1.0, 1.0, 1.0]
    assert [r.clipped_steps for r in results] == [3, 1]
    summary = summarize(results, 1.0)
    assert summary["clipped_steps"] == 4 and summary["per_episode"][1]["clipped_steps"] == 1
    assert results[0].plan_seconds == [0.25, 0.5, 0.5] and results[1].plan_seconds == [0.25]
    assert summary["planning_seconds_per_step"] == 1.5 / 4  # the three calls, over the four steps
    in_limits = [ClippingLineTask(target=6.0, max_steps=2)]
    assert run_episodes(in_limits, FakePolicy(every=1), [0])[0].clipped_steps == 0


class PastActionLineModel(LineModel):
    """LineModel reading two steps and the action between them, as a world model with past actions
    does; records each past action it is given."""

    io_spec = IOSpec(image_keys=("image",), image_size=(8, 8), proprio_key="proprio", proprio_dim=1,
                     action_dim=1, history=2, past_actions=True)  # fmt: skip

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def encode(self, obs):
        if "past_action" in obs:
            self.seen.append(obs["past_action"][:, -1, 0].tolist())  # (E,)
        return super().encode(obs)


class DoubleForwardPlanner(ForwardPlanner):
    def plan(self, z0, goal, warm_start=None, budget=None, model=None):
        return PlanResult(2 * super().plan(z0, goal).actions, torch.zeros(len(z0["state"])), 1)


def test_mpc_is_given_the_actions_the_task_applied_as_its_models_past_actions():
    """The task clipped MPC's +2 to +1; the world model was then given +2 as the action executed before
    the next observation, which the robot never did (and its training data never shows)."""
    model = PastActionLineModel()
    mpc = MPC(model, DoubleForwardPlanner(), MPCConfig(execute=1))
    tasks = [ClippingLineTask(target=9.0, max_steps=4), ClippingLineTask(target=9.0, max_steps=2)]
    run_episodes(tasks, mpc, [0, 2])
    assert tasks[0].sent == [1.0] * 4
    assert model.seen[0] == [0.0, 0.0]  # the first observation: no action before it
    assert model.seen[1:] == [[1.0, 1.0], [1.0, 1.0], [1.0, 2.0]]  # row 1 ended: its action as asked
    with pytest.raises(ValueError, match=r"MPC.applied: actions of shape \(3, 1\), the last select_action"):
        mpc.applied(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"MPC.applied: actions must be numbers, got an array of <U1"):
        mpc.applied(np.array([["a"], ["b"]]))
    with pytest.raises(ValueError, match=r"NaN or inf values in MPC.applied's actions"):
        mpc.applied(np.array([[np.nan], [1.0]]))


QUICK = ["task=pointmaze", "controller=random", "parallel=1", "max_steps=3", "progress=false"]


def test_wm_eval_refuses_an_out_that_is_a_file(tmp_path):
    from apps import run_app

    (tmp_path / "f").write_text("not a folder")
    for out in ("f", "f/sub"):
        res = run_app("wm-eval", *QUICK, "episodes=1", f"out={out}", cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.splitlines() == [
            f"error: out={out}: f is a file; give a folder (new, or an earlier run's)"
        ], res.stderr
    res = run_app("wm-eval", *QUICK, "episodes=1", "out=", cwd=tmp_path)
    assert res.returncode == 2 and "out= is empty" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_wm_eval_interrupted_rerun_leaves_the_earlier_run_whole(tmp_path, monkeypatch):
    """Ctrl-C during a rerun into the same out=: the earlier run's results, report and videos stay as
    they were (results.json lists videos that are there), and none of the unfinished run's are left."""
    from apps import run_app

    res = run_app("wm-eval", *QUICK, "episodes=2", "videos=2", "out=o", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    draw, calls = RandomPolicy.select_action, []

    def interrupted(self, obs):
        calls.append(1)
        if len(calls) > 7:  # two of the rerun's episodes (and their videos) are done
            raise KeyboardInterrupt
        return draw(self, obs)

    monkeypatch.setattr(RandomPolicy, "select_action", interrupted)
    res = run_app("wm-eval", *QUICK, "episodes=4", "videos=4", "seed=2000", "out=o", cwd=tmp_path)
    assert res.returncode == 130 and len(calls) == 8
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    assert after == before and not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]
    # a run killed with -9 cannot remove its staging folder: the next run into out= does (not a live one's)
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    left, live = tmp_path / "o" / f".wm-eval-{dead.pid}-x", tmp_path / "o" / f".wm-eval-{os.getpid()}-y"
    left.mkdir()
    live.mkdir()
    monkeypatch.setattr(RandomPolicy, "select_action", draw)
    assert run_app("wm-eval", *QUICK, "episodes=1", "videos=0", "out=o", cwd=tmp_path).returncode == 0
    assert not left.exists() and live.is_dir()


def test_wm_eval_interrupted_while_writing_its_report_leaves_the_earlier_run_whole(tmp_path, monkeypatch):
    """The videos and results.json replaced the earlier run's before report.html was written, in place:
    Ctrl-C there left a new results.json beside the old report (or a truncated one)."""
    from apps import run_app

    import policies.report

    assert run_app("wm-eval", *QUICK, "episodes=2", "videos=2", "out=o", cwd=tmp_path).returncode == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}

    def interrupted(path, mime):
        raise KeyboardInterrupt

    monkeypatch.setattr(policies.report, "_data_uri", interrupted)  # embedding the videos
    res = run_app("wm-eval", *QUICK, "episodes=3", "videos=3", "seed=2000", "out=o", cwd=tmp_path)
    assert res.returncode == 130
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    assert after == before and not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]


def test_wm_eval_stopped_by_sigterm_cleans_up_as_ctrl_c_does(tmp_path):
    """SIGTERM (`timeout`, SLURM, `docker stop`) ended wm-eval where it stood: no message, status -15, and
    a new out/ holding only the run's hidden staging folder of partial videos."""
    import signal
    import subprocess
    import time

    from apps import BIN

    out = tmp_path / "o"
    run = subprocess.Popen(
        [str(BIN / "wm-eval"), *QUICK[:-2], "max_steps=200", "progress=false", "episodes=1000", f"out={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(out.iterdir())) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # episodes under way
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143 and err.strip().endswith("interrupted"), err
    assert not out.exists()  # made by the run, removed with what it held


def test_a_random_baseline_episode_reruns_alone_from_its_seed(tmp_path):
    """Its actions were drawn from the run's seed= as well as the episode's: results.json listed an
    episode under seed 1002 that `seed=1002 episodes=1` did not give back (planners' and policies' did)."""
    import json

    from apps import run_app

    for args in (("seed=1000", "episodes=3", "out=a"), ("seed=1002", "episodes=1", "out=b")):
        assert run_app("wm-eval", *QUICK, "videos=0", *args, cwd=tmp_path).returncode == 0
    runs = [json.loads((tmp_path / o / "results.json").read_text())["per_episode"] for o in "ab"]
    same = ("seed", "success", "steps", "final_distance", "clipped_steps")
    assert [runs[0][2][k] for k in same] == [runs[1][0][k] for k in same] and runs[1][0]["seed"] == 1002


def test_wm_eval_results_record_what_reruns_the_run(tmp_path):
    """results.json holds every option given and the steps an episode may take."""
    import json

    from apps import run_app

    res = run_app(
        "wm-eval", *QUICK, "episodes=2", "videos=0", "seed=7", "+task_options.goal_mode=other_arm", "out=o",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    config = results["config"]
    assert (config["seed"], config["episodes"], config["max_steps"]) == (7, 2, 3)
    assert config["task_options"] == {"goal_mode": "other_arm"} and config["task"] == "pointmaze"
    assert results["max_steps"] == 3 and results["errors"] == 0


def test_wm_eval_results_json_has_no_nan_literals(tmp_path, monkeypatch):
    import json

    from apps import run_app

    from robots.sim.pointmaze import PointMazeTask

    monkeypatch.setattr(PointMazeTask, "goal_distance", lambda self: float("nan"))
    res = run_app("wm-eval", *QUICK, "episodes=1", "videos=0", "out=o", cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    def refuse(name):  # a task's NaN distance is null in results.json, not a NaN literal
        raise AssertionError(f"{name} in results.json")

    text = (tmp_path / "o" / "results.json").read_text()
    results = json.loads(text, parse_constant=refuse)
    assert results["mean_final_distance"] is None and results["per_episode"][0]["final_distance"] is None
