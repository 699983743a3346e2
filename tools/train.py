"""`wm-train model=dino_wm task=pointmaze store=PATH out=DIR [trainer.steps=N ...]`: train any registered
model (`wm.registry`) with the one trainer. The model type comes from the `model` config group;
`model=consistency teacher=DIR` distills a trained diffusion policy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tools._cli import bind, run
from wm.data import DemoStore, SchemaError


@dataclass(frozen=True)
class TrainAppConfig:
    store: str
    out: str
    model: dict[str, Any]
    trainer: dict[str, Any]
    task: str | None = None
    teacher: str | None = None
    image_key: str | None = None
    proprio_key: str | None = None
    val_ratio: float = 0.1
    seed: int = 0
    in_memory: bool = True
    feature_cache: str = "auto"

    def __post_init__(self) -> None:
        if "type" not in self.model:
            raise ValueError("model config needs a 'type' (choose a model: model=dino_wm)")
        if not 0 <= self.val_ratio < 1:
            raise ValueError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.feature_cache not in ("auto", "off"):
            raise ValueError(f"feature_cache must be auto or off, got {self.feature_cache!r}")


def check_task(cfg: TrainAppConfig) -> None:
    if cfg.task is None:
        return
    with DemoStore.open(cfg.store) as store:
        recorded = store.schema.task
    if recorded and recorded != cfg.task:
        raise SchemaError(f"{cfg.store}: recorded for task {recorded!r}, but task={cfg.task!r} was given")


def train(cfg: TrainAppConfig) -> int:
    from wm.registry import model_entry
    from wm.trainer import Trainer, TrainerConfig
    from wm.training import setup_training

    model_type = cfg.model["type"]
    entry = model_entry(model_type)  # an unknown type fails here, before the store is read
    check_task(cfg)
    trainer_opts = dict(cfg.trainer)
    for key, value in entry.trainer_overrides.items():
        if trainer_opts.get(key) != value:
            print(f"note: {model_type} trains with trainer.{key}={value} (was {trainer_opts.get(key)})")
        trainer_opts[key] = value
    trainer_cfg = TrainerConfig(**trainer_opts)
    setup = setup_training(
        model_type,
        cfg.store,
        cfg.model,
        image_key=cfg.image_key,
        proprio_key=cfg.proprio_key,
        val_ratio=cfg.val_ratio,
        seed=cfg.seed,
        in_memory=cfg.in_memory,
        feature_cache=cfg.feature_cache,
        teacher=cfg.teacher,
    )
    run_config = json.loads(json.dumps(cfg.__dict__, default=str))
    run_config["store"] = str(Path(cfg.store).resolve())  # the subgoal graph finds it from anywhere
    trainer = Trainer(
        setup.model,
        setup.train_set,
        trainer_cfg,
        cfg.out,
        model_type=model_type,
        model_config=setup.model_config,
        normalizer=setup.normalizer,
        val_fn=setup.val_fn,
        extra_state={"run_config": run_config},
    )
    metrics = trainer.fit()
    print(json.dumps({"out": cfg.out, **{k: round(v, 6) for k, v in metrics.items()}}))
    return 0


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(lambda: train(bind(TrainAppConfig, cfg)))


if __name__ == "__main__":
    main()
