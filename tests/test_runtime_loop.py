"""The control loop on a simulated clock: the scheduling decisions (stale dropping by measured time,
the committed prefix handed to the controller, the synchronous baseline's waiting, a human's
takeover) on a real simulated task, with a chunk latency the test chooses (`SimulatedTimeWorker`)."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest

from robots.control import ManualClock
from robots.registry import make_task
from robots.runtime.intervention import Takeover
from robots.runtime.loop import Runtime, RuntimeConfig
from robots.runtime.ticks import NO_CHUNK
from robots.runtime.worker import ControllerSpec, SimulatedTimeWorker
from robots.sim.base import SimConfig
from robots.teleop.fakes import FakeClock, FakeKeyListener
from robots.teleop.keyboard import KeyboardDevice
from robots.teleop.mapping import ActionMapper, robot_mapper

HZ, DELAY, CHUNK = 10.0, 0.25, 8
MODEL_S = 0.001  # the simulated model's seconds per chunk, added to DELAY


def setup(mode: str, stitching: str, replan_every: int, chunk: int = CHUNK, delay: float = DELAY, **options):
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=400))
    feat = task.action_feature
    spec = ControllerSpec(
        "policies.evaluate:RandomPolicy",
        {"low": list(feat.low), "high": list(feat.high), "seed": 3, "chunk": chunk},
        delay_s=delay,
    )
    clock = ManualClock(100.0)
    worker = SimulatedTimeWorker(spec, clock, compute_s=MODEL_S)  # (measured, a loaded machine moved it)
    worker.start()
    task.reset(0)
    cfg = RuntimeConfig(mode=mode, stitching=stitching, replan_every=replan_every, **options)
    return task, Runtime(task, worker, cfg, clock=clock), clock


def test_async_drops_what_passed_and_continues_the_committed_actions():
    task, rt, _ = setup("async", "inpaint", replan_every=4)
    controller, calls = rt.worker.controller, []
    chunk_from = controller.chunk_from

    def spy(steps, actions, previous=None, frozen=0):  # what the controller was handed, and gave
        chunk = chunk_from(steps, actions, previous, frozen)
        calls.append((None if previous is None else previous[0].copy(), frozen, chunk[0].numpy().copy()))
        return chunk

    controller.chunk_from = spy
    sent: list[tuple[np.ndarray, int, int]] = []
    out = rt.run_episode(40, on_tick=lambda r, o: sent.append((r.command, r.chunk, r.index)))
    assert out.stopped is None and out.underruns == 0 and out.stale_sent == 0 and len(out.ticks) == 40
    later = out.chunks[2:]  # once the latency is known
    # The observation read after a tick's send shows the world at the next tick (the simulator advanced
    # it inside the send), and is stamped so; each chunk arrives 0.25 s (+ the model's own time) after
    # the read: the actions due at that next tick and the one after it are over (dropped), the rest runs.
    assert [c.dropped_stale for c in later] == [2] * len(later)
    # Frozen are exactly the actions the new chunk arrives too late for (they run from the current
    # schedule); one more would pin an action the new chunk itself sends to the old plan.
    assert [c.frozen for c in later] == [c.dropped_stale for c in later]
    # What the controller is handed as committed is the previous chunk, re-indexed from the new
    # observation's tick on (its actions shifted by the ticks between the two observations).
    tick = [round((c.obs_time - out.started_at) * HZ) for c in out.chunks]
    for i in range(2, len(out.chunks)):
        previous, frozen, _ = calls[i]
        old = calls[i - 1][2]
        shift = tick[i] - tick[i - 1]
        n = min(len(previous), len(old) - shift)
        assert n >= frozen and np.allclose(previous[:n], old[shift : shift + n])
    # ... and the first action a new chunk sends is its first free one: index 2.
    first = {}
    for cmd, chunk, index in sent:
        first.setdefault(chunk, (index, cmd))
    assert all(first[i][0] == 2 for i in range(2, len(out.chunks)) if i in first)
    assert all(np.isfinite(c).all() for c, _, _ in sent)


@pytest.mark.parametrize("stitching", ["replace", "average", "ensemble"])
def test_other_stitchings_hand_on_the_schedule_unguided_and_only_to_who_takes_it(stitching):
    """Only inpainting handed the controller the schedule, so an MPC planner under replace stitching
    warm-started from its last plan shifted by its `execute`, not by the steps that had actually run."""
    _, rt, _ = setup("async", stitching, replan_every=4)
    controller, calls = rt.worker.controller, []
    chunk_from = controller.chunk_from

    def spy(steps, actions, previous=None, frozen=0, guide=True):
        chunk = chunk_from(steps, actions, previous, frozen, guide)
        calls.append((None if previous is None else previous[0].copy(), frozen, guide, chunk[0].numpy()))
        return chunk

    controller.chunk_from = spy
    out = rt.run_episode(40)
    assert out.stopped is None and len(calls) > 4 and calls[0][0] is None  # the first: nothing scheduled
    assert all(frozen == 0 and (prev is None or not guide) for prev, frozen, guide, _ in calls)
    tick = [round((c.obs_time - out.started_at) * HZ) for c in out.chunks]
    for i in range(2, len(tick)):  # each the chunk that was running, from the new observation's step on
        previous, old, shift = calls[i][0], calls[i - 1][3], tick[i] - tick[i - 1]
        n = min(len(previous), len(old) - shift)
        assert n > 0 and np.allclose(previous[:n], old[shift : shift + n]), stitching

    handed = []  # a controller written before `guide`: handed nothing, as before
    rt.worker.controller.chunk_from = lambda steps, actions, previous=None, frozen=0: (
        handed.append(previous) or chunk_from(steps, actions, previous, frozen)
    )
    rt.run_episode(20)
    assert handed and all(p is None for p in handed)


def test_a_synchronous_robot_hands_on_the_rest_of_its_last_chunk_unguided():
    """A synchronous robot runs `replan_every` actions of each chunk and then asks again from there: the
    rest of the chunk is the schedule from that observation on (an MPC planner warm-started from its own
    plan shifted by its `execute`, whatever replan_every was)."""
    _, rt, _ = setup("sync", "replace", replan_every=3)
    calls, chunk_from = [], rt.worker.controller.chunk_from

    def spy(steps, actions, previous=None, frozen=0, guide=True):
        chunk = chunk_from(steps, actions, previous, frozen, guide)
        calls.append((None if previous is None else previous[0].copy(), frozen, guide, chunk[0].numpy()))
        return chunk

    rt.worker.controller.chunk_from = spy
    out = rt.run_episode(12)
    assert out.stopped is None and len(calls) >= 3 and calls[0][0] is None
    for (_, _, _, before), (previous, frozen, guide, _) in zip(calls, calls[1:], strict=False):
        assert frozen == 0 and not guide and np.array_equal(previous, before[3:])


@pytest.mark.parametrize("overlap", [0, 1, None])
def test_inpaint_overlap_bounds_what_the_controller_continues(overlap):
    _, rt, _ = setup("async", "inpaint", replan_every=4, inpaint_overlap=overlap)
    handed, chunk_from = [], rt.worker.controller.chunk_from

    def spy(steps, actions, previous=None, frozen=0):
        handed.append((0 if previous is None else previous.shape[1], frozen))
        return chunk_from(steps, actions, previous, frozen)

    rt.worker.controller.chunk_from = spy
    out = rt.run_episode(40)
    assert out.stale_sent == 0 and out.underruns == 0
    # Once the latency is known, each request finds 4 actions scheduled from its observation on (a chunk
    # of 8 loses 2 to latency and has run 2 more), the first 2 of them frozen; it hands on `overlap` more.
    later = handed[2:]
    assert later and all(frozen == 2 for _, frozen in later)
    assert all(n == (4 if overlap is None else 2 + overlap) for n, _ in later)
    with pytest.raises(ValueError, match="inpaint_overlap must be >= 0"):
        RuntimeConfig(inpaint_overlap=-1)


def test_a_simulated_robot_runs_each_action_at_the_state_it_was_computed_for():
    # A simulator advances a whole period inside `send_action`, so what it shows after a send is the
    # state the next command acts on. With no latency, asynchronous execution that asks for a chunk
    # every 4 steps then sends what the synchronous robot sends, tick by tick: each chunk from its first
    # action on (stamped with the read's own time, every chunk ran one action early instead).
    runs = {}
    for mode in ("sync", "async"):
        _, rt, _ = setup(mode, "replace", replan_every=4, delay=0.0)
        out = rt.run_episode(24)
        assert all(c.dropped_stale == 0 for c in out.chunks) and out.stale_sent == 0
        runs[mode] = [(t.chunk, t.index) for t in out.ticks], np.array([t.command for t in out.ticks])
    assert runs["async"][0] == runs["sync"][0] == [(i // 4, i % 4) for i in range(24)]
    assert np.array_equal(runs["async"][1], runs["sync"][1])


@pytest.mark.parametrize("quiet", [True, False])
def test_ticks_run_with_the_garbage_collector_quiet_and_the_episode_restores_it(quiet):
    _, rt, _ = setup("async", "replace", replan_every=4, quiet_gc=quiet)
    during: list[tuple[bool, int]] = []
    out = rt.run_episode(20, on_tick=lambda r, o: during.append((gc.isenabled(), gc.get_freeze_count())))
    assert len(out.ticks) == 20 and out.stopped is None
    if quiet:  # no automatic pass during the ticks; each tick's survivors are frozen in its slack
        assert not any(enabled for enabled, _ in during) and during[-1][1] > during[0][1]
    else:
        assert all(enabled for enabled, _ in during)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_replace_without_the_committed_prefix_still_never_sends_late():
    _, rt, _ = setup("async", "replace", replan_every=4)
    out = rt.run_episode(40)
    assert out.stale_sent == 0 and out.underruns == 0
    assert all(c.frozen == 0 for c in out.chunks)


@pytest.mark.parametrize(("stall", "passed"), [(0.13, 0), (0.22, 1), (0.27, 2), (0.36, 3)])
def test_a_late_tick_sends_the_action_due_now_and_the_ticks_after_it_keep_their_pace(stall, passed):
    """One send stalls (a bus write): the next tick starts 0.3-2.5 periods late. It sent the action due
    at its missed deadline, and the ticks whose deadlines had also passed followed back to back, each
    sending an action whose time was over (counted, but sent: a burst of targets)."""
    task, rt, clock = setup("async", "replace", replan_every=4, delay=0.0)
    send, sends = task.send_action, []

    def stalling(action):
        sends.append(clock.now())
        if len(sends) == 6:
            clock.advance(stall)
        return send(action)

    task.send_action = stalling
    out = rt.run_episode(20)
    period = 1.0 / HZ
    fresh = [t for t in out.ticks if t.chunk != NO_CHUNK]
    assert out.stale_sent == 0 and all(abs(t.sent_at - t.due) <= period / 2 + 1e-9 for t in fresh)
    assert np.all(np.diff(sends) >= period / 2 - 1e-9)  # no two sends in one moment
    before, late = out.ticks[5], out.ticks[6]  # the stalled send's tick, and the next
    assert late.started - late.nominal == pytest.approx(stall - period, abs=1e-6)  # its lateness counts
    assert late.chunk == before.chunk and late.index == before.index + 1 + passed  # the slots passed over
    assert out.skipped >= passed


def test_sync_waits_for_each_chunk_and_restarts_its_schedule():
    _, rt, clock = setup("sync", "replace", replan_every=4)
    out = rt.run_episode(12)
    starts = np.array([t.started for t in out.ticks]) - out.started_at
    errors = np.array([t.started - t.nominal for t in out.ticks])
    # Four actions a chunk; asked for right after the fourth is sent, the next one comes 0.25 s (and the
    # model's time) later, and the robot waits for it.
    gaps = np.diff(starts)
    assert np.allclose(gaps[[0, 1, 2, 4, 5, 6]], 1 / HZ) and gaps[3] > DELAY
    assert errors[4] > DELAY - 0.1 - 1e-9 and abs(errors[5]) < 1e-9  # the missed deadline, then on time
    assert out.stale_sent == 0 and out.chunks[1].dropped_stale == 0
    assert all(t.chunk != NO_CHUNK for t in out.ticks)


def test_sync_waits_are_the_modes_not_the_watchdogs():
    """A synchronous robot waits for every chunk (wait_timeout_s bounds that); the watchdog counted the
    wait and the action latency after it, and stopped a healthy run whose model took 1.8 s with a
    0.3 s latency ("no fresh action for 2.00 s")."""
    from robots.runtime.safety import SafetyConfig

    safety = SafetyConfig(hold_after_s=0.5, stop_after_s=2.0)
    _, rt, _ = setup("sync", "replace", 4, delay=1.8, action_latency_s=0.3, safety=safety)
    out = rt.run_episode(20)
    assert out.stopped is None and len(out.ticks) == 20  # (the episode ran to its end)
    assert out.events["stop"] == 0 and out.stale_sent == 0


def test_sync_with_a_slower_policy_gives_each_chunks_last_action_its_whole_step():
    """policy_hz below the robot's: the next chunk was asked for as soon as the last action was sent,
    so it lasted one tick instead of one policy step and every chunk ran short."""
    _, rt, _ = setup("sync", "replace", replan_every=3, delay=0.0, policy_hz=HZ / 4)
    out = rt.run_episode(24)
    starts: dict[int, float] = {}
    for t in out.ticks:  # each chunk's first tick (its actions are sent on each tick of their step)
        if t.chunk != NO_CHUNK:
            starts.setdefault(t.chunk, t.nominal - out.started_at)
    assert np.allclose(np.diff(list(starts.values())), 3 * 4 / HZ)  # 3 actions of 4 ticks each per chunk
    assert out.underruns == 0  # holding the last action through its step is no underrun


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_slower_policys_force_is_sent_for_its_whole_step(mode):
    """Between the actions of a policy slower than the loop the tick sent the safety layer's hold: zero
    force on pointmaze (a quarter of each action's push, with no event said), the capped last target on
    a position robot (which stopped short), and the watchdog saw no fresh action (false holds, and a
    stop at a low policy rate while the chunk still covered the time)."""
    _, rt, _ = setup(mode, "replace", replan_every=3, delay=0.0, policy_hz=HZ / 4)
    out = rt.run_episode(24)
    sent = [t for t in out.ticks if t.command is not None]
    assert all(t.chunk != NO_CHUNK for t in sent) and out.events.get("hold", 0) == 0
    for a, b in zip(sent, sent[1:], strict=False):
        if (a.chunk, a.index) == (b.chunk, b.index):  # the same action on each tick of its step
            np.testing.assert_array_equal(a.command, b.command)
    steps = {(t.chunk, t.index) for t in sent}
    assert len(sent) == 24 and len(steps) == 6  # 6 actions of 4 ticks


def test_a_controller_that_is_too_slow_for_its_chunks_underruns_and_holds():
    _, rt, _ = setup("async", "replace", replan_every=1, chunk=2, delay=0.5)
    out = rt.run_episode(20)
    assert out.underruns > 0  # two actions cannot cover half a second
    held = [t for t in out.ticks if t.chunk == NO_CHUNK]
    assert held and all(np.allclose(t.command, 0.0) for t in held)  # pointmaze: zero force holds still
    assert out.stopped is None  # fresh chunks keep coming: the watchdog does not stop it


class HungWorker:
    """A worker whose model never answers (alive, busy, silent)."""

    info = {"window": 1}
    busy = False  # until it is asked

    def reset(self, goal, stop=None) -> None: ...

    def submit(self, req) -> None:
        self.busy = True

    def poll(self) -> None:
        return None

    def alive(self) -> bool:
        return True


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_chunk_waited_for_at_rest_ends_the_episode_on_its_timeout_or_the_operators_stop(mode):
    """The first chunk (and in sync mode every one) is waited for with the robot at rest: a hung model
    kept that wait going for ever, and the operator's stop (the first Ctrl-C) was not looked at."""
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=400))
    task.reset(0)
    clock = ManualClock(100.0)
    out = Runtime(task, HungWorker(), RuntimeConfig(mode=mode, wait_timeout_s=5.0), clock=clock).run_episode(
        10
    )
    assert out.stopped == (
        "no chunk after 5 s of waiting (wait_timeout_s): the inference worker has not answered chunk 0 for "
        "5.00 s (hung?); holding position"
    )
    assert not out.ticks and clock.now() == pytest.approx(105.0, abs=0.01)
    asks = iter([False] * 10 + [True])
    clock = ManualClock(100.0)
    out = Runtime(task, HungWorker(), RuntimeConfig(mode=mode), clock=clock).run_episode(
        10, stop_requested=lambda: next(asks)
    )
    assert out.stopped == "stopped by the operator" and not out.ticks and clock.now() < 100.1


