"""The runtime's pure parts: due times, stale dropping, stitching, interpolation, the safety layer and
the watchdog, driven by explicit times (a manual clock)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.chunking import TemporalEnsembler
from robots.base import Feature
from robots.runtime.safety import SafetyConfig, SafetyLayer, Watchdog
from robots.runtime.schedule import (
    MAX_BEHIND,
    Chunk,
    MergeResult,
    TickSchedule,
    Timeline,
    seam_jumps,
    stale_count,
)

P = 0.1  # control period


def ramp(n: int, start: float = 0.0, da: int = 1) -> np.ndarray:
    return np.tile((start + np.arange(n, dtype=float))[:, None], (1, da))


def run(tl: Timeline, t0: float, n: int) -> list[float | None]:
    """The first action dim sent on n ticks from t0 (None: nothing due)."""
    out = []
    for k in range(n):
        pick, _ = tl.take(t0 + k * P)
        out.append(None if pick is None else float(pick.action[0]))
    return out


def test_due_times_include_the_action_latency():
    c = Chunk(ramp(3), obs_time=2.0, step_s=P)
    assert np.allclose(c.due_times(0.05), [2.05, 2.15, 2.25])
    with pytest.raises(ValueError, match="T >= 1"):
        Chunk(np.zeros((0, 2)), 0.0, P)


def test_stale_actions_are_dropped_by_the_time_actually_elapsed():
    due = np.array([1.0, 1.1, 1.2, 1.3])
    assert stale_count(due, next_tick=1.0, period_s=P) == 0
    assert stale_count(due, next_tick=1.2, period_s=P) == 2  # 1.0 and 1.1 had their ticks already
    # A chunk that arrives 0.25 s after its observation, with the next tick at 1.3: three dropped.
    tl = Timeline(P)
    res = tl.merge(Chunk(ramp(6), obs_time=1.0, step_s=P, seq=0), next_tick=1.3)
    assert (res.kept, res.dropped_stale) == (3, 3)
    assert run(tl, 1.3, 4) == [3.0, 4.0, 5.0, None]


def test_replace_keeps_the_past_and_takes_the_new_chunk_from_its_first_action():
    tl = Timeline(P, stitching="replace")
    tl.merge(Chunk(ramp(8), 0.0, P, seq=0), next_tick=0.0)
    assert run(tl, 0.0, 2) == [0.0, 1.0]
    tl.merge(Chunk(ramp(5, start=100), 0.2, P, seq=1), next_tick=0.2)
    picks = [tl.take(0.2 + k * P)[0] for k in range(5)]
    assert [p.action[0] for p in picks] == [100, 101, 102, 103, 104]
    assert {p.chunk for p in picks} == {1}
    assert tl.take(0.7) == (None, 0) and len(tl) == 0  # an underrun: nothing pending


def test_average_blends_where_both_chunks_have_an_action():
    tl = Timeline(P, stitching="average")
    tl.merge(Chunk(np.full((4, 1), 10.0), 0.0, P, seq=0), next_tick=0.0)
    tl.merge(Chunk(np.full((4, 1), 20.0), 0.2, P, seq=1), next_tick=0.0)
    # 0.0, 0.1: old only; 0.2, 0.3: 0.3 * 10 + 0.7 * 20 = 17; 0.4, 0.5: new only.
    assert run(tl, 0.0, 6) == pytest.approx([10, 10, 17, 17, 20, 20])


@pytest.mark.parametrize("m", [0.5, 0.01, 0.0, -0.5, -50.0, 800.0])
def test_ensemble_weights_older_predictions_by_exp_minus_m_i(m):
    """As the policy's TemporalEnsembler (a softmax of -m * i); m < 0 favours the newest prediction
    (refused before: its running weights overflowed exp() mid-run for m = -50)."""
    tl = Timeline(P, stitching="ensemble", ensemble_m=m)
    values = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    for seq, value in enumerate(values):  # six chunks, all covering t = 0.5
        tl.merge(Chunk(np.full((6, 1), value), 0.5 - (5 - seq) * P, P, seq=seq), next_tick=0.0)
    picks = run(tl, 0.0, 6)
    w = TemporalEnsembler(m).weights(6).double().numpy()
    assert picks[5] == pytest.approx(float(np.dot(w, values)), rel=1e-6)
    assert picks[0] == pytest.approx(1.0)  # only the oldest chunk covers t = 0


def test_a_slower_policy_is_held_or_interpolated_between_its_actions():
    held = Timeline(P)
    held.merge(Chunk(ramp(3), 0.0, 2 * P), next_tick=0.0)  # actions every 2 periods
    assert run(held, 0.0, 6) == [0.0, None, 1.0, None, 2.0, None]
    lerp = Timeline(P, interpolate=True)
    lerp.merge(Chunk(ramp(3), 0.0, 2 * P), next_tick=0.0)
    got = [lerp.take(k * P)[0] for k in range(6)]
    assert [g.action[0] for g in got[:5]] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert got[1].interpolated and not got[2].interpolated
    assert got[1].due == pytest.approx(P) and got[2].due == pytest.approx(2 * P)  # made for its tick
    assert got[5] is None  # past the last action: nothing to draw a line to


@pytest.mark.parametrize("obs_time", [0.1, 0.15, 0.2, 0.25])
def test_an_interpolated_seam_follows_the_new_chunks_own_line(obs_time):
    """The new chunk's passed actions were dropped, the left end of its line too: at the seam tick the
    line ran from the old chunk's action to the new one's next (a value neither predicted), or the tick
    held (a stall) when the old one's slot was too late to serve."""
    step = 4 * P
    tl = Timeline(P, interpolate=True)
    tl.merge(Chunk(ramp(8), 0.0, step, seq=0), next_tick=0.0)  # 0, 1, 2, ... every 0.4 s
    for k in range(5):
        tl.take(k * P)
    new = Chunk(ramp(8) + 10.0, obs_time, step, seq=1)  # 10, 11, ... from obs_time
    assert tl.merge(new, next_tick=0.5) == MergeResult(kept=7, dropped_stale=1)
    for k in range(5, 11):
        pick, skipped = tl.take(k * P)
        assert pick.chunk == 1 and skipped == 0
        assert pick.action[0] == pytest.approx(10.0 + (k * P - obs_time) / step)


