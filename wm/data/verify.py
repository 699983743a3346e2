"""Checking a whole store: library side of `wm-info store=PATH verify=true`.

`verify_store` decodes every chunk of every key over the committed steps (crc32c and Blosc length
checks on the direct path, zarr's own decoding otherwise, then the chunk's size and shape), in a store
that writes every chunk (`wm_every_chunk`, `wm.data.store`) reports chunk files that are missing
(elsewhere a missing file is how zarr stores a chunk of zeros, and it cannot be told apart), checks
that action and proprioception values are finite, that `meta/episode_ends` is readable and
increasing without empty episodes (a lost chunk of it reads as zeros), its last end within every
data key, and that the commit record agrees with it. Each problem names the key, the chunk file,
its step range and the episodes it touches.

Repair is a crash-safe rewrite without the damaged episodes (`delete_episodes`, reachable as
`wm-info store=PATH drop_episodes=[...]`): the report prints that exact command. A rewrite also
rebuilds `meta/episode_ends` and the commit record, so boundary damage with intact data is repaired
by `drop_episodes=[]` (boundaries then come from the commit record's lengths); where the two disagree
and the data does not tell which is right, the episodes on the boundaries that differ are dropped.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wm.data.errors import CorruptStoreError, SchemaError
from wm.data.layout import read_commit, read_episode_ends, rewrite_command
from wm.data.store import DemoStore, fits_spec


@dataclass(frozen=True)
class Problem:
    """One thing found damaged. `fatal` problems cannot be fixed by dropping episodes."""

    what: str  # "data/<key>", "meta/episode_ends", "commit record" or "store"
    detail: str  # one line
    file: str = ""  # the chunk file, when the problem is one
    steps: tuple[int, int] | None = None  # global steps lo..hi-1
    episodes: tuple[int, ...] = ()
    fatal: bool = False

    def line(self) -> str:
        parts = [self.what]
        if self.file:
            parts.append(f"chunk file {self.file}")
        if self.steps is not None:
            parts.append(f"steps {self.steps[0]}:{self.steps[1]}")
        if self.episodes:
            parts.append(f"episodes {_ranges(self.episodes)}")
        return "  ".join(parts) + f": {self.detail}"


@dataclass
class VerifyReport:
    path: Path
    n_episodes: int = 0
    chunks_checked: int = 0
    keys_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    missing_files_checked: bool = True  # False: a store that may leave all-zero chunks unwritten
    checksums_checked: bool = True  # False: zarr v2 chunks in a folder (no checksum; a zip has its CRC)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_episodes(self) -> list[int]:
        return sorted({e for p in self.problems for e in p.episodes})

    def repair_command(self) -> str | None:
        """The command that rewrites the store without the damaged episodes; None when clean or when a
        problem cannot be fixed that way."""
        if self.ok or any(p.fatal for p in self.problems) or Path(self.path).suffix == ".zip":
            return None  # (a zip store is read-only: unzipped, its copy can be repaired)
        return rewrite_command(self.path, self.damaged_episodes)

    def repair_advice(self) -> str | None:
        """What repairs the store: `repair_command`, or for a zip store the same on an unzipped copy (a zip
        store is read-only: its damage was said to need a backup); None as for `repair_command`."""
        if Path(self.path).suffix != ".zip" or self.ok or any(p.fatal for p in self.problems):
            return self.repair_command()
        drop = shlex.split(rewrite_command(self.path, self.damaged_episodes))[-1]
        return f"unzip to a folder store, then: wm-info store=<folder> {shlex.quote(drop)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "episodes": self.n_episodes,
            "keys_checked": self.keys_checked,
            "chunks_checked": self.chunks_checked,
            "missing_files_checked": self.missing_files_checked,
            "checksums_checked": self.checksums_checked,
            "damaged_episodes": self.damaged_episodes,
            "problems": [{**asdict(p), "episodes": list(p.episodes)} for p in self.problems],
            "repair": self.repair_command(),
        }

    def summary_line(self) -> str:
        """One line for stderr: what is damaged and what to run."""
        if self.ok:
            return f"{self.path}: ok"
        eps = self.damaged_episodes
        what = f"{len(self.problems)} problem(s)" + (f" in episodes {_ranges(eps)}" if eps else "")
        cmd = self.repair_advice()
        fix = f"; repair: {cmd}" if cmd else "; restore the store from a backup or re-record it"
        return f"{self.path}: damaged, {what}{fix}"


def _ranges(episodes: tuple[int, ...] | list[int], limit: int = 12) -> str:
    """[1, 2, 3, 7] -> '[1-3, 7]', long lists cut after `limit` parts."""
    parts: list[str] = []
    eps = sorted(set(episodes))
    i = 0
    while i < len(eps):
        j = i
        while j + 1 < len(eps) and eps[j + 1] == eps[j] + 1:
            j += 1
        parts.append(str(eps[i]) if i == j else f"{eps[i]}-{eps[j]}")
        i = j + 1
    more = f", ... ({len(eps)} episodes)" if len(parts) > limit else ""
    return "[" + ", ".join(parts[:limit]) + more + "]"


# ---------------------------------------------------------------------- checks
def verify_store(path: str | Path) -> VerifyReport:
    """Check the store at `path` end to end; NotAStoreError if it is not a store at all."""
    report = VerifyReport(Path(path))
    try:
        store = DemoStore.open(path, salvage=True)
    except (CorruptStoreError, SchemaError) as e:
        report.problems.append(Problem("store", str(e), fatal=True))
        return report
    with store:
        report.n_episodes = store.n_episodes
        report.missing_files_checked = store.every_chunk
        report.checksums_checked = store.zarr_format >= 3 or Path(path).suffix == ".zip"
        report.problems += _check_boundaries(store)
        for key in store.keys:
            report.problems += _check_key(store, key, report)
            report.keys_checked += 1
    return report


def _check_boundaries(store: DemoStore) -> list[Problem]:
    """`meta/episode_ends` readable, increasing, and in agreement with the commit record."""
    group = store._group
    records, unreadable = read_commit(store.path, group)
    out = [Problem("commit record", unreadable)] if unreadable is not None else []
    disk, problem, doubtful = read_episode_ends(store.path, group, records)
    if problem is not None:  # salvage took the boundaries from the commit record; the repair drops those
        taken = f"{problem}; episode boundaries taken from the commit record"  # in doubt, never rebuilds them
        return [*out, Problem("meta/episode_ends", taken, episodes=doubtful)]
    lengths = np.diff(disk, prepend=0)
    empty = tuple(int(i) for i in np.flatnonzero(lengths == 0))  # (a store without a commit record)
    if empty:
        out.append(Problem("meta/episode_ends", "episodes without steps", episodes=empty))
    if isinstance(records, list):
        for i, (rec, n) in enumerate(zip(records, lengths, strict=False)):
            if not isinstance(rec, dict):
                out.append(Problem("commit record", f"episode {i}'s entry is not an object", episodes=(i,)))
                continue
            got = rec.get("length")
            if got is not None and got != int(n):
                out.append(
                    Problem(
                        "commit record",
                        f"episode {i} has length {got} in the commit record, {int(n)} in meta/episode_ends",
                    )
                )
    return out


def _check_key(store: DemoStore, key: str, report: VerifyReport) -> list[Problem]:
    """Every chunk of `key` over the committed steps decodes to the right size; values finite."""
    spec, arr = store.schema.keys[key], store.array(key)
    what = f"data/{key}"
    if not fits_spec(arr, spec):
        detail = f"array is {tuple(arr.shape[1:])} {arr.dtype}, the schema says {spec.shape} {spec.dtype}"
        return [Problem(what, detail, fatal=True)]
    out = []
    n, have = store.n_steps, int(arr.shape[0])
    if have < n:
        eps = tuple(store.episodes_in(have, n))
        out.append(Problem(what, f"has {have} steps, the episodes need {n}", steps=(have, n), episodes=eps))
    rows, reader = int(arr.chunks[0]), store.chunk_reader(key)
    finite = spec.kind in ("action", "proprio") and np.issubdtype(np.dtype(spec.dtype), np.floating)
    zeros = (0,) * (arr.ndim - 1)
    files = _chunk_files(arr) if store.every_chunk else None
    for c in range(math.ceil(min(have, n) / rows)):
        lo, hi = c * rows, min((c + 1) * rows, have, n)
        eps = tuple(store.episodes_in(lo, hi))
        key_path = arr.metadata.encode_chunk_key((c, *zeros))
        if files is not None and key_path not in files:
            file = reader.chunk_path(c) if reader is not None else f"{store.path}/data/{key}/{key_path}"
            detail = "the chunk file is missing (the store writes every chunk: it was lost)"
            out.append(Problem(what, detail, str(file), (lo, hi), eps))
            report.chunks_checked += 1
            continue
        try:
            block = reader.read_chunk(c)[: hi - lo] if reader is not None else arr[lo:hi]
            if block.shape != (hi - lo, *spec.shape):
                raise ValueError(f"decoded shape {block.shape}, expected {(hi - lo, *spec.shape)}")
        except Exception as e:
            cause = e.__cause__ if isinstance(e, CorruptStoreError) and e.__cause__ is not None else e
            file = reader.chunk_path(c) if reader is not None else f"{store.path}/data/{key}/{key_path}"
            detail = f"cannot be decoded ({type(cause).__name__}: {cause})"
            out.append(Problem(what, detail, str(file), (lo, hi), eps))
            continue
        finally:
            report.chunks_checked += 1
        if finite:
            bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if bad.any():
                steps = np.flatnonzero(bad) + lo
                detail = f"non-finite values at {len(steps)} step(s), the first at step {int(steps[0])}"
                where = tuple(sorted({e for s in steps for e in store.episodes_in(int(s), int(s) + 1)}))
                out.append(Problem(what, detail, steps=(int(steps[0]), int(steps[-1]) + 1), episodes=where))
    return out


def _chunk_files(arr: Any) -> set[str]:
    """The chunk keys of `arr` that exist in its store (relative to the array, e.g. 'c/3/0/0/0')."""
    from zarr.core.sync import sync

    prefix = arr.path + "/"

    async def listed() -> list[str]:
        return [k async for k in arr.store.list_prefix(prefix)]

    return {k[len(prefix) :] for k in sync(listed())}


def format_report(report: VerifyReport) -> str:
    """A readable multi-line report of `verify_store`'s result, ending with the repair command."""
    head = f"verify     {report.path}: {report.n_episodes} episodes, {report.keys_checked} keys, "
    head += f"{report.chunks_checked} chunks decoded"
    note = []
    if not report.missing_files_checked:
        note = [
            "note       this store may leave chunks of zeros unwritten (as zarr does), so a lost chunk "
            "file reads as zeros and is not found here"
        ]
        if Path(report.path).suffix != ".zip" and report.ok:
            rewrite = rewrite_command(report.path)
            note.append(f"           (a rewrite keeping every episode writes every chunk: {rewrite})")
        elif report.repair_command() is not None:  # (a rewrite keeping them all refuses an empty episode)
            note.append("           (the repair above writes every chunk of the episodes it keeps)")
    if not report.checksums_checked:
        note.append(
            "note       zarr v2 chunks carry no checksum: a byte changed inside a chunk that still decodes "
            "reads as other values and is not found here (zarr v3 stores, the default, carry one)"
        )
    if report.ok:
        return "\n".join([head + "; no damage found", *note])
    lines = [head, f"damage     {len(report.problems)} problem(s):"]
    lines += [f"  {p.line()}" for p in report.problems]
    if report.damaged_episodes:
        lines.append(f"episodes   damaged: {_ranges(report.damaged_episodes)}")
    cmd = report.repair_advice()
    if cmd is None:
        lines.append("repair     not possible by dropping episodes: restore the store from a backup")
    else:
        lines.append(f"repair     {cmd}")
        lines.append(
            "           (rewrites the store without those episodes, crash-safe; later episodes move up)"
        )
    lines += note
    return "\n".join(lines)
