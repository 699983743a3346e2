"""Real arms through lerobot's own follower classes, with only the devices faked.

The serial ports (`serial.Serial`) answer the Feetech or Dynamixel protocol from in-memory control
tables and `cv2.VideoCapture` returns generated frames (`robots.real.fakes`); lerobot's robot, motor
bus, motor SDK and OpenCV camera code all run. Robots are built through the registry.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from robots.base import ActionError, Robot, RobotError
from robots.registry import make_robot
from robots.teleop.base import DeviceNotFoundError

pytest.importorskip("lerobot")
from robots.real.fakes import FakeCameras, FakeSerialPorts, calibration, koch_arm, so_arm  # noqa: E402

PORT = "/dev/ttyFOLLOWER"
SO_RANGE = (1000, 3000)  # raw encoder range of every joint in the SO arm's calibration
KOCH_RANGE = (1024, 3072)
# control table addresses (lerobot's tables): STS3215 (Feetech) and X series (Dynamixel)
FT_TORQUE, FT_GOAL, FT_PRESENT, FT_MAX = 40, 42, 56, 11
DXL_TORQUE, DXL_GOAL, DXL_PRESENT = 64, 116, 132
KOCH_MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def deg(raw: float, limits=SO_RANGE, resolution: int = 4095) -> float:
    """lerobot's degrees for a raw position: from the middle of the calibrated range."""
    return (raw - (limits[0] + limits[1]) / 2) * 360 / resolution


def raw(fake, motor_id: int, address: int, length: int = 2) -> int:
    return int.from_bytes(fake.memory[motor_id][address : address + length], "little")


@pytest.fixture
def so_bus(monkeypatch, tmp_path):
    """An SO-101 follower's six servos on PORT, and lerobot's calibration file `follower.json`."""
    pytest.importorskip("scservo_sdk")
    import serial

    fake = so_arm(position=2000, limits=SO_RANGE)
    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({PORT: fake}))
    (tmp_path / "follower.json").write_text(json.dumps(calibration(SO_RANGE)))
    return fake, tmp_path


@pytest.fixture
def cameras(monkeypatch):
    cv2 = pytest.importorskip("cv2")
    cams = FakeCameras([0])
    monkeypatch.setattr(cv2, "VideoCapture", cams.capture_class)
    return cams


def so101(calib_dir, **options):
    return make_robot("so101_follower", port=PORT, calibration_dir=str(calib_dir), **options)


# ====================================================================== features
def test_features_before_connect(so_bus, cameras):
    fake, calib_dir = so_bus
    cams = {"wrist": {"index_or_path": 0, "width": 32, "height": 24, "fps": 30}}
    arm = so101(calib_dir, cameras=cams, control_hz=15)
    assert isinstance(arm, Robot) and arm.control_hz == 15
    state, action = arm.observation_features["state"], arm.action_feature
    assert arm.motor_names == KOCH_MOTORS and state.names == action.names == tuple(KOCH_MOTORS)
    assert state.shape == action.shape == (6,) and action.dtype == "float32" and state.kind == "proprio"
    assert action.units == "deg; gripper 0..100" and arm.action_space.frame == "joint"
    half = 1000 * 360 / 4095  # the calibrated range, from its middle, in degrees
    np.testing.assert_allclose(action.low, [-half] * 5 + [0.0])
    np.testing.assert_allclose(action.high, [half] * 5 + [100.0])
    assert arm.observation_features["wrist"].shape == (24, 32, 3)
    assert arm.observation_features["wrist"].dtype == "uint8"
    assert set(arm.schema("t").keys) == {"state", "wrist", "action", "timestamp"}
    assert not fake.is_open and not fake.written and not cameras.opened  # nothing was opened
    assert make_robot("so100_follower", use_degrees=False).action_feature.low[0] == -100.0