def test_a_policy_faster_than_the_loop_skips_actions_and_says_so():
    tl = Timeline(P)
    tl.merge(Chunk(ramp(6), 0.0, P / 2), next_tick=0.0)  # actions every half period
    sent, skipped = [], 0
    for k in range(3):
        pick, s = tl.take(k * P)
        sent.append(pick.action[0])
        skipped += s
    # the action due nearest each tick (ties: the earlier) wins; the one between two ticks is skipped.
    # It sent the last due by tick + half a period (1, 3, 5): half a period early on every tick.
    assert sent == [0.0, 2.0, 4.0] and skipped == 2


def test_committed_gives_the_scheduled_actions_on_the_new_chunks_grid():
    tl = Timeline(P)
    tl.merge(Chunk(ramp(10), 0.0, P), next_tick=0.0)
    run(tl, 0.0, 3)  # ticks at 0.0, 0.1, 0.2 sent 0, 1, 2
    prev, frozen = tl.committed(obs_time=0.2, step_s=P, until=0.45, length=16)
    assert prev[:, 0].tolist() == pytest.approx([2, 3, 4, 5, 6, 7, 8, 9])  # from the just-sent action on
    assert frozen == 3  # due at 0.2, 0.3, 0.4: before the new chunk can be in use at 0.45
    assert Timeline(P).committed(0.0, P, 1.0, 4)[0].shape[0] == 0


def test_seam_jumps_split_chunk_changes_from_steps_inside_a_chunk():
    seams, within = seam_jumps(
        [np.array([0.0]), np.array([0.1]), np.array([1.0]), np.array([1.1])], [0, 0, 1, 1]
    )
    assert seams.tolist() == pytest.approx([0.9]) and within.tolist() == pytest.approx([0.1, 0.1])


def test_timeline_refuses_unknown_stitching():
    with pytest.raises(ValueError, match="stitching must be one of"):
        Timeline(P, stitching="blend")


# ---------------------------------------------------------------------- safety
ARM = Feature((2,), "float32", "action", low=(-1.0, -1.0), high=(1.0, 1.0))


