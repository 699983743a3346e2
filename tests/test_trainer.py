"""The one trainer and its checkpoints, on a tiny regression model over a real store."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import flip_bit_in_zip_entry
from torch import nn

from wm.checkpoint import (
    BEST_NAME,
    CheckpointError,
    CheckpointNotFoundError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    save_checkpoint,
    state_dict_diff,
)
from wm.data import DemoStore, KeySpec, Schema
from wm.data.dataset import WindowDataset
from wm.data.normalize import Normalizer
from wm.data.windows import WindowSpec
from wm.locks import BusyError
from wm.resume import changed_entries
from wm.trainer import (
    Trainer,
    TrainerConfig,
    TrainingInterrupted,
    default_param_groups,
    ema_decay_at,
    ema_update,
    lr_factor,
    pick_device,
)

W = np.array([[1.0, -2.0, 0.5, 0.0], [0.3, 0.0, -1.0, 2.0]], dtype=np.float32)  # y = W x
SPEC = WindowSpec({"x": (0,), "y": (0,)})
MODEL_CONFIG = {"d_in": 4, "d_out": 2, "hidden": 32}


class TinyRegressor(nn.Module):
    """MLP regressing y from x. Batch keys: "x" (B, 1, 4), "y" (B, 1, 2)."""

    def __init__(self, d_in: int = 4, d_out: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pred = self(batch["x"][:, 0])  # (B, 2)
        loss = F.mse_loss(pred, batch["y"][:, 0])
        return loss, {"abs_err": (pred - batch["y"][:, 0]).abs().mean().detach()}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """4 episodes of 64 steps with y = W x."""
    path = tmp_path_factory.mktemp("store") / "lin.zarr"
    schema = Schema(keys={"x": KeySpec((4,), "float32", "proprio"), "y": KeySpec((2,), "float32", "action")})
    store = DemoStore.create(path, schema)
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.normal(size=(64, 4)).astype(np.float32)
        store.append_episode({"x": x, "y": x @ W.T})
    store.close()
    return path


@pytest.fixture(scope="module")
def dataset(store_path):
    return WindowDataset(store_path, SPEC)


def cfg(**kw) -> TrainerConfig:
    base = dict(
        steps=60,
        batch_size=32,
        lr=1e-2,
        warmup_steps=5,
        ema_decay=0.9,
        log_every=10,
        val_every=0,
        ckpt_every=0,
        device="cpu",
    )
    return TrainerConfig(**(base | kw))


def make_trainer(dataset, out_dir, seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(seed)
    opts = {k: kw.pop(k) for k in ("normalizer", "val_fn", "extra_state", "same_on_resume") if k in kw}
    model = TinyRegressor(**MODEL_CONFIG)
    return Trainer(model, dataset, cfg(**kw), out_dir, model_type="tiny", model_config=MODEL_CONFIG, **opts)


class EpochRecording(WindowDataset):
    """A training set that draws its own windows (as `MixedWindows` does) and records its epochs."""

    epochs: list[int]

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_the_training_set_is_told_each_epoch(store_path, tmp_path):
    """`MixedWindows` seeds each batch with its epoch; nothing told it the epoch."""
    data = EpochRecording(store_path, SPEC)
    data.epochs = []
    make_trainer(data, tmp_path, steps=20).fit()  # 256 windows, 8 batches of 32 an epoch
    assert data.epochs == [0] * 8 + [1] * 8 + [2] * 4  # (with each batch)


def full_loss(model: nn.Module, dataset: WindowDataset) -> float:
    batch = dataset.get_batch(range(len(dataset)))
    with torch.no_grad():
        return float(model.compute_loss(batch)[0])


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory, store_path):
    """One 60-step run shared by the tests that only inspect its outputs."""
    out = tmp_path_factory.mktemp("run")
    with DemoStore.open(store_path) as store:
        normalizer = Normalizer.fit(store, {"x": "meanstd", "y": "minmax"})
    vals = []
    trainer = make_trainer(
        dataset,
        out,
        val_every=30,
        ckpt_every=30,
        normalizer=normalizer,
        val_fn=lambda m, step, d: vals.append(step) or {"loss": full_loss(m, dataset)},
        extra_state={"run_config": {"store": str(store_path)}, "note": "hello"},
    )
    torch.manual_seed(0)
    initial = full_loss(TinyRegressor(**MODEL_CONFIG), dataset)  # the same init as the trainer's model
    result = trainer.fit()
    return trainer, out, initial, result, vals, normalizer


# ---------------------------------------------------------------------------------------------- config
def test_config_validation_and_device():
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp16")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainerConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="device"):
        TrainerConfig(device="gpu0")
    assert TrainerConfig(betas=[0.9, 0.95]).betas == (0.9, 0.95)
    # of the wrong kind: steps=10.5 ran 11 steps, ckpt_every=0.5 saved every step, "false" was true
    for name, value, said in [
        ("steps", 10.5, "a whole number"),
        ("ckpt_every", 0.5, "a whole number"),
        ("steps", "10", "a whole number"),
        ("ema_warmup", "false", "true or false"),
    ]:
        with pytest.raises(ValueError, match=f"^trainer.{name}={value!r} is not {said}$"):
            TrainerConfig(**{name: value})
    assert TrainerConfig(lr=1, grad_clip=0, seed=np.int64(3)).seed == 3  # an int for a float, numpy ints
    # values that ended in a traceback (AdamW's float32 overflow, torch's "Overflow when unpacking long
    # long", autocast on "meta"), or spawned loader processes until memory ran out
    for options, said in [
        ({"lr": 1e300}, "lr must be > 0 and at most 1e6"),
        ({"seed": 10**20}, r"seed must be in 0..2\*\*63 - 1"),
        ({"seed": -1}, r"seed must be in 0..2\*\*63 - 1"),
        ({"num_workers": 10**20}, r"num_workers must be in 0..256"),
        ({"device": "meta"}, "device 'meta' is not 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ]:
        with pytest.raises(ValueError, match=f"^TrainerConfig: {said}"):
            TrainerConfig(**options)
    for name in ("mps", "xla"):
        with pytest.raises(ValueError, match=f"^device '{name}' is not 'auto', 'cpu', 'cuda' or 'cuda:N'$"):
            pick_device(name)  # wm-eval's device= (a traceback from the first copy)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda:1")


def test_lr_schedule_warmup_cosine():
    c = TrainerConfig(steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.01)
    assert lr_factor(49, c) == pytest.approx(0.5)
    assert lr_factor(99, c) == pytest.approx(1.0)
    assert lr_factor(100, c) == pytest.approx(1.0)
    assert lr_factor(550, c) == pytest.approx(0.55)  # cosine midpoint: halfway between 1 and 0.1
    assert lr_factor(1000, c) == pytest.approx(0.1)
    values = [lr_factor(s, c) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_factor(0, TrainerConfig(steps=10, warmup_steps=0)) == 1.0


def test_warmup_is_capped_at_a_fraction_of_a_short_run(dataset, tmp_path, capsys):
    short = TrainerConfig(steps=300, warmup_steps=200)  # configs/train.yaml's warm-up, a short run
    assert short.warmup_max_fraction == 0.1 and short.warmup_steps_used == 30
    assert lr_factor(14, short) == pytest.approx(0.5) and lr_factor(29, short) == pytest.approx(1.0)
    assert lr_factor(299, short) < 0.01  # the cosine spans the 270 steps after the warm-up
    assert TrainerConfig(steps=3000, warmup_steps=200).warmup_steps_used == 200  # a long run: as set
    assert TrainerConfig(steps=300, warmup_steps=200, warmup_max_fraction=1).warmup_steps_used == 200
    # 0.29 * 100 is 28.999999999999996 in floating point: the cap was 28, and said so
    assert TrainerConfig(steps=100, warmup_steps=50, warmup_max_fraction=0.29).warmup_steps_used == 29
    with pytest.raises(ValueError, match="warmup_max_fraction"):
        TrainerConfig(warmup_max_fraction=1.5)
    make_trainer(dataset, tmp_path / "capped", steps=20, warmup_steps=5).fit()  # 5 > 10 % of 20
    said = capsys.readouterr().err
    assert "warm-up: 2 steps, not warmup_steps=5" in said and "warmup_max_fraction=1 keeps 5" in said
    assert json.loads((tmp_path / "capped" / "config.json").read_text())["warmup_steps_used"] == 2
    make_trainer(dataset, tmp_path / "as_set", steps=20, warmup_steps=2).fit()
    assert "warm-up" not in capsys.readouterr().err


def test_param_groups_skip_decay_on_bias_norm_embedding():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    model[1].bias.requires_grad_(False)
    decay, no_decay = default_param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(8, 8)] and decay["params"][0] is model[1].weight
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].weight),
        id(model[2].weight),
        id(model[2].bias),
    }


def test_positional_and_camera_embeddings_and_register_tokens_take_no_decay():
    """They were decayed (free-standing 3-d parameters): AdamW pulled the transformer's and UWM's positions
    toward zero every step; only layers' weight matrices decay (conv and attention ones too)."""
    from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser
    from wm.uwm_net import DiTConfig, UWMNet

    def decayed(model):
        names = {id(p): n for n, p in model.named_parameters()}
        return {
            names[id(p)] for g in default_param_groups(model, 0.05) if g["weight_decay"] for p in g["params"]
        }

    t = TransformerDenoiser(
        TransformerConfig(dim=16, depth=1, heads=2), action_dim=2, cond_dim=4, horizon=8, n_obs=2
    )
    u = UWMNet(
        DiTConfig(dim=16, depth=1, heads=2, obs_tokens=True), action_dim=2, horizon=8, latent_shape=(4, 4, 4),
        n_future=1, n_obs=1, proprio_dim=3, n_views=2,
    )  # fmt: skip
    for model, free in (
        (t, {"action_pos", "cond_pos"}),
        (u, {"action_pos", "frame_pos", "obs_pos", "camera_emb", "registers"}),
    ):
        names = decayed(model)
        assert free <= {n for n, _ in model.named_parameters()} and not free & names
        assert names and all(n.endswith("weight") for n in names)
    attn = nn.MultiheadAttention(8, 2)
    conv = nn.Conv2d(3, 4, 3)
    assert decayed(nn.ModuleList([attn, conv])) == {"0.in_proj_weight", "0.out_proj.weight", "1.weight"}


