"""Teleop devices driven by recorded event streams through the same code as the real hardware.

Only the hardware layer is faked (`robots.teleop.fakes`): pynput's listener, hidapi's device,
pygame's joystick, the serial port under lerobot's motor bus. Devices are built through the
registry, as the recorder builds them. Each "no hardware" test takes the real backend path.
"""

from __future__ import annotations

import json
import os
import pty
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from robots.base import Feature, RobotError
from robots.real import fakes as real_fakes
from robots.registry import device_class
from robots.teleop.base import Command, DeviceNotFoundError, TeleopDevice, TeleopState
from robots.teleop.fakes import FakeClock, FakeFeetechSerial, FakeGamepadSource, FakeHid, FakeKeyListener
from robots.teleop.gamepad import GamepadEvent, events_from_pygame
from robots.teleop.keyboard import decode_terminal_keys
from robots.teleop.mapping import ActionMapper, deadzone
from wm.data.schema import ActionSpace


# ====================================================================== keyboard (pynput handlers)
class _KeyCode:  # the attributes pynput's KeyCode / Key carry
    def __init__(self, char: str | None = None, name: str | None = None) -> None:
        self.char, self.name = char, name


def _keyboard(events):
    clock = FakeClock()
    listener = FakeKeyListener(events, clock)
    dev = device_class("keyboard")(backend="pynput", listener_factory=listener.factory, clock=clock)
    dev.connect()
    assert listener.running and isinstance(dev, TeleopDevice)
    return dev, listener


def test_keyboard_held_keys_move_until_released():
    w, a, s = _KeyCode("w"), _KeyCode("A"), _KeyCode("s")  # shift held on "a": case-insensitive
    events = [(0.0, w, True), (0.05, w, True), (0.1, a, True), (0.3, s, True), (0.4, s, False),
              (0.5, w, False), (0.6, a, False)]  # fmt: skip
    dev, listener = _keyboard(events)
    listener.replay_until(0.2)
    np.testing.assert_allclose(dev.poll().motion, [1, 1, 0, 0, 0, 0])  # w held (repeat ignored), a held
    listener.replay_until(0.35)
    np.testing.assert_allclose(dev.poll().motion, [0, 1, 0, 0, 0, 0])  # w and s cancel
    listener.replay_until(0.45)
    np.testing.assert_allclose(dev.poll().motion, [1, 1, 0, 0, 0, 0])  # s released, w still held
    listener.replay_until(5.0)
    np.testing.assert_allclose(dev.poll().motion, np.zeros(6))  # still zero long after release
    dev.disconnect()
    assert not listener.running


def test_a_keyboard_whose_listener_died_fails_its_polls_instead_of_holding_a_key_forever():
    """The listener thread ended (the display connection lost) with w held: its release never came and
    every poll moved on, with no error, while a SpaceMouse or gamepad in that state fails."""
    dev, listener = _keyboard([(0.0, _KeyCode("w"), True)])
    listener.replay_until(0.1)
    np.testing.assert_allclose(dev.poll().motion, [1, 0, 0, 0, 0, 0])
    listener.running = False  # the thread ended by itself
    with pytest.raises(DeviceNotFoundError, match=r"^keyboard: its listener stopped"):
        dev.poll()
    dev.disconnect()


def test_keyboard_rotations_gripper_and_commands_once():
    space, enter = _KeyCode(name="space"), _KeyCode(name="enter")
    events = [(0.0, _KeyCode("j"), True), (0.0, _KeyCode("u"), True), (0.0, _KeyCode("k"), True),
              (0.1, space, True), (0.15, space, True), (0.2, space, False),
              (0.3, enter, True), (0.31, enter, True), (0.32, enter, False),
              (0.4, _KeyCode("b"), True), (0.4, _KeyCode("x"), True), (0.4, _KeyCode(name="esc"), True),
              (0.4, _KeyCode(name="backspace"), True)]  # fmt: skip
    dev, listener = _keyboard(events)
    first = dev.poll()
    assert first.gripper == -1.0 and first.commands == []  # starts open
    listener.replay_until(0.25)
    state = dev.poll()
    np.testing.assert_allclose(state.motion, [0, 0, 0, 1, -1, 1])  # u +roll, k -pitch, j +yaw
    assert state.gripper == 1.0  # one toggle: auto-repeat of space did not toggle back
    listener.replay_until(0.5)
    state = dev.poll()
    assert state.commands == [Command.SAVE, Command.START, Command.RERECORD, Command.QUIT, Command.DISCARD]
    assert dev.poll().commands == []  # edges are reported once


