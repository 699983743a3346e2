"""Crash-safe zarr demonstration store.

Layout (Diffusion Policy / UWM replay buffer, readable by their loaders):

    <store>/data/<key>         (T_total, *shape) time-major, all episodes concatenated
    <store>/meta/episode_ends  (E,) int64 cumulative ends
    <store>/wm_episode_info    (E,) strings: each episode's info as JSON ({"length": T, ...})
    root attributes            "wm_schema": Schema.to_dict(), "wm_committed": E (the commit),
                               "wm_every_chunk": true (see below)

Crash safety. Every file is written to a temporary name and renamed into place (zarr's LocalStore
does this), so no file is ever half-written. An episode is written in this order: its data
(resizing each `data/<key>` array), then `meta/episode_ends`, then its entry in `wm_episode_info`,
and last the root attribute `wm_committed`, the commit. A process killed at any moment leaves every
committed episode intact; reopening for append truncates whatever lies past the last commit. Readers
only look at committed steps, so they can open a store while a writer appends (`refresh()` sees new
episodes). Ctrl-C (SIGINT, in the main thread) during a write is held until the write is done
(`wm.interrupt.interrupts_held`): an `end()` it interrupts commits its episode whole, then raises.
A commit writes one info chunk and the small root attributes, so its cost does not grow with the
store. Stores of format 1 kept every episode's info in the root attributes (`wm_episodes`, the
commit record, rewritten whole at each commit); they are read as they are and moved to this layout
by the first episode appended to them.

Lost files. zarr by default writes no chunk whose values are all the fill value, so a missing chunk
file reads as zeros and cannot be told from a chunk of zeros. This store writes every chunk, and a
store created so says `wm_every_chunk`: in it a missing chunk file of committed steps is damage, and
reading it on the direct chunk path (local stores of this project's layout) raises
`CorruptStoreError` naming the file, key, steps and episodes, and `verify` reports it on every path.
Stores without the attribute (created before, or by other tools) read a missing chunk as zarr does;
a tool that appends to a marked store without writing every chunk (Diffusion Policy's replay
buffer) would make its chunks of zeros read as damage.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore, ZipStore

from wm.data.chunks import ChunkReader
from wm.data.errors import AppendError, CorruptStoreError, NotAStoreError, SchemaError, StoreBusyError
from wm.data.schema import FORMAT_VERSION, KeySpec, Schema, infer_schema
from wm.interrupt import interrupts_held
from wm.locks import PathLock, alive, remove_left_by_dead
from wm.options import is_whole, override

SCHEMA_ATTR = "wm_schema"
COMMITTED_ATTR = "wm_committed"  # the number of committed episodes: writing it commits an episode
INFO_ARRAY = "wm_episode_info"  # each episode's info, one JSON string an episode
INFO_CHUNK = 256  # entries a chunk of INFO_ARRAY: what a commit rewrites
EPISODES_ATTR = "wm_episodes"  # format 1: every episode's info in the root attributes (the commit)
EVERY_CHUNK_ATTR = "wm_every_chunk"  # true: every chunk of committed steps is a file (module docstring)
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
LOWDIM_CHUNK = 4096  # rows per chunk for low-dimensional keys
# Steps buffered in memory by a streaming writer before they are flushed to disk.
FLUSH_STEPS = 32


BLOSC_CODECS = ("auto", "lz4", "lz4hc", "zstd", "zlib", "blosclz")  # "auto": lz4 for images, zstd else


def _compressor(kind: str, zarr_format: int, codec: str) -> Any:
    """Blosc with lz4 (images: fast decode; `codec` for images when not "auto") or zstd (low-dim: small),
    in the zarr format's own spelling."""
    image = kind == "image"
    cname = "zstd" if not image else codec if codec != "auto" else "lz4"  # (image_codec: images only)
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(
            cname=cname, clevel=5 if image else 3, shuffle=Blosc.NOSHUFFLE if image else Blosc.SHUFFLE
        )
    # zarr v3 stores also get a crc32c checksum per chunk, so a damaged chunk never decodes silently.
    blosc = zarr.codecs.BloscCodec(
        cname=cname, clevel=5 if image else 3, shuffle="noshuffle" if image else "shuffle"
    )
    return (blosc, zarr.codecs.Crc32cCodec())


def image_codec_of(array: zarr.Array) -> str:
    """The `image_codec` that `array` was created with (`_compressor`), or "auto" for a compressor this
    store does not write (another tool's): a rewrite passes it on, and changed zstd frames to lz4."""
    for codec in array.compressors:
        cname = getattr(codec, "cname", None)
        cname = getattr(cname, "value", cname)  # zarr v3's Blosc holds an enum, v2's numcodecs a str
        if cname in BLOSC_CODECS:
            return str(cname)
    return "auto"


def _open_zarr_store(path: Path, read_only: bool) -> Any:
    if path.suffix == ".zip":
        if not read_only:
            raise NotAStoreError(f"{path}: zip stores are read-only; unzip it to append")
        return ZipStore(path, mode="r")
    return LocalStore(path, read_only=read_only)


