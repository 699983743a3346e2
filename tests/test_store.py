"""Round trips, legacy stores, store operations and bad input for the demonstration store."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import as_format_1, make_episode, make_schema
from zarr.storage import LocalStore

from wm.data import (
    ActionSpace,
    AppendError,
    CorruptStoreError,
    DemoStore,
    KeySpec,
    NotAStoreError,
    Schema,
    SchemaError,
    delete_episodes,
    keep_episodes,
    merge_stores,
)
from wm.data.chunks import ChunkReader
from wm.data.places import check_destination


def assert_episode_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("frames_per_chunk", [1, 3])
def test_round_trip_buffered_and_streamed(tmp_path, zarr_format, frames_per_chunk):
    path = tmp_path / "s.zarr"
    store = DemoStore.create(path, make_schema(), zarr_format=zarr_format, frames_per_chunk=frames_per_chunk)
    eps = [make_episode(i, 5 + 20 * i) for i in range(3)]  # 45 steps crosses the streaming flush size
    store.append_episode(eps[0], {"success": True})
    with store.begin_episode() as w:
        for t in range(len(eps[1]["action"])):
            w.add_step({k: v[t] for k, v in eps[1].items()})
    w = store.begin_episode()
    w.add_steps({k: v[:10] for k, v in eps[2].items()})
    w.add_steps({k: v[10:] for k, v in eps[2].items()})
    assert w.end({"success": False, "notes": "dropped the block"}) == 2
    store.close()

    r = DemoStore.open(path)
    assert r.zarr_format == zarr_format
    assert r.n_episodes == 3 and r.n_steps == sum(len(e["action"]) for e in eps)
    np.testing.assert_array_equal(r.episode_ends, np.cumsum([len(e["action"]) for e in eps]))
    for i, ep in enumerate(eps):
        assert_episode_equal(r.get_episode(i), ep)
    assert r.episode_info(0) == {"length": 5, "success": True}
    assert r.episode_info(2)["notes"] == "dropped the block"
    assert r.schema == make_schema()
    assert not r.legacy


def test_float64_input_is_stored_as_schema_dtype(tmp_path):
    store = DemoStore.create(tmp_path / "s.zarr", make_schema())
    ep = make_episode(0, 4)
    ep["action"] = ep["action"].astype(np.float64)
    store.append_episode(ep)
    assert store.get_episode(0)["action"].dtype == np.float32


def test_fast_chunk_reader_matches_zarr(tmp_path):
    for fmt in (2, 3):
        store = DemoStore.create(
            tmp_path / f"s{fmt}.zarr", make_schema(), zarr_format=fmt, frames_per_chunk=4
        )
        for i in range(3):
            store.append_episode(make_episode(i, 9))
        arr = store.array("img")
        reader = ChunkReader.for_array(arr)
        assert reader is not None
        steps = np.array([0, 3, 4, 5, 17, 26])
        np.testing.assert_array_equal(reader.rows(steps), arr.oindex[steps])
    for dtype in ("uint8", "float32"):  # a zarr 2 array with a null fill value, its last chunk never written
        group = zarr.open_group(tmp_path / f"null_{dtype}.zarr", mode="w", zarr_format=2)
        arr = group.create_array("x", shape=(8, 3), chunks=(4, 3), dtype=dtype, fill_value=None)
        arr[:4] = 1
        np.testing.assert_array_equal(ChunkReader.for_array(arr).rows(np.arange(8)), arr[:])


def test_closing_a_zip_store_closes_its_file(tmp_path):
    """Its chunks are read through one ZipFile per key, which close() left open (a file descriptor per
    key for every store a process opened and closed, until the garbage collector came by)."""
    path = tmp_path / "s.zarr"
    with DemoStore.create(path, make_schema()) as store:
        store.append_episode(make_episode(0, 6))
    zipped = shutil.make_archive(str(tmp_path / "s.zarr"), "zip", path)

    def held() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == os.path.realpath(zipped))

    store = DemoStore.open(zipped)
    assert_episode_equal(store.get_episode(0), make_episode(0, 6))
    assert held() >= 1
    store.close()
    assert held() == 0


def test_legacy_diffusion_policy_store_opens_directly(tmp_path):
    """A zarr v2 store in Diffusion Policy's layout, without schema attributes."""
    path = tmp_path / "pusht_legacy.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    rng = np.random.default_rng(0)
    root.create_array(
        "data/img", data=rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8), chunks=(1, 16, 16, 3)
    )
    root.create_array("data/state", data=rng.normal(size=(30, 5)).astype(np.float32))
    root.create_array("data/action", data=rng.normal(size=(30, 2)).astype(np.float32))
    root.create_array("data/keypoint", data=rng.normal(size=(30, 9, 2)).astype(np.float32))
    root.create_array("meta/episode_ends", data=np.array([10, 30], dtype=np.int64))

    s = DemoStore.open(path)
    assert s.legacy and s.n_episodes == 2 and s.n_steps == 30
    kinds = {k: spec.kind for k, spec in s.schema.keys.items()}
    assert kinds == {"img": "image", "state": "proprio", "action": "action", "keypoint": "proprio"}
    np.testing.assert_array_equal(s.get_episode(1)["state"], root["data/state"][10:30])
    for _ in range(8):  # zarr lists the arrays in no fixed order; the order picks the default camera and
        # proprio key and enters a resume's and a feature cache's fingerprints (resumes were refused)
        assert list(DemoStore.open(path).schema.keys) == ["action", "img", "keypoint", "state"]

    # Diffusion Policy's own PushT `img` is float32 in 0..255 (it was taken for proprioception), and a
    # numeric name that holds "lang" is not language
    from wm.data.schema import infer_kind

    assert infer_kind("img", (96, 96, 3), np.dtype("float32")) == "image"
    assert infer_kind("flange_pose", (7,), np.dtype("float32")) == "proprio"
    assert infer_kind("lang_instruction", (512,), np.dtype("float32")) == "language"
    assert infer_kind("heatmap", (4, 4, 1), np.dtype("float32")) == "proprio"  # too small for a camera
    assert infer_kind("tiny", (4, 4, 1), np.dtype("uint8")) == "image"  # uint8 frames of any size, as ever

    s2 = DemoStore.open(path, schema_overrides={"fps": 10, "keys": {"keypoint": {"kind": "lowdim"}}})
    assert s2.schema.keys["keypoint"].kind == "lowdim"
    with pytest.raises(SchemaError, match="nope"):
        DemoStore.open(path, schema_overrides={"keys": {"nope": {"kind": "image"}}})

    # Appending adopts the store: it gains a schema and stays readable as the DP layout.
    a = DemoStore.open(path, mode="a")
    a.append_episode({k: v[:5] for k, v in a.get_episode(0).items()})
    a.close()
    assert list(zarr.open_group(str(path), mode="r")["meta/episode_ends"][:]) == [10, 30, 35]
    assert not DemoStore.open(path).legacy


def test_a_diffusion_policy_store_with_consolidated_metadata_is_adopted_and_appended_to(tmp_path):
    """zarr 2's .zmetadata (zarr.consolidate_metadata) held the arrays' shapes at consolidation: appending
    failed (the info array not found in it), and before that a reopen saw the old shapes; it is ignored,
    and removed at the first open for appending, as it goes stale there."""
    path = tmp_path / "dp.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    eps = [make_episode(i, 4 + i) for i in range(3)]
    for key in eps[0]:
        root.create_array(f"data/{key}", data=np.concatenate([e[key] for e in eps]))
    root.create_array("meta/episode_ends", data=np.cumsum([4, 5, 6]).astype(np.int64))
    zarr.consolidate_metadata(str(path), zarr_format=2)
    with DemoStore.open(path, mode="a") as store:
        store.append_episode(make_episode(3, 7), {"seed": 3})
    assert not (path / ".zmetadata").exists()
    with DemoStore.open(path) as store:
        assert store.n_episodes == 4 and store.episode_info(3) == {"length": 7, "seed": 3}
        assert_episode_equal(store.get_episode(3), make_episode(3, 7))
        assert_episode_equal(store.get_episode(1), eps[1])


