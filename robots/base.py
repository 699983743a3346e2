"""One robot interface for simulated and real arms.

`Robot` is the protocol every robot satisfies: features readable before `connect()`, a declared
control rate, `get_observation()` with a timestamp, and `send_action()` that refuses non-finite or
misshapen actions, clips to the limits and returns what was actually applied. `RobotBase` holds
the shared part (validation, clipping, context manager) so a subclass only talks to its hardware
or simulator; safety lives here, in one place, not in each robot.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from wm.data.schema import ActionSpace, KeySpec, Schema


class RobotError(Exception):
    """A robot cannot do what was asked (not connected, device missing, bad action)."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an error's message (lerobot's span several lines), for one-line errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


class ActionError(RobotError, ValueError):
    """An action of the wrong shape or with non-finite values; it never reaches the robot."""


class DeviceError(RobotError):
    """A read or a write through one of a real robot's devices failed. The message names the robot, the
    device as the user set it up (the motor bus's port, the camera's name and index) and the error, in
    one line (lerobot's errors named the motor ids or the camera's index only, some over several lines);
    `detail` is the message without the robot's name, for a line that names the robot already."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # (a process worker's error crosses a pipe pickled)
        return (type(self), (str(self), self.detail))


@contextlib.contextmanager
def device_errors(robot: str, device: str) -> Iterator[None]:
    """The block's OSError (serial and USB errors, timeouts, lerobot's ConnectionError) and RuntimeError
    as a `DeviceError` of `robot`'s `device`, raised from it; a bug's RuntimeError (NotImplementedError,
    RecursionError) goes on as it is."""
    try:
        yield
    except (NotImplementedError, RecursionError):
        raise
    except (OSError, RuntimeError) as e:
        detail = f"{device}: {type(e).__name__}: {first_line(e)}"
        raise DeviceError(f"{robot}: {detail}", detail) from e


def failure(e: BaseException) -> str:
    """An error as a line that names the robot already quotes it: a `DeviceError` as its device and
    cause, any other as "Type: first line of its message"."""
    return e.detail if isinstance(e, DeviceError) else f"{type(e).__name__}: {first_line(e)}"


@dataclass(frozen=True)
class Feature:
    """One observation or action feature: per-step shape, dtype, kind, units, limits, dimension names."""

    shape: tuple[int, ...]
    dtype: str
    kind: str
    units: str = ""
    names: tuple[str, ...] = ()
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def key_spec(self) -> KeySpec:
        return KeySpec(self.shape, self.dtype, self.kind, units=self.units, names=self.names)


@runtime_checkable
class Robot(Protocol):
    """What every robot offers. Features and `control_hz` are readable before `connect()`."""

    name: str
    control_hz: float

    @property
    def observation_features(self) -> dict[str, Feature]: ...

    @property
    def action_feature(self) -> Feature: ...

    def connect(self) -> None: ...

    def disconnect(self) -> None: ...

    def get_observation(self) -> dict[str, np.ndarray]: ...

    def send_action(self, action: np.ndarray) -> np.ndarray: ...


@dataclass
class RobotBase(ABC):
    """Shared robot behaviour: validation and clipping of actions, connection state, context manager.

    Subclasses implement `_connect`, `_disconnect`, `_observe` (without timestamp) and `_apply`
    (with an action already validated and clipped).
    """

    name: str = "robot"
    control_hz: float = 10.0
    action_space: ActionSpace = field(default_factory=ActionSpace)
    _connected: bool = field(default=False, init=False, repr=False)

    # ------------------------------------------------------------------ features
    @property
    @abstractmethod
    def observation_features(self) -> dict[str, Feature]: ...

    @property
    @abstractmethod
    def action_feature(self) -> Feature: ...

    @property
    def position_actions(self) -> bool:
        """Actions are position targets (holding still repeats the last one), not deltas, velocities
        or forces (holding still sends zeros). Robots whose absolute actions are not positions say so."""
        return self.action_space.mode == "absolute"

    @property
    def position_key(self) -> str | None:
        """The observation key that reads the present position in the action's units and order (a real
        arm's joints), or None. A runtime caps the first command's step from it, as it caps each later
        command's step from the one before."""
        return None

    @property
    def observation_lag_s(self) -> float:
        """How long before its read began the last observation's oldest part was captured (a camera's
        buffered frame); 0 for a robot whose reads show the present. A runtime stamps the observation
        that much earlier, so its actions are due when the world they were computed from says."""
        return 0.0

    @property
    def teleop_gains(self) -> dict[str, Any]:
        """The teleop mapping (`robots.teleop.mapping.ActionMapper` fields) this robot is driven with
        unless the user gives others: its axis convention and a step an operator can work with."""
        return {}

    def schema(self, task: str = "") -> Schema:
        """The store schema for recording this robot: observations, action and timestamp."""
        keys = {k: f.key_spec() for k, f in self.observation_features.items()}
        keys["action"] = self.action_feature.key_spec()
        keys["timestamp"] = KeySpec((), "float64", "timestamp", units="s")
        return Schema(
            keys=keys, fps=self.control_hz, action_space=self.action_space, robot=self.name, task=task
        )

    # ------------------------------------------------------------------ connection
    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        if not self._connected:
            self._connect()
            self._connected = True

    def disconnect(self) -> None:
        if self._connected:
            try:
                self._disconnect()
            finally:  # a failed disconnect has said what it left behind; the robot is no longer ours to use
                self._connected = False

    def __enter__(self) -> RobotBase:
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    def _require_connected(self) -> None:
        if not self._connected:
            raise RobotError(f"{self.name}: not connected; call connect() or use it as a context manager")

    # ------------------------------------------------------------------ observation and action
    def get_observation(self) -> dict[str, np.ndarray]:
        """Current observation {feature: array} plus "timestamp" (monotonic seconds)."""
        self._require_connected()
        obs = self._observe()
        obs["timestamp"] = np.float64(time.monotonic())
        return obs

    def check_action(self, action: Any) -> np.ndarray:
        """The action as the robot will apply it: shape checked, non-finite refused, clipped to limits."""
        feat = self.action_feature
        try:
            a = np.asarray(action)
        except ValueError as e:  # ragged nesting ([[0.1, 0.2], [0.3]]): numpy's bare error named no robot
            raise ActionError(f"{self.name}: action is not an array of numbers ({e}); refused") from e
        # strings, None, complex (whose imaginary part would be dropped), bools (a mask is no command)
        if a.dtype.kind not in "iuf":
            raise ActionError(
                f"{self.name}: action must be real numbers, got {a.dtype} {a.tolist()!r}; refused"
            )
        a = a.astype(np.float64)
        if a.shape != feat.shape:
            raise ActionError(f"{self.name}: action shape {a.shape} != expected {feat.shape}")
        if not np.all(np.isfinite(a)):
            raise ActionError(f"{self.name}: action has non-finite values {a.tolist()}; refused")
        if feat.low is not None or feat.high is not None:
            a = np.clip(
                a,
                feat.low if feat.low is not None else -np.inf,
                feat.high if feat.high is not None else np.inf,
            )
        with np.errstate(over="ignore"):
            out = a.astype(feat.dtype)
        if not np.all(np.isfinite(out)):  # finite in float64, but out of the robot's dtype's range
            raise ActionError(f"{self.name}: action {a.tolist()} overflows {feat.dtype}; refused")
        return out

    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Validate, clip and apply one action; returns the action actually applied (as the robot's driver
        reports it, when it reports one)."""
        self._require_connected()
        applied = self.check_action(action)
        sent = self._apply(applied)
        return applied if sent is None else sent

    @abstractmethod
    def _connect(self) -> None: ...

    @abstractmethod
    def _disconnect(self) -> None: ...

    @abstractmethod
    def _observe(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _apply(self, action: np.ndarray) -> np.ndarray | None:
        """Apply a validated, clipped action; return what the hardware was sent when a driver says so
        (e.g. after its own clamping), else None."""


@dataclass(frozen=True)
class RobotEntry:
    """A registered real robot: how to build it from its options, and the frozen dataclass the options
    are checked against before anything is built."""

    make: Callable[[Any], Robot]
    options: type
    description: str = ""
