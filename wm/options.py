"""Typed sub-configs from the plain dicts a config file or a checkpoint holds, and the model options
that come from the store (given otherwise: one clear line)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def sub_config(cls: type[T], value: Any, where: str) -> T:
    """`value` as the dataclass `cls` (unchanged when it is one already). An option `cls` does not
    declare is a ValueError naming it by its path, `where` (e.g. "model.net"), and the nearest valid
    name: it was a TypeError from the constructor, reported by the apps as a bug."""
    if not isinstance(value, Mapping):
        return value
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in value if k not in names]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f"; did you mean {where}.{near[0]}?" if near else ""
        raise ValueError(f"unknown option {where}.{unknown[0]}{hint} (its options: {', '.join(names)})")
    check_numbers(cls, value, where)
    return cls(**value)


def is_whole(v: Any) -> bool:
    """An int (numpy's too), not a bool (True is no count)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A real number (int, float, numpy's), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_NUMBER_KINDS = {
    "int": ("a whole number", is_whole),
    "float": ("a finite number", lambda v: is_real(v) and math.isfinite(v)),  # NaN passed every `< 0` test
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}


def check_numbers(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Refuse (ValueError, one line naming each) `values` for the dataclass `cls` where a field declared
    an int, a float, a bool or a tuple of ints holds something else: a float reached range() or torch as
    a TypeError (a traceback), int() cut future=[2.5] to 2, the string "false" was true, a NaN or inf
    weight trained to "the loss is nan: lower trainer.lr". Before the config converts anything; fields
    `cls` does not declare are left to `sub_config`."""
    wrong = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        value, declared = values[f.name], f.type if isinstance(f.type, str) else f.type.__name__
        kinds = {part.strip() for part in declared.split("|")}
        if value is None and "None" in kinds:
            continue
        if declared.startswith("tuple[int") and not isinstance(value, list | tuple):  # (model.future=8
            wrong.append(f"{where}.{f.name}={value!r} is not a list of whole numbers")  # was a traceback)
            continue
        if declared.startswith("tuple[int"):  # every element
            items, kind = {f"{f.name}[{i}]": v for i, v in enumerate(value)}, "int"
        elif kinds & set(_NUMBER_KINDS):
            items, kind = {f.name: value}, next(k for k in ("float", "int", "bool") if k in kinds)
        else:
            continue
        want, ok = _NUMBER_KINDS[kind]
        wrong += [f"{where}.{name}={v!r} is not {want}" for name, v in items.items() if not ok(v)]
    if wrong:
        raise ValueError("; ".join(wrong))


# model options every entry takes from the store, and what a user sets instead
STORE_DERIVED = {
    "image_key": "choose the camera with the top-level image_key=",
    "proprio_key": "choose it with the top-level proprio_key=",
    "image_size": "it is the size of the store's frames",
    "proprio_dim": "it is the size of the store's proprioception key",
    "action_key": "actions are read from the store's 'action' key",
    "action_dim": "it is the size of the store's 'action' key",
    "latent_shape": "it follows from the codec and the frame size",
}


def check_not_derived(given: Mapping[str, Any], built: Mapping[str, Any], where: str = "model") -> None:
    """A model option the entry takes from the store, given with another value, is refused in one line
    (it was overwritten silently: model.image_key=wrist trained on the first camera)."""
    for key, value in given.items():
        path, got = f"{where}.{key}", built.get(key)
        if isinstance(value, Mapping) and isinstance(got, Mapping):
            check_not_derived(value, got, path)
        elif key in STORE_DERIVED and key in built and _plain(value) != _plain(got):
            raise ValueError(
                f"{path}={_plain(value)} is set from the store ({_plain(got)}): {STORE_DERIVED[key]}"
            )


def _plain(value: Any) -> Any:
    """Lists, tuples and OmegaConf lists alike, for comparison."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


FEATURE_CACHE = ("auto", "off")  # a frozen encoder's features cached beside the store, or never


def check_feature_cache(value: Any) -> None:
    """`feature_cache` is "auto" or "off" ("on" or True read as off: the encoder ran on every batch)."""
    if value not in FEATURE_CACHE:
        raise ValueError(f"feature_cache must be 'auto' or 'off', got {value!r}")


def override(key: str, value: object) -> str:
    """`key=value` as a Hydra override that reads back `value` (a path) exactly: the value quoted for
    Hydra where it holds anything but letters, digits, spaces and `/._-+:@%` or starts or ends with a
    space (a quote, comma, bracket or `=` would not parse as a value, and Hydra strips outer spaces).
    Quote the whole command line for a shell after (`shlex.join`)."""
    text = str(value)
    if text != text.strip() or not re.fullmatch(r"[\w/.\-+:@% ]*", text, flags=re.ASCII):
        text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)  # backslashes before a quote
        text = "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"
    return f"{key}={text}"