def test_non_finite_and_misshapen_actions_are_never_sent():
    s = SafetyLayer(ARM, positions=True)
    assert s.filter(np.array([0.5, 0.5])).tolist() == [0.5, 0.5]
    assert s.filter(np.array([np.nan, 0.0])).tolist() == [0.5, 0.5]  # the last safe command held
    assert s.filter(np.array([np.inf, 0.0])).tolist() == [0.5, 0.5]
    assert s.filter(np.zeros(3)).tolist() == [0.5, 0.5]
    assert s.events["non_finite"] == 2 and s.events["bad_shape"] == 1
    rate = SafetyLayer(ARM, positions=False)  # forces / velocities: holding still is zero
    assert rate.filter(np.array([np.nan, 1.0])).tolist() == [0.0, 0.0]
    assert SafetyLayer(ARM, positions=True).filter(None) is None  # nothing safe to send yet


def test_limits_workspace_and_the_per_tick_step_cap():
    s = SafetyLayer(ARM, positions=True, cfg=SafetyConfig(max_step_fraction=0.1))  # 0.2 per tick
    assert s.filter(np.array([5.0, -5.0])).tolist() == [1.0, -1.0]
    assert s.events["clipped"] == 1
    assert s.filter(np.array([0.0, 0.0])).tolist() == pytest.approx([0.8, -0.8])
    assert s.events["step_capped"] == 1
    box = SafetyConfig(workspace_low=(-0.5, -0.5), workspace_high=(0.5, 0.5), max_step=10.0)
    w = SafetyLayer(ARM, positions=True, cfg=box)
    assert w.filter(np.array([0.9, -0.9])).tolist() == [0.5, -0.5]
    assert dict(w.events) == {"workspace": 1}  # counted as such (it was "clipped", never "workspace")
    no_cap = SafetyLayer(ARM, positions=False)
    no_cap.filter(np.array([-1.0, -1.0]))
    assert no_cap.filter(np.array([1.0, 1.0])).tolist() == [1.0, 1.0]  # forces are not step-capped
    with pytest.raises(ValueError, match="hold_after_s <= stop_after_s"):
        SafetyConfig(hold_after_s=2.0, stop_after_s=1.0)
    with pytest.raises(ValueError, match=r"stop_after_s < inf, got 0.5, inf"):  # a hold for ever
        SafetyConfig(hold_after_s=0.5, stop_after_s=float("inf"))
    with pytest.raises(ValueError, match="workspace bounds"):
        SafetyLayer(ARM, True, SafetyConfig(workspace_low=(0, 0, 0), workspace_high=(1, 1, 1)))
    # a cap the user set on deltas or velocities capped nothing, silently, and went unchecked
    with pytest.raises(ValueError, match="this robot's actions are not positions"):
        SafetyLayer(ARM, False, SafetyConfig(max_step=0.05))
    with pytest.raises(ValueError, match=r"max_step must be one number or 2, got \(0.1, 0.2, 0.3\)"):
        SafetyLayer(ARM, True, SafetyConfig(max_step=(0.1, 0.2, 0.3)))


def test_a_safety_setting_that_would_filter_wrongly_is_refused_when_read():
    """A NaN cap or box turned every action into NaN (a cap of NaN is not <= 0), and a cap of 0 was
    refused only once the arm was connected."""
    for bad in (math.nan, 0.0, -0.1, (0.1, math.nan)):
        with pytest.raises(ValueError, match="max_step must be a positive number or one per dimension"):
            SafetyConfig(max_step=bad)
    with pytest.raises(ValueError, match="workspace_high holds NaN"):
        SafetyConfig(workspace_low=(0.0, 0.0), workspace_high=(1.0, math.nan))
    unbounded = SafetyConfig(workspace_low=(-0.5, -math.inf), workspace_high=(0.5, math.inf))  # inf: no bound
    assert SafetyLayer(ARM, True, unbounded).filter(np.array([0.9, 0.9])).tolist() == [0.5, 0.9]
    # "no bound on y" written as +inf in workspace_low: every command was clipped to the upper limit (the
    # arm moved there at the step cap), or sent as inf on a robot without limits
    with pytest.raises(ValueError, match=r"^workspace_low holds inf: -inf is no bound on a dimension$"):
        SafetyConfig(workspace_low=(-0.5, math.inf), workspace_high=(0.5, math.inf))
    with pytest.raises(ValueError, match=r"^workspace_high holds -inf: inf is no bound on a dimension$"):
        SafetyConfig(workspace_low=(-0.5, -math.inf), workspace_high=(0.5, -math.inf))
    # a box outside the limits turned every command into a corner of them
    outside = SafetyConfig(workspace_low=(-0.5, 2.0), workspace_high=(0.5, 3.0))
    with pytest.raises(ValueError, match=r"dimension 1 \[2, 3\] lies outside the robot's limits \[-1, 1\]"):
        SafetyLayer(ARM, True, outside)


