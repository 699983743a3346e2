"""What a new user meets at the command line, run as a user runs it (console scripts in a subprocess;
refusals mostly in this process, through the `main()` the script calls, to spare a torch import each):
sweeps that run every job, each in its own folder; required values and unknown options refused in one
line before anything is written; Hydra's own errors as one line too; bugs keep their traceback; `--help`
explains every option; the apps say where they wrote."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from apps import run_app
from omegaconf import OmegaConf

import configs
from robots.base import RobotError
from robots.registry import make_task, task_entry
from robots.sim.base import SimConfig

BIN = Path(sys.executable).parent
QUICK_EVAL = [
    "task=pointmaze",
    "controller=random",
    "parallel=1",
    "videos=0",
    "max_steps=3",
    "progress=false",
]


def cli(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def files(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def refused(name: str, *args: str, cwd: Path, in_process: bool = True) -> str:
    """Run a command that must be refused: exit status 2, one line on stderr, nothing on disk changed.
    In this process (`run_app`: the script's `main()`) unless `in_process` is False."""
    before = files(cwd)
    res = run_app(name, *args, cwd=cwd) if in_process else cli(name, *args, cwd=cwd)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert files(cwd) == before
    return lines[0]


# ---------------------------------------------------------------------- 1. sweeps run every job
def test_multirun_runs_every_job_in_its_own_folder_and_fails_if_one_failed(tmp_path):
    res = cli("wm-eval", "-m", "episodes=1,0,2", "out=sweep", *QUICK_EVAL, cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: job 1 (episodes=0") and "episodes must be >= 1, got 0" in lines[0]
    for job, episodes in ((0, 1), (2, 2)):  # each job in its own folder; the failed one stopped nothing
        results = json.loads((tmp_path / "sweep" / str(job) / "results.json").read_text())
        assert results["episodes"] == episodes
        assert f"wrote results {tmp_path / 'sweep' / str(job) / 'results.json'}" in res.stdout
    assert not (tmp_path / "sweep" / "1" / "results.json").exists()


def test_a_deploy_sweep_records_only_when_asked_and_into_each_jobs_folder(tmp_path):
    """Without record=, every job recorded into a store named None (null became the path <job>/None)."""
    quick = ["robot=pointmaze", "controller=random", "max_steps=3"]
    res = cli("wm-deploy", "-m", "seed=1,2", "out=ds", *quick, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "ds" / "0").iterdir()) == ["report.json", "timing.png"]
    res = cli("wm-deploy", "-m", "seed=1,2", "out=rs", "record=r.zarr", *quick, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert all((tmp_path / "rs" / job / "r.zarr" / "meta").is_dir() for job in ("0", "1"))


# ---------------------------------------------------------------------- 2. required values are required
@pytest.mark.parametrize(
    "name, args, line",
    [
        ("wm-collect", ["task=arm_push"], "error: store= is required (the demonstration store to write"),
        ("wm-eval", ["controller=random"], "error: out= is required (the folder for results.json"),
    ],
)
def test_required_values_are_required(tmp_path, name, args, line):
    assert refused(name, *args, cwd=tmp_path, in_process=False).startswith(line)  # as the script runs


# ---------------------------------------------------------------------- 3. options are checked
@pytest.mark.parametrize(
    "name, args, line",
    [
        (
            "wm-collect",
            ["task=pointmaze", "store=s.zarr", "+task_options.goal_mod=other_arm"],
            "error: unknown option task_options.goal_mod; did you mean task_options.goal_mode?",
        ),
        (
            "wm-demo",
            ["+trainer.stpes=10"],
            "error: unknown option trainer.stpes; did you mean trainer.steps?",
        ),
        (  # it raised out of the session at the operator's first key press, on a connected arm
            "wm-collect",
            ["robot=so101_follower", "teleop=keyboard", "task=pick", "store=s.zarr"],
            "error: teleop=keyboard cannot drive so101_follower: a joint action space needs joint targets "
            "from a leader arm; this device has none",
        ),
        (  # which step of the demo was not said
            "wm-demo",
            ["eval.episodes=0"],
            "error: eval: episodes must be >= 1, got 0",
        ),
        (  # refused after collecting and training (minutes of work), when the evaluation met it
            "wm-demo",
            ["model=diffusion_small"],
            "error: model=diffusion_unet cannot serve MPC, which the demo plans with (a world model: "
            "model=dino_wm); train other models with wm-train",
        ),
        (
            "wm-train",
            ["store=missing.zarr", "out=run", "+trainer.stpes=10"],
            "error: unknown option trainer.stpes; did you mean trainer.steps?",
        ),
        (  # "trainr.steps is not in the config; add it with +trainr.steps=10", which failed in turn
            "wm-train",
            ["store=missing.zarr", "out=run", "trainr.steps=10"],
            "error: unknown option trainr; did you mean trainer?",
        ),
        ("wm-eval", ["out=o", "planer.samples=3"], "error: unknown option planer; did you mean planner?"),
        (
            "wm-train",
            ["store=missing.zarr", "out=run", "trainer.steps=abc"],
            "error: trainer.steps must be an integer, got 'abc'",
        ),
        (  # it failed on "[Errno 17] File exists" once the store was read and the model built
            "wm-train",
            ["store=missing.zarr", "out=/dev/null"],
            "error: out=/dev/null: /dev/null is a file; give the run's folder (new, or one to resume)",
        ),
        (  # refused only at the first validation, trainer.val_every steps in
            "wm-train",
            ["store=missing.zarr", "out=run", "trainer.best_metric=val_mse"],
            "error: trainer.best_metric='val_mse' is not a validation metric of model=dino_wm "
            "(val_one_step_mse, val_3_step_mse); name one of those, 'auto' (the first) or null (no best.pt)",
        ),
        (  # wm-demo checked it only after collecting its 200 episodes
            "wm-demo",
            ["out=d", "trainer.best_metric=val_mse"],
            "error: trainer.best_metric='val_mse' is not a validation metric of model=dino_wm "
            "(val_one_step_mse, val_3_step_mse); name one of those, 'auto' (the first) or null (no best.pt)",
        ),
        (  # Path("") is the current folder: the run wrote its checkpoints there
            "wm-train",
            ["store=missing.zarr", "out="],
            "error: out= is empty; give the run's folder (new, or one to resume)",
        ),
        (  # the sheet was written into the current folder
            "wm-info",
            ["store=missing.zarr", "contact_sheet="],
            "error: contact_sheet= is empty; give a folder or a .png path in one",
        ),
        (  # an empty name went into the dataset's metadata
            "wm-convert",
            ["src=missing.zarr", "dst=out_lerobot", "repo_id="],
            "error: repo_id= is empty; give the dataset's name, e.g. repo_id=user/pusht_demos",
        ),
        (  # refused after the robosuite task was built and an empty store made, which then refused
            "wm-collect",  # Lift episodes into it (another schema)
            ["task=robosuite/NutAssembly", "store=nut.zarr"],
            "error: no scripted expert for robosuite/NutAssembly; there are for Lift, Stack, Door",
        ),
        (
            "wm-collect",
            ["task=pointmaze", "store="],
            "error: store= is empty; give a store path in a folder",
        ),
        (  # a traceback (NotADirectoryError) once the model was built
            "wm-train",
            ["store=missing.zarr", "out=/dev/null/run"],
            "error: out=/dev/null/run: /dev/null is a file; give the run's folder (new, or one to resume)",
        ),
        (  # "error: [Errno 17] File exists" named no option
            "wm-collect",
            ["task=pointmaze", "store=/dev/null"],
            "error: store=/dev/null: is a file, not a store; give a new path or an existing store",
        ),
        (  # a traceback (NotADirectoryError) when the store was made
            "wm-collect",
            ["task=pointmaze", "store=/dev/null/s.zarr"],
            "error: store=/dev/null/s.zarr: /dev/null is a file; give a store path in a folder",
        ),
        (  # a traceback (NotADirectoryError) after reading the source
            "wm-convert",
            ["src=missing.zarr", "dst=/dev/null/s.zarr"],
            "error: dst=/dev/null/s.zarr: /dev/null is a file; give a path in a folder",
        ),
        (  # its default (0.5 with a video store) could not be told from an unused one given
            "wm-train",
            ["model=uwm", "store=missing.zarr", "out=run", "video_ratio=0.3"],
            "error: video_ratio=0.3 without video_store=: there is no video to mix in",
        ),
        (  # the same check as the library's setup_training (one copy)
            "wm-train",
            ["model=dino_wm", "store=missing.zarr", "out=run", "feature_cache=on"],
            "error: feature_cache must be 'auto' or 'off', got 'on'",
        ),
        (
            "wm-info",
            ["store=missing.zarr", "format=xml"],
            "error: format must be 'text' or 'json', got 'xml'",
        ),
        (
            "wm-eval",
            ["out=e", "controller=random", "+task_options.goal_mode=other"],
            "error: task_options.goal_mode must be one of any, other_arm, got 'other'; "
            "did you mean other_arm?",
        ),
        (  # options that did nothing in the run they were given to were ignored without a word
            "wm-collect",
            ["task=pointmaze", "store=s.zarr", "state_only=true", "image_size=32"],
            "error: image_size sets the camera, which state_only=true leaves out: give one of them",
        ),
        (
            "wm-collect",
            ["task=pointmaze", "store=s.zarr", "replay_noise_std=0.5"],
            "error: replay_noise_std is the noise of replays: give replays=N too",
        ),
        (
            "wm-collect",
            ["task=pointmaze", "store=s.zarr", "command_device=gamepad"],
            "error: command_device starts a human's episodes; teleop=scripted takes none",
        ),
        (
            "wm-collect",
            ["task=pointmaze", "store=s.zarr", "teleop=keyboard", "command_device=gamepad"],
            "error: command_device, command_options: teleop=keyboard has its own START / SAVE buttons; "
            "leave them out",
        ),
        (
            "wm-deploy",
            ["out=e", "robot=pointmaze", "controller=random", "command_device=gamepad"],
            "error: device_options, command_device, command_options and gains apply to a takeover device: "
            "give teleop=DEVICE",
        ),
        (  # results.json recorded the solver as if it had run
            "wm-eval",
            [
                "out=e",
                "task=pointmaze",
                "controller=policy",
                "checkpoint=c",
                "policy.sampler=ddim",
                "policy.edm_solver=heun",
            ],
            "error: policy.edm_solver=heun solves the edm sampler's steps; policy.sampler=ddim has none: "
            "leave it out",
        ),  # fmt: skip
        (  # it ran every training step (100 network calls), results.json recorded 10
            "wm-eval",
            [
                "out=e",
                "task=pointmaze",
                "controller=policy",
                "checkpoint=c",
                "policy.sampler=ddpm",
                "policy.sampler_steps=10",
            ],
            "error: policy.sampler_steps=10 has no effect: policy.sampler=ddpm runs every training step; "
            "leave it out, or give policy.sampler=ddim or edm",
        ),  # fmt: skip
        (  # the options' own names: "planner_budget: max_iterations", "model.temporal_ensemble"
            "wm-eval",
            ["out=e", "task=pointmaze", "controller=mpc", "checkpoint=c", "planner_budget.iterations=0"],
            "error: planner_budget: iterations must be an integer >= 1 or None, got 0",
        ),
        (
            "wm-eval",
            ["out=e", "task=pointmaze", "controller=policy", "checkpoint=c", "policy.temporal_ensemble=nan"],
            "error: policy.temporal_ensemble must be a finite number or null, got nan",
        ),
        (  # as wm-eval and wm-deploy refuse it
            "wm-serve",
            ["controller=random", "seed=-1"],
            "error: seed must be >= 0, got -1",
        ),
        (  # ignored there: the robot's runtime asks for chunks and combines them itself
            "wm-deploy",
            ["out=e", "robot=pointmaze", "controller=policy", "checkpoint=c", "policy.temporal_ensemble=0.1"],
            "error: policy.temporal_ensemble has no effect in wm-deploy: the runtime combines the chunks; "
            "give wm-deploy runtime.stitching=ensemble (runtime.ensemble_m for its weights)",
        ),
        (  # accepted, recorded in report.json, and no chunk was guided
            "wm-deploy",
            [
                "out=e",
                "robot=pointmaze",
                "controller=policy",
                "checkpoint=c",
                "runtime.mode=sync",
                "policy.inpaint_guidance=gradient",
            ],
            "error: policy.inpaint_guidance has no effect with runtime.mode=sync, stitching=inpaint: it "
            "guides a chunk towards the one it replaces, which only wm-deploy's runtime.mode=async with "
            "runtime.stitching=inpaint asks for; leave it out",
        ),  # fmt: skip
        (
            "wm-deploy",
            [
                "out=e",
                "robot=pointmaze",
                "controller=policy",
                "checkpoint=c",
                "runtime.stitching=replace",
                "policy.inpaint_guidance=gradient",
            ],
            "error: policy.inpaint_guidance has no effect with runtime.mode=async, stitching=replace: it "
            "guides a chunk towards the one it replaces, which only wm-deploy's runtime.mode=async with "
            "runtime.stitching=inpaint asks for; leave it out",
        ),  # fmt: skip
        (
            "wm-serve",
            ["controller=policy", "checkpoint=c", "policy.temporal_ensemble=0.1"],
            "error: policy.temporal_ensemble has no effect in wm-serve: the runtime combines the chunks; "
            "give wm-deploy runtime.stitching=ensemble (runtime.ensemble_m for its weights)",
        ),
        (  # options of another controller are refused, not ignored
            "wm-eval",
            ["out=e", "controller=random", "policy.sampler_steps=3"],
            "error: policy.sampler_steps: options of controller=policy, not of controller=random; "
            "leave them out",
        ),
        (
            "wm-eval",
            ["out=e", "controller=random", "execute=2", "subgoals=on"],
            "error: execute, subgoals: MPC options, and controller=random does not plan; leave them out",
        ),
        (  # the planner group is always composed: one other than the default is the user's
            "wm-eval",
            ["out=e", "controller=random", "planner=mppi"],
            "error: planner=mppi: MPC options, and controller=random does not plan; leave them out",
        ),
        (
            "wm-eval",
            ["out=e", "controller=policy", "checkpoint=run", "planner.samples=512", "planner.elites=4"],
            "error: planner.samples, planner.elites: MPC options, and controller=policy does not plan; "
            "leave them out",
        ),
        (  # ignored, while results.json recorded them as used
            "wm-eval",
            ["out=e", "controller=mpc", "checkpoint=run", "subgoals=off", "store=s.zarr", "graph.stride=3"],
            "error: store, graph: options of the subgoal graph, and subgoals=off; leave them out",
        ),
        (
            "wm-eval",
            ["out=e", "controller=random", "checkpoint=run"],
            "error: checkpoint=: controller=random acts at random and reads no checkpoint; leave it out",
        ),
        (
            "wm-eval",
            ["out=e", "controller=random", "budgets=[2,4]"],
            "error: budgets sweep planner iterations; controller=random does not plan",
        ),
        (  # not the task's default, as 0 once was
            "wm-eval",
            ["out=e", *QUICK_EVAL, "episodes=1", "max_steps=0"],
            "error: max_steps must be >= 1 (null: the task's default), got 0",
        ),
        (  # numpy's own words named no option, and came after out/ was made
            "wm-eval",
            ["out=e", *QUICK_EVAL, "episodes=1", "seed=-3"],
            "error: seed must be >= 0 (episode i uses seed + i), got -3",
        ),
    ],
)
def test_options_are_checked_before_any_work(tmp_path, name, args, line):
    assert refused(name, *args, cwd=tmp_path) == line


def test_a_motion_device_on_absolute_actions_without_a_present_value_is_refused_before_the_session(tmp_path):
    """An absolute end-effector controller (robosuite's OSC_POSITION with input_type absolute: 4-d action,
    no proprioception of that size) passed the check, fed zeros as the robot's present value; the store was
    made and the session raised at the operator's first key press."""
    import robosuite as rs

    cfg = rs.load_composite_controller_config(robot="Panda")
    part = {**rs.load_part_controller_config(default_controller="OSC_POSITION"), "input_type": "absolute"}
    for arm, arm_cfg in cfg["body_parts"].items():
        cfg["body_parts"][arm] = {**part, "gripper": arm_cfg["gripper"]} if "gripper" in arm_cfg else part
    (tmp_path / "absolute.json").write_text(json.dumps(cfg))
    args = [
        "task=robosuite/Lift",
        "+task_options.controller=absolute.json",
        "teleop=keyboard",
        "store=s.zarr",
        "state_only=true",  # (no EGL renderer: Mesa's threads would stay in this process)
    ]
    assert refused("wm-collect", *args, cwd=tmp_path) == (
        "error: teleop=keyboard cannot drive robosuite/Lift: an absolute ee action needs the robot's "
        "present value in the action's layout (a proprioception of its size) to add the teleop step to, "
        "and the robot reports none: use a delta action space"
    )


@pytest.mark.parametrize("name", ["pointmaze", "arm_push", "pusht"])
def test_every_task_declares_its_options_and_refuses_others(name):
    entry = task_entry(name)
    make_task(name, SimConfig(state_only=True, options={}))  # the declared defaults build
    with pytest.raises(RobotError, match=f"unknown option 'goal_mod' for task {name}"):
        make_task(name, SimConfig(state_only=True, options={"goal_mod": "other_arm"}))
    if name == "pointmaze":
        assert [f for f in entry.options.__dataclass_fields__] == ["goal_mode", "success_radius"]
        with pytest.raises(RobotError, match="did you mean goal_mode"):
            make_task(name, SimConfig(options={"goal_mod": "other_arm"}))


def test_a_sweep_of_refused_jobs_writes_nothing_and_a_refused_job_leaves_no_folder(tmp_path):
    """Hydra makes the sweep's folder, its multirun.yaml and each job's folder before any job runs."""
    before = files(tmp_path)
    res = cli("wm-eval", "-m", "seed=1,2", "controller=random", cwd=tmp_path)  # no out=
    assert res.returncode == 2 and res.stderr.count("out= is required") == 2, res.stderr
    assert files(tmp_path) == before
    res = cli("wm-eval", "-m", "episodes=1,0", "out=sweep", *QUICK_EVAL, cwd=tmp_path)
    assert res.returncode == 2
    assert (tmp_path / "sweep" / "0" / "results.json").is_file() and not (tmp_path / "sweep" / "1").exists()
    # a folder that was there before (empty) stays, as it was
    (tmp_path / "mine").mkdir()
    res = cli("wm-eval", "-m", "episodes=0,-1", "out=mine", *QUICK_EVAL, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("error:") == 2, res.stderr
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    # a swept option that does not exist: refused while composing, before any job (multirun.yaml was
    # left in a new out=, or in multirun/<date>/<time> without one)
    before = files(tmp_path)
    res = cli("wm-eval", "-m", "seeds=1,2", "out=new", cwd=tmp_path)  # (an app option: no "+seeds" hint)
    assert res.returncode == 2 and res.stderr == "error: unknown option seeds; did you mean seed?\n"
    res = cli("wm-collect", "-m", "task=pointmaze", "store=s.zarr", "noise=0.1,0.2", cwd=tmp_path)
    assert res.returncode == 2 and "error: unknown option noise; did you mean noise_std?" in res.stderr
    assert files(tmp_path) == before


# ---------------------------------------------------------------------- 4. one line, not a traceback
@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["planner=nonexistent"],
            "error: planner=nonexistent: no such planner; valid: cem, cem_gd, gd, mppi",
        ),
        (["seed=[1,"], "error: cannot parse override 'seed=[1,': "),
        (
            ["graph.strid=3"],
            "error: unknown option graph.strid; did you mean graph.stride?",
        ),
        (["planner.samples=abc"], "error: planner.samples must be an integer, got 'abc'"),
        (  # the suggestions were the default planner's (cem: "did you mean planner.samples?")
            ["planner=gd", "planner.stesp=8"],
            "error: unknown option planner.stesp; did you mean planner.steps?",
        ),
        (  # as configs/eval.yaml shows it: "did you mean task_options?", and a hint cut at its first space
            ["task_options={goal_mode: other_arm}"],
            "error: task_options holds none of the keys given to it; add them with "
            "+task_options={goal_mode: other_arm}",
        ),
        (  # it ran the planner's own 6, and results.json recorded the cap as given
            ["planner_budget.iterations=1000"],
            "error: planner_budget.iterations=1000 caps nothing: the cem planner runs 6 iterations; raise",
        ),
    ],
)
def test_hydra_and_value_errors_are_one_line(tmp_path, args, line):
    assert refused("wm-eval", "out=e", "controller=mpc", "checkpoint=run", *args, cwd=tmp_path).startswith(
        line
    )


def test_deploy_and_serve_check_the_planners_option_types_before_loading_anything(tmp_path):
    """wm-eval did; wm-deploy and wm-serve built the planner's config from the raw values once the model
    had loaded, and `planner.lr=abc` ended in a bug's traceback ('<' between 'int' and 'str')."""
    args = ("controller=mpc", "checkpoint=run", "planner=gd", "planner.lr=abc")
    line = "error: planner.lr must be a number, got 'abc'"
    assert refused("wm-deploy", "robot=pointmaze", "out=d", *args, cwd=tmp_path).startswith(line)
    assert refused("wm-serve", *args, cwd=tmp_path).startswith(line)


def test_every_planner_and_graph_option_is_in_the_configs(tmp_path):
    """planner.stop_cost (the README's), init_std, warm_std, max_std, include_mean, return_best and
    graph.goal_reach were options of the typed configs the YAMLs lacked: refused as unknown ("init_std:
    did you mean planner.min_std?")."""
    import dataclasses

    from policies.planners import CEMConfig, GradConfig, MPPIConfig
    from policies.subgoal import GraphConfig

    folder = Path(configs.__file__).parent
    for name, cls in (("cem", CEMConfig), ("mppi", MPPIConfig), ("gd", GradConfig)):
        given = set(OmegaConf.load(folder / "planner" / f"{name}.yaml")) - {"name"}
        assert given == {f.name for f in dataclasses.fields(cls)} - {"low", "high"}, name  # (the robot's)
    for app in ("eval", "deploy", "serve"):
        assert set(OmegaConf.load(folder / f"{app}.yaml")["graph"]) == {
            f.name for f in dataclasses.fields(GraphConfig)
        }
    args = ("out=e", "controller=mpc", "checkpoint=run", "planner.stop_cost=0.1", "planner.init_std=0.5")
    line = refused("wm-eval", *args, "graph.goal_reach=2", cwd=tmp_path)
    assert line == "error: no checkpoint file at run", line  # the options were taken


def test_only_free_mappings_are_offered_new_keys(tmp_path):
    """A typed block (graph, planner, trainer) takes no new key: the hint to add one ("+graph.strid=3")
    led to the same error again. A free mapping (`{}` in the config) does."""
    args = ("out=e", "controller=mpc", "checkpoint=run")
    for typo in ("graph.strid=3", "planner.stesp=8"):
        assert "to add a new key" not in refused("wm-eval", *args, typo, cwd=tmp_path)
    free = ("+task_options.goal_mode=other_arm", "task_options.goal_mod=x")
    line = refused("wm-eval", *args, *free, cwd=tmp_path)
    assert line == "error: task_options.goal_mod is not in the config; add it with +task_options.goal_mod=x"


def test_a_text_option_that_looks_like_a_number_is_the_text_typed(tmp_path):
    """Hydra reads store=1.10 as the number 1.1: the store was made at 1.1 (and 1e3 at 1000.0); a token
    123_456_789 became 123456789, which a client given the same token did not match."""
    import dataclasses

    from tools._config import build, typed_as

    @dataclasses.dataclass(frozen=True)
    class Options:
        store: str = "x"
        token: str | None = None
        steps: int = 1

    with typed_as(["store=1.10", "+token=123_456_789", "steps=2_000"]):
        got = build(Options, {"store": 1.1, "token": 123456789, "steps": 2000})
    assert (got.store, got.token, got.steps) == ("1.10", "123_456_789", 2000)
    with typed_as(["store=${oc.env:N}"]):  # an interpolation that resolved to a number: its value
        assert build(Options, {"store": 7}).store == "7"
    with typed_as(["token=NaN"]):
        assert build(Options, {"token": math.nan}).token == "NaN"
    res = run_app("wm-collect", "task=pointmaze", "episodes=1", "state_only=true", "store=1.10", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "1.10").is_dir() and not (tmp_path / "1.1").exists()


def test_a_path_from_home_is_refused_with_what_to_give_instead(tmp_path):
    """`~` reaches the apps unexpanded (from a Makefile, a subprocess's argument list, or quoted): Hydra's
    lexer error named nothing, and quoted for Hydra it made a folder named "~" in the working directory."""
    line = refused("wm-collect", "task=pointmaze", "episodes=1", "store=~/x.zarr", cwd=tmp_path)
    assert line == (
        "error: cannot parse override 'store=~/x.zarr': '~' is not expanded here; give store=$HOME/..."
    )
    for app, option in (("wm-collect", "store"), ("wm-train", "out")):
        line = refused(app, "task=pointmaze", "store=s.zarr", f"{option}='~/x'", cwd=tmp_path)
        assert line == (
            f"error: {option}=~/x: '~' is not expanded here; give the path from $HOME (a shell expands "
            f"{option}=$HOME/...) or an absolute path"
        )


@pytest.mark.parametrize("app", ["wm-serve", "wm-deploy"])
def test_a_token_is_never_printed_not_even_when_it_cannot_be_parsed(tmp_path, app):
    """Generated secrets hold characters Hydra's grammar refuses: its error quoted the override."""
    line = refused(app, "controller=random", "token=S3cr3t,Tok3n!", cwd=tmp_path)
    assert line.startswith("error: cannot parse override 'token=***'") and "S3cr3t" not in line
    # given as a list or mapping, the type error printed it; beside a misspelt option, the one line
    # was a traceback (exit 1: a UsageError where text was expected)
    needed = ["robot=pointmaze", "out=run", "server=127.0.0.1:5555"] if app == "wm-deploy" else []
    for given in ("token=[s3cr3tAAAA]", "token={k: s3cr3tAAAA}"):
        line = refused(app, "controller=random", *needed, given, cwd=tmp_path)
        assert line.startswith("error: token must be a string or null, got a ") and "s3cr3t" not in line
    line = refused(app, "controller=random", *needed, "token=s3cr3tAAAA", "prot=5556", cwd=tmp_path)
    assert line.startswith("error: unknown option prot") and "s3cr3t" not in line


def test_an_allocation_that_fails_is_one_line_not_a_bug(capsys):
    """planner.samples=1e11 (16 TB of candidates) ended in torch's 50-line allocator traceback, exit 1
    "a bug": the sizes asked for do not fit the machine."""
    import torch

    from tools._cli import _guarded

    code, line = _guarded(lambda: torch.empty(2**50), "")
    assert code == 2 and line.startswith("error: out of memory (")
    assert line.endswith("): ask for smaller sizes")
    assert "can't allocate memory" in line and "Traceback" not in capsys.readouterr().err


def test_a_sigterm_that_lands_in_a_weakref_callback_still_interrupts():
    """Python runs a signal handler wherever the main thread is: SIGTERM during a weakref callback (zarr's
    WeakSet) raised its KeyboardInterrupt there, where Python prints "Exception ignored" and goes on, so
    `wm-info drop_episodes=` finished its rewrite and exited 0. It is delivered again outside it."""
    import signal
    import time
    import weakref

    from tools._cli import sigterm_interrupts

    class Thing:
        pass

    def callback(ref: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs here, inside the callback

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as e, sigterm_interrupts():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # the callback runs now
        time.sleep(5)  # the work goes on, blocked in a wait: the interrupt ends it (a flag alone did not)
    assert e.value.signum == signal.SIGTERM and ref() is None
    assert time.monotonic() - began < 2.5
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # (put back)


def test_a_sigterm_that_lands_in_a_foreign_call_still_interrupts():
    """SIGTERM to wm-collect landed where ctypes converted an EGL call's arguments (pointmaze's renderer):
    ctypes turned its KeyboardInterrupt into `ArgumentError("argument 1: KeyboardInterrupt: ")`, which
    the app reported as a bug (exit 1 and a traceback, not 143), and which a robot read retried (the
    interrupt lost). Any other ArgumentError is still what it was."""
    import ctypes
    import signal

    from interrupts import interrupted_foreign_call

    from robots.runtime.loop import retried
    from tools._cli import _guarded, sigterm_interrupts

    with sigterm_interrupts():
        with pytest.raises(KeyboardInterrupt) as e:
            _guarded(interrupted_foreign_call(signal.SIGTERM), "")
        assert e.value.signum == signal.SIGTERM
        tries = []
        with pytest.raises(KeyboardInterrupt) as e:
            retried(lambda: tries.append(1) or interrupted_foreign_call(signal.SIGTERM)(), 3)
        assert e.value.signum == signal.SIGTERM and len(tries) == 1  # (not retried)
    with pytest.raises(KeyboardInterrupt) as e:  # Ctrl-C under Python's own handler: 130
        _guarded(interrupted_foreign_call(signal.SIGINT), "")
    assert getattr(e.value, "signum", signal.SIGINT) == signal.SIGINT
    call = ctypes.CDLL(None).abs
    call.argtypes = [ctypes.c_int]
    code, line = _guarded(lambda: call("three"), "")
    assert code == 1 and line.startswith("error: ArgumentError: argument 1: TypeError")


@pytest.mark.parametrize("name", ["wm-info", "wm-train"])
def test_ctrl_c_while_an_app_loads_is_an_interrupt_not_a_traceback(name, tmp_path):
    """Ctrl-C in the first second or two of a command (torch, mujoco and Hydra loading) printed the
    traceback of whichever import it landed in and exited 1."""
    import signal
    import time

    from apps import BIN

    proc = subprocess.Popen(
        [str(BIN / name), "--help"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.3)  # the interpreter is up (its SIGINT handler set); the app's modules are loading
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted\n", err
    assert "Traceback" not in err and out == ""


def test_ctrl_c_goes_through_the_same_handler_unless_it_is_ignored():
    import signal

    from tools._cli import interrupt, sigterm_interrupts

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as a process starts)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGINT) is interrupt is signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_traceback_flag_and_bugs(tmp_path):
    res = cli("wm-eval", "planner=nonexistent", "out=e", cwd=tmp_path, env={"WM_TRACEBACK": "1"})
    assert res.returncode == 2 and "Traceback (most recent call last)" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("error: planner=nonexistent")
    # A bug in an app (here one whose body divides by zero) keeps its traceback and exits 1.
    code = "from tools._cli import app; app('eval', lambda cfg: 1 / 0)()"
    res = subprocess.run(
        [sys.executable, "-c", code, "out=e"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert res.returncode == 1 and "ZeroDivisionError" in res.stderr and "Traceback" in res.stderr


# ---------------------------------------------------------------------- 5. --help explains each option
def test_help_explains_each_option(tmp_path):
    res = cli("wm-eval", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    explained, shown = {}, set()
    for line in res.stdout.splitlines():
        first = line.split()[0] if line.strip() else ""
        if line.startswith("  ") and ("=" in first or first.endswith(":")):
            option = first.partition("=")[0].removesuffix(":")
            shown.add(option)
            explained[option] = line.strip()[len(first) :].strip()
    options = OmegaConf.load(Path(configs.__file__).parent / "eval.yaml")
    for option in [k for k in options if k not in ("defaults", "hydra")] + ["planner"]:
        assert explained.get(option), f"{option} is not explained in --help:\n{res.stdout}"
    # every option of a block and of the chosen planner on a line of its own, with its value
    for option in ("graph.stride", "policy.sampler_steps", "planner.samples", "planner_budget.seconds"):
        assert option in shown and explained[option], f"{option} is not listed in --help:\n{res.stdout}"
    assert "  planner.samples=64 " in res.stdout
    assert "WM_TRACEBACK=1" in res.stdout and "e.g. -m seed=0,1;" in res.stdout
    # an app without a seed gave the same example, which it refused (and left a sweep folder behind)
    assert "e.g. -m OPTION=A,B;" in cli("wm-info", "--help", cwd=tmp_path).stdout
    # a comment continued on the lines below its option is all of its explanation (the other choices
    # of model.latent.source were left out)
    from tools._help import option_comments

    source = option_comments("model/uwm")["latent.source"]
    assert source.startswith("auto: the store's default autoencoder")
    assert source.endswith("| encoder (+model.latent.name=..., +model.latent.path=...)")


def test_no_run_writes_inside_a_store(tmp_path, small_store):
    """wm-train / wm-eval / wm-deploy out= a store, or wm-convert dst= inside its own source, wrote
    checkpoints, results or a dataset into the store; `wm-info drop_episodes` then rewrote the store and
    deleted them without a word. Refused before any work; a rewrite refuses a store holding others' files."""
    from wm.data import DemoStore
    from wm.data.ops import delete_episodes

    path, _ = small_store
    store = path.name
    line = refused("wm-eval", f"out={store}", *QUICK_EVAL, cwd=tmp_path)
    assert line == (
        f"error: out={store}: {path} is a demonstration store; give a folder (new, or an earlier run's) "
        "outside it"
    )
    line = refused("wm-deploy", "robot=pointmaze", "controller=random", f"out={store}/run", cwd=tmp_path)
    assert line.startswith(f"error: out={store}/run: {path} is a demonstration store;")
    line = refused("wm-convert", f"src={store}", f"dst={store}/lerobot", cwd=tmp_path)
    assert line.startswith(f"error: dst={store}/lerobot: {path} is a demonstration store;")
    (path / "best.pt").write_bytes(b"a checkpoint")  # put there by hand, or by an older version
    with pytest.raises(ValueError, match=r"holds files that are not the store's \(best.pt\); the rewrite"):
        delete_episodes(path, [0])
    assert (path / "best.pt").read_bytes() == b"a checkpoint" and DemoStore.open(path).n_episodes == 5


def test_every_option_of_every_config_file_has_its_line():
    """`--help` prints the comment beside each option in its YAML file: 173 options (trainer.*, every
    model's and planner's, wm-deploy's and wm-serve's policy.*, wm-demo's) printed a value and nothing
    on what it does, where the README promises one line each."""
    import yaml

    from tools._help import option_comments

    def leaves(d: dict, pre: str = ""):
        for k, v in d.items():
            if k not in ("hydra", "defaults"):
                yield from leaves(v, f"{pre}{k}.") if isinstance(v, dict) and v else [f"{pre}{k}"]

    root = Path(configs.__file__).parent
    missing = {}
    for path in sorted(root.rglob("*.yaml")):
        name = str(path.relative_to(root).with_suffix(""))
        comments = option_comments(name)
        gaps = [o for o in leaves(yaml.safe_load(path.read_text()) or {}) if not comments.get(o)]
        if gaps:
            missing[name] = gaps
    assert not missing, f"options without a comment on their line: {missing}"


# ---------------------------------------------------------------------- 6. outputs say where they went
def test_collect_says_where_it_wrote(tmp_path):
    res = cli("wm-collect", "task=pointmaze", "store=s.zarr", "episodes=1", "state_only=true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "saved 1 episodes" in res.stdout and "to store s.zarr (now 1 episodes)" in res.stdout


def test_wm_demo_gives_mpc_options_to_the_mpc_evaluation_alone():
    """eval.planner_budget / objective / budgets reached the random baseline too, which refuses them."""
    from tools.demo import DemoConfig, steps
    from wm.encoders import EncoderWeightsError

    demo = OmegaConf.load(Path(configs.__file__).parent / "demo.yaml")
    model = OmegaConf.load(Path(configs.__file__).parent / "model" / "dino_wm.yaml")
    fields = {k: OmegaConf.to_container(demo[k]) if k in ("collect", "trainer", "eval") else demo[k]
              for k in ("out", "task", "seed", "collect", "trainer", "eval")}  # fmt: skip
    fields["eval"] |= {"planner_budget": {"iterations": 3}, "objective": "last_frame", "budgets": [2, 4]}
    plan = steps(DemoConfig(**fields, model=OmegaConf.to_container(model)))
    assert plan.mpc.planner_budget.iterations == 3 and plan.mpc.budgets == [2, 4]
    assert plan.random.controller == "random" and plan.random.budgets == []
    # pointmaze's goals in another arm are the demo's, not every task's: task=arm_push was refused
    # ("unknown option task_options.goal_mode", an option the user never gave)
    assert plan.mpc.task_options == plan.random.task_options == {"goal_mode": "other_arm"}
    plan = steps(DemoConfig(**{**fields, "task": "arm_push"}, model=OmegaConf.to_container(model)))
    assert plan.mpc.task_options == plan.random.task_options == {}
    # an encoder's missing weights file was refused after the 200 demonstrations were recorded
    missing = OmegaConf.to_container(model) | {"encoder": {"name": "resnet18", "weights": "nofile.pth"}}
    with pytest.raises(EncoderWeightsError, match="resnet18: weights file nofile.pth does not exist"):
        steps(DemoConfig(**fields, model=missing))


@pytest.mark.parametrize(
    "option, said",
    [
        ("model.predictor_dim=abc", "model.predictor_dim='abc' is not a whole number"),
        ("model.frameskip=0", "model: n_hist and frameskip must be >= 1, got 1, 0"),
        ("model.recon_channels=32", "model.recon_channels=32 is not a list of whole numbers"),
    ],
)
def test_wm_demo_checks_the_models_options_before_collecting(tmp_path, option, said):
    """They were checked as training began: after 200 episodes (20 s, 100 MB) were collected, and a
    single number for a list was a traceback then."""
    assert refused("wm-demo", f"out={tmp_path / 'd'}", option, cwd=tmp_path) == f"error: {said}"


def test_wm_demo_refuses_a_top_up_under_a_trained_world_model_before_the_store_grows(tmp_path):
    """A rerun with more collect.episodes topped the store up, then the trainer refused to resume on
    the grown store, and every rerun after it too: the store had changed for good."""
    from tools._cli import UsageError
    from tools.demo import _check_top_up

    run = tmp_path / "world_model"
    _check_top_up(4, 5, run, "demos.zarr")  # nothing trained yet: top up and train
    run.mkdir()
    (run / "ckpt_00000005.pt").write_bytes(b"")
    _check_top_up(5, 5, run, "demos.zarr")  # a rerun as before: training resumes
    _check_top_up(0, 5, run, "demos.zarr")  # (a store deleted: collected afresh, the trainer says the rest)
    said = (
        f"{run} holds a world model trained on the 4 episodes of demos.zarr; collect.episodes=5 would add 1 "
        f"it cannot resume on: delete {run} to retrain"
    )
    with pytest.raises(UsageError, match=f"^{re.escape(said)}"):
        _check_top_up(4, 5, run, "demos.zarr")


def test_eval_refused_during_the_run_leaves_no_folder_it_made(tmp_path):
    """What can refuse only once the episodes run (a checkpoint meeting another task's observations)
    removes the output folders the command made, if still empty; never one that was there before."""
    from tools.eval import _output_folder

    for out, existed in ((tmp_path / "new" / "out", False), (tmp_path / "old", True)):
        if existed:
            out.mkdir()
        with pytest.raises(ValueError, match="another task"), _output_folder(out):
            assert out.is_dir()
            raise ValueError("an observation from another task")
        assert out.exists() == existed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # new/ (a parent it made) too is gone
    with pytest.raises(ValueError), _output_folder(tmp_path / "kept"):
        (tmp_path / "kept" / "videos").mkdir()  # something written: kept
        raise ValueError
    assert (tmp_path / "kept" / "videos").is_dir()


def test_eval_rerun_replaces_its_own_outputs_only(tmp_path):
    """A rerun into the same out= leaves none of the old run's videos or budget plot beside the new
    ones (results.json names this run's videos, and out/videos holds those); nothing else is touched."""
    out = tmp_path / "e"
    (out / "videos").mkdir(parents=True)
    stale = [out / "videos" / "episode_1000_success.mp4", out / "videos" / "episode_1003_failure.mp4",
             out / "success_vs_budget.png"]  # fmt: skip
    mine = [out / "videos" / "notes.txt", out / "videos" / "episode_1000.mp4", out / "notes.txt"]
    for path in stale + mine:
        path.write_text("an earlier run's")
    res = cli("wm-eval", f"out={out}", *QUICK_EVAL, "episodes=1", "videos=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["parallel"] == 1  # recorded: a model can round differently at another batch size
    assert results["videos"] == ["videos/episode_1000_failure.mp4"]  # 3 steps: the goal is out of reach
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(
        ["episode_1000_failure.mp4", "notes.txt", "episode_1000.mp4"]
    )
    assert not any(p.exists() for p in stale) and all(p.read_text() == "an earlier run's" for p in mine)


def test_wm_demo_closing_lines_follow_the_evaluation():
    """The goals as eval.task_options set them (default included), the videos only when some were."""
    from tools.demo import _goal_mode, closing_lines
    from tools.eval import EvalConfig

    def eval_cfg(**task_options):
        return EvalConfig(out="e", controller="random", task_options=task_options)

    assert _goal_mode(eval_cfg()) == "any" and _goal_mode(eval_cfg(goal_mode="other_arm")) == "other_arm"
    assert _goal_mode(EvalConfig(out="e", controller="random", task="arm_push")) is None
    results = {"success_rate": 0.5, "random_success_rate": 0.0, "episodes": 2, "goal_mode": "any",
               "videos": None, "report": "d/eval_mpc/report.html", "seconds": {"total_s": 60.0}}  # fmt: skip
    lines = closing_lines(results, "pointmaze", Path("d/results.json"))
    assert lines[0] == "MPC success 50% vs random actions 0% on 2 pointmaze episodes" + (
        " with goals in any other cell of the maze"
    )
    assert not any("videos" in line for line in lines)
    lines = closing_lines(results | {"goal_mode": "other_arm", "videos": "d/eval_mpc/videos"}, "pointmaze",
                          Path("d/results.json"))  # fmt: skip
    assert lines[0].endswith("with goals in another arm of the maze")
    assert "videos (camera | world-model prediction | goal): d/eval_mpc/videos" in lines
    lines = closing_lines(results | {"goal_mode": None}, "arm_push", Path("d/results.json"))
    assert lines[0].endswith("on 2 arm_push episodes")
