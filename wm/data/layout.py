"""The store's commit record (the layout in `wm.data.store`'s docstring): the names of its parts,
writing each episode's info entry, reading the record and `meta/episode_ends` back with every
problem said in one line, and the `wm-info` commands those lines name to repair a store."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from wm.data.errors import CorruptStoreError
from wm.jsonvalues import json_native
from wm.options import override

SCHEMA_ATTR = "wm_schema"
COMMITTED_ATTR = "wm_committed"  # the number of committed episodes: writing it commits an episode
INFO_ARRAY = "wm_episode_info"  # each episode's info, one JSON string an episode
INFO_CHUNK = 256  # entries a chunk of INFO_ARRAY: what a commit rewrites
EPISODES_ATTR = "wm_episodes"  # format 1: every episode's info in the root attributes (the commit)
EVERY_CHUNK_ATTR = "wm_every_chunk"  # true: every chunk of committed steps is a file (module docstring)
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def commit_lengths(records: Any) -> list[int] | None:
    """Episode lengths from a commit record, or None when it does not hold a length for each (positive, or
    0 where an adopted store had an empty episode)."""
    if not isinstance(records, list):
        return None
    lengths = [r.get("length") if isinstance(r, dict) else None for r in records]
    if not all(type(n) is int and n >= 0 for n in lengths) or not any(lengths):
        return None
    return lengths


def info_entry(record: Mapping[str, Any]) -> str:
    """An episode's info as INFO_ARRAY holds it (`read_commit` reads it back)."""
    return json.dumps(record, separators=(",", ":"))


def create_info_array(group: zarr.Group, records: Sequence[Any]) -> None:
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
        entries[:] = np.array([info_entry(r) for r in records], dtype=object)


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


def _recorded_empty(record: Any) -> bool:
    """A commit record entry of an episode without steps: one that another tool's store held when this
    one adopted it (`DemoStore._repair`)."""
    return isinstance(record, dict) and type(record.get("length")) is int and record["length"] == 0


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
