"""Training windows, padding at episode edges, splits, normalization and augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_schema

from wm.data import CorruptStoreError, DemoStore, SchemaError
from wm.data.augment import AugmentConfig, augment
from wm.data.dataset import BatchedDataset, WindowDataset, make_loader
from wm.data.normalize import Normalizer, check_finite, compute_stats
from wm.data.windows import WindowSpec, build_index, split_episodes

SPEC = WindowSpec.history_horizon(["img", "state"], ["action"], n_obs=2, horizon=6, n_action_exec=3)


def test_index_respects_padding_bounds():
    ends = np.array([10, 25])
    spec = WindowSpec({"a": (-1, 0, 1, 2, 3, 4)}, max_pad_before=1, max_pad_after=2)
    idx = build_index(ends, spec)
    # Episode 0: anchors 0..7 (window end t+4 may reach step 11 = 9 + 2). Episode 1: 10..22.
    assert idx[:, 0].tolist() == list(range(0, 8)) + list(range(10, 23))
    assert set(map(tuple, idx[:, 1:])) == {(0, 10), (10, 25)}
    unbounded = build_index(ends, WindowSpec({"a": (-1, 0, 1, 2, 3, 4)}))
    assert len(unbounded) == 25
    assert len(build_index(ends, spec, episodes=[1])) == 13


def test_windows_pad_by_repeating_the_edge_step(small_store):
    path, eps = small_store
    ds = WindowDataset(path, SPEC)
    first = ds[0]  # anchor = step 0 of episode 0: the history step before it is padding
    assert first["img_is_pad"].tolist() == [True, False]
    img0 = torch.from_numpy(eps[0]["img"][0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(first["img"][0], img0)
    torch.testing.assert_close(first["img"][1], img0)
    assert first["action_is_pad"].tolist() == [True] + [False] * 5
    np.testing.assert_array_equal(first["action"][1:].numpy(), eps[0]["action"][:5])

    last = ds[len(ds) - 1]  # the last anchor of the last episode reaches past its end
    ep = eps[4]
    T = len(ep["action"])
    assert int(last["episode"]) == 4
    assert last["action_is_pad"].tolist() == [False] * 4 + [True] * 2
    np.testing.assert_array_equal(last["action"][:4].numpy(), ep["action"][T - 4 :])
    np.testing.assert_array_equal(last["action"][4:].numpy(), np.repeat(ep["action"][-1:], 2, 0))
    np.testing.assert_array_equal(last["state"].numpy(), ep["state"][T - 4 : T - 2])


def test_frameskip_offsets(small_store):
    path, eps = small_store
    spec = WindowSpec.history_horizon(["state"], ["action"], n_obs=3, horizon=2, frameskip=2)
    assert spec.offsets["state"] == (-4, -2, 0) and spec.offsets["action"] == (-4, -3, -2, -1)
    ds = WindowDataset(path, spec, episodes=[3])
    item = ds[6]  # anchor = step 6 of episode 3
    np.testing.assert_array_equal(item["state"].numpy(), eps[3]["state"][[2, 4, 6]])


def test_in_memory_and_workers_match(small_store):
    path, _ = small_store
    lazy = WindowDataset(path, SPEC)
    ram = WindowDataset(path, SPEC, in_memory=True)
    for i in (0, 7, len(lazy) - 1):
        for k, v in lazy[i].items():
            torch.testing.assert_close(v, ram[i][k])
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(lazy, batch_size=8, num_workers=workers)
        batches.append(torch.cat([b["img"] for b in loader]))
    torch.testing.assert_close(batches[0], batches[1])
    assert len(batches[0]) == len(lazy)


@pytest.mark.parametrize("zipped", [False, True])  # direct chunk decoding, and zarr's path
def test_damaged_chunk_is_named_by_streaming_and_in_memory_reads(small_store, tmp_path, zipped):
    path, _ = small_store
    chunk = path / "data" / "img" / "c" / "8" / "0" / "0" / "0"  # step 8: episode 1 (steps 7..14)
    chunk.write_bytes(chunk.read_bytes()[:50])
    if zipped:
        path = Path(shutil.make_archive(str(tmp_path / "z.zarr"), "zip", path))
    want = r"data/img/c/8/0/0/0: chunk 8 of key 'img' \(steps 8:9, episode 1\) cannot be decoded"
    ds = WindowDataset(path, SPEC)
    ds.get_batch([0, 1, 2])  # windows inside episode 0 never touch the damage
    anchor = int(np.flatnonzero(ds.index[:, 0] == 9)[0])  # its images are steps 8 and 9
    with pytest.raises(CorruptStoreError, match=want):
        ds.get_batch([0, anchor])
    with pytest.raises(CorruptStoreError, match=want):
        WindowDataset(path, SPEC, in_memory=True)


def test_a_zarr_v2_chunk_cut_before_its_store_was_zipped_is_named_not_decoded(tmp_path):
    """A v2 chunk carries no checksum and zarr does not check Blosc's length header: read through zarr (a
    zip store) a chunk cut short decoded to garbage frames, and verify said the store was fine. A zip
    store's chunks are decoded directly now, as a folder's are, in DataLoader workers too."""
    from conftest import make_episode

    from wm.data.verify import verify_store

    path = tmp_path / "v2.zarr"
    with DemoStore.create(path, make_schema(), zarr_format=2) as store:
        for i in range(3):
            store.append_episode(make_episode(i, 7 + i))
    zipped = Path(shutil.make_archive(str(tmp_path / "whole.zarr"), "zip", path))
    ds, whole = WindowDataset(path, SPEC), WindowDataset(zipped, SPEC)
    loaders = [
        torch.cat([b["img"] for b in make_loader(whole, 4, shuffle=False, num_workers=n)]) for n in (0, 2)
    ]
    torch.testing.assert_close(loaders[0], ds.get_batch(range(len(ds)))["img"], rtol=0, atol=0)
    torch.testing.assert_close(loaders[1], loaders[0], rtol=0, atol=0)
    chunk = next(p for p in (path / "data" / "img").iterdir() if p.name.startswith("8."))  # episode 1
    chunk.write_bytes(chunk.read_bytes()[:50])
    cut = Path(shutil.make_archive(str(tmp_path / "cut.zarr"), "zip", path))
    with pytest.raises(CorruptStoreError, match=r"data/img/8\.0\.0\.0: chunk 8 .*Blosc header says"):
        WindowDataset(cut, SPEC, in_memory=True)
    report = verify_store(cut)
    assert not report.ok and "episodes [1]" in report.summary_line()


def test_split_by_episode(small_store):
    train, val = split_episodes(10, 0.2, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(10))
    assert split_episodes(10, 0.2, seed=3) == (train, val)
    assert split_episodes(10, 0.2, seed=4) != (train, val)
    assert split_episodes(1, 0.4) == ([0], []) and [len(x) for x in split_episodes(2, 0.1)] == [1, 1]
    for n, ratio in ((2, 0.8), (1, 0.6)):  # no training episode left: said as such
        with pytest.raises(ValueError, match=f"val_ratio={ratio} of {n} episode.s. leaves none to train on"):
            split_episodes(n, ratio)
    path, _ = small_store
    tr, va = split_episodes(5, 0.2, seed=0)
    ds = WindowDataset(path, SPEC, episodes=va)
    assert {int(ds[i]["episode"]) for i in range(len(ds))} == set(va)


def test_missing_key_is_named(small_store):
    path, _ = small_store
    with pytest.raises(SchemaError, match=r"needs keys \['wrist'\]"):
        WindowDataset(path, WindowSpec({"wrist": (0,), "action": (0,)}))


def test_normalizer_fit_save_load(small_store, tmp_path):
    path, eps = small_store
    store = DemoStore.open(path)
    norm = Normalizer.fit(store, {"action": "minmax", "state": "meanstd", "img": "identity"})
    acts = np.concatenate([e["action"] for e in eps])
    x = torch.from_numpy(acts)
    y = norm.normalize("action", x)
    assert y.min().item() == pytest.approx(-1, abs=1e-5) and y.max().item() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(norm.unnormalize("action", y), x)
    s = norm.normalize("state", torch.from_numpy(np.concatenate([e["state"] for e in eps])))
    torch.testing.assert_close(s.mean(0), torch.zeros(4), atol=1e-5, rtol=0)

    norm.save(tmp_path / "norm.json")
    loaded = Normalizer.load(tmp_path / "norm.json")
    torch.testing.assert_close(loaded.normalize("action", x), y)
    rebuilt = Normalizer.from_state_dict(norm.modes, norm.state_dict())
    torch.testing.assert_close(
        rebuilt.normalize("state", x[:, :1].repeat(1, 4)), norm.normalize("state", x[:, :1].repeat(1, 4))
    )
    q = Normalizer.fit(store, {"action": "quantile"})
    assert q.normalize("action", x).abs().max() > 1  # the 1% tails fall outside [-1, 1]


def test_a_store_rewritten_under_a_dataset_is_refused_not_mispaired(small_store):
    """Episodes deleted while a dataset read the store: its index and low-dim steps (in RAM) were the
    old store's, its frames the new one's: batches paired frames with other episodes' actions."""
    from wm.data import StoreError, delete_episodes

    path, _ = small_store
    spec = WindowSpec.history_horizon(["img"], ["action"], n_obs=2, horizon=4)
    dataset = WindowDataset(path, spec)
    dataset.get_batch([0, 1])
    delete_episodes(path, [0])
    with pytest.raises(StoreError, match="the store was rewritten .* while this dataset read it"):
        dataset.get_batch([0, 1])
    WindowDataset(path, spec).get_batch([0, 1])  # a dataset made after the rewrite reads it


