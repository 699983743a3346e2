"""Diffusion policies refuse bad sampler / schedule options, mismatched observations and sub-configs of
the wrong kind in one line (they were tracebacks deep in torch or silent NaN actions)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_diffusion import H, W, tiny_config
from torch import nn

from policies.diffusion import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    NoiseConfig,
    TransformerConfig,
    UNetConfig,
)
from policies.diffusion.noise import Diffusion
from policies.diffusion.obs_encoder import ObsEncoderConfig
from wm.data.normalize import STATS, Normalizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


class HalfNet(nn.Module):
    """A fixed denoiser net(x (B, Ta, Da), t (B,), cond) -> 0.5 x: finite for finite inputs."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return 0.5 * x


@pytest.fixture(scope="module")
def policy() -> DiffusionPolicy:
    torch.manual_seed(0)
    stats = {name: np.zeros(2, np.float32) for name in STATS}
    stats.update(min=np.full(2, -1.0, np.float32), max=np.ones(2, np.float32), std=np.ones(2, np.float32))
    normalizer = Normalizer({"action": "minmax", "proprio": "minmax"}, {"action": stats, "proprio": stats})
    return DiffusionPolicy(tiny_config("unet"), normalizer).eval()


def obs(e: int = 2, proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand(e, 2, 3, H, W, generator=gen),
        "proprio": torch.zeros(e, 2, 2) if proprio is None else proprio,
    }


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("steps", [2.5, float("nan"), True])
@pytest.mark.parametrize("sampler", ["edm", "ddim"])
def test_sampler_steps_must_be_a_whole_number(policy, sampler, steps):
    diffusion = Diffusion(HalfNet(), NoiseConfig())
    with pytest.raises(ValueError, match=r"^steps must be a whole number >= 1"):
        diffusion.sample((2, 8, 2), None, sampler, steps, seeded())
    with pytest.raises(ValueError, match=r"^sampler_steps must be a whole number >= 1"):
        policy.set_sampler(sampler, steps)
    assert (policy.sampler, policy.sampler_steps) == ("edm", 3)  # left as it was


def test_noise_options_of_the_wrong_kind_or_out_of_range_are_one_line():
    with pytest.raises(ValueError, match=r"noise.num_train_steps=2.5 is not a whole number"):
        NoiseConfig(num_train_steps=2.5)
    with pytest.raises(ValueError, match=r"noise.clip_sample='no' is not true or false"):
        NoiseConfig(clip_sample="no")
    with pytest.raises(ValueError, match=r"^noise.rho=inf is not a finite number$"):
        NoiseConfig(rho=float("inf"))  # every Karras sigma was 1
    with pytest.raises(ValueError, match=r"noise.rho=0.01 overflows the sigmas"):
        Diffusion(HalfNet(), NoiseConfig(rho=0.01))  # NaN actions
    with pytest.raises(ValueError, match=r"noise.rho=0.001 overflows the sigmas"):
        Diffusion(HalfNet(), NoiseConfig(rho=0.001))  # an OverflowError
    # the schedule's largest sigma (about 2029 here) caps sigma_max below sigma_min: the sigmas rose
    with pytest.raises(ValueError, match=r"noise.sigma_min=3000 is not below the schedule's largest sigma"):
        Diffusion(HalfNet(), NoiseConfig(sigma_min=3000, sigma_max=4000))
    # sigma_max below the smallest sigma, to which sigma_min is raised: the message named sigma_min as
    # "not below the largest sigma 0.01", which it was
    with pytest.raises(
        ValueError, match=r"^noise.sigma_max=0.01 is not above the schedule's smallest sigma 0.02"
    ):
        Diffusion(HalfNet(), NoiseConfig(sigma_min=0.005, sigma_max=0.01))


def test_dpmpp_2m_refuses_repeated_sigmas_instead_of_returning_nan():
    diffusion = Diffusion(HalfNet(), NoiseConfig(rho=1e6, edm_solver="dpmpp_2m"))
    x = diffusion.sample((2, 8, 2), None, "edm", 3, seeded())  # few steps: distinct sigmas, finite
    assert bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match=r"100 steps with noise.rho=1000000.0 give repeated sigmas"):
        diffusion.sample((2, 8, 2), None, "edm", 100, seeded())


def test_observation_keys_of_mismatched_shapes_are_one_line(policy):
    mixed = {"image": obs(2)["image"], "proprio": torch.zeros(3, 2, 2)}
    with pytest.raises(ValueError, match=r"different numbers of episodes \(E\): \{'image': 2, 'proprio': 3"):
        policy.sample_actions(mixed, seeded())
    with pytest.raises(ValueError, match=r"'proprio': expected \(E, To, 2\), got \(2, 2\)"):
        policy.sample_actions(obs(2, proprio=torch.zeros(2, 2)), seeded())
    assert policy.sample_actions(obs(2), seeded()).shape == (2, 4, 2)


