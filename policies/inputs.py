"""Raw robot observations -> a model's input tensors, with the model's history.

Every controller owns one `ObsHistory`: the evaluation runner and a real-time runtime hand it the
same raw observations a `Robot` returns, batched over E robots or episodes, and the controller turns
them into what its model reads (its `IOSpec`): the last `history` observations `frameskip` control
steps apart (the first observation repeated at an episode's start), camera frames as float (C, H, W)
in [0, 1] resized to the model's image size, proprioception as float, and the raw actions executed
between the history frames when the model takes them.

Raw observation: {key: (E, ...)} numpy arrays, images (E, H, W, 3) uint8, proprioception (E, Dp);
other keys (a timestamp, say) are ignored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from policies.base import RawObs
from wm.spec import IOSpec


def check_raw(obs: RawObs, io: IOSpec) -> int:
    """One clear error for a raw observation the model cannot read; returns E, the batch size."""
    missing = [k for k in io.obs_keys if k not in obs]
    if missing:
        raise ValueError(
            f"observation lacks {missing} (it has {sorted(obs)}); the model reads {list(io.obs_keys)}: "
            "an observation from another task or robot?"
        )
    sizes = set()
    for k in io.image_keys:
        img = np.asarray(obs[k])
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"camera {k!r}: expected (E, H, W, 3) frames, got shape {img.shape}")
        if img.dtype != np.uint8:  # a float frame in [0, 1] was divided by 255 again: almost black
            raise ValueError(
                f"camera {k!r}: expected uint8 frames (0..255) as robots give them, got {img.dtype}"
            )
        sizes.add(img.shape[0])
    if io.proprio_key:
        p = np.asarray(obs[io.proprio_key])
        if p.ndim != 2 or p.shape[-1] != io.proprio_dim:
            raise ValueError(
                f"{io.proprio_key!r} has shape {p.shape}, the model reads (E, {io.proprio_dim}): "
                "an observation from another task or robot?"
            )
        with np.errstate(over="ignore"):  # as the model reads it: float64's 1e39 is float32's inf
            finite = np.all(np.isfinite(p.astype(np.float32)))
        if not finite:
            raise ValueError(f"{io.proprio_key!r} holds non-finite values: a faulty sensor reading?")
        sizes.add(p.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"observation keys disagree on the batch size: {sorted(sizes)}")
    if 0 in sizes:
        raise ValueError("an observation of 0 episodes: nothing to act on")
    return sizes.pop()


def frames_to_tensor(frames: np.ndarray, size: tuple[int, int], device: torch.device | str) -> Tensor:
    """uint8 frames (..., H, W, 3) -> float (..., 3, h, w) in [0, 1] at `size` = (h, w) on `device`:
    centre-cropped to the target aspect ratio, then resized (bilinear, antialiased) when they differ."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
    H, W = x.shape[-2:]
    h, w = size
    if (H, W) != (h, w):
        if abs(H * w - W * h) > max(H * w, W * h) * 0.01:  # other aspect ratio: centre crop first
            ch, cw = (H, round(H * w / h)) if W * h > H * w else (round(W * h / w), W)
            top, left = (H - ch) // 2, (W - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.reshape(*lead, 3, h, w)


