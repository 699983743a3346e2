"""Frozen-encoder features computed once, into a demonstration store of their own.

DINO-WM runs its frozen DINOv2 on every training batch; the features never change, so here they are
computed once per (source store, cameras, encoder weights, input size) and read back like any
other key. The cache is itself a `DemoStore`, so `wm.data.dataset.WindowDataset` reads it unchanged:

    <cache_root>/<store name>__<camera>[+<camera>...]__<encoder name>__<weights_hash>__<H>x<W>.zarr
        data/<camera>      (T, P, D) float16, kind "lowdim": patch tokens of every frame, per camera
        data/<other key>   copies of every non-image key of the source (actions, proprio, timestamps)
        meta/episode_ends  the source's episode boundaries
        attrs wm_feature_cache: {source, image_keys, encoder, weights_hash, input_size, grid, dim, dtype}
        episode info       the source's, plus "feature_cache": {source_fingerprint, f16_max_abs_error}

H x W is the size the encoder sees (after its resizing), P = h * w patches, D the feature dim. One
encoder encodes every camera listed, so they must share a frame size (as they do for every model
here); image keys not listed are not copied. The store name alone names the cache, so give stores
with the same name different cache roots (a mix-up is caught by the fingerprints below and costs a
rebuild, not wrong features).

Precision: features are stored as float16, half the bytes of float32 (a 64-patch x 384-d frame is
48 KiB). Rounding to float16 has relative error <= 2^-11 (0.05 %); the errors measured on DINOv2 and
ResNet-18 tokens are in BENCHMARKS.md ("Figures from development"). Pretrained DINOv2 tokens
have a few larger channels, whose error grows in proportion: still far below the spread of the
features and the predictor's error. Every episode records its own max abs rounding error in its
info; a value outside float16's range (|x| > 65504) is refused rather than stored as inf.

Reuse and appending: a cache whose attributes match the encoder, whose schema is the one the source
gives, and whose episodes are a prefix of the source's (same boundaries, same fingerprint of each
episode: its first and last frames, every byte of the keys copied, and its info) is reused: nothing
is recomputed when it is complete, and only the source's new episodes are encoded when it grew.
Anything else (the source was rewritten or re-converted with other actions, an episode deleted or
flagged action-free) rebuilds the cache. Episodes are committed one at a time by `DemoStore`, so an
interrupted build resumes where it stopped; processes building the same cache (every DDP rank) take
turns, and the later ones reuse what the first built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from einops import rearrange

from wm.data.dataset import store_identity
from wm.data.errors import CorruptStoreError, NotAStoreError, SchemaError, StoreError
from wm.data.frames import check_scale, to_uint8
from wm.data.schema import FORMAT_VERSION, KeySpec, Schema
from wm.data.store import DemoStore
from wm.encoders import PatchEncoder
from wm.locks import exclusive

CACHE_ATTR = "wm_feature_cache"
CACHE_VERSION = 3  # 2: several cameras per cache ("image_keys"); 3: fingerprints cover the copied keys
FEATURE_DTYPE = "float16"
CHUNK_BYTES = 4 << 20  # target bytes per feature chunk (the store's 4096-row low-dim chunks would be ~200 MB)


class FeatureCacheError(RuntimeError):
    """The feature cache cannot be built: trainable encoder, wrong key, values out of float16 range."""


def build_feature_cache(
    store_path: str | os.PathLike,
    encoder: PatchEncoder,
    image_keys: str | Sequence[str],
    cache_root: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    log: Callable[[str], object] = lambda line: print(line, file=sys.stderr),
) -> Path:
    """Encode every frame of the camera(s) `image_keys` in the store at `store_path` with the frozen
    `encoder` (moved to `device`) and return the cache's path; reuses or extends an existing cache
    (module docstring). `log` says when another process is building the same cache."""
    if encoder.trainable:
        raise FeatureCacheError(
            f"encoder {encoder.name!r} is trainable: cached features would go stale as it trains. "
            "Cache only frozen encoders (dinov2_*, resnet18); a trainable one encodes each batch itself."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder.to(device)
    with DemoStore.open(store_path) as src:
        meta = _cache_meta(src, encoder, image_keys)
        path = _cache_path(src.path, meta, cache_root)
        waiting = f"feature cache: another process is building {path}; waiting for it"
        with exclusive(path.with_name(path.name + ".lock"), waiting, log):
            cache = _open_reusable(path, src, meta)
            if cache is None:
                cache = _create(path, src, meta)
            identity = store_identity(src.path)  # a rewrite of the source puts another folder in place
            with cache:
                for ep in range(cache.n_episodes, src.n_episodes):
                    _encode_episode(src, cache, ep, encoder, meta["image_keys"], batch_size, device, identity)
    return path


def feature_cache_path(
    store_path: str | os.PathLike,
    encoder: PatchEncoder,
    image_keys: str | Sequence[str],
    cache_root: str | os.PathLike,
) -> Path:
    """Where `build_feature_cache` puts (or finds) the cache of this store, camera(s) and encoder."""
    with DemoStore.open(store_path) as src:
        return _cache_path(src.path, _cache_meta(src, encoder, image_keys), cache_root)


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `wm_feature_cache` attributes of a cache (encoder, weights_hash, grid, dim, ...)."""
    try:
        attrs = dict(zarr.open_group(Path(path), mode="r").attrs)
    except Exception as e:
        raise NotAStoreError(f"{path}: not a feature cache ({type(e).__name__}: {e})") from e
    if CACHE_ATTR not in attrs:
        raise NotAStoreError(f"{path}: a store without {CACHE_ATTR!r} attributes is not a feature cache")
    return dict(attrs[CACHE_ATTR])


