"""The latent sources of UWM: the small KL-autoencoder trained on a store (through the registry, the
trainer and `wm-train`), the frozen `LatentCodec` over it, over a diffusers AutoencoderKL written by the
test itself, and over a patch encoder; the feature cache built with a codec; one-line errors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from apps import BIN

from wm.autoencoder import Autoencoder, AutoencoderConfig, default_autoencoder
from wm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from wm.data import DemoStore, KeySpec, Schema
from wm.encoders import EncoderConfig, build_encoder
from wm.feature_cache import build_feature_cache, cache_info
from wm.latents import LatentConfig, LatentSourceError, build_codec, latent_config_from_source
from wm.registry import ModelEntry, load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)

SIZE = 32
TINY = {"channels": [8, 16], "patch": 2}  # 32x32 frames -> 4 x 8 x 8 latents


def square_frames(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8: a plain background of a random colour, a coloured square at a random place."""
    frames = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = rng.integers(40, 200, 3)
        r, c = rng.integers(0, SIZE - 8, 2)
        frames[i, r : r + 8, c : c + 8] = rng.integers(0, 256, 3)
    return frames


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """5 episodes of 24 steps: 32x32 frames of squares, 2-d proprio and actions."""
    path = tmp_path_factory.mktemp("ae") / "squares.zarr"
    schema = Schema(
        keys={
            "img": KeySpec((SIZE, SIZE, 3), "uint8", "image"),
            "state": KeySpec((2,), "float32", "proprio"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=10,
    )
    rng = np.random.default_rng(0)
    with DemoStore.create(path, schema) as demo:
        for _ in range(5):
            demo.append_episode(
                {
                    "img": square_frames(rng, 24),
                    "state": rng.normal(size=(24, 2)).astype(np.float32),
                    "action": rng.normal(size=(24, 2)).astype(np.float32),
                }
            )
    return path


@pytest.fixture(scope="module")
def frames(store) -> torch.Tensor:
    with DemoStore.open(store) as s:
        x = s.read("img", slice(0, s.n_steps))
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)


@pytest.fixture(scope="module")
def trained(store) -> tuple[Path, list[str]]:
    """The store's default autoencoder, tiny, trained for 300 steps."""
    said: list[str] = []
    run = default_autoencoder(
        store, "img", options=TINY, steps=300, batch_size=16, device="cpu", log=said.append
    )
    return run, said


def mse(model: Autoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.decode(model.encode_mean(x)) - x).square().mean())


# ---------------------------------------------------------------------- the autoencoder
def test_training_reconstructs_far_better_than_untrained(trained, store, frames):
    run, said = trained
    assert run.parent == store.parent / "feature_cache" / "autoencoder"
    assert run.name.startswith("squares__img__") and "training the default autoencoder" in said[0]
    model = load_model(str(run)).model
    torch.manual_seed(0)
    untrained = Autoencoder(AutoencoderConfig(image_keys=("img",), image_size=(SIZE, SIZE), **TINY)).eval()
    before, after = mse(untrained, frames), mse(model, frames)
    assert after < 0.25 * before, (before, after)
    assert (run / "val").is_dir() and list((run / "val").glob("recon_*.png"))  # the validation strip


def test_encode_mean_is_deterministic_and_latents_about_unit_std(trained, frames):
    run, _ = trained
    model = load_model(str(run)).model
    z1, z2 = model.encode_mean(frames), model.encode_mean(frames)
    assert torch.equal(z1, z2) and z1.shape == (len(frames), 4, 8, 8)
    codec = build_codec(latent_config_from_source("autoencoder", run))
    z = codec.encode(frames)
    assert torch.allclose(z, z1 * model.latent_scale)
    assert 0.7 < float(z.std()) < 1.4, float(z.std())


def test_default_autoencoder_reuses_a_finished_run(trained, store):
    run, _ = trained
    ckpt = latest_checkpoint(run)
    files = sorted(p.name for p in run.iterdir())
    mtime = ckpt.stat().st_mtime_ns
    said: list[str] = []
    again = default_autoencoder(store, "img", options=TINY, steps=300, batch_size=16, log=said.append)
    assert again == run and said == [f"autoencoder: reusing {run}"]
    assert ckpt.stat().st_mtime_ns == mtime and sorted(p.name for p in run.iterdir()) == files
    # other settings are another run, beside it
    other = default_autoencoder(store, "img", options=TINY, steps=2, batch_size=16, log=said.append)
    assert other != run and other.parent == run.parent and load_checkpoint(other)["step"] == 2