def test_an_optimizer_saved_in_the_earlier_decay_groups_resumes_with_its_moments():
    """A run checkpointed when positions still decayed had its moments in other groups: load_state_dict
    refused them (the run could not resume); they are moved onto this run's groups, each to its parameter."""
    from wm.optim import earlier_param_groups
    from wm.resume import regrouped

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_parameter("pos", nn.Parameter(torch.randn(1, 3, 4)))
    before = torch.optim.AdamW([{"params": ps} for ps in earlier_param_groups(model)])
    (model(torch.randn(2, 4)).sum() + model.pos.square().sum()).backward()
    before.step()
    saved = copy.deepcopy(before.state_dict())
    now = torch.optim.AdamW(default_param_groups(model, 0.05))
    with pytest.raises(ValueError, match="size"):
        now.load_state_dict(saved)
    now.load_state_dict(regrouped(saved, now, model))
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(now.state[p][name], before.state[p][name])
    assert [g["weight_decay"] for g in now.param_groups] == [0.05, 0.0]
    own = now.state_dict()
    assert regrouped(own, now, model) is own  # this rule's groups: as they are
    saved["param_groups"][0]["params"].pop()  # neither rule's groups: left to load_state_dict to refuse
    assert regrouped(saved, now, model) is saved


class Positioned(TinyRegressor):
    """TinyRegressor with a free-standing positional parameter added to its output."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.pos = nn.Parameter(torch.zeros(1, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.pos[0]


def test_a_run_checkpointed_under_the_earlier_decay_groups_resumes(dataset, tmp_path):
    from wm.optim import earlier_param_groups

    torch.manual_seed(0)
    model = Positioned(**MODEL_CONFIG)
    groups = [
        {"params": ps, "weight_decay": wd}
        for ps, wd in zip(earlier_param_groups(model), (0.01, 0.0), strict=True)
    ]
    config = cfg(steps=3, ckpt_every=3)
    Trainer(
        model, dataset, config, tmp_path, model_type="tiny", model_config=MODEL_CONFIG, param_groups=groups
    ).fit()
    saved = load_checkpoint(tmp_path)["optimizer"]
    pos_index = saved["param_groups"][0]["params"][0]  # (decayed then; a module's own parameters come first)
    torch.manual_seed(0)
    again = Trainer(
        Positioned(**MODEL_CONFIG),
        dataset,
        cfg(steps=6, ckpt_every=3),
        tmp_path,
        model_type="tiny",
        model_config=MODEL_CONFIG,
    )
    assert again.resume() and again.step == 3
    assert torch.equal(
        again.optimizer.state[again.model.pos]["exp_avg"], saved["state"][pos_index]["exp_avg"]
    )
    again.fit()
    assert again.step == 6


def test_ema_update_math():
    c = TrainerConfig(ema_decay=0.999)
    assert ema_decay_at(0, c) == pytest.approx(0.1) and ema_decay_at(10**6, c) == 0.999
    assert ema_decay_at(0, TrainerConfig(ema_decay=0.99, ema_warmup=False)) == 0.99
    model = nn.Linear(3, 2)
    ema = nn.Linear(3, 2).requires_grad_(False)
    before = ema.weight.clone()
    ema_update(ema, model, 0.75)
    torch.testing.assert_close(ema.weight, 0.75 * before + 0.25 * model.weight.detach())


# ---------------------------------------------------------------------------------------------- training
def test_training_lowers_loss_and_logs(trained):
    trainer, out, initial, result, vals, _ = trained
    final = full_loss(trainer.model, trainer.loader.dataset.dataset)
    assert final < 0.1 * initial, (initial, final)
    assert result["step"] == 60 and trainer.step == 60
    assert result["loss"] < 0.2 * initial and math.isfinite(result["grad_norm"])
    assert {"abs_err", "lr", "samples_per_s", "val/loss"} <= set(result)
    assert vals == [30, 60]  # val_fn ran at val_every and at the end
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tiny" and config["model_config"] == MODEL_CONFIG
    assert config["trainer"]["steps"] == 60 and config["run_config"]["store"].endswith("lin.zarr")
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000030.pt", "ckpt_00000060.pt"]


def test_ema_differs_from_and_tracks_the_weights(trained, dataset):
    trainer, _, initial, *_ = trained
    raw, ema = trainer.model.state_dict(), trainer.ema_model.state_dict()
    assert trainer.ema_model is not trainer.model
    assert not torch.equal(raw["net.0.weight"], ema["net.0.weight"])
    assert full_loss(trainer.ema_model, dataset) < 0.2 * initial  # it followed the training
    assert not any(p.requires_grad for p in trainer.ema_model.parameters())


def test_checkpoint_round_trip_reproduces_predictions(trained, dataset):
    trainer, out, _, _, _, normalizer = trained
    ckpt = load_checkpoint(out, expected_type="tiny")
    assert ckpt["path"].endswith("ckpt_00000060.pt") and ckpt["step"] == 60 and ckpt["format"] == 1
    assert ckpt["extra"]["note"] == "hello" and ckpt["trainer_config"]["lr"] == 1e-2
    x = dataset.get_batch(range(50))["x"][:, 0]
    for use_ema, reference in ((False, trainer.model), (True, trainer.ema_model)):
        model = load_model_weights(TinyRegressor(**ckpt["model_config"]), ckpt, use_ema=use_ema).eval()
        with torch.no_grad():
            assert torch.equal(model(x), reference.eval()(x))
    trainer.model.train()
    restored = Normalizer.from_dict(ckpt["normalizer"])
    assert torch.equal(restored.normalize("x", x), normalizer.normalize("x", x))


def test_a_second_training_into_the_same_folder_is_refused_while_one_runs(dataset, tmp_path):
    """Two runs into one out= both finished and said so, each having pruned and replaced the other's
    checkpoints: the folder held one run's weights beside the other's claims."""
    out = tmp_path / "run"
    out.mkdir()
    script = f"import fcntl, os, sys; fcntl.flock(os.open({str(out)!r}, os.O_RDONLY), fcntl.LOCK_EX); "
    script += "print('holding', flush=True); sys.stdin.read()"
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    other = subprocess.Popen([sys.executable, "-c", script], **pipes)
    try:
        assert other.stdout.readline().strip() == "holding"  # another training holds the folder
        busy = f"{out}: another training is writing its checkpoints into this folder"
        with pytest.raises(BusyError, match=re.escape(busy)):
            make_trainer(dataset, out, steps=4, ckpt_every=2).fit()
        assert list_checkpoints(out) == []
    finally:
        other.communicate("")
    make_trainer(dataset, out, steps=4, ckpt_every=2).fit()  # once it has ended
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]


@pytest.mark.parametrize("batch_size", [16, 4])
def test_a_resume_with_another_batch_size_goes_on_after_the_windows_taken(
    dataset, tmp_path, capsys, batch_size
):
    """The data position was counted in batches: a larger batch size called the checkpoint damaged
    ("choose another out= or delete ... to start over"), a smaller one skipped windows never taken."""
    first = make_trainer(dataset, tmp_path, steps=3, ckpt_every=3, batch_size=8)
    assert len(first.loader) > 3  # the checkpoint is in its first epoch, 3 batches (24 windows) in
    first.fit()
    second = make_trainer(dataset, tmp_path, steps=6, ckpt_every=3, batch_size=batch_size)
    assert second.resume() and second.step == 3
    assert second._skip == 24 // batch_size
    said = capsys.readouterr().err
    assert f"note: the checkpoint took batches of 8, this run takes {batch_size}: its epoch goes on" in said
    second.fit()
    assert second.step == 6


def test_a_resume_on_another_number_of_processes_begins_a_new_epoch(dataset, tmp_path, capsys):
    """The data position counts each process's batches in its own shard's order: resumed on another
    number of processes it was read as this run's (a damaged checkpoint when past this run's epoch
    length, else other windows skipped than the ones taken)."""
    make_trainer(dataset, tmp_path, steps=3, ckpt_every=3, batch_size=8).fit()
    path = tmp_path / "ckpt_00000003.pt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["data_position"]["world_size"] == 1
    ckpt["data_position"].update(world_size=2, batches=40)  # (an epoch of 256 windows is 32 batches here)
    torch.save(ckpt, path)
    second = make_trainer(dataset, tmp_path, steps=6, ckpt_every=3, batch_size=8)
    assert second.resume() and second.step == 3 and second._skip == 0 and second.epoch == ckpt["epoch"] + 1
    said = capsys.readouterr().err
    assert (
        f"note: the checkpoint was trained on 2 process(es), this run on 1: its epoch {ckpt['epoch']}" in said
    )
    second.fit()
    assert second.step == 6


def test_a_resume_with_another_trainer_seed_is_refused(dataset, tmp_path):
    """It was ignored (the checkpoint's random state goes on), while config.json recorded the new seed."""
    make_trainer(dataset, tmp_path, steps=2, ckpt_every=2).fit()
    with pytest.raises(CheckpointError, match=r"trained with trainer.seed=0, this run has trainer.seed=5: a"):
        model, config = TinyRegressor(**MODEL_CONFIG), cfg(steps=4, seed=5)
        Trainer(model, dataset, config, tmp_path, model_type="tiny", model_config=MODEL_CONFIG).fit()
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["seed"] == 0


def test_resume_continues_from_the_saved_step(dataset, tmp_path):
    first = make_trainer(dataset, tmp_path, steps=40, ckpt_every=20, keep_last=3)
    first.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000020.pt", "ckpt_00000040.pt"]
    (tmp_path / "ckpt_00000040.pt").unlink()  # as if the run died between 20 and 40
    mid = load_checkpoint(tmp_path)
    vals = []
    second = make_trainer(
        dataset,
        tmp_path,
        seed=123,
        steps=40,
        ckpt_every=20,
        keep_last=3,
        val_every=10,
        val_fn=lambda m, step, d: vals.append(step) or {},
    )
    assert second.resume() and second.step == 20
    assert torch.equal(second.model.net[0].weight, mid["state_dict"]["net.0.weight"].to(second.device))
    assert second.scheduler.last_epoch == 20 and second.optimizer.state_dict()["state"][0]["step"] == 20
    third = make_trainer(  # a fresh process: fit() resumes on its own
        dataset,
        tmp_path,
        seed=123,
        steps=40,
        ckpt_every=20,
        keep_last=3,
        val_every=10,
        val_fn=lambda m, step, d: vals.append(step) or {},
    )
    result = third.fit()
    assert vals == [30, 40] and result["step"] == 40 and third.step == 40
    assert load_checkpoint(tmp_path)["step"] == 40
    # It continued the mid-run weights (seed 123 would have given other initial weights), so it ends
    # better than the checkpoint it resumed from and close to the uninterrupted run.
    resumed_from = full_loss(load_model_weights(TinyRegressor(), mid, use_ema=False), dataset)
    final = full_loss(third.model, dataset)
    assert final < 0.6 * resumed_from and final < 1.5 * full_loss(first.model, dataset)
    # Already at cfg.steps: fit() trains nothing more and keeps the weights.
    weights = third.model.net[0].weight.clone()
    assert make_trainer(dataset, tmp_path, steps=40).fit()["step"] == 40
    assert torch.equal(load_checkpoint(tmp_path)["state_dict"]["net.0.weight"], weights)


def test_ema_disabled_means_ema_model_is_the_model(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path, steps=3, ema_decay=0.0, grad_clip=0.0)
    assert trainer.fit()["step"] == 3 and trainer.ema_model is trainer.model
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["ema_state_dict"] is None and ckpt["normalizer"] is None
    load_model_weights(TinyRegressor(), ckpt, use_ema=True)  # falls back to the raw weights


def test_bf16_autocast_on_cpu(dataset, tmp_path):
    def linear_output_dtypes(trainer: Trainer) -> list[torch.dtype]:
        seen: list[torch.dtype] = []
        trainer.model.net[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        trainer.fit()
        return seen

    fp32 = make_trainer(dataset, tmp_path / "fp32", steps=2)
    assert linear_output_dtypes(fp32) == [torch.float32] * 2
    bf16 = make_trainer(dataset, tmp_path / "bf16", steps=3, precision="bf16", compile=True)
    assert linear_output_dtypes(bf16) == [torch.bfloat16] * 3  # every step's forward ran under autocast
    assert bf16.model.net[0].weight.dtype == torch.float32  # on fp32 weights
    assert bf16.step == 3 and math.isfinite(full_loss(bf16.model, dataset))


def test_a_diverging_run_saves_no_non_finite_weights_and_says_so_in_one_line(dataset, tmp_path):
    """The finite-loss check ran on logging steps only: a checkpoint step in between saved NaN weights
    and pruned the good one, a rerun resumed them; the error was a FloatingPointError traceback."""
    from wm.trainer import TrainingDiverged

    trainer = make_trainer(dataset, tmp_path, steps=40, log_every=20, ckpt_every=5, keep_last=2)
    step = trainer.train_step

    def poisoned(batch):  # from step 12 on the gradients are NaN, so the weights become NaN
        if trainer.step >= 11:
            batch = {**batch, "y": torch.full_like(batch["y"], float("nan"))}
        return step(batch)

    trainer.train_step = poisoned
    with pytest.raises(TrainingDiverged, match="at step 12: training diverged; the step was not taken"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000005.pt", "ckpt_00000010.pt"]
    assert isinstance(TrainingDiverged("x"), ValueError)  # the apps' one line, not "a bug"
    assert trainer.step == 11 and all(bool(torch.isfinite(p).all()) for p in trainer.ema_model.parameters())
    with pytest.raises(TrainingDiverged, match="not finite at step 11: training diverged and was not saved"):
        with torch.no_grad():
            trainer.model.net[0].weight.fill_(float("nan"))  # NaN from elsewhere: save() still refuses it
        trainer.save()


@pytest.mark.parametrize("poison", ["nan_target", "nan_constant"])
def test_a_non_finite_step_stops_at_that_step_and_keeps_best_pt(dataset, tmp_path, poison):
    """The loss was checked on logging steps only: a NaN at step 12 ran on to step 20, and a validation
    in between (step 15, a metric that stays finite) saved the NaN weights as best.pt over the good one
    of step 10. With finite gradients (a NaN term no weight feeds) the error named step 20, not 12."""
    from wm.trainer import TrainingDiverged

    vals = {5: {"loss": 3.0}, 10: {"loss": 2.0}, 15: {"loss": 1.0}}
    trainer = make_trainer(dataset, tmp_path, steps=40, log_every=20, val_every=5, val_fn=scripted_val(vals))
    step = trainer.train_step
    nan = torch.tensor(float("nan"))

    def poisoned(batch):
        if trainer.step >= 11 and poison == "nan_target":  # NaN gradients from step 12 on
            batch = {**batch, "y": torch.full_like(batch["y"], float("nan"))}
        return step(batch)

    def compute_loss(batch):
        loss, metrics = TinyRegressor.compute_loss(trainer.model, batch)
        return (loss + nan if trainer.step >= 11 else loss), metrics  # NaN loss, finite gradients

    trainer.train_step = poisoned
    if poison == "nan_constant":
        trainer.model.compute_loss = compute_loss
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("the loss is nan and the gradient norm ")
    assert "at step 12: training diverged; the step was not taken and nothing was saved" in str(info.value)
    best = load_checkpoint(tmp_path / BEST_NAME)
    assert best["best"] == {"metric": "loss", "value": 2.0, "step": 10}
    load_model_weights(TinyRegressor(**MODEL_CONFIG), best)  # finite (it refuses NaN weights)
    assert trainer.step == 11 and all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_a_bad_frame_met_by_a_loader_worker_is_its_own_one_line_error(store_path, tmp_path):
    """A NaN frame the up-front sample missed (in_memory=false) is refused when a batch reads it; read by a
    DataLoader worker, the refusal came back as torch's "Caught SchemaError in DataLoader worker process
    0. Original Traceback ..." (the worker's traceback, printed by wm-train as one long line)."""
    from wm.data import SchemaError

    path = tmp_path / "frames.zarr"
    keys = {"img": KeySpec((4, 4, 3), "float32", "image"), "x": KeySpec((4,), "float32", "proprio"),
            "y": KeySpec((2,), "float32", "action")}  # fmt: skip
    rng = np.random.default_rng(0)
    with DemoStore.create(path, Schema(keys=keys)) as store:
        for e in range(2):
            img = rng.integers(0, 256, (64, 4, 4, 3)).astype(np.float32)
            if e == 1:
                img[40, 0, 0, 0] = np.nan  # step 104: not one of the 8 frames sampled at init
            x = rng.normal(size=(64, 4)).astype(np.float32)
            store.append_episode({"img": img, "x": x, "y": x @ W.T})
    frames = WindowDataset(path, WindowSpec({"img": (0,), "x": (0,), "y": (0,)}), in_memory=False)
    message = (
        f"{path}: image key 'img' (float32) holds non-finite values (NaN or inf) in episode 1, step 40; they "
        f"would train as black pixels: repair or drop that episode (wm-info store={path} 'drop_episodes=[1]')"
    )
    for workers in (0, 2):
        trainer = make_trainer(frames, tmp_path / f"run{workers}", num_workers=workers)
        with pytest.raises(SchemaError) as caught:
            trainer.fit()
        assert str(caught.value) == message


class FrameRecording(TinyRegressor):
    """TinyRegressor that records the frames of each batch it is given."""

    def __init__(self) -> None:
        super().__init__(**MODEL_CONFIG)
        self.frames: list[torch.Tensor] = []

    def compute_loss(self, batch):
        self.frames.append(batch["img"].clone())
        return super().compute_loss(batch)


def test_raw_uint8_frames_reach_the_model_as_the_float_frames_they_stand_for(tmp_path):
    """A dataset of image_dtype="uint8" (documented: the trainer converts the batch on its device) failed
    its first step: the model was handed 0..255 bytes ("'img' must be float images in [0, 1]")."""
    path = tmp_path / "frames.zarr"
    keys = {"img": KeySpec((4, 4, 3), "uint8", "image"), "x": KeySpec((4,), "float32", "proprio"),
            "y": KeySpec((2,), "float32", "action")}  # fmt: skip
    rng = np.random.default_rng(0)
    with DemoStore.create(path, Schema(keys=keys)) as store:
        x = rng.normal(size=(64, 4)).astype(np.float32)
        img = rng.integers(0, 256, (64, 4, 4, 3), dtype=np.uint8)
        store.append_episode({"img": img, "x": x, "y": x @ W.T})
    spec, seen = WindowSpec({"img": (0,), "x": (0,), "y": (0,)}), {}
    for dtype in ("float32", "uint8"):
        torch.manual_seed(0)
        model = FrameRecording()
        config = cfg(steps=2, batch_size=8)
        data = WindowDataset(path, spec, image_dtype=dtype)
        Trainer(model, data, config, tmp_path / dtype, model_type="tiny", model_config=MODEL_CONFIG).fit()
        seen[dtype] = torch.cat(model.frames)
    assert seen["uint8"].dtype == torch.float32
    torch.testing.assert_close(seen["uint8"], seen["float32"], rtol=0, atol=1e-7)


def test_too_small_dataset_fails_clearly(dataset, tmp_path):
    with pytest.raises(ValueError, match="no full batch"):
        make_trainer(dataset, tmp_path, batch_size=10_000)


# ---------------------------------------------------------------------------------------------- best, Ctrl-C
def scripted_val(values: dict[int, dict[str, float]], seen: list[int] | None = None):
    """A val_fn reporting the given metrics at each step (so the best step is known)."""
    return lambda model, step, out_dir: (seen.append(step) if seen is not None else None) or values[step]


def test_the_logged_training_speed_leaves_out_validation_and_checkpoints(dataset, tmp_path, monkeypatch):
    """A logging window's timer started at the log step, before that step's checkpoint and validation:
    the next window's samples_per_s counted them (a tenth of the speed after every validation)."""
    speeds: dict[int, float] = {}
    log = Trainer._log

    def recorded(self, window, writer, pbar):
        means = log(self, window, writer, pbar)
        speeds[self.step] = means["samples_per_s"]
        return means

    def slow_val(model, step, out_dir):
        time.sleep(1.0)
        return {"loss": 1.0}

    monkeypatch.setattr(Trainer, "_log", recorded)
    make_trainer(dataset, tmp_path, steps=20, log_every=5, val_every=10, ckpt_every=10, val_fn=slow_val).fit()
    assert speeds[15] > speeds[5] / 5, speeds  # steps 11-15, after step 10's checkpoint and validation


def test_best_checkpoint_keeps_the_lowest_validation_and_resume_takes_the_latest(dataset, tmp_path, capsys):
    vals = {10: {"loss": 3.0}, 20: {"loss": 1.0}, 30: {"loss": 2.0}, 40: {"loss": 5.0}, 50: {"loss": 0.5}}
    kw = dict(steps=30, val_every=10, ckpt_every=10, keep_last=5, val_fn=scripted_val(vals))
    make_trainer(dataset, tmp_path, **kw).fit()
    assert "step 20: loss=1  -> best loss so far, saved best.pt" in capsys.readouterr().err
    best = load_checkpoint(tmp_path / BEST_NAME, expected_type="tiny")
    at_20 = load_checkpoint(tmp_path / "ckpt_00000020.pt")
    assert best["step"] == 20 and best["best"] == {"metric": "loss", "value": 1.0, "step": 20}
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(best[key][k], at_20[key][k]) for k in best[key])
    assert "optimizer" not in best  # for evaluation; resuming uses ckpt_*.pt
    assert json.loads((tmp_path / "config.json").read_text())["best"]["step"] == 20
    # best.pt is not a ckpt_*.pt: the latest checkpoint, what wm-eval checkpoint=DIR loads, is step 30
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "ckpt_00000030.pt"
    assert latest_checkpoint(tmp_path).name == "ckpt_00000030.pt" and load_checkpoint(tmp_path)["step"] == 30
    only_best = tmp_path / "only_best"
    only_best.mkdir()
    (only_best / BEST_NAME).write_bytes((tmp_path / BEST_NAME).read_bytes())
    assert list_checkpoints(only_best) == [] and latest_checkpoint(only_best) is None

    resumed = make_trainer(dataset, tmp_path, **(kw | {"steps": 50}))
    assert resumed.resume() and resumed.step == 30  # from the latest, not the best
    assert resumed.best == {"metric": "loss", "value": 1.0, "step": 20}
    make_trainer(dataset, tmp_path, **(kw | {"steps": 50})).fit()  # 5.0 at 40 is no better; 0.5 at 50 is
    assert load_checkpoint(tmp_path / BEST_NAME)["best"] == {"metric": "loss", "value": 0.5, "step": 50}

    # A run killed after its best.pt but before its first checkpoint, run again: it starts over, and
    # its first validation (worse) replaced the better best.pt
    capsys.readouterr()
    worse = {10: {"loss": 2.0}, 20: {"loss": 0.7}}
    kw = dict(steps=20, val_every=10, ckpt_every=10, val_fn=scripted_val(worse))
    make_trainer(dataset, only_best, **kw).fit()
    said = capsys.readouterr().err
    assert f"note: {only_best} holds best.pt (loss 1 at step 20) and no checkpoint to resume from" in said
    assert "step 10: loss=2\n" in said and "step 20: loss=0.7  -> best loss so far" in said
    assert load_checkpoint(only_best / BEST_NAME)["best"] == {"metric": "loss", "value": 0.7, "step": 20}


def test_best_metric_choice(dataset, tmp_path):
    two = {5: {"a": 1.0, "b": 2.0}, 10: {"a": 2.0, "b": 1.0}}
    make_trainer(dataset, tmp_path / "auto", steps=10, val_every=5, val_fn=scripted_val(two)).fit()
    assert load_checkpoint(tmp_path / "auto" / BEST_NAME)["best"]["step"] == 5  # "auto": the first, "a"
    named = make_trainer(
        dataset, tmp_path / "b", steps=10, val_every=5, val_fn=scripted_val(two), best_metric="b"
    )
    named.fit()
    assert named.best == {"metric": "b", "value": 1.0, "step": 10}
    make_trainer(
        dataset, tmp_path / "off", steps=10, val_every=5, val_fn=scripted_val(two), best_metric=None
    ).fit()
    assert not (tmp_path / "off" / BEST_NAME).exists()
    typo = make_trainer(
        dataset,
        tmp_path / "typo",
        steps=10,
        val_every=5,
        val_fn=scripted_val(two),
        best_metric="c",
        ckpt_every=5,
    )
    with pytest.raises(
        ValueError, match=r"best_metric='c' is not a validation metric of this model \(a, b\)"
    ):
        typo.fit()
    assert latest_checkpoint(tmp_path / "typo").name == "ckpt_00000005.pt"  # saved before validating
    late = make_trainer(
        dataset,
        tmp_path / "late",
        steps=10,
        val_every=3,
        val_fn=scripted_val({3: two[5]}),
        best_metric="c",
        ckpt_every=5,
    )
    with pytest.raises(ValueError, match="step 3 is saved"):  # validation before any checkpoint: kept
        late.fit()
    assert latest_checkpoint(tmp_path / "late").name == "ckpt_00000003.pt"


class SignalingRegressor(TinyRegressor):
    """Sends itself `signum` (`times` of them) inside the forward of its `at`-th training step."""

    def __init__(self, at: int, times: int, signum: int = signal.SIGINT) -> None:
        super().__init__(**MODEL_CONFIG)
        self.calls, self.at, self.times, self.signum = 0, at, times, signum

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.signum)
        return super().compute_loss(batch)


def test_sigterm_finishes_the_step_and_saves_it(dataset, tmp_path, capfd):
    """What a cluster's scheduler sends before it preempts a job: the run stops as on Ctrl-C, saved."""
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(
        SignalingRegressor(at=5, times=1, signum=signal.SIGTERM),
        dataset,
        cfg(steps=100),
        tmp_path,
        model_type="tiny",
        model_config=MODEL_CONFIG,
    )
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.step == 5 and info.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path)["step"] == 5
    assert "SIGTERM: stopping after this step to save a checkpoint" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_asked_during_the_last_step_finishes_the_run(dataset, tmp_path, capfd):
    """SIGTERM in the last step (or during its validation) turned a finished, saved run into an
    interruption: exit 130, 'resume from step N' and no summary."""
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(SignalingRegressor(at=20, times=1, signum=signal.SIGTERM), dataset, cfg(steps=20),
                      tmp_path, model_type="tiny", model_config=MODEL_CONFIG)  # fmt: skip
    assert trainer.fit()["step"] == 20 and load_checkpoint(tmp_path)["step"] == 20
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_finishes_the_step_saves_it_and_a_second_one_quits(dataset, tmp_path, capsys):
    # Python's own Ctrl-C handler, even when pytest runs as a background job (which inherits an ignored
    # SIGINT, and the trainer leaves an ignored SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_once_then_twice(dataset, tmp_path, capsys)
    finally:
        signal.signal(signal.SIGINT, inherited)


