"""One process at a time: an advisory file lock for work two processes must not do at once (two
`wm-train` runs, or every DDP rank, building the same cache or default autoencoder); and what a
process that died left behind: files named after their writer's pid (`left_by_dead`)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
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


class BusyError(RuntimeError):
    """Work a lock guards is being done by another process."""


class PathLock:
    """An exclusive advisory flock on `path` itself (a folder or a file; nothing is written), held until
    `release()` or the end of the process, however it ends. When another process holds it, `busy()` is
    raised at once. On a filesystem without locks (some NFS / FUSE mounts) `unlocked(error)` is told, and
    the holder goes on unguarded. A folder's lock on NFS is granted by each client alone (Linux's NFS
    client has no flock of its own for folders): it guards against processes of this machine only."""

    def __init__(
        self, path: Path, busy: Callable[[], Exception], unlocked: Callable[[OSError], Any] | None = None
    ) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise busy() from None
        except OSError as e:
            if unlocked is not None:
                unlocked(e)

    def release(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None  # None too when os.open failed in __init__
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock

    def __del__(self) -> None:
        self.release()


@contextmanager
def held(path: Path, busy: str) -> Iterator[None]:
    """A `PathLock` on `path` for the block; BusyError(busy) at once when another process holds it."""
    lock = PathLock(path, lambda: BusyError(busy))
    try:
        yield
    finally:
        lock.release()


def alive(pid: int) -> bool:
    """Whether process `pid` is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_left_by_dead(folder: Path, pattern: re.Pattern[str]) -> None:
    """Remove the files and folders in `folder` whose name `pattern` matches with a `pid` group naming
    a process that is no longer running (its temporary files: a kill -9 leaves them); others stay."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        m = pattern.fullmatch(path.name)
        if m is None or alive(int(m.group("pid"))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
