"""The real-time runtime: tick timing on the wall clock, and seams and success under added latency.

    python benchmarks/bench_runtime.py ticks --checkpoint RUN [--seconds 60 --hz 50]
        The runtime at `--hz` against the wall clock for `--seconds`, on the arm-pushing task (its camera
        rendered on every tick), a diffusion policy (actions every 1 / `--policy-hz` s: the task's delta
        actions are each sent once, the ticks between hold) in the inference worker process, then the
        same with inference on the control thread (the synchronous baseline), in one run. Prints tick error
        p50 / p99 / max, ticks later than 5 ms, actions sent after their due time, underruns, chunk time.

    python benchmarks/bench_runtime.py pauses [--minutes 20 --hz 50]
        The garbage collector inside one long episode (`--minutes` of robot time on a simulated clock: the
        arm-pushing task with its camera, a random chunk controller), once with the collector as Python
        runs it and once with `runtime.quiet_gc`: every pass it made inside the episode, by generation,
        with its duration (time the tick it lands on would wait on the wall clock), and the heap's size.

    python benchmarks/bench_runtime.py latency --checkpoint RUN [--episodes 50 --delays 0 0.1 0.3 0.6]
        Success, time to completion and seams on the arm-pushing task (`--task`) for synchronous execution and
        asynchronous execution with each stitching, at each added inference delay, on the same seeds.
        Runs on a simulated clock (`SimulatedTimeWorker`): each chunk arrives after the model's measured
        seconds plus the delay, and every runtime decision is taken as on the wall clock, so 20
        configurations x 50 episodes take minutes instead of hours; `--wall` runs it against the wall
        clock instead (the inference worker in its own process, the delay slept in it).

Seams: the largest change between consecutive commands where the chunk changed, against the p99 of
changes inside chunks (both in the action's units, pooled over episodes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from robots.control import ManualClock  # noqa: E402
from robots.registry import make_task  # noqa: E402
from robots.runtime.loop import Runtime, RuntimeConfig  # noqa: E402
from robots.runtime.realtime import realtime, worker_cpus  # noqa: E402
from robots.runtime.report import episode_figures  # noqa: E402
from robots.runtime.schedule import seam_jumps  # noqa: E402
from robots.runtime.worker import ControllerSpec, InlineWorker, ProcessWorker, SimulatedTimeWorker  # noqa: E402
from robots.sim.base import SimConfig  # noqa: E402
from wm.precision import describe_hardware  # noqa: E402

TASK = "arm_push"


def spec_for(
    checkpoint: str,
    task,
    delay: float = 0.0,
    threads: int = 1,
    cpus=None,
    policy: dict | None = None,
    quiet_gc: bool = True,
) -> ControllerSpec:
    """The worker's controller: the policy in `checkpoint`, with `policy` overrides (as `policy.*` of
    `wm-deploy`; None entries left out)."""
    feat = task.action_feature
    settings = {"controller": "policy", "checkpoint": checkpoint, "device": "cpu"}
    overrides = {k: v for k, v in (policy or {}).items() if v is not None}
    if overrides:
        settings["policy"] = overrides
    return ControllerSpec(
        "tools._controller:worker_controller",
        {"settings": settings, "low": list(feat.low), "high": list(feat.high), "seed": 0},
        threads=threads,
        delay_s=delay,
        cpus=cpus,
        quiet_gc=quiet_gc,
    )


# ---------------------------------------------------------------------- 1. tick timing
def ticks(args: argparse.Namespace) -> dict:
    results, size = {}, _image_size(args.checkpoint)  # the policy's camera size, as wm-deploy renders
    for mode in ("async", "sync"):
        task = make_task(TASK, SimConfig(image_size=size, max_steps=10**9))
        task.control_hz = args.hz
        rt_opts = {"realtime_priority": args.realtime_priority, "control_cpu": args.control_cpu}
        if mode == "sync":
            rt_opts = {}  # the model computes on the control thread: no priority, no pinning
        quiet = not args.no_quiet_gc
        spec = spec_for(
            args.checkpoint,
            task,
            cpus=worker_cpus(rt_opts.get("control_cpu")),
            policy={"sampler_steps": args.sampler_steps},
            quiet_gc=quiet,
        )
        worker = ProcessWorker(spec) if mode == "async" else InlineWorker(spec)
        worker.start()
        task.connect()
        task.reset(0)
        cfg = RuntimeConfig(
            mode=mode,
            stitching="replace",
            replan_every=args.replan_every,
            policy_hz=args.policy_hz,
            interpolate=task.action_space.mode == "absolute",  # (a delta is applied once, never drawn)
            quiet_gc=quiet,
            **rt_opts,
        )
        rt = Runtime(task, worker, cfg)
        n = int(args.seconds * args.hz)
        with realtime(cfg.realtime_priority, cfg.control_cpu) as notes:
            for line in notes:
                print(f"note: {line}", flush=True)
            out = rt.run_episode(n, goal=task.goal_observation())
        worker.close()
        task.disconnect()
        err = np.array([(t.started - t.nominal) * 1e3 for t in out.ticks])
        fig = episode_figures(out)
        results[mode] = {
            "ticks": len(out.ticks),
            "achieved_hz": fig["achieved_hz"],
            "tick_error_ms": fig["tick_error_ms"],
            "ticks_later_than_5ms": int((err > 5).sum()),
            "stale_actions_sent": out.stale_sent,
            "underruns": out.underruns,
            "chunks": len(out.chunks),
            "inference_ms": fig["inference_ms"],
            "stopped": out.stopped,
        }
        e = fig["tick_error_ms"]
        print(
            f"{mode:5s} {len(out.ticks)} ticks at {fig['achieved_hz']:.2f} Hz: tick error p50 {e['p50']:.3f} "
            f"p99 {e['p99']:.3f} max {e['max']:.2f} ms, {int((err > 5).sum())} ticks > 5 ms, "
            f"{out.stale_sent} stale sent, {out.underruns} underruns, {len(out.chunks)} chunks of "
            f"{fig['inference_ms']['p50']:.0f} ms (p50)",
            flush=True,
        )
    return results


# ---------------------------------------------------------------------- the collector's pauses
class Passes:
    """A `gc.callbacks` entry: every pass of the collector while it is registered, (generation, ms)."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, float]] = []
        self._began: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.passes.append((info["generation"], (time.perf_counter() - self._began) * 1e3))
            self._began = None