class DemoStore:
    """A demonstration store opened for reading (`mode="r"`) or appending (`mode="a"`).

    Use `DemoStore.create(path, schema)` for a new store and `DemoStore.open(path)` for an existing
    one, including Diffusion Policy / UWM stores in zarr v2 format (their schema is inferred;
    `schema_overrides` corrects it).
    """

    def __init__(
        self, path: Path, group: zarr.Group, schema: Schema, mode: str, legacy: bool, salvage: bool = False
    ) -> None:
        self.path = path
        self.mode = mode
        self.legacy = legacy  # True when the store carries no schema attributes of its own
        self.salvage = salvage
        self._group = group
        self._schema = schema
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: dict[str, ChunkReader] = {}  # direct chunk decoding where the layout allows
        self._info: list[dict[str, Any]] = []
        self._entries: zarr.Array | None = None  # INFO_ARRAY, opened for writing at the first commit
        self._ends = np.zeros(0, dtype=np.int64)
        self._writing: EpisodeWriter | None = None
        self._lock: WriterLock | None = None  # held while open for writing
        self.refresh()

    # ------------------------------------------------------------------ opening and creating
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        schema: Schema,
        *,
        zarr_format: int = 3,
        frames_per_chunk: int = 1,
        image_codec: str = "auto",
        overwrite: bool = False,
    ) -> DemoStore:
        """Create an empty store. `zarr_format=2` writes a store that Diffusion Policy's zarr 2 can read.
        It is built beside `path` and renamed into place: a crash leaves no half-made store there."""
        path = Path(path)
        if not is_whole(frames_per_chunk) or frames_per_chunk < 1:  # 0 was a ZeroDivisionError at append
            raise ValueError(
                f"{path}: frames_per_chunk must be a whole number >= 1, got {frames_per_chunk!r}"
            )
        if image_codec not in BLOSC_CODECS:
            raise ValueError(
                f"{path}: image_codec must be one of {', '.join(BLOSC_CODECS)}, got {image_codec!r}"
            )
        if zarr_format not in (2, 3) or isinstance(zarr_format, bool):
            raise ValueError(f"{path}: zarr_format must be 2 or 3, got {zarr_format!r}")
        restore_replaced(path.resolve())
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists; open it with DemoStore.open(path, mode='a')")
        check_writable(path.resolve().parent)
        if path.exists() and not replaceable(path):
            raise FileExistsError(
                f"{path}: exists and is not a zarr store; refusing to replace it (choose another path)"
            )
        if path.exists():  # nobody may be writing to the store this replaces
            refuse_foreign_entries(path, "overwrite=true")
            WriterLock(path).release()
        real = path.resolve()  # a store reached through a symbolic link is replaced where it is
        # this process's own folder (what dead ones left is removed): two creates of one path at once
        # shared `<name>.wm-create`, each deleting the other's half-built store
        building = real.with_name(f"{real.name}.wm-create.{os.getpid()}")
        remove_left_by_dead(real.parent, re.compile(re.escape(f"{real.name}.wm-create.") + r"(?P<pid>\d+)"))
        for left in (building, real.with_name(real.name + ".wm-create")):  # (the latter: older versions')
            if left.exists():
                shutil.rmtree(left)
        try:
            schema = cls._build(building, schema, zarr_format, image_codec, frames_per_chunk)
        except BaseException:  # (a dtype or key name zarr refuses): nothing left beside the store
            shutil.rmtree(building, ignore_errors=True)
            raise
        if overwrite:
            move_into_place(building, real)
        else:  # another process may have made it since the check above: theirs is kept, in one step
            place_new(building, real, f"{path}: another process made it just now; open it with "
                      "DemoStore.open(path, mode='a')")  # fmt: skip
        lock = WriterLock(real)
        group = zarr.open_group(
            store=LocalStore(real), mode="r+", zarr_format=zarr_format, use_consolidated=False
        )
        store = cls(path, group, schema, "a", legacy=False)
        store._lock = lock
        return store

    @staticmethod
    def _build(
        building: Path, schema: Schema, zarr_format: int, image_codec: str, frames_per_chunk: int
    ) -> Schema:
        """Write an empty store of `schema` at `building`; returns the schema as written (this format)."""
        group = zarr.open_group(store=LocalStore(building), mode="w", zarr_format=zarr_format)
        data = group.create_group("data")
        for key, spec in schema.keys.items():
            chunk_t = frames_per_chunk if spec.kind == "image" else LOWDIM_CHUNK
            data.create_array(
                key,
                shape=(0, *spec.shape),
                chunks=(chunk_t, *spec.shape),
                dtype=spec.dtype,
                compressors=_compressor(spec.kind, zarr_format, image_codec),
            )
        meta = group.create_group("meta")
        meta.create_array(
            "episode_ends",
            shape=(0,),
            chunks=(LOWDIM_CHUNK,),
            dtype="int64",
            compressors=_compressor("lowdim", zarr_format, "zstd"),
        )
        # written in this layout whatever a source store's was (a converter passes its schema on)
        schema = dataclasses.replace(schema, format_version=FORMAT_VERSION)
        _create_info_array(group, [])
        group.attrs.update({SCHEMA_ATTR: schema.to_dict(), COMMITTED_ATTR: 0, EVERY_CHUNK_ATTR: True})
        return schema

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "r",
        schema_overrides: dict[str, Any] | None = None,
        *,
        salvage: bool = False,
    ) -> DemoStore:
        """Open an existing store. `mode="a"` repairs what a crashed writer left past the last commit.

        `salvage=True` (read-only; for verifying and rewriting a damaged store, never for training)
        takes the episode boundaries from the commit record's lengths when `meta/episode_ends` is
        unreadable, short or decreasing, and tolerates data arrays shorter than the committed steps.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if salvage and mode != "r":
            raise ValueError("a store opened with salvage=True is read-only")
        path = Path(path)
        finish_swap(path.resolve())
        restore_replaced(path.resolve())
        if not path.exists():
            raise NotAStoreError(f"{path}: no such store")
        if mode == "a":
            check_writable(path)
        try:
            group = zarr.open_group(
                store=_open_zarr_store(path, read_only=mode == "r"),
                mode="r" if mode == "r" else "r+",
                use_consolidated=False,  # another tool's consolidated metadata is stale once appended to
            )
        except (FileNotFoundError, ValueError, json.JSONDecodeError, zarr.errors.BaseZarrError) as e:
            raise NotAStoreError(f"{path}: not a zarr demonstration store ({type(e).__name__}: {e})") from e
        missing = NotAStoreError(
            f"{path}: not a demonstration store (it has no data/ group or meta/episode_ends)"
        )
        if not _has_node(path, group, "meta") or not _has_node(path, group, "data"):
            raise missing
        try:
            has_ends = "episode_ends" in group["meta"]
        except (ValueError, zarr.errors.BaseZarrError) as e:  # json.JSONDecodeError is a ValueError
            if not salvage:
                raise CorruptStoreError(
                    f"{_metadata_file(path, 'meta/episode_ends')}: cannot be read ({type(e).__name__}: {e}); "
                    f"rebuild it from the commit record: {rewrite_command(path)}"
                ) from e
            has_ends = True  # salvage takes the boundaries from the commit record (`read_episode_ends`)
        if not has_ends:
            raise missing
        attrs = dict(group.attrs)
        legacy = SCHEMA_ATTR not in attrs
        try:
            if legacy:
                # sorted: zarr lists arrays in no fixed order, and the schema's order picks the default
                # camera and proprio key and enters the fingerprints a resume and a feature cache check
                arrays = sorted(group["data"].arrays(), key=lambda named: named[0])
                schema = infer_schema({k: (a.shape, a.dtype) for k, a in arrays})
            else:
                schema = Schema.from_dict(attrs[SCHEMA_ATTR])
            schema = schema.override(schema_overrides)
        except SchemaError as e:  # which store: a training run opens several
            raise SchemaError(f"{path}: {e}") from e
        lock = WriterLock(path) if mode == "a" else None  # before the repair: it truncates a writer's steps
        if lock is not None:  # no rewrite of the store is live under its lock: a <store>.wm-new is what a
            with contextlib.suppress(OSError):  # killed one left
                discard_tree(swap_paths(path.resolve())[0], path.resolve())
        try:
            store = cls(path, group, schema, mode, legacy, salvage)
            store._lock = lock
            if mode == "a":
                store._repair()
        except CorruptStoreError as e:  # (a bare "has 12 steps but episodes end at 15" named no way on)
            if lock is not None:
                lock.release()
            said = with_damage_listed(e, path)
            if said is e:
                raise
            raise said from e
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return store

    def __enter__(self) -> DemoStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._writing is not None:
                self._writing.discard()
            for reader in self._readers.values():
                reader.close()
            self._group.store.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # ------------------------------------------------------------------ reading
    @property
    def schema(self) -> Schema:
        return self._schema

    @property
    def zarr_format(self) -> int:
        return int(self._group.metadata.zarr_format)

    @property
    def keys(self) -> list[str]:
        return list(self._schema.keys)

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def episode_ends(self) -> np.ndarray:
        return self._ends.copy()

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._ends, prepend=0)

    @property
    def fingerprint(self) -> str:
        """A content hash of what is committed: the schema, the episode boundaries and the episodes'
        info (sha256, hex). It changes when episodes are added, removed or replaced; it does not read
        the data arrays (cheap), so a rewrite in place of identical boundaries goes unnoticed."""
        h = hashlib.sha256()
        # The layout's version is not content: hashed as 1 whatever it is, so a store moved to format 2
        # keeps the fingerprint its runs recorded (a resume compares them).
        schema = {**self._schema.to_dict(), "format_version": 1}
        h.update(json.dumps(schema, sort_keys=True, default=str).encode())
        h.update(np.ascontiguousarray(self._ends, dtype=np.int64).tobytes())
        h.update(json.dumps(self._info, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def frames_fingerprint(self, keys: Sequence[str]) -> str:
        """A content hash of the frames of camera(s) `keys`: their specs, the episode boundaries and the
        bytes of each episode's first and last frames (sha256, hex). What is trained on those frames
        alone (the default autoencoder) is reused while it holds; episode info (an episode flagged
        action-free) and other keys do not enter it. Frames between the edges are not read."""
        h = hashlib.sha256()
        specs = {k: self._schema.keys[k].to_dict() for k in keys}
        h.update(json.dumps(specs, sort_keys=True, default=str).encode())
        h.update(np.ascontiguousarray(self._ends, dtype=np.int64).tobytes())
        for ep in range(self.n_episodes):
            for frame in self.edge_frames(ep, keys):
                h.update(np.ascontiguousarray(frame).tobytes())
        return h.hexdigest()

    def edge_frames(self, ep: int, keys: Sequence[str]) -> Iterator[np.ndarray]:
        """Episode `ep`'s first and last frames of each camera in `keys`, (1, H, W, C) each; none for an
        episode without steps (it read its neighbours' frames, or past the end of the arrays)."""
        sl = self.episode_slice(ep)
        if sl.stop == sl.start:
            return
        for key in keys:
            for t in (sl.start, sl.stop - 1):
                yield self.read(key, slice(t, t + 1), episode=ep)

    def episode_slice(self, i: int) -> slice:
        i = self._check_episode(i)
        start = int(self._ends[i - 1]) if i > 0 else 0
        return slice(start, int(self._ends[i]))

    def episode_info(self, i: int) -> dict[str, Any]:
        return dict(self._info[self._check_episode(i)])

    def array(self, key: str) -> zarr.Array:
        """The zarr array of `key` (it may hold uncommitted steps past `n_steps`; slice to `n_steps`)."""
        if key not in self._arrays:
            raise SchemaError(f"{self.path}: no key {key!r}; the store has {sorted(self._arrays)}")
        return self._arrays[key]

    def episodes_in(self, lo: int, hi: int) -> list[int]:
        """The committed episodes that hold any of the global steps lo..hi-1."""
        lo, hi = max(int(lo), 0), min(int(hi), self.n_steps)
        if hi <= lo:
            return []
        first = int(np.searchsorted(self._ends, lo, side="right"))
        last = int(np.searchsorted(self._ends, hi - 1, side="right"))
        return list(range(first, last + 1))

    def describe_steps(self, lo: int, hi: int) -> str:
        """'episode 3', 'episodes 3-5' or '' for global steps lo..hi-1 (for error messages)."""
        eps = self.episodes_in(lo, hi)
        if not eps:
            return ""
        return f"episode {eps[0]}" if len(eps) == 1 else f"episodes {eps[0]}-{eps[-1]}"

    def chunk_reader(self, key: str) -> ChunkReader | None:
        """The direct chunk decoder of `key`, or None when its layout needs zarr."""
        self.array(key)
        return self._readers.get(key)

    def read(self, key: str, sel: slice, episode: int | None = None) -> np.ndarray:
        """Read `data/<key>[sel]`; a chunk that cannot be decoded raises CorruptStoreError naming its
        file, the key, its steps and their episodes."""
        arr = self.array(key)
        n = int(arr.shape[0])
        if sel.stop is not None and sel.stop > n:  # only a salvaged store lets a read reach past the end
            where = f"episode {episode}" if episode is not None else self.describe_steps(n, sel.stop)
            raise CorruptStoreError(
                f"{self.path}/data/{key}: has {n} steps; steps {n}:{sel.stop} ({where}) are missing"
            )
        return self._read_steps(key, np.arange(*sel.indices(n)), lambda: arr[sel])

    def read_rows(self, key: str, steps: np.ndarray) -> np.ndarray:
        """Rows at sorted unique global `steps` of `key` as (len(steps), *shape), errors as in `read`."""
        arr = self.array(key)
        steps = np.asarray(steps, dtype=np.int64)
        if len(steps) and steps[-1] - steps[0] + 1 == len(steps):  # contiguous: one slice
            return self._read_steps(key, steps, lambda: arr[int(steps[0]) : int(steps[-1]) + 1])
        return self._read_steps(key, steps, lambda: arr.oindex[steps])

    def _read_steps(self, key: str, steps: np.ndarray, via_zarr: Any) -> np.ndarray:
        fast = self._readers.get(key)
        if fast is not None:
            return fast.rows(steps)  # its errors already name file, key, steps and episodes
        try:
            return via_zarr()
        except Exception as e:  # zarr's codec errors come as RuntimeError, ValueError, TypeError...
            raise self._locate_damage(key, steps, e) from e

    def _locate_damage(self, key: str, steps: np.ndarray, err: Exception) -> CorruptStoreError:
        """Zarr's error names no chunk: decode the chunks of `steps` one by one to find the bad one."""
        arr = self.array(key)
        rows = int(arr.chunks[0])
        zeros = (0,) * (arr.ndim - 1)
        for c in np.unique(steps // rows) if len(steps) else []:
            lo, hi = int(c) * rows, min((int(c) + 1) * rows, arr.shape[0])
            try:
                arr[lo:hi]
            except Exception as e:
                chunk = f"{self.path}/data/{key}/{arr.metadata.encode_chunk_key((int(c), *zeros))}"
                where = self.describe_steps(lo, hi)
                return CorruptStoreError(
                    f"{chunk}: chunk {int(c)} of key {key!r} (steps {lo}:{hi}{', ' + where if where else ''})"
                    f" cannot be decoded ({type(e).__name__}: {e})"
                )
        lo, hi = (int(steps[0]), int(steps[-1]) + 1) if len(steps) else (0, 0)
        where = self.describe_steps(lo, hi)
        return CorruptStoreError(
            f"{self.path}/data/{key}: cannot decode steps {lo}:{hi}{' (' + where + ')' if where else ''}: "
            f"{type(err).__name__}: {err}"
        )

    def get_episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Episode `i` as {key: (T, *shape)} arrays."""
        sl = self.episode_slice(i)
        return {k: self.read(k, sl, episode=i) for k in (keys if keys is not None else self.keys)}

    def load_all(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Every committed step of `keys` in memory: {key: (T_total, *shape)}."""
        sl = slice(0, self.n_steps)
        return {k: self.read(k, sl) for k in (keys if keys is not None else self.keys)}

    def refresh(self) -> None:
        """Re-read the commit record, so a reader sees episodes appended since it opened the store."""
        # zarr caches metadata in the group and array objects: open them afresh.
        self._group = zarr.open_group(
            store=self._group.store, mode="r" if self.mode == "r" else "r+", use_consolidated=False
        )
        attrs = dict(self._group.attrs)
        records, problem = read_commit(self.path, self._group)
        if problem is not None and not self.salvage:
            raise CorruptStoreError(
                f"{problem}; rewrite the store to repair it, keeping every episode (info that cannot be read "
                f"is left empty): {rewrite_command(self.path)}"
            )
        ends, problem, _ = read_episode_ends(self.path, self._group, records)
        if problem is not None:
            lengths = commit_lengths(records)
            if not self.salvage or lengths is None:
                raise CorruptStoreError(problem)
            ends = np.cumsum(np.asarray(lengths, dtype=np.int64))  # the commit record's boundaries
        info = list(records) if records is not None else [{} for _ in range(len(ends))]
        bad = next((i for i, record in enumerate(info) if not isinstance(record, dict)), None)
        if bad is not None:  # episode_info would fail on it, far from here
            if not self.salvage:
                raise CorruptStoreError(
                    f"{self.path}: the commit record's entry of episode {bad} is not an object "
                    f"({str(info[bad])[:40]!r}); rewrite the store to repair it: {rewrite_command(self.path)}"
                )
            info = [record if isinstance(record, dict) else {} for record in info]
        data = self._group["data"]
        present = {key: self._open_array(data, key) for key in self._schema.keys}
        if not self.salvage:  # (verify, which opens with salvage, reports a mismatch as fatal)
            self._check_layout(present)
        for key in self._schema.keys:
            if present[key].shape[0] < (int(ends[-1]) if len(ends) else 0) and not self.salvage:
                raise CorruptStoreError(
                    f"{self.path}/data/{key}: has {present[key].shape[0]} steps "
                    f"but episodes end at {int(ends[-1])}"
                )
        self.every_chunk = attrs.get(EVERY_CHUNK_ATTR) is True
        writing = self.mode == "a"  # then chunks of fill values are written too (module docstring)
        self._arrays = {
            k: present[k].with_config(WRITE_EVERY_CHUNK) if writing else present[k] for k in self._schema.keys
        }
        self._readers = {
            k: r
            for k, a in self._arrays.items()
            if (r := ChunkReader.for_array(a, _weak(self.describe_steps), required=self.every_chunk))
        }
        self._ends = ends
        self._info = info
        self._entries = None

    def _check_layout(self, arrays: dict[str, zarr.Array]) -> None:
        """Raise a one-line SchemaError when an array's per-step shape or dtype is not the schema's (a
        `schema_overrides` entry, or a damaged schema attribute): appends were checked against the
        schema and zarr dropped the columns the array did not have."""
        for key, array in arrays.items():
            spec = self._schema.keys[key]
            if not fits_spec(array, spec):
                raise SchemaError(
                    f"{self.path}/data/{key}: holds {tuple(array.shape[1:])} {array.dtype} per step but the "
                    f"schema says {tuple(spec.shape)} {spec.dtype}; a schema override may change a key's "
                    "kind, not its shape or dtype"
                )

    def _open_array(self, data: zarr.Group, key: str) -> zarr.Array:
        """data/`key`, or one line saying what is wrong with it: missing, or its metadata unreadable (a
        zero-length zarr.json, as a power cut or an interrupted copy leaves)."""
        try:
            array = data[key]
        except KeyError:
            raise SchemaError(
                f"{self.path}: the schema declares key {key!r} but data/{key} is missing"
            ) from None
        except (ValueError, zarr.errors.BaseZarrError) as e:  # json.JSONDecodeError is a ValueError
            raise CorruptStoreError(
                f"{self.path}/data/{key}: its metadata cannot be read ({type(e).__name__}: {e}); "
                "restore the key from a copy, or rewrite the store without it"
            ) from e
        if not isinstance(array, zarr.Array):
            raise CorruptStoreError(f"{self.path}/data/{key}: is a group, not an array")
        return array

    def _check_episode(self, i: int) -> int:
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"{self.path}: episode {i} out of range (store has {n} episodes)")
        return i % n

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path}: opened read-only; use DemoStore.open(path, mode='a')")

    def _repair(self) -> None:
        """Drop whatever a killed writer left past the last committed episode: at most one episode's
        boundary (each open for appending repairs first). More is a commit count older than the data (a
        copy taken while a writer appended, a root zarr.json restored from a backup): refused, since
        dropping them deleted complete episodes."""
        extra = self._group["meta/episode_ends"].shape[0] - self.n_episodes
        if not self.legacy and extra > 1:
            raise CorruptStoreError(
                f"{self.path}: meta/episode_ends holds {extra} episodes past the {self.n_episodes} its "
                f"commit record counts ({COMMITTED_ATTR}): the root metadata is older than the data (a "
                "copy taken while a writer appended, or a restored backup); nothing was changed. Copy the "
                "store again from a stopped writer, or read it as it is (read-only opens show the committed "
                "episodes)"
            )
        with interrupts_held():  # a write left running would land after what follows
            n = self.n_steps
            for _key, arr in self._arrays.items():
                if arr.shape[0] > n:
                    arr.resize((n, *arr.shape[1:]))
            ends_arr = self._group["meta/episode_ends"]
            if ends_arr.shape[0] > self.n_episodes:
                ends_arr.resize((self.n_episodes,))
            if self.legacy:  # another tool's store, adopted now: its first append needs a commit record
                if not any(self._info):  # none there: the lengths are one
                    self._info = [{"length": int(n)} for n in self.episode_lengths()]
                self._migrate()
            # A store of format 1 is moved to this layout by its first commit (`_commit`), not here: one
            # opened for appending and left as it was (a refused session) stays readable by older code.
            if (
                COMMITTED_ATTR in self._group.attrs
                and (info := self._group[INFO_ARRAY]).shape[0] > self.n_episodes
            ):
                info.resize((self.n_episodes,))
            if self.path.is_dir():
                for partial in self.path.rglob("*.partial"):
                    partial.unlink(missing_ok=True)

    def _migrate(self) -> None:
        """Write this store's commit record in the current layout: every episode's info in INFO_ARRAY,
        then the root attributes with the commit count in place of a format 1 `wm_episodes` list (one
        write: a crash before it leaves the store as it was, and it is migrated again)."""
        _create_info_array(self._group, self._info)
        self._schema = dataclasses.replace(self._schema, format_version=FORMAT_VERSION)
        attrs = {k: v for k, v in dict(self._group.attrs).items() if k != EPISODES_ATTR}
        attrs.update({SCHEMA_ATTR: self._schema.to_dict(), COMMITTED_ATTR: self.n_episodes})
        self._group.attrs.put(attrs)
        self._entries = None
        self.legacy = False
        if self.path.is_dir():  # another tool's consolidated metadata (zarr 2's .zmetadata) goes stale at
            (self.path / ".zmetadata").unlink(missing_ok=True)  # this append: its readers see old shapes

    def begin_episode(self) -> EpisodeWriter:
        """Start streaming an episode step by step: `add_step`, then `end()` or `discard()`."""
        self._require_writable()
        if self._writing is not None:
            raise AppendError(f"{self.path}: an episode is already being written; end or discard it first")
        self._writing = EpisodeWriter(self)
        return self._writing

    def append_episode(self, data: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> int:
        """Append one whole episode {key: (T, *shape)}; returns its index once it is committed."""
        try:  # before any step is written (`EpisodeWriter.end` keeps its episode open to be ended again)
            first = next(iter(data.values()), None)
            json_record(info, len(first) if hasattr(first, "__len__") else None)
        except (TypeError, ValueError) as e:
            raise AppendError(f"{self.path}: episode info is not usable: {e}; nothing was written") from e
        writer = self.begin_episode()
        try:
            writer.add_steps(data)
        except BaseException:
            writer.discard()
            raise
        return writer.end(info)

    def _commit(self, length: int, info: dict[str, Any]) -> int:
        """Write episode_ends, then the commit record. Called by EpisodeWriter.end()."""
        new_end = self.n_steps + length
        ends_arr = self._group["meta/episode_ends"].with_config(WRITE_EVERY_CHUNK)
        e = self.n_episodes
        ends_arr.resize((e + 1,))
        ends_arr[e] = new_end
        record = {"length": int(length), **info}
        if COMMITTED_ATTR not in self._group.attrs:  # format 1: the episodes before this one, in this layout
            self._migrate()
        if self._entries is None:
            self._entries = self._group[INFO_ARRAY].with_config(WRITE_EVERY_CHUNK)
        self._entries.resize((e + 1,))
        self._entries[e] = _entry(record)
        self._group.attrs[COMMITTED_ATTR] = e + 1  # the commit
        self._ends = np.append(self._ends, np.int64(new_end))
        self._info.append(record)
        return e

    def _truncate(self, n_steps: int) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] > n_steps:
                arr.resize((n_steps, *arr.shape[1:]))


