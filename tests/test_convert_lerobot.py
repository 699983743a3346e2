"""LeRobot v3.0 <-> DemoStore conversion, checked against datasets written and read by lerobot itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lerobot")
from apps import run_app  # noqa: E402
from conftest import can_raise_priority, scheduling  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

from wm.data import (  # noqa: E402
    ActionSpace,
    AppendError,
    CorruptStoreError,
    DemoStore,
    KeySpec,
    NotAStoreError,
    Schema,
    SchemaError,
    StoreError,
)
from wm.data.convert import lerobot as lerobot_convert  # noqa: E402
from wm.data.convert import lerobot_meta  # noqa: E402
from wm.data.convert.lerobot import is_lerobot_dataset, lerobot_to_store, store_to_lerobot  # noqa: E402
from wm.sched import normal_priority  # noqa: E402

FPS = 10
H, W = 32, 48
LENGTHS = (5, 8, 3)
TASKS = ("pick the cube", "place the cube", "pick the cube")
STATE_NAMES = ["x", "y", "z", "gripper"]
VIDEO_WARNINGS = [
    "image key 'wrist' (8, 12, 1) is stored as PNG images: LeRobot's AV1 video takes RGB frames of even "
    "sizes, at least 32 px wide and 8 px high (an odd width came back with its last column off by up to "
    "half the range)",
    "video mode stores camera frames lossily (AV1); use video=false for exact frames",
]
NOT_UINT8 = "LeRobot images are uint8: not exported"


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
    rng = np.random.default_rng(0)
    episodes = []
    with normal_priority():  # lerobot's AV1 encoder would leave this process at real-time priority
        ds = LeRobotDataset.create(
            "local/src", FPS, features, root=root, use_videos=video, robot_type="toy_arm"
        )
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


def _lerobot_frames_lowdim(root) -> dict[str, np.ndarray]:
    """Every non-image feature of every frame, read through lerobot's LeRobotDataset."""
    ds = LeRobotDataset("local/check", root=root, video_backend="pyav")
    items = [ds[i] for i in range(len(ds))]
    keys = [k for k, v in items[0].items() if hasattr(v, "numpy") and v.ndim < 3]
    return {k: np.stack([it[k].numpy() for it in items]) for k in keys}


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


