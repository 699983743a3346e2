"""Kernels and precision per network, one call at batch 1: PyTorch's kernels vs the ones chosen by
measurement on this machine (`wm.kernels`), in fp32 and bf16, and which kernel each layer shape got.

Rows per part (median wall time of one call; every variant visited in turn in each of `--rounds`
rounds, so machine noise hits all alike; the figure is the median over rounds):

    fp32 native     PyTorch's kernels in fp32 (measurement off, as `WM_KERNELS=native`)
    fp32 selected   fp32, each layer shape on the kernel measured fastest (PyTorch's, oneDNN, matmul;
                    backbone: its weights as they are or a channels-last copy)
    bf16 native     bf16 wherever offered, PyTorch's kernels (UNet: F.conv1d on bf16 weights; backbone
                    and transformer: their bf16 copy)
    bf16 selected   bf16 where measured faster, per layer shape (UNet) or per network (the others)
    auto            the default inference precision: "auto" resolved on this CPU (bf16 with bf16 units,
                    else fp32), each layer measured, and the UNet's layers may also take int8 weights
    fp32 compiled   torch.compile (inductor) of the fp32 network (UNets; `--no-compile` skips it)

Speed-up is against fp32 native; error is the relative Frobenius error of one call against fp32 native.
Below each part, the choice per layer shape with every candidate's median time in the calibration (us) and the
candidates rejected (wrong output or unsupported). The header gives the CPU model and its bf16 units.
By default the kernels are calibrated afresh in this run (`--use-cache`: the user's kernel cache).

    resnet18      the image encoder on one step's 2 frames (n_obs 2), 84 px (Diffusion Policy's crop),
                  channels-last as a camera's (H, W, 3) frames permuted reach it
    unet-small    ConditionalUnet1D 64/128/256, horizon 16, Da 2
    unet-lerobot  ConditionalUnet1D 256/512/1024 (LeRobot's size in bench_policy.py)
    transformer   the transformer denoiser at its defaults (dim 256, depth 8, 4 heads), horizon 16

    python benchmarks/bench_precision.py [--threads 2] [--calls 30] [--rounds 5] [--only unet-lerobot]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from policies.diffusion import unet as unet_module
from policies.diffusion.obs_encoder import ObsEncoderConfig, ResNetKeypoints
from policies.diffusion.precision import set_inference_precision
from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser
from policies.diffusion.unet import ConditionalUnet1D, UNetConfig
from wm import kernels
from wm.precision import AUTO, describe_hardware, resolve_precision

HORIZON, ACTION_DIM, N_OBS, FEAT = 16, 2, 2, 66  # 64 image features + 2 proprio per step
VARIANTS = {"fp32 native": ("fp32", "native"), "fp32 selected": ("fp32", "measure")}
VARIANTS |= {"bf16 native": ("bf16", "native"), "bf16 selected": ("bf16", "measure")}
VARIANTS |= {"auto": ("auto", "measure")}


def parts() -> dict[str, tuple[nn.Module, tuple]]:
    """name -> (module in eval mode, its call arguments); random weights (timing does not depend on them)."""
    x, t, cond = torch.randn(1, HORIZON, ACTION_DIM), torch.full((1,), 42.0), torch.randn(1, N_OBS, FEAT)
    frames = torch.rand(N_OBS, 84, 84, 3).permute(0, 3, 1, 2)  # (H, W, 3) permuted, as from a camera
    unet = lambda dims: ConditionalUnet1D(UNetConfig(down_dims=dims), ACTION_DIM, N_OBS * FEAT)  # noqa: E731
    return {
        "resnet18": (ResNetKeypoints(ObsEncoderConfig()), (frames,)),
        "unet-small": (unet((64, 128, 256)), (x, t, cond)),
        "unet-lerobot": (unet((256, 512, 1024)), (x, t, cond)),
        "transformer": (
            TransformerDenoiser(TransformerConfig(), ACTION_DIM, FEAT, HORIZON, N_OBS),
            (x, t, cond),
        ),
    }


def median_ms(fn: Callable[[], object], calls: int) -> float:
    ms = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms)


@contextlib.contextmanager
def variant(net: nn.Module, name: str):
    precision, mode = VARIANTS[name]
    set_inference_precision(net, precision)
    with kernels.mode(mode):
        yield


def measure(net: nn.Module, args: tuple, calls: int, rounds: int, compile_: bool) -> dict:
    net.eval()
    sel = kernels.selector()
    log_start, spent = len(sel.log), sel.spent_s
    fns: dict[str, Callable[[], object]] = {name: lambda: net(*args) for name in VARIANTS}
    with torch.inference_mode():
        outs = {}
        for name in VARIANTS:  # first calls: calibration and bf16 copies, outside the timed calls
            with variant(net, name):
                outs[name] = net(*args)
        if compile_:
            with variant(net, "fp32 native"):
                t0 = time.perf_counter()
                compiled = torch.compile(net)
                outs["fp32 compiled"] = compiled(*args)
                compile_s = time.perf_counter() - t0
            fns["fp32 compiled"] = lambda: compiled(*args)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                with variant(net, name if name in VARIANTS else "fp32 native"):
                    fn()  # warm-up, and the layers memoize their choice again after the switch
                    times[name].append(median_ms(fn, calls))
    ref = outs["fp32 native"]
    rows = {
        name: {"ms": statistics.median(t), "rel_error": kernels.rel_error(outs[name], ref)}
        for name, t in times.items()
    }
    for r in rows.values():
        r["speedup"] = rows["fp32 native"]["ms"] / r["ms"]
    choices = {k.split("|")[-1]: rec for k, rec, _ in sel.log[log_start:]}  # one per layer shape
    return {
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "rows": rows,
        "choices": choices,
        "calibration_s": sel.spent_s - spent,
        "compile_s": compile_s if compile_ else None,
    }


def print_part(name: str, r: dict) -> None:
    print(f"\n{name} ({r['params_M']:.1f}M parameters)")
    for row, v in r["rows"].items():
        print(f"  {row:<15}{v['ms']:>10.2f} ms{v['speedup']:>8.2f}x   rel. error {v['rel_error']:.4f}")
    if r["compile_s"] is not None:
        print(f"  (compiling took {r['compile_s']:.1f} s)")
    n, ms = len(r["choices"]), r["calibration_s"] * 1e3
    print(f"  kernels chosen ({n} layer shapes; calibration took {ms:.0f} ms):")
    for key, rec in r["choices"].items():
        us = "  ".join(f"{n} {t:.0f}" for n, t in sorted(rec["us"].items(), key=lambda kv: kv[1]))
        rejected = f"  rejected: {', '.join(rec['rejected'])}" if rec["rejected"] else ""
        print(f"    {key:<78} -> {rec['choice']:<12} (us: {us}){rejected}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["resnet18", "unet-small", "unet-lerobot", "transformer"],  # (a typo measured nothing)
        help="part names (default: all)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--use-cache", action="store_true", help="use the kernel cache, not a fresh one")
    parser.add_argument("--calibration-budget", type=float, default=300.0, help="seconds, fresh cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not args.use_cache:
        fresh = kernels.Selector(kernels.KernelCache(None), total_budget_s=args.calibration_budget)
        kernels.set_selector(fresh)
    auto = resolve_precision(AUTO, "cpu")
    machine = f"{describe_hardware()}, {args.threads} threads, torch {torch.__version__}"
    print(f"Kernels and precision per network, batch 1\n{machine}")
    int8 = "with" if unet_module._INT8_MM else "without (no torch._weight_int8pack_mm)"
    print(f"default inference precision: auto -> {auto}, {int8} int8 weights for the UNet (row 'auto')")
    results = {}
    for name, (net, call_args) in parts().items():
        if args.only and name not in args.only:
            continue
        compile_ = "unet" in name and not args.no_compile
        results[name] = measure(net, call_args, args.calls, args.rounds, compile_)
        print_part(name, results[name])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "auto": auto, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(payload | {"results": results}, indent=1))


if __name__ == "__main__":
    main()
