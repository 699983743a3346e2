"""Diffusion policies: samplers on a known 2-mode distribution, consistency distillation, policies that
overfit a tiny real store, checkpoints, action queue / temporal ensembling, and clear input errors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from policies.base import EpisodeRows, Policy
from policies.chunking import ChunkPolicy, TemporalEnsembler
from policies.diffusion import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    NoiseConfig,
    ObsEncoderConfig,
    TransformerConfig,
    UNetConfig,
)
from policies.diffusion.consistency import ConsistencyObjective, DistillConfig, teacher_normalizer
from policies.diffusion.entry import chunk_policy
from policies.diffusion.noise import (
    Committed,
    Diffusion,
    Inpaint,
    check_reaches_noise,
    ddim_timesteps,
    inpaint_guide,
    make_betas,
    masked_mean,
    scored_steps,
)
from policies.diffusion.precision import Bf16Inference
from wm import kernels
from wm.checkpoint import CheckpointError, save_checkpoint
from wm.data import DemoStore, KeySpec, Schema
from wm.data.dataset import WindowDataset
from wm.data.normalize import Normalizer, compute_stats
from wm.encoders import EncoderConfig
from wm.registry import load_model
from wm.spec import IOSpec
from wm.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


# ---------------------------------------------------------------------- a known 2-D distribution
MODE = torch.tensor([0.5, 0.5])
P_POS = 0.7  # mass of the mode at +MODE


def mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, 2): 70% around +MODE, 30% around -MODE, std 0.05."""
    sign = (torch.rand(n, generator=gen) < P_POS).float() * 2 - 1
    return (sign[:, None] * MODE + 0.05 * torch.randn(n, 2, generator=gen))[:, None]