def _ctrl_c_once_then_twice(dataset, tmp_path, capsys) -> None:
    before = signal.getsignal(signal.SIGINT)
    model = SignalingRegressor(at=7, times=1)
    trainer = Trainer(
        model, dataset, cfg(steps=100), tmp_path / "once", model_type="tiny", model_config=MODEL_CONFIG
    )
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.step == 7 and info.value.path == tmp_path / "once" / "ckpt_00000007.pt"
    ckpt = load_checkpoint(tmp_path / "once")
    assert ckpt["step"] == 7 and ckpt["scheduler"]["last_epoch"] == 7  # the signalled step was completed
    assert ckpt["optimizer"]["state"][0]["step"] == 7
    assert "interrupted at step 7: saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back

    model = SignalingRegressor(at=7, times=2)
    trainer = Trainer(
        model, dataset, cfg(steps=100), tmp_path / "twice", model_type="tiny", model_config=MODEL_CONFIG
    )
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert not isinstance(info.value, TrainingInterrupted) and latest_checkpoint(tmp_path / "twice") is None
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------------------------- errors
def test_resuming_another_model_is_one_clear_error(dataset, tmp_path, capsys):
    make_trainer(dataset, tmp_path, steps=4).fit()
    capsys.readouterr()

    def resume(model_type: str, **config) -> Trainer:
        model_config = MODEL_CONFIG | config
        model = TinyRegressor(**{k: v for k, v in model_config.items() if k in MODEL_CONFIG})
        trainer = Trainer(
            model, dataset, cfg(steps=6), tmp_path, model_type=model_type, model_config=model_config
        )
        trainer.fit()
        return trainer

    with pytest.raises(CheckpointError) as info:
        resume("tiny", hidden=16)
    message = str(info.value)
    assert (
        "\n" not in message
        and f"{tmp_path} already holds ckpt_00000004.pt (step 4) of another architecture" in message
    )
    assert "net.0.weight (checkpoint (32, 4), model (16, 4))" in message
    assert "model_config differs in hidden (checkpoint 32, this run 16)" in message
    assert message.endswith(f"choose another out= or delete {tmp_path} to start over")
    with pytest.raises(
        CheckpointError, match="a 'tiny' model, but this run trains 'other': choose another out="
    ):
        resume("other")
    assert load_checkpoint(tmp_path)["step"] == 4  # nothing was overwritten
    # Another model_config whose weights fit: said in one line, and resumed.
    assert resume("tiny", note="x").step == 6
    said = capsys.readouterr().err
    assert "resumed from step 4 (" in said
    assert "note: resuming" in said and "another model_config (note (checkpoint unset, this run x))" in said


