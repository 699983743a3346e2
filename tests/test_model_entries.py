"""Wrong-kind options and broken local files at the model entries, latent codecs, registry and I/O spec:
each is refused in one line naming what is wrong, never truncated or accepted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import wm.autoencoder
from wm.checkpoint import save_checkpoint
from wm.latents import LatentConfig, LatentSourceError, build_codec, latent_config_from_source
from wm.registry import TrainContext, load_model
from wm.spec import IOSpec
from wm.uwm_entry import latent_config

# A tiny diffusers AutoencoderKL config: two stages (factor 2), 4 latent channels.
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.18215,
    "shift_factor": None,
}


_MISSING = object()  # a key left out of config.json


def write_vae_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in {**TINY_VAE, **changes}.items() if v is not _MISSING}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------- UWM's default autoencoder options
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """default_autoencoder replaced by a recorder: the option checks must refuse before it runs."""
    calls: list[dict] = []

    def record(*args: object, **kwargs: object) -> Path:
        calls.append(kwargs)
        raise RuntimeError("default_autoencoder was called")

    monkeypatch.setattr(wm.autoencoder, "default_autoencoder", record)
    return calls


CTX = TrainContext(store="unused.zarr", image_key="img", proprio_key=None, key_shapes={"img": (24, 32, 3)})


@pytest.mark.parametrize(
    "option, value",
    [
        ("steps", 2.5),
        ("steps", True),
        ("steps", "100"),
        ("steps", 0),
        ("batch_size", 8.7),
        ("batch_size", -4),
    ],
)
def test_uwm_auto_latent_refuses_non_whole_counts(no_training: list, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"model\.latent\.{option}=.* is not a whole number >= 1"):
        latent_config({"source": "auto", option: value}, CTX, ["img"])
    assert no_training == []  # refused before any training (old code trained steps=2.5 as 2)


def test_uwm_auto_latent_passes_whole_counts(no_training: list[dict]) -> None:
    with pytest.raises(RuntimeError, match="default_autoencoder was called"):
        latent_config({"source": "auto", "steps": np.int64(7), "batch_size": 3}, CTX, ["img"])
    assert no_training[0]["steps"] == 7 and no_training[0]["batch_size"] == 3
    assert type(no_training[0]["steps"]) is int


# ---------------------------------------------------------------------- SD-VAE scaling / shift factors
@pytest.mark.parametrize(
    "changes",
    [
        {"scaling_factor": 0},
        {"scaling_factor": float("nan")},
        {"scaling_factor": -0.13},
        {"scaling_factor": float("inf")},
        {"scaling_factor": "0.13025"},
        {"scaling_factor": None},
        {"scaling_factor": True},
        {"shift_factor": float("nan")},
        {"shift_factor": "0.1"},
    ],
)
def test_sd_vae_bad_factors_are_one_line_naming_the_file(tmp_path: Path, changes: dict) -> None:
    folder = write_vae_config(tmp_path / "vae", **changes)
    name = next(iter(changes))
    with pytest.raises(LatentSourceError, match=rf"{folder}/config\.json: .*{name}="):
        latent_config_from_source("sd_vae", folder)


M4, S4 = [0.0] * 4, [1.0] * 4  # a latents_mean / latents_std of latent_channels=4


@pytest.mark.parametrize(
    "changes, said",
    [
        ({"latents_mean": M4[:3], "latents_std": S4}, r"latents_mean=\[0.0, 0.0, 0.0\] is not null or a"),
        ({"latents_mean": M4, "latents_std": [1.0, 1.0, 0.0, 1.0]}, r"latents_std=.* finite numbers > 0"),
        ({"latents_mean": [0.0, "a", 0.0, 0.0], "latents_std": S4}, r"latents_mean=\[0.0, 'a'"),
        ({"latents_mean": M4}, "latents_mean and latents_std go together"),
        ({"latents_mean": M4, "latents_std": S4, "shift_factor": 0.1}, "shift_factor beside latents_mean"),
    ],
)  # fmt: skip
def test_sd_vae_bad_latents_mean_or_std_is_one_line(tmp_path: Path, changes: dict, said: str) -> None:
    folder = write_vae_config(tmp_path / "vae", **changes)
    with pytest.raises(LatentSourceError, match=rf"{folder}/config\.json: .*{said}"):
        latent_config_from_source("sd_vae", folder)


def test_sd_vae_bad_scaling_in_a_saved_structure_is_refused(tmp_path: Path) -> None:
    """A config that already holds its structure (a checkpoint's) is checked too when the codec is built:
    decode divides by the scaling factor."""
    pytest.importorskip("diffusers")
    structure = {k: v for k, v in TINY_VAE.items() if not k.startswith("_")}
    cfg = LatentConfig("sd_vae", str(tmp_path / "gone"), {**structure, "scaling_factor": 0.0})
    with pytest.raises(LatentSourceError, match=r"scaling_factor=0\.0 is not a finite number > 0"):
        build_codec(cfg, load_weights=False)


def test_sd_vae_missing_scaling_is_diffusers_default(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    folder = write_vae_config(tmp_path / "vae", scaling_factor=_MISSING, shift_factor=0.5)
    codec = build_codec(latent_config_from_source("sd_vae", folder), load_weights=False)
    assert codec.factors.scaling == pytest.approx(0.18215) and codec.factors.center == 0.5
    z = codec.encode(torch.rand(1, 3, 8, 8))  # (1, 4, 4, 4)
    assert z.shape == (1, 4, 4, 4) and torch.isfinite(z).all()
    assert torch.isfinite(codec.decode(z)).all()


def test_sd_vae_config_that_is_not_an_object(tmp_path: Path) -> None:
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(LatentSourceError, match=r"config\.json holds a JSON list, not a config object"):
        latent_config_from_source("sd_vae", folder)


def test_sd_vae_weights_of_another_shape_name_the_folder(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    other = {k: v for k, v in TINY_VAE.items() if not k.startswith("_")}
    other["block_out_channels"] = [8, 32]
    diffusers.AutoencoderKL.from_config(other).save_pretrained(tmp_path / "other")
    folder = write_vae_config(tmp_path / "vae")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "other" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(LatentSourceError, match=rf"cannot load the weights in {folder} .*shape"):
        build_codec(latent_config_from_source("sd_vae", folder))


@pytest.mark.parametrize(
    "changes",
    [
        {"down_block_types": ["Bogus", "DownEncoderBlock2D"]},
        {"norm_num_groups": 3},
        {"latent_channels": 2.5},
        {"norm_num_groups": 0},  # a ZeroDivisionError traceback
        {"block_out_channels": [8]},  # fewer than the blocks: an IndexError traceback
        {"latent_channels": "4"},  # with the weights: a TypeError traceback
    ],
)
@pytest.mark.parametrize("load_weights", [False, True])
def test_sd_vae_config_that_does_not_build_names_the_folder(
    tmp_path: Path, changes: dict, load_weights: bool
) -> None:
    pytest.importorskip("diffusers")
    folder = write_vae_config(tmp_path / "vae", **changes)
    cfg = latent_config_from_source("sd_vae", folder)
    with pytest.raises(LatentSourceError, match=rf"latent source sd_vae: .*{folder}"):
        build_codec(cfg, load_weights=load_weights)


# ---------------------------------------------------------------------- registry
def test_load_model_unknown_controller_lists_the_valid_ones(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model_type="dino_wm", model_config={}, state_dict={})
    with pytest.raises(ValueError, match=r"unknown controller 'planner'; valid: mpc, policy"):
        load_model(str(ckpt), controller="planner")


# ---------------------------------------------------------------------- I/O spec
def spec(**changes: object) -> IOSpec:
    kw = dict(image_keys=("image",), image_size=(24, 32), proprio_key="state", proprio_dim=3, action_dim=2)
    return IOSpec(**{**kw, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"image_size": (24.5, 32)}, "image_size must be"),
        ({"image_size": "64"}, "image_size must be"),
        ({"image_size": (True, 32)}, "image_size must be"),
        ({"history": 1.5}, "history=1.5"),
        ({"frameskip": 2.0}, "frameskip=2.0"),
        ({"action_dim": True}, "action_dim=True"),
        ({"proprio_dim": 2.5}, "proprio_dim=2.5"),
        ({"proprio_dim": -3}, "proprio_dim -3 disagree"),
        ({"image_size": 64}, "image_size must be"),  # a TypeError
        ({"image_keys": "cam"}, "image_keys must be a list of cameras, got the string 'cam'"),  # c, a, m
        ({"image_keys": ("a", "a")}, r"observation keys \['a', 'a', 'state'\] name one key twice"),
        ({"image_keys": ("state",)}, "name one key twice"),  # a camera that is the proprio key
        ({"past_actions": "no"}, "past_actions must be true or false, got 'no'"),
    ],
)
def test_io_spec_refuses_wrong_kinds(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spec(**changes)


def test_io_spec_takes_numpy_whole_numbers() -> None:
    s = spec(image_size=(np.int64(24), np.int32(32)), history=np.int64(2))
    assert s.image_size == (24, 32) and all(type(v) is int for v in s.image_size)
    assert s.window == 2