def test_an_info_length_other_than_the_episodes_is_refused_it_is_the_commit_records_own(small_store):
    """An episode's info "length" replaced the step count the commit record keeps: a healthy store
    failed verification, and a salvage (wm-info drop_episodes=[]) split the data at the wrong steps. The
    episode's own count (an episode copied with its info) is what the record says anyway."""
    path, _ = small_store
    s = DemoStore.open(path, mode="a")
    with pytest.raises(
        AppendError, match=r"its 'length' \(2\) is not the episode's 5 steps: .*; nothing was written$"
    ):
        s.append_episode(make_episode(1, 5), {"length": 2})
    w = s.begin_episode()
    w.add_steps(make_episode(1, 5))
    with pytest.raises(AppendError, match=r"its 'length' \(2\) is not the episode's 5 steps.*kept open"):
        w.end({"length": 2, "rope": "long"})
    assert w.end({"rope_length": 2}) == 5
    copied = s.append_episode(s.get_episode(0), s.episode_info(0))  # its info holds its own length
    s.close()
    r = DemoStore.open(path)
    assert r.n_episodes == 7 and r.episode_info(5) == {"length": 5, "rope_length": 2}
    assert r.episode_info(copied) == r.episode_info(0) and r.episode_lengths()[copied] == 7


def _dp_store(path, ends, steps):
    """A zarr v2 store in Diffusion Policy's layout (no schema attributes)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("data/state", data=np.arange(steps * 3, dtype=np.float32).reshape(steps, 3))
    root.create_array("data/action", data=np.arange(steps * 2, dtype=np.float32).reshape(steps, 2))
    root.create_array("meta/episode_ends", data=np.array(ends, dtype=np.int64))
    return root


def test_a_store_of_another_tool_with_an_empty_episode_is_adopted_and_still_opens(tmp_path):
    """Diffusion Policy's stores may hold an episode without steps. Appending adopted the store with a
    commit record of empty entries, after which the empty episode read as damage: no open (salvage
    included) and no repair worked. The adoption records each episode's length, 0 included."""
    from wm.data.verify import verify_store

    path = tmp_path / "dp.zarr"
    root = _dp_store(path, [3, 3, 5], 5)
    a = DemoStore.open(path, mode="a")
    assert list(a.episode_lengths()) == [3, 0, 2]
    a.append_episode({"state": np.ones((4, 3), np.float32), "action": np.ones((4, 2), np.float32)})
    a.close()
    for salvage in (False, True):
        r = DemoStore.open(path, salvage=salvage)
        assert list(r.episode_lengths()) == [3, 0, 2, 4] and not r.legacy
        assert [r.episode_info(i)["length"] for i in range(4)] == [3, 0, 2, 4]
        np.testing.assert_array_equal(r.get_episode(2)["state"], root["data/state"][3:5])
    assert DemoStore.open(path, mode="a").n_episodes == 4  # and again for appending
    report = verify_store(path)
    assert [(p.episodes, p.fatal) for p in report.problems] == [((1,), False)]  # said, not fatal


def test_a_bool_image_key_is_refused():
    """It was stored and read for training as 0 and 1 of 255, a black image."""
    with pytest.raises(SchemaError, match=r"an image key cannot be bool .*; store uint8$"):
        KeySpec((4, 4, 1), "bool", "image")
    KeySpec((4,), "bool", "lowdim")  # a flag is fine


def test_a_schema_that_does_not_fit_the_arrays_is_refused_at_open(small_store, tmp_path):
    """An override (or a damaged schema attribute) of another shape than the array: appends were checked
    against the schema and zarr dropped the columns the array did not have."""
    path = tmp_path / "dp.zarr"
    _dp_store(path, [5], 5)
    said = r"dp.zarr/data/state: holds \(3,\) float32 per step but the schema says \(4,\) float32"
    for mode in ("r", "a"):
        with pytest.raises(SchemaError, match=said):
            DemoStore.open(path, mode=mode, schema_overrides={"keys": {"state": {"shape": [4]}}})
    with pytest.raises(
        SchemaError, match=r"holds \(3,\) float32 per step but the schema says \(3,\) float64"
    ):
        DemoStore.open(path, schema_overrides={"keys": {"state": {"dtype": "float64"}}})
    assert DemoStore.open(path, schema_overrides={"keys": {"state": {"kind": "lowdim"}}}).n_episodes == 1
    small, _ = small_store
    group = zarr.open_group(str(small), mode="r+")
    schema = dict(group.attrs)["wm_schema"]
    schema["keys"]["action"]["shape"] = [3]
    group.attrs["wm_schema"] = schema
    with pytest.raises(SchemaError, match=r"small.zarr/data/action: holds \(2,\) float32 .* says \(3,\)"):
        DemoStore.open(small, mode="a")


@pytest.mark.parametrize(
    "damage, said",
    [
        ({"fps": "abc"}, r"ValueError: could not convert string to float: 'abc'"),
        ({"keys": ["img"]}, r"AttributeError: 'list' object has no attribute 'items'"),
        ({"format_version": "a"}, r"ValueError: invalid literal for int\(\)"),
    ],
)
def test_a_malformed_schema_attribute_is_one_line_naming_the_store(small_store, damage, said):
    from wm.data.verify import verify_store

    path, _ = small_store
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["wm_schema"] = {**dict(group.attrs)["wm_schema"], **damage}
    with pytest.raises(SchemaError, match=rf"^{path}: malformed schema attributes: {said}"):
        DemoStore.open(path)
    assert any(p.fatal for p in verify_store(path).problems)  # reported, not a traceback


def test_a_schema_override_that_is_not_a_mapping_is_one_line(small_store):
    path, _ = small_store
    with pytest.raises(
        SchemaError, match=r"small.zarr: schema override action_space='delta' is not a mapping"
    ):
        DemoStore.open(path, schema_overrides={"action_space": "delta"})
    with pytest.raises(SchemaError, match=r"schema override keys=\['img'\] is not a mapping"):
        DemoStore.open(path, schema_overrides={"keys": ["img"]})


@pytest.mark.parametrize(
    "option, said",
    [
        ({"frames_per_chunk": 0}, "frames_per_chunk must be a whole number >= 1, got 0"),
        ({"frames_per_chunk": 2.5}, "frames_per_chunk must be a whole number >= 1, got 2.5"),
        (
            {"image_codec": "gzip"},
            "image_codec must be one of auto, lz4, lz4hc, zstd, zlib, blosclz, got 'gzip'",
        ),
        ({"zarr_format": 4}, "zarr_format must be 2 or 3, got 4"),
    ],
)
def test_create_refuses_bad_options_before_writing_anything(tmp_path, option, said):
    """frames_per_chunk=0 made a store that every append failed on (ZeroDivisionError)."""
    path = tmp_path / "new.zarr"
    with pytest.raises(ValueError, match=rf"new.zarr: {re.escape(said)}$"):
        DemoStore.create(path, make_schema(), **option)
    assert list(tmp_path.iterdir()) == []


