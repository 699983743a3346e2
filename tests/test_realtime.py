"""Real-time scheduling of the control loop (`robots.runtime.realtime`): applied inside the block,
undone after it, and a line instead of a failure when the machine does not allow it; and the garbage
collector kept off the timed path (`QuietGC`)."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest

from robots.runtime.loop import RuntimeConfig
from robots.runtime.realtime import QuietGC, realtime, usable_cores, worker_cpus

linux = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling calls")


def can_raise_priority() -> bool:
    try:
        param = os.sched_getparam(0)
        policy = os.sched_getscheduler(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, policy, param)
        return True
    except PermissionError:
        return False


@linux
def test_the_loop_runs_fifo_on_its_core_inside_the_block_and_as_before_after_it():
    cpus_before, policy_before = os.sched_getaffinity(0), os.sched_getscheduler(0)
    core = max(cpus_before)
    with realtime(10, core) as notes:
        assert os.sched_getaffinity(0) == {core}
        if can_raise_priority():
            assert notes == [] and os.sched_getscheduler(0) == os.SCHED_FIFO
            assert os.sched_getparam(0).sched_priority == 10
        else:
            assert len(notes) == 1 and "needs root or CAP_SYS_NICE" in notes[0]
    assert os.sched_getaffinity(0) == cpus_before and os.sched_getscheduler(0) == policy_before
    if len(cpus_before) > 1:
        assert worker_cpus(core) == tuple(sorted(cpus_before - {core}))
    assert worker_cpus(None) is None


@linux
def test_a_recording_thread_started_inside_the_block_runs_at_normal_priority_off_the_control_core(tmp_path):
    """Threads inherit their creator's policy and cores: wm-deploy's recording thread, started by the
    control thread, ran under SCHED_FIFO on the control loop's own core."""
    from conftest import make_episode, make_schema

    from robots.runtime.recorder import BackgroundEpisode
    from wm.data import DemoStore

    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2 or not can_raise_priority():
        pytest.skip("needs two cores and the right to raise a thread's priority")
    core, seen = max(cpus), []
    rest = worker_cpus(core)  # as wm-deploy does, before the block (inside it this thread has one core)
    with DemoStore.create(tmp_path / "rec.zarr", make_schema()) as store:
        writer = store.begin_episode()
        add_step = writer.add_step

        def add_step_seen(row):  # runs on the recording thread
            seen.append((os.sched_getscheduler(0), os.sched_getaffinity(0)))
            add_step(row)

        writer.add_step = add_step_seen
        with realtime(10, core):
            recording = BackgroundEpisode(writer, rest)
            for t in range(3):
                recording.add_step({k: v[t] for k, v in make_episode(0, 3).items()})
            assert recording.end({}) is None
    assert seen == [(os.SCHED_OTHER, cpus - {core})] * 3


@linux
def test_inference_threads_follow_the_cores_the_process_may_use():
    """wm-deploy and wm-serve sized torch's threads from the machine's core count: under a cpuset
    (`docker --cpuset-cpus`, taskset) on a many-core host, far more threads than cores."""
    from tools.deploy import DeployConfig, _inference_threads

    mine = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mine)})
        assert (
            usable_cores() == 1
            and _inference_threads(DeployConfig(robot="pointmaze", controller="random", out="o")) == 1
        )
    finally:
        os.sched_setaffinity(0, mine)
    assert usable_cores() == len(mine)


def test_what_can_never_work_is_refused_before_a_robot_moves():
    with pytest.raises(ValueError, match="realtime_priority must be 1..99, got 120"):
        RuntimeConfig(realtime_priority=120)
    with pytest.raises(ValueError, match="control_cpu=4096 is not a core this process may use"):
        RuntimeConfig(control_cpu=4096)
    with pytest.raises(ValueError, match="are for mode=async"):
        RuntimeConfig(mode="sync", realtime_priority=50)


class Node:
    """A container that can sit in a reference cycle (only the cycle collector frees those)."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_quiet_gc_collects_young_cycles_in_steps_and_frees_the_rest_after_the_block():
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    with QuietGC() as quiet:
        assert not gc.isenabled() and gc.get_freeze_count() > frozen_before  # what existed is frozen
        young = cycle()  # garbage made since the last step: the next step frees it
        assert young() is not None
        quiet.step()
        assert young() is None
        a, b = Node(), Node()  # a cycle still in use at a step survives it and is frozen...
        a.other, b.other = b, a
        held = weakref.ref(a)
        quiet.step()
        del a, b
        for _ in range(3):  # ...so no later step walks it again, even once it is garbage
            cycle()
            quiet.step()
        assert held() is not None
        quiet.renew()  # a full pass, where a pause does no harm
        assert held() is None and not gc.isenabled()
        a, b = Node(), Node()
        a.other, b.other = b, a
        held = weakref.ref(a)
        quiet.step()
        del a, b
    assert gc.isenabled() and gc.get_freeze_count() == frozen_before  # as it was
    gc.collect()
    assert held() is None  # unfrozen at the end of the block: the collector frees it


def test_quiet_gc_disabled_or_inside_a_collector_already_off_leaves_it_as_it_was():
    with QuietGC(enabled=False) as quiet:
        assert gc.isenabled() and not quiet.active
        young = cycle()
        quiet.step()  # does nothing
        assert young() is not None
    gc.collect()
    assert young() is None
    gc.disable()
    try:
        with QuietGC():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a collector the caller had turned off stays off
    finally:
        gc.enable()


def test_quiet_gc_blocks_that_overlap_on_two_threads_keep_it_quiet_until_the_last_ends():
    """A server's block and a runtime's in one process: the first to end turned the collector back on
    and unfroze everything under the other's still-running loop."""
    first_open, first_closed, second_closed = threading.Event(), threading.Event(), threading.Event()
    seen, frozen_before = {}, gc.get_freeze_count()

    def first() -> None:
        with QuietGC():
            first_open.set()
            second_open.wait(5)
        first_closed.set()
        seen["after the first"] = gc.isenabled()
        second_closed.wait(5)

    second_open = threading.Event()
    thread = threading.Thread(target=first)
    thread.start()
    first_open.wait(5)
    with QuietGC():
        second_open.set()
        first_closed.wait(5)
        assert not gc.isenabled() and gc.get_freeze_count() > frozen_before  # still quiet for this block
    second_closed.set()
    thread.join(5)
    assert seen["after the first"] is False and gc.isenabled() and gc.get_freeze_count() == frozen_before


@linux
@pytest.mark.parametrize(
    "rtprio, said",
    [
        (5, "this user's RLIMIT_RTPRIO allows up to 5: give runtime.realtime_priority=5"),
        (0, "needs root or CAP_SYS_NICE"),
    ],
)
def test_a_priority_above_the_users_rtprio_limit_says_which_one_it_may_have(monkeypatch, rtprio, said):
    """A user given rtprio 5 in limits.conf who asked for 10 was told it needs root."""
    import resource

    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)  # (the kernel's answer without the right)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (rtprio, rtprio))
    with realtime(10, None) as notes:
        assert notes == [
            f"the control loop could not run under SCHED_FIFO ({said}); it runs at normal priority"
        ]