@pytest.mark.filterwarnings("ignore:The video decoding and encoding capabilities of torchvision")
def test_video_rows_that_share_a_timestamp_get_the_frame_lerobot_gives_them(tmp_path):
    """Rows of an episode with the same timestamp all get the video frame at that time, as in LeRobot."""
    times = ([0.0, 0.1, 0.1, 0.3, 0.4], [0.0, 0.0, 0.2, 0.3, 0.3])  # repeats inside, first and last
    features = {
        "observation.images.front": {
            "dtype": "video",
            "shape": (H, W, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (4,), "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    rng = np.random.default_rng(0)
    with normal_priority():
        ds = LeRobotDataset.create("local/src", FPS, features, root=tmp_path / "src", use_videos=True)
        for ts in times:
            for t in range(len(ts)):
                state = np.full(4, t, np.float32)
                ds.add_frame(
                    {
                        "observation.images.front": _smooth_image(rng),
                        "observation.state": state,
                        "action": state[:2],
                        "task": "t",
                    }
                )
            ds.episode_buffer["timestamp"] = ts  # add_frame puts every frame on the 1/fps grid
            ds.save_episode()
        ds.finalize()

    ref = _lerobot_frames(tmp_path / "src", ("front",))
    with lerobot_to_store(tmp_path / "src", tmp_path / "demo.zarr") as store:
        got = [store.get_episode(i) for i in range(store.n_episodes)]
    np.testing.assert_array_equal(np.concatenate([g["timestamp"][:, 0] for g in got]), ref["timestamp"])
    front = np.concatenate([g["front"] for g in got])  # (T, H, W, C), both episodes
    np.testing.assert_array_equal(front, ref["front"])  # the frame LeRobot gives each row
    np.testing.assert_array_equal(front[2], front[1])  # one decoded frame for both rows at 0.1 s
    np.testing.assert_array_equal(front[6], front[5])
    np.testing.assert_array_equal(front[9], front[8])
    assert np.abs(front[3].astype(float) - front[1]).mean() > 10  # ... and the frames do differ


def test_an_environment_state_is_not_taken_for_proprioception(tmp_path):
    """observation.environment_state (the objects' state: PushT's keypoints) became a proprio key,
    which wm-train could take as the robot's proprioception; it is low-dim state, as robomimic's
    `object` is."""
    features = {
        "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
        "observation.environment_state": {"dtype": "float32", "shape": (4,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    ds = LeRobotDataset.create("local/env", FPS, features, root=tmp_path / "src", use_videos=False)
    for t in range(3):
        state, objects = np.full(2, t, np.float32), np.full(4, t, np.float32)
        ds.add_frame({"observation.state": state, "observation.environment_state": objects,
                      "action": np.zeros(2, np.float32), "task": "push"})  # fmt: skip
    ds.save_episode()
    ds.finalize()
    with lerobot_to_store(tmp_path / "src", tmp_path / "s.zarr") as store:
        kinds = {k: spec.kind for k, spec in store.schema.keys.items()}
    assert kinds["state"] == "proprio" and kinds["environment_state"] == "lowdim"


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


def test_image_mode_keeps_off_grid_timestamps(tmp_path, caplog):
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
    assert "wm_stack.timestamp" not in json.loads((out / "meta/info.json").read_text())["features"]
    back = lerobot_to_store(out, tmp_path / "back.zarr")
    np.testing.assert_array_equal(back.get_episode(0)["timestamp"], ts)
    assert back.episode_info(0)["task"] == "wave" and back.schema == schema  # task "" as exported
    # video mode puts LeRobot's timestamp on the 1/fps grid; the store's own values ride along
    store_to_lerobot(tmp_path / "s.zarr", tmp_path / "lr", overwrite=True, use_videos=True)
    assert not caplog.records  # nothing lost, nothing to warn about
    lr = _lerobot_frames_lowdim(tmp_path / "lr")
    np.testing.assert_array_equal(lr["timestamp"], (np.arange(4) / 10).astype(np.float32))
    np.testing.assert_array_equal(lr["wm_stack.timestamp"], ts[:, 0])
    again = lerobot_to_store(tmp_path / "lr", tmp_path / "again.zarr")
    np.testing.assert_array_equal(again.get_episode(0)["timestamp"], ts)


def test_export_overwrite_replaces_only_a_lerobot_dataset(tmp_path, small_store):
    """`store_to_lerobot(overwrite=True)` deleted whatever was at the path: a user's folder, or the
    very store being exported."""
    path, _ = small_store
    mine = tmp_path / "my_experiments"
    mine.mkdir()
    (mine / "results.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="neither empty nor a LeRobot dataset"):
        store_to_lerobot(path, mine, overwrite=True)
    for dst in (path, tmp_path):  # the store itself, or a folder holding it
        with pytest.raises(ValueError, match="is or holds the source"):
            store_to_lerobot(path, dst, overwrite=True)
    assert (mine / "results.csv").read_text() == "keep me" and DemoStore.open(path).n_episodes == 5
    out = store_to_lerobot(path, tmp_path / "lr")
    assert store_to_lerobot(path, out, overwrite=True) == out  # a LeRobot dataset: replaced


def test_a_store_without_episodes_is_not_exported(tmp_path):
    """It was written as a dataset of nothing but meta/info.json, which neither LeRobot nor the way back
    could load."""
    path = tmp_path / "empty.zarr"
    DemoStore.create(path, Schema(keys={"action": KeySpec((2,), "float32", "action")}, fps=10)).close()
    with pytest.raises(SchemaError, match="empty.zarr: has no episodes; there is nothing to export"):
        store_to_lerobot(path, tmp_path / "lr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.zarr"]


def test_an_empty_episode_is_refused_naming_it_and_the_rewrite_that_removes_it(tmp_path):
    """A Diffusion Policy store whose episode_ends repeat a value holds an episode of no steps: its export
    failed with LeRobot's own line (`You must add one or several frames with add_frame ...`), which named
    neither the store nor the episode."""
    import zarr

    path = tmp_path / "dp.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("data/action", data=np.arange(10, dtype=np.float32).reshape(5, 2))
    root.create_array("meta/episode_ends", data=np.array([3, 3, 5], dtype=np.int64))
    with pytest.raises(SchemaError) as err:
        store_to_lerobot(path, tmp_path / "lr")
    assert str(err.value) == (
        f"{path}: episode(s) [1] have no steps, which a LeRobot dataset cannot hold; remove them first: "
        f"wm-info store={path} 'drop_episodes=[1]'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.zarr"]


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
    assert back.schema == store.schema  # loop_dt is () again, not LeRobot's (1,)
    assert back.episode_info(0) == store.episode_info(0) == {"length": 5}  # empty info stays empty
    for i in range(2):
        for key, value in store.get_episode(i).items():
            got = back.get_episode(i)[key]
            assert got.shape == value.shape and got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)


# ---------------------------------------------------------------------- store -> LeRobot -> store
def _rich_store(path: Path) -> DemoStore:
    """Everything LeRobot's own metadata cannot say: a delta / ee action space with units, names,
    scalar, bool and float16 keys, float64 proprioception and monotonic float64 timestamps, episode info."""
    schema = Schema(
        keys={
            "front": KeySpec((16, 32, 3), "uint8", "image"),
            "wrist": KeySpec((8, 12, 1), "uint8", "image"),
            "qpos": KeySpec((3,), "float64", "proprio", units="rad", names=("j0", "j1", "j2")),
            "action": KeySpec((2,), "float32", "action", units="m"),
            "loop_dt": KeySpec((), "float32", "lowdim", units="s"),
            "contact": KeySpec((), "bool", "lowdim"),
            "force": KeySpec((2,), "float16", "lowdim"),  # exported as float32 (LeRobot's stats fail on it)
            "timestamp": KeySpec((), "float64", "timestamp", units="s"),
        },
        fps=15,
        action_space=ActionSpace(mode="delta", frame="ee", units="m", description="end-effector step"),
        robot="panda",
        task="lift",
    )
    rng = np.random.default_rng(0)
    store = DemoStore.create(path, schema)
    for e, n in enumerate((4, 6, 5)):
        store.append_episode(
            {
                "front": rng.integers(0, 256, (n, 16, 32, 3), dtype=np.uint8),
                "wrist": rng.integers(0, 256, (n, 8, 12, 1), dtype=np.uint8),
                "qpos": rng.normal(size=(n, 3)),
                "action": rng.normal(size=(n, 2)).astype(np.float32),
                "loop_dt": rng.uniform(0.05, 0.08, n).astype(np.float32),
                "contact": rng.uniform(size=n) > 0.5,
                "force": rng.normal(size=(n, 2)).astype(np.float16),
                "timestamp": 81234.56789 + 3 * e + np.cumsum(rng.uniform(0.06, 0.07, n)),
            },
            {"success": e != 1, "notes": f"take {e}", "operator": {"name": "ada", "hand": "left"}},
        )
    return store


def _assert_same_store(a: DemoStore, b: DemoStore, exact_images: bool = True) -> None:
    assert b.schema == a.schema
    assert b.n_episodes == a.n_episodes
    for i in range(a.n_episodes):
        assert b.episode_info(i) == a.episode_info(i)
        want, got = a.get_episode(i), b.get_episode(i)
        for key, value in want.items():
            assert (got[key].shape, got[key].dtype) == (value.shape, value.dtype), key
            if exact_images or a.schema.keys[key].kind != "image":
                np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_names_given_per_axis_as_older_lerobot_datasets_do_are_kept(tmp_path):
    """`names: {"motors": [...]}` (LeRobot's older form, in many hub datasets) was dropped."""
    motors = ["shoulder", "elbow", "wrist"]
    features = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": {"motors": motors}},
        "action": {"dtype": "float32", "shape": (3,), "names": {"motors": motors}},
    }
    ds = LeRobotDataset.create("local/src", FPS, features, root=tmp_path / "src", use_videos=False)
    for _ in range(3):
        ds.add_frame(
            {"observation.state": np.zeros(3, np.float32), "action": np.ones(3, np.float32), "task": "t"}
        )
    ds.save_episode()
    ds.finalize()
    with lerobot_to_store(tmp_path / "src", tmp_path / "s.zarr") as store:
        assert store.schema.keys["state"].names == store.schema.keys["action"].names == tuple(motors)


def test_an_episode_whose_frames_have_several_tasks_keeps_which_frame_had_which(tmp_path):
    """LeRobot -> store -> LeRobot gave every frame of an episode its first task (the store kept only
    the episode's task names)."""
    features = {"action": {"dtype": "float32", "shape": (2,), "names": None}}
    ds = LeRobotDataset.create("local/src", FPS, features, root=tmp_path / "src", use_videos=False)
    tasks = [["reach", "reach", "grasp", "grasp", "reach"], ["grasp"] * 3]
    for names in tasks:
        for t, name in enumerate(names):
            ds.add_frame({"action": np.full(2, t, np.float32), "task": name})
        ds.save_episode()
    ds.finalize()
    with lerobot_to_store(tmp_path / "src", tmp_path / "s.zarr") as store:
        info = store.episode_info(0)
        assert info["task"] == "reach" and info["tasks"] == ["reach", "grasp"]
        assert info["task_spans"] == [["reach", 2], ["grasp", 2], ["reach", 1]]
        assert "task_spans" not in store.episode_info(1)  # one task: the episode's
        back = store_to_lerobot(store, tmp_path / "back")
    read = LeRobotDataset("local/check", root=back, video_backend="pyav")
    assert [read[i]["task"] for i in range(len(read))] == tasks[0] + tasks[1]


def test_round_trip_keeps_schema_episode_info_dtypes_and_data(tmp_path, caplog, monkeypatch):
    store = _rich_store(tmp_path / "rich.zarr")
    monkeypatch.setattr(lerobot_convert, "WRITE_STEPS", 4)  # episodes of 4..6 steps read in parts
    read, rows = DemoStore.read, []
    monkeypatch.setattr(
        DemoStore, "read", lambda s, k, sel, episode=None: rows.append((k, sel)) or read(s, k, sel, episode)
    )
    out = store_to_lerobot(store, tmp_path / "lr")
    monkeypatch.undo()
    assert (
        max(sel.stop - sel.start for k, sel in rows if k == "front") == 4
    )  # a whole episode took its memory
    assert not caplog.records  # everything is carried
    info = json.loads((out / "meta/info.json").read_text())
    assert set(info["features"]) == {
        "observation.images.front",
        "observation.images.wrist",
        "observation.state",
        "action",
        "loop_dt",
        "contact",
        "force",
        "wm_stack.timestamp",  # float64 clock readings: LeRobot's float32 timestamp cannot hold them
        *("timestamp", "frame_index", "episode_index", "index", "task_index"),
    }
    assert info["features"]["observation.state"]["names"] == ["j0", "j1", "j2"]
    assert info["wm_stack"]["features"]["qpos"] == "observation.state"
    assert info["wm_stack"]["schema"]["action_space"]["frame"] == "ee"

    # LeRobot itself loads the export, offline: relative timestamps, the carried episode info
    lr = _lerobot_frames_lowdim(out)
    starts = np.repeat([0, 4, 10], [4, 6, 5])
    ts = np.concatenate([store.get_episode(i)["timestamp"] for i in range(3)])
    np.testing.assert_allclose(lr["timestamp"], ts - ts[starts], atol=1e-5)
    np.testing.assert_array_equal(
        lr["observation.state"],
        np.concatenate([store.get_episode(i)["qpos"] for i in range(3)]).astype(np.float32),
    )
    episodes = LeRobotDataset("local/check", root=out).meta.episodes
    assert [json.loads(x)["success"] for x in episodes["wm_stack/info"]] == [True, False, True]

    back = lerobot_to_store(out, tmp_path / "back.zarr")
    _assert_same_store(store, back)


@pytest.mark.filterwarnings("ignore:The video decoding and encoding capabilities of torchvision")
def test_video_round_trip_keeps_everything_but_exact_pixels(tmp_path, caplog):
    store = _rich_store(tmp_path / "rich.zarr")
    out = store_to_lerobot(store, tmp_path / "lr", use_videos=True)
    assert [r.getMessage() for r in caplog.records] == [f"warning: {store.path}: {w}" for w in VIDEO_WARNINGS]
    feats = json.loads((out / "meta/info.json").read_text())["features"]
    assert feats["observation.images.front"]["dtype"] == "video"
    assert feats["observation.images.wrist"]["dtype"] == "image"  # gray and 12 px wide: PNG
    assert len(_lerobot_frames_lowdim(out)["index"]) == 15  # LeRobot loads the mixed dataset
    _assert_same_store(store, lerobot_to_store(out, tmp_path / "back.zarr"), exact_images=False)


def test_a_key_of_several_dimensions_is_exported_flat_and_comes_back_in_its_shape(tmp_path):
    """LeRobot 0.4.4's statistics of a (3, 2) feature were (2,)-shaped, and (3, 2) for an episode of one
    step, which then failed to merge (`cannot mix list and non-list, non-null values`, no key named)."""
    schema = Schema(keys={"keypoints": KeySpec((3, 2), "float32", "lowdim"),
                          "action": KeySpec((2,), "float32", "action")}, fps=10)  # fmt: skip
    rng = np.random.default_rng(0)
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        for n in (4, 1):
            store.append_episode({"keypoints": rng.normal(size=(n, 3, 2)).astype(np.float32),
                                  "action": rng.normal(size=(n, 2)).astype(np.float32)})  # fmt: skip
        out = store_to_lerobot(store, tmp_path / "lr")
        feature = json.loads((out / "meta/info.json").read_text())["features"]["keypoints"]
        assert feature["shape"] == [6]
        assert len(_lerobot_frames_lowdim(out)["index"]) == 5  # LeRobot loads it
        _assert_same_store(store, lerobot_to_store(out, tmp_path / "back.zarr"))


def test_uint64_values_lerobot_cannot_take_are_refused_in_one_line(tmp_path):
    """They were an OverflowError traceback from LeRobot's writer (which goes through int64)."""
    keys = {"ns": KeySpec((), "uint64", "lowdim"), "action": KeySpec((2,), "float32", "action")}
    schema = Schema(keys=keys, fps=10)
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        store.append_episode({"ns": np.array([1, 2], np.uint64), "action": np.zeros((2, 2), np.float32)})
        store.append_episode({"ns": np.array([1, 2**63], np.uint64), "action": np.zeros((2, 2), np.float32)})
        with pytest.raises(SchemaError) as err:
            store_to_lerobot(store, tmp_path / "lr")
    assert str(err.value) == (
        f"{store.path}: key 'ns' holds uint64 values of 2**63 or more (episode 1), which LeRobot's writer "
        "cannot take (it goes through int64)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


@pytest.mark.filterwarnings("ignore:The video decoding and encoding capabilities of torchvision")
def test_video_export_takes_an_episode_of_one_step(tmp_path):
    """LeRobot 0.4.4's streaming encoder gives a one-frame episode no stats, and its metadata write
    failed (ArrowInvalid: stats/observation.images.cam/min expected length 2 but got length 1)."""
    schema = Schema(keys={"cam": KeySpec((16, 32, 3), "uint8", "image"),
                          "action": KeySpec((2,), "float32", "action")}, fps=10)  # fmt: skip
    store = DemoStore.create(tmp_path / "s.zarr", schema)
    for n in (3, 1):
        store.append_episode({"cam": np.full((n, 16, 32, 3), 100, np.uint8),
                              "action": np.arange(2 * n, dtype=np.float32).reshape(n, 2)})  # fmt: skip
    out = store_to_lerobot(store, tmp_path / "lr", use_videos=True)
    stats = json.loads((out / "meta/stats.json").read_text())
    assert "observation.images.cam" in stats  # the camera's stats, for LeRobot's normalization
    back = lerobot_to_store(out, tmp_path / "back.zarr")
    assert list(back.episode_lengths()) == [3, 1]
    for e in range(2):
        np.testing.assert_array_equal(back.get_episode(e)["action"], store.get_episode(e)["action"])
        assert np.abs(back.get_episode(e)["cam"].astype(int) - 100).max() <= 3


def _realtime_threads(seen: set, stop: threading.Event) -> None:
    """Add to `seen` every thread of this process found under a real-time policy, sampling until `stop`."""
    while not stop.is_set():
        for stat in Path("/proc/self/task").glob("*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            if fields[38] != "0":  # policy (proc(5) field 41): 0 is SCHED_OTHER
                seen.add((stat.parent.name, int(fields[38]), int(fields[37])))
        time.sleep(0.001)


@pytest.mark.skipif(not can_raise_priority(), reason="this process cannot raise a thread to real-time policy")
@pytest.mark.filterwarnings("ignore:The video decoding and encoding capabilities of torchvision")
@pytest.mark.parametrize("lengths", [(12, 9), (12, 1)], ids=["streaming", "one-step episode"])
def test_a_video_export_runs_no_thread_at_real_time_priority(tmp_path, lengths):
    """LeRobot's AV1 encoder (SVT-AV1) switches its threads to SCHED_FIFO 99 when it may (root): dozens of
    encoder threads above the robot's control loop, and, where the encoder opens on the calling thread
    (no streaming for a one-step episode), that thread and every process it starts stay there."""
    schema = Schema(keys={"cam": KeySpec((32, 48, 3), "uint8", "image"),
                          "action": KeySpec((2,), "float32", "action")}, fps=10)  # fmt: skip
    rng = np.random.default_rng(0)
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        for n in lengths:
            store.append_episode({"cam": np.stack([_smooth_image(rng) for _ in range(n)]),
                                  "action": np.zeros((n, 2), np.float32)})  # fmt: skip
    before, seen, stop = scheduling(), set(), threading.Event()
    sampler = threading.Thread(target=_realtime_threads, args=(seen, stop), daemon=True)
    sampler.start()
    try:
        out = store_to_lerobot(tmp_path / "s.zarr", tmp_path / "lr", use_videos=True)
    finally:
        stop.set()
        sampler.join()
    features = json.loads((out / "meta/info.json").read_text())["features"]
    assert features["observation.images.cam"]["dtype"] == "video"
    assert seen == set()
    assert scheduling() == before


@pytest.mark.parametrize(("fps", "width"), [(7.5, 48), (10.0, 47)])
def test_video_export_keeps_frames_as_png_where_av1_cannot_take_them(tmp_path, caplog, fps, width):
    """A fractional frame rate crashed LeRobot's encoder thread (a traceback after frames were written);
    an odd width came back with its last column off by up to half the range. Both stay PNG: exact."""
    schema = Schema(
        keys={
            "front": KeySpec((32, width, 3), "uint8", "image"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=fps,
    )
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 32, width, 3), dtype=np.uint8)
    with DemoStore.create(tmp_path / "s.zarr", schema) as s:
        s.append_episode({"front": frames, "action": np.zeros((4, 2), np.float32)})
        out = store_to_lerobot(s, tmp_path / "lr", use_videos=True)
    said = [r.getMessage() for r in caplog.records]
    why = "is not a whole number" if width % 2 == 0 else "of even sizes"
    assert any("'front'" in m and "stored as PNG images" in m and why in m for m in said), said
    assert (
        json.loads((out / "meta/info.json").read_text())["features"]["observation.images.front"]["dtype"]
        == "image"
    )
    back = lerobot_to_store(out, tmp_path / "back.zarr")
    np.testing.assert_array_equal(back.get_episode(0)["front"], frames)


def test_keys_lerobot_cannot_hold_are_left_out_with_a_warning(tmp_path, caplog):
    schema = Schema(
        keys={
            "depth": KeySpec((4, 4, 1), "float32", "image"),
            "action": KeySpec((2,), "float32", "action"),
            "pos": KeySpec((2,), "float32", "proprio"),
            "vel": KeySpec((2,), "float32", "proprio"),
        }
    )
    with DemoStore.create(tmp_path / "s.zarr", schema) as s:
        s.append_episode(
            {
                "depth": np.zeros((3, 4, 4, 1), np.float32),
                **{k: np.ones((3, 2), np.float32) for k in ("action", "pos", "vel")},
            }
        )
        store_to_lerobot(s, tmp_path / "lr")
    (record,) = caplog.records
    assert record.getMessage() == f"warning: {tmp_path / 's.zarr'}: image key 'depth' is float32, {NOT_UINT8}"
    feats = json.loads((tmp_path / "lr/meta/info.json").read_text())["features"]
    assert {"observation.pos", "observation.vel", "action"} <= set(feats) and "depth" not in str(feats)
    back = lerobot_to_store(tmp_path / "lr", tmp_path / "back.zarr")
    assert back.keys == ["action", "pos", "vel"] and back.schema.keys["pos"].kind == "proprio"


def test_lerobots_per_frame_success_becomes_the_episodes_success(tmp_path):
    """LeRobot's gym sets (PushT, ...) flag success per frame in `next.success`; wm-info, wm-train's
    success filters and the evaluation reports read an episode's "success" from its info."""
    features = {
        "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }
    ds = LeRobotDataset.create("local/src", FPS, features, root=tmp_path / "lr", use_videos=False)
    flags = ([False, False, True, False], [False] * 3)  # succeeded at the third frame; never
    for episode in flags:
        for flag in episode:
            frame = {"observation.state": np.zeros(2, np.float32), "action": np.zeros(2, np.float32)}
            ds.add_frame({**frame, "next.success": np.array([flag]), "task": "push"})
        lerobot_convert._squeeze_scalar_features(ds, features)  # lerobot 0.4.4 writes (1,) as scalars
        ds.save_episode()
    ds.finalize()
    store = lerobot_to_store(tmp_path / "lr", tmp_path / "s.zarr")
    assert [store.episode_info(i).get("success") for i in range(2)] == [True, False]
    np.testing.assert_array_equal(store.get_episode(0)["next.success"][:, 0], flags[0])  # kept as data


def test_a_key_named_as_lerobots_own_columns_is_refused_by_name(tmp_path):
    schema = Schema(
        keys={"action": KeySpec((2,), "float32", "action"), "task": KeySpec((1,), "int64", "lowdim")}
    )
    with DemoStore.create(tmp_path / "s.zarr", schema) as s:
        s.append_episode({"action": np.zeros((3, 2), np.float32), "task": np.arange(3)[:, None]})
        with pytest.raises(
            SchemaError, match="store key 'task' maps to LeRobot feature 'task', which is already"
        ):
            store_to_lerobot(s, tmp_path / "lr")  # LeRobot's own per-frame task string


def test_carried_schema_has_no_store_format_version(small_store, tmp_path, monkeypatch):
    """The store format's version (2 since episode info left the root attributes) says nothing about a
    LeRobot dataset: exported, code of format 1 refused the carried schema and inferred every key."""
    path, _ = small_store
    out = store_to_lerobot(path, tmp_path / "lr")
    info = json.loads((out / "meta/info.json").read_text())
    assert "format_version" not in info["wm_stack"]["schema"]
    monkeypatch.setattr("wm.data.schema.FORMAT_VERSION", 1)  # code of format 1 reads it as its own
    schema, _ = lerobot_meta.read_carried(out, info)
    assert schema.format_version == 1 and set(schema.keys) == {"img", "state", "action"}


def test_an_export_whose_metadata_lerobots_tools_dropped_is_said(small_store, tmp_path, caplog):
    """lerobot's delete_episodes and merge_datasets rewrite info.json without our metadata: converted
    back, the action space read as absolute and units and key names were gone, without a word."""
    path, _ = small_store
    out = store_to_lerobot(path, tmp_path / "lr")
    info_path = out / "meta/info.json"
    info = json.loads(info_path.read_text())
    del info["wm_stack"]
    info_path.write_text(json.dumps(info))
    lerobot_to_store(out, tmp_path / "back.zarr")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "exported by wm-convert (column 'wm_stack/info' in meta/episodes/" in said[0]
    assert said[0].endswith("its wm_stack metadata is gone (edited with lerobot's tools?): keys, units and "
                            "the action space are inferred, and may not be the original's")  # fmt: skip


def test_carried_metadata_that_no_longer_fits_is_ignored_with_a_warning(small_store, tmp_path, caplog):
    path, _ = small_store
    out = store_to_lerobot(path, tmp_path / "lr")
    info_path = out / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["wm_stack"]["schema"]["keys"]["action"]["shape"] = [3]  # edited by hand: action is (2,)
    info_path.write_text(json.dumps(info))
    back = lerobot_to_store(out, tmp_path / "back.zarr")
    (record,) = caplog.records
    assert "the wm_stack metadata does not fit this dataset" in record.getMessage()
    assert set(back.keys) == {"img", "state", "action", "timestamp"}  # inferred from LeRobot's names
    assert back.episode_info(2)["notes"] == "ep2"  # episode info is still carried
    # a feature added to the dataset after the export: inferring keeps it rather than dropping it
    info = json.loads(info_path.read_text())
    info["wm_stack"]["schema"]["keys"]["action"]["shape"] = [2]  # fits again
    assert lerobot_meta.read_carried(out, info) is not None
    info["features"]["observation.extra"] = {"dtype": "float32", "shape": [1], "names": None}
    assert lerobot_meta.read_carried(out, info) is None
    assert "features ['observation.extra'] are not in it" in caplog.records[-1].getMessage()


def test_wm_convert_round_trip_and_refusal(tmp_path):
    store = _rich_store(tmp_path / "rich.zarr")
    store.close()
    bin_dir = Path(sys.executable).parent

    def convert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bin_dir / "wm-convert"), *args], capture_output=True, text=True, timeout=300
        )

    res = convert(f"src={tmp_path / 'rich.zarr'}", f"dst={tmp_path / 'lr'}", "video=true")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {tmp_path / 'rich.zarr'}: {w}" for w in VIDEO_WARNINGS]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # the refusals in this process (each is refused before any work): a process each cost seconds
    res = run_app("wm-convert", f"src={tmp_path / 'rich.zarr'}", f"dst={tmp_path / 'lr'}")  # dst exists
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "already exists" in res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # options of the other direction were accepted and ignored (fps=30 gave a 15 fps dataset)
    res = run_app(
        "wm-convert", f"src={tmp_path / 'rich.zarr'}", f"dst={tmp_path / 'lr2'}", "fps=30", "zarr_format=2"
    )
    assert res.returncode == 2 and "error: zarr_format, fps: not used converting store" in res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # a LeRobot folder was written under a store's or robomimic file's name (there is no such direction)
    res = run_app("wm-convert", f"src={tmp_path / 'rich.zarr'}", f"dst={tmp_path / 'out.hdf5'}")
    assert res.returncode == 2 and "a store becomes a LeRobot dataset folder, not a .hdf5 file" in res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    res = convert(f"src={tmp_path / 'lr'}", f"dst={tmp_path / 'back.zarr'}")
    assert res.returncode == 0, res.stderr
    with DemoStore.open(tmp_path / "rich.zarr") as a, DemoStore.open(tmp_path / "back.zarr") as b:
        _assert_same_store(a, b, exact_images=False)
    # a zip store (read-only, as DemoStore and wm-info read it) is a store too: it was "not a store"
    import shutil

    shutil.make_archive(str(tmp_path / "back"), "zip", tmp_path / "back.zarr")
    res = convert(f"src={tmp_path / 'back.zip'}", f"dst={tmp_path / 'lr3'}")
    assert res.returncode == 0, res.stderr


SIGTERM_WHILE_CONVERTING = """
import os, signal, sys
from wm.data.convert import lerobot
import tools.convert
step = {"export": "_write_episode", "import": "_read_rows"}[sys.argv[1]]
original = getattr(lerobot, step)
def terminated(*args):
    out = original(*args)
    os.kill(os.getpid(), signal.SIGTERM)  # an episode written, the hidden .<dst>.converting.<pid> with it
    return out
setattr(lerobot, step, terminated)
sys.argv = ["wm-convert", "src=" + sys.argv[2], "dst=" + sys.argv[3]]
tools.convert.main()
"""


@pytest.mark.parametrize("direction", ["export", "import"])
def test_sigterm_while_converting_leaves_nothing_and_exits_143(lowdim_lerobot, tmp_path, direction):
    """SIGTERM (`timeout`, SLURM, `docker stop`) ended wm-convert where it stood: its hidden partial output
    `.<dst>.converting.<pid>` stayed beside dst, and only a later conversion to the same dst removed it."""
    import shutil

    if direction == "export":
        with lerobot_to_store(lowdim_lerobot, tmp_path / "src.zarr") as store:
            src = Path(store.path)
    else:
        src = shutil.copytree(lowdim_lerobot, tmp_path / "src")
    res = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_CONVERTING, direction, str(src), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert res.stderr.strip().endswith("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


# ---------------------------------------------------------------------- malformed datasets: one line
@pytest.fixture(scope="module")
def lowdim_lerobot(tmp_path_factory) -> Path:
    """A LeRobot dataset of state (4,) and action (2,) in episodes of LENGTHS; copy it to edit it."""
    root = tmp_path_factory.mktemp("lowdim") / "src"
    _make_lerobot(root, (), video=False, image_fn=_random_image)
    return root


def _edit_info(edit):
    def apply(root: Path) -> None:
        path = root / "meta/info.json"
        info = json.loads(path.read_text())
        edit(info)
        path.write_text(json.dumps(info))

    return apply


def _edit_table(relative: str, edit):
    def apply(root: Path) -> None:
        import pyarrow.parquet as pq

        path = root / relative
        pq.write_table(edit(pq.read_table(path)), path)

    return apply


def _column(table, name: str, values: list):
    import pyarrow as pa

    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, table.schema.field(i).type))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edits(*edits):
    def apply(root: Path) -> None:
        for edit in edits:
            edit(root)

    return apply


def _remove(relative: str):
    return lambda root: (root / relative).unlink()


DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        pytest.param(
            _edit_table("meta/tasks.parquet", lambda t: t.drop(["task_index"])),
            CorruptStoreError,
            "meta/tasks.parquet: LeRobot task metadata has no 'task_index' column",
            id="tasks_no_task_index",
        ),
        pytest.param(
            _edit_table(EPISODES_FILE, lambda t: t.drop(["data/chunk_index"])),
            CorruptStoreError,
            rf"{EPISODES_FILE}: LeRobot episode metadata has no 'data/chunk_index' \(episode 0\)",
            id="episodes_no_data_chunk",
        ),
        pytest.param(
            _edit_table(EPISODES_FILE, lambda t: t.drop(["episode_index"])),
            CorruptStoreError,
            "meta/episodes: LeRobot episode metadata has no 'episode_index' column",
            id="episodes_no_episode_index",
        ),
        pytest.param(  # followed out of the dataset (reading only; a file there would have been read)
            _edit_info(lambda i: i.__setitem__("data_path", "../../etc/file-{file_index:03d}.parquet")),
            CorruptStoreError,
            r"LeRobot data_path names '../../etc/file-000.parquet', outside the dataset",
            id="info_data_path_outside",
        ),
        pytest.param(
            _edit_info(lambda i: i.pop("data_path")),
            CorruptStoreError,
            "meta/info.json: LeRobot info.json has no 'data_path'",
            id="info_no_data_path",
        ),
        pytest.param(
            _edit_info(lambda i: i["features"]["observation.state"].__setitem__("shape", [3])),
            SchemaError,
            rf"info.json: feature 'observation.state' has shape \[3\], but .*/{DATA_FILE} \(episode 0\) "
            "holds 4 values per frame",
            id="info_state_shape",
        ),
        pytest.param(
            _edit_info(lambda i: i.__setitem__("fps", "ten")),
            SchemaError,
            "meta/info.json: fps 'ten' is not a positive number",
            id="info_fps_str",
        ),
        pytest.param(  # these three were tracebacks, or a line naming neither file nor feature
            _edit_info(lambda i: i["features"].__setitem__("action", 5)),
            CorruptStoreError,
            "meta/info.json: LeRobot feature 'action' is '5', not a mapping of its dtype, shape and names",
            id="info_feature_not_a_mapping",
        ),
        pytest.param(
            _edit_info(lambda i: i["features"]["action"].__setitem__("shape", ["a"])),
            SchemaError,
            "meta/info.json: feature 'action' cannot be stored: invalid literal for int",
            id="info_shape_str",
        ),
        pytest.param(
            _edit_table(EPISODES_FILE, lambda t: _column(t, "episode_index", [0, None, 2])),
            CorruptStoreError,
            "meta/episodes: LeRobot episode metadata has an episode_index of None, not a whole number",
            id="episodes_episode_index_null",
        ),
        # the next four converted without a word: an episode left out, or each task only its number
        pytest.param(
            _edit_table(EPISODES_FILE, lambda t: t.slice(0, 2)),
            CorruptStoreError,
            rf"src: LeRobot meta/info.json says total_episodes 3 \(meta/episodes lists 2\) and total_frames "
            rf"{sum(LENGTHS)} \(meta/episodes lists {sum(LENGTHS[:2])}\): meta/episodes lacks rows, or "
            "info.json is stale$",
            id="episodes_row_missing",
        ),
        pytest.param(
            _edit_info(lambda i: i.__setitem__("total_frames", sum(LENGTHS) + 1)),
            CorruptStoreError,
            rf"says total_frames {sum(LENGTHS) + 1} \(meta/episodes lists {sum(LENGTHS)}\): meta/episodes",
            id="info_total_frames",
        ),
        pytest.param(  # info.json's totals edited to agree: the data file still holds the episode
            _edits(
                _edit_table(EPISODES_FILE, lambda t: t.slice(0, 2)),
                _edit_info(lambda i: i.update(total_episodes=2, total_frames=sum(LENGTHS[:2]))),
            ),
            CorruptStoreError,
            rf"{DATA_FILE}: holds frames of episode\(s\) \[2\], which meta/episodes does not list$",
            id="episodes_row_missing_and_info_agrees",
        ),
        pytest.param(
            _remove("meta/tasks.parquet"),
            CorruptStoreError,
            r"meta/tasks.parquet: missing \(a LeRobot v3.0 dataset's task strings\)$",
            id="tasks_missing",
        ),
        pytest.param(  # was pyarrow's line of the whole schema, naming no feature
            _edit_info(
                lambda i: i["features"].__setitem__(
                    "observation.extra", {"dtype": "float32", "shape": [1], "names": None}
                )
            ),
            CorruptStoreError,
            rf"{DATA_FILE}: LeRobot data parquet has no column 'observation.extra', which meta/info.json "
            "declares$",
            id="data_no_declared_column",
        ),
    ],
)
def test_malformed_metadata_is_one_line_naming_file_and_field(
    lowdim_lerobot, tmp_path, edit, error, match
) -> None:
    """They were tracebacks (KeyError) or lines naming neither the file nor the feature (`cannot reshape
    array of size 20 into shape (5,3)`, `could not convert string to float: 'ten'`)."""
    root = _copy(lowdim_lerobot, tmp_path / "src")
    edit(root)
    with pytest.raises(error, match=match) as err:
        lerobot_to_store(root, tmp_path / "out.zarr")
    assert str(err.value).startswith(str(root)) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, nothing left


def test_non_finite_value_names_the_data_file_episode_and_feature(lowdim_lerobot, tmp_path) -> None:
    """The error named the hidden store being written (`.out.zarr.converting: key 'state' ...`)."""
    import pyarrow as pa

    def nan_at_episode_1_frame_2(table):
        i = table.schema.get_field_index("observation.state")
        field = table.schema.field(i)
        state = np.array(table.column(i).to_pylist(), dtype=np.float32)
        state[LENGTHS[0] + 2, 0] = np.nan
        return table.set_column(i, field, pa.array(state.tolist(), field.type))

    root = _copy(lowdim_lerobot, tmp_path / "src")
    _edit_table(DATA_FILE, nan_at_episode_1_frame_2)(root)
    with pytest.raises(AppendError) as err:
        lerobot_to_store(root, tmp_path / "out.zarr")
    assert str(err.value) == (
        f"{root / DATA_FILE}: episode 1: key 'state' (LeRobot feature 'observation.state') has non-finite "
        "values (first at step 2)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
