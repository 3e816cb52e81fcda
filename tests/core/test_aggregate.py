"""klgap.report.aggregate streams a run's parts into the numbers report.py computed from the whole per-token frame: the
same numbers, bit for bit (Spearman to rel 1e-12: stats.spearman sums ranks exactly, scipy in float64), in every
mode, with the awkward cases (non-finite values, interleaved rows, missing baseline rows, parts out of order)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from klgap.report import aggregate

from klgap.report import stats
from tests.core import whole_frame as report
from klgap.report.robustness import curve_summary
from klgap.job.folder import RunDir

SEED = 5
ALL = ["sae", "sae_norm", "epsilon_random", "theta_random", "cosine_matched(cos=0.5,norm_frac=0.9)",
       "cosine_matched(cos=0.9,norm_frac=0.9)"]


class Tokenizer:
    def decode(self, ids):
        return f"<{ids[0]}>"


def _f32(values):
    return np.asarray(values, dtype=np.float32)


def _part(rng, contexts, positions, names, *, offset0=None, n_draws=0, sample=None, vocab=12):
    """One batch as klgap.job.modes.table makes it: a block of rows per intervention (then the draws)."""
    n = len(contexts) * len(positions)
    base = {
        "context": np.repeat(contexts, len(positions)).astype(np.int64),
        "position": np.tile(positions, len(contexts)).astype(np.int64),
        "token_id": rng.integers(0, vocab, n).astype(np.int64),
        "eps": _f32(rng.lognormal(0, 0.3, n)), "cos": _f32(rng.uniform(0.3, 1, n)),
        "x_norm": _f32(rng.lognormal(1, 0.2, n)), "x_hat_norm": _f32(rng.lognormal(1, 0.2, n)),
        "l0": _f32(rng.integers(1, 40, n)),
    }
    base["offset"] = base["position"] - (offset0 if offset0 is not None else 0)
    frames = []
    for j, name in enumerate(names):
        kl = rng.lognormal(-4 + 0.2 * j, 1.0, n) * (1 + 0.05 * base["l0"])
        # once per token; from the row's other values, so the rng's stream (and every other number) is unchanged
        clean = _f32(3.0 + base["eps"] - 0.01 * base["l0"]) if j == 0 else np.full(n, np.nan, np.float32)
        frames.append(pd.DataFrame({**base, "intervention": name, "draw": -1, "kl": _f32(kl),
                                    "ce_delta": _f32(rng.normal(0.01, 0.05, n)), "ce_clean": clean}))
    if n_draws:
        owner = np.repeat(np.arange(n), n_draws)
        frames.append(pd.DataFrame({**{k: v[owner] for k, v in base.items()}, "intervention": sample,
                                    "draw": np.tile(np.arange(n_draws), n), "kl": _f32(rng.lognormal(-4, 1.0, n * n_draws)),
                                    "ce_delta": _f32(rng.normal(0.01, 0.05, n * n_draws)),
                                    "ce_clean": np.full(n * n_draws, np.nan, np.float32)}))
    return pd.concat(frames, ignore_index=True)


def _side(rng, n, nonfinite=0):
    return {"n": n, "n_nonfinite_acts": nonfinite, "sum_x": rng.normal(0, 1, 8).tolist(), "sum_sq_x": float(n * 8),
            "sum_sq_err": float(n * 2.5), "sum_ev_legacy": float(n * rng.uniform(0.2, 0.9))}


def _mean_offset_share(sides):
    """‖x̄‖² / mean ‖x‖² from the sides (float64, exactly rounded sums)."""
    n = sum(s["n"] for s in sides)
    mean = np.sum([np.asarray(s["sum_x"]) for s in sides], axis=0) / n
    return math.fsum((mean * mean).tolist()) / (math.fsum(s["sum_sq_x"] for s in sides) / n)


def _write(folder, parts, sides, order=None):
    rundir = RunDir(folder)
    rundir.parts.mkdir(parents=True, exist_ok=True)
    for index, (frame, side) in enumerate(zip(parts, sides, strict=True)):
        rundir.write_part(order[index] if order else index, frame, side)
    return rundir


def _today(rundir, names, mode, sample=None):
    """What build_report computed from the whole frame (report.py / curve.py / stats.py)."""
    frame, sides = rundir.read_parts()
    measured = frame[frame["draw"] < 0] if (frame["draw"] >= 0).any() else frame
    comparisons = report.compare_to_sae(measured, names, SEED)
    report.add_holm(comparisons)
    sae_rows = measured[measured["intervention"] == names[0]]
    out = {
        "n_tokens": len(sae_rows),
        "n_contexts": measured["context"].nunique(),
        "interventions": report.summarize_interventions(measured),
        "comparisons": comparisons,
        "kl_ratio_sae_over_epsilon_random": comparisons.get("epsilon_random", {}).get("kl_ratio", {}).get("ratio", math.nan),
        "sae_metrics": {
            "explained_variance": report.explained_variance(sides),
            # the mean of the per-token legacy terms (each side: its batch's sum), and 1 − EV
            "explained_variance_legacy": sum(s["sum_ev_legacy"] for s in sides) / sum(s["n"] for s in sides),
            "fvu": 1 - report.explained_variance(sides),
            # the anisotropy: only the mean offset here (these sides hold no principal components)
            "mean_offset_share": _mean_offset_share(sides),
            "top_pc_share": None, "explained_variance_top_pc_removed": None,
            "explained_variance_top_pcs_removed": None, "top_pcs_removed_min": None, "top_pcs_removed_max": None,
            **{f"{c}_mean": float(sae_rows[c].mean()) for c in ("l0", "cos", "eps", "x_norm", "x_hat_norm")},
            "n_nonfinite_activations": int(sum(s.get("n_nonfinite_acts", 0) for s in sides)),
        },
        "gap": report.gap_analysis(measured, Tokenizer()) if mode != "many_samples" else None,
        "curve": curve_summary(measured, names, SEED) if mode != "many_samples" else None,
        "kl_by_offset": {str(name): rows.groupby("offset")["kl"].mean().to_dict()
                         for name, rows in measured.groupby("intervention", sort=False, observed=True)}
        if mode == "single_token" else None,
        "many_samples": report.many_samples_summary(frame, sample) if mode == "many_samples" else None,
        "ce_clean": _clean_ce_whole(frame),
    }
    return json.loads(json.dumps(report.plain(out)))


def _clean_ce_whole(frame):
    """The mean clean CE with its context bootstrap from the whole frame: every finite ce_clean (one per token)."""
    rows = frame[np.isfinite(frame["ce_clean"])]
    grouped = rows["ce_clean"].astype(np.float64).groupby(rows["context"])
    return stats.mean_ci(pd.DataFrame({"sum": grouped.sum(), "n": grouped.count()}), seed=SEED)


def _streamed(rundir, names, mode, sample=None):
    batches = sorted(rundir.done_batches())
    result = aggregate.run_statistics(
        [rundir.part_paths(i)[0] for i in batches], [json.loads(rundir.part_paths(i)[1].read_text()) for i in batches],
        names=names, mode=mode, seed=SEED, sample_name=sample, decode=lambda i: f"<{i}>")
    dump = {key: getattr(result, key) for key in aggregate.RunStatistics.__dataclass_fields__}
    dump = {key: value.model_dump() if hasattr(value, "model_dump") else
            {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in value.items()} if isinstance(value, dict)
            else value for key, value in dump.items()}
    return json.loads(json.dumps(report.plain(dump)))


def _assert_same(got, expected, path=""):
    """Equal, except each Spearman ρ and p within rel 1e-12 (see stats.spearman)."""
    if isinstance(expected, dict) and path.endswith("spearman"):
        assert got.keys() == expected.keys(), path
        for column, corr in expected.items():
            assert got[column]["n"] == corr["n"], (path, column)
            for key in ("rho", "p_value"):
                assert (got[column][key] is None) == (corr[key] is None), (path, column, key)
                if corr[key] is not None:
                    assert got[column][key] == pytest.approx(corr[key], rel=1e-12, abs=0), (path, column, key)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (path, got, expected)
        for key in expected:
            _assert_same(got[key], expected[key], f"{path}.{key}")
    else:
        assert got == expected, (path, got, expected)


def _all_tokens_parts(rng, n_batches=4, batch=3, n_pos=15, vocab=12):
    positions = np.arange(1, n_pos + 1)
    parts = [_part(rng, np.arange(b * batch, (b + 1) * batch), positions, ALL, vocab=vocab) for b in range(n_batches)]
    return parts, [_side(rng, batch * n_pos) for _ in parts]


def test_all_tokens_equals_the_whole_frame(tmp_path):
    rng = np.random.default_rng(0)
    parts, sides = _all_tokens_parts(rng)
    rundir = _write(tmp_path, parts, sides)
    expected = _today(rundir, ALL, "all_tokens")
    assert expected["gap"]["top_tokens"] and expected["curve"]["points"]  # the case exercises both
    _assert_same(_streamed(rundir, ALL, "all_tokens"), expected)


def test_awkward_parts_equal_the_whole_frame(tmp_path, monkeypatch):
    """Non-finite KL/ΔCE/cos (the whole run's pandas sums take the Kahan loop), x_norm = 0, interleaved rows,
    missing baseline rows (the gap's join), a part in several row groups, top tokens grouped 7 rows at a time."""
    rng = np.random.default_rng(1)
    parts, sides = _all_tokens_parts(rng)
    kl, ce = parts[1].columns.get_loc("kl"), parts[1].columns.get_loc("ce_delta")
    parts[1].iloc[[3, 100], kl] = [np.nan, np.inf]  # a row of sae, one of epsilon_random
    parts[2].iloc[5, ce] = np.nan
    parts[2].iloc[5, parts[2].columns.get_loc("ce_clean")] = np.nan  # the same sae row: no next token
    parts[2].iloc[7, parts[2].columns.get_loc("cos")] = np.nan
    parts[3].iloc[2, parts[3].columns.get_loc("x_norm")] = 0.0
    parts[0] = pd.concat([parts[0].iloc[0:40:2], parts[0].iloc[1:40:2], parts[0].iloc[40:]], ignore_index=True)
    eps = parts[2]["intervention"] == "epsilon_random"
    parts[2] = parts[2].drop(parts[2].index[eps][[0, 9, 10]])
    sides[1]["n_nonfinite_acts"] = 2
    rundir = _write(tmp_path, parts, sides)
    parts[3].to_parquet(rundir.part_paths(3)[0], index=False, row_group_size=50)  # a part in several row groups
    monkeypatch.setattr(stats, "TOP_TOKEN_ROWS", 7)
    expected = _today(rundir, ALL, "all_tokens")
    assert expected["interventions"]["sae"]["n_nonfinite"] == 1 and expected["gap"]["spearman"]["cos"]["n"] == 174
    _assert_same(_streamed(rundir, ALL, "all_tokens"), expected)


def test_parts_out_of_context_order_and_ordered_token_ids(tmp_path):
    """Contexts going back between parts (pandas' whole-run sums take the Kahan loop), and token ids in order
    through the run (its top-token means take reduceat, in float64)."""
    rng = np.random.default_rng(2)
    parts, sides = _all_tokens_parts(rng)
    for frame in parts:
        frame["token_id"] = frame["context"]
    rundir = _write(tmp_path / "ordered", parts, sides)
    _assert_same(_streamed(rundir, ALL, "all_tokens"), _today(rundir, ALL, "all_tokens"))
    rundir = _write(tmp_path / "reversed", parts, sides, order=[3, 2, 1, 0])
    _assert_same(_streamed(rundir, ALL, "all_tokens"), _today(rundir, ALL, "all_tokens"))


def test_single_token_equals_the_whole_frame(tmp_path):
    rng = np.random.default_rng(3)
    names, t, k = ["sae", "epsilon_random", "theta_random"], 8, 4
    positions = np.arange(t, t + k + 1)
    parts = [_part(rng, np.arange(b * 4, (b + 1) * 4), positions, names, offset0=t, vocab=3) for b in range(3)]
    rundir = _write(tmp_path, parts, [_side(rng, 4) for _ in parts])
    expected = _today(rundir, names, "single_token")
    assert list(expected["kl_by_offset"]["sae"]) == ["0", "1", "2", "3", "4"]
    _assert_same(_streamed(rundir, names, "single_token"), expected)


def test_many_samples_equals_the_whole_frame(tmp_path):
    rng = np.random.default_rng(4)
    names = ["sae", "epsilon_random"]
    parts = [_part(rng, np.arange(b * 3, (b + 1) * 3), np.array([8]), names, offset0=8, n_draws=20,
                   sample="epsilon_random") for b in range(3)]
    rundir = _write(tmp_path, parts, [_side(rng, 3) for _ in parts])
    expected = _today(rundir, names, "many_samples", "epsilon_random")
    assert expected["many_samples"]["n_draws"] == 20 and len(expected["many_samples"]["per_context"]) == 9
    _assert_same(_streamed(rundir, names, "many_samples", "epsilon_random"), expected)


def test_token_gaps_equal_the_study_reading_tokens_parquet(tmp_path):
    rng = np.random.default_rng(5)
    parts, sides = _all_tokens_parts(rng)
    eps = parts[1]["intervention"] == "epsilon_random"
    parts[1] = parts[1].drop(parts[1].index[eps][[4]])
    rundir = _write(tmp_path, parts, sides)
    rundir.write_tokens(tmp_path / "tokens.parquet")
    frame = pd.read_parquet(tmp_path / "tokens.parquet", columns=["context", "position", "intervention", "draw", "kl"])
    expected = stats.token_gap(frame).set_index(["context", "position"])["gap"]
    got = aggregate.token_gaps([rundir.part_paths(i)[0] for i in sorted(rundir.done_batches())])
    pd.testing.assert_series_equal(got, expected)
    assert aggregate.token_gaps([rundir.part_paths(0)[0]], baseline="zero") is None


@pytest.mark.parametrize("case", ["ties", "ints", "nan", "tiny"])
def test_spearman_matches_scipy(case):
    rng = np.random.default_rng(6)
    n = {"tiny": 5}.get(case, 5000)
    a = _f32(rng.normal(size=n))
    b = _f32(a + rng.normal(size=n))
    if case == "ties":
        a, b = np.round(a, 1), np.round(b, 1)
    if case == "ints":
        b = rng.integers(0, 30, n).astype(np.int32) + (a > 0) * 5
    if case == "nan":
        a[[3, 17]], b[[17, 40]] = np.nan, np.inf
    ok = np.isfinite(a) & np.isfinite(b)
    expected = sps.spearmanr(a[ok], b[ok])
    got = stats.spearman(a, b)
    assert got["n"] == ok.sum()
    assert got["rho"] == pytest.approx(float(expected.statistic), rel=1e-12)
    assert got["p_value"] == pytest.approx(float(expected.pvalue), rel=1e-12)
    if case != "nan":
        assert stats.spearman(a, b, stats.centred_ranks(a)) == got


def test_spearman_undefined_cases():
    assert math.isnan(stats.spearman(np.arange(2.0), np.arange(2.0))["rho"])
    constant = stats.spearman(np.ones(10), np.arange(10.0))
    assert math.isnan(constant["rho"]) and constant["n"] == 10
    assert stats.spearman(np.arange(10.0), -np.arange(10.0))["rho"] == -1.0


def test_centred_ranks_are_twice_scipy_ranks_centred():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, -0.0, 0.0])
    np.testing.assert_array_equal(stats.centred_ranks(values), 2 * sps.rankdata(values) - (values.size + 1))


