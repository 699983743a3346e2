"""Diffusion policy on PushT (or arm_push): ours (`policies.diffusion`) vs LeRobot 0.4.4's `DiffusionPolicy`.

Same data, same architecture (ResNet-18 with GroupNorm + spatial softmax, 96 px frames randomly
cropped to 84 in training and center-cropped at inference, 2 observation steps, horizon 16,
8 actions executed, 1D UNet 256/512/1024 (`--down-dims`) with FiLM), same batch size, same number of optimizer
steps, same threads, same machine:

1. Data: `--episodes` scripted-expert demonstrations of `--task` (PushT by default; arm_push with its
   target drawn in the image; 96x96 images, `--expert-noise`) are recorded into a store,
   copied into a "bench" store with the keys `image`, `state`, `action`, `timestamp` (LeRobot needs
   the state under `observation.state`, and scalar per-step keys such as `loop_dt` are not copied),
   and converted with `store_to_lerobot` to a LeRobot v3.0 dataset (image mode, PNG in parquet).
   Everything is reused when `--workdir` already holds it.
2. Training throughput (samples/s, data loading included, after `--warmup-steps` untimed steps):
   LeRobot through `LeRobotDataset(delta_timestamps=resolve_delta_timestamps(...))`, its
   `EpisodeAwareSampler` (drop_n_last_frames=7) and a DataLoader, its preprocessor (normalization
   from `dataset.meta.stats`), `policy.forward`, backward, grad-norm clip 10 and its optimizer
   preset (Adam, lr 1e-4, betas 0.95/0.999, wd 1e-6), as `lerobot_train.update_policy` does it
   (no logging, no accelerate; its cosine LR scheduler with 500 warm-up steps is left out so both
   sides learn at the same constant rate). Ours through
   `setup_training` + `make_loader` + `compute_loss`, backward, clip 10, wm-train's AdamW
   (`wm.optim.adamw`: torch's fused kernel on the CPU) with the same hyper-parameters. Neither
   keeps an EMA copy.
3. Inference time per action chunk at batch 1 (median over `--chunks` calls, spread over `--rounds`
   rounds that visit every sampler in turn, two warm-up calls each time), with the trained models,
   the whole "observation in -> chunk out" call: LeRobot's preprocessor + `reset()` +
   `select_action` (which fills its queue with a new chunk) + postprocessor of the chunk; ours
   `sample_actions`. LeRobot DDPM-100 (its default) and DDIM-10 (the same weights in a policy
   built with `noise_scheduler_type="DDIM"`, `num_inference_steps=10`); ours DDIM-10 and EDM-3
   (Heun, 5 network calls) and EDM-3 with DPM++(2M) (3 calls; the default sampler) in fp32, with bf16
   inference (`policy.set_precision("bf16")`: the ResNet-18 backbone and the UNet's convolutions on
   bf16 weight copies) and at the default precision "auto" (bf16 where the CPU has bf16 units, the
   UNet's large layers on int8 weights where measured faster), EDM-2 with DPM++(2M) (2 calls) at
   "auto", and, with `--distill-steps > 0`, a 1-step
   consistency student distilled with `wm-train model=consistency`'s path (the one trainer), fp32 and
   bf16. LeRobot runs fp32 throughout. `--frames camera` gives ours the frames in the memory layout a
   deployment's do (`policies.inputs.frames_to_tensor` permutes (H, W, 3) camera frames: channels-last
   strides); LeRobot keeps contiguous frames, as its own `predict_action` makes them.
4. With `--eval-episodes > 0`: closed-loop success on the same seeds of the task through
   `policies.evaluate.run_episodes` on raw observations (LeRobot through a small adapter to our
   Policy protocol, ours through `ChunkPolicy`), with
   the short training budget of this script: it measures, it does not claim competence.

    python benchmarks/bench_policy.py [--episodes 50] [--train-steps 30] [--batch 64] [--chunks 10]
        [--distill-steps 0] [--eval-episodes 0] [--workdir runs/bench_policy] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; mujoco reads it when first imported

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_CFG = ROOT / "configs" / "model" / "diffusion_unet.yaml"
REPO_ID = "local/pusht_bench"
IMG = "observation.images.image"
STATE = "observation.state"
# The same optimizer hyper-parameters on both sides (LeRobot's diffusion preset).
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-4, (0.95, 0.999), 1e-6, 10.0


# ---------------------------------------------------------------------- data
def prepare_data(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Record (or reuse) the demonstrations; returns (bench store, LeRobot dataset root)."""
    from wm.data import DemoStore
    from wm.data.convert.lerobot import is_lerobot_dataset, store_to_lerobot

    raw, store, lerobot_root = workdir / "raw_store", workdir / "store", workdir / "lerobot"
    workdir.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        if not raw.exists():
            from tools.collect import CollectConfig, collect

            collect(
                CollectConfig(
                    task=args.task,
                    store=str(raw),
                    episodes=args.episodes,
                    seed=args.seed,
                    image_size=96,
                    noise_std=args.expert_noise,
                    realtime="false",
                    preview="false",
                    task_options=task_options(args.task),
                )
            )
        bench_store(raw, store)
    if not is_lerobot_dataset(lerobot_root):
        store_to_lerobot(store, lerobot_root, repo_id=REPO_ID, use_videos=False, overwrite=True)
    with DemoStore.open(store) as s:
        if s.n_episodes != args.episodes:
            print(f"note: reusing {store} with {s.n_episodes} episodes (asked for {args.episodes})")
    return store, lerobot_root