def test_keyboard_pynput_key_objects_normalise():
    """pynput's own KeyCode (its dummy backend needs no display) goes through the same normalisation."""
    code = (
        "from pynput.keyboard import KeyCode\n"
        "from robots.teleop.keyboard import key_name\n"
        "print([key_name(KeyCode.from_char(c)) for c in 'W \\r'])"
    )
    env = dict(os.environ, PYNPUT_BACKEND="dummy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['w', 'space', 'enter']"


# ====================================================================== keyboard (terminal, real pty)
def test_keyboard_terminal_backend_impulses_decay_on_a_real_pty():
    master, slave = pty.openpty()
    clock = FakeClock(10.0)
    dev = device_class("keyboard")(backend="terminal", hold_s=0.3, fd=slave, clock=clock)
    try:
        dev.connect()
        os.write(master, b"wr \x1b[A\r")  # w, r, space, an arrow (unbound), enter
        state = dev.poll()
        np.testing.assert_allclose(state.motion, [1, 0, 1, 0, 0, 0])
        assert state.gripper == 1.0 and state.commands == [Command.SAVE]
        clock.t = 10.2
        np.testing.assert_allclose(dev.poll().motion, [1, 0, 1, 0, 0, 0])  # still within hold_s
        os.write(master, b"w")  # auto-repeat of a held key renews the impulse
        clock.t = 10.4
        np.testing.assert_allclose(dev.poll().motion, [1, 0, 0, 0, 0, 0])
        clock.t = 10.8
        np.testing.assert_allclose(dev.poll().motion, np.zeros(6))
        os.write(master, b"q")
        assert dev.poll().commands == [Command.QUIT]
    finally:
        dev.disconnect()
        os.close(master)
        os.close(slave)


def test_terminal_decoding():
    assert decode_terminal_keys(b"W\x1b[3~\x7f\n") == (["w", "delete", "backspace", "enter"], b"")
    # Home, PgUp, F1, Shift+Up, F5 and Alt+w are not a lone Esc (which quits and loses the episode)
    assert decode_terminal_keys(b"\x1b[H\x1b[5~\x1bOP\x1b[1;2A\x1b[15~\x1bw") == (["w"], b"")
    assert decode_terminal_keys(b"w\x1b") == (["w"], b"\x1b")  # Esc, or the start of a sequence
    assert decode_terminal_keys(b"\x1b[1;") == ([], b"\x1b[1;")  # cut between two reads


def test_a_terminal_escape_sequence_cut_between_reads_is_one_key_and_esc_waits_a_poll():
    """An arrow split across two polls (over SSH) was Esc + "[A" (quit); a lone Esc counts at the next
    poll, when no sequence followed it."""
    master, slave = pty.openpty()
    dev = device_class("keyboard")(backend="terminal", fd=slave, clock=FakeClock(0.0))
    dev.connect()
    try:
        os.write(master, b"\x1b")
        assert dev.poll().commands == []
        os.write(master, b"[3~")  # Delete, cut after its ESC
        assert dev.poll().commands == [Command.DISCARD]
        os.write(master, b"\x1b")
        assert dev.poll().commands == []
        assert dev.poll().commands == [Command.QUIT]  # nothing followed: the Esc key
        os.write(master, b"\x1b[1")
        dev.poll()
        assert dev.poll().commands == []  # a cut sequence nothing completed: dropped
    finally:
        dev.disconnect()
        os.close(master)
        os.close(slave)


def test_keyboard_without_display_or_terminal_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(DeviceNotFoundError, match="backend='terminal'"):
        device_class("keyboard")(backend="pynput").connect()
    with open(tmp_path / "not_a_tty", "w") as f, pytest.raises(DeviceNotFoundError, match="not a terminal"):
        device_class("keyboard")(backend="terminal", fd=f.fileno()).connect()


# ====================================================================== SpaceMouse
SPACEMOUSE = {"vendor_id": 0x256F, "product_id": 0xC635, "path": b"/dev/hidraw7", "usage_page": 1, "usage": 8}


def _report(rid: int, *values: int) -> bytes:
    return bytes([rid]) + struct.pack(f"<{len(values)}h", *values)


def _spacemouse(reports, devices=(SPACEMOUSE,), **kwargs):
    hid = FakeHid([{"vendor_id": 0x046D, "product_id": 0xC077, "path": b"/dev/hidraw0"}, *devices])  # a mouse
    dev = device_class("spacemouse")(hid_module=hid, **kwargs)
    dev.connect()
    hid.reports.extend(reports)
    return dev, hid


def test_spacemouse_split_reports_scale_deadzone_and_axis_convention():
    # older devices: translation (id 1) and rotation (id 2) in separate 7-byte reports
    dev, hid = _spacemouse([_report(1, 175, -350, 10), _report(2, 0, 700, -175)], deadzone=0.0)
    assert dev.product == "SpaceMouse Compact"
    state = dev.poll()
    # HID (tx right, ty toward user, tz down) -> robot (x fwd, y left, z up): x=-ty, y=-tx, z=-tz, ...
    np.testing.assert_allclose(state.motion, [1.0, -0.5, -10 / 350, -1.0, 0.0, 0.5])
    np.testing.assert_allclose(dev.poll().motion, state.motion)  # no new report: the cap stays deflected

    dev2, _ = _spacemouse([_report(1, 10, -20, 30, 0, 0, 350)], deadzone=0.1)  # inside the deadzone but rz
    np.testing.assert_allclose(dev2.poll().motion, [0, 0, 0, 0, 0, -1.0])


def test_spacemouse_combined_report_and_buttons():
    left_down, released = bytes([3, 1, 0]), bytes([3, 0, 0])
    dev, hid = _spacemouse([_report(1, 0, -175, -350, 0, 0, 0), left_down, released], deadzone=0.0)
    state = dev.poll()
    np.testing.assert_allclose(state.motion, [0.5, 0, 1.0, 0, 0, 0])  # 13-byte report: 6 axes at once
    assert state.gripper == 1.0 and state.commands == []  # left button toggled the gripper closed
    hid.reports.extend([bytes([3, 2, 0]), bytes([3, 3, 0])])  # right down, then left too (right held)
    state = dev.poll()
    assert state.commands == [Command.SAVE]  # right button edge once, not again while held
    assert state.gripper == -1.0  # the new left press toggled it open again


def test_spacemouse_takes_episode_commands_from_its_command_device():
    """The SpaceMouse has SAVE only; START and the rest come from its command device (a keyboard), which
    is connected, polled and disconnected with it (this used to be impossible: no episode could start)."""
    clock = FakeClock()
    keys = FakeKeyListener([(0.0, _KeyCode("b"), True), (0.0, _KeyCode("b"), False)], clock)
    keyboard = device_class("keyboard")(backend="pynput", listener_factory=keys.factory, clock=clock)
    dev, hid = _spacemouse([bytes([3, 2, 0])], command_device=keyboard)
    assert keys.running
    keys.replay_until(0.0)
    assert dev.poll().commands == [Command.SAVE, Command.START]
    assert dev.poll().commands == []
    dev.disconnect()
    assert not keys.running

    keys = FakeKeyListener([], clock)
    keyboard = device_class("keyboard")(backend="pynput", listener_factory=keys.factory, clock=clock)
    with pytest.raises(DeviceNotFoundError, match="no 3Dconnexion device"):
        _spacemouse([], devices=(), command_device=keyboard)
    assert not keys.running  # a SpaceMouse that is not there leaves no keyboard listening


def test_spacemouse_not_found_and_missing_hid(monkeypatch):
    with pytest.raises(DeviceNotFoundError, match="lsusb"):
        _spacemouse([], devices=())
    monkeypatch.setitem(sys.modules, "hid", None)  # `import hid` fails, as without hidapi
    with pytest.raises(DeviceNotFoundError, match="pip install hidapi"):
        device_class("spacemouse")().connect()


def test_spacemouse_real_hidapi_without_device():
    pytest.importorskip("hid")
    with pytest.raises(DeviceNotFoundError, match="udev"):
        device_class("spacemouse")(path=b"/dev/hidraw-absent").connect()


# ====================================================================== gamepad
def _gamepad(batches, **kwargs):
    source = FakeGamepadSource(batches)
    dev = device_class("gamepad")(source=source, **kwargs)
    dev.connect()
    assert source.is_open and dev.pad_name == "Fake Xbox pad"
    return dev


def test_gamepad_sticks_triggers_hat_and_deadzone():
    dev = _gamepad([
        [GamepadEvent("axis", 1, -1.0), GamepadEvent("axis", 0, 0.05), GamepadEvent("axis", 4, 0.55),
         GamepadEvent("axis", 3, -1.0), GamepadEvent("hat", 0, (1, -1))],
        [GamepadEvent("axis", 5, 1.0)],
        [GamepadEvent("axis", 1, 0.0), GamepadEvent("axis", 5, -1.0), GamepadEvent("hat", 0, (0, 0))],
    ], deadzone=0.1)  # fmt: skip
    state = dev.poll()
    # left stick up -> +x; 0.05 in the deadzone -> y 0; right stick down 0.55 -> -z (0.5 after deadzone)
    np.testing.assert_allclose(state.motion, [1.0, 0.0, -0.5, 1.0, -1.0, 1.0])
    assert state.gripper == -1.0  # trigger at rest before any trigger event: open
    assert dev.poll().gripper == 1.0  # right trigger fully pressed: closed
    state = dev.poll()
    np.testing.assert_allclose(state.motion, [0, 0, -0.5, 0, 0, 1.0])  # sticks hold their last value
    assert state.gripper == -1.0


def test_gamepad_buttons_emit_commands_once():
    dev = _gamepad([
        [GamepadEvent("button", 0, 1), GamepadEvent("button", 0, 1), GamepadEvent("button", 2, 1)],
        [GamepadEvent("button", 0, 0), GamepadEvent("button", 7, 1), GamepadEvent("button", 7, 0)],
        [GamepadEvent("button", 1, 1), GamepadEvent("button", 3, 1), GamepadEvent("button", 6, 1)],
    ])  # fmt: skip
    assert dev.poll().commands == [Command.START]  # a repeated down is one press; X is unbound
    assert dev.poll().commands == [Command.SAVE]
    assert dev.poll().commands == [Command.DISCARD, Command.RERECORD, Command.QUIT]
    assert dev.poll().commands == []


def test_a_non_finite_gamepad_reading_is_held_never_turned_into_a_command():
    """A NaN trigger (a glitching driver) was stored, and the binary gripper mapping turned it into -1: a
    gripper held closed opened, and the robot dropped what it held. The axis keeps its last reading, and
    a non-finite gripper maps to NaN, which the safety layer refuses to send."""
    nan = float("nan")
    dev = _gamepad([
        [GamepadEvent("axis", 5, 1.0), GamepadEvent("axis", 1, -1.0)],
        [GamepadEvent("axis", 5, nan), GamepadEvent("axis", 1, nan)],
        [GamepadEvent("axis", 5, float("inf"))],
    ])  # fmt: skip
    first = dev.poll()
    for state in (dev.poll(), dev.poll()):
        assert state.gripper == first.gripper == 1.0  # still closed
        np.testing.assert_array_equal(state.motion, first.motion)
    feature = Feature((7,), "float32", "action", low=(-1.0,) * 7, high=(1.0,) * 7)
    space = ActionSpace(mode="delta", frame="ee")
    for mode in ("binary", "continuous"):
        action = ActionMapper(gripper=mode)(TeleopState(gripper=nan), feature, space)
        assert np.isnan(action[-1]), mode  # never a finite open (-1)


def test_an_infinite_reading_is_never_a_confident_command():
    """A device reading +inf (or -inf) for its gripper was clipped before its check: a confident "close"
    (or "open"), where a NaN is held; an infinite motion axis was a full-deflection step."""
    feature = Feature((7,), "float32", "action", low=(-1.0,) * 6 + (0.0,), high=(1.0,) * 6 + (0.08,))
    space = ActionSpace(mode="delta", frame="ee")
    for mode in ("binary", "continuous"):
        for inf in (float("inf"), -float("inf")):
            state = TeleopState(motion=np.array([inf, 0, 0, 0, 0, 0]), gripper=inf)
            action = ActionMapper(gripper=mode)(state, feature, space)
            assert np.isnan(action[-1]), (mode, inf, action)  # held by the safety layer
            assert np.isnan(action[:6]).sum() == 1 and np.count_nonzero(np.nan_to_num(action[:6])) == 0


def test_device_number_options_must_be_finite():
    """full_scale=nan made a SpaceMouse report NaN motion; hold_s=inf kept one key tap moving forever
    (nan: no key moved); both were accepted by wm-collect and by the devices."""
    from tools._config import UsageError
    from tools.collect import CollectConfig

    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="full_scale must be a finite number > 0"):
            device_class("spacemouse")(full_scale=value)
        with pytest.raises(ValueError, match="hold_s must be a finite number > 0"):
            device_class("keyboard")(hold_s=value)
        with pytest.raises(UsageError, match=r"^device_options.full_scale must be a finite number, got"):
            CollectConfig(
                task="pointmaze", store="x.zarr", teleop="spacemouse", device_options={"full_scale": value}
            )
        with pytest.raises(UsageError, match=r"^device_options.hold_s must be a finite number, got"):
            CollectConfig(
                task="pointmaze", store="x.zarr", teleop="keyboard", device_options={"hold_s": value}
            )
        with pytest.raises(UsageError, match=r"^command_options.hold_s must be a finite number, got"):
            CollectConfig(
                task="pointmaze", store="x.zarr", teleop="spacemouse", command_options={"hold_s": value}
            )


