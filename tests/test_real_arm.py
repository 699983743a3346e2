"""Real arms through lerobot's own follower classes, with only the devices faked.

The serial ports (`serial.Serial`) answer the Feetech or Dynamixel protocol from in-memory control
tables and `cv2.VideoCapture` returns generated frames (`robots.real.fakes`); lerobot's robot, motor
bus, motor SDK and OpenCV camera code all run. Robots are built through the registry.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from robots.base import ActionError, DeviceError, Robot, RobotError
from robots.registry import make_robot
from robots.teleop.base import DeviceNotFoundError

pytest.importorskip("lerobot")
from robots.real.fakes import FakeCameras, FakeSerialPorts, calibration, koch_arm, so_arm  # noqa: E402

PORT = "/dev/ttyFOLLOWER"
SO_RANGE = (1000, 3000)  # raw encoder range of every joint in the SO arm's calibration
KOCH_RANGE = (1024, 3072)
# control table addresses (lerobot's tables): STS3215 (Feetech) and X series (Dynamixel)
FT_TORQUE, FT_GOAL, FT_PRESENT, FT_MAX = 40, 42, 56, 11
DXL_TORQUE, DXL_GOAL, DXL_PRESENT, DXL_DRIVE_MODE = 64, 116, 132, 10
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


def test_one_failed_write_does_not_leave_the_port_marked_in_use(so_bus):
    """pyserial raising on one write (a glitch of the USB adapter) fails that call only: the motor SDK
    had marked the port in use before writing and never freed it, so every later read failed with
    "Port is in use!" although the line worked again."""
    fake, calib_dir = so_bus
    with so101(calib_dir) as arm:
        fake.write_errors = 1
        with pytest.raises(
            DeviceError, match=rf"^so101_follower: motor bus on '{PORT}': OSError: .*Input/output"
        ):
            arm.get_observation()
        np.testing.assert_allclose(arm.get_observation()["state"][0], deg(2000), atol=1e-4)
        fake.write_errors = 1
        with pytest.raises(DeviceError, match=rf"^so101_follower: motor bus on '{PORT}': OSError: "):
            arm.send_action(np.zeros(6))
        np.testing.assert_allclose(arm.get_observation()["state"][0], deg(2000), atol=1e-4)
        np.testing.assert_allclose(arm.send_action(np.full(6, 10.0)), 10.0, atol=1e-4)


def test_a_device_error_names_the_device_in_one_line_survives_a_pipe_and_leaves_bugs_alone():
    import pickle

    from robots.base import device_errors, failure

    with pytest.raises(DeviceError) as info, device_errors("so101_follower", "camera 'wrist' (0)"):
        raise TimeoutError("OpenCVCamera(0) latest frame is too old:\n 284.7 ms")
    e = info.value
    assert (
        str(e) == "so101_follower: camera 'wrist' (0): TimeoutError: OpenCVCamera(0) latest frame is too old:"
    )
    assert (
        failure(e) == e.detail == "camera 'wrist' (0): TimeoutError: OpenCVCamera(0) latest frame is too old:"
    )
    assert isinstance(e.__cause__, TimeoutError)  # (an interrupt ctypes turned into an error is found)
    back = pickle.loads(pickle.dumps(e))  # (a process worker's error crosses a pipe)
    assert type(back) is DeviceError and str(back) == str(e) and back.detail == e.detail
    assert failure(ValueError("a\nb")) == "ValueError: a"
    for bug in (NotImplementedError("x"), RecursionError("y")):  # a bug keeps its traceback
        with pytest.raises(type(bug)), device_errors("so101_follower", "motor bus on 'p'"):
            raise bug


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


def test_max_relative_target_caps_each_step_and_what_was_sent_is_returned(so_bus):
    fake, calib_dir = so_bus
    with so101(calib_dir, max_relative_target=5) as arm:  # present position: 0 deg everywhere but gripper
        sent = arm.send_action([30.0, -30.0, 2.0, 0.0, 0.0, 50.0])
    np.testing.assert_allclose(sent, [5.0, -5.0, 2.0, 0.0, 0.0, 50.0], atol=1e-4)


@pytest.mark.parametrize("use_degrees", [True, False])
def test_max_relative_target_never_puts_a_goal_outside_the_limits(so_bus, use_degrees):
    """lerobot's cap clamped the goal around its own reading: a joint reading outside its calibrated
    range got a goal outside the limits on the bus (in degrees), and in -100..100 its reading was first
    clamped to the range's end, so a gripper past its end stepped by more than the cap. Now a joint just
    outside its range gets a goal within the limits and within one step, one farther out is refused."""
    fake, calib_dir = so_bus
    with so101(calib_dir, max_relative_target=5, use_degrees=use_degrees) as arm:
        low, high = np.asarray(arm.action_feature.low), np.asarray(arm.action_feature.high)
        fake.set(6, FT_PRESENT, 2, 3040)  # the gripper 2 % past its calibrated end (1000..3000)
        state = arm.get_observation()["state"]
        assert state[5] == pytest.approx(102.0, abs=0.1)
        sent = arm.send_action(np.r_[state[:5], 50.0])
        assert sent[5] == pytest.approx(97.0, abs=0.1) and np.all(sent >= low) and np.all(sent <= high)
        fake.set(1, FT_PRESENT, 2, 100)  # shoulder_pan far below its range
        since = len(fake.written)
        with pytest.raises(ActionError, match=r"shoulder_pan is at -?[0-9.]+, outside its limits .* refused"):
            arm.send_action(np.zeros(6))
        assert [a for _, a, _ in fake.written[since:] if a == FT_GOAL] == []  # nothing sent


@pytest.mark.parametrize("torque_off", [False, True])
def test_disconnect_keeps_torque_on_unless_asked(so_bus, torque_off):
    fake, calib_dir = so_bus
    arm = so101(calib_dir, torque_off_on_disconnect=torque_off)
    arm.connect()
    arm.disconnect()
    assert not fake.is_open and not arm.is_connected
    assert [fake.memory[i][FT_TORQUE] for i in range(1, 7)] == [0 if torque_off else 1] * 6


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # lerobot's camera thread
def test_a_disconnect_that_fails_closes_the_port_and_cameras_and_says_so(so_bus, cameras):
    """The arm is unplugged and torque_off_on_disconnect is set: lerobot's torque-off write raised before it
    closed anything, so the port and the camera stayed open and the arm stayed "connected"."""
    fake, calib_dir = so_bus
    cams = {"wrist": {"index_or_path": 0, "width": 32, "height": 24, "fps": 30, "warmup_s": 0}}
    arm = so101(calib_dir, cameras=cams, torque_off_on_disconnect=True)
    arm.connect()
    fake.unplugged = True
    with pytest.raises(RobotError, match=r"disconnecting failed .*torque may still be on") as e:
        arm.disconnect()
    assert "\n" not in str(e.value)
    assert not arm.is_connected and not fake.is_open and not cameras.opened[0].open


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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # lerobot's camera thread
def test_a_stalled_camera_gives_no_old_frame_as_an_observation(so_bus, cameras):
    """Three frame periods (100 ms at 30 fps) after a camera stops, reading the arm fails; lerobot's own
    bound would still hand out the last frame for half a second."""
    import time

    _, calib_dir = so_bus
    cams = {"wrist": {"index_or_path": 0, "width": 32, "height": 24, "fps": 30}}
    with so101(calib_dir, cameras=cams) as arm:
        assert arm.frame_age_ms("wrist") == 100.0
        arm.get_observation()
        cameras.stall()
        time.sleep(0.25)
        with pytest.raises(
            DeviceError, match=r"^so101_follower: camera 'wrist' \(0\): TimeoutError: .*too old"
        ):
            arm.get_observation()
    with pytest.raises(ValueError, match="max_frame_age_ms"):
        make_robot("so101_follower", max_frame_age_ms=0)


def test_an_observation_says_how_much_older_than_its_read_its_camera_frame_is(so_bus, cameras):
    """lerobot hands out the newest buffered frame, up to a few frame periods old: the arm reports that
    age (`observation_lag_s`), which the runtime takes off the observation's stamp."""
    import time

    _, calib_dir = so_bus
    cams = {"wrist": {"index_or_path": 0, "width": 32, "height": 24, "fps": 5}}  # a frame every 200 ms
    with so101(calib_dir, cameras=cams) as arm:
        camera, lags = arm.lerobot_robot().cameras["wrist"], []
        for _ in range(5):
            t0 = time.perf_counter()
            arm.get_observation()
            t1, stamp = time.perf_counter(), camera.latest_timestamp
            lag = arm.observation_lag_s
            if stamp <= t0:  # no newer frame arrived during the read: the lag is the frame's age then
                assert t0 - stamp - 1e-6 <= lag <= t1 - stamp + 1e-6, (lag, t0 - stamp, t1 - stamp)
            assert 0.0 <= lag <= 0.6
            lags.append(lag)
            time.sleep(0.07)
    assert max(lags) > 0.05, lags  # reads 70 ms apart within a 200 ms frame period


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
    with pytest.raises(ValueError, match=r"^camera name 5 must be text, e.g. wrist"):  # a TypeError later
        make_robot("so101_follower", cameras={5: cam})


