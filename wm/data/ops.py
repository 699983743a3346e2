"""Whole-store operations: copy, merge, keep and delete episodes.

`keep_episodes` / `delete_episodes` rewrite a store crash-safely: the new store is written beside
the old one (`<store>.wm-new`), then swapped in by two renames (old to `<store>.wm-old`, new into
place) and the old one removed; `DemoStore.open` completes a swap a crash interrupted. They read
the source with `salvage=True`, which is how `wm-info ... drop_episodes=[...]` repairs a damaged
store.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from wm.data.errors import NotAStoreError, SchemaError
from wm.data.places import (
    WriterLock,
    beside,
    check_destination,
    check_not_a_source,
    discard_tree,
    finish_swap,
    move_into_place,
    refuse_foreign_entries,
    rename_if_there,
    swap_paths,
)
from wm.data.store import DemoStore, image_codec_of

# Rewrites an episode's info on copy: (source episode index, its info without "length") -> new info.
InfoEdit = Callable[[int, dict[str, Any]], dict[str, Any]]


def copy_episodes(
    src: DemoStore,
    dst: DemoStore,
    episodes: Sequence[int] | None = None,
    *,
    keys: Sequence[str] | None = None,
    edit_info: InfoEdit | None = None,
) -> list[int]:
    """Append episodes of `src` (all by default) to `dst`, with their info; returns their new indices.

    `keys` copies only those keys of `src` (all by default; `dst` must have exactly them); `edit_info`
    rewrites each episode's info on the way. An episode of a store whose task is not `dst`'s carries
    its own in its info ("task", as LeRobot's per-episode tasks), unless it already names one."""
    keys = list(src.keys) if keys is None else list(keys)
    unknown = [k for k in keys if k not in src.keys]
    if unknown:
        raise SchemaError(f"{src.path}: has no keys {unknown} to copy (it has {sorted(src.keys)})")
    _check_same(src, dst, keys)
    out = []
    for i in range(src.n_episodes) if episodes is None else episodes:
        info = src.episode_info(i)
        info.pop("length", None)
        if src.schema.task and src.schema.task != dst.schema.task and not info.get("task"):
            info["task"] = src.schema.task  # else read as dst's task (wm-info, the LeRobot export)
        if edit_info is not None:
            info = edit_info(int(i), info)
        out.append(dst.append_episode(src.get_episode(i, keys), info))
    return out


def check_same_meaning(key: str, a: DemoStore, b: DemoStore) -> None:
    """A SchemaError when `key`'s units or dimension names, stated in both stores, differ: its values would
    be read in the other's units, or a column under another's name."""
    x, y = a.schema.keys[key], b.schema.keys[key]
    if x.units and y.units and x.units != y.units:
        raise SchemaError(f"key {key!r}: {a.path} is in {x.units!r}, {b.path} in {y.units!r}")
    if x.names and y.names and x.names != y.names:
        raise SchemaError(
            f"key {key!r}: {a.path} names its dimensions {list(x.names)}, {b.path} {list(y.names)}"
        )


def _check_same(src: DemoStore, dst: DemoStore, keys: Sequence[str]) -> None:
    """Episodes of `src` may join `dst`: the same keys (shape, dtype, kind, and units and dimension names
    where both state them), robot (where both state it), fps and, where actions go, action space (else
    they would be labelled with what `dst`'s robot, steps and actions mean)."""
    if set(keys) != set(dst.keys):
        raise SchemaError(
            f"{src.path} and {dst.path} have different keys: {sorted(keys)} vs {sorted(dst.keys)}"
        )
    for k in keys:
        a, b = src.schema.keys[k], dst.schema.keys[k]
        if (a.shape, a.dtype, a.kind) != (b.shape, b.dtype, b.kind):
            raise SchemaError(
                f"key {k!r}: {src.path} has {a.shape} {a.dtype} {a.kind}, {dst.path} has {b.shape} {b.dtype} "
                f"{b.kind}"
            )
        check_same_meaning(k, src, dst)
    actions = any(src.schema.keys[k].kind == "action" for k in keys)
    sa, da = src.schema.action_space, dst.schema.action_space
    differ = [
        f"{what} {x!r} vs {y!r}"
        for what, x, y, matters in (
            ("robot", src.schema.robot, dst.schema.robot, bool(src.schema.robot and dst.schema.robot)),
            ("fps", src.schema.fps, dst.schema.fps, True),
            ("action mode", sa.mode, da.mode, actions),
            ("action frame", sa.frame, da.frame, actions),
            ("action units", sa.units, da.units, actions and bool(sa.units) and bool(da.units)),
        )
        if matters and x != y
    ]
    if differ:
        raise SchemaError(f"{src.path} and {dst.path} record different things ({', '.join(differ)})")


def merge_stores(
    sources: Sequence[str | os.PathLike], dst: str | os.PathLike, **create_kwargs: Any
) -> DemoStore:
    """Write a new store at `dst` holding every episode of `sources`, in order (schema of the first);
    returned open for appending. It is built beside `dst` and moved into place once every episode is
    copied: a merge that fails or is killed leaves `dst` as it was (a partial store there verified clean)."""
    if not sources:
        raise ValueError("merge_stores needs at least one source store")
    dst = Path(dst)
    check_not_a_source(dst, sources)
    check_destination(dst, bool(create_kwargs.pop("overwrite", False)), sources)
    stores = [DemoStore.open(p) for p in sources]
    try:
        for s in stores[1:]:  # all of them, before anything is written
            _check_same(s, stores[0], list(s.keys))
        tmp = beside(dst, "merging")
        try:
            with DemoStore.create(tmp, stores[0].schema, overwrite=True, **create_kwargs) as out:
                for s in stores:
                    copy_episodes(s, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # dst was not touched
            raise
    finally:
        for s in stores:
            s.close()
    move_into_place(tmp, dst)
    return DemoStore.open(dst, mode="a")


def keep_episodes(path: str | os.PathLike, keep: Sequence[int], *, edit_info: InfoEdit | None = None) -> None:
    """Rewrite the store at `path` with only the episodes `keep` (in that order), crash-safely: the new
    store is written beside the old one and swapped in by renames; the old one is removed last.
    `edit_info` rewrites the kept episodes' info (see `copy_episodes`).

    The store is read with `salvage=True`, so this also rewrites a store whose `meta/episode_ends` is
    damaged (boundaries from the commit record) or whose data lost steps, as long as every kept
    episode reads cleanly; otherwise the error is raised and the store is left as it was.
    """
    _locked_rewrite(path, lambda n: keep, edit_info)


def _locked_rewrite(
    path: str | os.PathLike, choose: Callable[[int], Sequence[int]], edit_info: InfoEdit | None
) -> None:
    """`keep_episodes` of the episodes `choose(n)` picks from the `n` the store holds under its writer
    lock (a count read before it missed an episode a writer committed meanwhile, and the rewrite lost it)."""
    path = Path(path)
    if path.suffix == ".zip":  # read-only here: the rewrite would leave a directory under its name
        raise NotAStoreError(f"{path}: zip stores are read-only; unzip it to a directory store and edit that")
    path = path.resolve()  # a store reached through a symbolic link is rewritten where it is
    tmp, old = swap_paths(path)
    finish_swap(path)  # a rewrite a crash interrupted
    if not path.exists():
        raise NotAStoreError(f"{path}: no such store")
    refuse_foreign_entries(path, "the rewrite")  # the rewritten store replaces the folder
    lock = WriterLock(path)  # no writer may be appending to the store being rewritten
    try:
        _rewrite(path, tmp, old, choose, edit_info)
    finally:
        lock.release()


def _rewrite(
    path: Path, tmp: Path, old: Path, choose: Callable[[int], Sequence[int]], edit_info: InfoEdit | None
) -> None:
    src = DemoStore.open(path, salvage=True)
    try:
        n = src.n_episodes
        keep = choose(n)
        bad = [i for i in keep if not -n <= int(i) < n]
        if bad:
            raise ValueError(f"{path}: episodes {bad} out of range (the store has {n} episodes)")
        if len({int(i) % n for i in keep}) != len(keep):  # [0, -n] too
            raise ValueError(
                f"{path}: episodes {list(keep)} given more than once: keep_episodes keeps a subset, each "
                "once (to weight episodes, use a training mixture)"
            )
        image_keys = src.schema.keys_of_kind("image")
        out = DemoStore.create(
            tmp,
            src.schema,
            zarr_format=src.zarr_format,
            frames_per_chunk=src.array(image_keys[0]).chunks[0] if image_keys else 1,
            image_codec=image_codec_of(src.array(image_keys[0])) if image_keys else "auto",
            overwrite=True,
        )
        try:
            copy_episodes(src, out, [int(i) % n for i in keep], edit_info=edit_info)
        finally:
            out.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the store itself was not touched
        raise
    finally:
        src.close()
    discard_tree(old, path)  # a crashed rewrite's, if any (a missing one is skipped)
    os.replace(path, old)
    if not rename_if_there(tmp, path) and not path.exists():  # a reader's finish_swap may make it first
        raise NotAStoreError(f"{path}: the rewritten store vanished before it was swapped in")
    discard_tree(old, path)


def delete_episodes(path: str | os.PathLike, episodes: Iterable[int]) -> None:
    """Remove `episodes` (negative indices count from the end) from the store at `path`; later episodes
    move up. Crash-safe and all-or-nothing, see `keep_episodes`."""
    episodes = [int(i) for i in episodes]

    def keep(n: int) -> list[int]:
        bad = [i for i in episodes if not -n <= i < n]
        if bad:
            raise ValueError(f"{path}: episodes {bad} out of range (the store has {n} episodes)")
        drop = {i % n for i in episodes}
        return [i for i in range(n) if i not in drop]

    _locked_rewrite(path, keep, None)
