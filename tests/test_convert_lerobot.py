"""LeRobot v3.0 <-> DemoStore conversion, checked against datasets written and read by lerobot itself."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lerobot")
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

from wm.data import DemoStore, KeySpec, NotAStoreError, Schema, StoreError  # noqa: E402
from wm.data.convert import lerobot as lerobot_convert  # noqa: E402
from wm.data.convert.lerobot import is_lerobot_dataset, lerobot_to_store, store_to_lerobot  # noqa: E402

FPS = 10
H, W = 32, 48
LENGTHS = (5, 8, 3)
TASKS = ("pick the cube", "place the cube", "pick the cube")
STATE_NAMES = ["x", "y", "z", "gripper"]


def _random_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A colour gradient with a random offset and slope, which a video codec keeps nearly intact."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    off = rng.uniform(0, 100, 3)
    chans = [off[0] + a * xx, off[1] + b * yy, off[2] + c * (xx + yy) / 2]
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)


def _make_lerobot(root, cameras, video: bool, image_fn) -> list[dict[str, np.ndarray]]:
    """A LeRobot dataset written by lerobot; returns each episode's original arrays."""
    features = {
        f"observation.images.{c}": {
            "dtype": "video" if video else "image",
            "shape": (H, W, 3),
            "names": ["height", "width", "channels"],
        }
        for c in cameras
    }
    features["observation.state"] = {"dtype": "float32", "shape": (4,), "names": STATE_NAMES}
    features["action"] = {"dtype": "float32", "shape": (2,), "names": None}
    ds = LeRobotDataset.create("local/src", FPS, features, root=root, use_videos=video, robot_type="toy_arm")
    rng = np.random.default_rng(0)
    episodes = []
    for length, task in zip(LENGTHS, TASKS, strict=True):
        ep = {c: np.stack([image_fn(rng) for _ in range(length)]) for c in cameras}
        ep["state"] = rng.normal(size=(length, 4)).astype(np.float32)
        ep["action"] = rng.normal(size=(length, 2)).astype(np.float32)
        for t in range(length):
            frame = {f"observation.images.{c}": ep[c][t] for c in cameras}
            frame.update({"observation.state": ep["state"][t], "action": ep["action"][t], "task": task})
            ds.add_frame(frame)
        ds.save_episode()
        episodes.append(ep)
    ds.finalize()
    return episodes


