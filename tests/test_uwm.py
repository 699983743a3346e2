"""UWM: zero at initialization, one "absent" noise level in training and sampling, action-free samples
out of the action loss, the modes on a tiny task with known dynamics, the registry round trip, and
bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from apps import cli, run_app
from einops import rearrange

from wm.autoencoder import AutoencoderConfig
from wm.data import DemoStore
from wm.data.errors import SchemaError
from wm.data.normalize import Normalizer, compute_stats
from wm.data.windows import WindowSpec
from wm.uwm import UWM, UWMConfig
from wm.uwm_entry import UWMPolicy

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = 8  # latent side of the synthetic task
TINY_NET = dict(dim=64, depth=2, heads=4, registers=2, patch=2)  # the tiny UWM's transformer


def tiny_config(**over) -> UWMConfig:
    """A UWM on 32x32 frames (8x8x4 latents of an untrained autoencoder), one observation, 2 actions."""
    ae = AutoencoderConfig(image_keys=("image",), image_size=(32, 32), patch=2, channels=(8, 8))
    base = dict(
        image_keys=("image",),
        image_size=(32, 32),
        latent={"source": "autoencoder", "path": "(test)", "structure": ae.to_dict()},
        latent_shape=(4, GRID, GRID),
        action_dim=2,
        n_obs=1,
        horizon=2,
        n_action_exec=1,
        future=(1, 2),
        net=TINY_NET,
        shift=0,
    )
    return UWMConfig(**{**base, **over})


@pytest.mark.parametrize("future", [(8, 16), (8, 15), (16, 24), (4, 8)])
def test_an_episodes_last_steps_are_current_steps_as_in_diffusion_policy(future):
    """The padding after an episode was measured from the furthest future frame, not the last action:
    an episode's last 9 steps (future=(8, 16), the default) or 17 (future=(16, 24)) were never the
    current step. Now 8, whatever the future frames: the chunk's actions 0..15 with 7 padded, as
    Diffusion Policy pads n_action_steps - 1; padded future frames are left out of the loss."""
    from wm.data.windows import build_index

    spec = tiny_config(n_obs=2, horizon=16, n_action_exec=8, future=future).window_spec()
    anchors = build_index(np.array([100]), spec)[:, 0]
    assert anchors.min() == 0 and anchors.max() == 100 - 1 - 8  # of 100 steps


def action_normalizer() -> Normalizer:
    return Normalizer(
        {"action": "minmax"}, {"action": compute_stats(np.array([[-1, -1], [1, 1]], np.float32))}
    )


def tiny_uwm(**over) -> UWM:
    torch.manual_seed(0)
    return UWM(tiny_config(**over), action_normalizer(), load_codec=False)


def square_batch(
    B: int, gen: torch.Generator, cameras: tuple[str, ...] = ("image",)
) -> dict[str, torch.Tensor]:
    """A square moved one unit per step by actions in {-1, 0, 1}^2, seen through latents that hold its
    position (x, y) in channels 0 and 1 of every cell, over a fixed random background in channels 2
    and 3: frames at steps 0, 1, 2 as cached latent tokens (B, 3, 64, 4), actions (B, 2, 2). With two
    cameras, the first sees only x (channel 1 zero) and the second only y (channel 0 zero), each over
    its own background: only the two together tell both action dims."""
    pos = torch.randint(-2, 3, (B, 2), generator=gen).float()
    actions = torch.randint(-1, 2, (B, 2, 2), generator=gen).float()
    where = torch.stack([pos, pos + actions[:, 0], pos + actions[:, :2].sum(1)], dim=1) / 2  # (B, 3, 2)
    batch = {
        "action": actions,
        "action_is_pad": torch.zeros(B, 2, dtype=torch.bool),
    }
    for i, key in enumerate(cameras):
        seen = where if len(cameras) == 1 else where * torch.eye(2)[i]  # (B, 3, 2)
        background = torch.randn(B, 1, 2, GRID, GRID, generator=gen).expand(-1, 3, -1, -1, -1)
        frames = torch.cat([seen[..., None, None].expand(-1, -1, -1, GRID, GRID), background], dim=2)
        batch[key] = rearrange(frames, "b t c h w -> b t (h w) c")
        batch[key + "_is_pad"] = torch.zeros(B, 3, dtype=torch.bool)
    return batch


def train_on_squares(model: UWM, cameras: tuple[str, ...], steps: int = 500, batch: int = 32) -> UWM:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)  # (as wm-train steps on the CPU)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        loss, _ = model.compute_loss(square_batch(batch, gen, cameras))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_output_is_zero_at_initialization():
    model = tiny_uwm()
    B = 3
    a, v = model.net(
        torch.randn(B, 2, 2), torch.rand(B) * 99, torch.randn(B, 2, 1, 4, GRID, GRID), torch.rand(B) * 99,
        torch.randn(B, 1, 1, 4, GRID, GRID), None,
    )  # fmt: skip
    assert a.shape == (B, 2, 2) and v.shape == (B, 2, 1, 4, GRID, GRID)
    assert a.abs().max() == 0 and v.abs().max() == 0


def test_absent_is_one_noise_level_in_training_and_sampling():
    model = tiny_uwm()
    T = model.absent_t
    assert T == model.cfg.noise.num_train_steps - 1
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (t_a, t_v) of every network call
    model.net.register_forward_pre_hook(lambda m, args: seen.append((args[1].clone(), args[3].clone())))

    # training: samples without actions always have their actions absent, and their input is the noise
    batch = square_batch(8, torch.Generator().manual_seed(0))
    batch["has_action"] = torch.tensor([True, False] * 4)
    model.train()
    model.compute_loss(batch)
    t_a = seen[-1][0]
    assert (t_a[1::2] == T).all()
    x0, noise = torch.randn(4, 2, 2), torch.randn(4, 2, 2)
    assert torch.equal(model.corrupt(x0, torch.full((4,), T), noise), noise)
    assert (model.timesteps(64, absent=torch.ones(64, dtype=torch.bool)) == T).all()

    # sampling: policy mode has frames absent, video mode actions absent, at that same level
    model.eval()
    obs = {"image": batch["image"][:, :1]}
    seen.clear()
    model.policy(obs)
    assert seen and all((t_v == T).all() and (t_a < T).all() for t_a, t_v in seen)
    seen.clear()
    model.predict_video(obs)
    assert seen and all((t_a == T).all() and (t_v < T).all() for t_a, t_v in seen)
    seen.clear()  # forward dynamics: the actions given clean, at timestep 0 as in training
    model.forward_dynamics(obs, batch["action"])
    assert seen and all((t_a == 0).all() for t_a, _ in seen)


def test_action_free_samples_add_nothing_to_the_action_loss():
    model = tiny_uwm()
    model.train()
    batch = square_batch(6, torch.Generator().manual_seed(1))
    batch["has_action"] = torch.tensor([True, True, True, False, False, False])
    batch["action"].requires_grad_(True)
    loss, metrics = model.compute_loss(batch)
    loss.backward()
    grad = batch["action"].grad
    assert grad[3:].abs().max() == 0  # the action-free samples' actions reach nothing
    assert grad[:3].abs().max() > 0

    model.zero_grad()
    batch = square_batch(6, torch.Generator().manual_seed(1))
    batch["has_action"] = torch.zeros(6, dtype=torch.bool)
    loss, metrics = model.compute_loss(batch)
    loss.backward()
    assert metrics["action_loss"] == 0
    assert model.net.action_out.weight.grad.abs().max() == 0  # no action target trains the action head
    assert metrics["video_loss"] > 0 or model.net.frame_out.weight.grad.abs().max() > 0


def test_modes_on_a_square_moved_by_the_action():
    """Forward dynamics beats copying the current frame, and inverse dynamics recovers the actions far
    better than the policy mode (the actions are random: the observation says nothing of them)."""
    model = train_on_squares(tiny_uwm(p_absent=0.2, p_clean=0.3), ("image",))
    test = square_batch(256, torch.Generator().manual_seed(123))
    obs = {"image": test["image"][:, :1]}
    future = model.views(test)[:, 1:]  # (B, 2, 1, 4, 8, 8)
    current = model.views(test)[:, :1]
    gen = torch.Generator().manual_seed(7)
    fwd = (model.forward_dynamics(obs, test["action"], gen) - future).pow(2).mean()
    copy = (current - future).pow(2).mean()
    inverse = (model.inverse_dynamics(obs, future, gen) - test["action"]).pow(2).mean()
    policy = (model.policy(obs, gen) - test["action"]).pow(2).mean()
    assert fwd < 0.5 * copy, (fwd, copy)
    assert inverse < 0.2 * policy, (inverse, policy)
    actions, frames = model.sample_joint(obs, gen)
    assert actions.shape == (256, 2, 2) and frames.shape == (256, 2, 1, 4, GRID, GRID)
    assert torch.isfinite(actions).all() and (actions.abs() <= 1 + 1e-5).all()


def test_two_cameras_each_with_a_history_and_a_future():
    """Each camera sees one coordinate of the square: inverse dynamics recovers BOTH action dims (so it
    reads both cameras' futures), and forward dynamics predicts each camera's own future."""
    cams = ("image", "wrist")
    # 4x4 latent patches (4 tokens a frame): forward dynamics of two cameras needs about 1300 steps to
    # beat copying the frame, and a step costs a third of one on 2x2 patches
    net = {**TINY_NET, "patch": 4}
    model = train_on_squares(tiny_uwm(image_keys=cams, p_absent=0.2, p_clean=0.3, net=net), cams, steps=1500)
    assert model.io_spec.image_keys == cams and model.net.frame_pos.shape[1] == 2 * 2 * 4
    test = square_batch(256, torch.Generator().manual_seed(123), cams)
    obs = {k: test[k][:, :1] for k in cams}
    views = model.views(test)  # (B, 3, 2, 4, 8, 8)
    future, current = views[:, 1:], views[:, :1]
    gen = torch.Generator().manual_seed(7)
    fwd = (model.forward_dynamics(obs, test["action"], gen) - future).pow(2).mean(dim=(0, 1, 3, 4, 5))
    copy = (current - future).pow(2).mean(dim=(0, 1, 3, 4, 5))  # (V,)
    assert (fwd < 0.5 * copy).all(), (fwd, copy)
    inverse = (model.inverse_dynamics(obs, future, gen) - test["action"]).pow(2).mean(dim=(0, 1))  # (Da,)
    policy = (model.policy(obs, gen) - test["action"]).pow(2).mean(dim=(0, 1))
    assert (inverse < 0.2 * policy).all(), (inverse, policy)
    frames = model.decode(model.predict_video(obs, gen))
    assert frames.shape == (256, 2, 2, 3, 32, 32)
    with pytest.raises(KeyError, match=r"no camera\(s\) \['wrist'\]"):
        model.policy({"image": obs["image"]})


def test_the_policy_seam_and_inpainting():
    model = tiny_uwm().eval()
    obs = {"image": torch.rand(2, 1, 3, 32, 32)}  # camera frames: encoded by the codec
    gen = torch.Generator().manual_seed(0)
    assert model.sample_actions(obs, gen).shape == (2, 1, 2)
    assert model.sample_actions(obs, gen, full=True).shape == (2, 2, 2)
    previous = torch.tensor([[[0.5, -0.5]], [[-0.25, 0.75]]])
    chunk = model.sample_actions(obs, gen, previous=previous, frozen=1, full=True)
    assert torch.allclose(chunk[:, 0], previous[:, 0], atol=1e-5)  # the committed action is kept


def test_bad_input_is_one_clear_error():
    model = tiny_uwm().eval()
    with pytest.raises(ValueError, match=r"frames are \(48, 48\); the model was trained on \(32, 32\)"):
        model.policy({"image": torch.rand(1, 1, 3, 48, 48)})
    with pytest.raises(KeyError, match=r"no camera\(s\) \['image'\]"):
        model.policy({"wrist": torch.rand(1, 1, 3, 32, 32)})
    with pytest.raises(ValueError, match=r"actions are \(1, 3, 2\), expected \(1, 2, 2\)"):
        model.forward_dynamics({"image": torch.rand(1, 1, 3, 32, 32)}, torch.zeros(1, 3, 2))
    with pytest.raises(
        ValueError, match=r"'image' frames are torch.uint8: expected float frames in \[0, 1\]"
    ):
        model.policy({"image": torch.zeros(1, 1, 3, 32, 32, dtype=torch.uint8)})  # read as 0..255 before
    stats = {"state": compute_stats(np.random.default_rng(0).normal(size=(10, 3)))}
    norm = Normalizer(
        {**action_normalizer().modes, "state": "minmax"}, {**action_normalizer().to_dict()["stats"], **stats}
    )
    with_proprio = UWM(tiny_config(proprio_key="state", proprio_dim=3), norm, load_codec=False).eval()
    for shape in ((1, 1, 1), (1, 1, 4)):  # one broadcast silently, the other was a RuntimeError inside
        with pytest.raises(ValueError, match=r"proprioception 'state' is \(1, 1, \d\): expected \(B, T, 3\)"):
            with_proprio.policy({"image": torch.rand(1, 1, 3, 32, 32), "state": torch.zeros(shape)})
    with pytest.raises(ValueError, match=r"unknown option model.net.depht; did you mean model.net.depth\?"):
        tiny_config(net={"depht": 2})
    with pytest.raises(ValueError, match="prediction_type must be 'sample'"):
        tiny_config(noise={"prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="future must list distinct steps"):
        tiny_config(future=(0, 2))


def test_bad_input_to_the_modes_is_one_clear_error():
    """uint8 future frames were encoded as 0..255 by inverse dynamics (the policy refuses them); a NaN in
    an observation or in the actions gave NaN outputs silently; batch sizes that differ between keys, and
    latents of another shape, were torch errors from inside; a float config value was a TypeError from
    torch (horizon=4.5) or cut silently (future=[1.5, 2] became [1, 2])."""
    model = tiny_uwm().eval()
    obs = {"image": torch.rand(2, 1, 3, 32, 32)}
    future = torch.rand(2, 2, 1, 3, 32, 32)
    assert model.inverse_dynamics(obs, future).shape == (2, 2, 2)
    with pytest.raises(
        ValueError, match=r"'image' frames are torch.uint8: expected float frames in \[0, 1\]"
    ):
        model.inverse_dynamics(obs, (future * 255).to(torch.uint8))
    # float frames holding 0..255 (not divided) were encoded as another picture in every mode
    unit = r"'image' frames hold values in \[\d+, \d+\]: expected float frames in \[0, 1\] \(divide"
    with pytest.raises(ValueError, match=unit):
        model.policy({"image": (obs["image"] * 255).round()})
    with pytest.raises(ValueError, match=unit):
        model.inverse_dynamics(obs, (future * 255).round())
    with pytest.raises(
        ValueError, match=r"'image' frames are \(48, 48\); the model was trained on \(32, 32\)"
    ):
        model.inverse_dynamics(obs, torch.rand(2, 2, 1, 3, 48, 48))  # was "future latents are (...)"
    nan_frame = {"image": obs["image"].clone()}
    nan_frame["image"][1, 0, 0, 5, 5] = float("nan")
    nan = r"^NaN or inf values in"
    with pytest.raises(ValueError, match=rf"{nan} the observation's camera\(s\) \['image'\]: a faulty"):
        model.policy(nan_frame)
    with pytest.raises(ValueError, match=rf"{nan} the actions:"):
        model.forward_dynamics(obs, torch.full((2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=rf"{nan} the future frames:"):
        model.inverse_dynamics(obs, torch.full((2, 2, 1, 4, GRID, GRID), float("inf")))
    with pytest.raises(ValueError, match=r"latents are \(2, 2, 4, 8, 8\), expected \(B, F, V, 4, 8, 8\)"):
        model.decode(torch.rand(2, 2, 4, GRID, GRID))
    two = UWM(tiny_config(image_keys=("image", "wrist")), action_normalizer(), load_codec=False).eval()
    with pytest.raises(
        ValueError, match=r"the cameras' \(batch, steps\) differ: \{'image': \(2, 1\), 'wrist'"
    ):
        two.policy({"image": obs["image"], "wrist": torch.rand(1, 1, 3, 32, 32)})
    stats = {"state": compute_stats(np.random.default_rng(0).normal(size=(10, 3)))}
    norm = Normalizer(
        {"action": "minmax", "state": "minmax"}, {**action_normalizer().to_dict()["stats"], **stats}
    )
    with_proprio = UWM(tiny_config(proprio_key="state", proprio_dim=3), norm, load_codec=False).eval()
    with pytest.raises(
        ValueError, match=r"'state' is \(1, 1, 3\): expected \(B, T, 3\) with B = 2, the cameras' batch"
    ):
        with_proprio.policy({**obs, "state": torch.zeros(1, 1, 3)})
    with pytest.raises(ValueError, match=rf"{nan} proprioception 'state':"):
        with_proprio.policy({**obs, "state": torch.full((2, 1, 3), float("nan"))})
    with pytest.raises(
        ValueError,
        match=r"^model.horizon=4.5 is not a whole number; model.future\[0\]=1.5 is not a whole number$",
    ):
        tiny_config(horizon=4.5, future=(1.5, 2))
    # a NaN weight passed `video_weight < 0` and trained to "the loss is nan ...: lower trainer.lr"; a NaN
    # temporal_ensemble was refused only when the trained policy was loaded
    with pytest.raises(
        ValueError, match=r"^model.video_weight=nan is not a finite number; model.temporal_ensemble=inf is"
    ):
        tiny_config(video_weight=float("nan"), temporal_ensemble=float("inf"))


# ---------------------------------------------------------------------- through wm-train and the registry
TINY_UWM = [
    "model=uwm",
    "trainer.steps=3",
    "trainer.batch_size=4",
    "trainer.val_every=3",
    "model.horizon=4",
    "model.n_action_exec=2",
    "model.future=[2,4]",
    "model.net.dim=32",
    "model.net.depth=1",
    "model.net.heads=2",
    "+model.latent.steps=4",
    "+model.latent.batch_size=8",
]


@pytest.fixture(scope="module")
def uwm_run(tmp_path_factory):
    """A store of 32x32 frames with proprio, a UWM trained on it by wm-train (its autoencoder first)."""
    root = tmp_path_factory.mktemp("uwm")
    store = make_store(root / "demos.zarr", 6, seed=0)
    run = root / "run"
    res = cli("wm-train", *TINY_UWM, f"store={store}", f"out={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    return store, run, res.stdout


def make_store(
    path, n: int, seed: int, size: int = 32, actions: bool = True, proprio: bool = True, cameras=("image",)
):
    from wm.data.schema import KeySpec, Schema

    keys = {cam: KeySpec((size, size, 3), "uint8", "image") for cam in cameras}
    if proprio:
        keys["state"] = KeySpec((3,), "float32", "proprio")
    if actions:
        keys["action"] = KeySpec((2,), "float32", "action")
    store = DemoStore.create(path, Schema(keys=keys, fps=10, robot="test_bot", task="test_task"))
    rng = np.random.default_rng(seed)
    for i in range(n):
        T = 8 + i
        ep = {cam: rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8) for cam in cameras}
        if proprio:
            ep["state"] = rng.normal(size=(T, 3)).astype(np.float32)
        if actions:
            ep["action"] = rng.uniform(-1, 1, size=(T, 2)).astype(np.float32)
        store.append_episode(ep)
    store.close()
    return path


def test_wm_train_trains_its_autoencoder_first_and_the_registry_round_trips(uwm_run):
    from policies.base import Previewable
    from wm.registry import load_model

    store, run, stdout = uwm_run
    assert "autoencoder" in stdout
    loaded = load_model(str(run), controller="policy")
    model = loaded.model
    assert loaded.model_type == "uwm" and model.cfg.latent["source"] == "autoencoder"
    again = load_model(str(run), controller="policy").model
    obs = {"image": torch.rand(2, 2, 3, 32, 32), "state": torch.randn(2, 2, 3)}
    a = model.sample_actions(obs, torch.Generator().manual_seed(0))
    b = again.sample_actions(obs, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 2, 2)
    policy = loaded.policy()
    assert isinstance(policy, Previewable)
    raw = {"image": np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
           "state": np.zeros((2, 3), np.float32)}  # fmt: skip
    assert policy.select_action(raw).shape == (2, 2)
    frame = policy.preview()  # the model's predicted future, decoded
    assert frame.shape == (2, 32, 32, 3) and frame.dtype == np.uint8


def test_validation_returns_the_metrics_its_entry_declares(uwm_run, tmp_path):
    """wm-train checks trainer.best_metric against them before any work."""
    from wm.registry import model_entry
    from wm.training import setup_training

    store, _, _ = uwm_run
    opts = {"horizon": 4, "n_action_exec": 2, "future": [2, 4], "net": {"dim": 32, "depth": 1, "heads": 2},
            "latent": {"steps": 4, "batch_size": 8}}  # fmt: skip
    setup = setup_training("uwm", str(store), opts, seed=0, val_ratio=0.3, feature_cache="off")
    metrics = setup.val_fn(setup.model.eval(), 1, tmp_path)
    assert tuple(metrics) == model_entry("uwm").val_metrics


def test_co_training_with_an_action_free_video_store(uwm_run, tmp_path):
    store, run, _ = uwm_run
    videos = make_store(tmp_path / "videos.zarr", 4, seed=1, actions=False, proprio=False)
    out = tmp_path / "cotrain"
    res = cli(
        "wm-train", *TINY_UWM, f"store={store}", f"video_store={videos}", "video_ratio=0.5", f"out={out}"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing" in res.stdout  # the store's autoencoder, trained for uwm_run


def test_stores_that_do_not_fit_are_one_clear_error(uwm_run, tmp_path):
    store, _, _ = uwm_run
    other = make_store(tmp_path / "big.zarr", 2, seed=2, size=48, actions=False)
    res = run_app("wm-train", *TINY_UWM, f"store={store}", f"video_store={other}", f"out={tmp_path / 'x'}")
    assert res.returncode != 0 and "camera 'image' is (48, 48, 3)" in res.stderr
    res = run_app(
        "wm-train", "model=diffusion_unet", f"store={store}", f"video_store={other}", f"out={tmp_path / 'y'}"
    )
    assert res.returncode != 0 and "video_store= needs a model like uwm" in res.stderr
    no_actions = make_store(tmp_path / "videos.zarr", 2, seed=3, actions=False)
    res = run_app("wm-train", "model=diffusion_unet", f"store={no_actions}", f"out={tmp_path / 'z'}")
    assert res.returncode != 0 and "no 'action' key" in res.stderr


def test_the_initial_weights_follow_the_seed_whether_or_not_the_autoencoder_trained(tmp_path):
    """The first run on a store trains its default autoencoder (drawing from torch's generator), later
    ones reuse it: the same command with the same seed started from other weights."""
    from wm.training import setup_training

    store = make_store(tmp_path / "demos.zarr", 3, seed=0)
    opts = {"horizon": 4, "n_action_exec": 2, "future": [2, 4], "net": {"dim": 32, "depth": 1, "heads": 2},
            "latent": {"steps": 2, "batch_size": 4}}  # fmt: skip
    weights = []
    for _ in range(2):  # the first trains the autoencoder, the second reuses it
        torch.manual_seed(0)  # as wm-train does
        model = setup_training("uwm", str(store), opts, seed=0, feature_cache="off").model
        weights.append(torch.cat([p.detach().flatten() for p in model.net.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_a_video_store_with_actions_is_trained_on_as_video(tmp_path, monkeypatch):
    """Its actions (perhaps another robot's, in other units) were trained on, outside the normalizer's
    range; video_store= co-trains video. The two stores are checked against each other, and each store's
    windows, once (the checks ran twice)."""
    import wm.training
    from wm.training import setup_training

    calls: list[tuple[str, str, Any]] = []  # (check, store, what it is checked for)
    for name in ("check_compatible", "check_windows"):
        real = getattr(wm.training, name)
        monkeypatch.setattr(
            wm.training,
            name,
            lambda *a, _f=real, _n=name, **k: calls.append((_n, str(a[0]), a[1])) or _f(*a, **k),
        )
    store = make_store(tmp_path / "demos.zarr", 3, seed=0)
    videos = make_store(tmp_path / "more_demos.zarr", 3, seed=1)  # with actions
    opts = {"horizon": 4, "n_action_exec": 2, "future": [2, 4], "net": {"dim": 32, "depth": 1, "heads": 2},
            "latent": {"steps": 2, "batch_size": 4}}  # fmt: skip
    setup = setup_training("uwm", str(store), opts, seed=0, feature_cache="off", video_store=str(videos))
    batch = setup.train_set.get_batch(list(range(8)))  # labelled windows first, then video ones
    assert batch["has_action"].tolist() == [True] * 4 + [False] * 4
    spec = setup.model.window_spec()
    ae_spec = WindowSpec({"image": (0,)})  # the default autoencoder's, checked by its own setup
    assert [c for c in calls if c[2] != ae_spec] == [
        ("check_compatible", str(store), str(videos)),
        ("check_windows", str(store), spec),
        ("check_windows", str(videos), spec),
    ]


def test_action_free_episodes_all_train_and_only_labelled_ones_validate(tmp_path):
    """The split was drawn over every episode: a flagged (action-free) episode drawn for validation was
    neither validated on (no actions) nor trained on, validation vanished without a word when the draw
    held only flagged ones, and a store whose labelled episodes were all drawn was refused."""
    from wm.data.mixture import flag_action_free
    from wm.data.windows import split_episodes
    from wm.training import setup_training

    opts = {"horizon": 4, "n_action_exec": 2, "future": [2, 4], "net": {"dim": 32, "depth": 1, "heads": 2},
            "latent": {"steps": 2, "batch_size": 4}}  # fmt: skip
    assert split_episodes(10, 0.2, 0)[1] == [4, 6]  # the draw over all ten
    for name, labelled in (("some", [0, 1, 2, 3]), ("drawn", [4, 6])):
        path = make_store(tmp_path / f"{name}.zarr", 10, seed=0)
        flag_action_free(path, [e for e in range(10) if e not in labelled])
        setup = setup_training("uwm", str(path), opts, val_ratio=0.2, seed=0, feature_cache="off")
        assert set(setup.train_episodes) | set(setup.val_episodes) == set(range(10))
        assert setup.val_episodes and set(setup.val_episodes) <= set(labelled)
    assert setup.val_episodes == [4] and setup.train_episodes == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    path = make_store(tmp_path / "none.zarr", 3, seed=0)
    flag_action_free(path, [0, 1, 2])
    with pytest.raises(SchemaError, match=r"none.zarr: no episode has actions \(all are flagged"):
        setup_training("uwm", str(path), opts, seed=0, feature_cache="off")
    with DemoStore.create(tmp_path / "empty.zarr", DemoStore.open(path).schema):
        pass
    with pytest.raises(SchemaError, match=r"empty.zarr: the store has no episodes to train on"):
        setup_training("uwm", str(tmp_path / "empty.zarr"), opts, seed=0, feature_cache="off")
    two = make_store(tmp_path / "two.zarr", 3, seed=0, cameras=("image", "wrist"))
    with pytest.raises(  # trained on the list without a word; config.json said image_key=wrist
        ValueError, match=r"^image_key=wrist is not among the cameras model.image_keys=\['image'\] the model"
    ):
        setup_training("uwm", str(two), {**opts, "image_keys": ["image"]}, image_key="wrist", seed=0)


def test_in_memory_false_reaches_the_autoencoder_and_a_latent_path_is_asked_for(tmp_path, monkeypatch):
    """in_memory=false loaded every frame anyway while the default autoencoder trained (a large store
    ran out of memory); source=autoencoder without path= was a TypeError reported as a bug."""
    from wm.data import DemoStore
    from wm.training import setup_training

    store = make_store(tmp_path / "demos.zarr", 3, seed=0)
    loaded, load_all = [], DemoStore.load_all
    monkeypatch.setattr(DemoStore, "load_all", lambda self, keys: loaded.extend(keys) or load_all(self, keys))
    opts = {"horizon": 4, "n_action_exec": 2, "future": [2, 4], "net": {"dim": 32, "depth": 1, "heads": 2},
            "latent": {"steps": 2, "batch_size": 4}}  # fmt: skip
    setup_training("uwm", str(store), opts, seed=0, feature_cache="off", in_memory=False)
    assert loaded and "image" not in loaded
    with pytest.raises(ValueError, match=r"model.latent.source=autoencoder needs \+model.latent.path="):
        setup_training("uwm", str(store), {**opts, "latent": {"source": "autoencoder"}}, seed=0)
    with pytest.raises(ValueError, match="model.latent is a group of options, got 'sd_vae': give model.l"):
        setup_training("uwm", str(store), {**opts, "latent": "sd_vae"}, seed=0)  # an AttributeError
    other = make_store(tmp_path / "other.zarr", 2, seed=1)
    with pytest.raises(ValueError, match=r"model.image_size=\[64, 64\] is set from the store \(\[32, 32\]\)"):
        setup_training("uwm", str(other), {**opts, "image_size": [64, 64]}, seed=0)
    assert not list((tmp_path / "feature_cache" / "autoencoder").glob("other__*"))  # refused before it


def test_a_bad_config_or_window_is_refused_before_the_autoencoder_trains(tmp_path, monkeypatch):
    """A window no episode holds, or an invalid config, was refused only once the store's default
    autoencoder had trained (minutes on a real store)."""
    import wm.autoencoder
    from wm.training import setup_training

    def no_training(*args, **kwargs):
        raise AssertionError("the default autoencoder trained")

    monkeypatch.setattr(wm.autoencoder, "default_autoencoder", no_training)
    store = str(make_store(tmp_path / "demos.zarr", 3, seed=0))  # episodes of 8..10 steps
    opts = {"future": [2, 4], "net": {"dim": 32, "depth": 1, "heads": 2}, "latent": {"steps": 2}}
    with pytest.raises(
        ValueError,
        match=r"no windows to train on: .*demos.zarr: 3 episode\(s\) of 8..10 steps; a window spans 41 steps",
    ):
        setup_training("uwm", store, {**opts, "horizon": 40, "n_action_exec": 2})
    with pytest.raises(ValueError, match=r"n_action_exec 8 > horizon 4"):
        setup_training("uwm", store, {**opts, "horizon": 4, "n_action_exec": 8})
    bad_patch = {**opts, "horizon": 4, "n_action_exec": 2, "net": {**opts["net"], "patch": 3}}
    with pytest.raises(ValueError, match=r"UWM patch 3 does not divide the 8x8 latent grid"):  # 32 px / 4
        setup_training("uwm", store, bad_patch)
    assert not (tmp_path / "feature_cache").exists()


def test_an_autoencoder_trains_on_a_store_without_actions(tmp_path):
    from wm.autoencoder import default_autoencoder
    from wm.checkpoint import latest_checkpoint

    videos = make_store(tmp_path / "videos.zarr", 3, seed=4, actions=False, proprio=False)
    run = default_autoencoder(videos, steps=2, batch_size=4, log=lambda _: None)
    assert latest_checkpoint(run) is not None


def test_wm_train_with_two_cameras(tmp_path):
    """`model.image_keys=[image,wrist]`: one autoencoder trained on both cameras' frames, both cached,
    a history and a future of each; the controller reads both; stores that do not fit are one line."""
    from wm.registry import load_model

    cams = ("image", "wrist")
    store = make_store(tmp_path / "two.zarr", 4, seed=5, cameras=cams)
    run = tmp_path / "run"
    res = cli("wm-train", *TINY_UWM, "model.image_keys=[image,wrist]", f"store={store}", f"out={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "two.zarr:image+wrist" in res.stdout  # the default autoencoder of both cameras
    caches = [p.name for p in (tmp_path / "feature_cache").iterdir()]
    assert any(n.startswith("two__image+wrist__autoencoder__") for n in caches), caches
    loaded = load_model(str(run), controller="policy")
    model = loaded.model
    assert model.io_spec.image_keys == cams and model.codec.cfg.structure["image_keys"] == list(cams)
    n_patch = model.net.grid[0] * model.net.grid[1]
    assert model.net.frame_pos.shape[1] == 2 * 2 * n_patch  # 2 future frames x 2 cameras
    policy = loaded.policy()
    rng = np.random.default_rng(0)
    raw = {cam: rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for cam in cams}
    raw["state"] = np.zeros((2, 3), np.float32)
    assert policy.select_action(raw).shape == (2, 2)
    assert policy.preview().shape == (2, 32, 32, 3) and "(image)" in policy.preview_label

    one_camera = make_store(tmp_path / "videos.zarr", 2, seed=6, actions=False)
    res = run_app(
        "wm-train", *TINY_UWM, "model.image_keys=[image,wrist]", f"store={store}",
        f"video_store={one_camera}", f"out={tmp_path / 'x'}",
    )  # fmt: skip
    assert res.returncode != 0 and "has no camera 'wrist'" in res.stderr
    res = run_app(
        "wm-train", *TINY_UWM, "model.image_keys=[image,top]", f"store={store}", f"out={tmp_path / 'y'}"
    )
    assert res.returncode != 0 and "no camera(s) ['top']" in res.stderr


def test_recording_a_uwm_policys_preview_does_not_change_its_actions():
    """The preview (evaluation videos) samples forward dynamics with its own noise: the same seeds give
    the same actions with videos=0 and videos=N (it drew from the actions' generator)."""
    model = tiny_uwm().eval()
    with torch.no_grad():  # an untrained UWM outputs zeros: random weights make samples depend on noise
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(0)
    frames = [{"image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)} for _ in range(4)]

    def actions(preview: bool) -> torch.Tensor:
        policy = UWMPolicy(model, seed=0)
        policy.reset()
        out = []
        for obs in frames:
            out.append(policy.select_action(obs))
            if preview:
                policy.preview()  # what wm-eval's recorder does after each model call
        return torch.stack(out, 1)

    torch.testing.assert_close(actions(True), actions(False), rtol=0, atol=0)


def test_uwm_rows_do_not_depend_on_the_batch_in_one_call_per_chunk():
    """With the episodes named, each row draws from its own generator (the model takes one per row), so an
    episode's actions are the same alone or beside others, and a chunk is still one batched call."""
    model = tiny_uwm(n_obs=1, horizon=4, n_action_exec=2, future=(2,)).eval()
    with torch.no_grad():  # untrained, its zero-initialized output heads (DiT's) predict 0 for every row
        torch.manual_seed(1)  # whatever its noise: the rows differed only by the sampler's rounding
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    calls, sample = [], model.sample_actions
    model.sample_actions = lambda inputs, **kw: calls.append(len(inputs["image"])) or sample(inputs, **kw)
    frames = torch.rand(3, 1, 3, 32, 32)

    def episode(rows: list[int]) -> torch.Tensor:
        policy = UWMPolicy(model, seed=3)
        policy.reset()
        policy.start_episodes([10 + r for r in rows])
        image = (frames[rows, 0].permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()
        return torch.stack([policy.select_action({"image": image}) for _ in range(4)], 1)

    alone, batch = episode([2]), episode([0, 1, 2])
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[1], batch[2])
    assert calls == [1, 1, 3, 3]  # two chunks each run, every one a single call
