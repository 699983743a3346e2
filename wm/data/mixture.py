"""Action-free windows and mixtures of labelled and video-only demonstrations (UWM co-training).

A video store has no action key, or flags some episodes action-free in their info
(`{"action_free": true}`). `ActionFreeWindows` reads it with the batch layout of `WindowDataset`, so
one model trains on both; `MixedWindows` puts a fixed share of video windows in every batch:

    k, k + "_is_pad"     as `WindowDataset` (see `wm.data.dataset`); for a key the store lacks (the
                         action, a proprio key the video store did not record): zeros (B, n, *shape)
                         float32 and `_is_pad` all True
    "has_action"         (B,) bool, False for windows of action-free episodes or stores: their action is
                         zeros and `action_is_pad` all True, and the model masks their action loss
    "episode", "anchor"  (B,) int64, where the window came from (in its own store)
    "source"             (B,) int64, MixedWindows only: 0 labelled, 1 video

`check_compatible` checks that the two stores (or their feature caches) agree on the cameras the model
reads and on the frame rate; `strip_actions` and `flag_action_free` make action-free data from labelled
demonstrations.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from wm.data.augment import AugmentConfig
from wm.data.dataset import ACTION_FREE, BatchedDataset, WindowDataset
from wm.data.errors import NotAStoreError, SchemaError
from wm.data.ops import check_same_meaning, copy_episodes, keep_episodes
from wm.data.places import check_not_a_source
from wm.data.schema import KeySpec
from wm.data.store import DemoStore
from wm.data.windows import WindowSpec, build_index, whole_number, why_no_windows
from wm.feature_cache import cache_info
from wm.seeding import derived_rng

HAS_ACTION = "has_action"
SOURCE = "source"


class Windows(Protocol):
    """What MixedWindows mixes: a `WindowDataset` or `ActionFreeWindows`."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...


