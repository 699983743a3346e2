"""One MPC replan with CEM (300 samples x 30 iterations x horizon 5, DINO-WM's setting): milliseconds
per replan for the demo's world model and for a DINO-WM-size one.

The DINO-WM-size model: DINOv2 ViT-S/14 features at 196 px (196 patches x 384: DINO-WM resizes its
224 px frames to 196 for the encoder), 3 history frames,
frameskip 5, predictor 6 layers x 16 heads x 64, MLP 2048 (about 20 M parameters); weights are
random (timing does not depend on them). On a CPU one full replan at that size takes many minutes,
so `--dino-iterations` runs fewer CEM iterations and reports the per-iteration time next to the
extrapolated full replan, labelled as such.

    python benchmarks/bench_planning.py [--device cuda] [--dino-iterations 1] [--episodes 1]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from omegaconf import OmegaConf

from policies.planners import build_planner
from wm.data.normalize import Normalizer
from wm.dino_wm import DinoWorldModel, WorldModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _normalizer(action_dim: int, proprio_dim: int) -> Normalizer:
    def stats(d):
        return {k: [0.0] * d for k in ("min", "mean", "q01")} | {k: [1.0] * d for k in ("max", "std", "q99")}

    return Normalizer(
        {"action": "minmax", "proprio": "meanstd"},
        {"action": stats(action_dim), "proprio": stats(proprio_dim)},
    )


def demo_model() -> DinoWorldModel:
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(HERE, "..", "configs", "model", "dino_wm.yaml")))
    cfg.pop("type")
    return DinoWorldModel(WorldModelConfig.from_dict(cfg), _normalizer(2, 4))


def dino_wm_size_model() -> DinoWorldModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random DINOv2 weights, on purpose: only time matters here
        cfg = WorldModelConfig(
            image_size=(196, 196),  # 14 x 14 patches (at 224: 16 x 16, 1.31x DINO-WM's tokens)
            action_dim=2,
            proprio_dim=4,
            n_hist=3,
            frameskip=5,
            encoder={"name": "dinov2_vits14", "weights": "none", "allow_random": True},
            predictor_dim=404,
            predictor_depth=6,
            predictor_heads=16,
            predictor_head_dim=64,
            predictor_mlp_dim=2048,
        )
        return DinoWorldModel(cfg, _normalizer(2, 4))


@torch.no_grad()
def time_replan(
    model: DinoWorldModel, episodes: int, iterations: int, device: torch.device, warmup: bool = True
) -> tuple[float, float]:
    """Seconds of one replan for `episodes` episodes: (encoding the current and goal observations, the CEM
    plan of `iterations` iterations). Apart, so that a plan timed over fewer iterations extrapolates
    without multiplying the encoding, which a replan does once."""
    model = model.to(device).eval()
    c = model.cfg
    T = c.n_hist
    obs = {
        c.image_key: torch.rand(episodes, T, 3, *c.image_size, device=device),
        c.proprio_key: torch.randn(episodes, T, c.proprio_dim, device=device),
    }
    if T > 1:
        obs["past_action"] = torch.rand(episodes, T - 1, model.action_dim, device=device) * 2 - 1
    goal = {k: v[:, -1:] for k, v in obs.items() if k != "past_action"}
    planner = build_planner(
        {
            "name": "cem",
            "horizon": 5,
            "samples": 300,
            "elites": 30,
            "iterations": iterations,
            "low": -1.0,
            "high": 1.0,
        },
        model,
    )
    if warmup:
        planner.plan(model.encode(obs), model.encode(goal))  # warm-up (allocations, kernels)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    (z, z_goal), encode_s = timed(lambda: (model.encode(obs), model.encode(goal)))
    _, plan_s = timed(lambda: planner.plan(z, z_goal))
    return encode_s, plan_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--dino-iterations", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dino-warmup",
        action="store_true",
        help="plan once untimed at DINO-WM size first (always on a GPU; on a CPU it doubles the run)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from wm.precision import describe_hardware

    print(f"{describe_hardware()}; {os.cpu_count()} cores, device {device}, torch {torch.__version__}")
    print("CEM: 300 samples x 30 iterations x horizon 5 (DINO-WM's setting), one replan\n")
    enc, plan = time_replan(demo_model(), args.episodes, 30, device)
    print(
        f"demo world model ({args.episodes} episode(s)): {(enc + plan) * 1e3:.0f} ms per replan "
        f"(encoding {enc * 1e3:.0f} ms, {plan / 30 * 1e3:.0f} ms per CEM iteration)"
    )
    it = args.dino_iterations
    # Without a warm-up replan (minutes at this size on a CPU) the timed encoding and iterations include
    # the first calls' costs (kernel calibration, bf16 copies), which the extrapolation multiplies: the
    # line says "cold". On a GPU the first call includes kernel setup, so it is always warmed up.
    warm = args.dino_warmup or device.type == "cuda"
    enc, plan = time_replan(dino_wm_size_model(), args.episodes, it, device, warmup=warm)
    full = "measured" if it == 30 else f"extrapolated from {it} iteration(s)"
    print(
        f"DINO-WM-size model: encoding {enc:.2f} s, {plan / it * 1e3:.0f} ms per CEM iteration; "
        f"{enc + plan / it * 30:.1f} s per 30-iteration replan ({full}; {'warm' if warm else 'cold'})"
    )


if __name__ == "__main__":
    main()
