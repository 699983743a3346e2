"""`wm.sched.normal_priority`: no real-time scheduling inside the block, for the calling thread and the
threads it starts; the right to it back afterwards."""

from __future__ import annotations

import os
import resource
import threading

import pytest
from conftest import can_raise_priority, scheduling

from wm.sched import normal_priority

pytestmark = pytest.mark.skipif(
    not can_raise_priority(), reason="this process cannot raise a thread to real-time priority"
)


def _try_fifo() -> str:
    """'raised' (then put back) or 'refused'."""
    before = scheduling()
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        return "refused"
    os.sched_setscheduler(0, before[0], os.sched_param(before[1]))
    return "raised"


def test_inside_the_block_no_thread_may_switch_to_real_time_scheduling():
    limit = resource.getrlimit(resource.RLIMIT_RTPRIO)
    results = []
    with normal_priority():
        results.append(_try_fifo())
        worker = threading.Thread(target=lambda: results.append(_try_fifo()))  # started inside: inherits
        worker.start()
        worker.join()
        assert resource.getrlimit(resource.RLIMIT_RTPRIO)[0] == 0
    assert results == ["refused", "refused"]
    assert _try_fifo() == "raised"  # after the block the calling thread may again
    assert resource.getrlimit(resource.RLIMIT_RTPRIO) == limit


def test_the_right_comes_back_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"), normal_priority():
        raise RuntimeError("inside")
    assert _try_fifo() == "raised"