class ToyNet(nn.Module):
    """MLP denoiser net(x (B, 1, 2), t (B,), cond) -> (B, 1, 2)."""

    def __init__(self) -> None:
        super().__init__()
        h = 128
        self.mlp = nn.Sequential(
            nn.Linear(2 + 16, h),
            nn.SiLU(),
            nn.Linear(h, h),
            nn.SiLU(),
            nn.Linear(h, h),
            nn.SiLU(),
            nn.Linear(h, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        arg = t[:, None] / 100 * (2.0 ** torch.arange(8)) * math.pi  # (B, 8)
        return self.mlp(torch.cat([x[:, 0], arg.sin(), arg.cos()], dim=-1))[:, None]


def mode_stats(x: torch.Tensor) -> tuple[float, float, float]:
    """Fractions of samples within 0.2 of +MODE, of -MODE, and elsewhere."""
    d_pos, d_neg = (x[:, 0] - MODE).norm(dim=-1), (x[:, 0] + MODE).norm(dim=-1)
    pos, neg = (d_pos < 0.2).float().mean().item(), (d_neg < 0.2).float().mean().item()
    return pos, neg, 1 - pos - neg


def fit_toy(model: Diffusion, batch: Callable[[], torch.Tensor], steps: int = 1500) -> Diffusion:
    """Train a toy denoiser on batches drawn by `batch()`: Adam 2e-3, cosine schedule."""
    opt = torch.optim.Adam(model.parameters(), 2e-3, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = model.loss(batch(), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.fixture(scope="module")
def toy_teacher() -> Diffusion:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Diffusion(ToyNet(), NoiseConfig())
    return fit_toy(model, lambda: mixture(256, gen))


@pytest.mark.parametrize(
    "sampler,steps,solver,max_between",
    [
        ("ddpm", 1, "heun", 0.05),
        ("ddim", 10, "heun", 0.12),
        ("edm", 3, "heun", 0.12),
        ("edm", 5, "heun", 0.12),
        ("edm", 3, "dpmpp_2m", 0.25),  # the configs' default sampler
        ("edm", 5, "dpmpp_2m", 0.2),
    ],
)
def test_samplers_recover_both_modes(toy_teacher, sampler, steps, solver, max_between):
    model = Diffusion(toy_teacher.net, NoiseConfig(edm_solver=solver)).eval()
    with torch.inference_mode():
        x = model.sample((2000, 1, 2), None, sampler, steps, torch.Generator().manual_seed(1))
    pos, neg, between = mode_stats(x)
    assert pos > 0.15 and neg > 0.15, (pos, neg)  # both modes present
    assert between < max_between, between  # little mass between them
    assert abs(pos / (pos + neg) - P_POS) < 0.12, (pos, neg)  # roughly the right proportions


class ToyData:
    """A fixed pool of mixture samples, read in batches by the trainer's loader."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.x = mixture(n, gen)

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, idx) -> dict[str, torch.Tensor]:
        return {"x": self.x[torch.as_tensor(np.asarray(idx))]}


class ToyDistillation(nn.Module):
    """The CD objective on unconditional (B, 1, 2) samples, as a model the one trainer trains."""

    def __init__(self, teacher: Diffusion, cfg: DistillConfig) -> None:
        super().__init__()
        self.objective = ConsistencyObjective(teacher, cfg)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.objective.loss(batch["x"], None, None)
        return loss, {"loss": loss.detach()}


def distill_toy(teacher: Diffusion, cfg: DistillConfig, steps: int, out) -> Diffusion:
    model = ToyDistillation(teacher, cfg)
    tcfg = TrainerConfig(
        steps=steps, batch_size=256, lr=2e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0,
        ema_decay=0.0, val_every=0, ckpt_every=0, log_every=steps, seed=0,
    )  # fmt: skip
    Trainer(
        model,
        ToyData(20 * 256, torch.Generator().manual_seed(3)),
        tcfg,
        out,
        model_type="toy_cd",
        model_config={},
    ).fit()
    return model.objective.target


def test_consistency_distillation_one_and_two_steps(toy_teacher, tmp_path):
    student = distill_toy(toy_teacher, DistillConfig(n_sigmas=8, target="to_end"), 400, tmp_path / "a")
    assert student.consistency
    # A 1-step map from a Gaussian to two modes must be discontinuous; a small MLP distilled for
    # 400 steps learns a steep ramp, so a share of samples still lands between the modes (the 2-step
    # sampler re-noises to sigma ~0.6, where this student is weakest: looser bound).
    for steps, max_between in ((1, 0.4), (2, 0.6)):
        with torch.inference_mode():
            x = student.sample((2000, 1, 2), None, "consistency", steps, torch.Generator().manual_seed(1))
        pos, neg, between = mode_stats(x)
        assert pos > 0.1 and neg > 0.03 and pos > neg, (steps, pos, neg)
        assert between < max_between, (steps, between)
    # The CD objective proper (EMA target, one teacher step) runs and moves the target toward the student.
    objective = ConsistencyObjective(toy_teacher, DistillConfig(n_sigmas=8))
    before = [p.clone() for p in objective.target.parameters()]
    cd = distill_toy(toy_teacher, DistillConfig(n_sigmas=8), 5, tmp_path / "b")
    assert cd.consistency and torch.isfinite(cd.sample((8, 1, 2), None, "consistency", 1)).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, cd.parameters(), strict=True))
    with pytest.raises(ValueError, match="consistency"):
        student.sample((4, 1, 2), None, "edm", 3)
    with pytest.raises(ValueError, match="already a consistency model"):
        ConsistencyObjective(student, DistillConfig())


class _AtTheEdge(nn.Module):
    """A clean-sample denoiser that predicts past the range's edge (clip_sample clamps it to +1)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond):
        return torch.full_like(x, 3.0)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_consistency_samples_are_clipped_as_every_samplers_are(steps):
    """The skip term c_skip * x carried noise past the network's clamped estimate: a 1-step sample reached
    1.2 (normalized), a 2-step one 1.9, past every action the policy was trained on."""
    diff = Diffusion(_AtTheEdge(), NoiseConfig(prediction_type="sample"), consistency=True)
    x = diff.sample((256, 16, 2), None, "consistency", steps, torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 and (x == 1.0).any()  # clamped where it went past


# ---------------------------------------------------------------------- continuing committed actions
LINE = 8  # steps of a toy chunk


def lines(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, LINE, 1) ramps a + v * i / (LINE - 1): offset a ~ U(-0.5, 0.5), slope v = +-0.4 (two modes), so
    two leading actions determine the rest."""
    a = torch.rand(n, 1, generator=gen) - 0.5
    v = (torch.rand(n, 1, generator=gen) < 0.5).float() * 0.8 - 0.4
    return (a + v * torch.arange(LINE) / (LINE - 1))[..., None]


class LineNet(nn.Module):
    """MLP denoiser net(x (B, LINE, Din), t (B,), cond) -> (B, LINE, 1)."""

    def __init__(self, din: int) -> None:
        super().__init__()
        h = 256
        self.mlp = nn.Sequential(
            nn.Linear(LINE * din + 16, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
            nn.Linear(h, LINE),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        arg = t[:, None] / 100 * (2.0 ** torch.arange(8)) * math.pi  # (B, 8)
        return self.mlp(torch.cat([x.flatten(1), arg.sin(), arg.cos()], dim=-1))[..., None]


def train_lines(committed: Committed | None) -> Diffusion:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Diffusion(
        LineNet(3 if committed else 1), NoiseConfig(prediction_type="sample"), committed=committed
    )
    return fit_toy(model, lambda: lines(256, gen))


def continuation_error(model: Diffusion, given: int) -> float:
    """Mean |error| of the sampled steps after `frozen` = 2 committed ones (3 steps of DPM-Solver++(2M),
    the configs' default sampler), the first `given` of them also the network's input."""
    truth = lines(500, torch.Generator().manual_seed(5))
    guide = inpaint_guide(truth[:, :2], LINE, 0, 2, given)
    model.cfg = dataclasses.replace(model.cfg, edm_solver="dpmpp_2m")
    with torch.inference_mode():
        x = model.sample(truth.shape, None, "edm", 3, torch.Generator().manual_seed(1), guide)
    torch.testing.assert_close(x[:, :2], truth[:, :2])  # the committed actions stay
    return (x[:, 2:] - truth[:, 2:]).abs().mean().item()


def test_a_denoiser_trained_on_committed_actions_continues_them():
    """Guidance alone (the committed steps inpainted, a network that never saw any) leaves a few-step
    sampler's continuation near chance: it does not follow the ramp the two committed actions set. A
    network trained with `Committed` takes them as input and continues them."""
    plain = continuation_error(train_lines(None), given=0)
    committed_model = train_lines(Committed(start=0, max_steps=4))
    committed = continuation_error(committed_model, given=2)
    assert committed < 0.06 and plain > 4 * committed, (plain, committed)
    # The same network without committed actions (given 0) samples whole ramps, rising and falling.
    with torch.inference_mode():
        x = committed_model.sample((1000, LINE, 1), None, "edm", 3, torch.Generator().manual_seed(2))[..., 0]
    slope = x[:, -1] - x[:, 0]  # (B,)
    ramp = x[:, :1] + slope[:, None] * torch.arange(LINE) / (LINE - 1)
    assert 0.3 < (slope > 0).float().mean() < 0.7 and (x - ramp).abs().mean() < 0.03
    # Distillation keeps the conditioning: the student takes the same input channels and its loss runs.
    objective = ConsistencyObjective(committed_model, DistillConfig(n_sigmas=8))
    assert objective.student.committed == committed_model.committed
    assert torch.isfinite(objective.loss(lines(16, torch.Generator().manual_seed(3)), None, None))


class GaussianDenoiser(nn.Module):
    """The exact denoiser of chunks x0 ~ N(0, cov) (cov (Ta, Ta), one action dim), predicting the sample:
    E[x0 | x = x0 + sigma eps] = cov (cov + sigma^2 I)^-1 x, sigma read from the schedule's table."""

    def __init__(self, cov: torch.Tensor) -> None:
        super().__init__()
        self.cov, self.log_sigmas = cov, None

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        assert torch.equal(t, t[:1].expand_as(t))  # one noise level for the batch
        lo = int(t[0].floor().clamp(0, len(self.log_sigmas) - 2))
        f = t[0] - lo
        sigma = torch.exp(self.log_sigmas[lo] * (1 - f) + self.log_sigmas[lo + 1] * f)
        x = x_vp[..., 0] * (1 + sigma**2).sqrt()  # (B, Ta) the VE sample
        gain = torch.linalg.solve(self.cov + sigma**2 * torch.eye(len(self.cov)), self.cov)  # symmetric
        return (x @ gain)[..., None]


@pytest.mark.parametrize(
    "sampler, steps, edm_solver, at_most",
    [
        ("edm", 3, "dpmpp_2m", 0.5),
        ("edm", 3, "heun", 0.8),
        ("ddim", 10, "heun", 0.8),
        ("ddpm", 1, "heun", 0.8),
    ],
)
def test_gradient_guidance_moves_the_free_steps_towards_the_conditional(sampler, steps, edm_solver, at_most):
    """On smooth Gaussian chunks, where the best continuation of two committed actions is known exactly
    (the conditional mean), editing the estimate leaves the free steps near the prior (every sampler),
    while RTC's gradient guidance, through the denoiser's Jacobian, moves them towards it (halfway with
    3 steps of DPM-Solver++(2M), the configs' default); the committed steps end on their targets."""
    Ta, k, B = 8, 2, 2000
    i = torch.arange(Ta, dtype=torch.float32)
    cov = torch.exp(-((i[:, None] - i[None]) ** 2) / 18)  # unit variance, correlation length 3 steps
    net = GaussianDenoiser(cov)
    model = Diffusion(net, NoiseConfig(prediction_type="sample", clip_sample=False, edm_solver=edm_solver))
    net.log_sigmas = model.log_sigmas
    y = torch.tensor([1.0, 1.2])
    want = cov[k:, :k] @ torch.linalg.solve(cov[:k, :k], y)  # the conditional mean of the free steps
    previous = y.view(1, k, 1).expand(B, k, 1)

    def free_error(max_weight: float | None) -> float:
        guide = inpaint_guide(previous, Ta, 0, k, max_weight=max_weight)
        with torch.inference_mode():
            x = model.sample((B, Ta, 1), None, sampler, steps, torch.Generator().manual_seed(0), guide)
        torch.testing.assert_close(x[:, :k], previous, atol=1e-4, rtol=0)  # the committed steps stay
        return (x[:, k:, 0].mean(0) - want).abs().mean().item()

    edited, guided = free_error(None), free_error(5.0)
    assert edited > 0.4 and guided < at_most * edited, (edited, guided)
    with pytest.raises(ValueError, match="max_weight must be > 0"):
        inpaint_guide(previous, Ta, 0, k, max_weight=0.0)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_beta_schedules_match_their_references(n):
    """linear is diffusers' (a checkpoint trained with it keeps its schedule), linear_scaled Nichol &
    Dhariwal's 1000 / n scaling; both with the cosine schedule end in noise where training may use them."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=n, beta_schedule="linear").betas.double()
    torch.testing.assert_close(make_betas("linear", n), ref)
    scaled = make_betas("linear_scaled", n)
    ends = (torch.tensor([0.1, 20.0], dtype=torch.float64) / n).clamp(max=0.999)
    torch.testing.assert_close(scaled[[0, -1]], ends)
    for schedule in ("linear_scaled", "squaredcos_cap_v2"):
        assert torch.cumprod(1 - make_betas(schedule, n), 0)[-1].sqrt() < 0.01
        check_reaches_noise({"beta_schedule": schedule, "num_train_steps": n})


class _OvershootingEps(nn.Module):
    """A fixed eps "network" whose x0 estimates overshoot [-1, 1], so clip_sample acts on most of them."""

    def forward(self, x, t, cond):
        return 0.3 * torch.sin(3 * x + 0.01 * t[:, None, None]) - 0.8 * x.flip(1) + 0.5


def test_ddim_timesteps_are_diffusers_leading_ones_where_they_can_be_and_always_start_at_full_noise():
    """ "leading" spacing (i * (T // steps)) started DDIM-51 on T = 100 at t = 50, half the signal left in
    what it took for pure noise; DDIM-34 at t = 66."""
    from diffusers import DDIMScheduler

    for T in (100, 1000):
        ref = DDIMScheduler(num_train_timesteps=T, steps_offset=0, timestep_spacing="leading")
        for steps in range(2, T + 1):
            ts = ddim_timesteps(T, steps)
            assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[-1] == 0
            assert ts[0] > T - T / steps - 1  # a step (T / steps) below T at most, as the others
            if T % steps == 0:
                ref.set_timesteps(steps)
                assert ts == ref.timesteps.tolist()
    assert ddim_timesteps(100, 51)[:2] == [98, 96] and ddim_timesteps(100, 10) == list(range(90, -1, -10))


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_matches_diffusers_ddim_scheduler(clip):
    """Our DDIM (eta 0, "leading" timesteps where steps divides T, final alpha 1) against diffusers'
    DDIMScheduler.step, with clip_sample on (most x0 estimates clipped; eps kept unclipped, diffusers'
    default) and off."""
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    T, steps, net = 100, 10, _OvershootingEps()
    diff = Diffusion(net, NoiseConfig(num_train_steps=T, clip_sample=clip)).double()
    z = torch.randn(4, 6, 2, dtype=torch.float64)
    ref = DDIMScheduler(
        num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=clip, set_alpha_to_one=True,
        steps_offset=0, timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    ref.set_timesteps(steps)
    x = z.clone()
    for t in ref.timesteps:
        eps = net(x, torch.full((len(x),), float(t), dtype=torch.float64), None)
        x = ref.step(eps, int(t), x, eta=0.0).prev_sample
    torch.testing.assert_close(diff._ddim(z.clone(), None, steps, None), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [100, 1000])
def test_ddpm_matches_diffusers_ddpm_scheduler_in_float32(T):
    """Our DDPM against diffusers' DDPMScheduler ("fixed_small"), the same noise drawn, in float32 as
    the policy runs. Each step used the stored float32 betas beside a separately rounded alpha-bar
    table: at T = 1000 every sample came out scaled by 0.9995 (the last step's mean)."""
    from diffusers import DDPMScheduler

    net = _OvershootingEps()
    diff = Diffusion(net, NoiseConfig(num_train_steps=T, clip_sample=True))
    ref = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        variance_type="fixed_small",
    )
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 2, generator=g)
    for t in ref.timesteps:
        x = ref.step(net(x, torch.full((len(x),), float(t)), None), int(t), x, generator=g).prev_sample
    ours = diff.sample((4, 6, 2), None, "ddpm", 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)  # float32 over 1000 steps; it was 5e-4 off


@pytest.mark.parametrize("edm_solver", ["heun", "dpmpp_2m"])
def test_gradient_guidance_keeps_clip_samples_range(edm_solver):
    """clip_sample clamps every denoised estimate; gradient guidance's correction was added after the
    clamp, and the EDM samplers return their last estimate: actions beyond the training range."""
    torch.manual_seed(0)
    Ta, k, B = 8, 2, 64
    model = Diffusion(_OvershootingEps(), NoiseConfig(clip_sample=True, edm_solver=edm_solver))
    previous = torch.full((B, 6, 2), 0.98) * torch.randn(B, 1, 2).sign()  # at the range's edges
    guide = inpaint_guide(previous, Ta, 1, k, max_weight=5.0)
    with torch.inference_mode():
        x = model.sample((B, Ta, 2), None, "edm", 3, torch.Generator().manual_seed(0), guide)
    assert x.abs().max() <= 1.0


def test_training_refuses_a_schedule_that_never_reaches_noise(store_path):
    """diffusers' linear betas over 100 steps keep 60 % of the signal at the last step: sampling would
    start from pure noise the model never saw. Refused before training, for both diffusion models;
    a checkpoint trained with it still loads with its own schedule."""
    from wm.training import setup_training

    refusal = r"beta_schedule=linear with num_train_steps=100 keeps 60%.*linear_scaled"
    with pytest.raises(ValueError, match=refusal):
        check_reaches_noise({"beta_schedule": "linear"})
    check_reaches_noise({"beta_schedule": "linear", "num_train_steps": 1000})
    for model in ("diffusion_unet", "uwm"):
        with pytest.raises(ValueError, match=r"model\.noise\.beta_schedule=linear with num_train_steps=100"):
            setup_training(model, str(store_path), {"noise": {"beta_schedule": "linear"}}, val_ratio=0.0)
    cfg = DiffusionPolicyConfig(noise={"beta_schedule": "linear"})  # what loading a checkpoint builds
    assert cfg.noise.beta_schedule == "linear"


def test_committed_draws_and_loss_mask():
    x0 = torch.randn(4000, 10, 2)
    guide = Committed(start=1, max_steps=3).draw(x0, torch.Generator().manual_seed(0))
    n = guide.given.sum(1)  # (B,) committed steps per sample
    assert set(n.tolist()) == {0, 1, 2, 3} and abs((n == 0).float().mean().item() - 0.5) < 0.03  # p_none
    assert abs(n[n > 0].float().mean().item() - 2.0) < 0.1  # else 1..3 uniformly
    first = torch.where(n > 0, guide.given.float().argmax(1), torch.ones_like(n))
    assert (first == 1).all() and torch.equal(guide.given.cumsum(1).amax(1), n)  # contiguous from step 1
    assert torch.equal(guide.target, x0) and torch.equal(guide.weight, guide.given.float())
    # The loss averages the valid steps that were not given.
    err = torch.arange(20.0).view(2, 10)
    given = torch.zeros(2, 10, dtype=torch.bool)
    given[0, 1:3] = True
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 9] = False
    keep = ~given & valid
    assert masked_mean(err, scored_steps(valid, Inpaint(x0[:2], given.float(), given))) == err[keep].mean()
    with pytest.raises(ValueError, match="leave none to sample"):
        Committed(start=1, max_steps=9).draw(x0)
    with pytest.raises(ValueError, match=r"given must be in \[0, frozen"):
        inpaint_guide(x0[:1, :4], 10, 1, frozen=2, given=3)


# ---------------------------------------------------------------------- a tiny real store
H, W = 16, 16
N_OBS, HORIZON, N_EXEC = 2, 8, 4


def write_store(path) -> None:
    """6 episodes of 24 steps: proprio p (2,), action a = -0.25 p, p' = p + a (a deterministic function of
    the observation), a 16x16 image whose brightness encodes p."""
    schema = Schema(
        keys={
            "image": KeySpec((H, W, 3), "uint8", "image"),
            "proprio": KeySpec((2,), "float32", "proprio"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=10,
        robot="toy",
        task="reach",
    )
    rng = np.random.default_rng(0)
    store = DemoStore.create(path, schema)
    for _ in range(6):
        p = rng.uniform(-1, 1, 2)
        ps, acts = [], []
        for _ in range(24):
            a = -0.25 * p
            ps.append(p.copy())
            acts.append(a)
            p = p + a
        ps_arr = np.asarray(ps, dtype=np.float32)
        img = np.zeros((24, H, W, 3), dtype=np.uint8)
        img[:, : H // 2] = ((ps_arr[:, 0] + 1) * 127)[:, None, None, None].astype(np.uint8)
        img[:, H // 2 :] = ((ps_arr[:, 1] + 1) * 127)[:, None, None, None].astype(np.uint8)
        store.append_episode({"image": img, "proprio": ps_arr, "action": np.asarray(acts, dtype=np.float32)})
    store.close()


def tiny_config(denoiser: str) -> DiffusionPolicyConfig:
    obs = ObsEncoderConfig(
        image_keys=("image",),
        image_size=(H, W),
        crop=(14, 14),
        proprio_dim=2,
        backbone="patch",
        feature_dim=16,
        patch_encoder=EncoderConfig(name="cnn", cnn_channels=(8,), cnn_dim=8, cnn_stride=2),
    )
    return DiffusionPolicyConfig(
        obs=obs,
        action_dim=2,
        n_obs=N_OBS,
        horizon=HORIZON,
        n_action_exec=N_EXEC,
        denoiser=denoiser,
        unet=UNetConfig(down_dims=(32, 64), step_embed_dim=32),
        transformer=TransformerConfig(dim=32, depth=2, heads=2, dropout=0.0),
        noise=NoiseConfig(prediction_type="sample"),  # epsilon: far slower (BENCHMARKS.md)
        sampler="edm",
        sampler_steps=3,
    )


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusion") / "toy.zarr"
    write_store(path)
    return path


def train_policy(cfg: DiffusionPolicyConfig, store_path, steps: int) -> tuple[DiffusionPolicy, WindowDataset]:
    torch.manual_seed(0)
    with DemoStore.open(store_path) as store:
        normalizer = Normalizer.fit(store, {"action": "minmax", "proprio": "minmax"})
    policy = DiffusionPolicy(cfg, normalizer)
    data = WindowDataset(store_path, policy.window_spec(), in_memory=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(0)
    policy.train()
    for _ in range(steps):
        loss, metrics = policy.compute_loss(data.get_batch(rng.integers(0, len(data), 64)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert math.isfinite(metrics["loss"].item())
    return policy.eval(), data


def chunk_error(policy: DiffusionPolicy, data: WindowDataset, seed: int = 0) -> float:
    """Mean abs error of predicted executed actions vs the data's (valid steps), over 48 windows."""
    batch = data.get_batch(np.arange(0, len(data), max(1, len(data) // 48)))
    pred = policy.sample_actions(
        {k: batch[k] for k in ("image", "proprio")}, generator=torch.Generator().manual_seed(seed)
    )
    true = batch["action"][:, N_OBS - 1 : N_OBS - 1 + N_EXEC]
    valid = ~batch["action_is_pad"][:, N_OBS - 1 : N_OBS - 1 + N_EXEC]
    return ((pred - true).abs().mean(-1)[valid]).mean().item()


@pytest.fixture(scope="module")
def unet_policy(store_path):
    return train_policy(tiny_config("unet"), store_path, steps=250)


def test_unet_policy_overfits_tiny_store(unet_policy):
    policy, data = unet_policy
    assert isinstance(chunk_policy(policy), Policy)
    # Actions span about [-0.25, 0.25]; the mean |a| is about 0.06 over the episodes.
    assert chunk_error(policy, data) < 0.01


def test_transformer_policy_overfits_tiny_store(store_path):
    policy, data = train_policy(tiny_config("transformer"), store_path, steps=250)
    assert chunk_error(policy, data) < 0.02


def save_policy(policy: DiffusionPolicy, path) -> None:
    save_checkpoint(
        path,
        model_type=policy.model_type,
        model_config=policy.cfg.to_dict(),
        state_dict=policy.state_dict(),
        ema_state_dict=None,
        normalizer=policy.normalizer.to_dict(),
    )


def test_a_policy_loads_without_its_encoders_pretrained_weights_file(store_path, tmp_path):
    """The checkpoint holds every weight, yet loading a policy on a patch encoder read the encoder's
    pretrained file again: a run copied to the robot's computer without it was refused (and weights=timm
    would have downloaded). It is read to train only, as DINO-WM's."""
    from wm.encoders import build_encoder

    base = tiny_config("unet")
    weights = tmp_path / "cnn_pretrained.pt"  # stands in for a downloaded backbone file
    torch.save(build_encoder(base.obs.patch_encoder).state_dict(), weights)
    encoder = dataclasses.replace(base.obs.patch_encoder, weights=str(weights))
    cfg = dataclasses.replace(base, obs=dataclasses.replace(base.obs, patch_encoder=encoder))
    with DemoStore.open(store_path) as store:
        policy = DiffusionPolicy(cfg, Normalizer.fit(store, {"action": "minmax", "proprio": "minmax"})).eval()
    save_policy(policy, tmp_path / "run" / "ckpt_00000001.pt")
    weights.unlink()
    loaded = load_model(str(tmp_path / "run"), controller="policy").model
    obs = {"image": torch.rand(2, N_OBS, 3, H, W), "proprio": torch.rand(2, N_OBS, 2)}
    with torch.no_grad():
        want = policy.sample_actions(obs, generator=torch.Generator().manual_seed(0))
        got = loaded.sample_actions(obs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_distillation_targets_are_fp32_and_the_target_stays_in_eval_mode(store_path, tmp_path, denoiser):
    """A distillation step's autograd-free parts (the frozen encoder, the teacher, the EMA target) run
    fp32 whatever the policy's inference precision (bf16 ran there, and int8 where measured faster), and
    the target keeps dropout off after the trainer's `model.train()` (the policy's train() turned it on:
    the policy samples with the target)."""
    from policies.diffusion.consistency import ConsistencyConfig, ConsistencyDistillation, DistillConfig

    cfg = tiny_config(denoiser)
    cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, dropout=0.1))
    with DemoStore.open(store_path) as store:
        normalizer = Normalizer.fit(store, {"action": "minmax", "proprio": "minmax"})
    losses = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        teacher = DiffusionPolicy(dataclasses.replace(cfg, precision=precision), normalizer)
        save_policy(teacher, tmp_path / precision / "ckpt_00000001.pt")
        student = dataclasses.replace(teacher.cfg, consistency=True, sampler="consistency", sampler_steps=1)
        distill = ConsistencyConfig(student, DistillConfig(), str(tmp_path / precision))
        model = ConsistencyDistillation(distill, normalizer).train()
        target = model.objective.target
        assert model.policy.diffusion is target and not target.training
        assert not any(m.training for m in target.modules()) and model.objective.student.training
        data = WindowDataset(store_path, model.window_spec(), in_memory=True)
        torch.manual_seed(1)
        losses.append(model.compute_loss(data.get_batch(np.arange(16)))[0].item())
        # the policy samples (validation, in-process) at its own precision, not the teacher's its target's
        # layers were copied with; here the other one of the two
        other = "fp32" if precision == "bf16" else "bf16"
        again = ConsistencyDistillation(
            dataclasses.replace(distill, policy=dataclasses.replace(student, precision=other)), normalizer
        )
        layers = [m for m in again.policy.diffusion.modules() if isinstance(m, Bf16Inference)]
        assert layers and {m.inference_precision for m in layers} == {other}
    assert losses[0] == losses[1]


def test_consistency_policy_distilled_from_unet(unet_policy, store_path, tmp_path):
    """`model=consistency` through the registry and the one trainer: the distilled policy keeps the
    teacher's encoder and statistics, predicts the data in one step, and loads back as a policy."""
    from wm.training import setup_training

    teacher, data = unet_policy
    save_policy(teacher, tmp_path / "teacher" / "ckpt_00000001.pt")
    setup = setup_training(
        "consistency", str(store_path), {"sampler_steps": 1}, val_ratio=0.0, teacher=str(tmp_path / "teacher")
    )
    tcfg = TrainerConfig(
        steps=150, batch_size=64, lr=3e-4, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0, ema_decay=0.0,
        val_every=0, ckpt_every=0, log_every=150, seed=0,
    )  # fmt: skip
    out = tmp_path / "cm"
    Trainer(
        setup.model, setup.train_set, tcfg, out, model_type="consistency", model_config=setup.model_config,
        normalizer=setup.normalizer,
    ).fit()  # fmt: skip
    student = setup.model.policy.eval()
    assert student.cfg.consistency and student.sampler == "consistency"
    assert chunk_error(student, data) < 0.02
    loaded = load_model(str(out), controller="policy")
    assert loaded.model_type == "consistency" and isinstance(loaded.model, DiffusionPolicy)
    obs = {k: v[:3] for k, v in data.get_batch([0, 5, 9]).items() if k in ("image", "proprio")}
    with kernels.mode("native"):  # "auto" may pick other kernels in one of the two (a first calibration)
        a = student.sample_actions(obs, generator=torch.Generator().manual_seed(2))
        b = loaded.model.sample_actions(obs, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "key, spec, said",
    [
        ("action", KeySpec((3,), "float32", "action"), r"reads 'action' of shape \(2,\), .* has \(3,\)"),
        ("proprio", KeySpec((5,), "float32", "proprio"), r"reads 'proprio' of shape \(2,\), .* has \(5,\)"),
        ("image", KeySpec((H + 8, W, 3), "uint8", "image"), rf"reads 'image' of shape \({H}, {W}, 3\)"),
    ],
)  # fmt: skip
def test_a_student_on_data_its_teacher_does_not_read_is_refused_before_any_work(
    unet_policy, tmp_path, key, spec, said
):
    """model=consistency took the teacher's config whatever the store held: another action size failed
    at the first step ("'action' is (2, 16, 3), expected (B, 16, 2)", naming neither), run folder written."""
    from wm.training import setup_training

    teacher, _ = unet_policy
    save_policy(teacher, tmp_path / "teacher" / "ckpt_00000001.pt")
    keys = {
        "image": KeySpec((H, W, 3), "uint8", "image"),
        "proprio": KeySpec((2,), "float32", "proprio"),
        "action": KeySpec((2,), "float32", "action"),
    } | {key: spec}
    rng = np.random.default_rng(0)
    with DemoStore.create(tmp_path / "other.zarr", Schema(keys=keys, fps=10)) as store:
        for _ in range(2):
            store.append_episode(
                {k: rng.integers(0, 255, (20, *s.shape)).astype(s.dtype) for k, s in keys.items()}
            )
    with pytest.raises(ValueError, match=f"^teacher .*ckpt_00000001.pt {said}"):
        setup_training("consistency", str(tmp_path / "other.zarr"), {}, teacher=str(tmp_path / "teacher"))


def test_checkpoint_round_trip(unet_policy, tmp_path):
    policy, data = unet_policy
    ema = {k: v.clone() for k, v in policy.state_dict().items()}
    save_checkpoint(
        tmp_path / "ckpt_00000001.pt",
        format=1,
        model_type=policy.model_type,
        model_config=policy.cfg.to_dict(),
        state_dict={k: torch.zeros_like(v) for k, v in ema.items()},  # the EMA weights must win
        ema_state_dict=ema,
        normalizer=policy.normalizer.to_dict(),
    )
    got = load_model(str(tmp_path), controller="policy")  # a run directory: its latest checkpoint
    loaded = got.model
    damaged = {k: v for k, v in policy.normalizer.to_dict().items() if k != "modes"}
    save_checkpoint(
        tmp_path / "damaged" / "ckpt_00000001.pt", model_type=policy.model_type,
        model_config=policy.cfg.to_dict(), state_dict=ema, normalizer=damaged,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="has an unreadable normalizer \\(KeyError: 'modes'\\)"):
        load_model(str(tmp_path / "damaged"), controller="policy")  # it was a KeyError traceback
    teacher = SimpleNamespace(teacher=str(tmp_path / "damaged"))  # a student's teacher= (a traceback too)
    with pytest.raises(CheckpointError, match="has an unreadable normalizer \\(KeyError: 'modes'\\)"):
        teacher_normalizer(teacher)
    # a config a newer version wrote was a usage error ("unknown option", exit 2), a list a traceback; so
    # were weights that are no mapping of tensors
    good = {"model_type": policy.model_type, "normalizer": policy.normalizer.to_dict()}
    config = policy.cfg.to_dict()
    for name, fields, words in [
        ("newer", {"model_config": config | {"future": 1}, "state_dict": ema}, "its model config does not"),
        ("listed", {"model_config": [1, 2], "state_dict": ema}, "its model config does not build (TypeError"),
        ("nostate", {"model_config": config, "state_dict": None}, "its weights are not a mapping of tensors"),
    ]:
        save_checkpoint(tmp_path / name / "ckpt_00000001.pt", **good, **fields)
        with pytest.raises(CheckpointError, match=words.replace("(", r"\(")):
            load_model(str(tmp_path / name), controller="policy")
    assert got.checkpoint["model_type"] == "diffusion_unet" and not loaded.training
    assert loaded.cfg == policy.cfg
    batch = data.get_batch([0, 7, 30])
    obs = {"image": batch["image"], "proprio": batch["proprio"]}
    with kernels.mode("native"):  # "auto" may pick other kernels in one of the two (a first calibration)
        a = policy.sample_actions(obs, generator=torch.Generator().manual_seed(5))
        b = loaded.sample_actions(obs, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.shape == (3, N_EXEC, 2)


def test_policy_gives_its_denoiser_the_committed_actions(store_path, tmp_path):
    """`committed_steps`: the denoiser's input carries min(frozen, committed_steps) committed actions from
    the current step on (normalized) and their mask; without `previous` it carries none. The option
    travels with the checkpoint and is validated."""
    cfg = dataclasses.replace(tiny_config("unet"), committed_steps=3)
    policy, data = train_policy(cfg, store_path, steps=40)
    seen: list[torch.Tensor] = []
    policy.diffusion.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = data.get_batch([0, 7, 30])
    obs = {"image": batch["image"], "proprio": batch["proprio"]}
    previous = batch["action"][:, N_OBS - 1 :]  # (3, HORIZON - N_OBS + 1, 2) raw, due from now on
    chunk = policy.sample_actions(obs, torch.Generator().manual_seed(5), previous, frozen=4, full=True)
    x = seen[0]  # (3, HORIZON, 2 + 2 + 1): noisy actions, committed actions, mask
    assert x.shape == (3, HORIZON, 5) and len(seen) == 5  # EDM Heun, 3 steps: 5 network calls
    start = N_OBS - 1
    want_mask = torch.zeros(HORIZON)
    want_mask[start : start + 3] = 1  # 3 of the 4 frozen: the most it was trained to take
    assert all(torch.equal(s[..., 4], want_mask.expand(3, -1)) for s in seen)
    norm = policy.normalizer.normalize("action", previous[:, :3].float())
    torch.testing.assert_close(x[:, start : start + 3, 2:4], norm)
    assert not x[:, start + 3 :, 2:].any() and not x[:, :start, 2:].any()
    torch.testing.assert_close(chunk[:, :4], previous[:, :4], atol=1e-5, rtol=0)  # frozen by guidance
    seen.clear()
    policy.sample_actions(obs, torch.Generator().manual_seed(5))
    assert not any(s[..., 2:].any() for s in seen)  # nothing committed: zeros
    save_policy(policy, tmp_path / "ckpt_00000001.pt")
    loaded = load_model(str(tmp_path), controller="policy").model
    assert loaded.cfg.committed_steps == 3 and loaded.diffusion.committed == policy.diffusion.committed
    with kernels.mode("native"):  # "auto" may pick other kernels in one of the two (a first calibration)
        a = policy.sample_actions(obs, torch.Generator().manual_seed(6), previous, frozen=2)
        b = loaded.sample_actions(obs, torch.Generator().manual_seed(6), previous, frozen=2)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"committed_steps must be in \[0, horizon - n_obs"):
        dataclasses.replace(cfg, committed_steps=HORIZON - N_OBS + 1)
    # Gradient guidance, chosen at load time, differentiates the denoiser (committed inputs and all) from
    # inside the sampler's inference mode; the frozen actions still end on the committed ones.
    rtc = load_model(str(tmp_path), overrides={"inpaint_guidance": "gradient"}, controller="policy").model
    calls: list[bool] = []
    rtc.diffusion.net.register_forward_pre_hook(lambda module, args: calls.append(args[0].requires_grad))
    chunk = rtc.sample_actions(obs, torch.Generator().manual_seed(5), previous, frozen=4, full=True)
    assert calls == [True] * 5 and torch.isfinite(chunk).all()
    torch.testing.assert_close(chunk[:, :4], previous[:, :4], atol=1e-5, rtol=0)
    calls.clear()
    rtc.sample_actions(obs, torch.Generator().manual_seed(5))
    assert calls == [False] * 5  # nothing to continue: no gradient taken
    with pytest.raises(ValueError, match="inpaint_guidance must be one of"):
        dataclasses.replace(cfg, inpaint_guidance="vjp")


# ---------------------------------------------------------------------- action queue and ensembling
class CounterModel(nn.Module):
    """A chunk model stub: chunk number s (0, 1, ...) holds 100 * s + j at its step j; it records the
    history it was given."""

    io_spec = IOSpec(image_keys=("image",), image_size=(H, W), proprio_key="proprio", proprio_dim=2,
                     action_dim=3, history=N_OBS)  # fmt: skip

    def __init__(self, length: int, predicted: int | None = None) -> None:
        super().__init__()
        self.calls, self.length, self.seen = 0, length, []
        self.predicted = predicted or length  # every action it predicts (`full`)
        self.dummy = nn.Parameter(torch.zeros(1))

    def sample_actions(self, obs, generator=None, full=False) -> torch.Tensor:
        s = self.calls
        self.calls += 1
        self.seen.append(obs["proprio"].clone())
        vals = 100.0 * s + torch.arange(self.predicted if full else self.length, dtype=torch.float32)
        return vals.view(1, -1, 1).expand(2, -1, 3).clone()  # (E=2, L, Da=3)


def raw_obs(t: float) -> dict[str, np.ndarray]:
    """A raw observation of 2 episodes at step t (proprio holds t)."""
    return {"image": np.zeros((2, H, W, 3), np.uint8), "proprio": np.full((2, 2), t, np.float32)}


def test_queue_pops_then_replans():
    model = CounterModel(N_EXEC)
    policy = ChunkPolicy(model)
    assert isinstance(policy, Policy)
    got = [policy.select_action(raw_obs(t))[0, 0].item() for t in range(2 * N_EXEC + 1)]
    assert got == [0, 1, 2, 3, 100, 101, 102, 103, 200]
    assert model.calls == 3 and len(policy.inference_seconds()) == 3
    # The model saw its history: the first observation repeated at the start, then consecutive steps.
    assert model.seen[0][0, :, 0].tolist() == [0.0, 0.0] and model.seen[1][0, :, 0].tolist() == [3.0, 4.0]
    policy.reset()  # forgets the rest of chunk 2, the history and the timings
    assert policy.select_action(raw_obs(9))[0, 0].item() == 300
    assert model.seen[-1][0, :, 0].tolist() == [9.0, 9.0] and len(policy.inference_seconds()) == 1


@pytest.mark.parametrize("executed", [N_EXEC, 1])
def test_temporal_ensembling_weights(executed):
    """Every prediction of a chunk is averaged, as ACT does: only its first n_action_exec were, and a
    policy trained with n_action_exec=1 (the natural choice for ensembling) averaged nothing."""
    m, L = 0.5, N_EXEC + 2  # the chunk's every prediction, beyond the executed ones
    model = CounterModel(executed, predicted=L)
    ens_policy = ChunkPolicy(model, temporal_ensemble=m)
    for t in range(7):
        action = ens_policy.select_action(raw_obs(t))
        # Chunks predicted at steps s = max(0, t-L+1) .. t, oldest first, each predicts 100 s + (t - s).
        steps = list(range(max(0, t - L + 1), t + 1))
        w = [math.exp(-m * i) for i in range(len(steps))]
        expect = sum(wi * (100 * s + (t - s)) for wi, s in zip(w, steps, strict=True)) / sum(w)
        assert action.shape == (2, 3)
        assert action[0, 0].item() == pytest.approx(expect, rel=1e-5)
    assert model.calls == 7  # a new chunk every step
    weights = TemporalEnsembler(0.0).weights(4)
    torch.testing.assert_close(weights, torch.full((4,), 0.25))
    # any m: a strong preference is all on the newest (or oldest) prediction, never inf / inf = NaN
    torch.testing.assert_close(TemporalEnsembler(-120.0).weights(8), torch.eye(8)[-1])
    torch.testing.assert_close(TemporalEnsembler(800.0).weights(3), torch.eye(3)[0])


class PerRowModel(nn.Module):
    """A diffusion policy seen as a `ChunkModel` that takes one generator only (no `row_generators`)."""

    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        self.policy, self.io_spec = policy, policy.io_spec

    def sample_actions(self, obs, generator=None, **guidance) -> torch.Tensor:
        assert generator is None or isinstance(generator, torch.Generator)
        return self.policy.sample_actions(obs, generator, **guidance)


@pytest.mark.parametrize("per_row", [False, True])
def test_chunk_policy_rows_do_not_depend_on_the_batch(per_row):
    """With the episodes named (`EpisodeRows.start_episodes`), an episode's actions are the same whether
    it runs alone or beside others (each row's noise from its own generator), and `reset` ends that."""
    rng = np.random.default_rng(0)
    stats = {k: compute_stats(rng.uniform(-1, 1, (64, 2))) for k in ("action", "proprio")}
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config("unet"), precision="fp32")
    model = DiffusionPolicy(cfg, Normalizer({"action": "minmax", "proprio": "minmax"}, stats)).eval()
    obs = {"image": rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8), "proprio": rng.uniform(-1, 1, (3, 2))}

    def episode(rows: list[int]) -> torch.Tensor:  # two chunks of the episodes 10 + rows
        policy = ChunkPolicy(PerRowModel(model) if per_row else model, seed=3)
        assert isinstance(policy, EpisodeRows)
        policy.reset()
        policy.start_episodes([10 + r for r in rows])
        policy.set_active(np.ones(len(rows), bool))
        return torch.stack([policy.select_action({k: v[rows] for k, v in obs.items()}) for _ in range(8)], 1)

    with kernels.mode("native"):
        alone, batch = episode([2]), episode([0, 1, 2])
        torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=0)
        assert not torch.allclose(batch[1], batch[2])  # other episodes, other noise
        policy = ChunkPolicy(model, seed=3)
        policy.start_episodes([10, 11])
        with pytest.raises(ValueError, match="start_episodes named 2 episodes, the observations hold 3"):
            policy.select_action(obs)
        policy.reset()  # forgets the episodes: one generator for the batch again
        assert policy.select_action(obs).shape == (3, 2)


def test_chunk_policy_reads_raw_observations(unet_policy, store_path):
    """The controller takes what a robot returns (uint8 HWC frames of any size, float proprio): the same
    actions as the model on the converted tensors; wrong inputs get one clear error."""
    policy, data = unet_policy
    controller = chunk_policy(policy)
    batch = data.get_batch([3, 8])
    frames = (batch["image"][:, -1].permute(0, 2, 3, 1) * 255).round().byte().numpy()  # (2, H, W, 3)
    obs = {"image": frames, "proprio": batch["proprio"][:, -1].numpy(), "timestamp": np.zeros(2)}
    chunk = controller.predict_action_chunk(obs)
    assert chunk.shape == (2, N_EXEC, 2) and torch.isfinite(chunk).all()
    big = {**obs, "image": np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)}  # 32 x 32: resized to 16
    controller.reset()
    assert controller.predict_action_chunk(big).shape == (2, N_EXEC, 2)
    assert controller.preview().shape == (2, H, W, 3)
    with pytest.raises(ValueError, match=r"lacks \['proprio'\]"):
        controller.select_action({"image": frames})
    with pytest.raises(ValueError, match="proprio.*another task"):
        controller.select_action({"image": frames, "proprio": np.zeros((2, 5), np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        controller.select_action({"image": frames, "proprio": np.full((2, 2), np.nan, np.float32)})
    with pytest.raises(ValueError, match="camera 'image': expected uint8 frames"):  # was divided by 255 again
        controller.select_action({**obs, "image": frames.astype(np.float32) / 255})
    # finite as float64, inf as the model reads it (float32): NaN actions, the runtime blamed the model
    with pytest.raises(ValueError, match="'proprio' holds non-finite values"):
        controller.select_action({**obs, "proprio": np.full((2, 2), 1e39)})
    controller.reset()
    with pytest.raises(ValueError, match=r"not finite: 'proprio' reaches \S+e\+\d+ after normalization"):
        controller.select_action({**obs, "proprio": np.full((2, 2), 1e25, np.float32)})  # a glitched word
    for key in ("image", "proprio"):  # the model's own API took NaN too, and sampled NaN actions
        nan = batch[key].clone()
        nan[(0, -1) + (0,) * (nan.ndim - 2)] = float("nan")
        with pytest.raises(ValueError, match=f"^NaN or inf values in '{key}': a faulty sensor"):
            policy.sample_actions({**batch, key: nan})


# ---------------------------------------------------------------------- bad input, other encoders
def test_clear_errors(unet_policy, tmp_path):
    policy, data = unet_policy
    batch = data.get_batch([0, 1])
    obs = {"image": batch["image"], "proprio": batch["proprio"]}
    with pytest.raises(ValueError, match=r"lacks camera.*'image'"):
        policy.sample_actions({"wrist": obs["image"], "proprio": obs["proprio"]})
    with pytest.raises(ValueError, match=r"\(32, 32\).*trained on \(16, 16\)"):
        policy.sample_actions({"image": torch.rand(2, 2, 3, 32, 32), "proprio": obs["proprio"]})
    with pytest.raises(ValueError, match="'proprio' has 3 dims"):
        policy.sample_actions({"image": obs["image"], "proprio": torch.zeros(2, 2, 3)})
    # float frames holding 0..255 were encoded as another picture; frames without their To axis were
    # read as cached tokens (rows as tokens, columns as features) and gave actions where the sizes agree
    with pytest.raises(ValueError, match=r"'image' frames hold values in \[\d+, \d+\]: expected float"):
        policy.sample_actions({**obs, "image": (obs["image"] * 255).round()})
    with pytest.raises(ValueError, match=r"camera 'image': expected images \(E, To, 3, H, W\) or cached"):
        policy.sample_actions({**obs, "image": obs["image"][:, -1]})
    # a misspelt nested option was a TypeError, which the apps report as a bug
    with pytest.raises(
        ValueError, match=r"unknown option model.unet.down_dimz; did you mean model.unet.down_dims\?"
    ):
        DiffusionPolicyConfig(unet={"down_dimz": [8, 16]})
    with pytest.raises(ValueError, match="unknown option model.obs.patch_encoder.nme; did you mean"):
        DiffusionPolicyConfig(obs={"patch_encoder": {"nme": "cnn"}})
    other = save_checkpoint(
        tmp_path / "wm.pt",
        model_type="dino_wm",
        model_config={},
        state_dict={},
        ema_state_dict=None,
        normalizer=None,
    )
    with pytest.raises(CheckpointError, match="'dino_wm' model, which cannot serve controller=policy"):
        load_model(str(other), controller="policy")
    with pytest.raises(ValueError, match="consistency"):
        policy.set_sampler("consistency", 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        DiffusionPolicyConfig(horizon=10, n_action_exec=8)


def test_empty_batches_and_a_nan_ensembling_coefficient_are_one_clear_error():
    policy = ChunkPolicy(CounterModel(N_EXEC))
    with pytest.raises(ValueError, match="an observation of 0 episodes"):
        policy.select_action({k: v[:0] for k, v in raw_obs(0).items()})
    with pytest.raises(ValueError, match="^model.temporal_ensemble=nan is not a finite number$"):
        dataclasses.replace(tiny_config("unet"), temporal_ensemble=float("nan"))


def test_short_history_is_padded_and_window_spec(unet_policy):
    policy, data = unet_policy
    spec = policy.window_spec()
    assert spec.offsets["image"] == (-1, 0) and spec.offsets["action"] == tuple(range(-1, HORIZON - 1))
    assert spec.max_pad_after == N_EXEC - 1
    batch = data.get_batch([3])
    one = {"image": batch["image"][:, :1], "proprio": batch["proprio"][:, :1]}
    rep = {k: v.expand(-1, 2, *v.shape[2:]) for k, v in one.items()}
    with kernels.mode("native"):  # the same kernels in both calls (a first call may calibrate)
        a = policy.sample_actions(one, generator=torch.Generator().manual_seed(0))
        b = policy.sample_actions(rep, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_resnet18_spatial_softmax_encoder_trains():
    obs = ObsEncoderConfig(image_keys=("front", "wrist"), image_size=(72, 72), crop=(64, 64), proprio_dim=2)
    cfg = DiffusionPolicyConfig(
        obs=obs,
        action_dim=2,
        horizon=8,
        n_action_exec=4,
        unet=UNetConfig(down_dims=(16, 32), step_embed_dim=16),
    )
    stats = {
        s: [0.0, 0.0] if s in ("min", "mean", "q01") else [1.0, 1.0]
        for s in ("min", "max", "mean", "std", "q01", "q99")
    }
    policy = DiffusionPolicy(
        cfg, Normalizer({"action": "minmax", "proprio": "minmax"}, {"action": stats, "proprio": stats})
    )
    enc = policy.obs_encoder.cameras["front"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in enc.modules())
    batch = {
        "front": torch.rand(3, 2, 3, 72, 72),
        "wrist": torch.rand(3, 2, 3, 72, 72),
        "proprio": torch.rand(3, 2, 2),
        "action": torch.rand(3, 8, 2),
        "action_is_pad": torch.zeros(3, 8, dtype=torch.bool),
    }
    assert policy.encode(batch).shape == (3, 2, 2 * 64 + 2)
    loss, _ = policy.train().compute_loss(batch)
    loss.backward()
    assert enc.backbone[0].weight.grad is not None and enc.backbone[0].weight.grad.abs().sum() > 0
    policy.eval()
    out = policy.sample_actions({k: batch[k] for k in ("front", "wrist", "proprio")})
    assert out.shape == (3, 4, 2) and torch.isfinite(out).all()


def patch_policy_options(patch_encoder: dict, **obs) -> dict:
    """`wm-train model=diffusion_unet` options of a tiny policy on a frozen patch encoder, no crop."""
    return {
        "type": "diffusion_unet",
        "n_obs": N_OBS,
        "horizon": HORIZON,
        "n_action_exec": N_EXEC,
        "unet": {"down_dims": [32, 64], "step_embed_dim": 32},
        "obs": {"backbone": "patch", "crop": None, "feature_dim": 16, "patch_encoder": patch_encoder, **obs},
    }


@pytest.mark.filterwarnings("ignore:encoder 'resnet18' runs with RANDOM weights")
def test_setup_diffusion_trains_a_frozen_patch_encoder_from_the_feature_cache(store_path, tmp_path):
    import shutil

    from wm.training import setup_training

    src = tmp_path / "toy.zarr"
    shutil.copytree(store_path, src)
    model_cfg = patch_policy_options({"name": "resnet18", "allow_random": True})
    kw = dict(image_key="image", proprio_key="proprio", val_ratio=0.0, seed=0, in_memory=True)
    setup = setup_training("diffusion_unet", str(src), model_cfg, **kw)
    assert (
        setup.train_set.path.parent == tmp_path / "feature_cache"
    )  # frozen encoder: training reads the cache
    images = WindowDataset(src, setup.model.window_spec(), in_memory=True)
    idx = [0, 5, 17]
    cached, raw = setup.train_set.get_batch(idx), images.get_batch(idx)
    assert cached["image"].ndim == 4 and raw["image"].ndim == 5  # (B, To, P, D) tokens vs (B, To, C, H, W)
    setup.model.set_precision("fp32")  # the raw path in fp32, whatever "auto" measures on this machine
    enc = setup.model.obs_encoder.eval()
    with torch.no_grad():
        a = enc({"image": cached["image"], "proprio": cached["proprio"]})
        b = enc({"image": raw["image"], "proprio": raw["proprio"]})
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # float16 cache
    setup.model.train()
    assert torch.isfinite(setup.model.compute_loss(cached)[0])

    off = setup_training("diffusion_unet", str(src), model_cfg, **kw, feature_cache="off")
    assert off.train_set.path == src
    model_cfg["obs"]["crop"] = [12, 12]  # random crops need pixels: images, whatever feature_cache says
    assert setup_training("diffusion_unet", str(src), model_cfg, **kw).train_set.path == src


def test_the_chosen_cameras_decide_the_image_size(store_path, tmp_path):
    """obs.image_keys=[wrist] on a store whose first camera is smaller: the policy is built for the
    wrist camera's frames (it took the first camera's size, and training failed on the first batch);
    a misspelt camera or two sizes is one line."""
    from wm.training import setup_training

    two = tmp_path / "sizes.zarr"
    with DemoStore.open(store_path) as src:
        keys = dict(src.schema.keys) | {"wrist": KeySpec((24, 32, 3), "uint8", "image")}
        with DemoStore.create(two, dataclasses.replace(src.schema, keys=keys)) as dst:
            for e in range(src.n_episodes):
                ep = {k: src.read(k, src.episode_slice(e), episode=e) for k in src.keys}
                dst.append_episode(ep | {"wrist": np.zeros((len(ep["action"]), 24, 32, 3), np.uint8)})
    kw = dict(proprio_key="proprio", val_ratio=0.0)  # (image_key=image beside the list is refused)
    setup = setup_training("diffusion_unet", str(two), {"obs": {"image_keys": ["wrist"]}}, **kw)
    assert setup.model.cfg.obs.image_size == (24, 32) and tuple(setup.model.cfg.obs.crop) == (21, 28)
    assert torch.isfinite(setup.model.compute_loss(setup.train_set.get_batch([0, 5]))[0])
    # one name, as `model.obs.image_keys=wrist` gives it, is one camera (it was split: no camera 'w', ...)
    alone = setup_training("diffusion_unet", str(two), {"obs": {"image_keys": "wrist"}}, **kw)
    assert alone.model.cfg.obs.image_keys == ("wrist",)
    with pytest.raises(ValueError, match=r"no camera\(s\) \['wirst'\]; its cameras: \['image', 'wrist'\]"):
        setup_training("diffusion_unet", str(two), {"obs": {"image_keys": ["wirst"]}}, **kw)
    with pytest.raises(ValueError, match=r"cameras \['image', 'wrist'\] differ in frame size"):
        setup_training("diffusion_unet", str(two), {"obs": {"image_keys": ["image", "wrist"]}}, **kw)


def test_ddim_steps_beyond_the_training_steps_are_refused_when_set():
    """Said when the config is built or the sampler switched, not at the first sample (the first
    validation, after training)."""
    refusal = "sampler_steps=200 with the ddim sampler: at most num_train_steps = 100"
    with pytest.raises(ValueError, match=refusal):
        DiffusionPolicyConfig(sampler="ddim", sampler_steps=200)
    from wm.uwm import UWMConfig

    with pytest.raises(ValueError, match="sampler_steps=101 with the ddim sampler"):
        UWMConfig(sampler="ddim", sampler_steps=101)
    DiffusionPolicyConfig(sampler="ddim", sampler_steps=100)
    policy = DiffusionPolicy(tiny_config("unet"), Normalizer({}, {}))
    with pytest.raises(ValueError, match="sampler_steps=500 with the ddim sampler"):
        policy.set_sampler("ddim", 500)
    # one DDIM step ran at timestep 0 (diffusers' "leading" spacing): the starting noise came back
    # as the "clean" sample, the model never used
    one = r"sampler_steps=1 with the ddim sampler: it takes at least 2 \(for a 1-step chunk use the edm"
    with pytest.raises(ValueError, match=one):
        DiffusionPolicyConfig(sampler="ddim", sampler_steps=1)
    with pytest.raises(ValueError, match=one):
        policy.set_sampler("ddim", 1)
    with pytest.raises(ValueError, match=one):
        UWMConfig(sampler="ddim", sampler_steps=1)


def test_two_cameras_with_one_frozen_encoder_train_from_one_feature_cache(store_path, tmp_path):
    """Cameras whose frozen patch encoders share their weights (one pretrained file) are encoded once
    into one cache holding both; cameras whose encoders differ (random weights) train from images."""
    import torchvision

    from wm.training import setup_training

    two = tmp_path / "two.zarr"
    with DemoStore.open(store_path) as src:
        keys = dict(src.schema.keys) | {"wrist": src.schema.keys["image"]}
        with DemoStore.create(two, dataclasses.replace(src.schema, keys=keys)) as dst:
            for e in range(src.n_episodes):
                ep = {k: src.read(k, src.episode_slice(e), episode=e) for k in src.keys}
                dst.append_episode(ep | {"wrist": ep["image"][:, ::-1].copy()})  # another view: flipped
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    model_cfg = patch_policy_options(
        {"name": "resnet18", "weights": str(tmp_path / "resnet18.pth")}, image_keys=["image", "wrist"]
    )
    kw = dict(image_key="image", proprio_key="proprio", val_ratio=0.0, seed=0, in_memory=True)
    setup = setup_training("diffusion_unet", str(two), model_cfg, **kw)
    assert setup.train_set.path.name.startswith("two__image+wrist__resnet18__")
    idx = [0, 9, 30]
    cached = setup.train_set.get_batch(idx)
    raw = WindowDataset(two, setup.model.window_spec(), in_memory=True).get_batch(idx)
    setup.model.set_precision("fp32")
    enc = setup.model.obs_encoder.eval()
    with torch.no_grad():
        a = enc({k: cached[k] for k in ("image", "wrist", "proprio")})
        b = enc({k: raw[k] for k in ("image", "wrist", "proprio")})
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # both cameras' features, float16 cache
    setup.model.train()
    assert torch.isfinite(setup.model.compute_loss(cached)[0])

    model_cfg["obs"]["patch_encoder"] = {"name": "resnet18", "allow_random": True}  # one init per camera
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert setup_training("diffusion_unet", str(two), model_cfg, **kw).train_set.path == two


def test_unet_inference_paths_match_training_path():
    """The no-autograd conv paths (the kernels measured fastest for each layer shape, fp32 and bf16;
    PyTorch's bf16 kernels everywhere with measurement off) compute what nn.Conv1d does; the bf16 weight
    copies follow the fp32 weights when those change. (Every single kernel: tests/test_kernels.py.)"""
    from policies.diffusion import unet
    from policies.diffusion.precision import set_inference_precision
    from wm import kernels

    torch.manual_seed(0)
    net = unet.ConditionalUnet1D(UNetConfig(down_dims=(32, 64, 256), step_embed_dim=32), 2, 2 * 8).eval()
    for batch in (1, 3):
        x, t, cond = torch.randn(batch, 16, 2), torch.linspace(3.0, 99.0, batch), torch.randn(batch, 2, 8)
        set_inference_precision(net, "fp32")
        with torch.enable_grad():
            ref = net(x, t, cond)  # nn.Conv1d's own forward
        with torch.no_grad():
            torch.testing.assert_close(net(x, t, cond), ref, rtol=1e-5, atol=1e-5)
            set_inference_precision(net, "bf16")
            measured = net(x, t, cond)
            with kernels.mode("native"):
                low = net(x, t, cond)
        assert low.dtype == measured.dtype == torch.float32
        assert ((measured - ref).norm() / ref.norm()).item() < 0.03
        rel = ((low - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.03, rel
    with torch.no_grad(), kernels.mode("native"):
        for p in net.parameters():  # an optimizer step: the cached bf16 copies must follow
            p.mul_(1.5)
        low2 = net(x, t, cond)  # the version-keyed cache, not set_inference_precision, must refresh
    with torch.enable_grad():
        ref2 = net(x, t, cond)  # autograd on: the fp32 weights, whatever the inference precision
    assert ((low2 - ref2).norm() / ref2.norm()).item() < 0.03
    with pytest.raises(ValueError, match="precision"):
        set_inference_precision(net, "fp16")


@pytest.mark.parametrize("kind", ["resnet18", "transformer"])
def test_bf16_copies_match_and_follow_the_weights(kind):
    """The whole-module bf16 paths (the ResNet-18 image backbone; the transformer denoiser under
    autocast) stay within a few % of fp32, add nothing to the state dict, leave autograd-on calls in
    fp32, and rebuild their copy after the weights change. Measurement is off (`kernels.mode("native")`)
    so the bf16 copy runs whatever this machine's timings say."""
    from policies.diffusion.obs_encoder import ObsEncoderConfig, ResNetKeypoints
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.transformer import TransformerDenoiser
    from wm import kernels

    torch.manual_seed(0)
    if kind == "resnet18":
        net = ResNetKeypoints(ObsEncoderConfig(feature_dim=16)).eval()
        args: tuple = (torch.rand(2, 3, 96, 96),)  # a 3 x 3 map for the spatial softmax
    else:
        cfg = TransformerConfig(dim=32, depth=2, heads=2, dropout=0.0)
        net = TransformerDenoiser(cfg, 2, 8, 16, 2).eval()
        args = (torch.randn(2, 16, 2), torch.tensor([3.0, 90.0]), torch.randn(2, 2, 8))
    keys = set(net.state_dict())
    with torch.no_grad(), kernels.mode("native"):
        ref = net(*args)
        set_inference_precision(net, "bf16")
        low = net(*args)
        assert low.dtype == torch.float32 and not torch.equal(low, ref)
        assert ((low - ref).norm() / ref.norm()).item() < 0.03
        assert set(net.state_dict()) == keys  # the bf16 copy is no submodule
        for p in net.parameters():  # as an optimizer step would
            p.mul_(0.7).add_(0.01)
        low2 = net(*args)
    with torch.enable_grad():
        ref2 = net(*args)  # autograd on: the fp32 path, whatever the flag
    assert ref2.requires_grad
    assert not torch.allclose(ref2, ref, atol=1e-3)
    assert ((low2 - ref2).norm() / ref2.norm()).item() < 0.03
    set_inference_precision(net, "fp32")
    with torch.no_grad():
        torch.testing.assert_close(net(*args), ref2.detach())


def test_policy_precision_option(unet_policy, store_path):
    """fp32, bf16 (measured per layer, and everywhere with measurement off) and "auto" (the default:
    bf16 on hardware with bf16 units; either way int8 weights where measured faster) give chunks within
    0.05 of fp32; the policy reports the precision it resolved to."""
    from wm import kernels
    from wm.precision import cpu_has_bf16

    policy, _ = unet_policy
    transformer, _ = train_policy(tiny_config("transformer"), store_path, steps=30)
    assert DiffusionPolicyConfig().precision == "auto" and policy.precision_setting == "auto"
    obs = {"image": torch.rand(2, N_OBS, 3, H, W), "proprio": torch.rand(2, N_OBS, 2)}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for pol in (policy, transformer):
        try:
            pol.set_precision("fp32")
            a32 = pol.sample_actions(obs, generator=gen())
            pol.set_precision("bf16")
            assert pol.precision == "bf16"
            measured = pol.sample_actions(obs, generator=gen())
            with kernels.mode("native"):
                a16 = pol.sample_actions(obs, generator=gen())
            pol.set_precision("auto")
            assert pol.precision == ("bf16" if cpu_has_bf16() else "fp32")
            auto = pol.sample_actions(obs, generator=gen())
            if cpu_has_bf16():  # "bf16"'s choices, plus int8 weights where measured faster (VNNI CPUs)
                int8 = any(rec["choice"].endswith("int8") for _, rec, _ in kernels.selector().log)
                if int8:
                    assert (auto - measured).abs().max() < 0.05
                else:
                    torch.testing.assert_close(auto, measured)
            else:  # fp32, with int8 weights where measured faster
                assert (auto - a32).abs().max() < 0.05
            pol.set_precision("fp32")
            assert pol.precision == "fp32"
        finally:
            pol.set_precision("auto")
        assert (measured - a32).abs().max() < 0.05, pol.cfg.denoiser
        assert (a16 - a32).abs().max() < 0.05 and not torch.equal(a16, a32), pol.cfg.denoiser
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(tiny_config("unet"), precision="int8")


def test_crop_follows_the_store_frames(store_path):
    """crop=auto is 7/8 of the store's frames; a crop that does not fit is one error naming the option."""
    from policies.diffusion.entry import crop_for
    from wm.training import setup_training

    assert crop_for("auto", (96, 96)) == [84, 84] and crop_for("auto", (64, 48)) == [56, 42]
    assert crop_for(None, (64, 64)) is None and crop_for([60, 60], (64, 64)) == [60, 60]
    opts = {"n_obs": N_OBS, "horizon": HORIZON, "n_action_exec": N_EXEC, "unet": {"down_dims": [16, 32]}}
    setup = setup_training("diffusion_unet", str(store_path), opts, val_ratio=0.0)
    assert setup.model.cfg.obs.crop == (14, 14)  # the 16 x 16 toy frames
    with pytest.raises(ValueError, match=r"model\.obs\.crop=\[84,84\] does not fit the store's 16x16"):
        setup_training("diffusion_unet", str(store_path), {**opts, "obs": {"crop": [84, 84]}}, val_ratio=0.0)


def test_validation_returns_the_metrics_its_entry_declares(store_path, tmp_path):
    """wm-train checks trainer.best_metric against the entry's val_metrics before any work; they are
    the names validation gives (one function for both denoisers; the consistency student validates as
    its policy does)."""
    from wm.registry import model_entry
    from wm.training import setup_training

    opts = {"n_obs": N_OBS, "horizon": HORIZON, "n_action_exec": N_EXEC, "unet": {"down_dims": [16, 32]}}
    setup = setup_training("diffusion_unet", str(store_path), opts, val_ratio=0.3, seed=0)
    metrics = setup.val_fn(setup.model.eval(), 1, tmp_path)
    names = {model_entry(m).val_metrics for m in ("diffusion_unet", "diffusion_transformer", "consistency")}
    assert names == {tuple(metrics)}
