"""Keeping a library from raising its threads to real-time scheduling.

SVT-AV1, the AV1 encoder behind LeRobot's videos (through PyAV), switches the thread that opens an encoder
to SCHED_FIFO at priority 99 when the process runs as root, the usual case in a container, and every
thread it starts inherits that. So a LeRobot export with videos runs dozens of CPU-bound encoder
threads above every normal process and above the control loop of an arm on the same computer (which
runs at `runtime.realtime_priority`, 50 in the benchmarks), and when the encoder was opened on the
calling thread, that thread stays at real-time priority afterwards, as does every process it starts.

`normal_priority()` takes the right to do that away for a block: it lowers the soft RLIMIT_RTPRIO to 0 and
drops CAP_SYS_NICE from the calling thread's effective capabilities (Linux keeps capabilities per thread,
and threads started in the block inherit the reduced set), so the library's request fails (SVT-AV1 ignores
the failure and encodes at normal priority). Both are put back when the block ends: CAP_SYS_NICE stays in
the permitted set, so the calling thread can raise it again. RLIMIT_RTPRIO is per process: a thread of
the same process that asks for real-time scheduling during the block is refused too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
from collections.abc import Iterator

CAP_SYS_NICE = 23  # linux/capability.h
_CAP_VERSION_3 = 0x20080522  # two 32-bit words per set


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def _libc() -> ctypes.CDLL | None:
    """The C library if it has capget / capset (Linux), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "capget") and hasattr(libc, "capset") else None


def _capabilities(libc: ctypes.CDLL) -> ctypes.Array | None:
    """The calling thread's capability sets (two words each), or None where they cannot be read."""
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) != 0:
        return None
    return data


def _set_capabilities(libc: ctypes.CDLL, data: ctypes.Array) -> bool:
    return libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data) == 0


@contextlib.contextmanager
def normal_priority() -> Iterator[None]:
    """Within the block, the calling thread and the threads it starts cannot switch to real-time
    scheduling (SCHED_FIFO / SCHED_RR) or raise a real-time priority; see the module docstring. Where the
    platform has no such controls (not Linux), the block runs unchanged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, hard))
    libc = _libc()
    saved = _capabilities(libc) if libc is not None else None
    dropped = False
    if saved is not None and saved[0].effective & (1 << CAP_SYS_NICE):
        reduced = (_CapData * 2)()
        ctypes.memmove(reduced, saved, ctypes.sizeof(saved))
        reduced[0].effective &= ~(1 << CAP_SYS_NICE)
        dropped = _set_capabilities(libc, reduced)
    try:
        yield
    finally:
        if dropped:
            _set_capabilities(libc, saved)
        resource.setrlimit(resource.RLIMIT_RTPRIO, (soft, hard))
