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


def fmt_pct(value: Any, decimals: int = 2) -> str:
    """A fraction as a percentage: 0.0123 -> 1.23%; None -> '—', NaN -> 'nan'."""
    special = _special(value)
    return special if special is not None else f"{100 * value:.{decimals}f}%"


def fmt_p(value: Any) -> str:
    """A p-value: 0.012, or 3.52e-12 below 0.001; None -> '—', NaN -> 'nan'."""
    special = _special(value)
    if special is not None:
        return special
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.2e}"


#: shown instead of an interval that does not hold its own point estimate (a bootstrap of a ratio whose
#: denominator comes near 0): a point is never printed outside its interval
NO_INTERVAL = "[interval excludes the estimate]"


def interval_holds(value: Any, low: Any, high: Any) -> bool:
    """Whether [low, high] is a finite interval that holds its point estimate `value`."""
    return all(_special(v) is None for v in (value, low, high)) and low <= value <= high


def _misses(value: Any, low: Any, high: Any) -> bool:
    """Three finite numbers with the value outside [low, high]."""
    ends = (value, low, high)
    if any(_special(v) is not None for v in ends):
        return False
    return not low <= value <= high


LARGE = 1e4  # fmt_ci shows values this large in significant digits, not as a wall of decimals


def fmt_ci(value: Any, low: Any, high: Any, decimals: int = 3) -> str:
    """'1.462 [1.401, 1.530]'; '—' when the value and both ends are missing; '6.149 [interval excludes the
    estimate]' when the interval does not hold the value; '3.396e+13 [3.024e+13, 3.869e+13]' from 1e4 up."""
    if value is None and low is None and high is None:
        return DASH
    if any(_special(v) is None and abs(v) >= LARGE for v in (value, low, high)):  # a ratio over ~0: as 3.396e+13
        return fmt_ci_sig(value, low, high, 4)
    if _misses(value, low, high):
        return f"{fmt_fixed(value, decimals)} {NO_INTERVAL}"
    return f"{fmt_fixed(value, decimals)} [{fmt_fixed(low, decimals)}, {fmt_fixed(high, decimals)}]"


def fmt_ci_sig(value: Any, low: Any, high: Any, digits: int = 3) -> str:
    """fmt_ci in `digits` significant digits, for values near 0 (a ΔCE difference): '0.00412 [0.00211, 0.00633]'.
    Rounding keeps order, so a point inside its interval stays inside as printed."""
    if value is None and low is None and high is None:
        return DASH
    if _misses(value, low, high):
        return f"{fmt(value, digits)} {NO_INTERVAL}"
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def fmt_p_holm(p_value: Any, p_holm: Any, family_size: int | None) -> str:
    """'0.002 (Holm 0.004)': a Wilcoxon p with its Holm correction, shown where the report has one and its family
    holds more than this one test (family_size None: a report older than 0.3.0, whose correction is shown)."""
    text = fmt_p(p_value)
    if p_holm is None or family_size == 1:
        return text
    return f"{text} (Holm {fmt_p(p_holm)})"
