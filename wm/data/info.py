"""What is in a demonstration store: a JSON summary, a text report and a PNG contact sheet.

Library side of `wm-info store=PATH`. `summarize` reads only what it needs: low-dim keys are
subsampled with an even stride past `stats_max_steps` steps, images use at most `image_frames`
evenly strided frames, and `contact_sheet` reads just the first and last frame of each episode shown.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wm.data.errors import SchemaError
from wm.data.frames import check_scale, to_uint8
from wm.data.store import DemoStore

# Contact sheet geometry, in pixels: a header strip with column titles, a label column on the left,
# PAD between tiles and around the edge; frames are pasted at their native resolution.
HEADER_H = 14
LABEL_W = 76
LABEL_LINE_H = 12
PAD = 2
BACKGROUND = (32, 32, 32)
TEXT = (230, 230, 230)


# ---------------------------------------------------------------------- summary
def summarize(store: DemoStore, *, stats_max_steps: int = 100_000, image_frames: int = 64) -> dict[str, Any]:
    """A JSON-serializable summary of `store`: sizes, episodes, success rate, schema and per-key stats."""
    lengths = store.episode_lengths()
    flags = [f for f in map(success_of, map(store.episode_info, range(store.n_episodes))) if f is not None]
    schema = store.schema
    return {
        "path": str(store.path),
        "episodes": store.n_episodes,
        "steps": store.n_steps,
        "fps": float(schema.fps),
        "zarr_format": store.zarr_format,
        "robot": schema.robot,
        "task": schema.task,
        "action_space": schema.to_dict()["action_space"],
        "size_on_disk_bytes": _size_on_disk(Path(store.path)),
        "episode_length": {
            "min": int(lengths.min()) if len(lengths) else None,
            "max": int(lengths.max()) if len(lengths) else None,
            "mean": float(lengths.mean()) if len(lengths) else None,
        },
        "success_rate": float(np.mean(flags)) if flags else None,
        "success_count": int(sum(flags)),
        "episodes_with_success_flag": len(flags),
        "keys": {key: _key_summary(store, key, stats_max_steps, image_frames) for key in store.keys},
    }


def success_of(info: dict[str, Any]) -> bool | None:
    """An episode's success flag, or None where it is unknown: no flag, or `success: null` (a real
    robot's episodes, which have no success signal)."""
    flag = info.get("success")
    known = isinstance(flag, bool | np.bool_) or (isinstance(flag, int | np.integer) and flag in (0, 1))
    return bool(flag) if known else None


def success_label(info: dict[str, Any]) -> str:
    return {True: "yes", False: "no", None: "?"}[success_of(info)]


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _codec(arr: Any) -> str:
    """A short codec name such as 'blosc/lz4/5' (zarr v2 and v3 spellings alike), or 'none'."""
    names = []
    for c in tuple(getattr(arr, "compressors", ()) or ()):
        name = type(c).__name__.lower().removesuffix("codec")
        cname = getattr(c, "cname", None)
        level = getattr(c, "clevel", getattr(c, "level", None))
        parts = [name, getattr(cname, "value", cname), level]
        names.append("/".join(str(p) for p in parts if p is not None))
    return "+".join(names) or "none"


def _key_summary(store: DemoStore, key: str, max_steps: int, image_frames: int) -> dict[str, Any]:
    spec = store.schema.keys[key]
    arr = store.array(key)
    if spec.kind == "image":
        stats = _image_stats(store, key, image_frames)
    else:
        stats = _lowdim_stats(store, key, max_steps)
    return {
        "shape": list(spec.shape),
        "dtype": spec.dtype,
        "kind": spec.kind,
        "chunks": list(arr.chunks),
        "codec": _codec(arr),
        "stats": stats,
    }


def _strided(n: int, max_items: int) -> slice:
    """A slice over range(n) taking at most `max_items` evenly strided items."""
    return slice(0, n, max(1, math.ceil(n / max(1, max_items))))


def _finite_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.ravel(values)]


