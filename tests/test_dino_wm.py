"""The DINO-WM world model on a real (small) pointmaze store: training, rollouts, checkpoints, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from policies.build import build_graph, build_mpc
from policies.mpc import MPCConfig
from policies.subgoal import GraphConfig
from robots.collect import Collector, open_store, recording_schema
from robots.registry import make_expert, make_task
from robots.sim.base import SimConfig
from wm.checkpoint import CheckpointError, save_checkpoint
from wm.checks import check_unit_frames
from wm.data import SchemaError
from wm.data.normalize import Normalizer
from wm.dino_wm import DinoWorldModel, WorldModelConfig
from wm.encoders import EncoderConfig
from wm.registry import load_model, model_entry
from wm.trainer import Trainer, TrainerConfig
from wm.training import setup_training

MODEL = {
    "type": "dino_wm",
    "n_hist": 2,
    "frameskip": 2,
    "encoder": {"name": "cnn", "cnn_channels": [16, 16, 32], "cnn_dim": 32, "cnn_stride": 8},
    "predictor_dim": 64,
    "predictor_depth": 2,
    "predictor_heads": 2,
    "predictor_head_dim": 32,
    "predictor_mlp_dim": 128,
    "decoder_channels": [32, 16, 16],
    "rollout_loss_steps": 1,
    "predictor_precision": "fp32",  # exact comparisons below; bf16 planning: tests/test_predictor.py
}


@pytest.fixture(scope="module")
def maze_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("wm") / "maze.zarr"
    task = make_task("pointmaze", SimConfig(image_size=(32, 32)))
    store = open_store(str(path), recording_schema(task, "pointmaze"))
    collector = Collector(task, store, seed=0, noise_std=0.3)
    with task:
        for _ in range(12):
            collector.record_expert_episode(make_expert("pointmaze"), "expert")
    store.close()
    return path


def _setup(store, **kw):
    return setup_training("dino_wm", str(store), MODEL | kw, val_ratio=0.2, seed=0, in_memory=True)


def raw(batch, key, t):
    """Step t of a training batch as a raw robot observation: uint8 (E, H, W, 3) frames."""
    return (batch[key][:, t].permute(0, 2, 3, 1) * 255).round().byte().numpy()


def test_training_lowers_the_loss_and_checkpoint_reloads_exactly(maze_store, tmp_path):
    torch.manual_seed(0)
    setup = _setup(maze_store)
    batch = setup.train_set.get_batch(np.arange(0, len(setup.train_set), 7)[:32])
    before = setup.model.compute_loss(batch)[0].item()
    cfg = TrainerConfig(
        steps=60,
        batch_size=16,
        lr=2e-3,
        warmup_steps=5,
        val_every=60,
        ckpt_every=60,
        log_every=20,
        ema_decay=0.9,
    )
    trainer = Trainer(
        setup.model,
        setup.train_set,
        cfg,
        tmp_path / "run",
        model_type="dino_wm",
        model_config=setup.model_config,
        normalizer=setup.normalizer,
        val_fn=setup.val_fn,
    )
    metrics = trainer.fit()
    ema = trainer.ema_model.eval()
    after = ema.compute_loss(batch)[0].item()
    assert after < 0.7 * before, (before, after)
    assert 0 < metrics["val/val_one_step_mse"] < math.inf  # the validation ran and was logged
    assert list((tmp_path / "run" / "val").glob("pred_*.png"))

    loaded = load_model(str(tmp_path / "run"), controller="mpc")
    model, ckpt = loaded.model, loaded.checkpoint
    assert ckpt["model_type"] == "dino_wm" and ckpt["normalizer"] == setup.normalizer.to_dict()
    assert not model.training
    with torch.no_grad():
        z_a, z_b = ema.encode(batch), model.encode(batch)
        torch.testing.assert_close(z_a["visual"], z_b["visual"], rtol=0, atol=0)
        acts = torch.rand(2, 3, 4, model.action_dim) * 2 - 1
        z0 = {k: v[:2, :2] for k, v in z_a.items()} | {"past_action": acts[:, 0, :1]}
        torch.testing.assert_close(
            ema.rollout(z0, acts)["visual"], model.rollout(z0, acts)["visual"], rtol=0, atol=1e-6
        )


def test_the_feature_cache_encodes_on_the_trainings_device(maze_store, tmp_path, monkeypatch):
    """setup_training built the cache on the CPU whatever the trainer's device: a DINOv2 encoding of a
    large store took hours beside an idle GPU. wm-train passes trainer.device; the encoder is left on
    the CPU with the rest of the model (the trainer moves it)."""
    import torchvision

    import wm.feature_cache
    from wm.training import setup_training

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    seen, build = [], wm.feature_cache.build_feature_cache
    monkeypatch.setattr(
        wm.feature_cache,
        "build_feature_cache",
        lambda *a, **k: seen.append(k.get("device")) or build(*a, **k),
    )
    model = MODEL | {"encoder": {"name": "resnet18", "weights": str(weights)}, "decoder_channels": [8]}
    device = torch.device("cpu")  # (the one this machine has: the same object must arrive)
    setup = setup_training("dino_wm", str(maze_store), model, val_ratio=0.2, seed=0, device=device)
    assert seen == [device] and next(setup.model.encoder.parameters()).device.type == "cpu"


def test_a_checkpoint_loads_without_the_pretrained_encoder_file(maze_store, tmp_path):
    """The checkpoint holds the frozen encoder's weights: evaluating on another machine (or after the
    downloaded file moved) must not need the file again (it raised EncoderWeightsError)."""
    import torchvision

    weights = tmp_path / "resnet18.pth"  # stands in for the downloaded ImageNet file
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = MODEL | {"encoder": {"name": "resnet18", "weights": str(weights)}, "decoder_channels": [8]}
    setup = setup_training("dino_wm", str(maze_store), model, val_ratio=0.2, seed=0)
    cfg = TrainerConfig(steps=1, batch_size=4, val_every=0, ckpt_every=1, log_every=1)
    run = tmp_path / "run"
    trainer = Trainer(setup.model, setup.train_set, cfg, run, model_type="dino_wm",
                      model_config=setup.model_config, normalizer=setup.normalizer)  # fmt: skip
    decoder = [p.detach().clone() for p in setup.model.decoder.parameters()]
    batch = setup.train_set.get_batch([0, 1])
    assert batch["image"].ndim == 4  # cached features (B, T, P, D), not frames
    assert batch["image:frames"].shape == (2, 1, 3, 32, 32)  # the decoder's target, beside them
    trainer.fit()
    # the video decoder trains from cached features too (it never did: evaluation videos were noise)
    assert any(not torch.equal(a, b) for a, b in zip(decoder, setup.model.decoder.parameters(), strict=True))
    metrics = setup.val_fn(setup.model.eval(), 1, tmp_path / "val")  # its strip: real frames beside them
    assert tuple(metrics) == model_entry("dino_wm").val_metrics  # what wm-train checks best_metric by
    assert (tmp_path / "val" / "val" / "pred_0000001.png").is_file()
    weights.unlink()
    loaded = load_model(str(run), controller="mpc").model
    c = loaded.cfg
    obs = {c.image_key: torch.rand(2, 1, 3, 32, 32), c.proprio_key: torch.rand(2, 1, c.proprio_dim)}
    with torch.no_grad():
        want = trainer.ema_model.eval().encode(obs)["visual"]
        torch.testing.assert_close(loaded.encode(obs)["visual"], want, rtol=0, atol=0)


def test_a_config_from_before_an_option_was_retired_still_builds():
    """A checkpoint written while `decoder_motion_weight` (a loss weight) existed was refused as an
    unknown option; its weights load as they are. A key no version had is still refused."""
    d = WorldModelConfig().to_dict()
    assert WorldModelConfig.from_dict(d | {"decoder_motion_weight": 0.5}) == WorldModelConfig.from_dict(d)
    with pytest.raises(ValueError, match=r"unknown world-model option\(s\) \['new_option'\]"):
        WorldModelConfig.from_dict(d | {"new_option": 1})


def test_windows_start_before_an_episode_as_a_rollouts_history_does(maze_store):
    """With a history of several frames, planning at an episode's start runs on the first frame repeated
    and zero past actions (`ObsHistory`), which training never showed (no window started before an
    episode). Now such windows are trained on, their actions before the episode zero whatever the
    store's padding repeats."""
    setup = _setup(maze_store)
    model, c = setup.model.eval(), setup.model.cfg
    pads = setup.train_set.get_batch(np.arange(len(setup.train_set)))[c.image_key + "_is_pad"][:, 0]
    batch = setup.train_set.get_batch([int(pads.nonzero()[0, 0])])  # a window starting before an episode
    f = c.frameskip
    assert batch[c.image_key + "_is_pad"][0].tolist() == [True, False, False, False]
    assert torch.equal(batch[c.image_key][0, 0], batch[c.image_key][0, 1])  # its first frame, repeated
    assert batch[c.action_key + "_is_pad"][0, :f].all() and not batch[c.action_key + "_is_pad"][0, f:].any()
    torch.manual_seed(0)
    with torch.no_grad():
        as_stored = model.compute_loss(batch)[1]["loss"]
        zeros = {**batch, c.action_key: batch[c.action_key].clone()}
        zeros[c.action_key][0, :f] = 0.0
        torch.manual_seed(0)
        assert torch.equal(model.compute_loss(zeros)[1]["loss"], as_stored)
        zeros[c.action_key][0, :f] = 5.0
        torch.manual_seed(0)
        assert torch.equal(model.compute_loss(zeros)[1]["loss"], as_stored)