def with_has_action(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with `has_action` (B,) all True added when it has none (a plain `WindowDataset` batch)."""
    if HAS_ACTION in batch:
        return batch
    n = len(batch["anchor"])
    return {**batch, HAS_ACTION: torch.ones(n, dtype=torch.bool)}


class ActionFreeWindows(WindowDataset):
    """Windows of a store that may lack the action key or flag episodes action-free (module docstring).

    `action_shape` is the per-step action shape of the labelled data, needed when the store has no
    `action_key`. `video=True` reads none of its actions (every window action-free): a video store
    co-trains as video even when it holds actions, perhaps in other units or of another robot.
    `absent_keys` {key: per-step shape} names other keys of `spec` the store may lack (proprio a video
    store did not record, see `check_compatible`): zeros with `_is_pad` all True.
    Windows are anchored as `spec` allows, as if the missing keys were there. `self.spec` holds the keys
    read from the store, `self.model_spec` every key of the batch.
    """

    masks_flagged_actions = True  # their actions are zeros with action_is_pad, has_action False

    def __init__(
        self,
        path: str | os.PathLike,
        spec: WindowSpec,
        episodes: Sequence[int] | None = None,
        *,
        in_memory: bool = False,
        action_key: str = "action",
        action_shape: Sequence[int] | None = None,
        absent_keys: Mapping[str, Sequence[int]] | None = None,
        augment_cfg: AugmentConfig | None = None,
        train: bool = True,
        schema_overrides: dict[str, Any] | None = None,
        image_dtype: str = "float32",
        video: bool = False,
    ) -> None:
        with DemoStore.open(path, schema_overrides=schema_overrides) as store:
            keys = {k: v for k, v in store.schema.keys.items() if not (video and k == action_key)}
            flagged = np.array(
                [bool(store.episode_info(e).get(ACTION_FREE, False)) for e in range(store.n_episodes)],
                dtype=bool,
            )
        fill = {
            k: tuple(whole_number(f"absent_keys[{k!r}]", s) for s in v)
            for k, v in (absent_keys or {}).items()
            if k not in keys
        }
        if action_key in spec.offsets:
            fill.update(_action_fill(Path(path), keys.get(action_key), action_key, action_shape))
        fill = {k: v for k, v in fill.items() if k in spec.offsets}
        read = {k: offs for k, offs in spec.offsets.items() if k not in fill}
        if not read:
            raise SchemaError(
                f"{path}: the store has none of the keys {sorted(spec.offsets)} the model reads"
            )
        super().__init__(
            path,
            dataclasses.replace(spec, offsets=read),
            episodes,
            in_memory=in_memory,
            augment_cfg=augment_cfg,
            train=train,
            schema_overrides=schema_overrides,
            image_dtype=image_dtype,
        )
        self.model_spec = spec
        self.index = build_index(self.episode_ends, spec, self.episodes)  # anchors as the full spec allows
        self.action_key = action_key
        self._fill = fill  # key -> per-step shape, zeros in every batch
        self._episode_has_action = ~flagged & (action_key in keys)  # (E,) over the store's episodes

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The windows at `indices` as one batch {key: (B, ...)} (module docstring for the keys)."""
        out = super().get_batch(indices)
        has = torch.from_numpy(self._episode_has_action[out["episode"].numpy()])  # (B,)
        n_batch = len(has)
        for key, shape in self._fill.items():
            n = len(self.model_spec.offsets[key])
            out[key] = torch.zeros(n_batch, n, *shape)  # (B, n, *shape)
            out[key + "_is_pad"] = torch.ones(n_batch, n, dtype=torch.bool)
        act = self.action_key
        if act in self.model_spec.offsets and act not in self._fill and not bool(has.all()):
            out[act][~has] = 0.0  # fresh tensors from get_batch: no store data is touched
            out[act + "_is_pad"][~has] = True
        out[HAS_ACTION] = has
        return out

    def why_empty(self) -> str:
        """Why no window fits, in one line, for the windows the model asked for (`model_spec`: the keys
        the store lacks shape the windows too)."""
        lengths = np.diff(self.episode_ends, prepend=0)[self.episodes] if self.episodes else []
        return why_no_windows(self.path, lengths, self.model_spec)


def _action_fill(
    path: Path, stored: KeySpec | None, action_key: str, action_shape: Sequence[int] | None
) -> dict[str, tuple[int, ...]]:
    """{action_key: shape} when the store lacks the action, else {} (after checking `action_shape`)."""
    want = None if action_shape is None else tuple(whole_number("action_shape", s) for s in action_shape)
    if stored is not None:
        if want is not None and want != stored.shape:
            raise SchemaError(f"{path}: action {action_key!r} is {stored.shape}, not the {want} expected")
        return {}
    if want is None:
        raise ValueError(
            f"{path}: the store has no {action_key!r} key; pass action_shape (the labelled store's "
            "per-step action shape) so action-free windows get zero actions of that shape"
        )
    return {action_key: want}


class MixedWindows(BatchedDataset):
    """One dataset over labelled and video windows, B * video_ratio video windows in a batch of B on
    average (`get_batch`; `make_loader` batches through it): exactly that where it is whole, else its
    floor or ceiling, drawn so the expected share is the ratio (a fixed rounding made 0.1 of 4 zero
    video windows in every batch, and 0.2 of 8 a quarter).

    Each batch draws its windows uniformly at random, without replacement inside the batch, from a
    generator seeded by (`seed`, the epoch, the batch's indices): unbiased, and reproducible for the same
    epoch and indices. The trainer sets the epoch (`set_epoch`) before each: with the indices alone, a
    batch of one index drew the same windows every epoch, and over a whole run about a third of the
    windows (e^-1) were never drawn at batch_size 1. An epoch (`len`) holds
    about one pass's worth of labelled windows, len(labelled) / (1 - video_ratio), but is not an exact
    pass over them, except with video_ratio 0: then index i is labelled window i. Labelled windows come
    first in the batch, video windows after; keys as the module docstring. Both datasets must give the
    same keys, per-sample shapes and dtypes (checked at construction on one window of each).
    """

    def __init__(self, labelled: Windows, video: Windows, video_ratio: float, seed: int = 0) -> None:
        if not (math.isfinite(video_ratio) and 0.0 <= video_ratio < 1.0):
            raise ValueError(f"video_ratio must be in [0, 1) (0: labelled only), got {video_ratio}")
        if len(labelled) == 0:
            raise ValueError(f"the labelled dataset has no windows: {_why_empty(labelled)}")
        if video_ratio > 0 and len(video) == 0:
            raise ValueError(
                f"video_ratio is {video_ratio} but the video dataset has no windows: {_why_empty(video)}"
            )
        self.labelled, self.video = labelled, video
        self.video_ratio, self.seed = float(video_ratio), int(seed)
        self.epoch = 0
        if len(video) > 0:
            _check_same_layout(
                with_has_action(labelled.get_batch([0])),
                with_has_action(video.get_batch([0])),
                f"{_where(video, 'the video dataset')} mixed with {_where(labelled, 'the labelled dataset')}",
            )

    def __len__(self) -> int:
        return math.ceil(len(self.labelled) / (1.0 - self.video_ratio))

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next batches belong to (a part of every batch's seed)."""
        self.epoch = int(epoch)

    def n_video(self, batch_size: int, rng: np.random.Generator) -> int:
        """Video windows in a batch of `batch_size`: B * ratio, its fraction rounded up with that
        probability (`rng`: the batch's generator)."""
        share = batch_size * self.video_ratio
        whole = math.floor(share + 1e-9)  # a share like 0.3 * 10 = 3.0000000000000004 is whole
        return whole + int(rng.random() < share - whole) if share - whole > 1e-9 else whole

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of `indices` {key: (B, ...)}: B - n labelled windows, then n video (`n_video`)."""
        idx = np.asarray(indices, dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(self))]
        if len(bad):
            raise IndexError(f"indices {bad.tolist()[:5]} out of range for {len(self)} mixed windows")
        if self.video_ratio == 0:
            lab, vid = idx, idx[:0]
        else:
            rng = derived_rng(self.seed, self.epoch, *idx.tolist())
            n_vid = self.n_video(len(idx), rng)
            lab = _draw(rng, len(self.labelled), len(idx) - n_vid)
            vid = _draw(rng, len(self.video), n_vid)
        parts = [
            with_has_action(d.get_batch(i)) for d, i in ((self.labelled, lab), (self.video, vid)) if len(i)
        ]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
        out[SOURCE] = torch.cat(
            [torch.zeros(len(lab), dtype=torch.int64), torch.ones(len(vid), dtype=torch.int64)]
        )
        return out


def _why_empty(windows: Windows) -> str:
    """A dataset's own explanation of why it has no windows (`WindowDataset.why_empty`), if it has one."""
    why = getattr(windows, "why_empty", None)
    return why() if callable(why) else "it is empty"


def _draw(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k window indices in [0, n), distinct when k <= n."""
    return rng.choice(n, size=k, replace=k > n).astype(np.int64)


def _where(windows: Windows, default: str) -> str:
    """The store a dataset reads (its `path`), for an error message; `default` when it has none."""
    return str(getattr(windows, "path", default))


def _check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    """One SchemaError line naming `where` (the two stores) and the key, when labelled windows `a` and
    video windows `b` differ in keys, per-sample shapes or dtypes."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise SchemaError(
            f"{where}: labelled and video windows have different keys: only labelled {only_a}, only video "
            f"{only_b} "
            "(read the video store with ActionFreeWindows, absent_keys from check_compatible)"
        )
    for k in a:
        la, lb = (tuple(a[k].shape[1:]), a[k].dtype), (tuple(b[k].shape[1:]), b[k].dtype)
        if la != lb:
            raise SchemaError(
                f"{where}: key {k!r}: labelled windows are {la[0]} {la[1]}, video windows {lb[0]} {lb[1]}"
            )


# ---------------------------------------------------------------------- checking two stores
def check_compatible(
    labelled_path: str | os.PathLike,
    video_path: str | os.PathLike,
    image_keys: Sequence[str],
    proprio_keys: Sequence[str] = (),
    *,
    allow_missing_proprio: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Check that the video store (or feature cache) has the labelled one's cameras `image_keys` with
    the same per-frame shape and dtype, and its `proprio_keys` with the same shape; a SchemaError
    otherwise. A proprio key the video store lacks is an error unless `allow_missing_proprio`; returns
    those keys with their per-step shapes, for `ActionFreeWindows(absent_keys=...)`. The two must be
    recorded at the same frame rate: a window's offsets are steps, the same time in both only then."""
    with DemoStore.open(labelled_path) as lab, DemoStore.open(video_path) as vid:
        if lab.schema.fps != vid.schema.fps:
            raise SchemaError(
                f"{vid.path}: recorded at {vid.schema.fps:g} fps but {lab.path} at {lab.schema.fps:g} fps; "
                "a window's steps would mean other times in each: resample the video store to "
                f"{lab.schema.fps:g} fps (or fix its schema's fps if it is wrong)"
            )
        for key in image_keys:
            for store in (lab, vid):
                if key not in store.schema.keys:
                    raise SchemaError(f"{store.path}: has no camera {key!r} (its cameras: {_cameras(store)})")
            _check_key(lab, vid, key, "camera")
        missing: dict[str, tuple[int, ...]] = {}
        for key in proprio_keys:
            if key not in lab.schema.keys:
                raise SchemaError(f"{lab.path}: has no proprio key {key!r} (its keys: {lab.keys})")
            if key in vid.schema.keys:
                _check_key(lab, vid, key, "proprio")
            elif allow_missing_proprio:
                missing[key] = lab.schema.keys[key].shape
            else:
                raise SchemaError(
                    f"{vid.path}: has no proprio key {key!r} that {lab.path} has; pass "
                    f"allow_missing_proprio=True to train with it padded (zeros, {key}_is_pad True)"
                )
    return missing


def _check_key(lab: DemoStore, vid: DemoStore, key: str, what: str) -> None:
    a, b = lab.schema.keys[key], vid.schema.keys[key]
    if a.shape != b.shape:
        raise SchemaError(f"{vid.path}: {what} {key!r} is {b.shape} but {lab.path}'s is {a.shape}")
    if a.dtype != b.dtype:
        raise SchemaError(f"{vid.path}: {what} {key!r} is {b.dtype} but {lab.path}'s is {a.dtype}")
    check_same_meaning(key, lab, vid)  # (a normalizer fitted in metres, applied to millimetres)


def _cameras(store: DemoStore) -> list[str]:
    """Image keys, and the cached cameras of a feature cache (stored as features, kind "lowdim")."""
    try:
        cached = cache_info(store.path).get("image_keys", [])
    except NotAStoreError:
        cached = []
    return [k for k, s in store.schema.keys.items() if s.kind == "image" or k in cached]


# ---------------------------------------------------------------------- making action-free data
def strip_actions(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    episodes: Sequence[int] | None = None,
    *,
    overwrite: bool = False,
) -> int:
    """Write a new store at `dst_path` with the `episodes` of `src_path` (all by default), without its
    action keys (every key of kind "action") and flagged action-free; returns the episodes written."""
    check_not_a_source(dst_path, [src_path])
    with DemoStore.open(src_path) as src:
        actions = src.schema.keys_of_kind("action")
        if not actions:
            raise SchemaError(f"{src.path}: has no action key to strip (its keys: {src.keys})")
        keys = {k: s for k, s in src.schema.keys.items() if k not in actions}
        if not keys:
            raise SchemaError(f"{src.path}: has nothing but actions ({actions}); nothing would be left")
        images = [k for k, s in keys.items() if s.kind == "image"]
        dst = DemoStore.create(
            dst_path,
            dataclasses.replace(src.schema, keys=keys),
            zarr_format=src.zarr_format,
            frames_per_chunk=src.array(images[0]).chunks[0] if images else 1,
            overwrite=overwrite,
        )
        try:
            with dst:
                written = copy_episodes(
                    src,
                    dst,
                    episodes,
                    keys=list(keys),
                    edit_info=lambda _i, info: {**info, ACTION_FREE: True},
                )
        except BaseException:
            shutil.rmtree(dst_path, ignore_errors=True)  # a store this call created, half written
            raise
    return len(written)


def flag_action_free(path: str | os.PathLike, episodes: Sequence[int]) -> None:
    """Flag `episodes` of the store at `path` action-free in their info (negative indices count from the
    end). The store has no in-place info edit, so this rewrites it crash-safely through `keep_episodes`
    (a full copy of its data); do not run it while another process appends to the store."""
    with DemoStore.open(path) as store:
        n = store.n_episodes
    episodes = [whole_number(f"{path}: episode", e) for e in episodes]  # 1.5 was episode 1
    bad = [e for e in episodes if not -n <= e < n]
    if bad:
        raise ValueError(f"{path}: episodes {bad} out of range (the store has {n} episodes)")
    flagged = {e % n for e in episodes}
    keep_episodes(
        path, range(n), edit_info=lambda i, info: {**info, ACTION_FREE: True} if i in flagged else info
    )