def test_no_window_to_train_on_says_why(tmp_path):
    """Episodes shorter than a window: torch's sampler said only "num_samples=0"."""
    from wm.data import KeySpec, Schema

    schema = Schema(
        keys={"q": KeySpec((2,), "float32", "proprio"), "action": KeySpec((2,), "float32", "action")}
    )
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        for length in (5, 6, 4):
            store.append_episode({k: np.zeros((length, 2), np.float32) for k in ("q", "action")})
    spec = WindowSpec.history_horizon(["q"], ["action"], n_obs=2, horizon=16, n_action_exec=8)
    dataset = WindowDataset(tmp_path / "s.zarr", spec)
    with pytest.raises(ValueError, match=r"s.zarr: 3 episode\(s\) of 4..6 steps; a window spans 16 steps"):
        make_loader(dataset, 4)
    assert len(make_loader(dataset, 4, shuffle=False)) == 0  # a validation set may be empty


def test_normalizer_refuses_non_finite_values_naming_where(tmp_path):
    """A low-dim key may hold NaN or inf (the store takes them outside actions): fitted, every step of
    that dimension normalized to NaN, silently."""
    from wm.data import KeySpec, Schema

    schema = Schema(
        keys={"object": KeySpec((3,), "float32", "lowdim"), "action": KeySpec((2,), "float32", "action")}
    )
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        for e in range(2):
            obj = np.zeros((20, 3), np.float32)
            if e == 1:
                obj[7, 2] = np.inf
            store.append_episode({"object": obj, "action": np.zeros((20, 2), np.float32)})
        with pytest.raises(ValueError, match=r"key 'object' holds a non-finite value in episode 1, step 7"):
            Normalizer.fit(store, {"object": "meanstd", "action": "minmax"})
        norm = Normalizer.fit(store, {"object": "meanstd"}, episodes=[0])  # the clean episode fits
        assert torch.isfinite(norm.normalize("object", torch.zeros(1, 3))).all()


