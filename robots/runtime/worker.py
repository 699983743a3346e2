"""Where chunks are computed: an inference worker process, or inline on the control thread.

`ProcessWorker` runs the controller in its own process (spawned, so no inherited locks or torch
threads), so no model call, pickling or GIL contention ever lands on the control loop's tick path.
Frames travel through shared memory: before a request the control loop copies the history's
observations into buffers (one per observation key, `window` steps deep, made for its shape) and
sends a small message on a pipe; the worker copies them out and answers with the chunk. One request is
outstanding at a time, so the buffers are never written while the worker reads them.

`InlineWorker` computes on the caller's thread: the synchronous baseline (the control loop waits).

Both build the controller from a `ControllerSpec`: a "module:function" that returns a controller
satisfying `policies.base.ChunkController` (and optionally `GoalConditioned`), with its keyword
arguments; the worker builds it itself, so no model is ever pickled.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from robots.base import RobotError
from robots.runtime.realtime import QuietGC
from robots.runtime.wire import one_line

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


@dataclass(frozen=True)
class ControllerSpec:
    """builder: "module:function" returning the controller; kwargs: its arguments (picklable);
    threads: torch threads in the worker; delay_s: extra seconds added to every chunk (to emulate a
    slower model in benchmarks, never a default); cpus: the cores a worker process is pinned to;
    quiet_gc: keep Python's garbage collector off the worker's requests (`realtime.QuietGC`)."""

    builder: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    delay_s: float = 0.0
    cpus: tuple[int, ...] | None = None  # the cores the worker process may run on (None: any)
    quiet_gc: bool = True

    def build(self) -> Any:
        module, _, name = self.builder.partition(":")
        if not name:
            raise ValueError(f"controller builder must be 'module:function', got {self.builder!r}")
        return getattr(importlib.import_module(module), name)(**self.kwargs)


@dataclass(frozen=True)
class Request:
    """What a chunk is computed from: `steps` raw observations {key: (...)} of one robot, oldest first;
    `actions` the raw actions (Da,) executed between them; the previous chunk on the new one's grid
    (n, Da) or None, how many of its actions are `frozen` (committed), and whether it `guide`s the new
    chunk (`ChunkController.chunk_from`); `action_shape`: the robot's action shape (the shared buffer
    for `actions` is made for it)."""

    seq: int
    steps: Sequence[Mapping[str, np.ndarray]]
    actions: Sequence[np.ndarray]
    previous: np.ndarray | None = None
    frozen: int = 0
    action_shape: tuple[int, ...] = (1,)
    guide: bool = True


@dataclass(frozen=True)
class Reply:
    """A chunk (T, Da) with the seconds the model took, or `error`: one line saying what went wrong."""

    seq: int
    actions: np.ndarray | None
    seconds: float
    error: str | None = None


class WorkerDied(RobotError):
    """The inference worker process is gone, or could not start."""


class ResetStopped(Exception):
    """`reset(goal, stop)` gave up waiting for the worker because `stop()` said the operator stopped."""


STOP_POLL_S = 0.05  # how often a wait between episodes looks whether the operator stopped


def takes_guide(controller: Any) -> bool:
    """Whether `controller.chunk_from` takes `guide` (`ChunkController`; one written before it does not)."""
    try:
        params = inspect.signature(controller.chunk_from).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "guide" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def compute(controller: Any, req: Request, delay_s: float = 0.0) -> Reply:
    """One chunk for one robot (the model sees a batch of one); any exception becomes a one-line error."""
    import torch

    start = time.perf_counter()
    try:
        steps = [{k: np.asarray(v)[None] for k, v in s.items()} for s in req.steps]
        actions = [np.asarray(a)[None] for a in req.actions]
        previous = None if req.previous is None or len(req.previous) == 0 else req.previous[None]
        with torch.inference_mode():
            if req.guide:
                frozen = req.frozen if previous is not None else 0
                chunk = controller.chunk_from(steps, actions, previous, frozen)
            elif previous is not None and takes_guide(controller):  # the schedule as a warm start
                chunk = controller.chunk_from(steps, actions, previous, 0, guide=False)
            else:  # a controller of the protocol before `guide`: the schedule is none of its business
                chunk = controller.chunk_from(steps, actions)
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().cpu()
            chunk = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        out = np.asarray(chunk)
        if out.dtype == np.float16:  # a half-precision chunk: float32 (the wire and the robot take it)
            out = out.astype(np.float32)
        if out.ndim != 3 or out.shape[0] != 1:
            raise ValueError(f"the controller returned a chunk of shape {out.shape}, expected (1, T, Da)")
        if delay_s > 0:
            time.sleep(delay_s)
        return Reply(req.seq, out[0], time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - reported to the control loop, which decides what to do
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" ({os.path.basename(where.filename)}:{where.lineno})" if where else ""
        return Reply(req.seq, None, time.perf_counter() - start, error_line(e, at))


def error_line(e: BaseException, suffix: str = "") -> str:
    """`e` as the one printable line the control loop reports (einops' and torch's span several)."""
    return one_line(f"{type(e).__name__}: {e}") + suffix


def describe(controller: Any) -> dict[str, Any]:
    """What the control loop needs to know of a controller: its history `window` (observation steps),
    the image size it reads (None: no camera), and its raw action dim (None: unknown)."""
    io = getattr(controller, "io", None) or getattr(controller, "io_spec", None)
    if io is None:
        return {"window": 1, "image_size": None, "action_dim": None, "image_keys": [], "proprio_key": None}
    return {
        "window": int(io.window),
        "image_size": tuple(io.image_size) if io.image_keys else None,
        "action_dim": int(io.action_dim),
        "image_keys": list(io.image_keys),
        "proprio_key": io.proprio_key,
        "proprio_dim": int(io.proprio_dim),
        "history": int(io.history),
        "frameskip": int(io.frameskip),
    }


def kernel_summary() -> dict[str, Any]:
    """The CPU kernels this process's inference ran on (`wm.kernels.Selector.summary`: the mode, how many
    op shapes took each kernel, the seconds spent calibrating), for the run's report."""
    from wm import kernels

    return kernels.selector().summary()