def task_options(task: str) -> dict[str, Any]:
    """arm_push draws its target in the image: a policy, unlike a planner, is given no goal."""
    return {"show_target": True} if task == "arm_push" else {}


def bench_store(src: Path, dst: Path) -> None:
    """Copy image / proprio (renamed `state`) / action / timestamp; `state` becomes `observation.state`."""
    from wm.data import DemoStore

    rename = {"image": "image", "proprio": "state", "action": "action", "timestamp": "timestamp"}
    tmp = dst.with_name(f".{dst.name}.copying")
    with DemoStore.open(src) as s:
        keys = {new: s.schema.keys[old] for old, new in rename.items()}
        out = DemoStore.create(tmp, dataclasses.replace(s.schema, keys=keys), overwrite=True)
        try:
            for i in range(s.n_episodes):
                ep = s.get_episode(i, keys=list(rename))
                with out.begin_episode() as writer:
                    writer.add_steps({new: ep[old] for old, new in rename.items()})
                    writer.end(s.episode_info(i))
        finally:
            out.close()
    os.replace(tmp, dst)


def endless(loader: Any) -> Iterator[Any]:
    """Batches epoch after epoch (a new pass over the loader each time, like lerobot's `cycle`)."""
    while True:
        yield from loader


# ---------------------------------------------------------------------- LeRobot
def lerobot_config(
    down_dims: tuple[int, ...], scheduler: str = "DDPM", inference_steps: int | None = None
) -> Any:
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    return DiffusionConfig(
        device="cpu",
        n_obs_steps=2,
        horizon=16,
        n_action_steps=8,
        vision_backbone="resnet18",
        crop_shape=(84, 84),  # lerobot 0.4.4's default is None (no crop)
        crop_is_random=True,
        pretrained_backbone_weights=None,  # no download possible; ours starts from scratch too
        use_group_norm=True,
        spatial_softmax_num_keypoints=32,
        down_dims=tuple(down_dims),  # 256/512/1024 here by default; lerobot 0.4.4's is 512/1024/2048
        kernel_size=5,
        n_groups=8,
        diffusion_step_embed_dim=128,
        noise_scheduler_type=scheduler,
        num_inference_steps=inference_steps,
        push_to_hub=False,
    )


