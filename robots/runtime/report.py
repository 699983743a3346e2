"""What a deployment measured: per-episode figures, the run's report.json and its plots, and the
recording of every tick into a demonstration store.

Figures (all from the runtime's own records, on its monotonic clock):
    achieved_hz       ticks / wall time of the ticking part of each episode (the run's: over every
                      episode's ticks and time together)
    tick_error_ms     how late each tick started against its absolute deadline: p50 / p99 / max
    latency_ms        observation to action: capture of the observation a chunk was computed from to
                      the sending of that chunk's first action: p50 / p99
    inference_ms      the model's own seconds per chunk (in the worker): p50 / p99
    stale_actions_sent     actions sent more than half a period after their due time
    stale_actions_dropped  actions of arriving chunks whose time had passed (never sent)
    underruns         ticks with no pending action at all (the safety layer held)
    intervention_ticks  ticks a human's teleop action was sent instead of the controller's
    safety_events     counts per event (non_finite, clipped, step_capped, hold, stop, ...)
    seam_jump / within_jump  the largest change between consecutive commands where the chunk changed,
                      and the p99 of those inside a chunk (how smooth stitching is)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robots.runtime.safety import EVENTS
from robots.runtime.schedule import seam_jumps
from robots.runtime.ticks import NO_CHUNK, EpisodeOutcome, TickRecord
from wm.data import KeySpec, Schema
from wm.jsonvalues import json_finite

RECORD_KEYS = {  # per tick, beside the robot's observation and the action sent
    "action_due": KeySpec((), "float64", "lowdim", units="s"),
    "action_sent_time": KeySpec((), "float64", "lowdim", units="s"),
    "chunk": KeySpec((), "int64", "lowdim"),
    "chunk_index": KeySpec((), "int64", "lowdim"),
    "sent": KeySpec((), "uint8", "lowdim"),
    "safety": KeySpec((), "uint32", "lowdim"),  # bit i: EVENTS[i] happened on this tick
    "intervention": KeySpec((), "uint8", "lowdim"),  # 1: a human's teleop action was sent
}


def _pct(x: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(x, float), q)) if len(x) else None


def _p50_p99(x: Sequence[float]) -> dict[str, float | None]:
    return {"p50": _pct(x, 50), "p99": _pct(x, 99)}


def _jumps(out: EpisodeOutcome) -> tuple[np.ndarray, np.ndarray]:
    """(seam jumps, within-chunk jumps) of one episode's sent chunk actions (`seam_jumps`), between
    consecutive ticks only: a tick that sent none of a chunk's actions (a human's, a hold) parts the
    actions before it from those after (taken as one sequence, a takeover's ten ticks read as one seam)."""
    seams, within = [np.zeros(0)], [np.zeros(0)]
    ticks = out.ticks
    commands, chunk = ticks.commands(), ticks.column("chunk")
    at = np.flatnonzero(ticks.column("sent") & (chunk != NO_CHUNK))  # the ticks that sent a chunk's action
    for run in np.split(at, np.flatnonzero(np.diff(at) != 1) + 1):  # runs of consecutive ones
        # (from the column; commands of several shapes, never on one robot, from their records)
        sent = commands[run] if commands is not None else [ticks[int(j)].command for j in run]
        s, w = seam_jumps(sent, chunk[run])
        seams.append(s)
        within.append(w)
    return np.concatenate(seams), np.concatenate(within)


def episode_figures(out: EpisodeOutcome) -> dict[str, Any]:
    """The figures of one episode (see the module docstring)."""
    return digest(out).figures


def _figures(
    out: EpisodeOutcome, err: np.ndarray, lat: np.ndarray, inf: np.ndarray, jumps: Any
) -> dict[str, Any]:
    """`episode_figures` from the episode's tick errors, latencies and inference times (ms) and its
    (seam, within-chunk) jumps (`_jumps`)."""
    ticks, (seams, within) = out.ticks, jumps
    span = ticks[-1].started - ticks[0].started if len(ticks) > 1 else 0.0
    return {
        "ticks": len(ticks),
        "achieved_hz": (len(ticks) - 1) / span if span > 0 else None,
        "tick_error_ms": {
            "p50": _pct(err, 50),
            "p99": _pct(err, 99),
            "max": float(err.max()) if len(err) else None,
        },
        "latency_ms": _p50_p99(lat),
        "inference_ms": _p50_p99(inf),
        "chunks": len(out.chunks),
        "stale_actions_sent": out.stale_sent,
        "stale_actions_dropped": int(sum(c.dropped_stale for c in out.chunks)),
        "skipped_actions": out.skipped,
        "underruns": out.underruns,
        "intervention_ticks": int(ticks.column("intervention").sum()),
        "safety_events": {k: int(v) for k, v in out.events.items() if v},
        "seam_jump_max": float(seams.max()) if len(seams) else None,
        "within_jump_p99": _pct(within, 99),
        "success": out.success,
        "stopped": out.stopped,
        "wall_s": out.wall_s,
    }


@dataclass(frozen=True)
class EpisodeDigest:
    """What the run's report keeps of an episode once it is over (`digest`): its figures and the numbers
    the whole run's percentiles and plots are drawn from, a float a tick where the `EpisodeOutcome`
    holds every tick's record and command (a day at 30 Hz held about 1.8 GB until the report)."""

    figures: dict[str, Any]  # `episode_figures`
    tick_error_ms: np.ndarray  # (ticks,)
    latency: np.ndarray  # (chunks sent, 2): each chunk's observation time (s) and its latency (ms)
    inference_ms: np.ndarray  # (chunks,) the finite ones
    within_jumps: np.ndarray  # the changes between consecutive commands inside a chunk
    started_at: float
    success: bool | None
    stopped: str | None


def digest(out: EpisodeOutcome) -> EpisodeDigest:
    """`out` reduced to what `run_report` and `write_report` read."""
    sent = [c for c in out.chunks if c.first_sent is not None]
    err = (out.ticks.column("started") - out.ticks.column("nominal")) * 1e3
    latency = np.array([(c.obs_time, (c.first_sent - c.obs_time) * 1e3) for c in sent], float).reshape(-1, 2)
    inf = np.array([c.seconds * 1e3 for c in out.chunks if np.isfinite(c.seconds)], float)
    jumps = _jumps(out)
    return EpisodeDigest(
        figures=_figures(out, err, latency[:, 1], inf, jumps),
        tick_error_ms=err,
        latency=latency,
        inference_ms=inf,
        within_jumps=np.ravel(jumps[1]),
        started_at=out.started_at,
        success=out.success,
        stopped=out.stopped,
    )


def _digests(episodes: Sequence[EpisodeOutcome | EpisodeDigest]) -> list[EpisodeDigest]:
    return [e if isinstance(e, EpisodeDigest) else digest(e) for e in episodes]


def run_report(
    episodes: Sequence[EpisodeOutcome | EpisodeDigest], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """report.json: the run's figures over every tick of every episode, and each episode's own."""
    eps = _digests(episodes)
    per_episode = [e.figures for e in eps]
    err = np.concatenate([e.tick_error_ms for e in eps] or [np.zeros(0)])
    total = lambda key: sum(f[key] for f in per_episode)  # noqa: E731
    events: Counter = Counter()
    for f in per_episode:
        events.update(f["safety_events"])
    # over every tick: the ticks after each episode's first over the time they took, summed
    timed = [(f["ticks"] - 1, (f["ticks"] - 1) / f["achieved_hz"]) for f in per_episode if f["achieved_hz"]]
    seams = [f["seam_jump_max"] for f in per_episode if f["seam_jump_max"] is not None]
    succ = [e.success for e in eps if e.success is not None]
    return {
        "ticks": total("ticks"),
        "achieved_hz": sum(n for n, _ in timed) / sum(t for _, t in timed) if timed else None,
        "tick_error_ms": {
            "p50": _pct(err, 50),
            "p99": _pct(err, 99),
            "max": float(err.max()) if len(err) else None,
        },
        "latency_ms": _p50_p99(np.concatenate([e.latency[:, 1] for e in eps] or [np.zeros(0)])),
        "inference_ms": _p50_p99(np.concatenate([e.inference_ms for e in eps] or [np.zeros(0)])),
        "chunks": total("chunks"),
        "stale_actions_sent": total("stale_actions_sent"),
        "stale_actions_dropped": total("stale_actions_dropped"),
        "skipped_actions": total("skipped_actions"),
        "underruns": total("underruns"),
        "intervention_ticks": total("intervention_ticks"),
        "safety_events": {k: int(v) for k, v in events.items() if v},
        "seam_jump_max": max(seams, default=None),
        # within each episode: the jump from one episode's last action to the next one's first is none
        "within_jump_p99": _pct(np.concatenate([e.within_jumps for e in eps] or [np.zeros(0)]), 99),
        "episodes": len(eps),
        "success_rate": float(np.mean(succ)) if succ else None,
        "stopped": [e.stopped for e in eps if e.stopped],
        "settings": dict(settings),
        "per_episode": per_episode,
    }


def server_figures(worker: Any) -> dict[str, Any]:
    """A remote worker's figures (`robots.runtime.remote.RemoteWorker`): its address, reconnects and
    timeouts, the clock offset and network round trip it measured, and per chunk the server's queue
    wait and inference and the time from the request to the tick that took the reply in (ms)."""
    t = np.asarray(worker.timings, float).reshape(-1, 3) * 1e3
    return {
        "address": worker.cfg.address,
        **worker.stats,
        "clock_offset_ms": worker.clock.offset * 1e3,
        "network_rtt_ms": worker.clock.delay * 1e3,
        "reply_taken_in_ms": _p50_p99(t[:, 0]),
        "queue_ms": _p50_p99(t[:, 1]),
        "inference_ms": _p50_p99(t[:, 2]),
    }


def live_line(fig: Mapping[str, Any], episode: int) -> str:
    """One line for the terminal after an episode."""
    e, lat, inf = fig["tick_error_ms"], fig["latency_ms"], fig["inference_ms"]
    parts = [
        f"episode {episode}:",
        "success" if fig["success"] else ("failure" if fig["success"] is not None else ""),
        f"{fig['ticks']} ticks at {_shown(fig['achieved_hz'], '.1f')} Hz,",
        f"tick error p50 / p99 {_shown(e['p50'], '.2f')} / {_shown(e['p99'], '.2f')} ms "
        f"(max {_shown(e['max'], '.2f')}),",
        f"obs->action p50 / p99 {_shown(lat['p50'], '.0f')} / {_shown(lat['p99'], '.0f')} ms,",
        f"inference p50 {_shown(inf['p50'], '.0f')} ms,",
        f"{fig['chunks']} chunks, {fig['underruns']} underruns, {fig['stale_actions_sent']} stale sent, "
        f"{fig['stale_actions_dropped']} stale dropped",
    ]
    if fig["safety_events"]:
        parts.append("events " + ", ".join(f"{k} {v}" for k, v in sorted(fig["safety_events"].items())))
    if fig["stopped"]:
        parts.append(f"STOPPED: {fig['stopped']}")
    return " ".join(p for p in parts if p)


def _shown(value: float | None, spec: str) -> str:
    """A figure for the terminal; "-" where there is none (no tick, no chunk), as report.json's null."""
    return "-" if value is None else format(value, spec)


class LiveStatus:
    """A status line every `every_s` seconds of a running episode: ticks and achieved rate so far, the
    tick error's p99 and max since the line before, and how many ticks were held (no fresh action; a
    human's teleop action is fresh). It runs on the tick path: over the whole episode, its percentile
    grew with it (67 ms at 1.4 M ticks, eight hours at 50 Hz) and so did its memory."""

    def __init__(self, every_s: float, write: Any = print) -> None:
        self.every_s, self.write = every_s, write
        self._errors: list[float] = []  # since the last line
        self._ticks = self._held = 0
        self._first: float | None = None
        self._last_line = 0.0

    def __call__(self, record: TickRecord) -> None:
        if self._first is None:
            self._first = self._last_line = record.started
        self._errors.append((record.started - record.nominal) * 1e3)
        self._ticks += 1
        self._held += record.chunk == NO_CHUNK and not record.intervention
        if record.started - self._last_line >= self.every_s:
            self._last_line = record.started
            span = record.started - self._first
            rate = (self._ticks - 1) / span if span > 0 else 0.0
            p99, worst = float(np.percentile(self._errors, 99)), max(self._errors)
            self._errors = []
            self.write(
                f"  {span:6.1f} s: {self._ticks} ticks at {rate:.1f} Hz, tick error p99 {p99:.2f} ms "
                f"(max {worst:.2f}) over the last {self.every_s:g} s, {self._held} held"
            )


def write_report(
    out_dir: Path, report: Mapping[str, Any], episodes: Sequence[EpisodeOutcome | EpisodeDigest]
) -> list[Path]:
    """report.json and the plots (tick error histogram, latency over time); returns the paths. report.json
    is valid JSON (a non-finite number, such as a setting of inf, is written as null) and replaces an
    earlier one whole (written beside it, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / "report.json", out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(json_finite(dict(report)), indent=1, default=str, allow_nan=False))
    os.replace(tmp, path)
    return [path, *_plots(out_dir, _digests(episodes))]


def _plots(out_dir: Path, episodes: Sequence[EpisodeDigest]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err = np.concatenate([e.tick_error_ms for e in episodes] or [np.zeros(0)])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.hist(err, bins=60, color="tab:blue")
    # (a log scale of no data warns on stderr: a run whose every episode stopped before its first tick)
    a.set(xlabel="tick start after its deadline (ms)", ylabel="ticks", yscale="log" if len(err) else "linear")
    a.set_title("tick error" if len(err) else "tick error (no ticks)")
    t0 = min((e.started_at for e in episodes if e.figures["chunks"]), default=0.0)
    for i, e in enumerate(episodes):
        if len(e.latency):
            b.plot(
                e.latency[:, 0] - t0,
                e.latency[:, 1],
                ".",
                ms=3,
                label=f"episode {i}" if len(episodes) <= 5 else None,
            )
    b.set(xlabel="time (s)", ylabel="observation to action (ms)", title="latency")
    if 1 < len(episodes) <= 5:
        b.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "timing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------------- recording
def recording_schema(robot_schema: Schema) -> Schema:
    """The robot's schema plus the runtime's per-tick keys (`RECORD_KEYS`)."""
    keys = dict(robot_schema.keys) | RECORD_KEYS
    return Schema(
        keys=keys,
        fps=robot_schema.fps,
        action_space=robot_schema.action_space,
        robot=robot_schema.robot,
        task=robot_schema.task,
    )


class TickRows:
    """An episode's store steps, one per tick (`row`): the observation the tick read, the command it sent,
    when it was due and sent, its chunk, and the tick's safety events as bits. A tick that sent nothing
    (`sent` 0: its send failed) is recorded with the command in effect, which is what a policy trained
    on the store should learn there: a position robot's last command sent (zeros trained as "every joint
    to 0"), else zeros (a delta, velocity or force robot stands still); a position robot not yet given
    a command gets no row (what held it is not known)."""

    def __init__(self, action: KeySpec, position_actions: bool) -> None:
        self.action, self.position_actions = action, position_actions
        self._last: np.ndarray | None = None

    def row(self, record: TickRecord, obs: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        sent = record.command is not None
        if sent:
            self._last = np.asarray(record.command, self.action.dtype)
        command = (
            self._last if sent or self.position_actions else np.zeros(self.action.shape, self.action.dtype)
        )
        if command is None:
            return None
        bits = 0
        for e in record.events:
            if e in EVENTS:
                bits |= 1 << EVENTS.index(e)
        return {
            **{k: v for k, v in obs.items() if k != "timestamp"},
            "timestamp": np.float64(record.captured),
            "action": command,
            "action_due": np.float64(record.due),
            "action_sent_time": np.float64(record.sent_at),
            "chunk": np.int64(record.chunk),
            "chunk_index": np.int64(record.index),
            "sent": np.uint8(sent),
            "safety": np.uint32(bits),
            "intervention": np.uint8(record.intervention),
        }
