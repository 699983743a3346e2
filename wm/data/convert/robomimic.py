"""Convert a robomimic HDF5 dataset into a DemoStore.

robomimic layout: `data/` (attrs `env_args` JSON, `total`) holding `data/demo_<i>` groups, each with
`actions (T, A)`, `obs/<key> (T, ...)`, optional `rewards`, `dones`, `states`, and attrs
`num_samples`; an optional `mask/<filter_key>` dataset lists demo names (bytes) per split.

Mapping: `actions` (or the demo dataset `action_key` names, e.g. `actions_abs` from robomimic's
absolute-action script) -> store key `action`; `obs/<key>` -> store key `<key>` (kind `image` for
(H, W, C) uint8, `proprio` for per-step vectors of the robot's own state: `robot0_*`, `eef`,
`joint`, `gripper` keys; `lowdim` for anything else, such as `object`, the simulator's object poses,
relative to the robot too (`gripper_to_cube_pos`, RoboCasa's `obj_to_robot0_eef_pos`), which a real
robot does not have and `wm-train` must not take as proprioception by default). Values
keep their HDF5 dtype, so the store holds them bit-exactly (robomimic low-dim data is often
float64). `states`, `rewards`, `dones` and `next_obs` are not copied; `rewards` (else `dones`) only
decide each episode's `success` flag (with robosuite's shaped rewards, a last reward of its
`reward_scale`, which only success reaches); any other demo dataset left out, an obs key that is not
numbers (a language instruction), and a demo without samples are named in a warning. Demos are written
in numeric order (demo_2 before demo_10).

The store is written beside `dst` under a temporary name and renamed into place once every demo is
in, so a failed conversion leaves no half-written store behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wm.data.convert.lerobot_meta import positive_rate, warn
from wm.data.errors import AppendError, CorruptStoreError, NotAStoreError, SchemaError, StoreBusyError
from wm.data.places import beside, check_destination, move_into_place
from wm.data.schema import ActionSpace, KeySpec, Schema
from wm.data.store import DemoStore

DEFAULT_FPS = 20.0  # robosuite's default control_freq
WRITE_STEPS = 256  # steps read from HDF5 and appended at a time, bounding memory for long image demos
_DEMO_RE = re.compile(r"demo_(\d+)")
_ROBOT_STATE = re.compile(r"^robot\d*_|eef|joint|gripper|^ee_|proprio", re.IGNORECASE)  # proprio keys
# poses of objects, relative to the robot too (gripper_to_cube_pos; not RoboCasa's robot0_base_to_eef_pos)
_OBJECT = re.compile(r"^(?!robot\d*_).*_to_|^obj|object", re.IGNORECASE)
NOT_COPIED = {"obs", "next_obs", "states", "rewards", "dones"}  # demo datasets read or left by design


def is_robomimic_hdf5(path: str | os.PathLike) -> bool:
    """True if `path` is an HDF5 file with a robomimic `data/` group (env_args or demo_<i> groups).

    An HDF5 file that will not open (locked by a writer, truncated) may well be robomimic's: it raises
    StoreBusyError or CorruptStoreError saying why, rather than calling it something else."""
    path = Path(path)
    if not path.is_file() or not _has_hdf5_signature(path):
        return False
    with _open_hdf5(path) as f:
        try:
            data = f.get("data")
            if not isinstance(data, h5py.Group):
                return False
            return "env_args" in data.attrs or any(
                _DEMO_RE.fullmatch(n) and isinstance(g, h5py.Group) and "actions" in g
                for n, g in data.items()
            )
        except (OSError, ValueError):
            return False


def robomimic_to_store(
    src_hdf5: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    zarr_format: int = 3,
    overwrite: bool = False,
    fps: float | None = None,
    action_key: str = "actions",
) -> DemoStore:
    """Convert the robomimic file `src_hdf5` into a new store at `dst`; returns it opened read-only.

    `fps` overrides the rate taken from env_args' `control_freq` (20 if absent); `action_key` is the
    demo dataset that becomes the store's actions (`actions_abs`: absolute, in the controller's frame).
    Raises
    NotAStoreError for a file that is not robomimic HDF5, SchemaError for demos whose keys, shapes or
    dtypes disagree, AppendError (naming the demo) for data the store refuses, e.g. non-finite actions,
    CorruptStoreError (naming the dataset) for data HDF5 cannot read back, e.g. a damaged chunk.
    """
    src, dst = Path(src_hdf5), Path(dst)
    check_destination(dst, overwrite, [src])
    tmp = beside(dst, "converting")
    with _open_source(src) as f:
        data = f["data"]
        with _damaged_metadata(src):
            all_demos = _demo_names(data, src)
            # (before the schema: an empty demo written from an empty list has actions of shape (0,),
            # not (0, A), and failed the schema's check of every demo)
            empty = [n for n in all_demos if _steps(data[n], action_key) == 0]
            if empty and len(empty) == len(all_demos):
                raise SchemaError(f"{src}: every demo is empty (0 samples): nothing to convert")
            if empty:  # an episode needs a step: one such demo failed the whole conversion
                warn(f"{src}: demos without samples left out: {', '.join(empty)}")
            demos = [n for n in all_demos if n not in empty]
            env_args = _env_args(data, src)
            schema = _schema(data, demos, env_args, src, fps, action_key)
            _warn_left_out(data, demos, action_key, src)
            masks = _masks(f, src)
            rule = _success_rule(env_args, src)
        store = DemoStore.create(tmp, schema, zarr_format=zarr_format, overwrite=True)
        try:
            for name in demos:
                _append_demo(store, data[name], name, masks, src, (tmp, dst), action_key, rule)
        except BaseException:
            store.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        store.close()
    move_into_place(tmp, dst)
    return DemoStore.open(dst)


# ---------------------------------------------------------------------- reading the source
def _open_source(src: Path) -> h5py.File:
    if not src.is_file():
        raise NotAStoreError(f"{src}: no such file")
    f = _open_hdf5(src)
    if not isinstance(f.get("data"), h5py.Group):
        f.close()
        raise NotAStoreError(f"{src}: not a robomimic HDF5 file (it has no data/ group)")
    return f


def _open_hdf5(path: Path) -> h5py.File:
    """`path` opened read-only; why a file that will not open does not, in one line."""
    try:
        return h5py.File(path, "r")
    except BlockingIOError as e:  # HDF5's file lock: a writer (robomimic's own scripts...) has it open
        raise StoreBusyError(
            f"{path}: the HDF5 file is locked: another process has it open for writing; convert it once "
            "that process has closed it"
        ) from e
    except OSError as e:
        if _has_hdf5_signature(path):
            raise CorruptStoreError(f"{path}: cannot open this HDF5 file ({e})") from e
        raise NotAStoreError(f"{path}: not an HDF5 file ({e})") from e


@contextlib.contextmanager
def _damaged_metadata(src: Path) -> Iterator[None]:
    """HDF5's errors reading a file's structure (a damaged group, object header or heap: h5py raises
    RuntimeError, KeyError or OSError) as one CorruptStoreError line; they were a bug's traceback."""
    try:
        yield
    except (RuntimeError, KeyError, OSError) as e:  # (the store's own errors are none of these)
        raise CorruptStoreError(f"{src}: damaged HDF5 metadata ({type(e).__name__}: {e})") from e


