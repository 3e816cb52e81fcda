"""report.md / report.html rebuilt from a saved (synthetic) run folder, in every mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from klgap.render import render_html, render_markdown, rebuild
from klgap.schema import Report, load_report
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
    p = [f"{v:.3f}" if v >= 1e-3 else f"{v:.2e}" for v in (test.p_value, test.p_holm)]
    return (f"| resid_post L3 | {kl['sae'].kl_mean:.4g} | {kl['epsilon_random'].kl_mean:.4g} | "
            f"{ratio.ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] | {p[0]} (Holm {p[1]}) |")


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
    assert f"<td>{ratio.ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}]</td>" in page


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
    assert "<td>— [nan, —]</td>" in page and "data:image" not in page

    root = write_run(tmp_path / "run", "all_tokens", report=report)  # nulls (and a NaN) through rebuild
    assert "| resid_post L3 | — | nan | — [nan, —] | — |" in rebuild(root)["report.md"].read_text()


def test_holm_only_when_present():
    report = make_report("all_tokens", make_tokens("all_tokens"))
    assert "(Holm " in render_markdown(report, [])
    for comparison in report.comparisons.values():
        comparison.wilcoxon_kl.p_holm = None
    assert "(Holm " not in render_markdown(report, [])


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
