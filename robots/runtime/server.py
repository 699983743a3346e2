"""The policy server: controllers on this machine, robots on others (`wm-serve`).

One ZeroMQ ROUTER socket takes every client's messages (`robots.runtime.wire`); ZeroMQ's own I/O
thread reads the network, so a client that stalls mid-frame or floods its connection holds up
nobody else, and frames above `max_frame_mb` cut that connection. This thread checks each message
and answers handshakes, pings and errors at once; model work (building a controller, resetting it,
computing a chunk) runs on one inference thread, in arrival order, and its results come back over
an in-process socket, so a handshake or a ping is answered while a chunk computes.

Sessions: a client proves it holds the token (HMAC over two nonces; compared in constant time; the
token never travels and is never logged), then gets a session with its own controller, built for
the robot's action bounds (idle controllers are kept and reused for the same bounds). At most
`max_sessions` are open; another client is refused, and cannot reset, feed or resume a session
without its secret. A client that reconnects (after a timeout, a network fault) resumes its session
with a proof of that secret, or, before its session was ready, by the random id of its own that its
hellos carry; a session whose client is silent for `session_timeout_s` is closed, and a client
refused as busy is told within how long that may happen (a robot that crashed and restarts).
Without a token the server binds only a loopback address. With one, ZeroMQ's CurveZMQ encrypts
every connection with a server key derived from the token (`wire.curve_keys`), so a peer without it
cannot finish ZeroMQ's handshake and sends the server no message at all: ZeroMQ bounds each frame
(`max_frame_mb`) but not how many frames one message has, and only such a peer could send an endless
one. Without a token (loopback only) that bound is the machine's own users' to respect.
"""

from __future__ import annotations

import ctypes
import ipaddress
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from robots.runtime import wire
from robots.runtime.realtime import QuietGC
from robots.runtime.worker import Request, compute, describe, kernel_line, kernel_summary, set_goal

MAX_PENDING = 64  # handshakes in progress at once (more: the oldest new one is forgotten)
HANDSHAKE_S = 30.0  # a handshake not finished in this long is forgotten
MAX_IDLE = 2  # controllers of closed sessions kept for later ones (at least max_sessions)
MAX_JOBS = 2  # per session: one computing, one waiting (sent by a client that gave up on the first)
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def client_name(identity: bytes) -> str:
    """A client's name in the log: its ZeroMQ routing id in hex, the last 8 bytes of a longer one.
    ZeroMQ numbers its clients in the id's last bytes (00 then a counter), so its first bytes named
    every client alike."""
    return identity[-8:].hex()


