"""Predictor speed and memory at DINO-WM's size: ours (wm/predictor.py) vs the original design.

DINO-WM size: 6 pre-LN layers, 16 heads x 64, MLP 2048, 3 frames x 196 patches (588 tokens), token
dim 404 (384 + 10 + 10), about 20M parameters, fp32, 2 threads, `torch.inference_mode()`.
`OriginalPredictor` below re-implements the original design for comparison: learned positional
embedding over history x patches, manual attention `softmax(q @ k^T * scale + mask) @ v` with an
explicit (T*P, T*P) additive mask, dropout layers present (eval mode).

Every configuration runs in a fresh subprocess (so peak RSS is its own) under an address-space
limit (`RLIMIT_AS`, default 12 GB above the worker's size after model creation) and a timeout;
a run that fails is reported as "out of memory" / "timeout" instead of taking the machine down.
Peak memory = `ru_maxrss` after the run minus `ru_maxrss` after creating the model and inputs.
Rows (inputs fp32 in every row):
    original          the original design (below)
    ours              fp32; each linear layer on the kernel measured fastest here (F.linear or oneDNN,
                      `wm.kernels`), rotary positions on q / k or folded into the projection rows
                      (measured too), per-frame SDPA blocks, default inference chunks: the fp32 default
    ours-native       fp32, PyTorch's kernels only (`F.linear`, measurement off): isolates the choice
    ours-masked       one SDPA call with a boolean block-causal mask, `F.linear`; batches <= 30 only
    ours-bf16         `precision="bf16"`: a bf16 copy of the predictor, linear kernels measured
    ours-bf16-native  the same with PyTorch's kernels only
    ours-auto         `precision="auto"` (bf16 where the CPU has AVX512-BF16 / AMX units, else fp32): the
                      inference precision setting meant as the default; the row says what it resolved to
Each worker calibrates its kernels afresh (`WM_KERNEL_CACHE=off`; `--use-cache` keeps the user's cache)
during its warm-up (batch 1, then up to 30 windows: the row buckets the timed runs use); the kernels
chosen per layer shape and row bucket are printed after the table, with the CPU
model and its bf16 units in the header. Wall and process CPU seconds are both printed (best of the
repeats; batch 300 runs once); on a shared machine the CPU-time ratio is the steadier one. `--rounds N`
runs every model N times per batch, interleaved (original, ours, ..., original, ours, ...): a row gives
its best round and the range of the original's time over its own across rounds.
Also measured: a 5-step rollout at batch 30 from 3 context frames, KV-cached `step` vs recomputing
`forward` on the last 3 frames each step (the original's way).

`--ceiling` also prints the FLOPs of one forward of ours, the machine's matrix-product peak (fp32, and
bf16 where the CPU has bf16 units; 4096^3) and the speed-up over the original that a forward at that
peak throughout would give.

    python benchmarks/bench_predictor.py [--batches 1 30 300] [--models original ours ours-auto] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor, nn

from wm import kernels
from wm.precision import cpu_has_bf16, describe_hardware
from wm.predictor import Predictor, PredictorConfig, num_params

FRAMES, GRID, TOKEN_DIM = 3, (14, 14), 404
PATCHES = GRID[0] * GRID[1]
ROLLOUT_STEPS = 5


# ----------------------------------------------------------------------------- original design


class _OrigAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)  # (B, N, H*hd) each
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
        scores = q @ k.transpose(-1, -2) * self.scale + mask  # (B, H, N, N), materialized
        attn = self.attn_drop(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, H*hd)
        return self.to_out(out)


class OriginalPredictor(nn.Module):
    """The original DINO-WM predictor design (pre-LN ViT, learned (T*P, D) positions, manual attention)."""

    def __init__(
        self,
        frames: int,
        patches: int,
        dim: int,
        depth: int = 6,
        heads: int = 16,
        head_dim: int = 64,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, frames * patches, dim))
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            ff = nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, mlp_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(mlp_dim, dim),
                nn.Dropout(dropout),
            )
            self.layers.append(nn.ModuleList([_OrigAttention(dim, heads, head_dim, dropout), ff]))
        self.norm = nn.LayerNorm(dim)
        frame = torch.arange(frames).repeat_interleave(patches)  # (T*P,) frame of each token
        allowed = frame[:, None] >= frame[None, :]
        self.register_buffer("mask", torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T, P, D) -> (B, T, P, D)."""
        b, t, p, d = tokens.shape
        x = tokens.reshape(b, t * p, d) + self.pos_embedding[:, : t * p]  # (B, T*P, D)
        x = self.drop(x)
        mask = self.mask[: t * p, : t * p]
        for attn, ff in self.layers:
            x = attn(x, mask) + x
            x = ff(x) + x
        return self.norm(x).reshape(b, t, p, d)


