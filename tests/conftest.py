"""Shared fixtures: small stores written with the real zarr store, one torch thread for tiny tensors."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import zarr

# Ctrl-C is KeyboardInterrupt, which the interruption tests send, also when pytest runs as a background
# job of a shell without job control (it inherits SIGINT ignored; so would the tools they start)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WM_KERNEL_CACHE", "off")  # kernel choices stay in-process: no user cache written

from wm.data import DemoStore, KeySpec, Schema  # noqa: E402

IMG = (24, 32, 3)


def make_schema() -> Schema:
    return Schema(
        keys={
            "img": KeySpec(IMG, "uint8", "image"),
            "state": KeySpec((4,), "float32", "proprio", units="m"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=10,
        robot="test_bot",
        task="test_task",
    )


def make_episode(seed: int, length: int) -> dict[str, np.ndarray]:
    """Deterministic episode content: the same seed always gives the same bytes."""
    rng = np.random.default_rng(seed)
    return {
        "img": rng.integers(0, 256, (length, *IMG), dtype=np.uint8),
        "state": rng.normal(size=(length, 4)).astype(np.float32),
        "action": rng.normal(size=(length, 2)).astype(np.float32),
    }


def as_format_1(path) -> None:
    """Turn a store into what this code wrote before format 2: every episode's info in the root attributes
    (`wm_episodes`), no info array, schema format version 1."""
    group = zarr.open_group(str(path), mode="r+")
    records = [json.loads(str(t)) for t in group["wm_episode_info"][:]]
    attrs = dict(group.attrs)
    del group["wm_episode_info"]
    schema = {**attrs.pop("wm_schema"), "format_version": 1}
    attrs.pop("wm_committed")
    group.attrs.put({**attrs, "wm_schema": schema, "wm_episodes": records})


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: as fast, and it cannot stall in OpenMP barriers
    when the machine is shared and loaded (BENCHMARKS.md, "Figures from development"). A module asks
    for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_store(tmp_path):
    """A store with 5 episodes of lengths 7..11 (episode i made from seed i)."""
    path = tmp_path / "small.zarr"
    store = DemoStore.create(path, make_schema())
    episodes = [make_episode(i, 7 + i) for i in range(5)]
    for i, ep in enumerate(episodes):
        store.append_episode(ep, {"success": i % 2 == 0, "notes": f"ep{i}"})
    store.close()
    return path, episodes
