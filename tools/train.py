"""`wm-train model=dino_wm task=pointmaze store=PATH out=DIR [trainer.steps=N ...]`: train any registered
model (`wm.registry`) with the one trainer. The model type comes from the `model` config group;
`model=consistency teacher=DIR` distills a trained diffusion policy.

It says where the run goes (the directory, its TensorBoard logs) and, at the end, where the last and
the best checkpoints are. Rerunning into the same out= resumes from the latest checkpoint; Ctrl-C saves
one at the step reached, prints the command that resumes, and exits with status 130."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tools._cli import UsageError, app, bind, build, folder
from wm.data import DemoStore, SchemaError, StoreError
from wm.options import check_feature_cache, override


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
    video_store: str | None = None
    video_ratio: float | None = None  # with video_store: 0.5 unless given

    def __post_init__(self) -> None:
        if "type" not in self.model:
            raise ValueError("model config needs a 'type' (choose a model: model=dino_wm)")
        if not 0 <= self.val_ratio < 1:
            raise ValueError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if not 0 <= self.seed < 2**63:  # numpy's and torch's words ("Overflow when unpacking long long")
            raise ValueError(f"seed must be in 0..2**63 - 1, got {self.seed}")
        check_feature_cache(self.feature_cache)
        if self.video_ratio is not None and not self.video_store:
            raise ValueError(
                f"video_ratio={self.video_ratio} without video_store=: there is no video to mix in"
            )
        if self.video_store and self.video_ratio is None:
            object.__setattr__(self, "video_ratio", 0.5)
        if self.video_ratio is not None and not 0 <= self.video_ratio < 1:
            raise ValueError(f"video_ratio must be in [0, 1), got {self.video_ratio}")
        folder("out", self.out, "give the run's folder (new, or one to resume)")


# what a run's checkpoint must share with this run to be resumed: the data, its split and the inputs
SAME_DATA = (
    "store",
    "store_fingerprint",
    "store_edges",
    "store_episodes",
    "seed",
    "val_ratio",
    "image_key",
    "proprio_key",
    "video_store",  # a UWM's action-free videos, and their share of its batches
    "video_ratio",
)


def check_task(cfg: TrainAppConfig) -> tuple[dict[str, Any], dict[str, str | None], str | None]:
    """The store's task matches `task=` (when given); returns what the run records of the store (its
    absolute path, content fingerprint and episode count: wm-eval finds it from anywhere and says when
    it has changed), the keys a run that names none trains on (the store's first camera and
    proprioception keys) and the task (the store's, or `task=`)."""
    from wm.training import data_keys

    with DemoStore.open(cfg.store) as store:
        recorded = store.schema.task
        facts = {
            "store": str(Path(cfg.store).resolve()),
            "store_fingerprint": store.fingerprint,
            # the fingerprint does not read the data: the first and last rows of every non-image key do
            # (a store of the same schema, lengths and info, given after the recorded one was deleted)
            "store_edges": store.frames_fingerprint(
                [k for k, spec in store.schema.keys.items() if spec.kind != "image"]
            ),
            "store_episodes": store.n_episodes,
            "video_store": str(Path(cfg.video_store).resolve()) if cfg.video_store else None,
            "store_robot": store.schema.robot,  # what wm-eval / wm-deploy compare their robot and rate with
            "store_fps": store.schema.fps,
        }
        image_key, proprio_key = data_keys(store, None, None, need_actions=False)
        defaults = {"image_key": image_key, "proprio_key": proprio_key}
    if cfg.task is not None and recorded and recorded != cfg.task:
        raise SchemaError(f"{cfg.store}: recorded for task {recorded!r}, but task={cfg.task!r} was given")
    return facts, defaults, recorded or cfg.task


def data_changes(then: dict[str, Any], now: dict[str, Any], defaults: dict[str, str | None]) -> list[str]:
    """What differs (`changed_entries`) between a checkpoint's run config and this run's in `SAME_DATA`,
    as the runs used it: a key left unset is the store's default (`image_key=rgb` spelled out resumes a
    run that named none), and a store at another path is the same store when the checkpoint recorded
    its content fingerprint and the store was moved or copied there (`moved_or_copied`). A distilled
    model's teacher file must be the same too: teacher=DIR is the teacher run's latest checkpoint, and a
    student resumed after that run trained on switched teachers mid-distillation."""
    from wm.resume import changed_entries

    def used(run: dict[str, Any]) -> dict[str, Any]:
        out = run | {k: run.get(k) or v for k, v in defaults.items() if k in run}
        if "video_ratio" in run and not run.get("video_store"):  # no video: no share of it (runs before
            out["video_ratio"] = None  # 2026-12-04 recorded the default 0.5 without one, and never resumed)
        return out

    same_place = "store_fingerprint" in then and moved_or_copied(then.get("store"), now.get("store"))
    keys = [k for k in SAME_DATA if not (k == "store" and same_place)]
    changes = changed_entries(used(then), used(now), keys)
    teacher = then.get("teacher_checkpoint")  # a distilled model's teacher file (teacher=DIR: the latest)
    if teacher and teacher != now.get("teacher_checkpoint"):  # the teacher run trained on since
        kept = "give teacher= that file to resume" if Path(teacher).is_file() else "that file is gone"
        changes.append(f"the student learns from {teacher}: {kept}")
    codec = then.get("latent_checkpoint")  # a UWM's autoencoder file (model.latent.path=DIR: the latest)
    if codec and codec != now.get("latent_checkpoint"):  # the autoencoder run trained on since: the cached
        # latents would come from another codec than the one in the checkpoint
        there = Path(codec).is_file()
        kept = "give +model.latent.path= that file to resume" if there else "that file is gone"
        changes.append(f"the model's latents come from {codec}: {kept}")
    return changes


def latent_checkpoint(model_config: dict[str, Any]) -> str | None:
    """The autoencoder checkpoint file a UWM's latents come from (its `model.latent.path` a run folder:
    the latest checkpoint there), or None for another model or codec."""
    latent = model_config.get("latent")
    if not isinstance(latent, dict) or latent.get("source") != "autoencoder" or not latent.get("path"):
        return None
    from wm.checkpoint import latest_checkpoint

    path = Path(latent["path"])
    found = path if path.is_file() else latest_checkpoint(path)
    return str(found.resolve()) if found is not None else None


def moved_or_copied(old: str | None, new: str | None) -> bool:
    """Whether the store at `new` may be the one a run recorded at `old`: the same path; `old` gone (the
    store moved; the content fingerprint, compared beside this, vouches for it); or a copy of the store
    still at `old` (equal fingerprints and equal first and last rows of every key in every episode: the
    fingerprint alone does not read the data, and two stores of one schema, lengths and info share it)."""
    if old == new or old is None or new is None:
        return old == new
    if not Path(old).exists():
        return True
    try:
        with DemoStore.open(old) as a, DemoStore.open(new) as b:
            if a.fingerprint != b.fingerprint:
                return False
            keys = sorted(a.schema.keys)
            return a.frames_fingerprint(keys) == b.frames_fingerprint(keys)
    except (StoreError, OSError):
        return False


def check_best_metric(model_type: str, best: str | None) -> None:
    """Refuse a `trainer.best_metric` the model does not validate (wm-train; wm-demo before it collects)."""
    from wm.registry import model_entry

    metrics = model_entry(model_type).val_metrics
    if metrics and best not in (None, "auto", *metrics):
        raise UsageError(
            f"trainer.best_metric={best!r} is not a validation metric of model={model_type} "
            f"({', '.join(metrics)}); name one of those, 'auto' (the first) or null (no best.pt)"
        )


def train(cfg: TrainAppConfig) -> int:
    from wm.registry import model_entry
    from wm.trainer import Trainer, TrainerConfig, TrainingInterrupted, pick_device
    from wm.training import setup_training

    model_type = cfg.model["type"]
    entry = model_entry(model_type)  # an unknown type fails here, before the store is read
    trainer_opts = dict(cfg.trainer)
    for key, value in entry.trainer_overrides.items():
        if trainer_opts.get(key) != value:
            print(f"note: {model_type} trains with trainer.{key}={value} (was {trainer_opts.get(key)})")
        trainer_opts[key] = value
    trainer_cfg = build(TrainerConfig, trainer_opts, "trainer")  # checked before any work
    check_best_metric(model_type, trainer_cfg.best_metric)
    store_facts, default_keys, task = check_task(cfg)
    import torch

    torch.manual_seed(cfg.seed)  # the model's initialization (torch's default seed differs every run)
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
        video_store=cfg.video_store,
        video_ratio=cfg.video_ratio or 0.0,  # None: no video store (its default was set above)
        device=pick_device(trainer_cfg.device, int(os.environ.get("LOCAL_RANK", "0"))),  # the cache's
    )
    run_config = {
        **json.loads(json.dumps({**cfg.__dict__, "trainer": trainer_opts}, default=str)),  # as it ran
        **store_facts,
        "teacher_checkpoint": setup.model_config.get("teacher"),
        "latent_checkpoint": latent_checkpoint(setup.model_config),
    }
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
        same_on_resume=partial(data_changes, defaults=default_keys),
    )
    out, main = Path(cfg.out).resolve(), trainer.is_main  # under torchrun: rank 0 speaks
    from policies.diffusion.obs_encoder import ObsEncoderConfig

    obs = getattr(getattr(setup.model, "cfg", None), "obs", None)  # a diffusion policy's cameras
    blind = obs.blind_note() if isinstance(obs, ObsEncoderConfig) else None
    if main and blind is not None:
        print(f"note: {blind}")
    if main:
        print(f"run directory: {out}")
        print(f"TensorBoard logs: {out / 'tb'} (view them: tensorboard --logdir {out / 'tb'})")
    try:
        metrics = trainer.fit()
    except TrainingInterrupted as e:
        if main:  # from here: any path in it (store=, teacher=, a weights file) may be relative
            print(
                f"to resume from step {e.step}, run the same command from {Path.cwd()}: {command_line()}",
                file=sys.stderr,
            )
        raise
    if main:
        say_checkpoints(out, trainer.best, model_type, task, Path(cfg.store).resolve())
        print(summary_line(cfg.out, metrics))
    return 0


