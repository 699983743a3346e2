"""Stand-ins for teleop hardware that is not here, for tests only (production code never imports this).

Each fake replaces only the lowest layer, so the device's own parsing and state code runs:
- `FakeKeyListener`: pynput's `keyboard.Listener`, replaying recorded (time, key, down) events
  into the device's `on_press` / `on_release` handlers.
- `FakeHid`: hidapi's `hid` module; its devices return recorded raw report bytes.
- `FakeGamepadSource`: the pygame joystick source, returning recorded `GamepadEvent` batches.
- `FakeFeetechSerial`: the `serial.Serial` port under lerobot's Feetech motor bus; it answers the
  Feetech (SCS protocol 0) packets from an in-memory control table per motor (`FakeServoPort`, the
  part every fake motor bus shares).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from robots.teleop.gamepad import GamepadEvent


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------- keyboard
class FakeKeyListener:
    """Looks like `pynput.keyboard.Listener`; `replay_until(t)` delivers recorded events up to time t."""

    def __init__(self, events: Iterable[tuple[float, Any, bool]], clock: FakeClock) -> None:
        self.events = sorted(events, key=lambda e: e[0])
        self.clock = clock
        self.on_press: Callable[[Any], None] | None = None
        self.on_release: Callable[[Any], None] | None = None
        self.running = False

    def factory(self, on_press: Callable[[Any], None], on_release: Callable[[Any], None]) -> FakeKeyListener:
        """Pass as `KeyboardDevice(listener_factory=...)`; called like pynput's Listener."""
        self.on_press, self.on_release = on_press, on_release
        return self

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def is_alive(self) -> bool:
        """As the listener's thread: False once stopped (or, as pynput's, ended by a lost display)."""
        return self.running

    def replay_until(self, t: float) -> None:
        while self.events and self.events[0][0] <= t:
            when, key, down = self.events.pop(0)
            self.clock.t = when
            (self.on_press if down else self.on_release)(key)
        self.clock.t = t


# ---------------------------------------------------------------------- HID (SpaceMouse)
class FakeHidDevice:
    """Looks like `hid.device()`: `read()` returns queued reports, then [] (non-blocking, nothing new)."""

    def __init__(self, owner: FakeHid) -> None:
        self.owner = owner
        self.path: bytes | None = None
        self.nonblocking = 0

    def open_path(self, path: bytes) -> None:
        if path not in {d["path"] for d in self.owner.devices}:
            raise OSError("open failed")
        self.path = path

    def set_nonblocking(self, value: int) -> None:
        self.nonblocking = value

    def read(self, max_length: int, timeout_ms: int = 0) -> list[int]:
        if not self.owner.reports:
            return []
        return list(self.owner.reports.pop(0))[:max_length]

    def close(self) -> None:
        self.path = None


class FakeHid:
    """Looks like hidapi's `hid` module with the given enumerated devices and a queue of raw reports."""

    def __init__(self, devices: list[dict]) -> None:
        self.devices = devices
        self.reports: list[bytes] = []

    def enumerate(self, vendor_id: int = 0, product_id: int = 0) -> list[dict]:
        return [dict(d) for d in self.devices]

    def device(self) -> FakeHidDevice:
        return FakeHidDevice(self)


# ---------------------------------------------------------------------- gamepad
class FakeGamepadSource:
    """Stands in for the pygame joystick: each `read()` returns the next recorded batch of events."""

    def __init__(self, batches: list[list[GamepadEvent]], name: str = "Fake Xbox pad") -> None:
        self.batches = list(batches)
        self.name = name
        self.is_open = False

    def open(self) -> str:
        self.is_open = True
        return self.name

    def read(self) -> list[GamepadEvent]:
        return self.batches.pop(0) if self.batches else []

    def close(self) -> None:
        self.is_open = False


# ---------------------------------------------------------------------- Feetech serial bus
PING, READ, WRITE, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x82, 0x83
BROADCAST = 0xFE


def _checksum(body: Iterable[int]) -> int:
    return ~sum(body) & 0xFF


