"""A foreign (ctypes) call that a signal interrupts where Python cannot raise its handler's exception:
while ctypes converts the call's arguments (as PyOpenGL's EGL calls in a MuJoCo renderer do). ctypes
turns what the handler raised into `ctypes.ArgumentError("argument 1: KeyboardInterrupt: ")`."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable


def interrupted_foreign_call(signum: int) -> Callable[[], int]:
    """A call of libc's `abs` during whose argument conversion the process receives `signum`."""

    class Tripping:
        @classmethod
        def from_param(cls, value: int) -> ctypes.c_int:
            os.kill(os.getpid(), signum)
            total = 0
            for i in range(100):  # bytecode, where the handler runs: inside ctypes' conversion
                total += i
            return ctypes.c_int(value)

    call = ctypes.CDLL(None).abs
    call.argtypes = [Tripping]
    return lambda: call(-3)
