"""Writing videos that browsers play and that appear only once complete: H.264 (or VP9) in yuv420p
through imageio's ffmpeg, frames of even sizes (the caller pads), into `<stem>.part<suffix>` that is
renamed into place when every frame is in, and deleted when anything fails."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from wm.interrupt import interrupts_held


@contextmanager
def video_writer(
    path: Path,
    fps: float,
    *,
    codec: str = "libx264",
    quality: float | None = 8.0,
    output_params: Sequence[str] = ("-movflags", "+faststart"),
) -> Iterator[Any]:
    """`with video_writer(path, fps) as w: w.append_data(frame)`, frames (H, W, 3) uint8 of one even
    size; `path`'s suffix picks the container (.mp4, .webm). Any other frame (float, another channel
    count, an odd or changing size), or no frame at all, is a ValueError naming the video, and no file
    is left behind."""
    import imageio.v2 as imageio

    path = Path(path)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):  # 0 played at 16 fps
        raise ValueError(f"{path}: fps must be a finite number > 0, got {fps!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. "File exists" naming a file on the way: say what failed
        said = type(e)(f"cannot write the video {path}: its folder cannot be made ({e})")
        said.errno = e.errno  # (its kind kept: a read-only filesystem or a file in the way is the user's)
        raise said from e
    part = path.with_name(f"{path.stem}.part{path.suffix}")  # ffmpeg picks the container from the suffix
    writer = imageio.get_writer(
        part,
        fps=fps,
        codec=codec,
        quality=quality,
        pixelformat="yuv420p",  # 4:2:0: the only pixel format every browser decodes
        macro_block_size=1,  # sizes are made even by the caller; no rescaling by imageio
        output_params=list(output_params),
        ffmpeg_log_level="error",
    )
    checked = _CheckedWriter(writer, path)
    try:
        yield checked
        if checked.count == 0:
            raise ValueError(f"{path}: no frames were written")
        with interrupts_held(second_interrupts=True):  # ffmpeg writes the file out; then an interrupt
            writer.close()  # lands, and the file is removed (a second one stops a hung ffmpeg)
        if not part.is_file():  # ffmpeg gave up (its own lines are above): not a rename error about .part
            raise OSError(f"{path}: ffmpeg wrote no video (its error is printed above)")
        part.replace(path)
    except BaseException:
        try:
            with interrupts_held(second_interrupts=True):  # (once closed, a second close does nothing)
                writer.close()
        finally:
            part.unlink(missing_ok=True)
        raise


class _CheckedWriter:
    """imageio's writer, taking only frames (H, W, 3) uint8 of one even size: imageio stretched a float
    frame of 0..255 values from its own min..max (a wrong brightness, only a warning), and ffmpeg wrote
    an empty file for an odd size."""

    def __init__(self, writer: Any, path: Path) -> None:
        self._writer, self._path, self._shape, self.count = writer, path, None, 0

    def append_data(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        shape = frame.shape
        if frame.ndim != 3 or shape[2] != 3 or frame.dtype != np.uint8 or shape[0] % 2 or shape[1] % 2:
            raise ValueError(
                f"{self._path}: frame {self.count} is {shape} {frame.dtype}; expected (H, W, 3) uint8 with "
                "even H and W (convert float frames in [0, 1] with (frame * 255).round().astype(np.uint8))"
            )
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"{self._path}: frame {self.count} is {shape}, the first frame {self._shape}")
        self._shape = shape
        if self.count == 0:  # the first frame starts ffmpeg: an interrupt landing before imageio had armed
            # its cleanup left ffmpeg running, writing after the caller was gone
            with interrupts_held(second_interrupts=True):
                self._writer.append_data(frame)
        else:
            self._writer.append_data(frame)
        self.count += 1
