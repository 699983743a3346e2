"""Keyboard teleoperation: pynput under a display server, or raw keys from a terminal over SSH.

Bindings (letters are case-insensitive):

    key              effect
    w / s            +x / -x   (forward / back)
    a / d            +y / -y   (left / right)
    r / f            +z / -z   (up / down)
    u / o            +roll / -roll
    i / k            +pitch / -pitch
    j / l            +yaw / -yaw
    space            toggle the gripper (starts open)
    b                START an episode ("begin")
    enter            SAVE the episode
    backspace, del   DISCARD the episode
    x                RERECORD (discard and record again)
    q, esc           QUIT

Each motion key gives 1.0 on its axis; opposite keys cancel. Under pynput, commands and the gripper
toggle act once per press (auto-repeat of a held key is ignored); a terminal cannot tell a held key
from repeated presses, so there every repeated character acts again.

Backends:
- `pynput`: a global `pynput.keyboard.Listener` (it sees keys typed in any window). Motion lasts
  while a key is held (press/release tracking). Needs an X11 display server (`DISPLAY`).
- `terminal`: raw keys from a terminal (stdin by default) in cbreak mode, read without blocking;
  works over SSH. Terminals report no releases, so a press gives a motion impulse lasting `hold_s`
  seconds; key auto-repeat (typically after a 250-600 ms delay) keeps a held key going.
- `auto`: pynput when a display is set, else the terminal when stdin is one.

The listener factory and the terminal file descriptor are injectable; tests drive the same
`on_press` / `on_release` handlers pynput calls and the same terminal reader (on a pty).
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from typing import Any

import numpy as np

from robots.teleop.base import Command, DeviceNotFoundError, TeleopState
from wm.options import is_real

BACKENDS = ("auto", "pynput", "terminal")
# key name -> (motion axis, sign)
MOTION_KEYS: dict[str, tuple[int, float]] = {
    "w": (0, 1.0), "s": (0, -1.0),
    "a": (1, 1.0), "d": (1, -1.0),
    "r": (2, 1.0), "f": (2, -1.0),
    "u": (3, 1.0), "o": (3, -1.0),
    "i": (4, 1.0), "k": (4, -1.0),
    "j": (5, 1.0), "l": (5, -1.0),
}  # fmt: skip
COMMAND_KEYS: dict[str, Command] = {
    "b": Command.START,
    "enter": Command.SAVE,
    "backspace": Command.DISCARD,
    "delete": Command.DISCARD,
    "x": Command.RERECORD,
    "q": Command.QUIT,
    "esc": Command.QUIT,
}
GRIPPER_KEY = "space"
# terminal byte sequences -> key names (escape sequences first: longest match wins)
TERMINAL_SEQUENCES: dict[bytes, str] = {
    b"\x1b[A": "up", b"\x1b[B": "down", b"\x1b[C": "right", b"\x1b[D": "left",
    b"\x1bOA": "up", b"\x1bOB": "down", b"\x1bOC": "right", b"\x1bOD": "left",
    b"\x1b[3~": "delete", b"\x1b": "esc", b"\r": "enter", b"\n": "enter",
    b"\x7f": "backspace", b"\x08": "backspace", b" ": "space", b"\t": "tab",
}  # fmt: skip


def key_name(key: Any) -> str:
    """Normalise a pynput `Key` / `KeyCode` (or a plain string) to a lowercase name like 'w' or 'enter'."""
    if isinstance(key, str) and len(key) != 1:
        return key
    char = key if isinstance(key, str) else getattr(key, "char", None)
    if char:
        return TERMINAL_SEQUENCES.get(char.encode(), char.lower())  # " " -> "space", "\r" -> "enter"
    name = getattr(key, "name", None)
    return name if isinstance(name, str) else ""


def decode_terminal_keys(data: bytes) -> tuple[list[str], bytes]:
    """Key names typed in a terminal, from its raw bytes, and the bytes of a sequence the data ends
    inside (to be completed by the next read). Known escape sequences are keys; other complete ones
    (Home, F1, PgUp, Shift+arrow: CSI "ESC [ ... final" and SS3 "ESC O x") are ignored, never a lone
    Esc (Esc quits: a stray F1 ended the session and lost its episode); ESC then any other byte is
    Alt+that key (the key alone). A lone ESC at the end is left over: the caller decides, at its next
    read, whether it was the Esc key."""
    keys: list[str] = []
    i = 0
    longest = max(len(s) for s in TERMINAL_SEQUENCES)
    while i < len(data):
        if data[i] == 0x1B:
            if i + 1 == len(data):
                return keys, data[i:]  # a lone ESC so far
            intro = data[i + 1]
            if intro in (0x5B, 0x4F):  # "[" (CSI) or "O" (SS3)
                end = i + 2
                if intro == 0x5B:
                    while end < len(data) and not 0x40 <= data[end] <= 0x7E:
                        end += 1
                if end >= len(data):
                    return keys, data[i:]  # cut between two reads
                name = TERMINAL_SEQUENCES.get(data[i : end + 1])
                if name is not None:
                    keys.append(name)
                i = end + 1
                continue
            i += 1  # Alt+key: the key
            continue
        for n in range(min(longest, len(data) - i), 0, -1):
            name = TERMINAL_SEQUENCES.get(data[i : i + n])
            if name is not None:
                keys.append(name)
                i += n
                break
        else:
            keys.append(chr(data[i]).lower() if data[i] < 128 else "")
            i += 1
    return [k for k in keys if k], b""


class KeyState:
    """Held keys, the gripper toggle and pending commands; shared by both backends.

    With `hold_s=None` a key moves until released; otherwise a press moves for `hold_s` seconds.
    """

    def __init__(self, hold_s: float | None) -> None:
        self.hold_s = hold_s
        self.until: dict[str, float] = {}  # motion key -> time its motion ends (inf while held)
        self.down: set[str] = set()
        self.gripper = -1.0
        self.commands: list[Command] = []

    def press(self, name: str, t: float) -> None:
        repeat = name in self.down and self.hold_s is None
        if self.hold_s is None:
            self.down.add(name)
        if name in MOTION_KEYS:
            self.until[name] = np.inf if self.hold_s is None else t + self.hold_s
        if repeat:
            return
        if name == GRIPPER_KEY:
            self.gripper = -self.gripper
        elif name in COMMAND_KEYS:
            self.commands.append(COMMAND_KEYS[name])

    def release(self, name: str) -> None:
        self.down.discard(name)
        if self.hold_s is None:
            self.until.pop(name, None)

    def take(self, t: float) -> TeleopState:
        motion = np.zeros(6)
        for name, end in list(self.until.items()):
            if t < end:
                axis, sign = MOTION_KEYS[name]
                motion[axis] += sign
            else:
                del self.until[name]
        commands, self.commands = self.commands, []
        return TeleopState(motion=np.clip(motion, -1.0, 1.0), gripper=self.gripper, commands=commands)


class KeyboardDevice:
    """Keyboard teleop device (bindings and backends in the module docstring).

    Args:
        backend: "auto", "pynput" or "terminal".
        hold_s: terminal backend only: how long one key press keeps moving, in seconds.
        fd: terminal backend only: the terminal's file descriptor (default: stdin).
        listener_factory: pynput backend only: builds the listener from `on_press` / `on_release`
            keyword arguments (default: `pynput.keyboard.Listener`).
        clock: monotonic clock in seconds.
    """

    name = "keyboard"

    def __init__(
        self,
        backend: str = "auto",
        hold_s: float = 0.3,
        fd: int | None = None,
        listener_factory: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"keyboard backend {backend!r} is not one of {BACKENDS}")
        if not (is_real(hold_s) and np.isfinite(hold_s) and hold_s > 0):  # "0.3" was a TypeError
            raise ValueError(f"hold_s must be a finite number > 0, got {hold_s!r}")
        self.backend = backend
        self.hold_s = hold_s
        self.fd = fd
        self.listener_factory = listener_factory
        self.clock = clock
        self._lock = threading.Lock()
        self._keys = KeyState(hold_s=None)
        self._active: str | None = None  # backend in use once connected
        self._listener: Any = None
        self._saved_tty: list | None = None
        self._term_fd = -1
        self._partial = b""  # the start of an escape sequence the last read ended inside

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        if self._active is not None:
            return
        backend = self.backend if self.backend != "auto" else self._pick_backend()
        if backend == "pynput":
            self._connect_pynput()
        else:
            self._connect_terminal()
        self._active = backend

    def _pick_backend(self) -> str:
        if self.listener_factory is not None or _has_display():
            return "pynput"
        if self.fd is not None or sys.stdin.isatty():
            return "terminal"
        raise DeviceNotFoundError(
            "keyboard: no display server (DISPLAY is unset) for pynput and stdin is not a terminal; "
            "run the recorder in an interactive terminal (e.g. over `ssh -t`) for the terminal backend"
        )

    def _connect_pynput(self) -> None:
        factory = self.listener_factory
        if factory is None:
            factory = _pynput_listener_factory()
        self._keys = KeyState(hold_s=None)
        self._listener = factory(on_press=self.on_press, on_release=self.on_release)
        self._listener.start()

    def _connect_terminal(self) -> None:
        fd = sys.stdin.fileno() if self.fd is None else self.fd
        if not os.isatty(fd):
            raise DeviceNotFoundError(
                f"keyboard: file descriptor {fd} is not a terminal; the terminal backend reads raw keys "
                "from an interactive terminal (use `ssh -t`, not a pipe), or use backend='pynput' under "
                "a display server"
            )
        self._saved_tty = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys arrive one at a time, unechoed; Ctrl-C still interrupts
        self._term_fd = fd
        self._keys = KeyState(hold_s=self.hold_s)

    def disconnect(self) -> None:
        # Not connected from here on, even when stopping the listener or restoring the terminal fails (a
        # closed terminal): the error says so, and a later connect() starts afresh instead of returning early.
        active, self._active = self._active, None
        listener, self._listener = self._listener, None
        saved, self._saved_tty = self._saved_tty, None
        self._partial = b""  # a sequence cut by the disconnect is no key of the next session
        if active == "pynput" and listener is not None:
            listener.stop()
        if active == "terminal" and saved is not None:
            termios.tcsetattr(self._term_fd, termios.TCSADRAIN, saved)

    # ------------------------------------------------------------------ pynput handlers
    def on_press(self, key: Any) -> None:
        """pynput's press callback (also what tests call with recorded keys)."""
        name = key_name(key)
        if name:
            with self._lock:
                self._keys.press(name, self.clock())

    def on_release(self, key: Any) -> None:
        """pynput's release callback."""
        with self._lock:
            self._keys.release(key_name(key))

    # ------------------------------------------------------------------ polling
    def poll(self) -> TeleopState:
        if self._active is None:
            raise RuntimeError("keyboard: not connected; call connect() first")
        if self._active == "pynput" and not self._listener.is_alive():  # its thread ended (the display
            # connection lost): a key held then never sees its release, and would move on forever
            raise DeviceNotFoundError("keyboard: its listener stopped (the display connection ended?)")
        if self._active == "terminal":
            new = _read_available(self._term_fd)
            data, names = self._partial + new, []
            if self._partial == b"\x1b" and new[:1] not in (b"[", b"O"):  # no sequence followed the ESC
                data, names = new, ["esc"]  # of the last poll: it was the Esc key
            more, rest = decode_terminal_keys(data)
            self._partial = rest if new else b""  # a sequence nothing came to complete is dropped
            names += more
            now = self.clock()
            with self._lock:
                for name in names:
                    self._keys.press(name, now)
        with self._lock:
            return self._keys.take(self.clock())


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY"))


def _pynput_listener_factory() -> Callable[..., Any]:
    if not _has_display():
        raise DeviceNotFoundError(
            "keyboard: pynput needs a display server and DISPLAY is unset (headless or SSH session); "
            "use KeyboardDevice(backend='terminal') to read keys from this terminal instead"
        )
    try:
        from pynput import keyboard
    except ImportError as e:  # pynput missing, or the X connection failed
        raise DeviceNotFoundError(
            f"keyboard: pynput cannot listen to the keyboard ({e}); check that DISPLAY points to a running "
            "X server, or use KeyboardDevice(backend='terminal')"
        ) from e
    return keyboard.Listener


def _read_available(fd: int) -> bytes:
    """All bytes waiting on `fd`, without blocking."""
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1024)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
