"""Turning action chunks into one action per control step: a queue, or temporal ensembling.

Both are plain state machines over tensors (E episodes stepped together), independent of the model:

    ActionQueue        pop the next action of the current chunk; when the queue is empty the caller
                       predicts a new chunk (Diffusion Policy / LeRobot: n_action_exec steps open loop).
    TemporalEnsembler  ACT's temporal ensembling: a new chunk is predicted at *every* step; the action
                       for step t is the weighted mean of every stored chunk's prediction for t,
                       w_i = exp(-m * i), with i = 0 for the OLDEST chunk that still covers t (ACT's
                       convention: m > 0 trusts older predictions more and smooths more; m = 0 is a
                       plain mean; m < 0 favours the newest). A chunk of length L covers the L steps
                       starting at the step it was predicted, so up to L predictions are averaged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ActionQueue:
    """FIFO of the current chunk's remaining actions, (E, n, Da)."""

    def __init__(self) -> None:
        self._actions: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self._actions is None else self._actions.shape[1]

    def reset(self) -> None:
        self._actions = None

    def fill(self, chunk: Tensor) -> None:
        """chunk (E, Ta, Da) replaces whatever is left."""
        self._actions = chunk

    def pop(self) -> Tensor:
        """(E, Da), the next action."""
        if not len(self):
            raise RuntimeError("the action queue is empty: fill it with a chunk first")
        action, self._actions = self._actions[:, 0], self._actions[:, 1:]
        return action


class TemporalEnsembler:
    """Weighted average of overlapping chunk predictions (see the module docstring for the weights)."""

    def __init__(self, m: float) -> None:
        if not math.isfinite(m):
            raise ValueError(f"temporal ensembling coefficient must be finite, got {m}")
        self.m = float(m)
        self._chunks: list[Tensor] = []  # oldest first; chunk j was predicted len - 1 - j steps ago

    def reset(self) -> None:
        self._chunks = []

    def weights(self, n: int) -> Tensor:
        """(n,) normalized weights for n predictions, oldest first."""
        w = torch.exp(-self.m * torch.arange(n, dtype=torch.float64))
        return (w / w.sum()).float()

    def update(self, chunk: Tensor) -> Tensor:
        """Add the chunk (E, L, Da) predicted at this step; returns this step's action (E, Da)."""
        self._chunks.append(chunk)
        n = len(self._chunks)
        # Chunk j (oldest first) was predicted n - 1 - j steps ago: its prediction for now is at that index.
        preds = [c[:, n - 1 - j] for j, c in enumerate(self._chunks)]
        w = self.weights(n).to(chunk)
        action = torch.einsum("n,ned->ed", w, torch.stack(preds))
        # Drop the oldest chunk once it has no prediction for the next step.
        if self._chunks[0].shape[1] <= n:
            self._chunks.pop(0)
        return action