def test_a_joint_without_limits_leaves_the_others_step_capped():
    """One joint without limits switched the default cap (a fraction of each range) off on every joint."""
    half_open = Feature((2,), "float32", "action", low=(-1.0, -math.inf), high=(1.0, math.inf))
    s = SafetyLayer(half_open, positions=True, cfg=SafetyConfig(max_step_fraction=0.1))
    assert s.start_from(np.array([0.0, 0.0])) is None
    assert s.filter(np.array([1.0, 50.0])).tolist() == pytest.approx([0.2, 50.0])
    assert s.events["step_capped"] == 1


def test_moving_into_the_workspace_from_outside_it_is_counted():
    """An arm that starts outside the box moves into it at the step cap; those commands are outside the
    box, which was counted as nothing but "step_capped"."""
    box = SafetyConfig(workspace_low=(0.5, -1.0), workspace_high=(1.0, 1.0), max_step=0.2)
    s = SafetyLayer(ARM, positions=True, cfg=box)
    assert s.start_from(np.array([0.0, 0.0])) is None
    assert s.filter(np.array([0.8, 0.0])).tolist() == pytest.approx([0.2, 0.0])
    assert s.events["workspace"] == 1 and s.events["step_capped"] == 1
    s.filter(np.array([0.8, 0.0]))
    assert s.filter(np.array([0.8, 0.0])).tolist() == pytest.approx([0.6, 0.0])  # inside now
    assert s.events["workspace"] == 2


def test_a_reported_command_outside_the_limits_is_not_followed():
    """`sent` follows what the robot reports it sent (its driver's own clamp), unless that is outside the
    limits (a clamp around a bad reading): then the command is, and the report is counted."""
    s = SafetyLayer(ARM, positions=True, cfg=SafetyConfig(max_step=0.5))
    s.start_from(np.array([0.0, 0.0]))
    command = s.filter(np.array([0.4, 0.4]))
    assert s.sent(np.array([0.1, 0.1]), command).tolist() == pytest.approx([0.1, 0.1])  # clamped: followed
    command = s.filter(np.array([0.4, 0.4]))
    assert s.sent(np.array([-3.0, 0.1]), command).tolist() == pytest.approx([0.4, 0.4])
    assert s.events["robot_out_of_limits"] == 1
    assert s.sent(np.array([1.0 + 1e-6, 0.1]), command).tolist() == pytest.approx([1.0, 0.1])  # rounding


def test_the_first_command_is_step_capped_from_the_present_position():
    s = SafetyLayer(ARM, positions=True, cfg=SafetyConfig(max_step_fraction=0.1))  # 0.2 per tick
    assert s.rest() is None  # nothing to hold yet
    assert s.start_from(np.array([1.1, 0.0])) is None  # the arm's present position, a little past a limit
    assert s.rest().tolist() == [1.0, 0.0]  # a hold stays within the limits
    assert s.filter(np.array([-1.0, 1.0])).tolist() == pytest.approx([0.9, 0.2])  # capped from 1.1
    # a reading it cannot cap from refuses the start (it was ignored, or clipped to the limit: the first
    # command then jumped from a place the arm was not at)
    assert "reads [nan] at dimension(s) [0]" in s.start_from(np.array([np.nan, 0.0]))
    far = s.start_from(np.array([1.5, 0.0]))
    assert "dimension 0 of the robot's position is 1.5, 0.5 outside its limits [-1, 1]" in far
    assert s.rest().tolist() == pytest.approx([0.9, 0.2])  # neither changed what it holds


def test_watchdog_holds_then_stops():
    w = Watchdog(SafetyConfig(hold_after_s=0.5, stop_after_s=2.0))
    w.start(10.0)
    assert w.check(10.4) == "ok" and w.check(10.6) == "hold" and w.check(12.1) == "stop"
    w.fresh(12.2)
    assert w.check(12.3) == "ok"


