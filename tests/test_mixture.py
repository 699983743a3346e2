"""Action-free windows, labelled + video mixtures, store compatibility and action stripping."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import make_episode, make_schema

from wm.data import DemoStore, SchemaError
from wm.data.dataset import WindowDataset, make_loader
from wm.data.mixture import (
    ACTION_FREE,
    ActionFreeWindows,
    MixedWindows,
    check_compatible,
    flag_action_free,
    strip_actions,
)
from wm.data.windows import WindowSpec
from wm.encoders import EncoderConfig, build_encoder
from wm.feature_cache import build_feature_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)

SPEC = WindowSpec.history_horizon(["img", "state"], ["action"], n_obs=2, horizon=6, n_action_exec=3)


def write_store(path, seeds, schema=None, drop=()):
    """A store of episodes made from `seeds` (lengths 7, 8, ...), without the keys in `drop`."""
    schema = schema or make_schema()
    schema = dataclasses.replace(schema, keys={k: s for k, s in schema.keys.items() if k not in drop})
    episodes = []
    with DemoStore.create(path, schema) as store:
        for i, seed in enumerate(seeds):
            ep = make_episode(seed, 7 + i)
            episodes.append(ep)
            store.append_episode({k: v for k, v in ep.items() if k not in drop}, {"notes": f"seed{seed}"})
    return path, episodes


@pytest.fixture
def video_store(tmp_path):
    """Five episodes without actions, made from seeds 100..104 (distinct from small_store's frames)."""
    return write_store(tmp_path / "videos.zarr", range(100, 105), drop=("action",))


def frame(ep, t):
    return torch.from_numpy(ep["img"][t]).permute(2, 0, 1).float() / 255  # (C, H, W)


def test_action_free_store_has_the_labelled_layout(small_store, tmp_path):
    path, eps = small_store
    assert strip_actions(path, tmp_path / "stripped.zarr") == 5
    with DemoStore.open(tmp_path / "stripped.zarr") as s:
        assert "action" not in s.keys and s.n_episodes == 5
        assert s.episode_info(2) == {"length": 9, "success": True, "notes": "ep2", ACTION_FREE: True}
    labelled = WindowDataset(path, SPEC)
    video = ActionFreeWindows(tmp_path / "stripped.zarr", SPEC, action_shape=(2,))
    np.testing.assert_array_equal(video.index, labelled.index)  # anchored as if the actions were there
    idx = [0, 5, len(video) - 1]
    a, b = labelled.get_batch(idx), video.get_batch(idx)
    assert set(b) == set(a) | {"has_action"}
    for k in a:
        assert b[k].shape == a[k].shape and b[k].dtype == a[k].dtype, k
    for k in ("img", "state", "img_is_pad", "state_is_pad", "episode", "anchor"):
        torch.testing.assert_close(b[k], a[k])
    assert b["action"].abs().sum() == 0 and b["action_is_pad"].all() and not b["has_action"].any()
    with pytest.raises(ValueError, match="pass action_shape"):
        ActionFreeWindows(tmp_path / "stripped.zarr", SPEC)
    with pytest.raises(SchemaError, match=r"action 'action' is \(2,\), not the \(3,\) expected"):
        ActionFreeWindows(path, SPEC, action_shape=(3,))
    with pytest.raises(ValueError, match="action_shape must be a whole number, got 2.5"):  # it was cut to 2
        ActionFreeWindows(tmp_path / "stripped.zarr", SPEC, action_shape=(2.5,))


def test_flagged_episodes_lose_only_their_actions(small_store):
    path, eps = small_store
    flag_action_free(path, [1, -2])  # episodes 1 and 3
    with DemoStore.open(path) as s:
        assert [s.episode_info(e).get(ACTION_FREE, False) for e in range(5)] == [
            False,
            True,
            False,
            True,
            False,
        ]
        assert s.episode_info(1)["notes"] == "ep1"
        np.testing.assert_array_equal(s.get_episode(3)["img"], eps[3]["img"])
    ds = ActionFreeWindows(path, SPEC)
    batch = ds.get_batch(range(len(ds)))
    flagged = torch.isin(batch["episode"], torch.tensor([1, 3]))
    assert flagged.any() and (~flagged).any()
    assert torch.equal(batch["has_action"], ~flagged)
    assert batch["action"][flagged].abs().sum() == 0 and batch["action_is_pad"][flagged].all()
    labelled = WindowDataset(path, SPEC, episodes=[0, 2, 4])
    plain = labelled.get_batch(range(len(labelled)))
    torch.testing.assert_close(batch["action"][~flagged], plain["action"])
    torch.testing.assert_close(batch["action_is_pad"][~flagged], plain["action_is_pad"])
    # a plain dataset read the flagged episodes' stored actions as labels, without a word
    with pytest.raises(SchemaError, match=r"episodes \[1, 3\] are flagged action_free: their actions are no"):
        WindowDataset(path, SPEC)
    assert len(WindowDataset(path, WindowSpec({"img": (0,)}))) > len(labelled)  # frames only: all of them
    with pytest.raises(ValueError, match=r"episodes \[7\] out of range"):
        flag_action_free(path, [7])
    with pytest.raises(ValueError, match="episode must be a whole number, got 0.5"):  # it flagged episode 0
        flag_action_free(path, [0.5])


def test_a_video_store_with_actions_co_trains_as_video(small_store):
    """video_store= is co-trained as video: a store that holds actions (another robot's demonstrations,
    other units) had them trained on, outside the range the normalizer was fitted on."""
    path, _ = small_store
    ds = ActionFreeWindows(path, SPEC, action_shape=(2,), video=True)
    batch = ds.get_batch(range(len(ds)))
    assert not batch["has_action"].any() and batch["action"].abs().sum() == 0 and batch["action_is_pad"].all()
    torch.testing.assert_close(batch["img"], WindowDataset(path, SPEC).get_batch(range(len(ds)))["img"])


def test_strip_chosen_episodes(small_store, tmp_path):
    path, eps = small_store
    assert strip_actions(path, tmp_path / "two.zarr", [3, 1]) == 2
    with DemoStore.open(tmp_path / "two.zarr") as s:
        np.testing.assert_array_equal(s.episode_lengths(), [10, 8])
        np.testing.assert_array_equal(s.get_episode(0)["state"], eps[3]["state"])
    with pytest.raises(FileExistsError):
        strip_actions(path, tmp_path / "two.zarr")
    with pytest.raises(SchemaError, match="no action key to strip"):
        strip_actions(tmp_path / "two.zarr", tmp_path / "three.zarr")


def test_mixture_ratio_is_exact_and_video_comes_from_the_video_store(small_store, video_store):
    (lpath, _), (vpath, veps) = small_store, video_store
    labelled = WindowDataset(lpath, SPEC)
    video = ActionFreeWindows(vpath, SPEC, action_shape=(2,))
    mixed = MixedWindows(labelled, video, video_ratio=0.25, seed=3)
    assert len(mixed) == math.ceil(len(labelled) / 0.75)
    for idx in ([0, 1, 2, 3, 4, 5, 6, 7], [9, 4, 30, 2, 11], list(range(20, 36))):
        batch = mixed.get_batch(idx)
        n_vid = int(batch["source"].sum())  # 2 of 8, 4 of 16; 1 or 2 of 5
        assert n_vid == len(idx) // 4 if len(idx) % 4 == 0 else n_vid in (1, 2)
        assert batch["source"].tolist() == [0] * (len(idx) - n_vid) + [1] * n_vid
        assert torch.equal(batch["has_action"], batch["source"] == 0)
        assert batch["img"].shape == (len(idx), 2, 3, 24, 32)
        for b in np.flatnonzero(batch["source"].numpy() == 1):  # frames of the video store's episodes
            ep, anchor = int(batch["episode"][b]), int(batch["anchor"][b])
            t = anchor - sum(7 + i for i in range(ep))
            torch.testing.assert_close(batch["img"][b, 1], frame(veps[ep], t))
            assert batch["action_is_pad"][b].all()
    again = mixed.get_batch([9, 4, 30, 2, 11])
    for k, v in mixed.get_batch([9, 4, 30, 2, 11]).items():
        torch.testing.assert_close(v, again[k])
    other = MixedWindows(labelled, video, video_ratio=0.25, seed=4).get_batch([9, 4, 30, 2, 11])
    assert not torch.equal(other["anchor"], again["anchor"])
    with pytest.raises(IndexError, match="out of range"):
        mixed.get_batch([len(mixed)])


def test_the_video_share_is_the_ratio_on_average_whatever_the_batch_size(small_store, video_store):
    """A fixed rounding gave 0.1 of 4 no video window in any batch (the video store never trained) and
    0.2 of 8 a quarter in every one."""
    labelled = WindowDataset(small_store[0], SPEC)
    video = ActionFreeWindows(video_store[0], SPEC, action_shape=(2,))
    for ratio, size in ((0.1, 4), (0.2, 8)):
        mixed = MixedWindows(labelled, video, video_ratio=ratio, seed=0)
        rng = np.random.default_rng(0)
        shares = [mixed.n_video(size, rng) / size for _ in range(4000)]
        assert abs(np.mean(shares) - ratio) < 0.01, (ratio, size, np.mean(shares))


def test_ratio_zero_is_the_labelled_dataset(small_store, video_store):
    labelled = WindowDataset(small_store[0], SPEC)
    video = ActionFreeWindows(video_store[0], SPEC, action_shape=(2,))
    mixed = MixedWindows(labelled, video, video_ratio=0.0)
    assert len(mixed) == len(labelled)
    batch, plain = mixed.get_batch([5, 0, 12]), labelled.get_batch([5, 0, 12])
    assert torch.equal(batch["anchor"], plain["anchor"]) and batch["has_action"].all()
    assert not batch["source"].any()


def test_mixture_through_make_loader(small_store, video_store):
    labelled = WindowDataset(small_store[0], SPEC)
    video = ActionFreeWindows(video_store[0], SPEC, action_shape=(2,))
    mixed = MixedWindows(labelled, video, video_ratio=0.5, seed=0)

    def anchors(seed: int) -> list[list[int]]:
        batches = list(make_loader(mixed, 8, seed=seed, drop_last=True))
        assert all(b["source"].sum() == 4 and b["img"].shape[0] == 8 for b in batches)
        return [b["anchor"].tolist() for b in batches]

    a = anchors(0)
    assert len(a) == len(mixed) // 8
    assert anchors(0) == a and anchors(1) != a
    items = next(iter(torch.utils.data.DataLoader(mixed, batch_size=6)))  # plain loader: __getitems__
    assert items["source"].tolist() == [0, 0, 0, 1, 1, 1]


def test_a_batch_of_one_draws_anew_every_epoch(small_store, video_store):
    """A batch's windows were seeded by its indices alone: at batch_size 1 the same index drew the same
    window every epoch, and a run never saw about a third of the windows however long it trained."""
    labelled = WindowDataset(small_store[0], SPEC)
    video = ActionFreeWindows(video_store[0], SPEC, action_shape=(2,))
    mixed = MixedWindows(labelled, video, video_ratio=0.5, seed=0)
    seen = {0: set(), 1: set()}  # source -> (episode, anchor) drawn
    for epoch in range(30):
        mixed.set_epoch(epoch)
        for batch in make_loader(mixed, 1, seed=0):  # the same shuffled order every epoch
            seen[int(batch["source"])].add((int(batch["episode"]), int(batch["anchor"])))
    assert len(seen[0]) == len(labelled) and len(seen[1]) == len(video)
    mixed.set_epoch(3)
    again = mixed.get_batch([7, 2])
    assert torch.equal(again["anchor"], mixed.get_batch([7, 2])["anchor"])  # reproducible within an epoch


def test_the_epoch_reaches_persistent_workers(small_store, video_store):
    """The trainer set the epoch on the dataset in its own process, which a persistent worker (made
    once, with the dataset as it was then) never saw: every epoch drew epoch 0's windows. The epoch
    goes out with each batch's indices (`loader.sampler.set_epoch`)."""
    labelled = WindowDataset(small_store[0], SPEC)
    video = ActionFreeWindows(video_store[0], SPEC, action_shape=(2,))
    mixed = MixedWindows(labelled, video, video_ratio=0.5, seed=0)

    def drawn(loader, epoch: int) -> list[tuple[int, int]]:
        loader.sampler.set_epoch(epoch)
        return [(int(b["episode"]), int(b["anchor"])) for b in loader]

    here = make_loader(mixed, 1, shuffle=False)  # the same indices every epoch: only the draw differs
    workers = make_loader(mixed, 1, shuffle=False, num_workers=1, persistent_workers=True)
    assert workers.persistent_workers
    first, second = drawn(workers, 0), drawn(workers, 1)
    assert first != second
    assert (first, second) == (drawn(here, 0), drawn(here, 1))


def test_missing_proprio_is_padded_only_when_allowed(small_store, tmp_path):
    lpath = small_store[0]
    vpath, _ = write_store(tmp_path / "noproprio.zarr", range(100, 103), drop=("action", "state"))
    assert check_compatible(lpath, vpath, ["img"]) == {}
    with pytest.raises(SchemaError, match=r"has no proprio key 'state'.*allow_missing_proprio=True"):
        check_compatible(lpath, vpath, ["img"], ["state"])
    absent = check_compatible(lpath, vpath, ["img"], ["state"], allow_missing_proprio=True)
    assert absent == {"state": (4,)}
    with pytest.raises(SchemaError, match=r"needs keys \['state'\]"):
        ActionFreeWindows(vpath, SPEC, action_shape=(2,))
    with pytest.raises(ValueError, match=r"absent_keys\['state'\] must be a whole number, got 4.5"):
        ActionFreeWindows(vpath, SPEC, action_shape=(2,), absent_keys={"state": (4.5,)})
    video = ActionFreeWindows(vpath, SPEC, action_shape=(2,), absent_keys=absent)
    batch = MixedWindows(WindowDataset(lpath, SPEC), video, video_ratio=0.5).get_batch(range(6))
    vid = batch["source"] == 1
    assert batch["state"][vid].abs().sum() == 0 and batch["state_is_pad"][vid].all()
    assert batch["state"][~vid].abs().sum() > 0


def test_mismatched_cameras_and_keys_are_named(small_store, tmp_path):
    lpath = small_store[0]
    schema = make_schema()
    small = dataclasses.replace(
        schema, keys={**schema.keys, "img": dataclasses.replace(schema.keys["img"], shape=(16, 16, 3))}
    )
    vpath = tmp_path / "small_img.zarr"
    with DemoStore.create(vpath, small) as s:
        rng = np.random.default_rng(0)
        s.append_episode(
            {
                "img": rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
                "state": np.zeros((8, 4)),
                "action": np.zeros((8, 2)),
            }
        )
    with pytest.raises(
        SchemaError,
        match=r"small_img.zarr: camera 'img' is \(16, 16, 3\) but .*small.zarr's is \(24, 32, 3\)",
    ):
        check_compatible(lpath, vpath, ["img"])
    with pytest.raises(
        SchemaError, match=r"small_img.zarr: has no camera 'wrist' \(its cameras: \['img'\]\)"
    ):
        check_compatible(vpath, vpath, ["wrist"])
    labelled = WindowDataset(lpath, SPEC)
    # one line naming both stores and the key
    with pytest.raises(
        SchemaError,
        match=r"small_img.zarr mixed with .*small.zarr: key 'img': labelled windows are \(2, 3, 24, 32\)",
    ):
        MixedWindows(labelled, ActionFreeWindows(vpath, SPEC), video_ratio=0.5)
    no_state = WindowSpec.history_horizon(["img"], ["action"], n_obs=2, horizon=6, n_action_exec=3)
    with pytest.raises(
        SchemaError,
        match=r"small.zarr mixed with .*small.zarr: .*only labelled \['state', 'state_is_pad'\], only video",
    ):
        MixedWindows(labelled, ActionFreeWindows(lpath, no_state), video_ratio=0.5)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"video_ratio must be in \[0, 1\)"):
            MixedWindows(labelled, labelled, video_ratio=bad)


