"""klgap.report.summary: a run's summary row, read from a tiny real run's report, and what each reader shows of it."""

from __future__ import annotations

import pandas as pd
import pytest

from klgap.report.compare import entries_for
from klgap.plan.config import RunConfig
from klgap.render.console import print_study, print_summary
from klgap.render.pages import render_markdown
from klgap.report.panel import opening_sentence
from klgap.report.read import load_report
from klgap.report.schema import BASELINE
from klgap.plan.sites import hook_name
from klgap.report.summary import summary_row, summary_rows
from tests.core.test_plots import make_study
from tests.helpers import random_sae, run_config

# the random SAE's x̂ is ~2.9‖x‖ long: a curve at norm 3‖x‖ brackets its KL
INTERVENTIONS = ["sae", "epsilon_random", "theta_random", "cosine_matched:cos=0.5,norm_frac=3",
                 "cosine_matched:cos=0.9,norm_frac=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    sae = random_sae(root / "sae.safetensors", 64, 128, hook_name("mlp_out", 1))
    config = RunConfig(model="tiny-gpt2", sae=str(sae), dataset="random", tokens=8 * 32, context_len=32,
                       device="cpu", interventions=INTERVENTIONS)
    run_config(config, root / "run", progress=False)
    return root / "run"


def test_row_holds_the_reports_numbers(run):
    report = load_report(run)
    tokens = pd.read_parquet(run / "tokens.parquet")
    row = summary_row(report, report.model, report.mode)
    assert (row.model, row.mode, row.site, row.layer, row.hook_name) == (
        "tiny-gpt2", "all_tokens", "mlp_out", 1, "blocks.1.hook_mlp_out")
    assert (row.n_tokens, row.n_contexts, row.baseline) == (8 * 31, 8, "epsilon_random")  # position 0 is left out
    kl = tokens.groupby("intervention")["kl"].mean()
    assert row.kl_sae == pytest.approx(kl["sae"], rel=1e-5)
    assert row.kl_baseline == pytest.approx(kl["epsilon_random"], rel=1e-5)
    # every context has as many tokens, so the ratio of per-context means is the ratio of the means
    assert row.ratio == pytest.approx(row.kl_sae / row.kl_baseline, rel=1e-5)
    assert row.ratio_ci_low < row.ratio < row.ratio_ci_high
    comparison = report.comparisons[BASELINE]
    assert (row.ratio_ci_low, row.ratio_ci_high) == (comparison.kl_ratio.ci_low, comparison.kl_ratio.ci_high)
    # Holm within the family of the SAE against epsilon_random: in one run, this one test
    assert 0 < row.p_value == row.p_holm and row.holm_family_size == 1
    assert row.holm_family == "sae vs epsilon_random at 1 site/layer"
    curve = [report.comparisons[n].wilcoxon_kl for n in report.comparisons if n.startswith("cosine_matched")]
    assert [t.holm_family_size for t in curve] == [2, 2]  # the curve's two points: a family of their own
    assert all(t.p_value <= t.p_holm <= min(1.0, 2 * t.p_value) for t in curve)
    assert row.p_value == comparison.wilcoxon_kl.p_value
    assert row.sae_cos == pytest.approx(tokens[tokens.intervention == "sae"].cos.mean(), rel=1e-5)
    assert 0.5 < row.sae_equivalent_cos < 0.9  # the SAE's KL lies between the curve's two points
    assert row.sae_equivalent_cos == report.curve.sae_equivalent_cos["3"]
    assert summary_rows(report) == [row]


def test_every_reader_shows_the_same_row(run, capsys):
    report = load_report(run)
    row = summary_row(report, report.model, report.mode)
    ci = f"{row.ratio:.3f} [{row.ratio_ci_low:.3f}, {row.ratio_ci_high:.3f}]"
    assert row.ratio_text() == ci
    assert f"| mlp_out L1 | {row.kl_sae:.4g} | {row.kl_baseline:.4g} | {ci} | {row.p_text()} |" in render_markdown(report, [])
    (entry,) = entries_for(run)
    assert entry.row == row and entry.label == "tiny-gpt2 mlp_out L1"
    assert entry.record()["kl_epsilon_random"] == row.kl_baseline and entry.record()["ratio"] == row.ratio
    assert entry.cells()[3] == ci
    print_summary(report, run)
    printed = capsys.readouterr().out
    # two baselines were measured (epsilon_random, theta_random): the terminal opens with both (klgap.report.panel),
    # then a line per baseline, the headline's with the same ratio and p
    assert opening_sentence(report, report.model, report.mode) in printed
    assert f"isotropic noise ({row.ratio:.3f}× [{row.ratio_ci_low:.3f}, {row.ratio_ci_high:.3f}])" in printed
    assert "a random substitute at the SAE's cosine and its norm (" in printed
    assert (f"{row.ratio:.3f}× [{row.ratio_ci_low:.3f}, {row.ratio_ci_high:.3f}] the damage of isotropic noise "
            f"(Holm p = {row.p_text()})" in printed) or "less damage than isotropic noise" in printed
    assert "Holm family: sae vs epsilon_random at 1 site/layer (1 test)" in printed
    assert f"sae{' ' * 37} {row.kl_sae:>10.4g}" in printed


def test_study_rows_carry_the_studys_model_and_mode(run, capsys):
    report = load_report(run)
    study = make_study([report, report.model_copy(update={"site": "attn_out"})])
    rows = summary_rows(study)
    assert [r.where for r in rows] == ["mlp_out L1", "attn_out L1"]
    assert {(r.model, r.mode, r.kl_sae) for r in rows} == {(report.model, report.mode, report.interventions["sae"].kl_mean)}
    print_study(study, run)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny-gpt2 study, mode all_tokens: 2 sites/layers"
    assert lines[2].split()[:4] == ["mlp_out", "1", f"{rows[0].kl_sae:.4g}", f"{rows[0].kl_baseline:.4g}"]
    assert rows[1].ratio_text() in lines[3]


def test_no_comparison_without_the_sae(run):
    report = load_report(run)
    bare = report.model_copy(update={"comparisons": {}, "interventions": {
        k: v for k, v in report.interventions.items() if k != "sae"}})
    row = summary_row(bare, bare.model, bare.mode)
    assert (row.kl_sae, row.ratio, row.p_value, row.p_holm) == (None, None, None, None)
    assert row.kl_baseline == report.interventions[BASELINE].kl_mean
    assert (row.ratio_text(), row.p_text()) == ("—", "—")
