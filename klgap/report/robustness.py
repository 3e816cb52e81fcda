"""Robustness curves: KL of `cosine_matched` noise as a function of cos(x, x'), with the SAE's own point on it.

`klgap curve --cos 0.5:1.0:11 --norm-frac 0.9` runs `sae`, `epsilon_random` and one `cosine_matched` intervention
per grid point through the ordinary engine (same tokens, shared clean forward); any run holding
`cosine_matched` interventions gets a ``curve`` section in its report (built here), a robustness figure, and
can be overlaid with other runs by `klgap compare`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from klgap.report import stats
from klgap.errors import KlgapError

_POINT = re.compile(r"^cosine_matched\(cos=(?P<cos>[^,]+),norm_frac=(?P<frac>[^)]+)\)$")


def parse_point(name: str) -> tuple[float, float] | None:
    """(norm_frac, cos) of a robustness-curve point's recorded name `cosine_matched(cos=..,norm_frac=..)`, else None."""
    match = _POINT.match(name)
    return (float(match["frac"]), float(match["cos"])) if match else None


def is_curve_point(name: str) -> bool:
    """Whether a recorded intervention name is a point of a robustness curve (`cosine_matched(cos=..,norm_frac=..)`)."""
    return _POINT.match(name) is not None


def parse_grid(text: str, flag: str, what: str, low: float | None, high: float | None, example: str) -> list[float]:
    """`"START:STOP:COUNT"` (both ends included) or `"a,b,c"` -> the sorted distinct values, each in [low, high]
    (None: unbounded); KlgapError naming `flag`, the bad value as not a `what`, and the valid range otherwise."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 2:
                raise KlgapError(f"{flag} {text!r}: the count must be ≥ 2, got {count}")
            values = np.linspace(start, stop, count).round(10).tolist()
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KlgapError(f"{flag} {text!r}: write START:STOP:COUNT (e.g. {example}) or a list (a,b,c)") from None
    if not values:
        raise KlgapError(f"{flag} {text!r} names no {what}; e.g. {example}")
    bad = [v for v in values if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high)]
    if bad:
        where = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        raise KlgapError(f"{flag} {text!r}: {bad[0]:g} is not a {what}; valid values lie in {where}")
    return sorted(dict.fromkeys(values))


def parse_cos_grid(text: str) -> list[float]:
    """`"0.5:1.0:11"` (start:stop:count, both ends included) or `"0.5,0.8,0.95"` -> sorted cosines in [-1, 1]."""
    return parse_grid(text, "--cos", "cosine", -1.0, 1.0, "0.5:1.0:11")


def parse_norm_fracs(text: str | float) -> list[float]:
    """`"0.9"` or `"0.9,1.0"` -> norm fractions (each ≥ 0)."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise KlgapError(f"--norm-frac {text!r} is not a number (or comma list); e.g. 0.9") from None
    bad = [v for v in values if not (v >= 0 and math.isfinite(v))]
    if bad or not values:
        raise KlgapError(f"--norm-frac {text!r}: a norm fraction must be a finite number ≥ 0, e.g. 0.9")
    return list(dict.fromkeys(values))


def curve_interventions(cosines: list[float], norm_fracs: list[float]) -> list[str]:
    """The interventions of a curve run: sae, epsilon_random, then one cosine_matched per (norm_frac, cos)."""
    return ["sae", "epsilon_random"] + [
        f"cosine_matched:cos={c:g},norm_frac={f:g}" for f in norm_fracs for c in cosines
    ]


def first_crossing(cos: np.ndarray, kl: np.ndarray, target: float) -> float | None:
    """The first x (in increasing order) at which a curve's KL equals `target` (a cosine, a length), None outside it.

    Interpolated in log KL between positive points, linearly where an end is ≤ 0 (x' = x gives KL ≈ 0, and
    float noise can make it a hair negative)."""
    ok = np.isfinite(kl)
    cos, kl = cos[ok], kl[ok]
    if cos.size < 2 or not math.isfinite(target):
        return None
    order = np.argsort(cos)
    cos, kl = cos[order], kl[order]
    for i in range(cos.size - 1):
        a, b = kl[i], kl[i + 1]
        if not min(a, b) <= target <= max(a, b):
            continue
        if a == b:
            return float(cos[i])
        if a > 0 and b > 0 and target > 0:
            frac = (math.log(target) - math.log(a)) / (math.log(b) - math.log(a))
        else:
            frac = (target - a) / (b - a)
        return float(cos[i] + (cos[i + 1] - cos[i]) * frac)
    return None


