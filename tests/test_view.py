"""Episode videos (`wm-info ... video=true`): cameras side by side and upscaled, low-dim keys plotted
under them with a cursor that follows the step, H.264 / yuv420p, and where the files went."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from wm.data import DemoStore, KeySpec, Schema
from wm.data import view as wm_view

BIN = Path(sys.executable).parent
T = 12


def _flat_frames(n: int, h: int, w: int, base: int) -> np.ndarray:
    """Frames of one flat colour each, changing with the step (H.264 keeps flat colour nearly exact)."""
    colour = np.stack([base + 10 * np.arange(n), 200 - 10 * np.arange(n), np.full(n, 90)], axis=1)
    return np.broadcast_to(colour[:, None, None, :], (n, h, w, 3)).astype(np.uint8).copy()


@pytest.fixture
def two_camera_store(tmp_path: Path) -> Path:
    schema = Schema(
        keys={
            "front": KeySpec((24, 32, 3), "uint8", "image"),
            "wrist": KeySpec((12, 16, 3), "uint8", "image"),
            "qpos": KeySpec((3,), "float32", "proprio", names=("x", "y", "z")),
            "action": KeySpec((2,), "float32", "action"),
            "loop_dt": KeySpec((), "float64", "lowdim"),
        },
        fps=10,
    )
    path = tmp_path / "cams.zarr"
    with DemoStore.create(path, schema) as s:
        for e in range(2):
            s.append_episode(
                {
                    "front": _flat_frames(T, 24, 32, 20 + e),
                    "wrist": _flat_frames(T, 12, 16, 60),
                    "qpos": np.linspace(-1, 1, 3 * T, dtype=np.float32).reshape(T, 3),
                    "action": np.sin(np.arange(2 * T, dtype=np.float32)).reshape(T, 2),
                    "loop_dt": np.full(T, 0.1),
                },
                {"success": e == 0},
            )
    return path


def test_episode_video_layout_and_cursor(two_camera_store, tmp_path):
    with DemoStore.open(two_camera_store) as s:
        assert wm_view.plot_keys(s) == ["qpos", "action", "loop_dt"]
        out = wm_view.episode_video(s, 1, tmp_path / "v" / "ep1.mp4")
    reader = imageio.get_reader(out)
    meta = reader.get_meta_data()
    frames = np.stack([f for f in reader])
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 10
    cam_h = 24 * 11  # smallest integer factor reaching 256 px
    top = 2 * wm_view.HEADER_H
    height = top + cam_h + 3 * wm_view.PLOT_H
    width = 2 * 32 * 11 + wm_view.GAP
    assert frames.shape == (T, height, width, 3)
    want = _flat_frames(T, 1, 1, 21)[:, 0, 0].astype(float)  # front camera of episode 1
    front = frames[:, top + 10 : top + cam_h - 10, 10 : 32 * 11 - 10].astype(float).mean(axis=(1, 2))
    np.testing.assert_allclose(front, want, atol=4)
    wrist = frames[:, top + 10 : top + cam_h - 10, 32 * 11 + wm_view.GAP + 10 : width - 10]
    np.testing.assert_allclose(
        wrist.astype(float).mean(axis=(1, 2)), _flat_frames(T, 1, 1, 60)[:, 0, 0], atol=4
    )
    # the cursor: the reddest column of the plots moves right, one step at a time
    plots = frames[:, top + cam_h :].astype(int)
    red = (plots[..., 0] - plots[..., 1:].mean(axis=-1) > 120).sum(axis=1)  # (T, W) red pixels per column
    cursor = red.argmax(axis=1)
    assert np.all(np.diff(cursor) > 0) and red.max(axis=1).min() > 2 * wm_view.PLOT_H // 2
    assert not list(out.parent.glob("*.part*"))


def test_store_without_images_gets_plots_only(tmp_path):
    schema = Schema(keys={"action": KeySpec((2,), "float32", "action")}, fps=5)
    with DemoStore.create(tmp_path / "low.zarr", schema) as s:
        s.append_episode({"action": np.zeros((4, 2), np.float32)})
        out = wm_view.episode_video(s, 0, tmp_path / "low.mp4")
    frames = np.stack([f for f in imageio.get_reader(out)])
    assert frames.shape == (4, wm_view.HEADER_H + wm_view.PLOT_H, wm_view.MIN_WIDTH, 3)


def test_wm_info_writes_videos_and_says_where(two_camera_store, tmp_path):
    videos = tmp_path / "clips"
    res = subprocess.run(
        [
            str(BIN / "wm-info"),
            f"store={two_camera_store}",
            "episodes=[1]",
            "video=true",
            f"video_dir={videos}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    sheet = tmp_path / "cams_contact.png"
    assert f"contact sheet  {sheet}" in res.stdout and sheet.is_file()
    assert f"video          episode 1: {videos / 'episode_0001.mp4'}" in res.stdout
    assert sorted(p.name for p in videos.iterdir()) == ["episode_0001.mp4"]
    assert len([f for f in imageio.get_reader(videos / "episode_0001.mp4")]) == T

    res = subprocess.run(
        [
            str(BIN / "wm-info"),
            f"store={two_camera_store}",
            "format=json",
            "contact_sheet=none",
            "video=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["contact_sheet"] is None and out["contact_sheet_skipped"] == "contact_sheet=none"
    auto = tmp_path / "cams_videos"
    assert out["videos"] == {str(e): str(auto / f"episode_{e:04d}.mp4") for e in (0, 1)}
    assert all(Path(p).is_file() for p in out["videos"].values())
