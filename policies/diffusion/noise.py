"""Noise schedule, training loss and samplers for action diffusion.

One trained network serves every sampler. Training is DDPM (Ho et al.) with Diffusion Policy's
`squaredcos_cap_v2` schedule over `num_train_steps` discrete steps; the network predicts the noise
(`prediction_type="epsilon"`) or the clean sample (`"sample"`).

Samplers all work in the EDM / Karras "variance exploding" view of the same schedule: a VP sample
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is x = x_t / sqrt(abar_t) = x0 + sigma_t eps with
sigma_t = sqrt((1 - abar_t) / abar_t). `Diffusion.denoise(x, sigma)` scales x back to the VP input,
maps sigma to a (fractional) timestep by interpolating log sigma over the training table (as
k-diffusion does), runs the network and converts its output to a denoised estimate x0.

    ddpm       ancestral sampling over all training steps (Diffusion Policy's default, slow)
    ddim       DDIM with eta = 0 on `steps` evenly spaced timesteps (`ddim_timesteps`); in the VE view this is
               Euler on the probability-flow ODE where no x0 is clipped (clip_sample keeps the unclipped
               eps, as diffusers' DDIMScheduler does by default)
    edm        Karras sigmas (rho = 7) between sigma_min and sigma_max, then Heun (2nd order, 2 * steps
               - 1 network calls) or DPM-Solver++(2M) (multistep 2nd order, `steps` network calls)
    consistency  a distilled consistency model (see `consistency.py`): 1 or more jumps to x0

Every sampler can be guided by soft inpainting (`Inpaint`, for real-time chunking), so the sample
continues a chunk already being executed, in one of two ways:

    estimate   each denoised estimate x0_hat is replaced by W * target + (1 - W) * x0_hat before the
               sampler uses it (no pass through the network: the steps left free only learn of the
               target through the next noisy sample, which few steps leave little room for)
    gradient   RTC's guidance (Black et al. 2025, pseudo-inverse guidance), then the same edit:
               x0_hat + sigma * k * J^T e with e = W * (target - x0_hat) and J = d x0_hat / d x the
               denoiser's Jacobian (one vector-Jacobian product a network call, in fp32), k = min(max_weight,
               (1 + sigma^2) / sigma): RTC's weight (unit-variance data) written in sigma, tau = 1 / (1 +
               sigma). The correction moves the free steps too, by how the network couples them to the
               guided ones; the edit then keeps the committed steps exactly on their targets.

A network can also be trained to continue committed actions (`Committed`, training-time real-time
chunking, Black et al. 2025): it then takes, beside the noisy chunk, the clean committed actions and a
mask (2 * Da + 1 input channels); training draws a random number of leading actions from the current
step on as committed, gives them as input and leaves them out of the loss. At sampling time the guide's
`given` steps are the ones the network takes as input (its targets there are the committed actions).

Shapes: x (B, Ta, Da) normalized actions; cond (B, To, Dc) observation features or None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wm.options import check_numbers, is_whole

PREDICTION_TYPES = ("epsilon", "sample")
SAMPLERS = ("ddpm", "ddim", "edm", "consistency")
EDM_SOLVERS = ("dpmpp_2m", "heun")
SIGMA_DATA = 0.5  # data scale assumed by the consistency parametrization (actions in [-1, 1])
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "linear_scaled")
MAX_TERMINAL_SIGNAL = 0.05  # sqrt(alpha_bar) at the last training step: sampling starts from pure noise
# a sampler's noise source: one generator for the batch, one per row (a row's draws then do not depend on
# the batch it is sampled in), or None (torch's global one)
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> Tensor:
    """Standard normal noise (B, ...) from `generator`; with one generator per row, row b from the b-th
    (its own stream, the same whatever the batch)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} row generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])


