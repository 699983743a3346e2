"""Window dataset over a demonstration store, for training world models and policies.

Each item is a window around an anchor step (see `wm.data.windows`). Batch keys, for every key `k`
the model asked for with `n` offsets:

    k            (n, *shape) float32 for low-dim keys; images (n, C, H, W) float32 in [0, 1]
                 (or raw uint8 with `image_dtype="uint8"`: a quarter of the bytes between DataLoader
                 workers and the trainer, which converts the batch on its device; no augmentation
                 then); a store's images are read as 0..255 whatever their dtype (`wm.data.frames`)
    k + "_is_pad" (n,) bool, True where the window reached past the episode's edge
    "episode", "anchor"  () int64, where the window came from

Low-dimensional keys are read into memory once (they are small); images are read from the store on
demand, or loaded whole with `in_memory=True`. The store is opened lazily in each DataLoader worker
(zarr's I/O threads do not survive a fork). The dataset implements `__getitems__`, so a DataLoader
reads a whole batch's frames in one zarr call and augments them in one vectorized pass, each sample
with its own random draw.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from wm.data.augment import AugmentConfig, augment
from wm.data.errors import SchemaError, StoreError
from wm.data.frames import SAMPLED_FRAMES, check_scale, check_values, to_uint8
from wm.data.store import DemoStore
from wm.data.windows import WindowSpec, build_index, whole_number, why_no_windows

RANK_SEED_STRIDE = 7919  # DDP: rank r's loader workers draw from seed + r * this


class BatchedDataset(Dataset, ABC):
    """A dataset read a batch at a time: subclasses give `get_batch(indices) -> {key: (B, ...)}`, and a
    plain DataLoader gets items and whole batches (`__getitems__`) from it."""

    @abstractmethod
    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Used by a plain DataLoader: the batch is read at once, then split for its collate_fn."""
        batch = self.get_batch(indices)
        return [{k: v[b] for k, v in batch.items()} for b in range(len(indices))]


ACTION_FREE = "action_free"  # episode info flag: this episode's actions must not be trained on


