"""Store summary, text report and contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wm.data import ActionSpace, DemoStore, KeySpec, Schema, SchemaError
from wm.data import info as wm_info

LENGTHS = [5, 9, 3, 7]
H, W = 24, 32


def _schema() -> Schema:
    return Schema(
        keys={
            "rgb": KeySpec(shape=(H, W, 3), dtype="uint8", kind="image"),
            "qpos": KeySpec(shape=(4,), dtype="float32", kind="proprio"),
            "action": KeySpec(shape=(2,), dtype="float32", kind="action"),
        },
        fps=12.5,
        action_space=ActionSpace(mode="delta", frame="ee", units="m"),
        robot="Panda",
        task="Lift",
    )


@pytest.fixture
def built(tmp_path: Path) -> tuple[DemoStore, list[dict[str, np.ndarray]]]:
    store = DemoStore.create(tmp_path / "demo.zarr", _schema())
    rng = np.random.default_rng(0)
    episodes = []
    for i, n in enumerate(LENGTHS):
        ep = {
            "rgb": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
            "qpos": rng.normal(i, 1 + i, (n, 4)).astype(np.float32),
            "action": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        }
        info = {} if i == 3 else {"success": i != 1}
        store.append_episode(ep, info)
        episodes.append(ep)
    return store, episodes


def test_summarize_matches_numpy(built: tuple[DemoStore, list]) -> None:
    store, episodes = built
    s = wm_info.summarize(store)
    json.dumps(s, allow_nan=False)  # strictly JSON-serializable
    assert (s["episodes"], s["steps"], s["fps"], s["zarr_format"]) == (4, sum(LENGTHS), 12.5, 3)
    assert (s["robot"], s["task"]) == ("Panda", "Lift")
    assert s["action_space"]["mode"] == "delta" and s["action_space"]["frame"] == "ee"
    assert s["episode_length"] == {"min": 3, "max": 9, "mean": float(np.mean(LENGTHS))}
    assert s["success_rate"] == pytest.approx(2 / 3) and s["episodes_with_success_flag"] == 3
    files = [f for f in Path(store.path).rglob("*") if f.is_file()]
    assert s["size_on_disk_bytes"] == sum(f.stat().st_size for f in files) > 0
    for key in ("qpos", "action"):
        x = np.concatenate([e[key] for e in episodes]).astype(np.float64)
        st = s["keys"][key]["stats"]
        for name, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
            np.testing.assert_allclose(st[name], fn(x, axis=0), rtol=1e-6, atol=1e-9)
    rgb = s["keys"]["rgb"]
    assert rgb["shape"] == [H, W, 3] and rgb["kind"] == "image" and rgb["chunks"] == [1, H, W, 3]
    assert rgb["codec"] == "blosc/lz4/5+crc32c" and s["keys"]["qpos"]["codec"] == "blosc/zstd/3+crc32c"
    frames = np.concatenate([e["rgb"] for e in episodes]).astype(np.float64)
    np.testing.assert_allclose(rgb["stats"]["mean"], frames.mean(axis=(0, 1, 2)))


def test_summarize_subsamples(built: tuple[DemoStore, list]) -> None:
    store, episodes = built
    s = wm_info.summarize(store, stats_max_steps=5, image_frames=4)
    x = np.concatenate([e["qpos"] for e in episodes]).astype(np.float64)
    stride = int(np.ceil(len(x) / 5))
    st = s["keys"]["qpos"]["stats"]
    assert st["steps_used"] == len(x[::stride]) <= 5
    np.testing.assert_allclose(st["mean"], x[::stride].mean(axis=0), rtol=1e-6)
    assert s["keys"]["rgb"]["stats"]["frames_used"] <= 4


def test_summarize_empty_and_zarr2(tmp_path: Path) -> None:
    store = DemoStore.create(tmp_path / "empty.zarr", _schema(), zarr_format=2)
    s = wm_info.summarize(store)
    json.dumps(s, allow_nan=False)
    assert s["episodes"] == 0 and s["success_rate"] is None and s["episode_length"]["min"] is None
    assert s["keys"]["qpos"]["stats"] is None and s["keys"]["rgb"]["codec"] == "blosc/lz4/5"
    assert "empty.zarr" in wm_info.format_summary(s)


def test_non_finite_values_are_counted_not_hidden(tmp_path: Path) -> None:
    """NaN-ignoring reductions made a key holding NaN look clean, and +inf printed as "nan"."""
    schema = Schema(
        keys={"force": KeySpec((3,), "float32", "lowdim"), "t": KeySpec((), "float64", "timestamp")}
    )
    force = np.ones((10, 3), np.float32)
    force[2, 0], force[5, 2] = np.nan, np.inf
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        store.append_episode({"force": force, "t": 22690.0 + np.arange(10) / 10})
        s = wm_info.summarize(store)
    st = s["keys"]["force"]["stats"]
    assert st["non_finite"] == [1, 0, 1] and st["max"] == [1.0, 1.0, 1.0]  # of the finite values
    text = wm_info.format_summary(s)
    assert "NaN/inf [1, 0, 1] values per dimension" in text
    assert "max  [22690.9]" in text  # 6 digits: a timestamp span is readable


def test_a_contact_sheet_given_a_folder_goes_inside_it(tmp_path: Path) -> None:
    """wm-info contact_sheet=<a folder> was an IsADirectoryError traceback."""
    from tools.info import InfoConfig, sheet_path

    (tmp_path / "sheets").mkdir()
    cfg = InfoConfig(store=str(tmp_path / "demos.zarr"), contact_sheet=str(tmp_path / "sheets"))
    assert sheet_path(cfg) == tmp_path / "sheets" / "demos_contact.png"


def test_the_contact_sheet_and_videos_go_beside_the_store_as_named(tmp_path: Path, monkeypatch) -> None:
    """Through a symbolic link they went beside the link's target (another folder, perhaps read-only)."""
    from tools.info import InfoConfig, sheet_path, video_dir

    (tmp_path / "shared" / "base.zarr").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.zarr").symlink_to(tmp_path / "shared" / "base.zarr")
    cfg = InfoConfig(store=str(tmp_path / "data" / "link.zarr"))
    assert sheet_path(cfg) == tmp_path / "data" / "link_contact.png"
    assert video_dir(cfg) == tmp_path / "data" / "link_videos"
    monkeypatch.chdir(tmp_path / "shared" / "base.zarr")  # store=. names the folder it is run in
    assert sheet_path(InfoConfig(store=".")) == tmp_path / "shared" / "base_contact.png"