def _nan_weights(c):
    c["state_dict"]["net.0.weight"][0, 0] = math.inf


def _nan_moments(c):
    c["optimizer"]["state"][0]["exp_avg"][0, 0] = math.nan


def _moment_shape(c):
    c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


@pytest.mark.parametrize(
    "damage, said",
    [
        (_nan_weights, r"whose weights \(1 tensor\(s\), the first 'net.0.weight'\) hold NaN or inf: it"),
        (_nan_moments, r"whose optimizer state \(1 tensor\(s\), the first '0.exp_avg'\) hold NaN or inf"),
        (_moment_shape, r"does not fit .*\(exp_avg of shape \(3,\) for a parameter \(32, 4\)\)"),
        (lambda c: c.update(scheduler={}), r"its scheduler, step or random state is damaged \(KeyError: "),
        (lambda c: c.pop("rng"), r"its scheduler, step or random state is damaged \(KeyError: 'rng'\)"),
        (lambda c: c["data_position"].update(batches=99), r"damaged \(ValueError: data position of 99 batch"),
        (lambda c: c["data_position"].update(epoch_start=torch.zeros(3)), r"random state is damaged"),
    ],
)
def test_resuming_a_damaged_checkpoint_is_one_clear_error(dataset, tmp_path, damage, said):
    """NaN weights or moments resumed and trained on to "the loss is nan ...: lower trainer.lr" (the
    wrong advice); moments of another shape failed at the first step with a RuntimeError from AdamW; a
    damaged scheduler or missing random state was a bare KeyError. Nothing is written either way."""
    make_trainer(dataset, tmp_path, steps=4).fit()
    path = tmp_path / "ckpt_00000004.pt"
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=said) as info:
        make_trainer(dataset, tmp_path, steps=8).fit()
    assert "\n" not in str(info.value) and str(info.value).endswith(f"delete {tmp_path} to start over")
    assert [p.name for p in list_checkpoints(tmp_path)] == [path.name] and path.read_bytes() == before


