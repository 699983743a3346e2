"""The trainer's settings and its optimization pieces: `TrainerConfig` (validated), the learning-rate
schedule (linear warm-up capped at a fraction of the run, then cosine), the EMA update and the AdamW
parameter groups. `wm.trainer.Trainer` puts them together."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wm.options import check_numbers
from wm.precision import check_precision

MAX_WORKERS = 256  # loader processes: more is a typo (a huge count spawned until memory ran out)


def check_device(name: str, what: str) -> None:
    """Refuse (ValueError, one line) a device other than "auto", "cpu", "cuda" or "cuda:N": torch names
    others (meta, mps, xla) that this code does not run on (tracebacks deep in autocast or a copy)."""
    try:
        dev = torch.device(name) if name != "auto" else None
    except RuntimeError:
        dev = None
        ok = False
    else:
        ok = dev is None or dev.type in ("cpu", "cuda")
    if not ok:
        raise ValueError(f"{what} {name!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class TrainerConfig:
    """Optimization, logging and checkpointing settings. `val_every` / `ckpt_every` of 0 disable the
    periodic runs (a final checkpoint and validation still happen); `grad_clip` 0 disables clipping
    (the grad norm is still reported); `ema_decay` 0 disables EMA. `precision="bf16"` autocasts on
    CUDA and also on CPU, where it is slow on most processors. `compile` applies on CUDA only.

    Warm-up: `warmup_steps`, but at most `warmup_max_fraction` of `steps` (`warmup_steps_used`), so a
    short run (steps=300 with warmup_steps=200) warms up for 30 steps and spends the rest at a useful
    learning rate; the trainer says so when the cap applies. `warmup_max_fraction=1` keeps
    `warmup_steps` whatever the run length.

    Best checkpoint: after each validation, `out_dir/best.pt` is rewritten when `best_metric` (lower is
    better) beats every earlier validation. "auto" is the first metric the `val_fn` reports
    (dino_wm: val_one_step_mse; diffusion policies: val_action_mse); None keeps no best.pt."""

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    warmup_max_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    precision: str = "fp32"
    compile: bool = False
    log_every: int = 50
    val_every: int = 1000
    ckpt_every: int = 1000
    keep_last: int = 2
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    best_metric: str | None = "auto"

    def __post_init__(self) -> None:
        # steps=10.5 ran 11 steps, ckpt_every=0.5 saved every step, ema_warmup="false" was true (the
        # apps coerce their options; this is the Python API's check)
        check_numbers(type(self), vars(self), "trainer")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_precision(self.precision)
        checks = {
            "steps must be >= 1": self.steps >= 1,
            "batch_size must be >= 1": self.batch_size >= 1,
            # (1e300 overflowed AdamW's float32 step with a traceback; 1e30 diverges, said in one line)
            "lr must be > 0 and at most 1e6": 0 < self.lr <= 1e6,
            "weight_decay must be finite and >= 0": math.isfinite(self.weight_decay)
            and self.weight_decay >= 0,
            "betas must be 2 values in [0, 1)": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "warmup_steps must be >= 0": self.warmup_steps >= 0,
            "warmup_max_fraction must be in [0, 1]": 0 <= self.warmup_max_fraction <= 1,
            "min_lr_ratio must be in [0, 1]": 0 <= self.min_lr_ratio <= 1,
            "grad_clip must be >= 0 (0 disables)": self.grad_clip >= 0,
            "ema_decay must be in [0, 1) (0 disables)": 0 <= self.ema_decay < 1,
            "log_every must be >= 1": self.log_every >= 1,
            "val_every and ckpt_every must be >= 0": self.val_every >= 0 and self.ckpt_every >= 0,
            "keep_last must be >= 1": self.keep_last >= 1,
            "num_workers must be in 0..256": 0 <= self.num_workers <= MAX_WORKERS,
            "seed must be in 0..2**63 - 1": 0 <= self.seed < 2**63,
            "best_metric must be 'auto', a metric name or None": self.best_metric is None
            or (isinstance(self.best_metric, str) and self.best_metric != ""),
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainerConfig: {'; '.join(bad)}")
        if self.device != "auto":
            check_device(self.device, "TrainerConfig: device")

    @property
    def warmup_steps_used(self) -> int:
        """The warm-up length the schedule uses: `warmup_steps`, capped at `warmup_max_fraction * steps`."""
        # (floor with a tolerance: 0.29 * 100 is 28.999999999999996, which int() made 28)
        return min(self.warmup_steps, math.floor(self.warmup_max_fraction * self.steps + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup to 1 over `warmup_steps_used`
    steps, then a cosine from 1 down to `min_lr_ratio` at `steps`."""
    warmup = cfg.warmup_steps_used
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, cfg: TrainerConfig) -> float:
    """EMA decay after optimizer step `step` (0-based): ramps up as (1 + step) / (10 + step) with warmup."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for trainable float parameters; buffers are copied.
    Frozen parameters never change, so they are skipped. `ema` must be a deepcopy of `model`."""
    pairs = [
        (e, p)
        for e, p in zip(ema.parameters(), model.parameters(), strict=True)
        if p.requires_grad and p.is_floating_point()
    ]
    if pairs:
        e_list, p_list = zip(*pairs, strict=True)
        torch._foreach_lerp_(list(e_list), list(p_list), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


MATRIX_LAYERS = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)  # fmt: skip
ATTENTION_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has AdamW's fused kernel and `adamw` uses it