def test_reader_sees_only_committed_episodes_and_refreshes(small_store):
    path, eps = small_store
    reader = DemoStore.open(path)
    writer = DemoStore.open(path, mode="a")
    w = writer.begin_episode()
    w.add_steps(make_episode(99, 40))  # flushed to disk, not committed
    reader.refresh()
    assert reader.n_episodes == 5
    assert_episode_equal(reader.get_episode(4), eps[4])
    w.end()
    reader.refresh()
    assert reader.n_episodes == 6
    assert_episode_equal(reader.get_episode(5), make_episode(99, 40))


def test_discard_restores_the_store(small_store):
    path, eps = small_store
    s = DemoStore.open(path, mode="a")
    w = s.begin_episode()
    w.add_steps(make_episode(7, 50))
    w.discard()
    assert s.array("img").shape[0] == s.n_steps == sum(len(e["action"]) for e in eps)
    with pytest.raises(RuntimeError):
        with s.begin_episode() as w:
            w.add_steps(make_episode(8, 3))
            raise RuntimeError("operator pressed discard")
    assert s.n_episodes == 5 and s.array("action").shape[0] == s.n_steps


def test_delete_keep_merge(tmp_path, small_store):
    path, eps = small_store
    delete_episodes(path, [1, -1])
    s = DemoStore.open(path)
    assert s.n_episodes == 3
    for new, old in enumerate([0, 2, 3]):
        assert_episode_equal(s.get_episode(new), eps[old])
        assert s.episode_info(new)["notes"] == f"ep{old}"
    s.close()
    keep_episodes(path, [2, 0])
    s = DemoStore.open(path)
    assert [s.episode_info(i)["notes"] for i in range(2)] == ["ep3", "ep0"]
    s.close()
    for twice in ([0, 0], [1, -1]):  # an episode kept twice was copied twice: its weight doubled
        with pytest.raises(ValueError, match=r"small.zarr: episodes \[.*\] given more than once: "):
            keep_episodes(path, twice)
    with DemoStore.open(path) as s:
        assert s.n_episodes == 2

    other = tmp_path / "other.zarr"
    o = DemoStore.create(other, make_schema())
    o.append_episode(make_episode(50, 6), {"notes": "other"})
    o.close()
    m = merge_stores([path, other], tmp_path / "merged.zarr")
    assert m.n_episodes == 3
    assert_episode_equal(m.get_episode(2), make_episode(50, 6))


def test_stores_that_record_different_things_are_not_merged(tmp_path, small_store):
    path, _ = small_store
    base = make_schema()
    deg = {**base.keys, "state": dataclasses.replace(base.keys["state"], units="mm")}
    for change, said in (
        ({"fps": 30}, "fps 30.0 vs 10.0"),
        ({"action_space": ActionSpace(mode="delta")}, "action mode 'delta' vs 'absolute'"),
    ):
        other = tmp_path / f"other{len(said)}.zarr"
        with DemoStore.create(other, dataclasses.replace(make_schema(), **change)) as o:
            o.append_episode(make_episode(50, 6))
        with pytest.raises(
            SchemaError, match=f"other{len(said)}.zarr and .*small.zarr record different things .{said}"
        ):
            merge_stores([path, other], tmp_path / f"merged{len(said)}.zarr")
        assert not (tmp_path / f"merged{len(said)}.zarr").exists()  # refused before anything is written
    # units were not compared: a merged store called every episode's values the first store's units
    with DemoStore.create(tmp_path / "mm.zarr", dataclasses.replace(base, keys=deg)) as o:
        o.append_episode(make_episode(50, 6))
    with pytest.raises(SchemaError, match="key 'state': .*mm.zarr is in 'mm', .*small.zarr in 'm'"):
        merge_stores([path, tmp_path / "mm.zarr"], tmp_path / "merged_mm.zarr")
    for units in ("rad", "deg"):
        space = dataclasses.replace(base.action_space, units=units)
        with DemoStore.create(tmp_path / f"{units}.zarr", dataclasses.replace(base, action_space=space)) as o:
            o.append_episode(make_episode(50, 6))
    with pytest.raises(SchemaError, match="record different things .action units 'deg' vs 'rad'"):
        merge_stores([tmp_path / "rad.zarr", tmp_path / "deg.zarr"], tmp_path / "merged_units.zarr")
    # robot and dimension names were not compared: every episode took the first store's
    with DemoStore.create(tmp_path / "ur5e.zarr", dataclasses.replace(base, robot="ur5e")) as o:
        o.append_episode(make_episode(50, 6))
    with pytest.raises(SchemaError, match="record different things .robot 'ur5e' vs 'test_bot'"):
        merge_stores([path, tmp_path / "ur5e.zarr"], tmp_path / "merged_robot.zarr")
    for name, names in (("a", ("j1", "j2", "j3", "gripper")), ("b", ("gripper", "j1", "j2", "j3"))):
        keys = {**base.keys, "state": dataclasses.replace(base.keys["state"], names=names)}
        with DemoStore.create(tmp_path / f"{name}.zarr", dataclasses.replace(base, keys=keys)) as o:
            o.append_episode(make_episode(50, 6))
    with pytest.raises(
        SchemaError, match=r"key 'state': .*a.zarr names its dimensions \['j1', 'j2', 'j3', 'gripper'\], "
    ):
        merge_stores([tmp_path / "b.zarr", tmp_path / "a.zarr"], tmp_path / "merged_names.zarr")


def test_a_merged_episode_keeps_its_own_task(tmp_path, small_store):
    """Stores of two tasks merged: every episode was read as the first store's task (wm-info, the
    LeRobot export); each now carries its own where it differs."""
    path, _ = small_store
    other = tmp_path / "push.zarr"
    with DemoStore.create(other, dataclasses.replace(make_schema(), task="push the block")) as o:
        o.append_episode(make_episode(50, 6), {"notes": "push"})
        o.append_episode(make_episode(51, 6), {"task": "push it left"})
    with merge_stores([path, other], tmp_path / "merged.zarr") as m:
        assert m.schema.task == "test_task"
        assert [m.episode_info(i).get("task") for i in range(7)] == [None] * 5 + [
            "push the block",
            "push it left",  # an episode's own task stays
        ]
        assert m.episode_info(5)["notes"] == "push"


def test_a_store_reached_through_a_symbolic_link_is_rewritten_where_it_is(tmp_path, small_store):
    """Stores kept on a scratch disk and linked into a project: a rewrite renamed the link and failed on
    rmtree of it, and every later open of the path failed on the leftover link (a traceback)."""
    path, episodes = small_store
    link = tmp_path / "project" / "demos.zarr"
    link.parent.mkdir()
    link.symlink_to(path)
    delete_episodes(link, [0])
    assert link.is_symlink() and sorted(p.name for p in link.parent.iterdir()) == ["demos.zarr"]
    with DemoStore.open(link) as s:
        assert s.n_episodes == 4
        assert_episode_equal(s.get_episode(0), episodes[1])
    DemoStore.create(link, make_schema(), overwrite=True).close()
    assert link.is_symlink() and DemoStore.open(path).n_episodes == 0


def test_a_zip_store_is_not_rewritten(tmp_path, small_store):
    path, _ = small_store
    archive = shutil.make_archive(str(tmp_path / "small"), "zip", path)
    with pytest.raises(NotAStoreError, match="zip stores are read-only; unzip it"):
        delete_episodes(archive, [0])
    with DemoStore.open(archive) as s:  # untouched (the rewrite used to leave a directory in its place)
        assert s.n_episodes == 5