def test_a_damaged_newest_checkpoint_names_the_one_to_resume_from(dataset, tmp_path):
    """wm-train resumes the newest checkpoint: a truncated or bit-flipped one said "load an earlier
    checkpoint of the run", which wm-train cannot be told to, and never named the one keep_last kept."""
    make_trainer(dataset, tmp_path, steps=6, ckpt_every=3).fit()
    newest = tmp_path / "ckpt_00000006.pt"
    good = newest.read_bytes()
    fall_back = "; delete ckpt_00000006.pt to resume from ckpt_00000003.pt, or choose another out="
    newest.write_bytes(good[: len(good) // 2])
    with pytest.raises(
        CheckpointError, match=r"ckpt_00000006.pt is not a readable checkpoint \(truncated: a "
    ):
        make_trainer(dataset, tmp_path, steps=8).fit()
    with pytest.raises(CheckpointError, match=re.escape(fall_back)):
        make_trainer(dataset, tmp_path, steps=8).fit()
    newest.write_bytes(good)
    flip_bit_in_zip_entry(newest, "data.pkl")
    with pytest.raises(CheckpointError, match=r"ckpt_00000006.pt is damaged: .*" + re.escape(fall_back)):
        make_trainer(dataset, tmp_path, steps=8).fit()
    newest.unlink()
    again = make_trainer(dataset, tmp_path, steps=8)
    assert again.resume() and again.step == 3


def test_resuming_takes_this_runs_optimizer_settings_and_says_so(dataset, tmp_path, capsys):
    """Loading a checkpoint's optimizer restores its lr, betas and weight decay; the run uses (and
    config.json records) this run's, as the run's settings say."""
    make_trainer(dataset, tmp_path, steps=10, lr=1e-2, weight_decay=0.01, warmup_steps=0).fit()
    capsys.readouterr()
    again = make_trainer(dataset, tmp_path, steps=12, lr=1e-4, weight_decay=0.5, betas=(0.8, 0.9))
    assert again.resume() and again.step == 10
    factor = lr_factor(10, again.cfg)
    for group in again.optimizer.param_groups:
        assert group["initial_lr"] == 1e-4 and group["lr"] == pytest.approx(1e-4 * factor)
        assert group["betas"] == (0.8, 0.9) and group["weight_decay"] in (0.5, 0.0)  # no-decay group: 0
    assert again.scheduler.base_lrs == [1e-4] * len(again.optimizer.param_groups)
    assert "note: resuming with this run's betas, lr, weight_decay" in capsys.readouterr().err
    again.fit()
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * lr_factor(12, again.cfg))
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["lr"] == 1e-4
    capsys.readouterr()
    same = make_trainer(dataset, tmp_path, steps=14, lr=1e-4, weight_decay=0.5, betas=(0.8, 0.9))
    assert same.resume() and same.step == 12
    assert "note: resuming with" not in capsys.readouterr().err  # unchanged settings: nothing to say


def test_a_checkpoint_of_a_run_without_the_fused_kernel_resumes_on_this_runs(dataset, tmp_path):
    """AdamW steps with torch's fused kernel on the CPU and CUDA. Loading an optimizer state restores
    the checkpoint's kernel flags: a checkpoint of a run that stepped without the fused kernel (on
    another device, or before wm-train used it on the CPU) went on without it, slower. The run resumes
    on its own kernel, its step counts where that kernel reads them, and ends as the unbroken run."""
    unbroken = make_trainer(dataset, tmp_path, steps=20, ckpt_every=10, keep_last=3)
    unbroken.fit()
    assert all(g["fused"] and not g["foreach"] for g in unbroken.optimizer.param_groups)
    (tmp_path / "ckpt_00000020.pt").unlink()  # as if the run died between 10 and 20
    path = tmp_path / "ckpt_00000010.pt"
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=True)
    for state in ckpt["optimizer"]["state"].values():
        state["step"] = state["step"].double()
    torch.save(ckpt, path)
    resumed = make_trainer(dataset, tmp_path, steps=20, ckpt_every=10, keep_last=3)
    assert resumed.resume() and resumed.step == 10
    assert all(g["fused"] and not g["foreach"] for g in resumed.optimizer.param_groups)
    steps = [s["step"] for s in resumed.optimizer.state.values()]
    assert steps and all(s.dtype == torch.float32 and s.device == resumed.device for s in steps)
    resumed.fit()
    for name, weight in unbroken.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name