@pytest.mark.parametrize(
    "option, value",
    [
        ("warmup_s", float("inf")),  # lerobot's connect() read frames for warmup_s: it never returned
        ("warmup_s", float("nan")),
        ("warmup_s", "1"),
        ("rotation", 45),
        ("fourcc", "MJPEG"),
        ("index_or_path", None),
    ],
)
def test_camera_options_of_the_wrong_type_or_not_finite_are_refused_naming_the_camera(option, value):
    cam = {"index_or_path": 0, "width": 32, "height": 24, "fps": 30, option: value}
    with pytest.raises(ValueError, match=rf"^cameras\.wrist\.{option} must be"):
        make_robot("so101_follower", cameras={"wrist": cam})


@pytest.mark.parametrize(
    "option, value",
    [
        ("control_hz", float("inf")),
        ("max_frame_age_ms", float("inf")),  # a stalled camera's last frame was an observation forever
        ("max_relative_target", float("inf")),
        ("max_relative_target", "5"),
        ("torque_off_on_disconnect", "false"),  # truthy: the arm went limp on disconnect
        ("use_degrees", "false"),
    ],
)
def test_robot_options_of_the_wrong_type_or_not_finite_are_refused_in_one_line(option, value):
    with pytest.raises(ValueError, match=rf"^{option} must be .*got {value!r}$".replace("(", r"\(")):
        make_robot("so101_follower", **{option: value})


# ====================================================================== errors
@pytest.mark.parametrize(
    "content, reason",
    [('{"shoulder_pan": {"id": 1', "Expecting"), ('{"shoulder_pan": {"id": 1}}', "Missing required field")],
    ids=["not-json", "field-missing"],
)
def test_a_damaged_calibration_file_is_named_with_how_to_calibrate_again(so_bus, content, reason):
    fake, calib_dir = so_bus
    (calib_dir / "follower.json").write_text(content)
    with pytest.raises(
        RobotError, match=rf"calibration file .*follower.json cannot be read \(.*{reason}"
    ) as e:
        _ = so101(calib_dir).action_feature
    assert "\n" not in str(e.value) and "lerobot-calibrate --robot.type=so101_follower" in str(e.value)
    assert not fake.written


EXTRA_MOTOR = {"id": 7, "drive_mode": 0, "homing_offset": 0, "range_min": 1, "range_max": 9}


@pytest.mark.parametrize(
    "damage, words",
    [
        ({"gripper": None}, "has no gripper"),
        ({"elbow_flex": {"range_min": SO_RANGE[1], "range_max": SO_RANGE[0]}}, "has range_min >= range_max"),
        ({"elbow_roll": EXTRA_MOTOR}, "has motors this arm does not: elbow_roll"),
        ({"wrist_flex": {"homing_offset": 3000}}, "has Homing_Offset 3000 for wrist_flex, more than its"),
        ({"wrist_flex": {"range_min": -100}}, "has the range -100..3000 for wrist_flex, outside its servo"),
        ({"wrist_flex": {"range_max": 70000}}, "has the range 1000..70000 for wrist_flex, outside its"),
    ],
)
def test_a_calibration_file_the_arm_cannot_hold_is_refused_before_anything_is_written(so_bus, damage, words):
    """A file without the gripper connected and failed at the first read (KeyError 'gripper'); a reversed
    range (range_min > range_max) reversed the joint limits, and clipping sent a goal of 10 degrees to
    the joint's end (-88 degrees). A motor the arm lacks, or a value the servo's register cannot hold,
    turned the torque off (the arm dropped), then failed writing it with a bare KeyError or ValueError."""
    fake, calib_dir = so_bus
    cal = calibration(SO_RANGE)
    for motor, change in damage.items():
        if change is None:
            del cal[motor]
        else:
            cal.setdefault(motor, {}).update(change)
    (calib_dir / "follower.json").write_text(json.dumps(cal))
    for i in range(1, 7):
        fake.memory[i][FT_TORQUE] = 1  # holding, as our last session left it
    arm = so101(calib_dir)
    with pytest.raises(RobotError, match=r"follower.json " + re.escape(words)) as e:
        with arm:
            arm.send_action([0.0, 0.0, 10.0, 0.0, 0.0, 50.0])
    assert "\n" not in str(e.value) and "lerobot-calibrate" in str(e.value)
    assert not arm.is_connected and not fake.written and not fake.is_open