class WindowDataset(BatchedDataset):
    """Windows from the store at `path`, for the episodes given (all by default). Episodes flagged
    action-free (`flag_action_free`) are refused where the windows read actions: theirs are no labels
    (`wm.data.mixture.ActionFreeWindows` reads them as such)."""

    masks_flagged_actions = False  # (ActionFreeWindows: True)

    def __init__(
        self,
        path: str | os.PathLike,
        spec: WindowSpec,
        episodes: Sequence[int] | None = None,
        *,
        in_memory: bool = False,
        augment_cfg: AugmentConfig | None = None,
        train: bool = True,
        schema_overrides: dict[str, Any] | None = None,
        image_dtype: str = "float32",
    ) -> None:
        if image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}")
        if image_dtype == "uint8" and (augment_cfg is not None and augment_cfg.active):
            raise ValueError(
                "uint8 images are delivered raw: augment the float batch with wm.data.augment instead"
            )
        self.image_dtype = image_dtype
        self.path = Path(path)
        self.spec = spec
        self.augment_cfg = augment_cfg or AugmentConfig()
        self.train = train
        self._overrides = schema_overrides
        with DemoStore.open(self.path, schema_overrides=schema_overrides) as store:
            missing = [k for k in spec.offsets if k not in store.schema.keys]
            if missing:
                raise SchemaError(
                    f"{self.path}: the model needs keys {missing} that the store lacks (it has {store.keys})"
                )
            self.schema = store.schema
            self.episode_ends = store.episode_ends
            self.episodes = (  # 1.5 was read as episode 1
                list(range(store.n_episodes))
                if episodes is None
                else [whole_number(f"{self.path}: episode", e) for e in episodes]
            )
            bad = [e for e in self.episodes if not 0 <= e < store.n_episodes]
            if bad:
                raise IndexError(f"{self.path}: episodes {bad} out of range ({store.n_episodes} episodes)")
            if "action" in spec.offsets and not self.masks_flagged_actions:
                flagged = [e for e in self.episodes if store.episode_info(e).get(ACTION_FREE)]
                if flagged:  # (their stored actions were read as labels)
                    raise SchemaError(
                        f"{self.path}: episodes {flagged[:10]}{' ...' if len(flagged) > 10 else ''} are "
                        f"flagged {ACTION_FREE}: their actions are no labels; read them with "
                        "wm.data.mixture.ActionFreeWindows, or leave them out (episodes=)"
                    )
            self.index = build_index(self.episode_ends, spec, self.episodes)
            self.image_keys = [k for k in spec.offsets if self.schema.keys[k].kind == "image"]
            for key in self.image_keys:
                if np.dtype(self.schema.keys[key].dtype) != np.uint8 and store.n_steps:
                    steps = np.unique(np.linspace(0, store.n_steps - 1, SAMPLED_FRAMES).astype(np.int64))
                    check_scale(self.path, key, store.read_rows(key, steps), steps, self.episode_ends)
            in_ram = [k for k in spec.offsets if k not in self.image_keys or in_memory]
            self._ram = store.load_all(in_ram)
            for key in self.image_keys:
                if key in self._ram:
                    frames = self._ram[key]  # every frame checked once (uint8: no look)
                    check_values(self.path, key, frames, np.arange(len(frames)), self.episode_ends)
                    self._ram[key] = to_uint8(self._ram[key])
        self._store: DemoStore | None = None
        self._pid = -1
        self._identity = store_identity(self.path)  # the store read at init: a rewrite makes another
        # Episode number of every global step, for the "episode" batch key.
        self._step_episode = np.repeat(
            np.arange(len(self.episode_ends)), np.diff(self.episode_ends, prepend=0)
        )

    def __len__(self) -> int:
        return len(self.index)

    def why_empty(self) -> str:
        """Why no window fits, in one line: the episodes' lengths against the window's span."""
        lengths = np.diff(self.episode_ends, prepend=0)[self.episodes] if self.episodes else []
        return why_no_windows(self.path, lengths, self.spec)

    def _reader(self) -> DemoStore:
        if self._store is None or self._pid != os.getpid():
            self._store = DemoStore.open(self.path, schema_overrides=self._overrides)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"], state["_pid"] = None, -1  # every worker opens its own
        return state

    def frames(self, key: str, steps: np.ndarray) -> np.ndarray:
        """Frames at global `steps` (any order, repeats allowed) as (len(steps), H, W, C) uint8."""
        if key in self._ram:
            return self._ram[key][steps]
        if store_identity(self.path) != self._identity:  # the steps in RAM and the index are the old store's
            raise StoreError(
                f"{self.path}: the store was rewritten (episodes deleted or replaced) while this dataset "
                "read it; its frames would no longer match the actions: start the run again"
            )
        uniq, inverse = np.unique(steps, return_inverse=True)
        # Direct chunk decoding where the layout allows, else zarr; a damaged chunk raises
        # CorruptStoreError naming its file, the key, its steps and their episodes either way.
        rows = self._reader().read_rows(key, uniq)
        check_values(self.path, key, rows, uniq, self.episode_ends)  # not uint8: none clipped, no NaN
        return to_uint8(rows)[inverse]

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The windows at `indices` as one batch {key: (B, ...)}: frames read in one pass, augmented in
        one vectorized call with a separate random draw per sample."""
        rows = self.index[np.asarray(indices, dtype=np.int64)]  # (B, 3): anchor, start, end
        anchors, starts, ends = rows[:, :1], rows[:, 1:2], rows[:, 2:3]
        out: dict[str, torch.Tensor] = {}
        for key, offsets in self.spec.offsets.items():
            raw = anchors + np.asarray(offsets, dtype=np.int64)[None]  # (B, n)
            steps = np.clip(raw, starts, ends - 1)
            out[key + "_is_pad"] = torch.from_numpy(raw != steps)
            if key in self.image_keys:
                frames = self.frames(key, steps.reshape(-1))  # (B * n, H, W, C)
                imgs = torch.from_numpy(frames).view(*steps.shape, *frames.shape[1:]).permute(0, 1, 4, 2, 3)
                if self.image_dtype == "uint8":  # (B, n, C, H, W) uint8, a quarter of the bytes to ship
                    out[key] = imgs.contiguous()
                else:
                    out[key] = augment(imgs.float().div_(255.0), self.augment_cfg, train=self.train)
            else:
                out[key] = torch.from_numpy(self._ram[key][steps].astype(np.float32, copy=False))
        out["anchor"] = torch.from_numpy(rows[:, 0])
        out["episode"] = torch.from_numpy(self._step_episode[rows[:, 0]])
        return out


def frames_key(key: str) -> str:
    """The batch key under which `WithFrames` delivers camera `key`'s frames beside its features."""
    return f"{key}:frames"


