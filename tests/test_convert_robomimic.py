"""robomimic HDF5 -> DemoStore conversion on tiny files written with h5py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from wm.data import AppendError, CorruptStoreError, DemoStore, NotAStoreError, SchemaError, StoreBusyError
from wm.data.convert.robomimic import is_robomimic_hdf5, robomimic_to_store
from wm.data.verify import verify_store

LENGTHS = {"demo_0": 5, "demo_2": 7, "demo_10": 3}
ENV_ARGS = {
    "env_name": "Lift",
    "type": 1,
    "env_kwargs": {
        "robots": ["Panda"],
        "control_freq": 15,
        "controller_configs": {"type": "OSC_POSE", "control_delta": True, "input_max": 1},
    },
}


def _demo_data(name: str, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "actions": rng.uniform(-1, 1, (length, 7)),
        "obs/agentview_image": rng.integers(0, 256, (length, 16, 16, 3), dtype=np.uint8),
        "obs/robot0_eef_pos": rng.normal(size=(length, 3)),
        "obs/robot0_gripper_qpos": rng.normal(size=(length, 2)).astype(np.float32),
        "rewards": np.zeros(length),
        "dones": np.zeros(length, dtype=np.int64),
        "states": rng.normal(size=(length, 10)),
    }


def write_robomimic(path: Path, *, images: bool = True, env_args: dict | None = ENV_ARGS) -> dict:
    """A robomimic-layout file; demo_2 fails, the others succeed. Returns {demo: {dataset: array}}."""
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if env_args is not None:
            data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["total"] = sum(LENGTHS.values())
        for seed, (name, length) in enumerate(LENGTHS.items()):
            arrays = _demo_data(name, length, seed)
            if name != "demo_2":
                arrays["dones"][-1] = 1
                arrays["rewards"][-1] = 1.0
            if not images:
                del arrays["obs/agentview_image"]
            g = data.create_group(name)
            g.attrs["num_samples"] = length
            for key, value in arrays.items():
                g.create_dataset(key, data=value)
            demos[name] = arrays
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array([b"demo_0", b"demo_10"]))
        mask.create_dataset("valid", data=np.array([b"demo_2"]))
    return demos


def test_convert_bit_exact_in_numeric_order(tmp_path: Path) -> None:
    src = tmp_path / "lift.hdf5"
    demos = write_robomimic(src)
    assert is_robomimic_hdf5(src)
    store = robomimic_to_store(src, tmp_path / "lift.zarr")
    assert store.n_episodes == 3
    assert [store.episode_info(i)["source_demo"] for i in range(3)] == ["demo_0", "demo_2", "demo_10"]
    assert store.episode_lengths().tolist() == [5, 7, 3]
    assert set(store.keys) == {"action", "agentview_image", "robot0_eef_pos", "robot0_gripper_qpos"}
    for i, name in enumerate(["demo_0", "demo_2", "demo_10"]):
        ep = store.get_episode(i)
        src_arrays = demos[name]
        pairs = {"action": "actions", **{k: f"obs/{k}" for k in store.keys if k != "action"}}
        for key, src_key in pairs.items():
            assert ep[key].dtype == src_arrays[src_key].dtype, key
            np.testing.assert_array_equal(ep[key], src_arrays[src_key])


def test_schema_fps_and_info(tmp_path: Path) -> None:
    src = tmp_path / "lift.hdf5"
    write_robomimic(src)
    store = robomimic_to_store(src, tmp_path / "out.zarr", zarr_format=2)
    s = store.schema
    assert store.zarr_format == 2
    assert s.fps == 15.0 and s.task == "Lift" and s.robot == "Panda"
    assert (s.action_space.mode, s.action_space.frame) == ("delta", "ee")
    assert s.keys["agentview_image"].kind == "image" and s.keys["agentview_image"].shape == (16, 16, 3)
    assert s.keys["robot0_eef_pos"].kind == "proprio" and s.keys["robot0_eef_pos"].dtype == "float64"
    assert s.keys["action"].kind == "action" and s.keys["action"].shape == (7,)
    infos = [store.episode_info(i) for i in range(3)]
    assert [i["success"] for i in infos] == [True, False, True]
    assert [i["filter_keys"] for i in infos] == [["train"], ["valid"], ["train"]]
    # fps argument overrides control_freq
    store2 = robomimic_to_store(src, tmp_path / "out.zarr", overwrite=True, fps=30)
    assert store2.schema.fps == 30.0 and store2.zarr_format == 3


def test_low_dim_only_and_defaults(tmp_path: Path) -> None:
    src = tmp_path / "low_dim.hdf5"
    demos = write_robomimic(src, images=False, env_args={"env_name": "PickPlaceCan", "env_kwargs": {}})
    store = robomimic_to_store(src, tmp_path / "low.zarr")
    assert store.schema.keys_of_kind("image") == []
    assert store.schema.fps == 20.0
    assert (store.schema.action_space.mode, store.schema.action_space.frame) == ("absolute", "other")
    np.testing.assert_array_equal(
        store.get_episode(2)["robot0_eef_pos"], demos["demo_10"]["obs/robot0_eef_pos"]
    )


def test_robosuite_15_composite_controller(tmp_path: Path) -> None:
    ctrl = {"type": "BASIC", "body_parts": {"right": {"type": "OSC_POSE", "input_type": "absolute"}}}
    args = {"env_name": "Lift", "env_kwargs": {"robots": "Panda", "controller_configs": ctrl}}
    src = tmp_path / "abs.hdf5"
    write_robomimic(src, images=False, env_args=args)
    space = robomimic_to_store(src, tmp_path / "abs.zarr").schema.action_space
    assert (space.mode, space.frame) == ("absolute", "ee")


def test_robosuite_15_composite_controller_as_its_file_nests_it() -> None:
    """robosuite's own BASIC config nests the arms under "arms" (its loader flattens them): it read as the
    torso's joint controller, not the arms' delta OSC."""
    import robosuite

    from wm.data.convert.robomimic import _action_space

    path = Path(robosuite.__file__).parent / "controllers/config/default/composite/basic.json"
    ctrl = json.loads(path.read_text())
    assert "arms" in ctrl["body_parts"]
    space = _action_space(ctrl)
    assert (space.mode, space.frame) == ("delta", "ee") and "OSC_POSE" in space.description


@pytest.mark.parametrize("ctype", ["JOINT_VELOCITY", "JOINT_TORQUE"])
def test_velocity_and_torque_controllers_are_recorded_as_absolute_set_points(
    tmp_path: Path, ctype: str
) -> None:
    """They were recorded as delta/joint, which merges accept beside delta joint-position stores."""
    args = {"env_name": "Lift", "env_kwargs": {"robots": "Panda", "controller_configs": {"type": ctype}}}
    src = tmp_path / "joint.hdf5"
    write_robomimic(src, images=False, env_args=args)
    space = robomimic_to_store(src, tmp_path / "joint.zarr").schema.action_space
    assert (space.mode, space.frame) == ("absolute", "joint") and ctype in space.description


def test_missing_obs_key_names_demo(tmp_path: Path) -> None:
    src = tmp_path / "bad.hdf5"
    write_robomimic(src)
    with h5py.File(src, "a") as f:
        del f["data/demo_10/obs/robot0_eef_pos"]
    with pytest.raises(SchemaError, match=r"bad\.hdf5.*demo_10.*robot0_eef_pos") as e:
        robomimic_to_store(src, tmp_path / "bad.zarr")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad.zarr").exists()


def test_mismatched_shape_names_both_demos(tmp_path: Path) -> None:
    src = tmp_path / "bad.hdf5"
    write_robomimic(src)
    with h5py.File(src, "a") as f:
        del f["data/demo_2/obs/robot0_eef_pos"]
        f["data/demo_2/obs/robot0_eef_pos"] = np.zeros((7, 4))
    with pytest.raises(SchemaError, match=r"demo_2.*robot0_eef_pos.*demo_0"):
        robomimic_to_store(src, tmp_path / "bad.zarr")


def test_non_finite_action_is_append_error_with_demo(tmp_path: Path) -> None:
    src = tmp_path / "nan.hdf5"
    write_robomimic(src)
    with h5py.File(src, "a") as f:
        f["data/demo_10/actions"][1, 2] = np.nan
    dst = tmp_path / "nan.zarr"
    with pytest.raises(AppendError, match=r"nan\.hdf5.*demo_10.*'action'.*non-finite") as e:
        robomimic_to_store(src, dst)
    assert "\n" not in str(e.value) and ".converting" not in str(e.value)
    assert not dst.exists() and not list(tmp_path.glob(".*converting*"))


def test_not_robomimic(tmp_path: Path) -> None:
    text = tmp_path / "notes.hdf5"
    text.write_text("hello")
    assert not is_robomimic_hdf5(text)
    assert not is_robomimic_hdf5(tmp_path / "missing.hdf5")
    with pytest.raises(NotAStoreError, match=r"notes\.hdf5.*not an HDF5"):
        robomimic_to_store(text, tmp_path / "a.zarr")
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    assert not is_robomimic_hdf5(other)
    with pytest.raises(NotAStoreError, match=r"other\.hdf5.*no data/ group"):
        robomimic_to_store(other, tmp_path / "b.zarr")
    with h5py.File(other, "a") as f:
        f.create_group("data/episode_1")
    with pytest.raises(NotAStoreError, match=r"other\.hdf5.*data/episode_1"):
        robomimic_to_store(other, tmp_path / "b.zarr")


def test_existing_destination(tmp_path: Path) -> None:
    src = tmp_path / "lift.hdf5"
    write_robomimic(src, images=False)
    dst = tmp_path / "out.zarr"
    robomimic_to_store(src, dst).close()
    with pytest.raises(FileExistsError):
        robomimic_to_store(src, dst)
    assert DemoStore.open(dst).n_episodes == 3


def test_object_state_is_not_proprioception_success_follows_rewards_and_absolute_actions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """robomimic files as its own scripts write them: `object` (the simulator's object poses) beside the
    robot's state, done=1 at every trajectory's end (done modes 1 and 2), and `actions_abs` added by
    its absolute-action script. The datasets left out are named in one `warning:` line, as the LeRobot
    path does (it was a Python warning, printed with a source line of tools/convert.py)."""
    src = tmp_path / "lift.hdf5"
    demos = write_robomimic(src)
    rng = np.random.default_rng(7)
    with h5py.File(src, "a") as f:
        for name, length in LENGTHS.items():
            g = f["data"][name]
            g.create_dataset("obs/object", data=rng.normal(size=(length, 10)))
            del g["dones"]
            g.create_dataset("dones", data=np.r_[np.zeros(length - 1), 1].astype(np.int64))  # every end done
            demos[name]["actions_abs"] = rng.normal(size=(length, 7))
            g.create_dataset("actions_abs", data=demos[name]["actions_abs"])
    store = robomimic_to_store(src, tmp_path / "lift.zarr")
    (record,) = caplog.records
    hint = "(another action dataset is chosen with action_key=)"
    assert record.getMessage() == f"warning: {src}: demo datasets not copied: actions_abs {hint}"
    kinds = {k: s.kind for k, s in store.schema.keys.items()}
    assert (
        kinds["object"] == "lowdim" and kinds["robot0_eef_pos"] == kinds["robot0_gripper_qpos"] == "proprio"
    )
    assert store.schema.keys_of_kind("proprio")[0] == "robot0_eef_pos"  # wm-train's default proprio key
    assert [store.episode_info(i)["success"] for i in range(3)] == [True, False, True]  # demo_2: no reward

    caplog.clear()
    store = robomimic_to_store(src, tmp_path / "abs.zarr", action_key="actions_abs")
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {src}: demo datasets not copied: actions {hint}"
    ]
    space = store.schema.action_space
    assert (space.mode, space.frame) == ("absolute", "ee") and "actions_abs" in space.description
    np.testing.assert_array_equal(store.get_episode(1)["action"], demos["demo_2"]["actions_abs"])
    with pytest.raises(SchemaError, match="data/demo_0/actions_delta is missing"):
        robomimic_to_store(src, tmp_path / "none.zarr", action_key="actions_delta")


def test_object_poses_relative_to_the_robot_are_not_proprioception(tmp_path: Path) -> None:
    """robosuite's gripper_to_cube_pos and RoboCasa's obj_to_robot0_eef_pos name the gripper / eef: they
    were proprio, and sorting first, wm-train's default proprioception was an object's position."""
    src = tmp_path / "lift.hdf5"
    write_robomimic(src)
    with h5py.File(src, "a") as f:
        for name, length in LENGTHS.items():
            for key in ("gripper_to_cube_pos", "obj_to_robot0_eef_pos", "robot0_base_to_eef_pos"):
                f["data"][name].create_dataset(f"obs/{key}", data=np.zeros((length, 3)))
    store = robomimic_to_store(src, tmp_path / "lift.zarr")
    kinds = {k: s.kind for k, s in store.schema.keys.items()}
    assert kinds["gripper_to_cube_pos"] == kinds["obj_to_robot0_eef_pos"] == "lowdim"
    assert kinds["robot0_base_to_eef_pos"] == "proprio"  # the robot's own (RoboCasa)
    assert store.schema.keys_of_kind("proprio")[0].startswith("robot0_")  # wm-train's default: the robot's


def test_shaped_rewards_flag_success_by_the_reward_scale_and_empty_demos_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With robosuite's reward_shaping every step is rewarded: a failed demo's last reward was > 0 and
    flagged a success. Only success reaches reward_scale. A demo of 0 samples failed the whole file."""
    src = tmp_path / "dense.hdf5"
    shaped = {
        **ENV_ARGS,
        "env_kwargs": {**ENV_ARGS["env_kwargs"], "reward_shaping": True, "reward_scale": 1.0},
    }
    write_robomimic(src, env_args=shaped)
    with h5py.File(src, "a") as f:
        for name, last in (("demo_0", 1.0), ("demo_2", 0.35), ("demo_10", 1.0)):
            f["data"][name]["rewards"][:] = np.linspace(0.1, last, LENGTHS[name])
        g = f["data"].create_group("demo_11")  # recorded and never stepped
        for key, ds in f["data"]["demo_0"].items():
            if isinstance(ds, h5py.Dataset):
                g.create_dataset(key, data=ds[:0])
        g.create_group("obs")
        for key, ds in f["data"]["demo_0"]["obs"].items():
            g["obs"].create_dataset(key, data=ds[:0])
    store = robomimic_to_store(src, tmp_path / "dense.zarr")
    assert [store.episode_info(i)["success"] for i in range(3)] == [True, False, True]
    assert store.n_episodes == 3 and [store.episode_info(i)["source_demo"] for i in range(3)] == [
        "demo_0", "demo_2", "demo_10"
    ]  # fmt: skip
    assert f"warning: {src}: demos without samples left out: demo_11" in [
        r.getMessage() for r in caplog.records
    ]


def test_a_rate_not_in_the_file_is_said_when_assumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "norate.hdf5"
    write_robomimic(src, images=False, env_args={"env_name": "Lift", "env_kwargs": {}})
    assert robomimic_to_store(src, tmp_path / "n.zarr").schema.fps == 20.0
    assert f"warning: {src}: env_args names no control_freq: 20 fps assumed (robosuite's; give fps=)" in [
        r.getMessage() for r in caplog.records
    ]


# ---------------------------------------------------------------------- malformed input: one line
def _kwargs(env_kwargs: object) -> Callable[[h5py.File], None]:
    return lambda f: f["data"].attrs.__setitem__(
        "env_args", json.dumps({"env_name": "Lift", "env_kwargs": env_kwargs})
    )


def _obs(key: str, dtype: object, value: object = 0) -> Callable[[h5py.File], None]:
    def add(f: h5py.File) -> None:
        for name, length in LENGTHS.items():
            f[f"data/{name}/obs"].create_dataset(key, data=np.full(length, value, dtype=dtype), dtype=dtype)

    return add


def _string_actions(f: h5py.File) -> None:
    for name, length in LENGTHS.items():
        del f[f"data/{name}/actions"]
        f[f"data/{name}/actions"] = np.full((length, 2), "pick", dtype="S4")


def _flat_rewards(f: h5py.File) -> None:
    del f["data/demo_0/rewards"]
    f["data/demo_0/rewards"] = np.zeros((LENGTHS["demo_0"], 0))


FREQ = "data attribute env_args: env_kwargs.control_freq"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        pytest.param(_kwargs(["x"]), "env_args: env_kwargs is a list, not a mapping", id="kwargs_list"),
        pytest.param(_string_actions, r"data/demo_0/actions: dtype \|S4 is not numeric$", id="actions"),
        pytest.param(_flat_rewards, r"data/demo_0/rewards: shape \(5, 0\) float64 has no", id="rewards"),
        pytest.param(_kwargs({"control_freq": "fast"}), f"{FREQ} 'fast' is not a positive", id="freq"),
        pytest.param(_kwargs({"control_freq": -5}), f"{FREQ} -5 is not a positive", id="freq_neg"),
        pytest.param(_kwargs({"control_freq": 0}), f"{FREQ} 0 is not a positive", id="freq_0"),
        pytest.param(  # it was read as no env_args at all
            lambda f: f["data"].attrs.__setitem__("env_args", "[1, 2]"),
            "data attribute env_args is JSON list, not an object",
            id="env_args_list",
        ),
    ],
)
def test_malformed_file_is_one_line_naming_file_and_dataset(
    tmp_path: Path, mutate: Callable[[h5py.File], None], match: str
) -> None:
    """They were tracebacks (AttributeError, TypeError from numpy, IndexError) or a line naming neither
    the file nor the dataset (`could not convert string to float: 'fast'`)."""
    src = tmp_path / "bad.hdf5"
    write_robomimic(src, images=False)
    with h5py.File(src, "a") as f:
        mutate(f)
    with pytest.raises(SchemaError, match=match) as e:
        robomimic_to_store(src, tmp_path / "bad.zarr")
    assert str(e.value).startswith(f"{src}: ") and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.hdf5"]