def pauses(args: argparse.Namespace) -> dict:
    results = {}
    for quiet in (False, True):
        task = make_task(TASK, SimConfig(image_size=(96, 96), max_steps=10**9))
        task.control_hz = args.hz
        feat = task.action_feature
        spec = ControllerSpec(
            "policies.evaluate:RandomPolicy",
            {"low": list(feat.low), "high": list(feat.high), "seed": 0, "chunk": 16},
            delay_s=0.05,
        )
        clock = ManualClock(0.0)  # the controller runs in this process: runtime.quiet_gc covers it
        worker = SimulatedTimeWorker(spec, clock)
        worker.start()
        task.reset(0)
        rt = Runtime(task, worker, RuntimeConfig(replan_every=8, quiet_gc=quiet), clock=clock)
        heap, on_gc = len(gc.get_objects()), Passes()
        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        try:
            out = rt.run_episode(int(args.minutes * 60 * args.hz))
        finally:
            gc.callbacks.remove(on_gc)
        task.disconnect()
        name = "quiet_gc" if quiet else "python's collector"
        row = {"ticks": len(out.ticks), "heap_objects": heap, "seconds": time.perf_counter() - t0}
        print(f"{name}: {len(out.ticks)} ticks ({args.minutes:g} min at {args.hz:g} Hz), heap {heap} objects")
        for g in (0, 1, 2):
            ms = np.array([d for gen, d in on_gc.passes if gen == g])
            if len(ms):
                med = float(np.median(ms))
                row[f"gen{g}"] = {"n": len(ms), "p50_ms": med, "max_ms": float(ms.max())}
                print(f"  generation {g}: {len(ms):6d} passes, p50 {med:.3f} ms, max {ms.max():.2f} ms")
        results[name] = row
    return results


# ---------------------------------------------------------------------- 2 + 3. seams, success under latency
CONFIGS = [
    ("sync", "replace"),
    ("async", "replace"),
    ("async", "average"),
    ("async", "ensemble"),
    ("async", "inpaint"),
]


def latency(args: argparse.Namespace) -> dict:
    results = []
    for delay in args.delays:
        for mode, stitching in CONFIGS:
            if args.only and f"{mode}/{stitching}" not in args.only:
                continue
            results.append(_latency_config(args, delay, mode, stitching))
    return {"configs": results}


def _image_size(checkpoint: str) -> tuple[int, int]:
    """The camera size the policy was trained on (the task renders at it, as `wm-eval` does)."""
    from wm.registry import load_model

    return tuple(load_model(checkpoint, "cpu").model.io_spec.image_size)