def test_feature_caches_of_an_action_free_store_mix(small_store, video_store, tmp_path):
    (lpath, _), (vpath, _) = small_store, video_store
    with pytest.warns(UserWarning, match="RANDOM weights"):  # frozen, meaningless features: fine here
        enc = build_encoder(EncoderConfig(name="resnet18", resnet_layer=1, allow_random=True))
    lcache = build_feature_cache(lpath, enc, "img", tmp_path / "cache")
    vcache = build_feature_cache(vpath, enc, "img", tmp_path / "cache")
    assert check_compatible(lcache, vcache, ["img"], ["state"]) == {}
    with pytest.raises(SchemaError, match=r"has no camera 'wrist' \(its cameras: \['img'\]\)"):
        check_compatible(lcache, vcache, ["wrist"])
    mixed = MixedWindows(
        WindowDataset(lcache, SPEC), ActionFreeWindows(vcache, SPEC, action_shape=(2,)), video_ratio=0.5
    )
    batch = mixed.get_batch(range(8))
    assert batch["img"].shape == (8, 2, 6 * 8, 64) and batch["img"].dtype == torch.float32
    assert torch.equal(batch["has_action"], batch["source"] == 0)
    assert torch.isfinite(batch["img"]).all() and batch["action"][4:].abs().sum() == 0


