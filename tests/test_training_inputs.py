"""What `wm-train` refuses (or says) about its data before any work, mostly through `setup_training`:
keys of the wrong kind or shape, cameras that are not RGB, NaN or inf anywhere the model reads, a video
store at another frame rate, windows that fit no episode, a validation split without a window, and
non-finite optimizer settings. Each was once a traceback, a late misleading error or a silent wrong run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr
from apps import run_app

from wm.data import DemoStore, KeySpec, Schema, SchemaError
from wm.data.windows import WindowSpec, split_episodes
from wm.optim import TrainerConfig
from wm.training import check_windows, data_keys, setup_training

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)

TINY = {  # tests/apps.py TINY_WM with configs/model/dino_wm.yaml's window: 1 frame of history, 5 steps apart
    "type": "dino_wm",
    "n_hist": 1,
    "frameskip": 5,
    "rollout_loss_steps": 1,
    "encoder": {"name": "cnn", "cnn_channels": [8, 16], "cnn_stride": 4, "cnn_dim": 16},
    "predictor_dim": 32,
    "predictor_depth": 1,
    "predictor_heads": 2,
    "predictor_head_dim": 16,
    "predictor_mlp_dim": 32,
    "decoder_channels": [16, 8],
    "recon_channels": [16, 8],
}
POLICY = {"type": "diffusion_unet"}  # refused before its options are looked at


def write_store(path, lengths, *, cameras=None, state=(4,), action=(2,), fps=10.0, seed=0):
    """A store of episodes of `lengths`: `cameras` {name: (H, W, C)} uint8 (one 32x32 RGB 'img' by
    default), float32 'state' (proprio) and 'action' of the per-step shapes given (None: no such key)."""
    cameras = cameras or {"img": (32, 32, 3)}
    keys = {k: KeySpec(s, "uint8", "image") for k, s in cameras.items()}
    if state is not None:
        keys["state"] = KeySpec(state, "float32", "proprio")
    if action is not None:
        keys["action"] = KeySpec(action, "float32", "action")
    rng = np.random.default_rng(seed)
    with DemoStore.create(path, Schema(keys=keys, fps=fps)) as store:
        for n in lengths:
            ep = {k: rng.integers(0, 256, (n, *s), dtype=np.uint8) for k, s in cameras.items()}
            ep |= {
                k: rng.normal(size=(n, *keys[k].shape)).astype(np.float32)
                for k in ("state", "action")
                if k in keys
            }
            store.append_episode(ep)
    return str(path)


def poke(path, key, episode, step, value) -> None:
    """Write `value` at `step` of `episode` of data/<key> through zarr itself: an old or foreign store,
    which the writer's check of actions and proprio never saw."""
    with DemoStore.open(path) as store:
        row = store.episode_slice(episode).start + step
    arr = zarr.open_group(path, mode="r+")["data"][key]
    values = arr[row]
    values[0] = value
    arr[row] = values


def test_a_validation_split_without_windows_is_said_and_not_run(tmp_path, capsys):
    """Held-out episodes shorter than a validation window (DINO-WM validates 3 steps further than it
    trains) gave no validation at all, silently, and the run's last line blamed val_ratio=0 or too few
    episodes; those episodes were not trained on either."""
    store = write_store(tmp_path / "short.zarr", [12] * 8)
    val = split_episodes(8, 0.1, 0)[1]
    setup = setup_training("dino_wm", store, TINY, val_ratio=0.1)
    assert setup.val_episodes == val and setup.val_fn is None
    err = capsys.readouterr().err
    assert (
        f"note: {store}: no validation will run: validation episode(s) {val[0]} (12 steps) are too short: "
        "a validation window spans 16 steps (at most 0 padded before, at most 0 padded after), so an episode "
        "needs at least 16; they are neither trained nor validated on (val_ratio=0 trains on every episode)"
    ) in err
    # some held-out episodes long enough: validation runs on them, and the short ones are named
    short, long = split_episodes(8, 0.25, 0)[1]
    lengths = [40] * 8
    lengths[short] = 12
    mixed = write_store(tmp_path / "mixed.zarr", lengths)
    setup = setup_training("dino_wm", mixed, TINY, val_ratio=0.25)
    err = capsys.readouterr().err
    assert setup.val_fn is not None and len(setup.val_fn.val_set) > 0
    assert f"note: {mixed}: validation episode(s) {short} (12 steps) are too short" in err
    assert "no validation will run" not in err and f" {long} (" not in err
    setup_training("dino_wm", write_store(tmp_path / "long.zarr", [40] * 8), TINY, val_ratio=0.1)
    assert "note:" not in capsys.readouterr().err
    # a training episode too short for a window was left out without a word
    lengths, train = [40] * 8, split_episodes(8, 0.1, 0)[0][0]
    lengths[train] = 3
    one_short = write_store(tmp_path / "one_short.zarr", lengths)
    setup_training("dino_wm", one_short, TINY, val_ratio=0.1)
    err = capsys.readouterr().err
    assert f"note: {one_short}: training episode(s) {train} (3 steps) are too short to train on: a " in err
    assert "validation episode(s)" not in err


