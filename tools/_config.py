"""Configs from user mappings: a frozen dataclass (or any callable's keyword arguments) built from the
options a user typed, with every mistake reported as one line naming the option: an unknown name with the
nearest valid one, a value of the wrong type, a required value not given, a value `__post_init__` refuses.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import enum
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class UsageError(ValueError):
    """A mistake in the options; the message names the option."""


def nearest(name: str, valid: Sequence[str]) -> str | None:
    near = difflib.get_close_matches(name, list(valid), n=1)
    return near[0] if near else None


def unknown_option(path: str, valid: Sequence[str]) -> UsageError:
    """`unknown option trainer.stpes; did you mean trainer.steps?`"""
    parent, _, name = path.rpartition(".")
    near = nearest(name, valid)
    if near:
        return UsageError(f"unknown option {path}; did you mean {parent + '.' if parent else ''}{near}?")
    where = f"{parent} takes" if parent else "valid options:"
    return UsageError(f"unknown option {path}; {where} {', '.join(valid) or 'no options'}")


def changed(cfg: Any, names: Sequence[str]) -> list[str]:
    """Those of dataclass `cfg`'s fields `names` set to other than their defaults (in that order): the
    options a user gave, for refusing the ones that do not apply rather than ignoring them."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}

    def default(name: str) -> Any:
        f = fields[name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]

    return [n for n in names if getattr(cfg, n) != default(n)]


def record_of(value: Any) -> Any:
    """A JSON-ready copy of a config for a run's records (results, report, episode info): dataclasses as
    dicts of their fields, mappings and sequences as such, paths as strings; an object given from
    Python (a device's HID module, a clock) as its type's name, never a deep copy of it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: record_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): record_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [record_of(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value) if isinstance(value, Path) else f"<{type(value).__name__}>"


def folder(option: str, value: Any, give: str = "give a folder", within: bool = False) -> None:
    """Refuse a folder option whose path, or one of its parents, is a file (the write failed later with
    a traceback or an errno line that named no option): `out=x: x is a file; give a folder`. `within`:
    `value` names a file, whose parents must be folders. An empty value is refused: `Path("")` is the
    current folder, where the run would have written."""
    if not str(value).strip():
        raise UsageError(f"{option}= is empty; {give}")
    if str(value).startswith("~"):  # (taken literally: a folder named "~" in the working directory)
        raise UsageError(
            f"{option}={value}: '~' is not expanded here; give the path from $HOME (a shell expands "
            f"{option}=$HOME/...) or an absolute path"
        )
    for path in (*([] if within else [Path(value)]), *Path(value).parents):
        if path.exists() and not path.is_dir():
            raise UsageError(f"{option}={value}: {path} is a file; {give}")
    from wm.data.places import store_around

    store = store_around(Path(value).parent if within else value)
    if store is not None:  # a rewrite of the store (wm-info drop_episodes) deleted what was put in it
        raise UsageError(f"{option}={value}: {store} is a demonstration store; {give} outside it")


def store_path(option: str, value: Any) -> None:
    """Refuse a store option that names a file (a zip store excepted: the store says it is read-only) or
    a path under one: `record=x.zarr: is a file, not a store; give a new path or an existing store`."""
    path = Path(value)
    if path.exists() and not path.is_dir() and path.suffix != ".zip":
        raise UsageError(f"{option}={value}: is a file, not a store; give a new path or an existing store")
    folder(option, value, "give a store path in a folder", within=True)


def one_of(path: str, value: Any, choices: Sequence[Any]) -> None:
    """`controller must be one of mpc, policy, random, got 'mcp'; did you mean mpc?`"""
    if value not in choices:
        near = nearest(str(value), [str(c) for c in choices])
        hint = f"; did you mean {near}?" if near else ""
        raise UsageError(f"{path} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def check(target: Callable[..., Any], values: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """`values` checked as the keyword arguments of `target` (a dataclass or any callable): every name is
    a parameter (else the error names the nearest one), required ones are given, each value has its
    annotated type (a mapping given for a dataclass-typed parameter is built the same way, recursively).
    `path` is where the mapping sits in the app's config, for messages (`trainer` -> `trainer.steps`)."""
    params = _parameters(target)
    for name in values:
        if name not in params:
            raise unknown_option(_join(path, str(name)), list(params))
    missing = [name for name, (_, required) in params.items() if required and name not in values]
    if missing:
        raise UsageError(f"{_join(path, missing[0])}= is required")
    return {name: _coerce(params[name][0], value, _join(path, name)) for name, value in values.items()}


