"""fp32 vs bf16 inference of the diffusion policy's networks, one call at batch 1.

Measures, for each part, the median wall time of one call (after warm-up calls) in fp32 and with bf16
inference on (`policies.diffusion.precision.set_inference_precision`), their ratio, and the relative
error of the bf16 output (|bf16 - fp32| / |fp32|, Frobenius norms). The two precisions alternate in
`--rounds` rounds so that machine noise hits both alike; the figures are medians over rounds.

    resnet18      the image encoder on one step's 2 frames (n_obs 2), 84 px (Diffusion Policy's crop)
    unet-small    ConditionalUnet1D 64/128/256, horizon 16, Da 2
    unet-lerobot  ConditionalUnet1D 256/512/1024 (LeRobot's size in bench_policy.py)
    transformer   the transformer denoiser at its defaults (dim 256, depth 8, 4 heads), horizon 16

Random weights: timing does not depend on them, and the error is that of one call.

    python benchmarks/bench_precision.py [--threads 2] [--calls 30] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from policies.diffusion.obs_encoder import ObsEncoderConfig, ResNetKeypoints
from policies.diffusion.precision import set_inference_precision
from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser
from policies.diffusion.unet import ConditionalUnet1D, UNetConfig

HORIZON, ACTION_DIM, N_OBS, FEAT = 16, 2, 2, 66  # 64 image features + 2 proprio per step


def parts() -> dict[str, tuple[nn.Module, tuple]]:
    """name -> (module in eval mode, its call arguments)."""
    x, t, cond = torch.randn(1, HORIZON, ACTION_DIM), torch.full((1,), 42.0), torch.randn(1, N_OBS, FEAT)
    unet = lambda dims: ConditionalUnet1D(UNetConfig(down_dims=dims), ACTION_DIM, N_OBS * FEAT)  # noqa: E731
    return {
        "resnet18": (ResNetKeypoints(ObsEncoderConfig()), (torch.rand(N_OBS, 3, 84, 84),)),
        "unet-small": (unet((64, 128, 256)), (x, t, cond)),
        "unet-lerobot": (unet((256, 512, 1024)), (x, t, cond)),
        "transformer": (
            TransformerDenoiser(TransformerConfig(), ACTION_DIM, FEAT, HORIZON, N_OBS),
            (x, t, cond),
        ),
    }


def median_ms(fn: Callable[[], object], calls: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms)


def measure(net: nn.Module, args: tuple, calls: int, rounds: int) -> dict[str, float]:
    net.eval()
    n_params = sum(p.numel() for p in net.parameters())
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        set_inference_precision(net, "fp32")
        ref = net(*args)
        set_inference_precision(net, "bf16")
        low = net(*args)
        for _ in range(rounds):
            for precision in ("fp32", "bf16"):
                set_inference_precision(net, precision)
                net(*args)  # builds the bf16 copy outside the timed calls
                times[precision].append(median_ms(lambda: net(*args), calls))
    set_inference_precision(net, "fp32")
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {
        "params_M": n_params / 1e6,
        "fp32_ms": fp32,
        "bf16_ms": bf16,
        "speedup": fp32 / bf16,
        "rel_error": ((low - ref).norm() / ref.norm()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per round and precision")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="part names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    machine = (
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"bf16 inference, batch 1 ({machine})")
    print(f"{'part':<14}{'params':>9}{'fp32 ms':>10}{'bf16 ms':>10}{'speed-up':>10}{'rel. error':>12}")
    results = {}
    for name, (net, call_args) in parts().items():
        if args.only and name not in args.only:
            continue
        r = measure(net, call_args, args.calls, args.rounds)
        results[name] = r
        print(
            f"{name:<14}{r['params_M']:>8.1f}M{r['fp32_ms']:>10.2f}{r['bf16_ms']:>10.2f}"
            f"{r['speedup']:>9.2f}x{r['rel_error']:>12.4f}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"json": str(args.json)}, "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
