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
import dataclasses
import hashlib
import json
import os
import re
import shutil
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore, ZipStore

from wm.data.chunks import ChunkReader
from wm.data.errors import AppendError, CorruptStoreError, NotAStoreError, SchemaError
from wm.data.layout import (
    COMMITTED_ATTR,
    EPISODES_ATTR,
    EVERY_CHUNK_ATTR,
    INFO_ARRAY,
    SCHEMA_ATTR,
    WRITE_EVERY_CHUNK,
    commit_lengths,
    create_info_array,
    info_entry,
    json_record,
    read_commit,
    read_episode_ends,
    rewrite_command,
    with_damage_listed,
)
from wm.data.places import (
    ZARR_META,
    WriterLock,
    check_writable,
    discard_tree,
    finish_swap,
    move_into_place,
    place_new,
    refuse_foreign_entries,
    replaceable,
    restore_replaced,
    swap_paths,
)
from wm.data.schema import FORMAT_VERSION, KeySpec, Schema, infer_schema
from wm.data.writer import EpisodeWriter
from wm.interrupt import interrupts_held
from wm.locks import remove_left_by_dead
from wm.options import is_whole

LOWDIM_CHUNK = 4096  # rows per chunk for low-dimensional keys


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
        create_info_array(group, [])
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
        create_info_array(self._group, self._info)
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
        self._entries[e] = info_entry(record)
        self._group.attrs[COMMITTED_ATTR] = e + 1  # the commit
        self._ends = np.append(self._ends, np.int64(new_end))
        self._info.append(record)
        return e

    def _truncate(self, n_steps: int) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] > n_steps:
                arr.resize((n_steps, *arr.shape[1:]))


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


def fits_spec(array: zarr.Array, spec: KeySpec) -> bool:
    """Whether `array` holds steps of `spec`'s shape and dtype (what opening a store and verifying it
    both require)."""
    if tuple(array.shape[1:]) != tuple(spec.shape):
        return False
    try:
        return np.dtype(array.dtype) == np.dtype(spec.dtype)
    except TypeError:  # a zarr dtype numpy does not name (variable-length strings)
        return str(array.dtype) == str(spec.dtype)


def _weak(method: Callable[[int, int], str]) -> Callable[[int, int], str]:
    """`method` of a store, held without keeping the store alive: a store's readers hold it, and a strong
    reference made a cycle, so a store dropped without `close()` kept its writer lock until the garbage
    collector ran."""
    ref = weakref.WeakMethod(method)
    return lambda lo, hi: m(lo, hi) if (m := ref()) is not None else ""
