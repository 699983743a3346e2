"""Normalization statistics: fitted once by the data layer, saved, restored from a checkpoint.

`Normalizer` is an `nn.Module` whose buffers hold per-key statistics (min, max, mean, std, 1% and
99% quantiles), so it travels inside a model's state dict; `to_dict` / `from_dict` give a JSON form
for files beside a checkpoint. Modes: `minmax` and `quantile` map to [-1, 1], `meanstd` to zero
mean and unit variance, `identity` leaves the key alone. A dimension that hardly varies in the fitted
episodes (spread below `MIN_SPREAD`: a locked joint, a gripper always open) is only centred (scale
1), as Diffusion Policy does, so a value a little off it at deployment stays a little off instead of
normalizing to hundreds; in `quantile` mode a dimension whose 1-99 % range is that narrow (a gripper
closing in under 1 % of steps) uses its min and max. Checkpoints saved before that rule (their
`to_dict` has no "rule") keep the one they were trained with: every spread clamped at 1e-6.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wm.data.errors import SchemaError
from wm.data.layout import rewrite_command
from wm.data.store import DemoStore

MODES = ("minmax", "meanstd", "quantile", "identity")
STATS = ("min", "max", "mean", "std", "q01", "q99")
MIN_SPREAD = 1e-4  # half-range or std below this: the dimension is only centred (module docstring)
RULE = 2  # how spreads are chosen: 2 as above; 1 before it (spreads clamped at 1e-6, quantiles always)
COARSE_STEP = 0.01  # float32 steps coarser than this fraction of a dimension's scale: `coarse_notes`
QUANTILE_SAMPLES = 200_000  # quantiles are estimated from at most this many evenly spaced steps


def compute_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension statistics over axis 0 of a (T, *shape) array."""
    x = np.asarray(values, dtype=np.float64)
    sub = x[:: max(1, len(x) // QUANTILE_SAMPLES)]
    return {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "q01": np.quantile(sub, 0.01, axis=0),
        "q99": np.quantile(sub, 0.99, axis=0),
    }


def non_finite_message(path: object, key: str, episode: int, step: int) -> str:
    """The one line that refuses a non-finite value of low-dim `key` at `step` of `episode`."""
    drop = rewrite_command(path, [episode])
    return (
        f"{path}: key {key!r} holds a non-finite value in episode {episode}, step {step}; normalizing it "
        f"would make NaN inputs: drop the episode ({drop}) or train on another key"
    )


def check_finite(store: DemoStore, key: str, episodes: Iterable[int] | None = None) -> None:
    """Refuse (ValueError, `non_finite_message`) a NaN or inf in low-dim `key` in `episodes` of `store`
    (all by default): the episodes a normalizer is not fitted on (validation, action-free, another
    store's) feed the model too. One read of the key; an integer or boolean key passes unread."""
    _check_has_key(store, key)
    if not np.issubdtype(np.dtype(store.schema.keys[key].dtype), np.inexact) or not store.n_steps:
        return
    values = store.read(key, slice(0, store.n_steps))
    bad_steps = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if not len(bad_steps):
        return
    ends = store.episode_ends
    of = np.searchsorted(ends, bad_steps, side="right")  # each bad step's episode
    wanted = np.ones(len(ends), dtype=bool)
    if episodes is not None:
        wanted = np.isin(np.arange(len(ends)), list(episodes))
    hit = np.flatnonzero(wanted[of])
    if len(hit):
        step, e = int(bad_steps[hit[0]]), int(of[hit[0]])
        raise ValueError(non_finite_message(store.path, key, e, step - (int(ends[e - 1]) if e else 0)))


def _check_has_key(store: DemoStore, key: str) -> None:
    """A SchemaError naming the store and `key` when the store lacks it (it was a bare KeyError)."""
    if key not in store.schema.keys:
        raise SchemaError(f"{store.path}: no key {key!r} to normalize (its keys: {store.keys})")


def _spread(s: torch.Tensor) -> torch.Tensor:
    """A dimension's scale: its spread, or 1 where it hardly varies (only centred)."""
    return torch.where(s < MIN_SPREAD, torch.ones_like(s), s)


def _stat_array(key: str, name: str, stats: dict[str, Any]) -> torch.Tensor:
    """Statistic `name` of `key` as float32, refused in one line when missing or not finite (a NaN or
    inf there normalizes every value to NaN)."""
    if name not in stats:
        raise ValueError(f"normalizer: key {key!r} has no statistic {name!r} (it needs {list(STATS)})")
    value = torch.as_tensor(np.asarray(stats[name], dtype=np.float64), dtype=torch.float32)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"normalizer: statistic {name!r} of key {key!r} is not finite ({value.tolist()}): refit the "
            "normalizer on finite data"
        )
    return value


def _half_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(hi - lo) / 2 without overflow: hi - lo of a float32 range wider than 3.4e38 is inf (a scale that
    zeroed the dimension and unnormalized it to NaN). Halving is exact, so the value is the same."""
    return hi / 2 - lo / 2


def _middle(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(hi + lo) / 2 without overflow (see `_half_range`)."""
    return hi / 2 + lo / 2


class Normalizer(nn.Module):
    """Per-key normalization. `modes` maps key -> mode; `stats` maps key -> {stat: array}."""

    def __init__(self, modes: dict[str, str], stats: dict[str, dict[str, Any]], rule: int = RULE) -> None:
        super().__init__()
        if rule not in (1, 2):
            raise ValueError(f"normalizer rule {rule!r} is not 1 or 2 (a checkpoint of a newer version?)")
        self.rule = rule
        for key, mode in modes.items():
            if mode not in MODES:
                raise ValueError(f"normalizer mode {mode!r} for key {key!r} is not one of {MODES}")
            if mode != "identity" and key not in stats:
                raise ValueError(f"normalizer: no statistics for key {key!r}")
        names = {self._buf(key, "") for key, mode in modes.items() if mode != "identity"}
        if len(names) < sum(mode != "identity" for mode in modes.values()):  # "a.b", "a__b": one buffer
            raise ValueError(
                f"normalizer: keys {sorted(modes)} collide as buffer names ('.' is stored as '__'): "
                "rename one"
            )
        self.modes = dict(modes)
        for key, mode in modes.items():
            if mode == "identity":
                continue
            values = {name: _stat_array(key, name, stats[key]) for name in STATS}
            shapes = {name: v.shape for name, v in values.items()}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"normalizer: key {key!r} has statistics of different shapes {shapes}")
            for name, value in values.items():
                self.register_buffer(self._buf(key, name), value)

    @staticmethod
    def _buf(key: str, name: str) -> str:
        return f"{key.replace('.', '__')}__{name}"

    def stat(self, key: str, name: str) -> torch.Tensor:
        return getattr(self, self._buf(key, name))

    @classmethod
    def fit(
        cls, store: DemoStore, modes: dict[str, str], episodes: Iterable[int] | None = None
    ) -> Normalizer:
        """Fit statistics for every non-identity key over the given episodes (all by default)."""
        stats = {}
        eps = list(range(store.n_episodes)) if episodes is None else list(episodes)
        for key, mode in modes.items():
            if mode == "identity":
                continue
            _check_has_key(store, key)
            if store.schema.keys[key].kind == "image":
                raise ValueError(f"key {key!r} is an image; images are scaled to [0, 1], use mode 'identity'")
            parts = [store.read(key, store.episode_slice(e), episode=e) for e in eps]
            for e, part in zip(eps, parts, strict=True):
                bad = ~np.isfinite(part)  # in the key's own dtype: no float64 copy per episode
                if bad.any():
                    raise ValueError(non_finite_message(store.path, key, e, int(np.argwhere(bad)[0][0])))
            if not sum(len(p) for p in parts):  # numpy said only "need at least one array to concatenate"
                raise ValueError(
                    f"{store.path}: no steps to fit key {key!r} on ({len(eps)} episode(s), all empty)"
                )
            stats[key] = compute_stats(np.concatenate(parts, axis=0))
        return cls(modes, stats)

    def _scale_offset(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) with normalized = (x - offset) / scale."""
        mode = self.modes[key]
        if self.rule == 1:  # as the checkpoint was trained
            if mode == "meanstd":
                return self.stat(key, "std").clamp_min(1e-6), self.stat(key, "mean")
            lo_name, hi_name = ("min", "max") if mode == "minmax" else ("q01", "q99")
            lo, hi = self.stat(key, lo_name), self.stat(key, hi_name)
            return _half_range(lo, hi).clamp_min(1e-6), _middle(lo, hi)
        if mode == "meanstd":
            return _spread(self.stat(key, "std")), self.stat(key, "mean")
        lo, hi = self.stat(key, "min"), self.stat(key, "max")
        if mode == "quantile":
            narrow = (self.stat(key, "q99") - self.stat(key, "q01")) / 2 < MIN_SPREAD
            lo = torch.where(narrow, lo, self.stat(key, "q01"))
            hi = torch.where(narrow, hi, self.stat(key, "q99"))
        return _spread(_half_range(lo, hi)), _middle(lo, hi)

    def coarse_notes(self) -> list[str]:
        """One line per key with dimensions that float32, the precision models read inputs in, cannot
        resolve within their range: values far from zero beside a small spread (a position in metres
        logged with a large fixed offset, a clock reading). Each normalized step there is coarser than
        `COARSE_STEP` of the dimension's scale, so the model sees a staircase, or a constant."""
        lines = []
        for key, mode in self.modes.items():
            if mode == "identity":
                continue
            scale, offset = (t.double().flatten() for t in self._scale_offset(key))
            lo, hi = self.stat(key, "min").double().flatten(), self.stat(key, "max").double().flatten()
            step = torch.maximum(lo.abs(), hi.abs()) * 2.0**-23 / scale  # float32's spacing there, normalized
            # (a dimension that hardly varies is only centred: a constant to the model anyway)
            varies = _half_range(lo, hi) >= MIN_SPREAD
            coarse = ((step > COARSE_STEP) & varies).nonzero().flatten().tolist()
            if coarse:
                i = max(coarse, key=lambda j: float(step[j]))
                lines.append(
                    f"note: key {key!r}, dimension(s) {coarse}: values around {float(offset[i]):.6g} vary by "
                    f"{float(scale[i]):.3g}, and float32 (what the model reads) resolves them only in steps "
                    f"of {float(step[i]):.1%} of that: store them relative to a reference value (minus a "
                    "fixed offset) to give the model their motion"
                )
        return lines

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.modes or self.modes[key] == "identity":
            return x
        scale, offset = self._scale_offset(key)
        x = x if x.is_floating_point() else x.float()  # .to(an int x) would round the statistics
        return (x - offset.to(x)) / scale.to(x)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.modes or self.modes[key] == "identity":
            return x
        scale, offset = self._scale_offset(key)
        x = x if x.is_floating_point() else x.float()
        return x * scale.to(x) + offset.to(x)

    def normalize_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of `batch` with every key this normalizer knows normalized."""
        return {k: self.normalize(k, v) if k in self.modes else v for k, v in batch.items()}

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        stats = {
            key: {name: self.stat(key, name).tolist() for name in STATS}
            for key, mode in self.modes.items()
            if mode != "identity"
        }
        return {"modes": self.modes, "stats": stats, "rule": self.rule}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        return cls(d["modes"], d.get("stats", {}), d.get("rule", 1))  # no rule: saved before rule 2

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_state_dict(
        cls, modes: dict[str, str], state: dict[str, torch.Tensor], prefix: str = "", rule: int = RULE
    ) -> Normalizer:
        """Rebuild from a model state dict (its `prefix`-ed buffers), the modes saved in the config and
        the `rule` the model was trained with (`to_dict`'s "rule"; 1 for checkpoints saved without one):
        the state dict holds the statistics only."""
        stats = {
            key: {name: state[prefix + cls._buf(key, name)].cpu().numpy() for name in STATS}
            for key, mode in modes.items()
            if mode != "identity"
        }
        return cls(modes, stats, rule)