def test_the_whole_runs_within_chunk_jumps_leave_out_the_jump_between_episodes():
    """Two episodes whose chunks never jump: the run's within_jump_p99 counted the reset between them
    (chunk ids restart at 0) as a jump inside a chunk."""
    from robots.runtime.report import run_report
    from robots.runtime.ticks import EpisodeOutcome, TickRecord

    def episode(level: float) -> EpisodeOutcome:
        out = EpisodeOutcome()
        for k in range(10):
            out.ticks.append(TickRecord(k * 0.1, k * 0.1, k * 0.1, k * 0.1, np.array([level]), 0, k, k * 0.1))
        return out

    report = run_report([episode(0.0), episode(5.0)], {})
    assert [e["within_jump_p99"] for e in report["per_episode"]] == [0.0, 0.0]
    assert report["within_jump_p99"] == 0.0


def test_a_takeover_between_chunks_is_no_seam():
    """The actions of a human's ticks were left out and those around them taken as consecutive: an
    operator moving the arm smoothly for ten ticks read as a seam of the whole way moved."""
    from robots.runtime.report import episode_figures
    from robots.runtime.ticks import NO_CHUNK, EpisodeOutcome, TickRecord

    sent = [
        (0.0, 0),
        (0.01, 0),
        (0.02, 0),
        *[(0.02 + 0.5 * k, NO_CHUNK) for k in range(1, 11)],
        (5.02, 1),
        (5.03, 1),
    ]
    out = EpisodeOutcome()
    for i, (command, chunk) in enumerate(sent):
        human = chunk == NO_CHUNK
        t = 0.1 * i
        out.ticks.append(TickRecord(t, t, t, t, np.array([command]), chunk, -1 if human else i, t, (), human))
    figures = episode_figures(out)
    assert figures["seam_jump_max"] is None and figures["within_jump_p99"] == pytest.approx(0.01)
    assert figures["intervention_ticks"] == 10


def test_the_run_report_merges_episode_digests_and_keeps_no_tick_records():
    """wm-deploy kept every episode's tick records (about 0.7 KB a tick) until the report at the end; it
    keeps each episode's digest now, a float a tick, and the run's figures come out of those."""
    from collections import Counter

    from robots.runtime.report import EpisodeDigest, digest, run_report
    from robots.runtime.ticks import ChunkRecord, EpisodeOutcome, TickRecord

    def episode(late_ms: list[float], latency_ms: float, clipped: int) -> EpisodeOutcome:
        out = EpisodeOutcome(events=Counter(clipped=clipped), underruns=1, stale_sent=2, success=True)
        for k, late in enumerate(late_ms):
            t = k * 0.02
            out.ticks.append(TickRecord(t, t + late / 1e3, t, t, np.array([0.0]), 0, k, t))
        out.chunks.append(ChunkRecord(0, 0.0, 0.0, 0.01, 0.01, 1, 0, latency_ms / 1e3))
        return out

    episodes = [digest(episode([0.5, 1.0, 3.0], 20.0, 1)), digest(episode([0.25], 40.0, 2))]
    assert all(
        isinstance(e, EpisodeDigest) and e.tick_error_ms.nbytes == 8 * e.figures["ticks"] for e in episodes
    )
    report = run_report(episodes, {})
    assert report["ticks"] == 4 and report["tick_error_ms"]["max"] == pytest.approx(3.0)
    assert report["tick_error_ms"]["p50"] == pytest.approx(0.75)
    assert report["latency_ms"]["p50"] == pytest.approx(30.0) and report["chunks"] == 2
    assert report["safety_events"] == {"clipped": 3} and report["underruns"] == 2
    assert report["stale_actions_sent"] == 4 and report["stale_actions_dropped"] == 2
    assert report["success_rate"] == 1.0 and [e["ticks"] for e in report["per_episode"]] == [3, 1]


