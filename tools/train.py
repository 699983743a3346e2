"""`wm-train model=dino_wm task=pointmaze store=PATH out=DIR [trainer.steps=N ...]`: train any model
of the project with the one trainer. The model type comes from the `model` config group."""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    from wm.trainer import Trainer, TrainerConfig

    check_task(cfg)
    from wm.training import setup_diffusion, setup_dino_wm

    builders = {
        "dino_wm": setup_dino_wm,
        "diffusion_unet": setup_diffusion,
        "diffusion_transformer": setup_diffusion,
    }
    model_type = cfg.model["type"]
    if model_type not in builders:
        raise ValueError(f"unknown model type {model_type!r}; valid: {', '.join(builders)}")
    import torch

    torch.manual_seed(cfg.seed)  # the model's initialization (torch's default seed differs every run)
    setup = builders[model_type](
        cfg.store,
        cfg.model,
        image_key=cfg.image_key,
        proprio_key=cfg.proprio_key,
        val_ratio=cfg.val_ratio,
        seed=cfg.seed,
        in_memory=cfg.in_memory,
        feature_cache=cfg.feature_cache,
    )
    run_config = json.loads(json.dumps(cfg.__dict__, default=str))
    trainer = Trainer(
        setup.model,
        setup.train_set,
        TrainerConfig(**cfg.trainer),
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