# ---------------------------------------------------------------------- naming and checking
def _cache_meta(src: DemoStore, encoder: PatchEncoder, image_keys: str | Sequence[str]) -> dict[str, Any]:
    keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"feature cache: give one or more distinct cameras, got {keys}")
    sizes = {}
    for key in keys:
        spec = src.schema.keys.get(key)
        if spec is None or spec.kind != "image":
            raise SchemaError(
                f"{src.path}: {key!r} is not an image key; image keys: {src.schema.keys_of_kind('image')}"
            )
        sizes[key] = tuple(spec.shape[:2])
    if len(set(sizes.values())) > 1:
        raise SchemaError(f"{src.path}: cameras {keys} differ in frame size {sizes}; a cache holds one size")
    height, width = sizes[keys[0]]
    return {
        "version": CACHE_VERSION,
        "source": str(Path(src.path).resolve()),
        "image_keys": keys,
        "encoder": encoder.name,
        "weights_hash": encoder.weights_hash(),
        "input_size": list(encoder.input_size(height, width)),
        "grid": list(encoder.patch_grid(height, width)),
        "dim": int(encoder.dim),
        "dtype": FEATURE_DTYPE,
    }


def cache_stem(src_path: str | os.PathLike) -> str:
    """The part of a store's cache names that comes from the store: its name without .zip / .zarr."""
    stem = Path(src_path).name
    for suffix in (".zip", ".zarr"):
        stem = stem.removesuffix(suffix)
    return stem


def _cache_path(src_path: Path, meta: dict[str, Any], cache_root: str | os.PathLike) -> Path:
    stem = cache_stem(src_path)
    h, w = meta["input_size"]
    cams = "+".join(meta["image_keys"])
    return Path(cache_root) / f"{stem}__{cams}__{meta['encoder']}__{meta['weights_hash']}__{h}x{w}.zarr"


