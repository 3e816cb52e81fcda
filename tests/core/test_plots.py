"""Figures drawn from a synthetic run folder in every mode (no model needed).

The builders here (`make_tokens`, `make_report`, `write_run`) are shared with test_render.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from klgap.figures import runs as plots
from tests.core import whole_frame as report_mod
from klgap.report.schema import SCHEMA_VERSION, Report, SiteSummary, StudyReport, StudyRun
from klgap.report.read import load_report, validate_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODES = ("all_tokens", "single_token", "many_samples")
INTERVENTIONS = ("sae", "epsilon_random", "theta_random")
KL_LOG_MEAN = {"sae": -3.0, "epsilon_random": -3.6, "theta_random": -3.3}  # sae > epsilon_random
N_CONTEXTS, CONTEXT_LEN, POSITION, K, N_DRAWS = 20, 32, 8, 6, 40
EXPECTED = {
    "all_tokens": {"kl_bars.png", "kl_hist.png", "kl_by_position.png"},
    "single_token": {"kl_bars.png", "kl_hist.png", "single_token.png"},
    "many_samples": {"kl_bars.png", "kl_hist.png", "many_samples.png"},
}


def _rows(rng: np.random.Generator, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """context, position, offset for one intervention's rows."""
    if mode == "all_tokens":
        positions = np.arange(1, CONTEXT_LEN)  # 31 positions: the first is left out, as the engine does
        offsets = positions
    elif mode == "single_token":
        positions = np.arange(POSITION, POSITION + K + 1)
        offsets = positions - POSITION
    else:
        positions = offsets = np.array([POSITION])
    contexts = np.repeat(np.arange(N_CONTEXTS), len(positions))
    return contexts, np.tile(positions, N_CONTEXTS), np.tile(offsets, N_CONTEXTS)


def make_tokens(mode: str, seed: int = 0) -> pd.DataFrame:
    """A tokens table shaped like the engine's: lognormal KL, sae larger than epsilon_random."""
    rng = np.random.default_rng(seed)
    contexts, positions, offsets = _rows(rng, mode)
    n = len(contexts)
    context_effect = rng.normal(0, 0.3, N_CONTEXTS)[contexts]
    per_token = {
        "token_id": rng.integers(0, 50_000, n),
        "eps": rng.gamma(4, 2, n).astype(np.float32),
        "cos": rng.uniform(0.6, 0.95, n).astype(np.float32),
        "x_norm": rng.gamma(8, 4, n).astype(np.float32),
        "x_hat_norm": rng.gamma(8, 3, n).astype(np.float32),
        "l0": rng.poisson(40, n).astype(np.float32),
    }
    decay = -offsets / 2.0 if mode == "single_token" else 0.0
    frames = []
    for name in INTERVENTIONS:
        kl = np.exp(KL_LOG_MEAN[name] + context_effect + decay + rng.normal(0, 0.8, n))
        ce = kl + rng.normal(0, 0.05, n)
        ce[positions == CONTEXT_LEN - 1] = np.nan  # the next token is unknown at the last position
        frames.append(pd.DataFrame({"context": contexts, "position": positions, **per_token, "offset": offsets,
                                    "intervention": name, "draw": -1, "kl": kl.astype(np.float32),
                                    "ce_delta": ce.astype(np.float32)}))
    if mode == "many_samples":
        owner = np.repeat(np.arange(N_CONTEXTS), N_DRAWS)
        kl = np.exp(KL_LOG_MEAN["epsilon_random"] + context_effect[owner] + rng.normal(0, 0.5, len(owner)))
        frames.append(pd.DataFrame({"context": owner, "position": POSITION,
                                    **{k: v[owner] for k, v in per_token.items()}, "offset": 0,
                                    "intervention": "epsilon_random", "draw": np.tile(np.arange(N_DRAWS), N_CONTEXTS),
                                    "kl": kl.astype(np.float32), "ce_delta": kl.astype(np.float32)}))
    return pd.concat(frames, ignore_index=True)


