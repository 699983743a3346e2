"""Shared fixtures: small stores written with the real zarr store, one torch thread for tiny tensors."""

from __future__ import annotations

import json
import os
import signal
import zipfile

# Under pytest-xdist (`make test`: two workers), each worker and the apps it starts use their share of the
# cores: two workers of two OpenMP threads each on two cores stalled each other in OpenMP barriers (set
# before numpy and torch are imported: their thread pools read it then)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zarr  # noqa: E402

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


_SCHEDULING = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)  # pytest's, at start


def scheduling() -> tuple[int, int]:
    """The calling thread's scheduling policy and priority."""
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


def can_raise_priority() -> bool:
    """Whether this process may switch a thread to real-time scheduling (root, CAP_SYS_NICE or an
    RLIMIT_RTPRIO above 0): only then can a library do it behind our back, and a test of that fail."""
    before = scheduling()
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        return False
    os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
    return True


@pytest.fixture(autouse=True)
def _scheduling_kept():
    """A test must leave pytest's thread at the scheduling it started with: every process started later
    inherits it (lerobot's AV1 encoder left it at SCHED_FIFO 99 for the rest of the run)."""
    yield
    now = scheduling()
    if now != _SCHEDULING:
        os.sched_setscheduler(0, _SCHEDULING[0], os.sched_param(_SCHEDULING[1]))
        pytest.fail(f"the test left pytest's thread at (policy, priority) {now}, not {_SCHEDULING}")


@pytest.fixture(autouse=True)
def _signal_handlers_kept():
    """A test leaves the process's signal handlers as it found them: an app run in this process installs
    its own (wm-collect's Ctrl-C and SIGTERM handlers stay, as in the process they are made for), and a
    later test then met them instead of Python's."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in signals}
    yield
    for s, handler in before.items():
        if handler is not None and signal.getsignal(s) is not handler:
            signal.signal(s, handler)


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


def flip_bit_in_zip_entry(path, entry: str, at: int = 0) -> None:
    """Flip one bit of the stored bytes of `path`'s zip entry `entry` (e.g. "data/0"), `at` bytes in."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/" + entry))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len + at
        f.seek(start)
        b = f.read(1)
        f.seek(start)
        f.write(bytes([b[0] ^ 0x10]))
