"""The policy server's wire format: a small typed header and raw numpy buffers, never pickle.

A message is a ZeroMQ multipart message: frame 0 is a msgpack map (the header: protocol version
`v`, message type `t`, its fields, and `arrays`, a list of [name, dtype, shape] describing the
frames that follow), then one frame per array with its raw bytes (C order). Decoding trusts
nothing: the header's size, its types, the dtypes (a short list of plain numeric ones), the number
of dimensions and each dimension, and that every buffer holds exactly the bytes its description
says, are checked before any array is made; anything else is a `ProtocolError` naming what was
wrong. A request's observations are then checked against the model's I/O spec (`spec_of`,
`unpack_request`) before inference.

Message types (client -> server, server -> client):
  hello {nonce, resume, proof, low, high} -> challenge {nonce, token}    a session is asked for
  auth {mac}                              -> ready {sid, secret, info, resumed} | error
  reset {sid} + goal arrays               -> reset_ok {} | error
  infer {sid, seq, sent, expires, steps, actions, frozen, guide} + arrays -> chunk {seq, ...} | error
  ping {sid, sent}                        -> pong {sent, recv, reply, session, opening}
  bye {sid}                               (no reply)
Every reply carries the server's monotonic `recv` and `reply` times (`sent` echoed), so the client
can estimate the clock offset and the network delay (`ClockSync`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_DIMS = 4
MAX_DIM = 1 << 16
MAX_ARRAYS = 256
DTYPES = frozenset({"|u1", "<f4", "<f8", "<i4", "<i8", "|b1"})
MAC_CONTEXT = b"wm-serve/1"


class ProtocolError(ValueError):
    """A message that does not follow the protocol: one line saying what and where."""


@dataclass(frozen=True)
class Message:
    """A decoded message: its type, its header fields and its arrays by name."""

    kind: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, name: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        """A header field of the given type(s); a missing or mistyped one is a `ProtocolError`."""
        if name not in self.fields:
            if default is not ...:
                return default
            raise ProtocolError(f"{self.kind}: field {name!r} is missing")
        value = self.fields[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ProtocolError(f"{self.kind}: field {name!r} must be {_names(types)}, got bool")
        if not isinstance(value, types):
            raise ProtocolError(
                f"{self.kind}: field {name!r} must be {_names(types)}, got {type(value).__name__}"
            )
        return value

    def number(self, name: str, default: Any = ...) -> float:
        value = self.get(name, (int, float), default)
        if value is not None and not math.isfinite(value):
            raise ProtocolError(f"{self.kind}: field {name!r} must be finite, got {value}")
        return value


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def encode(kind: str, fields: Mapping[str, Any] | None = None, arrays: Mapping[str, Any] = ()) -> list[Any]:
    """The frames of one message: the header, then each array's bytes (C order, no copy when possible)."""
    header: dict[str, Any] = {"v": VERSION, "t": kind, **(fields or {})}
    descr, frames = [], []
    for name, value in dict(arrays).items():
        a = np.ascontiguousarray(value)
        if a.dtype.kind in "fiu" and not a.dtype.isnative:  # the same values in this machine's byte order
            a = a.astype(a.dtype.newbyteorder("="))
        if a.dtype == np.float16:  # half precision: as float32 (the other side takes it)
            a = a.astype(np.float32)
        dtype = a.dtype.str
        if dtype not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {a.dtype} cannot be sent (allowed: {sorted(DTYPES)})")
        descr.append([name, dtype, list(a.shape)])
        frames.append(memoryview(a).cast("B") if a.size else b"")
    header["arrays"] = descr
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: Sequence[Any], max_bytes: int) -> Message:
    """Check and decode one message's frames (bytes, or zmq Frames); `max_bytes`: the most all of them
    may hold together. The arrays are read-only views on the frames (no copy)."""
    if not frames:
        raise ProtocolError("empty message")
    sizes = [len(memoryview(f.buffer if hasattr(f, "buffer") else f)) for f in frames]
    if sum(sizes) > max_bytes:
        raise ProtocolError(f"message of {sum(sizes)} bytes exceeds the limit of {max_bytes}")
    if len(frames) - 1 > MAX_ARRAYS:
        raise ProtocolError(f"message of {len(frames)} frames exceeds the limit of {MAX_ARRAYS + 1}")
    raw = _bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES, max_str_len=MAX_HEADER_BYTES
        )
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for malformed input
        raise ProtocolError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    version = header.get("v")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r:.20}; this side speaks version {VERSION}")
    kind = header.get("t")
    if not isinstance(kind, str):
        raise ProtocolError("header field 't' (the message type) is missing or not a string")
    if not (kind.isascii() and kind.isidentifier() and len(kind) <= 32):  # it names the message in errors
        raise ProtocolError(f"header field 't' (the message type) must be a short name, got {kind!r:.40}")
    descr = header.pop("arrays", [])
    if not isinstance(descr, list) or len(descr) != len(frames) - 1:
        n = len(descr) if isinstance(descr, list) else "no"
        raise ProtocolError(f"{kind}: header describes {n} arrays but {len(frames) - 1} buffers follow")
    arrays: dict[str, np.ndarray] = {}
    for d, frame in zip(descr, frames[1:], strict=True):
        name, a = _array(kind, d, frame)
        if name in arrays:
            raise ProtocolError(f"{kind}: array {name!r} appears twice")
        arrays[name] = a
    return Message(kind, header, arrays)


