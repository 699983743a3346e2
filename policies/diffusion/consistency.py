"""Consistency distillation (Song et al. 2023, CD): a trained diffusion teacher -> a 1-2 step student,
trained by the one trainer (`wm-train model=consistency teacher=DIR store=... out=...`).

The teacher's probability-flow ODE is discretized on N Karras sigmas between the schedule's smallest
sigma and sigma_max. Each step draws clean data x0, an index n and noise z, and puts
x_{n+1} = x0 + sigma_{n+1} z; one Heun step of the teacher's ODE gives x_n at sigma_n. The student
f(x, sigma) = c_skip(sigma) x + (1 - c_skip(sigma)) D_student(x, sigma) (exactly x at the smallest
sigma) is trained so that f(x_{n+1}, sigma_{n+1}) matches the EMA target's f(x_n, sigma_n). The
target network is the model's own EMA of the student and is what the distilled policy samples with.

`ConsistencyObjective` is that loss over any `Diffusion` teacher; `ConsistencyDistillation` is the
registered model: a diffusion policy (the teacher's frozen encoder and normalizer, the target
denoiser) plus the student being trained. Its checkpoint loads as a plain diffusion policy with
config `consistency=True` and sampler "consistency".
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from policies.diffusion.entry import chunk_policy
from policies.diffusion.entry import validation as policy_validation
from policies.diffusion.noise import Diffusion, Generators, Inpaint, masked_mean, scored_steps
from policies.diffusion.policy import MODEL_TYPES, DiffusionPolicy, DiffusionPolicyConfig, inference_policy
from policies.diffusion.precision import fp32_inference
from wm.checkpoint import CheckpointError, load_checkpoint
from wm.data.normalize import Normalizer
from wm.options import sub_config
from wm.registry import ModelEntry, TrainContext, checkpoint_normalizer, load_model


@dataclass(frozen=True)
class DistillConfig:
    n_sigmas: int = 24  # N: points of the teacher ODE discretization
    target_ema: float = 0.95  # mu of the target network (CD paper)
    sampler_steps: int = 1  # the student's default number of jumps
    # "one_step": CD's target, the EMA student at the teacher's one-Heun-step neighbour x_n.
    # "to_end": the teacher's ODE solved from x_{n+1} all the way to the boundary (trajectory distillation,
    # Luhman & Luhman 2021, the CD target with the EMA network replaced by the boundary condition): N
    # times the teacher calls, but no level-by-level propagation, so far fewer steps on small budgets.
    target: str = "one_step"

    def __post_init__(self) -> None:
        if self.n_sigmas < 2 or not 0 <= self.target_ema < 1 or self.sampler_steps < 1:
            raise ValueError(f"bad distillation config {self}")
        if self.target not in ("one_step", "to_end"):
            raise ValueError(f"target must be 'one_step' or 'to_end', got {self.target!r}")


@torch.no_grad()
def _teacher_heun(
    teacher: Diffusion, x: Tensor, s_from: Tensor, s_to: Tensor, cond: Tensor | None, given: Inpaint | None
) -> Tensor:
    """One Heun step of the teacher's ODE dx/dsigma = (x - D(x, sigma)) / sigma, per-sample sigmas (B,);
    `given`: the committed actions a `Committed` teacher takes as input (None: none)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    a, b = s_from.view(view), s_to.view(view)
    d = (x - teacher.denoise(x, s_from, cond, given)) / a
    x_euler = x + (b - a) * d
    d2 = (x_euler - teacher.denoise(x_euler, s_to, cond, given)) / b
    return x + (b - a) * (d + d2) / 2


@torch.no_grad()
def _teacher_to_end(
    teacher: Diffusion, x: Tensor, start: Tensor, grid: Tensor, cond: Tensor | None, given: Inpaint | None
) -> Tensor:
    """Heun steps of the teacher's ODE from grid[start] (per sample, (B,)) down to grid[0]."""
    B, view = x.shape[0], (-1,) + (1,) * (x.ndim - 1)
    for k in range(int(start.max()), 0, -1):
        stepped = _teacher_heun(teacher, x, grid[k].expand(B), grid[k - 1].expand(B), cond, given)
        x = torch.where((start >= k).view(view), stepped, x)
    return x