def make_report(mode: str, tokens: pd.DataFrame, seed: int = 0) -> Report:
    """A run report built from `tokens` with klgap.report.build's own summaries, validated into the schema's model."""
    measured = tokens[tokens["draw"] < 0]
    sae = measured[measured["intervention"] == "sae"]
    comparisons = report_mod.compare_to_sae(measured, list(INTERVENTIONS), seed)
    report_mod.add_holm(comparisons)
    config = {"model": "fake-gpt", "site": "resid_post", "layer": 3, "mode": mode, "interventions": list(INTERVENTIONS),
              "n_tokens": N_CONTEXTS * CONTEXT_LEN, "context_len": CONTEXT_LEN, "seed": seed, "position": POSITION,
              "k": K, "n_samples": N_DRAWS, "sample_intervention": "epsilon_random"}
    report = {
        "schema_version": SCHEMA_VERSION, "kind": "run", "model": "fake-gpt", "site": "resid_post", "layer": 3,
        "hook_name": "blocks.3.hook_resid_post",
        "module": {"path": "transformer.h.3", "io": "output", "index": 0},
        "sae": {"source": "fake://sae", "hook_name": "blocks.3.hook_resid_post", "architecture": "standard",
                "d_in": 64, "d_sae": 512, "info": {}},
        "mode": mode, "n_tokens": len(sae), "n_contexts": N_CONTEXTS, "context_len": CONTEXT_LEN,
        "first_position": "excluded (not patched, not measured)", "centered_activations": False, "execution": {},
        "interventions": report_mod.summarize_interventions(measured),
        "kl_ratio_sae_over_epsilon_random": comparisons["epsilon_random"]["kl_ratio"]["ratio"],
        "comparisons": comparisons,
        "sae_metrics": {"explained_variance": 0.8, "l0_mean": float(sae["l0"].mean()), "cos_mean": float(sae["cos"].mean()),
                        "eps_mean": float(sae["eps"].mean()), "x_norm_mean": float(sae["x_norm"].mean()),
                        "x_hat_norm_mean": float(sae["x_hat_norm"].mean()), "n_nonfinite_activations": 0},
        "gap": None, "notes": ["synthetic data for tests"], "config": config, "seed": seed, "device": "cpu",
        "dtype": "float32", "dataset": "synthetic",
        "plugins": {"model:fake-gpt": {"plugin": "tests", "version": None}},
        "provenance": {"klgap_version": "0.0.0", "git_hash": None, "packages": {"pandas": pd.__version__},
                       "python": "3", "platform": "test", "created_at": "2026-01-01T00:00:00+00:00"},
    }
    if mode == "single_token":
        report["single_token"] = {"position": POSITION, "k": K, "kl_by_offset": {
            str(name): rows.groupby("offset")["kl"].mean().to_dict()
            for name, rows in measured.groupby("intervention", sort=False)}}
    if mode == "many_samples":
        report["many_samples"] = report_mod.many_samples_summary(tokens, "epsilon_random")
    return validate_report(report_mod.plain(report), source="synthetic report")


def make_study(reports: list[Report]) -> StudyReport:
    """A study report whose runs are `reports` (one site/layer each), in folders named like the engine's."""
    runs = [StudyRun(**{k: getattr(r, k) for k in SiteSummary.model_fields}, path=f"{r.site}_L{r.layer:02d}")
            for r in reports]
    return StudyReport(schema_version=SCHEMA_VERSION, kind="study", model=reports[0].model, mode=reports[0].mode,
                       runs=runs, gap_correlation_between_runs=[], config={}, provenance=reports[0].provenance)


def write_run(root: Path, mode: str, report: Report | None = None, tokens: pd.DataFrame | None = None) -> Path:
    """A run folder with the file names the engine writes (a NaN put into the report stays a JSON NaN)."""
    tokens = make_tokens(mode) if tokens is None else tokens
    report = make_report(mode, tokens) if report is None else report
    root.mkdir(parents=True, exist_ok=True)
    tokens.to_parquet(root / "tokens.parquet", index=False)
    (root / "report.json").write_text(json.dumps(report.model_dump(exclude_unset=True), indent=2))
    return root


def assert_png(path: Path, min_side: int = 400) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 8_000, (path, len(data))
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= min_side, image.shape
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


@pytest.fixture(params=MODES)
def run_dir(request, tmp_path) -> Path:
    return write_run(tmp_path / request.param, request.param)


def test_figures_for_run_every_mode(run_dir):
    paths = plots.figures_for_run(run_dir)
    assert {p.name for p in paths} == EXPECTED[load_report(run_dir).mode]
    for path in paths:
        assert_png(path)
    assert plt.get_fignums() == []  # every figure closed