@dataclass(frozen=True)
class NoiseConfig:
    """Training schedule and the continuous-sigma range of the EDM / consistency samplers.

    `clip_sample` clamps every denoised estimate to [-clip_range, clip_range] (Diffusion Policy clips
    at 1: actions are min-max normalized). EDM sigmas run from `sigma_max` (capped at the schedule's
    largest) to `sigma_min` (raised to the schedule's smallest, 0.025 for squaredcos with 100 steps).
    Few-step defaults (sigma 5 -> 0.2, rho 7, Heun) were picked on a 2-mode toy: from sigma_max = 80
    or down to the schedule's smallest sigma, 3 steps leave most samples between the modes, because
    the few network calls then land where the modes are not yet told apart or are already fixed.
    The consistency model uses the schedule's smallest sigma as its boundary (f(x, sigma) = x there).
    """

    num_train_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"  # or "linear", "linear_scaled": see `make_betas`
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_range: float = 1.0
    sigma_max: float = 5.0
    sigma_min: float = 0.2
    rho: float = 7.0
    edm_solver: str = "heun"

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "noise")  # 2.5 steps was a TypeError in range()
        if self.num_train_steps < 2:
            raise ValueError(f"num_train_steps must be >= 2, got {self.num_train_steps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.edm_solver not in EDM_SOLVERS:
            raise ValueError(f"edm_solver must be one of {EDM_SOLVERS}, got {self.edm_solver!r}")
        if not self.clip_range > 0 or not self.sigma_max > 0 or not self.rho > 0:
            raise ValueError("clip_range, sigma_max and rho must be > 0")
        if not math.isfinite(self.rho):  # rho = inf made every Karras sigma 1
            raise ValueError(f"rho must be finite, got {self.rho}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be in (0, sigma_max), got {self.sigma_min}")


def make_betas(schedule: str, n: int) -> Tensor:
    """(n,) float64 betas. squaredcos_cap_v2: Nichol & Dhariwal's cosine schedule, betas capped at 0.999.
    linear: DDPM's betas 1e-4 .. 0.02 over n steps, as diffusers' `linear` (so a checkpoint trained
    with it keeps its schedule); it reaches noise only for n of about 600 or more (`check_reaches_noise`).
    linear_scaled: the same scaled by 1000 / n (Nichol & Dhariwal's code), which ends in noise for any n."""
    if schedule in ("linear", "linear_scaled"):
        scale = 1000.0 / n if schedule == "linear_scaled" else 1.0
        return torch.linspace(1e-4 * scale, 0.02 * scale, n, dtype=torch.float64).clamp(max=0.999)

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64
    )


