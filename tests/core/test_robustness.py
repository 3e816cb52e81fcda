"""Robustness-curve helpers: the cosine grid, the SAE-equivalent cosine, the report's curve section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from klgap.report import robustness as curve

from klgap.report import stats
from klgap.errors import KlgapError


def test_cos_grid_forms():
    assert curve.parse_cos_grid("0.5:1.0:11") == pytest.approx([0.5 + 0.05 * i for i in range(11)])
    assert curve.parse_cos_grid("0.9,0.5, 0.7") == [0.5, 0.7, 0.9]
    assert curve.parse_norm_fracs("0.9,1") == [0.9, 1.0]


@pytest.mark.parametrize(
    "text,message",
    [("0.5:1.5:3", "1.5 is not a cosine"), ("0.5:1.0:1", "count must be ≥ 2"), ("a:b", "START:STOP:COUNT"),
     ("", "names no cosine")],
)
def test_cos_grid_errors(text, message):
    with pytest.raises(KlgapError, match=message):
        curve.parse_cos_grid(text)


def test_norm_frac_errors():
    with pytest.raises(KlgapError, match="≥ 0"):
        curve.parse_norm_fracs("-0.5")


def test_curve_interventions_names_parse_back():
    specs = curve.curve_interventions([0.5, 1.0], [0.9])
    assert specs == ["sae", "epsilon_random", "cosine_matched:cos=0.5,norm_frac=0.9", "cosine_matched:cos=1,norm_frac=0.9"]


def test_equivalent_cos_interpolates_in_log_kl():
    cos = np.array([0.5, 0.7, 0.9])
    kl = np.array([1e-1, 1e-2, 1e-3])
    assert curve.first_crossing(cos, kl, 1e-2) == pytest.approx(0.7)
    assert curve.first_crossing(cos, kl, 10 ** -1.5) == pytest.approx(0.6)  # halfway in log KL
    assert curve.first_crossing(cos, kl, 1.0) is None  # beyond the curve
    # an end at KL <= 0 (x' = x): linear there
    assert curve.first_crossing(np.array([0.9, 1.0]), np.array([1e-3, -1e-9]), 5e-4) == pytest.approx(0.95, abs=1e-6)


def _frame(n_ctx=20, n_pos=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    names = {"sae": 0.02, "cosine_matched(cos=0.5,norm_frac=0.9)": 0.05, "cosine_matched(cos=0.9,norm_frac=0.9)": 0.005}
    for name, level in names.items():
        for c in range(n_ctx):
            for p in range(n_pos):
                rows.append({"intervention": name, "context": c, "position": p, "draw": -1,
                             "kl": level * rng.uniform(0.5, 1.5), "ce_delta": 0.0, "cos": 0.8,
                             "x_norm": 2.0, "x_hat_norm": 1.6})
    return pd.DataFrame(rows), list(names)


def test_curve_summary_points_and_sae():
    frame, names = _frame()
    out = curve.curve_summary(frame, names, seed=0)
    assert [p["cos"] for p in out["points"]] == [0.5, 0.9]
    p0 = out["points"][0]
    rows = frame[frame.intervention == names[1]]
    assert p0["kl_mean"] == pytest.approx(rows.kl.mean())
    assert p0["kl_ci_low"] < p0["kl_mean"] < p0["kl_ci_high"]
    assert out["sae"]["cos_mean"] == pytest.approx(0.8) and out["sae"]["norm_frac_mean"] == pytest.approx(0.8)
    sae_kl = frame[frame.intervention == "sae"].kl.mean()
    expected = 0.5 + 0.4 * (math.log(sae_kl) - math.log(p0["kl_mean"])) / (
        math.log(out["points"][1]["kl_mean"]) - math.log(p0["kl_mean"]))
    assert out["sae_equivalent_cos"]["0.9"] == pytest.approx(expected)
    assert curve.curve_summary(frame[frame.intervention == "sae"], ["sae"]) is None


def test_mean_ci_width_shrinks_with_contexts():
    small, _ = _frame(n_ctx=10, seed=1)
    large, _ = _frame(n_ctx=160, seed=1)
    widths = []
    for frame in (small, large):
        ci = stats.mean_ci(stats.per_context(frame, "sae", "kl"))
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
        widths.append(ci["ci_high"] - ci["ci_low"])
    assert widths[1] < widths[0] / 2
