"""Building a training run from a store, for any registered model: keys, split, normalizer, model,
datasets (from the feature cache when the model's encoder is frozen), validation.

`setup_training` is called by `wm-train` (the edge) and returns what the one `Trainer` needs; what
differs between models comes from their registry entry (`wm.registry`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wm.data import DemoStore, SchemaError
from wm.data.dataset import WindowDataset, WithFrames
from wm.data.mixture import ACTION_FREE, ActionFreeWindows, MixedWindows, check_compatible
from wm.data.normalize import Normalizer, check_finite
from wm.data.windows import (
    WindowSpec,
    build_index,
    describe_window,
    min_episode_length,
    split_episodes,
    why_no_windows,
)
from wm.options import check_feature_cache, check_not_derived
from wm.registry import TrainContext, camera_names, model_entry

log = logging.getLogger(__name__)

# key kinds a proprio_key may not be, and why
NOT_PROPRIO = {
    "action": "an action key: the model would be fed the actions it learns to predict",
    "image": "a camera",
    "language": "a language key (text)",
}


@dataclass
class TrainSetup:
    model: nn.Module
    model_type: str
    train_set: Any  # a WindowDataset, or ActionFreeWindows / MixedWindows for action-free training
    normalizer: Normalizer
    model_config: dict[str, Any]
    val_fn: Any
    train_episodes: list[int]
    val_episodes: list[int]


def data_keys(
    store: DemoStore, image_key: str | None, proprio_key: str | None, need_actions: bool = True
) -> tuple[str, str | None]:
    """The camera and proprioception keys to train on (the store's first of each kind by default);
    with `need_actions`, a store without an 'action' key is refused. That the camera is one is
    `check_inputs`'s to say (with the cameras a model lists)."""
    images = store.schema.keys_of_kind("image")
    proprios = store.schema.keys_of_kind("proprio")
    image_key = image_key or (images[0] if images else None)
    if image_key is None:  # "no camera key None" named nothing a user could give
        raise SchemaError(
            f"{store.path}: has no camera (keys: {sorted(store.schema.keys)}); the models train on images: "
            "give a store recorded with one (wm-collect: without state_only=true)"
        )
    if image_key not in store.schema.keys:
        raise SchemaError(f"{store.path}: no camera key {image_key!r} to train on (image keys: {images})")
    proprio_key = proprio_key or (proprios[0] if proprios else None)
    if proprio_key is not None and proprio_key not in store.schema.keys:
        raise SchemaError(f"{store.path}: no proprioception key {proprio_key!r} (proprio keys: {proprios})")
    kind = store.schema.keys[proprio_key].kind if proprio_key is not None else ""
    if proprio_key == "action" or kind in NOT_PROPRIO:
        kind = "action" if proprio_key == "action" else kind
        raise SchemaError(
            f"{store.path}: proprio_key={proprio_key} is {NOT_PROPRIO[kind]}; choose a proprioception key "
            f"(proprio keys: {proprios})"
        )
    if need_actions and "action" not in store.schema.keys:
        raise SchemaError(f"{store.path}: no 'action' key; the model needs actions")
    return image_key, proprio_key


def split_labelled(
    n_episodes: int, flagged: Iterable[int], val_ratio: float, seed: int
) -> tuple[list[int], list[int]]:
    """The training and validation episodes among those with actions (not in `flagged`, the action-free
    ones, which all train): the labelled episodes split (validation compares actions). A flagged
    episode drawn for validation was in neither set, and validation vanished when all drawn were.
    Without flags, `split_episodes` of all episodes."""
    skip = set(flagged)
    with_actions = [e for e in range(n_episodes) if e not in skip]
    train_at, val_at = split_episodes(len(with_actions), val_ratio, seed)
    return [with_actions[i] for i in train_at], [with_actions[i] for i in val_at]


def setup_training(
    model_type: str,
    store_path: str,
    options: Mapping[str, Any],
    *,
    image_key: str | None = None,
    proprio_key: str | None = None,
    val_ratio: float = 0.1,
    seed: int = 0,
    in_memory: bool = True,
    feature_cache: str = "auto",
    teacher: str | None = None,
    video_store: str | None = None,
    video_ratio: float = 0.5,
    device: str | torch.device = "cpu",
) -> TrainSetup:
    """Everything a training run of the registered `model_type` needs, from the store at
    `store_path` and the user's model `options`. Episodes are split with `seed` (`val_ratio` held
    out), and torch is seeded with it right before the model is built; the normalizer is fitted on
    the training episodes (actions min-max, proprioception as the entry says) unless the entry
    brings its own. With `feature_cache="auto"` and a model whose encoder is frozen, its features are
    computed once, on `device` (the training's), into a zarr cache beside the store (`<store
    dir>/feature_cache/`) and training reads those instead of images.

    Action-free data, for models whose entry says `action_free`: episodes of the store flagged
    action-free (`wm.data.mixture.ACTION_FREE`) train without their actions, and `video_store` (a store
    of the same camera, with or without actions, proprio or not) is mixed in, `video_ratio` of each
    batch. Statistics come from the labelled training episodes only.

    What the model cannot train on is refused in one line before any work (caches, the run directory):
    keys of the wrong kind (`data_keys`) or shape, cameras that are not RGB (`check_inputs`), NaN or inf
    in any episode the model reads (`check_finite`), a video store at another frame rate
    (`check_compatible`), windows that fit no episode (`check_windows`, from the config when it knows
    them, before the model is built). Held-out episodes too short for a validation window get a note
    (`check_validation`), and no validation function when none of them has one."""
    check_feature_cache(feature_cache)
    entry = model_entry(model_type)
    if teacher is not None and not entry.distilled:
        raise ValueError(
            f"teacher= is for distilled models (model=consistency); model={model_type} takes none"
        )
    if video_store is not None and not entry.action_free:
        raise ValueError(f"model={model_type} trains on actions only: video_store= needs a model like uwm")
    listed, option = listed_cameras(options)
    if image_key is not None and listed and image_key not in listed:  # trained on the list, recorded as given
        raise ValueError(
            f"image_key={image_key} is not among the cameras {option}={listed} the model reads: leave "
            "image_key out, or list it"
        )
    with DemoStore.open(store_path) as store:
        image_key, proprio_key = data_keys(store, image_key, proprio_key, entry.needs_actions)
        cameras = listed or [image_key]
        lowdim = ["action", *([proprio_key] if proprio_key else [])] if entry.needs_actions else []
        check_inputs(store, cameras, lowdim, option if listed else "image_key")
        if not store.n_episodes:  # (said as "all are flagged action-free")
            raise SchemaError(f"{store_path}: the store has no episodes to train on")
        flagged = {e for e in range(store.n_episodes) if store.episode_info(e).get(ACTION_FREE)}
        if not entry.needs_actions:
            flagged = set()  # frames only: every episode is data
        if flagged and not entry.action_free:
            raise SchemaError(
                f"{store_path}: {len(flagged)} episode(s) flagged {ACTION_FREE} (e.g. {min(flagged)}); "
                f"model={model_type} needs actions in every episode (uwm trains on both)"
            )
        if len(flagged) == store.n_episodes:
            raise SchemaError(f"{store_path}: no episode has actions (all are flagged {ACTION_FREE})")
        labelled, val_eps = split_labelled(store.n_episodes, flagged, val_ratio, seed)
        train_eps = sorted([*labelled, *flagged])
        if entry.needs_actions:  # every episode the model reads, not only those the normalizer is fitted on
            check_finite(store, "action", [e for e in range(store.n_episodes) if e not in flagged])
            if proprio_key:
                check_finite(store, proprio_key)
        shapes = {k: tuple(s.shape) for k, s in store.schema.keys.items()}
        ctx = TrainContext(
            str(Path(store_path).resolve()), image_key, proprio_key, shapes, teacher, in_memory
        )
        normalizer = entry.normalizer(ctx) if entry.normalizer is not None else None
        if normalizer is None:
            modes = {"action": "minmax"} | ({proprio_key: entry.proprio_norm} if proprio_key else {})
            normalizer = Normalizer.fit(store, modes, episodes=labelled)
        for line in normalizer.coarse_notes():
            note(line)
    absent: dict[str, tuple[int, ...]] = {}  # keys of the model the video store lacks (proprio)
    if video_store is not None:  # its frame rate, cameras (the model's: `cameras` are what configure
        # reads) and proprio before any work
        proprios = [proprio_key] if proprio_key else []
        absent = check_compatible(store_path, video_store, cameras, proprios, allow_missing_proprio=True)
        with DemoStore.open(video_store) as vid:
            if proprio_key in vid.schema.keys:
                check_finite(vid, proprio_key)
    options = {k: v for k, v in options.items() if k != "type"}
    configured = entry.configure(options, ctx)
    check_not_derived(options, configured)
    cfg = entry.config_type.from_dict(configured)
    known = cfg.window_spec() if callable(getattr(cfg, "window_spec", None)) else None
    if known is not None:  # a config that knows its windows: checked unbuilt
        check_training_windows(store_path, known, train_eps, video_store, video_ratio)
    # the initial weights follow `seed` alone, not what configure drew (UWM's default autoencoder
    # trains there on a store's first run only); where configure drew nothing this is the state
    # wm-train seeded, so those runs are unchanged
    torch.manual_seed(seed)
    model = entry.build(cfg, normalizer)
    spec = model.window_spec()
    if spec != known:  # before any feature cache is built
        check_training_windows(store_path, spec, train_eps, video_store, video_ratio)
    data_path = store_path
    source = model.feature_cache_source() if feature_cache == "auto" else None
    if source is not None and video_store is not None:
        _check_separate_caches(store_path, video_store)
    if source is not None:
        data_path = cached_features(store_path, *source, device=device)
    if entry.action_free:
        train_set: Any = ActionFreeWindows(data_path, spec, train_eps, in_memory=in_memory)
    else:
        train_set = WindowDataset(data_path, spec, train_eps, in_memory=in_memory)
        if source is not None and hasattr(model, "frames_beside_features"):  # pixels it still needs,
            # read from disk (one frame a window): in memory they would double what the cache takes
            key, offsets = model.frames_beside_features()
            train_set = WithFrames(train_set, store_path, key, offsets, in_memory=False)
    if video_store is not None:
        video_path = video_store if source is None else cached_features(video_store, *source, device=device)
        video_set = ActionFreeWindows(
            video_path,
            spec,
            in_memory=in_memory,
            action_shape=shapes["action"],
            absent_keys=absent,
            video=True,  # its actions, if it has any, are not trained on (other units, another robot)
        )
        train_set = MixedWindows(train_set, video_set, video_ratio, seed)
    frames_from = store_path if source is not None else None
    val_fn = (
        entry.validation(model, data_path, val_eps, in_memory, frames_from)
        if entry.validation and val_eps
        else None
    )
    if val_fn is not None:
        val_fn = check_validation(store_path, val_fn, spec, val_eps)
    return TrainSetup(model, model_type, train_set, normalizer, cfg.to_dict(), val_fn, train_eps, val_eps)


def listed_cameras(options: Mapping[str, Any]) -> tuple[list[str], str]:
    """The cameras the model `options` list and the option that lists them (`model.image_keys`, or
    `model.obs.image_keys` for a diffusion policy); ([], "") when they list none (the model reads the
    chosen image_key)."""
    obs = options.get("obs")
    listed, option = options.get("image_keys"), "model.image_keys"
    if not listed and isinstance(obs, Mapping):
        listed, option = obs.get("image_keys"), "model.obs.image_keys"
    if not listed:
        return [], ""
    return camera_names(listed), option


def check_inputs(
    store: DemoStore, cameras: Sequence[str], lowdim: Sequence[str], option: str = "image_key"
) -> None:
    """What the models take, refused in one line before any work: 3-channel RGB `cameras` (of kind image;
    `option`, the option that named them, is named when one is not) and one flat vector a step of each
    `lowdim` key (action, proprio: the models are sized by its length, and a (2, 3) action would reach
    them unflattened)."""
    for cam in cameras:
        spec = store.schema.keys.get(cam)
        if spec is None:
            continue  # the model's configure names the cameras the store has
        if spec.kind != "image":
            images = store.schema.keys_of_kind("image")
            raise SchemaError(
                f"{store.path}: {option}={cam} is a {spec.kind} key, not a camera (image keys: {images})"
            )
        if spec.shape[-1] != 3:
            raise SchemaError(
                f"{store.path}: camera {cam!r} has {spec.shape[-1]} channel(s) (frames {spec.shape}); the "
                "models take 3-channel RGB frames (H, W, 3): convert it to RGB, or choose another camera"
            )
    for key in lowdim:
        shape = store.schema.keys[key].shape
        if len(shape) != 1:
            raise SchemaError(
                f"{store.path}: key {key!r} is {shape} a step; the models take one flat vector a step: "
                f"store it as ({int(np.prod(shape))},) (e.g. x.reshape(len(x), -1))"
            )


def check_windows(path: str, spec: WindowSpec, episodes: Sequence[int] | None, what: str = "") -> None:
    """Refuse (ValueError, one line) training when no window of `spec` fits in `episodes` (all by
    default) of the store at `path`: the episodes' lengths against the window, as `make_loader` says."""
    with DemoStore.open(path) as store:
        ends = store.episode_ends
    eps = list(range(len(ends))) if episodes is None else list(episodes)
    if len(build_index(ends, spec, eps)) == 0:
        lengths = np.diff(ends, prepend=0)[eps] if eps else []
        why = why_no_windows(path, lengths, spec)
        raise ValueError(f"{what} has no windows: {why}" if what else f"no windows to train on: {why}")


def check_training_windows(
    store_path: str, spec: WindowSpec, train_eps: Sequence[int], video_store: str | None, video_ratio: float
) -> None:
    """`check_windows` of the training episodes of the store and, when batches draw from it, of the
    video store."""
    with DemoStore.open(store_path) as store:
        lengths = store.episode_lengths()
    fits = lengths >= min_episode_length(spec)  # (per episode: as `build_index` of it alone)
    try:
        check_windows(store_path, spec, train_eps)
    except ValueError as e:  # (the only long episode drawn for validation: nothing said so)
        trained = set(train_eps)
        held = [e for e in range(len(lengths)) if e not in trained and fits[e]]
        if not held:
            raise
        raise ValueError(
            f"{e}; held out for validation, episode(s) {held[:5]} would give some: val_ratio=0 trains on "
            "every episode"
        ) from None
    short = [e for e in train_eps if not fits[e]]
    if short:  # (they were dropped without a word; a validation episode's note said it)
        which = ", ".join(f"{e} ({lengths[e]} steps)" for e in short[:5]) + (
            f" and {len(short) - 5} more" if len(short) > 5 else ""
        )
        note(
            f"note: {store_path}: training episode(s) {which} are too short to train on: a window "
            f"{describe_window(spec)}"
        )
    if video_store is not None and video_ratio > 0:
        check_windows(video_store, spec, None, f"video_ratio is {video_ratio} but the video store")


def check_validation(path: str, val_fn: Any, spec: WindowSpec, val_eps: list[int]) -> Any:
    """`val_fn`, or None when its held-out episodes hold no validation window; a note either way when
    some of them hold none: those are neither trained nor validated on. The windows come from the
    `val_set` a validation function carries (`spec`, the model's training windows, without one)."""
    val_set = getattr(val_fn, "val_set", None)
    windows = getattr(val_set, "windows", val_set)  # WithFrames: the windows beside its frames
    spec = getattr(windows, "model_spec", getattr(windows, "spec", spec))
    with DemoStore.open(path) as store:
        ends, lengths = store.episode_ends, store.episode_lengths()
    short = [e for e in val_eps if len(build_index(ends, spec, [e])) == 0]
    if not short:
        return val_fn
    which = ", ".join(f"{e} ({lengths[e]} steps)" for e in short[:5]) + (
        f" and {len(short) - 5} more" if len(short) > 5 else ""
    )
    none = len(short) == len(val_eps)
    note(
        f"note: {path}: {'no validation will run: ' if none else ''}validation episode(s) {which} are too "
        f"short: a validation window {describe_window(spec)}; they are neither trained nor validated on "
        "(val_ratio=0 trains on every episode)"
    )
    return None if none else val_fn


def note(line: str) -> None:
    """Print a line a user must see before training starts (stderr; rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def _check_separate_caches(store_path: str, video_store: str) -> None:
    """Two stores of one name in one folder (demo.zarr, demo.zip) share their feature caches' names:
    the video store's build replaced the training store's, and validation read the video's features."""
    from wm.feature_cache import cache_stem

    a, b = Path(store_path).resolve(), Path(video_store).resolve()
    if a != b and a.parent == b.parent and cache_stem(a) == cache_stem(b):
        raise ValueError(
            f"store={store_path} and video_store={video_store} would share feature caches in "
            f"{a.parent / 'feature_cache'} (the same name without .zarr / .zip): rename one, or move it to "
            "another folder"
        )


def cached_features(
    store_path: str, encoder: Any, image_keys: str | Sequence[str], device: str | torch.device = "cpu"
) -> str:
    """The path of the frozen `encoder`'s feature cache of the camera(s) `image_keys`, built or extended
    first, encoding on `device` (the training's: a large store took hours on the CPU beside an idle
    GPU); the encoder is left on the CPU, with the rest of the model until the trainer moves it. Every
    model's cache lives beside its store, in `<store dir>/feature_cache/`."""
    from wm.feature_cache import build_feature_cache

    cache_root = Path(store_path).resolve().parent / "feature_cache"
    try:
        return str(build_feature_cache(store_path, encoder, image_keys, cache_root, device=device))
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        said = type(e)(  # (a bare "[Errno 30] Read-only file system: '.../feature_cache'")
            f"cannot write the feature cache in {cache_root} ({e.strerror}): train with feature_cache=off "
            "(the encoder then runs on every batch), or from a copy of the store in a writable folder"
        )
        said.errno = e.errno
        raise said from e
    finally:
        encoder.to("cpu")