MODELS = {  # name -> (PredictorConfig options, kernel selection mode of its worker: WM_KERNELS)
    "ours": ({}, "measure"),
    "ours-native": ({"onednn": False}, "native"),
    "ours-masked": ({"attention": "masked", "onednn": False}, "native"),
    "ours-bf16": ({"precision": "bf16"}, "measure"),
    "ours-bf16-native": ({"precision": "bf16"}, "native"),
    "ours-auto": ({"precision": "auto"}, "measure"),
}


def build(model: str) -> nn.Module:
    if model == "original":
        return OriginalPredictor(FRAMES, PATCHES, TOKEN_DIM).eval()
    cfg = PredictorConfig(
        in_dim=TOKEN_DIM, out_dim=TOKEN_DIM, dim=TOKEN_DIM, max_frames=FRAMES, **MODELS[model][0]
    )
    return Predictor(cfg).eval()


def forward_flops(batch: int) -> tuple[float, float]:
    """(linear layers, attention) floating-point operations of one forward of ours at `batch` (a
    multiply-add counts 2): the projections and MLP over every token, and frame t's queries against the
    keys of frames 0..t (q k^T and the product with v)."""
    cfg = build("ours").cfg
    tokens, inner = batch * FRAMES * PATCHES, cfg.inner_dim
    per_token = cfg.dim * 3 * inner + inner * cfg.dim + 2 * cfg.dim * cfg.mlp_dim
    pairs = batch * PATCHES * PATCHES * sum(range(1, FRAMES + 1))  # query-key pairs per head set
    return 2.0 * tokens * per_token * cfg.depth, 4.0 * pairs * inner * cfg.depth


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 10) -> float:
    """FLOP/s of PyTorch's (n x n) @ (n x n) product in `dtype` here, best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b)[0] for _ in range(repeats))
    return 2.0 * n**3 / best


def print_ceiling(batches: list[int], original: dict[int, float]) -> None:
    """The fastest a forward of ours could be here if every FLOP ran at the machine's matrix-product
    peak (softmax, norms, GELU and copies free), and the speed-up over the original that allows."""
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if cpu_has_bf16() else {})
    peaks = {name: matmul_peak(dt) for name, dt in dtypes.items()}
    print("\nceiling: " + ", ".join(f"{n} product peak {p / 1e9:.0f} GFLOP/s" for n, p in peaks.items()))
    if "bf16" not in peaks:  # emulated bf16 products run on one core for many minutes at 4096^3
        print("  (no bf16 units here: the bf16 peak is not measured)")
    for batch in batches:
        lin, att = forward_flops(batch)
        bound = {n: (lin + att) / p for n, p in peaks.items()}
        line = f"  batch {batch}: {lin / 1e9:.0f} GFLOP linear + {att / 1e9:.0f} GFLOP attention; at peak "
        line += ", ".join(f"{n} {t:.3f} s" for n, t in bound.items())
        if batch in original:
            line += " = " + ", ".join(f"{n} {original[batch] / t:.1f}x" for n, t in bound.items())
            line += f" the original's best {original[batch]:.3f} s"
        print(line)


def run_forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x) if isinstance(model, OriginalPredictor) else model(x, GRID)


# ----------------------------------------------------------------------------- worker (one subprocess)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); CPU time is steadier on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _rollout(model: Predictor, ctx: Tensor, future: Tensor, cached: bool) -> None:
    """Predict ROLLOUT_STEPS frames from FRAMES context frames (the next inputs are `future`). `cached`
    steps the KV cache past the FRAMES-frame window: a timing of `step`, not of the planners' rollout,
    which reruns the last window once it slides (`DinoWorldModel.rollout`)."""
    if cached:
        cache = model.init_cache(ctx.shape[0], GRID)
        for i in range(FRAMES):  # prefill: the last context step gives the first prediction
            _, cache = model.step(ctx[:, i], GRID, cache)
        for i in range(ROLLOUT_STEPS - 1):
            _, cache = model.step(future[:, i], GRID, cache)
    else:
        frames = torch.cat([ctx, future], dim=1)  # (B, FRAMES + steps - 1, P, D)
        for i in range(ROLLOUT_STEPS):
            model(frames[:, i : i + FRAMES], GRID)  # recompute the whole window


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.model)
    torch.manual_seed(1)  # every model gets the same inputs (building them drew different amounts)
    x = torch.randn(args.batch, FRAMES, PATCHES, TOKEN_DIM)
    future = torch.randn(args.batch, ROLLOUT_STEPS - 1, PATCHES, TOKEN_DIM)
    base_rss = _maxrss_mb()  # the peak is counted from here: the model and inputs, before any warm-up
    with torch.inference_mode():
        # warm-up at batch 1 and at up to 30 (keeps batch 300 to a single run): the linear layers
        # calibrate here, per bucket of rows (588 rows a window, 196 a frame: 30 windows fill every bucket)
        run_forward(model, x[:1])
        if args.batch > 1:
            run_forward(model, x[:30])
        if args.rollout == "cached":
            _rollout(model, x[:1], future[:1], cached=True)  # one-frame steps: 196 rows a window
            if args.batch > 1:
                _rollout(model, x[:30], future[:30], cached=True)
        selector = kernels.selector()
        limit = _vm_size_bytes() + int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if args.rollout is not None:
            fn = lambda: _rollout(model, x, future, args.rollout == "cached")  # noqa: E731
        else:
            fn = lambda: run_forward(model, x)  # noqa: E731
        runs = [_timed(fn) for _ in range(args.repeats)]
    return {
        "seconds": min(r[0] for r in runs),
        "cpu_seconds": min(r[1] for r in runs),
        "all_seconds": [r[0] for r in runs],
        "peak_mb": _maxrss_mb() - base_rss,
        "precision": getattr(model, "precision", "fp32"),
        "calibration_s": selector.spent_s,
        "kernels": {k.split("|")[-1]: {"choice": r["choice"], "us": r["us"]} for k, r, _ in selector.log},
    }


# ----------------------------------------------------------------------------- driver


def launch(model: str, batch: int, args: argparse.Namespace, rollout: str | None = None) -> dict:
    """Run one configuration in a fresh subprocess; a failure comes back as {"error": reason}."""
    repeats = 5 if batch == 1 else 2 if batch <= 30 and not rollout else 1
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--batch", str(batch)]
    cmd += ["--repeats", str(repeats), "--limit-gb", str(args.limit_gb), "--threads", str(args.threads)]
    if rollout:
        cmd += ["--rollout", rollout]
    env = dict(os.environ, WM_KERNELS=MODELS.get(model, ({}, "native"))[1])
    if not args.use_cache:
        env["WM_KERNEL_CACHE"] = "off"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {args.timeout} s"}
    if proc.returncode != 0:
        oom = any(s in proc.stderr for s in ("MemoryError", "DefaultCPUAllocator", "not enough memory"))
        if oom or proc.returncode in (-9, 137):
            return {"error": f"out of memory (limit {args.limit_gb:g} GB)"}
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"failed: {tail[0][:60]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(name: str, batch: int, rs: list[dict], refs: list[dict] | None) -> str:
    """One model's line: its best round (wall, CPU, peak), and the original's time over its own in each
    round (rounds interleave the models, so a round's ratio compares runs taken minutes apart at most)."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return f"{name:<16} {batch:>5}   {rs[0]['error']}"
    best = min(ok, key=lambda r: r["seconds"])
    speed = "-"
    if refs and refs is not rs:
        pairs = [(a, b) for a, b in zip(refs, rs, strict=True) if "error" not in a and "error" not in b]
        wall = sorted(a["seconds"] / b["seconds"] for a, b in pairs)
        cpu = sorted(a["cpu_seconds"] / b["cpu_seconds"] for a, b in pairs)
        span = lambda v: f"{v[0]:.1f}x" if len(v) == 1 else f"{v[0]:.1f}-{v[-1]:.1f}x"  # noqa: E731
        speed = f"{span(wall)} / {span(cpu)}" if pairs else "-"
    failed = f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""
    return (
        f"{name:<16} {batch:>5} {best['precision']:>5} {best['seconds']:>9.3f} {best['cpu_seconds']:>9.3f} "
        f"{best['peak_mb']:>9.0f}   {speed}{failed}"
    )


def print_kernels(chosen: dict[str, dict]) -> None:
    """The linear kernels each measured model chose (in its largest batch's run), with the calibration
    times."""
    for m, r in chosen.items():
        print(f"\nkernels chosen, {m} (calibration took {r['calibration_s'] * 1e3:.0f} ms):")
        for key, k in r["kernels"].items():
            us = "  ".join(f"{n} {t:.0f}" for n, t in sorted(k["us"].items(), key=lambda kv: kv[1]))
            print(f"  {key:<64} -> {k['choice']:<7} (us: {us})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 30, 300])
    p.add_argument("--models", nargs="+", default=["original", *MODELS], choices=["original", *MODELS])
    p.add_argument("--limit-gb", type=float, default=12.0, help="address-space limit per run (GB)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-rollout", action="store_true")
    p.add_argument("--rollout-batch", type=int, default=30)
    p.add_argument("--use-cache", action="store_true", help="workers use the kernel cache (default: fresh)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each model per batch, interleaved")
    p.add_argument("--ceiling", action="store_true", help="also the bound the machine's product peak sets")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--rollout", choices=["cached", "recompute"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(describe_hardware())
    print(f"torch {torch.__version__}, {args.threads} threads, inference_mode, {FRAMES} frames x")
    print(f"{PATCHES} patches ({FRAMES * PATCHES} tokens), token dim {TOKEN_DIM}; load avg {os.getloadavg()}")
    for m in args.models:
        print(f"  {m:<16} {num_params(build(m)) / 1e6:.2f}M parameters")
    print(
        f"\n{'model':<16} {'batch':>5} {'prec.':>5} {'wall s':>9} {'cpu s':>9} {'peak MB':>9}   "
        "orig / this (wall / cpu)"
    )
    chosen: dict[str, dict] = {}
    original: dict[int, float] = {}  # batch -> the original's best wall seconds
    for batch in args.batches:
        models = [m for m in args.models if not (m == "ours-masked" and batch > 30)]  # SDPA's math kernel
        runs: dict[str, list[dict]] = {m: [] for m in models}
        for _ in range(args.rounds):  # original, ours, ..., original, ours, ...: one machine state per round
            for m in models:
                runs[m].append(launch(m, batch, args))
        done = [r["seconds"] for r in runs.get("original", []) if "error" not in r]
        if done:
            original[batch] = min(done)
        for m in models:
            print(row(m, batch, runs[m], runs.get("original")), flush=True)
            if any(r.get("kernels") for r in runs[m]):
                # the largest batch's run: its warm-up calibrated batch 1's shapes too
                chosen[m] = next(r for r in runs[m] if r.get("kernels"))
    print_kernels(chosen)
    if args.ceiling:
        torch.set_num_threads(args.threads)
        print_ceiling(args.batches, original)

    if not args.no_rollout:
        b = args.rollout_batch
        print(f"\nrollout (ours), batch {b}: {ROLLOUT_STEPS} predicted frames from {FRAMES} context frames")
        roll: dict[str, list[dict]] = {"recompute": [], "cached": []}
        for _ in range(args.rounds):
            for mode in roll:
                roll[mode].append(launch("ours", b, args, rollout=mode))
        for mode, rs in roll.items():
            print(row(mode, b, rs, roll["recompute"]), flush=True)
    print(f"\nload avg at the end {os.getloadavg()} (shared machine: compare rows of the same run)")


if __name__ == "__main__":
    main()