def to_model_inputs(
    steps: Sequence[RawObs], io: IOSpec, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """T raw observations (each {key: (E, ...)}), oldest first -> {camera: (E, T, 3, H, W) float in
    [0, 1] at io.image_size, proprio: (E, T, Dp) float32}."""
    out = {}
    for k in io.image_keys:
        frames = [np.asarray(o[k]) for o in steps]  # T of (E, H, W, 3)
        if len({f.shape for f in frames}) == 1:  # (the window at one size: resized in one call)
            out[k] = frames_to_tensor(np.stack(frames, axis=1), io.image_size, device)
        else:  # the camera's resolution changed within the window (np.stack failed): each step resized
            out[k] = torch.stack([frames_to_tensor(f, io.image_size, device) for f in frames], dim=1)
    if io.proprio_key:
        p = np.stack([np.asarray(o[io.proprio_key], dtype=np.float32) for o in steps], axis=1)  # (E, T, Dp)
        out[io.proprio_key] = torch.from_numpy(p).to(device)
    return out


class ObsHistory:
    """The last `io.window` raw observations (and the actions between them) of E episodes."""

    def __init__(self, io: IOSpec, device: torch.device | str = "cpu") -> None:
        self.io, self.device = io, torch.device(device)
        self._obs: deque[dict[str, np.ndarray]] = deque(maxlen=io.window)
        self._actions: deque[np.ndarray] = deque(maxlen=io.window - 1)
        self._batch: int | None = None

    def reset(self) -> None:
        """Forget everything (call at every episode start)."""
        self._obs.clear()
        self._actions.clear()
        self._batch = None

    def __len__(self) -> int:
        return len(self._obs)

    def push(self, obs: RawObs, prev_action: np.ndarray | Tensor | None = None) -> None:
        """Record one control step's observation {key: (E, ...)}; `prev_action` (E, Da) is the raw action
        executed just before it (None at an episode's start, or when unknown: zeros, "at rest"). The
        first observation after `reset` fills the whole history (the start is repeated)."""
        E = check_raw(obs, self.io)
        kept = {k: np.array(obs[k], copy=True) for k in self.io.obs_keys}
        if self._batch is not None and E != self._batch:
            raise ValueError(f"{E} observations after {self._batch}: call reset() between episode batches")
        if self._batch is None:
            self._batch = E
            zero = np.zeros((E, self.io.action_dim), np.float32)
            for _ in range(self.io.window):
                self._obs.append(kept)
            for _ in range(self.io.window - 1):
                self._actions.append(zero)
            return
        if self.io.window > 1:
            a = (
                np.zeros((E, self.io.action_dim), np.float32)
                if prev_action is None
                else _as_numpy(prev_action)
            )
            if a.shape != (E, self.io.action_dim):
                raise ValueError(f"prev_action must be (E, Da) = {(E, self.io.action_dim)}, got {a.shape}")
            with np.errstate(over="ignore"):  # (beyond float32's range: inf, refused below)
                a = a.astype(np.float32)
            if not np.all(np.isfinite(a)):
                raise ValueError(
                    "prev_action holds non-finite values (NaN or inf, or beyond float32's range): a faulty "
                    "action log?"
                )
            self._actions.append(a)
        self._obs.append(kept)

    def refill(self, steps: Sequence[RawObs], actions: Sequence[np.ndarray | Tensor]) -> None:
        """Replace the history by consecutive observations `steps` ({key: (E, ...)}, oldest first) and
        the raw actions (E, Da) executed between them (actions[i] between steps[i] and steps[i + 1]):
        the same as `reset` then `push` of each. Only the last `io.window` steps can matter, so only
        they are pushed; with fewer, the first is repeated as after `reset`."""
        if not steps:
            raise ValueError("refill needs at least one observation")
        if len(actions) != len(steps) - 1:
            raise ValueError(f"{len(actions)} actions for {len(steps)} steps: need one between two steps")
        first = max(0, len(steps) - self.io.window)  # the oldest step that can matter
        self.reset()
        self.push(steps[first])
        for obs, action in zip(steps[first + 1 :], actions[first:], strict=True):
            self.push(obs, action)

    def inputs(self) -> dict[str, Tensor]:
        """The model's inputs: {camera: (E, history, 3, H, W), proprio: (E, history, Dp)} and, when the
        model takes past actions and history > 1, "past_action": (E, history - 1, frameskip * Da)."""
        if not self._obs:
            raise RuntimeError("no observation yet: push() one first")
        io, stride = self.io, self.io.frameskip
        steps = list(self._obs)[::stride]  # window = (history - 1) * stride + 1: oldest, ..., newest
        out = to_model_inputs(steps, io, self.device)
        if io.past_actions and io.history > 1:
            acts = np.stack(list(self._actions), axis=1)  # (E, (history - 1) * f, Da)
            acts = acts.reshape(acts.shape[0], io.history - 1, stride * io.action_dim)
            out["past_action"] = torch.from_numpy(acts).to(self.device)
        return out

    def latest_frames(self) -> np.ndarray | None:
        """The newest frame of the first camera as the model sees it: (E, H, W, 3) uint8 at its size
        (None for a model without cameras)."""
        if not self._obs:
            raise RuntimeError("no observation yet: push() one first")
        if not self.io.image_keys:
            return None
        x = frames_to_tensor(self._obs[-1][self.io.image_keys[0]], self.io.image_size, "cpu")
        return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _as_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