def _top_tokens_whole(gaps, min_count=5, n=15):
    """stats.top_tokens before it grouped by ranges of ids: one groupby over every row."""
    grouped = gaps.groupby("token_id")["gap"].agg(["mean", "count"])
    grouped = grouped[grouped["count"] >= min_count].sort_values("mean", ascending=False)
    return grouped.head(n).reset_index().rename(columns={"mean": "mean_gap"})


@pytest.mark.parametrize("case", ["shuffled", "ordered", "nan", "empty"])
@pytest.mark.parametrize("rows_at_once", [7, 1 << 18])
def test_top_tokens_by_ranges_of_ids_equal_one_groupby(monkeypatch, case, rows_at_once):
    """Kahan loop (ids shuffled, or a NaN gap) or reduceat in float64 (ids in order): the same means either way."""
    monkeypatch.setattr(stats, "TOP_TOKEN_ROWS", rows_at_once)
    rng = np.random.default_rng(7)
    n = 0 if case == "empty" else 400
    token_id = rng.integers(0, 40, n).astype(np.int32)
    if case == "ordered":
        token_id.sort()
    gap = _f32(rng.normal(0, 1e-3, n))
    if case == "nan":
        gap[[5, 50]] = np.nan
    gaps = pd.DataFrame({"token_id": token_id, "gap": gap})
    expected = _top_tokens_whole(gaps)
    assert expected["mean_gap"].dtype == (np.float64 if case == "ordered" else np.float32)
    pd.testing.assert_frame_equal(stats.top_tokens_of(token_id, gap), expected)
