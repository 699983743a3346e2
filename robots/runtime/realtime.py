"""Real-time scheduling for the control loop: a fixed-priority policy and a core of its own.

On Linux the control thread can run under SCHED_FIFO (it preempts every normal process the moment
its deadline comes, instead of waiting for the scheduler's next slice) and be pinned to one core,
with the inference worker pinned to the others, so a model computing on every core never sits on
the core the robot's ticks need. Both need privileges (root or CAP_SYS_NICE for the priority); when
they are missing the loop runs as before and the caller gets one line saying so. Everything is
undone on exit, so the rest of the program (reports, plots) runs normally.

`QuietGC` keeps CPython's cyclic garbage collector from pausing a timed loop (the control loop, the
inference worker, the policy server).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator

PRIORITY_RANGE = (1, 99)


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a cpuset, `taskset`, `docker --cpuset-cpus`),
    not the machine's count: torch threads beyond them wait on each other."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_cpus(control_cpu: int | None) -> tuple[int, ...] | None:
    """The cores left to the inference worker when the control loop has `control_cpu` (None: all)."""
    if control_cpu is None or not hasattr(os, "sched_getaffinity"):
        return None
    rest = tuple(sorted(os.sched_getaffinity(0) - {control_cpu}))
    return rest or None


def ordinary_scheduling(cpus: tuple[int, ...] | None) -> None:
    """Put the calling thread back on normal scheduling (SCHED_OTHER), on `cpus` (None: its cores as they
    are). For a helper thread the control thread starts inside `realtime`: Linux threads inherit their
    creator's policy and cores, so a recording thread ran under SCHED_FIFO on the control loop's own
    core. Best effort, as `realtime`: what the machine does not allow is left as it is."""
    with contextlib.suppress(OSError, AttributeError):
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    if cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, cpus)


def check(priority: int | None, control_cpu: int | None) -> None:
    """Refuse values that can never work, before any robot moves."""
    if priority is not None and not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise ValueError(
            f"realtime_priority must be {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}, got {priority}"
        )
    if control_cpu is not None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if control_cpu not in cpus:
            raise ValueError(f"control_cpu={control_cpu} is not a core this process may use ({cpus})")


@contextlib.contextmanager
def realtime(priority: int | None, control_cpu: int | None) -> Iterator[list[str]]:
    """Within the block the calling thread runs under SCHED_FIFO at `priority` (None: unchanged) and on
    core `control_cpu` (None: unchanged). Yields the notes (one line each) of what could not be done."""
    notes: list[str] = []
    undo = []
    if control_cpu is not None:
        try:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {control_cpu})
            undo.append(lambda: os.sched_setaffinity(0, before))
        except (OSError, AttributeError) as e:
            notes.append(
                f"the control loop could not be pinned to core {control_cpu} ({e}); it runs unpinned"
            )
    if priority is not None:
        try:
            policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            undo.append(lambda: os.sched_setscheduler(0, policy, param))
        except (OSError, AttributeError) as e:
            why = _no_priority(priority) if isinstance(e, PermissionError) else str(e)
            notes.append(
                f"the control loop could not run under SCHED_FIFO ({why}); it runs at normal priority"
            )
    try:
        yield notes
    finally:
        for step in reversed(undo):
            with contextlib.suppress(OSError):
                step()


def _no_priority(priority: int) -> str:
    """Why SCHED_FIFO at `priority` was refused: this user's RLIMIT_RTPRIO (limits.conf's rtprio) when it
    allows some priority but not this one, else the privilege it needs."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        limit = 0
    if 0 < limit < priority:  # (no limit reads as RLIM_INFINITY, -1)
        return f"this user's RLIMIT_RTPRIO allows up to {limit}: give runtime.realtime_priority={limit}"
    return "needs root or CAP_SYS_NICE"


class QuietGC:
    """Keeps CPython's cyclic garbage collector from pausing a timed loop.

    The collector runs whenever allocations pass a threshold, wherever the program happens to be; a
    full pass walks every tracked object of the process (hundreds of thousands once torch and a
    simulator are imported), and even a middle-generation pass can make a tick late. Inside the block
    the automatic collector is off and every object that exists is frozen (no pass walks it again);
    `step()`, called where the loop has slack (after a tick's work, after a message), collects only
    what was made since the previous step and freezes what survived, so each object is walked once.
    Cyclic garbage that outlives a step is kept until `renew()` (a full pass, for where a pause does no
    harm: a long-lived server or worker calls it when an episode starts) or the end of the block, when
    everything is unfrozen and the collector is restored as it was. `enabled=False` changes nothing.
    Blocks may overlap (threads of one process): the collector is the process's, restored when the last
    one ends.
    """

    _lock = threading.Lock()
    _blocks = 0  # blocks open in this process (the collector is the process's): the last one restores it
    _was_enabled = False

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.active = False

    def __enter__(self) -> QuietGC:
        if self.enabled:
            with QuietGC._lock:
                if QuietGC._blocks == 0:
                    QuietGC._was_enabled = gc.isenabled()
                    gc.disable()
                QuietGC._blocks += 1
                gc.freeze()
            self.active = True
        return self

    def step(self) -> None:
        """Collect the young generation (what was made since the last step) and freeze its survivors."""
        if self.active:
            gc.collect(0)
            gc.freeze()

    def renew(self) -> None:
        """A full pass over everything, frozen or not (long: only where nothing is waiting), then freeze."""
        if self.active:
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.active = False
            with QuietGC._lock:  # (a block of another thread still open, e.g. a server's beside a
                QuietGC._blocks -= 1  # runtime's: its loop kept quiet until it ends too)
                if QuietGC._blocks == 0:
                    gc.unfreeze()
                    if QuietGC._was_enabled:
                        gc.enable()