@pytest.mark.parametrize("name, value", [("noise", "x"), ("unet", [8, 16]), ("obs", None)])
def test_sub_configs_of_the_wrong_kind_are_one_line(name, value):
    d = {**tiny_config("unet").to_dict(), name: value}
    with pytest.raises(ValueError, match=rf"^model.{name} must be a mapping of options, got"):
        DiffusionPolicyConfig.from_dict(d)


@pytest.mark.parametrize(
    "build, said",
    [
        (lambda: UNetConfig(kernel_size=5.0), r"model.unet.kernel_size=5.0 is not a whole number"),
        # a single number for a list: TypeError "'int' object is not iterable", a traceback (exit 1)
        (lambda: UNetConfig(down_dims=256), r"model.unet.down_dims=256 is not a list of whole numbers"),
        (lambda: UNetConfig(down_dims="abc"), r"model.unet.down_dims='abc' is not a list of whole numbers"),
        (
            lambda: UNetConfig(down_dims=(256.5, 512)),
            r"model.unet.down_dims\[0\]=256.5 is not a whole number",
        ),
        (lambda: TransformerConfig(heads=4.0), r"model.transformer.heads=4.0 is not a whole number"),
        (lambda: TransformerConfig(causal="false"), r"model.transformer.causal='false' is not true or false"),
        (lambda: ObsEncoderConfig(feature_dim=64.0), r"model.obs.feature_dim=64.0 is not a whole number"),
    ],
)
def test_network_configs_built_directly_refuse_numbers_of_the_wrong_kind(build, said):
    """Built in Python rather than from a policy config: down_dims 256.5 was cut to 256, a float
    kernel size or head count a TypeError from torch, causal="false" true."""
    with pytest.raises(ValueError, match=rf"^{said}$"):
        build()


def test_unet_n_groups_zero_is_one_line():
    with pytest.raises(ValueError, match=r"n_groups must be >= 1, got 0"):
        UNetConfig(n_groups=0)


@pytest.mark.parametrize(
    ("crop", "said"),
    [
        ("12", "model.obs.crop must be auto, null, a size n (n x n) or [h,w] in whole pixels, got '12'"),
        ([8.7, 8.2], "model.obs.crop must be auto, null, a size n (n x n) or [h,w] in whole pixels"),
        ([8, 8, 8], "model.obs.crop must be auto, null, a size n (n x n) or [h,w] in whole pixels"),
        ([20, 8], "model.obs.crop=[20,8] does not fit the store's 16x16 frames"),
    ],
)
def test_a_crop_that_is_no_size_is_refused_in_one_line(crop, said):
    """The text "12" trained with a 1x2 crop (split into its digits), [8.7, 8.2] with 8x8 (int() cut it),
    and a single 84 was a TypeError traceback."""
    from policies.diffusion.entry import crop_for

    with pytest.raises(ValueError, match=re.escape(said)):
        crop_for(crop, (H, W))
    assert crop_for(12, (H, W)) == [12, 12] and crop_for("auto", (H, W)) == [14, 14]


def test_a_resnet18_backbone_on_frames_of_32_px_or_less_is_noted_blind():
    """ResNet-18's stride is 32: on 28 x 28 crops (32 px frames, crop auto) its map is 1 x 1, the keypoints
    the same for every image; the policy trained and ran without seeing its cameras, nothing said.
    (wm-train prints the note.)"""
    from policies.diffusion.obs_encoder import ObsEncoderConfig

    note = ObsEncoderConfig(image_size=(32, 32), crop=(28, 28)).blind_note()
    assert note is not None and note.startswith("model.obs.backbone=resnet18 on 28 x 28 frames")
    assert ObsEncoderConfig(image_size=(40, 40), crop=None).blind_note() is None  # a 2 x 2 map
    assert ObsEncoderConfig(image_size=(32, 32), crop=None, backbone="patch").blind_note() is None
    assert ObsEncoderConfig(image_size=(32, 32), crop=None, image_keys=(), proprio_dim=2).blind_note() is None


class _FarOut(nn.Module):
    """A denoiser whose clean-sample prediction lies far outside [-1, 1]: every estimate is clamped."""

    def forward(self, x, t, cond):
        return 10 * torch.ones_like(x)


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_edm_samples_stay_within_the_clip_range(solver, steps):
    """Heun's last step computed x + (0 - s) * (x - x0) / s, which is x0 only up to rounding: samples came
    out up to 1e-6 past 1 (actions past the training range), although every estimate was clamped."""
    diffusion = Diffusion(_FarOut(), NoiseConfig(prediction_type="sample", edm_solver=solver))
    with torch.inference_mode():
        x = diffusion.sample((256, 16, 2), None, "edm", steps, torch.Generator().manual_seed(0))
    assert float(x.max()) <= 1.0 and float(x.min()) >= -1.0
