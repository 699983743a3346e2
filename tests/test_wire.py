"""The policy server's wire format (`robots.runtime.wire`): exact round trips, and every malformed
message refused with one line before any array is made."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from robots.runtime import wire

SPEC = {"image_keys": ["cam"], "proprio_key": "state", "proprio_dim": 3}
LIMIT = 1 << 24


def request(steps=2, **over):
    rng = np.random.default_rng(0)
    obs = [
        {"cam": rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "state": rng.normal(size=3)}
        for _ in range(steps)
    ]
    acts = [rng.normal(size=2) for _ in range(steps - 1)]
    args = dict(sid=b"s" * 16, seq=7, sent=1.5, expires=3.5, steps=obs, actions=acts, previous=None, frozen=0)
    args.update(over)
    return obs, acts, wire.pack_request(**args)


def frames_bytes(frames):
    return [bytes(f) for f in frames]


def test_a_request_round_trips_bit_exact():
    prev = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    obs, acts, frames = request(previous=prev, frozen=2)
    msg = wire.decode(frames_bytes(frames), LIMIT)
    req = wire.unpack_request(msg, SPEC, window=2, action_dim=2)
    assert (req.seq, req.sent, req.expires, req.frozen) == (7, 1.5, 3.5, 2)
    for got, want in zip(req.steps, obs, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes()
    for got, want in zip(req.actions, acts, strict=True):
        assert got.tobytes() == want.tobytes()
    assert req.previous.tobytes() == prev.tobytes() and req.guide


def test_an_unguided_schedule_says_so_and_a_request_without_the_field_guides():
    """`guide` tells a served planner the schedule is a warm start only (replace stitching), not to be
    continued; a client from before the field sent previous only for inpainting."""
    prev = np.zeros((4, 2), np.float32)
    msg = wire.decode(frames_bytes(request(previous=prev, guide=False)[2]), LIMIT)
    assert not wire.unpack_request(msg, SPEC, window=2, action_dim=2).guide
    del msg.fields["guide"]
    assert wire.unpack_request(msg, SPEC, window=2, action_dim=2).guide
    msg.fields["guide"] = 1
    with pytest.raises(wire.ProtocolError, match="field 'guide' must be bool, got int"):
        wire.unpack_request(msg, SPEC, window=2, action_dim=2)


def test_a_chunk_round_trips_bit_exact_into_read_only_arrays():
    chunk = np.random.default_rng(2).normal(size=(16, 7))
    raw = frames_bytes(wire.encode("chunk", {"seq": 3}, {"chunk": chunk}))
    msg = wire.decode(raw, LIMIT)
    assert msg.kind == "chunk" and msg.get("seq", int) == 3
    got = msg.arrays["chunk"]
    assert got.dtype == np.float64 and got.tobytes() == chunk.tobytes()
    assert not got.flags.writeable  # a view on the received frame, which nothing may change


def header(**fields):
    h = {"v": wire.VERSION, "t": "infer", "arrays": []}
    h.update(fields)
    return msgpack.packb(h, use_bin_type=True)


BAD = {
    "empty message": [],
    "header is not valid msgpack": [b"\xc1\xff\x00garbage"],
    "header must be a map": [msgpack.packb([1, 2, 3])],
    "protocol version 2; this side speaks version 1": [header(v=2)],
    "field 't' (the message type) is missing": [header(t=None)],
    "header describes 1 arrays but 0 buffers follow": [header(arrays=[["x", "<f8", [2]]])],
    "has dtype '|O'": [header(arrays=[["x", "|O", [1]]]), b"\x00" * 8],
    "has dtype '<c16'": [header(arrays=[["x", "<c16", [1]]]), b"\x00" * 16],
    "has shape [-1]": [header(arrays=[["x", "<f8", [-1]]]), b""],
    "has shape [1, 1, 1, 1, 1]": [header(arrays=[["x", "<f8", [1, 1, 1, 1, 1]]]), b"\x00" * 8],
    "needs 16 bytes, its buffer has 15": [header(arrays=[["x", "<f8", [2]]]), b"\x00" * 15],  # truncated
    "needs 16 bytes, its buffer has 17": [header(arrays=[["x", "<f8", [2]]]), b"\x00" * 17],
    "array 'x' appears twice": [header(arrays=[["x", "|u1", [1]], ["x", "|u1", [1]]]), b"\x01", b"\x02"],
    "exceeds the limit of 1024": [header(), b"\x00" * 2000],  # oversized
    "an array description must be [name, dtype, shape]": [header(arrays=[{"x": 1}]), b""],
    # echoed in every error about the message and in the server's log: one forged several log lines
    "the message type) must be a short name, got 'x\\nsession": [
        header(t="x\nsession 1: closed" + "A" * 9000)
    ],
}


@pytest.mark.parametrize("says", list(BAD))
def test_malformed_messages_are_refused_with_one_line(says):
    limit = 1024 if "limit of 1024" in says else LIMIT
    with pytest.raises(wire.ProtocolError) as e:
        wire.decode(BAD[says], limit)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_what_a_peer_chose_is_quoted_short_in_errors():
    for frames in ([header(v="9" * 9000)], [header(t="infer" * 2000)], [header(t="x\x1b[2J")]):
        with pytest.raises(wire.ProtocolError) as e:
            wire.decode(frames, LIMIT)
        assert len(str(e.value)) < 200 and str(e.value).isprintable(), str(e.value)[:300]


def test_errors_are_made_one_short_printable_line():
    """A controller's exception (einops' and many torch errors span lines) or a peer's words, before a
    log or the operator's screen: one line, control characters out, bounded."""
    text = "Error while processing pattern.\n Input tensor shape: (1, 3).\r\n\x1b[31mred\x1b[0m\tend"
    assert (
        wire.one_line(text) == "Error while processing pattern. Input tensor shape: (1, 3). [31mred [0m end"
    )
    assert wire.one_line("x" * 1000, limit=50) == "x" * 47 + "..."