def json_native(value: Any) -> Any:
    """`value` with numpy scalars and arrays turned into Python numbers and lists (what an environment's
    `is_success()` or a metric returns: np.bool_, np.float32), inside dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: json_native(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_native(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def json_finite(value: Any) -> Any:
    """`json_native(value)` with every non-finite float (NaN, infinity) replaced by None: strict JSON has
    no such numbers (results.json, report.json)."""
    value = json_native(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_finite(v) for v in value]
    return value


def check_writable(path: Path) -> None:
    """Refuse (PermissionError, one line) a store or folder this process cannot write to, before any
    work: a read-only filesystem, or no permission (a writer failed at its first flush)."""
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(
            f"{path}: cannot write here (a read-only filesystem, or no permission); write to another path"
        )


def move_into_place(built: Path, dst: Path) -> None:
    """Put `built` (a store or dataset written beside `dst`) at `dst`, replacing what is there (a folder
    or a zip file; through a symbolic link, where it points: the link is kept). A folder is replaced under
    its writer lock: a store a writer has open (wm-collect, wm-deploy record=) is refused (StoreBusyError)
    and `built` removed, however long ago the replacing began. What is replaced is renamed aside first
    and deleted after `built` is in place: deleting it in place took seconds for a large store, and a kill
    then left `dst` half deleted and `built` in a hidden folder the next run removed. The two trade places
    in one atomic step (`exchange`), so a kill leaves `dst` whole, old or new. Where the filesystem cannot
    exchange, it is two renames, and a kill between them leaves no `dst`: the next open, create or
    conversion of `dst` puts the old copy back (`restore_replaced`)."""
    dst = dst.resolve()
    lock = None
    try:
        if dst.is_dir():
            lock = WriterLock(dst)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    old = None
    try:
        if not dst.exists():
            os.replace(built, dst)
        elif exchange(built, dst):
            old = built  # (which now holds what was at dst)
        else:
            old = beside(dst, "replaced")
            os.replace(dst, old)
            os.replace(built, dst)
    finally:
        if lock is not None:
            lock.release()
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h


def place_new(built: Path, dst: Path, taken: str) -> None:
    """Rename `built` to `dst` only where nothing is at `dst`, in one step (renameat2(RENAME_NOREPLACE);
    where the system has none, a rename, which does not replace a folder that holds anything): else
    FileExistsError(`taken`), `built` removed. A check then a rename let a second process's store
    replace the first's between the two."""
    renameat2, at_cwd = _renameat2(), -100  # AT_FDCWD: the paths are taken as they are
    err = 0
    if renameat2 is not None:
        if renameat2(at_cwd, os.fsencode(built), at_cwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
    if renameat2 is None or err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        try:
            if not dst.exists():
                os.rename(built, dst)
                return
            err = errno.EEXIST
        except OSError as e:
            err = e.errno or 0
    shutil.rmtree(built, ignore_errors=True)
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(taken)
    raise OSError(err, f"cannot rename {built} to {dst}: {os.strerror(err)}")


def exchange(a: Path, b: Path) -> bool:
    """Swap what is at `a` and at `b` (folders or files, either kind) in one atomic step: Linux's
    renameat2(RENAME_EXCHANGE). False, and nothing changed, where the system or filesystem has no such
    step (another OS, an older C library or kernel, a filesystem without it); other failures raise."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: the paths are taken as they are
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


@functools.cache
def _renameat2() -> Any:
    """The C library's renameat2, typed once; None where the C library has none."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def beside(dst: Path, suffix: str) -> Path:
    """Where to write what replaces `dst` (through a symbolic link: beside where it points, so the rename
    into place stays on one filesystem): a hidden sibling named after `dst` and this process, so two
    conversions to one destination never write (or clear) each other's work; the last to finish is
    what `dst` holds. What dead processes left there (a kill -9) is removed; first, where `dst` is gone
    and a dead process's `move_into_place` had renamed it aside (killed between its two renames), the
    old copy is put back."""
    target = dst.resolve()
    restore_replaced(target)
    mine = target.with_name(f".{dst.name}.{suffix}.{os.getpid()}")
    # (with what `DemoStore.create` builds beside a store that is being written: `<name>.wm-create.<pid>`,
    # `<name>.wm-create` before)
    left = re.compile(re.escape(f".{dst.name}.{suffix}.") + r"(?P<pid>\d+)(\.wm-create(\.\d+)?)?")
    remove_left_by_dead(target.parent, left)
    return mine


def restore_replaced(path: Path) -> None:
    """Where `path` is gone because a `move_into_place` that had renamed it aside was killed before it
    renamed the new copy in (a filesystem without `exchange`), put the old copy back."""
    if path.exists() or not path.parent.is_dir():
        return
    aside = re.compile(re.escape(f".{path.name}.replaced.") + r"(?P<pid>\d+)")
    for left in sorted(path.parent.iterdir()):
        m = aside.fullmatch(left.name)
        if m is not None and not alive(int(m.group("pid"))):
            rename_if_there(left, path)
            return


ZARR_META = ("zarr.json", ".zgroup", ".zarray")  # what makes a folder a zarr node (v3, v2)
# zarr's LocalStore writes each file to "<name>.<uuid hex>.partial" and renames it into place: a writer
# killed in between leaves one, the store's own (opening for writing deletes it), not a user's file
ZARR_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial")


def _metadata_file(path: Path, node: str) -> Path:
    """The metadata file of the node `node` of the store at `path` (zarr v3's or v2's, whichever is
    there), for messages that name it."""
    folder = path / node
    return next((folder / name for name in ZARR_META if (folder / name).is_file()), folder / "zarr.json")


def _has_node(path: Path, group: zarr.Group, node: str) -> bool:
    """Whether `group` holds `node`; CorruptStoreError naming its metadata file when that cannot be read
    (a zero-length file, as a power cut or an interrupted copy leaves, was a bare JSON error)."""
    try:
        return node in group
    except (ValueError, zarr.errors.BaseZarrError) as e:  # json.JSONDecodeError is a ValueError
        raise CorruptStoreError(
            f"{_metadata_file(path, node)}: cannot be read ({type(e).__name__}: {e}); restore this file from "
            "a copy of the store"
        ) from e


def _zarr_node(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ZARR_META)


def store_around(path: str | os.PathLike) -> Path | None:
    """The zarr store (or a node of one) that `path` is, or is inside; None when neither. Anything
    written inside a store is lost when the store is rewritten (`wm-info drop_episodes`) or replaced."""
    for p in (Path(path).resolve(), *Path(path).resolve().parents):
        if _zarr_node(p):
            return p
    return None


def foreign_entries(path: Path) -> list[str]:
    """The names in the store folder `path` that are not part of the store (a run's checkpoints put in
    it, a dataset written inside it): a rewrite of the store would delete them."""
    own = (*ZARR_META, ".zattrs", ".zmetadata")
    return sorted(
        e.name
        for e in path.iterdir()
        if e.name not in own and not _zarr_node(e) and not ZARR_PARTIAL.fullmatch(e.name)
    )


def refuse_foreign_entries(path: Path, doing: str) -> None:
    """Refuse (ValueError, one line) to replace or rewrite the store folder `path` (`doing` it, e.g. "the
    rewrite") while it holds `foreign_entries`: they would be deleted without a word."""
    foreign = foreign_entries(path) if path.is_dir() else []
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{path}: holds files that are not the store's ({listed}); {doing} would delete them: "
            "move them out of the store first"
        )


