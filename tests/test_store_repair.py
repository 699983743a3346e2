"""Repairs of damaged stores and whole-store operations that must leave a store whole: which boundaries
a repair trusts, metadata that cannot be read, merges and rewrites that fail or are killed."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import subprocess
import time
import zipfile

import numpy as np
import pytest
import zarr
from apps import BIN, run_app
from conftest import flip_bit_in_zip_entry, make_episode, make_schema

from wm.data import CorruptStoreError, DemoStore, delete_episodes, merge_stores, ops
from wm.data.verify import verify_store

LENGTHS = [7, 8, 9, 10, 11]


def five_episode_store(path, zarr_format=3):
    """A store of 5 episodes of LENGTHS; returns the episodes."""
    episodes = [make_episode(i, n) for i, n in enumerate(LENGTHS)]
    with DemoStore.create(path, make_schema(), zarr_format=zarr_format) as s:
        for i, ep in enumerate(episodes):
            s.append_episode(ep, {"notes": f"ep{i}"})
    return episodes


def repair(path) -> list[str]:
    """Run the repair that verify prints; returns its command line."""
    cmd = verify_store(path).repair_command()
    argv = shlex.split(cmd)
    res = run_app("wm-info", *argv[1:], "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    return argv


def leave_uncommitted_steps(path, n: int = 35) -> None:
    """What a writer killed mid-episode leaves until the store is next opened for appending: `n` steps
    past the last committed episode in every data array."""
    for _, a in zarr.open_group(str(path), mode="r+")["data"].arrays():
        a.resize((a.shape[0] + n, *a.shape[1:]))


@pytest.mark.parametrize(
    "ends, tail, dropped",
    [
        # the last end reads past the data, which the commit record's lengths add up to: every episode kept
        ([7, 15, 24, 34, 450], False, []),
        # one inner entry off, the total right: that entry is damaged (a damaged commit length would shift
        # every later boundary), so the commit record's split is kept
        ([7, 15, 25, 34, 45], False, []),
        # a killed writer's steps past the commit: neither side ends where the data does (the printed
        # repair deleted the intact last episode)
        ([7, 15, 24, 34, 557], True, []),
        ([7, 15, 25, 34, 45], True, []),
        # two boundaries off differently, both adding up to the data: which split is right is unknown
        ([7, 16, 23, 34, 45], False, [1, 2, 3]),
    ],
)
def test_a_damaged_episode_ends_is_not_trusted_over_the_commit_record(tmp_path, ends, tail, dropped):
    """A v2 store's episode_ends decode to other increasing numbers after a flipped bit; the printed
    repair trusted them, deleting every episode or re-splitting two."""
    path = tmp_path / "v2.zarr"
    episodes = five_episode_store(path, zarr_format=2)  # no checksums
    zarr.open_group(str(path), mode="r+")["meta/episode_ends"][:] = np.array(ends)
    if tail:
        leave_uncommitted_steps(path)
    with pytest.raises(CorruptStoreError, match="meta/episode_ends"):
        DemoStore.open(path)  # readers refuse boundaries they cannot trust
    report = verify_store(path)
    assert report.damaged_episodes == dropped
    argv = repair(path)
    assert argv[-1] == f"drop_episodes=[{','.join(map(str, dropped))}]"
    kept = [i for i in range(len(LENGTHS)) if i not in dropped]
    with DemoStore.open(path) as s:
        assert list(s.episode_lengths()) == [LENGTHS[i] for i in kept]
        for j, i in enumerate(kept):
            np.testing.assert_array_equal(s.get_episode(j)["state"], episodes[i]["state"])
            assert s.episode_info(j)["notes"] == f"ep{i}"
    assert verify_store(path).ok


@pytest.mark.parametrize("tail", [False, True])
def test_a_damaged_commit_length_is_not_trusted_over_the_episode_ends(tmp_path, tail):
    """One bit of a v2 store's commit record ('"length":9' read as 8): with a killed writer's steps past
    the commit, the store would not open and the printed repair deleted episodes 2, 3 and 4, intact."""
    path = tmp_path / "v2.zarr"
    episodes = five_episode_store(path, zarr_format=2)
    info = zarr.open_group(str(path), mode="r+", zarr_format=2)["wm_episode_info"]
    records = [str(x) for x in info[:]]
    records[2] = records[2].replace('"length":9', '"length":8')
    info[:] = np.array(records, dtype=object)
    if tail:
        leave_uncommitted_steps(path)
    assert verify_store(path).damaged_episodes == []
    repair(path)
    with DemoStore.open(path) as s:
        assert list(s.episode_lengths()) == LENGTHS
        for i, ep in enumerate(episodes):
            np.testing.assert_array_equal(s.get_episode(i)["state"], ep["state"])
    assert verify_store(path).ok


def test_a_commit_count_older_than_the_data_is_not_repaired_away(tmp_path):
    """A copy taken while a writer appended (cp -r copies the root zarr.json first) or a restored root
    zarr.json: wm_committed=3 over 5 complete episodes. Opening it to append (wm-collect resuming,
    wm-deploy record=) cut the store to 3, deleting two complete episodes without a word."""
    path = tmp_path / "copy.zarr"
    five_episode_store(path)
    zarr.open_group(str(path), mode="r+").attrs["wm_committed"] = 3
    with pytest.raises(CorruptStoreError, match=r"copy.zarr: meta/episode_ends holds 2 episodes past the 3"):
        DemoStore.open(path, mode="a")
    group = zarr.open_group(str(path), mode="r")
    assert group["meta/episode_ends"].shape == (5,) and group["data/state"].shape[0] == sum(LENGTHS)
    with DemoStore.open(path) as s:  # read-only: the committed episodes
        assert s.n_episodes == 3


@pytest.mark.parametrize(
    "zarr_format, file",
    [(3, "meta/zarr.json"), (3, "data/zarr.json"), (2, "meta/.zgroup"), (2, "data/.zgroup")],
)
def test_an_empty_group_metadata_file_is_named(tmp_path, zarr_format, file):
    """A zero-length metadata file (a power cut, an interrupted copy) was a bare 'Expecting value'."""
    path = tmp_path / "s.zarr"
    five_episode_store(path, zarr_format)
    (path / file).write_bytes(b"")
    with pytest.raises(CorruptStoreError, match=f"{path / file}: cannot be read .*restore this file"):
        DemoStore.open(path)
    (problem,) = verify_store(path).problems
    assert problem.fatal and str(path / file) in problem.detail


@pytest.mark.parametrize("zarr_format, file", [(3, "zarr.json"), (2, ".zarray")])
def test_empty_episode_ends_metadata_is_rebuilt_from_the_commit_record(tmp_path, zarr_format, file):
    path = tmp_path / "s.zarr"
    episodes = five_episode_store(path, zarr_format)
    meta = path / "meta" / "episode_ends" / file
    meta.write_bytes(b"")
    with pytest.raises(CorruptStoreError, match=f"{meta}: cannot be read .*drop_episodes=\\[\\]"):
        DemoStore.open(path)
    assert repair(path)[-1] == "drop_episodes=[]"
    with DemoStore.open(path) as s:
        assert list(s.episode_lengths()) == LENGTHS
        np.testing.assert_array_equal(s.get_episode(4)["img"], episodes[4]["img"])


@pytest.mark.parametrize("existing", [False, True])
def test_a_merge_that_fails_leaves_the_destination_as_it_was(tmp_path, existing):
    """merge_stores wrote into `dst` as it copied: a source episode that could not be read left a partial
    store there, which verified clean."""
    a, b, dst = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "m.zarr"
    episodes = five_episode_store(a)
    five_episode_store(b)
    if existing:
        merge_stores([a], dst).close()
    chunk = b / "data" / "img" / "c" / "20" / "0" / "0" / "0"  # b's episode 2
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CorruptStoreError, match="episode 2"):
        merge_stores([a, b], dst, overwrite=existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.zarr", "b.zarr"] + ["m.zarr"] * existing)
    if existing:
        with DemoStore.open(dst) as s:
            assert s.n_episodes == 5
            np.testing.assert_array_equal(s.get_episode(4)["img"], episodes[4]["img"])


def test_drop_episodes_from_inside_the_store(tmp_path):
    """`store=.` in the store's folder: the rewrite replaced that folder, and the relative path then named
    nothing (the drop done, then exit status 2 and 'No such file or directory')."""
    path = tmp_path / "s.zarr"
    episodes = five_episode_store(path)
    res = run_app("wm-info", "store=.", "drop_episodes=[1]", "contact_sheet=none", cwd=path)
    assert res.returncode == 0, res.stderr
    assert "dropped    episodes [1] (5 -> 4 episodes" in res.stdout
    with DemoStore.open(path) as s:
        assert s.n_episodes == 4
        np.testing.assert_array_equal(s.get_episode(1)["img"], episodes[2]["img"])


def test_a_killed_writers_temporary_file_does_not_block_a_rewrite(tmp_path):
    """zarr writes each file to '<name>.<hex>.partial' and renames it: a writer killed in between left
    one, and the rewrite (and overwrite=true) refused it as a user's file in the store."""
    path = tmp_path / "s.zarr"
    five_episode_store(path)
    (path / f"zarr.{'0a' * 16}.partial").write_bytes(b'{"zarr_fo')
    delete_episodes(path, [0])
    with DemoStore.open(path) as s:
        assert s.n_episodes == 4
    assert not list(path.glob("*.partial"))
    (path / "notes.partial").write_text("mine")  # a user's file is still refused
    with pytest.raises(ValueError, match="notes.partial"):
        delete_episodes(path, [0])


