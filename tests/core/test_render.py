"""report.md / report.html rebuilt from a saved (synthetic) run folder, in every mode."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from klgap.report.holm import apply_holm
from klgap.render.formatting import fmt_ci
from klgap.render.pages import render_html, render_markdown, rebuild
from klgap.report.schema import Report
from klgap.report.read import load_report
from tests.core.test_plots import EXPECTED, MODES, assert_png, make_report, make_study, make_tokens, write_run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Report, dict[str, Path]]]:
    """Each mode's run folder, its report, and what rebuild wrote (built once for the module)."""
    out = {}
    for mode in MODES:
        root = write_run(tmp_path_factory.mktemp(mode), mode)
        out[mode] = (root, load_report(root), rebuild(root))
    return out


def _summary_row(report: Report) -> str:
    kl = report.interventions
    comparison = report.comparisons["epsilon_random"]
    ratio, test = comparison.kl_ratio, comparison.wilcoxon_kl
    p = f"{test.p_value:.3f}" if test.p_value >= 1e-3 else f"{test.p_value:.2e}"
    assert test.p_holm == test.p_value and test.holm_family_size == 1  # one run: the family is this one test
    return (f"| resid_post L3 | {kl['sae'].kl_mean:.4g} | {kl['epsilon_random'].kl_mean:.4g} | "
            f"{ratio.ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] | {p} |")


@pytest.mark.parametrize("mode", MODES)
def test_rebuild_writes_everything(built, mode):
    root, _, written = built[mode]
    assert set(written) == EXPECTED[mode] | {"report.md", "report.html"}
    for name in EXPECTED[mode]:
        assert_png(root / name)


@pytest.mark.parametrize("mode", MODES)
def test_markdown_summary_has_the_reports_numbers(built, mode):
    root, report, _ = built[mode]
    md = (root / "report.md").read_text()
    assert _summary_row(report) in md
    assert "| site/layer | KL sae | KL epsilon_random | ratio [95% CI] | Wilcoxon p |" in md
    assert "synthetic data for tests" in md  # the notes
    for name in EXPECTED[mode]:
        assert f"]({name})" in md
    assert '"sample_intervention": "epsilon_random"' in md  # config as a code block
    for name, stats in report.interventions.items():
        assert f"| {name} | {stats.n_tokens} |" in md


def test_mode_sections(built):
    single = (built["single_token"][0] / "report.md").read_text()
    assert "## Single token: patched at t = 8, measured to t+6" in single
    assert "| offset | sae | epsilon_random | theta_random |" in single and "| t+6 |" in single
    many_report = built["many_samples"][1]
    many = (built["many_samples"][0] / "report.md").read_text()
    assert "## Many samples" in many and "40 draws of epsilon_random per context at position 8" in many
    assert f"mean {many_report.many_samples.z_mean:.2f}" in many
    assert "Single token" not in (built["all_tokens"][0] / "report.md").read_text()