def _lerobot_frames(root, cameras) -> dict[str, np.ndarray]:
    """Every frame of a dataset read through lerobot's own LeRobotDataset, images as HWC uint8."""
    ds = LeRobotDataset("local/check", root=root, video_backend="pyav")
    items = [ds[i] for i in range(len(ds))]
    out = {
        k: np.stack([it[k].numpy() for it in items])
        for k in ("observation.state", "action", "timestamp", "episode_index", "frame_index")
    }
    for c in cameras:
        imgs = np.stack([it[f"observation.images.{c}"].numpy() for it in items])
        out[c] = np.round(imgs.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    out["task"] = np.array([it["task"] for it in items])
    out["fps"], out["robot_type"] = ds.fps, ds.meta.robot_type
    return out


def _check_store(store: DemoStore, episodes, cameras, exact: bool) -> float:
    """Check a converted store against the original episodes; returns the worst image mean-abs-error."""
    assert store.n_episodes == len(LENGTHS)
    assert list(store.episode_lengths()) == list(LENGTHS)
    assert store.schema.fps == FPS and store.schema.robot == "toy_arm"
    assert set(store.keys) == {*cameras, "state", "action", "timestamp"}
    kinds = {k: s.kind for k, s in store.schema.keys.items()}
    assert kinds == {
        **dict.fromkeys(cameras, "image"),
        "state": "proprio",
        "action": "action",
        "timestamp": "timestamp",
    }
    assert store.schema.keys["state"].names == tuple(STATE_NAMES)
    worst = 0.0
    for i, (orig, task) in enumerate(zip(episodes, TASKS, strict=True)):
        got = store.get_episode(i)
        assert store.episode_info(i)["task"] == task
        np.testing.assert_array_equal(got["state"], orig["state"])
        np.testing.assert_array_equal(got["action"], orig["action"])
        expected_ts = (np.arange(LENGTHS[i]) / FPS).astype(np.float32)[:, None]
        np.testing.assert_array_equal(got["timestamp"], expected_ts)
        for c in cameras:
            assert got[c].shape == orig[c].shape and got[c].dtype == np.uint8
            if exact:
                np.testing.assert_array_equal(got[c], orig[c])
            worst = max(worst, float(np.abs(got[c].astype(float) - orig[c]).mean()))
    return worst


def test_is_lerobot_dataset(tmp_path):
    assert not is_lerobot_dataset(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    assert is_lerobot_dataset(tmp_path)
    assert not is_lerobot_dataset(tmp_path / "nope")


def test_image_round_trip_is_exact(tmp_path):
    cams = ("front", "wrist")
    episodes = _make_lerobot(tmp_path / "src", cams, video=False, image_fn=_random_image)
    store = lerobot_to_store(tmp_path / "src", tmp_path / "demo.zarr")
    _check_store(store, episodes, cams, exact=True)
    assert store.schema.task == ""  # two different tasks

    out = store_to_lerobot(store, tmp_path / "back")
    store.close()
    src, back = _lerobot_frames(tmp_path / "src", cams), _lerobot_frames(out, cams)
    for key, value in src.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    info_src = json.loads((tmp_path / "src/meta/info.json").read_text())
    info_back = json.loads((out / "meta/info.json").read_text())
    assert info_back["features"] == info_src["features"]
    assert (info_back["fps"], info_back["robot_type"], info_back["total_episodes"]) == (FPS, "toy_arm", 3)

    again = lerobot_to_store(out, tmp_path / "again.zarr")
    _check_store(again, episodes, cams, exact=True)
    again.close()


@pytest.mark.filterwarnings("ignore:The video decoding and encoding capabilities of torchvision")
def test_video_round_trip_is_close(tmp_path, monkeypatch):
    monkeypatch.setattr(lerobot_convert, "WRITE_STEPS", 3)  # episodes are read in several blocks
    cams = ("front",)
    episodes = _make_lerobot(tmp_path / "src", cams, video=True, image_fn=_smooth_image)
    store = lerobot_to_store(tmp_path / "src", tmp_path / "demo.zarr")
    assert _check_store(store, episodes, cams, exact=False) < 3.0
    # the frames are the ones lerobot's own pyav decoding picks for each timestamp
    ref = _lerobot_frames(tmp_path / "src", cams)
    mine = np.concatenate([store.get_episode(i)["front"] for i in range(store.n_episodes)])
    assert np.abs(mine.astype(float) - ref["front"]).mean() < 1.0

    out = store_to_lerobot(tmp_path / "demo.zarr", tmp_path / "back", use_videos=True)
    store.close()
    back = _lerobot_frames(out, cams)
    np.testing.assert_array_equal(back["timestamp"], ref["timestamp"])
    np.testing.assert_array_equal(back["episode_index"], ref["episode_index"])
    np.testing.assert_array_equal(back["task"], ref["task"])
    again = lerobot_to_store(out, tmp_path / "again.zarr")
    assert _check_store(again, episodes, cams, exact=False) < 4.0
    again.close()


def test_store_keys_map_to_lerobot_features(small_store, tmp_path):
    path, episodes = small_store
    out = store_to_lerobot(path, tmp_path / "lr", repo_id="local/small")
    feats = json.loads((out / "meta/info.json").read_text())["features"]
    assert feats["observation.images.img"]["dtype"] == "image"
    assert feats["observation.images.img"]["shape"] == [24, 32, 3]
    assert feats["observation.state"]["shape"] == [4] and feats["action"]["shape"] == [2]
    frames = _lerobot_frames(out, ("img",))
    assert set(frames["task"]) == {"test_task"} and frames["robot_type"] == "test_bot"
    np.testing.assert_array_equal(frames["img"], np.concatenate([e["img"] for e in episodes]))
    np.testing.assert_array_equal(frames["action"], np.concatenate([e["action"] for e in episodes]))
    grid = np.concatenate([np.arange(len(e["action"])) / 10 for e in episodes]).astype(np.float32)
    np.testing.assert_array_equal(frames["timestamp"], grid)
    with pytest.raises(FileExistsError, match="already exists"):
        store_to_lerobot(path, out)


def test_image_mode_keeps_off_grid_timestamps(tmp_path):
    schema = Schema(
        keys={
            "action": KeySpec((2,), "float32", "action"),
            "timestamp": KeySpec((1,), "float32", "timestamp"),
        },
        fps=10,
    )
    ts = np.array([[0.0], [0.098], [0.203], [0.31]], dtype=np.float32)
    with DemoStore.create(tmp_path / "s.zarr", schema) as s:
        s.append_episode({"action": np.zeros((4, 2), np.float32), "timestamp": ts}, {"task": "wave"})
        out = store_to_lerobot(s, tmp_path / "lr")
    back = lerobot_to_store(out, tmp_path / "back.zarr")
    np.testing.assert_array_equal(back.get_episode(0)["timestamp"], ts)
    assert back.episode_info(0)["task"] == "wave" and back.schema.task == "wave"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store_to_lerobot(tmp_path / "s.zarr", tmp_path / "lr", overwrite=True, use_videos=True)
    assert not caught  # within half a frame of the grid: no warning, the grid is used


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no meta/info.json"),
        ("{not json", "malformed LeRobot info.json"),
        ('{"fps": 10}', "lacks 'features'"),
        ('{"fps": 10, "features": {}, "codebase_version": "v2.1"}', "version v2.1 is not supported"),
    ],
)
def test_bad_dataset_gives_one_clear_error(tmp_path, content, match):
    root = tmp_path / "broken"
    (root / "meta").mkdir(parents=True)
    if content is not None:
        (root / "meta" / "info.json").write_text(content)
    with pytest.raises(NotAStoreError, match=match) as err:
        lerobot_to_store(root, tmp_path / "out.zarr")
    assert str(root) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.zarr").exists()