def test_an_episode_committed_while_a_deletion_waits_for_the_lock_is_kept(tmp_path, monkeypatch):
    """delete_episodes counted the episodes before it took the writer lock: one a writer committed in
    between was left out of the rewrite, silently."""
    path = tmp_path / "s.zarr"
    episodes = five_episode_store(path)
    late = make_episode(50, 6)
    real_lock = ops.WriterLock

    def lock_after_a_commit(at):  # a writer commits one more episode, then lets go of the store
        with DemoStore.open(path, mode="a") as s:
            s.append_episode(late, {"notes": "late"})
        monkeypatch.setattr(ops, "WriterLock", real_lock)
        return real_lock(at)

    monkeypatch.setattr(ops, "WriterLock", lock_after_a_commit)
    delete_episodes(path, [0])
    with DemoStore.open(path) as s:
        assert [s.episode_info(i)["notes"] for i in range(s.n_episodes)] == [
            "ep1",
            "ep2",
            "ep3",
            "ep4",
            "late",
        ]
        np.testing.assert_array_equal(s.get_episode(4)["img"], late["img"])
        np.testing.assert_array_equal(s.get_episode(0)["img"], episodes[1]["img"])


def test_a_damaged_zip_store_names_the_repair_of_its_unzipped_copy(tmp_path):
    """A zip store is read-only, and its damage was said to need a backup: unzipped, dropping the damaged
    episode repairs it as it does a folder store."""
    folder = tmp_path / "s.zarr"
    episodes = five_episode_store(folder)
    zipped = tmp_path / "s.zarr.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_STORED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
    shutil.rmtree(folder)
    flip_bit_in_zip_entry(zipped, "c/8/0/0/0", at=20)  # episode 1
    res = run_app("wm-info", f"store={zipped}", "verify=true", "contact_sheet=none")
    assert res.returncode == 2
    advice = "unzip to a folder store, then: wm-info store=<folder> 'drop_episodes=[1]'"
    assert f"repair: {advice}" in res.stderr and f"repair     {advice}" in res.stdout
    with zipfile.ZipFile(zipped) as z:  # the damaged file left out (zipfile refuses its CRC)
        for name in z.namelist():
            with contextlib.suppress(zipfile.BadZipFile):
                z.extract(name, folder)
    argv = shlex.split(advice.split(": ", 1)[1].replace("<folder>", str(folder)))
    assert run_app("wm-info", *argv[1:], "contact_sheet=none").returncode == 0
    with DemoStore.open(folder) as s:
        assert s.n_episodes == 4
        np.testing.assert_array_equal(s.get_episode(1)["img"], episodes[2]["img"])


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("image_codec", ["zstd", "lz4hc"])
def test_a_rewrite_keeps_the_image_codec(tmp_path, zarr_format, image_codec):
    """The rewrite passed the chunking on but not the codec: zstd frames came back as lz4. And the image
    codec it passed on went to every key: the low-dim keys' zstd became lz4 (larger)."""
    path = tmp_path / "s.zarr"
    with DemoStore.create(path, make_schema(), zarr_format=zarr_format, image_codec=image_codec) as s:
        for i in range(3):
            s.append_episode(make_episode(i, 4))

    def codecs(s):
        return {k: getattr(c.cname, "value", c.cname) for k in s.keys for c in s.array(k).compressors[:1]}

    with DemoStore.open(path) as s:
        before = codecs(s)
    assert before == {"img": image_codec, "state": "zstd", "action": "zstd"}
    delete_episodes(path, [0])
    with DemoStore.open(path) as s:
        assert codecs(s) == before and s.n_episodes == 2