def test_resuming_with_other_step_settings_says_so(dataset, tmp_path, capsys):
    """Another ema_decay, grad_clip, ema_warmup or precision on resume trained on without a word, and
    config.json then recorded only this run's (EMA turned off dropped the checkpoint's EMA weights)."""
    make_trainer(dataset, tmp_path, steps=4, ema_decay=0.9, grad_clip=1.0).fit()
    capsys.readouterr()
    again = make_trainer(dataset, tmp_path, steps=6, ema_decay=0.0, grad_clip=0.5)
    assert again.resume()
    assert (
        "note: resuming with this run's grad_clip=0.5 (was 1.0), ema_decay=0.0 (was 0.9): the checkpoint's "
        "EMA weights are dropped (later checkpoints hold the raw weights only)"
    ) in capsys.readouterr().err
    again.fit()
    capsys.readouterr()
    assert make_trainer(dataset, tmp_path, steps=8, ema_decay=0.0, grad_clip=0.5).resume()
    assert "note: resuming with" not in capsys.readouterr().err


def test_a_run_resumed_past_its_steps_trains_nothing_and_keeps_config_json(dataset, tmp_path, capsys):
    """Rerun with trainer.steps below the step reached, it exited 0 having trained nothing and rewrote
    config.json with its own settings (steps, lr), which the checkpoints were never trained under."""
    val = lambda m, s, o: {"loss": 1 / s}  # noqa: E731
    make_trainer(dataset, tmp_path, steps=10, lr=1e-2, val_every=5, val_fn=val).fit()
    before = json.loads((tmp_path / "config.json").read_text())
    capsys.readouterr()
    shorter = make_trainer(dataset, tmp_path, steps=4, lr=1e-4, val_fn=lambda m, s, o: {"loss": 0.01})
    shorter.fit()
    assert shorter.step == 10
    said = capsys.readouterr().err
    assert f"note: {tmp_path} holds step 10 and trainer.steps=4: nothing to train (give " in said
    after = json.loads((tmp_path / "config.json").read_text())
    assert after["trainer"] == before["trainer"] and after["trainer"]["steps"] == 10
    assert after["best"] == {"metric": "loss", "value": 0.01, "step": 10, "file": "best.pt"}  # validated


