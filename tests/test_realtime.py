"""Real-time scheduling of the control loop (`robots.runtime.realtime`): applied inside the block,
undone after it, and a line instead of a failure when the machine does not allow it."""

from __future__ import annotations

import os

import pytest

from robots.runtime.loop import RuntimeConfig
from robots.runtime.realtime import realtime, worker_cpus

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling calls")


def can_raise_priority() -> bool:
    try:
        param = os.sched_getparam(0)
        policy = os.sched_getscheduler(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, policy, param)
        return True
    except PermissionError:
        return False


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


def test_what_can_never_work_is_refused_before_a_robot_moves():
    with pytest.raises(ValueError, match="realtime_priority must be 1..99, got 120"):
        RuntimeConfig(realtime_priority=120)
    with pytest.raises(ValueError, match="control_cpu=4096 is not a core this process may use"):
        RuntimeConfig(control_cpu=4096)
    with pytest.raises(ValueError, match="are for mode=async"):
        RuntimeConfig(mode="sync", realtime_priority=50)