def test_a_store_killed_while_being_created_is_not_half_there(tmp_path, monkeypatch):
    path = tmp_path / "new.zarr"

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # as a SIGKILL would stop it, before the schema is written

    monkeypatch.setattr(zarr.core.attributes.Attributes, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        DemoStore.create(path, make_schema())
    monkeypatch.undo()
    assert not path.exists()  # so resuming creates it afresh, not a store without its schema
    with DemoStore.create(path, make_schema()) as s:
        s.append_episode(make_episode(0, 3))
    assert DemoStore.open(path).schema == make_schema()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zarr"]


def test_a_create_that_fails_leaves_nothing_beside_the_store(tmp_path, monkeypatch):
    """A failure while the arrays were made (a dtype or key name zarr refused) left `<store>.wm-create`
    behind; beside a converter's per-process destination a new one for every run, never removed."""

    def refused(*_a, **_k):
        raise ValueError("zarr refused it")

    monkeypatch.setattr(zarr.Group, "create_array", refused)
    with pytest.raises(ValueError, match="zarr refused it"):
        DemoStore.create(tmp_path / "new.zarr", make_schema())
    assert list(tmp_path.iterdir()) == []


MADE_MEANWHILE = """
import sys
from conftest import make_episode, make_schema
from wm.data import DemoStore
with DemoStore.create(sys.argv[1], make_schema()) as s:
    s.append_episode(make_episode(7, 5))
"""


def test_a_store_that_does_not_open_names_the_command_that_lists_its_damage(tmp_path):
    """A data array shorter than the episodes it holds was a bare line ("has 12 steps but episodes end at
    15") in every app but wm-info: nothing said what to run next."""
    path = tmp_path / "s.zarr"
    with DemoStore.create(path, make_schema()) as s:
        for i in range(3):
            s.append_episode(make_episode(i, 5))
    action = zarr.open_group(path, mode="r+")["data"]["action"]
    action.resize((12, *action.shape[1:]))
    with pytest.raises(CorruptStoreError) as e:
        DemoStore.open(path)
    assert str(e.value) == (
        f"{path}/data/action: has 12 steps but episodes end at 15; list all damage with: wm-info "
        f"store={path} verify=true"
    )


def test_two_creates_of_one_path_at_once_keep_the_first_store_made(tmp_path, monkeypatch):
    """Two wm-collect sessions started together on a new store: both built in `<store>.wm-create`, each
    deleting the other's, and a check-then-rename let the second replace the first's store (its
    episodes gone) or fail with zarr's internal errors. Another process makes the store while this one
    builds: this one is refused in one line and the other's store, with its episode, stays."""
    path, build = tmp_path / "new.zarr", DemoStore._build

    def meanwhile(*args, **kwargs):
        written = build(*args, **kwargs)
        res = subprocess.run([sys.executable, "-c", MADE_MEANWHILE, str(path)], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return written

    monkeypatch.setattr(DemoStore, "_build", meanwhile)
    with pytest.raises(FileExistsError, match="another process made it just now; open it with"):
        DemoStore.create(path, make_schema())
    with DemoStore.open(path) as s:
        assert s.n_episodes == 1 and s.episode_lengths().tolist() == [5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zarr"]


def _action_named(name: str) -> Schema:
    return Schema(keys={name: KeySpec((2,), "float32", "action")}, fps=10)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        (lambda: KeySpec((2,), "U4", "lowdim"), "dtype <U4 is not a number or bool type"),
        (lambda: KeySpec((0,), "float32", "lowdim"), "per-step shape (0,) holds no values; leave the key"),
        (lambda: KeySpec((3, 0), "uint8", "lowdim"), "per-step shape (3, 0) holds no values"),
        (lambda: _action_named(".."), "key name '..' is a name zarr keeps for itself"),
        (lambda: _action_named("zarr.json"), "key name 'zarr.json' is a name zarr keeps"),
        # a LeRobot info.json declaring it: a 63 TiB allocation before the first frame was decoded
        (lambda: KeySpec((10**6, 10**6, 3), "uint8", "image"), r"holds 3,000,000,000,000 values, more than"),
    ],
    ids=["string", "zero-size", "zero-size-2d", "dotdot", "zarr.json", "huge"],
)
def test_a_schema_refuses_keys_a_store_cannot_hold(spec, said):
    """Each was accepted: zarr then failed half-way through creating the store, or (no values per step)
    wrote no chunk, so the healthy store read as damaged and `verify` offered to drop every episode."""
    with pytest.raises(SchemaError, match=re.escape(said)):
        spec()


REPLACE_KILLED = """
import os, shutil, signal, sys
from pathlib import Path
from conftest import make_schema
from wm.data import DemoStore
real, dst = shutil.rmtree, Path(sys.argv[1]).resolve()
def rmtree(path, *a, **k):
    path = Path(path)
    old = path.resolve() == dst or ".wm-create" in path.name and (path / "data").is_dir()
    if old:  # the replaced store is being deleted (zarr clears the new one's folder as it starts)
        real(path / "data", *a, **k)  # part of it is gone...
        os.kill(os.getpid(), signal.SIGKILL)  # ...when the process is killed
    return real(path, *a, **k)
shutil.rmtree = rmtree
DemoStore.create(sys.argv[1], make_schema(), overwrite=True).close()
"""


def replace_killed(script: str, path: Path) -> None:
    """Run `script` (a replace of the store at `path` that kills itself part-way) in a process of its own;
    it must end on its SIGKILL."""
    res = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120,
    )  # fmt: skip
    assert res.returncode == -signal.SIGKILL, res.stderr


def test_a_replace_killed_while_deleting_the_old_store_leaves_the_new_one(small_store):
    """The old store was deleted in place before the new one was renamed in: a kill during the delete
    (seconds, for a large store) left the path half deleted, and the finished new one hidden beside it."""
    path, _ = small_store
    replace_killed(REPLACE_KILLED, path)
    with DemoStore.open(path) as store:  # the new, empty store
        assert store.n_episodes == 0 and store.schema == make_schema()
    DemoStore.create(path, make_schema(), overwrite=True).close()  # the next run clears what was left
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


REPLACE_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from conftest import make_schema
import wm.data.places
from wm.data import DemoStore
real, dst = os.replace, Path(sys.argv[1]).resolve()
def replace(src, to):
    real(src, to)
    if Path(src) == dst:  # the old store renamed aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