def test_non_finite_values_are_refused_wherever_the_model_reads_them(tmp_path):
    """Only the episodes the normalizer was fitted on were checked: a NaN action in the validation episode
    made NaN validation metrics (exit 0), one in a video store's proprio 'training diverged'."""
    val = split_episodes(6, 0.1, 0)[1][0]
    for key, value in (("action", np.nan), ("state", np.inf)):
        store = write_store(tmp_path / f"{key}.zarr", [40] * 6)
        poke(store, key, val, 10, value)
        for model in (TINY, {"type": "diffusion_unet"}):
            with pytest.raises(
                ValueError,
                match=rf"{key}.zarr: key '{key}' holds a non-finite value in episode {val}, step 10;",
            ):
                setup_training(model["type"], store, model, val_ratio=0.1)
    labelled = write_store(tmp_path / "demos.zarr", [12] * 4)
    video = write_store(tmp_path / "video.zarr", [12] * 3, action=None, seed=1)
    poke(video, "state", 2, 5, np.nan)
    with pytest.raises(
        ValueError, match=r"video.zarr: key 'state' holds a non-finite value in episode 2, step 5"
    ):
        setup_training("uwm", labelled, {"type": "uwm"}, video_store=video)  # before its autoencoder trains


def test_image_and_proprio_keys_must_be_of_their_kind(tmp_path):
    """They were checked for presence only: image_key=state and proprio_key=action ended in tracebacks
    (dino_wm), and a diffusion policy with proprio_key=action trained on its own action targets."""
    store = write_store(tmp_path / "s.zarr", [40] * 4)
    cases = {
        "image_key": ("state", r"image_key=state is a proprio key, not a camera \(image keys: \['img'\]\)"),
        "proprio_key": ("action", r"proprio_key=action is an action key: the model would be fed the actions"),
    }
    for arg, (key, message) in cases.items():
        for model in (TINY, POLICY):
            with pytest.raises(SchemaError, match=rf"s.zarr: {message}"):
                setup_training(model["type"], store, model, **{arg: key})
    with pytest.raises(
        SchemaError, match=r"s.zarr: proprio_key=img is a camera; choose a proprioception key"
    ):
        setup_training("dino_wm", store, TINY, proprio_key="img")
    listed = {"type": "diffusion_unet", "obs": {"image_keys": ["img", "state"]}}  # named by the option
    with pytest.raises(
        SchemaError, match=r"s.zarr: model.obs.image_keys=state is a proprio key, not a camera"
    ):
        setup_training("diffusion_unet", store, listed)
    with DemoStore.open(store) as s:
        assert data_keys(s, "img", "state") == data_keys(s, None, None) == ("img", "state")


def test_action_and_proprio_of_more_than_one_dim_a_step_are_refused(tmp_path):
    """The models are sized by prod(shape) but were fed the key unflattened: an einops traceback
    (dino_wm), or a refusal after the run had started."""
    for key, shape, flat in (("action", "2, 3", 6), ("state", "2, 2", 4)):
        store = write_store(tmp_path / f"{key}.zarr", [40] * 4, **{key: tuple(map(int, shape.split(",")))})
        for model in (TINY, POLICY):
            message = rf"{key}.zarr: key '{key}' is \({shape}\) a step; .* store it as \({flat},\)"
            with pytest.raises(SchemaError, match=message):
                setup_training(model["type"], store, model)