@pytest.mark.parametrize(
    ("dtype", "value", "shown"),
    [
        pytest.param("S4", "pick", "|S4", id="bytes"),
        pytest.param(h5py.string_dtype(), "pick", "object", id="str"),
        pytest.param([("a", "f4"), ("b", "i4")], 0, "[('a', '<f4'), ('b', '<i4')]", id="compound"),
    ],
)
def test_a_non_numeric_obs_key_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dtype: object, value: object, shown: str
) -> None:
    """A language instruction or a record per step is not data the store can hold; the demos' other
    keys are (the conversion was refused, where LeRobot's string features are left out and named)."""
    src = tmp_path / "lang.hdf5"
    demos = write_robomimic(src, images=False)
    with h5py.File(src, "a") as f:
        _obs("lang", dtype, value)(f)
    store = robomimic_to_store(src, tmp_path / "lang.zarr")
    assert "lang" not in store.keys and store.n_episodes == len(LENGTHS)
    np.testing.assert_array_equal(
        store.get_episode(0)["robot0_eef_pos"], demos["demo_0"]["obs/robot0_eef_pos"]
    )
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {src}: obs/lang is not copied: dtype {shown} is not numeric"
    ]


def test_an_obs_key_of_no_values_per_step_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An obs key of shape (T, 0) was copied: zarr writes no chunk for it, so wm-info then called the store
    damaged and offered to drop every episode as the repair."""
    src = tmp_path / "empty_obs.hdf5"
    write_robomimic(src, images=False)
    with h5py.File(src, "a") as f:
        for name, length in LENGTHS.items():
            f[f"data/{name}/obs"].create_dataset("object", data=np.zeros((length, 0), np.float32))
    store = robomimic_to_store(src, tmp_path / "out.zarr")
    assert "object" not in store.keys and store.n_episodes == len(LENGTHS)
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {src}: obs/object is not copied: its per-step shape (0,) holds no values"
    ]
    assert verify_store(tmp_path / "out.zarr").problems == []


def test_control_freq_is_not_read_when_fps_is_given(tmp_path: Path) -> None:
    src = tmp_path / "lift.hdf5"
    write_robomimic(src, images=False, env_args={"env_name": "Lift", "env_kwargs": {"control_freq": "fast"}})
    assert robomimic_to_store(src, tmp_path / "out.zarr", fps=10).schema.fps == 10.0


def test_damaged_chunk_is_corrupt_store_error_naming_demo_and_key(tmp_path: Path) -> None:
    """A compressed chunk damaged on disk (bit rot, a bad copy) was a traceback of h5py's OSError."""
    src = tmp_path / "lift.hdf5"
    write_robomimic(src)
    with h5py.File(src, "a") as f:
        images = f["data/demo_2/obs/agentview_image"][()]
        del f["data/demo_2/obs/agentview_image"]
        ds = f.create_dataset(
            "data/demo_2/obs/agentview_image", data=images, compression="gzip", chunks=(1, 16, 16, 3)
        )
        chunk = ds.id.get_chunk_info(1)
    with open(src, "r+b") as fh:
        fh.seek(chunk.byte_offset + 4)
        fh.write(b"\xff" * 16)
    with pytest.raises(
        CorruptStoreError, match=r"data/demo_2/obs/agentview_image: cannot read steps 0-6 \("
    ) as e:
        robomimic_to_store(src, tmp_path / "out.zarr")
    assert str(e.value).startswith(f"{src}: ") and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lift.hdf5"]


