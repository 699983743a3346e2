"""Resuming a training run from its latest checkpoint: what must fit this run (the model, its
architecture, its data, finite state), what is kept from the checkpoint (weights, optimizer moments,
the normalizer rule, the data position, the best validation) and what from this run (optimizer
settings, the learning-rate schedule). `wm.trainer.Trainer.resume` puts them together; each check
here raises a one-line error or returns what the run must say.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wm.checkpoint import (
    BEST_NAME,
    CheckpointError,
    config_diff,
    list_checkpoints,
    non_finite_keys,
    state_dict_diff,
)
from wm.data.normalize import Normalizer
from wm.optim import TrainerConfig, earlier_param_groups, lr_factor
from wm.options import is_whole

OPTIMIZER_SETTINGS = ("initial_lr", "betas", "weight_decay")  # per group: this run's, on resume too
KERNEL_SETTINGS = ("foreach", "fused", "capturable")  # how AdamW steps: this run's device's, silently
SCHEDULE_SETTINGS = ("steps", "warmup_steps", "warmup_max_fraction", "min_lr_ratio")  # what lr_factor reads
STEP_SETTINGS = ("grad_clip", "ema_decay", "ema_warmup", "precision")  # how a step trains: said if changed
DAMAGED = (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError)  # resume state errors


def start_over(out_dir: Path) -> str:
    return f"choose another out= or delete {out_dir} to start over"


def fall_back(out_dir: Path, path: Path) -> str:
    """What to do about `path`, the newest checkpoint of `out_dir`, that cannot be resumed: delete it to
    resume from the one before it (named: `keep_last` keeps it), or start over."""
    earlier = [p for p in list_checkpoints(out_dir) if p != path]
    if not earlier:
        return start_over(out_dir)
    return f"delete {path.name} to resume from {earlier[-1].name}, or {start_over(out_dir)}"


def changed_entries(then: dict[str, Any], now: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The entries of `keys` a checkpoint's run config (`then`) recorded with another value than this
    run's (`now`), as "key old -> new"; a key the checkpoint never recorded is not compared."""
    return [f"{k} {then[k]!r:.60} -> {now.get(k)!r:.60}" for k in keys if k in then and then[k] != now.get(k)]


