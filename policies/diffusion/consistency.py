"""Consistency distillation (Song et al. 2023, CD): a trained diffusion teacher -> a 1-2 step student.

The teacher's probability-flow ODE is discretized on N Karras sigmas between the schedule's smallest
sigma and sigma_max. Each step draws clean data x0, an index n and noise z, and puts
x_{n+1} = x0 + sigma_{n+1} z; one Heun step of the teacher's ODE gives x_n at sigma_n. The student
f(x, sigma) = c_skip(sigma) x + (1 - c_skip(sigma)) D_student(x, sigma) (exactly x at the smallest
sigma) is trained so that f(x_{n+1}, sigma_{n+1}) matches the EMA target's f(x_n, sigma_n).
The student starts from the teacher's weights and keeps its architecture, so it is saved and loaded
like any policy (config `consistency=True`, sampler "consistency").

Batches for `distill` are (x0 (B, Ta, Da) normalized, cond (B, To, Dc) or None, valid (B, Ta) or
None); `distill_policy` builds them from dataset batches with the teacher policy's (frozen) encoder.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from policies.diffusion.noise import Diffusion
from policies.diffusion.policy import DiffusionPolicy

Batch = tuple[Tensor, Tensor | None, Tensor | None]


@dataclass(frozen=True)
class DistillConfig:
    n_sigmas: int = 24  # N: points of the teacher ODE discretization
    lr: float = 1e-4
    target_ema: float = 0.95  # mu of the target network (CD paper)
    grad_clip: float = 1.0
    sampler_steps: int = 1  # the student's default number of jumps
    # "one_step": CD's target, the EMA student at the teacher's one-Heun-step neighbour x_n.
    # "to_end": the teacher's ODE solved from x_{n+1} all the way to the boundary (trajectory distillation,
    # Luhman & Luhman 2021, the CD target with the EMA network replaced by the boundary condition): N
    # times the teacher calls, but no level-by-level propagation, so far fewer steps on small budgets.
    target: str = "one_step"

    def __post_init__(self) -> None:
        if self.n_sigmas < 2 or not self.lr > 0 or not 0 <= self.target_ema < 1 or self.sampler_steps < 1:
            raise ValueError(f"bad distillation config {self}")
        if self.target not in ("one_step", "to_end"):
            raise ValueError(f"target must be 'one_step' or 'to_end', got {self.target!r}")


@torch.no_grad()
def _teacher_heun(teacher: Diffusion, x: Tensor, s_from: Tensor, s_to: Tensor, cond: Tensor | None) -> Tensor:
    """One Heun step of the teacher's ODE dx/dsigma = (x - D(x, sigma)) / sigma, per-sample sigmas (B,)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    a, b = s_from.view(view), s_to.view(view)
    d = (x - teacher.denoise(x, s_from, cond)) / a
    x_euler = x + (b - a) * d
    d2 = (x_euler - teacher.denoise(x_euler, s_to, cond)) / b
    return x + (b - a) * (d + d2) / 2


@torch.no_grad()
def _teacher_to_end(
    teacher: Diffusion, x: Tensor, start: Tensor, grid: Tensor, cond: Tensor | None
) -> Tensor:
    """Heun steps of the teacher's ODE from grid[start] (per sample, (B,)) down to grid[0]."""
    B, view = x.shape[0], (-1,) + (1,) * (x.ndim - 1)
    for k in range(int(start.max()), 0, -1):
        stepped = _teacher_heun(teacher, x, grid[k].expand(B), grid[k - 1].expand(B), cond)
        x = torch.where((start >= k).view(view), stepped, x)
    return x


def distill(
    teacher: Diffusion, batches: Iterable[Batch], steps: int, cfg: DistillConfig | None = None
) -> Diffusion:
    """Distill `teacher` into a consistency model over `steps` optimizer steps; `batches` is cycled.
    Returns the EMA target network (eval mode), a `Diffusion` with `consistency=True`."""
    cfg = cfg or DistillConfig()
    if teacher.consistency:
        raise ValueError("the teacher is already a consistency model")
    teacher = teacher.eval()
    student = Diffusion(copy.deepcopy(teacher.net), teacher.cfg, consistency=True).train()
    target = copy.deepcopy(student).requires_grad_(False).eval()
    device = teacher.betas.device
    student.to(device), target.to(device)
    # Increasing sigmas from the consistency boundary (the schedule's smallest) to sigma_max.
    grid = teacher.karras_sigmas(cfg.n_sigmas, teacher.table_sigma_min, device)[:-1].flip(0)  # (N,)
    opt = torch.optim.AdamW(student.net.parameters(), lr=cfg.lr, weight_decay=0.0)
    data: Iterator[Batch] = itertools.cycle(batches)
    for _ in range(steps):
        x0, cond, valid = next(data)
        B = x0.shape[0]
        n = torch.randint(0, cfg.n_sigmas - 1, (B,), device=device)
        s_lo, s_hi = grid[n], grid[n + 1]  # (B,), (B,)
        x_hi = x0 + s_hi.view(-1, *[1] * (x0.ndim - 1)) * torch.randn_like(x0)
        if cfg.target == "one_step":
            x_lo = _teacher_heun(teacher, x_hi, s_hi, s_lo, cond)
            with torch.no_grad():
                y = target.denoise(x_lo, s_lo, cond)
        else:
            y = _teacher_to_end(teacher, x_hi, n + 1, grid, cond)
        err = (student.denoise(x_hi, s_hi, cond) - y).pow(2).mean(-1)  # (B, Ta)
        w = torch.ones_like(err) if valid is None else valid.to(err.dtype)
        loss = (err * w).sum() / w.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.net.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.net.parameters(), student.net.parameters(), strict=True):
                pt.lerp_(ps, 1 - cfg.target_ema)
            for bt, bs in zip(target.net.buffers(), student.net.buffers(), strict=True):
                bt.copy_(bs)
    return target


def policy_batches(policy: DiffusionPolicy, batches: Iterable[dict[str, Tensor]]) -> Iterator[Batch]:
    """Dataset batches -> (x0, cond, valid) with the policy's frozen encoder (center crop, no grad)."""
    for batch in batches:
        with torch.no_grad():
            yield policy.prepare(batch, augment=False)


def distill_policy(
    teacher: DiffusionPolicy,
    batches: Iterable[dict[str, Tensor]],
    steps: int,
    cfg: DistillConfig | None = None,
) -> DiffusionPolicy:
    """A consistency-distilled copy of `teacher` (same encoder and normalizer, student denoiser), in eval
    mode, with config `consistency=True` and sampler "consistency" (`cfg.sampler_steps` jumps). Save it
    with `model_config=student.cfg.to_dict()` like any diffusion policy. The batches are encoded once
    and cached, so `batches` may be a finite list of dataset batches."""
    cfg = cfg or DistillConfig()
    teacher.eval()
    cached = list(policy_batches(teacher, batches))
    student_diffusion = distill(teacher.diffusion, cached, steps, cfg)
    pcfg = dataclasses.replace(
        teacher.cfg, consistency=True, sampler="consistency", sampler_steps=cfg.sampler_steps
    )
    student = DiffusionPolicy(pcfg, copy.deepcopy(teacher.normalizer))
    student.obs_encoder.load_state_dict(teacher.obs_encoder.state_dict())
    student.diffusion.net.load_state_dict(student_diffusion.net.state_dict())
    return student.to(teacher.diffusion.betas.device).eval()
