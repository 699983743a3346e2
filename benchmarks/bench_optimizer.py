"""AdamW's step in wm-train: torch's fused kernel (what `wm.optim.adamw` builds on the CPU and CUDA)
against torch's default on the CPU, the single-tensor loop (what wm-train ran there before, and what
LeRobot's and Diffusion Policy's trainers run: torch has no multi-tensor `foreach` kernels for the
CPU's default choice), and the multi-tensor loop asked for explicitly (`foreach=True`), in the same
run, interleaved.

For each model: a store of `--episodes` scripted-expert episodes of its task is recorded (reused when
`--workdir` holds it), the model is built as wm-train builds it (`setup_training` with the model's
config file), and one training batch (`--batch` windows) gives real gradients (`compute_loss`, backward).
One optimizer of each kind over the model's parameter groups (`default_param_groups`, wm-train's), on
copies of the parameters with the same gradients; `--rounds` rounds time `--steps` steps of each, in
an order that rotates from round to round. The forward and backward of the same batch are timed in the
same rounds, so the share of the optimizer in a step is printed beside it (wm-train's step also clips
the gradients and updates the EMA: not counted here).

    python benchmarks/bench_optimizer.py [--models diffusion_unet dino_wm] [--batch 64] [--rounds 6]
        [--steps 5] [--threads 2] [--workdir runs/bench_optimizer] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; mujoco reads it when first imported

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # model type -> (task, image size): the task wm-demo or bench_policy trains it on
    "diffusion_unet": ("pusht", 96),
    "diffusion_transformer": ("pusht", 96),
    "dino_wm": ("pointmaze", 64),
}


def record(task: str, image_size: int, args: argparse.Namespace) -> Path:
    """The store of `args.episodes` expert episodes of `task` (recorded once per workdir)."""
    from tools.collect import CollectConfig, collect

    store = args.workdir / f"{task}_{image_size}"
    if not store.exists():
        collect(
            CollectConfig(
                task=task,
                store=str(store),
                episodes=args.episodes,
                seed=0,
                image_size=image_size,
                realtime="false",
                preview="false",
            )
        )
    return store


def built(model_type: str, store: Path, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The model as wm-train builds it from its config file, and one training batch of `args.batch`."""
    from wm.data.dataset import make_loader
    from wm.training import setup_training

    options = yaml.safe_load((ROOT / "configs" / "model" / f"{model_type}.yaml").read_text())
    options.pop("type", None)
    setup = setup_training(model_type, str(store), options, val_ratio=0.0, seed=0, in_memory=True)
    loader = make_loader(setup.train_set, args.batch, shuffle=True, seed=0, drop_last=True)
    return setup.model.train(), next(iter(loader))  # (float frames: setup_training's dataset's default)


def gradients(model: nn.Module, batch: dict[str, Any]) -> float:
    """One forward and backward of `batch` into the model's `.grad`s; returns the seconds it took."""
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    loss, _ = model.compute_loss(batch)
    loss.backward()
    return time.perf_counter() - t


KINDS = ("fused", "single", "foreach")  # wm-train's; torch's CPU default before; the multi-tensor loop


def optimizers(model: nn.Module) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """One AdamW of each of `KINDS`, each on its own copy of `model` (gradients copied too)."""
    from wm.optim import TrainerConfig, adamw, default_param_groups

    cfg = TrainerConfig(device="cpu")
    out = {}
    for kind in KINDS:
        twin = copy.deepcopy(model)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        groups = default_param_groups(twin, cfg.weight_decay)
        if kind == "fused":
            opt = adamw(groups, cfg, torch.device("cpu"))
            assert all(g["fused"] for g in opt.param_groups), "wm.optim.adamw is not fused on the CPU"
        else:  # fused=False, foreach=None: torch's default on the CPU
            foreach = True if kind == "foreach" else None
            opt = torch.optim.AdamW(
                groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=foreach
            )
        out[kind] = (twin, opt)
    return out


def measure(model_type: str, args: argparse.Namespace) -> dict[str, Any]:
    task, size = MODELS[model_type]
    model, batch = built(model_type, record(task, size, args), args)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gradients(model, batch)  # warm-up
    opts = optimizers(model)
    for _, opt in opts.values():
        opt.step()  # warm-up: the state tensors are allocated at the first step
    times: dict[str, list[float]] = {kind: [] for kind in KINDS} | {"forward_backward": []}
    for r in range(args.rounds):
        for kind in KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]:  # each kind first in turn
            opt = opts[kind][1]
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[kind].append((time.perf_counter() - t) / args.steps)
        times["forward_backward"].append(gradients(model, batch))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "model": model_type,
        "task": task,
        "params": params,
        "batch": args.batch,
        "ms": med,
        "ms_all": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["diffusion_unet", "dino_wm"])
    parser.add_argument("--episodes", type=int, default=8, help="expert episodes per store")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per kind and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_optimizer")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if min(args.rounds, args.steps, args.batch, args.episodes) < 1:
        parser.error("--rounds, --steps, --batch and --episodes must be >= 1")
    torch.set_num_threads(args.threads)
    from wm.precision import describe_hardware

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} at start: run on an idle machine")
    machine = (
        f"{describe_hardware()}, {os.cpu_count()} cores, {args.threads} torch threads, "
        f"torch {torch.__version__}"
    )
    print(f"machine: {machine}")
    results = [measure(m, args) for m in args.models]
    print(
        "\n| model (params, batch) | AdamW step: single-tensor loop (torch's CPU default) | foreach "
        "| fused (wm-train) | single / fused | forward + backward | forward + backward + step, "
        "single -> fused |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ms = r["ms"]
        before, after = ms["forward_backward"] + ms["single"], ms["forward_backward"] + ms["fused"]
        print(
            f"| {r['model']} ({r['params'] / 1e6:.1f} M, {r['batch']}) | {ms['single']:.1f} ms | "
            f"{ms['foreach']:.1f} ms | {ms['fused']:.1f} ms | {ms['single'] / ms['fused']:.2f}x | "
            f"{ms['forward_backward']:.0f} ms | {before:.0f} -> {after:.0f} ms ({before / after:.2f}x) |"
        )
    print(f"\nload average (1 min) at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "args": vars(args) | {"workdir": str(args.workdir), "json": str(args.json)},
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