def _lowdim_stats(store: DemoStore, key: str, max_steps: int) -> dict[str, Any] | None:
    """Per-dimension (last axis) min/max/mean/std of the finite values over committed steps, strided
    past `max_steps`, and how many values of each dimension were not finite (NaN, +-inf): counted,
    never hidden in the other figures (a dimension of NaN alone has null figures)."""
    dtype = np.dtype(store.schema.keys[key].dtype)
    if store.n_steps == 0 or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        return None
    sel = _strided(store.n_steps, max_steps)
    x = store.read(key, sel).astype(np.float64)
    n = len(x)
    x = x.reshape(n, -1, x.shape[-1]) if x.ndim > 1 else x.reshape(n, 1, 1)
    bad = ~np.isfinite(x)
    x = np.where(bad, np.nan, x)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a dimension without one finite value
        return {
            "min": _finite_list(np.nanmin(x, axis=(0, 1))),
            "max": _finite_list(np.nanmax(x, axis=(0, 1))),
            "mean": _finite_list(np.nanmean(x, axis=(0, 1))),
            "std": _finite_list(np.nanstd(x, axis=(0, 1))),
            "non_finite": [int(c) for c in bad.sum(axis=(0, 1))],
            "steps_used": n,
        }


def _image_stats(store: DemoStore, key: str, image_frames: int) -> dict[str, Any] | None:
    """Mean pixel value per channel over at most `image_frames` evenly strided frames, and `problem`:
    what training would refuse in them (`check_scale`: float frames in [0, 1], which the contact sheet
    and the videos draw black; values `to_uint8` would change), or None."""
    if store.n_steps == 0:
        return None
    sel = _strided(store.n_steps, image_frames)
    frames = store.read(key, sel)
    mean = frames.reshape(-1, frames.shape[-1]).mean(axis=0, dtype=np.float64)  # (not a float64 copy)
    try:
        steps = np.arange(*sel.indices(store.n_steps))  # (the sampled frames' steps)
        check_scale(Path(store.path), key, frames, steps, store.episode_ends)
        problem = None
    except SchemaError as e:
        problem = str(e)
    return {"mean": _finite_list(mean), "frames_used": len(frames), "problem": problem}


# ---------------------------------------------------------------------- text report
def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _nums(values: list[float | None] | None, limit: int = 8) -> str:
    if values is None:
        return "-"
    text = ["-" if v is None else f"{v:.6g}" for v in values[:limit]]
    return "[" + ", ".join(text) + (", ...]" if len(values) > limit else "]")


def format_summary(summary: dict[str, Any]) -> str:
    """A readable multi-line report of a `summarize` result."""
    lengths = summary["episode_length"]
    space = summary["action_space"]
    if summary["success_rate"] is None:
        success = "unknown (no episode has a success flag)"
    else:
        success = (
            f"{100 * summary['success_rate']:.1f}% ({summary.get('success_count', '?')}/"
            f"{summary.get('episodes_with_success_flag', '?')} flagged episodes)"
        )
    length = "-" if lengths["min"] is None else f"{lengths['min']} / {lengths['mean']:.1f} / {lengths['max']}"
    lines = [
        f"store      {summary['path']}",
        f"format     zarr v{summary['zarr_format']}, {human_bytes(summary['size_on_disk_bytes'])} on disk",
        f"episodes   {summary['episodes']} ({summary['steps']} steps; length min / mean / max {length})",
        f"fps        {summary['fps']:g}",
        f"robot      {summary['robot'] or '-'}",
        f"task       {summary['task'] or '-'}",
        f"actions    {space['mode']} / {space['frame']}"
        + (f" [{space['units']}]" if space.get("units") else ""),
        f"success    {success}",
        "",
    ]
    rows = [("key", "kind", "shape", "dtype", "chunks", "codec")]
    for name, k in summary["keys"].items():
        rows.append(
            (name, k["kind"], str(tuple(k["shape"])), k["dtype"], str(tuple(k["chunks"])), k["codec"])
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines.append("stats (per last dimension; images: mean pixel value per channel)")
    pad = max(len(name) for name in summary["keys"])
    for name, k in summary["keys"].items():
        st = k["stats"]
        if st is None:
            lines.append(f"  {name.ljust(pad)}  -")
        elif k["kind"] == "image":
            lines.append(f"  {name.ljust(pad)}  mean {_nums(st['mean'])} over {st['frames_used']} frames")
        else:
            for i, stat in enumerate(("min", "max", "mean", "std")):
                lines.append(f"  {(name if i == 0 else '').ljust(pad)}  {stat.ljust(4)} {_nums(st[stat])}")
            if any(st.get("non_finite", ())):
                bad = st["non_finite"]
                lines.append(f"  {''.ljust(pad)}  NaN/inf {_nums(bad)} values per dimension, left out above")
    return "\n".join(lines)


# ---------------------------------------------------------------------- contact sheet
def _pick_episodes(n_total: int, n: int, seed: int) -> list[int]:
    """`n` evenly spaced episodes (all if fewer); seed 0 includes the first and last episode, another
    seed shifts the grid by a random phase so that different seeds show different episodes."""
    if n >= n_total:
        return list(range(n_total))
    if seed == 0:
        return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n)})
    stride = n_total / n
    phase = np.random.default_rng(seed).uniform(0, stride)
    return sorted({min(n_total - 1, int(phase + i * stride)) for i in range(n)})


