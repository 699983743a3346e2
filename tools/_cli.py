"""What every command-line app shares: its entry point around Hydra, its errors, and its config checks.

`app(config_name, body)` is an app's console entry point. `body(cfg)` runs once, or once per job of a
`-m` sweep. Errors:
- a mistake the user can make (a malformed override, an unknown config choice or option, a value of the
  wrong type, a required value not given, a missing store or checkpoint...) is ONE line `error: ...` on
  stderr and exit status 2; `WM_TRACEBACK=1` in the environment prints its traceback as well;
- anything else is a bug: its traceback, and exit status 1.
In a multirun every job runs (each in its own folder, see `bind`); a failed job prints its line, named
`error: job N (overrides): ...`, and the process exits nonzero when any job failed (1 if one was a bug,
else 2). A launcher that runs jobs in other processes (hydra-submitit-launcher on SLURM, joblib) works
unchanged: there a failed job raises `JobFailed`, so Hydra and the launcher see it as failed too.

`bind(cls, cfg)` and `build(cls, mapping, path)` (tools/_config.py) turn configs into frozen dataclasses,
checked before any work starts: required values, unknown names (with the nearest valid one), value types,
nested dataclasses; every app builds every config from user options with them. `--help`
(tools/_help.py) lists every option with its value and the comment beside it in the app's YAML file,
which is also where the explanation of a missing required value comes from.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import re
import signal
import sys
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from robots.base import RobotError
from robots.teleop.base import DeviceNotFoundError
from tools._config import (
    SECRET_OPTIONS,
    UsageError,
    build,
    changed,
    check,
    folder,
    nearest,
    one_of,
    record_of,
    store_path,
    typed_as,
    unknown_option,
)
from tools._help import option_comments
from wm.checkpoint import CheckpointError
from wm.data.errors import StoreError
from wm.encoders import EncoderWeightsError
from wm.feature_cache import FeatureCacheError
from wm.interrupt import interrupt, reraise_lost, sigterm_interrupts
from wm.locks import BusyError

__all__ = [
    "USER_ERRORS",
    "FAULT_EXIT",
    "JobFailed",
    "UsageError",
    "app",
    "bind",
    "build",
    "changed",
    "check",
    "folder",
    "interrupt",
    "nearest",
    "one_of",
    "record_of",
    "store_path",
    "run",
    "sigterm_interrupts",
]

T = TypeVar("T")
TRACEBACK_ENV = "WM_TRACEBACK"  # set to 1: user errors print their traceback too


class JobFailed(Exception):
    """A job that a launcher ran in another process failed; it printed why (`message`) where it ran."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return self.message


# What a user can cause: one line and exit status 2. Anything else is a bug (traceback, exit status 1).
FAULT_EXIT = 3  # a fault stopped the run (wm-deploy, wm-collect): the robot holds; what was recorded is kept


USER_ERRORS = (
    StoreError,
    BusyError,
    RobotError,
    DeviceNotFoundError,
    CheckpointError,
    EncoderWeightsError,
    FeatureCacheError,
    OmegaConfBaseException,  # e.g. an interpolation in an override that does not resolve
    ValueError,
    FileExistsError,
    FileNotFoundError,
    PermissionError,
)
# OS errors a user can act on (a read-only filesystem, a full disk or quota, a path too long, a file
# where a folder goes)
USER_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.ENAMETOOLONG, errno.ENOTDIR)