def test_hdf5_file_that_will_not_open_says_why(tmp_path: Path) -> None:
    """A truncated file, or one a writer holds (HDF5's file lock), was "not a ... robomimic HDF5 file"."""
    src = tmp_path / "lift.hdf5"
    write_robomimic(src, images=False)
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    for check in (is_robomimic_hdf5, lambda p: robomimic_to_store(p, tmp_path / "out.zarr")):
        with pytest.raises(
            CorruptStoreError, match=r"truncated\.hdf5: cannot open this HDF5 file \(.*truncated file"
        ):
            check(truncated)
    if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE":
        return
    hold = "import h5py, sys; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); sys.stdin.read()"
    writer = subprocess.Popen(
        [sys.executable, "-c", hold, str(src)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        for check in (is_robomimic_hdf5, lambda p: robomimic_to_store(p, tmp_path / "out.zarr")):
            with pytest.raises(
                StoreBusyError, match=r"lift\.hdf5: the HDF5 file is locked: another process has it open"
            ):
                check(src)
    finally:
        writer.communicate("", timeout=60)
    assert is_robomimic_hdf5(src) and not (tmp_path / "out.zarr").exists()


def test_damage_anywhere_in_a_file_is_one_line_of_the_stores_errors(tmp_path: Path) -> None:
    """64 bytes overwritten at every 512th offset of a small file: damage in a group, object header or
    heap (16 of 134 offsets at every 256th of another) came out as h5py's RuntimeError, KeyError or
    OSError: a bug's traceback."""
    from wm.data import StoreError

    src = tmp_path / "lift.hdf5"
    write_robomimic(src, images=False)
    raw = src.read_bytes()
    refused = []
    for offset in range(0, len(raw), 512):
        damaged = tmp_path / f"at{offset}.hdf5"
        damaged.write_bytes(raw[:offset] + b"\xff" * 64 + raw[offset + 64 :])
        try:
            robomimic_to_store(damaged, tmp_path / f"at{offset}.zarr")
        except StoreError as e:  # (anything else fails the test)
            assert "\n" not in str(e) and str(e).startswith(str(damaged)), e
            refused.append(type(e).__name__)
    assert "CorruptStoreError" in refused


def test_an_empty_demo_written_from_an_empty_list_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A demo never stepped, written as np.array([]) (shape (0,), not (0, A)), failed the whole file
    ("data/demo_11/actions is missing or not a (T, A) array")."""
    src = tmp_path / "lift.hdf5"
    write_robomimic(src, images=False)
    with h5py.File(src, "a") as f:
        g = f["data"].create_group("demo_11")
        for key in ("actions", "obs/robot0_eef_pos", "obs/robot0_gripper_qpos", "rewards"):
            g.create_dataset(key, data=np.array([]))
    assert robomimic_to_store(src, tmp_path / "out.zarr").n_episodes == 3
    said = [r.getMessage() for r in caplog.records]
    assert f"warning: {src}: demos without samples left out: demo_11" in said


def test_an_ik_controller_takes_delta_end_effector_poses(tmp_path: Path) -> None:
    """robosuite's IK_POSE controller was recorded as absolute/other (merges and the robot read that)."""
    args = {"env_name": "Lift", "env_kwargs": {"robots": "Panda", "controller_configs": {"type": "IK_POSE"}}}
    src = tmp_path / "ik.hdf5"
    write_robomimic(src, images=False, env_args=args)
    space = robomimic_to_store(src, tmp_path / "ik.zarr").schema.action_space
    assert (space.mode, space.frame) == ("delta", "ee") and "IK_POSE" in space.description
