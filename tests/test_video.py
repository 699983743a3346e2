"""Evaluation video frames and episode videos: panel layout, upscaling, banners, real encoded files."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from policies.video import (
    FAILURE_RGB,
    SUCCESS_RGB,
    VideoConfig,
    add_banner,
    compose_frame,
    upscale,
    write_episode_video,
)
from wm.media import video_writer

CAP = VideoConfig().caption_height
BANNER = VideoConfig().banner_height


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_compose_upscales_crisply_to_min_height() -> None:
    real = _img(64, 64)
    frame = compose_frame(real)
    assert frame.shape == (CAP + 256, 256, 3) and frame.dtype == np.uint8
    # nearest-neighbour by 4: every sim pixel becomes a 4x4 block of the same colour
    np.testing.assert_array_equal(frame[CAP:], np.repeat(np.repeat(real, 4, axis=0), 4, axis=1))
    assert compose_frame(real, cfg=VideoConfig(min_height=100)).shape == (CAP + 128, 128, 3)
    assert compose_frame(_img(300, 200)).shape == (CAP + 300, 200, 3)  # tall enough: no upscale


def test_compose_resizes_panels_of_different_sizes_to_one_height() -> None:
    frame = compose_frame(_img(64, 64), _img(64, 64, 1), _img(96, 80, 2))
    # the tallest panel (96) sets the height: 96 * 3 = 288; 64 px panels follow to 288 x 288
    assert frame.shape == (CAP + 288, 288 + 2 + 288 + 2 + 240, 3)


def test_compose_leaves_out_missing_panels() -> None:
    real, goal = _img(64, 64), np.full((64, 64, 3), 200, np.uint8)
    assert compose_frame(real).shape[1] == 256
    frame = compose_frame(real, None, goal)
    assert frame.shape[1] == 256 + 2 + 256  # two panels, not three with a black one
    assert (frame[CAP:, -256:] == 200).all()  # the second panel is the goal


def test_compose_captions_each_panel() -> None:
    real = _img(64, 64)
    default = compose_frame(real, real)
    labelled = compose_frame(real, real, prediction_label="controller view")
    caption = default[:CAP]
    assert (caption.min(axis=-1) > 150).any()  # light text drawn on the dark caption strip
    assert not np.array_equal(caption[:, :256], caption[:, 258:])  # "camera" differs from "prediction"
    assert not np.array_equal(default[:CAP, 258:], labelled[:CAP, 258:])
    np.testing.assert_array_equal(default[CAP:], labelled[CAP:])  # the images are untouched


def test_compose_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        compose_frame(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="prediction"):
        compose_frame(_img(64, 64), np.zeros((64, 64), np.uint8))


def test_banner_colour_says_success_or_failure() -> None:
    frame = compose_frame(_img(64, 64))
    ok, bad = add_banner(frame, True, seed=7), add_banner(frame, False, seed=7)
    assert ok.shape == bad.shape == (BANNER + frame.shape[0], frame.shape[1], 3)
    assert tuple(ok[1, -1]) == SUCCESS_RGB and tuple(bad[1, -1]) == FAILURE_RGB
    assert (ok[:BANNER].min(axis=-1) > 200).any()  # white text drawn on the green strip
    assert not np.array_equal(add_banner(frame, True, seed=7), add_banner(frame, True, seed=8))


def test_upscale_integer_factor() -> None:
    img = _img(10, 6)
    assert upscale(img, 25).shape == (30, 18, 3)
    assert upscale(img, 10) is img


def _read(path: Path) -> tuple[list[np.ndarray], dict]:
    with imageio.get_reader(path) as reader:
        return list(reader.iter_data()), reader.get_meta_data()


@pytest.mark.parametrize(("codec", "suffix"), [("h264", ".mp4"), ("vp9", ".webm")])
def test_written_video_reads_back(tmp_path: Path, codec: str, suffix: str) -> None:
    cfg = VideoConfig(codec=codec)
    composed = [compose_frame(_img(64, 64, i), _img(64, 64, i + 1), cfg=cfg) for i in range(7)]
    path = write_episode_video(tmp_path / "episode_0003.mp4", iter(composed), 10, True, seed=3, cfg=cfg)
    assert path == tmp_path / f"episode_0003_success{suffix}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left
    frames, meta = _read(path)
    h, w = BANNER + composed[0].shape[0], composed[0].shape[1]
    assert len(frames) == 7 and frames[0].shape == (h + h % 2, w + w % 2, 3)
    assert meta["codec"] == codec and meta["pix_fmt"].startswith("yuv420p")
    assert np.abs(frames[0][4, 4].astype(int) - SUCCESS_RGB).max() < 16  # the banner survives encoding


def test_failure_video_named_and_red(tmp_path: Path) -> None:
    raw = [_img(63, 65, i) for i in range(3)]  # odd sides, raw sim frames: upscaled and padded even
    path = write_episode_video(tmp_path / "episode_0004.mp4", raw, 5, False, seed=4)
    assert path.name == "episode_0004_failure.mp4"
    frames, meta = _read(path)
    assert len(frames) == 3 and frames[0].shape == (BANNER + 63 * 5 + 1, 65 * 5 + 1, 3)
    assert meta["fps"] == 5
    assert np.abs(frames[0][4, 4].astype(int) - FAILURE_RGB).max() < 16


def test_write_refuses_mixed_sizes_and_no_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_episode_video(tmp_path / "e.mp4", [_img(256, 256), _img(256, 258)], 10, True)
    with pytest.raises(ValueError, match="no frames"):
        write_episode_video(tmp_path / "e.mp4", [], 10, True)
    assert list(tmp_path.iterdir()) == []  # nothing half-written stays behind


def _write(path: Path, frames: list[np.ndarray], fps: float = 10) -> None:
    with video_writer(path, fps) as writer:
        for frame in frames:
            writer.append_data(frame)


@pytest.mark.parametrize(
    ("frame", "shown"),
    [
        (_img(16, 16).astype(np.float32), r"\(16, 16, 3\) float32"),  # imageio stretched its min..max
        (np.zeros((16, 16, 4), np.uint8), r"\(16, 16, 4\) uint8"),
        (np.zeros((16, 16), np.uint8), r"\(16, 16\) uint8"),
        (np.zeros((15, 16, 3), np.uint8), r"\(15, 16, 3\) uint8"),  # ffmpeg wrote an empty file
    ],
    ids=["float", "rgba", "gray", "odd"],
)
def test_video_writer_refuses_frames_it_would_write_wrongly(tmp_path: Path, frame, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"v.mp4: frame 0 is {shown}; expected \(H, W, 3\) uint8 with even"):
        _write(tmp_path / "v.mp4", [frame, frame])
    assert list(tmp_path.iterdir()) == []  # nothing half-written stays behind


@pytest.mark.parametrize("fps", [0, -5, float("nan"), float("inf")])
def test_video_writer_refuses_a_rate_that_is_no_rate(tmp_path: Path, fps: float) -> None:
    """fps=0 wrote a video that played at 16 fps; -5 ended in a rename error about the .part file, NaN
    and inf in errors naming no video."""
    with pytest.raises(ValueError, match=r"v.mp4: fps must be a finite number > 0, got"):
        _write(tmp_path / "v.mp4", [_img(16, 16)], fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_video_writer_names_no_frames_and_a_path_it_cannot_make(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"v.mp4: no frames were written$"):  # was FileNotFoundError (.part)
        _write(tmp_path / "v.mp4", [])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"cannot write the video .*file/v.mp4: its folder cannot be made"):
        _write(tmp_path / "file" / "v.mp4", [_img(16, 16)])
    with pytest.raises(ValueError, match=r"frame 1 is \(18, 16, 3\), the first frame \(16, 16, 3\)"):
        _write(tmp_path / "v.mp4", [_img(16, 16), _img(18, 16)])
    _write(tmp_path / "v.mp4", [_img(16, 16), _img(16, 16, 1)])  # valid frames still write
    assert len(_read(tmp_path / "v.mp4")[0]) == 2


@pytest.mark.parametrize("during", ["start", "close", "close after an error", "hung close"])
def test_an_interrupt_while_ffmpeg_starts_or_finishes_leaves_no_ffmpeg_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    """Ctrl-C or SIGTERM (wm-eval's `sigterm_interrupts`) landing just after imageio had started ffmpeg,
    before its generator's cleanup was armed, left ffmpeg running: the app removed its staging folder
    and exited, then ffmpeg printed "Error opening output ... No such file or directory" after
    "interrupted"; one landing in the close (also the close after an error) left the .part file. Now
    ffmpeg's start and close finish first, the interrupt lands after, and nothing is left running or
    written; a close that hangs is stopped by a second interrupt."""
    import signal
    import subprocess
    import time

    started: list[subprocess.Popen] = []
    popen = subprocess.Popen
    closing = {"signals": 0, "since": None, "killed": False}

    class Interrupted(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            if str(tmp_path) not in " ".join(map(str, args[0])):
                return  # (imageio asking ffmpeg its version)
            started.append(self)
            if during == "start":
                signal.raise_signal(signal.SIGINT)  # Python raises it at the next instruction: here

        def poll(self):  # noqa: ANN202
            if during == "start" or self not in started or not self.stdin.closed:
                return super().poll()
            # the close: ffmpeg is writing the file out
            closing["since"] = closing["since"] or time.monotonic()
            if closing["signals"] < (2 if during == "hung close" else 1):
                closing["signals"] += 1
                signal.raise_signal(signal.SIGINT)
            if during == "hung close" and not closing["killed"]:
                if time.monotonic() - closing["since"] > 10:
                    raise RuntimeError("the second interrupt did not stop the hung close")
                return None  # still "running"
            return super().poll()

        def kill(self) -> None:
            closing["killed"] = True
            super().kill()

    monkeypatch.setattr(subprocess, "Popen", Interrupted)
    path = tmp_path / "v.mp4"
    try:
        with pytest.raises(KeyboardInterrupt):
            with video_writer(path, fps=10) as w:
                for i in range(3):
                    w.append_data(_img(32, 32, i))
                if during == "close after an error":
                    w.append_data(_img(34, 32))  # ValueError: another size; the close then meets Ctrl-C
        assert closing["killed"] == (during == "hung close")  # ffmpeg finished the file unless it hung
        if closing["killed"]:  # (a killed process is gone once reaped)
            started[0].wait(timeout=10)
        assert started and started[0].poll() is not None  # ffmpeg has exited: nothing writes after this
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