def non_finite(ckpt: dict[str, Any]) -> str:
    """What of a checkpoint's weights, EMA weights and optimizer state holds NaN or inf, e.g.
    "weights (2 tensor(s), the first 'net.0.weight')"; "" when all are finite."""
    optimizer = ckpt.get("optimizer")
    state = optimizer.get("state", {}) if isinstance(optimizer, dict) else {}
    parts = {
        "weights": ckpt.get("state_dict") or {},
        "EMA weights": ckpt.get("ema_state_dict") or {},
        "optimizer state": {
            f"{i}.{k}": v for i, s in state.items() if isinstance(s, dict) for k, v in s.items()
        },
    }
    found = []
    for what, tensors in parts.items():
        bad = non_finite_keys(tensors)
        if bad:
            found.append(f"{what} ({len(bad)} tensor(s), the first {bad[0]!r})")
    return ", ".join(found)


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint to resume must match: the model's type and architecture (`model`'s state dict),
    its config (another one whose weights fit is only said), and the data (`same_on_resume(then, now)`
    on the checkpoint's and this run's `run_config`)."""

    out_dir: Path
    model: nn.Module
    model_type: str
    model_config: dict[str, Any]
    run_config: dict[str, Any]
    same_on_resume: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None


def check_same_run(run: RunIdentity, ckpt: dict[str, Any], path: Path) -> None:
    """Raise a one-line `CheckpointError` when the checkpoint at `path` in the run's folder (one to resume,
    or a best.pt left without one) holds another model type or architecture, or one trained on other
    data (`same_on_resume`)."""
    where = f"{run.out_dir} already holds {path.name} (step {ckpt.get('step')})"
    fix = start_over(run.out_dir)
    if ckpt["model_type"] != run.model_type:
        raise CheckpointError(
            f"{where}, a {ckpt['model_type']!r} model, but this run trains {run.model_type!r}: {fix}"
        )
    problems = state_dict_diff(run.model.state_dict(), ckpt["state_dict"])
    if problems:
        changed = config_diff(ckpt["model_config"], run.model_config)
        why = f"; model_config differs in {', '.join(changed)}" if changed else ""
        raise CheckpointError(f"{where} of another architecture ({'; '.join(problems)}{why}): {fix}")
    then = (ckpt.get("extra") or {}).get("run_config") or {}
    data = run.same_on_resume(then, run.run_config) if run.same_on_resume is not None else []
    if data:
        raise CheckpointError(
            f"{where}, trained on other data ({'; '.join(data)}): resuming would change what the run "
            f"learns from mid-run (the data, its split and normalization, or a teacher); {fix}"
        )


def check_fits(run: RunIdentity, ckpt: dict[str, Any], path: Path) -> str:
    """Raise a one-line `CheckpointError` when the checkpoint to resume holds another model, one trained
    on other data (`check_same_run`), no optimizer state or non-finite state; returns a note to say
    ("" for none)."""
    check_same_run(run, ckpt, path)
    where = f"{run.out_dir} already holds {path.name} (step {ckpt.get('step')})"
    fix = start_over(run.out_dir)
    changed = config_diff(ckpt["model_config"], run.model_config)
    if ckpt.get("optimizer") is None or ckpt.get("scheduler") is None:
        raise CheckpointError(f"{where}, which has no optimizer state to resume from: {fix}")
    bad = non_finite(ckpt)
    if bad:  # resumed, it trained on to "the loss is nan ...: lower trainer.lr", the wrong advice
        raise CheckpointError(
            f"{where}, whose {bad} hold NaN or inf: it cannot be resumed; {fall_back(run.out_dir, path)}"
        )
    if not changed:
        return ""
    return (
        f"note: resuming {path}, trained with another model_config ({', '.join(changed)}); its "
        "weights fit, so training continues from them with this run's settings"
    )


def regrouped(saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """A checkpoint's optimizer state, its moments moved onto this run's groups when they were saved in
    the groups of the earlier weight-decay rule (`wm.optim.earlier_param_groups`: a run of a model with
    positional embeddings, checkpointed before the rule changed, could not resume); else `saved` as it is.
    The groups' settings are this run's (`keep_settings` puts them back anyway)."""
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes == [len(g["params"]) for g in optimizer.param_groups]:
        return saved
    earlier = earlier_param_groups(model)
    if sizes != [len(ps) for ps in earlier]:
        return saved  # (load_state_dict says what does not fit)
    index = {
        id(p): i
        for group, ps in zip(saved["param_groups"], earlier, strict=True)
        for i, p in zip(group["params"], ps, strict=True)
    }
    now = optimizer.state_dict()  # this run's groups, its parameters numbered in their order
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {j: saved["state"][index[id(p)]] for j, p in enumerate(params) if index[id(p)] in saved["state"]}
    return {"state": state, "param_groups": now["param_groups"]}


def check_moments(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError when a loaded optimizer state tensor has another shape than its parameter
    (`load_state_dict` checks the groups' sizes only; the first step failed on a size mismatch)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.ndim > 0 and v.shape != p.shape:
                    raise ValueError(f"{name} of shape {tuple(v.shape)} for a parameter {tuple(p.shape)}")


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """This run's settings per group, to put back with `keep_settings` after loading a checkpoint's."""
    return [{k: g[k] for k in OPTIMIZER_SETTINGS + KERNEL_SETTINGS if k in g} for g in optimizer.param_groups]


def keep_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    settings: list[dict[str, Any]],
) -> str:
    """After loading a checkpoint's optimizer and scheduler: this run's lr, betas and weight decay per
    group (`settings`; loading restores the checkpoint's); returns a note when they differ. This run's
    kernel (fused or not: `wm.optim.adamw` chose it for this run's device) is put back without a note,
    and the step counts go where that kernel reads them (a fused one: float32 on the parameter's device;
    the others: on the CPU), whichever kernel and device the checkpoint's run had."""
    changed = set()
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        changed |= {k for k in OPTIMIZER_SETTINGS if group[k] != mine[k]}
        group.update(mine)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor):
                optimizer.state[p]["step"] = (
                    step.to(device=p.device, dtype=torch.float32) if on_device else step.to("cpu")
                )
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    at = scheduler.last_epoch
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(at)
    if not changed:
        return ""
    names = ", ".join(sorted("lr" if k == "initial_lr" else k for k in changed))
    return f"note: resuming with this run's {names} (the checkpoint was trained with others)"


def schedule_note(cfg: TrainerConfig, then: Any, at: int) -> str:
    """A note when the checkpoint was trained under another learning-rate schedule (`then`, its
    trainer_config): the resumed run follows this run's (`cfg`) from the resumed step `at`, so the
    learning rate can jump there (a run of steps=3000 extended to 6000 goes from the end of its cosine
    back to the middle of a longer one). "" when it is the same, or the checkpoint has no (or damaged)
    settings."""
    if not isinstance(then, dict) or not all(k in then for k in SCHEDULE_SETTINGS):
        return ""
    try:
        old = dataclasses.replace(cfg, **{k: then[k] for k in SCHEDULE_SETTINGS})
    except (TypeError, ValueError):
        return ""
    changed = [k for k in SCHEDULE_SETTINGS if getattr(old, k) != getattr(cfg, k)]
    if not changed:
        return ""
    now, before = lr_factor(at, cfg), lr_factor(at, old)
    settings = ", ".join(f"{k}={getattr(cfg, k)} (was {getattr(old, k)})" for k in changed)
    return (
        f"note: resuming at step {at} under this run's learning-rate schedule, {settings}: the "
        f"learning rate there is {now:.3g} x lr, where the checkpoint's schedule had {before:.3g} x lr"
    )


def step_note(cfg: TrainerConfig, then: Any) -> str:
    """A note when the checkpoint was trained with other `STEP_SETTINGS` (`then`, its trainer_config)
    than this run's: the resumed run trains with this run's and config.json records only them, so a
    switch (EMA turned off drops the checkpoint's EMA weights) was silent. "" when none differs."""
    if not isinstance(then, dict):
        return ""
    changed = [
        f"{k}={getattr(cfg, k)} (was {then[k]})"
        for k in STEP_SETTINGS
        if k in then and then[k] != getattr(cfg, k)
    ]
    if not changed:
        return ""
    dropped = cfg.ema_decay == 0 and then.get("ema_decay", 0) != 0
    return f"note: resuming with this run's {', '.join(changed)}" + (
        ": the checkpoint's EMA weights are dropped (later checkpoints hold the raw weights only)"
        if dropped
        else ""
    )


def restore_rule(saved: Any, path: Path, holders: Iterable[nn.Module | Normalizer | None]) -> None:
    """Put the normalizer rule the checkpoint was trained with (`Normalizer.to_dict`'s "rule"; 1 when it
    has none) into every `Normalizer` in `holders` (the run's normalizer and the models' modules): it is
    not in the state dict, so a resumed run of a rule-1 checkpoint switched to this run's fresh rule 2
    mid-training, rescaling a hardly varying dimension by up to 1e4."""
    if not isinstance(saved, dict):
        return
    rule = saved.get("rule", 1)
    if rule not in (1, 2):
        raise CheckpointError(f"{path}: its normalizer rule {rule!r} is not 1 or 2 (a newer version's?)")
    for holder in holders:
        modules = holder.modules() if isinstance(holder, nn.Module) else [holder]
        for m in modules:
            if isinstance(m, Normalizer):
                m.rule = rule


def batches_taken(position: Any, epoch_length: int) -> int | None:
    """The batches a checkpoint's epoch had taken (its "data_position", see `Trainer._continue_epoch`);
    None for a checkpoint without the position (an older version's: a fresh epoch). ValueError when
    they are not a whole number within the epoch."""
    if not isinstance(position, dict) or position.get("epoch_start") is None:
        return None
    batches = position["batches"]
    if not is_whole(batches) or not 0 <= batches <= epoch_length:
        raise ValueError(f"data position of {batches!r} batches in an epoch of {epoch_length}")
    return int(batches)


def recorded_best(out_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The best validation so far: config.json's record (written after each best.pt, so possibly later
    than the checkpoint), else the checkpoint's; None when best.pt is gone."""
    if not (out_dir / BEST_NAME).is_file():
        return None
    try:
        recorded = json.loads((out_dir / "config.json").read_text()).get("best")
    except (OSError, ValueError):
        recorded = None
    best = recorded or ckpt.get("best")
    return {k: best[k] for k in ("metric", "value", "step")} if best else None