def kernel_line(summary: Mapping[str, Any]) -> str:
    """`kernel_summary` in one line for a log."""
    kinds = ", ".join(f"{k} {n}" for k, n in summary["by_kernel"].items()) or "none measured"
    spent = ", calibration budget spent" if summary["budget_exhausted"] else ""
    return (
        f"CPU kernels ({summary['mode']}): {summary['shapes']} op shapes ({kinds}), "
        f"{summary['calibration_s']:.1f} s calibrating{spent}"
    )


def check_robot(info: Mapping[str, Any], robot: Any) -> None:
    """Refuse a robot whose features do not give the controller what it reads (`describe`'s info):
    one line naming the first key that differs."""
    feats = robot.observation_features

    def feature(key: str, what: str = "") -> Any:
        if key not in feats:
            has = ", ".join(feats)
            raise RobotError(
                f"the model reads {what}{key!r}, which {robot.name} does not have (it has: {has})"
            )
        return feats[key]

    for key in info.get("image_keys") or []:
        f = feature(key, "camera ")
        if len(f.shape) != 3 or f.shape[2] != 3:
            raise RobotError(f"the model reads {key!r} as an RGB image; {robot.name} gives shape {f.shape}")
    key, dim = info.get("proprio_key"), int(info.get("proprio_dim") or 0)
    if key and tuple(feature(key).shape) != (dim,):
        raise RobotError(
            f"the model reads {key!r} of shape ({dim},); {robot.name} gives {tuple(feats[key].shape)}"
        )
    dim = info.get("action_dim")
    shape = tuple(robot.action_feature.shape)
    if dim is not None and shape != (int(dim),):
        raise RobotError(f"the model writes actions of shape ({dim},); {robot.name} takes {shape}")