def check_episodes(store: DemoStore, episodes: Sequence[int]) -> list[int]:
    """`episodes` as a list of ints, ValueError naming the store if one is out of range."""
    bad = [e for e in episodes if not 0 <= int(e) < store.n_episodes]
    if bad:
        raise ValueError(f"{store.path}: episodes {bad} out of range (the store has {store.n_episodes})")
    return [int(e) for e in episodes]


def _to_rgb(frame: np.ndarray) -> Image.Image:
    frame = to_uint8(frame)  # 0..255 whatever the dtype, as training reads it
    if frame.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(frame[..., 0])).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(frame[..., :3]))


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def contact_sheet(
    store: DemoStore,
    out_png: str | Path,
    *,
    n_episodes: int = 6,
    image_key: str | None = None,
    seed: int = 0,
    episodes: Sequence[int] | None = None,
) -> Path:
    """Write a PNG grid with one row per chosen episode (`episodes`, else `n_episodes` evenly spaced
    ones): a label (index, length, success), then the first and last frame of each image key (or only
    `image_key`) at native resolution.

    Tile of key k (column j, 0 = first, 1 = last) in row r sits at x = LABEL_W + PAD + sum of
    2 * (W + PAD) over earlier keys + j * (W_k + PAD), y = HEADER_H + PAD + r * (row_h + PAD), with
    row_h = max(max H, 3 * LABEL_LINE_H). Raises SchemaError if the store has no image key (or
    `image_key` is not one) and ValueError if it has no episodes or `episodes` names one it lacks.
    """
    keys = [image_key] if image_key is not None else store.schema.keys_of_kind("image")
    if not keys:
        raise SchemaError(f"{store.path}: no image keys to show (keys: {store.keys})")
    for k in keys:
        if k not in store.schema.keys or store.schema.keys[k].kind != "image":
            raise SchemaError(f"{store.path}: {k!r} is not an image key of this store")
    if store.n_episodes == 0:
        raise ValueError(f"{store.path}: the store has no episodes to show")
    if episodes is None:
        episodes = _pick_episodes(store.n_episodes, max(1, n_episodes), seed)
    else:
        episodes = check_episodes(store, episodes)
    shapes = [store.schema.keys[k].shape for k in keys]
    row_h = max(max(s[0] for s in shapes), 3 * LABEL_LINE_H)
    width = LABEL_W + PAD + sum(2 * (s[1] + PAD) for s in shapes)
    height = HEADER_H + PAD + len(episodes) * (row_h + PAD)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x = LABEL_W + PAD
    for k, s in zip(keys, shapes, strict=True):
        for j, title in enumerate((f"{k} first", "last")):
            draw.text((x + j * (s[1] + PAD), 1), _fit(draw, title, s[1] + PAD, font), fill=TEXT, font=font)
        x += 2 * (s[1] + PAD)
    for r, ep in enumerate(episodes):
        y = HEADER_H + PAD + r * (row_h + PAD)
        _draw_row(store, ep, keys, shapes, sheet, draw, font, y)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _draw_row(
    store: DemoStore,
    ep: int,
    keys: list[str],
    shapes: list[tuple[int, ...]],
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: Any,
    y: int,
) -> None:
    """Label and first/last frames of episode `ep`, reading only those two frames per key."""
    sl = store.episode_slice(ep)
    info = store.episode_info(ep)
    labels = (f"ep {ep}", f"len {sl.stop - sl.start}", f"success {success_label(info)}")
    for i, text in enumerate(labels):
        draw.text((PAD, y + i * LABEL_LINE_H), _fit(draw, text, LABEL_W - PAD, font), fill=TEXT, font=font)
    if sl.stop == sl.start:  # an episode without steps (other tools' stores hold some): no frames
        return
    x = LABEL_W + PAD
    for k, s in zip(keys, shapes, strict=True):
        for j, t in enumerate((sl.start, sl.stop - 1)):
            frame = store.read(k, slice(t, t + 1), episode=ep)[0]
            sheet.paste(_to_rgb(frame), (x + j * (s[1] + PAD), y))
        x += 2 * (s[1] + PAD)
