"""Stand-ins for real-arm hardware, for tests only (production code never imports this).

Each fake replaces only the device, so lerobot's robot, motor bus, motor SDK and camera code all run:
- `FakeSerialPorts`: `serial.Serial` for several ports at once (a leader and a follower arm), each
  port name answered by its own fake bus; any other name fails to open, as a missing device does.
- `FakeFeetechSerial` (from `robots.teleop.fakes`) and `so_arm()`: six STS3215 servos of an SO-100 /
  SO-101 arm (Feetech protocol 0).
- `FakeDynamixelSerial` and `koch_arm()`: Dynamixel X-series servos answering protocol 2.0 packets
  (CRC-16, byte stuffing) from an in-memory control table per motor; the Koch arm's six motors.
- `FakeCameras`: `cv2.VideoCapture` for the listed camera indices or paths, returning generated BGR
  frames at the configured rate.
- `calibration(...)`: lerobot's calibration file content for an arm whose joints share one range.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from robots.teleop.fakes import FakeFeetechSerial, FakeServoPort

__all__ = [
    "FakeCameras",
    "FakeDynamixelSerial",
    "FakeFeetechSerial",
    "FakeSerialPorts",
    "calibration",
    "koch_arm",
    "so_arm",
]

SO_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
KOCH_MODELS = (1060, 1060, 1200, 1200, 1200, 1200)  # xl430-w250 x2, then xl330-m288


# ---------------------------------------------------------------------- several ports
class FakeSerialPorts:
    """Pass as the `serial.Serial` class: opening `port` returns the fake bus registered under its name."""

    def __init__(self, ports: dict[str, Any]) -> None:
        self.ports = ports

    def __call__(self, *args: Any, port: str | None = None, **kwargs: Any) -> Any:
        import serial

        name = port if port is not None else (args[0] if args else None)
        if name not in self.ports:
            raise serial.SerialException(f"[Errno 2] could not open port {name}: No such file or directory")
        return self.ports[name](*args, port=port, **kwargs)


# ---------------------------------------------------------------------- control tables
def _register(table: bytearray, address: int, length: int, value: int) -> None:
    table[address : address + length] = int(value).to_bytes(length, "little", signed=value < 0)


def so_arm(position: int = 2000, limits: tuple[int, int] = (1000, 3000)) -> FakeFeetechSerial:
    """Six STS3215 servos (ids 1-6) at raw `position`, with `limits` as Min/Max_Position_Limit."""
    memory = {}
    for motor_id in range(1, 7):
        m = bytearray(256)
        m[0], m[1] = 3, 10  # firmware 3.10
        _register(m, 3, 2, 777)  # model number of an STS3215
        _register(m, 9, 2, limits[0])
        _register(m, 11, 2, limits[1])
        _register(m, 56, 2, position)  # Present_Position
        memory[motor_id] = m
    return FakeFeetechSerial(memory)


def koch_arm(position: int = 2048, limits: tuple[int, int] = (1024, 3072)) -> FakeDynamixelSerial:
    """The Koch arm's six Dynamixel servos (ids 1-6) at raw `position`, with `limits` as position limits."""
    memory = {}
    for motor_id, model in enumerate(KOCH_MODELS, 1):
        m = bytearray(256)
        _register(m, 0, 2, model)
        m[6] = 52  # firmware version
        _register(m, 48, 4, limits[1])  # Max_Position_Limit
        _register(m, 52, 4, limits[0])  # Min_Position_Limit
        _register(m, 132, 4, position)  # Present_Position
        memory[motor_id] = m
    return FakeDynamixelSerial(memory)


def calibration(limits: tuple[int, int], motors: Iterable[str] = SO_MOTORS) -> dict[str, dict[str, int]]:
    """lerobot's calibration file content (`<arm id>.json`): every joint with range `limits`, no offset."""
    return {
        name: {"id": i, "drive_mode": 0, "homing_offset": 0, "range_min": limits[0], "range_max": limits[1]}
        for i, name in enumerate(motors, 1)
    }