def check_steps(steps: int, name: str = "steps") -> None:
    """A sampler's step count is a whole number >= 1 (2.5 was a TypeError deep in torch, NaN one silent
    step)."""
    if not is_whole(steps) or steps < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {steps!r}")


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """DDIM's `steps` timesteps out of T, from the noisiest: i * T / steps rounded down, i = steps-1..0.
    Where `steps` divides T these are diffusers' "leading" ones (LeRobot's DDIM-10 on T = 100: 90, 80,
    .., 0); elsewhere "leading" (i * (T // steps)) started mid-noise: DDIM-51 on T = 100 at t = 50,
    its samples biased, where these start at 98."""
    return [i * T // steps for i in range(steps)][::-1]


def check_ddim_steps(sampler: str, steps: int, cfg: NoiseConfig) -> None:
    """DDIM takes 2 steps or more, and at most one per training step; said when a config or an override
    sets it, not at the first sample (after a whole training run, at its first validation). One DDIM step
    on the timesteps it shares with diffusers ("leading": 0 for one step) treated the starting noise as
    a clean sample and returned it: the model was never used."""
    if sampler == "ddim" and steps < 2:
        raise ValueError(
            f"sampler_steps={steps} with the ddim sampler: it takes at least 2 (for a 1-step chunk use the "
            "edm sampler, whose one step predicts the clean sample from pure noise)"
        )
    if sampler == "ddim" and steps > cfg.num_train_steps:
        raise ValueError(
            f"sampler_steps={steps} with the ddim sampler: at most num_train_steps = {cfg.num_train_steps}"
        )


def check_reaches_noise(options: dict[str, Any], where: str = "model.noise") -> None:
    """Refuse, before training, a schedule whose last step keeps more than `MAX_TERMINAL_SIGNAL` of the
    signal: sampling starts from pure noise, which such a model never saw (diffusers' `linear` with 100
    steps keeps 60 %). `options` are the user's noise options; loading a checkpoint never checks this."""
    if not isinstance(options, Mapping):
        return  # NoiseConfig says what is wrong
    schedule = options.get("beta_schedule", NoiseConfig.beta_schedule)
    n = options.get("num_train_steps", NoiseConfig.num_train_steps)
    if schedule not in BETA_SCHEDULES or not isinstance(n, int) or n < 2:
        return  # NoiseConfig says what is wrong
    signal = float(torch.cumprod(1 - make_betas(schedule, n), 0)[-1].sqrt())
    if signal > MAX_TERMINAL_SIGNAL:
        raise ValueError(
            f"{where}.beta_schedule={schedule} with num_train_steps={n} keeps {signal:.0%} of the signal at "
            f"its last step (sampling starts from pure noise, which training never shows); use "
            f"linear_scaled or squaredcos_cap_v2, or more steps"
        )


@dataclass(frozen=True)
class Inpaint:
    """Soft inpainting towards `target`, per action step (see the module docstring for the two ways).

    target (B, Ta, Da) normalized actions (anything where the weight is 0); weight (Ta,) or (B, Ta) in
    [0, 1], e.g. from `inpaint_weights`. Each estimate is edited, x0 -> W * target + (1 - W) * x0
    (`__call__`): where the weight is 1 the sample ends exactly on the target (up to float rounding),
    where it is 0 it is left to the model. max_weight None: only that; a number > 0: RTC's gradient
    guidance first, its weight clipped there. given (Ta,) or (B, Ta) bool, or None: the steps whose
    target a network trained with `Committed` takes as input (ignored by other networks)."""

    target: Tensor
    weight: Tensor
    given: Tensor | None = None
    max_weight: float | None = None

    def __post_init__(self) -> None:
        if self.max_weight is not None and not self.max_weight > 0:
            raise ValueError(f"max_weight must be > 0 or None (edit the estimate), got {self.max_weight}")

    def error(self, x0: Tensor) -> Tensor:
        """W * (target - x0), (B, Ta, Da): what gradient guidance pulls the estimate x0 by."""
        return _per_step(self.weight.to(x0)) * (self.target.to(x0) - x0)

    def detached(self) -> Inpaint:
        """The same guide on plain copies of its tensors (usable by autograd after inference mode)."""
        given = None if self.given is None else self.given.clone()
        return Inpaint(self.target.clone(), self.weight.clone(), given, self.max_weight)

    def __call__(self, x0: Tensor) -> Tensor:
        """x0 (B, Ta, Da) -> the guided estimate, same shape."""
        return torch.lerp(x0, self.target.to(x0), _per_step(self.weight.to(x0)))


def _over(sigma: Tensor, x: Tensor) -> Tensor:
    """A 0-d sigma as it is, a (B,) one shaped to broadcast over x (B, ...)."""
    return sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma


def _per_step(w: Tensor) -> Tensor:
    """A (Ta,) or (B, Ta) per-step tensor broadcast over (B, Ta, Da)."""
    return w.view(1, -1, 1) if w.ndim == 1 else w[..., None]


@dataclass(frozen=True)
class Committed:
    """Training-time real-time chunking: the network is trained to continue committed actions that start
    at chunk index `start` (the current step): none for a share `p_none` of the samples (the whole chunk
    sampled from the observations, as a synchronous robot and each episode's first chunk ask), else
    1..`max_steps` drawn uniformly."""

    start: int
    max_steps: int
    p_none: float = 0.5

    def __post_init__(self) -> None:
        if self.start < 0 or self.max_steps < 1 or not 0 <= self.p_none < 1:
            raise ValueError(
                f"committed actions need start >= 0, max_steps >= 1 and p_none in [0, 1), got {self}"
            )

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> Inpaint:
        """x0 (B, Ta, Da) clean normalized chunks -> a guide whose `given` (B, Ta) marks a random number
        of committed steps per sample (0..max_steps) from `start` on, their targets x0's actions."""
        B, Ta = x0.shape[:2]
        if self.start + self.max_steps >= Ta:
            raise ValueError(
                f"{self.max_steps} committed actions from step {self.start} leave none to sample of {Ta}"
            )
        d = torch.randint(1, self.max_steps + 1, (B, 1), device=x0.device, generator=generator)
        none = torch.rand(B, 1, device=x0.device, generator=generator) < self.p_none
        d = d.masked_fill(none, 0)
        i = torch.arange(Ta, device=x0.device)[None]  # (1, Ta)
        given = (i >= self.start) & (i < self.start + d)  # (B, Ta)
        return Inpaint(x0, given.float(), given)


def inpaint_weights(length: int, start: int, frozen: int, overlap: int) -> Tensor:
    """(length,) RTC's soft mask over a chunk of `length` steps whose current step is at index `start`.

    Counting i from the current step: 1 for the `frozen` committed actions (i < d), then over the rest of
    the previous chunk's `overlap` actions (d <= i < n) w_i = c_i (e^c_i - 1) / (e - 1) with
    c_i = (n - i) / (n - d + 1) decaying from about 1 to about 0, and 0 beyond the previous chunk and
    for the steps before the current one."""
    if not 0 <= start < length or start + frozen >= length:
        raise ValueError(f"{frozen} frozen actions leave none to sample of the {length - start} from now on")
    if not 0 <= frozen <= overlap:
        raise ValueError(f"frozen must be in [0, overlap = {overlap}], got {frozen}")
    i = torch.arange(length - start, dtype=torch.float64)
    c = ((overlap - i) / (overlap - frozen + 1)).clamp(0, 1)
    w = c * torch.expm1(c) / math.expm1(1.0)
    w[:frozen] = 1.0
    return torch.cat([w.new_zeros(start), w]).float()


def inpaint_guide(
    previous: Tensor,
    horizon: int,
    start: int,
    frozen: int,
    given: int = 0,
    max_weight: float | None = None,
) -> Inpaint:
    """The guide over a normalized (E, horizon, Da) chunk towards `previous` (E, n, Da), normalized
    actions of the chunk being executed, previous[:, 0] placed at index `start` (the current step);
    actions past the chunk's end cannot guide it. The first `given` (<= frozen) of them are also the
    committed actions a network trained with `Committed` takes as input. max_weight: `Inpaint`'s (None:
    edit the estimate; a number: gradient guidance)."""
    if not 0 <= given <= frozen:
        raise ValueError(f"given must be in [0, frozen = {frozen}], got {given}")
    n = min(previous.shape[1], horizon - start)
    target = previous.new_zeros(previous.shape[0], horizon, previous.shape[2])  # (E, horizon, Da)
    target[:, start : start + n] = previous[:, :n]
    mask = torch.zeros(horizon, dtype=torch.bool, device=previous.device)
    mask[start : start + given] = True
    weight = inpaint_weights(horizon, start, frozen, n).to(previous.device)
    return Inpaint(target, weight, mask, max_weight)


def masked_mean(err: Tensor, ok: Tensor | None) -> Tensor:
    """Mean of err (B, N) over the True entries of ok (B, N) (None: all); 0 (with a gradient) when there
    are none."""
    if ok is None:
        return err.mean()
    w = ok.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)


