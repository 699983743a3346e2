"""Gamepad teleoperation through pygame's joystick API (SDL2), e.g. an Xbox or PlayStation pad.

Without a display (SSH, headless) pygame uses SDL's dummy video driver (no window needed), and
background joystick events are allowed, so it works from a terminal without window focus. The
default `GamepadLayout` is SDL's layout of an Xbox pad on Linux (xpad driver); other pads number
their axes and buttons differently: pass a layout.

    control                    effect
    left stick up / left       +x / +y   (forward / left)
    right stick up / left      +z / +yaw (up / counter-clockwise)
    D-pad right / up           +roll / +pitch
    right trigger              gripper: released -1 (open) .. fully pressed +1 (closed)
    A                          START
    Start (menu)               SAVE
    B                          DISCARD
    Y                          RERECORD
    Back (view)                QUIT

Sticks get a deadzone (rescaled so the output still spans [-1, 1]). Commands are emitted once per
button press. Triggers rest at -1 in SDL's joystick API; until the first trigger event the
gripper reads open. A non-finite axis value (a glitching driver) is ignored: the axis keeps its last
reading, so a NaN trigger never opens a closed gripper. An unplugged pad fails every poll (its
sticks' last readings are not current).

The event source is injectable: the pygame source turns SDL events into `GamepadEvent`s, and tests
feed a recorded stream of `GamepadEvent`s into the same state-update code.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from robots.teleop.base import Command, DeviceNotFoundError, TeleopState
from robots.teleop.mapping import deadzone
from wm.options import is_real

HOW_TO_CHECK = (
    "check that it is plugged in and seen by the kernel (`ls /dev/input/js*`, `jstest /dev/input/js0` from "
    "the joystick package, or `evtest`), and that your user is in the `input` group"
)


@dataclass(frozen=True)
class GamepadEvent:
    """One joystick event: `kind` "axis" (value in [-1, 1]), "button" (1 down, 0 up), "hat" ((x, y)) or
    "removed" (the pad was unplugged; value unused)."""

    kind: str
    index: int
    value: Any


@dataclass(frozen=True)
class GamepadLayout:
    """Axis, hat and button numbers of a pad (default: Xbox pad under SDL on Linux)."""

    left_x: int = 0
    left_y: int = 1
    left_trigger: int = 2
    right_x: int = 3
    right_y: int = 4
    right_trigger: int = 5
    hat: int = 0
    buttons: dict[int, Command] = field(
        default_factory=lambda: {
            0: Command.START,  # A
            7: Command.SAVE,  # Start
            1: Command.DISCARD,  # B
            3: Command.RERECORD,  # Y
            6: Command.QUIT,  # Back
        }
    )


class GamepadSource(Protocol):
    """Where events come from: `open()` returns the pad's name, `read()` the events since last read."""

    def open(self) -> str: ...

    def read(self) -> list[GamepadEvent]: ...

    def close(self) -> None: ...


class GamepadState:
    """Axis, hat and trigger values and pending commands, updated event by event; no I/O."""

    def __init__(self, layout: GamepadLayout) -> None:
        self.layout = layout
        self.axes: dict[int, float] = {layout.right_trigger: -1.0, layout.left_trigger: -1.0}
        self.hat = (0, 0)
        self.down: set[int] = set()
        self.commands: list[Command] = []
        self.removed = False  # unplugged: no reading is current any more

    def update(self, event: GamepadEvent) -> None:
        if event.kind == "removed":
            self.removed = True
        elif event.kind == "axis":
            value = float(event.value)
            if np.isfinite(value):  # a glitching driver's NaN is not a reading: the axis holds its last one
                self.axes[event.index] = float(np.clip(value, -1.0, 1.0))
        elif event.kind == "hat" and event.index == self.layout.hat:
            self.hat = (int(event.value[0]), int(event.value[1]))
        elif event.kind == "button":
            if event.value and event.index not in self.down:
                self.down.add(event.index)
                if event.index in self.layout.buttons:
                    self.commands.append(self.layout.buttons[event.index])
            elif not event.value:
                self.down.discard(event.index)

    def take(self, dz: float) -> TeleopState:
        lay = self.layout
        stick = deadzone(
            np.array([self.axes.get(i, 0.0) for i in (lay.left_x, lay.left_y, lay.right_x, lay.right_y)]), dz
        )
        lx, ly, rx, ry = stick
        # stick up reads negative in SDL; left reads negative
        motion = np.array([-ly, -lx, -ry, self.hat[0], self.hat[1], -rx], dtype=np.float64)
        trigger01 = deadzone(np.array([(self.axes[lay.right_trigger] + 1.0) / 2.0]), dz)[0]
        commands, self.commands = self.commands, []
        return TeleopState(motion=motion, gripper=2.0 * trigger01 - 1.0, commands=commands)