def test_a_video_store_at_another_frame_rate_is_refused(small_store, tmp_path):
    """Windows are offsets in steps: at 30 fps against 10, the future frames a model predicts 0.2 s ahead
    in one store are 0.07 s ahead in the other. check_compatible compared the cameras only."""
    vpath, _ = write_store(
        tmp_path / "fast.zarr", range(100, 103), dataclasses.replace(make_schema(), fps=30), drop=("action",)
    )
    with pytest.raises(SchemaError, match=r"fast.zarr: recorded at 30 fps but .*small.zarr at 10 fps"):
        check_compatible(small_store[0], vpath, ["img"], ["state"])


@pytest.mark.parametrize(
    "change, said",
    [
        ({"units": "mm"}, r"key 'state': .*small.zarr is in 'm', .*other.zarr in 'mm'"),
        ({"names": ("x", "y", "z", "g")}, None),  # the labelled store names none: nothing to compare
    ],
)
def test_a_video_store_whose_proprio_means_something_else_is_refused(small_store, tmp_path, change, said):
    """check_compatible compared shapes and dtypes only: a video store's proprio in millimetres was
    normalized with statistics fitted in metres (merge_stores refused the same pair)."""
    schema = make_schema()
    state = dataclasses.replace(schema.keys["state"], **change)
    schema = dataclasses.replace(schema, keys={**schema.keys, "state": state})
    vpath, _ = write_store(tmp_path / "other.zarr", range(100, 103), schema, drop=("action",))
    if said is None:
        assert check_compatible(small_store[0], vpath, ["img"], ["state"]) == {}
        return
    with pytest.raises(SchemaError, match=said):
        check_compatible(small_store[0], vpath, ["img"], ["state"])


