"""`wm-info verify=true` and `drop_episodes=[...]`: every kind of damage is found, named (key, chunk
file, steps, episodes) and repaired by the printed command; refused commands change nothing."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from apps import run_app
from conftest import make_episode, make_schema

from wm.data import CorruptStoreError, DemoStore
from wm.data.verify import format_report, verify_store

BIN = Path(sys.executable).parent
LENGTHS = [7, 8, 9, 10, 11]  # the small_store fixture's episodes


def cli(*args: str) -> subprocess.CompletedProcess:
    """`wm-info` with `args` (in this process: its script's `main()`)."""
    return run_app("wm-info", *args)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (and beside it) with a hash of its bytes."""
    return {
        str(f.relative_to(root.parent)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.parent.rglob("*"))
        if f.is_file()
    }


def truncate(chunk: Path) -> None:
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 3])


def assert_one_error_line(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_clean_store_verifies(small_store):
    path, _ = small_store
    report = verify_store(path)
    assert report.ok and report.repair_command() is None
    assert report.chunks_checked == sum(LENGTHS) + 2  # one per frame, one per low-dim key
    res = cli(f"store={path}", "verify=true", "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    assert "no damage found" in res.stdout and res.stderr == ""


def test_truncated_image_chunk_is_named_and_repaired(small_store):
    path, eps = small_store
    chunk = path / "data" / "img" / "c" / "8" / "0" / "0" / "0"  # step 8: episode 1
    truncate(chunk)
    before = snapshot(path)
    res = cli(f"store={path}", "verify=true")
    assert_one_error_line(res, str(path), "episodes [1]", "drop_episodes=[1]")
    assert f"data/img  chunk file {chunk}  steps 8:9  episodes [1]: cannot be decoded" in res.stdout
    assert snapshot(path) == before  # verifying wrote nothing, not even a contact sheet

    # the printed command is the repair
    cmd = next(line for line in res.stdout.splitlines() if line.startswith("repair"))
    argv = shlex.split(cmd.removeprefix("repair").strip())
    assert argv[0] == "wm-info"
    res = cli(*argv[1:], "verify=true", "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    assert "dropped    episodes [1] (5 -> 4 episodes" in res.stdout and "no damage found" in res.stdout
    with DemoStore.open(path) as s:
        assert s.n_episodes == 4
        for new, old in enumerate([0, 2, 3, 4]):
            np.testing.assert_array_equal(s.get_episode(new)["img"], eps[old]["img"])
            assert s.episode_info(new)["notes"] == f"ep{old}"
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.zarr"]  # no leftovers


def test_lowdim_chunk_damage_touches_every_episode_in_it(small_store):
    path, _ = small_store
    truncate(path / "data" / "state" / "c" / "0" / "0")
    report = verify_store(path)
    (p,) = report.problems
    assert p.what == "data/state" and p.steps == (0, sum(LENGTHS)) and p.episodes == (0, 1, 2, 3, 4)
    assert report.repair_command().endswith("'drop_episodes=[0,1,2,3,4]'")


def test_zarr2_store_damage_is_found_without_checksums(tmp_path):
    path = tmp_path / "v2.zarr"
    with DemoStore.create(path, make_schema(), zarr_format=2) as s:
        for i in range(3):
            s.append_episode(make_episode(i, 4))
    clean = verify_store(path)  # ok, and says what it cannot find in such a store
    assert clean.ok and not clean.checksums_checked and not clean.to_dict()["checksums_checked"]
    assert "zarr v2 chunks carry no checksum" in format_report(clean)
    truncate(path / "data" / "img" / "5.0.0.0")
    report = verify_store(path)
    assert [(p.steps, p.episodes) for p in report.problems] == [((5, 6), (1,))]
    assert "Blosc header" in report.problems[0].detail
    assert "zarr v2 chunks carry no checksum" in format_report(report)
    v3 = tmp_path / "v3.zarr"
    with DemoStore.create(v3, make_schema()) as s:
        s.append_episode(make_episode(0, 4))
    assert verify_store(v3).checksums_checked and "checksum" not in format_report(verify_store(v3))


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_a_lost_chunk_file_is_damage_not_zeros(tmp_path, zarr_format):
    """zarr leaves chunks of fill values unwritten, so a lost file read as zeros; our stores write every
    chunk, and a missing one is reported (reading it raises) while a real frame of zeros reads fine."""
    path = tmp_path / "lost.zarr"
    episodes = [make_episode(i, 4) for i in range(3)]
    episodes[0]["img"][2] = 0  # a black frame: step 2, its own chunk
    with DemoStore.create(path, make_schema(), zarr_format=zarr_format) as s:
        for ep in episodes:
            s.append_episode(ep)
    assert verify_store(path).ok
    with DemoStore.open(path) as s:
        np.testing.assert_array_equal(s.get_episode(0)["img"], episodes[0]["img"])

    chunk = path / "data" / "img" / ("c/5/0/0/0" if zarr_format == 3 else "5.0.0.0")  # episode 1
    chunk.unlink()
    report = verify_store(path)
    (p,) = report.problems
    assert (p.what, p.file, p.steps, p.episodes) == ("data/img", str(chunk), (5, 6), (1,))
    assert "missing" in p.detail
    assert report.repair_command().endswith("'drop_episodes=[1]'")
    with DemoStore.open(path) as s:
        np.testing.assert_array_equal(s.get_episode(2)["img"], episodes[2]["img"])  # the rest reads
        with pytest.raises(CorruptStoreError, match=f"{chunk}: chunk 5 of key 'img' .*episode 1.* missing"):
            s.get_episode(1)


def test_a_store_that_may_leave_chunks_unwritten_says_so_and_a_rewrite_fixes_it(small_store):
    """A store from before `wm_every_chunk` (or another tool) reads a missing chunk as zarr does; verify
    says it cannot find lost files there, and the rewrite it names makes them findable."""
    path, eps = small_store
    group = zarr.open_group(path, mode="r+")
    del group.attrs["wm_every_chunk"]
    (path / "data" / "img" / "c" / "8" / "0" / "0" / "0").unlink()  # episode 1: reads as zeros
    report = verify_store(path)
    assert report.ok and not report.missing_files_checked
    text = format_report(report)
    assert "lost chunk file reads as zeros and is not found" in text
    rewrite = shlex.split(text.splitlines()[-1].split(": ", 1)[1].rstrip(")"))
    assert rewrite == ["wm-info", f"store={path}", "drop_episodes=[]"]
    res = cli(*rewrite[1:], "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    report = verify_store(path)
    assert report.ok and report.missing_files_checked
    with DemoStore.open(path) as s:
        np.testing.assert_array_equal(s.get_episode(3)["img"], eps[3]["img"])
        assert s.get_episode(1)["img"][1].max() == 0  # what the lost file read as is kept, now written
    (path / "data" / "img" / "c" / "9" / "0" / "0" / "0").unlink()
    assert [p.steps for p in verify_store(path).problems] == [(9, 10)]


@pytest.mark.parametrize("damage", ["truncated", "lost"])
def test_unreadable_episode_ends_fall_back_to_the_commit_record(small_store, damage):
    """A lost chunk file of it read as zeros: the store looked empty, and verify blamed every episode
    and printed a repair that dropped them all."""
    path, eps = small_store
    chunk = path / "meta" / "episode_ends" / "c" / "0"
    truncate(chunk) if damage == "truncated" else chunk.unlink()
    with pytest.raises(CorruptStoreError, match="episode_ends"):
        DemoStore.open(path)  # readers refuse it
    report = verify_store(path)
    (p,) = report.problems
    assert p.what == "meta/episode_ends" and "taken from the commit record" in p.detail
    assert report.repair_command().endswith("'drop_episodes=[]'")  # nothing to drop: a rewrite
    res = cli(f"store={path}", "drop_episodes=[]", "verify=true", "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    with DemoStore.open(path) as s:
        assert list(s.episode_lengths()) == LENGTHS
        np.testing.assert_array_equal(s.get_episode(4)["state"], eps[4]["state"])


def test_short_data_array_and_commit_mismatch(small_store):
    path, _ = small_store
    group = zarr.open_group(str(path), mode="r+")
    group["data/action"].resize((40, 2))  # episode 4 (steps 34:45) lost its last 5 actions
    group["wm_episode_info"][0] = json.dumps({**json.loads(str(group["wm_episode_info"][0])), "length": 6})
    report = verify_store(path)
    text = format_report(report)
    assert "data/action  steps 40:45  episodes [4]: has 40 steps, the episodes need 45" in text
    assert "episode 0 has length 6 in the commit record, 7 in meta/episode_ends" in text
    assert report.damaged_episodes == [4]
    res = cli(f"store={path}", "drop_episodes=[4]", "verify=true", "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    with DemoStore.open(path) as s:
        assert list(s.episode_lengths()) == LENGTHS[:4] and s.episode_info(0)["length"] == 7


def test_non_finite_actions_are_damage(small_store):
    path, _ = small_store
    zarr.open_group(str(path), mode="r+")["data/action"][20, 1] = np.nan  # step 20: episode 2
    (p,) = verify_store(path).problems
    assert p.episodes == (2,) and "non-finite values at 1 step(s), the first at step 20" in p.detail


def test_verify_json(small_store):
    path, _ = small_store
    truncate(path / "data" / "img" / "c" / "30" / "0" / "0" / "0")
    res = cli(f"store={path}", "verify=true", "format=json")
    assert res.returncode == 2
    out = json.loads(res.stdout)["verify"]
    assert out["ok"] is False and out["damaged_episodes"] == [3]
    assert out["problems"][0]["file"].endswith("data/img/c/30/0/0/0")
    assert out["repair"].endswith("'drop_episodes=[3]'")


@pytest.mark.parametrize(
    "args, words",
    [
        (["drop_episodes=[9]"], ["episodes [9] out of range", "5 episodes"]),
        (["drop_episodes=[0]"], ["c/8/0/0/0", "'img'", "episode 1", "cannot be decoded"]),  # 1 kept
        (["drop_episodes=3"], ["drop_episodes must be a list"]),
        # deleting is irreversible: -1 (the last) was taken where episodes=[-1] is refused, and [0, -5]
        # named episode 0 twice
        (["drop_episodes=[-1]"], ["drop_episodes: episode numbers negative [-1]", "by its number from 0"]),
        (["drop_episodes=[1,1]"], ["drop_episodes: episode numbers given twice [1]"]),
        (["episodes=[2,99]", "video=true"], ["episodes [99] out of range"]),
    ],
)
def test_refused_commands_change_nothing(small_store, args, words):
    path, _ = small_store
    truncate(path / "data" / "img" / "c" / "8" / "0" / "0" / "0")
    before = snapshot(path)
    res = cli(f"store={path}", *args)
    assert_one_error_line(res, *words)
    assert snapshot(path) == before


def test_damage_hit_by_a_plain_summary_points_to_verify(small_store):
    path, _ = small_store
    truncate(path / "data" / "img" / "c" / "0" / "0" / "0" / "0")  # the contact sheet reads frame 0
    res = cli(f"store={path}", "contact_sheet=none")  # image stats stride over frame 0 too
    assert_one_error_line(res, "episode 0", "verify=true")