def test_missing_data_files_is_a_store_error(tmp_path):
    _make_lerobot(tmp_path / "src", ("front",), video=False, image_fn=_random_image)
    for f in (tmp_path / "src" / "data").rglob("*.parquet"):
        f.unlink()
    with pytest.raises(StoreError, match="data") as err:
        lerobot_to_store(tmp_path / "src", tmp_path / "out.zarr")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.zarr").exists()


def test_scalar_and_one_dim_keys_round_trip(tmp_path):
    """Per-step scalars (e.g. wm-collect's loop_dt) and 1-d actions: LeRobot 0.4.4 stores (1,)
    features as scalar columns, which its save_episode cannot take as (1,) arrays."""
    schema = Schema(
        keys={
            "image": KeySpec((8, 8, 3), "uint8", "image"),
            "action": KeySpec((1,), "float32", "action"),
            "loop_dt": KeySpec((), "float32", "lowdim"),
        },
        fps=10,
    )
    store = DemoStore.create(tmp_path / "s.zarr", schema)
    for e in range(2):
        store.append_episode(
            {
                "image": np.full((5, 8, 8, 3), e, np.uint8),
                "action": np.arange(5.0, dtype=np.float32)[:, None] + e,
                "loop_dt": np.full(5, 0.1, np.float32),
            }
        )
    store_to_lerobot(store, tmp_path / "lr")
    back = lerobot_to_store(tmp_path / "lr", tmp_path / "back.zarr")
    np.testing.assert_array_equal(back.get_episode(1)["action"], store.get_episode(1)["action"])
    np.testing.assert_allclose(back.get_episode(0)["loop_dt"].ravel(), 0.1, rtol=1e-6)
