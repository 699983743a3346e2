"""The schema that makes a demonstration store self-describing.

A store is the Diffusion Policy / UWM replay-buffer layout (`data/<key>` time-major arrays,
`meta/episode_ends`) plus this schema in the root group's attributes: format version, fps, and for
each key its per-step shape, dtype and kind, the meaning of the action space, and robot and task
names. Stores written by Diffusion Policy or UWM carry no schema; `infer_schema` guesses one from
key names, shapes and dtypes, and the caller can override any field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wm.data.errors import SchemaError

FORMAT_VERSION = 2  # 2: episode info in an array of its own (wm.data.store), no longer the root attributes
KINDS = ("image", "proprio", "action", "timestamp", "language", "lowdim")
RESERVED_NAMES = (".", "..", "zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")  # zarr v3 / v2
ACTION_MODES = ("absolute", "delta")
ACTION_FRAMES = ("joint", "ee", "planar", "other")


MAX_STEP_VALUES = 2**30  # values of one key at one step: a 16k x 16k RGBA frame is a quarter of it


@dataclass(frozen=True)
class KeySpec:
    """One data key: per-step `shape` (an image is (H, W, C)), numpy `dtype` name and `kind`."""

    shape: tuple[int, ...]
    dtype: str
    kind: str
    units: str = ""
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "names", tuple(self.names))
        dtype = np.dtype(self.dtype)
        if dtype.kind not in "biuf":  # zarr failed on strings and records, half-way through creating
            raise SchemaError(f"dtype {dtype} is not a number or bool type, which is all a store holds")
        object.__setattr__(self, "dtype", dtype.name)
        if self.kind not in KINDS:
            raise SchemaError(f"kind {self.kind!r} is not one of {KINDS}")
        if any(s < 1 for s in self.shape):  # zarr writes no chunk of a zero-size array: it read as lost
            raise SchemaError(f"per-step shape {self.shape} holds no values; leave the key out")
        if math.prod(self.shape) > MAX_STEP_VALUES:  # (a LeRobot info.json's: a 63 TiB allocation)
            raise SchemaError(
                f"per-step shape {self.shape} holds {math.prod(self.shape):,} values, more than any camera "
                f"or sensor ({MAX_STEP_VALUES:,} at most): a damaged declaration?"
            )
        if self.kind == "image" and (len(self.shape) != 3 or self.shape[-1] not in (1, 3, 4)):
            raise SchemaError(f"an image key needs shape (H, W, C) with C in 1, 3, 4; got {self.shape}")
        if self.kind == "image" and dtype.kind == "b":  # read as 0 / 1 of 255: a black image to a model
            raise SchemaError("an image key cannot be bool (it would read as 0 and 1 of 255); store uint8")
        if self.names and self.shape and len(self.names) != self.shape[-1]:
            raise SchemaError(f"{len(self.names)} dimension names for a last dimension of {self.shape[-1]}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["names"] = list(self.names)
        return d


@dataclass(frozen=True)
class ActionSpace:
    """What an action means: `absolute` targets or `delta` steps, in `joint` or `ee` space, and units."""

    mode: str = "absolute"
    frame: str = "other"
    units: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ACTION_MODES:
            raise SchemaError(f"action mode {self.mode!r} is not one of {ACTION_MODES}")
        if self.frame not in ACTION_FRAMES:
            raise SchemaError(f"action frame {self.frame!r} is not one of {ACTION_FRAMES}")


@dataclass(frozen=True)
class Schema:
    """Everything a reader needs to interpret a store without outside knowledge."""

    keys: dict[str, KeySpec]
    fps: float = 10.0
    action_space: ActionSpace = field(default_factory=ActionSpace)
    robot: str = ""
    task: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.keys:
            raise SchemaError("a schema needs at least one key")
        for name in self.keys:
            if not name or "/" in name:
                raise SchemaError(f"key name {name!r} must be non-empty and contain no '/'")
            if name in RESERVED_NAMES:
                raise SchemaError(f"key name {name!r} is a name zarr keeps for itself; rename the key")
        if not (self.fps > 0 and np.isfinite(self.fps)):
            raise SchemaError(f"fps must be a positive number, got {self.fps}")
        if self.format_version > FORMAT_VERSION:
            raise SchemaError(
                f"store format version {self.format_version} is newer than this code "
                f"({FORMAT_VERSION}); upgrade wm-stack"
            )

    def keys_of_kind(self, kind: str) -> list[str]:
        return [k for k, s in self.keys.items() if s.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "fps": float(self.fps),
            "robot": self.robot,
            "task": self.task,
            "action_space": dataclasses.asdict(self.action_space),
            "keys": {k: s.to_dict() for k, s in self.keys.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        try:
            keys = {k: KeySpec(**v) for k, v in d["keys"].items()}
            return cls(
                keys=keys,
                fps=float(d.get("fps", 10.0)),
                action_space=ActionSpace(**d.get("action_space", {})),
                robot=d.get("robot", ""),
                task=d.get("task", ""),
                format_version=int(d.get("format_version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a list for a dict, "abc" for fps
            raise SchemaError(f"malformed schema attributes: {type(e).__name__}: {e}") from e

    def override(self, overrides: dict[str, Any] | None) -> Schema:
        """A copy with top-level fields and per-key fields replaced, e.g.
        `{"fps": 15, "keys": {"img": {"kind": "image"}}, "action_space": {"mode": "delta"}}`."""
        if not overrides:
            return self
        d = self.to_dict()
        for name, value in overrides.items():
            try:
                if name == "keys":
                    for key, kv in value.items():
                        if key not in d["keys"]:
                            raise SchemaError(f"override names key {key!r}, which the store does not have")
                        d["keys"][key].update(kv)
                elif name == "action_space":
                    d["action_space"].update(value)
                elif name in d:
                    d[name] = value
                else:
                    raise SchemaError(f"unknown schema field {name!r} in overrides")
            except (TypeError, ValueError, AttributeError) as e:  # "delta" for {"mode": "delta"}
                raise SchemaError(
                    f"schema override {name}={value!r} is not a mapping of fields ({type(e).__name__}: {e})"
                ) from e
        return Schema.from_dict(d)


_ACTION_NAMES = ("action",)
_TIME_NAMES = ("timestamp", "time", "t")
_LANGUAGE_NAMES = ("language", "lang", "instruction")


def infer_kind(name: str, shape: tuple[int, ...], dtype: np.dtype) -> str:
    """Guess a key's kind from its name, per-step shape and dtype (Diffusion Policy / UWM conventions)."""
    low = name.lower()
    if len(shape) == 3 and shape[-1] in (1, 3, 4) and _image_dtype(dtype, shape):
        return "image"
    if any(low == n or low.startswith(n) for n in _ACTION_NAMES):
        return "action"
    if low in _TIME_NAMES or "timestamp" in low:
        return "timestamp"
    if set(re.split(r"[^a-z0-9]+", low)) & set(_LANGUAGE_NAMES):  # whole words: not "flange_pose"
        return "language"
    return "proprio"


def _image_dtype(dtype: Any, shape: tuple[int, ...]) -> bool:
    """uint8 frames, or float frames in 0..255 / 0..1 (Diffusion Policy's PushT `img`) of a camera's size
    (a small float (H, W, C) array is more likely a map of values)."""
    dt = np.dtype(dtype)
    return dt == np.uint8 or (np.issubdtype(dt, np.floating) and min(shape[:2]) >= 8)


def infer_schema(arrays: dict[str, tuple[tuple[int, ...], Any]], fps: float = 10.0) -> Schema:
    """A schema for a store that has none. `arrays` maps key -> (full shape (T, ...), dtype)."""
    keys = {
        name: KeySpec(
            shape=tuple(shape[1:]), dtype=np.dtype(dtype).name, kind=infer_kind(name, shape[1:], dtype)
        )
        for name, (shape, dtype) in arrays.items()
    }
    return Schema(keys=keys, fps=fps)