class _Shared:
    """Holds a module outside the owner's state dict and shares it on deepcopy (the frozen teacher)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class ConsistencyObjective(nn.Module):
    """The CD loss for a frozen `teacher`: `student` (a consistency copy of the teacher's net, trained)
    and `target` (its EMA, frozen, updated by `loss` before each training step's loss from the
    student the previous optimizer step left). The teacher is not part of the state dict."""

    def __init__(self, teacher: Diffusion, cfg: DistillConfig) -> None:
        super().__init__()
        if teacher.consistency:
            raise ValueError("the teacher is already a consistency model")
        self.cfg = cfg
        self.student = Diffusion(
            copy.deepcopy(teacher.net), teacher.cfg, consistency=True, committed=teacher.committed
        ).requires_grad_(True)
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self._teacher = _Shared(teacher.eval().requires_grad_(False))

    @property
    def teacher(self) -> Diffusion:
        return self._teacher.module

    def _apply(self, fn: Any, recurse: bool = True) -> ConsistencyObjective:  # .to() moves the teacher too
        super()._apply(fn, recurse)
        self.teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> ConsistencyObjective:
        super().train(mode)
        self.target.eval()
        return self

    @torch.no_grad()
    def update_target(self) -> None:
        """target <- mu * target + (1 - mu) * student; buffers copied."""
        mu = self.cfg.target_ema
        for pt, ps in zip(self.target.net.parameters(), self.student.net.parameters(), strict=True):
            pt.lerp_(ps, 1 - mu)
        for bt, bs in zip(self.target.net.buffers(), self.student.net.buffers(), strict=True):
            bt.copy_(bs)

    def loss(self, x0: Tensor, cond: Tensor | None, valid: Tensor | None) -> Tensor:
        """x0 (B, Ta, Da) normalized, cond (B, To, Dc) or None, valid (B, Ta) or None -> the CD loss. A
        `Committed` teacher's student learns to continue committed actions too: every network call of
        a sample gets the same random committed prefix, left out of the loss. The teacher and the target
        run without autograd, in fp32 all the same (a training step)."""
        with fp32_inference(self, self.teacher):
            return self._loss(x0, cond, valid)

    def _loss(self, x0: Tensor, cond: Tensor | None, valid: Tensor | None) -> Tensor:
        if self.training:
            self.update_target()  # the EMA step owed to the previous optimizer step (a no-op at the first)
        cfg, teacher = self.cfg, self.teacher
        B, device = x0.shape[0], x0.device
        # Increasing sigmas from the consistency boundary (the schedule's smallest) to sigma_max.
        grid = teacher.karras_sigmas(cfg.n_sigmas, teacher.table_sigma_min, device)[:-1].flip(0)  # (N,)
        n = torch.randint(0, cfg.n_sigmas - 1, (B,), device=device)
        s_lo, s_hi = grid[n], grid[n + 1]  # (B,), (B,)
        x_hi = x0 + s_hi.view(-1, *[1] * (x0.ndim - 1)) * torch.randn_like(x0)
        given = teacher.draw_committed(x0)
        if cfg.target == "one_step":
            x_lo = _teacher_heun(teacher, x_hi, s_hi, s_lo, cond, given)
            with torch.no_grad():
                y = self.target.denoise(x_lo, s_lo, cond, given)
        else:
            y = _teacher_to_end(teacher, x_hi, n + 1, grid, cond, given)
        err = (self.student.denoise(x_hi, s_hi, cond, given) - y).pow(2).mean(-1)  # (B, Ta)
        return masked_mean(err, scored_steps(valid, given))


@dataclass(frozen=True)
class ConsistencyConfig:
    """The distilled policy's config (the teacher's with consistency=True and the "consistency"
    sampler), the distillation settings, and the teacher checkpoint's absolute path. As a dict it is
    the policy's fields plus "distill" and "teacher", so inference overrides apply as for any policy."""

    policy: DiffusionPolicyConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: str = ""

    def __post_init__(self) -> None:
        if not self.policy.consistency or self.policy.sampler != "consistency":
            raise ValueError(
                "a consistency model's policy config needs consistency=True, sampler consistency"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**self.policy.to_dict(), "distill": dataclasses.asdict(self.distill), "teacher": self.teacher}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConsistencyConfig:
        rest = dict(d)
        distill, teacher = rest.pop("distill", {}), rest.pop("teacher", "")
        return cls(
            DiffusionPolicyConfig.from_dict(rest), sub_config(DistillConfig, distill, "distill"), teacher
        )