def test_a_lerobot_that_writes_calibration_past_the_recorder_is_one_line_before_anything_is_written(
    so_bus, monkeypatch
):
    """A lerobot whose write_calibration reaches the bus other than through write / sync_write (not
    0.4.4's) raised the wrapper's private exception, printed as a bug's traceback."""
    from lerobot.motors.feetech import FeetechMotorsBus

    def newer_write_calibration(self, calibration_dict, cache=True):
        self._write(31, 2, 1, 0)  # a register written straight to the port

    monkeypatch.setattr(FeetechMotorsBus, "write_calibration", newer_write_calibration)
    fake, calib_dir = so_bus
    arm = so101(calib_dir)
    with pytest.raises(RobotError, match=r"other than through write / sync_write.*lerobot==0\.4\.4") as e:
        with arm:
            arm.send_action([0.0, 0.0, 10.0, 0.0, 0.0, 50.0])
    assert "\n" not in str(e.value)
    assert not arm.is_connected and not fake.written and not fake.is_open


def test_calibrate_true_with_an_unusable_file_runs_a_full_calibration(so_bus, monkeypatch):
    """lerobot's calibrate() first offers the file it loaded (ENTER writes it to the motors): with a
    reversed range that was the file the arm then clipped by. The operator's part of lerobot's
    calibration (moving the arm, pressing ENTER) is not here: the spy records what it was offered."""
    from lerobot.robots.so_follower import SOFollower

    fake, calib_dir = so_bus
    cal = calibration(SO_RANGE)
    cal["elbow_flex"].update(range_min=SO_RANGE[1], range_max=SO_RANGE[0])
    (calib_dir / "follower.json").write_text(json.dumps(cal))
    offered = []

    def operator_stops(self):
        offered.append(dict(self.calibration))
        raise KeyboardInterrupt

    monkeypatch.setattr(SOFollower, "calibrate", operator_stops)
    arm = so101(calib_dir, calibrate=True)
    with pytest.raises(KeyboardInterrupt):
        arm.connect()
    assert offered == [{}] and not arm.is_connected and not fake.is_open


def test_missing_calibration_says_how_to_run_lerobot_calibrate(so_bus):
    fake, calib_dir = so_bus
    (calib_dir / "follower.json").unlink()
    with pytest.raises(RobotError, match="lerobot-calibrate --robot.type=so101_follower") as e:
        so101(calib_dir).connect()
    assert "\n" not in str(e.value) and "--robot.id=follower" in str(e.value)
    assert "+robot_options.calibrate=true" in str(e.value)  # `calibrate=true` alone is no app option
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
        fake.set(1, DXL_PRESENT, 4, -0x2020001)  # bytes FF FF FD FD: a status packet with byte stuffing
        assert arm.lerobot_robot().bus.read("Present_Position", "shoulder_pan", normalize=False) == -0x2020001
    assert not fake.is_open and [fake.memory[i][DXL_TORQUE] for i in range(1, 7)] == [1] * 6


def test_a_goal_clipped_to_a_limit_stays_within_the_calibrated_range(koch_bus):
    """The limits in degrees rounded outward when the clipped goal became float32, and lerobot truncates
    to an integer: a goal at the low limit went to the bus one count below the calibrated range."""
    fake, calib_dir = koch_bus
    with make_robot("koch_follower", port=PORT, calibration_dir=str(calib_dir)) as arm:
        low, high = np.asarray(arm.action_feature.low), np.asarray(arm.action_feature.high)
        for goal in (-500.0, 500.0):
            sent = arm.send_action([goal] * 5 + [50.0])
            assert np.all(sent >= low) and np.all(sent <= high)
            raws = [fake.get(i, DXL_GOAL, 4) for i in range(1, 6)]
            assert all(KOCH_RANGE[0] <= r <= KOCH_RANGE[1] for r in raws), raws


def test_a_koch_servo_left_inverted_takes_the_files_drive_mode_once(koch_bus):
    """lerobot's koch_leader calibration inverts elbow_flex in the servo (Drive_Mode 1); a follower's file
    says 0 and lerobot's write_calibration leaves the register: the elbow moved the other way from the
    file's ranges, and lerobot's check never passed, so every connect turned the torque off to write the
    file again. The file's drive mode is written with its ranges, once."""
    fake, calib_dir = koch_bus
    fake.set(3, DXL_DRIVE_MODE, 1, 1)

    def connect_and_count() -> int:
        since = len(fake.written)
        with make_robot("koch_follower", port=PORT, calibration_dir=str(calib_dir)):
            assert [fake.memory[i][DXL_TORQUE] for i in range(1, 7)] == [1] * 6
        return len([a for _, a, d in fake.written[since:] if a == DXL_TORQUE and d[0] == 0])

    assert connect_and_count() > 0  # the file written (torque off meanwhile)
    assert fake.get(3, DXL_DRIVE_MODE, 1) == 0
    since = len(fake.written)
    assert connect_and_count() == 0 and fake.written[since:] == []  # holding: nothing written


# ====================================================================== wm-collect: leader arm -> follower
LEADER = "/dev/ttyLEADER"