class Reconnecting(HungWorker):
    """A worker that cannot take a request (a remote one renewing its connection): `submit` refuses."""

    busy = True

    def submit(self, req) -> None:
        raise RuntimeError("a request is already outstanding or the server is not connected")

    def waiting_for(self) -> str:
        return "the policy server: reconnecting"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_chunk_waited_for_is_asked_only_once_the_worker_can_take_it(mode):
    """The wait for the worker to be ready has the wait's deadline (it asked at once, and the worker's
    refusal escaped the loop as a RuntimeError)."""
    task = make_task("pointmaze", SimConfig(state_only=True, max_steps=400))
    task.reset(0)
    clock = ManualClock(100.0)
    out = Runtime(
        task, Reconnecting(), RuntimeConfig(mode=mode, wait_timeout_s=5.0), clock=clock
    ).run_episode(10)
    assert out.stopped.startswith("no chunk after 5 s of waiting (wait_timeout_s): ")
    assert out.stopped.endswith("; holding position") and not out.ticks
    assert clock.now() == pytest.approx(105.0, abs=0.01)


@pytest.mark.parametrize(
    "bad",
    [
        {"wait_timeout_s": 0.0},
        {"wait_timeout_s": float("inf")},  # every blocking wait has a deadline
        {"mode": "fast"},
        {"replan_every": 0},
        {"policy_hz": -1.0},
        # options that had no effect: accepted, and the report recorded them as if they had
        {"mode": "sync", "stitching": "ensemble"},
        {"stitching": "replace", "ensemble_m": 0.5},
        {"stitching": "ensemble", "ensemble_m": float("-inf")},
        {"stitching": "ensemble", "ensemble_m": float("nan")},
        {"stitching": "average", "inpaint_overlap": 2},
        {"mode": "sync", "inpaint_overlap": 2},
        {"action_latency_s": float("nan")},  # every latency in the report was null
        {"action_latency_s": float("inf")},
        {"action_latency_s": 1e300},  # no action was ever due in time: "no fresh action", naming nothing
        {"policy_hz": float("inf")},  # "a chunk's step must be positive, got 0.0", naming no option
        {"interpolate": True},  # without policy_hz the step is one period: it did nothing
    ],
)
def test_runtime_config_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        RuntimeConfig(**bad)