@pytest.mark.parametrize("n_hist, rollout", [(1, 0), (1, 1), (2, 0)])
def test_every_training_window_has_a_target_inside_its_episode(n_hist, rollout):
    """With one history frame and no rollout, the last frameskip anchors of every episode got a window
    whose only target lay past the episode's end: masked out, a forward pass that trained nothing."""
    from wm.data.windows import build_index, window_indices

    cfg = WorldModelConfig(n_hist=n_hist, rollout_loss_steps=rollout, frameskip=5)
    spec = cfg.window_spec()
    offsets = spec.offsets[cfg.image_key]
    pads = [window_indices(a, s, e, offsets)[1] for a, s, e in build_index(np.array([40, 80]), spec)]
    assert pads and not any(pad[1:].all() for pad in pads)  # (every frame after the first is a target)
    assert any(pad[-1] for pad in pads) == (n_hist + rollout > 1)  # (ends past an episode where it can)


def test_validation_windows_lie_inside_their_episodes(maze_store):
    """They ended up to a frameskip past an episode's end, and the multi-step error, unmasked, scored the
    rollout against the last frame repeated. They hold the frames validation reads and no more: one
    model frame (and its actions) more was read and never used, and cost each validation episode
    `frameskip` windows (an episode one frame short was dropped with a note)."""
    from wm.dino_entry import VAL_STEPS

    setup = _setup(maze_store)
    val_set, c = setup.val_fn.val_set, setup.model.cfg
    batch = val_set.get_batch(np.arange(len(val_set)))
    assert len(val_set) > 0 and not batch[c.image_key + "_is_pad"].any()
    assert batch[c.image_key].shape[1] == c.n_hist + VAL_STEPS  # the history, then the steps rolled out


