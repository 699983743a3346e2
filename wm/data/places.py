"""Where stores are written and how they are put in place: a new store or a rewrite is built
beside its destination and moved in with one rename (`move_into_place`, `place_new`); what a killed
process left beside a store is put back or removed (`restore_replaced`, `finish_swap`); a destination
that is a source, a user's folder, or open in a writer is refused before any work
(`check_destination`); and the writer lock (`WriterLock`) that keeps one writer to a store."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from wm.data.errors import NotAStoreError, StoreBusyError
from wm.locks import PathLock, alive, remove_left_by_dead


def check_writable(path: Path) -> None:
    """Refuse (PermissionError, one line) a store or folder this process cannot write to, before any
    work: a read-only filesystem, or no permission (a writer failed at its first flush)."""
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(
            f"{path}: cannot write here (a read-only filesystem, or no permission); write to another path"
        )


def move_into_place(built: Path, dst: Path) -> None:
    """Put `built` (a store or dataset written beside `dst`) at `dst`, replacing what is there (a folder
    or a zip file; through a symbolic link, where it points: the link is kept). A folder is replaced under
    its writer lock: a store a writer has open (wm-collect, wm-deploy record=) is refused (StoreBusyError)
    and `built` removed, however long ago the replacing began. What is replaced is renamed aside first
    and deleted after `built` is in place: deleting it in place took seconds for a large store, and a kill
    then left `dst` half deleted and `built` in a hidden folder the next run removed. The two trade places
    in one atomic step (`exchange`), so a kill leaves `dst` whole, old or new. Where the filesystem cannot
    exchange, it is two renames, and a kill between them leaves no `dst`: the next open, create or
    conversion of `dst` puts the old copy back (`restore_replaced`)."""
    dst = dst.resolve()
    lock = None
    try:
        if dst.is_dir():
            lock = WriterLock(dst)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    old = None
    try:
        if not dst.exists():
            os.replace(built, dst)
        elif exchange(built, dst):
            old = built  # (which now holds what was at dst)
        else:
            old = beside(dst, "replaced")
            os.replace(dst, old)
            os.replace(built, dst)
    finally:
        if lock is not None:
            lock.release()
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h


def place_new(built: Path, dst: Path, taken: str) -> None:
    """Rename `built` to `dst` only where nothing is at `dst`, in one step (renameat2(RENAME_NOREPLACE);
    where the system has none, a rename, which does not replace a folder that holds anything): else
    FileExistsError(`taken`), `built` removed. A check then a rename let a second process's store
    replace the first's between the two."""
    renameat2, at_cwd = _renameat2(), -100  # AT_FDCWD: the paths are taken as they are
    err = 0
    if renameat2 is not None:
        if renameat2(at_cwd, os.fsencode(built), at_cwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
    if renameat2 is None or err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        try:
            if not dst.exists():
                os.rename(built, dst)
                return
            err = errno.EEXIST
        except OSError as e:
            err = e.errno or 0
    shutil.rmtree(built, ignore_errors=True)
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(taken)
    raise OSError(err, f"cannot rename {built} to {dst}: {os.strerror(err)}")


def exchange(a: Path, b: Path) -> bool:
    """Swap what is at `a` and at `b` (folders or files, either kind) in one atomic step: Linux's
    renameat2(RENAME_EXCHANGE). False, and nothing changed, where the system or filesystem has no such
    step (another OS, an older C library or kernel, a filesystem without it); other failures raise."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: the paths are taken as they are
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


@functools.cache
def _renameat2() -> Any:
    """The C library's renameat2, typed once; None where the C library has none."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def beside(dst: Path, suffix: str) -> Path:
    """Where to write what replaces `dst` (through a symbolic link: beside where it points, so the rename
    into place stays on one filesystem): a hidden sibling named after `dst` and this process, so two
    conversions to one destination never write (or clear) each other's work; the last to finish is
    what `dst` holds. What dead processes left there (a kill -9) is removed; first, where `dst` is gone
    and a dead process's `move_into_place` had renamed it aside (killed between its two renames), the
    old copy is put back."""
    target = dst.resolve()
    restore_replaced(target)
    mine = target.with_name(f".{dst.name}.{suffix}.{os.getpid()}")
    # (with what `DemoStore.create` builds beside a store that is being written: `<name>.wm-create.<pid>`,
    # `<name>.wm-create` before)
    left = re.compile(re.escape(f".{dst.name}.{suffix}.") + r"(?P<pid>\d+)(\.wm-create(\.\d+)?)?")
    remove_left_by_dead(target.parent, left)
    return mine


def restore_replaced(path: Path) -> None:
    """Where `path` is gone because a `move_into_place` that had renamed it aside was killed before it
    renamed the new copy in (a filesystem without `exchange`), put the old copy back."""
    if path.exists() or not path.parent.is_dir():
        return
    aside = re.compile(re.escape(f".{path.name}.replaced.") + r"(?P<pid>\d+)")
    for left in sorted(path.parent.iterdir()):
        m = aside.fullmatch(left.name)
        if m is not None and not alive(int(m.group("pid"))):
            rename_if_there(left, path)
            return


ZARR_META = ("zarr.json", ".zgroup", ".zarray")  # what makes a folder a zarr node (v3, v2)
# zarr's LocalStore writes each file to "<name>.<uuid hex>.partial" and renames it into place: a writer
# killed in between leaves one, the store's own (opening for writing deletes it), not a user's file
ZARR_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial")


def _zarr_node(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ZARR_META)


def store_around(path: str | os.PathLike) -> Path | None:
    """The zarr store (or a node of one) that `path` is, or is inside; None when neither. Anything
    written inside a store is lost when the store is rewritten (`wm-info drop_episodes`) or replaced."""
    for p in (Path(path).resolve(), *Path(path).resolve().parents):
        if _zarr_node(p):
            return p
    return None


def foreign_entries(path: Path) -> list[str]:
    """The names in the store folder `path` that are not part of the store (a run's checkpoints put in
    it, a dataset written inside it): a rewrite of the store would delete them."""
    own = (*ZARR_META, ".zattrs", ".zmetadata")
    return sorted(
        e.name
        for e in path.iterdir()
        if e.name not in own and not _zarr_node(e) and not ZARR_PARTIAL.fullmatch(e.name)
    )


def refuse_foreign_entries(path: Path, doing: str) -> None:
    """Refuse (ValueError, one line) to replace or rewrite the store folder `path` (`doing` it, e.g. "the
    rewrite") while it holds `foreign_entries`: they would be deleted without a word."""
    foreign = foreign_entries(path) if path.is_dir() else []
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{path}: holds files that are not the store's ({listed}); {doing} would delete them: "
            "move them out of the store first"
        )