def test_the_autoencoder_follows_the_frames_not_the_episode_info(tmp_path):
    """Flagging an episode action-free (info only) retrained it (minutes, and a new latent space for
    every later run); frames rewritten in place with the same lengths and info reused the stale one."""
    from wm.data.mixture import flag_action_free

    def write(seed: int) -> Path:
        schema = Schema(keys={"img": KeySpec((SIZE, SIZE, 3), "uint8", "image")}, fps=10)
        rng = np.random.default_rng(seed)
        with DemoStore.create(tmp_path / "s.zarr", schema, overwrite=True) as demo:
            for _ in range(2):
                demo.append_episode({"img": square_frames(rng, 6)})
        return tmp_path / "s.zarr"

    def run_dir(path: Path) -> Path:
        return default_autoencoder(path, "img", options=TINY, steps=1, batch_size=4, log=lambda _: None)

    first = run_dir(write(0))
    flag_action_free(tmp_path / "s.zarr", [1])
    assert run_dir(tmp_path / "s.zarr") == first
    assert run_dir(write(1)) != first  # new frames, same lengths and info


def test_wm_train_trains_it_and_the_registry_round_trips(store, frames, tmp_path):
    out = tmp_path / "ae"
    args = [f"store={store}", f"out={out}", "model=autoencoder", "model.channels=[8,16]", "model.blocks=0"]
    args += ["trainer.steps=3", "trainer.batch_size=8", "trainer.val_every=3"]
    res = subprocess.run([str(BIN / "wm-train"), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "val_recon_mse=" in res.stderr
    # it serves no controller: the run says how the model that uses it is given it, not wm-eval, with the
    # store it learned (the hint without store= failed as given: "store is missing")
    use = (
        f"use it: wm-train store={store.resolve()} model=uwm model.latent.source=autoencoder "
        f"+model.latent.path={out / 'best.pt'} out=DIR)"
    )
    assert use in res.stdout and "wm-eval" not in res.stdout
    loaded = load_model(str(out))
    assert loaded.model_type == "autoencoder" and loaded.config["image_size"] == [SIZE, SIZE]
    ckpt = load_checkpoint(out)
    again = Autoencoder(AutoencoderConfig.from_dict(ckpt["model_config"]))
    again.load_state_dict(ckpt["ema_state_dict"])
    x = frames[:4]
    assert torch.equal(loaded.model.encode_mean(x), again.eval().encode_mean(x))
    with pytest.raises(CheckpointError, match="cannot serve controller=mpc"):
        load_model(str(out), controller="mpc")
    with pytest.raises(CheckpointError, match="serves no controller"):
        loaded.policy()


def test_model_entries_may_serve_no_controller_but_no_unknown_one():
    kw = dict(config_type=AutoencoderConfig, build=Autoencoder, configure=lambda o, c: o)
    assert ModelEntry(controllers=(), **kw).controllers == ()
    with pytest.raises(ValueError, match="controllers must be among"):
        ModelEntry(controllers=("teleport",), **kw)


# ---------------------------------------------------------------------- codecs and the feature cache
def test_feature_cache_of_a_codec_holds_its_latent_tokens(trained, store, frames, tmp_path):
    codec = build_codec(latent_config_from_source("autoencoder", trained[0]))
    path = build_feature_cache(store, codec, "img", tmp_path / "cache")
    info = cache_info(path)
    assert info["encoder"] == "autoencoder" and info["grid"] == [8, 8] and info["dim"] == 4
    with DemoStore.open(path) as cache:
        tokens = torch.from_numpy(cache.read("img", slice(0, cache.n_steps)).astype(np.float32))
    assert tokens.shape == (len(frames), 64, 4)  # (T, h' * w', C)
    expected = codec(frames)
    assert torch.allclose(tokens, expected, atol=2e-3 * float(expected.abs().max()))
    decoded = codec.model.decode(codec.model.encode_mean(frames[:2]))
    assert torch.allclose(codec.decode(codec.encode(frames[:2])), decoded, atol=1e-5)


def test_rebuilt_codec_needs_no_source_files(trained, frames):
    cfg = latent_config_from_source("autoencoder", trained[0])
    codec = build_codec(cfg)
    again = build_codec(LatentConfig.from_dict(cfg.to_dict()), load_weights=False)
    assert codec.weights_hash() != again.weights_hash()
    again.load_state_dict(codec.state_dict())
    assert codec.weights_hash() == again.weights_hash()
    assert torch.equal(codec(frames[:3]), again(frames[:3]))
    assert not any(p.requires_grad for p in again.parameters())
    again.train()
    assert not again.training  # frozen: stays in eval mode


@pytest.fixture(scope="module")
def sd_vae_dir(tmp_path_factory) -> Path:
    """A tiny diffusers AutoencoderKL written with save_pretrained (downsampling by 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_sd_vae_codec_is_the_diffusers_posterior_mean_times_the_scaling_factor(sd_vae_dir, frames):
    from diffusers import AutoencoderKL

    cfg = latent_config_from_source("sd_vae", sd_vae_dir)
    codec = build_codec(cfg)
    assert (codec.name, codec.dim, codec.can_decode) == ("sd_vae", 4, True)
    assert codec.latent_shape(SIZE, SIZE) == (4, 16, 16)
    x = frames[:3]
    z = codec.encode(x)
    vae = AutoencoderKL.from_pretrained(sd_vae_dir).eval()
    with torch.no_grad():
        expected = vae.encode(x * 2 - 1).latent_dist.mean * 0.5
    assert z.shape == (3, 4, 16, 16) and torch.allclose(z, expected, atol=1e-6)
    assert codec(x).shape == (3, 256, 4)
    y = codec.decode(z)
    assert y.shape == (3, 3, SIZE, SIZE) and 0 <= float(y.min()) and float(y.max()) <= 1
    again = build_codec(LatentConfig.from_dict(cfg.to_dict()), load_weights=False)
    again.load_state_dict(codec.state_dict())
    assert torch.equal(again.encode(x), z) and torch.equal(again.decode(z), y)
    with pytest.raises(ValueError, match="frames are 31x32; both sides must be multiples of 2"):
        codec.encode(torch.rand(1, 3, 31, SIZE))


def test_sd_vae_scaling_and_shift_are_part_of_the_feature_cache_key(sd_vae_dir, tmp_path):
    """They come from config.json, not the weights: a corrected scaling_factor trained on the latents
    the feature cache held from the old one (off by its ratio), while inference used the new one."""
    import json
    import shutil

    codecs = {}
    for scaling, shift in ((0.5, None), (0.13025, None), (0.5, 0.1)):
        folder = tmp_path / f"vae_{scaling}_{shift}"
        shutil.copytree(sd_vae_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(
            json.dumps(config | {"scaling_factor": scaling, "shift_factor": shift})
        )
        codecs[scaling, shift] = build_codec(latent_config_from_source("sd_vae", folder)).weights_hash()
    assert len(set(codecs.values())) == 3
    again = build_codec(latent_config_from_source("sd_vae", tmp_path / "vae_0.5_None")).weights_hash()
    assert again == codecs[0.5, None]


def test_sd_vae_latents_mean_and_std_apply_per_channel(sd_vae_dir, frames, tmp_path):
    """An AutoencoderKL config with latents_mean / latents_std (Playground v2.5's VAE): diffusers'
    pipelines take (mean - latents_mean) * scaling / latents_std; the codec ignored them (latents of
    another offset and spread), and they were not in the feature cache's key."""
    import json
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path / "vae_mean_std"
    shutil.copytree(sd_vae_dir, folder)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 4.0]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"latents_mean": mean, "latents_std": std}))
    codec, plain = (build_codec(latent_config_from_source("sd_vae", p)) for p in (folder, sd_vae_dir))
    x = frames[:2]
    vae = AutoencoderKL.from_pretrained(sd_vae_dir).eval()
    with torch.no_grad():
        posterior = vae.encode(x * 2 - 1).latent_dist.mean
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    z = codec.encode(x)
    assert torch.allclose(z, (posterior - m) * 0.5 / s, atol=1e-6)
    assert torch.allclose(codec.decode(z), plain.decode(plain.encode(x)), atol=1e-5)
    assert codec.weights_hash() != plain.weights_hash()