class GamepadDevice:
    """Gamepad teleop device (bindings in the module docstring).

    Args:
        index: which joystick, in SDL's order.
        deadzone: fraction of full deflection below which a stick or trigger reads zero.
        layout: axis and button numbers of the pad.
        source: event source; default the pygame joystick `index`.
    """

    name = "gamepad"

    def __init__(
        self,
        index: int = 0,
        deadzone: float = 0.1,
        layout: GamepadLayout | None = None,
        source: GamepadSource | None = None,
    ) -> None:
        if not (is_real(deadzone) and 0 <= deadzone < 1):  # "0.1" from Python was a TypeError
            raise ValueError(f"deadzone must be a number in [0, 1), got {deadzone!r}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:  # SDL's error names no option
            raise ValueError(f"gamepad index must be a joystick number >= 0, got {index!r}")
        self.index = index
        self.deadzone = deadzone
        self.layout = layout if layout is not None else GamepadLayout()
        self.source = source if source is not None else PygameJoystickSource(index)
        self.pad_name = ""
        self._state: GamepadState | None = None

    def connect(self) -> None:
        if self._state is None:
            self.pad_name = self.source.open()
            self._state = GamepadState(self.layout)

    def disconnect(self) -> None:
        if self._state is not None:
            self.source.close()
            self._state = None

    def poll(self) -> TeleopState:
        if self._state is None:
            raise RuntimeError("gamepad: not connected; call connect() first")
        for event in self.source.read():
            self._state.update(event)
        if self._state.removed:  # its sticks' last readings would keep the robot moving
            raise DeviceNotFoundError(f"gamepad: {self.pad_name or self.index} was unplugged; {HOW_TO_CHECK}")
        return self._state.take(self.deadzone)


def events_from_pygame(events: list[Any], instance_id: int, pygame: Any) -> list[GamepadEvent]:
    """`GamepadEvent`s from pygame joystick events of the pad `instance_id`; other events are dropped."""
    out = []
    for e in events:
        if getattr(e, "instance_id", getattr(e, "joy", None)) != instance_id:
            continue
        if e.type == pygame.JOYAXISMOTION:
            out.append(GamepadEvent("axis", e.axis, float(e.value)))
        elif e.type == pygame.JOYBUTTONDOWN:
            out.append(GamepadEvent("button", e.button, 1))
        elif e.type == pygame.JOYBUTTONUP:
            out.append(GamepadEvent("button", e.button, 0))
        elif e.type == pygame.JOYHATMOTION:
            out.append(GamepadEvent("hat", e.hat, tuple(e.value)))
        elif e.type == pygame.JOYDEVICEREMOVED:
            out.append(GamepadEvent("removed", instance_id, None))
    return out


class PygameJoystickSource:
    """The real event source: pygame's joystick `index`, with the dummy video driver."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._pygame: Any = None
        self._joystick: Any = None
        self._own_display = False

    def open(self) -> str:
        if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
            os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no window and no display needed
        os.environ.setdefault("SDL_JOYSTICK_ALLOW_BACKGROUND_EVENTS", "1")  # events without window focus
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        try:
            import pygame
        except ImportError as e:
            raise DeviceNotFoundError(f"gamepad: pygame is not installed ({e}); `pip install pygame`") from e
        self._pygame = pygame
        self._own_display = not pygame.display.get_init()
        pygame.display.init()  # the event queue lives in the video subsystem
        pygame.joystick.init()
        count = pygame.joystick.get_count()
        if self.index >= count:
            self._quit()
            raise DeviceNotFoundError(
                f"gamepad: joystick {self.index} not found ({count} joystick(s) seen by SDL); {HOW_TO_CHECK}"
            )
        self._joystick = pygame.joystick.Joystick(self.index)
        self._joystick.init()
        return self._joystick.get_name()

    def read(self) -> list[GamepadEvent]:
        pg = self._pygame
        kinds = [pg.JOYAXISMOTION, pg.JOYBUTTONDOWN, pg.JOYBUTTONUP, pg.JOYHATMOTION, pg.JOYDEVICEREMOVED]
        return events_from_pygame(pg.event.get(eventtype=kinds), self._joystick.get_instance_id(), pg)

    def close(self) -> None:
        if self._joystick is not None:
            self._joystick.quit()
            self._joystick = None
            self._quit()

    def _quit(self) -> None:
        self._pygame.joystick.quit()
        if self._own_display:  # leave a display the application opened itself
            self._pygame.display.quit()
