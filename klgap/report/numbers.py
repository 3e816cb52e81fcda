"""Numbers as report.json holds them: NaN and infinities are null (the one place that says so)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite(value: Any) -> float | None:
    """A number as a float, or None when it is None, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plain(obj: Any) -> Any:
    """`obj` with NaN and infinities as None, numpy scalars as Python numbers, inside dicts (keys as str), lists
    and tuples; anything else as it is."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return finite(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def json_safe(obj: Any) -> Any:
    """`obj` as plain JSON values (what run.json and the report can hold: NaN as null, anything else JSON does
    not know, a tensor say, as its text)."""
    return json.loads(json.dumps(plain(obj), default=str))


__all__ = ["finite", "json_safe", "plain"]
