"""Convert between LeRobot datasets (format v3.0, lerobot 0.4.4) and DemoStores.

LeRobot v3.0 layout: `meta/info.json` (fps, robot_type, features), `meta/tasks.parquet` (task string
-> task_index), `meta/episodes/chunk-*/file-*.parquet` (one row per episode: length, data file,
per-camera video file and `from_timestamp`), `data/chunk-*/file-*.parquet` (one row per frame, many
episodes per file; image features are PNG bytes), `videos/<key>/chunk-*/file-*.mp4` (many episodes
concatenated per file).

Key mapping, LeRobot -> store, for datasets without our metadata:
    observation.images.X -> X (image, HWC uint8)    observation.state -> state (proprio)
    observation.Y        -> Y (proprio)             action            -> action (action)
    timestamp            -> timestamp (timestamp)   anything else     -> same name (lowdim)
A camera feature outside `observation.images.` keeps its full name. frame_index, episode_index,
index and task_index are bookkeeping and are not copied; string features are skipped. Per-step
shapes are LeRobot's (so scalars are (1,)). Each episode's task goes into its info as "task" (with
"tasks" listing them all when an episode has several), and where the dataset has LeRobot's per-frame
`next.success` its "success" (true when any frame succeeded; it is also kept as a lowdim key).

Store -> LeRobot follows LeRobot's naming (observation.state, observation.images.<cam>, action) and
carries the schema and each episode's info in `wm_stack` metadata, so that importing the export
gives back the same store; `wm.data.convert.lerobot_meta` describes the layout.

Reading does not go through `LeRobotDataset.__getitem__`: parquet files are read whole with pyarrow,
PNG images decoded exactly with PIL, and videos decoded with PyAV, one seek per episode.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wm.data.convert.lerobot_meta import (
    BOOKKEEPING,
    EXACT_PREFIX,
    SUCCESS,
    ExportPlan,
    carried_episode_info,
    image_feature_spec,
    infer_key,
    plan_export,
    positive_rate,
    read_carried,
    relative_timestamps,
    warn,
    write_carried,
)
from wm.data.errors import AppendError, CorruptStoreError, NotAStoreError, SchemaError
from wm.data.layout import rewrite_command
from wm.data.places import beside, check_destination, move_into_place
from wm.data.schema import KeySpec, Schema
from wm.data.store import DemoStore
from wm.options import is_real, is_whole
from wm.sched import normal_priority

WRITE_STEPS = 256  # frames decoded and appended at a time, bounding memory for long image episodes
EPISODES_FILE = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"  # LeRobot v3.0's


def is_lerobot_dataset(path: str | os.PathLike) -> bool:
    """True if `path` is a directory holding `meta/info.json`."""
    return (Path(path) / "meta" / "info.json").is_file()


# ---------------------------------------------------------------------- LeRobot -> store
def lerobot_to_store(
    src_root: str | os.PathLike, dst: str | os.PathLike, *, zarr_format: int = 3, overwrite: bool = False
) -> DemoStore:
    """Convert the local LeRobot v3.0 dataset at `src_root` into a new store at `dst` (returned read-only).

    The store is written under a temporary name beside `dst` and renamed into place when complete.
    Raises NotAStoreError for a directory that is not a LeRobot v3.0 dataset. A dataset exported by
    `store_to_lerobot` comes back with its schema, key names, shapes, dtypes and episode info.
    """
    src, dst = Path(src_root), Path(dst)
    check_destination(dst, overwrite, [src])
    info = _load_info(src)
    fps = _fps(info, src)
    episodes = _load_episodes(src)
    _check_totals(src, info, episodes)
    tasks = _load_tasks(src)
    schema, features = read_carried(src, info) or _schema_from_info(info, src, tasks)
    tmp = beside(dst, "converting")
    store = DemoStore.create(tmp, schema, zarr_format=zarr_format, overwrite=True)
    videos = _VideoFrames(fps)
    try:
        for ep, part, data_file in _iter_episodes(src, info, episodes, features):
            with _at_source(tmp, data_file, ep, features), store.begin_episode() as writer:
                for lo in range(0, part.num_rows, WRITE_STEPS):
                    rows = part.slice(lo, WRITE_STEPS)
                    block = _read_rows(src, info, ep, rows, features, videos, data_file)
                    writer.add_steps({k: v.reshape(len(v), *schema.keys[k].shape) for k, v in block.items()})
                info_ = carried_episode_info(ep)  # exact, when this dataset is our export
                if info_ is None:
                    info_ = _episode_info(ep, part, tasks)
                writer.end(info_)
    except BaseException:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        videos.close()
    store.close()
    move_into_place(tmp, dst)
    return DemoStore.open(dst)


def lerobot_replaceable(path: Path) -> bool:
    """What an export's overwrite may delete: an empty folder or a LeRobot dataset, never another file
    or folder (a user's data, or the very store being exported, given as the path by mistake)."""
    if not path.is_dir():
        return False
    return not any(path.iterdir()) or (path / "meta" / "info.json").is_file()


@contextlib.contextmanager
def _at_source(tmp: Path, data_file: Path, ep: dict[str, Any], features: dict[str, str]) -> Iterator[None]:
    """An AppendError of the episode written inside names where its data comes from (data file, episode
    and LeRobot feature), not the hidden store being written."""
    try:
        yield
    except AppendError as e:
        msg = re.sub(r"^episode \d+, ", "", str(e).replace(f"{tmp}: ", ""))  # the store's episode number
        for key, name in features.items():
            if key != name:
                msg = msg.replace(f"key {key!r}", f"key {key!r} (LeRobot feature {name!r})")
        raise AppendError(f"{data_file}: episode {ep['episode_index']}: {msg}") from e


def _load_info(src: Path) -> dict[str, Any]:
    path = src / "meta" / "info.json"
    if not path.is_file():
        raise NotAStoreError(f"{src}: not a LeRobot dataset (no meta/info.json)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotAStoreError(f"{path}: malformed LeRobot info.json ({type(e).__name__}: {e})") from e
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict) or "fps" not in info:
        raise NotAStoreError(f"{path}: not a LeRobot info.json (it lacks 'features' or 'fps')")
    bad = next((name for name, ft in info["features"].items() if not isinstance(ft, dict)), None)
    if bad is not None:
        raise CorruptStoreError(
            f"{path}: LeRobot feature {bad!r} is {str(info['features'][bad])[:40]!r}, not a mapping of its "
            "dtype, shape and names"
        )
    version = str(info.get("codebase_version", "?"))
    if not version.startswith("v3."):
        raise NotAStoreError(
            f"{path}: LeRobot dataset version {version} is not supported (need v3.0; convert older ones with "
            "lerobot.datasets.v30.convert_dataset_v21_to_v30)"
        )
    return info


def _load_episodes(src: Path) -> list[dict[str, Any]]:
    """Per-episode rows of meta/episodes (stats columns left out), in episode order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = src / "meta" / "episodes"
    paths = sorted(directory.glob("*/*.parquet"))
    if not paths:
        raise NotAStoreError(f"{src}: LeRobot dataset has no episode metadata (meta/episodes/*/*.parquet)")
    try:
        cols = [[c for c in pq.read_schema(p).names if not c.startswith("stats/")] for p in paths]
        rows = pa.concat_tables([pq.read_table(p, columns=c) for p, c in zip(paths, cols, strict=True)])
    except (OSError, pa.ArrowException) as e:
        raise CorruptStoreError(f"{directory}: cannot read LeRobot episode metadata: {e}") from e
    if "episode_index" not in rows.column_names:
        raise CorruptStoreError(f"{directory}: LeRobot episode metadata has no 'episode_index' column")
    rows = rows.to_pylist()
    bad = next((r["episode_index"] for r in rows if not is_whole(r["episode_index"])), False)
    if bad is not False:
        raise CorruptStoreError(
            f"{directory}: LeRobot episode metadata has an episode_index of {bad!r}, not a whole number"
        )
    return sorted(rows, key=lambda r: r["episode_index"])


def _check_totals(src: Path, info: dict[str, Any], episodes: list[dict[str, Any]]) -> None:
    """info.json's `total_episodes` and `total_frames`, where given, agree with meta/episodes: the
    conversion walks its rows, so an episode whose row is lost would be left out without a word."""
    listed = {"total_episodes": len(episodes)}
    lengths = [ep.get("length") for ep in episodes]
    if all(is_whole(n) for n in lengths):  # else the episode's own check names the bad length
        listed["total_frames"] = sum(int(n) for n in lengths)
    wrong = [
        f"{name} {info[name]} (meta/episodes lists {n})"
        for name, n in listed.items()
        if is_whole(info.get(name)) and int(info[name]) != n
    ]
    if wrong:
        raise CorruptStoreError(
            f"{src}: LeRobot meta/info.json says {' and '.join(wrong)}: meta/episodes lacks rows, or "
            "info.json is stale"
        )


def _load_tasks(src: Path) -> dict[int, str]:
    """{task_index: task string} from meta/tasks.parquet (pandas writes the task strings as its index)."""
    import pyarrow.parquet as pq

    path = src / "meta" / "tasks.parquet"
    if not path.is_file():  # each frame's task would be only its number; LeRobot refuses such a dataset
        raise CorruptStoreError(f"{path}: missing (a LeRobot v3.0 dataset's task strings)")
    df = pq.read_table(path).to_pandas()
    if "task_index" not in df.columns:
        raise CorruptStoreError(f"{path}: LeRobot task metadata has no 'task_index' column")
    if "task" in df.columns:
        return {int(i): str(t) for i, t in zip(df["task_index"], df["task"], strict=True)}
    return {int(i): str(t) for t, i in zip(df.index, df["task_index"], strict=True)}


def _fps(info: dict[str, Any], src: Path) -> float:
    """info.json's `fps`, a positive number."""
    fps = positive_rate(info["fps"])
    if fps is None:
        raise SchemaError(f"{src / 'meta' / 'info.json'}: fps {info['fps']!r} is not a positive number")
    return fps


def _schema_from_info(
    info: dict[str, Any], src: Path, tasks: dict[int, str]
) -> tuple[Schema, dict[str, str]]:
    """The store schema and {store key: LeRobot feature name}."""
    keys: dict[str, KeySpec] = {}
    features: dict[str, str] = {}
    for name, ft in info["features"].items():
        if name in BOOKKEEPING or name.startswith(EXACT_PREFIX):  # (our export's exact timestamps: without
            continue  # the carried schema, the dataset's own timestamp stands for them)
        dtype = str(ft.get("dtype"))
        if dtype == "string":
            warn(f"{src}: LeRobot string feature {name!r} is not copied")
            continue
        key, kind = infer_key(name, dtype)
        if key in features:
            raise SchemaError(
                f"{src}: LeRobot features {features[key]!r} and {name!r} both map to store key {key!r}"
            )
        try:
            if kind == "image":
                spec = image_feature_spec(ft)
            else:
                shape = tuple(int(s) for s in ft["shape"])
                names = _dim_names(ft.get("names"))
                ok = names is not None and len(shape) >= 1 and len(names) == shape[-1]
                spec = KeySpec(shape=shape, dtype=dtype, kind=kind, names=tuple(names) if ok else ())
        except (TypeError, KeyError, ValueError, SchemaError) as e:
            raise SchemaError(f"{src}/meta/info.json: feature {name!r} cannot be stored: {e}") from e
        keys[key], features[key] = spec, name
    task_names = set(tasks.values())
    schema = Schema(
        keys=keys,
        fps=_fps(info, src),
        robot=str(info.get("robot_type") or ""),
        task=task_names.pop() if len(task_names) == 1 else "",
    )
    return schema, features


def _dim_names(names: Any) -> list[str] | None:
    """A feature's per-dimension names: a list of strings, or LeRobot's older form, a mapping of one axis
    to such a list (`{"motors": ["shoulder_pan", ...]}`); None for anything else."""
    if isinstance(names, dict) and len(names) == 1:
        (names,) = names.values()
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _episode_info(ep: dict[str, Any], part: Any, tasks: dict[int, str]) -> dict[str, Any]:
    """Task names, source index and, where the dataset has LeRobot's per-frame `next.success`
    (PushT, gym-style sets), the episode's success: true when any of its frames succeeded. An episode
    whose frames have several tasks keeps which frame had which: `task_spans`, [[task, frames], ...]."""
    frame_tasks = [tasks.get(int(t), str(int(t))) for t in part.column("task_index").to_numpy()]
    names = list(dict.fromkeys(frame_tasks))
    info: dict[str, Any] = {"task": names[0] if names else "", "source_episode": int(ep["episode_index"])}
    if len(names) > 1:
        info["tasks"] = names
        info["task_spans"] = [[name, len(list(run))] for name, run in itertools.groupby(frame_tasks)]
    if SUCCESS in part.column_names:
        where = f"episode {ep['episode_index']}"
        flags = _column_to_numpy(part.column(SUCCESS), (), "bool", repr(SUCCESS), where)
        info["success"] = bool(np.any(flags))
    return info


def _iter_episodes(
    src: Path, info: dict[str, Any], episodes: list[dict[str, Any]], features: dict[str, str]
) -> Iterator[tuple[dict[str, Any], Any, Path]]:
    """(episode row, its frames as an arrow table, data file) for each episode, reading each data
    parquet file once. A data file holding frames of an episode meta/episodes does not list is refused:
    those frames would be left out without a word."""
    import pyarrow.parquet as pq

    feats = info["features"]
    columns = [n for n in features.values() if feats[n]["dtype"] != "video"]
    columns = list(dict.fromkeys([*columns, "timestamp", "episode_index", "task_index"]))
    listed = {int(ep["episode_index"]) for ep in episodes}
    current, table, file_rows = None, None, {}
    for ep in episodes:
        data_file = _data_file(src, info, ep)
        if data_file != current:
            try:
                missing = [c for c in columns if c not in pq.read_schema(data_file).names]
                if missing:  # pyarrow's own line is the whole schema, and names no feature
                    declared = set(missing) <= set(feats)
                    whose = "meta/info.json declares" if declared else "every LeRobot data file has"
                    raise CorruptStoreError(
                        f"{data_file}: LeRobot data parquet has no column {', '.join(map(repr, missing))}, "
                        f"which {whose}"
                    )
                table = pq.read_table(data_file, columns=columns)
            except (OSError, ValueError) as e:
                raise CorruptStoreError(f"{data_file}: cannot read LeRobot data parquet: {e}") from e
            current, file_rows = data_file, _rows_by_episode(table)
            unlisted = sorted(set(file_rows) - listed)
            if unlisted:
                raise CorruptStoreError(
                    f"{data_file}: holds frames of episode(s) {unlisted}, which meta/episodes does not list"
                )
        idx = int(ep["episode_index"])
        rows = file_rows.get(idx, np.zeros(0, dtype=np.int64))
        if len(rows) != int(_episode_field(src, ep, "length")):
            raise CorruptStoreError(
                f"{data_file}: episode {idx} has {len(rows)} rows, meta/episodes says {ep['length']}"
            )
        yield ep, table.take(rows), data_file


def _data_file(src: Path, info: dict[str, Any], ep: dict[str, Any]) -> Path:
    """The data parquet file of the meta/episodes row `ep`, from info.json's `data_path` template."""
    template = info.get("data_path")
    if not isinstance(template, str):
        raise CorruptStoreError(
            f"{src / 'meta' / 'info.json'}: LeRobot info.json has no 'data_path' (the name template of "
            "its data files)"
        )
    chunk, file = _episode_field(src, ep, "data/chunk_index"), _episode_field(src, ep, "data/file_index")
    try:
        return _inside(src, template.format(chunk_index=chunk, file_index=file), "data_path")
    except (KeyError, IndexError, ValueError) as e:
        raise CorruptStoreError(
            f"{src / 'meta' / 'info.json'}: LeRobot data_path {template!r} is not a file name template "
            f"({type(e).__name__}: {e})"
        ) from e


def _inside(src: Path, name: str, what: str) -> Path:
    """`src / name`, refused (CorruptStoreError) when it leads out of the dataset (`../`, an absolute
    path): metadata names the files a conversion reads, and nothing outside the dataset is its."""
    path = src / name
    if not path.resolve().is_relative_to(src.resolve()):
        raise CorruptStoreError(f"{src}: LeRobot {what} names {name!r}, outside the dataset")
    return path


def _episode_field(src: Path, ep: dict[str, Any], field: str) -> Any:
    """`field` of the meta/episodes row `ep`; a missing one names the file that lacks it."""
    value = ep.get(field)
    if value is None:
        raise CorruptStoreError(
            f"{_episodes_file(src, ep)}: LeRobot episode metadata has no {field!r} "
            f"(episode {ep.get('episode_index')})"
        )
    return value


def _episodes_file(src: Path, ep: dict[str, Any]) -> Path:
    """The meta/episodes parquet file holding the row `ep`, or its folder where the row does not say."""
    folder = src / "meta" / "episodes"
    try:
        path = src / EPISODES_FILE.format(
            chunk_index=ep["meta/episodes/chunk_index"], file_index=ep["meta/episodes/file_index"]
        )
    except (KeyError, TypeError, ValueError):
        return folder
    return path if path.is_file() else folder


def _read_rows(
    src: Path,
    info: dict[str, Any],
    ep: dict[str, Any],
    part: Any,
    features: dict[str, str],
    videos: _VideoFrames,
    data_file: Path,
) -> dict[str, np.ndarray]:
    """Rows `part` (an arrow table) of episode `ep` as {store key: (T, ...) array}."""
    feats, idx = info["features"], int(ep["episode_index"])
    out = {}
    for key, name in features.items():
        dtype = feats[name]["dtype"]
        if dtype == "video":
            template = info.get("video_path")
            if not isinstance(template, str):
                raise CorruptStoreError(
                    f"{src / 'meta' / 'info.json'}: LeRobot info.json has no 'video_path' (the name template "
                    f"of its video files), which video feature {name!r} needs"
                )
            chunk = _episode_field(src, ep, f"videos/{name}/chunk_index")
            file = _episode_field(src, ep, f"videos/{name}/file_index")
            try:
                path = _inside(
                    src, template.format(video_key=name, chunk_index=chunk, file_index=file), "video_path"
                )
            except (KeyError, IndexError, ValueError) as e:
                raise CorruptStoreError(
                    f"{src / 'meta' / 'info.json'}: LeRobot video_path {template!r} is not a file name "
                    f"template ({type(e).__name__}: {e})"
                ) from e
            start = _episode_field(src, ep, f"videos/{name}/from_timestamp")
            if not is_real(start):
                raise CorruptStoreError(
                    f"{_episodes_file(src, ep)}: LeRobot episode {idx}'s videos/{name}/from_timestamp is "
                    f"{start!r}, not a number"
                )
            start = float(start)
            ts = part.column("timestamp").to_numpy()
            shape = image_feature_spec(feats[name]).shape
            out[key] = videos.read(path, start, ts, shape, f"key {name!r}, episode {idx}")
        elif dtype == "image":
            where = f"{data_file}: key {name!r}, episode {idx}"
            out[key] = _decode_images(part.column(name), image_feature_spec(feats[name]).shape, src, where)
        else:
            feature, shape = f"{src / 'meta' / 'info.json'}: feature {name!r}", tuple(feats[name]["shape"])
            where = f"{data_file} (episode {idx})"
            out[key] = _column_to_numpy(part.column(name), shape, dtype, feature, where)
    return out


def _rows_by_episode(table: Any) -> dict[int, np.ndarray]:
    ep_ids = table.column("episode_index").to_numpy()
    order = np.argsort(ep_ids, kind="stable")
    uniq, starts = np.unique(ep_ids[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    return {int(u): order[s:e] for u, s, e in zip(uniq, starts, bounds, strict=True)}


def _column_to_numpy(col: Any, shape: tuple[int, ...], dtype: str, feature: str, where: str) -> np.ndarray:
    """A (fixed-size) list or scalar arrow column as a (T, *shape) array. `feature` names the feature
    whose shape and dtype these are, `where` the data it comes from, for the error when they differ."""
    import pyarrow as pa

    arr = col.combine_chunks()
    n = len(arr)
    nested = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    while any(is_list(arr.type) for is_list in nested):
        arr = arr.flatten()
    try:
        values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{feature} is {dtype}, but {where} holds {col.type} values ({e})") from e
    if values.size != n * math.prod(shape):
        per = f"{values.size / n:g}"  # n > 0: a column of no rows fits any shape
        raise SchemaError(f"{feature} has shape {list(shape)}, but {where} holds {per} values per frame")
    return values.reshape(n, *shape)


def _decode_images(col: Any, shape: tuple[int, ...], src: Path, where: str) -> np.ndarray:
    """Decode a LeRobot image column ({bytes, path} structs holding PNGs) exactly into (T, H, W, C) uint8."""
    from PIL import Image

    arr = col.combine_chunks()
    blobs, paths = arr.field("bytes").to_pylist(), arr.field("path").to_pylist()
    out = np.empty((len(blobs), *shape), dtype=np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[shape[-1]]
    for i, (blob, path) in enumerate(zip(blobs, paths, strict=True)):
        try:
            with Image.open(
                io.BytesIO(blob) if blob is not None else _inside(src, path, "image path")
            ) as img:
                out[i] = np.asarray(img.convert(mode)).reshape(shape)
        except (OSError, ValueError, TypeError) as e:
            raise CorruptStoreError(
                f"{where}, frame {i}: cannot decode image ({type(e).__name__}: {e})"
            ) from e
    return out


class _VideoFrames:
    """Decodes the frames of one episode from a LeRobot mp4 (episodes concatenated) with PyAV."""

    def __init__(self, fps: float) -> None:
        self.tol = 0.5 / fps  # frames are 1/fps apart, so at most one lies this close to a query time
        self._open: dict[Path, Any] = {}

    def read(self, path: Path, start: float, ts: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        """Frames at times `start + ts` (seconds) as (T, H, W, C) uint8; `what` names key and episode.

        Each row gets the decoded frame nearest its time, the earlier one on a tie, as LeRobot's own
        decoding does; rows that share a time get the same frame.
        """
        import av

        where = f"{path}: {what}"
        targets = start + np.asarray(ts, dtype=np.float64)
        out = np.empty((len(targets), *shape), dtype=np.uint8)
        best = np.full(len(targets), self.tol)  # (T,) distance to the frame each row holds so far
        fmt = "gray" if shape[-1] == 1 else "rgba" if shape[-1] == 4 else "rgb24"
        try:
            container = self._container(path)
            stream = container.streams.video[0]
            first = max(int((targets.min() - self.tol) / stream.time_base), 0)
            container.seek(first, stream=stream, backward=True)
            last = targets.max() + self.tol
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time > last:
                    break
                dist = np.abs(targets - frame.time)
                nearer = dist < best  # every row this frame is the nearest to so far, within tolerance
                if nearer.any():
                    out[nearer] = frame.to_ndarray(format=fmt).reshape(shape)
                    best[nearer] = dist[nearer]
        except (OSError, ValueError, av.FFmpegError) as e:
            raise CorruptStoreError(f"{where}: cannot decode video ({type(e).__name__}: {e})") from e
        got = best < self.tol
        if not got.all():
            miss = targets[~got]
            raise CorruptStoreError(
                f"{where}: no video frame near {len(miss)} frame time(s), the first at {miss[0]:.4f} s"
            )
        return out

    def _container(self, path: Path) -> Any:
        import av

        if path not in self._open:
            if not path.is_file():
                raise CorruptStoreError(f"{path}: LeRobot video file is missing")
            self._open[path] = av.open(str(path))
            self._open[path].streams.video[0].thread_type = "AUTO"
        return self._open[path]

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open.clear()


# ---------------------------------------------------------------------- store -> LeRobot
def store_to_lerobot(
    src_store: DemoStore | str | os.PathLike,
    dst_root: str | os.PathLike,
    *,
    repo_id: str = "local/converted",
    use_videos: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the store `src_store` (a DemoStore or its path) as a LeRobot v3.0 dataset at `dst_root`.

    Image keys are stored as PNG images, or as AV1 video with `use_videos=True`. Each episode's task
    is its info "task", else the schema's task, else "default". LeRobot's `timestamp` is seconds since
    the episode's first step (video mode: the frame_index / fps grid LeRobot finds frames by); the
    store's own values ride along exactly when that column cannot reproduce them. Keys LeRobot cannot
    hold are left out with a warning line; the schema and episode info are carried (see
    `wm.data.convert.lerobot_meta`).
    """
    dst = Path(dst_root)
    source = src_store.path if isinstance(src_store, DemoStore) else src_store
    not_ours = (
        "is neither empty nor a LeRobot dataset (no meta/info.json); overwrite replaces only those: "
        "choose another path"
    )
    check_destination(dst, overwrite, [source], lerobot_replaceable, not_ours)
    store = DemoStore.open(src_store) if not isinstance(src_store, DemoStore) else src_store
    tmp = beside(dst, "converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if store.n_episodes == 0:  # LeRobot writes a dataset of none that it cannot load
            raise SchemaError(f"{store.path}: has no episodes; there is nothing to export")
        empty = np.flatnonzero(store.episode_lengths() == 0).tolist()
        if empty:  # a Diffusion Policy store's repeated episode end; LeRobot's own refusal names nothing
            raise SchemaError(
                f"{store.path}: episode(s) {empty} have no steps, which a LeRobot dataset cannot hold; "
                f"remove them first: {rewrite_command(store.path, empty)}"
            )
        with normal_priority():  # LeRobot's AV1 encoder would run its threads at real-time priority
            _write_lerobot(store, tmp, repo_id, use_videos)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if store is not src_store:
            store.close()
    move_into_place(tmp, dst)
    return dst


def _write_lerobot(store: DemoStore, dst: Path, repo_id: str, use_videos: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a conversion never needs the hub
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    schema = store.schema
    plan = plan_export(store, use_videos)
    fps = schema.fps
    has_images = bool(schema.keys_of_kind("image"))
    ds = LeRobotDataset.create(
        repo_id,
        int(round(fps)) if abs(fps - round(fps)) < 1e-6 else fps,
        plan.features,
        root=dst,
        robot_type=schema.robot or None,
        use_videos=use_videos,
        image_writer_threads=4 if has_images and not use_videos else 0,
        # lerobot 0.4.4's streaming encoder gives a one-frame episode no stats, and its metadata write
        # then fails (ArrowInvalid): such a store encodes each episode after it is written
        streaming_encoding=use_videos and int(store.episode_lengths().min(initial=2)) >= 2,
    )
    infos = []
    try:
        for i in range(store.n_episodes):
            infos.append(_write_episode(ds, store, i, plan, use_videos))
    except BaseException:
        with contextlib.suppress(Exception):  # its own failure would replace the error that matters
            ds.stop_image_writer()
            ds.finalize()
        raise
    ds.stop_image_writer()
    ds.finalize()
    write_carried(dst, schema, plan, infos)


def _write_episode(ds: Any, store: DemoStore, i: int, plan: ExportPlan, use_videos: bool) -> dict[str, Any]:
    """Add episode `i` to the LeRobot dataset `ds`; returns its info (as carried in the metadata). Its
    steps are read WRITE_STEPS at a time (a long multi-camera episode read whole took tens of GB)."""
    info = store.episode_info(i)
    info.pop("length", None)  # the store's commit record adds it back
    task = str(info.get("task") or store.schema.task or "default")
    span = store.episode_slice(i)
    n = span.stop - span.start
    frame_tasks = _frame_tasks(info.get("task_spans"), n) or [task] * n
    written = {key: name for key, name in plan.names.items() if name != "timestamp"}
    for lo in range(0, n, WRITE_STEPS):
        rows = slice(span.start + lo, min(span.start + lo + WRITE_STEPS, span.stop))
        part = {key: store.read(key, rows, episode=i) for key in written}
        for key, values in part.items():  # (the writer goes through int64: an OverflowError traceback)
            if values.dtype == np.uint64 and values.size and int(values.max()) >= 2**63:
                raise SchemaError(
                    f"{store.path}: key {key!r} holds uint64 values of 2**63 or more (episode {i}), which "
                    "LeRobot's writer cannot take (it goes through int64)"
                )
        for t in range(rows.stop - rows.start):
            frame: dict[str, Any] = {"task": frame_tasks[lo + t]}
            for key, name in written.items():
                frame[name] = _frame_value(part[key][t], plan.features[name])
            ds.add_frame(frame)
    if plan.timestamp_key is not None:  # add_frame refuses a `timestamp` key in 0.4.4
        stamps = store.read(plan.timestamp_key, span, episode=i)
        ts = relative_timestamps(stamps.reshape(n), store.schema.fps, use_videos)
        ds.episode_buffer["timestamp"] = [float(x) for x in ts]
    _squeeze_scalar_features(ds, plan.features)
    ds.save_episode()
    return info


def _frame_tasks(spans: Any, n: int) -> list[str] | None:
    """Each of the n frames' task from an episode's `task_spans` ([[task, frames], ...], as a LeRobot
    import records them); None where there are none, or they do not cover the n frames exactly."""
    if not isinstance(spans, list):
        return None
    frames: list[str] = []
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and isinstance(span[1], int) and span[1] > 0):
            return None
        frames += [str(span[0])] * span[1]
    return frames if len(frames) == n else None


def _squeeze_scalar_features(ds: Any, features: dict[str, dict[str, Any]]) -> None:
    """LeRobot 0.4.4 validates (1,)-shaped features as arrays in add_frame but writes them as a scalar
    column in save_episode, which fails on (1,) arrays: make the buffered values 0-d before saving."""
    for name, ft in features.items():
        if ft["dtype"] not in ("image", "video") and tuple(ft["shape"]) == (1,):
            ds.episode_buffer[name] = [np.asarray(x).reshape(()) for x in ds.episode_buffer[name]]


def _frame_value(v: np.ndarray, feature: dict[str, Any]) -> Any:
    """What add_frame takes: the HWC array for the streaming video encoder, a PIL image for image
    features (so an (H, W, C) array with H == 3 is not taken for (C, H, W)), else the array."""
    from PIL import Image

    if feature["dtype"] == "video":
        return v
    if feature["dtype"] == "image":
        return Image.fromarray(v.squeeze(-1) if v.shape[-1] == 1 else v)
    return v.reshape(feature["shape"]).astype(feature["dtype"], copy=False)  # float16 goes as float32
