"""Fast random reads of whole time-chunks from a local store, bypassing zarr's per-call machinery.

Reading one frame through `zarr.Array.__getitem__` costs far more than the file read plus Blosc
decode, almost all of it zarr's async dispatch (figures in BENCHMARKS.md, data-loading section,
beside benchmarks/bench_loader.py's end-to-end loader comparison). Training reads random frames
all the time, so for the layout this project writes (local directory or zip file, chunks that span
the full per-step shape, Blosc or no compression, no filters, C order, little-endian) `ChunkReader`
reads chunk files and decodes them directly, checking each chunk's crc32c (zarr v3 stores of this
project carry one) and Blosc's own length header, so a damaged chunk raises rather than decoding
to garbage. `ChunkReader.for_array` returns None for any other
layout, and callers fall back to zarr. Tests check both paths return identical data. (Through zarr a
zarr v2 chunk, which has no checksum, truncated before its store was zipped decoded to garbage: Blosc
read past the bytes it had.)

An error names the chunk file, the key, the chunk's step range and, when the caller passes
`where` (the store does), the episodes those steps belong to.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.storage import LocalStore, ZipStore

from wm.data.errors import CorruptStoreError


class ChunkReader:
    """Reads rows (time steps) of one zarr array by decoding its chunk files directly."""

    def __init__(
        self,
        array: zarr.Array,
        root: Path,
        blosc: bool,
        crc: bool,
        where: Callable[[int, int], str] | None = None,
        required: bool = False,
    ) -> None:
        self.array = array
        self.required = required  # every chunk was written: a missing file is damage, not fill
        self.root = root  # the array's folder; inside a zip store, the zip file's path / the array's path
        zipped = isinstance(array.store, ZipStore)
        self._zip = _ZipMembers(Path(array.store.path), array.path) if zipped else None
        self.key = array.path.rsplit("/", 1)[-1]
        self.where = where  # (first step, end step) -> e.g. "episode 3"
        self.blosc = Blosc() if blosc else None
        self.crc = crc
        self.rows_per_chunk = int(array.chunks[0])
        self.chunk_shape = tuple(int(c) for c in array.chunks)
        self.dtype = np.dtype(array.dtype)
        self.fill = 0 if array.fill_value is None else array.fill_value  # zarr 2's null fill reads as 0
        self._key = array.metadata.encode_chunk_key
        self._zeros = (0,) * (array.ndim - 1)

    @classmethod
    def for_array(
        cls, array: zarr.Array, where: Callable[[int, int], str] | None = None, required: bool = False
    ) -> ChunkReader | None:
        """A reader for `array`, or None when its layout is not one this fast path handles. `where`
        maps a step range to the episodes it covers, for error messages; `required`: every chunk was
        written (the store's `wm_every_chunk`), so a missing chunk file raises instead of reading as
        the fill value."""
        if not isinstance(array.store, (LocalStore, ZipStore)) or sys.byteorder != "little":
            return None
        if tuple(array.chunks[1:]) != tuple(array.shape[1:]) or np.dtype(array.dtype).byteorder == ">":
            return None
        meta = array.metadata
        if meta.zarr_format == 2:
            if meta.filters or meta.order != "C":
                return None
            comp = meta.compressor
            if comp is not None and comp.codec_id != "blosc":
                return None
            return cls(array, _root(array), comp is not None, False, where, required)
        names = [type(c).__name__ for c in meta.codecs]
        crc = names[-1:] == ["Crc32cCodec"]
        if crc:
            names = names[:-1]
        if names not in (["BytesCodec"], ["BytesCodec", "BloscCodec"]):
            return None
        big = str(getattr(meta.codecs[0], "endian", None)).endswith("big")
        if big and np.dtype(array.dtype).itemsize > 1:
            return None
        return cls(array, _root(array), len(names) == 2, crc, where, required)

    def chunk_path(self, c: int) -> Path:
        """The file holding chunk `c` (steps c * rows_per_chunk onwards)."""
        return self.root / self._chunk_key(c)

    def _chunk_key(self, c: int) -> str:
        return self._key((c, *self._zeros))

    def read_chunk(self, c: int) -> np.ndarray:
        """Chunk `c` decoded and checked, as (rows_per_chunk, *shape); CorruptStoreError if damaged."""
        key = self._chunk_key(c)
        path = self.root / key
        try:
            raw = path.read_bytes() if self._zip is None else self._zip.read(key)
        except FileNotFoundError as e:
            if not self.required:  # never written: zarr's fill value
                return np.full(self.chunk_shape, self.fill, dtype=self.dtype)
            raise self._damaged(c, path, "the chunk file is missing (the store writes every chunk)") from e
        try:
            if self.crc:
                raw, stored = raw[:-4], raw[-4:]
                if len(stored) < 4 or google_crc32c.value(raw).to_bytes(4, "little") != stored:
                    raise ValueError("crc32c checksum mismatch")
            if self.blosc is not None:
                # Blosc's header holds the compressed size; a truncated chunk would otherwise decode.
                if len(raw) < 16 or int.from_bytes(raw[12:16], "little") != len(raw):
                    raise ValueError(
                        f"Blosc header says {int.from_bytes(raw[12:16], 'little')} bytes, file has {len(raw)}"
                    )
                raw = self.blosc.decode(raw)
            return np.frombuffer(raw, dtype=self.dtype).reshape(self.chunk_shape)
        except Exception as e:
            raise self._damaged(c, path, f"cannot be decoded ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        """Closes a zip store's file (the next read opens it again)."""
        if self._zip is not None:
            self._zip.close()

    def _damaged(self, c: int, path: Path, what: str) -> CorruptStoreError:
        lo = c * self.rows_per_chunk
        hi = min(lo + self.rows_per_chunk, int(self.array.shape[0]))
        where = self.where(lo, hi) if self.where is not None else ""
        return CorruptStoreError(
            f"{path}: chunk {c} of key {self.key!r} (steps {lo}:{hi}{', ' + where if where else ''}) {what}"
        )

    def rows(self, steps: np.ndarray) -> np.ndarray:
        """Rows at sorted unique `steps` as (len(steps), *shape)."""
        out = np.empty((len(steps), *self.chunk_shape[1:]), dtype=self.dtype)
        chunk_ids = steps // self.rows_per_chunk
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            out[sel] = self.read_chunk(int(c))[steps[sel] - c * self.rows_per_chunk]
        return out


def _root(array: zarr.Array) -> Path:
    """The folder of `array`'s chunk files (in a zip store: as if the zip file were a folder)."""
    store = array.store
    return Path(store.path if isinstance(store, ZipStore) else store.root) / array.path


class _ZipMembers:
    """Chunk bytes from the members of a zip file, through a `zipfile.ZipFile` opened once per process
    (one handle shared across a fork would move one file offset for both processes); not pickled."""

    def __init__(self, zip_path: Path, prefix: str) -> None:
        self.zip_path, self.prefix = zip_path, prefix
        self._file: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def read(self, key: str) -> bytes:
        file = self._file
        if file is None or self._pid != os.getpid():
            file = self._file = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        try:
            return file.read(f"{self.prefix}/{key}")
        except KeyError as e:  # the member was never written
            raise FileNotFoundError(f"{self.zip_path}: no member {self.prefix}/{key}") from e

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"zip_path": self.zip_path, "prefix": self.prefix, "_file": None, "_pid": None}