# ---------------------------------------------------------------------- Dynamixel protocol 2.0
DXL_PING, DXL_READ, DXL_WRITE, DXL_SYNC_READ, DXL_SYNC_WRITE, DXL_STATUS = 0x01, 0x02, 0x03, 0x82, 0x83, 0x55
DXL_BROADCAST = 0xFE
DXL_HEADER = b"\xff\xff\xfd\x00"
TORQUE_ENABLE = 64  # X-series control table: the RAM area starts here; below it, EEPROM
ACCESS_ERROR = 0x07  # status error: writing a register that cannot be written now


def crc16(data: bytes) -> int:
    """CRC-16 of Dynamixel protocol 2.0 (polynomial 0x8005, initial value 0, not reflected)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def _stuff(body: bytes) -> bytes:
    """Byte stuffing: an FD after FF FF inside a packet's body gets a second FD."""
    out = bytearray()
    for byte in body:
        out.append(byte)
        if byte == 0xFD and out[-3:-1] == b"\xff\xff":
            out.append(0xFD)
    return bytes(out)


def _unstuff(body: bytes) -> bytes:
    out = bytearray()
    for byte in body:
        if byte == 0xFD and out[-3:] == b"\xff\xff\xfd":
            continue
        out.append(byte)
    return bytes(out)


class FakeDynamixelSerial(FakeServoPort):
    """A serial port with Dynamixel X-series servos behind it: protocol 2.0 instruction packets in,
    status packets out (ping, read, write, sync read, sync write); the control tables, the write log
    and `before_read` are `FakeServoPort`'s. `set(id, addr, n, v)` writes a register as the motor's
    firmware would, `get` reads one back (signed).

    As the X-series firmware does, the EEPROM area (addresses below 64: homing offset, position
    limits, operating mode...) refuses writes while the motor's torque is on (an Access Error status;
    a sync write is ignored). `torque_stuck`: ids of motors whose torque cannot be turned off (the
    write is acknowledged and ignored), for faults.
    """

    torque_stuck: tuple[int, ...] = ()

    def set(self, motor_id: int, address: int, length: int, value: int) -> None:
        _register(self.memory[motor_id], address, length, value)

    def get(self, motor_id: int, address: int, length: int) -> int:
        return int.from_bytes(self.memory[motor_id][address : address + length], "little", signed=True)

    def write(self, packet: bytes | list[int]) -> int:
        data = bytes(packet)
        if len(data) < 10 or data[:4] != DXL_HEADER:
            return len(data)
        motor_id, length = data[4], int.from_bytes(data[5:7], "little")
        packet_end = 7 + length
        if crc16(data[: packet_end - 2]) != int.from_bytes(data[packet_end - 2 : packet_end], "little"):
            return len(data)  # a corrupt packet gets no answer
        body = _unstuff(data[7 : packet_end - 2])
        instruction, params = body[0], body[1:]
        if instruction == DXL_PING:
            ids = sorted(self.memory) if motor_id == DXL_BROADCAST else [motor_id]
            for mid in ids:  # model number and firmware version
                info = self._read(mid, 0, 2) + self._read(mid, 6, 1) if mid in self.memory else None
                self._status(mid, info)
        elif instruction == DXL_READ:
            address, n = int.from_bytes(params[0:2], "little"), int.from_bytes(params[2:4], "little")
            self._moved(address, n)
            self._status(motor_id, self._read(motor_id, address, n))
        elif instruction == DXL_WRITE:
            address = int.from_bytes(params[0:2], "little")
            if self._refused(motor_id, address):
                self._status(motor_id, b"", error=ACCESS_ERROR)
            else:
                self._write(motor_id, address, params[2:])
                self._status(motor_id, b"")
        elif instruction == DXL_SYNC_READ:
            address, n = int.from_bytes(params[0:2], "little"), int.from_bytes(params[2:4], "little")
            self._moved(address, n)
            for mid in params[4:]:
                self._status(mid, self._read(mid, address, n))
        elif instruction == DXL_SYNC_WRITE:
            address, n = int.from_bytes(params[0:2], "little"), int.from_bytes(params[2:4], "little")
            for i in range(4, len(params), n + 1):
                if not self._refused(params[i], address):
                    self._write(params[i], address, params[i + 1 : i + 1 + n])
        return len(data)

    def _refused(self, motor_id: int, address: int) -> bool:
        """A write the firmware does not carry out: EEPROM with torque on, or a stuck motor's torque."""
        torque_on = motor_id in self.memory and self.memory[motor_id][TORQUE_ENABLE] == 1
        return (address < TORQUE_ENABLE and torque_on) or (
            address == TORQUE_ENABLE and motor_id in self.torque_stuck
        )

    def _status(self, motor_id: int, data: bytes | None, error: int = 0) -> None:
        if motor_id == DXL_BROADCAST or motor_id not in self.memory or data is None:
            return  # absent motors stay silent; the sdk times out
        body = _stuff(bytes([DXL_STATUS, error]) + data)  # instruction, error, parameters
        head = DXL_HEADER + bytes([motor_id]) + (len(body) + 2).to_bytes(2, "little")
        packet = head + body
        self.rx += packet + crc16(packet).to_bytes(2, "little")