def _has_hdf5_signature(path: Path) -> bool:
    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def _demo_names(data: h5py.Group, src: Path) -> list[str]:
    """Demo group names in numeric order (demo_2 before demo_10)."""
    found = []
    for name, item in data.items():
        m = _DEMO_RE.fullmatch(name)
        if m is None or not isinstance(item, h5py.Group):
            raise NotAStoreError(f"{src}: data/{name} is not a robomimic demo group (expected data/demo_<i>)")
        found.append((int(m.group(1)), name))
    if not found:
        raise NotAStoreError(f"{src}: not a robomimic HDF5 file (data/ holds no demo_<i> groups)")
    return [name for _, name in sorted(found)]


def _env_args(data: h5py.Group, src: Path) -> dict[str, Any]:
    raw = data.attrs.get("env_args")
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        args = json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise SchemaError(f"{src}: data attribute env_args is not valid JSON ({e})") from e
    if not isinstance(args, dict):
        raise SchemaError(f"{src}: data attribute env_args is JSON {type(args).__name__}, not an object")
    return args


def _masks(f: h5py.File, src: Path) -> dict[str, set[str]]:
    """{filter_key: {demo names}} from the optional `mask/` group."""
    group = f.get("mask")
    if not isinstance(group, h5py.Group):
        return {}
    out = {}
    for key, ds in group.items():
        if isinstance(ds, h5py.Dataset):
            values = np.asarray(_read(ds, 0, len(ds), src) if ds.ndim else ds[()]).ravel()
            out[key] = {v.decode() if isinstance(v, bytes) else str(v) for v in values}
    return out