def test_collect_records_a_follower_teleoperated_by_a_leader_arm(monkeypatch, tmp_path, capsys, cameras):
    """Two fake SO-101 buses (leader and follower), a fake camera and a scripted keyboard; the poll
    count is the script's clock: the operator's hand moves the leader and presses keys between polls."""
    pytest.importorskip("scservo_sdk")
    import serial

    import tools.collect
    from robots.teleop.fakes import FakeClock, FakeKeyListener
    from wm.data import DemoStore

    leader, follower = so_arm(position=2000, limits=SO_RANGE), so_arm(position=2000, limits=SO_RANGE)
    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({LEADER: leader, PORT: follower}))
    for arm_id in ("leader", "follower"):
        (tmp_path / f"{arm_id}.json").write_text(json.dumps(calibration(SO_RANGE)))
    script = {2: "b", 6: "enter", 8: "b", 10: "backspace", 12: "b", 15: "enter"}  # poll -> key
    clock = FakeClock()
    keys = FakeKeyListener([(t, k, down) for t, k in script.items() for down in (True, False)], clock)
    polls = []

    def operator(address: int, length: int) -> None:  # before each read of the leader's positions
        if address == FT_PRESENT:
            polls.append(len(polls) + 1)
            leader.set(1, FT_PRESENT, 2, 2000 + 10 * polls[-1])  # shoulder_pan turns a little each poll
            leader.set(6, FT_PRESENT, 2, 2000 + 50 * polls[-1])  # the gripper opens from the follower's 50 %
            keys.replay_until(polls[-1])

    def servos(address: int, length: int) -> None:  # the follower reaches each goal before the next read
        for m in follower.memory.values():
            if address == FT_PRESENT and any(m[FT_GOAL : FT_GOAL + 2]):
                m[FT_PRESENT : FT_PRESENT + 2] = m[FT_GOAL : FT_GOAL + 2]

    leader.before_read, follower.before_read = operator, servos
    monkeypatch.setattr(tools.collect, "_stop_on_signals", lambda: None)  # leave pytest's handlers alone
    import threading

    from wm.data.writer import EpisodeWriter

    writers, add_step = [], EpisodeWriter.add_step  # who writes the steps (a flush held the arm's loop)
    monkeypatch.setattr(
        EpisodeWriter,
        "add_step",
        lambda w, step: writers.append(threading.current_thread().name) or add_step(w, step),
    )
    cam = {"index_or_path": 0, "width": 32, "height": 24, "fps": 30}
    cfg = tools.collect.CollectConfig(
        task="wave",
        store=str(tmp_path / "real.zarr"),
        teleop="leader_arm",
        episodes=2,
        preview="false",
        robot="so101_follower",
        robot_options={"port": PORT, "calibration_dir": str(tmp_path), "cameras": {"wrist": cam}},
        device_options={"port": LEADER, "arm_id": "leader", "calibration_dir": str(tmp_path)},
        command_options={"backend": "pynput", "listener_factory": keys.factory, "clock": clock},
    )
    assert tools.collect.collect(cfg) == 0
    assert "saved 2 episodes (1 discarded, 9 steps)" in capsys.readouterr().out  # the saved episodes' steps
    assert writers and set(writers) == {"wm-recorder"}  # a thread of the recording's own, off the loop
    assert not leader.is_open and not follower.is_open and not keys.running
    assert [follower.memory[i][FT_TORQUE] for i in range(1, 7)] == [1] * 6  # the follower still holds

    store = DemoStore.open(tmp_path / "real.zarr")
    assert store.n_episodes == 2 and store.schema.robot == "so101_follower" and store.schema.task == "wave"
    keys = {"state", "wrist", "action", "timestamp", "loop_dt"}
    assert store.schema.fps == 30 and set(store.schema.keys) == keys
    infos = [store.episode_info(i) for i in range(2)]
    sessions = [info.pop("collect") for info in infos]  # the session's options, the follower's port too
    assert sessions[0] == sessions[1] and sessions[0]["robot_options"]["port"] == "/dev/ttyFOLLOWER"
    assert infos == [{"source": "leader_arm", "length": n} for n in (5, 4)]  # no success signal, no seed
    for i, ticks in enumerate([range(2, 7), range(12, 16)]):  # the polls each saved episode recorded
        ep = store.get_episode(i)
        leader_deg = [[deg(2000 + 10 * k), 0, 0, 0, 0, 50 + 2.5 * k] for k in ticks]
        np.testing.assert_allclose(ep["action"], leader_deg, atol=1e-3)  # the leader's joints, as sent
        # each observation was read at its tick's start: the follower at the goal of the tick before
        follower_deg = [[deg(2000 + 10 * (k - 1)), 0, 0, 0, 0, 50 + 2.5 * (k - 1)] for k in ticks]
        np.testing.assert_allclose(ep["state"], follower_deg, atol=0.1)
        assert np.all(np.diff(ep["timestamp"]) > 0) and np.all(ep["loop_dt"][1:] > 0)
        assert ep["wrist"].shape == (len(ticks), 24, 32, 3) and (ep["wrist"][..., 0] == 200).all()
    store.close()


def test_collect_options_for_a_real_robot_are_checked():
    from tools._config import UsageError
    from tools.collect import CollectConfig

    base = {"task": "wave", "store": "s.zarr", "robot": "so101_follower"}
    with pytest.raises(UsageError, match="scripted experts need a simulated task"):
        CollectConfig(**base)
    with pytest.raises(
        UsageError, match="unknown option robot_options.prot; did you mean robot_options.port"
    ):
        CollectConfig(**base, teleop="leader_arm", robot_options={"prot": "/dev/ttyACM1"})
    with pytest.raises(UsageError, match="a real robot runs in real time"):
        CollectConfig(**base, teleop="leader_arm", realtime="false")
    with pytest.raises(RobotError, match="did you mean so101_follower"):
        CollectConfig(**{**base, "robot": "so101_folower"}, teleop="leader_arm")
    with pytest.raises(UsageError, match="give the device for episode commands as command_device=NAME"):
        CollectConfig(**base, teleop="leader_arm", device_options={"command_device": "keyboard"})
    with pytest.raises(UsageError, match="robot_options apply to a real robot"):
        CollectConfig(task="pointmaze", store="s.zarr", robot_options={"port": "/dev/ttyACM1"})


# ====================================================================== reconnecting keeps torque as found
FT_P_COEFFICIENT, DXL_OPERATING_MODE = 21, 11  # registers lerobot's configure() writes


