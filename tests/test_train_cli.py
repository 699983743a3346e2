"""What `wm-train` tells its user, end to end through the console script on a tiny synthetic store:
where the outputs go, the warm-up cap, the best checkpoint, Ctrl-C and resuming, and reusing an out=
folder for another architecture."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from apps import TINY_WM

from wm.checkpoint import BEST_NAME, latest_checkpoint, list_checkpoints, load_checkpoint
from wm.data import DemoStore, KeySpec, Schema
from wm.registry import load_model

WM_TRAIN = str(Path(sys.executable).parent / "wm-train")
TRAIN_WM = ["model=dino_wm", *TINY_WM, "trainer.batch_size=8", "trainer.log_every=2"]


def wm_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([WM_TRAIN, *TRAIN_WM, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """6 episodes of 40 steps: 32x32 camera, 4-d proprioception, 2-d actions (random content)."""
    path = tmp_path_factory.mktemp("train_cli") / "tiny.zarr"
    schema = Schema(
        keys={
            "img": KeySpec((32, 32, 3), "uint8", "image"),
            "state": KeySpec((4,), "float32", "proprio"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=10,
    )
    demo = DemoStore.create(path, schema)
    rng = np.random.default_rng(0)
    for _ in range(6):
        demo.append_episode(
            {
                "img": rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
                "state": rng.normal(size=(40, 4)).astype(np.float32),
                "action": rng.normal(size=(40, 2)).astype(np.float32),
            }
        )
    demo.close()
    return path


@pytest.fixture(scope="module")
def run(store, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 20-step run validated every 5 steps, with configs/train.yaml's warm-up of 200 steps."""
    out = tmp_path_factory.mktemp("train_cli_run") / "run"
    res = wm_train(f"store={store}", f"out={out}", "trainer.steps=20", "trainer.val_every=5")
    assert res.returncode == 0, res.stderr
    return out, res


def test_run_says_where_outputs_go_and_keeps_the_best(run):
    out, res = run
    assert f"run directory: {out}" in res.stdout
    assert f"tensorboard --logdir {out / 'tb'}" in res.stdout and list((out / "tb").glob("events.*"))
    assert (
        "warm-up: 2 steps, not warmup_steps=200: capped at warmup_max_fraction=0.1 of steps=20" in res.stderr
    )
    config = json.loads((out / "config.json").read_text())
    assert config["warmup_steps_used"] == 2 and config["trainer"]["best_metric"] == "auto"
    best = config["best"]
    assert best["metric"] == "val_one_step_mse" and best["step"] in (5, 10, 15, 20)
    assert re.search(rf"step {best['step']}: val_one_step_mse=\S+, val_3_step_mse=\S+  -> best", res.stderr)
    assert f"last checkpoint: {out / 'ckpt_00000020.pt'} (wm-eval checkpoint={out} loads it)" in res.stdout
    assert f"best checkpoint: {out / BEST_NAME} (val_one_step_mse=" in res.stdout
    assert f"at step {best['step']}; use it: wm-eval checkpoint={out / BEST_NAME})" in res.stdout
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 20  # the JSON summary stays last
    # wm-eval checkpoint=DIR loads the latest; checkpoint=DIR/best.pt the best, as a whole model
    assert load_model(str(out)).checkpoint["step"] == 20
    loaded = load_model(str(out / BEST_NAME))
    assert loaded.checkpoint["step"] == best["step"] and loaded.model_type == "dino_wm"
    assert loaded.checkpoint["best"]["value"] == pytest.approx(best["value"])