class NormalizedRegressor(TinyRegressor):
    """TinyRegressor holding its normalizer, as the project's models do."""

    def __init__(self, normalizer: Normalizer, **config) -> None:
        super().__init__(**config)
        self.normalizer = normalizer


def test_a_resumed_run_keeps_the_normalizer_rule_its_checkpoint_was_trained_with(
    dataset, store_path, tmp_path
):
    """The rule is not in the state dict: a run saved under rule 1 (before a hardly varying dimension
    was only centred) resumed under this version's fresh rule 2, rescaling such a dimension mid-run."""
    with DemoStore.open(store_path) as store:
        fitted = Normalizer.fit(store, {"x": "meanstd", "y": "minmax"})

    def trainer(normalizer: Normalizer, steps: int) -> Trainer:
        model = NormalizedRegressor(normalizer, **MODEL_CONFIG)
        return Trainer(model, dataset, cfg(steps=steps, ckpt_every=steps), tmp_path, model_type="tiny",
                       model_config=MODEL_CONFIG, normalizer=normalizer)  # fmt: skip

    old = Normalizer.from_dict({k: v for k, v in fitted.to_dict().items() if k != "rule"})  # rule 1
    trainer(old, 4).fit()
    fresh = Normalizer.from_dict(fitted.to_dict())
    resumed = trainer(fresh, 8)
    assert fresh.rule == 2 and resumed.resume()
    assert fresh.rule == 1 and resumed.model.normalizer.rule == 1 and resumed.ema_model.normalizer.rule == 1
    resumed.fit()
    assert load_checkpoint(latest_checkpoint(tmp_path))["normalizer"]["rule"] == 1


def test_resuming_under_another_schedule_says_where_the_learning_rate_goes(dataset, tmp_path, capsys):
    """A run extended from steps=10 to 20 continues at step 10 under the longer cosine: the learning
    rate goes from the end of the first schedule (0) back to its middle (0.5), and the run says so."""
    make_trainer(dataset, tmp_path, steps=10, warmup_steps=0).fit()
    capsys.readouterr()
    longer = make_trainer(dataset, tmp_path, steps=20, warmup_steps=0)
    assert longer.resume() and longer.step == 10
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    err = capsys.readouterr().err
    assert (
        "note: resuming at step 10 under this run's learning-rate schedule, steps=20 (was 10): the "
        "learning rate there is 0.5 x lr, where the checkpoint's schedule had 0 x lr"
    ) in err
    same = make_trainer(dataset, tmp_path, steps=10, warmup_steps=0)
    assert same.resume()
    assert "learning-rate schedule" not in capsys.readouterr().err  # the same schedule: nothing to say


def test_resuming_on_other_data_is_one_clear_error(dataset, tmp_path):
    """A run resumed after its store changed (episodes appended) or with another split would train on
    its own validation episodes: refused, naming what changed."""
    run = {"store": "/data/a.zarr", "store_fingerprint": "f1", "store_episodes": 50, "seed": 0}
    keys = partial(
        changed_entries, keys=("store", "store_fingerprint", "store_episodes", "seed", "video_store")
    )
    make_trainer(dataset, tmp_path, steps=4, extra_state={"run_config": run}, same_on_resume=keys).fit()
    grown = run | {"store_fingerprint": "f2", "store_episodes": 60}
    with pytest.raises(CheckpointError) as info:
        make_trainer(dataset, tmp_path, steps=6, extra_state={"run_config": grown}, same_on_resume=keys).fit()
    message = str(info.value)
    assert (
        "\n" not in message
        and "trained on other data (store_fingerprint 'f1' -> 'f2'; store_episodes 50" in message
    )
    assert "change what the run learns from mid-run" in message
    assert message.endswith(f"delete {tmp_path} to start over")
    with pytest.raises(CheckpointError, match="seed 0 -> 1"):
        make_trainer(
            dataset, tmp_path, steps=6, extra_state={"run_config": run | {"seed": 1}}, same_on_resume=keys
        ).resume()
    assert (
        make_trainer(dataset, tmp_path, steps=6, extra_state={"run_config": run}, same_on_resume=keys).fit()[
            "step"
        ]
        == 6
    )  # the same data resumes; a key the checkpoint never recorded (video_store) is not compared


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module: not loaded as weights
    for name in ("garbage.pt", "module.pt"):  # in our words: torch's advice (weights_only=False, which runs
        with pytest.raises(CheckpointError) as info:  # the file's code) and its colour codes are not ours
            load_checkpoint(tmp_path / name)
        assert str(info.value) == (
            f"{tmp_path / name} is not a readable checkpoint (not a weights file torch can load safely: "
            "truncated, damaged, or not a checkpoint)"
        )
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a wm checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    model = TinyRegressor()
    path = save_checkpoint(
        tmp_path / "ckpt_00000007.pt",
        model_type="diffusion_unet",
        model_config={},
        state_dict=model.state_dict(),
    )
    assert latest_checkpoint(tmp_path) == path
    with pytest.raises(CheckpointError, match="holds a 'diffusion_unet' model, expected 'dino_wm'"):
        load_checkpoint(tmp_path, expected_type="dino_wm")
    ckpt = load_checkpoint(path, expected_type="diffusion_unet")
    with pytest.raises(
        CheckpointError, match=r"shape mismatches: .*net\.0\.weight \(checkpoint \(32, 4\), model \(16, 4\)\)"
    ):
        load_model_weights(TinyRegressor(hidden=16), ckpt)
    with pytest.raises(CheckpointError, match=r"missing keys: extra\.bias, extra\.weight"):
        load_model_weights(nn.ModuleDict({"net": TinyRegressor().net, "extra": nn.Linear(1, 1)}), ckpt)
    broken = {**ckpt, "state_dict": {k: v.clone().fill_(math.nan) for k, v in ckpt["state_dict"].items()}}
    with pytest.raises(CheckpointError, match=r"its weights hold NaN or inf \(6 tensor\(s\), the first 'net"):
        load_model_weights(TinyRegressor(), broken)  # the trainer never saves them: it loaded and ran
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("entry", ["data/0", "data.pkl"])
def test_a_checkpoint_changed_on_disk_is_refused_naming_the_damage(tmp_path, entry):
    """torch.load never checks the CRC-32 its zip format stores per entry: a bit flipped in a tensor's
    bytes loaded as other weights without a word. Now refused in one line, also when the process had
    turned torch's CRC writing off (save_checkpoint writes them anyway)."""
    model = TinyRegressor()
    torch.serialization.set_crc32_options(False)
    try:
        path = save_checkpoint(
            tmp_path / "ckpt_00000001.pt", model_type="tiny", model_config={}, state_dict=model.state_dict()
        )
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.serialization.get_crc32_options()  # restored
    load_model_weights(TinyRegressor(), load_checkpoint(path))
    flip_bit_in_zip_entry(path, entry, at=1 if entry == "data/0" else 40)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{path} is damaged: the bytes of its entry {entry!r} do not match the checksum saved with them "
        "(changed on disk or in a copy); copy it again, or load an earlier checkpoint of the run"
    )