@pytest.mark.parametrize(
    ("teleop", "gains", "said"),
    [
        ("leader_arm", {"translation_gain": 0.1, "gripper": "binary"}, "gains.gripper, gains.trans"),
        ("keyboard", {"joint_scale": [2.0] * 6}, "gains.joint_scale"),
    ],
)
def test_gains_the_device_does_not_use_are_refused(teleop, gains, said):
    """A leader arm at gains.translation_gain=0.1 (to slow the follower) still moved it 1:1: the mapping
    of joints never reads the motion gains, nor that of motion the joint ones; both were accepted."""
    from tools._config import UsageError
    from tools.collect import CollectConfig

    with pytest.raises(UsageError, match=rf"^{re.escape(said)}\w*: teleop={teleop} does not use them \("):
        CollectConfig(task="pointmaze", store="x.zarr", teleop=teleop, gains=gains)


def test_a_device_option_that_is_a_function_is_refused_from_the_command_line():
    """listener_factory=abc reached the device unchecked and was called: a TypeError traceback (in
    wm-deploy after the out folder was made)."""
    from tools._config import UsageError
    from tools.collect import CollectConfig

    for name in ("listener_factory", "clock"):
        with pytest.raises(
            UsageError, match=rf"^device_options.{name} is a function, set in Python only; leave"
        ):
            CollectConfig(task="pointmaze", store="x.zarr", teleop="keyboard", device_options={name: "abc"})
    CollectConfig(
        task="pointmaze", store="x.zarr", teleop="keyboard", device_options={"listener_factory": None}
    )