def test_interpolating_delta_actions_is_refused():
    """A delta is applied once, not repeated between a slower policy's steps; interpolated, each tick sent a
    whole one (a 5 Hz policy on a 20 Hz arm moved 4x as far)."""
    task = make_task("arm_push", SimConfig(state_only=True))
    assert task.action_space.mode == "delta"
    _, rt, _ = setup("async", "inpaint", replan_every=4)
    cfg = RuntimeConfig(policy_hz=task.control_hz / 4, interpolate=True)
    with pytest.raises(
        ValueError, match=r"^runtime.interpolate draws the line between position targets; arm_push"
    ):
        Runtime(task, rt.worker, cfg, clock=rt.clock)
    Runtime(task, rt.worker, RuntimeConfig(policy_hz=task.control_hz / 4), clock=rt.clock)


# (the device is read after a tick's send, and its action sent on the next tick)
@pytest.mark.parametrize(("held", "replan_every", "took_ticks"), [((0.99, 1.49), 4, 5), ((0.99, 1.05), 1, 1)])
def test_a_human_takes_over_and_hands_back_and_the_ticks_say_so(held, replan_every, took_ticks):
    class Key:  # the attributes pynput's KeyCode carries
        def __init__(self, char: str) -> None:
            self.char, self.name = char, None

    task, rt, clock = setup("async", "inpaint", replan_every=replan_every)
    w = Key("w")
    keys = FakeKeyListener([(held[0], w, True), (held[1], w, False)], FakeClock())  # +x held
    device = KeyboardDevice(backend="pynput", listener_factory=keys.factory, clock=keys.clock)
    device.connect()
    takeover = Takeover(device, robot_mapper(ActionMapper(translation_gain=0.5), task))
    start: list[float] = []

    def human(obs, last):
        start.append(start[0] if start else clock.now())
        keys.replay_until(clock.now() - start[0])
        return takeover(obs, last)

    out = rt.run_episode(30, takeover=human)
    took = [t for t in out.ticks if t.intervention]
    assert len(took) == took_ticks  # the ticks while the key is held
    assert all(np.allclose(t.command, [0.5, 0.0]) and t.chunk == NO_CHUNK for t in took)  # zero + step
    back = took[-1].nominal + 1 / HZ  # the hand-back tick
    after = [t for t in out.ticks if t.nominal >= back - 1e-9]
    # Handed back: the controller resumes only with chunks of observations taken after the hand-back;
    # one asked for before (still computing when the operator let go) is discarded.
    resumed = next(t for t in after if t.chunk != NO_CHUNK)
    assert out.chunks[resumed.chunk].obs_time >= back - 1e-9
    if replan_every == 1:
        assert out.events["discarded_chunk"] >= 1
    assert out.underruns == 0 and out.stopped is None
    device.disconnect()


