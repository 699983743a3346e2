"""Typed sub-configs from the plain dicts a config file or a checkpoint holds."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
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
    return cls(**value)