class WithFrames(BatchedDataset):
    """Windows of a feature cache (`windows`, whose camera key holds features) plus, under
    `frames_key(key)`, the source store's frames of that camera at `offsets` from each window's anchor
    (B, n, C, H, W) float in [0, 1], un-augmented: what a model trained from cached features needs of
    the pixels themselves (DINO-WM's video decoder). The cache keeps the source's episode boundaries,
    so an anchor is the same step in both; steps past an episode's edge repeat it, as windows do."""

    def __init__(
        self,
        windows: WindowDataset,
        source: str | os.PathLike,
        key: str,
        offsets: Sequence[int],
        in_memory: bool,
    ) -> None:
        self.windows, self.key, self.offsets = windows, key, np.asarray(offsets, dtype=np.int64)
        self.source = WindowDataset(source, WindowSpec({key: (0,)}), windows.episodes, in_memory=in_memory)
        if not np.array_equal(self.source.episode_ends, windows.episode_ends):
            raise SchemaError(f"{source}: its episodes are not those of the feature cache {windows.path}")
        self.starts = np.concatenate([[0], windows.episode_ends[:-1]])

    def __len__(self) -> int:
        return len(self.windows)

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out = self.windows.get_batch(indices)
        anchors = out["anchor"].numpy()
        episodes = out["episode"].numpy()
        lo, hi = self.starts[episodes][:, None], self.windows.episode_ends[episodes][:, None] - 1
        steps = np.clip(anchors[:, None] + self.offsets[None], lo, hi)  # (B, n)
        frames = torch.from_numpy(self.source.frames(self.key, steps.reshape(-1)))  # (B * n, H, W, C)
        frames = frames.view(*steps.shape, *frames.shape[1:]).permute(0, 1, 4, 2, 3)
        out[frames_key(self.key)] = frames.float().div_(255.0)
        return out


class ResumableBatches(BatchSampler):
    """A BatchSampler whose next pass leaves out its first `skip` batches (their indices are drawn, no
    data is read for them): a resumed training run continues the epoch where its checkpoint left it,
    with the batches an uninterrupted run would have drawn. Each batch's indices go out with the epoch
    they belong to (`set_epoch`), so a dataset that draws its own windows (`MixedWindows`) learns it in
    whichever process builds the batch: set on the dataset in the trainer's process, it never reached a
    persistent worker, which drew epoch 0's windows for the whole run."""

    skip = 0
    epoch: int | None = None  # None until set: a dataset's own epoch (`MixedWindows.set_epoch`) stands

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next passes: the batches' datasets get it, and a DDP shard reshuffles."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int | None, list[int]]]:  # type: ignore[override]
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield self.epoch, batch


class _Batches(Dataset):
    """A view whose items are whole batches: item (`epoch`, `indices`) is `dataset.get_batch(indices)`
    of that epoch."""

    def __init__(self, dataset: WindowDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int | None, Sequence[int]]) -> dict[str, torch.Tensor]:
        epoch, indices = item  # (`ResumableBatches`)
        if epoch is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset.get_batch(indices)


def store_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of the store at `path`: a rewrite (delete / keep episodes, an overwrite) swaps in
    another directory, an append keeps it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def make_loader(
    dataset: WindowDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    persistent_workers: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader that builds each batch with one `get_batch` call (no per-sample split and re-stack),
    shuffled with a seeded generator so every epoch's order differs but a run is reproducible.
    Call `loader.sampler.set_epoch(e)` before each epoch (the trainer does): with `world_size > 1` (DDP)
    each rank reads its own shard, reshuffled every epoch, and a dataset that draws its own windows
    (`MixedWindows`) draws anew."""
    counts = {"num_workers": num_workers, "rank": rank, "world_size": world_size, "seed": seed}
    num_workers, rank, world_size, seed = (whole_number(k, v) for k, v in counts.items())
    if num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:  # rank 1 of 1 read rank 0's shard
        raise ValueError(
            "need num_workers >= 0, world_size >= 1 and 0 <= rank < world_size, got "
            f"num_workers={num_workers}, rank={rank}, world_size={world_size}"
        )
    if shuffle and len(dataset) == 0:  # torch's sampler would say only "num_samples=0"
        why = dataset.why_empty() if isinstance(dataset, WindowDataset) else "the dataset is empty"
        raise ValueError(f"no windows to train on: {why}")
    gen = torch.Generator().manual_seed(seed)
    if world_size > 1:
        base = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        # the workers' random streams (augmentation) differ between ranks, not only between workers
        gen = torch.Generator().manual_seed(seed + RANK_SEED_STRIDE * rank)
    elif shuffle:
        base = RandomSampler(dataset, generator=gen)
    else:
        base = SequentialSampler(dataset)
    return DataLoader(
        _Batches(dataset),
        batch_size=None,
        sampler=ResumableBatches(base, batch_size, drop_last),
        num_workers=num_workers,
        generator=gen,
        persistent_workers=persistent_workers and num_workers > 0,
    )