class ConsistencyDistillation(nn.Module):
    """The registered "consistency" model. `policy` is the distilled diffusion policy: the teacher's
    encoder (frozen) and normalizer, and the target network as its denoiser (what it samples with);
    `objective.student` is what the optimizer trains. Delegates `io_spec`, `window_spec`,
    `sample_actions` and `feature_cache_source` to `policy`."""

    row_generators = True  # as `DiffusionPolicy.sample_actions`, which it delegates to

    def __init__(self, cfg: ConsistencyConfig, normalizer: Normalizer) -> None:
        super().__init__()
        teacher = load_model(cfg.teacher, controller="policy").model
        if teacher.cfg.consistency:
            raise CheckpointError(f"teacher {cfg.teacher} is itself a consistency model")
        expected = dataclasses.replace(
            teacher.cfg, consistency=True, sampler="consistency", sampler_steps=cfg.policy.sampler_steps
        )
        if dataclasses.replace(cfg.policy, precision=expected.precision) != expected:
            raise CheckpointError(f"teacher {cfg.teacher} has another architecture than this config")
        self.cfg = cfg
        self.objective = ConsistencyObjective(teacher.diffusion, cfg.distill)
        self.policy = DiffusionPolicy(cfg.policy, normalizer, load_encoder_weights=False)  # the teacher's:
        self.policy.obs_encoder.load_state_dict(teacher.obs_encoder.state_dict())
        self.policy.obs_encoder.requires_grad_(False)
        self.policy.diffusion = self.objective.target  # the policy samples with the EMA target
        self.policy.set_precision(cfg.policy.precision)  # the target's layers copied the teacher's

    @property
    def io_spec(self) -> Any:
        return self.policy.io_spec

    def window_spec(self) -> Any:
        return self.policy.window_spec()

    def feature_cache_source(self) -> Any:
        return self.policy.feature_cache_source()

    def sample_actions(
        self,
        obs: dict[str, Tensor],
        generator: Generators = None,
        previous: Tensor | None = None,
        frozen: int = 0,
        full: bool = False,
    ) -> Tensor:
        return self.policy.sample_actions(obs, generator, previous, frozen, full)

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        super().train(mode)
        self.objective.target.eval()  # also the policy's denoiser, which `policy.train()` just set
        return self

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # the frozen encoder runs without autograd: in fp32 all the same (a training step)
        with fp32_inference(self.policy.obs_encoder), torch.no_grad():
            x0, cond, valid = self.policy.prepare(batch, augment=False)
        loss = self.objective.loss(x0, cond, valid)
        return loss, {"loss": loss.detach()}


def configure(options: dict[str, Any], ctx: TrainContext) -> dict[str, Any]:
    """The teacher's policy config made a consistency model's, with the user's distillation options."""
    if not ctx.teacher:
        raise ValueError(
            "model=consistency needs teacher=DIR: the run directory of a trained diffusion policy"
        )
    ckpt = load_checkpoint(ctx.teacher)
    if ckpt["model_type"] not in MODEL_TYPES:
        raise CheckpointError(
            f"teacher {ckpt['path']} holds a {ckpt['model_type']!r} model, not a diffusion policy"
        )
    check_teachers_data(ckpt, ctx)
    distill = sub_config(DistillConfig, options, "model")
    policy = {
        **ckpt["model_config"],
        "consistency": True,
        "sampler": "consistency",
        "sampler_steps": distill.sampler_steps,
    }
    return {**policy, "distill": dataclasses.asdict(distill), "teacher": str(Path(ckpt["path"]).resolve())}


def check_teachers_data(ckpt: dict[str, Any], ctx: TrainContext) -> None:
    """The store holds what the teacher reads (its cameras at its frame size, its proprioception, its
    action size), or one line before any work: it failed at the first step ("'action' is (2, 16, 3),
    expected (B, 16, 2)", naming neither store nor teacher), with the run directory written."""
    config, shapes = ckpt["model_config"], ctx.key_shapes
    obs = config.get("obs", {})
    size = tuple(obs.get("image_size", ()))
    wanted = {k: (*size, 3) for k in obs.get("image_keys", ())}
    if obs.get("proprio_key"):
        wanted[obs["proprio_key"]] = (obs.get("proprio_dim"),)
    wanted["action"] = (config.get("action_dim"),)
    for key, shape in wanted.items():
        has = shapes.get(key)
        flat = has if has is None or len(shape) == 3 else (int(np.prod(has)),)
        if flat is None or tuple(flat) != shape:
            raise ValueError(
                f"teacher {ckpt['path']} reads {key!r} of shape {shape}, the store {ctx.store} "
                f"{'has no ' + repr(key) if has is None else f'has {tuple(has)}'}: distil on the teacher's "
                "data (its store, or one recorded the same way)"
            )


def teacher_normalizer(ctx: TrainContext) -> Normalizer:
    """The student keeps its teacher's statistics."""
    if not ctx.teacher:
        raise ValueError(
            "model=consistency needs teacher=DIR: the run directory of a trained diffusion policy"
        )
    return checkpoint_normalizer(load_checkpoint(ctx.teacher))


def validation(
    model: ConsistencyDistillation,
    data_path: str,
    episodes: list[int],
    in_memory: bool,
    frames_from: str | None = None,
) -> Any:
    fn = policy_validation(model.policy, data_path, episodes, in_memory)
    return lambda m, step, out: fn(m.policy, step, out)


ENTRY = ModelEntry(
    config_type=ConsistencyConfig,
    build=ConsistencyDistillation,
    configure=configure,
    controllers=("policy",),
    description="a diffusion policy consistency-distilled to 1-2 sampling steps (needs teacher=DIR)",
    normalizer=teacher_normalizer,
    validation=validation,
    val_metrics=("val_action_mse",),
    policy=chunk_policy,
    inference=lambda cfg, normalizer: inference_policy(cfg.policy, normalizer),
    state_prefix="policy.",
    use_ema=False,
    trainer_overrides={"ema_decay": 0.0},
    overridable=("sampler_steps", "precision", "temporal_ensemble", "inpaint_guidance"),
    distilled=True,
)