@pytest.mark.parametrize(
    ("robot", "fixture", "torque", "register", "configured"),
    [
        ("so101_follower", "so_bus", FT_TORQUE, (3, FT_P_COEFFICIENT), 16),  # P gain against shaking
        ("koch_follower", "koch_bus", DXL_TORQUE, (6, DXL_OPERATING_MODE), 5),  # current-based gripper
    ],
    ids=["so101", "koch"],
)
def test_reconnecting_an_arm_left_holding_keeps_it_holding(
    request, robot, fixture, torque, register, configured
):
    """Our disconnect leaves torque on; connecting again must not let the arm drop. lerobot's configure()
    writes with torque off: it is skipped when the motors already hold all it writes, and runs (torque off
    meanwhile, as in lerobot) when a register differs."""
    fake, calib_dir = request.getfixturevalue(fixture)
    motor, address = register

    def arm():
        return make_robot(robot, port=PORT, calibration_dir=str(calib_dir))

    def torque_writes(since: int) -> list[int]:
        return [d[0] for _, a, d in fake.written[since:] if a == torque]

    with arm():
        assert fake.memory[motor][address] == configured
    since = len(fake.written)
    with arm() as again:
        assert fake.written[since:] == []  # nothing written: torque never went off
        assert [fake.memory[i][torque] for i in range(1, 7)] == [1] * 6
        sent = again.send_action(np.zeros(6))
    np.testing.assert_allclose(sent, np.zeros(6), atol=1e-5)
    fake.memory[motor][address] = configured + 1  # someone changed a register lerobot configures
    since = len(fake.written)
    with arm():
        assert fake.memory[motor][address] == configured  # configured again
        assert torque_writes(since)[:6] == [0] * 6 and torque_writes(since)[-6:] == [1] * 6
    assert [fake.memory[i][torque] for i in range(1, 7)] == [1] * 6


def test_one_corrupt_read_while_reconnecting_an_arm_left_holding_keeps_it_holding(so_bus):
    """One status packet with a bad checksum in the calibration check read as "the motors disagree":
    the calibration was written and lerobot's configuration run, torque off for both (the arm dropped).
    The read is tried again; a bus that keeps failing is one line, the arm left as it was."""
    fake, calib_dir = so_bus
    with so101(calib_dir):
        pass  # left holding
    for address in (31, 33):  # Homing_Offset (the calibration check), Operating_Mode (the configured one)
        noisy = []

        def noise(addr: int, length: int, address=address, noisy=noisy) -> None:
            if addr == address and not noisy:
                noisy.append(addr)
                fake.corrupt_reads = 1

        fake.before_read = noise
        since = len(fake.written)
        with so101(calib_dir):
            assert noisy and fake.written[since:] == []  # nothing written: torque never went off
    fake.before_read = lambda addr, length: setattr(fake, "corrupt_reads", 1) if addr == 31 else None
    with pytest.raises(RobotError, match=r"setting up the motors failed .*the arm was left as it was") as e:
        so101(calib_dir).connect()
    assert "\n" not in str(e.value) and not fake.is_open
    assert [fake.memory[i][FT_TORQUE] for i in range(1, 7)] == [1] * 6


def test_an_arm_whose_connect_or_disconnect_failed_on_the_bus_connects_again(so_bus):
    """The motor SDK's "port in use" mark, left by a transfer the failure cut short, failed every later
    connect of that arm object with "did not answer ... check the port" (a new object connected)."""
    fake, calib_dir = so_bus
    arm = so101(calib_dir)
    fake.write_errors = 1  # one glitch of the USB adapter in the handshake
    with pytest.raises(DeviceNotFoundError, match="did not answer"):
        arm.connect()
    arm.connect()  # the same object
    arm = so101(calib_dir, torque_off_on_disconnect=True)
    arm.connect()
    fake.unplugged = True
    with pytest.raises(RobotError, match="disconnecting failed"):
        arm.disconnect()
    fake.unplugged = False  # plugged back in
    arm.connect()
    arm.disconnect()


@pytest.mark.parametrize("robot, fixture", [("so101_follower", "so_bus"), ("koch_follower", "koch_bus")])
def test_a_motor_that_does_not_answer_is_named(request, robot, fixture):
    """lerobot lists the missing ids below its first line, which alone was kept: "did not answer (... motor
    check failed on port ...:)", then advice on the port, permissions and power, which all worked."""
    fake, calib_dir = request.getfixturevalue(fixture)
    del fake.memory[6]  # the gripper's cable is out
    with pytest.raises(DeviceNotFoundError) as e:
        make_robot(robot, port=PORT, calibration_dir=str(calib_dir)).connect()
    assert str(e.value) == (
        f"{robot} on {PORT!r}: motor(s) gripper (id 6) did not answer: check the cable to them and their "
        "ids (`lerobot-setup-motors` sets them)"
    )
    assert not fake.is_open


def test_a_camera_that_fails_leaves_the_arm_holding(so_bus, cameras):
    """The calibration file disagrees with the motors (their torque must go off to write it) and a camera
    does not open: the cameras open before the motors are touched, so the arm still holds, and the one
    line says so."""
    fake, calib_dir = so_bus
    with so101(calib_dir):
        pass  # left holding
    fake.set(2, FT_MAX, 2, 4000)
    since = len(fake.written)
    missing = {"top": {"index_or_path": 7, "width": 32, "height": 24, "fps": 30}}
    with pytest.raises(
        DeviceNotFoundError, match=r"camera 'top' \(7\) did not open .*the arm was left as it was"
    ):
        so101(calib_dir, cameras=missing).connect()
    assert fake.written[since:] == [] and not fake.is_open
    assert [fake.memory[i][FT_TORQUE] for i in range(1, 7)] == [1] * 6


def test_a_bus_that_fails_while_the_motors_are_set_up_says_the_torque_may_be_off(so_bus):
    """The adapter is pulled right after the calibration check found a disagreement: one line says the
    motors' torque may be off (it goes off to write the calibration), and the port is closed."""
    fake, calib_dir = so_bus
    fake.set(2, FT_MAX, 2, 4000)

    def unplug(address: int, length: int) -> None:
        if address == FT_MAX:
            fake.unplugged = True  # the calibration check's last read (the one that disagrees) is answered

    fake.before_read = unplug
    with pytest.raises(RobotError, match=r"setting up the motors failed .*torque may be OFF") as e:
        so101(calib_dir).connect()
    assert "\n" not in str(e.value) and not fake.is_open


