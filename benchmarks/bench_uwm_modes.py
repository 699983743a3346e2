"""Do UWM's modes use their conditioning? Paired errors on held-out windows of a trained model.

For every held-out window (the validation episodes of the run's own split) and the same noise seeds
in every condition:

    forward dynamics   latent error of the predicted future frames with the true actions, with the
                       actions of another window (a fixed permutation of the batch), and marginal
                       (actions absent: `predict_video`)
    inverse dynamics   action error (normalized units, the whole chunk) with the true future frames,
                       in policy mode (frames absent), and with another window's future frames

Expected orders: forward true < shuffled < marginal; inverse true < policy < shuffled. Beside them,
forward dynamics of the policy's own chunk (likely actions) shows what the marginal amounts to. Each pair is
tested one-sided on the per-window errors (Wilcoxon signed-rank; a paired t-test beside it), and the
p-values are printed with the means.

    python benchmarks/bench_uwm_modes.py --checkpoint RUN_DIR [--store PATH] [--windows 512] [--batch 64]
        [--seed 0] [--json PATH]

`--store` evaluates on every episode of another store of the same task (fresh episodes: a common
held-out set for models trained on different data) instead of the run's validation episodes.
`--against RUN_DIR2` evaluates a second model on the same windows with the same noise and tests, per
condition, whether its errors differ from the first's (two-sided Wilcoxon on the per-window errors;
action errors in the first model's normalized units; latent errors only when both models encode
frames alike, as two runs given one autoencoder do).

    python benchmarks/bench_uwm_modes.py --checkpoint RUN_A --against RUN_B --store fresh.zarr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from wm.data.dataset import WindowDataset
from wm.precision import cpu_info
from wm.registry import load_model
from wm.training import cached_features, split_labelled


def held_out(run: dict, checkpoint: str) -> tuple[str, list[int]]:
    """The store and the validation episodes of the run (its own split, as training made it: without the
    episodes flagged action-free, whose actions are no labels to score against)."""
    from wm.data import DemoStore

    store = run["store"]
    with DemoStore.open(store) as s:
        n = s.n_episodes
    flagged = sorted(set(range(n)) - set(labelled(store)))
    _, val = split_labelled(n, flagged, run.get("val_ratio", 0.1), run.get("seed", 0))
    if not val:
        raise SystemExit(f"{checkpoint}: the run held out no episodes with actions (val_ratio=0?)")
    return store, val


def labelled(store: str) -> list[int]:
    """The episodes of `store` whose actions are labels (not flagged action-free)."""
    from wm.data import DemoStore
    from wm.data.mixture import ACTION_FREE

    with DemoStore.open(store) as s:
        return [e for e in range(s.n_episodes) if not s.episode_info(e).get(ACTION_FREE)]


def errors(model, batch: dict, seed: int, normalizer=None) -> dict[str, np.ndarray]:
    """Per-window errors of the seven conditions, every condition drawing the same noise; action errors
    in `normalizer`'s units (the model's own by default)."""
    c = model.cfg
    frames = model.views(batch)  # (B, n_obs + F, V, C, h, w)
    obs = {k: batch[k][:, : c.n_obs] for k in c.image_keys}
    if c.proprio_key:
        obs[c.proprio_key] = batch[c.proprio_key]
    future, frame_ok = frames[:, c.n_obs :], (~batch[c.image_keys[0] + "_is_pad"][:, c.n_obs :]).float()
    actions, act_ok = batch[c.action_key], (~batch[c.action_key + "_is_pad"]).float()
    B = actions.shape[0]
    perm = torch.roll(torch.arange(B), 1)  # every window gets another window's actions / future

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def frame_err(pred: torch.Tensor) -> np.ndarray:
        e = (pred - future).pow(2).flatten(2).mean(-1)  # (B, F)
        return ((e * frame_ok).sum(1) / frame_ok.sum(1).clamp_min(1)).numpy()

    def action_err(pred: torch.Tensor) -> np.ndarray:
        norm = (normalizer or model.normalizer).normalize
        e = (norm(c.action_key, pred) - norm(c.action_key, actions)).pow(2).mean(-1)  # (B, Ta)
        return ((e * act_ok).sum(1) / act_ok.sum(1).clamp_min(1)).numpy()

    return {
        "forward_true": frame_err(model.forward_dynamics(obs, actions, gen())),
        "forward_shuffled": frame_err(model.forward_dynamics(obs, actions[perm], gen())),
        "forward_marginal": frame_err(model.predict_video(obs, gen())),
        # the marginal seen as forward dynamics of likely actions: the policy's own chunk
        "forward_policy_actions": frame_err(model.forward_dynamics(obs, model.policy(obs, gen()), gen())),
        "inverse_true": action_err(model.inverse_dynamics(obs, future, gen())),
        "inverse_policy": action_err(model.policy(obs, gen())),
        "inverse_shuffled": action_err(model.inverse_dynamics(obs, future[perm], gen())),
    }


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """One-sided tests of a < b on paired samples."""
    keep = a != b
    w = stats.wilcoxon(a[keep], b[keep], alternative="less") if keep.any() else None
    t = stats.ttest_rel(a, b, alternative="less")
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "a_lower_share": float((a < b).mean()),
        "p_wilcoxon": float(w.pvalue) if w is not None else 1.0,
        "p_ttest": float(t.pvalue),
    }


def same_frames(a, b) -> bool:
    """Whether two UWM models encode frames alike (equal codec weights), so their latent errors compare."""
    sa, sb = a.codec.state_dict(), b.codec.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def load_uwm(path: str):
    """The UWM model of the run or checkpoint at `path`."""
    loaded = load_model(path, controller="policy")
    if loaded.model_type != "uwm":
        raise SystemExit(f"{path} holds a {loaded.model_type!r} model, not uwm")
    return loaded


def windows_of(model, store: str, episodes: list[int]) -> WindowDataset:
    """The model's evaluation windows of `episodes`, read from its feature cache of `store`."""
    data = cached_features(store, model.codec, model.cfg.image_keys)
    return WindowDataset(data, model.window_spec(), episodes, in_memory=True, train=False)