def curve_summary(frame: pd.DataFrame, names: list[str], seed: int = 0) -> dict[str, Any] | None:
    """The ``curve`` section of a report: one point per cosine_matched intervention, the SAE's point, and per
    norm fraction the cosine at which cosine-matched noise does as much damage (KL) as the SAE."""
    sae_rows = frame[frame["intervention"] == "sae"]
    return build_curve(
        names,
        kl_by_context=lambda name: stats.per_context(frame, name, "kl"),
        ce_delta=lambda name: stats.describe(frame.loc[frame["intervention"] == name, "ce_delta"].to_numpy()),
        sae_geometry=lambda: (float(sae_rows["cos"].mean()),
                              norm_frac_mean(sae_rows["x_hat_norm"].to_numpy(), sae_rows["x_norm"].to_numpy()))
        if len(sae_rows) else None,
        seed=seed,
    )


def norm_frac_mean(x_hat_norm: np.ndarray, x_norm: np.ndarray) -> float:
    """Mean of ‖x̂‖/‖x‖ over the tokens where it is finite (in the arrays' dtype, as pandas' mean)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (pd.Series(x_hat_norm, copy=False) / pd.Series(x_norm, copy=False)).replace([np.inf, -np.inf], np.nan)
    return float(frac.mean())


def build_curve(names: list[str], kl_by_context: Callable[[str], pd.DataFrame], ce_delta: Callable[[str], dict[str, Any]],
                sae_geometry: Callable[[], tuple[float, float] | None], seed: int = 0) -> dict[str, Any] | None:
    """The ``curve`` section from per-intervention pieces (a whole frame's or a stream's, klgap/report/aggregate.py):
    kl_by_context(name) = :func:`stats.per_context` of its KL, ce_delta(name) = :func:`stats.describe` of its ΔCE,
    sae_geometry() = the SAE rows' (mean cos, :func:`norm_frac_mean`), None when there are none. None when `names`
    holds no cosine_matched intervention (then nothing is asked of the pieces)."""
    matched = [(n, _POINT.match(n)) for n in names]
    matched = [(n, float(m["cos"]), float(m["frac"])) for n, m in matched if m]
    if not matched:
        return None
    points = []
    for name, cos, frac in matched:
        kl = stats.mean_ci(kl_by_context(name), seed=seed)
        ce = ce_delta(name)
        points.append({"intervention": name, "cos": cos, "norm_frac": frac, "kl_mean": kl["mean"],
                       "kl_ci_low": kl["ci_low"], "kl_ci_high": kl["ci_high"], "ce_delta_mean": ce["mean"],
                       "n_tokens": ce["n"]})
    out: dict[str, Any] = {"points": points, "sae": None, "sae_equivalent_cos": {}}
    geometry = sae_geometry()
    if geometry is not None:
        kl = stats.mean_ci(kl_by_context("sae"), seed=seed)
        out["sae"] = {"cos_mean": geometry[0], "norm_frac_mean": geometry[1],
                      "kl_mean": kl["mean"], "kl_ci_low": kl["ci_low"], "kl_ci_high": kl["ci_high"],
                      "ce_delta_mean": ce_delta("sae")["mean"]}
        for frac_value in sorted({p["norm_frac"] for p in points}):
            curve = [p for p in points if p["norm_frac"] == frac_value]
            out["sae_equivalent_cos"][f"{frac_value:g}"] = first_crossing(
                np.array([p["cos"] for p in curve]), np.array([p["kl_mean"] for p in curve], dtype=float), kl["mean"]
            )
    return out