def test_arrays_in_another_byte_order_or_half_precision_are_sent_as_their_values():
    """An observation read big-endian (a file, a device) or in float16: the local worker takes it, so the
    remote one sends the same values (the wire refused the dtype: submit raised out of the loop)."""
    sent = {
        "be": np.arange(6, dtype=">f8").reshape(2, 3),
        "bi": np.arange(3, dtype=">i4"),
        "half": np.array([0.5, -2.0, 3.25], np.float16),
        "strided": np.arange(12.0)[::3],
    }
    got = wire.decode(frames_bytes(wire.encode("x", {}, sent)), LIMIT).arrays
    assert got["be"].dtype == "<f8" and got["bi"].dtype == "<i4" and got["half"].dtype == "<f4"
    for k, a in sent.items():
        np.testing.assert_array_equal(got[k], a)
    with pytest.raises(wire.ProtocolError, match="dtype complex128 cannot be sent"):
        wire.encode("x", {}, {"c": np.zeros(2, complex)})


def test_an_oversized_header_is_refused_before_it_is_parsed():
    with pytest.raises(wire.ProtocolError, match="header of .* bytes exceeds"):
        wire.decode([b"\x00" * (wire.MAX_HEADER_BYTES + 1)], LIMIT)


CHECKS = {
    "keys differ from the model's: missing ['state']": lambda o, a, p: o[1].pop("state"),
    "unexpected ['extra']": lambda o, a, p: o[1].update(extra=np.zeros(1)),
    "'cam' must be an (H, W, 3) uint8 image, got (6, 8, 3) float64": lambda o, a, p: o[0].update(
        cam=o[0]["cam"].astype(float)
    ),
    "'cam' must be an (H, W, 3) uint8 image, got (6, 8)": lambda o, a, p: o[0].update(
        cam=o[0]["cam"][..., 0]
    ),
    "'state' must be (3,) float, got (4,)": lambda o, a, p: o[0].update(state=np.zeros(4)),
    "'state' holds non-finite values": lambda o, a, p: o[0]["state"].__setitem__(0, np.nan),
    "action a0 must be (2,) float, got (3,)": lambda o, a, p: a.__setitem__(0, np.zeros(3)),
    "action a0 holds non-finite values": lambda o, a, p: a[0].__setitem__(1, np.inf),
    "previous chunk must be (n, 2) float": lambda o, a, p: p.update(previous=np.zeros((4, 3))),
    "previous chunk holds non-finite values": lambda o, a, p: p.update(previous=np.full((4, 2), np.nan)),
    "frozen 5 outside 0..4": lambda o, a, p: p.update(previous=np.zeros((4, 2)), frozen=5),
}


@pytest.mark.parametrize("says", list(CHECKS))
def test_requests_are_checked_against_the_models_io_spec(says):
    rng = np.random.default_rng(0)
    obs = [
        {"cam": rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "state": rng.normal(size=3)}
        for _ in range(2)
    ]
    acts = [rng.normal(size=2)]
    extra: dict = {"previous": None, "frozen": 0}
    CHECKS[says](obs, acts, extra)
    frames = wire.pack_request(b"s" * 16, 1, 0.0, 1.0, obs, acts, **extra)
    msg = wire.decode(frames_bytes(frames), LIMIT)
    with pytest.raises(wire.ProtocolError) as e:
        wire.unpack_request(msg, SPEC, window=2, action_dim=2)
    assert says in str(e.value) and str(e.value).startswith("infer 1")


@pytest.mark.parametrize("name", ["a\u00b2", "o\u00b2/state", "a\u0661"])
def test_array_names_with_digits_beyond_ascii_are_a_protocol_error(name):
    """str.isdigit() takes "²" and Arabic-Indic digits, int() refuses the first: a bare ValueError, which
    the server answered as an internal error without the request's seq (the client waited it out)."""
    header = {"sid": b"s" * 16, "seq": 1, "sent": 0.0, "expires": 1.0, "steps": 2, "actions": 1, "frozen": 0}
    arrays = {"o0/state": np.zeros(3), "o1/state": np.zeros(3), name: np.zeros(2)}
    msg = wire.decode(frames_bytes(wire.encode("infer", header, arrays)), LIMIT)
    with pytest.raises(wire.ProtocolError, match=r"^infer 1: unexpected array"):
        wire.unpack_request(msg, SPEC, window=2, action_dim=2)