def replaceable(path: Path) -> bool:
    """What `create(overwrite=True)` (and a converter's overwrite) may delete: an empty folder or a zarr
    store (even a damaged one; a zip store), never another file or a folder of anything else (a user's
    data given as the path by mistake)."""
    if not path.is_dir():
        return path.suffix == ".zip" and zipfile.is_zipfile(path)
    return not any(path.iterdir()) or (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def check_not_a_source(dst: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> None:
    """Refuse (ValueError, one line) to write a new store at a path that is one of the stores it is made
    from: `create(overwrite=True)` would delete the source before it is read."""
    target = Path(dst).resolve()
    for src in sources:
        if Path(src).resolve() == target:
            raise ValueError(f"{dst}: is also a source of this store; write the result to another path")


def check_destination(
    dst: Path,
    overwrite: bool,
    sources: Iterable[str | os.PathLike],
    may_replace: Callable[[Path], bool] = replaceable,
    not_replaceable: str = "exists and is not a store; not replacing it (choose another dst)",
) -> None:
    """Refuse, in one line and before any work, a destination a converter must not write to: one that
    exists (without `overwrite`), that `may_replace` says is not its kind of output (a user's folder:
    `not_replaceable` says so), that is a source or holds one (replacing it would delete the source), that
    a writer has open, or a zip file where a store is written (`may_replace` is `replaceable`: zip stores
    are read-only)."""
    if may_replace is replaceable and dst.suffix == ".zip":
        raise NotAStoreError(f"{dst}: zip stores are read-only; write a directory store (and zip it after)")
    target = dst.resolve()
    for src in sources:
        s = Path(src).resolve()
        if s == target or target in s.parents:
            raise ValueError(f"{dst}: is or holds the source {src}; write the result to another path")
        if s in target.parents:  # a rewrite of the source (wm-info drop_episodes) would delete it
            raise ValueError(f"{dst}: is inside the source {src}; write the result to another path")
    if not dst.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{dst}: already exists; give overwrite=true to replace it")
    if not may_replace(dst):
        raise FileExistsError(f"{dst}: {not_replaceable}")
    if may_replace is replaceable:
        refuse_foreign_entries(dst, "overwrite=true")
    if dst.is_dir():  # nobody may be writing to the store this replaces
        WriterLock(dst).release()


def commit_lengths(records: Any) -> list[int] | None:
    """Episode lengths from a commit record, or None when it does not hold a length for each (positive, or
    0 where an adopted store had an empty episode)."""
    if not isinstance(records, list):
        return None
    lengths = [r.get("length") if isinstance(r, dict) else None for r in records]
    if not all(type(n) is int and n >= 0 for n in lengths) or not any(lengths):
        return None
    return lengths


def _entry(record: Mapping[str, Any]) -> str:
    """An episode's info as INFO_ARRAY holds it (`read_commit` reads it back)."""
    return json.dumps(record, separators=(",", ":"))


def _create_info_array(group: zarr.Group, records: Sequence[Any]) -> None:
    """INFO_ARRAY of `group` holding `records` (replacing one there: what a crashed migration left)."""
    v3 = group.metadata.zarr_format == 3
    entries = group.create_array(
        INFO_ARRAY,
        shape=(len(records),),
        chunks=(INFO_CHUNK,),
        dtype=str,
        compressors=(zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()) if v3 else "auto",
        overwrite=True,
    ).with_config(WRITE_EVERY_CHUNK)
    if records:
        entries[:] = np.array([_entry(r) for r in records], dtype=object)


def with_damage_listed(e: CorruptStoreError, path: str | Path) -> CorruptStoreError:
    """`e` naming the command that lists all of the store's damage, or `e` itself when it names a
    repair (or that command) already."""
    if "wm-info " in str(e):
        return e
    return CorruptStoreError(f"{e}; list all damage with: {info_command(path, 'verify=true')}")


def info_command(path: str | Path, *overrides: str) -> str:
    """`wm-info store=PATH OVERRIDES...` as a shell line, the path quoted for Hydra (`override`)."""
    return shlex.join(["wm-info", override("store", path), *overrides])


def rewrite_command(path: str | Path, drop: Iterable[int] = ()) -> str:
    """The `wm-info` rewrite of the store at `path` without the episodes `drop` (none: every episode kept,
    which repairs a damaged commit record or writes every chunk), as a shell line (`info_command`)."""
    episodes = ",".join(str(e) for e in drop)
    return info_command(path, f"drop_episodes=[{episodes}]")


def read_commit(path: Path, group: zarr.Group) -> tuple[list[Any] | None, str | None]:
    """The commit record: each committed episode's info, in order (an entry that is not a JSON object is
    returned as it is, for the caller to report), or None for a store without one (another tool's); and
    a one-line problem when part of it cannot be read. Then what can be read is kept, and {} stands for
    each entry that cannot, for as many episodes as both the count and `meta/episode_ends` hold (a count
    damaged upwards commits no episode that is not there). A count that is not one stands for as many
    episodes as both the info entries and `meta/episode_ends` hold (ignoring it threw every intact info
    entry away); None when the info entries cannot be read either."""
    attrs = dict(group.attrs)
    if COMMITTED_ATTR not in attrs:  # format 1 (a list), or none
        return attrs.get(EPISODES_ATTR), None
    n = attrs[COMMITTED_ATTR]
    damaged = None
    if type(n) is not int or n < 0:
        damaged = f"{path}: the commit count {COMMITTED_ATTR} is {str(n)[:40]!r}, not a count"
    try:
        entries = group[INFO_ARRAY]
        if not isinstance(entries, zarr.Array):
            raise TypeError("it is a group, not an array")
        have, rows = int(entries.shape[0]), int(entries.chunks[0])
    except Exception as e:  # missing, or its metadata unreadable
        if damaged is not None:
            return None, damaged
        return [{}] * _bounded(group, n, 0), f"{path}/{INFO_ARRAY}: cannot be read ({type(e).__name__}: {e})"
    if damaged is not None:
        ends = _ends_entries(group)
        records, problem = _read_entries(
            path, group, entries, min(have, ends if ends is not None else have), rows
        )
        return records, damaged + (f"; {problem}" if problem else "")
    return _read_entries(path, group, entries, n, rows)


def _read_entries(
    path: Path, group: zarr.Group, entries: zarr.Array, n: int, rows: int
) -> tuple[list[Any], str | None]:
    """The first `n` entries of INFO_ARRAY `entries` (chunks of `rows`), as `read_commit` returns them."""
    have = int(entries.shape[0])
    records: list[Any] = []
    problems = [f"has {have} entries but {n} episodes are committed"] if have < n else []
    for lo in range(0, min(have, n), rows):
        hi = min(lo + rows, have, n)
        try:
            texts = [str(t) for t in entries[lo:hi]]
        except Exception as e:  # a chunk that cannot be decoded: its entries alone are lost
            problems.append(
                f"chunk {lo // rows} (episodes {lo}-{hi - 1}) cannot be decoded ({type(e).__name__}: {e})"
            )
            records += [{}] * (hi - lo)
            continue
        lost = [lo + i for i, text in enumerate(texts) if not text]  # "": the fill value, never written
        if lost:
            problems.append(
                f"the entries of episodes {lost[0]}-{lost[-1]} are empty (chunk {lo // rows}: a lost file)"
            )
        for text in texts:
            try:
                records.append(json.loads(text) if text else {})
            except ValueError:
                records.append(text)
    if len(records) < n:
        records += [{}] * (_bounded(group, n, len(records)) - len(records))
    return records, (f"{path}/{INFO_ARRAY}: {'; '.join(problems)}" if problems else None)


def _bounded(group: zarr.Group, n: int, readable: int) -> int:
    """How many episodes a damaged commit record stands for: the count `n`, at most the entries of
    `meta/episode_ends` (or, when those cannot be read either, the `readable` info entries)."""
    ends = _ends_entries(group)
    return min(n, max(ends, readable)) if ends is not None else min(n, readable)


def _ends_entries(group: zarr.Group) -> int | None:
    """The entries `meta/episode_ends` holds, None when its metadata cannot be read."""
    try:
        return int(group["meta/episode_ends"].shape[0])
    except Exception:  # noqa: BLE001 - read_episode_ends reports it
        return None


def read_episode_ends(
    path: Path, group: zarr.Group, records: Any
) -> tuple[np.ndarray, str | None, tuple[int, ...]]:
    """The committed part of `meta/episode_ends`; a one-line problem if it cannot be used (the commit
    record's lengths then stand for it): unreadable, fewer entries than committed episodes, decreasing,
    an episode without steps (a lost chunk file of it reads as zeros: every episode in it empty), or at
    odds with the commit record (`_disagreement`); and the episodes whose boundaries are in doubt (a
    repair drops them)."""
    try:
        ends = np.asarray(group["meta/episode_ends"][:], dtype=np.int64)
    except Exception as e:
        problem = f"{path}/meta/episode_ends: cannot be read ({type(e).__name__}: {e})"
        return np.zeros(0, np.int64), problem, ()
    if isinstance(records, list):
        if len(ends) < len(records):
            problem = (
                f"{path}/meta/episode_ends: has {len(ends)} entries but {len(records)} episodes are committed"
            )
            return ends, problem, ()
        ends = ends[: len(records)]
    if len(ends) and (np.any(np.diff(ends) < 0) or ends[0] < 0):
        bad = int(np.argmax(np.diff(ends, prepend=0) < 0))
        problem = (
            f"{path}/meta/episode_ends: decreases at entry {bad} "
            f"({int(ends[bad - 1]) if bad else 0} -> {int(ends[bad])})"
        )
        return ends, problem, ()
    if isinstance(records, list):  # our stores never write an empty episode: a lost chunk of episode_ends
        # (zarr reads it as zeros); other tools' stores may hold some, recorded as such when adopted
        empty = np.flatnonzero(np.diff(ends, prepend=0) == 0)
        lost = [int(i) for i in empty if not (i < len(records) and _recorded_empty(records[i]))]
        if lost:
            return ends, f"{path}/meta/episode_ends: episode {lost[0]} has no steps ({len(lost)} such)", ()
    lengths = commit_lengths(records)
    if lengths is None or len(lengths) != len(ends):
        return ends, None, ()
    return (ends, *_disagreement(path, group, ends, np.cumsum(np.asarray(lengths, dtype=np.int64))))


def _disagreement(
    path: Path, group: zarr.Group, ends: np.ndarray, committed: np.ndarray
) -> tuple[str | None, tuple[int, ...]]:
    """Which of `meta/episode_ends` and the commit record's cumulative lengths `committed` is damaged where
    they differ (a zarr v2 store has no checksums: a flipped bit in its episode_ends decodes to other
    increasing numbers, and a repair that trusted them deleted or re-split intact episodes). The one that
    ends where the data does is right: episode_ends that do not make a problem (the commit record's
    lengths replace them); a damaged commit record makes none here (`verify` reports its lengths, and a
    rewrite rebuilds it from the boundaries). A writer killed mid-episode leaves uncommitted steps past the
    last episode (until the store is next opened for appending), so neither may end there: then a side
    that ends past the data is the damaged one, and otherwise the pattern tells: one boundary off is a
    damaged episode_ends entry, every boundary from one on off by the same steps a damaged commit length.
    When none of that decides, the episodes on each boundary that differs are in doubt (a repair trusting
    either side deleted intact episodes)."""
    differ = np.flatnonzero(ends != committed)
    if not len(differ):
        return None, ()
    held = _steps_held(group)
    ends_fit, commit_fits = int(ends[-1]) == held, int(committed[-1]) == held
    if ends_fit == commit_fits:
        if not ends_fit and held is not None and (int(ends[-1]) > held) != (int(committed[-1]) > held):
            ends_fit, commit_fits = int(ends[-1]) <= held, int(committed[-1]) <= held
        elif len(differ) == 1 and differ[0] < len(ends) - 1:
            ends_fit, commit_fits = False, True  # one inner entry of episode_ends off (a flipped bit)
        elif len(differ) > 1 and len(set((ends - committed)[differ[0] :].tolist())) == 1:
            ends_fit, commit_fits = True, False  # one commit length off: every later boundary shifts with it
    if ends_fit and not commit_fits:
        return None, ()
    where = f"{path}/meta/episode_ends"
    if commit_fits and not ends_fit:
        lengths = int(committed[-1])
        return f"{where}: ends at step {int(ends[-1])}, but the commit record's lengths end at {lengths}", ()
    doubtful = tuple(sorted({int(e) for b in differ for e in (b, b + 1) if e < len(ends)}))
    listed = ", ".join(str(e) for e in doubtful[:8]) + (", ..." if len(doubtful) > 8 else "")
    return (
        f"{where}: disagrees with the commit record's lengths at the boundaries of episodes {listed}, and "
        f"the steps the data holds ({held if held is not None else 'unreadable'}) do not tell which is right"
    ), doubtful


def _steps_held(group: zarr.Group) -> int | None:
    """The most steps any data array holds (damage loses a key steps, never adds them), or None when the
    arrays cannot be listed."""
    try:
        return max((int(a.shape[0]) for _, a in group["data"].arrays()), default=None)
    except Exception:  # noqa: BLE001 - opening the store reports what is unreadable
        return None


def fits_spec(array: zarr.Array, spec: KeySpec) -> bool:
    """Whether `array` holds steps of `spec`'s shape and dtype (what opening a store and verifying it
    both require)."""
    if tuple(array.shape[1:]) != tuple(spec.shape):
        return False
    try:
        return np.dtype(array.dtype) == np.dtype(spec.dtype)
    except TypeError:  # a zarr dtype numpy does not name (variable-length strings)
        return str(array.dtype) == str(spec.dtype)


def _recorded_empty(record: Any) -> bool:
    """A commit record entry of an episode without steps: one that another tool's store held when this
    one adopted it (`DemoStore._repair`)."""
    return isinstance(record, dict) and type(record.get("length")) is int and record["length"] == 0


class EpisodeWriter:
    """Streams one episode into a store. Steps are buffered and flushed every FLUSH_STEPS steps, so a
    long episode never sits whole in memory; nothing is visible to readers until `end()` commits.
    Used as a context manager, an exception inside the block discards the episode. A flush or commit that
    fails (OSError: the disk is full) keeps the episode open with every step it was given, the one being
    added too: once there is space, `end()` again (or the next step) writes them all; or `discard()`."""

    def __init__(self, store: DemoStore) -> None:
        self._store = store
        self._start = store.n_steps
        self._flushed = 0
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in store.keys}
        self._n_buf = 0
        self._done = False

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._done:
            return
        if exc_type is None:
            self.end()
        else:
            self.discard()

    @property
    def n_steps(self) -> int:
        return self._flushed + self._n_buf

    def _where(self) -> str:
        return f"{self._store.path}: episode {self._store.n_episodes}, step {self.n_steps}"

    def _check(self, key: str, value: np.ndarray, batched: bool) -> np.ndarray:
        spec = self._store.schema.keys[key]
        value = np.asarray(value)
        shape = value.shape[1:] if batched else value.shape
        if tuple(shape) != spec.shape:
            raise AppendError(f"{self._where()}, key {key!r}: shape {tuple(shape)} != schema {spec.shape}")
        if value.dtype != np.dtype(spec.dtype):
            if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
                raise AppendError(f"{self._where()}, key {key!r}: dtype {value.dtype} != schema {spec.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # what does not fit is refused below
                cast = value.astype(spec.dtype)
            if not np.can_cast(value.dtype, spec.dtype, casting="safe"):  # narrower: the values must fit
                if np.issubdtype(cast.dtype, np.floating):
                    lost = np.isfinite(value) & ~np.isfinite(cast)  # beyond the type's range
                else:
                    lost = cast != value  # wrapped around
                if lost.any():
                    raise AppendError(
                        f"{self._where()}, key {key!r}: {value.dtype} value {value[lost].flat[0]} does not "
                        f"fit the schema's {spec.dtype}"
                    )
            value = cast
        if spec.kind in ("action", "proprio") and np.issubdtype(value.dtype, np.floating):
            bad = ~np.isfinite(value)
            if bad.any():
                first = self.n_steps + (int(np.argwhere(bad)[0][0]) if batched else 0)
                raise AppendError(
                    f"{self._store.path}: episode {self._store.n_episodes}, key {key!r} has non-finite values"
                    f" (first at step {first})"
                )
        return value

    def _check_keys(self, step: dict[str, Any]) -> None:
        if self._done:
            raise AppendError(f"{self._store.path}: this episode writer has already ended")
        missing = set(self._store.keys) - set(step)
        extra = set(step) - set(self._store.keys)
        if missing or extra:
            raise AppendError(
                f"{self._where()}: keys do not match the schema "
                f"(missing {sorted(missing)}, unknown {sorted(extra)})"
            )

    def add_step(self, step: dict[str, Any]) -> None:
        """Add one step {key: (*shape)}; validated before anything is buffered."""
        self._check_keys(step)
        checked = {k: self._check(k, v, batched=False) for k, v in step.items()}
        for k, v in checked.items():
            self._buf[k].append(v[None])
        self._n_buf += 1
        if self._n_buf >= FLUSH_STEPS:
            self._flush()

    def add_steps(self, steps: dict[str, np.ndarray]) -> None:
        """Add several steps {key: (T, *shape)} at once (all keys the same T)."""
        self._check_keys(steps)
        for k, v in steps.items():
            if np.ndim(v) == 0:
                raise AppendError(f"{self._where()}, key {k!r}: a single value {v!r}, expected (T, ...)")
        lengths = {k: len(np.asarray(v)) for k, v in steps.items()}
        if len(set(lengths.values())) != 1:
            raise AppendError(f"{self._where()}: keys have different lengths {lengths}")
        checked = {k: self._check(k, v, batched=True) for k, v in steps.items()}
        for k, v in checked.items():
            self._buf[k].append(v)
        self._n_buf += next(iter(lengths.values()))
        if self._n_buf >= FLUSH_STEPS:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered steps to rows lo..hi of every key; the buffers are emptied and the count
        advanced only once every key is written. A write that fails part-way (a full disk) leaves all of
        them buffered: the next flush writes the same rows again, with the steps added since (clearing each
        key's buffer after its write lost those steps, and later ones were written over them)."""
        if self._n_buf == 0:
            return
        for key, parts in self._buf.items():  # one block a key, kept for a retry (a single part: no copy)
            if len(parts) > 1:
                self._buf[key] = [np.concatenate(parts, axis=0)]
        lo = self._start + self._flushed
        hi = lo + self._n_buf
        with interrupts_held():  # a write left running would land after a discard's truncation
            for key, (block,) in self._buf.items():
                arr = self._store.array(key)
                arr.resize((hi, *arr.shape[1:]))  # a retry: the same size or larger, never smaller
                arr[lo:hi] = block
            self._buf = {k: [] for k in self._buf}
            self._flushed += self._n_buf
            self._n_buf = 0

    def end(self, info: dict[str, Any] | None = None) -> int:
        """Flush and commit the episode; returns its index. `info` is JSON metadata (success, notes, ...)."""
        if self._done:
            raise AppendError(f"{self._store.path}: this episode writer has already ended")
        if self.n_steps == 0:
            raise AppendError(f"{self._where()}: an episode needs at least one step")
        try:
            record = json_record(info, self.n_steps)
        except (TypeError, ValueError) as e:  # nothing flushed or committed: end() may be called again
            raise AppendError(
                f"{self._where()}: episode info is not usable: {e}; the episode is kept open: call end() "
                "again with plain JSON values"
            ) from e
        with interrupts_held():  # Ctrl-C in the commit: the episode is committed whole, then it stops
            self._flush()
            index = self._store._commit(self._flushed, record)
            self._done = True
            self._store._writing = None
        return index

    def discard(self) -> None:
        """Drop the episode in progress; the store is as it was before `begin_episode`."""
        if self._done:
            return
        with interrupts_held():
            self._buf = {k: [] for k in self._buf}
            self._n_buf = 0
            self._store._truncate(self._start)
            self._done = True
            self._store._writing = None


# ---------------------------------------------------------------------- whole-store rewrites
class WriterLock(PathLock):
    """The store's writer lock: an exclusive advisory flock on the store itself (its directory, or its zip
    file), held by one store opened for writing, or one rewrite, at a time, in any process; released by
    `release()` or when the process ends, however it ends. Readers take none: commits are atomic for
    them. Opening for writing repairs what a crashed writer left, which would truncate a live writer's
    steps: so a second writer is refused, in one line."""

    def __init__(self, path: Path) -> None:
        def busy() -> StoreBusyError:
            return StoreBusyError(
                f"{path}: another writer has this store open (wm-collect, wm-deploy record=, or a DemoStore "
                "opened with mode='a'); wait for it to finish, or write to another store"
            )

        def unguarded(e: OSError) -> None:  # a filesystem without locks: write, unguarded
            warnings.warn(
                f"{path}: this filesystem cannot lock the store ({e}); a second writer would not be refused: "
                "write to it from one process at a time",
                stacklevel=5,  # past this, PathLock.__init__, WriterLock.__init__ and its caller
            )

        super().__init__(path, busy, unguarded)


def _weak(method: Callable[[int, int], str]) -> Callable[[int, int], str]:
    """`method` of a store, held without keeping the store alive: a store's readers hold it, and a strong
    reference made a cycle, so a store dropped without `close()` kept its writer lock until the garbage
    collector ran."""
    ref = weakref.WeakMethod(method)
    return lambda lo, hi: m(lo, hi) if (m := ref()) is not None else ""


def swap_paths(path: Path) -> tuple[Path, Path]:
    """(new store written beside `path`, old store moved aside) of a crash-safe rewrite (wm.data.ops)."""
    return path.with_name(path.name + ".wm-new"), path.with_name(path.name + ".wm-old")


def json_record(info: Mapping[str, Any] | None, steps: int | None = None) -> dict[str, Any]:
    """Episode `info` as the commit record holds it (numpy values as Python's); TypeError or ValueError when
    it is not JSON, ValueError when its "length" is not the episode's `steps` ("length" is the record's
    own step count: an info "length" of 2 on a 5-step episode made a healthy store fail verification, and
    a salvage split it at step 2; the same count, an episode copied with its info, is what it says)."""
    record = json_native(dict(info or {}))
    if "length" in record and not (type(record["length"]) is int and record["length"] == steps):
        raise ValueError(
            f"its 'length' ({record['length']!r}) is not the episode's {steps} steps: the key is the commit "
            "record's own step count; rename it"
        )
    json.dumps(record)
    return record


def finish_swap(path: Path) -> None:
    """Complete a `keep_episodes` swap that a crash interrupted between its two renames, and remove
    what it left beside the store. Safe while a live rewrite makes the same moves: every step is one
    rename, and a step another process made first is skipped."""
    tmp, old = swap_paths(path)
    if not path.exists() and old.exists():
        try:
            rename_if_there(tmp if tmp.exists() else old, path)
        except OSError:
            if not path.exists():  # else a live rewrite put the new store in place meanwhile
                raise
    with contextlib.suppress(OSError):  # leftovers: a reader that cannot remove them still reads
        if path.exists() and old.exists():
            discard_tree(old, path)
        for trash in path.parent.glob(f"{glob.escape(path.name)}.*{_TRASH}"):
            pid = trash.name[len(path.name) + 1 : -len(_TRASH)]
            if pid.isdigit() and not alive(int(pid)):
                discard_tree(trash, path)  # a removal its process did not live to finish


_TRASH = ".wm-trash"


def discard_tree(path: Path, store: Path) -> None:
    """Remove the directory `path` (an old copy of the store at `store`), even while another process
    removes it too: it is first renamed to a name of this process's own beside the store (one atomic
    step, which only one process wins), so no reader ever finds it half removed, and no two processes
    delete the same files."""
    trash = store.with_name(f"{store.name}.{os.getpid()}{_TRASH}")
    if trash.exists():  # this process's earlier removal, left unfinished
        shutil.rmtree(trash, ignore_errors=True)
    if rename_if_there(path, trash):
        shutil.rmtree(trash, ignore_errors=True)


def rename_if_there(src: Path, dst: Path) -> bool:
    """`os.replace(src, dst)`; False when `src` was already gone (another process moved it)."""
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        if src.exists():
            raise
        return False
    return True