@pytest.mark.parametrize("mode", MODES)
def test_html_is_self_contained(built, mode):
    root, report, _ = built[mode]
    page = (root / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("data:image/png;base64,") == len(EXPECTED[mode])
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and "<link" not in page
    ratio = report.comparisons["epsilon_random"].kl_ratio
    assert (f'<td><span class="nw">{ratio.ratio:.3f}</span> <span class="nw">[{ratio.ci_low:.3f}, '
            f"{ratio.ci_high:.3f}]</span></td>") in page  # a cell breaks between a number and its interval only


def test_rebuild_is_idempotent_and_leaves_data_alone(tmp_path):
    root = write_run(tmp_path / "run", "all_tokens")
    data_before = {n: (root / n).read_bytes() for n in ("report.json", "tokens.parquet")}
    first = rebuild(root)
    contents = {n: p.read_bytes() for n, p in first.items()}
    second = rebuild(root)
    assert second == first
    assert {n: p.read_bytes() for n, p in second.items()} == contents
    assert {n: (root / n).read_bytes() for n in data_before} == data_before
    assert not list(root.glob(".*.tmp"))  # atomic writes leave no temp files


def test_missing_and_nan_values_render(tmp_path):
    report = make_report("all_tokens", make_tokens("all_tokens"))
    report.interventions["sae"].kl_mean = None
    report.interventions["epsilon_random"].kl_mean = math.nan
    comparison = report.comparisons["epsilon_random"]
    comparison.kl_ratio.ratio, comparison.kl_ratio.ci_low, comparison.kl_ratio.ci_high = None, math.nan, None
    comparison.wilcoxon_kl.p_value = comparison.wilcoxon_kl.p_holm = None
    report.sae_metrics.explained_variance = None
    md = render_markdown(report, [])
    assert "| resid_post L3 | — | nan | — [nan, —] | — |" in md
    assert "| explained_variance | — |" in md
    page = render_html(report, [])
    assert '<td><span class="nw">—</span> <span class="nw">[nan, —]</span></td>' in page and "data:image" not in page

    root = write_run(tmp_path / "run", "all_tokens", report=report)  # nulls (and a NaN) through rebuild
    assert "| resid_post L3 | — | nan | — [nan, —] | — |" in rebuild(root)["report.md"].read_text()


def test_holm_only_when_present_and_its_family_holds_more_than_one_test():
    report = make_report("all_tokens", make_tokens("all_tokens"))
    assert "(Holm " not in render_markdown(report, [])  # a run's epsilon_random family: this one test
    study = make_study([report.model_copy(update={"layer": layer}, deep=True) for layer in (2, 3)])
    apply_holm([run.comparisons for run in study.runs])
    md = render_markdown(study, [])
    assert md.count("(Holm ") == 2 and "- sae vs epsilon_random at 2 sites/layers (2 tests)" in md
    for run in study.runs:
        for comparison in run.comparisons.values():
            comparison.wilcoxon_kl.p_holm = None
    assert "(Holm " not in render_markdown(study, [])


def test_html_escapes_text():
    report = make_report("all_tokens", make_tokens("all_tokens"))
    report.notes = ['<script>alert("x")</script> & <b>bold</b>']
    report.model = "a<b>&c"
    page = render_html(report, [])
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "a&lt;b&gt;&amp;c" in page
    md = render_markdown(report, [])
    assert "<script" not in md


def test_study_report_renders(tmp_path):
    base = make_report("all_tokens", make_tokens("all_tokens"))
    study = make_study([base.model_copy(update={"layer": layer}) for layer in (2, 3)])
    (tmp_path / "report.json").write_text(json.dumps(study.model_dump(exclude_unset=True)))
    written = rebuild(tmp_path)  # no sub-run folders: the study's own page and figure only
    assert set(written) == {"kl_bars.png", "report.md", "report.html"}
    md = written["report.md"].read_text()
    ratio = base.comparisons["epsilon_random"].kl_ratio
    for layer in (2, 3):
        assert f"| resid_post L{layer} | {base.interventions['sae'].kl_mean:.4g} |" in md
    assert md.count(f"{ratio.ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}]") == 2
    assert "- runs: resid_post L2, resid_post L3" in md


_INTERVAL = re.compile(r"(-?[\d.]+(?:e[-+]\d+)?)×? \[(-?[\d.]+(?:e[-+]\d+)?), (-?[\d.]+(?:e[-+]\d+)?)\]")


def _intervals(text: str) -> list[tuple[float, float, float]]:
    return [tuple(float(v) for v in m.groups()) for m in _INTERVAL.finditer(text)]


def test_ce_delta_is_the_paired_difference_and_a_ratio_only_over_a_denominator_away_from_0(built):
    root, report, _ = built["all_tokens"]
    tokens = make_tokens("all_tokens")
    comparison = report.comparisons["epsilon_random"]
    diff = comparison.ce_delta_difference
    ce = tokens[tokens["draw"] < 0].groupby("intervention")["ce_delta"].mean()
    assert diff.mean == pytest.approx(ce["sae"] - ce["epsilon_random"], rel=1e-5)
    assert diff.ci_low < diff.mean < diff.ci_high
    md = (root / "report.md").read_text()
    assert f"| epsilon_random | {ratio_text(comparison.kl_ratio)} | {diff.mean:.3g} [{diff.ci_low:.3g}, " in md
    assert comparison.ce_delta_baseline.ci_low > 0  # this baseline's ΔCE is well away from 0: its ratio is shown
    assert ratio_text(comparison.ce_delta_ratio) in md

    # the case: a ΔCE ratio over a mean whose interval holds 0, its point outside its own interval
    bad = report.model_copy(deep=True)
    shaky = bad.comparisons["epsilon_random"]
    shaky.ce_delta_ratio.ratio, shaky.ce_delta_ratio.ci_low, shaky.ce_delta_ratio.ci_high = 6.149, -10.187, 8.481
    shaky.ce_delta_baseline.ci_low, shaky.ce_delta_baseline.ci_high = -0.002, 0.003
    md = render_markdown(bad, [])
    assert "6.149" not in md
    row = next(line for line in md.splitlines() if line.startswith("| epsilon_random | "))
    assert row.split(" | ")[3] == "—"


@pytest.mark.parametrize("mode", MODES)
def test_every_point_estimate_lies_inside_its_interval(built, mode):
    root, report, _ = built[mode]
    bad = report.model_copy(deep=True)
    ratio = bad.comparisons["theta_random"].kl_ratio
    ratio.ratio, ratio.ci_low, ratio.ci_high = 6.149, -10.187, 5.0  # a bootstrap that missed its estimate
    for text in ((root / "report.md").read_text(), (root / "report.html").read_text(), render_markdown(bad, [])):
        found = _intervals(text)
        assert found, "no interval rendered"
        for point, low, high in found:
            assert low <= point <= high, (point, low, high)
    assert "6.149 [interval excludes the estimate]" in render_markdown(bad, [])


def test_report_opens_with_the_verdict_then_the_key_table(built):
    root, report, _ = built["all_tokens"]
    md = (root / "report.md").read_text()
    lines = [line for line in md.splitlines() if line]
    ratio = report.comparisons["epsilon_random"].kl_ratio
    assert lines[1] == (
        f"At blocks.3.hook_resid_post of fake-gpt the SAE's reconstruction (explained variance "
        f"{report.sae_metrics.explained_variance:.3f}, L0 {report.sae_metrics.l0_mean:.3g}) moves the next-token distribution "
        f"{ratio.ratio:.3f}× [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] as much as a random error of the same size "
        f"(Wilcoxon p = {report.comparisons['epsilon_random'].wilcoxon_kl.p_value:.2e} over 20 contexts).")
    assert lines[2].startswith("| site/layer | KL sae |")
    order = [md.index(h) for h in ("| site/layer |", "## Notes", "## Run", "## SAE against each baseline", "## Provenance")]
    assert order == sorted(order)
    quiet = report.model_copy(update={"notes": []})
    assert "Notes" not in render_markdown(quiet, []) and "None." not in render_markdown(quiet, [])


def test_a_study_states_one_verdict_per_site_and_layer(tmp_path):
    base = make_report("all_tokens", make_tokens("all_tokens"))
    study = make_study([base.model_copy(update={"layer": layer}, deep=True) for layer in (2, 3)])
    md = render_markdown(study, [])
    verdicts = [line for line in md.splitlines() if line.startswith("- At blocks.3.hook_resid_post of fake-gpt")]
    assert len(verdicts) == 2  # (the synthetic runs share a hook name; each row is its own sentence)
    assert md.index(verdicts[-1]) < md.index("| site/layer |")


def ratio_text(ratio) -> str:
    return fmt_ci(ratio.ratio, ratio.ci_low, ratio.ci_high)


def test_a_folder_without_its_tokens_table_keeps_the_figures_only_that_table_could_draw(tmp_path):
    """Committed results keep report.json and figures, not tokens.parquet: `klgap report` re-renders their pages."""
    root = write_run(tmp_path / "run", "all_tokens")
    rebuild(root)
    hist = (root / "kl_hist.png").read_bytes()
    (root / "tokens.parquet").unlink()
    (root / "report.md").unlink()
    written = rebuild(root)
    assert set(written) == {"kl_bars.png", "report.md", "report.html"}  # kl_hist / kl_by_position left alone
    assert (root / "kl_hist.png").read_bytes() == hist
    md = written["report.md"].read_text()
    assert md.index("](kl_bars.png)") < md.index("](kl_hist.png)") < md.index("](kl_by_position.png)")
    study = make_study([load_report(root)])
    (tmp_path / "report.json").write_text(json.dumps(study.model_dump(exclude_unset=True)))
    (root.rename(tmp_path / study.runs[0].path))
    assert f"{study.runs[0].path}/report.md" in rebuild(tmp_path)  # a study re-renders its sub-run too