wm.data.places.exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE
DemoStore.create(sys.argv[1], make_schema(), overwrite=True).close()
"""


def test_a_replace_killed_between_its_renames_loses_neither_copy(small_store):
    """Where the filesystem cannot exchange two paths in one step, the old store is renamed aside and
    the new one renamed in: a kill between the two left no store at the path, and the next run's
    cleanup removed both hidden copies. The old one is now put back by the next open or create."""
    path, eps = small_store
    replace_killed(REPLACE_KILLED_BETWEEN_RENAMES, path)
    assert not path.exists()
    with DemoStore.open(path) as store:  # the old store, whole: the replace never finished
        assert store.n_episodes == len(eps)
        assert_episode_equal(store.get_episode(1), eps[1])
    DemoStore.create(path, make_schema(), overwrite=True).close()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_exchange_swaps_two_paths_of_either_kind(tmp_path):
    from wm.data.places import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").write_text("b")
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem cannot exchange two paths in one step")
    assert (tmp_path / "a").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    with pytest.raises(OSError, match="cannot exchange"):
        exchange(tmp_path / "a", tmp_path / "missing")


def test_refused_delete_leaves_the_store_as_it_was(small_store):
    path, eps = small_store
    with pytest.raises(ValueError, match=r"episodes \[5\] out of range"):
        delete_episodes(path, [5])  # used to wrap around to episode 0
    chunk = path / "data" / "img" / "c" / "8" / "0" / "0" / "0"  # episode 1
    chunk.write_bytes(chunk.read_bytes()[:50])
    with pytest.raises(CorruptStoreError, match="episode 1"):
        delete_episodes(path, [0])  # episode 1 would be copied
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.zarr"]
    delete_episodes(path, [1])
    with DemoStore.open(path) as s:
        assert s.n_episodes == 4
        assert_episode_equal(s.get_episode(1), eps[2])


def test_interrupted_keep_swap_is_completed_on_open(small_store):
    path, eps = small_store
    # Simulate a crash between keep_episodes' two renames: the new store is complete beside the old.
    keep_episodes(path, [0, 1])
    old = path.with_name(path.name + ".wm-old")
    new = path.with_name(path.name + ".wm-new")
    path.rename(new)
    store = DemoStore.create(old, make_schema())
    store.close()
    s = DemoStore.open(path)
    assert s.n_episodes == 2 and not old.exists() and not new.exists()


def test_a_reader_opening_the_store_mid_rewrite_neither_fails_nor_breaks_the_rewrite(
    small_store, monkeypatch
):
    """A reader's open between the rewrite's two renames finishes the swap itself (its finish_swap), and
    one while the old copy is being removed must not delete it under the writer: the rewrite still
    succeeds, the reader sees a whole store each time, and nothing is left beside the store."""
    import os

    path, eps = small_store
    old = path.with_name(path.name + ".wm-old")
    real, seen = os.replace, []

    def replace(src, dst):
        real(src, dst)
        if os.fspath(dst) == os.fspath(old) or os.fspath(dst).endswith(".wm-trash"):
            with DemoStore.open(path) as s:  # another process opening the store at this moment
                seen.append(s.n_episodes)

    monkeypatch.setattr(os, "replace", replace)
    delete_episodes(path, [0])
    monkeypatch.undo()
    assert seen == [4, 4]  # the new store each time (5 episodes less the deleted one)
    with DemoStore.open(path) as s:
        assert s.n_episodes == 4
        assert_episode_equal(s.get_episode(0), eps[1])
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.zarr"]


def test_a_store_dropped_without_close_releases_its_writer_lock_at_once(tmp_path):
    """Its chunk readers held a bound method of the store: a cycle, so the lock stayed until the garbage
    collector ran, and `DemoStore.open(path, mode="a")` after rebinding the variable was refused."""
    import gc

    path = tmp_path / "d.zarr"
    gc.disable()
    try:
        store = DemoStore.create(path, make_schema())
        store.append_episode(make_episode(0, 5))
        store = DemoStore.open(path)  # the writer is dropped here, not closed
        with DemoStore.open(path, mode="a") as again:
            assert again.n_episodes == 1 and store.n_episodes == 1
    finally:
        gc.enable()


def test_an_old_copy_a_dead_process_was_removing_is_cleared_on_open(small_store):
    path, _ = small_store
    dead = path.with_name(f"{path.name}.999999999.wm-trash")  # no process has this id
    shutil.copytree(path, dead)
    live = path.with_name(f"{path.name}.1.wm-trash")  # pid 1 is alive: its removal is its own
    live.mkdir()
    DemoStore.open(path).close()
    assert not dead.exists() and live.exists()


def test_a_reader_that_cannot_clear_leftovers_still_reads(small_store, monkeypatch):
    """A read-only directory (another user's, a read-only mount): leftovers of a rewrite stay, and the
    store opens."""
    import errno
    import os

    path, _ = small_store
    dead = path.with_name(f"{path.name}.999999999.wm-trash")
    old = path.with_name(path.name + ".wm-old")
    dead.mkdir()
    old.mkdir()

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(os, "replace", read_only)
    with DemoStore.open(path) as s:
        assert s.n_episodes == 5
    assert dead.exists() and old.exists()


# ---------------------------------------------------------------------- bad input
def test_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="no such store"):
        DemoStore.open(tmp_path / "missing.zarr")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(NotAStoreError, match="junk"):
        DemoStore.open(tmp_path / "junk")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(NotAStoreError, match="episode_ends"):
        DemoStore.open(tmp_path / "plain.zarr")


def test_missing_declared_key(small_store):
    path, _ = small_store
    import shutil

    shutil.rmtree(path / "data" / "state")
    with pytest.raises(SchemaError, match="'state'"):
        DemoStore.open(path)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ep: ep.update(action=ep["action"][:, :1]), r"key 'action': shape \(1,\) != schema \(2,\)"),
        (lambda ep: ep.update(img=ep["img"].astype(np.float32)), "key 'img': dtype float32 != schema uint8"),
        (  # a narrower type takes only values that fit (300 used to be stored as 44)
            lambda ep: ep.update(img=ep["img"].astype(np.uint16) + 256),
            r"key 'img': uint16 value \d+ does not fit the schema's uint8",
        ),
        (
            lambda ep: ep.update(action=ep["action"].astype(np.float64) * 1e40),
            "key 'action': float64 value .* does not fit the schema's float32",
        ),
        (
            lambda ep: ep["action"].__setitem__((3, 1), np.nan),  # the episode was not named
            "episode 5, key 'action' has non-finite values .first at step 3",
        ),
        (lambda ep: ep["state"].__setitem__((0, 0), np.inf), "key 'state' has non-finite"),
        (lambda ep: ep.pop("state"), r"missing \['state'\]"),
        (lambda ep: ep.update(extra=np.zeros(len(ep["action"]))), r"unknown \['extra'\]"),
        (lambda ep: ep.update(action=ep["action"][:-1]), "different lengths"),
        (lambda ep: ep.update(action=1.0), "key 'action': a single value 1.0, expected"),  # was a TypeError
    ],
)
def test_bad_append_is_refused_and_damages_nothing(small_store, mutate, match):
    path, eps = small_store
    s = DemoStore.open(path, mode="a")
    bad = make_episode(123, 8)
    mutate(bad)
    with pytest.raises(AppendError, match=match):
        s.append_episode(bad)
    assert s.n_episodes == 5
    s.append_episode(make_episode(124, 3))  # the store still takes good episodes
    s.close()
    r = DemoStore.open(path)
    assert r.n_episodes == 6 and r.array("img").shape[0] == r.n_steps
    for i, ep in enumerate(eps):
        assert_episode_equal(r.get_episode(i), ep)


def test_nan_step_is_refused_before_buffering(small_store):
    path, _ = small_store
    s = DemoStore.open(path, mode="a")
    w = s.begin_episode()
    step = {k: v[0] for k, v in make_episode(1, 1).items()}
    w.add_step(step)
    step["action"] = np.array([np.nan, 0.0], dtype=np.float32)
    with pytest.raises(
        AppendError, match=r"episode 5, key 'action' has non-finite values \(first at step 1\)"
    ):
        w.add_step(step)
    assert w.n_steps == 1


def test_unserializable_info_is_refused(small_store):
    path, _ = small_store
    s = DemoStore.open(path, mode="a")
    with pytest.raises(
        AppendError, match=r"info is not usable: .*not JSON serializable; nothing was written$"
    ):
        s.append_episode(make_episode(1, 3), {"bad": object()})  # it said to call end() again
    assert s.n_episodes == 5 and s.array("img").shape[0] == s.n_steps


def test_a_streamed_episode_survives_info_that_is_not_plain_json(small_store):
    """A streamed episode ended with numpy values (what `is_success()` returns) was discarded whole, and
    the writer could not be ended again: the demonstration was lost. They are converted; info that
    cannot be is refused before anything is dropped, and end() can be called again."""
    path, _ = small_store
    s = DemoStore.open(path, mode="a")
    ep = make_episode(7, 40)
    w = s.begin_episode()
    for t in range(40):
        w.add_step({k: v[t] for k, v in ep.items()})
    assert w.end({"success": np.bool_(True), "score": np.float32(0.5), "xy": np.zeros(2)}) == 5
    assert s.episode_info(5) == {"length": 40, "success": True, "score": 0.5, "xy": [0.0, 0.0]}
    w = s.begin_episode()
    w.add_steps(ep)
    with pytest.raises(AppendError, match="kept open: call end"):
        w.end({"bad": object()})
    assert w.end({"success": False}) == 6
    s.close()
    r = DemoStore.open(path)
    assert r.n_episodes == 7
    assert_episode_equal(r.get_episode(5), ep)
    assert_episode_equal(r.get_episode(6), ep)


def disk_full_once(monkeypatch, prefix: str) -> list[str]:
    """Make the disk refuse (ENOSPC) the first file written whose name in the store starts with `prefix`;
    the list returned gets that name."""
    original, hit = LocalStore.set, []

    async def full(self, key, value):
        if not hit and key.startswith(prefix):
            hit.append(key)
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full)
    return hit


@pytest.mark.parametrize(
    "full",
    [
        "data/state/c/",  # a chunk of the second key flushed ("img" is written before it)
        "data/state/zarr.json",  # its resize
        "zarr.json",  # the commit record, written once every step is
    ],
)
def test_end_again_after_the_disk_filled_up_commits_the_whole_episode(small_store, monkeypatch, full):
    """The disk filled up while end() flushed the episode: each key's buffered steps were dropped once
    that key was written, and end() called again, once there was space, raised "need at least one array
    to concatenate": the episode could only be discarded. Every step is kept until all keys are written."""
    path, eps = small_store
    s = DemoStore.open(path, mode="a")
    ep = make_episode(7, 20)  # fewer than a flush: end() writes them all
    w = s.begin_episode()
    w.add_steps(ep)
    hit = disk_full_once(monkeypatch, full)
    with pytest.raises(OSError, match="No space left on device"):
        w.end({"success": True})
    assert hit and s.n_episodes == 5 and w.n_steps == 20
    assert w.end({"success": True}) == 5
    s.close()
    r = DemoStore.open(path)
    assert r.n_episodes == 6 and all(r.array(k).shape[0] == r.n_steps for k in r.keys)
    for i, want in enumerate([*eps, ep]):
        assert_episode_equal(r.get_episode(i), want)
    assert r.episode_info(5) == {"length": 20, "success": True}


@pytest.mark.parametrize("failed_in", ["end", "add_steps"])
def test_steps_added_after_the_disk_filled_up_are_kept_with_the_earlier_ones(
    small_store, monkeypatch, failed_in
):
    """The disk filled up while a flush wrote "state": "img" had dropped its buffered steps but the step
    count stood still, so the next flush wrote the later steps of "img" over the earlier ones (one more
    step: the episode was committed with it in every row of "img"; several: a broadcast ValueError).
    The steps that failed stay buffered and are written with the later ones, each in its own row."""
    path, eps = small_store
    s = DemoStore.open(path, mode="a")
    ep = make_episode(7, 45)  # 45 steps crosses the streaming flush size
    first = 5 if failed_in == "end" else 40
    w = s.begin_episode()
    w.add_steps({k: v[:5] for k, v in ep.items()})
    hit = disk_full_once(monkeypatch, "data/state/c/")
    with pytest.raises(OSError, match="No space left on device"):
        if failed_in == "end":
            w.end()
        else:  # past the flush size: flushed at once
            w.add_steps({k: v[5:first] for k, v in ep.items()})
    assert hit and s.n_episodes == 5 and w.n_steps == first  # the steps being added are kept too
    w.add_step({k: v[first] for k, v in ep.items()})
    w.add_steps({k: v[first + 1 :] for k, v in ep.items()})  # another flush
    assert w.end() == 5
    s.close()
    r = DemoStore.open(path)
    assert r.n_episodes == 6 and all(r.array(k).shape[0] == r.n_steps for k in r.keys)
    for i, want in enumerate([*eps, ep]):
        assert_episode_equal(r.get_episode(i), want)


def test_unreadable_array_metadata_names_the_key(small_store):
    """A zero-length data/<key>/zarr.json (a power cut, an interrupted copy): opening the store raised a
    bare JSONDecodeError, and `wm-info verify=true` printed only "Expecting value: line 1 column 1"."""
    from wm.data.verify import format_report, verify_store

    path, _ = small_store
    (path / "data" / "state" / "zarr.json").write_text("")
    with pytest.raises(CorruptStoreError, match=r"small.zarr/data/state: its metadata cannot be read"):
        DemoStore.open(path)
    assert "data/state: its metadata cannot be read" in format_report(verify_store(path))


def test_truncated_chunk_gives_clear_error(small_store):
    path, _ = small_store
    chunk = path / "data" / "img" / "c" / "8" / "0" / "0" / "0"  # step 8 lies in episode 1
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 3])
    s = DemoStore.open(path)
    s.get_episode(0)  # untouched episodes still read
    with pytest.raises(CorruptStoreError, match=r"data/img.*episode 1"):
        s.get_episode(1)
    with pytest.raises(CorruptStoreError, match=r"chunk 8"):
        ChunkReader.for_array(s.array("img")).rows(np.array([8]))