@dataclass(frozen=True)
class ServerConfig:
    """host / port: where to listen (port 0: any free one); token: the shared secret clients must prove
    (required to bind anything but loopback); max_sessions: robots served at once;
    session_timeout_s: a session whose client is silent this long is closed; max_frame_mb /
    max_request_mb: the largest array, and message, accepted; quiet_gc: keep Python's garbage
    collector off the message path (`realtime.QuietGC`: young objects collected between messages)."""

    host: str = "127.0.0.1"
    port: int = 5555
    token: str | None = field(default=None, repr=False)
    max_sessions: int = 1
    session_timeout_s: float = 10.0
    max_frame_mb: float = 16.0
    max_request_mb: float = 64.0
    quiet_gc: bool = True

    def __post_init__(self) -> None:
        if not wire.is_host(self.host, listen=True):
            raise ValueError(
                "host must be a name, an IPv4 or IPv6 address (no brackets, no port), or * for every "
                f"interface, got {self.host!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        for name in ("session_timeout_s", "max_frame_mb", "max_request_mb"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # inf: a dead robot's slot, or no limit, for ever
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.max_frame_mb > self.max_request_mb:  # a frame is part of a request: the frame bound lied
            raise ValueError(
                f"max_frame_mb ({self.max_frame_mb}) must be at most max_request_mb ({self.max_request_mb})"
            )
        if self.token is not None and len(self.token) < 8:
            raise ValueError("token must be at least 8 characters")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host={self.host} exposes the server beyond this machine: give token=SECRET (or set "
                "WM_SERVE_TOKEN) so that only clients holding it can connect"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Session:
    sid: bytes
    secret: bytes
    identity: bytes
    key: Any
    low: list[float]
    high: list[float]
    opened: float
    last_seen: float
    controller: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0  # queued or computing on the inference thread
    closed: bool = False
    client: bytes | None = None  # the client's own id (its hello's): a reconnect before `ready` finds it


class PolicyServer:
    """Serves chunks from controllers made by `builder(low, high)` (a robot's action bounds -> a
    controller satisfying `policies.base.ChunkController`). `key(low, high)` says which bounds need
    their own controller (None: one kind fits all, e.g. a diffusion policy). `meta` is added to the
    info every client gets. `log` takes one line per event (sessions, refusals, protocol errors)."""

    def __init__(
        self,
        builder: Callable[[list[float], list[float]], Any],
        cfg: ServerConfig | None = None,
        key: Callable[[list[float], list[float]], Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.builder, self.cfg = builder, cfg or ServerConfig()
        self.key = key or (lambda low, high: (tuple(low), tuple(high)))
        self.meta, self.log = dict(meta or {}), log
        self.sessions: dict[bytes, Session] = {}
        # controllers of closed sessions (key, controller), the most recent last, at most MAX_IDLE
        self.idle: list[tuple[Any, Any]] = []
        self.pending: dict[bytes, tuple[float, bytes, wire.Message]] = {}
        # expired: chunk requests whose deadline passed in the queue; sessions_expired: silent sessions closed
        self.counts: dict[str, int] = dict.fromkeys(
            ("requests", "chunks", "errors", "refused", "expired", "sessions_expired"), 0
        )
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._current: tuple[Session, float] | None = None  # the job computing: its session, since when
        self._quiet = QuietGC(enabled=False)  # `serve` replaces it for its duration
        self._serving = threading.Event()  # clear while `serve` runs
        self._serving.set()
        self._ctx: zmq.Context | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle
    def add_idle(self, controller: Any, low: list[float], high: list[float]) -> None:
        """A controller built ahead (at startup) for these bounds, handed to the first fitting session."""
        self._park(self.key(low, high), controller)

    def _park(self, key: Any, controller: Any) -> None:
        """Keep a controller for a later session with the same key; the oldest beyond MAX_IDLE goes
        (each may hold a model: sessions with ever new bounds would pile them up)."""
        self.idle.append((key, controller))
        del self.idle[: max(0, len(self.idle) - max(MAX_IDLE, self.cfg.max_sessions))]

    def _unpark(self, key: Any) -> Any:
        """The most recent idle controller for `key` (taken out of the pool), or None."""
        for i in range(len(self.idle) - 1, -1, -1):
            if self.idle[i][0] == key:
                return self.idle.pop(i)[1]
        return None

    def bind(self) -> str:
        """Open the socket; returns the endpoint (tcp://host:port, the real port when 0 was asked)."""
        self._ctx = ctx = zmq.Context()
        # ZeroMQ numbers the clients that give no id of their own from the C library's rand(), unseeded:
        # the same numbers in every process (00 6b8b4567, 00 6b8b4568, ...), which a peer could take as
        # its own ids first; libzmq then aborts the whole process (an assertion) when it numbers the next
        # robot so. Seeded from the OS's randomness, the numbers are not known in advance.
        ctypes.CDLL(None).srand(secrets.randbits(32))
        self._sock = sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, int(self.cfg.max_frame_mb * 2**20))
        sock.setsockopt(zmq.RCVHWM, 64)
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)  # a peer stalled in the greeting is cut after 5 s
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if ":" in self.cfg.host:
            sock.setsockopt(zmq.IPV6, 1)
        self._monitor: zmq.Socket | None = None
        if self.cfg.token is not None:  # encrypted, and closed to peers without the token (`wire.curve_keys`)
            sock.curve_publickey, sock.curve_secretkey = wire.curve_keys(self.cfg.token)
            sock.curve_server = True
            self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        try:
            if self.cfg.port == 0:
                sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{self.cfg.port}")
        except zmq.ZMQError as e:
            self.close()
            raise OSError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port}: {zmq.strerror(e.errno)}"
            ) from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(f"inproc://wake-{id(self)}")
        self._thread = threading.Thread(target=self._inference, name="inference", daemon=True)
        self._thread.start()
        return self.endpoint

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def stop(self) -> None:
        """Ask `serve` to return (from any thread or a signal handler)."""
        self._stop.set()

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        """Answer messages until `stop()` (or `until()` says so)."""
        self._serving.clear()
        try:
            with QuietGC(self.cfg.quiet_gc) as self._quiet:
                self._loop(until)
        finally:
            self._serving.set()

    def _loop(self, until: Callable[[], bool] | None) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        next_sweep = time.monotonic()
        while not self._stop.is_set() and not (until is not None and until()):
            self._quiet.step()  # between messages: the garbage of the last ones
            events = dict(poller.poll(100))
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            self._guarded(self._deliver)
            if self._monitor is not None and self._monitor in events:
                self._guarded(self._handshakes)
            if self._sock in events:
                for _ in range(64):  # a burst from one client never starves the results above
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._handle(frames[0].bytes, frames[1:])
                    except Exception as e:  # noqa: BLE001 - no message may stop the server
                        self._error(frames[0].bytes, "internal", f"{type(e).__name__}: {e}")
            if time.monotonic() >= next_sweep:
                self._guarded(self._sweep)
                next_sweep = time.monotonic() + 0.5

    def _guarded(self, work: Callable[[], None]) -> None:
        """The server's own work between messages: a failure is logged, never the end of serving."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 - every session depends on this loop
            self._count_error(f"server: {work.__name__[1:]} failed: {type(e).__name__}: {e}", False)

    def close(self) -> None:
        """Stop serving (waits for `serve`, if another thread runs it) and free the sockets."""
        self._stop.set()
        self._serving.wait(5.0)
        self._jobs.put(None)
        if getattr(self, "_thread", None) is not None:
            self._thread.join(5.0)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # ------------------------------------------------------------------ messages
    def _handle(self, identity: bytes, frames: list[Any]) -> None:
        now = time.monotonic()
        try:
            msg = wire.decode(frames, int(self.cfg.max_request_mb * 2**20))
        except wire.ProtocolError as e:
            self._error(identity, "protocol", str(e))
            return
        try:
            handler = {
                "hello": self._hello,
                "auth": self._auth,
                "reset": self._reset,
                "infer": self._infer,
                "ping": self._ping,
                "bye": self._bye,
            }.get(msg.kind)
            if handler is None:
                raise wire.ProtocolError(f"unknown message type {msg.kind!r:.40}")
            if msg.arrays and msg.kind not in ("infer", "reset"):  # only those carry arrays
                raise wire.ProtocolError(f"{msg.kind}: carries arrays, which it takes none of")
            handler(identity, msg, now)
        except wire.ProtocolError as e:
            self._error(identity, "protocol", str(e), _seq(msg))

    def _send(
        self, identity: bytes, kind: str, fields: Mapping[str, Any], arrays: Mapping[str, Any] = ()
    ) -> None:
        try:
            self._sock.send_multipart([identity, *wire.encode(kind, fields, arrays)], zmq.NOBLOCK, copy=False)
        except zmq.Again:  # that client's queue is full (it is not reading): its problem alone
            self.counts["errors"] += 1

    def _error(self, identity: bytes, code: str, text: str, seq: int | None = None, **extra: Any) -> None:
        text = wire.one_line(text)  # a controller's exception may span lines; a peer's words go to the log
        self._count_error(
            f"client {client_name(identity)}: {code}: {text}", code in ("auth", "busy", "session")
        )
        fields = {"code": code, "msg": text, "seq": seq, "reply": time.monotonic(), **extra}
        self._send(identity, "error", fields)

    def _count_error(self, line: str, refused: bool) -> None:
        self.counts["errors"] += 1
        self.counts["refused"] += refused
        n = self.counts["errors"]
        if n <= 20 or n % 1000 == 0:  # a flood of bad frames does not flood the log
            self.log(line + (f" ({n} errors so far)" if n > 20 else ""))

    def _handshakes(self) -> None:
        """ZeroMQ's encrypted handshakes that failed: peers without the token (never seen as messages)."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            recv_monitor_message(self._monitor)
            self._count_error(
                "a client: auth: authentication failed in the encrypted handshake (no token, or another)",
                True,
            )

    def _hello(self, identity: bytes, msg: wire.Message, now: float) -> None:
        nonce = msg.get("nonce", bytes)
        if not 16 <= len(nonce) <= 64:
            raise wire.ProtocolError("hello: nonce must be 16..64 bytes")
        low, high = msg.get("low", list), msg.get("high", list)
        if not (0 < len(low) == len(high) <= 256) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in low + high
        ):
            raise wire.ProtocolError("hello: low / high must be equal-length lists of finite numbers")
        if any(a >= b for a, b in zip(low, high, strict=True)):
            raise wire.ProtocolError("hello: every low must be below its high")
        msg.get("resume", (bytes, type(None)), None)
        client = msg.get("client", (bytes, type(None)), None)
        if client is not None and not 16 <= len(client) <= 64:
            raise wire.ProtocolError("hello: client must be 16..64 bytes")
        if len(self.pending) >= MAX_PENDING:
            del self.pending[self._forgettable()]
        server_nonce = secrets.token_bytes(16)
        self.pending[identity] = (now, server_nonce, wire.Message(msg.kind, dict(msg.fields), {}))
        self._send(
            identity,
            "challenge",
            {"nonce": server_nonce, "token": self.cfg.token is not None, **self._times(msg, now)},
        )

    def _forgettable(self) -> bytes:
        """The handshake to forget when `MAX_PENDING` are in progress: the oldest one that asks for a
        new session. One that resumes an open session (its sid) or comes back to one opened for it (its
        client id) is kept while any other can go: a burst of hellos from other connections (which
        need the token, or a loopback bind) never locks an open session's robot out of its session."""

        def rank(k: bytes) -> tuple[bool, float]:
            t, _, hello = self.pending[k]
            returning = hello.fields.get("resume") in self.sessions or (
                self._opened_for(hello.fields.get("client")) is not None
            )
            return returning, t

        return min(self.pending, key=rank)

    def _auth(self, identity: bytes, msg: wire.Message, now: float) -> None:
        started = self.pending.pop(identity, None)
        if started is None:
            raise wire.ProtocolError("auth without a hello first (or the handshake took too long)")
        _, server_nonce, hello = started
        if self.cfg.token is not None:
            given = msg.get("mac", bytes, b"")
            if not wire.same(given, wire.mac(self.cfg.token, server_nonce, hello.fields["nonce"])):
                self._error(identity, "auth", "authentication failed: the client's token is not the server's")
                return
        resume = hello.fields.get("resume")
        if resume is not None and resume in self.sessions:
            s = self.sessions[resume]
            if not wire.same(msg.get("proof", bytes, b""), wire.proof(s.secret, server_nonce)):
                self._error(identity, "session", "cannot resume that session: wrong proof")
                return
            s.identity, s.last_seen = identity, now
            self.log(f"session {s.sid.hex()[:8]}: resumed by client {client_name(identity)}")
            self._ready(s, resumed=True)
            return
        client = hello.fields.get("client")
        waiting = self._opened_for(client)
        if waiting is not None:  # its connection was renewed (ZeroMQ reconnected it) before `ready`
            waiting.identity, waiting.last_seen = identity, now
            self.log(
                f"session {waiting.sid.hex()[:8]}: its client reconnected before the session was ready "
                f"(client {client_name(identity)})"
            )
            if waiting.controller is not None:  # built: `ready` went to the connection it lost
                self._ready(waiting, resumed=False)
            return
        if len(self.sessions) >= self.cfg.max_sessions:
            ages = ", ".join(f"{now - s.opened:.0f} s" for s in self.sessions.values())
            self._error(
                identity,
                "busy",
                f"the server already serves {len(self.sessions)} robot(s) (max_sessions="
                f"{self.cfg.max_sessions}; open for {ages}); a session ends when its robot's wm-deploy "
                f"ends, or {self.cfg.session_timeout_s:g} s after its last message (a robot that crashed)",
                free_in=self._free_in(now),
            )
            return
        low, high = [float(x) for x in hello.fields["low"]], [float(x) for x in hello.fields["high"]]
        s = Session(
            secrets.token_bytes(16),
            secrets.token_bytes(32),
            identity,
            self.key(low, high),
            low,
            high,
            now,
            now,
            client=client,
        )
        self.sessions[s.sid] = s
        s.jobs += 1
        # a controller of a closed session with these bounds, if any
        self._jobs.put(("build", s, self._unpark(s.key), identity, now))

    def _opened_for(self, client: bytes | None) -> Session | None:
        """The session opened for the client whose hello carried `client` (None for none)."""
        if client is None:
            return None
        return next(
            (s for s in self.sessions.values() if s.client is not None and wire.same(s.client, client)), None
        )

    def _free_in(self, now: float) -> float:
        """The most seconds until a session ends if its client stays silent (a robot that crashed): its
        last message's time plus `session_timeout_s`; one still computing (its controller being built)
        ends no sooner than that from now."""
        timeout = self.cfg.session_timeout_s
        return min(
            timeout if s.jobs else max(0.0, timeout - (now - s.last_seen)) for s in self.sessions.values()
        )

    def _ready(self, s: Session, resumed: bool) -> None:
        limits = {"max_frame_mb": self.cfg.max_frame_mb, "max_request_mb": self.cfg.max_request_mb}
        info = {**self.meta, **s.info, **limits}  # the limits: a client refuses what would not arrive
        self._send(
            s.identity,
            "ready",
            {"sid": s.sid, "secret": s.secret, "info": info, "resumed": resumed, "reply": time.monotonic()},
        )

    def _session(self, identity: bytes, msg: wire.Message, now: float) -> Session | None:
        """The message's session, if it exists and this client holds it; else an error reply."""
        sid = msg.get("sid", bytes)
        s = self.sessions.get(sid)
        if s is None or s.identity != identity:
            why = "no such session (the server restarted, or it expired)" if s is None else "not your session"
            self._error(identity, "session", why, _seq(msg), gone=s is None)  # not gone: resume it
            return None
        s.last_seen = now
        return s

    def _reset(self, identity: bytes, msg: wire.Message, now: float) -> None:
        s = self._session(identity, msg, now)
        if s is None:
            return
        other = [k for k in msg.arrays if not k.startswith("goal/")]
        if other:  # dropped, it left a goal-conditioned controller the last episode's goal
            raise wire.ProtocolError(f"reset: unexpected array {other[0]!r:.60} (a goal's are 'goal/<key>')")
        goal = {k[len("goal/") :]: v for k, v in msg.arrays.items()}
        if goal:
            wire.check_observation("reset goal", goal, wire.spec_of(s.info))
        if s.jobs >= MAX_JOBS:
            self._error(
                identity, "busy_model", "the model is still computing earlier requests of this session"
            )
            return
        if len(self.sessions) == 1 and s.jobs == 0:  # an episode starts and no other robot is served
            self._quiet.renew()
        s.jobs += 1
        self._jobs.put(("reset", s, goal or None, identity, now))

    def _infer(self, identity: bytes, msg: wire.Message, now: float) -> None:
        s = self._session(identity, msg, now)
        if s is None:
            return
        self.counts["requests"] += 1
        req = wire.unpack_request(
            msg, wire.spec_of(s.info), int(s.info.get("window", 1)), s.info.get("action_dim")
        )
        if s.jobs >= MAX_JOBS:  # one computing and one waiting (a client that gave up on the first)
            current = self._current
            busy = f" for {now - current[1]:.1f} s" if current is not None and current[0] is s else ""
            self._error(
                identity,
                "busy_model",
                f"the model is still computing an earlier request of this session{busy} (hung?) and "
                "another one waits",
                req.seq,
            )
            return
        s.jobs += 1
        self._jobs.put(("infer", s, (req, msg.fields.get("sent")), identity, now))

    def _ping(self, identity: bytes, msg: wire.Message, now: float) -> None:
        sid = msg.get("sid", (bytes, type(None)), None)
        s = self.sessions.get(sid) if sid is not None else None
        if s is not None and s.identity == identity:
            s.last_seen = now
        # opening: a session of this connection's is being built (its client waits for `ready`)
        opening = any(o.identity == identity and o.controller is None for o in self.sessions.values())
        mine = s is not None and s.identity == identity
        self._send(identity, "pong", {**self._times(msg, now), "session": mine, "opening": opening})

    def _bye(self, identity: bytes, msg: wire.Message, now: float) -> None:
        s = self.sessions.get(msg.get("sid", bytes))
        if s is not None and s.identity == identity:
            self._end(s, "closed by its client")

    def _times(self, msg: wire.Message, now: float) -> dict[str, Any]:
        sent = msg.fields.get("sent")
        return {"sent": sent if isinstance(sent, float) else None, "recv": now, "reply": time.monotonic()}

    # ------------------------------------------------------------------ sessions
    def _end(self, s: Session, why: str) -> None:
        self.sessions.pop(s.sid, None)
        s.closed = True
        self.log(f"session {s.sid.hex()[:8]}: {why} after {time.monotonic() - s.opened:.1f} s")
        self.log(kernel_line(kernel_summary()))  # what this process's inference ran on, so far
        if not s.jobs:  # else it is handed back when its jobs are done
            self._release(s)

    def _release(self, s: Session) -> None:
        """A closed session's controller goes to the idle pool, for the next session with its bounds."""
        if s.controller is not None:
            self._park(s.key, s.controller)
            s.controller = None

    def _sweep(self) -> None:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if now - s.last_seen > self.cfg.session_timeout_s and not s.jobs:
                self.counts["sessions_expired"] += 1
                self._end(s, f"expired ({self.cfg.session_timeout_s:g} s without a message)")
        for identity, (t, _, _) in list(self.pending.items()):
            if now - t > HANDSHAKE_S:
                del self.pending[identity]

    # ------------------------------------------------------------------ the inference thread
    def _inference(self) -> None:
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(f"inproc://wake-{id(self)}")
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                kind, s, payload, identity, received = job
                started = time.monotonic()
                self._current = (s, started)
                try:
                    result = self._run(kind, s, payload, started)
                except Exception as e:  # noqa: BLE001 - reported to that client as one line
                    result = ("error", f"{type(e).__name__}: {e}")
                self._current = None
                self._results.put((kind, s, payload, identity, received, started, result))
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _run(self, kind: str, s: Session, payload: Any, started: float) -> Any:
        """Model work, on the inference thread."""
        if kind == "build":
            from policies.base import GoalConditioned

            controller = payload
            if isinstance(controller, GoalConditioned):  # a parked one kept its last session's goal, and
                if hasattr(controller, "clear_goal"):  # a robot that sent none was planned toward it
                    controller.clear_goal()
                else:  # one that cannot forget it is not handed on
                    controller = None
            if controller is None:
                controller = self.builder(s.low, s.high)
            return ("ok", controller, describe(controller))
        if kind == "reset":
            set_goal(s.controller, payload)
            return ("ok",)
        req, _ = payload
        if started > req.expires:  # the client has given up on it: do not spend the model on it
            return ("expired",)
        reply = compute(
            s.controller, Request(req.seq, req.steps, req.actions, req.previous, req.frozen, guide=req.guide)
        )
        return ("error", reply.error) if reply.error is not None else ("chunk", reply)

    def _deliver(self) -> None:
        """Send the inference thread's results (on this thread: the socket is not shared)."""
        while True:
            try:
                kind, s, payload, identity, received, started, result = self._results.get_nowait()
            except queue.Empty:
                return
            s.jobs -= 1
            try:
                self._result(kind, s, payload, identity, received, started, result)
            except Exception as e:  # noqa: BLE001 - e.g. a reply that cannot be encoded: that client is told
                seq = payload[0].seq if kind == "infer" else None
                self._error(identity, "internal", f"{kind}: {type(e).__name__}: {e}", seq)

    def _result(
        self, kind: str, s: Session, payload: Any, identity: bytes, received: float, started: float, out: Any
    ) -> None:
        """One job's result to its client (its client's silence counts from here: it was waiting)."""
        s.last_seen = max(s.last_seen, time.monotonic())
        if kind == "build" and out[0] == "ok":
            s.controller, s.info = out[1], out[2]
            if s.closed:
                self._release(s)
                return
            self.log(f"session {s.sid.hex()[:8]}: opened for client {client_name(s.identity)}")
            self._ready(s, resumed=False)
            return
        if s.closed and not s.jobs:
            self._release(s)
        if kind == "build":  # it failed: the slot is freed (said on the client's connection of now)
            self.sessions.pop(s.sid, None)
            self._error(s.identity, "build", f"could not build the controller: {out[1]}")
            return
        seq = payload[0].seq if kind == "infer" else None
        if kind == "reset":  # to the session's connection now (it may have been renewed since)
            identity = s.identity
        if out[0] == "error":
            self._error(identity, "inference" if kind == "infer" else "reset", out[1], seq)
        elif out[0] == "expired":
            self.counts["expired"] += 1
            self._error(identity, "expired", f"chunk {seq} expired in the queue", seq)
        elif kind == "reset":
            self._send(identity, "reset_ok", {"reply": time.monotonic()})
        else:
            reply = out[1]
            self.counts["chunks"] += 1
            fields = {
                "seq": seq,
                "sent": payload[1],
                "recv": received,
                "queue": started - received,
                "infer": reply.seconds,
                "reply": time.monotonic(),
            }
            self._send(identity, "chunk", fields, {"chunk": reply.actions})


def _seq(msg: wire.Message) -> int | None:
    """The request number a message carries, if it carries a well-typed one (for error replies)."""
    seq = msg.fields.get("seq")
    return seq if isinstance(seq, int) else None


def token_from_env(token: str | None) -> str | None:
    """The token given, else the WM_SERVE_TOKEN environment variable's (None: neither)."""
    return token if token else os.environ.get("WM_SERVE_TOKEN") or None
