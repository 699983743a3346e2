"""Turn a `TeleopState` into a robot action, with gains, in the robot's action space.

`ActionMapper` is a frozen config; `mapper(state, action_feature, action_space, current=None)` returns
one action of `action_feature.shape`, clipped to the feature's low/high.

Rules, applied in order:

1. Axis convention. The device motion (6,) = (x, y, z, roll, pitch, yaw), each in [-1, 1], is first
   permuted and signed: `m[i] = axis_sign[i] * motion[axis_order[i]]`. Devices report in the robot
   base frame seen by an operator standing behind the robot (x forward, y left, z up); use
   `axis_order` / `axis_sign` for anything else, e.g. a top-down image plane with x right and
   y down (PushT): `axis_order=(1, 0, 2, 3, 4, 5)`, `axis_sign=(-1, -1, 1, 1, 1, 1)`.
2. Gains. Translations are `m[:3] * translation_gain`, rotations `m[3:] * rotation_gain`, both per
   control step and in the action's units (m, rad, pixels, ...).
3. Gripper. The state's gripper (-1 open .. 1 closed; None counts as open) is thresholded at 0 to
   -1/+1 with `gripper="binary"`, or passed through with `gripper="continuous"`; it is then mapped
   linearly from [-1, 1] onto the gripper dimension's [low, high] when both are finite. A non-finite
   gripper stays NaN (a safety layer holds the last command), never a finite open or close.
4. Layout, by `action_space.frame` and the feature's size D:
   - `joint`: absolute targets `joints * joint_scale + joint_offset` from a leader arm (joints must
     be reported, D must match); `delta` mode returns `target - current` and needs `current`.
   - `planar`: D = 2 -> (x, y); D = 3 -> (x, y, yaw).
   - `ee`: D = 2 -> (x, y) (an end effector moving in a plane); 3 -> (x, y, z);
     4 -> (x, y, z, gripper); 6 -> (x, y, z, roll, pitch, yaw);
     7 -> (x, y, z, roll, pitch, yaw, gripper).
   - `other`: joint rule if the state has joints of size D, else the planar rule for D = 2, else
     the ee rule.
5. Mode. `delta` spaces get the step itself. `absolute` spaces (e.g. PushT's agent target
   position) need `current`, the robot's present value in the action's layout (its proprio or last
   action): the result is `current + step`, and the gripper dimension is set, not added. Absolute
   spaces with rotation dimensions are refused: adding angle steps componentwise is wrong for most
   rotation encodings.
6. The result is clipped to the feature's low/high.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from robots.base import Feature
from robots.teleop.base import TeleopState
from wm.data.schema import ActionSpace

GRIPPER_MODES = ("binary", "continuous")
# D -> (motion indices, has gripper) for ee spaces; planar spaces use their own table.
EE_LAYOUTS = {
    2: ((0, 1), False),
    3: ((0, 1, 2), False),
    4: ((0, 1, 2), True),
    6: ((0, 1, 2, 3, 4, 5), False),
    7: ((0, 1, 2, 3, 4, 5), True),
}
PLANAR_LAYOUTS = {2: ((0, 1), False), 3: ((0, 1, 5), False)}


def deadzone(values: np.ndarray, width: float) -> np.ndarray:
    """Zero inside |v| < width and rescale the rest so the output still spans [-1, 1] continuously."""
    v = np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0)
    if width <= 0:
        return v
    return np.sign(v) * np.clip((np.abs(v) - width) / (1.0 - width), 0.0, 1.0)


@dataclass(frozen=True)
class ActionMapper:
    """Gains and conventions that turn device motion into actions (rules in the module docstring)."""

    translation_gain: float = 1.0
    rotation_gain: float = 1.0
    gripper: str = "binary"
    axis_order: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    axis_sign: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    joint_scale: tuple[float, ...] | None = None
    joint_offset: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.gripper not in GRIPPER_MODES:
            raise ValueError(f"gripper {self.gripper!r} is not one of {GRIPPER_MODES}")
        if sorted(self.axis_order) != list(range(6)):
            raise ValueError(f"axis_order must be a permutation of 0..5, got {self.axis_order}")
        if len(self.axis_sign) != 6 or any(s not in (-1, 1) for s in self.axis_sign):
            raise ValueError(f"axis_sign must be six values of +1 or -1, got {self.axis_sign}")
        for name in ("translation_gain", "rotation_gain"):  # 0: a device that does nothing; < 0: axis_sign
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(
                    f"{name} must be a finite number > 0 (reverse an axis with axis_sign), got {value}"
                )
        for name in ("joint_scale", "joint_offset"):  # NaN here made every leader-arm target NaN
            values = getattr(self, name)
            if values is not None and not np.all(np.isfinite(np.asarray(values, dtype=np.float64))):
                raise ValueError(f"{name} must be finite numbers, got {values}")
        if self.joint_scale is not None and 0 in self.joint_scale:  # that joint would stay at its offset
            raise ValueError(
                f"joint_scale must not be 0 (a joint that ignores the leader), got {self.joint_scale}"
            )
        if self.joint_scale is not None and self.joint_offset is not None:
            if len(self.joint_scale) != len(self.joint_offset):
                raise ValueError("joint_scale and joint_offset must have the same length")

    @property
    def converts_joints(self) -> bool:
        """Joint targets are scaled or offset: a leader arm's units need not be the robot's."""
        return self.joint_scale is not None or self.joint_offset is not None

    # ------------------------------------------------------------------ pieces
    def motion_step(self, state: TeleopState) -> np.ndarray:
        """(6,) step: permuted, signed, clipped device motion times the gains."""
        motion = np.asarray(state.motion, dtype=np.float64).reshape(6)  # (an infinite reading: NaN, held)
        motion = np.where(np.isfinite(motion), np.clip(motion, -1.0, 1.0), np.nan)
        m = np.asarray(self.axis_sign, dtype=np.float64) * motion[list(self.axis_order)]
        m[:3] *= self.translation_gain
        m[3:] *= self.rotation_gain
        return m

    def gripper_value(self, state: TeleopState, low: float | None, high: float | None) -> float:
        """The gripper dimension's value; NaN for a non-finite reading (never a confident "open"), which
        the safety layer refuses to send."""
        g = -1.0 if state.gripper is None else float(state.gripper)
        if not np.isfinite(g):  # (before the clip: an infinite reading was a confident open or close)
            return float("nan")
        g = min(max(g, -1.0), 1.0)
        if self.gripper == "binary":
            g = 1.0 if g > 0 else -1.0
        if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
            g = low + (g + 1.0) / 2.0 * (high - low)
        return g

    def joint_targets(self, joints: np.ndarray) -> np.ndarray:
        q = np.asarray(joints, dtype=np.float64)
        if self.joint_scale is not None:
            q = q * self._per_joint(self.joint_scale, q.shape[0], "joint_scale")
        if self.joint_offset is not None:
            q = q + self._per_joint(self.joint_offset, q.shape[0], "joint_offset")
        return q

    @staticmethod
    def _per_joint(values: tuple[float, ...], n: int, what: str) -> np.ndarray:
        if len(values) != n:
            raise ValueError(f"{what} has {len(values)} values for {n} joints")
        return np.asarray(values, dtype=np.float64)

    def reach(self, action_feature: Feature, action_space: ActionSpace) -> tuple[tuple[int, ...], bool]:
        """(the device motion axes that reach an action of this layout, whether its last dimension is the
        gripper) for a motion device (no joints); ((), False) for a joint layout or one without a rule."""
        dim = action_feature.shape[0] if len(action_feature.shape) == 1 else -1
        table = motion_table(action_space.frame, dim, has_joints=False)
        if table is None or dim not in table:
            return (), False
        axes, has_gripper = table[dim]
        return tuple(sorted(self.axis_order[a] for a in axes)), has_gripper

    # ------------------------------------------------------------------ mapping
    def __call__(
        self,
        state: TeleopState,
        action_feature: Feature,
        action_space: ActionSpace,
        current: np.ndarray | None = None,
    ) -> np.ndarray:
        if len(action_feature.shape) != 1:
            raise ValueError(f"teleop maps onto flat actions only, got shape {action_feature.shape}")
        dim = action_feature.shape[0]
        cur = None if current is None else np.asarray(current, dtype=np.float64).reshape(-1)
        if cur is not None and cur.shape[0] != dim:
            raise ValueError(f"current has {cur.shape[0]} values for a {dim}-d action")

        has_joints = state.joints is not None and np.asarray(state.joints).shape == (dim,)
        table = motion_table(action_space.frame, dim, has_joints)
        if table is None:
            action = self._joint_action(state, dim, action_space.mode, cur)
        else:
            action = self._motion_action(state, action_feature, action_space, table, cur)
        low = -np.inf if action_feature.low is None else np.asarray(action_feature.low, dtype=np.float64)
        high = np.inf if action_feature.high is None else np.asarray(action_feature.high, dtype=np.float64)
        return np.clip(action, low, high).astype(action_feature.dtype)

    def _joint_action(self, state: TeleopState, dim: int, mode: str, cur: np.ndarray | None) -> np.ndarray:
        if state.joints is None:
            raise ValueError(
                "a joint action space needs joint targets from a leader arm; this device has none"
            )
        target = self.joint_targets(state.joints)
        if target.shape != (dim,):
            raise ValueError(f"leader arm gives {target.shape[0]} joints for a {dim}-d joint action")
        if mode == "absolute":
            return target
        if cur is None:
            raise ValueError("a joint delta action from a leader arm needs `current` joint positions")
        return target - cur

    def _motion_action(
        self,
        state: TeleopState,
        feature: Feature,
        space: ActionSpace,
        table: dict[int, tuple[tuple[int, ...], bool]],
        cur: np.ndarray | None,
    ) -> np.ndarray:
        dim = feature.shape[0]
        if dim not in table:
            raise ValueError(
                f"no teleop layout for a {dim}-d {space.frame} action; supported sizes: {sorted(table)}"
            )
        axes, has_gripper = table[dim]
        step = self.motion_step(state)[list(axes)]
        if space.mode == "absolute":
            if any(a >= 3 for a in axes):  # (a planar yaw too: clipped at pi, it could not wrap)
                raise ValueError(
                    f"absolute {space.frame} actions with rotations are not supported; use a delta space"
                )
            if cur is None:
                raise ValueError(
                    f"an absolute {space.frame} action needs the robot's present value in the action's "
                    "layout (a proprioception of its size) to add the teleop step to, and the robot reports "
                    "none: use a delta action space"
                )
            step = cur[: len(axes)] + step
        if not has_gripper:
            return step
        low = None if feature.low is None else feature.low[-1]
        high = None if feature.high is None else feature.high[-1]
        return np.concatenate([step, [self.gripper_value(state, low, high)]])


def motion_table(frame: str, dim: int, has_joints: bool) -> dict[int, tuple[tuple[int, ...], bool]] | None:
    """The layout table of rule 4 for an action of `frame` and size `dim`; None: the joint rule."""
    if frame == "joint" or (frame == "other" and has_joints):
        return None
    return PLANAR_LAYOUTS if frame == "planar" or (frame == "other" and dim == 2) else EE_LAYOUTS


def present_action(robot: Any) -> Callable[[Mapping[str, np.ndarray]], np.ndarray] | None:
    """obs -> the robot's present value in its action's layout, what a teleop step is added to for
    absolute actions: its joint positions (`position_key`); for joint deltas the present joints they
    move (`present_joints`: a leader arm's absolute targets become target - present); zeros for other
    forces / velocities / deltas (the step is the command), else a proprioception of the action's size;
    None when the robot has none (an absolute action then cannot be teleoperated)."""
    key = getattr(robot, "position_key", None)
    if key is not None:
        return lambda obs: obs[key]
    space = getattr(robot, "action_space", None)
    if space is not None and space.frame == "joint" and space.mode == "delta":
        return present_joints(robot)
    shape = robot.action_feature.shape
    if not getattr(robot, "position_actions", True):
        return lambda obs: np.zeros(shape)
    same = [k for k, f in robot.observation_features.items() if f.kind == "proprio" and f.shape == shape]
    return (lambda obs: obs[same[0]]) if same else None


def present_joints(robot: Any) -> Callable[[Mapping[str, np.ndarray]], np.ndarray] | None:
    """obs -> the present positions of the joints a joint-delta action moves, in the action's order: the
    proprioception values named as the action's dimensions, or as them without a leading "d" (an
    action "dj1" moves the joint "j1"); None when no proprioception names them all."""
    wanted = robot.action_feature.names or ()
    for key, feature in robot.observation_features.items():
        if feature.kind != "proprio" or not wanted:
            continue
        found = [_joint_index(list(feature.names or ()), n) for n in wanted]
        if all(i is not None for i in found):
            index = np.asarray(found)
            return lambda obs, key=key: np.asarray(obs[key])[index]
    return None


def _joint_index(names: list[str], action_name: str) -> int | None:
    for candidate in (action_name, action_name[1:] if action_name.startswith("d") else None):
        if candidate in names:
            return names.index(candidate)
    return None


def teleop_mapper(
    robot: Any, gains: Mapping[str, Any]
) -> Callable[[TeleopState, Mapping[str, np.ndarray]], np.ndarray]:
    """`robot_mapper` with the robot's own teleop mapping (`teleop_gains`: axis convention, step) under
    the user's `gains`."""
    return robot_mapper(robot_gains(robot, gains), robot)


def robot_gains(robot: Any, gains: Mapping[str, Any]) -> ActionMapper:
    """The mapper of `robot`'s own teleop conventions (`teleop_gains`) under the user's `gains`."""
    return ActionMapper(**{**dict(getattr(robot, "teleop_gains", {})), **gains})


def robot_mapper(
    mapper: ActionMapper, robot: Any
) -> Callable[[TeleopState, Mapping[str, np.ndarray]], np.ndarray]:
    """(device state, the robot's observation) -> one action for `robot`, by `mapper`'s rules."""
    current = present_action(robot)
    feature, space = robot.action_feature, robot.action_space
    return lambda state, obs: mapper(state, feature, space, current=None if current is None else current(obs))
