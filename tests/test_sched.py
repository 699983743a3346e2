"""`wm.sched.normal_priority`: no real-time scheduling inside the block, for the calling thread and the
threads it starts; the right to it back afterwards."""

from __future__ import annotations

import resource
import threading

import pytest
from conftest import can_raise_priority

from wm.sched import normal_priority

pytestmark = pytest.mark.skipif(
    not can_raise_priority(), reason="this process cannot raise a thread to real-time priority"
)


def test_inside_the_block_no_thread_may_switch_to_real_time_scheduling():
    limit = resource.getrlimit(resource.RLIMIT_RTPRIO)
    results = []
    with normal_priority():
        results.append(can_raise_priority())
        worker = threading.Thread(target=lambda: results.append(can_raise_priority()))  # started inside
        worker.start()
        worker.join()
        assert resource.getrlimit(resource.RLIMIT_RTPRIO)[0] == 0
    assert results == [False, False]
    assert can_raise_priority()  # after the block the calling thread may again
    assert resource.getrlimit(resource.RLIMIT_RTPRIO) == limit


def test_the_right_comes_back_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"), normal_priority():
        raise RuntimeError("inside")
    assert can_raise_priority()
