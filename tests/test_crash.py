"""Crash safety: a writer killed with SIGKILL at any moment loses at most the episode in progress;
Ctrl-C in the middle of a write lets it finish first."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_episode, make_schema
from zarr.storage import LocalStore

from wm.data import DemoStore

WRITER = """
import sys
from pathlib import Path
from conftest import make_episode, make_schema
from wm.data import DemoStore

path = Path(sys.argv[1])
store = DemoStore.open(path, mode="a") if path.exists() else DemoStore.create(path, make_schema())
seed = int(sys.argv[2])
print("ready", flush=True)
while True:  # stream episodes step by step until killed
    ep = make_episode(seed, 40 + seed % 30)  # longer than one flush: partial episodes reach the disk
    with store.begin_episode() as w:
        for t in range(len(ep["action"])):
            w.add_step({k: v[t] for k, v in ep.items()})
        w.end({"seed": seed})
    seed += 1
"""


def _check_all(path: Path) -> int:
    store = DemoStore.open(path, mode="a")  # repairs what the killed writer left
    for i in range(store.n_episodes):
        seed = store.episode_info(i)["seed"]
        want = make_episode(seed, 40 + seed % 30)
        got = store.get_episode(i)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"episode {i} key {k}")
    for key in store.keys:
        assert store.array(key).shape[0] == store.n_steps, key
    n = store.n_episodes
    store.close()
    return n


def test_sigkill_mid_episode_loses_only_the_episode_in_progress(tmp_path):
    path = tmp_path / "crash.zarr"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    rng = np.random.default_rng(0)
    seed, committed, partial_rounds = 0, 0, 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(seed)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + rng.uniform(0, 0.4))  # kill at an arbitrary point of some episode
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with DemoStore.open(path) as store:
            partial_rounds += store.array("img").shape[0] > store.n_steps
        n = _check_all(path)
        assert n >= committed, f"round {round_}: episodes went from {committed} to {n}"
        committed = n
        with DemoStore.open(path) as store:
            seed = max(store.episode_info(i)["seed"] for i in range(n)) + 1 if n else seed
    assert committed > 6, "the writer never got far enough to test anything"
    assert partial_rounds >= 1, "no kill landed while a partial episode was on disk"

    # The store still takes appends after all those crashes, and keeps everything.
    store = DemoStore.open(path, mode="a")
    store.append_episode(make_episode(1000, 40 + 1000 % 30), {"seed": 1000})
    store.close()
    assert _check_all(path) == committed + 1


def test_appending_after_crash_before_commit_record(tmp_path):
    """Data and episode_ends written, commit record not: the episode is dropped cleanly."""
    path = tmp_path / "s.zarr"
    store = DemoStore.create(path, make_schema())
    store.append_episode(make_episode(0, 9), {"seed": 0})
    # Reproduce the state a kill between writing episode_ends and the commit record leaves.
    w = store.begin_episode()
    w.add_steps(make_episode(1, 5))
    w._flush()
    ends = store._group["meta/episode_ends"]
    ends.resize((2,))
    ends[1] = 14
    entries = store._group["wm_episode_info"]  # and its info entry, written just before the commit
    entries.resize((2,))
    entries[1] = '{"length":5,"seed":1}'
    store._lock.release()  # the process dies: its lock goes with it
    del store
    reopened = DemoStore.open(path, mode="a")
    assert reopened.n_episodes == 1 and reopened.array("img").shape[0] == 9
    assert reopened._group["meta/episode_ends"].shape == (1,)
    assert reopened._group["wm_episode_info"].shape == (1,)
    reopened.append_episode(make_episode(2, 4), {"seed": 2})
    assert list(reopened.episode_ends) == [9, 13]
    infos = [reopened.episode_info(i) for i in range(2)]
    assert infos == [{"length": 9, "seed": 0}, {"length": 4, "seed": 2}]


@pytest.mark.parametrize(
    "write, steps, kept",
    [
        ("zarr.json", 30, 2),  # the commit record of an episode end() commits: it is kept whole
        ("data/img/c/", 30, 2),  # a chunk end() flushes: the same
        ("data/img/c/", 70, 1),  # a chunk add_steps flushes (past FLUSH_STEPS): the episode is dropped
    ],
)
def test_ctrl_c_while_a_write_is_under_way_finishes_it_then_stops(tmp_path, monkeypatch, write, steps, kept):
    """zarr writes on its own thread while the caller waits: a KeyboardInterrupt raised in the wait left
    the write running behind the episode's discard, and a commit record landing after it gave a store
    that no longer opened ("data/img: has 30 steps but episodes end at 60"). Here Ctrl-C arrives while
    the disk is slow to take the file `write` (the first such file of the interrupted episode)."""
    path = tmp_path / "s.zarr"
    store = DemoStore.create(path, make_schema())
    store.append_episode(make_episode(0, 30), {"seed": 0})
    original, hit = LocalStore.set, []

    async def slow_disk(self, key, value):
        if not hit and (key == write if write == "zarr.json" else key.startswith(write)):
            hit.append(key)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, seen by the main thread waiting on this write
            await asyncio.sleep(0.3)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", slow_disk)
    with pytest.raises(KeyboardInterrupt):
        with store.begin_episode() as writer:
            writer.add_steps(make_episode(1, steps))
            writer.end({"seed": 1})
    monkeypatch.undo()
    assert hit, "the write never happened"
    assert store.n_episodes == kept
    store.close()
    with DemoStore.open(path) as reopened:
        assert reopened.n_episodes == kept
        assert all(reopened.array(k).shape[0] == reopened.n_steps for k in reopened.keys)
        last = reopened.get_episode(kept - 1)["img"]
        np.testing.assert_array_equal(last, make_episode(kept - 1, 30)["img"])


def test_interrupts_held_holds_a_sigterm_python_handles_and_leaves_its_default_alone():
    """wm-eval and wm-collect turn SIGTERM into an interrupt: one in a block that must finish (a run's
    outputs replacing the earlier run's, a commit) is delivered after it."""
    from tools._cli import interrupt
    from wm.interrupt import interrupts_held

    seen: list[str] = []
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            with interrupts_held():
                signal.raise_signal(signal.SIGTERM)
                seen.append("block finished")
        assert seen == ["block finished"] and info.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with interrupts_held():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # not Python's: left as it is
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interrupts_held_lets_a_second_interrupt_through_when_asked():
    """`second_interrupts=True` (a block waiting on ffmpeg, which may hang): the first Ctrl-C is held, a
    second interrupts the block at once, and the first is not delivered again after it."""
    from wm.interrupt import interrupts_held

    seen: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held(second_interrupts=True):
            signal.raise_signal(signal.SIGINT)
            seen.append("held")
            signal.raise_signal(signal.SIGINT)
            seen.append("not reached")
    assert seen == ["held"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # one alone is held to the end of the block, as without
        with interrupts_held(second_interrupts=True):
            signal.raise_signal(signal.SIGINT)
            seen.append("block")
    assert seen == ["held", "block"]


def test_interrupts_held_delivers_ctrl_c_after_the_block_and_leaves_other_handlers_alone():
    from wm.interrupt import interrupts_held

    seen: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            with interrupts_held():  # nested
                signal.raise_signal(signal.SIGINT)
                seen.append("inner block finished")
            seen.append("outer block finished")
    assert seen == ["inner block finished", "outer block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append("handler"))
    try:  # an application's own handler (wm-collect's stop flag) is called once, after the block
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            seen.append("block")
        assert seen[-2:] == ["block", "handler"]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_held():  # an ignored Ctrl-C stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