def _leader_session(monkeypatch, tmp_path, leader, follower, script, robot="so101_follower", **options):
    """wm-collect's config for `leader` driving `follower` (fake buses on LEADER and PORT, with the same
    calibration file for both), keys from `script` ({leader read number: key}). Returns the config and
    the number of the leader's reads so far (a list: the script's clock)."""
    import serial

    import tools.collect
    from robots.teleop.fakes import FakeClock, FakeKeyListener

    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({LEADER: leader, PORT: follower}))
    monkeypatch.setattr(tools.collect, "_stop_on_signals", lambda: None)  # leave pytest's handlers alone
    motors = KOCH_MOTORS
    limits = KOCH_RANGE if robot == "koch_follower" else SO_RANGE
    for arm_id in ("leader", "follower"):
        (tmp_path / f"{arm_id}.json").write_text(json.dumps(calibration(limits, motors)))
    clock = FakeClock()
    keys = FakeKeyListener([(t, k, down) for t, k in script.items() for down in (True, False)], clock)
    reads = [0]
    present = DXL_PRESENT if robot == "koch_follower" else FT_PRESENT

    def operator(address: int, length: int) -> None:
        if address == present:
            reads[0] += 1
            keys.replay_until(reads[0])

    leader.before_read = operator
    cfg = tools.collect.CollectConfig(
        task="demo",
        store=str(tmp_path / "s.zarr"),
        teleop="leader_arm",
        episodes=options.pop("episodes", 1),
        preview="false",
        robot=robot,
        robot_options={"port": PORT, "calibration_dir": str(tmp_path), **options.pop("robot_options", {})},
        device_options={"port": LEADER, "arm_id": "leader", "calibration_dir": str(tmp_path), **options},
        command_options={"backend": "pynput", "listener_factory": keys.factory, "clock": clock},
    )
    return cfg, reads


def _koch_leader(position: int = 2048):
    fake = koch_arm(position=position, limits=KOCH_RANGE)
    for motor_id in range(1, 7):
        fake.set(motor_id, 0, 2, 1190)  # model number: the Koch leader's xl330-m077 servos
    return fake


def test_leader_units_come_from_its_bus_and_match_the_follower_of_its_kind(tmp_path):
    pytest.importorskip("scservo_sdk")
    pytest.importorskip("dynamixel_sdk")
    from robots.registry import device_class

    leader = device_class("leader_arm")
    assert (
        leader(calibration_dir=tmp_path).units
        == so101(tmp_path).action_feature.units
        == "deg; gripper 0..100"
    )
    assert leader(calibration_dir=tmp_path, use_degrees=False).units == "-100..100; gripper 0..100"
    assert leader(teleop_type="koch_leader", calibration_dir=tmp_path).units == "-100..100; gripper 0..100"
    with pytest.raises(ValueError, match="koch_leader has no use_degrees option") as e:
        _ = leader(teleop_type="koch_leader", calibration_dir=tmp_path, use_degrees=True).joint_names
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("leader_port", ["default", "same", "link"])
def test_collect_refuses_a_leader_on_the_followers_port_before_opening_anything(
    monkeypatch, tmp_path, leader_port
):
    """Both arms' port defaults to /dev/ttyACM0, and Linux opens a tty twice: the leader's calibration and
    configuration went to the follower's motors (limits rewritten, torque off) and the session recorded
    a limp arm. Refused in one line, also through a symlink (/dev/serial/by-id/...)."""
    import dataclasses

    import tools.collect
    from tools._config import UsageError

    leader, follower = so_arm(), so_arm()
    cfg, _ = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b"})
    options = dict(cfg.device_options)
    if leader_port == "default":
        del options["port"]
        cfg = dataclasses.replace(cfg, robot_options={**cfg.robot_options, "port": "/dev/ttyACM0"})
    elif leader_port == "same":
        options["port"] = PORT
    else:
        (tmp_path / "by-id").symlink_to(PORT)
        options["port"] = str(tmp_path / "by-id")
    cfg = dataclasses.replace(cfg, device_options=options)
    with pytest.raises(UsageError, match=r"^teleop=leader_arm and the robot are both on /dev/tty") as e:
        tools.collect.collect(cfg)
    assert "\n" not in str(e.value) and "give each its own port" in str(e.value)
    assert not leader.written and not follower.written and not leader.is_open and not follower.is_open
    assert not (tmp_path / "s.zarr").exists()


def test_collect_refuses_a_leader_in_other_units_before_opening_anything(monkeypatch, tmp_path):
    """A Koch leader reports -100..100 only; the Koch follower takes degrees unless told otherwise: the
    follower would go to the wrong pose. Refused, naming the option to set; with it, the follower
    goes where the leader is."""
    pytest.importorskip("dynamixel_sdk")
    import tools.collect
    from wm.data import DemoStore

    leader, follower = _koch_leader(), koch_arm(position=2048, limits=KOCH_RANGE)
    leader.set(1, DXL_PRESENT, 4, 2560)  # shoulder_pan a quarter of its range past the middle: 50 (%)
    cfg, _ = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b", 6: "enter"},
                             robot="koch_follower", teleop_type="koch_leader")  # fmt: skip
    with pytest.raises(ValueError, match=r"set robot_options\.use_degrees=false") as e:
        tools.collect.collect(cfg)
    assert "\n" not in str(e.value) and "'-100..100; gripper 0..100'" in str(e.value)
    assert not leader.written and not follower.written and not (tmp_path / "s.zarr").exists()

    cfg, _ = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b", 6: "enter"},
                             robot="koch_follower", teleop_type="koch_leader",
                             robot_options={"use_degrees": False})  # fmt: skip
    assert tools.collect.collect(cfg) == 0
    assert follower.get(1, DXL_GOAL, 4) == 2560  # the leader's pose (reached in capped steps)
    action = DemoStore.open(tmp_path / "s.zarr").get_episode(0)["action"]
    assert action[-1, 0] == pytest.approx(50.0, abs=0.1)

    so_leader, so_follower = so_arm(), so_arm()  # an SO leader in degrees, a follower in -100..100
    cfg, _ = _leader_session(monkeypatch, tmp_path, so_leader, so_follower, {1: "b"},
                             robot_options={"use_degrees": False})  # fmt: skip
    with pytest.raises(ValueError, match=r"set device_options\.use_degrees=false"):
        tools.collect.collect(cfg)
    assert not so_leader.is_open and not so_follower.written