def test_sd_vae_weights_that_lack_tensors_are_refused(sd_vae_dir, tmp_path):
    """diffusers only logs the weights a file lacks and leaves them on the meta device: the codec built,
    and the feature cache failed with "Cannot copy out of meta tensor" (a bug's traceback)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(sd_vae_dir, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    dropped = sorted(k for k in state if k.startswith("decoder."))
    save_file({k: v for k, v in state.items() if k not in dropped}, weights)
    with pytest.raises(
        LatentSourceError,
        match=rf"the weights in {folder} do not fit its AutoencoderKL \({len(dropped)} missing \(the first "
        rf"'{re.escape(dropped[0])}'\)\): a partial file",
    ):
        build_codec(latent_config_from_source("sd_vae", folder))


def test_sd_vae_without_diffusers_is_one_line(sd_vae_dir, monkeypatch):
    cfg = latent_config_from_source("sd_vae", sd_vae_dir)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing it raises ImportError
    with pytest.raises(LatentSourceError, match=r"needs diffusers: pip install diffusers"):
        build_codec(cfg)


def test_encoder_codec_gives_patch_features_and_cannot_decode(tmp_path, frames):
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(name="cnn", cnn_channels=(8, 8), cnn_stride=4, cnn_dim=6))
    weights = tmp_path / "cnn.pt"
    torch.save(enc.state_dict(), weights)
    cfg = latent_config_from_source(
        "encoder", weights, name="cnn", cnn_channels=[8, 8], cnn_stride=4, cnn_dim=6
    )
    codec = build_codec(cfg)
    assert (codec.name, codec.dim, codec.latent_shape(SIZE, SIZE)) == ("cnn", 6, (6, 8, 8))
    assert torch.allclose(codec(frames[:2]), enc(frames[:2]))
    assert codec.encode(frames[:2]).shape == (2, 6, 8, 8)
    again = build_codec(LatentConfig.from_dict(cfg.to_dict()), load_weights=False)
    again.load_state_dict(codec.state_dict())
    assert torch.equal(again(frames[:2]), codec(frames[:2]))
    with pytest.raises(ValueError, match="cannot decode"):
        codec.decode(torch.zeros(1, 6, 8, 8))


def test_bad_sources_and_sizes_are_one_line_errors(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = latent_config_from_source("autoencoder", trained[0])
    moved = LatentConfig("autoencoder", str(tmp_path / "moved"), cfg.structure)
    codec = build_codec(cfg)
    cases = [
        (
            lambda: latent_config_from_source("autoencoder", tmp_path / "nowhere"),
            LatentSourceError,
            "nowhere does not exist",
        ),
        (
            lambda: latent_config_from_source("sd_vae", tmp_path / "empty"),
            LatentSourceError,
            "has no config.json",
        ),
        (lambda: latent_config_from_source("jpeg", tmp_path), ValueError, "is not one of"),
        (
            lambda: latent_config_from_source("encoder", cfg.path, name="cnn", depth=3),
            ValueError,
            r"\['depth'\]",
        ),
        (
            lambda: LatentConfig.from_dict({"source": "sd_vae", "path": str(tmp_path)}),
            ValueError,
            "no structure",
        ),
        (lambda: build_codec(moved), LatentSourceError, "moved does not exist"),
        (
            lambda: codec.encode(torch.rand(1, 3, 64, 64)),
            ValueError,
            "frames are 64x64, it was trained on 32x32",
        ),
        (lambda: AutoencoderConfig(blocks=1.5), ValueError, r"^model.blocks=1.5 is not a whole number$"),
    ]
    for fn, kind, match in cases:
        with pytest.raises(kind, match=match) as e:
            fn()
        assert "\n" not in str(e.value)
    assert build_codec(moved, load_weights=False).latent_shape(SIZE, SIZE) == (4, 8, 8)  # no files needed


@pytest.mark.parametrize(
    "options, said",
    [
        ({"channels": "32"}, r"^model.channels='32' is not a list of whole numbers$"),  # was (3, 2)
        ({"channels": 32}, r"^model.channels=32 is not a list of whole numbers$"),  # was a TypeError
        ({"image_size": 64}, r"^model.image_size=64 is not a list of whole numbers$"),
        ({"image_keys": 5}, r"^model.image_keys=5 is not a camera name or a list of camera names$"),
        ({"image_keys": ["img", 5]}, r"is not a camera name or a list of camera names$"),  # was kept
        ({"image_keys": ["img", ""]}, r"^model.image_keys=\['img', ''\] holds an empty camera name$"),
        ({"kl_weight": math.inf}, r"^model.kl_weight=inf is not a finite number$"),  # inf at step 1
        ({"foreground_weight": math.inf}, r"^model.foreground_weight=inf is not a finite number$"),
    ],
)
def test_autoencoder_options_of_the_wrong_kind_are_one_line_errors(options, said):
    with pytest.raises(ValueError, match=said) as e:
        AutoencoderConfig.from_dict(options)
    assert "\n" not in str(e.value)
    ok = AutoencoderConfig.from_dict({"image_keys": "img", "channels": [16, 32]})  # still taken
    assert ok.image_keys == ("img",) and ok.channels == (16, 32)


def test_feature_cache_of_two_cameras(trained, tmp_path):
    """One codec encodes every camera listed into one cache; it is reused, and its name lists them."""
    codec = build_codec(latent_config_from_source("autoencoder", trained[0]))
    path = tmp_path / "two.zarr"
    rng = np.random.default_rng(3)
    cams = {
        "top": KeySpec((SIZE, SIZE, 3), "uint8", "image"),
        "wrist": KeySpec((SIZE, SIZE, 3), "uint8", "image"),
    }
    small = KeySpec((16, 16, 3), "uint8", "image")
    schema = Schema(keys={**cams, "side": small, "action": KeySpec((2,), "float32", "action")}, fps=10)
    with DemoStore.create(path, schema) as demo:
        for T in (6, 9):
            ep = {k: square_frames(rng, T) for k in cams}
            demo.append_episode(
                ep | {"side": np.zeros((T, 16, 16, 3), np.uint8), "action": np.zeros((T, 2), np.float32)}
            )
    cache = build_feature_cache(path, codec, ["top", "wrist"], tmp_path / "cache")
    assert cache.name.startswith("two__top+wrist__autoencoder__")
    assert cache_info(cache)["image_keys"] == ["top", "wrist"]
    with DemoStore.open(path) as src, DemoStore.open(cache) as c:
        assert set(c.keys) == {"top", "wrist", "action"}  # the camera not listed is not copied
        for cam in cams:
            x = torch.from_numpy(src.read(cam, slice(0, 15))).permute(0, 3, 1, 2).float() / 255
            tokens = torch.from_numpy(c.read(cam, slice(0, 15)).astype(np.float32))
            expected = codec(x)
            assert torch.allclose(tokens, expected, atol=2e-3 * float(expected.abs().max()))
    stamp = (cache / "zarr.json").stat().st_mtime_ns
    assert build_feature_cache(path, codec, ("top", "wrist"), tmp_path / "cache") == cache
    assert (cache / "zarr.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(Exception, match=r"differ in frame size"):
        build_feature_cache(path, codec, ["top", "side"], tmp_path / "cache")


def test_a_second_process_waits_for_the_autoencoder_being_trained_and_reuses_it(trained, store):
    """While another process holds the run's lock, `default_autoencoder` says it waits, and once the
    lock is released reuses the run instead of training it again."""
    import fcntl
    import threading
    import time

    run, _ = trained
    said: list[str] = []
    with open(run.with_name(run.name + ".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another process" (flock locks are per open file)
        kw = dict(options=TINY, steps=300, batch_size=16, device="cpu", log=said.append)
        worker = threading.Thread(target=lambda: said.append(str(default_autoencoder(store, "img", **kw))))
        worker.start()
        deadline = time.monotonic() + 60
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.is_alive() and said and "waiting for it" in said[0]
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert not worker.is_alive() and said[1].startswith("autoencoder: reusing") and said[2] == str(run)


def test_one_rank_of_a_ddp_run_trains_the_default_autoencoder_alone(store, tmp_path):
    """Under torchrun (WORLD_SIZE=2) the rank that took the lock built a Trainer that joined the process
    group and waited there for the other rank, which waited on the lock: every UWM run on several GPUs
    with an autoencoder still to train hung. Here, as rank 0 of 2 with rank 1 absent (waiting on the lock)."""
    import os
    import shutil
    import socket

    copy = tmp_path / "squares.zarr"
    shutil.copytree(store, copy)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    code = (
        "from wm.autoencoder import default_autoencoder; "
        f"print(default_autoencoder({str(copy)!r}, 'img', options={TINY!r}, steps=2, batch_size=8, "
        "device='cpu', log=lambda _: None))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    run = Path(res.stdout.strip().splitlines()[-1])
    assert load_checkpoint(run)["step"] == 2


def test_a_store_too_small_for_the_autoencoders_batch_names_the_option(store, tmp_path):
    """It said "10 training windows over 1 rank(s) make no full batch of 64": neither the autoencoder nor
    the option (model.latent.batch_size) that sets the 64."""
    import shutil

    copy = tmp_path / "squares.zarr"
    shutil.copytree(store, copy)
    with pytest.raises(
        ValueError, match=r"training frames make no batch of 4096 for the default autoencoder"
    ):
        default_autoencoder(copy, "img", options=TINY, steps=2, batch_size=4096, device="cpu", log=print)