def test_a_save_killed_midway_leaves_a_temporary_file_the_next_save_removes(tmp_path):
    """`kill -9` inside save_checkpoint left `.ckpt_*.pt.tmp<pid>` for good (harmless, but it grew)."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".ckpt_00000003.pt.tmp{dead.pid}"
    saving = tmp_path / f".ckpt_00000005.pt.tmp{os.getpid()}"  # a live process's save: not touched
    left.write_bytes(b"half a checkpoint")
    saving.write_bytes(b"being written")
    model = TinyRegressor()
    save_checkpoint(
        tmp_path / "ckpt_00000004.pt", model_type="tiny", model_config={}, state_dict=model.state_dict()
    )
    prune_checkpoints(tmp_path, keep_last=2)
    assert not left.exists() and saving.exists() and (tmp_path / "ckpt_00000004.pt").is_file()


def test_state_dict_diff_names_each_kind_of_problem():
    own = {f"w{i}": torch.zeros(2) for i in range(8)} | {"b": torch.zeros(3)}
    assert state_dict_diff(own, dict(own)) == []
    incoming = {"b": torch.zeros(4), "extra": torch.zeros(1)}
    assert state_dict_diff(own, incoming, limit=3) == [
        "missing keys: w0, w1, w2 (+5 more)",
        "unexpected keys: extra",
        "shape mismatches: b (checkpoint (4,), model (3,))",
    ]


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, store_path: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = TinyRegressor(**MODEL_CONFIG)
    trainer = Trainer(
        model,
        WindowDataset(store_path, SPEC),
        cfg(steps=4, batch_size=16, log_every=2),
        out_dir,
        model_type="tiny",
        model_config=MODEL_CONFIG,
    )
    result = trainer.fit()
    state = {"model": trainer.model.state_dict(), "ema": trainer.ema_model.state_dict(), "result": result}
    torch.save(state, f"{out_dir}/r{rank}.pt")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend unavailable")
def test_ddp_two_cpu_processes_stay_in_sync(store_path, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(store_path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
        assert torch.equal(r0["ema"][key], r1["ema"][key]), key
    assert r0["result"]["loss"] == r1["result"]["loss"]  # logged metrics are averaged over ranks
    ckpt = load_checkpoint(tmp_path, expected_type="tiny")  # rank 0 alone saved
    assert ckpt["step"] == 4 and [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004.pt"]
    assert torch.equal(ckpt["state_dict"]["net.0.weight"], r0["model"]["net.0.weight"])
    assert not torch.equal(ckpt["state_dict"]["net.0.weight"], ckpt["ema_state_dict"]["net.0.weight"])


def test_validation_runs_on_pytorchs_kernels_not_timed_choices(dataset, tmp_path):
    """Kernels chosen by timing (`wm.kernels`) differ between processes, and with them the validation
    metric in its fourth digit: two runs of one config could keep different best.pt files."""
    from wm import kernels

    modes = []

    def val_fn(model, step, out_dir):
        modes.append(kernels.selector().current_mode())
        return {}

    make_trainer(dataset, tmp_path, steps=10, val_every=5, val_fn=val_fn).fit()
    assert modes == ["native", "native"] and kernels.selector().current_mode() == "measure"


@pytest.mark.parametrize("stop_at", [10, 16])  # mid-epoch (8 batches an epoch), at an epoch's end
def test_a_resumed_run_trains_as_the_unbroken_one(dataset, tmp_path, stop_at):
    """A resume started a fresh epoch (the rest of the interrupted one was never drawn), and a
    validation between the checkpoint and the stop moved the random streams: the resumed run's
    weights differed from the unbroken run's (63 of 75 tensors in a DINO-WM run). Now they are equal."""
    import random
    import shutil

    def val_fn(model, step, out_dir):
        torch.rand(3), np.random.rand(), random.random()  # validation that draws from the global streams
        return {}

    def run(out):
        return make_trainer(
            dataset, out, steps=24, ckpt_every=stop_at, keep_last=5, val_every=5, val_fn=val_fn
        )

    unbroken = run(tmp_path / "a")
    unbroken.fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for path in list_checkpoints(tmp_path / "b"):
        if load_checkpoint(path)["step"] > stop_at:
            path.unlink()  # as if the run died right after step `stop_at`
    resumed = run(tmp_path / "b")
    resumed.fit()
    assert resumed.step == 24 and load_checkpoint(tmp_path / "b")["step"] == 24
    for name, weight in unbroken.model.state_dict().items():
        assert torch.equal(weight, resumed.model.state_dict()[name]), name
    assert torch.equal(unbroken.ema_model.net[0].weight, resumed.ema_model.net[0].weight)


def test_a_best_pt_left_of_another_model_is_refused_as_a_checkpoint_to_resume_is(dataset, tmp_path):
    """A best.pt without a checkpoint beside it (a run killed before its first) was taken as the bar of
    any run into the folder, one of another architecture too, and kept as that run's best."""
    make_trainer(
        dataset, tmp_path, steps=2, val_every=2, ckpt_every=10, val_fn=scripted_val({2: {"loss": 1.0}})
    ).fit()
    for ckpt in tmp_path.glob("ckpt_*.pt"):
        ckpt.unlink()
    assert (tmp_path / BEST_NAME).is_file()
    model_config = MODEL_CONFIG | {"hidden": 16}
    other = Trainer(
        TinyRegressor(**model_config),
        dataset,
        cfg(steps=2),
        tmp_path,
        model_type="tiny",
        model_config=model_config,
    )
    with pytest.raises(CheckpointError, match=r"already holds best.pt \(step 2\) of another architecture"):
        other.fit()
    assert load_checkpoint(tmp_path / BEST_NAME)["step"] == 2


def test_a_resumed_runs_tensorboard_holds_each_step_once(dataset, tmp_path):
    """Steps a killed run had logged past its last checkpoint were logged again after the resume: the
    curves held them twice, and zigzagged where the two runs differed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(dataset, tmp_path, steps=8, ckpt_every=4, keep_last=5, log_every=1).fit()
    (tmp_path / "ckpt_00000008.pt").unlink()  # killed after step 8 was logged, before it was saved
    make_trainer(dataset, tmp_path, steps=8, ckpt_every=4, keep_last=5, log_every=1).fit()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