def adamw(groups: list[dict[str, Any]], cfg: TrainerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `groups` with `cfg`'s settings, stepping with torch's fused kernel (one pass over each
    parameter's tensors) on the CPU and CUDA (on the CPU torch's default is a loop over the tensors, one
    operation at a time), torch's default elsewhere. `resume.keep_settings` keeps this choice when a
    checkpoint of another device or of an earlier release is resumed."""
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=device.type in FUSED_ADAMW_DEVICES,
    )


def decayed_matrices(model: nn.Module) -> set[int]:
    """The ids of `model`'s parameters weight decay applies to: the weight matrices of linear,
    convolution and attention layers. Biases, norm scales, `nn.Embedding` tables and free-standing
    parameters (positional and camera embeddings, register tokens: what the model looks up, not a map it
    applies) get none, as in Diffusion Policy's transformer and timm."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, MATRIX_LAYERS)}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            ids |= {id(w) for name in ATTENTION_MATRICES if (w := getattr(m, name)) is not None}
    return ids


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight decay on the weight matrices of linear, convolution and attention layers
    (`decayed_matrices`), none on anything else. Frozen parameters are left out.

    A model may name modules that train on detached inputs only in a `detached_heads` dict (name ->
    module; the world model's video decoder). Their parameters get two groups of their own with
    `"clip_group": name`, and `Trainer` clips each clip group on its own, so such a head cannot
    change how the rest of the model is clipped (one joint norm would couple them)."""
    return [
        {"params": ps, "weight_decay": weight_decay if decays else 0.0}
        | ({"clip_group": name} if name else {})
        for (name, decays), ps in _grouped(model, decayed_matrices(model)).items()
    ]


def earlier_param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each of `default_param_groups`' groups as they were before 2026-12-07, when every
    parameter of more than one dimension but `nn.Embedding` tables decayed (positions and camera
    embeddings too): the order a checkpoint of then saved its optimizer's moments in."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(p) for p in model.parameters() if p.ndim > 1 and id(p) not in embedding}
    return list(_grouped(model, matrices).values())


def _grouped(model: nn.Module, decayed: set[int]) -> dict[tuple[str, bool], list[nn.Parameter]]:
    """Trainable parameters by (detached head or "", decays), in the model's order."""
    heads = getattr(model, "detached_heads", {})
    head_of = {id(p): name for name, m in heads.items() for p in m.parameters()}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {("", True): [], ("", False): []}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((head_of.get(id(p), ""), id(p) in decayed), []).append(p)
    return groups
