"""The real-time runtime driving lerobot's own follower arms, with only the serial port and the camera
faked (`robots.real.fakes`): lerobot's robot, motor bus, motor SDK and OpenCV camera code all run, and
the controller runs in its own spawned process (`tests/runtime_controllers.py`, imported there by name).

What is checked is what reached the bus: every Goal_Position the fake servos received, read back from
their control-table write log, is within the joint limits and within the safety layer's step cap of the
one before (the first of the arm's present position), and equals the command the runtime recorded.
The fake servos reach each goal before the next read of their positions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from runtime_controllers import RAISED  # tests/ is on sys.path here, and in the spawned worker

from robots.registry import make_robot
from robots.runtime.loop import Runtime, RuntimeConfig
from robots.runtime.safety import SafetyConfig
from robots.runtime.ticks import NO_CHUNK, EpisodeOutcome
from robots.runtime.worker import ControllerSpec, ProcessWorker

pytest.importorskip("lerobot")
from robots.real.fakes import FakeCameras, FakeSerialPorts, calibration, koch_arm, so_arm  # noqa: E402

PORT = "/dev/ttyFOLLOWER"
HZ = 30
TICKS = 30
SAFETY = SafetyConfig(hold_after_s=0.2, stop_after_s=0.6)  # max_step: 0.1 of each joint's range
CALM = SafetyConfig()  # runs without a controller fault: a busy machine's stalls do not stop them
CAMERA = {"wrist": {"index_or_path": 0, "width": 32, "height": 24, "fps": 30}}


@dataclass(frozen=True)
class ArmKind:
    """A follower type, its fake bus and the control-table addresses (lerobot's tables) the test reads."""

    robot: str
    sdk: str
    make_fake: Callable[..., object]
    limits: tuple[int, int]  # raw calibrated range of every joint
    torque: int  # Torque_Enable
    goal: tuple[int, int]  # Goal_Position: address, bytes
    present: tuple[int, int]  # Present_Position


SO101 = ArmKind("so101_follower", "scservo_sdk", so_arm, (1000, 3000), 40, (42, 2), (56, 2))
KOCH = ArmKind("koch_follower", "dynamixel_sdk", koch_arm, (1024, 3072), 64, (116, 4), (132, 4))


@dataclass
class Bus:
    """A fake arm on PORT. `reads` counts the reads of the present positions; `at_read[k]` runs just
    before the k-th (1-based): the place to break something in the middle of a run."""

    kind: ArmKind
    fake: object
    calib_dir: object
    reads: int = 0
    at_read: dict[int, Callable[[], None]] = field(default_factory=dict)

    def register(self, motor_id: int, address: int, length: int) -> int:
        data = self.fake.memory[motor_id][address : address + length]
        return int.from_bytes(data, "little", signed=length == 4)

    def before_read(self, address: int, length: int) -> None:
        if address != self.kind.present[0]:
            return
        self.reads += 1
        if self.reads in self.at_read:
            self.at_read[self.reads]()
        (ga, n), (pa, _) = self.kind.goal, self.kind.present
        for m in self.fake.memory.values():  # the servos have reached their goal
            if any(m[ga : ga + n]):
                m[pa : pa + n] = m[ga : ga + n]

    def torque(self) -> list[int]:
        return [self.fake.memory[i][self.kind.torque] for i in range(1, 7)]

    def goals(self, since: int = 0) -> np.ndarray:
        """(n, 6) raw Goal_Position of each sync write after the first `since` writes of the log."""
        address, length = self.kind.goal
        writes = [(i, d) for i, a, d in self.fake.written[since:] if a == address]
        assert [i for i, _ in writes] == [1, 2, 3, 4, 5, 6] * (len(writes) // 6)  # whole sync writes only
        values = [int.from_bytes(d, "little", signed=length == 4) for _, d in writes]
        return np.asarray(values, dtype=np.int64).reshape(-1, 6)

    def units(self, raw: np.ndarray) -> np.ndarray:
        """lerobot's units of raw positions: degrees from the range's middle, the gripper 0..100."""
        lo, hi = self.kind.limits
        out = (np.asarray(raw, float) - (lo + hi) / 2) * 360 / 4095
        out[..., 5] = (np.asarray(raw, float)[..., 5] - lo) / (hi - lo) * 100
        return out

    def tolerance(self) -> np.ndarray:
        """One raw step in lerobot's units (lerobot truncates a goal to an integer)."""
        lo, hi = self.kind.limits
        return np.array([360 / 4095] * 5 + [100 / (hi - lo)]) + 1e-6


@pytest.fixture(params=[SO101], ids=lambda k: k.robot)
def bus(request, monkeypatch, tmp_path) -> Bus:
    return make_bus(request.param, monkeypatch, tmp_path)


def make_bus(kind: ArmKind, monkeypatch, tmp_path) -> Bus:
    """A fake arm of `kind` on PORT (pyserial's Serial patched), its calibration in `tmp_path`."""
    pytest.importorskip(kind.sdk)
    import serial

    fake = kind.make_fake(limits=kind.limits)
    monkeypatch.setattr(serial, "Serial", FakeSerialPorts({PORT: fake}))
    motors = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
    (tmp_path / "follower.json").write_text(json.dumps(calibration(kind.limits, motors)))
    b = Bus(kind, fake, tmp_path)
    fake.before_read = b.before_read
    return b


@pytest.fixture
def cameras(monkeypatch) -> FakeCameras:
    cv2 = pytest.importorskip("cv2")
    cams = FakeCameras([0])
    monkeypatch.setattr(cv2, "VideoCapture", cams.capture_class)
    return cams


@contextlib.contextmanager
def worker(fault: str = "none", after: int = 0) -> Iterator[ProcessWorker]:
    """The faulty controller in its own process, stopped on every exit path."""
    w = ProcessWorker(ControllerSpec("runtime_controllers:make", {"fault": fault, "after": after}))
    w.start()
    try:
        yield w
    finally:
        w.close()


@dataclass
class Run:
    out: EpisodeOutcome
    goals: np.ndarray  # (n, 6) what reached the bus, in lerobot's units
    start: np.ndarray  # (6,) the arm's position before the run, in lerobot's units
    torque_after_run: list[int]
    torque_after_disconnect: list[int]


def run(
    bus: Bus,
    fault: str = "none",
    after: int = 0,
    ticks: int = TICKS,
    safety: SafetyConfig = SAFETY,
    **options,
) -> Run:
    arm = make_robot(bus.kind.robot, port=PORT, calibration_dir=str(bus.calib_dir), control_hz=HZ, **options)
    with worker(fault, after) as w:
        return drive(bus, arm, w, ticks, safety)


def drive(bus: Bus, arm, w, ticks: int, safety: SafetyConfig, **runtime) -> Run:
    """Connect the arm, run one episode of the worker's chunks on it (`runtime`: RuntimeConfig options),
    disconnect: what reached the bus."""
    arm.connect()
    try:
        start = bus.units([bus.register(i, *bus.kind.present) for i in range(1, 7)])
        since = len(bus.fake.written)
        out = Runtime(arm, w, RuntimeConfig(safety=safety, **runtime)).run_episode(ticks)
        goals, torque = bus.goals(since), bus.torque()
        assert len(bus.fake.written) == since + goals.size  # the run wrote goals and nothing else
        # one record, and at most one command, per tick of the schedule (the hold that ends a run on a
        # fault found after a tick's send is the next tick's, never a second command in the same tick)
        nominal = np.array([t.nominal for t in out.ticks])
        assert np.all(np.diff(nominal) > 0), nominal
        # every record's observation was read before its tick began (a hold's too: the newest one)
        assert all(t.captured < t.started for t in out.ticks)
    finally:
        arm.disconnect()
    return Run(out, bus.units(goals), start, torque, bus.torque())


def check_bus(r: Run, bus: Bus) -> None:
    """Every goal that reached the bus is finite, within the limits and within the step cap of the one
    before (the first: of the present position), and is the command the runtime recorded."""
    arm = make_robot(bus.kind.robot, calibration_dir=str(bus.calib_dir))
    low, high = np.asarray(arm.action_feature.low), np.asarray(arm.action_feature.high)
    cap, tol = SAFETY.max_step_fraction * (high - low), bus.tolerance()
    goals = r.goals
    assert len(goals) and np.all(np.isfinite(goals))
    assert np.all(goals >= low - tol) and np.all(goals <= high + tol)
    steps = np.abs(np.diff(np.vstack([r.start, goals]), axis=0))
    assert np.all(steps <= cap + 2 * tol), steps.max(axis=0)
    sent = np.array([t.command for t in r.out.ticks if t.command is not None])
    assert sent.shape == goals.shape
    np.testing.assert_allclose(goals, sent, atol=tol.max())


def fresh_ticks(out: EpisodeOutcome) -> list[int]:
    """Indices of the ticks that sent an action of a chunk (not a held command)."""
    return [i for i, t in enumerate(out.ticks) if t.chunk != NO_CHUNK]


def check_held(r: Run, first_held: int) -> None:
    """From tick `first_held` on nothing new reached the bus: every goal repeats the one before."""
    assert 0 < first_held < len(r.out.ticks)
    assert all(t.chunk == NO_CHUNK for t in r.out.ticks[first_held:])
    n_before = sum(t.command is not None for t in r.out.ticks[:first_held])
    assert len(r.goals) > n_before  # the hold was sent
    np.testing.assert_array_equal(
        r.goals[n_before:], np.broadcast_to(r.goals[n_before - 1], r.goals[n_before:].shape)
    )


# ====================================================================== a good controller
@pytest.mark.parametrize("bus", [SO101, KOCH], ids=["so101", "koch"], indirect=True)
def test_steady_controller_drives_the_arm_within_its_limits(bus):
    r = run(bus, safety=CALM)
    out = r.out
    assert out.stopped is None and len(out.ticks) == TICKS
    assert not out.events["non_finite"] and not out.events["hold"] and not out.events["read_failed"]
    check_bus(r, bus)
    assert len(r.goals) == TICKS and len(np.unique(r.goals[:, 0])) > TICKS // 2  # new values every tick
    np.testing.assert_allclose(r.goals[0], r.start, atol=bus.tolerance().max())  # starts where it is
    assert r.torque_after_run == r.torque_after_disconnect == [1] * 6  # the arm holds its last goal


# ====================================================================== faults of the controller
FAULTS = {  # fault -> (what the one-line message says, the event counted, how often; None: at least once)
    "nan": ("3 bad chunks in a row, the last: chunk 5 holds non-finite actions", "non_finite_chunk", 3),
    "shape": ("3 bad chunks in a row, the last: chunk of shape (8, 5), expected (T, 6)", "bad_chunk", 3),
    "dtype": ("the last: chunk 5 has dtype bool, expected real numbers", "bad_chunk", 3),
    "raise": (f"the last: RuntimeError: {RAISED} (runtime_controllers.py:", "inference_error", 3),
    "hang": ("(stop_after_s = 0.6): the inference worker has not answered chunk 3 for ", "stop", 1),
    "sigkill": ("the inference worker killed by SIGKILL; holding position", "hold", None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failing_controller_holds_position_and_ends_the_run_with_one_line(bus, fault):
    """Three good chunks, then the fault: the arm holds its last goal and the run says why it ended."""
    r = run(bus, fault, after=3, ticks=90)
    out, (says, event, count) = r.out, FAULTS[fault]
    assert out.stopped is not None and "\n" not in out.stopped, out.stopped
    assert says in out.stopped and out.stopped.endswith("; holding position"), out.stopped
    assert (out.events[event] == count) if count is not None else (out.events[event] >= 1)
    assert len(out.ticks) < 90 and len(out.chunks) >= 3  # the good chunks were taken
    fresh = fresh_ticks(out)
    assert fresh and out.ticks[-1].chunk == NO_CHUNK and "hold" in out.ticks[-1].events
    check_bus(r, bus)
    check_held(r, fresh[-1] + 1)
    if fault == "hang":  # the pending actions ran out, then the watchdog held, then stopped
        assert out.underruns > 0 and out.events["hold"] > 1 and out.events["stop"] == 1
    assert r.torque_after_run == r.torque_after_disconnect == [1] * 6


@pytest.mark.parametrize("bus", [KOCH], ids=["koch"], indirect=True)
def test_koch_arm_holds_when_the_controller_sends_nan(bus):
    r = run(bus, "nan", after=3, ticks=90)
    assert "holds non-finite actions" in r.out.stopped and r.out.events["non_finite_chunk"] == 3
    check_bus(r, bus)
    check_held(r, fresh_ticks(r.out)[-1] + 1)
    assert r.torque_after_disconnect == [1] * 6


def test_torque_goes_off_on_disconnect_only_when_asked(bus):
    r = run(bus, "sigkill", after=3, ticks=90, torque_off_on_disconnect=True)
    assert "killed by SIGKILL" in r.out.stopped
    assert r.torque_after_run == [1] * 6 and r.torque_after_disconnect == [0] * 6


def test_the_arms_own_step_cap_is_what_the_run_records_and_what_a_hold_repeats(bus):
    """With the arm's `max_relative_target` on, each goal is capped further than the safety layer did
    (from the present position): the run records the goals that reached the bus, and the hold after a
    fault repeats the last of them, not the controller's target (which the cap would go on stepping to)."""
    clamp = 0.2  # degrees (the gripper: percent); the controller's wiggle asks for steps up to 0.6
    r = run(bus, "nan", after=3, ticks=90, max_relative_target=clamp)
    assert "holds non-finite actions" in r.out.stopped
    check_bus(r, bus)  # what reached the bus is what was recorded
    steps = np.abs(np.diff(np.vstack([r.start, r.goals]), axis=0))
    tol = bus.tolerance()
    assert np.all(steps <= clamp + tol) and np.any(steps >= clamp - tol)  # the arm's cap was at work
    check_held(r, fresh_ticks(r.out)[-1] + 1)


def test_a_step_cap_around_a_bad_reading_ends_the_run_with_nothing_outside_the_limits_sent(bus):
    """lerobot's `max_relative_target` clamped each goal around a position it read inside send_action: a
    reading far outside the joint's range (a glitch) put a goal outside the limits on the bus. The arm's
    own cap refuses a goal it cannot keep both within a step and within the limits: the run stops, in one
    line, with no goal outside the limits sent and the torque on."""
    (_, n), (address, _) = bus.kind.present, bus.kind.present
    copy_goals = bus.before_read

    def glitch(addr: int, length: int) -> None:
        copy_goals(addr, length)
        if addr == address and bus.reads >= 12:  # from the 12th read on, motor 1 reads far outside its range
            bus.fake.memory[1][address : address + n] = (100).to_bytes(n, "little")

    bus.fake.before_read = glitch
    r = run(bus, ticks=30, safety=CALM, max_relative_target=5.0)
    assert "the command could not be sent (ActionError: " in r.out.stopped, r.out.stopped
    assert "shoulder_pan is at " in r.out.stopped and "the command was refused" in r.out.stopped
    low, high = bus.units(np.array([bus.kind.limits[0]] * 6)), bus.units(np.array([bus.kind.limits[1]] * 6))
    outside = (r.goals < low - 1e-6) | (r.goals > high + 1e-6)
    assert len(r.goals) > 0 and not outside.any()
    assert r.torque_after_disconnect == [1] * 6


def test_the_kernels_a_worker_ran_are_asked_after_the_chunk_it_is_still_computing():
    """A run that ends while its worker computes a chunk (the last tick asked for one) reported no
    kernels (None), more often the busier the machine."""
    from robots.runtime.worker import Request

    with worker("slow_once", after=0) as w:
        w.submit(Request(0, [{"state": np.zeros(6, np.float32)}], [], action_shape=(6,)))
        assert w.busy  # chunk 0 takes SLOW_S
        summary = w.kernels()
        assert summary is not None and "mode" in summary and not w.busy


ORPHAN = """
import sys, time
import numpy as np
from robots.runtime.worker import ControllerSpec, ProcessWorker, Request
w = ProcessWorker(ControllerSpec("runtime_controllers:make", {"fault": "hang"}))
w.start()
w.submit(Request(0, [{"state": np.zeros(6, np.float32)}], [], action_shape=(6,)))
print(w.pid, flush=True)
time.sleep(600)
"""


def test_shared_memory_too_small_for_the_observations_is_one_line_before_the_first_chunk(monkeypatch):
    """The buffers' pages were taken only when written: a /dev/shm too small for the history (Docker's
    64 MB, three 720p cameras at a window of 8) killed the control process with SIGBUS mid-episode, the
    arm left without a hold or a disconnect. They are reserved at the first request (here refused)."""
    import errno
    from multiprocessing import shared_memory
    from pathlib import Path

    from robots.runtime.worker import Request, WorkerDied

    reserve = os.posix_fallocate

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    made: list[str] = []  # (not a listing of /dev/shm: other test processes make and free theirs)

    class Recorded(shared_memory.SharedMemory):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self.name)

    request = Request(0, [{"state": np.zeros(6, np.float32)}], [], action_shape=(6,))
    with worker() as w:
        monkeypatch.setattr(os, "posix_fallocate", full)
        monkeypatch.setattr(shared_memory, "SharedMemory", Recorded)
        with pytest.raises(WorkerDied, match=r"^no room in shared memory for the observations the model"):
            w.submit(request)
        assert made and not any((Path("/dev/shm") / name).exists() for name in made)  # none left half made
        assert not w.busy
        monkeypatch.setattr(os, "posix_fallocate", reserve)
        w.submit(request)  # room again: the next episode's first request
        assert w.busy


def test_a_camera_whose_resolution_changes_reaches_the_worker_process_as_it_is():
    """The shared buffers were made once, for the first request's frames: a camera that came back at
    another resolution was a numpy broadcast error on the tick path (and a dtype change was cast
    silently). The buffers are made again for the newest step; while the history still holds frames of
    the old size, they go on the pipe. Every request reaches the controller as it was given."""
    from robots.runtime.worker import Request

    rng = np.random.default_rng(0)
    small, large = (rng.integers(0, 256, (s, s + 2, 3), dtype=np.uint8) for s in (16, 32))
    deep = large.astype(np.uint16) * 2  # the same size, values past uint8's range
    w = ProcessWorker(ControllerSpec("runtime_controllers:make_echo", {"history": 2}))
    w.start()
    try:
        assert w.window == 2
        for seq, frames in enumerate(
            [[small], [small, small], [small, large], [large, large], [large, deep], [deep, small]]
        ):
            steps = [{"cam": f, "unread": np.zeros(3)} for f in frames]
            w.submit(Request(seq, steps, [np.zeros(3)] * (len(frames) - 1), action_shape=(3,)))
            while (reply := w.poll()) is None:
                pass
            assert reply.error is None, reply.error
            want = [[f.shape[0], f.shape[1], int(f.sum(dtype=np.int64))] for f in frames]
            np.testing.assert_array_equal(reply.actions, want)
    finally:
        w.close()


def _dead(pid: int) -> bool:
    """The process `pid` is gone, or a zombie waiting for init to reap it."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("bus", [SO101], ids=["so101"], indirect=True)
def test_the_operators_stop_ends_a_wait_for_a_hung_worker_between_episodes(bus):
    """A worker that stopped answering (here SIGSTOP) while an episode began held the operator's first
    Ctrl-C for startup_timeout_s (300 s): the reset's wait looks at the stop, and nothing is sent."""
    import time

    arm = make_robot(bus.kind.robot, port=PORT, calibration_dir=str(bus.calib_dir), control_hz=HZ)
    with worker() as w:
        os.kill(w._proc.pid, signal.SIGSTOP)
        try:
            arm.connect()
            try:
                since, began = len(bus.fake.written), time.monotonic()
                out = Runtime(arm, w, RuntimeConfig(safety=SAFETY)).run_episode(
                    TICKS, stop_requested=lambda: time.monotonic() > began + 0.3
                )
                waited = time.monotonic() - began
                assert len(bus.fake.written) == since and not out.ticks
            finally:
                arm.disconnect()
        finally:
            os.kill(w._proc.pid, signal.SIGCONT)
    assert out.stopped == "stopped by the operator"
    assert waited < 5, waited


def test_a_worker_dies_with_the_control_process_that_did_not_close_it():
    """The control process killed (SIGKILL, the OOM killer) while its worker computed a chunk: the
    worker only noticed at its next read, so a hung model ran on by itself, holding cores and memory."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    tests = str(Path(__file__).parent)
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": tests},
    )
    try:
        pid = int(parent.stdout.readline())
        time.sleep(0.5)  # the worker is in its (hung) chunk
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not (gone := _dead(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        parent.kill()
    if not gone:
        os.kill(pid, signal.SIGKILL)
    assert gone


def test_a_killed_worker_is_named_as_killed_even_when_its_pipe_breaks_first():
    """The pipe closes a moment before the dead process can be reaped (here 0.2 s, on purpose): polling
    at once must still say how it ended, not "still running"."""
    from robots.runtime.worker import Request, WorkerDied

    with worker("sigkill_late") as w:
        w.submit(Request(0, [{"state": np.zeros(6, np.float32)}], [], action_shape=(6,)))
        with pytest.raises(WorkerDied) as e:
            for _ in range(10**7):  # until the pipe breaks (a deadline: the loop is bounded)
                w.poll()
    assert str(e.value) == "the inference worker killed by SIGKILL"


# ====================================================================== faults of the robot
@pytest.mark.parametrize(
    ("motor", "says"),
    [
        (2, "dimension 1 of the robot's position is 114.3, 26.37 outside its limits [-87.91, 87.91], more "),
        # the gripper's 0..100 reading was clamped by lerobot to 100: the run started, its first goal 20
        # raw steps above the cap from where the gripper was
        (6, "dimension 5 of the robot's position is 115, 15 outside its limits [0, 100], more than one "),
    ],
    ids=["degrees", "range_0_100"],
)
def test_an_arm_resting_beyond_its_calibrated_range_is_not_started(bus, motor, says):
    """A joint further outside its limits than one step of the cap: every command within the limits would
    jump more than the cap (the first goal was capped from the limit, some 26 degrees from the arm)."""
    address, length = bus.kind.present
    bus.fake.memory[motor][address : address + length] = (3300).to_bytes(length, "little")  # of 1000..3000
    r = run(bus, safety=CALM)
    assert says in r.out.stopped and r.out.stopped.endswith(
        "nothing was sent (move it within its range, or recalibrate)"
    )
    assert len(r.goals) == 0 and not r.out.ticks
    assert r.torque_after_run == r.torque_after_disconnect == [1] * 6


def test_a_gripper_resting_just_past_its_range_reads_where_it_is(bus):
    """lerobot's normalised reading clamps a 0..100 joint to its range: a gripper at 105 read 100, and the
    first goal was capped from there. Within one step of its limits it may start, capped from 105."""
    address, length = bus.kind.present
    bus.fake.memory[6][address : address + length] = (3100).to_bytes(length, "little")  # 105 of 0..100
    arm = make_robot(bus.kind.robot, port=PORT, calibration_dir=str(bus.calib_dir), control_hz=HZ)
    arm.connect()
    try:
        state = arm.get_observation()["state"]
    finally:
        arm.disconnect()
    raw = [bus.register(i, *bus.kind.present) for i in range(1, 7)]
    np.testing.assert_allclose(state, bus.units(raw), atol=1e-4)
    assert state[5] == pytest.approx(105.0)
    r = run(bus, safety=CALM)
    assert not r.out.stopped
    check_bus(r, bus)  # every step, the first from 105 included, within the cap


@pytest.mark.parametrize("corrupt", [1, 2], ids=["one_read", "a_whole_tick"])
def test_a_read_that_fails_is_retried_and_the_run_goes_on(bus, corrupt):
    """A corrupt status packet makes lerobot's sync read raise (it does not retry); the runtime tries
    again (read_retries = 2); a tick whose every try failed has no new observation (its command was
    sent before the read, from the pending chunk), and the run continues."""

    def noise() -> None:
        bus.fake.corrupt_reads = corrupt

    bus.at_read[10] = noise
    r = run(bus, safety=CALM)
    out = r.out
    assert out.stopped is None and len(out.ticks) == TICKS and bus.fake.corrupt_reads == 0
    assert bus.reads == 1 + TICKS + 1  # the first observation, one read per tick, and one more try
    assert not out.events["hold"] and len(fresh_ticks(out)) == TICKS  # no tick went without an action
    assert out.events["read_failed"] == (0 if corrupt == 1 else 1)  # retried within the tick, or not
    check_bus(r, bus)
    assert len(np.unique(r.goals[-5:, 0])) > 1  # new goals after the failure


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # lerobot's camera thread
@pytest.mark.parametrize("device", ["bus", "camera"])
def test_a_robot_that_cannot_be_read_ends_the_run_and_holds(bus, cameras, device):
    """The bus answers every read with a corrupt packet, or the camera stops delivering frames (too old,
    or lerobot's reader thread gives up and its read raises): five ticks in a row without an
    observation end the run, holding position."""
    bus.at_read[10] = (
        cameras.stall if device == "camera" else lambda: setattr(bus.fake, "corrupt_reads", 10**9)
    )
    r = run(bus, cameras=CAMERA, ticks=90, safety=CALM)
    out = r.out
    cause = (
        f"(motor bus on '{PORT}': ConnectionError: Failed to sync read 'Present_Position'"
        if device == "bus"
        else "(camera 'wrist' (0): "
    )
    assert out.stopped.startswith("so101_follower: observation could not be read on 5 tick(s) in a row (")
    assert cause in out.stopped and out.stopped.endswith("; holding position") and "\n" not in out.stopped
    assert out.events["read_failed"] == 5 and out.events["hold"] == 1 and len(out.ticks) < 90
    check_bus(r, bus)
    check_held(r, fresh_ticks(out)[-1] + 1)
    assert r.torque_after_run == r.torque_after_disconnect == [1] * 6


def test_a_bus_that_stops_taking_commands_ends_the_run_with_one_line(bus):
    """The USB adapter is pulled mid-run: the write raises; the runtime sends nothing more and says so."""
    bus.at_read[10] = lambda: setattr(bus.fake, "unplugged", True)
    arm = make_robot(bus.kind.robot, port=PORT, calibration_dir=str(bus.calib_dir), control_hz=HZ)
    with worker() as w:
        arm.connect()
        try:
            out = Runtime(arm, w, RuntimeConfig(safety=CALM)).run_episode(60)
        finally:
            bus.fake.unplugged = False  # plugged back in, so that disconnect() can talk to it
            arm.disconnect()
    assert out.events["send_failed"] == 1 and len(out.ticks) < 60
    assert out.stopped.startswith(
        f"so101_follower: the command could not be sent (motor bus on '{PORT}': OSError"
    )
    assert "\n" not in out.stopped and bus.torque() == [1] * 6
    # the tick whose send failed is one of the run's ticks (its lateness in the figures), sending nothing
    last = out.ticks[-1]
    assert last.command is None and last.chunk == -1 and "send_failed" in last.events
    assert out.underruns <= len(out.ticks)


# ====================================================================== wm-deploy
@pytest.mark.parametrize("clamp", [None, 2.0], ids=["safety_cap", "and_lerobots_clamp"])
def test_wm_deploy_on_an_so101_records_what_reached_the_bus(bus, cameras, tmp_path, capsys, clamp):
    """`wm-deploy robot=so101_follower controller=random record=STORE` in-process (the fakes are
    in-process): random targets anywhere in the limits are step-capped from the arm's position (and
    clamped further by lerobot's `max_relative_target` when it is on), and the store holds exactly the
    goals the servos received."""
    from robots.runtime.report import RECORD_KEYS
    from robots.runtime.safety import EVENTS
    from tools.deploy import DeployConfig, deploy
    from wm.data import DemoStore

    since = len(bus.fake.written)
    cfg = DeployConfig(
        controller="random",
        out=str(tmp_path / "run"),
        robot="so101_follower",
        robot_options={
            "port": PORT,
            "calibration_dir": str(bus.calib_dir),
            "cameras": CAMERA,
            "max_relative_target": clamp,
        },
        max_steps=TICKS,
        control_hz=HZ,
        record=str(tmp_path / "rec.zarr"),
        runtime=RuntimeConfig(safety=CALM),
        inference_threads=1,
    )
    report, status = deploy(cfg)
    assert status == 0 and "episode 0: 30 ticks" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    assert saved["episodes"] == 1 and saved["ticks"] == TICKS and saved["stopped"] == []
    assert saved["safety_events"]["step_capped"] > 0 and saved["success_rate"] is None
    assert saved["settings"]["robot"] == "so101_follower" and saved["settings"]["control_hz"] == HZ
    assert bus.torque() == [1] * 6 and not bus.fake.is_open  # disconnected, still holding

    store = DemoStore.open(tmp_path / "rec.zarr")
    assert store.n_episodes == 1 and store.schema.robot == "so101_follower" and store.schema.fps == HZ
    assert set(store.schema.keys) == {"state", "wrist", "action", "timestamp", *RECORD_KEYS}
    assert store.episode_info(0)["stopped"] is None
    ep = store.get_episode(0)
    store.close()
    sent = ep["sent"].astype(bool)
    goals = bus.units(bus.goals(since))
    assert len(ep["action"]) == TICKS and sent.all() and len(goals) == TICKS  # held ticks send too
    np.testing.assert_allclose(ep["action"][sent], goals, atol=bus.tolerance().max())
    np.testing.assert_allclose(ep["state"][1:], ep["action"][:-1], atol=bus.tolerance().max())  # reached
    start = bus.units(np.full(6, 2000))  # so_arm's servos start at raw 2000
    check_bus(Run(EpisodeOutcome(_ticks(ep)), goals, start, [], []), bus)
    if clamp is not None:  # lerobot's clamp, from the position reached, was at work
        steps = np.abs(np.diff(np.vstack([start, goals]), axis=0))
        assert np.all(steps <= clamp + bus.tolerance()) and np.any(steps >= clamp - bus.tolerance())
    capped = ep["safety"] & (1 << EVENTS.index("step_capped")) > 0
    assert capped.sum() == saved["safety_events"]["step_capped"]
    fresh = ep["chunk"] >= 0  # -1: a held command
    assert fresh[0] and np.all(np.diff(ep["chunk"][fresh]) >= 0)
    assert np.all(np.isfinite(ep["action_due"][fresh])) and np.all(np.isnan(ep["action_due"][~fresh]))
    assert np.all(np.diff(ep["action_sent_time"]) > 0) and np.all(ep["action_sent_time"] >= ep["timestamp"])
    assert ep["wrist"].shape == (TICKS, 24, 32, 3)


def _ticks(ep: dict[str, np.ndarray]) -> list:
    """The recorded ticks as far as `check_bus` reads them (the command sent, or None)."""
    from robots.runtime.ticks import TickRecord

    return [
        TickRecord(0.0, 0.0, 0.0, 0.0, a if s else None, int(c), 0, 0.0)
        for a, s, c in zip(ep["action"], ep["sent"], ep["chunk"], strict=True)
    ]


# ====================================================================== wm-deploy: a leader arm takes over
LEADER = "/dev/ttyLEADER"


def leader_arm(bus: Bus):
    """A leader SO-101 on LEADER beside the follower, with its calibration file `leader.json`."""
    import serial

    leader = so_arm(position=2000, limits=SO101.limits)
    serial.Serial.ports[LEADER] = leader  # `make_bus` patched serial.Serial with its FakeSerialPorts
    (bus.calib_dir / "leader.json").write_text(json.dumps(calibration(SO101.limits)))
    return leader


def takeover_config(bus: Bus, tmp_path, command_options: dict, **device_options):
    from tools.deploy import DeployConfig

    return DeployConfig(
        controller="random",
        out=str(tmp_path / "run"),
        robot="so101_follower",
        robot_options={"port": PORT, "calibration_dir": str(bus.calib_dir)},
        max_steps=TICKS,
        control_hz=HZ,
        record=str(tmp_path / "rec.zarr"),
        runtime=RuntimeConfig(safety=CALM),
        inference_threads=1,
        teleop="leader_arm",
        device_options={
            "port": LEADER,
            "arm_id": "leader",
            "calibration_dir": str(bus.calib_dir),
            **device_options,
        },
        command_options=command_options,
    )


def test_wm_deploy_a_leader_arm_takes_over_from_start_to_start(bus, tmp_path, capsys):
    """`wm-deploy ... teleop=leader_arm`: a leader arm has no buttons, so START comes from the command
    device (the keyboard, as in wm-collect; here scripted by the count of the leader's reads, one per
    tick). From START to START again the leader's joints are sent, through the safety layer, and recorded
    as interventions; then the controller has the arm again."""
    from robots.teleop.fakes import FakeClock, FakeKeyListener
    from tools.deploy import deploy
    from wm.data import DemoStore

    leader = leader_arm(bus)
    clock = FakeClock()
    keys = FakeKeyListener([(t, "b", down) for t in (5, 15) for down in (True, False)], clock)
    polls: list[int] = []

    def operator(address: int, length: int) -> None:  # before each read of the leader's positions
        if address == SO101.present[0]:
            polls.append(len(polls) + 1)
            leader.set(1, SO101.present[0], 2, 2000 + 30 * polls[-1])  # shoulder_pan turns each poll
            keys.replay_until(polls[-1])

    leader.before_read = operator
    options = {"backend": "pynput", "listener_factory": keys.factory, "clock": clock}
    report, status = deploy(takeover_config(bus, tmp_path, options))
    # (read after each tick's send for the next one, and once before the first tick)
    assert status == 0 and report["stopped"] == [] and len(polls) == TICKS + 1
    assert not leader.is_open and not keys.running and not bus.fake.is_open  # all closed
    assert bus.torque() == [1] * 6
    with DemoStore.open(tmp_path / "rec.zarr") as store:
        ep = store.get_episode(0)
    took = ep["intervention"].astype(bool)
    assert took.tolist() == [False] * 4 + [True] * 10 + [False] * (TICKS - 14)  # polls 5 to 14
    assert np.all(ep["chunk"][took] == NO_CHUNK)
    arm = make_robot(SO101.robot, calibration_dir=str(bus.calib_dir))
    low, high = np.asarray(arm.action_feature.low), np.asarray(arm.action_feature.high)
    cap = CALM.max_step_fraction * (high - low)
    for i in np.flatnonzero(took):  # the leader's joints, step-capped from the command before
        joints = np.array([(30 * (i + 1)) * 360 / 4095, 0, 0, 0, 0, 50.0])
        expected = np.clip(joints, ep["action"][i - 1] - cap, ep["action"][i - 1] + cap)
        np.testing.assert_allclose(ep["action"][i], expected, atol=1e-3)


def test_wm_deploy_refuses_a_command_device_given_as_a_device_option(bus, tmp_path):
    """`device_options.command_device=keyboard` (a name where the leader arm takes a device) is one line
    naming `command_device=`, before anything is opened."""
    from tools._config import UsageError

    leader = leader_arm(bus)
    with pytest.raises(UsageError, match=r"device_options.command_device: .* as command_device=NAME") as e:
        takeover_config(bus, tmp_path, {}, command_device="keyboard")
    assert "\n" not in str(e.value) and not leader.is_open and not bus.fake.is_open


@pytest.mark.parametrize("failing", ["keyboard", "leader"])
def test_a_takeover_device_that_fails_to_connect_leaves_nothing_open(bus, tmp_path, failing):
    """The leader's command device (connected first) or the leader itself fails: one line says which, and
    neither is left open (the follower is `wm-deploy`'s to disconnect)."""
    import os

    from robots.teleop.base import DeviceNotFoundError
    from robots.teleop.fakes import FakeClock, FakeKeyListener
    from tools.deploy import make_takeover

    leader = leader_arm(bus)
    keys = FakeKeyListener([], FakeClock())
    if failing == "keyboard":  # the terminal backend on a pipe: not a terminal
        read_end, write_end = os.pipe()
        options = {"backend": "terminal", "fd": read_end}
        says = f"keyboard: file descriptor {read_end} is not a terminal"
    else:  # the leader is not plugged in
        import serial

        del serial.Serial.ports[LEADER]
        options = {"backend": "pynput", "listener_factory": keys.factory, "clock": keys.clock}
        says = f"leader arm so101_leader on {LEADER!r} did not answer"
    cfg = takeover_config(bus, tmp_path, options)
    follower = make_robot(SO101.robot, port=PORT, calibration_dir=str(bus.calib_dir))
    follower.connect()
    try:
        with pytest.raises(DeviceNotFoundError) as e:
            make_takeover(cfg, follower)
    finally:
        follower.disconnect()
        if failing == "keyboard":
            os.close(read_end)
            os.close(write_end)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not leader.is_open and not keys.running
    if failing == "leader":
        assert keys.on_press is not None  # the keyboard was connected, then disconnected