def scored_steps(valid: Tensor | None, guide: Inpaint | None) -> Tensor | None:
    """The steps a loss scores: the valid ones (bool (B, Ta), None: all) that were not given to the
    network (`guide.given`); None: all."""
    if guide is None or guide.given is None:
        return valid
    free = ~guide.given
    return free if valid is None else valid & free


Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x_t (B,Ta,Da), t (B,), cond) -> prediction
# (x (B, Ta, Da) VE sample, sigma, cond, guide) -> (denoised estimate (B, Ta, Da), what else a sampler needs)
Estimator = Callable[[Tensor, Tensor, Tensor | None, Inpaint | None], tuple[Tensor, Tensor | None]]


class Diffusion(nn.Module):
    """A denoising network `net(x_t, t, cond)` with its noise schedule, loss and samplers.

    With `consistency=True` the module is a distilled consistency model: `denoise` returns
    f(x, sigma) = c_skip(sigma) x + (1 - c_skip(sigma)) D(x, sigma), exactly x at the schedule's
    smallest sigma, and only the "consistency" sampler applies. With `committed` the network takes the
    committed actions as input beside the noisy ones (2 * Da + 1 channels, see `Committed`)."""

    def __init__(
        self, net: nn.Module, cfg: NoiseConfig, consistency: bool = False, committed: Committed | None = None
    ) -> None:
        super().__init__()
        self.net, self.cfg, self.consistency, self.committed = net, cfg, consistency, committed
        betas = make_betas(cfg.beta_schedule, cfg.num_train_steps)
        abar = torch.cumprod(1 - betas, 0)
        sigmas = ((1 - abar) / abar).sqrt()
        # Schedule tables are not weights: non-persistent, rebuilt from the config.
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)
        self.sigma_max = min(cfg.sigma_max, float(sigmas[-1]))
        self.table_sigma_min = float(sigmas[0])
        self.sigma_min = max(cfg.sigma_min, self.table_sigma_min)
        self._check_sigma_range()

    def _check_sigma_range(self) -> None:
        """Refuse, once, an EDM / consistency sigma range that the schedule empties (sigma_min above its
        largest sigma: the sigmas rose) or that float32 cannot hold (a tiny rho: NaN actions)."""
        c = self.cfg
        if c.sigma_max <= self.table_sigma_min:  # sigma_min, whatever it was, is raised to that
            raise ValueError(
                f"noise.sigma_max={c.sigma_max} is not above the schedule's smallest sigma "
                f"{self.table_sigma_min:.4g} ({c.beta_schedule}, {c.num_train_steps} steps)"
            )
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"noise.sigma_min={c.sigma_min} is not below the schedule's largest sigma "
                f"{self.sigma_max:.4g} ({c.beta_schedule}, {c.num_train_steps} steps)"
            )
        try:
            ok = all(bool(self.karras_sigmas(2, s).isfinite().all()) for s in (None, self.table_sigma_min))
        except OverflowError:
            ok = False
        if not ok:
            raise ValueError(f"noise.rho={c.rho} overflows the sigmas (sigma ** (1 / rho)); use a larger rho")

    # ------------------------------------------------------------------ training
    def loss(self, x0: Tensor, cond: Tensor | None, valid: Tensor | None = None) -> Tensor:
        """DDPM loss: MSE of the network's epsilon / sample prediction at a random timestep per sample.
        x0 (B, Ta, Da) normalized; valid (B, Ta) bool, False steps (padding) are left out, and so are the
        committed steps a `Committed` network is given."""
        B = x0.shape[0]
        t = torch.randint(0, self.cfg.num_train_steps, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        abar = self.alphas_cumprod[t].view(B, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        guide = self.draw_committed(x0)
        pred = self.run_net(x_t, t.float(), cond, guide)
        target = noise if self.cfg.prediction_type == "epsilon" else x0
        err = F.mse_loss(pred, target, reduction="none").mean(-1)  # (B, Ta)
        return masked_mean(err, scored_steps(valid, guide))

    def draw_committed(self, x0: Tensor) -> Inpaint | None:
        """Training: a random committed prefix per sample of x0 (B, Ta, Da) for a `Committed` network,
        else None."""
        return None if self.committed is None else self.committed.draw(x0)

    def run_net(self, x_vp: Tensor, t: Tensor, cond: Tensor | None, guide: Inpaint | None) -> Tensor:
        """The network on the VP input x_vp (B, Ta, Da) at timesteps t (B,); a `Committed` network also
        gets the guide's given steps: [x_vp, given targets (0 elsewhere), given mask] (B, Ta, 2 Da + 1)."""
        if self.committed is None:
            return self.net(x_vp, t, cond)
        B, Ta, Da = x_vp.shape
        if guide is None or guide.given is None:
            return self.net(torch.cat([x_vp, x_vp.new_zeros(B, Ta, Da + 1)], -1), t, cond)
        mask = _per_step(guide.given.to(x_vp)).expand(B, Ta, 1)
        values = guide.target.to(x_vp) * mask
        return self.net(torch.cat([x_vp, values, mask], -1), t, cond)

    # ------------------------------------------------------------------ the denoiser in sigma space
    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional training timestep(s) with that sigma (log-sigma interpolation over the table)."""
        log_sigma = sigma.clamp(float(self.sigmas[0]), float(self.sigmas[-1])).log()
        hi = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return (hi - 1).to(sigma.dtype) + (log_sigma - lo_v) / (hi_v - lo_v)

    def raw_denoise(
        self, x: Tensor, sigma: Tensor, cond: Tensor | None, guide: Inpaint | None = None
    ) -> Tensor:
        """Denoised estimate x0 of the VE sample x = x0 + sigma * eps; sigma 0-d (one noise level for the
        batch) or (B,). Clipped when the config says so. `guide` only gives a `Committed` network its
        committed actions; it is not applied here."""
        t = self.sigma_to_t(sigma).expand(x.shape[0])  # (B,)
        s = _over(sigma, x)
        out = self.run_net(x / (1 + s**2).sqrt(), t, cond, guide)
        x0 = x - s * out if self.cfg.prediction_type == "epsilon" else out
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_range, self.cfg.clip_range)
        return x0

    def c_skip(self, sigma: Tensor) -> Tensor:
        """Consistency skip weight: 1 at the schedule's smallest sigma (f(x, sigma) = x there), -> 0 above."""
        return SIGMA_DATA**2 / ((sigma - self.table_sigma_min) ** 2 + SIGMA_DATA**2)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None, guide: Inpaint | None = None) -> Tensor:
        """x0 estimate: the network's (diffusion) or the consistency function f(x, sigma) (consistency).
        `guide` as in `raw_denoise` (given steps only, not applied)."""
        x0 = self.raw_denoise(x, sigma, cond, guide)
        if not self.consistency:
            return x0
        c = self.c_skip(_over(sigma, x))
        return c * x + (1 - c) * x0

    def _estimate(self, x: Tensor, sigma: Tensor, cond: Tensor | None, guide: Inpaint | None) -> Tensor:
        """The denoised estimate the samplers step with: `denoise`, then the guide applied."""
        return self._guided(x, sigma, cond, guide, self._denoise_only)[0]

    def _denoise_only(
        self, x: Tensor, sigma: Tensor, cond: Tensor | None, guide: Inpaint | None
    ) -> tuple[Tensor, None]:
        return self.denoise(x, sigma, cond, guide), None

    def _guided(
        self, x: Tensor, sigma: Tensor, cond: Tensor | None, guide: Inpaint | None, estimate: Estimator
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The one place every sampler applies its guidance: (guided estimate, unguided estimate, the
        estimator's other output) of `estimate(x, sigma, cond, guide)` at the VE sample x (B, Ta, Da)."""
        if guide is None or guide.max_weight is None:
            x0, aux = estimate(x, sigma, cond, guide)
            return (x0 if guide is None else guide(x0)), x0, aux
        # Gradient guidance differentiates the estimate with respect to x. The sampler runs under
        # inference mode, whose tensors autograd cannot save: it works on plain copies.
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            sig, g = sigma.clone(), guide.detached()
            x0, aux = estimate(xg, sig, None if cond is None else cond.clone(), g)
            (vjp,) = torch.autograd.grad(x0, xg, g.error(x0.detach()))
        s = _over(sigma, x)
        k = ((1 + s**2) / s).clamp(max=guide.max_weight)
        x0, aux = x0.detach(), None if aux is None else aux.detach()
        corrected = x0 + s * k * vjp
        if self.cfg.clip_sample:  # as every denoised estimate is (the correction took it out of range)
            corrected = corrected.clamp(-self.cfg.clip_range, self.cfg.clip_range)
        return guide(corrected), x0, aux

    def karras_sigmas(
        self, steps: int, sigma_min: float | None = None, device: torch.device | None = None
    ) -> Tensor:
        """(steps + 1,) decreasing sigmas: Karras rho spacing from sigma_max to sigma_min (default the
        config's), then 0."""
        sigma_min = self.sigma_min if sigma_min is None else sigma_min
        ramp = torch.linspace(0, 1, steps, device=device) if steps > 1 else torch.zeros(1, device=device)
        inv_max, inv_min = self.sigma_max ** (1 / self.cfg.rho), sigma_min ** (1 / self.cfg.rho)
        sig = (inv_max + ramp * (inv_min - inv_max)) ** self.cfg.rho
        return torch.cat([sig, sig.new_zeros(1)])

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        shape: tuple[int, ...],
        cond: Tensor | None,
        sampler: str = "edm",
        steps: int = 3,
        generator: Generators = None,
        guide: Inpaint | None = None,
    ) -> Tensor:
        """Draw samples (shape) given cond (B, To, Dc); `steps` is ignored by ddpm (all training steps).
        `generator`: one for the batch or one per row (`randn`). `guide` inpaints every denoised estimate
        (every sampler takes it); None: unguided."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if (sampler == "consistency") != self.consistency:
            what = (
                "a consistency model samples only" if self.consistency else "only a distilled model samples"
            )
            raise ValueError(f"sampler {sampler!r}: {what} with 'consistency'")
        check_steps(steps)
        device = self.betas.device
        z = randn(shape, generator, device)
        if sampler == "ddpm":
            return self._ddpm(z, cond, generator, guide)
        if sampler == "ddim":
            return self._ddim(z, cond, steps, guide)
        if sampler == "consistency":
            return self._consistency(z, cond, steps, generator, guide)
        sigmas = self.karras_sigmas(steps, device=device)
        solver = self._heun if self.cfg.edm_solver == "heun" else self._dpmpp_2m
        dpmpp = self.cfg.edm_solver == "dpmpp_2m"  # it divides by the gaps between sigmas: NaN if 0
        if dpmpp and steps > 1 and not bool((sigmas[:-2] > sigmas[1:-1]).all()):
            raise ValueError(
                f"{steps} steps with noise.rho={self.cfg.rho} give repeated sigmas in float32 (dpmpp_2m "
                "divides by their gaps); use fewer steps or a smaller rho"
            )
        x = z * (1 + sigmas[0] ** 2).sqrt()  # the VP prior N(0, I) seen in VE space
        return solver(x, cond, sigmas, guide)

    def _ddpm(self, x_t: Tensor, cond: Tensor | None, generator: Generators, guide: Inpaint | None) -> Tensor:
        """Ancestral DDPM in the VP form over every training step, "fixed_small" posterior variance. Each
        step's beta is taken from the alpha-bar table (1 - abar_t / abar_prev), as diffusers does: the
        stored `betas`, rounded to float32 apart from it, scaled the last step's mean by up to 5e-4."""
        abar = self.alphas_cumprod
        for t in range(self.cfg.num_train_steps - 1, -1, -1):
            a_t, a_prev = abar[t], abar[t - 1] if t > 0 else abar.new_tensor(1.0)
            beta = 1 - a_t / a_prev
            x0 = self._estimate(x_t / a_t.sqrt(), self.sigmas[t], cond, guide)
            mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x_t) / (1 - a_t)
            if t == 0:
                return mean
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp_min(1e-20)
            x_t = mean + var.sqrt() * randn(x_t.shape, generator, x_t.device)
        return x_t

    def _ddim(self, z: Tensor, cond: Tensor | None, steps: int, guide: Inpaint | None) -> Tensor:
        """DDIM, eta = 0, on `ddim_timesteps`, and the final alpha set to 1.
        In the VE view: x_next = x0 + sigma_next * eps, with eps = (x - x0_unclipped) / sigma (diffusers'
        default, use_clipped_model_output=False). Guidance moves the step by exactly
        (1 - sigma_next / sigma) * (guided - x0): eps takes up the change from the (clipped) x0, so with
        nothing clipped x = x0 + sigma * eps holds for the guided x0 too (the Euler step from it)."""
        T = self.cfg.num_train_steps
        if steps > T:
            raise ValueError(f"DDIM steps {steps} > num_train_steps {T}")
        ts = ddim_timesteps(T, steps)
        x = z * (1 + self.sigmas[ts[0]] ** 2).sqrt()
        for i, t in enumerate(ts):
            sigma = self.sigmas[t]

            def estimate(x, sigma, cond, guide, t=t):  # on the exact timestep t: (clipped x0, eps)
                out = self.run_net(
                    x / (1 + sigma**2).sqrt(), sigma.new_full((x.shape[0],), float(t)), cond, guide
                )
                eps = out if self.cfg.prediction_type == "epsilon" else (x - out) / sigma
                x0 = x - sigma * eps if self.cfg.prediction_type == "epsilon" else out
                if self.cfg.clip_sample:
                    x0 = x0.clamp(-self.cfg.clip_range, self.cfg.clip_range)
                return x0, eps

            guided, x0, eps = self._guided(x, sigma, cond, guide, estimate)
            eps, x0 = eps + (x0 - guided) / sigma, guided
            sigma_next = self.sigmas[ts[i + 1]] if i + 1 < len(ts) else sigma.new_zeros(())
            x = x0 + sigma_next * eps
        return x

    def _heun(self, x: Tensor, cond: Tensor | None, sigmas: Tensor, guide: Inpaint | None) -> Tensor:
        """EDM Heun (Karras et al. Alg. 1 without churn): 2 network calls per step, Euler on the last."""
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            x0 = self._estimate(x, s, cond, guide)
            if s_next == 0:  # the Euler step to sigma 0 lands on the estimate: taken as it is (computed,
                return x0  # its rounding put samples past clip_sample's bounds by about 1e-6)
            d = (x - x0) / s
            x_euler = x + (s_next - s) * d
            d2 = (x_euler - self._estimate(x_euler, s_next, cond, guide)) / s_next
            x = x + (s_next - s) * (d + d2) / 2
        return x

    def _dpmpp_2m(self, x: Tensor, cond: Tensor | None, sigmas: Tensor, guide: Inpaint | None) -> Tensor:
        """DPM-Solver++(2M) (Lu et al.; k-diffusion's sample_dpmpp_2m): one network call per step, the
        previous denoised estimate used for a 2nd-order multistep correction in log-sigma time."""
        old = None
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            x0 = self._estimate(x, s, cond, guide)
            if s_next == 0:
                return x0
            h = s.log() - s_next.log()  # step in t = -log(sigma)
            if old is not None:
                r = (sigmas[i - 1].log() - s.log()) / h
                x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
            else:
                x0_d = x0
            x = (s_next / s) * x - torch.expm1(-h) * x0_d
            old = x0
        return x

    def _consistency(
        self,
        z: Tensor,
        cond: Tensor | None,
        steps: int,
        generator: Generators,
        guide: Inpaint | None,
    ) -> Tensor:
        """Multistep consistency sampling (Song et al. Alg. 1): jump to x0 from sigma_max, then re-noise to
        the next Karras sigma and jump again."""
        sigmas = self.karras_sigmas(steps + 1, self.table_sigma_min, z.device)[:steps]  # sigma_max first
        x0 = self._clipped(self._estimate(z * sigmas[0], sigmas[0], cond, guide))
        for s in sigmas[1:]:
            noise = randn(z.shape, generator, z.device)
            x = x0 + (s**2 - self.table_sigma_min**2).clamp_min(0).sqrt() * noise
            x0 = self._clipped(self._estimate(x, s, cond, guide))
        return x0

    def _clipped(self, x0: Tensor) -> Tensor:
        """A consistency jump's result clamped as every sampler's estimate is (`clip_sample`): its skip term
        c_skip * x carries noise past the network's clamped output (a 1-step sample reached 1.2, a 2-step
        one 1.9, past actions' range). Sampling only: distillation's loss sees f unclamped."""
        return x0.clamp(-self.cfg.clip_range, self.cfg.clip_range) if self.cfg.clip_sample else x0