def test_format_summary(built: tuple[DemoStore, list]) -> None:
    store, _ = built
    text = wm_info.format_summary(wm_info.summarize(store))
    for word in ("rgb", "qpos", "action", "Panda", "Lift", "delta / ee", "66.7%", "blosc/lz4/5"):
        assert word in text
    assert wm_info.human_bytes(12.3 * 2**20) == "12.3 MiB"
    assert wm_info.human_bytes(512) == "512 B" and wm_info.human_bytes(1536) == "1.5 KiB"


def test_contact_sheet(built: tuple[DemoStore, list], tmp_path: Path) -> None:
    store, episodes = built
    out = wm_info.contact_sheet(store, tmp_path / "sheets" / "sheet.png", n_episodes=3)
    assert out.is_file()
    img = np.asarray(Image.open(out).convert("RGB"))
    row_h = max(H, 3 * wm_info.LABEL_LINE_H)
    rows = wm_info._pick_episodes(4, 3, 0)
    assert rows == [0, 2, 3]
    assert img.shape == (wm_info.HEADER_H + wm_info.PAD + 3 * (row_h + wm_info.PAD),
                         wm_info.LABEL_W + wm_info.PAD + 2 * (W + wm_info.PAD), 3)  # fmt: skip
    for r, ep in enumerate(rows):
        y = wm_info.HEADER_H + wm_info.PAD + r * (row_h + wm_info.PAD)
        x = wm_info.LABEL_W + wm_info.PAD
        np.testing.assert_array_equal(img[y : y + H, x : x + W], episodes[ep]["rgb"][0])
        x_last = x + W + wm_info.PAD
        np.testing.assert_array_equal(img[y : y + H, x_last : x_last + W], episodes[ep]["rgb"][-1])
    assert img[:, : wm_info.LABEL_W].max() > 100  # labels were drawn
    # all episodes when fewer than asked; other seeds pick other evenly spaced episodes
    full = Image.open(wm_info.contact_sheet(store, tmp_path / "all.png", image_key="rgb"))
    assert full.size[1] == wm_info.HEADER_H + wm_info.PAD + 4 * (row_h + wm_info.PAD)
    picks = wm_info._pick_episodes(100, 5, 7)
    assert len(picks) == 5 and np.all(np.diff(picks) >= 19)