def window_errors(model, windows, idx: np.ndarray, args, normalizer=None) -> dict[str, np.ndarray]:
    """`errors` over the windows `idx`, in batches of `args.batch`, each batch seeded alike for any model."""
    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for lo in range(0, len(idx), args.batch):
            batch = windows.get_batch(idx[lo : lo + args.batch])
            for k, v in errors(model, batch, args.seed + lo, normalizer).items():
                parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def against(args, model, store: str, episodes: list[int], idx: np.ndarray, e: dict) -> dict:
    """The second model's errors on the same windows and noise, and two-sided paired tests per condition."""
    other = load_uwm(args.against)
    if other.model.window_spec() != model.window_spec():
        raise SystemExit(f"{args.against}: its windows differ from {args.checkpoint}'s; nothing to pair")
    f = window_errors(other.model, windows_of(other.model, store, episodes), idx, args, model.normalizer)
    frames_alike = same_frames(model, other.model)
    print(f"{args.against} against {args.checkpoint}, the same windows and noise (two-sided, per window):")
    if not frames_alike:
        print("  latent errors not compared: the two models encode frames differently")
    tests = {}
    for k in e:
        if k.startswith("forward") and not frames_alike:
            continue
        keep = e[k] != f[k]
        w = stats.wilcoxon(f[k][keep], e[k][keep]) if keep.any() else None
        tests[k] = {
            "mean": float(e[k].mean()),
            "mean_against": float(f[k].mean()),
            "against_lower_share": float((f[k] < e[k]).mean()),
            "p_wilcoxon": float(w.pvalue) if w is not None else 1.0,
        }
        r, lower = tests[k], 100 * tests[k]["against_lower_share"]
        print(
            f"  {k:24s} {r['mean']:.5f} -> {r['mean_against']:.5f}  lower in {lower:.0f}% of windows  "
            f"p(Wilcoxon, two-sided) {r['p_wilcoxon']:.2g}"
        )
    return {"checkpoint": args.against, "frames_alike": frames_alike, "tests": tests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--store", default=None, help="evaluate on all episodes of this store instead")
    ap.add_argument("--windows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--against", default=None, help="a second UWM run, compared window by window")
    args = ap.parse_args()

    loaded = load_uwm(args.checkpoint)
    model = loaded.model
    if args.store is None:
        store, episodes = held_out(loaded.checkpoint.get("extra", {}).get("run_config", {}), args.checkpoint)
    else:
        store, episodes = args.store, labelled(args.store)
    windows = windows_of(model, store, episodes)
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(windows))[: args.windows]
    e = window_errors(model, windows, idx, args)
    tests = {
        "forward: true < shuffled actions": paired(e["forward_true"], e["forward_shuffled"]),
        "forward: shuffled < marginal": paired(e["forward_shuffled"], e["forward_marginal"]),
        "inverse: true future < policy": paired(e["inverse_true"], e["inverse_policy"]),
        "inverse: policy < shuffled future": paired(e["inverse_policy"], e["inverse_shuffled"]),
    }
    cpu, flags = cpu_info()
    print(f"{args.checkpoint}: {len(idx)} held-out windows of {len(episodes)} episodes; {cpu}")
    for k, v in e.items():
        print(f"  {k:18s} mean {v.mean():.5f}  median {np.median(v):.5f}")
    for name, r in tests.items():
        print(
            f"  {name:36s} {r['mean_a']:.5f} vs {r['mean_b']:.5f}  lower in {100 * r['a_lower_share']:.0f}% "
            f"of windows  p(Wilcoxon) {r['p_wilcoxon']:.2g}  p(t) {r['p_ttest']:.2g}"
        )
    out = {"checkpoint": args.checkpoint, "store": store, "windows": len(idx), "cpu": cpu, "tests": tests}
    out["means"] = {k: float(v.mean()) for k, v in e.items()}
    if args.against:
        out["against"] = against(args, model, store, episodes, idx, e)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
