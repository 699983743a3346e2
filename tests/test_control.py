"""Fixed-rate loop scheduling with a manual clock: absolute deadlines, no drift, resync when far behind."""

from __future__ import annotations

import pytest

from robots.control import ManualClock, RateLoop, next_deadline


def test_deadlines_are_absolute():
    assert next_deadline(10.0, 0.1, 0) == pytest.approx(10.1)
    assert next_deadline(10.0, 0.1, 9) == pytest.approx(11.0)


def test_loop_holds_rate_without_drift():
    clock = ManualClock(100.0)
    loop = RateLoop(10.0, clock)
    for _ in range(50):
        clock.advance(0.03)  # 30 ms of work in a 100 ms period
        assert loop.wait() < 0
    assert clock.now() == pytest.approx(105.0)  # exactly 50 periods, no accumulated drift
    assert loop.overruns == 0 and loop.achieved_hz == pytest.approx(10.0)


def test_a_late_iteration_skips_to_the_next_slot_at_least_half_a_period_away():
    clock = ManualClock(0.0)
    loop = RateLoop(10.0, clock)
    clock.advance(0.15)  # iteration 0 overruns by 50 ms
    assert loop.wait() == pytest.approx(0.05)
    assert clock.now() == pytest.approx(0.2)  # iteration 1 was due at 0.1: skipped
    clock.advance(0.01)
    loop.wait()
    assert clock.now() == pytest.approx(0.3)  # on the original grid
    assert (loop.overruns, loop.skipped, loop.iterations) == (1, 1, 2)
    assert loop.max_late_s == pytest.approx(0.05)


def test_far_behind_skips_the_passed_slots_instead_of_bursting():
    clock = ManualClock(0.0)
    loop = RateLoop(10.0, clock)
    clock.advance(1.0)  # a 1 s stall: 9 deadlines missed
    loop.wait()
    assert clock.now() == pytest.approx(1.1)  # not 9 immediate iterations
    clock.advance(0.01)
    loop.wait()
    assert clock.now() == pytest.approx(1.2)
    assert loop.skipped == 10 and loop.iterations == 2


@pytest.mark.parametrize("work", [0.06, 0.1, 0.1001, 0.14, 0.17, 0.38, 2.0])
def test_an_iteration_never_follows_a_late_one_at_once(work):
    """wm-collect's teleoperation loop caught up to 3 missed deadlines without sleeping: after one slow
    read, 4 step-capped targets went to the arm within 4 ms. The next iteration now begins at least half
    a period after a late one ends, on the schedule's grid; an iteration on time is not delayed."""
    clock = ManualClock(0.0)
    loop = RateLoop(10.0, clock)
    clock.advance(work)  # iteration 0 (due at 0.1)
    ended = clock.now()
    loop.wait()
    gap = clock.now() - ended  # until iteration 1 begins
    if work <= 0.1:
        assert clock.now() == pytest.approx(0.1)
    else:
        assert 0.05 - 1e-12 <= gap < 0.15 + 1e-12
    assert round(clock.now() / 0.1, 6) % 1 == 0  # on the grid: no drift


def test_restart_begins_a_schedule_and_its_counts():
    clock = ManualClock(0.0)
    loop = RateLoop(10.0, clock)
    clock.advance(0.5)
    loop.wait()
    assert loop.overruns == 1 and loop.skipped == 5
    clock.advance(3.0)  # the operator sets the next episode up
    loop.restart()
    for _ in range(10):
        clock.advance(0.02)
        loop.wait()
    assert (loop.overruns, loop.skipped, loop.max_late_s, loop.iterations) == (0, 0, 0.0, 10)
    assert loop.achieved_hz == pytest.approx(10.0)


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