def test_device_options_of_the_wrong_type_from_python_are_one_line():
    """The CLI converts its values; from Python, deadzone="0.1" or hold_s="0.3" was a TypeError from a
    comparison, and a leader arm's use_degrees="false" was taken as true."""
    cases = [
        ("gamepad", {"deadzone": "0.1"}, "deadzone must be a number in"),
        ("gamepad", {"deadzone": True}, "deadzone must be a number in"),
        ("spacemouse", {"deadzone": "0.1"}, "deadzone must be a number in"),
        ("spacemouse", {"full_scale": "350"}, "full_scale must be a finite number"),
        ("spacemouse", {"stale_s": "1"}, "stale_s must be a finite number"),
        ("keyboard", {"hold_s": "0.3"}, "hold_s must be a finite number"),
        ("leader_arm", {"use_degrees": "false"}, "use_degrees must be true or false, got 'false'"),
        ("leader_arm", {"calibrate": 1}, "calibrate must be true or false"),
    ]
    for name, options, message in cases:
        with pytest.raises(ValueError, match=message):
            device_class(name)(**options)


def test_gamepad_pygame_events_convert(monkeypatch):
    monkeypatch.setenv("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    pygame = pytest.importorskip("pygame")
    events = [
        pygame.event.Event(pygame.JOYAXISMOTION, instance_id=0, axis=1, value=-0.8),
        pygame.event.Event(pygame.JOYBUTTONDOWN, instance_id=0, button=7),
        pygame.event.Event(pygame.JOYBUTTONUP, instance_id=0, button=7),
        pygame.event.Event(pygame.JOYHATMOTION, instance_id=0, hat=0, value=(0, 1)),
        pygame.event.Event(pygame.JOYAXISMOTION, instance_id=1, axis=0, value=0.3),
    ]  # another pad
    assert events_from_pygame(events, 0, pygame) == [
        GamepadEvent("axis", 1, -0.8),
        GamepadEvent("button", 7, 1),
        GamepadEvent("button", 7, 0),
        GamepadEvent("hat", 0, (0, 1)),
    ]


def test_an_unplugged_gamepad_fails_every_poll_instead_of_repeating_its_last_sticks(monkeypatch):
    """pygame's device-removed event was dropped: a pad unplugged with the stick pushed kept reporting
    that push, and the robot kept moving."""
    monkeypatch.setenv("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    pygame = pytest.importorskip("pygame")
    removed = events_from_pygame([pygame.event.Event(pygame.JOYDEVICEREMOVED, instance_id=0)], 0, pygame)
    dev = _gamepad([[GamepadEvent("axis", 1, -1.0)], removed])
    np.testing.assert_allclose(dev.poll().motion, [1, 0, 0, 0, 0, 0])
    for _ in range(2):
        with pytest.raises(DeviceNotFoundError, match="gamepad: Fake Xbox pad was unplugged; check"):
            dev.poll()


def test_gamepad_real_pygame_without_joystick(monkeypatch):
    for var, value in [("PYGAME_HIDE_SUPPORT_PROMPT", "1"), ("SDL_VIDEODRIVER", "dummy"),
                       ("SDL_JOYSTICK_ALLOW_BACKGROUND_EVENTS", "1")]:  # fmt: skip
        monkeypatch.setenv(var, value)  # set here so the device's defaults do not leak past this test
    pytest.importorskip("pygame")
    with pytest.raises(DeviceNotFoundError, match="/dev/input/js"):
        device_class("gamepad")(index=99).connect()


# ====================================================================== leader arm (lerobot SO-101)
MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
RANGE = (1000, 3000)  # raw encoder range of every joint in the calibration


@pytest.fixture
def so101_bus(monkeypatch, tmp_path):
    """Six STS3215 servos behind a fake serial port, and lerobot's calibration file for them."""
    pytest.importorskip("lerobot")
    port_handler = pytest.importorskip("scservo_sdk.port_handler")
    memory = {}
    for i in range(1, 7):
        m = bytearray(256)
        m[0], m[1] = 3, 10  # firmware 3.10
        m[3:5] = (777).to_bytes(2, "little")  # model number of an sts3215
        m[9:11], m[11:13] = RANGE[0].to_bytes(2, "little"), RANGE[1].to_bytes(2, "little")
        m[56:58] = (2000).to_bytes(2, "little")  # Present_Position
        memory[i] = m
    fake = FakeFeetechSerial(memory)
    monkeypatch.setattr(port_handler.serial, "Serial", fake)
    calib = {n: {"id": i, "drive_mode": 0, "homing_offset": 0, "range_min": RANGE[0], "range_max": RANGE[1]}
             for i, n in enumerate(MOTORS, 1)}  # fmt: skip
    (tmp_path / "leader.json").write_text(json.dumps(calib))
    return fake, tmp_path


def test_leader_arm_reads_joints_through_lerobot(so101_bus):
    fake, calib_dir = so101_bus
    clock = FakeClock()
    keys = FakeKeyListener([(0.0, _KeyCode("b"), True), (0.0, _KeyCode("b"), False)], clock)
    keyboard = device_class("keyboard")(backend="pynput", listener_factory=keys.factory, clock=clock)
    arm = device_class("leader_arm")(port="/dev/ttyFAKE", arm_id="leader", calibration_dir=calib_dir,
                                     command_device=keyboard)  # fmt: skip
    assert arm.joint_names == MOTORS
    arm.connect()
    fake.set(1, 56, 2, 2000 + 4095 // 4)  # shoulder_pan a quarter turn past the middle of its range
    fake.set(6, 56, 2, 2500)  # gripper three quarters open
    keys.replay_until(0.0)
    state = arm.poll()
    assert state.joints.shape == (6,) and state.gripper is None
    np.testing.assert_allclose(state.joints, [1023 * 360 / 4095, 0, 0, 0, 0, 75.0], atol=1e-9)
    assert state.commands == [Command.START]  # commands come from the keyboard
    arm.disconnect()
    assert not fake.is_open and not keys.running


def test_leader_arm_writes_calibration_file_to_motors_that_disagree(so101_bus):
    fake, calib_dir = so101_bus
    fake.set(2, 11, 2, 4000)  # Max_Position_Limit of shoulder_lift differs from the file
    arm = device_class("leader_arm")(port="/dev/ttyFAKE", calibration_dir=calib_dir)
    arm.connect()
    assert int.from_bytes(fake.memory[2][11:13], "little") == RANGE[1]
    arm.disconnect()


@pytest.mark.parametrize("damage", ["not-json", "motor-missing", "range-empty"])
def test_a_leader_arm_with_a_damaged_calibration_file_names_it_and_how_to_calibrate(so101_bus, damage):
    """A file that is not JSON gave lerobot's JSONDecodeError traceback; one without the gripper connected
    and failed at the first poll (KeyError 'gripper'); one with range_min == range_max, at the first poll."""
    fake, calib_dir = so101_bus
    path = calib_dir / "leader.json"
    if damage == "not-json":
        path.write_text('{"shoulder_pan": ')
    else:
        calib = json.loads(path.read_text())
        if damage == "motor-missing":
            del calib["gripper"]
        else:
            calib["wrist_flex"]["range_max"] = calib["wrist_flex"]["range_min"]
        path.write_text(json.dumps(calib))
    clock = FakeClock()
    keys = FakeKeyListener([], clock)
    keyboard = device_class("keyboard")(backend="pynput", listener_factory=keys.factory, clock=clock)
    arm = device_class("leader_arm")(port="/dev/ttyFAKE", calibration_dir=calib_dir, command_device=keyboard)
    with pytest.raises(
        RobotError, match=r"leader.json (cannot be read|has no gripper|has range_min >= range_max)"
    ) as e:
        arm.connect()
        arm.poll()
    assert "\n" not in str(e.value) and "lerobot-calibrate --teleop.type=so101_leader" in str(e.value)
    assert not fake.is_open and not keys.running


def test_a_leader_arm_calibrated_again_is_not_offered_its_unusable_file(so101_bus, monkeypatch):
    """With calibrate=True, lerobot's calibrate() offered the file it loaded (ENTER wrote it to the
    motors) though its range was empty. The operator's part is not here: the spy records the offer."""
    from lerobot.teleoperators.so_leader import SOLeader

    fake, calib_dir = so101_bus
    path = calib_dir / "leader.json"
    calib = json.loads(path.read_text())
    calib["wrist_flex"]["range_max"] = calib["wrist_flex"]["range_min"]
    path.write_text(json.dumps(calib))
    offered = []

    def operator_stops(self):
        offered.append(dict(self.calibration))
        raise KeyboardInterrupt

    monkeypatch.setattr(SOLeader, "calibrate", operator_stops)
    arm = device_class("leader_arm")(port="/dev/ttyFAKE", calibration_dir=calib_dir, calibrate=True)
    with pytest.raises(KeyboardInterrupt):
        arm.connect()
    assert offered == [{}] and not fake.is_open


def test_leader_arm_without_arm_says_how_to_find_the_port(tmp_path):
    pytest.importorskip("lerobot")
    pytest.importorskip("scservo_sdk")
    arm = device_class("leader_arm")(port=str(tmp_path / "ttyACM9"), calibration_dir=tmp_path)
    with pytest.raises(DeviceNotFoundError, match="lerobot-find-port"):
        arm.connect()


# ====================================================================== leader arm (lerobot Koch)
@pytest.fixture
def koch_leader(monkeypatch, tmp_path):
    """A Koch leader's six xl330-m077 servos behind a fake serial port (X-series firmware), whose
    position limits (0..4095) disagree with lerobot's calibration file (1024..3072)."""
    pytest.importorskip("lerobot")
    pytest.importorskip("dynamixel_sdk")
    import serial

    fake = real_fakes.koch_arm(position=2048, limits=(0, 4095))
    for motor_id in range(1, 7):
        fake.set(motor_id, 0, 2, 1190)  # model number of an xl330-m077
    monkeypatch.setattr(serial, "Serial", real_fakes.FakeSerialPorts({"/dev/ttyLEADER": fake}))
    (tmp_path / "leader.json").write_text(json.dumps(real_fakes.calibration((1024, 3072), MOTORS)))
    return fake, tmp_path


def test_koch_leader_calibration_file_is_written_before_the_gripper_holds(koch_leader):
    """lerobot's configure() turns the leader gripper's torque on (a spring-back trigger); the file must
    reach the motors before that, with torque off, or the X servos refuse it."""
    fake, calib_dir = koch_leader
    arm = device_class("leader_arm")(
        port="/dev/ttyLEADER", teleop_type="koch_leader", calibration_dir=calib_dir
    )
    arm.connect()
    assert [fake.get(i, 52, 4) for i in range(1, 7)] == [1024] * 6  # Min_Position_Limit from the file
    assert [fake.get(i, 48, 4) for i in range(1, 7)] == [3072] * 6
    assert fake.memory[6][64] == 1 and fake.memory[6][11] == 5  # the gripper: torque on, current-based
    assert arm.poll().joints.shape == (6,)
    arm.disconnect()
    assert not fake.is_open


def test_koch_leader_setup_failure_closes_the_port_and_says_so_in_one_line(koch_leader):
    """A gripper motor whose torque stays on refuses the calibration: one line, port closed, the
    command device disconnected."""
    fake, calib_dir = koch_leader
    fake.memory[6][64] = 1  # left holding by an earlier session
    fake.torque_stuck = (6,)
    clock = FakeClock()
    keys = FakeKeyListener([], clock)
    keyboard = device_class("keyboard")(backend="pynput", listener_factory=keys.factory, clock=clock)
    arm = device_class("leader_arm")(port="/dev/ttyLEADER", teleop_type="koch_leader",
                                     calibration_dir=calib_dir, command_device=keyboard)  # fmt: skip
    with pytest.raises(
        RobotError, match="koch_leader on '/dev/ttyLEADER': setting up its motors failed"
    ) as e:
        arm.connect()
    assert "\n" not in str(e.value) and "lerobot-calibrate --teleop.type=koch_leader" in str(e.value)
    assert not fake.is_open and not keys.running


# ====================================================================== mapping
def test_deadzone_rescales_continuously():
    np.testing.assert_allclose(deadzone(np.array([0.05, -0.1, 0.55, -1.0, 2.0]), 0.1), [0, 0, 0.5, -1, 1])


def test_mapping_planar_absolute_pusht_image_frame():
    feature = Feature((2,), "float32", "action", units="px", low=(0.0, 0.0), high=(512.0, 512.0))
    space = ActionSpace(mode="absolute", frame="planar")
    # image plane: x right, y down; "d" (-y, right) must move +x_img, "w" (+x, forward) must move -y_img
    mapper = ActionMapper(
        translation_gain=10.0, axis_order=(1, 0, 2, 3, 4, 5), axis_sign=(-1, -1, 1, 1, 1, 1)
    )
    state = TeleopState(motion=np.array([1.0, -0.5, 0, 0, 0, 0]))
    np.testing.assert_allclose(
        mapper(state, feature, space, current=np.array([100.0, 200.0])), [105.0, 190.0]
    )
    np.testing.assert_allclose(mapper(state, feature, space, current=np.array([510.0, 5.0])), [512.0, 0.0])
    with pytest.raises(ValueError, match="needs the robot.s present value"):
        mapper(state, feature, space)
    delta = ActionMapper(translation_gain=10.0)(state, feature, ActionSpace(mode="delta", frame="planar"))
    np.testing.assert_allclose(delta, [10.0, 0.0])  # clipped at low=0 for y
    # an absolute yaw was the present yaw plus the step, clipped: stuck at pi, it could not wrap
    pose = Feature((3,), "float32", "action", low=(0.0, 0.0, -np.pi), high=(512.0, 512.0, np.pi))
    with pytest.raises(ValueError, match="^absolute planar actions with rotations are not supported"):
        mapper(state, pose, space, current=np.array([100.0, 200.0, np.pi - 0.05]))


def test_mapping_ee_delta_7d_with_gripper():
    feature = Feature((7,), "float32", "action", low=(-1.0,) * 7, high=(1.0,) * 7)
    space = ActionSpace(mode="delta", frame="ee")
    mapper = ActionMapper(translation_gain=0.5, rotation_gain=0.2)
    state = TeleopState(motion=np.array([1.0, -1.0, 0.5, 0.0, 1.0, -0.5]), gripper=1.0)
    action = mapper(state, feature, space)
    assert action.dtype == np.float32
    np.testing.assert_allclose(action, [0.5, -0.5, 0.25, 0.0, 0.2, -0.1, 1.0], rtol=1e-6)
    open_ = mapper(TeleopState(motion=np.zeros(6), gripper=-0.2), feature, space)
    assert open_[-1] == -1.0  # binary gripper: below 0 is open
    unit = Feature((7,), "float32", "action", low=(-1,) * 6 + (0,), high=(1,) * 6 + (1,))
    half = ActionMapper(gripper="continuous")(TeleopState(gripper=0.0), unit, space)
    assert half[-1] == pytest.approx(0.5)  # [-1, 1] mapped onto the gripper dim's [0, 1]
    big = ActionMapper(translation_gain=5.0)(state, feature, space)
    assert big.max() <= 1.0 and big[0] == 1.0  # clipped to the feature's limits
    with pytest.raises(ValueError, match="rotations"):
        mapper(state, feature, ActionSpace(mode="absolute", frame="ee"), current=np.zeros(7))


def test_mapping_joint_targets_from_leader_arm():
    feature = Feature((6,), "float32", "action", units="deg", low=(-90.0,) * 6, high=(90.0,) * 6)
    space = ActionSpace(mode="absolute", frame="joint")
    state = TeleopState(joints=np.array([10.0, -20.0, 30.0, 0.0, 100.0, 50.0]))
    mapper = ActionMapper(joint_scale=(1, -1, 1, 1, 1, 0.5), joint_offset=(0, 0, 5, 0, 0, -10))
    np.testing.assert_allclose(mapper(state, feature, space), [10.0, 20.0, 35.0, 0.0, 90.0, 15.0])
    delta = mapper(state, feature, ActionSpace(mode="delta", frame="joint"), current=np.full(6, 10.0))
    np.testing.assert_allclose(delta, [0.0, 10.0, 25.0, -10.0, 90.0, 5.0])
    with pytest.raises(ValueError, match="leader arm"):
        mapper(TeleopState(), feature, space)


def test_mapper_config_is_validated():
    with pytest.raises(ValueError, match="permutation"):
        ActionMapper(axis_order=(0, 0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match="gripper"):
        ActionMapper(gripper="sticky")


@pytest.mark.parametrize("name", ["joint_scale", "joint_offset"])
def test_non_finite_joint_conversions_are_refused_not_turned_into_nan_targets(name):
    """joint_scale or joint_offset with a NaN (or inf) was accepted: every leader-arm target became NaN."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^{name} must be finite numbers"):
            ActionMapper(**{name: (1.0, bad, 1.0, 1.0, 1.0, 1.0)})


@pytest.mark.parametrize(
    ("gains", "said"),
    [
        ({"translation_gain": 0.0}, "translation_gain must be a finite number > 0"),
        ({"rotation_gain": -1.0}, "rotation_gain must be a finite number > 0 (reverse an axis with"),
        ({"joint_scale": (1.0, 0.0, 1.0)}, "joint_scale must not be 0"),
    ],
)
def test_gains_that_stop_or_reverse_a_device_are_refused(gains, said):
    """A zero gain made the device do nothing (and a zero joint_scale pinned the follower's joint), both
    silently; a negative one reversed every axis, which is axis_sign's job."""
    with pytest.raises(ValueError, match=re.escape(said)):
        ActionMapper(**gains)


@pytest.mark.parametrize("index", [-1, 0.5, "0"])
def test_a_gamepad_index_that_is_no_joystick_number_is_refused_naming_the_option(index):
    """index=-1 reached SDL, whose error ("Invalid joystick device number") named no option; "0" compared
    a string with the joystick count (a TypeError)."""
    with pytest.raises(ValueError, match="gamepad index must be a joystick number >= 0"):
        device_class("gamepad")(index=index, source=FakeGamepadSource([]))


@pytest.mark.parametrize(
    ("task", "adds_to_present"), [("pointmaze", False), ("arm_push", False), ("pusht", True)]
)
def test_robot_mapper_adds_a_step_only_to_present_positions(task, adds_to_present):
    """Forces (pointmaze) and deltas (arm_push) are the step itself; a position target (PushT's agent)
    is the present position plus the step (this used to fail on pointmaze and arm_push)."""
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from robots.teleop.mapping import robot_mapper

    robot = make_task(task, SimConfig(state_only=True))
    obs = robot.reset(0)
    mapper = robot_mapper(ActionMapper(translation_gain=0.01), robot)
    action = mapper(TeleopState(motion=np.array([1.0, 0, 0, 0, 0, 0])), obs)
    assert action.shape == robot.action_feature.shape and np.isfinite(action).all()
    if adds_to_present:
        proprio = next(k for k, f in robot.observation_features.items() if f.kind == "proprio")
        assert np.allclose(action - obs[proprio], [0.01, 0.0], atol=1e-5)
    else:
        assert np.count_nonzero(action) == 1 and abs(action.max()) > 0
    robot.disconnect()


def test_pusht_is_driven_in_its_image_plane_at_a_usable_speed_unless_the_user_says_otherwise():
    """wm-collect task=pusht with the default gains: forward moved the pusher right in the image and left
    moved it down, 1 px a step (the target led the pusher by 1 px: 4 px/s)."""
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from robots.teleop.mapping import teleop_mapper
    from tools.collect import CollectConfig

    task = make_task("pusht", SimConfig(state_only=True))
    obs = task.reset(0)
    here = obs["proprio"].astype(np.float64)
    mapper = teleop_mapper(task, CollectConfig(task="pusht", store="s.zarr", teleop="keyboard").gains)
    forward, left = np.eye(6)[0], np.eye(6)[1]
    np.testing.assert_allclose(mapper(TeleopState(motion=forward), obs) - here, [0.0, -20.0], atol=1e-3)
    np.testing.assert_allclose(mapper(TeleopState(motion=left), obs) - here, [-20.0, 0.0], atol=1e-3)
    slow = teleop_mapper(
        task,
        CollectConfig(task="pusht", store="s.zarr", teleop="keyboard", gains={"translation_gain": 2.0}).gains,
    )
    np.testing.assert_allclose(slow(TeleopState(motion=forward), obs) - here, [0.0, -2.0], atol=1e-3)
    for _ in range(10):  # the pusher follows: up the image, at some pixels a step
        task.send_action(mapper(TeleopState(motion=forward), obs))
        obs = task.get_observation()
    moved = obs["proprio"] - here
    assert moved[1] < -40 and abs(moved[0]) < 1
    task.disconnect()


def test_a_leader_arm_on_a_joint_delta_robot_commands_the_difference_from_its_present_joints():
    """A leader's absolute joint targets on arm_push in joint_delta mode: a leader held at the follower's
    pose commands no motion (the present joints counted as zeros, so it commanded a full step toward 0)."""
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from robots.teleop.mapping import robot_mapper

    task = make_task("arm_push", SimConfig(state_only=True, options={"action_mode": "joint_delta"}))
    obs = task.reset(0)
    q = obs["proprio"][:3].astype(np.float64)
    mapper = robot_mapper(ActionMapper(), task)
    np.testing.assert_allclose(mapper(TeleopState(joints=q), obs), 0.0, atol=1e-6)
    step = np.array([0.05, -0.02, 0.0])
    np.testing.assert_allclose(mapper(TeleopState(joints=q + step), obs), step, atol=1e-6)
    with pytest.raises(ValueError, match="leader arm"):  # a motion device gives no joint targets
        mapper(TeleopState(motion=np.ones(6)), obs)
    task.disconnect()


def test_a_takeover_device_that_stops_answering_hands_the_robot_back_to_the_controller(monkeypatch):
    """The terminal the operator typed in goes away mid-run (its reads raise EIO, as an unplugged
    SpaceMouse's do): the takeover says so once and leaves the robot to the controller (the error
    escaped the control loop: no report, exit 1)."""
    import robots.teleop.keyboard as keyboard
    from robots.runtime.intervention import Takeover

    def gone(fd: int) -> bytes:
        raise OSError(5, "Input/output error")

    master, slave = pty.openpty()
    dev = device_class("keyboard")(backend="terminal", fd=slave, clock=FakeClock(0.0))
    dev.connect()
    takeover = Takeover(dev, lambda state, obs: np.asarray(state.motion[:2]))
    try:
        os.write(master, b"b")  # START: the operator latches control
        assert takeover({}) is not None and takeover.latched
        monkeypatch.setattr(keyboard, "_read_available", gone)
        with pytest.warns(RuntimeWarning, match="the takeover device keyboard cannot be read"):
            assert takeover({}) is None
        assert takeover({}) is None and not takeover.latched and takeover.failures == 2
    finally:
        dev.disconnect()
        os.close(master)
        os.close(slave)


def test_one_corrupt_packet_from_a_leader_arm_does_not_end_its_takeover(tmp_path, monkeypatch):
    """A latched leader arm (lerobot's SO-101 leader, only the serial port faked): one checksum error on
    its bus dropped the latch, and the controller took the arm from the operator's hand until START was
    pressed again. A glitch holds the last command; reads that keep failing hand back, said once."""
    pytest.importorskip("scservo_sdk")
    import json

    import serial

    from robots.real.fakes import FakeSerialPorts, calibration, so_arm
    from robots.registry import make_robot
    from robots.runtime.intervention import robot_takeover
    from robots.teleop.keyboard import KeyboardDevice
    from robots.teleop.leader_arm import LeaderArmDevice

    limits = (1000, 3000)
    leader, follower = so_arm(limits=limits), so_arm(limits=limits)
    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({"/dev/ttyL": leader, "/dev/ttyF": follower}))
    for name in ("leader", "follower"):
        (tmp_path / f"{name}.json").write_text(json.dumps(calibration(limits)))
    arm = make_robot("so101_follower", port="/dev/ttyF", calibration_dir=str(tmp_path), control_hz=30)
    clock = FakeClock()
    keys = FakeKeyListener([(1, "b", True), (1.5, "b", False)], clock)  # START once: latched
    kb = KeyboardDevice(backend="pynput", listener_factory=keys.factory, clock=clock)
    dev = LeaderArmDevice(port="/dev/ttyL", arm_id="leader", calibration_dir=tmp_path, command_device=kb)
    takeover = robot_takeover(dev, arm, {})
    dev.connect()
    try:
        last, who = np.full(6, 7.0), []
        for poll in range(12):
            keys.replay_until(poll)
            if poll == 5:
                leader.corrupt_reads = 1  # one noisy status packet
            action = takeover({"state": np.zeros(6)}, last)
            who.append("human" if action is not None else "controller")
            if poll == 5:
                np.testing.assert_array_equal(action, last)  # the glitch's tick holds the last command
        assert who == ["controller"] + ["human"] * 11 and takeover.latched
        leader.corrupt_reads = 10**6  # the bus keeps failing: handed back after 3 polls, said once
        with pytest.warns(RuntimeWarning, match="the takeover device .* cannot be read"):
            assert [takeover({"state": np.zeros(6)}, last) is None for _ in range(4)] == [
                False,
                False,
                True,
                True,
            ]
        assert not takeover.latched
    finally:
        leader.corrupt_reads = 0
        dev.disconnect()


def test_a_takeover_keeps_the_gripper_as_the_controller_left_it_until_the_operator_uses_it():
    """The keyboard's gripper toggle starts open and a takeover sent it: an operator nudging the arm
    opened a gripper the controller held closed (and the recording labelled it a correction)."""
    from robots.registry import make_task
    from robots.runtime.intervention import robot_takeover
    from robots.sim.base import SimConfig

    w, space = _KeyCode("w"), _KeyCode(name="space")
    dev, keys = _keyboard([
        (0.1, w, True), (0.3, space, True), (0.35, space, False), (0.4, space, True), (0.45, space, False),
        (0.5, w, False), (0.7, w, True),
    ])  # fmt: skip
    task = make_task("robosuite/Lift", SimConfig(state_only=True))  # 7-d ee delta: (..., gripper)
    takeover = robot_takeover(dev, task, {})
    closed = np.array([0.0] * 6 + [1.0])  # the controller's last command: holding the cube

    def at(t: float, last: np.ndarray = closed) -> np.ndarray | None:
        keys.replay_until(t)
        return takeover({}, last)

    assert at(0.0) is None
    nudge = at(0.2)  # the operator moves forward: the gripper stays closed
    assert nudge is not None and nudge[0] > 0 and nudge[-1] == 1.0 and not takeover.owns_gripper
    assert at(0.32)[-1] == 1.0 and takeover.owns_gripper  # toggled (open -> closed): the operator's now
    assert at(0.42)[-1] == -1.0  # toggled again: open, as the operator asked
    assert at(0.6) is None  # handed back
    assert at(0.8)[-1] == 1.0 and not takeover.owns_gripper  # a new takeover keeps the controller's again
    dev.disconnect()


def test_a_device_glitch_holds_a_robot_whose_actions_are_steps():
    """A failed poll while the operator had the robot returned the last command sent, to hold: on a
    robot taking steps or forces (arm_push, pointmaze) that repeated the last step, and the arm moved on."""
    from robots.registry import make_task
    from robots.runtime.intervention import robot_takeover
    from robots.sim.base import SimConfig

    class Glitching:
        name, polls = "glitching", 0

        def poll(self) -> TeleopState:
            self.polls += 1
            if self.polls == 3:
                raise OSError("corrupt status packet")
            return TeleopState(motion=np.eye(6)[0])

    task = make_task("pointmaze", SimConfig(state_only=True))  # forces
    takeover = robot_takeover(Glitching(), task, {})
    last = takeover({}, None)
    assert last is not None and np.abs(last).max() > 0
    last = takeover({}, last)
    held = takeover({}, last)  # the glitch
    assert held is not None and held.tolist() == [0.0, 0.0]  # still the operator's, holding still
    task.disconnect()


def test_a_trigger_squeezed_slowly_takes_the_gripper():
    """The operator got the gripper only for a reading that moved by more than the deadband between two
    polls: a trigger squeezed over two seconds at 30 Hz (0.03 a tick) never closed the gripper, which
    stayed as the controller left it with the trigger fully pressed."""
    from robots.runtime.intervention import Takeover

    feature = Feature((7,), "float32", "action", low=(-1.0,) * 6 + (0.0,), high=(1.0,) * 6 + (0.08,))
    space = ActionSpace(mode="delta", frame="ee")
    mapper = ActionMapper(gripper="continuous")
    ticks = 60
    batches = [[GamepadEvent("axis", 1, -1.0)]]  # the left stick forward: the operator takes over
    batches += [[GamepadEvent("axis", 5, -1.0 + 2.0 * k / ticks)] for k in range(1, ticks + 1)]
    dev = _gamepad(batches + [[]])
    takeover = Takeover(dev, lambda state, obs: mapper(state, feature, space), gripper="continuous")
    last = np.zeros(7)  # the controller left the gripper open
    for _ in range(len(batches) + 1):
        last = takeover({}, last)
    assert last[-1] == pytest.approx(0.08) and takeover.owns_gripper  # closed, as the trigger says
    dev.disconnect()


@pytest.mark.parametrize("key", ["r", "j"])  # +z, +yaw
def test_moving_an_axis_the_robot_does_not_have_takes_nothing_over(key):
    """Any device axis beyond the deadband took over: a planar robot (PushT, pointmaze) stopped under a
    z press or a twist (a hand resting on a SpaceMouse cap) that reached none of its actions."""
    from robots.registry import make_task
    from robots.runtime.intervention import robot_takeover
    from robots.sim.base import SimConfig

    dev, keys = _keyboard([(0.1, _KeyCode(key), True), (0.3, _KeyCode("w"), True)])
    task = make_task("pointmaze", SimConfig(state_only=True))
    takeover = robot_takeover(dev, task, {})
    keys.replay_until(0.2)
    assert takeover({}, None) is None
    keys.replay_until(0.4)
    action = takeover({}, None)
    assert action is not None and np.abs(action).max() > 0
    dev.disconnect()


def test_device_options_from_a_config_reach_the_device_as_its_own_types():
    """`DeviceSettings.check` converted the options (a layout mapping into a GamepadLayout) and `build`
    threw that away: a gamepad layout given on the command line failed at connect with an AttributeError
    traceback, its buttons stayed text (START and SAVE presses were ignored), and a SpaceMouse path given
    as text never matched hidapi's bytes ("no 3Dconnexion device found" with the unit plugged in)."""
    from robots.registry import make_task
    from robots.sim.base import SimConfig
    from tools._device import DeviceSettings

    task = make_task("pointmaze", SimConfig(state_only=True))
    layout = {"right_trigger": 4, "right_y": 5, "buttons": {"0": "save", "6": "QUIT"}}  # as Hydra gives them
    source = FakeGamepadSource([[GamepadEvent("button", 0, 1), GamepadEvent("button", 6, 1)]])
    settings = DeviceSettings("gamepad", {"source": source, "layout": layout}, None, {}, {})
    settings.check(needs_start=True)
    pad = settings.build(task)
    pad.connect()
    assert pad.poll().commands == [Command.SAVE, Command.QUIT]
    assert pad.layout.right_trigger == 4 and pad.layout.buttons == {0: Command.SAVE, 6: Command.QUIT}
    pad.disconnect()

    hid = FakeHid([SPACEMOUSE])
    options = {"backend": "pynput", "listener_factory": FakeKeyListener([], FakeClock()).factory}
    text_path = {"hid_module": hid, "path": "/dev/hidraw7"}
    settings = DeviceSettings("spacemouse", text_path, "keyboard", options, {})
    settings.check(needs_start=True)
    mouse = settings.build(task)
    mouse.connect()
    assert mouse.product == "SpaceMouse Compact"
    mouse.disconnect()
    bad = DeviceSettings("gamepad", {"layout": {"buttons": {"0": "launch"}}}, None, {}, {})
    with pytest.raises(ValueError, match=r"layout.buttons.0 must be one of start, save, discard"):
        bad.check(needs_start=True)