# ---------------------------------------------------------------------- cameras (cv2.VideoCapture)
class FakeCameras:
    """Cameras behind `cv2.VideoCapture`: pass `capture_class` as `cv2.VideoCapture`.

    Only the listed indices or paths open. Frame k of a camera is BGR (k % 256, 100, 200) everywhere,
    so a reader can tell the frames apart and check the channel order; `read()` waits for the next
    frame time at the configured fps, as a camera does. After `stall()` every camera stops delivering:
    each `read()` waits one frame time and fails, as OpenCV's does when a camera is unplugged.
    """

    def __init__(self, devices: Iterable[int | str], size: tuple[int, int] = (480, 640), fps: float = 30.0):
        self.devices = {str(d) for d in devices}
        self.size = size  # (height, width) before anyone sets it
        self.fps = fps
        self.opened: list[Any] = []
        self.stalled = False
        cameras = self

        class FakeVideoCapture:
            """Looks like `cv2.VideoCapture(index_or_path, backend)`."""

            def __init__(self, index_or_path: int | str, backend: int = 0) -> None:
                self.source = str(index_or_path)
                self.open = self.source in cameras.devices
                self.props = {3: float(cameras.size[1]), 4: float(cameras.size[0]), 5: cameras.fps, 6: 0.0}
                self.frames = 0
                self.next_t = 0.0
                cameras.opened.append(self)

            def isOpened(self) -> bool:  # noqa: N802 - OpenCV's names
                return self.open

            def release(self) -> None:
                self.open = False

            def get(self, prop: int) -> float:
                return self.props.get(prop, 0.0)

            def set(self, prop: int, value: float) -> bool:
                self.props[prop] = float(value)
                return True

            def getBackendName(self) -> str:  # noqa: N802
                return "FAKE"

            def read(self) -> tuple[bool, np.ndarray | None]:
                if not self.open:
                    return False, None
                wait = self.next_t - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.next_t = time.monotonic() + 1.0 / max(self.props[5], 1.0)
                if cameras.stalled:
                    return False, None
                h, w = int(self.props[4]), int(self.props[3])
                frame = np.empty((h, w, 3), dtype=np.uint8)
                frame[...] = (self.frames % 256, 100, 200)
                self.frames += 1
                return True, frame

        self.capture_class = FakeVideoCapture

    def stall(self) -> None:
        """No camera delivers frames from now on (see the class docstring)."""
        self.stalled = True