def test_reusing_out_for_another_architecture_is_one_line(run, store, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    res = wm_train(f"store={store}", f"out={out}", "trainer.steps=22", "model.predictor_dim=64")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} already holds ckpt_00000020.pt (step 20)")
    assert "of another architecture (" in lines[0] and "shape mismatches:" in lines[0]
    assert "model_config differs in predictor_dim (checkpoint 32, this run 64)" in lines[0]
    assert lines[0].endswith(f"choose another out= or delete {out} to start over")
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000020.pt"]  # untouched

    # A model_config that differs where the weights still fit: one printed line, then it resumes.
    res = wm_train(f"store={store}", f"out={out}", "trainer.steps=22", "model.cost_proprio_weight=2.0")
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "note: resuming" in line]
    assert len(notes) == 2 and "cost_proprio_weight (checkpoint 1.0, this run 2.0)" in notes[0]
    assert "learning-rate schedule, steps=22 (was 20)" in notes[1]  # trainer.steps=22 as well
    assert f"resumed from step 20 ({out / 'ckpt_00000020.pt'})" in res.stderr
    assert latest_checkpoint(out).name == "ckpt_00000022.pt"

    # Another split of the episodes would put validation episodes into training: refused.
    res = wm_train(f"store={store}", f"out={out}", "trainer.steps=24", "val_ratio=0.3")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "trained on other data (val_ratio 0.1 -> 0.3)" in lines[0]
    assert latest_checkpoint(out).name == "ckpt_00000022.pt"


def test_resumes_from_a_moved_store_and_with_the_default_keys_spelled_out(run, store, tmp_path):
    """The same data at another path, and `image_key=` / `proprio_key=` naming the keys the first run
    used by default, resume; the checkpoints after it record the new path."""
    out, moved = tmp_path / "run", tmp_path / "elsewhere" / "tiny.zarr"
    shutil.copytree(run[0], out)
    shutil.copytree(store, moved)
    res = wm_train(f"store={moved}", f"out={out}", "trainer.steps=22", "image_key=img", "proprio_key=state")
    assert res.returncode == 0, res.stderr
    assert f"resumed from step 20 ({out / 'ckpt_00000020.pt'})" in res.stderr
    run_config = load_checkpoint(latest_checkpoint(out))["extra"]["run_config"]
    assert run_config["store"] == str(moved.resolve()) and run_config["image_key"] == "img"


def test_what_a_resume_must_keep_is_compared_as_the_runs_used_it():
    from tools.train import data_changes

    defaults = {"image_key": "rgb", "proprio_key": "qpos"}
    then = {"store": "/a/s.zarr", "store_fingerprint": "f", "image_key": None, "proprio_key": None, "seed": 0}
    assert data_changes(then, then | {"image_key": "rgb", "proprio_key": "qpos"}, defaults) == []
    assert data_changes(then, then | {"store": "/b/s.zarr"}, defaults) == []  # moved, same content
    assert data_changes(then, then | {"image_key": "wrist"}, defaults) == ["image_key 'rgb' -> 'wrist'"]
    assert data_changes(then | {"proprio_key": "ee"}, then, defaults) == ["proprio_key 'ee' -> 'qpos'"]
    assert data_changes(then, then | {"store_fingerprint": "g"}, defaults) == ["store_fingerprint 'f' -> 'g'"]
    old = {"store": "/a/s.zarr", "seed": 0}  # a checkpoint with no fingerprint: its path stands for it
    assert data_changes(old, then | {"store": "/b/s.zarr"}, defaults) == ["store '/a/s.zarr' -> '/b/s.zarr'"]
    taught = then | {"teacher_checkpoint": "/gone/t/ckpt_00000002.pt"}
    assert data_changes(taught, taught, defaults) == []
    untaught = then | {"teacher_checkpoint": None}
    assert data_changes(untaught, untaught, defaults) == []
    videos = then | {"video_store": "/a/v.zarr", "video_ratio": 0.5}  # a UWM's action-free videos
    assert data_changes(videos, then | {"video_store": None, "video_ratio": None}, defaults) == [
        "video_store '/a/v.zarr' -> None",
        "video_ratio 0.5 -> None",
    ]
    assert data_changes(videos, videos | {"video_ratio": 0.25}, defaults) == ["video_ratio 0.5 -> 0.25"]
    # runs before 2026-12-04 recorded the default share without a video store: the same data (they never
    # resumed, and video_ratio=0.5 without video_store= is refused: no way to say it)
    older = then | {"video_store": None, "video_ratio": 0.5}
    assert data_changes(older, then | {"video_store": None, "video_ratio": None}, defaults) == []
    assert data_changes(taught, then | {"teacher_checkpoint": "/gone/t/ckpt_00000004.pt"}, defaults) == [
        "the student learns from /gone/t/ckpt_00000002.pt: that file is gone"
    ]