def test_more_steps_than_the_models_window_are_refused():
    _, _, frames = request(steps=3)
    with pytest.raises(wire.ProtocolError, match="3 observation steps; the model takes 1..2"):
        wire.unpack_request(wire.decode(frames_bytes(frames), LIMIT), SPEC, window=2, action_dim=2)


def test_header_fields_are_typed():
    msg = wire.decode([header(seq="7", sent=float("nan"))], LIMIT)
    with pytest.raises(wire.ProtocolError, match="field 'seq' must be int, got str"):
        msg.get("seq", int)
    with pytest.raises(wire.ProtocolError, match="field 'sent' must be finite"):
        msg.number("sent")
    with pytest.raises(wire.ProtocolError, match="field 'sid' is missing"):
        msg.get("sid", bytes)
    with pytest.raises(wire.ProtocolError, match="must be int, got bool"):
        wire.decode([header(seq=True)], LIMIT).get("seq", int)


def test_the_token_is_proved_not_sent():
    a, b = b"a" * 16, b"b" * 16
    proof = wire.mac("correct horse", a, b)
    assert b"correct horse" not in proof and len(proof) == 32
    assert wire.same(proof, wire.mac("correct horse", a, b))
    assert not wire.same(proof, wire.mac("wrong horse!", a, b))
    assert not wire.same(proof, wire.mac("correct horse", b, a))  # bound to both nonces


def test_the_servers_key_is_scrypt_of_the_token():
    """The server's CurveZMQ secret is the protocol's: a client of another implementation derives the
    same. One HMAC made a token guessable offline from one captured handshake message at GPU speed;
    scrypt (N 2^15, r 8) makes each guess cost 32 MiB."""
    import hashlib

    pytest.importorskip("zmq")
    import zmq.utils.z85

    public, secret = wire.curve_keys("correct horse")
    salt = wire.MAC_CONTEXT + b"curve"
    key = hashlib.scrypt(b"correct horse", salt=salt, n=2**15, r=8, p=1, maxmem=2**26, dklen=32)
    assert secret == zmq.utils.z85.encode(key) and public == zmq.curve_public(secret)
    assert wire.curve_keys("correct horsf")[1] != secret


def test_clock_sync_recovers_an_offset_and_the_network_delay():
    """A server clock 1000 s ahead, 2 ms each way, 5 ms of processing; one round trip queued 40 ms."""
    sync = wire.ClockSync()
    offset, one_way, work = 1000.0, 0.002, 0.005
    for i, queued in enumerate([0.0, 0.040, 0.0, 0.010]):
        t0 = 10.0 + i
        s1 = t0 + offset + one_way + queued  # queued on the way up: an asymmetric round trip
        s2 = s1 + work
        t3 = s2 - offset + one_way
        sync.add(t0, s1, s2, t3)
    assert sync.offset == pytest.approx(offset, abs=1e-9)  # from a round trip without queueing
    assert sync.delay == pytest.approx(2 * one_way, abs=1e-9)
    assert sync.to_server(5.0) == pytest.approx(1005.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300, -1e300])
def test_a_round_trip_with_impossible_times_is_never_the_clock_estimate(bad):
    """A reply with a NaN (or absurd) server time was taken with its delay clamped to 0, the least of
    all: the estimate was NaN (every request refused: 'expires' must be finite) or 5e299 (none ever
    expired), for as long as it stayed among the last 32 round trips."""
    sync = wire.ClockSync()
    assert sync.add(10.0, 1010.002, 1010.004, 10.006) is not None
    assert sync.add(11.0, bad, 1011.0, 11.006) is None and sync.add(11.0, 1011.0, bad, 11.006) is None
    assert sync.add(12.0, 1012.0, 1012.5, 12.006) is None  # served 0.5 s in a 6 ms round trip
    assert sync.add(13.0, 1013.0, 1013.001, 12.9) is None  # answered before it was asked
    assert len(sync.samples) == 1 and sync.offset == pytest.approx(1000.0, abs=1e-9)


def test_the_clock_estimate_follows_a_server_clock_that_drifts():
    """The least-delay round trip won however old; a server clock drifting away (here 1 %, to show it in
    a few round trips) left the estimate at the first one's offset. Each delay now counts the drift its
    age allows (MAX_DRIFT), so a fresh round trip takes over."""
    sync, rate, one_way = wire.ClockSync(), 1.01, 0.002
    for i, queued in enumerate([0.0, 0.001, 0.001, 0.001]):  # the first is the fastest
        t0 = 100.0 * i
        s1 = rate * (t0 + one_way + queued) + 1e6
        s2 = s1 + 0.001
        t3 = t0 + 2 * one_way + queued + 0.001 / rate
        sync.add(t0, s1, s2, t3)
    true_offset = rate * t3 + 1e6 - t3
    assert abs(sync.offset - true_offset) < 0.01  # the newest round trip's, not 3 s off