def test_the_runs_rate_is_over_every_tick_and_the_live_lines_show_missing_figures_as_missing():
    """The run's achieved_hz was the mean of the episodes' rates (a 3000-tick episode at 50 Hz and a
    3-tick one at 10 Hz gave 30 Hz); an episode without ticks printed "0.0 Hz, p99 0.00 ms" where
    report.json says null; a human's takeover ticks were counted as held."""
    from robots.runtime.report import LiveStatus, digest, live_line, run_report
    from robots.runtime.ticks import NO_CHUNK, EpisodeOutcome, TickRecord

    def episode(n: int, hz: float) -> EpisodeOutcome:
        out = EpisodeOutcome()
        for k in range(n):
            t = k / hz
            out.ticks.append(TickRecord(t, t, t, t, np.array([0.0]), 0, k, t))
        return out

    report = run_report([digest(episode(3000, 50.0)), digest(episode(3, 10.0))], {})
    assert report["achieved_hz"] == pytest.approx(3001 / (2999 / 50 + 2 / 10))
    line = live_line(digest(EpisodeOutcome()).figures, 0)
    assert "0 ticks at - Hz, tick error p50 / p99 - / - ms (max -), obs->action p50 / p99 - / - ms" in line
    assert "inference p50 - ms" in line and "0 stale dropped" in line

    said: list[str] = []
    live = LiveStatus(0.05, said.append)
    for k in range(10):  # a human's actions, then held ticks
        t, human = k * 0.1, k < 6
        live(TickRecord(t, t, t, t, np.array([0.0]), NO_CHUNK, -1, math.nan, (), human))
    assert said[-1].endswith(" 4 held"), said
    # each line's tick error is over the ticks since the line before: over the whole episode its
    # percentile, on the tick path, took 67 ms after eight hours at 50 Hz (and its list grew with it)
    said.clear()
    live = LiveStatus(1.0, said.append)
    for k in range(301):  # 3 s at 100 Hz, one tick 40 ms late in the first second
        t = k * 0.01
        live(TickRecord(t, t + (0.04 if k == 50 else 0.0), t, t, np.array([0.0]), 0, 0, t))
    assert len(said) == 3 and "(max 40.00) over the last 1 s" in said[0], said
    assert all("tick error p99 0.00 ms (max 0.00) over the last 1 s" in line for line in said[1:]), said
    assert said[-1].startswith("     3.0 s: 301 ticks at 100.0 Hz"), said


def test_a_tick_that_sent_nothing_is_recorded_with_the_command_in_effect():
    """A tick whose send failed was recorded with action zeros, which wm-train trained on: on a position
    robot "every joint to 0", a command never sent. It is the last command sent there (zeros for a delta
    robot, which stands still); a position robot not yet commanded gets no row."""
    from robots.runtime.report import TickRows
    from robots.runtime.ticks import TickRecord
    from wm.data.schema import KeySpec

    def tick(command):
        return TickRecord(0.0, 0.0, 0.0, 0.0, None if command is None else np.array(command), 0, 0, 0.0)

    obs = {"state": np.zeros(2, np.float32)}
    spec = KeySpec((2,), "float32", "action")
    position, delta = TickRows(spec, position_actions=True), TickRows(spec, position_actions=False)
    assert position.row(tick(None), obs) is None
    ticks = [tick([0.25, -0.5]), tick(None), tick([0.75, 0.125]), tick(None)]
    rows = [position.row(t, obs) for t in ticks]
    np.testing.assert_array_equal([r["action"] for r in rows], [[0.25, -0.5]] * 2 + [[0.75, 0.125]] * 2)
    assert [int(r["sent"]) for r in rows] == [1, 0, 1, 0] and rows[1]["action"].dtype == np.float32
    zeros = [delta.row(t, obs)["action"] for t in ticks]
    np.testing.assert_array_equal(zeros, [[0.25, -0.5], [0, 0], [0.75, 0.125], [0, 0]])


def test_an_episodes_tick_log_reads_back_every_record_and_keeps_numbers_alone():
    """A long real-arm episode kept every tick's record object until it ended: about 0.7 kB a tick, 1 GB
    after eight hours at 50 Hz. The log keeps columns and reads back the same records."""
    import tracemalloc

    from robots.runtime.ticks import NO_CHUNK, TickLog, TickRecord

    records = [
        TickRecord(
            0.02 * k,
            0.02 * k + 1e-4,
            0.02 * k - 0.01,
            0.02 * k + 2e-4,
            None if k % 7 == 0 else np.arange(6, dtype=np.float32) + k,
            NO_CHUNK if k % 5 == 0 else k // 8,
            -1 if k % 5 == 0 else k % 8,
            math.nan if k % 5 == 0 else 0.02 * k,
            ("hold", "step_capped") if k % 11 == 0 else (),
            k % 13 == 0,
        )
        for k in range(600)
    ]
    log = TickLog()
    for r in records:
        log.append(r)
    assert len(log) == 600 and [t.nominal for t in log[-3:]] == [r.nominal for r in records[-3:]]
    plain = ("nominal", "started", "captured", "sent_at", "chunk", "index", "events", "intervention")
    for got, want in zip(log, records, strict=True):
        assert [getattr(got, f) for f in plain] == [getattr(want, f) for f in plain]
        assert got.due == want.due or math.isnan(got.due) and math.isnan(want.due)
        if want.command is None:
            assert got.command is None
        else:
            assert got.command.dtype == np.float32 and np.array_equal(got.command, want.command)
    with pytest.raises(IndexError):
        log[600]
    log.append(TickRecord(0.0, 0.0, 0.0, 0.0, np.zeros(2), 0, 0, 0.0))  # another shape: kept as it came
    assert log[-1].command.shape == (2,) and log[1].command.shape == (6,)
    tracemalloc.start()
    try:
        before, big = tracemalloc.get_traced_memory()[0], TickLog()
        for _ in range(20_000):
            big.append(records[1])
        per_tick = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    assert per_tick < 200, per_tick  # (the records themselves: about 700)