@pytest.mark.parametrize("window", [(3.0, 3.3), (3.8, 4.1), (4.2, 4.5)])
def test_a_hand_back_waits_for_a_slow_controllers_first_chunk_as_an_episodes_start_does(window):
    """The watchdog counted from the operator's last action: a healthy 1.2 s model (its chunk in flight at
    the takeover is discarded, then one is computed afresh) was stopped 2 s (stop_after_s) after a hand-
    back as "hung?", depending on when the operator let go. The arm holds while the first chunk after a
    hand-back computes, as at an episode's start."""
    _, rt, clock = setup("async", "replace", replan_every=4, chunk=40, delay=1.2)
    t0: list[float] = []

    def human(obs, last):
        t0.append(t0[0] if t0 else clock.now())
        return np.array([0.5, 0.0]) if window[0] <= clock.now() - t0[0] < window[1] else None

    out = rt.run_episode(150, takeover=human)
    assert out.stopped is None and len(out.ticks) == 150, out.stopped
    back = max(i for i, t in enumerate(out.ticks) if t.intervention)
    resumed = next(t for t in out.ticks[back + 1 :] if t.chunk != NO_CHUNK)
    assert out.chunks[resumed.chunk].obs_time >= out.ticks[back].nominal  # from after the hand-back
    assert all(np.isfinite(t.command).all() for t in out.ticks if t.command is not None)