def test_sigterm_stops_a_rewrite_as_ctrl_c_does(tmp_path):
    """wm-info ended on SIGTERM where it stood (exit status -15), a half-written <store>.wm-new left beside
    the store; now its cleanup runs (exit status 143) and the store is as it was."""
    path, n = tmp_path / "s.zarr", 40
    with DemoStore.create(path, make_schema()) as s:
        for i in range(n):
            s.append_episode(make_episode(i, 15))
    new = path.with_name("s.zarr.wm-new")
    proc = subprocess.Popen(
        [str(BIN / "wm-info"), f"store={path}", "drop_episodes=[3]", "contact_sheet=none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not new.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert new.exists(), "the rewrite never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not new.exists()
    with DemoStore.open(path) as s:
        assert s.n_episodes in (n, n - 1)  # (the swap, if the signal came that late, is finished whole)


def test_opening_for_writing_removes_what_a_killed_rewrite_left(tmp_path):
    path = tmp_path / "s.zarr"
    five_episode_store(path)
    left = path.with_name("s.zarr.wm-new")
    shutil.copytree(path, left)  # (a rewrite killed by SIGKILL: no cleanup ran)
    with DemoStore.open(path):  # a reader takes no lock: a live rewrite may own it
        assert left.exists()
    with DemoStore.open(path, mode="a") as s:
        assert s.n_episodes == 5
    assert not left.exists()
