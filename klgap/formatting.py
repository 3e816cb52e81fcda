"""Numbers as text, one way for every reader: the terminal, report.md, report.html and compare.md.

A missing value (None: a NaN or infinity that report.json saved as null) is '—'; a NaN still in memory is
'nan', an infinity 'inf' / '-inf'; integers print as they are. `fmt` gives significant digits (KL values),
`fmt_fixed` decimal places (ratios, cosines), `fmt_p` p-values, `fmt_ci` a value with its interval.
"""

from __future__ import annotations

import math
from typing import Any

DASH = "—"


def _special(value: Any) -> str | None:
    """The text of a value no number format applies to (None, a bool, NaN, ±inf, not a number), else None."""
    if value is None:
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def fmt(value: Any, digits: int = 4) -> str:
    """`digits` significant digits: 0.03804 (digits 4); integers unchanged (8128); None -> '—', NaN -> 'nan'."""
    special = _special(value)
    if special is not None:
        return special
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


def fmt_fixed(value: Any, decimals: int = 3) -> str:
    """`decimals` decimal places: 1.462 (decimals 3), integers too (1 -> 1.000); None -> '—', NaN -> 'nan'."""
    special = _special(value)
    return special if special is not None else f"{value:.{decimals}f}"


def fmt_p(value: Any) -> str:
    """A p-value: 0.012, or 3.52e-12 below 0.001; None -> '—', NaN -> 'nan'."""
    special = _special(value)
    if special is not None:
        return special
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.2e}"


def fmt_ci(value: Any, low: Any, high: Any, decimals: int = 3) -> str:
    """'1.462 [1.401, 1.530]'; '—' when the value and both ends are missing."""
    if value is None and low is None and high is None:
        return DASH
    return f"{fmt_fixed(value, decimals)} [{fmt_fixed(low, decimals)}, {fmt_fixed(high, decimals)}]"
