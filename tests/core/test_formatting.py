"""klgap.render.formatting: the one way numbers become text in the terminal, report.md/html and compare.md."""

from __future__ import annotations

import math

import pytest

from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_ci_sig, fmt_fixed, fmt_p, interval_holds


@pytest.mark.parametrize("value,digits,text", [
    (0.0380422, 4, "0.03804"), (0.0380422, 2, "0.038"), (123456.7, 4, "1.235e+05"), (1.5e-17, 4, "1.5e-17"),
    (8128, 4, "8128"), (0, 4, "0"), (-0.25, 4, "-0.25"),
    (None, 4, DASH), (math.nan, 4, "nan"), (math.inf, 4, "inf"), (-math.inf, 4, "-inf"), (True, 4, "True"),
])
def test_fmt_significant_digits(value, digits, text):
    assert fmt(value, digits) == text


@pytest.mark.parametrize("value,decimals,text", [
    (1.4619, 3, "1.462"), (1.4, 3, "1.400"), (1, 3, "1.000"), (-1.2345, 2, "-1.23"), (0.99951, 3, "1.000"),
    (None, 3, DASH), (math.nan, 3, "nan"), (math.inf, 3, "inf"),
])
def test_fmt_fixed_decimals(value, decimals, text):
    assert fmt_fixed(value, decimals) == text


@pytest.mark.parametrize("value,text", [
    (0.0213, "0.021"), (1.0, "1.000"), (0.001, "0.001"), (0.000999, "9.99e-04"), (3.5e-12, "3.50e-12"),
    (0.0, "0.00e+00"), (None, DASH), (math.nan, "nan"),
])
def test_fmt_p(value, text):
    assert fmt_p(value) == text


def test_fmt_ci():
    assert fmt_ci(1.4619, 1.4, 1.53) == "1.462 [1.400, 1.530]"
    assert fmt_ci(0.8292, 0.8102, 0.8491, decimals=2) == "0.83 [0.81, 0.85]"
    assert fmt_ci(None, math.nan, None) == "— [nan, —]"  # a missing end is shown, not hidden
    assert fmt_ci(1.2, None, None) == "1.200 [—, —]"
    assert fmt_ci(None, None, None) == DASH  # no ratio at all
    assert fmt_ci(33956260295023.09, 30241910869700.523, 38685426212958.477) == "3.396e+13 [3.024e+13, 3.869e+13]"


def test_an_interval_that_misses_its_estimate_is_not_shown():
    assert fmt_ci(6.149, -10.187, 5.0) == "6.149 [interval excludes the estimate]"
    assert fmt_ci_sig(0.004123, 0.00211, 0.00633) == "0.00412 [0.00211, 0.00633]"
    assert fmt_ci_sig(0.01, 0.02, 0.03) == "0.01 [interval excludes the estimate]"
    assert fmt_ci_sig(None, None, None) == DASH
    assert interval_holds(1.0, 0.9, 1.1) and not interval_holds(1.0, None, 1.1) and not interval_holds(2, 0, 1)