# ====================================================================== connect, observe, act
def test_connect_observe_and_send_goal_positions(so_bus):
    fake, calib_dir = so_bus
    with so101(calib_dir) as arm:
        assert all(fake.memory[i][FT_TORQUE] == 1 for i in range(1, 7))  # configured, torque on
        fake.set(1, FT_PRESENT, 2, 2500)
        fake.set(6, FT_PRESENT, 2, 1500)
        first = arm.get_observation()
        assert first["state"].dtype == np.float32 and first["state"].shape == (6,)
        np.testing.assert_allclose(first["state"], [deg(2500), 0, 0, 0, 0, 25.0], atol=1e-4)
        assert first["timestamp"].dtype == np.float64
        assert arm.get_observation()["timestamp"] > first["timestamp"]

        target = np.array([10.0, -20.0, 0.0, 5.0, 0.0, 50.0])
        sent = arm.send_action(target)
        np.testing.assert_allclose(sent, target, atol=1e-5)
        goals = [raw(fake, i, FT_GOAL) for i in range(1, 7)]
        expected = [int(v * 4095 / 360 + 2000) for v in target[:5]] + [2000]  # gripper 50 % of the range
        assert goals == expected


def test_actions_are_clipped_to_the_calibrated_range_and_nan_never_reaches_the_bus(so_bus):
    fake, calib_dir = so_bus
    with so101(calib_dir) as arm:
        sent = arm.send_action([500.0, -500.0, 0.0, 0.0, 0.0, 150.0])
        half = 1000 * 360 / 4095
        np.testing.assert_allclose(sent, [half, -half, 0, 0, 0, 100.0], rtol=1e-6)
        assert raw(fake, 1, FT_GOAL) in (SO_RANGE[1] - 1, SO_RANGE[1])  # int() of the float conversion
        assert raw(fake, 6, FT_GOAL) == SO_RANGE[1]
        n_writes = len(fake.written)
        with pytest.raises(ActionError, match="non-finite"):
            arm.send_action([0.0, np.nan, 0.0, 0.0, 0.0, 0.0])
        with pytest.raises(ActionError, match="shape"):
            arm.send_action([0.0] * 5)
        assert len(fake.written) == n_writes  # nothing was written for the refused actions


def test_max_relative_target_is_lerobots_and_what_it_sent_is_returned(so_bus):
    fake, calib_dir = so_bus
    with so101(calib_dir, max_relative_target=5) as arm:  # present position: 0 deg everywhere but gripper
        sent = arm.send_action([30.0, -30.0, 2.0, 0.0, 0.0, 50.0])
    np.testing.assert_allclose(sent, [5.0, -5.0, 2.0, 0.0, 0.0, 50.0], atol=1e-4)


@pytest.mark.parametrize("torque_off", [False, True])
def test_disconnect_keeps_torque_on_unless_asked(so_bus, torque_off):
    fake, calib_dir = so_bus
    arm = so101(calib_dir, torque_off_on_disconnect=torque_off)
    arm.connect()
    arm.disconnect()
    assert not fake.is_open and not arm.is_connected
    assert [fake.memory[i][FT_TORQUE] for i in range(1, 7)] == [0 if torque_off else 1] * 6


def test_calibration_file_is_written_to_motors_that_disagree(so_bus):
    fake, calib_dir = so_bus
    fake.set(2, FT_MAX, 2, 4000)
    with so101(calib_dir):
        assert raw(fake, 2, FT_MAX) == SO_RANGE[1]


# ====================================================================== cameras
def test_camera_frames_come_through_lerobots_opencv_camera(so_bus, cameras):
    _, calib_dir = so_bus
    cams = {"wrist": {"index_or_path": 0, "width": 32, "height": 24, "fps": 30, "warmup_s": 1}}
    with so101(calib_dir, cameras=cams) as arm:
        image = arm.get_observation()["wrist"]
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert (image[..., 0] == 200).all() and (image[..., 1] == 100).all()  # BGR (k, 100, 200) became RGB
    assert cameras.opened and not cameras.opened[0].open  # released on disconnect


def test_missing_camera_says_how_to_list_them_and_closes_the_port(so_bus, cameras):
    fake, calib_dir = so_bus
    cams = {"top": {"index_or_path": 4, "width": 32, "height": 24, "fps": 30}}
    with pytest.raises(DeviceNotFoundError, match="camera 'top' .*lerobot-find-cameras opencv") as e:
        so101(calib_dir, cameras=cams).connect()
    assert "\n" not in str(e.value) and not fake.is_open


