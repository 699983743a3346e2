"""Writing videos that browsers play and that appear only once complete: H.264 (or VP9) in yuv420p
through imageio's ffmpeg, frames of even sizes (the caller pads), into `<stem>.part<suffix>` that is
renamed into place when every frame is in, and deleted when anything fails."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
    size; `path`'s suffix picks the container (.mp4, .webm)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    try:
        yield writer
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    writer.close()
    part.replace(path)