def build(cls: type[T], values: Mapping[str, Any], path: str = "") -> T:
    """The frozen dataclass `cls` from a mapping of user options, checked by `check`; a value its
    `__post_init__` refuses is reported under `path`."""
    kwargs = check(cls, values, path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a UsageError too: `cls` does not know where it was given
        if not path:
            raise
        if str(e).startswith(f"{path}."):  # it names the option already (`trainer.lr=inf is not ...`)
            raise UsageError(str(e)) from e
        raise UsageError(f"{path}: {e}") from e


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _parameters(target: Callable[..., Any]) -> dict[str, tuple[Any, bool]]:
    """name -> (annotated type, required) of the keyword parameters of `target`."""
    is_dc = dataclasses.is_dataclass(target)
    try:
        hints = typing.get_type_hints(target if is_dc or not isinstance(target, type) else target.__init__)
    except Exception:  # an annotation that cannot be evaluated here: check names only
        hints = {}
    if is_dc:
        return {
            f.name: (hints.get(f.name, Any), f.default is f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(target)  # type: ignore[arg-type]
            if f.init
        }
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: (hints.get(p.name, Any), p.default is p.empty)
        for p in inspect.signature(target).parameters.values()
        if p.kind in kinds
    }


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """`value` as type `tp` (an int is a float, lists become tuples where tuples are due), or a UsageError
    naming `path`. Types this does not know pass unchecked."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, TypeVar):
        return value
    if value is not None and _is_callable_type(tp) and not callable(value):  # it was called: a traceback
        raise UsageError(f"{path} is a function, set in Python only; leave it out of the command line")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        mappings = [m for m in members if _describe(m) == "a mapping ({...})"]
        if isinstance(value, Mapping) and len(mappings) == 1:  # the error inside it, not "or null"
            return _coerce(mappings[0], value, path)
        for member in members:
            try:
                return _coerce(member, value, path)
            except UsageError:
                pass
        raise _wrong_type(tp, value, path)
    if origin is Literal:
        one_of(path, value, args)
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):  # by value or name: a gamepad's buttons
        for member in tp:
            if value is member or value == member.value or str(value).lower() == member.name.lower():
                return member
        one_of(path, value, [m.value for m in tp])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp | Mapping):
            return value if isinstance(value, tp) else build(tp, value, path)
        raise _wrong_type(tp, value, path)
    if tp in (bool, int, float, str):
        ok, coerced = _scalar(tp, value, path)
        if ok:
            return coerced
        raise _wrong_type(tp, value, path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return _sequence(tp, value, path)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong_type(tp, value, path)
        key, item = args if len(args) == 2 else (Any, Any)
        return {_key(key, k, path): _coerce(item, v, _join(path, str(k))) for k, v in value.items()}
    return value


def _key(tp: Any, key: Any, path: str) -> Any:
    """A mapping's key as type `tp`: a number key reaches a config as text (`buttons.0=start`)."""
    if tp is int and isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return _coerce(tp, key, _join(path, str(key)))


def _is_callable_type(tp: Any) -> bool:
    """`tp` is Callable[...] (or Callable | None): a parameter for Python callers, not for a config."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(members) and all(_is_callable_type(a) for a in members)
    return tp is Callable or origin is Callable


_typed: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "typed", default=types.MappingProxyType({})
)


@contextlib.contextmanager
def typed_as(overrides: Sequence[str]) -> Iterator[None]:
    """Within it, a text option Hydra read as a number is taken as the text typed among `overrides`
    (the command line's `key=value`): store=1.10 made the store 1.1, token=123_456_789 the token
    123456789, which a client given the same token did not match."""
    typed = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep:
            typed[key.lstrip("+~")] = value
    reset = _typed.set(typed)
    try:
        yield
    finally:
        _typed.reset(reset)


def _scalar(tp: type, value: Any, path: str = "") -> tuple[bool, Any]:
    """(whether `value` is a `tp` to a user, the value as one) for bool, int, float and str."""
    if isinstance(value, bool):  # to Python a bool is an int; to a user it is not
        return tp in (bool, str), str(value).lower() if tp is str else value
    if tp is bool:
        return False, value
    if tp is int:
        return isinstance(value, int), value
    if tp is float:
        return isinstance(value, int | float), float(value) if isinstance(value, int | float) else value
    text = _typed.get().get(path)
    if isinstance(value, int | float) and text is not None and _reads_as(text, value):  # str: `out=1.10`
        return True, text  # is the text typed (not one an interpolation resolved to a number)
    return isinstance(value, str | int | float), str(value)


def _reads_as(text: str, value: float) -> bool:
    try:
        typed = float(text)
    except ValueError:
        return False
    return typed == value or (math.isnan(typed) and math.isnan(value))  # (token=NaN became "nan")


def _sequence(tp: Any, value: Any, path: str) -> list | tuple:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise _wrong_type(tp, value, path)
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: so many values
        if len(args) != len(value):
            raise UsageError(f"{path} must be {len(args)} values, got {len(value)}: {value!r}")
        items = [_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
    else:
        items = [_coerce(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if tuple in (origin, tp) else items


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or tp in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "a mapping ({...})"
    return getattr(tp, "__name__", str(tp))


SECRET_OPTIONS = ("token",)  # never printed, not even in an error about the command line


def _wrong_type(tp: Any, value: Any, path: str) -> UsageError:
    secret = path.rpartition(".")[2] in SECRET_OPTIONS  # (`token=[s3cr3t]` printed the list)
    got = f"a {type(value).__name__}" if secret else repr(value)
    return UsageError(f"{path} must be {_describe(tp)}, got {got}")
