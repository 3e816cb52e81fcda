"""The KL ratio at matched error size (klgap/report/size_bins.py): bins of the SAE's ε/‖x‖ per token, the ratio per
bin equal to a hand computation on a small frame (over two parts, one with its baseline rows out of order)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from klgap.job.folder import RunDir
from klgap.report import stats
from klgap.report.size_bins import EDGES, bin_of, size_bins


def test_bin_of_puts_each_relative_error_in_its_fixed_bin():
    eps = np.array([0.0, 0.05, 0.1, 0.25, 0.59, 0.6, 0.99, 1.0, 7.0, 1.0, np.nan])
    x_norm = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    assert bin_of(eps, x_norm).tolist() == [0, 0, 1, 2, 5, 6, 7, 8, 8, -1, -1]
    assert EDGES[6:] == (0.6, 0.8, 1.0, math.inf)


def _frame(context, eps, x_norm, kl_by_name, positions=None):
    n = len(eps)
    positions = positions if positions is not None else list(range(1, n + 1))
    frames = []
    for name, kl in kl_by_name.items():
        frames.append(pd.DataFrame({"context": np.full(n, context, np.int64), "position": np.array(positions, np.int64),
                                    "token_id": np.zeros(n, np.int64), "intervention": name,
                                    "draw": np.full(n, -1, np.int64), "kl": np.asarray(kl, np.float32),
                                    "ce_delta": np.zeros(n, np.float32), "eps": np.asarray(eps, np.float32),
                                    "cos": np.ones(n, np.float32), "x_norm": np.asarray(x_norm, np.float32),
                                    "x_hat_norm": np.ones(n, np.float32), "l0": np.ones(n, np.float32),
                                    "offset": np.zeros(n, np.int64)}))
    return pd.concat(frames, ignore_index=True)


def test_ratio_per_bin_equals_a_hand_computation(tmp_path):
    # context 0: ε/‖x‖ = 0.05, 0.15, 0.15, 0.5; context 1: 0.05, 0.15, 2.0
    part0 = _frame(0, [0.1, 0.3, 0.45, 1.0], [2.0, 2.0, 3.0, 2.0],
                   {"sae": [1.0, 2.0, 4.0, 8.0], "epsilon_random": [2.0, 1.0, 1.0, 2.0], "other": [1, 1, 1, 1]})
    part1 = _frame(1, [0.5, 1.5, 4.0], [10.0, 10.0, 2.0],
                   {"sae": [3.0, 6.0, 9.0], "epsilon_random": [1.0, 3.0, 3.0]})
    # the baseline's rows of part 1 out of order: they pair with the SAE's on (context, position), not by row
    base = part1[part1["intervention"] == "epsilon_random"].iloc[::-1]
    part1 = pd.concat([part1[part1["intervention"] == "sae"], base], ignore_index=True)
    rundir = RunDir(tmp_path)
    rundir.parts.mkdir(parents=True)
    side = {"n": 4, "n_nonfinite_acts": 0, "sum_x": [0.0], "sum_sq_x": 1.0, "sum_sq_err": 0.5}
    rundir.write_part(0, part0, side)
    rundir.write_part(1, part1, side)
    paths = [rundir.part_paths(i)[0] for i in (0, 1)]
    found = size_bins(paths, ["epsilon_random", "theta_random"], seed=3)
    assert found.baselines == ["epsilon_random"]  # theta_random was not measured
    assert [(b.low, b.high, b.n_tokens, b.n_contexts) for b in found.bins] == [
        (0.0, 0.1, 2, 2), (0.1, 0.2, 3, 2), (0.5, 0.6, 1, 1), (1.0, None, 1, 1)]
    # by hand: bin [0.1, 0.2) holds context 0's tokens 2, 3 (sae 2 + 4, eps 1 + 1) and context 1's token 2 (6, 3)
    low = found.bins[1]
    assert low.kl_sae == pytest.approx((2 + 4 + 6) / 3)
    assert low.ratios["epsilon_random"].ratio == pytest.approx((12 / 3) / (5 / 3))
    sae = pd.DataFrame({"sum": [6.0, 6.0], "n": [2, 1]}, index=pd.Index([0, 1], name="context"))
    eps = pd.DataFrame({"sum": [2.0, 3.0], "n": [2, 1]}, index=pd.Index([0, 1], name="context"))
    expected = stats.ratio_of_means_ci(sae, eps, seed=3)
    assert low.ratios["epsilon_random"].ci_low == pytest.approx(expected["ci_low"])
    assert low.ratios["epsilon_random"].ci_high == pytest.approx(expected["ci_high"])
    first = found.bins[0]  # context 0 token 1 (sae 1, eps 2), context 1 token 1 (3, 1)
    assert first.ratios["epsilon_random"].ratio == pytest.approx((4 / 2) / (3 / 2))
    last = found.bins[3].ratios["epsilon_random"]  # ε/‖x‖ = 2: the open bin, one context: no interval
    assert last.ratio == pytest.approx(9 / 3) and (last.ci_low, last.ci_high, last.n_contexts) == (None, None, 1)


def test_no_bins_without_the_sae_or_any_baseline(tmp_path):
    rundir = RunDir(tmp_path)
    rundir.parts.mkdir(parents=True)
    rundir.write_part(0, _frame(0, [0.1], [1.0], {"sae": [1.0], "zero": [2.0]}),
                      {"n": 1, "n_nonfinite_acts": 0, "sum_x": [0.0], "sum_sq_x": 1.0, "sum_sq_err": 0.5})
    assert size_bins([rundir.part_paths(0)[0]], ["epsilon_random"]) is None