def test_contact_sheet_without_images(tmp_path: Path) -> None:
    schema = Schema(keys={"action": KeySpec(shape=(2,), dtype="float32", kind="action")})
    store = DemoStore.create(tmp_path / "low.zarr", schema)
    store.append_episode({"action": np.zeros((3, 2), np.float32)})
    with pytest.raises(SchemaError, match=r"low\.zarr.*no image keys"):
        wm_info.contact_sheet(store, tmp_path / "x.png")
    with pytest.raises(SchemaError, match="not an image key"):
        wm_info.contact_sheet(store, tmp_path / "x.png", image_key="action")
    assert not (tmp_path / "x.png").exists()


def test_contact_sheet_of_chosen_episodes(built: tuple[DemoStore, list], tmp_path: Path) -> None:
    store, episodes = built
    out = wm_info.contact_sheet(store, tmp_path / "two.png", episodes=[3, 1])
    img = np.asarray(Image.open(out).convert("RGB"))
    row_h = max(H, 3 * wm_info.LABEL_LINE_H)
    x = wm_info.LABEL_W + wm_info.PAD
    for r, ep in enumerate([3, 1]):
        y = wm_info.HEADER_H + wm_info.PAD + r * (row_h + wm_info.PAD)
        np.testing.assert_array_equal(img[y : y + H, x : x + W], episodes[ep]["rgb"][0])
    with pytest.raises(ValueError, match=r"episodes \[4\] out of range"):
        wm_info.contact_sheet(store, tmp_path / "bad.png", episodes=[0, 4])
    assert not (tmp_path / "bad.png").exists()


def test_unknown_success_is_not_a_failure(tmp_path: Path) -> None:
    """A real robot's episodes record `success: null` (wm-deploy record=): unknown, not failed."""
    schema = Schema(
        keys={"img": KeySpec((8, 8, 3), "uint8", "image"), "action": KeySpec((2,), "float32", "action")}
    )
    rng = np.random.default_rng(0)
    with DemoStore.create(tmp_path / "s.zarr", schema) as store:
        for flag in (None, True, None, False):
            ep = {
                "img": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
                "action": np.zeros((3, 2), np.float32),
            }
            store.append_episode(ep, {"success": flag})
        summary = wm_info.summarize(store)
        assert (summary["success_rate"], summary["success_count"], summary["episodes_with_success_flag"]) == (
            0.5,
            1,
            2,
        )
        assert [wm_info.success_label(store.episode_info(i)) for i in range(4)] == ["?", "yes", "?", "no"]


def test_float_images_read_as_0_to_255_everywhere(tmp_path: Path) -> None:
    """Diffusion Policy's stores may hold float32 images in 0..255: the contact sheet shows them as the
    dataset reads them, and a float key in [0, 1] (which training would read almost black) is refused."""
    from wm.data.dataset import WindowDataset
    from wm.data.windows import WindowSpec

    schema = Schema(
        keys={"img": KeySpec((8, 8, 3), "float32", "image"), "action": KeySpec((2,), "float32", "action")}
    )
    for name, value in (("dp.zarr", 127.0), ("unit.zarr", 0.5), ("resized.zarr", 1.02)):
        with DemoStore.create(tmp_path / name, schema) as store:
            store.append_episode(
                {"img": np.full((4, 8, 8, 3), value, np.float32), "action": np.zeros((4, 2), np.float32)}
            )
    spec = WindowSpec({"img": (0,), "action": (0,)})
    for in_memory in (False, True):
        batch = WindowDataset(tmp_path / "dp.zarr", spec, in_memory=in_memory).get_batch([0])
        assert batch["img"].dtype == torch.float32 and float(batch["img"].max()) == pytest.approx(127 / 255)
        raw = WindowDataset(tmp_path / "dp.zarr", spec, in_memory=in_memory, image_dtype="uint8").get_batch(
            [0]
        )
        assert raw["img"].dtype == torch.uint8 and int(raw["img"].max()) == 127
    with DemoStore.open(tmp_path / "dp.zarr") as store:  # what the contact sheet and videos draw
        assert np.asarray(wm_info._to_rgb(store.get_episode(0)["img"][0])).max() == 127  # grey, not white
    with pytest.raises(
        SchemaError, match="image key 'img' holds float values in \\[0, 1\\] .* store them as uint8"
    ):
        WindowDataset(tmp_path / "unit.zarr", spec)
    with pytest.raises(SchemaError, match=r"holds float values in \[0, 1\] \(max 1.02 over"):  # was read
        WindowDataset(tmp_path / "resized.zarr", spec)  # as frames of 0..1 out of 255: nearly black
    assert wm_info.summarize(DemoStore.open(tmp_path / "dp.zarr"))["keys"]["img"]["stats"]["problem"] is None
    from apps import run_app  # wm-info drew [0, 1] frames black without a word

    res = run_app("wm-info", f"store={tmp_path / 'unit.zarr'}", "contact_sheet=none")
    assert res.returncode == 0 and res.stderr.startswith(f"warning: {tmp_path}/unit.zarr: image key 'img'")
    assert "holds float values in [0, 1]" in res.stderr and "store them as uint8" in res.stderr


