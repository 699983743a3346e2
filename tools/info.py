"""`wm-info store=PATH`: what a demonstration store holds, as text or JSON, plus a contact sheet;
`verify=true` checks every chunk, `drop_episodes=[...]` removes episodes (crash-safe rewrite),
`video=true` writes one mp4 per episode shown."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools._cli import app, bind, folder, sigterm_interrupts
from wm.data import CorruptStoreError, DemoStore, delete_episodes
from wm.data.info import _pick_episodes, check_episodes, contact_sheet, format_summary, summarize
from wm.data.layout import with_damage_listed

SHOWN = 6  # episodes on the contact sheet by default (configs/info.yaml)


@dataclass(frozen=True)
class InfoConfig:
    store: str
    format: str = "text"
    contact_sheet: str = "auto"
    episodes: int | list[int] = SHOWN  # how many to show, or which ones
    verify: bool = False
    drop_episodes: list[int] | None = None
    video: bool = False
    video_dir: str = "auto"

    def __post_init__(self) -> None:
        if not str(self.store).strip():  # "." (the current folder) was said not to be a store
            raise ValueError("store= is empty: give the path of a store")
        if self.format not in ("text", "json"):
            raise ValueError(f"format must be 'text' or 'json', got {self.format!r}")
        if isinstance(self.episodes, list):
            if not self.episodes or not all(_is_int(e) for e in self.episodes):
                raise ValueError(
                    f"episodes must be a count or a non-empty list of indices, got {self.episodes}"
                )
        elif not _is_int(self.episodes) or self.episodes < 1:
            raise ValueError(f"episodes must be >= 1 or a list of indices, got {self.episodes!r}")
        if self.drop_episodes is not None and not (
            isinstance(self.drop_episodes, list) and all(_is_int(e) for e in self.drop_episodes)
        ):
            raise ValueError(f"drop_episodes must be a list of episode indices, got {self.drop_episodes!r}")
        if self.drop_episodes is not None:  # an irreversible edit: each episode by its own number, once
            negative = [e for e in self.drop_episodes if e < 0]
            twice = sorted({e for e in self.drop_episodes if self.drop_episodes.count(e) > 1})
            if negative or twice:
                why = f"negative {negative}" if negative else f"given twice {twice}"
                raise ValueError(
                    f"drop_episodes: episode numbers {why}; give each episode to delete once, by its "
                    "number from 0 (wm-info lists them)"
                )
        if self.video_dir != "auto" and not self.video:
            raise ValueError(f"video_dir={self.video_dir} is where video=true writes: give video=true too")
        if self.video_dir != "auto":
            folder("video_dir", self.video_dir)
        if self.contact_sheet not in ("none", "auto"):  # a folder (the sheet goes inside) or a file's path
            give = "give a folder or a .png path in one"
            sheet = Path(self.contact_sheet)
            folder("contact_sheet", self.contact_sheet, give, within=not sheet.is_dir())  # (not a store)
            if not sheet.is_dir() and sheet.suffix.lower() != ".png":  # a user's file was overwritten
                raise ValueError(f"contact_sheet={self.contact_sheet}: the sheet is a PNG; {give}")
        if self.episodes != SHOWN and self.contact_sheet == "none" and not self.video:
            raise ValueError(
                f"episodes={self.episodes} chooses what the contact sheet and videos show, and there are "
                "neither (contact_sheet=none): leave it out"
            )
        if self.drop_episodes is not None and isinstance(self.episodes, list):
            raise ValueError(
                "episodes=[...] with drop_episodes: dropping renumbers the episodes after them; drop first, "
                "then show the episodes by their new numbers"
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sheet_path(cfg: InfoConfig) -> Path | None:
    if cfg.contact_sheet == "none":
        return None
    store = _named(cfg.store)
    name = store.name.removesuffix(".zarr") + "_contact.png"
    if cfg.contact_sheet == "auto":
        return store.with_name(name)
    path = Path(cfg.contact_sheet)
    return path / name if path.is_dir() else path  # a folder: the sheet goes inside it


def video_dir(cfg: InfoConfig) -> Path:
    if cfg.video_dir == "auto":
        store = _named(cfg.store)
        return store.with_name(store.name.removesuffix(".zarr") + "_videos")
    return Path(cfg.video_dir)


def _named(store: str) -> Path:
    """The store's path with a name of its own (store=. or ..: the folder's), beside which its contact
    sheet and videos go: a symbolic link's, not where it points (they went beside the link's target)."""
    return Path(os.path.abspath(store))


def drop(cfg: InfoConfig) -> dict[str, Any]:
    """Remove `cfg.drop_episodes` by a crash-safe rewrite (also what repairs a damaged store)."""
    with DemoStore.open(cfg.store, salvage=True) as store:
        before = store.n_episodes
    delete_episodes(cfg.store, cfg.drop_episodes or [])
    with DemoStore.open(cfg.store) as store:
        after = store.n_episodes
    return {
        "episodes": sorted(cfg.drop_episodes or []),
        "before": before,
        "after": after,
    }


def show(cfg: InfoConfig, store: DemoStore, summary: dict[str, Any], episodes: list[int]) -> None:
    """Contact sheet and videos of `episodes`; their paths go into `summary`."""
    out = sheet_path(cfg)
    has_images = bool(store.schema.keys_of_kind("image"))
    if out is not None and has_images and episodes:
        try:
            summary["contact_sheet"] = str(contact_sheet(store, out, episodes=episodes).absolute())
        except OSError as e:  # beside a store on a read-only filesystem: the summary still prints
            if cfg.contact_sheet != "auto":
                raise
            summary["contact_sheet"] = None
            summary["contact_sheet_skipped"] = f"cannot write {out} ({e.strerror}): give contact_sheet=PATH"
    else:
        why = "contact_sheet=none" if out is None else "no image keys" if not has_images else "no episodes"
        summary["contact_sheet"] = None
        summary["contact_sheet_skipped"] = why
    if cfg.video:
        from wm.data.view import episode_video

        folder = video_dir(cfg)
        lengths = store.episode_lengths()
        summary["videos"] = {
            str(e): str(episode_video(store, e, folder / f"episode_{e:04d}.mp4").absolute())
            for e in episodes
            if lengths[e]
        }
        empty = [e for e in episodes if not lengths[e]]  # (other tools' stores hold some: no frame to show)
        if empty:
            summary["videos_skipped"] = f"episode(s) {empty} hold no steps"


def info(cfg: InfoConfig) -> int:
    from wm.data.verify import format_report, verify_store

    # store=. run inside the store: the rewrite of drop_episodes replaces the folder the process is in,
    # and the relative path then named nothing (the drop was done, then "No such file or directory")
    cfg = dataclasses.replace(cfg, store=str(Path(cfg.store).absolute()))
    extra: dict[str, Any] = {}
    text = []
    if cfg.drop_episodes is not None:
        d = extra["dropped"] = drop(cfg)
        text.append(
            f"dropped    episodes {d['episodes']} ({d['before']} -> {d['after']} episodes, crash-safe)"
        )
    if cfg.verify:
        report = verify_store(cfg.store)
        extra["verify"] = report.to_dict()
        text.append(format_report(report))
        if not report.ok:  # reading the store for a summary would only hit the damage
            print(json.dumps({"path": cfg.store, **extra}) if cfg.format == "json" else "\n".join(text))
            print(f"error: {report.summary_line()}", file=sys.stderr)
            return 2
    try:
        with DemoStore.open(cfg.store) as store:
            if isinstance(cfg.episodes, list):  # never with drop_episodes (InfoConfig)
                episodes = check_episodes(store, cfg.episodes)
            else:
                episodes = _pick_episodes(store.n_episodes, cfg.episodes, 0)
            summary = {**summarize(store), **extra}
            show(cfg, store, summary, episodes)
    except CorruptStoreError as e:  # (met reading the data: opening says it already)
        said = with_damage_listed(e, cfg.store)
        if said is e:
            raise
        raise said from e
    for key in summary["keys"].values():  # what training would refuse (float frames in [0, 1] drew black)
        problem = (key["stats"] or {}).get("problem") if key["kind"] == "image" else None
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    if cfg.format == "json":
        print(json.dumps(summary, allow_nan=False))
        return 0
    sheet = summary["contact_sheet"] or f"none ({summary['contact_sheet_skipped']})"
    text += [format_summary(summary), "", f"contact sheet  {sheet}"]
    text += [f"video          episode {e}: {path}" for e, path in summary.get("videos", {}).items()]
    if "videos_skipped" in summary:
        text.append(f"video          none for {summary['videos_skipped']}")
    print("\n".join(text))
    return 0


def _main(cfg: DictConfig) -> int:
    with sigterm_interrupts():  # a drop_episodes rewrite left its half-written <store>.wm-new behind
        return info(bind(InfoConfig, cfg, job_folder=None))


main = app("info", _main)


if __name__ == "__main__":
    main()