def test_normalizer_constant_dimension_and_bad_mode():
    stats = {
        "a": {n: np.array([2.0]) for n in ("min", "max", "mean", "q01", "q99")} | {"std": np.array([0.0])}
    }
    for mode in ("minmax", "meanstd", "quantile"):
        norm = Normalizer({"a": mode}, stats)
        out = norm.normalize("a", torch.full((3, 1), 2.0))
        assert torch.isfinite(out).all() and out.abs().max() == 0
        # a reading a little off the constant stays a little off (scale 1), and inverts exactly
        x = torch.tensor([[2.0001], [1.9]])
        torch.testing.assert_close(norm.normalize("a", x), x - 2.0)
        torch.testing.assert_close(norm.unnormalize("a", norm.normalize("a", x)), x)
    # quantile mode: a gripper closed in under 1 % of steps (q01 == q99) spans its min and max instead
    grip = np.r_[np.zeros(995), np.ones(5)][:, None]
    norm = Normalizer({"g": "quantile"}, {"g": compute_stats(grip)})
    torch.testing.assert_close(
        norm.normalize("g", torch.tensor([[0.0], [1.0]])), torch.tensor([[-1.0], [1.0]])
    )
    with pytest.raises(ValueError, match="mode 'zscore'"):
        Normalizer({"a": "zscore"}, stats)