def one_line(text: str, limit: int = 500) -> str:
    """`text` as one printable line of at most `limit` characters: an error that came over the network or
    from a controller's exception (often several lines), before it goes to a log or to the operator."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _array(kind: str, d: Any, frame: Any) -> tuple[str, np.ndarray]:
    if not (isinstance(d, list) and len(d) == 3 and isinstance(d[0], str) and isinstance(d[1], str)):
        raise ProtocolError(f"{kind}: an array description must be [name, dtype, shape], got {d!r:.80}")
    name, dtype, shape = d
    if dtype not in DTYPES:
        raise ProtocolError(f"{kind}: array {name!r:.40} has dtype {dtype!r:.20} (allowed: {sorted(DTYPES)})")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
    ):
        raise ProtocolError(
            f"{kind}: array {name!r:.40} has shape {shape!r:.60} (at most {MAX_DIMS} dims of 0..{MAX_DIM})"
        )
    buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if buf.nbytes != nbytes:
        raise ProtocolError(
            f"{kind}: array {name!r:.40} of shape {tuple(shape)} {np.dtype(dtype)} needs {nbytes} bytes, "
            f"its buffer has {buf.nbytes}"
        )
    return name, np.frombuffer(buf, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------- authentication
HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a host name or an IPv4 address


def is_ipv6(address: str) -> bool:
    """An IPv6 address, with a %zone (a scope: an interface's name or number) or not."""
    bare, zone_mark, zone = address.partition("%")
    if zone_mark and not HOST_NAME.fullmatch(zone):
        return False
    try:
        return ipaddress.ip_address(bare).version == 6
    except ValueError:
        return False


def is_host(host: object, listen: bool = False) -> bool:
    """A host to connect to (a name, an IPv4 address, or an IPv6 one in brackets as HOST:PORT writes it),
    or with `listen` one to bind (a name, IPv4, a bare IPv6 address, or * for every interface)."""
    if not isinstance(host, str):
        return False
    if HOST_NAME.fullmatch(host) or (listen and host == "*"):
        return True
    if listen:
        return is_ipv6(host)
    return host.startswith("[") and host.endswith("]") and is_ipv6(host[1:-1])


def mac(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The client's proof that it holds the token: HMAC-SHA256 over both nonces (the token never
    travels)."""
    return hmac.new(token.encode(), MAC_CONTEXT + server_nonce + client_nonce, hashlib.sha256).digest()


def proof(secret: bytes, server_nonce: bytes) -> bytes:
    """A resuming client's proof that it holds its session's secret."""
    return hmac.new(secret, MAC_CONTEXT + b"resume" + server_nonce, hashlib.sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two secrets or MACs."""
    return hmac.compare_digest(a, b)


@functools.lru_cache(maxsize=4)
def curve_keys(token: str) -> tuple[bytes, bytes]:
    """The server's CurveZMQ key pair (public, secret; Z85), derived from the token: a server with a
    token encrypts its connections, and a peer that does not hold the token cannot even finish
    ZeroMQ's handshake (so it can send the server no message at all). Clients use a fresh key pair per
    connection.

    The secret is scrypt of the token (N 2^15, r 8, p 1: 32 MiB and a noticeable fraction of a second
    per guess), not one hash: a client's first handshake message, captured on the network, lets a
    token be checked offline, and a cheap derivation let guesses run at billions a second."""
    import zmq
    import zmq.utils.z85

    salt = MAC_CONTEXT + b"curve"
    key = hashlib.scrypt(token.encode(), salt=salt, n=2**15, r=8, p=1, maxmem=2**26, dklen=32)
    secret = zmq.utils.z85.encode(key)
    return zmq.curve_public(secret), secret


# ---------------------------------------------------------------------- the model's I/O spec
def spec_of(info: Mapping[str, Any]) -> dict[str, Any]:
    """The observation part of a controller's `describe` info: image keys, proprioception key and size
    (what requests are checked against)."""
    return {
        "image_keys": list(info.get("image_keys") or []),
        "proprio_key": info.get("proprio_key"),
        "proprio_dim": int(info.get("proprio_dim") or 0),
    }


def check_observation(where: str, obs: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> None:
    """One observation step against the spec: exactly the model's keys, images (H, W, 3) uint8,
    proprioception (proprio_dim,) finite float. A controller without a spec (random actions) takes
    any arrays."""
    images, proprio = spec.get("image_keys") or [], spec.get("proprio_key")
    if not images and not proprio:
        return
    wanted = set(images) | ({proprio} if proprio else set())
    if set(obs) != wanted:
        missing, extra = sorted(wanted - set(obs)), sorted(set(obs) - wanted)
        raise ProtocolError(
            f"{where}: keys differ from the model's: "
            + ", ".join(
                ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            )
        )
    for key in images:
        a = obs[key]
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or 0 in a.shape:
            raise ProtocolError(f"{where}: {key!r} must be an (H, W, 3) uint8 image, got {a.shape} {a.dtype}")
    if proprio:
        a = obs[proprio]
        if a.shape != (spec["proprio_dim"],) or a.dtype.kind != "f":
            raise ProtocolError(
                f"{where}: {proprio!r} must be ({spec['proprio_dim']},) float, got {a.shape} {a.dtype}"
            )
        if not np.all(np.isfinite(a)):
            raise ProtocolError(f"{where}: {proprio!r} holds non-finite values")


# ---------------------------------------------------------------------- requests and replies
def pack_request(
    sid: bytes,
    seq: int,
    sent: float,
    expires: float,
    steps: Sequence[Mapping[str, np.ndarray]],
    actions: Sequence[np.ndarray],
    previous: np.ndarray | None,
    frozen: int,
    guide: bool = True,
) -> list[Any]:
    """An `infer` message: observation steps oldest first ("o<i>/<key>"), the actions between them
    ("a<i>"), the committed previous chunk ("previous"), how many of it are `frozen` and whether it
    `guide`s the new chunk (`ChunkController.chunk_from`)."""
    arrays: dict[str, Any] = {}
    for i, step in enumerate(steps):
        for k, v in step.items():
            arrays[f"o{i}/{k}"] = v
    for i, a in enumerate(actions):
        arrays[f"a{i}"] = np.asarray(a, np.float64)
    if previous is not None and len(previous):
        arrays["previous"] = np.asarray(previous, np.float32)
    fields = {"sid": sid, "seq": seq, "sent": sent, "expires": expires, "steps": len(steps)}
    fields.update(actions=len(actions), frozen=int(frozen) if previous is not None else 0, guide=bool(guide))
    return encode("infer", fields, arrays)


@dataclass(frozen=True)
class InferRequest:
    """A checked `infer` message."""

    seq: int
    sent: float
    expires: float
    steps: list[dict[str, np.ndarray]]
    actions: list[np.ndarray]
    previous: np.ndarray | None
    frozen: int
    guide: bool = True


def _index(text: str) -> bool:
    """An array name's index: ASCII digits only (str.isdigit() takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()


def unpack_request(
    msg: Message, spec: Mapping[str, Any], window: int, action_dim: int | None
) -> InferRequest:
    """Check an `infer` message against the model: step count within its window, each step's keys,
    dtypes and shapes, actions (action_dim,) finite, the previous chunk (n, action_dim) finite with
    0 <= frozen <= n."""
    seq = msg.get("seq", int)
    n, n_act = msg.get("steps", int), msg.get("actions", int)
    if not 1 <= n <= window:
        raise ProtocolError(f"infer {seq}: {n} observation steps; the model takes 1..{window}")
    if n_act != n - 1:
        raise ProtocolError(f"infer {seq}: {n_act} actions between {n} steps (must be {n - 1})")
    steps: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    actions: list[np.ndarray | None] = [None] * n_act
    previous = None
    for name, a in msg.arrays.items():
        if name == "previous":
            previous = a
        elif name.startswith("o") and "/" in name and _index(name[1 : name.index("/")]):
            i = int(name[1 : name.index("/")])
            if i >= n:
                raise ProtocolError(f"infer {seq}: array {name!r:.60} is beyond the {n} steps")
            steps[i][name[name.index("/") + 1 :]] = a
        elif name.startswith("a") and _index(name[1:]) and int(name[1:]) < n_act:
            actions[int(name[1:])] = a
        else:
            raise ProtocolError(f"infer {seq}: unexpected array {name!r:.60}")
    for i, step in enumerate(steps):
        check_observation(f"infer {seq} step {i}", step, spec)
    dim = action_dim
    for i, a in enumerate(actions):
        if a is None:
            raise ProtocolError(f"infer {seq}: action a{i} is missing")
        if a.ndim != 1 or (dim is not None and a.shape != (dim,)) or a.dtype.kind != "f":
            raise ProtocolError(f"infer {seq}: action a{i} must be ({dim},) float, got {a.shape} {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ProtocolError(f"infer {seq}: action a{i} holds non-finite values")
    frozen = msg.get("frozen", int)
    guide = msg.get("guide", bool, True)  # (a client of before the field sent previous to guide only)
    if previous is not None:
        if previous.ndim != 2 or (dim is not None and previous.shape[1] != dim) or previous.dtype.kind != "f":
            raise ProtocolError(
                f"infer {seq}: previous chunk must be (n, {dim}) float, got {previous.shape} {previous.dtype}"
            )
        if not np.all(np.isfinite(previous)):
            raise ProtocolError(f"infer {seq}: previous chunk holds non-finite values")
    if not 0 <= frozen <= (0 if previous is None else len(previous)):
        raise ProtocolError(
            f"infer {seq}: frozen {frozen} outside 0..{0 if previous is None else len(previous)}"
        )
    return InferRequest(
        seq,
        msg.number("sent"),
        msg.number("expires"),
        steps,
        list(actions),
        previous,
        frozen,  # type: ignore[arg-type]
        guide,
    )


# ---------------------------------------------------------------------- clocks
class ClockSync:
    """The server's clock offset and the network delay, from round trips (NTP's estimate): a reply to
    a message sent at client time t0 and received at t3, which the server received at s1 and answered
    at s2, gives delay = (t3 - t0) - (s2 - s1) and offset = ((s1 - t0) + (s2 - t3)) / 2 (server minus
    client). The estimate is the offset of the round trip with the least delay among the last
    `window` (the one least disturbed by queueing), each delay counted with what the clocks may have
    drifted apart since (`MAX_DRIFT` per second of its age, NTP's dispersion), so a fresh round trip
    takes over from an old one a little faster. Impossible times (not finite, a reply before its
    request, a server that answered before it received) are no round trip: `plausible`."""

    MAX_DRIFT = 500e-6  # s/s: the most two machines' monotonic clocks drift apart (crystal tolerance)

    def __init__(self, window: int = 32) -> None:
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=window)  # (delay, offset, t3)

    @staticmethod
    def plausible(t0: float, s1: float, s2: float, t3: float) -> bool:
        """Whether four times can be one round trip (one NaN or 1e300 reply held the estimate for good)."""
        times = (t0, s1, s2, t3)
        return (
            all(isinstance(t, float) and math.isfinite(t) for t in times)
            and t0 <= t3
            and s1 <= s2
            and (
                (s2 - s1) <= (t3 - t0) + 1e-3  # served longer than the round trip took: another clock's times
            )
        )

    def add(self, t0: float, s1: float, s2: float, t3: float) -> tuple[float, float] | None:
        """Take a round trip; None (and nothing taken) when its times cannot be one."""
        if not self.plausible(t0, s1, s2, t3):
            return None
        delay = max(0.0, (t3 - t0) - (s2 - s1))
        offset = ((s1 - t0) + (s2 - t3)) / 2
        self.samples.append((delay, offset, t3))
        return delay, offset

    def _best(self) -> tuple[float, float, float] | None:
        if not self.samples:
            return None
        now = max(s[2] for s in self.samples)
        return min(self.samples, key=lambda s: s[0] + 2 * self.MAX_DRIFT * (now - s[2]))

    @property
    def known(self) -> bool:
        return bool(self.samples)

    @property
    def offset(self) -> float:
        """Server clock minus client clock (0 before any round trip)."""
        best = self._best()
        return best[1] if best else 0.0

    @property
    def delay(self) -> float:
        """The network round trip of the estimate (0 before any)."""
        best = self._best()
        return best[0] if best else 0.0

    def to_server(self, t: float) -> float:
        return t + self.offset