# ---------------------------------------------------------------------- schema
def _kind(key: str, shape: tuple[int, ...], dtype: np.dtype) -> str:
    if len(shape) == 3 and shape[-1] in (1, 3, 4) and dtype == np.uint8:
        return "image"
    if len(shape) <= 1 and _ROBOT_STATE.search(key) and not _OBJECT.search(key):
        return "proprio"
    return "lowdim"  # (an object's pose relative to the gripper too: robosuite's gripper_to_cube_pos)


def _warn_left_out(data: h5py.Group, demos: list[str], action_key: str, src: Path) -> None:
    """Name the demo datasets the store will not hold beyond those left by design (NOT_COPIED)."""
    left = sorted({k for name in demos for k in data[name]} - NOT_COPIED - {action_key})
    if left:
        actions = any("action" in k for k in left)
        hint = " (another action dataset is chosen with action_key=)" if actions else ""
        warn(f"{src}: demo datasets not copied: {', '.join(left)}{hint}")


def _demo_arrays(
    demo: h5py.Group, name: str, obs_keys: list[str], src: Path, action_key: str
) -> dict[str, h5py.Dataset]:
    """{store key: dataset} of one demo, checking every key is there with the demo's length."""
    actions = demo.get(action_key)
    if not isinstance(actions, h5py.Dataset) or actions.ndim != 2:
        raise SchemaError(f"{src}: data/{name}/{action_key} is missing or not a (T, A) array")
    obs = demo.get("obs")
    have = set(obs.keys()) if isinstance(obs, h5py.Group) else set()
    missing = [k for k in obs_keys if k not in have]
    if missing:
        raise SchemaError(f"{src}: data/{name}/obs lacks key(s) {missing} that other demos have")
    arrays = {"action": actions, **{k: obs[k] for k in obs_keys}}
    for key, ds in arrays.items():
        if not isinstance(ds, h5py.Dataset) or ds.ndim < 1 or ds.shape[0] != actions.shape[0]:
            length = ds.shape[0] if isinstance(ds, h5py.Dataset) and ds.ndim else None
            raise SchemaError(
                f"{src}: data/{name}, key {key!r}: {length} steps but {action_key} has {actions.shape[0]}"
            )
    return arrays


