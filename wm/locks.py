"""One process at a time: an advisory file lock for work two processes must not do at once (two
`wm-train` runs, or every DDP rank, building the same cache or default autoencoder)."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def exclusive(lock: Path, waiting: str, log: Callable[[str], Any]) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (an advisory flock, released when the process ends,
    however it ends); logs `waiting` once when another process holds it, then waits for it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
