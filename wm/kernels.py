"""Kernel choice for inference by measurement on the machine that runs it.

A layer with several ways to compute one thing (PyTorch's own kernel, oneDNN called directly, a
matrix product of unfolded inputs, a bf16 copy of a whole module...) asks `choose(key, candidates,
native=...)` which one to use for an input shape. The first time a key is seen (in this process, and
on this machine: see the cache below) the candidates are calibrated on the call's own input:

1. correctness: every candidate runs once and its output is compared with the native one (relative
   Frobenius error); a candidate that raises, or whose error exceeds its tolerance (`FP32_TOL` for
   fp32 kernels, `BF16_TOL` / `MODULE_BF16_TOL` for bf16 ones, `INT8_TOL` for int8 weights), is
   never chosen. A call whose native output cannot judge them (not finite: a NaN or inf input; empty or
   all zero: any candidate would pass) takes the caller's default unmeasured and leaves nothing cached;
2. timing (`median_times`): `warmup` calls each, then `rounds` interleaved rounds of one call per
   candidate (so a slow spell of a shared machine hits all alike); a candidate's time is its median;
3. decision (`decide`, a pure function of times and errors): the fastest correct candidate, if it
   beats the native one by at least `MARGIN` (10 %); otherwise the native one. PyTorch's native path is
   always a candidate, so a layer is never chosen to be slower than it was measured to be.

Calibration runs without autograd (`torch.no_grad`), only where the caller has autograd off already
(training paths never reach it), only on CPU (on CUDA the callers use PyTorch's kernels), and is
bounded: `key_budget_s` of timing per key (at least 3 rounds), `total_budget_s` per process, after
which new keys take the caller's default without measurement (and are not cached, so a later process
measures them).

Cache. Choices are kept in process and in a JSON file, keyed on the CPU model and its bf16 flags, the
torch version, the number of intra-op threads and the caller's key (the op, its shapes, dtype,
precision and batch). The file is `$WM_KERNEL_CACHE` if set (`off`, `0` or an empty value: no file),
else `$XDG_CACHE_HOME/wm-stack/kernels.json` (default `~/.cache/wm-stack/kernels.json`):

    {"format": 1, "entries": {"<machine>|<key>": {"choice": "onednn", "us": {"native": 51.0, ...},
                              "rel_error": {"onednn": 2e-07, ...}, "rejected": {"name": "why"}}}}

Writes merge with what other processes wrote and replace the file atomically (write a temporary file,
`os.replace`; a failed write removes its temporary file, warns once and keeps choices in the process).
A file that cannot be parsed is ignored with one warning and overwritten by the next write. A process
without a home directory keeps its choices in process (one warning). `WM_KERNELS=native` turns
measurement off: every caller uses its default (PyTorch's kernel in the requested precision), for
comparison and debugging.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wm.precision import cpu_info

MARGIN = 0.10  # a candidate must take at most (1 - MARGIN) x the native time to be chosen
FP32_TOL = 1e-4  # relative error of an fp32 kernel against PyTorch's (summation order only)
BF16_TOL = 2e-2  # of one layer computed in bf16 (inputs and weights rounded: ~0.3-0.8 % typically)
INT8_TOL = 2e-2  # of one layer on int8 weights (per-row scales, bf16 inputs: ~0.8-1 % typically)
MODULE_BF16_TOL = 3e-2  # of a whole network in bf16 (the tests' bound on one call)
CACHE_FORMAT = 1
ENV_CACHE, ENV_MODE = "WM_KERNEL_CACHE", "WM_KERNELS"
MODES = ("measure", "native")


# ----------------------------------------------------------------------------- pure decision rule


def decide(
    times: Mapping[str, float],
    errors: Mapping[str, float],
    native: str,
    tol: Mapping[str, float] | float,
    margin: float = MARGIN,
) -> str:
    """The candidate to use, from median times (s) and relative errors against `native`: the fastest
    candidate whose error is within its tolerance, if its time is at most (1 - margin) x the native
    time; else `native`. Ties go to the name that sorts first (deterministic)."""
    if native not in times:
        raise ValueError(f"the native candidate {native!r} has no time")
    correct = [n for n in times if n != native and _within(errors.get(n), _tol(tol, n))]
    best = min(correct, key=lambda n: (times[n], n), default=None)
    if best is not None and times[best] <= (1.0 - margin) * times[native]:
        return best
    return native


def _tol(tol: Mapping[str, float] | float, name: str) -> float:
    return tol if isinstance(tol, (int, float)) else tol.get(name, FP32_TOL)


def _within(error: float | None, tol: float) -> bool:
    return error is not None and math.isfinite(error) and error <= tol


def rel_error(y: Any, ref: Any) -> float:
    """|y - ref| / |ref| (Frobenius norms); inf when shapes differ or either is not finite, 0 for two
    zero (or empty) tensors. In fp64: an fp32 norm overflows for outputs of magnitude ~1e17 (the
    reference's norm became inf and any candidate measured 0) and underflows for ~1e-20."""
    if not isinstance(y, Tensor) or not isinstance(ref, Tensor) or y.shape != ref.shape:
        return math.inf
    y, ref = y.detach().double(), ref.detach().double()
    if not (torch.isfinite(y).all() and torch.isfinite(ref).all()):
        return math.inf
    diff, norm = (y - ref).norm().item(), ref.norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def checkable(ref: Any) -> bool:
    """Whether a reference output can tell a candidate's error: a non-empty tensor, finite, not all zero.
    A NaN or inf input (a bad observation, a diverged rollout) makes every candidate look wrong, an
    all-zero or empty one every candidate right: neither may decide, nor be remembered, for a shape."""
    return (
        isinstance(ref, Tensor)
        and ref.numel() > 0
        and bool(torch.isfinite(ref).all())
        and bool(ref.detach().any())
    )


def median_times(
    fns: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    budget_s: float | None = None,
) -> dict[str, float]:
    """Median seconds of one call of each function: `warmup` untimed calls each, then `rounds`
    interleaved rounds (stopping early, after at least 3 rounds, once `budget_s` is spent)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    start = clock()
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
        if budget_s is not None and r >= 2 and clock() - start > budget_s:
            break
    return {n: statistics.median(s) for n, s in samples.items()}


Timer = Callable[[Mapping[str, Callable[[], object]]], dict[str, float]]


def calibrate(
    candidates: Mapping[str, Callable[[], Tensor]],
    native: str,
    tol: Mapping[str, float] | float,
    timer: Timer,
    margin: float = MARGIN,
    ref: Tensor | None = None,
) -> dict[str, Any]:
    """Check every candidate against `native` on the same input (`ref`: native's output, if computed
    already), time the correct ones with `timer`, `decide`. Returns the cache record: choice, times (us),
    errors, and why candidates were rejected."""
    ref = candidates[native]() if ref is None else ref
    errors: dict[str, float] = {}
    rejected: dict[str, str] = {}
    runnable = {native: candidates[native]}
    for name, fn in candidates.items():
        if name == native:
            continue
        try:
            err = rel_error(fn(), ref)
        except Exception as e:  # a kernel this build or input does not support is simply not a candidate
            rejected[name] = f"{type(e).__name__}: {e}"[:160]
            continue
        errors[name] = err
        if _within(err, _tol(tol, name)):
            runnable[name] = fn
        else:
            rejected[name] = f"relative error {err:.2e} > {_tol(tol, name):.0e}"
    times = timer(runnable)
    return {
        "choice": decide(times, errors, native, tol, margin),
        "us": {n: round(t * 1e6, 2) for n, t in times.items()},
        "rel_error": {n: float(f"{e:.3g}") for n, e in errors.items()},
        "rejected": rejected,
    }


# ----------------------------------------------------------------------------- the cache


def default_cache_path() -> Path | None:
    """`$WM_KERNEL_CACHE` (off / 0 / empty: None), else the user cache directory's wm-stack/kernels.json
    (None, with a warning, for a process without a home directory: the cache is optional)."""
    env = os.environ.get(ENV_CACHE)
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "none", "false"):
            return None
        try:
            return Path(env).expanduser()
        except RuntimeError as e:  # ~user of no user
            raise ValueError(f"{ENV_CACHE}={env!r}: {e} (give a path, or 'off')") from None
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no $HOME and no passwd entry (a container's arbitrary uid)
            warnings.warn(
                f"no home directory: kernel choices stay in this process (set {ENV_CACHE} to keep them)",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
    return Path(base) / "wm-stack" / "kernels.json"


class KernelCache:
    """Choices by key, in process and (with a `path`) in a JSON file shared by processes; one thread
    at a time (two threads calibrating at a cold start: an entry put while another rebuilt the memory
    copy was lost from it, and the next put raised KeyError out of a model's forward)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mem: dict[str, dict] = {}
        self._mine: set[str] = set()  # the keys this process put
        self._loaded = False
        self._warned: set[str] = set()
        self._lock = threading.RLock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self._mem = {**self._read(), **self._mem}
            return self._mem.get(key)

    def put(self, key: str, record: dict) -> None:
        with self._lock:
            self._put(key, record)

    def _put(self, key: str, record: dict) -> None:
        self.get(key)  # loads the file once
        self._mem[key] = record
        self._mine.add(key)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one writer at a time (a sidecar lock): a write between another's read and replace was lost
            with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                # what other processes wrote meanwhile, newer than this one's copy of it, beside the
                # entries this process put
                merged = {**self._read(), **{k: self._mem[k] for k in self._mine}}
                self._mem = {**self._mem, **merged}
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": CACHE_FORMAT, "entries": merged}, f, indent=0, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:  # a full disk, a directory at the path: no temporary file left behind
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as e:
            message = f"cannot write the kernel cache {self.path} ({e}); choices stay in this process"
            self._warn("write", message)
            self.path = None

    def _read(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            if data.get("format") != CACHE_FORMAT or not all(
                isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("choice"), str)
                for k, v in entries.items()
            ):
                raise ValueError("unexpected content")
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._warn(
                "read",
                f"ignoring the unreadable kernel cache {self.path} ({type(e).__name__}: {e}); kernels are "
                "recalibrated and the file is overwritten",
            )
            return {}

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:  # one warning per cache for reading, one for writing, however many fail
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- the selector


def machine_key() -> str:
    """What a timing depends on besides the op: CPU model and bf16 flags, torch version, threads."""
    model, flags = cpu_info()
    threads = torch.get_num_threads()
    return f"{model}|{','.join(flags) or 'no-bf16'}|torch {torch.__version__}|{threads} threads"


class Choice(str):
    """A kernel's name from `Selector.choose`, and whether a layer may remember it for its shape: False for
    the default taken unmeasured because the call could not check a candidate (a NaN input, an all-zero
    output). A layer that remembered that one ran it for the rest of the process, never measured
    (maybe slower than PyTorch's own kernel, never checked for accuracy)."""

    decided: bool

    def __new__(cls, name: str, decided: bool = True) -> Choice:
        out = super().__new__(cls, name)
        out.decided = decided
        return out


@dataclass
class Selector:
    """Chooses kernels (see the module docstring); `timer` replaces the clock-based timing in tests.
    `log` lists (full key, record, "calibrated" | "cache") for every choice made, for the benchmarks."""

    cache: KernelCache
    mode: str = "measure"
    margin: float = MARGIN
    rounds: int = 5
    warmup: int = 1
    key_budget_s: float = 0.05
    total_budget_s: float = 10.0
    timer: Timer | None = None
    spent_s: float = 0.0
    log: list[tuple[str, dict, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"kernel selection mode must be one of {MODES}, got {self.mode!r}")

    def current_mode(self) -> str:
        """The mode this thread runs in: a `mode()` block's, else the selector's."""
        return _thread_mode() or self.mode

    def choose(
        self,
        key: str,
        candidates: Mapping[str, Callable[[], Tensor]],
        native: str,
        tol: Mapping[str, float] | float = FP32_TOL,
        default: str | None = None,
    ) -> str:
        """The candidate to use for `key` (the caller's op and shapes). `candidates` compute the call at
        hand; `default` (else `native`) is used without measurement (mode "native", budget spent, or a call
        whose native output cannot check a candidate: see `checkable`; then a `Choice` not `decided`, for
        this call only). Callers that remember choices per shape remember only `decided` ones
        (`remember`)."""
        default = default or native
        if self.current_mode() == "native" or len(candidates) < 2:
            return default
        full = f"{machine_key()}|{key}"
        record = self.cache.get(full)
        if record is not None and record["choice"] in candidates:
            choice = record["choice"]
            # The timing holds for the shape; the accuracy was checked on other weights and inputs (another
            # checkpoint's, an earlier training step's): checked again on these before it is used
            if choice != native:
                with torch.no_grad():
                    ref = candidates[native]()
                    if not checkable(ref):  # a NaN input cannot check it: the default, unmeasured
                        return Choice(default, decided=False)
                    try:
                        err = rel_error(candidates[choice](), ref)
                    except Exception as e:  # noqa: BLE001 - as in `calibrate`: not a candidate here
                        here = {**record, "choice": native, "rejected_here": f"{type(e).__name__}: {e}"[:160]}
                        self.log.append((full, here, "failed here"))
                        return native
                if not _within(err, _tol(tol, choice)):
                    here = {**record, "choice": native, "rel_error_here": err}
                    self.log.append((full, here, "inaccurate here"))
                    return native
            self.log.append((full, record, "cache"))
            return choice
        if self.spent_s >= self.total_budget_s:
            return default
        t0 = time.perf_counter()
        timer = self.timer or (
            lambda fns: median_times(fns, self.rounds, self.warmup, budget_s=self.key_budget_s)
        )
        global _calibrating_s, _nested
        _nested += 1
        try:
            with torch.no_grad():
                ref = candidates[native]()
                # a NaN / inf / all-zero output judges no candidate: nothing decided or cached for the shape
                judged = checkable(ref)
                record = calibrate(candidates, native, tol, timer, self.margin, ref) if judged else None
        finally:
            _nested -= 1
        if not _nested:  # a calibration inside another's candidates (layers they run) is in its time
            spent = time.perf_counter() - t0
            self.spent_s += spent
            _calibrating_s += spent
        if record is None:  # not judged: the next call that can check the candidates decides
            return Choice(default, decided=False)
        self.cache.put(full, record)
        self.log.append((full, record, "calibrated"))
        return record["choice"]

    def mark(self) -> tuple[int, float]:
        """Where the selector stands now (choices logged, seconds spent), for `summary(since=...)`."""
        return len(self.log), self.spent_s

    def summary(self, since: tuple[int, float] = (0, 0.0)) -> dict[str, Any]:
        """What this process's inference ran on, for results files: the mode, how many distinct op shapes
        chose a kernel (calibrated here or read from the cache) and how many took each kernel, the
        seconds spent calibrating, and whether the budget ran out (later shapes then took their default
        kernel unmeasured). `since` (a `mark()`): only the choices made and seconds spent after it (one
        job of several in a process)."""
        logged, spent = since
        chosen = {key: record["choice"] for key, record, _ in self.log[logged:]}  # the last choice per key
        counts = Counter(chosen.values())
        return {
            "mode": self.mode,
            "shapes": len(chosen),
            "by_kernel": dict(sorted(counts.items())),
            "calibration_s": round(self.spent_s - spent, 3),
            "budget_exhausted": self.spent_s >= self.total_budget_s,
        }


_selector: Selector | None = None
_generation = 0
_local = threading.local()  # `mode()` blocks: per thread (a validation in one thread left every other
# model of the process in "native" for good, when two blocks overlapped in two threads)
_calibrating_s = 0.0  # every selector's calibration seconds in this process, for `compute_clock`
_nested = 0  # calibrations under way (one's candidates may run layers that calibrate theirs)


def compute_clock() -> float:
    """`time.monotonic()` less the seconds this process has spent calibrating kernels: what inference is
    timed and budgeted on. A shape's one-off calibration at its first call then neither counts as that
    call's compute (wm-eval's planning time per step) nor eats a replan's `seconds` budget."""
    return time.monotonic() - _calibrating_s


def selector() -> Selector:
    """The process's selector, built at first use from `$WM_KERNELS` and `$WM_KERNEL_CACHE`."""
    global _selector
    if _selector is None:
        mode = os.environ.get(ENV_MODE, "measure").strip().lower() or "measure"
        if mode not in MODES:
            raise ValueError(f"{ENV_MODE} must be one of {MODES}, got {os.environ[ENV_MODE]!r}")
        _selector = Selector(KernelCache(default_cache_path()), mode=mode)
    return _selector


def set_selector(new: Selector | None) -> None:
    """Replace the process's selector (None: rebuild from the environment at next use); layers forget
    the choices they memoized."""
    global _selector, _generation
    _selector, _generation = new, _generation + 1


@contextlib.contextmanager
def using(new: Selector) -> Iterator[Selector]:
    """Use `new` inside the block, then restore the previous selector."""
    old = _selector
    set_selector(new)
    try:
        yield new
    finally:
        set_selector(old)


def _thread_mode() -> str | None:
    """The mode a `mode()` block set in this thread (None: none)."""
    return getattr(_local, "mode", None)


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Run the block, in this thread, with the selector's mode set to `name` ("native" or "measure");
    same selector, cache and log. Other threads keep theirs."""
    if name not in MODES:
        raise ValueError(f"kernel selection mode must be one of {MODES}, got {name!r}")
    old, _local.mode = _thread_mode(), name
    try:
        yield
    finally:
        _local.mode = old


def choose(
    key: str,
    candidates: Mapping[str, Callable[[], Tensor]],
    native: str,
    tol: Mapping[str, float] | float = FP32_TOL,
    default: str | None = None,
) -> str:
    """`selector().choose(...)`: see `Selector.choose`."""
    return selector().choose(key, candidates, native, tol, default)


def remember(memo: dict[Any, Any], key: Any, name: str, value: Any = None) -> None:
    """memo[key] = `value` (default: `name`), unless `name` is a `Choice` that was not decided (a call that
    could not check the candidates: the next one that can decides)."""
    if getattr(name, "decided", True):
        memo[key] = name if value is None else value


def memo_token() -> tuple[int, int, str | None]:
    """Part of every layer's memo key: a change of selector, thread count or this thread's mode
    invalidates memoized choices."""
    return _generation, torch.get_num_threads(), _thread_mode()


def module_signature(module: nn.Module) -> str:
    """A short stable name of a module's architecture: class, parameter count, hash of parameter shapes."""
    h = hashlib.sha1()
    n = 0
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
        n += p.numel()
    return f"{type(module).__name__}/{n}/{h.hexdigest()[:10]}"


def shapes(*tensors: Tensor | None) -> str:
    """'1x16x2,1,1x2x66' for the benchmarks' and the cache's keys (None: '-')."""
    return ",".join("-" if t is None else "x".join(map(str, t.shape)) or "scalar" for t in tensors)


def layout(x: Tensor) -> str:
    """A tensor's memory layout for memo and cache keys: "contiguous", "channels_last" (a 4-D tensor
    whose channels are innermost, e.g. camera frames (H, W, 3) permuted to (3, H, W)) or "strided"."""
    if x.is_contiguous():
        return "contiguous"
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return "channels_last" if nhwc else "strided"