# ---------------------------------------------------------------------- the app's config
def bind(cls: type[T], cfg: DictConfig, *, job_folder: str | None = "out", job_file: str | None = None) -> T:
    """The app's frozen dataclass `cls` from its Hydra config, checked (`build`) before any work.

    In a multirun each job writes in its own folder, `hydra.sweep.dir/hydra.sweep.subdir` (the app's YAML
    makes `out` the sweep's folder when given): the output directory option `job_folder` becomes that
    folder, and the output store or file option `job_file` goes inside it under its own name. Then every
    required value (`???`) must have been given: `error: store= is required (<its YAML comment>)`."""
    cfg = copy.deepcopy(cfg)
    job_dir = _multirun_job_dir()
    if job_dir is not None:
        with read_write(cfg), open_dict(cfg):
            if job_folder in cfg:
                cfg[job_folder] = job_dir
            if job_file in cfg and not OmegaConf.is_missing(cfg, job_file) and cfg[job_file] is not None:
                cfg[job_file] = str(Path(job_dir) / Path(str(cfg[job_file])).name)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(_required(missing))
    typed = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    with typed_as(typed):
        return build(cls, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def _multirun_job_dir() -> str | None:
    global _sweep_dir
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    _sweep_dir = str(hc.sweep.dir)
    return str(hc.runtime.output_dir)


def _required(missing: list[str]) -> str:
    name = HydraConfig.get().job.config_name if HydraConfig.initialized() else None
    if len(missing) > 1:
        names = ", ".join(f"{m}=" for m in missing[:-1]) + f" and {missing[-1]}="
        return f"{names} are required"
    why = option_comments(name).get(missing[0]) if name else None
    return f"{missing[0]}= is required" + (f" ({why})" if why else "")


# ---------------------------------------------------------------------- entry point and jobs
_failed: list[int] | None = None  # exit statuses of the jobs; a list only in the process `app` started
_sweep_dir: str | None = None  # a multirun's folder, once a job of it has run
_dirs_before: set[Path] = set()  # folders the command line names as out= or the sweep's, that existed


def app(config_name: str, body: Callable[[DictConfig], int | None]) -> Callable[[], None]:
    """The console entry point of the app configured by configs/<config_name>.yaml: Hydra's main (so
    `--help`, `-m`, `--cfg job` and launcher plugins work), with the errors described above."""
    job = _Job(body, config_name)
    hydra_main = hydra.main(config_path="pkg://configs", config_name=config_name, version_base="1.3")(job)

    def main() -> None:
        sys.exit(_main(hydra_main, config_name))

    return main


class _Job:
    """Hydra's task function of an app: a module-level class, so that launchers can pickle it."""

    def __init__(self, body: Callable[[DictConfig], int | None], config_name: str) -> None:
        self.body = body
        module = body.__module__
        if module == "__main__":  # `python -m tools.<app>`: the module's real name
            module = getattr(sys.modules["__main__"].__spec__, "name", f"tools.{config_name}")
        self.__module__ = module  # Hydra names the job after it (hydra.job.name)

    def __call__(self, cfg: DictConfig) -> int:
        code, line = _guarded(lambda: self.body(cfg), _job_label())
        if code == 2:
            _forget_empty_job_dir()
        if code and _failed is None:  # run by a launcher in a process of its own: fail the job there
            raise JobFailed(code, line.removeprefix("error: "))
        if code:
            _failed.append(code)  # type: ignore[union-attr]
        elif _failed is not None:
            _failed.append(0)
        return code


def _forget_empty_job_dir() -> None:
    """A sweep's job refused before any work leaves no empty folder of its own (Hydra made it)."""
    job_dir = _multirun_job_dir()
    if job_dir is not None:
        with contextlib.suppress(OSError):
            os.rmdir(job_dir)  # only when empty


def _forget_refused_sweep() -> None:
    """After a sweep whose every job was refused before any work: the sweep folder Hydra made for it,
    holding only its multirun.yaml, is removed (and the default `multirun/<date>/` folders above it
    when they are left empty), so a refused command writes nothing."""
    if _sweep_dir is None:
        return
    sweep = Path(_sweep_dir)
    if not sweep.is_dir() or {p.name for p in sweep.iterdir()} - {"multirun.yaml"}:
        return
    with contextlib.suppress(OSError):
        (sweep / "multirun.yaml").unlink(missing_ok=True)
        if sweep.resolve() in _dirs_before:  # the user's folder, there before the command: it stays
            return
        sweep.rmdir()
        if Path(_sweep_dir).parts[:1] == ("multirun",):  # Hydra's default: multirun/<date>/<time>
            for parent in (sweep.parent, sweep.parent.parent):
                parent.rmdir()


_SWEEP_DIR_KEYS = ("out", "hydra.sweep.dir")


def _unstarted_sweep_dir(started: float) -> str | None:
    """The folder of a multirun refused before any job ran (a swept option that does not exist): the
    one the command line names (`hydra.sweep.dir=`, else `out=`), or Hydra's default
    `multirun/<date>/<time>` made since `started`; None for a single run."""
    args = sys.argv[1:]
    if not {"-m", "--multirun"} & set(args):
        return None
    named = _sweep_dir_options(args)
    for key in ("hydra.sweep.dir", "out"):
        if named.get(key):
            return named[key]
    made = [p.parent for p in Path("multirun").glob("*/*/multirun.yaml") if p.stat().st_mtime >= started - 1]
    return str(made[0]) if len(made) == 1 else None  # (relative: its date folders are removed with it)


def _sweep_dir_options(args: list[str]) -> dict[str, str]:
    """`out=` and `hydra.sweep.dir=` as a command line gives them (key -> value)."""
    pairs = (a.split("=", 1) for a in args if "=" in a)
    return {key.lstrip("+~"): value for key, value in pairs if key.lstrip("+~") in _SWEEP_DIR_KEYS}


def _named_dirs(args: list[str]) -> set[Path]:
    """The existing folders that `out=` or `hydra.sweep.dir=` name on a command line (resolved)."""
    return {Path(v).resolve() for v in _sweep_dir_options(args).values() if v and Path(v).is_dir()}


def _main(hydra_main: Callable[[], Any], config_name: str) -> int:
    global _failed, _sweep_dir, _dirs_before
    _failed, _sweep_dir = [], None
    _dirs_before = _named_dirs(sys.argv[1:])
    started = time.time()
    _check_flags()
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them; see below
    try:
        hydra_main()
    except KeyboardInterrupt as e:  # 130, or 143 for a training stopped by SIGTERM
        print("interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except BrokenPipeError:  # Hydra's own output (--help, --cfg job) into a reader gone (`| head`)
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except JobFailed as e:  # the first failed job of a launcher's processes (each printed its own line)
        print(f"error: {e.message}", file=sys.stderr)
        return e.code
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # composing the config
        _report(e, redact(_hydra_error(e, config_name), sys.argv[1:]))
        _sweep_dir = _sweep_dir or _unstarted_sweep_dir(started)
        _forget_refused_sweep()  # (a multirun writes its multirun.yaml before it composes a job)
        return 2
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    if _failed and all(code == 2 for code in _failed):
        _forget_refused_sweep()
    # a bug (1) first, else the highest status: a fault that stopped a run (3) or an interrupt (130)
    # over a usage error (2)
    return (1 if 1 in _failed else max(_failed)) if _failed else 0


def run(fn: Callable[[], int | None]) -> None:
    """For apps still on a plain `@hydra.main` (`app` is the entry point that handles Hydra's own errors
    and multiruns): errors as above; a failed job ends the process with its status."""
    try:
        code, _ = _guarded(fn, _job_label())
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))
    if code:
        sys.exit(code)