def test_a_video_store_without_windows_says_why(small_store, tmp_path):
    """'the video dataset has no windows' named neither the store nor why; the labelled store's
    explanation (episode lengths against the window) is given for both, for the windows the model asked
    for (the video store lacks the action, whose offsets make the window this long)."""
    vpath, _ = write_store(tmp_path / "short.zarr", range(100, 103), drop=("action",))
    long_spec = WindowSpec.history_horizon(["img", "state"], ["action"], n_obs=2, horizon=16, n_action_exec=2)
    video = ActionFreeWindows(vpath, long_spec, action_shape=(2,))
    assert len(video) == 0
    labelled = WindowDataset(small_store[0], SPEC)
    with pytest.raises(
        ValueError,
        match=r"video_ratio is 0.5 but the video dataset has no windows: .*short.zarr: 3 episode\(s\) of "
        r"7..9 steps; a window spans 16 steps \(at most 1 padded before, at most 1 padded after\), so an "
        r"episode needs at least 14",
    ):
        MixedWindows(labelled, video, video_ratio=0.5)
    with pytest.raises(ValueError, match=r"the labelled dataset has no windows: .*short.zarr: 3 episode"):
        MixedWindows(WindowDataset(vpath, WindowSpec({"img": (0, 20)}, max_pad_after=0)), labelled, 0.5)
