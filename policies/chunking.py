"""Turning action chunks into one action per control step, and `ChunkPolicy`, the controller of any
model that samples action chunks (diffusion policies).

The queue and the ensembler are plain state machines over tensors (E episodes stepped together),
independent of the model:

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
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from policies.base import RawObs, check_chunk_request, with_prefix
from policies.inputs import ObsHistory
from wm import kernels
from wm.seeding import derived_torch_seed
from wm.spec import IOSpec


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
        # a softmax: exp(-m * i) normalized without overflow for any m (m < 0 favours the newest)
        return torch.softmax(-self.m * torch.arange(n, dtype=torch.float64), 0).float()

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


class ChunkModel(Protocol):
    """A model that samples raw action chunks from its own input tensors (`policies.inputs`). A model
    whose `sample_actions` also takes a sequence of E generators, one per row, says so with a true
    `row_generators` attribute; `ChunkPolicy` otherwise samples row-seeded episodes one row at a time."""

    io_spec: IOSpec

    def sample_actions(
        self,
        obs: dict[str, Tensor],
        generator: torch.Generator | None = None,
        previous: Tensor | None = None,
        frozen: int = 0,
        full: bool = False,
    ) -> Tensor:
        """obs values (E, history, ...) -> raw actions (E, Ta, Da) from the current step on; with `full`
        every action the model predicts from the current step on. previous (E, n, Da) raw, previous[:, 0]
        due at the current step, guides the sample towards its first `frozen` actions (and softly
        towards the rest); only `ChunkPolicy.chunk_from` passes the last three."""
        ...


class ChunkPolicy:
    """The `Policy` (and `Previewable`, `ChunkController`, `EpisodeRows`) of a `ChunkModel`: raw
    observations go into the model's `ObsHistory`; `select_action` executes each chunk from a queue, or,
    with `temporal_ensemble` m, samples a chunk every step and averages the overlapping predictions
    (`TemporalEnsembler`).
    Sampling noise comes from a generator seeded with `seed` at construction (None: unseeded), so an
    evaluation is reproducible; `reset` does not reseed, so episodes draw different noise. Once a runner
    names the episodes (`start_episodes`, until the next `reset`), each row draws from its own generator
    seeded from (`seed`, its episode's seed): an episode's actions do not depend on which episodes share
    its batch up to the model's arithmetic, which can depend on the batch size: rounding in fp32, and
    under `precision=auto` the kernel each layer shape chose (fp32, bf16 or int8 weights, each within the
    accuracy its calibration checks), which can differ between a batch of one and of eight."""

    preview_label = "policy input"

    def __init__(self, model: Any, temporal_ensemble: float | None = None, seed: int | None = 0) -> None:
        self.model, self.io = model, model.io_spec
        device = next(model.parameters()).device
        self.history = ObsHistory(self.io, device)
        self._queue = ActionQueue()
        self._ensembler = TemporalEnsembler(temporal_ensemble) if temporal_ensemble is not None else None
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._seed = self._generator.initial_seed()  # the row generators' base seed
        self._rows: list[torch.Generator] | None = None  # one per row after `start_episodes`
        self._seconds: list[float] = []

    def reset(self) -> None:
        """Forget the history, the queued actions, the ensembled predictions, the timings and the
        episodes' row generators (`start_episodes`)."""
        self.history.reset()
        self._queue.reset()
        if self._ensembler is not None:
            self._ensembler.reset()
        self._rows = None
        self._seconds = []

    def start_episodes(self, seeds: Sequence[int]) -> None:
        """`EpisodeRows.start_episodes`: row e's noise from a generator seeded from (`seed`, seeds[e])."""
        if any(int(s) < 0 for s in seeds):
            raise ValueError(f"episode seeds must be >= 0, got {list(seeds)}")
        device = self._generator.device
        self._rows = [
            torch.Generator(device=device).manual_seed(derived_torch_seed(self._seed, int(s))) for s in seeds
        ]

    def set_active(self, active: np.ndarray) -> None:
        """`EpisodeRows.set_active`: nothing to skip, a chunk is sampled for the whole batch at once, and
        a finished row draws on from its own generator, which no other row reads."""

    def inference_seconds(self) -> list[float]:
        """Seconds of every chunk sampled since the last `reset`."""
        return list(self._seconds)

    def predict_action_chunk(self, obs: RawObs) -> Tensor:
        """Record obs (values (E, ...)) and sample a fresh chunk: raw actions (E, Ta, Da)."""
        self.history.push(obs)
        return self._sample()

    def select_action(self, obs: RawObs) -> Tensor:
        """Record obs; the next raw action (E, Da): popped from the queue (a new chunk when it is empty),
        or, with temporal ensembling, the weighted mean of every chunk's prediction for this step (every
        action each chunk predicts, as ACT: its first n_action_exec alone averaged nothing at 1)."""
        self.history.push(obs)
        if self._ensembler is not None:
            return self._ensembler.update(self._sample(full=True))
        if not len(self._queue):
            self._queue.fill(self._sample())
        return self._queue.pop()

    def chunk_from(
        self,
        steps: Sequence[RawObs],
        actions: Sequence[np.ndarray],
        previous: np.ndarray | None = None,
        frozen: int = 0,
        guide: bool = True,
    ) -> Tensor:
        """`ChunkController.chunk_from`: refill the history with steps / actions and sample every action
        the model predicts from the newest step on (a diffusion policy: horizon - n_obs + 1), raw
        (E, T, Da). With `previous` (and `guide`), the sampler is guided towards it by soft inpainting
        (`DiffusionPolicy.sample_actions`) and the first `frozen` actions are then set exactly to
        previous's; without `guide` previous is not used. The queue and the ensembler are left alone."""
        prev = check_chunk_request(steps, actions, previous, frozen, self.io.action_dim, self.io.obs_keys)
        if not guide:
            prev, frozen = None, 0
        self.history.refill(steps, actions)
        chunk = self._sample(previous=prev, frozen=frozen, full=True)
        return with_prefix(chunk, prev, frozen)

    def preview(self) -> np.ndarray | None:
        """The newest frame of the model's first camera as the model reads it (E, H, W, 3) uint8."""
        return self.history.latest_frames() if len(self.history) else None

    def _sample(self, **guidance: Any) -> Tensor:
        """A chunk from the history; `guidance`: `ChunkModel.sample_actions`'s previous, frozen, full, only
        from `chunk_from` (so that a model without guidance still serves the `Policy` calls)."""
        return self._sample_from(self.history.inputs(), **guidance)

    def _sample_from(self, inputs: dict[str, Tensor], **guidance: Any) -> Tensor:
        """A chunk from the model `inputs` (`history.inputs()`), timed; with row generators each row's
        noise from its own (in one call when the model takes them, else one call per row)."""
        start = kernels.compute_clock()  # calibrating a kernel is no part of the chunk's time
        with torch.inference_mode():
            if self._rows is None:
                chunk = self.model.sample_actions(inputs, generator=self._generator, **guidance)
            else:
                chunk = self._sample_rows(inputs, self._rows, **guidance)
        self._seconds.append(kernels.compute_clock() - start)
        return chunk

    def _sample_rows(self, inputs: dict[str, Tensor], rows: list[torch.Generator], **guidance: Any) -> Tensor:
        batch = next(iter(inputs.values())).shape[0]
        if len(rows) != batch:
            raise ValueError(f"start_episodes named {len(rows)} episodes, the observations hold {batch}")
        if getattr(self.model, "row_generators", False):
            return self.model.sample_actions(inputs, generator=rows, **guidance)
        prev = guidance.pop("previous", None)
        chunks = [
            self.model.sample_actions(
                {k: v[e : e + 1] for k, v in inputs.items()},
                generator=g,
                **guidance,
                **({} if prev is None else {"previous": prev[e : e + 1]}),
            )
            for e, g in enumerate(rows)
        ]
        return torch.cat(chunks)  # (E, Ta, Da)