def test_a_model_without_proprio_refuses_a_latent_that_carries_one():
    """Its proprio embedding was trained on zeros only: a 1-d "proprio" moved the rollout without a word,
    a wider one failed as a bare shape error."""
    torch.manual_seed(0)
    model = _small_model()
    model = DinoWorldModel(
        dataclasses.replace(model.cfg, proprio_dim=0), Normalizer({"action": "identity"}, {})
    ).eval()
    with torch.no_grad():
        z0 = model.encode({"image": torch.rand(3, 2, 3, 32, 32), "past_action": torch.rand(3, 1, 4)})
        for dim in (1, 3):
            with pytest.raises(ValueError, match=r"^z0 holds 'proprio' .* this model reads none"):
                model.rollout(z0 | {"proprio": torch.rand(3, 2, dim)}, torch.rand(3, 5, 4, 4))


def test_rollout_matches_teacher_forcing(maze_store):
    setup = _setup(maze_store)
    model = setup.model.eval()
    batch = setup.train_set.get_batch(np.arange(4))
    c = model.cfg
    with torch.no_grad():
        z = model.encode(batch)
        acts = batch[c.action_key].reshape(4, -1, c.frameskip * c.action_dim)
        pred = model.predict({k: v[:, :2] for k, v in z.items()}, acts[:, :2])
        z0 = {k: v[:, :2] for k, v in z.items()} | {"past_action": acts[:, :1]}
        roll = model.rollout(z0, acts[:, None, 1:2])  # one step from the last history frame
    torch.testing.assert_close(roll["visual"][:, 0, 0], pred["visual"][:, 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(roll["proprio"][:, 0, 0], pred["proprio"][:, 1], rtol=1e-4, atol=1e-5)


def test_mpc_over_the_world_model_returns_bounded_actions(maze_store):
    setup = _setup(maze_store)
    model = setup.model.eval()
    task = make_task("pointmaze", SimConfig(image_size=(32, 32)))
    feat = task.action_feature
    planner = {"name": "cem", "horizon": 3, "samples": 16, "elites": 4, "iterations": 2}
    mpc = build_mpc(model, feat.low, feat.high, planner, MPCConfig(execute=1))
    batch = setup.train_set.get_batch(np.arange(3))
    obs = {"image": raw(batch, "image", 0), "proprio": batch["proprio"][:, 0].numpy()}
    mpc.set_goal({"image": raw(batch, "image", -1), "proprio": batch["proprio"][:, -1].numpy()})
    action = mpc.select_action(obs)
    assert action.shape == (3, 2) and action.abs().max() <= 1.0
    assert mpc.preview().shape == (3, 32, 32, 3)  # the decoded prediction for the video
    with pytest.raises(ValueError, match="another task"):
        build_mpc(model, np.zeros(3), np.ones(3), planner)


def test_cost_vectors_measure_the_planning_cost(maze_store):
    """The metric the subgoal graph uses is the world model's own single-frame cost."""
    model = _setup(maze_store).model.eval()
    torch.manual_seed(0)
    a = {"visual": torch.randn(5, 1, 16, 32), "proprio": torch.randn(5, 1, 4)}
    b = {"visual": torch.randn(5, 1, 16, 32), "proprio": torch.randn(5, 1, 4)}
    pred = {k: v[:, None] for k, v in a.items()}  # leading (E, N=1, H=1)
    cost = model.cost(pred, b)[:, 0]  # (E,)
    dist = (model.cost_vectors(a) - model.cost_vectors(b)).pow(2).sum(-1)
    torch.testing.assert_close(dist, cost, rtol=1e-5, atol=1e-6)


def test_a_goal_for_another_number_of_episodes_is_one_clear_error(maze_store):
    """A goal of batch 1 is every episode's; one of another batch (or patch grid) was a broadcasting
    error from deep in torch, or for 1 of several frames a silent mix-up."""
    model = _setup(maze_store).model.eval()
    pred = {"visual": torch.randn(3, 4, 2, 16, 32), "proprio": torch.randn(3, 4, 2, 4)}  # (E, N, H, ...)
    one = {"visual": torch.randn(1, 16, 32), "proprio": torch.randn(1, 4)}
    assert model.cost(pred, one).shape == (3, 4)
    torch.testing.assert_close(
        model.cost(pred, one), model.cost(pred, {k: v.expand(3, *v.shape[1:]) for k, v in one.items()})
    )
    with pytest.raises(ValueError, match=r"goal\['visual'\] must be .* E = 3 \(or 1\).* got \(2, 16, 32\)"):
        model.cost(pred, {"visual": torch.randn(2, 16, 32), "proprio": torch.randn(2, 4)})
    with pytest.raises(ValueError, match=r"\(P, D\) = \(16, 32\).* got \(3, 1, 8, 32\)"):
        model.cost(pred, {"visual": torch.randn(3, 1, 8, 32), "proprio": torch.randn(3, 4)})
    with pytest.raises(
        ValueError, match=r"goal\['proprio'\] must be .* E = 3 \(or 1\) and Dp = 4, got \(2, 4\)"
    ):
        model.cost(pred, {"visual": torch.randn(3, 16, 32), "proprio": torch.randn(2, 4)})


def test_the_subgoal_graph_reads_only_its_nodes_rows_and_refuses_a_store_without_episodes(
    maze_store, tmp_path, monkeypatch
):
    """build_graph read every frame of every key, whatever the stride, and kept one in `stride` (a store
    of 100,000 224 px frames: 15 GB resident at every start); an empty store was a numpy error."""
    from wm.data import DemoStore

    setup = _setup(maze_store)
    model = setup.model.eval()
    read = []
    rows, whole = DemoStore.read_rows, DemoStore.read
    monkeypatch.setattr(
        DemoStore, "read_rows", lambda s, k, steps: read.append(len(steps)) or rows(s, k, steps)
    )
    monkeypatch.setattr(DemoStore, "read", lambda s, k, *a, **kw: read.append(k) or whole(s, k, *a, **kw))
    graph = build_graph(model, str(maze_store), GraphConfig(stride=5), batch=8)
    assert sum(read) == len(graph.vectors) * len(model.io_spec.obs_keys) and max(read) <= 8
    with DemoStore.open(maze_store) as store:
        empty = DemoStore.create(tmp_path / "empty.zarr", store.schema)
        empty.close()
    with pytest.raises(ValueError, match=r"empty.zarr holds no episodes to build the subgoal graph from$"):
        build_graph(model, str(tmp_path / "empty.zarr"), GraphConfig())
    # the same keys of other shapes (a task's other variant): a torch reshape error, or one that blamed
    # "an observation or goal"; refused naming the store and the key
    io = model.io_spec
    for key, shape in ((io.proprio_key, (io.proprio_dim + 3,)), (io.image_keys[0], (*io.image_size, 1))):
        other = dataclasses.replace(store.schema.keys[key], shape=shape, names=())
        schema = dataclasses.replace(store.schema, keys={**store.schema.keys, key: other})
        with DemoStore.create(tmp_path / f"other_{key}.zarr", schema) as s:
            s.append_episode({k: np.zeros((4, *v.shape), v.dtype) for k, v in schema.keys.items()})
        with pytest.raises(
            ValueError, match=rf"other_{key}.zarr: key '{key}' is \({shape[0]},.*the world model reads"
        ):
            build_graph(model, str(tmp_path / f"other_{key}.zarr"), GraphConfig())


def test_subgoal_mpc_encodes_each_observation_once_per_replan(maze_store):
    setup = _setup(maze_store)
    model = setup.model.eval()
    graph = build_graph(model, str(maze_store), GraphConfig(stride=2, lookahead=1.0, goal_reach=0.1))
    assert len(graph.vectors) > 20 and graph.vectors.shape[1] == model.cost_vectors(graph.latents).shape[1]
    feat = make_task("pointmaze", SimConfig(image_size=(32, 32))).action_feature
    planner = {"name": "cem", "horizon": 2, "samples": 8, "elites": 2, "iterations": 1}
    mpc = build_mpc(model, feat.low, feat.high, planner, MPCConfig(execute=1), graph)
    batch = setup.train_set.get_batch(np.arange(0, 60, 20))
    calls = []
    encode = model.encode
    model.encode = lambda obs: calls.append(obs) or encode(obs)  # count the encoder's calls
    try:
        mpc.set_goal({"image": raw(batch, "image", -1), "proprio": batch["proprio"][:, -1].numpy()})
        for t in range(3):
            mpc.select_action({"image": raw(batch, "image", t), "proprio": batch["proprio"][:, t].numpy()})
    finally:
        del model.encode
    assert len(mpc.inference_seconds()) == 2  # replans at steps 0 and 2 (frameskip 2)
    assert len(calls) == 1 + 2  # the goal, then one encode per replan (the selector reuses it)
    assert mpc.subgoals.count > 0  # goals further than lookahead steps: subgoals were chosen


def test_bad_inputs(maze_store, tmp_path):
    setup = _setup(maze_store)
    model = setup.model
    batch = setup.train_set.get_batch(np.arange(2))
    wrong = dict(batch)
    wrong[model.cfg.image_key] = torch.rand(2, 1, 3, 48, 48)
    with pytest.raises(ValueError, match="another task"):
        model.encode(wrong)
    with pytest.raises(ValueError, match="lacks 'proprio'"):
        model.encode({model.cfg.image_key: batch[model.cfg.image_key]})
    other = tmp_path / "other.pt"
    save_checkpoint(other, format=1, model_type="diffusion_unet", model_config={}, state_dict={})
    with pytest.raises(CheckpointError, match="cannot serve controller=mpc"):
        load_model(str(other), controller="mpc")
    with pytest.raises(SchemaError, match="no camera key 'wrist'"):
        setup_training("dino_wm", str(maze_store), MODEL, image_key="wrist")
    # options the store decides were overwritten silently (model.image_key=wrist trained on the first camera)
    with pytest.raises(
        ValueError,
        match=r"model.image_key=wrist is set from the store \(image\): choose the camera with the top-level",
    ):
        setup_training("dino_wm", str(maze_store), MODEL | {"image_key": "wrist"})
    with pytest.raises(ValueError, match=r"model.image_size=\[64, 64\] is set from the store \(\[32, 32\]\)"):
        setup_training("dino_wm", str(maze_store), MODEL | {"image_size": (64, 64)})
    setup_training("dino_wm", str(maze_store), MODEL | {"image_size": [32, 32]})  # the store's: fine
    with pytest.raises(ValueError, match="teacher= is for distilled models"):  # it was ignored
        setup_training("dino_wm", str(maze_store), MODEL, teacher=str(tmp_path))
    # a number of the wrong kind was a TypeError traceback from range() (1.5) or was taken (True as 1)
    for bad, shown in ((1.5, "1.5"), (True, "True"), ("2", "'2'")):
        with pytest.raises(ValueError, match=rf"^model.rollout_loss_steps={shown} is not a whole number$"):
            setup_training("dino_wm", str(maze_store), MODEL | {"rollout_loss_steps": bad})
    encoder = MODEL["encoder"] | {"cnn_dim": 32.0}
    with pytest.raises(ValueError, match=r"^model.encoder.cnn_dim=32.0 is not a whole number$"):
        setup_training("dino_wm", str(maze_store), MODEL | {"encoder": encoder})


def test_recon_loss_weights_the_pixels_that_move():
    """A 2x2 'ball' moves one pixel; a prediction wrong only on the pixels that changed costs
    (1 + w) times more, relative to an error of the same size on static pixels."""
    from wm.dino_wm import recon_loss

    image = torch.zeros(1, 3, 8, 8)
    image[..., 2:4, 2:4] = 1.0
    next_image = torch.zeros(1, 3, 8, 8)
    next_image[..., 2:4, 3:5] = 1.0  # columns 2 and 4 change, column 3 stays lit
    moving_err, static_err = image.clone(), image.clone()
    moving_err[..., 2:4, 2] += 0.5  # 2 moving pixels wrong
    static_err[..., 6:8, 6] += 0.5  # 2 static pixels wrong
    n_moving = 4  # column 2 (lit -> dark) and column 4 (dark -> lit), rows 2-3
    w = 9.0
    denominator = 3 * (64 + w * n_moving)
    assert recon_loss(moving_err, image, next_image, w).item() == pytest.approx(
        3 * 2 * 0.25 * (1 + w) / denominator
    )
    assert recon_loss(static_err, image, next_image, w).item() == pytest.approx(3 * 2 * 0.25 / denominator)
    # Without the weight it is the plain MSE.
    assert recon_loss(moving_err, image, next_image, 0.0).item() == pytest.approx(2 * 0.25 / 64)


def _small_model() -> DinoWorldModel:
    torch.manual_seed(0)
    cfg = WorldModelConfig(
        image_size=(32, 32),
        n_hist=2,
        frameskip=2,
        encoder=EncoderConfig(cnn_channels=(8, 8, 8), cnn_dim=16),
        predictor_dim=32,
        predictor_depth=1,
        predictor_heads=2,
        predictor_head_dim=16,
        predictor_mlp_dim=32,
        predictor_precision="fp32",
    )
    return DinoWorldModel(cfg, Normalizer({"action": "identity", "proprio": "identity"}, {})).eval()


def test_a_rollout_past_the_history_window_sees_the_context_training_showed():
    """With n_hist > 1, once the rollout's window slid, the KV cache gave the oldest frame in it keys of
    deeper layers computed while earlier frames were visible, a context teacher forcing (n_hist frames
    from the first) never shows; every cost from the second planning step on was off-distribution. Now
    each step matches `predict` on the last n_hist frames (DINO-WM's rollout)."""
    torch.manual_seed(0)
    cfg = WorldModelConfig(
        image_size=(32, 32), n_hist=3, frameskip=1, proprio_dim=0,
        encoder=EncoderConfig(cnn_channels=(8, 8, 8), cnn_dim=16), predictor_dim=32, predictor_depth=3,
        predictor_heads=2, predictor_head_dim=16, predictor_mlp_dim=32, predictor_precision="fp32",
    )  # fmt: skip
    model = DinoWorldModel(cfg, Normalizer({"action": "identity"}, {})).eval()
    with torch.no_grad():
        for p in model.predictor.parameters():
            if p.ndim == 2:
                p.mul_(8.0)  # attention that matters (a fresh predictor is close to the identity)
        P, D = model.grid[0] * model.grid[1], model.encoder.dim
        vis, past = torch.randn(2, 3, P, D), torch.rand(2, 2, model.action_dim) * 2 - 1
        acts = torch.rand(2, 1, 3, model.action_dim) * 2 - 1
        roll = model.rollout({"visual": vis, "past_action": past}, acts)["visual"][:, 0]
        frames, taken = list(vis.unbind(1)), [*past.unbind(1), *acts[:, 0].unbind(1)]
        for h in range(3):
            seen = frames + list(roll[:, :h].unbind(1))  # the history, then the rollout's own frames
            window = {"visual": torch.stack(seen[-3:], 1)}
            want = model.predict(window, torch.stack(taken[len(seen) - 3 : len(seen)], 1))["visual"][:, -1]
            torch.testing.assert_close(roll[:, h], want, rtol=1e-4, atol=1e-5)


def test_rollout_and_predict_name_the_bad_argument_in_one_line():
    """Each was a torch error deep inside (expand, cat, reshape, a dtype mismatch) or, for NaN
    actions, NaN predictions and costs without an error."""
    model = _small_model()
    obs = {
        "image": torch.rand(3, 2, 3, 32, 32),
        "proprio": torch.rand(3, 2, 4),
        "past_action": torch.rand(3, 1, 4),
    }
    with torch.no_grad():
        z0 = model.encode(obs)
        acts = torch.rand(3, 5, 4, 4)
        want = model.rollout(z0, acts)
        bad_rollouts = [
            (z0, acts[:2], r"^actions must be \(E, N, H, frameskip \* action_dim\) = \(3, N, H >= 1, 4\)"),
            (
                z0,
                acts[..., :3],
                r"^actions must be raw actions \(E, N, H, f\*A\) = \(3, 5, 4, 4\) \(f\*A: frame",
            ),
            (z0, acts[:, 0], r"^actions must be \(E, N, H, "),
            (z0, acts[:, :, :0], r"H >= 1"),
            (z0, acts * float("nan"), r"^NaN or inf values in actions: a faulty"),
            (
                z0 | {"proprio": z0["proprio"][:2]},
                acts,
                r"^z0\['proprio'\] must be \(E, Th, 4\) = \(3, 2, 4\), got",
            ),
            (
                {"visual": z0["visual"]},
                acts,
                r"^z0\['proprio'\] must be \(E, Th, 4\) = \(3, 2, 4\), got None$",
            ),
            (
                z0 | {"visual": z0["visual"][:, :, :5]},
                acts,
                r"^z0\['visual'\] must be \(E, Th, 16, 16\), got",
            ),
            (
                z0 | {"past_action": z0["past_action"][:, :0]},
                acts,
                r"^z0\['past_action'\] must be raw actions",
            ),
            (  # zeros stood in for the actions between the history frames: another history, silently
                {k: v for k, v in z0.items() if k != "past_action"},
                acts,
                r"^z0 holds 2 history frames but no 'past_action': give z0\['past_action'\] \(E, Th - 1, "
                r"f\*A\) = \(3, 1, 4\)",
            ),
        ]
        for z, a, message in bad_rollouts:
            with pytest.raises(ValueError, match=message):
                model.rollout(z, a)
        # float64 and integer actions were a dtype error in the action embedding: now they are cast
        torch.testing.assert_close(model.rollout(z0, acts.double())["visual"], want["visual"])
        assert model.rollout(z0, acts.round().long())["visual"].shape == want["visual"].shape
        z = {k: v for k, v in z0.items() if k != "past_action"}
        assert model.predict(z, acts[:, 0, :2]).keys() == {"visual", "proprio"}
        for a in (acts[:, 0, :1], acts[:2, 0, :2], acts[:, 0, :2, :3]):
            with pytest.raises(
                ValueError, match=r"^actions must be raw actions \(B, T, f\*A\) = \(3, 2, 4\)"
            ):
                model.predict(z, a)


def test_encode_refuses_observations_of_mismatched_shapes():
    model = _small_model()
    obs = {"image": torch.rand(3, 2, 3, 32, 32), "proprio": torch.rand(3, 2, 4)}
    with pytest.raises(ValueError, match=r"^'proprio' must be \(B, T, 4\) = \(3, 2, 4\) beside 'image'"):
        model.encode(obs | {"proprio": torch.rand(2, 2, 4)})  # was encoded: a batch of 2 beside 3 images
    with pytest.raises(ValueError, match=r"^'image' must be images \(B, T, 3, H, W\) or cached features"):
        model.encode(obs | {"image": torch.rand(3, 3, 32, 32)})  # was taken as (32 patches, 32 features)
    with pytest.raises(ValueError, match=r"^'past_action' must be \(B, T - 1, frameskip \* action_dim\)"):
        model.encode(obs | {"past_action": torch.rand(3, 2, 4)})
    assert model.encode(obs | {"image": torch.rand(3, 2, 16, 16)})["visual"].shape == (3, 2, 16, 16)
    # numpy's float64 was a dtype error deep in the encoder; uint8 frames were encoded as 0..255 floats
    # would have been; NaN gave NaN latents and costs (a plan from nothing)
    double = model.encode({k: v.double() for k, v in obs.items()})
    for k, v in model.encode(obs).items():
        torch.testing.assert_close(double[k], v)
    with pytest.raises(ValueError, match=r"^'image' must be float images in \[0, 1\].*got torch.uint8"):
        model.encode(obs | {"image": (obs["image"] * 255).byte()})
    with pytest.raises(
        ValueError, match=r"^'image' frames hold values in \[\d+, \d+\]: expected float frames"
    ):
        model.eval().encode(obs | {"image": (obs["image"] * 255).round()})
    for key in obs:
        bad = obs[key].clone()
        bad[1, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=rf"^NaN or inf values in '{key}': a faulty"):
            model.encode(obs | {key: bad})
    inf = obs["image"].clone()
    inf[1, 0, 0] = float("inf")  # was told its frames hold [0, inf]: "divide 0..255 frames by 255"
    with pytest.raises(ValueError, match=r"^NaN or inf values in 'image': a faulty"):
        model.encode(obs | {"image": inf})
    check_unit_frames(obs["image"][:0], "image")  # an empty batch: nothing to check (a torch error)


@pytest.mark.parametrize(
    "field, value",
    [
        ("proprio_emb_dim", -3),  # torch's "negative dimension" error
        ("action_emb_dim", 0),  # trained a model no action reached
        ("predictor_depth", 0),
        ("recon_loss_weight", -1.0),  # maximised the reconstruction error
        ("cost_proprio_weight", -1.0),  # planning rewarded moving away from the goal's proprioception
        ("predictor_dropout", 1.0),
        ("image_size", (0, 0)),
        ("decoder_channels", ()),
    ],
)
def test_world_model_config_refuses_sizes_and_weights_that_make_no_model(field, value):
    with pytest.raises(ValueError, match=field):
        WorldModelConfig(**{field: value})


def test_a_store_without_a_camera_is_one_line_naming_its_keys(tmp_path):
    """It said "no camera key None to train on (image keys: [])"."""
    from wm.data import DemoStore, KeySpec, Schema
    from wm.data.errors import SchemaError
    from wm.training import data_keys

    schema = Schema(
        keys={"proprio": KeySpec((4,), "float32", "proprio"), "action": KeySpec((2,), "float32", "action")}
    )
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        with pytest.raises(SchemaError, match=r"has no camera \(keys: \['action', 'proprio'\]\); the models"):
            data_keys(store, None, None)


def test_a_training_step_checks_no_values_on_the_host(monkeypatch):
    """The rollout loss checked its actions finite (`bool(isfinite(...).all())`, a GPU sync mid-forward
    on every training step, twice with a history), which `predict` leaves out on purpose; a planner's
    rollout still refuses NaN actions."""
    import wm.dino_wm as dw
    from wm.encoders import EncoderConfig

    checked = []
    original = dw.check_finite
    monkeypatch.setattr(dw, "check_finite", lambda x, what: (checked.append(what), original(x, what))[1])
    cfg = dw.WorldModelConfig(
        image_size=(32, 32), n_hist=3, frameskip=2, proprio_dim=2, action_dim=2, rollout_loss_steps=1,
        encoder=EncoderConfig(cnn_channels=(8, 8), cnn_dim=16, cnn_stride=4), predictor_dim=32,
        predictor_depth=1, predictor_heads=2, predictor_head_dim=16, predictor_mlp_dim=32,
        decoder_channels=(8,), recon_channels=(8,),
    )  # fmt: skip
    model = dw.DinoWorldModel(cfg, Normalizer({"action": "identity", "proprio": "identity"}, {})).train()
    F, B = 3 + 1 + 1, 4
    batch = {
        "image": torch.rand(B, F, 3, 32, 32), "image_is_pad": torch.zeros(B, F, dtype=torch.bool),
        "proprio": torch.rand(B, F, 2), "action": torch.rand(B, (F - 1) * 2, 2),
        "action_is_pad": torch.zeros(B, (F - 1) * 2, dtype=torch.bool),
    }  # fmt: skip
    model.compute_loss(batch)
    assert checked == []
    with torch.no_grad():
        z0 = model.encode({k: v[:, :3] for k, v in batch.items() if k in ("image", "proprio")})
        z0["past_action"] = torch.rand(B, 2, 4)
        with pytest.raises(ValueError, match="actions"):
            model.rollout(z0, torch.full((B, 1, 2, 4), float("nan")))