def test_a_hand_back_whose_first_chunk_never_comes_ends_the_run_after_wait_timeout_s_and_says_so():
    """After a hand-back the controller's first chunk is awaited as an episode's first is, for
    `wait_timeout_s` (not `stop_after_s`): a controller that hangs from the takeover on ends the run
    that long after the hand-back, holding, with a line that names that bound."""
    _, rt, clock = setup("async", "replace", replan_every=4, wait_timeout_s=3.0)
    t0: list[float] = []

    def human(obs, last):
        t0.append(t0[0] if t0 else clock.now())
        if 1.0 <= clock.now() - t0[0] < 1.3:
            rt.worker.spec = dataclasses.replace(rt.worker.spec, delay_s=60.0)  # it hangs from now on
            return np.array([0.5, 0.0])
        return None

    out = rt.run_episode(200, takeover=human)
    assert out.stopped is not None and out.stopped.startswith("no chunk 3."), out.stopped
    assert "s after the operator handed back (wait_timeout_s = 3): " in out.stopped
    assert out.stopped.endswith("; holding position") and out.events["stop"] == 1
    back = max(i for i, t in enumerate(out.ticks) if t.intervention)
    assert 3.0 <= out.ticks[-1].nominal - out.ticks[back].nominal <= 3.0 + 2 / HZ
    assert out.ticks[-1].events == ("hold", "stop")
    assert all(t.chunk == NO_CHUNK for t in out.ticks[back + 1 :])  # no chunk of before the takeover ran


def test_a_takeover_device_sending_nan_is_held_and_ends_the_run_like_a_silent_controller():
    _, rt, _ = setup("async", "inpaint", replan_every=4)
    out = rt.run_episode(100, takeover=lambda obs, last: np.array([np.nan, 0.0]))
    assert out.stopped is not None and "no fresh action" in out.stopped
    assert all(np.isfinite(t.command).all() for t in out.ticks if t.command is not None)
    assert 2.0 <= len(out.ticks) / HZ <= 2.3  # stop_after_s, with nothing fresh from the start
    assert out.ticks[-1].events == ("hold", "stop")  # a recording shows where the watchdog stopped it