def test_read_only_store_refuses_writes(small_store):
    path, _ = small_store
    with pytest.raises(PermissionError, match="read-only"):
        DemoStore.open(path).begin_episode()


def test_bad_schema_values():
    with pytest.raises(SchemaError, match="kind"):
        Schema.from_dict({"keys": {"x": {"shape": [2], "dtype": "float32", "kind": "video"}}})
    with pytest.raises(SchemaError, match="fps"):
        Schema.from_dict({"keys": {"x": {"shape": [2], "dtype": "float32", "kind": "action"}}, "fps": -1})
    with pytest.raises(SchemaError, match="newer"):
        Schema.from_dict(
            {"keys": {"x": {"shape": [2], "dtype": "f4", "kind": "action"}}, "format_version": 99}
        )
    d = make_schema().to_dict()
    assert Schema.from_dict(json.loads(json.dumps(d))) == make_schema()


def test_fingerprint_follows_the_committed_content(small_store):
    path, _ = small_store
    with DemoStore.open(path) as store:
        before = store.fingerprint
    with DemoStore.open(path) as store:
        assert store.fingerprint == before  # stable across opens
    with DemoStore.open(path, mode="a") as store:
        store.append_episode(make_episode(9, 5), {"success": False})
        assert store.fingerprint != before


def test_a_store_is_never_written_over_one_of_its_sources(tmp_path, small_store):
    """merge_stores / strip_actions into one of their sources with overwrite=True deleted the source
    before reading it (the call then failed on missing chunks, the source left empty)."""
    from wm.data.mixture import strip_actions

    path, episodes = small_store
    other = tmp_path / "other.zarr"
    merge_stores([path], other).close()
    for call in (
        lambda: merge_stores([path, other], path, overwrite=True),
        lambda: merge_stores([other, path], tmp_path / "." / "small.zarr", overwrite=True),
        lambda: strip_actions(path, path, overwrite=True),
    ):
        with pytest.raises(ValueError, match="is also a source of this store"):
            call()
    with DemoStore.open(path) as s:
        assert s.n_episodes == 5
        assert_episode_equal(s.get_episode(4), episodes[4])