def test_a_uwm_resumes_only_on_the_autoencoder_file_its_latents_come_from(tmp_path):
    """`+model.latent.path=DIR` is the autoencoder run's latest checkpoint. A UWM resumed after that run
    had trained on went on with latents cached from the newer codec while its own weights held the old
    one, without a word; it is refused now, naming the file to give."""
    from tools.train import data_changes, latent_checkpoint

    run = tmp_path / "ae"
    run.mkdir()
    first = run / "ckpt_00000002.pt"
    first.write_bytes(b"")
    config = {"latent": {"source": "autoencoder", "path": str(run)}}
    assert latent_checkpoint(config) == str(first)
    assert latent_checkpoint({"latent": {"source": "sd_vae", "path": str(run)}}) is None
    assert latent_checkpoint({"latent": {"source": "autoencoder", "path": str(first)}}) == str(first)
    then = {"store": "/a/s.zarr", "seed": 0, "latent_checkpoint": str(first)}
    (run / "ckpt_00000004.pt").write_bytes(b"")  # the autoencoder run trains on
    now = then | {"latent_checkpoint": latent_checkpoint(config)}
    assert data_changes(then, now, {}) == [
        f"the model's latents come from {first}: give +model.latent.path= that file to resume"
    ]
    assert data_changes(then, then, {}) == []
    first.unlink()
    assert data_changes(then, now, {}) == [f"the model's latents come from {first}: that file is gone"]