class FakeServoPort:
    """What the fake motor buses share: the pyserial surface their SDKs' PortHandler uses (`rx` is what
    the motors answered, not yet read), and an in-memory control table per motor (`memory[id]`, 256
    little-endian bytes) with a log of every write (`written`: (id, address, data)). A subclass parses
    its protocol's instruction packets in `write` and answers with `_status`.
    `before_read(address, length)`, when set, runs before each read is answered: the place to move the
    motors as an operator's hand or the servos' own motion would between two reads."""

    def __init__(self, memory: dict[int, bytearray]) -> None:
        self.memory = memory
        self.rx = bytearray()
        self.is_open = False
        self.written: list[tuple[int, int, bytes]] = []
        self.before_read: Callable[[int, int], None] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> FakeServoPort:
        """Pass as the `serial.Serial` class: opening the port returns this fake."""
        self.is_open = True
        return self

    # the pyserial surface
    @property
    def in_waiting(self) -> int:
        return len(self.rx)

    def reset_input_buffer(self) -> None:
        self.rx.clear()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.is_open = False

    def read(self, size: int = 1) -> bytes:
        out = bytes(self.rx[:size])
        del self.rx[:size]
        return out

    # the motors
    def _moved(self, address: int, n: int) -> None:
        if self.before_read is not None:
            self.before_read(address, n)

    def _read(self, motor_id: int, address: int, n: int) -> bytes | None:
        if motor_id not in self.memory:
            return None
        return bytes(self.memory[motor_id][address : address + n])

    def _write(self, motor_id: int, address: int, data: bytes) -> None:
        if motor_id in self.memory:
            self.memory[motor_id][address : address + len(data)] = data
            self.written.append((motor_id, address, bytes(data)))


class FakeFeetechSerial(FakeServoPort):
    """A serial port with Feetech servos behind it (SCS protocol 0): instruction packets in, status
    packets out (`FakeServoPort` for the control tables and `before_read`). `set(id, addr, n, v)`
    writes a register, as the motor's own firmware would (e.g. a new Present_Position).
    `corrupt_reads`: that many of the next reads (it counts down; `before_read` may set it) are answered
    with one status packet whose checksum is wrong and nothing more, as noise on the line would.
    `unplugged`: from then on every write raises OSError, as pyserial does when the adapter is pulled.
    `write_errors`: that many of the next writes (it counts down) raise OSError, then the line works
    again, as after one glitch of a USB adapter.
    """

    def __init__(self, memory: dict[int, bytearray]) -> None:
        super().__init__(memory)
        self.corrupt_reads = 0
        self.unplugged = False
        self.write_errors = 0

    def set(self, motor_id: int, address: int, length: int, value: int) -> None:
        self.memory[motor_id][address : address + length] = int(value).to_bytes(length, "little")

    def write(self, packet: bytes | list[int]) -> int:
        if self.unplugged or self.write_errors > 0:
            self.write_errors = max(0, self.write_errors - 1)
            raise OSError(5, "Input/output error")
        data = bytes(packet)
        if len(data) < 6 or data[:2] != b"\xff\xff":
            return len(data)
        motor_id, length, instruction = data[2], data[3], data[4]
        params = data[5 : 3 + length]
        if instruction == PING:
            self._status(motor_id, b"")
        elif instruction == READ:
            self._moved(params[0], params[1])
            if not self._corrupt(motor_id):
                self._status(motor_id, self._read(motor_id, params[0], params[1]))
        elif instruction == WRITE:
            self._write(motor_id, params[0], params[1:])
            self._status(motor_id, b"")
        elif instruction == SYNC_READ:
            self._moved(params[0], params[1])
            if not self._corrupt(params[2]):
                for mid in params[2:]:
                    self._status(mid, self._read(mid, params[0], params[1]))
        elif instruction == SYNC_WRITE:
            address, n = params[0], params[1]
            for i in range(2, len(params), n + 1):
                self._write(params[i], address, params[i + 1 : i + 1 + n])
        return len(data)

    def _corrupt(self, motor_id: int) -> bool:
        """Answer this read with a corrupt packet when `corrupt_reads` says so."""
        if self.corrupt_reads <= 0:
            return False
        self.corrupt_reads -= 1
        body = bytes([motor_id, 2, 0x00])
        self.rx += b"\xff\xff" + body + bytes([_checksum(body) ^ 0xFF])
        return True

    def _status(self, motor_id: int, data: bytes | None) -> None:
        if motor_id == BROADCAST or motor_id not in self.memory or data is None:
            return  # absent motors stay silent; the sdk times out
        body = bytes([motor_id, len(data) + 2, 0x00]) + data
        self.rx += b"\xff\xff" + body + bytes([_checksum(body)])
