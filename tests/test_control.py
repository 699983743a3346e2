"""Fixed-rate loop scheduling with a manual clock: absolute deadlines, no drift, resync when far behind."""

from __future__ import annotations

import pytest

from robots.control import ManualClock, RateLoop, next_deadline, ticks_behind


def test_deadlines_are_absolute():
    assert next_deadline(10.0, 0.1, 0) == pytest.approx(10.1)
    assert next_deadline(10.0, 0.1, 9) == pytest.approx(11.0)
    assert ticks_behind(10.35, 10.0, 0.1, 0) == 2
    assert ticks_behind(10.05, 10.0, 0.1, 0) == 0


def test_loop_holds_rate_without_drift():
    clock = ManualClock(100.0)
    loop = RateLoop(10.0, clock)
    for _ in range(50):
        clock.advance(0.03)  # 30 ms of work in a 100 ms period
        assert loop.wait() < 0
    assert clock.now() == pytest.approx(105.0)  # exactly 50 periods, no accumulated drift
    assert loop.overruns == 0 and loop.achieved_hz == pytest.approx(10.0)


def test_slow_tick_borrows_from_later_ones():
    clock = ManualClock(0.0)
    loop = RateLoop(10.0, clock)
    clock.advance(0.15)  # tick 0 overruns by 50 ms
    assert loop.wait() == pytest.approx(0.05)
    clock.advance(0.01)  # tick 1 is short: the loop catches up to the original schedule
    loop.wait()
    assert clock.now() == pytest.approx(0.2)
    assert loop.overruns == 1 and loop.max_late_s == pytest.approx(0.05)


def test_far_behind_resynchronizes_instead_of_bursting():
    clock = ManualClock(0.0)
    loop = RateLoop(10.0, clock, max_behind=3)
    clock.advance(1.0)  # a 1 s stall: 9 deadlines missed
    loop.wait()
    clock.advance(0.01)
    loop.wait()
    # After resync the next deadline is one period ahead of the stall, not 9 immediate ticks.
    assert clock.now() == pytest.approx(1.1)


def test_bad_rate():
    with pytest.raises(ValueError, match="positive"):
        RateLoop(0.0, ManualClock())


@pytest.mark.parametrize("hz", [float("inf"), float("nan"), -5.0, "10", None, True, 1e-320])
def test_a_rate_that_is_not_a_positive_finite_number_is_refused_in_one_line(hz):
    """hz=inf made a zero period: the loop ran unpaced and its first late tick raised ZeroDivisionError."""
    with pytest.raises(ValueError, match=r"^loop rate must be a positive finite number of Hz, got "):
        RateLoop(hz, ManualClock())


def test_a_clock_that_jumps_back_resynchronizes_instead_of_sleeping_until_the_old_deadline():
    clock = ManualClock(1000.0)
    loop = RateLoop(10.0, clock)
    clock.advance(0.03)
    loop.wait()
    clock.t = 10.0  # a clock set back by ~990 s
    clock.advance(0.03)
    assert loop.wait() == 0.0
    assert clock.now() == pytest.approx(10.03)  # it did not sleep until t=1000.2
    clock.advance(0.03)
    loop.wait()
    assert clock.now() == pytest.approx(10.13)  # the schedule goes on from the new time, at the same rate
