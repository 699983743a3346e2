"""The command-line apps, run as a user runs them (console scripts in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import make_episode

from wm.data import DemoStore

BIN = Path(sys.executable).parent


def cli(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=300)


def test_wm_info_json_and_contact_sheet(small_store, tmp_path):
    path, eps = small_store
    sheet = tmp_path / "sheet.png"
    res = cli("wm-info", f"store={path}", "format=json", f"contact_sheet={sheet}", "episodes=3")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["episodes"] == 5 and out["steps"] == sum(len(e["action"]) for e in eps)
    assert out["keys"]["img"]["kind"] == "image" and out["contact_sheet"] == str(sheet)
    assert sheet.stat().st_size > 0


def test_wm_info_text(small_store):
    path, _ = small_store
    res = cli("wm-info", f"store={path}", "contact_sheet=none")
    assert res.returncode == 0, res.stderr
    assert "episodes" in res.stdout and "action" in res.stdout


def test_mujoco_gl_is_chosen_by_the_apps_not_by_the_library():
    # mujoco reads MUJOCO_GL once, when first imported: importing the simulator must leave it alone,
    # importing the apps' package must set EGL unless the caller chose a backend.
    # (With a preset, the simulator is not imported: mujoco would load that backend's library, and
    # OSMesa is not installed everywhere.)
    code = (
        "import os{}; before = os.environ.get('MUJOCO_GL'); import tools; "
        "print(before, os.environ.get('MUJOCO_GL'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    for preset, expected in ((None, ["None", "egl"]), ("osmesa", ["osmesa", "osmesa"])):
        run_env = env if preset is None else {**env, "MUJOCO_GL": preset}
        res = subprocess.run(
            [sys.executable, "-c", code.format(", robots.sim.pointmaze" if preset is None else "")],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == expected


def test_bad_input_is_one_line(tmp_path):
    res = cli("wm-info", f"store={tmp_path / 'missing.zarr'}")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no such store" in res.stderr
    res = cli("wm-convert", f"src={tmp_path}", f"dst={tmp_path / 'x.zarr'}")
    assert res.returncode == 2 and "not a demonstration store, a LeRobot" in res.stderr


def test_sample_store_app(tmp_path):
    out = tmp_path / "sample.zarr"
    res = subprocess.run(
        [sys.executable, "-m", "tools.sample_store", f"out={out}", "episodes=2", "steps=5", "image_size=32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    store = DemoStore.open(out)
    ep = store.get_episode(1)
    assert ep["top"].shape == (5, 32, 32, 3) and ep["top"].std() > 0  # a real render, not a blank frame
    assert np.isfinite(ep["state"]).all() and store.schema.robot == "ball"


def test_wm_convert_robomimic_then_into_lerobot_and_back(tmp_path):
    h5py = __import__("h5py")
    src = tmp_path / "demo.hdf5"
    with h5py.File(src, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "env_kwargs": {"control_freq": 20}})
        for i, T in enumerate([6, 4]):
            ep = make_episode(i, T)
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=ep["action"])
            g.create_dataset("obs/agentview_image", data=ep["img"])
            g.create_dataset("obs/robot0_eef_pos", data=ep["state"][:, :3])
            g.attrs["num_samples"] = T
    store = tmp_path / "from_rm.zarr"
    res = cli("wm-convert", f"src={src}", f"dst={store}")
    assert res.returncode == 0, res.stderr
    assert DemoStore.open(store).n_episodes == 2

    lerobot_dir = tmp_path / "lerobot"
    res = cli("wm-convert", f"src={store}", f"dst={lerobot_dir}")
    assert res.returncode == 0, res.stderr
    back = tmp_path / "back.zarr"
    res = cli("wm-convert", f"src={lerobot_dir}", f"dst={back}")
    assert res.returncode == 0, res.stderr
    a, b = DemoStore.open(store), DemoStore.open(back)
    assert b.n_episodes == 2 and b.schema.fps == 20
    np.testing.assert_array_equal(a.get_episode(1)["agentview_image"], b.get_episode(1)["agentview_image"])
    np.testing.assert_array_equal(a.get_episode(0)["action"], b.get_episode(0)["action"])
