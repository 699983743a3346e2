"""3Dconnexion SpaceMouse teleoperation over HID (hidapi, `import hid`).

Reports (the first byte is the report id; values are int16 little-endian):
- id 1, 7 bytes: translation (tx, ty, tz); older devices (SpaceNavigator, SpaceMouse Pro).
- id 1, 13 bytes: translation and rotation (tx, ty, tz, rx, ry, rz); newer devices (SpaceMouse
  Wireless, Compact, Enterprise).
- id 2, 7 bytes: rotation (rx, ry, rz).
- id 3: buttons bitmask, bit 0 = left button, bit 1 = right button.

A unit streams its motion reports (about every 8 ms) while the cap is off centre, and sends zeros a few
times when it comes back to rest. A report stream that stops while the cap reads off centre is a unit that
dropped out (a wireless one out of range or out of battery, its receiver still plugged in): after
`stale_s` without a motion report, the motion falls back to zero instead of repeating the last push for
ever. A report shorter than its id needs is ignored and counts as none.

Each axis is divided by `full_scale` (about 350 at full deflection), clipped to [-1, 1] and given a
deadzone. The HID frame is x right, y toward the operator, z down (right-handed). It is turned into
the robot base frame seen by an operator behind the robot (x forward, y left, z up):

    x = -ty, y = -tx, z = -tz, roll = -ry, pitch = -rx, yaw = -rz

(a proper rotation, so rotations map like translations): push the cap away from you for +x,
tilt its top away from you for +pitch, twist it counter-clockwise seen from above for +yaw. Check
the signs with your unit; `ActionMapper.axis_sign` and `axis_order` change them without touching
the device.

Buttons: left toggles the gripper (starts open), right emits SAVE. The other episode commands (start,
discard, re-record, quit) come from `command_device`, typically a `KeyboardDevice`, which is connected,
polled and disconnected with the SpaceMouse (wm-collect adds one, as for a leader arm).

The HID module is injectable (`hid_module`, default `import hid`); tests feed recorded report bytes
through a stand-in `hid.device` into the same parser.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from robots.teleop.base import Command, DeviceNotFoundError, TeleopDevice, TeleopState
from robots.teleop.mapping import deadzone
from wm.options import is_real

VENDOR_IDS = (0x046D, 0x256F)  # Logitech (older 3Dconnexion devices), 3Dconnexion
PRODUCT_IDS = {
    0xC603: "SpaceMouse Plus XT",
    0xC605: "CADman",
    0xC606: "SpaceMouse Classic",
    0xC621: "SpaceBall 5000",
    0xC623: "SpaceTraveler",
    0xC625: "SpacePilot",
    0xC626: "SpaceNavigator",
    0xC627: "SpaceExplorer",
    0xC628: "SpaceNavigator for Notebooks",
    0xC629: "SpacePilot Pro",
    0xC62B: "SpaceMouse Pro",
    0xC62E: "SpaceMouse Wireless (cable)",
    0xC62F: "SpaceMouse Wireless (receiver)",
    0xC631: "SpaceMouse Pro Wireless (cable)",
    0xC632: "SpaceMouse Pro Wireless (receiver)",
    0xC633: "SpaceMouse Enterprise",
    0xC635: "SpaceMouse Compact",
    0xC636: "SpaceMouse Module",
    0xC652: "3Dconnexion Universal Receiver",
}
# HID axes (tx, ty, tz, rx, ry, rz) -> robot motion (x, y, z, roll, pitch, yaw): index and sign
HID_TO_ROBOT_INDEX = (1, 0, 2, 4, 3, 5)
HID_TO_ROBOT_SIGN = np.array([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
LEFT_BUTTON, RIGHT_BUTTON = 0x1, 0x2
REPORT_SIZE = 64

HOW_TO_CHECK = (
    "check that it is plugged in (`lsusb | grep -i 3dconnexion`), that your user can open its hidraw node "
    '(a udev rule such as `KERNEL=="hidraw*", ATTRS{idVendor}=="256f", MODE="0666"` in '
    "/etc/udev/rules.d/99-spacemouse.rules, then `sudo udevadm control --reload && sudo udevadm trigger`; "
    "use idVendor 046d for older units), and that spacenavd is not holding it"
)


class SpaceMouseState:
    """Raw axes and buttons, updated report by report; pure parsing, no I/O."""

    def __init__(self) -> None:
        self.raw = np.zeros(6)  # (tx, ty, tz, rx, ry, rz) in device counts
        self.buttons = 0
        self.motion_reports = 0  # motion reports applied so far

    def update(self, report: bytes | list[int]) -> int:
        """Apply one report; returns the buttons newly pressed by it (a bitmask)."""
        data = bytes(report)
        if not data:
            return 0
        rid = data[0]
        if rid in (1, 2) and len(data) >= 7:
            self.motion_reports += 1
        if rid == 1 and len(data) >= 13:
            self.raw[:] = struct.unpack_from("<6h", data, 1)
        elif rid == 1 and len(data) >= 7:
            self.raw[:3] = struct.unpack_from("<3h", data, 1)
        elif rid == 2 and len(data) >= 7:
            self.raw[3:] = struct.unpack_from("<3h", data, 1)
        elif rid == 3 and len(data) >= 2:
            buttons = int.from_bytes(data[1:], "little")
            pressed = buttons & ~self.buttons
            self.buttons = buttons
            return pressed
        return 0

    def motion(self, full_scale: float, dz: float) -> np.ndarray:
        """(6,) robot-frame motion in [-1, 1]."""
        scaled = deadzone(self.raw / full_scale, dz)
        return HID_TO_ROBOT_SIGN * scaled[list(HID_TO_ROBOT_INDEX)]


class SpaceMouseDevice:
    """SpaceMouse teleop device.

    Args:
        path: hidraw path of the unit to open (bytes, as `hid.enumerate()` gives, or text, as a config
            gives); default the first 3Dconnexion device found.
        deadzone: fraction of full scale below which an axis reads zero.
        full_scale: device counts at full deflection.
        hid_module: a module like hidapi's `hid` (`enumerate()`, `device()`); default `import hid`.
        command_device: device whose commands are merged into each poll (e.g. a keyboard).
        stale_s: seconds without a motion report after which an off-centre reading is dropped to zero
            (the unit went silent; module docstring).
        clock: monotonic clock in seconds.
    """

    name = "spacemouse"

    def __init__(
        self,
        path: bytes | str | None = None,
        deadzone: float = 0.05,
        full_scale: float = 350.0,
        hid_module: Any = None,
        command_device: TeleopDevice | None = None,
        stale_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (is_real(deadzone) and 0 <= deadzone < 1):  # "0.1" from Python was a TypeError
            raise ValueError(f"deadzone must be a number in [0, 1), got {deadzone!r}")
        if not (is_real(full_scale) and np.isfinite(full_scale) and full_scale > 0):
            raise ValueError(f"full_scale must be a finite number > 0, got {full_scale!r}")
        if not (is_real(stale_s) and np.isfinite(stale_s) and stale_s > 0):
            raise ValueError(f"stale_s must be a finite number > 0, got {stale_s!r}")
        self.path = os.fsencode(path) if isinstance(path, str) else path
        self.deadzone = deadzone
        self.full_scale = full_scale
        self.hid_module = hid_module
        self.command_device = command_device
        self.stale_s = stale_s
        self.clock = clock
        self._last_motion_t = 0.0
        self.product = ""
        self._dev: Any = None
        self._state = SpaceMouseState()
        self._gripper = -1.0

    def connect(self) -> None:
        if self._dev is not None:
            return
        if self.command_device is not None:
            self.command_device.connect()
        try:
            self._dev = self._open()
        except BaseException:
            if self.command_device is not None:
                self.command_device.disconnect()
            raise
        self._state = SpaceMouseState()
        self._gripper = -1.0
        self._last_motion_t = self.clock()

    def _open(self) -> Any:
        hid = self.hid_module if self.hid_module is not None else _import_hid()
        info = self._find(hid)
        dev = hid.device()
        try:
            dev.open_path(info["path"])
        except OSError as e:
            raise DeviceNotFoundError(
                f"spacemouse: found {self.product} but cannot open {info['path']!r} ({e}); {HOW_TO_CHECK}"
            ) from e
        dev.set_nonblocking(1)
        return dev

    def _find(self, hid: Any) -> dict:
        found = [
            d
            for d in hid.enumerate()
            if d.get("vendor_id") in VENDOR_IDS and d.get("product_id") in PRODUCT_IDS
        ]
        if self.path is not None:
            found = [d for d in found if d.get("path") == self.path]
        if not found:
            where = f" at {self.path!r}" if self.path is not None else ""
            raise DeviceNotFoundError(f"spacemouse: no 3Dconnexion device found{where}; {HOW_TO_CHECK}")
        # A device can expose several HID interfaces; the multi-axis controller is usage page 1, usage 8.
        found.sort(key=lambda d: (d.get("usage_page"), d.get("usage")) != (1, 8))
        self.product = PRODUCT_IDS[found[0]["product_id"]]
        return found[0]

    def disconnect(self) -> None:
        if self._dev is None:
            return
        dev, self._dev = self._dev, None
        try:
            dev.close()
        finally:
            if self.command_device is not None:
                self.command_device.disconnect()

    def poll(self) -> TeleopState:
        if self._dev is None:
            raise RuntimeError("spacemouse: not connected; call connect() first")
        commands: list[Command] = []
        seen = self._state.motion_reports
        while True:
            report = self._dev.read(REPORT_SIZE)
            if not report:
                break
            pressed = self._state.update(report)
            if pressed & LEFT_BUTTON:
                self._gripper = -self._gripper
            if pressed & RIGHT_BUTTON:
                commands.append(Command.SAVE)
        now = self.clock()
        if self._state.motion_reports != seen:
            self._last_motion_t = now
        elif now - self._last_motion_t > self.stale_s and self._state.raw.any():
            self._state.raw[:] = 0.0  # the unit went silent while pushed: stop, do not repeat the push
        if self.command_device is not None:
            commands += self.command_device.poll().commands
        motion = self._state.motion(self.full_scale, self.deadzone)
        return TeleopState(motion=motion, gripper=self._gripper, commands=commands)


def _import_hid() -> Any:
    try:
        import hid
    except ImportError as e:  # the package, or the hidapi shared library it loads, is missing
        raise DeviceNotFoundError(
            f"spacemouse: the `hid` module cannot be imported ({e}); install it with `pip install hidapi`"
        ) from e
    return hid
