"""The robot's side of a policy server: `RemoteWorker`, an inference worker on another machine.

It offers what `ProcessWorker` offers the control loop (start, info, reset, submit, poll, busy,
alive, close), so the runtime's timestamps, stale dropping, stitching, safety layer, watchdog,
recording and report are unchanged. Nothing here blocks a tick: `submit` queues a message on a
ZeroMQ socket (its I/O thread sends it) and `poll` reads what has arrived, answers nothing, and
drives the connection:
- every request has a deadline (`request_timeout_s`; the first of a new session's, `connect_timeout_s`:
  a controller's first call may choose its kernels or compile, and the robot is at rest or holding):
  past it, the chunk is given up (an error reply to the runtime), the socket is closed (so a late
  reply can never arrive, let alone be executed) and the client reconnects;
- when idle, waiting for an episode's reset (which may queue behind a long chunk), for a new
  session's controller to be built or for a session's first chunk (its long deadline: a server that
  restarted meanwhile was noticed only then), it pings every `heartbeat_s`; a ping unanswered for
  `dead_after_s` means the server is gone, and a server that no longer builds ours restarted: it
  reconnects;
- reconnecting is a new handshake that resumes the session (the server's controller and its state
  are kept; also when ZeroMQ renewed the connection under us) or, when the server restarted, opens
  a new one and resets its controller with the episode's goal; meanwhile the worker is `busy`, so
  the runtime holds and its watchdog applies. An episode's reset counts only once the server
  confirms it: asked again after a reconnect, and after a moment when the session's model is busy;
- refusals that retrying cannot fix (wrong token, another protocol version, the server busy with
  another robot, a controller that cannot be built) end it: `alive()` turns False with the reason.
Round trips waited for (pings at the start and between episodes) give the server's clock offset and
the network delay (`wire.ClockSync`); every request carries its deadline on the server's clock, so a
request that waited too long in the server's queue is not computed.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from robots.runtime import wire
from robots.runtime.worker import Reply, Request, ResetStopped, WorkerDied, model_inputs

PERMANENT = ("auth", "busy", "build", "version")
SPEC_KEYS = ("window", "image_keys", "image_size", "proprio_key", "proprio_dim", "action_dim")
BUSY_RETRY_S = 1.0  # a busy server is asked again this often while a session of a crashed robot may end
HANDSHAKE_FAILURES = 3  # ZeroMQ handshakes failed in a row: the server's token is not ours (or it has none)
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


ZMTP_SIGNATURE = (0xFF, 0x7F)  # first and tenth byte of the greeting every ZeroMQ peer sends on connect
PROBE_TIMEOUT_S = 1.0


def zmtp_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a ZeroMQ peer listens at host:port: it sends its greeting's signature as soon as a TCP
    connection is accepted. A forwarder whose far end is down (ssh -L) accepts and closes, or says
    nothing; then the handshakes it closed were not a server refusing our token."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            data, end = b"", time.monotonic() + timeout
            while len(data) < 10 and (left := end - time.monotonic()) > 0:
                conn.settimeout(left)
                chunk = conn.recv(10 - len(data))
                if not chunk:
                    break
                data += chunk
    except OSError:  # refused, reset, timed out
        return False
    return len(data) == 10 and (data[0], data[9]) == ZMTP_SIGNATURE


@dataclass(frozen=True)
class RemoteConfig:
    """address: HOST:PORT of `wm-serve`; token: its shared secret (None: none); request_timeout_s: a
    chunk not back in this long is given up and the connection renewed; connect_timeout_s: the most
    `start` waits for the server (it may be loading a model), and a new session's first chunk (the
    model's first call: kernel choices, compiling) for its reply; heartbeat_s / dead_after_s: pings
    when idle, and how long a silent server is trusted; max_frame_mb: the largest reply accepted."""

    address: str
    token: str | None = field(default=None, repr=False)
    request_timeout_s: float = 2.0
    connect_timeout_s: float = 120.0
    heartbeat_s: float = 0.5
    dead_after_s: float = 2.0
    max_frame_mb: float = 16.0

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        if not wire.is_host(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"server must be HOST:PORT (a name, an IPv4 address or [an IPv6 one], no scheme), got "
                f"{self.address!r}"
            )
        for name in ("request_timeout_s", "connect_timeout_s", "heartbeat_s", "dead_after_s", "max_frame_mb"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # inf: a deadline that never comes
                raise ValueError(f"{name} must be a positive finite number, got {value}")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def endpoint(self) -> str:
        host, port = self.host_port
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class RemoteWorker:
    """The inference worker of `wm-deploy server=HOST:PORT`; see the module docstring. `low` / `high`:
    the robot's action bounds (the server builds the controller for them)."""

    def __init__(self, cfg: RemoteConfig, low: Any, high: Any) -> None:
        self.cfg = cfg
        self.low, self.high = [float(x) for x in low], [float(x) for x in high]
        self.info: dict[str, Any] = {}
        self.clock = wire.ClockSync()
        # reconnects: connections renewed after a session was opened (waiting for a server that is not
        # up yet is not one); late_replies: replies to requests given up (timed out, or outstanding at an
        # episode's end)
        self.stats: dict[str, Any] = {"reconnects": 0, "timeouts": 0, "late_replies": 0, "resumed": 0}
        self.stats["last_reconnect"] = None  # why the last reconnect happened
        # per chunk: request to the moment it was taken in (the next poll), server queue, inference (s)
        self.timings: list[tuple[float, float, float]] = []
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # ZeroMQ's handshake events, until one succeeds
        self._plain = False  # a token, but the server takes none: connect without encryption
        self._handshake_failures = 0  # ZeroMQ handshakes failed on this socket
        self._failed_modes: set[bool] = set()  # encrypted (False) / plain (True) tried in vain
        self._accepted = False  # a ZeroMQ handshake with the server succeeded once
        self._closed_handshakes = 0  # handshakes the server closed since then
        self._nobody_behind = False  # handshakes were closed by something that is not a ZeroMQ peer
        self._spec: dict[str, Any] | None = None  # the model spec of the first session (`check_robot`'s)
        self._state = "down"  # down | hello | auth | reset | ready | failed
        self._since = time.monotonic()  # when the current state began
        self._failed: str | None = None
        self._sid: bytes | None = None
        # this worker's own id, in every hello: a connection ZeroMQ renewed while the server built our
        # controller finds the session (before `ready` gives the session's secret, which resumes it)
        self._client = secrets.token_bytes(16)
        self._sid_since = 0.0  # when `ready` gave the session: pings sent before it asked about none
        self._secret: bytes | None = None
        self._nonce = b""
        self._goal: dict[str, np.ndarray] | None = None
        self._outstanding: tuple[int, float, float] | None = None  # seq, sent, deadline
        self._replies: list[Reply] = []
        self._last_sent = time.monotonic()
        self._ping_at: float | None = None  # an unanswered ping: when it was sent
        self._down_since: float | None = None
        self._exact = False  # replies are being waited for (their arrival time is known)
        self._pong = False
        self._reset_due = False  # an episode's reset asked for and not yet confirmed by the server
        self._reset_retry: float | None = None  # when to ask again (the server's model was busy)
        self._reset_error: str | None = None  # the server's controller could not start the episode
        self._cold = False  # the next request is a new session's first (`connect_timeout_s` to answer)
        self._connect_at = 0.0  # no new connection before then (the server was busy: asked again later)
        self._busy: str | None = None  # the server's last "busy" refusal, while it is waited out
        self._busy_until: float | None = None  # when to stop waiting for a busy server's slot

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect and open a session (waits up to `connect_timeout_s`); `info` is then the model's."""
        self._wait_ready(self.cfg.connect_timeout_s, f"no policy server answered at {self.cfg.address}")
        self._sync()

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[None]:
        """For slow work of the caller's between `start` and the first `reset` (a real robot connecting,
        its calibration prompt, a takeover device): a thread drives the connection meanwhile, so pings keep
        the session (the server closes one silent for its session_timeout_s, and another robot may take
        the slot) and a server that restarts is reconnected to. The caller does not use the worker inside
        (a ZeroMQ socket is one thread's at a time); an error of the thread's is raised on leaving."""
        done, failed = threading.Event(), []

        def drive() -> None:
            try:
                self._block(lambda: done.is_set() or self._state == "failed", math.inf)
            except BaseException as e:  # (handed to the caller's thread)
                failed.append(e)

        thread = threading.Thread(target=drive, name="wm-remote-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        if failed:
            raise failed[0]

    def _wait_ready(self, timeout: float, what: str, stop: Callable[[], bool] | None = None) -> None:
        """Block until the session is ready (`WorkerDied` when it failed, or after `timeout`); `stop()`
        true (the operator's Ctrl-C) ends the wait at once: `ResetStopped`."""
        stopped = stop or (lambda: False)
        ready = self._block(lambda: self._state in ("ready", "failed") or stopped(), timeout)
        if self._state == "failed":
            raise WorkerDied(self._failed or "the policy server refused the session")
        if self._state != "ready" and stopped():  # (waiting for a server to come back held the first
            raise ResetStopped  # Ctrl-C for connect_timeout_s)
        if not ready:  # (not answering: its duration is the timeout's, said once)
            why = self._down_detail() if self._busy is None else f" ({self.waiting_for()})"
            raise WorkerDied(f"{what} within {timeout:g} s{why}")

    def _sync(self, n: int = 8) -> None:
        """`n` pings while nothing else happens, each waited for: round trips timed exactly, for the
        clock offset and the network delay (during an episode a reply is only seen at the next tick)."""
        for _ in range(n):
            self._pong = False
            if self._state != "ready" or not self._send(
                wire.encode("ping", {"sid": self._sid, "sent": time.monotonic()})
            ):
                return
            self._block(lambda: self._pong or self._state != "ready", 1.0)

    def _block(self, done: Callable[[], bool], timeout: float) -> bool:
        """Drive the connection until `done()` (True) or `timeout` seconds (False), taking every reply in
        as it arrives, so that its round trip is timed exactly (`_sample`). Only between episodes or for
        a caller with nothing else to do: it blocks."""
        end = time.monotonic() + timeout
        self._exact = True
        try:
            while True:
                self._advance()
                if done():
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                if self._sock is not None:
                    poller = zmq.Poller()
                    for sock in (self._sock, self._monitor):
                        if sock is not None:
                            poller.register(sock, zmq.POLLIN)
                    poller.poll(max(1, int(min(left, 0.02) * 1000)))
                else:
                    time.sleep(0.001)
        finally:
            self._exact = False

    @property
    def busy(self) -> bool:
        return self._state != "ready" or self._outstanding is not None

    def alive(self) -> bool:
        return self._state != "failed"

    def exit_description(self) -> str:
        return f"(policy server {self.cfg.address}) {self._failed}" if self._failed else "still running"

    def _down_detail(self) -> str:
        """What is known of a server that does not answer: "; ..." or nothing."""
        if self._closed_handshakes:
            return (
                f"; it closed {self._closed_handshakes} handshake(s): down behind a forwarder, or its token "
                "changed"
            )
        if self._nobody_behind:
            return (
                "; something accepts connections there but no ZeroMQ server answers behind it: a forwarder "
                "such as ssh -L whose server is not up?"
            )
        return ""

    def waiting_for(self) -> str:
        """What the worker is waiting on, for the watchdog's message."""
        if self._state == "failed":
            return f"the policy server refused: {self._failed}"
        if self._busy is not None and self._state != "ready":
            left = max(0.0, (self._busy_until or 0.0) - time.monotonic())
            return f"the policy server is busy, asked again for {left:.0f} s more: {self._busy}"
        if self._state != "ready":
            since = time.monotonic() - (self._down_since or self._since)
            return (
                f"the policy server at {self.cfg.address} is not answering (reconnecting for {since:.1f} s"
                f"{self._down_detail()})"
            )
        if self._outstanding is not None:
            waited = time.monotonic() - self._outstanding[1]
            return f"the policy server has not answered chunk {self._outstanding[0]} for {waited:.2f} s"
        return "no request outstanding"

    def kernels(self) -> dict[str, Any] | None:
        """None: the server's process chose its kernels, and its log says which (at each session's end)."""
        return None

    def close(self) -> None:
        if self._sock is not None and self._sid is not None and self._state == "ready":
            try:
                self._sock.send_multipart(wire.encode("bye", {"sid": self._sid}), zmq.NOBLOCK)
                time.sleep(0.01)  # let ZeroMQ's thread put it on the wire before the socket goes
            except zmq.ZMQError:
                pass
        self._close_socket()
        self._ctx.term()

    # ------------------------------------------------------------------ episodes and chunks
    def reset(self, goal: Mapping[str, np.ndarray] | None, stop: Callable[[], bool] | None = None) -> None:
        """A new episode (between episodes: waits for the server, up to connect_timeout_s): any
        outstanding chunk is given up, the session's controller is reset and told `goal`. `stop()` true
        ends the wait at once (`ResetStopped`)."""
        self._goal = None if goal is None else dict(model_inputs(self.info, goal))
        self._outstanding = None
        self._wait_ready(
            self.cfg.connect_timeout_s, f"the policy server at {self.cfg.address} did not come back", stop
        )
        self._reset_due, self._reset_error = True, None
        self._send_reset()
        self._wait_ready(
            self.cfg.connect_timeout_s, "the policy server did not confirm the new episode", stop
        )
        if self._reset_error is not None:
            raise RuntimeError(f"the controller could not start the episode: {self._reset_error}")
        self._replies.clear()
        self._sync()

    def submit(self, req: Request) -> None:
        """Send a chunk request (never blocks; a connection that cannot take it answers with an error)."""
        if self.busy:
            raise RuntimeError("a request is already outstanding or the server is not connected")
        now = time.monotonic()
        deadline = now + (self.cfg.connect_timeout_s if self._cold else self.cfg.request_timeout_s)
        self._cold = False
        steps = [model_inputs(self.info, s) for s in req.steps]
        frames = wire.pack_request(
            self._sid,
            req.seq,
            now,
            self.clock.to_server(deadline),
            steps,
            req.actions,
            req.previous,
            req.frozen,
            req.guide,
        )
        self._outstanding = (req.seq, now, deadline)
        too_big = self._too_big(frames)
        if too_big is not None:  # ZeroMQ would cut the connection, and the request time out, every time
            self._replies.append(Reply(req.seq, None, 0.0, too_big))
            self._outstanding = None
        elif not self._send(frames):
            self._reconnect("the connection to the policy server cannot take the request")

    def _too_big(self, frames: list[Any], what: str = "a request") -> str | None:
        """Why the server would not take these frames (its limits, from the handshake), or None; `what`
        the frames are, for the message."""
        mb = [memoryview(f).nbytes / 2**20 for f in frames]
        frame, total = self.info.get("max_frame_mb"), self.info.get("max_request_mb")
        if isinstance(frame, (int, float)) and max(mb) > frame:
            return (
                f"{what} frame of {max(mb):.1f} MB (an observation's array) is more than the policy "
                f"server takes (max_frame_mb={frame:g}): start wm-serve with a larger max_frame_mb"
            )
        if isinstance(total, (int, float)) and sum(mb) > total:
            return (
                f"{what} of {sum(mb):.1f} MB is more than the policy server takes "
                f"(max_request_mb={total:g}): start wm-serve with a larger max_request_mb"
            )
        return None

    def poll(self) -> Reply | None:
        """The reply to the outstanding request when it is there (or an error reply when it failed);
        also keeps the connection alive (never blocks)."""
        self._advance()
        return self._replies.pop(0) if self._replies else None

    def wait(self, timeout_s: float) -> Reply | None:
        """Block up to `timeout_s` for the reply (for a caller with nothing else to do: a benchmark)."""
        self._block(lambda: bool(self._replies), timeout_s)
        return self._replies.pop(0) if self._replies else None

    # ------------------------------------------------------------------ the connection
    def _advance(self) -> None:
        """Read what has arrived, then act on the clock: deadlines, heartbeats, reconnecting."""
        if self._state == "failed":
            return
        if self._sock is None:
            if time.monotonic() < self._connect_at:
                return
            self._connect()
        if self._monitor is not None:
            self._handshake_events()
        self._expire()  # before reading: a reply there now may have come after the deadline
        while self._sock is not None:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._ping_at = None  # the server is there
            try:
                msg = wire.decode(frames, int(self.cfg.max_frame_mb * 2**20) * 2)
                self._on(msg)
            except wire.ProtocolError as e:  # the server is not one we can talk to, or is broken
                if "protocol version" in str(e):
                    self._fail("version", f"the policy server speaks another protocol: {e}")
                    return
                self._reconnect(f"a malformed reply from the policy server ({e})")
                return
            if self._state == "failed":
                return
        if self._expire():
            return
        now = time.monotonic()
        if self._state in ("hello", "auth") and now - self._since > self._handshake_limit():
            self._reconnect(f"no answer to {self._state} in {now - self._since:.1f} s")
        elif self._ping_at is not None and now - self._ping_at > self.cfg.dead_after_s:
            if self._state == "auth":
                # Building our controller (loading a model) may hold up the server's answers, and a new
                # connection would find the slot taken by our own session: ask again. A server that
                # restarted answers that it builds no session of ours (`opening`).
                self._ping_at = None
            else:  # a chunk asked on this connection can no longer come (its reply goes to the old one)
                self._reconnect(f"no answer to a ping in {now - self._ping_at:.1f} s")
        elif self._state == "reset" and self._reset_retry is not None and now >= self._reset_retry:
            self._reset_retry = None
            self._send(self._reset_frames())
        elif (
            # a reset may wait behind a chunk, a new session for its controller to build (a model to
            # load, for up to connect_timeout_s): pings show the server is there and still at it
            self._state in ("ready", "reset", "auth")
            and (
                self._outstanding is None
                or self._outstanding[2] - self._outstanding[1] > self.cfg.request_timeout_s
            )
            and self._ping_at is None
            and now - self._last_sent > self.cfg.heartbeat_s
        ):
            self._send(wire.encode("ping", {"sid": self._sid, "sent": now}))
            self._ping_at = now

    def _expire(self) -> bool:
        """Give up the outstanding request when its deadline has passed (True): its reply, if it comes, is
        never used (the connection it would arrive on is closed)."""
        if self._outstanding is None or time.monotonic() <= self._outstanding[2]:
            return False
        self.stats["timeouts"] += 1
        seq, sent, deadline = self._outstanding
        self._reconnect(f"no reply from the policy server to chunk {seq} within {deadline - sent:.3g} s")
        return True

    def _handshake_events(self) -> None:
        """ZeroMQ's own handshake, where a token mismatch shows (the server never sees a message). The
        server cuts a peer of the other kind at once, so the client often sees only a broken pipe:
        HANDSHAKE_FAILURES of those in a row decide, or one mismatch of mechanisms, when a raw TCP probe
        finds a ZeroMQ peer at the address (a forwarder such as ssh -L with its server down accepts and
        closes too, but sends no greeting: the server is then waited for as one not up yet); once a
        handshake has succeeded, closed ones are a server down or restarting, and reconnecting goes on. With a
        token, the plain handshake is tried too, on a loopback address only (a server without a token
        takes any client there, and says so in its challenge; elsewhere it would be an impostor)."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._failed_modes.clear()
                self._accepted, self._nobody_behind = True, False
                self._close_monitor()  # nothing more to watch: the tick path stays as it was
                return
            mismatch = event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH  # seen: decisive
            if self._accepted and not mismatch:
                # This server took our handshake before: closed ones now are a server that is down or
                # restarting (a forwarder such as ssh -L accepts and closes meanwhile). Keep trying.
                self._closed_handshakes += 1
                continue
            self._handshake_failures += HANDSHAKE_FAILURES if mismatch else 1
            if self._handshake_failures < HANDSHAKE_FAILURES:
                continue
            if not mismatch and not zmtp_answers(*self.cfg.host_port):
                # Closed by a forwarder with nothing behind it (no ZeroMQ greeting), not by a server
                # refusing our token: wait for the server as for one not up yet.
                self._handshake_failures, self._nobody_behind = 0, True
                continue
            self._nobody_behind = False
            if not self.cfg.token:
                self._fail(
                    "auth",
                    f"the policy server at {self.cfg.address} closed ZeroMQ's handshake "
                    f"{HANDSHAKE_FAILURES} times: it requires a token: give token=",
                )
                return
            if not self.loopback:
                # A server without a token binds loopback only: elsewhere one is an impostor, and the
                # plain handshake would send it the robot's observations in clear.
                self._fail("auth", self._auth_failure(mismatch))
                return
            self._failed_modes.add(self._plain)
            if len(self._failed_modes) == 2:
                self._fail("auth", self._auth_failure(mismatch))
                return
            self._plain = not self._plain
            self._close_socket()
            self._connect()

    @property
    def loopback(self) -> bool:
        """The address is this machine's (where a server without a token may listen)."""
        from robots.runtime.server import is_loopback

        return is_loopback(self.cfg.host_port[0])

    def _auth_failure(self, mismatch: bool) -> str:
        if mismatch and not self.loopback:
            return (
                f"the policy server at {self.cfg.address} takes no token, and one that takes none may only "
                "listen on loopback: refusing an unauthenticated server (an impostor?)"
            )
        return (
            f"authentication failed: the client's token is not the server's (the server at "
            f"{self.cfg.address} closed ZeroMQ's handshake {HANDSHAKE_FAILURES} times)"
        )

    def _handshake_limit(self) -> float:
        # a new session may wait for the server to build its controller (load a model)
        return self.cfg.connect_timeout_s if self._state == "auth" else max(1.0, self.cfg.dead_after_s)

    def _reset_frames(self) -> list[Any]:
        goal = {f"goal/{k}": np.asarray(v) for k, v in (self._goal or {}).items()}
        return wire.encode("reset", {"sid": self._sid}, goal)

    def _on(self, msg: wire.Message) -> None:
        kind = msg.kind
        if kind == "challenge" and self._state == "hello":
            self._greeting = (self._sample(msg), self._exact)  # the new server's first round trip
            server_nonce = msg.get("nonce", bytes)
            fields: dict[str, Any] = {}
            if self.cfg.token and not msg.get("token", bool) and not self.loopback:
                self._fail("auth", self._auth_failure(True))
                return
            if msg.get("token", bool):
                if not self.cfg.token:
                    self._fail(
                        "auth", f"the policy server at {self.cfg.address} requires a token: give token="
                    )
                    return
                fields["mac"] = wire.mac(self.cfg.token, server_nonce, self._nonce)
            if self._secret is not None:
                fields["proof"] = wire.proof(self._secret, server_nonce)
            self._send(wire.encode("auth", fields))
            self._enter("auth")
        elif kind == "ready" and self._state == "auth":
            self._busy = self._busy_until = None
            resumed = msg.get("resumed", bool)
            self._sid, self._secret = msg.get("sid", bytes), msg.get("secret", bytes)
            self._sid_since = time.monotonic()
            info = dict(msg.get("info", dict))
            spec = {k: info.get(k) for k in SPEC_KEYS}
            if self._spec is None:
                self._spec = spec
            elif spec != self._spec:  # a server restarted with another model: the robot was checked
                key = next(k for k in SPEC_KEYS if spec[k] != self._spec[k])  # against the first one
                self._fail(
                    "spec",
                    f"the policy server at {self.cfg.address} came back with another model: {key} "
                    f"{spec[key]!r}, was {self._spec[key]!r}",
                )
                return
            self.info = info
            self._cold = self._cold or not resumed  # a new controller: its first call may be slow
            if not resumed and self._lost:  # a new server process, perhaps another machine's clock:
                self.clock, self._rough = wire.ClockSync(), False  # estimated afresh, from its greeting on
                if self._greeting[0] is not None:
                    self._add_sample(*self._greeting)
            self._lost = False
            if resumed:
                self.stats["resumed"] += 1
            if self._reset_due or (not resumed and (self._goal is not None or self._episode_started)):
                # the episode's reset was not confirmed (asked again: a resumed session may not have
                # run it), or a new controller (the server restarted) needs the episode's goal again
                self._send_reset()
            else:
                self._enter("ready")
            self._down_since = None
        elif kind == "reset_ok" and self._state == "reset":
            self._episode_started, self._reset_due, self._reset_retry = True, False, None
            self._enter("ready")
        elif kind == "chunk":
            self._chunk(msg)
        elif kind == "pong":
            self._pong = True
            self._sample(msg)
            sent = msg.fields.get("sent")
            # a ping sent during the handshake may be answered after `ready`: it asked about no session
            about_ours = not isinstance(sent, float) or sent >= self._sid_since
            if self._state in ("ready", "reset") and about_ours and not msg.get("session", bool, True):
                self._reconnect("the server no longer knows the session")
            elif self._state == "auth" and not msg.get("opening", bool, True):  # it went away while it
                self._reconnect("the server no longer opens our session (it restarted)")  # built ours
        elif kind == "error":
            self._error(msg)

    def _wait_for_slot(self, msg: wire.Message, text: str) -> bool:
        """Every session of the server is taken. One may be a robot that crashed (this one, restarted, or
        a connection of ours ZeroMQ renewed while the server built our controller): the server ends it
        once its client has been silent for its session timeout, and says within how long at the most
        (`free_in`). Ask again each BUSY_RETRY_S until then (True); after it, the slot is a live robot's."""
        now = time.monotonic()
        if self._busy_until is None:
            free_in = msg.fields.get("free_in")
            if not isinstance(free_in, (int, float)) or not 0 <= free_in < math.inf:
                return False
            self._busy_until = now + min(float(free_in), self.cfg.connect_timeout_s) + BUSY_RETRY_S
        if now > self._busy_until:
            return False
        self._busy = text
        self._reconnect(f"the server: {text}")
        self._connect_at = now + BUSY_RETRY_S
        return True

    _episode_started = False
    _rough = False  # the clock holds only samples of replies that waited for a tick (`_add_sample`)
    _greeting: tuple[tuple[float, float, float, float] | None, bool] = (None, False)  # the last challenge's

    def _chunk(self, msg: wire.Message) -> None:
        seq = msg.get("seq", int)
        if self._outstanding is None or seq != self._outstanding[0]:
            self.stats["late_replies"] += 1  # a reply to a request given up: never used
            return
        now = time.monotonic()
        self._sample(msg)
        chunk = msg.arrays.get("chunk")
        infer, wait = msg.number("infer"), msg.number("queue")
        self.timings.append((now - self._outstanding[1], wait, infer))
        self._outstanding = None
        if chunk is None or chunk.ndim != 2:
            shape = None if chunk is None else chunk.shape
            self._replies.append(Reply(seq, None, infer, f"the policy server sent a chunk of shape {shape}"))
            return
        self._replies.append(Reply(seq, chunk.copy(), infer))  # writable, and free of the frame

    def _error(self, msg: wire.Message) -> None:
        code, text = msg.get("code", str), wire.one_line(msg.get("msg", str))
        seq = msg.fields.get("seq")
        if code == "busy" and self._wait_for_slot(msg, text):
            return
        if code in PERMANENT:
            self._fail(code, text)
        elif code == "session":  # a new handshake: resuming the session, or a new one where it is gone
            if msg.fields.get("gone", True):  # the server restarted or expired it (else: our connection
                self._secret = None  # changed under us, e.g. ZeroMQ reconnected it: resume it)
            if self._outstanding is not None:
                self._replies.append(Reply(self._outstanding[0], None, 0.0, f"the policy server: {text}"))
                self._outstanding = None
            self._reconnect(f"the server: {text}")
        elif self._outstanding is not None and seq == self._outstanding[0]:
            self._replies.append(Reply(seq, None, 0.0, f"the policy server: {text}"))
            self._outstanding = None
        elif seq is not None:  # the answer to a request given up (e.g. the last episode's): never used
            self.stats["late_replies"] += 1
        elif self._state == "reset" and code == "busy_model":  # the last episode's requests still run
            self._reset_retry = time.monotonic() + 0.05
        elif self._state == "reset" and code in ("reset", "protocol"):  # its controller raised, or the
            # goal does not fit the model: reset() says so, as a local worker's does
            self._reset_error, self._reset_due = text, False
            self._enter("ready")
        elif self._state in ("hello", "auth", "reset"):  # a handshake step refused: start over
            self._reconnect(f"the server refused {self._state}: {text}")

    def _sample(self, msg: wire.Message) -> tuple[float, float, float, float] | None:
        """A clock sample from a reply (its times, or None when it carries none); see `_add_sample`."""
        sent, recv, reply = msg.fields.get("sent"), msg.fields.get("recv"), msg.fields.get("reply")
        times = (sent, recv, reply, time.monotonic())
        if not wire.ClockSync.plausible(*times):  # none, or a NaN / 1e300 that became the estimate
            return None
        self._add_sample(times, self._exact)
        return times

    def _add_sample(self, times: tuple[float, float, float, float], exact: bool) -> None:
        """Exact samples are replies taken in as they arrived; a rough one waited for a tick (its delay
        holds that wait, its offset is off by half of it at most) and counts only while the clock has
        no exact one: a server new in mid-episode is sent deadlines on its clock from the start (with
        none, every chunk expired until the next episode's reset). The first exact one replaces them."""
        if exact:
            if self._rough:
                self.clock, self._rough = wire.ClockSync(), False
            self.clock.add(*times)
        elif self._rough or not self.clock.known:
            self.clock.add(*times)
            self._rough = True

    def _send_reset(self) -> None:
        self._reset_retry = None
        frames = self._reset_frames()
        too_big = self._too_big(frames, "an episode's goal")  # ZeroMQ would cut every connection it went
        if too_big is not None:  # on: reconnecting without end, until connect_timeout_s, in other words
            self._fail("limits", too_big)
            return
        self._send(frames)
        self._enter("reset")

    def _connect(self) -> None:
        self._sock = sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, int(self.cfg.max_frame_mb * 2**20))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 16)
        if "[" in self.cfg.endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        if self.cfg.token and not self._plain:  # a server with a token encrypts (`wire.curve_keys`)
            sock.curve_serverkey = wire.curve_keys(self.cfg.token)[0]
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        self._monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self._handshake_failures = 0
        try:
            sock.connect(self.cfg.endpoint)
        except zmq.ZMQError as e:  # an address ZeroMQ cannot use (RemoteConfig refuses those it knows)
            self._fail("address", f"cannot connect to the policy server at {self.cfg.address}: {e}")
            return
        self._nonce = secrets.token_bytes(16)
        now = time.monotonic()
        hello = {
            "nonce": self._nonce,
            "resume": self._sid,
            "client": self._client,
            "low": self.low,
            "high": self.high,
            "sent": now,
        }
        self._send(wire.encode("hello", hello))
        self._ping_at = None
        self._enter("hello")

    _lost = False  # a session was lost since the last `ready`

    def _reconnect(self, why: str) -> None:
        """Drop the socket (with whatever it still holds) and start a new handshake; a request in flight
        fails now (its reply went with the socket: it waited out its whole deadline, the robot holding,
        when a pong said the server had restarted)."""
        if self._outstanding is not None:
            self._replies.append(Reply(self._outstanding[0], None, 0.0, why))
            self._outstanding = None
        if self._down_since is None:
            self._down_since = time.monotonic()
        if self._sid is not None:  # a session was lost (not: the server is not up yet)
            self.stats["reconnects"] += 1
            self._lost = True
        self.stats["last_reconnect"] = why
        self._close_socket()
        self._state = "down"

    def _fail(self, code: str, text: str) -> None:
        self._failed = text
        if self._outstanding is not None:
            self._replies.append(Reply(self._outstanding[0], None, 0.0, text))
            self._outstanding = None
        self._close_socket()
        self._state = "failed"

    def _enter(self, state: str) -> None:
        self._state, self._since = state, time.monotonic()

    def _send(self, frames: list[Any]) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._last_sent = time.monotonic()
        return True

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            if self._sock is not None:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _close_socket(self) -> None:
        self._close_monitor()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
