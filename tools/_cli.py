"""What every command-line app shares: binding the Hydra config to a frozen dataclass, and turning
data-layer errors into one line on stderr with exit code 2 instead of a traceback."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from robots.base import RobotError
from robots.teleop.base import DeviceNotFoundError
from wm.checkpoint import CheckpointError
from wm.data.errors import StoreError
from wm.encoders import EncoderWeightsError
from wm.feature_cache import FeatureCacheError

T = TypeVar("T")


def bind(cls: type[T], cfg: DictConfig) -> T:
    """Build the frozen dataclass `cls` from a Hydra config; unknown fields are a clear error."""
    values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options: {sorted(names)}")
    return cls(**values)


def run(fn: Callable[[], int | None]) -> None:
    """Run an app body; known errors become one line `error: ...` and exit status 2."""
    try:
        code = fn()
    except (
        StoreError,
        RobotError,
        DeviceNotFoundError,
        CheckpointError,
        EncoderWeightsError,
        FeatureCacheError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
