"""End to end on a tiny model: `klgap curve --along error` (the length sweep) and the baseline panel of every report
kind (run page and terminal, study page, compare, Python's Result)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import klgap
from klgap.cli.main import main
from klgap.render.pages import render_markdown
from klgap.report.panel import baseline_panel, opening_sentence
from klgap.report.read import load_report
from tests.core.test_plots import make_study
from tests.helpers import random_sae

FAST = ["--tokens", "600", "--context-len", "32", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    return random_sae(tmp_path_factory.mktemp("sweep_sae") / "sae.safetensors", 64, 256, "blocks.1.hook_resid_pre", seed=1)


@pytest.fixture(scope="module")
def sweep_run(sae, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    argv = ["curve", "--model", "tiny-gpt2", "--sae", str(sae), "--along", "error", "--scale", "0:1:3",
            "--baselines", "epsilon_random,sae_error_shuffled", "--interventions", "theta_random,zero", "--out",
            str(out), *FAST]
    assert main(argv) == 0
    return out


def test_sweep_runs_the_error_and_each_baseline_over_the_grid(sweep_run):
    report = load_report(sweep_run)
    along = [f"along(dir={d},t={t})" for d in ("error", "epsilon_random", "sae_error_shuffled") for t in ("0", "0.5", "1")]
    assert list(report.interventions) == ["sae", "epsilon_random", "sae_error_shuffled", *along, "theta_random", "zero"]
    tokens = pd.read_parquet(sweep_run / "tokens.parquet")
    kl = {name: rows.sort_values(["context", "position"])["kl"].to_numpy()
          for name, rows in tokens.groupby("intervention", observed=True)}
    assert np.array_equal(kl["along(dir=error,t=1)"], kl["sae"])  # t = 1 along the error is the SAE, bit for bit
    assert np.abs(kl["along(dir=error,t=0)"]).max() < 1e-6  # t = 0 is x itself
    sweep = report.sweep
    assert [d.direction for d in sweep.directions] == ["error", "epsilon_random", "sae_error_shuffled"]
    assert sweep.sae_kl == pytest.approx(report.interventions["sae"].kl_mean, rel=1e-6)
    assert sweep.threshold_kl == pytest.approx(0.1 * sweep.sae_kl)
    for direction in sweep.directions:
        assert [p.t for p in direction.points] == [0.0, 0.5, 1.0]
        for point in direction.points:
            assert point.kl_mean == pytest.approx(report.interventions[point.intervention].kl_mean, rel=1e-6)
        plateau = direction.plateau
        assert 0 < plateau.t <= 1 and plateau.ci_low <= plateau.t <= plateau.ci_high
    assert sweep.directions[0].sae_equivalent_t == pytest.approx(1.0)
    assert (sweep_run / "length_sweep.png").stat().st_size > 10_000
    page = (sweep_run / "report.md").read_text()
    assert "## Length sweep" in page and "plateau width t [95% CI]" in page
    families = {c.wilcoxon_kl.holm_family for n, c in report.comparisons.items() if n.startswith("along(")}
    assert families == {"sae vs each of 9 length-sweep points (along) at 1 site/layer"}


def test_panel_rows_are_the_comparisons_and_their_holm_values(sweep_run):
    report = load_report(sweep_run)
    assert report.baselines == {"epsilon_random": "isotropic noise", "sae_error_shuffled": "another token's error",
                                "theta_random": "a random substitute at the SAE's cosine and its norm"}
    panel = baseline_panel(report, report.model, report.mode)
    assert [r.baseline for r in panel.rows] == ["epsilon_random", "sae_error_shuffled", "theta_random"]
    for row in panel.rows:
        comparison = report.comparisons[row.baseline]
        assert (row.ratio, row.ci_low, row.ci_high) == (comparison.kl_ratio.ratio, comparison.kl_ratio.ci_low,
                                                        comparison.kl_ratio.ci_high)
        test = comparison.wilcoxon_kl
        assert (row.p_value, row.p_holm, row.holm_family, row.holm_family_size) == (
            test.p_value, test.p_holm, test.holm_family, test.holm_family_size)
        assert row.holm_family == f"sae vs {row.baseline} at 1 site/layer"
    assert report.size_bins.baselines == ["epsilon_random", "sae_error_shuffled", "theta_random"]
    assert sum(b.n_tokens for b in report.size_bins.bins) == report.n_tokens


def test_the_page_and_the_terminal_open_with_every_baseline(sweep_run, capsys):
    report = load_report(sweep_run)
    sentence = opening_sentence(report, report.model, report.mode)
    for label in report.baselines.values():
        assert label in sentence
    page = (sweep_run / "report.md").read_text()
    assert page.split("\n\n")[1] == sentence  # the first paragraph after the title
    assert "## Baselines" in page and "### At matched error size" in page
    capsys.readouterr()
    assert main(["report", str(sweep_run)]) == 0  # redrawn from report.json alone
    assert (sweep_run / "report.md").read_text() == page


def test_compare_and_study_show_the_panel_matrix(sweep_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["compare", str(sweep_run), str(sweep_run), "--label", "a", "--label", "b", "--out",
                 str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    report = load_report(sweep_run)
    row = baseline_panel(report, report.model, report.mode).rows[1]
    cell = f"{row.ratio_text()} {row.verdict}"
    assert f"a  {baseline_panel(report, report.model, report.mode).rows[0].ratio_text()}" in printed
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Baselines" in markdown and f"| a | " in markdown and cell in markdown
    assert "## At matched error size" in markdown
    study = make_study([report])
    page = render_markdown(study, [])
    assert "## Baselines" in page and f"| resid_pre L1 | " in page and cell in page
    assert opening_sentence(study.runs[0], study.model, study.mode) in page


def test_result_summary_and_panel_from_python(sweep_run):
    result = klgap.load_run(sweep_run)
    panel = result.panel()
    assert list(panel.index) == ["epsilon_random", "sae_error_shuffled", "theta_random"]
    summary = result.summary()
    assert summary.attrs["finding"] == result.verdict() == opening_sentence(result.report, result.report.model,
                                                                             result.report.mode)
    assert summary.loc["sae_error_shuffled", "baseline"] == "another token's error"
    assert summary.loc["sae_error_shuffled", "verdict"] == panel.loc["sae_error_shuffled", "verdict"]
    assert pd.isna(summary.loc["zero", "verdict"]) and pd.isna(summary.loc["zero", "baseline"])
    assert result.plot("length_sweep") is not None


def test_python_curve_along_the_error(sae):
    result = klgap.curve("tiny-gpt2", str(sae), along="error", scale="0,1", baselines="epsilon_random",
                         tokens=200, context_len=32, batch_size=4, progress=False)
    assert [d.direction for d in result.report.sweep.directions] == ["error", "epsilon_random"]
    with pytest.raises(klgap.KlgapError, match="scale= sizes a length sweep"):
        klgap.curve("tiny-gpt2", str(sae), scale="0,1")


@pytest.mark.parametrize(("flags", "message"), [
    (["--scale", "0:1:3"], "--scale sizes a length sweep; give it with --along error"),
    (["--along", "error", "--cos", "0.5:1:3"], "--cos sizes a cosine curve, not a length sweep"),
    (["--along", "error", "--scale=-1:1:3"], "-1 is not a length; valid values lie in [0, inf]"),
    (["--along", "error", "--baselines", "epsilon_random,along"], "dir='along' is not valid"),
])
def test_bad_sweep_flags_are_one_line_errors(sae, tmp_path, capsys, flags, message):
    argv = ["curve", "--model", "tiny-gpt2", "--sae", str(sae), *flags, "--out", str(tmp_path / "c"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("klgap: error: ") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_the_replications_tables_script_reads_the_reports(sweep_run):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "replications" / "baselines" / "tables.py"
    spec = importlib.util.spec_from_file_location("baselines_tables", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    report = load_report(sweep_run)
    battery = "\n".join(tables.battery_tables(sweep_run))
    assert f"- {opening_sentence(report, report.model, report.mode)}" in battery
    for row in baseline_panel(report, report.model, report.mode).rows:
        assert f"{row.ratio_text()} {row.verdict}" in battery
    assert "| resid_pre L1 | " in battery and "ε/‖x‖" in battery
    sweep = "\n".join(tables.sweep_tables(sweep_run))
    from klgap.render.sweep_page import plateau_text

    for direction in report.sweep.directions:
        assert plateau_text(direction) in sweep
