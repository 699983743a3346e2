"""Episode videos of a store: library side of `wm-info store=PATH episodes=[3,7] video=true`.

Each video frame is, top to bottom (heights in px):

    header      HEADER_H              episode, step t / T, success flag, task
    captions    HEADER_H              image key names above their frames
    cameras     >= min_height         every image key side by side, nearest-neighbour upscaled
    plots       PLOT_H per low-dim key   proprio / action / lowdim over the whole episode, cursor at t

The plots are rendered once per episode with matplotlib's Agg backend; each frame copies that image
and paints the cursor column, so a frame costs a copy, not a plot. Frames are read from the store
READ_STEPS at a time and written as H.264 (yuv420p, plays in browsers) with imageio-ffmpeg, under a
temporary name that is renamed once the file is complete.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wm.data.info import BACKGROUND, TEXT, _to_rgb, success_label
from wm.data.store import DemoStore
from wm.media import video_writer

MIN_HEIGHT = 256  # camera frames are upscaled by an integer factor to at least this many px
MIN_WIDTH = 480  # the plots get at least this width, whatever the cameras' width
HEADER_H = 16
PLOT_H = 110  # px per plotted key
GAP = 2  # px between cameras
MAX_DIMS = 16  # dimensions drawn per plotted key
READ_STEPS = 64
CURSOR = np.array([230, 40, 40], np.uint8)
PLOT_KINDS = ("proprio", "action", "lowdim")


def plot_keys(store: DemoStore) -> list[str]:
    """The low-dimensional numeric keys drawn under the frames, in schema order."""
    out = []
    for key, spec in store.schema.keys.items():
        dtype = np.dtype(spec.dtype)
        if spec.kind in PLOT_KINDS and (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            out.append(key)
    return out


def episode_video(store: DemoStore, episode: int, out: str | Path, *, min_height: int = MIN_HEIGHT) -> Path:
    """Write episode `episode` of `store` as an mp4 at `out`; returns `out` once it is complete."""

    sl = store.episode_slice(episode)
    n = sl.stop - sl.start
    cams = store.schema.keys_of_kind("image")
    heights = [store.schema.keys[k].shape[0] for k in cams]
    cam_h = max(heights) * math.ceil(min_height / max(heights)) if cams else 0
    cam_w = [round(store.schema.keys[k].shape[1] * cam_h / h) for k, h in zip(cams, heights, strict=True)]
    width = max(MIN_WIDTH, sum(cam_w) + GAP * max(0, len(cams) - 1))
    width += width % 2
    keys = plot_keys(store)
    plot, cursor_x, rows = _plot(store, episode, keys, width, n)
    captions = _captions(cams, cam_w, width) if cams else np.zeros((0, width, 3), np.uint8)
    info = store.episode_info(episode)
    flag = success_label(info)
    task = info.get("task") or store.schema.task
    out = Path(out)
    with video_writer(out, float(store.schema.fps)) as writer:
        for lo in range(sl.start, sl.stop, READ_STEPS):
            hi = min(lo + READ_STEPS, sl.stop)
            frames = {k: store.read(k, slice(lo, hi), episode=episode) for k in cams}
            for j in range(hi - lo):
                t = lo + j - sl.start
                header = _text(f"episode {episode}  step {t} of 0..{n - 1}  success {flag}  {task}", width)
                camera = _camera_row([frames[k][j] for k in cams], cam_h, cam_w, width)
                p = plot.copy()
                for r0, r1 in rows:  # (plot rows of each axes)
                    p[r0:r1, cursor_x[t] : cursor_x[t] + 2] = CURSOR
                frame = np.concatenate([header, captions, camera, p], axis=0)
                writer.append_data(np.pad(frame, ((0, frame.shape[0] % 2), (0, 0), (0, 0))))
    return out


def _text(text: str, width: int, height: int = HEADER_H) -> np.ndarray:
    """(height, width, 3) strip with `text` left-aligned."""
    strip = Image.new("RGB", (width, height), BACKGROUND)
    ImageDraw.Draw(strip).text((4, 2), text, fill=TEXT, font=ImageFont.load_default())
    return np.asarray(strip)


def _captions(cams: list[str], cam_w: list[int], width: int) -> np.ndarray:
    strip = Image.new("RGB", (width, HEADER_H), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    x = 0
    for k, w in zip(cams, cam_w, strict=True):
        draw.text((x + 4, 2), k, fill=TEXT, font=ImageFont.load_default())
        x += w + GAP
    return np.asarray(strip)


def _camera_row(frames: list[np.ndarray], cam_h: int, cam_w: list[int], width: int) -> np.ndarray:
    """Frames side by side, each nearest-neighbour scaled to (cam_h, its width), left-aligned."""
    row = np.empty((cam_h, width, 3), np.uint8)
    row[:] = BACKGROUND
    x = 0
    for frame, w in zip(frames, cam_w, strict=True):
        rgb = np.asarray(_to_rgb(frame))
        h0, w0 = rgb.shape[:2]
        if cam_h % h0 == 0 and w == w0 * (cam_h // h0):  # integer factor: repeat pixels
            k = cam_h // h0
            big = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
        else:
            big = np.asarray(Image.fromarray(rgb).resize((w, cam_h), Image.Resampling.NEAREST))
        row[:, x : x + w] = big
        x += w + GAP
    return row


def _plot(
    store: DemoStore, episode: int, keys: list[str], width: int, n: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The plots of `keys` over the episode as (len(keys) * PLOT_H, width, 3) uint8, the cursor's pixel
    column for each step (n,), and the pixel rows (r0, r1) of each axes, top to bottom."""
    if not keys:
        return np.zeros((0, width, 3), np.uint8), np.zeros(n, np.int64), []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    height = PLOT_H * len(keys)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=np.asarray(BACKGROUND) / 255)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    fig.subplots_adjust(left=0.09, right=0.99, top=1 - 6 / height, bottom=32 / height, hspace=0.3)
    t = np.arange(n)
    for ax, key in zip(axes, keys, strict=True):
        x = store.read(key, store.episode_slice(episode), episode=episode).astype(np.float64)
        x = x.reshape(n, -1)[:, :MAX_DIMS]  # (T, D)
        ax.set_facecolor("white")
        ax.plot(t, x, linewidth=0.8)
        ax.set_xlim(-0.5 if n == 1 else 0, 0.5 if n == 1 else n - 1)
        ax.set_ylabel(key, fontsize=7, color="white")
        ax.tick_params(labelsize=6, colors="white")
        names = store.schema.keys[key].names
        if names and x.shape[1] <= 8:
            ax.legend(list(names)[: x.shape[1]], fontsize=5, loc="upper right", ncol=min(4, x.shape[1]))
    axes[-1].set_xlabel("step", fontsize=7, color="white")
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (height, width, 3), row 0 at the top
    cursor = axes[0].transData.transform(np.stack([t, np.zeros(n)], axis=1))[:, 0]
    # 2 px wide on even columns: H.264's 4:2:0 chroma covers 2x2 blocks, so the red stays red
    cursor_x = np.clip(np.round(cursor).astype(np.int64) - 1, 0, width - 2) // 2 * 2
    rows = [(int(height - ax.bbox.y1), int(height - ax.bbox.y0)) for ax in axes]
    return img, cursor_x, rows