def model_inputs(info: Mapping[str, Any], obs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of an observation the controller reads (all of it when its spec is unknown)."""
    keys = list(info.get("image_keys") or []) + ([info["proprio_key"]] if info.get("proprio_key") else [])
    return {k: obs[k] for k in keys} if keys else dict(obs)


def _layout(step: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} of one observation step: what a shared buffer of `ProcessWorker` holds."""
    return {k: (v.shape, v.dtype.str) for k, v in step.items()}


def set_goal(controller: Any, goal: Mapping[str, np.ndarray] | None) -> None:
    """Reset the controller for a new episode and tell a goal-conditioned one its goal."""
    from policies.base import GoalConditioned

    if goal is not None and isinstance(controller, GoalConditioned):
        controller.set_goal({k: np.asarray(v)[None] for k, v in goal.items()})
    controller.reset()


class InlineWorker:
    """The synchronous baseline: `submit` computes the chunk at once, on the caller's thread."""

    def __init__(self, spec: ControllerSpec) -> None:
        self.spec = spec
        self.controller: Any = None
        self.info: dict[str, Any] = {}
        self._reply: Reply | None = None

    def start(self) -> None:
        import torch

        torch.set_num_threads(max(1, self.spec.threads))
        self.controller = self.spec.build()
        self.info = describe(self.controller)

    @property
    def busy(self) -> bool:
        return False

    def alive(self) -> bool:
        return True

    def reset(self, goal: Mapping[str, np.ndarray] | None, stop: Callable[[], bool] | None = None) -> None:
        set_goal(self.controller, goal)  # (on this thread: nothing to wait for)
        self._reply = None

    def submit(self, req: Request) -> None:
        self._reply = compute(self.controller, req, self.spec.delay_s)

    def poll(self) -> Reply | None:
        reply, self._reply = self._reply, None
        return reply

    def kernels(self) -> dict[str, Any] | None:
        return kernel_summary()  # this process computed the chunks

    def close(self) -> None:
        self.controller = None


class SimulatedTimeWorker:
    """A controller on a simulated clock, for experiments on simulated robots faster than real time:
    `submit` computes the chunk at once (on the caller's thread) but its reply is only delivered once
    the runtime's clock (a `robots.control.ManualClock`) has passed the submit time plus the model's
    measured seconds plus `spec.delay_s`. The runtime's decisions are the same functions of the clock
    as on the wall clock, so success under a given latency is measured without waiting for it; tick
    timing is not (measure it on the wall clock with `ProcessWorker`). `compute_s`: the model's seconds
    per chunk to use instead of the measured ones (a schedule that does not depend on the machine's
    load)."""

    def __init__(self, spec: ControllerSpec, clock: Any, compute_s: float | None = None) -> None:
        self.spec, self.clock, self.compute_s = spec, clock, compute_s
        self._inline = InlineWorker(ControllerSpec(spec.builder, spec.kwargs, spec.threads))
        self._pending: tuple[float, Reply] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self._inline.info

    @property
    def controller(self) -> Any:
        return self._inline.controller

    def start(self) -> None:
        self._inline.start()

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def alive(self) -> bool:
        return True

    def reset(self, goal: Mapping[str, np.ndarray] | None, stop: Callable[[], bool] | None = None) -> None:
        self._inline.reset(goal)
        self._pending = None

    def submit(self, req: Request) -> None:
        start = self.clock.now()
        reply = compute(self._inline.controller, req)
        if self.compute_s is not None:
            reply = replace(reply, seconds=self.compute_s)
        self._pending = (start + reply.seconds + self.spec.delay_s, reply)

    def poll(self) -> Reply | None:
        if self._pending is None or self.clock.now() < self._pending[0]:
            return None
        reply, self._pending = self._pending[1], None
        return reply

    def kernels(self) -> dict[str, Any] | None:
        return self._inline.kernels()

    def close(self) -> None:
        self._inline.close()


class ProcessWorker:
    """The controller in its own process; see the module docstring. After `start`, `info` describes
    the controller (`describe`); the shared buffers are made at the first request, from its
    observations' shapes, `info["window"]` steps deep, and made again when the newest observation's
    shapes or dtypes change (a camera's new resolution); while the history still holds steps of the
    old ones, a request's observations go on the pipe instead."""

    def __init__(self, spec: ControllerSpec, startup_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.startup_timeout_s = startup_timeout_s
        self.info: dict[str, Any] = {}
        self._shm: dict[str, shared_memory.SharedMemory] = {}
        self._views: dict[str, np.ndarray] = {}
        self._layout: dict[str, tuple[tuple[int, ...], str]] = {}  # the buffers' {key: (shape, dtype)}
        self._proc: Any = None
        self._conn: Any = None
        self._outstanding: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        try:  # a spawn that fails (EMFILE, EAGAIN) is said as itself, not as close()'s
            self._proc = ctx.Process(target=_worker_main, args=(self.spec, child, os.getpid()), daemon=True)
            self._proc.start()
            child.close()
            if not self._conn.poll(self.startup_timeout_s):
                raise WorkerDied(f"the inference worker did not start within {self.startup_timeout_s:.0f} s")
            kind, payload = self._recv()
            if kind != "ready":
                raise WorkerDied(f"the inference worker could not build its controller: {payload}")
            self.info = payload
        except BaseException:
            self.close()
            raise

    @property
    def window(self) -> int:
        return int(self.info.get("window", 1))

    def _buffers(self, step: Mapping[str, np.ndarray], action_shape: tuple[int, ...]) -> None:
        """Make the shared buffers for observations like `step` (those before are freed) and tell the
        worker their names. Their memory is reserved now: a /dev/shm too small for them (Docker's 64 MB
        default, three 720p cameras at a window of 8) killed the control process with SIGBUS once the
        history filled, mid-episode."""
        self._free_buffers()
        observations = _layout(step)
        layout = {**observations, "__actions__": (tuple(action_shape), np.dtype(np.float64).str)}
        sizes = {
            k: max(1, int(np.prod((self.window, *s))) * np.dtype(d).itemsize) for k, (s, d) in layout.items()
        }
        for key, (shape, dtype) in layout.items():
            self._shm[key] = shm = shared_memory.SharedMemory(create=True, size=sizes[key])
            try:
                os.posix_fallocate(shm._fd, 0, sizes[key])
            except OSError as e:
                self._free_buffers()  # none kept: the next episode's first request tries again
                mb = sum(sizes.values()) / 2**20
                raise WorkerDied(
                    f"no room in shared memory for the observations the model reads ({mb:.0f} MB for "
                    f"{self.window} steps: {e.strerror}): enlarge /dev/shm (docker run --shm-size=1g)"
                ) from None
            self._views[key] = np.ndarray((self.window, *shape), dtype, buffer=shm.buf)
        self._layout = observations
        self._send(("buffers", ({k: s.name for k, s in self._shm.items()}, layout, self.window)))

    def close(self) -> None:
        """Stop the worker (asked, then terminated, then killed) and free the shared memory."""
        if self._proc is not None and self._proc.pid is None:  # never started
            self._proc = None
        if self._proc is not None:
            try:
                if self._proc.is_alive():
                    self._conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(2.0)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(2.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2.0)
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._free_buffers()

    def _free_buffers(self) -> None:
        self._views = {}
        for shm in self._shm.values():
            shm.close()
            shm.unlink()
        self._shm = {}

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.exitcode is None

    def exit_description(self) -> str:
        code = None if self._proc is None else self._proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    # ------------------------------------------------------------------ requests
    @property
    def busy(self) -> bool:
        return self._outstanding is not None

    def reset(self, goal: Mapping[str, np.ndarray] | None, stop: Callable[[], bool] | None = None) -> None:
        """A new episode: drop any outstanding request, reset the controller and set its goal (waits
        for the worker to confirm, up to startup_timeout_s; this is between episodes, not on a tick).
        `stop()` true (the operator's Ctrl-C) ends the wait at once: `ResetStopped`."""
        self._drain()
        self._send(("reset", None if goal is None else {k: np.asarray(v) for k, v in goal.items()}))
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            while not self._conn.poll(min(STOP_POLL_S, max(0.0, deadline - time.monotonic()))):
                if stop is not None and stop():  # (a worker hung here held the first Ctrl-C for minutes)
                    raise ResetStopped
                if time.monotonic() >= deadline:
                    raise WorkerDied("the inference worker did not confirm the new episode")
            kind, payload = self._recv()
            if kind == "reset":
                if payload is not None:
                    raise RuntimeError(f"the controller could not start the episode: {payload}")
                return

    def submit(self, req: Request) -> None:
        """Copy the request's observations into shared memory and hand it to the worker (non-blocking)."""
        if self._outstanding is not None:
            raise RuntimeError("a request is already outstanding")
        n = len(req.steps)
        if not 1 <= n <= self.window:
            raise ValueError(f"{n} observation steps; the worker takes 1..{self.window}")
        # the keys the controller reads (the others were copied every tick: 3.6 ms for two unread 480x640
        # cameras at a window of 4)
        steps = [{k: np.asarray(v) for k, v in model_inputs(self.info, s).items()} for s in req.steps]
        layouts = [_layout(s) for s in steps]
        if not self._shm or layouts[-1] != self._layout:
            # the first request, or a camera whose resolution (or a key whose dtype) changed: buffers for
            # the newest step (copied into fixed ones, the frames were a numpy broadcast error, or cast)
            self._buffers(steps[-1], req.action_shape)
        inline = None
        if any(layout != self._layout for layout in layouts):
            inline = steps  # older steps of the old size, still in the history: on the pipe this time
        else:
            for i, step in enumerate(steps):
                for k in self._layout:
                    self._views[k][i] = step[k]
        for i, a in enumerate(req.actions):
            self._views["__actions__"][i] = a
        self._send(("infer", (req.seq, n, len(req.actions), req.previous, req.frozen, req.guide, inline)))
        self._outstanding = req.seq

    def poll(self) -> Reply | None:
        """The reply to the outstanding request when it is there (never blocks)."""
        if self._outstanding is None or self._conn is None or not self._conn.poll(0):
            return None
        kind, payload = self._recv()
        if kind != "reply":
            raise WorkerDied(f"unexpected message {kind!r} from the inference worker")
        reply: Reply = payload
        if reply.seq == self._outstanding:
            self._outstanding = None
        return reply

    def kernels(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The worker process's `kernel_summary`, asked at the end of a run (after the chunk it may still be
        computing, whose answer is discarded); None when the worker is gone or does not answer within
        `timeout_s` (a report never waits on a hung worker)."""
        deadline = time.monotonic() + timeout_s
        try:
            while self.busy and self.alive() and time.monotonic() < deadline:
                if self._conn.poll(0.05):
                    self.poll()
            if not self.alive() or self.busy:
                return None
            self._send(("kernels", None))
            if not self._conn.poll(max(deadline - time.monotonic(), 0.5)):
                return None
            kind, payload = self._recv()
        except WorkerDied:
            return None
        return payload if kind == "kernels" else None

    def _drain(self) -> None:
        """Wait out an outstanding request (its chunk is discarded)."""
        if self._outstanding is None:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        while self._outstanding is not None:
            if not self.alive():
                raise WorkerDied(f"the inference worker {self.exit_description()}")
            if time.monotonic() > deadline:
                raise WorkerDied("the inference worker did not answer its last request")
            if self._conn.poll(0.05):
                self.poll()

    def _send(self, msg: tuple[str, Any]) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError) as e:
            raise self._died(e) from e

    def _recv(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise self._died(e) from e

    def _died(self, e: BaseException) -> WorkerDied:
        """The pipe broke: the process is exiting. Its exit status is known only once it is reaped, which
        can be a moment after the pipe closes, so wait for that (1 s at most) before saying how it ended."""
        if self._proc is not None:
            self._proc.join(1.0)
        detail = f" ({e})" if str(e) else ""  # an EOFError says nothing
        return WorkerDied(f"the inference worker {self.exit_description()}{detail}")


def _die_with(parent: int) -> None:
    """Linux: this process is killed when `parent` (the control process, the thread that started it)
    dies without closing it (SIGKILL, the OOM killer): a worker computing a chunk, loading its model or
    hung ran on by itself, holding cores and GPU memory."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: it ends when it next reads from the control loop
        return
    if os.getppid() != parent:  # gone before the line above
        os._exit(0)


def _worker_main(spec: ControllerSpec, conn: Any, parent: int) -> None:
    """The worker process: build the controller, then answer requests until told to stop."""
    _die_with(parent)
    # Ctrl-C, and a closing terminal's SIGHUP to the process group, are the control loop's to handle
    # (it stops the episode and closes this worker; killed at once, the run's report lacked its kernels)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if spec.cpus:  # before torch starts its threads: they inherit it
        os.sched_setaffinity(0, spec.cpus)
    shms: dict[str, shared_memory.SharedMemory] = {}
    views: dict[str, np.ndarray] = {}
    try:
        import torch

        torch.set_num_threads(max(1, spec.threads))
        try:
            controller = spec.build()
            info = describe(controller)  # (a spec it cannot give was "exited with status 1")
        except Exception as e:  # noqa: BLE001 - reported to the parent as one line
            conn.send(("error", error_line(e)))
            return
        conn.send(("ready", info))
        with QuietGC(spec.quiet_gc) as quiet:
            _serve(controller, spec, conn, quiet, shms, views)
    finally:
        views.clear()
        for shm in shms.values():
            shm.close()


def _serve(
    controller: Any,
    spec: ControllerSpec,
    conn: Any,
    quiet: QuietGC,
    shms: dict[str, shared_memory.SharedMemory],
    views: dict[str, np.ndarray],
) -> None:
    """The worker's requests, one at a time, until told to stop (or the control loop is gone)."""
    while True:
        quiet.step()  # between requests: the garbage of the last one
        try:
            kind, payload = conn.recv()
        except EOFError:
            return  # the control loop is gone
        if kind == "stop":
            return
        if kind == "buffers":  # (again when the observations' shapes change: the old ones are freed)
            names, layout, window = payload
            views.clear()
            for shm in shms.values():
                shm.close()
            shms.clear()
            for k, name in names.items():
                shms[k] = shared_memory.SharedMemory(name=name)
                shape, dtype = layout[k]
                views[k] = np.ndarray((window, *shape), dtype, buffer=shms[k].buf)
        elif kind == "reset":
            quiet.renew()  # an episode starts: the robot waits for its first chunk anyway
            try:
                set_goal(controller, payload)
                conn.send(("reset", None))
            except Exception as e:  # noqa: BLE001
                conn.send(("reset", error_line(e)))
        elif kind == "infer":
            seq, n, n_actions, previous, frozen, guide, inline = payload
            keys = [k for k in views if k != "__actions__"]
            steps = (
                inline if inline is not None else [{k: views[k][i].copy() for k in keys} for i in range(n)]
            )
            actions = [views["__actions__"][i].copy() for i in range(n_actions)]
            req = Request(seq, steps, actions, previous, frozen, guide=guide)
            reply = compute(controller, req, spec.delay_s)
            conn.send(("reply", reply))
        elif kind == "kernels":
            conn.send(("kernels", kernel_summary()))