def test_a_second_writer_is_refused_while_one_is_writing(small_store):
    """Opening a store for writing repairs what a crashed writer left: a second process doing so while
    another streamed an episode truncated that episode's flushed steps (its commit then pointed at
    missing chunks). Another writer, a rewrite or a replacement is refused in one line, in any process,
    until the writer closes; readers are not."""
    import subprocess
    import sys

    from wm.data import StoreBusyError

    path, _ = small_store
    writer = DemoStore.open(path, mode="a")
    ep = make_episode(9, 40)
    w = writer.begin_episode()
    w.add_steps(ep)
    w._flush()  # its steps are on disk, not yet committed
    other = [sys.executable, "-c", f"from wm.data import DemoStore; DemoStore.open({str(path)!r}, mode='a')"]
    res = subprocess.run(other, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "StoreBusyError" in res.stderr and "another writer" in res.stderr
    for call in (
        lambda: DemoStore.open(path, mode="a"),
        lambda: delete_episodes(path, [0]),
        lambda: DemoStore.create(path, make_schema(), overwrite=True),
    ):
        with pytest.raises(StoreBusyError, match="another writer has this store open"):
            call()
    with DemoStore.open(path) as reader:
        assert reader.n_episodes == 5
    assert w.end() == 5
    writer.close()
    with DemoStore.open(path, mode="a") as again:  # the writer closed: free
        assert again.n_episodes == 6
        assert_episode_equal(again.get_episode(5), ep)


def test_a_filesystem_without_locks_still_takes_writes_with_a_warning(small_store, monkeypatch):
    """Some NFS / FUSE mounts refuse flock (ENOLCK): the store is written unguarded, and says so."""
    import errno

    import wm.locks  # the store's writer lock is a `wm.locks.PathLock`

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(wm.locks.fcntl, "flock", no_locks)
    path, _ = small_store
    with pytest.warns(UserWarning, match="cannot lock the store .*No locks available"):
        s = DemoStore.open(path, mode="a")
    s.append_episode(make_episode(9, 3))
    s.close()
    assert DemoStore.open(path).n_episodes == 6


def test_overwrite_replaces_only_a_store(tmp_path, small_store):
    """`overwrite=True` (wm-convert, the sample store) deletes what is at the path: only ever a store or
    an empty folder, never a user's folder of other files given as the path by mistake."""
    mine = tmp_path / "mydata"
    (mine / "runs").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mydata: exists and is not a zarr store; refusing to replace"):
        DemoStore.create(mine, make_schema(), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "runs").is_dir()
    path, _ = small_store
    (path / "best.pt").write_bytes(b"a run's weights")  # a store folder holding other files: they were
    for replace in (  # deleted with it, where wm-info drop_episodes refuses to
        lambda: DemoStore.create(path, make_schema(), overwrite=True),
        lambda: check_destination(path, overwrite=True, sources=[]),  # every converter's destination
    ):
        with pytest.raises(ValueError) as info:
            replace()
        assert str(info.value) == (
            f"{path}: holds files that are not the store's (best.pt); overwrite=true would delete them: "
            "move them out of the store first"
        )
    assert (path / "best.pt").is_file() and DemoStore.open(path).n_episodes > 0
    (path / "best.pt").unlink()
    with DemoStore.create(path, make_schema(), overwrite=True) as store:  # a store: replaced
        assert store.n_episodes == 0
    (tmp_path / "empty").mkdir()
    DemoStore.create(tmp_path / "empty", make_schema(), overwrite=True).close()
    archive = shutil.make_archive(str(tmp_path / "zipped"), "zip", path)  # a zip store: replaced too
    with DemoStore.create(archive, make_schema(), overwrite=True) as store:
        assert store.n_episodes == 0 and (tmp_path / "zipped.zip").is_dir()


# ---------------------------------------------------------------------- a converter's destination
def test_two_conversions_to_one_destination_write_apart(tmp_path):
    """Every converter wrote its result at one hidden path beside the destination and cleared it
    first: a second conversion to the same path deleted the first's work in progress (or both wrote
    into it). Each process now has its own; a dead process's leftovers are cleared, a live one's kept."""
    import os
    import subprocess
    import sys

    from wm.data.places import beside

    dst = tmp_path / "out.zarr"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = tmp_path / f".out.zarr.converting.{int(done.stdout)}"  # a process that has ended
    live = tmp_path / ".out.zarr.converting.1"  # init: always running
    other = tmp_path / ".other.zarr.converting.999999999"
    for path in (dead, live, other):
        path.mkdir()
    mine = beside(dst, "converting")
    assert mine == tmp_path / f".out.zarr.converting.{os.getpid()}"
    assert not dead.exists() and live.exists() and other.exists()


def test_a_converter_never_replaces_a_store_being_written_its_own_source_or_a_zip_store(tmp_path):
    """wm-convert's overwrite replaced a store a writer had open (its recording then corrupted the new
    one), deleted a source that sat inside the destination, and wrote a folder named *.zip (over a zip
    store, too), which nothing could read after."""
    pytest.importorskip("h5py")
    from test_convert_robomimic import write_robomimic

    from wm.data.convert.lerobot import store_to_lerobot
    from wm.data.convert.robomimic import robomimic_to_store
    from wm.data.errors import NotAStoreError, StoreBusyError

    src = tmp_path / "lift.hdf5"
    write_robomimic(src, images=False)
    store = tmp_path / "collect.zarr"
    robomimic_to_store(src, store).close()
    with DemoStore.open(store, mode="a"):  # a writer (wm-collect) has it open
        with pytest.raises(StoreBusyError, match="another writer has this store open"):
            robomimic_to_store(src, store, overwrite=True)
    assert DemoStore.open(store).n_episodes == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collect.zarr", "lift.hdf5"]  # nothing left
    with pytest.raises(ValueError, match="is inside the source"):  # a rewrite of the store deleted it
        store_to_lerobot(store, tmp_path / "collect.zarr" / "export")
    export = tmp_path / "export"
    store_to_lerobot(store, export)
    with pytest.raises(ValueError, match="is or holds the source"):
        store_to_lerobot(store, tmp_path, overwrite=True)  # tmp_path holds the store
    with pytest.raises(ValueError, match="is or holds the source"):
        robomimic_to_store(src, tmp_path, overwrite=True)
    assert src.is_file() and (export / "meta" / "info.json").is_file()
    assert not (tmp_path / "collect.zarr" / "export").exists()
    with pytest.raises(NotAStoreError, match="zip stores are read-only"):
        robomimic_to_store(src, tmp_path / "new.zip")
    assert not (tmp_path / "new.zip").exists()


def test_a_commit_does_not_rewrite_every_episodes_info(tmp_path):
    """The commit record was the list of every episode's info in the root attributes, rewritten whole at
    each commit: a store's appends cost more the more episodes it held (24 ms to 46 ms a short episode
    between episodes 1-100 and 501-600 in wm-collect). Now a commit rewrites one chunk of info entries
    and the root attributes, whose size does not grow with the store."""
    path = tmp_path / "s.zarr"
    info = {"seed": 0, "success": True, "notes": "x" * 40}
    with DemoStore.create(path, make_schema()) as store:
        store.append_episode(make_episode(0, 2), info)
        first = (path / "zarr.json").stat().st_size
        for i in range(1, 12):
            store.append_episode(make_episode(i, 2), {**info, "seed": i})
        assert (path / "zarr.json").stat().st_size - first <= 1  # the count's digits
    with DemoStore.open(path) as store:
        assert [store.episode_info(i)["seed"] for i in range(12)] == list(range(12))
        assert store.episode_info(3) == {"length": 2, **info, "seed": 3}
        assert store.schema.format_version == 2


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_format_1_store_reads_as_it_is_and_moves_to_format_2_when_appended_to(tmp_path, zarr_format):
    path = tmp_path / "old.zarr"
    with DemoStore.create(path, make_schema(), zarr_format=zarr_format) as store:
        for i in range(3):
            store.append_episode(make_episode(i, 4 + i), {"seed": i, "success": i % 2 == 0})
    with DemoStore.open(path) as store:
        fingerprint = store.fingerprint
    as_format_1(path)
    with DemoStore.open(path) as old:  # read-only: nothing is written
        assert old.n_episodes == 3 and old.episode_info(2) == {"length": 6, "seed": 2, "success": True}
        assert old.fingerprint == fingerprint and old.schema.format_version == 1
    with DemoStore.open(path, mode="a") as store:  # opened for appending, nothing appended (refused)
        assert store.fingerprint == fingerprint
    assert "wm_episodes" in zarr.open_group(str(path), mode="r").attrs  # still what older code reads
    with DemoStore.open(path, mode="a") as store:
        store.append_episode(make_episode(3, 2), {"seed": 3})
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    assert "wm_episodes" not in attrs and attrs["wm_committed"] == 4
    assert attrs["wm_schema"]["format_version"] == 2
    with DemoStore.open(path) as store:
        assert [store.episode_info(i)["seed"] for i in range(4)] == [0, 1, 2, 3]
        assert store.episode_info(1) == {"length": 5, "seed": 1, "success": False}
        assert_episode_equal(store.get_episode(3), make_episode(3, 2))
    if zarr_format == 2:  # still the layout Diffusion Policy's zarr 2 loader reads: data/ and meta/ alone
        assert sorted(group["meta"].array_keys()) == ["episode_ends"]


def test_a_migration_a_crash_cut_short_is_made_again(small_store):
    """The info array is written before the root attributes switch to it: a kill between the two leaves a
    format 1 store with a stray array, which the next append writes again."""
    path, _ = small_store
    as_format_1(path)
    group = zarr.open_group(str(path), mode="r+")
    group.create_array("wm_episode_info", shape=(2,), chunks=(256,), dtype=str)[:] = np.array(
        ["{}", "x"], object
    )
    with DemoStore.open(path) as store:  # a reader goes by the root attributes
        assert store.episode_info(1)["length"] == 8
        infos = [store.episode_info(i) for i in range(store.n_episodes)]
    with DemoStore.open(path, mode="a") as store:
        assert [store.episode_info(i) for i in range(store.n_episodes)] == infos
        store.append_episode(make_episode(9, 2), {"seed": 9})
    with DemoStore.open(path) as store:
        assert [store.episode_info(i) for i in range(store.n_episodes)] == [*infos, {"length": 2, "seed": 9}]


def _lose_info_chunk(path) -> None:
    (path / "wm_episode_info" / "c" / "0").unlink()


def _garble_info_chunk(path) -> None:
    chunk = path / "wm_episode_info" / "c" / "0"
    chunk.write_bytes(b"\x00" * len(chunk.read_bytes()))


def _set_count(count) -> Callable:
    return lambda p: zarr.open_group(str(p), mode="r+").attrs.update({"wm_committed": count})


@pytest.mark.parametrize(
    "damage, said, kept",
    [
        (
            lambda p: zarr.open_group(str(p), mode="r+")["wm_episode_info"].resize((3,)),
            "wm_episode_info: has 3 entries but 5 episodes are committed",
            3,
        ),
        (
            _lose_info_chunk,
            "wm_episode_info: the entries of episodes 0-4 are empty (chunk 0: a lost file)",
            0,
        ),
        (_garble_info_chunk, "wm_episode_info: chunk 0 (episodes 0-4) cannot be decoded", 0),
        (lambda p: shutil.rmtree(p / "wm_episode_info"), "wm_episode_info: cannot be read (KeyError", 0),
        # the count damaged, every info entry intact: they are kept (the repair threw them all away)
        (_set_count("5"), "the commit count wm_committed is '5', not a count", 5),
        # a count above what is there: the episodes that are there, their info too (it built [{}] * 2**62)
        (_set_count(6), "wm_episode_info: has 5 entries but 6 episodes are committed", 5),
        (_set_count(2**62), f"wm_episode_info: has 5 entries but {2**62} episodes are committed", 5),
    ],
)
def test_a_damaged_commit_record_is_one_line_and_the_rewrite_it_names_repairs_it(
    small_store, damage, said, kept
):
    path, eps = small_store
    with DemoStore.open(path) as store:
        infos = [store.episode_info(i) for i in range(len(eps))]
    damage(path)
    with pytest.raises(CorruptStoreError, match=re.escape(said)) as e:
        DemoStore.open(path)
    assert "\n" not in str(e.value) and "drop_episodes=[]" in str(e.value)
    from wm.data.verify import verify_store

    report = verify_store(path)
    assert not report.ok and any(p.what == "commit record" and said in p.detail for p in report.problems)
    delete_episodes(path, [])  # the repair named: every episode's steps kept, the info that can be read too
    with DemoStore.open(path) as store:
        assert store.n_episodes == len(eps)
        lengths = [{"length": len(ep["action"])} for ep in eps]
        assert [store.episode_info(i) for i in range(len(eps))] == infos[:kept] + lengths[kept:]
        assert_episode_equal(store.get_episode(4), eps[4])


@pytest.mark.parametrize("folder", ["my demos", "it's [v2], a=b"])
def test_the_named_rewrite_runs_as_pasted(tmp_path, folder):
    """A store in a folder with a space: the damaged commit record's message named the rewrite with the
    path unquoted (verify's report quoted it for the shell), so the pasted command split the path in
    two; a quote, comma, bracket or `=` in it then failed Hydra's parsing of the override, quoted or not."""
    from apps import run_app

    from wm.data.verify import verify_store

    path = tmp_path / folder / "s.zarr"
    with DemoStore.create(path, make_schema()) as store:
        store.append_episode(make_episode(0, 7))
    _set_count("1")(path)
    with pytest.raises(CorruptStoreError) as e:
        DemoStore.open(path)
    named = str(e.value).rsplit("every episode (info that cannot be read is left empty): ", 1)[1]
    assert named == verify_store(path).repair_command()
    argv = shlex.split(named)
    assert argv[0] == "wm-info" and argv[-1] == "drop_episodes=[]"
    res = run_app(*argv, "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    with DemoStore.open(path) as store:
        assert store.n_episodes == 1


def test_a_path_in_a_named_command_reads_back_exactly():
    """`wm.options.override` (the store's repair commands, wm-train's "wm-eval checkpoint=..." lines): a
    path Hydra would misread unquoted (quotes, commas, brackets, `=`, `~`, outer spaces, backslashes
    before a quote, non-ASCII) reads back exactly through Hydra's override parser; a plain one stays bare."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from wm.options import override

    parser = OverridesParser.create()
    names = ["/x/plain-1.zarr", "/x/my demos", " lead", "/x/it's", '/x/say "hi"', "/x/a,b=c", "/x/x[1]"]
    names += ["/x/~t", "/x/a{b}#c", "/x/ä ö", "/x/a\\b", "/x/end\\", "/x/q\\'", "/x/$HOME", "/x/a(b)"]
    for name in names:
        (arg,) = shlex.split(shlex.join([override("+model.latent.path", name)]))
        assert parser.parse_override(arg).value() == name, (name, arg)
    assert override("store", "/x/plain-1.zarr") == "store=/x/plain-1.zarr"


def test_a_store_whose_schema_attribute_was_lost_is_adopted_with_its_episode_info(small_store):
    """Another tool rewrote the root attributes without the schema: adopting the store wrote no schema
    (the commit count was there, so nothing was written) and put lengths in place of the episodes' info."""
    path, eps = small_store
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    del attrs["wm_schema"]
    group.attrs.put(attrs)
    with DemoStore.open(path) as store:
        assert store.legacy and store.episode_info(2)["notes"] == "ep2"
    with DemoStore.open(path, mode="a") as store:
        store.append_episode(make_episode(7, 3), {"seed": 7})
    with DemoStore.open(path) as store:
        assert not store.legacy and store.n_episodes == len(eps) + 1
        assert store.episode_info(2)["notes"] == "ep2" and store.episode_info(len(eps))["seed"] == 7
