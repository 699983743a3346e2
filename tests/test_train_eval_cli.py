"""wm-train and wm-eval end to end through their console scripts, with tiny models and budgets."""

from __future__ import annotations

import json
import subprocess

import pytest
from apps import BIN, TINY_POLICY, TINY_WM, cli, run_app

from wm.data import DemoStore


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "maze.zarr"
    res = cli("wm-collect", "task=pointmaze", "episodes=6", f"store={path}", "image_size=32", "noise_std=0.3")
    assert res.returncode == 0, res.stderr
    return path


@pytest.fixture(scope="module")
def world_model(maze, tmp_path_factory):
    run = tmp_path_factory.mktemp("wm") / "run"
    res = cli(
        "wm-train",
        "model=dino_wm",
        "task=pointmaze",
        f"store={maze}",
        f"out={run}",
        "trainer.steps=4",
        "trainer.batch_size=8",
        "trainer.val_every=4",
        "trainer.log_every=2",
        "model.n_hist=2",  # wm-eval must feed it two frames and the action between them
        *TINY_WM,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["out"] == str(run)
    return run


def test_world_model_train_then_mpc_eval(world_model, maze, tmp_path):
    config = json.loads((world_model / "config.json").read_text())
    assert config["model_type"] == "dino_wm" and config["run_config"]["store"] == str(maze.resolve())
    with DemoStore.open(maze) as store:
        assert config["run_config"]["store_fingerprint"] == store.fingerprint

    out = tmp_path / "eval"
    res = cli(
        "wm-eval",
        "task=pointmaze",
        "controller=mpc",
        f"checkpoint={world_model}",
        "episodes=2",
        "parallel=2",
        f"out={out}",
        "max_steps=6",
        "videos=1",
        "planner.samples=8",
        "planner.elites=2",
        "planner.iterations=2",
        "planner.horizon=2",
        "budgets=[1,2]",
        "+task_options.goal_mode=other_arm",
    )
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    per_episode = results["per_episode"]
    assert results["episodes"] == 2 and len(per_episode) == 2
    newest = sorted(world_model.glob("ckpt_*.pt"))[-1]  # what checkpoint=DIR evaluated (it moves as the run
    assert results["checkpoint_file"] == str(newest.resolve())  # trains on: the config alone did not say)
    assert results["checkpoint_step"] == int(newest.stem.split("_")[1])
    assert results["success_rate"] == sum(ep["success"] for ep in per_episode) / 2
    assert all(ep["replans"] >= 1 for ep in per_episode)  # MPC plans at least once per episode
    assert 0 <= results["subgoal_replans"] <= sum(ep["replans"] for ep in per_episode)
    assert [point["iterations"] for point in results["budgets"]] == [1, 2]
    inference = results["inference"]
    assert inference["cost_all_frames"] is True and inference["cost_proprio_weight"] == 1.0
    assert inference["predictor_precision"] in ("fp32", "bf16")  # "auto", resolved on this machine
    videos = list((out / "videos").glob("episode_1000_*.mp4"))
    assert (out / "success_vs_budget.png").exists() and len(videos) == 1
    report = (out / "report.html").read_text()
    assert "<video" in report and "success rate" in report.lower()
    assert "2/2" in res.stderr and str(out / "results.json") in res.stdout  # progress bar, where outputs went

    res = run_app(
        "wm-eval", "task=arm_push", "controller=mpc", f"checkpoint={world_model}", "episodes=1", f"out={out}"
    )
    assert res.returncode == 2 and "another task" in res.stderr


@pytest.mark.parametrize(
    "args, line",
    [
        (["execute=5", "planner.horizon=2"], "cannot execute 5 steps of a horizon-2 plan"),
        (["subgoals=on", "store=missing.zarr"], "store=missing.zarr does not exist (the store subgoals are"),
        (["subgoals=auto", "store=missing.zarr"], "store=missing.zarr does not exist"),  # was only a note
        (["subgoals=on", "graph.stride=1000"], "subgoals=on: the subgoal graph from"),  # never a subgoal
        (["task=arm_push"], "an observation from another task or robot?"),  # refused as the episodes start
        (["episodes=1000000000000"], "episodes must be at most 1,000,000"),  # a MemoryError traceback
    ],
)
def test_eval_refusals_leave_no_empty_out_folder(world_model, tmp_path, args, line):
    """Refused with one line, and no output folder left behind; one that existed before stays."""
    common = [
        "task=pointmaze", "controller=mpc", f"checkpoint={world_model}", "episodes=1", "max_steps=2",
        "videos=0", "progress=false", "subgoals=off", "planner.samples=8", "planner.elites=2",
    ]  # fmt: skip
    res = run_app("wm-eval", *common, "out=new/eval", *args, cwd=tmp_path)
    assert res.returncode == 2 and line in res.stderr, res.stderr
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    assert run_app("wm-eval", *common, "out=old", *args, cwd=tmp_path).returncode == 2
    assert (tmp_path / "old").is_dir()


def test_subgoals_auto_on_a_graph_that_can_give_none_are_off_and_said(world_model, tmp_path):
    """A stride longer than every episode gives one node an episode: no step to measure reach by, so no
    subgoal ever (subgoal_replans 0, subgoals=on recorded), and nothing said."""
    res = run_app(
        "wm-eval", "task=pointmaze", "controller=mpc", f"checkpoint={world_model}", "episodes=1",
        "max_steps=2", "videos=0", "progress=false", "subgoals=auto", "graph.stride=1000",
        "planner.samples=8", "planner.elites=2", "planner.iterations=1", f"out={tmp_path / 'e'}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "note: subgoals off: the subgoal graph from" in res.stdout and "graph.stride=1000" in res.stdout


def test_eval_reports_the_kernels_of_its_own_model_alone(world_model, tmp_path):
    """A -m sweep runs its jobs in one process, with one kernel selector: each job's `kernels` holds
    what its own evaluation chose and spent, not the jobs' before it."""
    from tools.eval import EvalConfig, evaluate
    from wm import kernels

    earlier = kernels.Selector(kernels.KernelCache(None), total_budget_s=1e6, spent_s=1000.0)
    earlier.log.append(("machine|an earlier job's layer", {"choice": "earlier_kernel"}, "calibrated"))
    planner = {"name": "cem", "samples": 8, "elites": 2, "iterations": 1, "horizon": 2}
    cfg = EvalConfig(out=str(tmp_path / "e"), controller="mpc", checkpoint=str(world_model), episodes=1,
                     max_steps=2, videos=0, progress=False, subgoals="off", planner=planner)  # fmt: skip
    with kernels.using(earlier):
        summary = evaluate(cfg)["kernels"]
    assert "earlier_kernel" not in summary["by_kernel"]
    assert summary["shapes"] == sum(summary["by_kernel"].values())
    assert 0 <= summary["calibration_s"] < 1000.0 and not summary["budget_exhausted"]


def test_a_calibration_budget_that_ran_out_says_a_rerun_may_differ(world_model, tmp_path, capsys):
    """The next run measures the shapes this one left unmeasured and could give other results (1-2 %
    of a final distance after 200 steps), where the README promised a shared cache identical reruns."""
    from tools.eval import EvalConfig, evaluate
    from wm import kernels

    planner = {"name": "cem", "samples": 8, "elites": 2, "iterations": 1, "horizon": 2}
    cfg = EvalConfig(out=str(tmp_path / "e"), controller="mpc", checkpoint=str(world_model), episodes=1,
                     max_steps=2, videos=0, progress=False, subgoals="off", planner=planner)  # fmt: skip
    for budget, said in ((0.0, True), (1e6, False)):
        with kernels.using(kernels.Selector(kernels.KernelCache(None), total_budget_s=budget)):
            assert evaluate(cfg)["kernels"]["budget_exhausted"] is said
        out = capsys.readouterr().out
        assert ("note: the kernel calibration budget ran out" in out) is said, out


def test_budget_plot_joins_its_points_by_iterations(tmp_path, monkeypatch):
    """budgets=[6,2,4,2]: one point per budget, drawn left to right (not a zigzag in the typed order)."""
    from types import SimpleNamespace

    from matplotlib.axes import Axes

    from tools.eval import _budget_sweep

    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, x, *a, **k: drawn.append(list(x)) or plot(ax, x, *a, **k))
    rates = {2: 0.2, 4: 0.5, 6: 0.8}
    points, path = _budget_sweep(
        SimpleNamespace(budgets=[6, 2, 4, 2], task="pointmaze"),
        lambda iterations: iterations,  # the "planner" is its iteration count
        lambda iterations, video, desc: {"success_rate": rates[iterations], "planning_seconds_per_step": 0.1},
        tmp_path,
    )
    assert [p["iterations"] for p in points] == [2, 4, 6] and drawn == [[2, 4, 6]] and path.exists()


def test_subgoal_store_is_found_from_anywhere_and_changes_are_said(world_model, maze, tmp_path):
    """The checkpoint names its store by absolute path: evaluating from another folder keeps the
    subgoals; another store given with store= is used, and the evaluation says it differs."""
    other = tmp_path / "other.zarr"
    res = cli("wm-collect", "task=pointmaze", "episodes=2", f"store={other}", "image_size=32")
    assert res.returncode == 0, res.stderr
    common = [
        "task=pointmaze", "controller=mpc", f"checkpoint={world_model}", "episodes=1", "max_steps=2",
        "videos=0", "progress=false", "subgoals=on", "planner.samples=8", "planner.elites=2",
        "planner.iterations=1",
    ]  # fmt: skip
    res = subprocess.run(
        [str(BIN / "wm-eval"), *common, "out=e1"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "note:" not in res.stdout  # the training store, unchanged (its seeds 0..5, these 1000..)
    res = cli("wm-eval", *common, f"out={tmp_path / 'e3'}", "seed=4", "episodes=3", "parallel=3")
    assert res.returncode == 0, res.stderr  # evaluated on the training episodes' start states, unsaid
    assert (
        f"note: 2 of the 3 episodes start where episodes of the training store {maze.resolve()} started "
        "(seeds 4..5); give seed=6 or more to evaluate on unseen starts"
    ) in res.stdout
    res = cli("wm-eval", *common, f"out={tmp_path / 'e2'}", f"store={other}")
    assert res.returncode == 0, res.stderr
    assert "not the store the world model was trained on (6 episodes then, 2 now" in res.stdout


@pytest.mark.parametrize(
    "planner",
    [
        ["planner=cem", "planner.samples=8", "planner.elites=2"],
        ["planner=mppi", "planner.samples=8", "planner.elites=4"],
        ["planner=gd", "planner.steps=2", "planner.restarts=2"],
        ["planner=cem_gd", "planner.cem.samples=8", "planner.cem.elites=2", "planner.grad.steps=2"],
    ],
    ids=lambda p: p[0],
)
def test_every_planner_through_wm_eval(world_model, tmp_path, planner):
    """Each planner config group entry runs end to end with only its own fields, under a per-replan
    wall-clock budget and an iteration cap reachable from the command line."""
    out = tmp_path / "eval"
    res = cli(
        "wm-eval", "task=pointmaze", "controller=mpc", f"checkpoint={world_model}", "episodes=2",
        "parallel=2", f"out={out}", "max_steps=4", "videos=0", "subgoals=off", *planner,
        "planner_budget.seconds=5", "planner_budget.iterations=2", "progress=false",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["episodes"] == 2 and results["planning_seconds_per_step"] > 0
    assert [ep["steps"] for ep in results["per_episode"]] == [4, 4]


def test_planner_options_are_checked(world_model, tmp_path):
    res = run_app(
        "wm-eval", "controller=mpc", f"checkpoint={world_model}", f"out={tmp_path}", "planner=gd",
        "+planner.samples=8",
    )  # fmt: skip
    assert res.returncode == 2 and "samples" in res.stderr and not (tmp_path / "results.json").exists()


def test_diffusion_policy_train_then_eval(maze, tmp_path):
    run = tmp_path / "dp"
    res = cli(
        "wm-train",
        "model=diffusion_unet",
        "task=pointmaze",
        f"store={maze}",
        f"out={run}",
        "trainer.steps=3",
        "trainer.batch_size=4",
        "trainer.val_every=3",
        "model.unet.down_dims=[16,32]",
        "model.unet.n_groups=8",
        "model.obs.crop=null",
        "model.obs.backbone=patch",
        "+model.obs.patch_encoder={name: cnn, cnn_channels: [8, 16], cnn_stride: 4, cnn_dim: 16}",
    )
    assert res.returncode == 0, res.stderr
    # the hint runs as printed (it named no controller: wm-eval's default, mpc, refused the policy)
    assert f"(wm-eval controller=policy checkpoint={run} loads it)" in res.stdout
    out = tmp_path / "eval_dp"
    res = cli(
        "wm-eval",
        "task=pointmaze",
        "controller=policy",
        f"checkpoint={run}",
        "episodes=2",
        "parallel=2",
        f"out={out}",
        "max_steps=5",
        "videos=0",
        "policy.sampler=edm",
        "policy.sampler_steps=2",
        "policy.edm_solver=heun",  # not the trained config's (dpmpp_2m): the override shows
        "policy.precision=bf16",
    )
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["episodes"] == 2 and results["action_seconds_per_step"] > 0
    assert results["inference"] == {
        "sampler": "edm",
        "sampler_steps": 2,
        "noise.edm_solver": "heun",
        "precision": "bf16",
        "temporal_ensemble": None,
        "inpaint_guidance": "estimate",
    }
    kern = results["kernels"]  # the kernels the policy's layers ran on, chosen in the eval's process
    assert kern["mode"] == "measure" and kern["shapes"] == sum(kern["by_kernel"].values()) > 0

    res = run_app(
        "wm-eval", "task=pointmaze", "controller=mpc", f"checkpoint={run}", "episodes=1", f"out={out}"
    )
    assert res.returncode == 2 and "cannot serve controller=mpc" in res.stderr
    res = run_app(  # it changed nothing here, and results.json recorded it
        "wm-eval", "task=pointmaze", "controller=policy", f"checkpoint={run}", "episodes=1", f"out={out}",
        "policy.inpaint_guidance=gradient",
    )  # fmt: skip
    assert res.returncode == 2 and "policy.inpaint_guidance has no effect in wm-eval" in res.stderr
    # the solver of a sampler the checkpoint does not use was accepted, ignored and recorded as used
    from wm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    ckpt = {k: v for k, v in load_checkpoint(latest_checkpoint(run)).items() if k not in ("path", "format")}
    ddim = save_checkpoint(
        tmp_path / "ddim.pt", **{**ckpt, "model_config": {**ckpt["model_config"], "sampler": "ddim"}}
    )
    res = run_app(
        "wm-eval", "task=pointmaze", "controller=policy", f"checkpoint={ddim}", "episodes=1", f"out={out}",
        "policy.edm_solver=heun",
    )  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: policy.edm_solver=heun solves the edm sampler's steps; the checkpoint's sampler (ddim) has "
        "none: leave it out"
    )

    # Consistency distillation of that policy through the one trainer, then evaluated as any policy.
    student = tmp_path / "cm"
    res = cli(
        "wm-train", "model=consistency", f"teacher={run}", f"store={maze}", f"out={student}",
        "trainer.steps=3", "trainer.batch_size=4", "trainer.val_every=3", "model.n_sigmas=4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "trainer.ema_decay=0.0" in res.stdout  # said, not silently applied
    config = json.loads((student / "config.json").read_text())
    assert config["model_type"] == "consistency" and config["model_config"]["teacher"].endswith(".pt")
    # what ran, in config.json and the checkpoints alike (run_config said the user's 0.995)
    assert config["trainer"]["ema_decay"] == config["run_config"]["trainer"]["ema_decay"] == 0.0
    res = cli(
        "wm-eval", "task=pointmaze", "controller=policy", f"checkpoint={student}", "episodes=2",
        "parallel=2", f"out={tmp_path / 'eval_cm'}", "max_steps=3", "videos=0", "progress=false",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "eval_cm" / "results.json").read_text())["inference"]["sampler_steps"] == 1
    res = run_app("wm-train", "model=consistency", f"store={maze}", f"out={tmp_path / 'x'}")
    assert res.returncode == 2 and "teacher=DIR" in res.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("task", "model", "image_key"),
    [("pusht", "diffusion_transformer", "image"), ("robosuite/Lift", "diffusion_unet", "agentview_image")],
)
def test_policy_collect_train_eval_on_other_tasks(task, model, image_key, tmp_path):
    """The whole collect -> wm-train -> wm-eval controller=policy path on PushT and a robosuite task
    (the pointmaze test above covers the options); each task's camera key reaches the policy."""
    if task.startswith("robosuite/"):
        pytest.importorskip("robosuite")
    store = tmp_path / "demo.zarr"
    res = cli("wm-collect", f"task={task}", "episodes=2", f"store={store}", "image_size=32", "max_steps=24")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "policy"
    if model == "diffusion_unet":
        extra = ["model.unet.down_dims=[16,32]"]
    else:
        extra = ["model.transformer.dim=32", "model.transformer.depth=1", "model.transformer.heads=2"]
    res = cli(
        "wm-train", f"model={model}", f"task={task}", f"store={store}", f"out={run}", *TINY_POLICY, *extra
    )
    assert res.returncode == 0, res.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model_type"] == model and image_key in json.dumps(config["model_config"])
    out = tmp_path / "eval"
    res = cli(
        "wm-eval", f"task={task}", "controller=policy", f"checkpoint={run}", "episodes=2", "parallel=2",
        f"out={out}", "max_steps=10", "videos=1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["episodes"] == 2 and [ep["steps"] for ep in results["per_episode"]] == [10, 10]
    assert len(list((out / "videos").glob("*.mp4"))) == 1
    # PushT reports Diffusion Policy's score (the best coverage / 0.95 of each episode); Lift has none.
    score = results["mean_max_score"]
    assert (0.0 <= score <= 1.0) if task == "pusht" else score is None
