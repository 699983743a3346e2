"""LeRobot naming for store keys, and the store metadata a LeRobot export carries so that importing
it gives back the same store.

Naming (store -> LeRobot; a key already starting with `observation.` keeps its name):

    image key X                  observation.images.X     (uint8 only; in video mode, frames
                                                          too small for AV1 or not RGB stay PNG)
    the only proprio key         observation.state        (several: observation.<key>)
    the only action key          action                   (several: their own names)
    the timestamp key            LeRobot's `timestamp`    (seconds since the episode's first step)
    anything else                its own name

Carried metadata, all under the namespace `wm_stack` (LeRobot ignores what it does not know, and
`LeRobotDataset` still loads the export):

    meta/info.json  "wm_stack": {"version": 1,
                                 "schema": Schema.to_dict() of the exported keys (kinds, shapes,
                                           dtypes, units, names, fps, action space, robot, task),
                                 "features": {store key: LeRobot feature name}}
    meta/episodes/*/*.parquet    column "wm_stack/info": each episode's info (success, notes, task,
                                 anything) as a JSON string
    feature "wm_stack.<key>"     the timestamp key's exact values, written only when LeRobot's own
                                 float32 `timestamp` (relative, on the 1/fps grid in video mode)
                                 cannot reproduce them, e.g. float64 monotonic clock readings

Importing a dataset with this metadata restores the schema, key names, shapes (a scalar key is
(1,) in LeRobot, () in the store), dtypes and episode info exactly; without it (or when it no longer
matches the dataset's features) the schema is inferred from LeRobot's features.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wm.data.errors import SchemaError
from wm.data.schema import KeySpec, Schema
from wm.data.store import DemoStore

META_KEY = "wm_stack"
META_VERSION = 1
EPISODE_INFO_COLUMN = "wm_stack/info"
EXACT_PREFIX = "wm_stack."
IMAGES_PREFIX = "observation.images."
OBS_PREFIX = "observation."
STATE = "observation.state"
SUCCESS = "next.success"  # LeRobot's per-frame success flag (gym environments)
BOOKKEEPING = ("frame_index", "episode_index", "index", "task_index")
_IMAGE_NAMES = ["height", "width", "channels"]
# Smallest frames LeRobot 0.4.4's SVT-AV1 encoder takes: narrower ones kill the process (SIGFPE).
VIDEO_MIN_W, VIDEO_MIN_H = 32, 8

log = logging.getLogger(__name__)


def warn(message: str) -> None:
    """One line on stderr (logging's last-resort handler when the app configures none)."""
    log.warning("warning: %s", message)


def positive_rate(raw: Any) -> float | None:
    """A source's frame rate (`fps`, `control_freq`) as a positive finite number; None where it is not one
    (a string, a bool, 0, negative, NaN)."""
    if isinstance(raw, bool):
        return None
    try:
        rate = float(raw)
    except (TypeError, ValueError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


@dataclass
class ExportPlan:
    """How a store's keys become LeRobot features."""

    names: dict[str, str] = field(default_factory=dict)  # store key -> LeRobot feature ("timestamp" too)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)  # for LeRobotDataset.create
    timestamp_key: str | None = None  # the store key behind LeRobot's `timestamp` column
    videos: int = 0  # image keys written as video


def relative_timestamps(ts: np.ndarray, fps: float, use_videos: bool) -> np.ndarray:
    """LeRobot's `timestamp` column for one episode's store timestamps (T,): seconds since its first
    step as float32, or the 1/fps grid in video mode (LeRobot finds video frames by timestamp)."""
    if use_videos:
        return (np.arange(len(ts)) / fps).astype(np.float32)
    return (np.asarray(ts, np.float64) - float(ts[0])).astype(np.float32)


def plan_export(store: DemoStore, use_videos: bool) -> ExportPlan:
    """Feature names and specs for `store`; keys LeRobot cannot hold are left out with a warning."""
    schema, plan = store.schema, ExportPlan()
    proprio, actions = schema.keys_of_kind("proprio"), schema.keys_of_kind("action")
    plan.timestamp_key = _timestamp_key(schema)
    for key, spec in schema.keys.items():
        dtype = np.dtype(spec.dtype)
        if spec.kind == "image":
            if dtype != np.uint8:
                warn(f"{store.path}: image key {key!r} is {dtype}, LeRobot images are uint8: not exported")
                continue
            name = key if key.startswith(OBS_PREFIX) else IMAGES_PREFIX + key
            h, w, c = spec.shape
            fits = c == 3 and h >= VIDEO_MIN_H and w >= VIDEO_MIN_W and h % 2 == 0 and w % 2 == 0
            whole_fps = abs(schema.fps - round(schema.fps)) < 1e-6
            video = use_videos and fits and whole_fps
            if use_videos and not fits:
                warn(
                    f"{store.path}: image key {key!r} {spec.shape} is stored as PNG images: LeRobot's AV1 "
                    f"video takes RGB frames of even sizes, at least {VIDEO_MIN_W} px wide and {VIDEO_MIN_H} "
                    "px high (an odd width came back with its last column off by up to half the range)"
                )
            elif use_videos and not whole_fps:
                warn(
                    f"{store.path}: image key {key!r} is stored as PNG images: the store's {schema.fps:g} "
                    "fps is not a whole number, and LeRobot's video encoder takes whole frame rates"
                )
            plan.videos += video
            feature = {"dtype": "video" if video else "image", "shape": spec.shape, "names": _IMAGE_NAMES}
        elif not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            warn(f"{store.path}: key {key!r} ({spec.kind}, {dtype}) is not numeric: not exported")
            continue
        else:
            if key == plan.timestamp_key:
                name = (
                    "timestamp" if _lerobot_timestamp_is_exact(store, key, use_videos) else EXACT_PREFIX + key
                )
            elif spec.kind == "proprio" and not key.startswith(OBS_PREFIX):
                name = STATE if len(proprio) == 1 else OBS_PREFIX + key
            elif spec.kind == "action" and len(actions) == 1:
                name = "action"
            else:
                name = key
            dtype_ = lerobot_dtype(spec.dtype)
            if len(spec.shape) > 1:  # flat: LeRobot 0.4.4's statistics of a (9, 2) feature were (2,)-shaped,
                # and (9, 2) for an episode of one step, which then failed to merge; the carried schema
                # gives the shape back on the way in
                feature = {"dtype": dtype_, "shape": (math.prod(spec.shape),), "names": None}
            else:
                feature = {"dtype": dtype_, "shape": spec.shape or (1,), "names": list(spec.names) or None}
        reserved = name in (*BOOKKEEPING, "task") or (name == "timestamp" and key != plan.timestamp_key)
        if reserved or name in plan.names.values():
            raise SchemaError(f"store key {key!r} maps to LeRobot feature {name!r}, which is already taken")
        plan.names[key] = name
        if name != "timestamp":  # LeRobot makes that column itself
            plan.features[name] = feature
    if plan.videos:
        warn(f"{store.path}: video mode stores camera frames lossily (AV1); use video=false for exact frames")
    return plan


def _timestamp_key(schema: Schema) -> str | None:
    """The one-value-per-step timestamp key behind LeRobot's `timestamp` ("timestamp" first)."""
    keys = [k for k in schema.keys_of_kind("timestamp") if math.prod(schema.keys[k].shape) == 1]
    return "timestamp" if "timestamp" in keys else (keys[0] if keys else None)


def _lerobot_timestamp_is_exact(store: DemoStore, key: str, use_videos: bool) -> bool:
    """Whether LeRobot's float32 `timestamp` column gives back every stored value of `key` exactly."""
    if store.schema.keys[key].dtype != "float32":
        return False
    ts = store.read(key, slice(0, store.n_steps)).reshape(-1)
    for i in range(store.n_episodes):
        sl = store.episode_slice(i)
        if not np.array_equal(relative_timestamps(ts[sl], store.schema.fps, use_videos), ts[sl]):
            return False
    return True


# ---------------------------------------------------------------------- writing and reading
def write_carried(root: Path, schema: Schema, plan: ExportPlan, infos: list[dict[str, Any]]) -> None:
    """Add the `wm_stack` metadata to the finished LeRobot dataset at `root` (each file replaced by a
    rename, inside the temporary directory the export is written to)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    exported = Schema.from_dict(
        {**schema.to_dict(), "keys": {k: schema.keys[k].to_dict() for k in plan.names}}
    )
    path = root / "meta" / "info.json"
    info = json.loads(path.read_text())
    carried = {k: v for k, v in exported.to_dict().items() if k != "format_version"}  # a store layout's
    info[META_KEY] = {"version": META_VERSION, "schema": carried, "features": dict(plan.names)}
    _replace_text(path, json.dumps(info, indent=4, ensure_ascii=False))
    for p in sorted((root / "meta" / "episodes").glob("*/*.parquet")):
        table = pq.read_table(p)
        column = pa.array([json.dumps(infos[int(i)]) for i in table.column("episode_index").to_pylist()])
        table = table.append_column(EPISODE_INFO_COLUMN, column).replace_schema_metadata(None)
        tmp = p.with_name(p.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, p)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_carried(src: Path, info: dict[str, Any]) -> tuple[Schema, dict[str, str]] | None:
    """(schema, {store key: LeRobot feature}) from the `wm_stack` metadata of `info`, or None when it
    has none or it no longer matches the dataset's features (a warning says why)."""
    meta = info.get(META_KEY)
    if meta is None:
        mark = _our_mark(src, info)
        if mark:  # (lerobot's delete_episodes / merge_datasets rewrite info.json without it: a delta
            warn(  # action space read back as absolute, units and key names gone, without a word)
                f"{src}/meta/info.json: this dataset was exported by wm-convert ({mark}) but its {META_KEY} "
                "metadata is gone (edited with lerobot's tools?): keys, units and the action space are "
                "inferred, and may not be the original's"
            )
        return None
    try:
        if int(meta.get("version", 0)) > META_VERSION:
            raise SchemaError(f"version {meta['version']} is newer than this code ({META_VERSION})")
        schema = Schema.from_dict(meta["schema"])
        names = {str(k): str(v) for k, v in meta["features"].items()}
        _check_carried(schema, names, info["features"])
    except (SchemaError, KeyError, TypeError, ValueError, AttributeError) as e:
        warn(f"{src}/meta/info.json: the {META_KEY} metadata does not fit this dataset ({e}); inferring keys")
        return None
    return schema, names


def _our_mark(src: Path, info: dict[str, Any]) -> str | None:
    """What shows the dataset at `src` was written by `store_to_lerobot`: an exact-values feature, or the
    episode info column of meta/episodes; None when neither is there."""
    ours = sorted(f for f in info.get("features", {}) if f.startswith(EXACT_PREFIX))
    if ours:
        return f"feature {ours[0]!r}"
    import pyarrow.parquet as pq

    for p in sorted((src / "meta" / "episodes").glob("*/*.parquet"))[:1]:
        try:
            if EPISODE_INFO_COLUMN in pq.read_schema(p).names:
                return f"column {EPISODE_INFO_COLUMN!r} in {p.relative_to(src)}"
        except (OSError, ValueError):  # (a damaged file is said where the episodes are read)
            return None
    return None


def _check_carried(schema: Schema, names: dict[str, str], features: dict[str, Any]) -> None:
    if set(names) != set(schema.keys):
        raise SchemaError(f"keys {sorted(names)} != schema keys {sorted(schema.keys)}")
    extra = set(features) - set(names.values()) - {*BOOKKEEPING, "timestamp"}
    if extra:  # added after the export: inferring keeps them
        raise SchemaError(f"features {sorted(extra)} are not in it")
    for key, name in names.items():
        spec, ft = schema.keys[key], features.get(name)
        if ft is None:
            raise SchemaError(f"feature {name!r} of key {key!r} is missing")
        shape = tuple(int(s) for s in ft["shape"])
        if spec.kind == "image":
            ok = ft["dtype"] in ("image", "video") and image_feature_spec(ft).shape == spec.shape
        else:
            ok = ft["dtype"] == lerobot_dtype(spec.dtype) and math.prod(shape) == math.prod(spec.shape)
        if not ok:
            raise SchemaError(
                f"feature {name!r} is {ft['dtype']} {shape}, key {key!r} is {spec.dtype} {spec.shape}"
            )


def lerobot_dtype(dtype: str) -> str:
    """The LeRobot feature dtype a store key of `dtype` is exported as: float16 as float32 (exact; LeRobot's
    statistics fail on float16), and the carried schema gives it back as float16 on the way in."""
    return "float32" if dtype == "float16" else dtype


def carried_episode_info(ep: dict[str, Any]) -> dict[str, Any] | None:
    """The episode info the export carried in meta/episodes, or None for an episode without it."""
    raw = ep.get(EPISODE_INFO_COLUMN)
    if not isinstance(raw, str):
        return None
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


def infer_key(name: str, dtype: str) -> tuple[str, str]:
    """(store key, kind) for a LeRobot feature of a dataset without carried metadata."""
    if dtype in ("image", "video"):
        return (name[len(IMAGES_PREFIX) :] if name.startswith(IMAGES_PREFIX) else name), "image"
    if name == "action":
        return "action", "action"
    if name == "timestamp":
        return "timestamp", "timestamp"
    if name == OBS_PREFIX + "environment_state":  # the objects' state (PushT's keypoints), not the robot's
        return name[len(OBS_PREFIX) :], "lowdim"
    if name.startswith(OBS_PREFIX):
        return name[len(OBS_PREFIX) :], "proprio"
    return name, "lowdim"


def image_feature_spec(ft: dict[str, Any]) -> KeySpec:
    """The store spec of a LeRobot camera feature, whose shape is (H, W, C) or, in old sets, (C, H, W)."""
    shape = tuple(int(s) for s in ft["shape"])
    names = ft.get("names") if isinstance(ft.get("names"), list) else []
    if len(shape) == 3 and (names[:1] in (["channels"], ["channel"]) or shape[-1] not in (1, 3, 4)):
        shape = (shape[1], shape[2], shape[0])
    return KeySpec(shape=shape, dtype="uint8", kind="image")