def test_a_controller_error_of_several_lines_is_one_printable_line():
    """einops' and torch's exceptions span several lines; the local worker passed them on as they were
    (the served one already made them one line)."""
    from robots.runtime.worker import Request, compute

    class Raises:
        def chunk_from(self, *args):
            raise ValueError(
                "Error while processing rearrange-reduction pattern\n Input shape: (1, 2)\x1b[0m"
            )

    reply = compute(Raises(), Request(3, [{"x": np.zeros(2)}], []))
    assert reply.actions is None and reply.seq == 3
    assert reply.error.startswith(
        "ValueError: Error while processing rearrange-reduction pattern Input shape"
    )
    assert "\n" not in reply.error and "\x1b" not in reply.error and "test_runtime_loop.py" in reply.error


def test_the_hold_after_reads_that_end_the_run_is_recorded_like_every_tick():
    """A robot that can no longer be read: the hold sent on the next tick was in the run's ticks but
    not the recording (which saw the robot last driven by the chunk's action, not held)."""
    task, rt, _ = setup("async", "inpaint", 4, max_read_failures=2)
    read, calls = task.get_observation, []

    def failing() -> dict:
        calls.append(None)
        if len(calls) > 12:
            raise OSError("bus timeout")
        return read()

    task.get_observation = failing
    recorded: list = []
    out = rt.run_episode(40, on_tick=lambda r, o: recorded.append(r))
    assert "could not be read on 2 tick(s) in a row" in out.stopped
    seen = [(r.nominal, r.chunk, r.events) for r in recorded]
    assert seen == [(t.nominal, t.chunk, t.events) for t in out.ticks]
    assert recorded[-1].events == ("hold",) and out.events["hold"] == 1


def test_an_observation_is_stamped_when_its_read_began():
    """A real robot's read (a bus round trip, a camera frame) takes time: stamped when the read
    returned, every chunk's due times were that much late and its measured latency that much short."""
    task, rt, clock = setup("async", "replace", 4)
    rt.advances_on_send = False  # as a real arm: the world does not jump a period inside the send
    read, began = task.get_observation, []

    def slow_read() -> dict:
        began.append(clock.now())
        clock.advance(0.015)
        return read()

    task.get_observation = slow_read
    out = rt.run_episode(30)
    assert out.stopped is None and len(out.chunks) > 3
    later = [c.obs_time for c in out.chunks[1:]]  # the first chunk is anchored when it arrives
    assert all(t in began for t in later), (later, began)


def test_an_observation_with_an_old_camera_frame_is_stamped_when_the_frame_was_captured(monkeypatch):
    """A real arm's camera frame is up to a few frame periods older than the read: the chunk computed
    from it is due from the frame's capture (the robot's `observation_lag_s`), not the read's start."""
    task, rt, clock = setup("async", "replace", 4)
    rt.advances_on_send = False
    read, began = task.get_observation, []

    def read_old_frame() -> dict:
        began.append(clock.now())
        return read()

    task.get_observation = read_old_frame
    monkeypatch.setattr(type(task), "observation_lag_s", property(lambda self: 0.04))
    out = rt.run_episode(30)
    assert out.stopped is None and len(out.chunks) > 3
    later = [c.obs_time for c in out.chunks[1:]]
    assert all(any(abs(t - (b - 0.04)) < 1e-12 for b in began) for t in later), (later, began)


@pytest.mark.parametrize("latency", [0.05, 0.15])  # odd multiples of half the 0.1 s period
def test_an_action_due_half_a_period_from_two_ticks_is_sent_not_dropped(latency):
    """Such a due time is a tie: the earlier tick was chosen, then judged the action stale by float
    noise, consumed it and sent nothing (80 of 300 ticks at 0.05 s, zero force on pointmaze)."""
    _, rt, _ = setup("async", "replace", replan_every=4, chunk=12, delay=0.25, action_latency_s=latency)
    out = rt.run_episode(300)
    assert out.skipped == 0 and not [t for t in out.ticks[3:] if t.chunk == NO_CHUNK]


# ---------------------------------------------------------------------- recording off the tick path
def test_a_recorded_episode_is_written_by_its_own_thread_and_a_refused_step_keeps_the_ones_before(
    tmp_path, monkeypatch
):
    """wm-deploy's record= wrote on the tick path: every 32nd tick flushed the buffered steps (25-230 ms
    without a command to the arm). And a step the store refused (a NaN reading) raised out of the
    control loop: the episode's recording was lost and the run ended with a traceback."""
    import threading

    from conftest import make_episode, make_schema

    from robots.runtime.recorder import BackgroundEpisode
    from wm.data import DemoStore
    from wm.data.writer import EpisodeWriter

    writes, flush = [], EpisodeWriter._flush

    def spy(self: EpisodeWriter) -> None:
        writes.append(threading.current_thread())
        flush(self)

    monkeypatch.setattr(EpisodeWriter, "_flush", spy)
    ep = make_episode(0, 40)
    want = ep["action"].copy()
    rows = [{k: v[t] for k, v in ep.items()} for t in range(40)]
    with DemoStore.create(tmp_path / "rec.zarr", make_schema()) as store:
        recording = BackgroundEpisode(store.begin_episode())
        for row in rows:
            recording.add_step(row)
            row["action"][:] = 9.0  # the loop's arrays change after: the row was copied
        recording.close()  # the queued rows written
        assert writes and threading.main_thread() not in writes  # (end's last flush is between episodes)
        assert recording.end({"seed": 0}) is None
        refused = BackgroundEpisode(store.begin_episode())
        for t, row in enumerate(rows[:10]):
            refused.add_step({**row, "state": np.full(4, np.nan, np.float32)} if t == 6 else row)
        said = refused.end({"seed": 1})
    assert said == (
        f"the recording stopped at step 6 was refused (AppendError: {tmp_path / 'rec.zarr'}: episode 1, key "
        "'state' has non-finite values (first at step 6)); the 6 steps before it are kept"
    )
    with DemoStore.open(tmp_path / "rec.zarr") as store:
        np.testing.assert_array_equal(store.get_episode(0)["action"], want)
        assert store.episode_lengths().tolist() == [40, 6]
        assert store.episode_info(1)["recording_stopped"].startswith("step 6 was refused (AppendError")