def test_cameras_that_are_not_rgb_are_refused_before_any_work(tmp_path):
    """A grayscale or RGBA camera was refused only after the run directory was written, by a message that
    named no store or key and blamed a conversion the user never made."""
    for channels in (1, 4):
        store = write_store(tmp_path / f"c{channels}.zarr", [40] * 4, cameras={"cam": (32, 32, channels)})
        for model in (TINY, POLICY):
            message = (
                rf"c{channels}.zarr: camera 'cam' has {channels} channel\(s\) .*the models take 3-channel"
            )
            with pytest.raises(SchemaError, match=message):
                setup_training(model["type"], store, model)
    two = write_store(tmp_path / "two.zarr", [40] * 4, cameras={"rgb": (32, 32, 3), "depth": (32, 32, 1)})
    with pytest.raises(SchemaError, match=r"two.zarr: camera 'depth' has 1 channel"):  # a camera listed
        setup_training(
            "diffusion_unet", two, {"type": "diffusion_unet", "obs": {"image_keys": ["rgb", "depth"]}}
        )
    out = tmp_path / "run"
    res = run_app(
        "wm-train", "model=dino_wm", f"store={tmp_path / 'c1.zarr'}", f"out={out}", "trainer.device=cpu"
    )
    assert res.returncode == 2 and not out.exists()
    assert res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'c1.zarr'}: camera 'cam' has 1 channel(s) (frames (32, 32, 1)); the models take "
        "3-channel RGB frames (H, W, 3): convert it to RGB, or choose another camera"
    ]


def test_a_video_store_at_another_frame_rate_is_refused(tmp_path):
    labelled = write_store(tmp_path / "demos.zarr", [12] * 4)
    video = write_store(tmp_path / "fast.zarr", [12] * 3, action=None, fps=30, seed=1)
    with pytest.raises(SchemaError, match=r"fast.zarr: recorded at 30 fps but .*demos.zarr at 10 fps"):
        setup_training("uwm", labelled, {"type": "uwm"}, video_store=video)  # before its autoencoder trains


def test_windows_are_checked_before_the_model_is_built(tmp_path, monkeypatch):
    """model.frameskip=1e9 allocated a (10, 2e9) action embedding (a traceback) before the windows were
    checked; a frameskip the episodes cannot hold is refused from the config alone. They are checked
    once (they were checked from the config, then again from the model built)."""
    import wm.training
    from wm.dino_wm import DinoWorldModel

    checked, real = [], wm.training.check_windows
    monkeypatch.setattr(wm.training, "check_windows", lambda *a: checked.append(a[2]) or real(*a))
    fits = write_store(tmp_path / "fits.zarr", [40] * 4)
    setup = setup_training("dino_wm", fits, TINY, val_ratio=0.25)
    assert checked == [setup.train_episodes]

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(DinoWorldModel, "__init__", no_build)
    store = write_store(tmp_path / "s.zarr", [40] * 4)
    with pytest.raises(
        ValueError, match=r"model.frameskip=1000000000 is not shorter than its longest episode \(40"
    ):
        setup_training("dino_wm", store, TINY | {"frameskip": 10**9})
    with pytest.raises(
        ValueError,
        match=r"no windows to train on: .*s.zarr: 3 episode\(s\) of 40..40 steps; a window spans 121 steps "
        r"\(at most 30 padded before, at most 30 padded after\), so an episode needs at least 61",
    ):  # (a history of 2 frames may start one frame before an episode)
        options = {"n_hist": 2, "frameskip": 30, "rollout_loss_steps": 2}
        setup_training("dino_wm", store, TINY | options, val_ratio=0.25)
    spec = WindowSpec({"img": (0, 10)}, max_pad_after=0)
    with pytest.raises(
        ValueError, match=r"video_ratio is 0.5 but the video store has no windows: .*s.zarr: 4 "
    ):
        check_windows(
            store,
            WindowSpec({"img": (0, 40)}, max_pad_after=0),
            None,
            "video_ratio is 0.5 but the video store",
        )
    check_windows(store, spec, [0])


