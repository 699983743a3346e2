"""Training windows: which steps around an anchor step a model needs, and where they come from.

A model declares, for each key, the step offsets it needs relative to an anchor step t (for example
observation history 2 and action horizon 16 is `obs: (-1, 0)`, `action: (-1, ..., 14)`). The index
lists every anchor in every episode; a window that reaches past an episode's edge repeats the edge
step and marks the padded positions in a per-key `is_pad` mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def whole_number(what: str, value: object) -> int:
    """`value` as an int when it is a whole number (2 or 2.0), else a one-line ValueError naming `what`
    (1.5 used to be truncated to 1, NaN to disable a padding bound, "12" to read as offsets 1 and 2)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if not (np.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class WindowSpec:
    """Per-key step offsets relative to the anchor step.

    `max_pad_before` / `max_pad_after` bound how far a window may reach past the episode's first /
    last step (None: any anchor inside the episode is allowed, padding as much as needed).
    """

    offsets: dict[str, tuple[int, ...]]
    max_pad_before: int | None = None
    max_pad_after: int | None = None

    def __post_init__(self) -> None:
        if not self.offsets:
            raise ValueError("a WindowSpec needs at least one key")
        fixed = {}
        for key, offs in self.offsets.items():
            if isinstance(offs, (str, bytes)):
                raise ValueError(f"key {key!r}: offsets must be a sequence of whole numbers, got {offs!r}")
            offs = tuple(whole_number(f"key {key!r}: offset", o) for o in offs)
            if not offs:
                raise ValueError(f"key {key!r}: empty offset list")
            fixed[key] = offs
        object.__setattr__(self, "offsets", fixed)
        for name in ("max_pad_before", "max_pad_after"):
            v = getattr(self, name)
            if v is not None:
                v = whole_number(name, v)
                if v < 0:
                    raise ValueError(f"{name} must be >= 0 or None, got {v}")
                object.__setattr__(self, name, v)

    @classmethod
    def history_horizon(
        cls,
        obs_keys: Sequence[str],
        action_keys: Sequence[str] = ("action",),
        n_obs: int = 2,
        horizon: int = 16,
        frameskip: int = 1,
        n_action_exec: int | None = None,
    ) -> WindowSpec:
        """Diffusion Policy / DINO-WM style windows.

        Observations at `(-(n_obs-1)..0) * frameskip`; actions start at the first observation and
        cover `horizon` frames of `frameskip` raw steps each (DINO-WM concatenates those per frame).
        With `n_action_exec`, windows may pad at most `n_action_exec - 1` steps past the end and
        `(n_obs - 1) * frameskip` before the start, as Diffusion Policy's sampler does.
        """
        counts = {"n_obs": n_obs, "horizon": horizon, "frameskip": frameskip, "n_action_exec": n_action_exec}
        for name, v in counts.items():
            if v is not None and whole_number(name, v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        n_obs, horizon, frameskip = int(n_obs), int(horizon), int(frameskip)
        first = -(n_obs - 1) * frameskip
        obs = tuple(first + i * frameskip for i in range(n_obs))
        act = tuple(range(first, first + horizon * frameskip))
        offsets = {k: obs for k in obs_keys} | {k: act for k in action_keys}
        pad_after = None if n_action_exec is None else n_action_exec - 1
        return cls(offsets, max_pad_before=-first, max_pad_after=pad_after)

    @property
    def span(self) -> tuple[int, int]:
        """(lowest offset, highest offset) over all keys."""
        lo = min(min(o) for o in self.offsets.values())
        hi = max(max(o) for o in self.offsets.values())
        return lo, hi


def build_index(
    episode_ends: np.ndarray, spec: WindowSpec, episodes: Sequence[int] | None = None
) -> np.ndarray:
    """All anchors of the given episodes as an (N, 3) int64 array of
    (anchor step, episode start, episode end), in global step numbers (episode end exclusive)."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    lo_off, hi_off = spec.span
    rows = []
    for e in range(len(ends)) if episodes is None else episodes:
        s, t_end = int(starts[e]), int(ends[e])
        first, last = s, t_end - 1  # anchors must lie inside the episode
        if spec.max_pad_before is not None:
            first = max(first, s - lo_off - spec.max_pad_before)
        if spec.max_pad_after is not None:
            last = min(last, t_end - 1 - hi_off + spec.max_pad_after)
        if last < first:
            continue
        anchors = np.arange(first, last + 1, dtype=np.int64)
        rows.append(np.stack([anchors, np.full_like(anchors, s), np.full_like(anchors, t_end)], axis=1))
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(rows, axis=0)


def min_episode_length(spec: WindowSpec) -> int:
    """The fewest steps an episode needs to hold one window of `spec` (its padding bounds allowing)."""
    lo, hi = spec.span
    before = 0 if spec.max_pad_before is None else max(0, -lo - spec.max_pad_before)
    after = 0 if spec.max_pad_after is None else max(0, hi - spec.max_pad_after)
    return 1 + before + after


def describe_window(spec: WindowSpec) -> str:
    """What an episode must hold for a window of `spec`, as a phrase: "spans 21 steps (at most 0 padded
    before, at most 5 padded after), so an episode needs at least 16"."""
    lo, hi = spec.span
    pads = [
        f"at most {v} padded {side}"
        for v, side in ((spec.max_pad_before, "before"), (spec.max_pad_after, "after"))
        if v is not None
    ]
    return (
        f"spans {hi - lo + 1} steps ({', '.join(pads) or 'any padding'}), so an episode needs at least "
        f"{min_episode_length(spec)}"
    )


def why_no_windows(where: object, lengths: Sequence[int] | np.ndarray, spec: WindowSpec) -> str:
    """Why episodes of `lengths` (of the store at `where`) hold no window of `spec`, in one line: their
    lengths against the window's span and padding, and the length an episode needs."""
    lengths = np.asarray(lengths, dtype=np.int64)
    have = "no episodes"
    if len(lengths):
        have = f"{len(lengths)} episode(s) of {lengths.min()}..{lengths.max()} steps"
    return f"{where}: {have}; a window {describe_window(spec)}"


def window_indices(
    anchor: int, start: int, end: int, offsets: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Global step indices for `offsets` around `anchor`, clamped to [start, end), and the `is_pad` mask."""
    raw = anchor + np.asarray(offsets, dtype=np.int64)
    clipped = np.clip(raw, start, end - 1)
    return clipped, raw != clipped


def split_episodes(n_episodes: int, val_ratio: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Train / validation split by episode, seeded. At least one validation episode when val_ratio > 0
    and there are two or more episodes; a ratio that leaves no training episode is refused."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    perm = np.random.default_rng(seed).permutation(n_episodes)
    n_val = int(round(n_episodes * val_ratio))
    if val_ratio > 0 and n_episodes >= 2:
        n_val = max(1, n_val)
    if n_episodes and n_val >= n_episodes:
        raise ValueError(
            f"val_ratio={val_ratio} of {n_episodes} episode(s) leaves none to train on: lower val_ratio "
            "(0 trains on every episode and validates on none)"
        )
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])