def build_lerobot(
    root: Path, args: argparse.Namespace, scheduler: str = "DDPM", inference_steps: int | None = None
) -> tuple:
    """(dataset with the policy's delta_timestamps, policy, preprocessor, postprocessor)."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    cfg = lerobot_config(args.down_dims, scheduler, inference_steps)
    meta = LeRobotDatasetMetadata(REPO_ID, root=root)
    dataset = LeRobotDataset(REPO_ID, root=root, delta_timestamps=resolve_delta_timestamps(cfg, meta))
    policy = make_policy(cfg, ds_meta=dataset.meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=dataset.meta.stats)
    return dataset, policy, pre, post


def lerobot_loader(dataset: Any, policy: Any, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from lerobot.datasets.sampler import EpisodeAwareSampler

    sampler = EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"],
        dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=dataset.episodes,
        drop_n_last_frames=policy.config.drop_n_last_frames,
        shuffle=True,
    )
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        batch_size=batch,
        shuffle=False,
        sampler=sampler,
        drop_last=False,
        prefetch_factor=2 if workers > 0 else None,
    )


def lerobot_chunk(policy: Any, pre: Any, post: Any, obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """obs {IMG: (E, C, H, W) float in [0, 1], STATE: (E, Ds)} -> raw actions (E, n_action_steps, Da)
    through a cleared queue: the whole observation-in, chunk-out path."""
    from lerobot.utils.constants import ACTION

    policy.reset()
    first = policy.select_action(pre(dict(obs)))
    chunk = torch.stack([first, *policy._queues[ACTION]], dim=1)
    return post(chunk)


class LeRobotAdapter:
    """A LeRobot policy behind our `Policy` protocol (E episodes batched), fed the tasks' raw
    observations; it keeps its own observation history."""

    def __init__(self, policy: Any, pre: Any, post: Any) -> None:
        self.policy, self.pre, self.post = policy.eval(), pre, post

    @staticmethod
    def convert(obs: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(obs["image"]).permute(0, 3, 1, 2).float() / 255.0  # (E, 3, H, W)
        return {IMG: image, STATE: torch.from_numpy(obs["proprio"]).float()}

    def reset(self) -> None:
        self.policy.reset()

    def inference_seconds(self) -> list[float]:
        return []  # LeRobot's queue hides when it samples; action time is reported instead

    def predict_action_chunk(self, obs: dict[str, Any]) -> torch.Tensor:
        return lerobot_chunk(self.policy, self.pre, self.post, self.convert(obs))

    @torch.no_grad()
    def select_action(self, obs: dict[str, Any]) -> torch.Tensor:
        return self.post(self.policy.select_action(self.pre(self.convert(obs))))


class StateAsProprio:
    """Our policy (trained on the bench store's `state` key) fed the tasks' raw observations, whose
    proprioception key is `proprio`."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def reset(self) -> None:
        self.policy.reset()

    def inference_seconds(self) -> list[float]:
        return self.policy.inference_seconds()

    def predict_action_chunk(self, obs: dict[str, Any]) -> torch.Tensor:
        return self.policy.predict_action_chunk({**obs, "state": obs["proprio"]})

    def select_action(self, obs: dict[str, Any]) -> torch.Tensor:
        return self.policy.select_action({**obs, "state": obs["proprio"]})


def train_lerobot(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    dataset, policy, pre, post = build_lerobot(root, args)
    loader = lerobot_loader(dataset, policy, args.batch, args.workers)
    optimizer = policy.config.get_optimizer_preset().build(policy.get_optim_params())
    # Its cosine scheduler (500 warm-up steps) is left out, so that over a short budget both sides
    # learn at the same constant rate (a LambdaLR step costs nothing measurable).

    def step(batch: dict[str, Any]) -> float:
        loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    policy.train()
    # lerobot_train counts the preprocessor (normalization, device) in its data-loading time.
    stats = timed_training(endless(loader), pre, step, args)
    policy.eval()
    stats.update(params=n_params(policy), frames=dataset.num_frames, episodes=dataset.num_episodes)
    return {"stats": stats, "policy": policy, "pre": pre, "post": post, "dataset": dataset}


# ---------------------------------------------------------------------- ours
def build_ours(store: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    from wm.training import setup_training

    model_cfg = yaml.safe_load(MODEL_CFG.read_text())
    model_cfg["unet"]["down_dims"] = list(args.down_dims)
    setup = setup_training(
        "diffusion_unet",
        str(store),
        model_cfg,
        image_key="image",
        proprio_key="state",
        val_ratio=0.0,
        seed=args.seed,
        in_memory=True,
    )
    return setup.model, setup.train_set


def train_ours(store: Path, args: argparse.Namespace) -> dict[str, Any]:
    from wm.data.dataset import make_loader
    from wm.optim import TrainerConfig, adamw

    policy, train_set = build_ours(store, args)
    loader = make_loader(train_set, args.batch, shuffle=True, num_workers=args.workers, seed=args.seed)
    # wm-train's AdamW (fused where torch has the kernel), with LeRobot's hyper-parameters on every parameter
    hyper = TrainerConfig(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, device="cpu")
    optimizer = adamw([{"params": list(policy.parameters())}], hyper, torch.device("cpu"))

    def step(batch: dict[str, Any]) -> float:
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
        optimizer.step()
        return loss.item()

    policy.train()
    stats = timed_training(endless(loader), None, step, args)
    policy.eval()
    stats.update(params=n_params(policy), windows=len(train_set))
    return {"stats": stats, "policy": policy, "loader": loader, "store": store}


# ---------------------------------------------------------------------- measuring
def timed_training(
    batches: Iterator[Any], pre: Callable | None, step: Callable[[Any], float], args: argparse.Namespace
) -> dict[str, Any]:
    """`--warmup-steps` untimed steps, then `--train-steps` timed ones (data loading included)."""
    for _ in range(args.warmup_steps):
        batch = next(batches)
        step(pre(batch) if pre else batch)
    data_s = update_s = 0.0
    losses = []
    for i in range(args.train_steps):
        if i and i % 250 == 0:
            print(f"  step {i}/{args.train_steps}: loss {statistics.fmean(losses[-250:]):.4f}", flush=True)
        t0 = time.perf_counter()
        batch = next(batches)
        if pre is not None:
            batch = pre(batch)
        t1 = time.perf_counter()
        losses.append(step(batch))
        t2 = time.perf_counter()
        data_s, update_s = data_s + t1 - t0, update_s + t2 - t1
    wall = data_s + update_s
    return {
        "steps": args.train_steps,
        "batch": args.batch,
        "seconds": wall,
        "samples_per_s": args.batch * args.train_steps / wall if wall > 0 else None,
        "data_seconds": data_s,
        "update_seconds": update_s,
        "final_loss": losses[-1] if losses else None,
    }


def time_interleaved(
    configs: list[tuple[str, Callable[[], None], Callable[[], Any]]], n: int, rounds: int, warmup: int = 2
) -> dict[str, dict[str, Any]]:
    """Median (and all) wall times in ms of each config's call, `n` timed calls per config spread over
    `rounds` rounds; every round visits every config in turn (its `setup()`, `warmup` untimed calls,
    then its share of the timed calls), so a slow spell on the machine hits all configs alike."""
    ms: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    with torch.inference_mode():
        for r in range(rounds):
            for name, setup, fn in configs:
                setup()
                for _ in range(warmup):
                    fn()
                for _ in range(n // rounds + (r < n % rounds)):
                    t0 = time.perf_counter()
                    fn()
                    ms[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(v), "all_ms": v} for name, v in ms.items()}


def time_chunks(fn: Callable[[], Any], n: int, warmup: int = 2) -> dict[str, Any]:
    """Median (and all) wall times in ms of `fn()` over n calls after `warmup` untimed calls."""
    return time_interleaved([("fn", lambda: None, fn)], n, 1, warmup)["fn"]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inference(lr: dict[str, Any], ours: dict[str, Any], root: Path, args: argparse.Namespace) -> dict:
    """Per-chunk times at batch 1 on the same observation: a dataset window's two frames for ours; its
    current frame for LeRobot, whose queue repeats it as the history after `reset()` (the same compute:
    two image passes and the same sampler)."""
    sample = lr["dataset"][len(lr["dataset"]) // 2]
    lr_obs = {IMG: sample[IMG][-1:].float(), STATE: sample[STATE][-1:].float()}  # (1, ...) current step
    our_obs = {"image": sample[IMG][None].float(), "state": sample[STATE][None].float()}  # (1, 2, ...)
    if args.frames == "camera":  # the same values in the layout a camera's (H, W, 3) frames permuted have
        our_obs["image"] = our_obs["image"].movedim(-3, -1).contiguous().movedim(-1, -3)
    policy, pre, post = lr["policy"], lr["pre"], lr["post"]
    _, ddim, ddim_pre, ddim_post = build_lerobot(root, args, "DDIM", 10)
    ddim.load_state_dict(policy.state_dict())
    ddim.eval()
    lr["ddim"] = (ddim, ddim_pre, ddim_post)
    ours_policy = ours["policy"]
    default = (ours_policy.sampler, ours_policy.sampler_steps)
    solver = ours_policy.diffusion.cfg.edm_solver

    def ours_setup(sampler: str, steps: int, precision: str, edm_solver: str) -> Callable[[], None]:
        def setup() -> None:
            ours_policy.set_sampler(sampler, steps, edm_solver)
            ours_policy.set_precision(precision)

        return setup

    def ours_chunk() -> Any:
        return ours_policy.sample_actions(our_obs)

    configs: list[tuple[str, Callable[[], None], Callable[[], Any]]] = [
        ("lerobot_ddpm100", lambda: None, lambda: lerobot_chunk(policy, pre, post, lr_obs)),
        ("lerobot_ddim10", lambda: None, lambda: lerobot_chunk(ddim, ddim_pre, ddim_post, lr_obs)),
        ("ours_ddim10", ours_setup("ddim", 10, "fp32", solver), ours_chunk),
        ("ours_ddim10_bf16", ours_setup("ddim", 10, "bf16", solver), ours_chunk),
        ("ours_ddim10_auto", ours_setup("ddim", 10, "auto", solver), ours_chunk),
        ("ours_edm3", ours_setup("edm", 3, "fp32", "heun"), ours_chunk),
        ("ours_edm3_auto", ours_setup("edm", 3, "auto", "heun"), ours_chunk),
        ("ours_dpm3", ours_setup("edm", 3, "fp32", "dpmpp_2m"), ours_chunk),
        ("ours_dpm3_bf16", ours_setup("edm", 3, "bf16", "dpmpp_2m"), ours_chunk),
        ("ours_dpm3_auto", ours_setup("edm", 3, "auto", "dpmpp_2m"), ours_chunk),
        ("ours_dpm2_auto", ours_setup("edm", 2, "auto", "dpmpp_2m"), ours_chunk),
    ]
    out: dict[str, Any] = time_interleaved(configs, args.chunks, args.rounds)
    ours_policy.set_sampler(*default, solver)
    ours_policy.set_precision(ours_policy.cfg.precision)  # back to the default for the evaluation
    if args.distill_steps > 0:
        t0 = time.perf_counter()
        student = distill_ours(ours_policy, ours["store"], args)
        distill_s = time.perf_counter() - t0
        ours["student"] = student
        student.set_precision("fp32")  # the row says fp32 (the student's default is "auto": bf16 here)
        out["ours_consistency1"] = time_chunks(lambda: student.sample_actions(our_obs), args.chunks)
        out["ours_consistency1"]["distill_seconds"] = distill_s
        out["ours_consistency1"]["distill_steps"] = args.distill_steps
        student.set_precision("bf16")
        out["ours_consistency1_bf16"] = time_chunks(lambda: student.sample_actions(our_obs), args.chunks)
        student.set_precision(student.cfg.precision)
    return out


def distill_ours(teacher: Any, store: Path, args: argparse.Namespace) -> Any:
    """Consistency-distill our trained policy as `wm-train model=consistency` does (the one trainer,
    lr 1e-4, constant), into a scratch run directory; returns the distilled policy."""
    import tempfile

    from wm.checkpoint import save_checkpoint
    from wm.trainer import Trainer, TrainerConfig
    from wm.training import setup_training

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            Path(tmp) / "teacher" / "ckpt_00000001.pt",
            model_type=teacher.model_type,
            model_config=teacher.cfg.to_dict(),
            state_dict=teacher.state_dict(),
            ema_state_dict=None,
            normalizer=teacher.normalizer.to_dict(),
        )
        setup = setup_training(
            "consistency",
            str(store),
            {},
            proprio_key="state",
            val_ratio=0.0,
            teacher=str(Path(tmp) / "teacher"),
        )
        cfg = TrainerConfig(
            steps=args.distill_steps, batch_size=args.batch, lr=1e-4, weight_decay=0.0, warmup_steps=0,
            min_lr_ratio=1.0, ema_decay=0.0, val_every=0, ckpt_every=0, seed=args.seed,
        )  # fmt: skip
        Trainer(
            setup.model, setup.train_set, cfg, Path(tmp) / "student", model_type="consistency",
            model_config=setup.model_config, normalizer=setup.normalizer,
        ).fit()  # fmt: skip
    return setup.model.policy.eval()


def evaluate(lr: dict[str, Any], ours: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop success on the same seeds of `--task`: LeRobot (`--eval-lerobot`) and ours (its
    config's default sampler: the row names it, with the EDM solver)."""
    from policies.chunking import ChunkPolicy
    from policies.evaluate import run_episodes, summarize, timed
    from robots.registry import make_task
    from robots.sim.base import SimConfig

    opts: dict[str, Any] = {"image_size": (96, 96), "options": task_options(args.task)}
    if args.eval_max_steps:
        opts["max_steps"] = args.eval_max_steps
    n = min(args.eval_parallel, args.eval_episodes)
    tasks = [make_task(args.task, SimConfig(**opts)) for _ in range(n)]
    seeds = [args.eval_seed + i for i in range(args.eval_episodes)]

    if args.eval_lerobot == "ddim":
        lr_policy = LeRobotAdapter(*lr["ddim"])
    else:
        lr_policy = LeRobotAdapter(lr["policy"], lr["pre"], lr["post"])
    policy = ours["policy"]
    solver = f"_{policy.diffusion.cfg.edm_solver}" if policy.sampler == "edm" else ""  # ours_edm3_dpmpp_2m
    runs = {
        f"lerobot_{args.eval_lerobot}": lr_policy,
        f"ours_{policy.sampler}{policy.sampler_steps}{solver}": StateAsProprio(
            ChunkPolicy(policy, seed=args.seed)
        ),
    }
    out = {}
    for key, pol in runs.items():
        results, wall = timed(lambda p=pol: run_episodes(tasks, p, seeds))
        out[key] = summarize(results, wall)  # action_seconds_per_step: the same measure on both sides
    for task in tasks:
        task.disconnect()
    return out


# ---------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    import lerobot

    from wm.precision import describe_hardware

    return {
        "cpu": describe_hardware(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lerobot": getattr(lerobot, "__version__", "?"),
        "load_average_1min": os.getloadavg()[0],
    }


def report(res: dict[str, Any]) -> str:
    m, lt, ot = res["machine"], res["train"]["lerobot"], res["train"]["ours"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
        f"lerobot {m['lerobot']}",
        f"data: {lt['episodes']} {res['args']['task']} episodes, {lt['frames']} frames (96x96; ours at "
        f"inference in the layout of a {res['args']['frames']}'s frames), "
        f"{ot['windows']} training windows; params: LeRobot {lt['params'] / 1e6:.1f}M, "
        f"ours {ot['params'] / 1e6:.1f}M",
        "",
        "| measure | LeRobot 0.4.4 | ours | ours / LeRobot |",
        "|---|---|---|---|",
    ]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    ls, os_ = lt["samples_per_s"], ot["samples_per_s"]
    lines.append(
        f"| training, batch {lt['batch']}, {lt['steps']} steps (samples/s) | {ls:.2f} | {os_:.2f} "
        f"| {ratio(os_, ls)} |"
    )
    lines.append(
        f"| of which data loading (s / update s) | {lt['data_seconds']:.2f} / {lt['update_seconds']:.2f} "
        f"| {ot['data_seconds']:.2f} / {ot['update_seconds']:.2f} | |"
    )
    inf = res["inference"]
    base, lr_ddim = inf["lerobot_ddpm100"]["median_ms"], inf["lerobot_ddim10"]["median_ms"]
    rows = [
        ("LeRobot DDPM-100 (its default)", "lerobot_ddpm100", True),
        ("LeRobot DDIM-10", "lerobot_ddim10", True),
        ("ours DDIM-10, fp32", "ours_ddim10", False),
        ("ours DDIM-10, bf16", "ours_ddim10_bf16", False),
        ("ours DDIM-10, auto (the default precision)", "ours_ddim10_auto", False),
        ("ours EDM-3 (Heun, 5 calls), fp32", "ours_edm3", False),
        ("ours EDM-3 (Heun), auto (the default settings until 2026-12-02)", "ours_edm3_auto", False),
        ("ours EDM-3 (DPM++(2M), 3 calls), fp32", "ours_dpm3", False),
        ("ours EDM-3 (DPM++(2M)), bf16", "ours_dpm3_bf16", False),
        ("ours EDM-3 (DPM++(2M)), auto (the default settings)", "ours_dpm3_auto", False),
        ("ours EDM-2 (DPM++(2M), 2 calls), auto", "ours_dpm2_auto", False),
        ("ours consistency 1-step, fp32", "ours_consistency1", False),
        ("ours consistency 1-step, bf16", "ours_consistency1_bf16", False),
    ]
    for label, key, is_lr in rows:
        if key not in inf:
            continue
        ms = inf[key]["median_ms"]
        cells = (f"{ms:.1f}", "") if is_lr else ("", f"{ms:.1f}")
        gain = "" if is_lr else f"{base / ms:.1f}x / {lr_ddim / ms:.1f}x over LeRobot DDPM-100 / DDIM-10"
        lines.append(
            f"| chunk, batch 1: {label} (ms, median of {len(inf[key]['all_ms'])}) | {cells[0]} | {cells[1]} "
            f"| {gain} |"
        )
    ours_ddim = inf["ours_ddim10"]["median_ms"]
    lines.append(
        f"| chunk, DDIM-10 on both sides (ms) | {lr_ddim:.1f} | {ours_ddim:.1f} | "
        f"{lr_ddim / ours_ddim:.2f}x speed-up |"
    )
    if "ours_consistency1" in inf:
        c = inf["ours_consistency1"]
        lines.append(
            f"| consistency distillation ({c['distill_steps']} steps, s) | | {c['distill_seconds']:.1f} | |"
        )
    for key, ev in res.get("eval", {}).items():
        rate = f"{ev['success_rate']:.0%}"
        cells = f"{rate} | " if key.startswith("lerobot") else f" | {rate}"
        dist, score = ev["mean_final_distance"], ev.get("mean_max_score")
        score_text = "" if score is None else f", mean max score (coverage / 0.95) {score:.3f}"
        lines.append(
            f"| {res['args']['task']} success, {key}, {ev['episodes']} episodes | {cells} "
            "| mean final distance "
            f"{dist if dist is None else f'{dist:.3g}'}{score_text}, wall {ev['wall_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=("pusht", "arm_push"), default="pusht")
    parser.add_argument("--episodes", type=int, default=50, help="expert episodes to record")
    parser.add_argument("--expert-noise", type=float, default=0.0, help="expert action noise (std)")
    parser.add_argument(
        "--down-dims", type=int, nargs=3, default=(256, 512, 1024), help="UNet widths (both sides)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: runs/bench_policy[_TASK]")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=30, help="timed optimizer steps per side")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=10, help="timed chunk predictions per sampler")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds the timed chunks are spread over"
    )
    parser.add_argument(
        "--distill-steps", type=int, default=0, help="consistency distillation steps (0: skip)"
    )
    parser.add_argument(
        "--frames",
        choices=("dataset", "camera"),
        default="dataset",
        help="our frames' layout at inference: a dataset window's (contiguous), a camera's (channels-last)",
    )
    parser.add_argument("--eval-episodes", type=int, default=0, help="closed-loop episodes (0: skip)")
    parser.add_argument("--eval-parallel", type=int, default=5, help="episodes run side by side")
    parser.add_argument("--eval-max-steps", type=int, default=0, help="episode length (0: the task's, 200)")
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument(
        "--eval-lerobot",
        choices=("ddpm", "ddim"),
        default="ddpm",
        help="LeRobot's sampler in the closed-loop evaluation (DDPM-100 or DDIM-10)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.chunks < 1 or args.rounds < 1:
        parser.error(f"--chunks and --rounds must be >= 1, got {args.chunks} and {args.rounds}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: load average {load:.2f} at start; with other processes on the cores, 2-thread "
            "timings swing by 2-20x (OpenMP threads wait on descheduled peers): run on an idle machine"
        )
    if args.workdir is None:
        args.workdir = (
            ROOT / "runs" / ("bench_policy" if args.task == "pusht" else f"bench_policy_{args.task}")
        )
    store, root = prepare_data(args.workdir, args)
    print(f"data ready: {store}, {root} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    lr = train_lerobot(root, args)
    print(f"LeRobot trained: {lr['stats']['samples_per_s']:.2f} samples/s", flush=True)
    torch.manual_seed(args.seed)
    ours = train_ours(store, args)
    print(f"ours trained: {ours['stats']['samples_per_s']:.2f} samples/s", flush=True)
    res: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train": {"lerobot": lr["stats"], "ours": ours["stats"]},
    }
    res["inference"] = inference(lr, ours, root, args)
    print("inference timed", flush=True)
    if args.eval_episodes > 0:
        if args.json:  # the timings so far survive a failure in the (long) closed-loop part
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))
        res["eval"] = evaluate(lr, ours, args)
    res["wall_seconds"] = time.perf_counter() - t_start
    res["load_average_1min_end"] = os.getloadavg()[0]
    print()
    print(report(res))
    print(
        f"\ntotal wall time {res['wall_seconds']:.0f} s; load average (1 min) at start "
        f"{res['machine']['load_average_1min']:.2f}, at end {res['load_average_1min_end']:.2f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