def test_a_recording_outlasts_a_disk_that_refuses_writes(tmp_path, monkeypatch):
    """A flush the disk refused (full) stopped the recording for the rest of the episode (the writer keeps
    the steps for a retry, which then succeeded), its line miscounted the steps kept, and a commit the
    disk still refused raised out of wm-deploy: the episodes left never ran."""
    import errno
    import time

    from conftest import make_episode, make_schema
    from zarr.storage import LocalStore

    from robots.runtime.recorder import MAX_UNWRITTEN, BackgroundEpisode
    from wm.data import DemoStore

    original, disk = LocalStore.set, {"full": False}

    async def refusing(self, key, value):
        if disk["full"] and key.startswith("data/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", refusing)
    ep = make_episode(0, MAX_UNWRITTEN + 40)
    rows = [{k: v[t] for k, v in ep.items()} for t in range(len(ep["action"]))]
    with DemoStore.create(tmp_path / "rec.zarr", make_schema()) as store:
        recording = BackgroundEpisode(store.begin_episode())
        for t, row in enumerate(rows[:100]):
            disk["full"] = 30 <= t < 70  # the flush at step 31 refused, retried each step until space
            recording.add_step(row)
            while recording.steps < recording.n_steps:  # each row written with the disk as it is now
                time.sleep(0.001)
            assert recording.unwritten == (t - 30 if 31 <= t < 70 else 0) and recording.stopped is None
        assert recording.end({"seed": 0}) is None
        full = BackgroundEpisode(store.begin_episode())
        disk["full"] = True
        for row in rows:
            full.add_step(row)
        said = full.end({"seed": 1})
        assert full.steps == 0  # none kept (wm-collect counts the episode discarded)
        disk["full"] = False
        again = BackgroundEpisode(store.begin_episode())
        for row in rows[:5]:
            again.add_step(row)
        assert again.end({"seed": 2}) is None
    assert said.startswith("the disk refused the episode's recording (OSError: [Errno 28] No space left")
    assert said.endswith(f"); its {31 + MAX_UNWRITTEN} steps were not saved")  # stopped at MAX_UNWRITTEN
    with DemoStore.open(tmp_path / "rec.zarr") as store:
        assert store.episode_lengths().tolist() == [100, 5]
        np.testing.assert_array_equal(store.get_episode(0)["action"], ep["action"][:100])
        assert "recording_stopped" not in store.episode_info(0)


def test_every_recorded_time_follows_one_convention():
    """The first observation was stamped when its read returned (every later one when its read began),
    and a hold tick's send time after its send returned (every other tick's before its send)."""
    task, rt, clock = setup("async", "replace", 4, delay=0.0, max_read_failures=2, read_retries=1)
    rt.advances_on_send = False  # as a real arm's
    read, send, began, sends = task.get_observation, task.send_action, [], []

    def slow_read():
        began.append(clock.now())
        clock.advance(0.015)  # a bus read
        if len(began) >= 6:
            raise OSError("bus timeout")  # the run ends with a hold tick
        return read()

    def slow_send(action):
        sends.append(clock.now())
        clock.advance(0.005)
        return send(action)

    task.get_observation, task.send_action = slow_read, slow_send
    out = rt.run_episode(20)
    assert out.ticks[-1].events == ("hold",) and out.chunks[0].obs_time == began[0]
    assert [t.sent_at for t in out.ticks] == sends


def test_an_interrupt_in_a_foreign_call_of_a_read_or_send_stops_the_run():
    """A signal landing where ctypes converts a renderer's EGL call's arguments comes out as an
    ArgumentError: a read that raised it was retried (the interrupt lost, the run went on) and a send
    that raised it ended the run as a robot fault. Both are the interrupt."""
    import signal

    from interrupts import interrupted_foreign_call

    from tools._cli import sigterm_interrupts

    for trips in ("get_observation", "send_action"):
        task, rt, _ = setup("async", "replace", 4, delay=0.0, read_retries=3)
        calls, original = [], getattr(task, trips)

        def tripping(*args, original=original, calls=calls):
            calls.append(1)
            if len(calls) == 3:
                interrupted_foreign_call(signal.SIGTERM)()
            return original(*args)

        setattr(task, trips, tripping)
        with sigterm_interrupts(), pytest.raises(KeyboardInterrupt) as e:
            rt.run_episode(20)
        assert e.value.signum == signal.SIGTERM and len(calls) == 3, trips