def test_collect_caps_the_first_step_from_where_the_follower_is(monkeypatch, tmp_path):
    """The leader held far from the follower: each tick moves the follower at most the safety layer's
    step (a tenth of the joint's range), from its present position on, and the store records what was
    sent."""
    pytest.importorskip("scservo_sdk")
    import tools.collect
    from wm.data import DemoStore

    leader, follower = so_arm(position=2000), so_arm(position=2000)  # the follower at 0 deg everywhere
    leader.set(2, FT_PRESENT, 2, 2910)  # shoulder_lift at +80 deg
    leader.set(3, FT_PRESENT, 2, 1100)  # elbow_flex at -79 deg
    cfg, _ = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b", 8: "enter"})
    assert tools.collect.collect(cfg) == 0
    goals = np.array([[deg(int.from_bytes(d, "little")) for m, a, d in follower.written if a == FT_GOAL]])
    goals = goals.reshape(-1, 6)[:, :5]  # (T, 5) body joints, degrees
    cap = 0.1 * (SO_RANGE[1] - SO_RANGE[0]) * 360 / 4095  # 17.6 deg
    assert goals[0, 1] == pytest.approx(cap, abs=0.1) and goals[0, 2] == pytest.approx(-cap, abs=0.1)
    assert np.abs(np.diff(goals, axis=0)).max() <= cap + 0.1
    assert goals[-1, 1] == pytest.approx(deg(2910), abs=0.1)  # it got there
    action = DemoStore.open(tmp_path / "s.zarr").get_episode(0)["action"]
    np.testing.assert_allclose(action[:, :5], goals, atol=0.1)  # what was sent is what was recorded


@pytest.mark.parametrize("fault", ["corrupt", "oserror"])
@pytest.mark.parametrize("which", ["follower", "leader"])
def test_collect_retries_a_read_that_fails_once(monkeypatch, tmp_path, capsys, which, fault):
    """One corrupt status packet, or one write the USB adapter fails (OSError: the motor SDK had marked
    the port in use and never freed it, so every later read said "Port is in use!"), in the middle of the
    second episode: retried, and both episodes are saved."""
    pytest.importorskip("scservo_sdk")
    import tools.collect
    from wm.data import DemoStore

    leader, follower = so_arm(), so_arm()
    cfg, reads = _leader_session(monkeypatch, tmp_path, leader, follower,
                                 {2: "b", 4: "enter", 6: "b", 12: "enter"}, episodes=2)  # fmt: skip
    operator, glitches = leader.before_read, []
    noisy = leader if which == "leader" else follower

    def glitch(address: int, length: int) -> None:
        operator(address, length)
        if address == FT_PRESENT and reads[0] == 9:
            if fault == "corrupt":
                noisy.corrupt_reads = 1  # the next read of `noisy` is answered with a bad checksum
            else:
                noisy.write_errors = 1  # the next packet written to `noisy` fails
            glitches.append(reads[0])

    leader.before_read = glitch
    assert tools.collect.collect(cfg) == 0
    assert capsys.readouterr().out.startswith("saved 2 episodes")
    assert DemoStore.open(tmp_path / "s.zarr").n_episodes == 2
    assert glitches == [9] and noisy.corrupt_reads == noisy.write_errors == 0  # the fault came, and passed


def test_an_episode_whose_first_step_the_store_refused_is_not_counted_as_saved(monkeypatch, tmp_path, capsys):
    """The recording keeps the steps before one the store refused; with none before it nothing is saved,
    and the session counted the episode as saved (and ended one episode short)."""
    pytest.importorskip("scservo_sdk")
    import tools.collect
    from wm.data import DemoStore
    from wm.data.errors import AppendError
    from wm.data.writer import EpisodeWriter

    script = {2: "b", 5: "enter", 7: "b", 10: "enter", 12: "b", 15: "enter"}
    cfg, _ = _leader_session(monkeypatch, tmp_path, so_arm(), so_arm(), script, episodes=2)
    add_step, calls = EpisodeWriter.add_step, []

    def refuse_the_first(writer: EpisodeWriter, step: dict) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise AppendError("a reading the store refuses")
        add_step(writer, step)

    monkeypatch.setattr(EpisodeWriter, "add_step", refuse_the_first)
    assert tools.collect.collect(cfg) == 0
    out, err = capsys.readouterr()
    assert "the recording stopped at step 0 was refused (AppendError: a reading the store refuses); " in err
    assert "the episode was not saved" in err
    assert out.startswith("saved 2 episodes (1 discarded, ")
    with DemoStore.open(tmp_path / "s.zarr") as store:
        assert store.n_episodes == 2


def test_collect_stops_with_one_line_when_the_follower_stays_unreadable(monkeypatch, tmp_path, capsys):
    """The follower's answers stay corrupt from the middle of the second episode on: after
    max_read_failures ticks without a reading the session stops in one line saying the episode being
    recorded is lost; the first episode is kept, both ports are closed, the follower's torque stays on."""
    pytest.importorskip("scservo_sdk")
    import tools.collect
    from robots.runtime.loop import RuntimeConfig
    from wm.data import DemoStore

    leader, follower = so_arm(), so_arm()
    cfg, reads = _leader_session(monkeypatch, tmp_path, leader, follower,
                                 {2: "b", 4: "enter", 6: "b", 30: "enter"}, episodes=2)  # fmt: skip
    sent_before = []

    def broken(address: int, length: int) -> None:
        if address == FT_PRESENT and reads[0] >= 9:
            follower.corrupt_reads = 1
            sent_before.append(len(follower.written))

    follower.before_read = broken
    assert tools.collect.collect(cfg) == 3
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("stopped: so101_follower (the robot) could not be read on ")
    assert (
        f"on {RuntimeConfig.max_read_failures} ticks in a row (motor bus on '{PORT}': ConnectionError" in out
    )
    assert "the episode being recorded (3 steps) is lost" in out and "saved 1 episodes" in out
    assert DemoStore.open(tmp_path / "s.zarr").n_episodes == 1
    assert len(set(sent_before)) == 1  # nothing was sent while the follower could not be read
    assert not leader.is_open and not follower.is_open
    assert [follower.memory[i][FT_TORQUE] for i in range(1, 7)] == [1] * 6


