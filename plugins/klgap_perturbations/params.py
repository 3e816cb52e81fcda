"""Parse a perturbation's parameters, which arrive as strings from the command line."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from klgap.errors import KlgapError, did_you_mean


def check_names(intervention: str, params: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raise KlgapError if `params` holds a name that `intervention` does not take."""
    valid = sorted(valid)
    for name in params:
        if name not in valid:
            takes = f"valid: {', '.join(valid)}" if valid else "it takes no parameters"
            raise KlgapError(
                f"intervention {intervention!r} has no parameter {name!r}{did_you_mean(name, valid)}; {takes}"
            )


def parse_float(
    intervention: str, name: str, value: Any, low: float | None = None, high: float | None = None
) -> float:
    """`value` (a string or number) as a finite float in [low, high]; KlgapError naming it otherwise."""
    bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise KlgapError(
            f"intervention {intervention!r}: {name}={value!r} is not valid; {name} must be a number in {bounds}"
        )
    return number


def parse_int(intervention: str, name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` (a string or number) as an integer in [low, high]; KlgapError naming it otherwise."""
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        raise KlgapError(
            f"intervention {intervention!r}: {name}={value!r} is not valid; {name} must be an integer in {bounds}"
        )
    return number


def parse_choice(intervention: str, name: str, value: Any, choices: Iterable[str]) -> str:
    """`value` as one of `choices`; KlgapError naming it and the choices otherwise."""
    choices = list(choices)
    text = str(value).strip()
    if text not in choices:
        raise KlgapError(
            f"intervention {intervention!r}: {name}={value!r} is not valid{did_you_mean(text, choices)}; "
            f"valid: {', '.join(choices)}"
        )
    return text