def summary_line(out: str, metrics: dict[str, float]) -> str:
    """The run's last line: its out= and final metrics as JSON, each to 7 significant digits (rounded to 6
    decimals, a validation error of 2.4e-07 read 0.0)."""
    return json.dumps({"out": out, **{k: float(f"{v:.7g}") for k, v in metrics.items()}})


def say_checkpoints(
    out: Path,
    best: dict[str, Any] | None,
    model_type: str,
    task: str | None = None,
    store: Path | None = None,
) -> None:
    """Where the run's last and best checkpoints are, and how each is used: loaded by wm-eval (on `task`,
    the store's, when it is a simulated task), or, for a component that serves no controller (the
    autoencoder), given to the model that uses it, trained on `store` (the one it learned; `out=DIR` left
    to the user)."""
    from robots.registry import task_names
    from wm.checkpoint import BEST_NAME, latest_checkpoint
    from wm.registry import model_entry

    def use(path: Path) -> str:
        controllers = model_entry(model_type).controllers
        if controllers:  # (wm-eval's defaults are task=pointmaze controller=mpc: a policy's hint failed)
            chosen = [] if controllers[0] == "mpc" else [f"controller={controllers[0]}"]
            chosen += [f"task={task}"] if task in task_names() and task != "pointmaze" else []
            return shlex.join(["wm-eval", *chosen, override("checkpoint", path)])
        latent = ["model=uwm", f"model.latent.source={model_type}", override("+model.latent.path", path)]
        data = [] if store is None else [override("store", store)]
        return shlex.join(["wm-train", *data, *latent, "out=DIR"])

    print(f"last checkpoint: {latest_checkpoint(out)} ({use(out)} loads it)")
    if best is None:
        print("best checkpoint: none (no validation ran: val_ratio=0, too few episodes, or best_metric=null)")
        return
    value = f"{best['metric']}={best['value']:.4g} at step {best['step']}"
    print(f"best checkpoint: {out / BEST_NAME} ({value}; use it: {use(out / BEST_NAME)})")


def command_line() -> str:
    """This process's command line as a user types it again (`wm-train ...`, or `wm-demo ...` when the
    demo trains); a script run as `python -m tools.train` is named that way, and one of several
    `torchrun` processes is prefixed with a single-node `torchrun --nproc_per_node=N`."""
    argv0 = Path(sys.argv[0])
    prog = argv0.name
    if argv0.suffix == ".py":
        prog = f"-m tools.{argv0.stem}" if argv0.parent.name == "tools" else str(argv0)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        prog = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')} {prog}"
    elif argv0.suffix == ".py":
        prog = f"python {prog}"
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def _main(cfg: DictConfig) -> int:
    return train(bind(TrainAppConfig, cfg))


main = app("train", _main)


if __name__ == "__main__":
    main()
