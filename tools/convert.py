"""`wm-convert src=PATH dst=PATH`: LeRobot v3.0 <-> store, robomimic HDF5 -> store.

The direction comes from what `src` is: a store (it has `meta/episode_ends`) becomes a LeRobot
dataset; a LeRobot dataset (it has `meta/info.json`) or a robomimic HDF5 file becomes a store.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tools._cli import UsageError, app, bind, changed, folder, sigterm_interrupts
from wm.data.errors import NotAStoreError


@dataclass(frozen=True)
class ConvertConfig:
    src: str
    dst: str
    overwrite: bool = False
    zarr_format: int = 3
    video: bool = False
    repo_id: str = "local/converted"
    fps: float | None = None
    action_key: str = "actions"

    def __post_init__(self) -> None:
        folder("dst", self.dst, "give a path in a folder", within=True)
        if not self.repo_id.strip():  # written into the dataset's metadata, what LeRobot loads it by
            raise ValueError("repo_id= is empty; give the dataset's name, e.g. repo_id=user/pusht_demos")
        if self.zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {self.zarr_format}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")


def source_kind(src: Path) -> str:
    """'store', 'lerobot' or 'robomimic'; a clear error for anything else."""
    from wm.data.convert.lerobot import is_lerobot_dataset
    from wm.data.convert.robomimic import is_robomimic_hdf5

    if not src.exists():
        raise NotAStoreError(f"{src}: does not exist")
    if (src / "meta" / "episode_ends").exists() or _is_zip_store(src):
        return "store"
    if is_lerobot_dataset(src):
        return "lerobot"
    if src.is_file() and is_robomimic_hdf5(src):
        return "robomimic"
    raise NotAStoreError(
        f"{src}: not a demonstration store, a LeRobot v3.0 dataset (meta/info.json) or a robomimic HDF5 file"
    )


def _is_zip_store(src: Path) -> bool:
    if not (src.is_file() and zipfile.is_zipfile(src)):
        return False
    with zipfile.ZipFile(src) as z:
        return any(
            name.rstrip("/").endswith("meta/episode_ends/zarr.json")
            or name.endswith("meta/episode_ends/.zarray")
            for name in z.namelist()
        )


# the options each direction reads; the others, set, are refused rather than ignored
USED = {
    "store": ("overwrite", "video", "repo_id"),
    "lerobot": ("overwrite", "zarr_format"),
    "robomimic": ("overwrite", "zarr_format", "fps", "action_key"),
}
TARGET = {"store": "a LeRobot dataset", "lerobot": "a store", "robomimic": "a store"}


STORE_LIKE = (".zarr", ".zip", ".hdf5", ".h5")  # what a store -> LeRobot destination is not


def check_options(cfg: ConvertConfig, kind: str) -> None:
    others = [f.name for f in dataclasses.fields(ConvertConfig) if f.name not in ("src", "dst", *USED[kind])]
    given = changed(cfg, others)
    if given:
        raise UsageError(
            f"{', '.join(given)}: not used converting {kind} {cfg.src} to {TARGET[kind]} "
            f"(that takes {', '.join(USED[kind])}); leave them out"
        )


def convert(cfg: ConvertConfig) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local datasets only; never reach for the hub
    src, dst = Path(cfg.src), Path(cfg.dst)
    kind = source_kind(src)
    check_options(cfg, kind)
    if kind == "store":
        from wm.data.convert.lerobot import store_to_lerobot

        if dst.suffix.lower() in STORE_LIKE:  # it wrote a LeRobot folder under that name
            raise UsageError(
                f"dst={cfg.dst}: a store becomes a LeRobot dataset folder, not a {dst.suffix} file or store "
                "(there is no store -> robomimic conversion); name the folder without that suffix"
            )

        out = store_to_lerobot(src, dst, repo_id=cfg.repo_id, use_videos=cfg.video, overwrite=cfg.overwrite)
        print(f"wrote LeRobot dataset {out} ({'video' if cfg.video else 'image'} mode) from store {src}")
        return 0
    if kind == "lerobot":
        from wm.data.convert.lerobot import lerobot_to_store

        store = lerobot_to_store(src, dst, zarr_format=cfg.zarr_format, overwrite=cfg.overwrite)
    else:
        from wm.data.convert.robomimic import robomimic_to_store

        store = robomimic_to_store(
            src,
            dst,
            zarr_format=cfg.zarr_format,
            overwrite=cfg.overwrite,
            fps=cfg.fps,
            action_key=cfg.action_key,
        )
    print(f"wrote store {dst} ({store.n_episodes} episodes, {store.n_steps} steps) from {kind} {src}")
    store.close()
    return 0


def _main(cfg: DictConfig) -> int:
    with sigterm_interrupts():  # a conversion killed where it stood left its hidden .<dst>.converting.<pid>
        return convert(bind(ConvertConfig, cfg, job_folder=None, job_file="dst"))


main = app("convert", _main)

if __name__ == "__main__":
    main()
