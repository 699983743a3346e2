"""Controllers for runtime tests, built by name inside the inference worker process
(`ControllerSpec("runtime_controllers:make", {...})`; pytest puts tests/ on sys.path and a spawned
process starts with its parent's sys.path).

`make(fault, after)` answers `after` good chunks (joint targets a few degrees around the arm's
position at the first chunk, within any limits), then misbehaves in one of the ways of `FAULTS`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence

import numpy as np
import torch

from policies.base import check_chunk_request, with_prefix

FAULTS = ("none", "nan", "shape", "dtype", "raise", "hang", "sigkill", "sigkill_late", "slow_once")
SLOW_S = 1.5  # fault "slow_once": chunk number `after` takes this long, the others none
RAISED = "the controller failed on purpose"
WIGGLE_DEG = 2.0  # amplitude of the good chunks around the first position; the gripper moves too


class FaultyController:
    """`ChunkController` of `length` actions; chunks after the first `after` misbehave as `fault` says."""

    def __init__(self, fault: str = "none", after: int = 0, length: int = 8, action_dim: int = 6) -> None:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        self.fault, self.after, self.length, self.action_dim = fault, after, length, action_dim
        self.home: np.ndarray | None = None
        self.calls = 0

    def reset(self) -> None:
        self.home, self.calls = None, 0

    def chunk_from(
        self,
        steps: Sequence[dict[str, np.ndarray]],
        actions: Sequence[np.ndarray],
        previous: np.ndarray | None = None,
        frozen: int = 0,
    ) -> torch.Tensor:
        """(1, T, Da): good chunks continue `previous`'s frozen actions; see the module docstring."""
        prev = check_chunk_request(steps, actions, previous, frozen, self.action_dim)
        state = np.asarray(steps[-1]["state"], np.float64)  # (1, Da) joint positions
        if self.home is None:
            self.home = state[0].copy()
        n, self.calls = self.calls, self.calls + 1
        if n >= self.after:
            bad = self._misbehave()
            if bad is not None:
                return bad
        T = max(self.length, frozen + 1)
        phase = 0.3 * (n + np.arange(T))  # a slow wiggle, so that every chunk sends new values
        chunk = self.home + WIGGLE_DEG * np.sin(phase)[:, None]  # (T, Da)
        return with_prefix(torch.from_numpy(chunk[None]).float(), prev, frozen)

    def _misbehave(self) -> torch.Tensor | None:
        if self.fault == "nan":
            return torch.full((1, self.length, self.action_dim), math.nan)
        if self.fault == "shape":
            return torch.zeros(1, self.length, self.action_dim - 1)
        if self.fault == "dtype":  # the right shape, but no action values (it was sent as targets 0 / 1)
            return torch.ones(1, self.length, self.action_dim, dtype=torch.bool)
        if self.fault == "raise":
            raise RuntimeError(RAISED)
        if self.fault == "hang":
            time.sleep(3600)  # the runtime's watchdog must not wait for this
        if self.fault == "slow_once" and self.calls == self.after + 1:
            time.sleep(SLOW_S)
        if self.fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "sigkill_late":  # a dying process's pipe breaks a moment before it can be reaped
            os.closerange(3, 65536)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        return None


class FrameEcho:
    """A controller whose chunk says what reached it: action i is (height, width, sum of the values) of
    step i's "cam" frame, for a history of `history` steps (its `io` as the runtime reads it)."""

    def __init__(self, history: int = 2) -> None:
        from wm.spec import IOSpec

        self.io = IOSpec(image_keys=("cam",), image_size=(8, 8), proprio_key=None, proprio_dim=0,
                         action_dim=3, history=history)  # fmt: skip

    def reset(self) -> None:
        pass

    def chunk_from(self, steps, actions, previous=None, frozen=0) -> torch.Tensor:
        frames = [np.asarray(s["cam"])[0] for s in steps]  # each (H, W, 3)
        return torch.tensor([[[f.shape[0], f.shape[1], int(f.sum(dtype=np.int64))] for f in frames]])


def make_echo(history: int = 2) -> FrameEcho:
    """The `ControllerSpec` builder of `FrameEcho`."""
    return FrameEcho(history)


def make(fault: str = "none", after: int = 0, length: int = 8) -> FaultyController:
    """The `ControllerSpec` builder."""
    return FaultyController(fault, after, length)


def serve(
    port: int, fault: str = "none", after: int = 0, token: str | None = None, max_sessions: int = 1
) -> None:
    """A policy server of `make(fault, after)` controllers on 127.0.0.1:`port`, until killed (the
    target of a spawned test process)."""
    from robots.runtime.server import PolicyServer, ServerConfig

    torch.set_num_threads(1)
    cfg = ServerConfig(port=port, token=token, max_sessions=max_sessions, session_timeout_s=30.0)
    server = PolicyServer(lambda low, high: make(fault, after), cfg, log=lambda line: None)
    server.bind()
    server.serve()
