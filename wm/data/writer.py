"""Writing one episode into a store step by step (`DemoStore.begin_episode`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from wm.data.errors import AppendError
from wm.data.layout import json_record
from wm.interrupt import interrupts_held

if TYPE_CHECKING:
    from wm.data.store import DemoStore

# Steps buffered in memory by a streaming writer before they are flushed to disk.
FLUSH_STEPS = 32


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