def test_another_store_with_the_same_fingerprint_is_not_taken_for_a_moved_one(store, tmp_path):
    """The fingerprint does not read the data: a store of the same schema, lengths and info shares it.
    While the recorded store is still there, a store elsewhere resumes only as a copy of it."""
    from tools.train import TrainAppConfig, check_task, data_changes

    copy, other = tmp_path / "copy.zarr", tmp_path / "other.zarr"
    shutil.copytree(store, copy)
    with DemoStore.open(store) as s:
        demo = DemoStore.create(other, s.schema)
        for ep in range(s.n_episodes):
            data = s.get_episode(ep)
            demo.append_episode({**data, "action": data["action"] + 1.0}, s.episode_info(ep))
        fingerprint = s.fingerprint
    demo.close()
    with DemoStore.open(other) as o:
        assert o.fingerprint == fingerprint
    then = {"store": str(store), "store_fingerprint": fingerprint}
    defaults = {"image_key": "img", "proprio_key": "state"}
    assert data_changes(then, then | {"store": str(copy)}, defaults) == []
    (change,) = data_changes(then, then | {"store": str(other)}, defaults)  # values cut at 60 characters
    assert change.startswith(f"store '{str(store)[:40]}")

    # Once the recorded store is gone, any store of that fingerprint passed for it moved: the first and
    # last rows of its non-image keys, recorded too, tell the copy from the other
    def facts(path: Path) -> dict:
        model = {"type": "dino_wm"}
        cfg = TrainAppConfig(store=str(path), out=str(tmp_path / "run"), model=model, trainer={})
        return check_task(cfg)[0]

    recorded = shutil.copytree(store, tmp_path / "recorded.zarr")
    then = facts(recorded)
    shutil.rmtree(recorded)
    assert data_changes(then, facts(copy), defaults) == []
    (change,) = data_changes(then, facts(other), defaults)
    assert change.startswith("store_edges '")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_says_how_to_resume_and_exits_128_plus_the_signal(store, tmp_path, signum):
    out = tmp_path / "run"
    args = [
        WM_TRAIN,
        *TRAIN_WM,
        f"store={store}",
        f"out={out}",
        "trainer.steps=100000",
        "trainer.val_every=0",
    ]
    # SIGINT may be ignored in a background job's children: give wm-train Python's default.
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while max(map(int, re.findall(r"(\d+)/100000", "".join(err))), default=0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            time.sleep(0.2)
        proc.send_signal(signum)  # SIGTERM: what SLURM sends before it preempts a job
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    stderr = "".join(err)
    assert proc.returncode == 128 + signum, stderr
    assert "TensorBoard logs" in proc.stdout.read()
    step = load_checkpoint(out)["step"]
    assert step >= 3 and [p.name for p in list_checkpoints(out)] == [f"ckpt_{step:08d}.pt"]
    assert f"interrupted at step {step}: saved {out / f'ckpt_{step:08d}.pt'}" in stderr
    resume_line = next(line for line in stderr.splitlines() if line.startswith("to resume"))
    assert resume_line.startswith(
        f"to resume from step {step}, run the same command from {Path.cwd()}: wm-train "
    )
    assert f"out={out}" in resume_line and "trainer.steps=100000" in resume_line

    res = wm_train(f"store={store}", f"out={out}", f"trainer.steps={step + 2}", "trainer.val_every=0")
    assert res.returncode == 0, res.stderr
    assert f"resumed from step {step} ({out / f'ckpt_{step:08d}.pt'})" in res.stderr
    assert load_checkpoint(out)["step"] == step + 2


def test_a_checkpoint_from_another_robot_or_rate_is_said():
    from tools._controller import trained_elsewhere

    run = {"store": "/d/lift.zarr", "store_robot": "robosuite/Lift", "store_fps": 10}
    assert (
        trained_elsewhere(run, "robosuite/Lift", 10.0) == [] and trained_elsewhere({}, "pointmaze", 20) == []
    )
    assert trained_elsewhere(run, "robosuite/Stack", 20.0, "give policy_hz={fps}") == [
        "the checkpoint was trained on robosuite/Lift data (/d/lift.zarr); this runs robosuite/Stack",
        "the checkpoint was trained on data at 10 Hz, and its actions run at 20 Hz here: each was meant for "
        "0.1 s; give policy_hz=10",
    ]


def test_the_summary_line_keeps_small_metrics():
    from tools.train import summary_line

    line = json.loads(
        summary_line("run", {"val/val_action_mse": 2.377123e-07, "loss": 0.29171234, "step": 20.0})
    )
    assert line == {"out": "run", "val/val_action_mse": 2.377123e-07, "loss": 0.2917123, "step": 20.0}


def test_a_student_resumes_only_on_the_teacher_file_it_learns_from(store, tmp_path):
    """teacher=DIR is the teacher run's latest checkpoint. A student resumed after the teacher run had
    trained on switched to the newer teacher mid-distillation (said in a note, as another model_config
    whose weights fit); it is refused now, naming the file to give."""
    from apps import TINY_POLICY

    def train(*args: str) -> subprocess.CompletedProcess:
        settings = ["trainer.batch_size=4", "trainer.val_every=0", "trainer.ckpt_every=0"]
        return subprocess.run([WM_TRAIN, f"store={store}", *settings, *args], capture_output=True, text=True)

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    first = teacher / "ckpt_00000002.pt"
    taught = ["model=diffusion_unet", *TINY_POLICY, "model.unet.down_dims=[16,32]", f"out={teacher}"]
    assert train(*taught).returncode == 0
    distill = ["model=consistency", f"out={student}", "trainer.steps=2"]
    assert train(*distill, f"teacher={teacher}", "trainer.steps=1").returncode == 0
    assert train(*taught, "trainer.steps=4").returncode == 0  # the teacher run trains on
    res = train(*distill, f"teacher={teacher}")
    assert res.returncode == 2, res.stderr
    assert f"trained on other data (the student learns from {first}: give teacher= that file to resume)" in (
        res.stderr
    )
    res = train(*distill, f"teacher={first}")
    assert res.returncode == 0 and "resumed from step 1" in res.stderr, res.stderr
    assert load_checkpoint(student)["extra"]["run_config"]["teacher_checkpoint"] == str(first)