def _schema(
    data: h5py.Group,
    demos: list[str],
    env_args: dict[str, Any],
    src: Path,
    fps: float | None,
    action_key: str,
) -> Schema:
    """The store schema, after checking every demo has the same keys, per-step shapes and dtypes."""
    obs_keys: set[str] = set()
    for name in demos:
        obs = data[name].get("obs")
        if isinstance(obs, h5py.Group):
            obs_keys.update(obs.keys())
    if "action" in obs_keys:
        raise SchemaError(f"{src}: an obs key named 'action' clashes with the store's action key")
    ordered = sorted(obs_keys)
    ref: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {}
    for name in demos:
        for key, ds in _demo_arrays(data[name], name, ordered, src, action_key).items():
            first = ref.setdefault(key, (name, ds.shape[1:], ds.dtype))
            if (first[1], first[2]) != (ds.shape[1:], ds.dtype):
                raise SchemaError(
                    f"{src}: data/{name}, key {key!r}: per-step shape {ds.shape[1:]} {ds.dtype} differs from "
                    f"{first[0]}'s {first[1]} {first[2]}"
                )
    kept = []
    for key, (name, shape, dtype) in ref.items():
        if key != "action" and 0 in shape:  # (T, 0): a store holds no key of no values
            warn(f"{src}: obs/{key} is not copied: its per-step shape {shape} holds no values")
        elif np.issubdtype(dtype, np.number) or dtype == np.bool_:
            kept.append(key)
        elif key == "action":  # strings, compound records: the store cannot hold them
            raise SchemaError(f"{src}: data/{name}/{action_key}: dtype {dtype} is not numeric")
        else:  # as LeRobot's string features: the rest of the demos is still data
            warn(f"{src}: obs/{key} is not copied: dtype {dtype} is not numeric")
    keys = {"action": KeySpec(shape=ref["action"][1], dtype=ref["action"][2].name, kind="action")}
    for key in (k for k in ordered if k in kept):
        _, shape, dtype = ref[key]
        keys[key] = KeySpec(shape=shape, dtype=dtype.name, kind=_kind(key, shape, dtype))
    kwargs = env_args.get("env_kwargs") or {}
    if not isinstance(kwargs, dict):
        kind = type(kwargs).__name__
        raise SchemaError(
            f"{src}: data attribute env_args: env_kwargs is a {kind}, not a mapping (JSON object)"
        )
    robots = kwargs.get("robots", "")
    space = _action_space(kwargs.get("controller_configs"))
    if action_key == "actions_abs":  # robomimic's absolute poses for the same (delta) controller
        space = dataclasses.replace(space, mode="absolute", description=f"{action_key} ({space.description})")
    elif action_key != "actions":
        space = ActionSpace(description=f"robomimic dataset {action_key}")
    return Schema(
        keys=keys,
        fps=float(fps) if fps is not None else _control_freq(kwargs, src),
        action_space=space,
        robot="+".join(map(str, robots)) if isinstance(robots, list | tuple) else str(robots),
        task=str(env_args.get("env_name", "")),
    )


def _control_freq(env_kwargs: dict[str, Any], src: Path) -> float:
    """env_args' `env_kwargs.control_freq` (DEFAULT_FPS when absent, said), a positive number."""
    raw = env_kwargs.get("control_freq")
    if raw is None:
        warn(f"{src}: env_args names no control_freq: {DEFAULT_FPS:g} fps assumed (robosuite's; give fps=)")
        return DEFAULT_FPS
    freq = positive_rate(raw)
    if freq is None:
        raise SchemaError(
            f"{src}: data attribute env_args: env_kwargs.control_freq {raw!r} is not a positive number "
            "(give the rate with fps=)"
        )
    return freq


def _action_space(ctrl: Any) -> ActionSpace:
    """delta/ee for a delta OSC or IK controller (robosuite <= 1.4 flat config or 1.5 `body_parts`), else
    the mode and frame the controller config states, else absolute/other; joint velocity and torque
    controllers take set-points: absolute/joint."""
    if not isinstance(ctrl, dict):
        return ActionSpace()
    parts = ctrl.get("body_parts") or ctrl.get("body_part_controllers")
    if isinstance(parts, dict) and isinstance(parts.get("arms"), dict):  # as robosuite's files nest them
        parts = {**parts["arms"], **{k: v for k, v in parts.items() if k != "arms"}}  # (its loader: flat)
    for part in parts.values() if isinstance(parts, dict) else [ctrl]:
        if not isinstance(part, dict):
            continue
        ctype = str(part.get("type", "")).upper()  # (IK_POSE: delta end-effector poses, as OSC's)
        frame = "ee" if ctype.startswith(("OSC", "IK")) else "joint" if ctype.startswith("JOINT") else None
        if frame is None:
            continue
        if ctype in ("JOINT_VELOCITY", "JOINT_TORQUE"):  # not steps of a position (they were "delta")
            return ActionSpace(mode="absolute", frame=frame, description=f"robosuite {ctype} controller")
        default = "delta" if part.get("control_delta", True) else "absolute"
        mode = "delta" if str(part.get("input_type", default)).lower() == "delta" else "absolute"
        return ActionSpace(mode=mode, frame=frame, description=f"robosuite {ctype} controller")
    return ActionSpace()