def test_collect_stops_at_a_goal_the_step_cap_cannot_keep_within_the_limits(monkeypatch, tmp_path, capsys):
    """lerobot's own max_relative_target clamped each goal around the follower's reading; a reading far
    outside the calibration put out-of-limit goals on the bus every tick while the recording held the
    safety layer's command. The cap is ours now: the goal is refused, nothing outside the limits is sent,
    and the session stops in one line."""
    pytest.importorskip("scservo_sdk")
    import tools.collect

    leader, follower = so_arm(), so_arm()
    cfg, reads = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b", 12: "enter"},
                                 robot_options={"max_relative_target": 5.0})  # fmt: skip
    follower_reads = [0]

    def glitch(address: int, length: int) -> None:
        if address == FT_PRESENT:
            follower_reads[0] += 1
            if follower_reads[0] >= 6:  # shoulder_pan reads raw 100, its calibrated range 1000..3000
                follower.set(1, FT_PRESENT, 2, 100)

    follower.before_read = glitch
    assert tools.collect.collect(cfg) == 3
    stopped = capsys.readouterr().out.strip().splitlines()[0]
    assert stopped.startswith("stopped: so101_follower: the command could not be sent (ActionError: ")
    assert (
        "shoulder_pan is at -167.0, outside its limits -87.9..87.9 by more than max_relative_target"
        in stopped
    )
    goals = [int.from_bytes(d, "little") for m, a, d in follower.written if a == FT_GOAL and m == 1]
    assert goals and all(SO_RANGE[0] <= g <= SO_RANGE[1] for g in goals)  # none outside the range
    assert not leader.is_open and not follower.is_open
    assert [follower.memory[i][FT_TORQUE] for i in range(1, 7)] == [1] * 6


def test_a_leader_arm_gain_of_another_length_is_refused_before_either_arm_is_set_up(monkeypatch, tmp_path):
    """gains.joint_scale with 3 values for 6 joints was refused at the first reading, after both arms
    had been configured and the store made, in words that did not name gains."""
    pytest.importorskip("scservo_sdk")
    import tools.collect
    from tools._cli import UsageError

    leader, follower = so_arm(), so_arm()
    cfg, _ = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b", 5: "enter"})
    cfg = tools.collect.CollectConfig(**{**cfg.__dict__, "gains": {"joint_scale": [1.0, 1.0, 1.0]}})
    with pytest.raises(UsageError, match=r"^gains.joint_scale has 3 values for the 6 joints of leader_arm "):
        tools.collect.collect(cfg)
    assert not follower.written and not leader.written and not (tmp_path / "s.zarr").exists()


def test_a_collector_on_a_real_arm_runs_at_its_control_rate_by_default(monkeypatch, tmp_path):
    """Collector's realtime default (False, for scripted experts in simulation) ran a real arm's teleop
    loop as fast as the buses answered (~26x its rate: its per-tick step cap let it move that much
    faster), recording the nominal loop_dt."""
    pytest.importorskip("scservo_sdk")
    import time

    from robots.collect import Collector, open_store, recording_schema
    from robots.registry import device_class
    from robots.teleop.mapping import teleop_mapper
    from wm.data import DemoStore

    leader, follower = so_arm(), so_arm()
    cfg, _ = _leader_session(monkeypatch, tmp_path, leader, follower, {1: "b", 13: "enter"})
    arm = so101(tmp_path, control_hz=30.0)
    keyboard = device_class("keyboard")(**cfg.command_options)
    device = device_class("leader_arm")(**cfg.device_options, command_device=keyboard)
    with arm:
        device.connect()
        try:
            store = open_store(str(tmp_path / "s.zarr"), recording_schema(arm, "demo"))
            start = time.monotonic()
            Collector(arm, store).record_teleop(device, teleop_mapper(arm, {}), episodes=1)
            wall = time.monotonic() - start
            store.close()
        finally:
            device.disconnect()
    steps = len(DemoStore.open(tmp_path / "s.zarr").get_episode(0)["action"])
    assert steps >= 10 and wall >= 0.8 * (steps - 1) / 30.0, (steps, wall)


@pytest.mark.parametrize("pulled", ["follower", "leader"])
def test_collect_stops_with_one_line_when_an_arm_is_unplugged(monkeypatch, tmp_path, capsys, pulled):
    """The follower's adapter pulled between its read and the goal write (the send raised: a traceback,
    exit 1), or the leader's (its torque-off write at disconnect raised over the dead port: exit 1, the
    port left open): one line, exit 3, the first episode kept, both ports closed."""
    pytest.importorskip("scservo_sdk")
    import tools.collect
    from wm.data import DemoStore

    leader, follower = so_arm(), so_arm()
    cfg, reads = _leader_session(monkeypatch, tmp_path, leader, follower,
                                 {2: "b", 4: "enter", 6: "b", 30: "enter"}, episodes=2)  # fmt: skip
    arm = follower if pulled == "follower" else leader
    before = arm.before_read

    def unplug(address: int, length: int) -> None:
        if before is not None:
            before(address, length)
        if address == FT_PRESENT and reads[0] == 9:
            arm.unplugged = True  # the read being answered is the last thing that works

    arm.before_read = unplug
    assert tools.collect.collect(cfg) == 3
    out = capsys.readouterr().out.strip()
    says = {
        "follower": f"so101_follower: the command could not be sent (motor bus on '{PORT}': ",
        "leader": "leader_arm could not be read on ",
    }[pulled]
    if pulled == "leader":
        assert f"ticks in a row (motor bus on '{LEADER}': " in out, out
    assert "\n" not in out and out.startswith(f"stopped: {says}"), out
    assert "is lost" in out and "saved 1 episodes" in out
    assert DemoStore.open(tmp_path / "s.zarr").n_episodes == 1
    assert not leader.is_open and not follower.is_open


def test_a_store_is_not_resumed_in_other_units_at_another_rate_or_from_another_robot(tmp_path):
    """Only shapes and dtypes were compared: degrees and -100..100, 30 Hz and 10 Hz, an SO-100 into an
    SO-101's store were appended silently under the store's units and rate."""
    from robots.collect import open_store, recording_schema
    from wm.data.schema import SchemaError

    (tmp_path / "follower.json").write_text(json.dumps(calibration(SO_RANGE)))
    path = str(tmp_path / "s.zarr")
    arm = make_robot("so101_follower", calibration_dir=str(tmp_path))
    open_store(path, recording_schema(arm, "pick")).close()
    open_store(path, recording_schema(arm, "pick")).close()  # the same session resumes
    for options, what in [
        ({"use_degrees": False}, "action space"),
        ({"control_hz": 10.0}, "fps"),
    ]:
        other = make_robot("so101_follower", calibration_dir=str(tmp_path), **options)
        with pytest.raises(SchemaError, match=f"recorded with {what}"):
            open_store(path, recording_schema(other, "pick"))
    so100 = make_robot("so100_follower", calibration_dir=str(tmp_path))
    with pytest.raises(SchemaError, match="robot 'so101_follower', this session records 'so100"):
        open_store(path, recording_schema(so100, "pick"))