# ---------------------------------------------------------------------- wm-info's own faults
def test_options_that_would_do_nothing_are_refused() -> None:
    """video_dir= without video=true, and episodes= with neither a contact sheet nor videos, ran and
    wrote nothing (exit 0)."""
    from tools.info import InfoConfig

    with pytest.raises(ValueError, match="video_dir=v is where video=true writes: give video=true too"):
        InfoConfig(store="s.zarr", video_dir="v")
    for episodes in (2, [1]):
        with pytest.raises(ValueError, match="chooses what the contact sheet and videos show, and there are"):
            InfoConfig(store="s.zarr", episodes=episodes, contact_sheet="none")
    InfoConfig(store="s.zarr", episodes=2, contact_sheet="none", video=True)  # the videos use it


def test_an_output_folder_that_is_a_file_is_one_line_naming_the_option(tmp_path) -> None:
    """video_dir= a file was a traceback (an OSError without errno, taken for a bug, exit 1); a contact
    sheet inside a file an errno line that named no option."""
    from tools._cli import UsageError
    from tools.info import InfoConfig

    (tmp_path / "afile").write_text("hi")
    for where in ("afile", "afile/sub"):
        with pytest.raises(UsageError, match=rf"^video_dir=.*{where}: .*afile is a file; give a folder$"):
            InfoConfig(store="s.zarr", video=True, video_dir=str(tmp_path / where))
    with pytest.raises(
        UsageError, match=r"^contact_sheet=.*afile/x.png: .*afile is a file; give a folder or"
    ):
        InfoConfig(store="s.zarr", contact_sheet=str(tmp_path / "afile" / "x.png"))
    with pytest.raises(ValueError, match=r"^store= is empty: give the path of a store$"):
        InfoConfig(store="")  # it said ".: not a zarr demonstration store"
    with pytest.raises(ValueError, match=r"^contact_sheet=.*afile: the sheet is a PNG; give a folder or a"):
        InfoConfig(store="s.zarr", contact_sheet=str(tmp_path / "afile"))  # was overwritten with the PNG
    InfoConfig(store="s.zarr", contact_sheet=str(tmp_path / "sheet.png"))  # a file's path: written there
    (tmp_path / "m.zarr").mkdir()
    (tmp_path / "m.zarr" / "zarr.json").write_text("{}")  # a store given as the folder: the sheet went in
    with pytest.raises(UsageError, match=r"^contact_sheet=.*m.zarr: .*m.zarr is a demonstration store; give"):
        InfoConfig(store="s.zarr", contact_sheet=str(tmp_path / "m.zarr"))


def test_a_summary_beside_a_store_it_cannot_write_to_still_prints(built, monkeypatch, capsys) -> None:
    """On a read-only filesystem the default contact sheet beside the store failed, and a plain look at
    the store was a traceback; a sheet the user named still fails, in one line."""
    import errno

    from apps import run_app

    import tools.info as info_app

    store, _ = built
    store.close()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(info_app, "contact_sheet", read_only)
    res = run_app("wm-info", f"store={store.path}")
    assert res.returncode == 0 and f"episodes   {len(LENGTHS)} (" in res.stdout, res.stderr
    assert "contact sheet  none (cannot write" in res.stdout and "give contact_sheet=PATH" in res.stdout
    res = run_app("wm-info", f"store={store.path}", f"contact_sheet={store.path.parent / 'sheet.png'}")
    assert res.returncode == 2 and res.stderr.strip() == "error: [Errno 30] Read-only file system", res.stderr


def test_a_store_it_cannot_write_to_is_refused_before_appending(built, monkeypatch) -> None:
    """A writer (wm-collect) on a read-only filesystem got through opening and failed at its first flush."""
    import os

    store, _ = built
    store.close()
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)
    with pytest.raises(PermissionError, match="demo.zarr: cannot write here \\(a read-only filesystem"):
        DemoStore.open(store.path, mode="a")
    with pytest.raises(PermissionError, match="cannot write here"):
        DemoStore.create(store.path.parent / "new.zarr", _schema())
    assert DemoStore.open(store.path).n_episodes == len(LENGTHS)  # reading needs no write access