def test_camera_options_are_checked():
    with pytest.raises(ValueError, match="cameras.wrist needs height, fps"):
        make_robot("so101_follower", cameras={"wrist": {"index_or_path": 0, "width": 32}})
    cam = {"index_or_path": 0, "width": 32, "height": 24, "fps": 30}
    with pytest.raises(ValueError, match="did you mean width"):
        make_robot("so101_follower", cameras={"w": {**cam, "widht": 32}})
    with pytest.raises(ValueError, match="reserved"):
        make_robot("so101_follower", cameras={"state": cam})


# ====================================================================== errors
def test_missing_calibration_says_how_to_run_lerobot_calibrate(so_bus):
    fake, calib_dir = so_bus
    (calib_dir / "follower.json").unlink()
    with pytest.raises(RobotError, match="lerobot-calibrate --robot.type=so101_follower") as e:
        so101(calib_dir).connect()
    assert "\n" not in str(e.value) and "--robot.id=follower" in str(e.value)
    assert not fake.written  # refused before touching the arm


def test_port_that_does_not_answer(so_bus, tmp_path, monkeypatch):
    _, calib_dir = so_bus
    with pytest.raises(DeviceNotFoundError, match="lerobot-find-port") as e:
        make_robot("so101_follower", port="/dev/ttyACM9", calibration_dir=str(calib_dir)).connect()
    assert "\n" not in str(e.value) and "'/dev/ttyACM9' did not answer" in str(e.value)
    import serial

    silent = so_arm()
    silent.memory.clear()  # the port opens, but no motor answers
    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({PORT: silent}))
    with pytest.raises(DeviceNotFoundError, match="motors are powered") as e:
        so101(calib_dir).connect()
    assert "\n" not in str(e.value) and not silent.is_open


@pytest.mark.parametrize(
    "robot, module, extra",
    [("so101_follower", "scservo_sdk", "feetech"), ("koch_follower", "dynamixel_sdk", "dynamixel")],
)
def test_missing_motor_sdk_names_the_pip_install(monkeypatch, tmp_path, robot, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import <sdk>` fails, as without the package
    with pytest.raises(DeviceNotFoundError, match=rf"pip install 'lerobot\[{extra}\]'"):
        _ = make_robot(robot, calibration_dir=str(tmp_path)).action_feature


def test_unknown_robot_and_option_names_suggest_the_nearest():
    with pytest.raises(RobotError, match="unknown robot 'so101_folower'; .*did you mean so101_follower"):
        make_robot("so101_folower")
    with pytest.raises(RobotError, match="unknown option 'prot' for robot koch_follower; did you mean port"):
        make_robot("koch_follower", prot="/dev/ttyUSB0")


# ====================================================================== Koch (Dynamixel protocol 2.0)
@pytest.fixture
def koch_bus(monkeypatch, tmp_path):
    pytest.importorskip("dynamixel_sdk")
    import serial

    fake = koch_arm(position=2048, limits=KOCH_RANGE)
    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({PORT: fake}))
    (tmp_path / "follower.json").write_text(json.dumps(calibration(KOCH_RANGE, KOCH_MOTORS)))
    return fake, tmp_path


def test_koch_follower_over_dynamixel_protocol_2(koch_bus):
    fake, calib_dir = koch_bus
    arm = make_robot("koch_follower", port=PORT, calibration_dir=str(calib_dir))
    half = 1024 * 360 / 4095
    np.testing.assert_allclose(arm.action_feature.high, [half] * 5 + [100.0])
    with arm:
        assert [fake.memory[i][DXL_TORQUE] for i in range(1, 7)] == [1] * 6
        assert fake.memory[6][11] == 5  # lerobot's configure: gripper in current-based position mode
        fake.set(3, DXL_PRESENT, 4, 1024)
        np.testing.assert_allclose(
            arm.get_observation()["state"], [0, 0, deg(1024, KOCH_RANGE), 0, 0, 50.0], atol=1e-4
        )
        arm.send_action([45.0, -45.0, 0.0, 0.0, 0.0, 100.0])
        goals = [fake.get(i, DXL_GOAL, 4) for i in range(1, 7)]
        assert goals == [int(45 * 4095 / 360 + 2048), int(-45 * 4095 / 360 + 2048), 2048, 2048, 2048, 3072]
    assert not fake.is_open and [fake.memory[i][DXL_TORQUE] for i in range(1, 7)] == [1] * 6