# ---------------------------------------------------------------------- writing
def _steps(demo: h5py.Group, action_key: str) -> int:
    actions = demo.get(action_key)
    return int(actions.shape[0]) if isinstance(actions, h5py.Dataset) and actions.ndim >= 1 else -1


def _success_rule(env_args: dict[str, Any], src: Path) -> float | None:
    """The last reward a successful demo has: > 0 for robomimic's sparse rewards (0.0 returned); with
    robosuite's `reward_shaping` (every step rewarded) its `reward_scale`, which success alone reaches
    (a failed demo's last shaped reward was > 0: flagged a success); None: success cannot be told."""
    kwargs = env_args.get("env_kwargs") or {}
    if not (isinstance(kwargs, dict) and kwargs.get("reward_shaping") is True):
        return 0.0
    scale = kwargs.get("reward_scale", 1.0)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        return float(scale)
    warn(f"{src}: rewards are shaped and env_kwargs.reward_scale is {scale!r}: success is not recorded")
    return None


def _success(demo: h5py.Group, name: str, src: Path, rule: float | None = 0.0) -> bool | None:
    """rewards[-1] > 0 (robomimic's sparse task reward; with shaped rewards, at least `rule`, the reward
    scale: `_success_rule`) if the demo has rewards, else bool(dones[-1]), else unknown. Rewards first:
    robomimic's done modes 1 and 2 also mark every trajectory's end done."""
    for key in ("rewards", "dones"):
        ds = demo.get(key)
        if isinstance(ds, h5py.Dataset) and ds.ndim >= 1 and ds.shape[0] > 0:
            last = np.asarray(_read(ds, ds.shape[0] - 1, ds.shape[0], src)).ravel()
            if last.size == 0 or not (np.issubdtype(last.dtype, np.number) or last.dtype == np.bool_):
                raise SchemaError(
                    f"{src}: data/{name}/{key}: shape {ds.shape} {ds.dtype} has no number per step "
                    "(expected (T,))"
                )
            if key == "dones":
                return bool(last[0])
            if rule is None:
                return None
            return bool(last[0] > 0) if rule == 0.0 else bool(last[0] >= rule * (1 - 1e-6))
    return None


def _read(ds: h5py.Dataset, lo: int, hi: int, src: Path) -> np.ndarray:
    """Steps lo..hi-1 of `ds`; data HDF5 cannot read back (a damaged compressed chunk) is a
    CorruptStoreError naming the file, demo and key."""
    try:
        return ds[lo:hi]
    except OSError as e:
        raise CorruptStoreError(f"{src}: {ds.name.lstrip('/')}: cannot read steps {lo}-{hi - 1} ({e})") from e


def _append_demo(
    store: DemoStore,
    demo: h5py.Group,
    name: str,
    masks: dict[str, set[str]],
    src: Path,
    rename: tuple[Path, Path],
    action_key: str,
    rule: float | None = 0.0,
) -> None:
    obs_keys = [k for k in store.keys if k != "action"]
    arrays = _demo_arrays(demo, name, obs_keys, src, action_key)
    info: dict[str, Any] = {"source_demo": name}
    success = _success(demo, name, src, rule)
    if success is not None:
        info["success"] = success
    info["filter_keys"] = sorted(k for k, demos in masks.items() if name in demos)
    n = arrays["action"].shape[0]
    try:
        with store.begin_episode() as writer:
            for lo in range(0, n, WRITE_STEPS):
                hi = min(lo + WRITE_STEPS, n)
                writer.add_steps({k: _read(ds, lo, hi, src) for k, ds in arrays.items()})
            writer.end(info)
    except AppendError as e:
        msg = str(e).replace(str(rename[0]), str(rename[1]))
        raise AppendError(f"{src}: data/{name}: {msg}") from e