def test_non_finite_learning_rate_and_weight_decay_are_refused(tmp_path):
    """lr=inf and weight_decay=inf were accepted: the run started and stopped at its first log step with
    'training diverged; lower trainer.lr'."""
    for name in ("lr", "weight_decay"):
        for value in (math.inf, math.nan):
            with pytest.raises(ValueError, match=rf"^trainer.{name}={value} is not a finite number$"):
                TrainerConfig(**{name: value})
    out = tmp_path / "run"
    res = run_app("wm-train", "model=dino_wm", "store=missing.zarr", f"out={out}", "trainer.weight_decay=inf")
    assert res.returncode == 2 and not out.exists()
    assert res.stderr.strip() == "error: trainer.weight_decay=inf is not a finite number"


def test_a_feature_cache_that_cannot_be_written_says_how_to_train_without_it(tmp_path, monkeypatch):
    """A store in a read-only folder: a bare "[Errno 30] Read-only file system: '.../feature_cache'"."""
    import errno

    import torch

    import wm.feature_cache
    from wm.training import cached_features

    def refused(store, encoder, keys, root, device="cpu"):
        raise OSError(errno.EROFS, "Read-only file system", str(root))

    monkeypatch.setattr(wm.feature_cache, "build_feature_cache", refused)
    with pytest.raises(OSError) as e:
        cached_features(str(tmp_path / "s.zarr"), torch.nn.Linear(1, 1), "rgb")
    assert e.value.errno == errno.EROFS and str(e.value) == (
        f"cannot write the feature cache in {tmp_path / 'feature_cache'} (Read-only file system): train with "
        "feature_cache=off (the encoder then runs on every batch), or from a copy of the store in a writable "
        "folder"
    )


def test_no_training_windows_says_when_the_held_out_episodes_have_them(tmp_path):
    """Four imported episodes of 5, 1, 30 and 1 steps: the one long enough was drawn for validation, and
    the error named only the three short ones, not the way on."""
    val = split_episodes(4, 0.1, 0)[1]
    lengths = [3] * 4
    lengths[val[0]] = 40
    store = write_store(tmp_path / "short.zarr", lengths)
    with pytest.raises(ValueError) as e:
        setup_training("dino_wm", store, TINY, val_ratio=0.1)
    assert str(e.value).startswith(f"no windows to train on: {store}: 3 episode(s) of 3..3 steps;")
    assert str(e.value).endswith(
        f"; held out for validation, episode(s) {val} would give some: val_ratio=0 trains on every episode"
    )


def test_a_video_store_of_the_training_stores_name_in_its_folder_is_refused_before_its_cache(tmp_path):
    """demo.zarr and demo.zip (or demo) in one folder share their feature caches' names: the video store's
    cache replaced the training store's, and validation read the video store's features."""
    from wm.training import _check_separate_caches

    (tmp_path / "other").mkdir()
    for video in ("demo.zip", "demo"):
        with pytest.raises(
            ValueError, match=rf"video_store=.*{video} would share feature caches in .*rename"
        ):
            _check_separate_caches(str(tmp_path / "demo.zarr"), str(tmp_path / video))
    _check_separate_caches(
        str(tmp_path / "demo.zarr"), str(tmp_path / "other" / "demo.zarr")
    )  # another folder
    _check_separate_caches(str(tmp_path / "demo.zarr"), str(tmp_path / "video.zarr"))


@pytest.mark.parametrize("value", ["on", True, "of"])
def test_setup_training_refuses_a_feature_cache_setting_it_does_not_know(tmp_path, value):
    """Anything but "auto" was read as off (wm-train's command line refuses them already)."""
    store = write_store(tmp_path / "demos.zarr", [12] * 4)
    with pytest.raises(ValueError, match=rf"feature_cache must be 'auto' or 'off', got {value!r}"):
        setup_training("dino_wm", store, TINY, feature_cache=value)