def _latency_config(args, delay: float, mode: str, stitching: str) -> dict:
    task = make_task(args.task, SimConfig(image_size=_image_size(args.checkpoint)))
    clock = None if args.wall else ManualClock(1000.0)
    spec = spec_for(args.checkpoint, task, delay, policy={"inpaint_guidance": args.inpaint_guidance})
    if args.wall:
        worker = ProcessWorker(spec) if mode == "async" else InlineWorker(spec)
    else:
        worker = SimulatedTimeWorker(spec, clock)
    worker.start()
    cfg = RuntimeConfig(
        mode=mode,
        stitching=stitching,
        replan_every=args.replan_every if mode == "async" else args.exec_steps,
        **({"ensemble_m": args.ensemble_m} if stitching == "ensemble" else {}),
        **({"inpaint_overlap": args.inpaint_overlap} if stitching == "inpaint" and mode == "async" else {}),
    )
    rt = Runtime(task, worker, cfg, clock=clock)
    success, times, seams, within, fig_all, stopped = [], [], [], [], [], []
    seed_times: list[float | None] = []
    t0 = time.perf_counter()
    for i in range(args.episodes):
        task.reset(args.seed + i)
        out = rt.run_episode(task.config.max_steps, goal=task.goal_observation(), done=lambda: task.done)
        if out.stopped:
            stopped.append(out.stopped)
        ok = task.is_success()
        success.append(ok)
        seed_times.append(out.wall_s if ok else None)
        if ok:
            times.append(out.wall_s)
        sent = [(t.command, t.chunk) for t in out.ticks if t.command is not None and t.chunk >= 0]
        s, w = seam_jumps([a for a, _ in sent], [c for _, c in sent])
        seams += s.tolist()
        within += w.tolist()
        fig_all.append(episode_figures(out))
    worker.close()
    task.disconnect()
    row = {
        "delay_s": delay,
        "mode": mode,
        "stitching": stitching,
        "inpaint_overlap": args.inpaint_overlap,
        "inpaint_guidance": args.inpaint_guidance,
        "episodes": args.episodes,
        "success_rate": float(np.mean(success)),
        "success": [bool(ok) for ok in success],  # per seed, from args.seed: for paired comparisons
        # a mean over this configuration's own successes: compare two configurations on the seeds both
        # succeeded on (`time_to_success_s`, per seed, None where it failed), not by these means
        "mean_time_to_success_s": float(np.mean(times)) if times else None,
        "time_to_success_s": seed_times,
        "seam_jump_max": float(np.max(seams)) if seams else None,
        "seam_jump_p99": float(np.percentile(seams, 99)) if seams else None,
        "within_jump_p99": float(np.percentile(within, 99)) if within else None,
        "chunk_ms_p50": float(
            np.median([f["inference_ms"]["p50"] for f in fig_all if f["inference_ms"]["p50"]])
        ),
        "stale_actions_sent": int(sum(f["stale_actions_sent"] for f in fig_all)),
        "underruns": int(sum(f["underruns"] for f in fig_all)),
        "episodes_stopped": len(stopped),  # ended by a fault, not by success or the step limit
        "seconds": time.perf_counter() - t0,
    }
    if stopped:
        print(f"{len(stopped)} of {args.episodes} episodes stopped by a fault; the first: {stopped[0]}")
    nan = float("nan")
    f = {k: (nan if v is None else v) for k, v in row.items()}
    ratio = f["seam_jump_p99"] / f["within_jump_p99"] if row["within_jump_p99"] else nan
    print(
        f"delay {delay * 1e3:4.0f} ms {mode:5s} {stitching:8s}: success {f['success_rate']:.2f}, "
        f"time to success {f['mean_time_to_success_s']:.2f} s, seam p99/max {f['seam_jump_p99']:.4f}/"
        f"{f['seam_jump_max']:.4f} vs within p99 {f['within_jump_p99']:.4f} ({ratio:.2f}x), "
        f"chunk {f['chunk_ms_p50']:.0f} ms, {row['underruns']} underruns, "
        f"{row['stale_actions_sent']} stale sent ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("ticks")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--seconds", type=float, default=60.0)
    t.add_argument("--hz", type=float, default=50.0)
    t.add_argument("--policy-hz", type=float, default=10.0, help="the policy's step")
    t.add_argument("--replan-every", type=int, default=8)
    t.add_argument(
        "--sampler-steps", type=int, default=None, help="policy.sampler_steps (a slower model: more steps)"
    )
    t.add_argument(
        "--no-quiet-gc", action="store_true", help="runtime.quiet_gc=false: the collector runs where it falls"
    )
    t.add_argument(
        "--realtime-priority", type=int, default=None, help="async: SCHED_FIFO priority of the loop"
    )
    t.add_argument(
        "--control-cpu", type=int, default=None, help="async: the loop's core (the worker: the rest)"
    )
    pa = sub.add_parser("pauses")
    pa.add_argument("--minutes", type=float, default=20.0, help="the episode's length in robot time")
    pa.add_argument("--hz", type=float, default=50.0)
    lat = sub.add_parser("latency")
    lat.add_argument("--checkpoint", required=True)
    lat.add_argument("--task", default=TASK, help="the simulated task the policy was trained on")
    lat.add_argument("--episodes", type=int, default=50)
    lat.add_argument("--seed", type=int, default=1000)
    lat.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.6])
    lat.add_argument("--replan-every", type=int, default=4)
    lat.add_argument("--exec-steps", type=int, default=8, help="sync: actions executed per chunk")
    lat.add_argument(
        "--inpaint-overlap", type=int, default=None, help="runtime.inpaint_overlap (default: all, RTC's mask)"
    )
    lat.add_argument(
        "--inpaint-guidance",
        default=None,
        help="policy.inpaint_guidance: estimate | gradient (default: the checkpoint's)",
    )
    lat.add_argument("--ensemble-m", type=float, default=0.01)
    lat.add_argument("--only", nargs="*", default=None, help="e.g. sync/replace async/inpaint")
    lat.add_argument("--wall", action="store_true", help="against the wall clock (slow)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    import torch

    print(f"{describe_hardware()}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    res = {"ticks": ticks, "pauses": pauses, "latency": latency}[args.what](args)
    res["cpu"] = describe_hardware()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
