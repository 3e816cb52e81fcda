"""Comparing numbers against committed ones: what must be exact, what may differ by rounding, and by how much.

Every test that compares numbers computed now with numbers committed to the repository (tests/data/golden/,
replications/*/results/) goes through :func:`assert_close_tree`:

- integers, strings, booleans and None (token ids, counts, contexts, positions, names) are compared exactly, type
  included (``1`` is not ``1.0``);
- floats within a :class:`Tolerance`: ``|actual - expected| <= abs + rel * max(|actual|, |expected|)``; two NaNs
  are equal.

Which tolerance, and why (margins measured under three kernel families: CONTRIBUTING.md, "Numbers on another
machine"):

- :data:`FLOAT64_STATISTIC` (rel 1e-12) for a report's statistics (means, ratios, intervals, p-values, correlations)
  computed in float64 from the *same* per-token values. Between machines only the order of float64 sums differs
  (numpy and BLAS pick SIMD kernels by CPU): ~1e-16 relative per operation, up to ~6e-14 after a p-value's tail
  function. 1e-12 leaves a margin of ~20 over the largest seen and still fails a 1e-7 relative change of a ratio.
  (Statistics of a *fresh* run on other kernels inherit its float32 differences, up to 6e-4 relative for a ΔCE
  median: compare those through the per-token values, as tests/golden.py does, never with a looser 1e-12.)
- :data:`FLOAT32_VALUE` (16 float32 ulps: rel 2^-19 = 1.9e-6) for values a model computes in float32 (norms, eps,
  L0, sums of activations): another kernel family (AVX-512, AVX2, scalar) rounds each float32 operation of the
  forward pass differently: up to ~6 ulps (35% of the tolerance) between AVX-512 and scalar kernels. A change of
  the model, SAE or intervention moves them by far more.
- :data:`FLOAT32_BOUNDED` adds an absolute floor of 16 ulps of 1 for a cosine: at most 1 in size, its rounding is
  absolute (near 0 its relative error is unbounded).
- :data:`FLOAT32_CE` for ΔCE, ``KL + E_P[d] - d[next]`` with ``d`` the logit change: its rounding is absolute,
  ulps of the logits (|z| < 1 in the tiny test models), however small the difference: abs 16 ulps of 1 (1.9e-6;
  the largest difference seen used 18%).
- :data:`FLOAT32_KL` for KL, computed from ``d - E_P[d]`` so that it keeps its precision when tiny (klgap/forward/metrics.py):
  the logits' rounding (< 1 ulp of 1) enters multiplied by ``|d - E_P[d]| ~ sqrt(2 KL)`` (< 0.2 here), so its
  absolute floor is small: 2^-25 = 3.0e-8, a quarter ulp of 1 (~1e-5 of a typical KL here; the largest
  difference seen used 31%, and a KL 1e-5 off fails).
- :data:`EXACT` for two copies of one number (a file and the file it was copied from) and for the same run twice on
  one machine (resume, shards + merge, ranks: :func:`assert_identical_frames`), where anything but bit-for-bit
  equality is a bug.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= abs + rel * max(|actual|, |expected|)``."""

    rel: float
    abs: float = 0.0

    def allowed(self, actual: float, expected: float) -> float:
        return self.abs + self.rel * max(abs(actual), abs(expected))

    def __str__(self) -> str:
        return f"rel {self.rel:.3g}" + (f" + abs {self.abs:.3g}" if self.abs else "")


ULP32 = 2.0**-23  # float32's machine epsilon: the spacing of float32 numbers at 1
EXACT = Tolerance(rel=0.0)
FLOAT64_STATISTIC = Tolerance(rel=1e-12)
FLOAT32_VALUE = Tolerance(rel=16 * ULP32)
FLOAT32_BOUNDED = Tolerance(rel=16 * ULP32, abs=16 * ULP32)
FLOAT32_CE = Tolerance(rel=16 * ULP32, abs=16 * ULP32)
FLOAT32_KL = Tolerance(rel=16 * ULP32, abs=ULP32 / 4)


@dataclass
class Margin:
    """The largest share of its tolerance any float used (0: all equal; 1: at the limit) and where."""

    used: float = 0.0
    path: Path = ()

    def add(self, used: float, path: Path) -> None:
        if used > self.used:
            self.used, self.path = used, path


def _where(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def assert_close_tree(actual: Any, expected: Any, path: Path = (),
                      tolerance: Tolerance | Callable[[Path], Tolerance] = FLOAT64_STATISTIC,
                      margin: Margin | None = None, strict: bool = True) -> Margin:
    """Assert that a JSON-like tree (dicts, lists, numbers, strings, None) equals `expected`: the same keys, lengths
    and types; ints, strings, bools and None exactly; floats within `tolerance` (one for every float, or a function
    of the float's path, e.g. its column or field name). A failure names the path, both values and the tolerance.
    Returns the largest share of its tolerance any float used, and where (to report the margin); with
    ``strict=False`` floats outside their tolerance only raise that share above 1 (to measure by how much)."""
    margin = margin if margin is not None else Margin()
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{_where(path)}: expected a mapping, got {actual!r}"
        missing, extra = expected.keys() - actual.keys(), actual.keys() - expected.keys()
        assert not missing and not extra, f"{_where(path)}: keys differ: missing {sorted(map(str, missing))}, " \
                                          f"unexpected {sorted(map(str, extra))}"
        for key, value in expected.items():
            assert_close_tree(actual[key], value, (*path, key), tolerance, margin, strict)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), \
            f"{_where(path)}: expected {len(expected)} items, got {actual!r:.200}"
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
            assert_close_tree(a, b, (*path, i), tolerance, margin, strict)
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, float):
        if math.isnan(expected) or math.isnan(actual):
            assert math.isnan(expected) and math.isnan(actual), f"{_where(path)}: {actual!r} != {expected!r}"
            return margin
        tol = tolerance(path) if callable(tolerance) else tolerance
        diff, allowed = abs(actual - expected), tol.allowed(actual, expected)
        assert diff <= allowed or not strict, (f"{_where(path)}: {actual!r} != {expected!r} (|diff| {diff:.3g} > {allowed:.3g} "
                                 f"allowed by {tol})")
        margin.add(diff / allowed if allowed else math.inf if diff else 0.0, path)
    else:
        assert type(actual) is type(expected) and actual == expected, \
            f"{_where(path)}: {actual!r} != {expected!r} (compared exactly)"
    return margin


def is_printed(printed: str, value: float) -> bool:
    """`printed` (a README cell) is `value` rounded as printed: to its decimals, or in e-notation to its
    mantissa's decimals (0.51 of the last digit: a rounding that went the other way at the half is still a match)."""
    mantissa = printed.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    if "e" in printed:
        return math.isclose(float(printed), value, rel_tol=0.51 * 10**-decimals / abs(float(mantissa)))
    return abs(float(printed) - value) <= 0.51 * 10**-decimals


def frame_tree(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """A table as {column: [Python values]} for :func:`assert_close_tree` (the path of a value is (column, row))."""
    return {str(column): frame[column].tolist() for column in frame.columns}


def assert_identical_frames(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The same run computed twice on one machine (resume, shards + merge, ranks, a shared clean forward): bit for
    bit. (pandas' default compares floats only to rel 1e-5.)"""
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)