def _guarded(fn: Callable[[], int | None], label: str) -> tuple[int, str]:
    """Run one job's work; report a failure (one line, or a traceback for a bug) and return its status."""
    try:
        return int(fn() or 0), ""
    except BrokenPipeError:  # what reads stdout went away (`wm-info ... | head`): stop quietly
        _quiet_stdout()
        return 128 + signal.SIGPIPE, ""
    except Exception as e:
        reraise_lost(e)  # an interrupt ctypes turned into another error
        if isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS):
            line = f"error: {label}{_one_line(e)}"
            _report(e, line.removeprefix("error: "))
            return 2, line
        if out_of_memory(e):  # (a planner.samples of 1e11 was a 50-line traceback "reported as a bug")
            line = f"error: {label}out of memory ({_one_line(e)[:200]}): ask for smaller sizes"
            _report(e, line.removeprefix("error: "))
            return 2, line
        traceback.print_exc()
        line = f"error: {label}{type(e).__name__}: {_one_line(e)} (a bug: traceback above)"
        if label:  # in a sweep, say which job it was
            print(line, file=sys.stderr, flush=True)
        return 1, line


def say(text: str) -> None:
    """Print `text` to stdout. When what reads it went away (`| head`, a `tee` or log shipper that died),
    go on without it: a run driving a robot was stopped mid-episode by a status line, and its episode's
    recording lost."""
    try:
        print(text, flush=True)
    except OSError:  # a closed pipe; a terminal that hung up (EIO)
        _quiet_stdout()


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed: the sizes asked for (samples, batch, horizon, frames)
    do not fit the machine, which is not a bug."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail on the closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _report(e: BaseException, line: str) -> None:
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(e)
    print(f"error: {line}", file=sys.stderr, flush=True)