def replaceable(path: Path) -> bool:
    """What `create(overwrite=True)` (and a converter's overwrite) may delete: an empty folder or a zarr
    store (even a damaged one; a zip store), never another file or a folder of anything else (a user's
    data given as the path by mistake)."""
    if not path.is_dir():
        return path.suffix == ".zip" and zipfile.is_zipfile(path)
    return not any(path.iterdir()) or (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def check_not_a_source(dst: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> None:
    """Refuse (ValueError, one line) to write a new store at a path that is one of the stores it is made
    from: `create(overwrite=True)` would delete the source before it is read."""
    target = Path(dst).resolve()
    for src in sources:
        if Path(src).resolve() == target:
            raise ValueError(f"{dst}: is also a source of this store; write the result to another path")


def check_destination(
    dst: Path,
    overwrite: bool,
    sources: Iterable[str | os.PathLike],
    may_replace: Callable[[Path], bool] = replaceable,
    not_replaceable: str = "exists and is not a store; not replacing it (choose another dst)",
) -> None:
    """Refuse, in one line and before any work, a destination a converter must not write to: one that
    exists (without `overwrite`), that `may_replace` says is not its kind of output (a user's folder:
    `not_replaceable` says so), that is a source or holds one (replacing it would delete the source), that
    a writer has open, or a zip file where a store is written (`may_replace` is `replaceable`: zip stores
    are read-only)."""
    if may_replace is replaceable and dst.suffix == ".zip":
        raise NotAStoreError(f"{dst}: zip stores are read-only; write a directory store (and zip it after)")
    target = dst.resolve()
    for src in sources:
        s = Path(src).resolve()
        if s == target or target in s.parents:
            raise ValueError(f"{dst}: is or holds the source {src}; write the result to another path")
        if s in target.parents:  # a rewrite of the source (wm-info drop_episodes) would delete it
            raise ValueError(f"{dst}: is inside the source {src}; write the result to another path")
    if not dst.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{dst}: already exists; give overwrite=true to replace it")
    if not may_replace(dst):
        raise FileExistsError(f"{dst}: {not_replaceable}")
    if may_replace is replaceable:
        refuse_foreign_entries(dst, "overwrite=true")
    if dst.is_dir():  # nobody may be writing to the store this replaces
        WriterLock(dst).release()


class WriterLock(PathLock):
    """The store's writer lock: an exclusive advisory flock on the store itself (its directory, or its zip
    file), held by one store opened for writing, or one rewrite, at a time, in any process; released by
    `release()` or when the process ends, however it ends. Readers take none: commits are atomic for
    them. Opening for writing repairs what a crashed writer left, which would truncate a live writer's
    steps: so a second writer is refused, in one line."""

    def __init__(self, path: Path) -> None:
        def busy() -> StoreBusyError:
            return StoreBusyError(
                f"{path}: another writer has this store open (wm-collect, wm-deploy record=, or a DemoStore "
                "opened with mode='a'); wait for it to finish, or write to another store"
            )

        def unguarded(e: OSError) -> None:  # a filesystem without locks: write, unguarded
            warnings.warn(
                f"{path}: this filesystem cannot lock the store ({e}); a second writer would not be refused: "
                "write to it from one process at a time",
                stacklevel=5,  # past this, PathLock.__init__, WriterLock.__init__ and its caller
            )

        super().__init__(path, busy, unguarded)


def swap_paths(path: Path) -> tuple[Path, Path]:
    """(new store written beside `path`, old store moved aside) of a crash-safe rewrite (wm.data.ops)."""
    return path.with_name(path.name + ".wm-new"), path.with_name(path.name + ".wm-old")


def finish_swap(path: Path) -> None:
    """Complete a `keep_episodes` swap that a crash interrupted between its two renames, and remove
    what it left beside the store. Safe while a live rewrite makes the same moves: every step is one
    rename, and a step another process made first is skipped."""
    tmp, old = swap_paths(path)
    if not path.exists() and old.exists():
        try:
            rename_if_there(tmp if tmp.exists() else old, path)
        except OSError:
            if not path.exists():  # else a live rewrite put the new store in place meanwhile
                raise
    with contextlib.suppress(OSError):  # leftovers: a reader that cannot remove them still reads
        if path.exists() and old.exists():
            discard_tree(old, path)
        for trash in path.parent.glob(f"{glob.escape(path.name)}.*{_TRASH}"):
            pid = trash.name[len(path.name) + 1 : -len(_TRASH)]
            if pid.isdigit() and not alive(int(pid)):
                discard_tree(trash, path)  # a removal its process did not live to finish


_TRASH = ".wm-trash"


def discard_tree(path: Path, store: Path) -> None:
    """Remove the directory `path` (an old copy of the store at `store`), even while another process
    removes it too: it is first renamed to a name of this process's own beside the store (one atomic
    step, which only one process wins), so no reader ever finds it half removed, and no two processes
    delete the same files."""
    trash = store.with_name(f"{store.name}.{os.getpid()}{_TRASH}")
    if trash.exists():  # this process's earlier removal, left unfinished
        shutil.rmtree(trash, ignore_errors=True)
    if rename_if_there(path, trash):
        shutil.rmtree(trash, ignore_errors=True)


def rename_if_there(src: Path, dst: Path) -> bool:
    """`os.replace(src, dst)`; False when `src` was already gone (another process moved it)."""
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        if src.exists():
            raise
        return False
    return True
