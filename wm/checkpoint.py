"""Self-contained checkpoints: plain dicts of tensors and JSON-able values, never pickled modules.

A checkpoint file (format 1) is written with `torch.save` and read back with
`torch.load(..., weights_only=True)`, so loading one cannot run code. Its fields:

    format          1
    model_type      str, e.g. "dino_wm", "diffusion_unet": which builder rebuilds the model
    model_config    dict, what that builder takes
    state_dict      the model's weights (unwrapped: no DDP "module." prefix)
    ema_state_dict  the EMA weights, or None when EMA is off
    normalizer      `Normalizer.to_dict()` or None
    trainer_config  dict (`TrainerConfig.to_dict()`)
    step            int, optimizer steps done
    epoch           int, data epochs started
    optimizer       optimizer state dict
    scheduler       LR scheduler state dict
    rng             {"torch", "cuda", "numpy", "python", "loader"} random states
    extra           dict, whatever the caller passed as `extra_state`
    best            {"metric", "value", "step"} of the best validation so far, or None (trainer runs)

Files are named `ckpt_<step:08d>.pt` inside a run directory and written atomically (a temporary file
in the same directory, fsync, then `os.replace`), so a crash never leaves a half-written checkpoint.
A run directory may also hold `best.pt`, the weights with the lowest validation metric so far (the
same fields less optimizer, scheduler and rng: it is for evaluation). `latest_checkpoint`, and so
`load_checkpoint(run_dir)` and resuming, never pick it; load it by its path, `run_dir/best.pt`.

The file is torch's zip format, which stores a CRC-32 of every entry (each tensor's bytes, the pickled
structure). torch.load never checks them; `load_checkpoint` does (`damaged_entry`), so a bit flipped on
disk or in a copy is refused instead of loading as slightly different weights.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wm.locks import remove_left_by_dead

FORMAT = 1
BEST_NAME = "best.pt"
CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
SAVING_RE = re.compile(r"\..+\.pt\.tmp(?P<pid>\d+)")  # save_checkpoint's temporary file
REQUIRED = ("format", "model_type", "model_config", "state_dict")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, not a checkpoint, or for another model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{int(step):08d}.pt"


def save_checkpoint(path: str | os.PathLike, **fields: Any) -> Path:
    """Write `{"format": 1, **fields}` to `path` atomically; returns the path."""
    missing = [k for k in REQUIRED[1:] if k not in fields]
    if missing:
        raise ValueError(f"save_checkpoint: missing fields {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    crc = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(True)  # what `damaged_entry` checks on loading
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **fields}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        torch.serialization.set_crc32_options(crc)
        tmp.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The `ckpt_*.pt` files in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The highest-step `ckpt_*.pt` in `directory`, else its `last.pt`, else None (never `best.pt`,
    whose step may be older than the newest checkpoint's)."""
    ckpts = list_checkpoints(directory)
    if ckpts:
        return ckpts[-1]
    last = Path(directory) / "last.pt"
    return last if last.is_file() else None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` `ckpt_*.pt` files, and the temporary files of saves whose
    process died (a kill -9 in the middle of `save_checkpoint`)."""
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    remove_left_by_dead(Path(directory), SAVING_RE)


def load_checkpoint(path_or_dir: str | os.PathLike, expected_type: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file, or a run directory's latest one, on the CPU.

    Raises `CheckpointNotFoundError` for a missing file or a directory without checkpoints, and
    `CheckpointError` for a file that is not a format-1 checkpoint or holds a model of another type
    than `expected_type`. The returned dict has an added "path" field naming the file it came from.
    """
    src = Path(path_or_dir)
    if src.is_dir():
        found = latest_checkpoint(src)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint (ckpt_*.pt or last.pt) in directory {src}")
        src = found
    elif not src.exists():
        raise CheckpointNotFoundError(f"no checkpoint file at {src}")
    damaged = damaged_entry(src)
    if damaged is not None:
        raise CheckpointError(
            f"{src} is damaged: the bytes of its entry {damaged!r} do not match the checksum saved with "
            "them (changed on disk or in a copy); copy it again, or load an earlier checkpoint of the run"
        )
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a corrupt or foreign file
        why = "truncated: a copy or a save cut short?" if _cut_short(src) else _why_unreadable(e)
        raise CheckpointError(f"{src} is not a readable checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"{src} is not a wm checkpoint (it lacks the fields {list(REQUIRED)})")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            f"{src} has checkpoint format {ckpt['format']!r}; this code reads format {FORMAT}"
        )
    if expected_type is not None and ckpt["model_type"] != expected_type:
        raise CheckpointError(
            f"checkpoint {src} holds a {ckpt['model_type']!r} model, expected {expected_type!r}"
        )
    ckpt["path"] = str(src)
    return ckpt


def damaged_entry(path: str | os.PathLike) -> str | None:
    """The first entry of a torch zip file whose bytes do not match the CRC-32 stored with them, or None.

    None too for a file that is no zip archive (torch.load says what it is), and entries whose stored
    CRC is 0 are read unchecked: torch writes 0 with `set_crc32_options(False)`."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with z.open(info) as entry:  # zipfile compares the CRC once the entry is read
                        while entry.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename.partition("/")[2] or info.filename
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    return None


def _cut_short(path: Path) -> bool:
    """A zip file (torch's format) without its index, which is written last: torch said "Errno 22" or
    "failed finding central directory"."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _why_unreadable(e: Exception) -> str:
    """torch.load's failure in a few words: not its advice to load with weights_only=False (which runs
    whatever code the file holds, and fails on a file that is no checkpoint at all), nor its colours."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return "not a weights file torch can load safely: truncated, damaged, or not a checkpoint"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {_ANSI.sub('', first)}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # a terminal colour code


def load_model_weights(
    model: nn.Module, ckpt: dict[str, Any] | str | os.PathLike, use_ema: bool = True
) -> nn.Module:
    """Load a checkpoint's weights into `model` strictly: the EMA weights when `use_ema` and the
    checkpoint has them, else the raw weights. Mismatched shapes, missing or unexpected entries raise
    one `CheckpointError` naming the first offenders. Returns `model`."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    ema = ckpt.get("ema_state_dict")
    state = ema if use_ema and ema is not None else ckpt.get("state_dict")
    src = ckpt.get("path", "checkpoint")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        which = "EMA weights" if state is ema and ema is not None else "weights"  # (a traceback before)
        raise CheckpointError(f"{src}: its {which} are not a mapping of tensors; it cannot be used")
    problems = state_dict_diff(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{src} ({ckpt.get('model_type')!r}) does not fit this {type(model).__name__}: "
            + "; ".join(problems)
        )
    bad = non_finite_keys(state)
    if bad:  # the trainer never saves such weights: damaged, or written by something else
        which = "EMA weights" if state is ema else "weights"
        raise CheckpointError(
            f"{src}: its {which} hold NaN or inf ({len(bad)} tensor(s), the first {bad[0]!r}); it cannot be "
            "used (an earlier checkpoint of the run may)"
        )
    model.load_state_dict(state, strict=True)
    return model


def non_finite_keys(tensors: Mapping[str, Any]) -> list[str]:
    """The keys of `tensors` (in order) whose value is a floating tensor holding NaN or inf."""
    return [
        k
        for k, v in tensors.items()
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(v.isfinite().all())
    ]


def state_dict_diff(own: dict[str, Any], incoming: dict[str, Any], limit: int = 5) -> list[str]:
    """Why `incoming` cannot be loaded strictly into a module whose state dict is `own`: one line per
    kind of problem ("missing keys: ...", "unexpected keys: ...", "shape mismatches: key (checkpoint
    (...), model (...))"), each naming its first `limit` keys in sorted order. Empty if it fits."""
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    shapes = [
        f"{k} (checkpoint {tuple(incoming[k].shape)}, model {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(incoming))
        if tuple(incoming[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{what}: {', '.join(items[:limit])}{more}")
    return problems


def config_diff(saved: dict[str, Any], current: dict[str, Any], limit: int = 5) -> list[str]:
    """The settings in which two (nested) model configs differ, as "key (checkpoint X, this run Y)" with
    dotted keys, sorted, the first `limit` of them (and "+N more"). Empty if they are equal. Values are
    compared as JSON, so a tuple equals the list it is saved as."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = (flat(json.loads(json.dumps(d, default=str))) for d in (saved, current))
    missing = object()
    keys = sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing))
    shown = [f"{k} (checkpoint {a.get(k, 'unset')}, this run {b.get(k, 'unset')})" for k in keys[:limit]]
    return shown + ([f"+{len(keys) - limit} more"] if len(keys) > limit else [])


def rng_state(loader_gen: torch.Generator | None = None) -> dict[str, Any]:
    """The checkpoint's "rng" field: torch, CUDA, numpy, python and (optionally) a loader generator."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "loader": loader_gen.get_state() if loader_gen is not None else None,
    }


def set_rng_state(rng: dict[str, Any], loader_gen: torch.Generator | None = None) -> None:
    """Restore what `rng_state` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    if loader_gen is not None and rng.get("loader") is not None:
        loader_gen.set_state(rng["loader"])