def _job_label() -> str:
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    hc = HydraConfig.get()
    return f"job {hc.job.num} ({redact(' '.join(hc.overrides.task), list(hc.overrides.task))}): "


def _one_line(e: BaseException) -> str:
    if isinstance(e, OmegaConfBaseException):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key = getattr(e, "full_key", None)
        return f"{key}: {first}" if key else first
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _check_flags() -> None:
    """Hydra's command-line flags, parsed once with argparse's errors as one line."""
    try:
        from hydra._internal.utils import get_args_parser  # what hydra.main parses with
    except ImportError:  # another Hydra: it reports its own flag errors
        return
    parser = get_args_parser()
    prog = Path(sys.argv[0]).name

    def error(message: str) -> typing.NoReturn:
        print(f"error: {message} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    parser.parse_args()


def redact(message: str, overrides: list[str]) -> str:
    """`message` with the value of every secret option among `overrides` (e.g. `token=...`) masked."""
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and value and key.lstrip("+~").rpartition(".")[2] in SECRET_OPTIONS:
            for form in {value, repr(value)[1:-1], repr(arg)[1:-1].partition("=")[2]}:
                if form:
                    message = message.replace(form, "***")
    return message


def _hydra_error(e: BaseException, config_name: str) -> str:
    """One line for an error Hydra raised while composing the config."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, choice = e.missing_cfg_file.rpartition("/")
        near = nearest(choice, e.options)
        hint = f"did you mean {group}={near}? " if near else ""
        return f"{group}={choice}: no such {group}; {hint}valid: {', '.join(e.options)}"
    text = "; ".join(line.strip().rstrip(".") for line in str(e).splitlines() if line.strip())
    if isinstance(e, OverrideParseException):
        if e.override and e.override.partition("=")[2].startswith("~"):  # (`store=~/x` from a Makefile)
            key = e.override.partition("=")[0]
            return f"cannot parse override {e.override!r}: '~' is not expanded here; give {key}=$HOME/..."
        return f"cannot parse override {e.override!r}: {text}"
    m = re.match(r"Could not override '([^']+)'.\s*To append to your config use (\S.*)", str(e))
    if m and isinstance(e.__cause__, ConfigKeyError | ConfigAttributeError):  # `trainer.stpes=10`
        path, add = m.groups()
        parent, _, name = path.rpartition(".")
        valid = _config_keys(config_name, parent)
        if valid is None:  # the parent is no option (`trainr.steps`): the first part that is not
            parts = path.split(".")
            for i in range(1, len(parts)):
                above = _config_keys(config_name, ".".join(parts[: i - 1]))
                if above is not None and parts[i - 1] not in above:
                    return str(unknown_option(".".join(parts[:i]), above))  # (a UsageError: text here)
        if not valid:  # an empty mapping such as task_options: {}
            return f"{path} is not in the config; add it with {add}"
        if name in valid:  # `task_options={goal_mode: other_arm}`: a mapping given keys it does not hold
            return f"{path} holds none of the keys given to it; add them with {add}"
        # a block of typed options (trainer, planner, graph) takes no new key: `+trainer.stpes=10` would be
        # refused in turn. (The free mappings, `{}` in the configs, took the branch above.)
        return str(unknown_option(path, valid))
    if isinstance(e, OmegaConfBaseException):
        return _one_line(e)
    if isinstance(e.__cause__, OmegaConfBaseException):
        return f"{text}: {_one_line(e.__cause__)}"
    return text


def _config_keys(config_name: str, parent: str) -> list[str] | None:
    """The keys at `parent` of the app's config composed with the command line's top-level choices
    (`planner=gd`: gd's keys, not the default planner's), for suggestions; None where `parent` is not in
    the config (or is no mapping)."""
    from hydra import compose, initialize_config_module

    chosen = [a for a in sys.argv[1:] if "=" in a and "." not in a.partition("=")[0] and a[0] not in "+~"]
    for overrides in (chosen, []):  # without them when they do not compose on their own
        try:
            with initialize_config_module("configs", version_base="1.3"):
                cfg = compose(config_name, overrides=overrides)
        except Exception:  # noqa: BLE001 - suggestions are a courtesy
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return [str(k) for k in node] if isinstance(node, DictConfig) else None
    return []