def test_an_episodes_figures_come_from_the_tick_logs_columns_as_from_its_records(monkeypatch):
    """The report rebuilt a record for every tick to read its figures (3 s and 0.9 kB a tick at the end
    of a 200,000-tick episode): from the columns they are the same."""
    from robots.runtime.report import digest
    from robots.runtime.ticks import NO_CHUNK, EpisodeOutcome, TickLog, TickRecord

    rng = np.random.default_rng(0)
    out = EpisodeOutcome()
    for k in range(500):
        kind = rng.integers(0, 4)  # a chunk's action (twice as often), a hold, a human's action
        chunk = k // 9 if kind < 2 else NO_CHUNK
        command = None if kind == 2 and k % 3 == 0 else rng.normal(size=3)
        t = 0.02 * k
        out.ticks.append(
            TickRecord(t, t + rng.uniform(0, 2e-3), t, t, command, chunk, k % 9, t, (), bool(kind == 3))
        )
    fast = digest(out)
    monkeypatch.setattr(TickLog, "commands", lambda self: None)  # the records' path
    slow = digest(out)
    assert fast.figures == slow.figures and fast.figures["intervention_ticks"] > 0
    np.testing.assert_array_equal(fast.within_jumps, slow.within_jumps)
    np.testing.assert_array_equal(fast.tick_error_ms, [(t.started - t.nominal) * 1e3 for t in out.ticks])
    assert fast.figures["seam_jump_max"] is not None


def test_the_tick_schedule_serves_the_slot_due_and_re_anchors_only_far_behind():
    ticks = TickSchedule(anchor=10.0, period=P)
    assert ticks.next_tick == 10.0
    assert ticks.tick(10.001) == (10.0, 10.0) and ticks.next_tick == pytest.approx(10.1)
    # late by less than half a period: still its own slot
    assert ticks.tick(10.14) == (pytest.approx(10.1), pytest.approx(10.1))
    # late by more: the slot due now (two passed ones skipped); its deadline the time it was due
    tick_t, nominal = ticks.tick(10.42)
    assert tick_t == pytest.approx(10.4) and nominal == pytest.approx(10.2)
    assert ticks.next_tick == pytest.approx(10.5)
    # more than MAX_BEHIND periods behind: the schedule starts again at the tick, no burst
    late = 10.5 + (MAX_BEHIND + 0.5) * P
    assert ticks.tick(late) == (late, pytest.approx(10.5))
    assert ticks.anchor == late and ticks.next_tick == pytest.approx(late + P)


def test_a_blocking_wait_past_the_next_tick_restarts_the_schedule_and_keeps_the_missed_deadline():
    ticks = TickSchedule(anchor=0.0, period=P)
    ticks.tick(0.0)
    ticks.restart_if_passed(0.05)  # ended before the next tick: nothing changes
    assert ticks.anchor == 0.0 and ticks.next_tick == pytest.approx(P) and ticks.missed is None
    ticks.restart_if_passed(0.73)  # ended 0.63 s past it: the next tick is now, its deadline was 0.1
    assert ticks.next_tick == 0.73 and ticks.missed == pytest.approx(P)
    assert ticks.tick(0.7305) == (0.73, pytest.approx(P))  # the tick's error is taken from the missed one
    assert ticks.tick(0.83) == (pytest.approx(0.83), pytest.approx(0.83))  # then the new schedule's