def _fingerprint(src: DemoStore, ep: int, image_keys: Sequence[str]) -> str:
    """The identity of a source episode as the cache holds it: its length, the bytes of its first and
    last frames (the frames are not all read: encoding them is the cost the cache saves), every byte
    of the keys the cache copies (actions, proprioception: small), and its info."""
    sl = src.episode_slice(ep)
    h = hashlib.sha256(f"{sl.stop - sl.start}".encode())
    for frame in src.edge_frames(ep, image_keys):
        h.update(np.ascontiguousarray(frame).tobytes())
    for key, spec in src.schema.keys.items():
        if spec.kind != "image":
            h.update(key.encode() + np.ascontiguousarray(src.read(key, sl, episode=ep)).tobytes())
    info = {k: v for k, v in src.episode_info(ep).items() if k != "length"}
    h.update(json.dumps(info, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _cache_schema(src: DemoStore, meta: dict[str, Any]) -> Schema:
    """The source's schema with the cameras replaced by features, other images dropped, in the store
    format the cache is written in (a source of an older format is read as it is)."""
    cams = meta["image_keys"]
    h, w = meta["grid"]
    keys = {
        k: (KeySpec((h * w, meta["dim"]), FEATURE_DTYPE, "lowdim") if k in cams else s)
        for k, s in src.schema.keys.items()
        if k in cams or s.kind != "image"
    }
    return dataclasses.replace(src.schema, keys=keys, format_version=FORMAT_VERSION)


def _open_reusable(path: Path, src: DemoStore, meta: dict[str, Any]) -> DemoStore | None:
    """The existing cache at `path`, opened for appending, if it is a prefix of `src` made by this encoder."""
    if not path.exists():
        return None
    unreadable = (
        OSError,
        ValueError,
        NotAStoreError,
        CorruptStoreError,
        SchemaError,
        zarr.errors.BaseZarrError,
    )
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs).get(CACHE_ATTR, {})
    except unreadable:
        attrs = {}
    if {k: v for k, v in attrs.items() if k != "source"} == {k: v for k, v in meta.items() if k != "source"}:
        try:
            cache = DemoStore.open(path, mode="a")  # drops whatever an interrupted build left uncommitted
        except unreadable:
            cache = None
        if cache is not None and _is_prefix(cache, src, meta):
            return cache
        if cache is not None:
            cache.close()
    warnings.warn(
        f"{path}: feature cache does not match {src.path} and this encoder; rebuilding it", stacklevel=3
    )
    return None


def _is_prefix(cache: DemoStore, src: DemoStore, meta: dict[str, Any]) -> bool:
    if cache.schema.to_dict() != _cache_schema(src, meta).to_dict():
        return False
    image_keys, n = meta["image_keys"], cache.n_episodes
    if n > src.n_episodes or not np.array_equal(cache.episode_ends, src.episode_ends[:n]):
        return False
    recorded = [cache.episode_info(i).get("feature_cache", {}).get("source_fingerprint") for i in range(n)]
    return all(fp == _fingerprint(src, i, image_keys) for i, fp in enumerate(recorded))


# ---------------------------------------------------------------------- writing
def _create(path: Path, src: DemoStore, meta: dict[str, Any]) -> DemoStore:
    """An empty cache of `_cache_schema`."""
    cams = meta["image_keys"]
    h, w = meta["grid"]
    n_patch, dim = h * w, meta["dim"]
    path.parent.mkdir(parents=True, exist_ok=True)
    DemoStore.create(path, _cache_schema(src, meta), overwrite=True).close()
    # Rechunk the (still empty) feature arrays to a few MB per chunk, with the store's own codecs.
    group = zarr.open_group(path, mode="r+")
    rows = int(np.clip(CHUNK_BYTES // (n_patch * dim * np.dtype(FEATURE_DTYPE).itemsize), 1, 4096))
    for key in cams:
        group["data"].create_array(
            key,
            shape=(0, n_patch, dim),
            chunks=(rows, n_patch, dim),
            dtype=FEATURE_DTYPE,
            compressors=group["data"][key].compressors,
            overwrite=True,
        )
    group.attrs.update({CACHE_ATTR: meta})  # written last: a cache without it is rebuilt
    return DemoStore.open(path, mode="a")  # reopened, so its commits keep the attribute


@torch.no_grad()
def _encode(encoder: PatchEncoder, frames: np.ndarray, device: str | torch.device) -> np.ndarray:
    """(b, H, W, C) uint8 frames -> (b, P, D) float32 features."""
    x = rearrange(torch.from_numpy(frames).to(device), "b h w c -> b c h w").float().div_(255.0)
    if x.shape[1] == 1:  # grayscale: the encoders take RGB
        x = x.expand(-1, 3, -1, -1)
    return encoder(x[:, :3]).float().cpu().numpy()  # (b, P, D); an alpha channel is dropped


def _encode_episode(
    src: DemoStore,
    cache: DemoStore,
    ep: int,
    encoder: PatchEncoder,
    image_keys: Sequence[str],
    batch_size: int,
    device: str | torch.device,
    identity: tuple[int, int],
) -> None:
    """Encode source episode `ep` and commit it to the cache with the source's other keys and info, if
    the source is still the store of `identity` (`store_identity`) with the episode's fingerprint it had
    before its frames were read: a store rewritten during the build (a conversion again onto its path,
    `delete_episodes`) mixed its old and new frames into the cache without a word."""
    sl = src.episode_slice(ep)
    fingerprint = _fingerprint(src, ep, image_keys)
    with cache.begin_episode() as writer:  # an exception discards the partial episode
        try:
            max_err = _encode_steps(src, writer, cache.keys, ep, sl, encoder, image_keys, batch_size, device)
            same = fingerprint == _fingerprint(src, ep, image_keys)
        except StoreError:
            _check_unchanged(src, ep, identity)  # a rewrite reads as a missing chunk: say what happened
            raise
        _check_unchanged(src, ep, identity, same)
        info = src.episode_info(ep)
        info.pop("length", None)  # the commit records the length itself
        info["feature_cache"] = {"source_fingerprint": fingerprint, "f16_max_abs_error": max_err}
        writer.end(info)


def _check_unchanged(src: DemoStore, ep: int, identity: tuple[int, int], same_frames: bool = True) -> None:
    """A StoreError line (the episode not committed) when the source changed under the build."""
    if not same_frames or store_identity(src.path) != identity:
        raise StoreError(
            f"{src.path}: the store changed while its feature cache was built (episode {ep} and later are "
            "not cached); run again"
        )


def _encode_steps(
    src: DemoStore,
    writer: Any,
    keys: Sequence[str],
    ep: int,
    sl: slice,
    encoder: PatchEncoder,
    image_keys: Sequence[str],
    batch_size: int,
    device: str | torch.device,
) -> float:
    """Episode `ep`'s steps (`sl`) into `writer`: features of `image_keys`, the rest of the cache's
    `keys` copied; returns the largest float16 rounding error of a feature."""
    ends = src.episode_ends  # where a bad frame is, by episode and step
    others = {k: src.read(k, sl, episode=ep) for k in keys if k not in image_keys}  # (T, *shape)
    max_err = 0.0
    for lo in range(sl.start, sl.stop, batch_size):
        hi = min(lo + batch_size, sl.stop)
        step = {}
        for key in image_keys:
            frames = src.read(key, slice(lo, hi), episode=ep)  # (b, H, W, C)
            check_scale(src.path, key, frames, np.arange(lo, hi), ends)  # 0..255 whatever their dtype
            feats = _encode(encoder, to_uint8(frames), device)  # (b, P, D)
            half = feats.astype(np.float16)
            if not np.isfinite(half).all():
                raise FeatureCacheError(
                    f"{src.path}: episode {ep}, camera {key!r}: features of {encoder.name} exceed "
                    f"float16's range (max |x| = {np.abs(feats).max():.4g} > 65504)"
                )
            max_err = max(max_err, float(np.abs(half.astype(np.float32) - feats).max()))
            step[key] = half
        rows = slice(lo - sl.start, hi - sl.start)
        writer.add_steps({**step, **{k: v[rows] for k, v in others.items()}})
    return max_err