def test_a_checkpoint_keeps_the_spread_rule_it_was_trained_with():
    """Checkpoints saved before rule 2 (no "rule" in their normalizer) normalize as they were trained:
    a dimension moving 2e-5 was scaled by its spread then; rule 2 only centres it."""
    stats = {"a": compute_stats(np.array([[0.0], [4e-5]]))}
    x = torch.tensor([[4e-5]])
    saved = Normalizer({"a": "minmax"}, stats).to_dict()
    assert saved["rule"] == 2
    torch.testing.assert_close(Normalizer.from_dict(saved).normalize("a", x), torch.tensor([[2e-5]]))
    old = {k: v for k, v in saved.items() if k != "rule"}  # as written before 2026-12-04
    for mode in ("minmax", "quantile", "meanstd"):
        norm = Normalizer.from_dict({**old, "modes": {"a": mode}})
        assert norm.rule == 1 and 0.5 < float(norm.normalize("a", x)) < 2.0  # the old scale: ~1
    with pytest.raises(ValueError, match="normalizer rule 3 is not 1 or 2"):
        Normalizer.from_dict({**saved, "rule": 3})


def test_augmentation_draws_per_sample():
    x = torch.rand(1, 2, 3, 32, 32).repeat(16, 1, 1, 1, 1)  # 16 identical samples
    cfg = AugmentConfig(shift_pad=4, crop=(28, 28), brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    out = augment(x, cfg, gen=torch.Generator().manual_seed(0))
    assert out.shape == (16, 2, 3, 28, 28)
    distinct = {tuple(out[i].flatten()[:50].tolist()) for i in range(16)}
    assert len(distinct) == 16, "samples shared one draw"
    # The two frames of one sample share the draw: identical input frames stay identical.
    same = torch.rand(4, 1, 3, 32, 32).repeat(1, 2, 1, 1, 1)
    o = augment(same, cfg)
    torch.testing.assert_close(o[:, 0], o[:, 1])
    again = augment(x, cfg, gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    ev = augment(x, cfg, train=False)
    torch.testing.assert_close(ev, x[..., 2:30, 2:30])
    with pytest.raises(ValueError, match="larger than the images"):
        augment(x, AugmentConfig(crop=(40, 40)))


def test_hue_rotation_preserves_gray():
    gray = torch.full((2, 1, 3, 4, 4), 0.5)
    out = augment(gray, AugmentConfig(hue=0.5))
    torch.testing.assert_close(out, gray, atol=1e-5, rtol=0)


def test_color_jitter_reaches_rgba_and_grayscale_cameras():
    """It was applied to 3-channel images only: RGBA and grayscale cameras trained without it."""
    cfg = AugmentConfig(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)
    rgba = torch.rand(8, 2, 4, 6, 6)
    out = augment(rgba, cfg, gen=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[:, :, :3], rgba[:, :, :3])
    torch.testing.assert_close(out[:, :, 3:], rgba[:, :, 3:])  # alpha is not a colour
    rgb = augment(rgba[:, :, :3], cfg, gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, :3], rgb)  # the colour channels get what RGB would
    gray = torch.rand(8, 2, 1, 6, 6)
    out = augment(gray, cfg, gen=torch.Generator().manual_seed(0))
    assert out.shape == gray.shape and not torch.allclose(out, gray)
    with pytest.raises(ValueError, match="color jitter takes 1, 3 or 4 channels"):
        augment(torch.rand(1, 1, 2, 6, 6), cfg)


def test_dataset_with_augmentation(small_store):
    path, _ = small_store
    ds = WindowDataset(path, SPEC, augment_cfg=AugmentConfig(crop=(20, 28)))
    assert ds[3]["img"].shape == (2, 3, 20, 28)
    assert make_schema().keys["img"].shape == (24, 32, 3)


def test_make_loader_batches_and_seeded_order(small_store):
    path, _ = small_store
    ds = WindowDataset(path, SPEC)

    def first_anchors(seed: int, workers: int = 0) -> list[list[int]]:
        loader = make_loader(ds, 8, shuffle=True, num_workers=workers, seed=seed)
        return [b["anchor"].tolist() for b in loader]

    a = first_anchors(0)
    assert sum(len(x) for x in a) == len(ds) and sorted(sum(a, [])) == sorted(ds.index[:, 0].tolist())
    assert first_anchors(0, workers=2) == a  # reproducible, with or without workers
    assert first_anchors(1) != a
    loader = make_loader(ds, 8, shuffle=True, seed=0)
    epochs = [[b["anchor"].tolist() for b in loader] for _ in range(2)]
    assert epochs[0] != epochs[1], "every epoch must have its own order"
    batch = next(iter(loader))
    assert batch["img"].shape == (8, 2, 3, 24, 32) and batch["action_is_pad"].shape == (8, 6)


def test_uint8_images(small_store):
    path, eps = small_store
    ds = WindowDataset(path, SPEC, image_dtype="uint8")
    item = ds[1]
    assert item["img"].dtype == torch.uint8
    np.testing.assert_array_equal(item["img"][1].permute(1, 2, 0).numpy(), eps[0]["img"][1])
    with pytest.raises(ValueError, match="augment the float batch"):
        WindowDataset(path, SPEC, image_dtype="uint8", augment_cfg=AugmentConfig(crop=(8, 8)))


class _WorkerSeed(BatchedDataset):
    """Each batch holds the random seed of the loader worker that built it."""

    def __len__(self) -> int:
        return 8

    def get_batch(self, indices):
        return {"seed": torch.tensor([torch.initial_seed()] * len(indices))}


def test_ddp_ranks_loader_workers_draw_different_random_streams():
    """Augmentation draws from the workers' seeds: under DDP every rank's workers must differ, not only
    the workers of one rank (the generator was seeded with `seed` alone, the same on every rank)."""
    seeds = [
        int(next(iter(make_loader(_WorkerSeed(), 2, num_workers=1, seed=3, rank=r, world_size=2)))["seed"][0])
        for r in (0, 1)
    ]
    assert seeds[0] != seeds[1]
    again = make_loader(_WorkerSeed(), 2, num_workers=1, seed=3, rank=1, world_size=2)
    assert int(next(iter(again))["seed"][0]) == seeds[1]  # and each rank reproduces


def _camera_store(path, frames: np.ndarray, lengths=(10, 10, 10)) -> Path:
    """A store of one camera 'img' holding `frames` (split into episodes of `lengths`) and actions."""
    from wm.data import KeySpec, Schema

    schema = Schema(
        keys={
            "img": KeySpec(frames.shape[1:], frames.dtype.name, "image"),
            "action": KeySpec((2,), "float32", "action"),
        }
    )
    with DemoStore.create(path, schema) as store:
        start = 0
        for n in lengths:
            store.append_episode({"img": frames[start : start + n], "action": np.zeros((n, 2), np.float32)})
            start += n
    return path


def test_frames_that_would_not_read_as_stored_are_refused_naming_where(tmp_path):
    """Frames that are not uint8 were clipped to 0..255 silently: a 12-bit camera stored as uint16 trained
    on frames almost all white, and float NaN pixels trained as black. Both are refused, in one line naming
    the store and key: when the dataset loads the frames, samples them, or reads a batch from disk."""
    rng = np.random.default_rng(0)
    spec = WindowSpec({"img": (0,)})
    u16 = _camera_store(tmp_path / "u16.zarr", rng.integers(0, 4096, (30, 8, 8, 3)).astype(np.uint16))
    for in_memory in (False, True):
        with pytest.raises(
            SchemaError, match=r"u16.zarr: image key 'img' \(uint16\) holds values in \d+..4\d{3} in"
        ):
            WindowDataset(u16, spec, in_memory=in_memory)
    frames = rng.integers(0, 256, (30, 8, 8, 3)).astype(np.float32)
    frames[13, 2, 2, 1] = np.nan  # episode 1, step 3: not among the frames sampled at construction
    nan = _camera_store(tmp_path / "nan.zarr", frames)
    with pytest.raises(SchemaError, match=r"nan.zarr: image key 'img' \(float32\) holds non-finite values"):
        WindowDataset(nan, spec, in_memory=True)
    ds = WindowDataset(nan, spec)  # streamed: refused in the batch that reads it
    assert ds.get_batch(list(range(10)))["img"].isfinite().all()
    with pytest.raises(SchemaError, match=r"holds non-finite values \(NaN or inf\) in episode 1, step 3"):
        ds.get_batch([12, 13])
    ok = _camera_store(tmp_path / "ok.zarr", np.full((30, 8, 8, 3), 255.0, np.float32))  # 0..255 floats: fine
    assert WindowDataset(ok, spec, in_memory=True).get_batch([0])["img"].eq(1).all()


def test_no_window_says_how_long_an_episode_must_be(tmp_path):
    from wm.data.windows import min_episode_length, why_no_windows

    spec = WindowSpec(
        {"img": (0, 5, 10, 15, 20), "action": tuple(range(20))}, max_pad_before=0, max_pad_after=5
    )
    assert min_episode_length(spec) == 16
    assert len(build_index(np.array([15, 31]), spec)) == 1  # the 16-step episode holds one window
    assert why_no_windows("s.zarr", [12], spec) == (
        "s.zarr: 1 episode(s) of 12..12 steps; a window spans 21 steps (at most 0 padded before, at most 5 "
        "padded after), so an episode needs at least 16"
    )
    assert min_episode_length(WindowSpec({"a": (-3, 4)})) == 1  # any padding: every step anchors one


def test_non_finite_values_are_refused_in_episodes_the_normalizer_is_not_fitted_on(tmp_path):
    """`check_finite` looks at every episode asked for, in one read: a NaN in a validation episode
    made NaN validation metrics, and one in a video store a 'training diverged' error."""
    from wm.data import KeySpec, Schema
    from wm.data.normalize import check_finite

    schema = Schema(keys={"q": KeySpec((3,), "float32", "lowdim"), "n": KeySpec((1,), "int64", "lowdim")})
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        for e in range(3):
            q = np.zeros((6, 3), np.float32)
            if e == 2:
                q[4, 1] = -np.inf
            store.append_episode({"q": q, "n": np.zeros((6, 1), np.int64)})
        with pytest.raises(
            ValueError,
            match=r"s.zarr: key 'q' holds a non-finite value in episode 2, step 4; .*drop the episode "
            r"\(wm-info store=\S+ 'drop_episodes=\[2\]'\)",
        ):
            check_finite(store, "q")
        check_finite(store, "q", episodes=[0, 1])  # the clean episodes pass
        check_finite(store, "n")  # an integer key holds no NaN


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WindowSpec({"a": (0, 1.5)}), r"key 'a': offset must be a whole number, got 1.5"),
        (lambda: WindowSpec({"a": "12"}), r"key 'a': offsets must be a sequence of whole numbers"),
        (lambda: WindowSpec({"a": (0, 1)}, max_pad_after=float("nan")), "max_pad_after must be a whole"),
        (lambda: WindowSpec({"a": (0, 1)}, max_pad_before=0.5), "max_pad_before must be a whole"),
        (lambda: WindowSpec.history_horizon(["s"], n_obs=2.5), "n_obs must be a whole number"),
        (lambda: WindowSpec.history_horizon(["s"], frameskip=1.5), "frameskip must be a whole number"),
        (lambda: WindowSpec.history_horizon(["s"], n_action_exec=2.5), "n_action_exec must be a whole"),
        (lambda: WindowSpec.history_horizon(["s"], n_action_exec=float("nan")), "n_action_exec must be"),
        (lambda: WindowSpec.history_horizon(["s"], n_action_exec=0), r"n_action_exec must be >= 1, got 0"),
    ],
)
def test_window_counts_that_are_not_whole_numbers_are_refused(make, match):
    """An offset of 1.5 was truncated to 1, "12" read as offsets 1 and 2, a NaN padding bound silently
    lifted the bound (every anchor kept), n_obs=2.5 was a TypeError from range()."""
    with pytest.raises(ValueError, match=match):
        make()
    spec = WindowSpec.history_horizon(["s"], n_obs=2.0, horizon=3.0, n_action_exec=2.0)  # YAML floats
    assert spec.offsets["s"] == (-1, 0) and spec.max_pad_after == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shift_pad": float("nan")}, "shift_pad must be a whole number"),
        ({"shift_pad": 1.5}, "shift_pad must be a whole number"),
        ({"crop": (20.7, 28)}, "crop size must be a whole number, got 20.7"),
        ({"crop": (float("nan"), 28)}, "crop size must be a whole number"),
        ({"crop": 20}, r"crop must be \(h, w\)"),
    ],
)
def test_augment_config_refuses_sizes_that_are_not_whole_numbers(kwargs, match):
    """A NaN shift_pad was accepted (and failed in F.pad at the first batch), a crop of 20.7 truncated."""
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