def test_a_video_folder_that_cannot_be_made_is_one_line(built) -> None:
    """A file where <store>_videos goes (or a read-only filesystem): the OSError lost its kind and its
    number on the way, and the app reported it as a bug (a traceback, exit 1)."""
    from apps import run_app

    store, _ = built
    in_the_way = Path(store.path).with_name(Path(store.path).stem + "_videos")
    in_the_way.write_text("not a folder")
    res = run_app("wm-info", f"store={store.path}", "video=true", "contact_sheet=none", "episodes=[0]")
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"error: cannot write the video {in_the_way}/episode_0000.mp4: its folder cannot be made ([Errno 17] "
        f"File exists: '{in_the_way}')"
    ], res.stderr


def test_wm_info_into_a_closed_pipe_stops_quietly(built) -> None:
    """`wm-info ... | head`: the reader gone, it printed a BrokenPipeError traceback and exited 1."""
    import subprocess

    from apps import BIN

    store, _ = built
    store.close()
    proc = subprocess.Popen(
        [str(BIN / "wm-info"), f"store={store.path}", "contact_sheet=none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before it prints: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141 and err == "", err
    # Hydra's own output too (`wm-info --help | head`: a BrokenPipeError traceback from Hydra's print)
    proc = subprocess.Popen([str(BIN / "wm-info"), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141 and err == "", err


def test_a_commit_record_entry_that_is_not_an_object_is_damage_found_and_repaired(built) -> None:
    """It read as a TypeError from dict() far from the store (in wm-info's summary), and verify passed."""
    import zarr

    from wm.data import CorruptStoreError, delete_episodes
    from wm.data.verify import verify_store

    store, _ = built
    store.close()
    group = zarr.open_group(store.path, mode="r+")
    group["wm_episode_info"][1] = "garbage"  # not JSON
    with pytest.raises(CorruptStoreError, match="the commit record's entry of episode 1 is not an object"):
        DemoStore.open(store.path)
    report = verify_store(store.path)
    assert not report.ok and [(p.what, p.episodes) for p in report.problems] == [("commit record", (1,))]
    delete_episodes(store.path, [])  # the repair it names: a rewrite keeps every episode
    with DemoStore.open(store.path) as repaired:
        assert repaired.n_episodes == len(LENGTHS) and repaired.episode_info(1) == {"length": LENGTHS[1]}


@pytest.mark.parametrize("empty", [0, 1, 3])
def test_an_episode_without_steps_gets_a_row_without_frames(tmp_path, empty):
    """Another tool's store may hold an episode without steps (Diffusion Policy's do): its contact sheet
    row read the frames before and after it, or past the arrays' end (a false "steps are missing"), or a
    step -1 (a traceback). Its row has its label and no frames; a verify names it, and its note's rewrite
    is one that can run (keeping every episode refuses an empty one)."""
    import zarr

    from wm.data.verify import format_report, verify_store

    lengths = [3, 4, 2, 5]
    lengths.insert(empty, 0)
    ends = np.cumsum(lengths)
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(tmp_path / "dp.zarr"), mode="w", zarr_format=2)
    root.create_array(
        "data/img", data=rng.integers(0, 256, (ends[-1], 8, 8, 3), dtype=np.uint8), chunks=(1, 8, 8, 3)
    )
    root.create_array("data/action", data=rng.normal(size=(ends[-1], 2)).astype(np.float32))
    root.create_array("meta/episode_ends", data=ends.astype(np.int64))
    with DemoStore.open(tmp_path / "dp.zarr") as store:
        out = wm_info.contact_sheet(store, tmp_path / "sheet.png", episodes=range(5))
        assert list(store.edge_frames(empty, ["img"])) == []
    sheet = np.asarray(Image.open(out))
    assert sheet.shape[0] > 0
    text = format_report(verify_store(tmp_path / "dp.zarr"))
    assert f"episodes [{empty}]: episodes without steps" in text and "drop_episodes=[]" not in text
    from apps import run_app  # video=true stopped at it ("cannot reshape array of size 0"), naming nothing

    res = run_app("wm-info", f"store={tmp_path / 'dp.zarr'}", "episodes=[0,1,2,3,4]", "video=true")
    assert res.returncode == 0, res.stderr
    assert f"video          none for episode(s) [{empty}] hold no steps" in res.stdout
    made = sorted(p.name for p in (tmp_path / "dp_videos").iterdir())
    assert made == [f"episode_{e:04d}.mp4" for e in range(5) if e != empty]
