"""`wm-info store=PATH`: what a demonstration store holds, as text or JSON, plus a contact sheet."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tools._cli import bind, run
from wm.data import DemoStore
from wm.data.info import contact_sheet, format_summary, summarize


@dataclass(frozen=True)
class InfoConfig:
    store: str
    format: str = "text"
    contact_sheet: str = "auto"
    episodes: int = 6

    def __post_init__(self) -> None:
        if self.format not in ("text", "json"):
            raise ValueError(f"format must be 'text' or 'json', got {self.format!r}")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")


def sheet_path(cfg: InfoConfig) -> Path | None:
    if cfg.contact_sheet == "none":
        return None
    if cfg.contact_sheet == "auto":
        store = Path(cfg.store)
        return store.with_name(store.name.removesuffix(".zarr") + "_contact.png")
    return Path(cfg.contact_sheet)


def info(cfg: InfoConfig) -> int:
    with DemoStore.open(cfg.store) as store:
        summary = summarize(store)
        out = sheet_path(cfg)
        if out is not None and store.schema.keys_of_kind("image") and store.n_episodes:
            summary["contact_sheet"] = str(contact_sheet(store, out, n_episodes=cfg.episodes))
    if cfg.format == "json":
        print(json.dumps(summary, allow_nan=False))
    else:
        print(format_summary(summary))
        if "contact_sheet" in summary:
            print(f"contact sheet: {summary['contact_sheet']}")
    return 0


@hydra.main(config_path="../configs", config_name="info", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(lambda: info(bind(InfoConfig, cfg)))


if __name__ == "__main__":
    main()
