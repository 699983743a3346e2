"""Plain JSON values from what numpy and environments return (reports, results, episode info)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_native(value: Any) -> Any:
    """`value` with numpy scalars and arrays turned into Python numbers and lists (what an environment's
    `is_success()` or a metric returns: np.bool_, np.float32), inside dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: json_native(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_native(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def json_finite(value: Any) -> Any:
    """`json_native(value)` with every non-finite float (NaN, infinity) replaced by None: strict JSON has
    no such numbers (results.json, report.json)."""
    value = json_native(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_finite(v) for v in value]
    return value