def test_reading_the_takeover_device_never_delays_a_command():
    """The device was read on the tick path before the send: a leader arm's 4 ms bus read delayed every
    command by 4 ms. It is read after the send, beside the observation, for the next tick."""
    _, rt, clock = setup("async", "replace", replan_every=4)

    def slow_device(obs, last):
        clock.advance(0.004)  # a bus read
        return None  # the operator is not moving it

    out = rt.run_episode(20, takeover=slow_device)
    assert [round(t.sent_at - t.nominal, 9) for t in out.ticks] == [0.0] * 20


@pytest.mark.parametrize("grabbed", [0.3, 0.4])  # at the poll before the wait; during the wait
def test_a_synchronous_robot_hands_over_on_the_tick_after_the_operator_grabs_the_device(grabbed):
    """In sync mode the device was read before the robot waited for a chunk, not after: an operator who
    grabbed it during the wait got one tick of that chunk first; one who had grabbed it before waited
    the whole chunk (and then got it) for nothing. The device is read again after the wait, and no chunk
    is asked for when the operator takes over next tick."""
    _, rt, clock = setup("sync", "replace", replan_every=4)  # each chunk takes DELAY + MODEL_S
    t0: list[float] = []

    def human(obs, last):
        t0.append(t0[0] if t0 else clock.now())
        return np.array([0.5, 0.0]) if clock.now() - t0[0] >= grabbed - 1e-9 else None

    out = rt.run_episode(8, takeover=human)
    assert [t.intervention for t in out.ticks] == [False] * 4 + [True] * 4
    first = out.ticks[4].sent_at - t0[0]  # 4 ticks of the first chunk, then the operator's
    assert first == pytest.approx(0.4 if grabbed == 0.3 else 0.3 + DELAY, abs=0.01)  # (+ the model)
    assert len(out.chunks) == (1 if grabbed == 0.3 else 2)


def test_the_first_command_to_a_simulated_pusher_is_step_capped_from_where_it_is():
    """PushT named no position key though its proprioception is the pusher's position in the actions'
    px: the first target of an episode went out uncapped (309 px from the pusher, the cap 51.2)."""
    task = make_task("pusht", SimConfig(state_only=True, max_steps=400))
    clock = ManualClock(100.0)
    far = [500.0, 500.0]
    worker = SimulatedTimeWorker(
        ControllerSpec("policies.evaluate:RandomPolicy", {"low": far, "high": far, "chunk": 8}, delay_s=0.0),
        clock,
        compute_s=MODEL_S,
    )
    worker.start()
    task.reset(0)
    pusher = np.asarray(task.get_observation()["proprio"], dtype=np.float64)
    out = Runtime(task, worker, RuntimeConfig(), clock=clock).run_episode(3)
    cap = 0.1 * (task.action_feature.high[0] - task.action_feature.low[0])  # the default step cap
    first = out.ticks[0]
    assert np.abs(first.command - pusher).max() <= cap + 1e-3 and "step_capped" in first.events


@pytest.mark.parametrize("policy_hz", [1.0, 0.4])
def test_a_slow_delta_policy_on_schedule_is_neither_held_nor_stopped(policy_hz):
    """A delta is applied once and the ticks of its step send nothing: the watchdog counted them as
    without a fresh action (a hold on every step at 1 Hz; at 0.4 Hz the run stopped, as if no chunk
    covered the time)."""
    task = make_task("arm_push", SimConfig(state_only=True, max_steps=400))
    clock = ManualClock(100.0)
    step = [0.01, 0.0]
    spec = ControllerSpec(
        "policies.evaluate:RandomPolicy", {"low": step, "high": step, "chunk": 8}, delay_s=0.0
    )
    worker = SimulatedTimeWorker(spec, clock, compute_s=MODEL_S)
    worker.start()
    task.reset(0)
    out = Runtime(task, worker, RuntimeConfig(policy_hz=policy_hz), clock=clock).run_episode(60)
    assert out.stopped is None and len(out.ticks) == 60 and out.events["hold"] == 0, out.stopped
    moved = [t for t in out.ticks if t.chunk != NO_CHUNK]  # (the ticks between send no motion)
    assert len(moved) == pytest.approx(60 / task.control_hz * policy_hz, abs=1)  # one delta per policy step


@pytest.mark.parametrize("latency", [0.8, 2.5])
def test_an_action_latency_longer_than_the_watchdogs_limits_neither_holds_nor_stops_a_start(latency):
    """The first action is due action_latency_s after the first chunk's observation; the watchdog counted
    from the observation: holds at every episode's start (0.8 s), or a stop before any action (2.5 s)."""
    _, rt, _ = setup("async", "inpaint", replan_every=4, action_latency_s=latency)
    out = rt.run_episode(60)
    assert out.stopped is None and len(out.ticks) == 60 and out.events["hold"] == 0, out.stopped