def test_figures_for_run_reads_parquet_once(tmp_path, monkeypatch):
    root = write_run(tmp_path / "run", "many_samples")
    calls = []
    original = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    plots.figures_for_run(root)
    assert len(calls) == 1


def test_figures_without_tokens_table(tmp_path):
    root = write_run(tmp_path / "run", "single_token")
    (root / "tokens.parquet").unlink()
    names = {p.name for p in plots.figures_for_run(root)}
    assert names == {"kl_bars.png", "single_token.png"}  # both can be drawn from report.json alone


def test_kl_bars_several_layers_and_sites(tmp_path):
    tokens = make_tokens("all_tokens")
    base = make_report("all_tokens", tokens)
    layers = [base.model_copy(update={"layer": i, "interventions": {
        k: v.model_copy(update={"kl_mean": v.kl_mean * (i + 1)}) for k, v in base.interventions.items()}})
        for i in range(4)]
    assert_png(plots.kl_bars(layers, tmp_path / "layers.png"))
    sites = [base.model_copy(update={"site": "mlp_out"}), base.model_copy(update={"site": "attn_out"})]
    assert_png(plots.kl_bars(sites, tmp_path / "sites.png"))
    assert_png(plots.kl_bars(base, tmp_path / "one.png", tokens=tokens))
    assert_png(plots.kl_bars(make_study(layers), tmp_path / "study.png"))


def test_kl_bars_tolerates_missing_values(tmp_path):
    report = make_report("all_tokens", make_tokens("all_tokens"))
    report.interventions["sae"].kl_mean = None
    report.interventions["epsilon_random"].kl_mean = float("nan")
    assert plots.kl_bars(report, tmp_path / "bars.png").read_bytes()[:8] == PNG_MAGIC


def test_single_token_curve_from_report_or_tokens(tmp_path):
    tokens = make_tokens("single_token")
    report = make_report("single_token", tokens)
    assert_png(plots.single_token_curve(report, tmp_path / "from_report.png"))
    assert_png(plots.single_token_curve(tokens, tmp_path / "from_tokens.png", report))


def test_many_samples_hist_recomputes_z_without_report(tmp_path):
    tokens = make_tokens("many_samples")
    assert_png(plots.many_samples_hist(tokens, None, tmp_path / "ms.png"))


def test_kl_histogram_ignores_nonfinite_and_zero(tmp_path):
    tokens = make_tokens("all_tokens")
    tokens.loc[:10, "kl"] = np.nan
    tokens.loc[11:20, "kl"] = 0.0
    assert_png(plots.kl_histogram(tokens, tmp_path / "hist.png"))


def test_robustness_curve(tmp_path):
    cos = np.linspace(0.5, 0.99, 8)
    points = {"L3": [(c, float(np.exp(-8 * c))) for c in cos], "L6": [(c, float(np.exp(-6 * c))) for c in cos]}
    path = plots.robustness_curve(points, tmp_path / "curve.png", sae_points={"L3": (0.8, 0.01), "L6": (0.85, 0.02)},
                                  subtitle="fake-gpt · resid_post · all_tokens")
    assert_png(path)
    assert plt.get_fignums() == []


def test_robustness_curve_keeps_near_zero_kl_from_squashing_the_axis(tmp_path):
    points = {"a": [(0.5, 0.2), (0.9, 0.05), (1.0, 0.0)], "b": [(0.5, 0.1), (0.9, 0.01), (1.0, 1e-9)]}
    path = plots.robustness_curve(points, tmp_path / "r.png", sae_points={"a": (0.8, 0.06)})
    assert mpimg.imread(path).shape[0] > 100 and not plt.get_fignums()  # written, no pyplot figure left open
    # the floor ignores the ~0 values at cos = 1: 1/20 of the smallest other KL (0.01)
    assert plots.curve_floor(points, {"a": (0.8, 0.06)}) == pytest.approx(0.01 / 20)
    assert plots.curve_floor({"a": [(1.0, 0.0)]}) is None


def test_importing_and_drawing_leave_the_callers_matplotlib_alone(tmp_path):
    """A notebook's backend and open figures are untouched; with no path a figure comes back to display."""
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import klgap.figures.runs as p; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "svg"
    fig = plots.robustness_curve({"sae": [(0.5, 0.2), (0.9, 0.01)]}, None, {"sae": (0.8, 0.05)})
    assert fig.axes and fig.axes[0].get_xlabel() and not plt.get_fignums()