def test_augment_keeps_the_dtype_and_refuses_integer_images():
    """Half / bfloat16 batches came back float32 (float32 jitter factors promoted them), hue failed on
    half (linalg.inv); a uint8 batch was jittered then clamped to [0, 1]: a white image."""
    cfg = AugmentConfig(shift_pad=2, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    x = torch.rand(4, 2, 3, 8, 8)
    ref = augment(x, cfg, gen=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        out = augment(x.to(dtype), cfg, gen=torch.Generator().manual_seed(0))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match=r"float images in \[0, 1\], got torch.uint8"):
        augment((x * 255).to(torch.uint8), cfg)


def test_normalizer_reads_integer_inputs_without_rounding_its_statistics():
    """An int tensor made .to(x) round the offset and scale to integers: 5 in [0, 9] normalized to
    0.25 instead of 1/9."""
    norm = Normalizer({"g": "minmax"}, {"g": compute_stats(np.arange(10.0)[:, None])})
    torch.testing.assert_close(norm.normalize("g", torch.tensor([[5]])), torch.tensor([[1 / 9]]))
    torch.testing.assert_close(norm.unnormalize("g", torch.tensor([[1]])), torch.tensor([[9.0]]))


def test_a_range_wider_than_float32_holds_normalizes_and_inverts():
    """(max - min) / 2 was taken in float32: a range of finite values wider than 3.4e38 made an inf
    scale, which normalized the dimension to 0 and unnormalized it to NaN."""
    x = np.stack([np.linspace(-1, 1, 50), np.linspace(-3e38, 3e38, 50)], 1).astype(np.float32)
    for mode in ("minmax", "quantile"):
        norm = Normalizer({"a": mode}, {"a": compute_stats(x)})
        out = norm.normalize("a", torch.from_numpy(x))
        assert torch.isfinite(out).all() and out[:, 1].unique().numel() == 50, mode
        back = norm.unnormalize("a", out)
        assert torch.isfinite(back).all(), mode
        torch.testing.assert_close(back, torch.from_numpy(x), rtol=1e-5, atol=1e-5)
    small = Normalizer({"a": "minmax"}, {"a": compute_stats(np.array([[0.1], [0.7]]))})  # unchanged:
    assert small.normalize("a", torch.tensor([[0.7]])).item() == 1.0  # halving first is exact


def test_dimensions_float32_cannot_resolve_are_named_at_fit():
    """A dimension far from zero beside a small spread (a position with a large fixed offset, a clock)
    became a staircase of a few values, or a constant, in the float32 the models read: silently."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(-1, 1, 500), 1e6 + rng.uniform(-0.5, 0.5, 500), rng.uniform(9, 11, 500)], 1)
    stats = compute_stats(x)
    for mode in ("minmax", "meanstd", "quantile"):
        norm = Normalizer({"pose": mode}, {"pose": stats})
        (line,) = norm.coarse_notes()
        assert line.startswith("note: key 'pose', dimension(s) [1]: values around 1e+06 vary by "), line
        assert "store them relative to a reference value" in line
        seen = norm.normalize("pose", torch.tensor(x, dtype=torch.float32))[:, 1]
        assert seen.unique().numel() < 40  # what the note is about: 500 readings, a few dozen values
    clean = compute_stats(x[:, [0, 2]])
    assert Normalizer({"pose": "minmax"}, {"pose": clean}).coarse_notes() == []
    flat = compute_stats(np.full((10, 1), 1e6))  # hardly varies: only centred, nothing to resolve
    assert Normalizer({"c": "minmax", "i": "identity"}, {"c": flat}).coarse_notes() == []


def test_normalizer_refuses_statistics_that_would_make_nan():
    """A NaN, inf, missing or mis-shaped statistic (a hand-edited normalizer.json) was accepted: NaN
    outputs, a KeyError, or a silent broadcast."""
    good = compute_stats(np.arange(10.0).reshape(5, 2))
    for name, value in (("min", [float("nan"), 0.0]), ("std", [float("inf"), 1.0])):
        with pytest.raises(ValueError, match=f"statistic '{name}' of key 'a' is not finite"):
            Normalizer.from_dict({"modes": {"a": "minmax"}, "stats": {"a": {**good, name: value}}})
    with pytest.raises(ValueError, match="key 'a' has no statistic 'q99'"):
        Normalizer({"a": "minmax"}, {"a": {k: v for k, v in good.items() if k != "q99"}})
    with pytest.raises(ValueError, match="key 'a' has statistics of different shapes"):
        Normalizer({"a": "minmax"}, {"a": {**good, "max": np.array([1.0])}})


def test_normalizer_fit_on_no_steps_says_so(small_store):
    """Fitting on no episode was numpy's "need at least one array to concatenate"."""
    with DemoStore.open(small_store[0]) as store:
        with pytest.raises(ValueError, match="no steps to fit key 'action'"):
            Normalizer.fit(store, {"action": "minmax"}, episodes=[])


def test_normalizing_a_key_the_store_lacks_names_the_store(small_store):
    """Fitting or checking a key the store lacks (a proprio key's typo) was a bare KeyError: 'qpos'."""
    with DemoStore.open(small_store[0]) as store:
        with pytest.raises(SchemaError, match=r"small.zarr: no key 'qpos' to normalize \(its keys"):
            Normalizer.fit(store, {"action": "minmax", "qpos": "meanstd"})
        with pytest.raises(SchemaError, match=r"small.zarr: no key 'qpos' to normalize"):
            check_finite(store, "qpos")


def test_episode_numbers_and_loader_counts_that_are_not_whole_are_refused(small_store):
    """Episode 1.5 was read as episode 1; rank 1 of world_size 1 silently read rank 0's shard (every
    window twice across two "ranks"); num_workers=1.5 was a TypeError at the first batch."""
    path, _ = small_store
    with pytest.raises(ValueError, match="episode must be a whole number, got 1.5"):
        WindowDataset(path, SPEC, episodes=[0, 1.5])
    ds = WindowDataset(path, SPEC, episodes=[0, 2.0])  # a whole float is its number
    assert ds.episodes == [0, 2]
    for kwargs in ({"rank": 1, "world_size": 1}, {"world_size": 0}, {"num_workers": -1}):
        with pytest.raises(ValueError, match=r"need num_workers >= 0, world_size >= 1 and 0 <= rank"):
            make_loader(ds, 4, **kwargs)
    with pytest.raises(ValueError, match="num_workers must be a whole number, got 1.5"):
        make_loader(ds, 4, num_workers=1.5)


def test_normalizer_keys_that_share_a_buffer_name_are_refused_and_a_state_dict_keeps_the_rule():
    """ "a.b" and "a__b" were both stored as buffers "a__b__*": the second key's statistics silently
    replaced the first's; a
    rule-1 normalizer rebuilt from a state dict alone took rule 2 (the state dict holds no rule)."""
    stats = compute_stats(np.arange(10.0).reshape(5, 2))
    with pytest.raises(ValueError, match=r"keys \['a.b', 'a__b'\] collide as buffer names"):
        Normalizer({"a.b": "minmax", "a__b": "minmax"}, {"a.b": stats, "a__b": stats})
    flat = {**stats, "min": np.array([0.0, 1.0]), "max": np.array([0.0, 1.0 + 1e-7])}  # no spread
    old = Normalizer({"q": "minmax"}, {"q": flat}, rule=1)
    rebuilt = Normalizer.from_state_dict(old.modes, old.state_dict(), rule=old.rule)
    x = torch.tensor([[0.5, 1.0]])
    torch.testing.assert_close(rebuilt.normalize("q", x), old.normalize("q", x))
    assert rebuilt.rule == 1
